//! Live progress of model loads. On a terminal: one redrawn line per loading
//! model (stage, elapsed, progress, service memory). Off a terminal: one
//! plain line per loading model on every stage change and at a fixed
//! interval (30 s by default), so CI logs show what is happening without
//! drowning in it.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{Stage, Update};

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
type Key = (String, String, String);

struct Model {
    stage: Stage,
    progress: f64,
    started: Instant,
    stage_since: Instant,
    bar: Option<ProgressBar>,
}

struct Display<W: Write> {
    mode: Mode,
    out: W,
    began: Instant,
    models: BTreeMap<Key, Model>,
    rss: BTreeMap<(String, String), u64>,
    multi: Option<MultiProgress>,
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes / (1024 * 1024))
}

impl<W: Write> Display<W> {
    fn describe(&self, key: &Key, m: &Model) -> String {
        let rss = self.rss.get(&(key.0.clone(), key.1.clone())).copied().unwrap_or(0);
        let progress = if m.progress > 0.0 { format!("  {:>3.0}%", m.progress * 100.0) } else { String::new() };
        format!(
            "{:<16} {:>6.1}s (stage {:.1}s){progress}  rss {}",
            m.stage.label(),
            m.started.elapsed().as_secs_f64(),
            m.stage_since.elapsed().as_secs_f64(),
            mib(rss)
        )
    }

    fn line(&mut self, key: &Key, text: &str) {
        let stamp = self.began.elapsed().as_secs_f64();
        let _ = writeln!(self.out, "[{stamp:>7.1}s] {}/{}/{}  {text}", key.0, key.1, key.2);
        let _ = self.out.flush();
    }

    fn update(&mut self, update: Update) {
        match update {
            Update::Memory { host, service, rss_bytes } => {
                self.rss.insert((host, service), rss_bytes);
            }
            Update::Stage { host, service, model, from, to, progress } => {
                let key = (host, service, model);
                let now = Instant::now();
                let entry = self.models.entry(key.clone()).or_insert_with(|| Model {
                    stage: from,
                    progress: 0.0,
                    started: now,
                    stage_since: now,
                    bar: None,
                });
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
                let m = match self.mode {
                    Mode::Quiet => m,
                    Mode::Lines { .. } => {
                        if changed {
                            let text = match to {
                                Stage::Ready => {
                                    format!("READY after {:.1}s", m.started.elapsed().as_secs_f64())
                                }
                                _ => text,
                            };
                            self.line(&key, &text);
                        }
                        m
                    }
                    Mode::Live => self.draw(&key, m, text),
                };
                self.models.insert(key, m);
            }
        }
    }

    fn draw(&mut self, key: &Key, mut m: Model, text: String) -> Model {
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
                        "{} after {:.1}s",
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
    fn tick(&mut self) {
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
}

/// Runs the display until `updates` closes or `cancel` fires.
pub async fn run<W: Write + Send>(
    mode: Mode,
    out: W,
    mut updates: mpsc::UnboundedReceiver<Update>,
    cancel: CancellationToken,
) {
    let period = match mode {
        Mode::Lines { interval } => interval,
        _ => Duration::from_millis(250),
    };
    let mut display =
        Display { mode, out, began: Instant::now(), models: BTreeMap::new(), rss: BTreeMap::new(), multi: None };
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            u = updates.recv() => match u {
                Some(u) => display.update(u),
                None => break,
            },
            _ = tick.tick() => display.tick(),
        }
    }
    for m in display.models.values() {
        if let Some(bar) = &m.bar {
            bar.abandon();
        }
    }
}
