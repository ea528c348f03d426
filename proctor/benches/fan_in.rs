//! Fan-in: one controller following N agents that each stream 1 Hz
//! telemetry. The agents run in a separate process (this benchmark re-run
//! with `PROCTOR_FAN_IN_ROLE=agents`), so only the controller is measured:
//! its CPU share of one core and its RSS, over a 30 s window after a warm-up.
//! Writes its section of docs/benchmarks.md.
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

/// The agents' process: N agents without services, 1 Hz telemetry each.
fn agents(n: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let dir = std::env::temp_dir().join(format!("proctor-fan-in-{}", std::process::id()));
        let mut running = Vec::new();
        for i in 0..n {
            let text = format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"{}/a{i}\"\ntelemetry_interval = \"1s\"\n",
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
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// Follows `n` agents from this process; returns (CPU % of one core, RSS MiB, events/s).
fn controller(n: usize) -> (f64, f64, f64) {
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
        let (updates, _drain) = controller::run::events::Events::channel();
        let mut views = Vec::new();
        for addr in &addrs {
            let agent = controller::client::Agent::connect(addr).await.expect("connect");
            let (tx, rx) = tokio::sync::watch::channel(controller::client::AgentView::default());
            tokio::spawn(controller::client::follow(agent, tx, updates.clone(), stop.clone(), Duration::from_secs(20)));
            views.push(rx);
        }
        drop(updates);
        tokio::time::sleep(WARMUP).await;
        let events = |views: &Vec<tokio::sync::watch::Receiver<controller::client::AgentView>>| {
            views.iter().map(|v| v.borrow().events_applied).sum::<u64>()
        };
        let (t0, c0, e0) = (Instant::now(), cpu_ticks(), events(&views));
        tokio::time::sleep(WINDOW).await;
        let (c1, e1, secs) = (cpu_ticks(), events(&views), t0.elapsed().as_secs_f64());
        let rss = rss_mib();
        stop.cancel();
        // USER_HZ = 100 ticks per second.
        let cpu = (c1 - c0) as f64 / 100.0 / secs * 100.0;
        (cpu, rss, (e1 - e0) as f64 / secs)
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
    let mut rows = Vec::new();
    for n in [100, 1000] {
        let (cpu, rss, rate) = controller(n);
        eprintln!("N = {n}: controller CPU {cpu:.1}% of one core, RSS {rss:.0} MiB, {rate:.0} events/s");
        rows.push(format!("| {n} | {cpu:.1} % | {rss:.0} MiB | {rate:.0} |"));
    }
    let table = format!(
        "| agents | controller CPU (one core) | controller RSS | events received / s |\n|---|---|---|---|\n{}",
        rows.join("\n")
    );
    println!("{table}");
    common::write_section(
        "fan-in",
        &format!(
            "## Controller fan-in\n\nOne controller following N agents, each streaming 1 Hz telemetry over its own gRPC \
             watch; the agents run in a separate process, so only the controller is measured (CPU from \
             `/proc/self/stat` over a {}-second window after a {}-second warm-up, RSS at its end). Measured on {}, \
             release build, `cargo bench -p proctor --bench fan_in`. Target at N = 1000: ≤ 25 % of one core and \
             ≤ 200 MiB.\n\n{table}",
            WINDOW.as_secs(),
            WARMUP.as_secs(),
            common::machine()
        ),
    );
}
