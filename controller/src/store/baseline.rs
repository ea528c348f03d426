//! Baselines: per host, service and model, how long the load took (`load`)
//! and each of its stages, as set from a run; and the pure comparison of a
//! run's loads against them — a change beyond the tolerance, and beyond a
//! slack that keeps sub-second noise out, is a regression (it fails the run)
//! or an improvement (it is only shown).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::report::ModelLoad;
use crate::run::events::SuiteInfo;

pub mod cases;

/// The whole load, next to its stages.
pub const TOTAL: &str = "load";

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    pub host: String,
    pub service: String,
    pub model: String,
}

impl Key {
    pub fn of(load: &ModelLoad) -> Key {
        Key { host: load.host.clone(), service: load.service.clone(), model: load.model.clone() }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.host, self.service, self.model)
    }
}

/// Where a figure sorts: the whole load first, then the stages in the
/// order a load goes through them.
pub fn stage_rank(stage: &str) -> usize {
    const ORDER: [&str; 7] = [
        TOTAL,
        "PROCESS_STARTING",
        "WAITING_FOR_HTTP",
        "AUTHENTICATING",
        "DOWNLOADING",
        "LOADING_WEIGHTS",
        "WARMING_UP",
    ];
    ORDER.iter().position(|s| *s == stage).unwrap_or(ORDER.len())
}

/// One baseline figure.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entry {
    pub key: Key,
    /// `load` or a stage name.
    pub stage: String,
    pub ms: i64,
    /// The run it was taken from.
    pub run_id: String,
    pub set_unix_ms: i64,
}

/// How much slower is still fine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// 0.25: up to 25 % slower.
    pub ratio: f64,
    /// Changes smaller than this never count, whatever their ratio.
    pub slack: Duration,
}

impl Default for Tolerance {
    fn default() -> Tolerance {
        Tolerance { ratio: 0.25, slack: Duration::from_millis(500) }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Regressed,
    Improved,
    Within,
}

impl Verdict {
    /// As report.json spells it (and the HTML report's row class).
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Regressed => "regressed",
            Verdict::Improved => "improved",
            Verdict::Within => "within",
        }
    }
}

/// The pure rule.
pub fn judge(old_ms: i64, new_ms: i64, tolerance: Tolerance) -> Verdict {
    let slack = tolerance.slack.as_millis() as i64;
    let change = new_ms - old_ms;
    if change.abs() <= slack {
        return Verdict::Within;
    }
    let limit = old_ms as f64 * tolerance.ratio;
    match change {
        c if c > 0 && c as f64 > limit => Verdict::Regressed,
        c if c < 0 && (-c) as f64 > limit => Verdict::Improved,
        _ => Verdict::Within,
    }
}

/// One figure of this run next to its baseline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub key: Key,
    pub stage: String,
    pub old_ms: i64,
    pub new_ms: i64,
    pub verdict: Verdict,
    /// The tolerance it was judged with, as a percentage.
    pub tolerance_percent: f64,
}

impl Change {
    /// "+42 %".
    pub fn change_text(&self) -> String {
        match self.old_ms {
            0 => "new".into(),
            old => format!("{:+.0} %", (self.new_ms - old) as f64 * 100.0 / old as f64),
        }
    }
}

/// A run's loads against the baselines.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Every figure with a baseline; the whole load first, then its stages.
    pub changes: Vec<Change>,
    /// Loads of this run with no baseline yet.
    pub without_baseline: Vec<Key>,
    /// Load cases' throughput and p99 against theirs.
    #[serde(default)]
    pub load_cases: Vec<cases::CaseChange>,
}

impl Comparison {
    pub fn regressions(&self) -> usize {
        let cases = self.load_cases.iter().filter(|c| c.verdict == Verdict::Regressed).count();
        self.changes.iter().filter(|c| c.verdict == Verdict::Regressed).count() + cases
    }

    /// Nothing was compared and nothing was new: nothing to show.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.without_baseline.is_empty() && self.load_cases.is_empty()
    }

    /// What a summary shows: every whole load, and each stage that moved
    /// beyond its tolerance.
    pub fn shown(&self) -> impl Iterator<Item = &Change> {
        self.changes.iter().filter(|c| c.stage == TOTAL || c.verdict != Verdict::Within)
    }

    /// The terminal's table.
    pub fn text(&self) -> String {
        let mut out = String::from("\nBaseline:\n");
        let key_w = self.shown().map(|c| c.key.to_string().len()).max().unwrap_or(5).max(5);
        let stage_w = self.shown().map(|c| c.stage.len()).max().unwrap_or(5).max(5);
        if self.shown().next().is_some() {
            out.push_str(&format!(
                "  {:<key_w$}  {:<stage_w$}  {:>9}  {:>9}  {:>7}\n",
                "MODEL", "STAGE", "BASELINE", "NOW", "CHANGE"
            ));
        }
        for c in self.shown() {
            out.push_str(&format!(
                "  {:<key_w$}  {:<stage_w$}  {:>9}  {:>9}  {:>7}  {}\n",
                c.key.to_string(),
                c.stage,
                seconds(c.old_ms),
                seconds(c.new_ms),
                c.change_text(),
                verdict_text(c)
            ));
        }
        for k in &self.without_baseline {
            out.push_str(&format!("  {k}: no baseline yet (`proctor baseline set` takes one from a run)\n"));
        }
        out.push_str(&cases::text(&self.load_cases));
        out
    }

    /// The Markdown summary's section.
    pub fn markdown(&self) -> String {
        let mut out = String::from("\n### Baseline\n\n");
        if self.shown().next().is_some() {
            out.push_str("| model | stage | baseline | now | change | |\n|---|---|---|---|---|---|\n");
        }
        for c in self.shown() {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                c.key,
                c.stage,
                seconds(c.old_ms),
                seconds(c.new_ms),
                c.change_text(),
                verdict_text(c)
            ));
        }
        for k in &self.without_baseline {
            out.push_str(&format!("\n{k}: no baseline yet.\n"));
        }
        out.push_str(&cases::markdown(&self.load_cases));
        out
    }
}

/// "2.6s".
pub fn seconds(ms: i64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// "REGRESSED (over 25 %)", "improved", "ok".
pub fn verdict_text(c: &Change) -> String {
    match c.verdict {
        Verdict::Regressed => format!("REGRESSED (over {:.0} %)", c.tolerance_percent),
        Verdict::Improved => "improved".into(),
        Verdict::Within => "ok".into(),
    }
}

/// The figures a load gives a baseline: the whole load and each stage (a
/// stage seen twice is summed). Only loads that did the work count.
pub fn figures(load: &ModelLoad) -> Vec<(String, i64)> {
    if load.outcome() != "ready" {
        return Vec::new();
    }
    let mut stages: Vec<(String, i64)> = vec![(TOTAL.into(), load.load_time().as_millis() as i64)];
    for s in load.stages.iter().filter(|s| s.stage != "READY") {
        let ms = s.duration.as_millis() as i64;
        match stages.iter_mut().find(|(name, _)| name == &s.stage) {
            Some((_, total)) => *total += ms,
            None => stages.push((s.stage.clone(), ms)),
        }
    }
    stages
}

/// The baseline entries a run's loads would set.
pub fn entries(loads: &[ModelLoad], run_id: &str, now_unix_ms: i64) -> Vec<Entry> {
    loads
        .iter()
        .flat_map(|load| {
            figures(load).into_iter().map(move |(stage, ms)| Entry {
                key: Key::of(load),
                stage,
                ms,
                run_id: run_id.to_owned(),
                set_unix_ms: now_unix_ms,
            })
        })
        .collect()
}

/// Compares each load that did the work against its baseline, each with
/// the tolerance `tolerance_of` gives its key.
pub fn compare(baseline: &[Entry], loads: &[ModelLoad], tolerance_of: impl Fn(&Key) -> Tolerance) -> Comparison {
    let mut known: BTreeMap<(&Key, &str), i64> = BTreeMap::new();
    for e in baseline {
        known.insert((&e.key, e.stage.as_str()), e.ms);
    }
    let mut out = Comparison::default();
    for load in loads {
        let key = Key::of(load);
        let figures = figures(load);
        if figures.is_empty() {
            continue;
        }
        if !known.contains_key(&(&key, TOTAL)) {
            out.without_baseline.push(key);
            continue;
        }
        let tolerance = tolerance_of(&key);
        for (stage, new_ms) in figures {
            let Some(&old_ms) = known.get(&(&key, stage.as_str())) else { continue };
            out.changes.push(Change {
                key: key.clone(),
                stage,
                old_ms,
                new_ms,
                verdict: judge(old_ms, new_ms, tolerance),
                tolerance_percent: tolerance.ratio * 100.0,
            });
        }
    }
    out
}

/// `25%` or `0.25` → 0.25. A bare number above 1 is refused: `25` is far
/// more likely meant as 25 % than as 2500 % (which no load could exceed).
pub fn parse_ratio(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let (value, bare) = match t.strip_suffix('%') {
        Some(p) => (p.trim().parse::<f64>().map(|v| v / 100.0), false),
        None => (t.parse::<f64>(), true),
    };
    match value {
        Ok(v) if bare && v > 1.0 => {
            Err(format!("{text:?} as a fraction is {:.0} %: write \"{t}%\" if you meant {t} %", v * 100.0))
        }
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{text:?} is not a tolerance; write e.g. \"20%\" or \"0.2\"")),
    }
}

/// The tolerance a load is judged with: the tightest `baseline_tolerance`
/// among the suites that waited for it, else the run's ratio; the run's slack.
pub fn tolerance_for(
    key: &Key,
    suite_loads: &[(String, ModelLoad)],
    suites: &[SuiteInfo],
    run: Tolerance,
) -> Tolerance {
    let own = suite_loads
        .iter()
        .filter(|(_, l)| &Key::of(l) == key)
        .filter_map(|(name, _)| suites.iter().find(|s| &s.name == name)?.baseline_tolerance)
        .reduce(f64::min);
    Tolerance { ratio: own.unwrap_or(run.ratio), ..run }
}

/// The tolerance a suite's load cases are judged with: its own
/// `baseline_tolerance`, else the run's.
pub fn suite_tolerance(suite: &str, suites: &[SuiteInfo], run: Tolerance) -> Tolerance {
    let own = suites.iter().find(|s| s.name == suite).and_then(|s| s.baseline_tolerance);
    Tolerance { ratio: own.unwrap_or(run.ratio), ..run }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::LoadStage;

    fn load(model: &str, ms: u64, stages: &[(&str, u64)]) -> ModelLoad {
        ModelLoad {
            host: "gpu-01".into(),
            service: "translation".into(),
            model: model.into(),
            failure: None,
            waited: Duration::from_millis(ms),
            reused: false,
            peak_rss_bytes: 0,
            peak_gpu_bytes: 0,
            stages: stages
                .iter()
                .map(|(s, ms)| LoadStage {
                    stage: (*s).into(),
                    duration: Duration::from_millis(*ms),
                    peak_rss_bytes: 0,
                    peak_gpu_bytes: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn a_change_counts_beyond_both_the_tolerance_and_the_slack() {
        let t = Tolerance { ratio: 0.2, slack: Duration::from_millis(500) };
        for (old, new, want) in [
            (10_000, 12_000, Verdict::Within),    // +20 %: at the limit
            (10_000, 12_001, Verdict::Regressed), // just over
            (10_000, 7_999, Verdict::Improved),
            (1_000, 1_400, Verdict::Within), // +40 %, but only 400 ms: noise
            (1_000, 1_600, Verdict::Regressed),
            (0, 600, Verdict::Regressed), // from nothing to something real
            (0, 300, Verdict::Within),
            (5_000, 5_000, Verdict::Within),
        ] {
            assert_eq!(judge(old, new, t), want, "{old} → {new}");
        }
    }

    #[test]
    fn a_run_is_compared_load_by_load_and_stage_by_stage() {
        let base = entries(
            &[load("nllb", 3_000, &[("WAITING_FOR_HTTP", 500), ("LOADING_WEIGHTS", 2_500), ("READY", 0)])],
            "run-1",
            1,
        );
        assert_eq!(
            base.iter().map(|e| (e.stage.as_str(), e.ms)).collect::<Vec<_>>(),
            [("load", 3_000), ("WAITING_FOR_HTTP", 500), ("LOADING_WEIGHTS", 2_500)]
        );
        let mut reused = load("nllb", 0, &[]);
        reused.host = "gpu-02".into();
        reused.reused = true;
        let mut asked_late = load("nllb", 1_200, &[("WAITING_FOR_HTTP", 500), ("LOADING_WEIGHTS", 5_600)]);
        asked_late.waited = Duration::from_millis(1_200); // asked while another suite's load was under way
        let run = [asked_late, load("aya", 9_000, &[("LOADING_WEIGHTS", 9_000)]), reused];
        let c = compare(&base, &run, |_| Tolerance::default());
        let got: Vec<(&str, i64, i64, Verdict)> =
            c.changes.iter().map(|c| (c.stage.as_str(), c.old_ms, c.new_ms, c.verdict)).collect();
        assert_eq!(
            got,
            [
                ("load", 3_000, 6_100, Verdict::Regressed),
                ("WAITING_FOR_HTTP", 500, 500, Verdict::Within),
                ("LOADING_WEIGHTS", 2_500, 5_600, Verdict::Regressed),
            ]
        );
        assert_eq!(c.regressions(), 2);
        assert_eq!(c.changes[0].change_text(), "+103 %");
        assert_eq!(c.without_baseline.iter().map(|k| k.model.as_str()).collect::<Vec<_>>(), ["aya"]);
        let loose = compare(&base, &run[..1], |_| Tolerance { ratio: 1.5, slack: Duration::ZERO });
        assert_eq!(loose.regressions(), 0, "a suite's own tolerance decides");
    }

    #[test]
    fn a_load_is_judged_with_the_tightest_tolerance_of_the_suites_that_waited_for_it() {
        let suite = |name: &str, tolerance: Option<f64>| SuiteInfo {
            name: name.into(),
            file: "s.yaml".into(),
            service: "translation".into(),
            models: vec!["nllb".into()],
            cases: vec![],
            baseline_tolerance: tolerance,
        };
        let suites = [suite("loose", Some(0.5)), suite("tight", Some(0.1)), suite("plain", None)];
        let run = Tolerance { ratio: 0.25, slack: Duration::from_millis(700) };
        let nllb = load("nllb", 1, &[]);
        let key = Key::of(&nllb);
        for (waited, want) in
            [(vec!["loose", "tight"], 0.1), (vec!["loose"], 0.5), (vec!["plain"], 0.25), (vec![], 0.25)]
        {
            let suite_loads: Vec<(String, ModelLoad)> = waited.iter().map(|s| (s.to_string(), nllb.clone())).collect();
            let got = tolerance_for(&key, &suite_loads, &suites, run);
            assert_eq!((got.ratio, got.slack), (want, run.slack), "{waited:?}");
        }
    }

    #[test]
    fn tolerances_are_written_as_percentages_or_fractions() {
        assert_eq!(parse_ratio("20%"), Ok(0.2));
        assert_eq!(parse_ratio("0.5"), Ok(0.5));
        assert!(parse_ratio("-3%").unwrap_err().contains("write e.g. \"20%\""));
        assert_eq!(parse_ratio("25").unwrap_err(), "\"25\" as a fraction is 2500 %: write \"25%\" if you meant 25 %");
        assert_eq!(parse_ratio("1"), Ok(1.0));
        assert!(parse_ratio("fast").is_err());
    }
}
