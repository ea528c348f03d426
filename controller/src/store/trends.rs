//! Trends over the stored runs, pure: per model and host the load times of
//! the last runs (with a sparkline), and per case how flaky it is — runs
//! that needed a re-run after a lost host, and runs whose outcome flipped
//! from the run before.

use std::collections::BTreeMap;

use serde::Serialize;

use super::baseline::Key;
use super::baseline::cases::CaseKey;
use super::{CaseRow, LoadResultRow, LoadRow};

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// One bar per value, scaled from the smallest to the largest.
pub fn sparkline(values: &[i64]) -> String {
    let (Some(lo), Some(hi)) = (values.iter().min(), values.iter().max()) else { return String::new() };
    let span = (hi - lo).max(1) as f64;
    values
        .iter()
        .map(|v| match hi == lo {
            true => BARS[3],
            false => BARS[(((v - lo) as f64 / span) * 7.0).round() as usize],
        })
        .collect()
}

/// Load times of one model on one host, oldest first.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LoadTrend {
    pub key: Key,
    /// (run id, load ms) per load.
    pub loads: Vec<(String, i64)>,
    pub median_ms: i64,
    pub last_ms: i64,
}

pub fn load_trends(rows: &[LoadRow]) -> Vec<LoadTrend> {
    let mut by: BTreeMap<Key, Vec<(String, i64)>> = BTreeMap::new();
    for r in rows {
        let key = Key { host: r.host.clone(), service: r.service.clone(), model: r.model.clone() };
        by.entry(key).or_default().push((r.run_id.clone(), r.load_ms));
    }
    by.into_iter()
        .map(|(key, loads)| {
            let mut sorted: Vec<i64> = loads.iter().map(|l| l.1).collect();
            sorted.sort_unstable();
            LoadTrend { median_ms: sorted[sorted.len() / 2], last_ms: loads.last().map_or(0, |l| l.1), key, loads }
        })
        .collect()
}

/// A load case's throughput and p99 over runs, oldest first.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LoadCaseTrend {
    pub key: CaseKey,
    pub rps: Vec<i64>,
    pub p99_us: Vec<i64>,
}

pub fn load_case_trends(rows: &[LoadResultRow]) -> Vec<LoadCaseTrend> {
    let mut by: BTreeMap<CaseKey, (Vec<i64>, Vec<i64>)> = BTreeMap::new();
    for r in rows {
        let key = CaseKey { host: r.host.clone(), suite: r.suite.clone(), case: r.name.clone() };
        let (rps, p99) = by.entry(key).or_default();
        rps.push(r.rps);
        p99.push(r.p99_us);
    }
    by.into_iter().map(|(key, (rps, p99_us))| LoadCaseTrend { key, rps, p99_us }).collect()
}

impl LoadCaseTrend {
    /// `rps ▁▅█ last 6807/s; p99 █▃▁ last 4.60ms (3 runs)`.
    pub fn line(&self) -> String {
        format!(
            "rps {} last {}/s; p99 {} last {} ({} runs)",
            sparkline(&self.rps),
            self.rps.last().copied().unwrap_or(0),
            sparkline(&self.p99_us),
            crate::report::latency(self.p99_us.last().copied().unwrap_or(0).max(0) as u64),
            self.rps.len()
        )
    }
}

/// How one case fared across runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CaseTrend {
    pub suite: String,
    pub name: String,
    /// One letter per run, oldest first: P passed, F failed, E error, S skipped.
    pub outcomes: String,
    pub runs: usize,
    /// Runs where it needed a re-run (its host was lost).
    pub reruns: usize,
    /// Runs whose outcome differs from the run before.
    pub flips: usize,
}

impl CaseTrend {
    pub fn flaky(&self) -> bool {
        self.reruns > 0 || self.flips > 0
    }

    /// Share of its runs that were flaky (a re-run or a flip).
    pub fn flakiness(&self) -> f64 {
        match self.runs {
            0 => 0.0,
            n => (self.reruns + self.flips).min(n) as f64 / n as f64,
        }
    }
}

pub fn case_trends(rows: &[CaseRow]) -> Vec<CaseTrend> {
    let mut by: BTreeMap<(String, String), Vec<&CaseRow>> = BTreeMap::new();
    for r in rows {
        by.entry((r.suite.clone(), r.name.clone())).or_default().push(r);
    }
    by.into_iter()
        .map(|((suite, name), runs)| {
            let letters: String = runs
                .iter()
                .map(|r| match r.outcome.as_str() {
                    "passed" => 'P',
                    "failed" => 'F',
                    "skipped" => 'S',
                    _ => 'E',
                })
                .collect();
            let flips = letters.as_bytes().windows(2).filter(|w| w[0] != w[1]).count();
            CaseTrend {
                suite,
                name,
                runs: runs.len(),
                reruns: runs.iter().filter(|r| r.reruns > 0).count(),
                flips,
                outcomes: letters,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparkline_scales_from_the_fastest_to_the_slowest() {
        assert_eq!(sparkline(&[]), "");
        assert_eq!(sparkline(&[5, 5, 5]), "▄▄▄");
        assert_eq!(sparkline(&[1000, 2000, 8000, 1000]), "▁▂█▁");
    }

    fn case(run: &str, name: &str, outcome: &str, reruns: i64) -> CaseRow {
        CaseRow {
            run_id: run.into(),
            suite: "s".into(),
            name: name.into(),
            outcome: outcome.into(),
            reruns,
            at_unix_ms: 0,
        }
    }

    #[test]
    fn flakiness_counts_reruns_and_flipped_outcomes_across_runs() {
        let rows = [
            case("r1", "steady", "passed", 0),
            case("r1", "flipper", "passed", 0),
            case("r1", "rerun", "passed", 0),
            case("r2", "steady", "passed", 0),
            case("r2", "flipper", "failed", 0),
            case("r2", "rerun", "passed", 1),
            case("r3", "steady", "passed", 0),
            case("r3", "flipper", "passed", 0),
            case("r3", "rerun", "passed", 0),
        ];
        let got: Vec<(String, String, usize, usize, bool)> = case_trends(&rows)
            .into_iter()
            .map(|t| (t.name.clone(), t.outcomes.clone(), t.reruns, t.flips, t.flaky()))
            .collect();
        assert_eq!(
            got,
            [
                ("flipper".into(), "PFP".into(), 0, 2, true),
                ("rerun".into(), "PPP".into(), 1, 0, true),
                ("steady".into(), "PPP".into(), 0, 0, false),
            ]
        );
    }

    #[test]
    fn load_trends_group_by_host_and_model_with_median_and_last() {
        let row = |run: &str, host: &str, ms: i64| LoadRow {
            run_id: run.into(),
            host: host.into(),
            service: "translation".into(),
            model: "nllb".into(),
            outcome: "ready".into(),
            load_ms: ms,
            at_unix_ms: 0,
        };
        let t = load_trends(&[row("r1", "a", 3000), row("r1", "b", 9000), row("r2", "a", 5000), row("r3", "a", 4000)]);
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].key.host.as_str(), t[0].median_ms, t[0].last_ms, t[0].loads.len()), ("a", 4000, 4000, 3));
        assert_eq!((t[1].key.host.as_str(), t[1].median_ms, t[1].last_ms), ("b", 9000, 9000));
    }
}
