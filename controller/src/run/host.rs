//! One try of one suite's cases on one host: take the turn and the lease,
//! ensure the models and wait for them (`ensure_and_wait`), then send the
//! cases whose models loaded and collect their results (`run_and_collect`).
//! Everything the try learns goes out as `RunEvent`s; what it leaves
//! undone comes back to the suite as a `TryOutcome`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use opentelemetry::trace::SpanId;
use tokio::sync::watch;
use tokio::time::Instant;

use super::Ctx;
use super::events::{RunEvent, StageSpan};
use super::leases::Held;
use crate::client::{self, Agent, AgentView, CaseToRun, EnsureAsk, Failure, Stage};
use crate::report::{CaseReport, LoadStage, ModelLoad, Outcome};
use crate::suite::Suite;

/// A command case without a timeout of its own: the agent ends it at its
/// command's timeout (10 minutes unless configured) and answers; the run
/// waits up to this long for that answer.
const DEFAULT_COMMAND_WAIT: Duration = Duration::from_secs(24 * 3600);

/// How long one case may take before its result is given up on.
fn case_budget(case: &crate::suite::Case) -> Duration {
    match (case.timeout, &case.command) {
        (Some(t), _) => t,
        (None, Some(_)) => DEFAULT_COMMAND_WAIT,
        (None, None) => DEFAULT_CASE_TIMEOUT,
    }
}

/// A command case whose tests were skipped fails under `--fail-on-skip`:
/// nothing is silently skipped.
fn fail_on_skip(report: &mut CaseReport) {
    let skipped: Vec<crate::report::Failure> = report
        .tests
        .iter()
        .filter(|t| t.outcome == "skipped")
        .map(|t| crate::report::Failure {
            check: "skipped".into(),
            pointer: t.id(),
            expected: "not skipped (--fail-on-skip)".into(),
            actual: if t.message.is_empty() { "skipped".into() } else { format!("skipped: {}", t.message) },
        })
        .collect();
    match &mut report.outcome {
        _ if skipped.is_empty() => {}
        Outcome::Passed => report.outcome = Outcome::Failed(skipped),
        Outcome::Failed(f) => f.extend(skipped),
        Outcome::Error(_) => {}
    }
}

/// Time allowed for a batch's results beyond its cases' own timeouts.
const RESULT_SLACK: Duration = Duration::from_secs(10);
const DEFAULT_CASE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a suite asks of one host.
#[derive(Clone, Debug)]
pub struct TryPlan {
    pub suite: usize,
    pub host: usize,
    /// (case index, attempt number)
    pub cases: Vec<(usize, u32)>,
    pub try_id: SpanId,
    /// Each case's result the moment it arrives (case index, report), so
    /// the suite records it at once — a controller killed mid-batch still
    /// leaves every result it received in the store. The outcome repeats
    /// them; the suite's `CaseBook` keeps the first. (try, case, report).
    pub early: Option<tokio::sync::mpsc::UnboundedSender<(SpanId, usize, CaseReport)>>,
}

/// How a try ended, for the suite's `CaseBook`.
#[derive(Debug, Default)]
pub struct TryOutcome {
    pub results: Vec<(usize, CaseReport)>,
    /// Cases the host was lost under (sent or not), and why.
    pub lost: Option<Lost>,
    /// Not this time (busy, no memory): these cases go back to the planner.
    pub retry: Option<Retry>,
    pub interrupted: bool,
    /// The agent no longer honours the lease this try used: take a new one.
    pub drop_lease: bool,
}

#[derive(Debug)]
pub struct Lost {
    pub reason: String,
    pub sent: Vec<usize>,
    pub unsent: Vec<usize>,
}

#[derive(Debug)]
pub struct Retry {
    pub reason: String,
    /// The agent refused the load for lack of memory (counts toward giving up).
    pub refused: bool,
    pub cases: Vec<usize>,
}

/// Runs one try to its end.
pub async fn run_try(ctx: &Ctx, suite: &Suite, plan: TryPlan) -> TryOutcome {
    let slot = &ctx.hosts[plan.host];
    let (Some(agent), Some(view)) = (slot.agent.clone(), slot.view.clone()) else {
        let reason = format!("host {} is not connected", slot.entry.name);
        return TryOutcome { retry: Some(retry(&plan, reason, false)), ..Default::default() };
    };
    let Some(turn) = ctx.leases.try_turn(plan.host, &suite.service) else {
        let reason = format!("{}: service {} is in use by another suite of this run", agent.name, suite.service);
        return TryOutcome { retry: Some(retry(&plan, reason, false)), ..Default::default() };
    };
    let incarnation = view.borrow().incarnation.clone();
    // Not raced against Ctrl-C: a grant we never heard of would linger for
    // a TTL. The call is bounded, and nothing follows it once interrupted.
    let held = ctx.leases.lease(&turn, &agent, &suite.service, &incarnation).await;
    if ctx.cancel.is_cancelled() {
        return interrupted();
    }
    let held = match held {
        Ok(h) => h,
        Err(e) if matches!(e.kind(), Failure::Busy | Failure::Lost) => {
            return TryOutcome { retry: Some(retry(&plan, e.to_string(), false)), ..Default::default() };
        }
        Err(e) => return all_errors(&plan, &agent, &e.to_string()),
    };
    ctx.events.send(RunEvent::LeaseTaken {
        suite: plan.suite,
        try_id: plan.try_id,
        host: agent.name.clone(),
        service: suite.service.clone(),
        epoch: held.lease.epoch,
    });
    let known_failed = ctx.failed_loads(plan.host, &suite.service, &suite.models);
    let to_ask: Vec<String> = suite.models.iter().filter(|m| !known_failed.contains_key(*m)).cloned().collect();
    let host = Host { ctx, agent: &agent, held: &held, suite, plan: &plan, incarnation, known_failed, to_ask };
    let outcome = host.ensure_and_run(view).await;
    if outcome.lost.is_some() || outcome.drop_lease {
        ctx.leases.forget(&turn);
    }
    outcome
}

fn interrupted() -> TryOutcome {
    TryOutcome { interrupted: true, ..Default::default() }
}

fn retry(plan: &TryPlan, reason: String, refused: bool) -> Retry {
    Retry { reason, refused, cases: plan.cases.iter().map(|(i, _)| *i).collect() }
}

fn all_errors(plan: &TryPlan, agent: &Agent, message: &str) -> TryOutcome {
    let results = plan.cases.iter().map(|(i, _)| (*i, error_on(agent, message))).collect();
    TryOutcome { results, ..Default::default() }
}

fn error_on(agent: &Agent, message: &str) -> CaseReport {
    let mut r = CaseReport::error("", "", message.to_owned());
    r.host = agent.name.clone();
    r
}

/// Why waiting on the agent stopped early.
enum Stop {
    Lost(String),
    Interrupted,
}

struct Host<'a> {
    ctx: &'a Ctx,
    agent: &'a Agent,
    held: &'a Held,
    suite: &'a Suite,
    plan: &'a TryPlan,
    /// The agent's incarnation when the try began: another one means
    /// whatever the try started there is gone.
    incarnation: String,
    /// Models whose load already failed on this host in this run: final for
    /// the run, never asked for again (a retry would restart the service and
    /// wait out the same stall).
    known_failed: BTreeMap<String, String>,
    /// The suite's models still worth asking for.
    to_ask: Vec<String>,
}

impl Host<'_> {
    fn case_ids(&self) -> Vec<usize> {
        self.plan.cases.iter().map(|(i, _)| *i).collect()
    }

    fn gone(&self, v: &AgentView) -> Option<String> {
        if let Some(reason) = &v.lost {
            return Some(format!("host {} lost: {reason}", self.agent.name));
        }
        if v.incarnation != self.incarnation {
            return Some(format!("host {} lost: its agent restarted", self.agent.name));
        }
        None
    }

    async fn ensure_and_run(&self, view: watch::Receiver<AgentView>) -> TryOutcome {
        let mut failed = self.known_failed.clone();
        if !self.to_ask.is_empty() {
            let (snapshot, asked_ms) = match self.ensure_and_wait(view.clone()).await {
                Ok(s) => s,
                Err(outcome) => return outcome,
            };
            failed.extend(self.settle_models(&snapshot, asked_ms));
        }
        let mut outcome = TryOutcome::default();
        let mut runnable = Vec::new();
        for (i, attempt) in &self.plan.cases {
            match self.suite.cases[*i].models.iter().find_map(|m| failed.get(m)) {
                Some(message) => outcome.results.push((*i, error_on(self.agent, message))),
                None => runnable.push((*i, *attempt)),
            }
        }
        if !runnable.is_empty() {
            self.run_and_collect(view, &runnable, &mut outcome).await;
        }
        outcome
    }

    /// Ensures the models and waits until each is READY or FAILED, as of
    /// after the ensure; returns the view then and when it asked (our
    /// clock). `Err` carries the whole try's outcome.
    async fn ensure_and_wait(&self, mut view: watch::Receiver<AgentView>) -> Result<(AgentView, i64), TryOutcome> {
        let ctx = self.ctx;
        let fresh = self.suite.fresh || ctx.opts.fresh;
        let timeout = ctx.opts.load_timeout(self.suite.load_timeout);
        let ask = EnsureAsk {
            models: &self.to_ask,
            timeout: timeout.map(|(t, _)| t),
            timeout_source: timeout.map_or("", |(_, source)| source.label()),
            headroom: self.suite.headroom_bytes,
            gpu_headroom: self.suite.gpu_headroom_bytes,
            fresh,
        };
        let asked_ms = client::now_unix_ms();
        let traceparent = ctx.traceparent(self.plan.try_id);
        let ensured = tokio::select! {
            _ = ctx.cancel.cancelled() => return Err(self.interrupted_all("interrupted while asking for the models")),
            r = self.agent.ensure(&self.held.lease, &ask, &traceparent) => r,
        };
        let barrier = match ensured {
            Ok(b) => b,
            Err(e) => return Err(self.ensure_failed(&e)),
        };
        let service = &self.suite.service;
        let settled = |v: &AgentView| {
            self.gone(v).is_some()
                || (v.last_seq + 1 >= barrier
                    && self
                        .to_ask
                        .iter()
                        .all(|m| v.models.get(&(service.clone(), m.clone())).is_some_and(|x| x.stage.is_terminal())))
        };
        let waited = tokio::select! {
            _ = ctx.cancel.cancelled() => Err(Stop::Interrupted),
            _ = self.held.ended.cancelled() => Err(Stop::Lost(format!("lease on {} ended", self.agent.name))),
            r = view.wait_for(settled) => match r {
                Ok(v) => match self.gone(&v) {
                    Some(reason) => Err(Stop::Lost(reason)),
                    None => Ok(v.clone()),
                },
                Err(_) => Err(Stop::Lost(format!("host {} lost: stopped following it", self.agent.name))),
            },
        };
        match waited {
            Ok(snapshot) => Ok((snapshot, asked_ms)),
            Err(Stop::Interrupted) => Err(self.interrupted_all("interrupted while waiting for models to load")),
            Err(Stop::Lost(reason)) => Err(TryOutcome {
                lost: Some(Lost { reason, sent: vec![], unsent: self.case_ids() }),
                ..Default::default()
            }),
        }
    }

    fn interrupted_all(&self, message: &str) -> TryOutcome {
        let results = self.case_ids().iter().map(|i| (*i, error_on(self.agent, message))).collect();
        TryOutcome { results, interrupted: true, ..Default::default() }
    }

    fn ensure_failed(&self, e: &client::ClientError) -> TryOutcome {
        match e.kind() {
            // The agent forgot our lease (it expired, or the agent restarted
            // between tries): not a lost host; plan again with a new lease.
            Failure::Stale => TryOutcome {
                retry: Some(retry(self.plan, format!("{}: {e}", self.agent.name), false)),
                drop_lease: true,
                ..Default::default()
            },
            Failure::NoRoom => TryOutcome {
                retry: Some(retry(self.plan, format!("{}: {e}", self.agent.name), true)),
                ..Default::default()
            },
            Failure::Lost => TryOutcome {
                lost: Some(Lost {
                    reason: format!("host {} lost: {e}", self.agent.name),
                    sent: vec![],
                    unsent: self.case_ids(),
                }),
                ..Default::default()
            },
            Failure::Busy | Failure::Refused => all_errors(self.plan, self.agent, &e.to_string()),
        }
    }

    /// Emits one `ModelSettled` per model asked for; returns the failed
    /// ones' messages, and records them as final for the run.
    fn settle_models(&self, snapshot: &AgentView, asked_ms: i64) -> BTreeMap<String, String> {
        let mut failed = BTreeMap::new();
        for m in &self.to_ask {
            let failure = match snapshot.models.get(&(self.suite.service.clone(), m.clone())) {
                Some(s) if s.stage == Stage::Ready => None,
                Some(s) if !s.message.is_empty() => Some(s.message.clone()),
                Some(s) => Some(format!("model {m} is {}", s.stage.label())),
                None => Some(format!("model {m} is unknown to agent {}", self.agent.name)),
            };
            let (stages, peak) = self.stages_since(snapshot, m, asked_ms);
            let settled_ms = stages.last().map_or(asked_ms, |s| s.end_unix_ms);
            let stage_peak = |f: fn(&StageSpan) -> u64| stages.iter().map(f).max().unwrap_or(0);
            let load = ModelLoad {
                host: self.agent.name.clone(),
                service: self.suite.service.clone(),
                model: m.clone(),
                failure: failure.clone(),
                waited: Duration::from_millis((settled_ms - asked_ms).max(0) as u64),
                reused: stages.is_empty(),
                peak_rss_bytes: peak.max(stage_peak(|s| s.peak_rss_bytes)),
                peak_gpu_bytes: stage_peak(|s| s.peak_gpu_bytes),
                stages: stages
                    .iter()
                    .map(|s| LoadStage {
                        stage: s.stage.label().to_owned(),
                        duration: Duration::from_millis((s.end_unix_ms - s.start_unix_ms).max(0) as u64),
                        peak_rss_bytes: s.peak_rss_bytes,
                        peak_gpu_bytes: s.peak_gpu_bytes,
                    })
                    .collect(),
            };
            self.ctx.events.send(RunEvent::ModelSettled {
                suite: self.plan.suite,
                try_id: self.plan.try_id,
                load,
                asked_unix_ms: asked_ms,
                stages,
                peak_rss_bytes: peak,
            });
            if let Some(f) = failure {
                self.ctx.load_failed(self.plan.host, &self.suite.service, m, &f);
                failed.insert(m.clone(), f);
            }
        }
        failed
    }

    /// The model's stage spans since `asked_ms` (our clock) and the service's
    /// peak memory meanwhile. Empty: it was already loaded.
    fn stages_since(&self, v: &AgentView, model: &str, asked_ms: i64) -> (Vec<StageSpan>, u64) {
        let asked_agent = asked_ms + self.agent.clock_offset_ms;
        let service = &self.suite.service;
        let all: Vec<&client::StageMark> =
            v.stage_log.iter().filter(|m| &m.service == service && m.model == model).collect();
        let timeline: Vec<(Stage, i64)> = all.iter().map(|m| (m.stage, m.time_unix_ms)).collect();
        let marks = &all[load_start(&timeline, asked_agent - 5)..];
        let asked_agent = marks.first().map_or(asked_agent, |m| m.time_unix_ms.min(asked_agent));
        let stages: Vec<StageSpan> = marks
            .windows(2)
            .map(|w| StageSpan {
                stage: w[0].stage,
                cause: w[0].cause.clone(),
                start_unix_ms: self.agent.local_ms(w[0].time_unix_ms),
                end_unix_ms: self.agent.local_ms(w[1].time_unix_ms),
                peak_rss_bytes: w[1].previous_peak.0,
                peak_gpu_bytes: w[1].previous_peak.1,
            })
            .collect();
        let end_agent = marks.last().map_or(asked_agent, |m| m.time_unix_ms);
        let peak = v
            .rss_log
            .iter()
            .filter(|(svc, t, _)| svc == service && *t >= asked_agent && *t <= end_agent)
            .map(|(_, _, rss)| *rss)
            .max()
            .unwrap_or(0);
        (stages, peak)
    }

    /// Sends the cases and waits for their results, the run's interrupt,
    /// the lease's end or the host's loss, whichever comes first.
    async fn run_and_collect(&self, view: watch::Receiver<AgentView>, cases: &[(usize, u32)], out: &mut TryOutcome) {
        if self.ctx.cancel.is_cancelled() {
            out.interrupted = true;
            return;
        }
        if let Some(ids) = self.send(cases, out).await {
            self.collect(view, cases, &ids, out).await;
        }
    }

    /// Sends the cases, each with its id for this attempt and its span id;
    /// `None` when the call failed (`out` says how).
    async fn send(&self, cases: &[(usize, u32)], out: &mut TryOutcome) -> Option<Vec<(usize, String)>> {
        let ctx = self.ctx;
        let ids: Vec<(usize, u32, String, SpanId)> = cases
            .iter()
            .map(|(i, a)| (*i, *a, format!("{}/{}/{i}/{a}", ctx.run_id, self.plan.suite), ctx.new_span_id()))
            .collect();
        let to_run = ids
            .iter()
            .map(|(i, attempt, id, span)| CaseToRun {
                id: id.clone(),
                attempt: *attempt,
                case: &self.suite.cases[*i],
                traceparent: ctx.traceparent(*span),
            })
            .collect();
        let sent: Vec<usize> = cases.iter().map(|(i, _)| *i).collect();
        let traceparent = ctx.traceparent(self.plan.try_id);
        let called = tokio::select! {
            _ = ctx.cancel.cancelled() => {
                out.interrupted = true;
                out.results.extend(sent.iter().map(|i| (*i, error_on(self.agent, "interrupted before the case finished"))));
                return None;
            }
            r = self.agent.run_cases(&self.held.lease, to_run, self.suite.parallel, &traceparent) => r,
        };
        if let Err(e) = called {
            match e.kind() {
                Failure::Lost | Failure::Stale => {
                    // Whether or not the agent got them, these cases go elsewhere;
                    // a late result under this attempt's ids is never taken.
                    let reason = format!("host {} lost: {e}", self.agent.name);
                    out.lost = Some(Lost { reason, sent, unsent: vec![] });
                }
                _ => out.results.extend(sent.iter().map(|i| (*i, error_on(self.agent, &e.to_string())))),
            }
            return None;
        }
        for (i, attempt, _, span) in &ids {
            let host = self.agent.name.clone();
            ctx.events.send(RunEvent::CaseStarted {
                suite: self.plan.suite,
                case: *i,
                attempt: *attempt,
                host,
                span: *span,
            });
        }
        Some(ids.into_iter().map(|(i, _, id, _)| (i, id)).collect())
    }

    /// Waits for the sent cases' results; what is missing at the end is
    /// lost (host or lease gone), interrupted, or overdue.
    async fn collect(
        &self,
        mut view: watch::Receiver<AgentView>,
        cases: &[(usize, u32)],
        ids: &[(usize, String)],
        out: &mut TryOutcome,
    ) {
        let ctx = self.ctx;
        let budget = cases.iter().map(|(i, _)| case_budget(&self.suite.cases[*i])).sum::<Duration>() + RESULT_SLACK;
        let deadline = Instant::now() + budget;
        let lease_ended = || Stop::Lost(format!("lease on {} ended before every case finished", self.agent.name));
        let ended = tokio::select! {
            _ = ctx.cancel.cancelled() => Some(Stop::Interrupted),
            _ = self.held.ended.cancelled() => Some(lease_ended()),
            _ = tokio::time::sleep_until(deadline) => None,
            r = self.stream_until(&mut view, ids) => r,
        };
        let mut missing = Vec::new();
        {
            // Read in place: the view holds every result of the run so far.
            let latest = view.borrow();
            for (i, id) in ids {
                match latest.results.get(id) {
                    Some(r) => out.results.push((*i, self.fenced(*i, r))),
                    None => missing.push(*i),
                }
            }
        }
        let message = match ended {
            Some(Stop::Lost(reason)) if !missing.is_empty() => {
                out.lost = Some(Lost { reason, sent: missing, unsent: vec![] });
                return;
            }
            Some(Stop::Interrupted) => {
                out.interrupted = true;
                "interrupted before the case finished".to_owned()
            }
            _ => format!("no result from agent {} within {}s", self.agent.name, budget.as_secs()),
        };
        out.results.extend(missing.iter().map(|i| (*i, error_on(self.agent, &message))));
    }

    /// Hands each result on as it arrives until all are in or the host is
    /// lost (then `Some`; `None` also when the view closed). Each
    /// change is read from where the last one ended (`arrived`), so a try of
    /// n cases costs O(n) in all, not O(n) per result.
    async fn stream_until(&self, view: &mut watch::Receiver<AgentView>, ids: &[(usize, String)]) -> Option<Stop> {
        let mine: HashMap<&str, usize> = ids.iter().enumerate().map(|(n, (_, id))| (id.as_str(), n)).collect();
        let mut told = vec![false; ids.len()];
        let (mut read, mut left) = (0, ids.len());
        loop {
            let (arrived, finished) = {
                let v = view.wait_for(|v| v.arrived.len() > read || left == 0 || self.gone(v).is_some()).await.ok()?;
                let mut arrived = Vec::new();
                for id in &v.arrived[read.min(v.arrived.len())..] {
                    if let (Some(&n), Some(r)) = (mine.get(id.as_str()), v.results.get(id))
                        && !told[n]
                    {
                        arrived.push((n, ids[n].0, self.fenced(ids[n].0, r)));
                    }
                }
                read = v.arrived.len();
                left -= arrived.len();
                let lost = self.gone(&v);
                (arrived, (left == 0 || lost.is_some()).then_some(lost))
            };
            for (n, i, report) in arrived {
                told[n] = true;
                if let Some(early) = &self.plan.early {
                    let _ = early.send((self.plan.try_id, i, report));
                }
            }
            if let Some(gone) = finished {
                return gone.map(Stop::Lost);
            }
        }
    }

    /// Fencing: a result under another lease epoch is never merged. Times
    /// become ours here, at the edge.
    fn fenced(&self, i: usize, r: &CaseReport) -> CaseReport {
        match fence(r.lease_epoch, self.held.lease.epoch) {
            Ok(()) => {
                let started = if r.started_unix_ms > 0 { self.agent.local_ms(r.started_unix_ms) } else { 0 };
                let method = self.suite.cases[i].request.method.clone();
                let mut report =
                    CaseReport { host: self.agent.name.clone(), started_unix_ms: started, method, ..r.clone() };
                if self.ctx.opts.fail_on_skip {
                    fail_on_skip(&mut report);
                }
                report
            }
            Err(why) => error_on(self.agent, &why),
        }
    }
}

/// A result counts only under the epoch of the lease this try holds: the
/// case id alone (run, suite, case, attempt) cannot tell a late answer from
/// an earlier lease of the same run apart.
fn fence(result_epoch: u64, held_epoch: u64) -> Result<(), String> {
    if result_epoch == held_epoch {
        Ok(())
    } else {
        Err(format!("result rejected: it came under lease epoch {result_epoch}, this run holds epoch {held_epoch}"))
    }
}

/// Where the load a run waited for begins in a model's stage marks (stage
/// entered, agent time; oldest first), asked at `asked`: a load already
/// under way then began before the ask — at the mark that left rest
/// (STOPPED, READY, FAILED, or nothing before it) — and all of it is the
/// run's to report; otherwise its marks start at the ask.
pub fn load_start(marks: &[(Stage, i64)], asked: i64) -> usize {
    let after = marks.iter().position(|(_, t)| *t >= asked).unwrap_or(marks.len());
    let Some(last_before) = after.checked_sub(1) else { return after };
    if !Stage::LOADING.contains(&marks[last_before].0) {
        return after;
    }
    let at_rest = |s: Stage| matches!(s, Stage::Stopped | Stage::Ready | Stage::Failed);
    (1..=last_before).rev().find(|&i| at_rest(marks[i - 1].0)).unwrap_or(0)
}

#[cfg(test)]
mod fencing {
    use super::fence;

    #[test]
    fn a_result_with_the_right_case_id_under_another_epoch_is_rejected() {
        // (result epoch, held epoch) → accepted
        for (result, held, ok) in [(3, 3, true), (2, 3, false), (4, 3, false), (0, 1, false)] {
            assert_eq!(fence(result, held).is_ok(), ok, "result {result}, held {held}");
        }
        assert_eq!(fence(2, 3).unwrap_err(), "result rejected: it came under lease epoch 2, this run holds epoch 3");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (stage entered, agent time)
    type Mark = (Stage, i64);

    #[test]
    fn a_load_under_way_at_the_ask_is_reported_from_its_real_start() {
        use Stage::{Downloading as D, LoadingWeights as L, ProcessStarting as P, Ready as R, WaitingForHttp as W};
        let first_load = [(P, 10), (W, 20), (D, 30), (L, 40), (R, 50)];
        let reload = [(P, 10), (W, 20), (R, 50), (Stage::Stopped, 60), (P, 70), (W, 80), (L, 90), (R, 99)];
        // (marks, asked) -> index of the first mark of the run's load
        let table: [(&[Mark], i64, usize); 8] = [
            (&first_load, 5, 0),  // asked before it began: from the start
            (&first_load, 35, 0), // asked mid-load: still from the start
            (&first_load, 45, 0), // asked in its last stage
            (&first_load, 55, 5), // asked once READY: nothing (reused)
            (&reload, 85, 4),     // the second load, not the first
            (&reload, 55, 3),     // at rest after READY: the marks after the ask
            (&[], 10, 0),         // nothing known
            (&[(L, 40)], 45, 0),  // only part of the load known: all of it
        ];
        for (marks, asked, want) in table {
            assert_eq!(load_start(marks, asked), want, "{marks:?} asked at {asked}");
        }
    }
}
