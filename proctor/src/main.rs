//! `proctor`: the one binary. A thin composition root: it parses the command
//! line and hands over to the agent, controller and sim libraries, which never
//! depend on each other.

mod demo;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "proctor",
    version,
    about = "End-to-end tests of slow-loading model services that wait for models, explain failures and never skip",
    long_about = "Proctor runs an agent on every lab host to supervise model services, track each model's loading \
stage and memory, and run test cases next to the service; the controller dispatches suites to agents, waits for \
models instead of skipping tests, and writes reports.\n\nStart with `proctor demo`.",
    after_help = "Exit codes of `run` and `demo`: 0 all passed, 1 test failures, 2 infrastructure or model load failure, \
3 a model load slower than its baseline beyond tolerance (every case passed), 64 bad input (suite, config, flags), \
130 interrupted."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the embedded demo: an agent supervising `proctor sim` with an NLLB-like and a gated Aya-like model,
    /// and the example suites against it.
    Demo(DemoArgs),
    /// Run suites against one or more agents.
    Run(Box<RunArgs>),
    /// Show what each agent of the inventory offers now: memory, services, models, stages, leases.
    Agents(AgentsArgs),
    /// Run the agent daemon on this host.
    Agent(AgentArgs),
    /// Run the reference model service (translation API contract) with simulated models and faults.
    Sim(Box<SimArgs>),
    /// Make a lab CA and the certificates agents and controllers present to each other (mTLS; docs/security.md).
    #[command(subcommand)]
    Certs(CertsCommand),
    /// The runs kept in the run store: list them, or show one (also partial runs whose controller died).
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Write a stored run's reports again (report.html, report.json, junit.xml, summary.md).
    Report(ReportArgs),
    /// Baselines of model load times per host: set one from a run, show them, compare a run against them.
    #[command(subcommand)]
    Baseline(BaselineCommand),
    /// Load time per model and host over the last runs (sparklines; --html for charts) and flaky cases.
    Trends(TrendsArgs),
    /// Internal: a sim worker process that holds memory (started by `sim --worker-mb`).
    #[command(hide = true)]
    SimWorker {
        #[arg(long)]
        mb: u64,
        #[arg(long)]
        detach: bool,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Create the lab CA: ca.pem (give it to every agent and controller) and ca.key (keep it safe).
    Init {
        #[command(flatten)]
        at: CertsAt,
    },
    /// Issue a certificate signed by the lab CA: `agent NAME --san HOST…`, `controller NAME` or `observer NAME`.
    Issue {
        /// agent (server certificate naming NAME and every --san), controller (may drive agents) or
        /// observer (may only look: GetInfo, Watch).
        #[arg(value_parser = ["agent", "controller", "observer"])]
        kind: String,
        /// Who it is: the agent's inventory name, or the controller's or observer's name (shown in agent logs).
        name: String,
        /// Another name or IP address the agent is reached by (agents only; repeatable).
        #[arg(long = "san", value_name = "HOST")]
        sans: Vec<String>,
        #[command(flatten)]
        at: CertsAt,
    },
}

/// Where the run store is (docs/store.md).
#[derive(Args, Debug, Clone)]
struct StoreArgs {
    /// The run store: a SQLite file, or postgres://USER:PASSWORD@HOST/DB for one a lab's runners share
    /// (default: $XDG_DATA_HOME/proctor/runs.sqlite, else ~/.local/share/proctor/runs.sqlite).
    #[arg(long, value_name = "PATH|URL", env = "PROCTOR_STORE", hide_env_values = true)]
    store: Option<String>,
}

impl StoreArgs {
    fn location(&self) -> Result<controller::store::Location, String> {
        use controller::store::Location;
        match &self.store {
            Some(s) => Location::parse(s),
            None => Location::default_sqlite()
                .map(Location::Sqlite)
                .ok_or_else(|| "no home folder to keep runs in: give --store PATH or set PROCTOR_STORE".to_owned()),
        }
    }
}

/// Keeping this run (`run`, `demo`).
#[derive(Args, Debug, Clone)]
struct KeepArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Do not keep this run in the store (and do not compare it with baselines); beats --store and
    /// PROCTOR_STORE.
    #[arg(long)]
    no_store: bool,
    #[command(flatten)]
    tolerance: ToleranceArgs,
}

impl KeepArgs {
    fn location(&self) -> Result<Option<controller::store::Location>, String> {
        if self.no_store { Ok(None) } else { self.store.location().map(Some) }
    }
}

/// How much slower than its baseline a load may be.
#[derive(Args, Debug, Clone)]
struct ToleranceArgs {
    /// A model load (or one of its stages) this much slower than its baseline is a regression (exit 3);
    /// a suite's `baseline_tolerance` beats it.
    #[arg(long, value_name = "PERCENT", default_value = "25%", value_parser = parse_ratio)]
    baseline_tolerance: f64,
    /// Changes smaller than this never count, whatever their percentage (sub-second noise).
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = parse_duration)]
    baseline_slack: Duration,
}

impl ToleranceArgs {
    fn tolerance(&self) -> controller::store::baseline::Tolerance {
        controller::store::baseline::Tolerance { ratio: self.baseline_tolerance, slack: self.baseline_slack }
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    controller::store::baseline::parse_ratio(s)
}

#[derive(Subcommand, Debug)]
enum RunsCommand {
    /// The newest runs first: status (partial: its controller stopped before the end), cases, suites.
    List {
        /// How many runs.
        #[arg(long, value_name = "N", default_value_t = 20)]
        last: usize,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// One run's summary as it was printed (cases, problems, model loads, baseline), from the store.
    Show {
        /// The run: its id, a unique start of it, or `latest`.
        #[arg(default_value = "latest")]
        run: String,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Args, Debug)]
struct OutputArgs {
    /// Output format (json: the run's report.json document for `runs show`).
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

impl OutputArgs {
    fn json(&self) -> bool {
        self.output == "json"
    }
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// The run: its id, a unique start of it, or `latest`.
    #[arg(default_value = "latest")]
    run: String,
    /// Where the reports are written.
    #[arg(long, value_name = "DIR", default_value = "proctor-report")]
    out: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Subcommand, Debug)]
enum BaselineCommand {
    /// Make a run's model loads (each that did the work) the baseline of their host, service and model.
    Set {
        /// The run: its id, a unique start of it, or `latest`.
        #[arg(default_value = "latest")]
        run: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Every baseline: host/service/model, stage, time, the run it came from.
    Show {
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Compare a run's loads with the baselines (exit 3 on a regression).
    Compare {
        /// The run: its id, a unique start of it, or `latest`.
        #[arg(default_value = "latest")]
        run: String,
        #[command(flatten)]
        tolerance: ToleranceArgs,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Args, Debug)]
struct TrendsArgs {
    /// How many of the newest runs.
    #[arg(long, value_name = "N", default_value_t = 20)]
    last: usize,
    /// Only this model.
    #[arg(long, value_name = "NAME")]
    model: Option<String>,
    /// Also write an HTML page with a chart per model and host.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args, Debug)]
struct CertsAt {
    /// Folder of the CA and the certificates it issues.
    #[arg(long, value_name = "DIR", default_value = "proctor-certs")]
    dir: PathBuf,
    /// How long the certificate is valid.
    #[arg(long, value_name = "DAYS", default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..))]
    days: u32,
}

/// How the controller reaches agents (docs/security.md); each beats the inventory's `[access]`.
#[derive(Args, Debug)]
struct AccessArgs {
    /// The lab CA certificate: agents are reached over TLS and must present a certificate it signed, naming them.
    #[arg(long, value_name = "FILE", env = "PROCTOR_CA")]
    ca: Option<PathBuf>,
    /// This controller's certificate (mTLS), from `proctor certs issue controller NAME`.
    #[arg(long, value_name = "FILE", env = "PROCTOR_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// The key of --cert.
    #[arg(long, value_name = "FILE", env = "PROCTOR_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// A file holding the bearer token (agents in token mode).
    #[arg(long, value_name = "FILE", env = "PROCTOR_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl AccessArgs {
    fn access(&self) -> controller::inventory::Access {
        controller::inventory::Access {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            token_file: self.token_file.clone(),
        }
    }
}

#[derive(Args, Debug)]
struct ProgressArgs {
    /// Off a terminal, print a line per loading model this often (and on every stage change).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    progress_interval: Duration,
    /// Progress display: auto (live on a terminal, lines otherwise), live, lines, or none.
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = ["auto", "live", "lines", "none"])]
    progress: String,
}

impl ProgressArgs {
    fn mode(&self) -> controller::progress::Mode {
        use controller::progress::Mode;
        use std::io::IsTerminal;
        match self.progress.as_str() {
            "live" => Mode::Live,
            "lines" => Mode::Lines { interval: self.progress_interval },
            "none" => Mode::Quiet,
            _ if std::io::stdout().is_terminal() => Mode::Live,
            _ => Mode::Lines { interval: self.progress_interval },
        }
    }
}

#[derive(Args, Debug)]
struct OtlpArgs {
    /// Export the run's trace over OTLP to this endpoint (default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
    /// OTEL_EXPORTER_OTLP_ENDPOINT; none set: no export). The trace file is written either way.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// OTLP protocol: grpc or http/protobuf (default: OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf).
    #[arg(long, value_name = "PROTOCOL", value_parser = ["grpc", "http/protobuf"])]
    otlp_protocol: Option<String>,
}

impl OtlpArgs {
    fn config(&self) -> controller::otel::OtelConfig {
        controller::otel::OtelConfig { endpoint: self.otlp_endpoint.clone(), protocol: self.otlp_protocol.clone() }
    }
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Where the demo writes its agent config, suites, logs and reports.
    #[arg(long, value_name = "DIR", default_value = "proctor-out")]
    out: PathBuf,
    #[command(flatten)]
    progress: ProgressArgs,
    #[command(flatten)]
    otlp: OtlpArgs,
    #[command(flatten)]
    keep: KeepArgs,
}

#[derive(Args, Debug)]
struct AgentsArgs {
    /// Agent address HOST:PORT (repeatable); added to the inventory.
    #[arg(long = "agent", value_name = "HOST:PORT")]
    agents: Vec<String>,
    /// Inventory file (TOML): agents with names, addresses and labels; see docs/scheduling.md.
    #[arg(long, value_name = "FILE")]
    inventory: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    output: String,
    #[command(flatten)]
    access: AccessArgs,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Agent address HOST:PORT (repeatable); added to the inventory.
    #[arg(long = "agent", value_name = "HOST:PORT")]
    agents: Vec<String>,
    /// Inventory file (TOML): agents with names, addresses and labels; see docs/scheduling.md.
    #[arg(long, value_name = "FILE")]
    inventory: Option<PathBuf>,
    /// Lease TTL asked of agents (renewed every third of it).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    lease_ttl: Duration,
    /// HTTP/2 keepalive PING interval towards agents.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    keepalive_interval: Duration,
    /// A PING unanswered this long closes the connection (then the run reconnects).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    keepalive_timeout: Duration,
    /// An agent unreachable this long is lost: its unfinished cases are placed on another host.
    /// Must exceed keepalive interval + timeout, and be shorter than --lease-ttl.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = parse_duration)]
    reconnect_grace: Duration,
    #[command(flatten)]
    otlp: OtlpArgs,
    #[command(flatten)]
    access: AccessArgs,
    /// Suite files (YAML).
    #[arg(value_name = "SUITE", required = true)]
    suites: Vec<PathBuf>,
    /// Where reports are written (junit.xml, trace.json).
    #[arg(long, value_name = "DIR", default_value = "proctor-out")]
    out: PathBuf,
    /// Model load timeout for every model; beats the suite's `timeout`, MODEL_LOADING_TIMEOUT and the agent config.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    model_timeout: Option<Duration>,
    /// Restart the service for a cold load even if its models are loaded.
    #[arg(long)]
    fresh: bool,
    /// Give up waiting for a free host after this long: the suite's waiting cases become errors naming who
    /// held the host and what they waited for (default: wait as long as it takes; a suite's `max_wait` beats it).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    max_wait: Option<Duration>,
    /// A test that a command case (pytest…) reports skipped fails that case: nothing is silently skipped.
    #[arg(long)]
    fail_on_skip: bool,
    #[command(flatten)]
    progress: ProgressArgs,
    #[command(flatten)]
    keep: KeepArgs,
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// Agent configuration file (TOML); see docs/agent.md.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

#[derive(Args, Debug)]
struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on; 0 picks a free one (printed on stdout).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// A model: NAME[:key=value,...] with keys mb, auth, download, load, warmup (durations like 2s),
    /// gated (needs HF_TOKEN), crash=STAGE, hang=STAGE. Repeatable.
    #[arg(long = "model", value_name = "SPEC", required = true)]
    models: Vec<sim::ModelSpec>,
    /// Do not load models at start; wait for POST /models/{name}/load.
    #[arg(long)]
    lazy: bool,
    /// Fault: keep running on SIGTERM.
    #[arg(long)]
    ignore_sigterm: bool,
    /// Start a worker child process holding this many MiB.
    #[arg(long, value_name = "MIB")]
    worker_mb: Option<u64>,
    /// Fault: the worker calls setsid and outlives the service (a daemonising grandchild).
    #[arg(long, requires = "worker_mb")]
    detach_worker: bool,
    /// Fault: exit with code 0 as soon as the worker dies (e.g. OOM-killed).
    #[arg(long, requires = "worker_mb")]
    exit_with_worker: bool,
    /// Fault: delay every /translate answer this long.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    slow_requests: Option<Duration>,
    /// Fault: every health answer (/health, /v2/...) burns this much CPU and writes an access-log line.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    costly_health: Option<Duration>,
    /// Fault: AFTER+FOR, e.g. 2s+1s: AFTER past the first /translate request, every /translate answer is held
    /// until FOR has passed (a stall, as a GC pause would make).
    #[arg(long, value_name = "AFTER+FOR", value_parser = parse_stall)]
    stall: Option<(Duration, Duration)>,
}

fn parse_stall(s: &str) -> Result<(Duration, Duration), String> {
    let (after, length) = s.split_once('+').ok_or_else(|| format!("{s:?}: write AFTER+FOR, e.g. 2s+1s"))?;
    Ok((parse_duration(after)?, parse_duration(length)?))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    controller::suite::parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration; write e.g. 500ms, 30s, 5m"))
}

fn init_tracing(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only where a person reads them: never into a redirected file.
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
}

/// `MODEL_LOADING_TIMEOUT` where `proctor run` runs (seconds, or a duration
/// like `15m`), as the seed's teams export it next to `PYTEST_TIMEOUT`.
fn env_load_timeout() -> Result<Option<Duration>, String> {
    let Ok(value) = std::env::var("MODEL_LOADING_TIMEOUT") else { return Ok(None) };
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    let parsed =
        value.parse::<u64>().ok().map(Duration::from_secs).or_else(|| controller::suite::parse_duration(value));
    match parsed {
        Some(d) => Ok(Some(d)),
        None => Err(format!("MODEL_LOADING_TIMEOUT={value:?} is not a duration; write seconds (e.g. 900) or e.g. 15m")),
    }
}

/// First SIGINT/SIGTERM cancels gracefully; a second writes the partial
/// JUnit file and exits at once.
fn interrupt_token() -> controller::Interrupt {
    let interrupt = controller::Interrupt::default();
    let handle = interrupt.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
            return;
        };
        let mut count = 0;
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            count += 1;
            if count == 1 {
                // The terminal reporter says so: it owns the terminal.
                handle.token.cancel();
            } else {
                match handle.write_partial(Duration::from_secs(1)).await {
                    Some(path) => eprintln!("interrupted again: partial report written to {}", path.display()),
                    None => eprintln!("interrupted again: exiting"),
                }
                std::process::exit(130);
            }
        }
    });
    interrupt
}

fn main() -> ExitCode {
    // Bad flags are bad input (exit 64), like a bad suite; help is not an error.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(64) } else { ExitCode::SUCCESS };
        }
    };
    if let Command::SimWorker { mb, detach } = cli.command {
        sim::hold_memory(mb, detach);
        return ExitCode::SUCCESS;
    }
    // The agent idles on every lab host: one thread, so its 1 Hz work wakes
    // no other (the controller and the sim fan out over every core).
    let builder = match cli.command {
        Command::Agent(_) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        _ => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    };
    let runtime = match builder {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async_main(cli.command))
}

async fn async_main(command: Command) -> ExitCode {
    match command {
        Command::Demo(args) => {
            init_tracing("warn");
            let mode = args.progress.mode();
            let store = match args.keep.location() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(64);
                }
            };
            let keep = demo::Keep { store, tolerance: args.keep.tolerance.tolerance() };
            demo::run(&args.out, mode, args.otlp.config(), keep, interrupt_token()).await
        }
        Command::Run(args) => {
            init_tracing("warn");
            let (env_model_timeout, store) = match env_load_timeout().and_then(|t| Ok((t, args.keep.location()?))) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(64);
                }
            };
            let opts = controller::RunOptions {
                inventory: args.inventory,
                agents: args.agents,
                access: args.access.access(),
                suites: args.suites,
                out_dir: args.out,
                progress: args.progress.mode(),
                model_timeout: args.model_timeout,
                fresh: args.fresh,
                lease_ttl: args.lease_ttl,
                otel: args.otlp.config(),
                keepalive: controller::client::Keepalive {
                    interval: args.keepalive_interval,
                    timeout: args.keepalive_timeout,
                },
                reconnect_grace: args.reconnect_grace,
                max_wait: args.max_wait,
                env_model_timeout,
                store,
                baseline_tolerance: args.keep.tolerance.tolerance(),
                fail_on_skip: args.fail_on_skip,
            };
            let result = controller::run(opts, interrupt_token()).await;
            ExitCode::from(result.exit as u8)
        }
        Command::Agents(args) => {
            init_tracing("warn");
            let opts = controller::agents::AgentsOptions {
                inventory: args.inventory,
                agents: args.agents,
                access: args.access.access(),
                json: args.output == "json",
            };
            ExitCode::from(controller::agents::agents(opts).await as u8)
        }
        Command::Agent(args) => {
            init_tracing("info");
            run_agent(&args.config).await
        }
        Command::Sim(args) => {
            init_tracing("info");
            run_sim(*args).await
        }
        Command::SimWorker { .. } => ExitCode::SUCCESS,
        Command::Certs(command) => certs(command),
        Command::Runs(_) | Command::Report(_) | Command::Baseline(_) | Command::Trends(_) => {
            init_tracing("warn");
            history(command).await
        }
    }
}

/// The commands that read the run store.
async fn history(command: Command) -> ExitCode {
    use controller::history as h;
    let store = match &command {
        Command::Runs(RunsCommand::List { store, .. } | RunsCommand::Show { store, .. })
        | Command::Baseline(
            BaselineCommand::Set { store, .. }
            | BaselineCommand::Show { store, .. }
            | BaselineCommand::Compare { store, .. },
        ) => store,
        Command::Report(a) => &a.store,
        Command::Trends(a) => &a.store,
        _ => return ExitCode::from(64),
    };
    let location = match store.location() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(64);
        }
    };
    let exit = match command {
        Command::Runs(RunsCommand::List { last, output, .. }) => h::list(&location, last, output.json()).await,
        Command::Runs(RunsCommand::Show { run, output, .. }) => h::show(&location, &run, output.json()).await,
        Command::Report(a) => h::report(&location, &a.run, &a.out).await,
        Command::Baseline(BaselineCommand::Set { run, .. }) => h::set(&location, &run).await,
        Command::Baseline(BaselineCommand::Show { output, .. }) => h::show_baselines(&location, output.json()).await,
        Command::Baseline(BaselineCommand::Compare { run, tolerance, output, .. }) => {
            h::compare(&location, &run, tolerance.tolerance(), output.json()).await
        }
        Command::Trends(a) => {
            h::show_trends(&location, a.last, a.model.as_deref(), a.output.json(), a.html.as_ref()).await
        }
        _ => controller::Exit::BadInput,
    };
    ExitCode::from(exit as u8)
}

/// `proctor sim`: the flags as the sim's config, then serve.
async fn run_sim(args: SimArgs) -> ExitCode {
    let worker = args.worker_mb.map(|mb| {
        let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "proctor".into());
        let mut argv = vec![exe, "sim-worker".into(), "--mb".into(), mb.to_string()];
        if args.detach_worker {
            argv.push("--detach".into());
        }
        argv
    });
    let config = sim::SimConfig {
        host: args.host,
        port: args.port,
        models: args.models,
        lazy: args.lazy,
        ignore_sigterm: args.ignore_sigterm,
        worker,
        exit_with_worker: args.exit_with_worker,
        slow_requests: args.slow_requests,
        costly_health: args.costly_health,
        stall: args.stall,
    };
    match sim::serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn certs(command: CertsCommand) -> ExitCode {
    use controller::certs::{self, Kind, Validity};
    let done = match &command {
        CertsCommand::Init { at } => certs::init(&at.dir, Validity::days(at.days)),
        CertsCommand::Issue { kind, name, sans, at } => {
            let kind = match kind.as_str() {
                "agent" => Kind::Agent,
                "controller" => Kind::Controller,
                _ => Kind::Observer,
            };
            if kind != Kind::Agent && !sans.is_empty() {
                eprintln!(
                    "error: --san names the hosts an agent is reached by; a {} certificate has none",
                    kind.as_str()
                );
                return ExitCode::from(64);
            }
            certs::issue(&at.dir, kind, name, sans, Validity::days(at.days))
        }
    };
    match done {
        Ok(pair) => {
            println!("wrote {} and {} (the key is readable by you only)", pair.cert.display(), pair.key.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(64)
        }
    }
}

async fn run_agent(config: &std::path::Path) -> ExitCode {
    let env_timeout = std::env::var(agent::config::LOAD_TIMEOUT_ENV).ok();
    if let Err(e) = agent::config::check_load_timeout_env(env_timeout.as_deref()) {
        eprintln!("error: {e}");
        return ExitCode::from(64);
    }
    let config = match agent::Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(64);
        }
    };
    let running = match agent::start(config).await {
        Ok(r) => r,
        Err(e @ agent::AgentError::Auth(_)) => {
            eprintln!("error: {e}");
            return ExitCode::from(64);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // The one line scripts and tests wait for.
    // Written, not println!: a closed stdout (`| head`) must not panic the agent.
    let _ = writeln!(
        std::io::stdout(),
        "proctor agent listening on {} (incarnation {}; {})",
        running.addr,
        running.incarnation,
        running.security
    );
    // Under systemd (Type=notify): ready once the port is bound and serving.
    if let Err(error) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(%error, "could not tell systemd the agent is ready");
    }
    let cancel = running.cancel_token();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down: stopping services");
        cancel.cancel();
    });
    match running.wait().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
