//! `proctor run`: parse every suite, connect to the inventory's agents, then
//! run the suites in parallel — each placed by the planner where its models
//! fit, waiting (with reasons) when no host is free, failing as
//! unsatisfiable only when no host could ever hold it. Runner and reporters
//! meet only in the `RunEvent` stream (`events`); per-case state lives in
//! each suite's `CaseBook`, leases in the run's `LeaseBook`, and one try on
//! one host in `host`.

pub mod casebook;
pub mod events;
mod host;
pub mod leases;
mod options;
mod suite;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId};
use tokio::sync::watch;
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Agent, AgentView};
use crate::inventory::{self, Entry};
use crate::report::{CaseReport, RunReport};
use crate::reporter::{self, Outputs};
use crate::scheduler;
use crate::suite::Suite;
use events::{Events, RunEvent, SuiteInfo};
use leases::LeaseBook;
pub use options::{Exit, RunOptions, TimeoutSource, requested_timeout};

#[derive(Debug)]
pub struct RunResult {
    pub exit: Exit,
    pub report: Option<RunReport>,
    pub junit: Option<PathBuf>,
    /// Every file the run wrote (JUnit, JSON, Markdown, trace).
    pub files: crate::reporter::Files,
}

/// How long a planning round waits for a host's handshake.
const INFO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a freshly connected agent may take to send its first snapshot.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(5);
/// How long shutdown may spend acknowledging and releasing, all agents at once.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(3);

/// The run's interrupts: the first cancels (no new calls, leases released,
/// reports written); a second asks the reporters for the partial JUnit file.
#[derive(Clone, Debug)]
pub struct Interrupt {
    pub token: CancellationToken,
    again: CancellationToken,
    partial: watch::Receiver<Option<PathBuf>>,
    partial_tx: Arc<watch::Sender<Option<PathBuf>>>,
}

impl Default for Interrupt {
    fn default() -> Interrupt {
        Interrupt::from(CancellationToken::new())
    }
}

impl From<CancellationToken> for Interrupt {
    fn from(token: CancellationToken) -> Interrupt {
        let (tx, rx) = watch::channel(None);
        Interrupt { token, again: CancellationToken::new(), partial: rx, partial_tx: Arc::new(tx) }
    }
}

impl Interrupt {
    /// The second interrupt: the JUnit reporter writes what it has, every
    /// case present, and this returns the file (or `None` after `wait`).
    pub async fn write_partial(&self, wait: Duration) -> Option<PathBuf> {
        self.again.cancel();
        let mut rx = self.partial.clone();
        tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await.ok()?.ok()?.clone()
    }
}

/// One inventory entry and, if reachable, its connection and live view.
struct Slot {
    entry: Entry,
    agent: Option<Agent>,
    view: Option<watch::Receiver<AgentView>>,
    unreachable: Option<String>,
}

/// What the suite tasks share; each piece of mutable state has one owner
/// (`LeaseBook`; the agents' views are owned by their `follow` tasks).
struct Ctx {
    run_id: String,
    opts: RunOptions,
    cancel: CancellationToken,
    hosts: Vec<Slot>,
    leases: LeaseBook,
    events: Events,
    trace_id: TraceId,
    /// (host, service, model) → why its load failed in this run. Written by
    /// the try that saw it fail; a failed load is final for the run.
    failed_loads: std::sync::Mutex<BTreeMap<(usize, String, String), String>>,
}

impl Ctx {
    fn load_failed(&self, host: usize, service: &str, model: &str, message: &str) {
        let key = (host, service.to_owned(), model.to_owned());
        self.failed_loads.lock().expect("failed loads").entry(key).or_insert_with(|| message.to_owned());
    }

    /// Which of `models` already failed to load on this host in this run.
    fn failed_loads(&self, host: usize, service: &str, models: &[String]) -> BTreeMap<String, String> {
        let failed = self.failed_loads.lock().expect("failed loads");
        models
            .iter()
            .filter_map(|m| failed.get(&(host, service.to_owned(), m.clone())).map(|f| (m.clone(), f.clone())))
            .collect()
    }

    fn new_span_id(&self) -> SpanId {
        crate::otel::new_span_id()
    }

    /// W3C traceparent for a span of this run's trace.
    fn traceparent(&self, span: SpanId) -> String {
        format!("00-{}-{span}-01", self.trace_id)
    }

    /// Every host as the planner should see it now (its `own_queue` is the
    /// caller's to fill, right before planning).
    async fn host_views(&self) -> Vec<scheduler::Host> {
        let mut hosts = Vec::new();
        for slot in &self.hosts {
            let (name, labels) = (&slot.entry.name, &slot.entry.labels);
            let (Some(agent), Some(view)) = (&slot.agent, &slot.view) else {
                let reason = slot.unreachable.clone().unwrap_or_else(|| "not connected".into());
                hosts.push(scheduler::unreachable(name, labels, &reason));
                continue;
            };
            let (lost, unseen, streamed) = {
                let v = view.borrow();
                (v.lost.clone(), v.incarnation.is_empty(), v.standing.is_some())
            };
            if let Some(lost) = &lost {
                hosts.push(scheduler::lost(name, labels, lost));
                continue;
            }
            if unseen || self.cancel.is_cancelled() {
                hosts.push(scheduler::slow(name, labels, "no snapshot from its agent yet"));
                continue;
            }
            // The stream carries admission's figures each second: GetInfo
            // only for an agent whose stream does not (yet).
            if streamed {
                hosts.push(scheduler::host_view(name, labels, &agent.info, &view.borrow()));
                continue;
            }
            let mut agent = agent.clone();
            hosts.push(match tokio::time::timeout(INFO_TIMEOUT, agent.refresh_info()).await {
                Ok(Ok(())) => scheduler::host_view(name, labels, &agent.info, &view.borrow()),
                Ok(Err(e)) => scheduler::slow(name, labels, &e.to_string()),
                Err(_) => scheduler::slow(name, labels, "no answer within 2s"),
            });
        }
        hosts
    }
}

/// Suites, inventory and flags, or every reason they are unusable.
fn prepare(opts: &RunOptions) -> Result<(Vec<Suite>, Vec<Entry>), Vec<String>> {
    let mut errors = Vec::new();
    let mut suites = Vec::new();
    for path in &opts.suites {
        match crate::suite::load(path) {
            Ok(s) => suites.push(s),
            Err(e) => errors.push(e.to_string()),
        }
    }
    errors.extend(crate::suite::duplicate_names(&suites));
    if opts.suites.is_empty() {
        errors.push(
            "no suites given: pass one or more suite files, e.g. `proctor run --agent 127.0.0.1:7700 suites/*.yaml`"
                .into(),
        );
    }
    let entries = inventory::load(opts.inventory.as_deref(), &opts.agents, &opts.access).unwrap_or_else(|e| {
        errors.push(e.to_string());
        Vec::new()
    });
    if let Err(e) = opts.check_timing() {
        errors.push(e);
    }
    if entries.is_empty() && errors.is_empty() {
        errors.push("no agents given: pass --agent HOST:PORT (repeatable) or --inventory FILE".into());
    }
    if errors.is_empty() { Ok((suites, entries)) } else { Err(errors) }
}

fn holder() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    format!("{user}@{host}")
}

fn suite_info(s: &Suite) -> SuiteInfo {
    SuiteInfo {
        name: s.name.clone(),
        file: s.file.clone(),
        service: s.service.clone(),
        models: s.models.clone(),
        cases: s.cases.iter().map(|c| c.name.clone()).collect(),
        baseline_tolerance: s.baseline_tolerance,
    }
}

/// Runs suites; the reporters print progress and the summary and write
/// `junit.xml` and `trace.json`.
pub async fn run(opts: RunOptions, interrupt: impl Into<Interrupt>) -> RunResult {
    let interrupt: Interrupt = interrupt.into();
    let started = Instant::now();
    let (events, rx) = Events::channel();
    let (store, warnings) = open_store(&opts).await;
    let config = reporter::Config {
        progress: opts.progress,
        out_dir: opts.out_dir.clone(),
        otel: opts.otel.clone(),
        again: interrupt.again.clone(),
        partial: interrupt.partial_tx.clone(),
        store,
        warnings,
    };
    let reporters = tokio::spawn(reporter::run(rx, config));
    let (suites, entries) = match prepare(&opts) {
        Ok(p) => p,
        Err(errors) => {
            events.send(RunEvent::Refused { errors });
            events.send(RunEvent::Finished { duration: started.elapsed(), interrupted: false });
            let _ = reporters.await;
            return RunResult { exit: Exit::BadInput, report: None, junit: None, files: Default::default() };
        }
    };
    let run_id = uuid::Uuid::new_v4().to_string();
    let trace_id = crate::otel::new_trace_id();
    events.send(RunEvent::Started {
        run_id: run_id.clone(),
        trace_id,
        suites: suites.iter().map(suite_info).collect(),
        hosts: entries.iter().map(|e| e.name.clone()).collect(),
    });
    let stop = CancellationToken::new();
    let services: Vec<String> = suites.iter().map(|s| s.service.clone()).collect();
    let hosts = connect_all((&run_id, &services), entries, &opts, &events, &stop).await;
    let ctx = Arc::new(Ctx {
        leases: LeaseBook::new(&run_id, &holder(), opts.lease_ttl, events.clone(), stop.clone()),
        run_id,
        cancel: interrupt.token.clone(),
        opts,
        hosts,
        events: events.clone(),
        trace_id,
        failed_loads: Default::default(),
    });
    tokio::spawn(announce_interrupt(ctx.cancel.clone(), stop.clone(), events.clone()));
    run_suites(&ctx, suites).await;
    finish(&ctx).await;
    stop.cancel();
    events.send(RunEvent::Finished { duration: started.elapsed(), interrupted: ctx.cancel.is_cancelled() });
    let outputs = reporters.await.unwrap_or_default();
    result(outputs)
}

/// Opens the run store; one that cannot be opened is said and the run goes
/// on without it (its reports are written as ever).
async fn open_store(opts: &RunOptions) -> (Option<reporter::StoreSetup>, Vec<String>) {
    let Some(location) = &opts.store else { return (None, Vec::new()) };
    match crate::store::Store::open(location).await {
        Ok(store) => {
            let setup = reporter::StoreSetup {
                store: Arc::new(store),
                controller: holder(),
                tolerance: opts.baseline_tolerance,
            };
            (Some(setup), Vec::new())
        }
        Err(e) => (None, vec![format!("{e}; this run is not kept (--no-store to not ask)")]),
    }
}

fn result(outputs: Outputs) -> RunResult {
    let Outputs { report, files } = outputs;
    let junit = files.junit.clone();
    let counts = report.counts();
    let exit = if report.interrupted {
        Exit::Interrupted
    } else if counts.errors > 0 || junit.is_none() {
        Exit::Infrastructure
    } else if counts.failed > 0 {
        Exit::TestFailures
    } else if report.regressions() > 0 {
        Exit::Regression
    } else {
        Exit::Passed
    };
    RunResult { exit, report: Some(report), junit, files }
}

async fn announce_interrupt(cancel: CancellationToken, stop: CancellationToken, events: Events) {
    tokio::select! {
        _ = cancel.cancelled() => events.send(RunEvent::Interrupted),
        _ = stop.cancelled() => {}
    }
}

/// Every suite at once; the planner and the lease turns keep them apart.
async fn run_suites(ctx: &Arc<Ctx>, suites: Vec<Suite>) {
    let mut tasks = JoinSet::new();
    let mut cases_of = BTreeMap::new();
    for (index, suite) in suites.into_iter().enumerate() {
        let cases: Vec<String> = suite.cases.iter().map(|c| c.name.clone()).collect();
        let handle = tasks.spawn(suite::run_suite(ctx.clone(), index, suite));
        cases_of.insert(handle.id(), (index, cases));
    }
    join_suites(tasks, cases_of, &ctx.events).await;
}

/// Waits for every suite task. One that dies never takes its cases with it:
/// they become errors (reporters keep the first result of each case, so
/// cases it had finished stay as they were).
async fn join_suites(mut tasks: JoinSet<()>, mut cases_of: BTreeMap<Id, (usize, Vec<String>)>, events: &Events) {
    while let Some(joined) = tasks.join_next().await {
        let Err(e) = joined else { continue };
        let Some((index, cases)) = cases_of.remove(&e.id()) else { continue };
        for (case, name) in cases.iter().enumerate() {
            let report = CaseReport::error("", name, format!("internal error: the suite's task failed ({e})"));
            events.send(RunEvent::CaseFinished { suite: index, case, try_id: None, report });
        }
    }
}

async fn connect_all(
    (run_id, services): (&str, &[String]),
    entries: Vec<Entry>,
    opts: &RunOptions,
    events: &Events,
    stop: &CancellationToken,
) -> Vec<Slot> {
    let mut connecting = JoinSet::new();
    for (i, entry) in entries.iter().enumerate() {
        let (entry, keepalive) = (entry.clone(), opts.keepalive);
        connecting.spawn(async move { (i, Agent::connect_with(&entry, keepalive).await) });
    }
    let mut slots: Vec<Slot> =
        entries.into_iter().map(|entry| Slot { entry, agent: None, view: None, unreachable: None }).collect();
    while let Some(Ok((i, result))) = connecting.join_next().await {
        match result {
            Ok(agent) => {
                let (tx, mut rx) = watch::channel(AgentView::default());
                let grace = opts.reconnect_grace;
                let interest = client::Interest { run_id: run_id.to_owned(), services: services.to_vec() };
                tokio::spawn(client::follow(interest, agent.clone(), tx, events.clone(), stop.clone(), grace));
                // Plan on what the agent says, not on an empty view: wait for its snapshot.
                let _ = tokio::time::timeout(SNAPSHOT_WAIT, rx.wait_for(|v| !v.incarnation.is_empty())).await;
                slots[i].agent = Some(agent);
                slots[i].view = Some(rx);
            }
            Err(e) => {
                events.send(RunEvent::Unreachable { host: slots[i].entry.name.clone(), reason: e.to_string() });
                slots[i].unreachable = Some(e.to_string());
            }
        }
    }
    slots
}

/// Acknowledges what was received and frees the services — every agent at
/// once, each call bounded, the whole within `SHUTDOWN_DEADLINE`, so a
/// frozen agent cannot hold the run's end.
async fn finish(ctx: &Ctx) {
    let mut calls = JoinSet::new();
    for slot in &ctx.hosts {
        if let (Some(agent), Some(view)) = (slot.agent.clone(), &slot.view) {
            let view = view.borrow().clone();
            let run_id = ctx.run_id.clone();
            if view.last_seq > 0 && view.lost.is_none() {
                calls.spawn(async move { agent.ack(&view.incarnation, &run_id, view.last_seq).await.err() });
            }
        }
    }
    for (host, held) in ctx.leases.held() {
        held.ended.cancel();
        if let Some(agent) = ctx.hosts[host].agent.clone() {
            calls.spawn(async move { agent.release(&held.lease).await.err() });
        }
    }
    let _ = tokio::time::timeout(SHUTDOWN_DEADLINE, async {
        while let Some(joined) = calls.join_next().await {
            if let Ok(Some(e)) = joined {
                tracing::debug!(error = %e, "shutdown call failed");
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_suite_task_that_panics_still_reports_every_case_as_an_error() {
        let (events, mut rx) = Events::channel();
        let mut tasks: JoinSet<()> = JoinSet::new();
        let fine = tasks.spawn(async {});
        let dies = tasks.spawn(async { panic!("boom") });
        let cases_of = BTreeMap::from([
            (fine.id(), (0, vec!["ok".to_owned()])),
            (dies.id(), (1, vec!["a".to_owned(), "b".to_owned()])),
        ]);
        join_suites(tasks, cases_of, &events).await;
        drop(events);
        let mut seen = Vec::new();
        while let Some(event) = rx.recv().await {
            let RunEvent::CaseFinished { suite, case, report, .. } = event else { panic!("{event:?}") };
            assert!(report.headline().contains("internal error: the suite's task failed"), "{}", report.headline());
            seen.push((suite, case));
        }
        assert_eq!(seen, [(1, 0), (1, 1)]);
    }
}
