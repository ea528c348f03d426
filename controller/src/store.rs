//! The run store: a memory of every run — its events as they arrived (so a
//! run can be told again, even one whose controller was killed), and the rows
//! queries need (runs, cases, model loads and their stages, baselines) — in a
//! SQLite file (default, one per user) or a PostgreSQL database a lab's
//! runners share. `db` is the only code that speaks SQL to either;
//! `schema` its versioned migrations; `baseline` and `trends` the pure
//! judgements made from what is stored.

pub mod baseline;
mod db;
pub mod schema;
pub mod trends;

use std::path::{Path, PathBuf};

use tokio::sync::Mutex;

use crate::report::{CaseReport, ModelLoad, Outcome, RunReport};
use crate::run::events::{RunEvent, SuiteInfo};
use db::{Db, Row, Statement, Val};

/// Where the store lives. `Debug` and `Display` hide a URL's password.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(String),
}

/// The environment variable naming the store (`--store` beats it).
pub const STORE_ENV: &str = "PROCTOR_STORE";

impl Location {
    /// `postgres://…` / `postgresql://…`, else a file path.
    pub fn parse(text: &str) -> Result<Location, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("the store is empty: give a file path or a postgres:// URL (or --no-store)".into());
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            let needs_tls = ["sslmode=require", "sslmode=verify-ca", "sslmode=verify-full"];
            if needs_tls.iter().any(|m| text.contains(m)) {
                return Err(format!(
                    "{}: TLS to PostgreSQL is not supported yet; reach the server over a private network or a \
                     local socket tunnel with sslmode=disable (or prefer)",
                    Location::Postgres(text.to_owned())
                ));
            }
            return Ok(Location::Postgres(text.to_owned()));
        }
        if text.contains("://") {
            return Err(format!("{:?} is not a store: give a file path or a postgres:// URL", hide_password(text)));
        }
        Ok(Location::Sqlite(PathBuf::from(text)))
    }

    /// The default: `$XDG_DATA_HOME/proctor/runs.sqlite`, else
    /// `~/.local/share/proctor/runs.sqlite`.
    pub fn default_sqlite() -> Option<PathBuf> {
        let data = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()).map(PathBuf::from).or_else(|| {
            std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| Path::new(&h).join(".local/share"))
        })?;
        Some(data.join("proctor").join("runs.sqlite"))
    }
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Location({self})")
    }
}

/// Shown without the password of a URL.
impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "{}", p.display()),
            Location::Postgres(url) => f.write_str(&hide_password(url)),
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (auth, tail) = match rest.split_once('@') {
        Some((a, t)) => (a, t),
        None => return hide_query_password(url),
    };
    let auth = match auth.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => auth.to_owned(),
    };
    hide_query_password(&format!("{scheme}://{auth}@{tail}"))
}

fn hide_query_password(url: &str) -> String {
    let Some((head, query)) = url.split_once('?') else { return url.to_owned() };
    let query: Vec<String> = query
        .split('&')
        .map(|kv| if kv.starts_with("password=") { "password=***".to_owned() } else { kv.to_owned() })
        .collect();
    format!("{head}?{}", query.join("&"))
}

#[derive(Debug, thiserror::Error)]
#[error("run store {location}: {message}")]
pub struct StoreError {
    pub location: String,
    pub message: String,
    /// The run asked for is not there (or the id names several): bad input.
    pub no_such_run: bool,
}

/// One run as `proctor runs list` shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RunRow {
    pub id: String,
    pub started_unix_ms: i64,
    /// `None`: the controller never finished it (killed, or still running).
    pub finished_unix_ms: Option<i64>,
    /// `running` (or partial), `passed`, `failed`, `errors`, `interrupted`, `regressed`.
    pub status: String,
    pub controller: String,
    pub suites: String,
    pub cases: i64,
    pub passed: i64,
    pub failed: i64,
    pub errors: i64,
    pub regressions: i64,
}

impl RunRow {
    /// Never finished: what it holds is what arrived before its controller stopped.
    pub fn partial(&self) -> bool {
        self.finished_unix_ms.is_none()
    }
}

/// A finished model load as stored.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LoadRow {
    pub run_id: String,
    pub host: String,
    pub service: String,
    pub model: String,
    pub outcome: String,
    pub load_ms: i64,
    pub at_unix_ms: i64,
}

/// A load case's figures in one run.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LoadResultRow {
    pub run_id: String,
    pub suite: String,
    pub name: String,
    pub host: String,
    pub rps: i64,
    pub p99_us: i64,
    pub at_unix_ms: i64,
}

/// A case's result in one run.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CaseRow {
    pub run_id: String,
    pub suite: String,
    pub name: String,
    pub outcome: String,
    pub reruns: i64,
    pub at_unix_ms: i64,
}

#[derive(Debug)]
pub struct Store {
    location: Location,
    db: Mutex<Db>,
}

const RUN_COLUMNS: &str =
    "id, started_unix_ms, finished_unix_ms, status, controller, suites, cases, passed, failed, errors, regressions";

fn run_row(r: &Row) -> RunRow {
    RunRow {
        id: r.text(0),
        started_unix_ms: r.int(1),
        finished_unix_ms: r.opt_int(2),
        status: r.text(3),
        controller: r.text(4),
        suites: r.text(5),
        cases: r.int(6),
        passed: r.int(7),
        failed: r.int(8),
        errors: r.int(9),
        regressions: r.int(10),
    }
}

impl Store {
    /// Opens (creating where it can) and migrates the store.
    pub async fn open(location: &Location) -> Result<Store, StoreError> {
        let fail = |message: String| StoreError { location: location.to_string(), message, no_such_run: false };
        let mut db = match location {
            Location::Sqlite(path) => Db::sqlite(path).map_err(fail)?,
            Location::Postgres(url) => Db::postgres(url).await.map_err(|e| fail(hide_password(&e)))?,
        };
        schema::migrate(&mut db).await.map_err(fail)?;
        Ok(Store { location: location.clone(), db: Mutex::new(db) })
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    fn fail(&self, message: String) -> StoreError {
        StoreError { location: self.location.to_string(), message, no_such_run: false }
    }

    async fn write(&self, statements: &[Statement]) -> Result<(), StoreError> {
        self.db.lock().await.transaction(statements).await.map_err(|e| self.fail(e))
    }

    async fn query(&self, sql: &str, params: &[Val]) -> Result<Vec<Row>, StoreError> {
        self.db.lock().await.query(sql, params).await.map_err(|e| self.fail(e))
    }

    /// The statements that record one event (its place in the log, and the
    /// rows queries read).
    fn statements(run: &RunLog, seq: i64, at: i64, event: &RunEvent) -> Result<Vec<Statement>, String> {
        let value = serde_json::to_value(event).map_err(|e| format!("cannot encode an event: {e}"))?;
        let kind = value.get("event").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
        let body = value.to_string();
        let mut out: Vec<Statement> = Vec::new();
        if let RunEvent::Started { run_id, suites, .. } = event {
            let names: Vec<&str> = suites.iter().map(|s| s.name.as_str()).collect();
            out.push((
                "INSERT INTO runs (id, started_unix_ms, status, controller, suites) VALUES ($1, $2, 'running', $3, $4)",
                vec![run_id.as_str().into(), at.into(), run.controller.as_str().into(), names.join(", ").into()],
            ));
        }
        out.push((
            "INSERT INTO run_events (run_id, seq, at_unix_ms, kind, body) VALUES ($1, $2, $3, $4, $5)",
            vec![run.id.as_str().into(), seq.into(), at.into(), kind.into(), body.into()],
        ));
        match event {
            RunEvent::CaseFinished { suite, report, .. } => out.extend(case_statements(run, *suite, report, at)),
            RunEvent::ModelSettled { suite, load, .. } => {
                let suite = run.suites.get(*suite).map(|s| s.name.as_str()).unwrap_or_default();
                out.extend(load_statements(&run.id, seq, suite, load, at));
            }
            _ => {}
        }
        Ok(out)
    }

    /// Marks a run finished with its verdict and counts.
    pub async fn finish_run(&self, report: &RunReport) -> Result<(), StoreError> {
        let counts = report.counts();
        let regressions = report.regressions();
        let status = report.verdict().to_lowercase();
        let statement: Statement = (
            "UPDATE runs SET finished_unix_ms = $2, status = $3, cases = $4, passed = $5, failed = $6, errors = $7, \
             regressions = $8 WHERE id = $1",
            vec![
                report.run_id.as_str().into(),
                crate::client::now_unix_ms().into(),
                status.into(),
                (report.cases.len() as u64).into(),
                (counts.passed as u64).into(),
                (counts.failed as u64).into(),
                (counts.errors as u64).into(),
                (regressions as u64).into(),
            ],
        );
        self.write(&[statement]).await
    }

    /// The newest runs first.
    pub async fn runs(&self, limit: usize) -> Result<Vec<RunRow>, StoreError> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY started_unix_ms DESC, id LIMIT $1");
        let rows = self.query(&sql, &[(limit as u64).into()]).await?;
        Ok(rows.iter().map(run_row).collect())
    }

    /// A run by id, unique start of an id (any case), or `latest`.
    pub async fn run(&self, which: &str) -> Result<RunRow, StoreError> {
        let wanted = which.trim().to_lowercase();
        let rows: Vec<RunRow> = if wanted == "latest" {
            self.runs(1).await?
        } else {
            let exact = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1");
            let found: Vec<RunRow> = self.query(&exact, &[wanted.as_str().into()]).await?.iter().map(run_row).collect();
            if found.is_empty() {
                let prefix = format!(
                    "SELECT {RUN_COLUMNS} FROM runs WHERE substr(lower(id), 1, length($1)) = $1 \
                     ORDER BY started_unix_ms DESC LIMIT 3"
                );
                self.query(&prefix, &[wanted.as_str().into()]).await?.iter().map(run_row).collect()
            } else {
                found
            }
        };
        let missing = |message: String| StoreError { no_such_run: true, ..self.fail(message) };
        match rows.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(missing(format!("no run {which:?} (see `proctor runs list`)"))),
            _ => Err(missing(format!("{which:?} names more than one run: give more of its id"))),
        }
    }

    /// A run's events, in order, with when each arrived.
    pub async fn events(&self, run_id: &str) -> Result<Vec<(i64, RunEvent)>, StoreError> {
        let rows = self
            .query("SELECT at_unix_ms, body FROM run_events WHERE run_id = $1 ORDER BY seq", &[run_id.into()])
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        let mut unread = 0;
        for r in &rows {
            // An event this build cannot read (a newer controller wrote it)
            // is left out rather than losing the whole run — and said.
            match serde_json::from_str::<RunEvent>(&r.text(1)) {
                Ok(event) => out.push((r.int(0), event)),
                Err(_) => unread += 1,
            }
        }
        if unread > 0 {
            tracing::warn!(
                run = run_id,
                unread,
                "events of this run could not be read (written by a newer Proctor?); the run is told without them"
            );
        }
        Ok(out)
    }

    /// Finished loads (outcome `ready`) of the newest `runs` runs, oldest
    /// first, optionally of one model.
    pub async fn loads(&self, runs: usize, model: Option<&str>) -> Result<Vec<LoadRow>, StoreError> {
        let sql = "SELECT l.run_id, l.host, l.service, l.model, l.outcome, l.load_ms, l.at_unix_ms \
                   FROM model_loads l JOIN (SELECT id FROM runs ORDER BY started_unix_ms DESC LIMIT $1) r \
                   ON r.id = l.run_id WHERE l.outcome = 'ready' AND ($2 = '' OR l.model = $2) \
                   ORDER BY l.at_unix_ms, l.seq";
        let rows = self.query(sql, &[(runs as u64).into(), model.unwrap_or_default().into()]).await?;
        Ok(rows
            .iter()
            .map(|r| LoadRow {
                run_id: r.text(0),
                host: r.text(1),
                service: r.text(2),
                model: r.text(3),
                outcome: r.text(4),
                load_ms: r.int(5),
                at_unix_ms: r.int(6),
            })
            .collect())
    }

    /// Case results of the newest `runs` runs (the same runs `loads` reads), oldest first.
    pub async fn case_history(&self, runs: usize) -> Result<Vec<CaseRow>, StoreError> {
        let sql = "SELECT c.run_id, c.suite, c.name, c.outcome, c.reruns, c.at_unix_ms FROM case_results c \
                   JOIN (SELECT id, started_unix_ms FROM runs ORDER BY started_unix_ms DESC LIMIT $1) r \
                   ON r.id = c.run_id ORDER BY r.started_unix_ms, c.suite, c.name";
        let rows = self.query(sql, &[(runs as u64).into()]).await?;
        Ok(rows
            .iter()
            .map(|r| CaseRow {
                run_id: r.text(0),
                suite: r.text(1),
                name: r.text(2),
                outcome: r.text(3),
                reruns: r.int(4),
                at_unix_ms: r.int(5),
            })
            .collect())
    }

    /// Every baseline entry.
    pub async fn baselines(&self) -> Result<Vec<baseline::Entry>, StoreError> {
        let rows = self
            .query(
                "SELECT host, service, model, stage, duration_ms, run_id, set_unix_ms FROM baselines \
                 ORDER BY host, service, model, stage",
                &[],
            )
            .await?;
        let mut entries: Vec<baseline::Entry> = rows
            .iter()
            .map(|r| baseline::Entry {
                key: baseline::Key { host: r.text(0), service: r.text(1), model: r.text(2) },
                stage: r.text(3),
                ms: r.int(4),
                run_id: r.text(5),
                set_unix_ms: r.int(6),
            })
            .collect();
        entries.sort_by_key(|e| (e.key.clone(), baseline::stage_rank(&e.stage)));
        Ok(entries)
    }

    /// Makes these entries the baseline of their (host, service, model):
    /// what was there for those models before is replaced as a whole.
    pub async fn set_baseline(&self, entries: &[baseline::Entry]) -> Result<(), StoreError> {
        let mut statements: Vec<Statement> = Vec::new();
        let mut keys: Vec<&baseline::Key> = entries.iter().map(|e| &e.key).collect();
        keys.dedup();
        for k in keys {
            statements.push((
                "DELETE FROM baselines WHERE host = $1 AND service = $2 AND model = $3",
                vec![k.host.as_str().into(), k.service.as_str().into(), k.model.as_str().into()],
            ));
        }
        for e in entries {
            statements.push((
                "INSERT INTO baselines (host, service, model, stage, duration_ms, run_id, set_unix_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                vec![
                    e.key.host.as_str().into(),
                    e.key.service.as_str().into(),
                    e.key.model.as_str().into(),
                    e.stage.as_str().into(),
                    e.ms.into(),
                    e.run_id.as_str().into(),
                    e.set_unix_ms.into(),
                ],
            ));
        }
        self.write(&statements).await
    }

    /// Every load case's baseline figures.
    pub async fn case_baselines(&self) -> Result<Vec<baseline::cases::CaseEntry>, StoreError> {
        let rows = self
            .query(
                "SELECT host, suite, name, metric, value, run_id, set_unix_ms, mode FROM load_baselines \
                 ORDER BY host, suite, name, metric DESC",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| baseline::cases::CaseEntry {
                key: baseline::cases::CaseKey { host: r.text(0), suite: r.text(1), case: r.text(2) },
                metric: r.text(3),
                value: r.int(4),
                run_id: r.text(5),
                set_unix_ms: r.int(6),
                mode: r.text(7),
            })
            .collect())
    }

    /// Makes these entries the baseline of their load cases (each case's
    /// figures replaced as a whole).
    pub async fn set_case_baseline(&self, entries: &[baseline::cases::CaseEntry]) -> Result<(), StoreError> {
        let mut statements: Vec<Statement> = Vec::new();
        let mut keys: Vec<&baseline::cases::CaseKey> = entries.iter().map(|e| &e.key).collect();
        keys.dedup();
        for k in keys {
            statements.push((
                "DELETE FROM load_baselines WHERE host = $1 AND suite = $2 AND name = $3",
                vec![k.host.as_str().into(), k.suite.as_str().into(), k.case.as_str().into()],
            ));
        }
        for e in entries {
            statements.push((
                "INSERT INTO load_baselines (host, suite, name, metric, value, run_id, set_unix_ms, mode) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                vec![
                    e.key.host.as_str().into(),
                    e.key.suite.as_str().into(),
                    e.key.case.as_str().into(),
                    e.metric.as_str().into(),
                    e.value.into(),
                    e.run_id.as_str().into(),
                    e.set_unix_ms.into(),
                    e.mode.as_str().into(),
                ],
            ));
        }
        self.write(&statements).await
    }

    /// Load cases' figures over the last `runs` runs, oldest first.
    pub async fn load_results(&self, runs: usize) -> Result<Vec<LoadResultRow>, StoreError> {
        let rows = self
            .query(
                "SELECT l.run_id, l.suite, l.name, l.host, l.rps, l.p99_us, l.at_unix_ms FROM load_results l \
                 JOIN (SELECT id FROM runs ORDER BY started_unix_ms DESC LIMIT $1) recent ON recent.id = l.run_id \
                 ORDER BY l.at_unix_ms",
                &[(runs as u64).into()],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| LoadResultRow {
                run_id: r.text(0),
                suite: r.text(1),
                name: r.text(2),
                host: r.text(3),
                rps: r.int(4),
                p99_us: r.int(5),
                at_unix_ms: r.int(6),
            })
            .collect())
    }

    /// Bytes the store's data takes: SQLite's pages (what the file holds
    /// once its WAL is checkpointed), PostgreSQL's tables with their indexes.
    pub async fn size_bytes(&self) -> Result<u64, StoreError> {
        match &self.location {
            Location::Sqlite(_) => {
                let sql = "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()";
                let rows = self.query(sql, &[]).await?;
                Ok(rows.first().map_or(0, |r| r.int(0)) as u64)
            }
            Location::Postgres(_) => {
                let sql = "SELECT CAST(SUM(pg_total_relation_size(c.oid)) AS BIGINT) FROM pg_class c \
                           JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' \
                           AND n.nspname = current_schema() AND c.relname IN \
                           ('runs', 'run_events', 'case_results', 'model_loads', 'load_stages', 'baselines', \
                           'proctor_migrations')";
                let rows = self.query(sql, &[]).await?;
                Ok(rows.first().map_or(0, |r| r.int(0)) as u64)
            }
        }
    }
}

fn outcome_word(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Passed => "passed",
        Outcome::Failed(_) => "failed",
        Outcome::Error(_) => "error",
    }
}

/// The first result of a case stays (the reporters keep the first too);
/// each test of a command case is a row of its own (`case :: test`).
fn case_statements(run: &RunLog, suite: usize, report: &CaseReport, at: i64) -> Vec<Statement> {
    let info = run.suites.get(suite);
    let suite = info.map(|s| s.name.clone()).unwrap_or_else(|| report.suite.clone());
    let row = |name: String, outcome: &str, duration_ms: u64| -> Statement {
        (
            "INSERT INTO case_results (run_id, suite, name, outcome, host, attempt, reruns, duration_ms, at_unix_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
            vec![
                run.id.as_str().into(),
                suite.as_str().into(),
                name.into(),
                outcome.into(),
                report.host.as_str().into(),
                u64::from(report.attempt).into(),
                (report.reruns.len() as u64).into(),
                duration_ms.into(),
                at.into(),
            ],
        )
    };
    let mut out = vec![row(report.name.clone(), outcome_word(&report.outcome), report.duration.as_millis() as u64)];
    for t in &report.tests {
        out.push(row(format!("{} :: {}", report.name, t.id()), &t.outcome, t.duration_ms));
    }
    if let Some(l) = &report.load {
        out.push((
            "INSERT INTO load_results (run_id, suite, name, host, requests, errors, rps, p50_us, p99_us, max_us, \
             at_unix_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING",
            vec![
                run.id.as_str().into(),
                suite.as_str().into(),
                report.name.as_str().into(),
                report.host.as_str().into(),
                l.requests.into(),
                l.errors.into(),
                (l.rps.round() as u64).into(),
                l.p50_us.into(),
                l.p99_us.into(),
                l.max_us.into(),
                at.into(),
            ],
        ));
    }
    out
}

fn load_statements(run_id: &str, seq: i64, suite: &str, load: &ModelLoad, at: i64) -> Vec<Statement> {
    let mut out: Vec<Statement> = vec![(
        "INSERT INTO model_loads (run_id, seq, suite, host, service, model, outcome, load_ms, peak_rss_bytes, \
         peak_gpu_bytes, at_unix_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        vec![
            run_id.into(),
            seq.into(),
            suite.into(),
            load.host.as_str().into(),
            load.service.as_str().into(),
            load.model.as_str().into(),
            load.outcome().into(),
            (load.load_time().as_millis() as u64).into(),
            load.peak_rss_bytes.into(),
            load.peak_gpu_bytes.into(),
            at.into(),
        ],
    )];
    for (position, s) in load.stages.iter().enumerate() {
        out.push((
            "INSERT INTO load_stages (run_id, seq, position, stage, duration_ms, peak_rss_bytes, peak_gpu_bytes) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            vec![
                run_id.into(),
                seq.into(),
                (position as u64).into(),
                s.stage.as_str().into(),
                (s.duration.as_millis() as u64).into(),
                s.peak_rss_bytes.into(),
                s.peak_gpu_bytes.into(),
            ],
        ));
    }
    out
}

/// What the recorder knows of the run it writes.
#[derive(Debug, Default)]
struct RunLog {
    id: String,
    controller: String,
    suites: Vec<SuiteInfo>,
    seq: i64,
}

/// Writes a run's events as they arrive, on its own task, so a slow
/// database never holds up the terminal or the other reporters. A write that
/// fails is tried once more; one that fails again stops the writing, and is
/// told at the end (the run's verdict is still written). The run goes on.
#[derive(Debug)]
pub struct Recorder {
    tx: tokio::sync::mpsc::UnboundedSender<(i64, RunEvent)>,
    task: tokio::task::JoinHandle<Option<String>>,
}

/// One write's limit (PostgreSQL also bounds each statement and lock wait).
const WRITE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

async fn write_bounded(store: &Store, statements: &[Statement]) -> Result<(), String> {
    match tokio::time::timeout(WRITE_LIMIT, store.write(statements)).await {
        Ok(written) => written.map_err(|e| e.to_string()),
        Err(_) => Err(format!("run store {}: a write took over {}s", store.location(), WRITE_LIMIT.as_secs())),
    }
}

impl Recorder {
    pub fn start(store: std::sync::Arc<Store>, controller: String) -> Recorder {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(i64, RunEvent)>();
        let task = tokio::spawn(async move {
            let mut run = RunLog { controller, ..RunLog::default() };
            while let Some((at, event)) = rx.recv().await {
                if let RunEvent::Started { run_id, suites, .. } = &event {
                    run.id.clone_from(run_id);
                    run.suites.clone_from(suites);
                }
                if run.id.is_empty() {
                    continue;
                }
                run.seq += 1;
                let statements = match Store::statements(&run, run.seq, at, &event) {
                    Ok(s) => s,
                    Err(e) => return Some(e),
                };
                if write_bounded(&store, &statements).await.is_err() {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    if let Err(e) = write_bounded(&store, &statements).await {
                        return Some(format!("{e}; the rest of this run's events are not in the store"));
                    }
                }
            }
            None
        });
        Recorder { tx, task }
    }

    pub fn on(&self, event: &RunEvent, at: i64) {
        let _ = self.tx.send((at, event.clone()));
    }

    /// Waits for every event to be written; what went wrong, if anything.
    pub async fn close(self) -> Result<(), String> {
        drop(self.tx);
        match self.task.await {
            Ok(None) => Ok(()),
            Ok(Some(failure)) => Err(failure),
            Err(e) => Err(format!("the run store's writer failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_is_a_file_or_a_postgres_url_and_its_password_is_never_shown() {
        assert_eq!(
            Location::parse("/var/lib/proctor/runs.sqlite"),
            Ok(Location::Sqlite("/var/lib/proctor/runs.sqlite".into()))
        );
        assert_eq!(
            Location::parse("postgres://ci:s3cret@db.lab:5432/proctor"),
            Ok(Location::Postgres("postgres://ci:s3cret@db.lab:5432/proctor".into()))
        );
        for (url, shown) in [
            ("postgres://ci:s3cret@db.lab:5432/proctor", "postgres://ci:***@db.lab:5432/proctor"),
            (
                "postgresql://ci@db.lab/proctor?password=s3cret&application_name=x",
                "postgresql://ci@db.lab/proctor?password=***&application_name=x",
            ),
            ("postgres://db.lab/proctor", "postgres://db.lab/proctor"),
        ] {
            assert_eq!(Location::parse(url).unwrap().to_string(), shown);
        }
        for (bad, says) in [
            ("", "give a file path or a postgres:// URL"),
            ("mysql://db/x", "is not a store"),
            ("postgre://ci:s3cret@db/x", "is not a store"),
            ("postgres://ci:s3cret@db/x?sslmode=require", "TLS to PostgreSQL is not supported yet"),
        ] {
            let e = Location::parse(bad).unwrap_err();
            assert!(e.contains(says) && !e.contains("s3cret"), "{bad}: {e}");
        }
    }
}

#[cfg(test)]
mod kept {
    //! The store against a real SQLite file: what goes in comes back.
    use std::sync::Arc;

    use super::*;
    use crate::reporter::{golden::scenarios, replay};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("proctor-store-{name}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The golden scenarios, each under its own run id, stamped 1 s apart.
    fn runs() -> Vec<(String, Vec<(i64, RunEvent)>)> {
        scenarios()
            .into_iter()
            .enumerate()
            .map(|(n, (name, events))| {
                let stamped = events
                    .into_iter()
                    .enumerate()
                    .map(|(i, mut e)| {
                        if let RunEvent::Started { run_id, .. } = &mut e {
                            *run_id = name.to_owned();
                        }
                        (1_000_000 * (n as i64 + 1) + 1_000 * i as i64, e)
                    })
                    .collect();
                (name.to_owned(), stamped)
            })
            .collect()
    }

    async fn keep(store: &Arc<Store>, events: &[(i64, RunEvent)]) {
        let recorder = Recorder::start(store.clone(), "ci@lab".into());
        for (at, e) in events {
            recorder.on(e, *at);
        }
        recorder.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_run_kept_event_by_event_is_told_again_as_it_was_told_live() {
        let dir = scratch("replay");
        let location = Location::Sqlite(dir.join("runs.sqlite"));
        let store = Arc::new(Store::open(&location).await.unwrap());
        for (name, events) in runs() {
            keep(&store, &events).await;
            let back = store.events(&name).await.unwrap();
            assert_eq!(back, events, "{name}: every event comes back, in order, with when it arrived");
            let (live, told) = (replay(&events, &dir), replay(&back, &dir));
            assert_eq!(told.report, live.report, "{name}");
            assert_eq!(told.document(), live.document(), "{name}");
            assert!(!told.partial);
        }
        let listed = store.runs(10).await.unwrap();
        assert_eq!(listed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["rerun", "failed-load", "passing"]);
        for (asked, found) in
            [("PASS", Ok("passing")), ("rerun", Ok("rerun")), ("latest", Ok("rerun")), ("r_run", Err(true))]
        {
            let got = store.run(asked).await.map(|r| r.id).map_err(|e| e.no_such_run);
            assert_eq!(got, found.map(str::to_owned), "{asked}");
        }
        assert!(listed.iter().all(|r| r.status == "running" && r.partial()), "not finished until finish_run");
        let reopened = Store::open(&location).await.unwrap();
        assert_eq!(reopened.runs(10).await.unwrap().len(), 3, "opening again migrates nothing and loses nothing");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_store_of_an_older_schema_is_migrated_and_keeps_its_runs() {
        let dir = scratch("migrate");
        let path = dir.join("runs.sqlite");
        {
            // A store as the first release left it: migration 1 only, one run.
            let mut old = Db::sqlite(&path).unwrap();
            let (v, name, sql) = schema::MIGRATIONS[0];
            assert!(old.apply_once(0, "", "").await.is_ok());
            assert!(old.apply_once(v, name, sql).await.unwrap());
            old.transaction(&[(
                "INSERT INTO runs (id, started_unix_ms, finished_unix_ms, status, controller, suites, cases, passed) \
                 VALUES ('old-run', 1, 2, 'passed', 'ci@lab', 'translate', 2, 2)",
                vec![],
            )])
            .await
            .unwrap();
        }
        let store = Store::open(&Location::Sqlite(path.clone())).await.unwrap();
        let runs = store.runs(5).await.unwrap();
        assert_eq!((runs[0].id.as_str(), runs[0].passed, runs[0].regressions), ("old-run", 2, 0));
        assert!(store.baselines().await.unwrap().is_empty(), "migration 2 made the baselines table");
        assert!(store.case_baselines().await.unwrap().is_empty(), "migration 3 made the load baselines table");
        let mut db = Db::sqlite(&path).unwrap();
        let versions = db.query("SELECT version FROM proctor_migrations ORDER BY version", &[]).await.unwrap();
        assert_eq!(versions.iter().map(|r| r.int(0)).collect::<Vec<_>>(), [1, 2, 3, 4]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_load_baseline_set_before_modes_were_kept_survives_with_an_empty_mode() {
        let dir = scratch("migrate-mode");
        let path = dir.join("runs.sqlite");
        {
            let mut old = Db::sqlite(&path).unwrap();
            assert!(old.apply_once(0, "", "").await.is_ok());
            for (v, name, sql) in &schema::MIGRATIONS[..3] {
                assert!(old.apply_once(*v, name, sql).await.unwrap());
            }
            old.transaction(&[(
                "INSERT INTO load_baselines (host, suite, name, metric, value, run_id, set_unix_ms) \
                 VALUES ('gpu-01', 'perf', 'steady', 'rps', 5000, 'run-1', 7)",
                vec![],
            )])
            .await
            .unwrap();
        }
        let store = Store::open(&Location::Sqlite(path)).await.unwrap();
        let kept = store.case_baselines().await.unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!((kept[0].value, kept[0].mode.as_str()), (5000, ""), "{kept:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn an_unfinished_run_is_partial_and_its_cases_without_a_result_are_errors() {
        let dir = scratch("partial");
        let store = Arc::new(Store::open(&Location::Sqlite(dir.join("runs.sqlite"))).await.unwrap());
        let (name, events) = runs().remove(0);
        // Kept up to the first case's result: the controller died there.
        let cut = events.iter().position(|(_, e)| matches!(e, RunEvent::CaseFinished { .. })).unwrap() + 1;
        keep(&store, &events[..cut]).await;
        let told = replay(&store.events(&name).await.unwrap(), &dir);
        assert!(told.partial && told.report.interrupted);
        let outcomes: Vec<String> = told.report.cases.iter().map(|c| format!("{:?}", c.outcome)).collect();
        assert!(outcomes[0].starts_with("Failed"), "{outcomes:?}");
        assert!(outcomes[1].contains("partial run"), "{outcomes:?}");
        assert_eq!(told.document()["partial"], true);
        let files = told.write(&dir.join("out")).unwrap();
        let html = std::fs::read_to_string(files.html.unwrap()).unwrap();
        assert!(html.contains("Partial run"), "the HTML says so");
        let _ = std::fs::remove_dir_all(dir);
    }
}
