//! `Collected`: a run's cases and model loads as the events told them — the
//! state the JUnit reporter keeps, and the final `RunReport`.

use std::time::Duration;

use crate::report::{CaseReport, ModelLoad, RunReport};
use crate::run::events::{RunEvent, SuiteInfo};
use crate::store::baseline::Comparison;

#[derive(Debug, Default)]
pub struct Collected {
    run_id: String,
    suites: Vec<SuiteInfo>,
    /// One slot per case of each suite; the first result wins.
    cases: Vec<Vec<Option<CaseReport>>>,
    loads: Vec<ModelLoad>,
    /// Per suite, its loads: (suite name, load), the first per model and host.
    suite_loads: Vec<(String, ModelLoad)>,
    interrupted: bool,
    duration: Duration,
    baseline: Option<Comparison>,
}

impl Collected {
    pub fn on(&mut self, event: &RunEvent) {
        match event {
            RunEvent::Started { run_id, suites, .. } => {
                self.run_id = run_id.clone();
                self.cases = suites.iter().map(|s| vec![None; s.cases.len()]).collect();
                self.suites = suites.clone();
            }
            RunEvent::CaseFinished { suite, case, report, .. } => self.case(*suite, *case, report),
            RunEvent::ModelSettled { suite, load, .. } => {
                self.load(load);
                self.suite_load(*suite, load);
            }
            RunEvent::Interrupted => self.interrupted = true,
            RunEvent::Finished { duration, interrupted } => {
                self.duration = *duration;
                self.interrupted |= *interrupted;
            }
            RunEvent::BaselineCompared { comparison } => self.baseline = Some(comparison.clone()),
            _ => {}
        }
    }

    fn case(&mut self, suite: usize, case: usize, report: &CaseReport) {
        let (Some(info), Some(slot)) =
            (self.suites.get(suite), self.cases.get_mut(suite).and_then(|s| s.get_mut(case)))
        else {
            return;
        };
        if slot.is_none() {
            let mut r = report.clone();
            r.suite = info.name.clone();
            r.name = info.cases[case].clone();
            *slot = Some(r);
        }
    }

    /// Each model once: the load that did the work beats a reuse of it.
    fn load(&mut self, load: &ModelLoad) {
        let same = |l: &ModelLoad| (&l.host, &l.service, &l.model) == (&load.host, &load.service, &load.model);
        match self.loads.iter_mut().find(|l| same(l)) {
            Some(seen) if seen.reused && !load.reused => *seen = load.clone(),
            Some(_) => {}
            None => self.loads.push(load.clone()),
        }
    }

    fn suite_load(&mut self, suite: usize, load: &ModelLoad) {
        let Some(info) = self.suites.get(suite) else { return };
        let same = |(s, l): &(String, ModelLoad)| s == &info.name && (&l.host, &l.model) == (&load.host, &load.model);
        if !self.suite_loads.iter().any(same) {
            self.suite_loads.push((info.name.clone(), load.clone()));
        }
    }

    /// The report as it stands: cases without a result are errors with `unfinished`.
    pub fn report(&self, unfinished: &str) -> RunReport {
        let cases = self
            .cases
            .iter()
            .zip(&self.suites)
            .flat_map(|(slots, info)| {
                slots.iter().zip(&info.cases).map(|(slot, name)| {
                    slot.clone().unwrap_or_else(|| CaseReport::error(&info.name, name, unfinished.to_owned()))
                })
            })
            .collect();
        RunReport {
            run_id: self.run_id.clone(),
            cases,
            loads: self.loads.clone(),
            suite_loads: self.suite_loads.clone(),
            interrupted: self.interrupted,
            duration: self.duration,
            baseline: self.baseline.clone(),
        }
    }
}
