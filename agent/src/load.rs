//! Load cases: the engine that sends a suite's requests to the service at a
//! fixed concurrency (closed loop) or a fixed rate (open loop), measures
//! every request into an HDR histogram and judges the thresholds.
//!
//! The engine runs on its own threads (one current-thread runtime each, as
//! many as there are cores, connections spread over them) so a load test
//! neither slows the agent's gRPC service nor is slowed by it. Each thread
//! keeps its own histogram and error counts; they are merged for progress
//! (once a second) and at the end. In open loop every latency is measured
//! from when the request was due, so a stall shows in the percentiles.

pub mod verdict;
pub mod wire;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use proto::{CaseOutcome, CaseResult, LoadResult};
use tokio_util::sync::CancellationToken;

pub use proto::load_limits::{DEFAULT_CONNECTIONS, MAX_CONNECTIONS, MAX_DURATION, MAX_RATE, MIN_RATE};
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A load case bounded only by its request count stops here at the latest.
const COUNT_ONLY_DEADLINE: Duration = Duration::from_secs(600);
/// How long a connection that could not connect waits before trying again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Highest latency the histograms hold (longer ones are counted as this).
const HIGHEST_US: u64 = 3_600_000_000;

/// A load case, checked and ready to run.
#[derive(Debug)]
pub struct Plan {
    /// The service's addresses, tried in turn when a connection opens.
    pub addrs: Vec<SocketAddr>,
    pub requests: Vec<wire::Prepared>,
    pub connections: u32,
    /// Requests per second in open loop; 0 in closed loop.
    pub rate: f64,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub warmup: Duration,
    /// 0: any 2xx.
    pub status: u16,
    pub check_every: u32,
    pub request_timeout: Duration,
    pub assertions: Vec<proto::Assertion>,
    /// From the start, when the engine stops whatever is left.
    pub deadline: Duration,
}

impl Plan {
    /// Checks a load case against the service's base URL: the requests must
    /// stay on the service (as HTTP cases'), the numbers within the limits.
    pub fn new(case: &proto::Case, load: &proto::LoadCase, base_url: &str) -> Result<Plan, String> {
        let url = reqwest::Url::parse(base_url).map_err(|e| format!("service URL {base_url:?}: {e}"))?;
        if url.scheme() != "http" {
            return Err(format!("load cases speak plain HTTP/1.1; service URL {base_url} is not http://"));
        }
        let port = url.port_or_known_default().unwrap_or(80);
        let addrs = url.socket_addrs(|| None).unwrap_or_default();
        if addrs.is_empty() {
            return Err(format!("cannot resolve the service's address {base_url}"));
        }
        let host_header = format!("{}:{port}", url.host_str().unwrap_or_default());
        let requests = prepare_requests(load, base_url, &host_header)?;
        check_numbers(load)?;
        let duration = (load.duration_ms > 0).then(|| Duration::from_millis(load.duration_ms));
        let warmup = Duration::from_millis(load.warmup_ms);
        let request_timeout = match load.request_timeout_ms {
            0 => DEFAULT_REQUEST_TIMEOUT,
            ms => Duration::from_millis(ms),
        };
        let natural = duration.map_or(COUNT_ONLY_DEADLINE, |d| warmup + d + request_timeout + Duration::from_secs(5));
        let deadline = match case.timeout_ms {
            0 => natural,
            ms => Duration::from_millis(ms),
        };
        Ok(Plan {
            addrs,
            requests,
            connections: if load.connections == 0 { DEFAULT_CONNECTIONS } else { load.connections },
            rate: load.rate_per_s,
            duration,
            count: (load.request_count > 0).then_some(load.request_count),
            warmup,
            status: u16::try_from(load.status).unwrap_or(0),
            check_every: load.check_every.max(1),
            request_timeout,
            assertions: case.assertions.clone(),
            deadline,
        })
    }

    /// `closed loop, 16 connections` / `open loop, 500/s over 16 connections`.
    pub fn mode(&self) -> String {
        let conns = match self.connections {
            1 => "1 connection".to_owned(),
            n => format!("{n} connections"),
        };
        match self.rate > 0.0 {
            true => format!("open loop, {}/s over {conns}", self.rate),
            false => format!("closed loop, {conns}"),
        }
    }
}

fn prepare_requests(load: &proto::LoadCase, base_url: &str, host: &str) -> Result<Vec<wire::Prepared>, String> {
    if load.requests.is_empty() {
        return Err("a load case needs at least one request".into());
    }
    let mut out = Vec::with_capacity(load.requests.len());
    for r in &load.requests {
        crate::cases::check_headers(&r.headers)?;
        let url = crate::cases::case_url(base_url, &r.path)?;
        let target = reqwest::Url::parse(&url).map_err(|e| format!("case path {:?}: {e}", r.path))?;
        let path = match target.query() {
            Some(q) => format!("{}?{q}", target.path()),
            None => target.path().to_owned(),
        };
        let method = r.method.to_uppercase();
        if !method.bytes().all(|b| b.is_ascii_alphabetic()) || method.is_empty() {
            return Err(format!("invalid HTTP method {:?}", r.method));
        }
        let mut headers: Vec<(String, String)> = r.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        headers.sort();
        out.push(wire::prepare(&method, host, &path, &headers, &r.body));
    }
    Ok(out)
}

/// Checks a load case before any case of its call runs: its numbers and its
/// requests' paths and headers (the service's address is looked up later).
pub fn check(load: &proto::LoadCase) -> Result<(), String> {
    check_numbers(load)?;
    prepare_requests(load, "http://127.0.0.1:1", "127.0.0.1:1").map(|_| ())
}

fn check_numbers(load: &proto::LoadCase) -> Result<(), String> {
    if load.connections > MAX_CONNECTIONS {
        return Err(format!("a load case opens at most {MAX_CONNECTIONS} connections, not {}", load.connections));
    }
    let rate = load.rate_per_s;
    if rate != 0.0 && !(MIN_RATE..=MAX_RATE).contains(&rate) {
        return Err(format!(
            "a load case's rate is between {MIN_RATE} and {MAX_RATE}/s (or none: closed loop), not {rate}"
        ));
    }
    if Duration::from_millis(load.request_timeout_ms) > MAX_DURATION {
        return Err(format!("a load case's request_timeout is at most {}s", MAX_DURATION.as_secs()));
    }
    if load.duration_ms == 0 && load.request_count == 0 {
        return Err("a load case needs a duration or a request count".into());
    }
    if Duration::from_millis(load.duration_ms.saturating_add(load.warmup_ms)) > MAX_DURATION {
        return Err(format!("a load case runs at most {}s including its warm-up", MAX_DURATION.as_secs()));
    }
    Ok(())
}

/// The figures so far, for progress.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub elapsed: Duration,
    pub warming_up: bool,
    pub requests: u64,
    pub errors: u64,
    /// Measured requests per second over the last interval.
    pub rps: f64,
    pub p99_us: u64,
}

/// What one engine thread measured.
struct Tally {
    latency: Histogram<u64>,
    /// Measured requests, their errors, warm-up requests, checked responses.
    requests: u64,
    errors_total: u64,
    warmup: u64,
    checked: u64,
    errors: BTreeMap<String, u64>,
    /// The first message of each error kind (what a person needs to see).
    first: BTreeMap<String, String>,
    finished: Option<Instant>,
}

impl Tally {
    fn new() -> Tally {
        let latency = Histogram::new_with_bounds(1, HIGHEST_US, 3).expect("valid histogram bounds");
        Tally {
            latency,
            requests: 0,
            errors_total: 0,
            warmup: 0,
            checked: 0,
            errors: BTreeMap::new(),
            first: BTreeMap::new(),
            finished: None,
        }
    }
}

/// State every connection of a run reads; each piece has one writer kind.
struct Shared {
    plan: Plan,
    start: Instant,
    warm_end: Instant,
    end: Option<Instant>,
    hard_end: Instant,
    /// Fires on cancel (lease ended, shutdown) and at the deadline: reaches
    /// connections asleep until their next request and requests in flight.
    stop: CancellationToken,
    tickets: AtomicU64,
    /// One per engine thread: only its connections and the progress
    /// watcher (once a second) take its lock, so it is never contended.
    tallies: Vec<Mutex<Tally>>,
}

impl Shared {
    fn tally(&self, worker: usize) -> std::sync::MutexGuard<'_, Tally> {
        self.tallies[worker].lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a request due at `due` must not go: the run is stopped, or
    /// it (or, for a connection behind schedule, now) is past the end.
    fn over(&self, due: Instant) -> bool {
        let now = Instant::now();
        self.stop.is_cancelled()
            || self.end.is_some_and(|e| due >= e || now >= e)
            || due >= self.hard_end
            || now >= self.hard_end
    }

    /// A measured request may go (the request count is not used up yet).
    fn ticket(&self) -> bool {
        self.plan.count.is_none_or(|n| self.tickets.fetch_add(1, Ordering::Relaxed) < n)
    }
}

/// What the engine measured, and why it stopped early if it did.
#[derive(Debug)]
pub struct Measured {
    pub result: LoadResult,
    /// The first message of each error kind.
    pub first_errors: BTreeMap<String, String>,
    /// The run's deadline passed before its duration or count was done.
    pub hit_deadline: bool,
}

/// Runs a plan to its end (duration, count, deadline) or until `cancel`,
/// calling `progress` about once a second. Blocks: call it on a blocking
/// thread.
pub fn run(plan: Plan, cancel: &CancellationToken, mut progress: impl FnMut(Snapshot)) -> Measured {
    let threads = std::thread::available_parallelism().map_or(1, usize::from).min(plan.connections.max(1) as usize);
    let start = Instant::now();
    let warm_end = start + plan.warmup;
    let shared = Arc::new(Shared {
        end: plan.duration.map(|d| warm_end + d),
        hard_end: start + plan.deadline,
        plan,
        start,
        warm_end,
        stop: CancellationToken::new(),
        tickets: AtomicU64::new(0),
        tallies: (0..threads).map(|_| Mutex::new(Tally::new())).collect(),
    });
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let mut handles = Vec::with_capacity(threads);
    for w in 0..threads {
        let (s, done) = (shared.clone(), done_tx.clone());
        let spawned = std::thread::Builder::new().name(format!("proctor-load-{w}")).spawn(move || {
            worker(&s, w, threads);
            s.tally(w).finished = Some(Instant::now());
            let _ = done.send(());
        });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => tracing::error!("load engine: cannot start thread {w}: {e}"),
        }
    }
    drop(done_tx);
    watch(&shared, handles.len(), &done_rx, cancel, &mut progress);
    for h in handles {
        let _ = h.join();
    }
    finish(&shared, cancel.is_cancelled())
}

/// Waits for the engine threads, giving progress and passing on a cancel.
fn watch(
    s: &Shared,
    mut running: usize,
    done: &std::sync::mpsc::Receiver<()>,
    cancel: &CancellationToken,
    progress: &mut impl FnMut(Snapshot),
) {
    let mut next = Instant::now() + PROGRESS_EVERY;
    let mut last = (Instant::now(), 0u64);
    while running > 0 {
        let wait = next.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
        match done.recv_timeout(wait) {
            Ok(()) => running -= 1,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        if cancel.is_cancelled() || now >= s.hard_end {
            s.stop.cancel();
        }
        if now >= next && running > 0 {
            let (requests, errors) = (0..s.tallies.len()).fold((0, 0), |(r, e), w| {
                let t = s.tally(w);
                (r + t.requests, e + t.errors_total)
            });
            let rps = (requests - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3);
            last = (now, requests);
            let p99_us = merged(s).value_at_quantile(0.99);
            progress(Snapshot {
                elapsed: now.duration_since(s.start),
                warming_up: now < s.warm_end,
                requests,
                errors,
                rps,
                p99_us,
            });
            next = now + PROGRESS_EVERY;
        }
    }
}

fn merged(s: &Shared) -> Histogram<u64> {
    let mut all = Tally::new().latency;
    for w in 0..s.tallies.len() {
        let _ = all.add(&s.tally(w).latency);
    }
    all
}

/// The run's figures from every thread's tally (`cancelled`: stopped from
/// outside, not by its own end or deadline).
fn finish(s: &Shared, cancelled: bool) -> Measured {
    let latency = merged(s);
    let mut errors_by_kind = BTreeMap::new();
    let mut first_errors = BTreeMap::new();
    let mut finished = s.warm_end;
    let (mut requests, mut errors, mut warmup, mut checked) = (0, 0, 0, 0);
    for w in 0..s.tallies.len() {
        let t = s.tally(w);
        requests += t.requests;
        errors += t.errors_total;
        warmup += t.warmup;
        checked += t.checked;
        for (k, n) in &t.errors {
            *errors_by_kind.entry(k.clone()).or_insert(0) += n;
        }
        for (k, m) in &t.first {
            first_errors.entry(k.clone()).or_insert_with(|| m.clone());
        }
        finished = finished.max(t.finished.unwrap_or(finished));
    }
    // A run that went to its end was measured over its whole duration, even
    // when its last request went before it (a slow open loop).
    let counted_out = s.plan.count.is_some_and(|n| requests >= n);
    if let Some(end) = s.end.filter(|_| !cancelled && !counted_out) {
        finished = finished.max(end.min(s.hard_end));
    }
    let measured = finished.saturating_duration_since(s.warm_end);
    let q = |x: f64| if latency.is_empty() { 0 } else { latency.value_at_quantile(x) };
    let result = LoadResult {
        mode: s.plan.mode(),
        requests,
        errors,
        errors_by_kind: errors_by_kind.into_iter().collect(),
        measured_us: measured.as_micros() as u64,
        rps: if measured.is_zero() { 0.0 } else { requests as f64 / measured.as_secs_f64() },
        p50_us: q(0.5),
        p90_us: q(0.9),
        p95_us: q(0.95),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: latency.max(),
        mean_us: latency.mean() as u64,
        min_us: latency.min(),
        checked,
        warmup_requests: warmup,
        thresholds: Vec::new(),
    };
    let short_of_count = s.plan.count.is_some_and(|n| requests < n) && s.plan.duration.is_none_or(|d| measured < d);
    let hit_deadline = finished >= s.hard_end || short_of_count && !cancelled;
    Measured { result, first_errors, hit_deadline }
}

/// One engine thread: its share of the connections on a current-thread runtime.
fn worker(s: &Arc<Shared>, w: usize, threads: usize) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("load engine: no runtime for thread {w}: {e}");
            return;
        }
    };
    runtime.block_on(async {
        let mut conns = tokio::task::JoinSet::new();
        for c in (w..s.plan.connections as usize).step_by(threads) {
            let s = s.clone();
            conns.spawn(async move { connection(&s, w, c).await });
        }
        while conns.join_next().await.is_some() {}
    });
}

/// How one request ended.
enum Ended {
    Answered,
    /// `answered`: a response came (or the request timed out), so the
    /// request has a latency.
    Failed {
        kind: String,
        message: String,
        answered: bool,
    },
}

fn failed(kind: impl Into<String>, message: String, answered: bool) -> Ended {
    Ended::Failed { kind: kind.into(), message, answered }
}

/// One connection of the run and what only it touches.
struct Link<'s> {
    s: &'s Shared,
    /// Its engine thread (whose tally it writes).
    w: usize,
    conn: Option<wire::Conn>,
    /// Responses it had, for sampling the JSON checks.
    answered: u64,
}

/// One connection's loop: send, read, measure, until the run ends.
async fn connection(s: &Shared, w: usize, c: usize) {
    let conns = s.plan.connections as usize;
    let interval =
        (s.plan.rate > 0.0).then(|| Duration::try_from_secs_f64(conns as f64 / s.plan.rate).unwrap_or(MAX_DURATION));
    let offset = interval.map_or(Duration::ZERO, |i| i.mul_f64(c as f64 / conns as f64));
    let mut link = Link { s, w, conn: None, answered: 0 };
    // One timer for every request's limit, reset each time (not one per request).
    let mut limit = std::pin::pin!(tokio::time::sleep(s.plan.request_timeout));
    let mut turn: u64 = 0;
    loop {
        let due = match interval {
            Some(i) => s.start + offset + i.mul_f64(turn as f64),
            None => Instant::now(),
        };
        if s.over(due) {
            break;
        }
        // Waiting for its time: the timer's own lateness (up to a
        // millisecond) is the engine's, not the service's, so the latency
        // counts from the send. A connection already late because the last
        // answer was slow counts from when the request was due.
        let from = if due > Instant::now() {
            tokio::select! {
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(due)) => {}
                () = s.stop.cancelled() => break,
            }
            Instant::now()
        } else {
            due
        };
        if s.over(due) {
            break;
        }
        let measured = due >= s.warm_end;
        if measured && !s.ticket() {
            break;
        }
        let request = &s.plan.requests[(c + turn as usize * conns) % s.plan.requests.len()];
        turn += 1;
        limit.as_mut().reset(tokio::time::Instant::now() + s.plan.request_timeout);
        let ended = tokio::select! {
            biased;
            ended = link.exchange(request) => ended,
            () = limit.as_mut() => {
                link.conn = None;
                failed("timeout", format!("no answer within {}ms", s.plan.request_timeout.as_millis()), true)
            }
            // Stopped mid-request: not measured, the service is not ours any more.
            () = s.stop.cancelled() => break,
        };
        if let Ended::Failed { answered: false, .. } = ended {
            link.conn = None;
        }
        let latency = from.elapsed();
        if !measured {
            s.tally(w).warmup += 1;
            continue;
        }
        record(s, w, latency, ended);
    }
}

fn record(s: &Shared, w: usize, latency: Duration, ended: Ended) {
    let mut t = s.tally(w);
    t.requests += 1;
    // A request that got no answer because the connection failed has no latency.
    if !matches!(&ended, Ended::Failed { answered: false, .. }) {
        let _ = t.latency.record((latency.as_micros() as u64).clamp(1, HIGHEST_US));
    }
    if let Ended::Failed { kind, message, .. } = ended {
        t.errors_total += 1;
        *t.errors.entry(kind.clone()).or_insert(0) += 1;
        t.first.entry(kind).or_insert(message);
    }
}

impl Link<'_> {
    /// Sends one request on the connection (opening one if needed) and
    /// judges the response. A kept-alive connection the service closed
    /// while it sat idle is opened again and the request sent once more:
    /// that is not the service failing the request.
    async fn exchange(&mut self, request: &wire::Prepared) -> Ended {
        let mut reused = self.conn.is_some();
        loop {
            if self.conn.is_none() {
                match wire::Conn::open(&self.s.plan.addrs).await {
                    Ok(c) => self.conn = Some(c),
                    Err(e) => {
                        tokio::time::sleep(RECONNECT_PAUSE).await;
                        return failed("connect", e.to_string(), false);
                    }
                }
            }
            let Some(c) = self.conn.as_mut() else { return failed("connect", "no connection".into(), false) };
            let answer = c.exchange(request).await;
            if let Ok(r) = &answer {
                let ended = self.judge(r);
                if r.close {
                    self.conn = None;
                }
                return ended;
            }
            self.conn = None;
            let message = |m: &str| m.to_owned();
            return match answer {
                Err(wire::Broken::ClosedIdle) if reused => {
                    reused = false;
                    continue;
                }
                Err(wire::Broken::Closed | wire::Broken::ClosedIdle) => {
                    failed("closed", message("the service closed the connection"), false)
                }
                Err(wire::Broken::TooLarge) => failed(
                    "too large",
                    format!("a response body is larger than {} MiB", wire::MAX_BODY / (1024 * 1024)),
                    true,
                ),
                Err(wire::Broken::Malformed) | Ok(_) => {
                    failed("malformed", message("the response is not HTTP/1.1 this engine can read"), false)
                }
            };
        }
    }

    /// The status check on every response, the case's assertions on this
    /// connection's first response and every `check_every`-th after it.
    fn judge(&mut self, r: &wire::Response) -> Ended {
        let (s, Some(c)) = (self.s, self.conn.as_ref()) else { return Ended::Answered };
        let status_ok = match s.plan.status {
            0 => (200..300).contains(&r.status),
            want => r.status == want,
        };
        if !status_ok {
            let body = c.body(r);
            let excerpt = match String::from_utf8_lossy(&body[..body.len().min(200)]) {
                text if text.trim().is_empty() => "(no body)".to_owned(),
                text => text.into_owned(),
            };
            return failed(format!("status {}", r.status), excerpt, true);
        }
        let n = self.answered;
        self.answered += 1;
        if s.plan.assertions.is_empty() || !n.is_multiple_of(u64::from(s.plan.check_every)) {
            return Ended::Answered;
        }
        s.tally(self.w).checked += 1;
        let failures = crate::cases::evaluate(&s.plan.assertions, r.status, c.body(r));
        match failures.first() {
            None => Ended::Answered,
            Some(f) => failed(
                "check",
                format!("{} {}: expected {}, got {}", f.assertion, f.pointer, f.expected, f.actual),
                true,
            ),
        }
    }
}

/// A load case's result: figures, thresholds, outcome.
pub fn case_result(mut result: CaseResult, measured: Measured, thresholds: &[proto::Threshold]) -> CaseResult {
    let Measured { result: mut load, first_errors, hit_deadline } = measured;
    load.thresholds = verdict::judge(thresholds, &load);
    result.duration_us = load.measured_us;
    result.failures = load
        .thresholds
        .iter()
        .filter(|v| !v.held)
        .map(|v| proto::AssertionFailure {
            assertion: "threshold".into(),
            pointer: String::new(),
            expected: v.text.clone(),
            actual: v.actual.clone(),
        })
        .collect();
    let examples: Vec<String> = first_errors.iter().map(|(k, m)| format!("{k}: {m}")).collect();
    result.response_excerpt = examples.join("\n");
    let outcome = match (hit_deadline, result.failures.is_empty()) {
        _ if load.requests == 0 => {
            result.message = format!(
                "the load case measured no request ({} in its warm-up): its warm-up took the whole run, or its rate \
                 is too low for its duration",
                load.warmup_requests
            );
            CaseOutcome::Error
        }
        (true, _) => {
            result.message = format!(
                "the load case reached its time limit after {} measured requests; give it a longer `timeout`",
                load.requests
            );
            CaseOutcome::Error
        }
        (false, true) => CaseOutcome::Passed,
        (false, false) => CaseOutcome::Failed,
    };
    result.set_outcome(outcome);
    result.load = Some(load);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(f: impl FnOnce(&mut proto::LoadCase)) -> proto::LoadCase {
        let mut l = proto::LoadCase {
            requests: vec![proto::HttpCase { method: "GET".into(), path: "/health".into(), ..Default::default() }],
            duration_ms: 1000,
            ..Default::default()
        };
        f(&mut l);
        l
    }

    #[test]
    fn a_load_case_past_a_limit_or_off_the_service_is_refused_with_why() {
        let base = "http://127.0.0.1:8000";
        let case = proto::Case::default();
        // (case, expected error fragment, or "" when accepted)
        let table: Vec<(proto::LoadCase, &str)> = vec![
            (load(|_| {}), ""),
            (load(|l| l.requests.clear()), "at least one request"),
            (load(|l| l.connections = 5000), "at most 1024 connections"),
            (load(|l| l.rate_per_s = -1.0), "rate is between"),
            (load(|l| l.duration_ms = 0), "a duration or a request count"),
            (load(|l| l.duration_ms = 7_200_000), "at most 3600s"),
            (load(|l| l.requests[0].path = "//169.254.169.254/x".into()), "would leave the service"),
            (
                load(|l| l.requests[0].headers.insert("Host".into(), "evil".into()).map_or((), |_| ())),
                "set by the agent",
            ),
            (load(|l| l.requests[0].method = "GE T".into()), "invalid HTTP method"),
        ];
        for (l, want) in table {
            match Plan::new(&case, &l, base) {
                Ok(_) => assert_eq!(want, "", "{l:?} was accepted"),
                Err(e) => assert!(!want.is_empty() && e.contains(want), "{l:?}: {e}"),
            }
        }
        let https = Plan::new(&case, &load(|_| {}), "https://127.0.0.1:8443").unwrap_err();
        assert!(https.contains("plain HTTP/1.1"), "{https}");
    }

    #[test]
    fn the_plan_says_its_mode_and_deadline() {
        let case = proto::Case::default();
        let closed = Plan::new(&case, &load(|l| l.warmup_ms = 500), "http://127.0.0.1:8000").unwrap();
        assert_eq!(closed.mode(), "closed loop, 16 connections");
        assert_eq!(closed.deadline, Duration::from_millis(500 + 1000 + 10_000 + 5000));
        let open = Plan::new(&case, &load(|l| l.rate_per_s = 500.0), "http://127.0.0.1:8000").unwrap();
        assert_eq!(open.mode(), "open loop, 500/s over 16 connections");
        let bounded = proto::Case { timeout_ms: 2000, ..Default::default() };
        assert_eq!(
            Plan::new(&bounded, &load(|_| {}), "http://127.0.0.1:8000").unwrap().deadline,
            Duration::from_secs(2)
        );
    }

    /// A real HTTP server of known behaviour on loopback: each connection
    /// answers `answers` requests (then closes without saying so), each
    /// after `delay`, each answer prefixed with `interim` (e.g. a 100 Continue).
    async fn server(answers: usize, delay: Duration, interim: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..answers {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 1024];
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buf.drain(..end);
                        tokio::time::sleep(delay).await;
                        let answer = format!("{interim}HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                        if tcp.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        url
    }

    async fn engine(url: &str, f: impl FnOnce(&mut proto::LoadCase), cancel: CancellationToken) -> Measured {
        let plan = Plan::new(&proto::Case::default(), &load(f), url).unwrap();
        tokio::task::spawn_blocking(move || run(plan, &cancel, |_| {})).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_kept_alive_connection_the_service_closed_while_idle_is_not_an_error() {
        let url = server(1, Duration::ZERO, "").await; // one answer per connection, then a silent close
        let m =
            engine(&url, |l| (l.duration_ms, l.request_count, l.connections) = (0, 50, 1), CancellationToken::new())
                .await;
        assert_eq!((m.result.requests, m.result.errors), (50, 0), "{:?}", m.result.errors_by_kind);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_interim_100_continue_is_read_past_not_taken_for_the_answer() {
        let url = server(usize::MAX, Duration::ZERO, "HTTP/1.1 100 Continue\r\n\r\n").await;
        let m =
            engine(&url, |l| (l.duration_ms, l.request_count, l.connections) = (0, 20, 1), CancellationToken::new())
                .await;
        assert_eq!((m.result.requests, m.result.errors), (20, 0), "{:?}", m.first_errors);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_open_loop_behind_schedule_stops_at_its_end_not_after_its_backlog() {
        // Due 1000/s, answered 5/s: 500 requests fall due in the 0.5 s run.
        let url = server(usize::MAX, Duration::from_millis(200), "").await;
        let started = Instant::now();
        let m =
            engine(&url, |l| (l.duration_ms, l.rate_per_s, l.connections) = (500, 1000.0, 1), CancellationToken::new())
                .await;
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        assert!((2..=4).contains(&m.result.requests), "{:?}", m.result);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_cancel_reaches_a_connection_asleep_until_its_next_request() {
        let url = server(usize::MAX, Duration::ZERO, "").await;
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stop.cancel();
        });
        let started = Instant::now();
        // One request every 20 s: the connection sleeps after the first.
        let m = engine(&url, |l| (l.duration_ms, l.rate_per_s, l.connections) = (60_000, 0.05, 1), cancel).await;
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        assert_eq!(m.result.requests, 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_slow_open_loop_is_measured_over_its_whole_duration() {
        // 2/s for 1.2 s: due at 0, 0.5 and 1.0 s; the run is 1.2 s long, not
        // 1.0 s (when its last request went), so 2.5/s, not 3/s.
        let url = server(usize::MAX, Duration::ZERO, "").await;
        let m =
            engine(&url, |l| (l.duration_ms, l.rate_per_s, l.connections) = (1200, 2.0, 1), CancellationToken::new())
                .await;
        assert_eq!(m.result.requests, 3, "{:?}", m.result);
        assert!((1_200_000..1_300_000).contains(&m.result.measured_us), "{:?}", m.result);
        assert!((m.result.rps - 2.5).abs() < 0.2, "{:?}", m.result);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_slow_open_loop_counted_out_is_measured_at_its_rate() {
        // 4/s, 3 requests: due at 0, 0.25 and 0.5 s; three slots of 0.25 s
        // is 0.75 s, so 4/s, not 6/s (3 requests over the 0.5 s to the last).
        let url = server(usize::MAX, Duration::ZERO, "").await;
        let m = engine(
            &url,
            |l| (l.duration_ms, l.request_count, l.rate_per_s, l.connections) = (0, 3, 4.0, 1),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(m.result.requests, 3, "{:?}", m.result);
        assert!((m.result.rps - 4.0).abs() < 0.3, "{:?}", m.result);
        assert!(!m.hit_deadline, "{:?}", m.result);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn check_every_zero_judges_every_answer_never_none() {
        let url = server(usize::MAX, Duration::ZERO, "").await;
        let plan = Plan::new(
            &proto::Case {
                assertions: vec![proto::Assertion { kind: Some(proto::assertion::Kind::Status(201)) }],
                ..Default::default()
            },
            &load(|l| (l.duration_ms, l.request_count, l.connections, l.check_every) = (0, 5, 1, 0)),
            &url,
        )
        .unwrap();
        let m = tokio::task::spawn_blocking(move || run(plan, &CancellationToken::new(), |_| {})).await.unwrap();
        assert_eq!((m.result.checked, m.result.errors), (5, 5), "{:?}", m.result);
    }

    #[test]
    fn a_load_that_measured_nothing_is_an_error_not_a_pass() {
        let measured = Measured {
            result: LoadResult { warmup_requests: 3, ..Default::default() },
            first_errors: BTreeMap::new(),
            hit_deadline: false,
        };
        let r = case_result(CaseResult::default(), measured, &[]);
        assert_eq!(r.outcome(), CaseOutcome::Error);
        assert!(r.message.starts_with("the load case measured no request (3 in its warm-up)"), "{}", r.message);
    }
}
