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
        let service = HostService { models, lease, gpu_pin: s.gpu_pin.clone(), gpus_given: s.gpus_given.clone() };
        services.insert(s.name.clone(), service);
    }
    let limits = [Some(info.ram_total), info.memory_budget, info.cgroup_limit];
    Host {
        name: name.to_owned(),
        labels: labels.to_vec(),
        reachable: Reach::Up,
        services,
        capacity: Capacity {
            mem_available: info.ram_available,
            cgroup_room: info.cgroup_room,
            budget_room: info.budget_room,
        },
        reserved: info.reserved,
        total: limits.into_iter().flatten().min().unwrap_or(0),
        gpus: info.gpus.clone(),
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
