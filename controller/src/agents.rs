//! `proctor agents`: what each host of the inventory offers right now —
//! reachable or not, memory, services, models and their stages, who holds
//! each lease, and how long since the agent's last heartbeat.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::client::{Agent, format_unix_ms};
use crate::inventory;
use crate::run::Exit;

#[derive(Clone, Debug)]
pub struct AgentsOptions {
    pub inventory: Option<PathBuf>,
    pub agents: Vec<String>,
    /// How to reach them (`--ca`, `--cert`, `--key`, `--token-file`).
    pub access: inventory::Access,
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct HostReport {
    pub name: String,
    pub address: String,
    pub labels: Vec<String>,
    pub reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentReport>,
}

#[derive(Debug, Serialize)]
pub struct AgentReport {
    pub version: String,
    pub incarnation: String,
    pub hostname: String,
    pub ram_total_bytes: u64,
    pub ram_available_bytes: u64,
    pub ram_reserved_bytes: u64,
    pub memory_budget_bytes: Option<u64>,
    /// `null`: no NVML on this host (GPU sampling off).
    pub gpus: Option<Vec<crate::client::GpuView>>,
    pub cgroups: bool,
    /// Milliseconds since the agent's last heartbeat, by its own clock.
    pub heartbeat_age_ms: Option<i64>,
    pub services: Vec<ServiceReport>,
}

#[derive(Debug, Serialize)]
pub struct ServiceReport {
    pub name: String,
    pub running: bool,
    pub pid: u32,
    pub rss_bytes: u64,
    pub gpu_bytes: u64,
    pub models: Vec<ModelReport>,
    pub lease: Option<LeaseReport>,
}

#[derive(Debug, Serialize)]
pub struct ModelReport {
    pub name: String,
    pub stage: String,
    pub progress: f64,
    pub ram_need_bytes: u64,
    /// How long its current stage usually takes on this host, and the time
    /// left until READY by that measure (the agent's load history).
    pub usual_stage_ms: Option<u64>,
    pub eta_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct LeaseReport {
    pub run_id: String,
    pub holder: String,
    pub since: String,
    pub epoch: u64,
    /// When it lapses unless renewed (agent clock, UTC).
    pub expires: String,
}

async fn inspect(entry: inventory::Entry) -> HostReport {
    let mut host = HostReport {
        name: entry.name.clone(),
        address: entry.address.clone(),
        labels: entry.labels.clone(),
        reachable: false,
        error: None,
        agent: None,
    };
    let agent = match Agent::connect_with(&entry, crate::client::Keepalive::default()).await {
        Ok(a) => a,
        Err(e) => {
            host.error = Some(e.to_string());
            return host;
        }
    };
    let snapshot = match agent.snapshot().await {
        Ok(s) => s,
        Err(e) => {
            host.error = Some(e.to_string());
            return host;
        }
    };
    let info = &agent.info;
    let services = snapshot
        .services
        .iter()
        .map(|s| ServiceReport {
            name: s.name.clone(),
            running: s.running,
            pid: s.pid,
            rss_bytes: s.rss_bytes,
            gpu_bytes: s.gpu_bytes,
            models: s
                .models
                .iter()
                .map(|(name, m)| ModelReport {
                    usual_stage_ms: m.usual.map(|u| u.stage.as_millis() as u64),
                    eta_ms: m.usual.map(|u| {
                        let in_stage = Duration::from_millis((info.now_unix_ms - m.since_unix_ms).max(0) as u64);
                        (u.stage.saturating_sub(in_stage) + u.rest).as_millis() as u64
                    }),
                    name: name.clone(),
                    stage: m.stage.label().to_owned(),
                    progress: m.progress,
                    ram_need_bytes: info
                        .services
                        .iter()
                        .find(|x| x.name == s.name)
                        .and_then(|x| x.models.iter().find(|y| y.name == *name))
                        .map_or(0, |y| y.ram_need),
                })
                .collect(),
            lease: snapshot.leases.get(&s.name).map(|l| LeaseReport {
                run_id: l.run_id.clone(),
                holder: l.holder.clone(),
                since: l.since.clone(),
                epoch: l.epoch,
                expires: format_unix_ms(l.expires_unix_ms),
            }),
        })
        .collect();
    host.reachable = true;
    host.agent = Some(AgentReport {
        version: info.version.clone(),
        incarnation: info.incarnation.clone(),
        hostname: info.hostname.clone(),
        ram_total_bytes: info.ram_total,
        ram_available_bytes: info.ram_available,
        ram_reserved_bytes: info.reserved,
        memory_budget_bytes: info.memory_budget,
        gpus: info.nvml.then(|| snapshot.gpus.clone()),
        cgroups: info.cgroups,
        heartbeat_age_ms: (snapshot.heartbeat_unix_ms > 0).then(|| info.now_unix_ms - snapshot.heartbeat_unix_ms),
        services,
    });
    host
}

fn mib(b: u64) -> u64 {
    b / (1024 * 1024)
}

/// "n/a" without NVML, else each GPU's memory and utilisation.
fn gpus_text(gpus: Option<&[crate::client::GpuView]>) -> String {
    match gpus {
        None => "n/a".to_owned(),
        Some([]) => "none found".to_owned(),
        Some(list) => list
            .iter()
            .map(|g| {
                format!(
                    "{} {}: {}/{} MiB used, {}%",
                    g.index,
                    g.name,
                    mib(g.used_bytes),
                    mib(g.total_bytes),
                    g.utilization_percent
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// The human-readable table.
pub fn render(hosts: &[HostReport]) -> String {
    let mut out = String::new();
    for h in hosts {
        let labels = if h.labels.is_empty() { String::new() } else { format!(" [{}]", h.labels.join(", ")) };
        let Some(a) = &h.agent else {
            out.push_str(&format!(
                "{} ({}){labels}: UNREACHABLE: {}\n",
                h.name,
                h.address,
                h.error.as_deref().unwrap_or("")
            ));
            continue;
        };
        let heartbeat = a
            .heartbeat_age_ms
            .map_or("no heartbeat yet".to_owned(), |ms| format!("heartbeat {:.1}s ago", ms as f64 / 1000.0));
        out.push_str(&format!(
            "{} ({}){labels}: agent {} on {}, RAM {} MiB available of {} MiB ({} MiB reserved){}, GPU {}, cgroups {}, {heartbeat}\n",
            h.name,
            h.address,
            a.version,
            a.hostname,
            mib(a.ram_available_bytes),
            mib(a.ram_total_bytes),
            mib(a.ram_reserved_bytes),
            a.memory_budget_bytes.map_or(String::new(), |b| format!(", budget {} MiB", mib(b))),
            gpus_text(a.gpus.as_deref()),
            if a.cgroups { "on" } else { "off" },
        ));
        for s in &a.services {
            let state = if s.running {
                let gpu = if a.gpus.is_some() { format!(", gpu {} MiB", mib(s.gpu_bytes)) } else { String::new() };
                format!("running (pid {}, rss {} MiB{gpu})", s.pid, mib(s.rss_bytes))
            } else {
                "stopped".to_owned()
            };
            let lease = s.lease.as_ref().map_or("free".to_owned(), |l| {
                format!(
                    "held by run {} ({}) since {}, epoch {}, expires {}",
                    l.run_id, l.holder, l.since, l.epoch, l.expires
                )
            });
            out.push_str(&format!("  service {}: {state}; lease {lease}\n", s.name));
            for m in &s.models {
                let eta = match (m.usual_stage_ms, m.eta_ms) {
                    (Some(u), Some(e)) => {
                        format!(", usually {:.1}s here, ETA {:.1}s", u as f64 / 1000.0, e as f64 / 1000.0)
                    }
                    _ => String::new(),
                };
                out.push_str(&format!(
                    "    {:<16} {:<16} {:>4.0}%  needs {} MiB{eta}\n",
                    m.name,
                    m.stage,
                    m.progress * 100.0,
                    mib(m.ram_need_bytes)
                ));
            }
        }
    }
    out
}

/// Prints every host; exit 0 when all are reachable, 2 when one is not.
pub async fn agents(opts: AgentsOptions) -> Exit {
    let entries = match inventory::load(opts.inventory.as_deref(), &opts.agents, &opts.access) {
        Ok(e) if !e.is_empty() => e,
        Ok(_) => {
            eprintln!("error: no agents given: pass --agent HOST:PORT (repeatable) or --inventory FILE");
            return Exit::BadInput;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return Exit::BadInput;
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (i, e) in entries.into_iter().enumerate() {
        tasks.spawn(async move { (i, inspect(e).await) });
    }
    let mut hosts = Vec::new();
    while let Some(Ok(h)) = tasks.join_next().await {
        hosts.push(h);
    }
    hosts.sort_by_key(|(i, _)| *i);
    let hosts: Vec<HostReport> = hosts.into_iter().map(|(_, h)| h).collect();
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&hosts).unwrap_or_default());
    } else {
        print!("{}", render(&hosts));
    }
    if hosts.iter().all(|h| h.reachable) { Exit::Passed } else { Exit::Infrastructure }
}
