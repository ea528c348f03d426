//! `RunEvent`: the one stream from the runner to its reporters (terminal,
//! JUnit, trace, and whatever listens next). The runner never writes to the
//! terminal or a report file; reporters never reach into the runner.

use std::path::PathBuf;
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::client::Stage;
use crate::report::{CaseReport, ModelLoad};

/// One suite as the run starts: what reporters need to list every case, even
/// those that never get a result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SuiteInfo {
    pub name: String,
    pub file: PathBuf,
    pub service: String,
    pub models: Vec<String>,
    pub cases: Vec<String>,
    /// The suite's `baseline_tolerance` (0.2 = 20 % slower is still fine).
    #[serde(default)]
    pub baseline_tolerance: Option<f64>,
}

/// A stage transition, stamped in the controller's clock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageSpan {
    #[serde(with = "stored::stage")]
    pub stage: Stage,
    pub cause: String,
    pub start_unix_ms: i64,
    pub end_unix_ms: i64,
    /// The service's peak RSS and GPU memory during the stage.
    pub peak_rss_bytes: u64,
    pub peak_gpu_bytes: u64,
}

/// How long a stage usually takes on a host, and what follows it until READY.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usual {
    pub stage: Duration,
    pub rest: Duration,
}

/// Memory running out on a host while a model loads (the agent's
/// `MemoryPressure`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pressure {
    /// `None`: host memory; `Some(i)`: GPU `i`.
    pub gpu: Option<u32>,
    pub available_bytes: u64,
    pub total_bytes: u64,
    pub threshold_bytes: u64,
    /// "service/model" of each model loading.
    pub loading: Vec<String>,
    /// (pid, process name, service, bytes), largest first.
    pub consumers: Vec<(u32, String, String, u64)>,
}

impl Pressure {
    /// One line: what ran low, while what loaded, who holds the memory.
    pub fn describe(&self, host: &str) -> String {
        let mib = |b: u64| b / (1024 * 1024);
        let what = match self.gpu {
            None => format!("host memory available {} MiB of {} MiB", mib(self.available_bytes), mib(self.total_bytes)),
            Some(i) => format!("GPU {i} free {} MiB of {} MiB", mib(self.available_bytes), mib(self.total_bytes)),
        };
        let mut line = format!(
            "memory pressure on {host}: {what} (below {} MiB) while {} loads",
            mib(self.threshold_bytes),
            self.loading.join(", ")
        );
        let consumers: Vec<String> = self
            .consumers
            .iter()
            .map(|(pid, name, service, bytes)| {
                let who = match (name.is_empty(), service.is_empty()) {
                    (true, true) => format!("pid {pid}"),
                    (true, false) => format!("pid {pid} ({service})"),
                    (false, true) => format!("{name} ({pid})"),
                    (false, false) => format!("{name} ({pid}, {service})"),
                };
                format!("{who} {} MiB", mib(*bytes))
            })
            .collect();
        if !consumers.is_empty() {
            line.push_str(&format!("; largest consumers: {}", consumers.join(", ")));
        }
        line
    }
}

/// Everything that happens in a run, in the order the runner saw it. The run
/// store keeps it as JSON (`store`), so a run can be told again from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RunEvent {
    /// Inputs are valid; these suites will run on these hosts.
    Started {
        run_id: String,
        #[serde(with = "stored::trace_id")]
        trace_id: TraceId,
        suites: Vec<SuiteInfo>,
        hosts: Vec<String>,
    },
    /// The run could not start: bad suites, flags or inventory (exit 64).
    Refused {
        errors: Vec<String>,
    },
    /// A host could not be reached when the run connected.
    Unreachable {
        host: String,
        reason: String,
    },
    /// A suite waits for a host, and why (one reason per eligible host).
    Waiting {
        suite: usize,
        reasons: Vec<String>,
    },
    /// A suite gave up waiting.
    GaveUpWaiting {
        suite: usize,
        reason: String,
    },
    /// Cases of a suite were sent to a host (one try).
    Placed {
        suite: usize,
        #[serde(with = "stored::span_id")]
        try_id: SpanId,
        host: String,
        addr: String,
        cases: Vec<usize>,
    },
    /// The try took (or reused) this run's lease on the host's service.
    LeaseTaken {
        suite: usize,
        #[serde(with = "stored::span_id")]
        try_id: SpanId,
        host: String,
        service: String,
        epoch: u64,
    },
    /// The agent no longer holds this run's lease (expired, taken, host restarted).
    LeaseLost {
        host: String,
        service: String,
        reason: String,
    },
    /// A model changed stage on some host (live progress).
    StageChanged {
        host: String,
        service: String,
        model: String,
        #[serde(with = "stored::stage")]
        from: Stage,
        #[serde(with = "stored::stage")]
        to: Stage,
        progress: f64,
        message: String,
        /// How long `to` and the stages after it usually take on that host
        /// (the agent's load history), when known.
        usual: Option<Usual>,
    },
    /// Memory ran low on a host while a model loaded.
    MemoryPressure {
        host: String,
        pressure: Pressure,
    },
    /// A load case's figures so far (about once a second while it runs).
    LoadProgress {
        host: String,
        case: String,
        elapsed_ms: u64,
        warming_up: bool,
        requests: u64,
        errors: u64,
        rps: f64,
        p99_us: u64,
    },
    /// A service's memory, as the agent sampled it.
    Telemetry {
        host: String,
        service: String,
        rss_bytes: u64,
        gpu_bytes: u64,
    },
    /// A model a try waited for is READY or FAILED (or was reused).
    ModelSettled {
        suite: usize,
        #[serde(with = "stored::span_id")]
        try_id: SpanId,
        load: ModelLoad,
        asked_unix_ms: i64,
        stages: Vec<StageSpan>,
        peak_rss_bytes: u64,
    },
    /// A case was sent to an agent; `span` is the id its traceparent carries.
    CaseStarted {
        suite: usize,
        case: usize,
        attempt: u32,
        host: String,
        #[serde(with = "stored::span_id")]
        span: SpanId,
    },
    /// A case has its final result for this attempt.
    CaseFinished {
        suite: usize,
        case: usize,
        #[serde(with = "stored::opt_span_id")]
        try_id: Option<SpanId>,
        report: CaseReport,
    },
    /// A case's attempt was lost with its host; `requeued` says whether it runs again.
    CaseLost {
        suite: usize,
        case: usize,
        #[serde(with = "stored::span_id")]
        try_id: SpanId,
        attempt: u32,
        reason: String,
        requeued: bool,
    },
    /// A try on one host ended (`failure`: why it did not complete).
    TryEnded {
        #[serde(with = "stored::span_id")]
        try_id: SpanId,
        failure: Option<String>,
    },
    /// A host stopped answering past the grace, or came back.
    HostLost {
        host: String,
        reason: String,
    },
    HostBack {
        host: String,
        restarted: bool,
    },
    /// Every case of a suite has a result.
    SuiteFinished {
        suite: usize,
    },
    /// The first Ctrl-C: no new calls; leases are being released.
    Interrupted,
    /// The run is over; reporters write and summarise.
    Finished {
        duration: Duration,
        interrupted: bool,
    },
    /// After `Finished`, from the reporters themselves: the run's loads
    /// against the stored baselines (kept with the run in the store).
    BaselineCompared {
        comparison: crate::store::baseline::Comparison,
    },
}

/// How the ids and stages inside events are written in the run store: as
/// people read them (hex ids, stage names).
mod stored {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        String::deserialize(d)
    }

    pub mod trace_id {
        use super::*;
        use opentelemetry::trace::TraceId;
        pub fn serialize<S: Serializer>(id: &TraceId, s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(id)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TraceId, D::Error> {
            let t = text(d)?;
            TraceId::from_hex(&t).map_err(|_| D::Error::custom(format!("not a trace id: {t:?}")))
        }
    }

    pub mod span_id {
        use super::*;
        use opentelemetry::trace::SpanId;
        pub fn serialize<S: Serializer>(id: &SpanId, s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(id)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SpanId, D::Error> {
            let t = text(d)?;
            SpanId::from_hex(&t).map_err(|_| D::Error::custom(format!("not a span id: {t:?}")))
        }
    }

    pub mod opt_span_id {
        use super::*;
        use opentelemetry::trace::SpanId;
        pub fn serialize<S: Serializer>(id: &Option<SpanId>, s: S) -> Result<S::Ok, S::Error> {
            match id {
                Some(id) => s.collect_str(id),
                None => s.serialize_none(),
            }
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SpanId>, D::Error> {
            match Option::<String>::deserialize(d)? {
                None => Ok(None),
                Some(t) => {
                    SpanId::from_hex(&t).map(Some).map_err(|_| D::Error::custom(format!("not a span id: {t:?}")))
                }
            }
        }
    }

    pub mod stage {
        use super::*;
        use crate::client::Stage;
        pub fn serialize<S: Serializer>(stage: &Stage, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(stage.label())
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Stage, D::Error> {
            let t = text(d)?;
            Stage::from_str_name(&t).ok_or_else(|| D::Error::custom(format!("not a stage: {t:?}")))
        }
    }
}

/// The runner's end of the stream. Sending never blocks and never fails the
/// run: once reporters are gone, events are dropped.
#[derive(Clone, Debug)]
pub struct Events(mpsc::UnboundedSender<RunEvent>);

impl Events {
    pub fn channel() -> (Events, mpsc::UnboundedReceiver<RunEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Events(tx), rx)
    }

    pub fn send(&self, event: RunEvent) {
        let _ = self.0.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_names_what_ran_low_what_loaded_and_who_holds_it() {
        const MIB: u64 = 1024 * 1024;
        let host = Pressure {
            gpu: None,
            available_bytes: 812 * MIB,
            total_bytes: 64_000 * MIB,
            threshold_bytes: 1024 * MIB,
            loading: vec!["translation/aya".into()],
            consumers: vec![
                (4242, "python3".into(), "translation".into(), 14_000 * MIB),
                (7, "java".into(), String::new(), 9 * MIB),
            ],
        };
        assert_eq!(
            host.describe("gpu-01"),
            "memory pressure on gpu-01: host memory available 812 MiB of 64000 MiB (below 1024 MiB) while \
             translation/aya loads; largest consumers: python3 (4242, translation) 14000 MiB, java (7) 9 MiB"
        );
        let gpu = Pressure {
            gpu: Some(1),
            consumers: vec![(4242, String::new(), "translation".into(), 70_000 * MIB)],
            ..host
        };
        assert_eq!(
            gpu.describe("gpu-01"),
            "memory pressure on gpu-01: GPU 1 free 812 MiB of 64000 MiB (below 1024 MiB) while translation/aya \
             loads; largest consumers: pid 4242 (translation) 70000 MiB"
        );
    }
}
