//! Memory admission on the agent: one actor owns the reservations of loads
//! admitted and still running, so two loads asked for at once are judged one
//! after the other and cannot both take the same memory. What a request
//! brings in is `proto::admission::load_need` and whether it fits is
//! `proto::admission::admit`, both shared with the controller's placement;
//! a request is admitted whole, with its headroom once. GPU memory is
//! admitted the same way, per device (`proto::admission::place_gpu`), and
//! decides which GPUs a starting service is given.

use std::collections::BTreeMap;

use proto::admission::{self, Capacity, GpuPin, GpuRefusal, GpuRoom, ModelMem, Refusal};
use tokio::sync::{mpsc, oneshot, watch};

use crate::sampling::TreeMemory;

/// Reads the host's capacity now; injectable for tests.
pub type CapacitySource = Box<dyn Fn(&BTreeMap<String, TreeMemory>) -> Capacity + Send>;
/// The host's GPUs as last sampled (`reserved` 0: admission adds its own).
pub type GpuSource = watch::Receiver<Vec<GpuRoom>>;

/// Why a load was not admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shortfall {
    Memory(Box<Refusal>),
    Gpu(Box<GpuRefusal>),
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shortfall::Memory(r) => r.fmt(f),
            Shortfall::Gpu(r) => r.fmt(f),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot load {} on service {service}: {refusal}{consumers}", .models.join(", "))]
pub struct Refused {
    pub service: String,
    /// Every model the refused request would have loaded.
    pub models: Vec<String>,
    pub refusal: Shortfall,
    /// ", largest consumers: …" or empty.
    pub consumers: String,
}

/// One model load as admission judges it: declared RAM and GPU needs, bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Load {
    pub model: String,
    pub ram: u64,
    pub gpu: u64,
}

/// One request, judged whole.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ask {
    pub loads: Vec<Load>,
    pub headroom: u64,
    pub gpu_headroom: u64,
    /// The GPUs the service may use: as configured when it starts, the
    /// devices it was given while it runs; `None` = it gets no GPU.
    pub pin: Option<GpuPin>,
}

/// What a load request brings in, as the supervisor knows it.
#[derive(Clone, Debug)]
pub struct LoadAsk<'a> {
    pub models: &'a [ModelMem<'a>],
    pub asked: &'a [String],
    /// The service is not running: its at-start models load too.
    pub starting: bool,
    pub headroom: u64,
    pub gpu_headroom: u64,
    pub pin: Option<GpuPin>,
}

/// What was admitted: the models whose loads start, and the GPUs the
/// service is given (for `CUDA_VISIBLE_DEVICES`; empty = none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Admitted {
    pub models: Vec<String>,
    pub gpus: Vec<u32>,
}

/// Bytes some loads still owe, shrinking as a measured figure (the
/// service's RSS, or its GPU memory) grows.
#[derive(Debug, Default)]
struct Debt {
    owed: u64,
    /// The figure when `owed` was last settled.
    mark: u64,
}

impl Debt {
    fn outstanding(&self, now: u64) -> u64 {
        self.owed.saturating_sub(now.saturating_sub(self.mark))
    }

    fn settle(&mut self, now: u64) {
        self.owed = self.outstanding(now);
        self.mark = now;
    }
}

/// What the loads admitted on one service still owe. Kept per service, not
/// per model, because only the service's memory is measured: its growth is
/// memory some load now holds and must count once, not against every load.
#[derive(Debug, Default)]
struct Held {
    /// Declared (RAM, GPU) needs of the models still loading.
    models: BTreeMap<String, (u64, u64)>,
    /// Headroom of the requests that admitted them, held until they all end.
    headroom: u64,
    gpu_headroom: u64,
    ram: Debt,
    gpu: Debt,
    /// The GPUs its GPU debt is on, shared evenly.
    devices: Vec<u32>,
}

impl Held {
    fn add(&mut self, ask: &Ask, devices: &[u32], now: TreeMemory) {
        self.ram.settle(now.rss_bytes);
        self.gpu.settle(now.gpu_bytes);
        self.models.extend(ask.loads.iter().map(|l| (l.model.clone(), (l.ram, l.gpu))));
        self.ram.owed += ask.loads.iter().map(|l| l.ram).sum::<u64>() + ask.headroom;
        self.gpu.owed += ask.loads.iter().map(|l| l.gpu).sum::<u64>() + ask.gpu_headroom;
        self.headroom += ask.headroom;
        self.gpu_headroom += ask.gpu_headroom;
        self.devices = devices.to_vec();
    }

    /// Which model's load the growth so far was is unknown, so what is still
    /// owed is capped at what the remaining loads could need, never below.
    fn remove(&mut self, model: &str, now: TreeMemory) {
        self.ram.settle(now.rss_bytes);
        self.gpu.settle(now.gpu_bytes);
        if self.models.remove(model).is_some() {
            self.ram.owed = self.ram.owed.min(self.models.values().map(|m| m.0).sum::<u64>() + self.headroom);
            self.gpu.owed = self.gpu.owed.min(self.models.values().map(|m| m.1).sum::<u64>() + self.gpu_headroom);
        }
    }
}

/// The host as admission sees it now: for GetInfo, so controllers place alike.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Standing {
    pub capacity: Capacity,
    /// RAM promised to loads in progress.
    pub reserved: u64,
    /// Each GPU with what loads in progress were promised on it.
    pub gpus: Vec<GpuRoom>,
}

impl Standing {
    /// The wire form, as GetInfo and each telemetry event carry it.
    pub fn to_proto(&self) -> proto::Standing {
        proto::Standing {
            mem_available_bytes: self.capacity.mem_available,
            cgroup_room_bytes: self.capacity.cgroup_room,
            budget_room_bytes: self.capacity.budget_room,
            reserved_bytes: self.reserved,
            gpus: self.gpus.iter().map(gpu_room_to_proto).collect(),
        }
    }
}

pub fn gpu_room_to_proto(g: &GpuRoom) -> proto::GpuRoom {
    proto::GpuRoom { index: g.index, total_bytes: g.total, used_bytes: g.used, reserved_bytes: g.reserved }
}

enum Command {
    Reserve { service: String, ask: Ask, reply: oneshot::Sender<Result<Admitted, Refused>> },
    Release { service: String, model: String },
    Standing { reply: oneshot::Sender<Standing> },
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("admission::Command")
    }
}

#[derive(Clone, Debug)]
pub struct Admission {
    tx: mpsc::UnboundedSender<Command>,
}

impl Admission {
    pub fn start(
        source: CapacitySource,
        samples: watch::Receiver<BTreeMap<String, TreeMemory>>,
        gpus: GpuSource,
    ) -> Admission {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(Sources { capacity: source, samples, gpus }, rx));
        Admission { tx }
    }

    /// The host as it is: MemAvailable, the agent's cgroup, and its budget.
    pub fn host(budget: Option<u64>) -> CapacitySource {
        Box::new(move |samples| Capacity {
            mem_available: mem_available().unwrap_or(0),
            cgroup_room: cgroup_room(),
            budget_room: budget.map(|b| b.saturating_sub(samples.values().map(|s| s.rss_bytes).sum())),
        })
    }

    /// Admits the loads a request starts on `service` (`load_need`), all or
    /// none, and places their GPU memory. Each model is released when its
    /// load ends.
    pub async fn reserve_loads(&self, service: &str, ask: LoadAsk<'_>) -> Result<Admitted, Refused> {
        let need = admission::load_need(ask.models, ask.asked, ask.starting, ask.headroom);
        let loads = ask
            .models
            .iter()
            .filter(|m| need.models.contains(&m.name))
            .map(|m| Load { model: m.name.to_owned(), ram: m.ram, gpu: m.gpu })
            .collect();
        let ask = Ask { loads, headroom: need.headroom, gpu_headroom: ask.gpu_headroom, pin: ask.pin };
        self.admit(service, ask).await
    }

    /// Admits `ask` as one decision. Models already reserved are skipped; if
    /// none is left there is no memory to admit (GPUs are still chosen).
    pub async fn admit(&self, service: &str, ask: Ask) -> Result<Admitted, Refused> {
        let (reply, rx) = oneshot::channel();
        let fallback = Admitted { models: ask.loads.iter().map(|l| l.model.clone()).collect(), gpus: Vec::new() };
        if self.tx.send(Command::Reserve { service: service.into(), ask, reply }).is_err() {
            return Ok(fallback);
        }
        rx.await.unwrap_or(Ok(fallback))
    }

    /// The host's capacity now and what loads in progress were promised,
    /// as admission would see them.
    pub async fn standing(&self) -> Standing {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Standing { reply }).is_err() {
            return Standing::default();
        }
        rx.await.unwrap_or_default()
    }

    /// The load ended (ready, failed or stopped): its reservation is freed.
    pub fn release(&self, service: &str, model: &str) {
        let _ = self.tx.send(Command::Release { service: service.into(), model: model.into() });
    }
}

struct Sources {
    capacity: CapacitySource,
    samples: watch::Receiver<BTreeMap<String, TreeMemory>>,
    gpus: GpuSource,
}

async fn run(sources: Sources, mut rx: mpsc::UnboundedReceiver<Command>) {
    let mut held: BTreeMap<String, Held> = BTreeMap::new();
    while let Some(cmd) = rx.recv().await {
        let now = sources.samples.borrow().clone();
        let of = |s: &str| now.get(s).copied().unwrap_or_default();
        match cmd {
            Command::Release { service, model } => {
                if let Some(h) = held.get_mut(&service) {
                    h.remove(&model, of(&service));
                    if h.models.is_empty() {
                        held.remove(&service);
                    }
                }
            }
            Command::Standing { reply } => {
                let gpus = gpu_rooms(&held, &now, &sources.gpus.borrow());
                let _ =
                    reply.send(Standing { capacity: (sources.capacity)(&now), reserved: reserved(&held, &now), gpus });
            }
            Command::Reserve { service, ask, reply } => {
                let result = admit_request(&mut held, &sources, &now, &service, ask);
                let _ = reply.send(result);
            }
        }
    }
}

/// Admits one request as one decision, headroom once: RAM first, then its
/// GPU memory on the devices `pin` allows. Loads already held are dropped
/// first: re-reserving a model is a no-op.
fn admit_request(
    held: &mut BTreeMap<String, Held>,
    sources: &Sources,
    now: &BTreeMap<String, TreeMemory>,
    service: &str,
    mut ask: Ask,
) -> Result<Admitted, Refused> {
    if let Some(h) = held.get(service) {
        ask.loads.retain(|l| !h.models.contains_key(&l.model));
    }
    let refused = |ask: &Ask, refusal: Shortfall, consumers: String| Refused {
        service: service.to_owned(),
        models: ask.loads.iter().map(|l| l.model.clone()).collect(),
        refusal,
        consumers,
    };
    let ram: u64 = ask.loads.iter().map(|l| l.ram).sum();
    if !ask.loads.is_empty() {
        admission::admit(ram, ask.headroom, (sources.capacity)(now), reserved(held, now))
            .map_err(|r| refused(&ask, Shortfall::Memory(Box::new(r)), largest_consumers(3)))?;
    }
    let gpu: u64 = ask.loads.iter().map(|l| l.gpu).sum();
    if gpu == 0 {
        ask.gpu_headroom = 0;
    }
    let gpus = match &ask.pin {
        Some(pin) => {
            let rooms = gpu_rooms(held, now, &sources.gpus.borrow());
            admission::place_gpu(gpu, ask.gpu_headroom, pin, &rooms)
                .map_err(|r| refused(&ask, Shortfall::Gpu(Box::new(r)), String::new()))?
        }
        None => Vec::new(),
    };
    let models = ask.loads.iter().map(|l| l.model.clone()).collect();
    if !ask.loads.is_empty() {
        held.entry(service.to_owned()).or_default().add(&ask, &gpus, now.get(service).copied().unwrap_or_default());
    }
    Ok(Admitted { models, gpus })
}

/// Memory still owed to admitted loads, all services together.
fn reserved(held: &BTreeMap<String, Held>, now: &BTreeMap<String, TreeMemory>) -> u64 {
    held.iter().map(|(svc, h)| h.ram.outstanding(now.get(svc).map_or(0, |m| m.rss_bytes))).sum()
}

/// Each sampled GPU with the GPU memory admitted loads still owe on it (a
/// service's debt shared evenly across its devices).
fn gpu_rooms(held: &BTreeMap<String, Held>, now: &BTreeMap<String, TreeMemory>, sampled: &[GpuRoom]) -> Vec<GpuRoom> {
    let mut rooms = sampled.to_vec();
    for (svc, h) in held {
        let owed = h.gpu.outstanding(now.get(svc).map_or(0, |m| m.gpu_bytes));
        let share = owed.div_ceil(h.devices.len().max(1) as u64);
        for room in rooms.iter_mut().filter(|r| h.devices.contains(&r.index)) {
            room.reserved += share;
        }
    }
    rooms
}

fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// `limit - usage` of this process's memory cgroup, if limited.
fn cgroup_room() -> Option<u64> {
    cgroup_memory().map(|(limit, usage)| limit.saturating_sub(usage))
}

/// The limit of this process's memory cgroup, if it has one (for GetInfo:
/// a controller can tell a suite that never fits under it from a busy host).
pub fn cgroup_limit() -> Option<u64> {
    cgroup_memory().map(|(limit, _)| limit)
}

/// `(limit, usage)` of this process's memory cgroup (v2, else v1), if limited.
fn cgroup_memory() -> Option<(u64, u64)> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read = |path: String| std::fs::read_to_string(path).ok();
    let usage = |path: String| read(path).and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            let dir = format!("/sys/fs/cgroup/memory{path}");
            let limit = parse_limit(&read(format!("{dir}/memory.limit_in_bytes"))?)?;
            return Some((limit, usage(format!("{dir}/memory.usage_in_bytes"))));
        }
        if controllers.is_empty() {
            let dir = format!("/sys/fs/cgroup{path}");
            if let Some(limit) = read(format!("{dir}/memory.max")).and_then(|s| parse_limit(&s)) {
                return Some((limit, usage(format!("{dir}/memory.current"))));
            }
        }
    }
    None
}

/// A cgroup memory limit file's contents, `None` for "no limit": v2 writes
/// `max`, v1 a huge number (9223372036854771712), so anything from 2^60 up.
fn parse_limit(text: &str) -> Option<u64> {
    text.trim().parse::<u64>().ok().filter(|&limit| limit < 1 << 60)
}

/// ", largest consumers: name (pid) N MiB, …" from /proc, for refusals.
fn largest_consumers(n: usize) -> String {
    let mut procs: Vec<(u64, String)> = crate::sampling::pressure::host_processes()
        .into_iter()
        .map(|(pid, name, rss)| (rss, format!("{name} ({pid})")))
        .collect();
    procs.sort_by_key(|p| std::cmp::Reverse(p.0));
    let list: Vec<String> =
        procs.iter().take(n).map(|(rss, who)| format!("{who} {} MiB", rss / (1024 * 1024))).collect();
    if list.is_empty() { String::new() } else { format!("; largest consumers: {}", list.join(", ")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    impl Admission {
        /// Admits RAM-only `loads` (model, declared need) plus `headroom` once.
        async fn reserve(&self, service: &str, loads: &[(&str, u64)], headroom: u64) -> Result<(), Refused> {
            let loads =
                loads.iter().map(|(model, ram)| Load { model: (*model).to_owned(), ram: *ram, gpu: 0 }).collect();
            self.admit(service, Ask { loads, headroom, ..Ask::default() }).await.map(|_| ())
        }
    }

    fn no_gpus() -> GpuSource {
        watch::channel(Vec::new()).1
    }

    fn gpu(index: u32, total_mib: u64, used_mib: u64) -> GpuRoom {
        GpuRoom { index, total: total_mib * MIB, used: used_mib * MIB, reserved: 0 }
    }

    fn gpu_ask(model: &str, gpu_mib: u64, pin: GpuPin) -> Ask {
        Ask {
            loads: vec![Load { model: model.into(), ram: MIB, gpu: gpu_mib * MIB }],
            pin: Some(pin),
            ..Ask::default()
        }
    }

    #[tokio::test]
    async fn gpu_loads_go_where_room_is_left_and_are_refused_with_every_device() {
        let (tx, samples) = watch::channel(BTreeMap::new());
        let (gtx, gpus) = watch::channel(vec![gpu(0, 81920, 1000), gpu(1, 81920, 0)]);
        let a = Admission::start(fixed(100_000 * MIB), samples, gpus);
        // Two 40 GB models asked at once never share a device they do not fit on together.
        let first = a.admit("svc-a", gpu_ask("m", 40000, GpuPin::Auto)).await.unwrap();
        let second = a.admit("svc-b", gpu_ask("m", 40000, GpuPin::Auto)).await.unwrap();
        assert_eq!((first.gpus, second.gpus), (vec![1], vec![0]));
        let refused = a.admit("svc-c", gpu_ask("m", 45000, GpuPin::Auto)).await.unwrap_err();
        let text = refused.to_string();
        assert!(text.starts_with("cannot load m on service svc-c: not enough GPU memory: needs 45000 MiB"), "{text}");
        assert!(text.contains("GPU 0: 40920 MiB free of 81920 MiB (1000 MiB used, 40000 MiB reserved)"), "{text}");
        assert!(text.contains("GPU 1: 41920 MiB free of 81920 MiB (0 MiB used, 40000 MiB reserved)"), "{text}");
        // svc-b's load is resident on its GPU: what it owes shrinks by as much.
        tx.send_replace(BTreeMap::from([(
            "svc-b".to_owned(),
            TreeMemory { gpu_bytes: 30000 * MIB, ..Default::default() },
        )]));
        gtx.send_replace(vec![gpu(0, 81920, 31000), gpu(1, 81920, 0)]);
        let standing = a.standing().await;
        assert_eq!(standing.gpus.iter().map(|g| g.reserved / MIB).collect::<Vec<_>>(), [10000, 40000]);
        // Pinned across both: 90000 MiB is 45000 on each, which neither has left.
        let pinned = a.admit("svc-d", gpu_ask("m", 90000, GpuPin::Devices(vec![0, 1]))).await;
        assert!(pinned.unwrap_err().to_string().contains("45000 MiB on each of GPUs 0, 1"));
        a.release("svc-a", "m");
        a.release("svc-b", "m");
        assert_eq!(a.admit("svc-d", gpu_ask("m", 90000, GpuPin::Devices(vec![0, 1]))).await.unwrap().gpus, [0, 1]);
    }

    fn fixed(budget: u64) -> CapacitySource {
        Box::new(move |_| Capacity { mem_available: 100_000 * MIB, cgroup_room: None, budget_room: Some(budget) })
    }

    #[tokio::test]
    async fn two_loads_asked_at_once_cannot_both_take_the_same_memory() {
        let (_tx, samples) = watch::channel(BTreeMap::new());
        let a = Admission::start(fixed(300 * MIB), samples, no_gpus());
        let (first, second) =
            tokio::join!(a.reserve("svc-a", &[("m", 200 * MIB)], 0), a.reserve("svc-b", &[("m", 200 * MIB)], 0));
        assert!(first.is_ok() != second.is_ok(), "exactly one is admitted: {first:?} {second:?}");
        let refused = first.err().or(second.err()).unwrap();
        let text = refused.to_string();
        assert!(text.contains("needs 200 MiB") && text.contains("only 100 MiB is available"), "{text}");
        assert!(text.contains("minus 200 MiB reserved by loads in progress"), "{text}");
        assert!(text.contains("largest consumers: "), "{text}");
        // Once the first load ends, the memory is free again.
        a.release("svc-a", "m");
        a.release("svc-b", "m");
        assert!(a.reserve("svc-c", &[("m", 250 * MIB)], 0).await.is_ok());
    }

    #[test]
    fn a_cgroup_limit_is_a_number_below_2_pow_60() {
        let table = [
            ("4294967296\n", Some(4 << 30)),
            ("max\n", None),
            ("9223372036854771712\n", None),
            ("1152921504606846976", None),
            ("", None),
        ];
        for (text, want) in table {
            assert_eq!(parse_limit(text), want, "{text:?}");
        }
    }

    #[tokio::test]
    async fn a_request_reserves_its_headroom_once() {
        let gib = 1024 * MIB;
        let (_tx, samples) = watch::channel(BTreeMap::new());
        // Room for the three models and one headroom, not three.
        let a = Admission::start(fixed(4 * gib), samples, no_gpus());
        let models = [("a", true), ("b", true), ("c", false)].map(|(name, at_start)| ModelMem {
            name,
            ram: gib,
            gpu: 0,
            at_start,
            loaded: false,
        });
        let asked = ["a".into(), "c".into()];
        let ask = LoadAsk { models: &models, asked: &asked, starting: true, headroom: gib, gpu_headroom: 0, pin: None };
        let admitted = a.reserve_loads("svc", ask).await;
        assert_eq!(admitted.unwrap().models, ["a", "b", "c"]);
        // All of it is held: nothing else fits until a load ends.
        assert!(a.reserve("other", &[("m", MIB)], 0).await.is_err());
    }

    #[tokio::test]
    async fn a_services_growth_counts_once_against_its_loads() {
        let (tx, samples) = watch::channel(BTreeMap::new());
        let a = Admission::start(fixed(10_000 * MIB), samples, no_gpus());
        a.reserve("svc", &[("m1", 600 * MIB), ("m2", 400 * MIB)], 100 * MIB).await.unwrap();
        let grown = |rss: u64| {
            tx.send_replace(BTreeMap::from([(
                "svc".to_owned(),
                TreeMemory { rss_bytes: rss * MIB, ..Default::default() },
            )]))
        };
        let reserved = || async { a.standing().await.reserved / MIB };
        assert_eq!(reserved().await, 1100);
        // 600 MiB resident (say m1's): owed by the loads together, not by each.
        grown(600);
        assert_eq!(reserved().await, 500);
        // m1 ends: m2 and the headroom may still need all that is left.
        a.release("svc", "m1");
        assert_eq!(reserved().await, 500);
        grown(900);
        assert_eq!(reserved().await, 200);
        a.release("svc", "m2");
        assert_eq!(reserved().await, 0);
        // m1 fails before growing at all: what is owed drops to what m2 could need.
        a.reserve("svc", &[("m1", 600 * MIB), ("m2", 400 * MIB)], 0).await.unwrap();
        a.release("svc", "m1");
        assert_eq!(reserved().await, 400);
    }

    #[tokio::test]
    async fn a_reservation_shrinks_as_the_load_becomes_resident() {
        let (tx, samples) = watch::channel(BTreeMap::new());
        let a = Admission::start(fixed(1000 * MIB), samples, no_gpus());
        a.reserve("svc-a", &[("m", 600 * MIB)], 0).await.unwrap();
        assert!(a.reserve("svc-b", &[("m", 600 * MIB)], 0).await.is_err());
        // svc-a's tree grew by 500 MiB: only 100 MiB of its reservation is outstanding.
        tx.send_replace(BTreeMap::from([(
            "svc-a".to_owned(),
            TreeMemory { rss_bytes: 500 * MIB, ..Default::default() },
        )]));
        assert!(a.reserve("svc-b", &[("m", 600 * MIB)], 0).await.is_ok());
    }
}
