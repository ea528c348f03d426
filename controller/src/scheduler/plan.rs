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
//! (unless `fresh`), then the one where fewer of this run's suites use or
//! wait for the service (so equal hosts share the work), then the one with
//! most memory left afterwards. A host this run lost is waited for; one it
//! never reached cannot run anything.

use std::collections::BTreeMap;

use proto::Stage;
use proto::admission::{self, Capacity, GpuPin, GpuRoom, ModelMem};

/// What a suite needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Need {
    pub service: String,
    pub models: Vec<String>,
    pub headroom: u64,
    /// GPU memory to keep free beyond the models' declared GPU needs.
    pub gpu_headroom: u64,
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
    pub gpu_need: u64,
    pub stage: Stage,
    /// Loaded whenever the service starts, asked for or not.
    pub at_start: bool,
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
    /// The GPUs it may use (`None`: it is given none).
    pub gpu_pin: Option<GpuPin>,
    /// While it runs: the GPUs it was given, where later loads go.
    pub gpus_given: Vec<u32>,
}

/// Whether a host answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reach {
    Up,
    /// Reached before, unreachable now: it may come back.
    Lost(String),
    /// Connected, but its state cannot be read right now.
    Slow(String),
    /// Never reached.
    Down(String),
}

/// One host as the controller sees it now.
#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    pub name: String,
    pub labels: Vec<String>,
    pub reachable: Reach,
    pub services: BTreeMap<String, HostService>,
    pub capacity: Capacity,
    pub reserved: u64,
    /// The most this host could ever give its services: min(RAM, budget, cgroup limit).
    pub total: u64,
    /// Its GPUs, with what loads in progress were promised on each.
    pub gpus: Vec<GpuRoom>,
    /// This run's tries using or waiting for the service here.
    pub own_queue: usize,
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
    /// Some host could hold it, none can now: one reason per eligible host;
    /// `only_lost` when every such host is one this run lost.
    Wait {
        reasons: Vec<String>,
        only_lost: bool,
    },
    /// No host could ever hold it: one shortfall per host.
    Unsatisfiable(Vec<String>),
}

fn mib(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
}

/// How one host stands for a need.
enum Verdict {
    /// It could never run it.
    Shortfall(String),
    /// It could, not now; `lost`: because this run lost it.
    Wait { reason: String, lost: bool },
    /// It can now: (affinity, own queue, memory left after admission).
    Free(usize, usize, u64),
}

/// Reachable, labelled, serving the service with every model.
fn eligible<'h>(need: &Need, host: &'h Host) -> Result<&'h HostService, Verdict> {
    let name = &host.name;
    match &host.reachable {
        Reach::Up => {}
        Reach::Lost(reason) => return Err(Verdict::Wait { reason: format!("{name}: lost ({reason})"), lost: true }),
        Reach::Slow(reason) => return Err(Verdict::Wait { reason: format!("{name}: {reason}"), lost: false }),
        Reach::Down(reason) => return Err(Verdict::Shortfall(format!("{name}: unreachable ({reason})"))),
    }
    let missing: Vec<&String> = need.labels.iter().filter(|l| !host.labels.contains(l)).collect();
    if !missing.is_empty() {
        return Err(Verdict::Shortfall(format!("{name}: lacks labels {missing:?}")));
    }
    let Some(service) = host.services.get(&need.service) else {
        return Err(Verdict::Shortfall(format!("{name}: does not serve {}", need.service)));
    };
    let absent: Vec<&String> = need.models.iter().filter(|m| !service.models.contains_key(*m)).collect();
    if !absent.is_empty() {
        return Err(Verdict::Shortfall(format!("{name}: {} lacks models {absent:?}", need.service)));
    }
    Ok(service)
}

/// Judges one host with the agent's own rules: what a request brings into
/// memory (`load_need`) and whether it fits (`admit`).
fn judge(need: &Need, host: &Host, run_id: &str) -> Verdict {
    let service = match eligible(need, host) {
        Ok(s) => s,
        Err(verdict) => return verdict,
    };
    let name = &host.name;
    let ready = |m: &HostModel| m.stage == Stage::Ready && !need.fresh;
    let mems = |cold: bool| -> Vec<ModelMem<'_>> {
        service
            .models
            .iter()
            .map(|(name, m)| ModelMem {
                name,
                ram: m.ram_need,
                gpu: m.gpu_need,
                at_start: m.at_start,
                loaded: !cold && (ready(m) || !m.stage.is_terminal()),
            })
            .collect()
    };
    let cold = admission::load_need(&mems(true), &need.models, true, need.headroom);
    let ever = cold.bytes + cold.headroom;
    if ever > host.total {
        return Verdict::Shortfall(format!(
            "{name}: needs {} MiB ({} MiB for the models + {} MiB headroom), can hold at most {} MiB",
            mib(ever),
            mib(cold.bytes),
            mib(need.headroom),
            mib(host.total)
        ));
    }
    if let Some(shortfall) = gpu_shortfall(need, host, service, cold.gpu_bytes) {
        return Verdict::Shortfall(shortfall);
    }
    if let Some(holder) = service.lease.as_ref().filter(|h| h.run_id != run_id) {
        let reason = format!(
            "{name}: busy: service {} is held by run {} ({}) since {}",
            need.service, holder.run_id, holder.holder, holder.since
        );
        return Verdict::Wait { reason, lost: false };
    }
    let starting = need.fresh || service.models.values().all(|m| matches!(m.stage, Stage::Stopped | Stage::Failed));
    let load = admission::load_need(&mems(false), &need.models, starting, need.headroom);
    let affinity = need.models.iter().filter(|m| ready(&service.models[*m])).count();
    let left = match admission::admit(load.bytes, load.headroom, host.capacity, host.reserved) {
        Ok(left) => left,
        Err(refusal) => return Verdict::Wait { reason: format!("{name}: {refusal}"), lost: false },
    };
    // A running service's later loads go to the GPUs it was given.
    let pin = match starting {
        true => service.gpu_pin.clone(),
        false => service.gpu_pin.as_ref().map(|_| GpuPin::Devices(service.gpus_given.clone())),
    };
    let gpu_headroom = if load.gpu_bytes > 0 { need.gpu_headroom } else { 0 };
    match pin.map(|pin| admission::place_gpu(load.gpu_bytes, gpu_headroom, &pin, &host.gpus)) {
        Some(Err(refusal)) => Verdict::Wait { reason: format!("{name}: {refusal}"), lost: false },
        _ => Verdict::Free(affinity, host.own_queue, left),
    }
}

/// Why a host could never hold the models' GPU memory, even with every
/// GPU empty: no GPU at all, too few, or too small.
fn gpu_shortfall(need: &Need, host: &Host, service: &HostService, gpu_bytes: u64) -> Option<String> {
    if gpu_bytes == 0 {
        return None;
    }
    let empty: Vec<GpuRoom> = host.gpus.iter().map(|g| GpuRoom { used: 0, reserved: 0, ..*g }).collect();
    let pin = service.gpu_pin.clone().unwrap_or(GpuPin::Auto);
    let refusal = admission::place_gpu(gpu_bytes, need.gpu_headroom, &pin, &empty).err()?;
    Some(format!("{}: can never hold the GPU memory: {refusal}", host.name))
}

pub fn plan(need: &Need, cases: usize, hosts: &[Host], run_id: &str) -> Plan {
    let mut shortfalls = Vec::new();
    let mut waits = Vec::new();
    let mut lost = 0;
    // (host index, affinity, own queue, memory left after admission)
    let mut free: Vec<(usize, usize, usize, u64)> = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        match judge(need, host, run_id) {
            Verdict::Shortfall(why) => shortfalls.push(why),
            Verdict::Wait { reason, lost: was_lost } => {
                lost += usize::from(was_lost);
                waits.push(reason);
            }
            Verdict::Free(affinity, queue, left) => free.push((i, affinity, queue, left)),
        }
    }
    if free.is_empty() && waits.is_empty() {
        return Plan::Unsatisfiable(shortfalls);
    }
    if free.is_empty() {
        return Plan::Wait { only_lost: lost == waits.len(), reasons: waits };
    }
    // Most models already loaded, then least used by this run, then most memory to spare.
    free.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)).then(b.3.cmp(&a.3)).then(a.0.cmp(&b.0)));
    let hosts_used = match need.shard {
        Shard::One => 1,
        Shard::Count(n) => (n.max(1) as usize).min(free.len()),
        Shard::Auto => free.len(),
    }
    .min(cases.max(1));
    let mut assignments: Vec<Assignment> =
        free[..hosts_used].iter().map(|(i, ..)| Assignment { host: *i, cases: Vec::new() }).collect();
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
            reachable: Reach::Up,
            services: BTreeMap::from([(
                "translation".to_owned(),
                HostService {
                    models: models
                        .iter()
                        .map(|(m, ram, stage)| {
                            let model = HostModel { ram_need: ram * MIB, gpu_need: 0, stage: *stage, at_start: false };
                            (m.to_string(), model)
                        })
                        .collect(),
                    lease: None,
                    gpu_pin: None,
                    gpus_given: Vec::new(),
                },
            )]),
            capacity: Capacity { mem_available: available_mib * MIB, cgroup_room: None, budget_room: None },
            reserved: 0,
            total: 24_000 * MIB,
            gpus: Vec::new(),
            own_queue: 0,
        }
    }

    fn need(models: &[&str]) -> Need {
        Need {
            service: "translation".into(),
            models: models.iter().map(|m| m.to_string()).collect(),
            headroom: 0,
            gpu_headroom: 0,
            labels: vec![],
            fresh: false,
            shard: Shard::One,
        }
    }

    use Stage::{Ready, Stopped};

    /// A host serving `aya` (70 GB of GPU memory, auto) with these GPUs:
    /// (total, used, reserved) MiB each.
    fn gpu_host(name: &str, gpus: &[(u64, u64, u64)]) -> Host {
        let mut h = host(name, 20_000, &[("aya", 1000, Stopped)]);
        let service = h.services.get_mut("translation").unwrap();
        service.models.get_mut("aya").unwrap().gpu_need = 70_000 * MIB;
        service.gpu_pin = Some(GpuPin::Auto);
        h.gpus = gpus
            .iter()
            .enumerate()
            .map(|(i, (total, used, reserved))| GpuRoom {
                index: i as u32,
                total: total * MIB,
                used: used * MIB,
                reserved: reserved * MIB,
            })
            .collect();
        h
    }

    #[test]
    fn a_suite_needing_gpu_memory_goes_where_a_gpu_has_it_free() {
        let a100_busy = gpu_host("a100-busy", &[(81_920, 40_000, 0), (81_920, 0, 30_000)]);
        let h100_free = gpu_host("h100", &[(81_920, 2_000, 0)]);
        let l4 = gpu_host("l4", &[(24_576, 0, 0), (24_576, 0, 0), (24_576, 0, 0), (24_576, 0, 0)]);
        let cpu = gpu_host("cpu-only", &[]);
        let place = |host| Plan::Place(vec![Assignment { host, cases: vec![0] }]);
        // (hosts, plan)
        let table: [(Vec<Host>, Plan); 3] = [
            (vec![a100_busy.clone(), h100_free.clone(), l4.clone()], place(1)),
            (vec![cpu.clone(), l4.clone(), h100_free.clone()], place(2)),
            (vec![a100_busy.clone(), cpu.clone()], Plan::Wait { reasons: vec![], only_lost: false }),
        ];
        for (hosts, want) in table {
            let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
            match (plan(&need(&["aya"]), 1, &hosts, "r"), want) {
                (Plan::Wait { reasons, .. }, Plan::Wait { .. }) => {
                    assert_eq!(reasons.len(), 1, "{names:?}: {reasons:?}");
                    assert!(reasons[0].starts_with("a100-busy: not enough GPU memory: needs 70000 MiB"), "{reasons:?}");
                    assert!(reasons[0].contains("GPU 1: 51920 MiB free of 81920 MiB"), "{reasons:?}");
                }
                (got, want) => assert_eq!(got, want, "{names:?}"),
            }
        }
        // Hosts that could never hold it say why.
        match plan(&need(&["aya"]), 1, &[cpu, l4], "r") {
            Plan::Unsatisfiable(why) => {
                assert!(
                    why[0].starts_with("cpu-only: can never hold the GPU memory") && why[0].contains("no GPU"),
                    "{why:?}"
                );
                assert!(
                    why[1].contains("l4: can never hold the GPU memory") && why[1].contains("on one GPU"),
                    "{why:?}"
                );
            }
            other => panic!("not unsatisfiable: {other:?}"),
        }
        // Pinned across the four L4s, 17500 MiB each fits; with headroom 4x2000 more, it does not.
        let mut pinned = gpu_host("l4", &[(24_576, 0, 0), (24_576, 0, 0), (24_576, 0, 0), (24_576, 7_000, 0)]);
        pinned.services.get_mut("translation").unwrap().gpu_pin = Some(GpuPin::Devices(vec![0, 1, 2, 3]));
        assert_eq!(plan(&need(&["aya"]), 1, std::slice::from_ref(&pinned), "r"), place(0));
        let roomy = Need { gpu_headroom: 8_000 * MIB, ..need(&["aya"]) };
        assert!(matches!(plan(&roomy, 1, &[pinned], "r"), Plan::Wait { .. }));
    }

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
        let Plan::Wait { reasons, .. } = plan(&headroom, 1, &hosts, "r") else { panic!() };
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
        let Plan::Wait { reasons, only_lost } = plan(&need(&["nllb"]), 1, &[busy.clone(), full], "mine") else {
            panic!()
        };
        assert!(!only_lost);
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
        down.reachable = Reach::Down("connection refused".into());
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

    #[test]
    fn a_lost_host_is_waited_for_but_a_never_reached_one_is_a_shortfall() {
        let mut gone = host("a", 20_000, &[("nllb", 4700, Stopped)]);
        gone.reachable = Reach::Lost("unreachable for more than 20s".into());
        let Plan::Wait { reasons, only_lost } = plan(&need(&["nllb"]), 1, &[gone.clone()], "r") else { panic!() };
        assert!(only_lost);
        assert_eq!(reasons, ["a: lost (unreachable for more than 20s)"]);
        gone.reachable = Reach::Down("connection refused".into());
        assert!(matches!(plan(&need(&["nllb"]), 1, &[gone], "r"), Plan::Unsatisfiable(_)));
    }

    #[test]
    fn equally_good_hosts_share_this_runs_suites() {
        let mut hosts = [
            host("a", 10_000, &[("nllb", 1000, Stopped)]),
            host("b", 10_000, &[("nllb", 1000, Stopped)]),
            host("c", 10_000, &[("nllb", 1000, Stopped)]),
        ];
        // (own queue per host) → host chosen
        let table = [([0, 0, 0], 0), ([1, 0, 0], 1), ([1, 1, 0], 2), ([1, 1, 1], 0), ([2, 1, 2], 1)];
        for (queues, expected) in table {
            for (h, q) in hosts.iter_mut().zip(queues) {
                h.own_queue = q;
            }
            assert_eq!(
                plan(&need(&["nllb"]), 3, &hosts, "r"),
                Plan::Place(vec![Assignment { host: expected, cases: vec![0, 1, 2] }]),
                "queues {queues:?}"
            );
        }
        // Affinity still comes first: a loaded model beats an idle host.
        hosts[2].services.get_mut("translation").unwrap().models.get_mut("nllb").unwrap().stage = Ready;
        hosts[2].own_queue = 3;
        assert_eq!(plan(&need(&["nllb"]), 1, &hosts, "r"), Plan::Place(vec![Assignment { host: 2, cases: vec![0] }]));
    }

    #[test]
    fn starting_a_service_counts_its_at_start_models_as_the_agent_does() {
        let mut h = host("a", 6_000, &[("nllb", 4700, Stopped), ("aya", 15_000, Stopped)]);
        h.services.get_mut("translation").unwrap().models.get_mut("aya").unwrap().at_start = true;
        // A stopped service starts with aya too: 19.7 GB do not fit in 6 GB free.
        let Plan::Wait { reasons, .. } = plan(&need(&["nllb"]), 1, &[h.clone()], "r") else { panic!() };
        assert!(reasons[0].starts_with("a: not enough memory: needs 19700 MiB"), "{reasons:?}");
        // Once aya is loaded (the service runs), nllb alone fits.
        h.services.get_mut("translation").unwrap().models.get_mut("aya").unwrap().stage = Ready;
        assert!(matches!(plan(&need(&["nllb"]), 1, &[h.clone()], "r"), Plan::Place(_)));
        // A host whose total could never hold the start is unsatisfiable at once.
        h.services.get_mut("translation").unwrap().models.get_mut("aya").unwrap().stage = Stopped;
        h.total = 16_000 * MIB;
        assert!(matches!(plan(&need(&["nllb"]), 1, &[h], "r"), Plan::Unsatisfiable(_)));
    }
}
