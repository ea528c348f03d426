//! Judges a load case's figures against its thresholds (`p99 < 250ms`,
//! `rps > 100`, `errors < 0.1%`): a pure decider. A load case with no
//! threshold on errors must have none.

use proto::threshold::{Metric, Op};
use proto::{LoadResult, Threshold, ThresholdVerdict};

/// Every threshold as judged, the implicit `errors = 0` last when the case
/// set no threshold on errors.
pub fn judge(thresholds: &[Threshold], r: &LoadResult) -> Vec<ThresholdVerdict> {
    let mut out: Vec<ThresholdVerdict> = thresholds.iter().map(|t| one(t, r)).collect();
    if !thresholds.iter().any(|t| t.metric() == Metric::ErrorRate) {
        let implicit =
            Threshold { metric: Metric::ErrorRate.into(), op: Op::Le.into(), value: 0.0, text: "errors = 0".into() };
        out.push(one(&implicit, r));
    }
    out
}

fn one(t: &Threshold, r: &LoadResult) -> ThresholdVerdict {
    let verdict = |actual: String, held: bool| ThresholdVerdict { text: t.text.clone(), actual, held };
    let Some(value) = measured(t.metric(), r) else {
        return verdict("(a metric this agent does not know: not judged, upgrade the agent)".into(), false);
    };
    let actual = show(t.metric(), value);
    match t.op() {
        Op::Lt => verdict(actual, value < t.value),
        Op::Le => verdict(actual, value <= t.value),
        Op::Gt => verdict(actual, value > t.value),
        Op::Ge => verdict(actual, value >= t.value),
        Op::Unspecified => verdict("(a comparison this agent does not know: not judged)".into(), false),
    }
}

/// The figure a metric names, in the threshold's unit.
fn measured(metric: Metric, r: &LoadResult) -> Option<f64> {
    let us = |v: u64| Some(v as f64);
    match metric {
        Metric::P50 => us(r.p50_us),
        Metric::P90 => us(r.p90_us),
        Metric::P95 => us(r.p95_us),
        Metric::P99 => us(r.p99_us),
        Metric::P999 => us(r.p999_us),
        Metric::Max => us(r.max_us),
        Metric::Mean => us(r.mean_us),
        Metric::Rps => Some(r.rps),
        Metric::ErrorRate if r.requests == 0 => Some(if r.errors == 0 { 0.0 } else { 1.0 }),
        Metric::ErrorRate => Some(r.errors as f64 / r.requests as f64),
        Metric::Unspecified => None,
    }
}

/// A measured value written like a threshold: `312ms`, `1520/s`, `0.20%`.
pub fn show(metric: Metric, value: f64) -> String {
    match metric {
        Metric::Rps => proto::format_rate(value),
        Metric::ErrorRate => format!("{:.2}%", value * 100.0),
        _ => latency(value as u64),
    }
}

pub use proto::format_latency_us as latency;

#[cfg(test)]
mod tests {
    use super::*;

    fn t(metric: Metric, op: Op, value: f64, text: &str) -> Threshold {
        Threshold { metric: metric.into(), op: op.into(), value, text: text.into() }
    }

    #[test]
    fn each_threshold_holds_or_not_with_the_measured_value() {
        let r =
            LoadResult { requests: 2000, errors: 4, rps: 150.4, p99_us: 312_000, p50_us: 850, ..Default::default() };
        // (threshold, expected "text actual held")
        let table = [
            (t(Metric::P99, Op::Lt, 250_000.0, "p99 < 250ms"), "p99 < 250ms 312.0ms false"),
            (t(Metric::P99, Op::Lt, 400_000.0, "p99 < 400ms"), "p99 < 400ms 312.0ms true"),
            (t(Metric::P50, Op::Le, 850.0, "p50 <= 850us"), "p50 <= 850us 850µs true"),
            (t(Metric::Rps, Op::Gt, 100.0, "rps > 100"), "rps > 100 150/s true"),
            (t(Metric::Rps, Op::Ge, 200.0, "rps >= 200"), "rps >= 200 150/s false"),
            (t(Metric::ErrorRate, Op::Lt, 0.001, "errors < 0.1%"), "errors < 0.1% 0.20% false"),
            (t(Metric::ErrorRate, Op::Lt, 0.01, "errors < 1%"), "errors < 1% 0.20% true"),
            (
                t(Metric::Unspecified, Op::Lt, 1.0, "?"),
                "? (a metric this agent does not know: not judged, upgrade the agent) false",
            ),
            (
                t(Metric::P99, Op::Unspecified, 1.0, "p99 ? 1"),
                "p99 ? 1 (a comparison this agent does not know: not judged) false",
            ),
        ];
        for (threshold, want) in table {
            let v = judge(std::slice::from_ref(&threshold), &r);
            let got = format!("{} {} {}", v[0].text, v[0].actual, v[0].held);
            assert_eq!(got, want);
            let has_error_rule = threshold.metric() == Metric::ErrorRate;
            assert_eq!(
                v.len(),
                if has_error_rule { 1 } else { 2 },
                "the implicit errors = 0 only without an errors rule"
            );
        }
    }

    #[test]
    fn without_an_errors_threshold_one_error_fails_the_case() {
        let clean = LoadResult { requests: 10, ..Default::default() };
        let one_error = LoadResult { requests: 10, errors: 1, ..Default::default() };
        assert!(judge(&[], &clean).iter().all(|v| v.held));
        let v = judge(&[], &one_error);
        assert_eq!((v[0].text.as_str(), v[0].actual.as_str(), v[0].held), ("errors = 0", "10.00%", false));
        let nothing_answered = LoadResult { requests: 0, errors: 3, ..Default::default() };
        assert!(!judge(&[], &nothing_answered)[0].held);
    }

    #[test]
    fn latencies_read_like_a_person_writes_them() {
        let table = [(0, "0µs"), (999, "999µs"), (1_234, "1.23ms"), (12_345, "12.3ms"), (1_520_000, "1.52s")];
        for (us, want) in table {
            assert_eq!(latency(us), want);
        }
    }
}
