//! Test suites: YAML files parsed and validated before anything runs, with
//! errors that point at `file:line:column`. The YAML crate stays behind this
//! module; the rest of the controller sees only the domain types below.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::Spanned;

pub use proto::parse_duration;

pub mod load;
pub use load::{LoadSpec, Threshold};

/// A validated suite.
#[derive(Clone, Debug, PartialEq)]
pub struct Suite {
    pub name: String,
    pub file: PathBuf,
    pub service: String,
    pub models: Vec<String>,
    /// Model load timeout asked by the suite (below the CLI flag).
    pub load_timeout: Option<Duration>,
    /// Hosts must carry all of these labels.
    pub labels: Vec<String>,
    /// Memory to keep free beyond the models' declared needs.
    pub headroom_bytes: u64,
    /// GPU memory to keep free beyond the models' declared GPU needs.
    pub gpu_headroom_bytes: u64,
    /// Restart the service for a cold load even where the models are loaded.
    pub fresh: bool,
    /// Split the cases across hosts: `None` = one host.
    pub shard: Option<Shard>,
    /// How long to wait for a free host before the cases become errors
    /// (beats `--max-wait`; `None`: as long as it takes).
    pub max_wait: Option<Duration>,
    /// How much slower than its baseline a load may be (0.2 = 20 %; beats
    /// `--baseline-tolerance` for this suite's loads).
    pub baseline_tolerance: Option<f64>,
    /// How many of its cases may run at once on a host (1: in order).
    pub parallel: u32,
    pub cases: Vec<Case>,
}

/// `shard: N` or `shard: auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shard {
    Count(u32),
    Auto,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    pub name: String,
    /// The models this case needs; if one fails to load the case is an error.
    pub models: Vec<String>,
    pub request: HttpRequest,
    pub checks: Vec<Check>,
    pub timeout: Option<Duration>,
    /// A test command instead of an HTTP request (`request` unused then).
    pub command: Option<CommandCase>,
    /// A load test: its requests sent many times, judged by thresholds
    /// (`checks` judge its status and, sampled, its responses' JSON).
    pub load: Option<LoadSpec>,
}

/// `command: NAME` with `args`: one of the service's test commands.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandCase {
    pub name: String,
    pub args: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Check {
    Status(u16),
    Equals { pointer: String, value: Value },
    OneOf { pointer: String, values: Vec<Value> },
    NotEmpty { pointer: String },
    Matches { pointer: String, regex: String },
}

/// A suite that cannot be used, with where and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}:{line}:{column}: {message}")]
pub struct SuiteError {
    pub file: String,
    pub line: u64,
    pub column: u64,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSuite {
    name: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    service: Spanned<String>,
    models: Spanned<Vec<String>>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    labels: Vec<String>,
    #[serde(default)]
    headroom_mb: u64,
    #[serde(default)]
    gpu_headroom_mb: u64,
    #[serde(default)]
    fresh: bool,
    #[serde(default)]
    shard: Option<Spanned<String>>,
    #[serde(default)]
    max_wait: Option<Spanned<String>>,
    #[serde(default)]
    baseline_tolerance: Option<Spanned<String>>,
    #[serde(default)]
    parallel: Option<Spanned<u32>>,
    cases: Spanned<Vec<Spanned<RawCase>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: Spanned<String>,
    #[serde(default)]
    models: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    request: Option<RawRequest>,
    /// A test command of the service (the agent's `[[service.test_command]]`).
    #[serde(default)]
    command: Option<Spanned<String>>,
    #[serde(default)]
    args: Vec<String>,
    /// A load test of the request(s).
    #[serde(default)]
    load: Option<Spanned<load::RawLoad>>,
    #[serde(default)]
    expect: Option<RawExpect>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRequest {
    method: Spanned<String>,
    path: Spanned<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    json: Option<Value>,
    #[serde(default)]
    body: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    json: Vec<Spanned<RawCheck>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    pointer: String,
    /// `equals: null` is a check for null, not a missing key.
    #[serde(default, deserialize_with = "present")]
    equals: Option<Value>,
    #[serde(default)]
    one_of: Option<Vec<Value>>,
    #[serde(default)]
    not_empty: Option<bool>,
    #[serde(default)]
    matches: Option<String>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// A suite file larger than this is refused before it is read: suites are
/// hand-written lists of cases, and a YAML bomb must not take the runner down.
pub const MAX_SUITE_BYTES: u64 = 4 * 1024 * 1024;

/// The most cases of a suite that run at once on one host (the agent's own
/// limit too).
pub const MAX_PARALLEL: u32 = 64;

/// YAML values (scalars, lists, maps) one suite file may hold: a case
/// written out in full is about 25, so 100,000 cases fit; a file that needs
/// more is past [`MAX_SUITE_BYTES`] long before.
pub const MAX_SUITE_NODES: usize = 2_500_000;

/// Nesting of lists and maps in a suite (a case's JSON body included).
pub const MAX_SUITE_DEPTH: usize = 64;

/// The parser's limits, set for suites rather than left at the YAML crate's
/// defaults (whose 250,000 values refused a 10,000-case suite). The file
/// size (`MAX_SUITE_BYTES`) is checked before parsing; anchors and aliases
/// keep the crate's bounds against alias bombs.
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = MAX_SUITE_NODES;
    budget.max_events = 3 * MAX_SUITE_NODES;
    budget.max_depth = MAX_SUITE_DEPTH;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// The parser limit an error is about, under its snippet and alias wrappers.
fn budget_breach(mut e: &serde_saphyr::Error) -> Option<&serde_saphyr::budget::BudgetBreach> {
    loop {
        match e {
            serde_saphyr::Error::Budget { breach, .. } => return Some(breach),
            serde_saphyr::Error::WithSnippet { error, .. } | serde_saphyr::Error::AliasError { error, .. } => e = error,
            _ => return None,
        }
    }
}

/// A limit the suite went past, named with its fix.
fn over_budget(breach: &serde_saphyr::budget::BudgetBreach) -> String {
    use serde_saphyr::budget::BudgetBreach as B;
    match breach {
        B::Nodes { .. } | B::Events { .. } => format!(
            "the suite holds more than {MAX_SUITE_NODES} YAML values, the limit for one suite file: split its cases \
             into several suite files (a run takes many)"
        ),
        B::Depth { .. } => format!(
            "the suite nests lists and maps deeper than {MAX_SUITE_DEPTH} levels, the limit for a suite: flatten the \
             request body (or send it as `body:` text)"
        ),
        other => format!(
            "the suite went past a YAML parser limit ({other:?}); anchors and aliases are limited against alias \
             bombs — write the cases out, or split the file"
        ),
    }
}

/// Reads and validates a suite file.
pub fn load(path: &Path) -> Result<Suite, SuiteError> {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if size > MAX_SUITE_BYTES {
        return Err(SuiteError {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            message: format!(
                "the suite is {} MiB; suites are limited to {} MiB — split it into several files",
                size / (1024 * 1024),
                MAX_SUITE_BYTES / (1024 * 1024)
            ),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| SuiteError {
        file: path.display().to_string(),
        line: 0,
        column: 0,
        message: format!("cannot read suite: {e}"),
    })?;
    parse(&text, path)
}

/// Parses suite text; `path` is used for messages and `Suite::file`.
pub fn parse(text: &str, path: &Path) -> Result<Suite, SuiteError> {
    let r = Reader { file: path.display().to_string() };
    let raw: RawSuite = serde_saphyr::from_str_with_options(text, yaml_options()).map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        let message = match budget_breach(&e) {
            Some(breach) => over_budget(breach),
            // The first line of saphyr's message is the reason; the rest is a snippet.
            _ => strip_location(e.to_string().lines().next().unwrap_or("invalid YAML")).to_owned(),
        };
        SuiteError { file: r.file.clone(), line, column, message }
    })?;
    let _ = raw.description;
    let name = r.non_empty(&raw.name, "suite name")?;
    let service = r.non_empty(&raw.service, "service")?;
    if raw.models.value.is_empty() {
        return Err(r.at(raw.models.referenced, "models is empty: list the models this suite needs".into()));
    }
    let load_timeout = raw.timeout.as_ref().map(|t| r.duration(t)).transpose()?;
    let max_wait = raw.max_wait.as_ref().map(|t| r.duration(t)).transpose()?;
    let baseline_tolerance = raw
        .baseline_tolerance
        .as_ref()
        .map(|t| crate::store::baseline::parse_ratio(&t.value).map_err(|e| r.at(t.referenced, e)))
        .transpose()?;
    let parallel = match &raw.parallel {
        None => 1,
        Some(p) if (1..=MAX_PARALLEL).contains(&p.value) => p.value,
        Some(p) => {
            let why = format!("parallel {} must be from 1 (one case at a time) to {MAX_PARALLEL}", p.value);
            return Err(r.at(p.referenced, why));
        }
    };
    if raw.cases.value.is_empty() {
        return Err(r.at(raw.cases.referenced, "cases is empty: a suite needs at least one case".into()));
    }
    let mut cases: Vec<Case> = Vec::new();
    for spanned in &raw.cases.value {
        let case = r.case(spanned, &raw.models.value, &cases)?;
        cases.push(case);
    }
    Ok(Suite {
        name,
        file: path.to_owned(),
        service,
        models: raw.models.value,
        load_timeout,
        labels: raw.labels,
        headroom_bytes: raw.headroom_mb * 1024 * 1024,
        gpu_headroom_bytes: raw.gpu_headroom_mb * 1024 * 1024,
        fresh: raw.fresh,
        shard: r.shard(raw.shard.as_ref())?,
        max_wait,
        baseline_tolerance,
        parallel,
        cases,
    })
}

/// Turns raw values into checked ones, each error naming where it is.
struct Reader {
    file: String,
}

impl Reader {
    fn at(&self, loc: serde_saphyr::Location, message: String) -> SuiteError {
        SuiteError { file: self.file.clone(), line: loc.line(), column: loc.column(), message }
    }

    fn non_empty(&self, s: &Spanned<String>, what: &str) -> Result<String, SuiteError> {
        if s.value.trim().is_empty() {
            Err(self.at(s.referenced, format!("{what} is empty")))
        } else {
            Ok(s.value.clone())
        }
    }

    fn duration(&self, s: &Spanned<String>) -> Result<Duration, SuiteError> {
        match parse_duration(&s.value) {
            Some(d) if d.is_zero() => Err(self.at(s.referenced, format!("{:?} must be greater than zero", s.value))),
            Some(d) => Ok(d),
            None => Err(self
                .at(s.referenced, format!("{:?} is not a duration; write e.g. \"500ms\", \"30s\", \"5m\"", s.value))),
        }
    }

    /// One case, checked against the suite's models and the cases before it.
    fn case(&self, spanned: &Spanned<RawCase>, suite_models: &[String], earlier: &[Case]) -> Result<Case, SuiteError> {
        let c = &spanned.value;
        let name = self.non_empty(&c.name, "case name")?;
        if earlier.iter().any(|o| o.name == name) {
            return Err(self.at(c.name.referenced, format!("case name {name:?} is used twice in this suite")));
        }
        let models = match &c.models {
            Some(m) => {
                if let Some(unknown) = m.value.iter().find(|x| !suite_models.contains(x)) {
                    return Err(self.at(
                        m.referenced,
                        format!("model {unknown:?} is not in the suite's models {suite_models:?}; add it there"),
                    ));
                }
                m.value.clone()
            }
            None => suite_models.to_vec(),
        };
        let timeout = c.timeout.as_ref().map(|t| self.duration(t)).transpose()?;
        if let Some(command) = self.command(spanned)? {
            let request =
                HttpRequest { method: String::new(), path: String::new(), headers: BTreeMap::new(), body: Vec::new() };
            return Ok(Case { name, models, request, checks: Vec::new(), timeout, command: Some(command), load: None });
        }
        if let Some(raw) = &c.load {
            let (request, load) = self.load(spanned, raw)?;
            let checks = self.checks(c.expect.as_ref())?;
            return Ok(Case { name, models, request, checks, timeout, command: None, load: Some(load) });
        }
        let request = self.request(spanned)?;
        let checks = self.checks(c.expect.as_ref())?;
        if checks.is_empty() {
            return Err(self.at(
                spanned.referenced,
                format!("case {name:?} checks nothing: add `expect` with a status or json checks"),
            ));
        }
        Ok(Case { name, models, request, checks, timeout, command: None, load: None })
    }

    /// `command: NAME` (+ `args`): the agent checks the name and arguments
    /// against its own allow-list; here only its shape.
    fn command(&self, spanned: &Spanned<RawCase>) -> Result<Option<CommandCase>, SuiteError> {
        let c = &spanned.value;
        let Some(name) = &c.command else {
            if !c.args.is_empty() {
                return Err(self.at(spanned.referenced, "`args` belong to a `command` case; add `command:`".into()));
            }
            return Ok(None);
        };
        let why = match (&c.request, &c.expect) {
            (Some(_), _) => Some("a case runs a `command` or sends a `request`, not both; keep one"),
            _ if c.load.is_some() => Some("a case runs a `command` or a `load` test, not both; keep one"),
            (_, Some(_)) => Some("a command case is judged by its exit code and its tests' results; drop `expect`"),
            _ if name.value.trim().is_empty() => Some("command is empty: name one of the service's test commands"),
            _ => None,
        };
        match why {
            Some(why) => Err(self.at(name.referenced, why.into())),
            None => Ok(Some(CommandCase { name: name.value.clone(), args: c.args.clone() })),
        }
    }

    fn request(&self, spanned: &Spanned<RawCase>) -> Result<HttpRequest, SuiteError> {
        let Some(r) = &spanned.value.request else {
            let why =
                "a case needs a `request` (an HTTP case), a `command` (a test command of the service) or a `load`";
            return Err(self.at(spanned.referenced, why.into()));
        };
        self.http(r, spanned.referenced)
    }

    /// One HTTP request as written (`at`: where, for an error about the whole request).
    fn http(&self, r: &RawRequest, at: serde_saphyr::Location) -> Result<HttpRequest, SuiteError> {
        let method = r.method.value.to_uppercase();
        if !METHODS.contains(&method.as_str()) {
            return Err(self
                .at(r.method.referenced, format!("unknown HTTP method {:?}; use one of {METHODS:?}", r.method.value)));
        }
        if !r.path.value.starts_with('/') {
            return Err(self.at(r.path.referenced, format!("path {:?} must start with '/'", r.path.value)));
        }
        let mut headers = r.headers.clone();
        let body = match (&r.json, &r.body) {
            (Some(_), Some(_)) => {
                return Err(self.at(at, "request has both `json` and `body`; keep one".into()));
            }
            (Some(json), None) => {
                headers.entry("content-type".into()).or_insert_with(|| "application/json".into());
                serde_json::to_vec(json).unwrap_or_default()
            }
            (None, Some(text)) => text.clone().into_bytes(),
            (None, None) => Vec::new(),
        };
        Ok(HttpRequest { method, path: r.path.value.clone(), headers, body })
    }

    fn checks(&self, expect: Option<&RawExpect>) -> Result<Vec<Check>, SuiteError> {
        let Some(expect) = expect else { return Ok(Vec::new()) };
        let mut checks: Vec<Check> = expect.status.map(Check::Status).into_iter().collect();
        for chk in &expect.json {
            checks.push(check(&chk.value).map_err(|m| self.at(chk.referenced, m))?);
        }
        Ok(checks)
    }

    fn shard(&self, shard: Option<&Spanned<String>>) -> Result<Option<Shard>, SuiteError> {
        let Some(s) = shard else { return Ok(None) };
        if s.value == "auto" {
            return Ok(Some(Shard::Auto));
        }
        match s.value.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(Some(Shard::Count(n))),
            _ => {
                Err(self
                    .at(s.referenced, format!("shard {:?}: write a number of hosts (1 or more) or `auto`", s.value)))
            }
        }
    }
}

/// Suites of one run must have distinct names: reports, the trace and the
/// run store tell suites apart by name. One error per repeated name.
pub fn duplicate_names(suites: &[Suite]) -> Vec<String> {
    let mut errors = Vec::new();
    for (i, s) in suites.iter().enumerate() {
        let earlier: Vec<&Suite> = suites[..i].iter().filter(|o| o.name == s.name).collect();
        if let [first] = earlier.as_slice() {
            errors.push(format!(
                "{}: suite name {:?} is already used by {}; give each suite of a run its own name",
                s.file.display(),
                s.name,
                first.file.display()
            ));
        }
    }
    errors
}

/// A duration as a suite or flag would write it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// saphyr says "error: line 3 column 5: reason"; we print the location once.
fn strip_location(message: &str) -> &str {
    let m = message.strip_prefix("error: ").unwrap_or(message);
    match m.strip_prefix("line ").and_then(|rest| rest.split_once(": ")) {
        Some((_, reason)) => reason,
        None => m,
    }
}

fn check(raw: &RawCheck) -> Result<Check, String> {
    let pointer = raw.pointer.clone();
    if !pointer.is_empty() && !pointer.starts_with('/') {
        return Err(format!("pointer {pointer:?} must be a JSON pointer starting with '/' (e.g. /models/nllb/status)"));
    }
    let mut found = Vec::new();
    if let Some(v) = &raw.equals {
        found.push(Check::Equals { pointer: pointer.clone(), value: v.clone() });
    }
    if let Some(v) = &raw.one_of {
        found.push(Check::OneOf { pointer: pointer.clone(), values: v.clone() });
    }
    if raw.not_empty == Some(true) {
        found.push(Check::NotEmpty { pointer: pointer.clone() });
    }
    if let Some(r) = &raw.matches {
        regex::Regex::new(r).map_err(|e| format!("`matches` is not a valid regex: {e}"))?;
        found.push(Check::Matches { pointer: pointer.clone(), regex: r.clone() });
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(format!(
            "check on {pointer:?} says nothing to check: add one of equals, one_of, not_empty: true, matches"
        )),
        _ => Err(format!(
            "check on {pointer:?} has several of equals, one_of, not_empty, matches; split it into one check each"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
name: translate
service: translation
models: [nllb]
timeout: 5m
cases:
  - name: english to spanish
    request:
      method: post
      path: /translate
      json: {text: Hello world, source_lang: en, target_lang: es, model: nllb}
    expect:
      status: 200
      json:
        - {pointer: /translated_text, equals: hola mundo}
        - {pointer: /model, one_of: [nllb, aya]}
        - {pointer: /processing_time_ms, not_empty: true}
        - {pointer: /target_lang, matches: '^es$'}
        - {pointer: /error, equals: null}
";

    #[test]
    fn a_suite_file_over_the_limit_is_refused_before_it_is_read() {
        let path = std::env::temp_dir().join(format!("proctor-big-suite-{}.yaml", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(MAX_SUITE_BYTES + 1).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("suites are limited to 4 MiB") && e.contains("split it"), "{e}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn parses_a_suite() {
        let s = parse(GOOD, Path::new("s.yaml")).unwrap();
        assert_eq!(s.load_timeout, Some(Duration::from_secs(300)));
        assert_eq!((s.shard, s.fresh, s.headroom_bytes, s.gpu_headroom_bytes), (None, false, 0, 0));
        let s = parse(
            &GOOD.replace(
                "timeout: 5m",
                "timeout: 5m\nshard: auto\nfresh: true\nheadroom_mb: 512\ngpu_headroom_mb: 1024\nlabels: [a100]",
            ),
            Path::new("s.yaml"),
        )
        .unwrap();
        assert_eq!((s.shard, s.fresh, s.headroom_bytes), (Some(Shard::Auto), true, 512 * 1024 * 1024));
        assert_eq!(s.gpu_headroom_bytes, 1024 * 1024 * 1024);
        assert_eq!(s.labels, vec!["a100"]);
        let c = &s.cases[0];
        assert_eq!(c.request.method, "POST");
        assert_eq!(c.models, vec!["nllb"]);
        assert_eq!(c.request.headers["content-type"], "application/json");
        let body: Value = serde_json::from_slice(&c.request.body).unwrap();
        assert_eq!(body["text"], "Hello world");
        assert_eq!(c.checks.len(), 6);
        assert_eq!(c.checks[5], Check::Equals { pointer: "/error".into(), value: Value::Null });
        assert_eq!(c.checks[1], Check::Equals { pointer: "/translated_text".into(), value: Value::from("hola mundo") });
    }

    /// (what to change in GOOD, expected "line:column: message" prefix)
    #[test]
    fn errors_point_at_file_line_column() {
        let table = [
            ("timeout: 5m", "timeout: soon", "s.yaml:4:10: \"soon\" is not a duration"),
            ("method: post", "method: fetch", "s.yaml:8:15: unknown HTTP method \"fetch\""),
            ("path: /translate", "path: translate", "s.yaml:9:13: path \"translate\" must start with '/'"),
            (
                "{pointer: /model, one_of: [nllb, aya]}",
                "{pointer: /model}",
                "s.yaml:15:11: check on \"/model\" says nothing to check",
            ),
            ("matches: '^es$'", "matches: '^(es'", "s.yaml:17:11: `matches` is not a valid regex"),
            ("models: [nllb]", "models: []", "s.yaml:3:9: models is empty"),
            ("    expect:", "    expected:", "s.yaml:11:5: unknown field `expected`"),
            ("status: 200", "status: [200]", "s.yaml:12:15:"),
            ("timeout: 5m", "timeout: 5m\nshard: many", "s.yaml:5:8: shard \"many\": write a number"),
            (
                "timeout: 5m",
                "timeout: 5m\nparallel: 0",
                "s.yaml:5:11: parallel 0 must be from 1 (one case at a time) to 64",
            ),
            ("timeout: 5m", "timeout: 5m\nparallel: 65", "s.yaml:5:11: parallel 65 must be from 1"),
        ];
        for (from, to, want) in table {
            assert!(GOOD.contains(from), "{from}");
            let err = parse(&GOOD.replace(from, to), Path::new("s.yaml")).unwrap_err().to_string();
            assert!(err.starts_with(want), "{from} -> {to}: got {err:?}, want prefix {want:?}");
        }
    }

    /// A generated suite of `n` cases, seven lines each.
    fn generated(n: usize) -> String {
        let mut text = String::from("name: big\nservice: translation\nmodels: [nllb]\ncases:\n");
        for i in 0..n {
            text.push_str(&format!(
                "  - name: case {i}\n    request:\n      method: POST\n      path: /translate\n      json: {{text: \
                 Hello {i}, source_lang: en, target_lang: es, model: nllb}}\n    expect:\n      status: 200\n      \
                 json: [{{pointer: /model, equals: nllb}}]\n"
            ));
        }
        text
    }

    #[test]
    fn a_suite_of_ten_thousand_cases_is_read_and_past_the_limits_is_told_how_to_split() {
        let big = parse(&generated(10_000), Path::new("k10000.yaml")).expect("10,000 cases are a suite");
        assert_eq!(big.cases.len(), 10_000);
        let nested = format!("{}1{}", "[".repeat(70), "]".repeat(70));
        let deep = GOOD.replace("json: {text: Hello world", &format!("json: {{deep: {nested}, text: Hello world"));
        assert_ne!(deep, GOOD);
        let err = parse(&deep, Path::new("s.yaml")).unwrap_err().to_string();
        assert!(err.contains("deeper than 64 levels, the limit for a suite: flatten the request body"), "{err}");
        use serde_saphyr::budget::BudgetBreach as B;
        for (breach, says) in [
            (
                B::Nodes { nodes: MAX_SUITE_NODES + 1 },
                "more than 2500000 YAML values, the limit for one suite file: split",
            ),
            (B::Events { events: 1 }, "split its cases into several suite files"),
            (B::Aliases { aliases: 50_001 }, "anchors and aliases are limited"),
        ] {
            assert!(over_budget(&breach).contains(says), "{breach:?}: {}", over_budget(&breach));
        }
    }

    #[test]
    fn duplicate_case_names_are_refused() {
        let doubled = format!("{GOOD}{}", &GOOD[GOOD.find("  - name").unwrap()..]);
        let err = parse(&doubled, Path::new("s.yaml")).unwrap_err();
        assert!(err.message.contains("used twice"), "{err}");
        assert_eq!(err.line, 19);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        const VALID: &str = "name: translate\nservice: translation\nmodels: [nllb]\ntimeout: 5m\ncases:\n  - name: hello\n    request: {method: POST, path: /translate, json: {text: Hello}}\n    expect:\n      status: 200\n      json:\n        - {pointer: /translated_text, equals: hola}\n        - {pointer: /model, matches: \"^nl\"}\n";

        proptest! {
            /// Any text, and any damage to a valid suite, is a suite or an
            /// error that says where — never a panic.
            #[test]
            fn any_text_parses_or_says_where(text in ".{0,400}") {
                if let Err(e) = parse(&text, Path::new("s.yaml")) {
                    prop_assert!(!e.message.is_empty());
                }
            }

            #[test]
            fn a_damaged_suite_parses_or_says_where(cut in 0usize..400, at in 0usize..400, junk in ".{0,8}") {
                let mut text: String = VALID.chars().take(cut).collect();
                let at = text.char_indices().nth(at).map_or(text.len(), |(i, _)| i);
                text.insert_str(at, &junk);
                if let Err(e) = parse(&text, Path::new("s.yaml")) {
                    prop_assert!(!e.message.is_empty());
                }
            }
        }

        #[test]
        fn the_valid_suite_is_valid() {
            parse(VALID, Path::new("s.yaml")).unwrap();
        }
    }
}
