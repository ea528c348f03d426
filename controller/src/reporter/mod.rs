//! The reporters: listeners of the run's `RunEvent` stream, each owning its
//! output — `terminal` (stdout and stderr, alone), `junit` (junit.xml, also
//! partial on a second Ctrl-C), `json` (report.json, and report.html drawn
//! from the same document by `html`), `trace` (the run's
//! OpenTelemetry trace); and, from the final report, the Markdown summary
//! (summary.md, appended to `$GITHUB_STEP_SUMMARY` when set). One task feeds
//! them in order; nothing else reaches them.

mod collect;
#[cfg(test)]
mod golden;
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
use crate::run::events::RunEvent;

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

/// Feeds every event to every reporter until `Finished`, then lets each
/// write its output; the terminal prints the summary last.
pub async fn run(mut events: mpsc::UnboundedReceiver<RunEvent>, config: Config) -> Outputs {
    let mut terminal = terminal::Terminal::new(config.progress);
    let mut junit = junit::Junit::new(&config.out_dir);
    let mut json = json::Json::new(&config.out_dir);
    let mut trace = trace::Trace::new(&config.otel);
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
        terminal.on(&event);
        junit.on(&event);
        json.on(&event);
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
    let report = junit.report();
    let json_path = json.finish(&report).inspect_err(|e| terminal.error(e)).ok();
    let html_path = json.finish_html(&report).inspect_err(|e| terminal.error(e)).ok();
    let markdown_path = write_markdown(&report, &config.out_dir).inspect_err(|e| terminal.error(e)).ok();
    let (trace_path, warnings) = trace.finish(&config.out_dir).await;
    for w in warnings {
        terminal.warn(&w);
    }
    let files =
        Files { junit: junit_path, json: json_path, html: html_path, markdown: markdown_path, trace: trace_path };
    terminal.summary(&report, &files);
    Outputs { report, files }
}
