//! A suite's load cases (`load:`): their shape in YAML, the checked domain
//! type, and the threshold rules (`p99 < 250ms`, `rps > 100`,
//! `errors < 0.1%`) read into numbers the agent judges.

use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{HttpRequest, RawCase, RawRequest, Reader, SuiteError};

/// A load case as the suite asks it.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadSpec {
    /// Sent in turn; at least one.
    pub requests: Vec<HttpRequest>,
    pub connections: u32,
    /// Open loop at this many requests per second; `None`: closed loop.
    pub rate: Option<f64>,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub warmup: Duration,
    /// The case's `expect.json` checks on every Nth response.
    pub check_every: u32,
    pub request_timeout: Option<Duration>,
    pub thresholds: Vec<Threshold>,
}

/// One pass/fail rule on a load case's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct Threshold {
    pub metric: Metric,
    pub op: Op,
    /// Latencies in microseconds, `Rps` per second, `Errors` a fraction.
    pub value: f64,
    /// As written.
    pub text: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    P50,
    P90,
    P95,
    P99,
    P999,
    Max,
    Mean,
    Rps,
    Errors,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLoad {
    #[serde(default)]
    pub requests: Vec<Spanned<RawRequest>>,
    #[serde(default)]
    pub connections: Option<u32>,
    #[serde(default)]
    pub rate: Option<Spanned<String>>,
    #[serde(default)]
    pub duration: Option<Spanned<String>>,
    #[serde(default)]
    pub count: Option<u64>,
    #[serde(default)]
    pub warmup: Option<Spanned<String>>,
    #[serde(default)]
    pub check_every: Option<u32>,
    #[serde(default)]
    pub request_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub thresholds: Vec<Spanned<String>>,
}

/// How often a load case judges its JSON checks when the suite does not say.
pub const DEFAULT_CHECK_EVERY: u32 = 100;
// The agent's limits, checked here too so a suite past them never runs.
use proto::load_limits::{DEFAULT_CONNECTIONS, MAX_CONNECTIONS, MAX_DURATION, MAX_RATE, MIN_RATE};

const METRICS: &str = "p50, p90, p95, p99, p99.9, max, mean, rps, errors";

/// `rps > 100`, `p99 < 250ms`, `errors < 0.1%` → a threshold, or why not.
pub fn parse_threshold(text: &str) -> Result<Threshold, String> {
    let example = "write e.g. \"p99 < 250ms\", \"rps > 100\" or \"errors < 0.1%\"";
    let words: Vec<&str> = text.split_whitespace().collect();
    let [metric, op, value] = words[..] else {
        return Err(format!("threshold {text:?} is not METRIC OP VALUE; {example}"));
    };
    let metric = match metric {
        "p50" => Metric::P50,
        "p90" => Metric::P90,
        "p95" => Metric::P95,
        "p99" => Metric::P99,
        "p99.9" | "p999" => Metric::P999,
        "max" => Metric::Max,
        "mean" => Metric::Mean,
        "rps" => Metric::Rps,
        "errors" => Metric::Errors,
        other => return Err(format!("threshold {text:?}: unknown metric {other:?}; use one of {METRICS}")),
    };
    let op = match op {
        "<" => Op::Lt,
        "<=" => Op::Le,
        ">" => Op::Gt,
        ">=" => Op::Ge,
        other => return Err(format!("threshold {text:?}: unknown comparison {other:?}; use <, <=, > or >=")),
    };
    let value = match metric {
        Metric::Rps => per_second(value).ok_or_else(|| {
            format!("threshold {text:?}: {value:?} is not a rate; write requests per second, e.g. \"100\" or \"100/s\"")
        })?,
        Metric::Errors => percent(value).ok_or_else(|| {
            format!("threshold {text:?}: errors are a percentage of the requests, e.g. \"errors < 0.1%\"")
        })?,
        _ => latency_us(value).ok_or_else(|| {
            format!("threshold {text:?}: {value:?} is not a latency; write e.g. \"250ms\", \"1.5s\", \"800us\"")
        })?,
    };
    Ok(Threshold { metric, op, value, text: words.join(" ") })
}

/// `200`, `200/s` → requests per second (an open-loop rate: from
/// [`MIN_RATE`] to [`MAX_RATE`]).
pub fn rate(text: &str) -> Result<f64, String> {
    match per_second(text) {
        Some(r) if (MIN_RATE..=MAX_RATE).contains(&r) => Ok(r),
        _ => Err(format!(
            "{text:?} is not a rate; write requests per second, e.g. \"200/s\" (from {MIN_RATE} to {MAX_RATE})"
        )),
    }
}

fn per_second(text: &str) -> Option<f64> {
    text.trim().trim_end_matches("/s").parse::<f64>().ok().filter(|r| r.is_finite() && *r >= 0.0)
}

fn percent(text: &str) -> Option<f64> {
    let n: f64 = text.strip_suffix('%')?.parse().ok()?;
    (n.is_finite() && (0.0..=100.0).contains(&n)).then_some(n / 100.0)
}

fn latency_us(text: &str) -> Option<f64> {
    let micros = text.strip_suffix("us").or_else(|| text.strip_suffix("µs"));
    if let Some(n) = micros {
        return n.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0);
    }
    super::parse_duration(text).map(|d| d.as_secs_f64() * 1e6)
}

/// Why a load's counts and times are out of the agent's bounds, if they are.
fn bounds(l: &RawLoad, duration: Option<Duration>, warmup: Duration) -> Option<String> {
    match (duration, l.count, l.check_every) {
        (_, Some(0), _) => Some("count 0 must be at least 1 (the number of measured requests)".into()),
        (None, None, _) => Some("a load case needs a `duration` (e.g. \"30s\") or a `count` of requests".into()),
        (_, _, Some(0)) => Some("check_every 0 must be at least 1 (1 checks every answer)".into()),
        (Some(d), _, _) if d < Duration::from_millis(1) => Some("a load case's duration is at least 1ms".into()),
        (d, _, _) if d.unwrap_or_default().checked_add(warmup).is_none_or(|all| all > MAX_DURATION) => {
            Some("a load case runs at most 1h, warm-up included; shorten its `duration` or `warmup`".into())
        }
        _ => None,
    }
}

impl Reader {
    fn request_timeout(&self, l: &RawLoad) -> Result<Option<Duration>, SuiteError> {
        let Some(t) = &l.request_timeout else { return Ok(None) };
        match self.duration(t)? {
            d if d > MAX_DURATION => Err(self.at(t.referenced, "a load case's request_timeout is at most 1h".into())),
            d => Ok(Some(d)),
        }
    }

    /// A `load:` case: its requests (the case's one `request` or the
    /// load's `requests` list), how it runs and its thresholds.
    pub(super) fn load(
        &self,
        spanned: &Spanned<RawCase>,
        raw: &Spanned<RawLoad>,
    ) -> Result<(HttpRequest, LoadSpec), SuiteError> {
        let (c, l, at) = (&spanned.value, &raw.value, raw.referenced);
        let requests = match (&c.request, l.requests.is_empty()) {
            (Some(_), false) => {
                let why = "a load case sends its `request` or its `load.requests`, not both; keep one";
                return Err(self.at(at, why.into()));
            }
            (Some(r), true) => vec![self.http(r, spanned.referenced)?],
            (None, false) => l.requests.iter().map(|r| self.http(&r.value, r.referenced)).collect::<Result<_, _>>()?,
            (None, true) => {
                let why = "a load case needs a `request` (or `load.requests`, sent in turn) to send";
                return Err(self.at(at, why.into()));
            }
        };
        let duration = l.duration.as_ref().map(|d| self.duration(d)).transpose()?;
        let warmup = l.warmup.as_ref().map(|w| self.duration(w)).transpose()?.unwrap_or_default();
        if let Some(why) = bounds(l, duration, warmup) {
            return Err(self.at(at, why));
        }
        let connections = l.connections.unwrap_or(DEFAULT_CONNECTIONS);
        if !(1..=MAX_CONNECTIONS).contains(&connections) {
            return Err(self.at(at, format!("connections {connections} must be from 1 to {MAX_CONNECTIONS}")));
        }
        let rate = l.rate.as_ref().map(|r| rate(&r.value).map_err(|e| self.at(r.referenced, e))).transpose()?;
        let thresholds = l
            .thresholds
            .iter()
            .map(|t| parse_threshold(&t.value).map_err(|e| self.at(t.referenced, e)))
            .collect::<Result<_, _>>()?;
        let spec = LoadSpec {
            requests: requests.clone(),
            connections,
            rate,
            duration,
            count: l.count,
            warmup,
            check_every: l.check_every.unwrap_or(DEFAULT_CHECK_EVERY),
            request_timeout: self.request_timeout(l)?,
            thresholds,
        };
        Ok((requests[0].clone(), spec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_read_as_numbers_or_say_what_to_write() {
        // (text, expected "metric op value" or an error fragment)
        let table = [
            ("p99 < 250ms", "P99 Lt 250000"),
            ("p99.9 <= 1.5s", "P999 Le 1500000"),
            ("p50 < 800us", "P50 Lt 800"),
            ("max   <  2s", "Max Lt 2000000"),
            ("rps > 100", "Rps Gt 100"),
            ("rps >= 2500/s", "Rps Ge 2500"),
            ("rps > 0", "Rps Gt 0"),
            ("errors < 0.1%", "Errors Lt 0.001"),
            ("errors <= 0%", "Errors Le 0"),
            ("p99<250ms", "is not METRIC OP VALUE"),
            ("p98 < 1s", "unknown metric \"p98\""),
            ("p99 == 1s", "unknown comparison \"==\""),
            ("p99 < 250", "is not a latency"),
            ("rps > fast", "is not a rate"),
            ("errors < 0.1", "a percentage of the requests"),
            ("errors < 120%", "a percentage of the requests"),
        ];
        for (text, want) in table {
            let got = match parse_threshold(text) {
                Ok(t) => format!("{:?} {:?} {}", t.metric, t.op, (t.value * 1e6).round() / 1e6),
                Err(e) => e,
            };
            assert!(got.contains(want), "{text:?}: {got}");
        }
        assert_eq!(parse_threshold("max   <  2s").unwrap().text, "max < 2s");
    }

    #[test]
    fn rates_are_per_second_and_bounded() {
        assert_eq!(rate("200/s"), Ok(200.0));
        assert_eq!(rate("0.5"), Ok(0.5));
        for bad in ["0", "0.001/s", "-3/s", "2e7", "many", "inf"] {
            assert!(rate(bad).is_err(), "{bad}");
        }
    }

    fn suite(case: &str) -> String {
        format!("name: s\nservice: translation\nmodels: [nllb]\ncases:\n  - name: load\n{case}")
    }

    const ONE: &str = "    request: {method: GET, path: /health}\n";

    #[test]
    fn a_load_case_is_read_or_refused_where_it_is_wrong() {
        let path = std::path::Path::new("load.yaml");
        // (case body, expected error "line:column: fragment", or "" when valid)
        let table = [
            (format!("{ONE}    load: {{duration: 5s}}\n"), ""),
            (format!("{ONE}    load: {{count: 1000, rate: 200/s}}\n"), ""),
            (
                "    load:\n      requests: [{method: GET, path: /a}, {method: POST, path: /b, json: {x: 1}}]\n      duration: 1s\n".into(),
                "",
            ),
            (format!("{ONE}    load: {{connections: 4}}\n"), "7:11: a load case needs a `duration`"),
            (format!("{ONE}    load: {{duration: 1s, connections: 0}}\n"), "7:11: connections 0 must be from 1 to 1024"),
            (format!("{ONE}    load: {{duration: 1s, rate: lots}}\n"), "7:32: \"lots\" is not a rate"),
            (
                format!("{ONE}    load:\n      duration: 1s\n      thresholds: [\"p99 < 250\"]\n"),
                "9:20: threshold \"p99 < 250\": \"250\" is not a latency",
            ),
            (
                format!("{ONE}    load: {{duration: 1s, requests: [{{method: GET, path: /x}}]}}\n"),
                "7:11: a load case sends its `request` or its `load.requests`, not both",
            ),
            ("    load: {duration: 1s}\n".into(), "6:11: a load case needs a `request`"),
            ("    command: e2e\n    load: {duration: 1s}\n".into(), "6:14: a case runs a `command` or a `load` test"),
            (format!("{ONE}    load: {{duration: 1s, conections: 3}}\n"), "7:26: unknown field `conections`"),
            (format!("{ONE}    load: {{duration: 1s, check_every: 0}}\n"), "7:11: check_every 0 must be at least 1"),
            (format!("{ONE}    load: {{count: 0}}\n"), "7:11: count 0 must be at least 1"),
            (format!("{ONE}    load: {{duration: 2h}}\n"), "7:11: a load case runs at most 1h, warm-up included"),
            (format!("{ONE}    load: {{duration: 50m, warmup: 11m}}\n"), "7:11: a load case runs at most 1h"),
            (format!("{ONE}    load: {{duration: 1s, request_timeout: 2h}}\n"), "7:43: a load case's request_timeout is at most 1h"),
            (format!("{ONE}    load: {{duration: 1h, request_timeout: 1h}}\n"), ""),
            (format!("{ONE}    load: {{count: 10, warmup: 2h}}\n"), "7:11: a load case runs at most 1h"),
            (format!("{ONE}    load: {{duration: 0.5ms}}\n"), "7:11: a load case's duration is at least 1ms"),
            (format!("{ONE}    load: {{duration: 10000000000000000000s, warmup: 10000000000000000000s}}\n"), "7:11: a load case runs at most 1h"),
        ];
        for (case, want) in table {
            match crate::suite::parse(&suite(&case), path) {
                Ok(_) => assert_eq!(want, "", "{case}"),
                Err(e) => assert!(!want.is_empty() && e.to_string().contains(want), "{case}\n{e}"),
            }
        }
    }

    #[test]
    fn a_load_case_has_its_defaults_and_its_status_check() {
        let text = suite(&format!(
            "{ONE}    load: {{duration: 2s, thresholds: [\"errors < 1%\"]}}\n    expect: {{status: 204}}\n"
        ));
        let s = crate::suite::parse(&text, std::path::Path::new("load.yaml")).unwrap();
        let case = &s.cases[0];
        let l = case.load.as_ref().unwrap();
        assert_eq!((l.connections, l.rate, l.count, l.check_every), (16, None, None, DEFAULT_CHECK_EVERY));
        assert_eq!(l.duration, Some(Duration::from_secs(2)));
        assert_eq!(l.requests[0].path, "/health");
        assert_eq!(case.checks, [crate::suite::Check::Status(204)]);
        assert_eq!(l.thresholds[0].metric, Metric::Errors);
    }
}
