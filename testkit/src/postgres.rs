//! A throwaway PostgreSQL server for one test: its own cluster in a scratch
//! folder (`initdb`, trust authentication, user `proctor`), on a free
//! loopback port, run as the `postgres` user, stopped when dropped. Needs
//! Debian's `postgresql` package (`.ci/run` installs it); a missing server is
//! a test failure that says so, never a pass.

use std::path::PathBuf;
use std::process::Command;

use crate::Scratch;

#[derive(Debug)]
pub struct Postgres {
    /// `postgres://proctor@127.0.0.1:PORT/postgres`.
    pub url: String,
    bin: PathBuf,
    data: PathBuf,
    _scratch: Scratch,
}

/// The newest installed server's binaries.
fn server_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).filter(|b| b.join("initdb").exists()).collect())
        .unwrap_or_default();
    found.sort();
    found.pop().expect("a PostgreSQL server under /usr/lib/postgresql (apt install postgresql; .ci/run does)")
}

fn as_postgres(program: PathBuf, args: &[&str]) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(&program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} as postgres: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = server_bin();
        let scratch = Scratch::new("postgres");
        let data = scratch.path.join("data");
        let chown = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&scratch.path).status().unwrap();
        assert!(chown.success(), "chown of the scratch folder to postgres");
        // The scratch folder's parents must be enterable by postgres.
        let _ = Command::new("chmod").arg("o+x").arg(&scratch.path).status();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let data_text = data.display().to_string();
        as_postgres(bin.join("initdb"), &["-D", &data_text, "-A", "trust", "-U", "proctor", "--no-sync"]);
        let options = format!("-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", scratch.path.display());
        let log = scratch.path.join("server.log").display().to_string();
        as_postgres(bin.join("pg_ctl"), &["-D", &data_text, "-o", &options, "-l", &log, "-w", "start"]);
        Postgres { url: format!("postgres://proctor@127.0.0.1:{port}/postgres"), bin, data, _scratch: scratch }
    }
}

impl Postgres {
    /// The server and every backend of it.
    fn processes(&self) -> Vec<u32> {
        let pid = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
            .expect("the server's postmaster.pid");
        let mut all = vec![pid];
        all.extend(crate::children(pid).into_iter().map(|(p, _)| p));
        all
    }

    /// Freezes the server (SIGSTOP to it and its backends): it stops
    /// answering without closing a connection, as across a network
    /// partition. `resume` (or drop) thaws it.
    pub fn freeze(&self) {
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGSTOP);
        }
    }

    pub fn resume(&self) {
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGCONT);
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.resume();
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}
