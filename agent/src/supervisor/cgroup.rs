//! A control group per service, so the whole tree — including a grandchild
//! that called `setsid` or double-forked — is counted, limited, killed and
//! explained together. cgroup v2 when its `memory` controller is enabled,
//! else v1 `memory` + `freezer`, created under the agent's own cgroups. On
//! v2 the agent first moves itself into a leaf of the subtree delegated to it
//! (`V2Tree`), since only a cgroup without processes may hand controllers down.
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

/// The leaf the agent moves itself into on cgroup v2 (what systemd ≥ 254
/// does itself with `DelegateSubgroup=proctor-agent`).
pub const AGENT_LEAF: &str = "proctor-agent";

/// The cgroup v2 folder delegated to an agent whose own cgroup is `own`: that
/// cgroup, or its parent when the agent already sits in its leaf (after a
/// restart, or placed there by systemd).
fn delegated_root(own: &str) -> &str {
    match own.rsplit_once('/') {
        Some((parent, leaf)) if leaf == AGENT_LEAF => {
            if parent.is_empty() {
                "/"
            } else {
                parent
            }
        }
        _ => own,
    }
}

/// The cgroup v2 subtree delegated to the agent (systemd `Delegate=yes`):
/// the agent lives in its leaf, services below `proctor-<agent id>/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V2Tree {
    root: PathBuf,
}

impl V2Tree {
    /// The tree of a process whose v2 path is `own`, in the hierarchy mounted at `mount`.
    pub fn for_process(mount: &Path, own: &str) -> V2Tree {
        V2Tree { root: mount.join(delegated_root(own).trim_start_matches('/')) }
    }

    /// Moves process `pid` (the agent) into its leaf, then hands every
    /// controller the tree has down to the folders below: cgroup v2 lets
    /// only a cgroup without processes of its own do that.
    pub fn take(&self, pid: u32) -> Result<(), CgroupError> {
        let leaf = self.root.join(AGENT_LEAF);
        std::fs::create_dir_all(&leaf).map_err(io(&leaf))?;
        let procs = leaf.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string()).map_err(io(&procs))?;
        hand_down(&self.root).map_err(|e| match e {
            CgroupError::Io { path, source } if source.raw_os_error() == Some(nix::libc::EBUSY) => {
                CgroupError::Unavailable(format!(
                    "{} still holds other processes, so it cannot hand controllers down to service cgroups: run \
                     the agent in a cgroup of its own (under systemd: the unit in deploy/, with Delegate=yes)",
                    path.parent().unwrap_or(&path).display()
                ))
            }
            other => other,
        })
    }

    /// Where a service's cgroup lives in this tree.
    pub fn service(&self, agent_id: &str, service: &str) -> ServiceCgroup {
        ServiceCgroup::V2 { dir: self.root.join(format!("proctor-{agent_id}")).join(service) }
    }
}

/// Enables, for the children of `dir`, every controller `dir` has — one by
/// one, so one the kernel refuses (e.g. `cpu` beside a realtime process)
/// does not cost the others; an error only when none could be enabled.
fn hand_down(dir: &Path) -> Result<(), CgroupError> {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).map_err(io(dir))?;
    let control = dir.join("cgroup.subtree_control");
    let mut first_error = None;
    let mut enabled = 0;
    for controller in available.split_whitespace() {
        match std::fs::write(&control, format!("+{controller}")) {
            Ok(()) => enabled += 1,
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    match first_error {
        Some(source) if enabled == 0 => Err(CgroupError::Io { path: control, source }),
        _ => Ok(()),
    }
}

/// The agent's own v2 tree, if it is in a v2 hierarchy.
fn own_tree() -> Result<V2Tree, CgroupError> {
    let own = own_path("").ok_or_else(|| CgroupError::Unavailable("not in a cgroup v2 hierarchy".into()))?;
    Ok(V2Tree::for_process(Path::new(ROOT), &own))
}

impl ServiceCgroup {
    /// Where this service's cgroup lives (whether or not it exists yet).
    pub fn locate(agent_id: &str, service: &str) -> Result<ServiceCgroup, CgroupError> {
        if v2_has_memory() {
            return Ok(own_tree()?.service(agent_id, service));
        }
        let leaf = format!("proctor-{agent_id}/{service}");
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
                // The service's cgroup gets every controller the agent has.
                hand_down(parent)?;
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
    if v2_has_memory() {
        own_tree()?.take(std::process::id())?;
    }
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

    /// A cgroup2 mount to test on: the host's, or one mounted for the test
    /// (a cgroup v1 host still has the v2 hierarchy, without controllers).
    fn cgroup2_mount() -> PathBuf {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        if let Some(at) = mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        }) {
            return at;
        }
        let at = PathBuf::from("/run/proctor-test-cgroup2");
        std::fs::create_dir_all(&at).unwrap();
        let status = std::process::Command::new("mount").args(["-t", "cgroup2", "none"]).arg(&at).status().unwrap();
        assert!(status.success(), "mounting cgroup2 at {} failed (tests run as root)", at.display());
        at
    }

    /// A fresh cgroup below the v2 root standing for a systemd unit, and the
    /// controller it was given: (mount, unit folder, controller). Only the
    /// root may hold processes and hand controllers down, so it gives its
    /// children one (a v1 host's v2 root hands nothing down by itself).
    fn unit_cgroup(name: &str) -> (PathBuf, PathBuf, String) {
        let mount = cgroup2_mount();
        let root_has = std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap();
        let first = root_has.split_whitespace().next().expect("the v2 hierarchy has a controller").to_owned();
        std::fs::write(mount.join("cgroup.subtree_control"), format!("+{first}")).unwrap();
        let unit = mount.join(format!("proctor-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&unit).unwrap();
        (mount, unit, first)
    }

    fn v2_path_of(pid: u32) -> String {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        text.lines().find_map(|l| l.strip_prefix("0::")).unwrap().to_owned()
    }

    /// What systemd's `Delegate=yes` hands over: a unit cgroup that holds the
    /// agent. cgroup v2 forbids a cgroup that holds processes to enable
    /// controllers for its children, so the agent must first move itself
    /// into a leaf of its own.
    #[test]
    fn a_delegated_v2_unit_gets_the_agent_into_a_leaf_and_its_controllers_handed_down() {
        let (mount, unit, first) = unit_cgroup("unit");
        let mut agent = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        std::fs::write(unit.join("cgroup.procs"), agent.id().to_string()).unwrap();
        let refused = std::fs::write(unit.join("cgroup.subtree_control"), format!("+{first}"));
        assert!(refused.is_err(), "the kernel lets a cgroup with processes hand {first} down");

        let own = v2_path_of(agent.id());
        let tree = V2Tree::for_process(&mount, &own);
        tree.take(agent.id()).unwrap();
        assert_eq!(v2_path_of(agent.id()), format!("{own}/{AGENT_LEAF}"));
        let handed = std::fs::read_to_string(unit.join("cgroup.subtree_control")).unwrap();
        assert!(handed.split_whitespace().any(|c| c == first), "{first} not handed down: {handed:?}");
        // A restarted agent finds itself in the leaf and the same tree.
        assert_eq!(V2Tree::for_process(&mount, &v2_path_of(agent.id())), tree);

        let service = tree.service("0123456789ab", "svc");
        service.create(None).unwrap();
        let ServiceCgroup::V2 { dir } = &service else { panic!("not a v2 cgroup: {service:?}") };
        assert!(dir.starts_with(&unit) && dir.ends_with("proctor-0123456789ab/svc"), "{}", dir.display());
        let svc_controllers = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap();
        assert!(svc_controllers.split_whitespace().any(|c| c == first), "service lacks {first}: {svc_controllers:?}");
        let mut worker = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        std::fs::write(dir.join("cgroup.procs"), worker.id().to_string()).unwrap();
        assert_eq!(service.pids(), vec![worker.id()]);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        assert!(runtime.block_on(service.kill_all(Duration::from_secs(5))));
        assert!(worker.wait().unwrap().code().is_none(), "the worker was not killed");
        service.remove();

        agent.kill().unwrap();
        agent.wait().unwrap();
        let _ = std::fs::remove_dir(unit.join(AGENT_LEAF));
        let _ = std::fs::remove_dir(&unit);
    }

    /// An agent started from a shell shares its cgroup with the shell: it
    /// cannot free it, and says what to do instead.
    #[test]
    fn a_v2_cgroup_shared_with_other_processes_is_refused_with_the_fix() {
        let (mount, unit, _) = unit_cgroup("shared");
        let mut shell = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let mut agent = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        for pid in [shell.id(), agent.id()] {
            std::fs::write(unit.join("cgroup.procs"), pid.to_string()).unwrap();
        }
        let tree = V2Tree::for_process(&mount, &v2_path_of(agent.id()));
        let error = tree.take(agent.id()).unwrap_err().to_string();
        assert!(error.contains("still holds other processes") && error.contains("Delegate=yes"), "{error}");
        assert!(error.contains(&unit.display().to_string()), "{error}");
        for p in [&mut shell, &mut agent] {
            p.kill().unwrap();
            p.wait().unwrap();
        }
        let _ = std::fs::remove_dir(unit.join(AGENT_LEAF));
        let _ = std::fs::remove_dir(&unit);
    }

    #[test]
    fn the_delegated_folder_is_the_agents_own_unless_it_already_sits_in_its_leaf() {
        for (own, root) in [
            ("/system.slice/proctor-agent.service", "/system.slice/proctor-agent.service"),
            ("/system.slice/proctor-agent.service/proctor-agent", "/system.slice/proctor-agent.service"),
            ("/", "/"),
            ("/proctor-agent", "/"),
            ("/user.slice/proctor-agent-x", "/user.slice/proctor-agent-x"),
        ] {
            assert_eq!(delegated_root(own), root, "own cgroup {own}");
        }
    }

    #[test]
    fn agent_ids_are_stable_and_distinct() {
        let a = agent_id(Path::new("/var/lib/proctor"));
        assert_eq!(a, agent_id(Path::new("/var/lib/proctor")));
        assert_ne!(a, agent_id(Path::new("/tmp/other")));
        assert_eq!(a.len(), 12);
    }
}
