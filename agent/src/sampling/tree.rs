//! A service's process tree from the host's process list: its members,
//! and their CPU time and I/O bytes from `/proc`.

use std::collections::HashMap;

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
}
