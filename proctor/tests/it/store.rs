//! The run store end to end: a controller killed mid-run leaves what it
//! received readable (SQLite and PostgreSQL), two controllers share one
//! PostgreSQL store, a load slower than its baseline fails the run.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use controller::store::{Location, Store};
use controller::{Exit, RunOptions};
use testkit::postgres::Postgres;
use testkit::{Agent, Scratch, Service};
use tokio_util::sync::CancellationToken;

use crate::BIN;
use crate::run::TRANSLATE_SUITE;

/// Three cases, each answered after 2 s (the sim's `--slow-requests`).
const SLOW_SUITE: &str = "\
name: slow
service: translation
models: [nllb]
cases:
  - name: first
    request: {method: POST, path: /translate, json: {text: Hello world, source_lang: en, target_lang: es, model: nllb}}
    expect: {status: 200}
  - name: second
    request: {method: POST, path: /translate, json: {text: Hello world, source_lang: en, target_lang: es, model: nllb}}
    expect: {status: 200}
  - name: third
    request: {method: POST, path: /translate, json: {text: Hello world, source_lang: en, target_lang: es, model: nllb}}
    expect: {status: 200}
";

async fn proctor(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(BIN).args(args).output().await.expect("run proctor");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits (bounded) until the store holds `n` case results of its newest run.
async fn case_results(location: &Location, n: usize) -> String {
    testkit::within(Duration::from_secs(60), "case results in the store", async {
        loop {
            if let Ok(store) = Store::open(location).await
                && let Ok(runs) = store.runs(1).await
                && let Some(run) = runs.first()
                && let Ok(events) = store.events(&run.id).await
                && events
                    .iter()
                    .filter(|(_, e)| matches!(e, controller::run::events::RunEvent::CaseFinished { .. }))
                    .count()
                    >= n
            {
                return run.id.clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

async fn killed_mid_run(store: &str, location: Location) {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=300ms"]).flag("--slow-requests=2s")).await;
    let out = Scratch::new("killed-controller");
    let suite = out.write("slow.yaml", SLOW_SUITE);
    let reports = out.path.join("out");
    let mut run = tokio::process::Command::new(BIN)
        .args(["run", "--store", store, "--progress", "none", "--agent", &agent.addr, "--out"])
        .arg(&reports)
        .arg(&suite)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let run_id = case_results(&location, 1).await;
    run.start_kill().unwrap(); // SIGKILL: nothing of the controller's own shutdown runs
    let status = run.wait().await.unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
    assert!(!reports.join("junit.xml").exists(), "the controller never reached its reports");

    let (code, listed, err) = proctor(&["runs", "list", "--store", store]).await;
    assert_eq!(code, 0, "{err}");
    let row = listed.lines().find(|l| l.starts_with(&run_id)).unwrap_or_else(|| panic!("{run_id} in {listed}"));
    assert!(row.contains("partial") && row.contains("slow"), "{row}");

    let (code, shown, err) = proctor(&["runs", "show", &run_id[..8], "--store", store]).await;
    assert_eq!(code, 0, "{err}");
    assert!(shown.contains("finished  never: partial run"), "{shown}");
    let first = shown.lines().find(|l| l.starts_with("slow") && l.contains("first")).unwrap();
    assert!(first.contains("PASS"), "the result received before the kill: {shown}");
    assert!(shown.contains("no result: the controller stopped before this case finished (partial run)"), "{shown}");
    assert!(shown.contains("nllb: READY after"), "the load received: {shown}");

    let (code, json, _) = proctor(&["runs", "show", "latest", "--output", "json", "--store", store]).await;
    assert_eq!(code, 0);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!((doc["partial"].as_bool(), doc["run_id"].as_str()), (Some(true), Some(run_id.as_str())));
    assert_eq!(doc["cases"][0]["outcome"], "passed");

    let again = out.path.join("again");
    let (code, said, err) = proctor(&["report", &run_id, "--store", store, "--out", again.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(said.contains("HTML report"), "{said}");
    let html = std::fs::read_to_string(again.join("report.html")).unwrap();
    assert!(html.contains("Partial run") && html.contains("first"), "rebuilt from the store");
    crate::read_junit(&again.join("junit.xml"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_killed_mid_run_leaves_what_it_received_in_sqlite() {
    let dir = Scratch::new("store-sqlite");
    let file = dir.path.join("runs.sqlite");
    killed_mid_run(file.to_str().unwrap(), Location::Sqlite(file.clone())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_killed_mid_run_leaves_what_it_received_in_postgres() {
    let pg = Postgres::start();
    killed_mid_run(&pg.url, Location::Postgres(pg.url.clone())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_stops_answering_costs_the_run_seconds_not_its_reports() {
    let pg = Postgres::start();
    let location = Location::Postgres(pg.url.clone());
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=300ms"]).flag("--slow-requests=2s")).await;
    let out = Scratch::new("frozen-store");
    let suite = out.write("slow.yaml", SLOW_SUITE);
    let reports = out.path.join("out");
    let started = std::time::Instant::now();
    let run = tokio::process::Command::new(BIN)
        .args(["run", "--store", &pg.url, "--progress", "none", "--agent", &agent.addr, "--out"])
        .arg(&reports)
        .arg(&suite)
        .kill_on_drop(true)
        .output();
    let freeze = async {
        case_results(&location, 0).await; // the run is in the store
        pg.freeze();
    };
    let (o, ()) = tokio::join!(testkit::within(Duration::from_secs(90), "the run with a frozen store", run), freeze);
    let o = o.unwrap();
    let took = started.elapsed();
    pg.resume();
    let said = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "every case passed; the store is not the run's verdict: {said}");
    assert!(said.contains("3 cases: 3 passed"), "{said}");
    assert!(said.contains("run store postgres://proctor@127.0.0.1:"), "the store's trouble is said: {said}");
    assert!(reports.join("junit.xml").exists() && reports.join("report.html").exists(), "reports written");
    // Three 2 s cases, a 5 s comparison, a 10 s write tried twice, 15 s bounds at the end.
    assert!(took < Duration::from_secs(75), "bounded: {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_controllers_write_to_one_postgres_store_at_once_and_keep_their_own_results() {
    let pg = Postgres::start();
    let location = Location::Postgres(pg.url.clone());
    let a = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=500ms"])).await;
    let b = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=800ms"])).await;
    let out_a = Scratch::new("pg-a");
    let out_b = Scratch::new("pg-b");
    let opts = |agent: &Agent, out: &Scratch, name: &str| RunOptions {
        store: Some(location.clone()),
        ..RunOptions::new(
            vec![agent.addr.clone()],
            vec![out.write("t.yaml", &TRANSLATE_SUITE.replace("name: translate\n", &format!("name: {name}\n")))],
            out.path.clone(),
        )
    };
    // Both open a fresh store at once: the migrations run once, under the lock.
    let (ra, rb) = tokio::join!(
        controller::run(opts(&a, &out_a, "suite-a"), CancellationToken::new()),
        controller::run(opts(&b, &out_b, "suite-b"), CancellationToken::new())
    );
    assert_eq!((ra.exit, rb.exit), (Exit::Passed, Exit::Passed));
    let store = Store::open(&location).await.unwrap();
    let runs = store.runs(10).await.unwrap();
    assert_eq!(runs.len(), 2, "{runs:?}");
    for (result, suite, host) in [(&ra, "suite-a", &a.addr), (&rb, "suite-b", &b.addr)] {
        let id = &result.report.as_ref().unwrap().run_id;
        let row = runs.iter().find(|r| &r.id == id).unwrap();
        assert_eq!((row.status.as_str(), row.passed, row.suites.as_str()), ("passed", 2, suite), "{row:?}");
        let told = controller::reporter::replay(&store.events(id).await.unwrap(), &out_a.path);
        assert!(told.report.cases.iter().all(|c| c.suite == suite && &c.host == host), "{:?}", told.report.cases);
        assert_eq!(told.report.loads[0].host, *host);
    }
}

/// One host named `gpu-01` whatever its address, so runs on two agents compare.
fn named(out: &Scratch, agent: &Agent) -> std::path::PathBuf {
    out.write("lab.toml", &format!("[[agent]]\nname = \"gpu-01\"\naddress = \"{}\"\n", agent.addr))
}

/// `proctor run --store STORE --progress none --inventory INVENTORY --out OUT
/// SUITE`: its exit code and stdout.
async fn run_stored(store: &str, inventory: &Path, out: &Path, suite: &Path) -> (i32, String) {
    let o = tokio::process::Command::new(BIN)
        .args(["run", "--store", store, "--progress", "none", "--inventory"])
        .arg(inventory)
        .arg("--out")
        .arg(out)
        .arg(suite)
        .output()
        .await
        .unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_slower_than_its_baseline_fails_the_run_with_old_new_and_change() {
    let dir = Scratch::new("baseline");
    let store = dir.path.join("runs.sqlite");
    let store = store.to_str().unwrap();
    let suite = dir.write("t.yaml", TRANSLATE_SUITE);
    let run = |inventory: std::path::PathBuf, out: &str| {
        let (out, suite) = (dir.path.join(out), suite.clone());
        async move {
            let (code, said) = run_stored(store, &inventory, &out, &suite).await;
            (code, said, out)
        }
    };
    {
        let quick = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=500ms"])).await;
        let (code, said, _) = run(named(&dir, &quick), "first").await;
        assert_eq!(code, 0, "{said}");
        assert!(said.contains("gpu-01/translation/nllb: no baseline yet"), "{said}");
    }
    let (code, set, err) = proctor(&["baseline", "set", "--store", store]).await;
    assert_eq!(code, 0, "{err}");
    assert!(set.contains("gpu-01/translation/nllb") && set.contains("LOADING_WEIGHTS"), "{set}");

    // The same model on the same host, now 2.5 s slower to load its weights.
    let slow = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=3s"])).await;
    let (code, said, out) = run(named(&dir, &slow), "second").await;
    assert_eq!(code, Exit::Regression as i32, "every case passed, the load regressed: {said}");
    let row = |text: &str, stage: &str| {
        text.lines().find(|l| l.contains("gpu-01/translation/nllb") && l.contains(stage)).map(str::to_owned)
    };
    let load = row(&said, " load ").unwrap_or_else(|| panic!("{said}"));
    assert!(load.contains("REGRESSED (over 25 %)") && load.contains('+'), "{load}");
    let weights = row(&said, "LOADING_WEIGHTS").unwrap();
    assert!(weights.contains("REGRESSED"), "{weights}");
    let markdown = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(markdown.contains(": REGRESSED") && markdown.contains("### Baseline"), "{markdown}");
    assert!(row(&markdown, "| LOADING_WEIGHTS |").unwrap().contains("| REGRESSED"), "{markdown}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<tr class=\"regressed\"><td>gpu-01/translation/nllb</td><td>load</td>"), "HTML table");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(doc["baseline"]["changes"][0]["verdict"], "regressed");

    let (_, listed, _) = proctor(&["runs", "list", "--store", store]).await;
    assert_eq!(listed.lines().nth(1).map(|l| l.contains("regressed")), Some(true), "{listed}");
    let (code, _, _) = proctor(&["baseline", "compare", "--store", store]).await;
    assert_eq!(code, Exit::Regression as i32);
    let (code, _, _) = proctor(&["baseline", "compare", "--baseline-tolerance", "2000%", "--store", store]).await;
    assert_eq!(code, 0, "a looser tolerance passes the same run");
}

#[tokio::test(flavor = "multi_thread")]
async fn store_commands_name_what_is_wrong_and_the_fix() {
    let dir = Scratch::new("store-input");
    let missing = dir.path.join("none.sqlite");
    let (code, _, err) = proctor(&["runs", "list", "--store", missing.to_str().unwrap()]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no store here yet") && !missing.exists(), "reading never creates a store: {err}");
    let (code, _, err) = proctor(&["runs", "list", "--store", "mysql://db/x"]).await;
    assert_eq!(code, 64);
    assert!(err.contains("is not a store: give a file path or a postgres:// URL"), "{err}");
    let (code, _, err) = proctor(&["runs", "list", "--store", "postgres://ci:hunter2@127.0.0.1:1/x"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("postgres://ci:***@127.0.0.1:1/x") && !err.contains("hunter2"), "{err}");

    // A store with one run: an unknown run is bad input, `--no-store` keeps nothing.
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=200ms"])).await;
    let file = dir.path.join("runs.sqlite");
    let store = file.to_str().unwrap();
    let suite = dir.write("t.yaml", TRANSLATE_SUITE);
    let out = dir.path.join("out");
    let base = ["run", "--agent", &agent.addr, "--progress", "none", "--out", out.to_str().unwrap()];
    let (code, _, err) = proctor(&[&base[..], &["--store", store, suite.to_str().unwrap()]].concat()).await;
    assert_eq!(code, 0, "{err}");
    let other = dir.path.join("other.sqlite");
    let no_store = [&base[..], &["--no-store", suite.to_str().unwrap()]].concat();
    let kept_nothing =
        tokio::process::Command::new(BIN).args(&no_store).env("PROCTOR_STORE", &other).output().await.unwrap();
    assert!(kept_nothing.status.success() && !other.exists(), "--no-store beats PROCTOR_STORE");
    let (code, _, err) = proctor(&["runs", "show", "0000", "--store", store]).await;
    assert_eq!(code, 64);
    assert!(err.contains("no run \"0000\" (see `proctor runs list`)"), "{err}");
    let (code, _, err) = proctor(&["baseline", "set", "0000", "--store", store]).await;
    assert_eq!(code, 64, "{err}");
    let (code, shown, _) = proctor(&["baseline", "show", "--store", store]).await;
    assert_eq!((code, shown.trim()), (0, "no baselines yet: `proctor baseline set [RUN]` takes one from a run"));
    let html = dir.path.join("trends.html");
    let (code, said, _) = proctor(&["trends", "--html", html.to_str().unwrap(), "--store", store]).await;
    assert_eq!(code, 0);
    assert!(said.contains("/translation/nllb") && said.contains("median"), "{said}");
    assert!(std::fs::read_to_string(&html).unwrap().contains("<polyline"), "a chart per model and host");
}

/// A load case's throughput and p99 get baselines like model loads: the same
/// case against a service now 20 ms slower per request fails the run (exit
/// 3) with both figures, old and new; `proctor trends` shows them per run.
#[tokio::test(flavor = "multi_thread")]
async fn a_load_case_slower_than_its_baseline_fails_the_run() {
    let dir = Scratch::new("load-baseline");
    let store = dir.path.join("runs.sqlite");
    let store = store.to_str().unwrap();
    let suite = dir.write(
        "load.yaml",
        "name: perf\nservice: translation\nmodels: [nllb]\ncases:\n  - name: steady\n    request: {method: POST, \
         path: /translate, json: {text: Hello world, source_lang: en, target_lang: es, model: nllb}}\n    load: \
         {connections: 2, duration: 1s}\n",
    );
    let run = |agent: &Agent, out: &str| {
        let (inventory, out, suite) = (named(&dir, agent), dir.path.join(out), suite.clone());
        async move { run_stored(store, &inventory, &out, &suite).await }
    };
    {
        let quick = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=100ms"])).await;
        let (code, said) = run(&quick, "first").await;
        assert_eq!(code, 0, "{said}");
    }
    let (code, set, err) = proctor(&["baseline", "set", "--store", store]).await;
    assert_eq!(code, 0, "{err}");
    assert!(set.contains("gpu-01/perf/steady  rps") && set.contains("gpu-01/perf/steady  p99"), "{set}");
    let (_, shown, _) = proctor(&["baseline", "show", "--store", store]).await;
    assert!(shown.contains("LOAD CASE") && shown.contains("gpu-01/perf/steady"), "{shown}");

    let slow = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,load=100ms"]).flag("--slow-requests=20ms")).await;
    let (code, said) = run(&slow, "second").await;
    assert_eq!(code, Exit::Regression as i32, "the case passed, its figures regressed: {said}");
    let row = |said: &str, metric: &str| {
        said.lines().find(|l| l.contains("gpu-01/perf/steady") && l.contains(metric)).map(str::to_owned)
    };
    let rps = row(&said, " rps ").unwrap_or_else(|| panic!("{said}"));
    assert!(rps.contains("REGRESSED (over 25 %)") && rps.contains("/s"), "{rps}");
    let p99 = row(&said, " p99 ").unwrap_or_else(|| panic!("{said}"));
    assert!(p99.contains("REGRESSED") && p99.contains("ms"), "{p99}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path.join("second/report.json")).unwrap()).unwrap();
    assert_eq!(doc["baseline"]["load_cases"][0]["verdict"], "regressed", "{}", doc["baseline"]);
    let html = std::fs::read_to_string(dir.path.join("second/report.html")).unwrap();
    assert!(html.contains("<tr class=\"regressed\"><td>load case gpu-01/perf/steady</td><td>rps</td>"), "HTML table");

    let (code, trends, err) = proctor(&["trends", "--store", store]).await;
    assert_eq!(code, 0, "{err}");
    let line = trends.lines().find(|l| l.contains("gpu-01/perf/steady")).unwrap_or_else(|| panic!("{trends}"));
    assert!(line.contains("2 runs") && line.contains("/s") && line.contains("p99"), "{line}");

    // The same case at another concurrency measures something else: it is
    // not judged against the baseline (no false regression), and says why.
    let text = std::fs::read_to_string(&suite).unwrap().replace("connections: 2", "connections: 3");
    std::fs::write(&suite, text).unwrap();
    let (code, said) = run(&slow, "third").await;
    assert_eq!(code, 0, "{said}");
    let rps = row(&said, " rps ").unwrap_or_else(|| panic!("{said}"));
    assert!(rps.contains("not compared: its baseline ran closed loop, 2 connections; set it again"), "{rps}");
}
