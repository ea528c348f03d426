//! The controller's promises, each tried the way it was seen broken: leases
//! that lapse or linger, duplicate suite names, lost-but-back hosts, Ctrl-C
//! with a frozen agent, bad durations, closed pipes.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use controller::report::Outcome;
use controller::{Exit, RunOptions};
use testkit::{Agent, Scratch, Service};
use tokio_util::sync::CancellationToken;

use crate::BIN;
use crate::run::TRANSLATE_SUITE;

async fn proctor(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args).envs(env.iter().copied());
    cmd.output().await.expect("run proctor")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `proctor run --agent A --out DIR [flags] SUITE` against one agent.
async fn run_suite(
    agent: &Agent,
    out: &Scratch,
    suite: &std::path::Path,
    flags: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let dir = out.path.display().to_string();
    let suite = suite.display().to_string();
    let mut args = vec!["run", "--agent", agent.addr.as_str(), "--out", dir.as_str()];
    args.extend_from_slice(flags);
    args.push(suite.as_str());
    proctor(&args, env).await
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A lease on `translation` held by another run, with this TTL and never renewed.
async fn held_by_other(agent: &Agent, ttl: Duration) {
    let mut client = agent.client().await;
    client
        .acquire_lease(proto::AcquireLeaseRequest {
            service: "translation".into(),
            run_id: "crashed-run".into(),
            holder: "ci@elsewhere".into(),
            ttl_ms: ttl.as_millis() as u64,
        })
        .await
        .expect("lease");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_suites_with_one_name_are_refused_with_exit_64() {
    let out = Scratch::new("dup-names");
    let a = out.write("a.yaml", TRANSLATE_SUITE);
    let b = out.write("b.yaml", TRANSLATE_SUITE);
    let o = proctor(
        &[
            "run",
            "--agent",
            "127.0.0.1:9",
            "--out",
            &out.path.display().to_string(),
            &a.display().to_string(),
            &b.display().to_string(),
        ],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("suite name \"translate\" is already used by"), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_or_junk_durations_are_bad_input_with_exit_64() {
    let out = Scratch::new("durations");
    let suite = out.write("t.yaml", TRANSLATE_SUITE).display().to_string();
    let dir = out.path.display().to_string();
    let base = ["run", "--agent", "127.0.0.1:9", "--out", dir.as_str()];
    for (flag, value, says) in [
        ("--progress-interval", "0s", "--progress-interval must be greater than zero"),
        ("--lease-ttl", "0s", "--lease-ttl must be greater than zero"),
        ("--reconnect-grace", "0s", "--reconnect-grace must be greater than zero"),
        ("--keepalive-interval", "0s", "--keepalive-interval must be greater than zero"),
        ("--lease-ttl", "soon", "\"soon\" is not a duration"),
    ] {
        let mut args = base.to_vec();
        args.extend([flag, value, "--progress", "lines", suite.as_str()]);
        let o = proctor(&args, &[]).await;
        assert_eq!(o.status.code(), Some(64), "{flag} {value}: {}", text(&o));
        assert!(text(&o).contains(says), "{flag} {value}: {}", text(&o));
    }
    let mut args = base.to_vec();
    args.push(suite.as_str());
    let o = proctor(&args, &[("MODEL_LOADING_TIMEOUT", "a while")]).await;
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("MODEL_LOADING_TIMEOUT=\"a while\" is not a duration"), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_stdout_is_not_a_panic() {
    let out = Scratch::new("pipe");
    let suite = out.write("t.yaml", TRANSLATE_SUITE);
    let mut child = tokio::process::Command::new(BIN)
        .args(["run", "--agent", "127.0.0.1:9", "--progress", "lines", "--out", &out.path.display().to_string()])
        .arg(&suite)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // as `| head` does once it has its lines
    let o = testkit::within(Duration::from_secs(30), "proctor run to exit", child.wait_with_output()).await.unwrap();
    assert_eq!(o.status.code(), Some(2), "exit 2 (unreachable agent), not a panic: {}", text(&o));
    assert!(!text(&o).contains("panicked"), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_lease_frees_the_host_within_ttl_plus_two_seconds() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=50ms,load=100ms,warmup=50ms"])).await;
    let ttl = Duration::from_secs(3);
    // A controller that took the lease and was SIGKILLed: nobody renews it.
    let taken = Instant::now();
    held_by_other(&agent, ttl).await;
    let out = Scratch::new("expired");
    let suite = out.write("t.yaml", TRANSLATE_SUITE);
    let mut opts = RunOptions::new(vec![agent.addr.clone()], vec![suite], out.path.clone());
    opts.max_wait = Some(Duration::from_secs(60));
    let result =
        testkit::within(Duration::from_secs(30), "the run", controller::run(opts, CancellationToken::new())).await;
    let report = result.report.unwrap();
    assert_eq!(result.exit, Exit::Passed, "{}", report.summary());
    // The cases ran, and within TTL + 2 s of the lease being taken (plus the ~0.3 s load).
    assert!(taken.elapsed() < ttl + Duration::from_secs(2) + Duration::from_secs(3), "took {:?}", taken.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn max_wait_turns_waiting_cases_into_errors_naming_the_holder() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=50ms,load=100ms"])).await;
    held_by_other(&agent, Duration::from_secs(120)).await;
    let out = Scratch::new("max-wait");
    let suite = out.write("t.yaml", TRANSLATE_SUITE);
    let started = Instant::now();
    let o = run_suite(&agent, &out, &suite, &["--max-wait", "2s", "--progress", "none"], &[]).await;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(started.elapsed() < Duration::from_secs(10), "gave up promptly: {:?}", started.elapsed());
    let junit = crate::read_junit(&out.path.join("junit.xml"));
    assert_eq!(junit.matches("<error").count(), 2, "{junit}");
    assert!(junit.contains("gave up waiting for a host after 2s (max wait 2s)"), "{junit}");
    assert!(junit.contains("held by run crashed-run (ci@elsewhere)"), "names the holder: {junit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_agent_is_the_same_host_and_takes_the_unfinished_cases() {
    let addr = format!("127.0.0.1:{}", free_port());
    let service = Service::sim(&["nllb:mb=8,download=100ms,load=3s,warmup=100ms"]).listen(&addr);
    let agent = Agent::spawn(BIN, &service).await;
    let out = Scratch::new("restarted");
    let suite = out.write("t.yaml", TRANSLATE_SUITE);
    let mut opts = RunOptions::new(vec![agent.addr.clone()], vec![suite], out.path.clone());
    opts.keepalive =
        controller::client::Keepalive { interval: Duration::from_secs(1), timeout: Duration::from_secs(1) };
    opts.reconnect_grace = Duration::from_secs(10);
    let run = tokio::spawn(controller::run(opts, CancellationToken::new()));
    let mut client = agent.client().await;
    crate::watch_until(&mut client, 0, Duration::from_secs(20), |e| {
        crate::reached(e, "nllb", proto::Stage::LoadingWeights)
    })
    .await;
    // SIGKILL mid-load, and back within a second: the service is re-attached.
    let agent = Agent::restart_from(BIN, agent.kill9()).await;
    assert_eq!(agent.addr, addr);
    let result = testkit::within(Duration::from_secs(40), "the run", run).await.unwrap();
    let report = result.report.unwrap();
    assert_eq!(result.exit, Exit::Passed, "{}", report.summary());
    assert!(report.cases.iter().all(|c| c.outcome == Outcome::Passed && c.host == addr), "{}", report.summary());
    assert!(
        report.cases.iter().all(|c| c.attempt == 1 && c.reruns.len() == 1),
        "never sent before the restart, so still attempt 1, with the loss recorded: {}",
        report.summary()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_ctrl_c_with_a_frozen_agent_ends_promptly_and_starts_nothing_new() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use tokio::io::{AsyncBufReadExt, BufReader};
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=100ms,load=60s"])).await;
    let out = Scratch::new("frozen");
    let suite = out.write("t.yaml", TRANSLATE_SUITE);
    let second = out.write("u.yaml", &TRANSLATE_SUITE.replace("name: translate", "name: queued"));
    let mut child = tokio::process::Command::new(BIN)
        .args(["run", "--agent", &agent.addr, "--out", &out.path.display().to_string(), "--progress-interval", "200ms"])
        .args(["--reconnect-grace", "20s", "--lease-ttl", "60s"])
        .arg(&suite)
        .arg(&second)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    testkit::within(Duration::from_secs(20), "the model to be loading", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("LOADING_WEIGHTS") {
                return;
            }
        }
    })
    .await;
    kill(Pid::from_raw(agent.pid as i32), Signal::SIGSTOP).unwrap();
    let interrupted = Instant::now();
    kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGINT).unwrap();
    let rest = tokio::spawn(async move {
        let mut all = String::new();
        while let Ok(Some(l)) = lines.next_line().await {
            all.push_str(&l);
            all.push('\n');
        }
        all
    });
    let status = testkit::within(Duration::from_secs(15), "proctor run to exit", child.wait()).await.unwrap();
    let took = interrupted.elapsed();
    kill(Pid::from_raw(agent.pid as i32), Signal::SIGCONT).unwrap();
    let after = rest.await.unwrap();
    assert_eq!(status.code(), Some(130), "{after}");
    assert!(took < Duration::from_secs(8), "one Ctrl-C ends the run promptly, not after the 20 s grace: {took:?}");
    assert!(!after.contains("re-running"), "nothing is re-run after an interrupt:\n{after}");
    let junit = crate::read_junit(&out.path.join("junit.xml"));
    assert_eq!(junit.matches("<testcase ").count(), 4, "every case of both suites is reported: {junit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn model_loading_timeout_where_proctor_run_runs_limits_the_load() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=100ms,load=30s"])).await;
    let out = Scratch::new("env-timeout");
    let suite = out.write("t.yaml", TRANSLATE_SUITE);
    let started = Instant::now();
    let o = run_suite(&agent, &out, &suite, &["--progress", "none"], &[("MODEL_LOADING_TIMEOUT", "2")]).await;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(started.elapsed() < Duration::from_secs(15), "the 2 s limit applied: {:?}", started.elapsed());
    let junit = crate::read_junit(&out.path.join("junit.xml"));
    assert!(
        junit.contains("load timed out after 2s (the limit was set by MODEL_LOADING_TIMEOUT (where `proctor run` ran)"),
        "the message names the source of the limit: {junit}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_progress_line_says_why_a_model_failed_and_logs_carry_no_colour_codes() {
    let agent = Agent::spawn(BIN, &Service::sim(&["aya:mb=8,gated,auth=200ms"])).await;
    let out = Scratch::new("failed-line");
    let suite = out.write("aya.yaml", &TRANSLATE_SUITE.replace("nllb", "aya"));
    let o = run_suite(&agent, &out, &suite, &["--progress", "lines"], &[]).await;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout.lines().find(|l| l.contains("translation/aya") && l.contains("FAILED after")).unwrap_or_default();
    assert!(line.contains(": model aya failed in stage AUTHENTICATING"), "the line says why: {line:?}\n{stdout}");
    // Redirected output (the agent's log file, this run's stderr) has no ANSI escapes.
    assert!(!agent.logs().contains('\u{1b}'), "agent log has colour codes");
    assert!(!text(&o).contains('\u{1b}'), "run output has colour codes");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_suite_timeout_travels_to_the_agent_and_the_message_names_it() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=100ms,hang=loading"])).await;
    let out = Scratch::new("suite-timeout");
    let suite = out.write("t.yaml", &TRANSLATE_SUITE.replace("models: [nllb]\n", "models: [nllb]\ntimeout: 2s\n"));
    let started = Instant::now();
    let o = run_suite(&agent, &out, &suite, &["--progress", "none"], &[("MODEL_LOADING_TIMEOUT", "300")]).await;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(started.elapsed() < Duration::from_secs(15), "the suite's 2 s beat the environment's 300 s");
    let junit = crate::read_junit(&out.path.join("junit.xml"));
    assert!(junit.contains("load timed out after 2s (the limit was set by the suite&apos;s `timeout`"), "{junit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn suites_of_one_run_on_one_service_take_turns() {
    let service = Service::sim(&["nllb:mb=8,download=50ms,load=100ms,warmup=50ms"]).flag("--slow-requests=300ms");
    let agent = Agent::spawn(BIN, &service).await;
    let out = Scratch::new("turns");
    let a = out.write("a.yaml", TRANSLATE_SUITE);
    let b = out.write("b.yaml", &TRANSLATE_SUITE.replace("name: translate", "name: second"));
    let opts = RunOptions::new(vec![agent.addr.clone()], vec![a, b], out.path.clone());
    let result =
        testkit::within(Duration::from_secs(40), "the run", controller::run(opts, CancellationToken::new())).await;
    let report = result.report.unwrap();
    assert_eq!(result.exit, Exit::Passed, "{}", report.summary());
    // (start, end) of each suite's cases: one suite's span ends before the other's begins.
    let span = |suite: &str| {
        let cases: Vec<_> = report.cases.iter().filter(|c| c.suite == suite).collect();
        let start = cases.iter().map(|c| c.started_unix_ms).min().unwrap();
        let end = cases.iter().map(|c| c.started_unix_ms + c.duration.as_millis() as i64).max().unwrap();
        (start, end)
    };
    let (first, second) = (span("translate"), span("second"));
    assert!(
        first.1 <= second.0 || second.1 <= first.0,
        "the suites overlapped: {first:?} {second:?}\n{}",
        report.summary()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_a_junk_model_loading_timeout_refuses_to_start() {
    let out = Scratch::new("agent-env");
    let config = out.write("agent.toml", "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n");
    for value in ["abc", "0"] {
        let o =
            proctor(&["agent", "--config", &config.display().to_string()], &[("MODEL_LOADING_TIMEOUT", value)]).await;
        assert_eq!(o.status.code(), Some(64), "{value}: {}", text(&o));
        assert!(text(&o).contains(&format!("MODEL_LOADING_TIMEOUT={value:?}")), "{}", text(&o));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn suites_planned_at_once_spread_over_equally_good_hosts() {
    let spec = ["nllb:mb=8,download=50ms,load=300ms,warmup=50ms"];
    let mut agents = Vec::new();
    for _ in 0..3 {
        agents.push(Agent::spawn(BIN, &Service::sim(&spec)).await);
    }
    let out = Scratch::new("spread");
    let suites: Vec<_> = ["one", "two", "three"]
        .iter()
        .map(|n| out.write(&format!("{n}.yaml"), &TRANSLATE_SUITE.replace("name: translate", &format!("name: {n}"))))
        .collect();
    let addrs = agents.iter().map(|a| a.addr.clone()).collect();
    let opts = RunOptions::new(addrs, suites, out.path.clone());
    let result =
        testkit::within(Duration::from_secs(40), "the run", controller::run(opts, CancellationToken::new())).await;
    let report = result.report.unwrap();
    assert_eq!(result.exit, Exit::Passed, "{}", report.summary());
    let hosts: std::collections::BTreeSet<&str> = report.cases.iter().map(|c| c.host.as_str()).collect();
    assert_eq!(hosts.len(), 3, "one suite per host, not piled on one:\n{}", report.summary());
}
