//! `proctor run`: parse every suite, connect to the inventory's agents, then
//! run the suites in parallel — each placed by the planner where its models
//! fit (preferring hosts where they are loaded), waiting with its reasons
//! printed when no host is free, failing as unsatisfiable only when no host
//! could ever hold it. On a host a suite takes a lease on its service, ensures
//! its models and waits for them (never skips), runs its cases on the agent,
//! and collects the results. Reports are written on every outcome, Ctrl-C too.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use opentelemetry::KeyValue;
use opentelemetry::trace::{Link, SpanContext};

use crate::client::{self, Agent, AgentView, ClientError, Lease, Stage};
use crate::inventory::{self, Entry};
use crate::otel::{self, Scope};
use crate::progress::{self, Mode};
use crate::report::{CaseReport, ModelLoad, RunReport};
use crate::scheduler::{self, Need, Plan};
use crate::suite::{self, Suite};

/// Exit codes (DESIGN §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Passed = 0,
    TestFailures = 1,
    Infrastructure = 2,
    BadInput = 64,
    Interrupted = 130,
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Inventory file (`--inventory`).
    pub inventory: Option<PathBuf>,
    /// `--agent HOST:PORT` addresses, added to the inventory.
    pub agents: Vec<String>,
    pub suites: Vec<PathBuf>,
    pub out_dir: PathBuf,
    pub progress: Mode,
    /// `--model-timeout`: beats the suite's timeout.
    pub model_timeout: Option<Duration>,
    /// `--fresh`: cold loads for every suite.
    pub fresh: bool,
    /// Lease TTL asked of agents; renewed every third of it.
    pub lease_ttl: Duration,
    /// OTLP export (the trace file is always written).
    pub otel: otel::OtelConfig,
    /// HTTP/2 keepalive towards agents.
    pub keepalive: client::Keepalive,
    /// How long an agent may be unreachable before its unfinished cases are
    /// placed elsewhere.
    pub reconnect_grace: Duration,
}

impl RunOptions {
    pub fn new(agents: Vec<String>, suites: Vec<PathBuf>, out_dir: PathBuf) -> RunOptions {
        RunOptions {
            inventory: None,
            agents,
            suites,
            out_dir,
            progress: Mode::Quiet,
            model_timeout: None,
            fresh: false,
            lease_ttl: client::LEASE_TTL,
            otel: otel::OtelConfig::default(),
            keepalive: client::Keepalive::default(),
            reconnect_grace: client::RECONNECT_GRACE,
        }
    }

    /// Keepalive detection < reconnect grace < lease TTL, or a silent
    /// partition would outlive the lease before anyone noticed.
    pub fn check_timing(&self) -> Result<(), String> {
        let detect = self.keepalive.interval + self.keepalive.timeout;
        if detect >= self.reconnect_grace {
            return Err(format!(
                "keepalive interval + timeout ({}s) must be shorter than the reconnect grace ({}s)",
                detect.as_secs_f64(),
                self.reconnect_grace.as_secs_f64()
            ));
        }
        if self.reconnect_grace >= self.lease_ttl {
            return Err(format!(
                "the reconnect grace ({}s) must be shorter than the lease TTL ({}s)",
                self.reconnect_grace.as_secs_f64(),
                self.lease_ttl.as_secs_f64()
            ));
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct RunResult {
    pub exit: Exit,
    pub report: Option<RunReport>,
    pub junit: Option<PathBuf>,
    pub trace: Option<PathBuf>,
}

/// Time allowed for a case's result beyond its own timeout.
const RESULT_SLACK: Duration = Duration::from_secs(10);
const DEFAULT_CASE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a waiting suite looks again, and says why it waits.
const REPLAN_EVERY: Duration = Duration::from_secs(1);
const SAY_WAITING_EVERY: Duration = Duration::from_secs(10);
/// How long a planning round waits for a host's handshake.
const INFO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a freshly connected agent may take to send its first snapshot.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(5);
/// An agent refusing a load the planner thought would fit, this many times
/// in a row, ends the suite with the agent's message.
const MAX_REFUSALS: u32 = 3;

/// The controller's part of the load-timeout precedence (DESIGN §4): the CLI
/// flag beats the suite. The agent then applies MODEL_LOADING_TIMEOUT, its
/// config and its default below whatever is sent.
pub fn requested_timeout(cli: Option<Duration>, suite: Option<Duration>) -> Option<Duration> {
    cli.or(suite)
}

/// One inventory entry and, if reachable, its connection and live view.
struct Slot {
    entry: Entry,
    agent: Option<Agent>,
    view: Option<watch::Receiver<AgentView>>,
    unreachable: Option<String>,
}

/// Everything the suite tasks share.
struct Ctx {
    run_id: String,
    holder: String,
    opts: RunOptions,
    cancel: CancellationToken,
    stop: CancellationToken,
    slots: Vec<Slot>,
    /// (slot, service) → this run's lease there, once taken. The mutex also
    /// makes suites of this run take turns on one service of one host.
    leases: Mutex<BTreeMap<(usize, String), LeaseCell>>,
    tracer: opentelemetry_sdk::trace::SdkTracer,
    /// Partial results for a second interrupt.
    interrupt: Interrupt,
    /// The root span: one trace per run.
    trace: Scope,
    /// Model loads traced in this run, so a later reuse links to them.
    loads: std::sync::Mutex<BTreeMap<(String, String, String), SpanContext>>,
}

/// This run's lease on one service of one host; locked while a suite uses it.
type LeaseCell = Arc<Mutex<Option<Held>>>;

/// A lease this run holds, and the token that stops its renewals.
struct Held {
    lease: Lease,
    renew: CancellationToken,
}

/// What one placement attempt on one host came to.
enum Attempt {
    Done {
        reports: Vec<(usize, CaseReport)>,
        loads: Vec<ModelLoad>,
        interrupted: bool,
        /// Cases left without a result because the host was lost: run them
        /// elsewhere (infrastructure loss is retried, test failures never).
        lost: Option<Lost>,
    },
    /// Not this time (lease busy, memory refused): plan these cases again.
    Retry { reason: String, refused: bool },
}

/// Cases a lost host left unfinished, why, and the spans of their attempts.
struct Lost {
    reason: String,
    cases: Vec<usize>,
    spans: Vec<(usize, SpanContext)>,
}

/// Per-case state of a batch sent to one host.
#[derive(Clone, Default)]
struct Batch {
    cases: Vec<usize>,
    /// Attempt number of each case (1 = first).
    attempts: BTreeMap<usize, u32>,
    /// Spans of earlier attempts lost to infrastructure, to link re-runs to.
    earlier: BTreeMap<usize, Vec<SpanContext>>,
}

/// How many times a case is re-run after losing its host.
const MAX_INFRA_RETRIES: u32 = 2;

/// Cancels a run, and — on a second interrupt — writes what it has so far.
#[derive(Clone, Debug, Default)]
pub struct Interrupt {
    pub token: CancellationToken,
    partial: Arc<std::sync::Mutex<Option<Partial>>>,
}

/// A run's cases as they stand: results, or errors for cases not yet done.
#[derive(Debug)]
struct Partial {
    junit: PathBuf,
    run_id: String,
    started: Instant,
    suites: Vec<Vec<CaseReport>>,
}

impl From<CancellationToken> for Interrupt {
    fn from(token: CancellationToken) -> Interrupt {
        Interrupt { token, partial: Default::default() }
    }
}

impl Interrupt {
    /// Writes the JUnit file from what the run has now: every case present,
    /// those without a result as errors. For a second interrupt: quick, no I/O
    /// but the one file.
    pub fn write_partial(&self) -> Option<PathBuf> {
        let guard = self.partial.lock().ok()?;
        let p = guard.as_ref()?;
        let report = RunReport {
            run_id: p.run_id.clone(),
            cases: p.suites.iter().flatten().cloned().collect(),
            loads: Vec::new(),
            interrupted: true,
            duration: p.started.elapsed(),
        };
        report.write_junit(&p.junit).ok().map(|()| p.junit.clone())
    }

    fn record(&self, suite: usize, case: usize, report: &CaseReport) {
        if let Ok(mut guard) = self.partial.lock()
            && let Some(slot) = guard.as_mut().and_then(|p| p.suites.get_mut(suite)).and_then(|s| s.get_mut(case))
        {
            *slot = report.clone();
        }
    }
}

/// Runs suites; prints progress and the summary; writes `junit.xml`.
pub async fn run(opts: RunOptions, interrupt: impl Into<Interrupt>) -> RunResult {
    let interrupt: Interrupt = interrupt.into();
    let cancel = interrupt.token.clone();
    let started = Instant::now();
    let mut suites = Vec::new();
    let mut bad = false;
    for path in &opts.suites {
        match suite::load(path) {
            Ok(s) => suites.push(s),
            Err(e) => {
                eprintln!("error: {e}");
                bad = true;
            }
        }
    }
    if suites.is_empty() && !bad {
        eprintln!(
            "error: no suites given: pass one or more suite files, e.g. `proctor run --agent 127.0.0.1:7700 suites/*.yaml`"
        );
        bad = true;
    }
    let entries = match inventory::load(opts.inventory.as_deref(), &opts.agents) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            bad = true;
            Vec::new()
        }
    };
    if let Err(e) = opts.check_timing() {
        eprintln!("error: {e}");
        bad = true;
    }
    if entries.is_empty() && !bad {
        eprintln!("error: no agents given: pass --agent HOST:PORT (repeatable) or --inventory FILE");
        bad = true;
    }
    if bad {
        return RunResult { exit: Exit::BadInput, report: None, junit: None, trace: None };
    }

    let telemetry = otel::Telemetry::init(&opts.otel);
    let run_id = uuid::Uuid::new_v4().to_string();
    let trace = otel::start(
        telemetry.tracer(),
        "run",
        None,
        None,
        vec![
            KeyValue::new("proctor.run.id", run_id.clone()),
            KeyValue::new("proctor.suites", suites.iter().map(|s| s.name.clone()).collect::<Vec<_>>().join(",")),
            KeyValue::new("proctor.hosts", entries.iter().map(|e| e.name.clone()).collect::<Vec<_>>().join(",")),
        ],
        vec![],
    );
    let stop = CancellationToken::new();
    let (updates_tx, updates_rx) = mpsc::unbounded_channel();
    let display = tokio::spawn(progress::run(opts.progress, std::io::stdout(), updates_rx, stop.clone()));
    let slots = connect_all(entries, &opts, &updates_tx, &stop).await;
    drop(updates_tx);

    if let Ok(mut partial) = interrupt.partial.lock() {
        *partial = Some(Partial {
            junit: opts.out_dir.join("junit.xml"),
            run_id: run_id.clone(),
            started,
            suites: suites
                .iter()
                .map(|s| {
                    s.cases
                        .iter()
                        .map(|c| CaseReport::error(&s.name, &c.name, "interrupted before the case finished".into()))
                        .collect()
                })
                .collect(),
        });
    }
    let ctx = Arc::new(Ctx {
        interrupt: interrupt.clone(),
        run_id,
        holder: format!(
            "{}@{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
        ),
        opts,
        cancel,
        stop,
        slots,
        leases: Mutex::new(BTreeMap::new()),
        tracer: telemetry.tracer().clone(),
        trace,
        loads: std::sync::Mutex::new(BTreeMap::new()),
    });

    // Every suite at once; the planner and the leases keep them apart.
    let mut tasks = tokio::task::JoinSet::new();
    for (index, suite) in suites.into_iter().enumerate() {
        let ctx = ctx.clone();
        tasks.spawn(async move { (index, run_suite(&ctx, index, &suite).await) });
    }
    let mut done: Vec<(usize, SuiteOutcome)> = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        if let Ok(outcome) = joined {
            done.push(outcome);
        }
    }
    done.sort_by_key(|(i, _)| *i);
    let mut report = RunReport { run_id: ctx.run_id.clone(), ..Default::default() };
    for (_, outcome) in done {
        report.cases.extend(outcome.cases);
        // A model appears once: where it was first waited for.
        for load in outcome.loads {
            let seen = report
                .loads
                .iter()
                .any(|l| (&l.host, &l.service, &l.model) == (&load.host, &load.service, &load.model));
            if !seen {
                report.loads.push(load);
            }
        }
        report.interrupted |= outcome.interrupted;
    }
    report.interrupted |= ctx.cancel.is_cancelled();

    finish(&ctx).await;
    let _ = display.await;
    report.duration = started.elapsed();
    let counts = report.counts();
    ctx.trace.set(vec![
        KeyValue::new("proctor.cases.passed", counts.passed as i64),
        KeyValue::new("proctor.cases.failed", counts.failed as i64),
        KeyValue::new("proctor.cases.errors", counts.errors as i64),
    ]);
    if counts.failed + counts.errors > 0 || report.interrupted {
        ctx.trace.fail(&format!(
            "{} failed, {} errors{}",
            counts.failed,
            counts.errors,
            if report.interrupted { ", interrupted" } else { "" }
        ));
    }
    ctx.trace.end();
    let trace_path = otel::trace_file(&ctx.opts.out_dir);
    let trace_path = match telemetry.finish(&trace_path).await {
        Ok(()) => Some(trace_path),
        Err(e) => {
            eprintln!("error: cannot write {}: {e}", trace_path.display());
            None
        }
    };
    let junit = ctx.opts.out_dir.join("junit.xml");
    let junit = match report.write_junit(&junit) {
        Ok(()) => Some(junit),
        Err(e) => {
            eprintln!("error: cannot write {}: {e}", junit.display());
            None
        }
    };
    print!("\n{}", report.summary());
    if let Some(j) = &junit {
        println!("JUnit report: {}", j.display());
    }
    if let Some(t) = &trace_path {
        println!("Trace (OTLP JSON): {}", t.display());
    }
    let exit = if report.interrupted {
        Exit::Interrupted
    } else if counts.errors > 0 || junit.is_none() {
        Exit::Infrastructure
    } else if counts.failed > 0 {
        Exit::TestFailures
    } else {
        Exit::Passed
    };
    RunResult { exit, report: Some(report), junit, trace: trace_path }
}

async fn connect_all(
    entries: Vec<Entry>,
    opts: &RunOptions,
    updates: &mpsc::UnboundedSender<client::Update>,
    stop: &CancellationToken,
) -> Vec<Slot> {
    let mut connecting = tokio::task::JoinSet::new();
    for (i, entry) in entries.iter().enumerate() {
        let (name, addr) = (entry.name.clone(), entry.address.clone());
        let keepalive = opts.keepalive;
        connecting.spawn(async move { (i, Agent::connect_with(&name, &addr, keepalive).await) });
    }
    let mut slots: Vec<Slot> =
        entries.into_iter().map(|entry| Slot { entry, agent: None, view: None, unreachable: None }).collect();
    while let Some(Ok((i, result))) = connecting.join_next().await {
        match result {
            Ok(agent) => {
                let (tx, mut rx) = watch::channel(AgentView::default());
                tokio::spawn(client::follow(agent.clone(), tx, updates.clone(), stop.clone(), opts.reconnect_grace));
                // Plan on what the agent says, not on an empty view: wait for its snapshot.
                let _ = tokio::time::timeout(SNAPSHOT_WAIT, rx.wait_for(|v| !v.incarnation.is_empty())).await;
                slots[i].agent = Some(agent);
                slots[i].view = Some(rx);
            }
            Err(e) => {
                eprintln!("error: {e}");
                slots[i].unreachable = Some(e.to_string());
            }
        }
    }
    slots
}

/// Acknowledges what was received, frees the services, stops following.
async fn finish(ctx: &Ctx) {
    for slot in &ctx.slots {
        if let (Some(agent), Some(view)) = (&slot.agent, &slot.view) {
            let view = view.borrow().clone();
            if view.last_seq > 0 {
                let _ = agent.ack(&view.incarnation, &ctx.run_id, view.last_seq).await;
            }
        }
    }
    let leases = ctx.leases.lock().await;
    for ((slot, _), lease) in leases.iter() {
        if let (Some(held), Some(agent)) = (lease.lock().await.as_ref(), &ctx.slots[*slot].agent)
            && let Err(e) = agent.release(&held.lease).await
        {
            tracing::warn!(error = %e, "could not release lease");
        }
    }
    ctx.stop.cancel();
}

#[derive(Default)]
struct SuiteOutcome {
    cases: Vec<CaseReport>,
    loads: Vec<ModelLoad>,
    interrupted: bool,
}

/// Places and runs one suite until every case has a result.
async fn run_suite(ctx: &Arc<Ctx>, index: usize, suite: &Suite) -> SuiteOutcome {
    let scope = otel::start(
        &ctx.tracer,
        "suite",
        Some(&ctx.trace),
        None,
        vec![
            KeyValue::new("proctor.suite.name", suite.name.clone()),
            KeyValue::new("proctor.suite.file", suite.file.display().to_string()),
            KeyValue::new("proctor.service", suite.service.clone()),
            KeyValue::new("proctor.models", suite.models.join(",")),
        ],
        vec![],
    );
    let outcome = place_and_run(ctx, index, suite, &scope).await;
    let bad = outcome.cases.iter().filter(|c| c.outcome != crate::report::Outcome::Passed).count();
    if bad > 0 {
        scope.fail(&format!("{bad} of {} cases did not pass", outcome.cases.len()));
    }
    scope.end();
    outcome
}

async fn place_and_run(ctx: &Arc<Ctx>, index: usize, suite: &Suite, scope: &Scope) -> SuiteOutcome {
    let mut outcome = SuiteOutcome::default();
    let mut slots: Vec<Option<CaseReport>> = vec![None; suite.cases.len()];
    let mut pending: Vec<usize> = (0..suite.cases.len()).collect();
    let need = Need {
        service: suite.service.clone(),
        models: suite.models.clone(),
        headroom: suite.headroom_bytes,
        labels: suite.labels.clone(),
        fresh: suite.fresh || ctx.opts.fresh,
        shard: match suite.shard {
            None => scheduler::Shard::One,
            Some(suite::Shard::Count(n)) => scheduler::Shard::Count(n),
            Some(suite::Shard::Auto) => scheduler::Shard::Auto,
        },
    };
    let mut last_said: Option<(Instant, Vec<String>)> = None;
    let mut refusals = 0;
    let mut attempts_of: Vec<u32> = vec![1; suite.cases.len()];
    let mut reruns: Vec<Vec<String>> = vec![Vec::new(); suite.cases.len()];
    let mut earlier: BTreeMap<usize, Vec<SpanContext>> = BTreeMap::new();
    while !pending.is_empty() {
        if ctx.cancel.is_cancelled() {
            outcome.interrupted = true;
            fill(&mut slots, &pending, suite, "interrupted before the case ran");
            break;
        }
        let hosts = host_views(ctx).await;
        match scheduler::plan::plan(&need, pending.len(), &hosts, &ctx.run_id) {
            Plan::Unsatisfiable(why) => {
                let text =
                    format!("unsatisfiable: no host could ever run suite {}:\n  {}", suite.name, why.join("\n  "));
                eprintln!("error: {text}");
                fill(&mut slots, &pending, suite, &text);
                break;
            }
            Plan::Wait(why) => {
                let repeat =
                    last_said.as_ref().is_some_and(|(at, said)| *said == why && at.elapsed() < SAY_WAITING_EVERY);
                if !repeat {
                    println!("suite {} waiting for a host:\n  {}", suite.name, why.join("\n  "));
                    last_said = Some((Instant::now(), why));
                }
                tokio::select! {
                    _ = ctx.cancel.cancelled() => {}
                    _ = tokio::time::sleep(REPLAN_EVERY) => {}
                }
            }
            Plan::Place(assignments) => {
                let mut attempts = tokio::task::JoinSet::new();
                for a in assignments {
                    let cases: Vec<usize> = a.cases.iter().map(|i| pending[*i]).collect();
                    let batch = Batch {
                        attempts: cases.iter().map(|i| (*i, attempts_of[*i])).collect(),
                        earlier: cases.iter().filter_map(|i| earlier.get(i).map(|e| (*i, e.clone()))).collect(),
                        cases: cases.clone(),
                    };
                    let ctx = ctx.clone();
                    let suite = suite.clone();
                    let scope = scope.clone();
                    attempts.spawn(async move { (cases, attempt(&ctx, a.host, &suite, &batch, &scope).await) });
                }
                let mut retry = Vec::new();
                while let Some(Ok((cases, result))) = attempts.join_next().await {
                    match result {
                        Attempt::Done { reports, loads, interrupted, lost } => {
                            for (i, mut r) in reports {
                                r.reruns = reruns[i].clone();
                                ctx.interrupt.record(index, i, &r);
                                slots[i] = Some(r);
                            }
                            outcome.loads.extend(loads);
                            outcome.interrupted |= interrupted;
                            refusals = 0;
                            if let Some(lost) = lost {
                                for (i, span) in lost.spans {
                                    earlier.entry(i).or_default().push(span);
                                }
                                for i in lost.cases {
                                    reruns[i].push(lost.reason.clone());
                                    if attempts_of[i] > MAX_INFRA_RETRIES {
                                        let mut r = CaseReport::error(
                                            &suite.name,
                                            &suite.cases[i].name,
                                            format!("{} (gave up after {} attempts)", lost.reason, attempts_of[i]),
                                        );
                                        r.attempt = attempts_of[i];
                                        r.reruns = reruns[i].clone();
                                        slots[i] = Some(r);
                                    } else {
                                        attempts_of[i] += 1;
                                        retry.push(i);
                                    }
                                }
                                println!(
                                    "suite {}: {}; re-running its unfinished cases elsewhere",
                                    suite.name, lost.reason
                                );
                            }
                        }
                        Attempt::Retry { reason, refused } => {
                            refusals += u32::from(refused);
                            if refusals >= MAX_REFUSALS {
                                fill(&mut slots, &cases, suite, &reason);
                            } else {
                                println!("suite {} waiting for a host:\n  {reason}", suite.name);
                                retry.extend(cases);
                            }
                        }
                    }
                }
                retry.sort_unstable();
                pending = retry;
                if outcome.interrupted {
                    fill(&mut slots, &pending, suite, "interrupted before the case ran");
                    pending.clear();
                }
                if !pending.is_empty() {
                    tokio::time::sleep(REPLAN_EVERY).await;
                }
            }
        }
    }
    outcome.cases = slots
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| {
                CaseReport::error(
                    &suite.name,
                    &suite.cases[i].name,
                    "no result: the run ended before this case ran".into(),
                )
            })
        })
        .collect();
    outcome
}

fn fill(slots: &mut [Option<CaseReport>], cases: &[usize], suite: &Suite, message: &str) {
    for i in cases {
        if slots[*i].is_none() {
            slots[*i] = Some(CaseReport::error(&suite.name, &suite.cases[*i].name, message.to_owned()));
        }
    }
}

/// Every host as the planner should see it now.
async fn host_views(ctx: &Ctx) -> Vec<scheduler::Host> {
    let mut hosts = Vec::new();
    for slot in &ctx.slots {
        let (Some(agent), Some(view)) = (&slot.agent, &slot.view) else {
            let reason = slot.unreachable.clone().unwrap_or_else(|| "not connected".into());
            hosts.push(scheduler::unreachable(&slot.entry.name, &slot.entry.labels, &reason));
            continue;
        };
        let mut agent = agent.clone();
        let view = view.borrow().clone();
        if let Some(lost) = &view.lost {
            hosts.push(scheduler::unreachable(&slot.entry.name, &slot.entry.labels, lost));
            continue;
        }
        match tokio::time::timeout(INFO_TIMEOUT, agent.refresh_info()).await {
            Ok(Ok(())) => hosts.push(scheduler::host_view(&slot.entry.name, &slot.entry.labels, &agent.info, &view)),
            Ok(Err(e)) => hosts.push(scheduler::unreachable(&slot.entry.name, &slot.entry.labels, &e.to_string())),
            Err(_) => hosts.push(scheduler::unreachable(&slot.entry.name, &slot.entry.labels, "no answer within 2s")),
        }
    }
    hosts
}

/// Runs `cases` of `suite` on one host, taking this run's lease there first.
async fn attempt(ctx: &Arc<Ctx>, slot: usize, suite: &Suite, batch: &Batch, scope: &Scope) -> Attempt {
    let cases = &batch.cases;
    let agent = ctx.slots[slot].agent.clone().expect("planned hosts are connected");
    let key = (slot, suite.service.clone());
    let cell = ctx.leases.lock().await.entry(key).or_default().clone();
    // Suites of this run take turns on one service of one host.
    let mut held = cell.lock().await;
    if held.is_none() {
        match agent.acquire(&suite.service, &ctx.run_id, &ctx.holder, ctx.opts.lease_ttl).await {
            Ok(lease) => {
                let renew = ctx.stop.child_token();
                agent.keep_renewed(&lease, ctx.opts.lease_ttl, renew.clone());
                *held = Some(Held { lease, renew });
            }
            Err(ClientError::Rpc { code: tonic::Code::FailedPrecondition, message, .. }) => {
                return Attempt::Retry { reason: format!("{}: {message}", agent.name), refused: false };
            }
            Err(e) if e.is_infrastructure() => {
                // The host did not answer: plan again (it will count as lost
                // once past the reconnect grace).
                return Attempt::Retry { reason: format!("{}: {e}", agent.name), refused: false };
            }
            Err(e) => {
                let reports =
                    cases.iter().map(|i| (*i, CaseReport::error(&suite.name, &suite.cases[*i].name, e.to_string())));
                return Attempt::Done { reports: reports.collect(), loads: Vec::new(), interrupted: false, lost: None };
            }
        }
    }
    let lease = held.as_ref().map(|h| h.lease.clone()).expect("just taken");
    let view = ctx.slots[slot].view.clone().expect("connected");
    let lease_scope = otel::start(
        &ctx.tracer,
        "lease",
        Some(scope),
        None,
        vec![
            KeyValue::new("proctor.host", agent.name.clone()),
            KeyValue::new("proctor.service", suite.service.clone()),
            KeyValue::new("proctor.lease.epoch", lease.epoch as i64),
            KeyValue::new("server.address", agent.addr.clone()),
        ],
        vec![],
    );
    let result = run_on(ctx, &agent, view, &lease, suite, batch, &lease_scope).await;
    match &result {
        Attempt::Retry { reason, .. } => lease_scope.fail(reason),
        Attempt::Done { lost: Some(lost), .. } => {
            lease_scope.fail(&lost.reason);
            // The lease there is as good as gone: stop renewing it (the host is
            // unreachable) and take a new one if we come back.
            if let Some(h) = held.take() {
                h.renew.cancel();
            }
        }
        _ => {}
    }
    lease_scope.end();
    result
}

/// Ensures the suite's models on one host, waits for them, runs the cases
/// whose models loaded, and turns the others into errors.
async fn run_on(
    ctx: &Ctx,
    agent: &Agent,
    mut view: watch::Receiver<AgentView>,
    lease: &Lease,
    suite: &Suite,
    batch: &Batch,
    scope: &Scope,
) -> Attempt {
    let cases = &batch.cases;
    let host = agent.name.clone();
    let traceparent = otel::traceparent(&scope.span_context());
    let error = |i: usize, message: String| {
        let mut r = CaseReport::error(&suite.name, &suite.cases[i].name, message);
        r.host = host.clone();
        (i, r)
    };
    let timeout = requested_timeout(ctx.opts.model_timeout, suite.load_timeout);
    let asked = Instant::now();
    let asked_ms = client::now_unix_ms();
    let fresh = suite.fresh || ctx.opts.fresh;
    let barrier = match agent.ensure(lease, &suite.models, timeout, suite.headroom_bytes, fresh, &traceparent).await {
        Ok(b) => b,
        Err(ClientError::Rpc { code: tonic::Code::ResourceExhausted, message, .. }) => {
            return Attempt::Retry { reason: format!("{}: {message}", agent.name), refused: true };
        }
        Err(e) if e.is_infrastructure() => {
            // The call broke on the way: the host, not the suite, failed.
            let spans = cases
                .iter()
                .map(|i| (*i, lost_span(ctx, &suite.cases[*i], batch.attempts[i], &e.to_string(), scope)))
                .collect();
            return Attempt::Done {
                reports: vec![],
                loads: vec![],
                interrupted: false,
                lost: Some(Lost { reason: format!("host {host} lost: {e}"), cases: cases.clone(), spans }),
            };
        }
        Err(e) => {
            eprintln!("error: suite {}: {e}", suite.name);
            return Attempt::Done {
                reports: cases.iter().map(|i| error(*i, e.to_string())).collect(),
                loads: vec![],
                interrupted: false,
                lost: None,
            };
        }
    };

    // Wait for every model to be READY or FAILED, as of after the ensure.
    let key = |m: &String| (suite.service.clone(), m.clone());
    let settled = |v: &AgentView| {
        v.lost.is_some()
            || (v.last_seq + 1 >= barrier
                && suite.models.iter().all(|m| v.models.get(&key(m)).is_some_and(|x| x.stage.is_terminal())))
    };
    let waited = tokio::select! {
        _ = ctx.cancel.cancelled() => None,
        r = view.wait_for(settled) => Some(r.map(|v| v.clone())),
    };
    let snapshot = match waited {
        None => {
            let reports = cases.iter().map(|i| error(*i, "interrupted while waiting for models to load".into()));
            return Attempt::Done { reports: reports.collect(), loads: vec![], interrupted: true, lost: None };
        }
        Some(Err(_)) => {
            let reports = cases.iter().map(|i| error(*i, "lost the agent's event stream".into()));
            return Attempt::Done { reports: reports.collect(), loads: vec![], interrupted: false, lost: None };
        }
        Some(Ok(v)) => v,
    };
    if let Some(reason) = &snapshot.lost {
        // Lost while loading: every case goes elsewhere.
        let spans =
            cases.iter().map(|i| (*i, lost_span(ctx, &suite.cases[*i], batch.attempts[i], reason, scope))).collect();
        return Attempt::Done {
            reports: vec![],
            loads: vec![],
            interrupted: false,
            lost: Some(Lost { reason: format!("host {host} lost: {reason}"), cases: cases.clone(), spans }),
        };
    }

    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    let mut loads = Vec::new();
    for m in &suite.models {
        let failure = match snapshot.models.get(&key(m)) {
            Some(s) if s.stage == Stage::Ready => None,
            Some(s) if !s.message.is_empty() => Some(s.message.clone()),
            Some(s) => Some(format!("model {m} is {}", s.stage.label())),
            None => Some(format!("model {m} is unknown to agent {}", agent.name)),
        };
        loads.push(ModelLoad {
            host: host.clone(),
            service: suite.service.clone(),
            model: m.clone(),
            failure: failure.clone(),
            waited: asked.elapsed(),
        });
        trace_load(ctx, agent, &snapshot, suite, m, asked_ms, failure.as_deref(), scope);
        if let Some(f) = failure {
            failed.insert(m.clone(), f);
        }
    }

    // Cases whose models failed become errors carrying the load message.
    let mut reports = Vec::new();
    let mut runnable = Vec::new();
    for &i in cases {
        match suite.cases[i].models.iter().find_map(|m| failed.get(m)) {
            Some(message) => reports.push(error(i, message.clone())),
            None => runnable.push(i),
        }
    }
    let ids: Vec<(usize, String)> =
        runnable.iter().map(|i| (*i, format!("{}/{}/{i}/{}", ctx.run_id, suite.name, batch.attempts[i]))).collect();
    // Each case's span id is chosen now, so its traceparent can go with it.
    let span_ids: BTreeMap<usize, opentelemetry::trace::SpanId> =
        runnable.iter().map(|i| (*i, otel::new_span_id())).collect();
    let trace_id = scope.span_context().trace_id();
    let mut interrupted = false;
    let mut lost = None;
    if !ids.is_empty() {
        let protos = ids
            .iter()
            .map(|(i, id)| {
                let tp = format!("00-{trace_id}-{}-01", span_ids[i]);
                client::case_to_proto(id.clone(), batch.attempts[i], &suite.cases[*i], tp)
            })
            .collect();
        match agent.run_cases(lease, protos, &traceparent).await {
            Err(e) if e.is_infrastructure() => {
                // Whether or not the agent got them, these cases go elsewhere;
                // a late result under this attempt's ids is never taken.
                let spans = ids
                    .iter()
                    .map(|(i, _)| (*i, lost_span(ctx, &suite.cases[*i], batch.attempts[i], &e.to_string(), scope)))
                    .collect();
                let missing = ids.iter().map(|(i, _)| *i).collect();
                lost = Some(Lost { reason: format!("host {host} lost: {e}"), cases: missing, spans });
            }
            Err(e) => reports.extend(ids.iter().map(|(i, _)| error(*i, e.to_string()))),
            Ok(()) => {
                let budget: Duration =
                    ids.iter().map(|(i, _)| suite.cases[*i].timeout.unwrap_or(DEFAULT_CASE_TIMEOUT)).sum::<Duration>()
                        + RESULT_SLACK;
                let done = |v: &AgentView| v.lost.is_some() || ids.iter().all(|(_, id)| v.results.contains_key(id));
                let got = tokio::select! {
                    _ = ctx.cancel.cancelled() => { interrupted = true; None }
                    _ = tokio::time::sleep(budget) => None,
                    r = view.wait_for(done) => r.ok().map(|v| v.clone()),
                };
                let latest = got.unwrap_or_else(|| view.borrow().clone());
                if let Some(reason) = latest.lost.clone().filter(|_| !interrupted) {
                    // Keep what arrived; the rest goes elsewhere.
                    let missing: Vec<usize> =
                        ids.iter().filter(|(_, id)| !latest.results.contains_key(id)).map(|(i, _)| *i).collect();
                    let spans = missing
                        .iter()
                        .map(|i| (*i, lost_span(ctx, &suite.cases[*i], batch.attempts[i], &reason, scope)))
                        .collect();
                    lost = Some(Lost { reason: format!("host {host} lost: {reason}"), cases: missing, spans });
                }
                for (i, id) in &ids {
                    if lost.as_ref().is_some_and(|l| l.cases.contains(i)) {
                        continue;
                    }
                    reports.push(match latest.results.get(id) {
                        // Fencing: a result under another lease epoch is never merged.
                        Some(r) if r.lease_epoch == lease.epoch => {
                            (*i, CaseReport { suite: suite.name.clone(), host: host.clone(), ..r.clone() })
                        }
                        Some(r) => error(
                            *i,
                            format!(
                                "result rejected: it came under lease epoch {}, this run holds epoch {}",
                                r.lease_epoch, lease.epoch
                            ),
                        ),
                        None if interrupted => error(*i, "interrupted before the case finished".into()),
                        None => error(
                            *i,
                            latest.lost.clone().unwrap_or_else(|| {
                                format!("no result from agent {} within {}s", agent.name, budget.as_secs())
                            }),
                        ),
                    });
                }
            }
        }
    }
    for (i, r) in &reports {
        let links = batch.earlier.get(i).cloned().unwrap_or_default();
        trace_case(ctx, agent, &suite.cases[*i], r, span_ids.get(i).copied(), links, scope);
    }
    Attempt::Done { reports, loads, interrupted, lost }
}

/// The span of an attempt that lost its host, for the re-run to link to.
fn lost_span(ctx: &Ctx, case: &crate::suite::Case, attempt: u32, reason: &str, scope: &Scope) -> SpanContext {
    let span = otel::start(
        &ctx.tracer,
        format!("case {}", case.name),
        Some(scope),
        None,
        vec![
            KeyValue::new("proctor.case.name", case.name.clone()),
            KeyValue::new("proctor.case.attempt", i64::from(attempt)),
            KeyValue::new("proctor.case.outcome", "lost"),
        ],
        vec![],
    );
    span.fail(&format!("host lost: {reason}"));
    span.end();
    span.span_context()
}

fn at(ms: i64) -> std::time::SystemTime {
    otel::unix_ms_to_time(ms)
}

/// The `model.load` span of one model, with a child span per stage at the
/// times the agent stamped (in our clock), or a zero-length span linked to an
/// earlier load in this run when the model was already loaded.
#[expect(clippy::too_many_arguments, reason = "one call site; the parts are unrelated")]
fn trace_load(
    ctx: &Ctx,
    agent: &Agent,
    view: &AgentView,
    suite: &Suite,
    model: &str,
    asked_ms: i64,
    failure: Option<&str>,
    scope: &Scope,
) {
    let asked_agent = asked_ms + agent.clock_offset_ms;
    let marks: Vec<&client::StageMark> = view
        .stage_log
        .iter()
        .filter(|m| m.service == suite.service && m.model == model && m.time_unix_ms >= asked_agent - 5)
        .collect();
    let key = (agent.name.clone(), suite.service.clone(), model.to_owned());
    let mut attributes = vec![
        KeyValue::new("proctor.model", model.to_owned()),
        KeyValue::new("proctor.host", agent.name.clone()),
        KeyValue::new("proctor.service", suite.service.clone()),
        KeyValue::new("proctor.load.outcome", if failure.is_none() { "ready" } else { "failed" }),
    ];
    if marks.is_empty() {
        // Already loaded: reused, not loaded again.
        attributes.push(KeyValue::new("proctor.load.reused", true));
        let earlier = ctx.loads.lock().expect("loads").get(&key).cloned();
        let links = earlier.into_iter().map(Link::with_context).collect();
        let span = otel::start(&ctx.tracer, "model.load", Some(scope), Some(at(asked_ms)), attributes, links);
        span.end_at(at(asked_ms));
        return;
    }
    let end_agent = marks.last().map_or(asked_agent, |m| m.time_unix_ms);
    let peak = view
        .rss_log
        .iter()
        .filter(|(svc, t, _)| *svc == suite.service && *t >= asked_agent && *t <= end_agent)
        .map(|(_, _, rss)| *rss)
        .max()
        .unwrap_or(0);
    attributes.push(KeyValue::new("proctor.load.peak_rss_bytes", peak as i64));
    let load = otel::start(&ctx.tracer, "model.load", Some(scope), Some(at(asked_ms)), attributes, vec![]);
    for pair in marks.windows(2) {
        let (from, to) = (pair[0], pair[1]);
        let stage = otel::start(
            &ctx.tracer,
            from.stage.label(),
            Some(&load),
            Some(at(agent.local_ms(from.time_unix_ms))),
            vec![
                KeyValue::new("proctor.stage", from.stage.label()),
                KeyValue::new("proctor.stage.cause", from.cause.clone()),
            ],
            vec![],
        );
        stage.end_at(at(agent.local_ms(to.time_unix_ms)));
    }
    if let Some(f) = failure {
        load.fail(f.lines().next().unwrap_or(f));
    }
    load.end_at(at(agent.local_ms(end_agent).max(asked_ms)));
    ctx.loads.lock().expect("loads").insert(key, load.span_context());
}

/// A case's span, with the id its traceparent announced, at the agent's times.
fn trace_case(
    ctx: &Ctx,
    agent: &Agent,
    case: &crate::suite::Case,
    report: &CaseReport,
    id: Option<opentelemetry::trace::SpanId>,
    links: Vec<SpanContext>,
    scope: &Scope,
) {
    use crate::report::Outcome;
    let ran = report.started_unix_ms > 0;
    let start = if ran { agent.local_ms(report.started_unix_ms) } else { client::now_unix_ms() };
    let mut attributes = vec![
        KeyValue::new("proctor.case.name", case.name.clone()),
        KeyValue::new("proctor.case.attempt", i64::from(report.attempt)),
        KeyValue::new(
            "proctor.case.outcome",
            match report.outcome {
                Outcome::Passed => "passed",
                Outcome::Failed(_) => "failed",
                Outcome::Error(_) => "error",
            },
        ),
        KeyValue::new("proctor.case.latency_ms", report.duration.as_secs_f64() * 1000.0),
        KeyValue::new("http.request.method", case.request.method.clone()),
    ];
    if !report.url.is_empty() {
        let url = otel::redact_url(&report.url);
        let server = url.split("://").nth(1).and_then(|r| r.split(['/', ':']).next()).unwrap_or("").to_owned();
        attributes.push(KeyValue::new("url.full", url));
        attributes.push(KeyValue::new("server.address", server));
    }
    if let Some(status) = report.http_status {
        attributes.push(KeyValue::new("http.response.status_code", i64::from(status)));
    }
    let name = format!("case {}", case.name);
    let links = links.into_iter().map(Link::with_context).collect();
    let span = match id {
        Some(id) if ran => otel::start_with_id(&ctx.tracer, id, name, scope, at(start), attributes, links),
        _ => otel::start(&ctx.tracer, name, Some(scope), Some(at(start)), attributes, links),
    };
    if report.outcome != Outcome::Passed {
        span.fail(&report.headline());
    }
    span.end_at(at(start + report.duration.as_millis() as i64));
}
