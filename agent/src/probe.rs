//! Readiness probing: the `health-json` protocol (DESIGN §3) polled with an
//! adaptive interval, and the pure mapping from a health payload to a stage.

use std::time::Duration;

use proto::Stage;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// First poll interval after a change; doubles up to the ceiling while
/// nothing changes, and snaps back on every change.
pub const FAST_POLL: Duration = Duration::from_millis(20);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes of a health payload kept for failure messages.
pub const PAYLOAD_EXCERPT: usize = 1024;

/// What one model looks like in a health payload.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelHealth {
    /// The service's own word for the status, e.g. `downloading`.
    pub status: String,
    /// Mapped stage; `None` for statuses outside the map (`not_loaded`).
    pub stage: Option<Stage>,
    pub progress: f64,
    pub error: Option<String>,
}

/// The default `health-json` status map (DESIGN §3).
pub fn map_status(status: &str) -> Option<Stage> {
    Some(match status {
        "authenticating" => Stage::Authenticating,
        "downloading" => Stage::Downloading,
        "loading" => Stage::LoadingWeights,
        "warming_up" => Stage::WarmingUp,
        "loaded" => Stage::Ready,
        "failed" => Stage::Failed,
        _ => return None,
    })
}

/// Reads one model's status from a `/health` payload (`/models/<name>/…`).
pub fn model_health(payload: &Value, model: &str) -> Option<ModelHealth> {
    let m = payload.get("models")?.get(model)?;
    let status = m.get("status")?.as_str()?.to_owned();
    Some(ModelHealth {
        stage: map_status(&status),
        progress: m.get("progress").and_then(Value::as_f64).unwrap_or(0.0).clamp(0.0, 1.0),
        error: m.get("error").and_then(Value::as_str).map(str::to_owned),
        status,
    })
}

/// One probe's outcome.
#[derive(Debug)]
pub enum Observation {
    /// The service answered: HTTP status and body.
    Answered { status: u16, body: Vec<u8> },
    /// No HTTP answer (not listening yet, reset, timeout).
    NoAnswer(String),
}

/// Polls `url` until cancelled, sending every observation to `tx`.
pub async fn poll(
    url: String,
    ceiling: Duration,
    generation: u64,
    tx: mpsc::UnboundedSender<(u64, Observation)>,
    cancel: CancellationToken,
) {
    let client = reqwest::Client::builder().timeout(PROBE_TIMEOUT).build().unwrap_or_default();
    let mut interval = FAST_POLL;
    let mut last: Option<Vec<u8>> = None;
    loop {
        let observation = match client.get(&url).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                match r.bytes().await {
                    Ok(b) => Observation::Answered { status, body: b.to_vec() },
                    Err(e) => Observation::NoAnswer(e.to_string()),
                }
            }
            Err(e) => Observation::NoAnswer(if e.is_connect() { "connection refused".into() } else { e.to_string() }),
        };
        let body = match &observation {
            Observation::Answered { body, .. } => Some(body.clone()),
            Observation::NoAnswer(_) => None,
        };
        interval = if body != last { FAST_POLL } else { (interval * 2).min(ceiling) };
        last = body;
        if tx.send((generation, observation)).is_err() {
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn maps_each_contract_status() {
        let table = [
            ("not_loaded", None),
            ("authenticating", Some(Stage::Authenticating)),
            ("downloading", Some(Stage::Downloading)),
            ("loading", Some(Stage::LoadingWeights)),
            ("warming_up", Some(Stage::WarmingUp)),
            ("loaded", Some(Stage::Ready)),
            ("failed", Some(Stage::Failed)),
            ("exploded", None),
        ];
        for (status, stage) in table {
            assert_eq!(map_status(status), stage, "{status}");
        }
    }

    #[test]
    fn reads_a_model_out_of_a_health_payload() {
        let payload = json!({"status": "degraded", "models_loaded": 1, "models": {
            "nllb": {"status": "loaded", "progress": 1.0, "error": null},
            "aya": {"status": "failed", "progress": 0.1, "error": "authentication failed"}}});
        let aya = model_health(&payload, "aya").unwrap();
        assert_eq!(aya.stage, Some(Stage::Failed));
        assert_eq!(aya.error.as_deref(), Some("authentication failed"));
        assert_eq!(model_health(&payload, "nllb").unwrap().stage, Some(Stage::Ready));
        assert_eq!(model_health(&payload, "missing"), None);
    }
}
