//! Memory admission on the agent: one actor owns the reservations of loads
//! admitted and still running, so two loads asked for at once are judged one
//! after the other and cannot both take the same memory. What a request
//! brings in is `proto::admission::load_need` and whether it fits is
//! `proto::admission::admit`, both shared with the controller's placement;
//! a request is admitted whole, with its headroom once.

use std::collections::BTreeMap;

use proto::admission::{self, Capacity, ModelMem, Refusal};
use tokio::sync::{mpsc, oneshot, watch};

use crate::sampling::TreeMemory;

/// Reads the host's capacity now; injectable for tests.
pub type CapacitySource = Box<dyn Fn(&BTreeMap<String, TreeMemory>) -> Capacity + Send>;

#[derive(Debug, thiserror::Error)]
#[error("cannot load {} on service {service}: {refusal}{consumers}", .models.join(", "))]
pub struct Refused {
    pub service: String,
    /// Every model the refused request would have loaded.
    pub models: Vec<String>,
    pub refusal: Refusal,
    /// ", largest consumers: …" or empty.
    pub consumers: String,
}

/// What the loads admitted on one service still owe. Kept per service, not
/// per model, because only the service's RSS is measured: its growth is
/// memory some load now holds and must count once, not against every load.
#[derive(Debug, Default)]
struct Held {
    /// Declared needs of the models still loading.
    models: BTreeMap<String, u64>,
    /// Headroom of the requests that admitted them, held until they all end.
    headroom: u64,
    /// Bytes owed as of `rss_mark`.
    owed: u64,
    /// The service's RSS when `owed` was last settled.
    rss_mark: u64,
}

impl Held {
    fn outstanding(&self, rss: u64) -> u64 {
        self.owed.saturating_sub(rss.saturating_sub(self.rss_mark))
    }

    fn settle(&mut self, rss: u64) {
        self.owed = self.outstanding(rss);
        self.rss_mark = rss;
    }

    fn add(&mut self, loads: &[(String, u64)], headroom: u64, rss: u64) {
        self.settle(rss);
        self.models.extend(loads.iter().cloned());
        self.owed += loads.iter().map(|(_, need)| need).sum::<u64>() + headroom;
        self.headroom += headroom;
    }

    /// Which model's load the growth so far was is unknown, so what is still
    /// owed is capped at what the remaining loads could need, never below.
    fn remove(&mut self, model: &str, rss: u64) {
        self.settle(rss);
        if self.models.remove(model).is_some() {
            self.owed = self.owed.min(self.models.values().sum::<u64>() + self.headroom);
        }
    }
}

enum Command {
    Reserve { service: String, loads: Vec<(String, u64)>, headroom: u64, reply: oneshot::Sender<Result<(), Refused>> },
    Release { service: String, model: String },
    Capacity { reply: oneshot::Sender<(Capacity, u64)> },
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
    pub fn start(source: CapacitySource, samples: watch::Receiver<BTreeMap<String, TreeMemory>>) -> Admission {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(source, samples, rx));
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

    /// Admits the loads a request for `asked` starts on `service`
    /// (`load_need`), all or none. Returns the models admitted; each is
    /// released when its load ends.
    pub async fn reserve_loads(
        &self,
        service: &str,
        models: &[ModelMem<'_>],
        asked: &[String],
        starting: bool,
        headroom: u64,
    ) -> Result<Vec<String>, Refused> {
        let need = admission::load_need(models, asked, starting, headroom);
        let loads: Vec<(&str, u64)> =
            models.iter().filter(|m| need.models.contains(&m.name)).map(|m| (m.name, m.ram)).collect();
        self.reserve(service, &loads, need.headroom).await?;
        Ok(loads.iter().map(|(name, _)| (*name).to_owned()).collect())
    }

    /// Admits `loads` (model, declared need) plus `headroom` once, as one
    /// decision. Models already reserved are skipped; if none is left there
    /// is nothing to admit.
    pub async fn reserve(&self, service: &str, loads: &[(&str, u64)], headroom: u64) -> Result<(), Refused> {
        let (reply, rx) = oneshot::channel();
        let loads = loads.iter().map(|(name, need)| ((*name).to_owned(), *need)).collect();
        let cmd = Command::Reserve { service: service.into(), loads, headroom, reply };
        if self.tx.send(cmd).is_err() {
            return Ok(());
        }
        rx.await.unwrap_or(Ok(()))
    }

    /// The host's capacity now and the memory reserved by loads in progress,
    /// as `admit` would see them (for GetInfo, so controllers place alike).
    pub async fn capacity(&self) -> (Capacity, u64) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Capacity { reply }).is_err() {
            return (Capacity::default(), 0);
        }
        rx.await.unwrap_or_default()
    }

    /// The load ended (ready, failed or stopped): its reservation is freed.
    pub fn release(&self, service: &str, model: &str) {
        let _ = self.tx.send(Command::Release { service: service.into(), model: model.into() });
    }
}

async fn run(
    source: CapacitySource,
    samples: watch::Receiver<BTreeMap<String, TreeMemory>>,
    mut rx: mpsc::UnboundedReceiver<Command>,
) {
    let mut held: BTreeMap<String, Held> = BTreeMap::new();
    while let Some(cmd) = rx.recv().await {
        let now = samples.borrow().clone();
        let rss = |s: &str| now.get(s).map_or(0, |m| m.rss_bytes);
        match cmd {
            Command::Release { service, model } => {
                if let Some(h) = held.get_mut(&service) {
                    h.remove(&model, rss(&service));
                    if h.models.is_empty() {
                        held.remove(&service);
                    }
                }
            }
            Command::Capacity { reply } => {
                let _ = reply.send((source(&now), reserved(&held, &now)));
            }
            Command::Reserve { service, mut loads, headroom, reply } => {
                let result =
                    admit_request(&mut held, &source, &now, &service, &mut loads, headroom).map_err(|refusal| {
                        let models = loads.into_iter().map(|(model, _)| model).collect();
                        Refused { service, models, refusal, consumers: largest_consumers(3) }
                    });
                let _ = reply.send(result);
            }
        }
    }
}

/// Admits one request's loads as one decision, headroom once. Loads already
/// held are dropped from `loads` first: re-reserving a model is a no-op.
fn admit_request(
    held: &mut BTreeMap<String, Held>,
    source: &CapacitySource,
    now: &BTreeMap<String, TreeMemory>,
    service: &str,
    loads: &mut Vec<(String, u64)>,
    headroom: u64,
) -> Result<(), Refusal> {
    if let Some(h) = held.get(service) {
        loads.retain(|(model, _)| !h.models.contains_key(model));
    }
    if loads.is_empty() {
        return Ok(());
    }
    let need = loads.iter().map(|(_, need)| need).sum();
    admission::admit(need, headroom, source(now), reserved(held, now))?;
    let rss = now.get(service).map_or(0, |m| m.rss_bytes);
    held.entry(service.to_owned()).or_default().add(loads, headroom, rss);
    Ok(())
}

/// Memory still owed to admitted loads, all services together.
fn reserved(held: &BTreeMap<String, Held>, now: &BTreeMap<String, TreeMemory>) -> u64 {
    held.iter().map(|(svc, h)| h.outstanding(now.get(svc).map_or(0, |m| m.rss_bytes))).sum()
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
    let mut procs: Vec<(u64, String)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
        let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_owned());
        let rss = field("VmRSS:").and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok()).unwrap_or(0);
        let name = field("Name:").unwrap_or_default();
        procs.push((rss * 1024, format!("{name} ({pid})")));
    }
    procs.sort_by_key(|p| std::cmp::Reverse(p.0));
    let list: Vec<String> =
        procs.iter().take(n).map(|(rss, who)| format!("{who} {} MiB", rss / (1024 * 1024))).collect();
    if list.is_empty() { String::new() } else { format!("; largest consumers: {}", list.join(", ")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn fixed(budget: u64) -> CapacitySource {
        Box::new(move |_| Capacity { mem_available: 100_000 * MIB, cgroup_room: None, budget_room: Some(budget) })
    }

    #[tokio::test]
    async fn two_loads_asked_at_once_cannot_both_take_the_same_memory() {
        let (_tx, samples) = watch::channel(BTreeMap::new());
        let a = Admission::start(fixed(300 * MIB), samples);
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
        let a = Admission::start(fixed(4 * gib), samples);
        let models = [("a", true), ("b", true), ("c", false)].map(|(name, at_start)| ModelMem {
            name,
            ram: gib,
            at_start,
            loaded: false,
        });
        let admitted = a.reserve_loads("svc", &models, &["a".into(), "c".into()], true, gib).await;
        assert_eq!(admitted.unwrap(), ["a", "b", "c"]);
        // All of it is held: nothing else fits until a load ends.
        assert!(a.reserve("other", &[("m", MIB)], 0).await.is_err());
    }

    #[tokio::test]
    async fn a_services_growth_counts_once_against_its_loads() {
        let (tx, samples) = watch::channel(BTreeMap::new());
        let a = Admission::start(fixed(10_000 * MIB), samples);
        a.reserve("svc", &[("m1", 600 * MIB), ("m2", 400 * MIB)], 100 * MIB).await.unwrap();
        let grown = |rss: u64| {
            tx.send_replace(BTreeMap::from([(
                "svc".to_owned(),
                TreeMemory { rss_bytes: rss * MIB, ..Default::default() },
            )]))
        };
        let reserved = || async { a.capacity().await.1 / MIB };
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
        let a = Admission::start(fixed(1000 * MIB), samples);
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
