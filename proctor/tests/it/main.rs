//! End-to-end tests of the `proctor` binary: real agent processes, real sim
//! services, real gRPC and HTTP. One integration-test binary for the crate.

mod agent;
mod cli;
mod commands;
mod gpu;
mod hosts;
mod load;
mod loading;
mod promises;
mod reports;
mod resilience;
mod run;
mod security;
mod store;
mod supervision;
mod tracing;

use std::time::Duration;

use proto::agent_client::AgentClient;
use proto::{Event, Stage, event, watch_message};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_proctor");

/// A `junit.xml` a run wrote, after checking it against the JUnit schema CI
/// servers read (`tests/fixtures/junit.xsd`, with `xmllint`; .ci/run
/// installs it): every test that reads a JUnit file also validates it.
pub fn read_junit(path: &std::path::Path) -> String {
    let schema = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/junit.xsd");
    let checked = std::process::Command::new("xmllint")
        .args(["--noout", "--schema"])
        .arg(&schema)
        .arg(path)
        .output()
        .expect("xmllint (Debian libxml2-utils) validates junit.xml");
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        checked.status.success(),
        "{} is not valid JUnit: {}\n{text}",
        path.display(),
        String::from_utf8_lossy(&checked.stderr)
    );
    text
}

/// Takes a lease on `translation` for a test run.
pub async fn lease(client: &mut AgentClient<Channel>, run_id: &str) -> proto::LeaseRef {
    let l = client
        .acquire_lease(proto::AcquireLeaseRequest {
            service: "translation".into(),
            run_id: run_id.into(),
            holder: "test".into(),
            ttl_ms: 60_000,
        })
        .await
        .expect("lease")
        .into_inner();
    proto::LeaseRef { service: l.service, run_id: l.run_id, lease_id: l.id, epoch: l.epoch }
}

/// Opens a watch from `from_seq` and collects events until `stop` says so.
/// Returns the snapshot and the events (gaps would panic: none expected).
pub async fn watch_until(
    client: &mut AgentClient<Channel>,
    from_seq: u64,
    limit: Duration,
    mut stop: impl FnMut(&Event) -> bool,
) -> (proto::Snapshot, Vec<Event>) {
    let mut stream = client.watch(proto::WatchRequest { from_seq }).await.expect("watch").into_inner();
    let first = stream.message().await.expect("watch message").expect("a first message");
    let Some(watch_message::Kind::Snapshot(snapshot)) = first.kind else {
        panic!("watch must open with a snapshot, got {first:?}")
    };
    let mut events = Vec::new();
    testkit::within(limit, "the expected events", async {
        while let Some(m) = stream.message().await.expect("watch stream") {
            match m.kind {
                Some(watch_message::Kind::Event(e)) => {
                    let done = stop(&e);
                    events.push(e);
                    if done {
                        return;
                    }
                }
                other => panic!("unexpected watch message {other:?}"),
            }
        }
    })
    .await;
    (snapshot, events)
}

pub fn reached(e: &Event, model: &str, stage: Stage) -> bool {
    matches!(&e.kind, Some(event::Kind::StageChanged(c)) if c.model == model && c.to() == stage)
}

/// The whole load-timeout precedence (DESIGN §4), across the controller's
/// part (CLI flag > suite > MODEL_LOADING_TIMEOUT where `proctor run` runs)
/// and the agent's (its MODEL_LOADING_TIMEOUT > agent config > default).
#[test]
fn load_timeout_precedence_across_controller_and_agent() {
    let s = Duration::from_secs;
    // (cli, suite, controller env, agent env, config, effective)
    let table = [
        (Some(1), Some(2), Some(5), Some("3"), Some(4), s(1)),
        (None, Some(2), Some(5), Some("3"), Some(4), s(2)),
        (None, None, Some(5), Some("3"), Some(4), s(5)),
        (None, None, None, Some("3"), Some(4), s(3)),
        (None, None, None, None, Some(4), s(4)),
        (None, None, None, None, None, ::agent::config::DEFAULT_LOAD_TIMEOUT),
    ];
    for (cli, suite, ours, env, config, want) in table {
        let sent = controller::run::requested_timeout(cli.map(s), suite.map(s), ours.map(s)).map(|(t, _)| t);
        let effective = ::agent::config::load_timeout(sent, env, config.map(s));
        assert_eq!(effective, want, "cli {cli:?} suite {suite:?} ours {ours:?} env {env:?} config {config:?}");
    }
}
