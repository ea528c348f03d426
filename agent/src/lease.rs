//! Exclusive, expiring leases on services (DESIGN §4). Pure: the journal actor
//! owns the one `LeaseTable` and passes the time in.

use std::collections::BTreeMap;
use std::time::Duration;

use proto::format_unix_ms;
use tokio::time::Instant;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub id: String,
    pub epoch: u64,
    pub service: String,
    pub run_id: String,
    pub holder: String,
    pub granted_unix_ms: i64,
    pub expires_unix_ms: i64,
    expires: Instant,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("busy: service {service} is held by run {run_id} ({holder}) since {since}")]
    Busy { service: String, run_id: String, holder: String, since: String },
    #[error("lease {lease_id} (epoch {epoch}) on service {service} is not the current lease{current}")]
    Stale { service: String, lease_id: String, epoch: u64, current: String },
    #[error("unknown service {0:?}")]
    UnknownService(String),
}

#[derive(Debug, Default)]
pub struct LeaseTable {
    held: BTreeMap<String, Grant>,
    epochs: BTreeMap<String, u64>,
}

/// What a caller presents to prove it holds a lease.
#[derive(Clone, Debug)]
pub struct LeaseClaim {
    pub service: String,
    pub run_id: String,
    pub lease_id: String,
    pub epoch: u64,
}

impl LeaseTable {
    fn live(&self, service: &str, now: Instant) -> Option<&Grant> {
        self.held.get(service).filter(|g| g.expires > now)
    }

    /// Grants the lease, or renews it when the same run asks again.
    pub fn acquire(
        &mut self,
        service: &str,
        run_id: &str,
        holder: &str,
        ttl: Duration,
        now: Instant,
        now_ms: i64,
    ) -> Result<Grant, LeaseError> {
        if let Some(g) = self.live(service, now) {
            if g.run_id != run_id {
                return Err(LeaseError::Busy {
                    service: service.to_owned(),
                    run_id: g.run_id.clone(),
                    holder: g.holder.clone(),
                    since: format_unix_ms(g.granted_unix_ms),
                });
            }
            let g = self.held.get_mut(service).expect("live lease");
            g.expires = now + ttl;
            g.expires_unix_ms = now_ms + ttl.as_millis() as i64;
            return Ok(g.clone());
        }
        let epoch = self.epochs.entry(service.to_owned()).or_default();
        *epoch += 1;
        let grant = Grant {
            id: uuid::Uuid::new_v4().to_string(),
            epoch: *epoch,
            service: service.to_owned(),
            run_id: run_id.to_owned(),
            holder: holder.to_owned(),
            granted_unix_ms: now_ms,
            expires_unix_ms: now_ms + ttl.as_millis() as i64,
            expires: now + ttl,
        };
        self.held.insert(service.to_owned(), grant.clone());
        Ok(grant)
    }

    /// Checks a claim; on success returns the current grant.
    pub fn check(&self, claim: &LeaseClaim, now: Instant) -> Result<&Grant, LeaseError> {
        match self.live(&claim.service, now) {
            Some(g) if g.id == claim.lease_id && g.epoch == claim.epoch => Ok(g),
            current => Err(LeaseError::Stale {
                service: claim.service.clone(),
                lease_id: claim.lease_id.clone(),
                epoch: claim.epoch,
                current: match current {
                    Some(g) => format!("; run {} holds epoch {}", g.run_id, g.epoch),
                    None => "; no lease is held (it expired or was released)".to_owned(),
                },
            }),
        }
    }

    pub fn renew(&mut self, claim: &LeaseClaim, ttl: Duration, now: Instant, now_ms: i64) -> Result<Grant, LeaseError> {
        self.check(claim, now)?;
        let g = self.held.get_mut(&claim.service).expect("checked");
        g.expires = now + ttl;
        g.expires_unix_ms = now_ms + ttl.as_millis() as i64;
        Ok(g.clone())
    }

    pub fn release(&mut self, claim: &LeaseClaim, now: Instant) -> Result<Grant, LeaseError> {
        self.check(claim, now)?;
        Ok(self.held.remove(&claim.service).expect("checked"))
    }

    pub fn live_grants(&self, now: Instant) -> Vec<Grant> {
        self.held.values().filter(|g| g.expires > now).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(g: &Grant) -> LeaseClaim {
        LeaseClaim { service: g.service.clone(), run_id: g.run_id.clone(), lease_id: g.id.clone(), epoch: g.epoch }
    }

    #[test]
    fn second_run_is_told_who_holds_the_lease() {
        let mut t = LeaseTable::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(10);
        let a = t.acquire("svc", "run-a", "ci@host1", ttl, now, 0).unwrap();
        assert_eq!(a.epoch, 1);
        let err = t.acquire("svc", "run-b", "me@host2", ttl, now, 0).unwrap_err();
        assert_eq!(err.to_string(), "busy: service svc is held by run run-a (ci@host1) since 1970-01-01T00:00:00Z");
        // The same run asking again renews, keeping id and epoch.
        assert_eq!(t.acquire("svc", "run-a", "ci@host1", ttl, now, 0).unwrap().id, a.id);
    }

    #[test]
    fn expiry_and_release_bump_the_epoch_and_fence_old_claims() {
        let mut t = LeaseTable::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(10);
        let a = t.acquire("svc", "run-a", "x", ttl, now, 0).unwrap();
        let later = now + Duration::from_secs(11);
        let b = t.acquire("svc", "run-b", "y", ttl, later, 0).unwrap();
        assert_eq!(b.epoch, 2);
        let err = t.check(&claim(&a), later).unwrap_err();
        assert!(err.to_string().contains("run run-b holds epoch 2"), "{err}");
        t.release(&claim(&b), later).unwrap();
        assert!(t.check(&claim(&b), later).is_err());
        assert_eq!(t.acquire("svc", "run-c", "z", ttl, later, 0).unwrap().epoch, 3);
    }
}
