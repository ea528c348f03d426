//! `proctor demo`: the whole product on one machine. Writes a real agent
//! config supervising `proctor sim` (an NLLB-like and a gated Aya-like model,
//! the token supplied from a secret file), starts an agent from it on
//! 127.0.0.1, and runs the example suites through the controller over gRPC,
//! exactly as against a remote agent — over mutual TLS, with a lab CA and
//! certificates it makes in `<out>/certs` (kept and reused on later runs), so
//! the secure path is the everyday path.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The example suites, embedded so the demo runs from any folder.
const SUITES: &[(&str, &str)] = &[
    ("nllb-translate.yaml", include_str!("../../suites/nllb-translate.yaml")),
    ("detect.yaml", include_str!("../../suites/detect.yaml")),
    ("aya-translate.yaml", include_str!("../../suites/aya-translate.yaml")),
    ("multi-model.yaml", include_str!("../../suites/multi-model.yaml")),
    ("health.yaml", include_str!("../../suites/health.yaml")),
];

/// Scaled-down stand-ins: a few hundred MB and a few seconds each.
const NLLB: &str = "nllb:mb=256,download=1500ms,load=3s,warmup=500ms";
const AYA: &str = "aya:mb=384,gated,auth=700ms,download=2s,load=4s,warmup=1s";

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The agent config the demo writes (and a user can copy).
pub fn agent_toml(exe: &Path) -> String {
    let command = [
        exe.display().to_string(),
        "sim".into(),
        "--port".into(),
        "{port}".into(),
        "--model".into(),
        NLLB.into(),
        "--model".into(),
        AYA.into(),
    ];
    let command: Vec<String> = command.iter().map(|s| toml_string(s)).collect();
    format!(
        r#"# Written by `proctor demo`: an agent supervising the reference service.
# Start it yourself with: proctor agent --config {config}
listen = "127.0.0.1:0"
data_dir = "agent-data"
telemetry_interval = "1s"

# Controllers must present a certificate signed by the lab CA (docs/security.md).
[auth]
mode = "mtls"
ca = "certs/ca.pem"
cert = "certs/agent-localhost.pem"
key = "certs/agent-localhost.key"

[[service]]
name = "translation"
command = [{command}]
# 0: the agent picks a free port on every start and puts it in place of {{port}}.
port = 0
base_url = "http://127.0.0.1:{{port}}"
env = {{ RUST_LOG = "info" }}
# The gated model's token comes from a file, never from this config.
secrets = {{ HF_TOKEN = "aya.token" }}
stop_signal = "SIGTERM"
stop_grace = "5s"

[service.readiness]
protocol = "health-json"
path = "/health"

[[service.model]]
name = "nllb"
load = "at_start"
timeout = "5m"
ram_mb = 256
# Ten minutes without any sign of progress (stage, RSS, CPU, I/O) is a stall.
stall = {{ default = "10m" }}
# READY means "can serve": a real translation must succeed first.
[service.model.warmup]
path = "/translate"
body = '{{"text": "Hello", "source_lang": "en", "target_lang": "es", "model": "{{model}}"}}'
expect_status = 200

[[service.model]]
name = "aya"
load = "at_start"
timeout = "60m"
ram_mb = 384
[service.model.warmup]
path = "/translate"
body = '{{"text": "Hello", "source_lang": "en", "target_lang": "de", "model": "{{model}}"}}'
expect_status = 200
"#,
        config = "proctor-out/agent.toml",
        command = command.join(", "),
    )
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The lab CA and the two certificates the demo uses, made once in
/// `<out>/certs` and reused: the agent's (named `localhost` and 127.0.0.1)
/// and the controller's (`demo`).
fn certificates(out: &Path) -> Result<controller::inventory::Access, String> {
    use controller::certs::{self, Kind, Validity};
    let dir = out.join("certs");
    let agent = certs::issued(&dir, Kind::Agent, "localhost");
    let controller_pair = certs::issued(&dir, Kind::Controller, "demo");
    let ca = certs::pair(&dir, "ca");
    let all = [&ca.cert, &ca.key, &agent.cert, &agent.key, &controller_pair.cert, &controller_pair.key];
    if !all.iter().all(|p| p.exists()) {
        // A partial set (an interrupted first run) is made again whole.
        let _ = std::fs::remove_dir_all(&dir);
        let made = certs::init(&dir, Validity::days(825))
            .and_then(|_| certs::issue(&dir, Kind::Agent, "localhost", &["127.0.0.1".into()], Validity::days(825)))
            .and_then(|_| certs::issue(&dir, Kind::Controller, "demo", &[], Validity::days(825)));
        made.map_err(|e| format!("cannot make the demo's certificates: {e}"))?;
    }
    Ok(controller::inventory::Access {
        ca: Some(ca.cert),
        cert: Some(controller_pair.cert),
        key: Some(controller_pair.key),
        token_file: None,
    })
}

/// Writes the demo's files; returns (agent config, suite files).
fn prepare(out: &Path) -> Result<(PathBuf, Vec<PathBuf>), String> {
    let suites_dir = out.join("suites");
    std::fs::create_dir_all(&suites_dir).map_err(|e| format!("cannot create {}: {e}", suites_dir.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the proctor binary itself: {e}"))?;
    let config = out.join("agent.toml");
    write(&config, &agent_toml(&exe))?;
    write(&out.join("aya.token"), "hf_demo_token_not_a_real_secret\n")?;
    // A token file is the owner's only, even the demo's.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(out.join("aya.token"), std::fs::Permissions::from_mode(0o600));
    let mut suites = Vec::new();
    for (name, text) in SUITES {
        let path = suites_dir.join(name);
        write(&path, text)?;
        suites.push(path);
    }
    Ok((config, suites))
}

/// Where the demo's runs are kept, and how they are judged against the
/// baseline the first one sets.
#[derive(Debug)]
pub struct Keep {
    pub store: Option<controller::store::Location>,
    pub tolerance: controller::store::baseline::Tolerance,
}

/// The agent by a stable name, so runs of the demo compare with each other
/// (the address changes every time). The agent's certificate names `localhost`.
fn inventory(out: &Path, addr: &std::net::SocketAddr) -> Result<PathBuf, String> {
    let path = out.join("inventory.toml");
    write(&path, &format!("[[agent]]\nname = \"localhost\"\naddress = \"{addr}\"\n"))?;
    Ok(path)
}

/// The first kept demo sets the baseline for the loads that have none; later
/// ones are compared with it (their summary shows the table). What it says
/// (or the warning, if the store would not take it).
async fn first_baseline(keep: &Keep, result: &controller::RunResult) -> Option<String> {
    let report = result.report.as_ref()?;
    let missing = &report.baseline.as_ref()?.without_baseline;
    let location = keep.store.as_ref()?;
    if missing.is_empty() || result.exit != controller::Exit::Passed {
        return None;
    }
    let now = controller::client::now_unix_ms();
    let entries: Vec<_> = controller::store::baseline::entries(&report.loads, &report.run_id, now)
        .into_iter()
        .filter(|e| missing.contains(&e.key))
        .collect();
    let set = match controller::store::Store::open(location).await {
        Ok(store) => store.set_baseline(&entries).await,
        Err(e) => Err(e),
    };
    let models: Vec<String> = missing.iter().map(ToString::to_string).collect();
    Some(match set {
        Ok(()) => format!("baseline set from this run for {} (the next demo is compared with it)", models.join(", ")),
        Err(e) => format!("warning: the baseline was not set: {e}"),
    })
}

/// Where the demo's files are.
fn files(out: &Path, config_path: &Path, data_dir: &Path, result: &controller::RunResult, keep: &Keep) {
    let _ = writeln!(std::io::stdout(), "\nFiles:");
    let _ = writeln!(std::io::stdout(), "  agent config   {}", config_path.display());
    let _ = writeln!(
        std::io::stdout(),
        "  certificates   {} (mTLS: lab CA, agent, controller)",
        out.join("certs").display()
    );
    let _ = writeln!(std::io::stdout(), "  suites         {}", out.join("suites").display());
    if let Some(j) = &result.junit {
        let _ = writeln!(std::io::stdout(), "  JUnit report   {}", j.display());
    }
    if let Some(j) = &result.files.json {
        let _ = writeln!(std::io::stdout(), "  JSON report    {} (see docs/reports.md)", j.display());
    }
    if let Some(h) = &result.files.html {
        let _ = writeln!(std::io::stdout(), "  HTML report    {} (open it in a browser)", h.display());
    }
    if let Some(m) = &result.files.markdown {
        let _ = writeln!(std::io::stdout(), "  summary        {} (Markdown, for CI)", m.display());
    }
    if let Some(t) = &result.files.trace {
        let _ = writeln!(std::io::stdout(), "  trace          {} (OTLP JSON; see docs/tracing.md)", t.display());
    }
    let _ = writeln!(std::io::stdout(), "  service log    {}", data_dir.join("translation.log").display());
    if let (Some(store), Some(report)) = (&keep.store, &result.report) {
        let _ = writeln!(
            std::io::stdout(),
            "  run store      {store} (proctor runs show {}; proctor trends)",
            report.run_id
        );
    }
}

pub async fn run(
    out: &Path,
    progress: controller::progress::Mode,
    otel: controller::otel::OtelConfig,
    keep: Keep,
    cancel: controller::Interrupt,
) -> ExitCode {
    let prepared = prepare(out).and_then(|(config, suites)| Ok((config, suites, certificates(out)?)));
    let (config_path, suites, access) = match prepared {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match agent::Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(64);
        }
    };
    let data_dir = config.data_dir.clone();
    let agent = match agent::start(config).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let _ = writeln!(
        std::io::stdout(),
        "proctor demo: agent from {} listening on {} (mutual TLS)",
        config_path.display(),
        agent.addr
    );
    let _ = writeln!(
        std::io::stdout(),
        "running {} suites against service `translation` (models nllb, aya)\n",
        suites.len()
    );
    let inventory = match inventory(out, &agent.addr) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = controller::RunOptions {
        progress,
        otel,
        access,
        inventory: Some(inventory),
        store: keep.store.clone(),
        baseline_tolerance: keep.tolerance,
        ..controller::RunOptions::new(Vec::new(), suites, out.to_owned())
    };
    let result = controller::run(opts, cancel).await;
    let baseline_set = first_baseline(&keep, &result).await;
    if let Err(e) = agent.shutdown().await {
        eprintln!("warning: agent shutdown: {e}");
    }
    files(out, &config_path, &data_dir, &result, &keep);
    if let Some(said) = baseline_set {
        let _ = writeln!(std::io::stdout(), "\n{said}");
    }
    ExitCode::from(result.exit as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_config_is_valid_and_embeds_the_suites() {
        let text = agent_toml(Path::new("/opt/my \"odd\" dir/proctor"));
        let config = agent::Config::parse(&text, Path::new("/tmp/out/agent.toml")).unwrap();
        assert_eq!(config.services[0].command[0], "/opt/my \"odd\" dir/proctor");
        assert_eq!(config.services[0].models.len(), 2);
        assert!(config.services[0].models.iter().all(|m| m.warmup.is_some()), "the demo warms both models up");
        for (name, text) in SUITES {
            controller::suite::parse(text, Path::new(name)).unwrap();
        }
    }
}
