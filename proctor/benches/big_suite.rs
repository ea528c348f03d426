//! What a big suite costs the controller: 1,000, 5,000 and 10,000 functional
//! cases in one suite, the controller's wall time, peak memory and trace
//! file per case. Writes its section of docs/benchmarks.md.
//!
//! Run: `cargo bench -p proctor --bench big_suite`. Each suite runs through
//! an agent supervising `proctor sim` (model READY: a warm-up run first),
//! `parallel: 8`, no run store; the largest first is never measured (sizes
//! grow, so each run's peak is the children's highest so far).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_proctor");

fn suite(cases: usize) -> String {
    let mut text = String::from("name: big\nservice: translation\nmodels: [nllb]\nparallel: 8\ncases:\n");
    for i in 0..cases {
        text.push_str(&format!(
            "  - name: case {i}\n    request: {{method: POST, path: /translate, json: {{text: Hello world, \
             source_lang: en, target_lang: es, model: nllb}}}}\n    expect: {{status: 200, json: [{{pointer: \
             /translated_text, equals: hola mundo}}]}}\n"
        ));
    }
    text
}

fn start_agent(dir: &Path) -> (std::process::Child, String) {
    common::start_agent(BIN, dir, &common::one_sim_config(BIN, dir))
}

/// The highest peak RSS of the waited-for children so far, in KiB.
fn children_peak_kib() -> i64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_CHILDREN).map_or(0, |u| u.max_rss())
}

fn main() {
    let dir = std::env::temp_dir().join(format!("proctor-bench-big-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mut agent, addr) = start_agent(&dir);
    let run = |cases: usize| {
        let file = dir.join(format!("s{cases}.yaml"));
        std::fs::write(&file, suite(cases)).unwrap();
        let out = dir.join(format!("out{cases}"));
        let started = Instant::now();
        let status = Command::new(BIN)
            .args(["run", "--no-store", "--progress", "none", "--agent", &addr, "--out"])
            .arg(&out)
            .arg(&file)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{cases} cases: {status}");
        let wall = started.elapsed().as_secs_f64();
        let trace = std::fs::metadata(out.join("trace.json")).map_or(0, |m| m.len());
        (wall, children_peak_kib(), trace)
    };
    run(10); // warm-up: the model loads once
    let mut rows = String::new();
    let mut last: Option<(usize, i64)> = None;
    let mut marginals = Vec::new();
    for cases in [1_000, 5_000, 10_000] {
        let (wall, peak_kib, trace) = run(cases);
        let per_case = last.map(|(n, kib)| (peak_kib - kib) as f64 / (cases - n) as f64);
        marginals.extend(per_case);
        let marginal = per_case.map_or(String::from("—"), |kib| format!("{kib:.1} KiB"));
        eprintln!("{cases}: {wall:.2}s, {peak_kib} KiB, trace {trace} B");
        rows.push_str(&format!(
            "| {cases} | {wall:.2} s | {:.3} ms | {} MiB | {marginal} | {:.0} B |\n",
            wall * 1000.0 / cases as f64,
            peak_kib / 1024,
            trace as f64 / cases as f64
        ));
        last = Some((cases, peak_kib));
    }
    let _ = Command::new("kill").arg(agent.id().to_string()).status();
    let _ = agent.wait();
    let body = format!(
        "## Big suites: what each case costs the controller\n\n`cargo bench -p proctor --bench big_suite`, \
         {machine}: one suite of N functional cases (`POST /translate`, a status and a JSON-pointer check), \
         `parallel: 8`, through an agent supervising `proctor sim`; `proctor run --no-store` timed whole, its peak \
         RSS from `getrusage`.\n\n| cases | wall time | per case | controller peak RSS | RSS per added case | \
         trace.json per case |\n|---|---|---|---|---|---|\n{rows}\nFlat per-case cost (the memory an added case costs \
         between 5,000 and 10,000 cases at most 1.2× what it costs between 1,000 and 5,000): {}.\n",
        if marginals.len() == 2 && marginals[1] <= marginals[0] * 1.2 { "met" } else { "not met" },
        machine = common::machine(),
    );
    common::write_section("big_suite", &body);
    let _ = std::fs::remove_dir_all(&dir);
}
