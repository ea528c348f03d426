//! What the run store costs per run, on SQLite and on PostgreSQL. Writes its
//! section of docs/benchmarks.md.
//!
//! Run: `cargo bench -p proctor --bench store` (needs Debian's `postgresql`
//! package for the PostgreSQL half). First a real `proctor demo` runs with a
//! scratch SQLite store, so the events are those of a real run (15 cases,
//! two model loads, memory samples, progress); then that run is written
//! again `RUNS` times through the controller's own `Recorder` into a fresh
//! store of each kind, each time under a new run id, timing from the first
//! event sent to the last one committed (`Recorder::close`) and measuring
//! what the store's data grew by. Side by side: the report files the same
//! demo wrote.

use std::sync::Arc;
use std::time::Instant;

use controller::run::events::RunEvent;
use controller::store::{Location, Recorder, Store};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_proctor");
const RUNS: usize = 20;

/// The events of one real demo run, and the size of the reports it wrote.
async fn a_real_run(dir: &std::path::Path) -> (Vec<(i64, RunEvent)>, Vec<(&'static str, u64)>) {
    let store = dir.join("demo.sqlite");
    let out = dir.join("demo");
    let status = std::process::Command::new(BIN)
        .args(["demo", "--progress", "none", "--store"])
        .arg(&store)
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run the demo");
    assert!(status.success(), "the demo failed: {status}");
    let kept = Store::open(&Location::Sqlite(store)).await.unwrap();
    let run = kept.run("latest").await.unwrap();
    let events = kept.events(&run.id).await.unwrap();
    let size = |f: &str| std::fs::metadata(out.join(f)).map(|m| m.len()).unwrap_or(0);
    let files = vec![
        ("junit.xml", size("junit.xml")),
        ("report.json", size("report.json")),
        ("report.html", size("report.html")),
        ("trace.json", size("trace.json")),
    ];
    (events, files)
}

/// Writes the run `RUNS` times; (ms per run: median, max; bytes per run).
async fn cost(location: &Location, events: &[(i64, RunEvent)]) -> (f64, f64, u64) {
    let store = Arc::new(Store::open(location).await.expect("open the store"));
    let before = store.size_bytes().await.unwrap();
    let mut times = Vec::new();
    for n in 0..RUNS {
        let started = Instant::now();
        let recorder = Recorder::start(store.clone(), "bench@lab".into());
        for (at, event) in events {
            let mut event = event.clone();
            if let RunEvent::Started { run_id, .. } = &mut event {
                *run_id = format!("bench-{n}-{run_id}");
            }
            recorder.on(&event, *at);
        }
        recorder.close().await.expect("every event written");
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let after = store.size_bytes().await.unwrap();
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[times.len() - 1], (after - before) / RUNS as u64)
}

#[tokio::main]
async fn main() {
    let dir = std::env::temp_dir().join(format!("proctor-bench-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (events, files) = a_real_run(&dir).await;
    let kinds = events.iter().fold(std::collections::BTreeMap::<String, usize>::new(), |mut m, (_, e)| {
        let v = serde_json::to_value(e).unwrap();
        *m.entry(v["event"].as_str().unwrap_or_default().to_owned()).or_default() += 1;
        m
    });
    eprintln!("one demo run: {} events {kinds:?}", events.len());

    let sqlite = cost(&Location::Sqlite(dir.join("bench.sqlite")), &events).await;
    eprintln!("sqlite: {sqlite:?}");
    let pg = testkit::postgres::Postgres::start();
    let postgres = cost(&Location::Postgres(pg.url.clone()), &events).await;
    eprintln!("postgres: {postgres:?}");
    drop(pg);

    let kib = |b: u64| format!("{:.0} KiB", b as f64 / 1024.0);
    let mut body = format!(
        "## Run store\n\nWhat keeping a run costs (`cargo bench -p proctor --bench store`, {machine}): the events of \
         one real `proctor demo` run ({n} events: 15 cases, two model loads, stage changes, memory samples) written \
         {RUNS} times through the controller's `Recorder`, one transaction per event, from the first event sent to \
         the last one committed.\n\n| store | per run (median) | slowest run | data per run |\n|---|---|---|---|\n",
        machine = common::machine(),
        n = events.len()
    );
    body.push_str(&format!(
        "| SQLite (WAL, `synchronous=NORMAL`, local disk) | {:.1} ms | {:.1} ms | {} |\n",
        sqlite.0,
        sqlite.1,
        kib(sqlite.2)
    ));
    body.push_str(&format!(
        "| PostgreSQL 15 (loopback, `fsync=off` test cluster) | {:.1} ms | {:.1} ms | {} |\n",
        postgres.0,
        postgres.1,
        kib(postgres.2)
    ));
    body.push_str("\nThe same demo's report files, for scale: ");
    let listed: Vec<String> = files.iter().map(|(f, b)| format!("{f} {}", kib(*b))).collect();
    body.push_str(&listed.join(", "));
    body.push_str(
        ".\n\nThe writing runs on its own task while the run goes on, so these milliseconds are spread over the \
         run's seconds and never hold up the terminal or the other reporters. The PostgreSQL cluster is a test \
         one (`fsync=off`, loopback); over a lab network each event costs a round trip more.\n",
    );
    common::write_section("store", &body);
    let _ = std::fs::remove_dir_all(&dir);
}
