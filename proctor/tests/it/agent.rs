//! The agent process on its own: journal, memory sampling, supervision.

use std::time::{Duration, Instant};

use proto::{ExitKind, Stage, event};
use testkit::{Agent, Service};

use crate::{BIN, lease, reached, watch_until};

#[tokio::test(flavor = "multi_thread")]
async fn sampled_tree_rss_includes_children_and_matches_proc() {
    // 96 MiB in the service itself, 64 MiB in a worker child.
    let agent = Agent::spawn(
        BIN,
        &Service::sim(&["nllb:mb=96,download=100ms,load=500ms,warmup=100ms"]).flag("--worker-mb").flag("64"),
    )
    .await;
    let mut client = agent.client().await;
    let lease = lease(&mut client, "rss").await;
    client
        .ensure_models(proto::EnsureModelsRequest {
            lease: Some(lease),
            models: vec!["nllb".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut pid = 0;
    // Wait for READY, then for two telemetry samples after it.
    let mut ready = false;
    let mut samples_after_ready = 0;
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(30), |e| {
        match &e.kind {
            Some(event::Kind::ServiceStarted(s)) => pid = s.pid,
            Some(event::Kind::Telemetry(_)) if ready => samples_after_ready += 1,
            _ => ready |= reached(e, "nllb", Stage::Ready),
        }
        samples_after_ready == 2
    })
    .await;
    assert!(pid > 0, "ServiceStarted seen");
    let Some(event::Kind::Telemetry(t)) = &events.last().unwrap().kind else { unreachable!() };
    let sampled = t.services[0].rss_bytes;
    let truth = testkit::proc_tree_rss(pid);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let diff = (sampled as f64 - truth as f64).abs() / truth as f64;
    assert!(diff <= 0.10, "sampled {:.1} MiB vs /proc {:.1} MiB ({:.1}% off)", mib(sampled), mib(truth), diff * 100.0);
    assert!(t.services[0].processes >= 2, "the worker child is part of the tree: {t:?}");
    assert!(
        mib(sampled) >= (96.0 + 64.0) * 0.95,
        "both the service's and the worker's memory are counted: {:.1} MiB",
        mib(sampled)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_from_k_delivers_a_snapshot_then_exactly_the_events_from_k() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=300ms,load=300ms,warmup=100ms"])).await;
    let mut client = agent.client().await;
    let lease = lease(&mut client, "watch").await;
    client
        .ensure_models(proto::EnsureModelsRequest {
            lease: Some(lease),
            models: vec!["nllb".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let (_, all) = watch_until(&mut client, 0, Duration::from_secs(30), |e| reached(e, "nllb", Stage::Ready)).await;
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "seq numbers are dense from 1");
    assert!(all.len() > 6, "enough events to pick from: {}", all.len());

    let k = all[all.len() / 2].seq;
    let last = all.last().unwrap().seq;
    let (snapshot, from_k) = watch_until(&mut client, k, Duration::from_secs(10), |e| e.seq == last).await;
    assert_eq!(snapshot.incarnation, all[0].incarnation);
    assert!(snapshot.next_seq > last);
    let expected: Vec<&proto::Event> = all.iter().filter(|e| e.seq >= k).collect();
    assert_eq!(from_k.iter().collect::<Vec<_>>(), expected, "exactly the events from {k} on, unchanged");
    let model = snapshot.services[0].models.iter().find(|m| m.name == "nllb").unwrap();
    assert_eq!(model.stage(), Stage::Ready, "the snapshot shows the current stage");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_ignoring_sigterm_is_killed_after_grace_with_its_whole_group() {
    let service = Service::sim(&["nllb:mb=8,download=100ms,load=100ms,warmup=100ms"])
        .flag("--ignore-sigterm")
        .flag("--worker-mb")
        .flag("4")
        .stop_grace("1s");
    let agent = Agent::spawn(BIN, &service).await;
    let mut client = agent.client().await;
    let lease = lease(&mut client, "stop").await;
    client
        .ensure_models(proto::EnsureModelsRequest {
            lease: Some(lease.clone()),
            models: vec!["nllb".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut pid = 0;
    watch_until(&mut client, 0, Duration::from_secs(30), |e| {
        if let Some(event::Kind::ServiceStarted(s)) = &e.kind {
            pid = s.pid;
        }
        reached(e, "nllb", Stage::Ready)
    })
    .await;
    assert!(testkit::group_alive(pid));
    let asked = Instant::now();
    let exit =
        client.stop_service(proto::StopServiceRequest { lease: Some(lease) }).await.unwrap().into_inner().exit.unwrap();
    assert_eq!(exit.kind(), ExitKind::KilledAfterGrace, "{exit:?}");
    assert!(asked.elapsed() >= Duration::from_secs(1), "the grace was honoured: {:?}", asked.elapsed());
    assert!(!testkit::group_alive(pid), "no process of the service's group remains");
    assert!(agent.logs().contains("ignored the stop signal"), "the agent says why it escalated");
}
