//! The controller's side of the gRPC edge: connecting to an agent, leases,
//! ensuring models, sending cases, and following the agent's journal. prost
//! types stop here; the rest of the controller sees `AgentView`, `CaseReport`
//! and friends.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use proto::admission::{GpuPin, GpuRoom};
use proto::agent_client::AgentClient;
use proto::{event, watch_message};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::inventory::Entry;
use crate::report::{self, CaseReport, Outcome};
use crate::run::events::{Events, RunEvent};
use crate::suite::{Case, Check};

pub use proto::{Stage, format_unix_ms};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const LEASE_TTL: Duration = Duration::from_secs(30);
/// How long a lost event stream may stay down before the agent counts as lost.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(20);
/// HTTP/2 PING every so often; no answer within the timeout = connection dead.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connection liveness settings. Detection (interval + timeout) must come
/// before the reconnect grace, and the grace before the lease TTL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive { interval: KEEPALIVE_INTERVAL, timeout: KEEPALIVE_TIMEOUT }
    }
}

/// How long a unary call may take before the host counts as not answering.
/// Every call the controller makes is bounded: a frozen agent must not hold
/// up a run, its shutdown, or anyone's Ctrl-C.
pub const RPC_DEADLINE: Duration = Duration::from_secs(10);

/// What kind of failure a call met, so callers decide without seeing gRPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Another run holds the service's lease.
    Busy,
    /// The agent refused a load for lack of memory.
    NoRoom,
    /// Our lease is no longer the current one (expired, taken, restarted agent).
    Stale,
    /// The call broke on the way or went unanswered: the host, not the request.
    Lost,
    /// The agent refused the request itself (bad input, unknown service, …).
    Refused,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{addr:?} is not an agent address; write HOST:PORT, e.g. 127.0.0.1:7700")]
    BadAddress { addr: String },
    #[error("cannot reach agent {addr}: {reason} (is `proctor agent` running there?)")]
    Unreachable { addr: String, reason: String },
    #[error("agent {addr}: {message}")]
    Rpc { addr: String, code: tonic::Code, message: String },
    #[error("agent {addr} speaks protocol {theirs}, this controller speaks {ours}; upgrade the older one")]
    Protocol { addr: String, theirs: u32, ours: u32 },
    #[error("agent {addr} did not answer {call} within {}s", deadline.as_secs())]
    Deadline { addr: String, call: &'static str, deadline: Duration },
}

impl ClientError {
    /// True when the call failed on the way rather than at the agent: the
    /// connection broke, timed out or was reset. The agent answers its own
    /// refusals with specific codes (invalid argument, not found, busy,
    /// stale lease, not enough memory); anything else is infrastructure.
    pub fn is_infrastructure(&self) -> bool {
        self.kind() == Failure::Lost
    }

    /// The failure's kind: the only place that reads gRPC status codes.
    pub fn kind(&self) -> Failure {
        match self {
            ClientError::Rpc { code: tonic::Code::FailedPrecondition, .. } => Failure::Busy,
            ClientError::Rpc { code: tonic::Code::ResourceExhausted, .. } => Failure::NoRoom,
            ClientError::Rpc { code: tonic::Code::PermissionDenied, .. } => Failure::Stale,
            _ if self.lost_on_the_way() => Failure::Lost,
            _ => Failure::Refused,
        }
    }

    fn lost_on_the_way(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::Deadline { .. } => true,
            ClientError::Rpc { code, .. } => matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
                    | tonic::Code::Cancelled
                    | tonic::Code::DeadlineExceeded
            ),
            ClientError::BadAddress { .. } | ClientError::Protocol { .. } => false,
        }
    }
}

/// Runs one unary call under `RPC_DEADLINE`.
async fn bounded<T>(
    addr: &str,
    call: &'static str,
    fut: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(RPC_DEADLINE, fut).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Deadline { addr: addr.to_owned(), call, deadline: RPC_DEADLINE }),
    }
}

/// What every connection presents and trusts (docs/security.md): the lab CA
/// (TLS; the agent's certificate must chain to it and name the agent), this
/// controller's certificate and key (mTLS), a bearer token (token mode).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Security {
    pub ca_pem: Option<Vec<u8>>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    pub token: Option<String>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Security {{ tls: {}, mtls: {}, token: {} }}",
            self.ca_pem.is_some(),
            self.identity.is_some(),
            self.token.is_some()
        )
    }
}

/// Adds the bearer token, if any, to every call.
#[derive(Clone, Debug)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Rpc = AgentClient<InterceptedService<Channel, Bearer>>;

/// The entry's endpoint: `https` with the lab CA (the agent's certificate
/// must name `tls_name`) and our certificate when there is one.
fn endpoint(entry: &Entry) -> Result<Endpoint, ClientError> {
    let (addr, security) = (entry.address.as_str(), &entry.security);
    let scheme = if security.ca_pem.is_some() { "https" } else { "http" };
    let uri = if addr.contains("://") { addr.to_owned() } else { format!("{scheme}://{addr}") };
    let endpoint = Endpoint::from_shared(uri).map_err(|_| ClientError::BadAddress { addr: addr.to_owned() })?;
    let Some(ca) = &security.ca_pem else { return Ok(endpoint) };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name(&entry.tls_name);
    if let Some((cert, key)) = &security.identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    endpoint.tls_config(tls).map_err(|e| unreachable(entry, error_chain(&e)))
}

/// An agent not reached, with what to check when the connection broke in a
/// way a TLS mismatch causes: over TLS, the agent refusing our certificate;
/// in plaintext, an agent that requires TLS.
fn unreachable(entry: &Entry, reason: String) -> ClientError {
    ClientError::Unreachable { addr: entry.address.clone(), reason: format!("{reason}{}", tls_hint(entry, &reason)) }
}

/// Pure: the hint for a broken connection (see `unreachable`).
fn tls_hint(entry: &Entry, reason: &str) -> &'static str {
    let lower = reason.to_lowercase();
    let plain_cause = ["connection refused", "invalid peer certificate", "timed out", "dns error", "no route"];
    if plain_cause.iter().any(|c| lower.contains(c)) {
        return "";
    }
    if entry.security.ca_pem.is_some() {
        "; over TLS this usually means the agent refused our certificate: check it was issued by the lab CA the \
         agent trusts, has not expired, and is given with --cert/--key (docs/security.md)"
    } else {
        "; the agent may require TLS: pass --ca (and --cert/--key, or --token-file) as its [auth] says \
         (docs/security.md)"
    }
}

/// One connected agent.
#[derive(Clone, Debug)]
pub struct Agent {
    /// The inventory's name for it (its address when given by `--agent`).
    pub name: String,
    pub addr: String,
    inner: Rpc,
    pub info: AgentInfo,
    /// Agent clock minus ours, measured at connect (half the round trip
    /// assumed each way): subtract it from agent times to get ours.
    pub clock_offset_ms: i64,
}

/// What an agent says about itself and its host (GetInfo), in our terms.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentInfo {
    pub version: String,
    pub incarnation: String,
    pub hostname: String,
    pub services: Vec<ServiceInfo>,
    pub cgroups: bool,
    /// The agent samples GPUs (NVML found).
    pub nvml: bool,
    pub ram_total: u64,
    pub ram_available: u64,
    /// Memory admission inputs: `None` = no such limit.
    pub cgroup_room: Option<u64>,
    pub budget_room: Option<u64>,
    /// The agent's cgroup memory limit, when it has one (the most its
    /// services could ever use together).
    pub cgroup_limit: Option<u64>,
    /// Memory promised to loads admitted and still loading.
    pub reserved: u64,
    pub memory_budget: Option<u64>,
    /// The agent's clock when it answered.
    pub now_unix_ms: i64,
    /// Its GPUs as admission sees them (what loads in progress were promised).
    pub gpus: Vec<GpuRoom>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceInfo {
    pub name: String,
    pub models: Vec<ModelInfo>,
    /// The GPUs it may use (`None`: it is given none).
    pub gpu_pin: Option<GpuPin>,
    /// While it runs: the GPUs it was given.
    pub gpus_given: Vec<u32>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub ram_need: u64,
    pub gpu_need: u64,
    /// Loaded whenever the service starts (`load = "at_start"`).
    pub at_start: bool,
}

impl From<proto::AgentInfo> for AgentInfo {
    fn from(i: proto::AgentInfo) -> AgentInfo {
        let services = i
            .services
            .into_iter()
            .map(|s| ServiceInfo {
                gpu_pin: match (s.gpu_auto, s.gpu_pinned.is_empty()) {
                    (true, _) => Some(GpuPin::Auto),
                    (false, false) => Some(GpuPin::Devices(s.gpu_pinned)),
                    (false, true) => None,
                },
                gpus_given: s.gpus_given,
                name: s.name,
                models: s
                    .models
                    .into_iter()
                    .map(|m| ModelInfo {
                        name: m.name,
                        ram_need: m.ram_need_bytes,
                        gpu_need: m.gpu_need_bytes,
                        at_start: m.load_mode == "at_start",
                    })
                    .collect(),
            })
            .collect();
        AgentInfo {
            version: i.agent_version,
            incarnation: i.incarnation,
            hostname: i.hostname,
            services,
            cgroups: i.capabilities.as_ref().is_some_and(|c| c.cgroup),
            nvml: i.capabilities.as_ref().is_some_and(|c| c.nvml),
            ram_total: i.host_memory_total_bytes,
            ram_available: i.host_memory_available_bytes,
            cgroup_room: i.cgroup_room_bytes,
            budget_room: i.budget_room_bytes,
            cgroup_limit: i.cgroup_limit_bytes,
            reserved: i.reserved_bytes,
            memory_budget: i.memory_budget_bytes,
            now_unix_ms: i.now_unix_ms,
            gpus: i.gpus.iter().map(gpu_room).collect(),
        }
    }
}

/// What an agent holds right now (the snapshot every watch opens with).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub services: Vec<ServiceState>,
    /// Live leases by service.
    pub leases: BTreeMap<String, LeaseView>,
    /// The agent's last heartbeat (agent clock; 0 = none yet).
    pub heartbeat_unix_ms: i64,
    /// The host's GPUs as last sampled.
    pub gpus: Vec<GpuView>,
}

/// One GPU as the agent last sampled it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GpuView {
    pub index: u32,
    pub name: String,
    pub used_bytes: u64,
    pub total_bytes: u64,
    pub utilization_percent: u32,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceState {
    pub name: String,
    pub running: bool,
    pub pid: u32,
    pub rss_bytes: u64,
    pub gpu_bytes: u64,
    pub models: Vec<(String, ModelView)>,
}

impl From<proto::Snapshot> for Snapshot {
    fn from(s: proto::Snapshot) -> Snapshot {
        let services = s
            .services
            .into_iter()
            .map(|svc| ServiceState {
                models: svc.models.iter().map(|m| (m.name.clone(), model_view(m))).collect(),
                name: svc.name,
                running: svc.running,
                pid: svc.pid,
                rss_bytes: svc.rss_bytes,
                gpu_bytes: svc.gpu_bytes,
            })
            .collect();
        Snapshot {
            services,
            leases: s.leases.iter().map(|l| (l.service.clone(), lease_view(l))).collect(),
            heartbeat_unix_ms: s.heartbeat_unix_ms,
            gpus: s
                .gpus
                .iter()
                .map(|g| GpuView {
                    index: g.index,
                    name: g.name.clone(),
                    used_bytes: g.memory_used_bytes,
                    total_bytes: g.memory_total_bytes,
                    utilization_percent: g.utilization_percent,
                })
                .collect(),
        }
    }
}

/// A lease this run holds on one service of one agent.
#[derive(Clone, Debug)]
pub struct Lease {
    pub service: String,
    pub run_id: String,
    pub id: String,
    pub epoch: u64,
}

impl Lease {
    fn to_proto(&self) -> proto::LeaseRef {
        proto::LeaseRef {
            service: self.service.clone(),
            run_id: self.run_id.clone(),
            lease_id: self.id.clone(),
            epoch: self.epoch,
        }
    }
}

impl Agent {
    /// An agent by address, in plaintext (loopback, or an insecure lab).
    pub async fn connect(addr: &str) -> Result<Agent, ClientError> {
        Agent::connect_with(&Entry::plain(addr), Keepalive::default()).await
    }

    /// An inventory entry, as its security says: TLS when there is a CA
    /// (the agent's certificate must name `tls_name`), a client certificate,
    /// a bearer token.
    pub async fn connect_with(entry: &Entry, keepalive: Keepalive) -> Result<Agent, ClientError> {
        let (name, addr, security) = (&entry.name, entry.address.as_str(), &entry.security);
        let channel = endpoint(entry)?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(keepalive.interval)
            .keep_alive_timeout(keepalive.timeout)
            .keep_alive_while_idle(true)
            .connect()
            .await
            .map_err(|e| unreachable(entry, error_chain(&e)))?;
        let token = match &security.token {
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| ClientError::Unreachable {
                addr: addr.to_owned(),
                reason: "the token holds characters a header cannot carry".into(),
            })?),
            None => None,
        };
        let mut inner = AgentClient::with_interceptor(channel, Bearer(token))
            .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(proto::MAX_MESSAGE_BYTES);
        let asked = now_unix_ms();
        let info = bounded(addr, "GetInfo", async {
            inner.get_info(proto::GetInfoRequest {}).await.map_err(|s| match s.code() {
                // The agent answered: it refused us; it is not unreachable.
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                    ClientError::Rpc { addr: addr.to_owned(), code: s.code(), message: s.message().to_owned() }
                }
                _ => unreachable(entry, s.message().to_owned()),
            })
        })
        .await?
        .into_inner();
        let answered = now_unix_ms();
        let clock_offset_ms = info.now_unix_ms - (asked + answered) / 2;
        if info.protocol_version != proto::PROTOCOL_VERSION {
            return Err(ClientError::Protocol {
                addr: addr.to_owned(),
                theirs: info.protocol_version,
                ours: proto::PROTOCOL_VERSION,
            });
        }
        Ok(Agent { name: name.clone(), addr: addr.to_owned(), inner, info: info.into(), clock_offset_ms })
    }

    /// Asks again for the handshake: memory figures change as models load.
    pub async fn refresh_info(&mut self) -> Result<(), ClientError> {
        let mut client = self.inner.clone();
        let info = bounded(&self.addr, "GetInfo", async {
            client.get_info(proto::GetInfoRequest {}).await.map_err(|s| self.rpc(s))
        })
        .await?;
        self.info = info.into_inner().into();
        Ok(())
    }

    /// The agent's snapshot, as a one-off (for `proctor agents`).
    pub async fn snapshot(&self) -> Result<Snapshot, ClientError> {
        bounded(&self.addr, "Watch", self.first_snapshot()).await
    }

    async fn first_snapshot(&self) -> Result<Snapshot, ClientError> {
        let mut stream = self
            .inner
            .clone()
            .watch(proto::WatchRequest { from_seq: u64::MAX })
            .await
            .map_err(|s| self.rpc(s))?
            .into_inner();
        match stream.message().await {
            Ok(Some(proto::WatchMessage { kind: Some(watch_message::Kind::Snapshot(s)) })) => Ok(s.into()),
            Ok(_) => Err(ClientError::Rpc {
                addr: self.addr.clone(),
                code: tonic::Code::Internal,
                message: "watch did not open with a snapshot".into(),
            }),
            Err(s) => Err(self.rpc(s)),
        }
    }

    fn rpc(&self, s: tonic::Status) -> ClientError {
        ClientError::Rpc { addr: self.addr.clone(), code: s.code(), message: s.message().to_owned() }
    }

    /// True if this agent has the service and every model named.
    pub fn serves(&self, service: &str, models: &[String]) -> bool {
        self.info
            .services
            .iter()
            .any(|s| s.name == service && models.iter().all(|m| s.models.iter().any(|x| x.name == *m)))
    }

    /// Tries once. A busy service is a `Failure::Busy`.
    pub async fn acquire(
        &self,
        service: &str,
        run_id: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, ClientError> {
        let request = proto::AcquireLeaseRequest {
            service: service.to_owned(),
            run_id: run_id.to_owned(),
            holder: holder.to_owned(),
            ttl_ms: ttl.as_millis() as u64,
        };
        let mut client = self.inner.clone();
        let lease =
            bounded(&self.addr, "AcquireLease", async { client.acquire_lease(request).await.map_err(|s| self.rpc(s)) })
                .await?
                .into_inner();
        Ok(Lease { service: lease.service, run_id: lease.run_id, id: lease.id, epoch: lease.epoch })
    }

    /// Renews the lease once, for the TTL it was granted with; returns the
    /// new expiry (agent clock).
    pub async fn renew(&self, lease: &Lease) -> Result<i64, ClientError> {
        let mut client = self.inner.clone();
        let renewed = bounded(&self.addr, "RenewLease", async {
            client.renew_lease(lease.to_proto()).await.map_err(|s| self.rpc(s))
        })
        .await?;
        Ok(renewed.into_inner().expires_unix_ms)
    }

    pub async fn release(&self, lease: &Lease) -> Result<(), ClientError> {
        let mut client = self.inner.clone();
        bounded(&self.addr, "ReleaseLease", async {
            client.release_lease(lease.to_proto()).await.map_err(|s| self.rpc(s))
        })
        .await?;
        Ok(())
    }

    /// An agent timestamp in our clock.
    pub fn local_ms(&self, agent_ms: i64) -> i64 {
        agent_ms - self.clock_offset_ms
    }

    /// Asks for the models; returns the seq every resulting event is below.
    pub async fn ensure(&self, lease: &Lease, ask: &EnsureAsk<'_>, traceparent: &str) -> Result<u64, ClientError> {
        let request = with_trace(
            proto::EnsureModelsRequest {
                lease: Some(lease.to_proto()),
                models: ask.models.to_vec(),
                overrides: Some(proto::ModelOverrides {
                    load_timeout_ms: ask.timeout.map_or(0, |t| t.as_millis() as u64),
                    ram_headroom_bytes: ask.headroom,
                    gpu_headroom_bytes: ask.gpu_headroom,
                    load_timeout_source: ask.timeout_source.to_owned(),
                }),
                fresh: ask.fresh,
            },
            traceparent,
        );
        let mut client = self.inner.clone();
        let response =
            bounded(&self.addr, "EnsureModels", async { client.ensure_models(request).await.map_err(|s| self.rpc(s)) })
                .await?;
        Ok(response.into_inner().seq_after)
    }

    /// Sends cases to run, up to `parallel` at once (1: in order).
    pub async fn run_cases(
        &self,
        lease: &Lease,
        cases: Vec<CaseToRun<'_>>,
        parallel: u32,
        traceparent: &str,
    ) -> Result<(), ClientError> {
        let cases = cases.into_iter().map(|c| case_to_proto(c.id, c.attempt, c.case, c.traceparent)).collect();
        let request = proto::RunCasesRequest { lease: Some(lease.to_proto()), cases, parallel };
        let request = with_trace(request, traceparent);
        let mut client = self.inner.clone();
        bounded(&self.addr, "RunCases", async { client.run_cases(request).await.map_err(|s| self.rpc(s)) }).await?;
        Ok(())
    }

    /// Releases this run's retained results (and stage changes) up to a seq.
    pub async fn ack(&self, incarnation: &str, run_id: &str, up_to_seq: u64) -> Result<(), ClientError> {
        let request = proto::AckRequest { incarnation: incarnation.to_owned(), up_to_seq, run_id: run_id.to_owned() };
        let mut client = self.inner.clone();
        bounded(&self.addr, "Ack", async { client.ack(request).await.map_err(|s| self.rpc(s)) }).await?;
        Ok(())
    }
}

/// What `ensure` asks of an agent.
#[derive(Clone, Debug)]
pub struct EnsureAsk<'a> {
    pub models: &'a [String],
    /// The load timeout to send (`None`: the agent's own precedence decides).
    pub timeout: Option<Duration>,
    /// Who set it, for the agent's timeout message (e.g. "--model-timeout").
    pub timeout_source: &'a str,
    pub headroom: u64,
    pub gpu_headroom: u64,
    pub fresh: bool,
}

/// One case as sent: its id for this attempt and its `traceparent`.
#[derive(Clone, Debug)]
pub struct CaseToRun<'a> {
    pub id: String,
    pub attempt: u32,
    pub case: &'a Case,
    pub traceparent: String,
}

/// A request carrying the W3C trace context in its gRPC metadata.
fn with_trace<T>(message: T, traceparent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = traceparent.parse() {
        request.metadata_mut().insert("traceparent", value);
    }
    request
}

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Turns a suite case into the message the agent runs.
fn case_to_proto(case_id: String, attempt: u32, case: &Case, traceparent: String) -> proto::Case {
    use proto::assertion::Kind;
    let assertions = case
        .checks
        .iter()
        .map(|c| proto::Assertion {
            kind: Some(match c {
                Check::Status(s) => Kind::Status(u32::from(*s)),
                Check::Equals { pointer, value } => {
                    Kind::JsonEquals(proto::JsonEquals { pointer: pointer.clone(), value_json: value.to_string() })
                }
                Check::OneOf { pointer, values } => Kind::JsonOneOf(proto::JsonOneOf {
                    pointer: pointer.clone(),
                    values_json: values.iter().map(ToString::to_string).collect(),
                }),
                Check::NotEmpty { pointer } => Kind::JsonNotEmpty(pointer.clone()),
                Check::Matches { pointer, regex } => {
                    Kind::JsonMatches(proto::JsonMatches { pointer: pointer.clone(), regex: regex.clone() })
                }
            }),
        })
        .collect();
    let kind = match (&case.command, &case.load) {
        (Some(c), _) => proto::case::Kind::Command(proto::CommandCase { name: c.name.clone(), args: c.args.clone() }),
        (None, Some(l)) => proto::case::Kind::Load(load_to_proto(l, &case.checks)),
        (None, None) => proto::case::Kind::Http(http_to_proto(&case.request)),
    };
    proto::Case {
        case_id,
        attempt,
        traceparent,
        name: case.name.clone(),
        timeout_ms: case.timeout.map_or(0, |t| t.as_millis() as u64),
        kind: Some(kind),
        assertions,
    }
}

fn http_to_proto(r: &crate::suite::HttpRequest) -> proto::HttpCase {
    proto::HttpCase {
        method: r.method.clone(),
        path: r.path.clone(),
        headers: r.headers.clone().into_iter().collect(),
        body: r.body.clone(),
    }
}

/// A load case; its `expect.status` is the status every response must have.
fn load_to_proto(l: &crate::suite::LoadSpec, checks: &[Check]) -> proto::LoadCase {
    use crate::suite::load::{Metric, Op};
    use proto::threshold::{Metric as M, Op as O};
    let status = checks.iter().find_map(|c| if let Check::Status(s) = c { Some(u32::from(*s)) } else { None });
    let thresholds = l
        .thresholds
        .iter()
        .map(|t| {
            let metric = match t.metric {
                Metric::P50 => M::P50,
                Metric::P90 => M::P90,
                Metric::P95 => M::P95,
                Metric::P99 => M::P99,
                Metric::P999 => M::P999,
                Metric::Max => M::Max,
                Metric::Mean => M::Mean,
                Metric::Rps => M::Rps,
                Metric::Errors => M::ErrorRate,
            };
            let op = match t.op {
                Op::Lt => O::Lt,
                Op::Le => O::Le,
                Op::Gt => O::Gt,
                Op::Ge => O::Ge,
            };
            proto::Threshold { metric: metric.into(), op: op.into(), value: t.value, text: t.text.clone() }
        })
        .collect();
    proto::LoadCase {
        requests: l.requests.iter().map(http_to_proto).collect(),
        connections: l.connections,
        rate_per_s: l.rate.unwrap_or(0.0),
        duration_ms: l.duration.map_or(0, |d| d.as_millis() as u64),
        request_count: l.count.unwrap_or(0),
        warmup_ms: l.warmup.as_millis() as u64,
        status: status.unwrap_or(0),
        check_every: l.check_every,
        request_timeout_ms: l.request_timeout.map_or(0, |d| d.as_millis() as u64),
        thresholds,
    }
}

/// One model as the controller last saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelView {
    pub stage: Stage,
    pub progress: f64,
    pub message: String,
    /// When it entered `stage` (agent clock; 0 = unknown).
    pub since_unix_ms: i64,
    /// How long the stage and the rest usually take on that host.
    pub usual: Option<crate::run::events::Usual>,
}

fn usual(stage_ms: u64, rest_ms: u64) -> Option<crate::run::events::Usual> {
    (stage_ms > 0).then(|| crate::run::events::Usual {
        stage: Duration::from_millis(stage_ms),
        rest: Duration::from_millis(rest_ms),
    })
}

fn model_view(m: &proto::ModelState) -> ModelView {
    ModelView {
        stage: m.stage(),
        progress: m.progress,
        message: m.message.clone(),
        since_unix_ms: m.stage_since_unix_ms,
        usual: usual(m.usual_stage_ms, m.usual_rest_ms),
    }
}

/// A lease as watchers see it.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseView {
    pub run_id: String,
    pub holder: String,
    pub since: String,
    pub epoch: u64,
    pub expires_unix_ms: i64,
}

fn lease_view(l: &proto::Lease) -> LeaseView {
    LeaseView {
        run_id: l.run_id.clone(),
        holder: l.holder.clone(),
        since: format_unix_ms(l.granted_unix_ms),
        epoch: l.epoch,
        expires_unix_ms: l.expires_unix_ms,
    }
}

/// What the agent's admission would judge a load against, as of its last
/// telemetry (the same figures GetInfo gives).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Standing {
    pub capacity: proto::admission::Capacity,
    pub reserved: u64,
    pub gpus: Vec<GpuRoom>,
}

fn gpu_room(g: &proto::GpuRoom) -> GpuRoom {
    GpuRoom { index: g.index, total: g.total_bytes, used: g.used_bytes, reserved: g.reserved_bytes }
}

/// The controller's picture of one agent, kept current by `follow`.
#[derive(Clone, Debug, Default)]
pub struct AgentView {
    /// Admission's inputs as of the last telemetry (`None`: not sent yet,
    /// or an agent that does not send them — then GetInfo is asked).
    pub standing: Option<Standing>,
    /// The GPUs each running service was given.
    pub gpus_given: BTreeMap<String, Vec<u32>>,
    pub incarnation: String,
    /// Highest seq applied.
    pub last_seq: u64,
    pub models: BTreeMap<(String, String), ModelView>,
    pub rss: BTreeMap<String, u64>,
    pub results: HashMap<String, CaseReport>,
    /// The case ids of `results` in the order they arrived: a try waiting
    /// for its results reads only the new ones on each change.
    pub arrived: Vec<String>,
    /// Live leases by service.
    pub leases: BTreeMap<String, LeaseView>,
    /// Stage transitions seen, oldest first (bounded): the trace's stage spans.
    pub stage_log: VecDeque<StageMark>,
    /// (service, agent time, tree RSS) samples seen, oldest first (bounded).
    pub rss_log: VecDeque<(String, i64, u64)>,
    /// The agent's last heartbeat (its 1 Hz sample), agent clock.
    pub heartbeat_unix_ms: i64,
    /// Set when the agent is gone for longer than the reconnect grace;
    /// cleared when it is back.
    pub lost: Option<String>,
    /// Times the agent came back as a new incarnation (restarted): whatever
    /// ran there under an older incarnation is gone, but the host is usable.
    pub restarts: u32,
    /// Times the event stream broke.
    pub disconnects: u32,
    /// Ranges of logs/telemetry the agent reported as dropped.
    pub gaps: Vec<(u64, u64)>,
    /// Events applied since the first snapshot of this incarnation.
    pub events_applied: u64,
    /// The first event seq applied in this incarnation.
    pub first_seq: u64,
    /// Times an applied event did not follow the previous one directly (a
    /// seq skipped); duplicates are never applied at all.
    pub seq_jumps: u32,
}

/// One stage transition as the agent stamped it.
#[derive(Clone, Debug, PartialEq)]
pub struct StageMark {
    pub service: String,
    pub model: String,
    pub stage: Stage,
    pub cause: String,
    /// Agent clock.
    pub time_unix_ms: i64,
    /// The service's peak (RSS, GPU memory) in the stage this mark ends.
    pub previous_peak: (u64, u64),
}

/// How many stage marks and memory samples a view keeps.
const LOG_CAP: usize = 10_000;

/// Appends to a bounded log, dropping the oldest entry when full.
fn push_capped<T>(log: &mut VecDeque<T>, item: T) {
    if log.len() == LOG_CAP {
        log.pop_front();
    }
    log.push_back(item);
}

fn result_to_report(r: proto::CaseResult) -> CaseReport {
    let outcome = match r.outcome() {
        proto::CaseOutcome::Passed => Outcome::Passed,
        proto::CaseOutcome::Failed => Outcome::Failed(
            r.failures
                .into_iter()
                .map(|f| report::Failure {
                    check: f.assertion,
                    pointer: f.pointer,
                    expected: f.expected,
                    actual: f.actual,
                })
                .collect(),
        ),
        _ => Outcome::Error(r.message),
    };
    CaseReport {
        suite: String::new(),
        name: r.name,
        outcome,
        duration: Duration::from_micros(r.duration_us),
        http_status: (r.http_status > 0).then_some(r.http_status as u16),
        excerpt: r.response_excerpt,
        attempt: r.attempt,
        host: String::new(),
        lease_epoch: r.lease_epoch,
        started_unix_ms: r.started_unix_ms,
        method: String::new(),
        url: r.url,
        reruns: Vec::new(),
        tests: r.tests.iter().map(test_report).collect(),
        load: r.load.map(|l| Box::new(load_report(l))),
    }
}

fn load_report(l: proto::LoadResult) -> report::LoadReport {
    report::LoadReport {
        mode: l.mode,
        requests: l.requests,
        errors: l.errors,
        errors_by_kind: l.errors_by_kind.into_iter().collect(),
        measured_ms: l.measured_us / 1000,
        rps: l.rps,
        p50_us: l.p50_us,
        p90_us: l.p90_us,
        p95_us: l.p95_us,
        p99_us: l.p99_us,
        p999_us: l.p999_us,
        max_us: l.max_us,
        mean_us: l.mean_us,
        checked: l.checked,
        warmup_requests: l.warmup_requests,
        thresholds: l
            .thresholds
            .into_iter()
            .map(|t| report::ThresholdReport { text: t.text, actual: t.actual, held: t.held })
            .collect(),
    }
}

fn test_report(t: &proto::TestResult) -> report::TestReport {
    let outcome = match t.outcome() {
        proto::TestOutcome::TestFailed => "failed",
        proto::TestOutcome::TestError => "error",
        proto::TestOutcome::TestSkipped => "skipped",
        _ => "passed",
    };
    report::TestReport {
        name: t.name.clone(),
        classname: t.classname.clone(),
        outcome: outcome.into(),
        duration_ms: t.duration_us / 1000,
        message: t.message.clone(),
    }
}

/// Follows the agent's journal into `view` until cancelled, reconnecting from
/// the last seq seen. Stage changes, memory samples and the host lost or back
/// also go out as run events.
pub async fn follow(
    interest: Interest,
    agent: Agent,
    view: watch::Sender<AgentView>,
    events: Events,
    cancel: CancellationToken,
    grace: Duration,
) {
    let mut from_seq = u64::MAX;
    let mut down_since: Option<tokio::time::Instant> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut client = agent.inner.clone();
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            s = client.watch(proto::WatchRequest { from_seq }) => s,
        };
        match stream {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    let message = tokio::select! {
                        _ = cancel.cancelled() => return,
                        m = stream.message() => m,
                    };
                    let Ok(Some(message)) = message else { break };
                    down_since = None;
                    backoff = Duration::from_millis(100);
                    apply((&agent.name, &interest), &view, &events, message);
                    from_seq = view.borrow().last_seq + 1;
                }
            }
            Err(status) => {
                tracing::debug!(addr = %agent.addr, error = %status.message(), "watch failed")
            }
        }
        let since = *down_since.get_or_insert_with(|| {
            view.send_modify(|v| v.disconnects += 1);
            tokio::time::Instant::now()
        });
        if since.elapsed() > grace && view.borrow().lost.is_none() {
            let reason = format!("agent {} unreachable for more than {}s", agent.addr, grace.as_secs_f64());
            view.send_modify(|v| v.lost = Some(reason.clone()));
            events.send(RunEvent::HostLost { host: agent.name.clone(), reason });
        }
        // Capped exponential backoff, up to a fifth shorter at random so many
        // controllers do not reconnect in step.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff.mul_f64(1.0 - 0.2 * jitter())) => {}
        }
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }
}

/// What a run follows on an agent: its own load progress, and the stages
/// and memory of its suites' services (other teams' runs on the same agent
/// are theirs to show).
#[derive(Clone, Debug, Default)]
pub struct Interest {
    pub run_id: String,
    pub services: Vec<String>,
}

impl Interest {
    fn follows(&self, service: &str) -> bool {
        self.services.iter().any(|s| s == service)
    }
}

/// Longest pause between two reconnect attempts.
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A random number in [0, 1) without a random-number crate.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Moves the view past an applied event, counting any seq it skipped.
fn advance(v: &mut AgentView, seq: u64) {
    if v.events_applied == 0 {
        v.first_seq = seq;
    } else if seq != v.last_seq + 1 {
        v.seq_jumps += 1;
    }
    v.events_applied += 1;
    v.last_seq = seq;
}

fn apply(at: (&str, &Interest), view: &watch::Sender<AgentView>, events: &Events, message: proto::WatchMessage) {
    let host = at.0;
    match message.kind {
        Some(watch_message::Kind::Snapshot(s)) => view.send_modify(|v| apply_snapshot(host, v, events, &s)),
        Some(watch_message::Kind::Gap(g)) => view.send_modify(|v| v.gaps.push((g.from_seq, g.to_seq))),
        Some(watch_message::Kind::Event(e)) => apply_event(at, view, events, e),
        None => {}
    }
}

/// The snapshot a watch opens with: a first one, a reconnect to the same
/// agent, or a restarted agent (new incarnation).
fn apply_snapshot(host: &str, v: &mut AgentView, events: &Events, s: &proto::Snapshot) {
    let first = v.incarnation.is_empty();
    let restarted = !first && v.incarnation != s.incarnation;
    if restarted {
        // A restarted agent: its sequence numbers started over and
        // whatever this run had running there is gone (tries notice
        // the new incarnation). The host itself is usable again.
        v.restarts += 1;
        v.last_seq = s.next_seq.saturating_sub(1);
        v.events_applied = 0;
        // Results already received stay: they are real answers under
        // their lease epoch; only what was still running is lost.
    } else if first {
        v.last_seq = s.next_seq.saturating_sub(1);
    }
    if (restarted || v.lost.is_some()) && !first {
        v.lost = None;
        events.send(RunEvent::HostBack { host: host.to_owned(), restarted });
    }
    // On a reconnect to the same incarnation the replayed events follow;
    // last_seq stays where it was so none is applied twice.
    v.incarnation = s.incarnation.clone();
    v.heartbeat_unix_ms = s.heartbeat_unix_ms;
    v.leases = s.leases.iter().map(|l| (l.service.clone(), lease_view(l))).collect();
    v.gpus_given =
        s.services.iter().filter(|svc| svc.running).map(|svc| (svc.name.clone(), svc.gpus.clone())).collect();
    for svc in &s.services {
        v.rss.insert(svc.name.clone(), svc.rss_bytes);
        for m in &svc.models {
            remember_history(v, &svc.name, m);
            v.models.insert((svc.name.clone(), m.name.clone()), model_view(m));
        }
    }
}

/// The stages a model's current load entered before this watch began (the
/// snapshot's history), added to the stage log where not already there, so
/// a run that attaches mid-load reports the whole load.
fn remember_history(v: &mut AgentView, service: &str, m: &proto::ModelState) {
    let known = |v: &AgentView, h: &proto::StageEntered| {
        v.stage_log.iter().any(|k| {
            k.service == service && k.model == m.name && k.time_unix_ms == h.at_unix_ms && k.stage as i32 == h.stage
        })
    };
    let missing: Vec<StageMark> = m
        .load_history
        .iter()
        .filter(|h| !known(v, h))
        .map(|h| StageMark {
            service: service.to_owned(),
            model: m.name.clone(),
            stage: h.stage(),
            cause: h.cause.clone(),
            time_unix_ms: h.at_unix_ms,
            previous_peak: (h.ended_peak_rss_bytes, h.ended_peak_gpu_bytes),
        })
        .collect();
    if missing.is_empty() {
        return;
    }
    v.stage_log.extend(missing);
    v.stage_log.make_contiguous().sort_by_key(|k| k.time_unix_ms);
    while v.stage_log.len() > LOG_CAP {
        v.stage_log.pop_front();
    }
}

/// One journal event, applied once (a replay after a reconnect is skipped).
/// `at`: the agent's name and what this run follows there (the view takes
/// every event; the reporters only those of this run and its services).
fn apply_event(at: (&str, &Interest), view: &watch::Sender<AgentView>, events: &Events, e: proto::Event) {
    let (host, interest) = at;
    let seq = e.seq;
    if seq <= view.borrow().last_seq {
        return; // already applied before a reconnect
    }
    match e.kind {
        Some(event::Kind::StageChanged(c)) => apply_stage(at, view, events, (seq, e.time_unix_ms), c),
        Some(event::Kind::LeaseChanged(c)) => view.send_modify(|v| {
            if let Some(l) = &c.lease {
                if c.released {
                    v.leases.remove(&l.service);
                } else {
                    v.leases.insert(l.service.clone(), lease_view(l));
                }
            }
            advance(v, seq);
        }),
        Some(event::Kind::Telemetry(t)) => apply_telemetry(at, view, events, (seq, e.time_unix_ms), t),
        Some(event::Kind::ServiceStarted(s)) => view.send_modify(|v| {
            v.gpus_given.insert(s.service, s.gpus);
            advance(v, seq);
        }),
        Some(event::Kind::ServiceExited(s)) => view.send_modify(|v| {
            v.gpus_given.remove(&s.service);
            advance(v, seq);
        }),
        Some(event::Kind::MemoryPressure(p)) => {
            events.send(RunEvent::MemoryPressure { host: host.to_owned(), pressure: pressure(p) });
            view.send_modify(|v| advance(v, seq));
        }
        Some(event::Kind::LoadProgress(p)) if p.run_id != interest.run_id => view.send_modify(|v| advance(v, seq)),
        Some(event::Kind::LoadProgress(p)) => {
            events.send(RunEvent::LoadProgress {
                host: host.to_owned(),
                case: p.name,
                elapsed_ms: p.elapsed_ms,
                warming_up: p.warming_up,
                requests: p.requests,
                errors: p.errors,
                rps: p.rps,
                p99_us: p.p99_us,
            });
            view.send_modify(|v| advance(v, seq));
        }
        Some(event::Kind::CaseFinished(c)) => view.send_modify(|v| {
            if let Some(r) = c.result {
                let id = r.case_id.clone();
                if v.results.insert(id.clone(), result_to_report(r)).is_none() {
                    v.arrived.push(id);
                }
            }
            advance(v, seq);
        }),
        _ => view.send_modify(|v| advance(v, seq)),
    }
}

/// A stage change: live progress for the reporters, the model's view and
/// the stage log (the trace's stage spans) for the runner.
fn apply_stage(
    (host, interest): (&str, &Interest),
    view: &watch::Sender<AgentView>,
    events: &Events,
    (seq, at): (u64, i64),
    c: proto::StageChanged,
) {
    let (from, to) = (c.from(), c.to());
    if interest.follows(&c.service) {
        events.send(RunEvent::StageChanged {
            host: host.to_owned(),
            service: c.service.clone(),
            model: c.model.clone(),
            from,
            to,
            progress: c.progress,
            message: c.message.clone(),
            usual: usual(c.usual_stage_ms, c.usual_rest_ms),
        });
    }
    view.send_modify(|v| {
        if from != to {
            let mark = StageMark {
                service: c.service.clone(),
                model: c.model.clone(),
                stage: to,
                cause: c.cause.clone(),
                time_unix_ms: at,
                previous_peak: (c.stage_peak_rss_bytes, c.stage_peak_gpu_bytes),
            };
            push_capped(&mut v.stage_log, mark);
        }
        let since = if from != to {
            at
        } else {
            v.models.get(&(c.service.clone(), c.model.clone())).map_or(at, |m| m.since_unix_ms)
        };
        let view = ModelView {
            stage: to,
            progress: c.progress,
            message: c.message,
            since_unix_ms: since,
            usual: usual(c.usual_stage_ms, c.usual_rest_ms),
        };
        v.models.insert((c.service, c.model), view);
        advance(v, seq);
    });
}

/// A telemetry sample: memory for the reporters; admission's standing, the
/// RSS log and the heartbeat for the runner.
fn apply_telemetry(
    (host, interest): (&str, &Interest),
    view: &watch::Sender<AgentView>,
    events: &Events,
    (seq, at): (u64, i64),
    t: proto::Telemetry,
) {
    for s in t.services.iter().filter(|s| interest.follows(&s.service)) {
        events.send(RunEvent::Telemetry {
            host: host.to_owned(),
            service: s.service.clone(),
            rss_bytes: s.rss_bytes,
            gpu_bytes: s.gpu_bytes,
        });
    }
    view.send_modify(|v| {
        if let Some(s) = &t.standing {
            v.standing = Some(Standing {
                capacity: proto::admission::Capacity {
                    mem_available: s.mem_available_bytes,
                    cgroup_room: s.cgroup_room_bytes,
                    budget_room: s.budget_room_bytes,
                },
                reserved: s.reserved_bytes,
                gpus: s.gpus.iter().map(gpu_room).collect(),
            });
        }
        for s in t.services {
            push_capped(&mut v.rss_log, (s.service.clone(), at, s.rss_bytes));
            v.rss.insert(s.service, s.rss_bytes);
        }
        v.heartbeat_unix_ms = at;
        advance(v, seq);
    });
}

fn pressure(p: proto::MemoryPressure) -> crate::run::events::Pressure {
    crate::run::events::Pressure {
        gpu: (p.resource == "gpu").then_some(p.gpu_index),
        available_bytes: p.available_bytes,
        total_bytes: p.total_bytes,
        threshold_bytes: p.threshold_bytes,
        loading: p.loading,
        consumers: p.consumers.into_iter().map(|c| (c.pid, c.name, c.service, c.bytes)).collect(),
    }
}

/// An error and its sources, each said once (transport errors often repeat
/// their source's text in their own).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_connection_says_what_tls_mismatch_to_check() {
        let plain = Entry::plain("10.0.0.5:7700");
        let tls = Entry {
            security: std::sync::Arc::new(Security { ca_pem: Some(b"ca".to_vec()), ..Security::default() }),
            ..plain.clone()
        };
        // (over TLS, reason, part of the hint; "" for none)
        let table = [
            (true, "transport error", "refused our certificate"),
            (true, "operation was canceled", "refused our certificate"),
            (true, "tcp connect error: Connection refused (os error 111)", ""),
            (true, "invalid peer certificate: certificate not valid for name \"gpu-02\"", ""),
            (false, "h2 protocol error: http2 error", "may require TLS: pass --ca"),
            (false, "operation was canceled", "may require TLS"),
            (false, "tcp connect error: Connection refused (os error 111)", ""),
            (false, "timed out", ""),
        ];
        for (over_tls, reason, part) in table {
            let hint = tls_hint(if over_tls { &tls } else { &plain }, reason);
            if part.is_empty() {
                assert_eq!(hint, "", "{reason}");
            } else {
                assert!(hint.contains(part), "{reason}: {hint}");
            }
        }
    }

    #[test]
    fn only_our_runs_load_progress_is_shown() {
        let interest = Interest { run_id: "ours".into(), services: vec!["translation".into()] };
        let (events, mut rx) = Events::channel();
        let (view, _keep) = watch::channel(AgentView::default());
        for (seq, run) in [(1, "theirs"), (2, "ours")] {
            let progress =
                proto::LoadProgress { run_id: run.into(), name: format!("{run} load"), ..Default::default() };
            let e = proto::Event { seq, kind: Some(event::Kind::LoadProgress(progress)), ..Default::default() };
            apply_event(("gpu-01", &interest), &view, &events, e);
        }
        let Ok(RunEvent::LoadProgress { case, .. }) = rx.try_recv() else { panic!("our progress is shown") };
        assert_eq!(case, "ours load");
        assert!(rx.try_recv().is_err(), "theirs is not");
        assert_eq!(view.borrow().last_seq, 2, "both are applied to the view");
    }

    #[test]
    fn only_our_services_stages_and_memory_are_shown() {
        let interest = Interest { run_id: "ours".into(), services: vec!["translation".into()] };
        let (events, mut rx) = Events::channel();
        let (view, _keep) = watch::channel(AgentView::default());
        for (seq, service) in [(1, "static"), (2, "translation")] {
            let stage = proto::StageChanged { service: service.into(), model: "m".into(), ..Default::default() };
            let e = proto::Event { seq, kind: Some(event::Kind::StageChanged(stage)), ..Default::default() };
            apply_event(("gpu-01", &interest), &view, &events, e);
        }
        let memory = |service: &str| proto::ServiceMemory { service: service.into(), ..Default::default() };
        let t = proto::Telemetry { services: vec![memory("static"), memory("translation")], ..Default::default() };
        apply_event(
            ("gpu-01", &interest),
            &view,
            &events,
            proto::Event { seq: 3, kind: Some(event::Kind::Telemetry(t)), ..Default::default() },
        );
        let mut shown = Vec::new();
        while let Ok(e) = rx.try_recv() {
            match e {
                RunEvent::StageChanged { service, .. } => shown.push(format!("stage {service}")),
                RunEvent::Telemetry { service, .. } => shown.push(format!("memory {service}")),
                _ => {}
            }
        }
        assert_eq!(shown, ["stage translation", "memory translation"]);
        assert_eq!(view.borrow().models.len(), 2, "the view still knows every model");
    }

    #[test]
    fn an_error_chain_says_each_cause_once() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E(
            "transport error: invalid peer certificate: BadSignature",
            Some(Box::new(E("invalid peer certificate: BadSignature", Some(Box::new(E("io", None)))))),
        );
        assert_eq!(error_chain(&e), "transport error: invalid peer certificate: BadSignature: io");
    }
}
