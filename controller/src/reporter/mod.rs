//! The reporters: listeners of the run's `RunEvent` stream, each owning its
//! output — `terminal` (stdout and stderr, alone), `junit` (junit.xml, also
//! partial on a second Ctrl-C), `json` (report.json, and report.html drawn
//! from the same document by `html`), `trace` (the run's
//! OpenTelemetry trace); and, from the final report, the Markdown summary
//! (summary.md, appended to `$GITHUB_STEP_SUMMARY` when set). One task feeds
//! them in order; nothing else reaches them.

mod collect;
#[cfg(test)]
pub(crate) mod golden;
mod html;
mod json;
mod junit;
mod terminal;
mod trace;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use collect::Collected;

use crate::otel::OtelConfig;
use crate::progress::Mode;
use crate::report::RunReport;
use crate::run::events::{RunEvent, SuiteInfo};
use crate::store::baseline::{self, Comparison, Tolerance};
use crate::store::{Recorder, Store};

/// What the reporters need to know before the first event.
#[derive(Debug)]
pub struct Config {
    pub progress: Mode,
    pub out_dir: PathBuf,
    pub otel: OtelConfig,
    /// The second interrupt: write the partial JUnit file now.
    pub again: CancellationToken,
    /// Where the partial file's path is announced.
    pub partial: Arc<watch::Sender<Option<PathBuf>>>,
    /// The run store, when the run is kept (`--store`).
    pub store: Option<StoreSetup>,
    /// Said before anything else (e.g. the store could not be opened).
    pub warnings: Vec<String>,
}

/// The run store and how this run is judged against its baselines.
#[derive(Debug)]
pub struct StoreSetup {
    pub store: Arc<Store>,
    /// Who runs it (`user@host`), kept with the run.
    pub controller: String,
    /// The run's tolerance (`--baseline-tolerance`, `--baseline-slack`);
    /// a suite's own `baseline_tolerance` beats the ratio for its loads.
    pub tolerance: Tolerance,
}

/// What the reporters made of the run.
#[derive(Debug, Default)]
pub struct Outputs {
    pub report: RunReport,
    pub files: Files,
}

/// The files a run wrote (`None`: not written, and the terminal said why).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Files {
    pub junit: Option<PathBuf>,
    pub json: Option<PathBuf>,
    pub html: Option<PathBuf>,
    pub markdown: Option<PathBuf>,
    pub trace: Option<PathBuf>,
}

/// Where the Markdown summary is appended in a GitHub Actions job.
pub const STEP_SUMMARY_ENV: &str = "GITHUB_STEP_SUMMARY";

/// Writes `summary.md` and appends it to `$GITHUB_STEP_SUMMARY` when set.
fn write_markdown(report: &RunReport, out_dir: &std::path::Path) -> Result<PathBuf, String> {
    let text = report.markdown();
    let path = out_dir.join("summary.md");
    std::fs::write(&path, &text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    if let Some(step) = std::env::var_os(STEP_SUMMARY_ENV) {
        use std::io::Write as _;
        let appended =
            std::fs::OpenOptions::new().create(true).append(true).open(&step).and_then(|mut f| writeln!(f, "{text}"));
        appended.map_err(|e| format!("cannot append the summary to ${STEP_SUMMARY_ENV} ({step:?}): {e}"))?;
    }
    Ok(path)
}

/// A stored run told again by the same reporters that told it live.
#[derive(Debug)]
pub struct Replayed {
    pub report: RunReport,
    /// The run's suites as it started.
    pub suites: Vec<SuiteInfo>,
    json: json::Json,
    /// Its controller never finished it: what it holds is what arrived.
    pub partial: bool,
}

/// Replays a stored run's events (with when each arrived) into its report;
/// files go to `out_dir` when written.
pub fn replay(events: &[(i64, RunEvent)], out_dir: &std::path::Path) -> Replayed {
    let mut collected = Collected::default();
    let mut json = json::Json::new(out_dir);
    let mut finished = false;
    let mut suites = Vec::new();
    for (at, event) in events {
        if let RunEvent::Started { suites: s, .. } = event {
            suites.clone_from(s);
        }
        collected.on(event);
        json.on(event, *at);
        finished |= matches!(event, RunEvent::Finished { .. });
    }
    if finished {
        let report = collected.report("no result: the run ended before this case ran");
        return Replayed { report, suites, json, partial: false };
    }
    let mut report = collected.report("no result: the controller stopped before this case finished (partial run)");
    report.interrupted = true;
    let first = events.first().map_or(0, |e| e.0);
    let last = events.last().map_or(0, |e| e.0);
    report.duration = std::time::Duration::from_millis((last - first).max(0) as u64);
    json.set_partial();
    Replayed { report, suites, json, partial: true }
}

impl Replayed {
    /// The report.json document.
    pub fn document(&self) -> serde_json::Value {
        serde_json::to_value(self.json.document(&self.report)).unwrap_or_default()
    }

    /// Writes junit.xml, report.json, report.html and summary.md.
    pub fn write(&self, out_dir: &std::path::Path) -> Result<Files, String> {
        std::fs::create_dir_all(out_dir).map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
        let junit = out_dir.join("junit.xml");
        self.report.write_junit(&junit).map_err(|e| format!("cannot write {}: {e}", junit.display()))?;
        let markdown = out_dir.join("summary.md");
        std::fs::write(&markdown, self.report.markdown())
            .map_err(|e| format!("cannot write {}: {e}", markdown.display()))?;
        Ok(Files {
            junit: Some(junit),
            json: Some(self.json.finish(&self.report)?),
            html: Some(self.json.finish_html(&self.report)?),
            markdown: Some(markdown),
            trace: None,
        })
    }
}

/// This run's loads against the stored baselines, each judged with the
/// tightest tolerance among the suites that waited for it. Bounded: a store
/// that stopped answering costs the run 5 s, not its reports.
async fn compare(setup: &StoreSetup, report: &RunReport, suites: &[SuiteInfo]) -> Result<Comparison, String> {
    let stored = tokio::time::timeout(std::time::Duration::from_secs(5), setup.store.baselines()).await;
    let entries = match stored {
        Ok(Ok(entries)) => entries,
        Ok(Err(e)) => return Err(format!("{e}; this run was not compared with its baselines")),
        Err(_) => return Err("the run store did not answer in 5s; this run was not compared with its baselines".into()),
    };
    let tolerance_of = |key: &baseline::Key| baseline::tolerance_for(key, &report.suite_loads, suites, setup.tolerance);
    let mut comparison = baseline::compare(&entries, &report.loads, tolerance_of);
    if report.cases.iter().any(|c| c.load.is_some()) {
        let stored = tokio::time::timeout(std::time::Duration::from_secs(5), setup.store.case_baselines()).await;
        let cases = stored
            .map_err(|_| {
                "the run store did not answer in 5s; load cases were not compared with their baselines".to_owned()
            })?
            .map_err(|e| format!("{e}; load cases were not compared with their baselines"))?;
        comparison.load_cases = baseline::cases::compare(&cases, &report.cases, |suite| {
            baseline::suite_tolerance(suite, suites, setup.tolerance)
        });
    }
    Ok(comparison)
}

/// Compares the run's loads with their baselines; the comparison joins the
/// report and the store's record of the run. Bounded (see `compare`).
async fn judge(
    setup: &StoreSetup,
    recorder: &Recorder,
    junit: &mut junit::Junit,
    suites: &[SuiteInfo],
    terminal: &mut terminal::Terminal,
) {
    if let Ok(comparison) = compare(setup, &junit.report(), suites).await.inspect_err(|e| terminal.warn(e)) {
        let event = RunEvent::BaselineCompared { comparison };
        recorder.on(&event, crate::client::now_unix_ms());
        junit.on(&event);
    }
}

/// After the reports are written: every event committed and the run marked
/// finished, within 15 s — a store that stopped answering is said, never
/// waited for. A recorder that failed mid-run still gets the run's verdict.
async fn keep(setup: &StoreSetup, recorder: Recorder, report: &RunReport, terminal: &mut terminal::Terminal) {
    let limit = std::time::Duration::from_secs(15);
    match tokio::time::timeout(limit, recorder.close()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => terminal.warn(&e),
        Err(_) => terminal.warn(&format!(
            "run store {}: not every event was written within {}s; this run is kept in part",
            setup.store.location(),
            limit.as_secs()
        )),
    }
    match tokio::time::timeout(limit, setup.store.finish_run(report)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => terminal.warn(&e.to_string()),
        Err(_) => terminal.warn(&format!(
            "run store {}: the run's verdict was not written within {}s; it is listed as partial",
            setup.store.location(),
            limit.as_secs()
        )),
    }
}

/// Feeds every event to every reporter until `Finished`, then lets each
/// write its output; the terminal prints the summary last.
pub async fn run(mut events: mpsc::UnboundedReceiver<RunEvent>, config: Config) -> Outputs {
    let mut terminal = terminal::Terminal::new(config.progress);
    let mut junit = junit::Junit::new(&config.out_dir);
    let mut json = json::Json::new(&config.out_dir);
    let mut trace = trace::Trace::new(&config.otel);
    for w in &config.warnings {
        terminal.warn(w);
    }
    let recorder = config.store.as_ref().map(|s| Recorder::start(s.store.clone(), s.controller.clone()));
    let mut suites: Vec<SuiteInfo> = Vec::new();
    let mut tick = tokio::time::interval(terminal.period());
    let mut refused = false;
    let mut wrote_partial = false;
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = tick.tick() => { terminal.tick(); continue; }
            _ = config.again.cancelled(), if !wrote_partial => {
                // Announced only when written: `None` stays, and the caller says so.
                if let Some(path) = junit.write_partial() {
                    config.partial.send_replace(Some(path));
                }
                wrote_partial = true;
                continue;
            }
        };
        let Some(event) = event else { break };
        refused |= matches!(event, RunEvent::Refused { .. });
        if let RunEvent::Started { suites: s, .. } = &event {
            suites.clone_from(s);
        }
        let at = crate::client::now_unix_ms();
        if let Some(r) = &recorder {
            r.on(&event, at);
        }
        terminal.on(&event);
        junit.on(&event);
        json.on(&event, at);
        trace.on(&event);
        if matches!(event, RunEvent::Finished { .. }) {
            break;
        }
    }
    if refused {
        return Outputs::default();
    }
    // JUnit first: a second Ctrl-C during a slow trace export still finds
    // the report written, and is told where.
    let junit_path = match junit.finish() {
        Ok(p) => {
            if config.partial.borrow().is_none() {
                config.partial.send_replace(Some(p.clone()));
            }
            Some(p)
        }
        Err(e) => {
            terminal.error(&e);
            None
        }
    };
    if let (Some(setup), Some(recorder)) = (&config.store, &recorder) {
        judge(setup, recorder, &mut junit, &suites, &mut terminal).await;
    }
    let report = junit.report();
    let json_path = json.finish(&report).inspect_err(|e| terminal.error(e)).ok();
    let html_path = json.finish_html(&report).inspect_err(|e| terminal.error(e)).ok();
    let markdown_path = write_markdown(&report, &config.out_dir).inspect_err(|e| terminal.error(e)).ok();
    let (trace_path, warnings) = trace.finish(&config.out_dir).await;
    for w in warnings {
        terminal.warn(&w);
    }
    if let (Some(setup), Some(recorder)) = (&config.store, recorder) {
        keep(setup, recorder, &report, &mut terminal).await;
    }
    let files =
        Files { junit: junit_path, json: json_path, html: html_path, markdown: markdown_path, trace: trace_path };
    terminal.summary(&report, &files);
    Outputs { report, files }
}
