//! Memory admission: may a model load start now? One pure function, used by
//! the agent before every load and by the controller's placement, so both
//! judge a host the same way (DESIGN §4). It lives beside the wire contract
//! because it is part of it: a controller must predict what an agent admits.

use std::fmt;

/// What a host can give right now, each figure in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    /// `MemAvailable` from `/proc/meminfo`.
    pub mem_available: u64,
    /// `limit - usage` of the agent's memory cgroup, when it has a limit.
    pub cgroup_room: Option<u64>,
    /// `budget - usage of supervised services`, when the agent has a budget.
    pub budget_room: Option<u64>,
}

/// A refused load, with every number that went into the decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub need: u64,
    pub headroom: u64,
    pub capacity: Capacity,
    /// Memory already promised to loads admitted earlier and still running.
    pub reserved: u64,
    /// What was left for this load: min(capacity) - reserved.
    pub available: u64,
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes / (1024 * 1024))
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not enough memory: needs {} ({} declared + {} headroom) but only {} is available \
             (MemAvailable {}",
            mib(self.need + self.headroom),
            mib(self.need),
            mib(self.headroom),
            mib(self.available),
            mib(self.capacity.mem_available)
        )?;
        if let Some(room) = self.capacity.cgroup_room {
            write!(f, ", cgroup room {}", mib(room))?;
        }
        if let Some(room) = self.capacity.budget_room {
            write!(f, ", agent budget room {}", mib(room))?;
        }
        write!(f, ", minus {} reserved by loads in progress)", mib(self.reserved))
    }
}

/// Admits a load of `need + headroom` bytes if it fits in what is left after
/// `reserved`; returns the bytes left over after it.
pub fn admit(need: u64, headroom: u64, capacity: Capacity, reserved: u64) -> Result<u64, Refusal> {
    let room = [Some(capacity.mem_available), capacity.cgroup_room, capacity.budget_room]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(0);
    let available = room.saturating_sub(reserved);
    let want = need.saturating_add(headroom);
    if want <= available {
        Ok(available - want)
    } else {
        Err(Refusal { need, headroom, capacity, reserved, available })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn the_tightest_limit_minus_reservations_decides() {
        let host = Capacity { mem_available: 1000 * MIB, cgroup_room: None, budget_room: None };
        let cgroup = Capacity { cgroup_room: Some(300 * MIB), ..host };
        let budget = Capacity { budget_room: Some(200 * MIB), ..cgroup };
        // (need, headroom, capacity, reserved) -> admitted?
        let table = [
            (500, 0, host, 0, Ok(500)),
            (500, 0, host, 600, Err(400)),
            (250, 0, cgroup, 0, Ok(50)),
            (250, 100, cgroup, 0, Err(300)),
            (150, 0, budget, 0, Ok(50)),
            (150, 0, budget, 100, Err(100)),
            (0, 0, budget, 500, Ok(0)),
        ];
        for (need, headroom, cap, reserved, want) in table {
            let got = admit(need * MIB, headroom * MIB, cap, reserved * MIB)
                .map(|left| left / MIB)
                .map_err(|r| r.available / MIB);
            assert_eq!(got, want, "need {need} + {headroom}, {cap:?}, reserved {reserved}");
        }
    }

    #[test]
    fn a_refusal_carries_the_numbers() {
        let cap = Capacity { mem_available: 8000 * MIB, cgroup_room: Some(3000 * MIB), budget_room: None };
        let r = admit(15_000 * MIB, 1024 * MIB, cap, 500 * MIB).unwrap_err();
        assert_eq!(
            r.to_string(),
            "not enough memory: needs 16024 MiB (15000 MiB declared + 1024 MiB headroom) but only 2500 MiB is \
             available (MemAvailable 8000 MiB, cgroup room 3000 MiB, minus 500 MiB reserved by loads in progress)"
        );
    }
}
