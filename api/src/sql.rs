//! SQL over live tables, answered by DataFusion.
//!
//! [`query`] registers a snapshot of every live table and runs one read-only statement over
//! them: queries, `SHOW TABLES`, `SHOW COLUMNS`, `DESCRIBE`, `EXPLAIN`, `information_schema`.
//! Anything else (DDL, DML, `SET`, `COPY`, several statements at once) is refused after parsing,
//! before planning. Errors are [`SqlError`]s with the
//! planner's message, never panics.

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::execution::context::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParser, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::Statement as SQLStatement;
use keel_sinks::live::{LiveError, LiveTables};

use crate::auth::Scope;

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

/// A DataFusion session over a snapshot of `tables`, holding only the rows `scope` may see.
///
/// Scoping happens before any SQL is planned: a tenant's session contains that tenant's rows and
/// nothing else, so no query — joins, subqueries, `UNION`, `information_schema`, table
/// functions — can reach another tenant's data. A table without a `tenant_id` column is not
/// registered for tenants at all.
pub fn session(tables: &LiveTables, scope: Scope) -> Result<SessionContext, SqlError> {
    let config = SessionConfig::new()
        .with_information_schema(true)
        .with_default_catalog_and_schema("keel", "live");
    let ctx = SessionContext::new_with_config(config);
    for name in tables.names() {
        let batch = match scope {
            Scope::All => tables.snapshot(name)?,
            Scope::Tenant(tenant) => match only_tenant(&tables.snapshot(name)?, tenant)? {
                Some(batch) => batch,
                None => continue,
            },
        };
        let table = MemTable::try_new(batch.schema(), vec![vec![batch]])
            .map_err(|e| SqlError::Invalid(describe(&e)))?;
        ctx.register_table(name, Arc::new(table))
            .map_err(|e| SqlError::Invalid(describe(&e)))?;
    }
    Ok(ctx)
}

/// The rows of `batch` whose `tenant_id` is `tenant`; `None` if it has no such column.
fn only_tenant(batch: &RecordBatch, tenant: uuid::Uuid) -> Result<Option<RecordBatch>, SqlError> {
    let Ok(index) = batch.schema().index_of("tenant_id") else {
        return Ok(None);
    };
    let Ok(column) = arrow::compute::cast(batch.column(index), &arrow::datatypes::DataType::Utf8)
    else {
        return Ok(None);
    };
    let Some(strings) = column.as_any().downcast_ref::<arrow::array::StringArray>() else {
        return Ok(None);
    };
    let wanted = tenant.to_string();
    let mask: arrow::array::BooleanArray = strings
        .iter()
        .map(|value| Some(value == Some(wanted.as_str())))
        .collect();
    arrow::compute::filter_record_batch(batch, &mask)
        .map(Some)
        .map_err(|e| SqlError::Invalid(e.to_string()))
}

/// Runs one read-only statement over a snapshot of `tables`, as seen by `scope`.
pub async fn query(
    tables: &LiveTables,
    scope: Scope,
    sql: &str,
) -> Result<Vec<RecordBatch>, SqlError> {
    let ctx = session(tables, scope)?;
    run(&ctx, sql).await
}

fn is_read_only(statement: &SQLStatement) -> bool {
    match statement {
        SQLStatement::Query(_)
        | SQLStatement::ShowTables { .. }
        | SQLStatement::ShowColumns { .. }
        | SQLStatement::ExplainTable { .. } => true,
        SQLStatement::Explain { statement, .. } => is_read_only(statement),
        _ => false,
    }
}

/// Refuses anything but one read-only statement, before any planning.
fn check_read_only(sql: &str) -> Result<(), SqlError> {
    let statements = DFParser::parse_sql(sql).map_err(|e| SqlError::Invalid(describe(&e)))?;
    let statement = match statements.len() {
        0 => return Err(SqlError::Invalid("no statement given".to_owned())),
        1 => &statements[0],
        n => {
            return Err(SqlError::Invalid(format!(
                "one statement at a time, not {n}"
            )));
        }
    };
    let allowed = match statement {
        DFStatement::Statement(inner) => is_read_only(inner),
        DFStatement::Explain(explain) => match &*explain.statement {
            DFStatement::Statement(inner) => is_read_only(inner),
            _ => false,
        },
        _ => false,
    };
    if allowed {
        return Ok(());
    }
    let text = statement.to_string();
    let words: Vec<&str> = text.split_whitespace().take(2).collect();
    Err(SqlError::Refused(format!(
        "{} changes or configures state",
        words.join(" ")
    )))
}

/// Runs one read-only statement in `ctx`.
pub async fn run(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>, SqlError> {
    check_read_only(sql)?;
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
