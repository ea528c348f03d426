//! Resource sampling: host RAM and, for each service's whole process tree,
//! RSS, CPU time and I/O bytes, at a fixed interval (1 Hz by default).
//! Published to the journal as `Telemetry`, and to the supervisors through a
//! watch channel: for failure messages, and as the progress signals that tell
//! a slow load from a stalled one.

use std::collections::{BTreeMap, HashMap};
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
}

/// Service name → root PID, kept current by the supervisors.
pub type Roots = watch::Receiver<BTreeMap<String, u32>>;
pub type Samples = watch::Sender<BTreeMap<String, TreeMemory>>;

/// Indices into `procs` of `root` and all its descendants.
fn tree(procs: &[(u32, Option<u32>, u64)], root: u32) -> Vec<usize> {
    let mut children: HashMap<u32, Vec<usize>> = HashMap::new();
    let mut root_index = None;
    for (i, (pid, parent, _)) in procs.iter().enumerate() {
        if *pid == root {
            root_index = Some(i);
        }
        if let Some(p) = parent {
            children.entry(*p).or_default().push(i);
        }
    }
    let Some(start) = root_index else { return Vec::new() };
    let (mut members, mut stack) = (Vec::new(), vec![start]);
    while let Some(i) = stack.pop() {
        members.push(i);
        if let Some(kids) = children.get(&procs[i].0) {
            stack.extend(kids.iter().copied());
        }
    }
    members
}

/// Clock ticks per second in `/proc/<pid>/stat` (USER_HZ): 100 on every
/// mainstream Linux architecture.
const USER_HZ: u64 = 100;

/// CPU milliseconds (utime + stime) of one process, from `/proc/<pid>/stat`.
pub fn cpu_ms(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // The command name may contain spaces; fields after it start at ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after ')'.
    (ticks(11) + ticks(12)) * 1000 / USER_HZ
}

/// `rchar + wchar` of one process, from `/proc/<pid>/io` (0 if unreadable).
pub fn io_bytes(pid: u32) -> u64 {
    let Ok(io) = std::fs::read_to_string(format!("/proc/{pid}/io")) else { return 0 };
    io.lines()
        .filter_map(|l| l.strip_prefix("rchar:").or_else(|| l.strip_prefix("wchar:")))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

/// Runs until cancelled.
pub async fn run(journal: Journal, roots: Roots, samples: Samples, interval: Duration, cancel: CancellationToken) {
    let Ok(mut system) = System::new() else {
        tracing::warn!("memory sampling disabled: this system cannot be inspected");
        return;
    };
    let mut peaks: BTreeMap<String, (u32, u64)> = BTreeMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let roots_now = roots.borrow().clone();
        system.refresh_memory();
        let procs: Vec<(u32, Option<u32>, u64)> = if roots_now.is_empty() {
            Vec::new()
        } else {
            system.refresh_processes_specifics(
                ProcessesToUpdate::All,
                true,
                ProcessRefreshKind::nothing().with_memory(),
            );
            system
                .processes()
                .values()
                // sysinfo lists threads as processes on Linux: skip them, or
                // their (shared) memory would be counted again.
                .filter(|p| p.thread_kind().is_none())
                .map(|p| (p.pid().as_u32(), p.parent().map(Pid::as_u32), p.memory()))
                .collect()
        };
        let mut telemetry = proto::Telemetry {
            host: Some(proto::HostMemory {
                total_bytes: system.total_memory(),
                available_bytes: system.available_memory(),
            }),
            services: Vec::new(),
        };
        let mut current = BTreeMap::new();
        for (service, root) in &roots_now {
            let members = tree(&procs, *root);
            let rss: u64 = members.iter().map(|i| procs[*i].2).sum();
            let processes = members.len() as u32;
            let cpu = members.iter().map(|i| cpu_ms(procs[*i].0)).sum();
            let io = members.iter().map(|i| io_bytes(procs[*i].0)).sum();
            let peak = peaks.entry(service.clone()).or_insert((*root, 0));
            if peak.0 != *root {
                *peak = (*root, 0);
            }
            peak.1 = peak.1.max(rss);
            current.insert(
                service.clone(),
                TreeMemory { rss_bytes: rss, peak_rss_bytes: peak.1, processes, cpu_ms: cpu, io_bytes: io },
            );
            telemetry.services.push(proto::ServiceMemory { service: service.clone(), rss_bytes: rss, processes });
        }
        samples.send_replace(current);
        journal.append(proto::event::Kind::Telemetry(telemetry));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_whole_tree_and_nothing_else() {
        let procs = [
            (1, None, 1000),
            (10, Some(1), 100),  // root
            (11, Some(10), 20),  // child
            (12, Some(11), 3),   // grandchild
            (20, Some(1), 5000), // unrelated
        ];
        let rss = |root| tree(&procs, root).iter().map(|i| procs[*i].2).sum::<u64>();
        assert_eq!(rss(10), 123);
        assert_eq!(tree(&procs, 10).len(), 3);
        assert_eq!(rss(99), 0);
    }
}
