//! Test hosts as network namespaces joined to the root namespace by veth
//! pairs: an agent and its services run inside (`nsenter --net`, which keeps
//! /sys/fs/cgroup visible where `ip netns exec` would remount /sys), the
//! controller stays in the test process. Names and subnets are unique per
//! test process; stale ones from dead test processes are swept first; all is
//! removed on drop, failures included. Partitions are blackhole routes on
//! both sides (no netem or iptables needed).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// One host: a namespace with an address reachable from the root namespace.
#[derive(Debug)]
pub struct Host {
    pub ns: String,
    /// The host's address (inside its namespace).
    pub ip: String,
    /// The root namespace's address on the link to it.
    pub gateway: String,
    veth: String,
}

impl Host {
    /// Cuts the link both ways with blackhole routes.
    pub fn partition(&self) -> Result<(), String> {
        ip(&["route", "add", "blackhole", &format!("{}/32", self.ip)])?;
        ip(&["netns", "exec", &self.ns, "ip", "route", "add", "blackhole", &format!("{}/32", self.gateway)])
    }

    pub fn heal(&self) -> Result<(), String> {
        ip(&["route", "del", "blackhole", &format!("{}/32", self.ip)])?;
        ip(&["netns", "exec", &self.ns, "ip", "route", "del", "blackhole", &format!("{}/32", self.gateway)])
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = ip(&["route", "del", "blackhole", &format!("{}/32", self.ip)]);
        let _ = ip(&["link", "del", &self.veth]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

fn prefix(pid: u32) -> String {
    format!("pt{pid}x")
}

/// Removes namespaces and links left by test processes that no longer run.
fn sweep() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name.strip_prefix("pt").and_then(|r| r.split('x').next()).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
            let _ = ip(&["link", "del", &name.replace('h', "r")]);
        }
    }
}

/// Creates a new host namespace with its own /24 and a veth to the root.
pub fn host() -> Result<Host, String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    sweep();
    let pid = std::process::id();
    let k = NEXT.fetch_add(1, Ordering::SeqCst);
    let ns = format!("{}h{k}", prefix(pid));
    let veth = format!("{}r{k}", prefix(pid));
    let inner = format!("{}n{k}", prefix(pid));
    // 10.<100..199>.<k>.0/24, the second octet from the pid so parallel test
    // processes do not collide.
    let net = format!("10.{}.{}", 100 + pid % 100, k % 250);
    let (gateway, addr) = (format!("{net}.1"), format!("{net}.2"));
    ip(&["netns", "add", &ns])?;
    let host = Host { ns: ns.clone(), ip: addr.clone(), gateway: gateway.clone(), veth: veth.clone() };
    ip(&["link", "add", &veth, "type", "veth", "peer", "name", &inner])?;
    ip(&["link", "set", &inner, "netns", &ns])?;
    ip(&["addr", "add", &format!("{gateway}/24"), "dev", &veth])?;
    ip(&["link", "set", &veth, "up"])?;
    ip(&["netns", "exec", &ns, "ip", "addr", "add", &format!("{addr}/24"), "dev", &inner])?;
    ip(&["netns", "exec", &ns, "ip", "link", "set", &inner, "up"])?;
    ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
    Ok(host)
}
