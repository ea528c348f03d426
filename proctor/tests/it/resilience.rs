//! Runs that survive lost agents: a host killed mid-suite, a partition on
//! real network namespaces, Ctrl-C twice.

use std::time::{Duration, Instant};

use controller::client::Keepalive;
use controller::report::Outcome;
use controller::{Exit, RunOptions};
use proto::{Stage, event};
use testkit::{Agent, Scratch, Service};
use tokio_util::sync::CancellationToken;

use crate::run::TRANSLATE_SUITE;
use crate::{BIN, reached, watch_until};

/// Fast failure detection for tests: ~0.5 s to notice, 1 s grace, 3 s leases.
fn quick(opts: RunOptions) -> RunOptions {
    RunOptions {
        keepalive: Keepalive { interval: Duration::from_millis(200), timeout: Duration::from_millis(300) },
        reconnect_grace: Duration::from_secs(1),
        lease_ttl: Duration::from_secs(3),
        ..opts
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_killed_mid_suite_is_replaced_and_every_case_reported_once() {
    let spec = ["nllb:mb=8,download=200ms,load=3s,warmup=100ms"];
    let first = Agent::spawn(BIN, &Service::sim(&spec)).await;
    // A small memory budget makes the second host the planner's second
    // choice (it prefers the host with most memory to spare), so the suite
    // starts on the first.
    let second = Agent::spawn(BIN, &Service::sim(&spec).agent_lines("[admission]\nmemory_budget_mb = 2000")).await;
    let out = Scratch::new("killed");
    let inventory = out.write(
        "inventory.toml",
        &format!(
            "[[agent]]\nname = \"first\"\naddress = \"{}\"\n\n[[agent]]\nname = \"second\"\naddress = \"{}\"\n",
            first.addr, second.addr
        ),
    );
    let store = controller::store::Location::Sqlite(out.path.join("runs.sqlite"));
    let suite = out.write("t.yaml", TRANSLATE_SUITE);
    let opts = quick(RunOptions {
        inventory: Some(inventory),
        store: Some(store),
        ..RunOptions::new(vec![], vec![suite.clone()], out.path.clone())
    });
    let run = tokio::spawn(controller::run(opts, CancellationToken::new()));

    // Wait until the suite is loading on the first host, then kill its agent.
    let mut client = first.client().await;
    let (_, events) =
        watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::LoadingWeights)).await;
    let service_pid = events
        .iter()
        .find_map(|e| match &e.kind {
            Some(event::Kind::ServiceStarted(s)) => Some(s.pid),
            _ => None,
        })
        .unwrap();
    let scratch = first.kill9();

    let result = testkit::within(Duration::from_secs(40), "the run to finish", run).await.unwrap();
    let report = result.report.unwrap();
    assert_eq!(result.exit, Exit::Passed, "{}", report.summary());
    assert_eq!(report.cases.len(), 2, "every case exactly once");
    for c in &report.cases {
        assert_eq!(c.outcome, Outcome::Passed);
        assert_eq!(c.host, "second", "re-run on the other host: {c:?}");
        // Lost while loading: never sent there, so not a second attempt.
        assert_eq!(c.attempt, 1);
        assert!(c.reruns[0].contains("host first lost"), "{:?}", c.reruns);
    }
    let junit = crate::read_junit(&out.path.join("junit.xml"));
    assert_eq!(junit.matches("<testcase ").count(), 2, "{junit}");
    assert!(junit.contains("flakyError") && junit.contains("re-run: host first lost"), "the re-run shows: {junit}");
    assert!(report.summary().contains("Re-run after infrastructure loss"), "{}", report.summary());

    flaky_across_runs(&second, suite, &out).await;

    // The killed host's service is not left unsupervised: a new agent takes it back.
    assert!(testkit::process_alive(service_pid));
    let again = Agent::restart_from(BIN, scratch).await;
    let mut client = again.client().await;
    let (snapshot, _) = watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await;
    assert_eq!(snapshot.services[0].pid, service_pid, "re-attached");
    drop(client);
    drop(again);
    testkit::until(Duration::from_secs(10), "the re-attached service to be stopped with its agent", || {
        !testkit::process_alive(service_pid)
    })
    .await;
}

/// A second, quiet run on the host left: across the two, each case needed
/// one re-run, and `proctor trends` counts it as flaky.
async fn flaky_across_runs(second: &Agent, suite: std::path::PathBuf, out: &Scratch) {
    let path = out.path.join("runs.sqlite");
    let quiet = RunOptions {
        store: Some(controller::store::Location::Sqlite(path.clone())),
        ..RunOptions::new(vec![second.addr.clone()], vec![suite], out.path.join("quiet"))
    };
    assert_eq!(controller::run(quiet, CancellationToken::new()).await.exit, Exit::Passed);
    let store = path.to_str().unwrap();
    let trends = tokio::process::Command::new(BIN).args(["trends", "--output", "json", "--store", store]).output();
    let trends: serde_json::Value = serde_json::from_slice(&trends.await.unwrap().stdout).unwrap();
    let cases = trends["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2, "{trends}");
    for c in cases {
        assert_eq!((c["runs"].as_u64(), c["reruns"].as_u64(), c["flips"].as_u64()), (Some(2), Some(1), Some(0)), "{c}");
        assert_eq!(c["outcomes"], "PP");
    }
    let text = tokio::process::Command::new(BIN).args(["trends", "--store", store]).output().await.unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("Flaky cases (2 of 2 seen") && text.contains("PP  1 re-run, 0 flips in 2 runs (50 %)"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn timing_that_cannot_work_is_refused() {
    let out = Scratch::new("timing");
    let opts = RunOptions {
        reconnect_grace: Duration::from_secs(60),
        ..RunOptions::new(vec!["127.0.0.1:9".into()], vec![out.write("t.yaml", TRANSLATE_SUITE)], out.path.clone())
    };
    let started = Instant::now();
    let result = controller::run(opts, CancellationToken::new()).await;
    assert_eq!(result.exit, Exit::BadInput, "grace 60 s is longer than the 30 s lease");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Blackhole routes both ways for 20 s while a model loads: both sides notice
/// within 5 s (keepalive 1 s / 2 s), the stream resumes after healing, and the
/// events received have no gap and no duplicate.
#[tokio::test(flavor = "multi_thread")]
async fn a_twenty_second_partition_is_noticed_and_survived_without_gaps() {
    let host = testkit::netns::host().expect("network namespaces (run as root)");
    let service = Service::sim(&["nllb:mb=8,download=1s,load=24s,warmup=500ms"])
        .listen(&format!("{}:0", host.ip))
        .agent_keys("keepalive_interval = \"1s\"\nkeepalive_timeout = \"2s\"");
    let agent = Agent::spawn_in_netns(BIN, &host.ns, &service).await;
    assert!(agent.addr.starts_with(&host.ip), "{}", agent.addr);

    let keepalive = Keepalive { interval: Duration::from_secs(1), timeout: Duration::from_secs(2) };
    let remote = controller::client::Agent::connect_with(
        &controller::inventory::Entry { name: "host".into(), ..controller::inventory::Entry::plain(&agent.addr) },
        keepalive,
    )
    .await
    .unwrap();
    let (tx, mut view) = tokio::sync::watch::channel(controller::client::AgentView::default());
    let (updates, _updates_rx) = controller::run::events::Events::channel();
    let stop = CancellationToken::new();
    tokio::spawn(controller::client::follow(
        controller::client::Interest { run_id: "a run".into(), services: vec!["translation".into()] },
        remote.clone(),
        tx,
        updates,
        stop.clone(),
        Duration::from_secs(40),
    ));
    view.wait_for(|v| !v.incarnation.is_empty()).await.unwrap();
    let lease = remote.acquire("translation", "partition-run", "test", Duration::from_secs(120)).await.unwrap();
    let models = ["nllb".to_owned()];
    let ask = controller::client::EnsureAsk {
        models: &models,
        timeout: None,
        timeout_source: "",
        headroom: 0,
        gpu_headroom: 0,
        fresh: false,
    };
    remote.ensure(&lease, &ask, "").await.unwrap();
    let stage =
        |v: &controller::client::AgentView| v.models.get(&("translation".into(), "nllb".into())).map(|m| m.stage);
    testkit::within(
        Duration::from_secs(20),
        "loading weights",
        view.wait_for(|v| stage(v) == Some(Stage::LoadingWeights)),
    )
    .await
    .unwrap();

    host.partition().unwrap();
    let cut = Instant::now();
    testkit::within(Duration::from_secs(5), "the controller to notice", view.wait_for(|v| v.disconnects >= 1))
        .await
        .unwrap();
    let noticed = cut.elapsed();
    testkit::until(Duration::from_secs(5), "the agent to notice", || agent.logs().contains("watch ended")).await;
    let agent_noticed = cut.elapsed();
    // The partition lasts 20 s; the model keeps loading on the other side.
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(cut.elapsed())).await;
    host.heal().unwrap();
    testkit::within(
        Duration::from_secs(30),
        "the model to be READY, seen after healing",
        view.wait_for(|v| stage(v) == Some(Stage::Ready)),
    )
    .await
    .unwrap();
    stop.cancel();

    assert!(noticed < Duration::from_secs(5), "controller noticed after {noticed:?}");
    assert!(agent_noticed < Duration::from_secs(5), "agent noticed after {agent_noticed:?}");
    assert_every_event_once(&view.borrow());
}

/// Every event of the agent applied once, none skipped, none twice, and each
/// stage transition of the load in order.
fn assert_every_event_once(v: &controller::client::AgentView) {
    assert!(v.events_applied > 20, "events flowed before and after: {}", v.events_applied);
    assert_eq!(v.seq_jumps, 0, "no gap");
    assert_eq!(v.events_applied, v.last_seq - v.first_seq + 1, "no gap and no duplicate");
    assert!(v.gaps.is_empty(), "nothing dropped: {:?}", v.gaps);
    let stages: Vec<Stage> = v.stage_log.iter().filter(|m| m.model == "nllb").map(|m| m.stage).collect();
    assert_eq!(
        stages,
        [
            Stage::ProcessStarting,
            Stage::WaitingForHttp,
            Stage::Downloading,
            Stage::LoadingWeights,
            Stage::WarmingUp,
            Stage::Ready
        ],
        "every stage transition once, in order, including those during the partition"
    );
}

/// A partition longer than the grace: the cases re-run on another host, and
/// the first host's late result — produced under a lease that has since
/// expired — is never merged.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_partition_re_runs_cases_elsewhere_and_fences_the_late_result() {
    let host = testkit::netns::host().expect("network namespaces (run as root)");
    let spec = ["nllb:mb=8,download=100ms,load=300ms,warmup=100ms"];
    let slow = |s: Service| s.flag("--slow-requests").flag("3s");
    let far = Agent::spawn_in_netns(
        BIN,
        &host.ns,
        &slow(Service::sim(&spec))
            .listen(&format!("{}:0", host.ip))
            .agent_keys("keepalive_interval = \"200ms\"\nkeepalive_timeout = \"300ms\""),
    )
    .await;
    // The planner prefers the host with most memory to spare: a small budget
    // makes `near` its second choice, so the case starts on `far`.
    let near = Agent::spawn(BIN, &slow(Service::sim(&spec)).agent_lines("[admission]\nmemory_budget_mb = 2000")).await;
    let out = Scratch::new("long-partition");
    let inventory = out.write(
        "inventory.toml",
        &format!(
            "[[agent]]\nname = \"far\"\naddress = \"{}\"\n\n[[agent]]\nname = \"near\"\naddress = \"{}\"\n",
            far.addr, near.addr
        ),
    );
    let suite = TRANSLATE_SUITE.replace("  - name: health shows it loaded\n    request: {method: GET, path: /health}\n    expect:\n      json:\n        - {pointer: /models/nllb/status, equals: loaded}\n", "");
    let opts = quick(RunOptions {
        inventory: Some(inventory),
        ..RunOptions::new(vec![], vec![out.write("t.yaml", &suite)], out.path.clone())
    });
    let run = tokio::spawn(controller::run(opts, CancellationToken::new()));

    // Once the far host is serving the (slow) case, cut it off.
    let mut client = far.client().await;
    watch_until(
        &mut client,
        0,
        Duration::from_secs(20),
        |e| matches!(&e.kind, Some(event::Kind::Log(l)) if l.line.contains("/translate traceparent=")),
    )
    .await;
    host.partition().unwrap();
    let result = testkit::within(Duration::from_secs(40), "the run to finish", run).await.unwrap();
    host.heal().unwrap();

    let report = result.report.unwrap();
    assert_eq!(result.exit, Exit::Passed, "{}", report.summary());
    assert_eq!(report.cases.len(), 1);
    let case = &report.cases[0];
    assert_eq!((case.host.as_str(), case.attempt), ("near", 2), "{case:?}");
    assert!(case.reruns[0].contains("host far lost"), "{:?}", case.reruns);

    // The far host did finish the first attempt, late, under its old lease…
    let mut client = far.client().await;
    let retained = client
        .fetch_retained(proto::FetchRetainedRequest { run_id: report.run_id.clone(), from_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let late: Vec<proto::CaseResult> = retained
        .events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(event::Kind::CaseFinished(c)) => c.result.clone(),
            _ => None,
        })
        .collect();
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(late[0].attempt, 1);
    // …a lease that expired during the partition: fenced, so never merged.
    let snapshot = watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await.0;
    assert!(
        snapshot.leases.iter().all(|l| l.run_id != report.run_id),
        "the run's lease on the far host is gone: {:?}",
        snapshot.leases
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_case_whose_host_is_lost_three_times_is_given_up_with_every_loss_listed() {
    // Budgets order the planner's choice: most memory to spare first.
    let spec = ["nllb:mb=8,download=100ms,load=60s"];
    let budgets = [6000, 4000, 2000];
    let mut agents = Vec::new();
    for b in budgets {
        agents.push(
            Agent::spawn(BIN, &Service::sim(&spec).agent_lines(&format!("[admission]\nmemory_budget_mb = {b}"))).await,
        );
    }
    let out = Scratch::new("gave-up");
    let entries: String = agents
        .iter()
        .enumerate()
        .map(|(i, a)| format!("[[agent]]\nname = \"h{i}\"\naddress = \"{}\"\n\n", a.addr))
        .collect();
    let inventory = out.write("inventory.toml", &entries);
    let suite = TRANSLATE_SUITE.split("  - name: health").next().unwrap().to_owned();
    let opts = quick(RunOptions {
        inventory: Some(inventory),
        ..RunOptions::new(vec![], vec![out.write("t.yaml", &suite)], out.path.clone())
    });
    let run = tokio::spawn(controller::run(opts, CancellationToken::new()));
    // Each host in turn starts loading the model, and is killed mid-load.
    let mut orphans = Vec::new();
    for agent in agents.drain(..) {
        let mut client = agent.client().await;
        let (_, events) =
            watch_until(&mut client, 0, Duration::from_secs(30), |e| reached(e, "nllb", Stage::LoadingWeights)).await;
        orphans.extend(events.iter().filter_map(|e| match &e.kind {
            Some(event::Kind::ServiceStarted(s)) => Some(s.pid),
            _ => None,
        }));
        drop(agent.kill9());
    }
    let result = testkit::within(Duration::from_secs(60), "the run", run).await.unwrap();
    // The killed agents' services outlive them by design: end them here.
    for pid in orphans {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    }
    let report = result.report.unwrap();
    assert_eq!(result.exit, Exit::Infrastructure, "{}", report.summary());
    assert_eq!(report.cases.len(), 1);
    let case = &report.cases[0];
    let Outcome::Error(message) = &case.outcome else { panic!("{case:?}") };
    assert!(message.contains("gave up after 3 lost attempts"), "{message}");
    assert_eq!(case.reruns.len(), 3, "every loss is listed: {:?}", case.reruns);
    for (i, why) in case.reruns.iter().enumerate() {
        assert!(why.contains(&format!("host h{i} lost")), "loss {i}: {why}");
    }
}
