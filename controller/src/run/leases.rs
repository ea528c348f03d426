//! `LeaseBook`: this run's leases, one per (host, service) — whose turn it is
//! (suites of one run sharing a service take turns), the lease held there,
//! its renewal, and noticing when the agent no longer honours it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::events::{Events, RunEvent};
use crate::client::{Agent, ClientError, Failure, Lease};

type Key = (usize, String);

/// A lease this run holds, and the token that fires when it ends.
#[derive(Clone, Debug)]
pub struct Held {
    pub lease: Lease,
    /// Cancelled when the lease is released, lost or the run stops.
    pub ended: CancellationToken,
}

#[derive(Debug)]
struct Slot {
    turn: Arc<Semaphore>,
    held: Mutex<Option<Held>>,
}

/// The right to use one service of one host now. Dropping it passes the turn on.
#[derive(Debug)]
pub struct Turn {
    _permit: OwnedSemaphorePermit,
    slot: Arc<Slot>,
}

#[derive(Debug)]
pub struct LeaseBook {
    slots: Mutex<BTreeMap<Key, Arc<Slot>>>,
    run_id: String,
    holder: String,
    ttl: Duration,
    events: Events,
    stop: CancellationToken,
}

impl LeaseBook {
    pub fn new(run_id: &str, holder: &str, ttl: Duration, events: Events, stop: CancellationToken) -> LeaseBook {
        LeaseBook { slots: Mutex::default(), run_id: run_id.to_owned(), holder: holder.to_owned(), ttl, events, stop }
    }

    fn slot(&self, host: usize, service: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().expect("lease slots");
        slots
            .entry((host, service.to_owned()))
            .or_insert_with(|| Arc::new(Slot { turn: Arc::new(Semaphore::new(1)), held: Mutex::default() }))
            .clone()
    }

    /// How many of this run's tries use or wait for this (host, service):
    /// the planner spreads suites over equally good hosts with it.
    pub fn queued(&self, host: usize, service: &str) -> usize {
        let slot = self.slots.lock().expect("lease slots").get(&(host, service.to_owned())).cloned();
        slot.map_or(0, |s| Arc::strong_count(&s.turn) - 1)
    }

    /// Waits for this run's turn on the service (cancel-safe: the caller
    /// selects it against the run's interrupt).
    pub async fn turn(&self, host: usize, service: &str) -> Turn {
        let slot = self.slot(host, service);
        let semaphore = slot.turn.clone();
        let permit = semaphore.acquire_owned().await.expect("never closed");
        Turn { _permit: permit, slot }
    }

    /// The lease for this turn: the one held, or a new one from the agent,
    /// kept renewed until it ends.
    pub async fn lease(&self, turn: &Turn, agent: &Agent, service: &str) -> Result<Held, ClientError> {
        if let Some(held) = turn.slot.held.lock().expect("held").clone().filter(|h| !h.ended.is_cancelled()) {
            return Ok(held);
        }
        let lease = agent.acquire(service, &self.run_id, &self.holder, self.ttl).await?;
        let held = Held { lease, ended: self.stop.child_token() };
        *turn.slot.held.lock().expect("held") = Some(held.clone());
        tokio::spawn(renew(agent.clone(), held.clone(), self.ttl, self.events.clone()));
        Ok(held)
    }

    /// The host under this turn is lost: stop renewing there, and take a
    /// new lease if it comes back.
    pub fn forget(&self, turn: &Turn) {
        if let Some(h) = turn.slot.held.lock().expect("held").take() {
            h.ended.cancel();
        }
    }

    /// Every lease this run still holds, with its host.
    pub fn held(&self) -> Vec<(usize, Held)> {
        let slots = self.slots.lock().expect("lease slots");
        slots
            .iter()
            .filter_map(|((host, _), slot)| slot.held.lock().expect("held").clone().map(|h| (*host, h)))
            .collect()
    }
}

/// Renews every third of the TTL until the lease ends. A refusal means the
/// agent no longer honours it: the lease ends now, and every try using it
/// stops sending work. A call that breaks on the way is tried again (the
/// host's loss is decided by the reconnect grace, not here).
async fn renew(agent: Agent, held: Held, ttl: Duration, events: Events) {
    let mut tick = tokio::time::interval(ttl / 3);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = held.ended.cancelled() => return,
            _ = tick.tick() => {}
        }
        match agent.renew(&held.lease).await {
            Ok(_) => {}
            Err(e) if e.kind() == Failure::Lost => {}
            Err(e) => {
                events.send(RunEvent::LeaseLost {
                    host: agent.name.clone(),
                    service: held.lease.service.clone(),
                    reason: e.to_string(),
                });
                held.ended.cancel();
                return;
            }
        }
    }
}
