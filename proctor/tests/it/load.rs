//! Load cases against a real sim with known faults: exact request counts,
//! percentiles near a fixed delay, thresholds that pass and fail, a stall
//! that open loop shows and closed loop hides, progress while it runs.

use std::time::Duration;

use controller::report::{CaseReport, LoadReport, Outcome};
use controller::{Exit, RunOptions};
use testkit::{Agent, Scratch, Service};
use tokio_util::sync::CancellationToken;

use crate::BIN;

fn suite(parallel: &str, cases: &str) -> String {
    format!("name: load\nservice: translation\nmodels: [nllb]\n{parallel}cases:\n{cases}")
}

const TRANSLATE: &str = "    request:
      method: POST
      path: /translate
      json: {text: Hello world, source_lang: en, target_lang: es, model: nllb}
";

fn load_of(c: &CaseReport) -> &LoadReport {
    c.load.as_ref().unwrap_or_else(|| panic!("case {} has no load figures: {c:?}", c.name))
}

async fn run(agent: &Agent, name: &str, text: &str) -> (controller::RunResult, Scratch) {
    let out = Scratch::new(name);
    let file = out.write("load.yaml", text);
    let options = RunOptions::new(vec![agent.addr.clone()], vec![file], out.path.clone());
    (controller::run(options, CancellationToken::new()).await, out)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_case_against_a_fixed_delay_counts_every_request_and_judges_its_thresholds() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=100ms"]).flag("--slow-requests=20ms")).await;
    let cases = format!(
        "  - name: steady
{TRANSLATE}    load:
      connections: 4
      count: 200
      check_every: 10
      thresholds: [\"p50 < 40ms\", \"rps > 50\", \"errors < 1%\"]
    expect:
      status: 200
      json:
        - pointer: /translated_text
          equals: hola mundo
  - name: too strict
{TRANSLATE}    load:
      connections: 2
      duration: 1s
      warmup: 200ms
      thresholds: [\"p99 < 5ms\"]
  - name: wrong path
    request: {{method: GET, path: /nope}}
    load: {{connections: 1, count: 20}}
"
    );
    let (result, out) = run(&agent, "load-fixed", &suite("", &cases)).await;
    let report = result.report.expect("a report");
    assert_eq!(result.exit, Exit::TestFailures, "{}", report.summary());
    let steady = &report.cases[0];
    assert_eq!(steady.outcome, Outcome::Passed, "{}", report.summary());
    let l = load_of(steady);
    assert_eq!((l.requests, l.errors, l.checked), (200, 0, 20), "exact count, every 10th response checked: {l:?}");
    assert!((20_000..=30_000).contains(&l.p50_us), "p50 near the 20ms delay: {l:?}");
    assert!((20_000..=60_000).contains(&l.p99_us), "p99 near the delay: {l:?}");
    assert!(l.rps > 100.0 && l.rps <= 200.0, "4 connections at 20ms each: at most 200/s: {l:?}");
    assert_eq!(l.mode, "closed loop, 4 connections");
    assert!(l.thresholds.iter().all(|t| t.held) && l.thresholds.len() == 3, "{:?}", l.thresholds);

    let strict = &report.cases[1];
    let Outcome::Failed(failures) = &strict.outcome else { panic!("{}", report.summary()) };
    assert_eq!(failures[0].check, "threshold");
    assert_eq!(failures[0].expected, "p99 < 5ms");
    assert!(failures[0].actual.ends_with("ms"), "{failures:?}");
    let l = load_of(strict);
    assert!(l.warmup_requests > 0 && l.requests > 0, "warm-up measured apart: {l:?}");
    assert!((900..1_300).contains(&l.measured_ms), "measured over the 1s after the warm-up: {l:?}");

    let summary = report.summary();
    assert!(summary.contains("load (closed loop, 4 connections): 200 requests in "), "{summary}");
    assert!(summary.contains("thresholds: p50 < 40ms ("), "{summary}");
    let junit = crate::read_junit(&out.path.join("junit.xml"));
    assert!(junit.contains("thresholds: p99 &lt; 5ms (") && junit.contains("FAILED"), "{junit}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["cases"][0]["load"]["requests"], 200, "{json}");
    assert_eq!(json["cases"][1]["load"]["thresholds"][0]["held"], false, "{json}");
    let html = std::fs::read_to_string(out.path.join("report.html")).unwrap();
    assert!(html.contains("load (closed loop, 2 connections)"), "the HTML shows the figures");

    // Errors by kind, each with its first example said once; the URL is the request's.
    let wrong = &report.cases[2];
    assert_eq!(load_of(wrong).errors_by_kind.get("status 404"), Some(&20), "{:?}", load_of(wrong));
    assert!(summary.contains("first error of each kind: status 404: "), "{summary}");
    assert!(!summary.contains("status 404: status 404") && !summary.contains("response (0)"), "{summary}");
    assert!(steady.url.ends_with("/translate") && wrong.url.ends_with("/nope"), "{} {}", steady.url, wrong.url);
    assert!(!junit.contains("response ("), "a load's first errors are not a response: {junit}");
    let markdown = std::fs::read_to_string(out.path.join("summary.md")).unwrap();
    assert!(markdown.contains("<summary>first error of each kind</summary>"), "{markdown}");
}

/// `parallel: N` lets functional cases overlap, never a load: it starts
/// when the cases before it have finished, and what follows waits for it, so
/// its figures are its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_load_case_runs_alone_in_a_parallel_suite() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=100ms"]).flag("--slow-requests=200ms")).await;
    const OK: &str = "    expect: {status: 200}\n";
    let cases = format!(
        "  - name: before\n{TRANSLATE}{OK}  - name: load\n{TRANSLATE}    load: {{connections: 1, duration: 500ms}}\n  \
         - name: after\n{TRANSLATE}{OK}"
    );
    let (result, _out) = run(&agent, "load-alone", &suite("parallel: 4\n", &cases)).await;
    let report = result.report.expect("a report");
    assert_eq!(result.exit, Exit::Passed, "{}", report.summary());
    let [before, load, after] = &report.cases[..] else { panic!("{}", report.summary()) };
    let end = |c: &CaseReport| c.started_unix_ms + c.duration.as_millis() as i64;
    assert!(load.started_unix_ms >= end(before), "the load waited for `before`: {before:?}\n{load:?}");
    assert!(after.started_unix_ms >= end(load), "`after` waited for the load: {load:?}\n{after:?}");
}

/// Runs one load case through the CLI against a sim that holds every
/// answer for 1 s, 1 s after its first request: report.json and stdout.
async fn against_a_stall(name: &str, load: &str) -> (serde_json::Value, String) {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=100ms"]).flag("--stall=1s+1s")).await;
    let out = Scratch::new(&format!("load-stall-{name}"));
    let file = out.write("load.yaml", &suite("", &format!("  - name: {name}\n{TRANSLATE}    load:\n{load}")));
    let o = tokio::process::Command::new(BIN)
        .args(["run", "--agent", &agent.addr, "--no-store", "--out"])
        .arg(&out.path)
        .arg(&file)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path.join("report.json")).unwrap()).unwrap();
    (json["cases"][0]["load"].clone(), stdout)
}

/// The same 1 s stall, met by both loops (each against its own sim, at
/// once): open loop's p99 shows it (the requests due during it are late,
/// measured from when they were due); closed loop's does not (each
/// connection simply waited: a few slow requests among thousands), though
/// its max does.
#[tokio::test(flavor = "multi_thread")]
async fn a_one_second_stall_shows_in_open_loop_percentiles_and_hides_in_closed_loop() {
    let ((open, stdout), (closed, _)) = tokio::join!(
        against_a_stall("open", "      rate: 200/s\n      connections: 4\n      duration: 3s\n"),
        against_a_stall("closed", "      connections: 2\n      duration: 3s\n"),
    );
    let figure = |l: &serde_json::Value, key: &str| l[key].as_u64().unwrap();
    assert!(figure(&open, "p99_us") >= 900_000, "open loop's p99 shows the 1s stall: {open}");
    assert!((550..=650).contains(&figure(&open, "requests")), "200/s for 3s: {open}");
    assert!(figure(&closed, "p99_us") < 300_000, "closed loop's p99 hides it: {closed}");
    assert!(figure(&closed, "max_us") >= 900_000, "closed loop's max alone shows it: {closed}");
    // Progress while it ran, about once a second per case.
    let progress: Vec<&str> = stdout.lines().filter(|l| l.starts_with("load open on ")).collect();
    assert!(progress.len() >= 2, "{stdout}");
    assert!(progress.iter().any(|l| l.contains("/s, p99 ")), "{progress:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_case_past_the_agents_limits_is_refused_before_anything_runs() {
    use proto::agent_client::AgentClient;
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=100ms"])).await;
    let mut client = AgentClient::connect(format!("http://{}", agent.addr)).await.unwrap();
    let lease = crate::lease(&mut client, "run-load-limits").await;
    let request = proto::HttpCase { method: "GET".into(), path: "/health".into(), ..Default::default() };
    // (load case, what the refusal says)
    let table = [
        (
            proto::LoadCase {
                requests: vec![request.clone()],
                connections: 5000,
                duration_ms: 1000,
                ..Default::default()
            },
            "at most 1024 connections",
        ),
        (proto::LoadCase { requests: vec![request.clone()], ..Default::default() }, "a duration or a request count"),
        (
            proto::LoadCase {
                requests: vec![proto::HttpCase { path: "@169.254.169.254/latest".into(), ..request.clone() }],
                duration_ms: 1000,
                ..Default::default()
            },
            "would leave the service",
        ),
    ];
    for (load, why) in table {
        let case = proto::Case {
            case_id: "c1".into(),
            name: "bad load".into(),
            kind: Some(proto::case::Kind::Load(load)),
            ..Default::default()
        };
        let e = client
            .run_cases(proto::RunCasesRequest { lease: Some(lease.clone()), cases: vec![case], parallel: 0 })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains(why) && e.message().contains("nothing was run"), "{}", e.message());
    }
}

/// Ctrl-C mid-load: the run lets go of the service, and the agent stops
/// sending its traffic at once (not at the case's 60 s end), the case ending
/// as an error with the figures so far.
#[tokio::test(flavor = "multi_thread")]
async fn a_load_still_running_when_its_run_lets_go_of_the_service_stops() {
    use proto::agent_client::AgentClient;
    use proto::event::Kind;
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=100ms"])).await;
    let mut client = AgentClient::connect(format!("http://{}", agent.addr)).await.unwrap();
    let out = Scratch::new("load-released");
    let cases = format!("  - name: long\n{TRANSLATE}    load: {{connections: 2, rate: 100/s, duration: 60s}}\n");
    let file = out.write("load.yaml", &suite("", &cases));
    let interrupt = CancellationToken::new();
    let run = tokio::spawn(controller::run(
        RunOptions::new(vec![agent.addr.clone()], vec![file], out.path.clone()),
        interrupt.clone(),
    ));
    let started = |e: &proto::Event| matches!(&e.kind, Some(Kind::LoadProgress(p)) if p.requests > 0);
    let (_, seen) = crate::watch_until(&mut client, 0, Duration::from_secs(30), started).await;
    let from = seen.last().map_or(0, |e| e.seq);
    interrupt.cancel();
    let released = std::time::Instant::now();
    let stopped = |e: &proto::Event| matches!(&e.kind, Some(Kind::CaseFinished(c)) if c.result.as_ref().is_some_and(|r| r.name == "long"));
    let (_, events) = crate::watch_until(&mut client, from + 1, Duration::from_secs(10), stopped).await;
    assert!(released.elapsed() < Duration::from_secs(5), "stopped within seconds of the release");
    let Some(Kind::CaseFinished(c)) = &events.last().unwrap().kind else { unreachable!() };
    let r = c.result.as_ref().unwrap();
    assert_eq!(r.outcome(), proto::CaseOutcome::Error);
    assert!(r.message.starts_with("load case stopped: the lease on service translation ended"), "{}", r.message);
    assert!(r.load.as_ref().is_some_and(|l| l.requests > 0 && l.requests < 6000), "the figures so far: {r:?}");
    let result = testkit::within(Duration::from_secs(30), "the interrupted run", run).await.unwrap();
    assert_eq!(result.exit, Exit::Interrupted);
}
