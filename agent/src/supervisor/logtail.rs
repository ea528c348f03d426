//! The service's own words for failure messages: the last lines it wrote,
//! leaving out the access-log lines of the agent's own readiness probes (a
//! service that logs every request would otherwise fill the tail with
//! them), plus the error-looking lines and the last Python traceback —
//! through its exception line — even once they scrolled past. Pure.

use std::collections::VecDeque;

/// Lines kept in the tail, error lines kept apart, lines of one traceback.
const TAIL: usize = 20;
const ERRORS: usize = 10;
const TRACEBACK: usize = 40;

const ERROR_WORDS: [&str; 9] =
    ["error", "exception", "traceback", "fatal", "panic", "killed", "out of memory", "failed", "refused"];

#[derive(Debug, Default)]
pub(super) struct LogTail {
    /// The paths the agent probes: a `GET` of one of them is its own traffic.
    probe_paths: Vec<String>,
    recent: VecDeque<String>,
    errors: VecDeque<String>,
    /// The last traceback, and whether it is still being written.
    traceback: Vec<String>,
    in_traceback: bool,
    probes_left_out: u64,
}

impl LogTail {
    pub(super) fn new(probe_paths: Vec<String>) -> LogTail {
        LogTail { probe_paths, ..LogTail::default() }
    }

    /// Whether the last line pushed left a traceback open (its exception
    /// line has not come yet).
    pub(super) fn in_traceback(&self) -> bool {
        self.in_traceback
    }

    /// Whether the line is the access-log line of one of the agent's probes.
    pub(super) fn is_probe(&self, line: &str) -> bool {
        is_probe(line, &self.probe_paths)
    }

    /// Takes one line. Returns the exception line when it closes a traceback.
    pub(super) fn push(&mut self, line: &str) -> Option<String> {
        if is_probe(line, &self.probe_paths) {
            self.probes_left_out += 1;
            return None;
        }
        let closed = self.traceback_line(line);
        keep(&mut self.recent, line, TAIL);
        if closed.is_none() && !self.in_traceback && looks_like_error(line) {
            keep(&mut self.errors, line, ERRORS);
        }
        closed
    }

    fn traceback_line(&mut self, line: &str) -> Option<String> {
        if line.starts_with("Traceback (most recent call last)") {
            self.traceback = vec![line.to_owned()];
            self.in_traceback = true;
            return None;
        }
        if !self.in_traceback {
            return None;
        }
        if self.traceback.len() < TRACEBACK {
            self.traceback.push(line.to_owned());
        }
        // Frames are indented; the first line that is not is the exception.
        if line.starts_with([' ', '\t']) {
            return None;
        }
        self.in_traceback = false;
        Some(line.to_owned())
    }

    /// The part of a failure message that quotes the service.
    pub(super) fn render(&self) -> String {
        let mut out = String::new();
        let shown = |l: &String| self.recent.contains(l) || self.traceback.contains(l);
        let earlier: Vec<&String> = self.errors.iter().filter(|l| !shown(l)).collect();
        if !earlier.is_empty() {
            out.push_str("\n  earlier error lines:");
            earlier.iter().for_each(|l| push_line(&mut out, l));
        }
        if !self.traceback.is_empty() && !self.traceback.iter().all(|l| self.recent.contains(l)) {
            out.push_str("\n  last traceback:");
            self.traceback.iter().for_each(|l| push_line(&mut out, l));
        }
        let probes = match self.probes_left_out {
            0 => String::new(),
            n => format!(", {n} of the agent's own probe requests left out"),
        };
        if self.recent.is_empty() {
            out.push_str(&format!("\n  last log lines: (none{probes})"));
        } else {
            out.push_str(&format!("\n  last {} log lines{probes}:", self.recent.len()));
            self.recent.iter().for_each(|l| push_line(&mut out, l));
        }
        out
    }
}

fn keep(lines: &mut VecDeque<String>, line: &str, cap: usize) {
    if lines.len() == cap {
        lines.pop_front();
    }
    lines.push_back(line.to_owned());
}

fn push_line(out: &mut String, line: &str) {
    out.push_str("\n    ");
    out.push_str(line);
}

/// An access-log line of a `GET` to a probed path (`GET /health HTTP/1.1`,
/// `GET /health?x`, `"GET /v2/health/live"`).
fn is_probe(line: &str, paths: &[String]) -> bool {
    paths.iter().any(|p| {
        line.match_indices(&format!("GET {p}"))
            .any(|(at, m)| line[at + m.len()..].chars().next().is_none_or(|c| matches!(c, ' ' | '?' | '"')))
    })
}

fn looks_like_error(line: &str) -> bool {
    let lower = line.to_lowercase();
    ERROR_WORDS.iter().any(|w| lower.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail(lines: &[&str]) -> LogTail {
        let mut t = LogTail::new(vec!["/health".into(), "/v2/health/live".into()]);
        for l in lines {
            t.push(l);
        }
        t
    }

    #[test]
    fn the_agents_own_probe_requests_are_left_out() {
        // (line, is a probe of /health or /v2/health/live)
        let table = [
            ("INFO:     127.0.0.1:5321 - \"GET /health HTTP/1.1\" 200 OK", true),
            ("127.0.0.1 - - [30/Nov/2026 10:00:00] \"GET /health HTTP/1.1\" 404 -", true),
            ("GET /v2/health/live", true),
            ("GET /health?verbose=1 HTTP/1.1", true),
            ("GET /healthz HTTP/1.1", false),
            ("POST /health HTTP/1.1", false),
            ("GET /translate HTTP/1.1", false),
        ];
        for (line, probe) in table {
            assert_eq!(is_probe(line, &["/health".into(), "/v2/health/live".into()]), probe, "{line}");
        }
        let mut lines = vec!["RuntimeError: weights corrupt"];
        lines.extend(std::iter::repeat_n("\"GET /health HTTP/1.1\" 404 -", 50));
        let text = tail(&lines).render();
        assert!(text.contains("last 1 log lines, 50 of the agent's own probe requests left out:"), "{text}");
        assert!(text.contains("RuntimeError: weights corrupt") && !text.contains("GET /health"), "{text}");
    }

    #[test]
    fn a_traceback_is_kept_through_its_exception_line() {
        let mut t = LogTail::new(vec![]);
        let lines = [
            ("Traceback (most recent call last):", None, true),
            ("  File \"server.py\", line 3, in load", None, true),
            ("    torch.load(path)", None, true),
            ("RuntimeError: weights corrupt", Some("RuntimeError: weights corrupt"), false),
        ];
        for (line, closes, open_after) in lines {
            assert_eq!(t.push(line).as_deref(), closes, "{line}");
            assert_eq!(t.in_traceback(), open_after, "{line}");
        }
        for i in 0..30 {
            t.push(&format!("retrying in {i}s"));
        }
        let text = t.render();
        assert!(text.contains("last traceback:\n    Traceback (most recent call last):"), "{text}");
        assert!(text.contains("    RuntimeError: weights corrupt\n  last 20 log lines:"), "{text}");
    }

    #[test]
    fn error_lines_that_scrolled_past_are_kept_apart() {
        let mut lines = vec!["CUDA error: out of memory", "waiting on a lock that never frees"];
        lines.extend(std::iter::repeat_n("tick", 25));
        let text = tail(&lines).render();
        assert!(text.contains("earlier error lines:\n    CUDA error: out of memory"), "{text}");
        assert!(!text.contains("waiting on a lock"), "not error-looking, and scrolled out: {text}");
    }
}
