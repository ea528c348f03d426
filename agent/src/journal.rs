//! The journal: the agent's one ordered record of what happened, stamped
//! `(incarnation, seq)`, and the owner of the state derived from it (the
//! snapshot every watch opens with) and of the lease table. A lease that runs
//! out is dropped and announced as released when it expires, not when someone
//! next looks, so watchers never see a dead lease as held.
//!
//! Stage changes and case results are retained until acknowledged, so a
//! watcher that reconnects never loses them; logs and telemetry live only in a
//! bounded ring and may be reported as a `Gap`. A watcher that cannot keep up
//! is disconnected (never blocking producers) and resumes from its last seq.
//!
//! The journal stores `proto` events verbatim: it *is* the stream the wire
//! carries, so converting to a parallel domain type would add nothing.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use prost::Message;
use proto::{Event, ExitStatus, HostMemory, ModelState, ServiceState, Snapshot, WatchMessage, event, watch_message};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::lease::{Grant, LeaseClaim, LeaseError, LeaseTable};

/// How many events the ring keeps for replay (retained events are extra).
pub const RING_CAPACITY: usize = 8192;
/// A watcher this far behind is disconnected and must resume.
pub const WATCHER_BUFFER: usize = 4096;
/// Retained events (stage changes, exits, case results) kept for controllers
/// that have not acknowledged them — bounded, so controllers that die without
/// acking cannot grow the agent without end. The oldest go first, and a
/// replay over them shows a `Gap`.
pub const RETAINED_MAX_EVENTS: usize = 50_000;
pub const RETAINED_MAX_BYTES: usize = 64 * 1024 * 1024;
/// No event is larger than this: its long text fields are cut to fit, so one
/// event can never exceed a watcher's decode limit.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A watch as it opens: the snapshot, the replayed events, then live ones.
#[derive(Debug)]
pub struct Subscription {
    pub snapshot: Snapshot,
    pub backlog: Vec<WatchMessage>,
    pub live: mpsc::Receiver<WatchMessage>,
}

enum Command {
    Append(Box<event::Kind>),
    Subscribe {
        from_seq: u64,
        reply: oneshot::Sender<Subscription>,
    },
    Snapshot {
        reply: oneshot::Sender<Snapshot>,
    },
    Acquire {
        service: String,
        run_id: String,
        holder: String,
        owner: String,
        ttl: Duration,
        reply: oneshot::Sender<Result<Grant, LeaseError>>,
    },
    Renew {
        claim: LeaseClaim,
        reply: oneshot::Sender<Result<Grant, LeaseError>>,
    },
    Release {
        claim: LeaseClaim,
        reply: oneshot::Sender<Result<Grant, LeaseError>>,
    },
    Check {
        claim: LeaseClaim,
        reply: oneshot::Sender<Result<Grant, LeaseError>>,
    },
    FetchRetained {
        run_id: String,
        caller: String,
        from_seq: u64,
        reply: oneshot::Sender<Result<Vec<Event>, LeaseError>>,
    },
    Ack {
        run_id: String,
        caller: String,
        up_to_seq: u64,
        reply: oneshot::Sender<Result<u32, LeaseError>>,
    },
    NextSeq {
        reply: oneshot::Sender<u64>,
    },
}

/// Cloneable handle to the journal actor.
#[derive(Clone, Debug)]
pub struct Journal {
    tx: mpsc::UnboundedSender<Command>,
    incarnation: String,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("journal::Command")
    }
}

/// The journal actor stopped: only during shutdown.
#[derive(Debug, thiserror::Error)]
#[error("the agent is shutting down")]
pub struct Closed;

impl Journal {
    /// Starts the actor. `services` seeds the snapshot with configured
    /// services and models (all `STOPPED`).
    pub fn start(incarnation: String, services: &[(String, Vec<String>)]) -> Journal {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = State { incarnation: incarnation.clone(), next_seq: 1, ..State::default() };
        for (name, models) in services {
            state.services.insert(
                name.clone(),
                ServiceState {
                    name: name.clone(),
                    models: models
                        .iter()
                        .map(|m| ModelState {
                            name: m.clone(),
                            stage: proto::Stage::Stopped.into(),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                },
            );
        }
        tokio::spawn(run(state, rx));
        Journal { tx, incarnation }
    }

    pub fn incarnation(&self) -> &str {
        &self.incarnation
    }

    /// Records an event. Never blocks.
    pub fn append(&self, kind: event::Kind) {
        let _ = self.tx.send(Command::Append(Box::new(kind)));
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Closed> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| Closed)?;
        rx.await.map_err(|_| Closed)
    }

    pub async fn subscribe(&self, from_seq: u64) -> Result<Subscription, Closed> {
        self.ask(|reply| Command::Subscribe { from_seq, reply }).await
    }

    /// The current snapshot. Its `next_seq` is past every event appended
    /// through this handle before the call.
    pub async fn snapshot(&self) -> Result<Snapshot, Closed> {
        self.ask(|reply| Command::Snapshot { reply }).await
    }

    /// `owner`: who asks (their certificate or token name); only they may
    /// use the lease and their run's retained events.
    pub async fn acquire(
        &self,
        service: String,
        (run_id, holder, owner): (String, String, String),
        ttl: Duration,
    ) -> Result<Result<Grant, LeaseError>, Closed> {
        self.ask(|reply| Command::Acquire { service, run_id, holder, owner, ttl, reply }).await
    }

    /// Extends the lease by the TTL it was granted with.
    pub async fn renew(&self, claim: LeaseClaim) -> Result<Result<Grant, LeaseError>, Closed> {
        self.ask(|reply| Command::Renew { claim, reply }).await
    }

    pub async fn release(&self, claim: LeaseClaim) -> Result<Result<Grant, LeaseError>, Closed> {
        self.ask(|reply| Command::Release { claim, reply }).await
    }

    pub async fn check(&self, claim: LeaseClaim) -> Result<Result<Grant, LeaseError>, Closed> {
        self.ask(|reply| Command::Check { claim, reply }).await
    }

    /// Retained events from `from_seq`: case results only of `run_id`,
    /// which must be the caller's own run.
    pub async fn fetch_retained(
        &self,
        run_id: String,
        caller: String,
        from_seq: u64,
    ) -> Result<Result<Vec<Event>, LeaseError>, Closed> {
        self.ask(|reply| Command::FetchRetained { run_id, caller, from_seq, reply }).await
    }

    /// Releases retained events up to `up_to_seq`: case results only of
    /// `run_id` (the caller's own run), stage changes and exits of any run.
    pub async fn ack(&self, run_id: String, caller: String, up_to_seq: u64) -> Result<Result<u32, LeaseError>, Closed> {
        self.ask(|reply| Command::Ack { run_id, caller, up_to_seq, reply }).await
    }

    /// The seq the next event will carry: past every event appended through
    /// this handle before the call. Cheaper than a snapshot.
    pub async fn next_seq(&self) -> Result<u64, Closed> {
        self.ask(|reply| Command::NextSeq { reply }).await
    }
}

#[derive(Default)]
struct State {
    incarnation: String,
    next_seq: u64,
    ring: VecDeque<Event>,
    /// Highest seq evicted from the ring, if any.
    evicted_up_to: Option<u64>,
    retained: BTreeMap<u64, Event>,
    /// Encoded size of `retained`.
    retained_bytes: usize,
    watchers: Vec<mpsc::Sender<WatchMessage>>,
    services: BTreeMap<String, ServiceState>,
    host: HostMemory,
    heartbeat_unix_ms: i64,
    leases: LeaseTable,
    /// The host's GPUs as last sampled.
    gpus: Vec<proto::GpuDevice>,
    /// Who took a lease for each recent run: only they may fetch or
    /// acknowledge its results.
    owners: RunOwners,
}

/// Run id → the identity that leased for it, the most recent runs only.
#[derive(Debug, Default)]
struct RunOwners {
    runs: VecDeque<(String, String)>,
}

/// Runs whose owner is remembered (older ones' results are long acked or
/// dropped by the retention caps).
const OWNED_RUNS: usize = 4096;

impl RunOwners {
    fn of(&self, run_id: &str) -> Option<&str> {
        self.runs.iter().rev().find(|(r, _)| r == run_id).map(|(_, o)| o.as_str())
    }

    fn remember(&mut self, run_id: &str, owner: &str) {
        if self.of(run_id).is_some() {
            return;
        }
        if self.runs.len() == OWNED_RUNS {
            self.runs.pop_front();
        }
        self.runs.push_back((run_id.to_owned(), owner.to_owned()));
    }
}

async fn run(mut state: State, mut rx: mpsc::UnboundedReceiver<Command>) {
    // Fires when the earliest held lease expires; disarmed while none is held,
    // and moved only when that instant changes (not on every command).
    let timer = tokio::time::sleep_until(Instant::now());
    tokio::pin!(timer);
    let mut armed = None;
    loop {
        let next = state.leases.next_expiry();
        if next != armed {
            if let Some(at) = next {
                timer.as_mut().reset(at);
            }
            armed = next;
        }
        let cmd = tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(cmd) => Some(cmd),
                None => break,
            },
            () = &mut timer, if armed.is_some() => {
                armed = None;
                None
            }
        };
        // Expired leases are announced before any command is handled, at the
        // same `now`, so an acquire never takes over a lease whose end the
        // watchers have not yet been told.
        let now = Instant::now();
        state.expire_leases(now);
        if let Some(cmd) = cmd {
            handle(&mut state, cmd, now);
        }
    }
}

fn handle(state: &mut State, cmd: Command, now: Instant) {
    match cmd {
        Command::Append(kind) => state.append(*kind),
        Command::Subscribe { from_seq, reply } => {
            let (tx, live) = mpsc::channel(WATCHER_BUFFER);
            let sub = Subscription { snapshot: state.snapshot(), backlog: state.backlog(from_seq), live };
            if reply.send(sub).is_ok() {
                state.watchers.push(tx);
            }
        }
        Command::Snapshot { reply } => {
            let _ = reply.send(state.snapshot());
        }
        Command::Acquire { service, run_id, holder, owner, ttl, reply } => {
            let result = if state.services.contains_key(&service) {
                state
                    .run_owned_by(&run_id, &owner)
                    .and_then(|()| state.leases.acquire(&service, (&run_id, &holder, &owner), ttl, now, now_unix_ms()))
            } else {
                Err(LeaseError::UnknownService(service))
            };
            if let Ok(g) = &result {
                state.owners.remember(&g.run_id, &g.owner);
                state.lease_changed(g, false);
            }
            let _ = reply.send(result);
        }
        Command::Renew { claim, reply } => {
            let result = state.leases.renew(&claim, now, now_unix_ms());
            if let Ok(g) = &result {
                // Watchers learn the new expiry, so nobody mistakes it for expired.
                state.lease_changed(g, false);
            }
            let _ = reply.send(result);
        }
        Command::Release { claim, reply } => {
            let result = state.leases.release(&claim, now);
            if let Ok(g) = &result {
                state.lease_changed(g, true);
            }
            let _ = reply.send(result);
        }
        Command::Check { claim, reply } => {
            let _ = reply.send(state.leases.check(&claim, now).cloned());
        }
        Command::FetchRetained { run_id, caller, from_seq, reply } => {
            let result = state.run_owned_by(&run_id, &caller).map(|()| state.fetch_retained(&run_id, from_seq));
            let _ = reply.send(result);
        }
        Command::Ack { run_id, caller, up_to_seq, reply } => {
            let result = state.run_owned_by(&run_id, &caller).map(|()| state.ack(&run_id, up_to_seq));
            let _ = reply.send(result);
        }
        Command::NextSeq { reply } => {
            let _ = reply.send(state.next_seq);
        }
    }
}

pub fn grant_to_proto(g: &Grant) -> proto::Lease {
    proto::Lease {
        id: g.id.clone(),
        epoch: g.epoch,
        service: g.service.clone(),
        run_id: g.run_id.clone(),
        holder: g.holder.clone(),
        granted_unix_ms: g.granted_unix_ms,
        expires_unix_ms: g.expires_unix_ms,
    }
}

/// A lease as watchers see it: everything but its id. The id is the
/// holder's proof (every state-changing call carries it), so it goes only to
/// the caller that was granted it, never to observers.
fn public_lease(g: &Grant) -> proto::Lease {
    proto::Lease { id: String::new(), ..grant_to_proto(g) }
}

/// Stage transitions, exits and case results outlive the ring until
/// acknowledged. Progress-only updates (same stage, new percentage) are like
/// telemetry: the ring and the snapshot carry them.
fn is_retained(kind: &event::Kind) -> bool {
    match kind {
        event::Kind::StageChanged(c) => c.from != c.to,
        event::Kind::CaseFinished(_) | event::Kind::ServiceExited(_) => true,
        _ => false,
    }
}

/// Stages one load may enter that a snapshot keeps (a load passes through
/// at most the seven stages; restarts within a load add a few).
const LOAD_HISTORY_CAP: usize = 32;

/// Adds a stage change to a model's load history; a load that starts from
/// rest (STOPPED, READY or FAILED) starts a new history.
fn remember_stage(history: &mut Vec<proto::StageEntered>, c: &proto::StageChanged, now: i64) {
    let from_rest = matches!(c.from(), proto::Stage::Stopped | proto::Stage::Ready | proto::Stage::Failed);
    if from_rest && proto::Stage::LOADING.contains(&c.to()) {
        history.clear();
    }
    if history.len() == LOAD_HISTORY_CAP {
        history.remove(0);
    }
    history.push(proto::StageEntered {
        stage: c.to,
        cause: c.cause.clone(),
        at_unix_ms: now,
        ended_peak_rss_bytes: c.stage_peak_rss_bytes,
        ended_peak_gpu_bytes: c.stage_peak_gpu_bytes,
    });
}

impl State {
    fn append(&mut self, mut kind: event::Kind) {
        let now = now_unix_ms();
        self.apply(&kind, now);
        let retained = is_retained(&kind);
        fit(&mut kind, MAX_EVENT_BYTES);
        let event =
            Event { incarnation: self.incarnation.clone(), seq: self.next_seq, time_unix_ms: now, kind: Some(kind) };
        self.next_seq += 1;
        if retained {
            self.retain(event.clone());
        }
        let message = WatchMessage { kind: Some(watch_message::Kind::Event(event.clone())) };
        // A watcher that is full or gone is dropped; it resumes from its last seq.
        self.watchers.retain(|w| w.try_send(message.clone()).is_ok());
        if self.ring.len() == RING_CAPACITY {
            let old = self.ring.pop_front().expect("full ring");
            self.evicted_up_to = Some(old.seq);
        }
        self.ring.push_back(event);
    }

    /// Tells watchers a lease was granted or renewed (`released: false`), or
    /// that it ended: released by its holder or expired.
    fn lease_changed(&mut self, g: &Grant, released: bool) {
        self.append(event::Kind::LeaseChanged(proto::LeaseChanged { lease: Some(public_lease(g)), released }));
    }

    /// Drops the leases expired by `now` and announces each one's end, so
    /// watchers stop seeing them held.
    fn expire_leases(&mut self, now: Instant) {
        for g in self.leases.expire(now) {
            tracing::info!(service = %g.service, run_id = %g.run_id, epoch = g.epoch, "lease expired");
            self.lease_changed(&g, true);
        }
    }

    /// A run belongs to whoever first leased for it; a run nobody leased
    /// for is anyone's (there is nothing of it to see).
    fn run_owned_by(&self, run_id: &str, caller: &str) -> Result<(), LeaseError> {
        match self.owners.of(run_id) {
            Some(owner) if owner != caller => Err(LeaseError::NotYours {
                service: "(any)".into(),
                run_id: run_id.to_owned(),
                owner: owner.to_owned(),
            }),
            _ => Ok(()),
        }
    }

    fn fetch_retained(&self, run_id: &str, from_seq: u64) -> Vec<Event> {
        self.retained
            .range(from_seq..)
            .map(|(_, e)| e)
            .filter(|e| match &e.kind {
                Some(event::Kind::CaseFinished(c)) => run_id.is_empty() || c.run_id == run_id,
                _ => true,
            })
            .cloned()
            .collect()
    }

    /// Releases retained events up to `up_to_seq`; returns how many.
    fn ack(&mut self, run_id: &str, up_to_seq: u64) -> u32 {
        let before = self.retained.len();
        // Another run's results stay until that run acknowledges them:
        // it may still need to fetch them after a reconnect.
        self.retained.retain(|seq, e| {
            *seq > up_to_seq
                || matches!(&e.kind, Some(event::Kind::CaseFinished(c)) if !run_id.is_empty() && c.run_id != run_id)
        });
        self.retained_bytes = self.retained.values().map(Message::encoded_len).sum();
        (before - self.retained.len()) as u32
    }

    /// Keeps an event until acknowledged, dropping the oldest past the caps.
    fn retain(&mut self, event: Event) {
        self.retained_bytes += event.encoded_len();
        self.retained.insert(event.seq, event);
        let mut dropped = 0;
        while self.retained.len() > RETAINED_MAX_EVENTS || self.retained_bytes > RETAINED_MAX_BYTES {
            let Some((_, old)) = self.retained.pop_first() else { break };
            self.retained_bytes -= old.encoded_len();
            dropped += 1;
        }
        if dropped > 0 {
            tracing::warn!(dropped, "retained events over their cap: the oldest unacknowledged ones are dropped");
        }
    }

    /// Folds an event into the derived state.
    fn apply(&mut self, kind: &event::Kind, now: i64) {
        match kind {
            event::Kind::StageChanged(c) => {
                if let Some(model) = self.model_mut(&c.service, &c.model) {
                    model.stage = c.to;
                    model.progress = c.progress;
                    model.message = c.message.clone();
                    if c.from != c.to {
                        model.stage_since_unix_ms = now;
                        (model.usual_stage_ms, model.usual_rest_ms) = (c.usual_stage_ms, c.usual_rest_ms);
                        remember_stage(&mut model.load_history, c, now);
                    }
                }
            }
            event::Kind::ServiceStarted(s) => {
                if let Some(svc) = self.services.get_mut(&s.service) {
                    svc.running = true;
                    svc.pid = s.pid;
                    svc.gpus.clone_from(&s.gpus);
                    svc.peak_rss_bytes = 0;
                    svc.peak_gpu_bytes = 0;
                }
            }
            event::Kind::ServiceExited(s) => {
                if let Some(svc) = self.services.get_mut(&s.service) {
                    svc.running = false;
                    svc.pid = 0;
                    svc.gpus.clear();
                    svc.rss_bytes = 0;
                    svc.gpu_bytes = 0;
                    svc.cgroup_bytes = 0;
                    svc.last_exit = s.exit.or(Some(ExitStatus::default()));
                }
            }
            event::Kind::Telemetry(t) => {
                self.heartbeat_unix_ms = now;
                if let Some(host) = t.host {
                    self.host = host;
                }
                for m in &t.services {
                    if let Some(svc) = self.services.get_mut(&m.service) {
                        svc.rss_bytes = m.rss_bytes;
                        svc.peak_rss_bytes = svc.peak_rss_bytes.max(m.rss_bytes);
                        svc.gpu_bytes = m.gpu_bytes;
                        svc.cgroup_bytes = m.cgroup_bytes;
                        svc.peak_gpu_bytes = svc.peak_gpu_bytes.max(m.gpu_bytes);
                    }
                }
                self.gpus.clone_from(&t.gpus);
            }
            event::Kind::CaseFinished(_)
            | event::Kind::Log(_)
            | event::Kind::LeaseChanged(_)
            | event::Kind::MemoryPressure(_)
            | event::Kind::LoadProgress(_) => {}
        }
    }

    fn model_mut(&mut self, service: &str, model: &str) -> Option<&mut ModelState> {
        self.services.get_mut(service)?.models.iter_mut().find(|m| m.name == model)
    }

    fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        Snapshot {
            incarnation: self.incarnation.clone(),
            next_seq: self.next_seq,
            services: self.services.values().cloned().collect(),
            leases: self.leases.live_grants(now).iter().map(public_lease).collect(),
            host: Some(self.host),
            heartbeat_unix_ms: self.heartbeat_unix_ms,
            gpus: self.gpus.clone(),
        }
    }

    /// Everything with seq >= from_seq still known: retained events older
    /// than the ring, a gap marker if the ring lost some, then the ring.
    fn backlog(&self, from_seq: u64) -> Vec<WatchMessage> {
        let ring_start = self.ring.front().map_or(self.next_seq, |e| e.seq);
        let mut out = Vec::new();
        let wrap = |e: &Event| WatchMessage { kind: Some(watch_message::Kind::Event(e.clone())) };
        if from_seq < ring_start {
            out.extend(self.retained.range(from_seq..ring_start).map(|(_, e)| wrap(e)));
            if self.evicted_up_to.is_some_and(|last| last >= from_seq) {
                out.push(WatchMessage {
                    kind: Some(watch_message::Kind::Gap(proto::Gap { from_seq, to_seq: ring_start })),
                });
            }
        }
        out.extend(self.ring.iter().filter(|e| e.seq >= from_seq).map(wrap));
        out
    }
}

/// Cuts an event's long text fields until it encodes within `max` bytes
/// (each cut text says so).
fn fit(kind: &mut event::Kind, max: usize) {
    let size = |k: &event::Kind| Event { kind: Some(k.clone()), ..Default::default() }.encoded_len();
    if size(kind) <= max {
        return;
    }
    let keep = max / 4;
    match kind {
        event::Kind::StageChanged(c) => cut_text(&mut c.message, keep),
        event::Kind::Log(l) => cut_text(&mut l.line, keep),
        event::Kind::CaseFinished(c) => {
            if let Some(r) = c.result.as_mut() {
                cut_text(&mut r.message, keep);
                cut_text(&mut r.response_excerpt, keep);
                let each = keep / r.failures.len().max(1);
                for f in &mut r.failures {
                    cut_text(&mut f.expected, each / 2);
                    cut_text(&mut f.actual, each / 2);
                }
                r.failures.truncate(64);
                fit_tests(r, max, &size_of_result);
            }
        }
        _ => {}
    }
}

fn size_of_result(r: &proto::CaseResult) -> usize {
    prost::Message::encoded_len(r)
}

/// A command case's tests within the event limit: their messages cut
/// first, then the list (the ones that did not pass kept first), saying so.
fn fit_tests(r: &mut proto::CaseResult, max: usize, size: &dyn Fn(&proto::CaseResult) -> usize) {
    if size(r) <= max || r.tests.is_empty() {
        return;
    }
    for t in &mut r.tests {
        cut_text(&mut t.message, 256);
    }
    let all = r.tests.len();
    r.tests.sort_by_key(|t| t.outcome() == proto::TestOutcome::TestPassed);
    while size(r) > max * 9 / 10 && !r.tests.is_empty() {
        let keep = r.tests.len() * 3 / 4;
        r.tests.truncate(keep);
    }
    if r.tests.len() < all {
        r.message.push_str(&format!(
            " ({} of its {all} tests are not in this result: the event limit; the ones that did not pass come first)",
            all - r.tests.len()
        ));
    }
}

fn cut_text(text: &mut String, keep: usize) {
    if text.len() <= keep {
        return;
    }
    let mut at = keep;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let total = text.len();
    text.truncate(at);
    text.push_str(&format!(" … (cut: {total} bytes in all)"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_case_with_thousands_of_tests_fits_an_event_keeping_those_that_did_not_pass() {
        let test = |i: usize, outcome: proto::TestOutcome| {
            let mut t = proto::TestResult {
                name: format!("test_{i}"),
                classname: "tests.e2e.test_big".into(),
                message: "m".repeat(2000),
                ..Default::default()
            };
            t.set_outcome(outcome);
            t
        };
        let mut tests: Vec<proto::TestResult> = (0..5000).map(|i| test(i, proto::TestOutcome::TestPassed)).collect();
        tests[4321] = test(4321, proto::TestOutcome::TestFailed);
        let result = proto::CaseResult { tests, ..Default::default() };
        let mut kind = event::Kind::CaseFinished(proto::CaseFinished { result: Some(result), ..Default::default() });
        let max = 256 * 1024;
        fit(&mut kind, max);
        let event::Kind::CaseFinished(c) = kind else { unreachable!() };
        let r = c.result.unwrap();
        assert!(prost::Message::encoded_len(&r) <= max);
        assert_eq!(r.tests[0].name, "test_4321", "the failing test first");
        assert!(r.message.contains("tests are not in this result: the event limit"), "{}", r.message);
    }

    fn log(line: &str) -> event::Kind {
        event::Kind::Log(proto::LogLine { service: "svc".into(), stream: "stdout".into(), line: line.into() })
    }

    fn seqs(backlog: &[WatchMessage]) -> Vec<u64> {
        backlog
            .iter()
            .map(|m| match &m.kind {
                Some(watch_message::Kind::Event(e)) => e.seq,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn watch_from_k_replays_exactly_k_onwards_then_goes_live() {
        let j = Journal::start("inc".into(), &[("svc".into(), vec!["m".into()])]);
        for i in 0..10 {
            j.append(log(&i.to_string()));
        }
        let mut sub = j.subscribe(4).await.unwrap();
        assert_eq!(sub.snapshot.next_seq, 11);
        assert_eq!(seqs(&sub.backlog), (4..=10).collect::<Vec<_>>());
        j.append(log("live"));
        let live = sub.live.recv().await.unwrap();
        assert!(matches!(live.kind, Some(watch_message::Kind::Event(Event { seq: 11, .. }))));
    }

    #[tokio::test]
    async fn stage_changes_fold_into_the_snapshot() {
        let j = Journal::start("inc".into(), &[("svc".into(), vec!["m".into()])]);
        j.append(event::Kind::StageChanged(proto::StageChanged {
            service: "svc".into(),
            model: "m".into(),
            from: proto::Stage::Stopped.into(),
            to: proto::Stage::LoadingWeights.into(),
            progress: 0.5,
            ..Default::default()
        }));
        let snap = j.snapshot().await.unwrap();
        let m = &snap.services[0].models[0];
        assert_eq!(m.stage(), proto::Stage::LoadingWeights);
        assert_eq!(m.progress, 0.5);
    }

    #[tokio::test]
    async fn retained_events_survive_the_ring_until_acked() {
        let j = Journal::start("inc".into(), &[("svc".into(), vec!["m".into()])]);
        j.append(event::Kind::StageChanged(proto::StageChanged {
            service: "svc".into(),
            model: "m".into(),
            from: proto::Stage::Stopped.into(),
            to: proto::Stage::ProcessStarting.into(),
            ..Default::default()
        }));
        for i in 0..RING_CAPACITY + 5 {
            j.append(log(&i.to_string()));
        }
        let sub = j.subscribe(1).await.unwrap();
        assert!(matches!(&sub.backlog[0].kind, Some(watch_message::Kind::Event(Event { seq: 1, .. }))));
        assert!(matches!(&sub.backlog[1].kind, Some(watch_message::Kind::Gap(_))));
        assert_eq!(j.ack(String::new(), "anyone".into(), 1).await.unwrap().unwrap(), 1);
        assert!(j.fetch_retained(String::new(), "anyone".into(), 0).await.unwrap().unwrap().is_empty());
    }

    fn finished(run: &str, case: &str) -> event::Kind {
        event::Kind::CaseFinished(proto::CaseFinished {
            run_id: run.into(),
            service: "svc".into(),
            result: Some(proto::CaseResult { case_id: case.into(), ..Default::default() }),
        })
    }

    #[tokio::test]
    async fn one_runs_ack_keeps_another_runs_results_and_progress_is_not_retained() {
        let j = Journal::start("inc".into(), &[("svc".into(), vec!["m".into()])]);
        j.append(finished("run-a", "a1"));
        j.append(finished("run-b", "b1"));
        // A progress update: same stage, new percentage.
        j.append(event::Kind::StageChanged(proto::StageChanged {
            service: "svc".into(),
            model: "m".into(),
            from: proto::Stage::LoadingWeights.into(),
            to: proto::Stage::LoadingWeights.into(),
            progress: 0.5,
            ..Default::default()
        }));
        assert_eq!(
            j.fetch_retained(String::new(), "anyone".into(), 0).await.unwrap().unwrap().len(),
            2,
            "progress is not retained"
        );
        let next = j.next_seq().await.unwrap();
        assert_eq!(j.ack("run-a".into(), "anyone".into(), next - 1).await.unwrap().unwrap(), 1);
        let left = j.fetch_retained("run-b".into(), "anyone".into(), 0).await.unwrap().unwrap();
        assert_eq!(left.len(), 1, "run-b can still fetch its result after run-a's ack");
        assert!(matches!(&left[0].kind, Some(event::Kind::CaseFinished(c)) if c.run_id == "run-b"));
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Drains the watcher, collecting the services whose lease was released.
    fn drain_released(live: &mut mpsc::Receiver<WatchMessage>, into: &mut Vec<String>) {
        while let Ok(m) = live.try_recv() {
            if let Some(watch_message::Kind::Event(Event { kind: Some(event::Kind::LeaseChanged(c)), .. })) = m.kind
                && c.released
            {
                into.push(c.lease.expect("lease").service);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_lease_is_announced_as_released_to_watchers() {
        let j = Journal::start("inc".into(), &[("svc".into(), vec!["m".into()])]);
        let t0 = Instant::now();
        let g =
            j.acquire("svc".into(), ("run-a".into(), "ci".into(), "anyone".into()), secs(10)).await.unwrap().unwrap();
        let mut sub = j.subscribe(u64::MAX).await.unwrap();
        let message = tokio::time::timeout(secs(3600), sub.live.recv()).await.expect("no event within an hour");
        let Some(watch_message::Kind::Event(Event { kind: Some(event::Kind::LeaseChanged(c)), .. })) =
            message.and_then(|m| m.kind)
        else {
            panic!("expected a lease change");
        };
        assert!(c.released, "{c:?}");
        assert_eq!(
            c.lease.map(|l| (l.run_id, l.epoch)),
            Some((g.run_id.clone(), g.epoch)),
            "the expired lease, by run and epoch"
        );
        let elapsed = t0.elapsed();
        assert!(elapsed >= secs(10) && elapsed < secs(11), "announced {elapsed:?} after a 10 s grant");
        assert!(j.snapshot().await.unwrap().leases.is_empty());
    }

    enum Step {
        Renew(&'static str),
        /// Leases announced released so far, in order, and those still held.
        Expect {
            released: &'static [&'static str],
            held: &'static [&'static str],
        },
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_renewed_in_time_is_not_reported_expired() {
        let services = ["a", "b", "c", "d"].map(|s| (s.to_owned(), vec!["m".to_owned()]));
        let j = Journal::start("inc".into(), &services);
        let t0 = Instant::now();
        let mut grants = BTreeMap::new();
        for (service, ttl) in [("a", 5), ("b", 20), ("c", 10), ("d", 10)] {
            let g = j
                .acquire(service.into(), (format!("run-{service}"), "ci".into(), "anyone".into()), secs(ttl))
                .await
                .unwrap();
            grants.insert(service, g.unwrap());
        }
        let mut sub = j.subscribe(u64::MAX).await.unwrap();
        let steps = [
            (8, Step::Renew("c")),
            (8, Step::Renew("d")),
            (11, Step::Expect { released: &["a"], held: &["b", "c", "d"] }),
            (16, Step::Renew("d")),
            (19, Step::Expect { released: &["a", "c"], held: &["b", "d"] }),
            (21, Step::Expect { released: &["a", "c", "b"], held: &["d"] }),
            (27, Step::Expect { released: &["a", "c", "b", "d"], held: &[] }),
        ];
        let mut released = Vec::new();
        for (at, step) in steps {
            tokio::time::sleep_until(t0 + secs(at)).await;
            match step {
                Step::Renew(service) => {
                    let g = &grants[service];
                    let claim = LeaseClaim {
                        service: g.service.clone(),
                        run_id: g.run_id.clone(),
                        lease_id: g.id.clone(),
                        epoch: g.epoch,
                        caller: g.owner.clone(),
                    };
                    j.renew(claim).await.unwrap().unwrap();
                }
                Step::Expect { released: expected, held } => {
                    // The snapshot is answered after every event appended before it.
                    let snapshot = j.snapshot().await.unwrap();
                    drain_released(&mut sub.live, &mut released);
                    assert_eq!(released, expected, "released by {at} s");
                    let live: Vec<_> = snapshot.leases.iter().map(|l| l.service.as_str()).collect();
                    assert_eq!(live, held, "held at {at} s");
                }
            }
        }
    }

    #[tokio::test]
    async fn unacknowledged_retained_events_are_capped_and_replay_shows_the_gap() {
        let j = Journal::start("inc".into(), &[("svc".into(), vec!["m".into()])]);
        let total = RETAINED_MAX_EVENTS + 10;
        for i in 0..total {
            j.append(finished("dead-run", &i.to_string()));
        }
        let kept = j.fetch_retained(String::new(), "anyone".into(), 0).await.unwrap().unwrap();
        assert_eq!(kept.len(), RETAINED_MAX_EVENTS, "the oldest beyond the cap are dropped");
        assert_eq!(kept[0].seq, 11, "oldest first");
        let sub = j.subscribe(1).await.unwrap();
        let gap = sub.backlog.iter().find_map(|m| match &m.kind {
            Some(watch_message::Kind::Gap(g)) => Some((g.from_seq, g.to_seq)),
            _ => None,
        });
        assert!(gap.is_some_and(|(from, _)| from == 1), "a replay from 1 shows what is gone: {gap:?}");
    }

    #[test]
    fn an_oversized_event_is_cut_to_fit_and_says_so() {
        let huge = "x".repeat(10 * 1024 * 1024);
        // (event, field that must say it was cut)
        let mut stage = event::Kind::StageChanged(proto::StageChanged { message: huge.clone(), ..Default::default() });
        let mut line = log(&huge);
        let failure = proto::AssertionFailure { actual: huge.clone(), expected: huge.clone(), ..Default::default() };
        let mut case = event::Kind::CaseFinished(proto::CaseFinished {
            result: Some(proto::CaseResult { failures: vec![failure], message: huge.clone(), ..Default::default() }),
            ..Default::default()
        });
        for kind in [&mut stage, &mut line, &mut case] {
            fit(kind, MAX_EVENT_BYTES);
            let size = Event { kind: Some(kind.clone()), ..Default::default() }.encoded_len();
            assert!(size <= MAX_EVENT_BYTES, "{size} bytes");
            assert!(format!("{kind:?}").contains("(cut: 10485760 bytes in all)"));
        }
    }

    #[tokio::test]
    async fn watchers_never_see_a_lease_id() {
        let j = Journal::start("inc".into(), &[("svc".into(), vec!["m".into()])]);
        let grant = j
            .acquire("svc".into(), ("run".into(), "ci".into(), "anyone".into()), Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        assert!(!grant.id.is_empty(), "the holder gets its id");
        let snapshot = j.snapshot().await.unwrap();
        assert_eq!(snapshot.leases.len(), 1);
        assert_eq!(snapshot.leases[0].id, "", "not in the snapshot");
        assert_eq!(snapshot.leases[0].run_id, "run", "who holds it is still shown");
        let sub = j.subscribe(1).await.unwrap();
        let ids: Vec<String> = sub
            .backlog
            .iter()
            .filter_map(|m| match &m.kind {
                Some(watch_message::Kind::Event(Event { kind: Some(event::Kind::LeaseChanged(c)), .. })) => {
                    c.lease.as_ref().map(|l| l.id.clone())
                }
                _ => None,
            })
            .collect();
        assert_eq!(ids, [""], "nor in the events");
    }
}
