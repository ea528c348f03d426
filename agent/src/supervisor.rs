//! Supervision of one model service: the only code that spawns or signals it.
//!
//! One actor per configured service owns the child process, its output, the
//! readiness probe and the per-model stage machine (`machine`, pure; the
//! actor carries out what it decides, `requests` sends its HTTP requests). Everything it
//! learns goes to the journal as events. The process runs in its own process
//! group (`process`), so a stop (signal, grace, SIGKILL) reaches the whole
//! group and its own cgroup (`cgroup`), so a stop reaches the whole tree;
//! only the PID it spawned is ever reaped. Loads are admitted against memory
//! (`crate::admission`) before the service starts. A service that exits on
//! its own may be restarted (`restart`). A restarted agent re-attaches to a
//! service the previous one left running (`process::reattach`).

pub mod cgroup;
mod history;
mod logtail;
mod machine;
mod process;
pub mod redact;
mod requests;
pub mod restart;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use proto::admission::ModelMem;
use proto::{ExitKind, ExitStatus, Stage, event};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use machine::{Ended, Machine, Want};
pub use machine::{log_stage, progress_signal};
use process::Persisted;
pub use process::classify;

use crate::admission::{Admission, Refused};
use crate::config::{LoadMode, ServiceConfig, load_timeout, load_timeout_source};
use crate::journal::Journal;
use crate::probe::{self, Named, ProbeCost, Round};
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
    /// Who set `timeout`, in the controller's words (for messages).
    pub timeout_source: String,
    /// Memory to keep free beyond the declared needs, once per request.
    pub headroom: u64,
    /// GPU memory to keep free beyond the declared GPU needs, once per request.
    pub gpu_headroom: u64,
    /// Restart the service for a cold load.
    pub fresh: bool,
    /// W3C trace context of the caller, for warm-up and load requests.
    pub traceparent: Option<String>,
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
    /// The service's secrets, for whoever reports what it said.
    secrets: redact::Secrets,
    /// What its test commands need, fixed by its config.
    pub commands: Arc<TestCommands>,
}

/// A service's test commands, and what their runs are told.
#[derive(Debug, Default)]
pub struct TestCommands {
    pub commands: Vec<crate::commands::TestCommand>,
    /// The service's models, in config order.
    pub models: Vec<String>,
    /// Where their JUnit files go (`<data_dir>/commands/`).
    pub dir: PathBuf,
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
    /// Stable id of this agent, for cgroup paths (see `cgroup::agent_id`).
    pub agent_id: String,
    /// Whether services get cgroups (probed once at agent start).
    pub cgroups: bool,
    pub roots: Arc<watch::Sender<BTreeMap<String, crate::sampling::ServiceRoot>>>,
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
        let secrets = redact::Secrets::default();
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        let history = history::History::open(&wiring.data_dir, &cfg);
        let actor = Actor {
            machine: Machine::new(
                &cfg.models,
                cfg.readiness.protocol.name(),
                cfg.stop_after_failed_load,
                Instant::now(),
            ),
            named: cfg.models.iter().map(|m| Named { name: m.name.clone(), served_as: m.served_as.clone() }).collect(),
            admission: wiring.admission.clone(),
            cfg,
            wiring,
            internal_tx,
            probe_tx,
            live: watch::channel(None).0,
            generation: 0,
            run: None,
            logs: logtail::LogTail::default(),
            nudge: Arc::new(Notify::new()),
            probe_cost: ProbeCost::default(),
            stage_peaks: BTreeMap::new(),
            history,
            stop_reason: None,
            secrets: secrets.clone(),
            last_payload: None,
            last_exit: None,
            last_sample: None,
            cgroup: None,
            gpus: Vec::new(),
            oom_baseline: 0,
            failures: 0,
            restart_at: None,
            traceparent: None,
            stop: None,
            pending: Vec::new(),
            cancel: cancel.clone(),
        };
        let commands = Arc::new(TestCommands {
            commands: actor.cfg.test_commands.clone(),
            models: actor.cfg.models.iter().map(|m| m.name.clone()).collect(),
            dir: actor.wiring.data_dir.join("commands"),
        });
        let task = tokio::spawn(actor.run(rx, internal_rx, probe_rx, cancel));
        (Supervisor { tx, secrets, commands }, task)
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

    /// Replaces the service's secret values in `text`.
    pub fn redact(&self, text: &str) -> String {
        self.secrets.redact(text).into_owned()
    }

    /// A stand-in that answers only `base_url`, with what `url` holds when
    /// asked: lets tests route cases (and move the service) without a process.
    /// Other requests fail as if the supervisor had stopped.
    #[cfg(test)]
    pub(crate) fn serving(url: watch::Receiver<Option<String>>) -> Supervisor {
        let (tx, mut rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(command) = rx.recv().await {
                if let Command::BaseUrl { reply } = command {
                    let _ = reply.send(url.borrow().clone());
                }
            }
        });
        Supervisor { tx, secrets: redact::Secrets::default(), commands: Arc::default() }
    }
}

struct Running {
    pid: u32,
    base_url: String,
    probe_cancel: CancellationToken,
    started: Instant,
    /// The service has answered a readiness probe at least once.
    answered: bool,
    /// The agent re-attached to it after a restart (it is not our child).
    reattached: bool,
}

/// A service that dies this soon after launch, never having answered, failed
/// to launch: its message names the command.
const LAUNCH_WINDOW: Duration = Duration::from_secs(2);

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
    /// `status` is `None` when it could not be read (a re-attached service).
    Exited {
        generation: u64,
        status: Option<std::process::ExitStatus>,
    },
    Log {
        generation: u64,
        stream: &'static str,
        line: String,
    },
    Warmup {
        generation: u64,
        model: String,
        outcome: Result<String, String>,
    },
    /// An endpoint-mode load request came back; `refusal` says why not.
    LoadAnswered {
        generation: u64,
        model: String,
        refusal: Option<String>,
    },
}

struct Actor {
    cfg: ServiceConfig,
    named: Vec<Named>,
    wiring: Wiring,
    admission: Admission,
    internal_tx: mpsc::UnboundedSender<Internal>,
    probe_tx: mpsc::UnboundedSender<Round>,
    /// The probe's pace: `None` while a model loads (adaptive), else the
    /// liveness cadence.
    live: watch::Sender<Option<Duration>>,
    generation: u64,
    run: Option<Running>,
    /// Every model's truth.
    machine: Machine,
    /// The service's own words, for failure messages.
    logs: logtail::LogTail,
    /// Told of every line the service writes that is not the agent's own
    /// probe: while a model loads, the probe asks at once.
    nudge: Arc<Notify>,
    /// What the agent's probes cost the service since the last sample.
    probe_cost: ProbeCost,
    /// Per loading model: the service's peak (RSS, GPU) in its current stage.
    stage_peaks: BTreeMap<String, (u64, u64)>,
    /// How long this service's loads took here, for ETAs.
    history: history::History,
    /// Why the service is being stopped, when it is not a plain stop: told
    /// with every model the stop takes down.
    stop_reason: Option<String>,
    /// The service's secret values, replaced in everything it says.
    secrets: redact::Secrets,
    last_payload: Option<String>,
    last_exit: Option<ExitStatus>,
    last_sample: Option<(Instant, TreeMemory)>,
    /// The service's cgroup while it runs.
    cgroup: Option<cgroup::ServiceCgroup>,
    /// The GPUs admission gave the service when it started (its
    /// `CUDA_VISIBLE_DEVICES`); later loads go to these.
    gpus: Vec<u32>,
    /// The cgroup's OOM-kill count when the run began.
    oom_baseline: u64,
    /// Consecutive failed runs, for the restart backoff.
    failures: u32,
    restart_at: Option<Instant>,
    /// Trace context of the last ensure, sent on warm-up and load requests.
    traceparent: Option<String>,
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
        mut probes: mpsc::UnboundedReceiver<Round>,
        cancel: CancellationToken,
    ) {
        let mut timeouts = tokio::time::interval(Duration::from_millis(100));
        timeouts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut samples = self.wiring.samples.clone();
        let mut shutting_down = false;
        self.recover().await;
        loop {
            let escalate_at = self.stop.as_ref().filter(|s| !s.escalated).map(|s| s.deadline);
            let restart_at = self.restart_at;
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
                Some(round) = probes.recv() => {
                    if round.generation == self.generation && self.run.is_some() {
                        self.probe_cost.add(round.cost);
                        self.observe(round.answers);
                    }
                }
                Ok(()) = samples.changed() => self.on_sample(),
                _ = tokio::time::sleep_until(escalate_at.unwrap_or_else(Instant::now)), if escalate_at.is_some() => {
                    self.escalate();
                }
                _ = tokio::time::sleep_until(restart_at.unwrap_or_else(Instant::now)), if restart_at.is_some() && !shutting_down => {
                    self.restart_at = None;
                    if self.run.is_none() {
                        let wanted = self.machine.wanted();
                        tracing::info!(service = %self.cfg.name, attempt = self.failures, "restarting service");
                        self.start(&wanted);
                    }
                }
                // Only while something can time out: a READY service costs no wake-ups.
                _ = timeouts.tick(), if self.run.is_some() && self.machine.wants_ticks() => {
                    let actions = self.machine.tick(Instant::now());
                    self.apply(actions);
                }
            }
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Ensure { request, reply } => {
                if let Some(unknown) = request.models.iter().find(|m| self.machine.stage(m).is_none()) {
                    let _ = reply.send(Err(SupervisorError::UnknownModel {
                        service: self.cfg.name.clone(),
                        model: unknown.clone(),
                        known: self.machine.names(),
                    }));
                    return;
                }
                let needs_restart =
                    self.run.is_some() && (request.fresh || self.machine.reload_needs_restart(&request.models));
                if needs_restart || self.stop.is_some() {
                    // Finish (or begin) the stop; the start happens on exit.
                    if needs_restart && self.stop.is_none() {
                        self.stop_reason = Some(self.restart_reason(&request));
                    }
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

    /// Probes fast while a model loads; at the liveness cadence otherwise
    /// (hours of READY must not mean four requests a second).
    fn update_cadence(&self) {
        let loading = self.machine.loading();
        let want = (!loading).then_some(self.cfg.readiness.live_poll);
        self.live.send_if_modified(|v| std::mem::replace(v, want) != want);
    }

    /// Why a reload needs a restart: an at-start model loads only when its
    /// service starts, so the models still READY go down with it.
    fn restart_reason(&self, request: &EnsureRequest) -> String {
        if request.fresh {
            return format!("service {} restarted for a cold load (fresh)", self.cfg.name);
        }
        let reload: Vec<&String> = request
            .models
            .iter()
            .filter(|m| matches!(self.machine.stage(m), Some(Stage::Failed | Stage::Stopped)))
            .collect();
        format!(
            "service {} restarted to load {reload:?} again: at-start models load only when the service starts",
            self.cfg.name
        )
    }

    /// The paths the agent probes: their access-log lines are its own noise.
    fn probe_paths(&self) -> Vec<String> {
        self.cfg.readiness.protocol.paths(&self.named)
    }

    /// Every model as admission sees it (`proto::admission::load_need`): one
    /// READY or already admitted brings nothing new; on a running service,
    /// neither does one already loading (only STOPPED or FAILED ones load).
    fn model_mems(&self, starting: bool) -> Vec<ModelMem<'_>> {
        self.cfg
            .models
            .iter()
            .filter_map(|m| {
                let stage = self.machine.stage(&m.name)?;
                let idle = matches!(stage, Stage::Stopped | Stage::Failed);
                let loaded = self.machine.reserved(&m.name) || stage == Stage::Ready || (!starting && !idle);
                let at_start = m.load == LoadMode::AtStart;
                Some(ModelMem { name: &m.name, ram: m.ram_bytes, gpu: m.gpu_bytes, at_start, loaded })
            })
            .collect()
    }

    /// Admits the loads this request starts, as one reservation, then starts them.
    async fn ensure(&mut self, request: &EnsureRequest) -> Result<EnsureOutcome, SupervisorError> {
        self.restart_at = None;
        if request.traceparent.is_some() {
            self.traceparent = request.traceparent.clone();
        }
        let starting = self.run.is_none();
        // A running service keeps the GPUs it was given.
        let pin = match starting {
            true => self.cfg.gpus.clone(),
            false => self.cfg.gpus.as_ref().map(|_| proto::admission::GpuPin::Devices(self.gpus.clone())),
        };
        let models = self.model_mems(starting);
        let ask = crate::admission::LoadAsk {
            models: &models,
            asked: &request.models,
            starting,
            headroom: request.headroom,
            gpu_headroom: request.gpu_headroom,
            pin,
        };
        let admitted = self
            .admission
            .reserve_loads(&self.cfg.name, ask)
            .await
            .inspect_err(|refused| tracing::warn!(service = %self.cfg.name, %refused, "load refused"))?;
        for name in &admitted.models {
            self.machine.reserve(name);
        }
        if starting {
            self.gpus = admitted.gpus;
            self.start(&request.models);
        }
        let env_timeout = std::env::var(crate::config::LOAD_TIMEOUT_ENV).ok();
        let mut outcome = EnsureOutcome::default();
        for name in &request.models {
            let configured = self.cfg.models.iter().find(|m| m.name == *name).and_then(|m| m.timeout);
            let limit = load_timeout(request.timeout, env_timeout.as_deref(), configured);
            let source =
                load_timeout_source(request.timeout, &request.timeout_source, env_timeout.as_deref(), configured);
            let (want, actions) = self.machine.want(name, self.run.is_some(), (limit, source), Instant::now());
            self.apply(actions);
            match want {
                Want::AlreadyReady => outcome.already_ready.push(name.clone()),
                Want::Loading => outcome.loading.push(name.clone()),
            }
        }
        Ok(outcome)
    }

    /// Spawns the service. Failures turn the wanted models FAILED with a
    /// message naming the command.
    fn start(&mut self, requested: &[String]) {
        self.generation += 1;
        self.logs = logtail::LogTail::new(self.probe_paths());
        self.last_payload = None;
        self.last_sample = None;
        self.probe_cost = ProbeCost::default();
        self.stage_peaks.clear();
        let actions = self.machine.starting(requested, Instant::now());
        self.apply(actions);
        self.cgroup = None;
        if self.wiring.cgroups {
            match cgroup::ServiceCgroup::locate(&self.wiring.agent_id, &self.cfg.name)
                .and_then(|cg| cg.create(self.cfg.memory_limit_bytes).map(|()| cg))
            {
                Ok(cg) => {
                    self.oom_baseline = cg.oom_kills();
                    self.cgroup = Some(cg);
                }
                Err(error) => tracing::warn!(service = %self.cfg.name, %error, "starting without a cgroup"),
            }
        }
        self.secrets.reload(&self.cfg);
        let args = process::SpawnArgs {
            service: &self.cfg,
            data_dir: &self.wiring.data_dir,
            cgroup: self.cgroup.as_ref(),
            incarnation: self.wiring.journal.incarnation(),
            gpus: &self.gpus,
        };
        match process::spawn(&args, self.generation, &self.internal_tx) {
            Ok((spawned, persisted)) => {
                self.persist(Some(&persisted));
                self.wiring.journal.append(event::Kind::ServiceStarted(proto::ServiceStarted {
                    service: self.cfg.name.clone(),
                    pid: spawned.pid,
                    command: self.secrets.redact(&self.cfg.command.join(" ")).into_owned(),
                    gpus: self.gpus.clone(),
                }));
                let root = crate::sampling::ServiceRoot { pid: spawned.pid, cgroup: self.cgroup.clone() };
                self.wiring.roots.send_modify(|r| {
                    r.insert(self.cfg.name.clone(), root);
                });
                tracing::info!(service = %self.cfg.name, pid = spawned.pid, "service started");
                let probe_cancel = self.start_probe(&spawned.base_url);
                self.run = Some(Running {
                    pid: spawned.pid,
                    base_url: spawned.base_url,
                    probe_cancel,
                    started: Instant::now(),
                    answered: false,
                    reattached: false,
                });
                let actions = self.machine.spawned(Instant::now());
                self.apply(actions);
            }
            Err(message) => {
                tracing::warn!(service = %self.cfg.name, %message, "service failed to start");
                if let Some(cg) = self.cgroup.take() {
                    cg.remove();
                }
                self.last_exit = Some(ExitStatus { kind: ExitKind::Unknown.into(), ..Default::default() });
                let actions = self.machine.launch_failed(&message, Instant::now());
                self.apply(actions);
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
                let line = self.secrets.redact(&line).into_owned();
                if self.logs.is_probe(&line) {
                    self.probe_cost.bytes += line.len() as u64 + 1;
                } else {
                    self.nudge.notify_one();
                }
                let closed = self.logs.push(&line);
                let now = Instant::now();
                let mut actions = self.machine.on_log(&line, self.logs.in_traceback(), now);
                if let Some(exception) = closed {
                    actions.extend(self.machine.traceback_closed(&exception, now));
                }
                self.apply(actions);
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
            Internal::LoadAnswered { generation, model, refusal } => {
                if generation == self.generation {
                    let refusal = refusal.map(|r| self.secrets.redact(&r).into_owned());
                    self.machine.load_answered(&model, refusal, Instant::now());
                }
            }
            Internal::Warmup { generation, model, outcome } => {
                if generation == self.generation {
                    let outcome = outcome.map_err(|error| {
                        let error = self.secrets.redact(&error).into_owned();
                        tracing::debug!(service = %self.cfg.name, model, %error, "warm-up failed; retrying");
                        error
                    });
                    let actions = self.machine.warmed(&model, outcome, Instant::now());
                    self.apply(actions);
                }
            }
        }
    }

    /// Why a model failed when its service exited unasked.
    fn exit_reason(&self, exit: ExitStatus, serving: bool, at_launch: bool, ran: Duration) -> String {
        let what = if serving { "serving" } else { "loading" };
        if at_launch {
            return format!(
                "the service exited {exit} {:.1}s after launch, before answering: command {:?}",
                ran.as_secs_f64(),
                self.cfg.command
            );
        }
        if exit.kind() == ExitKind::OomKilled {
            let limit =
                self.cfg.memory_limit_bytes.map_or("the host's".to_owned(), |b| format!("{} MiB", b / (1024 * 1024)));
            return format!("the service was OOM-killed while {what} (its cgroup's memory limit is {limit})");
        }
        format!("the service exited {exit} while {what}")
    }

    async fn exited(&mut self, status: Option<std::process::ExitStatus>) {
        let Some(run) = self.run.take() else { return };
        run.probe_cancel.cancel();
        let stop = self.stop.take();
        let stop_reason = self.stop_reason.take();
        let cgroup = self.cgroup.take();
        let oom = cgroup.as_ref().is_some_and(|cg| cg.oom_kills() > self.oom_baseline);
        let exit = classify(status, stop.as_ref().map(|s| s.escalated), oom);
        // Nothing of the tree may outlive its leader.
        if !process::kill_tree(run.pid, cgroup.as_ref()).await {
            tracing::warn!(service = %self.cfg.name, pgid = run.pid, "processes of the service survived SIGKILL");
        }
        if let Some(cg) = &cgroup {
            cg.remove();
        }
        self.persist(None);
        self.wiring.roots.send_modify(|r| {
            r.remove(&self.cfg.name);
        });
        let ran = run.started.elapsed();
        tracing::info!(service = %self.cfg.name, pid = run.pid, exit = %exit, ?ran, "service exited");
        self.wiring.journal.append(event::Kind::ServiceExited(proto::ServiceExited {
            service: self.cfg.name.clone(),
            pid: run.pid,
            exit: Some(exit),
        }));
        self.last_exit = Some(exit);
        let at_launch = stop.is_none() && !run.answered && !run.reattached && ran < LAUNCH_WINDOW;
        let reached_ready = self.machine.any_ready();
        let end = match stop {
            Some(_) => Ended::Stopped(stop_reason),
            None => Ended::Died {
                cause: format!("process exited {exit}"),
                loading: self.exit_reason(exit, false, at_launch, ran),
                serving: self.exit_reason(exit, true, at_launch, ran),
            },
        };
        let actions = self.machine.ended(&end, Instant::now());
        self.apply(actions);
        // Restart policy, for exits nobody asked for.
        if stop.is_none()
            && self.pending.is_empty()
            && !self.cancel.is_cancelled()
            && restart::should_restart(self.cfg.restart.mode, exit.kind())
        {
            self.failures = restart::failures_after(self.failures, reached_ready, ran, self.cfg.restart.stable_after);
            let delay = restart::delay(&self.cfg.restart, self.failures, restart::jitter());
            tracing::info!(service = %self.cfg.name, attempt = self.failures, ?delay, exit = %exit, "restart scheduled");
            self.restart_at = Some(Instant::now() + delay);
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

impl Actor {
    /// Starts polling the service's readiness for this generation; cancel
    /// the token to stop.
    fn start_probe(&self, base_url: &str) -> CancellationToken {
        let cancel = CancellationToken::new();
        let target = probe::Target {
            base_url: base_url.to_owned(),
            protocol: self.cfg.readiness.protocol.clone(),
            models: self.named.clone(),
            ceiling: self.cfg.readiness.poll_ceiling,
        };
        tokio::spawn(probe::poll(
            target,
            self.generation,
            self.probe_tx.clone(),
            self.live.subscribe(),
            self.nudge.clone(),
            cancel.clone(),
        ));
        cancel
    }

    /// Writes (or, with `None`, removes) the state a restarted agent needs.
    fn persist(&self, state: Option<&Persisted>) {
        let path = process::state_path(&self.wiring.data_dir, &self.cfg.name);
        match state {
            Some(state) => {
                let written = serde_json::to_string_pretty(state)
                    .map_err(|e| e.to_string())
                    .and_then(|text| std::fs::write(&path, text).map_err(|e| e.to_string()));
                if let Err(error) = written {
                    tracing::warn!(service = %self.cfg.name, %error, path = %path.display(), "cannot save service state");
                }
            }
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// At agent start: finds a service a previous agent left running and
    /// re-attaches to it (or reaps it, as configured).
    async fn recover(&mut self) {
        let path = process::state_path(&self.wiring.data_dir, &self.cfg.name);
        let Ok(text) = std::fs::read_to_string(&path) else { return };
        let Ok(state) = serde_json::from_str::<Persisted>(&text) else {
            tracing::warn!(service = %self.cfg.name, path = %path.display(), "ignoring unreadable service state");
            self.persist(None);
            return;
        };
        let alive = process::start_ticks(state.pid) == Some(state.start_ticks);
        if !alive {
            // It ended while no agent watched: say how, as far as can be known.
            let oom = state.cgroup.as_ref().is_some_and(|cg| cg.oom_kills() > 0);
            let exit = classify(None, None, oom);
            tracing::warn!(service = %self.cfg.name, pid = state.pid, exit = %exit, "service ended while the agent was down");
            if let Some(cg) = &state.cgroup {
                let _ = cg.kill_all(Duration::from_secs(5)).await;
                cg.remove();
            }
            self.wiring.journal.append(event::Kind::ServiceExited(proto::ServiceExited {
                service: self.cfg.name.clone(),
                pid: state.pid,
                exit: Some(exit),
            }));
            self.last_exit = Some(exit);
            self.persist(None);
            return;
        }
        if self.cfg.on_agent_restart == crate::config::OnAgentRestart::Reap {
            tracing::info!(service = %self.cfg.name, pid = state.pid, "reaping the service a previous agent left running");
            let _ = process::kill_tree(state.pid, state.cgroup.as_ref()).await;
            if let Some(cg) = &state.cgroup {
                cg.remove();
            }
            self.persist(None);
            return;
        }
        self.generation += 1;
        tracing::info!(service = %self.cfg.name, pid = state.pid, from = %state.incarnation, "re-attaching to a running service");
        process::reattach(&state, &self.wiring.data_dir, &self.cfg, self.generation, &self.internal_tx);
        self.logs = logtail::LogTail::new(self.probe_paths());
        self.secrets.reload(&self.cfg);
        for line in process::last_lines(&self.wiring.data_dir, &self.cfg.name, LOG_TAIL) {
            self.logs.push(&self.secrets.redact(&line));
        }
        self.cgroup = state.cgroup.clone();
        self.oom_baseline = self.cgroup.as_ref().map_or(0, |cg| cg.oom_kills());
        let root = crate::sampling::ServiceRoot { pid: state.pid, cgroup: self.cgroup.clone() };
        self.wiring.roots.send_modify(|r| {
            r.insert(self.cfg.name.clone(), root);
        });
        self.wiring.journal.append(event::Kind::ServiceStarted(proto::ServiceStarted {
            service: self.cfg.name.clone(),
            pid: state.pid,
            command: format!("(re-attached) {}", self.cfg.command.join(" ")),
            gpus: state.gpus.clone(),
        }));
        self.gpus.clone_from(&state.gpus);
        let probe_cancel = self.start_probe(&state.base_url);
        self.run = Some(Running {
            pid: state.pid,
            base_url: state.base_url.clone(),
            probe_cancel,
            started: Instant::now(),
            answered: false,
            reattached: true,
        });
        // Its at-start models carry on loading; the probe tells where they are.
        let cause = format!("re-attached to pid {} after an agent restart", state.pid);
        let actions = self.machine.reattached(&cause, Instant::now());
        self.apply(actions);
        self.persist(Some(&Persisted { incarnation: self.wiring.journal.incarnation().to_owned(), ..state }));
    }
}
