//! The per-model stage machine, pure: it holds each model's truth (stage,
//! progress, deadline, warm-up and load-request state) and turns inputs —
//! readiness readings, log lines, resource signals, warm-up and load-request
//! answers, process starts and ends, the time — into `Action`s the
//! supervisor carries out (journal a change, send a request, stop the
//! service). No clock is read here: every input carries `now`.

use std::collections::BTreeMap;
use std::time::Duration;

use proto::Stage;
use tokio::time::Instant;

use crate::config::{LoadMode, ModelConfig, StallLimits};
use crate::probe::{ProbeCost, Reading};
use crate::sampling::TreeMemory;

/// RSS must move by this much between two samples to count as progress.
pub const RSS_PROGRESS_BYTES: u64 = 1024 * 1024;
/// So must the service's GPU memory: a model loading straight into the GPU
/// barely moves RSS.
pub const GPU_PROGRESS_BYTES: u64 = 1024 * 1024;
/// The tree must use this share of one core between two samples.
pub const CPU_PROGRESS_SHARE: f64 = 0.05;
/// Bytes read + written between two samples (files, pipes, sockets).
pub const IO_PROGRESS_BYTES: u64 = 64 * 1024;
/// Pause between failed warm-up attempts.
const WARMUP_RETRY: Duration = Duration::from_millis(250);
/// Pause before asking again after a refused endpoint-mode load request;
/// it doubles up to `LOAD_RETRY_MAX`.
const LOAD_RETRY_FIRST: Duration = Duration::from_millis(250);
const LOAD_RETRY_MAX: Duration = Duration::from_secs(5);
/// How long a FAILED match on a traceback waits for its exception line.
const TRACEBACK_WAIT: Duration = Duration::from_secs(2);

/// Says which progress signal, if any, moved between two samples of a
/// tree, after taking out what the agent's own probes cost it (their
/// answers' wall time from its CPU, their bytes from its I/O): probe
/// traffic never counts as progress.
pub fn progress_signal(
    before: &TreeMemory,
    after: &TreeMemory,
    elapsed: Duration,
    probes: ProbeCost,
) -> Option<String> {
    let rss = after.rss_bytes.abs_diff(before.rss_bytes);
    if rss >= RSS_PROGRESS_BYTES {
        return Some(format!("RSS moved {} MiB", rss / (1024 * 1024)));
    }
    let gpu = after.gpu_bytes.abs_diff(before.gpu_bytes);
    if gpu >= GPU_PROGRESS_BYTES {
        return Some(format!("GPU memory moved {} MiB", gpu / (1024 * 1024)));
    }
    let io = after.io_bytes.saturating_sub(before.io_bytes).saturating_sub(probes.bytes);
    if io >= IO_PROGRESS_BYTES {
        return Some(format!("{} KiB of I/O", io / 1024));
    }
    let cpu = after.cpu_ms.saturating_sub(before.cpu_ms).saturating_sub(probes.wall.as_millis() as u64);
    if elapsed > Duration::ZERO && cpu as f64 >= CPU_PROGRESS_SHARE * elapsed.as_millis() as f64 {
        return Some(format!("{cpu} ms of CPU"));
    }
    None
}

/// Which loading model a service-wide resource signal (RSS, CPU, I/O)
/// counts for: the only one loading. With several loading it cannot be told
/// whose it is, so it counts for none — each must show progress of its own
/// (a stage or progress change), or one model's growth would hide another's
/// hang.
pub fn attribute_signal(loading: &[String]) -> Option<&String> {
    match loading {
        [only] => Some(only),
        _ => None,
    }
}

/// The loading stage after a probe reports `reported`: forward only, like log
/// patterns, so a probe that lags behind a log line never moves a model back.
pub fn loading_stage(current: Stage, reported: Stage) -> Stage {
    let back = Stage::LOADING.contains(&current) && Stage::LOADING.contains(&reported) && reported < current;
    if back { current } else { reported }
}

/// The stage a log line marks, if it moves the model forward (or fails it).
pub fn log_stage(patterns: &[(Stage, regex::Regex)], current: Stage, line: &str) -> Option<Stage> {
    let (stage, _) = patterns.iter().find(|(_, re)| re.is_match(line))?;
    let forward = Stage::LOADING.contains(stage) && (*stage as i32) > (current as i32);
    (forward || *stage == Stage::Failed).then_some(*stage)
}

/// Shortens a quoted line for a message.
pub fn cut(line: &str) -> String {
    let mut s: String = line.chars().take(160).collect();
    if s.len() < line.len() {
        s.push('…');
    }
    s
}

/// What the supervisor must do after an input.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// A model moved (or re-reported its stage with new progress).
    Changed(Change),
    /// Send the endpoint-mode load request for this model.
    RequestLoad(String),
    /// Send one warm-up request for this model.
    WarmUp(String),
    /// A load failed by stall or timeout and nothing else of the service
    /// lives: stop it, so it gives its memory back.
    StopService,
}

/// One transition, as the journal tells it.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub model: String,
    pub from: Stage,
    pub to: Stage,
    pub cause: String,
    pub progress: f64,
    pub message: Option<String>,
    /// A failure whose message should quote the service (memory, health
    /// payload, log lines): the supervisor appends them.
    pub quote_service: bool,
    /// The model's admission reservation ends here.
    pub release: bool,
}

/// How a service run ended, for its models.
#[derive(Clone, Debug)]
pub enum Ended {
    /// Asked to stop; the reason, when it is not a plain stop.
    Stopped(Option<String>),
    /// Exited unasked: the cause (`process exited …`) and the reason for a
    /// model that was loading and one that was serving.
    Died { cause: String, loading: String, serving: String },
}

/// What `want` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    AlreadyReady,
    Loading,
}

/// How one model is told apart: from its config.
#[derive(Clone, Debug)]
struct Rules {
    load: LoadMode,
    warmup: bool,
    log_patterns: Vec<(Stage, regex::Regex)>,
    stall: StallLimits,
}

/// Warm-up state while a model is `WARMING_UP`.
#[derive(Clone, Debug, Default)]
struct Warm {
    in_flight: bool,
    last_attempt: Option<Instant>,
    last_error: Option<String>,
    attempts: u32,
}

/// Endpoint-mode load requests: sent for this run, the last refusal, when
/// to ask again, and the pause after the next refusal.
#[derive(Clone, Debug)]
struct Ask {
    requested: bool,
    refusal: Option<String>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Ask {
    fn fresh() -> Ask {
        Ask { requested: false, refusal: None, retry_at: None, backoff: LOAD_RETRY_FIRST }
    }

    fn due(&self, now: Instant) -> bool {
        !self.requested && self.retry_at.is_none_or(|at| at <= now)
    }
}

/// One model's truth.
#[derive(Clone, Debug)]
struct Model {
    rules: Rules,
    stage: Stage,
    since: Instant,
    progress: f64,
    /// When the current load began (service start, or load request).
    load_started: Instant,
    deadline: Option<(Instant, Duration)>,
    /// Who set the deadline's limit, for the timeout message.
    limit_source: String,
    /// Last sign of progress: a transition, or a resource signal.
    last_progress: Instant,
    /// Which resource signal it was (`None`: a stage or progress change).
    last_signal: Option<String>,
    ask: Ask,
    /// Endpoint-mode models only take part once asked for.
    wanted: bool,
    /// Holds an admission reservation until its load ends.
    reserved: bool,
    warm: Warm,
}

impl Model {
    fn loading(&self) -> bool {
        self.wanted && !self.stage.is_terminal()
    }
}

/// Every model of one service.
#[derive(Debug)]
pub struct Machine {
    models: BTreeMap<String, Model>,
    /// FAILED log-pattern matches on a traceback's first line, held until
    /// its exception line arrives: (model, matched line, when).
    pending_failed: Vec<(String, String, Instant)>,
    protocol: &'static str,
    stop_after_failed_load: bool,
}

impl Machine {
    pub fn new(models: &[ModelConfig], protocol: &'static str, stop_after_failed_load: bool, now: Instant) -> Machine {
        let models = models
            .iter()
            .map(|m| {
                let rules = Rules {
                    load: m.load,
                    warmup: m.warmup.is_some(),
                    log_patterns: m.log_patterns.clone(),
                    stall: m.stall.clone(),
                };
                (m.name.clone(), Model::stopped(rules, now))
            })
            .collect();
        Machine { models, pending_failed: Vec::new(), protocol, stop_after_failed_load }
    }

    pub fn names(&self) -> Vec<String> {
        self.models.keys().cloned().collect()
    }

    pub fn stage(&self, model: &str) -> Option<Stage> {
        self.models.get(model).map(|m| m.stage)
    }

    pub fn reserved(&self, model: &str) -> bool {
        self.models.get(model).is_some_and(|m| m.reserved)
    }

    pub fn reserve(&mut self, model: &str) {
        if let Some(m) = self.models.get_mut(model) {
            m.reserved = true;
        }
    }

    /// Some wanted model is still loading.
    pub fn loading(&self) -> bool {
        self.models.values().any(Model::loading)
    }

    /// The wanted models still loading.
    pub fn loading_models(&self) -> Vec<String> {
        self.models.iter().filter(|(_, m)| m.loading()).map(|(n, _)| n.clone()).collect()
    }

    /// Whether `tick` has anything to check: a load's limits, or a FAILED
    /// match waiting for its traceback's end.
    pub fn wants_ticks(&self) -> bool {
        self.loading() || !self.pending_failed.is_empty()
    }

    pub fn wanted(&self) -> Vec<String> {
        self.models.iter().filter(|(_, m)| m.wanted).map(|(n, _)| n.clone()).collect()
    }

    /// Whether loading `models` again needs the service restarted: an
    /// at-start model that failed or stopped loads only when it starts.
    pub fn reload_needs_restart(&self, models: &[String]) -> bool {
        models
            .iter()
            .filter_map(|n| self.models.get(n))
            .any(|m| matches!(m.stage, Stage::Failed | Stage::Stopped) && m.rules.load == LoadMode::AtStart)
    }

    /// The service is starting (`requested` are asked for now; at-start
    /// models come along).
    pub fn starting(&mut self, requested: &[String], now: Instant) -> Vec<Action> {
        self.pending_failed.clear();
        let mut out = Vec::new();
        for name in self.names() {
            let m = self.models.get_mut(&name).expect("model");
            m.ask.requested = false;
            m.deadline = None;
            m.load_started = now;
            if m.rules.load == LoadMode::AtStart || requested.contains(&name) {
                m.wanted = true;
                out.extend(self.transition(&name, Stage::ProcessStarting, "service starting", None, now));
            }
        }
        out
    }

    /// The process is up: its starting models wait for HTTP.
    pub fn spawned(&mut self, now: Instant) -> Vec<Action> {
        self.each_in(Stage::ProcessStarting, |m, name| {
            m.transition(name, Stage::WaitingForHttp, "process spawned", None, now)
        })
    }

    /// The process could not be spawned.
    pub fn launch_failed(&mut self, message: &str, now: Instant) -> Vec<Action> {
        self.each_in(Stage::ProcessStarting, |m, name| {
            let text = format!("model {name} failed in stage PROCESS_STARTING: {message}");
            m.transition(name, Stage::Failed, "launch failed", Some(text), now)
        })
    }

    /// Re-attached to a service a previous agent started: its at-start
    /// models carry on loading, and the probe tells where they are.
    pub fn reattached(&mut self, cause: &str, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        for name in self.names() {
            let m = self.models.get_mut(&name).expect("model");
            if m.rules.load == LoadMode::AtStart {
                m.wanted = true;
                out.extend(self.transition(&name, Stage::WaitingForHttp, cause, None, now));
            }
        }
        out
    }

    fn each_in(&mut self, stage: Stage, mut f: impl FnMut(&mut Machine, &str) -> Vec<Action>) -> Vec<Action> {
        let names: Vec<String> = self.models.iter().filter(|(_, m)| m.stage == stage).map(|(n, _)| n.clone()).collect();
        names.iter().flat_map(|n| f(self, n)).collect()
    }

    /// An ensure asks for `model` with this load limit: READY already, or
    /// loading (an endpoint-mode model on a running service starts its load
    /// from here).
    pub fn want(&mut self, model: &str, running: bool, limit: (Duration, String), now: Instant) -> (Want, Vec<Action>) {
        let Some(m) = self.models.get_mut(model) else { return (Want::Loading, Vec::new()) };
        m.wanted = true;
        if m.stage == Stage::Ready {
            return (Want::AlreadyReady, Vec::new());
        }
        let mut out = Vec::new();
        if m.rules.load == LoadMode::Endpoint && running && matches!(m.stage, Stage::Stopped | Stage::Failed) {
            m.ask = Ask::fresh();
            m.load_started = now;
            out = self.transition(model, Stage::WaitingForHttp, "load requested", None, now);
        }
        let m = self.models.get_mut(model).expect("model");
        m.deadline = Some((m.load_started + limit.0, limit.0));
        m.limit_source = limit.1;
        (Want::Loading, out)
    }

    /// One round of readiness answers from a service that answered HTTP.
    pub fn observe(&mut self, reading: &Reading, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        for name in self.names() {
            let m = &self.models[&name];
            if !m.wanted || matches!(m.stage, Stage::Failed | Stage::Stopped) {
                continue;
            }
            let ask = m.rules.load == LoadMode::Endpoint && m.ask.due(now);
            let health = reading.models.get(&name);
            let cause = health.map(|h| format!("{}: status={}", self.protocol, h.status)).unwrap_or_default();
            let actions = match health.map(|h| (h.stage, h)) {
                None | Some((None, _)) if ask => self.request_load(&name),
                None => Vec::new(),
                Some((None, _)) if m.stage == Stage::Ready => self.transition(&name, Stage::Stopped, &cause, None, now),
                Some((None, _)) => Vec::new(),
                // A failure the service still reports from before this load
                // was asked for: ask (again) rather than fail on stale news.
                Some((Some(Stage::Failed), _)) if ask => self.request_load(&name),
                Some((Some(Stage::Failed), h)) => {
                    let reason = h.error.clone().unwrap_or_else(|| format!("the service reported {cause}"));
                    self.fail(&name, &cause, &reason, now)
                }
                Some((Some(Stage::Ready), _)) => self.served(&name, &cause, now),
                Some((Some(reported), h)) => self.loading_reported(&name, reported, h.progress, &cause, now),
            };
            out.extend(actions);
        }
        out
    }

    fn loading_reported(
        &mut self,
        name: &str,
        reported: Stage,
        progress: f64,
        cause: &str,
        now: Instant,
    ) -> Vec<Action> {
        let m = self.models.get_mut(name).expect("model");
        let stage = loading_stage(m.stage, reported);
        let moved = (progress - m.progress).abs() >= 0.05 || (progress == 1.0 && m.progress != 1.0);
        if stage == m.stage && !moved {
            return Vec::new();
        }
        m.progress = progress;
        self.transition(name, stage, cause, None, now)
    }

    fn request_load(&mut self, name: &str) -> Vec<Action> {
        let m = self.models.get_mut(name).expect("model");
        m.ask.requested = true;
        vec![Action::RequestLoad(name.to_owned())]
    }

    /// The protocol says the model serves: READY, or warm it up first.
    fn served(&mut self, name: &str, cause: &str, now: Instant) -> Vec<Action> {
        let m = &self.models[name];
        if m.stage == Stage::Ready {
            return Vec::new();
        }
        if !m.rules.warmup {
            return self.transition(name, Stage::Ready, cause, None, now);
        }
        let mut out = Vec::new();
        if m.stage != Stage::WarmingUp {
            out = self.transition(name, Stage::WarmingUp, &format!("{cause}; warm-up request before READY"), None, now);
        }
        let warm = &mut self.models.get_mut(name).expect("model").warm;
        let due = warm.last_attempt.is_none_or(|t| now.saturating_duration_since(t) >= WARMUP_RETRY);
        if !warm.in_flight && due {
            warm.in_flight = true;
            warm.last_attempt = Some(now);
            warm.attempts += 1;
            out.push(Action::WarmUp(name.to_owned()));
        }
        out
    }

    /// A warm-up request's outcome: READY on success, else the error is kept
    /// and the next reading tries again.
    pub fn warmed(&mut self, model: &str, outcome: Result<String, String>, now: Instant) -> Vec<Action> {
        let Some(m) = self.models.get_mut(model) else { return Vec::new() };
        m.warm.in_flight = false;
        if m.stage != Stage::WarmingUp {
            return Vec::new();
        }
        match outcome {
            Ok(what) => {
                let cause = format!("warm-up succeeded ({what}, attempt {})", m.warm.attempts);
                self.transition(model, Stage::Ready, &cause, None, now)
            }
            Err(error) => {
                m.warm.last_error = Some(error);
                Vec::new()
            }
        }
    }

    /// A load request's answer: a refusal is remembered for the failure
    /// message and asked again after a doubling pause.
    pub fn load_answered(&mut self, model: &str, refusal: Option<String>, now: Instant) {
        let (Some(m), Some(refusal)) = (self.models.get_mut(model), refusal) else { return };
        m.ask.refusal = Some(cut(&refusal));
        m.ask.requested = false;
        m.ask.retry_at = Some(now + m.ask.backoff);
        m.ask.backoff = (m.ask.backoff * 2).min(LOAD_RETRY_MAX);
    }

    /// A line the service printed: may mark a stage or a failure.
    /// `in_traceback`: the line opened a traceback not yet closed.
    pub fn on_log(&mut self, line: &str, in_traceback: bool, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        for name in self.names() {
            let m = &self.models[&name];
            if !m.wanted || m.stage.is_terminal() {
                continue;
            }
            match log_stage(&m.rules.log_patterns, m.stage, line) {
                // A traceback's first line: wait for its exception line, the
                // part that says what went wrong.
                Some(Stage::Failed) if in_traceback => self.pending_failed.push((name, line.to_owned(), now)),
                Some(Stage::Failed) => out.extend(self.fail(
                    &name,
                    "log pattern FAILED",
                    &format!("the service logged: {}", cut(line)),
                    now,
                )),
                Some(stage) => out.extend(self.transition(&name, stage, &format!("log: {}", cut(line)), None, now)),
                None => {}
            }
        }
        out
    }

    /// A traceback closed with `exception`: the FAILED matches held for it fail now.
    pub fn traceback_closed(&mut self, exception: &str, now: Instant) -> Vec<Action> {
        let held = std::mem::take(&mut self.pending_failed);
        let mut out = Vec::new();
        for (name, first, _) in held {
            let reason = format!("the service logged: {} … {}", cut(&first), cut(exception));
            out.extend(self.fail(&name, "log pattern FAILED", &reason, now));
        }
        out
    }

    /// A service-wide resource signal: progress for the only model loading.
    pub fn on_signal(&mut self, signal: &str, now: Instant) {
        let loading: Vec<String> = self.models.iter().filter(|(_, m)| m.loading()).map(|(n, _)| n.clone()).collect();
        if let Some(m) = attribute_signal(&loading).cloned().and_then(|name| self.models.get_mut(&name)) {
            m.last_progress = now;
            m.last_signal = Some(format!("{signal} in the service, the only model loading"));
        }
    }

    /// Load timeouts, stalls and held traceback failures, on a short tick
    /// while the service runs.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut out = self.flush_pending_failed(now);
        let mut gave_up = false;
        for name in self.names() {
            let m = &self.models[&name];
            if !m.loading() {
                continue;
            }
            let (cause, reason) = match m.deadline.filter(|(at, _)| *at <= now) {
                // Name where the limit came from: that is where to raise it.
                Some((_, limit)) => ("load timeout", timeout_reason(limit, &m.limit_source)),
                None => {
                    let limit = m.rules.stall.for_stage(m.stage);
                    if now.saturating_duration_since(m.last_progress) < limit {
                        continue;
                    }
                    ("stall timeout", stall_reason(limit, m.stage))
                }
            };
            out.extend(self.fail(&name, cause, &reason, now));
            gave_up = true;
        }
        // A hung service holds its memory: stop it — unless another model of
        // it is READY or still loading, or the config keeps it for inspection.
        let alive = self.models.values().any(|m| m.wanted && (m.stage == Stage::Ready || !m.stage.is_terminal()));
        if gave_up && self.stop_after_failed_load && !alive {
            out.push(Action::StopService);
        }
        out
    }

    fn flush_pending_failed(&mut self, now: Instant) -> Vec<Action> {
        let (due, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_failed)
            .into_iter()
            .partition(|(_, _, at)| now.saturating_duration_since(*at) >= TRACEBACK_WAIT);
        self.pending_failed = kept;
        let mut out = Vec::new();
        for (name, first, _) in due {
            out.extend(self.fail(&name, "log pattern FAILED", &format!("the service logged: {}", cut(&first)), now));
        }
        out
    }

    /// The service ended: its live models stop or fail with it.
    pub fn ended(&mut self, end: &Ended, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        for name in self.names() {
            let stage = self.models[&name].stage;
            if matches!(stage, Stage::Stopped | Stage::Failed) {
                continue;
            }
            out.extend(match end {
                Ended::Stopped(reason) => {
                    self.transition(&name, Stage::Stopped, "service stopped", reason.clone(), now)
                }
                Ended::Died { cause, loading, serving } => {
                    let reason = if stage == Stage::Ready { serving } else { loading };
                    self.fail(&name, cause, reason, now)
                }
            });
        }
        out
    }

    /// Some model was READY when the service ended (for the restart backoff).
    pub fn any_ready(&self) -> bool {
        self.models.values().any(|m| m.stage == Stage::Ready)
    }

    fn fail(&mut self, model: &str, cause: &str, reason: &str, now: Instant) -> Vec<Action> {
        let message = self.story(model, reason, now);
        let mut out = self.transition(model, Stage::Failed, cause, Some(message), now);
        if let Some(Action::Changed(c)) = out.first_mut() {
            c.quote_service = true;
        }
        out
    }

    /// The model's part of a failure's story (DESIGN §4): stage, time there,
    /// reason, last progress, last load refusal and warm-up error.
    fn story(&self, model: &str, reason: &str, now: Instant) -> String {
        let m = &self.models[model];
        let ago = |t: Instant| now.saturating_duration_since(t).as_secs_f64();
        let mut out = format!(
            "model {model} failed in stage {} after {:.1}s there ({:.1}s since load began): {reason}",
            m.stage.label(),
            ago(m.since),
            ago(m.load_started),
        );
        let signal = m.last_signal.as_deref().unwrap_or("a stage change");
        out.push_str(&format!("\n  last progress: {:.1}s ago ({signal})", ago(m.last_progress)));
        if let Some(r) = &m.ask.refusal {
            out.push_str(&format!("\n  last load request: {r}"));
        }
        if let Some(e) = &m.warm.last_error {
            out.push_str(&format!("\n  last warm-up attempt ({} in all): {e}", m.warm.attempts));
        }
        out
    }

    fn transition(
        &mut self,
        model: &str,
        to: Stage,
        cause: &str,
        message: Option<String>,
        now: Instant,
    ) -> Vec<Action> {
        let Some(m) = self.models.get_mut(model) else { return Vec::new() };
        let from = m.stage;
        m.last_progress = now;
        m.last_signal = None;
        if from != to {
            m.stage = to;
            m.since = now;
            if to == Stage::ProcessStarting {
                m.progress = 0.0;
                m.warm = Warm::default();
            }
        }
        let mut release = false;
        if to.is_terminal() {
            m.deadline = None;
            if to == Stage::Ready {
                m.progress = 1.0;
            }
            release = std::mem::take(&mut m.reserved);
        }
        let change = Change {
            model: model.to_owned(),
            from,
            to,
            cause: cause.to_owned(),
            progress: m.progress,
            message,
            quote_service: false,
            release,
        };
        vec![Action::Changed(change)]
    }
}

impl Model {
    fn stopped(rules: Rules, now: Instant) -> Model {
        Model {
            rules,
            stage: Stage::Stopped,
            since: now,
            progress: 0.0,
            load_started: now,
            deadline: None,
            limit_source: String::new(),
            last_progress: now,
            last_signal: None,
            ask: Ask::fresh(),
            wanted: false,
            reserved: false,
            warm: Warm::default(),
        }
    }
}

fn timeout_reason(limit: Duration, source: &str) -> String {
    format!(
        "load timed out after {}s (the limit was set by {source}; raise it there, or with --model-timeout)",
        limit.as_secs_f64()
    )
}

fn stall_reason(limit: Duration, stage: Stage) -> String {
    format!(
        "stalled: no progress for {}s in {} (no stage or progress change, RSS and GPU memory moved < 1 MiB, CPU < \
         5% of a core, I/O < 64 KiB between samples, not counting the agent's own probes); the stall limit is \
         `stall` in the agent config",
        limit.as_secs_f64(),
        stage.label()
    )
}

#[cfg(test)]
mod tests;
