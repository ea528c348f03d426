//! Table tests of every rule of the stage machine: each scenario is a list
//! of inputs, and the table says what the last one must make happen.

use super::*;
use crate::probe::ModelHealth;

fn sample(rss_mib: u64, cpu_ms: u64, io_kib: u64) -> TreeMemory {
    TreeMemory { rss_bytes: rss_mib * 1024 * 1024, cpu_ms, io_bytes: io_kib * 1024, ..Default::default() }
}

#[test]
fn probe_and_log_stages_move_forward_only_together() {
    use Stage::*;
    // (current, reported by the probe, result)
    let table = [
        (Downloading, LoadingWeights, LoadingWeights),
        (LoadingWeights, Downloading, LoadingWeights),
        (LoadingWeights, WaitingForHttp, LoadingWeights),
        (WaitingForHttp, WaitingForHttp, WaitingForHttp),
        (ProcessStarting, Downloading, Downloading),
    ];
    for (current, reported, want) in table {
        assert_eq!(loading_stage(current, reported), want, "{current:?} then {reported:?}");
    }
}

#[test]
fn a_service_wide_signal_counts_only_for_the_only_model_loading() {
    let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // (models loading, credited)
    let table: [(&[&str], Option<&str>); 3] = [(&[], None), (&["nllb"], Some("nllb")), (&["nllb", "aya"], None)];
    for (loading, credited) in table {
        let loading = names(loading);
        assert_eq!(attribute_signal(&loading).map(String::as_str), credited, "{loading:?}");
    }
}

#[test]
fn progress_signals_and_their_thresholds_leave_out_the_agents_own_probes() {
    let sec = Duration::from_secs(1);
    let base = sample(100, 1000, 1000);
    let none = ProbeCost::default();
    let probes = |ms: u64, kib: u64| ProbeCost { wall: Duration::from_millis(ms), bytes: kib * 1024 };
    // (after, elapsed, what the probes cost, which signal or none)
    let table = [
        (sample(100, 1000, 1000), sec, none, None),
        (sample(102, 1000, 1000), sec, none, Some("RSS moved 2 MiB")),
        (sample(99, 1000, 1000), sec, none, Some("RSS moved 1 MiB")),
        (sample(100, 1000, 1100), sec, none, Some("100 KiB of I/O")),
        (sample(100, 1000, 1010), sec, none, None), // health polls' few bytes are not progress
        (sample(100, 1060, 1000), sec, none, Some("60 ms of CPU")),
        (sample(100, 1020, 1000), sec, none, None), // 2% of a core is idling, not working
        (sample(100, 1060, 1000), Duration::from_secs(2), none, None),
        // A heavy health handler: its CPU and bytes are the probes' doing.
        (sample(100, 1120, 1000), sec, probes(120, 0), None),
        (sample(100, 1000, 1100), sec, probes(0, 90), None),
        (sample(100, 1200, 1000), sec, probes(120, 0), Some("80 ms of CPU")),
        (sample(100, 1000, 1200), sec, probes(0, 90), Some("110 KiB of I/O")),
        // Weights going straight into GPU memory.
        (
            TreeMemory { gpu_bytes: 512 * 1024 * 1024, ..sample(100, 1000, 1000) },
            sec,
            none,
            Some("GPU memory moved 512 MiB"),
        ),
    ];
    for (after, elapsed, cost, want) in table {
        assert_eq!(
            progress_signal(&base, &after, elapsed, cost).as_deref(),
            want,
            "{after:?} over {elapsed:?}, {cost:?}"
        );
    }
}

#[test]
fn log_patterns_move_stages_forward_only() {
    let patterns = vec![
        (Stage::Failed, regex::Regex::new("CUDA out of memory").unwrap()),
        (Stage::LoadingWeights, regex::Regex::new("Loading checkpoint shards").unwrap()),
        (Stage::Downloading, regex::Regex::new("Downloading").unwrap()),
    ];
    let table = [
        (Stage::WaitingForHttp, "Downloading model.safetensors", Some(Stage::Downloading)),
        (Stage::Downloading, "Loading checkpoint shards: 50%", Some(Stage::LoadingWeights)),
        (Stage::LoadingWeights, "Downloading tokenizer.json", None),
        (Stage::WarmingUp, "torch.OutOfMemoryError: CUDA out of memory", Some(Stage::Failed)),
        (Stage::Downloading, "INFO: nothing to see", None),
    ];
    for (current, line, want) in table {
        assert_eq!(log_stage(&patterns, current, line), want, "{current:?} {line}");
    }
}

/// One input to the machine, at a time given in ms from the start.
#[derive(Clone, Copy, Debug)]
enum In {
    /// The service starts for these models (at-start ones come along).
    Start(&'static [&'static str]),
    Spawned,
    LaunchFailed,
    /// An ensure wants the model, with a load limit in ms, service running.
    Want(&'static str, u64),
    /// A reading: model, stage (None: known but no stage), progress.
    Read(&'static str, Option<Stage>, f64),
    /// A reading that says nothing about any model.
    Silent,
    ReadFailed(&'static str, &'static str),
    Log(&'static str),
    /// A traceback's first line (left open).
    Traceback(&'static str),
    Closed(&'static str),
    Warmed(&'static str, Result<&'static str, &'static str>),
    Refused(&'static str, &'static str),
    Signal,
    Tick,
    Died,
    Stopped(&'static str),
    Reserve(&'static str),
}

struct Setup {
    /// (name, load mode, warm-up, stall limit in ms)
    models: Vec<(&'static str, LoadMode, bool, u64)>,
    stop_after_failed_load: bool,
}

fn model(name: &str, load: LoadMode, warmup: bool, stall_ms: u64) -> ModelConfig {
    ModelConfig {
        name: name.into(),
        served_as: name.into(),
        load,
        timeout: None,
        ram_bytes: 0,
        gpu_bytes: 0,
        stall: StallLimits { default: Duration::from_millis(stall_ms), per_stage: BTreeMap::new() },
        log_patterns: vec![
            (Stage::Failed, regex::Regex::new("Traceback|FATAL").unwrap()),
            (Stage::LoadingWeights, regex::Regex::new("Loading checkpoint shards").unwrap()),
        ],
        warmup: warmup.then(|| crate::config::Warmup {
            method: "POST".into(),
            path: "/translate".into(),
            body: None,
            expect_status: None,
            timeout: Duration::from_secs(5),
        }),
    }
}

fn reading(models: &[(&str, Option<Stage>, f64, Option<&str>)]) -> Reading {
    let models = models
        .iter()
        .map(|(n, stage, progress, error)| {
            let status = stage.map_or("unknown".to_owned(), |s| s.label().to_lowercase());
            let health = ModelHealth { status, stage: *stage, progress: *progress, error: error.map(str::to_owned) };
            (n.to_string(), health)
        })
        .collect();
    Reading { up: true, models, payload: String::new() }
}

fn apply(m: &mut Machine, input: In, now: Instant) -> Vec<Action> {
    let owned = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    match input {
        In::Start(names) => m.starting(&owned(names), now),
        In::Spawned => m.spawned(now),
        In::LaunchFailed => m.launch_failed("No such file", now),
        In::Want(name, ms) => m.want(name, true, (Duration::from_millis(ms), "the suite".into()), now).1,
        In::Read(name, stage, p) => m.observe(&reading(&[(name, stage, p, None)]), now),
        In::Silent => m.observe(&reading(&[]), now),
        In::ReadFailed(name, error) => m.observe(&reading(&[(name, Some(Stage::Failed), 0.0, Some(error))]), now),
        In::Log(line) => m.on_log(line, false, now),
        In::Traceback(line) => m.on_log(line, true, now),
        In::Closed(exception) => m.traceback_closed(exception, now),
        In::Warmed(name, outcome) => m.warmed(name, outcome.map(str::to_owned).map_err(str::to_owned), now),
        In::Refused(name, why) => {
            m.load_answered(name, Some(why.into()), now);
            Vec::new()
        }
        In::Signal => {
            m.on_signal("RSS moved 8 MiB", now);
            Vec::new()
        }
        In::Tick => m.tick(now),
        In::Died => m.ended(
            &Ended::Died {
                cause: "process exited code 3".into(),
                loading: "died loading".into(),
                serving: "died serving".into(),
            },
            now,
        ),
        In::Stopped(reason) => m.ended(&Ended::Stopped(Some(reason.into())), now),
        In::Reserve(name) => {
            m.reserve(name);
            Vec::new()
        }
    }
}

fn show(a: &Action) -> String {
    match a {
        Action::Changed(c) => {
            let mut s = format!("{} {}→{}", c.model, c.from.label(), c.to.label());
            if c.release {
                s.push_str(" release");
            }
            s
        }
        Action::RequestLoad(m) => format!("load {m}"),
        Action::WarmUp(m) => format!("warm {m}"),
        Action::StopService => "stop".into(),
    }
}

/// Runs the inputs and returns the machine and what the last one did.
fn run(setup: &Setup, steps: &[(u64, In)]) -> (Machine, Vec<Action>) {
    let t0 = Instant::now();
    let configs: Vec<ModelConfig> = setup.models.iter().map(|(n, l, w, s)| model(n, *l, *w, *s)).collect();
    let mut m = Machine::new(&configs, "health-json", setup.stop_after_failed_load, t0);
    let mut last = Vec::new();
    for (at, input) in steps {
        last = apply(&mut m, *input, t0 + Duration::from_millis(*at));
    }
    (m, last)
}

const AT: LoadMode = LoadMode::AtStart;
const EP: LoadMode = LoadMode::Endpoint;

fn one(load: LoadMode, warmup: bool) -> Setup {
    Setup { models: vec![("nllb", load, warmup, 3000)], stop_after_failed_load: true }
}

fn two() -> Setup {
    Setup { models: vec![("nllb", AT, false, 3000), ("aya", AT, false, 3000)], stop_after_failed_load: true }
}

/// The service started and answered for its at-start models.
const UP: [(u64, In); 2] = [(0, In::Start(&[])), (10, In::Spawned)];

fn with(prefix: &[(u64, In)], rest: &[(u64, In)]) -> Vec<(u64, In)> {
    prefix.iter().chain(rest).copied().collect()
}

/// (rule, setup, inputs, what the last input does — or what its messages say)
type Scenario = (&'static str, Setup, Vec<(u64, In)>, Vec<&'static str>);

#[test]
fn rules_of_starting_a_service() {
    // (rule, setup, inputs, what the last input does)
    let table: Vec<Scenario> = vec![
        (
            "start moves at-start models only",
            one(AT, false),
            vec![(0, In::Start(&[]))],
            vec!["nllb STOPPED→PROCESS_STARTING"],
        ),
        ("an endpoint model waits to be asked", one(EP, false), vec![(0, In::Start(&[]))], vec![]),
        (
            "an endpoint model asked at start starts",
            one(EP, false),
            vec![(0, In::Start(&["nllb"]))],
            vec!["nllb STOPPED→PROCESS_STARTING"],
        ),
        ("spawned: waiting for HTTP", one(AT, false), UP.to_vec(), vec!["nllb PROCESS_STARTING→WAITING_FOR_HTTP"]),
        (
            "launch failure fails the starting models",
            one(AT, false),
            vec![(0, In::Start(&[])), (1, In::LaunchFailed)],
            vec!["nllb PROCESS_STARTING→FAILED"],
        ),
    ];
    check_rules(table);
}

#[test]
fn rules_of_reported_stages() {
    use Stage::*;
    let loading = [(100, In::Read("nllb", Some(LoadingWeights), 0.4))];
    // (rule, setup, inputs, what the last input does)
    let table: Vec<Scenario> = vec![
        (
            "a reported stage moves the model",
            one(AT, false),
            with(&UP, &loading),
            vec!["nllb WAITING_FOR_HTTP→LOADING_WEIGHTS"],
        ),
        (
            "the same stage and progress is no news",
            one(AT, false),
            with(&UP, &[loading[0], (200, In::Read("nllb", Some(LoadingWeights), 0.42))]),
            vec![],
        ),
        (
            "5 % more progress is news",
            one(AT, false),
            with(&UP, &[loading[0], (200, In::Read("nllb", Some(LoadingWeights), 0.5))]),
            vec!["nllb LOADING_WEIGHTS→LOADING_WEIGHTS"],
        ),
        (
            "a probe never moves a stage back",
            one(AT, false),
            with(&UP, &[loading[0], (200, In::Read("nllb", Some(Downloading), 0.4))]),
            vec![],
        ),
        (
            "READY without a warm-up",
            one(AT, false),
            with(&UP, &[(100, In::Read("nllb", Some(Ready), 1.0))]),
            vec!["nllb WAITING_FOR_HTTP→READY"],
        ),
        (
            "READY gives the reservation back",
            one(AT, false),
            with(&UP, &[(50, In::Reserve("nllb")), (100, In::Read("nllb", Some(Ready), 1.0))]),
            vec!["nllb WAITING_FOR_HTTP→READY release"],
        ),
    ];
    check_rules(table);
}

#[test]
fn rules_of_warm_up() {
    use Stage::*;
    // (rule, setup, inputs, what the last input does)
    let table: Vec<Scenario> = vec![
        (
            "served with a warm-up: warm it first",
            one(AT, true),
            with(&UP, &[(100, In::Read("nllb", Some(Ready), 1.0))]),
            vec!["nllb WAITING_FOR_HTTP→WARMING_UP", "warm nllb"],
        ),
        (
            "one warm-up in flight at a time",
            one(AT, true),
            with(&UP, &[(100, In::Read("nllb", Some(Ready), 1.0)), (500, In::Read("nllb", Some(Ready), 1.0))]),
            vec![],
        ),
        (
            "a warm-up that works: READY",
            one(AT, true),
            with(&UP, &[(100, In::Read("nllb", Some(Ready), 1.0)), (150, In::Warmed("nllb", Ok("HTTP 200")))]),
            vec!["nllb WARMING_UP→READY"],
        ),
        (
            "a failed warm-up is retried, not before 250 ms",
            one(AT, true),
            with(
                &UP,
                &[
                    (100, In::Read("nllb", Some(Ready), 1.0)),
                    (150, In::Warmed("nllb", Err("HTTP 503"))),
                    (200, In::Read("nllb", Some(Ready), 1.0)),
                ],
            ),
            vec![],
        ),
        (
            "a failed warm-up is retried after 250 ms",
            one(AT, true),
            with(
                &UP,
                &[
                    (100, In::Read("nllb", Some(Ready), 1.0)),
                    (150, In::Warmed("nllb", Err("HTTP 503"))),
                    (400, In::Read("nllb", Some(Ready), 1.0)),
                ],
            ),
            vec!["warm nllb"],
        ),
        (
            "a READY model the service no longer lists has stopped",
            one(AT, false),
            with(&UP, &[(100, In::Read("nllb", Some(Ready), 1.0)), (200, In::Read("nllb", None, 0.0))]),
            vec!["nllb READY→STOPPED"],
        ),
        (
            "the service reports a failure",
            one(AT, false),
            with(&UP, &[(100, In::ReadFailed("nllb", "weights corrupt"))]),
            vec!["nllb WAITING_FOR_HTTP→FAILED"],
        ),
    ];
    check_rules(table);
}

#[test]
fn rules_of_endpoint_loads() {
    // (rule, setup, inputs, what the last input does)
    let table: Vec<Scenario> = vec![
        (
            "endpoint: asked for, the load is requested once",
            one(EP, false),
            with(&UP, &[(20, In::Want("nllb", 60_000)), (100, In::Silent)]),
            vec!["load nllb"],
        ),
        (
            "endpoint: not twice while the request is out",
            one(EP, false),
            with(&UP, &[(20, In::Want("nllb", 60_000)), (100, In::Silent), (200, In::Silent)]),
            vec![],
        ),
        (
            "endpoint: a refusal is asked again after 250 ms",
            one(EP, false),
            with(
                &UP,
                &[
                    (20, In::Want("nllb", 60_000)),
                    (100, In::Silent),
                    (110, In::Refused("nllb", "503")),
                    (300, In::Silent),
                    (400, In::Silent),
                ],
            ),
            vec!["load nllb"],
        ),
        (
            "endpoint: not before the pause ends",
            one(EP, false),
            with(
                &UP,
                &[
                    (20, In::Want("nllb", 60_000)),
                    (100, In::Silent),
                    (110, In::Refused("nllb", "503")),
                    (300, In::Silent),
                ],
            ),
            vec![],
        ),
        (
            "endpoint: the pause doubles",
            one(EP, false),
            with(
                &UP,
                &[
                    (20, In::Want("nllb", 60_000)),
                    (100, In::Silent),
                    (110, In::Refused("nllb", "503")),
                    (400, In::Silent),
                    (410, In::Refused("nllb", "503")),
                    (800, In::Silent),
                ],
            ),
            vec![],
        ),
        (
            "endpoint: a stale failure is asked again, not believed",
            one(EP, false),
            with(&UP, &[(20, In::Want("nllb", 60_000)), (100, In::ReadFailed("nllb", "old news"))]),
            vec!["load nllb"],
        ),
    ];
    check_rules(table);
}

#[test]
fn rules_of_reloading_an_endpoint_model() {
    // (rule, setup, inputs, what the last input does)
    let table: Vec<Scenario> = vec![(
        "endpoint: a failed model wanted again reloads without a restart",
        one(EP, false),
        with(
            &UP,
            &[
                (20, In::Want("nllb", 60_000)),
                (100, In::ReadFailed("nllb", "x")),
                (110, In::Refused("nllb", "x")),
                (500, In::ReadFailed("nllb", "x")),
                (600, In::ReadFailed("nllb", "x")),
                (700, In::Want("nllb", 60_000)),
            ],
        ),
        vec!["nllb FAILED→WAITING_FOR_HTTP"],
    )];
    check_rules(table);
}

#[test]
fn rules_of_log_lines() {
    // (rule, setup, inputs, what the last input does)
    let table: Vec<Scenario> = vec![
        (
            "a log pattern moves a stage",
            one(AT, false),
            with(&UP, &[(100, In::Log("Loading checkpoint shards: 10%"))]),
            vec!["nllb WAITING_FOR_HTTP→LOADING_WEIGHTS"],
        ),
        (
            "a failure the service logged does not stop it (only a hang does)",
            one(AT, false),
            with(&UP, &[(100, In::Log("FATAL: no GPU")), (200, In::Tick)]),
            vec![],
        ),
        (
            "a FAILED pattern fails at once",
            one(AT, false),
            with(&UP, &[(100, In::Log("FATAL: no GPU"))]),
            vec!["nllb WAITING_FOR_HTTP→FAILED"],
        ),
        (
            "a traceback waits for its exception line",
            one(AT, false),
            with(&UP, &[(100, In::Traceback("Traceback (most recent call last):"))]),
            vec![],
        ),
        (
            "… and fails with it",
            one(AT, false),
            with(
                &UP,
                &[
                    (100, In::Traceback("Traceback (most recent call last):")),
                    (150, In::Closed("RuntimeError: weights corrupt")),
                ],
            ),
            vec!["nllb WAITING_FOR_HTTP→FAILED"],
        ),
        (
            "… or after 2 s without it",
            one(AT, false),
            with(&UP, &[(100, In::Traceback("Traceback (most recent call last):")), (2200, In::Tick)]),
            vec!["nllb WAITING_FOR_HTTP→FAILED"],
        ),
    ];
    check_rules(table);
}

#[test]
fn rules_of_stalls_limits_and_ends() {
    use Stage::*;
    let loading = [(100, In::Read("nllb", Some(LoadingWeights), 0.4))];
    // (rule, setup, inputs, what the last input does)
    let table: Vec<Scenario> = vec![
        ("no stall within the limit", one(AT, false), with(&UP, &[loading[0], (3000, In::Tick)]), vec![]),
        (
            "a stall after the limit stops the hung service",
            one(AT, false),
            with(&UP, &[loading[0], (3100, In::Tick)]),
            vec!["nllb LOADING_WEIGHTS→FAILED", "stop"],
        ),
        (
            "… unless configured to keep it",
            Setup { stop_after_failed_load: false, ..one(AT, false) },
            with(&UP, &[loading[0], (3100, In::Tick)]),
            vec!["nllb LOADING_WEIGHTS→FAILED"],
        ),
        (
            "a resource signal keeps the only loading model alive",
            one(AT, false),
            with(&UP, &[loading[0], (2000, In::Signal), (3100, In::Tick)]),
            vec![],
        ),
        (
            "… but not one of two loading",
            two(),
            with(&UP, &[(100, In::Read("nllb", Some(LoadingWeights), 0.4)), (2000, In::Signal), (3100, In::Tick)]),
            vec!["aya WAITING_FOR_HTTP→FAILED", "nllb LOADING_WEIGHTS→FAILED", "stop"],
        ),
        (
            "a stall does not stop a service with a READY model",
            two(),
            with(&UP, &[(100, In::Read("nllb", Some(Ready), 1.0)), (3100, In::Tick)]),
            vec!["aya WAITING_FOR_HTTP→FAILED"],
        ),
        (
            "the load limit",
            one(AT, false),
            with(
                &UP,
                &[(20, In::Want("nllb", 1000)), (500, In::Read("nllb", Some(LoadingWeights), 0.1)), (1000, In::Tick)],
            ),
            vec!["nllb LOADING_WEIGHTS→FAILED", "stop"],
        ),
        (
            "READY already",
            one(AT, false),
            with(&UP, &[(100, In::Read("nllb", Some(Ready), 1.0)), (200, In::Want("nllb", 1000)), (5000, In::Tick)]),
            vec![],
        ),
        (
            "a death fails what lives",
            two(),
            with(&UP, &[(100, In::Read("nllb", Some(Ready), 1.0)), (200, In::Died)]),
            vec!["aya WAITING_FOR_HTTP→FAILED", "nllb READY→FAILED"],
        ),
        (
            "a stop stops what lives",
            two(),
            with(&UP, &[(100, In::ReadFailed("nllb", "x")), (200, In::Stopped("restart to reload"))]),
            vec!["aya WAITING_FOR_HTTP→STOPPED"],
        ),
    ];
    check_rules(table);
}

/// Each scenario's last input must do exactly what the table says.
fn check_rules(table: Vec<Scenario>) {
    for (rule, setup, steps, want) in table {
        let (_, actions) = run(&setup, &steps);
        let got: Vec<String> = actions.iter().map(show).collect();
        assert_eq!(got, want, "{rule}");
    }
}

/// Each scenario's messages must say every part the table lists.
fn check_stories(table: Vec<Scenario>) {
    for (rule, setup, steps, want) in table {
        let (_, actions) = run(&setup, &steps);
        let got = messages(&actions).join("\n");
        for w in want {
            assert!(got.contains(w), "{rule}: {w:?} not in {got}");
        }
    }
}

fn messages(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Changed(c) => Some(format!("{} | {}", c.cause, c.message.clone().unwrap_or_default())),
            _ => None,
        })
        .collect()
}

#[test]
fn failures_by_limit_tell_their_story() {
    use Stage::*;
    let loading = (100, In::Read("nllb", Some(LoadingWeights), 0.4));
    // (rule, setup, inputs, substrings of the cause | message)
    let table: Vec<Scenario> = vec![
        (
            "stall",
            one(AT, false),
            with(&UP, &[loading, (3100, In::Tick)]),
            vec![
                "stall timeout |",
                "failed in stage LOADING_WEIGHTS after 3.0s there (3.1s since load began): stalled: no progress for 3s in LOADING_WEIGHTS",
                "not counting the agent's own probes",
                "last progress: 3.0s ago (a stage change)",
            ],
        ),
        (
            "stall after a signal",
            one(AT, false),
            with(&UP, &[loading, (1000, In::Signal), (4000, In::Tick)]),
            vec!["last progress: 3.0s ago (RSS moved 8 MiB in the service, the only model loading)"],
        ),
        (
            "timeout names who set the limit",
            one(AT, false),
            with(&UP, &[(20, In::Want("nllb", 1000)), (1000, In::Tick)]),
            vec!["load timeout |", "load timed out after 1s (the limit was set by the suite; raise it there"],
        ),
        (
            "the service's own error",
            one(AT, false),
            with(&UP, &[(100, In::ReadFailed("nllb", "weights corrupt"))]),
            vec!["health-json: status=failed |", ": weights corrupt"],
        ),
        (
            "a traceback's exception line",
            one(AT, false),
            with(
                &UP,
                &[
                    (100, In::Traceback("Traceback (most recent call last):")),
                    (150, In::Closed("RuntimeError: weights corrupt")),
                ],
            ),
            vec!["the service logged: Traceback (most recent call last): … RuntimeError: weights corrupt"],
        ),
    ];
    check_stories(table);
}

#[test]
fn failures_by_the_service_tell_their_story() {
    use Stage::*;
    // (rule, setup, inputs, substrings of the cause | message)
    let table: Vec<Scenario> = vec![
        (
            "the last refusal of a load request",
            one(EP, false),
            with(
                &UP,
                &[
                    (20, In::Want("nllb", 1000)),
                    (100, In::Silent),
                    (110, In::Refused("nllb", "503 Service Unavailable: no room")),
                    (1100, In::Tick),
                ],
            ),
            vec!["last load request: 503 Service Unavailable: no room"],
        ),
        (
            "the last warm-up error",
            one(AT, true),
            with(
                &UP,
                &[
                    (20, In::Want("nllb", 1000)),
                    (100, In::Read("nllb", Some(Ready), 1.0)),
                    (150, In::Warmed("nllb", Err("HTTP 500: boom"))),
                    (1000, In::Tick),
                ],
            ),
            vec!["last warm-up attempt (1 in all): HTTP 500: boom"],
        ),
        (
            "a death while loading",
            one(AT, false),
            with(&UP, &[(100, In::Died)]),
            vec!["process exited code 3 | model nllb failed in stage WAITING_FOR_HTTP", "died loading"],
        ),
        (
            "a stop says why",
            one(AT, false),
            with(&UP, &[(100, In::Stopped("restart to reload"))]),
            vec!["service stopped | restart to reload"],
        ),
        (
            "a launch failure names the error",
            one(AT, false),
            vec![(0, In::Start(&[])), (1, In::LaunchFailed)],
            vec!["launch failed | model nllb failed in stage PROCESS_STARTING: No such file"],
        ),
    ];
    check_stories(table);
}

#[test]
fn failures_that_quote_the_service_say_so() {
    let stall = run(&one(AT, false), &with(&UP, &[(3100, In::Tick)])).1;
    let launch = run(&one(AT, false), &[(0, In::Start(&[])), (1, In::LaunchFailed)]).1;
    let quotes = |a: &[Action]| matches!(a.first(), Some(Action::Changed(c)) if c.quote_service);
    assert!(quotes(&stall), "a stall quotes the service's memory and log lines");
    assert!(!quotes(&launch), "a service that never ran has nothing to quote");
}

#[test]
fn whether_a_reload_needs_a_restart() {
    use Stage::*;
    let setup =
        Setup { models: vec![("nllb", AT, false, 3000), ("aya", EP, false, 3000)], stop_after_failed_load: false };
    let (m, _) = run(
        &setup,
        &with(&UP, &[(20, In::Want("aya", 60_000)), (100, In::ReadFailed("nllb", "x")), (110, In::Silent)]),
    );
    assert_eq!(m.stage("nllb"), Some(Failed));
    assert!(m.reload_needs_restart(&["nllb".into()]), "an at-start model loads only when its service starts");
    assert!(!m.reload_needs_restart(&["aya".into()]), "an endpoint model is asked to load");
}
