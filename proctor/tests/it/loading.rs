//! The loading monitor with a real agent process: warm-up before READY,
//! stalls told apart from slow loads, crashes noticed at once, admission.

use std::time::{Duration, Instant};

use controller::report::Outcome;
use controller::{Exit, RunOptions};
use proto::{Event, Stage, event};
use testkit::{Agent, Fixture, Scratch, Service};
use tokio_util::sync::CancellationToken;

use crate::run::TRANSLATE_SUITE;
use crate::{BIN, lease, reached, watch_until};

async fn ensure(agent: &Agent, models: &[&str]) -> proto::agent_client::AgentClient<tonic::transport::Channel> {
    let mut client = agent.client().await;
    let lease = lease(&mut client, "loading-test").await;
    client
        .ensure_models(proto::EnsureModelsRequest {
            lease: Some(lease),
            models: models.iter().map(|m| m.to_string()).collect(),
            ..Default::default()
        })
        .await
        .expect("ensure");
    client
}

fn stage_event(e: &Event) -> Option<&proto::StageChanged> {
    match &e.kind {
        Some(event::Kind::StageChanged(c)) => Some(c),
        _ => None,
    }
}

fn first<'a>(events: &'a [Event], model: &str, stage: Stage) -> &'a Event {
    events.iter().find(|e| reached(e, model, stage)).unwrap_or_else(|| panic!("{model} never reached {stage:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_lists_before_it_can_serve_is_not_ready_until_warm_up_succeeds() {
    // An OpenAI-compatible server (vLLM's documented /v1/models) that lists
    // the model but cannot complete yet.
    let fixture = Fixture::start().await;
    fixture.set("GET /health", 200, "");
    fixture.set(
        "GET /v1/models",
        200,
        include_bytes!("../../../agent/fixtures/readiness/openai-v1-models.json").to_vec(),
    );
    fixture.set("POST /v1/completions", 503, r#"{"error": "still capturing CUDA graphs"}"#);
    let scratch = Scratch::new("warmup");
    let config = format!(
        r#"listen = "127.0.0.1:0"
data_dir = "{dir}"

[[service]]
name = "translation"
command = ["sleep", "600"]
base_url = "{url}"
stop_grace = "1s"

[service.readiness]
protocol = "openai"

[[service.model]]
name = "opt"
served_as = "facebook/opt-125m"
[service.model.warmup]
path = "/v1/completions"
body = '{{"model": "{{model}}", "prompt": "Hello", "max_tokens": 1}}'
expect_status = 200
"#,
        dir = scratch.path.display(),
        url = fixture.url
    );
    let agent = Agent::spawn_config(BIN, &config).await;
    let mut client = ensure(&agent, &["opt"]).await;
    watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "opt", Stage::WarmingUp)).await;
    // Several warm-up attempts fail; the model must still not be READY.
    testkit::within(Duration::from_secs(20), "three failed warm-up attempts", async {
        while fixture.hits("POST /v1/completions") < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let (snapshot, _) = watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await;
    let opt = snapshot.services[0].models.iter().find(|m| m.name == "opt").unwrap();
    assert_eq!(opt.stage(), Stage::WarmingUp, "listed is not ready: {opt:?}");

    fixture.set("POST /v1/completions", 200, r#"{"choices": [{"text": " world"}]}"#);
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "opt", Stage::Ready)).await;
    let ready = stage_event(first(&events, "opt", Stage::Ready)).unwrap();
    assert!(ready.cause.starts_with("warm-up succeeded (HTTP 200"), "{ready:?}");
    assert!(events.iter().filter_map(stage_event).all(|c| c.to() != Stage::Failed));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hang_in_loading_weights_stalls_naming_the_stage() {
    let service = Service::sim(&["nllb:mb=16,download=300ms,hang=loading"])
        .model_timeout("5m")
        .model_lines(r#"stall = { default = "2s" }"#);
    let agent = Agent::spawn(BIN, &service).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(30), |e| reached(e, "nllb", Stage::Failed)).await;
    let loading = first(&events, "nllb", Stage::LoadingWeights);
    let failed = first(&events, "nllb", Stage::Failed);
    let after = failed.time_unix_ms - loading.time_unix_ms;
    assert!((2000..6000).contains(&after), "stalled after {after} ms, limit 2 s");
    let message = &stage_event(failed).unwrap().message;
    assert!(message.starts_with("model nllb failed in stage LOADING_WEIGHTS"), "{message}");
    assert!(message.contains("stalled: no progress for 2s in LOADING_WEIGHTS"), "{message}");
    assert!(message.contains("injected hang"), "the last log lines are part of it: {message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_download_with_steady_io_is_not_a_stall_but_a_silent_one_is() {
    // No progress in /health, no RSS growth: only the I/O of the download moves.
    let slow = |io: &str| {
        Service::sim(&[&format!("nllb:mb=32,download=6s,load=200ms,warmup=100ms,progress=off,io={io}")])
            .model_lines(r#"stall = { default = "3s" }"#)
    };
    let agent = Agent::spawn(BIN, &slow("on")).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(30), |e| {
        reached(e, "nllb", Stage::Ready) || reached(e, "nllb", Stage::Failed)
    })
    .await;
    let last = stage_event(events.last().unwrap()).unwrap();
    assert_eq!(last.to(), Stage::Ready, "a 6 s download with steady I/O and a 3 s stall limit loads: {last:?}");

    let agent = Agent::spawn(BIN, &slow("off")).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(30), |e| {
        reached(e, "nllb", Stage::Ready) || reached(e, "nllb", Stage::Failed)
    })
    .await;
    let last = stage_event(events.last().unwrap()).unwrap();
    assert_eq!(last.to(), Stage::Failed, "the same download without I/O stalls: {last:?}");
    assert!(last.message.contains("stalled: no progress for 3s in DOWNLOADING"), "{}", last.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_mid_load_is_reported_within_a_second() {
    let service = Service::sim(&["nllb:mb=16,download=200ms,load=2s,crash=loading"]).model_timeout("5m");
    let agent = Agent::spawn(BIN, &service).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(30), |e| reached(e, "nllb", Stage::Failed)).await;
    let crashed_at: i64 = events
        .iter()
        .find_map(|e| match &e.kind {
            Some(event::Kind::Log(l)) if l.line.contains("injected crash") => {
                l.line.rsplit_once("at_unix_ms=").map(|(_, t)| t.trim().parse().unwrap())
            }
            _ => None,
        })
        .expect("the sim logged its crash");
    let failed = first(&events, "nllb", Stage::Failed);
    let lag = failed.time_unix_ms - crashed_at;
    assert!((0..1000).contains(&lag), "FAILED {lag} ms after the crash");
    assert!(stage_event(failed).unwrap().message.contains("CRASHED(3)"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_that_does_not_fit_is_refused_with_the_numbers() {
    let service =
        Service::sim(&["nllb:mb=8"]).model_lines("ram_mb = 200").agent_lines("[admission]\nmemory_budget_mb = 100");
    let agent = Agent::spawn(BIN, &service).await;
    // The agent itself refuses, with the numbers and the largest consumers.
    let mut client = agent.client().await;
    let lease = lease(&mut client, "admission").await;
    let status = client
        .ensure_models(proto::EnsureModelsRequest {
            lease: Some(lease),
            models: vec!["nllb".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    let message = status.message();
    assert!(message.contains("cannot load nllb on service translation: not enough memory: needs 200 MiB"), "{message}");
    assert!(message.contains("agent budget room 100 MiB"), "{message}");
    assert!(message.contains("largest consumers: "), "{message}");
    let _ = client
        .release_lease(proto::LeaseRef {
            service: "translation".into(),
            run_id: "admission".into(),
            ..Default::default()
        })
        .await;

    // The controller, judging by the same rule, knows this host can never
    // hold it: unsatisfiable at once, every case an error, exit 2.
    let out = Scratch::new("admission");
    let suite = out.write("t.yaml", TRANSLATE_SUITE);
    let started = Instant::now();
    let opts = RunOptions::new(vec![agent.addr.clone()], vec![suite], out.path.clone());
    let result = controller::run(opts, CancellationToken::new()).await;
    assert_eq!(result.exit, Exit::Infrastructure);
    assert!(started.elapsed() < Duration::from_secs(10));
    let report = result.report.unwrap();
    let Outcome::Error(message) = &report.cases[0].outcome else { panic!("{:?}", report.cases[0]) };
    assert!(message.starts_with("unsatisfiable: no host could ever run suite translate"), "{message}");
    assert!(
        message.contains("needs 200 MiB (200 MiB for the models + 0 MiB headroom), can hold at most 100 MiB"),
        "{message}"
    );
}

/// One protocol's scripted service: answers while loading, then when ready.
struct Script {
    protocol: &'static str,
    model_lines: &'static str,
    loading: Vec<(&'static str, u16, Vec<u8>)>,
    /// The stage the agent must report while loading (None: no stage yet).
    loading_stage: Option<Stage>,
    ready: Vec<(&'static str, u16, Vec<u8>)>,
}

macro_rules! golden {
    ($name:literal) => {
        include_bytes!(concat!("../../../agent/fixtures/readiness/", $name)).to_vec()
    };
}

#[tokio::test(flavor = "multi_thread")]
async fn each_protocol_follows_its_golden_responses_served_over_http() {
    let scripts = [
        Script {
            protocol: "kserve-v2",
            model_lines: "served_as = \"densenet_onnx\"",
            loading: vec![
                ("GET /v2/health/live", 200, vec![]),
                ("GET /v2/models/densenet_onnx/ready", 503, golden!("kserve-v2-model-not-ready.json")),
            ],
            loading_stage: Some(Stage::LoadingWeights),
            ready: vec![("GET /v2/models/densenet_onnx/ready", 200, vec![])],
        },
        Script {
            protocol: "openai",
            model_lines: "served_as = \"facebook/opt-125m\"",
            loading: vec![("GET /health", 503, br#"{"error": "loading"}"#.to_vec())],
            loading_stage: Some(Stage::LoadingWeights),
            ready: vec![("GET /health", 200, vec![]), ("GET /v1/models", 200, golden!("openai-v1-models.json"))],
        },
        Script {
            protocol: "tgi",
            model_lines: "served_as = \"bigscience/blomm-560m\"",
            loading: vec![
                ("GET /health", 503, golden!("tgi-health-unhealthy.json")),
                ("GET /info", 200, golden!("tgi-info.json")),
            ],
            loading_stage: Some(Stage::LoadingWeights),
            ready: vec![("GET /health", 200, vec![])],
        },
        Script {
            protocol: "ollama",
            model_lines: "served_as = \"gemma3\"\nload = \"endpoint\"",
            loading: vec![
                ("GET /api/ps", 200, golden!("ollama-ps-empty.json")),
                ("POST /api/generate", 200, b"{}".to_vec()),
            ],
            loading_stage: None,
            ready: vec![("GET /api/ps", 200, golden!("ollama-ps.json"))],
        },
        Script {
            protocol: "http",
            model_lines: "",
            loading: vec![("GET /ready", 503, vec![])],
            loading_stage: None,
            ready: vec![("GET /ready", 204, vec![])],
        },
    ];
    for script in scripts {
        follow_golden_script(script).await;
    }
}

/// One protocol's script: the agent sees it loading, then READY.
async fn follow_golden_script(script: Script) {
    let fixture = Fixture::start().await;
    for (route, code, body) in &script.loading {
        fixture.set(route, *code, body.clone());
    }
    let scratch = Scratch::new(script.protocol);
    let extra = match script.protocol {
        "ollama" => "load_path = \"/api/generate\"\nload_body = '{\"model\": \"{model}\"}'\n",
        "http" => "path = \"/ready\"\n",
        _ => "",
    };
    let config = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n[[service]]\nname = \"translation\"\ncommand = [\"sleep\", \"600\"]\n\
         base_url = \"{}\"\nstop_grace = \"1s\"\n\n[service.readiness]\nprotocol = \"{}\"\n{extra}\n[[service.model]]\nname = \"m\"\n{}\n",
        scratch.path.display(),
        fixture.url,
        script.protocol,
        script.model_lines
    );
    let agent = Agent::spawn_config(BIN, &config).await;
    let mut client = ensure(&agent, &["m"]).await;
    let what = script.protocol;
    match script.loading_stage {
        Some(stage) => {
            watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "m", stage)).await;
        }
        None => {
            // No stage to see: wait until the agent has polled the loading answers.
            let route = script.loading[0].0;
            testkit::within(Duration::from_secs(20), "polls of the loading state", async {
                while fixture.hits(route) < 3 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            let (snapshot, _) = watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await;
            let m = &snapshot.services[0].models[0];
            assert_eq!(m.stage(), Stage::WaitingForHttp, "{what}: nothing ready yet: {m:?}");
        }
    }
    if what == "ollama" {
        assert!(fixture.hits("POST /api/generate") >= 1, "ollama: the agent asked for the load");
    }
    for (route, code, body) in &script.ready {
        fixture.set(route, *code, body.clone());
    }
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(20), |e| {
        reached(e, "m", Stage::Ready) || reached(e, "m", Stage::Failed)
    })
    .await;
    let last = stage_event(events.last().unwrap()).unwrap();
    assert_eq!(last.to(), Stage::Ready, "{what}: {last:?}");
    assert!(last.cause.starts_with(&format!("{what}: status=")), "{what}: {last:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_progress_bar_redrawn_with_carriage_returns_moves_the_stage_while_it_runs() {
    // tqdm-style output: one redrawn line, no `\n` until the bar ends (never, here).
    let script = r"printf 'Fetching 3 files: 100%%\n'; for p in 10 20 30 40; do printf 'Loading checkpoint shards: %s%%|#   |\r' $p; sleep 0.3; done; exec sleep 600";
    let config = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[[service]]\nname = \"translation\"\ncommand = [\"sh\", \"-c\", {script:?}]\n\n\
         [[service.model]]\nname = \"nllb\"\nlog_patterns = {{ DOWNLOADING = \"Fetching .* files\", LOADING_WEIGHTS = \"Loading checkpoint shards\" }}\n"
    );
    let agent = Agent::spawn_config(BIN, &config).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    let started = Instant::now();
    let redraw = |e: &Event, pct: &str| matches!(&e.kind, Some(event::Kind::Log(l)) if l.line.contains(pct));
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(10), |e| redraw(e, "40%")).await;
    assert!(started.elapsed() < Duration::from_secs(5), "seen while the bar runs: {:?}", started.elapsed());
    let cause = stage_event(first(&events, "nllb", Stage::LoadingWeights)).unwrap().cause.clone();
    assert!(cause.contains("Loading checkpoint shards"), "{cause}");
    let logs: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(event::Kind::Log(l)) => Some(l.line.clone()),
            _ => None,
        })
        .collect();
    assert!(logs.iter().any(|l| l == "Loading checkpoint shards: 10%|#   |"), "each redraw is a line: {logs:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fixed_port_held_by_another_server_is_a_failed_launch_not_ready() {
    // An older server still holds the port and says the model is loaded.
    let old = Fixture::start().await;
    old.set("/health", 200, r#"{"status":"healthy","models":{"nllb":{"status":"loaded"}}}"#);
    let port: u16 = old.url.rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap();
    let service = Service::sim(&["nllb:mb=8,download=100ms,load=200ms"]).service_lines(&format!("port = {port}"));
    let agent = Agent::spawn(BIN, &service).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(20), |e| {
        reached(e, "nllb", Stage::Failed) || reached(e, "nllb", Stage::Ready)
    })
    .await;
    let last = stage_event(events.last().unwrap()).unwrap();
    assert_eq!(last.to(), Stage::Failed, "READY must be about the service this agent started: {last:?}");
    assert!(last.message.contains(&format!("port {port} is already in use")), "{}", last.message);
    assert_eq!(old.hits("/health"), 0, "the other server is never taken for ours");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_that_failed_in_this_run_is_final_for_the_run() {
    let service = Service::sim(&["nllb:mb=8,download=100ms,hang=loading"]).model_lines(r#"stall = { default = "2s" }"#);
    let agent = Agent::spawn(BIN, &service).await;
    let out = Scratch::new("final-failure");
    let suites: Vec<_> = ["first", "second", "third"]
        .iter()
        .map(|n| out.write(&format!("{n}.yaml"), &TRANSLATE_SUITE.replace("name: translate", &format!("name: {n}"))))
        .collect();
    let started = Instant::now();
    let opts = RunOptions::new(vec![agent.addr.clone()], suites, out.path.clone());
    let result = controller::run(opts, CancellationToken::new()).await;
    let took = started.elapsed();
    let report = result.report.unwrap();
    assert_eq!(result.exit, Exit::Infrastructure);
    assert_eq!(report.cases.len(), 6);
    for c in &report.cases {
        let Outcome::Error(m) = &c.outcome else { panic!("{c:?}") };
        assert!(m.contains("stalled"), "every suite's cases carry the one failure: {m}");
    }
    // One stall, not three: the hung model was loaded once.
    assert!(took < Duration::from_secs(5), "{took:?}\n{}", report.summary());
    let mut client = agent.client().await;
    let (snapshot, _) = watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await;
    let last = snapshot.next_seq - 1;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(5), |e| e.seq == last).await;
    let loads = events.iter().filter(|e| reached(e, "nllb", Stage::LoadingWeights)).count();
    assert_eq!(loads, 1, "loaded once for the whole run");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_message_keeps_the_services_own_words_not_the_agents_probes() {
    // A service that logs every request it gets (as uvicorn or MLServer do),
    // said what is wrong once at start, then only answers the agent's probes.
    let script = "echo 'loading weights from /models/nllb'; echo 'RuntimeError: weights corrupt' >&2; \
                  exec python3 -u -m http.server {port} --bind 127.0.0.1";
    let config = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[[service]]\nname = \"translation\"\ncommand = [\"sh\", \"-c\", {script:?}]\n\
         readiness = {{ protocol = \"http\", path = \"/health\" }}\n\n[[service.model]]\nname = \"nllb\"\nstall = {{ default = \"8s\" }}\n"
    );
    let agent = Agent::spawn_config(BIN, &config).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(30), |e| reached(e, "nllb", Stage::Failed)).await;
    let probes = events
        .iter()
        .filter(|e| matches!(&e.kind, Some(event::Kind::Log(l)) if l.line.contains("GET /health")))
        .count();
    assert!(probes > 20, "enough probe lines to push the cause out of a 20-line tail: {probes}");
    let message = stage_event(events.last().unwrap()).unwrap().message.clone();
    assert!(message.contains("RuntimeError: weights corrupt"), "the service's own words: {message}");
    assert!(!message.contains("GET /health"), "not the agent's own probes: {message}");
    assert!(message.contains("translation.log"), "names the log file: {message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_pattern_on_a_traceback_waits_for_its_exception_line() {
    let script = r#"printf 'Traceback (most recent call last):\n  File "server.py", line 9, in load\n    model = torch.load(path)\nRuntimeError: weights corrupt\n'; exec sleep 600"#;
    let config = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[[service]]\nname = \"translation\"\ncommand = [\"sh\", \"-c\", {script:?}]\n\n\
         [[service.model]]\nname = \"nllb\"\nlog_patterns = {{ FAILED = \"^Traceback\" }}\n"
    );
    let agent = Agent::spawn_config(BIN, &config).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::Failed)).await;
    let message = stage_event(events.last().unwrap()).unwrap().message.clone();
    let first_line = message.lines().next().unwrap();
    assert!(
        first_line.ends_with("the service logged: Traceback (most recent call last): … RuntimeError: weights corrupt"),
        "the reason carries the exception: {first_line}"
    );
}

/// Requests a service that logs each one received in `window`, after its model is READY.
async fn probes_after_ready(live_poll: Option<&str>, window: Duration) -> usize {
    let script = "exec python3 -u -m http.server {port} --bind 127.0.0.1";
    let live = live_poll.map(|l| format!(", live_poll = \"{l}\"")).unwrap_or_default();
    let config = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[[service]]\nname = \"translation\"\ncommand = [\"sh\", \"-c\", {script:?}]\n\
         readiness = {{ protocol = \"http\", path = \"/\"{live} }}\n\n[[service.model]]\nname = \"nllb\"\n"
    );
    let agent = Agent::spawn_config(BIN, &config).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::Ready)).await;
    let from = events.last().unwrap().seq + 1;
    // A measuring window, not a synchronisation: how often is it probed once READY?
    tokio::time::sleep(window).await;
    let (snapshot, _) = watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await;
    let last = snapshot.next_seq - 1;
    let (_, after) = watch_until(&mut client, from, Duration::from_secs(5), |e| e.seq >= last).await;
    after.iter().filter(|e| matches!(&e.kind, Some(event::Kind::Log(l)) if l.line.contains("\"GET / HTTP"))).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn once_ready_the_service_is_probed_at_a_liveness_cadence() {
    let (default, configured) = tokio::join!(
        probes_after_ready(None, Duration::from_secs(4)),
        probes_after_ready(Some("1s"), Duration::from_secs(4))
    );
    assert!(default <= 1, "at most one probe in 4 s at the 5 s default: {default}");
    assert!((2..=5).contains(&configured), "about one a second with live_poll = 1s: {configured}");
}

/// Ensures a model that hangs while holding memory and waits for its stall.
async fn stall_holding_memory(service_lines: &str) -> (Agent, proto::Snapshot) {
    let service = Service::sim(&["nllb:mb=64,download=100ms,hang=loading"])
        .model_lines(r#"stall = { default = "2s" }"#)
        .service_lines(service_lines);
    let agent = Agent::spawn(BIN, &service).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::Failed)).await;
    // The stop (if any) follows the failure: wait for the service to be gone, or not.
    let (snapshot, _) = watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await;
    let until = Instant::now() + Duration::from_secs(5);
    let mut snapshot = snapshot;
    while snapshot.services[0].running && Instant::now() < until {
        // Bounded re-read of the state (the exit event has no stage of its own here).
        tokio::time::sleep(Duration::from_millis(100)).await;
        snapshot = watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await.0;
    }
    (agent, snapshot)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_load_gives_its_memory_back_unless_told_to_keep_it() {
    let (stopped, kept) =
        tokio::join!(stall_holding_memory(""), stall_holding_memory("stop_after_failed_load = false"));
    let (agent, snapshot) = stopped;
    assert!(!snapshot.services[0].running, "the hung service is stopped");
    assert_eq!(snapshot.services[0].rss_bytes, 0, "its memory came back");
    let model = &snapshot.services[0].models[0];
    assert_eq!(model.stage(), Stage::Failed, "the model still says why: {}", model.message);
    assert!(agent.logs().contains("stopping service"), "{}", agent.logs());
    let (_, snapshot) = kept;
    assert!(snapshot.services[0].running, "kept for inspection when configured");
    assert!(snapshot.services[0].rss_bytes > 0, "still holding its memory");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_field_that_changes_every_poll_does_not_pin_probing_fast() {
    // A hung load whose /health carries the time: every answer differs, the
    // model's status and progress never do. Each request is logged.
    let server = r#"
import http.server, json, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"uptime": time.time(), "models": {"nllb": {"status": "loading", "progress": 0.1}}}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args):
        print("probe", self.path, flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
    let out = Scratch::new("uptime");
    let script = out.write("server.py", server);
    let config = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[[service]]\nname = \"translation\"\ncommand = [\"python3\", \"-u\", {:?}, \"{{port}}\"]\n\n\
         [[service.model]]\nname = \"nllb\"\n",
        script.display().to_string()
    );
    let agent = Agent::spawn_config(BIN, &config).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    let (_, events) =
        watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::LoadingWeights)).await;
    let from = events.last().unwrap().seq + 1;
    // A measuring window: how often is a loading-but-unchanged model probed?
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (snapshot, _) = watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await;
    let last = snapshot.next_seq - 1;
    let (_, after) = watch_until(&mut client, from, Duration::from_secs(5), |e| e.seq >= last).await;
    let probes =
        after.iter().filter(|e| matches!(&e.kind, Some(event::Kind::Log(l)) if l.line.starts_with("probe "))).count();
    // Backed off to the 250 ms ceiling: about 12 in 3 s, not 150 at 20 ms.
    assert!(probes <= 20, "probed {probes} times in 3 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_load_request_is_retried_and_its_refusal_explains_the_failure() {
    // An endpoint-mode service (here a fixture the agent reaches through
    // `base_url`) that refuses to load: busy.
    let service = Fixture::start().await;
    service.set("GET /health", 200, r#"{"status":"healthy","models":{}}"#);
    service.set("POST /models/nllb/load", 503, "busy: another load holds the GPU");
    let config = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[[service]]\nname = \"translation\"\ncommand = [\"sleep\", \"600\"]\n\
         base_url = {:?}\n\n[[service.model]]\nname = \"nllb\"\nload = \"endpoint\"\ntimeout = \"3s\"\n",
        service.url
    );
    let agent = Agent::spawn_config(BIN, &config).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::Failed)).await;
    let tries = service.hits("POST /models/nllb/load");
    assert!((2..=12).contains(&tries), "retried with backoff, not once and not in a tight loop: {tries}");
    let message = stage_event(events.last().unwrap()).unwrap().message.clone();
    assert!(
        message.contains("last load request: 503 Service Unavailable: busy: another load holds the GPU"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_models_memory_growth_does_not_hide_another_models_hang() {
    // nllb loads for 10 s, its memory growing all the while; aya hangs at once.
    let service = Service::sim(&["nllb:mb=256,download=100ms,load=10s", "aya:mb=8,download=100ms,hang=loading"])
        .model_lines(r#"stall = { default = "3s" }"#);
    let agent = Agent::spawn(BIN, &service).await;
    let started = Instant::now();
    let mut client = ensure(&agent, &["nllb", "aya"]).await;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(30), |e| reached(e, "aya", Stage::Failed)).await;
    let took = started.elapsed();
    let message = stage_event(events.last().unwrap()).unwrap().message.clone();
    assert!(took < Duration::from_secs(7), "aya's own stall, not nllb's load time: {took:?}\n{message}");
    let last_progress = message.lines().find(|l| l.contains("last progress:")).unwrap_or_default();
    assert!(last_progress.ends_with("(a stage change)"), "no foreign growth quoted as aya's progress: {message}");
    assert!(message.contains("stalled: no progress for 3s"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_log_is_rotated_by_size_and_still_followed() {
    let script = "i=0; while [ $i -lt 40000 ]; do echo \"filler line $i with some padding to make it longer\"; i=$((i+1)); done; \
                  echo 'after the flood'; exec sleep 600";
    let config = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[[service]]\nname = \"translation\"\ncommand = [\"sh\", \"-c\", {script:?}]\n\
         max_log_mb = 1\n\n[[service.model]]\nname = \"nllb\"\n"
    );
    let agent = Agent::spawn_config(BIN, &config).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    let seen = |e: &Event| matches!(&e.kind, Some(event::Kind::Log(l)) if l.line == "after the flood");
    watch_until(&mut client, 0, Duration::from_secs(30), seen).await;
    let log = agent.scratch.path.join("data/translation.log");
    let size = std::fs::metadata(&log).unwrap().len();
    let rotated = std::fs::metadata(agent.scratch.path.join("data/translation.log.1")).map(|m| m.len()).unwrap_or(0);
    assert!(size < 2 * 1024 * 1024, "the live log stays near its cap: {size} bytes");
    assert!(rotated > 0, "the older part is kept once, as translation.log.1");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_service_with_its_own_health_schema_two_models_one_hanging() {
    // Its own /health: {"engines": {NAME: {"state": ..., "pct": 0-100}}}; one
    // engine loads in about 2 s, the other stops at 40 % for good.
    let server = r#"
import http.server, json, sys, time
start = time.time()
def engines():
    t = time.time() - start
    fast = min(100, int(t * 50))
    return {"fast": {"state": "READY" if fast >= 100 else "LOADING", "pct": fast},
            "stuck": {"state": "LOADING", "pct": min(40, int(t * 50))}}
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"engines": engines(), "uptime_s": time.time() - start}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args):
        pass
print("engines starting", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
    let out = Scratch::new("own-schema");
    let script = out.write("engines.py", server);
    let config = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[[service]]\nname = \"translation\"\ncommand = [\"python3\", \"-u\", {:?}, \"{{port}}\"]\n\
         [service.readiness]\nprotocol = \"health-json\"\npath = \"/health\"\nstatus_pointer = \"/engines/{{model}}/state\"\n\
         progress_pointer = \"/engines/{{model}}/pct\"\nstatus_map = {{ LOADING = \"LOADING_WEIGHTS\", READY = \"READY\" }}\n\n\
         [[service.model]]\nname = \"fast\"\nstall = {{ default = \"3s\" }}\n\n[[service.model]]\nname = \"stuck\"\nstall = {{ default = \"3s\" }}\n",
        script.display().to_string()
    );
    let agent = Agent::spawn_config(BIN, &config).await;
    let started = Instant::now();
    let mut client = ensure(&agent, &["fast", "stuck"]).await;
    let (_, events) =
        watch_until(&mut client, 0, Duration::from_secs(30), |e| reached(e, "stuck", Stage::Failed)).await;
    let took = started.elapsed();
    assert!(events.iter().any(|e| reached(e, "fast", Stage::Ready)), "the healthy engine is READY");
    let half = events.iter().filter_map(stage_event).any(|c| c.model == "fast" && (0.3..0.9).contains(&c.progress));
    assert!(half, "its 0–100 pct is read as progress along the way, not 100 % at once");
    let stuck = stage_event(events.last().unwrap()).unwrap();
    assert!(stuck.message.contains("stalled: no progress for 3s in LOADING_WEIGHTS"), "{}", stuck.message);
    assert!(stuck.message.contains(r#""stuck": {"state": "LOADING", "pct": 40}"#), "its payload: {}", stuck.message);
    assert!(took < Duration::from_secs(9), "stalled on its own limit, not hidden by the other's progress: {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_suites_headroom_counts_in_placement_and_says_so() {
    let service =
        Service::sim(&["nllb:mb=8"]).model_lines("ram_mb = 100").agent_lines("[admission]\nmemory_budget_mb = 300");
    let agent = Agent::spawn(BIN, &service).await;
    let out = Scratch::new("headroom");
    let suite = out.write("t.yaml", &TRANSLATE_SUITE.replace("models: [nllb]\n", "models: [nllb]\nheadroom_mb: 500\n"));
    let result = controller::run(
        RunOptions::new(vec![agent.addr.clone()], vec![suite], out.path.clone()),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(result.exit, Exit::Infrastructure);
    let report = result.report.unwrap();
    let Outcome::Error(message) = &report.cases[0].outcome else { panic!("{:?}", report.cases[0]) };
    assert!(
        message.contains("needs 600 MiB (100 MiB for the models + 500 MiB headroom), can hold at most 300 MiB"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agents_own_probes_never_count_as_progress() {
    // A hung load whose health handler is heavy (60 ms of CPU per answer,
    // and an access-log line): the CPU the agent's own probes cost the
    // service must not keep the hang from being called a stall.
    let service = Service::sim(&["nllb:mb=8,download=100ms,hang=loading,progress=off"])
        .flag("--costly-health")
        .flag("60ms")
        .model_lines(r#"stall = { default = "3s" }"#);
    let agent = Agent::spawn(BIN, &service).await;
    let mut client = ensure(&agent, &["nllb"]).await;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(20), |e| {
        reached(e, "nllb", Stage::Failed) || reached(e, "nllb", Stage::Ready)
    })
    .await;
    let failed = stage_event(events.last().unwrap()).unwrap();
    assert_eq!(failed.to(), Stage::Failed, "the hang is a stall: {failed:?}");
    let took = events.last().unwrap().time_unix_ms - first(&events, "nllb", Stage::LoadingWeights).time_unix_ms;
    assert!(took < 7000, "stalled on its 3 s limit, not kept alive by probe CPU: {took} ms");
    assert!(failed.message.contains("stalled: no progress for 3s in LOADING_WEIGHTS"), "{}", failed.message);
}

/// The `StageChanged` into `stage` of nllb among `events`, with its time.
fn entered(events: &[Event], stage: Stage) -> (proto::StageChanged, i64) {
    events
        .iter()
        .find_map(|e| match &e.kind {
            Some(event::Kind::StageChanged(c)) if c.model == "nllb" && c.to() == stage && c.from != c.to => {
                Some((c.clone(), e.time_unix_ms))
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("nllb never entered {stage:?}"))
}

/// Loads nllb once (from a stopped service) and returns its events.
async fn one_load(client: &mut proto::agent_client::AgentClient<tonic::transport::Channel>, run: &str) -> Vec<Event> {
    let held = lease(client, run).await;
    let (snapshot, _) = watch_until(client, u64::MAX, Duration::from_secs(5), |_| true).await;
    let request =
        proto::EnsureModelsRequest { lease: Some(held.clone()), models: vec!["nllb".into()], ..Default::default() };
    client.ensure_models(request).await.unwrap();
    let (_, events) =
        watch_until(client, snapshot.next_seq, Duration::from_secs(20), |e| reached(e, "nllb", Stage::Ready)).await;
    client.stop_service(proto::StopServiceRequest { lease: Some(held.clone()) }).await.unwrap();
    client.release_lease(held).await.unwrap();
    events
}

/// The agent remembers how long this model's stages took here: the second
/// load's stage changes say how long each usually takes and what follows,
/// within 20 % of what then happens; `proctor run` shows it as an ETA.
#[tokio::test(flavor = "multi_thread")]
async fn the_second_load_of_a_model_comes_with_how_long_its_stages_usually_take_here() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=600ms,load=2s,warmup=300ms"])).await;
    let mut client = agent.client().await;
    let first = one_load(&mut client, "first").await;
    assert_eq!(entered(&first, Stage::LoadingWeights).0.usual_stage_ms, 0, "no history before the first load");
    let second = one_load(&mut client, "second").await;
    let (weights, began) = entered(&second, Stage::LoadingWeights);
    let (_, ended) = entered(&second, Stage::WarmingUp);
    let actual = (ended - began) as f64;
    let usual = weights.usual_stage_ms as f64;
    assert!((actual - usual).abs() <= 0.2 * actual, "usually {usual} ms, took {actual} ms");
    assert!((1600.0..2600.0).contains(&usual), "the 2 s load: {usual}");
    let (_, ready) = entered(&second, Stage::Ready);
    let rest = (ready - ended) as f64;
    assert!(
        (weights.usual_rest_ms as f64 - rest).abs() <= 0.2 * rest + 100.0,
        "rest {} vs {rest}",
        weights.usual_rest_ms
    );
    // The history is the agent's, on disk: a run shows the ETA as it loads.
    let out = Scratch::new("eta");
    let suite = out.write("t.yaml", TRANSLATE_SUITE);
    let run = tokio::process::Command::new(BIN)
        .args(["run", "--agent", &agent.addr, "--progress-interval", "300ms", "--out"])
        .arg(&out.path)
        .arg(&suite)
        .output();
    // While that load is in LOADING_WEIGHTS, `proctor agents` says the same.
    let shown = async {
        let (snapshot, _) = watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await;
        watch_until(&mut client, snapshot.next_seq, Duration::from_secs(20), |e| {
            reached(e, "nllb", Stage::LoadingWeights)
        })
        .await;
        tokio::process::Command::new(BIN).args(["agents", "--agent", &agent.addr]).output().await.unwrap()
    };
    let (o, shown) = tokio::join!(run, shown);
    let o = o.unwrap();
    let listing = String::from_utf8_lossy(&shown.stdout);
    assert!(listing.contains("LOADING_WEIGHTS") && listing.contains("s here, ETA "), "{listing}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains("LOADING_WEIGHTS") && l.contains("usually"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("s here, ETA "), "{line}");
}
