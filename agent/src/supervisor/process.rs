//! The service process itself: spawning it (in its own process group and
//! cgroup, with a filtered environment, its output going to a file the agent
//! tails), re-attaching to one a previous agent started, stopping its tree,
//! and explaining how it ended.
//!
//! Output goes to `<data_dir>/<service>.log`, not to a pipe: a pipe would
//! break (and SIGPIPE the service) when the agent restarts, a file does not.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use proto::{ExitKind, ExitStatus};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::Internal;
use super::cgroup::ServiceCgroup;
use crate::config::ServiceConfig;

/// How long to wait, after the service exits, for its last output lines.
const OUTPUT_DRAIN: Duration = Duration::from_millis(500);
/// How long to wait for a killed process group to vanish.
const GROUP_EXIT_DEADLINE: Duration = Duration::from_secs(5);
/// How often the log file is read for new lines, and a re-attached process
/// checked for life.
const TAIL_EVERY: Duration = Duration::from_millis(50);

/// What a restarted agent needs to find a running service again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Persisted {
    pub pid: u32,
    /// Kernel start time of `pid` (clock ticks since boot): tells a reused PID apart.
    pub start_ticks: u64,
    pub base_url: String,
    pub cgroup: Option<ServiceCgroup>,
    pub incarnation: String,
    pub started_unix_ms: i64,
    /// The GPUs it was given (its `CUDA_VISIBLE_DEVICES`).
    #[serde(default)]
    pub gpus: Vec<u32>,
}

/// A running service the supervisor watches.
pub(super) struct Spawned {
    pub pid: u32,
    pub base_url: String,
}

pub(super) fn log_path(data_dir: &Path, service: &str) -> PathBuf {
    data_dir.join(format!("{service}.log"))
}

pub(super) fn state_path(data_dir: &Path, service: &str) -> PathBuf {
    data_dir.join(format!("{service}.state.json"))
}

/// Kernel start time of a live, non-zombie process.
pub(super) fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // State is field 3 (index 0 after ')'); starttime is field 22 (index 19).
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Checks the program and the working folder before anything starts, so a
/// typo is a clear error, not a cryptic exit.
/// The `sh` prologue run before the service's command: join its cgroup,
/// reset the OOM score, then (as root) drop to its user and `exec` it.
fn prologue(cgroup: Option<&ServiceCgroup>, user: Option<&nix::unistd::User>) -> String {
    let mut prologue = String::from("set -e; ");
    for f in cgroup.map(ServiceCgroup::procs_files).unwrap_or_default() {
        prologue.push_str(&format!("echo $$ > {}; ", quote(&f.to_string_lossy())));
    }
    prologue.push_str("echo 0 > /proc/self/oom_score_adj 2>/dev/null || true; ");
    match user {
        // The cgroup is joined as root; then the service drops to its user.
        Some(u) => prologue.push_str(&format!(
            "exec setpriv --reuid={} --regid={} --init-groups --inh-caps=-all -- \"$@\"",
            u.uid, u.gid
        )),
        None => prologue.push_str("exec \"$@\""),
    }
    prologue
}

/// The user a service runs as, when it is not the agent's: only root may
/// switch, and the switch needs `setpriv` (util-linux).
fn run_as(cfg: &ServiceConfig) -> Result<Option<nix::unistd::User>, String> {
    let Some(name) = &cfg.user else { return Ok(None) };
    let user = nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .ok_or_else(|| format!("cannot start service {}: no user {name:?} on this host", cfg.name))?;
    let me = nix::unistd::geteuid();
    if user.uid == me {
        return Ok(None);
    }
    if !me.is_root() {
        return Err(format!(
            "cannot start service {} as user {name}: the agent runs as uid {me}, not root; run the agent as root \
             (it drops to {name} for the service) or drop `user`",
            cfg.name
        ));
    }
    let found =
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("setpriv").is_file()));
    if !found {
        return Err(format!(
            "cannot start service {} as user {name}: `setpriv` (util-linux) is not in PATH; install util-linux",
            cfg.name
        ));
    }
    Ok(Some(user))
}

fn precheck(cfg: &ServiceConfig, argv: &[String]) -> Result<(), String> {
    if let Some(dir) = cfg.workdir.as_ref().filter(|d| !d.is_dir()) {
        return Err(format!(
            "cannot start service {}: command {argv:?}: workdir {} is not a folder",
            cfg.name,
            dir.display()
        ));
    }
    let program = Path::new(&argv[0]);
    let found = if program.components().count() > 1 {
        let full = match &cfg.workdir {
            Some(d) if program.is_relative() => d.join(program),
            _ => program.to_owned(),
        };
        full.is_file()
    } else {
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file())).unwrap_or(false)
    };
    if !found {
        return Err(format!(
            "cannot start service {}: command {argv:?}: program {:?} not found{}",
            cfg.name,
            argv[0],
            if program.components().count() > 1 { "" } else { " in PATH" }
        ));
    }
    Ok(())
}

/// A fixed port must be free before launch: whatever answers there now is
/// not the service this agent starts, and its "ready" must never become ours.
fn port_is_free(cfg: &ServiceConfig, port: u16, argv: &[String]) -> Result<(), String> {
    let host = cfg.base_url.split("://").nth(1).and_then(|r| r.split([':', '/']).next()).unwrap_or("127.0.0.1");
    let targets: Vec<std::net::SocketAddr> =
        std::net::ToSocketAddrs::to_socket_addrs(&(host, port)).map(|a| a.collect()).unwrap_or_default();
    let taken = targets.iter().any(|a| std::net::TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok());
    if taken {
        return Err(format!(
            "cannot start service {}: command {argv:?}: port {port} is already in use by another process \
             (an older server?): stop it, or set `port = 0` to pick a free port",
            cfg.name
        ));
    }
    Ok(())
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Starts the service. A small `sh` prologue puts it into its cgroup and
/// resets its OOM score before `exec`ing the real command, so nothing it
/// forks can escape and it does not inherit the agent's OOM protection.
pub(super) fn spawn(
    cfg: &SpawnArgs<'_>,
    generation: u64,
    tx: &mpsc::UnboundedSender<Internal>,
) -> Result<(Spawned, Persisted), String> {
    let service = cfg.service;
    let port = if service.port == 0 {
        free_port().map_err(|e| format!("cannot pick a free port for service {}: {e}", service.name))?
    } else {
        service.port
    };
    let subst = |s: &str| s.replace("{port}", &port.to_string());
    let argv: Vec<String> = service.command.iter().map(|a| subst(a)).collect();
    precheck(service, &argv)?;
    if service.port != 0 {
        port_is_free(service, port, &argv)?;
    }

    let user = run_as(service)?;
    let prologue = prologue(cfg.cgroup, user.as_ref());
    let mut command = tokio::process::Command::new("/bin/sh");
    command.arg("-c").arg(prologue).arg("proctor-service").args(&argv);
    environment(&mut command, cfg, user.as_ref(), &subst)?;
    if let Some(dir) = &service.workdir {
        command.current_dir(dir);
    }
    std::fs::create_dir_all(cfg.data_dir).map_err(|e| format!("cannot create {}: {e}", cfg.data_dir.display()))?;
    let log = log_path(cfg.data_dir, &service.name);
    // The raw log holds what the service printed, secrets included (the
    // agent redacts only what leaves it): readable by the agent's user only.
    let open = || {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&log)
    };
    let out = open().map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let offset = out.metadata().map(|m| m.len()).unwrap_or(0);
    command.process_group(0).stdin(Stdio::null()).stdout(Stdio::from(out)).stderr(Stdio::from(err));
    let mut child =
        command.spawn().map_err(|e| format!("cannot start service {}: command {argv:?}: {e}", service.name))?;
    let pid = child.id().ok_or("the service exited before its PID could be read")?;
    let ticks = start_ticks(pid).unwrap_or(0);

    let (finish, tail) = tail(log.clone(), offset, service.max_log_bytes, generation, tx.clone());
    let tx = tx.clone();
    tokio::spawn(async move {
        let status = child.wait().await.ok();
        finish_tail(finish, tail).await;
        let _ = tx.send(Internal::Exited { generation, status });
    });
    let base_url = subst(&service.base_url);
    let persisted = Persisted {
        pid,
        start_ticks: ticks,
        base_url: base_url.clone(),
        cgroup: cfg.cgroup.cloned(),
        incarnation: cfg.incarnation.to_owned(),
        started_unix_ms: crate::journal::now_unix_ms(),
        gpus: cfg.gpus.to_vec(),
    };
    Ok((Spawned { pid, base_url }, persisted))
}

/// The service sees only what its config names (with `{port}` filled in),
/// its secrets, the GPUs admission gave it, and the basics.
fn environment(
    command: &mut tokio::process::Command,
    cfg: &SpawnArgs<'_>,
    user: Option<&nix::unistd::User>,
    subst: &dyn Fn(&str) -> String,
) -> Result<(), String> {
    let service = cfg.service;
    command.env_clear();
    for key in ["PATH", "HOME", "LANG", "TZ"] {
        if let Ok(v) = std::env::var(key) {
            command.env(key, v);
        }
    }
    if let Some(u) = user {
        command.env("HOME", &u.dir).env("USER", &u.name).env("LOGNAME", &u.name);
    }
    for (k, v) in &service.env {
        command.env(k, subst(v));
    }
    for (k, path) in &service.secrets {
        let value = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read secret {k} from {}: {e}", path.display()))?;
        command.env(k, value.trim());
    }
    if service.gpus.is_some() {
        let devices: Vec<String> = cfg.gpus.iter().map(u32::to_string).collect();
        command.env(crate::config::CUDA_VISIBLE_DEVICES, devices.join(","));
    }
    Ok(())
}

/// What `spawn` needs besides the service's own config.
pub(super) struct SpawnArgs<'a> {
    pub service: &'a ServiceConfig,
    pub data_dir: &'a Path,
    pub cgroup: Option<&'a ServiceCgroup>,
    pub incarnation: &'a str,
    /// The GPUs admission gave it: its `CUDA_VISIBLE_DEVICES` when the
    /// service has `gpus` (empty: it sees none).
    pub gpus: &'a [u32],
}

/// Watches a service a previous agent started: its output file from now on,
/// and its life by polling (it is not our child, so it cannot be waited for).
pub(super) fn reattach(
    state: &Persisted,
    data_dir: &Path,
    service: &ServiceConfig,
    generation: u64,
    tx: &mpsc::UnboundedSender<Internal>,
) {
    let log = log_path(data_dir, &service.name);
    let offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let (finish, tail) = tail(log, offset, service.max_log_bytes, generation, tx.clone());
    let (pid, ticks) = (state.pid, state.start_ticks);
    let tx = tx.clone();
    tokio::spawn(async move {
        while start_ticks(pid) == Some(ticks) {
            tokio::time::sleep(TAIL_EVERY).await;
        }
        finish_tail(finish, tail).await;
        let _ = tx.send(Internal::Exited { generation, status: None });
    });
}

/// The last `n` lines of the service's log file, for failure messages.
pub(super) fn last_lines(data_dir: &Path, service: &str, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(log_path(data_dir, service)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|s| s.to_string()).collect()
}

/// Follows a file from `offset`, sending each complete line; on `finish`,
/// reads what is left and stops. Past `max_bytes` the file is rotated.
fn tail(
    path: PathBuf,
    offset: u64,
    max_bytes: u64,
    generation: u64,
    tx: mpsc::UnboundedSender<Internal>,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (finish, mut finished) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let Ok(mut file) = std::fs::File::open(&path) else { return };
        if file.seek(SeekFrom::Start(offset)).is_err() {
            return;
        }
        let mut lines = Lines::default();
        loop {
            // Asked to finish, or the asker is gone: read what is left and stop.
            let last = !matches!(finished.try_recv(), Err(oneshot::error::TryRecvError::Empty));
            let mut chunk = Vec::new();
            let _ = file.read_to_end(&mut chunk);
            for line in lines.push(&chunk) {
                if tx.send(Internal::Log { generation, stream: "output", line }).is_err() {
                    return;
                }
            }
            if last {
                if let Some(line) = lines.finish() {
                    let _ = tx.send(Internal::Log { generation, stream: "output", line });
                }
                return;
            }
            rotate_if_big(&path, &mut file, max_bytes);
            tokio::time::sleep(TAIL_EVERY).await;
        }
    });
    (finish, task)
}

/// Copy-and-truncate rotation once the log passes `max_bytes` (everything
/// read so far): the service keeps its file open in append mode, so after the
/// truncation its writes land at the new start. The older part is kept once
/// as `<service>.log.1`. A file truncated by anyone is followed from its start.
fn rotate_if_big(path: &Path, file: &mut std::fs::File, max_bytes: u64) {
    let (Ok(read_to), Ok(len)) = (file.stream_position(), file.metadata().map(|m| m.len())) else { return };
    if len < read_to {
        let _ = file.seek(SeekFrom::Start(0));
        return;
    }
    if read_to < max_bytes || read_to != len {
        return;
    }
    let mut older = path.as_os_str().to_owned();
    older.push(".1");
    if std::fs::copy(path, &older).is_ok()
        && std::fs::OpenOptions::new().write(true).open(path).and_then(|f| f.set_len(0)).is_ok()
    {
        let _ = file.seek(SeekFrom::Start(0));
    }
}

/// The longest line passed on; the rest of a longer one is dropped (a
/// progress bar without line ends must not grow one line to megabytes).
pub(super) const MAX_LINE: usize = 4096;

/// Splits service output into lines. `\n`, `\r\n` and a lone `\r` all end
/// a line: tqdm-style bars (downloads, "Loading checkpoint shards") redraw
/// with `\r`, and each redraw is a line for pattern matching. Empty
/// redraws are skipped; over-long lines are cut at `MAX_LINE`.
#[derive(Debug, Default)]
pub(super) struct Lines {
    pending: Vec<u8>,
    /// The last byte seen was `\r`: a `\n` right after it ends nothing.
    after_cr: bool,
    /// The current line was already cut and sent: drop until its end.
    cut: bool,
}

impl Lines {
    pub(super) fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for &b in bytes {
            let after_cr = std::mem::replace(&mut self.after_cr, b == b'\r');
            match b {
                b'\n' if after_cr => {}
                b'\n' | b'\r' => {
                    if !self.cut && (b == b'\n' || !self.pending.is_empty()) {
                        out.push(String::from_utf8_lossy(&self.pending).into_owned());
                    }
                    self.pending.clear();
                    self.cut = false;
                }
                _ if self.cut => {}
                _ => {
                    self.pending.push(b);
                    if self.pending.len() == MAX_LINE {
                        let head = String::from_utf8_lossy(&self.pending);
                        out.push(format!("{head} … (line cut at {MAX_LINE} bytes)"));
                        self.pending.clear();
                        self.cut = true;
                    }
                }
            }
        }
        out
    }

    /// What is left without a line end, once the output is closed.
    pub(super) fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        (!rest.is_empty() && !self.cut).then(|| String::from_utf8_lossy(&rest).into_owned())
    }
}

async fn finish_tail(finish: oneshot::Sender<()>, tail: tokio::task::JoinHandle<()>) {
    let _ = finish.send(());
    let _ = tokio::time::timeout(OUTPUT_DRAIN, tail).await;
}

/// Sends `signal` to the whole process group led by `pgid`.
pub(super) fn signal_group(pgid: u32, signal: Signal) {
    let _ = killpg(Pid::from_raw(pgid as i32), signal);
}

/// SIGKILLs what is left of the service: its cgroup if it has one (which
/// catches processes that left the group), and its process group.
pub(super) async fn kill_tree(pgid: u32, cgroup: Option<&ServiceCgroup>) -> bool {
    let mut gone = true;
    if let Some(cg) = cgroup {
        gone &= cg.kill_all(GROUP_EXIT_DEADLINE).await;
    }
    let group = Pid::from_raw(-(pgid as i32));
    signal_group(pgid, Signal::SIGKILL);
    let deadline = Instant::now() + GROUP_EXIT_DEADLINE;
    loop {
        if kill(group, None).is_err() {
            return gone;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Explains an exit. `stop` is `Some(escalated)` when the agent stopped it;
/// `oom` when the cgroup's OOM-kill counter rose during the run — then the
/// exit is `OOM_KILLED` whatever the main process's own status (a worker may
/// have been the one killed).
pub fn classify(status: Option<std::process::ExitStatus>, stop: Option<bool>, oom: bool) -> ExitStatus {
    let (code, signal) = status.map_or((None, None), |s| (s.code(), s.signal()));
    let kind = match (oom, stop, code, signal) {
        (true, _, _, _) => ExitKind::OomKilled,
        (_, Some(true), _, _) => ExitKind::KilledAfterGrace,
        (_, Some(false), _, _) => ExitKind::StoppedGracefully,
        (_, None, Some(0), _) => ExitKind::Clean,
        (_, None, Some(_), _) => ExitKind::Crashed,
        (_, None, None, Some(_)) => ExitKind::Signaled,
        (_, None, None, None) => ExitKind::Unknown,
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
            (exited(0), None, false, "CLEAN"),
            (exited(3), None, false, "CRASHED(3)"),
            (signaled(9), None, false, "SIGNALED(9)"),
            (signaled(9), None, true, "OOM_KILLED"),
            // A worker was OOM-killed and the main process then exited 0.
            (exited(0), None, true, "OOM_KILLED"),
            (exited(0), Some(false), false, "STOPPED_GRACEFULLY"),
            (signaled(15), Some(false), false, "STOPPED_GRACEFULLY"),
            (signaled(9), Some(true), false, "KILLED_AFTER_GRACE"),
            (None, None, false, "UNKNOWN"),
        ];
        for (status, stop, oom, want) in table {
            assert_eq!(classify(status, stop, oom).to_string(), want, "{status:?} {stop:?} {oom}");
        }
    }

    #[test]
    fn quoting_survives_odd_paths() {
        assert_eq!(quote("/sys/fs/cgroup/a b/it's"), "'/sys/fs/cgroup/a b/it'\\''s'");
    }
}
