//! The service process itself: spawning it in its own process group with a
//! filtered environment and captured output, stopping its group, and
//! explaining how it ended.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use proto::{ExitKind, ExitStatus};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Internal;
use crate::config::ServiceConfig;

/// How long to wait, after the service exits, for its last output lines.
const OUTPUT_DRAIN: Duration = Duration::from_millis(500);
/// How long to wait for a killed process group to vanish.
const GROUP_EXIT_DEADLINE: Duration = Duration::from_secs(5);

/// A spawned service: its PID (also its process group) and where it listens.
pub(super) struct Spawned {
    pub pid: u32,
    pub base_url: String,
}

/// Starts the service; its output goes to `<data_dir>/<service>.log` and, a
/// line at a time, to `tx`; its exit arrives on `tx` after its last lines.
pub(super) fn spawn(
    cfg: &ServiceConfig,
    data_dir: &Path,
    generation: u64,
    tx: &mpsc::UnboundedSender<Internal>,
) -> Result<Spawned, String> {
    let port = if cfg.port == 0 {
        free_port().map_err(|e| format!("cannot pick a free port for service {}: {e}", cfg.name))?
    } else {
        cfg.port
    };
    let subst = |s: &str| s.replace("{port}", &port.to_string());
    let argv: Vec<String> = cfg.command.iter().map(|a| subst(a)).collect();
    let mut command = tokio::process::Command::new(&argv[0]);
    command.args(&argv[1..]).env_clear();
    // The service sees only what its config names, plus the basics.
    for key in ["PATH", "HOME", "LANG", "TZ"] {
        if let Ok(v) = std::env::var(key) {
            command.env(key, v);
        }
    }
    let env: BTreeMap<&String, String> = cfg.env.iter().map(|(k, v)| (k, subst(v))).collect();
    command.envs(env);
    for (k, path) in &cfg.secrets {
        let value = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read secret {k} from {}: {e}", path.display()))?;
        command.env(k, value.trim());
    }
    if let Some(dir) = &cfg.workdir {
        command.current_dir(dir);
    }
    command.process_group(0).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|e| {
        let dir = cfg.workdir.as_ref().map(|d| format!(" in {}", d.display())).unwrap_or_default();
        format!("cannot start service {}: command {argv:?}{dir}: {e}", cfg.name)
    })?;
    let pid = child.id().ok_or("the service exited before its PID could be read")?;

    std::fs::create_dir_all(data_dir).ok();
    let log_path = data_dir.join(format!("{}.log", cfg.name));
    let log_file =
        std::fs::OpenOptions::new().create(true).append(true).open(&log_path).ok().map(|f| Arc::new(Mutex::new(f)));
    let mut readers = Vec::new();
    for (stream, reader) in [
        ("stdout", child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>)),
        ("stderr", child.stderr.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>)),
    ] {
        let Some(reader) = reader else { continue };
        let tx = tx.clone();
        let file = log_file.clone();
        readers.push(tokio::spawn(async move {
            let mut lines = BufReader::new(reader).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(f) = &file {
                    let _ = writeln!(f.lock().expect("log file lock"), "{line}");
                }
                if tx.send(Internal::Log { generation, stream, line }).is_err() {
                    return;
                }
            }
        }));
    }
    let tx = tx.clone();
    tokio::spawn(async move {
        let status = child.wait().await;
        // Let the last lines it printed (often the reason it died) arrive
        // first. A child still holding the pipes would keep them open, so
        // the wait is bounded.
        let _ = tokio::time::timeout(OUTPUT_DRAIN, async {
            for r in readers {
                let _ = r.await;
            }
        })
        .await;
        let _ = tx.send(Internal::Exited { generation, status });
    });
    Ok(Spawned { pid, base_url: subst(&cfg.base_url) })
}

/// Sends `signal` to the whole process group led by `pgid`.
pub(super) fn signal_group(pgid: u32, signal: Signal) {
    let _ = killpg(Pid::from_raw(pgid as i32), signal);
}

/// SIGKILLs what is left of a process group and waits for it to be empty.
pub(super) async fn kill_group(pgid: u32) -> bool {
    let group = Pid::from_raw(-(pgid as i32));
    signal_group(pgid, Signal::SIGKILL);
    let deadline = Instant::now() + GROUP_EXIT_DEADLINE;
    while Instant::now() < deadline {
        if kill(group, None).is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Explains an exit. `stop` is `Some(escalated)` when the agent stopped it.
pub fn classify(status: Option<std::process::ExitStatus>, stop: Option<bool>) -> ExitStatus {
    let (code, signal) = status.map_or((None, None), |s| (s.code(), s.signal()));
    let kind = match (stop, code, signal) {
        (Some(true), _, _) => ExitKind::KilledAfterGrace,
        (Some(false), _, _) => ExitKind::StoppedGracefully,
        (None, Some(0), _) => ExitKind::Clean,
        (None, Some(_), _) => ExitKind::Crashed,
        (None, None, Some(_)) => ExitKind::Signaled,
        (None, None, None) => ExitKind::Unknown,
    };
    ExitStatus { kind: kind.into(), code: code.unwrap_or(0), signal: signal.unwrap_or(0) }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::ExitStatus as Std;

    #[test]
    fn classifies_every_exit() {
        // Raw wait statuses: exit code in the high byte, signal in the low bits.
        let exited = |code: i32| Some(Std::from_raw(code << 8));
        let signaled = |sig: i32| Some(Std::from_raw(sig));
        let table = [
            (exited(0), None, "CLEAN"),
            (exited(3), None, "CRASHED(3)"),
            (signaled(9), None, "SIGNALED(9)"),
            (exited(0), Some(false), "STOPPED_GRACEFULLY"),
            (signaled(15), Some(false), "STOPPED_GRACEFULLY"),
            (signaled(9), Some(true), "KILLED_AFTER_GRACE"),
            (None, None, "UNKNOWN"),
        ];
        for (status, stop, want) in table {
            assert_eq!(classify(status, stop).to_string(), want, "{status:?} {stop:?}");
        }
    }
}
