//! What a run produced, and the views people read: the terminal summary and
//! JUnit XML (`report/junit.rs`: one testcase per case; load failures are errors, never skips).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod junit;
mod markdown;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub check: String,
    pub pointer: String,
    pub expected: String,
    pub actual: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.pointer.is_empty() {
            write!(f, "{}: expected {}, got {}", self.check, self.expected, self.actual)
        } else {
            write!(f, "{} at {}: expected {}, got {}", self.check, self.pointer, self.expected, self.actual)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Passed,
    Failed(Vec<Failure>),
    /// Could not be judged: model did not load, request not sent, interrupted.
    Error(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaseReport {
    pub suite: String,
    pub name: String,
    pub outcome: Outcome,
    pub duration: Duration,
    pub http_status: Option<u16>,
    pub excerpt: String,
    pub attempt: u32,
    /// The agent it ran on (empty if it never reached one).
    pub host: String,
    /// The lease epoch the agent ran it under.
    pub lease_epoch: u64,
    /// When the agent started it (controller clock; 0 if it never ran).
    pub started_unix_ms: i64,
    /// The HTTP method and URL requested.
    pub method: String,
    pub url: String,
    /// Earlier attempts lost to infrastructure (a host lost), with why.
    pub reruns: Vec<String>,
    /// A command case: each test the command reported (its JUnit file).
    #[serde(default)]
    pub tests: Vec<TestReport>,
    /// A load case: what it measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<Box<LoadReport>>,
}

/// What a load case measured after its warm-up (latencies in microseconds).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// `closed loop, 16 connections` / `open loop, 500/s over 16 connections`.
    pub mode: String,
    pub requests: u64,
    pub errors: u64,
    /// `timeout`, `status 503`, `check`, `connect`, `closed`, `malformed`.
    pub errors_by_kind: std::collections::BTreeMap<String, u64>,
    pub measured_ms: u64,
    pub rps: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: u64,
    /// Responses judged by the case's JSON checks.
    pub checked: u64,
    pub warmup_requests: u64,
    pub thresholds: Vec<ThresholdReport>,
}

/// A threshold as judged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThresholdReport {
    pub text: String,
    pub actual: String,
    pub held: bool,
}

impl LoadReport {
    /// `52310 requests in 10.0s, 5231/s; p50 1.20ms p90 … max 12.0ms; 0 errors`.
    pub fn line(&self) -> String {
        let errors = match self.errors {
            0 => "0 errors".to_owned(),
            n => {
                let kinds: Vec<String> = self.errors_by_kind.iter().map(|(k, v)| format!("{k} {v}")).collect();
                format!("{n} errors ({})", kinds.join(", "))
            }
        };
        format!(
            "{} requests in {:.1}s, {}; p50 {} p90 {} p95 {} p99 {} p99.9 {} max {}; {errors}",
            self.requests,
            self.measured_ms as f64 / 1000.0,
            proto::format_rate(self.rps),
            latency(self.p50_us),
            latency(self.p90_us),
            latency(self.p95_us),
            latency(self.p99_us),
            latency(self.p999_us),
            latency(self.max_us),
        )
    }

    /// `p99 < 250ms (3.40ms) ok; rps > 100 (5231/s) ok`.
    pub fn thresholds_line(&self) -> String {
        let each: Vec<String> = self
            .thresholds
            .iter()
            .map(|t| format!("{} ({}) {}", t.text, t.actual, if t.held { "ok" } else { "FAILED" }))
            .collect();
        each.join("; ")
    }
}

/// Microseconds as a person reads them.
pub use proto::format_latency_us as latency;

/// One test inside a command case.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TestReport {
    pub name: String,
    pub classname: String,
    /// `passed`, `failed`, `error` or `skipped` — a skip inside the command
    /// is shown as one, never hidden.
    pub outcome: String,
    pub duration_ms: u64,
    pub message: String,
}

impl TestReport {
    /// `tests.e2e.test_nllb::test_translate`.
    pub fn id(&self) -> String {
        match self.classname.is_empty() {
            true => self.name.clone(),
            false => format!("{}::{}", self.classname, self.name),
        }
    }
}

/// A command case's `url` is `command NAME ARGS` (it sent no HTTP
/// request): `NAME ARGS`.
pub fn command_of(url: &str) -> Option<&str> {
    url.strip_prefix("command ")
}

/// What a case's excerpt is: the first errors of a load, the end of a
/// command's output, or the HTTP response.
pub fn excerpt_heading(http_status: Option<u16>, url: &str, load: bool) -> String {
    match (load, command_of(url).is_some(), http_status) {
        (true, _, _) => "first error of each kind".into(),
        (_, true, _) => "output (its end)".into(),
        (_, _, Some(status)) => format!("response ({status})"),
        (_, _, None) => "response".into(),
    }
}

impl CaseReport {
    /// See [`excerpt_heading`].
    pub fn excerpt_heading(&self) -> String {
        excerpt_heading(self.http_status, &self.url, self.load.is_some())
    }

    pub fn error(suite: &str, name: &str, message: String) -> CaseReport {
        CaseReport {
            suite: suite.to_owned(),
            name: name.to_owned(),
            outcome: Outcome::Error(message),
            duration: Duration::ZERO,
            http_status: None,
            excerpt: String::new(),
            attempt: 1,
            host: String::new(),
            lease_epoch: 0,
            started_unix_ms: 0,
            method: String::new(),
            url: String::new(),
            reruns: Vec::new(),
            tests: Vec::new(),
            load: None,
        }
    }

    /// One line naming the case and what went wrong, as the CLI prints it.
    pub fn headline(&self) -> String {
        match &self.outcome {
            Outcome::Passed => format!("case {:?} passed", self.name),
            Outcome::Failed(f) => {
                let what: Vec<String> = f.iter().map(ToString::to_string).collect();
                format!("case {:?} failed: {}", self.name, what.join("; "))
            }
            Outcome::Error(m) => format!("case {:?} error: {}", self.name, m.lines().next().unwrap_or_default()),
        }
    }
}

/// How a requested model ended up, for the summary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelLoad {
    pub host: String,
    pub service: String,
    pub model: String,
    /// `None` = ready; `Some(message)` = failed.
    pub failure: Option<String>,
    /// From the ensure to READY or FAILED.
    pub waited: Duration,
    /// Already loaded: nothing was waited for.
    pub reused: bool,
    /// The service's peak RSS and GPU memory while the model loaded (0:
    /// not known, or nothing was loaded).
    pub peak_rss_bytes: u64,
    pub peak_gpu_bytes: u64,
    /// Each stage the load went through, in order (empty when reused).
    pub stages: Vec<LoadStage>,
}

/// One stage of a model load: how long, and the service's peaks meanwhile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadStage {
    /// `LOADING_WEIGHTS`.
    pub stage: String,
    pub duration: Duration,
    pub peak_rss_bytes: u64,
    pub peak_gpu_bytes: u64,
}

impl ModelLoad {
    /// How long the load itself took, from its first stage to READY (the
    /// sum of its stages), whoever asked for it first; `waited` where no
    /// stage is known. What baselines and trends compare.
    pub fn load_time(&self) -> Duration {
        match self.stages.is_empty() {
            true => self.waited,
            false => self.stages.iter().map(|s| s.duration).sum(),
        }
    }

    /// `ready`, `failed` or `reused` (already loaded), as the reports say it.
    pub fn outcome(&self) -> &'static str {
        match (&self.failure, self.reused) {
            (Some(_), _) => "failed",
            (None, true) => "reused",
            (None, false) => "ready",
        }
    }

    /// JUnit properties of this load for a suite that waited for it:
    /// `proctor.model.<m>.{host,outcome,load_seconds,peak_rss_mib,peak_gpu_mib}`
    /// and per stage `proctor.model.<m>.stage.<STAGE>.{seconds,peak_rss_mib,peak_gpu_mib}`.
    fn properties(&self) -> Vec<(String, String)> {
        let mib = |b: u64| (b / (1024 * 1024)).to_string();
        let at = format!("proctor.model.{}", self.model);
        let mut props = vec![
            (format!("{at}.host"), self.host.clone()),
            (format!("{at}.outcome"), self.outcome().to_owned()),
            (format!("{at}.load_seconds"), format!("{:.3}", self.waited.as_secs_f64())),
            (format!("{at}.peak_rss_mib"), mib(self.peak_rss_bytes)),
            (format!("{at}.peak_gpu_mib"), mib(self.peak_gpu_bytes)),
        ];
        for s in &self.stages {
            let stage = format!("{at}.stage.{}", s.stage);
            props.push((format!("{stage}.seconds"), format!("{:.3}", s.duration.as_secs_f64())));
            props.push((format!("{stage}.peak_rss_mib"), mib(s.peak_rss_bytes)));
            props.push((format!("{stage}.peak_gpu_mib"), mib(s.peak_gpu_bytes)));
        }
        props
    }

    /// " (peak RSS 812 MiB, GPU 40000 MiB)", GPU only where known; "" when nothing was measured.
    fn peaks(&self) -> String {
        let mib = |b: u64| b / (1024 * 1024);
        match (self.peak_rss_bytes, self.peak_gpu_bytes) {
            (0, 0) => String::new(),
            (rss, 0) => format!(" (peak RSS {} MiB)", mib(rss)),
            (rss, gpu) => format!(" (peak RSS {} MiB, GPU {} MiB)", mib(rss), mib(gpu)),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunReport {
    pub run_id: String,
    pub cases: Vec<CaseReport>,
    pub loads: Vec<ModelLoad>,
    /// (suite, load) for each model load a suite waited for (or reused).
    pub suite_loads: Vec<(String, ModelLoad)>,
    pub interrupted: bool,
    pub duration: Duration,
    /// This run's loads against the stored baselines (`None`: no store, or
    /// nothing to compare).
    pub baseline: Option<crate::store::baseline::Comparison>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: usize,
    pub failed: usize,
    pub errors: usize,
}

/// "  (12 tests: 10 passed, 1 failed, 1 skipped)" for a command case.
fn test_counts(tests: &[TestReport]) -> String {
    if tests.is_empty() {
        return String::new();
    }
    let n = |o: &str| tests.iter().filter(|t| t.outcome == o).count();
    let mut parts = vec![format!("{} passed", n("passed"))];
    for o in ["failed", "error", "skipped"] {
        if n(o) > 0 {
            parts.push(format!("{} {o}", n(o)));
        }
    }
    format!("  ({} tests: {})", tests.len(), parts.join(", "))
}

/// A run's one-word verdict, as every report says it: a run whose cases
/// all passed but whose loads regressed beyond their baseline is `REGRESSED`.
pub fn verdict(failed: usize, errors: usize, interrupted: bool, regressions: usize) -> &'static str {
    match (failed, errors, interrupted) {
        (_, _, true) => "INTERRUPTED",
        (0, 0, false) if regressions > 0 => "REGRESSED",
        (0, 0, false) => "PASSED",
        (0, _, false) => "ERRORS",
        _ => "FAILED",
    }
}

/// Text made safe for XML and HTML attribute values and content; control
/// characters XML cannot carry are written as `\u{..}`.
pub(crate) fn escape_markup(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' | '\t' | '\r' => out.push(c),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

impl RunReport {
    /// Loads slower than their baseline beyond tolerance.
    pub fn regressions(&self) -> usize {
        self.baseline.as_ref().map_or(0, |b| b.regressions())
    }

    /// `PASSED`, `FAILED`, `ERRORS`, `REGRESSED` or `INTERRUPTED`.
    pub fn verdict(&self) -> &'static str {
        let c = self.counts();
        verdict(c.failed, c.errors, self.interrupted, self.regressions())
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for case in &self.cases {
            match case.outcome {
                Outcome::Passed => c.passed += 1,
                Outcome::Failed(_) => c.failed += 1,
                Outcome::Error(_) => c.errors += 1,
            }
        }
        c
    }

    /// The summary table and the details of every failure.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let suite_w = self.cases.iter().map(|c| c.suite.len()).max().unwrap_or(5).max(5);
        let case_w = self.cases.iter().map(|c| c.name.len()).max().unwrap_or(4).max(4);
        let host_w = self.cases.iter().map(|c| c.host.len()).max().unwrap_or(4).max(4);
        let _ = writeln!(
            out,
            "{:<suite_w$}  {:<case_w$}  {:<host_w$}  {:<6}  {:>9}",
            "SUITE", "CASE", "HOST", "RESULT", "TIME"
        );
        for c in &self.cases {
            let result = match c.outcome {
                Outcome::Passed => "PASS",
                Outcome::Failed(_) => "FAIL",
                Outcome::Error(_) => "ERROR",
            };
            let host = if c.host.is_empty() { "-" } else { &c.host };
            let _ = writeln!(
                out,
                "{:<suite_w$}  {:<case_w$}  {:<host_w$}  {:<6}  {:>9}{}",
                c.suite,
                c.name,
                host,
                result,
                fmt_duration(c.duration),
                test_counts(&c.tests)
            );
            if let Some(l) = &c.load {
                let _ = writeln!(out, "    load ({}): {}", l.mode, l.line());
                let _ = writeln!(out, "    thresholds: {}", l.thresholds_line());
            }
        }
        self.problems(&mut out);
        let rerun: Vec<&CaseReport> = self.cases.iter().filter(|c| !c.reruns.is_empty()).collect();
        if !rerun.is_empty() {
            let _ = writeln!(out, "\nRe-run after infrastructure loss:");
            for c in rerun {
                let _ = writeln!(out, "  {} / {} (attempt {}): {}", c.suite, c.name, c.attempt, c.reruns.join("; "));
            }
        }
        self.skipped_inside(&mut out);
        self.models(&mut out);
        if let Some(b) = self.baseline.as_ref().filter(|b| !b.is_empty()) {
            out.push_str(&b.text());
        }
        let c = self.counts();
        let _ = writeln!(
            out,
            "\n{} cases: {} passed, {} failed, {} errors{} in {}",
            self.cases.len(),
            c.passed,
            c.failed,
            c.errors,
            if self.interrupted { " (interrupted)" } else { "" },
            fmt_duration(self.duration)
        );
        out
    }

    /// Tests a command reported skipped: shown, never hidden (and failures
    /// under `--fail-on-skip`).
    fn skipped_inside(&self, out: &mut String) {
        let skipped: Vec<(&CaseReport, &TestReport)> = self
            .cases
            .iter()
            .flat_map(|c| c.tests.iter().map(move |t| (c, t)))
            .filter(|(_, t)| t.outcome == "skipped")
            .collect();
        if skipped.is_empty() {
            return;
        }
        let _ = writeln!(out, "\nSkipped inside commands ({}; --fail-on-skip makes them failures):", skipped.len());
        for (c, t) in skipped {
            let _ = writeln!(out, "  {} / {} :: {}: {}", c.suite, c.name, t.id(), t.message);
        }
    }

    /// Failed and errored cases. A case that failed because its model did
    /// not load refers to the model's block under "Models" instead of
    /// repeating it.
    fn problems(&self, out: &mut String) {
        let problems: Vec<&CaseReport> = self.cases.iter().filter(|c| c.outcome != Outcome::Passed).collect();
        if problems.is_empty() {
            return;
        }
        let _ = writeln!(out, "\nProblems:");
        for c in problems {
            let _ = writeln!(out, "  {} / {}", c.suite, c.headline());
            match &c.outcome {
                Outcome::Error(m) if self.load_failure(m).is_some() => {
                    let load = self.load_failure(m).expect("just found");
                    let _ = writeln!(out, "      (the load of {}/{}: see Models below)", load.host, load.model);
                }
                Outcome::Error(m) => {
                    for line in m.lines().skip(1) {
                        let _ = writeln!(out, "      {line}");
                    }
                    if c.load.is_some() && !c.excerpt.is_empty() {
                        let _ = writeln!(out, "      {}: {}", c.excerpt_heading(), c.excerpt);
                    }
                }
                _ if !c.excerpt.is_empty() => {
                    let _ = writeln!(out, "      {}: {}", c.excerpt_heading(), c.excerpt);
                }
                _ => {}
            }
        }
    }

    fn load_failure(&self, message: &str) -> Option<&ModelLoad> {
        self.loads.iter().find(|l| l.failure.as_deref() == Some(message))
    }

    /// Each model once, how long it took, and a failed load's whole message.
    fn models(&self, out: &mut String) {
        if self.loads.is_empty() {
            return;
        }
        let _ = writeln!(out, "\nModels:");
        for l in &self.loads {
            let name = format!("{}/{}/{}", l.host, l.service, l.model);
            let _ = match &l.failure {
                None if l.reused => writeln!(out, "  {name}: READY (already loaded)"),
                None => writeln!(out, "  {name}: READY after {}{}", fmt_duration(l.waited), l.peaks()),
                Some(m) => {
                    let _ = writeln!(
                        out,
                        "  {name}: FAILED after {}{}: {}",
                        fmt_duration(l.waited),
                        l.peaks(),
                        m.lines().next().unwrap_or("")
                    );
                    m.lines().skip(1).try_for_each(|line| writeln!(out, "      {line}"))
                }
            };
        }
    }

    /// JUnit XML: one testsuite per suite, one testcase per case (`junit`).
    pub fn junit(&self) -> String {
        junit::render(self)
    }

    /// The Markdown summary for CI (`markdown`).
    pub fn markdown(&self) -> String {
        markdown::render(self)
    }

    pub fn write_junit(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, self.junit())
    }
}

pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 1000.0 { format!("{ms:.0}ms") } else { format!("{:.1}s", ms / 1000.0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RunReport {
        let case = |name: &str, outcome| CaseReport {
            suite: "translate".into(),
            name: name.into(),
            outcome,
            duration: Duration::from_millis(12),
            http_status: Some(200),
            excerpt: "{\"model\":\"nllb\"}".into(),
            attempt: 1,
            host: "gpu-01".into(),
            lease_epoch: 1,
            started_unix_ms: 0,
            method: "POST".into(),
            url: String::new(),
            reruns: Vec::new(),
            tests: Vec::new(),
            load: None,
        };
        RunReport {
            suite_loads: vec![],
            baseline: None,
            run_id: "r".into(),
            cases: vec![
                case("ok", Outcome::Passed),
                case(
                    "wrong",
                    Outcome::Failed(vec![Failure {
                        check: "equals".into(),
                        pointer: "/model".into(),
                        expected: "\"aya\"".into(),
                        actual: "\"nllb\"".into(),
                    }]),
                ),
                case(
                    "aya",
                    Outcome::Error("model aya failed in stage AUTHENTICATING after 0.3s\n  last log lines: x".into()),
                ),
            ],
            loads: vec![],
            interrupted: false,
            duration: Duration::from_secs(3),
        }
    }

    #[test]
    fn junit_has_one_testcase_per_case_with_failures_and_errors() {
        let xml = sample().junit();
        assert_eq!(xml.matches("<testcase ").count(), 3, "{xml}");
        assert!(xml.contains("<failure message=\"case &quot;wrong&quot; failed: equals at /model: expected &quot;aya&quot;, got &quot;nllb&quot;\""), "{xml}");
        assert!(xml.contains("<error message=\"model aya failed in stage AUTHENTICATING after 0.3s\""), "{xml}");
        assert!(!xml.contains("<skipped"), "{xml}");
    }

    #[test]
    fn junit_says_where_each_case_ran_and_which_attempts_infrastructure_lost() {
        let mut run = sample();
        run.cases[0].host = "gpu-01".into();
        run.cases[0].reruns = vec!["host gpu-02 lost".into()];
        run.cases[1].host = "gpu-02".into();
        run.cases[1].http_status = Some(200);
        run.cases[1].excerpt = "{\"model\":\"nllb\"}".into();
        let xml = run.junit();
        assert!(xml.contains("hostname=\"gpu-01, gpu-02\""), "{xml}");
        // Passed on its second attempt: flaky, not failed.
        assert!(xml.contains("<flakyError message=\"re-run: host gpu-02 lost\" type=\"infrastructure\"/>"), "{xml}");
        assert!(xml.contains("<system-out>host: gpu-02 (attempt 1, lease epoch 1)"), "{xml}");
        assert!(xml.contains("response (200): {&quot;model&quot;:&quot;nllb&quot;}</system-out>"), "{xml}");
        assert_eq!(xml.matches("<property name=\"proctor.run_id\" value=\"r\"/>").count(), 1, "{xml}");
    }

    #[test]
    fn summary_names_case_pointer_expected_and_actual() {
        let text = sample().summary();
        assert!(
            text.contains("translate / case \"wrong\" failed: equals at /model: expected \"aya\", got \"nllb\""),
            "{text}"
        );
        assert!(text.contains("3 cases: 1 passed, 1 failed, 1 errors"), "{text}");
    }

    #[test]
    fn a_failed_load_is_told_once_and_each_model_says_how_long_it_took() {
        let story = "model aya failed in stage AUTHENTICATING after 0.3s\n  last log lines:\n    401 from the hub";
        let mut run = sample();
        run.cases = (0..3).map(|i| CaseReport::error("translate", &format!("aya {i}"), story.into())).collect();
        let load = |model: &str, failure: Option<&str>, ms: u64, reused: bool| ModelLoad {
            host: "gpu-01".into(),
            service: "translation".into(),
            model: model.into(),
            failure: failure.map(str::to_owned),
            waited: Duration::from_millis(ms),
            reused,
            stages: vec![],
            peak_rss_bytes: if reused { 0 } else { 812 << 20 },
            peak_gpu_bytes: if model == "nllb" { 40_000 << 20 } else { 0 },
        };
        run.loads =
            vec![load("aya", Some(story), 300, false), load("nllb", None, 22_000, false), load("m2", None, 0, true)];
        let text = run.summary();
        assert_eq!(text.matches("401 from the hub").count(), 1, "the story once, under Models:\n{text}");
        assert_eq!(text.matches("(the load of gpu-01/aya: see Models below)").count(), 3, "{text}");
        assert!(
            text.contains("gpu-01/translation/nllb: READY after 22.0s (peak RSS 812 MiB, GPU 40000 MiB)"),
            "{text}"
        );
        assert!(text.contains("gpu-01/translation/aya: FAILED after 300ms (peak RSS 812 MiB): model aya"), "{text}");
        assert!(text.contains("gpu-01/translation/m2: READY (already loaded)"), "{text}");
        assert!(!text.contains("waited 0ms"), "{text}");
    }
}
