//! One suite from start to finish: plan where its pending cases go, wait
//! (saying why) when no host is free, send tries, and book what each try
//! brings back in the suite's `CaseBook` until every case has a result.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::SpanId;
use tokio::sync::mpsc;
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;

use super::Ctx;
use super::casebook::{CaseBook, OnLost};
use super::events::RunEvent;
use super::host::{self, TryOutcome, TryPlan};
use super::leases::Claim;
use crate::report::CaseReport;
use crate::scheduler::{self, Need, Plan};
use crate::suite::{self, Suite};

/// How often a waiting suite looks again.
const REPLAN_EVERY: Duration = Duration::from_secs(1);
/// A suite still waiting for the same reasons says so again this often.
const SAY_WAITING_EVERY: Duration = Duration::from_secs(10);
/// An agent refusing a load the planner thought would fit, this many times
/// in a row, ends the suite with the agent's message.
const MAX_REFUSALS: u32 = 3;

fn need(ctx: &Ctx, suite: &Suite) -> Need {
    Need {
        service: suite.service.clone(),
        models: suite.models.clone(),
        headroom: suite.headroom_bytes,
        gpu_headroom: suite.gpu_headroom_bytes,
        labels: suite.labels.clone(),
        fresh: suite.fresh || ctx.opts.fresh,
        shard: match suite.shard {
            None => scheduler::Shard::One,
            Some(suite::Shard::Count(n)) => scheduler::Shard::Count(n),
            Some(suite::Shard::Auto) => scheduler::Shard::Auto,
        },
    }
}

/// A result a try hands on as it arrives: (try, case, report).
type Early = (SpanId, usize, CaseReport);

/// The state of one suite's loop.
struct SuiteRun<'a> {
    ctx: &'a Arc<Ctx>,
    index: usize,
    suite: &'a Suite,
    book: CaseBook,
    tries: JoinSet<(SpanId, TryOutcome)>,
    in_flight: BTreeMap<Id, Vec<usize>>,
    waiting_since: Option<Instant>,
    last_reasons: Vec<String>,
    last_said: Option<Instant>,
    /// After a try came back (busy, refused), when to plan again.
    retry_at: Option<Instant>,
    refusals: u32,
    /// Results the tries hand on as they arrive: (try, case, report).
    early: (mpsc::UnboundedSender<Early>, mpsc::UnboundedReceiver<Early>),
    /// Changes when another suite of the run passes its turn on a service.
    freed: tokio::sync::watch::Receiver<u64>,
}

/// Places and runs one suite until every case has a result.
pub async fn run_suite(ctx: Arc<Ctx>, index: usize, suite: Suite) {
    let names = suite.cases.iter().map(|c| c.name.clone());
    let mut run = SuiteRun {
        ctx: &ctx,
        index,
        suite: &suite,
        book: CaseBook::new(&suite.name, names),
        tries: JoinSet::new(),
        in_flight: BTreeMap::new(),
        waiting_since: None,
        last_reasons: Vec::new(),
        last_said: None,
        retry_at: None,
        refusals: 0,
        early: mpsc::unbounded_channel(),
        freed: ctx.leases.freed(),
    };
    run.drive().await;
    ctx.events.send(RunEvent::SuiteFinished { suite: index });
}

impl SuiteRun<'_> {
    async fn drive(&mut self) {
        loop {
            if self.ctx.cancel.is_cancelled() {
                self.drain().await;
                self.fill("interrupted before the case ran");
                return;
            }
            let pending = self.book.pending();
            if pending.is_empty() && self.tries.is_empty() {
                self.fill("no result: the run ended before this case ran");
                return;
            }
            // A turn passed on from here on wakes the wait below.
            self.freed.borrow_and_update();
            let pause = self.retry_at.filter(|at| *at > Instant::now());
            let must_wait = !pending.is_empty() && (pause.is_some() || !self.place(&pending).await);
            if !must_wait && self.tries.is_empty() {
                continue; // settled without a try (unsatisfiable, gave up): look again
            }
            let wake = pause.unwrap_or_else(|| Instant::now() + REPLAN_EVERY);
            self.until_next(wake, must_wait).await;
        }
    }

    /// Until a try ends, the pause is over or the run is interrupted; the
    /// results tries hand on meanwhile are recorded as they come, without
    /// planning again for each.
    async fn until_next(&mut self, wake: Instant, must_wait: bool) {
        loop {
            tokio::select! {
                Some((try_id, case, report)) = self.early.1.recv() => self.finish(case, report, Some(try_id)),
                Some(joined) = self.tries.join_next_with_id(), if !self.tries.is_empty() => return self.joined(joined),
                _ = tokio::time::sleep_until(wake), if must_wait => return,
                Ok(()) = self.freed.changed(), if must_wait => {
                    self.retry_at = None; // the turn it waited for may be free now
                    return;
                }
                _ = self.ctx.cancel.cancelled() => return,
            }
        }
    }

    /// Plans the pending cases; true if they were placed (or settled).
    async fn place(&mut self, pending: &[usize]) -> bool {
        let mut hosts = self.ctx.host_views().await;
        let need = need(self.ctx, self.suite);
        let service = &self.suite.service;
        // Plan on this run's current placements and claim at once, so suites
        // planning at the same moment spread instead of piling up.
        let placing = self.ctx.leases.placing();
        for (i, host) in hosts.iter_mut().enumerate() {
            host.own_queue = self.ctx.leases.claims(i, service);
        }
        let plan = scheduler::plan::plan(&need, pending.len(), &hosts, &self.ctx.run_id);
        if let Plan::Place(assignments) = &plan {
            self.waiting_since = None;
            for a in assignments {
                let cases: Vec<usize> = a.cases.iter().map(|i| pending[*i]).collect();
                let claim = self.ctx.leases.claim(a.host, service);
                self.spawn_try(a.host, cases, claim);
            }
        }
        drop(placing);
        match plan {
            Plan::Place(_) => true,
            Plan::Wait { reasons, only_lost } => self.wait(reasons, only_lost),
            Plan::Unsatisfiable(why) => {
                let text =
                    format!("unsatisfiable: no host could ever run suite {}:\n  {}", self.suite.name, why.join("\n  "));
                self.ctx.events.send(RunEvent::GaveUpWaiting { suite: self.index, reason: text.clone() });
                // Only what waits: cases a try is running keep their try.
                for i in self.book.pending() {
                    self.finish(i, CaseReport::error("", "", text.clone()), None);
                }
                true
            }
        }
    }

    /// Announces why the suite waits: when the reasons change, and again
    /// every `SAY_WAITING_EVERY` while they do not.
    fn say_waiting(&mut self, reasons: Vec<String>) {
        let due = self.last_said.is_none_or(|at| at.elapsed() >= SAY_WAITING_EVERY);
        if reasons != self.last_reasons || due {
            self.ctx.events.send(RunEvent::Waiting { suite: self.index, reasons: reasons.clone() });
            self.last_reasons = reasons;
            self.last_said = Some(Instant::now());
        }
    }

    /// Says why it waits (when that changes) and gives up past the limits:
    /// `--max-wait` (or the suite's `max_wait`) for any reason, the
    /// reconnect grace when the only hosts that could run it are lost.
    fn wait(&mut self, reasons: Vec<String>, only_lost: bool) -> bool {
        let since = *self.waiting_since.get_or_insert_with(Instant::now);
        self.say_waiting(reasons.clone());
        let waited = since.elapsed();
        let limit = self.suite.max_wait.or(self.ctx.opts.max_wait);
        let why = if only_lost && waited > self.ctx.opts.reconnect_grace {
            format!("no host to run on: every host that could is lost, waited {:.0}s", waited.as_secs_f64())
        } else if let Some(limit) = limit.filter(|l| waited > *l) {
            format!(
                "gave up waiting for a host after {:.0}s (max wait {})",
                waited.as_secs_f64(),
                suite::format_duration(limit)
            )
        } else {
            return false;
        };
        let text = format!("{why}:\n  {}", reasons.join("\n  "));
        self.ctx.events.send(RunEvent::GaveUpWaiting { suite: self.index, reason: text.clone() });
        for i in self.book.pending() {
            self.finish(i, CaseReport::error("", "", text.clone()), None);
        }
        true
    }

    fn spawn_try(&mut self, host: usize, cases: Vec<usize>, claim: Claim) {
        let plan = TryPlan {
            suite: self.index,
            host,
            cases: cases.iter().map(|i| (*i, self.book.attempt(*i))).collect(),
            try_id: self.ctx.new_span_id(),
            early: None,
        };
        self.book.dispatch(&cases);
        let slot = &self.ctx.hosts[host];
        self.ctx.events.send(RunEvent::Placed {
            suite: self.index,
            try_id: plan.try_id,
            host: slot.entry.name.clone(),
            addr: slot.entry.address.clone(),
            cases: cases.clone(),
        });
        let (ctx, suite) = (self.ctx.clone(), self.suite.clone());
        let plan = TryPlan { early: Some(self.early.0.clone()), ..plan };
        let handle = self.tries.spawn(async move {
            let _claim = claim; // counted until the try ends
            let try_id = plan.try_id;
            let outcome = host::run_try(&ctx, &suite, plan).await;
            let failure =
                outcome.lost.as_ref().map(|l| l.reason.clone()).or(outcome.retry.as_ref().map(|r| r.reason.clone()));
            ctx.events.send(RunEvent::TryEnded { try_id, failure });
            (try_id, outcome)
        });
        self.in_flight.insert(handle.id(), cases);
    }

    fn joined(&mut self, joined: Result<(Id, (SpanId, TryOutcome)), tokio::task::JoinError>) {
        match joined {
            Ok((id, (try_id, outcome))) => {
                let cases = self.in_flight.remove(&id).unwrap_or_default();
                self.book_outcome(try_id, cases, outcome);
            }
            Err(e) => {
                // A try that panicked never loses its cases: they become errors.
                let cases = self.in_flight.remove(&e.id()).unwrap_or_default();
                let message = format!("internal error: the try running this case failed: {e}");
                for i in cases {
                    self.finish(i, CaseReport::error("", "", message.clone()), None);
                }
            }
        }
    }

    fn book_outcome(&mut self, try_id: SpanId, cases: Vec<usize>, outcome: TryOutcome) {
        for (i, report) in outcome.results {
            self.finish(i, report, Some(try_id));
        }
        if let Some(lost) = outcome.lost {
            let sent = lost.sent.iter().map(|i| (*i, true));
            for (i, was_sent) in sent.chain(lost.unsent.iter().map(|i| (*i, false))) {
                self.lose(try_id, i, was_sent, &lost.reason);
            }
        }
        match outcome.retry {
            Some(retry) => {
                self.refusals = if retry.refused { self.refusals + 1 } else { 0 };
                if self.refusals >= MAX_REFUSALS {
                    for i in &retry.cases {
                        self.finish(*i, CaseReport::error("", "", retry.reason.clone()), None);
                    }
                } else {
                    // Back to waiting: plan again after a pause, counted in the wait.
                    self.book.returned(&retry.cases);
                    self.retry_at = Some(Instant::now() + REPLAN_EVERY);
                    self.waiting_since.get_or_insert_with(Instant::now);
                    self.say_waiting(vec![retry.reason]);
                }
            }
            None => self.refusals = 0,
        }
        // Whatever the try did not account for goes back to the planner.
        self.book.returned(&cases);
    }

    fn lose(&mut self, try_id: SpanId, case: usize, sent: bool, reason: &str) {
        let attempt = self.book.attempt(case);
        // Interrupted runs start nothing new: a lost case is then just unfinished.
        if self.ctx.cancel.is_cancelled() {
            let message = if sent { "interrupted before the case finished" } else { "interrupted before the case ran" };
            self.finish(case, CaseReport::error("", "", message.into()), None);
            return;
        }
        let decision = self.book.lose(case, sent, reason);
        if let OnLost::GiveUp = decision
            && let Some(report) = self.book.result(case).cloned()
        {
            self.ctx.events.send(self.finished(case, report, None));
        }
        self.ctx.events.send(RunEvent::CaseLost {
            suite: self.index,
            case,
            try_id,
            attempt,
            reason: reason.to_owned(),
            requeued: matches!(decision, OnLost::Requeue { .. }),
        });
    }

    fn finish(&mut self, case: usize, report: CaseReport, try_id: Option<SpanId>) {
        if let Some(r) = self.book.finish(case, report).cloned() {
            self.ctx.events.send(self.finished(case, r, try_id));
        }
    }

    fn finished(&self, case: usize, report: CaseReport, try_id: Option<SpanId>) -> RunEvent {
        RunEvent::CaseFinished { suite: self.index, case, try_id, report }
    }

    fn fill(&mut self, message: &str) {
        for i in self.book.fill_unfinished(message) {
            if let Some(r) = self.book.result(i).cloned() {
                self.ctx.events.send(self.finished(i, r, None));
            }
        }
    }

    /// After an interrupt: the tries stop promptly; keep what they bring.
    async fn drain(&mut self) {
        while let Some(joined) = self.tries.join_next_with_id().await {
            self.joined(joined);
        }
    }
}
