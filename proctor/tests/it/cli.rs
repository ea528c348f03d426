//! The `proctor` command line as a user runs it: exit codes and what it prints.

use std::process::Output;
use std::time::{Duration, Instant};

use testkit::{Agent, Scratch, Service};

use crate::BIN;
use crate::run::TRANSLATE_SUITE;

async fn proctor(args: &[&str]) -> Output {
    tokio::process::Command::new(BIN).args(args).output().await.expect("run proctor")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_expectation_fails_naming_case_pointer_expected_and_actual() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=100ms,load=200ms,warmup=100ms"])).await;
    let out = Scratch::new("wrong");
    let suite = out.write("wrong.yaml", &TRANSLATE_SUITE.replace("equals: hola mundo", "equals: bonjour le monde"));
    let o = proctor(&[
        "run",
        "--agent",
        &agent.addr,
        "--out",
        &out.path.display().to_string(),
        "--progress",
        "none",
        &suite.display().to_string(),
    ])
    .await;
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "exit 1 for a test failure\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("case \"english to spanish\" failed: equals at /translated_text: expected \"bonjour le monde\", got \"hola mundo\""),
        "{stdout}"
    );
    let junit = crate::read_junit(&out.path.join("junit.xml"));
    assert_eq!(junit.matches("<failure").count(), 1, "{junit}");
    for (what, file) in [("JSON report", "report.json"), ("Markdown summary", "summary.md")] {
        let said = format!("{what}: {}", out.path.join(file).display());
        assert!(stdout.contains(&said), "the run says where its {what} is:\n{stdout}");
    }
}

/// In a GitHub Actions job the Markdown summary lands on the job's page.
#[tokio::test(flavor = "multi_thread")]
async fn the_markdown_summary_is_appended_to_the_github_step_summary() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=100ms,load=200ms,warmup=100ms"])).await;
    let out = Scratch::new("step-summary");
    let step = out.write("step_summary.md", "earlier step's summary\n");
    let suite = out.write("wrong.yaml", &TRANSLATE_SUITE.replace("equals: hola mundo", "equals: bonjour le monde"));
    let o = tokio::process::Command::new(BIN)
        .args(["run", "--agent", &agent.addr, "--progress", "none", "--out"])
        .arg(&out.path)
        .arg(&suite)
        .env("GITHUB_STEP_SUMMARY", &step)
        .output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    let page = std::fs::read_to_string(&step).unwrap();
    assert!(page.starts_with("earlier step's summary\n## Proctor run "), "appended, not replaced:\n{page}");
    assert!(page.contains(": FAILED\n") && page.contains("| translate | "), "{page}");
    assert!(
        page.contains(
            "- **translate / english to spanish**: case \"english to spanish\" failed: equals at /translated_text"
        ),
        "{page}"
    );
    assert_eq!(
        page.trim_start_matches("earlier step's summary\n").trim(),
        std::fs::read_to_string(out.path.join("summary.md")).unwrap().trim()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gated_model_without_token_errors_at_authenticating_in_seconds() {
    // A five-minute timeout: the failure must come from the auth error, not the clock.
    let service = Service::sim(&["aya:mb=8,gated,auth=300ms"]).model_timeout("5m");
    let agent = Agent::spawn(BIN, &service).await;
    let out = Scratch::new("gated");
    let suite = out.write("aya.yaml", &TRANSLATE_SUITE.replace("nllb", "aya"));
    let started = Instant::now();
    let o = proctor(&[
        "run",
        "--agent",
        &agent.addr,
        "--out",
        &out.path.display().to_string(),
        "--progress",
        "none",
        &suite.display().to_string(),
    ])
    .await;
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "exit 2 for a load failure\n{stdout}\n{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20), "failed in seconds: {:?}", started.elapsed());
    let junit = crate::read_junit(&out.path.join("junit.xml"));
    assert_eq!(junit.matches("<error").count(), 2, "every case of the model is an error: {junit}");
    assert!(junit.contains("model aya failed in stage AUTHENTICATING"), "{junit}");
    assert!(junit.contains("HF_TOKEN is not set"), "{junit}");
    assert!(!junit.contains("<skipped"), "{junit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gated_model_loads_with_its_token_from_a_secret_file() {
    let service =
        Service::sim(&["aya:mb=8,gated,auth=100ms,download=100ms,load=100ms"]).secret("HF_TOKEN", "hf_test_token\n");
    let agent = Agent::spawn(BIN, &service).await;
    let out = Scratch::new("gated-ok");
    let suite = out.write("aya.yaml", &TRANSLATE_SUITE.replace("nllb", "aya"));
    let o = proctor(&[
        "run",
        "--agent",
        &agent.addr,
        "--out",
        &out.path.display().to_string(),
        "--progress",
        "none",
        &suite.display().to_string(),
    ])
    .await;
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!agent.logs().contains("hf_test_token"), "the secret never reaches the agent's logs");
}

#[tokio::test(flavor = "multi_thread")]
async fn off_a_tty_progress_prints_a_line_per_change_and_per_interval() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=300ms,load=2s,warmup=300ms"])).await;
    let out = Scratch::new("progress");
    let suite = out.write("t.yaml", TRANSLATE_SUITE);
    let o = proctor(&[
        "run",
        "--agent",
        &agent.addr,
        "--out",
        &out.path.display().to_string(),
        "--progress-interval",
        "300ms",
        &suite.display().to_string(),
    ])
    .await;
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('[') && l.contains("/translation/nllb")).collect();
    let with = |stage: &str| lines.iter().filter(|l| l.contains(stage)).count();
    for stage in ["PROCESS_STARTING", "WAITING_FOR_HTTP", "DOWNLOADING", "WARMING_UP", "READY after"] {
        assert!(with(stage) >= 1, "a line when the model enters {stage}:\n{stdout}");
    }
    // A 2 s stage with a 300 ms interval: the change line plus several repeats.
    assert!(with("LOADING_WEIGHTS") >= 4, "interval lines while loading weights:\n{stdout}");
    assert!(lines.iter().all(|l| l.contains("rss ") || l.contains("READY after")), "each line shows memory:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn suite_errors_point_at_file_line_column_and_exit_64() {
    let out = Scratch::new("bad-suite");
    let suite = out.write("bad.yaml", &TRANSLATE_SUITE.replace("method: POST", "method: SEND"));
    // No agent is needed: suites are checked before anything connects.
    let o = proctor(&[
        "run",
        "--agent",
        "127.0.0.1:9",
        "--out",
        &out.path.display().to_string(),
        &suite.display().to_string(),
    ])
    .await;
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains(&format!("{}:7:15: unknown HTTP method \"SEND\"", suite.display())), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_agent_is_exit_2_with_every_case_an_error() {
    let out = Scratch::new("unreachable");
    let suite = out.write("t.yaml", TRANSLATE_SUITE);
    let o = proctor(&[
        "run",
        "--agent",
        "127.0.0.1:9",
        "--out",
        &out.path.display().to_string(),
        &suite.display().to_string(),
    ])
    .await;
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("cannot reach agent 127.0.0.1:9"), "{stderr}");
    let junit = crate::read_junit(&out.path.join("junit.xml"));
    assert_eq!(junit.matches("<error").count(), 2, "{junit}");
}

/// A `proctor run` child (stderr piped) whose only model takes a minute to
/// load, returned once it reports LOADING_WEIGHTS; its stdout keeps draining.
async fn run_until_loading(name: &str) -> (Agent, Scratch, tokio::process::Child) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=100ms,load=60s"])).await;
    let out = Scratch::new(name);
    let suite = out.write("t.yaml", TRANSLATE_SUITE);
    let mut child = tokio::process::Command::new(BIN)
        .args(["run", "--agent", &agent.addr, "--out", &out.path.display().to_string(), "--progress-interval", "200ms"])
        .arg(&suite)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
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
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (agent, out, child)
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_writes_partial_reports_and_exits_130() {
    let (agent, out, mut child) = run_until_loading("interrupt").await;
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = testkit::within(Duration::from_secs(10), "proctor run to exit", child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(130));
    let junit = crate::read_junit(&out.path.join("junit.xml"));
    assert_eq!(junit.matches("<error").count(), 2, "unrun cases are errors, not missing: {junit}");
    assert!(junit.contains("interrupted while waiting for models to load"), "{junit}");
    // The lease was released: another run can take the service at once.
    let mut client = agent.client().await;
    crate::lease(&mut client, "after-interrupt").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn help_lists_every_command_and_the_exit_codes() {
    let o = proctor(&["--help"]).await;
    let (stdout, _) = text(&o);
    for needle in ["demo", "run", "agent", "sim", "Exit codes", "64 bad input", "130 interrupted"] {
        assert!(stdout.contains(needle), "--help mentions {needle}:\n{stdout}");
    }
    assert!(!stdout.contains("sim-worker"), "internal commands stay hidden");
    let o = proctor(&["run", "--help"]).await;
    let (stdout, _) = text(&o);
    for flag in ["--agent", "--out", "--model-timeout", "--fresh", "--progress-interval", "--progress"] {
        assert!(stdout.contains(flag), "run --help documents {flag}:\n{stdout}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_ctrl_c_exits_within_a_second_and_still_writes_partial_reports() {
    use nix::sys::signal::{Signal, kill};
    use tokio::io::{AsyncBufReadExt, BufReader};
    let (agent, out, mut child) = run_until_loading("interrupt-twice").await;
    // Freeze the agent: the graceful path (ack, lease release) now hangs, so
    // only the second interrupt can end the run quickly.
    let agent_pid = nix::unistd::Pid::from_raw(agent.pid as i32);
    kill(agent_pid, Signal::SIGSTOP).unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    kill(pid, Signal::SIGINT).unwrap();
    let mut errors = BufReader::new(child.stderr.take().unwrap()).lines();
    testkit::within(Duration::from_secs(10), "the first interrupt to be taken", async {
        while let Some(line) = errors.next_line().await.unwrap() {
            if line.contains("interrupted: finishing up") {
                return;
            }
        }
    })
    .await;
    kill(pid, Signal::SIGINT).unwrap();
    let second = Instant::now();
    let status = testkit::within(Duration::from_secs(5), "proctor run to exit", child.wait()).await.unwrap();
    let elapsed = second.elapsed();
    kill(agent_pid, Signal::SIGCONT).unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(elapsed < Duration::from_secs(1), "exited {elapsed:?} after the second signal");
    let rest = testkit::within(Duration::from_secs(5), "stderr", async {
        let mut all = String::new();
        while let Ok(Some(l)) = errors.next_line().await {
            all.push_str(&l);
        }
        all
    })
    .await;
    assert!(rest.contains("interrupted again: partial report written"), "{rest}");
    let junit = crate::read_junit(&out.path.join("junit.xml"));
    assert_eq!(junit.matches("<testcase ").count(), 2, "every case present: {junit}");
    assert_eq!(junit.matches("<error message=\"interrupted").count(), 2, "{junit}");
}
