//! JUnit XML in the dialect CI servers read: Jenkins (xUnit plugin, its
//! "JUnit 10" schema), GitLab's test reports and the GitHub test-report
//! actions. Written by hand rather than through a JUnit crate so that every
//! element and attribute is one that schema allows (checked against
//! `proctor/tests/fixtures/junit.xsd` with `xmllint` by the tests):
//! `<testsuites name tests failures errors time>`; per suite `<testsuite>`
//! with its counts, time, `timestamp` and `hostname`, its model loads as
//! `<properties>`; per case `<testcase name classname time>` with
//! `<failure>` / `<error>`, infrastructure re-runs as `<rerunError>` (still
//! failing) or `<flakyError>` (passed on a later attempt), and the case's
//! own output — host, request, response — in `<system-out>`. A command
//! case's tests follow it, each a `<testcase>` of its own named
//! `<case> :: <classname>::<test>`, a skip inside the command as `<skipped>`.

use std::fmt::Write as _;

use super::{CaseReport, Outcome, RunReport, TestReport, escape_markup as escape};

fn seconds(d: std::time::Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

/// Test, failure, error and skip counts of some cases and the tests of
/// their commands.
fn counts<'a>(cases: impl Iterator<Item = &'a CaseReport>) -> (usize, usize, usize, usize) {
    cases.fold((0, 0, 0, 0), |(n, f, e, s), c| {
        let (n, f, e) = match c.outcome {
            Outcome::Passed => (n + 1, f, e),
            Outcome::Failed(_) => (n + 1, f + 1, e),
            Outcome::Error(_) => (n + 1, f, e + 1),
        };
        c.tests.iter().fold((n, f, e, s), |(n, f, e, s), t| match t.outcome.as_str() {
            "failed" => (n + 1, f + 1, e, s),
            "error" => (n + 1, f, e + 1, s),
            "skipped" => (n + 1, f, e, s + 1),
            _ => (n + 1, f, e, s),
        })
    })
}

/// The whole file.
pub fn render(report: &RunReport) -> String {
    let mut suites: Vec<&str> = Vec::new();
    for c in &report.cases {
        if !suites.contains(&c.suite.as_str()) {
            suites.push(&c.suite);
        }
    }
    let (tests, failures, errors, _) = counts(report.cases.iter());
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"proctor\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" time=\"{}\">",
        seconds(report.duration)
    );
    for suite in suites {
        testsuite(&mut out, report, suite);
    }
    out.push_str("</testsuites>\n");
    out
}

/// From the first case's start to the last one's end (cases of a
/// `parallel` suite overlap), plus the time of cases that never started.
fn wall_time(cases: &[&CaseReport]) -> std::time::Duration {
    let (started, unstarted): (Vec<&CaseReport>, Vec<&CaseReport>) = cases.iter().partition(|c| c.started_unix_ms > 0);
    let first = started.iter().map(|c| c.started_unix_ms).min().unwrap_or(0);
    let last = started.iter().map(|c| c.started_unix_ms.saturating_add(c.duration.as_millis() as i64)).max();
    let span = std::time::Duration::from_millis(last.map_or(0, |l| l.saturating_sub(first).max(0) as u64));
    span + unstarted.iter().map(|c| c.duration).sum::<std::time::Duration>()
}

fn testsuite(out: &mut String, report: &RunReport, suite: &str) {
    let cases: Vec<&CaseReport> = report.cases.iter().filter(|c| c.suite == suite).collect();
    let (tests, failures, errors, skipped) = counts(cases.iter().copied());
    let time = wall_time(&cases);
    let mut hosts: Vec<&str> = cases.iter().map(|c| c.host.as_str()).filter(|h| !h.is_empty()).collect();
    hosts.sort_unstable();
    hosts.dedup();
    let _ = write!(
        out,
        "  <testsuite name=\"{}\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\" time=\"{}\"",
        escape(suite),
        seconds(time)
    );
    if let Some(first) = cases.iter().map(|c| c.started_unix_ms).filter(|t| *t > 0).min() {
        let _ = write!(out, " timestamp=\"{}\"", proto::format_unix_ms(first));
    }
    if !hosts.is_empty() {
        let _ = write!(out, " hostname=\"{}\"", escape(&hosts.join(", ")));
    }
    out.push_str(">\n");
    properties(out, report, suite);
    for c in cases {
        testcase(out, c);
        for t in &c.tests {
            command_test(out, c, t);
        }
    }
    out.push_str("  </testsuite>\n");
}

/// The run's id and the suite's model loads (`ModelLoad::properties`).
fn properties(out: &mut String, report: &RunReport, suite: &str) {
    let mut props = vec![("proctor.run_id".to_owned(), report.run_id.clone())];
    props.extend(report.suite_loads.iter().filter(|(s, _)| s == suite).flat_map(|(_, l)| l.properties()));
    out.push_str("    <properties>\n");
    for (name, value) in props {
        let _ = writeln!(out, "      <property name=\"{}\" value=\"{}\"/>", escape(&name), escape(&value));
    }
    out.push_str("    </properties>\n");
}

fn testcase(out: &mut String, c: &CaseReport) {
    let _ = writeln!(
        out,
        "    <testcase name=\"{}\" classname=\"{}\" time=\"{}\">",
        escape(&c.name),
        escape(&c.suite),
        seconds(c.duration)
    );
    match &c.outcome {
        Outcome::Passed => {}
        Outcome::Failed(failures) => {
            let text: Vec<String> = failures.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                out,
                "      <failure message=\"{}\" type=\"assertion\">{}</failure>",
                escape(&c.headline()),
                escape(&text.join("\n"))
            );
        }
        Outcome::Error(message) => {
            let _ = writeln!(
                out,
                "      <error message=\"{}\" type=\"error\">{}</error>",
                escape(message.lines().next().unwrap_or_default()),
                escape(message)
            );
        }
    }
    // Attempts lost to infrastructure: flaky if the case then passed.
    let rerun = if c.outcome == Outcome::Passed { "flakyError" } else { "rerunError" };
    for reason in &c.reruns {
        let _ = writeln!(
            out,
            "      <{rerun} message=\"{}\" type=\"infrastructure\"/>",
            escape(&format!("re-run: {reason}"))
        );
    }
    let output = case_output(c);
    if !output.is_empty() {
        let _ = writeln!(out, "      <system-out>{}</system-out>", escape(&output));
    }
    out.push_str("    </testcase>\n");
}

/// One test a command case reported.
fn command_test(out: &mut String, c: &CaseReport, t: &TestReport) {
    let _ = write!(
        out,
        "    <testcase name=\"{}\" classname=\"{}\" time=\"{}\"",
        escape(&format!("{} :: {}", c.name, t.id())),
        escape(&c.suite),
        seconds(std::time::Duration::from_millis(t.duration_ms))
    );
    let message = escape(&t.message);
    match t.outcome.as_str() {
        "failed" => {
            let _ = write!(out, ">\n      <failure message=\"{message}\" type=\"test\"/>\n    </testcase>\n");
        }
        "error" => {
            let _ = write!(out, ">\n      <error message=\"{message}\" type=\"test\"/>\n    </testcase>\n");
        }
        "skipped" => {
            let _ = write!(out, ">\n      <skipped message=\"{message}\"/>\n    </testcase>\n");
        }
        _ => out.push_str("/>\n"),
    }
}

/// Where it ran and what the service answered (the response only for a case
/// that did not pass: a passing case's body is noise in a CI report).
fn case_output(c: &CaseReport) -> String {
    let mut lines = Vec::new();
    if !c.host.is_empty() {
        lines.push(format!("host: {} (attempt {}, lease epoch {})", c.host, c.attempt, c.lease_epoch));
    }
    let command = super::command_of(&c.url);
    match (command, c.url.is_empty()) {
        (Some(command), _) => lines.push(format!("command: {command}")),
        (None, false) => lines.push(format!("request: {} {}", c.method, c.url)),
        (None, true) => {}
    }
    if let Some(l) = &c.load {
        lines.push(format!("load ({}): {}", l.mode, l.line()));
        lines.push(format!("thresholds: {}", l.thresholds_line()));
    }
    // A load's first errors and a command's output on lines of their own.
    let own_lines = c.load.is_some() || command.is_some();
    let failed = c.outcome != Outcome::Passed;
    match (own_lines, c.excerpt.is_empty()) {
        (true, false) if c.load.is_some() || failed => lines.push(format!("{}:\n{}", c.excerpt_heading(), c.excerpt)),
        (false, _) if failed && c.http_status.is_some() => {
            lines.push(format!("{}: {}", c.excerpt_heading(), c.excerpt))
        }
        _ => {}
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_control_characters_never_break_the_file() {
        assert_eq!(escape("a<b & \"c\" 'd'>"), "a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;");
        assert_eq!(escape("line\nnext\u{1b}[31m"), "line\nnext\\u{1b}[31m");
    }

    #[test]
    fn a_suites_time_is_its_wall_time_not_the_sum_of_overlapping_cases() {
        let case = |started_unix_ms, ms| CaseReport {
            started_unix_ms,
            duration: std::time::Duration::from_millis(ms),
            ..CaseReport::error("s", "c", String::new())
        };
        // (cases as (start, ms), expected ms)
        let table: [(&[(i64, u64)], u64); 4] = [
            (&[(1000, 500), (1000, 500), (1200, 500)], 700),
            (&[(1000, 100), (2000, 100)], 1100),
            (&[(1000, 300), (1100, 300), (0, 200)], 600),
            (&[], 0),
        ];
        for (cases, want) in table {
            let cases: Vec<CaseReport> = cases.iter().map(|(s, ms)| case(*s, *ms)).collect();
            let refs: Vec<&CaseReport> = cases.iter().collect();
            assert_eq!(wall_time(&refs), std::time::Duration::from_millis(want), "{cases:?}");
        }
    }
}
