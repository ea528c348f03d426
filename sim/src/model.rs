//! One simulated model's life: authenticate, download, load (allocating and
//! touching real memory step by step), warm up, serve; with injected faults.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::spec::{ModelSpec, SimStage};

/// Per-model status as `/health` reports it (DESIGN §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    NotLoaded,
    Authenticating,
    Downloading,
    Loading,
    WarmingUp,
    Loaded,
    Failed,
}

impl Status {
    fn of(stage: SimStage) -> Self {
        match stage {
            SimStage::Authenticating => Status::Authenticating,
            SimStage::Downloading => Status::Downloading,
            SimStage::Loading => Status::Loading,
            SimStage::WarmingUp => Status::WarmingUp,
        }
    }

    pub fn is_loading(self) -> bool {
        matches!(self, Status::Authenticating | Status::Downloading | Status::Loading | Status::WarmingUp)
    }
}

/// What `/health` shows of one model.
#[derive(Clone, Debug, Serialize)]
pub struct ModelView {
    pub status: Status,
    pub progress: f64,
    pub error: Option<String>,
}

/// Mutable state of one model. The loader task is its only writer besides
/// unload; the HTTP handlers read it.
#[derive(Debug)]
pub struct Model {
    pub spec: ModelSpec,
    pub view: ModelView,
    /// The weights: real, touched memory.
    memory: Vec<Vec<u8>>,
    /// Bumped on every load/unload so a stale loader stops writing.
    generation: u64,
}

pub type Shared = Arc<Mutex<Model>>;

impl Model {
    pub fn new(spec: ModelSpec) -> Shared {
        Arc::new(Mutex::new(Model {
            spec,
            view: ModelView { status: Status::NotLoaded, progress: 0.0, error: None },
            memory: Vec::new(),
            generation: 0,
        }))
    }

    pub fn resident_bytes(&self) -> usize {
        self.memory.iter().map(Vec::len).sum()
    }
}

/// Releases the model's memory and marks it not loaded.
pub fn unload(model: &Shared) {
    let mut m = model.lock().expect("model lock");
    m.generation += 1;
    m.memory = Vec::new();
    m.view = ModelView { status: Status::NotLoaded, progress: 0.0, error: None };
}

/// Starts loading unless already loaded or loading. Returns false if it was.
pub fn start_loading(model: &Shared) -> bool {
    let generation = {
        let mut m = model.lock().expect("model lock");
        if m.view.status == Status::Loaded || m.view.status.is_loading() {
            return false;
        }
        m.generation += 1;
        m.memory = Vec::new();
        m.view = ModelView { status: Status::NotLoaded, progress: 0.0, error: None };
        m.generation
    };
    tokio::spawn(load(model.clone(), generation));
    true
}

const STEP: Duration = Duration::from_millis(100);
/// At most this much is written to disk while "downloading" a model.
const DOWNLOAD_CAP_MB: u64 = 64;

fn unix_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

/// A scratch file the download stage writes to, removed when done.
struct Download {
    file: Option<std::fs::File>,
    path: std::path::PathBuf,
}

impl Download {
    fn new(model: &str) -> Download {
        let path = std::env::temp_dir().join(format!("proctor-sim-{}-{model}.download", std::process::id()));
        Download { file: std::fs::File::create(&path).ok(), path }
    }

    fn write(&mut self, bytes: usize) {
        use std::io::Write;
        if let Some(f) = &mut self.file {
            let _ = f.write_all(&vec![7u8; bytes]);
        }
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn load(model: Shared, generation: u64) {
    let spec = model.lock().expect("model lock").spec.clone();
    let total = (spec.auth + spec.download + spec.load + spec.warmup).as_secs_f64().max(1e-3);
    let mut done = Duration::ZERO;
    let stages = [
        (SimStage::Authenticating, if spec.gated { spec.auth } else { Duration::ZERO }),
        (SimStage::Downloading, spec.download),
        (SimStage::Loading, spec.load),
        (SimStage::WarmingUp, spec.warmup),
    ];
    for (stage, length) in stages {
        if stage == SimStage::Authenticating && !spec.gated {
            continue;
        }
        if !set(&model, generation, |m| {
            m.view.status = Status::of(stage);
        }) {
            return;
        }
        tracing::info!(model = %spec.name, stage = stage.as_str(), "stage started");
        if spec.hang_at == Some(stage) {
            eprintln!("sim: injected hang: model {} at stage {}", spec.name, stage.as_str());
            std::future::pending::<()>().await;
        }
        // Work through the stage in steps so progress and memory move.
        let steps = (length.as_millis() / STEP.as_millis()).max(1) as u64;
        let chunk = (spec.size_mb * 1024 * 1024 / steps) as usize;
        let mut download = (stage == SimStage::Downloading && spec.download_io).then(|| Download::new(&spec.name));
        let download_chunk = (spec.size_mb.min(DOWNLOAD_CAP_MB) * 1024 * 1024 / steps) as usize;
        let started = Instant::now();
        for step in 1..=steps {
            if let Some(d) = &mut download {
                d.write(download_chunk);
            }
            tokio::time::sleep_until(started + length.mul_f64(step as f64 / steps as f64)).await;
            // A crash comes halfway through its stage, as a real one would
            // (out of memory mid-load, a corrupt shard), not at its border.
            if spec.crash_at == Some(stage) && step * 2 >= steps {
                eprintln!(
                    "sim: injected crash: model {} in stage {} at_unix_ms={}",
                    spec.name,
                    stage.as_str(),
                    unix_ms()
                );
                std::process::exit(3);
            }
            let progress = (done + length.mul_f64(step as f64 / steps as f64)).as_secs_f64() / total;
            let report = spec.report_progress;
            if !set(&model, generation, |m| {
                if report {
                    m.view.progress = progress.min(1.0);
                }
                if stage == SimStage::Loading {
                    // vec![1; n] writes every byte, so the pages are resident.
                    m.memory.push(vec![1u8; chunk]);
                }
            }) {
                return;
            }
        }
        done += length;
        if stage == SimStage::Authenticating && !token_given(&model, generation, &spec.name) {
            return;
        }
    }
    set(&model, generation, |m| {
        m.view.status = Status::Loaded;
        m.view.progress = 1.0;
    });
    // Readiness-lag benchmarks compare this stamp with when READY arrives.
    println!("sim: model {} loaded at_unix_ms={}", spec.name, unix_ms());
    tracing::info!(model = %spec.name, "model loaded");
}

/// Whether HF_TOKEN is set; if not, the gated model's load has failed.
fn token_given(model: &Shared, generation: u64, name: &str) -> bool {
    if std::env::var("HF_TOKEN").is_ok_and(|t| !t.trim().is_empty()) {
        return true;
    }
    let error = format!(
        "authentication failed: model '{name}' is gated and HF_TOKEN is not set; \
         give the service a Hugging Face token with access to it"
    );
    eprintln!("sim: {error}");
    set(model, generation, |m| {
        m.view.status = Status::Failed;
        m.view.error = Some(error);
    });
    false
}

/// Applies `f` if the model has not been reloaded or unloaded meanwhile.
fn set(model: &Shared, generation: u64, f: impl FnOnce(&mut Model)) -> bool {
    let mut m = model.lock().expect("model lock");
    if m.generation != generation {
        return false;
    }
    f(&mut m);
    true
}
