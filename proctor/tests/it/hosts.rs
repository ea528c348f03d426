//! Several real agents on loopback: placement, waiting for a busy host,
//! contending controllers, lease fencing and renewal, `proctor agents`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use controller::report::{ModelLoad, Outcome};
use controller::{Exit, RunOptions};
use testkit::{Agent, Scratch, Service};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::run::TRANSLATE_SUITE;
use crate::{BIN, lease};

fn inventory(out: &Scratch, hosts: &[(&str, &Agent, &[&str])]) -> std::path::PathBuf {
    let mut text = String::new();
    for (name, agent, labels) in hosts {
        let labels: Vec<String> = labels.iter().map(|l| format!("\"{l}\"")).collect();
        text.push_str(&format!(
            "[[agent]]\nname = \"{name}\"\naddress = \"{}\"\nlabels = [{}]\n\n",
            agent.addr,
            labels.join(", ")
        ));
    }
    out.write("inventory.toml", &text)
}

fn suite_for(model: &str) -> String {
    TRANSLATE_SUITE.replace("name: translate", &format!("name: {model}-suite")).replace("nllb", model)
}

fn load<'a>(loads: &'a [ModelLoad], model: &str) -> &'a ModelLoad {
    loads.iter().find(|l| l.model == model).unwrap_or_else(|| panic!("no load of {model}: {loads:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn suites_with_different_needs_land_on_the_right_hosts_in_parallel() {
    // Host a serves nllb, host b serves aya: each suite can only go one way.
    let a = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=200ms,load=2s,warmup=100ms"])).await;
    let b = Agent::spawn(BIN, &Service::sim(&["aya:mb=8,download=200ms,load=2s,warmup=100ms"])).await;
    let out = Scratch::new("placement");
    let suites = vec![out.write("nllb.yaml", &suite_for("nllb")), out.write("aya.yaml", &suite_for("aya"))];
    let opts = RunOptions {
        inventory: Some(inventory(&out, &[("host-a", &a, &[]), ("host-b", &b, &[])])),
        ..RunOptions::new(vec![], suites, out.path.clone())
    };
    let started = Instant::now();
    let result = controller::run(opts, CancellationToken::new()).await;
    let report = result.report.unwrap();
    assert_eq!(result.exit, Exit::Passed, "{}", report.summary());
    for case in &report.cases {
        let want = if case.suite.starts_with("nllb") { "host-a" } else { "host-b" };
        assert_eq!(case.host, want, "{case:?}");
    }
    // Both 2.3 s loads ran side by side: the whole run is far shorter than two loads back to back.
    assert_eq!(load(&report.loads, "nllb").host, "host-a");
    assert_eq!(load(&report.loads, "aya").host, "host-b");
    assert!(started.elapsed() < Duration::from_millis(4300), "in parallel: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_suite_prefers_the_host_where_its_model_is_loaded_and_honours_labels() {
    let spec = ["nllb:mb=8,download=100ms,load=300ms,warmup=100ms"];
    let cold = Agent::spawn(BIN, &Service::sim(&spec)).await;
    let warm = Agent::spawn(BIN, &Service::sim(&spec)).await;
    // Load the model on `warm` beforehand, as an earlier run would have.
    let out = Scratch::new("affinity");
    let first = controller::run(
        RunOptions::new(vec![warm.addr.clone()], vec![out.write("t.yaml", TRANSLATE_SUITE)], out.path.clone()),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(first.exit, Exit::Passed);
    let inv = inventory(&out, &[("cold", &cold, &["gpu"]), ("warm", &warm, &["gpu"])]);
    let run = |suite: String| {
        let opts = RunOptions {
            inventory: Some(inv.clone()),
            ..RunOptions::new(vec![], vec![out.write("s.yaml", &suite)], out.path.clone())
        };
        controller::run(opts, CancellationToken::new())
    };
    let report = run(TRANSLATE_SUITE.to_owned()).await.report.unwrap();
    assert!(report.cases.iter().all(|c| c.host == "warm" && c.outcome == Outcome::Passed), "{}", report.summary());
    // fresh: no affinity, a cold load wherever memory is most plentiful; still passes.
    let report = run(TRANSLATE_SUITE.replace("models: [nllb]", "models: [nllb]\nfresh: true")).await.report.unwrap();
    assert!(report.cases.iter().all(|c| c.outcome == Outcome::Passed), "{}", report.summary());
    // A label no host carries: unsatisfiable at once, naming each host.
    let result = run(TRANSLATE_SUITE.replace("models: [nllb]", "models: [nllb]\nlabels: [h100]")).await;
    assert_eq!(result.exit, Exit::Infrastructure);
    let Outcome::Error(message) = &result.report.unwrap().cases[0].outcome else { panic!() };
    assert!(
        message.contains("cold: lacks labels [\"h100\"]") && message.contains("warm: lacks labels [\"h100\"]"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shard_auto_splits_cases_across_hosts() {
    let spec = ["nllb:mb=8,download=100ms,load=200ms,warmup=100ms"];
    let a = Agent::spawn(BIN, &Service::sim(&spec)).await;
    let b = Agent::spawn(BIN, &Service::sim(&spec)).await;
    let out = Scratch::new("shard");
    let suite = out.write("t.yaml", &TRANSLATE_SUITE.replace("models: [nllb]", "models: [nllb]\nshard: auto"));
    let opts = RunOptions {
        inventory: Some(inventory(&out, &[("a", &a, &[]), ("b", &b, &[])])),
        ..RunOptions::new(vec![], vec![suite], out.path.clone())
    };
    let report = controller::run(opts, CancellationToken::new()).await.report.unwrap();
    let hosts: Vec<&str> = report.cases.iter().map(|c| c.host.as_str()).collect();
    assert_eq!(hosts.len(), 2);
    assert_ne!(hosts[0], hosts[1], "one case on each host: {}", report.summary());
    assert!(report.cases.iter().all(|c| c.outcome == Outcome::Passed), "{}", report.summary());
}

/// Runs `proctor run` as a child; returns its stdout lines as they come.
fn proctor_run(args: &[&str]) -> (tokio::process::Child, tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) {
    let mut child = tokio::process::Command::new(BIN)
        .arg("run")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("proctor run");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_suite_waits_for_a_busy_host_and_then_runs() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=100ms,load=200ms,warmup=100ms"])).await;
    let mut client = agent.client().await;
    let held = lease(&mut client, "someone-else").await;
    let out = Scratch::new("busy");
    let suite = out.write("t.yaml", TRANSLATE_SUITE);
    let (mut child, mut lines) = proctor_run(&[
        "--agent",
        &agent.addr,
        "--out",
        &out.path.display().to_string(),
        "--progress",
        "none",
        &suite.display().to_string(),
    ]);
    let waiting = testkit::within(Duration::from_secs(20), "the run to say it waits", async {
        let mut said = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            said.push(line.clone());
            if line.contains("busy:") {
                return said.join("\n");
            }
        }
        panic!("no waiting line: {said:?}");
    })
    .await;
    assert!(waiting.contains("suite translate waiting for a host"), "{waiting}");
    assert!(waiting.contains("busy: service translation is held by run someone-else (test) since "), "{waiting}");
    client.release_lease(held).await.unwrap();
    let status = testkit::within(Duration::from_secs(30), "the run to finish", child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_controllers_contend_for_one_service_without_corrupting_each_other() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=100ms,load=1s,warmup=100ms"])).await;
    let first = Scratch::new("contend-1");
    let second = Scratch::new("contend-2");
    let start = |out: &Scratch, name: &str| {
        let suite = out.write("t.yaml", &TRANSLATE_SUITE.replace("name: translate", &format!("name: {name}")));
        proctor_run(&[
            "--agent",
            &agent.addr,
            "--out",
            &out.path.display().to_string(),
            "--progress",
            "none",
            &suite.display().to_string(),
        ])
    };
    let (mut one, one_lines) = start(&first, "first");
    let (mut two, two_lines) = start(&second, "second");
    let (a, b) = tokio::join!(read_all(one_lines), read_all(two_lines));
    let (sa, sb) = (one.wait().await.unwrap(), two.wait().await.unwrap());
    assert_eq!((sa.code(), sb.code()), (Some(0), Some(0)), "both finish and pass:\n{a}\n{b}");
    assert!(a.contains("busy:") || b.contains("busy:"), "one of them waited for the other:\n{a}\n{b}");
    for (out, name) in [(&first, "first"), (&second, "second")] {
        let junit = crate::read_junit(&out.path.join("junit.xml"));
        assert_eq!(junit.matches("<testcase ").count(), 2, "{junit}");
        assert!(junit.contains(&format!("testsuite name=\"{name}\"")), "each report holds only its own suite: {junit}");
        assert!(!junit.contains("<failure") && !junit.contains("<error"), "{junit}");
    }
}

async fn read_all(mut lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> String {
    let mut all = String::new();
    while let Ok(Some(l)) = lines.next_line().await {
        all.push_str(&l);
        all.push('\n');
    }
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_epoch_is_rejected() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=100ms,load=100ms"])).await;
    let mut client = agent.client().await;
    let old = lease(&mut client, "run-a").await;
    client.release_lease(old.clone()).await.unwrap();
    let new = lease(&mut client, "run-b").await;
    assert!(new.epoch > old.epoch);
    let case = proto::Case { case_id: "c1".into(), attempt: 1, name: "late".into(), ..Default::default() };
    let status = client
        .run_cases(proto::RunCasesRequest { lease: Some(old), cases: vec![case], parallel: 0 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains(&format!("is not the current lease; run run-b holds epoch {}", new.epoch)),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_stay_renewed_under_cpu_load() {
    // A one-second lease over a run of several seconds, with both cores busy.
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=500ms,load=3s,warmup=100ms"])).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let burners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            })
        })
        .collect();
    let out = Scratch::new("renew");
    let opts = RunOptions {
        lease_ttl: Duration::from_secs(1),
        keepalive: controller::client::Keepalive {
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(200),
        },
        reconnect_grace: Duration::from_millis(800),
        ..RunOptions::new(vec![agent.addr.clone()], vec![out.write("t.yaml", TRANSLATE_SUITE)], out.path.clone())
    };
    let result = controller::run(opts, CancellationToken::new()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for b in burners {
        b.join().unwrap();
    }
    let report = result.report.unwrap();
    assert_eq!(result.exit, Exit::Passed, "an expired lease would fail the cases: {}", report.summary());
    assert!(report.duration > Duration::from_secs(3), "the run outlived several TTLs");
}

#[tokio::test(flavor = "multi_thread")]
async fn proctor_agents_shows_each_host_and_who_holds_what() {
    let agent =
        Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=100ms,load=100ms"]).model_lines("ram_mb = 64")).await;
    let mut client = agent.client().await;
    let _held = lease(&mut client, "busy-run").await;
    let out = Scratch::new("agents");
    let inv = out.write(
        "inventory.toml",
        &format!("[[agent]]\nname = \"lab-1\"\naddress = \"{}\"\nlabels = [\"gpu\"]\n\n[[agent]]\nname = \"gone\"\naddress = \"127.0.0.1:9\"\n", agent.addr),
    );
    let o = tokio::process::Command::new(BIN).args(["agents", "--inventory"]).arg(&inv).output().await.unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "an unreachable host is exit 2:\n{text}");
    assert!(text.contains(&format!("lab-1 ({}) [gpu]: agent", agent.addr)), "{text}");
    assert!(text.contains("lease held by run busy-run (test)"), "{text}");
    assert!(text.contains(", expires 20"), "each lease shows when it lapses: {text}");
    assert!(text.contains("nllb") && text.contains("STOPPED") && text.contains("needs 64 MiB"), "{text}");
    assert!(text.contains("gone (127.0.0.1:9): UNREACHABLE: cannot reach agent"), "{text}");

    let o = tokio::process::Command::new(BIN)
        .args(["agents", "--output", "json", "--inventory"])
        .arg(&inv)
        .output()
        .await
        .unwrap();
    let hosts: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(hosts[0]["name"], "lab-1");
    assert_eq!(hosts[0]["reachable"], true);
    assert_eq!(hosts[0]["agent"]["services"][0]["lease"]["run_id"], "busy-run");
    assert!(hosts[0]["agent"]["services"][0]["lease"]["expires"].as_str().unwrap().ends_with('Z'));
    assert_eq!(hosts[0]["agent"]["services"][0]["models"][0]["ram_need_bytes"], 64 * 1024 * 1024);
    assert!(hosts[0]["agent"]["ram_total_bytes"].as_u64().unwrap() > 0);
    assert!(hosts[0]["agent"]["heartbeat_age_ms"].as_i64().is_some_and(|ms| (0..5000).contains(&ms)));
    assert_eq!(hosts[1]["reachable"], false);
}
