//! SQL state: the platform's `stream_analytics` table, one row per tenant and stream, kept in
//! PostgreSQL (`postgres://…`) or a SQLite file (`sqlite:PATH`).
//!
//! Rows are upserted from the `streams` live table's rows — the computed state, never
//! increments — so writing the same epoch twice changes nothing. Columns follow the platform's
//! table where Keel computes the value: `total_connections` is the distinct sessions seen,
//! `total_session_duration` the seconds watched (open sessions up to the newest event time),
//! `bandwidth_in`/`upbytes` the bytes the stream received and `bandwidth_out`/`downbytes` the
//! bytes delivered, `session_end_time` the stream's last event time once it is offline.
//!
//! [`SqlStore::migrate`] creates the table (`keel migrate`); [`SqlStore::write`] upserts a batch in
//! one transaction, 500 rows per statement.

use std::str::FromStr as _;

use keel_operators::time::format_rfc3339;
use serde::Deserialize;
use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

/// The live table `stream_analytics` is computed from.
pub const SOURCE_TABLE: &str = "streams";

/// Why a SQL store call failed.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The URL is not one Keel knows.
    #[error("{0:?} is not a database URL: use postgres://USER@HOST:PORT/DB or sqlite:PATH")]
    Url(String),
    /// The database said no, or could not be reached.
    #[error("{what}: {source}")]
    Database {
        /// What Keel was doing.
        what: std::borrow::Cow<'static, str>,
        /// The driver's error.
        source: sqlx::Error,
    },
}

impl SqlError {
    /// Whether trying again later may succeed (the server is away, not the statement wrong).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SqlError::Database {
                source: sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed,
                ..
            }
        )
    }
}

fn database(what: &'static str) -> impl FnOnce(sqlx::Error) -> SqlError {
    move |source| SqlError::Database {
        what: what.into(),
        source,
    }
}

/// One `streams` row as `stream_analytics` needs it (field names of the live table).
#[derive(Clone, Debug, Deserialize)]
struct Stream {
    tenant_id: String,
    stream_id: String,
    internal_name: String,
    status: String,
    node_id: Option<String>,
    current_viewers: i64,
    peak_viewers: i64,
    total_sessions: i64,
    unique_viewers: i64,
    viewer_seconds: f64,
    egress_bytes: i64,
    ingress_bytes: i64,
    buffer_state: Option<String>,
    quality_tier: Option<String>,
    started_at: Option<i64>,
    updated_at: i64,
}

/// Widths, in characters, of `stream_analytics`' text columns (as `create_statement` declares
/// them): the stream's name, the node's id, and the status, buffer state and quality tier.
const NAME_WIDTH: usize = keel_sources::codec::MAX_STREAM_NAME;
const NODE_WIDTH: usize = 100;
const LABEL_WIDTH: usize = 50;

/// `text` as a text column `width` characters wide can hold it: NUL characters, which
/// PostgreSQL text cannot hold, become U+FFFD, and the text is cut after `width` characters.
/// Returns whether it had to be cut.
fn fit(text: &mut String, width: usize) -> bool {
    if text.contains('\0') {
        *text = text.replace('\0', "\u{FFFD}");
    }
    match text.char_indices().nth(width) {
        Some((cut, _)) => {
            text.truncate(cut);
            true
        }
        None => false,
    }
}

impl Stream {
    /// The row as the table can hold it (see [`fit`]), so that one odd value never fails the
    /// write of every row beside it. The stream name is part of the key: cut or with its NUL
    /// replaced, it could land on another stream's row (two rows of one key in one insert fail
    /// it whole), so a name the column cannot hold as it is refuses the row (`Err`) instead.
    /// (The codec refuses such names first; this is the store's own guard.)
    fn fitted(mut self) -> Result<Stream, String> {
        if self.internal_name.contains('\0') {
            return Err("its stream name holds a NUL character".to_owned());
        }
        if fit(&mut self.internal_name, NAME_WIDTH) {
            return Err(format!(
                "its stream name is longer than the {NAME_WIDTH} characters stream_analytics holds"
            ));
        }
        fit(&mut self.status, LABEL_WIDTH);
        for (value, width) in [
            (&mut self.node_id, NODE_WIDTH),
            (&mut self.buffer_state, LABEL_WIDTH),
            (&mut self.quality_tier, LABEL_WIDTH),
        ] {
            if let Some(value) = value {
                fit(value, width);
            }
        }
        Ok(self)
    }

    fn ended_at(&self) -> Option<i64> {
        (self.status == "offline").then_some(self.updated_at)
    }

    fn total_bandwidth_gb(&self) -> f64 {
        (self.ingress_bytes + self.egress_bytes) as f64 / 1e9
    }
}

/// One staged change: the key, and the new row or `None` for a removal.
pub type StagedRow = (String, String, Option<Value>);

/// A PostgreSQL or SQLite database holding `stream_analytics`.
#[derive(Clone, Debug)]
pub enum SqlStore {
    /// PostgreSQL.
    Postgres(PgPool),
    /// A SQLite file.
    Sqlite(SqlitePool),
}

const COLUMNS: &str = "tenant_id, internal_name, stream_id, status, node_id, current_viewers, \
    peak_viewers, total_connections, unique_viewers, total_session_duration, bandwidth_in, \
    bandwidth_out, upbytes, downbytes, total_bandwidth_gb, buffer_state, quality_tier, \
    session_start_time, session_end_time, last_updated";

const UPDATES: &str = " ON CONFLICT (tenant_id, internal_name) DO UPDATE SET \
    stream_id = excluded.stream_id, status = excluded.status, node_id = excluded.node_id, \
    current_viewers = excluded.current_viewers, peak_viewers = excluded.peak_viewers, \
    total_connections = excluded.total_connections, unique_viewers = excluded.unique_viewers, \
    total_session_duration = excluded.total_session_duration, \
    bandwidth_in = excluded.bandwidth_in, bandwidth_out = excluded.bandwidth_out, \
    upbytes = excluded.upbytes, downbytes = excluded.downbytes, \
    total_bandwidth_gb = excluded.total_bandwidth_gb, buffer_state = excluded.buffer_state, \
    quality_tier = excluded.quality_tier, session_start_time = excluded.session_start_time, \
    session_end_time = excluded.session_end_time, last_updated = excluded.last_updated";

/// The table, with `uuid` and `time` the dialect's column types.
fn create_statement(uuid: &str, time: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS stream_analytics (\
         tenant_id {uuid} NOT NULL, internal_name VARCHAR({NAME_WIDTH}) NOT NULL, \
         stream_id {uuid}, status VARCHAR({LABEL_WIDTH}) NOT NULL DEFAULT 'offline', \
         node_id VARCHAR({NODE_WIDTH}), \
         current_viewers BIGINT NOT NULL DEFAULT 0, peak_viewers BIGINT NOT NULL DEFAULT 0, \
         total_connections BIGINT NOT NULL DEFAULT 0, unique_viewers BIGINT NOT NULL DEFAULT 0, \
         total_session_duration DOUBLE PRECISION NOT NULL DEFAULT 0, \
         bandwidth_in BIGINT NOT NULL DEFAULT 0, bandwidth_out BIGINT NOT NULL DEFAULT 0, \
         upbytes BIGINT NOT NULL DEFAULT 0, downbytes BIGINT NOT NULL DEFAULT 0, \
         total_bandwidth_gb DOUBLE PRECISION NOT NULL DEFAULT 0, \
         buffer_state VARCHAR({LABEL_WIDTH}), quality_tier VARCHAR({LABEL_WIDTH}), \
         session_start_time {time}, session_end_time {time}, \
         last_updated {time} NOT NULL, PRIMARY KEY (tenant_id, internal_name))"
    )
}

/// Builds and runs the upserts for one dialect: `uuid` and `time` wrap a bound value in the
/// dialect's conversion, `at` turns milliseconds into the bound time value.
macro_rules! upsert {
    ($tx:expr, $db:ty, $rows:expr, uuid = ($u0:literal, $u1:literal), time = ($t0:literal, $t1:literal), at = $at:expr) => {{
        for chunk in $rows.chunks(500) {
            let mut query = sqlx::QueryBuilder::<$db>::new(format!(
                "INSERT INTO stream_analytics ({COLUMNS}) "
            ));
            query.push_values(chunk, |mut b, s: &Stream| {
                b.push($u0)
                    .push_bind_unseparated(s.tenant_id.clone())
                    .push_unseparated($u1);
                b.push_bind(s.internal_name.clone());
                b.push($u0)
                    .push_bind_unseparated(s.stream_id.clone())
                    .push_unseparated($u1);
                b.push_bind(s.status.clone())
                    .push_bind(s.node_id.clone())
                    .push_bind(s.current_viewers)
                    .push_bind(s.peak_viewers)
                    .push_bind(s.total_sessions)
                    .push_bind(s.unique_viewers)
                    .push_bind(s.viewer_seconds)
                    .push_bind(s.ingress_bytes)
                    .push_bind(s.egress_bytes)
                    .push_bind(s.ingress_bytes)
                    .push_bind(s.egress_bytes)
                    .push_bind(s.total_bandwidth_gb())
                    .push_bind(s.buffer_state.clone())
                    .push_bind(s.quality_tier.clone());
                for time in [s.started_at, s.ended_at(), Some(s.updated_at)] {
                    b.push($t0)
                        .push_bind_unseparated(time.map($at))
                        .push_unseparated($t1);
                }
            });
            query.push(UPDATES);
            query
                .build()
                .execute(&mut *$tx)
                .await
                .map_err(database("upserting stream_analytics"))?;
        }
    }};
}

impl SqlStore {
    /// Opens `url`: `postgres://…`, or `sqlite:PATH` (the file is created if missing).
    pub async fn connect(url: &str) -> Result<SqlStore, SqlError> {
        SqlStore::open(url, true).await
    }

    /// Opens `url` as [`SqlStore::connect`] does, but a SQLite file that does not exist is an
    /// error saying to migrate, not a new empty file left behind (a writer's check).
    pub async fn connect_existing(url: &str) -> Result<SqlStore, SqlError> {
        SqlStore::open(url, false).await
    }

    async fn open(url: &str, create: bool) -> Result<SqlStore, SqlError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            // One connection first, whose failure says why (refused, unknown host, bad
            // password): the pool would retry until its timeout and say only that it timed out.
            use sqlx::Connection as _;
            sqlx::PgConnection::connect(url)
                .await
                .map_err(database("connecting to PostgreSQL"))?
                .close()
                .await
                .map_err(database("connecting to PostgreSQL"))?;
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(std::time::Duration::from_secs(10))
                .connect(url)
                .await
                .map_err(database("connecting to PostgreSQL"))?;
            Ok(SqlStore::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|_| SqlError::Url(url.to_owned()))?
                .create_if_missing(create)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Full);
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .map_err(|source| SqlError::Database {
                    what: if create {
                        format!("opening the SQLite file {}", &url["sqlite:".len()..]).into()
                    } else {
                        format!(
                            "opening the SQLite file {} (if it does not exist, run keel migrate \
                             --database URL to make it)",
                            &url["sqlite:".len()..]
                        )
                        .into()
                    },
                    source,
                })?;
            Ok(SqlStore::Sqlite(pool))
        } else {
            Err(SqlError::Url(url.to_owned()))
        }
    }

    /// Creates `stream_analytics` (and its indexes) if missing.
    pub async fn migrate(&self) -> Result<(), SqlError> {
        let indexes = [
            "CREATE INDEX IF NOT EXISTS stream_analytics_tenant_status ON stream_analytics (tenant_id, status)",
            "CREATE INDEX IF NOT EXISTS stream_analytics_internal_name ON stream_analytics (internal_name)",
        ];
        match self {
            SqlStore::Postgres(pool) => {
                sqlx::query(sqlx::AssertSqlSafe(create_statement("UUID", "TIMESTAMPTZ")))
                    .execute(pool)
                    .await
                    .map_err(database("creating stream_analytics"))?;
                for index in indexes {
                    sqlx::query(index)
                        .execute(pool)
                        .await
                        .map_err(database("indexing stream_analytics"))?;
                }
            }
            SqlStore::Sqlite(pool) => {
                sqlx::query(sqlx::AssertSqlSafe(create_statement("TEXT", "TEXT")))
                    .execute(pool)
                    .await
                    .map_err(database("creating stream_analytics"))?;
                for index in indexes {
                    sqlx::query(index)
                        .execute(pool)
                        .await
                        .map_err(database("indexing stream_analytics"))?;
                }
            }
        }
        Ok(())
    }

    /// Checks that `stream_analytics` exists (so a writer never starts before `keel migrate`).
    pub async fn check(&self) -> Result<(), SqlError> {
        let probe = "SELECT count(*) FROM stream_analytics WHERE 1 = 0";
        match self {
            SqlStore::Postgres(pool) => sqlx::query(probe).execute(pool).await.map(drop),
            SqlStore::Sqlite(pool) => sqlx::query(probe).execute(pool).await.map(drop),
        }
        .map_err(database(
            "stream_analytics is missing (run keel migrate --database URL)",
        ))
    }

    /// Upserts (and deletes) `rows` in one transaction.
    pub async fn write(&self, rows: &[StagedRow]) -> Result<(), SqlError> {
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for (tenant, name, row) in rows {
            match row {
                Some(value) => match Stream::deserialize(value) {
                    Ok(stream) => match stream.fitted() {
                        Ok(stream) => upserts.push(stream),
                        Err(reason) => {
                            let name: String = name.chars().take(40).collect();
                            tracing::error!(
                                tenant,
                                name,
                                "a streams row is not kept in stream_analytics: {reason}"
                            );
                        }
                    },
                    Err(error) => {
                        tracing::error!(%error, tenant, name, "a streams row lacks stream_analytics columns");
                    }
                },
                None => {
                    // A name the column cannot hold was never kept.
                    let mut name = name.clone();
                    if !name.contains('\0') && !fit(&mut name, NAME_WIDTH) {
                        deletes.push((tenant.clone(), name));
                    }
                }
            }
        }
        match self {
            SqlStore::Postgres(pool) => {
                let mut tx = pool
                    .begin()
                    .await
                    .map_err(database("starting a transaction"))?;
                upsert!(
                    tx,
                    sqlx::Postgres,
                    upserts,
                    uuid = ("CAST(", " AS UUID)"),
                    time = ("to_timestamp(CAST(", " AS DOUBLE PRECISION) / 1000.0)"),
                    at = |ms: i64| ms
                );
                for (tenant, name) in &deletes {
                    sqlx::query("DELETE FROM stream_analytics WHERE tenant_id = CAST($1 AS UUID) AND internal_name = $2")
                        .bind(tenant)
                        .bind(name)
                        .execute(&mut *tx)
                        .await
                        .map_err(database("deleting from stream_analytics"))?;
                }
                tx.commit().await.map_err(database("committing"))?;
            }
            SqlStore::Sqlite(pool) => {
                let mut tx = pool
                    .begin()
                    .await
                    .map_err(database("starting a transaction"))?;
                upsert!(
                    tx,
                    sqlx::Sqlite,
                    upserts,
                    uuid = ("(", ")"),
                    time = ("(", ")"),
                    at = format_rfc3339
                );
                for (tenant, name) in &deletes {
                    sqlx::query(
                        "DELETE FROM stream_analytics WHERE tenant_id = ?1 AND internal_name = ?2",
                    )
                    .bind(tenant)
                    .bind(name)
                    .execute(&mut *tx)
                    .await
                    .map_err(database("deleting from stream_analytics"))?;
                }
                tx.commit().await.map_err(database("committing"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(viewers: i64, status: &str) -> Value {
        json!({
            "tenant_id": "5b3c5a4e-9d0e-4c1e-8a52-1f0e8a1f5c11",
            "stream_id": "0f8fad5b-d9cb-469f-a165-70867728950e",
            "internal_name": "abc",
            "status": status,
            "node_id": "edge-1",
            "current_viewers": viewers,
            "peak_viewers": 9,
            "total_sessions": 12,
            "unique_viewers": 10,
            "viewer_seconds": 61.5,
            "egress_bytes": 2_000_000_000i64,
            "ingress_bytes": 500,
            "buffer_state": null,
            "quality_tier": "1080p",
            "started_at": 1_700_000_000_000i64,
            "updated_at": 1_700_000_100_000i64,
        })
    }

    #[tokio::test]
    async fn sqlite_upserts_replace_rather_than_add() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("state.db").display());
        let store = SqlStore::connect(&url).await.unwrap();
        assert!(store.check().await.is_err(), "no table before migrate");
        store.migrate().await.unwrap();
        store.migrate().await.unwrap();
        store.check().await.unwrap();
        let tenant = "5b3c5a4e-9d0e-4c1e-8a52-1f0e8a1f5c11".to_owned();
        let staged = |value| vec![(tenant.clone(), "abc".to_owned(), Some(value))];
        store.write(&staged(row(3, "live"))).await.unwrap();
        store.write(&staged(row(3, "live"))).await.unwrap();
        store.write(&staged(row(1, "offline"))).await.unwrap();
        let SqlStore::Sqlite(pool) = &store else {
            unreachable!()
        };
        let got: Vec<(i64, String, Option<String>, String, f64)> = sqlx::query_as(
            "SELECT current_viewers, status, session_end_time, session_start_time, total_bandwidth_gb FROM stream_analytics",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        assert_eq!(
            got.len(),
            1,
            "one row per stream, however often it is written"
        );
        assert_eq!(got[0].0, 1);
        assert_eq!(got[0].1, "offline");
        assert_eq!(got[0].2.as_deref(), Some("2023-11-14T22:15:00.000Z"));
        assert_eq!(got[0].3, "2023-11-14T22:13:20.000Z");
        assert!((got[0].4 - 2.0000005).abs() < 1e-9);
        store
            .write(&[(tenant.clone(), "abc".to_owned(), None)])
            .await
            .unwrap();
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM stream_analytics")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(left, 0);
    }

    #[test]
    fn values_are_fitted_to_their_columns() {
        let mut text = "a\0b".to_owned();
        assert!(!fit(&mut text, 3));
        assert_eq!(text, "a\u{FFFD}b");
        // Widths count characters, not bytes.
        let mut text = "é".repeat(5);
        assert!(!fit(&mut text, 5));
        assert!(fit(&mut text, 4));
        assert_eq!(text, "é".repeat(4));
        let odd = |name: &str, node: &str| {
            let mut row = row(1, "li\0ve");
            row["internal_name"] = json!(name);
            row["node_id"] = json!(node);
            row["quality_tier"] = json!("q".repeat(60));
            Stream::deserialize(&row).unwrap().fitted()
        };
        let fitted = odd("ab", &"n".repeat(120)).unwrap();
        assert_eq!(fitted.internal_name, "ab");
        assert_eq!(fitted.status, "li\u{FFFD}ve");
        assert_eq!(fitted.node_id, Some("n".repeat(NODE_WIDTH)));
        assert_eq!(fitted.quality_tier, Some("q".repeat(LABEL_WIDTH)));
        let refused = odd(&"x".repeat(NAME_WIDTH + 1), "edge-1").unwrap_err();
        assert!(
            refused.contains("longer than the 255 characters"),
            "{refused}"
        );
        assert!(odd(&"x".repeat(NAME_WIDTH), "edge-1").is_ok());
        // A NUL in the key is not replaced: "a\0b" would meet "a\u{FFFD}b".
        assert!(odd("a\0b", "edge-1").unwrap_err().contains("NUL"));
    }

    #[tokio::test]
    async fn unknown_urls_are_refused() {
        let error = SqlStore::connect("mysql://x").await.unwrap_err();
        assert!(error.to_string().contains("postgres://"), "{error}");
    }
}
