//! 1,000 functional cases: `proctor run` against the same cases written as
//! seed-style pytest functions with `requests`. Writes its section of
//! docs/benchmarks.md.
//!
//! Run: `cargo bench -p proctor --bench functional` (needs `pytest` and
//! `requests`: `python3 -m pip install pytest requests`). Each case is
//! `POST /translate` with a status check and a JSON-pointer check. Proctor's
//! suite runs through an agent supervising `proctor sim` (the model already
//! READY: a warm-up run comes first), in order and with `parallel: 8`;
//! pytest runs against a `proctor sim` of its own, the same binary and
//! model. Wall time of the whole command, median of 5 runs each.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_proctor");
const CASES: usize = 1_000;
const ROUNDS: usize = 5;

fn suite(parallel: u32) -> String {
    let mut text = format!("name: functional\nservice: translation\nmodels: [nllb]\nparallel: {parallel}\ncases:\n");
    for i in 0..CASES {
        text.push_str(&format!(
            "  - name: case {i}\n    request: {{method: POST, path: /translate, json: {{text: Hello world, \
             source_lang: en, target_lang: es, model: nllb}}}}\n    expect: {{status: 200, json: [{{pointer: \
             /translated_text, equals: hola mundo}}]}}\n"
        ));
    }
    text
}

fn pytest_file() -> String {
    let mut text = String::from(
        "import os\nimport requests\n\nURL = os.environ['TRANSLATE_API_URL']\nSESSION = requests.Session()\n\n",
    );
    for i in 0..CASES {
        text.push_str(&format!(
            "def test_case_{i}():\n    r = SESSION.post(URL + '/translate', json={{'text': 'Hello world', \
             'source_lang': 'en', 'target_lang': 'es', 'model': 'nllb'}})\n    assert r.status_code == 200\n    \
             assert r.json()['translated_text'] == 'hola mundo'\n\n"
        ));
    }
    text
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn timed(mut command: Command) -> f64 {
    let started = Instant::now();
    let status = command.stdout(Stdio::null()).stderr(Stdio::null()).status().expect("run");
    let took = started.elapsed().as_secs_f64();
    assert!(status.success(), "{command:?} failed: {status}");
    took
}

fn start_agent(dir: &Path) -> (std::process::Child, String) {
    common::start_agent(BIN, dir, &common::one_sim_config(BIN, dir))
}

fn start_sim() -> (std::process::Child, String) {
    let mut sim = Command::new(BIN)
        .args(["sim", "--port", "0", "--model", "nllb:mb=8,load=200ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(sim.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap().trim_end_matches('/').to_owned();
    // Wait for the model, as the agent does for the suite.
    for _ in 0..100 {
        let health = Command::new("python3")
            .args(["-c", &format!("import urllib.request,json;print(json.load(urllib.request.urlopen('{url}/health'))['models']['nllb']['status'])")])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&health.stdout).trim() == "loaded" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    (sim, url)
}

fn main() {
    let dir = std::env::temp_dir().join(format!("proctor-bench-functional-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mut agent, addr) = start_agent(&dir);
    let (mut sim, url) = start_sim();
    let run = |parallel: u32| {
        let file = dir.join(format!("suite-{parallel}.yaml"));
        std::fs::write(&file, suite(parallel)).unwrap();
        let mut c = Command::new(BIN);
        c.args(["run", "--no-store", "--progress", "none", "--agent", &addr, "--out"]).arg(dir.join("out")).arg(&file);
        c
    };
    timed(run(1)); // warm-up: the model loads once
    let sequential = median((0..ROUNDS).map(|_| timed(run(1))).collect());
    let parallel = median((0..ROUNDS).map(|_| timed(run(8))).collect());
    std::fs::write(dir.join("test_functional.py"), pytest_file()).unwrap();
    let pytest = median(
        (0..ROUNDS)
            .map(|_| {
                let mut c = Command::new("python3");
                c.args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "test_functional.py"])
                    .current_dir(&dir)
                    .env("TRANSLATE_API_URL", &url)
                    .env("PYTHONDONTWRITEBYTECODE", "1");
                timed(c)
            })
            .collect(),
    );
    let _ = agent.kill();
    let _ = sim.kill();
    let _ = agent.wait();
    let _ = sim.wait();
    eprintln!("proctor sequential {sequential:.2}s, parallel 8 {parallel:.2}s, pytest {pytest:.2}s");
    let body = format!(
        "## 1,000 functional cases: Proctor and pytest\n\n`cargo bench -p proctor --bench functional`, {machine}: \
         1,000 cases of `POST /translate` with a status and a JSON-pointer check, the whole command timed (median \
         of {ROUNDS}); Proctor through an agent supervising `proctor sim` (model READY), pytest with `requests` (one \
         session) against a `proctor sim` of its own.\n\n| runner | wall time | vs pytest |\n|---|---|---|\n\
         | pytest ({pyver}) | {pytest:.2} s | 1× |\n| `proctor run`, cases in order | {sequential:.2} s | {:.1}× |\n\
         | `proctor run`, `parallel: 8` | {parallel:.2} s | {:.1}× |\n\nThe issue's target is 20×; {}.\n",
        pytest / sequential,
        pytest / parallel,
        if pytest / parallel >= 20.0 { "met with `parallel: 8`" } else { "not met on this machine" },
        machine = common::machine(),
        pyver = pytest_version(),
    );
    common::write_section("functional", &body);
    let _ = std::fs::remove_dir_all(&dir);
}

fn pytest_version() -> String {
    let out = Command::new("python3").args(["-m", "pytest", "--version"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
