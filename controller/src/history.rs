//! The commands that read the run store — `proctor runs list | show`,
//! `proctor report RUN`, `proctor baseline set | show | compare` and
//! `proctor trends` — each printing for people (or JSON with `--output
//! json`) and answering with an exit code.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::client::format_unix_ms;
use crate::reporter::{Replayed, replay};
use crate::run::Exit;
use crate::store::baseline::{self, Tolerance};
use crate::store::trends::{self, CaseTrend, LoadTrend};
use crate::store::{Location, RunRow, Store, StoreError};

/// Prints to stdout; a closed pipe (`| head`) is not an error.
fn say(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().write_all(text.as_bytes());
}

fn fail(message: impl std::fmt::Display, exit: Exit) -> Exit {
    eprintln!("error: {message}");
    exit
}

fn json(value: &impl serde::Serialize) {
    say(&(serde_json::to_string_pretty(value).unwrap_or_default() + "\n"));
}

/// Opens the store a command reads: a missing SQLite file is not created.
pub async fn open(location: &Location) -> Result<Store, StoreError> {
    if let Location::Sqlite(path) = location
        && !path.exists()
    {
        return Err(StoreError {
            location: location.to_string(),
            message: "no store here yet: runs are kept once `proctor run` or `proctor demo` ran with it".into(),
            no_such_run: false,
        });
    }
    Store::open(location).await
}

/// A store error is 2 (infrastructure); a run that is not there is 64.
fn store_failed(e: StoreError) -> Exit {
    let exit = if e.no_such_run { Exit::BadInput } else { Exit::Infrastructure };
    fail(e, exit)
}

/// A command's body answers `Ok(exit)` or, having said why, `Err(exit)`.
fn exit(result: Result<Exit, Exit>) -> Exit {
    result.unwrap_or_else(|e| e)
}

fn when(ms: i64) -> String {
    format_unix_ms(ms).replace('T', " ").trim_end_matches('Z').chars().take(19).collect()
}

fn status(r: &RunRow) -> String {
    match r.partial() {
        true => "partial".into(),
        false => r.status.clone(),
    }
}

/// `proctor runs list`.
pub async fn list(location: &Location, last: usize, as_json: bool) -> Exit {
    exit(list_runs(location, last, as_json).await)
}

async fn list_runs(location: &Location, last: usize, as_json: bool) -> Result<Exit, Exit> {
    let store = open(location).await.map_err(store_failed)?;
    let runs = store.runs(last).await.map_err(store_failed)?;
    if as_json {
        let rows: Vec<serde_json::Value> = runs
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["partial"] = r.partial().into();
                v
            })
            .collect();
        json(&rows);
        return Ok(Exit::Passed);
    }
    say(&runs_table(&runs));
    Ok(Exit::Passed)
}

/// The table `runs list` prints, newest first.
pub fn runs_table(runs: &[RunRow]) -> String {
    let mut out = format!(
        "{:<36}  {:<19}  {:<11}  {:>5}  {:>5}  {:>5}  {:>5}  {}\n",
        "RUN", "STARTED (UTC)", "STATUS", "CASES", "PASS", "FAIL", "ERR", "SUITES"
    );
    for r in runs {
        let _ = writeln!(
            out,
            "{:<36}  {:<19}  {:<11}  {:>5}  {:>5}  {:>5}  {:>5}  {}",
            r.id,
            when(r.started_unix_ms),
            status(r),
            r.cases,
            r.passed,
            r.failed,
            r.errors,
            r.suites
        );
    }
    if runs.iter().any(RunRow::partial) {
        out.push_str("partial: its controller stopped before the end (killed, or still running); `proctor runs show RUN` tells what it received\n");
    }
    out
}

/// A stored run, told again.
async fn told(store: &Store, which: &str, out_dir: &Path) -> Result<(RunRow, Replayed), Exit> {
    let row = store.run(which).await.map_err(store_failed)?;
    let events = store.events(&row.id).await.map_err(store_failed)?;
    Ok((row, replay(&events, out_dir)))
}

/// `proctor runs show RUN`.
pub async fn show(location: &Location, which: &str, as_json: bool) -> Exit {
    exit(show_run(location, which, as_json).await)
}

async fn show_run(location: &Location, which: &str, as_json: bool) -> Result<Exit, Exit> {
    let store = open(location).await.map_err(store_failed)?;
    let (row, told) = told(&store, which, Path::new(".")).await?;
    if as_json {
        json(&told.document());
        return Ok(Exit::Passed);
    }
    let finished = row.finished_unix_ms.map_or("never: partial run, what it received is below".into(), when);
    say(&format!(
        "run {}\n  started   {} UTC by {}\n  finished  {}\n  status    {}\n\n{}",
        row.id,
        when(row.started_unix_ms),
        row.controller,
        finished,
        status(&row),
        told.report.summary()
    ));
    Ok(Exit::Passed)
}

/// `proctor report RUN --out DIR`: the reports, written again from the store.
pub async fn report(location: &Location, which: &str, out_dir: &Path) -> Exit {
    exit(write_report(location, which, out_dir).await)
}

async fn write_report(location: &Location, which: &str, out_dir: &Path) -> Result<Exit, Exit> {
    let store = open(location).await.map_err(store_failed)?;
    let (row, told) = told(&store, which, out_dir).await?;
    Ok(match told.write(out_dir) {
        Ok(files) => {
            let mut text = format!("run {} ({})\n", row.id, status(&row));
            for (what, path) in [
                ("HTML report", &files.html),
                ("JSON report", &files.json),
                ("JUnit report", &files.junit),
                ("Markdown summary", &files.markdown),
            ] {
                if let Some(p) = path {
                    let _ = writeln!(text, "{what}: {}", p.display());
                }
            }
            say(&text);
            Exit::Passed
        }
        Err(e) => fail(e, Exit::Infrastructure),
    })
}

/// `proctor baseline set [RUN]`: the run's loads become the baseline of
/// their host, service and model.
pub async fn set(location: &Location, which: &str) -> Exit {
    exit(set_baseline(location, which).await)
}

async fn set_baseline(location: &Location, which: &str) -> Result<Exit, Exit> {
    let store = open(location).await.map_err(store_failed)?;
    let (row, told) = told(&store, which, Path::new(".")).await?;
    let now = crate::client::now_unix_ms();
    let entries = baseline::entries(&told.report.loads, &row.id, now);
    let cases = baseline::cases::entries(&told.report.cases, &row.id, now);
    if entries.is_empty() && cases.is_empty() {
        let why = format!(
            "run {} has no model load that did the work (every model was already loaded, or failed) and no load \
             case that ran to its end: set the baseline from a run with cold loads (`proctor run --fresh`)",
            row.id
        );
        return Err(fail(why, Exit::BadInput));
    }
    if !entries.is_empty() {
        store.set_baseline(&entries).await.map_err(store_failed)?;
    }
    if !cases.is_empty() {
        store.set_case_baseline(&cases).await.map_err(store_failed)?;
    }
    say(&format!("baseline set from run {}:\n{}{}", row.id, entries_table(&entries), case_entries_table(&cases)));
    Ok(Exit::Passed)
}

fn case_entries_table(entries: &[baseline::cases::CaseEntry]) -> String {
    if entries.is_empty() {
        return String::new();
    }
    let key_w = entries.iter().map(|e| e.key.to_string().len()).max().unwrap_or(9).max(9);
    let mut out =
        format!("  {:<key_w$}  {:<6}  {:>9}  {:<36}  {}\n", "LOAD CASE", "METRIC", "VALUE", "FROM RUN", "SET (UTC)");
    for e in entries {
        let _ = writeln!(
            out,
            "  {:<key_w$}  {:<6}  {:>9}  {:<36}  {}",
            e.key.to_string(),
            e.metric.trim_end_matches("_us"),
            baseline::cases::show(&e.metric, e.value),
            e.run_id,
            when(e.set_unix_ms)
        );
    }
    out
}

fn entries_table(entries: &[baseline::Entry]) -> String {
    let key_w = entries.iter().map(|e| e.key.to_string().len()).max().unwrap_or(5).max(5);
    let stage_w = entries.iter().map(|e| e.stage.len()).max().unwrap_or(5).max(5);
    let mut out =
        format!("  {:<key_w$}  {:<stage_w$}  {:>9}  {:<36}  {}\n", "MODEL", "STAGE", "TIME", "FROM RUN", "SET (UTC)");
    for e in entries {
        let _ = writeln!(
            out,
            "  {:<key_w$}  {:<stage_w$}  {:>9}  {:<36}  {}",
            e.key.to_string(),
            e.stage,
            baseline::seconds(e.ms),
            e.run_id,
            when(e.set_unix_ms)
        );
    }
    out
}

/// `proctor baseline show`.
pub async fn show_baselines(location: &Location, as_json: bool) -> Exit {
    exit(list_baselines(location, as_json).await)
}

async fn list_baselines(location: &Location, as_json: bool) -> Result<Exit, Exit> {
    let store = open(location).await.map_err(store_failed)?;
    let entries = store.baselines().await.map_err(store_failed)?;
    let cases = store.case_baselines().await.map_err(store_failed)?;
    match (as_json, entries.is_empty() && cases.is_empty()) {
        (true, _) => json(&serde_json::json!({ "loads": entries, "load_cases": cases })),
        (false, true) => say("no baselines yet: `proctor baseline set [RUN]` takes one from a run\n"),
        (false, false) => {
            let loads = if entries.is_empty() { String::new() } else { entries_table(&entries) };
            say(&format!("{loads}{}", case_entries_table(&cases)));
        }
    }
    Ok(Exit::Passed)
}

/// `proctor baseline compare [RUN]`: exit 3 on a regression.
pub async fn compare(location: &Location, which: &str, tolerance: Tolerance, as_json: bool) -> Exit {
    exit(compare_run(location, which, tolerance, as_json).await)
}

async fn compare_run(location: &Location, which: &str, tolerance: Tolerance, as_json: bool) -> Result<Exit, Exit> {
    let store = open(location).await.map_err(store_failed)?;
    let (row, told) = told(&store, which, Path::new(".")).await?;
    let entries = store.baselines().await.map_err(store_failed)?;
    let rule = |key: &baseline::Key| baseline::tolerance_for(key, &told.report.suite_loads, &told.suites, tolerance);
    let mut comparison = baseline::compare(&entries, &told.report.loads, rule);
    let cases = store.case_baselines().await.map_err(store_failed)?;
    comparison.load_cases = baseline::cases::compare(&cases, &told.report.cases, |suite| {
        baseline::suite_tolerance(suite, &told.suites, tolerance)
    });
    if as_json {
        json(&comparison);
    } else if comparison.is_empty() {
        say(&format!("run {}: no model load that did the work, nothing to compare\n", row.id));
    } else {
        say(&format!("run {}{}", row.id, comparison.text()));
    }
    Ok(if comparison.regressions() > 0 { Exit::Regression } else { Exit::Passed })
}

/// `proctor trends`.
pub async fn show_trends(
    location: &Location,
    last: usize,
    model: Option<&str>,
    as_json: bool,
    html: Option<&PathBuf>,
) -> Exit {
    let store = match open(location).await {
        Ok(s) => s,
        Err(e) => return store_failed(e),
    };
    let (loads, cases) = match (store.loads(last, model).await, store.case_history(last).await) {
        (Ok(l), Ok(c)) => (trends::load_trends(&l), trends::case_trends(&c)),
        (Err(e), _) | (_, Err(e)) => return store_failed(e),
    };
    let load_cases = match store.load_results(last).await {
        Ok(rows) => trends::load_case_trends(&rows),
        Err(e) => return store_failed(e),
    };
    if let Some(path) = html
        && let Err(e) = std::fs::write(path, trends_html(&loads, &cases, last))
    {
        return fail(format!("cannot write {}: {e}", path.display()), Exit::Infrastructure);
    }
    if as_json {
        json(&serde_json::json!({ "loads": loads, "cases": cases, "load_cases": load_cases }));
    } else {
        say(&trends_text(&loads, &cases, last));
        say(&load_cases_text(&load_cases));
        if let Some(path) = html {
            say(&format!("HTML: {}\n", path.display()));
        }
    }
    Exit::Passed
}

/// Load cases' throughput and p99, one line each (nothing when none ran).
pub fn load_cases_text(trends: &[trends::LoadCaseTrend]) -> String {
    if trends.is_empty() {
        return String::new();
    }
    let key_w = trends.iter().map(|t| t.key.to_string().len()).max().unwrap_or(5);
    let mut out = String::from("\nLoad cases (oldest first):\n");
    for t in trends {
        let _ = writeln!(out, "  {:<key_w$}  {}", t.key.to_string(), t.line());
    }
    out
}

/// Load times with sparklines, then the flaky cases.
pub fn trends_text(loads: &[LoadTrend], cases: &[CaseTrend], last: usize) -> String {
    let mut out = format!("Model loads over the last {last} runs (oldest first):\n");
    if loads.is_empty() {
        out.push_str("  none kept yet\n");
    }
    let key_w = loads.iter().map(|t| t.key.to_string().len()).max().unwrap_or(5);
    for t in loads {
        let ms: Vec<i64> = t.loads.iter().map(|l| l.1).collect();
        let _ = writeln!(
            out,
            "  {:<key_w$}  {}  median {}, last {} ({} loads)",
            t.key.to_string(),
            trends::sparkline(&ms),
            baseline::seconds(t.median_ms),
            baseline::seconds(t.last_ms),
            ms.len()
        );
    }
    let flaky: Vec<&CaseTrend> = cases.iter().filter(|c| c.flaky()).collect();
    let _ = writeln!(
        out,
        "\nFlaky cases ({} of {} seen; P passed, F failed, E error, S skipped, oldest first):",
        flaky.len(),
        cases.len()
    );
    if flaky.is_empty() {
        out.push_str("  none\n");
    }
    for c in flaky {
        let _ = writeln!(
            out,
            "  {} / {}  {}  {} re-run{}, {} flip{} in {} runs ({:.0} %)",
            c.suite,
            c.name,
            c.outcomes,
            c.reruns,
            if c.reruns == 1 { "" } else { "s" },
            c.flips,
            if c.flips == 1 { "" } else { "s" },
            c.runs,
            c.flakiness() * 100.0
        );
    }
    out
}

/// A self-contained page: one line chart per model and host, and the flaky cases.
pub fn trends_html(loads: &[LoadTrend], cases: &[CaseTrend], last: usize) -> String {
    use crate::report::escape_markup as esc;
    let mut out = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Proctor trends</title><style>\
         body{{font-family:system-ui,sans-serif;margin:24px}}svg text{{font-size:11px}}\
         td,th{{border:1px solid #ddd;padding:4px 8px}}table{{border-collapse:collapse}}</style></head><body>\n\
         <h1>Proctor trends: the last {last} runs</h1>\n<h2>Model load time</h2>\n"
    );
    for t in loads {
        let _ = writeln!(out, "<h3>{}</h3>\n{}", esc(&t.key.to_string()), chart(t));
    }
    out.push_str("<h2>Flaky cases</h2>\n<table><tr><th>suite</th><th>case</th><th>outcomes</th><th>re-runs</th><th>flips</th><th>runs</th></tr>\n");
    for c in cases.iter().filter(|c| c.flaky()) {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.suite),
            esc(&c.name),
            esc(&c.outcomes),
            c.reruns,
            c.flips,
            c.runs
        );
    }
    out.push_str("</table>\n</body></html>\n");
    out
}

/// Load seconds per run as an SVG line with its points.
fn chart(t: &LoadTrend) -> String {
    let (w, h, m) = (640.0, 160.0, 40.0);
    let max = t.loads.iter().map(|l| l.1).max().unwrap_or(1).max(1) as f64;
    let n = t.loads.len().max(2) as f64 - 1.0;
    let points: Vec<(f64, f64)> = t
        .loads
        .iter()
        .enumerate()
        .map(|(i, l)| (m + i as f64 * (w - 2.0 * m) / n, h - m / 2.0 - l.1 as f64 / max * (h - m)))
        .collect();
    let line: Vec<String> = points.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let mut svg = format!(
        "<svg width=\"{w}\" height=\"{h}\" role=\"img\"><text x=\"2\" y=\"12\">{:.1}s</text>\
         <polyline fill=\"none\" stroke=\"#3182bd\" stroke-width=\"2\" points=\"{}\"/>",
        max / 1000.0,
        line.join(" ")
    );
    for ((x, y), (run, ms)) in points.iter().zip(&t.loads) {
        let _ = write!(
            svg,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"#3182bd\"><title>run {run}: {ms} ms</title></circle>"
        );
    }
    svg.push_str("</svg>");
    svg
}
