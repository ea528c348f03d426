//! The terminal reporter: the only code that writes to stdout or stderr
//! during a run — live progress, waiting and lost-host lines, errors, and
//! the summary. A closed pipe (`proctor run … | head`) ends output quietly.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

use crate::progress::{Display, Mode};
use crate::report::RunReport;
use crate::run::events::RunEvent;

pub struct Terminal {
    display: Display<std::io::Stdout>,
    live: bool,
    suites: Vec<String>,
    /// (suite, reason) of re-runs already announced.
    said_reruns: BTreeSet<(usize, String)>,
}

impl Terminal {
    pub fn new(mode: Mode) -> Terminal {
        Terminal {
            display: Display::new(mode, std::io::stdout()),
            live: mode == Mode::Live,
            suites: Vec::new(),
            said_reruns: BTreeSet::new(),
        }
    }

    pub fn period(&self) -> Duration {
        self.display.period()
    }

    pub fn tick(&mut self) {
        self.display.tick();
    }

    fn suite(&self, index: usize) -> &str {
        self.suites.get(index).map_or("?", String::as_str)
    }

    /// Errors go to stderr — above the bars when they are live.
    pub fn error(&mut self, text: &str) {
        self.stderr(&format!("error: {text}"));
    }

    pub fn warn(&mut self, text: &str) {
        self.stderr(&format!("warning: {text}"));
    }

    fn stderr(&mut self, line: &str) {
        if self.live {
            self.display.say(line);
        } else {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }

    pub fn on(&mut self, event: &RunEvent) {
        match event {
            RunEvent::Started { suites, .. } => self.suites = suites.iter().map(|s| s.name.clone()).collect(),
            RunEvent::Refused { errors } => errors.iter().for_each(|e| self.error(e)),
            RunEvent::Unreachable { reason, .. } => self.error(reason),
            RunEvent::Waiting { suite, reasons } => {
                let text = format!("suite {} waiting for a host:\n  {}", self.suite(*suite), reasons.join("\n  "));
                self.display.say(&text);
            }
            RunEvent::GaveUpWaiting { suite, reason } => {
                let text = format!("suite {}: {reason}", self.suite(*suite));
                self.error(&text);
            }
            RunEvent::LeaseLost { host, service, reason } => {
                self.warn(&format!("lease on {host}/{service} lost: {reason}"));
            }
            RunEvent::HostLost { host, reason } => self.display.say(&format!("host {host} lost: {reason}")),
            RunEvent::HostBack { host, restarted } => {
                let how = if *restarted { " (its agent restarted)" } else { "" };
                self.display.say(&format!("host {host} is back{how}"));
            }
            RunEvent::CaseLost { suite, reason, requeued: true, .. }
                if self.said_reruns.insert((*suite, reason.clone())) =>
            {
                let text = format!("suite {}: {reason}; re-running its unfinished cases", self.suite(*suite));
                self.display.say(&text);
            }
            RunEvent::StageChanged { host, service, model, from, to, progress, message, usual } => {
                let key = (host.clone(), service.clone(), model.clone());
                self.display.stage(key, *from, *to, (*progress, *usual), message);
            }
            RunEvent::MemoryPressure { host, pressure } => self.display.say(&pressure.describe(host)),
            RunEvent::LoadProgress { host, case, elapsed_ms, warming_up, requests, errors, rps, p99_us } => {
                let at = format!("load {case} on {host}: {:.0}s", *elapsed_ms as f64 / 1000.0);
                let line = match (*warming_up, *requests) {
                    (true, _) => format!("{at}, warming up"),
                    (false, 0) => format!("{at}, {errors} errors"),
                    (false, _) => format!(
                        "{at}, {requests} requests, {}, p99 {}, {errors} errors",
                        proto::format_rate(*rps),
                        crate::report::latency(*p99_us)
                    ),
                };
                self.display.say(&line);
            }
            RunEvent::Telemetry { host, service, rss_bytes, gpu_bytes } => {
                self.display.memory(host, service, (*rss_bytes, *gpu_bytes))
            }
            RunEvent::Interrupted => {
                self.stderr("interrupted: finishing up and writing reports (interrupt again to exit now)");
            }
            _ => {}
        }
    }

    /// The summary, then where the reports are.
    pub fn summary(&mut self, report: &RunReport, files: &super::Files) {
        let mut text = format!("\n{}", report.summary());
        let named = [
            ("JUnit report", &files.junit),
            ("JSON report", &files.json),
            ("HTML report", &files.html),
            ("Markdown summary", &files.markdown),
            ("Trace (OTLP JSON)", &files.trace),
        ];
        for (what, path) in named {
            if let Some(p) = path {
                text.push_str(&format!("{what}: {}\n", p.display()));
            }
        }
        self.display.print(&text);
    }
}
