//! The agent at rest: its CPU and peak RSS (VmHWM) with one READY service
//! and one watcher, sampling at 1 Hz, before and after the liveness cadence,
//! and — in the same 60 s window as "after" — Prometheus `node_exporter`
//! (Debian package `prometheus-node-exporter`) scraped once a second, what a
//! lab would otherwise run on every host. "Before" is the agent probing a
//! READY service four times a second forever (what it did until `live_poll`
//! existed, reproduced with `live_poll = "250ms"`). The service logs every
//! health request as uvicorn does, so each probe also costs a log line
//! through the agent. Each program runs as its own process; only they are
//! measured. Writes its section of docs/benchmarks.md.
//!
//! Run: `cargo bench -p proctor --bench agent_idle` (release build).

use std::process::Stdio;
use std::time::{Duration, Instant};

use proto::agent_client::AgentClient;
use proto::{Stage, event, watch_message};
use tokio::io::{AsyncBufReadExt, BufReader};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_proctor");
const WINDOW: Duration = Duration::from_secs(60);

/// What one process cost over the window.
#[derive(Clone, Copy, Debug, Default)]
struct Footprint {
    cpu_percent: f64,
    hwm_mib: f64,
    probes_per_s: f64,
}

/// Peak resident memory of a process (`VmHWM`), in MiB.
fn hwm_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_or(0, |a| a.port())
}

/// One plain HTTP GET; the body's length (0 when it failed).
async fn get(addr: &str, path: &str) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut conn) = tokio::net::TcpStream::connect(addr).await else { return 0 };
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if conn.write_all(request.as_bytes()).await.is_err() {
        return 0;
    }
    let mut body = Vec::new();
    let _ = conn.read_to_end(&mut body).await;
    body.len()
}

/// node_exporter scraped at 1 Hz over the window; `None` when not installed.
async fn node_exporter() -> Option<Footprint> {
    let program = ["prometheus-node-exporter", "node_exporter"]
        .into_iter()
        .find(|p| std::process::Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))?;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = tokio::process::Command::new(program)
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let pid = child.id()?;
    let mut ready = false;
    for _ in 0..100 {
        if get(&addr, "/metrics").await > 0 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // until it listens
    }
    if !ready {
        return None;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // settle, as the agent does
    let (ticks, started) = (cpu_ticks(pid), Instant::now());
    let mut scrape = tokio::time::interval(Duration::from_secs(1));
    while started.elapsed() < WINDOW {
        scrape.tick().await;
        get(&addr, "/metrics").await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid) - ticks) as f64 / ticks_per_second() / seconds;
    let hwm = hwm_mib(pid);
    let _ = child.kill().await;
    Some(Footprint { cpu_percent: cpu * 100.0, hwm_mib: hwm, probes_per_s: 0.0 })
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r.to_owned()).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// `/proc/<pid>/stat` counts CPU in USER_HZ, which Linux fixes at 100.
fn ticks_per_second() -> f64 {
    100.0
}

fn config(dir: &std::path::Path, live_poll: Option<&str>) -> String {
    let live = live_poll.map(|l| format!(", live_poll = \"{l}\"")).unwrap_or_default();
    format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n[[service]]\nname = \"translation\"\ncommand = [\"{BIN}\", \"sim\", \
         \"--port\", \"{{port}}\", \"--costly-health\", \"0ms\", \"--model\", \"nllb:mb=64,download=200ms,load=300ms,warmup=100ms\"]\n\
         readiness = {{ protocol = \"health-json\"{live} }}\n\n[[service.model]]\nname = \"nllb\"\n",
        dir.display()
    )
}

/// The agent's footprint (and the probes the service logged per second).
async fn measure(live_poll: Option<&str>, window: Duration) -> Footprint {
    let dir =
        std::env::temp_dir().join(format!("proctor-idle-{}-{}", std::process::id(), live_poll.unwrap_or("default")));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("agent.toml"), config(&dir, live_poll)).unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["agent", "--config"])
        .arg(dir.join("agent.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn agent");
    let pid = child.id().expect("pid");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = loop {
        let line = lines.next_line().await.expect("stdout").expect("agent exited");
        if let Some(rest) = line.strip_prefix("proctor agent listening on ") {
            break rest.split_whitespace().next().unwrap_or_default().to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let mut client = AgentClient::connect(format!("http://{addr}")).await.expect("connect");
    let lease = client
        .acquire_lease(proto::AcquireLeaseRequest {
            service: "translation".into(),
            run_id: "idle".into(),
            holder: "bench".into(),
            ttl_ms: 600_000,
        })
        .await
        .expect("lease")
        .into_inner();
    let lease =
        proto::LeaseRef { service: lease.service, run_id: lease.run_id, lease_id: lease.id, epoch: lease.epoch };
    let mut stream = client.watch(proto::WatchRequest { from_seq: u64::MAX }).await.expect("watch").into_inner();
    let request = proto::EnsureModelsRequest { lease: Some(lease), models: vec!["nllb".into()], ..Default::default() };
    client.ensure_models(request).await.expect("ensure");
    loop {
        let m = stream.message().await.expect("stream").expect("event");
        if let Some(watch_message::Kind::Event(e)) = m.kind
            && matches!(&e.kind, Some(event::Kind::StageChanged(c)) if c.to() == Stage::Ready)
        {
            break;
        }
    }
    // Settle: the liveness cadence starts at READY; skip the first moments.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ticks, started) = (cpu_ticks(pid), Instant::now());
    let from_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let mut probes = 0u64;
    // The one watcher, for the whole window (a measuring window, not a wait).
    let _ = tokio::time::timeout(window, async {
        while let Ok(Some(m)) = stream.message().await {
            if let Some(watch_message::Kind::Event(e)) = m.kind
                && e.time_unix_ms >= from_ms
                && matches!(&e.kind, Some(event::Kind::Log(l)) if l.line.contains("\"GET /health"))
            {
                probes += 1;
            }
        }
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid) - ticks) as f64 / ticks_per_second() / seconds;
    let hwm = hwm_mib(pid);
    // A graceful stop waits for open streams: close ours first.
    drop((stream, client));
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
    Footprint { cpu_percent: cpu * 100.0, hwm_mib: hwm, probes_per_s: probes as f64 / seconds }
}

fn row(label: &str, f: Option<Footprint>) -> String {
    match f {
        Some(f) => format!("| {label} | {:.2} % | {:.1} MiB | {:.1} |", f.cpu_percent, f.hwm_mib, f.probes_per_s),
        None => format!("| {label} | not installed (`apt install prometheus-node-exporter`) | | |"),
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let before = measure(Some("250ms"), Duration::from_secs(30)).await;
        let (after, node) = tokio::join!(measure(None, WINDOW), node_exporter());
        let table = [
            "| program | CPU (one core) | peak RSS (VmHWM) | health probes / s |".to_owned(),
            "|---|---|---|---|".to_owned(),
            row("agent before: READY service probed 4× a second (`live_poll = \"250ms\"`), 30 s", Some(before)),
            row("agent after: defaults (`live_poll = \"5s\"`)", Some(after)),
            row("node_exporter 1.x, scraped once a second (same window)", node),
        ]
        .join("\n");
        println!("{table}");
        common::write_section(
            "agent-idle",
            &format!(
                "## The agent at rest, next to node_exporter\n\nA `proctor agent` process with one READY service \
                 (the sim, logging every health request as uvicorn does) and one gRPC watcher, sampling at 1 Hz \
                 (host memory, the service's tree walked down from its root through \
                 `/proc/<pid>/task/<tid>/children`, no scan of every process), over a {}-second window; in the \
                 same window, Prometheus `node_exporter` with its default collectors, scraped once a second — \
                 what a lab runs on every host already. Before: the READY service probed four times a second \
                 forever, as the agent did until the liveness cadence (reproduced with `live_poll = \"250ms\"`). \
                 Target: ≤ 20 MiB and ≤ 0.3 % of a core, below node_exporter on both. Measured on {}, release \
                 build, `cargo bench -p proctor --bench agent_idle`.\n\n{table}",
                WINDOW.as_secs(),
                common::machine()
            ),
        );
    });
}
