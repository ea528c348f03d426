//! The two databases behind one small API: statements with `$1, $2…`
//! parameters (rewritten to `?1, ?2…` for SQLite), run one by one or
//! together in one transaction, and rows read back as cells. The only user
//! of `rusqlite` and `tokio-postgres`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::types::{ToSql, Type};

/// A parameter, typed so PostgreSQL accepts its NULLs too.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    Int(Option<i64>),
    Text(Option<String>),
}

impl From<i64> for Val {
    fn from(v: i64) -> Val {
        Val::Int(Some(v))
    }
}

impl From<u64> for Val {
    fn from(v: u64) -> Val {
        Val::Int(Some(i64::try_from(v).unwrap_or(i64::MAX)))
    }
}

impl From<&str> for Val {
    fn from(v: &str) -> Val {
        Val::Text(Some(v.to_owned()))
    }
}

impl From<String> for Val {
    fn from(v: String) -> Val {
        Val::Text(Some(v))
    }
}

/// One value read back.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    Int(i64),
    Text(String),
    Null,
}

/// A row read back; missing or mistyped cells read as 0 / "".
#[derive(Clone, Debug, PartialEq)]
pub struct Row(pub Vec<Cell>);

impl Row {
    pub fn int(&self, i: usize) -> i64 {
        match self.0.get(i) {
            Some(Cell::Int(v)) => *v,
            Some(Cell::Text(t)) => t.parse().unwrap_or(0),
            _ => 0,
        }
    }

    pub fn opt_int(&self, i: usize) -> Option<i64> {
        match self.0.get(i) {
            Some(Cell::Null) | None => None,
            _ => Some(self.int(i)),
        }
    }

    pub fn text(&self, i: usize) -> String {
        match self.0.get(i) {
            Some(Cell::Text(t)) => t.clone(),
            Some(Cell::Int(v)) => v.to_string(),
            _ => String::new(),
        }
    }
}

/// Which migrations have run.
const MIGRATION_BOOK: &str = "CREATE TABLE IF NOT EXISTS proctor_migrations (
    version BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    applied_unix_ms BIGINT NOT NULL
);";

/// The PostgreSQL advisory lock migrations take (any fixed number).
const MIGRATION_LOCK: i64 = 7_700_151;

/// A statement and its parameters.
pub type Statement = (&'static str, Vec<Val>);

pub enum Db {
    /// Used on the blocking pool only: a writer waiting its turn (busy
    /// timeout) never stalls the runtime's workers (agent streams, leases).
    Sqlite(Arc<Mutex<rusqlite::Connection>>),
    Postgres(tokio_postgres::Client),
}

/// Runs `work` on the SQLite connection, on the blocking pool.
async fn on_sqlite<T: Send + 'static>(
    conn: &Arc<Mutex<rusqlite::Connection>>,
    work: impl FnOnce(&mut rusqlite::Connection) -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let conn = conn.clone();
    let done = tokio::task::spawn_blocking(move || {
        let mut c = conn.lock().map_err(|_| "the SQLite connection is unusable after a failure".to_owned())?;
        work(&mut c)
    });
    done.await.map_err(|e| format!("the SQLite worker failed: {e}"))?
}

/// How long connecting to PostgreSQL, or waiting for one of its locks or
/// statements, may take: a store that stopped answering costs the run
/// seconds, never its reports.
const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const PG_STATEMENT_OPTIONS: &str = "-c statement_timeout=30000 -c lock_timeout=30000";

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Db::Sqlite(_) => "Db::Sqlite",
            Db::Postgres(_) => "Db::Postgres",
        })
    }
}

/// `$1` → `?1`: SQLite's numbered parameters.
fn sqlite_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

fn sqlite_params(params: &[Val]) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value;
    params
        .iter()
        .map(|v| match v {
            Val::Int(Some(i)) => Value::Integer(*i),
            Val::Text(Some(t)) => Value::Text(t.clone()),
            Val::Int(None) | Val::Text(None) => Value::Null,
        })
        .collect()
}

fn pg_params(params: &[Val]) -> Vec<Box<dyn ToSql + Sync + Send>> {
    params
        .iter()
        .map(|v| -> Box<dyn ToSql + Sync + Send> {
            match v {
                Val::Int(i) => Box::new(*i),
                Val::Text(t) => Box::new(t.clone()),
            }
        })
        .collect()
}

fn pg_row(row: &tokio_postgres::Row) -> Row {
    let cells = row
        .columns()
        .iter()
        .enumerate()
        .map(|(i, col)| {
            let t = col.type_();
            let int = if *t == Type::INT8 {
                row.try_get::<_, Option<i64>>(i).ok().flatten()
            } else if *t == Type::INT4 {
                row.try_get::<_, Option<i32>>(i).ok().flatten().map(i64::from)
            } else {
                return row.try_get::<_, Option<String>>(i).ok().flatten().map_or(Cell::Null, Cell::Text);
            };
            int.map_or(Cell::Null, Cell::Int)
        })
        .collect();
    Row(cells)
}

fn sqlite_rows(conn: &rusqlite::Connection, sql: &str, params: &[Val]) -> rusqlite::Result<Vec<Row>> {
    use rusqlite::types::ValueRef;
    let mut stmt = conn.prepare_cached(&sqlite_sql(sql))?;
    let n = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(sqlite_params(params)))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut cells = Vec::with_capacity(n);
        for i in 0..n {
            cells.push(match row.get_ref(i)? {
                ValueRef::Integer(v) => Cell::Int(v),
                ValueRef::Real(v) => Cell::Int(v as i64),
                ValueRef::Text(t) | ValueRef::Blob(t) => Cell::Text(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Null => Cell::Null,
            });
        }
        out.push(Row(cells));
    }
    Ok(out)
}

impl Db {
    /// Opens (creating) a SQLite file: WAL, so a reader never waits for the
    /// writer and what was committed survives a killed controller; several
    /// controllers on one file wait their turn for up to 10 s.
    pub fn sqlite(path: &Path) -> Result<Db, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let conn = rusqlite::Connection::open(path).map_err(|e| e.to_string())?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(|e| e.to_string())?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| e.to_string())?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(|e| e.to_string())?;
        Ok(Db::Sqlite(Arc::new(Mutex::new(conn))))
    }

    /// Connects to PostgreSQL (no TLS: `sslmode=require` is refused by the
    /// caller with the fix); the connection runs on its own task.
    pub async fn postgres(url: &str) -> Result<Db, String> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(PG_CONNECT_TIMEOUT);
        }
        if config.get_options().is_none() {
            config.options(PG_STATEMENT_OPTIONS);
        }
        let connecting = tokio::time::timeout(2 * PG_CONNECT_TIMEOUT, config.connect(tokio_postgres::NoTls));
        let (client, connection) = connecting
            .await
            .map_err(|_| format!("no answer within {}s", 2 * PG_CONNECT_TIMEOUT.as_secs()))?
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "run store: the PostgreSQL connection ended");
            }
        });
        Ok(Db::Postgres(client))
    }

    /// Runs statements in one transaction: all or none.
    pub async fn transaction(&mut self, statements: &[Statement]) -> Result<(), String> {
        match self {
            Db::Sqlite(conn) => {
                let statements = statements.to_vec();
                on_sqlite(conn, move |conn| {
                    // IMMEDIATE: a writer waits for the lock up front (busy
                    // timeout) instead of failing when it upgrades mid-way.
                    let behavior = rusqlite::TransactionBehavior::Immediate;
                    let tx = conn.transaction_with_behavior(behavior).map_err(|e| e.to_string())?;
                    for (sql, params) in &statements {
                        let mut stmt = tx.prepare_cached(&sqlite_sql(sql)).map_err(|e| e.to_string())?;
                        stmt.execute(rusqlite::params_from_iter(sqlite_params(params)))
                            .map_err(|e| format!("{e} in {sql}"))?;
                    }
                    tx.commit().map_err(|e| e.to_string())
                })
                .await
            }
            Db::Postgres(client) => {
                let tx = client.transaction().await.map_err(|e| e.to_string())?;
                for (sql, params) in statements {
                    let boxed = pg_params(params);
                    let refs: Vec<&(dyn ToSql + Sync)> = boxed.iter().map(|b| b.as_ref() as _).collect();
                    tx.execute(*sql, &refs).await.map_err(|e| format!("{e} in {sql}"))?;
                }
                tx.commit().await.map_err(|e| e.to_string())
            }
        }
    }

    /// Applies migration `version` unless it already is, in one
    /// transaction under the writer lock (the book of migrations is created
    /// there too: concurrent `CREATE TABLE IF NOT EXISTS` can fail on
    /// PostgreSQL). Version 0 only makes sure the book exists. True when
    /// this call applied it.
    pub async fn apply_once(&mut self, version: i64, name: &str, sql: &str) -> Result<bool, String> {
        const CHECK: &str = "SELECT version FROM proctor_migrations WHERE version = $1";
        const RECORD: &str = "INSERT INTO proctor_migrations (version, name, applied_unix_ms) VALUES ($1, $2, $3)";
        let now = crate::client::now_unix_ms();
        match self {
            Db::Sqlite(conn) => {
                let (name, sql) = (name.to_owned(), sql.to_owned());
                let applied = on_sqlite(conn, move |conn| {
                    let e = |e: rusqlite::Error| e.to_string();
                    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(e)?;
                    tx.execute_batch(MIGRATION_BOOK).map_err(e)?;
                    let done = tx.query_row(&sqlite_sql(CHECK), [version], |_| Ok(())).is_ok();
                    if done || version == 0 {
                        tx.commit().map_err(e)?;
                        return Ok(false);
                    }
                    tx.execute_batch(&sql).map_err(e)?;
                    tx.execute(&sqlite_sql(RECORD), rusqlite::params![version, name, now]).map_err(e)?;
                    tx.commit().map_err(e)?;
                    Ok(true)
                });
                return applied.await;
            }
            Db::Postgres(client) => {
                let e = |e: tokio_postgres::Error| e.to_string();
                let tx = client.transaction().await.map_err(e)?;
                tx.batch_execute(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK}); {MIGRATION_BOOK}"))
                    .await
                    .map_err(e)?;
                let done = tx.query_opt(CHECK, &[&version]).await.map_err(e)?.is_some();
                if done || version == 0 {
                    tx.commit().await.map_err(e)?;
                    return Ok(false);
                }
                tx.batch_execute(sql).await.map_err(e)?;
                tx.execute(RECORD, &[&version, &name, &now]).await.map_err(e)?;
                tx.commit().await.map_err(e)?;
            }
        }
        Ok(true)
    }

    pub async fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>, String> {
        match self {
            Db::Sqlite(conn) => {
                let (sql, params) = (sql.to_owned(), params.to_vec());
                on_sqlite(conn, move |conn| sqlite_rows(conn, &sql, &params).map_err(|e| format!("{e} in {sql}"))).await
            }
            Db::Postgres(client) => {
                let boxed = pg_params(params);
                let refs: Vec<&(dyn ToSql + Sync)> = boxed.iter().map(|b| b.as_ref() as _).collect();
                let rows = client.query(sql, &refs).await.map_err(|e| format!("{e} in {sql}"))?;
                Ok(rows.iter().map(pg_row).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_parameters_are_rewritten_for_sqlite_only_where_they_are_parameters() {
        for (sql, want) in [
            ("SELECT * FROM runs WHERE id = $1 AND x = $12", "SELECT * FROM runs WHERE id = ?1 AND x = ?12"),
            ("SELECT '$' || name FROM t", "SELECT '$' || name FROM t"),
            ("SELECT 1", "SELECT 1"),
        ] {
            assert_eq!(sqlite_sql(sql), want);
        }
    }
}
