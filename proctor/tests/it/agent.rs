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

/// Reads a watch stream until it ends or `limit` passes; returns the event
/// seqs seen and the gaps announced.
async fn drain(stream: &mut tonic::Streaming<proto::WatchMessage>, limit: Duration) -> (Vec<u64>, Vec<(u64, u64)>) {
    use proto::watch_message::Kind;
    let (mut seqs, mut gaps) = (Vec::new(), Vec::new());
    let _ = tokio::time::timeout(limit, async {
        while let Ok(Some(m)) = stream.message().await {
            match m.kind {
                Some(Kind::Event(e)) => seqs.push(e.seq),
                Some(Kind::Gap(g)) => gaps.push((g.from_seq, g.to_seq)),
                _ => {}
            }
        }
    })
    .await;
    (seqs, gaps)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_watcher_is_cut_off_and_resumes_with_a_gap_and_no_duplicates() {
    // A service that logs 40,000 lines at once: 40,000 events, far more than
    // a watcher's buffer (4,096) and the replay ring (8,192).
    let config = r#"listen = "127.0.0.1:0"
data_dir = "data"

[[service]]
name = "translation"
command = ["sh", "-c", "seq 1 40000 | sed 's/^/flood line /'; exec sleep 600"]

[[service.model]]
name = "nllb"
"#;
    let agent = Agent::spawn_config(BIN, config).await;
    let mut slow = agent.client().await;
    let mut stream = slow.watch(proto::WatchRequest { from_seq: 1 }).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(proto::watch_message::Kind::Snapshot(_))));

    // The flood, while this watcher reads nothing.
    let mut client = agent.client().await;
    let held = lease(&mut client, "flood").await;
    let ensure = proto::EnsureModelsRequest { lease: Some(held), models: vec!["nllb".into()], ..Default::default() };
    client.ensure_models(ensure).await.unwrap();
    testkit::within(Duration::from_secs(60), "the flood to be journaled", async {
        loop {
            let (snapshot, _) = watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await;
            if snapshot.next_seq > 40_000 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;

    // The slow watcher was cut off: its stream ends well short of the flood.
    let (seen, _) = drain(&mut stream, Duration::from_secs(20)).await;
    let last = *seen.last().expect("some events before the cut");
    assert!(last < 30_000, "cut off after falling behind, not fed everything: last seq {last}");
    assert_eq!(seen, (1..=last).collect::<Vec<_>>(), "dense up to the cut");

    // It resumes from where it stopped: a gap for what the ring dropped, then
    // every later event once, in order.
    // (Retained events — stage changes — inside the gap come before its marker.)
    let mut resumed = slow.watch(proto::WatchRequest { from_seq: last + 1 }).await.unwrap().into_inner();
    let (after, gaps) = drain(&mut resumed, Duration::from_secs(5)).await;
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    let (from, to) = gaps[0];
    assert_eq!(from, last + 1, "the gap starts right after the last event seen");
    let (kept, rest): (Vec<u64>, Vec<u64>) = after.iter().partition(|s| **s <= to);
    assert!(kept.iter().all(|s| *s > last), "nothing already seen is sent again: {kept:?}");
    assert_eq!(rest.first(), Some(&(to + 1)), "events resume right after the gap");
    assert!(rest.windows(2).all(|w| w[1] == w[0] + 1), "no duplicate, no skip after the gap");
}

#[test]
fn the_shipped_systemd_unit_lets_services_outlive_an_agent_crash() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let unit = std::fs::read_to_string(root.join("deploy/systemd/proctor-agent.service")).unwrap();
    let setting = |key: &str| {
        unit.lines().find_map(|l| l.trim().strip_prefix(&format!("{key}="))).map(str::to_owned).unwrap_or_default()
    };
    // Re-attach after a crash only works if systemd leaves the services alone.
    assert_eq!(setting("KillMode"), "process", "{unit}");
    assert_eq!(setting("Restart"), "on-failure", "{unit}");
    assert_eq!(setting("Type"), "notify", "ready when the port is bound: {unit}");
    assert_eq!(setting("Delegate"), "yes", "service cgroups live below the agent's: {unit}");
    // systemd itself finds nothing wrong with it (ExecStart pointed at this build).
    let scratch = testkit::Scratch::new("unit");
    let here = scratch.write("proctor-agent.service", &unit.replace("/usr/local/bin/proctor", BIN));
    let verify = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&here)
        .output()
        .expect("systemd-analyze (package systemd) is needed to check the shipped unit; .ci/run installs it");
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && !said.contains(&here.display().to_string()), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn under_systemd_the_agent_says_ready_once_it_serves() {
    // systemd's side of Type=notify: a datagram socket named by NOTIFY_SOCKET.
    let scratch = testkit::Scratch::new("notify");
    let socket_path = scratch.path.join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let config = scratch.write("agent.toml", "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n");
    let mut child = tokio::process::Command::new(BIN)
        .args(["agent", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(20), socket.recv(&mut buf)).await.expect("notified").unwrap();
    let said = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(said.contains("READY=1"), "{said}");
    // Ready means serving: the port answers now.
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().unwrap();
    let addr = line.strip_prefix("proctor agent listening on ").unwrap().split_whitespace().next().unwrap();
    let mut client = proto::agent_client::AgentClient::connect(format!("http://{addr}")).await.unwrap();
    client.get_info(proto::GetInfoRequest {}).await.expect("serving");
}

/// Malicious case paths and headers, each aimed at `authority` (another
/// server on the lab network).
fn malicious(authority: &str) -> Vec<(String, Vec<(&'static str, String)>)> {
    let path = |p: String| (p, Vec::new());
    let header = |name: &'static str, value: String| ("/health".to_owned(), vec![(name, value)]);
    vec![
        path(format!("@{authority}/latest/meta-data")),
        path(format!("//{authority}/latest/meta-data")),
        path(format!("http://{authority}/latest/meta-data")),
        path(format!("https://{authority}/latest/meta-data")),
        path(format!("/\\{authority}/latest/meta-data")),
        path(format!("\\\\{authority}\\latest")),
        path(format!("/x HTTP/1.1\r\nHost: {authority}\r\n\r\nGET /latest/meta-data")),
        path(format!("user:pass@{authority}/x")),
        path(format!("?@{authority}/x")),
        path(format!("/x\u{0}@{authority}")),
        header("Host", authority.to_owned()),
        header("X-Forwarded", format!("v\r\nHost: {authority}")),
        header("X-Smuggle\r\nHost", authority.to_owned()),
        header("Transfer-Encoding", "chunked".to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_case_path_cannot_turn_the_agent_into_a_proxy() {
    // Another listener on the lab network the agent must never be made to
    // reach: it counts every connection it gets.
    let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority = elsewhere.local_addr().unwrap().to_string();
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while elsewhere.accept().await.is_ok() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=50ms,load=50ms"])).await;
    let mut client = agent.client().await;
    let held = lease(&mut client, "proxy").await;
    let ensure =
        proto::EnsureModelsRequest { lease: Some(held.clone()), models: vec!["nllb".into()], ..Default::default() };
    client.ensure_models(ensure).await.unwrap();
    watch_until(&mut client, 0, Duration::from_secs(20), |e| reached(e, "nllb", Stage::Ready)).await;
    let attempts = malicious(&authority);
    let cases: Vec<proto::Case> = attempts
        .iter()
        .enumerate()
        .map(|(i, (path, headers))| proto::Case {
            case_id: format!("proxy/{i}"),
            name: format!("sneaky {i}"),
            kind: Some(proto::case::Kind::Http(proto::HttpCase {
                method: "GET".into(),
                path: path.clone(),
                headers: headers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
                ..Default::default()
            })),
            ..Default::default()
        })
        .collect();
    let last = format!("proxy/{}", cases.len() - 1);
    client.run_cases(proto::RunCasesRequest { lease: Some(held), cases, parallel: 0 }).await.unwrap();
    let (_, events) = watch_until(&mut client, 0, Duration::from_secs(10), |e| {
        matches!(&e.kind, Some(event::Kind::CaseFinished(c)) if c.result.as_ref().is_some_and(|r| r.case_id == last))
    })
    .await;
    let results: Vec<&proto::CaseResult> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(event::Kind::CaseFinished(c)) => c.result.as_ref(),
            _ => None,
        })
        .collect();
    assert_eq!(results.len(), attempts.len());
    for (r, (path, headers)) in results.iter().zip(&attempts) {
        assert_eq!(r.outcome(), proto::CaseOutcome::Error, "{path:?} {headers:?}: {r:?}");
        let said = &r.message;
        assert!(said.contains("would leave the service") || said.contains("case header"), "{path:?}: {said}");
    }
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 0, "the other listener was never reached");
}
