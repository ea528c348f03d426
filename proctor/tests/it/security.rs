//! Who may drive an agent: mutual TLS against a lab CA made by `proctor
//! certs`' own code, roles from the certificate, bearer tokens, and no
//! plaintext off loopback. Real agent processes, real TLS handshakes.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use controller::certs::{self, Kind, Validity};
use controller::client::{Agent as Remote, Keepalive};
use controller::inventory::{Access, Entry};
use testkit::{Agent, Scratch, Service};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::BIN;

/// A lab: CA, the agent's certificate (named gpu-01 and 127.0.0.1), a
/// controller's and an observer's.
fn lab(dir: &Path) {
    let days = Validity::days(30);
    certs::init(dir, days).unwrap();
    certs::issue(dir, Kind::Agent, "gpu-01", &["127.0.0.1".into()], days).unwrap();
    certs::issue(dir, Kind::Controller, "ci", &[], days).unwrap();
    certs::issue(dir, Kind::Observer, "grafana", &[], days).unwrap();
}

fn mtls_agent(dir: &Path) -> Service {
    let p = |name: &str| dir.join(name).display().to_string();
    Service::sim(&["nllb:mb=8,download=100ms,load=100ms,warmup=50ms"]).agent_keys(&format!(
        "auth = {{ mode = \"mtls\", ca = {:?}, cert = {:?}, key = {:?} }}",
        p("ca.pem"),
        p("agent-gpu-01.pem"),
        p("agent-gpu-01.key")
    ))
}

/// The agent's log once it holds `line` (it is written by another process).
async fn logged(agent: &Agent, line: &str) -> String {
    testkit::within(Duration::from_secs(5), "the agent's log line", async {
        loop {
            let log = agent.logs();
            if log.contains(line) {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(20)).await; // a file has no event to await
        }
    })
    .await
}

/// Connects as `access` says, expecting the agent's certificate to name `tls_name`.
async fn connect(agent: &Agent, access: &Access, tls_name: &str) -> Result<Remote, String> {
    let security = Arc::new(access.read()?);
    let entry = Entry { tls_name: tls_name.into(), security, ..Entry::plain(&agent.addr) };
    Remote::connect_with(&entry, Keepalive::default()).await.map_err(|e| e.to_string())
}

fn access(dir: &Path, ca: &str, who: Option<&str>) -> Access {
    Access {
        ca: Some(dir.join(ca)),
        cert: who.map(|w| dir.join(format!("{w}.pem"))),
        key: who.map(|w| dir.join(format!("{w}.key"))),
        token_file: None,
    }
}

/// A raw client (generated code, not Proctor's controller) over mTLS as `who`.
async fn raw(agent: &Agent, dir: &Path, who: &str) -> proto::agent_client::AgentClient<Channel> {
    let read = |name: String| std::fs::read(dir.join(name)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem".into())))
        .identity(Identity::from_pem(read(format!("{who}.pem")), read(format!("{who}.key"))))
        .domain_name("gpu-01");
    let channel = Endpoint::from_shared(format!("https://{}", agent.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("connect over mTLS");
    proto::agent_client::AgentClient::new(channel)
}

fn lease_request() -> proto::AcquireLeaseRequest {
    proto::AcquireLeaseRequest {
        service: "translation".into(),
        run_id: "r1".into(),
        holder: "test".into(),
        ttl_ms: 60_000,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_lets_in_only_certificates_of_the_lab_ca_naming_the_right_agent() {
    let scratch = Scratch::new("mtls");
    let dir = scratch.path.join("certs");
    lab(&dir);
    // Another CA, an expired certificate, and a self-signed one.
    let other = scratch.path.join("other");
    certs::init(&other, Validity::days(30)).unwrap();
    certs::issue(&other, Kind::Controller, "ci", &[], Validity::days(30)).unwrap();
    let now = SystemTime::now();
    let past =
        Validity { not_before: now - Duration::from_secs(10 * 86400), not_after: now - Duration::from_secs(86400) };
    certs::issue(&dir, Kind::Controller, "old", &[], past).unwrap();
    let agent = Agent::spawn(BIN, &mtls_agent(&dir)).await;

    // (who, the name expected of the agent, part of the error or None for in)
    let other_ca = Access { ca: Some(dir.join("ca.pem")), ..access(&other, "ca.pem", Some("controller-ci")) };
    let self_signed = Access { ca: Some(dir.join("ca.pem")), ..access(&other, "ca.pem", Some("ca")) };
    let table: Vec<(&str, Access, &str, Option<&str>)> = vec![
        ("no client certificate", access(&dir, "ca.pem", None), "gpu-01", Some("refused our certificate")),
        ("a certificate of another CA", other_ca, "gpu-01", Some("refused our certificate")),
        ("a self-signed certificate", self_signed, "gpu-01", Some("refused our certificate")),
        (
            "an expired certificate",
            access(&dir, "ca.pem", Some("controller-old")),
            "gpu-01",
            Some("refused our certificate"),
        ),
        (
            "the agent is not who we asked for",
            access(&dir, "ca.pem", Some("controller-ci")),
            "gpu-02",
            Some("certificate not valid for name \"gpu-02\""),
        ),
        (
            "an agent we cannot verify",
            access(&other, "ca.pem", Some("controller-ci")),
            "gpu-01",
            Some("invalid peer certificate"),
        ),
        ("the lab's controller", access(&dir, "ca.pem", Some("controller-ci")), "gpu-01", None),
        ("the lab's observer", access(&dir, "ca.pem", Some("observer-grafana")), "gpu-01", None),
    ];
    for (who, access, name, refused) in table {
        let got = connect(&agent, &access, name).await;
        match (got, refused) {
            (Ok(_), None) => {}
            (Err(e), Some(part)) => assert!(e.contains(part), "{who}: {e}"),
            (got, want) => panic!("{who}: got {:?}, wanted refused = {want:?}", got.map(|a| a.name)),
        }
    }
    // Plaintext to a TLS agent gets nowhere either.
    assert!(Remote::connect(&agent.addr).await.is_err(), "plaintext is refused");
    // The agent said why, each time, with the peer. Its log is written by
    // another process: read it until the last refusal's line is there.
    let log = logged(&agent, "the client spoke plaintext").await;
    for reason in ["peer sent no certificates", "UnknownIssuer", "certificate expired"] {
        let line = log.lines().find(|l| l.contains("TLS handshake refused") && l.contains(reason));
        assert!(line.is_some_and(|l| l.contains("peer=127.0.0.1:")), "{reason} not logged with the peer: {log}");
    }
    // None of them got as far as a handler: the first lease is the lab controller's.
    let mut controller = raw(&agent, &dir, "controller-ci").await;
    let lease = controller.acquire_lease(lease_request()).await.expect("a controller drives").into_inner();
    assert_eq!(lease.epoch, 1, "{lease:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_observer_may_watch_but_not_drive() {
    let scratch = Scratch::new("roles");
    let dir = scratch.path.join("certs");
    lab(&dir);
    let agent = Agent::spawn(BIN, &mtls_agent(&dir)).await;
    let mut observer = raw(&agent, &dir, "observer-grafana").await;
    observer.get_info(proto::GetInfoRequest {}).await.expect("an observer may ask what the agent is");
    let mut stream = observer.watch(proto::WatchRequest { from_seq: 0 }).await.expect("and watch").into_inner();
    assert!(stream.message().await.unwrap().is_some(), "the snapshot comes");
    let refused = observer.acquire_lease(lease_request()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("observer grafana may not call /proctor.agent.v1.Agent/AcquireLease"),
        "{refused:?}"
    );
    let stop = observer.stop_service(proto::StopServiceRequest::default()).await.unwrap_err();
    assert_eq!(stop.code(), tonic::Code::PermissionDenied);
    // The refusal happened before any handler: no lease was taken.
    let mut controller = raw(&agent, &dir, "controller-ci").await;
    let lease = controller.acquire_lease(lease_request()).await.expect("a controller drives").into_inner();
    assert_eq!(lease.epoch, 1, "the first lease ever granted on this agent: {lease:?}");
    let log = logged(&agent, "call refused").await;
    assert!(log.contains("call refused") && log.contains("peer="), "logged with the peer: {log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_name_the_caller_and_its_role() {
    let scratch = Scratch::new("tokens");
    let tokens = scratch.write(
        "tokens",
        "# role name token\ncontroller ci 5f1e0c2a9b7d4e3f8a6b\nobserver grafana 0a9b8c7d6e5f4a3b2c1d\n",
    );
    let service = Service::sim(&["nllb:mb=8,download=100ms,load=100ms,warmup=50ms"])
        .agent_keys(&format!("auth = {{ mode = \"token\", tokens = {:?} }}", tokens.display().to_string()));
    let agent = Agent::spawn(BIN, &service).await;
    let with = |token: &str| {
        let file = scratch.write(&format!("token-{}", token.len()), token);
        Access { token_file: Some(file), ..Access::default() }
    };
    let none = connect(&agent, &Access::default(), "127.0.0.1").await.map(|a| a.name).unwrap_err();
    assert!(none.contains("no bearer token"), "{none}");
    let wrong = connect(&agent, &with("ffffffffffffffffffff0"), "127.0.0.1").await.map(|a| a.name).unwrap_err();
    assert!(wrong.contains("unknown token"), "{wrong}");
    assert!(connect(&agent, &with("5f1e0c2a9b7d4e3f8a6b"), "127.0.0.1").await.is_ok(), "the controller's token");
    // The observer's token: it may look, not lease.
    let mut client = agent.client().await;
    let mut ask = tonic::Request::new(lease_request());
    ask.metadata_mut().insert("authorization", "Bearer 0a9b8c7d6e5f4a3b2c1d".parse().unwrap());
    let refused = client.acquire_lease(ask).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let bare = client.acquire_lease(lease_request()).await.unwrap_err();
    assert_eq!(bare.code(), tonic::Code::Unauthenticated, "{bare:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_will_not_listen_open_off_loopback() {
    let scratch = Scratch::new("open");
    let config = scratch.write("agent.toml", "listen = \"0.0.0.0:0\"\ndata_dir = \"data\"\n");
    let out = tokio::process::Command::new(BIN).args(["agent", "--config"]).arg(&config).output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("without authentication") && err.contains("docs/security.md"), "{err}");
    assert!(err.contains("line 1, column 10"), "it says where: {err}");
    // Told so explicitly, it starts — and says it loudly.
    let config =
        scratch.write("agent2.toml", "listen = \"0.0.0.0:0\"\ndata_dir = \"data\"\nauth = { insecure = true }\n");
    let mut child = tokio::process::Command::new(BIN)
        .args(["agent", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let warned = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("INSECURE: listening on 0.0.0.0") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(warned, Ok(true), "the insecure agent says so");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_and_its_runs_results_serve_only_who_took_it() {
    let scratch = Scratch::new("owners");
    let dir = scratch.path.join("certs");
    lab(&dir);
    certs::issue(&dir, Kind::Controller, "other-team", &[], Validity::days(30)).unwrap();
    let agent = Agent::spawn(BIN, &mtls_agent(&dir)).await;
    let mut ours = raw(&agent, &dir, "controller-ci").await;
    let mut theirs = raw(&agent, &dir, "controller-other-team").await;
    let l = ours.acquire_lease(lease_request()).await.unwrap().into_inner();
    let lease = proto::LeaseRef { service: l.service, run_id: l.run_id, lease_id: l.id, epoch: l.epoch };
    // Another controller that learnt the lease (a log, a shared CI cache) cannot use it.
    let ensure =
        proto::EnsureModelsRequest { lease: Some(lease.clone()), models: vec!["nllb".into()], ..Default::default() };
    let refused = theirs.ensure_models(ensure.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("taken by ci; only that identity may use it"), "{refused:?}");
    assert_eq!(theirs.release_lease(lease.clone()).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    let take_over = theirs.acquire_lease(lease_request()).await.unwrap_err();
    assert_eq!(take_over.code(), tonic::Code::PermissionDenied, "the same run id is not a way in: {take_over:?}");
    // Nor fetch or acknowledge that run's results.
    let fetch = proto::FetchRetainedRequest { run_id: "r1".into(), from_seq: 0 };
    assert_eq!(theirs.fetch_retained(fetch.clone()).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    let info = ours.get_info(proto::GetInfoRequest {}).await.unwrap().into_inner();
    let ack = proto::AckRequest { run_id: "r1".into(), up_to_seq: 1, incarnation: info.incarnation };
    assert_eq!(theirs.ack(ack.clone()).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    let anyone = proto::FetchRetainedRequest { run_id: String::new(), from_seq: 0 };
    assert_eq!(theirs.fetch_retained(anyone).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    // The owner can do all of it.
    ours.ensure_models(ensure).await.expect("the owner ensures");
    ours.fetch_retained(fetch).await.expect("the owner fetches");
    ours.ack(ack).await.expect("the owner acknowledges");
    ours.release_lease(lease).await.expect("the owner releases");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_message_is_refused_and_the_agent_serves_on() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=8,download=50ms,load=50ms"])).await;
    let mut client = agent.client().await.max_encoding_message_size(64 * 1024 * 1024);
    let held = super::lease(&mut client, "big").await;
    let case = proto::Case {
        case_id: "big/1".into(),
        kind: Some(proto::case::Kind::Http(proto::HttpCase {
            method: "POST".into(),
            path: "/translate".into(),
            body: vec![b'x'; proto::MAX_MESSAGE_BYTES + 1],
            ..Default::default()
        })),
        ..Default::default()
    };
    let refused = client
        .run_cases(proto::RunCasesRequest { lease: Some(held), cases: vec![case], parallel: 0 })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("limit 16 MiB"), "{refused:?}");
    // Still serving, on the same connection and a new one.
    client.get_info(proto::GetInfoRequest {}).await.expect("the same connection still works");
    agent.client().await.get_info(proto::GetInfoRequest {}).await.expect("a new one too");
}

/// A careless service: prints its token whole, split across two writes of
/// one line, inside a URL, in its access log, in its health error — and
/// answers a case with it.
const CARELESS: &str = r#"
import http.server, json, os, sys, time
tok = os.environ["HF_TOKEN"]
print("logging in to the hub with", tok, flush=True)
sys.stdout.write("split token: " + tok[:7]); sys.stdout.flush(); time.sleep(0.2)
sys.stdout.write(tok[7:] + "\n"); sys.stdout.flush()
print(f"GET https://user:{tok}@huggingface.co/api/models/aya", flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            body = {"models": {"nllb": {"status": "loaded", "error": f"warning: {tok} expires soon"}}}
        else:
            body = {"token": tok, "hello": "world"}
        data = json.dumps(body).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
    def log_message(self, *args):
        print("access", self.path, "as", tok, flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

const WHOAMI: &str = "name: whoami
service: translation
models: [nllb]
cases:
  - name: who am I
    request: {method: GET, path: /whoami}
    expect:
      json:
        - {pointer: /token, equals: somebody-else}
";

#[tokio::test(flavor = "multi_thread")]
async fn a_canary_secret_appears_nowhere_the_agent_or_the_controller_writes() {
    let canary = "hf_canary_5e2b7c91d4";
    let scratch = Scratch::new("canary");
    let script = scratch.write("careless.py", CARELESS);
    scratch.write("hf.token", &format!("{canary}\n"));
    let config = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[[service]]\nname = \"translation\"\n\
         command = [\"python3\", \"-u\", {:?}, \"{{port}}\"]\nsecrets = {{ HF_TOKEN = {:?} }}\n\n\
         [[service.model]]\nname = \"nllb\"\n",
        script.display().to_string(),
        scratch.path.join("hf.token").display().to_string()
    );
    let agent = Agent::spawn_config(BIN, &config).await;
    let out = Scratch::new("canary-out");
    let suite = out.write("whoami.yaml", WHOAMI);
    let opts = controller::RunOptions::new(vec![agent.addr.clone()], vec![suite], out.path.clone());
    let result = controller::run(opts, tokio_util::sync::CancellationToken::new()).await;
    assert_eq!(result.exit, controller::Exit::TestFailures, "the case fails on the token, as it should");
    // Every place a token could end up.
    let mut client = agent.client().await;
    let (snapshot, _) = super::watch_until(&mut client, u64::MAX, Duration::from_secs(5), |_| true).await;
    let last = snapshot.next_seq - 1;
    let (_, events) = super::watch_until(&mut client, 0, Duration::from_secs(5), |e| e.seq >= last).await;
    let agents = tokio::process::Command::new(BIN)
        .args(["agents", "--agent", &agent.addr, "--output", "json"])
        .output()
        .await
        .unwrap();
    let state: String = std::fs::read_dir(agent.scratch.path.join("data"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    let places = [
        ("the agent's log", agent.logs()),
        ("the event stream", format!("{events:?}")),
        ("junit.xml", crate::read_junit(&result.junit.unwrap())),
        ("trace.json", std::fs::read_to_string(result.files.trace.unwrap()).unwrap()),
        ("report.json", std::fs::read_to_string(result.files.json.unwrap()).unwrap()),
        ("summary.md", std::fs::read_to_string(result.files.markdown.unwrap()).unwrap()),
        ("state files", state),
        ("proctor agents --output json", String::from_utf8_lossy(&agents.stdout).into_owned()),
    ];
    for (place, text) in &places {
        assert!(!text.is_empty() || *place == "state files", "{place} is empty: nothing was checked");
        assert!(!text.contains(canary), "the canary reached {place}: {text}");
        assert!(!text.contains(&canary[7..]), "half the canary reached {place}");
    }
    let said = format!("{events:?}");
    assert!(said.contains("split token: [REDACTED: HF_TOKEN]"), "a value written in two pieces is still one line");
    assert!(said.contains("user:[REDACTED: HF_TOKEN]@huggingface.co"), "inside a URL too");
    let junit = &places[2].1;
    assert!(junit.contains("[REDACTED: HF_TOKEN]"), "the failing assertion shows where the value was: {junit}");
}
