//! SQL over live tables, answered by DataFusion.
//!
//! [`query`] registers every live table (scoped to the caller) and runs one read-only statement
//! over them: queries, `SHOW TABLES`, `SHOW COLUMNS`, `DESCRIBE`, `EXPLAIN`, `information_schema`.
//! Anything else (DDL, DML, `SET`, `COPY`, several statements at once) is refused after parsing,
//! before planning. Errors are [`SqlError`]s with the
//! planner's message, never panics.
//!
//! A served query runs within [`Limits::SERVED`]: the memory its scans, joins, sorts and
//! aggregations may hold, the size of its result and its running time. One caller's `CROSS JOIN`
//! cannot take the engine's memory or a worker thread for good: past a limit it is stopped with
//! a [`SqlError::Limit`] that says which, and what to change. Every query runs on a thread of
//! its own (`on_query_thread`), and a statement past the sizes DataFusion plans quickly
//! ([`MAX_EXPRESSION_DEPTH`] and the rest) is refused before planning.

use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::context::{SQLOptions, SessionConfig, SessionContext};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::sql::parser::{DFParser, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::Statement as SQLStatement;
use futures_util::StreamExt as _;
use keel_sinks::live::{LiveError, LiveTables};
use serde_json::Value;

use crate::auth::Scope;
use crate::values::{Budget, PAST_BOUND, bound_values};

/// Why a statement produced no result.
///
/// `Invalid` and `Refused` are the caller's to fix (bad SQL, a statement that writes);
/// `Table` is a table that could not be read: a bug in a row type, or columns the plan should
/// not have asked for.
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
    /// The statement needs more memory, result or time than a query may take ([`Limits`]).
    #[error("{0}")]
    Limit(String),
    /// The engine could not run the statement (no thread or runtime for it, or it failed
    /// inside the engine): not the statement's fault.
    #[error("{0}")]
    Internal(String),
}

/// What one query may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes the query's scans, joins, sorts and aggregations may hold at once (DataFusion's
    /// memory pool, which the rows a scan copies out of the live tables count against too; a
    /// sort spills to disk first).
    pub memory: usize,
    /// Bytes of result it may return: its Arrow arrays, plus its column names once per row (as
    /// JSON repeats them).
    pub result: usize,
    /// Longest it may run, planning included.
    pub time: Duration,
}

impl Limits {
    /// For queries served to callers (HTTP, PostgreSQL protocol): 2 GiB of operator memory,
    /// 256 MiB of result, one minute.
    pub const SERVED: Limits = Limits {
        memory: 2 << 30,
        result: 256 << 20,
        time: Duration::from_secs(60),
    };

    /// None at all: `keel sql` on a file, whose one user is the one waiting.
    pub const NONE: Limits = Limits {
        memory: usize::MAX,
        result: usize::MAX,
        time: Duration::MAX,
    };

    /// The most one value a function call (or `||`) builds may take: a quarter of the memory
    /// limit, so the few values a statement holds at once stay within it
    /// ([`crate::values`]); none without a memory limit.
    pub fn value_bound(&self) -> Option<usize> {
        (self.memory < usize::MAX).then_some(self.memory / 4)
    }

    /// What the function calls of one statement may build: values of [`Limits::value_bound`],
    /// all of them together as much as the memory limit; none without a memory limit.
    pub fn value_budget(&self) -> Option<Budget> {
        Some(Budget::new(self.value_bound()?, self.memory))
    }
}

/// Bytes in words: `2 GiB`, `256 MiB`.
pub(crate) fn size(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b => format!("{b} bytes"),
    }
}

fn describe(error: &datafusion::error::DataFusionError) -> String {
    let text = error.to_string();
    // DataFusion prefixes the category ("Error during planning: ..."); keep the sentence.
    text.trim().to_owned()
}

/// A DataFusion session over the live tables, holding only the rows `scope` may see.
///
/// Scoping happens below any SQL: each table is a [`LiveProvider`] that hands the planner only
/// the scope's rows, so no query — joins, subqueries, `UNION`, `information_schema`, table
/// functions — can reach another tenant's data. A table without a `tenant_id` column is not
/// registered for tenants at all. Rows are read when the query scans a table, each table at
/// its latest closed epoch.
pub fn session(
    tables: &Arc<RwLock<LiveTables>>,
    scope: Scope,
    limits: Limits,
) -> Result<SessionContext, SqlError> {
    let config = SessionConfig::new()
        .with_information_schema(true)
        .with_default_catalog_and_schema("keel", "live");
    let mut runtime = RuntimeEnvBuilder::new();
    if limits.memory < usize::MAX {
        runtime = runtime.with_memory_limit(limits.memory, 1.0);
    }
    let runtime = runtime
        .build_arc()
        .map_err(|e| SqlError::Invalid(describe(&e)))?;
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    let guard = tables.read().unwrap_or_else(PoisonError::into_inner);
    for name in guard.names() {
        let schema = guard.schema(name)?;
        if matches!(scope, Scope::Tenant(_)) && schema.index_of("tenant_id").is_err() {
            continue;
        }
        let provider = LiveProvider {
            tables: tables.clone(),
            name,
            schema,
            tenant: match scope {
                Scope::All => None,
                Scope::Tenant(tenant) => Some(tenant.to_string()),
            },
            scanned: Mutex::default(),
        };
        ctx.register_table(name, Arc::new(provider))
            .map_err(|e| SqlError::Invalid(describe(&e)))?;
    }
    Ok(ctx)
}

/// One live table as DataFusion sees it: scoped to a tenant, with lookups by key.
///
/// Every filter is offered back to the planner as inexact (it still applies them), so the
/// provider only ever narrows: when the `col = literal` filters pin every key column (the
/// tenant is pinned by the scope), the scan is one hash lookup; otherwise it is the scope's
/// rows.
#[derive(Debug)]
pub struct LiveProvider {
    tables: Arc<RwLock<LiveTables>>,
    name: &'static str,
    schema: SchemaRef,
    tenant: Option<String>,
    /// The memory of the rows this query's scans copied out, held in its pool until the
    /// session (one query) ends.
    scanned: Mutex<Vec<MemoryReservation>>,
}

impl LiveProvider {
    /// The rows the filters narrow to, of the `columns` the query reads (all for `None`), at
    /// most `limit` of them when no filter is left to apply above the scan (DataFusion passes a
    /// limit only then; with filters it is ignored here too, so no row a filter would keep can
    /// be cut).
    fn batch(
        &self,
        filters: &[Expr],
        columns: Option<&[usize]>,
        limit: Option<usize>,
    ) -> Result<RecordBatch, SqlError> {
        let tables = self.tables.read().unwrap_or_else(PoisonError::into_inner);
        let mut pinned: Vec<(String, ScalarValue)> = Vec::new();
        for filter in filters {
            for part in split_conjunction(filter) {
                if let Some(pair) = column_equals(part) {
                    pinned.push(pair);
                }
            }
        }
        if let Some(tenant) = &self.tenant {
            // A filter on another tenant cannot match; the scope's own tenant is implied.
            let other = pinned.iter().any(|(column, value)| {
                column == "tenant_id"
                    && matches!(value, ScalarValue::Utf8(Some(v)) | ScalarValue::Utf8View(Some(v)) | ScalarValue::LargeUtf8(Some(v)) if v != tenant)
            });
            if other {
                return Ok(tables.snapshot_of(self.name, Some(tenant), columns, Some(0))?);
            }
            pinned.push((
                "tenant_id".to_owned(),
                ScalarValue::Utf8(Some(tenant.clone())),
            ));
        }
        let key_columns = tables.key_columns(self.name)?;
        // A lookup by key sees every tenant's rows: for a tenant, only a key that holds the
        // tenant may be looked up (`ingest_errors` is keyed by position alone; its rows are
        // scanned with the tenant's filter instead).
        let scoped = self.tenant.is_none() || key_columns.contains(&"tenant_id");
        let key: Option<Vec<Value>> = (scoped && !key_columns.is_empty())
            .then(|| {
                key_columns
                    .iter()
                    .map(|column| {
                        pinned
                            .iter()
                            .find(|(c, _)| c == column)
                            .and_then(|(_, value)| key_value(value))
                    })
                    .collect()
            })
            .flatten();
        let limit = limit.filter(|_| filters.is_empty());
        let batch = match key {
            Some(key) => tables.lookup(self.name, &key, columns)?,
            None => tables.snapshot_of(self.name, self.tenant.as_deref(), columns, limit)?,
        };
        Ok(batch)
    }
}

/// `column = literal` (either way round), with the column's unqualified name.
fn column_equals(expr: &Expr) -> Option<(String, ScalarValue)> {
    let Expr::BinaryExpr(BinaryExpr {
        left,
        op: Operator::Eq,
        right,
    }) = expr
    else {
        return None;
    };
    let pair = |a: &Expr, b: &Expr| match (a, b) {
        (Expr::Column(column), Expr::Literal(value, _)) => {
            Some((column.name.clone(), value.clone()))
        }
        _ => None,
    };
    pair(left, right).or_else(|| pair(right, left))
}

/// A literal as the JSON value of a key part: text, integers, and times as milliseconds.
fn key_value(value: &ScalarValue) -> Option<Value> {
    Some(match value {
        ScalarValue::Utf8(Some(v))
        | ScalarValue::Utf8View(Some(v))
        | ScalarValue::LargeUtf8(Some(v)) => Value::String(v.clone()),
        ScalarValue::Int64(Some(v)) => Value::from(*v),
        ScalarValue::Int32(Some(v)) => Value::from(*v),
        ScalarValue::UInt64(Some(v)) => Value::from(*v),
        ScalarValue::UInt32(Some(v)) => Value::from(*v),
        ScalarValue::TimestampMillisecond(Some(v), _) => Value::from(*v),
        ScalarValue::TimestampSecond(Some(v), _) => Value::from(v.checked_mul(1000)?),
        ScalarValue::TimestampMicrosecond(Some(v), _) if v % 1000 == 0 => Value::from(v / 1000),
        ScalarValue::TimestampNanosecond(Some(v), _) if v % 1_000_000 == 0 => {
            Value::from(v / 1_000_000)
        }
        _ => return None,
    })
}

#[async_trait::async_trait]
impl TableProvider for LiveProvider {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        // Only the columns the query reads are built: a count over a million sessions builds
        // none, a group by country one.
        let batch = self
            .batch(filters, projection.map(Vec::as_slice), limit)
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        // The plan expects the declared schema's columns, exactly.
        let schema = match projection {
            Some(columns) => Arc::new(self.schema.project(columns)?),
            None => self.schema.clone(),
        };
        debug_assert_eq!(schema, batch.schema(), "{}", self.name);
        // The copied rows count against the query's memory as its operators' state does: a
        // scan of more than a query may hold stops with the same clear error (and its rows
        // are freed at once) rather than sitting outside the limit for the whole query.
        let scanned = MemoryConsumer::new(format!("scan of {}", self.name))
            .register(&state.runtime_env().memory_pool);
        scanned.try_grow(batch.get_array_memory_size())?;
        self.scanned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(scanned);
        let exec = MemorySourceConfig::try_new_exec(&[vec![batch]], schema, None)?;
        Ok(exec)
    }
}

/// Runs one read-only statement over `tables`, as seen by `scope`, within [`Limits::SERVED`].
pub async fn query(
    tables: &Arc<RwLock<LiveTables>>,
    scope: Scope,
    sql: &str,
) -> Result<Vec<RecordBatch>, SqlError> {
    query_within(tables, scope, sql, Limits::SERVED).await
}

/// [`query`] within `limits`.
pub async fn query_within(
    tables: &Arc<RwLock<LiveTables>>,
    scope: Scope,
    sql: &str,
    limits: Limits,
) -> Result<Vec<RecordBatch>, SqlError> {
    within(tables, scope, sql, limits, Work::Run).await
}

/// Checks that `sql` is a read-only statement that plans over `tables` as `scope` sees them,
/// without running it: what a statement's rows would make of it (a division by a count of
/// none, say) is not its fault yet. Returns the columns the statement would answer with.
pub async fn plan_within(
    tables: &Arc<RwLock<LiveTables>>,
    scope: Scope,
    sql: &str,
    limits: Limits,
) -> Result<SchemaRef, SqlError> {
    let planned = within(tables, scope, sql, limits, Work::Plan).await?;
    Ok(planned
        .first()
        .map(RecordBatch::schema)
        .expect("a plan answers with its schema as an empty batch"))
}

/// What is done with a statement.
#[derive(Clone, Copy, Debug)]
enum Work {
    Run,
    Plan,
}

async fn within(
    tables: &Arc<RwLock<LiveTables>>,
    scope: Scope,
    sql: &str,
    limits: Limits,
    work: Work,
) -> Result<Vec<RecordBatch>, SqlError> {
    let ran = async {
        // Waiting for a turn counts against the time limit.
        let turn = turns()
            .clone()
            .acquire_owned()
            .await
            .expect("the turns are never closed");
        on_query_thread(tables.clone(), scope, sql.to_owned(), limits, work, turn).await
    };
    if limits.time == Duration::MAX {
        return ran.await;
    }
    tokio::time::timeout(limits.time, ran).await.map_err(|_| {
        SqlError::Limit(format!(
            "the query ran longer than {}, the most a query may: narrow it (WHERE, LIMIT) \
             or join less",
            match limits.time {
                t if t.subsec_millis() == 0 => format!("{} s", t.as_secs()),
                t => format!("{} ms", t.as_millis()),
            }
        ))
    })?
}

/// The stack of the thread a query runs on. DataFusion plans and evaluates expressions by
/// recursion, so a statement nests as deep as its longest chain of operators: `1+1+…+1` of a
/// thousand terms (2 KB of SQL) overflowed the API's 2 MiB threads and aborted the engine.
/// With statements bounded ([`MAX_EXPRESSION_DEPTH`]) this leaves a wide margin; only the
/// pages a query touches are resident.
const QUERY_STACK: usize = 64 << 20;

/// Runs `sql` on a thread of its own with a deep stack ([`QUERY_STACK`]) and a runtime of its
/// own, so the caller's runtime keeps serving while it computes. A caller that stops waiting
/// (its time is up, or it hung up) stops the query at its next yield; a query that panics is
/// an error, not a lost thread.
async fn on_query_thread(
    tables: Arc<RwLock<LiveTables>>,
    scope: Scope,
    sql: String,
    limits: Limits,
    work: Work,
    turn: tokio::sync::OwnedSemaphorePermit,
) -> Result<Vec<RecordBatch>, SqlError> {
    let (mut done, answer) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("keel-sql".to_owned())
        .stack_size(QUERY_STACK)
        .spawn(move || {
            // The turn is the thread's until it ends: planning does not yield, so a query
            // its caller gave up on may still be computing, and must still count.
            let _turn = turn;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let answer = match runtime {
                Ok(runtime) => runtime.block_on(async {
                    let work = async {
                        let ctx = session(&tables, scope, limits)?;
                        match work {
                            Work::Run => run(&ctx, &sql, limits).await,
                            Work::Plan => plan(&ctx, &sql, limits)
                                .await
                                .map(|plan| vec![RecordBatch::new_empty(plan.schema())]),
                        }
                    };
                    tokio::select! {
                        answer = work => Some(answer),
                        () = done.closed() => None,
                    }
                }),
                Err(e) => Some(Err(SqlError::Internal(format!(
                    "cannot start the query's runtime: {e}"
                )))),
            };
            if let Some(answer) = answer {
                // The caller may have stopped waiting meanwhile.
                let _ = done.send(answer);
            }
        })
        .map_err(|e| SqlError::Internal(format!("cannot start the query's thread: {e}")))?;
    answer
        .await
        .unwrap_or_else(|_| Err(SqlError::Internal(FAILED_INSIDE.to_owned())))
}

/// Queries that run at once; the others wait their turn. Each may hold its memory limit, so
/// this many times that bounds them all (two per core, at least four).
fn turns() -> &'static Arc<tokio::sync::Semaphore> {
    static TURNS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    TURNS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        Arc::new(tokio::sync::Semaphore::new((2 * cores).max(4)))
    })
}

fn is_read_only(statement: &SQLStatement) -> bool {
    match statement {
        SQLStatement::Query(_)
        | SQLStatement::ShowTables { .. }
        | SQLStatement::ShowColumns { .. }
        // `SHOW ALL`, `SHOW datafusion.…`: the session's settings, read only.
        | SQLStatement::ShowVariable { .. }
        | SQLStatement::ExplainTable { .. } => true,
        SQLStatement::Explain { statement, .. } => is_read_only(statement),
        _ => false,
    }
}

/// The deepest a statement's expressions may nest. DataFusion plans a chain of operators in
/// time that grows with the square of its length (a thousand terms of `1+1+…` took a second,
/// two thousand four, in a release build) and does not yield meanwhile, so no time limit stops
/// it; 256 levels plan in a fraction of a second.
pub const MAX_EXPRESSION_DEPTH: usize = 256;

/// The most `UNION`, `INTERSECT` and `EXCEPT` operations in one statement.
pub const MAX_SET_OPERATIONS: usize = 1_000;

/// The most expressions (every operator, literal and column counts one) in one statement.
pub const MAX_EXPRESSIONS: usize = 20_000;

/// The most tables, subqueries and table functions a statement reads from.
pub const MAX_RELATIONS: usize = 256;

/// Refuses a statement past any of [`MAX_EXPRESSION_DEPTH`], [`MAX_EXPRESSIONS`],
/// [`MAX_SET_OPERATIONS`] and [`MAX_RELATIONS`], before it is planned (an `EXPLAIN` by the
/// statement it explains).
fn check_size(statement: &DFStatement) -> Result<(), SqlError> {
    use datafusion::sql::sqlparser::ast::{
        Expr as SqlExpr, Query, SetExpr, TableFactor, Visit, Visitor,
    };
    use std::ops::ControlFlow;
    #[derive(Default)]
    struct Size {
        depth: usize,
        expressions: usize,
        set_operations: usize,
        relations: usize,
        past: Option<String>,
    }
    impl Size {
        fn past(&mut self, why: String) -> ControlFlow<()> {
            self.past = Some(why);
            ControlFlow::Break(())
        }
    }
    impl Visitor for Size {
        type Break = ();
        fn pre_visit_expr(&mut self, _: &SqlExpr) -> ControlFlow<()> {
            self.depth += 1;
            self.expressions += 1;
            if self.depth > MAX_EXPRESSION_DEPTH {
                return self.past(format!(
                    "the statement's expressions nest deeper than {MAX_EXPRESSION_DEPTH} levels \
                     (a long chain of operators counts one level for each): split it, or use \
                     IN (…) for a long list of alternatives"
                ));
            }
            if self.expressions > MAX_EXPRESSIONS {
                return self.past(format!(
                    "the statement has more than {MAX_EXPRESSIONS} expressions"
                ));
            }
            ControlFlow::Continue(())
        }
        fn post_visit_expr(&mut self, _: &SqlExpr) -> ControlFlow<()> {
            self.depth -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
            // Set operations nest to the left, below each query: all count.
            let mut body = &*query.body;
            while let SetExpr::SetOperation { left, .. } = body {
                self.set_operations += 1;
                body = left;
            }
            if self.set_operations > MAX_SET_OPERATIONS {
                return self.past(format!(
                    "the statement has more than {MAX_SET_OPERATIONS} UNION, INTERSECT or \
                     EXCEPT operations"
                ));
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_table_factor(&mut self, _: &TableFactor) -> ControlFlow<()> {
            self.relations += 1;
            if self.relations > MAX_RELATIONS {
                return self.past(format!(
                    "the statement reads from more than {MAX_RELATIONS} tables, subqueries or \
                     table functions"
                ));
            }
            ControlFlow::Continue(())
        }
    }
    let statement = match statement {
        DFStatement::Statement(statement) => statement,
        DFStatement::Explain(explain) => return check_size(&explain.statement),
        _ => return Ok(()),
    };
    let mut size = Size::default();
    match statement.visit(&mut size) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(SqlError::Invalid(size.past.unwrap_or_default())),
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
        return check_size(statement);
    }
    let text = statement.to_string();
    let words: Vec<&str> = text.split_whitespace().take(2).collect();
    Err(SqlError::Refused(format!(
        "{} changes or configures state",
        words.join(" ")
    )))
}

/// Operators whose output can be far larger than their input.
const AMPLIFIERS: &[&str] = &[
    "CrossJoinExec",
    "NestedLoopJoinExec",
    "HashJoinExec",
    "SortMergeJoinExec",
    "SymmetricHashJoinExec",
    "UnnestExec",
];

/// `plan` with each join (and unnest) made to yield to the runtime every so many output
/// batches. DataFusion yields only as its scans produce batches; a join whose output dwarfs its
/// input (a `CROSS JOIN` of a few small tables) would otherwise compute for as long as it takes
/// within one poll, out of reach of the time limit and of a caller who hung up.
fn cooperative_joins(
    plan: Arc<dyn ExecutionPlan>,
) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    use datafusion::physical_plan::coop::CooperativeExec;
    plan.transform_up(|node| {
        Ok(if AMPLIFIERS.contains(&node.name()) {
            Transformed::yes(Arc::new(CooperativeExec::new(node)) as Arc<dyn ExecutionPlan>)
        } else {
            Transformed::no(node)
        })
    })
    .map(|done| done.data)
}

/// What a caller is told of a query that failed in the engine (a panic): the rest is logged.
const FAILED_INSIDE: &str = "the query failed inside the engine (see its log)";

/// A DataFusion error while planning or running, as Keel reports it.
fn failed(e: &datafusion::error::DataFusionError) -> SqlError {
    match e.find_root() {
        datafusion::error::DataFusionError::ResourcesExhausted(message)
            if message.starts_with(PAST_BOUND) =>
        {
            SqlError::Limit(message.clone())
        }
        // A task of the query panicked: the engine's fault, whatever the statement.
        datafusion::error::DataFusionError::ExecutionJoin(_) => {
            tracing::error!(error = %e, "a query task failed");
            SqlError::Internal(FAILED_INSIDE.to_owned())
        }
        datafusion::error::DataFusionError::ResourcesExhausted(_) => SqlError::Limit(format!(
            "the query needs more memory for the rows it scans and its joins, sorts and \
             aggregations than a query may hold: narrow it (WHERE, LIMIT, fewer columns) or \
             join less ({})",
            describe(e)
        )),
        _ => SqlError::Invalid(describe(e)),
    }
}

/// Plans one read-only statement in `ctx`, down to the plan that would run.
async fn plan(
    ctx: &SessionContext,
    sql: &str,
    limits: Limits,
) -> Result<Arc<dyn ExecutionPlan>, SqlError> {
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
    let plan = match limits.value_budget() {
        None => frame.create_physical_plan().await,
        Some(budget) => {
            // Bounded before optimizing, which evaluates constant calls, and again after, for
            // calls the optimizer wrote in.
            let state = ctx.state();
            let planned = async {
                let logical = bound_values(frame.into_unoptimized_plan(), &budget)?;
                let optimized = bound_values(state.optimize(&logical)?, &budget)?;
                state
                    .query_planner()
                    .create_physical_plan(&optimized, &state)
                    .await
            };
            planned.await
        }
    };
    cooperative_joins(plan.map_err(|e| failed(&e))?).map_err(|e| failed(&e))
}

/// Runs one read-only statement in `ctx` within `limits`, returning at most `limits.result`
/// bytes of batches.
pub async fn run(
    ctx: &SessionContext,
    sql: &str,
    limits: Limits,
) -> Result<Vec<RecordBatch>, SqlError> {
    let result = limits.result;
    let plan = plan(ctx, sql, limits).await?;
    // Batch by batch, so a result past its limit is stopped there, not built whole first.
    let mut stream =
        datafusion::physical_plan::execute_stream(plan, ctx.task_ctx()).map_err(|e| failed(&e))?;
    let schema = stream.schema();
    let (mut batches, mut bytes) = (Vec::new(), 0usize);
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| failed(&e))?;
        // Its arrays, and its names once per row as the JSON output repeats them (a million
        // rows of NULL under a long alias are nearly no array but a great deal of text).
        let names: usize = batch
            .schema()
            .fields()
            .iter()
            .map(|field| field.name().len() + 6)
            .sum();
        bytes = bytes
            .saturating_add(batch.get_array_memory_size())
            .saturating_add(batch.num_rows().saturating_mul(names));
        if bytes > result {
            return Err(SqlError::Limit(format!(
                "the result is larger than {}, the most a query may return: narrow it (WHERE, \
                 LIMIT, fewer columns) or aggregate",
                size(result)
            )));
        }
        batches.push(batch);
    }
    if batches.is_empty() {
        // No rows: an empty batch still says which columns (a CSV header, a table's head, an
        // Arrow stream's schema).
        batches.push(RecordBatch::new_empty(schema));
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query waits its turn while every turn is taken, and its wait counts against its time
    /// limit; once a turn is free it runs.
    #[tokio::test]
    async fn queries_wait_their_turn_within_their_time() {
        let tables = Arc::new(RwLock::new(LiveTables::default()));
        let brief = Limits {
            time: Duration::from_millis(200),
            ..Limits::SERVED
        };
        let all = turns().available_permits() as u32;
        let held = turns().acquire_many(all).await.unwrap();
        match query_within(&tables, Scope::All, "SELECT 1", brief).await {
            Err(SqlError::Limit(message)) => {
                assert!(
                    message.starts_with("the query ran longer than 200 ms"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        drop(held);
        let answered = query_within(&tables, Scope::All, "SELECT 1", brief)
            .await
            .unwrap();
        assert_eq!(answered[0].num_rows(), 1);
    }
}
