//! Test cases run on the agent, next to the service: HTTP requests whose
//! responses are judged by assertions (proto messages) evaluated here, so the
//! service may listen on localhost only.
//!
//! A `RunCases` call's cases wait in a `Queue` and run one after another.
//! While they wait the lease may end and the service may move, so each case
//! checks both just before it runs; one whose lease has ended is not sent and
//! ends as ERROR, so every case still gets a result.

use std::time::Duration;

use proto::{AssertionFailure, CaseOutcome, CaseResult, assertion};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::journal::Journal;
use crate::lease::LeaseClaim;
use crate::supervisor::Supervisor;

const EXCERPT_BYTES: usize = 512;

/// The end of a test command's output a result keeps (pytest's summary of
/// failures sits there).
const COMMAND_OUTPUT_BYTES: usize = 4096;
pub const DEFAULT_CASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Checks every assertion against a response; returns the failures.
pub fn evaluate(assertions: &[proto::Assertion], status: u16, body: &[u8]) -> Vec<AssertionFailure> {
    let json: Result<Value, String> = serde_json::from_slice(body).map_err(|e| format!("response is not JSON ({e})"));
    assertions.iter().filter_map(|a| judge(a.kind.as_ref(), status, &json)).collect()
}

fn fail(name: &str, pointer: &str, expected: String, actual: String) -> AssertionFailure {
    AssertionFailure { assertion: name.to_owned(), pointer: pointer.to_owned(), expected, actual }
}

/// Looks a pointer up; `Err(actual)` describes why there is no value.
fn lookup<'j>(json: &'j Result<Value, String>, pointer: &str) -> Result<&'j Value, String> {
    match json {
        Err(e) => Err(e.clone()),
        Ok(doc) => doc.pointer(pointer).ok_or_else(|| "(missing)".to_owned()),
    }
}

/// One assertion against the response; `None` when it holds.
fn judge(kind: Option<&assertion::Kind>, status: u16, json: &Result<Value, String>) -> Option<AssertionFailure> {
    // Fail closed: an assertion this agent cannot read (a newer
    // controller's kind) is never a silent pass.
    let Some(kind) = kind else {
        let what = "(an assertion kind this agent does not know)".to_owned();
        return Some(fail("unknown", "", what, "(not judged: upgrade the agent)".into()));
    };
    let actual = |pointer: &str| lookup(json, pointer).map_or_else(|e| e, |v| v.to_string());
    match kind {
        assertion::Kind::Status(want) => {
            (u32::from(status) != *want).then(|| fail("status", "", want.to_string(), status.to_string()))
        }
        assertion::Kind::JsonEquals(eq) => {
            let Ok(expected) = serde_json::from_str::<Value>(&eq.value_json) else {
                return Some(fail("equals", &eq.pointer, invalid(&eq.value_json), actual(&eq.pointer)));
            };
            let holds = lookup(json, &eq.pointer).is_ok_and(|v| *v == expected);
            (!holds).then(|| fail("equals", &eq.pointer, expected.to_string(), actual(&eq.pointer)))
        }
        assertion::Kind::JsonOneOf(one) => {
            let parsed: Result<Vec<Value>, &String> =
                one.values_json.iter().map(|v| serde_json::from_str(v).map_err(|_| v)).collect();
            let options = match parsed {
                Ok(o) => o,
                Err(bad) => return Some(fail("one_of", &one.pointer, invalid(bad), actual(&one.pointer))),
            };
            let holds = lookup(json, &one.pointer).is_ok_and(|v| options.contains(v));
            let expected = format!("one of {}", Value::Array(options));
            (!holds).then(|| fail("one_of", &one.pointer, expected, actual(&one.pointer)))
        }
        assertion::Kind::JsonNotEmpty(pointer) => {
            let holds = lookup(json, pointer).is_ok_and(|v| !is_empty(v));
            (!holds).then(|| fail("not_empty", pointer, "a non-empty value".into(), actual(pointer)))
        }
        assertion::Kind::JsonMatches(m) => judge_matches(m, json),
    }
}

fn judge_matches(m: &proto::JsonMatches, json: &Result<Value, String>) -> Option<AssertionFailure> {
    let expected = format!("a match for /{}/", m.regex);
    let re = match regex::Regex::new(&m.regex) {
        Ok(re) => re,
        Err(e) => return Some(fail("matches", &m.pointer, expected, format!("(invalid regex: {e})"))),
    };
    match lookup(json, &m.pointer) {
        Ok(v) => {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (!re.is_match(&text)).then(|| fail("matches", &m.pointer, expected, v.to_string()))
        }
        Err(actual) => Some(fail("matches", &m.pointer, expected, actual)),
    }
}

/// The URL a case requests: its path under the service's base URL, and
/// nothing else. A path that would move the request to another host (`@host`,
/// `//host`, a scheme) is refused: the agent must never be a proxy into the
/// lab network.
pub fn case_url(base_url: &str, path: &str) -> Result<String, String> {
    let refuse = || format!("case path {path:?} would leave the service; write a path under it, e.g. \"/translate\"");
    if !path.starts_with('/') || path.starts_with("//") || path.contains('\\') || path.chars().any(char::is_control) {
        return Err(refuse());
    }
    let url = format!("{}{path}", base_url.trim_end_matches('/'));
    let (Ok(base), Ok(target)) = (reqwest::Url::parse(base_url), reqwest::Url::parse(&url)) else {
        return Err(refuse());
    };
    let same = base.scheme() == target.scheme()
        && base.host_str() == target.host_str()
        && base.port_or_known_default() == target.port_or_known_default()
        && target.username().is_empty()
        && target.password().is_none();
    if same { Ok(url) } else { Err(refuse()) }
}

/// Headers a case may not set: where the request goes (`Host`), how its
/// body is framed, or anything with a line break or control character
/// (which would smuggle a second header or request).
pub fn check_headers(headers: &std::collections::HashMap<String, String>) -> Result<(), String> {
    const RESERVED: [&str; 4] = ["host", "content-length", "transfer-encoding", "connection"];
    for (name, value) in headers {
        let bad_name = name.is_empty() || !name.chars().all(|c| c.is_ascii_graphic() && c != ':');
        if bad_name || value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(format!(
                "case header {name:?} is not a valid header name and value (no line breaks or control characters)"
            ));
        }
        if RESERVED.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(format!("case header {name:?} is set by the agent, not by a case"));
        }
    }
    Ok(())
}

/// An expected value that is not JSON is a failure, never a comparison with null.
fn invalid(value: &str) -> String {
    format!("(invalid expected value {value})")
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Runs one case against `base_url`. Never fails: problems become ERROR results.
pub async fn run_case(client: &reqwest::Client, base_url: &str, case: &proto::Case, epoch: u64) -> CaseResult {
    let started = tokio::time::Instant::now();
    let mut result = CaseResult {
        started_unix_ms: crate::journal::now_unix_ms(),
        case_id: case.case_id.clone(),
        attempt: case.attempt,
        name: case.name.clone(),
        lease_epoch: epoch,
        ..Default::default()
    };
    let Some(proto::case::Kind::Http(http)) = &case.kind else {
        result.set_outcome(CaseOutcome::Error);
        result.message = "case has no kind this agent can run (expected http)".into();
        return result;
    };
    let url = match check_headers(&http.headers).and_then(|()| case_url(base_url, &http.path)) {
        Ok(url) => url,
        Err(why) => {
            result.set_outcome(CaseOutcome::Error);
            result.message = why;
            return result;
        }
    };
    result.url = url.clone();
    let method = match reqwest::Method::from_bytes(http.method.to_uppercase().as_bytes()) {
        Ok(m) => m,
        Err(_) => {
            result.set_outcome(CaseOutcome::Error);
            result.message = format!("invalid HTTP method {:?}", http.method);
            return result;
        }
    };
    let timeout = if case.timeout_ms > 0 { Duration::from_millis(case.timeout_ms) } else { DEFAULT_CASE_TIMEOUT };
    let mut request = client.request(method, &url).timeout(timeout).body(http.body.clone());
    for (k, v) in &http.headers {
        request = request.header(k, v);
    }
    if !case.traceparent.is_empty() {
        request = request.header("traceparent", &case.traceparent);
    }
    let response = async {
        let r = request.send().await?;
        let status = r.status().as_u16();
        let body = r.bytes().await?;
        Ok::<_, reqwest::Error>((status, body))
    }
    .await;
    result.duration_us = started.elapsed().as_micros() as u64;
    match response {
        Err(e) => {
            result.set_outcome(CaseOutcome::Error);
            result.message = format!("{} {url}: {}", http.method, error_chain(&e));
        }
        Ok((status, body)) => {
            result.http_status = u32::from(status);
            result.response_excerpt = excerpt(&body);
            result.failures = evaluate(&case.assertions, status, &body);
            result.set_outcome(if result.failures.is_empty() { CaseOutcome::Passed } else { CaseOutcome::Failed });
        }
    }
    result
}

const SHUT_DOWN: &str = "the agent shut down before the case ran";

/// One `RunCases` call's cases, run in order under the lease they came with.
pub(crate) struct Queue {
    pub journal: Journal,
    pub supervisor: Supervisor,
    pub claim: LeaseClaim,
    pub epoch: u64,
    pub http: reqwest::Client,
    /// Fires at agent shutdown: the cases still waiting are not sent.
    pub cancel: CancellationToken,
}

/// The most cases one `RunCases` call may run at once.
pub const MAX_PARALLEL: u32 = 64;

impl Queue {
    /// Runs every case, or says why it did not, as a `CaseFinished` each:
    /// the controller waits for an answer per case id. Up to `parallel` at
    /// once (started in order; 0 or 1: one after another), except a load
    /// case, which runs alone: it starts when the cases before it have
    /// finished and those after it wait for it, so its figures are its own.
    pub async fn run(self, cases: Vec<proto::Case>, parallel: u32) {
        let width = parallel.clamp(1, MAX_PARALLEL) as usize;
        let queue = std::sync::Arc::new(self);
        let mut running = tokio::task::JoinSet::new();
        let mut which = std::collections::HashMap::new();
        for case in cases {
            let alone = matches!(case.kind, Some(proto::case::Kind::Load(_)));
            while running.len() >= if alone { 1 } else { width } {
                queue.reap(running.join_next_with_id().await, &mut which);
            }
            let q = queue.clone();
            let blank = not_run(&case, q.epoch, String::new());
            let id = running.spawn(async move { q.one(case).await }).id();
            which.insert(id, blank);
            if alone {
                queue.reap(running.join_next_with_id().await, &mut which);
            }
        }
        while let Some(done) = running.join_next_with_id().await {
            queue.reap(Some(done), &mut which);
        }
    }

    /// A case's task ended; one that panicked still answers, as an error.
    fn reap(
        &self,
        done: Option<Result<(tokio::task::Id, ()), tokio::task::JoinError>>,
        which: &mut std::collections::HashMap<tokio::task::Id, CaseResult>,
    ) {
        match done {
            Some(Ok((id, ()))) => {
                which.remove(&id);
            }
            Some(Err(e)) => {
                if let Some(mut result) = which.remove(&e.id()) {
                    result.message = format!("the agent failed running this case: {e}");
                    self.journal.append(proto::event::Kind::CaseFinished(proto::CaseFinished {
                        run_id: self.claim.run_id.clone(),
                        service: self.claim.service.clone(),
                        result: Some(result),
                    }));
                }
            }
            None => {}
        }
    }

    async fn one(&self, case: proto::Case) {
        let mut result = match (self.target().await, &case.kind) {
            (Ok(base_url), Some(proto::case::Kind::Command(c))) => self.run_command(&base_url, &case, c).await,
            (Ok(base_url), Some(proto::case::Kind::Load(l))) => self.run_load(&base_url, &case, l).await,
            (Ok(base_url), _) => run_case(&self.http, &base_url, &case, self.epoch).await,
            (Err(message), _) => not_run(&case, self.epoch, message),
        };
        self.redact(&mut result);
        self.journal.append(proto::event::Kind::CaseFinished(proto::CaseFinished {
            run_id: self.claim.run_id.clone(),
            service: self.claim.service.clone(),
            result: Some(result),
        }));
    }

    /// A case result quotes the service (its answer, the values that failed
    /// an assertion): never with the service's secrets in it.
    fn redact(&self, r: &mut CaseResult) {
        let s = &self.supervisor;
        r.message = s.redact(&r.message);
        r.response_excerpt = s.redact(&r.response_excerpt);
        for f in &mut r.failures {
            f.actual = s.redact(&f.actual);
            f.expected = s.redact(&f.expected);
        }
    }

    /// Where the next case goes, asked afresh: by now the lease may be
    /// released, expired or another run's (its traffic must not reach the
    /// service then), and a restart may have moved the service to a new port.
    async fn target(&self) -> Result<String, String> {
        if self.cancel.is_cancelled() {
            return Err(SHUT_DOWN.to_owned());
        }
        let service = &self.claim.service;
        match self.journal.check(self.claim.clone()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(format!("lease on service {service} ended before the case ran, so it was not sent: {e}"));
            }
            Err(_closed) => return Err(SHUT_DOWN.to_owned()),
        }
        match self.supervisor.base_url().await {
            Ok(Some(url)) => Ok(url),
            Ok(None) => Err(format!("service {service} is not running")),
            Err(_closed) => Err(SHUT_DOWN.to_owned()),
        }
    }
}

impl Queue {
    /// Runs one of the service's test commands (checked when the case was
    /// accepted) and reads the JUnit file it wrote: passed on exit 0; failed
    /// when its tests failed; an error when it timed out, could not start or
    /// failed without a failing test.
    async fn run_command(&self, base_url: &str, case: &proto::Case, c: &proto::CommandCase) -> CaseResult {
        let started = tokio::time::Instant::now();
        let mut result = not_run(case, self.epoch, String::new());
        result.started_unix_ms = crate::journal::now_unix_ms();
        result.url = format!("command {} {}", c.name, c.args.join(" ")).trim_end().to_owned();
        let known = &self.supervisor.commands;
        let Some(cmd) = known.commands.iter().find(|k| k.name == c.name) else {
            result.message = format!("no test command {:?} on service {}", c.name, self.claim.service);
            return result;
        };
        let junit =
            known.dir.join(format!("{}.xml", case.case_id.replace(|ch: char| !ch.is_ascii_alphanumeric(), "_")));
        let _ = std::fs::create_dir_all(&known.dir);
        let _ = std::fs::remove_file(&junit);
        let ctx = crate::commands::Context {
            port: reqwest::Url::parse(base_url).ok().and_then(|u| u.port_or_known_default()).unwrap_or(0),
            url: base_url.to_owned(),
            models: known.models.clone(),
            ready: self.ready_models().await,
            junit: junit.clone(),
        };
        let mut secrets = Vec::new();
        for (k, path) in &cmd.secrets {
            match std::fs::read_to_string(path) {
                Ok(v) => secrets.push((k.clone(), v.trim().to_owned())),
                Err(e) => {
                    result.message =
                        format!("command {}: cannot read secret {k} from {}: {e}", cmd.name, path.display());
                    return result;
                }
            }
        }
        let (argv, env) = crate::commands::command_line(cmd, &c.args, &ctx, &secrets);
        // The case may shorten the command's time, never lengthen it.
        let timeout = match case.timeout_ms {
            0 => cmd.timeout,
            ms => Duration::from_millis(ms).min(cmd.timeout),
        };
        let ran = crate::commands::run(&argv, &env, cmd.workdir.as_deref(), timeout, self.until_stopped()).await;
        result.duration_us = started.elapsed().as_micros() as u64;
        let own = crate::supervisor::redact::Secrets::of(secrets);
        let hide = |text: &str| own.redact(&self.supervisor.redact(text)).into_owned();
        result.response_excerpt = tail(&hide(&ran.output), COMMAND_OUTPUT_BYTES).to_owned();
        result.exit_code = ran.exit_code.unwrap_or(-1);
        let read = std::fs::read_to_string(&junit).ok().map(|x| crate::commands::read_junit(&x));
        let _ = std::fs::remove_file(&junit);
        let mut junit_note = String::new();
        match read {
            Some(Ok(tests)) => result.tests = tests,
            Some(Err(e)) => junit_note = format!(" (its JUnit file could not be read: {e})"),
            None => {}
        }
        for t in &mut result.tests {
            t.message = hide(&t.message);
            t.name = hide(&t.name);
            t.classname = hide(&t.classname);
        }
        command_verdict(&mut result, cmd, &ran, timeout);
        result.message.push_str(&junit_note);
        result
    }

    /// Runs a load case on the engine's own threads, its progress into the
    /// journal about once a second; stopped like a command when the lease
    /// ends or the agent shuts down (an ERROR with the figures so far).
    async fn run_load(&self, base_url: &str, case: &proto::Case, load: &proto::LoadCase) -> CaseResult {
        let mut result = not_run(case, self.epoch, String::new());
        result.started_unix_ms = crate::journal::now_unix_ms();
        // The first request's URL (a load may send several, in turn).
        let first = load.requests.first().map(|r| case_url(base_url, &r.path));
        result.url = first.and_then(Result::ok).unwrap_or_else(|| base_url.to_owned());
        let plan = match crate::load::Plan::new(case, load, base_url) {
            Ok(p) => p,
            Err(e) => {
                result.message = e;
                return result;
            }
        };
        let cancel = CancellationToken::new();
        let (journal, claim, id, name) =
            (self.journal.clone(), self.claim.clone(), case.case_id.clone(), case.name.clone());
        let engine_cancel = cancel.clone();
        let engine = tokio::task::spawn_blocking(move || {
            crate::load::run(plan, &engine_cancel, |p| {
                journal.append(proto::event::Kind::LoadProgress(proto::LoadProgress {
                    run_id: claim.run_id.clone(),
                    service: claim.service.clone(),
                    case_id: id.clone(),
                    name: name.clone(),
                    elapsed_ms: p.elapsed.as_millis() as u64,
                    warming_up: p.warming_up,
                    requests: p.requests,
                    errors: p.errors,
                    rps: p.rps,
                    p99_us: p.p99_us,
                }));
            })
        });
        let mut engine = std::pin::pin!(engine);
        let mut stopped = None;
        let measured = tokio::select! {
            m = &mut engine => m,
            why = self.until_stopped_or_moved(base_url) => {
                cancel.cancel();
                stopped = Some(why);
                engine.await
            }
        };
        let measured = match measured {
            Ok(m) => m,
            Err(e) => {
                result.message = format!("the load engine failed: {e}");
                return result;
            }
        };
        let mut result = crate::load::case_result(result, measured, &load.thresholds);
        if let Some(why) = stopped {
            result.set_outcome(CaseOutcome::Error);
            result.message = format!("load case stopped: {why}");
        }
        result
    }

    /// Resolves, with why, when the command must stop before its end: the
    /// agent shuts down, or this run's lease on the service ends (another run
    /// may hold the service now).
    async fn until_stopped(&self) -> String {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return "the agent shut down".to_owned(),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            match self.journal.check(self.claim.clone()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return format!("the lease on service {} ended ({e})", self.claim.service),
                Err(_) => return "the agent shut down".to_owned(),
            }
        }
    }

    /// As `until_stopped`, and also when the service is no longer at
    /// `base_url` (it restarted, perhaps on another port): a load must not
    /// go on at an address that may be someone else's now.
    async fn until_stopped_or_moved(&self, base_url: &str) -> String {
        let moved = async {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                match self.supervisor.base_url().await {
                    Ok(Some(url)) if url == base_url => {}
                    Ok(Some(url)) => return format!("service {} moved to {url} (it restarted)", self.claim.service),
                    _ => return format!("service {} stopped", self.claim.service),
                }
            }
        };
        tokio::select! {
            why = self.until_stopped() => why,
            why = moved => why,
        }
    }

    /// The service's models READY now.
    async fn ready_models(&self) -> Vec<String> {
        let Ok(snapshot) = self.journal.snapshot().await else { return Vec::new() };
        snapshot
            .services
            .iter()
            .filter(|s| s.name == self.claim.service)
            .flat_map(|s| s.models.iter())
            .filter(|m| m.stage() == proto::Stage::Ready)
            .map(|m| m.name.clone())
            .collect()
    }
}

/// Outcome, failures and message of a command case from how it ran and the
/// tests it reported.
fn command_verdict(
    result: &mut CaseResult,
    cmd: &crate::commands::TestCommand,
    ran: &crate::commands::Ran,
    timeout: Duration,
) {
    use proto::TestOutcome;
    let bad: Vec<&proto::TestResult> = result
        .tests
        .iter()
        .filter(|t| matches!(t.outcome(), TestOutcome::TestFailed | TestOutcome::TestError))
        .collect();
    let failures: Vec<AssertionFailure> = bad
        .iter()
        .map(|t| fail("test", &format!("{}::{}", t.classname, t.name), "passed".into(), t.message.clone()))
        .collect();
    let name = &cmd.name;
    let (outcome, message) = match (&ran.spawn_error, ran.timed_out, ran.exit_code) {
        (Some(e), _, _) => (CaseOutcome::Error, e.clone()),
        _ if ran.stopped.is_some() => (
            CaseOutcome::Error,
            format!(
                "command {name} was stopped: {}; its process group was killed",
                ran.stopped.as_deref().unwrap_or("")
            ),
        ),
        (_, true, _) => (
            CaseOutcome::Error,
            format!("command {name} timed out after {}s; its process group was killed", timeout.as_secs()),
        ),
        (_, _, Some(0)) if failures.is_empty() => (CaseOutcome::Passed, String::new()),
        (_, _, _) if !failures.is_empty() => (CaseOutcome::Failed, String::new()),
        (_, _, Some(code)) => {
            (CaseOutcome::Error, format!("command {name} exited with code {code} and no failing test"))
        }
        (_, _, None) => (CaseOutcome::Error, format!("command {name} was killed by a signal")),
    };
    result.set_outcome(outcome);
    result.failures = failures;
    result.message = message;
}

/// The last `max` bytes of `text`, on a character boundary.
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The ERROR result of a case that was not sent.
fn not_run(case: &proto::Case, epoch: u64, message: String) -> CaseResult {
    CaseResult {
        case_id: case.case_id.clone(),
        attempt: case.attempt,
        name: case.name.clone(),
        outcome: CaseOutcome::Error.into(),
        message,
        lease_epoch: epoch,
        ..Default::default()
    }
}

fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(EXCERPT_BYTES)]).into_owned();
    if body.len() > EXCERPT_BYTES { format!("{text}…") } else { text }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{Assertion, JsonEquals, JsonMatches, JsonOneOf};

    fn a(kind: assertion::Kind) -> Assertion {
        Assertion { kind: Some(kind) }
    }

    const BODY: &[u8] = br#"{"language":"en","confidence":0.9,"text":"hola mundo","empty":"","list":[]}"#;

    #[test]
    fn each_assertion_kind_passes_and_fails() {
        let eq =
            |p: &str, v: &str| a(assertion::Kind::JsonEquals(JsonEquals { pointer: p.into(), value_json: v.into() }));
        let one_of = |p: &str, v: &[&str]| {
            a(assertion::Kind::JsonOneOf(JsonOneOf {
                pointer: p.into(),
                values_json: v.iter().map(|s| s.to_string()).collect(),
            }))
        };
        let matches =
            |p: &str, r: &str| a(assertion::Kind::JsonMatches(JsonMatches { pointer: p.into(), regex: r.into() }));
        let not_empty = |p: &str| a(assertion::Kind::JsonNotEmpty(p.into()));
        // (assertion, expected failure as "name pointer expected actual", or "" for pass)
        let table = [
            (a(assertion::Kind::Status(200)), ""),
            (a(assertion::Kind::Status(201)), "status  201 200"),
            (eq("/language", "\"en\""), ""),
            (eq("/language", "\"fr\""), "equals /language \"fr\" \"en\""),
            (eq("/nope", "1"), "equals /nope 1 (missing)"),
            (one_of("/language", &["\"es\"", "\"en\""]), ""),
            (one_of("/language", &["\"es\""]), "one_of /language one of [\"es\"] \"en\""),
            (not_empty("/text"), ""),
            (not_empty("/empty"), "not_empty /empty a non-empty value \"\""),
            (not_empty("/list"), "not_empty /list a non-empty value []"),
            (matches("/text", "^hola"), ""),
            (matches("/confidence", "^0\\.9$"), ""),
            (matches("/text", "^bonjour"), "matches /text a match for /^bonjour/ \"hola mundo\""),
        ];
        for (assertion, want) in table {
            let got = evaluate(std::slice::from_ref(&assertion), 200, BODY)
                .iter()
                .map(|f| format!("{} {} {} {}", f.assertion, f.pointer, f.expected, f.actual))
                .collect::<Vec<_>>()
                .join("; ");
            assert_eq!(got, want, "{assertion:?}");
        }
    }

    #[test]
    fn a_non_json_body_fails_json_assertions_with_the_reason() {
        let f = evaluate(&[a(assertion::Kind::JsonNotEmpty("/x".into()))], 200, b"<html>");
        assert!(f[0].actual.starts_with("response is not JSON"), "{:?}", f[0]);
    }

    #[test]
    fn an_assertion_this_agent_cannot_judge_fails_closed() {
        let eq = |v: &str| a(assertion::Kind::JsonEquals(JsonEquals { pointer: "/x".into(), value_json: v.into() }));
        let one_of = |v: &str| {
            a(assertion::Kind::JsonOneOf(JsonOneOf { pointer: "/x".into(), values_json: vec!["1".into(), v.into()] }))
        };
        let body = br#"{"x": null}"#;
        // (assertion, expected failure "name expected actual")
        let table = [
            (
                Assertion { kind: None },
                "unknown (an assertion kind this agent does not know) (not judged: upgrade the agent)",
            ),
            (eq("{not json"), "equals (invalid expected value {not json) null"),
            (one_of("nope"), "one_of (invalid expected value nope) null"),
        ];
        for (assertion, want) in table {
            let f = evaluate(std::slice::from_ref(&assertion), 200, body);
            let got: Vec<String> = f.iter().map(|f| format!("{} {} {}", f.assertion, f.expected, f.actual)).collect();
            assert_eq!(got, [want], "{assertion:?}");
        }
    }

    #[test]
    fn a_case_path_never_leaves_the_service() {
        let base = "http://127.0.0.1:8000";
        // (path, allowed)
        let table = [
            ("/translate", true),
            ("/models/nllb/load?x=1", true),
            ("/a/../health", true),
            ("@127.0.0.1:18999/latest/meta-data", false),
            ("//169.254.169.254/latest/meta-data", false),
            ("/@evil", true),
            ("http://evil/x", false),
            ("", false),
            ("/\\evil/x", false),
            ("\\\\evil\\x", false),
            ("/x\r\nHost: evil", false),
            ("/x\u{0}", false),
            ("/x%0d%0aHost:%20evil", true),
        ];
        for (path, ok) in table {
            let got = case_url(base, path);
            assert_eq!(got.is_ok(), ok, "{path:?}: {got:?}");
            if let Ok(url) = got {
                assert!(url.starts_with("http://127.0.0.1:8000/"), "{url}");
            }
        }
        assert!(case_url(base, "@127.0.0.1:18999/x").unwrap_err().contains("would leave the service"));
    }

    #[test]
    fn a_case_header_cannot_redirect_or_smuggle() {
        // (name, value, allowed)
        let table = [
            ("Authorization", "Bearer x", true),
            ("X-Trace", "a\tb", true),
            ("Host", "169.254.169.254", false),
            ("host", "evil", false),
            ("Transfer-Encoding", "chunked", false),
            ("X-A", "v\r\nHost: evil", false),
            ("X-A\r\nHost", "evil", false),
            ("X A", "v", false),
            ("", "v", false),
            ("X-B", "v\n", false),
        ];
        for (name, value, ok) in table {
            let headers = std::iter::once((name.to_owned(), value.to_owned())).collect();
            assert_eq!(check_headers(&headers).is_ok(), ok, "{name:?}: {value:?}");
        }
    }
}
