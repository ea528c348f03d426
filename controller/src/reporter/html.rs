//! The HTML report: one self-contained file (inline CSS and SVG, no script,
//! nothing fetched) drawn from the same document as report.json — the run's
//! verdict; per host a memory chart (RSS, and GPU where known) over time with
//! each load's stages as coloured bands and the READY moment marked; a stage
//! waterfall per model load (reads like Jaeger, for people without one); and
//! every case, those that did not pass with their message and the service's
//! last words.

use std::fmt::Write as _;

use super::json::{Document, Load, Sample};

const WIDTH: f64 = 960.0;
const CHART_HEIGHT: f64 = 220.0;
const MARGIN: f64 = 56.0;

/// Fill colour of a stage band and bar.
fn colour(stage: &str) -> &'static str {
    match stage {
        "PROCESS_STARTING" => "#9ecae1",
        "WAITING_FOR_HTTP" => "#c6dbef",
        "AUTHENTICATING" => "#dadaeb",
        "DOWNLOADING" => "#fdae6b",
        "LOADING_WEIGHTS" => "#fd8d3c",
        "WARMING_UP" => "#a1d99b",
        "READY" => "#31a354",
        "FAILED" => "#de2d26",
        _ => "#d9d9d9",
    }
}

use crate::report::escape_markup as esc;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The whole page.
pub fn render(doc: &Document<'_>) -> String {
    let regressions = doc.baseline.map_or(0, |b| b.regressions());
    let verdict = crate::report::verdict(doc.totals.failed, doc.totals.errors, doc.interrupted, regressions);
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Proctor run {id}: {verdict}</title>\
         <style>{STYLE}</style></head><body>\n<h1>Proctor run <code>{id}</code>: <span class=\"verdict {v}\">{verdict}</span></h1>\n\
         <p class=\"totals\">{} cases: {} passed, {} failed, {} errors, in {:.1}s.</p>\n",
        doc.totals.cases,
        doc.totals.passed,
        doc.totals.failed,
        doc.totals.errors,
        doc.duration_ms as f64 / 1000.0,
        id = esc(doc.run_id),
        v = verdict.to_lowercase(),
    );
    if doc.partial {
        out.push_str(
            "<p class=\"partial\">Partial run: its controller stopped before the end. What it had received is \
             shown; cases without a result are errors.</p>\n",
        );
    }
    legend(&mut out);
    for host in &doc.hosts {
        memory_chart(&mut out, host.name, doc.loads, doc.memory);
    }
    out.push_str("<h2>Model loads</h2>\n");
    for load in doc.loads.iter().filter(|l| !l.stages.is_empty()) {
        waterfall(&mut out, load);
    }
    if let Some(b) = doc.baseline.filter(|b| !b.is_empty()) {
        baseline(&mut out, b);
    }
    cases(&mut out, doc);
    out.push_str("</body></html>\n");
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:24px;color:#222}code{font-size:90%}\
    .verdict.passed{color:#31a354}.verdict.failed,.verdict.errors{color:#de2d26}.verdict.interrupted{color:#e6550d}\
    table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}\
    tr.failed td,tr.error td,tr.regressed td{background:#fff5f0}tr.skipped td{background:#fffbe6}tr.test td.case-name{padding-left:24px}tr.improved td{background:#f0fff0}\
    .verdict.regressed{color:#de2d26}table.cases{max-width:960px}\
    pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:4px 0;font-size:85%}\
    .legend span{display:inline-block;padding:2px 8px;margin:2px;border-radius:3px;font-size:85%}\
    svg text{font-size:11px;fill:#333}";

/// The loads against their baselines: old, new, change, verdict.
fn baseline(out: &mut String, b: &crate::store::baseline::Comparison) {
    use crate::store::baseline::{seconds, verdict_text};
    out.push_str(
        "<h2>Baseline</h2>\n<table class=\"baseline\"><tr><th>model</th><th>stage</th><th>baseline</th>\
                  <th>now</th><th>change</th><th></th></tr>\n",
    );
    for c in b.shown() {
        let class = c.verdict.name();
        let _ = writeln!(
            out,
            "<tr class=\"{class}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.key.to_string()),
            esc(&c.stage),
            seconds(c.old_ms),
            seconds(c.new_ms),
            esc(&c.change_text()),
            esc(&verdict_text(c))
        );
    }
    for c in &b.load_cases {
        let [metric, old, now, change, verdict] = crate::store::baseline::cases::cells(c).map(|cell| esc(&cell));
        let _ = writeln!(
            out,
            "<tr class=\"{}\"><td>load case {}</td><td>{metric}</td><td>{old}</td><td>{now}</td><td>{change}</td><td>{verdict}</td></tr>",
            c.verdict.name(),
            esc(&c.key.to_string()),
        );
    }
    out.push_str("</table>\n");
    for k in &b.without_baseline {
        let _ = writeln!(out, "<p>{}: no baseline yet.</p>", esc(&k.to_string()));
    }
}

fn legend(out: &mut String) {
    out.push_str("<p class=\"legend\">");
    for stage in
        ["PROCESS_STARTING", "WAITING_FOR_HTTP", "AUTHENTICATING", "DOWNLOADING", "LOADING_WEIGHTS", "WARMING_UP"]
    {
        let _ = write!(out, "<span style=\"background:{}\">{stage}</span>", colour(stage));
    }
    out.push_str("<span style=\"border:2px solid #31a354\">READY</span><span style=\"border:2px solid #de2d26\">FAILED</span></p>\n");
}

/// A linear scale from `domain` onto `range`.
fn scale(domain: (f64, f64), range: (f64, f64)) -> impl Fn(f64) -> f64 {
    move |v| {
        let span = (domain.1 - domain.0).max(1.0);
        range.0 + (v - domain.0) / span * (range.1 - range.0)
    }
}

/// One host: its services' memory over time, its loads' stages behind.
fn memory_chart(out: &mut String, host: &str, loads: &[Load], memory: &[Sample]) {
    let samples: Vec<&Sample> = memory.iter().filter(|s| s.host == host).collect();
    let loads: Vec<&Load> = loads.iter().filter(|l| l.host == host && !l.stages.is_empty()).collect();
    let times = samples
        .iter()
        .map(|s| s.at_unix_ms)
        .chain(loads.iter().flat_map(|l| l.stages.iter().flat_map(|s| [s.start_unix_ms, s.end_unix_ms])));
    let (t0, t1) = times.fold((i64::MAX, i64::MIN), |(a, b), t| (a.min(t), b.max(t)));
    let _ = writeln!(out, "<h2>Host {}</h2>", esc(host));
    if t0 > t1 {
        out.push_str("<p>No memory samples or loads were seen on this host.</p>\n");
        return;
    }
    let top = samples.iter().map(|s| mib(s.rss_bytes).max(mib(s.gpu_bytes))).fold(1.0, f64::max) * 1.1;
    let x = scale((t0 as f64, t1 as f64), (MARGIN, WIDTH - 8.0));
    let y = scale((0.0, top), (CHART_HEIGHT - 24.0, 8.0));
    let _ = writeln!(
        out,
        "<svg class=\"memory-chart\" data-host=\"{}\" width=\"{WIDTH}\" height=\"{CHART_HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {CHART_HEIGHT}\" role=\"img\" aria-label=\"memory of {} over time\">",
        esc(host),
        esc(host)
    );
    // Each load in its own lane, so loads side by side do not blend.
    let lane = (CHART_HEIGHT - 32.0) / loads.len().max(1) as f64;
    for (k, load) in loads.iter().enumerate() {
        for s in &load.stages {
            let (a, b) = (x(s.start_unix_ms as f64), x(s.end_unix_ms as f64));
            let _ = writeln!(
                out,
                "<rect class=\"stage-band\" data-stage=\"{st}\" x=\"{a:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" \
                 fill=\"{}\" opacity=\"0.45\"><title>{} {st} {:.1}s</title></rect>",
                8.0 + lane * k as f64,
                (b - a).max(1.0),
                lane,
                colour(s.stage),
                esc(&load.model),
                (s.end_unix_ms - s.start_unix_ms) as f64 / 1000.0,
                st = s.stage
            );
        }
        let end = load.stages.last().map_or(0, |s| s.end_unix_ms) as f64;
        let (mark, class) =
            if load.outcome == "failed" { ("#de2d26", "failed-mark") } else { ("#31a354", "ready-mark") };
        let word = if load.outcome == "failed" { "FAILED" } else { "READY" };
        let _ = writeln!(
            out,
            "<line class=\"{class}\" x1=\"{e:.1}\" x2=\"{e:.1}\" y1=\"8\" y2=\"{:.1}\" stroke=\"{mark}\" stroke-width=\"2\"/>\
             <text x=\"{:.1}\" y=\"20\">{word} {}</text>",
            CHART_HEIGHT - 24.0,
            x(end) + 3.0,
            esc(&load.model),
            e = x(end)
        );
    }
    lines(out, &samples, &x, &y);
    axes(out, top, &y, (t1 - t0) as f64 / 1000.0);
    out.push_str("</svg>\n");
}

/// RSS (solid) and GPU memory (dashed) per service.
fn lines(out: &mut String, samples: &[&Sample], x: &impl Fn(f64) -> f64, y: &impl Fn(f64) -> f64) {
    let mut services: Vec<&str> = samples.iter().map(|s| s.service.as_str()).collect();
    services.sort_unstable();
    services.dedup();
    for service in services {
        let mine: Vec<&&Sample> = samples.iter().filter(|s| s.service == service).collect();
        let path = |f: fn(&Sample) -> u64| -> String {
            mine.iter()
                .map(|s| format!("{:.1},{:.1}", x(s.at_unix_ms as f64), y(mib(f(s)))))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            out,
            "<polyline class=\"rss-line\" data-service=\"{}\" points=\"{}\" fill=\"none\" stroke=\"#3182bd\" stroke-width=\"2\"><title>{} RSS</title></polyline>",
            esc(service),
            path(|s| s.rss_bytes),
            esc(service)
        );
        if mine.iter().any(|s| s.gpu_bytes > 0) {
            let _ = writeln!(
                out,
                "<polyline class=\"gpu-line\" points=\"{}\" fill=\"none\" stroke=\"#756bb1\" stroke-width=\"2\" stroke-dasharray=\"5,3\"><title>{} GPU memory</title></polyline>",
                path(|s| s.gpu_bytes),
                esc(service)
            );
        }
    }
}

fn axes(out: &mut String, top: f64, y: &impl Fn(f64) -> f64, seconds: f64) {
    let base = CHART_HEIGHT - 24.0;
    let _ = writeln!(
        out,
        "<line x1=\"{MARGIN}\" x2=\"{MARGIN}\" y1=\"8\" y2=\"{base}\" stroke=\"#999\"/>\
         <line x1=\"{MARGIN}\" x2=\"{:.1}\" y1=\"{base}\" y2=\"{base}\" stroke=\"#999\"/>\
         <text x=\"4\" y=\"{:.1}\">{:.0} MiB</text><text x=\"4\" y=\"{base}\">0</text>\
         <text x=\"{MARGIN}\" y=\"{:.1}\">0 s</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{seconds:.1} s</text>",
        WIDTH - 8.0,
        y(top / 1.1) + 4.0,
        top / 1.1,
        CHART_HEIGHT - 6.0,
        WIDTH - 8.0,
        CHART_HEIGHT - 6.0
    );
}

/// One load's stages as bars on a shared time axis, like a trace view.
fn waterfall(out: &mut String, load: &Load) {
    let start = load.stages.first().map_or(0, |s| s.start_unix_ms);
    let end = load.stages.last().map_or(start, |s| s.end_unix_ms);
    let row = 22.0;
    let height = row * load.stages.len() as f64 + 8.0;
    let x = scale((start as f64, end as f64), (200.0, WIDTH - 80.0));
    let _ = write!(
        out,
        "<h3>{}/{}/{} — {} in {:.1}s</h3>\n<svg class=\"waterfall\" data-model=\"{}\" width=\"{WIDTH}\" height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\">\n",
        esc(&load.host),
        esc(&load.service),
        esc(&load.model),
        load.outcome,
        (end - start) as f64 / 1000.0,
        esc(&load.model)
    );
    for (i, s) in load.stages.iter().enumerate() {
        let top = 4.0 + row * i as f64;
        let (a, b) = (x(s.start_unix_ms as f64), x(s.end_unix_ms as f64));
        let _ = writeln!(
            out,
            "<text x=\"4\" y=\"{:.1}\">{}</text><rect class=\"stage-bar\" x=\"{a:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{}</title></rect>\
             <text x=\"{:.1}\" y=\"{:.1}\">{:.2}s</text>",
            top + 14.0,
            s.stage,
            (b - a).max(1.0),
            row - 6.0,
            colour(s.stage),
            esc(&s.cause),
            b + 4.0,
            top + 14.0,
            (s.end_unix_ms - s.start_unix_ms) as f64 / 1000.0
        );
    }
    out.push_str("</svg>\n");
}

/// Every case; those that did not pass with their whole message.
fn cases(out: &mut String, doc: &Document<'_>) {
    out.push_str("<h2>Cases</h2>\n<table class=\"cases\"><tr><th>suite</th><th>case</th><th>outcome</th><th>host</th><th>time</th></tr>\n");
    for c in &doc.cases {
        let detail = match (c.outcome, c.message) {
            (_, Some(m)) => format!("<pre>{}</pre>", esc(m)),
            ("failed", None) => {
                let lines: Vec<String> = c
                    .failures
                    .iter()
                    .map(|f| format!("{} at {}: expected {}, got {}", f.check, f.pointer, f.expected, f.actual))
                    .collect();
                let heading = crate::report::excerpt_heading(c.http_status, c.url, c.load.is_some());
                match c.response_excerpt.is_empty() {
                    true => format!("<pre>{}</pre>", esc(&lines.join("\n"))),
                    false => format!("<pre>{}\n{heading}: {}</pre>", esc(&lines.join("\n")), esc(c.response_excerpt)),
                }
            }
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "<tr class=\"{o}\"><td>{}</td><td class=\"case-name\">{}</td><td>{o}{detail}</td><td>{}</td><td>{} ms</td></tr>",
            esc(c.suite),
            esc(c.name),
            esc(c.host),
            c.duration_ms,
            o = c.outcome
        );
        if let Some(l) = c.load {
            let _ = writeln!(
                out,
                "<tr class=\"{o} load\"><td></td><td colspan=\"4\"><pre>load ({}): {}\nthresholds: {}</pre></td></tr>",
                esc(&l.mode),
                esc(&l.line()),
                esc(&l.thresholds_line()),
                o = c.outcome
            );
        }
        for t in c.tests {
            let message = if t.message.is_empty() { String::new() } else { format!("<pre>{}</pre>", esc(&t.message)) };
            let _ = writeln!(
                out,
                "<tr class=\"{o} test\"><td>{}</td><td class=\"case-name\">{} :: {}</td><td>{o}{message}</td><td>{}</td><td>{} ms</td></tr>",
                esc(c.suite),
                esc(c.name),
                esc(&t.id()),
                esc(c.host),
                t.duration_ms,
                o = esc(&t.outcome)
            );
        }
    }
    out.push_str("</table>\n");
}
