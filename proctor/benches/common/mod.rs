//! Shared by the benchmarks: rewriting their own section of
//! docs/benchmarks.md, naming the machine they ran on, and starting an
//! agent from a config.
// Each benchmark uses some of these.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};

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

/// An agent config supervising one `proctor sim` (`bin`) with an NLLB-like
/// model that loads in 200 ms.
pub fn one_sim_config(bin: &str, dir: &Path) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[service]]\nname = \"translation\"\ncommand = [\"{bin}\", \
         \"sim\", \"--port\", \"{{port}}\", \"--model\", \"nllb:mb=8,load=200ms\"]\n[[service.model]]\nname = \"nllb\"\n",
        dir.join("data").display()
    )
}

/// Starts `bin agent` on `config` (written to `dir/agent.toml`): the child
/// and the address it listens on (from its first line).
pub fn start_agent(bin: &str, dir: &Path, config: &str) -> (Child, String) {
    std::fs::write(dir.join("agent.toml"), config).unwrap();
    let mut agent = Command::new(bin)
        .args(["agent", "--config"])
        .arg(dir.join("agent.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(agent.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split_whitespace().find(|w| w.contains(':') && w.starts_with("127.")).unwrap().to_owned();
    (agent, addr)
}
