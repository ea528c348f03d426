//! Test-only helpers: scratch folders, a real `proctor agent` process
//! supervising `proctor sim`, and bounded waits. Tests read like the domain:
//!
//! ```ignore
//! let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=32,load=2s"])).await;
//! let mut client = agent.client().await;
//! ```

pub mod netns;
pub mod postgres;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use proto::agent_client::AgentClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Channel;

/// A folder of its own for one test, removed when dropped.
#[derive(Debug)]
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("proctor-test-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create scratch folder");
        Scratch { path }
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, text).expect("write scratch file");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// One `proctor sim` service in an agent config.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub models: Vec<String>,
    pub sim_flags: Vec<String>,
    pub stop_grace: String,
    pub secret: Option<(String, String)>,
    pub model_timeout: Option<String>,
    pub load_mode: String,
    /// Top-level agent config lines (e.g. an `[admission]` table goes last).
    pub agent_extra: String,
    /// Lines added to every `[[service.model]]` table.
    pub model_extra: String,
    /// Top-level agent keys (before any table), e.g. `keepalive_interval = "1s"`.
    pub agent_top: String,
    /// Lines added to the `[[service]]` table.
    pub service_extra: String,
    /// The agent's listen address.
    pub listen: String,
}

impl Service {
    /// A sim service named `translation` with these model specs.
    pub fn sim(models: &[&str]) -> Service {
        Service {
            name: "translation".into(),
            models: models.iter().map(|s| s.to_string()).collect(),
            sim_flags: Vec::new(),
            stop_grace: "5s".into(),
            secret: None,
            model_timeout: None,
            load_mode: "at_start".into(),
            agent_extra: String::new(),
            model_extra: String::new(),
            agent_top: String::new(),
            service_extra: String::new(),
            listen: "127.0.0.1:0".into(),
        }
    }

    pub fn flag(mut self, flag: &str) -> Service {
        self.sim_flags.push(flag.to_owned());
        self
    }

    pub fn stop_grace(mut self, grace: &str) -> Service {
        self.stop_grace = grace.to_owned();
        self
    }

    pub fn secret(mut self, name: &str, value: &str) -> Service {
        self.secret = Some((name.to_owned(), value.to_owned()));
        self
    }

    pub fn model_timeout(mut self, timeout: &str) -> Service {
        self.model_timeout = Some(timeout.to_owned());
        self
    }

    /// `endpoint`: the agent asks for each model with `POST /models/{name}/load`
    /// (and the sim is started `--lazy`).
    pub fn load_mode(mut self, mode: &str) -> Service {
        self.load_mode = mode.to_owned();
        if mode == "endpoint" {
            self.sim_flags.push("--lazy".into());
        }
        self
    }

    /// Adds lines to every model's table, e.g. `stall = { default = "2s" }`.
    pub fn model_lines(mut self, lines: &str) -> Service {
        self.model_extra.push_str(lines);
        self.model_extra.push('\n');
        self
    }

    /// The agent listens here (e.g. a network namespace's address, port 0).
    pub fn listen(mut self, addr: &str) -> Service {
        self.listen = addr.to_owned();
        self
    }

    /// Adds lines to the service's table, e.g. `memory_limit_mb = 64`.
    pub fn service_lines(mut self, lines: &str) -> Service {
        self.service_extra.push_str(lines);
        self.service_extra.push('\n');
        self
    }

    /// Adds top-level agent keys, e.g. `keepalive_interval = "1s"`.
    pub fn agent_keys(mut self, lines: &str) -> Service {
        self.agent_top.push_str(lines);
        self.agent_top.push('\n');
        self
    }

    /// Adds agent-level tables after the service, e.g. `[admission]`.
    pub fn agent_lines(mut self, lines: &str) -> Service {
        self.agent_extra.push_str(lines);
        self.agent_extra.push('\n');
        self
    }

    fn model_names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.split(':').next().unwrap_or_default().to_owned()).collect()
    }

    /// The agent config text for this service, run by `bin`.
    pub fn agent_toml(&self, bin: &str, dir: &Path) -> String {
        let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let mut command = vec![q(bin), q("sim"), q("--port"), q("{port}")];
        for m in &self.models {
            command.push(q("--model"));
            command.push(q(m));
        }
        command.extend(self.sim_flags.iter().map(|f| q(f)));
        // Multi-host tests listen on namespace addresses: plaintext there is
        // their explicit choice (the partitions are the point, not TLS).
        let loopback = self.listen.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback());
        let insecure = if loopback || self.agent_top.contains("auth") { "" } else { "auth = { insecure = true }\n" };
        let mut text = format!(
            "listen = {}\ndata_dir = {}\n{insecure}{}\n[[service]]\nname = {}\ncommand = [{}]\nstop_grace = {}\n",
            q(&self.listen),
            q(&dir.join("data").display().to_string()),
            self.agent_top,
            q(&self.name),
            command.join(", "),
            q(&self.stop_grace),
        );
        text.push_str(&self.service_extra);
        if let Some((name, value)) = &self.secret {
            let file = dir.join("secret.token");
            std::fs::write(&file, value).expect("write secret");
            text.push_str(&format!("secrets = {{ {name} = {} }}\n", q(&file.display().to_string())));
        }
        for m in self.model_names() {
            text.push_str(&format!("\n[[service.model]]\nname = {}\nload = {}\n", q(&m), q(&self.load_mode)));
            if let Some(t) = &self.model_timeout {
                text.push_str(&format!("timeout = {}\n", q(t)));
            }
            text.push_str(&self.model_extra);
        }
        text.push('\n');
        text.push_str(&self.agent_extra);
        text
    }
}

/// Set in every test agent's environment; a service must not see it.
pub const CANARY_ENV: &str = "PROCTOR_TEST_CANARY";

/// A real `proctor agent` child process. Dropping it stops it with SIGTERM
/// (so it stops its services) and waits.
#[derive(Debug)]
pub struct Agent {
    pub addr: String,
    pub pid: u32,
    pub scratch: Scratch,
    child: Option<tokio::process::Child>,
}

impl Agent {
    pub async fn spawn(bin: &str, service: &Service) -> Agent {
        let scratch = Scratch::new(&service.name);
        let text = service.agent_toml(bin, &scratch.path);
        Agent::spawn_with(bin, scratch, &text).await
    }

    /// A real agent inside network namespace `ns`.
    pub async fn spawn_in_netns(bin: &str, ns: &str, service: &Service) -> Agent {
        let scratch = Scratch::new(&service.name);
        let text = service.agent_toml(bin, &scratch.path);
        let config = scratch.write("agent.toml", &text);
        // nsenter --net, not `ip netns exec`: the latter remounts /sys, which
        // hides /sys/fs/cgroup from the agent.
        let child = tokio::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args([bin, "agent", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .envs(require_cgroup())
            .env(CANARY_ENV, "leaked")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(scratch.path.join("agent.stderr")).expect("stderr file")))
            .spawn()
            .expect("spawn proctor agent in a network namespace");
        Agent::attach(child, scratch).await
    }

    /// An agent from a config text written by the test.
    pub async fn spawn_config(bin: &str, config: &str) -> Agent {
        Agent::spawn_with(bin, Scratch::new("custom"), config).await
    }

    async fn spawn_with(bin: &str, scratch: Scratch, text: &str) -> Agent {
        let config = scratch.write("agent.toml", text);
        let child = tokio::process::Command::new(bin)
            .args(["agent", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .envs(require_cgroup())
            // Must never reach a service: its environment is filtered.
            .env(CANARY_ENV, "leaked")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(scratch.path.join("agent.stderr"))
                    .expect("stderr file"),
            ))
            .spawn()
            .expect("spawn proctor agent");
        Agent::attach(child, scratch).await
    }

    /// Waits for a started agent's address line.
    async fn attach(mut child: tokio::process::Child, scratch: Scratch) -> Agent {
        let pid = child.id().expect("agent pid");
        let stdout = child.stdout.take().expect("agent stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = within(Duration::from_secs(20), "the agent to print its address", async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("proctor agent listening on ") {
                    return rest.split_whitespace().next().unwrap_or_default().to_owned();
                }
            }
            panic!("agent exited before listening; see {}", scratch.path.join("agent.stderr").display());
        })
        .await;
        // Keep draining stdout so the agent never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Agent { addr, pid, scratch, child: Some(child) }
    }

    pub async fn client(&self) -> AgentClient<Channel> {
        AgentClient::connect(format!("http://{}", self.addr)).await.expect("connect to agent")
    }

    /// Kills the agent with SIGKILL (no cleanup: its services keep running)
    /// and hands back its folder, to start another agent from.
    pub fn kill9(mut self) -> Scratch {
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        if let Some(mut child) = self.child.take() {
            for _ in 0..200 {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let path = std::mem::replace(&mut self.scratch.path, PathBuf::new());
        Scratch { path }
    }

    /// Starts a new agent from the config a previous one left in `scratch`.
    pub async fn restart_from(bin: &str, scratch: Scratch) -> Agent {
        let text = std::fs::read_to_string(scratch.path.join("agent.toml")).expect("previous agent config");
        Agent::spawn_with(bin, scratch, &text).await
    }

    /// The agent's stderr so far (its logs).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.scratch.path.join("agent.stderr")).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
        for _ in 0..300 {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
    }
}

/// Awaits `fut`, failing the test with `what` if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// True while any process of group `pgid` exists.
pub fn group_alive(pgid: u32) -> bool {
    kill(Pid::from_raw(-(pgid as i32)), None).is_ok()
}

/// True while process `pid` exists (zombies count as gone only once reaped).
pub fn process_alive(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

/// Resident memory of `root` and all its descendants, from /proc: the ground
/// truth samplers are checked against.
pub fn proc_tree_rss(root: u32) -> u64 {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The field after the command (which may hold spaces) ends with ')'.
        let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest.to_owned()) else { continue };
        let ppid: u32 = after.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        parents.push((pid, ppid));
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree.iter().map(|pid| vm_rss(*pid)).sum()
}

fn vm_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A scripted HTTP server standing in for a service: each path answers with
/// a status and body the test can change while it runs.
#[derive(Clone, Debug)]
pub struct Fixture {
    pub url: String,
    routes: Routes,
    hits: Hits,
}

type Routes = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (u16, Vec<u8>)>>>;
type Hits = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>;

impl Fixture {
    pub async fn start() -> Fixture {
        use axum::body::Bytes;
        use axum::extract::{Request, State};
        use axum::http::StatusCode;
        use axum::response::IntoResponse;
        let routes: Routes = Default::default();
        let hits: Hits = Default::default();
        async fn answer(State((routes, hits)): State<(Routes, Hits)>, request: Request) -> axum::response::Response {
            let key = format!("{} {}", request.method(), request.uri().path());
            *hits.lock().expect("hits").entry(key.clone()).or_default() += 1;
            let found = routes.lock().expect("routes").get(&key).cloned();
            match found {
                Some((code, body)) => {
                    (StatusCode::from_u16(code).unwrap_or(StatusCode::OK), Bytes::from(body)).into_response()
                }
                None => (StatusCode::NOT_FOUND, format!("no fixture for {key}")).into_response(),
            }
        }
        let app = axum::Router::new().fallback(answer).with_state((routes.clone(), hits.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind fixture");
        let url = format!("http://{}", listener.local_addr().expect("fixture addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Fixture { url, routes, hits }
    }

    /// How many requests `route` has had.
    pub fn hits(&self, route: &str) -> u32 {
        self.hits.lock().expect("hits").get(route).copied().unwrap_or(0)
    }

    /// `GET /path` (or `POST /path`, …) now answers `code` with `body`.
    pub fn set(&self, route: &str, code: u16, body: impl Into<Vec<u8>>) {
        self.routes.lock().expect("routes").insert(route.to_owned(), (code, body.into()));
    }
}

/// Children of `pid` (from /proc), with their state letter (`Z` = zombie).
pub fn children(pid: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        if fields.next().and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push((child, state));
        }
    }
    out
}

/// The process group of `pid`, if it exists.
pub fn pgid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// Waits (bounded) until `cond` holds, polling every 20 ms.
pub async fn until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    within(limit, what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// An in-process OTLP trace receiver, over gRPC and over HTTP/protobuf
/// (`POST /v1/traces`), keeping every request it gets.
#[derive(Clone, Debug)]
pub struct OtlpReceiver {
    /// `http://127.0.0.1:PORT` for gRPC.
    pub grpc_url: String,
    /// `http://127.0.0.1:PORT/v1/traces` for HTTP/protobuf.
    pub http_url: String,
    got: std::sync::Arc<std::sync::Mutex<Vec<ExportTraceServiceRequest>>>,
}

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};

#[derive(Clone, Debug, Default)]
struct Collect(std::sync::Arc<std::sync::Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collect {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().expect("otlp store").push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl OtlpReceiver {
    pub async fn start() -> OtlpReceiver {
        let collect = Collect::default();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind otlp grpc");
        let grpc_url = format!("http://{}", grpc.local_addr().expect("addr"));
        let service = TraceServiceServer::new(collect.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc))
                .await;
        });
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind otlp http");
        let http_url = format!("http://{}/v1/traces", http.local_addr().expect("addr"));
        let store = collect.0.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let store = store.clone();
                async move {
                    match <ExportTraceServiceRequest as prost::Message>::decode(body) {
                        Ok(request) => {
                            store.lock().expect("otlp store").push(request);
                            (axum::http::StatusCode::OK, Vec::new())
                        }
                        Err(e) => (axum::http::StatusCode::BAD_REQUEST, e.to_string().into_bytes()),
                    }
                }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(http, app).await;
        });
        OtlpReceiver { grpc_url, http_url, got: collect.0 }
    }

    /// Every span received so far, flattened.
    pub fn spans(&self) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
        self.got
            .lock()
            .expect("otlp store")
            .iter()
            .flat_map(|r| r.resource_spans.iter())
            .flat_map(|rs| rs.scope_spans.iter())
            .flat_map(|ss| ss.spans.iter().cloned())
            .collect()
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.got.lock().expect("otlp store").clone()
    }
}

/// Set to run the tests on a host that cannot have cgroups: agents then
/// start without them and cgroup tests say what they could not check.
pub const ALLOW_NO_CGROUP: &str = "PROCTOR_ALLOW_NO_CGROUP";

/// Agents in tests require cgroups unless the opt-out is set, so the
/// README's test command and CI test the same thing.
fn require_cgroup() -> Vec<(&'static str, &'static str)> {
    if std::env::var_os(ALLOW_NO_CGROUP).is_some() { vec![] } else { vec![("PROCTOR_REQUIRE_CGROUP", "1")] }
}

/// A stand-in `libnvidia-ml.so` built with the system C compiler into `dir`
/// (`testkit/nvml/stand_in.c`): the agent loads it through the same
/// `nvml-wrapper` code as the real driver. What it reports comes from the
/// spec file it re-reads on every call; write it with `StandInNvml::show`.
#[derive(Debug)]
pub struct StandInNvml {
    pub library: PathBuf,
    pub spec: PathBuf,
}

impl StandInNvml {
    pub fn build(dir: &Path) -> StandInNvml {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("nvml/stand_in.c");
        let library = dir.join("libnvidia-ml.so");
        let spec = dir.join("nvml.spec");
        std::fs::create_dir_all(dir).expect("a folder for the stand-in NVML");
        std::fs::write(&spec, "").expect("write the NVML spec");
        let built = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-O1"])
            .arg(format!("-DSPEC_PATH=\"{}\"", spec.display()))
            .arg("-o")
            .arg(&library)
            .arg(&source)
            .output()
            .expect("a C compiler (cc) builds the stand-in NVML; .ci/run installs gcc");
        assert!(built.status.success(), "cc failed: {}", String::from_utf8_lossy(&built.stderr));
        StandInNvml { library, spec }
    }

    /// Devices `(name, used MiB, total MiB)` and processes `(device, pid, MiB)`.
    pub fn show(&self, devices: &[(&str, u64, u64)], processes: &[(u32, u32, u64)]) {
        const MIB: u64 = 1024 * 1024;
        let mut text = String::new();
        for (i, (name, used, total)) in devices.iter().enumerate() {
            text.push_str(&format!("device {i} {name} GPU-stand-in-{i} {} {} 37 45 120000\n", used * MIB, total * MIB));
        }
        for (device, pid, mib) in processes {
            text.push_str(&format!("process {device} {pid} {}\n", mib * MIB));
        }
        // Whole or not at all: the agent may read it at any moment.
        let partial = self.spec.with_extension("partial");
        std::fs::write(&partial, text).expect("write the NVML spec");
        std::fs::rename(&partial, &self.spec).expect("replace the NVML spec");
    }
}
