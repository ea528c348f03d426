//! The Proctor agent: a daemon on each lab host that supervises model
//! services, knows each model's loading stage, samples memory, runs test cases
//! next to the services and streams it all over gRPC (`proto`).
//!
//! Start order: config validated → listener bound → journal → sampler →
//! supervisors → gRPC server. Shutdown order (on the cancel token):
//! supervisors stop their services (signal, grace, SIGKILL), then the server
//! closes, then the sampler ends. See `docs/agent.md`.

pub mod admission;
pub mod auth;
pub mod cases;
pub mod commands;
pub mod config;
mod grpc;
pub mod journal;
pub mod lease;
pub mod load;
pub mod metrics;
pub mod probe;
pub mod sampling;
pub mod supervisor;
mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use proto::admission::GpuPin;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// HTTP/2 streams one connection may have open at once (a controller needs
/// a watch and a few calls); more wait for a free one.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen on {addr}: {source} (set `listen` in the agent config to a free address, or port 0)")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("cannot use the data folder {path}: {source}")]
    DataDir { path: std::path::PathBuf, source: std::io::Error },
    #[error("{0}; {env} is set, so the agent will not run services without cgroups", env = supervisor::cgroup::REQUIRE_ENV)]
    Cgroup(supervisor::cgroup::CgroupError),
    /// Bad `[auth]` files: the agent does not start rather than start open.
    #[error("{0}")]
    Auth(String),
}

/// A started agent. Dropping it does not stop it: call `shutdown`.
#[derive(Debug)]
pub struct RunningAgent {
    pub addr: SocketAddr,
    pub incarnation: String,
    /// How callers are checked, in words ("mutual TLS", …).
    pub security: &'static str,
    cancel: CancellationToken,
    tasks: TaskTracker,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningAgent {
    /// Stops every service, then the server. Waits for both.
    pub async fn shutdown(self) -> Result<(), AgentError> {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        match self.server.await {
            Ok(r) => r.map_err(AgentError::Serve),
            Err(_) => Ok(()),
        }
    }

    /// A token that shuts the agent down when cancelled (e.g. on SIGTERM).
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Waits until the server ends (after `cancel_token` fires).
    pub async fn wait(self) -> Result<(), AgentError> {
        self.tasks.close();
        self.tasks.wait().await;
        match self.server.await {
            Ok(r) => r.map_err(AgentError::Serve),
            Err(_) => Ok(()),
        }
    }
}

/// Binds, starts every part, and serves until shut down. Services are not
/// started until a controller ensures their models.
pub async fn start(config: Config) -> Result<RunningAgent, AgentError> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| AgentError::DataDir { path: config.data_dir.clone(), source })?;
    let data_dir = std::fs::canonicalize(&config.data_dir)
        .map_err(|source| AgentError::DataDir { path: config.data_dir.clone(), source })?;
    let agent_id = supervisor::cgroup::agent_id(&data_dir);
    let cgroups = cgroups_usable(&agent_id)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| AgentError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| AgentError::Bind { addr: config.listen, source })?;
    let incarnation = uuid::Uuid::new_v4().to_string();
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();

    let catalogue: Vec<(String, Vec<String>)> =
        config.services.iter().map(|s| (s.name.clone(), s.models.iter().map(|m| m.name.clone()).collect())).collect();
    let journal = journal::Journal::start(incarnation.clone(), &catalogue);

    let (roots_tx, roots_rx) = watch::channel(BTreeMap::new());
    let (samples_tx, samples_rx) = watch::channel(BTreeMap::new());
    let sampler_cancel = CancellationToken::new();
    let gpus = sampling::gpu::Gpus::open(config.nvml_library.as_deref());
    // Admission sees the GPUs from the first request on, not from the first tick.
    let first_rooms = gpus.as_ref().map(|g| g.sample().iter().map(sampling::gpu::Device::room).collect());
    let (gpu_rooms_tx, gpu_rooms_rx) = watch::channel(first_rooms.unwrap_or_default());
    let nvml = gpus.is_some();
    let admission = admission::Admission::start(
        admission::Admission::host(config.memory_budget_bytes),
        samples_rx.clone(),
        gpu_rooms_rx,
    );
    tokio::spawn(sampling::run(
        journal.clone(),
        roots_rx,
        (samples_tx, gpu_rooms_tx),
        sampling::Settings {
            interval: config.telemetry_interval,
            gpus,
            pressure: config.pressure,
            admission: admission.clone(),
        },
        sampler_cancel.clone(),
    ));
    let wiring = supervisor::Wiring {
        journal: journal.clone(),
        agent_id,
        cgroups,
        roots: Arc::new(roots_tx),
        samples: samples_rx,
        admission: admission.clone(),
        data_dir,
    };
    let mut supervisors = BTreeMap::new();
    for service in &config.services {
        let (handle, task) = supervisor::Supervisor::start(service.clone(), wiring.clone(), cancel.child_token());
        tasks.spawn(async move {
            let _ = task.await;
        });
        supervisors.insert(service.name.clone(), handle);
    }

    let info = agent_info(&config, &incarnation, cgroups, nvml);
    start_metrics(&config, &journal, &sampler_cancel).await?;
    let service =
        grpc::Service { journal, admission, supervisors, info, http: reqwest::Client::new(), cancel: cancel.clone() };

    let server = serve((listener, addr), service, &config, (cancel.clone(), tasks.clone(), sampler_cancel))?;
    let security = auth::describe(&config.auth, addr);
    tracing::info!(%addr, %incarnation, services = config.services.len(), "agent started");
    Ok(RunningAgent { addr, incarnation, security, cancel, tasks, server })
}

/// Starts the gRPC server on `listener` — over TLS when `[auth]` has a
/// certificate, every call checked by the auth layer first — until `cancel`:
/// then services stop first (`tasks`), so their last events are still
/// served, and the sampler after the server.
fn serve(
    (listener, addr): (tokio::net::TcpListener, SocketAddr),
    service: grpc::Service,
    config: &Config,
    (cancel, tasks, sampler_cancel): (CancellationToken, TaskTracker, CancellationToken),
) -> Result<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>, AgentError> {
    // Judged on the bound address: the warning names the real port.
    let transport = auth::transport(addr, &config.auth).map_err(AgentError::Auth)?;
    if let Some(warning) = &transport.warning {
        tracing::warn!("{warning}");
    }
    let gate = auth::Gate::load(&config.auth).map_err(AgentError::Auth)?;
    let builder = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout));
    // Fail at start, not at the first connection, on unreadable files.
    let acceptor = tls::acceptor(&config.auth).map_err(AgentError::Auth)?;
    auth::check_certificate(&config.auth);
    let router = builder.layer(auth::AuthLayer::new(gate)).add_service(
        proto::agent_server::AgentServer::new(service)
            .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(proto::MAX_MESSAGE_BYTES),
    );
    let shutdown = async move {
        cancel.cancelled().await;
        // Services first, so their last events are still served.
        tasks.close();
        tasks.wait().await;
    };
    Ok(tokio::spawn(async move {
        let result = match acceptor {
            Some(acceptor) => {
                let stop_accepting = CancellationToken::new();
                let incoming = tls::incoming(listener, acceptor, stop_accepting.clone());
                let result = router.serve_with_incoming_shutdown(incoming, shutdown).await;
                stop_accepting.cancel();
                result
            }
            None => {
                // Small gRPC frames go out at once (see tls::incoming).
                let incoming = tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    |tcp: std::io::Result<tokio::net::TcpStream>| tcp.inspect(|t| drop(t.set_nodelay(true))),
                );
                router.serve_with_incoming_shutdown(incoming, shutdown).await
            }
        };
        sampler_cancel.cancel();
        result
    }))
}

/// Serves Prometheus metrics when `metrics_listen` says where.
async fn start_metrics(
    config: &Config,
    journal: &journal::Journal,
    cancel: &CancellationToken,
) -> Result<(), AgentError> {
    let Some(at) = config.metrics_listen else { return Ok(()) };
    let listener = tokio::net::TcpListener::bind(at).await.map_err(|source| AgentError::Bind { addr: at, source })?;
    let bound = listener.local_addr().map_err(|source| AgentError::Bind { addr: at, source })?;
    tracing::info!("Prometheus metrics on http://{bound}/metrics");
    tokio::spawn(metrics::serve(listener, journal.clone(), hostname(), cancel.clone()));
    Ok(())
}

/// Whether services get cgroups here; without them it says what is lost, or
/// refuses to start when `PROCTOR_REQUIRE_CGROUP` says they are required.
fn cgroups_usable(agent_id: &str) -> Result<bool, AgentError> {
    match supervisor::cgroup::probe(agent_id) {
        Ok(()) => Ok(true),
        Err(e) if std::env::var_os(supervisor::cgroup::REQUIRE_ENV).is_some() => Err(AgentError::Cgroup(e)),
        Err(error) => {
            tracing::warn!(%error, "cgroups unavailable: services get a process group only (no OOM classification, no tree kill of setsid children)");
            Ok(false)
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
}

/// What `GetInfo` says about this agent, its services and what it can do.
fn agent_info(config: &Config, incarnation: &str, cgroups: bool, nvml: bool) -> proto::AgentInfo {
    let model = |m: &config::ModelConfig| proto::ModelInfo {
        name: m.name.clone(),
        ram_need_bytes: m.ram_bytes,
        gpu_need_bytes: m.gpu_bytes,
        load_mode: m.load.as_str().to_owned(),
        load_timeout_ms: m.timeout.map_or(0, |t| t.as_millis() as u64),
    };
    proto::AgentInfo {
        agent_version: AGENT_VERSION.to_owned(),
        protocol_version: proto::PROTOCOL_VERSION,
        incarnation: incarnation.to_owned(),
        hostname: hostname(),
        services: config
            .services
            .iter()
            .map(|s| proto::ServiceInfo {
                name: s.name.clone(),
                readiness_protocol: s.readiness.protocol.name().to_owned(),
                models: s.models.iter().map(model).collect(),
                gpu_auto: s.gpus == Some(GpuPin::Auto),
                gpu_pinned: match &s.gpus {
                    Some(GpuPin::Devices(d)) => d.clone(),
                    _ => Vec::new(),
                },
                gpus_given: Vec::new(),
            })
            .collect(),
        memory_budget_bytes: config.memory_budget_bytes,
        capabilities: Some(proto::Capabilities {
            cgroup: cgroups,
            nvml,
            readiness_protocols: probe::Protocol::NAMES.iter().map(|p| p.to_string()).collect(),
            case_kinds: vec!["http".into()],
        }),
        ..Default::default()
    }
}
