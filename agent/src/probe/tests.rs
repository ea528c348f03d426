//! Each protocol read against golden responses from its project's documents
//! (see `agent/fixtures/readiness/README.md` for sources), in loading, ready
//! and error states.

use super::*;

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/readiness/", $name)).to_vec()
    };
}

fn named(pairs: &[(&str, &str)]) -> Vec<Named> {
    pairs.iter().map(|(n, s)| Named { name: n.to_string(), served_as: s.to_string() }).collect()
}

fn ok(code: u16, body: Vec<u8>) -> Answer {
    Ok((code, body))
}

fn refused() -> Answer {
    Err("connection refused".into())
}

/// (model, stage) pairs read; models the protocol says nothing about are absent.
fn stages(reading: &Reading) -> Vec<(String, Option<Stage>)> {
    reading.models.iter().map(|(k, v)| (k.clone(), v.stage)).collect()
}

fn pairs(list: &[(&str, Option<Stage>)]) -> Vec<(String, Option<Stage>)> {
    list.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn health_json() -> Protocol {
    Protocol::HealthJson(HealthJson {
        path: "/health".into(),
        status_pointer: "/models/{model}/status".into(),
        progress_pointer: "/models/{model}/progress".into(),
        progress_scale: ProgressScale::Auto,
        error_pointer: "/models/{model}/error".into(),
        map: HealthJson::default_map(),
    })
}

#[test]
fn health_json_loading_loaded_failed() {
    let p = health_json();
    let models = named(&[("nllb", "nllb"), ("aya", "aya")]);
    assert_eq!(p.paths(&models), vec!["/health"]);

    let r = p.read(&models, &[ok(200, fixture!("health-json-loading.json"))]);
    assert!(r.up);
    assert_eq!(stages(&r), pairs(&[("aya", Some(Stage::Authenticating)), ("nllb", Some(Stage::LoadingWeights))]));
    assert_eq!(r.models["nllb"].progress, 0.42);

    let r = p.read(&models, &[ok(200, fixture!("health-json-loaded.json"))]);
    assert_eq!(stages(&r), pairs(&[("aya", Some(Stage::Ready)), ("nllb", Some(Stage::Ready))]));

    let r = p.read(&models, &[ok(200, fixture!("health-json-failed.json"))]);
    assert_eq!(r.models["aya"].stage, Some(Stage::Failed));
    assert!(r.models["aya"].error.as_deref().unwrap().contains("HF_TOKEN is not set"));

    let r = p.read(&models, &[refused()]);
    assert!(!r.up && r.models.is_empty());
}

#[test]
fn health_json_with_custom_pointers_and_map() {
    let mut map = BTreeMap::new();
    map.insert("READY".to_owned(), Stage::Ready);
    map.insert("FETCHING".to_owned(), Stage::Downloading);
    let p = Protocol::HealthJson(HealthJson {
        path: "/status".into(),
        status_pointer: "/engines/{model}/state".into(),
        progress_pointer: "/engines/{model}/pct".into(),
        error_pointer: "/engines/{model}/err".into(),
        map,
        progress_scale: ProgressScale::Auto,
    });
    // A served name with a slash is escaped as a pointer token (RFC 6901).
    let models = named(&[("llama", "meta/llama")]);
    let body = br#"{"engines": {"meta/llama": {"state": "FETCHING", "pct": 0.5}}}"#.to_vec();
    let r = p.read(&models, &[ok(200, body)]);
    assert_eq!(stages(&r), pairs(&[("llama", Some(Stage::Downloading))]));
}

#[test]
fn kserve_v2_live_then_model_ready() {
    let p = Protocol::KserveV2;
    let models = named(&[("densenet", "densenet_onnx")]);
    assert_eq!(p.paths(&models), vec!["/v2/health/live", "/v2/models/densenet_onnx/ready"]);
    // Not listening yet.
    assert!(!p.read(&models, &[refused(), refused()]).up);
    // Live, model not ready: KServe answers 503 with an error object (Triton: 400).
    let r = p.read(&models, &[ok(200, vec![]), ok(503, fixture!("kserve-v2-model-not-ready.json"))]);
    assert_eq!(stages(&r), pairs(&[("densenet", Some(Stage::LoadingWeights))]));
    // Live and ready: 200 with no body, as the protocol specifies.
    let r = p.read(&models, &[ok(200, vec![]), ok(200, vec![])]);
    assert_eq!(stages(&r), pairs(&[("densenet", Some(Stage::Ready))]));
}

#[test]
fn openai_health_and_model_listing() {
    let p = Protocol::OpenAi;
    let models = named(&[("opt", "facebook/opt-125m"), ("other", "mistral-7b")]);
    assert_eq!(p.paths(&models), vec!["/health", "/v1/models"]);
    // vLLM does not listen until its model is loaded.
    assert!(p.read(&models, &[refused(), refused()]).models.is_empty());
    let r = p.read(&models, &[ok(200, vec![]), ok(200, fixture!("openai-v1-models.json"))]);
    assert_eq!(stages(&r), pairs(&[("opt", Some(Stage::Ready)), ("other", Some(Stage::LoadingWeights))]));
    // A server that answers while loading.
    let r = p.read(&models, &[ok(503, br#"{"error": {"message": "Loading model"}}"#.to_vec()), refused()]);
    assert_eq!(r.models["opt"].stage, Some(Stage::LoadingWeights));
    assert_eq!(r.models["opt"].error.as_deref(), Some("Loading model"));
}

#[test]
fn tgi_health_and_info() {
    let p = Protocol::Tgi;
    let models = named(&[("bloom", "bigscience/blomm-560m")]);
    assert!(!p.read(&models, &[refused(), refused()]).up);
    let r = p.read(&models, &[ok(503, fixture!("tgi-health-unhealthy.json")), ok(200, fixture!("tgi-info.json"))]);
    assert_eq!(r.models["bloom"].stage, Some(Stage::LoadingWeights));
    assert_eq!(r.models["bloom"].error.as_deref(), Some("unhealthy"));
    let r = p.read(&models, &[ok(200, vec![]), ok(200, fixture!("tgi-info.json"))]);
    assert_eq!(r.models["bloom"].stage, Some(Stage::Ready));
    // Serving another model than the one configured is a failure, not readiness.
    let wrong = named(&[("llama", "meta-llama/Llama-3-8B")]);
    let r = p.read(&wrong, &[ok(200, vec![]), ok(200, fixture!("tgi-info.json"))]);
    assert_eq!(r.models["llama"].stage, Some(Stage::Failed));
    assert!(r.models["llama"].error.as_deref().unwrap().contains("bigscience/blomm-560m"));
    // Also when served_as was left to default to the name.
    let defaulted = named(&[("llama", "llama")]);
    let r = p.read(&defaulted, &[ok(200, vec![]), ok(200, fixture!("tgi-info.json"))]);
    assert_eq!(r.models["llama"].stage, Some(Stage::Failed), "a defaulted name is checked too");
    assert!(r.models["llama"].error.as_deref().unwrap().contains("set `served_as`"), "{:?}", r.models["llama"].error);
}

#[test]
fn ollama_running_models() {
    let p = Protocol::Ollama;
    let models = named(&[("gemma", "gemma3"), ("llama", "llama3:8b")]);
    let r = p.read(&models, &[ok(200, fixture!("ollama-ps-empty.json"))]);
    assert!(r.up && r.models.is_empty(), "nothing loaded yet");
    let r = p.read(&models, &[ok(200, fixture!("ollama-ps.json"))]);
    assert_eq!(stages(&r), pairs(&[("gemma", Some(Stage::Ready))]));
}

#[test]
fn plain_http_is_ready_on_2xx() {
    let p = Protocol::Http { path: "/ready".into() };
    let models = named(&[("m", "m")]);
    assert!(p.read(&models, &[ok(503, vec![])]).models.is_empty());
    assert_eq!(stages(&p.read(&models, &[ok(204, vec![])])), pairs(&[("m", Some(Stage::Ready))]));
}

#[test]
fn the_payload_names_each_path_when_there_are_several() {
    let p = Protocol::Tgi;
    let r = p.read(&named(&[("m", "m")]), &[ok(503, b"{}".to_vec()), refused()]);
    assert_eq!(r.payload, "/health 503 {} | /info: connection refused");
}

#[test]
fn progress_reads_as_a_fraction_or_a_percentage() {
    let p = |scale: ProgressScale| {
        Protocol::HealthJson(HealthJson {
            path: "/health".into(),
            status_pointer: "/models/{model}/status".into(),
            progress_pointer: "/models/{model}/pct".into(),
            error_pointer: "/models/{model}/error".into(),
            map: HealthJson::default_map(),
            progress_scale: scale,
        })
    };
    let models = named(&[("nllb", "nllb")]);
    // (scale, value reported, progress read)
    let table = [
        (ProgressScale::Auto, "0.4", 0.4),
        (ProgressScale::Auto, "40", 0.4),
        (ProgressScale::Auto, "100", 1.0),
        (ProgressScale::Auto, "1", 1.0),
        (ProgressScale::Percent, "1", 0.01),
        (ProgressScale::Percent, "40", 0.4),
        (ProgressScale::Fraction, "0.4", 0.4),
        (ProgressScale::Fraction, "40", 1.0),
        (ProgressScale::Auto, "-3", 0.0),
    ];
    for (scale, value, want) in table {
        let body = format!(r#"{{"models": {{"nllb": {{"status": "loading", "pct": {value}}}}}}}"#).into_bytes();
        let r = p(scale).read(&models, &[ok(200, body)]);
        assert!((r.models["nllb"].progress - want).abs() < 1e-9, "{scale:?} {value}: {}", r.models["nllb"].progress);
    }
}

#[test]
fn polls_adapt_while_loading_and_keep_a_liveness_cadence_once_settled() {
    let ms = Duration::from_millis;
    let ceiling = ms(500);
    // (previous, answers changed, liveness cadence, next)
    let table = [
        (ms(500), true, None, FAST_POLL),
        (ms(250), false, None, ms(500)),
        (ms(400), false, None, ms(500)),
        (ms(500), false, None, ms(500)),
        (ms(20), false, None, FAST_POLL),
        (ms(20), true, Some(ms(5000)), ms(5000)),
        (ms(250), false, Some(ms(5000)), ms(5000)),
    ];
    for (previous, changed, live, next) in table {
        assert_eq!(next_interval(previous, changed, ceiling, live), next, "{previous:?} {changed} {live:?}");
    }
}

#[test]
fn no_more_than_four_rounds_start_in_any_one_second() {
    let t0 = tokio::time::Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    // (rounds already started at, wanted, earliest allowed)
    let table: [(&[u64], u64, u64); 5] = [
        (&[], 0, 0),
        (&[0, 10, 20], 30, 30),
        (&[0, 10, 20, 30], 40, 1000),
        (&[0, 10, 20, 30], 1200, 1200),
        (&[0, 400, 800, 900, 950], 960, 1400),
    ];
    for (started, wanted, earliest) in table {
        let mut pace = Pace::default();
        for &at in started {
            pace.record(ms(at));
        }
        assert_eq!(pace.not_before(ms(wanted)), ms(earliest), "{started:?} wanting {wanted}");
    }
}

#[test]
fn a_probe_costs_its_wall_time_and_the_bytes_it_moved() {
    let answers: Vec<Answer> = vec![ok(200, vec![b'x'; 1000]), Err("connection refused".into())];
    let cost = ProbeCost::of(&answers, Duration::from_millis(60));
    assert_eq!(cost, ProbeCost { wall: Duration::from_millis(60), bytes: 1000 + 2 * 256 });
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// A body: arbitrary bytes, or JSON shaped like what services answer
    /// with arbitrary values where a reader looks.
    fn body() -> impl Strategy<Value = Vec<u8>> {
        let json = ("[a-z_ ]{0,12}", any::<f64>(), proptest::option::of(".{0,30}"), any::<bool>()).prop_map(
            |(status, progress, error, listed)| {
                let model = serde_json::json!({"status": status, "progress": progress, "error": error, "name": "nllb"});
                let models = if listed { serde_json::json!([model]) } else { serde_json::json!({"nllb": model}) };
                serde_json::json!({"models": models, "data": models, "model_id": "nllb", "status": status})
                    .to_string()
                    .into_bytes()
            },
        );
        prop_oneof![json, proptest::collection::vec(any::<u8>(), 0..200)]
    }

    fn answer() -> impl Strategy<Value = Answer> {
        prop_oneof![(100u16..600, body()).prop_map(Ok), Just(Err("connection refused".to_owned()))]
    }

    proptest! {
        /// Whatever a service answers, every reader reads it without a
        /// panic, and a progress is always a fraction.
        #[test]
        fn the_readers_take_any_answer(answers in proptest::collection::vec(answer(), 0..4), percent in any::<bool>()) {
            let models = named(&[("nllb", "nllb"), ("aya", "CohereForAI/aya")]);
            let mut json = health_json();
            if let Protocol::HealthJson(h) = &mut json {
                h.progress_scale = if percent { ProgressScale::Percent } else { ProgressScale::Auto };
            }
            let protocols = [
                json,
                Protocol::KserveV2,
                Protocol::OpenAi,
                Protocol::Tgi,
                Protocol::Ollama,
                Protocol::Http { path: "/".into() },
            ];
            for protocol in protocols {
                let reading = protocol.read(&models, &answers);
                for health in reading.models.values() {
                    prop_assert!((0.0..=1.0).contains(&health.progress), "{}: {}", protocol.name(), health.progress);
                }
                prop_assert!(reading.payload.len() <= 4 * PAYLOAD_EXCERPT, "{}", reading.payload.len());
            }
        }
    }
}
