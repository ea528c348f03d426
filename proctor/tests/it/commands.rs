//! Test commands: the seed team's own pytest suite run by a suite next to
//! the service — per-test results in every report, a skip shown as one (or
//! a failure with `--fail-on-skip`), the allow-list refusing before anything
//! runs, a hung command killed with its process tree at its timeout.

use std::time::Duration;

use controller::{Exit, RunOptions};
use testkit::{Agent, Scratch, Service};
use tokio_util::sync::CancellationToken;

use crate::BIN;

fn python() -> String {
    let found = std::process::Command::new("sh").args(["-c", "command -v python3"]).output().unwrap();
    String::from_utf8_lossy(&found.stdout).trim().to_owned()
}

/// The agent's test commands: the e2e suite (a suite may add `-k` and test
/// paths under tests/e2e) and one that never ends (2 s timeout).
fn commands() -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pytest");
    let python = python();
    let mut text = String::new();
    for (name, tests, timeout) in [
        ("e2e-pytest", "tests/e2e", "2m"),
        ("hang", "tests/hang", "2s"),
        ("linger", "tests/linger", "60s"),
        ("hang-long", "tests/hang", "5m"),
    ] {
        text.push_str(&format!(
            "[[service.test_command]]\nname = \"{name}\"\nargv = [\"{python}\", \"-m\", \"pytest\", \"-q\", \"-p\", \
             \"no:cacheprovider\", \"--junitxml={{junit}}\", \"{tests}\"]\nworkdir = \"{}\"\ntimeout = \"{timeout}\"\n\
             env = {{ TRANSLATE_API_URL = \"{{url}}\", PYTHONDONTWRITEBYTECODE = \"1\" }}\noptions = [\"-k\"]\n\
             paths = \"{tests}\"\n\n",
            dir.display()
        ));
    }
    text
}

const E2E_SUITE: &str = "\
name: e2e
service: translation
models: [nllb]
cases:
  - name: pytest e2e
    command: e2e-pytest
  - name: health
    request: {method: GET, path: /health}
    expect: {status: 200}
";

#[tokio::test(flavor = "multi_thread")]
async fn the_teams_pytest_suite_runs_next_to_the_service_each_test_in_every_report() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=200ms"]).agent_lines(&commands())).await;
    let out = Scratch::new("pytest");
    let suite = out.write("e2e.yaml", E2E_SUITE);
    let store = controller::store::Location::Sqlite(out.path.join("runs.sqlite"));
    let opts = RunOptions {
        store: Some(store.clone()),
        ..RunOptions::new(vec![agent.addr.clone()], vec![suite.clone()], out.path.clone())
    };
    let result = controller::run(opts, CancellationToken::new()).await;
    let report = result.report.unwrap();
    let summary = report.summary();
    assert_eq!(result.exit, Exit::TestFailures, "one test fails on purpose: {summary}");
    let pytest = &report.cases[0];
    let tests: Vec<(String, &str)> = pytest.tests.iter().map(|t| (t.id(), t.outcome.as_str())).collect();
    assert_eq!(tests.len(), 5, "{tests:?}");
    let outcome = |id: &str| tests.iter().find(|(t, _)| t.ends_with(id)).map(|(_, o)| *o);
    assert_eq!(outcome("test_english_to_spanish"), Some("passed"));
    assert_eq!(outcome("test_english_to_french_fails_on_purpose"), Some("failed"));
    assert_eq!(outcome("test_aya_translates"), Some("skipped"), "a skip inside pytest is shown as one");
    assert_eq!(outcome("test_proctor_says_which_models_are_ready"), Some("passed"), "PROCTOR_READY_MODELS");
    assert!(summary.contains("(5 tests: 3 passed, 1 failed, 1 skipped)"), "{summary}");
    assert!(summary.contains("test_english_to_french_fails_on_purpose: expected passed, got"), "{summary}");
    assert!(
        summary.contains("Skipped inside commands (1") && summary.contains("aya is gated: needs HF_TOKEN"),
        "{summary}"
    );

    let junit = crate::read_junit(&out.path.join("junit.xml"));
    assert!(
        junit.contains("name=\"pytest e2e :: tests.e2e.test_nllb_model_e2e::test_english_to_french_fails_on_purpose\""),
        "{junit}"
    );
    assert!(junit.contains("<skipped message=\"aya is gated: needs HF_TOKEN\"/>"), "{junit}");
    assert!(
        junit.contains("tests=\"7\" failures=\"2\" errors=\"0\" skipped=\"1\""),
        "case + 5 tests + health: {junit}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["cases"][0]["tests"].as_array().map(Vec::len), Some(5));
    let html = std::fs::read_to_string(out.path.join("report.html")).unwrap();
    assert!(html.contains("<tr class=\"skipped test\"><td>e2e</td><td class=\"case-name\">pytest e2e :: tests.e2e.test_aya_model_e2e::test_aya_translates"), "a row per test");
    let trace = std::fs::read_to_string(out.path.join("trace.json")).unwrap();
    assert!(trace.contains("\"test tests.e2e.test_nllb_model_e2e::test_english_to_spanish\""), "a span per test");
    let kept = controller::store::Store::open(&store).await.unwrap().case_history(5).await.unwrap();
    assert!(kept.iter().any(|c| c.name.ends_with("test_aya_translates") && c.outcome == "skipped"), "{kept:?}");

    // -k from the suite (allowed): only the passing test; --fail-on-skip turns the skip into a failure.
    let only = out.write(
        "only.yaml",
        &E2E_SUITE.replace("command: e2e-pytest", "command: e2e-pytest\n    args: [-k, spanish or aya]"),
    );
    let opts = RunOptions {
        fail_on_skip: true,
        ..RunOptions::new(vec![agent.addr.clone()], vec![only], out.path.join("only"))
    };
    let result = controller::run(opts, CancellationToken::new()).await;
    let report = result.report.unwrap();
    assert_eq!(result.exit, Exit::TestFailures, "{}", report.summary());
    assert_eq!(report.cases[0].tests.len(), 2, "-k reached pytest: {:?}", report.cases[0].tests);
    assert!(report.summary().contains("expected not skipped (--fail-on-skip)"), "{}", report.summary());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_or_argument_outside_the_allow_list_is_refused_before_anything_runs() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=200ms"]).agent_lines(&commands())).await;
    for (case, says) in [
        (
            "command: rm-rf",
            "service translation has no test command \"rm-rf\" (it has e2e-pytest, hang, linger, hang-long); nothing \
             was run",
        ),
        ("command: e2e-pytest\n    args: [-k, \"@/etc/passwd\"]", "starts with '@'"),
        (
            "command: e2e-pytest\n    args: [-p, evil]",
            "option \"-p\" is not allowed for command e2e-pytest: its options are -k",
        ),
        ("command: e2e-pytest\n    args: [../../etc]", "must be relative and under tests/e2e"),
        ("command: e2e-pytest\n    args: [-k, \"x; touch /tmp/owned\"]", "holds a shell character"),
    ] {
        let out = Scratch::new("refused-command");
        let suite = out.write("s.yaml", &E2E_SUITE.replace("command: e2e-pytest", case));
        let result = controller::run(
            RunOptions::new(vec![agent.addr.clone()], vec![suite], out.path.clone()),
            CancellationToken::new(),
        )
        .await;
        let report = result.report.unwrap();
        assert_eq!(result.exit, Exit::Infrastructure, "{}", report.summary());
        let pytest = &report.cases[0];
        assert!(pytest.headline().contains(says), "{case}: {}", pytest.headline());
        assert!(pytest.tests.is_empty() && pytest.duration.is_zero(), "nothing ran: {pytest:?}");
    }
    assert!(!agent.logs().contains("pytest"), "no pytest process was started");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_that_hangs_is_killed_with_its_process_tree_at_its_timeout() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=200ms"]).agent_lines(&commands())).await;
    let (result, took) = run_command(&agent, "hang", "hung-command").await;
    let report = result.report.unwrap();
    let hung = &report.cases[0];
    assert!(
        hung.headline().contains("command hang timed out after 2s; its process group was killed"),
        "{}",
        hung.headline()
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
    // The grandchild the test started (sleep 300) went with the group.
    let pid = left_pid(&agent).expect("pid file");
    testkit::until(Duration::from_secs(5), "the command's grandchild to be gone", || !testkit::process_alive(pid))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_left_holding_the_output_neither_hangs_the_case_nor_outlives_it() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=200ms"]).agent_lines(&commands())).await;
    let (result, took) = run_command(&agent, "linger", "lingering-command").await;
    let report = result.report.unwrap();
    assert_eq!(result.exit, Exit::Passed, "{}", report.summary());
    assert!(took < Duration::from_secs(15), "not its 60 s timeout: {took:?}");
    let pid = left_pid(&agent).expect("pid file");
    testkit::until(Duration::from_secs(5), "the process it left to be gone", || !testkit::process_alive(pid)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_still_running_when_its_run_lets_go_of_the_service_is_killed() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=200ms"]).agent_lines(&commands())).await;
    let out = Scratch::new("released-command");
    let suite = out.write("s.yaml", &E2E_SUITE.replace("command: e2e-pytest", "command: hang-long"));
    let interrupt = CancellationToken::new();
    let run = tokio::spawn(controller::run(
        RunOptions::new(vec![agent.addr.clone()], vec![suite], out.path.clone()),
        interrupt.clone(),
    ));
    // The command is running once its test wrote the grandchild's pid.
    let pid_file = testkit::within(Duration::from_secs(30), "the command to start", async {
        loop {
            if let Some(pid) = left_pid(&agent) {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // Ctrl-C: the run releases its lease; the agent must not let the command go on using the service.
    interrupt.cancel();
    let result = testkit::within(Duration::from_secs(30), "the interrupted run", run).await.unwrap();
    assert_eq!(result.exit, Exit::Interrupted);
    testkit::until(Duration::from_secs(5), "the command's tree to be killed once the lease ended", || {
        !testkit::process_alive(pid_file)
    })
    .await;
    let logs = agent.logs();
    assert!(!logs.contains("panicked"), "{logs}");
}

/// Runs `E2E_SUITE` with its command case set to `command`; the result and how long it took.
async fn run_command(agent: &Agent, command: &str, name: &str) -> (controller::RunResult, Duration) {
    let out = Scratch::new(name);
    let suite = out.write("s.yaml", &E2E_SUITE.replace("command: e2e-pytest", &format!("command: {command}")));
    let started = std::time::Instant::now();
    let result = controller::run(
        RunOptions::new(vec![agent.addr.clone()], vec![suite], out.path.clone()),
        CancellationToken::new(),
    )
    .await;
    (result, started.elapsed())
}

/// The pid a fixture test left in `<junit>.pid` (a process it started), once written.
fn left_pid(agent: &Agent) -> Option<u32> {
    let file =
        walk(&agent.scratch.path.join("data")).into_iter().find(|p| p.to_string_lossy().ends_with(".xml.pid"))?;
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commands_secret_never_reaches_a_report() {
    const TOKEN: &str = "hf_command_secret_123";
    let dir = Scratch::new("command-secret");
    let token = dir.write("hf.token", &format!("{TOKEN}\n"));
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pytest");
    let secret = format!(
        "[[service.test_command]]\nname = \"secret\"\nargv = [\"{}\", \"-m\", \"pytest\", \"-q\", \"-p\", \
         \"no:cacheprovider\", \"--junitxml={{junit}}\", \"tests/secret\"]\nworkdir = \"{}\"\n\
         env = {{ PYTHONDONTWRITEBYTECODE = \"1\" }}\nsecrets = {{ HF_TOKEN = \"{}\" }}\n",
        python(),
        fixtures.display(),
        token.display()
    );
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=200ms"]).agent_lines(&secret)).await;
    let (result, _) = run_command(&agent, "secret", "command-secret-run").await;
    let report = result.report.unwrap();
    let case = &report.cases[0];
    let said = format!("{}\n{}\n{:?}", report.summary(), case.excerpt, case.tests);
    assert!(!said.contains(TOKEN), "the command's secret leaked: {said}");
    assert!(case.excerpt.contains("using token [REDACTED: HF_TOKEN]"), "{}", case.excerpt);
    assert!(case.tests[0].message.contains("[REDACTED: HF_TOKEN]"), "{:?}", case.tests);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The seed team's workflow — wait for NLLB, run our pytest e2e suite, then a
/// load test with a p99 gate — is one run of one suite file, the example in
/// `suites/seed-workflow.yaml` as it is.
#[tokio::test(flavor = "multi_thread")]
async fn the_seed_workflow_is_one_run_of_the_example_suite() {
    let service = Service::sim(&["nllb:mb=8,download=200ms,load=500ms"]).agent_lines(&commands());
    let agent = Agent::spawn(BIN, &service).await;
    let out = Scratch::new("seed-workflow");
    let suite = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../suites/seed-workflow.yaml");
    let result = controller::run(
        RunOptions::new(vec![agent.addr.clone()], vec![suite], out.path.clone()),
        CancellationToken::new(),
    )
    .await;
    let report = result.report.unwrap();
    let summary = report.summary();
    assert_eq!(result.exit, Exit::Passed, "{summary}");
    let load = &report.loads[0];
    let pytest = &report.cases[0];
    assert!(load.failure.is_none() && !load.reused, "NLLB was loaded and waited for: {summary}");
    assert!(load.waited >= Duration::from_millis(700), "the whole load was waited for: {:?}", load.waited);
    let tests: Vec<(String, &str)> = pytest.tests.iter().map(|t| (t.id(), t.outcome.as_str())).collect();
    assert_eq!(tests.len(), 3, "the NLLB and basic tests, nothing skipped: {tests:?}");
    assert!(tests.iter().all(|(_, o)| *o == "passed"), "{tests:?}");
    let l = report.cases[1].load.as_ref().expect("load figures");
    let gates: Vec<(&str, bool)> = l.thresholds.iter().map(|t| (t.text.as_str(), t.held)).collect();
    assert_eq!(gates, [("p99 < 250ms", true), ("rps > 100", true), ("errors < 0.1%", true)], "{summary}");
    assert!(l.requests > 500 && l.checked > 0 && l.warmup_requests > 0, "{l:?}");
    assert!(report.cases[1].started_unix_ms >= pytest.started_unix_ms, "in the suite's order");
}
