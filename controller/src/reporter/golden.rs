//! Golden-file tests of the reports people and CI read — JUnit, JSON and
//! Markdown — for a passing run, a run whose model failed to load and a run
//! with a re-run, fed through the reporters as `RunEvent`s. The files live in
//! `controller/fixtures/reports/`; times the reporters stamp themselves are
//! zeroed. `PROCTOR_BLESS=1 cargo test -p controller golden` rewrites them
//! after an intended change (review the diff).

use std::path::PathBuf;
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId};

use super::Collected;
use super::json::Json;
use crate::client::Stage;
use crate::report::{CaseReport, Failure, LoadStage, ModelLoad, Outcome};
use crate::run::events::{RunEvent, StageSpan, SuiteInfo};

const MIB: u64 = 1024 * 1024;
const CASES: [&str; 2] = ["english to spanish", "health shows it loaded"];

fn started() -> RunEvent {
    RunEvent::Started {
        run_id: "run-1".into(),
        trace_id: TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
        suites: vec![SuiteInfo {
            name: "translate".into(),
            file: "suites/translate.yaml".into(),
            service: "translation".into(),
            models: vec!["nllb".into()],
            cases: CASES.iter().map(|c| c.to_string()).collect(),
            baseline_tolerance: None,
        }],
        hosts: vec!["gpu-01".into(), "gpu-02".into()],
    }
}

/// A load of nllb on `host` through three stages from t = 1000 ms, ending READY or FAILED.
fn settled(host: &str, failure: Option<&str>) -> RunEvent {
    let spans = [("DOWNLOADING", 1_000, 3_000), ("LOADING_WEIGHTS", 3_000, 9_500), ("WARMING_UP", 9_500, 10_000)];
    let stages: Vec<StageSpan> = spans
        .iter()
        .map(|(s, a, b)| StageSpan {
            stage: Stage::from_str_name(s).unwrap(),
            cause: format!("health: status={}", s.to_lowercase()),
            start_unix_ms: *a,
            end_unix_ms: *b,
            peak_rss_bytes: 800 * MIB,
            peak_gpu_bytes: 0,
        })
        .collect();
    let load = ModelLoad {
        host: host.into(),
        service: "translation".into(),
        model: "nllb".into(),
        failure: failure.map(str::to_owned),
        waited: Duration::from_millis(9_000),
        reused: false,
        peak_rss_bytes: 812 * MIB,
        peak_gpu_bytes: 0,
        stages: stages
            .iter()
            .map(|s| LoadStage {
                stage: s.stage.label().into(),
                duration: Duration::from_millis((s.end_unix_ms - s.start_unix_ms) as u64),
                peak_rss_bytes: s.peak_rss_bytes,
                peak_gpu_bytes: 0,
            })
            .collect(),
    };
    RunEvent::ModelSettled {
        suite: 0,
        try_id: SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        load,
        asked_unix_ms: 1_000,
        stages,
        peak_rss_bytes: 812 * MIB,
    }
}

fn case(index: usize, outcome: Outcome, host: &str, attempt: u32, reruns: &[&str]) -> RunEvent {
    let mut report = CaseReport::error("translate", CASES[index], String::new());
    report.outcome = outcome;
    report.duration = Duration::from_millis(12);
    report.host = host.into();
    report.attempt = attempt;
    report.lease_epoch = attempt.into();
    report.started_unix_ms = 10_100;
    report.method = "POST".into();
    report.url = "http://127.0.0.1:40000/translate".into();
    report.http_status = Some(200);
    report.excerpt = r#"{"translated_text":"hola mundo"}"#.into();
    report.reruns = reruns.iter().map(|r| r.to_string()).collect();
    RunEvent::CaseFinished { suite: 0, case: index, try_id: None, report }
}

fn telemetry(host: &str) -> RunEvent {
    RunEvent::Telemetry { host: host.into(), service: "translation".into(), rss_bytes: 812 * MIB, gpu_bytes: 0 }
}

fn finished() -> RunEvent {
    RunEvent::Finished { duration: Duration::from_millis(10_400), interrupted: false }
}

pub(crate) fn scenarios() -> Vec<(&'static str, Vec<RunEvent>)> {
    let wrong = Outcome::Failed(vec![Failure {
        check: "equals".into(),
        pointer: "/translated_text".into(),
        expected: "\"bonjour\"".into(),
        actual: "\"hola mundo\"".into(),
    }]);
    let story = "model nllb failed in stage LOADING_WEIGHTS after 6.5s: process exited: CRASHED(3)\n  \
                 the service logged: RuntimeError: weights corrupt";
    let lost = "host gpu-01 lost: no answer for 20s";
    vec![
        (
            "passing",
            vec![
                started(),
                telemetry("gpu-01"),
                settled("gpu-01", None),
                case(0, wrong, "gpu-01", 1, &[]),
                case(1, Outcome::Passed, "gpu-01", 1, &[]),
                finished(),
            ],
        ),
        (
            "failed-load",
            vec![
                started(),
                settled("gpu-01", Some(story)),
                case(0, Outcome::Error(story.into()), "gpu-01", 1, &[]),
                case(1, Outcome::Error(story.into()), "gpu-01", 1, &[]),
                finished(),
            ],
        ),
        (
            "rerun",
            vec![
                started(),
                RunEvent::HostLost { host: "gpu-01".into(), reason: "no answer for 20s".into() },
                settled("gpu-02", None),
                case(0, Outcome::Passed, "gpu-02", 2, &[lost]),
                case(1, Outcome::Error("interrupted before the case finished".into()), "gpu-02", 2, &[lost]),
                finished(),
            ],
        ),
    ]
}

/// Times the reporters stamp from the clock, zeroed.
fn redact(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "at_unix_ms" || key == "started_unix_ms" {
                    *v = serde_json::Value::from(0);
                } else {
                    redact(v);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

fn check(name: &str, got: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/reports").join(name);
    if std::env::var_os("PROCTOR_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{}: {e} (PROCTOR_BLESS=1 cargo test -p controller golden writes it)", path.display())
    });
    assert_eq!(got, want, "{} changed: review, then PROCTOR_BLESS=1 cargo test -p controller golden", path.display());
}

#[test]
fn golden_reports_for_a_passing_run_a_failed_load_and_a_rerun() {
    for (name, events) in scenarios() {
        let mut collected = Collected::default();
        let mut json = Json::new(std::path::Path::new("/nonexistent"));
        for e in &events {
            collected.on(e);
            json.on(e, 0);
        }
        let report = collected.report("no result: the run ended before this case ran");
        check(&format!("{name}.junit.xml"), &report.junit());
        check(&format!("{name}.summary.md"), &report.markdown());
        let mut doc = serde_json::to_value(json.document(&report)).unwrap();
        redact(&mut doc);
        check(&format!("{name}.report.json"), &(serde_json::to_string_pretty(&doc).unwrap() + "\n"));
    }
}

/// What one case costs the trace file: a case span carries what a reader
/// of the trace needs (name, attempt, outcome, method, URL, server, status)
/// and nothing a default already says. Measured at 1,000 cases.
#[tokio::test(flavor = "multi_thread")]
async fn a_case_span_costs_the_trace_file_a_few_hundred_bytes() {
    const N: usize = 1_000;
    let mut first = started();
    if let RunEvent::Started { suites, .. } = &mut first {
        suites[0].cases = (0..N).map(|i| format!("case {i}")).collect();
    }
    let mut trace = super::trace::Trace::new(&crate::otel::OtelConfig::default());
    trace.on(&first);
    let bare = {
        let dir = std::env::temp_dir().join(format!("proctor-trace-bare-{}", std::process::id()));
        let mut empty = super::trace::Trace::new(&crate::otel::OtelConfig::default());
        empty.on(&first);
        empty.on(&finished());
        let (path, _) = empty.finish(&dir).await;
        let bytes = std::fs::metadata(path.unwrap()).unwrap().len();
        let _ = std::fs::remove_dir_all(dir);
        bytes
    };
    for i in 0..N {
        let mut event = case(0, Outcome::Passed, "gpu-01", 1, &[]);
        if let RunEvent::CaseFinished { case, report, .. } = &mut event {
            *case = i;
            report.name = format!("case {i}");
        }
        trace.on(&event);
    }
    trace.on(&finished());
    let dir = std::env::temp_dir().join(format!("proctor-trace-{}", std::process::id()));
    let (path, _) = trace.finish(&dir).await;
    let text = std::fs::read_to_string(path.unwrap()).unwrap();
    let per_case = (text.len() as u64 - bare) / N as u64;
    // 2154 bytes before: pretty-printed, every default written out, the
    // latency twice. Now 679: the attributes themselves, in OTLP's own JSON.
    assert!(per_case <= 700, "{per_case} bytes per case span");
    let back: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest =
        serde_json::from_str(&text).unwrap();
    let spans: Vec<_> = back.resource_spans.iter().flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans).collect();
    let one = spans.iter().find(|s| s.name == "case case 7").expect("every case span is there");
    let keys: Vec<&str> = one.attributes.iter().map(|a| a.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "proctor.case.name",
            "proctor.case.attempt",
            "proctor.case.outcome",
            "http.request.method",
            "url.full",
            "server.address",
            "http.response.status_code"
        ]
    );
    assert_eq!(one.end_time_unix_nano - one.start_time_unix_nano, 12_000_000, "the latency is the span's length");
    let _ = std::fs::remove_dir_all(dir);
}
