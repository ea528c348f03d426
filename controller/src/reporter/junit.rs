//! The JUnit reporter: keeps every case as the events tell it and writes
//! `junit.xml` at the end — or, on a second Ctrl-C, at once from what it has.

use std::path::{Path, PathBuf};

use super::Collected;
use crate::report::RunReport;
use crate::run::events::RunEvent;

pub struct Junit {
    path: PathBuf,
    collected: Collected,
    started: Option<tokio::time::Instant>,
}

impl Junit {
    pub fn new(out_dir: &Path) -> Junit {
        Junit { path: out_dir.join("junit.xml"), collected: Collected::default(), started: None }
    }

    pub fn on(&mut self, event: &RunEvent) {
        if let RunEvent::Started { .. } = event {
            self.started = Some(tokio::time::Instant::now());
        }
        self.collected.on(event);
    }

    pub fn report(&self) -> RunReport {
        self.collected.report("no result: the run ended before this case ran")
    }

    /// The second interrupt: every case present, those without a result as
    /// errors. Quick, no I/O but the one file.
    pub fn write_partial(&self) -> Option<PathBuf> {
        let mut report = self.collected.report("interrupted before the case finished");
        report.interrupted = true;
        report.duration = self.started.map(|s| s.elapsed()).unwrap_or_default();
        report.write_junit(&self.path).ok().map(|()| self.path.clone())
    }

    pub fn finish(&self) -> Result<PathBuf, String> {
        match self.report().write_junit(&self.path) {
            Ok(()) => Ok(self.path.clone()),
            Err(e) => Err(format!("cannot write {}: {e}", self.path.display())),
        }
    }
}
