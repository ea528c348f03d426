//! `proctor sim`: the reference model service. It speaks the translation API
//! contract (DESIGN §3) with real resource behaviour — loading allocates and
//! touches memory step by step — and injectable faults, so Proctor's tests and
//! demo exercise the same paths a real NLLB or Aya service would.

mod api;
mod model;
pub mod spec;
mod text;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

pub use spec::{ModelSpec, SimStage};

/// Everything `proctor sim` is told on its command line.
#[derive(Clone, Debug, Default)]
pub struct SimConfig {
    pub host: String,
    /// 0 = pick a free port; the chosen one is printed on stdout.
    pub port: u16,
    pub models: Vec<ModelSpec>,
    /// Wait for `POST /models/{name}/load` instead of loading at start.
    pub lazy: bool,
    /// Fault: keep running on SIGTERM (only SIGKILL stops it).
    pub ignore_sigterm: bool,
    /// Start this command as a child worker (e.g. one that holds memory).
    pub worker: Option<Vec<String>>,
    /// Fault: exit (code 0) as soon as the worker dies.
    pub exit_with_worker: bool,
    /// Fault: every /translate answer is delayed this long.
    pub slow_requests: Option<std::time::Duration>,
    /// Fault: every health answer burns this much CPU and logs a line.
    pub costly_health: Option<std::time::Duration>,
    /// Fault: (after, for): `after` past the first /translate request, every
    /// /translate answer is held until `for` has passed (a stall, as a GC
    /// pause or a swapped-out process would make).
    pub stall: Option<(std::time::Duration, std::time::Duration)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on {addr}: {source} (pick another --port, or 0 for any free port)")]
    Bind { addr: String, source: std::io::Error },
    #[error("cannot start worker {command:?}: {source}")]
    Worker { command: Vec<String>, source: std::io::Error },
    #[error("model {0:?} is given twice; model names must be unique")]
    DuplicateModel(String),
    #[error("http server failed: {0}")]
    Serve(std::io::Error),
}

/// Runs the service until SIGTERM/SIGINT (or forever with `ignore_sigterm`).
pub async fn serve(config: SimConfig) -> Result<(), SimError> {
    let mut models = BTreeMap::new();
    for spec in &config.models {
        if models.insert(spec.name.clone(), model::Model::new(spec.clone())).is_some() {
            return Err(SimError::DuplicateModel(spec.name.clone()));
        }
    }
    let host = if config.host.is_empty() { "127.0.0.1" } else { &config.host };
    let addr = format!("{host}:{}", config.port);
    let listener =
        tokio::net::TcpListener::bind(&addr).await.map_err(|source| SimError::Bind { addr: addr.clone(), source })?;
    let local: SocketAddr = listener.local_addr().map_err(SimError::Serve)?;
    // The one line scripts and the agent can rely on.
    println!("proctor sim listening on http://{local}");

    let worker = match &config.worker {
        Some(command) => Some(spawn_worker(command)?),
        None => None,
    };
    if let (Some(mut child), true) = (worker, config.exit_with_worker) {
        tokio::spawn(async move {
            let status = child.wait().await;
            eprintln!("sim: worker ended ({status:?}); exiting with it");
            std::process::exit(0);
        });
    }
    let state = api::AppState {
        models: Arc::new(models),
        slow: config.slow_requests,
        costly_health: config.costly_health,
        stall: config.stall.map(|(after, length)| api::Stall { after, length, first: Arc::default() }),
    };
    if !config.lazy {
        for m in state.models.values() {
            model::start_loading(m);
        }
    }
    let ignore_sigterm = config.ignore_sigterm;
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown_signal(ignore_sigterm))
        .await
        .map_err(SimError::Serve)?;
    println!("proctor sim stopped");
    Ok(())
}

fn spawn_worker(command: &[String]) -> Result<tokio::process::Child, SimError> {
    let err = |source| SimError::Worker { command: command.to_vec(), source };
    let (program, args) = command.split_first().ok_or_else(|| err(std::io::Error::other("empty command")))?;
    tokio::process::Command::new(program).args(args).spawn().map_err(err)
}

async fn shutdown_signal(ignore_sigterm: bool) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    loop {
        tokio::select! {
            _ = term.recv() => {
                if ignore_sigterm {
                    eprintln!("sim: ignoring SIGTERM (fault injected)");
                    continue;
                }
                return;
            }
            _ = int.recv() => return,
        }
    }
}

/// A worker process body: allocates and touches `mb` MiB, then holds it until
/// its parent goes away. Used by `--worker-mb` to put memory in a child.
/// `detach` is a fault: the worker calls `setsid` (leaving the service's
/// process group and session, as daemons do) and outlives its parent.
pub fn hold_memory(mb: u64, detach: bool) {
    if detach {
        let _ = nix::unistd::setsid();
    }
    let parent = std::os::unix::process::parent_id();
    println!(
        "proctor sim worker pid={} holding {mb} MiB{}",
        std::process::id(),
        if detach { " (detached)" } else { "" }
    );
    let block = std::hint::black_box(vec![1u8; (mb * 1024 * 1024) as usize]);
    while detach || std::os::unix::process::parent_id() == parent {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    drop(block);
}
