//! The HTTP API of the translation service contract (DESIGN §3).

use std::collections::BTreeMap;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::model::{self, ModelView, Shared, Status};

#[derive(Clone)]
pub struct AppState {
    pub models: std::sync::Arc<BTreeMap<String, Shared>>,
    /// Fault: delay every /translate answer.
    pub slow: Option<std::time::Duration>,
    /// Fault: every health answer (either protocol) burns this much CPU and
    /// writes an access-log line, as a heavy health handler behind uvicorn would.
    pub costly_health: Option<std::time::Duration>,
    /// Fault: a stall of every /translate answer, once.
    pub stall: Option<Stall>,
}

/// `length` long, starting `after` the first /translate request.
#[derive(Clone)]
pub struct Stall {
    pub after: std::time::Duration,
    pub length: std::time::Duration,
    pub first: std::sync::Arc<std::sync::OnceLock<tokio::time::Instant>>,
}

impl Stall {
    /// Holds a request that arrives during the stall until its end.
    async fn hold(&self) {
        let first = *self.first.get_or_init(tokio::time::Instant::now);
        let (from, to) = (first + self.after, first + self.after + self.length);
        let now = tokio::time::Instant::now();
        if now >= from && now < to {
            tokio::time::sleep_until(to).await;
        }
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/translate", post(translate))
        .route("/detect", post(detect))
        .route("/models", get(models))
        .route("/models/{name}/load", post(load))
        .route("/models/{name}/unload", post(unload))
        .route("/v2/health/live", get(v2_live))
        .route("/v2/models/{name}/ready", get(v2_ready))
        .with_state(state)
}

fn error(status: StatusCode, detail: impl Into<String>) -> Response {
    (status, Json(json!({ "detail": detail.into() }))).into_response()
}

fn views(state: &AppState) -> BTreeMap<String, ModelView> {
    state.models.iter().map(|(name, m)| (name.clone(), m.lock().expect("model lock").view.clone())).collect()
}

/// The `costly_health` fault: spin (a handler doing real work), then log
/// the request like an access log.
fn health_cost(state: &AppState, path: &str) {
    let Some(cost) = state.costly_health else { return };
    let started = Instant::now();
    while started.elapsed() < cost {
        std::hint::spin_loop();
    }
    eprintln!("sim: \"GET {path} HTTP/1.1\" 200");
}

async fn health(State(state): State<AppState>) -> Json<Value> {
    health_cost(&state, "/health");
    let models = views(&state);
    let loaded = models.values().filter(|m| m.status == Status::Loaded).count();
    let status = if models.values().any(|m| m.status == Status::Failed) {
        "degraded"
    } else if models.values().any(|m| m.status.is_loading()) {
        "loading"
    } else {
        "healthy"
    };
    Json(json!({ "status": status, "models_loaded": loaded, "models": models }))
}

/// KServe v2 liveness: the server answers.
async fn v2_live(State(state): State<AppState>) -> StatusCode {
    health_cost(&state, "/v2/health/live");
    StatusCode::OK
}

/// KServe v2 model readiness: 200 once loaded, 400 before (as MLServer does).
async fn v2_ready(State(state): State<AppState>, Path(name): Path<String>) -> StatusCode {
    health_cost(&state, &format!("/v2/models/{name}/ready"));
    match state.models.get(&name).map(|m| m.lock().expect("model lock").view.status) {
        Some(Status::Loaded) => StatusCode::OK,
        Some(_) => StatusCode::BAD_REQUEST,
        None => StatusCode::NOT_FOUND,
    }
}

#[derive(Deserialize)]
struct TranslateRequest {
    text: String,
    source_lang: String,
    target_lang: String,
    model: String,
}

/// Logs the caller's W3C trace context, as an instrumented service would
/// attach its spans to it.
fn log_trace(path: &str, headers: &HeaderMap) {
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        eprintln!("sim: {path} traceparent={tp}");
    }
}

async fn translate(State(state): State<AppState>, headers: HeaderMap, Json(req): Json<TranslateRequest>) -> Response {
    log_trace("/translate", &headers);
    let started = Instant::now();
    if let Some(delay) = state.slow {
        tokio::time::sleep(delay).await;
    }
    if let Some(stall) = &state.stall {
        stall.hold().await;
    }
    let Some(model) = state.models.get(&req.model) else {
        let known: Vec<&String> = state.models.keys().collect();
        return error(StatusCode::NOT_FOUND, format!("unknown model '{}'; this service has {known:?}", req.model));
    };
    let status = model.lock().expect("model lock").view.status;
    if status != Status::Loaded {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("model '{}' is not ready (status: {})", req.model, json!(status).as_str().unwrap_or("?")),
        );
    }
    let translated = crate::text::translate(&req.text, &req.source_lang, &req.target_lang);
    Json(json!({
        "translated_text": translated,
        "model": req.model,
        "source_lang": req.source_lang,
        "target_lang": req.target_lang,
        "processing_time_ms": started.elapsed().as_secs_f64() * 1000.0,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct DetectRequest {
    text: String,
}

async fn detect(headers: HeaderMap, Json(req): Json<DetectRequest>) -> Response {
    log_trace("/detect", &headers);
    match crate::text::detect(&req.text) {
        Some((language, confidence)) => Json(json!({ "language": language, "confidence": confidence })).into_response(),
        None => {
            error(StatusCode::UNPROCESSABLE_ENTITY, "could not detect a language: text too short or unknown script")
        }
    }
}

async fn models(State(state): State<AppState>) -> Json<Value> {
    let list: Vec<Value> = state
        .models
        .values()
        .map(|m| {
            let m = m.lock().expect("model lock");
            json!({
                "name": m.spec.name,
                "status": m.view.status,
                "progress": m.view.progress,
                "size_mb": m.spec.size_mb,
                "gated": m.spec.gated,
                "resident_bytes": m.resident_bytes(),
            })
        })
        .collect();
    Json(json!({ "models": list }))
}

async fn load(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match state.models.get(&name) {
        Some(m) => {
            let started = model::start_loading(m);
            (StatusCode::ACCEPTED, Json(json!({ "model": name, "started": started }))).into_response()
        }
        None => error(StatusCode::NOT_FOUND, format!("unknown model '{name}'")),
    }
}

async fn unload(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match state.models.get(&name) {
        Some(m) => {
            model::unload(m);
            Json(json!({ "model": name, "status": "not_loaded" })).into_response()
        }
        None => error(StatusCode::NOT_FOUND, format!("unknown model '{name}'")),
    }
}
