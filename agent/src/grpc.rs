//! The agent's gRPC edge: `proctor.agent.v1.Agent`. Requests are checked
//! (leases, names) and handed to the journal and supervisors; every error is
//! mapped to a precise status code here and nowhere else.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use proto::agent_server::Agent as AgentApi;
use proto::{WatchMessage, watch_message};
use tokio_stream::{Stream, StreamExt as _};
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
    }
}

fn supervisor_status(e: SupervisorError) -> Status {
    match e {
        SupervisorError::UnknownModel { .. } => Status::not_found(e.to_string()),
        SupervisorError::Refused(_) => Status::resource_exhausted(e.to_string()),
        SupervisorError::Closed => closed(e),
    }
}

fn claim(lease: Option<proto::LeaseRef>) -> Result<LeaseClaim, Status> {
    let l = lease.ok_or_else(|| Status::invalid_argument("missing lease: acquire one with AcquireLease first"))?;
    Ok(LeaseClaim { service: l.service, run_id: l.run_id, lease_id: l.lease_id, epoch: l.epoch })
}

impl Service {
    /// Checks the lease and returns the service's supervisor and the epoch.
    async fn leased(&self, lease: Option<proto::LeaseRef>) -> Result<(Supervisor, u64, LeaseClaim), Status> {
        let claim = claim(lease)?;
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
        if let Some(host) = snapshot.host.filter(|h| h.total_bytes > 0) {
            info.host_memory_total_bytes = host.total_bytes;
        }
        let (capacity, reserved) = self.admission.capacity().await;
        info.host_memory_available_bytes = capacity.mem_available;
        info.cgroup_room_bytes = capacity.cgroup_room;
        info.budget_room_bytes = capacity.budget_room;
        info.reserved_bytes = reserved;
        info.now_unix_ms = crate::journal::now_unix_ms();
        Ok(Response::new(info))
    }

    async fn acquire_lease(
        &self,
        request: Request<proto::AcquireLeaseRequest>,
    ) -> Result<Response<proto::Lease>, Status> {
        let r = request.into_inner();
        if r.run_id.is_empty() {
            return Err(Status::invalid_argument("run_id is empty"));
        }
        let ttl = match r.ttl_ms {
            0 => DEFAULT_LEASE_TTL,
            ms => Duration::from_millis(ms).min(MAX_LEASE_TTL),
        };
        let grant =
            self.journal.acquire(r.service, r.run_id, r.holder, ttl).await.map_err(closed)?.map_err(lease_status)?;
        Ok(Response::new(grant_to_proto(&grant)))
    }

    async fn renew_lease(&self, request: Request<proto::LeaseRef>) -> Result<Response<proto::Lease>, Status> {
        let claim = claim(Some(request.into_inner()))?;
        let grant = self.journal.renew(claim, DEFAULT_LEASE_TTL).await.map_err(closed)?.map_err(lease_status)?;
        Ok(Response::new(grant_to_proto(&grant)))
    }

    async fn release_lease(
        &self,
        request: Request<proto::LeaseRef>,
    ) -> Result<Response<proto::ReleaseLeaseResponse>, Status> {
        let claim = claim(Some(request.into_inner()))?;
        self.journal.release(claim).await.map_err(closed)?.map_err(lease_status)?;
        Ok(Response::new(proto::ReleaseLeaseResponse {}))
    }

    async fn ensure_models(
        &self,
        request: Request<proto::EnsureModelsRequest>,
    ) -> Result<Response<proto::EnsureModelsResponse>, Status> {
        // The caller's trace context (W3C), passed on to warm-up and load requests.
        let traceparent = request.metadata().get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let r = request.into_inner();
        let (supervisor, _, _) = self.leased(r.lease).await?;
        if r.models.is_empty() {
            return Err(Status::invalid_argument("no models named: list the models this run needs"));
        }
        let overrides = r.overrides.unwrap_or_default();
        let request = EnsureRequest {
            models: r.models,
            timeout: Some(overrides.load_timeout_ms).filter(|ms| *ms > 0).map(Duration::from_millis),
            headroom: overrides.ram_headroom_bytes,
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
        let (supervisor, _, _) = self.leased(request.into_inner().lease).await?;
        let exit = supervisor.stop().await.map_err(supervisor_status)?;
        Ok(Response::new(proto::StopServiceResponse { exit: Some(exit) }))
    }

    async fn run_cases(
        &self,
        request: Request<proto::RunCasesRequest>,
    ) -> Result<Response<proto::RunCasesResponse>, Status> {
        let r = request.into_inner();
        let (supervisor, epoch, claim) = self.leased(r.lease).await?;
        if r.cases.len() > MAX_CASES_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "{} cases in one call; send at most {MAX_CASES_PER_CALL}",
                r.cases.len()
            )));
        }
        if let Some(c) = r.cases.iter().find(|c| c.case_id.is_empty()) {
            return Err(Status::invalid_argument(format!("case {:?} has no case_id", c.name)));
        }
        let base_url = supervisor.base_url().await.map_err(supervisor_status)?;
        let accepted = r.cases.len() as u32;
        let journal = self.journal.clone();
        let http = self.http.clone();
        tokio::spawn(async move {
            for case in r.cases {
                let result = match &base_url {
                    Some(url) => cases::run_case(&http, url, &case, epoch).await,
                    None => proto::CaseResult {
                        case_id: case.case_id.clone(),
                        attempt: case.attempt,
                        name: case.name.clone(),
                        outcome: proto::CaseOutcome::Error.into(),
                        message: format!("service {} is not running", claim.service),
                        lease_epoch: epoch,
                        ..Default::default()
                    },
                };
                journal.append(proto::event::Kind::CaseFinished(proto::CaseFinished {
                    run_id: claim.run_id.clone(),
                    service: claim.service.clone(),
                    result: Some(result),
                }));
            }
        });
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
        let r = request.into_inner();
        let events = self.journal.fetch_retained(r.run_id, r.from_seq).await.map_err(closed)?;
        Ok(Response::new(proto::FetchRetainedResponse { incarnation: self.journal.incarnation().to_owned(), events }))
    }

    async fn ack(&self, request: Request<proto::AckRequest>) -> Result<Response<proto::AckResponse>, Status> {
        let r = request.into_inner();
        if r.incarnation != self.journal.incarnation() {
            return Err(Status::failed_precondition(format!(
                "ack for incarnation {} but this agent is incarnation {}: it restarted; re-sync from a snapshot",
                r.incarnation,
                self.journal.incarnation()
            )));
        }
        let released = self.journal.ack(r.run_id, r.up_to_seq).await.map_err(closed)?;
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
