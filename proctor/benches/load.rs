//! Proctor's load engine against `wrk` and `oha` at the same concurrency, on
//! the same loopback targets, in one run. Writes its section of
//! docs/benchmarks.md.
//!
//! Run: `cargo bench -p proctor --bench load` (needs `wrk` and `nginx`:
//! `apt-get install wrk nginx`; `oha` is measured when on PATH or in
//! `$OHA`: `cargo install oha`). Two targets, both supervised by one
//! agent so Proctor's load case runs next to them as it would on a lab host:
//! nginx returning a fixed JSON answer (`GET /translate`), and `proctor sim`
//! (`POST /translate`, JSON body). Each tool runs 16 connections for 5 s,
//! three rounds interleaved (wrk, oha, Proctor, wrk, …); medians are shown.
//! wrk and Proctor use 2 threads (wrk's default; Proctor one per core).

use std::path::Path;
use std::process::{Command, Stdio};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_proctor");
const CONNECTIONS: u32 = 16;
const SECONDS: u32 = 5;
const ROUNDS: usize = 3;
/// The third target answers after this delay: there the latency is the
/// service's, not the tools' and the target's fight for the 2 cores.
const DELAY_MS: u32 = 2;
const BODY: &str = r#"{"text":"Hello world","source_lang":"en","target_lang":"es","model":"nllb"}"#;
const FIXED: &str = r#"{"translated_text":"hola mundo","model":"nllb"}"#;

/// What one tool measured: requests per second and p50/p90/p99 in µs.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    rps: f64,
    mean: f64,
    p50: f64,
    p90: f64,
    p99: f64,
}

struct Target {
    name: &'static str,
    service: &'static str,
    model: &'static str,
    url: String,
    post: bool,
    /// Runs flat out: the tools and the target share the cores.
    saturated: bool,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn nginx_conf(dir: &Path, port: u16) -> std::path::PathBuf {
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\nevents {{ \
         worker_connections 1024; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path \
         {d}/scgi;\n  keepalive_requests 1000000;\n  server {{\n    listen 127.0.0.1:{port};\n    default_type \
         application/json;\n    location / {{ return 200 '{FIXED}'; }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    path
}

fn start_agent(dir: &Path, [nginx_port, sim_port, slow_port]: [u16; 3]) -> (std::process::Child, String) {
    let conf = nginx_conf(dir, nginx_port);
    let config = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{data}\"\n\n[[service]]\nname = \"nginx\"\ncommand = \
         [\"nginx\", \"-c\", \"{conf}\"]\nport = {nginx_port}\n[service.readiness]\nprotocol = \"http\"\npath = \
         \"/health\"\n[[service.model]]\nname = \"fixed\"\n\n[[service]]\nname = \"translation\"\ncommand = \
         [\"{BIN}\", \"sim\", \"--port\", \"{{port}}\", \"--model\", \"nllb:mb=8,load=200ms\"]\nport = \
         {sim_port}\n[[service.model]]\nname = \"nllb\"\n\n[[service]]\nname = \"translation-2ms\"\ncommand = \
         [\"{BIN}\", \"sim\", \"--port\", \"{{port}}\", \"--model\", \"nllb:mb=8,load=200ms\", \
         \"--slow-requests\", \"{DELAY_MS}ms\"]\nport = {slow_port}\n[[service.model]]\nname = \"nllb\"\n",
        data = dir.join("data").display(),
        conf = conf.display()
    );
    common::start_agent(BIN, dir, &config)
}

/// `80.00us`, `1.20ms`, `2.00s` → µs.
fn wrk_latency(text: &str) -> f64 {
    let (n, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e6)
    } else {
        (text, 1.0)
    };
    n.parse::<f64>().unwrap_or(0.0) * scale
}

fn wrk(dir: &Path, t: &Target) -> Figures {
    let mut c = Command::new("wrk");
    c.args(["-t2", &format!("-c{CONNECTIONS}"), &format!("-d{SECONDS}s"), "--latency"]);
    if t.post {
        let script = dir.join("post.lua");
        std::fs::write(
            &script,
            format!(
                "wrk.method = \"POST\"\nwrk.body = '{BODY}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
            ),
        )
        .unwrap();
        c.arg("-s").arg(script);
    }
    let out = c.arg(format!("{}/translate", t.url)).output().expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut f = Figures::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["Requests/sec:", n] => f.rps = n.parse().unwrap_or(0.0),
            ["Latency", avg, _, _, _] => f.mean = wrk_latency(avg),
            ["50%", v] => f.p50 = wrk_latency(v),
            ["90%", v] => f.p90 = wrk_latency(v),
            ["99%", v] => f.p99 = wrk_latency(v),
            _ => {}
        }
    }
    assert!(f.rps > 0.0, "wrk said:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    f
}

fn oha_bin() -> Option<String> {
    let candidates = [std::env::var("OHA").unwrap_or_default(), "oha".into(), "/opt/oha/bin/oha".into()];
    candidates.into_iter().find(|c| !c.is_empty() && Command::new(c).arg("--version").output().is_ok())
}

fn oha(bin: &str, t: &Target) -> Figures {
    let mut c = Command::new(bin);
    c.args(["-z", &format!("{SECONDS}s"), "-c", &CONNECTIONS.to_string(), "--no-tui", "--output-format", "json"]);
    if t.post {
        c.args(["-m", "POST", "-d", BODY, "-H", "Content-Type: application/json"]);
    }
    let out = c.arg(format!("{}/translate", t.url)).output().expect("oha");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("oha's JSON: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let p = |k: &str| json["latencyPercentiles"][k].as_f64().unwrap_or(0.0) * 1e6;
    Figures {
        rps: json["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        mean: json["summary"]["average"].as_f64().unwrap_or(0.0) * 1e6,
        p50: p("p50"),
        p90: p("p90"),
        p99: p("p99"),
    }
}

fn proctor(dir: &Path, agent: &str, t: &Target) -> Figures {
    let request = match t.post {
        true => {
            format!("{{method: POST, path: /translate, body: '{BODY}', headers: {{content-type: application/json}}}}")
        }
        false => "{method: GET, path: /translate}".to_owned(),
    };
    let suite = format!(
        "name: load-{service}\nservice: {service}\nmodels: [{model}]\ncases:\n  - name: {service}\n    request: {request}\n    \
         load: {{connections: {CONNECTIONS}, duration: {SECONDS}s}}\n",
        service = t.service,
        model = t.model
    );
    let file = dir.join(format!("{}.yaml", t.service));
    std::fs::write(&file, suite).unwrap();
    let out_dir = dir.join(format!("out-{}", t.service));
    let status = Command::new(BIN)
        .args(["run", "--no-store", "--progress", "none", "--agent", agent, "--out"])
        .arg(&out_dir)
        .arg(&file)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "proctor run {}: {status}", t.name);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("report.json")).unwrap()).unwrap();
    let l = &json["cases"][0]["load"];
    let us = |k: &str| l[k].as_f64().unwrap_or(0.0);
    Figures { rps: us("rps"), mean: us("mean_us"), p50: us("p50_us"), p90: us("p90_us"), p99: us("p99_us") }
}

fn median(mut v: Vec<Figures>) -> Figures {
    let mid = |f: fn(&Figures) -> f64, v: &mut Vec<Figures>| {
        v.sort_by(|a, b| f(a).total_cmp(&f(b)));
        f(&v[v.len() / 2])
    };
    Figures {
        rps: mid(|f| f.rps, &mut v),
        mean: mid(|f| f.mean, &mut v),
        p50: mid(|f| f.p50, &mut v),
        p90: mid(|f| f.p90, &mut v),
        p99: mid(|f| f.p99, &mut v),
    }
}

fn ms(us: f64) -> String {
    format!("{:.2} ms", us / 1000.0)
}

fn rows(target: &Target, wrk: Figures, oha: Option<Figures>, proctor: Figures) -> String {
    let row = |tool: &str, f: Figures| {
        format!(
            "| {} | {tool} | {:.0} | {:.2}× | {} | {} | {} | {} | {} |\n",
            target.name,
            f.rps,
            f.rps / wrk.rps,
            ms(f.mean),
            ms(f64::from(CONNECTIONS) * 1e6 / f.rps),
            ms(f.p50),
            ms(f.p90),
            ms(f.p99)
        )
    };
    let mut out = row("wrk 4.1", wrk);
    match oha {
        Some(o) => out.push_str(&row("oha", o)),
        None => out.push_str(&format!("| {} | oha | not installed | | | | | | |\n", target.name)),
    }
    out.push_str(&row("Proctor load case", proctor));
    out
}

/// Three interleaved rounds of each tool against one target: medians.
fn measure(dir: &Path, agent: &str, t: &Target, oha_bin: Option<&str>) -> (Figures, Option<Figures>, Figures) {
    proctor(dir, agent, t); // the first run waits for the service; not measured
    let (mut w, mut o, mut p) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        w.push(wrk(dir, t));
        if let Some(bin) = oha_bin {
            o.push(oha(bin, t));
        }
        p.push(proctor(dir, agent, t));
    }
    let (w, p) = (median(w), median(p));
    let o = (!o.is_empty()).then(|| median(o));
    eprintln!("{}: wrk {w:?}\noha {o:?}\nproctor {p:?}", t.name);
    (w, o, p)
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "not met" }
}

/// Proctor's figures against wrk's, one clause per target.
struct Verdicts {
    rps: Vec<String>,
    percentiles: Vec<String>,
    little: Vec<String>,
}

impl Verdicts {
    fn add(&mut self, t: &Target, w: Figures, p: Figures) {
        let ratio = p.rps / w.rps;
        self.rps.push(format!("{} {ratio:.2}× wrk ({})", t.name, met(ratio >= 0.9)));
        let (p50, p99) = (p.p50 / w.p50, p.p99 / w.p99);
        let close = |r: f64| (0.9..=1.1).contains(&r);
        let within = met(close(p50) && close(p99));
        let flat_out = if t.saturated { ", flat out" } else { "" };
        self.percentiles.push(format!("{} p50 {p50:.2}×, p99 {p99:.2}× wrk's ({within}{flat_out})", t.name));
        let little = |f: Figures| (f.mean / (f64::from(CONNECTIONS) * 1e6 / f.rps) - 1.0) * 100.0;
        self.little.push(format!("{}: wrk {:+.0} %, Proctor {:+.0} %", t.name, little(w), little(p)));
    }
}

fn write_doc(table: &str, v: &Verdicts) {
    let body = format!(
        "## Load engine: Proctor, wrk and oha\n\n`cargo bench -p proctor --bench load`, {machine}: {CONNECTIONS} \
         connections for {SECONDS} s per tool, median of {ROUNDS} interleaved rounds, on loopback; the tools and \
         the target share the machine's cores. Targets: nginx (1 worker) returning a fixed JSON answer, \
         `proctor sim` (`POST /translate`) as fast as it can, and the sim answering every request after \
         {DELAY_MS} ms (`--slow-requests {DELAY_MS}ms`). Proctor's figures are its load case's own (report.json), \
         run by the agent supervising the target; wrk with 2 threads and `--latency`.\n\n{table}\nThe target is \
         ≥ 0.9× wrk's requests/s: {}.\n\nLatency percentiles against wrk's: {}. Where the latency is the \
         service's ({DELAY_MS} ms answers, the machine mostly idle) the tools must agree within 10 %. Where \
         nginx and the sim run flat out, the tools and the target fight for the same cores and each tool's \
         percentiles say as much about its own event loop as about the target: in a closed loop the mean \
         latency must equal connections ÷ requests/s (Little's law, the `16 ÷ requests/s` column), and where \
         a tool's mean is above it, that tool counted time the answer spent waiting in its own queue. Mean \
         against it: {}.\n",
        v.rps.join(", "),
        v.percentiles.join("; "),
        v.little.join("; "),
        machine = common::machine(),
    );
    common::write_section("load", &body);
}

fn main() {
    let dir = std::env::temp_dir().join(format!("proctor-bench-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let (mut agent, addr) = start_agent(&dir, ports);
    let target = |name, service, port, post, saturated| Target {
        name,
        service,
        model: if post { "nllb" } else { "fixed" },
        url: format!("http://127.0.0.1:{port}"),
        post,
        saturated,
    };
    let targets = [
        target("nginx", "nginx", ports[0], false, true),
        target("sim", "translation", ports[1], true, true),
        target("sim, 2 ms answers", "translation-2ms", ports[2], true, false),
    ];
    let oha_bin = oha_bin();
    let mut table = String::from(
        "| target | tool | requests/s | vs wrk | mean | 16 ÷ requests/s | p50 | p90 | p99 |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let mut verdicts = Verdicts { rps: Vec::new(), percentiles: Vec::new(), little: Vec::new() };
    for t in &targets {
        let (w, o, p) = measure(&dir, &addr, t, oha_bin.as_deref());
        verdicts.add(t, w, p);
        table.push_str(&rows(t, w, o, p));
    }
    // SIGTERM: the agent stops its services (nginx, the sims) on the way out.
    let _ = Command::new("kill").arg(agent.id().to_string()).status();
    let _ = agent.wait();
    let _ = Command::new("pkill").args(["-f", &format!("nginx -c {}", dir.join("nginx.conf").display())]).status();
    write_doc(&table, &verdicts);
    let _ = std::fs::remove_dir_all(&dir);
}
