//! The HTML report as a person sees it: rendered by headless Chromium
//! (Debian `chromium`, installed by .ci/run), with no console error, its
//! charts and every case there; a screenshot is kept for CI.

use std::path::{Path, PathBuf};
use std::process::Output;

use controller::RunOptions;
use testkit::{Agent, Scratch, Service};
use tokio_util::sync::CancellationToken;

use crate::BIN;
use crate::run::TRANSLATE_SUITE;

/// Headless Chromium on `page` with `args`; its console lines are in stderr.
fn chromium(page: &Path, args: &[&str]) -> Output {
    std::process::Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"])
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium (Debian package) renders the HTML report; .ci/run installs it")
}

/// What the page said on its console (Chromium logs it as `INFO:CONSOLE:<line>]`).
fn console(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr).lines().filter(|l| l.contains(":CONSOLE")).map(str::to_owned).collect()
}

/// Where the screenshot is kept (`target/tmp/`, a CI artifact).
fn screenshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("proctor-report.png")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_html_report_renders_in_chromium_with_its_charts_and_every_case() {
    let agent = Agent::spawn(BIN, &Service::sim(&["nllb:mb=16,download=300ms,load=1500ms,warmup=300ms"])).await;
    let out = Scratch::new("html");
    let failing =
        TRANSLATE_SUITE.replace("name: translate", "name: wrong").replace("equals: hola mundo", "equals: bonjour");
    let suites = vec![out.write("t.yaml", TRANSLATE_SUITE), out.write("w.yaml", &failing)];
    let result =
        controller::run(RunOptions::new(vec![agent.addr.clone()], suites, out.path.clone()), CancellationToken::new())
            .await;
    let report = result.report.unwrap();
    let page = result.files.html.expect("report.html written");

    // The control: the console check sees a page's console errors.
    let noisy = out.write("noisy.html", "<html><body><script>console.error('boom')</script></body></html>");
    assert!(!console(&chromium(&noisy, &["--dump-dom"])).is_empty(), "a console error goes unseen");

    let rendered = chromium(&page, &["--dump-dom"]);
    assert!(rendered.status.success(), "{rendered:?}");
    assert_eq!(console(&rendered), Vec::<String>::new(), "the report logs nothing to the console");
    let dom = String::from_utf8_lossy(&rendered.stdout);
    assert_eq!(dom.matches("class=\"memory-chart\"").count(), 1, "one chart per host");
    assert!(dom.contains("class=\"rss-line\""), "the memory line is drawn");
    assert!(dom.contains("class=\"stage-band\" data-stage=\"LOADING_WEIGHTS\""), "the loading stages are bands");
    assert!(dom.contains("class=\"ready-mark\""), "the READY moment is marked");
    assert!(dom.contains("class=\"waterfall\" data-model=\"nllb\""), "the stage waterfall");
    for case in &report.cases {
        assert!(dom.contains(&format!("<td class=\"case-name\">{}</td>", case.name)), "case {:?} missing", case.name);
    }
    assert!(dom.contains("expected \"bonjour\", got \"hola mundo\""), "the failing case says why");
    assert!(!dom.contains("http://") || !dom.contains("<link"), "nothing is fetched");

    let shot = screenshot_path();
    let _ = std::fs::remove_file(&shot);
    let taken = chromium(&page, &["--window-size=1100,1600", &format!("--screenshot={}", shot.display())]);
    assert!(taken.status.success(), "{taken:?}");
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "a real screenshot: {} bytes", png.len());
}

/// The golden JUnit files (`controller/fixtures/reports/`: a passing run, a
/// failed load, a re-run) are schema-valid too.
#[test]
fn the_golden_junit_files_are_schema_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../controller/fixtures/reports");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with(".junit.xml") {
            crate::read_junit(&path);
            checked += 1;
        }
    }
    assert_eq!(checked, 3, "passing, failed-load and rerun in {}", dir.display());
}
