//! Test commands: the existing test suites (pytest…) the agent's config lets
//! a suite run next to a service (`[[service.test_command]]`). Owns the
//! allow-list check of a suite's arguments (pure), the command line and
//! environment a run gets (pure), running one in its own process group under
//! a timeout, and reading the JUnit file it wrote into per-test results.
//! Nothing here runs a shell.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use proto::{TestOutcome, TestResult};

/// One command a suite may run, as the agent's config names it.
#[derive(Clone, Debug, PartialEq)]
pub struct TestCommand {
    pub name: String,
    /// Program and arguments; `{url}`, `{port}`, `{junit}` and `{models}`
    /// are filled in. The suite's arguments follow.
    pub argv: Vec<String>,
    pub workdir: Option<PathBuf>,
    pub timeout: Duration,
    /// Variables it gets (values may use the same placeholders), besides
    /// PATH, HOME, LANG, TZ and the `PROCTOR_*` ones.
    pub env: BTreeMap<String, String>,
    /// Variable → file whose trimmed contents are its value (redacted in all
    /// it prints).
    pub secrets: BTreeMap<String, PathBuf>,
    /// Options a suite may add, each followed by one value (`-k EXPR`), or
    /// written `--opt=value`.
    pub options: Vec<String>,
    /// Options a suite may add that take no value (`-x`, `-v`).
    pub flags: Vec<String>,
    /// Test paths a suite may add: relative, under this folder (relative to
    /// the workdir). `None`: none.
    pub paths: Option<PathBuf>,
}

/// The default time a command may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// What a command's output keeps: its last bytes.
const OUTPUT_TAIL: usize = 16 * 1024;

/// Characters a shell would read as its own; never in a suite's argument.
const SHELL_CHARACTERS: &[char] = &[';', '|', '&', '$', '`', '<', '>', '\\', '\n', '\r', '\0'];

/// Whether the suite's `args` may be given to `cmd`: options from its list
/// (each with its value), test paths under its `paths`, no shell characters.
pub fn check_args(cmd: &TestCommand, args: &[String]) -> Result<(), String> {
    let name = &cmd.name;
    if let Some(bad) = args.iter().find(|a| a.contains(SHELL_CHARACTERS)) {
        return Err(format!(
            "argument {bad:?} for command {name} holds a shell character (; | & $ ` < > \\ or a newline); \
             commands run without a shell and take none"
        ));
    }
    if let Some(bad) = args.iter().find(|a| a.starts_with('@')) {
        return Err(format!(
            "argument {bad:?} for command {name} starts with '@', which makes pytest read arguments from a file; \
             not allowed"
        ));
    }
    let allowed = || {
        let all: Vec<&str> = cmd.options.iter().chain(&cmd.flags).map(String::as_str).collect();
        match all.is_empty() {
            true => "it takes no options".to_owned(),
            false => format!("its options are {}", all.join(", ")),
        }
    };
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if !arg.starts_with('-') {
            check_path(cmd, arg)?;
            continue;
        }
        if cmd.flags.iter().any(|f| f == arg) {
            continue;
        }
        let (option, value) = match arg.split_once('=') {
            Some((o, v)) => (o, Some(v)),
            None => (arg.as_str(), rest.next().map(String::as_str)),
        };
        if !cmd.options.iter().any(|o| o == option) {
            return Err(format!("option {option:?} is not allowed for command {name}: {}", allowed()));
        }
        match value {
            None => return Err(format!("option {option} for command {name} needs a value after it")),
            Some(v) if v.starts_with('-') || v.starts_with('@') => {
                return Err(format!(
                    "the value {v:?} of option {option} for command {name} starts with '{}'; values may not",
                    &v[..1]
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn check_path(cmd: &TestCommand, arg: &str) -> Result<(), String> {
    let name = &cmd.name;
    let Some(root) = &cmd.paths else {
        return Err(format!("command {name} takes no test paths ({arg:?} given); its config sets none (`paths`)"));
    };
    let path = Path::new(arg);
    let plain = path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !plain || !path.starts_with(root) {
        return Err(format!(
            "test path {arg:?} for command {name} must be relative and under {} (no .., not absolute)",
            root.display()
        ));
    }
    Ok(())
}

/// What a command run is told.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Context {
    /// The service's base URL.
    pub url: String,
    pub port: u16,
    /// The service's models, and those READY now.
    pub models: Vec<String>,
    pub ready: Vec<String>,
    /// Where it writes its JUnit file (`{junit}`).
    pub junit: PathBuf,
}

fn fill(text: &str, ctx: &Context) -> String {
    text.replace("{url}", &ctx.url)
        .replace("{port}", &ctx.port.to_string())
        .replace("{junit}", &ctx.junit.display().to_string())
        .replace("{models}", &ctx.models.join(","))
}

/// The command line and the whole environment of one run.
pub fn command_line(
    cmd: &TestCommand,
    args: &[String],
    ctx: &Context,
    secrets: &[(String, String)],
) -> (Vec<String>, BTreeMap<String, String>) {
    let mut argv: Vec<String> = cmd.argv.iter().map(|a| fill(a, ctx)).collect();
    argv.extend(args.iter().cloned());
    let mut env: BTreeMap<String, String> = ["PATH", "HOME", "LANG", "TZ"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
        .collect();
    env.insert("PROCTOR_SERVICE_URL".into(), ctx.url.clone());
    env.insert("PROCTOR_MODELS".into(), ctx.models.join(","));
    env.insert("PROCTOR_READY_MODELS".into(), ctx.ready.join(","));
    env.insert("PROCTOR_JUNIT".into(), ctx.junit.display().to_string());
    for (k, v) in &cmd.env {
        env.insert(k.clone(), fill(v, ctx));
    }
    for (k, v) in secrets {
        env.insert(k.clone(), v.clone());
    }
    (argv, env)
}

/// How a run ended.
#[derive(Debug, Default, PartialEq)]
pub struct Ran {
    /// `None`: it did not exit by itself (timed out, stopped, never started).
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// Why it was stopped before its end (its lease ended, the agent shut down).
    pub stopped: Option<String>,
    /// Why it could not start.
    pub spawn_error: Option<String>,
    /// The end of its output (stdout and stderr as they interleaved).
    pub output: String,
}

/// Kills a command's whole process group when dropped: however the case
/// ends (the agent's task cancelled included), nothing of it runs on.
struct Group(i32);

impl Drop for Group {
    fn drop(&mut self) {
        if self.0 > 0 {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.0), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// How long output still in the pipe is read once the command has ended
/// (a process it left behind may hold the pipe open).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Runs a command line in its own process group, its stdout and stderr one
/// pipe whose last `OUTPUT_TAIL` bytes are kept as they come. It ends at its
/// exit, at the timeout or when `stop` says why; then the whole group is
/// SIGKILLed and what was read within `DRAIN_GRACE` is its output.
pub async fn run(
    argv: &[String],
    env: &BTreeMap<String, String>,
    workdir: Option<&Path>,
    timeout: Duration,
    stop: impl std::future::Future<Output = String>,
) -> Ran {
    let Some((program, args)) = argv.split_first() else {
        return Ran { spawn_error: Some("the command is empty".into()), ..Ran::default() };
    };
    let (reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return Ran { spawn_error: Some(format!("cannot make a pipe: {e}")), ..Ran::default() },
    };
    let mut command = tokio::process::Command::new(program);
    command.args(args).env_clear().envs(env).process_group(0).kill_on_drop(true);
    let err = writer.try_clone().map(std::process::Stdio::from).unwrap_or_else(|_| std::process::Stdio::null());
    command.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::from(writer)).stderr(err);
    if let Some(dir) = workdir {
        command.current_dir(dir);
    }
    let spawned = command.spawn();
    drop(command); // the agent's copies of the pipe's write end
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return Ran { spawn_error: Some(format!("cannot start {program:?}: {e}")), ..Ran::default() },
    };
    let group = Group(child.id().map_or(0, |id| id as i32));
    let tail = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::<u8>::new()));
    let reading = tokio::task::spawn_blocking({
        let tail = tail.clone();
        move || keep_tail(reader, &tail)
    });
    let (exit_code, timed_out, stopped) = tokio::select! {
        status = child.wait() => (status.ok().and_then(|s| s.code()), false, None),
        _ = tokio::time::sleep(timeout) => (None, true, None),
        why = stop => (None, false, Some(why)),
    };
    drop(group);
    let _ = child.wait().await;
    let _ = tokio::time::timeout(DRAIN_GRACE, reading).await;
    let bytes: Vec<u8> = tail.lock().map(|t| t.iter().copied().collect()).unwrap_or_default();
    Ran { exit_code, timed_out, stopped, spawn_error: None, output: String::from_utf8_lossy(&bytes).into_owned() }
}

/// Reads until the pipe closes, keeping its last `OUTPUT_TAIL` bytes.
fn keep_tail(mut reader: std::io::PipeReader, tail: &std::sync::Mutex<std::collections::VecDeque<u8>>) {
    use std::io::Read;
    let mut buf = [0u8; 8192];
    while let Ok(n) = reader.read(&mut buf) {
        if n == 0 {
            return;
        }
        let Ok(mut t) = tail.lock() else { return };
        t.extend(&buf[..n]);
        let over = t.len().saturating_sub(OUTPUT_TAIL);
        t.drain(..over);
    }
}

/// The tests of a JUnit XML file: each `<testcase>` with its outcome
/// (a `<failure>`, `<error>` or `<skipped>` child) and message.
pub fn read_junit(xml: &str) -> Result<Vec<TestResult>, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut tests = Vec::new();
    let mut current: Option<TestResult> = None;
    loop {
        let event = reader.read_event().map_err(|e| format!("not JUnit XML: {e}"))?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) if e.name().as_ref() == b"testcase" => {
                let mut t = TestResult { outcome: TestOutcome::TestPassed.into(), ..TestResult::default() };
                for a in e.attributes().flatten() {
                    let value = a
                        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                        .map(|v| v.into_owned())
                        .unwrap_or_default();
                    match a.key.as_ref() {
                        b"name" => t.name = value,
                        b"classname" => t.classname = value,
                        b"time" => t.duration_us = (value.parse::<f64>().unwrap_or(0.0) * 1e6) as u64,
                        _ => {}
                    }
                }
                match event {
                    Event::Empty(_) => tests.push(t),
                    _ => current = Some(t),
                }
            }
            Event::Start(e) | Event::Empty(e) if current.is_some() => {
                let outcome = match e.name().as_ref() {
                    b"failure" => TestOutcome::TestFailed,
                    b"error" => TestOutcome::TestError,
                    b"skipped" => TestOutcome::TestSkipped,
                    _ => continue,
                };
                let t = current.as_mut().expect("checked");
                t.set_outcome(outcome);
                let message = e.attributes().flatten().find(|a| a.key.as_ref() == b"message");
                t.message = message
                    .and_then(|a| a.normalized_value(quick_xml::XmlVersion::Implicit1_0).ok().map(|v| v.into_owned()))
                    .unwrap_or_default();
            }
            Event::End(e) if e.name().as_ref() == b"testcase" => {
                if let Some(done) = current.take() {
                    tests.push(done);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(tests)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pytest() -> TestCommand {
        TestCommand {
            name: "e2e-pytest".into(),
            argv: vec!["python3".into(), "-m".into(), "pytest".into(), "--junitxml={junit}".into()],
            workdir: None,
            timeout: DEFAULT_TIMEOUT,
            env: BTreeMap::from([("TRANSLATE_API_URL".into(), "{url}".into())]),
            secrets: BTreeMap::new(),
            options: vec!["-k".into(), "-m".into()],
            flags: vec!["-x".into()],
            paths: Some("tests/e2e".into()),
        }
    }

    #[test]
    fn a_suite_may_add_only_listed_options_and_test_paths_under_the_root() {
        let cmd = pytest();
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for (given, verdict) in [
            (vec![], Ok(())),
            (vec!["-k", "nllb and not slow"], Ok(())),
            (vec!["-k=nllb", "-m", "smoke"], Ok(())),
            (vec!["tests/e2e/test_nllb_model_e2e.py"], Ok(())),
            (vec!["tests/e2e/sub/./test_x.py", "-k", "x"], Ok(())),
            (vec!["-x", "tests/e2e/test_a.py"], Ok(())),
            (vec!["-x", "/tmp/evil"], Err("must be relative and under tests/e2e")),
            (vec!["-p", "x"], Err("option \"-p\" is not allowed for command e2e-pytest: its options are -k, -m, -x")),
            (vec!["-k", "@/etc/proctor/ca.key"], Err("starts with '@'")),
            (vec!["@args.txt"], Err("starts with '@'")),
            (
                vec!["-k", "--rootdir=/"],
                Err("the value \"--rootdir=/\" of option -k for command e2e-pytest starts with '-'"),
            ),
            (vec!["-k=-p"], Err("starts with '-'")),
            (vec!["--junitxml=/tmp/other.xml"], Err("option \"--junitxml\" is not allowed")),
            (vec!["-k"], Err("option -k for command e2e-pytest needs a value after it")),
            (vec!["tests/e2e/../../etc/passwd"], Err("must be relative and under tests/e2e")),
            (vec!["/etc/passwd"], Err("must be relative and under tests/e2e")),
            (vec!["tests/other/test_x.py"], Err("must be relative and under tests/e2e")),
            (vec!["-k", "x; rm -rf /"], Err("holds a shell character")),
            (vec!["$(id)"], Err("holds a shell character")),
            (vec!["-k", "a\nb"], Err("holds a shell character")),
        ] {
            let got = check_args(&cmd, &args(&given));
            match verdict {
                Ok(()) => assert_eq!(got, Ok(()), "{given:?}"),
                Err(says) => assert!(got.as_ref().is_err_and(|e| e.contains(says)), "{given:?}: {got:?}"),
            }
        }
        let bare = TestCommand { options: vec![], flags: vec![], paths: None, ..pytest() };
        assert!(check_args(&bare, &args(&["-k", "x"])).unwrap_err().contains("it takes no options"));
        assert!(check_args(&bare, &args(&["t.py"])).unwrap_err().contains("takes no test paths"));
    }

    #[test]
    fn the_command_line_fills_its_placeholders_and_the_suite_args_follow() {
        let ctx = Context {
            url: "http://127.0.0.1:4000".into(),
            port: 4000,
            models: vec!["nllb".into(), "aya".into()],
            ready: vec!["nllb".into()],
            junit: "/data/commands/c1.xml".into(),
        };
        let secrets = [("HF_TOKEN".to_owned(), "hf_secret".to_owned())];
        let (argv, env) = command_line(&pytest(), &["-k".into(), "nllb".into()], &ctx, &secrets);
        assert_eq!(argv, ["python3", "-m", "pytest", "--junitxml=/data/commands/c1.xml", "-k", "nllb"]);
        assert_eq!(env["TRANSLATE_API_URL"], "http://127.0.0.1:4000");
        assert_eq!(env["PROCTOR_SERVICE_URL"], "http://127.0.0.1:4000");
        assert_eq!((env["PROCTOR_MODELS"].as_str(), env["PROCTOR_READY_MODELS"].as_str()), ("nllb,aya", "nllb"));
        assert_eq!(env["HF_TOKEN"], "hf_secret");
        assert!(!env.contains_key("CARGO"), "nothing else of the agent's environment");
    }

    #[tokio::test]
    async fn output_is_one_stream_of_which_the_last_bytes_are_kept() {
        let argv: Vec<String> =
            ["sh", "-c", "echo first; echo to-stderr >&2; head -c 100000 /dev/zero | tr '\\0' x; echo; echo END"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let env = BTreeMap::from([("PATH".to_owned(), std::env::var("PATH").unwrap_or_default())]);
        let ran = run(&argv, &env, None, Duration::from_secs(10), std::future::pending()).await;
        assert_eq!((ran.exit_code, ran.timed_out), (Some(0), false));
        assert_eq!(ran.output.len(), OUTPUT_TAIL, "bounded while read");
        assert!(ran.output.ends_with("xxx\nEND\n"), "the end is kept");
        let both = run(
            &argv[..2].iter().cloned().chain(["echo out; echo err >&2".to_owned()]).collect::<Vec<_>>(),
            &env,
            None,
            Duration::from_secs(10),
            std::future::pending(),
        )
        .await;
        assert_eq!(both.output, "out\nerr\n", "stdout and stderr as they interleaved");
        let stopped = run(
            &argv[..2].iter().cloned().chain(["sleep 30".to_owned()]).collect::<Vec<_>>(),
            &env,
            None,
            Duration::from_secs(10),
            async { "its lease ended".to_owned() },
        )
        .await;
        assert_eq!((stopped.exit_code, stopped.stopped.as_deref()), (None, Some("its lease ended")));
    }

    #[test]
    fn every_testcase_of_a_junit_file_is_a_test_with_its_outcome() {
        let xml = r#"<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
            <testcase classname="tests.e2e.test_nllb" name="test_translate" time="0.250"/>
            <testcase classname="tests.e2e.test_nllb" name="test_wrong" time="0.1"><failure message="assert 'hola' == 'bonjour'">trace</failure></testcase>
            <testcase classname="tests.e2e.test_aya" name="test_gated" time="0"><skipped type="pytest.skip" message="needs HF_TOKEN"/></testcase>
            <testcase classname="tests.e2e.test_basic" name="test_boom" time="0.01"><error message="fixture failed"/></testcase>
            </testsuite></testsuites>"#;
        let got: Vec<(String, TestOutcome, u64, String)> = read_junit(xml)
            .unwrap()
            .into_iter()
            .map(|t| (format!("{}::{}", t.classname, t.name), t.outcome(), t.duration_us, t.message))
            .collect();
        assert_eq!(
            got,
            [
                ("tests.e2e.test_nllb::test_translate".into(), TestOutcome::TestPassed, 250_000, String::new()),
                (
                    "tests.e2e.test_nllb::test_wrong".into(),
                    TestOutcome::TestFailed,
                    100_000,
                    "assert 'hola' == 'bonjour'".into()
                ),
                ("tests.e2e.test_aya::test_gated".into(), TestOutcome::TestSkipped, 0, "needs HF_TOKEN".into()),
                ("tests.e2e.test_basic::test_boom".into(), TestOutcome::TestError, 10_000, "fixture failed".into()),
            ]
        );
        assert!(read_junit("<testsuite><testcase name=").is_err());
    }
}
