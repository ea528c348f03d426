//! Memory sampling: host RAM and each service's process-tree RSS, at a fixed
//! interval (1 Hz by default), published to the journal as `Telemetry` and to
//! the supervisors through a watch channel (for failure messages).

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
}

/// Service name → root PID, kept current by the supervisors.
pub type Roots = watch::Receiver<BTreeMap<String, u32>>;
pub type Samples = watch::Sender<BTreeMap<String, TreeMemory>>;

/// Sums RSS over `root` and all its descendants. `procs` is (pid, parent, rss).
pub fn tree_rss(procs: &[(u32, Option<u32>, u64)], root: u32) -> (u64, u32) {
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
    let Some(start) = root_index else {
        return (0, 0);
    };
    let (mut rss, mut count, mut stack) = (0, 0, vec![start]);
    while let Some(i) = stack.pop() {
        let (pid, _, bytes) = procs[i];
        rss += bytes;
        count += 1;
        if let Some(kids) = children.get(&pid) {
            stack.extend(kids.iter().copied());
        }
    }
    (rss, count)
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
            let (rss, processes) = tree_rss(&procs, *root);
            let peak = peaks.entry(service.clone()).or_insert((*root, 0));
            if peak.0 != *root {
                *peak = (*root, 0);
            }
            peak.1 = peak.1.max(rss);
            current.insert(service.clone(), TreeMemory { rss_bytes: rss, peak_rss_bytes: peak.1, processes });
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
        assert_eq!(tree_rss(&procs, 10), (123, 3));
        assert_eq!(tree_rss(&procs, 99), (0, 0));
    }
}
