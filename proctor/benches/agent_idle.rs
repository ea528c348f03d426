//! The agent at rest: its CPU with one READY service and one watcher, over a
//! 30 s window, before and after the liveness cadence. "Before" is the agent
//! probing a READY service four times a second forever (what it did until
//! `live_poll` existed, reproduced with `live_poll = "250ms"`); "after" is
//! the default (`live_poll = "5s"`). The service logs every health request
//! as uvicorn does, so each probe also costs a log line through the agent.
//! The agent runs as its own `proctor agent` process; only it is measured.
//! Writes its section of docs/benchmarks.md.
//!
//! Run: `cargo bench -p proctor --bench agent_idle` (release build).

use std::process::Stdio;
use std::time::{Duration, Instant};

use proto::agent_client::AgentClient;
use proto::{Stage, event, watch_message};
use tokio::io::{AsyncBufReadExt, BufReader};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_proctor");
const WINDOW: Duration = Duration::from_secs(30);

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

/// (agent CPU share of one core, probes the service logged per second).
async fn measure(live_poll: Option<&str>) -> (f64, f64) {
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
    let _ = tokio::time::timeout(WINDOW, async {
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
    // A graceful stop waits for open streams: close ours first.
    drop((stream, client));
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
    (cpu * 100.0, probes as f64 / seconds)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let (before_cpu, before_probes) = measure(Some("250ms")).await;
        let (after_cpu, after_probes) = measure(None).await;
        let table = format!(
            "| agent | CPU (one core) | probes / s |\n|---|---|---|\n\
             | before: READY service probed 4× a second (`live_poll = \"250ms\"`) | {before_cpu:.2} % | {before_probes:.1} |\n\
             | after: defaults (`live_poll = \"5s\"`) | {after_cpu:.2} % | {after_probes:.1} |"
        );
        println!("{table}");
        common::write_section(
            "agent-idle",
            &format!(
                "## The agent at rest\n\nCPU of a `proctor agent` process with one READY service (the sim, logging \
                 every health request as uvicorn does) and one gRPC watcher, over a {}-second window. Before: the \
                 READY service probed four times a second forever, as the agent did until the liveness cadence \
                 (reproduced with `live_poll = \"250ms\"`); after: the defaults. Measured on {}, release build, \
                 `cargo bench -p proctor --bench agent_idle`.\n\n{table}",
                WINDOW.as_secs(),
                common::machine()
            ),
        );
    });
}
