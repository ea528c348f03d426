//! Scheduling: turning what the agents report into the planner's view of
//! each host, and the planner itself (`plan`, pure and table-tested).

pub mod plan;

use std::collections::BTreeMap;

use proto::admission::Capacity;

use crate::client::{AgentInfo, AgentView, Stage};
pub use plan::{Assignment, Host, HostModel, HostService, Need, Plan, Reach, Shard};

/// One host's planner view, from its handshake and its live journal view.
/// A lease past its expiry (by the agent's clock) holds nothing, even before
/// the agent's expiry event arrives.
pub fn host_view(name: &str, labels: &[String], info: &AgentInfo, view: &AgentView) -> Host {
    let mut services = BTreeMap::new();
    for s in &info.services {
        let models = s
            .models
            .iter()
            .map(|m| {
                let stage = view.models.get(&(s.name.clone(), m.name.clone())).map_or(Stage::Stopped, |v| v.stage);
                let model = HostModel { ram_need: m.ram_need, gpu_need: m.gpu_need, stage, at_start: m.at_start };
                (m.name.clone(), model)
            })
            .collect();
        let lease = view.leases.get(&s.name).filter(|l| l.expires_unix_ms > info.now_unix_ms).map(|l| plan::Holder {
            run_id: l.run_id.clone(),
            holder: l.holder.clone(),
            since: l.since.clone(),
        });
        let gpus_given = view.gpus_given.get(&s.name).unwrap_or(&s.gpus_given).clone();
        let service = HostService { models, lease, gpu_pin: s.gpu_pin.clone(), gpus_given };
        services.insert(s.name.clone(), service);
    }
    let limits = [Some(info.ram_total), info.memory_budget, info.cgroup_limit];
    // The stream's figures when it carries them (as fresh as its last
    // telemetry), else the handshake's.
    let standing = view.standing.clone().unwrap_or_else(|| crate::client::Standing {
        capacity: Capacity {
            mem_available: info.ram_available,
            cgroup_room: info.cgroup_room,
            budget_room: info.budget_room,
        },
        reserved: info.reserved,
        gpus: info.gpus.clone(),
    });
    Host {
        name: name.to_owned(),
        labels: labels.to_vec(),
        reachable: Reach::Up,
        services,
        capacity: standing.capacity,
        reserved: standing.reserved,
        total: limits.into_iter().flatten().min().unwrap_or(0),
        gpus: standing.gpus,
        own_queue: 0,
    }
}

fn down(name: &str, labels: &[String], reach: Reach) -> Host {
    Host {
        name: name.to_owned(),
        labels: labels.to_vec(),
        reachable: reach,
        services: BTreeMap::new(),
        capacity: Capacity::default(),
        reserved: 0,
        total: 0,
        gpus: Vec::new(),
        own_queue: 0,
    }
}

/// A host that could not be reached at all (no handshake): it cannot run anything.
pub fn unreachable(name: &str, labels: &[String], reason: &str) -> Host {
    down(name, labels, Reach::Down(reason.to_owned()))
}

/// A host that answers but not now (slow handshake, no snapshot yet).
pub fn slow(name: &str, labels: &[String], reason: &str) -> Host {
    down(name, labels, Reach::Slow(reason.to_owned()))
}

/// A host this run reached before and has lost: worth waiting for.
pub fn lost(name: &str, labels: &[String], reason: &str) -> Host {
    down(name, labels, Reach::Lost(reason.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ServiceInfo, Standing};
    use proto::admission::{GpuPin, GpuRoom};

    #[test]
    fn the_streamed_standing_is_preferred_to_the_handshakes_figures() {
        const MIB: u64 = 1024 * 1024;
        let info = AgentInfo {
            ram_total: 64_000 * MIB,
            ram_available: 60_000 * MIB,
            reserved: 0,
            services: vec![ServiceInfo {
                name: "translation".into(),
                gpu_pin: Some(GpuPin::Auto),
                ..Default::default()
            }],
            ..Default::default()
        };
        let handshake_only = host_view("h", &[], &info, &AgentView::default());
        assert_eq!((handshake_only.capacity.mem_available, handshake_only.reserved), (60_000 * MIB, 0));
        let gpu = GpuRoom { index: 1, total: 81_920 * MIB, used: 100 * MIB, reserved: 40_000 * MIB };
        let view = AgentView {
            standing: Some(Standing {
                capacity: Capacity { mem_available: 20_000 * MIB, cgroup_room: Some(5_000 * MIB), budget_room: None },
                reserved: 4_000 * MIB,
                gpus: vec![gpu],
            }),
            gpus_given: BTreeMap::from([("translation".to_owned(), vec![1])]),
            ..Default::default()
        };
        let streamed = host_view("h", &[], &info, &view);
        assert_eq!(streamed.capacity.mem_available, 20_000 * MIB);
        assert_eq!((streamed.capacity.cgroup_room, streamed.reserved), (Some(5_000 * MIB), 4_000 * MIB));
        assert_eq!(streamed.gpus, [gpu]);
        assert_eq!(streamed.services["translation"].gpus_given, [1]);
        // What never changes while the agent runs still comes from the handshake.
        assert_eq!(streamed.total, 64_000 * MIB);
    }
}
