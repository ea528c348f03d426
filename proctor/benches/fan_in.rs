//! Fan-in, as a user runs it: one controller following N agents that are
//! busy — each supervises a service that writes a log line every second
//! (`vmstat 1`) and is READY (its readiness read from one shared `proctor
//! sim`), streams 1 Hz telemetry (admission's figures included) and those
//! log lines — while the controller does what a waiting run does every
//! second: builds the planner's view of every host and plans a suite over
//! them. The agents run in a separate process (this benchmark
//! re-run with `PROCTOR_FAN_IN_ROLE=agents`), so only the controller is
//! measured: its CPU share of one core and its RSS, over a 30 s window after
//! a warm-up. Writes its section of docs/benchmarks.md.
//!
//! Run: `cargo bench -p proctor --bench fan_in` (release build).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

const ROLE: &str = "PROCTOR_FAN_IN_ROLE";
const WARMUP: Duration = Duration::from_secs(5);
const WINDOW: Duration = Duration::from_secs(30);

fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r.to_owned()).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// The agents' process: one shared `proctor sim`, then N agents, each with a
/// service (`vmstat 1`: one log line a second) whose readiness is the sim's.
fn agents(n: usize) {
    let dir = std::env::temp_dir().join(format!("proctor-fan-in-{}", std::process::id()));
    let mut sim = Command::new(env!("CARGO_BIN_EXE_proctor"))
        .args(["sim", "--port", "0", "--model", "nllb:mb=1,download=0ms,load=0ms,warmup=0ms"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("proctor sim");
    let mut first = String::new();
    BufReader::new(sim.stdout.take().expect("sim stdout")).read_line(&mut first).expect("sim port");
    let sim_port: u16 = first.trim().rsplit(':').next().and_then(|p| p.parse().ok()).expect("sim prints its address");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let mut running = Vec::new();
        for i in 0..n {
            let text = format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"{}/a{i}\"\ntelemetry_interval = \"1s\"\n\n\
                 [[service]]\nname = \"translation\"\ncommand = [\"vmstat\", \"1\"]\n\
                 base_url = \"http://127.0.0.1:{sim_port}\"\n[service.readiness]\nprotocol = \"health-json\"\n\
                 [[service.model]]\nname = \"nllb\"\nram_mb = 1\n",
                dir.display()
            );
            let config = agent::Config::parse(&text, &dir.join("agent.toml")).expect("config");
            let a = agent::start(config).await.expect("agent");
            println!("ADDR {}", a.addr);
            running.push(a);
        }
        println!("READY");
        let _ = std::io::stdout().flush();
        // Until the benchmark closes our stdin.
        let _ = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        })
        .await;
        for a in running {
            let _ = a.shutdown().await;
        }
    });
    let _ = sim.kill();
    let _ = sim.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// One measurement.
struct Measured {
    cpu_percent: f64,
    rss_mib: f64,
    events_per_s: f64,
    plan_round_ms: f64,
}

/// Leases every agent's service and asks for its model: each starts its
/// `vmstat` and turns READY.
async fn make_busy(agents: &[controller::client::Agent]) {
    for chunk in agents.chunks(50) {
        let mut set = tokio::task::JoinSet::new();
        for a in chunk {
            let a = a.clone();
            set.spawn(async move {
                let models = ["nllb".to_owned()];
                let ask = controller::client::EnsureAsk {
                    models: &models,
                    timeout: None,
                    timeout_source: "",
                    headroom: 0,
                    gpu_headroom: 0,
                    fresh: false,
                };
                let lease = a.acquire("translation", "fan-in", "bench", Duration::from_secs(600)).await.expect("lease");
                a.ensure(&lease, &ask, "").await.expect("ensure");
            });
        }
        while set.join_next().await.is_some() {}
    }
}

/// What a waiting run does each second: the planner's view of every host
/// (admission's figures come with each agent's telemetry, so no host is
/// asked — as `Ctx::host_views` does), then one plan. Returns how long it took.
fn plan_round(
    agents: &[controller::client::Agent],
    views: &[tokio::sync::watch::Receiver<controller::client::AgentView>],
) -> Duration {
    let began = Instant::now();
    let hosts: Vec<controller::scheduler::Host> = agents
        .iter()
        .zip(views)
        .enumerate()
        .map(|(i, (a, v))| controller::scheduler::host_view(&format!("host-{i}"), &[], &a.info, &v.borrow()))
        .collect();
    let need = controller::scheduler::Need {
        service: "translation".into(),
        models: vec!["nllb".into()],
        headroom: 0,
        gpu_headroom: 0,
        labels: vec![],
        fresh: false,
        shard: controller::scheduler::Shard::One,
    };
    std::hint::black_box(controller::scheduler::plan::plan(&need, 10, &hosts, "another-run"));
    began.elapsed()
}

/// Follows `n` busy agents from this process, planning over them every second.
/// Connects to every agent and follows its journal as a run does.
async fn follow_all(
    addrs: &[String],
    updates: controller::run::events::Events,
    stop: &tokio_util::sync::CancellationToken,
) -> (Vec<controller::client::Agent>, Vec<tokio::sync::watch::Receiver<controller::client::AgentView>>) {
    let mut views = Vec::new();
    let mut agents = Vec::new();
    for addr in addrs {
        let agent = controller::client::Agent::connect(addr).await.expect("connect");
        let (tx, rx) = tokio::sync::watch::channel(controller::client::AgentView::default());
        let interest = controller::client::Interest { run_id: "a run".into(), services: vec!["translation".into()] };
        let follow = controller::client::follow(
            interest,
            agent.clone(),
            tx,
            updates.clone(),
            stop.clone(),
            Duration::from_secs(20),
        );
        tokio::spawn(follow);
        views.push(rx);
        agents.push(agent);
    }
    (agents, views)
}

fn controller(n: usize) -> Measured {
    let mut child = Command::new(std::env::current_exe().expect("self"))
        .env(ROLE, "agents")
        .env("PROCTOR_FAN_IN_N", n.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("agents process");
    let mut addrs = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line.expect("line");
        if let Some(a) = line.strip_prefix("ADDR ") {
            addrs.push(a.to_owned());
        }
        if line == "READY" {
            break;
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let result = runtime.block_on(async {
        let stop = tokio_util::sync::CancellationToken::new();
        let (updates, mut drain) = controller::run::events::Events::channel();
        // The reporters' end: every run event is taken off the channel.
        tokio::spawn(async move { while drain.recv().await.is_some() {} });
        let (agents, views) = follow_all(&addrs, updates, &stop).await;
        make_busy(&agents).await;
        let planning = tokio::spawn({
            let (agents, views, stop) = (agents.clone(), views.clone(), stop.clone());
            async move {
                let mut rounds = Vec::new();
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let planning = std::env::var("PROCTOR_FAN_IN_PLAN").as_deref() != Ok("0");
                while !stop.is_cancelled() && planning {
                    tick.tick().await;
                    rounds.push(plan_round(&agents, &views));
                }
                rounds
            }
        });
        tokio::time::sleep(WARMUP).await;
        let events = |views: &Vec<tokio::sync::watch::Receiver<controller::client::AgentView>>| {
            views.iter().map(|v| v.borrow().events_applied).sum::<u64>()
        };
        let (t0, c0, e0) = (Instant::now(), cpu_ticks(), events(&views));
        tokio::time::sleep(WINDOW).await;
        let (c1, e1, secs) = (cpu_ticks(), events(&views), t0.elapsed().as_secs_f64());
        let rss = rss_mib();
        stop.cancel();
        let rounds = planning.await.unwrap_or_default();
        let mut sorted: Vec<f64> = rounds.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        sorted.sort_by(f64::total_cmp);
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
        // USER_HZ = 100 ticks per second.
        Measured {
            cpu_percent: (c1 - c0) as f64 / 100.0 / secs * 100.0,
            rss_mib: rss,
            events_per_s: (e1 - e0) as f64 / secs,
            plan_round_ms: median,
        }
    });
    drop(child.stdin.take());
    let _ = child.wait();
    result
}

fn main() {
    if std::env::var(ROLE).as_deref() == Ok("agents") {
        let n = std::env::var("PROCTOR_FAN_IN_N").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
        agents(n);
        return;
    }
    // PROCTOR_FAN_IN_SIZES=1000 measures only that size (for profiling), without writing the docs.
    let chosen = std::env::var("PROCTOR_FAN_IN_SIZES").ok();
    let sizes: Vec<usize> = match &chosen {
        Some(list) => list.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
        None => vec![100, 1000],
    };
    let mut rows = Vec::new();
    for n in sizes {
        let m = controller(n);
        eprintln!(
            "N = {n}: controller CPU {:.1}% of one core, RSS {:.0} MiB, {:.0} events/s, plan round {:.1} ms",
            m.cpu_percent, m.rss_mib, m.events_per_s, m.plan_round_ms
        );
        rows.push(format!(
            "| {n} | {:.1} % | {:.0} MiB | {:.0} | {:.1} ms |",
            m.cpu_percent, m.rss_mib, m.events_per_s, m.plan_round_ms
        ));
    }
    let table = format!(
        "| agents | controller CPU (one core) | controller RSS | events received / s | plan round (median) |\n\
         |---|---|---|---|---|\n{}",
        rows.join("\n")
    );
    println!("{table}");
    if chosen.is_some() {
        return;
    }
    common::write_section(
        "fan-in",
        &format!(
            "## Controller fan-in\n\nOne controller following N busy agents, as a waiting run does: each agent \
             supervises a READY service that writes a log line every second (`vmstat 1`; readiness from one shared \
             `proctor sim`) and streams 1 Hz telemetry (with admission's figures) and those lines over its own gRPC \
             watch, and every second the controller builds the planner's view of every host and plans a suite \
             over them (as a waiting run does; no host is polled: the figures come with the telemetry). The agents run in a separate process, so only the \
             controller is measured (CPU from `/proc/self/stat` over a {}-second window after a {}-second \
             warm-up, RSS at its end). Measured on {}, release build, `cargo bench -p proctor --bench fan_in`. \
             Target at N = 1000: ≤ 10 % of one core and ≤ 200 MiB.\n\n{table}",
            WINDOW.as_secs(),
            WARMUP.as_secs(),
            common::machine()
        ),
    );
}
