//! Scheduling: turning what the agents report into the planner's view of
//! each host, and the planner itself (`plan`, pure and table-tested).

pub mod plan;

use std::collections::BTreeMap;

use proto::admission::Capacity;

use crate::client::AgentView;
pub use plan::{Assignment, Host, HostModel, HostService, Need, Plan, Shard};

/// One host's planner view, from its handshake and its live journal view.
pub fn host_view(name: &str, labels: &[String], info: &proto::AgentInfo, view: &AgentView) -> Host {
    let mut services = BTreeMap::new();
    for s in &info.services {
        let models = s
            .models
            .iter()
            .map(|m| {
                let stage =
                    view.models.get(&(s.name.clone(), m.name.clone())).map_or(proto::Stage::Stopped, |v| v.stage);
                (m.name.clone(), HostModel { ram_need: m.ram_need_bytes, stage })
            })
            .collect();
        let lease = view.leases.get(&s.name).map(|l| plan::Holder {
            run_id: l.run_id.clone(),
            holder: l.holder.clone(),
            since: l.since.clone(),
        });
        services.insert(s.name.clone(), HostService { models, lease });
    }
    let budget_total = info.memory_budget_bytes.unwrap_or(u64::MAX);
    Host {
        name: name.to_owned(),
        labels: labels.to_vec(),
        reachable: match &view.lost {
            Some(reason) => Err(reason.clone()),
            None => Ok(()),
        },
        services,
        capacity: Capacity {
            mem_available: info.host_memory_available_bytes,
            cgroup_room: info.cgroup_room_bytes,
            budget_room: info.budget_room_bytes,
        },
        reserved: info.reserved_bytes,
        total: info.host_memory_total_bytes.min(budget_total),
    }
}

/// A host that could not be reached at all (no handshake).
pub fn unreachable(name: &str, labels: &[String], reason: &str) -> Host {
    Host {
        name: name.to_owned(),
        labels: labels.to_vec(),
        reachable: Err(reason.to_owned()),
        services: BTreeMap::new(),
        capacity: Capacity::default(),
        reserved: 0,
        total: 0,
    }
}
