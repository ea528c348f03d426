//! Memory pressure: host memory or a GPU's free memory below a threshold
//! while a model loads — the moment a load is about to be OOM-killed or to
//! fail with "CUDA out of memory", told before it happens, with the largest
//! consumers named. `Pressure` is the pure decider (said once per episode,
//! said again only after memory recovered past the threshold plus 10 %);
//! `consumers` reads who holds the memory.

use std::collections::{BTreeMap, BTreeSet};

/// Which memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Host,
    Gpu(u32),
}

/// One resource as sampled: (what is left, of how much), bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Level {
    pub resource: Resource,
    pub available: u64,
    pub total: u64,
}

/// Thresholds in bytes; 0 = never.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Thresholds {
    pub host: u64,
    pub gpu: u64,
}

impl Thresholds {
    fn of(&self, r: Resource) -> u64 {
        match r {
            Resource::Host => self.host,
            Resource::Gpu(_) => self.gpu,
        }
    }
}

/// Which resources were already announced in their current episode.
#[derive(Debug, Default)]
pub struct Pressure {
    announced: BTreeSet<Resource>,
}

impl Pressure {
    /// The levels to announce now: below their threshold while a model
    /// loads, not yet announced since they last recovered.
    pub fn judge(&mut self, levels: &[Level], thresholds: Thresholds, loading: bool) -> Vec<Level> {
        let mut announce = Vec::new();
        for level in levels {
            let threshold = thresholds.of(level.resource);
            if threshold == 0 || level.available >= threshold + threshold / 10 {
                self.announced.remove(&level.resource);
            } else if level.available < threshold && loading && self.announced.insert(level.resource) {
                announce.push(*level);
            }
        }
        announce
    }

    /// Whether any level would be announced if a model were loading: lets
    /// the caller skip asking what loads (a journal round trip) otherwise.
    pub fn could_announce(&self, levels: &[Level], thresholds: Thresholds) -> bool {
        levels.iter().any(|l| l.available < thresholds.of(l.resource) && !self.announced.contains(&l.resource))
    }
}

/// The `n` largest consumers of `level`'s memory, largest first: for the
/// host, processes by RSS from `/proc`; for a GPU, its processes as NVML
/// lists them. Each named by the service it belongs to (`owner`).
pub fn consumers(
    level: &Level,
    gpu_processes: &BTreeMap<u32, Vec<(u32, u64)>>,
    owner: &BTreeMap<u32, String>,
    n: usize,
) -> Vec<proto::MemoryConsumer> {
    let mut found: Vec<(u32, String, u64)> = match level.resource {
        Resource::Host => host_processes(),
        Resource::Gpu(i) => gpu_processes.get(&i).into_iter().flatten().map(|(p, b)| (*p, String::new(), *b)).collect(),
    };
    found.sort_by_key(|(pid, _, bytes)| (std::cmp::Reverse(*bytes), *pid));
    found
        .into_iter()
        .take(n)
        .map(|(pid, name, bytes)| proto::MemoryConsumer {
            pid,
            name,
            service: owner.get(&pid).cloned().unwrap_or_default(),
            bytes,
        })
        .collect()
}

/// (pid, name, RSS) of every process.
pub(crate) fn host_processes() -> Vec<(u32, String, u64)> {
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
        let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_owned());
        let rss_kb = field("VmRSS:").and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok()).unwrap_or(0);
        procs.push((pid, field("Name:").unwrap_or_default(), rss_kb * 1024));
    }
    procs
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn host(available_mib: u64) -> Level {
        Level { resource: Resource::Host, available: available_mib * MIB, total: 64_000 * MIB }
    }

    fn gpu(index: u32, available_mib: u64) -> Level {
        Level { resource: Resource::Gpu(index), available: available_mib * MIB, total: 81_920 * MIB }
    }

    #[test]
    fn pressure_is_said_once_per_episode_and_only_while_a_model_loads() {
        let thresholds = Thresholds { host: 1000 * MIB, gpu: 2000 * MIB };
        // One tick after another: (levels, a model loads) -> announced resources.
        let ticks: [(&[Level], bool, &[Resource]); 9] = [
            (&[host(5000), gpu(0, 9000)], true, &[]),
            (&[host(900), gpu(0, 9000)], false, &[]),
            (&[host(900), gpu(0, 1500)], true, &[Resource::Host, Resource::Gpu(0)]),
            (&[host(800), gpu(0, 1000)], true, &[]),
            // Back above the threshold but not past its 10 %: still the same episode.
            (&[host(1050), gpu(0, 1000)], true, &[]),
            (&[host(950), gpu(0, 1000)], true, &[]),
            (&[host(1100), gpu(0, 2200)], true, &[]),
            (&[host(999), gpu(0, 2200), gpu(1, 100)], true, &[Resource::Host, Resource::Gpu(1)]),
            (&[host(10), gpu(1, 10)], true, &[]),
        ];
        let mut pressure = Pressure::default();
        for (i, (levels, loading, want)) in ticks.iter().enumerate() {
            let could = pressure.could_announce(levels, thresholds);
            let got: Vec<Resource> = pressure.judge(levels, thresholds, *loading).iter().map(|l| l.resource).collect();
            assert_eq!(got, *want, "tick {i}");
            assert!(could || got.is_empty(), "tick {i}: announced what could_announce ruled out");
        }
        // A threshold of 0 never fires.
        let off = Thresholds::default();
        assert!(Pressure::default().judge(&[host(0), gpu(0, 0)], off, true).is_empty());
    }

    #[test]
    fn gpu_consumers_are_that_devices_processes_largest_first_named_by_service() {
        let processes = BTreeMap::from([(0, vec![(10, 500), (11, 9000), (12, 700)]), (1, vec![(99, 1 << 40)])]);
        let owner = BTreeMap::from([(11, "translation".to_owned())]);
        let got = consumers(&gpu(0, 0), &processes, &owner, 2);
        let got: Vec<(u32, &str, u64)> = got.iter().map(|c| (c.pid, c.service.as_str(), c.bytes)).collect();
        assert_eq!(got, [(11, "translation", 9000), (12, "", 700)]);
    }
}
