//! Memory admission on the agent: one actor owns the reservations of loads
//! admitted and still running, so two loads asked for at once are judged one
//! after the other and cannot both take the same memory. The decision itself
//! is `proto::admission::admit`, the same function the controller uses.

use std::collections::BTreeMap;

use proto::admission::{self, Capacity, Refusal};
use tokio::sync::{mpsc, oneshot, watch};

use crate::sampling::TreeMemory;

/// Reads the host's capacity now; injectable for tests.
pub type CapacitySource = Box<dyn Fn(&BTreeMap<String, TreeMemory>) -> Capacity + Send>;

#[derive(Debug, thiserror::Error)]
#[error("cannot load {model} on service {service}: {refusal}{consumers}")]
pub struct Refused {
    pub service: String,
    pub model: String,
    pub refusal: Refusal,
    /// ", largest consumers: …" or empty.
    pub consumers: String,
}

struct Reservation {
    need: u64,
    /// The service's RSS when the load was admitted: growth since counts
    /// against the reservation, since it is memory the load now holds.
    rss_at_admission: u64,
}

enum Command {
    Reserve { service: String, model: String, need: u64, headroom: u64, reply: oneshot::Sender<Result<(), Refused>> },
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

    /// Admits a load or says why not. Re-reserving the same model is a no-op.
    pub async fn reserve(&self, service: &str, model: &str, need: u64, headroom: u64) -> Result<(), Refused> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Reserve { service: service.into(), model: model.into(), need, headroom, reply };
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
    let mut held: BTreeMap<(String, String), Reservation> = BTreeMap::new();
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Command::Release { service, model } => {
                held.remove(&(service, model));
            }
            Command::Capacity { reply } => {
                let now = samples.borrow().clone();
                let _ = reply.send((source(&now), reserved(&held, &now)));
            }
            Command::Reserve { service, model, need, headroom, reply } => {
                let key = (service.clone(), model.clone());
                if held.contains_key(&key) {
                    let _ = reply.send(Ok(()));
                    continue;
                }
                let now = samples.borrow().clone();
                let rss = |s: &str| now.get(s).map_or(0, |m| m.rss_bytes);
                let result = match admission::admit(need, headroom, source(&now), reserved(&held, &now)) {
                    Ok(_) => {
                        held.insert(key, Reservation { need: need + headroom, rss_at_admission: rss(&service) });
                        Ok(())
                    }
                    Err(refusal) => Err(Refused { service, model, refusal, consumers: largest_consumers(3) }),
                };
                let _ = reply.send(result);
            }
        }
    }
}

/// Memory still owed to admitted loads: each reservation less what its
/// service's tree has grown by since.
fn reserved(held: &BTreeMap<(String, String), Reservation>, now: &BTreeMap<String, TreeMemory>) -> u64 {
    let rss = |s: &str| now.get(s).map_or(0, |m| m.rss_bytes);
    held.iter().map(|((svc, _), r)| r.need.saturating_sub(rss(svc).saturating_sub(r.rss_at_admission))).sum()
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

/// `limit - usage` of this process's memory cgroup (v2, else v1), if limited.
fn cgroup_room() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read = |path: String| std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse::<u64>().ok());
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            let dir = format!("/sys/fs/cgroup/memory{path}");
            let limit = read(format!("{dir}/memory.limit_in_bytes"))?;
            // v1 reports "no limit" as a huge number.
            if limit >= (1 << 60) {
                return None;
            }
            return Some(limit.saturating_sub(read(format!("{dir}/memory.usage_in_bytes")).unwrap_or(0)));
        }
        if controllers.is_empty() {
            let dir = format!("/sys/fs/cgroup{path}");
            if let Some(limit) = read(format!("{dir}/memory.max")) {
                return Some(limit.saturating_sub(read(format!("{dir}/memory.current")).unwrap_or(0)));
            }
        }
    }
    None
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
            tokio::join!(a.reserve("svc-a", "m", 200 * MIB, 0), a.reserve("svc-b", "m", 200 * MIB, 0));
        assert!(first.is_ok() != second.is_ok(), "exactly one is admitted: {first:?} {second:?}");
        let refused = first.err().or(second.err()).unwrap();
        let text = refused.to_string();
        assert!(text.contains("needs 200 MiB") && text.contains("only 100 MiB is available"), "{text}");
        assert!(text.contains("minus 200 MiB reserved by loads in progress"), "{text}");
        assert!(text.contains("largest consumers: "), "{text}");
        // Once the first load ends, the memory is free again.
        a.release("svc-a", "m");
        a.release("svc-b", "m");
        assert!(a.reserve("svc-c", "m", 250 * MIB, 0).await.is_ok());
    }

    #[tokio::test]
    async fn a_reservation_shrinks_as_the_load_becomes_resident() {
        let (tx, samples) = watch::channel(BTreeMap::new());
        let a = Admission::start(fixed(1000 * MIB), samples);
        a.reserve("svc-a", "m", 600 * MIB, 0).await.unwrap();
        assert!(a.reserve("svc-b", "m", 600 * MIB, 0).await.is_err());
        // svc-a's tree grew by 500 MiB: only 100 MiB of its reservation is outstanding.
        tx.send_replace(BTreeMap::from([(
            "svc-a".to_owned(),
            TreeMemory { rss_bytes: 500 * MIB, ..Default::default() },
        )]));
        assert!(a.reserve("svc-b", "m", 600 * MIB, 0).await.is_ok());
    }
}
