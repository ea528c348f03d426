//! An opt-in Prometheus endpoint (`metrics_listen`): the agent's view in the
//! text exposition format, with conventional names and labels (`host`,
//! `service`, `model`, `stage`, `gpu`), so a lab's Prometheus and Grafana see
//! what Proctor sees — host memory, each service's memory and GPU memory,
//! each model's stage (one gauge per stage, 1 for the current one) and
//! progress, load durations as a histogram, load failures, each GPU, which
//! services are leased. Read-only; never a lease id or a secret.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use proto::{Snapshot, Stage, event, watch_message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::journal::Journal;

/// Upper bounds of the load-duration buckets, in seconds.
pub const LOAD_BUCKETS: [f64; 10] = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

/// Load durations and failures per (service, model), from stage changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Loads {
    /// When the current load began (agent clock, ms).
    started: BTreeMap<(String, String), i64>,
    /// Bucket counts (cumulative at render), count, sum of seconds.
    durations: BTreeMap<(String, String), ([u64; LOAD_BUCKETS.len()], u64, f64)>,
    failures: BTreeMap<(String, String), u64>,
}

impl Loads {
    /// Folds one stage change at `at_ms`. Pure.
    pub fn observe(&mut self, c: &proto::StageChanged, at_ms: i64) {
        let key = (c.service.clone(), c.model.clone());
        let (from, to) = (c.from(), c.to());
        match to {
            Stage::ProcessStarting | Stage::WaitingForHttp if matches!(from, Stage::Stopped | Stage::Failed) => {
                self.started.insert(key, at_ms);
            }
            Stage::Ready => {
                if let Some(start) = self.started.remove(&key) {
                    let seconds = (at_ms - start).max(0) as f64 / 1000.0;
                    let entry = self.durations.entry(key).or_default();
                    if let Some(i) = LOAD_BUCKETS.iter().position(|b| seconds <= *b) {
                        entry.0[i] += 1;
                    }
                    entry.1 += 1;
                    entry.2 += seconds;
                }
            }
            Stage::Failed => {
                self.started.remove(&key);
                *self.failures.entry(key).or_default() += 1;
            }
            _ => {}
        }
    }
}

/// Escapes a label value (backslash, quote, newline).
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The exposition text for `snapshot` and `loads` on `host`. Pure.
pub fn render(snapshot: &Snapshot, loads: &Loads, host: &str) -> String {
    let mut out = String::new();
    let h = label(host);
    let memory = snapshot.host.unwrap_or_default();
    family(&mut out, "proctor_host_memory_total_bytes", "gauge", "Host RAM.");
    let _ = writeln!(out, "proctor_host_memory_total_bytes{{host=\"{h}\"}} {}", memory.total_bytes);
    family(&mut out, "proctor_host_memory_available_bytes", "gauge", "Host MemAvailable.");
    let _ = writeln!(out, "proctor_host_memory_available_bytes{{host=\"{h}\"}} {}", memory.available_bytes);
    render_services(&mut out, snapshot, &h);
    render_models(&mut out, snapshot, &h);
    render_loads(&mut out, loads, &h);
    render_gpus(&mut out, snapshot, &h);
    out
}

/// A gauge family: name, help, and how to read it off one item.
type Gauge<T> = (&'static str, &'static str, fn(&T) -> f64);

fn render_services(out: &mut String, snapshot: &Snapshot, h: &str) {
    let gauges: [Gauge<proto::ServiceState>; 4] = [
        ("proctor_service_up", "1 while the service's process runs.", |s| f64::from(u8::from(s.running))),
        ("proctor_service_rss_bytes", "RSS of the service's process tree.", |s| s.rss_bytes as f64),
        ("proctor_service_cgroup_bytes", "Memory charged to the service's cgroup.", |s| s.cgroup_bytes as f64),
        ("proctor_service_gpu_memory_bytes", "GPU memory of the service's processes.", |s| s.gpu_bytes as f64),
    ];
    for (name, help, value) in gauges {
        family(out, name, "gauge", help);
        for s in &snapshot.services {
            let _ = writeln!(out, "{name}{{host=\"{h}\",service=\"{}\"}} {}", label(&s.name), value(s));
        }
    }
    family(out, "proctor_service_leased", "gauge", "1 while a run holds the service's lease.");
    for s in &snapshot.services {
        let held = snapshot.leases.iter().any(|l| l.service == s.name);
        let _ =
            writeln!(out, "proctor_service_leased{{host=\"{h}\",service=\"{}\"}} {}", label(&s.name), u8::from(held));
    }
}

fn render_models(out: &mut String, snapshot: &Snapshot, h: &str) {
    let stages: Vec<Stage> =
        std::iter::once(Stage::Stopped).chain(Stage::LOADING).chain([Stage::Ready, Stage::Failed]).collect();
    family(out, "proctor_model_stage", "gauge", "1 for the model's current stage, 0 for the others.");
    for s in &snapshot.services {
        for m in &s.models {
            for &stage in &stages {
                let _ = writeln!(
                    out,
                    "proctor_model_stage{{host=\"{h}\",service=\"{}\",model=\"{}\",stage=\"{}\"}} {}",
                    label(&s.name),
                    label(&m.name),
                    stage.label(),
                    u8::from(m.stage() == stage)
                );
            }
        }
    }
    family(out, "proctor_model_progress_ratio", "gauge", "Reported load progress, 0 to 1.");
    for s in &snapshot.services {
        for m in &s.models {
            let _ = writeln!(
                out,
                "proctor_model_progress_ratio{{host=\"{h}\",service=\"{}\",model=\"{}\"}} {}",
                label(&s.name),
                label(&m.name),
                m.progress
            );
        }
    }
}

fn render_loads(out: &mut String, loads: &Loads, h: &str) {
    let name = "proctor_model_load_duration_seconds";
    family(out, name, "histogram", "Time from a load's start to READY.");
    for ((service, model), (buckets, count, sum)) in &loads.durations {
        let labels = format!("host=\"{h}\",service=\"{}\",model=\"{}\"", label(service), label(model));
        let mut cumulative = 0;
        for (bound, n) in LOAD_BUCKETS.iter().zip(buckets) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}\n{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
    family(out, "proctor_model_load_failures_total", "counter", "Loads that ended FAILED.");
    for ((service, model), n) in &loads.failures {
        let _ = writeln!(
            out,
            "proctor_model_load_failures_total{{host=\"{h}\",service=\"{}\",model=\"{}\"}} {n}",
            label(service),
            label(model)
        );
    }
}

fn render_gpus(out: &mut String, snapshot: &Snapshot, h: &str) {
    let gauges: [Gauge<proto::GpuDevice>; 5] = [
        ("proctor_gpu_memory_used_bytes", "GPU memory in use.", |g| g.memory_used_bytes as f64),
        ("proctor_gpu_memory_total_bytes", "GPU memory.", |g| g.memory_total_bytes as f64),
        ("proctor_gpu_utilization_ratio", "GPU utilisation, 0 to 1.", |g| f64::from(g.utilization_percent) / 100.0),
        ("proctor_gpu_temperature_celsius", "GPU temperature.", |g| f64::from(g.temperature_celsius)),
        ("proctor_gpu_power_watts", "GPU power draw.", |g| f64::from(g.power_milliwatts) / 1000.0),
    ];
    for (name, help, value) in gauges {
        family(out, name, "gauge", help);
        for g in &snapshot.gpus {
            let _ =
                writeln!(out, "{name}{{host=\"{h}\",gpu=\"{}\",name=\"{}\"}} {}", g.index, label(&g.name), value(g));
        }
    }
}

/// Follows the journal into `loads` until cancelled.
async fn follow(journal: Journal, loads: Arc<Mutex<Loads>>, cancel: CancellationToken) {
    let Ok(mut sub) = journal.subscribe(u64::MAX).await else { return };
    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => return,
            m = sub.live.recv() => m,
        };
        let Some(message) = message else { return };
        if let Some(watch_message::Kind::Event(e)) = message.kind
            && let Some(event::Kind::StageChanged(c)) = &e.kind
        {
            loads.lock().unwrap_or_else(std::sync::PoisonError::into_inner).observe(c, e.time_unix_ms);
        }
    }
}

/// Serves `GET /metrics` on `listener` until cancelled (HTTP/1.1, one
/// answer per connection).
pub async fn serve(listener: TcpListener, journal: Journal, host: String, cancel: CancellationToken) {
    let loads = Arc::new(Mutex::new(Loads::default()));
    tokio::spawn(follow(journal.clone(), loads.clone(), cancel.clone()));
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((mut conn, _)) = accepted else { continue };
        let (journal, loads, host) = (journal.clone(), loads.clone(), host.clone());
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let n = conn.read(&mut request).await.unwrap_or(0);
            let wanted = request[..n].starts_with(b"GET /metrics ") || request[..n].starts_with(b"GET /metrics?");
            let (status, body) = match journal.snapshot().await {
                Ok(snapshot) if wanted => {
                    let loads = loads.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
                    ("200 OK", render(&snapshot, &loads, &host))
                }
                Ok(_) => ("404 Not Found", "try /metrics\n".to_owned()),
                Err(_) => ("503 Service Unavailable", "the agent is shutting down\n".to_owned()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(from: Stage, to: Stage) -> proto::StageChanged {
        proto::StageChanged {
            service: "translation".into(),
            model: "nllb".into(),
            from: from.into(),
            to: to.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_load_is_timed_from_its_start_to_ready_and_a_failure_is_counted() {
        let mut loads = Loads::default();
        // (from, to, at ms)
        let steps = [
            (Stage::Stopped, Stage::ProcessStarting, 0),
            (Stage::ProcessStarting, Stage::WaitingForHttp, 100),
            (Stage::WaitingForHttp, Stage::LoadingWeights, 2_000),
            (Stage::LoadingWeights, Stage::Ready, 12_000),
            (Stage::Ready, Stage::Stopped, 20_000),
            (Stage::Stopped, Stage::ProcessStarting, 21_000),
            (Stage::LoadingWeights, Stage::Failed, 25_000),
            (Stage::Failed, Stage::WaitingForHttp, 30_000),
            (Stage::WaitingForHttp, Stage::Ready, 30_500),
        ];
        for (from, to, at) in steps {
            loads.observe(&change(from, to), at);
        }
        let key = ("translation".to_owned(), "nllb".to_owned());
        let (buckets, count, sum) = loads.durations[&key];
        assert_eq!((count, sum), (2, 12.5), "12 s and 0.5 s");
        assert_eq!(buckets[0], 1, "0.5 s is in the first bucket");
        assert_eq!(buckets[2], 1, "12 s is in the 15 s bucket");
        assert_eq!(loads.failures[&key], 1);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
