//! Baselines of load cases: per host, suite and case, the throughput (`rps`)
//! and the p99 latency (`p99_us`) a run measured; and the pure comparison of
//! a run's load cases against them. Slower p99 or fewer requests per second
//! beyond the tolerance is a regression; p99 changes under 1 ms never count.

use serde::{Deserialize, Serialize};

use super::{Tolerance, Verdict};
use crate::report::{CaseReport, Outcome};

/// p99 changes smaller than this are noise, whatever their percentage.
pub const P99_SLACK_US: i64 = 1_000;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CaseKey {
    pub host: String,
    pub suite: String,
    pub case: String,
}

impl std::fmt::Display for CaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.host, self.suite, self.case)
    }
}

/// `rps` (higher is better) or `p99_us` (lower is better).
pub const METRICS: [&str; 2] = ["rps", "p99_us"];

/// One baseline figure of a load case.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CaseEntry {
    pub key: CaseKey,
    pub metric: String,
    pub value: i64,
    /// How the load ran (`closed loop, 8 connections`): another shape
    /// measures something else. Empty for baselines set before it was kept.
    pub mode: String,
    pub run_id: String,
    pub set_unix_ms: i64,
}

/// One load case's figure next to its baseline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaseChange {
    pub key: CaseKey,
    pub metric: String,
    pub old: i64,
    pub new: i64,
    pub verdict: Verdict,
    pub tolerance_percent: f64,
    /// The baseline's shape where the case now runs another: not judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reshaped_from: Option<String>,
}

/// The figures a load case that passed gives (one that failed or was cut
/// short says little of what the service does): the answered requests per
/// second (errors left out) and the p99.
pub fn figures(case: &CaseReport) -> Vec<(&'static str, i64)> {
    let Some(load) = case.load.as_ref().filter(|_| matches!(case.outcome, Outcome::Passed)) else {
        return Vec::new();
    };
    if load.requests == 0 {
        return Vec::new();
    }
    let answered = load.requests.saturating_sub(load.errors) as f64 / load.requests as f64;
    vec![("rps", (load.rps * answered).round() as i64), ("p99_us", load.p99_us as i64)]
}

fn key(case: &CaseReport) -> CaseKey {
    CaseKey { host: case.host.clone(), suite: case.suite.clone(), case: case.name.clone() }
}

/// The baseline entries a run's load cases would set.
pub fn entries(cases: &[CaseReport], run_id: &str, now_unix_ms: i64) -> Vec<CaseEntry> {
    cases
        .iter()
        .flat_map(|c| {
            figures(c).into_iter().map(move |(metric, value)| CaseEntry {
                key: key(c),
                metric: metric.to_owned(),
                value,
                mode: c.load.as_ref().map(|l| l.mode.clone()).unwrap_or_default(),
                run_id: run_id.to_owned(),
                set_unix_ms: now_unix_ms,
            })
        })
        .collect()
}

/// The pure rule for one figure.
pub fn judge(metric: &str, old: i64, new: i64, ratio: f64) -> Verdict {
    let limit = old as f64 * ratio;
    // Worse is higher for latency, lower for throughput.
    let worse = if metric == "rps" { old - new } else { new - old };
    if metric != "rps" && worse.abs() <= P99_SLACK_US {
        return Verdict::Within;
    }
    match worse {
        w if w > 0 && w as f64 > limit => Verdict::Regressed,
        w if w < 0 && (-w) as f64 > limit => Verdict::Improved,
        _ => Verdict::Within,
    }
}

/// Each load case of the run with a baseline, judged with its suite's
/// tolerance (`tolerance_of(suite)`).
pub fn compare(
    baseline: &[CaseEntry],
    cases: &[CaseReport],
    tolerance_of: impl Fn(&str) -> Tolerance,
) -> Vec<CaseChange> {
    let mut out = Vec::new();
    for case in cases {
        let key = key(case);
        let ratio = tolerance_of(&case.suite).ratio;
        let mode = case.load.as_ref().map_or("", |l| l.mode.as_str());
        for (metric, new) in figures(case) {
            let Some(base) = baseline.iter().find(|e| e.key == key && e.metric == metric) else {
                continue;
            };
            let reshaped_from = (!base.mode.is_empty() && base.mode != mode).then(|| base.mode.clone());
            out.push(CaseChange {
                key: key.clone(),
                metric: metric.to_owned(),
                old: base.value,
                new,
                verdict: if reshaped_from.is_some() { Verdict::Within } else { judge(metric, base.value, new, ratio) },
                tolerance_percent: ratio * 100.0,
                reshaped_from,
            });
        }
    }
    out
}

/// `4.60ms` or `6807/s`.
pub fn show(metric: &str, value: i64) -> String {
    match metric {
        "rps" => format!("{value}/s"),
        _ => crate::report::latency(value.max(0) as u64),
    }
}

pub fn change_text(c: &CaseChange) -> String {
    match c.old {
        0 => "new".into(),
        old => format!("{:+.0} %", (c.new - old) as f64 * 100.0 / old as f64),
    }
}

pub fn verdict_text(c: &CaseChange) -> String {
    if let Some(mode) = &c.reshaped_from {
        return format!("not compared: its baseline ran {mode}; set it again");
    }
    match c.verdict {
        Verdict::Regressed => format!("REGRESSED (over {:.0} %)", c.tolerance_percent),
        Verdict::Improved => "improved".into(),
        Verdict::Within => "ok".into(),
    }
}

/// A change as every report shows it: metric, baseline, now, change, verdict.
pub fn cells(c: &CaseChange) -> [String; 5] {
    [
        c.metric.trim_end_matches("_us").to_owned(),
        show(&c.metric, c.old),
        show(&c.metric, c.new),
        change_text(c),
        verdict_text(c),
    ]
}

/// The terminal's rows (after the model loads').
pub fn text(changes: &[CaseChange]) -> String {
    if changes.is_empty() {
        return String::new();
    }
    let key_w = changes.iter().map(|c| c.key.to_string().len()).max().unwrap_or(9).max(9);
    let mut out =
        format!("  {:<key_w$}  {:<6}  {:>9}  {:>9}  {:>7}\n", "LOAD CASE", "METRIC", "BASELINE", "NOW", "CHANGE");
    for c in changes {
        let [metric, old, now, change, verdict] = cells(c);
        out.push_str(&format!(
            "  {:<key_w$}  {metric:<6}  {old:>9}  {now:>9}  {change:>7}  {verdict}\n",
            c.key.to_string()
        ));
    }
    out
}

/// The Markdown summary's rows.
pub fn markdown(changes: &[CaseChange]) -> String {
    if changes.is_empty() {
        return String::new();
    }
    let mut out = String::from("\n| load case | metric | baseline | now | change | |\n|---|---|---|---|---|---|\n");
    for c in changes {
        let [metric, old, now, change, verdict] = cells(c);
        out.push_str(&format!("| {} | {metric} | {old} | {now} | {change} | {verdict} |\n", c.key));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::LoadReport;

    #[test]
    fn throughput_regresses_when_lower_and_latency_when_higher() {
        // (metric, old, new, ratio, expected)
        let table = [
            ("rps", 1000, 800, 0.25, Verdict::Within),
            ("rps", 1000, 740, 0.25, Verdict::Regressed),
            ("rps", 1000, 1300, 0.25, Verdict::Improved),
            ("p99_us", 10_000, 12_000, 0.25, Verdict::Within),
            ("p99_us", 10_000, 13_000, 0.25, Verdict::Regressed),
            ("p99_us", 10_000, 7_000, 0.25, Verdict::Improved),
            ("p99_us", 500, 1_400, 0.25, Verdict::Within), // +180 %, but under a millisecond
            ("p99_us", 500, 1_600, 0.25, Verdict::Regressed),
        ];
        for (metric, old, new, ratio, want) in table {
            assert_eq!(judge(metric, old, new, ratio), want, "{metric} {old} → {new}");
        }
    }

    fn case(name: &str, outcome: Outcome, rps: f64, p99_us: u64) -> CaseReport {
        let mut c = CaseReport::error("s", name, String::new());
        c.outcome = outcome;
        c.host = "gpu-01".into();
        c.load = Some(Box::new(LoadReport { requests: 100, rps, p99_us, ..Default::default() }));
        c
    }

    #[test]
    fn a_run_sets_and_is_compared_on_its_finished_load_cases() {
        let base = entries(
            &[
                case("steady", Outcome::Passed, 5000.4, 4_000),
                case("cut", Outcome::Error("x".into()), 10.0, 1),
                case("failed", Outcome::Failed(vec![]), 10.0, 1),
            ],
            "run-1",
            7,
        );
        let got: Vec<(String, &str, i64)> =
            base.iter().map(|e| (e.key.to_string(), e.metric.as_str(), e.value)).collect();
        assert_eq!(got, [("gpu-01/s/steady".to_owned(), "rps", 5000), ("gpu-01/s/steady".to_owned(), "p99_us", 4_000)]);
        let now = [case("steady", Outcome::Passed, 3000.0, 9_000), case("new", Outcome::Passed, 1.0, 1)];
        let changes = compare(&base, &now, |_| Tolerance::default());
        let got: Vec<(&str, i64, i64, Verdict)> =
            changes.iter().map(|c| (c.metric.as_str(), c.old, c.new, c.verdict)).collect();
        assert_eq!(got, [("rps", 5000, 3000, Verdict::Regressed), ("p99_us", 4_000, 9_000, Verdict::Regressed)]);
        let table = text(&changes);
        assert!(
            table.contains("gpu-01/s/steady  rps        5000/s     3000/s    -40 %  REGRESSED (over 25 %)"),
            "{table}"
        );
        assert!(table.contains("p99        4.00ms     9.00ms   +125 %  REGRESSED"), "{table}");
    }

    #[test]
    fn a_load_case_of_another_shape_is_not_judged_against_its_baseline() {
        let shaped = |mode: &str, rps, p99_us| {
            let mut c = case("steady", Outcome::Passed, rps, p99_us);
            c.load.as_mut().unwrap().mode = mode.into();
            c
        };
        let base = entries(&[shaped("closed loop, 8 connections", 5000.0, 4_000)], "run-1", 7);
        assert!(base.iter().all(|e| e.mode == "closed loop, 8 connections"), "{base:?}");
        // (mode now, expected verdicts of rps and p99)
        let table = [
            ("closed loop, 8 connections", [Verdict::Regressed, Verdict::Regressed]),
            ("closed loop, 32 connections", [Verdict::Within, Verdict::Within]),
        ];
        for (mode, want) in table {
            let changes = compare(&base, &[shaped(mode, 3000.0, 9_000)], |_| Tolerance::default());
            let got: Vec<Verdict> = changes.iter().map(|c| c.verdict).collect();
            assert_eq!(got, want, "{mode}");
        }
        let changes = compare(&base, &[shaped("closed loop, 32 connections", 3000.0, 9_000)], |_| Tolerance::default());
        let said = verdict_text(&changes[0]);
        assert_eq!(said, "not compared: its baseline ran closed loop, 8 connections; set it again");
        // A baseline from before shapes were kept is compared as it was.
        let mut old = base.clone();
        old.iter_mut().for_each(|e| e.mode.clear());
        let changes = compare(&old, &[shaped("closed loop, 32 connections", 3000.0, 9_000)], |_| Tolerance::default());
        assert_eq!(changes[0].verdict, Verdict::Regressed);
    }
}
