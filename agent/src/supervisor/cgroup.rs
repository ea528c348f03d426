//! A control group per service, so the whole tree — including a grandchild
//! that called `setsid` or double-forked — is counted, limited, killed and
//! explained together. cgroup v2 when its `memory` controller is enabled,
//! else v1 `memory` + `freezer`, created under the agent's own cgroups.
//!
//! Paths are `…/proctor-<agent id>/<service>`, where the agent id is derived
//! from the agent's data folder: stable across agent restarts (so a restarted
//! agent finds its services again) and distinct between agents on one host.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

const ROOT: &str = "/sys/fs/cgroup";
/// Set to make a host without usable cgroups an error instead of a fallback.
pub const REQUIRE_ENV: &str = "PROCTOR_REQUIRE_CGROUP";

/// One service's cgroup(s).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceCgroup {
    V2 { dir: PathBuf },
    V1 { memory: PathBuf, freezer: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy: {0}")]
    Unavailable(String),
    #[error("cannot set up cgroup {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io { path: path.to_owned(), source }
}

/// This process's path in one hierarchy: `memory`, `freezer`, or `""` for v2.
fn own_path(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if controller.is_empty() {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        hit.then(|| path.to_owned())
    })
}

fn v2_has_memory() -> bool {
    std::fs::read_to_string(Path::new(ROOT).join("cgroup.controllers"))
        .map(|c| c.split_whitespace().any(|x| x == "memory"))
        .unwrap_or(false)
}

/// A short, stable id for this agent: a hash of its data folder.
pub fn agent_id(data_dir: &Path) -> String {
    // FNV-1a: stable across builds and runs, unlike std's RandomState.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data_dir.to_string_lossy().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

impl ServiceCgroup {
    /// Where this service's cgroup lives (whether or not it exists yet).
    pub fn locate(agent_id: &str, service: &str) -> Result<ServiceCgroup, CgroupError> {
        let leaf = format!("proctor-{agent_id}/{service}");
        if v2_has_memory() {
            let own = own_path("").ok_or_else(|| CgroupError::Unavailable("not in a cgroup v2 hierarchy".into()))?;
            return Ok(ServiceCgroup::V2 { dir: Path::new(ROOT).join(own.trim_start_matches('/')).join(leaf) });
        }
        let memory =
            own_path("memory").ok_or_else(|| CgroupError::Unavailable("no v1 memory controller mounted".into()))?;
        let freezer =
            own_path("freezer").ok_or_else(|| CgroupError::Unavailable("no v1 freezer controller mounted".into()))?;
        Ok(ServiceCgroup::V1 {
            memory: Path::new(ROOT).join("memory").join(memory.trim_start_matches('/')).join(&leaf),
            freezer: Path::new(ROOT).join("freezer").join(freezer.trim_start_matches('/')).join(&leaf),
        })
    }

    /// Creates the cgroup (if needed) with an optional memory limit.
    pub fn create(&self, memory_limit: Option<u64>) -> Result<(), CgroupError> {
        match self {
            ServiceCgroup::V2 { dir } => {
                let parent = dir.parent().expect("service cgroup has a parent");
                std::fs::create_dir_all(parent).map_err(io(parent))?;
                // Children of `parent` need the memory controller delegated.
                let control = parent.join("cgroup.subtree_control");
                let _ = std::fs::write(&control, "+memory");
                std::fs::create_dir_all(dir).map_err(io(dir))?;
                if let Some(limit) = memory_limit {
                    let f = dir.join("memory.max");
                    std::fs::write(&f, limit.to_string()).map_err(io(&f))?;
                }
            }
            ServiceCgroup::V1 { memory, freezer } => {
                std::fs::create_dir_all(memory).map_err(io(memory))?;
                std::fs::create_dir_all(freezer).map_err(io(freezer))?;
                let f = memory.join("memory.limit_in_bytes");
                let limit = memory_limit.map_or("-1".to_owned(), |l| l.to_string());
                std::fs::write(&f, &limit).map_err(io(&f))?;
                // Without a swap limit a capped service would swap, not be OOM-killed.
                let swap = memory.join("memory.memsw.limit_in_bytes");
                if swap.exists() {
                    let _ = std::fs::write(&swap, &limit);
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a new process must be written into.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        match self {
            ServiceCgroup::V2 { dir } => vec![dir.join("cgroup.procs")],
            ServiceCgroup::V1 { memory, freezer } => vec![memory.join("cgroup.procs"), freezer.join("cgroup.procs")],
        }
    }

    fn procs_file(&self) -> PathBuf {
        match self {
            ServiceCgroup::V2 { dir } => dir.join("cgroup.procs"),
            ServiceCgroup::V1 { freezer, .. } => freezer.join("cgroup.procs"),
        }
    }

    /// Every process in the cgroup now.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .procs_files()
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .flat_map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<u32>>())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Memory charged to the cgroup now (v2 `memory.current`, v1
    /// `memory.usage_in_bytes`: page cache included), if readable.
    pub fn memory_bytes(&self) -> Option<u64> {
        let file = match self {
            ServiceCgroup::V2 { dir } => dir.join("memory.current"),
            ServiceCgroup::V1 { memory, .. } => memory.join("memory.usage_in_bytes"),
        };
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// How many processes the kernel's OOM killer has killed in it so far.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = match self {
            ServiceCgroup::V2 { dir } => (dir.join("memory.events"), "oom_kill"),
            ServiceCgroup::V1 { memory, .. } => (memory.join("memory.oom_control"), "oom_kill"),
        };
        std::fs::read_to_string(file)
            .ok()
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse::<u64>().ok())))
            .unwrap_or(0)
    }

    /// Kills every process in the cgroup, however it detached, and waits
    /// (bounded) until it is empty. Freezing first means nothing can fork
    /// between reading the list and killing it.
    pub async fn kill_all(&self, deadline: Duration) -> bool {
        let until = Instant::now() + deadline;
        if let ServiceCgroup::V2 { dir } = self
            && std::fs::write(dir.join("cgroup.kill"), "1").is_ok()
        {
            return self.wait_empty(until).await;
        }
        let freeze = |on: bool| match self {
            ServiceCgroup::V2 { dir } => std::fs::write(dir.join("cgroup.freeze"), if on { "1" } else { "0" }),
            ServiceCgroup::V1 { freezer, .. } => {
                std::fs::write(freezer.join("freezer.state"), if on { "FROZEN" } else { "THAWED" })
            }
        };
        let _ = freeze(true);
        self.wait_frozen(Instant::now() + Duration::from_millis(500)).await;
        for pid in self.pids() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        // Killed processes only die once thawed.
        let _ = freeze(false);
        self.wait_empty(until).await
    }

    async fn wait_frozen(&self, until: Instant) {
        let ServiceCgroup::V1 { freezer, .. } = self else { return };
        while Instant::now() < until {
            if std::fs::read_to_string(freezer.join("freezer.state")).is_ok_and(|s| s.trim() == "FROZEN") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn wait_empty(&self, until: Instant) -> bool {
        loop {
            if std::fs::read_to_string(self.procs_file()).map_or(true, |t| t.trim().is_empty()) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Removes the (empty) cgroup directories.
    pub fn remove(&self) {
        let dirs: Vec<&PathBuf> = match self {
            ServiceCgroup::V2 { dir } => vec![dir],
            ServiceCgroup::V1 { memory, freezer } => vec![memory, freezer],
        };
        for d in dirs {
            let _ = std::fs::remove_dir(d);
            if let Some(parent) = d.parent() {
                // The agent's folder goes too once its last service's has.
                let _ = std::fs::remove_dir(parent);
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            ServiceCgroup::V2 { dir } => format!("v2 {}", dir.display()),
            ServiceCgroup::V1 { memory, .. } => format!("v1 {} (+ freezer)", memory.display()),
        }
    }
}

/// Checks that cgroups can be used here, by creating and removing one.
pub fn probe(agent_id: &str) -> Result<(), CgroupError> {
    let cg = ServiceCgroup::locate(agent_id, "probe")?;
    cg.create(None)?;
    // A cgroup without the memory controller would limit nothing and count
    // no OOM kill: say so now rather than misreport later.
    let accounted = match &cg {
        ServiceCgroup::V2 { dir } => dir.join("memory.current").exists(),
        ServiceCgroup::V1 { memory, .. } => memory.join("memory.usage_in_bytes").exists(),
    };
    let parent = cg.procs_file().parent().and_then(Path::parent).map(Path::to_owned).unwrap_or_default();
    cg.remove();
    if !accounted {
        return Err(CgroupError::Unavailable(format!(
            "the memory controller is not enabled for cgroups below {}: the agent needs a cgroup subtree it may \
             enable memory in (under systemd: Delegate=yes; see docs/install.md)",
            parent.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_are_stable_and_distinct() {
        let a = agent_id(Path::new("/var/lib/proctor"));
        assert_eq!(a, agent_id(Path::new("/var/lib/proctor")));
        assert_ne!(a, agent_id(Path::new("/tmp/other")));
        assert_eq!(a.len(), 12);
    }
}
