//! Shared by the benchmarks: rewriting their own section of
//! docs/benchmarks.md, and naming the machine they ran on.

use std::path::Path;

/// "vm (2 cores)": where the numbers were measured.
pub fn machine() -> String {
    format!(
        "{} ({} cores)",
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

/// Replaces the text between `<!-- {key}:start -->` and `<!-- {key}:end -->`
/// in docs/benchmarks.md with `body` (appending the section if new).
pub fn write_section(key: &str, body: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md");
    let start = format!("<!-- {key}:start -->");
    let end = format!("<!-- {key}:end -->");
    let section = format!("{start}\n{body}\n{end}");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".to_owned());
    let new = match (old.find(&start), old.find(&end)) {
        (Some(a), Some(b)) => format!("{}{section}{}", &old[..a], &old[b + end.len()..]),
        _ => format!("{}\n\n{section}\n", old.trim_end()),
    };
    std::fs::write(&path, new).expect("write docs/benchmarks.md");
    eprintln!("wrote {}", path.display());
}
