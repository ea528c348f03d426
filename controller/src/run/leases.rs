//! `LeaseBook`: this run's leases, one per (host, service) — whose turn it is
//! (suites of one run sharing a service take turns), the lease held there,
//! its renewal, and noticing when the agent no longer honours it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// The agent incarnation that granted it: a restarted agent knows it not.
    pub incarnation: String,
    /// Cancelled when the lease is released, lost or the run stops.
    pub ended: CancellationToken,
}

#[derive(Debug)]
struct Slot {
    turn: Arc<Semaphore>,
    held: Mutex<Option<Held>>,
    /// Tries of this run placed here and not finished.
    claims: AtomicUsize,
    /// Bumped when a turn here is passed on (the book's `freed`).
    freed: Arc<tokio::sync::watch::Sender<u64>>,
}

/// One try placed on a (host, service), counted from the moment it is
/// planned until the try ends (dropped), so suites planned at the same time
/// spread over equally good hosts.
#[derive(Debug)]
pub struct Claim(Arc<Slot>);

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.claims.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The right to use one service of one host now. Dropping it passes the turn on.
#[derive(Debug)]
pub struct Turn {
    permit: Option<OwnedSemaphorePermit>,
    slot: Arc<Slot>,
}

impl Drop for Turn {
    /// The turn is free before the suites waiting for it are woken, so the
    /// first to look takes it at once.
    fn drop(&mut self) {
        drop(self.permit.take());
        self.slot.freed.send_modify(|generation| *generation += 1);
    }
}

#[derive(Debug)]
pub struct LeaseBook {
    slots: Mutex<BTreeMap<Key, Arc<Slot>>>,
    /// Held while a suite plans and claims, so two suites never plan on the
    /// same counts.
    placing: Mutex<()>,
    /// Changes whenever a turn of this run is passed on: a suite waiting for
    /// one plans again then, not at its next periodic look.
    freed: Arc<tokio::sync::watch::Sender<u64>>,
    run_id: String,
    holder: String,
    ttl: Duration,
    events: Events,
    stop: CancellationToken,
}

impl LeaseBook {
    pub fn new(run_id: &str, holder: &str, ttl: Duration, events: Events, stop: CancellationToken) -> LeaseBook {
        LeaseBook {
            slots: Mutex::default(),
            placing: Mutex::default(),
            freed: Arc::new(tokio::sync::watch::Sender::new(0)),
            run_id: run_id.to_owned(),
            holder: holder.to_owned(),
            ttl,
            events,
            stop,
        }
    }

    fn slot(&self, host: usize, service: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().expect("lease slots");
        slots
            .entry((host, service.to_owned()))
            .or_insert_with(|| {
                Arc::new(Slot {
                    turn: Arc::new(Semaphore::new(1)),
                    held: Mutex::default(),
                    claims: AtomicUsize::new(0),
                    freed: self.freed.clone(),
                })
            })
            .clone()
    }

    /// Tells when a turn of this run is passed on.
    pub fn freed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.freed.subscribe()
    }

    /// Planning and claiming happen under this guard (synchronous code only).
    pub fn placing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.placing.lock().expect("placing")
    }

    /// How many of this run's tries are placed on this (host, service).
    pub fn claims(&self, host: usize, service: &str) -> usize {
        let slot = self.slots.lock().expect("lease slots").get(&(host, service.to_owned())).cloned();
        slot.map_or(0, |s| s.claims.load(Ordering::SeqCst))
    }

    pub fn claim(&self, host: usize, service: &str) -> Claim {
        let slot = self.slot(host, service);
        slot.claims.fetch_add(1, Ordering::SeqCst);
        Claim(slot)
    }

    /// This run's turn on the service, if no other try of the run has it.
    /// A try never queues here: it goes back to the planner, which may find
    /// another host and bounds the wait (`--max-wait`).
    pub fn try_turn(&self, host: usize, service: &str) -> Option<Turn> {
        let slot = self.slot(host, service);
        let permit = slot.turn.clone().try_acquire_owned().ok()?;
        Some(Turn { permit: Some(permit), slot })
    }

    /// The lease for this turn: the one held (if the agent that granted it
    /// is still the one answering), or a new one, kept renewed until it ends.
    pub async fn lease(
        &self,
        turn: &Turn,
        agent: &Agent,
        service: &str,
        incarnation: &str,
    ) -> Result<Held, ClientError> {
        let current = turn.slot.held.lock().expect("held").clone();
        if let Some(held) = current.filter(|h| !h.ended.is_cancelled() && h.incarnation == incarnation) {
            return Ok(held);
        }
        self.forget(turn);
        let lease = agent.acquire(service, &self.run_id, &self.holder, self.ttl).await?;
        let held = Held { lease, incarnation: incarnation.to_owned(), ended: self.stop.child_token() };
        *turn.slot.held.lock().expect("held") = Some(held.clone());
        tokio::spawn(renew(agent.clone(), held.clone(), self.ttl, self.events.clone()));
        Ok(held)
    }

    /// The lease under this turn is gone (host lost, agent restarted, lease
    /// refused): stop renewing it, and take a new one next time.
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
