//! One run, one trace: a real run against the sim, exported over OTLP to an
//! in-process receiver (gRPC and HTTP/protobuf), and the trace file.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use controller::otel::OtelConfig;
use controller::{Exit, RunOptions};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{Span, status::StatusCode};
use testkit::{Agent, OtlpReceiver, Scratch, Service};
use tokio_util::sync::CancellationToken;

use crate::BIN;
use crate::run::TRANSLATE_SUITE;

const CANARY: &str = "hf_canary_secret_7f3a9e";

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()).and_then(|v| v.value.as_ref()).map(
        |v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            Value::DoubleValue(d) => d.to_string(),
            Value::BoolValue(b) => b.to_string(),
            other => format!("{other:?}"),
        },
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A suite with a passing and a failing case, against a model that loads.
fn suite() -> String {
    format!(
        "{TRANSLATE_SUITE}  - name: wrong on purpose\n    request:\n      method: POST\n      path: /translate\n      \
         json: {{text: Hello world, source_lang: en, target_lang: es, model: nllb}}\n    expect:\n      json:\n        \
         - {{pointer: /translated_text, equals: bonjour}}\n"
    )
}

/// A stage span says what the stage cost the service at its peak.
fn says_what_it_cost(stage: &Span) {
    let peak = attr(stage, "proctor.stage.peak_rss_bytes").and_then(|v| v.parse::<u64>().ok());
    assert!(peak.is_some_and(|b| b > 8 * 1024 * 1024), "{:?}", stage.attributes);
    assert_eq!(attr(stage, "proctor.stage.peak_gpu_bytes").as_deref(), Some("0"), "no GPU here");
}

async fn traced_run(protocol: &str) -> (OtlpReceiver, Scratch, Agent, controller::RunResult) {
    let receiver = OtlpReceiver::start().await;
    let service = Service::sim(&["nllb:mb=8,download=300ms,load=600ms,warmup=200ms"]).secret("HF_TOKEN", CANARY);
    let agent = Agent::spawn(BIN, &service).await;
    let out = Scratch::new("trace");
    let endpoint = if protocol == "grpc" { receiver.grpc_url.clone() } else { receiver.http_url.clone() };
    let opts = RunOptions {
        otel: OtelConfig { endpoint: Some(endpoint), protocol: Some(protocol.into()) },
        ..RunOptions::new(vec![agent.addr.clone()], vec![out.write("t.yaml", &suite())], out.path.clone())
    };
    let result = controller::run(opts, CancellationToken::new()).await;
    (receiver, out, agent, result)
}

/// Stage spans: in stage order, inside their load, not overlapping, and each
/// saying what it cost.
fn stage_spans_are_ordered_inside_their_load(spans: &[Span], load: &Span) {
    let mut stages: Vec<&Span> = spans.iter().filter(|s| s.parent_span_id == load.span_id).collect();
    stages.sort_by_key(|s| s.start_time_unix_nano);
    let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["PROCESS_STARTING", "WAITING_FOR_HTTP", "DOWNLOADING", "LOADING_WEIGHTS", "WARMING_UP"]);
    for pair in stages.windows(2) {
        assert!(
            pair[0].end_time_unix_nano <= pair[1].start_time_unix_nano,
            "{} overlaps {}",
            pair[0].name,
            pair[1].name
        );
    }
    let slack = 50_000_000; // 50 ms of clock-offset estimate
    assert!(stages[0].start_time_unix_nano + slack >= load.start_time_unix_nano);
    assert!(stages.last().unwrap().end_time_unix_nano <= load.end_time_unix_nano + slack);
    let loading = stages.iter().find(|s| s.name == "LOADING_WEIGHTS").unwrap();
    let ms = (loading.end_time_unix_nano - loading.start_time_unix_nano) / 1_000_000;
    assert!((400..1200).contains(&ms), "LOADING_WEIGHTS took the sim's 600 ms: {ms} ms");
    says_what_it_cost(loading);
}

fn the_trace_file_holds_the_same_spans(out: &Scratch, spans: &[Span]) {
    let file = std::fs::read_to_string(out.path.join("trace.json")).unwrap();
    let back: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest =
        serde_json::from_str(&file).unwrap();
    let from_file: BTreeSet<(String, String)> = back
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .map(|s| (hex(&s.span_id), s.name.clone()))
        .collect();
    let received: BTreeSet<(String, String)> = spans.iter().map(|s| (hex(&s.span_id), s.name.clone())).collect();
    assert_eq!(from_file, received);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_is_one_connected_trace_over_grpc() {
    let (receiver, out, agent, result) = traced_run("grpc").await;
    assert_eq!(result.exit, Exit::TestFailures, "one case fails on purpose");
    let spans = receiver.spans();
    assert!(!spans.is_empty(), "spans were exported");

    // One trace, one root, every parent present.
    let traces: BTreeSet<String> = spans.iter().map(|s| hex(&s.trace_id)).collect();
    assert_eq!(traces.len(), 1, "one trace id: {traces:?}");
    let by_id: BTreeMap<Vec<u8>, &Span> = spans.iter().map(|s| (s.span_id.clone(), s)).collect();
    let roots: Vec<&Span> = spans.iter().filter(|s| s.parent_span_id.is_empty()).collect();
    assert_eq!(roots.len(), 1);
    assert_eq!(roots[0].name, "run");
    for s in &spans {
        assert!(s.parent_span_id.is_empty() || by_id.contains_key(&s.parent_span_id), "parent of {} present", s.name);
    }
    let parent = |s: &Span| by_id[&s.parent_span_id].name.clone();

    // run → suite → lease → {model.load, cases}
    let suite = spans.iter().find(|s| s.name == "suite").unwrap();
    assert_eq!(parent(suite), "run");
    let lease = spans.iter().find(|s| s.name == "lease").unwrap();
    assert_eq!(parent(lease), "suite");
    assert_eq!(attr(lease, "proctor.host").as_deref(), Some(agent.addr.as_str()));
    let load = spans.iter().find(|s| s.name == "model.load").unwrap();
    assert_eq!(load.parent_span_id, lease.span_id);
    assert_eq!(attr(load, "proctor.model").as_deref(), Some("nllb"));
    assert_eq!(attr(load, "proctor.load.outcome").as_deref(), Some("ready"));
    assert!(attr(load, "proctor.load.peak_rss_bytes").is_some());
    let cases: Vec<&Span> = spans.iter().filter(|s| s.name.starts_with("case ")).collect();
    assert_eq!(cases.len(), 3);
    assert!(cases.iter().all(|c| c.parent_span_id == lease.span_id), "cases are siblings of model.load");

    stage_spans_are_ordered_inside_their_load(&spans, load);

    // Case attributes, and the failing case's error status.
    let ok = cases.iter().find(|c| c.name == "case english to spanish").unwrap();
    assert_eq!(attr(ok, "http.request.method").as_deref(), Some("POST"));
    assert!(attr(ok, "url.full").unwrap().ends_with("/translate"));
    assert_eq!(attr(ok, "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attr(ok, "server.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(attr(ok, "proctor.case.outcome").as_deref(), Some("passed"));
    let bad = cases.iter().find(|c| c.name == "case wrong on purpose").unwrap();
    let status = bad.status.as_ref().unwrap();
    assert_eq!(status.code, StatusCode::Error as i32);
    assert!(status.message.contains("equals at /translated_text: expected \"bonjour\""), "{}", status.message);

    // The service received the case's traceparent: its spans would join.
    let log = std::fs::read_to_string(agent.scratch.path.join("data/translation.log")).unwrap();
    let trace_id = traces.iter().next().unwrap();
    assert!(log.contains(&format!("/translate traceparent=00-{trace_id}-{}-01", hex(&ok.span_id))), "{log}");

    // No secret in any attribute, anywhere.
    let all = serde_json::to_string(&receiver.requests()).unwrap();
    assert!(!all.contains(CANARY), "the agent's secret leaked into the trace");

    the_trace_file_holds_the_same_spans(&out, &spans);
}

#[tokio::test(flavor = "multi_thread")]
async fn http_protobuf_export_works_too() {
    let (receiver, _out, _agent, result) = traced_run("http/protobuf").await;
    assert_eq!(result.exit, Exit::TestFailures);
    let spans = receiver.spans();
    assert!(spans.iter().any(|s| s.name == "run") && spans.iter().any(|s| s.name == "model.load"), "{}", spans.len());
    let traces: BTreeSet<Vec<u8>> = spans.iter().map(|s| s.trace_id.clone()).collect();
    assert_eq!(traces.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_collector_never_fails_the_run_and_the_flush_is_bounded() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=100ms,load=100ms,warmup=100ms"])).await;
    let out = Scratch::new("trace-unreachable");
    // A collector that accepts connections and then never answers: the
    // export can only end by its deadline.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let opts = RunOptions {
        otel: OtelConfig { endpoint: Some(endpoint), protocol: Some("grpc".into()) },
        ..RunOptions::new(vec![agent.addr.clone()], vec![out.write("t.yaml", TRANSLATE_SUITE)], out.path.clone())
    };
    let started = Instant::now();
    let result = controller::run(opts, CancellationToken::new()).await;
    assert_eq!(result.exit, Exit::Passed);
    assert!(
        started.elapsed() < controller::otel::FLUSH_DEADLINE + Duration::from_secs(6),
        "the final flush gave up in time: {:?}",
        started.elapsed()
    );
    assert!(out.path.join("trace.json").exists(), "the trace file is written anyway");
    drop(silent);
}

#[test]
fn the_compose_file_exposes_the_ports_the_docs_name() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let compose: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(root.join("deploy/docker-compose.yml")).unwrap()).unwrap();
    let ports: Vec<String> = compose["services"]["jaeger"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    let docs = std::fs::read_to_string(root.join("docs/tracing.md")).unwrap();
    for (port, what) in [("4317", "OTLP gRPC"), ("4318", "OTLP HTTP"), ("16686", "Jaeger UI")] {
        assert!(ports.iter().any(|p| p.ends_with(&format!(":{port}"))), "compose publishes {port} ({what}): {ports:?}");
        assert!(docs.contains(port), "docs/tracing.md names port {port} ({what})");
    }
    assert!(compose["services"]["jaeger"]["image"].as_str().unwrap().starts_with("jaegertracing/"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_standard_otel_variables_configure_the_cli() {
    let receiver = OtlpReceiver::start().await;
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=100ms,load=100ms,warmup=100ms"])).await;
    let out = Scratch::new("trace-env");
    let suite = out.write("t.yaml", TRANSLATE_SUITE);
    // The generic endpoint: the HTTP exporter adds /v1/traces itself.
    let base = receiver.http_url.trim_end_matches("/v1/traces").to_owned();
    let o = tokio::process::Command::new(BIN)
        .args(["run", "--agent", &agent.addr, "--progress", "none", "--out"])
        .arg(&out.path)
        .arg(&suite)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &base)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_SERVICE_NAME", "nlp-ci")
        .env("OTEL_RESOURCE_ATTRIBUTES", "team=nlp,ci.job=1234")
        .output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let requests = receiver.requests();
    assert!(!requests.is_empty(), "exported over HTTP/protobuf to the env's endpoint");
    let resource = requests[0].resource_spans[0].resource.clone().unwrap();
    let get = |k: &str| {
        resource.attributes.iter().find(|a| a.key == k).and_then(|a| a.value.clone()).and_then(|v| v.value).map(|v| {
            match v {
                Value::StringValue(s) => s,
                other => format!("{other:?}"),
            }
        })
    };
    assert_eq!(get("service.name").as_deref(), Some("nlp-ci"));
    assert_eq!(get("team").as_deref(), Some("nlp"));
    assert_eq!(get("ci.job").as_deref(), Some("1234"));
}
