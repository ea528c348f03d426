//! Load history where loads happen: per model, how long each stage of its
//! last loads took on this host, kept under the agent's data folder and keyed
//! by the service's configuration (a changed command or working folder
//! starts a new history). From it: how long a stage usually takes here, and
//! how long the stages after it usually take — the ETA a loading model's
//! stage changes carry. No controller or store needed: a fresh CI runner gets
//! ETAs from the agent.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use proto::Stage;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Loads kept per model; "usually" is the median of these.
const KEPT: usize = 5;

/// One finished load: (stage, milliseconds) in the order it went through them.
type Load = Vec<(String, u64)>;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    loads: BTreeMap<String, VecDeque<Load>>,
}

/// What a stage usually takes here, and the stages after it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usual {
    pub stage: Duration,
    pub rest: Duration,
}

#[derive(Debug)]
pub struct History {
    path: Option<PathBuf>,
    saved: Saved,
    /// Per model loading now: the stage it is in, since when, and the stages done.
    current: BTreeMap<String, (Stage, Instant, Load)>,
}

/// FNV-1a of what makes a service's loads comparable.
fn key(cfg: &crate::config::ServiceConfig) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let text = format!("{:?}\0{:?}", cfg.command, cfg.workdir);
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{}-{:012x}", cfg.name, h & 0xffff_ffff_ffff)
}

fn median(mut v: Vec<u64>) -> Option<u64> {
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

impl History {
    /// The history of `cfg`'s loads under `data_dir` (empty when none yet or
    /// unreadable: an ETA is a nicety, never a reason to fail).
    pub fn open(data_dir: &std::path::Path, cfg: &crate::config::ServiceConfig) -> History {
        let path = data_dir.join("history").join(format!("{}.json", key(cfg)));
        let saved = std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        History { path: Some(path), saved, current: BTreeMap::new() }
    }

    /// A stage change of `model` at `now`. A load that reaches READY from
    /// the start of a load is recorded (and saved); a failed one is not.
    pub fn changed(&mut self, model: &str, from: Stage, to: Stage, now: Instant) {
        let at_rest = |s: Stage| matches!(s, Stage::Stopped | Stage::Ready | Stage::Failed);
        if at_rest(from) && Stage::LOADING.contains(&to) {
            self.current.insert(model.to_owned(), (to, now, Vec::new()));
            return;
        }
        let Some((stage, since, done)) = self.current.get_mut(model) else { return };
        if *stage != to {
            done.push((stage.label().to_owned(), now.saturating_duration_since(*since).as_millis() as u64));
            (*stage, *since) = (to, now);
        }
        if to == Stage::Ready {
            let (_, _, load) = self.current.remove(model).unwrap_or((to, now, Vec::new()));
            let kept = self.saved.loads.entry(model.to_owned()).or_default();
            if kept.len() == KEPT {
                kept.pop_front();
            }
            kept.push_back(load);
            self.save();
        } else if at_rest(to) {
            self.current.remove(model);
        }
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().unwrap_or(path))?;
            std::fs::write(path, serde_json::to_string(&self.saved).unwrap_or_default())
        };
        if let Err(error) = write() {
            tracing::debug!(path = %path.display(), %error, "load history not saved");
        }
    }

    /// How long `stage` of `model` usually takes here and what usually
    /// follows it until READY; `None` before any finished load went through it.
    pub fn usual(&self, model: &str, stage: Stage) -> Option<Usual> {
        let loads = self.saved.loads.get(model)?;
        let label = stage.label();
        let mut stages = Vec::new();
        let mut rests = Vec::new();
        for load in loads {
            let Some(i) = load.iter().position(|(s, _)| s == label) else { continue };
            stages.push(load[i].1);
            rests.push(load[i + 1..].iter().map(|(_, ms)| ms).sum());
        }
        Some(Usual { stage: Duration::from_millis(median(stages)?), rest: Duration::from_millis(median(rests)?) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> History {
        History { path: None, saved: Saved::default(), current: BTreeMap::new() }
    }

    /// Runs a load through `stages` (name, ms) and, if `ready`, to READY.
    fn load(h: &mut History, t0: Instant, stages: &[(Stage, u64)], ready: bool) -> Instant {
        let mut now = t0;
        let mut from = Stage::Stopped;
        for (stage, ms) in stages {
            h.changed("nllb", from, *stage, now);
            from = *stage;
            now += Duration::from_millis(*ms);
        }
        h.changed("nllb", from, if ready { Stage::Ready } else { Stage::Failed }, now);
        now
    }

    #[tokio::test(start_paused = true)]
    async fn a_stage_usually_takes_the_median_of_the_last_loads_that_finished() {
        use Stage::{Downloading as D, LoadingWeights as L, WarmingUp as W};
        let mut h = memory();
        assert_eq!(h.usual("nllb", L), None, "no history yet");
        let mut t = Instant::now();
        for weights in [2000, 9000, 2200] {
            t = load(&mut h, t, &[(D, 1000), (L, weights), (W, 500)], true);
        }
        // A failed load does not count.
        t = load(&mut h, t, &[(D, 1000), (L, 60_000)], false);
        assert_eq!(
            h.usual("nllb", L),
            Some(Usual { stage: Duration::from_millis(2200), rest: Duration::from_millis(500) })
        );
        assert_eq!(h.usual("nllb", D).unwrap().rest, Duration::from_millis(2700), "the median of what follows");
        assert_eq!(h.usual("nllb", Stage::Authenticating), None, "never went through it");
        // Only the last five count.
        for _ in 0..5 {
            t = load(&mut h, t, &[(D, 100), (L, 300), (W, 50)], true);
        }
        assert_eq!(h.usual("nllb", L).unwrap().stage, Duration::from_millis(300));
    }
}
