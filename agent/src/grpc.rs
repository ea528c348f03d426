//! The agent's gRPC edge: `proctor.agent.v1.Agent`. Requests are checked
//! (leases, names) and handed to the journal and supervisors; every error is
//! mapped to a precise status code here and nowhere else.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use proto::agent_server::Agent as AgentApi;
use proto::{WatchMessage, watch_message};
use tokio_stream::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::cases;
use crate::journal::{Journal, grant_to_proto};
use crate::lease::{LeaseClaim, LeaseError};
use crate::supervisor::{EnsureRequest, Supervisor, SupervisorError};

/// Longest lease a controller may ask for; shorter asks are honoured.
const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(60);
/// Cases accepted in one `RunCases` call.
const MAX_CASES_PER_CALL: usize = 10_000;

pub struct Service {
    pub journal: Journal,
    pub admission: crate::admission::Admission,
    pub supervisors: BTreeMap<String, Supervisor>,
    pub info: proto::AgentInfo,
    pub http: reqwest::Client,
    /// Fires at agent shutdown.
    pub cancel: CancellationToken,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

fn closed<E>(_: E) -> Status {
    Status::unavailable("the agent is shutting down")
}

fn lease_status(e: LeaseError) -> Status {
    match e {
        LeaseError::Busy { .. } => Status::failed_precondition(e.to_string()),
        LeaseError::Stale { .. } => Status::permission_denied(e.to_string()),
        LeaseError::UnknownService(_) => Status::not_found(e.to_string()),
        LeaseError::NotYours { .. } => Status::permission_denied(e.to_string()),
    }
}

fn supervisor_status(e: SupervisorError) -> Status {
    match e {
        SupervisorError::UnknownModel { .. } => Status::not_found(e.to_string()),
        SupervisorError::Refused(_) => Status::resource_exhausted(e.to_string()),
        SupervisorError::Closed => closed(e),
    }
}

/// Who calls, as the auth layer established (without it, in unit tests:
/// the one open-mode identity).
fn caller<T>(request: &Request<T>) -> String {
    request.extensions().get::<crate::auth::Caller>().map_or_else(|| "anyone".to_owned(), |c| c.name.clone())
}

fn claim(lease: Option<proto::LeaseRef>, caller: String) -> Result<LeaseClaim, Status> {
    let l = lease.ok_or_else(|| Status::invalid_argument("missing lease: acquire one with AcquireLease first"))?;
    Ok(LeaseClaim { service: l.service, run_id: l.run_id, lease_id: l.lease_id, epoch: l.epoch, caller })
}

impl Service {
    /// Checks the lease and returns the service's supervisor and the epoch.
    async fn leased(
        &self,
        lease: Option<proto::LeaseRef>,
        caller: String,
    ) -> Result<(Supervisor, u64, LeaseClaim), Status> {
        let claim = claim(lease, caller)?;
        let supervisor = self
            .supervisors
            .get(&claim.service)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("unknown service {:?}", claim.service)))?;
        let grant = self.journal.check(claim.clone()).await.map_err(closed)?.map_err(lease_status)?;
        Ok((supervisor, grant.epoch, claim))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentApi for Service {
    async fn get_info(&self, _: Request<proto::GetInfoRequest>) -> Result<Response<proto::AgentInfo>, Status> {
        let mut info = self.info.clone();
        let snapshot = self.journal.snapshot().await.map_err(closed)?;
        for service in &mut info.services {
            if let Some(state) = snapshot.services.iter().find(|s| s.name == service.name) {
                service.gpus_given.clone_from(&state.gpus);
            }
        }
        if let Some(host) = snapshot.host.filter(|h| h.total_bytes > 0) {
            info.host_memory_total_bytes = host.total_bytes;
        }
        let crate::admission::Standing { capacity, reserved, gpus } = self.admission.standing().await;
        info.gpus = gpus.iter().map(crate::admission::gpu_room_to_proto).collect();
        info.host_memory_available_bytes = capacity.mem_available;
        info.cgroup_room_bytes = capacity.cgroup_room;
        // Read now, like the room: a cgroup's limit can be changed while we run.
        info.cgroup_limit_bytes = crate::admission::cgroup_limit();
        info.budget_room_bytes = capacity.budget_room;
        info.reserved_bytes = reserved;
        info.now_unix_ms = crate::journal::now_unix_ms();
        Ok(Response::new(info))
    }

    async fn acquire_lease(
        &self,
        request: Request<proto::AcquireLeaseRequest>,
    ) -> Result<Response<proto::Lease>, Status> {
        let owner = caller(&request);
        let r = request.into_inner();
        if r.run_id.is_empty() {
            return Err(Status::invalid_argument("run_id is empty"));
        }
        let ttl = match r.ttl_ms {
            0 => DEFAULT_LEASE_TTL,
            ms => Duration::from_millis(ms).min(MAX_LEASE_TTL),
        };
        let grant = self
            .journal
            .acquire(r.service, (r.run_id, r.holder, owner), ttl)
            .await
            .map_err(closed)?
            .map_err(lease_status)?;
        Ok(Response::new(grant_to_proto(&grant)))
    }

    async fn renew_lease(&self, request: Request<proto::LeaseRef>) -> Result<Response<proto::Lease>, Status> {
        let who = caller(&request);
        let claim = claim(Some(request.into_inner()), who)?;
        // Renewal extends by the TTL granted at AcquireLease, not a default.
        let grant = self.journal.renew(claim).await.map_err(closed)?.map_err(lease_status)?;
        Ok(Response::new(grant_to_proto(&grant)))
    }

    async fn release_lease(
        &self,
        request: Request<proto::LeaseRef>,
    ) -> Result<Response<proto::ReleaseLeaseResponse>, Status> {
        let who = caller(&request);
        let claim = claim(Some(request.into_inner()), who)?;
        self.journal.release(claim).await.map_err(closed)?.map_err(lease_status)?;
        Ok(Response::new(proto::ReleaseLeaseResponse {}))
    }

    async fn ensure_models(
        &self,
        request: Request<proto::EnsureModelsRequest>,
    ) -> Result<Response<proto::EnsureModelsResponse>, Status> {
        // The caller's trace context (W3C), passed on to warm-up and load requests.
        let traceparent = request.metadata().get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let who = caller(&request);
        let r = request.into_inner();
        let (supervisor, _, _) = self.leased(r.lease, who).await?;
        if r.models.is_empty() {
            return Err(Status::invalid_argument("no models named: list the models this run needs"));
        }
        let overrides = r.overrides.unwrap_or_default();
        let request = EnsureRequest {
            models: r.models,
            timeout: Some(overrides.load_timeout_ms).filter(|ms| *ms > 0).map(Duration::from_millis),
            timeout_source: overrides.load_timeout_source,
            headroom: overrides.ram_headroom_bytes,
            gpu_headroom: overrides.gpu_headroom_bytes,
            fresh: r.fresh,
            traceparent,
        };
        let outcome = supervisor.ensure(request).await.map_err(supervisor_status)?;
        let seq_after = self.journal.next_seq().await.map_err(closed)?;
        Ok(Response::new(proto::EnsureModelsResponse {
            already_ready: outcome.already_ready,
            loading: outcome.loading,
            seq_after,
        }))
    }

    async fn stop_service(
        &self,
        request: Request<proto::StopServiceRequest>,
    ) -> Result<Response<proto::StopServiceResponse>, Status> {
        let who = caller(&request);
        let (supervisor, _, _) = self.leased(request.into_inner().lease, who).await?;
        let exit = supervisor.stop().await.map_err(supervisor_status)?;
        Ok(Response::new(proto::StopServiceResponse { exit: Some(exit) }))
    }

    async fn run_cases(
        &self,
        request: Request<proto::RunCasesRequest>,
    ) -> Result<Response<proto::RunCasesResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let (supervisor, epoch, claim) = self.leased(r.lease, who).await?;
        if r.cases.len() > MAX_CASES_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "{} cases in one call; send at most {MAX_CASES_PER_CALL}",
                r.cases.len()
            )));
        }
        if let Some(c) = r.cases.iter().find(|c| c.case_id.is_empty()) {
            return Err(Status::invalid_argument(format!("case {:?} has no case_id", c.name)));
        }
        if r.parallel > cases::MAX_PARALLEL {
            return Err(Status::invalid_argument(format!(
                "parallel {} is more than this agent runs at once; ask at most {}",
                r.parallel,
                cases::MAX_PARALLEL
            )));
        }
        for c in &r.cases {
            check_command(c, &supervisor, &claim.service)?;
        }
        let accepted = r.cases.len() as u32;
        let queue = cases::Queue {
            journal: self.journal.clone(),
            supervisor,
            claim,
            epoch,
            http: self.http.clone(),
            cancel: self.cancel.clone(),
        };
        tokio::spawn(queue.run(r.cases, r.parallel));
        Ok(Response::new(proto::RunCasesResponse { accepted }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<proto::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let peer = request.remote_addr().map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let from_seq = request.into_inner().from_seq;
        tracing::info!(%peer, from_seq, "watch started");
        let sub = self.journal.subscribe(from_seq).await.map_err(closed)?;
        let head = std::iter::once(WatchMessage { kind: Some(watch_message::Kind::Snapshot(sub.snapshot)) })
            .chain(sub.backlog)
            .map(Ok);
        // Says when the stream ends: the watcher left, or keepalive found it gone.
        let ended = EndLog { peer, started: tokio::time::Instant::now() };
        let live = tokio_stream::wrappers::ReceiverStream::new(sub.live).map(move |m| {
            let _ = &ended;
            Ok(m)
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(head).chain(live))))
    }

    async fn fetch_retained(
        &self,
        request: Request<proto::FetchRetainedRequest>,
    ) -> Result<Response<proto::FetchRetainedResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        // A run fetches only its own results.
        if r.run_id.is_empty() {
            return Err(Status::invalid_argument("fetch without a run_id: name the run whose results you want"));
        }
        let events =
            self.journal.fetch_retained(r.run_id, who, r.from_seq).await.map_err(closed)?.map_err(lease_status)?;
        Ok(Response::new(proto::FetchRetainedResponse { incarnation: self.journal.incarnation().to_owned(), events }))
    }

    async fn ack(&self, request: Request<proto::AckRequest>) -> Result<Response<proto::AckResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        // An empty run_id would release every run's retained results: a run
        // acknowledges only its own.
        if r.run_id.is_empty() {
            return Err(Status::invalid_argument("ack without a run_id: name the run whose events you acknowledge"));
        }
        if r.incarnation != self.journal.incarnation() {
            return Err(Status::failed_precondition(format!(
                "ack for incarnation {} but this agent is incarnation {}: it restarted; re-sync from a snapshot",
                r.incarnation,
                self.journal.incarnation()
            )));
        }
        let released = self.journal.ack(r.run_id, who, r.up_to_seq).await.map_err(closed)?.map_err(lease_status)?;
        Ok(Response::new(proto::AckResponse { released }))
    }
}

/// Logs when a watch stream is dropped.
struct EndLog {
    peer: String,
    started: tokio::time::Instant,
}

impl Drop for EndLog {
    fn drop(&mut self) {
        tracing::info!(peer = %self.peer, after = ?self.started.elapsed(), "watch ended");
    }
}

/// A command case names one of the service's test commands, with arguments
/// it allows, and a load case stays within the limits and on the service;
/// else the whole call is refused and nothing runs.
fn check_command(case: &proto::Case, supervisor: &Supervisor, service: &str) -> Result<(), Status> {
    if let Some(proto::case::Kind::Load(load)) = &case.kind {
        return crate::load::check(load)
            .map_err(|e| Status::invalid_argument(format!("case {:?}: {e}; nothing was run", case.name)));
    }
    let Some(proto::case::Kind::Command(asked)) = &case.kind else { return Ok(()) };
    let known = &supervisor.commands.commands;
    let Some(command) = known.iter().find(|k| k.name == asked.name) else {
        let names: Vec<&str> = known.iter().map(|k| k.name.as_str()).collect();
        let has = match names.is_empty() {
            true => "its config names none ([[service.test_command]])".to_owned(),
            false => format!("it has {}", names.join(", ")),
        };
        return Err(Status::invalid_argument(format!(
            "case {:?}: service {service} has no test command {:?} ({has}); nothing was run",
            case.name, asked.name
        )));
    };
    crate::commands::check_args(command, &asked.args)
        .map_err(|e| Status::invalid_argument(format!("case {:?}: {e}; nothing was run", case.name)))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{Semaphore, mpsc};

    use super::*;

    fn service() -> Service {
        service_with(BTreeMap::new())
    }

    fn service_with(supervisors: BTreeMap<String, Supervisor>) -> Service {
        let (_, samples) = tokio::sync::watch::channel(BTreeMap::new());
        let (_, gpus) = tokio::sync::watch::channel(Vec::new());
        let capacity: crate::admission::CapacitySource = Box::new(|_| proto::admission::Capacity::default());
        Service {
            journal: Journal::start("inc".into(), &[("svc".into(), vec!["m".into()])]),
            admission: crate::admission::Admission::start(capacity, samples, gpus),
            supervisors,
            info: proto::AgentInfo::default(),
            // Cases go to 127.0.0.1: never through a proxy from the environment.
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            cancel: CancellationToken::new(),
        }
    }

    #[tokio::test]
    async fn an_ack_without_a_run_id_releases_nothing_of_anyones() {
        let api = service();
        for run in ["run-a", "run-b"] {
            api.journal.append(proto::event::Kind::CaseFinished(proto::CaseFinished {
                run_id: run.into(),
                service: "svc".into(),
                result: Some(proto::CaseResult { case_id: format!("{run}/1"), ..Default::default() }),
            }));
        }
        let ack = proto::AckRequest { incarnation: "inc".into(), up_to_seq: u64::MAX - 1, run_id: String::new() };
        let refused = api.ack(Request::new(ack)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("run_id"), "{}", refused.message());
        assert_eq!(
            api.journal.fetch_retained(String::new(), "anyone".into(), 0).await.unwrap().unwrap().len(),
            2,
            "both runs' results stay"
        );
    }

    #[tokio::test]
    async fn renew_lease_extends_by_the_ttl_acquire_lease_granted() {
        let api = service();
        for ttl_ms in [4 * 60_000, 10_000, 3_600_000] {
            let run_id = format!("run-{ttl_ms}");
            let acquire = proto::AcquireLeaseRequest {
                service: "svc".into(),
                run_id: run_id.clone(),
                holder: "ci".into(),
                ttl_ms,
            };
            let lease = api.acquire_lease(Request::new(acquire)).await.unwrap().into_inner();
            let lease_ref =
                proto::LeaseRef { service: "svc".into(), run_id, lease_id: lease.id.clone(), epoch: lease.epoch };
            let before = crate::journal::now_unix_ms();
            let renewed = api.renew_lease(Request::new(lease_ref.clone())).await.unwrap().into_inner();
            let after = crate::journal::now_unix_ms();
            let ttl_ms = ttl_ms as i64;
            assert!(
                (before + ttl_ms..=after + ttl_ms).contains(&renewed.expires_unix_ms),
                "a lease granted for {ttl_ms} ms was renewed for {} ms",
                renewed.expires_unix_ms - after
            );
            api.release_lease(Request::new(lease_ref)).await.unwrap();
        }
    }

    /// A local HTTP service that reports each request's path as it arrives
    /// and answers only once let go, so a test can act while a case is in flight.
    struct HeldService {
        url: String,
        arrived: mpsc::UnboundedReceiver<String>,
        /// Closed to let every request, held or still to come, be answered.
        answer: Arc<Semaphore>,
    }

    impl HeldService {
        async fn start(held: bool) -> HeldService {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let (tx, arrived) = mpsc::unbounded_channel();
            let answer = Arc::new(Semaphore::new(0));
            if !held {
                answer.close();
            }
            let gate = answer.clone();
            tokio::spawn(async move {
                while let Ok((conn, _)) = listener.accept().await {
                    tokio::spawn(answer_when_let_go(conn, tx.clone(), gate.clone()));
                }
            });
            HeldService { url, arrived, answer }
        }

        fn let_go(&self) {
            self.answer.close();
        }

        /// Requests that arrived and were not yet taken from `arrived`.
        fn pending(&mut self) -> usize {
            std::iter::from_fn(|| self.arrived.try_recv().ok()).count()
        }
    }

    async fn answer_when_let_go(mut conn: TcpStream, arrived: mpsc::UnboundedSender<String>, gate: Arc<Semaphore>) {
        let mut head = Vec::new();
        let mut buf = [0; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let path = String::from_utf8_lossy(&head).split_whitespace().nth(1).unwrap_or_default().to_owned();
        let _ = arrived.send(path);
        // Err once closed: that is the signal to answer.
        let _ = gate.acquire().await;
        let response =
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
        let _ = conn.write_all(response.as_bytes()).await;
    }

    fn http_case(n: usize) -> proto::Case {
        let http = proto::HttpCase { method: "GET".into(), path: format!("/case-{n}"), ..Default::default() };
        proto::Case {
            case_id: format!("c{n}"),
            name: format!("case {n}"),
            kind: Some(proto::case::Kind::Http(http)),
            assertions: vec![proto::Assertion { kind: Some(proto::assertion::Kind::Status(200)) }],
            ..Default::default()
        }
    }

    /// The next `count` case results of `run_id`, in the order they finished.
    async fn case_results(
        live: &mut mpsc::Receiver<WatchMessage>,
        run_id: &str,
        count: usize,
    ) -> Vec<proto::CaseResult> {
        let mut results = Vec::new();
        while results.len() < count {
            let message = tokio::time::timeout(Duration::from_secs(20), live.recv()).await;
            let message = message.expect("case results within 20 s").expect("journal open");
            if let Some(watch_message::Kind::Event(proto::Event {
                kind: Some(proto::event::Kind::CaseFinished(f)),
                ..
            })) = message.kind
                && f.run_id == run_id
            {
                results.push(f.result.expect("result"));
            }
        }
        results
    }

    /// What happens while the first of a call's queued cases is in flight.
    #[derive(Clone, Copy, Debug)]
    enum Meanwhile {
        Nothing,
        Released,
        TakenByAnotherRun,
        /// The service restarted on another port.
        Restarted,
        Stopped,
        AgentShutDown,
    }

    #[tokio::test]
    async fn more_cases_at_once_than_the_agent_runs_is_refused_with_its_limit() {
        let first = HeldService::start(true).await;
        let (_url, url_rx) = tokio::sync::watch::channel(Some(first.url.clone()));
        let api = service_with(BTreeMap::from([("svc".to_owned(), Supervisor::serving(url_rx))]));
        let acquire =
            proto::AcquireLeaseRequest { service: "svc".into(), run_id: "run-a".into(), ..Default::default() };
        let lease = api.acquire_lease(Request::new(acquire)).await.unwrap().into_inner();
        let lease_ref =
            proto::LeaseRef { service: "svc".into(), run_id: "run-a".into(), lease_id: lease.id, epoch: lease.epoch };
        let request = proto::RunCasesRequest { lease: Some(lease_ref), cases: vec![http_case(1)], parallel: 65 };
        let refused = api.run_cases(Request::new(request)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert_eq!(refused.message(), "parallel 65 is more than this agent runs at once; ask at most 64");
    }

    #[tokio::test]
    async fn queued_cases_run_only_under_a_current_lease_and_at_the_current_url() {
        const ENDED: &str = "lease on service svc ended before the case ran";
        // (what happens during case 1, how cases 2 and 3 end, requests seen at the first and the second port)
        let table = [
            (Meanwhile::Nothing, "PASSED", 3, 0),
            (Meanwhile::Released, ENDED, 1, 0),
            (Meanwhile::TakenByAnotherRun, ENDED, 1, 0),
            (Meanwhile::Restarted, "PASSED", 1, 2),
            (Meanwhile::Stopped, "service svc is not running", 1, 0),
            (Meanwhile::AgentShutDown, "the agent shut down before the case ran", 1, 0),
        ];
        for (meanwhile, later, at_first, at_second) in table {
            let (mut first, mut second) = (HeldService::start(true).await, HeldService::start(false).await);
            let (url, url_rx) = tokio::sync::watch::channel(Some(first.url.clone()));
            let api = service_with(BTreeMap::from([("svc".to_owned(), Supervisor::serving(url_rx))]));
            let acquire =
                proto::AcquireLeaseRequest { service: "svc".into(), run_id: "run-a".into(), ..Default::default() };
            let lease = api.acquire_lease(Request::new(acquire)).await.unwrap().into_inner();
            let lease_ref = proto::LeaseRef {
                service: "svc".into(),
                run_id: "run-a".into(),
                lease_id: lease.id,
                epoch: lease.epoch,
            };
            let mut sub = api.journal.subscribe(u64::MAX).await.unwrap();
            let cases = (1..=3).map(http_case).collect();
            let request = proto::RunCasesRequest { lease: Some(lease_ref.clone()), cases, parallel: 0 };
            assert_eq!(api.run_cases(Request::new(request)).await.unwrap().into_inner().accepted, 3);

            assert_eq!(first.arrived.recv().await.as_deref(), Some("/case-1"), "{meanwhile:?}");
            match meanwhile {
                Meanwhile::Nothing => {}
                Meanwhile::Released => api.release_lease(Request::new(lease_ref)).await.map(drop).unwrap(),
                Meanwhile::TakenByAnotherRun => {
                    api.release_lease(Request::new(lease_ref)).await.unwrap();
                    let b = proto::AcquireLeaseRequest {
                        service: "svc".into(),
                        run_id: "run-b".into(),
                        ..Default::default()
                    };
                    assert_eq!(api.acquire_lease(Request::new(b)).await.unwrap().into_inner().epoch, 2);
                }
                Meanwhile::Restarted => drop(url.send(Some(second.url.clone()))),
                Meanwhile::Stopped => drop(url.send(None)),
                Meanwhile::AgentShutDown => api.cancel.cancel(),
            }
            first.let_go();

            let results = case_results(&mut sub.live, "run-a", 3).await;
            let ended: Vec<_> = results
                .iter()
                .map(|r| match r.outcome() {
                    proto::CaseOutcome::Passed => "PASSED".to_owned(),
                    _ => r.message.clone(),
                })
                .collect();
            assert_eq!(ended[0], "PASSED", "{meanwhile:?}: the case in flight completes");
            for (r, got) in results.iter().zip(&ended).skip(1) {
                assert!(got.starts_with(later), "{meanwhile:?}: case {} ended {got:?}, expected {later:?}", r.case_id);
            }
            let seen = (1 + first.pending(), second.pending());
            assert_eq!(seen, (at_first, at_second), "{meanwhile:?}: requests at the first and second port");
        }
    }
}
