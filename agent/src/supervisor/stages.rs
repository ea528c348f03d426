//! The per-model stage machine: readiness readings, log-line patterns,
//! warm-up requests, progress signals, stall and load timeouts, and the
//! failure story that goes with a `FAILED`.

use std::time::Duration;

use proto::{Stage, event};
use tokio::time::Instant;

use super::{Actor, Internal, process};
use crate::config::{LoadMode, Warmup};
use crate::probe::{Answer, Reading};
use crate::sampling::TreeMemory;

/// RSS must move by this much between two samples to count as progress.
pub const RSS_PROGRESS_BYTES: u64 = 1024 * 1024;
/// The tree must use this share of one core between two samples.
pub const CPU_PROGRESS_SHARE: f64 = 0.05;
/// Bytes read + written between two samples (files, pipes, sockets).
pub const IO_PROGRESS_BYTES: u64 = 64 * 1024;
/// Pause between failed warm-up attempts.
const WARMUP_RETRY: Duration = Duration::from_millis(250);
/// Pause before asking again after a refused endpoint-mode load request;
/// it doubles up to `LOAD_RETRY_MAX`.
pub(super) const LOAD_RETRY_FIRST: Duration = Duration::from_millis(250);
const LOAD_RETRY_MAX: Duration = Duration::from_secs(5);
/// How long a FAILED match on a traceback waits for its exception line.
const TRACEBACK_WAIT: Duration = Duration::from_secs(2);

/// Says which progress signal, if any, moved between two samples of a tree.
pub fn progress_signal(before: &TreeMemory, after: &TreeMemory, elapsed: Duration) -> Option<String> {
    let rss = after.rss_bytes.abs_diff(before.rss_bytes);
    if rss >= RSS_PROGRESS_BYTES {
        return Some(format!("RSS moved {} MiB", rss / (1024 * 1024)));
    }
    let io = after.io_bytes.saturating_sub(before.io_bytes);
    if io >= IO_PROGRESS_BYTES {
        return Some(format!("{} KiB of I/O", io / 1024));
    }
    let cpu = after.cpu_ms.saturating_sub(before.cpu_ms);
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

/// State of a model's warm-up while it is `WARMING_UP`.
#[derive(Debug, Default)]
pub(super) struct Warm {
    pub in_flight: bool,
    pub last_attempt: Option<Instant>,
    pub last_error: Option<String>,
    pub attempts: u32,
}

fn cut(line: &str) -> String {
    let mut s: String = line.chars().take(160).collect();
    if s.len() < line.len() {
        s.push('…');
    }
    s
}

impl Actor {
    /// One round of readiness answers.
    pub(super) fn observe(&mut self, answers: Vec<Answer>) {
        let reading: Reading = self.cfg.readiness.protocol.read(&self.named, &answers);
        if !reading.up {
            if self.last_payload.is_none() {
                self.last_payload = Some(reading.payload);
            }
            return;
        }
        self.last_payload = Some(self.secrets.redact(&reading.payload).into_owned());
        if let Some(run) = &mut self.run {
            run.answered = true;
        }
        let names: Vec<String> = self.models.keys().cloned().collect();
        for name in names {
            let track = &self.models[&name];
            if !track.wanted || track.stage == Stage::Failed || track.stage == Stage::Stopped {
                continue;
            }
            let endpoint = self.load_mode(&name) == LoadMode::Endpoint;
            let ask = endpoint && !track.load_requested && track.load_retry_at.is_none_or(|at| at <= Instant::now());
            let Some(health) = reading.models.get(&name) else {
                if ask {
                    self.request_load(&name);
                }
                continue;
            };
            let cause = format!("{}: status={}", self.cfg.readiness.protocol.name(), health.status);
            match health.stage {
                None => {
                    if track.stage == Stage::Ready {
                        self.transition(&name, Stage::Stopped, &cause, None);
                    } else if ask {
                        self.request_load(&name);
                    }
                }
                // A failure the service still reports from before this load
                // was asked for: ask (again) rather than fail on stale news.
                Some(Stage::Failed) if ask => self.request_load(&name),
                Some(Stage::Failed) => {
                    let reason = health.error.clone().unwrap_or_else(|| format!("the service reported {cause}"));
                    self.fail(&name, &cause, &reason);
                }
                Some(Stage::Ready) => self.served(&name, &cause),
                Some(reported) => {
                    let track = self.models.get_mut(&name).expect("model");
                    let stage = loading_stage(track.stage, reported);
                    let moved = (health.progress - track.progress).abs() >= 0.05
                        || (health.progress == 1.0 && track.progress != 1.0);
                    if stage != track.stage || moved {
                        track.progress = health.progress;
                        self.transition(&name, stage, &cause, None);
                    }
                }
            }
        }
    }

    /// The protocol says the model serves: READY, or warm it up first.
    fn served(&mut self, name: &str, cause: &str) {
        let warmup = self.cfg.models.iter().find(|m| m.name == name).and_then(|m| m.warmup.clone());
        let track = &self.models[name];
        if track.stage == Stage::Ready {
            return;
        }
        let Some(warmup) = warmup else {
            self.transition(name, Stage::Ready, cause, None);
            return;
        };
        if track.stage != Stage::WarmingUp {
            self.transition(name, Stage::WarmingUp, &format!("{cause}; warm-up request before READY"), None);
        }
        let track = self.models.get_mut(name).expect("model");
        let due = track.warm.last_attempt.is_none_or(|t| t.elapsed() >= WARMUP_RETRY);
        if track.warm.in_flight || !due {
            return;
        }
        track.warm.in_flight = true;
        track.warm.last_attempt = Some(Instant::now());
        track.warm.attempts += 1;
        let Some(run) = &self.run else { return };
        let served_as = self.named.iter().find(|n| n.name == name).map_or(name.to_owned(), |n| n.served_as.clone());
        tokio::spawn(warm_up(
            run.base_url.clone(),
            warmup,
            served_as,
            name.to_owned(),
            self.traceparent.clone(),
            (self.generation, self.internal_tx.clone()),
        ));
    }

    pub(super) fn on_warmup(&mut self, model: &str, outcome: Result<String, String>) {
        let Some(track) = self.models.get_mut(model) else { return };
        track.warm.in_flight = false;
        if track.stage != Stage::WarmingUp {
            return;
        }
        match outcome {
            Ok(what) => {
                let attempts = track.warm.attempts;
                self.transition(model, Stage::Ready, &format!("warm-up succeeded ({what}, attempt {attempts})"), None);
            }
            Err(error) => {
                tracing::debug!(service = %self.cfg.name, model, %error, "warm-up failed; retrying");
                track.warm.last_error = Some(self.secrets.redact(&error).into_owned());
            }
        }
    }

    fn request_load(&mut self, model: &str) {
        let Some(run) = &self.run else { return };
        if let Some(t) = self.models.get_mut(model) {
            t.load_requested = true;
        }
        let served_as = self.named.iter().find(|n| n.name == model).map_or(model.to_owned(), |n| n.served_as.clone());
        let url = format!(
            "{}{}",
            run.base_url.trim_end_matches('/'),
            self.cfg.readiness.load_path.replace("{model}", &served_as)
        );
        let body = self.cfg.readiness.load_body.as_ref().map(|b| b.replace("{model}", &served_as));
        let service = self.cfg.name.clone();
        let traceparent = self.traceparent.clone();
        let (tx, generation, model) = (self.internal_tx.clone(), self.generation, model.to_owned());
        tokio::spawn(async move {
            let mut request = reqwest::Client::new().post(&url);
            if let Some(tp) = &traceparent {
                request = request.header("traceparent", tp);
            }
            if let Some(body) = body {
                request = request.header("content-type", "application/json").body(body);
            }
            let refusal = match request.send().await {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    tracing::warn!(%service, %url, %status, "load request refused");
                    Some(format!("{status}: {}", text.trim()))
                }
                Err(error) => {
                    tracing::warn!(%service, %url, %error, "load request failed");
                    Some(format!("not answered: {error}"))
                }
            };
            let _ = tx.send(Internal::LoadAnswered { generation, model, refusal });
        });
    }

    /// A load request's answer: a refusal is remembered for the failure
    /// message and asked again after a doubling pause.
    pub(super) fn load_answered(&mut self, model: &str, refusal: Option<String>) {
        let Some(track) = self.models.get_mut(model) else { return };
        let Some(refusal) = refusal else { return };
        track.load_refusal = Some(cut(&refusal));
        track.load_requested = false;
        track.load_retry_at = Some(Instant::now() + track.load_backoff);
        track.load_backoff = (track.load_backoff * 2).min(LOAD_RETRY_MAX);
    }

    /// A line the service printed: may mark a stage or a failure.
    pub(super) fn on_log(&mut self, line: &str) {
        let names: Vec<String> = self.models.keys().cloned().collect();
        for name in names {
            let track = &self.models[&name];
            if !track.wanted || track.stage.is_terminal() {
                continue;
            }
            let Some(cfg) = self.cfg.models.iter().find(|m| m.name == name) else { continue };
            match log_stage(&cfg.log_patterns, track.stage, line) {
                // A traceback's first line: wait for its exception line, the
                // part that says what went wrong.
                Some(Stage::Failed) if self.logs.in_traceback() => {
                    self.pending_failed.push((name.clone(), line.to_owned(), Instant::now()));
                }
                Some(Stage::Failed) => {
                    let reason = format!("the service logged: {}", cut(line));
                    self.fail(&name, "log pattern FAILED", &reason);
                }
                Some(stage) => self.transition(&name, stage, &format!("log: {}", cut(line)), None),
                None => {}
            }
        }
    }

    /// A traceback closed with `exception`: the FAILED matches held for it fail now.
    pub(super) fn on_traceback_closed(&mut self, exception: &str) {
        for (name, first, _) in std::mem::take(&mut self.pending_failed) {
            let reason = format!("the service logged: {} … {}", cut(&first), cut(exception));
            self.fail(&name, "log pattern FAILED", &reason);
        }
    }

    /// Held FAILED matches whose traceback never closed fail after a moment.
    fn flush_pending_failed(&mut self) {
        let (due, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.pending_failed).into_iter().partition(|(_, _, at)| at.elapsed() >= TRACEBACK_WAIT);
        self.pending_failed = kept;
        for (name, first, _) in due {
            self.fail(&name, "log pattern FAILED", &format!("the service logged: {}", cut(&first)));
        }
    }

    /// After a load failed by stall or timeout: a hung service holds its
    /// memory, so stop it — unless another model of it is READY or still
    /// loading, or the config says to keep it for inspection.
    fn stop_if_nothing_else_lives(&mut self) {
        let alive = self.models.values().any(|t| t.wanted && (t.stage == Stage::Ready || !t.stage.is_terminal()));
        if self.cfg.stop_after_failed_load && !alive && self.run.is_some() {
            tracing::info!(service = %self.cfg.name, "a load failed and nothing else of the service lives: stopping it");
            self.begin_stop(None);
        }
    }

    /// A new resource sample: any progress signal keeps loads from stalling.
    pub(super) fn on_sample(&mut self) {
        let now = self.wiring.samples.borrow().get(&self.cfg.name).copied();
        let Some(now) = now else {
            self.last_sample = None;
            return;
        };
        let signal = self.last_sample.as_ref().and_then(|(at, before)| progress_signal(before, &now, at.elapsed()));
        self.last_sample = Some((Instant::now(), now));
        let Some(signal) = signal else { return };
        let loading: Vec<String> =
            self.models.iter().filter(|(_, t)| t.wanted && !t.stage.is_terminal()).map(|(n, _)| n.clone()).collect();
        if let Some(track) = attribute_signal(&loading).and_then(|name| self.models.get_mut(name)) {
            track.last_progress = Instant::now();
            track.last_signal = Some(format!("{signal} in the service, the only model loading"));
        }
    }

    /// Load timeouts and stalls, checked on a short tick.
    pub(super) fn check_timeouts(&mut self) {
        self.flush_pending_failed();
        let now = Instant::now();
        let names: Vec<String> = self.models.keys().cloned().collect();
        for name in names {
            let track = &self.models[&name];
            if !track.wanted || track.stage.is_terminal() || self.run.is_none() {
                continue;
            }
            if let Some((_, limit)) = track.deadline.filter(|(at, _)| *at <= now) {
                // Name where the limit came from: that is where to raise it.
                let reason = format!(
                    "load timed out after {}s (the limit was set by {}; raise it there, or with --model-timeout)",
                    limit.as_secs_f64(),
                    track.limit_source
                );
                self.fail(&name, "load timeout", &reason);
                self.stop_if_nothing_else_lives();
                continue;
            }
            let stall = self.cfg.models.iter().find(|m| m.name == name).map(|m| m.stall.for_stage(track.stage));
            if let Some(limit) = stall.filter(|l| track.last_progress.elapsed() >= *l) {
                let reason = format!(
                    "stalled: no progress for {}s in {} (no stage or progress change, RSS moved < 1 MiB, \
                     CPU < 5% of a core, I/O < 64 KiB between samples); the stall limit is `stall` in the \
                     agent config",
                    limit.as_secs_f64(),
                    track.stage.label()
                );
                self.fail(&name, "stall timeout", &reason);
                self.stop_if_nothing_else_lives();
            }
        }
    }

    pub(super) fn fail(&mut self, model: &str, cause: &str, reason: &str) {
        let message = self.failure_message(model, reason);
        self.transition(model, Stage::Failed, cause, Some(message));
    }

    /// The full story of a failed load (DESIGN §4): model, stage, time there,
    /// reason, last health payload, memory, last log lines.
    pub(super) fn failure_message(&self, model: &str, reason: &str) -> String {
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
        match &track.last_signal {
            Some(s) => out
                .push_str(&format!("\n  last progress: {:.1}s ago ({s})", track.last_progress.elapsed().as_secs_f64())),
            None => out.push_str(&format!(
                "\n  last progress: {:.1}s ago (a stage change)",
                track.last_progress.elapsed().as_secs_f64()
            )),
        }
        if let Some(r) = &track.load_refusal {
            out.push_str(&format!("\n  last load request: {r}"));
        }
        if let Some(e) = &track.warm.last_error {
            out.push_str(&format!("\n  last warm-up attempt ({} in all): {e}", track.warm.attempts));
        }
        out.push_str(&format!(
            "\n  last health payload: {}",
            self.last_payload.as_deref().unwrap_or("(none: the service never answered)")
        ));
        out.push_str(&self.logs.render());
        out.push_str(&format!("\n  log file: {}", process::log_path(&self.wiring.data_dir, &self.cfg.name).display()));
        out
    }

    pub(super) fn transition(&mut self, model: &str, to: Stage, cause: &str, message: Option<String>) {
        let Some(track) = self.models.get_mut(model) else { return };
        let from = track.stage;
        track.last_progress = Instant::now();
        track.last_signal = None;
        if from != to {
            track.stage = to;
            track.since = Instant::now();
            if to == Stage::ProcessStarting {
                track.progress = 0.0;
                track.warm = Warm::default();
            }
        }
        if to.is_terminal() {
            track.deadline = None;
            if to == Stage::Ready {
                track.progress = 1.0;
            }
            if track.reserved {
                track.reserved = false;
                self.admission.release(&self.cfg.name, model);
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
        self.update_cadence();
    }
}

/// Sends one warm-up request; reports success or why not.
async fn warm_up(
    base_url: String,
    w: Warmup,
    served_as: String,
    model: String,
    traceparent: Option<String>,
    (generation, tx): (u64, tokio::sync::mpsc::UnboundedSender<Internal>),
) {
    let url = format!("{}{}", base_url.trim_end_matches('/'), w.path.replace("{model}", &served_as));
    let started = Instant::now();
    let method = reqwest::Method::from_bytes(w.method.as_bytes()).unwrap_or(reqwest::Method::POST);
    let mut request = reqwest::Client::new().request(method, &url).timeout(w.timeout);
    if let Some(tp) = &traceparent {
        request = request.header("traceparent", tp);
    }
    if let Some(body) = &w.body {
        request = request.header("content-type", "application/json").body(body.replace("{model}", &served_as));
    }
    let outcome = match request.send().await {
        Err(e) => Err(format!("{} {url}: {e}", w.method)),
        Ok(r) => {
            let status = r.status().as_u16();
            let good = match w.expect_status {
                Some(want) => status == want,
                None => (200..300).contains(&status),
            };
            let body = r.text().await.unwrap_or_default();
            if good {
                Ok(format!("HTTP {status} in {} ms", started.elapsed().as_millis()))
            } else {
                Err(format!("{} {url}: HTTP {status}: {}", w.method, cut(body.trim())))
            }
        }
    };
    let _ = tx.send(Internal::Warmup { generation, model, outcome });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rss_mib: u64, cpu_ms: u64, io_kib: u64) -> TreeMemory {
        TreeMemory { rss_bytes: rss_mib * 1024 * 1024, cpu_ms, io_bytes: io_kib * 1024, ..Default::default() }
    }

    #[test]
    fn probe_and_log_stages_move_forward_only_together() {
        use Stage::*;
        // (current, reported by the probe, result)
        let table = [
            (Downloading, LoadingWeights, LoadingWeights),
            (LoadingWeights, Downloading, LoadingWeights),
            (LoadingWeights, WaitingForHttp, LoadingWeights),
            (WaitingForHttp, WaitingForHttp, WaitingForHttp),
            (ProcessStarting, Downloading, Downloading),
        ];
        for (current, reported, want) in table {
            assert_eq!(loading_stage(current, reported), want, "{current:?} then {reported:?}");
        }
    }

    #[test]
    fn a_service_wide_signal_counts_only_for_the_only_model_loading() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // (models loading, credited)
        let table: [(&[&str], Option<&str>); 3] = [(&[], None), (&["nllb"], Some("nllb")), (&["nllb", "aya"], None)];
        for (loading, credited) in table {
            let loading = names(loading);
            assert_eq!(attribute_signal(&loading).map(String::as_str), credited, "{loading:?}");
        }
    }

    #[test]
    fn progress_signals_and_their_thresholds() {
        let sec = Duration::from_secs(1);
        let base = sample(100, 1000, 1000);
        // (after, elapsed, which signal or none)
        let table = [
            (sample(100, 1000, 1000), sec, None),
            (sample(102, 1000, 1000), sec, Some("RSS moved 2 MiB")),
            (sample(99, 1000, 1000), sec, Some("RSS moved 1 MiB")),
            (sample(100, 1000, 1100), sec, Some("100 KiB of I/O")),
            (sample(100, 1000, 1010), sec, None), // health polls' few bytes are not progress
            (sample(100, 1060, 1000), sec, Some("60 ms of CPU")),
            (sample(100, 1020, 1000), sec, None), // 2% of a core is idling, not working
            (sample(100, 1060, 1000), Duration::from_secs(2), None),
        ];
        for (after, elapsed, want) in table {
            assert_eq!(progress_signal(&base, &after, elapsed).as_deref(), want, "{after:?} over {elapsed:?}");
        }
    }

    #[test]
    fn log_patterns_move_stages_forward_only() {
        let patterns = vec![
            (Stage::Failed, regex::Regex::new("CUDA out of memory").unwrap()),
            (Stage::LoadingWeights, regex::Regex::new("Loading checkpoint shards").unwrap()),
            (Stage::Downloading, regex::Regex::new("Downloading").unwrap()),
        ];
        let table = [
            (Stage::WaitingForHttp, "Downloading model.safetensors", Some(Stage::Downloading)),
            (Stage::Downloading, "Loading checkpoint shards: 50%", Some(Stage::LoadingWeights)),
            (Stage::LoadingWeights, "Downloading tokenizer.json", None),
            (Stage::WarmingUp, "torch.OutOfMemoryError: CUDA out of memory", Some(Stage::Failed)),
            (Stage::Downloading, "INFO: nothing to see", None),
        ];
        for (current, line, want) in table {
            assert_eq!(log_stage(&patterns, current, line), want, "{current:?} {line}");
        }
    }
}
