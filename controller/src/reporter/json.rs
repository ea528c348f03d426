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

fn now_ms() -> i64 {
    crate::client::now_unix_ms()
}

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
}

#[derive(Debug, Serialize)]
struct HostEvent {
    at_unix_ms: i64,
    /// `unreachable`, `lost`, `back`, `restarted`.
    kind: &'static str,
    reason: String,
}

#[derive(Debug, Serialize)]
struct Load {
    suite: String,
    host: String,
    service: String,
    model: String,
    /// `ready`, `failed`, `reused`.
    outcome: &'static str,
    failure: Option<String>,
    asked_unix_ms: i64,
    waited_ms: u64,
    peak_rss_bytes: u64,
    peak_gpu_bytes: u64,
    stages: Vec<Stage>,
}

#[derive(Debug, Serialize)]
struct Stage {
    stage: &'static str,
    cause: String,
    start_unix_ms: i64,
    end_unix_ms: i64,
    peak_rss_bytes: u64,
    peak_gpu_bytes: u64,
}

#[derive(Debug, Serialize)]
struct Sample {
    host: String,
    service: String,
    /// When the controller received it.
    at_unix_ms: i64,
    rss_bytes: u64,
    gpu_bytes: u64,
}

#[derive(Debug, Serialize)]
struct PressureRecord {
    host: String,
    at_unix_ms: i64,
    /// `host` or `gpu`.
    resource: &'static str,
    gpu: Option<u32>,
    available_bytes: u64,
    total_bytes: u64,
    threshold_bytes: u64,
    loading: Vec<String>,
    consumers: Vec<Consumer>,
}

#[derive(Debug, Serialize)]
struct Consumer {
    pid: u32,
    name: String,
    service: String,
    bytes: u64,
}

#[derive(Debug, Serialize)]
struct Suite<'a> {
    name: &'a str,
    file: String,
    service: &'a str,
    models: &'a [String],
    cases: &'a [String],
}

#[derive(Debug, Serialize)]
struct Case<'a> {
    suite: &'a str,
    name: &'a str,
    /// `passed`, `failed`, `error`.
    outcome: &'static str,
    failures: Vec<Failure<'a>>,
    /// Why it could not be judged (`error`).
    message: Option<&'a str>,
    host: &'a str,
    attempt: u32,
    /// Earlier attempts lost to infrastructure, with why.
    reruns: &'a [String],
    lease_epoch: u64,
    started_unix_ms: i64,
    duration_ms: u64,
    method: &'a str,
    url: &'a str,
    http_status: Option<u16>,
    response_excerpt: &'a str,
}

#[derive(Debug, Serialize)]
struct Failure<'a> {
    check: &'a str,
    pointer: &'a str,
    expected: &'a str,
    actual: &'a str,
}

#[derive(Debug, Serialize)]
struct Host<'a> {
    name: &'a str,
    events: &'a [HostEvent],
}

#[derive(Debug, Serialize)]
struct Totals {
    cases: usize,
    passed: usize,
    failed: usize,
    errors: usize,
}

#[derive(Debug, Serialize)]
struct Document<'a> {
    schema: &'static str,
    schema_version: u32,
    run_id: &'a str,
    trace_id: &'a str,
    started_unix_ms: i64,
    duration_ms: u64,
    interrupted: bool,
    totals: Totals,
    hosts: Vec<Host<'a>>,
    suites: Vec<Suite<'a>>,
    cases: Vec<Case<'a>>,
    loads: &'a [Load],
    memory: &'a [Sample],
    pressure: &'a [PressureRecord],
}

impl Json {
    pub fn new(out_dir: &Path) -> Json {
        Json { path: out_dir.join("report.json"), ..Json::default() }
    }

    pub fn on(&mut self, event: &RunEvent) {
        match event {
            RunEvent::Started { run_id, trace_id, suites, hosts } => {
                self.run_id.clone_from(run_id);
                self.trace_id = trace_id.to_string();
                self.started_unix_ms = now_ms();
                self.suites.clone_from(suites);
                self.hosts = hosts.iter().map(|h| (h.clone(), Vec::new())).collect();
            }
            RunEvent::Unreachable { host, reason } => self.host_event(host, "unreachable", reason),
            RunEvent::HostLost { host, reason } => self.host_event(host, "lost", reason),
            RunEvent::HostBack { host, restarted } => {
                self.host_event(host, if *restarted { "restarted" } else { "back" }, "")
            }
            RunEvent::ModelSettled { suite, load, asked_unix_ms, stages, .. } => {
                let suite = self.suites.get(*suite).map(|s| s.name.clone()).unwrap_or_default();
                self.loads.push(Load {
                    suite,
                    host: load.host.clone(),
                    service: load.service.clone(),
                    model: load.model.clone(),
                    outcome: match (&load.failure, load.reused) {
                        (Some(_), _) => "failed",
                        (None, true) => "reused",
                        (None, false) => "ready",
                    },
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
                    at_unix_ms: now_ms(),
                    rss_bytes: *rss_bytes,
                    gpu_bytes: *gpu_bytes,
                });
            }
            RunEvent::MemoryPressure { host, pressure } => self.pressure.push(pressure_record(host, pressure)),
            _ => {}
        }
    }

    fn host_event(&mut self, host: &str, kind: &'static str, reason: &str) {
        let event = HostEvent { at_unix_ms: now_ms(), kind, reason: reason.to_owned() };
        self.hosts.entry(host.to_owned()).or_default().push(event);
    }

    /// Writes `report.json` for the run's final `report`.
    pub fn finish(&self, report: &RunReport) -> Result<PathBuf, String> {
        let text = serde_json::to_string_pretty(&self.document(report)).map_err(|e| e.to_string())?;
        std::fs::write(&self.path, text + "\n").map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        Ok(self.path.clone())
    }

    fn document<'a>(&'a self, report: &'a RunReport) -> Document<'a> {
        let count = |o: fn(&Outcome) -> bool| report.cases.iter().filter(|c| o(&c.outcome)).count();
        Document {
            schema: "proctor.report",
            schema_version: SCHEMA_VERSION,
            run_id: &self.run_id,
            trace_id: &self.trace_id,
            started_unix_ms: self.started_unix_ms,
            duration_ms: report.duration.as_millis() as u64,
            interrupted: report.interrupted,
            totals: Totals {
                cases: report.cases.len(),
                passed: count(|o| *o == Outcome::Passed),
                failed: count(|o| matches!(o, Outcome::Failed(_))),
                errors: count(|o| matches!(o, Outcome::Error(_))),
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
    }
}

fn pressure_record(host: &str, p: &Pressure) -> PressureRecord {
    PressureRecord {
        host: host.to_owned(),
        at_unix_ms: now_ms(),
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
