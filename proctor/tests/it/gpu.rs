//! GPU telemetry without a GPU: a stand-in `libnvidia-ml.so` (built here
//! with the system C compiler) answers NVML calls from a file the test
//! writes; the agent loads it through the same `nvml-wrapper` code as the
//! real driver.

use std::time::Duration;

use proto::{Stage, event};
use testkit::{Agent, Scratch, Service, StandInNvml};

use super::{BIN, lease, reached, watch_until};

const MIB: u64 = 1024 * 1024;

fn with_nvml(service: Service, nvml: &StandInNvml) -> Service {
    service.agent_keys(&format!("nvml_library = {:?}", nvml.library.display().to_string()))
}

async fn ensure(agent: &Agent, models: &[&str]) -> proto::agent_client::AgentClient<tonic::transport::Channel> {
    let mut client = agent.client().await;
    let held = lease(&mut client, "gpu").await;
    let request = proto::EnsureModelsRequest {
        lease: Some(held),
        models: models.iter().map(|m| m.to_string()).collect(),
        ..Default::default()
    };
    client.ensure_models(request).await.expect("ensure");
    client
}

fn started_pid(events: &[proto::Event]) -> u32 {
    events
        .iter()
        .find_map(|e| match &e.kind {
            Some(event::Kind::ServiceStarted(s)) => Some(s.pid),
            _ => None,
        })
        .expect("service started")
}

/// The service's memory-controller cgroup folder (cgroup v1 or v2).
fn cgroup_dir(pid: u32) -> std::path::PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v1 = text.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| format!("/sys/fs/cgroup/memory{p}")));
    let v2 = || text.lines().find_map(|l| l.strip_prefix("0::").map(|p| format!("/sys/fs/cgroup{p}")));
    std::path::PathBuf::from(v1.or_else(v2).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn gpu_and_host_memory_count_for_the_service_whose_tree_or_cgroup_holds_the_process() {
    let scratch = Scratch::new("nvml");
    let nvml = StandInNvml::build(&scratch.path);
    nvml.show(&[("Stand-In-H200", 0, 143_771)], &[]);
    let agent = Agent::spawn(BIN, &with_nvml(Service::sim(&["nllb:mb=8,download=50ms,load=50ms"]), &nvml)).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    let info = client.get_info(proto::GetInfoRequest {}).await.unwrap().into_inner();
    assert!(info.capabilities.unwrap().nvml, "NVML found: the agent says it samples GPUs");
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::Ready)).await;
    let service = started_pid(&events);
    // A worker that is not in the service's tree but was put in its cgroup
    // (as a double-forked daemon would be) — it allocates 64 MiB once there —
    // and a stranger.
    let hold = "import sys, time\nsys.stdin.readline()\nb = bytearray(b'x' * (64 << 20))\nprint('holding', flush=True)\ntime.sleep(60)";
    let mut outsider = tokio::process::Command::new("python3")
        .args(["-c", hold])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let outsider_pid = outsider.id().unwrap();
    std::fs::write(cgroup_dir(service).join("cgroup.procs"), outsider_pid.to_string()).unwrap();
    // What the cgroup held before the worker allocated.
    let (_, seen) = watch_until(
        &mut client,
        u64::MAX,
        Duration::from_secs(10),
        |e| matches!(&e.kind, Some(event::Kind::Telemetry(t)) if t.services.iter().any(|s| s.cgroup_bytes > 0)),
    )
    .await;
    let Some(event::Kind::Telemetry(before)) = &seen.last().unwrap().kind else { unreachable!() };
    let baseline = before.services[0].cgroup_bytes;
    {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        outsider.stdin.as_mut().unwrap().write_all(b"go\n").await.unwrap();
        let mut lines = tokio::io::BufReader::new(outsider.stdout.take().unwrap()).lines();
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("holding"));
    }
    let mut stranger = tokio::process::Command::new("sleep").arg("60").kill_on_drop(true).spawn().unwrap();
    let stranger_pid = stranger.id().unwrap();
    nvml.show(
        &[("Stand-In-H200", 9000, 143_771), ("Stand-In-H200", 1000, 143_771)],
        &[(0, service, 2048), (1, outsider_pid, 1024), (0, stranger_pid, 5000)],
    );
    let (_, seen) = watch_until(&mut client, u64::MAX, Duration::from_secs(10), |e| {
        matches!(&e.kind, Some(event::Kind::Telemetry(t))
                if t.services.iter().any(|s| s.gpu_bytes > 0 && s.cgroup_bytes >= baseline + 60 * MIB))
    })
    .await;
    let Some(event::Kind::Telemetry(t)) = &seen.last().unwrap().kind else { unreachable!() };
    assert_eq!(t.services[0].gpu_bytes, 3072 * MIB, "its own process and the cgroup's worker, not the stranger's");
    // Its memory counts too, in the cgroup's figure (the tree's RSS cannot see it).
    assert!(t.services[0].cgroup_bytes >= baseline + 60 * MIB, "{baseline} then {:?}", t.services[0]);
    assert!(t.services[0].rss_bytes < 60 * MIB, "the worker is not in the tree: {:?}", t.services[0]);
    assert_eq!(t.gpus.len(), 2, "{:?}", t.gpus);
    assert_eq!((t.gpus[0].memory_used_bytes, t.gpus[0].memory_total_bytes), (9000 * MIB, 143_771 * MIB));
    let owners: Vec<(u32, &str)> =
        t.gpus.iter().flat_map(|g| &g.processes).map(|p| (p.pid, p.service.as_str())).collect();
    assert!(
        owners.contains(&(service, "translation")) && owners.contains(&(outsider_pid, "translation")),
        "{owners:?}"
    );
    assert!(owners.contains(&(stranger_pid, "")), "a process of no service is nobody's: {owners:?}");
    // The snapshot tells a late watcher the same.
    let (snapshot, _) = watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await;
    assert_eq!(snapshot.gpus.len(), 2);
    assert_eq!(snapshot.services[0].gpu_bytes, 3072 * MIB);
    // And `proctor agents` shows it.
    let shown = tokio::process::Command::new(BIN).args(["agents", "--agent", &agent.addr]).output().await.unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("GPU 0 Stand-In-H200: 9000/143771 MiB used, 37%; 1 Stand-In-H200: 1000/143771 MiB used"),
        "{text}"
    );
    assert!(text.contains("gpu 3072 MiB"), "{text}");
    let _ = (outsider.kill().await, stranger.kill().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_nvml_gpu_sampling_is_off_said_once_and_nothing_else_changes() {
    let service = Service::sim(&["nllb:mb=8,download=50ms,load=50ms"])
        .agent_keys("nvml_library = \"/nonexistent/libnvidia-ml.so.1\"");
    let agent = Agent::spawn(BIN, &service).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::Ready)).await;
    let info = client.get_info(proto::GetInfoRequest {}).await.unwrap().into_inner();
    assert!(!info.capabilities.unwrap().nvml);
    let (snapshot, _) = watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await;
    assert!(snapshot.gpus.is_empty());
    let shown = tokio::process::Command::new(BIN).args(["agents", "--agent", &agent.addr]).output().await.unwrap();
    assert!(String::from_utf8_lossy(&shown.stdout).contains("GPU n/a"), "{shown:?}");
    let log = agent.logs();
    assert_eq!(log.matches("GPU sampling off").count(), 1, "one line: {log}");
    assert!(log.contains("/nonexistent/libnvidia-ml.so.1"), "it names where it looked: {log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_whose_only_progress_is_gpu_memory_is_not_called_stalled() {
    let scratch = Scratch::new("nvml-load");
    let nvml = StandInNvml::build(&scratch.path);
    nvml.show(&[("Stand-In-H200", 0, 143_771)], &[]);
    // Hung as far as RSS, CPU, I/O and its own progress go: only GPU memory grows.
    let service = with_nvml(
        Service::sim(&["nllb:mb=8,download=50ms,hang=loading,progress=off"])
            .model_lines(r#"stall = { default = "3s" }"#),
        &nvml,
    );
    let agent = Agent::spawn(BIN, &service).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    let (_, events) =
        watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::LoadingWeights)).await;
    let pid = started_pid(&events);
    let grow = async {
        for step in 1..=12u64 {
            nvml.show(&[("Stand-In-H200", step * 512, 143_771)], &[(0, pid, step * 512)]);
            tokio::time::sleep(Duration::from_millis(500)).await; // the "weights" arriving, not a wait for an event
        }
    };
    let failed_meanwhile = async {
        tokio::time::timeout(Duration::from_secs(6), async {
            watch_until(&mut client, 0, Duration::from_secs(7), |e| reached(e, "nllb", Stage::Failed)).await
        })
        .await
        .is_ok()
    };
    let ((), failed) = tokio::join!(grow, failed_meanwhile);
    assert!(!failed, "6 s of GPU memory growth with a 3 s stall limit is progress");
    // Once it stops growing, the stall limit applies again.
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(10), |e| reached(e, "nllb", Stage::Failed)).await;
    let Some(event::Kind::StageChanged(c)) = &events.last().unwrap().kind else { unreachable!() };
    assert!(c.message.contains("GPU memory moved"), "the last signal seen was the GPU's: {}", c.message);
}

/// One GET, the body.
async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("metrics listener");
    conn.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_sees_stages_loads_memory_and_gpus() {
    let scratch = Scratch::new("metrics");
    let nvml = StandInNvml::build(&scratch.path);
    nvml.show(&[("Stand-In-H200", 4096, 143_771)], &[]);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let service = with_nvml(Service::sim(&["nllb:mb=8,download=300ms,load=300ms,warmup=100ms"]), &nvml)
        .agent_keys(&format!("metrics_listen = \"{addr}\""));
    let agent = Agent::spawn(BIN, &service).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::Ready)).await;
    // The next telemetry sample carries the GPU; then scrape.
    watch_until(&mut client, u64::MAX, Duration::from_secs(5), |e| matches!(&e.kind, Some(event::Kind::Telemetry(_))))
        .await;
    let text = scrape(&addr).await;
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("valid exposition");
    let value = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        parsed.samples.iter().find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))).map(
            |s| match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            },
        )
    };
    assert_eq!(value("proctor_model_stage", &[("model", "nllb"), ("stage", "READY")]), Some(1.0), "{text}");
    assert_eq!(value("proctor_model_stage", &[("model", "nllb"), ("stage", "LOADING_WEIGHTS")]), Some(0.0));
    assert_eq!(value("proctor_service_up", &[("service", "translation")]), Some(1.0));
    assert!(value("proctor_service_rss_bytes", &[("service", "translation")]).unwrap() > 0.0);
    assert!(value("proctor_host_memory_available_bytes", &[]).unwrap() > 0.0);
    assert_eq!(value("proctor_gpu_memory_used_bytes", &[("gpu", "0")]), Some(4096.0 * MIB as f64));
    assert_eq!(value("proctor_service_leased", &[("service", "translation")]), Some(1.0));
    let load = parsed
        .samples
        .iter()
        .find_map(|s| match &s.value {
            prometheus_parse::Value::Histogram(h) if s.metric == "proctor_model_load_duration_seconds" => {
                Some(h.clone())
            }
            _ => None,
        })
        .expect("a load histogram");
    let count = load.iter().find(|b| b.less_than.is_infinite()).map(|b| b.count);
    assert_eq!(count, Some(1.0), "one load, to READY: {load:?}");
    assert!(!text.contains("lease_id") && !text.contains(&agent.addr), "nothing a caller could act on");
}

/// The service's environment, as the kernel holds it.
fn environment(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|b| *b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn gpu_admission_picks_the_device_with_room_tells_the_service_and_refuses_with_numbers() {
    let scratch = Scratch::new("nvml-admit");
    let nvml = StandInNvml::build(&scratch.path);
    nvml.show(&[("Stand-In-H100", 50_000, 81_920), ("Stand-In-H100", 1_000, 81_920)], &[]);
    // Auto: the load goes to GPU 1, the one with room, and the service sees only it.
    let loading =
        with_nvml(Service::sim(&["nllb:mb=8,download=50ms,hang=loading"]).model_lines("gpu_mb = 40000"), &nvml);
    let agent = Agent::spawn(BIN, &loading).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    let (_, events) =
        watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::LoadingWeights)).await;
    let started = events.iter().find_map(|e| match &e.kind {
        Some(event::Kind::ServiceStarted(s)) => Some(s.clone()),
        _ => None,
    });
    let started = started.expect("service started");
    assert_eq!(started.gpus, [1]);
    assert!(environment(started.pid).contains(&"CUDA_VISIBLE_DEVICES=1".to_owned()), "{:?}", environment(started.pid));
    // While it loads, GetInfo tells a controller the 40000 MiB promised on GPU 1.
    let info = client.get_info(proto::GetInfoRequest {}).await.unwrap().into_inner();
    let rooms: Vec<(u32, u64, u64)> =
        info.gpus.iter().map(|g| (g.index, g.used_bytes / MIB, g.reserved_bytes / MIB)).collect();
    assert_eq!(rooms, [(0, 50_000, 0), (1, 1_000, 40_000)]);
    assert!(info.services[0].gpu_auto && info.services[0].gpus_given == [1], "{:?}", info.services[0]);
    // Each telemetry event carries the same figures, so a planner need not poll GetInfo.
    let (_, seen) = watch_until(
        &mut client,
        u64::MAX,
        Duration::from_secs(5),
        |e| matches!(&e.kind, Some(event::Kind::Telemetry(t)) if t.standing.is_some()),
    )
    .await;
    let Some(event::Kind::Telemetry(t)) = &seen.last().unwrap().kind else { unreachable!() };
    let streamed: Vec<(u32, u64)> =
        t.standing.as_ref().unwrap().gpus.iter().map(|g| (g.index, g.reserved_bytes / MIB)).collect();
    assert_eq!(streamed, [(0, 0), (1, 40_000)]);

    // Pinned to GPU 0, which has 31920 MiB free: refused, every number given, nothing started.
    let pinned = with_nvml(
        Service::sim(&["nllb:mb=8,download=50ms,load=50ms"]).model_lines("gpu_mb = 35000").service_lines("gpus = [0]"),
        &nvml,
    );
    let other = Agent::spawn(BIN, &pinned).await;
    let mut client = other.client().await;
    let held = lease(&mut client, "gpu").await;
    let request = proto::EnsureModelsRequest { lease: Some(held), models: vec!["nllb".into()], ..Default::default() };
    let refused = client.ensure_models(request).await.expect_err("35000 MiB does not fit on GPU 0");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        refused.message(),
        "cannot load nllb on service translation: not enough GPU memory: needs 35000 MiB (35000 MiB declared + 0 MiB \
         headroom), 35000 MiB on each of GPUs 0; GPU 0: 31920 MiB free of 81920 MiB (50000 MiB used, 0 MiB reserved)"
    );
    let (snapshot, _) = watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await;
    assert!(!snapshot.services[0].running, "a refused load starts nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_suite_needing_70_gb_of_gpu_goes_to_the_host_that_has_it_free() {
    use controller::report::Outcome;
    use controller::{Exit, RunOptions};
    let scratch = Scratch::new("gpu-placement");
    let (busy_nvml, roomy_nvml) =
        (StandInNvml::build(&scratch.path.join("busy")), StandInNvml::build(&scratch.path.join("roomy")));
    busy_nvml.show(&[("Stand-In-H100", 50_000, 81_920), ("Stand-In-H100", 40_000, 81_920)], &[]);
    roomy_nvml.show(&[("Stand-In-H100", 2_000, 81_920)], &[]);
    let spec = ["nllb:mb=8,download=50ms,load=100ms,warmup=50ms"];
    let agent = |nvml: Option<&StandInNvml>| {
        let service = Service::sim(&spec).model_lines("gpu_mb = 70000");
        let service = match nvml {
            Some(nvml) => with_nvml(service, nvml),
            None => service.agent_keys("nvml_library = \"/nonexistent/libnvidia-ml.so.1\""),
        };
        async move { Agent::spawn(BIN, &service).await }
    };
    let (busy, roomy, cpu) = (agent(Some(&busy_nvml)).await, agent(Some(&roomy_nvml)).await, agent(None).await);
    let mut inventory = String::new();
    for (name, a) in [("busy", &busy), ("cpu-only", &cpu), ("roomy", &roomy)] {
        inventory.push_str(&format!("[[agent]]\nname = \"{name}\"\naddress = \"{}\"\n\n", a.addr));
    }
    let suite = crate::run::TRANSLATE_SUITE.replace("models: [nllb]", "models: [nllb]\ngpu_headroom_mb: 2048");
    let opts = RunOptions {
        inventory: Some(scratch.write("inventory.toml", &inventory)),
        ..RunOptions::new(vec![], vec![scratch.write("t.yaml", &suite)], scratch.path.join("out"))
    };
    let result = controller::run(opts, tokio_util::sync::CancellationToken::new()).await;
    let report = result.report.unwrap();
    assert_eq!(result.exit, Exit::Passed, "{}", report.summary());
    assert!(report.cases.iter().all(|c| c.host == "roomy" && c.outcome == Outcome::Passed), "{}", report.summary());
    // The service there was given the GPU it was placed for.
    let info = roomy.client().await.get_info(proto::GetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.services[0].gpus_given, [0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_live_progress_shows_gpu_memory_next_to_rss_and_the_summary_the_peak() {
    let scratch = Scratch::new("gpu-progress");
    let nvml = StandInNvml::build(&scratch.path);
    nvml.show(&[("Stand-In-H100", 1_000, 81_920)], &[]);
    let service = with_nvml(
        Service::sim(&["nllb:mb=8,download=100ms,load=2500ms,warmup=50ms"]).model_lines("gpu_mb = 4000"),
        &nvml,
    );
    let agent = Agent::spawn(BIN, &service).await;
    let suite = scratch.write("t.yaml", crate::run::TRANSLATE_SUITE);
    let run = tokio::process::Command::new(BIN)
        .args(["run", "--agent", &agent.addr, "--progress-interval", "300ms", "--out"])
        .arg(scratch.path.join("out"))
        .arg(&suite)
        .output();
    // While it loads, its process holds 3000 MiB on the GPU.
    let show_gpu = async {
        let mut client = agent.client().await;
        let (_, events) = watch_until(&mut client, 0, Duration::from_secs(20), |e| {
            matches!(&e.kind, Some(event::Kind::ServiceStarted(_)))
        })
        .await;
        let pid = started_pid(&events);
        nvml.show(&[("Stand-In-H100", 4_000, 81_920)], &[(0, pid, 3_000)]);
    };
    let (output, ()) = tokio::join!(run, show_gpu);
    let output = output.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    let loading: Vec<&str> = stdout.lines().filter(|l| l.contains("LOADING_WEIGHTS")).collect();
    assert!(loading.iter().any(|l| l.contains("rss ") && l.contains("gpu 3000 MiB")), "{stdout}");
    assert!(stdout.contains("/translation/nllb: READY after") && stdout.contains(", GPU 3000 MiB)"), "{stdout}");
    // And JUnit keeps the peaks for the suite: the load's and its loading stage's.
    let junit = crate::read_junit(&scratch.path.join("out/junit.xml"));
    let props = crate::run::suite_properties(&junit, "translate");
    assert_eq!(props.get("proctor.model.nllb.peak_gpu_mib").map(String::as_str), Some("3000"), "{props:?}");
    assert_eq!(props.get("proctor.model.nllb.stage.LOADING_WEIGHTS.peak_gpu_mib").map(String::as_str), Some("3000"));
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_pressure_while_a_model_loads_is_told_once_with_the_largest_consumers() {
    let scratch = Scratch::new("pressure");
    let nvml = StandInNvml::build(&scratch.path);
    nvml.show(&[("Stand-In-H100", 1_000, 81_920)], &[]);
    // Any host is "low" under a 100 TB threshold; GPU 0 only once the load fills it.
    let service = with_nvml(
        Service::sim(&["nllb:mb=8,download=100ms,load=3s,warmup=50ms"])
            .agent_lines("[pressure]\nhost_available_mb = 100000000\ngpu_free_mb = 2000"),
        &nvml,
    );
    let agent = Agent::spawn(BIN, &service).await;
    let mut client = agent.client().await;
    // Nothing loads: three samples below the threshold, and not a word.
    let telemetry = |e: &proto::Event| matches!(&e.kind, Some(event::Kind::Telemetry(_)));
    let mut samples = 0;
    let (_, seen) = watch_until(&mut client, 0, Duration::from_secs(10), |e| {
        samples += usize::from(telemetry(e));
        samples == 3
    })
    .await;
    let pressure = |e: &proto::Event| matches!(&e.kind, Some(event::Kind::MemoryPressure(_)));
    assert!(!seen.iter().any(pressure), "pressure told while nothing loads: {seen:?}");

    let suite = scratch.write("t.yaml", crate::run::TRANSLATE_SUITE);
    let run = tokio::process::Command::new(BIN)
        .args(["run", "--agent", &agent.addr, "--progress", "none", "--out"])
        .arg(scratch.path.join("out"))
        .arg(&suite)
        .output();
    let fill_gpu = async {
        let (_, events) = watch_until(&mut client, 0, Duration::from_secs(20), |e| {
            matches!(&e.kind, Some(event::Kind::ServiceStarted(_)))
        })
        .await;
        let pid = started_pid(&events);
        nvml.show(&[("Stand-In-H100", 80_000, 81_920)], &[(0, pid, 78_000)]);
        pid
    };
    let (output, pid) = tokio::join!(run, fill_gpu);
    let output = output.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    let host_lines: Vec<&str> =
        stdout.lines().filter(|l| l.contains("memory pressure") && l.contains("host memory")).collect();
    assert_eq!(host_lines.len(), 1, "once per episode:\n{stdout}");
    assert!(
        host_lines[0].contains("(below 100000000 MiB) while translation/nllb loads; largest consumers: "),
        "{stdout}"
    );
    let gpu_lines: Vec<&str> =
        stdout.lines().filter(|l| l.contains("memory pressure") && l.contains("GPU 0")).collect();
    assert_eq!(gpu_lines.len(), 1, "{stdout}");
    assert!(
        gpu_lines[0].contains(&format!("GPU 0 free 1920 MiB of 81920 MiB (below 2000 MiB) while translation/nllb loads; largest consumers: pid {pid} (translation) 78000 MiB")),
        "{stdout}"
    );
}
