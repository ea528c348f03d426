//! The Markdown summary for CI (`summary.md`, and appended to
//! `$GITHUB_STEP_SUMMARY` when set): the verdict, one row per suite, each
//! case that did not pass with why, and each model load with its time, its
//! slowest stage and its peaks.

use std::fmt::Write as _;

use super::{CaseReport, ModelLoad, Outcome, RunReport, fmt_duration};

/// A table cell: one line, pipes escaped.
fn cell(text: &str) -> String {
    text.lines().next().unwrap_or_default().replace('|', "\\|")
}

fn mib(bytes: u64) -> String {
    if bytes == 0 { "–".into() } else { format!("{} MiB", bytes / (1024 * 1024)) }
}

/// The whole summary.
pub fn render(report: &RunReport) -> String {
    let super::Counts { passed, failed, errors } = report.counts();
    let verdict = report.verdict();
    let mut out = format!(
        "## Proctor run {}: {verdict}\n\n{} cases: {passed} passed, {failed} failed, {errors} errors, in {}.\n\n",
        report.run_id,
        report.cases.len(),
        fmt_duration(report.duration)
    );
    suites(&mut out, report);
    not_passed(&mut out, report);
    skipped(&mut out, report);
    loads(&mut out, &report.loads);
    if let Some(b) = report.baseline.as_ref().filter(|b| !b.is_empty()) {
        out.push_str(&b.markdown());
    }
    out
}

fn suites(out: &mut String, report: &RunReport) {
    out.push_str("| suite | hosts | passed | failed | errors |\n|---|---|---|---|---|\n");
    let mut names: Vec<&str> = Vec::new();
    for c in &report.cases {
        if !names.contains(&c.suite.as_str()) {
            names.push(&c.suite);
        }
    }
    for name in names {
        let cases: Vec<&CaseReport> = report.cases.iter().filter(|c| c.suite == name).collect();
        let mut hosts: Vec<&str> = cases.iter().map(|c| c.host.as_str()).filter(|h| !h.is_empty()).collect();
        hosts.sort_unstable();
        hosts.dedup();
        let n = |f: fn(&Outcome) -> bool| cases.iter().filter(|c| f(&c.outcome)).count();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            cell(name),
            cell(&hosts.join(", ")),
            n(|o| *o == Outcome::Passed),
            n(|o| matches!(o, Outcome::Failed(_))),
            n(|o| matches!(o, Outcome::Error(_)))
        );
    }
}

/// Each case that did not pass: its headline, and the whole story folded.
fn not_passed(out: &mut String, report: &RunReport) {
    let bad: Vec<&CaseReport> = report.cases.iter().filter(|c| c.outcome != Outcome::Passed).collect();
    if bad.is_empty() {
        return;
    }
    out.push_str("\n### Not passed\n\n");
    for c in bad {
        let _ = writeln!(out, "- **{} / {}**: {}", c.suite, c.name, cell(&c.headline()));
        if let Outcome::Error(message) = &c.outcome
            && message.lines().count() > 1
        {
            let _ = writeln!(out, "  <details><summary>details</summary>\n\n  ```\n{}\n  ```\n  </details>", message);
        }
        if c.load.is_some() && !c.excerpt.is_empty() {
            let (heading, excerpt) = (c.excerpt_heading(), &c.excerpt);
            let _ = writeln!(out, "  <details><summary>{heading}</summary>\n\n  ```\n{excerpt}\n  ```\n  </details>");
        }
    }
}

/// Tests a command reported skipped, each with its reason.
fn skipped(out: &mut String, report: &RunReport) {
    let lines: Vec<String> = report
        .cases
        .iter()
        .flat_map(|c| c.tests.iter().filter(|t| t.outcome == "skipped").map(move |t| (c, t)))
        .map(|(c, t)| format!("- **{} / {}** `{}`: {}", c.suite, c.name, t.id(), cell(&t.message)))
        .collect();
    if !lines.is_empty() {
        let _ = write!(out, "\n### Skipped inside commands\n\n{}\n", lines.join("\n"));
    }
}

fn loads(out: &mut String, loads: &[ModelLoad]) {
    if loads.is_empty() {
        return;
    }
    out.push_str("\n### Model loads\n\n| model | outcome | time | slowest stage | peak RSS | peak GPU |\n|---|---|---|---|---|---|\n");
    for l in loads {
        let outcome = match (&l.failure, l.reused) {
            (Some(f), _) => format!("FAILED: {}", cell(f)),
            (None, true) => "already loaded".into(),
            (None, false) => "READY".into(),
        };
        let slowest = l
            .stages
            .iter()
            .max_by_key(|s| s.duration)
            .map_or("–".to_owned(), |s| format!("{} {}", s.stage, fmt_duration(s.duration)));
        let _ = writeln!(
            out,
            "| {}/{}/{} | {outcome} | {} | {slowest} | {} | {} |",
            l.host,
            l.service,
            l.model,
            fmt_duration(l.waited),
            mib(l.peak_rss_bytes),
            mib(l.peak_gpu_bytes)
        );
    }
}
