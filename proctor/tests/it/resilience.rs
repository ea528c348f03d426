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
    let second = Agent::spawn(BIN, &Service::sim(&spec)).await;
    let out = Scratch::new("killed");
    let inventory = out.write(
        "inventory.toml",
        &format!(
            "[[agent]]\nname = \"first\"\naddress = \"{}\"\n\n[[agent]]\nname = \"second\"\naddress = \"{}\"\n",
            first.addr, second.addr
        ),
    );
    let opts = quick(RunOptions {
        inventory: Some(inventory),
        ..RunOptions::new(vec![], vec![out.write("t.yaml", TRANSLATE_SUITE)], out.path.clone())
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
        assert_eq!(c.attempt, 2);
        assert!(c.reruns[0].contains("host first lost"), "{:?}", c.reruns);
    }
    let junit = std::fs::read_to_string(out.path.join("junit.xml")).unwrap();
    assert_eq!(junit.matches("<testcase ").count(), 2, "{junit}");
    assert!(junit.contains("flakyError") && junit.contains("re-run: host first lost"), "the re-run shows: {junit}");
    assert!(report.summary().contains("Re-run after infrastructure loss"), "{}", report.summary());

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
