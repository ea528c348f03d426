//! Readiness lag: time from the sim marking a model loaded (its own
//! timestamp) to a gRPC watcher — the controller's view — receiving `READY`,
//! over many loads longer than 10 s, with the agent's defaults. Writes its
//! section of docs/benchmarks.md.
//!
//! Run: `cargo bench -p proctor --bench readiness_lag` (release build).
//! 24 services load at once, in rounds, each a cold (fresh) load of one
//! model: half read over `health-json`, half over `kserve-v2`, and half of
//! each must pass a warm-up request (`POST /translate`) before READY. The
//! sims' last stage differs per service by 37 ms steps, so the moment a
//! model becomes ready falls at every phase of the poll cycle. Every health
//! answer is logged by the sim (`--costly-health 0ms`), so the probes each
//! load received are counted from the service's own output.

use std::collections::BTreeMap;
use std::path::Path;

use proto::agent_client::AgentClient;
use proto::{Stage, event, watch_message};
use tonic::transport::Channel;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_proctor");
const SERVICES: usize = 24;
const ROUNDS: usize = 9;

/// Service `i`: its protocol and whether it warms up.
fn kind(i: usize) -> (&'static str, bool) {
    (if i.is_multiple_of(2) { "health-json" } else { "kserve-v2" }, i % 4 >= 2)
}

fn config(dir: &Path) -> String {
    let mut text = format!("listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n", dir.display());
    for i in 0..SERVICES {
        let (protocol, warm) = kind(i);
        let name = format!("s{i:02}");
        let spec = format!("{name}:mb=8,download=3s,load=5s,warmup={}ms,progress=off", 2500 + 37 * i);
        text.push_str(&format!(
            "[[service]]\nname = \"{name}\"\ncommand = [\"{BIN}\", \"sim\", \"--port\", \"{{port}}\", \"--costly-health\", \
             \"0ms\", \"--model\", \"{spec}\"]\nstop_grace = \"2s\"\nreadiness = {{ protocol = \"{protocol}\" }}\n\n\
             [[service.model]]\nname = \"{name}\"\n"
        ));
        if warm {
            text.push_str(&format!(
                "[service.model.warmup]\npath = \"/translate\"\nbody = '{{\"text\": \"Hello\", \"source_lang\": \"en\", \
                 \"target_lang\": \"es\", \"model\": \"{name}\"}}'\n"
            ));
        }
        text.push('\n');
    }
    text
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// What one load showed: lag (ms), load time (ms), probe rounds, the most
/// rounds within any one second.
#[derive(Clone, Copy, Debug)]
struct Load {
    lag: i64,
    took: i64,
    probes: usize,
    peak: usize,
}

/// Per service while a round runs.
#[derive(Default)]
struct Seen {
    started: Option<i64>,
    loaded: Option<i64>,
    ready: Option<i64>,
    /// Agent-side times of the probe lines the service logged.
    probes: Vec<i64>,
}

async fn lease(client: &mut AgentClient<Channel>, service: &str, round: usize) -> proto::LeaseRef {
    let lease = client
        .acquire_lease(proto::AcquireLeaseRequest {
            service: service.into(),
            run_id: format!("bench-{service}-{round}"),
            holder: "bench".into(),
            ttl_ms: 120_000,
        })
        .await
        .expect("lease")
        .into_inner();
    proto::LeaseRef { service: lease.service, run_id: lease.run_id, lease_id: lease.id, epoch: lease.epoch }
}

/// One round: every service loads cold at once; returns each one's load.
async fn round(client: &mut AgentClient<Channel>, round: usize) -> Vec<Load> {
    let names: Vec<String> = (0..SERVICES).map(|i| format!("s{i:02}")).collect();
    let mut stream = client.watch(proto::WatchRequest { from_seq: u64::MAX }).await.expect("watch").into_inner();
    let mut leases = Vec::new();
    for name in &names {
        let lease = lease(client, name, round).await;
        let request = proto::EnsureModelsRequest {
            lease: Some(lease.clone()),
            models: vec![name.clone()],
            fresh: true,
            ..Default::default()
        };
        client.ensure_models(request).await.expect("ensure");
        leases.push(lease);
    }
    let mut seen: BTreeMap<String, Seen> = names.iter().map(|n| (n.clone(), Seen::default())).collect();
    while seen.values().any(|s| s.ready.is_none() || s.loaded.is_none()) {
        let message = stream.message().await.expect("stream").expect("event");
        let received = now_ms();
        let Some(watch_message::Kind::Event(e)) = message.kind else { continue };
        follow(&mut seen, &e, received);
    }
    for lease in leases {
        let _ = client.release_lease(lease).await;
    }
    seen.values().map(load_of).collect()
}

/// Folds one event into what each service showed.
fn follow(seen: &mut BTreeMap<String, Seen>, e: &proto::Event, received: i64) {
    match &e.kind {
        Some(event::Kind::Log(l)) => {
            let Some(s) = seen.get_mut(&l.service) else { return };
            if let Some((_, t)) = l.line.rsplit_once("loaded at_unix_ms=") {
                s.loaded = t.trim().parse().ok();
            } else if is_round(&l.line) && s.started.is_some() && s.ready.is_none() {
                s.probes.push(e.time_unix_ms);
            }
        }
        Some(event::Kind::StageChanged(c)) => {
            let Some(s) = seen.get_mut(&c.service) else { return };
            match c.to() {
                Stage::ProcessStarting => s.started = Some(e.time_unix_ms),
                Stage::Ready if s.started.is_some() => s.ready = Some(received),
                Stage::Failed => panic!("{} failed: {}", c.service, c.message),
                _ => {}
            }
        }
        _ => {}
    }
}

/// One access-log line per probe round: `/health` (health-json), the
/// model's `/ready` (kserve-v2, whose round also asks `/v2/health/live`).
fn is_round(line: &str) -> bool {
    line.contains("\"GET /health ") || line.contains("/ready HTTP")
}

fn load_of(s: &Seen) -> Load {
    let (ready, loaded, started) = (s.ready.unwrap_or(0), s.loaded.unwrap_or(0), s.started.unwrap_or(0));
    let peak = s.probes.iter().map(|t| s.probes.iter().filter(|u| (*t..*t + 1000).contains(*u)).count()).max();
    Load { lag: ready - loaded, took: ready - started, probes: s.probes.len(), peak: peak.unwrap_or(0) }
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn stats(label: &str, loads: &[Load]) -> String {
    let mut lag: Vec<i64> = loads.iter().map(|l| l.lag).collect();
    lag.sort_unstable();
    let mut took: Vec<i64> = loads.iter().map(|l| l.took).collect();
    took.sort_unstable();
    let rate: f64 = loads.iter().map(|l| l.probes as f64 / (l.took as f64 / 1000.0)).sum::<f64>() / loads.len() as f64;
    let peak = loads.iter().map(|l| l.peak).max().unwrap_or(0);
    format!(
        "| {label} | {} | {} ms | {} ms | {} ms | {} ms | {:.1} s | {rate:.1} | {peak} |",
        lag.len(),
        percentile(&lag, 0.5),
        percentile(&lag, 0.9),
        percentile(&lag, 0.99),
        lag[lag.len() - 1],
        percentile(&took, 0.5) as f64 / 1000.0,
    )
}

fn table(by_service: &[(usize, Load)]) -> String {
    let pick =
        |f: &dyn Fn(usize) -> bool| by_service.iter().filter(|(i, _)| f(*i)).map(|(_, l)| *l).collect::<Vec<_>>();
    [
        "| loads | n | median | p90 | p99 | max | median load time | probe rounds / s (mean) | most rounds in any 1 s |"
            .to_owned(),
        "|---|---|---|---|---|---|---|---|---|".to_owned(),
        stats("health-json", &pick(&|i| kind(i).0 == "health-json")),
        stats("kserve-v2", &pick(&|i| kind(i).0 == "kserve-v2")),
        stats("with a warm-up request", &pick(&|i| kind(i).1)),
        stats("all", &pick(&|_| true)),
    ]
    .join("\n")
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
        let mut loads = Vec::new();
        for r in 0..ROUNDS {
            let got = round(&mut client, r).await;
            let lags: Vec<i64> = got.iter().map(|l| l.lag).collect();
            eprintln!("round {r}: lags {lags:?} ms");
            loads.extend(got.into_iter().enumerate());
        }
        agent.shutdown().await.expect("shutdown");
        let _ = std::fs::remove_dir_all(&dir);
        let table = table(&loads);
        println!("{table}");
        common::write_section(
            "readiness-lag",
            &format!(
                "## Readiness lag\n\nTime from the sim marking a model loaded (its own timestamp) to a gRPC watcher — \
                 the controller's view — receiving `READY`, with the agent's defaults: while a model loads the agent \
                 probes at once whenever the service writes output (most services log the moment a model is ready), \
                 else backs off to the 500 ms `poll_ceiling`, and never probes more than 4 times in any second. \
                 {SERVICES} services load at once, {ROUNDS} rounds of cold loads of 10.5–11.4 s each; half read over \
                 `health-json`, half over `kserve-v2`, half of each READY only after a warm-up request. Probes are \
                 counted from the service's own access log. Measured on {}, release build, `cargo bench -p proctor \
                 --bench readiness_lag`.\n\n{table}\n\nWhat a user would otherwise have: a Kubernetes \
                 startup/readiness probe at its default 10 s period notices readiness 5 s late on average (up to \
                 10 s); a `wait_for_model()` loop polling every 30 s, 15 s on average (up to 30 s). Targets: median \
                 ≤ 50 ms and p99 ≤ 150 ms on loads longer than 10 s, at most 4 probes a second.",
                common::machine()
            ),
        );
    });
}
