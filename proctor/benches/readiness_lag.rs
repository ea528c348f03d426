//! Readiness lag: time from the sim marking a model loaded to a gRPC watcher
//! (the controller's view) receiving `READY`, over many loads, with the
//! default 250 ms polling ceiling. Writes its section of docs/benchmarks.md.
//!
//! Run: `cargo bench -p proctor --bench readiness_lag` (release build).
//! Loads: 40 "long" ones whose last stage lasts 1–1.25 s, so polling has
//! backed off to its ceiling, and 10 short ones (50 ms stages). The long
//! loads' last stage varies in 25 ms steps across one ceiling interval, so
//! the moment a model becomes ready falls at every phase of the poll cycle
//! rather than at one lucky (or unlucky) spot.

use std::path::Path;

use proto::agent_client::AgentClient;
use proto::{Stage, event, watch_message};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_proctor");
/// Long services `long0`..`long9`, differing only in warm-up length.
const LONG_VARIANTS: usize = 10;
const SHORT: &str = "short:mb=8,download=50ms,load=50ms,warmup=50ms,progress=off";
const LONG_RUNS: usize = 40;
const SHORT_RUNS: usize = 10;

fn config(dir: &Path) -> String {
    let service = |name: &str, spec: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\ncommand = [\"{BIN}\", \"sim\", \"--port\", \"{{port}}\", \"--model\", \"{spec}\"]\n\
             stop_grace = \"2s\"\n\n[[service.model]]\nname = \"{name}\"\n\n"
        )
    };
    let mut text = format!("listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n{}", dir.display(), service("short", SHORT));
    for i in 0..LONG_VARIANTS {
        let name = format!("long{i}");
        let spec = format!("{name}:mb=8,download=300ms,load=500ms,warmup={}ms,progress=off", 1000 + 25 * i);
        text.push_str(&service(&name, &spec));
    }
    text
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// One cold load of `service`: returns (lag ms, load duration ms).
async fn one_load(client: &mut AgentClient<tonic::transport::Channel>, service: &str, run: usize) -> (i64, i64) {
    let lease = client
        .acquire_lease(proto::AcquireLeaseRequest {
            service: service.into(),
            run_id: format!("bench-{service}-{run}"),
            holder: "bench".into(),
            ttl_ms: 60_000,
        })
        .await
        .expect("lease")
        .into_inner();
    let lease_ref =
        proto::LeaseRef { service: lease.service, run_id: lease.run_id, lease_id: lease.id, epoch: lease.epoch };
    let mut stream = client.watch(proto::WatchRequest { from_seq: u64::MAX }).await.expect("watch").into_inner();
    let asked = now_ms();
    client
        .ensure_models(proto::EnsureModelsRequest {
            lease: Some(lease_ref.clone()),
            models: vec![service.into()],
            fresh: true,
            ..Default::default()
        })
        .await
        .expect("ensure");
    let mut loaded_at = None;
    let mut started_at = None;
    loop {
        let message = stream.message().await.expect("stream").expect("event");
        let received = now_ms();
        let Some(watch_message::Kind::Event(e)) = message.kind else { continue };
        loaded_at = loaded_at.or_else(|| loaded_stamp(&e, service));
        let Some(event::Kind::StageChanged(c)) = &e.kind else { continue };
        if c.service != service {
            continue;
        }
        match c.to() {
            Stage::ProcessStarting => started_at = Some(e.time_unix_ms),
            Stage::Failed => panic!("load failed: {}", c.message),
            Stage::Ready if started_at.is_some() => {
                // The sim's log line may trail the stage by a moment.
                while loaded_at.is_none() {
                    let m = stream.message().await.expect("stream").expect("event");
                    if let Some(watch_message::Kind::Event(e)) = m.kind {
                        loaded_at = loaded_stamp(&e, service);
                    }
                }
                let _ = client.release_lease(lease_ref).await;
                return (received - loaded_at.unwrap_or(received), received - started_at.unwrap_or(asked));
            }
            _ => {}
        }
    }
}

/// The sim's "loaded at_unix_ms=T" stamp, if this event is that log line.
fn loaded_stamp(e: &proto::Event, service: &str) -> Option<i64> {
    match &e.kind {
        Some(event::Kind::Log(l)) if l.service == service => {
            l.line.rsplit_once("loaded at_unix_ms=").and_then(|(_, t)| t.trim().parse().ok())
        }
        _ => None,
    }
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn stats(label: &str, lags: &[(i64, i64)]) -> String {
    let mut l: Vec<i64> = lags.iter().map(|x| x.0).collect();
    l.sort_unstable();
    let mut d: Vec<i64> = lags.iter().map(|x| x.1).collect();
    d.sort_unstable();
    format!(
        "| {label} | {} | {} ms | {} ms | {} ms | {} ms | {} ms | {:.1} s |",
        l.len(),
        percentile(&l, 0.5),
        percentile(&l, 0.9),
        percentile(&l, 0.99),
        l[l.len() - 1],
        l[0],
        percentile(&d, 0.5) as f64 / 1000.0,
    )
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let dir = std::env::temp_dir().join(format!("proctor-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg_path = dir.join("agent.toml");
        std::fs::write(&cfg_path, config(&dir)).unwrap();
        let agent = agent::start(agent::Config::load(&cfg_path).expect("config")).await.expect("agent");
        let mut client = AgentClient::connect(format!("http://{}", agent.addr)).await.expect("connect");
        let mut long = Vec::new();
        let mut short = Vec::new();
        for run in 0..LONG_RUNS + SHORT_RUNS {
            // Interleave short loads among the long ones.
            let (service, into) = if run % 5 == 4 {
                ("short".to_owned(), &mut short)
            } else {
                (format!("long{}", run % LONG_VARIANTS), &mut long)
            };
            let sample = one_load(&mut client, &service, run).await;
            eprintln!("{service:>5} load {run:>2}: lag {:>4} ms (load {} ms)", sample.0, sample.1);
            into.push(sample);
        }
        agent.shutdown().await.expect("shutdown");
        let _ = std::fs::remove_dir_all(&dir);
        let all: Vec<(i64, i64)> = long.iter().chain(short.iter()).copied().collect();
        let table = [
            "| loads | n | median | p90 | p99 | max | min | median load time |".to_owned(),
            "|---|---|---|---|---|---|---|---|".to_owned(),
            stats("long (last stage 1–1.25 s: polling at its 250 ms ceiling)", &long),
            stats("short (50 ms stages)", &short),
            stats("all", &all),
        ]
        .join("\n");
        println!("{table}");
        common::write_section(
            "readiness-lag",
            &format!(
                "## Readiness lag\n\nTime from the sim marking a model loaded (its own timestamp) to a gRPC watcher — \
                 the controller's view — receiving `READY`, with the agent's defaults (adaptive polling, 250 ms \
                 ceiling). Measured on {}, release build, `cargo bench -p proctor --bench readiness_lag`.\n\n\
                 {table}\n\nWhat a user would otherwise have: a Kubernetes startup/readiness probe at its default \
                 10 s period notices readiness 5 s late on average (up to 10 s); a `wait_for_model()` loop polling \
                 every 30 s, 15 s on average (up to 30 s). Targets: median ≤ 150 ms, p99 ≤ 300 ms.",
                common::machine()
            ),
        );
    });
}
