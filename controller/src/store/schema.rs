//! The store's schema and its versioned migrations, one SQL text for both
//! databases (only types and statements SQLite and PostgreSQL share).
//! `proctor_migrations` says which have run; each runs once, in its own
//! transaction under the store's writer lock, so two controllers opening a
//! fresh store at once cannot both apply it.

use super::db::Db;

/// (version, what it does, SQL). Versions are dense from 1; a released
/// migration is never edited, only followed by another.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "runs, their events, cases, model loads and stages",
        "CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            started_unix_ms BIGINT NOT NULL,
            finished_unix_ms BIGINT,
            status TEXT NOT NULL,
            controller TEXT NOT NULL,
            suites TEXT NOT NULL,
            cases BIGINT NOT NULL DEFAULT 0,
            passed BIGINT NOT NULL DEFAULT 0,
            failed BIGINT NOT NULL DEFAULT 0,
            errors BIGINT NOT NULL DEFAULT 0
        );
        CREATE INDEX runs_by_start ON runs (started_unix_ms);
        CREATE TABLE run_events (
            run_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            at_unix_ms BIGINT NOT NULL,
            kind TEXT NOT NULL,
            body TEXT NOT NULL,
            PRIMARY KEY (run_id, seq)
        );
        CREATE TABLE case_results (
            run_id TEXT NOT NULL,
            suite TEXT NOT NULL,
            name TEXT NOT NULL,
            outcome TEXT NOT NULL,
            host TEXT NOT NULL,
            attempt BIGINT NOT NULL,
            reruns BIGINT NOT NULL,
            duration_ms BIGINT NOT NULL,
            at_unix_ms BIGINT NOT NULL,
            PRIMARY KEY (run_id, suite, name)
        );
        CREATE TABLE model_loads (
            run_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            suite TEXT NOT NULL,
            host TEXT NOT NULL,
            service TEXT NOT NULL,
            model TEXT NOT NULL,
            outcome TEXT NOT NULL,
            load_ms BIGINT NOT NULL,
            peak_rss_bytes BIGINT NOT NULL,
            peak_gpu_bytes BIGINT NOT NULL,
            at_unix_ms BIGINT NOT NULL,
            PRIMARY KEY (run_id, seq)
        );
        CREATE INDEX model_loads_by_model ON model_loads (host, service, model, at_unix_ms);
        CREATE TABLE load_stages (
            run_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            position BIGINT NOT NULL,
            stage TEXT NOT NULL,
            duration_ms BIGINT NOT NULL,
            peak_rss_bytes BIGINT NOT NULL,
            peak_gpu_bytes BIGINT NOT NULL,
            PRIMARY KEY (run_id, seq, position)
        );",
    ),
    (
        2,
        "baselines: per host, service and model, the load and each stage",
        "CREATE TABLE baselines (
            host TEXT NOT NULL,
            service TEXT NOT NULL,
            model TEXT NOT NULL,
            stage TEXT NOT NULL,
            duration_ms BIGINT NOT NULL,
            run_id TEXT NOT NULL,
            set_unix_ms BIGINT NOT NULL,
            PRIMARY KEY (host, service, model, stage)
        );
        ALTER TABLE runs ADD COLUMN regressions BIGINT NOT NULL DEFAULT 0;",
    ),
    (
        3,
        "load cases: their figures per run, and baselines per host, suite and case",
        "CREATE TABLE load_results (
            run_id TEXT NOT NULL,
            suite TEXT NOT NULL,
            name TEXT NOT NULL,
            host TEXT NOT NULL,
            requests BIGINT NOT NULL,
            errors BIGINT NOT NULL,
            rps BIGINT NOT NULL,
            p50_us BIGINT NOT NULL,
            p99_us BIGINT NOT NULL,
            max_us BIGINT NOT NULL,
            at_unix_ms BIGINT NOT NULL,
            PRIMARY KEY (run_id, suite, name)
        );
        CREATE TABLE load_baselines (
            host TEXT NOT NULL,
            suite TEXT NOT NULL,
            name TEXT NOT NULL,
            metric TEXT NOT NULL,
            value BIGINT NOT NULL,
            run_id TEXT NOT NULL,
            set_unix_ms BIGINT NOT NULL,
            PRIMARY KEY (host, suite, name, metric)
        );",
    ),
    (
        4,
        "load-case baselines keep how the load ran (its mode): another shape is not judged against them",
        "ALTER TABLE load_baselines ADD COLUMN mode TEXT NOT NULL DEFAULT '';",
    ),
];

/// The newest schema this build knows.
pub fn current() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// The migrations still to run on a store at `version`, or why this build
/// cannot use it.
pub fn pending(version: i64) -> Result<&'static [(i64, &'static str, &'static str)], String> {
    if version > current() {
        return Err(format!(
            "it was written by a newer Proctor (schema version {version}; this one knows up to {}): upgrade \
             proctor, or point --store elsewhere",
            current()
        ));
    }
    let from = MIGRATIONS.iter().position(|m| m.0 > version).unwrap_or(MIGRATIONS.len());
    Ok(&MIGRATIONS[from..])
}

async fn version(db: &mut Db) -> Result<i64, String> {
    let rows = db.query("SELECT COALESCE(MAX(version), 0) FROM proctor_migrations", &[]).await?;
    Ok(rows.first().map_or(0, |r| r.int(0)))
}

/// Brings the store to the current schema; returns the versions applied.
/// A store already current is only read (a read-only file or role can list
/// runs); the book of migrations is made when there is none yet.
pub async fn migrate(db: &mut Db) -> Result<Vec<i64>, String> {
    let at = match version(db).await {
        Ok(v) => v,
        Err(_) => {
            db.apply_once(0, "", "").await?;
            version(db).await?
        }
    };
    let mut applied = Vec::new();
    for &(v, name, sql) in pending(at)? {
        if db.apply_once(v, name, sql).await.map_err(|e| format!("migration {v} ({name}): {e}"))? {
            applied.push(v);
        }
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_dense_and_a_store_from_a_newer_proctor_is_refused() {
        let versions: Vec<i64> = MIGRATIONS.iter().map(|m| m.0).collect();
        assert_eq!(versions, (1..=current()).collect::<Vec<_>>());
        for (at, want) in [(0, vec![1, 2, 3, 4]), (1, vec![2, 3, 4]), (3, vec![4]), (4, vec![])] {
            let got: Vec<i64> = pending(at).unwrap().iter().map(|m| m.0).collect();
            assert_eq!(got, want, "at {at}");
        }
        let newer = pending(current() + 1).unwrap_err();
        assert!(newer.contains("newer Proctor") && newer.contains("point --store elsewhere"), "{newer}");
    }
}
