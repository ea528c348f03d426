//! Live progress of model loads, drawn by the terminal reporter (its only
//! user). On a terminal: one redrawn line per loading model (stage, elapsed,
//! progress, service memory). Off a terminal: one plain line per loading
//! model on every stage change and at a fixed interval (30 s by default), so
//! CI logs show what is happening without drowning in it. Other lines go
//! through `say`, above the live bars, so they never tear.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::time::Instant;

use crate::client::Stage;
use crate::run::events::Usual;

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Redrawn lines (indicatif).
    Live,
    /// One line per model per change and per interval.
    Lines {
        interval: Duration,
    },
    Quiet,
}

/// (host, service, model)
pub type Key = (String, String, String);

struct Model {
    stage: Stage,
    progress: f64,
    started: Instant,
    stage_since: Instant,
    bar: Option<ProgressBar>,
    usual: Option<Usual>,
}

/// ", usually 11.7s here, ETA 4.1s": what the stage usually takes on this
/// host and what is left of it and the stages after it, given `in_stage`.
pub fn eta(usual: Usual, in_stage: Duration) -> String {
    let left = usual.stage.saturating_sub(in_stage) + usual.rest;
    format!(", usually {:.1}s here, ETA {:.1}s", usual.stage.as_secs_f64(), left.as_secs_f64())
}

pub struct Display<W: Write> {
    mode: Mode,
    out: W,
    began: Instant,
    models: BTreeMap<Key, Model>,
    /// (RSS, GPU memory) of each (host, service), as last sampled.
    memory: BTreeMap<(String, String), (u64, u64)>,
    multi: Option<MultiProgress>,
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes / (1024 * 1024))
}

impl<W: Write> Display<W> {
    fn describe(&self, key: &Key, m: &Model) -> String {
        let (rss, gpu) = self.memory.get(&(key.0.clone(), key.1.clone())).copied().unwrap_or_default();
        let progress = if m.progress > 0.0 { format!("  {:>3.0}%", m.progress * 100.0) } else { String::new() };
        let gpu = if gpu > 0 { format!("  gpu {}", mib(gpu)) } else { String::new() };
        let eta = m.usual.map(|u| eta(u, m.stage_since.elapsed())).unwrap_or_default();
        format!(
            "{:<16} {:>6.1}s (stage {:.1}s{eta}){progress}  rss {}{gpu}",
            m.stage.label(),
            m.started.elapsed().as_secs_f64(),
            m.stage_since.elapsed().as_secs_f64(),
            mib(rss)
        )
    }

    pub fn new(mode: Mode, out: W) -> Display<W> {
        Display { mode, out, began: Instant::now(), models: BTreeMap::new(), memory: BTreeMap::new(), multi: None }
    }

    /// How often `tick` should be called.
    pub fn period(&self) -> Duration {
        match self.mode {
            Mode::Lines { interval } => interval.max(Duration::from_millis(100)),
            _ => Duration::from_millis(250),
        }
    }

    /// A line of its own (waiting, lost hosts): above the live bars on a
    /// terminal, in every mode (`none` quiets progress, not news). A closed
    /// pipe is not an error worth a panic.
    pub fn say(&mut self, text: &str) {
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(text);
            }
            None => {
                let _ = writeln!(self.out, "{text}");
                let _ = self.out.flush();
            }
        }
    }

    /// The summary: printed even in quiet mode.
    pub fn print(&mut self, text: &str) {
        self.abandon();
        let _ = write!(self.out, "{text}");
        let _ = self.out.flush();
    }

    fn line(&mut self, key: &Key, text: &str) {
        let stamp = self.began.elapsed().as_secs_f64();
        let _ = writeln!(self.out, "[{stamp:>7.1}s] {}/{}/{}  {text}", key.0, key.1, key.2);
        let _ = self.out.flush();
    }

    /// A service's (RSS, GPU memory) as the agent last sampled it.
    pub fn memory(&mut self, host: &str, service: &str, memory: (u64, u64)) {
        self.memory.insert((host.to_owned(), service.to_owned()), memory);
    }

    /// A stage change; `message` says why a model FAILED or STOPPED.
    /// A stage change; `usual`: how long the stage and what follows usually
    /// take on that host (shown as "usually …, ETA …").
    pub fn stage(&mut self, key: Key, from: Stage, to: Stage, (progress, usual): (f64, Option<Usual>), message: &str) {
        let now = Instant::now();
        let entry = self.models.entry(key.clone()).or_insert_with(|| Model {
            stage: from,
            progress: 0.0,
            started: now,
            stage_since: now,
            bar: None,
            usual: None,
        });
        if entry.stage != to {
            entry.usual = usual;
        }
        // A model becomes interesting when it starts loading.
        if entry.stage.is_terminal() && !to.is_terminal() {
            entry.started = now;
        }
        let changed = entry.stage != to;
        entry.stage = to;
        entry.progress = progress;
        if changed {
            entry.stage_since = now;
        }
        let m = self.models.remove(&key).expect("just inserted");
        let text = self.describe(&key, &m);
        let why = message.lines().next().filter(|l| !l.is_empty()).map(|l| format!(": {l}"));
        let m = match self.mode {
            Mode::Quiet => m,
            Mode::Lines { .. } => {
                if changed {
                    let elapsed = m.started.elapsed().as_secs_f64();
                    let text = match to {
                        Stage::Ready => format!("READY after {elapsed:.1}s"),
                        Stage::Failed | Stage::Stopped => {
                            format!("{} after {elapsed:.1}s{}", to.label(), why.clone().unwrap_or_default())
                        }
                        _ => text,
                    };
                    self.line(&key, &text);
                }
                m
            }
            Mode::Live => self.draw(&key, m, text, why.as_deref().unwrap_or("")),
        };
        self.models.insert(key, m);
    }

    fn draw(&mut self, key: &Key, mut m: Model, text: String, why: &str) -> Model {
        let multi = self.multi.get_or_insert_with(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout()));
        if m.bar.is_none() && !m.stage.is_terminal() {
            let bar = multi.add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix:<28} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_prefix(format!("{}/{}/{}", key.0, key.1, key.2));
            bar.enable_steady_tick(Duration::from_millis(120));
            m.bar = Some(bar);
        }
        if let Some(bar) = &m.bar {
            match m.stage {
                Stage::Ready => {
                    bar.finish_with_message(format!("READY after {:.1}s", m.started.elapsed().as_secs_f64()));
                    m.bar = None;
                }
                Stage::Failed | Stage::Stopped => {
                    bar.finish_with_message(format!(
                        "{} after {:.1}s{why}",
                        m.stage.label(),
                        m.started.elapsed().as_secs_f64()
                    ));
                    m.bar = None;
                }
                _ => bar.set_message(text),
            }
        }
        m
    }

    /// Periodic refresh: elapsed times on a terminal, a line per loading
    /// model off one.
    pub fn tick(&mut self) {
        let keys: Vec<Key> =
            self.models.iter().filter(|(_, m)| !m.stage.is_terminal()).map(|(k, _)| k.clone()).collect();
        for key in keys {
            let m = self.models.remove(&key).expect("listed");
            let text = self.describe(&key, &m);
            match self.mode {
                Mode::Lines { .. } => self.line(&key, &text),
                Mode::Live => {
                    if let Some(bar) = &m.bar {
                        bar.set_message(text);
                    }
                }
                Mode::Quiet => {}
            }
            self.models.insert(key, m);
        }
    }

    /// Leaves the bars where they are (the run is over).
    pub fn abandon(&mut self) {
        for m in self.models.values_mut() {
            if let Some(bar) = m.bar.take() {
                bar.abandon();
            }
        }
        self.multi = None;
    }
}
