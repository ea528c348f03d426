//! How the supervisor carries out what the stage machine decides: readings
//! and samples in, transitions journalled (failures with the service's own
//! words appended), and the HTTP requests the machine asks for — endpoint
//! load requests and warm-up requests — sent on their own tasks, their
//! answers coming back as `Internal` messages.

use proto::{Stage, event};
use tokio::time::Instant;

use super::machine::{Action, Change, cut, progress_signal};
use super::{Actor, Internal, process};
use crate::config::Warmup;
use crate::probe::{Answer, Reading};

impl Actor {
    /// One round of readiness answers.
    pub(super) fn observe(&mut self, answers: Vec<Answer>) {
        let mut reading: Reading = self.cfg.readiness.protocol.read(&self.named, &answers);
        // What the service says goes nowhere with its secrets in it.
        let payload = self.secrets.redact(&reading.payload).into_owned();
        for health in reading.models.values_mut() {
            health.error = health.error.as_deref().map(|e| self.secrets.redact(e).into_owned());
        }
        if !reading.up {
            if self.last_payload.is_none() {
                self.last_payload = Some(payload);
            }
            return;
        }
        self.last_payload = Some(payload);
        if let Some(run) = &mut self.run {
            run.answered = true;
        }
        let actions = self.machine.observe(&reading, Instant::now());
        self.apply(actions);
    }

    /// A new resource sample: a progress signal (beyond what the agent's
    /// own probes cost) keeps the only loading model from stalling.
    pub(super) fn on_sample(&mut self) {
        let now = self.wiring.samples.borrow().get(&self.cfg.name).copied();
        let probes = std::mem::take(&mut self.probe_cost);
        let Some(now) = now else {
            self.last_sample = None;
            return;
        };
        let signal =
            self.last_sample.as_ref().and_then(|(at, before)| progress_signal(before, &now, at.elapsed(), probes));
        self.last_sample = Some((Instant::now(), now));
        for model in self.machine.loading_models() {
            let peak = self.stage_peaks.entry(model).or_default();
            *peak = (peak.0.max(now.rss_bytes), peak.1.max(now.gpu_bytes));
        }
        if let Some(signal) = signal {
            self.machine.on_signal(&signal, Instant::now());
        }
    }

    pub(super) fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Changed(change) => self.changed(change),
                Action::RequestLoad(model) => self.request_load(&model),
                Action::WarmUp(model) => self.warm_up(&model),
                Action::StopService => {
                    tracing::info!(service = %self.cfg.name, "a load failed and nothing else of the service lives: stopping it");
                    self.begin_stop(None);
                }
            }
        }
    }

    fn changed(&mut self, c: Change) {
        if c.release {
            self.admission.release(&self.cfg.name, &c.model);
        }
        let message = match c.message {
            Some(story) if c.quote_service => Some(story + &self.service_story()),
            other => other,
        };
        if c.to == Stage::Failed {
            tracing::warn!(service = %self.cfg.name, model = c.model, cause = c.cause, "model failed");
        } else if c.from != c.to {
            tracing::info!(service = %self.cfg.name, model = c.model, from = c.from.label(), to = c.to.label(), cause = c.cause, "stage");
        }
        // What the stage that ended cost the service at its peak (the last
        // sample counts, so a stage shorter than a sample still has a figure).
        let (stage_peak_rss_bytes, stage_peak_gpu_bytes) = if c.from == c.to {
            (0, 0)
        } else {
            let last = self.last_sample.map(|(_, m)| (m.rss_bytes, m.gpu_bytes)).unwrap_or_default();
            let peak = self.stage_peaks.remove(&c.model).unwrap_or_default();
            (peak.0.max(last.0), peak.1.max(last.1))
        };
        self.history.changed(&c.model, c.from, c.to, tokio::time::Instant::now());
        let usual = match Stage::LOADING.contains(&c.to) {
            true => self.history.usual(&c.model, c.to).unwrap_or_default(),
            false => Default::default(),
        };
        self.wiring.journal.append(event::Kind::StageChanged(proto::StageChanged {
            stage_peak_rss_bytes,
            stage_peak_gpu_bytes,
            usual_stage_ms: usual.stage.as_millis() as u64,
            usual_rest_ms: usual.rest.as_millis() as u64,
            service: self.cfg.name.clone(),
            model: c.model,
            from: c.from.into(),
            to: c.to.into(),
            cause: c.cause,
            progress: c.progress,
            message: message.unwrap_or_default(),
        }));
        self.update_cadence();
    }

    /// The service's part of a failure's story (DESIGN §4): memory, last
    /// health payload, its own log lines, the log file.
    fn service_story(&self) -> String {
        let memory = self.wiring.samples.borrow().get(&self.cfg.name).copied().unwrap_or_default();
        let mib = |b: u64| b / (1024 * 1024);
        let mut out = format!(
            "\n  service memory: current {} MiB, peak {} MiB",
            mib(memory.rss_bytes),
            mib(memory.peak_rss_bytes)
        );
        if memory.cgroup_bytes > 0 {
            out.push_str(&format!(" (its cgroup: {} MiB)", mib(memory.cgroup_bytes)));
        }
        if memory.peak_gpu_bytes > 0 {
            out.push_str(&format!(
                "; GPU current {} MiB, peak {} MiB",
                mib(memory.gpu_bytes),
                mib(memory.peak_gpu_bytes)
            ));
        }
        out.push_str(&format!(
            "\n  last health payload: {}",
            self.last_payload.as_deref().unwrap_or("(none: the service never answered)")
        ));
        out.push_str(&self.logs.render());
        out.push_str(&format!("\n  log file: {}", process::log_path(&self.wiring.data_dir, &self.cfg.name).display()));
        out
    }

    fn served_as(&self, model: &str) -> String {
        self.named.iter().find(|n| n.name == model).map_or(model.to_owned(), |n| n.served_as.clone())
    }

    fn warm_up(&mut self, model: &str) {
        let warmup = self.cfg.models.iter().find(|m| m.name == model).and_then(|m| m.warmup.clone());
        let (Some(run), Some(warmup)) = (&self.run, warmup) else { return };
        tokio::spawn(warm_up(
            run.base_url.clone(),
            warmup,
            self.served_as(model),
            model.to_owned(),
            self.traceparent.clone(),
            (self.generation, self.internal_tx.clone()),
        ));
    }

    fn request_load(&mut self, model: &str) {
        let Some(run) = &self.run else { return };
        let served_as = self.served_as(model);
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
