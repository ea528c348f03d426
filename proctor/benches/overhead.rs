//! Harness overhead of a demo run: how much of `proctor demo`'s wall time is
//! not spent waiting for the service. Writes its section of
//! docs/benchmarks.md.
//!
//! Run: `cargo bench -p proctor --bench overhead`. Each round runs the real
//! `proctor demo` (its agent, the sim with an NLLB-like and an Aya-like
//! model loading for a few seconds, the five example suites, every report)
//! and reads its report.json: the service is busy while a model loads (from
//! its first stage's start to READY) and while a case runs (from the agent's
//! start of it, for its duration). The overhead is the rest of the wall time:
//! starting the agent, connecting, planning, waiting on the controller side,
//! writing reports. Shown over the run (report.json's duration) and over the
//! whole command (process start to exit, the agent's start-up included).

use std::process::{Command, Stdio};
use std::time::Instant;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_proctor");
const ROUNDS: usize = 3;

/// Total length of the union of `[start, end)` intervals, in ms.
fn union_ms(mut spans: Vec<(i64, i64)>) -> i64 {
    spans.sort_unstable();
    let mut total = 0;
    let mut current: Option<(i64, i64)> = None;
    for (s, e) in spans.into_iter().filter(|(s, e)| e > s) {
        current = match current {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce - cs;
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    total + current.map_or(0, |(s, e)| e - s)
}

/// (run ms, busy ms) from a report.json.
fn busy(report: &serde_json::Value) -> (i64, i64) {
    let mut spans = Vec::new();
    for load in report["loads"].as_array().into_iter().flatten() {
        let stages = load["stages"].as_array().cloned().unwrap_or_default();
        let start = stages.iter().filter_map(|s| s["start_unix_ms"].as_i64()).min();
        let end = stages.iter().filter_map(|s| s["end_unix_ms"].as_i64()).max();
        if let (Some(s), Some(e)) = (start, end) {
            spans.push((s, e));
        }
    }
    for case in report["cases"].as_array().into_iter().flatten() {
        let (Some(s), Some(d)) = (case["started_unix_ms"].as_i64(), case["duration_ms"].as_i64()) else { continue };
        if s > 0 {
            spans.push((s, s + d.max(1)));
        }
    }
    (report["duration_ms"].as_i64().unwrap_or(0), union_ms(spans))
}

fn main() {
    assert_eq!(union_ms(vec![(0, 10), (5, 20), (30, 40), (40, 41)]), 31);
    let dir = std::env::temp_dir().join(format!("proctor-bench-overhead-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rows = Vec::new();
    for round in 0..ROUNDS {
        let out = dir.join(format!("round-{round}"));
        let started = Instant::now();
        let status = Command::new(BIN)
            .args(["demo", "--no-store", "--progress", "none", "--out"])
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        let wall = started.elapsed().as_millis() as i64;
        assert!(status.success(), "proctor demo: {status}");
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
        let (run, busy) = busy(&report);
        eprintln!("round {round}: wall {wall} ms, run {run} ms, service busy {busy} ms");
        rows.push((wall, run, busy));
    }
    rows.sort_by_key(|(wall, _, _)| *wall);
    let (wall, run, busy) = rows[rows.len() / 2];
    let pct = |part: i64, of: i64| part as f64 * 100.0 / of as f64;
    let body = format!(
        "## Harness overhead of a demo run\n\n`cargo bench -p proctor --bench overhead`, {machine}: `proctor demo` \
         (agent, sim with an NLLB-like and an Aya-like model loading, five suites, every report), the round with the \
         median wall time of {ROUNDS}. The service is busy while a model loads (first stage to READY) and while a \
         case runs; the overhead is the rest.\n\n| | wall time | service busy | overhead |\n|---|---|---|---|\n\
         | the run (report.json's duration) | {run} ms | {busy} ms | {} ms ({:.1} %) |\n\
         | the whole command (the agent's start-up, certificates, reports included) | {wall} ms | {busy} ms | {} ms \
         ({:.1} %) |\n\nThe target is ≤ 2 % of the run: {}.\n",
        run - busy,
        pct(run - busy, run),
        wall - busy,
        pct(wall - busy, wall),
        if pct(run - busy, run) <= 2.0 { "met" } else { "not met" },
        machine = common::machine(),
    );
    common::write_section("overhead", &body);
    let _ = std::fs::remove_dir_all(&dir);
}
