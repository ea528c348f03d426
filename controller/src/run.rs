//! `proctor run`: parse every suite, then for each suite take a lease on its
//! service, ensure its models and wait for them (never skip), run its cases on
//! the agent, and collect results. Reports are written on every outcome,
//! including Ctrl-C.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Agent, AgentView, ClientError, Lease, Stage};
use crate::progress::{self, Mode};
use crate::report::{CaseReport, ModelLoad, RunReport};
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
    pub agents: Vec<String>,
    pub suites: Vec<PathBuf>,
    pub out_dir: PathBuf,
    pub progress: Mode,
    /// `--model-timeout`: beats the suite's timeout.
    pub model_timeout: Option<Duration>,
    pub fresh: bool,
}

#[derive(Debug)]
pub struct RunResult {
    pub exit: Exit,
    pub report: Option<RunReport>,
    pub junit: Option<PathBuf>,
}

/// Time allowed for a case's result beyond its own timeout.
const RESULT_SLACK: Duration = Duration::from_secs(10);
const DEFAULT_CASE_TIMEOUT: Duration = Duration::from_secs(30);
const BUSY_RETRY: Duration = Duration::from_secs(2);

struct Connected {
    agent: Agent,
    view: watch::Receiver<AgentView>,
}

/// Runs suites; prints progress and the summary; writes `junit.xml`.
pub async fn run(opts: RunOptions, cancel: CancellationToken) -> RunResult {
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
    if opts.agents.is_empty() {
        eprintln!("error: no agents given: pass --agent HOST:PORT (repeatable)");
        bad = true;
    }
    if bad {
        return RunResult { exit: Exit::BadInput, report: None, junit: None };
    }

    let run_id = uuid::Uuid::new_v4().to_string();
    let holder = format!(
        "{}@{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
    );
    let stop = CancellationToken::new();
    let (updates_tx, updates_rx) = mpsc::unbounded_channel();
    let display = tokio::spawn(progress::run(opts.progress, std::io::stdout(), updates_rx, stop.clone()));

    let mut agents = Vec::new();
    let mut unreachable = Vec::new();
    for addr in &opts.agents {
        match Agent::connect(addr).await {
            Ok(agent) => {
                let (tx, rx) = watch::channel(AgentView::default());
                tokio::spawn(client::follow(agent.clone(), tx, updates_tx.clone(), stop.clone()));
                agents.push(Connected { agent, view: rx });
            }
            Err(e) => {
                eprintln!("error: {e}");
                unreachable.push(e.to_string());
            }
        }
    }
    drop(updates_tx);

    let mut report = RunReport { run_id: run_id.clone(), ..Default::default() };
    let mut leases: BTreeMap<(usize, String), (Lease, CancellationToken)> = BTreeMap::new();
    for suite in &suites {
        if cancel.is_cancelled() {
            report.interrupted = true;
            push_errors(
                &mut report,
                suite,
                &suite.cases.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
                "interrupted before the suite started",
            );
            continue;
        }
        let Some(index) = agents.iter().position(|a| a.agent.serves(&suite.service, &suite.models)) else {
            let why = if agents.is_empty() {
                format!("no agent reachable: {}", unreachable.join("; "))
            } else {
                let offered: Vec<String> = agents
                    .iter()
                    .map(|a| format!("{} serves {}", a.agent.addr, describe_services(&a.agent.info)))
                    .collect();
                format!(
                    "unsatisfiable: no agent serves service {} with models {:?} ({})",
                    suite.service,
                    suite.models,
                    offered.join("; ")
                )
            };
            eprintln!("error: suite {}: {why}", suite.name);
            push_errors(&mut report, suite, &suite.cases.iter().map(|c| c.name.clone()).collect::<Vec<_>>(), &why);
            continue;
        };
        let key = (index, suite.service.clone());
        if !leases.contains_key(&key) {
            match acquire(&agents[index].agent, &suite.service, &run_id, &holder, &cancel).await {
                Ok(lease) => {
                    let renew = stop.child_token();
                    agents[index].agent.keep_renewed(&lease, renew.clone());
                    leases.insert(key.clone(), (lease, renew));
                }
                Err(why) => {
                    if cancel.is_cancelled() {
                        report.interrupted = true;
                    }
                    eprintln!("error: suite {}: {why}", suite.name);
                    push_errors(
                        &mut report,
                        suite,
                        &suite.cases.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
                        &why,
                    );
                    continue;
                }
            }
        }
        let lease = leases[&key].0.clone();
        let interrupted = run_suite(&agents[index], &lease, suite, &opts, &run_id, &mut report, &cancel).await;
        report.interrupted |= interrupted;
    }

    // Acknowledge what we received, free the services, stop following.
    for connected in &agents {
        let view = connected.view.borrow().clone();
        if view.last_seq > 0 {
            let _ = connected.agent.ack(&view.incarnation, view.last_seq).await;
        }
    }
    for ((index, _), (lease, renew)) in &leases {
        renew.cancel();
        if let Err(e) = agents[*index].agent.release(lease).await {
            tracing::warn!(error = %e, "could not release lease");
        }
    }
    stop.cancel();
    let _ = display.await;

    report.duration = started.elapsed();
    let junit = opts.out_dir.join("junit.xml");
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
    let counts = report.counts();
    let exit = if report.interrupted {
        Exit::Interrupted
    } else if counts.errors > 0 || (junit.is_none()) {
        Exit::Infrastructure
    } else if counts.failed > 0 {
        Exit::TestFailures
    } else {
        Exit::Passed
    };
    RunResult { exit, report: Some(report), junit }
}

/// The controller's part of the load-timeout precedence (DESIGN §4): the CLI
/// flag beats the suite. The agent then applies MODEL_LOADING_TIMEOUT, its
/// config and its default below whatever is sent.
pub fn requested_timeout(cli: Option<Duration>, suite: Option<Duration>) -> Option<Duration> {
    cli.or(suite)
}

fn describe_services(info: &proto::AgentInfo) -> String {
    let list: Vec<String> = info
        .services
        .iter()
        .map(|s| format!("{} [{}]", s.name, s.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")))
        .collect();
    if list.is_empty() { "nothing".into() } else { list.join(", ") }
}

fn push_errors(report: &mut RunReport, suite: &Suite, names: &[String], message: &str) {
    for name in names {
        report.cases.push(CaseReport::error(&suite.name, name, message.to_owned()));
    }
}

/// Takes the lease, waiting (never skipping) while another run holds it.
async fn acquire(
    agent: &Agent,
    service: &str,
    run_id: &str,
    holder: &str,
    cancel: &CancellationToken,
) -> Result<Lease, String> {
    let mut last_said: Option<Instant> = None;
    loop {
        match agent.acquire(service, run_id, holder).await {
            Ok(lease) => return Ok(lease),
            Err(ClientError::Rpc { code: tonic::Code::FailedPrecondition, message, .. }) => {
                if last_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    println!("waiting for {}: {message}", agent.addr);
                    last_said = Some(Instant::now());
                }
            }
            Err(e) => return Err(e.to_string()),
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err("interrupted while waiting for the lease".into()),
            _ = tokio::time::sleep(BUSY_RETRY) => {}
        }
    }
}

/// Ensures the suite's models, waits for them, runs the cases that can run.
/// Returns true if interrupted.
async fn run_suite(
    connected: &Connected,
    lease: &Lease,
    suite: &Suite,
    opts: &RunOptions,
    run_id: &str,
    report: &mut RunReport,
    cancel: &CancellationToken,
) -> bool {
    let agent = &connected.agent;
    let mut view = connected.view.clone();
    let all_names: Vec<String> = suite.cases.iter().map(|c| c.name.clone()).collect();
    let timeout = requested_timeout(opts.model_timeout, suite.load_timeout);
    let asked = Instant::now();
    let barrier = match agent.ensure(lease, &suite.models, timeout, opts.fresh).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: suite {}: {e}", suite.name);
            push_errors(report, suite, &all_names, &e.to_string());
            return false;
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
        _ = cancel.cancelled() => None,
        r = view.wait_for(settled) => Some(r.map(|v| v.clone())),
    };
    let snapshot = match waited {
        None => {
            push_errors(report, suite, &all_names, "interrupted while waiting for models to load");
            return true;
        }
        Some(Err(_)) => {
            push_errors(report, suite, &all_names, "lost the agent's event stream");
            return false;
        }
        Some(Ok(v)) => v,
    };
    if let Some(lost) = &snapshot.lost {
        push_errors(report, suite, &all_names, lost);
        return false;
    }

    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    for m in &suite.models {
        let state = snapshot.models.get(&key(m));
        let failure = match state {
            Some(s) if s.stage == Stage::Ready => None,
            Some(s) if !s.message.is_empty() => Some(s.message.clone()),
            Some(s) => Some(format!("model {m} is {}", s.stage.label())),
            None => Some(format!("model {m} is unknown to the agent")),
        };
        if !report.loads.iter().any(|l| l.service == suite.service && l.model == *m) {
            report.loads.push(ModelLoad {
                service: suite.service.clone(),
                model: m.clone(),
                failure: failure.clone(),
                waited: asked.elapsed(),
            });
        }
        if let Some(f) = failure {
            failed.insert(m.clone(), f);
        }
    }

    // Cases whose models failed become errors carrying the load message.
    let mut runnable = Vec::new();
    let mut slots: Vec<Option<CaseReport>> = vec![None; suite.cases.len()];
    for (i, case) in suite.cases.iter().enumerate() {
        match case.models.iter().find_map(|m| failed.get(m)) {
            Some(message) => slots[i] = Some(CaseReport::error(&suite.name, &case.name, message.clone())),
            None => runnable.push(i),
        }
    }
    let ids: Vec<(usize, String)> = runnable.iter().map(|i| (*i, format!("{run_id}/{}/{i}", suite.name))).collect();
    let mut interrupted = false;
    if !ids.is_empty() {
        let cases = ids.iter().map(|(i, id)| client::case_to_proto(id.clone(), 1, &suite.cases[*i])).collect();
        match agent.run_cases(lease, cases).await {
            Err(e) => {
                for (i, _) in &ids {
                    slots[*i] = Some(CaseReport::error(&suite.name, &suite.cases[*i].name, e.to_string()));
                }
            }
            Ok(()) => {
                let budget: Duration =
                    ids.iter().map(|(i, _)| suite.cases[*i].timeout.unwrap_or(DEFAULT_CASE_TIMEOUT)).sum::<Duration>()
                        + RESULT_SLACK;
                let done = |v: &AgentView| v.lost.is_some() || ids.iter().all(|(_, id)| v.results.contains_key(id));
                let outcome = tokio::select! {
                    _ = cancel.cancelled() => { interrupted = true; None }
                    _ = tokio::time::sleep(budget) => None,
                    r = view.wait_for(done) => r.ok().map(|v| v.clone()),
                };
                let latest = outcome.unwrap_or_else(|| connected.view.borrow().clone());
                for (i, id) in &ids {
                    let name = &suite.cases[*i].name;
                    slots[*i] = Some(match latest.results.get(id) {
                        Some(r) => CaseReport { suite: suite.name.clone(), ..r.clone() },
                        None if interrupted => {
                            CaseReport::error(&suite.name, name, "interrupted before the case finished".into())
                        }
                        None => CaseReport::error(
                            &suite.name,
                            name,
                            latest.lost.clone().unwrap_or_else(|| {
                                format!("no result from agent {} within {}s", agent.addr, budget.as_secs())
                            }),
                        ),
                    });
                }
            }
        }
    }
    report.cases.extend(slots.into_iter().flatten());
    interrupted
}
