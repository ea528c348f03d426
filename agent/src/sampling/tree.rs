//! A service's process tree: its members — walked down from the service's
//! root through `/proc/<pid>/task/<tid>/children`, so sampling never scans
//! every process of the host (or, on kernels without those files, found in
//! the host's process list) — and their RSS, CPU time and I/O bytes from
//! `/proc`.

use std::collections::HashMap;

/// Whether this kernel lists each task's children (CONFIG_PROC_CHILDREN).
pub fn children_listed() -> bool {
    let me = std::process::id();
    std::path::Path::new(&format!("/proc/{me}/task/{me}/children")).exists()
}

/// The children of every task (thread) of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| text.split_whitespace().filter_map(|c| c.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

/// `root` and all its descendants, walked down from `root` (no full scan).
pub fn descendants(root: u32) -> Vec<u32> {
    if !std::path::Path::new(&format!("/proc/{root}")).exists() {
        return Vec::new();
    }
    let (mut members, mut stack) = (Vec::new(), vec![root]);
    while let Some(pid) = stack.pop() {
        if members.contains(&pid) {
            continue;
        }
        members.push(pid);
        stack.extend(children(pid));
    }
    members
}

/// Resident memory of one process (`VmRSS` of `/proc/<pid>/status`; 0 if gone).
pub fn rss_bytes(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Indices into `procs` of `root` and all its descendants.
pub fn tree(procs: &[(u32, Option<u32>, u64)], root: u32) -> Vec<usize> {
    let mut children: HashMap<u32, Vec<usize>> = HashMap::new();
    let mut root_index = None;
    for (i, (pid, parent, _)) in procs.iter().enumerate() {
        if *pid == root {
            root_index = Some(i);
        }
        if let Some(p) = parent {
            children.entry(*p).or_default().push(i);
        }
    }
    let Some(start) = root_index else { return Vec::new() };
    let (mut members, mut stack) = (Vec::new(), vec![start]);
    while let Some(i) = stack.pop() {
        members.push(i);
        if let Some(kids) = children.get(&procs[i].0) {
            stack.extend(kids.iter().copied());
        }
    }
    members
}

/// Clock ticks per second in `/proc/<pid>/stat` (USER_HZ): 100 on every
/// mainstream Linux architecture.
const USER_HZ: u64 = 100;

/// CPU milliseconds (utime + stime) of one process, from `/proc/<pid>/stat`.
pub fn cpu_ms(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // The command name may contain spaces; fields after it start at ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after ')'.
    (ticks(11) + ticks(12)) * 1000 / USER_HZ
}

/// `rchar + wchar` of one process, from `/proc/<pid>/io` (0 if unreadable).
pub fn io_bytes(pid: u32) -> u64 {
    let Ok(io) = std::fs::read_to_string(format!("/proc/{pid}/io")) else { return 0 };
    io.lines()
        .filter_map(|l| l.strip_prefix("rchar:").or_else(|| l.strip_prefix("wchar:")))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_whole_tree_and_nothing_else() {
        let procs = [
            (1, None, 1000),
            (10, Some(1), 100),  // root
            (11, Some(10), 20),  // child
            (12, Some(11), 3),   // grandchild
            (20, Some(1), 5000), // unrelated
        ];
        let rss = |root| tree(&procs, root).iter().map(|i| procs[*i].2).sum::<u64>();
        assert_eq!(rss(10), 123);
        assert_eq!(tree(&procs, 10).len(), 3);
        assert_eq!(rss(99), 0);
    }

    #[test]
    fn walking_down_from_a_root_finds_its_children_and_grandchildren() {
        // sh → sh → sleep: the middle one says "ready" once the grandchild is forked.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sh -c 'sleep 30 & echo ready; wait' & wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        let root = child.id();
        let members = descendants(root);
        let rss: Vec<u64> = members.iter().map(|p| rss_bytes(*p)).collect();
        for p in members.iter().rev() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p as i32), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = child.wait();
        assert_eq!(line.trim(), "ready");
        assert_eq!(members.len(), 3, "{members:?}");
        assert_eq!(members[0], root);
        assert!(rss.iter().all(|b| *b > 0), "{rss:?}");
        assert!(children_listed());
        assert!(descendants(u32::MAX).is_empty());
    }
}
