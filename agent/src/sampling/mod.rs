//! Resource sampling, one file per source: host RAM, each service's whole
//! process tree (`tree`: RSS, CPU time, I/O bytes) and the GPUs (`gpu`:
//! NVML; a service's GPU memory is what its tree and its cgroup use), at a
//! fixed interval (1 Hz by default). Published to the journal as
//! `Telemetry`, and to the supervisors through a watch channel: for failure
//! messages, and as the progress signals that tell a slow load from a
//! stalled one.

pub mod gpu;
pub mod pressure;
mod tree;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::journal::Journal;

/// Latest memory figures of one service's process tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeMemory {
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    pub processes: u32,
    /// User + system CPU time of the tree's live processes, in milliseconds.
    pub cpu_ms: u64,
    /// Bytes read and written by the tree's live processes (`rchar + wchar`:
    /// files, pipes and sockets alike, so a network download counts).
    pub io_bytes: u64,
    /// GPU memory of the service's processes (tree and cgroup), all devices.
    pub gpu_bytes: u64,
    pub peak_gpu_bytes: u64,
    /// Memory charged to the service's cgroup (0 without one).
    pub cgroup_bytes: u64,
}

/// Where a service's processes are: the root it was started as, and its
/// cgroup when it has one (a worker that left the tree is still in it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRoot {
    pub pid: u32,
    pub cgroup: Option<crate::supervisor::cgroup::ServiceCgroup>,
}

/// Service name → where its processes are, kept current by the supervisors.
pub type Roots = watch::Receiver<BTreeMap<String, ServiceRoot>>;
pub type Samples = watch::Sender<BTreeMap<String, TreeMemory>>;
/// Each GPU's memory as last sampled, for admission.
pub type GpuRooms = watch::Sender<Vec<proto::admission::GpuRoom>>;

/// How the sampler samples.
#[derive(Debug)]
pub struct Settings {
    pub interval: Duration,
    /// NVML, if found.
    pub gpus: Option<gpu::Gpus>,
    /// When to tell of memory pressure.
    pub pressure: pressure::Thresholds,
    /// Whose standing each telemetry event carries.
    pub admission: crate::admission::Admission,
}

/// Runs until cancelled.
pub async fn run(
    journal: Journal,
    roots: Roots,
    (samples, rooms): (Samples, GpuRooms),
    Settings { interval, gpus, pressure: thresholds, admission }: Settings,
    cancel: CancellationToken,
) {
    let Ok(mut system) = System::new() else {
        tracing::warn!("memory sampling disabled: this system cannot be inspected");
        return;
    };
    let mut peaks: BTreeMap<String, (u32, u64, u64)> = BTreeMap::new();
    let mut pressure = pressure::Pressure::default();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let roots_now = roots.borrow().clone();
        let devices = gpus.as_ref().map(gpu::Gpus::sample).unwrap_or_default();
        let (mut telemetry, current, owner) = sample(&mut system, &roots_now, &devices, &mut peaks);
        samples.send_replace(current);
        rooms.send_replace(devices.iter().map(gpu::Device::room).collect());
        telemetry.standing = Some(admission.standing().await.to_proto());
        let levels = levels(&telemetry);
        journal.append(proto::event::Kind::Telemetry(telemetry));
        if pressure.could_announce(&levels, thresholds) {
            let loading = loading(&journal).await;
            let processes = devices.iter().map(|d| (d.index, d.processes.clone())).collect();
            for level in pressure.judge(&levels, thresholds, !loading.is_empty()) {
                let told = told(&level, thresholds, &loading, pressure::consumers(&level, &processes, &owner, 3));
                tracing::warn!(?level, "memory pressure while a model loads");
                journal.append(proto::event::Kind::MemoryPressure(told));
            }
        }
    }
}

/// Host memory and each GPU's free memory, as pressure judges them.
fn levels(t: &proto::Telemetry) -> Vec<pressure::Level> {
    let host = t.host.iter().map(|h| pressure::Level {
        resource: pressure::Resource::Host,
        available: h.available_bytes,
        total: h.total_bytes,
    });
    let gpus = t.gpus.iter().map(|g| pressure::Level {
        resource: pressure::Resource::Gpu(g.index),
        available: g.memory_total_bytes.saturating_sub(g.memory_used_bytes),
        total: g.memory_total_bytes,
    });
    host.chain(gpus).collect()
}

/// The models loading now, as "service/model".
async fn loading(journal: &Journal) -> Vec<String> {
    let Ok(snapshot) = journal.snapshot().await else { return Vec::new() };
    snapshot
        .services
        .iter()
        .flat_map(|s| s.models.iter().map(move |m| (s, m)))
        .filter(|(_, m)| proto::Stage::try_from(m.stage).is_ok_and(|st| proto::Stage::LOADING.contains(&st)))
        .map(|(s, m)| format!("{}/{}", s.name, m.name))
        .collect()
}

/// The event telling of one level under its threshold.
fn told(
    level: &pressure::Level,
    thresholds: pressure::Thresholds,
    loading: &[String],
    consumers: Vec<proto::MemoryConsumer>,
) -> proto::MemoryPressure {
    let (resource, gpu_index, threshold) = match level.resource {
        pressure::Resource::Host => ("host", 0, thresholds.host),
        pressure::Resource::Gpu(i) => ("gpu", i, thresholds.gpu),
    };
    proto::MemoryPressure {
        resource: resource.into(),
        gpu_index,
        available_bytes: level.available,
        total_bytes: level.total,
        threshold_bytes: threshold,
        loading: loading.to_vec(),
        consumers,
    }
}

/// One round: host memory, then each service's tree (and cgroup) and GPU
/// use; also which service each process seen belongs to.
fn sample(
    system: &mut System,
    roots: &BTreeMap<String, ServiceRoot>,
    devices: &[gpu::Device],
    peaks: &mut BTreeMap<String, (u32, u64, u64)>,
) -> (proto::Telemetry, BTreeMap<String, TreeMemory>, BTreeMap<u32, String>) {
    system.refresh_memory();
    // Walk down from each root where the kernel allows; else scan once.
    let walk = tree::children_listed();
    let procs = processes(system, !walk && !roots.is_empty());
    let mut telemetry = proto::Telemetry {
        host: Some(proto::HostMemory {
            total_bytes: system.total_memory(),
            available_bytes: system.available_memory(),
        }),
        services: Vec::new(),
        gpus: Vec::new(),
        standing: None,
    };
    let mut current = BTreeMap::new();
    let mut owner: BTreeMap<u32, String> = BTreeMap::new();
    for (service, root) in roots {
        let members: Vec<(u32, u64)> = if walk {
            tree::descendants(root.pid).into_iter().map(|p| (p, tree::rss_bytes(p))).collect()
        } else {
            tree::tree(&procs, root.pid).into_iter().map(|i| (procs[i].0, procs[i].2)).collect()
        };
        let rss: u64 = members.iter().map(|m| m.1).sum();
        let processes = members.len() as u32;
        let cpu = members.iter().map(|m| tree::cpu_ms(m.0)).sum();
        let io = members.iter().map(|m| tree::io_bytes(m.0)).sum();
        let mut pids: HashSet<u32> = members.iter().map(|m| m.0).collect();
        pids.extend(root.cgroup.as_ref().map(|cg| cg.pids()).unwrap_or_default());
        let gpu_bytes = gpu::attribute(devices, &pids);
        let cgroup_bytes = root.cgroup.as_ref().and_then(|cg| cg.memory_bytes()).unwrap_or(0);
        owner.extend(pids.iter().map(|p| (*p, service.clone())));
        let peak = peaks.entry(service.clone()).or_insert((root.pid, 0, 0));
        if peak.0 != root.pid {
            *peak = (root.pid, 0, 0);
        }
        peak.1 = peak.1.max(rss);
        peak.2 = peak.2.max(gpu_bytes);
        let memory = TreeMemory {
            rss_bytes: rss,
            peak_rss_bytes: peak.1,
            processes,
            cpu_ms: cpu,
            io_bytes: io,
            gpu_bytes,
            peak_gpu_bytes: peak.2,
            cgroup_bytes,
        };
        current.insert(service.clone(), memory);
        telemetry.services.push(proto::ServiceMemory {
            service: service.clone(),
            rss_bytes: rss,
            processes,
            gpu_bytes,
            cgroup_bytes,
        });
    }
    telemetry.gpus = devices.iter().map(|d| d.to_proto(|pid| owner.get(&pid).cloned())).collect();
    (telemetry, current, owner)
}

/// (pid, parent, RSS) of every process, threads left out; nothing when no
/// service runs (a full scan of `/proc` then is wasted work).
fn processes(system: &mut System, needed: bool) -> Vec<(u32, Option<u32>, u64)> {
    if !needed {
        return Vec::new();
    }
    system.refresh_processes_specifics(ProcessesToUpdate::All, true, ProcessRefreshKind::nothing().with_memory());
    system
        .processes()
        .values()
        // sysinfo lists threads as processes on Linux: skip them, or their
        // (shared) memory would be counted again.
        .filter(|p| p.thread_kind().is_none())
        .map(|p| (p.pid().as_u32(), p.parent().map(Pid::as_u32), p.memory()))
        .collect()
}
