//! Exclusive, expiring leases on services (DESIGN §4). Pure: the journal actor
//! owns the one `LeaseTable`, passes the time in, and calls `expire` when
//! `next_expiry` comes so that every lease's end is announced.

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
    /// Who took it (the caller's certificate or token name): only they may
    /// use it. Never sent to watchers, like the id.
    pub owner: String,
    pub granted_unix_ms: i64,
    pub expires_unix_ms: i64,
    expires: Instant,
    /// What the lease was (last) granted for: a renewal extends by this, since
    /// `RenewLease` carries no TTL of its own.
    ttl: Duration,
}

impl Grant {
    /// Pushes the expiry to `ttl` from now and remembers `ttl` for renewals.
    fn extend(&mut self, ttl: Duration, now: Instant, now_ms: i64) {
        self.ttl = ttl;
        self.expires = now + ttl;
        self.expires_unix_ms = now_ms + ttl.as_millis() as i64;
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("busy: service {service} is held by run {run_id} ({holder}) since {since}")]
    Busy { service: String, run_id: String, holder: String, since: String },
    #[error("lease {lease_id} (epoch {epoch}) on service {service} is not the current lease{current}")]
    Stale { service: String, lease_id: String, epoch: u64, current: String },
    #[error("unknown service {0:?}")]
    UnknownService(String),
    #[error("the lease on service {service} (run {run_id}) was taken by {owner}; only that identity may use it")]
    NotYours { service: String, run_id: String, owner: String },
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
    /// Who presents it.
    pub caller: String,
}

impl LeaseTable {
    fn live(&self, service: &str, now: Instant) -> Option<&Grant> {
        self.held.get(service).filter(|g| g.expires > now)
    }

    /// Grants the lease, or renews it when the same run asks again.
    pub fn acquire(
        &mut self,
        service: &str,
        (run_id, holder, owner): (&str, &str, &str),
        ttl: Duration,
        now: Instant,
        now_ms: i64,
    ) -> Result<Grant, LeaseError> {
        if let Some(g) = self.live(service, now) {
            if g.run_id == run_id && g.owner != owner {
                return Err(not_yours(g));
            }
            if g.run_id != run_id {
                return Err(LeaseError::Busy {
                    service: service.to_owned(),
                    run_id: g.run_id.clone(),
                    holder: g.holder.clone(),
                    since: format_unix_ms(g.granted_unix_ms),
                });
            }
            let g = self.held.get_mut(service).expect("live lease");
            g.extend(ttl, now, now_ms);
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
            owner: owner.to_owned(),
            granted_unix_ms: now_ms,
            expires_unix_ms: now_ms + ttl.as_millis() as i64,
            expires: now + ttl,
            ttl,
        };
        self.held.insert(service.to_owned(), grant.clone());
        Ok(grant)
    }

    /// Checks a claim; on success returns the current grant.
    pub fn check(&self, claim: &LeaseClaim, now: Instant) -> Result<&Grant, LeaseError> {
        match self.live(&claim.service, now) {
            Some(g) if g.id == claim.lease_id && g.epoch == claim.epoch && g.owner != claim.caller => Err(not_yours(g)),
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

    /// Extends the claimed lease by the TTL it was granted with.
    pub fn renew(&mut self, claim: &LeaseClaim, now: Instant, now_ms: i64) -> Result<Grant, LeaseError> {
        self.check(claim, now)?;
        let g = self.held.get_mut(&claim.service).expect("checked");
        g.extend(g.ttl, now, now_ms);
        Ok(g.clone())
    }

    pub fn release(&mut self, claim: &LeaseClaim, now: Instant) -> Result<Grant, LeaseError> {
        self.check(claim, now)?;
        Ok(self.held.remove(&claim.service).expect("checked"))
    }

    pub fn live_grants(&self, now: Instant) -> Vec<Grant> {
        self.held.values().filter(|g| g.expires > now).cloned().collect()
    }

    /// Removes and returns the leases that have expired by `now`, so the
    /// caller can announce each one's end.
    pub fn expire(&mut self, now: Instant) -> Vec<Grant> {
        self.held.extract_if(.., |_, g| g.expires <= now).map(|(_, g)| g).collect()
    }

    /// When the next held lease expires, if any is held.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.held.values().map(|g| g.expires).min()
    }
}

fn not_yours(g: &Grant) -> LeaseError {
    LeaseError::NotYours { service: g.service.clone(), run_id: g.run_id.clone(), owner: g.owner.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(g: &Grant) -> LeaseClaim {
        LeaseClaim {
            service: g.service.clone(),
            run_id: g.run_id.clone(),
            lease_id: g.id.clone(),
            epoch: g.epoch,
            caller: g.owner.clone(),
        }
    }

    #[test]
    fn second_run_is_told_who_holds_the_lease() {
        let mut t = LeaseTable::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(10);
        let a = t.acquire("svc", ("run-a", "ci@host1", "ci"), ttl, now, 0).unwrap();
        assert_eq!(a.epoch, 1);
        let err = t.acquire("svc", ("run-b", "me@host2", "ci"), ttl, now, 0).unwrap_err();
        assert_eq!(err.to_string(), "busy: service svc is held by run run-a (ci@host1) since 1970-01-01T00:00:00Z");
        // The same run asking again renews, keeping id and epoch.
        assert_eq!(t.acquire("svc", ("run-a", "ci@host1", "ci"), ttl, now, 0).unwrap().id, a.id);
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_renewal_keeps_the_ttl_the_lease_was_granted_with() {
        // (ttl granted by acquire, ttl of a later acquire by the same run, what a renewal extends by)
        let cases = [
            (secs(240), None, secs(240)),
            (secs(10), None, secs(10)),
            (secs(3600), None, secs(3600)),
            (secs(60), Some(secs(240)), secs(240)),
            (secs(240), Some(secs(30)), secs(30)),
        ];
        for (granted, reacquired, expected) in cases {
            let mut t = LeaseTable::default();
            let t0 = Instant::now();
            let g = t.acquire("svc", ("run", "x", "ci"), granted, t0, 0).unwrap();
            if let Some(ttl) = reacquired {
                let again = t.acquire("svc", ("run", "x", "ci"), ttl, t0 + secs(1), 1_000).unwrap();
                assert_eq!(again.expires, t0 + secs(1) + ttl, "acquiring again extends by the ttl it asks");
            }
            let renewed = t.renew(&claim(&g), t0 + secs(5), 5_000).unwrap();
            let case = format!("granted {granted:?}, re-acquired {reacquired:?}");
            assert_eq!(renewed.expires, t0 + secs(5) + expected, "{case}");
            assert_eq!(renewed.expires_unix_ms, 5_000 + expected.as_millis() as i64, "{case}");
        }
    }

    #[test]
    fn expiry_and_release_bump_the_epoch_and_fence_old_claims() {
        let mut t = LeaseTable::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(10);
        let a = t.acquire("svc", ("run-a", "x", "ci"), ttl, now, 0).unwrap();
        let later = now + Duration::from_secs(11);
        let b = t.acquire("svc", ("run-b", "y", "ci"), ttl, later, 0).unwrap();
        assert_eq!(b.epoch, 2);
        let err = t.check(&claim(&a), later).unwrap_err();
        assert!(err.to_string().contains("run run-b holds epoch 2"), "{err}");
        t.release(&claim(&b), later).unwrap();
        assert!(t.check(&claim(&b), later).is_err());
        assert_eq!(t.acquire("svc", ("run-c", "z", "ci"), ttl, later, 0).unwrap().epoch, 3);
    }

    #[test]
    fn expire_removes_and_returns_only_the_leases_past_their_expiry() {
        let mut t = LeaseTable::default();
        let t0 = Instant::now();
        for (service, ttl) in [("a", 5), ("b", 20), ("c", 10)] {
            t.acquire(service, (&format!("run-{service}"), "x", "ci"), secs(ttl), t0, 0).unwrap();
        }
        // (seconds after the grants, leases expired by then, next expiry after that)
        let cases: [(u64, &[&str], Option<u64>); 5] =
            [(0, &[], Some(5)), (4, &[], Some(5)), (5, &["a"], Some(10)), (6, &[], Some(10)), (30, &["b", "c"], None)];
        for (at, expected, next) in cases {
            let expired: Vec<_> = t.expire(t0 + secs(at)).into_iter().map(|g| g.service).collect();
            assert_eq!(expired, expected, "expired at {at} s");
            assert_eq!(t.next_expiry(), next.map(|n| t0 + secs(n)), "next expiry after {at} s");
            assert_eq!(t.live_grants(t0 + secs(at)).len(), t.held.len(), "nothing expired is left held");
        }
    }
}

#[cfg(test)]
mod owner_tests {
    use super::*;

    #[test]
    fn a_lease_serves_only_the_identity_that_took_it() {
        let mut t = LeaseTable::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        let g = t.acquire("svc", ("run-a", "ci@host1", "ci-1"), ttl, now, 0).unwrap();
        let theirs = LeaseClaim {
            service: g.service.clone(),
            run_id: g.run_id.clone(),
            lease_id: g.id.clone(),
            epoch: g.epoch,
            caller: "ci-2".into(),
        };
        let refused = t.check(&theirs, now).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "the lease on service svc (run run-a) was taken by ci-1; only that identity may use it"
        );
        assert!(matches!(t.renew(&theirs, now, 0), Err(LeaseError::NotYours { .. })));
        assert!(matches!(t.release(&theirs, now), Err(LeaseError::NotYours { .. })));
        // Knowing the run id is not enough to take it over either.
        let again = t.acquire("svc", ("run-a", "ci@host2", "ci-2"), ttl, now, 0);
        assert!(matches!(again, Err(LeaseError::NotYours { .. })), "{again:?}");
        let mine = LeaseClaim { caller: "ci-1".into(), ..theirs };
        assert!(t.release(&mine, now).is_ok(), "the owner still can");
    }
}
