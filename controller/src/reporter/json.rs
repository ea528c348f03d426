//! The JSON reporter: `report.json`, everything the run knew, in a
//! documented, versioned shape (docs/reports.md; `SCHEMA_VERSION`): suites,
//! cases with their attempts, model loads with their stage timelines, memory
//! samples, memory pressure, and what happened to each host. Built from the
//! `RunEvent` stream; the cases and loads as the JUnit reporter keeps them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::report::{CaseReport, Outcome, RunReport};
use crate::run::events::{Pressure, RunEvent, StageSpan, SuiteInfo};

/// Bumped on any change a reader could notice (a field removed, renamed or
/// retyped); new fields keep it.
pub const SCHEMA_VERSION: u32 = 1;

/// Memory samples kept (1 Hz per service: over 8 hours of one service).
const SAMPLE_CAP: usize = 30_000;

#[derive(Debug, Default)]
pub struct Json {
    path: PathBuf,
    run_id: String,
    trace_id: String,
    started_unix_ms: i64,
    suites: Vec<SuiteInfo>,
    hosts: BTreeMap<String, Vec<HostEvent>>,
    /// (suite index, load) with the stage spans the runner measured.
    loads: Vec<Load>,
    memory: Vec<Sample>,
    pressure: Vec<PressureRecord>,
    /// Told again from the store, never finished by its controller.
    partial: bool,
}

#[derive(Debug, Serialize)]
pub(super) struct HostEvent {
    pub(super) at_unix_ms: i64,
    /// `unreachable`, `lost`, `back`, `restarted`.
    pub(super) kind: &'static str,
    pub(super) reason: String,
}

#[derive(Debug, Serialize)]
pub(super) struct Load {
    pub(super) suite: String,
    pub(super) host: String,
    pub(super) service: String,
    pub(super) model: String,
    /// `ready`, `failed`, `reused`.
    pub(super) outcome: &'static str,
    pub(super) failure: Option<String>,
    pub(super) asked_unix_ms: i64,
    pub(super) waited_ms: u64,
    pub(super) peak_rss_bytes: u64,
    pub(super) peak_gpu_bytes: u64,
    pub(super) stages: Vec<Stage>,
}

#[derive(Debug, Serialize)]
pub(super) struct Stage {
    pub(super) stage: &'static str,
    pub(super) cause: String,
    pub(super) start_unix_ms: i64,
    pub(super) end_unix_ms: i64,
    pub(super) peak_rss_bytes: u64,
    pub(super) peak_gpu_bytes: u64,
}

#[derive(Debug, Serialize)]
pub(super) struct Sample {
    pub(super) host: String,
    pub(super) service: String,
    /// When the controller received it.
    pub(super) at_unix_ms: i64,
    pub(super) rss_bytes: u64,
    pub(super) gpu_bytes: u64,
}

#[derive(Debug, Serialize)]
pub(super) struct PressureRecord {
    pub(super) host: String,
    pub(super) at_unix_ms: i64,
    /// `host` or `gpu`.
    pub(super) resource: &'static str,
    pub(super) gpu: Option<u32>,
    pub(super) available_bytes: u64,
    pub(super) total_bytes: u64,
    pub(super) threshold_bytes: u64,
    pub(super) loading: Vec<String>,
    pub(super) consumers: Vec<Consumer>,
}

#[derive(Debug, Serialize)]
pub(super) struct Consumer {
    pub(super) pid: u32,
    pub(super) name: String,
    pub(super) service: String,
    pub(super) bytes: u64,
}

#[derive(Debug, Serialize)]
pub(super) struct Suite<'a> {
    pub(super) name: &'a str,
    pub(super) file: String,
    pub(super) service: &'a str,
    pub(super) models: &'a [String],
    pub(super) cases: &'a [String],
}

#[derive(Debug, Serialize)]
pub(super) struct Case<'a> {
    pub(super) suite: &'a str,
    pub(super) name: &'a str,
    /// `passed`, `failed`, `error`.
    pub(super) outcome: &'static str,
    pub(super) failures: Vec<Failure<'a>>,
    /// Why it could not be judged (`error`).
    pub(super) message: Option<&'a str>,
    pub(super) host: &'a str,
    pub(super) attempt: u32,
    /// Earlier attempts lost to infrastructure, with why.
    pub(super) reruns: &'a [String],
    pub(super) lease_epoch: u64,
    pub(super) started_unix_ms: i64,
    pub(super) duration_ms: u64,
    pub(super) method: &'a str,
    pub(super) url: &'a str,
    pub(super) http_status: Option<u16>,
    pub(super) response_excerpt: &'a str,
    /// A command case's tests (absent for HTTP cases).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub(super) tests: &'a [crate::report::TestReport],
    /// A load case's figures (absent for other cases).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) load: Option<&'a crate::report::LoadReport>,
}

#[derive(Debug, Serialize)]
pub(super) struct Failure<'a> {
    pub(super) check: &'a str,
    pub(super) pointer: &'a str,
    pub(super) expected: &'a str,
    pub(super) actual: &'a str,
}

#[derive(Debug, Serialize)]
pub(super) struct Host<'a> {
    pub(super) name: &'a str,
    pub(super) events: &'a [HostEvent],
}

#[derive(Debug, Serialize)]
pub(super) struct Totals {
    pub(super) cases: usize,
    pub(super) passed: usize,
    pub(super) failed: usize,
    pub(super) errors: usize,
}

#[derive(Debug, Serialize)]
pub(super) struct Document<'a> {
    pub(super) schema: &'static str,
    pub(super) schema_version: u32,
    pub(super) run_id: &'a str,
    pub(super) trace_id: &'a str,
    pub(super) started_unix_ms: i64,
    pub(super) duration_ms: u64,
    pub(super) interrupted: bool,
    /// Its controller stopped before the end (told again from the store).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(super) partial: bool,
    pub(super) totals: Totals,
    pub(super) hosts: Vec<Host<'a>>,
    pub(super) suites: Vec<Suite<'a>>,
    pub(super) cases: Vec<Case<'a>>,
    pub(super) loads: &'a [Load],
    pub(super) memory: &'a [Sample],
    pub(super) pressure: &'a [PressureRecord],
    /// The loads against the stored baselines (absent without a store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) baseline: Option<&'a crate::store::baseline::Comparison>,
}

impl Json {
    pub fn new(out_dir: &Path) -> Json {
        Json { path: out_dir.join("report.json"), ..Json::default() }
    }

    /// One event, received at `at` (controller clock, Unix ms): live, or
    /// as the run store recorded it.
    pub fn on(&mut self, event: &RunEvent, at: i64) {
        match event {
            RunEvent::Started { run_id, trace_id, suites, hosts } => {
                self.run_id.clone_from(run_id);
                self.trace_id = trace_id.to_string();
                self.started_unix_ms = at;
                self.suites.clone_from(suites);
                self.hosts = hosts.iter().map(|h| (h.clone(), Vec::new())).collect();
            }
            RunEvent::Unreachable { host, reason } => self.host_event(host, "unreachable", reason, at),
            RunEvent::HostLost { host, reason } => self.host_event(host, "lost", reason, at),
            RunEvent::HostBack { host, restarted } => {
                self.host_event(host, if *restarted { "restarted" } else { "back" }, "", at)
            }
            RunEvent::ModelSettled { suite, load, asked_unix_ms, stages, .. } => {
                let suite = self.suites.get(*suite).map(|s| s.name.clone()).unwrap_or_default();
                self.loads.push(Load {
                    suite,
                    host: load.host.clone(),
                    service: load.service.clone(),
                    model: load.model.clone(),
                    outcome: load.outcome(),
                    failure: load.failure.clone(),
                    asked_unix_ms: *asked_unix_ms,
                    waited_ms: load.waited.as_millis() as u64,
                    peak_rss_bytes: load.peak_rss_bytes,
                    peak_gpu_bytes: load.peak_gpu_bytes,
                    stages: stages.iter().map(stage).collect(),
                });
            }
            RunEvent::Telemetry { host, service, rss_bytes, gpu_bytes } if self.memory.len() < SAMPLE_CAP => {
                self.memory.push(Sample {
                    host: host.clone(),
                    service: service.clone(),
                    at_unix_ms: at,
                    rss_bytes: *rss_bytes,
                    gpu_bytes: *gpu_bytes,
                });
            }
            RunEvent::MemoryPressure { host, pressure } => self.pressure.push(pressure_record(host, pressure, at)),
            _ => {}
        }
    }

    fn host_event(&mut self, host: &str, kind: &'static str, reason: &str, at: i64) {
        let event = HostEvent { at_unix_ms: at, kind, reason: reason.to_owned() };
        self.hosts.entry(host.to_owned()).or_default().push(event);
    }

    /// Marks the document as told from a run that never finished.
    pub fn set_partial(&mut self) {
        self.partial = true;
    }

    /// Writes `report.json` for the run's final `report`.
    pub fn finish(&self, report: &RunReport) -> Result<PathBuf, String> {
        let text = serde_json::to_string_pretty(&self.document(report)).map_err(|e| e.to_string())?;
        std::fs::write(&self.path, text + "\n").map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        Ok(self.path.clone())
    }

    /// Writes `report.html` (`html::render`) from the same document.
    pub fn finish_html(&self, report: &RunReport) -> Result<PathBuf, String> {
        let path = self.path.with_file_name("report.html");
        let text = super::html::render(&self.document(report));
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    }

    pub(super) fn document<'a>(&'a self, report: &'a RunReport) -> Document<'a> {
        let counts = report.counts();
        Document {
            schema: "proctor.report",
            schema_version: SCHEMA_VERSION,
            run_id: &self.run_id,
            trace_id: &self.trace_id,
            started_unix_ms: self.started_unix_ms,
            duration_ms: report.duration.as_millis() as u64,
            interrupted: report.interrupted,
            partial: self.partial,
            totals: Totals {
                cases: report.cases.len(),
                passed: counts.passed,
                failed: counts.failed,
                errors: counts.errors,
            },
            hosts: self.hosts.iter().map(|(name, events)| Host { name, events }).collect(),
            suites: self
                .suites
                .iter()
                .map(|s| Suite {
                    name: &s.name,
                    file: s.file.display().to_string(),
                    service: &s.service,
                    models: &s.models,
                    cases: &s.cases,
                })
                .collect(),
            cases: report.cases.iter().map(case).collect(),
            loads: &self.loads,
            memory: &self.memory,
            pressure: &self.pressure,
            baseline: report.baseline.as_ref(),
        }
    }
}

fn stage(s: &StageSpan) -> Stage {
    Stage {
        stage: s.stage.label(),
        cause: s.cause.clone(),
        start_unix_ms: s.start_unix_ms,
        end_unix_ms: s.end_unix_ms,
        peak_rss_bytes: s.peak_rss_bytes,
        peak_gpu_bytes: s.peak_gpu_bytes,
    }
}

fn case(c: &CaseReport) -> Case<'_> {
    let (outcome, failures, message) = match &c.outcome {
        Outcome::Passed => ("passed", Vec::new(), None),
        Outcome::Failed(f) => (
            "failed",
            f.iter()
                .map(|f| Failure { check: &f.check, pointer: &f.pointer, expected: &f.expected, actual: &f.actual })
                .collect(),
            None,
        ),
        Outcome::Error(m) => ("error", Vec::new(), Some(m.as_str())),
    };
    Case {
        suite: &c.suite,
        name: &c.name,
        outcome,
        failures,
        message,
        host: &c.host,
        attempt: c.attempt,
        reruns: &c.reruns,
        lease_epoch: c.lease_epoch,
        started_unix_ms: c.started_unix_ms,
        duration_ms: c.duration.as_millis() as u64,
        method: &c.method,
        url: &c.url,
        http_status: c.http_status,
        response_excerpt: &c.excerpt,
        tests: &c.tests,
        load: c.load.as_deref(),
    }
}

fn pressure_record(host: &str, p: &Pressure, at: i64) -> PressureRecord {
    PressureRecord {
        host: host.to_owned(),
        at_unix_ms: at,
        resource: if p.gpu.is_some() { "gpu" } else { "host" },
        gpu: p.gpu,
        available_bytes: p.available_bytes,
        total_bytes: p.total_bytes,
        threshold_bytes: p.threshold_bytes,
        loading: p.loading.clone(),
        consumers: p
            .consumers
            .iter()
            .map(|(pid, name, service, bytes)| Consumer {
                pid: *pid,
                name: name.clone(),
                service: service.clone(),
                bytes: *bytes,
            })
            .collect(),
    }
}
