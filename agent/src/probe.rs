//! Readiness probing: the protocols a service can speak (DESIGN §3), each a
//! pure mapping from HTTP answers to per-model stages, and the adaptive poll
//! loop that collects those answers.
//!
//! | protocol | asks | a model is READY when |
//! |---|---|---|
//! | `health-json` | `GET <path>` | its status (JSON pointer) maps to `READY` |
//! | `kserve-v2` | `/v2/health/live`, `/v2/models/<m>/ready` | its ready endpoint answers 200 |
//! | `openai` | `/health`, `/v1/models` | `/health` is 200 and the model is listed |
//! | `tgi` | `/health`, `/info` | `/health` is 200 (and `/info` names the model) |
//! | `ollama` | `/api/ps` | the model is listed as running |
//! | `http` | `GET <path>` | the path answers 2xx |
//!
//! "Ready" from a protocol means "the server says so"; a configured warm-up
//! request (see the supervisor) decides whether the model can really serve.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use proto::Stage;
use serde_json::Value;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// First poll interval after a change; doubles up to the ceiling while
/// nothing changes, and snaps back on every change.
pub const FAST_POLL: Duration = Duration::from_millis(250);
/// Never more than this many probe rounds in any one second, however often
/// the service writes output.
pub const MAX_ROUNDS_PER_SECOND: usize = 4;
/// Bytes a probe costs the service beyond the body it sends back: the
/// request it reads and the response headers it writes.
const PROBE_OVERHEAD_BYTES: u64 = 256;
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes of a health payload kept for failure messages.
pub const PAYLOAD_EXCERPT: usize = 1024;

#[derive(Clone, Debug, PartialEq)]
pub enum Protocol {
    HealthJson(HealthJson),
    KserveV2,
    OpenAi,
    Tgi,
    Ollama,
    Http { path: String },
}

/// The `health-json` protocol: one JSON document with a status per model.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthJson {
    pub path: String,
    /// JSON pointers; `{model}` is replaced by the served model name.
    pub status_pointer: String,
    pub progress_pointer: String,
    pub error_pointer: String,
    /// Service status word → stage. Words not in the map leave the stage as is.
    pub map: BTreeMap<String, Stage>,
    pub progress_scale: ProgressScale,
}

/// How a service writes progress (`progress_scale` in the config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProgressScale {
    /// 0–1, and any value above 1 means the service counts 0–100.
    #[default]
    Auto,
    /// 0–1.
    Fraction,
    /// 0–100 (a service reporting "1" means 1 %).
    Percent,
}

impl ProgressScale {
    /// The progress as a fraction in [0, 1].
    pub fn read(self, value: f64) -> f64 {
        let fraction = match self {
            ProgressScale::Percent => value / 100.0,
            ProgressScale::Auto if value > 1.0 => value / 100.0,
            _ => value,
        };
        fraction.clamp(0.0, 1.0)
    }
}

impl HealthJson {
    /// The translation API contract's statuses (DESIGN §3).
    pub fn default_map() -> BTreeMap<String, Stage> {
        [
            ("authenticating", Stage::Authenticating),
            ("downloading", Stage::Downloading),
            ("loading", Stage::LoadingWeights),
            ("warming_up", Stage::WarmingUp),
            ("loaded", Stage::Ready),
            ("failed", Stage::Failed),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// One HTTP answer, or why there was none.
pub type Answer = Result<(u16, Vec<u8>), String>;

/// What one model looks like to the protocol.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelHealth {
    /// The service's own word for the status, e.g. `downloading`.
    pub status: String,
    /// Mapped stage; `None` when the protocol says nothing about the model yet.
    pub stage: Option<Stage>,
    pub progress: f64,
    pub error: Option<String>,
}

impl ModelHealth {
    fn new(status: impl Into<String>, stage: Option<Stage>) -> ModelHealth {
        ModelHealth { status: status.into(), stage, progress: 0.0, error: None }
    }
}

/// A protocol's reading of one round of answers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reading {
    /// The service answered HTTP at all.
    pub up: bool,
    /// By our model name; models the protocol says nothing about are absent.
    pub models: BTreeMap<String, ModelHealth>,
    /// What was seen, shortened, for failure messages.
    pub payload: String,
}

/// A model as the protocol knows it: our name and the service's name for it.
#[derive(Clone, Debug)]
pub struct Named {
    pub name: String,
    pub served_as: String,
}

impl Protocol {
    pub const NAMES: [&'static str; 6] = ["health-json", "kserve-v2", "openai", "tgi", "ollama", "http"];

    pub fn name(&self) -> &'static str {
        match self {
            Protocol::HealthJson(_) => "health-json",
            Protocol::KserveV2 => "kserve-v2",
            Protocol::OpenAi => "openai",
            Protocol::Tgi => "tgi",
            Protocol::Ollama => "ollama",
            Protocol::Http { .. } => "http",
        }
    }

    /// The paths to GET on every poll, in the order `read` expects answers.
    pub fn paths(&self, models: &[Named]) -> Vec<String> {
        match self {
            Protocol::HealthJson(h) => vec![h.path.clone()],
            Protocol::KserveV2 => std::iter::once("/v2/health/live".to_owned())
                .chain(models.iter().map(|m| format!("/v2/models/{}/ready", m.served_as)))
                .collect(),
            Protocol::OpenAi => vec!["/health".into(), "/v1/models".into()],
            Protocol::Tgi => vec!["/health".into(), "/info".into()],
            Protocol::Ollama => vec!["/api/ps".into()],
            Protocol::Http { path } => vec![path.clone()],
        }
    }

    /// Interprets one round of answers (one per path of `paths`).
    pub fn read(&self, models: &[Named], answers: &[Answer]) -> Reading {
        let mut reading = Reading { payload: payload(&self.paths(models), answers), ..Reading::default() };
        let r = &mut reading;
        match self {
            Protocol::HealthJson(h) => read_health_json(h, models, answers, r),
            Protocol::KserveV2 => read_kserve_v2(models, answers, r),
            Protocol::OpenAi => read_openai(models, answers, r),
            Protocol::Tgi => read_tgi(models, answers, r),
            Protocol::Ollama => read_ollama(models, answers, r),
            Protocol::Http { .. } => read_http(models, answers, r),
        }
        reading
    }
}

/// The answer to the `i`th path, if it came.
fn ok(answers: &[Answer], i: usize) -> Option<&(u16, Vec<u8>)> {
    answers.get(i).and_then(|a| a.as_ref().ok())
}

/// The answer to the `i`th path as JSON, if it came and parses.
fn json(answers: &[Answer], i: usize) -> Option<Value> {
    ok(answers, i).and_then(|(_, body)| serde_json::from_slice::<Value>(body).ok())
}

fn read_health_json(h: &HealthJson, models: &[Named], answers: &[Answer], reading: &mut Reading) {
    let Some((_, body)) = ok(answers, 0) else { return };
    reading.up = true;
    let Ok(doc) = serde_json::from_slice::<Value>(body) else { return };
    for m in models {
        let at = |template: &str| doc.pointer(&template.replace("{model}", &pointer_token(&m.served_as)));
        let Some(status) = at(&h.status_pointer).and_then(Value::as_str) else { continue };
        let mut health = ModelHealth::new(status, h.map.get(status).copied());
        let progress = at(&h.progress_pointer).and_then(Value::as_f64).unwrap_or(0.0);
        health.progress = h.progress_scale.read(progress);
        health.error = at(&h.error_pointer).and_then(Value::as_str).map(str::to_owned);
        reading.models.insert(m.name.clone(), health);
    }
}

fn read_kserve_v2(models: &[Named], answers: &[Answer], reading: &mut Reading) {
    let Some((live, _)) = ok(answers, 0) else { return };
    reading.up = true;
    if *live != 200 {
        return;
    }
    for (i, m) in models.iter().enumerate() {
        let health = match ok(answers, i + 1) {
            Some((200, _)) => ModelHealth::new("ready", Some(Stage::Ready)),
            Some((code, _)) => ModelHealth::new(format!("not ready (HTTP {code})"), Some(Stage::LoadingWeights)),
            None => continue,
        };
        reading.models.insert(m.name.clone(), health);
    }
}

fn read_openai(models: &[Named], answers: &[Answer], reading: &mut Reading) {
    let Some((health, body)) = ok(answers, 0) else { return };
    reading.up = true;
    if *health != 200 {
        // Servers that answer before the model loads say so with a non-200.
        let message = error_text(body);
        for m in models {
            let mut h = ModelHealth::new(format!("loading (HTTP {health})"), Some(Stage::LoadingWeights));
            h.error = message.clone();
            reading.models.insert(m.name.clone(), h);
        }
        return;
    }
    let listed: Vec<String> = json(answers, 1)
        .and_then(|d| d.get("data").and_then(Value::as_array).cloned())
        .unwrap_or_default()
        .iter()
        .flat_map(|e| ["id", "root"].map(|k| e.get(k).and_then(Value::as_str).map(str::to_owned)))
        .flatten()
        .collect();
    for m in models {
        let health = if listed.contains(&m.served_as) {
            ModelHealth::new("listed", Some(Stage::Ready))
        } else {
            ModelHealth::new("not listed in /v1/models", Some(Stage::LoadingWeights))
        };
        reading.models.insert(m.name.clone(), health);
    }
}

fn read_tgi(models: &[Named], answers: &[Answer], reading: &mut Reading) {
    let Some((health, body)) = ok(answers, 0) else { return };
    reading.up = true;
    let model_id = json(answers, 1).and_then(|d| d.get("model_id").and_then(Value::as_str).map(str::to_owned));
    for m in models {
        let h = if *health == 200 {
            match &model_id {
                // Checked whether served_as was set or defaulted to
                // the name: READY for another model is a lie.
                Some(id) if *id != m.served_as => {
                    let mut h = ModelHealth::new(format!("serving {id}"), Some(Stage::Failed));
                    h.error = Some(format!(
                        "TGI serves {id}, not {} (set `served_as` to the model id TGI serves)",
                        m.served_as
                    ));
                    h
                }
                _ => ModelHealth::new("healthy", Some(Stage::Ready)),
            }
        } else {
            let mut h = ModelHealth::new(format!("unhealthy (HTTP {health})"), Some(Stage::LoadingWeights));
            h.error = error_text(body);
            h
        };
        reading.models.insert(m.name.clone(), h);
    }
}

fn read_ollama(models: &[Named], answers: &[Answer], reading: &mut Reading) {
    let Some((200, _)) = ok(answers, 0) else {
        reading.up = ok(answers, 0).is_some();
        return;
    };
    reading.up = true;
    let running: Vec<String> = json(answers, 0)
        .and_then(|d| d.get("models").and_then(Value::as_array).cloned())
        .unwrap_or_default()
        .iter()
        .flat_map(|e| ["name", "model"].map(|k| e.get(k).and_then(Value::as_str).map(str::to_owned)))
        .flatten()
        .collect();
    for m in models {
        let tagged = if m.served_as.contains(':') { m.served_as.clone() } else { format!("{}:latest", m.served_as) };
        if running.contains(&m.served_as) || running.contains(&tagged) {
            reading.models.insert(m.name.clone(), ModelHealth::new("running", Some(Stage::Ready)));
        }
    }
}

fn read_http(models: &[Named], answers: &[Answer], reading: &mut Reading) {
    let Some((code, _)) = ok(answers, 0) else { return };
    reading.up = true;
    if (200..300).contains(code) {
        for m in models {
            reading.models.insert(m.name.clone(), ModelHealth::new(format!("HTTP {code}"), Some(Stage::Ready)));
        }
    }
}

/// Escapes a name for use as one JSON pointer token (RFC 6901).
fn pointer_token(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

/// `{"error": "..."}` or `{"error": {"message": "..."}}`, as servers send.
fn error_text(body: &[u8]) -> Option<String> {
    let doc: Value = serde_json::from_slice(body).ok()?;
    let e = doc.get("error")?;
    e.as_str().or_else(|| e.get("message").and_then(Value::as_str)).map(str::to_owned)
}

fn payload(paths: &[String], answers: &[Answer]) -> String {
    let mut out = String::new();
    for (path, answer) in paths.iter().zip(answers) {
        if !out.is_empty() {
            out.push_str(" | ");
        }
        match answer {
            Ok((code, body)) => {
                let text = String::from_utf8_lossy(&body[..body.len().min(PAYLOAD_EXCERPT)]);
                if paths.len() == 1 {
                    out.push_str(text.trim());
                } else {
                    out.push_str(&format!("{path} {code} {}", text.trim()));
                }
            }
            Err(e) => out.push_str(&format!("{path}: {e}")),
        }
    }
    out
}

/// The wait before the next poll. While a model loads (`live` is `None`):
/// fast after a change, doubling while nothing changes, never slower than
/// `ceiling`. Once every model is settled: the liveness cadence, whatever
/// changes (uptime fields must not pin it fast).
pub fn next_interval(previous: Duration, changed: bool, ceiling: Duration, live: Option<Duration>) -> Duration {
    match live {
        Some(cadence) => cadence,
        None if changed => FAST_POLL,
        None => (previous * 2).min(ceiling).max(FAST_POLL),
    }
}

/// What is being polled: the service's base URL and how to read it.
#[derive(Clone, Debug)]
pub struct Target {
    pub base_url: String,
    pub protocol: Protocol,
    pub models: Vec<Named>,
    pub ceiling: Duration,
}

/// What the agent's own probing cost the service: wall time its answers
/// took (an upper bound of the CPU a single-threaded handler spent) and the
/// bytes it read and wrote for them. Subtracted from the service's resource
/// use before that counts as load progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeCost {
    pub wall: Duration,
    pub bytes: u64,
}

impl ProbeCost {
    pub fn add(&mut self, other: ProbeCost) {
        self.wall += other.wall;
        self.bytes += other.bytes;
    }

    fn of(answers: &[Answer], wall: Duration) -> ProbeCost {
        let bytes =
            answers.iter().map(|a| PROBE_OVERHEAD_BYTES + a.as_ref().map_or(0, |(_, body)| body.len() as u64)).sum();
        ProbeCost { wall, bytes }
    }
}

/// One round of probing, for the supervisor.
#[derive(Debug)]
pub struct Round {
    pub generation: u64,
    pub answers: Vec<Answer>,
    pub cost: ProbeCost,
}

/// The start times of the last rounds: no round starts while
/// `MAX_ROUNDS_PER_SECOND` began within the last second. Pure.
#[derive(Debug, Default)]
pub struct Pace {
    recent: VecDeque<Instant>,
}

impl Pace {
    pub fn record(&mut self, at: Instant) {
        if self.recent.len() == MAX_ROUNDS_PER_SECOND {
            self.recent.pop_front();
        }
        self.recent.push_back(at);
    }

    /// The earliest moment at or after `wanted` a round may start.
    pub fn not_before(&self, wanted: Instant) -> Instant {
        match self.recent.front() {
            Some(oldest) if self.recent.len() == MAX_ROUNDS_PER_SECOND => wanted.max(*oldest + Duration::from_secs(1)),
            _ => wanted,
        }
    }
}

/// Polls the target until cancelled, sending each round to `tx`, at the
/// pace `next_interval` gives — and, while a model loads, at once whenever
/// the service writes output (`nudge`: most services log the moment a model
/// is ready), never more than `MAX_ROUNDS_PER_SECOND`. A change is judged on
/// what the protocol reads (up, and each model's status, progress and
/// error), not on the raw answers: a timestamp or uptime field must not pin
/// polling fast. `live` says whether the supervisor's models are settled; a
/// change wakes the loop at once.
pub async fn poll(
    target: Target,
    generation: u64,
    tx: mpsc::UnboundedSender<Round>,
    mut live: tokio::sync::watch::Receiver<Option<Duration>>,
    nudge: Arc<Notify>,
    cancel: CancellationToken,
) {
    let client = reqwest::Client::builder().timeout(PROBE_TIMEOUT).build().unwrap_or_default();
    let base = target.base_url.trim_end_matches('/').to_owned();
    let paths = target.protocol.paths(&target.models);
    let mut interval = FAST_POLL;
    let mut pace = Pace::default();
    let mut last: Option<(bool, BTreeMap<String, ModelHealth>)> = None;
    loop {
        let started = Instant::now();
        pace.record(started);
        let mut answers = Vec::with_capacity(paths.len());
        for path in &paths {
            answers.push(get(&client, &format!("{base}{path}")).await);
        }
        let cost = ProbeCost::of(&answers, started.elapsed());
        let reading = target.protocol.read(&target.models, &answers);
        let gist = (reading.up, reading.models);
        let changed = last.as_ref() != Some(&gist);
        interval = next_interval(interval, changed, target.ceiling, *live.borrow_and_update());
        last = Some(gist);
        if tx.send(Round { generation, answers, cost }).is_err() {
            return;
        }
        if !wait(interval, &pace, &mut live, &nudge, &cancel).await {
            return;
        }
    }
}

/// Sleeps until the next poll; false when cancelled. A load starting (the
/// cadence cleared) or, while loading, output from the service cuts the
/// wait short (within the pace); everything settling stretches it to the
/// liveness cadence from now.
async fn wait(
    interval: Duration,
    pace: &Pace,
    live: &mut tokio::sync::watch::Receiver<Option<Duration>>,
    nudge: &Notify,
    cancel: &CancellationToken,
) -> bool {
    let mut wake = pace.not_before(Instant::now() + interval);
    loop {
        let loading = live.borrow().is_none();
        tokio::select! {
            _ = cancel.cancelled() => return false,
            _ = tokio::time::sleep_until(wake) => return true,
            Ok(()) = live.changed() => match *live.borrow_and_update() {
                None => wake = pace.not_before(Instant::now()),
                Some(cadence) => wake = Instant::now() + cadence,
            },
            _ = nudge.notified(), if loading => wake = wake.min(pace.not_before(Instant::now())),
        }
    }
}

async fn get(client: &reqwest::Client, url: &str) -> Answer {
    match client.get(url).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            r.bytes().await.map(|b| (status, b.to_vec())).map_err(|e| e.to_string())
        }
        Err(e) if e.is_connect() => Err("connection refused".into()),
        Err(e) if e.is_timeout() => Err("timed out".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests;
