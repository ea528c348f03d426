//! The placement planner: given what each host offers now, where does a
//! suite run — or why must it wait, or why can it never run? Pure: the
//! scheduler feeds it snapshots of the agents; tests feed it tables.
//!
//! Rules (docs/scheduling.md): a host is *eligible* when it is reachable,
//! carries the suite's labels, serves its service with all its models, and
//! could hold them at all. It is *free now* when no other run leases the
//! service and memory admission (`proto::admission::admit`, the agent's own
//! rule) passes for the models not yet loaded plus the headroom. Among free
//! hosts, prefer the one with most of the suite's models already `READY`
//! (unless `fresh`), then the one with most memory left afterwards.

use std::collections::BTreeMap;

use proto::Stage;
use proto::admission::{self, Capacity};

/// What a suite needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Need {
    pub service: String,
    pub models: Vec<String>,
    pub headroom: u64,
    pub labels: Vec<String>,
    pub fresh: bool,
    pub shard: Shard,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shard {
    /// All cases on one host.
    One,
    /// Split across at most this many hosts.
    Count(u32),
    /// Split across every eligible host free now.
    Auto,
}

/// A model as a host offers it.
#[derive(Clone, Debug, PartialEq)]
pub struct HostModel {
    pub ram_need: u64,
    pub stage: Stage,
}

/// Who holds a service's lease.
#[derive(Clone, Debug, PartialEq)]
pub struct Holder {
    pub run_id: String,
    pub holder: String,
    pub since: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostService {
    pub models: BTreeMap<String, HostModel>,
    pub lease: Option<Holder>,
}

/// One host as the controller sees it now.
#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    pub name: String,
    pub labels: Vec<String>,
    /// `Err(reason)` when the agent cannot be reached.
    pub reachable: Result<(), String>,
    pub services: BTreeMap<String, HostService>,
    pub capacity: Capacity,
    pub reserved: u64,
    /// The most this host could ever give its services: min(RAM, budget).
    pub total: u64,
}

/// Cases (by index) to run on a host (by index into the host list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub host: usize,
    pub cases: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    Place(Vec<Assignment>),
    /// Some host could hold it, none can now: one reason per eligible host.
    Wait(Vec<String>),
    /// No host could ever hold it: one shortfall per host.
    Unsatisfiable(Vec<String>),
}

fn mib(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
}

pub fn plan(need: &Need, cases: usize, hosts: &[Host], run_id: &str) -> Plan {
    let mut shortfalls = Vec::new();
    let mut waits = Vec::new();
    // (host index, affinity, memory left after admission)
    let mut free: Vec<(usize, usize, u64)> = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let name = &host.name;
        if let Err(reason) = &host.reachable {
            shortfalls.push(format!("{name}: unreachable ({reason})"));
            continue;
        }
        let missing: Vec<&String> = need.labels.iter().filter(|l| !host.labels.contains(l)).collect();
        if !missing.is_empty() {
            shortfalls.push(format!("{name}: lacks labels {missing:?}"));
            continue;
        }
        let Some(service) = host.services.get(&need.service) else {
            shortfalls.push(format!("{name}: does not serve {}", need.service));
            continue;
        };
        let absent: Vec<&String> = need.models.iter().filter(|m| !service.models.contains_key(*m)).collect();
        if !absent.is_empty() {
            shortfalls.push(format!("{name}: {} lacks models {absent:?}", need.service));
            continue;
        }
        let models: Vec<&HostModel> = need.models.iter().map(|m| &service.models[m]).collect();
        let ever = models.iter().map(|m| m.ram_need).sum::<u64>() + need.headroom;
        if ever > host.total {
            shortfalls.push(format!(
                "{name}: needs {} MiB ({} MiB for the models + {} MiB headroom), can hold at most {} MiB",
                mib(ever),
                mib(ever - need.headroom),
                mib(need.headroom),
                mib(host.total)
            ));
            continue;
        }
        if let Some(holder) = service.lease.as_ref().filter(|h| h.run_id != run_id) {
            waits.push(format!(
                "{name}: busy: service {} is held by run {} ({}) since {}",
                need.service, holder.run_id, holder.holder, holder.since
            ));
            continue;
        }
        let ready = |m: &HostModel| m.stage == Stage::Ready && !need.fresh;
        let to_load: u64 = models.iter().filter(|m| !ready(m)).map(|m| m.ram_need).sum();
        match admission::admit(to_load, need.headroom, host.capacity, host.reserved) {
            Ok(left) => free.push((i, models.iter().filter(|m| ready(m)).count(), left)),
            Err(refusal) => waits.push(format!("{name}: {refusal}")),
        }
    }
    if free.is_empty() && waits.is_empty() {
        return Plan::Unsatisfiable(shortfalls);
    }
    if free.is_empty() {
        return Plan::Wait(waits);
    }
    // Most models already loaded first, then most memory to spare.
    free.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
    let hosts_used = match need.shard {
        Shard::One => 1,
        Shard::Count(n) => (n.max(1) as usize).min(free.len()),
        Shard::Auto => free.len(),
    }
    .min(cases.max(1));
    let mut assignments: Vec<Assignment> =
        free[..hosts_used].iter().map(|(i, _, _)| Assignment { host: *i, cases: Vec::new() }).collect();
    for case in 0..cases {
        assignments[case % hosts_used].cases.push(case);
    }
    Plan::Place(assignments)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn host(name: &str, available_mib: u64, models: &[(&str, u64, Stage)]) -> Host {
        Host {
            name: name.into(),
            labels: vec!["gpu".into()],
            reachable: Ok(()),
            services: BTreeMap::from([(
                "translation".to_owned(),
                HostService {
                    models: models
                        .iter()
                        .map(|(m, ram, stage)| (m.to_string(), HostModel { ram_need: ram * MIB, stage: *stage }))
                        .collect(),
                    lease: None,
                },
            )]),
            capacity: Capacity { mem_available: available_mib * MIB, cgroup_room: None, budget_room: None },
            reserved: 0,
            total: 24_000 * MIB,
        }
    }

    fn need(models: &[&str]) -> Need {
        Need {
            service: "translation".into(),
            models: models.iter().map(|m| m.to_string()).collect(),
            headroom: 0,
            labels: vec![],
            fresh: false,
            shard: Shard::One,
        }
    }

    use Stage::{Ready, Stopped};

    #[test]
    fn prefers_hosts_where_the_models_are_already_loaded() {
        let hosts = [host("cold", 20_000, &[("nllb", 4700, Stopped)]), host("warm", 6_000, &[("nllb", 4700, Ready)])];
        assert_eq!(
            plan(&need(&["nllb"]), 2, &hosts, "r"),
            Plan::Place(vec![Assignment { host: 1, cases: vec![0, 1] }])
        );
        // fresh: affinity is ignored, the host with more memory to spare wins.
        let fresh = Need { fresh: true, ..need(&["nllb"]) };
        assert_eq!(plan(&fresh, 1, &hosts, "r"), Plan::Place(vec![Assignment { host: 0, cases: vec![0] }]));
    }

    #[test]
    fn a_loaded_model_needs_no_memory_but_headroom_still_counts() {
        let hosts = [host("a", 1_000, &[("aya", 15_000, Ready)])];
        assert!(matches!(plan(&need(&["aya"]), 1, &hosts, "r"), Plan::Place(_)));
        let headroom = Need { headroom: 2_000 * MIB, ..need(&["aya"]) };
        let Plan::Wait(reasons) = plan(&headroom, 1, &hosts, "r") else { panic!() };
        assert!(
            reasons[0].starts_with("a: not enough memory: needs 2000 MiB (0 MiB declared + 2000 MiB headroom)"),
            "{reasons:?}"
        );
    }

    #[test]
    fn labels_and_models_filter_hosts() {
        let mut other = host("cpu-box", 50_000, &[("nllb", 4700, Stopped)]);
        other.labels = vec!["cpu".into()];
        let hosts = [other, host("gpu-box", 8_000, &[("nllb", 4700, Stopped)])];
        let labelled = Need { labels: vec!["gpu".into()], ..need(&["nllb"]) };
        assert_eq!(plan(&labelled, 1, &hosts, "r"), Plan::Place(vec![Assignment { host: 1, cases: vec![0] }]));
    }

    #[test]
    fn sharding_splits_cases_across_free_hosts() {
        let hosts = [
            host("a", 10_000, &[("nllb", 1000, Stopped)]),
            host("b", 9_000, &[("nllb", 1000, Stopped)]),
            host("c", 8_000, &[("nllb", 1000, Stopped)]),
        ];
        let two = Need { shard: Shard::Count(2), ..need(&["nllb"]) };
        assert_eq!(
            plan(&two, 5, &hosts, "r"),
            Plan::Place(vec![Assignment { host: 0, cases: vec![0, 2, 4] }, Assignment { host: 1, cases: vec![1, 3] }])
        );
        let auto = Need { shard: Shard::Auto, ..need(&["nllb"]) };
        let Plan::Place(a) = plan(&auto, 3, &hosts, "r") else { panic!() };
        assert_eq!(a.len(), 3);
        // Never more hosts than cases.
        let Plan::Place(a) = plan(&auto, 1, &hosts, "r") else { panic!() };
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn busy_or_full_hosts_mean_wait_with_reasons() {
        let mut busy = host("a", 20_000, &[("nllb", 4700, Ready)]);
        busy.services.get_mut("translation").unwrap().lease =
            Some(Holder { run_id: "other".into(), holder: "ci@b".into(), since: "2026-11-24T18:00:00Z".into() });
        let full = host("b", 1_000, &[("nllb", 4700, Stopped)]);
        let Plan::Wait(reasons) = plan(&need(&["nllb"]), 1, &[busy.clone(), full], "mine") else { panic!() };
        assert_eq!(reasons[0], "a: busy: service translation is held by run other (ci@b) since 2026-11-24T18:00:00Z");
        assert!(reasons[1].starts_with("b: not enough memory: needs 4700 MiB"), "{reasons:?}");
        // Our own lease is no obstacle.
        assert!(matches!(plan(&need(&["nllb"]), 1, &[busy], "other"), Plan::Place(_)));
    }

    #[test]
    fn unsatisfiable_lists_every_hosts_shortfall() {
        let mut small = host("small", 8_000, &[("aya", 15_000, Stopped)]);
        small.total = 8_000 * MIB;
        let mut down = host("down", 0, &[]);
        down.reachable = Err("connection refused".into());
        let hosts = [small, host("no-aya", 20_000, &[("nllb", 4700, Stopped)]), down];
        let Plan::Unsatisfiable(why) = plan(&need(&["aya"]), 1, &hosts, "r") else { panic!() };
        assert_eq!(
            why,
            [
                "small: needs 15000 MiB (15000 MiB for the models + 0 MiB headroom), can hold at most 8000 MiB",
                "no-aya: translation lacks models [\"aya\"]",
                "down: unreachable (connection refused)",
            ]
        );
    }
}
