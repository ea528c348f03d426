//! Memory admission: may a model load start now? Pure functions shared by
//! the agent, before every load, and the controller's placement, so both
//! judge a host the same way (DESIGN §4): `load_need` says what a request
//! brings into memory, `admit` whether that fits. They live beside the wire
//! contract because they are part of it: a controller must predict what an
//! agent admits.

use std::fmt;

pub mod gpu;
pub use gpu::{GpuPin, GpuRefusal, GpuRoom, place_gpu};

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

/// A model of a service, as either side sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelMem<'a> {
    pub name: &'a str,
    /// Declared RAM need, in bytes.
    pub ram: u64,
    /// Declared GPU memory need, in bytes.
    pub gpu: u64,
    /// Loads whenever the service starts, asked for or not.
    pub at_start: bool,
    /// READY, or already admitted and loading: a request brings in nothing more.
    pub loaded: bool,
}

/// What one load request brings into memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadNeed<'a> {
    /// The models that start loading, in the order given.
    pub models: Vec<&'a str>,
    /// Their declared needs, summed.
    pub bytes: u64,
    /// Their declared GPU needs, summed.
    pub gpu_bytes: u64,
    /// The request's headroom, once however many models load. Kept when
    /// `models` is empty: a planner may still want it free for the run, but
    /// the agent has no load to admit then and reserves nothing.
    pub headroom: u64,
}

/// What a request for `asked` brings into memory. Starting the service
/// (`starting`) loads every at-start model too, asked for or not; a running
/// service loads only the asked models. Either way a `loaded` model costs
/// nothing, and names not among `models` are ignored (callers validate them).
pub fn load_need<'a>(models: &[ModelMem<'a>], asked: &[String], starting: bool, headroom: u64) -> LoadNeed<'a> {
    let loads: Vec<&ModelMem<'a>> = models
        .iter()
        .filter(|m| !m.loaded && (asked.iter().any(|a| a == m.name) || (starting && m.at_start)))
        .collect();
    LoadNeed {
        models: loads.iter().map(|m| m.name).collect(),
        bytes: loads.iter().map(|m| m.ram).sum(),
        gpu_bytes: loads.iter().map(|m| m.gpu).sum(),
        headroom,
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

    fn model(name: &'static str, ram_mib: u64, at_start: bool, loaded: bool) -> ModelMem<'static> {
        ModelMem { name, ram: ram_mib * MIB, gpu: ram_mib * MIB / 2, at_start, loaded }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// (models, asked, starting) -> (models loaded, MiB).
    type Row<'a> = (&'a [ModelMem<'a>], &'a [&'a str], bool, &'a [&'a str], u64);

    #[test]
    fn a_request_brings_in_what_it_starts_and_headroom_once() {
        let big = model("big", 1000, true, false);
        let small = model("small", 300, true, false);
        let lazy = model("lazy", 200, false, false);
        let ready = |m: ModelMem<'static>| ModelMem { loaded: true, ..m };
        // Headroom is always 100 MiB, once.
        let table: [Row<'_>; 8] = [
            (&[big, small, lazy], &["big"], true, &["big", "small"], 1300),
            (&[big, small, lazy], &["lazy"], true, &["big", "small", "lazy"], 1500),
            (&[big, small, lazy], &["big", "small", "lazy"], true, &["big", "small", "lazy"], 1500),
            (&[big, small, lazy], &["big"], false, &["big"], 1000),
            (&[ready(big), small, lazy], &["big"], false, &[], 0),
            (&[ready(big), small, lazy], &["big", "lazy"], false, &["lazy"], 200),
            // Already admitted and loading: counted by that request, not again.
            (&[ready(big), ready(small), lazy], &["small"], true, &[], 0),
            (&[big], &["unknown"], false, &[], 0),
        ];
        for (models, asked, starting, want, want_mib) in table {
            let got = load_need(models, &names(asked), starting, 100 * MIB);
            assert_eq!(got.models, want, "{asked:?} starting={starting} on {models:?}");
            assert_eq!((got.bytes / MIB, got.headroom / MIB), (want_mib, 100), "{asked:?} starting={starting}");
            assert_eq!(got.gpu_bytes / MIB, want_mib / 2, "GPU need of {asked:?} starting={starting}");
        }
    }

    /// (nllb ready, aya ready, asked, starting) -> (models loaded, MiB).
    type DemoRow = (bool, bool, &'static [&'static str], bool, &'static [&'static str], u64);

    #[test]
    fn on_the_demo_config() {
        // proctor/src/demo.rs `agent_toml`: translation serves nllb and aya, both at_start.
        let demo = |nllb_ready: bool, aya_ready: bool| {
            [model("nllb", 256, true, nllb_ready), model("aya", 384, true, aya_ready)]
        };
        let gib = 1024 * MIB;
        let table: [DemoRow; 5] = [
            (false, false, &["nllb"], true, &["nllb", "aya"], 640),
            (false, false, &["aya"], true, &["nllb", "aya"], 640),
            (true, true, &["nllb"], false, &[], 0),
            (false, true, &["nllb"], false, &["nllb"], 256),
            (true, false, &["nllb", "aya"], false, &["aya"], 384),
        ];
        for (nllb, aya, asked, starting, want, want_mib) in table {
            let got = load_need(&demo(nllb, aya), &names(asked), starting, gib);
            let want =
                LoadNeed { models: want.to_vec(), bytes: want_mib * MIB, gpu_bytes: want_mib * MIB / 2, headroom: gib };
            assert_eq!(got, want, "{asked:?}");
        }
    }
}
