//! What `proctor run` was asked to do, validated before anything connects:
//! flags, timing order, and where a model's load timeout comes from.

use std::path::PathBuf;
use std::time::Duration;

use crate::client;
use crate::otel;
use crate::progress::Mode;

/// Exit codes (DESIGN §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Passed = 0,
    TestFailures = 1,
    Infrastructure = 2,
    /// Every case passed, but a model load was slower than its baseline
    /// beyond tolerance.
    Regression = 3,
    BadInput = 64,
    Interrupted = 130,
}

/// Where a model's load timeout came from, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeoutSource {
    Flag,
    Suite,
    Env,
}

impl TimeoutSource {
    pub fn label(self) -> &'static str {
        match self {
            TimeoutSource::Flag => "--model-timeout",
            TimeoutSource::Suite => "the suite's `timeout`",
            TimeoutSource::Env => "MODEL_LOADING_TIMEOUT (where `proctor run` ran)",
        }
    }
}

/// The controller's part of the load-timeout precedence (DESIGN §4): the CLI
/// flag beats the suite, the suite beats `MODEL_LOADING_TIMEOUT` in the
/// controller's environment. With none of them the agent applies its own
/// `MODEL_LOADING_TIMEOUT`, its config and its default.
pub fn requested_timeout(
    cli: Option<Duration>,
    suite: Option<Duration>,
    env: Option<Duration>,
) -> Option<(Duration, TimeoutSource)> {
    cli.map(|t| (t, TimeoutSource::Flag))
        .or(suite.map(|t| (t, TimeoutSource::Suite)))
        .or(env.map(|t| (t, TimeoutSource::Env)))
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Inventory file (`--inventory`).
    pub inventory: Option<PathBuf>,
    /// `--agent HOST:PORT` addresses, added to the inventory.
    pub agents: Vec<String>,
    /// How to reach them (`--ca`, `--cert`, `--key`, `--token-file`).
    pub access: crate::inventory::Access,
    pub suites: Vec<PathBuf>,
    pub out_dir: PathBuf,
    pub progress: Mode,
    /// `--model-timeout`: beats the suite's timeout.
    pub model_timeout: Option<Duration>,
    /// `MODEL_LOADING_TIMEOUT` where `proctor run` runs: below the suite's.
    pub env_model_timeout: Option<Duration>,
    /// `--fresh`: cold loads for every suite.
    pub fresh: bool,
    /// Lease TTL asked of agents; renewed every third of it.
    pub lease_ttl: Duration,
    /// OTLP export (the trace file is always written).
    pub otel: otel::OtelConfig,
    /// HTTP/2 keepalive towards agents.
    pub keepalive: client::Keepalive,
    /// How long an agent may be unreachable before its unfinished cases are
    /// placed elsewhere.
    pub reconnect_grace: Duration,
    /// `--max-wait`: how long a suite may wait for a free host before its
    /// cases become errors (`None`: as long as it takes). A suite's own
    /// `max_wait` beats it.
    pub max_wait: Option<Duration>,
    /// Where the run is kept (`--store`; `None`: not kept).
    pub store: Option<crate::store::Location>,
    /// How much slower than its baseline a load may be.
    pub baseline_tolerance: crate::store::baseline::Tolerance,
    /// `--fail-on-skip`: a test a command case reports skipped fails it.
    pub fail_on_skip: bool,
}

impl RunOptions {
    pub fn new(agents: Vec<String>, suites: Vec<PathBuf>, out_dir: PathBuf) -> RunOptions {
        RunOptions {
            inventory: None,
            agents,
            access: crate::inventory::Access::default(),
            suites,
            out_dir,
            progress: Mode::Quiet,
            model_timeout: None,
            env_model_timeout: None,
            fresh: false,
            lease_ttl: client::LEASE_TTL,
            otel: otel::OtelConfig::default(),
            keepalive: client::Keepalive::default(),
            reconnect_grace: client::RECONNECT_GRACE,
            max_wait: None,
            store: None,
            baseline_tolerance: Default::default(),
            fail_on_skip: false,
        }
    }

    /// The load timeout to send for a suite, and who set it.
    pub fn load_timeout(&self, suite: Option<Duration>) -> Option<(Duration, TimeoutSource)> {
        requested_timeout(self.model_timeout, suite, self.env_model_timeout)
    }

    /// Durations that must not be zero are not; keepalive detection <
    /// reconnect grace < lease TTL, or a silent partition would outlive the
    /// lease before anyone noticed.
    pub fn check_timing(&self) -> Result<(), String> {
        let positive = [
            ("--lease-ttl", Some(self.lease_ttl)),
            ("--reconnect-grace", Some(self.reconnect_grace)),
            ("--keepalive-interval", Some(self.keepalive.interval)),
            ("--keepalive-timeout", Some(self.keepalive.timeout)),
            ("--model-timeout", self.model_timeout),
            ("MODEL_LOADING_TIMEOUT", self.env_model_timeout),
            ("--max-wait", self.max_wait),
        ];
        for (name, value) in positive {
            if value.is_some_and(|v| v.is_zero()) {
                return Err(format!("{name} must be greater than zero; write e.g. 30s"));
            }
        }
        if let Mode::Lines { interval } = self.progress
            && interval.is_zero()
        {
            return Err("--progress-interval must be greater than zero; write e.g. 30s".into());
        }
        let detect = self.keepalive.interval + self.keepalive.timeout;
        if detect >= self.reconnect_grace {
            return Err(format!(
                "keepalive interval + timeout ({}s) must be shorter than the reconnect grace ({}s)",
                detect.as_secs_f64(),
                self.reconnect_grace.as_secs_f64()
            ));
        }
        if self.reconnect_grace >= self.lease_ttl {
            return Err(format!(
                "the reconnect grace ({}s) must be shorter than the lease TTL ({}s)",
                self.reconnect_grace.as_secs_f64(),
                self.lease_ttl.as_secs_f64()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Option<Duration> {
        Some(Duration::from_secs(secs))
    }

    #[test]
    fn the_flag_beats_the_suite_and_the_suite_beats_the_environment() {
        let table = [
            (s(1), s(2), s(3), Some((Duration::from_secs(1), TimeoutSource::Flag))),
            (None, s(2), s(3), Some((Duration::from_secs(2), TimeoutSource::Suite))),
            (None, None, s(3), Some((Duration::from_secs(3), TimeoutSource::Env))),
            (None, None, None, None),
        ];
        for (cli, suite, env, expected) in table {
            assert_eq!(requested_timeout(cli, suite, env), expected, "{cli:?} {suite:?} {env:?}");
        }
    }

    #[test]
    fn zero_durations_are_refused_naming_the_flag() {
        let base = RunOptions::new(vec![], vec![], PathBuf::new());
        type Set = fn(&mut RunOptions);
        let cases: [(&str, Set); 5] = [
            ("--lease-ttl", |o| o.lease_ttl = Duration::ZERO),
            ("--reconnect-grace", |o| o.reconnect_grace = Duration::ZERO),
            ("--keepalive-interval", |o| o.keepalive.interval = Duration::ZERO),
            ("--progress-interval", |o| o.progress = Mode::Lines { interval: Duration::ZERO }),
            ("--max-wait", |o| o.max_wait = Some(Duration::ZERO)),
        ];
        assert_eq!(base.check_timing(), Ok(()));
        for (flag, set) in cases {
            let mut o = base.clone();
            set(&mut o);
            let err = o.check_timing().expect_err(flag);
            assert!(err.starts_with(&format!("{flag} must be greater than zero")), "{err}");
        }
    }
}
