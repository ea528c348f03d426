//! The trace reporter: the run as one OpenTelemetry trace, built from the
//! events — run → suite → lease (one per try) → {model.load → stages, cases}.
//! Span ids the runner already sent in `traceparent`s (the trace, each
//! lease, each case) are taken as chosen, so the agent's and the service's
//! spans join this trace.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use opentelemetry::KeyValue;
use opentelemetry::trace::{Link, SpanContext, SpanId};

use crate::client::now_unix_ms;
use crate::otel::{self, OtelConfig, Scope, Telemetry};
use crate::report::{CaseReport, Outcome, TestReport};
use crate::run::events::{RunEvent, StageSpan, SuiteInfo};

type Model = (String, String, String);

pub struct Trace {
    telemetry: Telemetry,
    root: Option<Scope>,
    suites: BTreeMap<usize, (Scope, usize)>,
    leases: HashMap<SpanId, Scope>,
    /// (suite, case) → span id its traceparent carried, for the finished span.
    started: BTreeMap<(usize, usize), SpanId>,
    /// Spans of attempts lost to infrastructure, for re-runs to link to.
    lost: BTreeMap<(usize, usize), Vec<SpanContext>>,
    /// Loads traced in this run, so a reuse links to them.
    loads: BTreeMap<Model, SpanContext>,
    counts: [i64; 3],
    /// Case names by suite, for spans of lost attempts.
    names: Vec<Vec<String>>,
    /// Cases whose final span exists: the first result is the one traced.
    traced: std::collections::HashSet<(usize, usize)>,
}

impl Trace {
    pub fn new(config: &OtelConfig) -> Trace {
        Trace {
            telemetry: Telemetry::init(config),
            root: None,
            suites: BTreeMap::new(),
            leases: HashMap::new(),
            started: BTreeMap::new(),
            lost: BTreeMap::new(),
            loads: BTreeMap::new(),
            counts: [0; 3],
            names: Vec::new(),
            traced: Default::default(),
        }
    }

    fn parent(&self, suite: usize, try_id: Option<SpanId>) -> Option<&Scope> {
        try_id.and_then(|t| self.leases.get(&t)).or(self.suites.get(&suite).map(|(s, _)| s)).or(self.root.as_ref())
    }

    pub fn on(&mut self, event: &RunEvent) {
        let tracer = self.telemetry.tracer().clone();
        match event {
            RunEvent::Started { run_id, trace_id, suites, hosts } => self.started(run_id, *trace_id, suites, hosts),
            RunEvent::Placed { suite, try_id, host, addr, .. } => {
                let attributes =
                    vec![KeyValue::new("proctor.host", host.clone()), KeyValue::new("server.address", addr.clone())];
                let Some(parent) = self.parent(*suite, None) else { return };
                let scope = otel::start_with_id(
                    &tracer,
                    *try_id,
                    "lease",
                    parent,
                    std::time::SystemTime::now(),
                    attributes,
                    vec![],
                );
                self.leases.insert(*try_id, scope);
            }
            RunEvent::LeaseTaken { try_id, service, epoch, .. } => {
                if let Some(lease) = self.leases.get(try_id) {
                    lease.set(vec![
                        KeyValue::new("proctor.service", service.clone()),
                        KeyValue::new("proctor.lease.epoch", *epoch as i64),
                    ]);
                }
            }
            RunEvent::ModelSettled { suite, try_id, load, asked_unix_ms, stages, peak_rss_bytes } => {
                let key = (load.host.clone(), load.service.clone(), load.model.clone());
                let Some(parent) = self.parent(*suite, Some(*try_id)).cloned() else { return };
                let failure = load.failure.as_deref();
                let span = self.load_span(&parent, &key, failure, *asked_unix_ms, stages, *peak_rss_bytes);
                if !stages.is_empty() {
                    self.loads.insert(key, span);
                }
            }
            RunEvent::CaseStarted { suite, case, span, .. } => {
                self.started.insert((*suite, *case), *span);
            }
            RunEvent::CaseLost { suite, case, try_id, attempt, reason, .. } => {
                self.lost_case(*suite, *case, *try_id, *attempt, reason)
            }
            RunEvent::CaseFinished { suite, case, try_id, report } => self.case_span(*suite, *case, *try_id, report),
            RunEvent::TryEnded { try_id, failure } => {
                // Ended, but kept: the try's case results arrive after it
                // (the suite books them) and belong under it.
                if let Some(lease) = self.leases.get(try_id) {
                    if let Some(f) = failure {
                        lease.fail(f);
                    }
                    lease.end();
                }
            }
            RunEvent::SuiteFinished { suite } => {
                if let Some((scope, bad)) = self.suites.remove(suite) {
                    if bad > 0 {
                        scope.fail(&format!("{bad} cases did not pass"));
                    }
                    scope.end();
                }
            }
            RunEvent::Finished { interrupted, .. } => self.end_root(*interrupted),
            _ => {}
        }
    }

    /// The root span (with the trace id the runner chose) and one span per suite.
    fn started(
        &mut self,
        run_id: &str,
        trace_id: opentelemetry::trace::TraceId,
        suites: &[SuiteInfo],
        hosts: &[String],
    ) {
        let tracer = self.telemetry.tracer().clone();
        let names: Vec<&str> = suites.iter().map(|s| s.name.as_str()).collect();
        let root = otel::start_trace(
            &tracer,
            trace_id,
            "run",
            vec![
                KeyValue::new("proctor.run.id", run_id.to_owned()),
                KeyValue::new("proctor.suites", names.join(",")),
                KeyValue::new("proctor.hosts", hosts.join(",")),
            ],
        );
        for (i, s) in suites.iter().enumerate() {
            let attributes = vec![
                KeyValue::new("proctor.suite.name", s.name.clone()),
                KeyValue::new("proctor.suite.file", s.file.display().to_string()),
                KeyValue::new("proctor.service", s.service.clone()),
                KeyValue::new("proctor.models", s.models.join(",")),
            ];
            let scope = otel::start(&tracer, "suite", Some(&root), None, attributes, vec![]);
            self.suites.insert(i, (scope, 0));
        }
        self.root = Some(root);
        self.names = suites.iter().map(|s| s.cases.clone()).collect();
    }

    /// A span for an attempt lost with its host, for the re-run to link to.
    fn lost_case(&mut self, suite: usize, case: usize, try_id: SpanId, attempt: u32, reason: &str) {
        let tracer = self.telemetry.tracer().clone();

        let Some(parent) = self.parent(suite, Some(try_id)).cloned() else { return };
        let name = self.names.get(suite).and_then(|n| n.get(case)).cloned().unwrap_or_default();
        let attributes = vec![
            KeyValue::new("proctor.case.name", name.clone()),
            KeyValue::new("proctor.case.attempt", i64::from(attempt)),
            KeyValue::new("proctor.case.outcome", "lost"),
        ];
        let name = format!("case {name}");
        let now = std::time::SystemTime::now();
        // A sent case keeps the id its traceparent carried.
        let span = match self.started.remove(&(suite, case)) {
            Some(id) => otel::start_with_id(&tracer, id, name, &parent, now, attributes, vec![]),
            None => otel::start(&tracer, name, Some(&parent), Some(now), attributes, vec![]),
        };
        span.fail(&format!("host lost: {reason}"));
        span.end();
        self.lost.entry((suite, case)).or_default().push(span.span_context());
    }

    /// The `model.load` span with a child per stage at the agent's times (in
    /// our clock), or a zero-length span linked to the earlier load.
    fn load_span(
        &self,
        parent: &Scope,
        key: &Model,
        failure: Option<&str>,
        asked_ms: i64,
        stages: &[StageSpan],
        peak: u64,
    ) -> SpanContext {
        let tracer = self.telemetry.tracer();
        let mut attributes = vec![
            KeyValue::new("proctor.model", key.2.clone()),
            KeyValue::new("proctor.host", key.0.clone()),
            KeyValue::new("proctor.service", key.1.clone()),
            KeyValue::new("proctor.load.outcome", if failure.is_none() { "ready" } else { "failed" }),
        ];
        let at = otel::unix_ms_to_time;
        if stages.is_empty() {
            attributes.push(KeyValue::new("proctor.load.reused", true));
            let links = self.loads.get(key).cloned().into_iter().map(Link::with_context).collect();
            let span = otel::start(tracer, "model.load", Some(parent), Some(at(asked_ms)), attributes, links);
            span.end_at(at(asked_ms));
            return span.span_context();
        }
        attributes.push(KeyValue::new("proctor.load.peak_rss_bytes", peak as i64));
        // A load already under way when the run asked began before the ask.
        let began = stages.first().map_or(asked_ms, |s| s.start_unix_ms.min(asked_ms));
        let load = otel::start(tracer, "model.load", Some(parent), Some(at(began)), attributes, vec![]);
        for s in stages {
            let attributes = vec![
                KeyValue::new("proctor.stage", s.stage.label()),
                KeyValue::new("proctor.stage.cause", s.cause.clone()),
                KeyValue::new("proctor.stage.peak_rss_bytes", s.peak_rss_bytes as i64),
                KeyValue::new("proctor.stage.peak_gpu_bytes", s.peak_gpu_bytes as i64),
            ];
            let stage =
                otel::start(tracer, s.stage.label(), Some(&load), Some(at(s.start_unix_ms)), attributes, vec![]);
            stage.end_at(at(s.end_unix_ms));
        }
        if let Some(f) = failure {
            load.fail(f.lines().next().unwrap_or(f));
        }
        let end = stages.last().map_or(asked_ms, |s| s.end_unix_ms).max(asked_ms);
        load.end_at(at(end));
        load.span_context()
    }

    /// A case's span, with the id its traceparent announced, at the times
    /// the agent ran it.
    fn case_span(&mut self, suite: usize, case: usize, try_id: Option<SpanId>, report: &CaseReport) {
        if !self.traced.insert((suite, case)) {
            return;
        }
        let tracer = self.telemetry.tracer().clone();
        let bad = report.outcome != Outcome::Passed;
        self.counts[match report.outcome {
            Outcome::Passed => 0,
            Outcome::Failed(_) => 1,
            Outcome::Error(_) => 2,
        }] += 1;
        if let Some((_, n)) = self.suites.get_mut(&suite) {
            *n += usize::from(bad);
        }
        let Some(parent) = self.parent(suite, try_id).cloned() else { return };
        let ran = report.started_unix_ms > 0;
        let start = if ran { report.started_unix_ms } else { now_unix_ms() };
        let attributes = case_attributes(report);
        let links = self.lost.remove(&(suite, case)).unwrap_or_default().into_iter().map(Link::with_context).collect();
        let name = format!("case {}", report.name);
        let at = otel::unix_ms_to_time;
        // The id its traceparent carried, whether or not it ran: the agent's
        // and the service's spans point at it.
        let span = match self.started.remove(&(suite, case)) {
            Some(id) => otel::start_with_id(&tracer, id, name, &parent, at(start), attributes, links),
            None => otel::start(&tracer, name, Some(&parent), Some(at(start)), attributes, links),
        };
        if bad {
            span.fail(&report.headline());
        }
        test_spans(&tracer, &span, start, &report.tests);
        span.end_at(at(start + report.duration.as_millis() as i64));
    }

    fn end_root(&mut self, interrupted: bool) {
        for (_, (scope, _)) in std::mem::take(&mut self.suites) {
            scope.end();
        }
        // A try that never reported its end (ending twice is harmless).
        for lease in self.leases.values() {
            lease.end();
        }
        let Some(root) = self.root.take() else { return };
        let [passed, failed, errors] = self.counts;
        root.set(vec![
            KeyValue::new("proctor.cases.passed", passed),
            KeyValue::new("proctor.cases.failed", failed),
            KeyValue::new("proctor.cases.errors", errors),
        ]);
        if failed + errors > 0 || interrupted {
            let tail = if interrupted { ", interrupted" } else { "" };
            root.fail(&format!("{failed} failed, {errors} errors{tail}"));
        }
        root.end();
    }

    /// Flushes the export and writes `trace.json`; returns its path and any
    /// warnings for the terminal.
    pub async fn finish(self, out_dir: &Path) -> (Option<PathBuf>, Vec<String>) {
        let path = otel::trace_file(out_dir);
        let (written, mut warnings) = self.telemetry.finish(&path).await;
        match written {
            Ok(()) => (Some(path), warnings),
            Err(e) => {
                warnings.push(format!("cannot write {}: {e}", path.display()));
                (None, warnings)
            }
        }
    }
}

/// A command case's tests as its child spans, laid end to end from its
/// start (the JUnit file gives each test's length, not its start).
fn test_spans(tracer: &opentelemetry_sdk::trace::SdkTracer, case: &otel::Scope, start: i64, tests: &[TestReport]) {
    let mut at = start;
    for t in tests {
        let attributes =
            vec![KeyValue::new("proctor.test.id", t.id()), KeyValue::new("proctor.test.outcome", t.outcome.clone())];
        let span = otel::start(
            tracer,
            format!("test {}", t.id()),
            Some(case),
            Some(otel::unix_ms_to_time(at)),
            attributes,
            vec![],
        );
        if matches!(t.outcome.as_str(), "failed" | "error") {
            span.fail(&t.message);
        }
        at += t.duration_ms as i64;
        span.end_at(otel::unix_ms_to_time(at));
    }
}

fn case_attributes(report: &CaseReport) -> Vec<KeyValue> {
    let outcome = match report.outcome {
        Outcome::Passed => "passed",
        Outcome::Failed(_) => "failed",
        Outcome::Error(_) => "error",
    };
    let mut attributes = vec![
        KeyValue::new("proctor.case.name", report.name.clone()),
        KeyValue::new("proctor.case.attempt", i64::from(report.attempt)),
        KeyValue::new("proctor.case.outcome", outcome),
    ];
    if !report.method.is_empty() {
        attributes.push(KeyValue::new("http.request.method", report.method.clone()));
    }
    if !report.url.is_empty() {
        let url = otel::redact_url(&report.url);
        let server = url.split("://").nth(1).and_then(|r| r.split(['/', ':']).next()).unwrap_or("").to_owned();
        attributes.push(KeyValue::new("url.full", url));
        attributes.push(KeyValue::new("server.address", server));
    }
    if let Some(status) = report.http_status {
        attributes.push(KeyValue::new("http.response.status_code", i64::from(status)));
    }
    if let Some(l) = &report.load {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        attributes.extend([
            KeyValue::new("proctor.load.mode", l.mode.clone()),
            KeyValue::new("proctor.load.requests", n(l.requests)),
            KeyValue::new("proctor.load.errors", n(l.errors)),
            KeyValue::new("proctor.load.rps", l.rps),
            KeyValue::new("proctor.load.p50_us", n(l.p50_us)),
            KeyValue::new("proctor.load.p99_us", n(l.p99_us)),
            KeyValue::new("proctor.load.max_us", n(l.max_us)),
        ]);
    }
    attributes
}
