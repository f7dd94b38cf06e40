//! SQL over live tables, answered by DataFusion.
//!
//! [`query`] registers a snapshot of every live table and runs one read-only statement over
//! them: queries, `SHOW TABLES`, `DESCRIBE`, `information_schema`. Statements that would change
//! anything (DDL, DML, `SET`) are refused before planning. Errors are [`SqlError`]s with the
//! planner's message, never panics.

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::execution::context::{SQLOptions, SessionConfig, SessionContext};
use keel_sinks::live::{LiveError, LiveTables};

/// Why a statement produced no result.
///
/// `Invalid` and `Refused` are the caller's to fix (bad SQL, a statement that writes);
/// `Table` is a bug in a row type (a snapshot could not be built).
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The statement does not parse, plan or run.
    #[error("{0}")]
    Invalid(String),
    /// The statement would change something; live tables are read-only.
    #[error("only queries are allowed: {0}")]
    Refused(String),
    /// A live table could not be read.
    #[error(transparent)]
    Table(#[from] LiveError),
}

fn describe(error: &datafusion::error::DataFusionError) -> String {
    let text = error.to_string();
    // DataFusion prefixes the category ("Error during planning: ..."); keep the sentence.
    text.trim().to_owned()
}

/// A DataFusion session over a snapshot of `tables`.
pub fn session(tables: &LiveTables) -> Result<SessionContext, SqlError> {
    let config = SessionConfig::new()
        .with_information_schema(true)
        .with_default_catalog_and_schema("keel", "live");
    let ctx = SessionContext::new_with_config(config);
    for name in tables.names() {
        let batch = tables.snapshot(name)?;
        let table = MemTable::try_new(batch.schema(), vec![vec![batch]])
            .map_err(|e| SqlError::Invalid(describe(&e)))?;
        ctx.register_table(name, Arc::new(table))
            .map_err(|e| SqlError::Invalid(describe(&e)))?;
    }
    Ok(ctx)
}

/// Runs one read-only statement over a snapshot of `tables`.
pub async fn query(tables: &LiveTables, sql: &str) -> Result<Vec<RecordBatch>, SqlError> {
    let ctx = session(tables)?;
    run(&ctx, sql).await
}

/// Runs one read-only statement in `ctx`.
pub async fn run(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>, SqlError> {
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let frame = ctx.sql_with_options(sql, options).await.map_err(|e| {
        let text = describe(&e);
        if text.contains("not supported")
            && (text.contains("DDL") || text.contains("DML") || text.contains("Statement"))
        {
            SqlError::Refused(text)
        } else {
            SqlError::Invalid(text)
        }
    })?;
    frame
        .collect()
        .await
        .map_err(|e| SqlError::Invalid(describe(&e)))
}
