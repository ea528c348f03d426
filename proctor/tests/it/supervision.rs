//! Supervision with a real agent process: whole-tree stops, OOM, restarts,
//! failed launches, re-attach after an agent crash, nothing orphaned.
//!
//! Tests that need cgroups say so. testkit starts every agent with
//! `PROCTOR_REQUIRE_CGROUP=1`, so on a host without usable cgroups the agent
//! refuses to start and these tests fail loudly — under the README's test
//! command and CI alike. `PROCTOR_ALLOW_NO_CGROUP=1` is the explicit opt-out
//! for hosts that cannot have them (the tests then say what they skipped).

use std::time::{Duration, Instant};

use proto::agent_client::AgentClient;
use proto::{Event, ExitKind, Stage, event};
use testkit::{Agent, Service};
use tonic::transport::Channel;

use crate::{BIN, lease, reached, watch_until};

async fn leased(agent: &Agent) -> (AgentClient<Channel>, proto::LeaseRef) {
    let mut client = agent.client().await;
    let l = lease(&mut client, "supervision").await;
    (client, l)
}

async fn ensure(client: &mut AgentClient<Channel>, lease: &proto::LeaseRef, models: &[&str]) {
    client
        .ensure_models(proto::EnsureModelsRequest {
            lease: Some(lease.clone()),
            models: models.iter().map(|m| m.to_string()).collect(),
            ..Default::default()
        })
        .await
        .expect("ensure");
}

/// Whether this agent runs services in cgroups; without, the caller returns
/// (only possible with the `PROCTOR_ALLOW_NO_CGROUP` opt-out: see module doc).
async fn has_cgroups(client: &mut AgentClient<Channel>) -> bool {
    let info = client.get_info(proto::GetInfoRequest {}).await.unwrap().into_inner();
    let yes = info.capabilities.is_some_and(|c| c.cgroup);
    if !yes {
        assert!(std::env::var_os(testkit::ALLOW_NO_CGROUP).is_some(), "cgroups are required here");
        eprintln!("no usable cgroups on this host: this test cannot run its assertions");
    }
    yes
}

fn exited(events: &[Event]) -> Vec<proto::ExitStatus> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(event::Kind::ServiceExited(x)) => x.exit,
            _ => None,
        })
        .collect()
}

fn started_pid(events: &[Event]) -> u32 {
    events
        .iter()
        .find_map(|e| match &e.kind {
            Some(event::Kind::ServiceStarted(s)) => Some(s.pid),
            _ => None,
        })
        .expect("ServiceStarted")
}

fn log_value(events: &[Event], key: &str) -> Option<u32> {
    events.iter().find_map(|e| match &e.kind {
        Some(event::Kind::Log(l)) => {
            l.line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok())
        }
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_setsid_grandchild_is_gone_after_stop() {
    let service = Service::sim(&["nllb:mb=4,download=100ms,load=100ms,warmup=100ms"])
        .flag("--worker-mb")
        .flag("4")
        .flag("--detach-worker")
        .stop_grace("1s");
    let agent = Agent::spawn(BIN, &service).await;
    let (mut client, lease) = leased(&agent).await;
    if !has_cgroups(&mut client).await {
        return;
    }
    ensure(&mut client, &lease, &["nllb"]).await;
    let mut worker = None;
    let mut ready = false;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(30), |e| {
        worker = worker.or_else(|| log_value(std::slice::from_ref(e), "pid="));
        ready |= reached(e, "nllb", Stage::Ready);
        ready && worker.is_some()
    })
    .await;
    let worker = worker.expect("the worker said its pid");
    let service_pid = started_pid(&events);
    assert!(testkit::process_alive(worker));
    assert_ne!(testkit::pgid(worker), Some(service_pid), "the worker left the service's process group");
    let asked = Instant::now();
    client.stop_service(proto::StopServiceRequest { lease: Some(lease) }).await.unwrap();
    testkit::until(Duration::from_secs(6), "the detached worker to be gone", || !testkit::process_alive(worker)).await;
    assert!(asked.elapsed() < Duration::from_secs(6), "gone within grace + 5 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_start_stop_cycles_leave_no_zombie_and_no_stray_process() {
    let service = Service::sim(&["nllb:mb=1,download=10ms,load=10ms,warmup=10ms"]).stop_grace("2s");
    let agent = Agent::spawn(BIN, &service).await;
    let (mut client, lease) = leased(&agent).await;
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..200 {
        ensure(&mut client, &lease, &["nllb"]).await;
        let (snapshot, _) = watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await;
        pids.insert(snapshot.services[0].pid);
        let exit =
            client.stop_service(proto::StopServiceRequest { lease: Some(lease.clone()) }).await.unwrap().into_inner();
        assert_eq!(exit.exit.unwrap().kind(), ExitKind::StoppedGracefully);
    }
    assert_eq!(pids.len(), 200, "200 distinct service processes were started");
    let alive: Vec<u32> = pids.iter().copied().filter(|p| testkit::process_alive(*p)).collect();
    assert!(alive.is_empty(), "no service process survives, zombie or not: {alive:?}");
    let children = testkit::children(agent.pid);
    assert!(children.is_empty(), "the agent has no children left (zombie or not): {children:?}");
    let (snapshot, _) = watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await;
    assert!(!snapshot.services[0].running);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oom_kill_of_the_main_process_is_classified_as_oom() {
    // io=off: the download's page cache would count against the limit too.
    let service = Service::sim(&["nllb:mb=256,download=100ms,load=1s,io=off"]).service_lines("memory_limit_mb = 64");
    let agent = Agent::spawn(BIN, &service).await;
    let (mut client, lease) = leased(&agent).await;
    if !has_cgroups(&mut client).await {
        return;
    }
    ensure(&mut client, &lease, &["nllb"]).await;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(30), |e| reached(e, "nllb", Stage::Failed)).await;
    assert_eq!(exited(&events).last().unwrap().kind(), ExitKind::OomKilled, "{:?}", exited(&events));
    let failed = events.iter().rev().find(|e| reached(e, "nllb", Stage::Failed)).unwrap();
    let Some(event::Kind::StageChanged(c)) = &failed.kind else { unreachable!() };
    assert!(c.message.contains("OOM-killed while loading (its cgroup's memory limit is 64 MiB)"), "{}", c.message);
    assert!(c.message.contains("failed in stage LOADING_WEIGHTS"), "{}", c.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oom_kill_of_a_worker_is_oom_even_when_the_main_process_exits_0() {
    let service = Service::sim(&["nllb:mb=4,download=5s"])
        .flag("--worker-mb")
        .flag("256")
        .flag("--exit-with-worker")
        .service_lines("memory_limit_mb = 64");
    let agent = Agent::spawn(BIN, &service).await;
    let (mut client, lease) = leased(&agent).await;
    if !has_cgroups(&mut client).await {
        return;
    }
    ensure(&mut client, &lease, &["nllb"]).await;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(30), |e| reached(e, "nllb", Stage::Failed)).await;
    let exit = *exited(&events).last().unwrap();
    assert_eq!(exit.kind(), ExitKind::OomKilled, "{exit:?}");
    assert_eq!(exit.code, 0, "the main process itself exited 0: {exit:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_back_off_doubling_up_to_the_cap() {
    let service = Service::sim(&["nllb:mb=1,download=100ms,crash=downloading"])
        .service_lines("restart = \"on-failure\"\nrestart_backoff = \"200ms\"\nrestart_backoff_max = \"800ms\"");
    let agent = Agent::spawn(BIN, &service).await;
    let (mut client, lease) = leased(&agent).await;
    ensure(&mut client, &lease, &["nllb"]).await;
    let mut starts = 0;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(30), |e| {
        starts += usize::from(matches!(e.kind, Some(event::Kind::ServiceStarted(_))));
        starts == 6
    })
    .await;
    assert!(exited(&events).iter().all(|x| x.kind() == ExitKind::Crashed), "{:?}", exited(&events));
    let gaps = restart_gaps(&events);
    assert_eq!(gaps.len(), 5, "{gaps:?}");
    for (gap, base) in gaps.iter().zip([200, 400, 800, 800, 800]) {
        let low = base * 8 / 10 - 20;
        assert!(
            (low..=base + 150).contains(gap),
            "gaps {gaps:?}: {gap} ms should be within [{low}, {}] ms",
            base + 150
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_launches_name_the_command_and_leave_nothing_behind() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let cases = [
        (
            "command = [\"/nonexistent/model-server\", \"--port\", \"{port}\"]",
            "program \"/nonexistent/model-server\" not found",
        ),
        ("command = [\"sleep\", \"600\"]\nworkdir = \"/nonexistent/dir\"", "workdir /nonexistent/dir is not a folder"),
        // The port is taken: the service dies at once, before answering.
        (
            &*format!("command = [\"{BIN}\", \"sim\", \"--port\", \"{port}\", \"--model\", \"nllb\"]"),
            "after launch, before answering: command [",
        ),
    ];
    for (service_lines, want) in cases {
        let scratch = testkit::Scratch::new("launch");
        let config = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n[[service]]\nname = \"translation\"\n{service_lines}\n\n[[service.model]]\nname = \"nllb\"\n",
            scratch.path.display()
        );
        let agent = Agent::spawn_config(BIN, &config).await;
        let (mut client, lease) = leased(&agent).await;
        ensure(&mut client, &lease, &["nllb"]).await;
        let (_, events) =
            watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::Failed)).await;
        let Some(event::Kind::StageChanged(c)) = &events.last().unwrap().kind else { unreachable!() };
        assert!(c.message.contains(want), "{want}: {}", c.message);
        if want.contains("before answering") {
            assert!(c.message.contains("cannot listen on"), "the service's own words are included: {}", c.message);
        }
        let children = testkit::children(agent.pid);
        assert!(children.is_empty(), "{want}: nothing left behind: {children:?}");
    }
    drop(busy);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_agent_reattaches_to_a_service_still_loading() {
    let service = Service::sim(&["nllb:mb=16,download=500ms,load=4s,warmup=200ms"]);
    let agent = Agent::spawn(BIN, &service).await;
    let (mut client, lease) = leased(&agent).await;
    ensure(&mut client, &lease, &["nllb"]).await;
    let (_, events) =
        watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::LoadingWeights)).await;
    let pid = started_pid(&events);
    let first_incarnation = events[0].incarnation.clone();
    let scratch = agent.kill9();
    assert!(testkit::process_alive(pid), "the service outlives its agent");

    let agent = Agent::restart_from(BIN, scratch).await;
    let mut client = agent.client().await;
    let (snapshot, events) =
        watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::Ready)).await;
    assert_ne!(snapshot.incarnation, first_incarnation, "a new incarnation is announced");
    assert_eq!(started_pid(&events), pid, "the same process, re-attached");
    let causes: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(event::Kind::StageChanged(c)) => Some(format!("{}:{}", c.to().label(), c.cause)),
            _ => None,
        })
        .collect();
    assert!(causes[0].starts_with(&format!("WAITING_FOR_HTTP:re-attached to pid {pid}")), "{causes:?}");
    assert!(causes.iter().any(|c| c.starts_with("LOADING_WEIGHTS:")), "stages continue: {causes:?}");
    assert!(causes.last().unwrap().starts_with("READY:"), "{causes:?}");
    assert!(agent.logs().contains("re-attaching to a running service"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_gets_neither_the_agents_environment_nor_its_oom_protection() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=1,download=10ms,load=10ms"])).await;
    // Protect the agent from the OOM killer, as a systemd unit might. Lowering
    // a score needs CAP_SYS_RESOURCE, which some containers withhold.
    let protected = std::fs::write(format!("/proc/{}/oom_score_adj", agent.pid), "-500").is_ok();
    let (mut client, lease) = leased(&agent).await;
    ensure(&mut client, &lease, &["nllb"]).await;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::Ready)).await;
    let pid = started_pid(&events);
    let adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    assert_eq!(adj.trim(), "0", "the service's OOM score is reset (agent protected: {protected})");
    if !protected {
        eprintln!("could not lower the agent's oom_score_adj here (no CAP_SYS_RESOURCE): only the default was checked");
    }
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(!environ.contains(testkit::CANARY_ENV), "filtered environment: {environ}");
    assert!(environ.contains("PATH="), "the basics are kept");
}

/// Gaps from each exit to the next start, in ms.
fn restart_gaps(events: &[Event]) -> Vec<i64> {
    let mut gaps = Vec::new();
    let mut exited_at = None;
    for e in events {
        match &e.kind {
            Some(event::Kind::ServiceExited(_)) => exited_at = Some(e.time_unix_ms),
            Some(event::Kind::ServiceStarted(_)) => gaps.extend(exited_at.take().map(|t| e.time_unix_ms - t)),
            _ => {}
        }
    }
    gaps
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_always_with_runs_past_stable_after_keeps_the_first_backoff() {
    // Each run lasts 700 ms, longer than stable_after: the count starts over
    // every time, so the backoff never doubles.
    let config = "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[[service]]\nname = \"translation\"\n\
                  command = [\"sh\", \"-c\", \"sleep 0.7; exit 0\"]\nrestart = \"always\"\nrestart_backoff = \"300ms\"\n\
                  restart_backoff_max = \"5s\"\nstable_after = \"500ms\"\n\n[[service.model]]\nname = \"nllb\"\n";
    let agent = Agent::spawn_config(BIN, config).await;
    let (mut client, lease) = leased(&agent).await;
    ensure(&mut client, &lease, &["nllb"]).await;
    let mut starts = 0;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(30), |e| {
        starts += usize::from(matches!(e.kind, Some(event::Kind::ServiceStarted(_))));
        starts == 4
    })
    .await;
    let gaps = restart_gaps(&events);
    assert_eq!(gaps.len(), 3, "{gaps:?}");
    assert!(gaps.iter().all(|g| (200..=600).contains(g)), "always the first 300 ms backoff: {gaps:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_agent_set_to_reap_ends_the_service_it_finds() {
    let service = Service::sim(&["nllb:mb=8,download=100ms,load=30s"]).service_lines("on_agent_restart = \"reap\"");
    let agent = Agent::spawn(BIN, &service).await;
    let (mut client, lease) = leased(&agent).await;
    ensure(&mut client, &lease, &["nllb"]).await;
    let (_, events) =
        watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::LoadingWeights)).await;
    let pid = started_pid(&events);
    let agent = Agent::restart_from(BIN, agent.kill9()).await;
    testkit::until(Duration::from_secs(10), "the orphaned service to be reaped", || !testkit::process_alive(pid)).await;
    let mut client = agent.client().await;
    let (snapshot, _) = watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await;
    assert!(!snapshot.services[0].running, "not re-attached: reaped");
    assert!(agent.logs().contains("reap"), "{}", agent.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_to_reload_a_failed_model_says_so_to_the_models_it_takes_down() {
    // Both load at start; aya hangs and fails, nllb is READY. Asking for aya
    // again means a restart, which takes nllb down: it is told why.
    let service = Service::sim(&["nllb:mb=8,download=100ms,load=200ms", "aya:mb=8,download=100ms,hang=loading"])
        .model_lines(r#"stall = { default = "2s" }"#);
    let agent = Agent::spawn(BIN, &service).await;
    let (mut client, lease) = leased(&agent).await;
    ensure(&mut client, &lease, &["nllb", "aya"]).await;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "aya", Stage::Failed)).await;
    assert!(events.iter().any(|e| reached(e, "nllb", Stage::Ready)));
    let from = events.last().unwrap().seq + 1;
    ensure(&mut client, &lease, &["aya"]).await;
    let (_, after) =
        watch_until(&mut client, from, Duration::from_secs(20), |e| reached(e, "nllb", Stage::Stopped)).await;
    let Some(event::Kind::StageChanged(c)) = &after.last().unwrap().kind else { unreachable!() };
    assert!(
        c.message.contains("restarted to load [\"aya\"] again: at-start models load only when the service starts"),
        "{}",
        c.message
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_that_logs_its_token_never_leaks_it() {
    let token = "hf_canary_6f1d9a2b";
    let script =
        "echo \"logging in to the hub with $HF_TOKEN\"; echo \"RuntimeError: token $HF_TOKEN was refused\" >&2; exit 1";
    let config = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[[service]]\nname = \"translation\"\ncommand = [\"sh\", \"-c\", {script:?}]\n\
         secrets = {{ HF_TOKEN = \"hf.token\" }}\n\n[[service.model]]\nname = \"nllb\"\n"
    );
    let agent = Agent::spawn_config(BIN, &config).await;
    agent.scratch.write("hf.token", &format!("{token}\n"));
    let (mut client, lease) = leased(&agent).await;
    ensure(&mut client, &lease, &["nllb"]).await;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::Failed)).await;
    let everything = format!("{events:?}");
    assert!(!everything.contains(token), "the token reached a watcher: {everything}");
    let Some(event::Kind::StageChanged(c)) = &events.last().unwrap().kind else { unreachable!() };
    assert!(
        c.message.contains("token [REDACTED: HF_TOKEN] was refused"),
        "the line is kept, the value is not: {}",
        c.message
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_agent_runs_the_service_as_its_configured_user_inside_its_cgroup() {
    let service = Service::sim(&["nllb:mb=1,download=10ms,load=10ms"]).service_lines("user = \"nobody\"\n");
    let agent = Agent::spawn(BIN, &service).await;
    let (mut client, lease) = leased(&agent).await;
    ensure(&mut client, &lease, &["nllb"]).await;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::Ready)).await;
    let pid = started_pid(&events);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids =
        |key: &str| status.lines().find(|l| l.starts_with(key)).unwrap().split_whitespace().nth(1).unwrap().to_owned();
    assert_eq!((ids("Uid:"), ids("Gid:")), ("65534".to_owned(), "65534".to_owned()), "runs as nobody: {status}");
    let caps = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    assert!(caps.ends_with("0000000000000000"), "no capabilities left: {caps}");
    let environ = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap()).into_owned();
    assert!(environ.contains("USER=nobody"), "{environ}");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.contains("translation"), "joined its cgroup before dropping root: {cgroup}");
}
