//! The controller in-process against a real agent process.

use std::time::Duration;

use controller::report::Outcome;
use controller::{Exit, RunOptions};
use testkit::{Agent, Scratch, Service};
use tokio_util::sync::CancellationToken;

use crate::BIN;

pub const TRANSLATE_SUITE: &str = "\
name: translate
service: translation
models: [nllb]
cases:
  - name: english to spanish
    request:
      method: POST
      path: /translate
      json: {text: Hello world, source_lang: en, target_lang: es, model: nllb}
    expect:
      status: 200
      json:
        - {pointer: /translated_text, equals: hola mundo}
        - {pointer: /model, equals: nllb}
  - name: health shows it loaded
    request: {method: GET, path: /health}
    expect:
      json:
        - {pointer: /models/nllb/status, equals: loaded}
";

fn options(agent: &Agent, suites: Vec<std::path::PathBuf>, out: &Scratch) -> RunOptions {
    RunOptions::new(vec![agent.addr.clone()], suites, out.path.clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_model_is_waited_for_and_then_its_cases_pass() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=16,download=500ms,load=2s,warmup=300ms"])).await;
    let out = Scratch::new("slow-model");
    let suite = out.write("translate.yaml", TRANSLATE_SUITE);
    let result = controller::run(options(&agent, vec![suite], &out), CancellationToken::new()).await;
    let report = result.report.expect("a report");
    assert_eq!(result.exit, Exit::Passed, "{}", report.summary());
    assert_eq!(report.cases.len(), 2);
    assert!(report.cases.iter().all(|c| c.outcome == Outcome::Passed));
    let load = &report.loads[0];
    assert_eq!(load.failure, None);
    assert!(load.waited >= Duration::from_millis(2500), "the run waited for the whole load: {:?}", load.waited);
    let junit = crate::read_junit(&result.junit.unwrap());
    assert_eq!(junit.matches("<testcase ").count(), 2, "{junit}");
    assert!(!junit.contains("<failure") && !junit.contains("<error") && !junit.contains("<skipped"), "{junit}");
    // The suite's properties tell its model's load: host, outcome, time, peaks, each stage.
    let props = suite_properties(&junit, "translate");
    let prop = |name: &str| props.get(name).unwrap_or_else(|| panic!("no property {name}: {props:?}")).clone();
    assert_eq!(prop("proctor.model.nllb.outcome"), "ready");
    assert!(!prop("proctor.model.nllb.host").is_empty());
    assert!(prop("proctor.model.nllb.load_seconds").parse::<f64>().unwrap() >= 2.5, "{props:?}");
    let weights: f64 = prop("proctor.model.nllb.stage.LOADING_WEIGHTS.seconds").parse().unwrap();
    assert!((1.9..3.0).contains(&weights), "the 2 s load stage: {weights}");
    assert!(prop("proctor.model.nllb.stage.LOADING_WEIGHTS.peak_rss_mib").parse::<u64>().unwrap() >= 16, "{props:?}");
    for stage in ["PROCESS_STARTING", "WAITING_FOR_HTTP", "DOWNLOADING", "WARMING_UP"] {
        assert!(props.contains_key(&format!("proctor.model.nllb.stage.{stage}.seconds")), "{stage}: {props:?}");
    }
    // The JSON report holds the same run, in its documented shape.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(result.files.json.unwrap()).unwrap()).unwrap();
    assert_eq!((json["schema"].as_str(), json["schema_version"].as_u64()), (Some("proctor.report"), Some(1)));
    assert_eq!(json["totals"]["passed"], 2, "{json:#}");
    assert_eq!(json["suites"][0]["cases"].as_array().unwrap().len(), 2);
    assert_eq!(json["cases"][0]["outcome"], "passed");
    assert_eq!(json["cases"][0]["attempt"], 1);
    let stages: Vec<&str> =
        json["loads"][0]["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(stages.first(), Some(&"PROCESS_STARTING"), "{stages:?}");
    assert_eq!(json["loads"][0]["outcome"], "ready");
    let samples = json["memory"].as_array().unwrap();
    assert!(samples.iter().any(|m| m["service"] == "translation" && m["rss_bytes"].as_u64() > Some(0)), "{samples:?}");
    assert_eq!(json["hosts"].as_array().unwrap().len(), 1);
    // And the Markdown summary for CI.
    let md = std::fs::read_to_string(result.files.markdown.unwrap()).unwrap();
    assert!(md.contains(": PASSED") && md.contains("| translate | "), "{md}");
    assert!(md.contains("/translation/nllb | READY | ") && md.contains("LOADING_WEIGHTS 2."), "{md}");
}

/// The `<property>`s of one `<testsuite>` itself (not of its test cases), by name.
pub fn suite_properties(xml: &str, suite: &str) -> std::collections::BTreeMap<String, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let (mut in_suite, mut in_case) = (false, false);
    let mut found = std::collections::BTreeMap::new();
    let attr = |e: &quick_xml::events::BytesStart<'_>, key: &str| {
        e.attributes()
            .flatten()
            .find(|a| a.key.as_ref() == key.as_bytes())
            .map(|a| a.normalized_value(quick_xml::XmlVersion::Implicit1_0).unwrap().into_owned())
    };
    loop {
        match reader.read_event().expect("well-formed JUnit XML") {
            Event::Start(e) if e.name().as_ref() == b"testsuite" => {
                in_suite = attr(&e, "name").as_deref() == Some(suite);
            }
            Event::End(e) if e.name().as_ref() == b"testsuite" => in_suite = false,
            Event::Start(e) if e.name().as_ref() == b"testcase" => in_case = true,
            Event::End(e) if e.name().as_ref() == b"testcase" => in_case = false,
            Event::Empty(e) if e.name().as_ref() == b"property" && in_suite && !in_case => {
                found.insert(attr(&e, "name").unwrap(), attr(&e, "value").unwrap());
            }
            Event::Eof => return found,
            _ => {}
        }
    }
}

/// A run that attaches to a load already under way (another client started
/// it) still reports the whole load: every stage from its real start.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_attaching_mid_load_gets_every_stage_of_it() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=300ms,load=3s,warmup=100ms"])).await;
    let mut client = agent.client().await;
    let held = crate::lease(&mut client, "earlier-run").await;
    let request =
        proto::EnsureModelsRequest { lease: Some(held.clone()), models: vec!["nllb".into()], ..Default::default() };
    client.ensure_models(request).await.unwrap();
    crate::watch_until(&mut client, 0, Duration::from_secs(20), |e| {
        crate::reached(e, "nllb", proto::Stage::LoadingWeights)
    })
    .await;
    client.release_lease(held).await.unwrap();
    // Now a run asks for the model, mid-load.
    let out = Scratch::new("mid-load");
    let suite = out.write("translate.yaml", TRANSLATE_SUITE);
    let result = controller::run(options(&agent, vec![suite], &out), CancellationToken::new()).await;
    let report = result.report.expect("a report");
    assert_eq!(result.exit, Exit::Passed, "{}", report.summary());
    let stages: Vec<&str> = report.loads[0].stages.iter().map(|s| s.stage.as_str()).collect();
    // (A 100 ms warm-up may pass between two probes: WARMING_UP is not asked for.)
    assert_eq!(
        stages[..4],
        ["PROCESS_STARTING", "WAITING_FOR_HTTP", "DOWNLOADING", "LOADING_WEIGHTS"],
        "the whole load, not only what followed the ask"
    );
    let weights = &report.loads[0].stages[3];
    assert!(weights.duration >= Duration::from_millis(2900), "its real length: {weights:?}");
    let junit = crate::read_junit(&result.junit.unwrap());
    let props = suite_properties(&junit, "translate");
    assert!(props.contains_key("proctor.model.nllb.stage.DOWNLOADING.seconds"), "{props:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_crashes_while_loading_turns_its_cases_into_errors_with_the_stage() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=16,download=200ms,load=1s,crash=loading"])).await;
    let out = Scratch::new("crash");
    let suite = out.write("translate.yaml", TRANSLATE_SUITE);
    let result = controller::run(options(&agent, vec![suite], &out), CancellationToken::new()).await;
    assert_eq!(result.exit, Exit::Infrastructure);
    let report = result.report.unwrap();
    for case in &report.cases {
        let Outcome::Error(message) = &case.outcome else { panic!("{case:?} should be an error") };
        assert!(message.contains("model nllb failed in stage LOADING_WEIGHTS"), "{message}");
        assert!(message.contains("CRASHED(3)"), "{message}");
        assert!(message.contains("injected crash"), "the last log lines are included: {message}");
    }
    // A failed load in the reports people read: errors with the story, never skips.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(result.files.json.unwrap()).unwrap()).unwrap();
    assert_eq!((json["totals"]["errors"].as_u64(), json["loads"][0]["outcome"].as_str()), (Some(2), Some("failed")));
    assert!(json["cases"][0]["message"].as_str().unwrap().contains("model nllb failed in stage LOADING_WEIGHTS"));
    assert!(json["loads"][0]["failure"].as_str().unwrap().contains("CRASHED(3)"), "{json:#}");
    let md = std::fs::read_to_string(result.files.markdown.unwrap()).unwrap();
    assert!(
        md.contains(": ERRORS") && md.contains("### Not passed") && md.contains("| FAILED: model nllb failed"),
        "{md}"
    );
    crate::read_junit(&out.path.join("junit.xml"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_load_times_out_naming_the_stage() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=16,download=100ms,hang=loading"])).await;
    let out = Scratch::new("hang");
    let suite = out.write("translate.yaml", TRANSLATE_SUITE);
    let opts = RunOptions { model_timeout: Some(Duration::from_secs(2)), ..options(&agent, vec![suite], &out) };
    let result = controller::run(opts, CancellationToken::new()).await;
    assert_eq!(result.exit, Exit::Infrastructure);
    let report = result.report.unwrap();
    let load = &report.loads[0];
    assert!(load.waited >= Duration::from_secs(2) && load.waited < Duration::from_secs(10), "{:?}", load.waited);
    let Outcome::Error(message) = &report.cases[0].outcome else { panic!("{:?}", report.cases[0]) };
    assert!(message.starts_with("model nllb failed in stage LOADING_WEIGHTS"), "{message}");
    assert!(message.contains("load timed out after 2s (the limit was set by --model-timeout;"), "{message}");
    assert!(message.contains("last health payload: {"), "{message}");
    assert!(message.contains("injected hang"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoint_models_are_loaded_on_request() {
    let service = Service::sim(&["nllb:mb=8,download=100ms,load=300ms,warmup=100ms"]).load_mode("endpoint");
    let agent = Agent::spawn(BIN, &service).await;
    let out = Scratch::new("endpoint");
    let suite = out.write("translate.yaml", TRANSLATE_SUITE);
    let result = controller::run(options(&agent, vec![suite], &out), CancellationToken::new()).await;
    let report = result.report.unwrap();
    assert_eq!(result.exit, Exit::Passed, "{}", report.summary());
}

/// The schema the tests hold junit.xml to is not vacuous: what the JUnit
/// crate Proctor used before wrote (`skipped` on `<testsuites>`, properties
/// inside a `<testcase>`, a re-run without its type) is refused.
#[test]
fn the_junit_schema_refuses_what_ci_servers_reject() {
    let out = Scratch::new("junit-schema");
    let valid = "<testsuites name=\"proctor\" tests=\"1\" failures=\"0\" errors=\"0\" time=\"0.1\">\
                 <testsuite name=\"s\" tests=\"1\" failures=\"0\" errors=\"0\"><testcase name=\"c\"/></testsuite></testsuites>";
    let invalid = [
        valid.replace("time=\"0.1\">", "time=\"0.1\" skipped=\"0\">"),
        valid.replace(
            "<testcase name=\"c\"/>",
            "<testcase name=\"c\"><properties><property name=\"host\" value=\"h\"/></properties></testcase>",
        ),
        valid.replace("<testcase name=\"c\"/>", "<testcase name=\"c\"><flakyError message=\"lost\"/></testcase>"),
        valid.replace(" failures=\"0\" errors=\"0\"><testcase", "><testcase"),
    ];
    let schema = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/junit.xsd");
    let lint = |text: &str| {
        let file = out.write("junit.xml", text);
        std::process::Command::new("xmllint").args(["--noout", "--schema"]).arg(&schema).arg(file).output().unwrap()
    };
    assert!(lint(valid).status.success(), "{:?}", lint(valid));
    for text in invalid {
        assert!(!lint(&text).status.success(), "accepted: {text}");
    }
}

/// Four cases the sim answers after 1 s each.
fn four_slow_cases(parallel: &str) -> String {
    let mut text = format!("name: slow\nservice: translation\nmodels: [nllb]\n{parallel}cases:\n");
    for name in ["one", "two", "three", "four"] {
        text.push_str(&format!(
            "  - name: {name}\n    request: {{method: POST, path: /translate, json: {{text: Hello, source_lang: en, \
             target_lang: es, model: nllb}}}}\n    expect: {{status: 200}}\n"
        ));
    }
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parallel_suite_runs_its_cases_at_once_and_reports_them_in_order() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=200ms"]).flag("--slow-requests=1s")).await;
    for (parallel, together) in [("parallel: 4\n", true), ("", false)] {
        let out = Scratch::new("parallel");
        let suite = out.write("slow.yaml", &four_slow_cases(parallel));
        let result = controller::run(options(&agent, vec![suite], &out), CancellationToken::new()).await;
        let report = result.report.unwrap();
        assert_eq!(result.exit, Exit::Passed, "{}", report.summary());
        let names: Vec<&str> = report.cases.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["one", "two", "three", "four"], "case order, whatever finished first");
        let starts: Vec<i64> = report.cases.iter().map(|c| c.started_unix_ms).collect();
        let spread = starts.iter().max().unwrap() - starts.iter().min().unwrap();
        if together {
            assert!(spread < 900, "all four sent within the first answer's second: {starts:?}");
        } else {
            assert!(spread >= 2_900, "one after another, a second each: {starts:?}");
        }
        let junit = crate::read_junit(&out.path.join("junit.xml"));
        let order: Vec<usize> = names.iter().map(|n| junit.find(&format!("name=\"{n}\"")).unwrap()).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "JUnit in case order");
    }
}
