//! Supervision of one model service: the only code that spawns or signals it.
//!
//! One actor per configured service owns the child process, its output, the
//! readiness probe and the per-model stage machine (`stages`). Everything it
//! learns goes to the journal as events. The process runs in its own process
//! group (`process`), so a stop (signal, grace, SIGKILL) reaches the whole
//! group; only the PID it spawned is ever reaped. Loads are admitted against
//! memory (`crate::admission`) before the service starts.

mod process;
mod stages;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use proto::{ExitKind, ExitStatus, Stage, event};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use process::classify;
pub use stages::{log_stage, progress_signal};

use crate::admission::{Admission, Refused};
use crate::config::{LoadMode, ServiceConfig, load_timeout};
use crate::journal::Journal;
use crate::probe::{self, Answer, Named};
use crate::sampling::TreeMemory;

/// Log lines kept for failure messages.
const LOG_TAIL: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("service {service} has no model {model:?}; it serves {known:?}")]
    UnknownModel { service: String, model: String, known: Vec<String> },
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("the agent is shutting down")]
    Closed,
}

/// What `EnsureModels` found and did.
#[derive(Debug, Default)]
pub struct EnsureOutcome {
    pub already_ready: Vec<String>,
    pub loading: Vec<String>,
}

/// What a controller asks of `EnsureModels`.
#[derive(Clone, Debug, Default)]
pub struct EnsureRequest {
    pub models: Vec<String>,
    /// Load timeout override (CLI flag > suite), below which the agent decides.
    pub timeout: Option<Duration>,
    /// Memory to keep free beyond each model's declared need.
    pub headroom: u64,
    /// Restart the service for a cold load.
    pub fresh: bool,
}

enum Command {
    Ensure { request: EnsureRequest, reply: oneshot::Sender<Result<EnsureOutcome, SupervisorError>> },
    Stop { reply: oneshot::Sender<ExitStatus> },
    BaseUrl { reply: oneshot::Sender<Option<String>> },
}

/// Cloneable handle to one service's supervisor.
#[derive(Clone, Debug)]
pub struct Supervisor {
    tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("supervisor::Command")
    }
}

/// Shared plumbing every supervisor gets from the agent.
#[derive(Clone, Debug)]
pub struct Wiring {
    pub journal: Journal,
    pub roots: Arc<watch::Sender<BTreeMap<String, u32>>>,
    pub samples: watch::Receiver<BTreeMap<String, TreeMemory>>,
    pub admission: Admission,
    pub data_dir: PathBuf,
}

impl Supervisor {
    /// Starts the actor; it runs until `cancel`, then stops its service.
    pub fn start(
        cfg: ServiceConfig,
        wiring: Wiring,
        cancel: CancellationToken,
    ) -> (Supervisor, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(64);
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        let actor = Actor {
            models: cfg.models.iter().map(|m| (m.name.clone(), Track::new(Stage::Stopped))).collect(),
            named: cfg.models.iter().map(|m| Named { name: m.name.clone(), served_as: m.served_as.clone() }).collect(),
            admission: wiring.admission.clone(),
            cfg,
            wiring,
            internal_tx,
            probe_tx,
            generation: 0,
            run: None,
            logs: VecDeque::new(),
            last_payload: None,
            last_exit: None,
            last_sample: None,
            stop: None,
            pending: Vec::new(),
            cancel: cancel.clone(),
        };
        let task = tokio::spawn(actor.run(rx, internal_rx, probe_rx, cancel));
        (Supervisor { tx }, task)
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, SupervisorError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| SupervisorError::Closed)?;
        rx.await.map_err(|_| SupervisorError::Closed)
    }

    /// Idempotent: starts the service if needed; ready models stay as they are.
    pub async fn ensure(&self, request: EnsureRequest) -> Result<EnsureOutcome, SupervisorError> {
        self.ask(|reply| Command::Ensure { request, reply }).await?
    }

    /// Stops the service (signal, grace, SIGKILL of the group); returns how it ended.
    pub async fn stop(&self) -> Result<ExitStatus, SupervisorError> {
        self.ask(|reply| Command::Stop { reply }).await
    }

    /// Where cases reach the service, while it runs.
    pub async fn base_url(&self) -> Result<Option<String>, SupervisorError> {
        self.ask(|reply| Command::BaseUrl { reply }).await
    }
}

/// Per-model stage tracking.
#[derive(Debug)]
struct Track {
    stage: Stage,
    since: Instant,
    progress: f64,
    /// When the current load began (service start, or load request).
    load_started: Instant,
    deadline: Option<(Instant, Duration)>,
    /// Last sign of progress: a transition, or a resource signal.
    last_progress: Instant,
    /// Which resource signal it was (`None`: a stage or progress change).
    last_signal: Option<String>,
    /// Endpoint-mode models: the load request was sent for this run.
    load_requested: bool,
    /// Endpoint-mode models only take part once asked for.
    wanted: bool,
    /// Holds an admission reservation until its load ends.
    reserved: bool,
    warm: stages::Warm,
}

impl Track {
    fn new(stage: Stage) -> Track {
        let now = Instant::now();
        Track {
            stage,
            since: now,
            progress: 0.0,
            load_started: now,
            deadline: None,
            last_progress: now,
            last_signal: None,
            load_requested: false,
            wanted: false,
            reserved: false,
            warm: stages::Warm::default(),
        }
    }
}

struct Running {
    pid: u32,
    base_url: String,
    probe_cancel: CancellationToken,
    started: Instant,
}

struct Stopping {
    deadline: Instant,
    escalated: bool,
    waiters: Vec<oneshot::Sender<ExitStatus>>,
}

/// An Ensure waiting for a restart (fresh load, or a retry of a failed one).
struct Pending {
    request: EnsureRequest,
    reply: oneshot::Sender<Result<EnsureOutcome, SupervisorError>>,
}

/// What the actor's own helper tasks tell it.
enum Internal {
    Exited { generation: u64, status: std::io::Result<std::process::ExitStatus> },
    Log { generation: u64, stream: &'static str, line: String },
    Warmup { generation: u64, model: String, outcome: Result<String, String> },
}

struct Actor {
    cfg: ServiceConfig,
    named: Vec<Named>,
    wiring: Wiring,
    admission: Admission,
    internal_tx: mpsc::UnboundedSender<Internal>,
    probe_tx: mpsc::UnboundedSender<(u64, Vec<Answer>)>,
    generation: u64,
    run: Option<Running>,
    models: BTreeMap<String, Track>,
    logs: VecDeque<String>,
    last_payload: Option<String>,
    last_exit: Option<ExitStatus>,
    last_sample: Option<(Instant, TreeMemory)>,
    stop: Option<Stopping>,
    pending: Vec<Pending>,
    /// The agent is shutting down once this fires: no more (re)starts.
    cancel: CancellationToken,
}

impl Actor {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut internal: mpsc::UnboundedReceiver<Internal>,
        mut probes: mpsc::UnboundedReceiver<(u64, Vec<Answer>)>,
        cancel: CancellationToken,
    ) {
        let mut timeouts = tokio::time::interval(Duration::from_millis(100));
        let mut samples = self.wiring.samples.clone();
        let mut shutting_down = false;
        loop {
            let escalate_at = self.stop.as_ref().filter(|s| !s.escalated).map(|s| s.deadline);
            tokio::select! {
                _ = cancel.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    if self.run.is_none() {
                        return;
                    }
                    self.begin_stop(None);
                }
                cmd = commands.recv(), if !shutting_down => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => { shutting_down = true; self.begin_stop(None); }
                },
                Some(msg) = internal.recv() => {
                    self.internal(msg).await;
                    if shutting_down && self.run.is_none() {
                        return;
                    }
                }
                Some((generation, answers)) = probes.recv() => {
                    if generation == self.generation && self.run.is_some() {
                        self.observe(answers);
                    }
                }
                Ok(()) = samples.changed() => self.on_sample(),
                _ = tokio::time::sleep_until(escalate_at.unwrap_or_else(Instant::now)), if escalate_at.is_some() => {
                    self.escalate();
                }
                _ = timeouts.tick() => self.check_timeouts(),
            }
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Ensure { request, reply } => {
                if let Some(unknown) = request.models.iter().find(|m| !self.models.contains_key(*m)) {
                    let _ = reply.send(Err(SupervisorError::UnknownModel {
                        service: self.cfg.name.clone(),
                        model: unknown.clone(),
                        known: self.models.keys().cloned().collect(),
                    }));
                    return;
                }
                let needs_restart = self.run.is_some()
                    && (request.fresh
                        || request.models.iter().any(|m| {
                            let t = &self.models[m];
                            matches!(t.stage, Stage::Failed | Stage::Stopped) && self.load_mode(m) == LoadMode::AtStart
                        }));
                if needs_restart || self.stop.is_some() {
                    // Finish (or begin) the stop; the start happens on exit.
                    self.pending.push(Pending { request, reply });
                    if self.stop.is_none() {
                        self.begin_stop(None);
                    }
                    return;
                }
                let outcome = self.ensure(&request).await;
                let _ = reply.send(outcome);
            }
            Command::Stop { reply } => {
                if self.run.is_none() {
                    let _ = reply.send(
                        self.last_exit.unwrap_or(ExitStatus { kind: ExitKind::Unknown.into(), ..Default::default() }),
                    );
                } else {
                    self.begin_stop(Some(reply));
                }
            }
            Command::BaseUrl { reply } => {
                let _ = reply.send(self.run.as_ref().map(|r| r.base_url.clone()));
            }
        }
    }

    fn load_mode(&self, model: &str) -> LoadMode {
        self.cfg.models.iter().find(|m| m.name == model).map_or(LoadMode::AtStart, |m| m.load)
    }

    /// Admits the loads this request starts, then starts them.
    async fn ensure(&mut self, request: &EnsureRequest) -> Result<EnsureOutcome, SupervisorError> {
        // Starting the service loads every at-start model, asked for or not.
        let starting = self.run.is_none();
        let loads: Vec<String> = self
            .models
            .iter()
            .filter(|(name, t)| {
                let asked = request.models.contains(name);
                let loads_now = if starting {
                    asked || self.load_mode(name) == LoadMode::AtStart
                } else {
                    asked && matches!(t.stage, Stage::Stopped | Stage::Failed)
                };
                loads_now && t.stage != Stage::Ready && !t.reserved
            })
            .map(|(name, _)| name.clone())
            .collect();
        let mut admitted: Vec<String> = Vec::new();
        for name in &loads {
            let need = self.cfg.models.iter().find(|m| m.name == *name).map_or(0, |m| m.ram_bytes);
            if let Err(refused) = self.admission.reserve(&self.cfg.name, name, need, request.headroom).await {
                for done in &admitted {
                    self.admission.release(&self.cfg.name, done);
                }
                tracing::warn!(service = %self.cfg.name, model = %name, %refused, "load refused");
                return Err(refused.into());
            }
            admitted.push(name.clone());
        }
        for name in &admitted {
            if let Some(t) = self.models.get_mut(name) {
                t.reserved = true;
            }
        }
        if starting {
            self.start(&request.models);
        }
        let env_timeout = std::env::var(crate::config::LOAD_TIMEOUT_ENV).ok();
        let mut outcome = EnsureOutcome::default();
        for name in &request.models {
            let configured = self.cfg.models.iter().find(|m| m.name == *name).and_then(|m| m.timeout);
            let limit = load_timeout(request.timeout, env_timeout.as_deref(), configured);
            let mode = self.load_mode(name);
            let running = self.run.is_some();
            let track = self.models.get_mut(name).expect("validated model");
            track.wanted = true;
            if track.stage == Stage::Ready {
                outcome.already_ready.push(name.clone());
                continue;
            }
            if mode == LoadMode::Endpoint && running && matches!(track.stage, Stage::Stopped | Stage::Failed) {
                // Asked for now: it starts its load from here.
                track.load_requested = false;
                track.load_started = Instant::now();
                self.transition(name, Stage::WaitingForHttp, "load requested", None);
            }
            let track = self.models.get_mut(name).expect("validated model");
            track.deadline = Some((track.load_started + limit, limit));
            outcome.loading.push(name.clone());
        }
        Ok(outcome)
    }

    /// Spawns the service. Failures turn the wanted models FAILED with a
    /// message naming the command.
    fn start(&mut self, requested: &[String]) {
        self.generation += 1;
        self.logs.clear();
        self.last_payload = None;
        self.last_sample = None;
        let now = Instant::now();
        let names: Vec<String> = self.models.keys().cloned().collect();
        for name in &names {
            let at_start = self.load_mode(name) == LoadMode::AtStart;
            let track = self.models.get_mut(name).expect("model");
            track.load_requested = false;
            track.deadline = None;
            track.load_started = now;
            if at_start || requested.contains(name) {
                track.wanted = true;
                self.transition(name, Stage::ProcessStarting, "service starting", None);
            }
        }
        match process::spawn(&self.cfg, &self.wiring.data_dir, self.generation, &self.internal_tx) {
            Ok(spawned) => {
                self.wiring.journal.append(event::Kind::ServiceStarted(proto::ServiceStarted {
                    service: self.cfg.name.clone(),
                    pid: spawned.pid,
                    command: self.cfg.command.join(" "),
                }));
                self.wiring.roots.send_modify(|r| {
                    r.insert(self.cfg.name.clone(), spawned.pid);
                });
                tracing::info!(service = %self.cfg.name, pid = spawned.pid, "service started");
                let probe_cancel = CancellationToken::new();
                tokio::spawn(probe::poll(
                    spawned.base_url.clone(),
                    self.cfg.readiness.protocol.paths(&self.named),
                    self.cfg.readiness.poll_ceiling,
                    self.generation,
                    self.probe_tx.clone(),
                    probe_cancel.clone(),
                ));
                self.run = Some(Running {
                    pid: spawned.pid,
                    base_url: spawned.base_url,
                    probe_cancel,
                    started: Instant::now(),
                });
                for name in &names {
                    if self.models[name].stage == Stage::ProcessStarting {
                        self.transition(name, Stage::WaitingForHttp, "process spawned", None);
                    }
                }
            }
            Err(message) => {
                tracing::warn!(service = %self.cfg.name, %message, "service failed to start");
                self.last_exit = Some(ExitStatus { kind: ExitKind::Unknown.into(), ..Default::default() });
                for name in &names {
                    if self.models[name].stage == Stage::ProcessStarting {
                        let text = format!("model {name} failed in stage PROCESS_STARTING: {message}");
                        self.transition(name, Stage::Failed, "launch failed", Some(text));
                    }
                }
            }
        }
    }

    fn begin_stop(&mut self, waiter: Option<oneshot::Sender<ExitStatus>>) {
        let Some(run) = &self.run else {
            if let Some(w) = waiter {
                let _ = w.send(self.last_exit.unwrap_or_default());
            }
            return;
        };
        match &mut self.stop {
            Some(stop) => stop.waiters.extend(waiter),
            None => {
                tracing::info!(service = %self.cfg.name, pid = run.pid, signal = %self.cfg.stop_signal, "stopping service");
                process::signal_group(run.pid, self.cfg.stop_signal);
                self.stop = Some(Stopping {
                    deadline: Instant::now() + self.cfg.stop_grace,
                    escalated: false,
                    waiters: waiter.into_iter().collect(),
                });
            }
        }
    }

    fn escalate(&mut self) {
        if let (Some(stop), Some(run)) = (&mut self.stop, &self.run) {
            tracing::warn!(service = %self.cfg.name, pid = run.pid, grace = ?self.cfg.stop_grace, "service ignored the stop signal; killing its process group");
            stop.escalated = true;
            process::signal_group(run.pid, Signal::SIGKILL);
        }
    }

    async fn internal(&mut self, msg: Internal) {
        match msg {
            Internal::Log { generation, stream, line } => {
                if generation != self.generation {
                    return;
                }
                if self.logs.len() == LOG_TAIL {
                    self.logs.pop_front();
                }
                self.logs.push_back(line.clone());
                self.on_log(&line);
                self.wiring.journal.append(event::Kind::Log(proto::LogLine {
                    service: self.cfg.name.clone(),
                    stream: stream.into(),
                    line,
                }));
            }
            Internal::Exited { generation, status } => {
                if generation == self.generation {
                    self.exited(status).await;
                }
            }
            Internal::Warmup { generation, model, outcome } => {
                if generation == self.generation {
                    self.on_warmup(&model, outcome);
                }
            }
        }
    }

    async fn exited(&mut self, status: std::io::Result<std::process::ExitStatus>) {
        let Some(run) = self.run.take() else { return };
        run.probe_cancel.cancel();
        let stop = self.stop.take();
        let exit = classify(status.ok(), stop.as_ref().map(|s| s.escalated));
        // Nothing of the group may outlive its leader.
        if !process::kill_group(run.pid).await {
            tracing::warn!(service = %self.cfg.name, pgid = run.pid, "processes of the service's group survived SIGKILL");
        }
        self.wiring.roots.send_modify(|r| {
            r.remove(&self.cfg.name);
        });
        tracing::info!(service = %self.cfg.name, pid = run.pid, exit = %exit, ran = ?run.started.elapsed(), "service exited");
        self.wiring.journal.append(event::Kind::ServiceExited(proto::ServiceExited {
            service: self.cfg.name.clone(),
            pid: run.pid,
            exit: Some(exit),
        }));
        self.last_exit = Some(exit);
        let names: Vec<String> = self.models.keys().cloned().collect();
        for name in &names {
            let stage = self.models[name].stage;
            if stage == Stage::Stopped || stage == Stage::Failed {
                continue;
            }
            if stop.is_some() {
                self.transition(name, Stage::Stopped, "service stopped", None);
            } else {
                let what = if stage == Stage::Ready { "serving" } else { "loading" };
                self.fail(name, &format!("process exited {exit}"), &format!("the service exited {exit} while {what}"));
            }
        }
        if let Some(stop) = stop {
            for w in stop.waiters {
                let _ = w.send(exit);
            }
        }
        // A restart someone asked for: start again and answer them.
        let pending = std::mem::take(&mut self.pending);
        for p in pending {
            let outcome =
                if self.cancel.is_cancelled() { Err(SupervisorError::Closed) } else { self.ensure(&p.request).await };
            let _ = p.reply.send(outcome);
        }
    }
}
