//! Supervision of one model service: the only code that spawns or signals it.
//!
//! One actor per configured service owns the child process, its output, the
//! readiness probe and the per-model stage machine. Everything it learns goes
//! to the journal as events. The process runs in its own process group, so a
//! stop (signal, grace, SIGKILL) reaches the whole group; only the PID it
//! spawned is ever reaped.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use proto::{ExitKind, ExitStatus, Stage, event};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{LoadMode, ServiceConfig, load_timeout};
use crate::journal::Journal;
use crate::probe::{self, Observation};
use crate::sampling::TreeMemory;

/// Log lines kept for failure messages.
const LOG_TAIL: usize = 20;
/// How long to wait, after the service exits, for its last output lines.
const OUTPUT_DRAIN: Duration = Duration::from_millis(500);
/// How long to wait for a killed process group to vanish.
const GROUP_EXIT_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("service {service} has no model {model:?}; it serves {known:?}")]
    UnknownModel { service: String, model: String, known: Vec<String> },
    #[error("the agent is shutting down")]
    Closed,
}

/// What `EnsureModels` found and did.
#[derive(Debug, Default)]
pub struct EnsureOutcome {
    pub already_ready: Vec<String>,
    pub loading: Vec<String>,
}

enum Command {
    Ensure {
        models: Vec<String>,
        timeout: Option<Duration>,
        fresh: bool,
        reply: oneshot::Sender<Result<EnsureOutcome, SupervisorError>>,
    },
    Stop {
        reply: oneshot::Sender<ExitStatus>,
    },
    BaseUrl {
        reply: oneshot::Sender<Option<String>>,
    },
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
            cfg,
            wiring,
            internal_tx,
            probe_tx,
            generation: 0,
            run: None,
            logs: VecDeque::new(),
            last_payload: None,
            last_exit: None,
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
    pub async fn ensure(
        &self,
        models: Vec<String>,
        timeout: Option<Duration>,
        fresh: bool,
    ) -> Result<EnsureOutcome, SupervisorError> {
        self.ask(|reply| Command::Ensure { models, timeout, fresh, reply }).await?
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
    /// Endpoint-mode models: the load request was sent for this run.
    load_requested: bool,
    /// Endpoint-mode models only take part once asked for.
    wanted: bool,
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
            load_requested: false,
            wanted: false,
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
    models: Vec<String>,
    timeout: Option<Duration>,
    reply: oneshot::Sender<Result<EnsureOutcome, SupervisorError>>,
}

enum Internal {
    Exited { generation: u64, status: std::io::Result<std::process::ExitStatus> },
    Log { generation: u64, stream: &'static str, line: String },
}

struct Actor {
    cfg: ServiceConfig,
    wiring: Wiring,
    internal_tx: mpsc::UnboundedSender<Internal>,
    probe_tx: mpsc::UnboundedSender<(u64, Observation)>,
    generation: u64,
    run: Option<Running>,
    models: BTreeMap<String, Track>,
    logs: VecDeque<String>,
    last_payload: Option<String>,
    last_exit: Option<ExitStatus>,
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
        mut probes: mpsc::UnboundedReceiver<(u64, Observation)>,
        cancel: CancellationToken,
    ) {
        let mut timeouts = tokio::time::interval(Duration::from_millis(100));
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
                Some((generation, obs)) = probes.recv() => {
                    if generation == self.generation && self.run.is_some() {
                        self.observe(obs);
                    }
                }
                _ = tokio::time::sleep_until(escalate_at.unwrap_or_else(Instant::now)), if escalate_at.is_some() => {
                    self.escalate();
                }
                _ = timeouts.tick() => self.check_timeouts(),
            }
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Ensure { models, timeout, fresh, reply } => {
                if let Some(unknown) = models.iter().find(|m| !self.models.contains_key(*m)) {
                    let _ = reply.send(Err(SupervisorError::UnknownModel {
                        service: self.cfg.name.clone(),
                        model: unknown.clone(),
                        known: self.models.keys().cloned().collect(),
                    }));
                    return;
                }
                let needs_restart = self.run.is_some()
                    && (fresh
                        || models.iter().any(|m| {
                            let t = &self.models[m];
                            matches!(t.stage, Stage::Failed | Stage::Stopped) && self.load_mode(m) == LoadMode::AtStart
                        }));
                if needs_restart || self.stop.is_some() {
                    // Finish (or begin) the stop; the start happens on exit.
                    self.pending.push(Pending { models, timeout, reply });
                    if self.stop.is_none() {
                        self.begin_stop(None);
                    }
                    return;
                }
                let outcome = self.ensure(&models, timeout);
                let _ = reply.send(Ok(outcome));
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

    fn ensure(&mut self, models: &[String], timeout: Option<Duration>) -> EnsureOutcome {
        if self.run.is_none() {
            self.start(models);
        }
        let env_timeout = std::env::var(crate::config::LOAD_TIMEOUT_ENV).ok();
        let mut outcome = EnsureOutcome::default();
        for name in models {
            let configured = self.cfg.models.iter().find(|m| m.name == *name).and_then(|m| m.timeout);
            let limit = load_timeout(timeout, env_timeout.as_deref(), configured);
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
        outcome
    }

    /// Spawns the service. Failures turn the wanted models FAILED with a
    /// message naming the command.
    fn start(&mut self, requested: &[String]) {
        self.generation += 1;
        self.logs.clear();
        self.last_payload = None;
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
        match self.spawn() {
            Ok(run) => {
                self.wiring.journal.append(event::Kind::ServiceStarted(proto::ServiceStarted {
                    service: self.cfg.name.clone(),
                    pid: run.pid,
                    command: self.cfg.command.join(" "),
                }));
                self.wiring.roots.send_modify(|r| {
                    r.insert(self.cfg.name.clone(), run.pid);
                });
                tracing::info!(service = %self.cfg.name, pid = run.pid, "service started");
                self.run = Some(run);
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

    fn spawn(&mut self) -> Result<Running, String> {
        let port = if self.cfg.port == 0 {
            free_port().map_err(|e| format!("cannot pick a free port for service {}: {e}", self.cfg.name))?
        } else {
            self.cfg.port
        };
        let subst = |s: &str| s.replace("{port}", &port.to_string());
        let argv: Vec<String> = self.cfg.command.iter().map(|a| subst(a)).collect();
        let mut command = tokio::process::Command::new(&argv[0]);
        command.args(&argv[1..]).env_clear();
        // The service sees only what its config names, plus the basics.
        for key in ["PATH", "HOME", "LANG", "TZ"] {
            if let Ok(v) = std::env::var(key) {
                command.env(key, v);
            }
        }
        for (k, v) in &self.cfg.env {
            command.env(k, subst(v));
        }
        for (k, path) in &self.cfg.secrets {
            let value = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read secret {k} from {}: {e}", path.display()))?;
            command.env(k, value.trim());
        }
        if let Some(dir) = &self.cfg.workdir {
            command.current_dir(dir);
        }
        command.process_group(0).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| {
            let dir = self.cfg.workdir.as_ref().map(|d| format!(" in {}", d.display())).unwrap_or_default();
            format!("cannot start service {}: command {argv:?}{dir}: {e}", self.cfg.name)
        })?;
        let pid = child.id().ok_or("the service exited before its PID could be read")?;

        std::fs::create_dir_all(&self.wiring.data_dir).ok();
        let log_path = self.wiring.data_dir.join(format!("{}.log", self.cfg.name));
        let log_file =
            std::fs::OpenOptions::new().create(true).append(true).open(&log_path).ok().map(|f| Arc::new(Mutex::new(f)));
        let generation = self.generation;
        let mut readers = Vec::new();
        for (stream, reader) in [
            ("stdout", child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>)),
            ("stderr", child.stderr.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>)),
        ] {
            let Some(reader) = reader else { continue };
            let tx = self.internal_tx.clone();
            let file = log_file.clone();
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(reader).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(f) = &file {
                        let _ = writeln!(f.lock().expect("log file lock"), "{line}");
                    }
                    if tx.send(Internal::Log { generation, stream, line }).is_err() {
                        return;
                    }
                }
            }));
        }
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // Let the last lines it printed (often the reason it died) arrive
            // first. A child still holding the pipes would keep them open, so
            // the wait is bounded.
            let _ = tokio::time::timeout(OUTPUT_DRAIN, join_readers(readers)).await;
            let _ = tx.send(Internal::Exited { generation, status });
        });

        let base_url = subst(&self.cfg.base_url);
        let probe_cancel = CancellationToken::new();
        tokio::spawn(probe::poll(
            format!("{}{}", base_url.trim_end_matches('/'), self.cfg.readiness.path),
            self.cfg.readiness.poll_ceiling,
            generation,
            self.probe_tx.clone(),
            probe_cancel.clone(),
        ));
        Ok(Running { pid, base_url, probe_cancel, started: Instant::now() })
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
                let _ = killpg(Pid::from_raw(run.pid as i32), self.cfg.stop_signal);
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
            let _ = killpg(Pid::from_raw(run.pid as i32), Signal::SIGKILL);
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
                self.wiring.journal.append(event::Kind::Log(proto::LogLine {
                    service: self.cfg.name.clone(),
                    stream: stream.into(),
                    line,
                }));
            }
            Internal::Exited { generation, status } => {
                if generation != self.generation {
                    return;
                }
                self.exited(status).await;
            }
        }
    }

    async fn exited(&mut self, status: std::io::Result<std::process::ExitStatus>) {
        let Some(run) = self.run.take() else { return };
        run.probe_cancel.cancel();
        let stop = self.stop.take();
        let exit = classify(status.ok(), stop.as_ref().map(|s| s.escalated));
        // Nothing of the group may outlive its leader.
        let group_gone = kill_group(run.pid).await;
        if !group_gone {
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
                let reason = if stage == Stage::Ready {
                    format!("the service exited {exit} while serving")
                } else {
                    format!("the service exited {exit} while loading")
                };
                let message = self.failure_message(name, &reason);
                self.transition(name, Stage::Failed, &format!("process exited {exit}"), Some(message));
            }
        }
        if let Some(stop) = stop {
            for w in stop.waiters {
                let _ = w.send(exit);
            }
        }
        // A restart someone asked for: start again and answer them.
        let pending = std::mem::take(&mut self.pending);
        if self.cancel.is_cancelled() {
            for p in pending {
                let _ = p.reply.send(Err(SupervisorError::Closed));
            }
        } else if !pending.is_empty() {
            let all: Vec<String> = pending.iter().flat_map(|p| p.models.clone()).collect();
            self.start(&all);
            for p in pending {
                let outcome = self.ensure(&p.models, p.timeout);
                let _ = p.reply.send(Ok(outcome));
            }
        }
    }

    fn observe(&mut self, obs: Observation) {
        let Observation::Answered { body, .. } = obs else {
            return;
        };
        let text = String::from_utf8_lossy(&body[..body.len().min(probe::PAYLOAD_EXCERPT)]).into_owned();
        self.last_payload = Some(text);
        let Ok(payload) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return;
        };
        let names: Vec<String> = self.models.keys().cloned().collect();
        for name in names {
            let track = &self.models[&name];
            if !track.wanted || track.stage == Stage::Failed {
                continue;
            }
            let Some(health) = probe::model_health(&payload, &name) else {
                continue;
            };
            match health.stage {
                None => {
                    if track.stage == Stage::Ready {
                        self.transition(&name, Stage::Stopped, &format!("health: status={}", health.status), None);
                    } else if self.load_mode(&name) == LoadMode::Endpoint && !track.load_requested {
                        self.request_load(&name);
                    }
                }
                Some(Stage::Failed) => {
                    let reason = health.error.clone().unwrap_or_else(|| "the service reported status=failed".into());
                    let message = self.failure_message(&name, &reason);
                    self.transition(&name, Stage::Failed, &format!("health: status={}", health.status), Some(message));
                }
                Some(stage) => {
                    let track = self.models.get_mut(&name).expect("model");
                    let moved = (health.progress - track.progress).abs() >= 0.05
                        || (health.progress == 1.0 && track.progress != 1.0);
                    if stage != track.stage || moved {
                        track.progress = health.progress;
                        self.transition(&name, stage, &format!("health: status={}", health.status), None);
                    }
                }
            }
        }
    }

    fn request_load(&mut self, model: &str) {
        let Some(run) = &self.run else { return };
        if let Some(t) = self.models.get_mut(model) {
            t.load_requested = true;
        }
        let url = format!("{}/models/{model}/load", run.base_url.trim_end_matches('/'));
        let service = self.cfg.name.clone();
        tokio::spawn(async move {
            match reqwest::Client::new().post(&url).send().await {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    tracing::warn!(%service, %url, status = %r.status(), "load request refused")
                }
                Err(error) => tracing::warn!(%service, %url, %error, "load request failed"),
            }
        });
    }

    fn check_timeouts(&mut self) {
        let now = Instant::now();
        let expired: Vec<(String, Duration)> = self
            .models
            .iter()
            .filter(|(_, t)| !t.stage.is_terminal() && t.wanted)
            .filter_map(|(n, t)| t.deadline.filter(|(at, _)| *at <= now).map(|(_, limit)| (n.clone(), limit)))
            .collect();
        for (name, limit) in expired {
            let reason = format!(
                "load timed out after {}s (raise it with --model-timeout, the suite's `timeout`, \
                 MODEL_LOADING_TIMEOUT or the agent config)",
                limit.as_secs_f64()
            );
            let message = self.failure_message(&name, &reason);
            self.transition(&name, Stage::Failed, "load timeout", Some(message));
        }
    }

    /// The full story of a failed load (DESIGN §4): model, stage, time there,
    /// reason, last health payload, memory, last log lines.
    fn failure_message(&self, model: &str, reason: &str) -> String {
        let track = &self.models[model];
        let memory = self.wiring.samples.borrow().get(&self.cfg.name).copied().unwrap_or_default();
        let mut out = format!(
            "model {model} failed in stage {} after {:.1}s there ({:.1}s since load began): {reason}",
            track.stage.label(),
            track.since.elapsed().as_secs_f64(),
            track.load_started.elapsed().as_secs_f64(),
        );
        out.push_str(&format!(
            "\n  service memory: current {} MiB, peak {} MiB",
            memory.rss_bytes / (1024 * 1024),
            memory.peak_rss_bytes / (1024 * 1024)
        ));
        out.push_str(&format!(
            "\n  last health payload: {}",
            self.last_payload.as_deref().unwrap_or("(none: the service never answered)")
        ));
        if self.logs.is_empty() {
            out.push_str("\n  last log lines: (none)");
        } else {
            out.push_str(&format!("\n  last {} log lines:", self.logs.len()));
            for line in &self.logs {
                out.push_str("\n    ");
                out.push_str(line);
            }
        }
        out
    }

    fn transition(&mut self, model: &str, to: Stage, cause: &str, message: Option<String>) {
        let Some(track) = self.models.get_mut(model) else {
            return;
        };
        let from = track.stage;
        if from != to {
            track.stage = to;
            track.since = Instant::now();
            if to == Stage::ProcessStarting {
                track.progress = 0.0;
            }
        }
        if to.is_terminal() {
            track.deadline = None;
            if to == Stage::Ready {
                track.progress = 1.0;
            }
        }
        if to == Stage::Failed {
            tracing::warn!(service = %self.cfg.name, model, cause, "model failed");
        } else if from != to {
            tracing::info!(service = %self.cfg.name, model, from = from.label(), to = to.label(), cause, "stage");
        }
        self.wiring.journal.append(event::Kind::StageChanged(proto::StageChanged {
            service: self.cfg.name.clone(),
            model: model.to_owned(),
            from: from.into(),
            to: to.into(),
            cause: cause.to_owned(),
            progress: track.progress,
            message: message.unwrap_or_default(),
        }));
    }
}

/// Explains an exit. `stop` is `Some(escalated)` when the agent stopped it.
pub fn classify(status: Option<std::process::ExitStatus>, stop: Option<bool>) -> ExitStatus {
    let (code, signal) = status.map_or((None, None), |s| (s.code(), s.signal()));
    let kind = match (stop, code, signal) {
        (Some(true), _, _) => ExitKind::KilledAfterGrace,
        (Some(false), _, _) => ExitKind::StoppedGracefully,
        (None, Some(0), _) => ExitKind::Clean,
        (None, Some(_), _) => ExitKind::Crashed,
        (None, None, Some(_)) => ExitKind::Signaled,
        (None, None, None) => ExitKind::Unknown,
    };
    ExitStatus { kind: kind.into(), code: code.unwrap_or(0), signal: signal.unwrap_or(0) }
}

async fn join_readers(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

/// SIGKILLs what is left of a process group and waits for it to be empty.
async fn kill_group(pgid: u32) -> bool {
    let group = Pid::from_raw(-(pgid as i32));
    let _ = killpg(Pid::from_raw(pgid as i32), Signal::SIGKILL);
    let deadline = Instant::now() + GROUP_EXIT_DEADLINE;
    while Instant::now() < deadline {
        if kill(group, None).is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::ExitStatus as Std;

    #[test]
    fn classifies_every_exit() {
        // Raw wait statuses: exit code in the high byte, signal in the low bits.
        let exited = |code: i32| Some(Std::from_raw(code << 8));
        let signaled = |sig: i32| Some(Std::from_raw(sig));
        let table = [
            (exited(0), None, "CLEAN"),
            (exited(3), None, "CRASHED(3)"),
            (signaled(9), None, "SIGNALED(9)"),
            (exited(0), Some(false), "STOPPED_GRACEFULLY"),
            (signaled(15), Some(false), "STOPPED_GRACEFULLY"),
            (signaled(9), Some(true), "KILLED_AFTER_GRACE"),
            (None, None, "UNKNOWN"),
        ];
        for (status, stop, want) in table {
            assert_eq!(classify(status, stop).to_string(), want, "{status:?} {stop:?}");
        }
    }
}
