//! The agent's configuration: a TOML file parsed into a raw form
//! (`deny_unknown_fields`) and validated into domain types before anything
//! starts or binds. Errors name the file, the key and the fix.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::Stage;
use serde::Deserialize;
use toml::Spanned;

use crate::probe::{HealthJson, ProgressScale, Protocol};

/// A string from the file with where it is, for errors that say so.
type Text = Spanned<String>;

pub use proto::admission::GpuPin;

/// The variable CUDA programs read their devices from; the agent sets it
/// from the GPUs it admitted a service to.
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";

/// Methods a warm-up request may use.
const HTTP_METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// How often a service whose models are all settled (READY or FAILED) is probed.
pub const DEFAULT_LIVE_POLL: Duration = Duration::from_secs(5);

/// Built-in model load timeout when nothing else sets one (DESIGN §4 precedence).
pub const DEFAULT_LOAD_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// Readiness polls never wait longer than this between two probes by default
/// (while a model loads); output of the service triggers a probe sooner.
pub const DEFAULT_POLL_CEILING: Duration = Duration::from_millis(500);
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// A stage with no progress signal for this long has stalled (by default).
pub const DEFAULT_STALL: Duration = Duration::from_secs(10 * 60);
pub const DEFAULT_WARMUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Environment variable that sets the load timeout (seconds) for all models.
pub const LOAD_TIMEOUT_ENV: &str = "MODEL_LOADING_TIMEOUT";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Text>,
    data_dir: Option<PathBuf>,
    telemetry_interval: Option<Text>,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
    #[serde(default)]
    admission: RawAdmission,
    keepalive_interval: Option<Text>,
    keepalive_timeout: Option<Text>,
    auth: Option<Spanned<RawAuth>>,
    nvml_library: Option<PathBuf>,
    metrics_listen: Option<Text>,
    #[serde(default)]
    pressure: RawPressure,
}

/// `[pressure]`: tell of memory pressure while a model loads.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPressure {
    /// Host MemAvailable below this (MiB); 0 = never.
    host_available_mb: u64,
    /// A GPU's free memory below this (MiB); 0 = never.
    gpu_free_mb: u64,
}

impl Default for RawPressure {
    fn default() -> RawPressure {
        RawPressure { host_available_mb: 1024, gpu_free_mb: 1024 }
    }
}

/// `[auth]`: who may call the agent (docs/security.md).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    mode: crate::auth::Mode,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    tokens: Option<PathBuf>,
    #[serde(default)]
    insecure: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmission {
    /// Most memory (MiB) the agent may commit to its services' loads.
    memory_budget_mb: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Text,
    command: Spanned<Vec<String>>,
    workdir: Option<PathBuf>,
    user: Option<Text>,
    #[serde(default)]
    port: u16,
    base_url: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    secrets: BTreeMap<String, PathBuf>,
    stop_signal: Option<Text>,
    stop_grace: Option<Text>,
    #[serde(default)]
    readiness: RawReadiness,
    #[serde(default, rename = "model")]
    models: Vec<RawModel>,
    memory_limit_mb: Option<u64>,
    #[serde(default)]
    restart: RestartMode,
    restart_backoff: Option<Text>,
    restart_backoff_max: Option<Text>,
    stable_after: Option<Text>,
    #[serde(default)]
    on_agent_restart: OnAgentRestart,
    #[serde(default = "default_true")]
    stop_after_failed_load: bool,
    #[serde(default = "default_max_log_mb")]
    max_log_mb: u64,
    gpus: Option<Spanned<RawGpus>>,
    #[serde(default, rename = "test_command")]
    test_commands: Vec<RawTestCommand>,
}

/// `[[service.test_command]]`: a test suite a controller may run next to
/// the service (docs/agent.md, "Test commands").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTestCommand {
    name: Text,
    argv: Spanned<Vec<String>>,
    workdir: Option<PathBuf>,
    timeout: Option<Text>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    secrets: BTreeMap<String, PathBuf>,
    #[serde(default)]
    options: Vec<String>,
    #[serde(default)]
    flags: Vec<String>,
    paths: Option<Text>,
}

/// `gpus = "auto"` or `gpus = [0, 1]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawGpus {
    Word(String),
    Devices(Vec<u32>),
}

fn default_max_log_mb() -> u64 {
    64
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReadiness {
    protocol: Option<Text>,
    path: Option<Text>,
    poll_ceiling: Option<Text>,
    live_poll: Option<Text>,
    status_pointer: Option<Text>,
    progress_pointer: Option<Text>,
    progress_scale: Option<Text>,
    error_pointer: Option<String>,
    status_map: Option<Spanned<BTreeMap<String, Text>>>,
    load_path: Option<String>,
    load_body: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Text,
    #[serde(default)]
    load: LoadMode,
    timeout: Option<Text>,
    #[serde(default)]
    ram_mb: u64,
    #[serde(default)]
    gpu_mb: u64,
    served_as: Option<String>,
    #[serde(default)]
    stall: BTreeMap<Text, Text>,
    #[serde(default)]
    log_patterns: BTreeMap<Text, Text>,
    warmup: Option<RawWarmup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWarmup {
    method: Option<Text>,
    path: String,
    body: Option<String>,
    expect_status: Option<u16>,
    timeout: Option<Text>,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// Most memory the agent may commit to loads (on top of what the host has).
    pub memory_budget_bytes: Option<u64>,
    /// Where service output is written: `<data_dir>/<service>.log`.
    pub data_dir: PathBuf,
    pub telemetry_interval: Duration,
    pub services: Vec<ServiceConfig>,
    /// HTTP/2 PING to controllers this often; no answer within the timeout
    /// closes the connection (and its watch streams).
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Who may call the agent; checked against `listen` (plaintext only on
    /// loopback or with `insecure`).
    pub auth: crate::auth::AuthConfig,
    /// Where NVML is (default: the driver's `libnvidia-ml.so`); none found
    /// = GPU sampling off.
    pub nvml_library: Option<PathBuf>,
    /// Serve Prometheus metrics here (off when absent).
    pub metrics_listen: Option<SocketAddr>,
    /// Memory pressure is told below these (bytes; 0 = never).
    pub pressure: crate::sampling::pressure::Thresholds,
}

#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub name: String,
    /// Program and arguments; `{port}` is replaced by the service's port.
    pub command: Vec<String>,
    pub workdir: Option<PathBuf>,
    /// Run the service as this user (the agent must be root to switch).
    pub user: Option<String>,
    /// 0 = the agent picks a free port on every start.
    pub port: u16,
    /// Base URL for probes and cases; `{port}` is replaced.
    pub base_url: String,
    /// Only these variables reach the service (plus PATH and HOME).
    pub env: BTreeMap<String, String>,
    /// Variable name → file whose trimmed contents become its value.
    pub secrets: BTreeMap<String, PathBuf>,
    pub stop_signal: nix::sys::signal::Signal,
    pub stop_grace: Duration,
    pub readiness: Readiness,
    pub models: Vec<ModelConfig>,
    /// Memory limit of the service's cgroup (the whole tree).
    pub memory_limit_bytes: Option<u64>,
    pub restart: RestartPolicy,
    /// What a restarted agent does with a service the previous one left running.
    pub on_agent_restart: OnAgentRestart,
    /// Stop the service when a load fails by stall or timeout and no other
    /// model of it is READY or loading, so a hung load gives its memory back.
    pub stop_after_failed_load: bool,
    /// The service's output file is rotated past this size (copy to
    /// `<service>.log.1`, then truncate).
    pub max_log_bytes: u64,
    /// Which GPUs the service may use (its `CUDA_VISIBLE_DEVICES`): `None`
    /// = the agent gives it none and leaves the variable alone. Defaults to
    /// `auto` when a model declares `gpu_mb`.
    pub gpus: Option<GpuPin>,
    /// The test commands suites may run next to it.
    pub test_commands: Vec<crate::commands::TestCommand>,
}

/// When a service that exited on its own is started again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    pub mode: RestartMode,
    /// First delay; doubles per consecutive failure.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// A run this long (or one in which a model became READY) resets the count.
    pub stable_after: Duration,
}

/// Enum-like config values are serde enums: a wrong one is an error with
/// its line and column and the accepted values (toml says so).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    #[default]
    Never,
    OnFailure,
    Always,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnAgentRestart {
    /// Keep it running and monitor it again (the default).
    #[default]
    Reattach,
    /// Kill it; the next ensure starts it afresh.
    Reap,
}

#[derive(Clone, Debug)]
pub struct Readiness {
    pub protocol: Protocol,
    pub poll_ceiling: Duration,
    /// Once no model is loading: probe this often (a crash is still seen at
    /// once through the process wait).
    pub live_poll: Duration,
    /// Endpoint-mode loads: `POST <load_path>` with `load_body`; `{model}` replaced.
    pub load_path: String,
    pub load_body: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadMode {
    /// The service loads the model by itself when it starts.
    #[default]
    AtStart,
    /// The agent asks for it with `POST /models/{name}/load`.
    Endpoint,
}

impl LoadMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadMode::AtStart => "at_start",
            LoadMode::Endpoint => "endpoint",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub name: String,
    /// The model's name in the service's own API (vLLM model id, Ollama tag…).
    pub served_as: String,
    pub load: LoadMode,
    pub timeout: Option<Duration>,
    pub ram_bytes: u64,
    pub gpu_bytes: u64,
    pub stall: StallLimits,
    /// Log lines that mark stages (`{model}` = served name), checked in order.
    pub log_patterns: Vec<(Stage, regex::Regex)>,
    pub warmup: Option<Warmup>,
}

/// How long a model may sit in a stage without any sign of progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StallLimits {
    pub default: Duration,
    pub per_stage: BTreeMap<i32, Duration>,
}

impl StallLimits {
    pub fn for_stage(&self, stage: Stage) -> Duration {
        self.per_stage.get(&(stage as i32)).copied().unwrap_or(self.default)
    }
}

impl Default for StallLimits {
    /// Built-in limits: ten minutes without any progress signal, less where
    /// a healthy service never sits quiet for long.
    fn default() -> Self {
        let per_stage = [
            (Stage::ProcessStarting, Duration::from_secs(2 * 60)),
            (Stage::Authenticating, Duration::from_secs(5 * 60)),
        ]
        .into_iter()
        .map(|(s, d)| (s as i32, d))
        .collect();
        StallLimits { default: DEFAULT_STALL, per_stage }
    }
}

/// A real inference request that must succeed before a model counts as READY.
#[derive(Clone, Debug, PartialEq)]
pub struct Warmup {
    pub method: String,
    pub path: String,
    pub body: Option<String>,
    /// `None` = any 2xx.
    pub expect_status: Option<u16>,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read agent config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("agent config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value the file gives, with where it is (1-based, as toml says it).
    #[error("agent config {path}, line {line}, column {column}: {key}: {message}")]
    Invalid { path: PathBuf, line: usize, column: usize, key: String, message: String },
    #[error(
        "{LOAD_TIMEOUT_ENV}={value:?} in the agent's environment is not a positive number of seconds; write e.g. 900, or unset it"
    )]
    Env { value: String },
}

impl Config {
    /// Reads and validates a config file. Relative paths in it (workdir,
    /// secrets, data_dir) are relative to the file's folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: with_hint(e.to_string()) })?;
        let cx = Check { path, text };
        let base = path.parent().map(Path::to_owned).unwrap_or_default();
        let listen = match &raw.listen {
            Some(l) => l.get_ref().parse().map_err(|_| {
                let message = format!("{:?} is not an address; write e.g. \"127.0.0.1:7700\"", l.get_ref());
                cx.invalid("listen", l, message)
            })?,
            None => SocketAddr::from(([127, 0, 0, 1], 7700)),
        };
        let telemetry_interval =
            cx.duration("telemetry_interval", raw.telemetry_interval.as_ref(), Duration::from_secs(1))?;
        let mut services: Vec<ServiceConfig> = Vec::new();
        for (i, s) in raw.services.into_iter().enumerate() {
            let service = cx.service(i, s, &base, &services)?;
            services.push(service);
        }
        let keepalive = |key, value: &Option<Text>| cx.duration(key, value.as_ref(), Duration::from_secs(5));
        let auth = cx.auth(raw.auth.as_ref(), &base, listen, raw.listen.as_ref())?;
        let metrics_listen = match &raw.metrics_listen {
            Some(m) => Some(m.get_ref().parse().map_err(|_| {
                let message = format!("{:?} is not an address; write e.g. \"127.0.0.1:9464\"", m.get_ref());
                cx.invalid("metrics_listen", m, message)
            })?),
            None => None,
        };
        Ok(Config {
            listen,
            memory_budget_bytes: raw.admission.memory_budget_mb.map(|mb| mb * 1024 * 1024),
            data_dir: base.join(raw.data_dir.unwrap_or_else(|| PathBuf::from("proctor-agent-data"))),
            telemetry_interval,
            services,
            keepalive_interval: keepalive("keepalive_interval", &raw.keepalive_interval)?,
            keepalive_timeout: keepalive("keepalive_timeout", &raw.keepalive_timeout)?,
            auth,
            nvml_library: raw.nvml_library.map(|p| base.join(p)),
            metrics_listen,
            pressure: crate::sampling::pressure::Thresholds {
                host: raw.pressure.host_available_mb * 1024 * 1024,
                gpu: raw.pressure.gpu_free_mb * 1024 * 1024,
            },
        })
    }
}

/// Validation of one config file, a section at a time: each error names the
/// file, where the value is in it, the key and the fix.
struct Check<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Check<'_> {
    /// `value` is the one the error is about: the message says where it is.
    fn invalid<T>(&self, key: impl Into<String>, value: &Spanned<T>, message: String) -> ConfigError {
        self.invalid_at(key, value.span().start, message)
    }

    /// The `[auth]` section, paths resolved, judged against `listen`: an
    /// error points at the section (or at `listen`, without one).
    fn auth(
        &self,
        raw: Option<&Spanned<RawAuth>>,
        base: &Path,
        listen: SocketAddr,
        listen_text: Option<&Text>,
    ) -> Result<crate::auth::AuthConfig, ConfigError> {
        let empty = RawAuth::default();
        let a = raw.map_or(&empty, |r| r.get_ref());
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| base.join(p));
        let auth = crate::auth::AuthConfig {
            mode: a.mode,
            ca: path(&a.ca),
            cert: path(&a.cert),
            key: path(&a.key),
            tokens: path(&a.tokens),
            insecure: a.insecure,
        };
        crate::auth::transport(listen, &auth).map_err(|message| {
            let at = raw.map(|r| r.span().start).or(listen_text.map(|l| l.span().start)).unwrap_or(0);
            self.invalid_at("auth", at, message)
        })?;
        Ok(auth)
    }

    /// As `invalid`, for a value known by its byte offset in the file.
    fn invalid_at(&self, key: impl Into<String>, offset: usize, message: String) -> ConfigError {
        let (line, column) = line_column(self.text, offset);
        ConfigError::Invalid { path: self.path.to_owned(), line, column, key: key.into(), message }
    }

    /// An optional duration with a default.
    fn duration(
        &self,
        key: impl Into<String>,
        value: Option<&Text>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        value.map_or(Ok(default), |v| self.positive_duration(key, v))
    }

    /// A configured duration: parsed and never zero (a zero interval panics
    /// a timer or spins a loop).
    fn positive_duration(&self, key: impl Into<String>, value: &Text) -> Result<Duration, ConfigError> {
        let v = value.get_ref();
        match proto::parse_duration(v) {
            Some(d) if !d.is_zero() => Ok(d),
            Some(_) => Err(self.invalid(key, value, format!("{v:?} must be greater than zero"))),
            None => {
                let message = format!("{v:?} is not a duration; write e.g. \"500ms\", \"30s\", \"5m\" or \"1h\"");
                Err(self.invalid(key, value, message))
            }
        }
    }

    /// A service's `user`: it must exist on this host.
    fn user(&self, key: &str, user: Option<&Text>) -> Result<Option<String>, ConfigError> {
        let Some(u) = user else { return Ok(None) };
        match nix::unistd::User::from_name(u.get_ref()) {
            Ok(Some(_)) => Ok(Some(u.get_ref().clone())),
            _ => {
                Err(self.invalid(key, u, format!("no user {:?} on this host; create it, or drop `user`", u.get_ref())))
            }
        }
    }

    fn service(
        &self,
        i: usize,
        s: RawService,
        base: &Path,
        earlier: &[ServiceConfig],
    ) -> Result<ServiceConfig, ConfigError> {
        let name = s.name.get_ref();
        let at = format!("service[{i}] ({name})");
        let key = |k: &str| format!("{at}.{k}");
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(self.invalid(key("name"), &s.name, "must be non-empty letters, digits, '-' or '_'".into()));
        }
        if earlier.iter().any(|o| o.name == *name) {
            return Err(self.invalid(key("name"), &s.name, "is used by two services; names must be unique".into()));
        }
        if s.command.get_ref().is_empty() {
            return Err(self.invalid(
                key("command"),
                &s.command,
                "is empty; give the program and its arguments".into(),
            ));
        }
        let stop_signal = match &s.stop_signal {
            Some(sig) => sig.get_ref().parse().map_err(|_| {
                let message = format!("{:?} is not a signal name; write e.g. \"SIGTERM\"", sig.get_ref());
                self.invalid(key("stop_signal"), sig, message)
            })?,
            None => nix::sys::signal::Signal::SIGTERM,
        };
        let mut models: Vec<ModelConfig> = Vec::new();
        for m in &s.models {
            let model = self.model(&format!("{at}.model ({})", m.name.get_ref()), m, &models)?;
            models.push(model);
        }
        let gpus = self.gpus(&key("gpus"), &s, models.iter().any(|m| m.gpu_bytes > 0))?;
        let mut test_commands: Vec<crate::commands::TestCommand> = Vec::new();
        for c in &s.test_commands {
            let command = self.test_command(&format!("{at}.test_command"), c, base, &test_commands)?;
            test_commands.push(command);
        }
        Ok(ServiceConfig {
            gpus,
            test_commands,
            base_url: s.base_url.clone().unwrap_or_else(|| "http://127.0.0.1:{port}".into()),
            stop_grace: self.duration(key("stop_grace"), s.stop_grace.as_ref(), DEFAULT_STOP_GRACE)?,
            readiness: self.readiness(&at, &s.readiness)?,
            restart: self.restart(&at, &s)?,
            on_agent_restart: s.on_agent_restart,
            secrets: s.secrets.iter().map(|(k, p)| (k.clone(), base.join(p))).collect(),
            workdir: s.workdir.map(|w| base.join(w)),
            user: self.user(&key("user"), s.user.as_ref())?,
            memory_limit_bytes: s.memory_limit_mb.map(|mb| mb * 1024 * 1024),
            stop_after_failed_load: s.stop_after_failed_load,
            max_log_bytes: s.max_log_mb.max(1) * 1024 * 1024,
            name: s.name.into_inner(),
            command: s.command.into_inner(),
            port: s.port,
            env: s.env,
            stop_signal,
            models,
        })
    }

    /// One `[[service.test_command]]`, checked: a unique name, a program,
    /// a timeout, test paths that stay relative.
    fn test_command(
        &self,
        at: &str,
        c: &RawTestCommand,
        base: &Path,
        earlier: &[crate::commands::TestCommand],
    ) -> Result<crate::commands::TestCommand, ConfigError> {
        let name = c.name.get_ref();
        let key = |k: &str| format!("{at} ({name}).{k}");
        if name.is_empty() || !name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_') {
            return Err(self.invalid(key("name"), &c.name, "must be non-empty letters, digits, '-' or '_'".into()));
        }
        if earlier.iter().any(|o| &o.name == name) {
            return Err(self.invalid(key("name"), &c.name, "is used twice; test command names must be unique".into()));
        }
        if c.argv.get_ref().is_empty() {
            return Err(self.invalid(key("argv"), &c.argv, "is empty; give the program and its arguments".into()));
        }
        let paths = match &c.paths {
            Some(p) => {
                let path = PathBuf::from(p.get_ref());
                let plain = path.components().all(|part| matches!(part, std::path::Component::Normal(_)));
                if !plain {
                    let why = "must be a relative folder without `..` (test paths are taken under it)".to_owned();
                    return Err(self.invalid(key("paths"), p, why));
                }
                Some(path)
            }
            None => None,
        };
        Ok(crate::commands::TestCommand {
            name: name.clone(),
            argv: c.argv.get_ref().clone(),
            workdir: c.workdir.as_ref().map(|w| base.join(w)),
            timeout: self.duration(key("timeout"), c.timeout.as_ref(), crate::commands::DEFAULT_TIMEOUT)?,
            env: c.env.clone(),
            secrets: c.secrets.iter().map(|(k, p)| (k.clone(), base.join(p))).collect(),
            options: c.options.clone(),
            flags: c.flags.clone(),
            paths,
        })
    }

    /// The service's GPUs: as written, else `auto` when a model declares GPU
    /// memory. Choosing them through `env.CUDA_VISIBLE_DEVICES` as well is
    /// refused: admission would check other devices than the service uses.
    fn gpus(&self, key: &str, s: &RawService, declared: bool) -> Result<Option<GpuPin>, ConfigError> {
        let by_env = s.env.contains_key(CUDA_VISIBLE_DEVICES);
        let Some(raw) = &s.gpus else {
            if declared && by_env {
                return Err(self.invalid(
                    format!("{key} (env.{CUDA_VISIBLE_DEVICES})"),
                    &s.name,
                    format!(
                        "a model declares gpu_mb but the devices come from env.{CUDA_VISIBLE_DEVICES}: write \
                         `gpus = [..]` instead, so admission checks the devices the service uses"
                    ),
                ));
            }
            return Ok(declared.then_some(GpuPin::Auto));
        };
        if by_env {
            let message = format!("and env.{CUDA_VISIBLE_DEVICES} both choose the GPUs: keep `gpus` only");
            return Err(self.invalid(key, raw, message));
        }
        match raw.get_ref() {
            RawGpus::Word(w) if w == "auto" => Ok(Some(GpuPin::Auto)),
            RawGpus::Word(w) => Err(self.invalid(
                key,
                raw,
                format!("{w:?} is neither \"auto\" nor a list of device indexes like [0, 1]"),
            )),
            RawGpus::Devices(d) if d.is_empty() => {
                Err(self.invalid(key, raw, "is empty: list device indexes, or write \"auto\"".into()))
            }
            RawGpus::Devices(d) => {
                let mut unique = d.clone();
                unique.sort_unstable();
                unique.dedup();
                if unique.len() != d.len() {
                    return Err(self.invalid(key, raw, format!("lists a device twice: {d:?}")));
                }
                Ok(Some(GpuPin::Devices(d.clone())))
            }
        }
    }

    fn restart(&self, at: &str, s: &RawService) -> Result<RestartPolicy, ConfigError> {
        let key = |k: &str| format!("{at}.{k}");
        let restart = RestartPolicy {
            mode: s.restart,
            backoff: self.duration(key("restart_backoff"), s.restart_backoff.as_ref(), Duration::from_secs(1))?,
            backoff_max: self.duration(
                key("restart_backoff_max"),
                s.restart_backoff_max.as_ref(),
                Duration::from_secs(60),
            )?,
            stable_after: self.duration(key("stable_after"), s.stable_after.as_ref(), Duration::from_secs(60))?,
        };
        // The defaults are in order, so at least one of the two is in the file.
        match s.restart_backoff.as_ref().or(s.restart_backoff_max.as_ref()) {
            Some(given) if restart.backoff > restart.backoff_max => {
                Err(self.invalid(key("restart_backoff"), given, "is longer than restart_backoff_max".into()))
            }
            _ => Ok(restart),
        }
    }

    fn readiness(&self, at: &str, r: &RawReadiness) -> Result<Readiness, ConfigError> {
        let key = |k: &str| format!("{at}.readiness.{k}");
        let protocol = self.protocol(at, r)?;
        // Where the first option that only health-json reads is, if any is given.
        let health_json_only = [
            r.status_pointer.as_ref().map(Spanned::span),
            r.progress_pointer.as_ref().map(Spanned::span),
            r.progress_scale.as_ref().map(Spanned::span),
            r.status_map.as_ref().map(Spanned::span),
        ]
        .into_iter()
        .flatten()
        .map(|span| span.start)
        .min();
        if let Some(offset) = health_json_only
            && !matches!(protocol, Protocol::HealthJson(_))
        {
            let name = r.protocol.as_ref().map_or("health-json", |p| p.get_ref());
            let message = format!(
                "status_pointer, progress_pointer, progress_scale and status_map only apply to health-json, not {name}"
            );
            return Err(self.invalid_at(format!("{at}.readiness"), offset, message));
        }
        Ok(Readiness {
            protocol,
            poll_ceiling: self.duration(key("poll_ceiling"), r.poll_ceiling.as_ref(), DEFAULT_POLL_CEILING)?,
            live_poll: self.duration(key("live_poll"), r.live_poll.as_ref(), DEFAULT_LIVE_POLL)?,
            load_path: r.load_path.clone().unwrap_or_else(|| "/models/{model}/load".into()),
            load_body: r.load_body.clone(),
        })
    }

    fn protocol(&self, at: &str, r: &RawReadiness) -> Result<Protocol, ConfigError> {
        let key = |k: &str| format!("{at}.readiness.{k}");
        let Some(protocol) = &r.protocol else { return Ok(Protocol::HealthJson(self.health_json(at, r)?)) };
        let name = protocol.get_ref().as_str();
        Ok(match (name, &r.path) {
            ("health-json", _) => Protocol::HealthJson(self.health_json(at, r)?),
            ("kserve-v2" | "openai" | "tgi" | "ollama", Some(path)) => {
                let message = format!("only applies to health-json and http, not {name} (its paths are fixed)");
                return Err(self.invalid(key("path"), path, message));
            }
            ("kserve-v2", None) => Protocol::KserveV2,
            ("openai", None) => Protocol::OpenAi,
            ("tgi", None) => Protocol::Tgi,
            ("ollama", None) => Protocol::Ollama,
            ("http", Some(path)) => Protocol::Http { path: path.get_ref().clone() },
            ("http", None) => {
                let message = "the http protocol needs a path, e.g. \"/ready\"".into();
                return Err(self.invalid(key("path"), protocol, message));
            }
            (other, _) => {
                let message = format!("{other:?} is not a readiness protocol; use one of {:?}", Protocol::NAMES);
                return Err(self.invalid(key("protocol"), protocol, message));
            }
        })
    }

    fn health_json(&self, at: &str, r: &RawReadiness) -> Result<HealthJson, ConfigError> {
        let key = |k: &str| format!("{at}.readiness.{k}");
        let mut map = HealthJson::default_map();
        for (status, stage) in r.status_map.iter().flat_map(|m| m.get_ref()) {
            let st = Stage::from_str_name(stage.get_ref())
                .ok_or_else(|| self.invalid(key(&format!("status_map.{status}")), stage, bad_stage(stage.get_ref())))?;
            map.insert(status.clone(), st);
        }
        let progress_scale = match &r.progress_scale {
            None => ProgressScale::Auto,
            Some(scale) => match scale.get_ref().as_str() {
                "auto" => ProgressScale::Auto,
                "fraction" => ProgressScale::Fraction,
                "percent" => ProgressScale::Percent,
                other => {
                    let message = format!("{other:?}: expected \"auto\", \"fraction\" (0–1) or \"percent\" (0–100)");
                    return Err(self.invalid(key("progress_scale"), scale, message));
                }
            },
        };
        let pointer = |p: &Option<Text>, default: &str| p.as_ref().map_or(default, |p| p.get_ref()).to_owned();
        Ok(HealthJson {
            path: r.path.as_ref().map_or("/health", |p| p.get_ref()).to_owned(),
            status_pointer: pointer(&r.status_pointer, "/models/{model}/status"),
            progress_pointer: pointer(&r.progress_pointer, "/models/{model}/progress"),
            error_pointer: r.error_pointer.clone().unwrap_or_else(|| "/models/{model}/error".into()),
            map,
            progress_scale,
        })
    }

    fn model(&self, at: &str, m: &RawModel, earlier: &[ModelConfig]) -> Result<ModelConfig, ConfigError> {
        let key = |k: &str| format!("{at}.{k}");
        let name = m.name.get_ref();
        if earlier.iter().any(|o| o.name == *name) {
            return Err(self.invalid(key("name"), &m.name, "is listed twice".into()));
        }
        let timeout = m.timeout.as_ref().map(|t| self.positive_duration(key("timeout"), t)).transpose()?;
        let served_as = m.served_as.clone().unwrap_or_else(|| name.clone());
        Ok(ModelConfig {
            name: name.clone(),
            load: m.load,
            timeout,
            ram_bytes: m.ram_mb * 1024 * 1024,
            gpu_bytes: m.gpu_mb * 1024 * 1024,
            stall: self.stall(at, m)?,
            log_patterns: self.log_patterns(at, m, &served_as)?,
            warmup: self.warmup(at, m.warmup.as_ref())?,
            served_as,
        })
    }

    /// A configured `default` replaces every built-in limit; named stages then override it.
    fn stall(&self, at: &str, m: &RawModel) -> Result<StallLimits, ConfigError> {
        let mut stall = StallLimits::default();
        let is_default = |k: &Text| k.get_ref() == "default";
        let ordered =
            m.stall.iter().filter(|(k, _)| is_default(k)).chain(m.stall.iter().filter(|(k, _)| !is_default(k)));
        for (stage, value) in ordered {
            let key = format!("{at}.stall.{}", stage.get_ref());
            let limit = self.positive_duration(key.clone(), value)?;
            if is_default(stage) {
                stall = StallLimits { default: limit, per_stage: BTreeMap::new() };
            } else {
                let st = Stage::from_str_name(stage.get_ref())
                    .filter(|s| Stage::LOADING.contains(s))
                    .ok_or_else(|| self.invalid(key, stage, bad_loading_stage(stage.get_ref())))?;
                stall.per_stage.insert(st as i32, limit);
            }
        }
        Ok(stall)
    }

    /// Later stages first, so a line naming two stages counts as the later one.
    fn log_patterns(&self, at: &str, m: &RawModel, served_as: &str) -> Result<Vec<(Stage, regex::Regex)>, ConfigError> {
        let mut patterns = Vec::new();
        for (stage, pattern) in &m.log_patterns {
            let key = format!("{at}.log_patterns.{}", stage.get_ref());
            let st = Stage::from_str_name(stage.get_ref())
                .filter(|s| Stage::LOADING.contains(s) || *s == Stage::Failed)
                .ok_or_else(|| self.invalid(key.clone(), stage, bad_loading_stage(stage.get_ref())))?;
            let text = pattern.get_ref().replace("{model}", &regex::escape(served_as));
            let re =
                regex::Regex::new(&text).map_err(|e| self.invalid(key, pattern, format!("not a valid regex: {e}")))?;
            patterns.push((st, re));
        }
        patterns.sort_by_key(|(st, _)| std::cmp::Reverse(*st as i32));
        Ok(patterns)
    }

    fn warmup(&self, at: &str, w: Option<&RawWarmup>) -> Result<Option<Warmup>, ConfigError> {
        let Some(w) = w else { return Ok(None) };
        let method = match &w.method {
            Some(m) if !HTTP_METHODS.contains(&m.get_ref().to_uppercase().as_str()) => {
                let message = format!("{:?} is not an HTTP method; use one of {HTTP_METHODS:?}", m.get_ref());
                return Err(self.invalid(format!("{at}.warmup.method"), m, message));
            }
            Some(m) => m.get_ref().to_uppercase(),
            None => "POST".to_owned(),
        };
        Ok(Some(Warmup {
            method,
            path: w.path.clone(),
            body: w.body.clone(),
            expect_status: w.expect_status,
            timeout: self.duration(format!("{at}.warmup.timeout"), w.timeout.as_ref(), DEFAULT_WARMUP_TIMEOUT)?,
        }))
    }
}

/// 1-based line and column (in characters, as toml counts them) of a byte
/// offset in the file.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (before.matches('\n').count() + 1, before[line_start..].chars().count() + 1)
}

fn bad_stage(value: &str) -> String {
    format!(
        "{value:?} is not a stage; use one of READY, FAILED, AUTHENTICATING, DOWNLOADING, LOADING_WEIGHTS, WARMING_UP"
    )
}

fn bad_loading_stage(value: &str) -> String {
    format!(
        "{value:?} is not a loading stage; use one of PROCESS_STARTING, WAITING_FOR_HTTP, AUTHENTICATING, \
         DOWNLOADING, LOADING_WEIGHTS, WARMING_UP (or `default`; FAILED for log patterns)"
    )
}

/// `MODEL_LOADING_TIMEOUT` as the agent reads it (seconds): checked once at
/// start, so a typo is an error rather than a silently ignored setting, and
/// zero never fails every load.
pub fn check_load_timeout_env(value: Option<&str>) -> Result<(), ConfigError> {
    let Some(v) = value else { return Ok(()) };
    match v.trim().parse::<f64>() {
        Ok(secs) if secs > 0.0 && Duration::try_from_secs_f64(secs).is_ok() => Ok(()),
        _ => Err(ConfigError::Env { value: v.to_owned() }),
    }
}

/// Load timeout precedence below the controller's override (which carries the
/// CLI flag and the suite): `MODEL_LOADING_TIMEOUT` > agent config > default.
pub fn load_timeout(override_: Option<Duration>, env: Option<&str>, configured: Option<Duration>) -> Duration {
    override_
        .or_else(|| env.and_then(|v| v.trim().parse::<f64>().ok()).and_then(|s| Duration::try_from_secs_f64(s).ok()))
        .or(configured)
        .unwrap_or(DEFAULT_LOAD_TIMEOUT)
}

/// Where the limit `load_timeout` picked came from, for the timeout message:
/// the controller's own words for an override (`requested_by`), else the
/// agent's source.
pub fn load_timeout_source(
    override_: Option<Duration>,
    requested_by: &str,
    env: Option<&str>,
    configured: Option<Duration>,
) -> String {
    let env_set = env.and_then(|v| v.trim().parse::<f64>().ok()).and_then(|s| Duration::try_from_secs_f64(s).ok());
    if override_.is_some() {
        return if requested_by.is_empty() { "the controller's request".into() } else { requested_by.to_owned() };
    }
    if env_set.is_some() {
        return format!("{LOAD_TIMEOUT_ENV} on the agent");
    }
    if configured.is_some() {
        return "the model's `timeout` in the agent config".into();
    }
    "the agent's built-in default".into()
}

/// A TOML error with what the user most likely meant, where we know it.
fn with_hint(message: String) -> String {
    if message.contains("[service.command]") {
        return format!(
            "{message}hint: a service's `command` is how it starts; the commands a suite may run are \
             `[[service.test_command]]` (docs/agent.md)\n"
        );
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_message_names_the_source_that_set_the_limit() {
        let s = Some(Duration::from_secs(1));
        // (override, requested by, env, config) → source
        let table = [
            (s, "--model-timeout", Some("2"), s, "--model-timeout"),
            (s, "", None, None, "the controller's request"),
            (None, "", Some("2"), s, "MODEL_LOADING_TIMEOUT on the agent"),
            (None, "", Some("junk"), s, "the model's `timeout` in the agent config"),
            (None, "", None, None, "the agent's built-in default"),
        ];
        for (o, by, env, config, want) in table {
            assert_eq!(load_timeout_source(o, by, env, config), want, "{o:?} {by:?} {env:?} {config:?}");
        }
    }

    const GOOD: &str = r#"
listen = "127.0.0.1:0"
data_dir = "data"

[[service]]
name = "translation"
command = ["sim", "--port", "{port}"]
secrets = { HF_TOKEN = "aya.token" }
stop_grace = "2s"

[[service.model]]
name = "nllb"
timeout = "5m"
ram_mb = 300

[[service.model]]
name = "aya"
load = "endpoint"
"#;

    #[test]
    fn parses_and_resolves_paths_next_to_the_file() {
        let c = Config::parse(GOOD, Path::new("/etc/proctor/agent.toml")).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/etc/proctor/data"));
        let s = &c.services[0];
        assert_eq!(s.secrets["HF_TOKEN"], PathBuf::from("/etc/proctor/aya.token"));
        assert_eq!(s.stop_grace, Duration::from_secs(2));
        assert_eq!(s.models[0].timeout, Some(Duration::from_secs(300)));
        assert_eq!(s.models[0].ram_bytes, 300 * 1024 * 1024);
        assert_eq!(s.models[1].load, LoadMode::Endpoint);
        assert_eq!(s.readiness.poll_ceiling, DEFAULT_POLL_CEILING);
    }

    #[test]
    fn zero_durations_that_would_spin_or_panic_are_refused() {
        let cases = [
            ("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:0\"\ntelemetry_interval = \"0s\"", "telemetry_interval"),
            (
                "stop_grace = \"2s\"",
                "stop_grace = \"2s\"\nreadiness = { poll_ceiling = \"0s\" }",
                "readiness.poll_ceiling",
            ),
            ("timeout = \"5m\"", "timeout = \"0s\"", "(nllb).timeout"),
            (
                "listen = \"127.0.0.1:0\"",
                "listen = \"127.0.0.1:0\"\nkeepalive_interval = \"0ms\"",
                "keepalive_interval",
            ),
        ];
        for (from, to, key) in cases {
            let err = Config::parse(&GOOD.replace(from, to), Path::new("agent.toml")).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("must be greater than zero"), "{key}: {err}");
        }
    }

    /// The error for GOOD with `from` replaced by `to`.
    fn error_for(from: &str, to: &str) -> String {
        let text = GOOD.replace(from, to);
        assert_ne!(text, GOOD, "{from:?} is not in GOOD");
        Config::parse(&text, Path::new("agent.toml")).unwrap_err().to_string()
    }

    /// Value errors say where the value is, as toml does for unknown keys and
    /// enum values, then the key and the fix.
    fn assert_says(err: &str, want: &str, at: &str) {
        assert!(err.contains(want), "{err:?} should contain {want:?}");
        assert!(err.contains(&format!("agent.toml, {at}: ")), "{err:?} should say {at:?}");
    }

    #[test]
    fn top_level_and_service_value_errors_say_their_line_and_column() {
        // (replace, with, key and message, line and column of the value)
        let cases = [
            (
                "stop_grace = \"2s\"",
                "stop_grace = \"soon\"",
                "stop_grace: \"soon\" is not a duration",
                "line 9, column 14",
            ),
            (
                "data_dir",
                "telemetry_interval = \"0s\"\ndata_dir",
                "telemetry_interval: \"0s\" must be",
                "line 3, column 22",
            ),
            ("listen = \"127.0.0.1:0\"", "listen = \"nowhere\"", "listen: \"nowhere\" is not", "line 2, column 10"),
            ("\"translation\"", "\"trans lation\"", "(trans lation).name: must be", "line 6, column 8"),
            ("[\"sim\", \"--port\", \"{port}\"]", "[]", "command: is empty", "line 7, column 11"),
            ("\"2s\"", "\"2s\"\nstop_signal = \"SIGFOO\"", "stop_signal: \"SIGFOO\" is not a", "line 10, column 15"),
            ("\"2s\"", "\"2s\"\nrestart_backoff_max = \"100ms\"", "restart_backoff: is longer", "line 10, column 23"),
            (
                "\"2s\"",
                "\"2s\"\nuser = \"no-such-user\"",
                "user: no user \"no-such-user\" on this host",
                "line 10, column 8",
            ),
            (
                "listen = \"127.0.0.1:0\"",
                "listen = \"0.0.0.0:0\"",
                "auth: the agent would listen on 0.0.0.0:0",
                "line 2, column 10",
            ),
            ("\"2s\"", "\"2s\"\ngpus = \"all\"", "gpus: \"all\" is neither \"auto\" nor", "line 10, column 8"),
            ("\"2s\"", "\"2s\"\ngpus = []", "gpus: is empty: list device indexes", "line 10, column 8"),
            ("\"2s\"", "\"2s\"\ngpus = [1, 1]", "gpus: lists a device twice: [1, 1]", "line 10, column 8"),
            (
                "\"2s\"",
                "\"2s\"\ngpus = [0]\nenv = { CUDA_VISIBLE_DEVICES = \"1\" }",
                "gpus: and env.CUDA_VISIBLE_DEVICES both choose the GPUs",
                "line 10, column 8",
            ),
        ];
        for (from, to, want, at) in cases {
            assert_says(&error_for(from, to), want, at);
        }
    }

    #[test]
    fn readiness_value_errors_say_their_line_and_column() {
        // (readiness, key and message, line and column of the value)
        let cases = [
            ("readiness = { poll_ceiling = \"0s\" }", "readiness.poll_ceiling: \"0s\" must be", "line 10, column 30"),
            ("readiness = { protocol = \"grpc\" }", "protocol: \"grpc\" is not a readiness", "line 10, column 26"),
            ("readiness = { protocol = \"http\" }", "readiness.path: the http protocol needs", "line 10, column 26"),
            ("readiness = { progress_scale = \"ratio\" }", "progress_scale: \"ratio\": expected", "line 10, column 32"),
            ("readiness = { status_map = { up = \"UP\" } }", "status_map.up: \"UP\" is not a", "line 10, column 35"),
            (
                "readiness = { protocol = \"tgi\", path = \"/ready\" }",
                "readiness.path: only applies to health-json and http",
                "line 10, column 40",
            ),
            (
                "readiness = { protocol = \"openai\", progress_scale = \"percent\" }",
                "readiness: status_pointer, progress_pointer, progress_scale and status_map only apply",
                "line 10, column 53",
            ),
            (
                "[service.readiness]\nprotocol = \"ollama\"\n[service.readiness.status_map]\nup = \"READY\"",
                "only apply to health-json, not ollama",
                "line 12, column 1",
            ),
        ];
        for (readiness, want, at) in cases {
            assert_says(&error_for("stop_grace = \"2s\"", &format!("stop_grace = \"2s\"\n{readiness}")), want, at);
        }
    }

    #[test]
    fn model_value_errors_say_their_line_and_column() {
        // (replace, with, key and message, line and column of the value; of
        // the key for a stage name)
        let cases = [
            ("timeout = \"5m\"", "timeout = \"0s\"", "(nllb).timeout: \"0s\" must be", "line 13, column 11"),
            ("name = \"aya\"", "name = \"nllb\"", "(nllb).name: is listed twice", "line 17, column 8"),
            ("ram_mb = 300", "stall = { default = \"0s\" }", "stall.default: \"0s\" must be", "line 14, column 21"),
            ("ram_mb = 300", "stall = { LOADING = \"1m\" }", "stall.LOADING: \"LOADING\" is not", "line 14, column 11"),
            ("ram_mb = 300", "log_patterns = { LOADING = \"x\" }", "LOADING: \"LOADING\" is not", "line 14, column 18"),
            ("ram_mb = 300", "log_patterns = { DOWNLOADING = \"(\" }", "not a valid regex", "line 14, column 32"),
            (
                "ram_mb = 300",
                "warmup = { method = \"FETCH\", path = \"/x\" }",
                "method: \"FETCH\" is",
                "line 14, column 21",
            ),
            (
                "ram_mb = 300",
                "warmup = { path = \"/x\", timeout = \"0s\" }",
                "warmup.timeout: \"0s\"",
                "line 14, column 35",
            ),
        ];
        for (from, to, want, at) in cases {
            assert_says(&error_for(from, to), want, at);
        }
    }

    #[test]
    fn the_agents_model_loading_timeout_must_be_a_positive_number_of_seconds() {
        // (value, accepted)
        for (value, ok) in [("900", true), ("2.5", true), (" 60 ", true), ("abc", false), ("0", false), ("-5", false)] {
            assert_eq!(check_load_timeout_env(Some(value)).is_ok(), ok, "{value:?}");
        }
        assert!(check_load_timeout_env(None).is_ok());
        let err = check_load_timeout_env(Some("abc")).unwrap_err().to_string();
        assert!(err.contains("MODEL_LOADING_TIMEOUT=\"abc\"") && err.contains("seconds"), "{err}");
    }

    #[test]
    fn enum_like_values_are_errors_with_line_and_column() {
        // (replace, with, expected in the message)
        let cases = [
            ("load = \"endpoint\"", "load = \"lazy\"", "line 18, column 8"),
            ("stop_grace = \"2s\"", "stop_grace = \"2s\"\nrestart = \"sometimes\"", "line 10, column 11"),
            ("stop_grace = \"2s\"", "stop_grace = \"2s\"\non_agent_restart = \"adopt\"", "line 10, column 20"),
        ];
        for (from, to, at) in cases {
            let err = Config::parse(&GOOD.replace(from, to), Path::new("agent.toml")).unwrap_err().to_string();
            assert!(err.contains(at) && err.contains("unknown variant"), "{err}");
        }
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let cases = [
            (GOOD.replace("stop_grace = \"2s\"", "stop_grace = \"soon\""), "stop_grace: \"soon\" is not a duration"),
            (GOOD.replace("ram_mb = 300", "ram = 300"), "unknown field `ram`"),
            (GOOD.replace("command = [\"sim\", \"--port\", \"{port}\"]", "command = []"), "command: is empty"),
            (GOOD.replace("listen = \"127.0.0.1:0\"", "listen = \"nowhere\""), "listen: \"nowhere\" is not an address"),
            (
                GOOD.replace("ram_mb = 300", "stall = { LOADING = \"1m\" }"),
                "stall.LOADING: \"LOADING\" is not a loading stage",
            ),
            (
                GOOD.replace("ram_mb = 300", "log_patterns = { DOWNLOADING = \"(\" }"),
                "log_patterns.DOWNLOADING: not a valid regex",
            ),
            (
                GOOD.replace("stop_grace = \"2s\"", "stop_grace = \"2s\"\nreadiness = { protocol = \"grpc\" }"),
                "\"grpc\" is not a readiness protocol",
            ),
            (
                GOOD.replace(
                    "stop_grace = \"2s\"",
                    "stop_grace = \"2s\"\nreadiness = { protocol = \"tgi\", path = \"/ready\" }",
                ),
                "readiness.path: only applies to health-json and http, not tgi",
            ),
            (
                GOOD.replace("ram_mb = 300", "warmup = { method = \"FETCH\", path = \"/x\" }"),
                "(nllb).warmup.method: \"FETCH\" is not an HTTP method",
            ),
            (
                format!("{GOOD}\n[[service.command]]\nname = \"e2e\"\nargv = [\"pytest\"]\n"),
                "a service's `command` is how it starts; the commands a suite may run are `[[service.test_command]]`",
            ),
        ];
        for (text, want) in cases {
            let err = Config::parse(&text, Path::new("agent.toml")).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
            assert!(err.contains("agent.toml"), "{err}");
        }
    }

    /// The reference config in docs/agent.md parses, so the docs cannot drift.
    #[test]
    fn the_documented_config_is_valid() {
        let doc = include_str!("../../docs/agent.md");
        let start = doc.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let text = &doc[start..start + doc[start..].find("```").expect("end of block")];
        let c = Config::parse(text, Path::new("/etc/proctor/agent.toml")).unwrap();
        let m = &c.services[0].models[0];
        assert!(m.warmup.is_some() && !m.log_patterns.is_empty());
        assert_eq!(m.stall.for_stage(Stage::Downloading), Duration::from_secs(30 * 60));
        assert_eq!(m.stall.for_stage(Stage::LoadingWeights), Duration::from_secs(10 * 60));
        assert_eq!(
            m.stall.for_stage(Stage::ProcessStarting),
            Duration::from_secs(10 * 60),
            "`default` replaces built-ins"
        );
        let built_in = StallLimits::default();
        assert_eq!(built_in.for_stage(Stage::ProcessStarting), Duration::from_secs(2 * 60));
        assert_eq!(built_in.for_stage(Stage::Downloading), DEFAULT_STALL);
        assert_eq!(c.memory_budget_bytes, Some(120_000 * 1024 * 1024));
    }

    #[test]
    fn the_deploy_example_is_valid() {
        let text = include_str!("../../deploy/agent.example.toml");
        let c = Config::parse(text, Path::new("/etc/proctor/agent.toml")).unwrap();
        let models = &c.services[0].models;
        assert_eq!(models[0].timeout, Some(Duration::from_secs(5 * 60)), "NLLB: 5 min");
        assert_eq!(models[1].timeout, Some(Duration::from_secs(60 * 60)), "Aya: 60 min");
        let pytest = &c.services[0].test_commands[0];
        assert_eq!((pytest.name.as_str(), pytest.timeout), ("e2e-pytest", Duration::from_secs(30 * 60)));
        assert_eq!(pytest.paths.as_deref(), Some(Path::new("tests/e2e")));
        assert_eq!(pytest.secrets["HF_TOKEN"], PathBuf::from("/etc/proctor/hf.token"));
    }

    #[test]
    fn a_test_command_that_could_not_be_run_safely_is_refused_with_its_line() {
        let base = "[[service]]\nname = \"s\"\ncommand = [\"x\"]\n\n[[service.test_command]]\nname = \"e2e\"\nargv = [\"pytest\"]\n";
        for (extra, says) in [
            ("paths = \"../tests\"\n", "service[0] (s).test_command (e2e).paths"),
            ("paths = \"/abs\"\n", "must be a relative folder without `..`"),
            ("timeout = \"0s\"\n", "test_command (e2e).timeout"),
            ("shell = true\n", "unknown field `shell`"),
        ] {
            let err =
                Config::parse(&format!("{base}{extra}"), Path::new("/etc/proctor/agent.toml")).unwrap_err().to_string();
            assert!(err.contains(says), "{extra}: {err}");
        }
        let empty = base.replace("argv = [\"pytest\"]", "argv = []");
        assert!(Config::parse(&empty, Path::new("a.toml")).unwrap_err().to_string().contains("argv"));
    }

    #[test]
    fn load_timeout_precedence() {
        let s = Duration::from_secs;
        // override > env > config > default
        assert_eq!(load_timeout(Some(s(1)), Some("2"), Some(s(3))), s(1));
        assert_eq!(load_timeout(None, Some("2"), Some(s(3))), s(2));
        assert_eq!(load_timeout(None, None, Some(s(3))), s(3));
        assert_eq!(load_timeout(None, Some("junk"), Some(s(3))), s(3));
        assert_eq!(load_timeout(None, None, None), DEFAULT_LOAD_TIMEOUT);
    }
}
