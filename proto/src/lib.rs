//! The wire contract between controller and agent (`proctor.agent.v1`).
//!
//! The Rust code under `src/gen/` is generated from `proto/` by
//! `tests/codegen.rs` (protox + tonic-prost-build, no protoc) and committed, so
//! building Proctor never needs a protobuf compiler. That test fails when the
//! committed code differs from what the `.proto` files produce; run it with
//! `PROCTOR_BLESS=1` to rewrite the committed code.

pub mod admission;
pub mod load_limits;

/// Version of this contract, sent in `GetInfo`. Bumped on incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest gRPC message either side decodes or sends, set deliberately on
/// both (tonic's default is 4 MiB): agents cap each event at 256 KiB and a
/// `RunCases` call at its case limit, so this leaves ample room while still
/// refusing a runaway message.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

#[expect(clippy::all, clippy::pedantic, reason = "generated code")]
#[rustfmt::skip]
pub mod agent {
    include!("gen/proctor.agent.v1.rs");
}

pub use agent::*;

/// Durations as people write them in agent configs, suites, flags and sim
/// specs: `250ms`, `30s`, `1.5s`, `5m` (or `5min`), `1h`. One parser, so the
/// same text means the same thing everywhere.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = s.split_at(split);
    let n: f64 = number.parse().ok()?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    std::time::Duration::try_from_secs_f64(secs).ok()
}

/// Microseconds as a person reads them: `850µs`, `1.23ms`, `12.3ms`, `1.52s`
/// (load-case latencies, on the agent and in the controller's reports).
pub fn format_latency_us(us: u64) -> String {
    match us {
        0..1_000 => format!("{us}µs"),
        1_000..10_000 => format!("{:.2}ms", us as f64 / 1e3),
        10_000..1_000_000 => format!("{:.1}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

/// Requests per second as a person reads them: whole numbers from 100/s,
/// one decimal from 10/s, two below (a slow open loop's 0.75/s is not "1/s").
pub fn format_rate(per_s: f64) -> String {
    match per_s {
        r if r >= 100.0 => format!("{r:.0}/s"),
        r if r >= 10.0 => format!("{r:.1}/s"),
        r => format!("{r:.2}/s"),
    }
}

/// A `*_unix_ms` field of the contract as RFC 3339 UTC, second precision
/// (no date-time dependency needed).
pub fn format_unix_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

impl Stage {
    /// Stages a model passes through while loading, in order.
    pub const LOADING: [Stage; 6] = [
        Stage::ProcessStarting,
        Stage::WaitingForHttp,
        Stage::Authenticating,
        Stage::Downloading,
        Stage::LoadingWeights,
        Stage::WarmingUp,
    ];

    /// True once the model is done loading, one way or the other.
    pub fn is_terminal(self) -> bool {
        matches!(self, Stage::Ready | Stage::Failed | Stage::Stopped)
    }

    /// The name people read: `LOADING_WEIGHTS`.
    pub fn label(self) -> &'static str {
        self.as_str_name()
    }
}

impl ExitKind {
    pub fn label(self) -> &'static str {
        self.as_str_name()
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = self.kind();
        match kind {
            ExitKind::Crashed => write!(f, "CRASHED({})", self.code),
            ExitKind::Signaled => write!(f, "SIGNALED({})", self.signal),
            other => f.write_str(other.label()),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rates_keep_their_digits_where_they_matter() {
        let table = [(5231.4, "5231/s"), (100.0, "100/s"), (99.95, "100.0/s"), (12.34, "12.3/s"), (0.75, "0.75/s")];
        for (rate, want) in table {
            assert_eq!(super::format_rate(rate), want, "{rate}");
        }
    }

    #[test]
    fn parses_durations_and_refuses_the_rest() {
        use std::time::Duration;
        let table = [
            ("250ms", Some(Duration::from_millis(250))),
            ("1.5s", Some(Duration::from_millis(1500))),
            (" 5m ", Some(Duration::from_secs(300))),
            ("5min", Some(Duration::from_secs(300))),
            ("1h", Some(Duration::from_secs(3600))),
            ("30", None),
            ("soon", None),
            ("-1s", None),
            ("2d", None),
        ];
        for (text, want) in table {
            assert_eq!(super::parse_duration(text), want, "{text:?}");
        }
    }

    #[test]
    fn formats_timestamps() {
        assert_eq!(super::format_unix_ms(1_795_000_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(super::format_unix_ms(0), "1970-01-01T00:00:00Z");
    }
}
