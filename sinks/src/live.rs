//! Live tables: the current rows of every output, kept in memory and read as Arrow.
//!
//! A [`LiveTable`] holds one row per key in a dense vector with a hash index of positions, so
//! an upsert is one probe and a delete is a swap with the last row; nothing else is stored per
//! row. [`LiveTables`] is the set of them behind one dataflow: it is a [`TableSink`] (changes go
//! in per epoch) and a [`TableRegistry`] (tables are declared by the dataflow's change type), and
//! it records the last epoch applied, so a reader knows exactly which input its snapshot reflects.
//! A table whose rows the dataflow's workers keep themselves is registered as held
//! ([`LiveTables::hold`], [`HeldTable`]): it is read where the rows are, at the same epoch.
//!
//! Snapshots are Arrow record batches built from the rows through serde (`serde_arrow`), with the
//! row type's time fields shown as UTC millisecond timestamps.
//!
//! ```
//! use keel_operators::table::{Change, Row, TableRegistry, TableSink};
//! use keel_sinks::live::LiveTables;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
//! struct Visits { page: String, n: u64, at: i64 }
//! impl Row for Visits {
//!     type Key = String;
//!     const TIMESTAMPS: &'static [&'static str] = &["at"];
//!     fn key(&self) -> String { self.page.clone() }
//! }
//!
//! let mut tables = LiveTables::default();
//! tables.declare::<Visits>("visits");
//! tables.apply("visits", Change::Upsert(Visits { page: "/".into(), n: 1, at: 0 }));
//! tables.apply("visits", Change::Upsert(Visits { page: "/".into(), n: 2, at: 1_000 }));
//! tables.apply("visits", Change::Upsert(Visits { page: "/about".into(), n: 1, at: 0 }));
//! tables.apply("visits", Change::<Visits>::Delete("/about".into()));
//! let batch = tables.snapshot("visits").unwrap();
//! assert_eq!(batch.num_rows(), 1);
//! assert_eq!(batch.schema().field(2).data_type().to_string(), r#"Timestamp(ms, "UTC")"#);
//! ```

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use arrow::array::{RecordBatch, RecordBatchOptions};
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef, TimeUnit};
use keel_operators::chunked::ChunkedVec;
use keel_operators::posindex::PositionIndex;
use keel_operators::table::{Change, HeldTable, Row, TableRegistry, TableSink};
use keel_operators::time::format_rfc3339;
use rustc_hash::FxBuildHasher;
use serde_arrow::schema::{SchemaLike, TracingOptions};
use serde_json::Value;

use crate::hub::{Hub, JsonRow, RowChange, RowFilter};

/// Why a live table could not be read.
///
/// `Unknown` and `Columns` are the caller's mistake (a table name that was never declared,
/// columns that are not distinct columns of the table); `Arrow` means a row could not be
/// represented, which is a bug in a row type.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// No table of that name.
    #[error("no table named {0:?}")]
    Unknown(String),
    /// Columns asked for that are out of range or repeated.
    #[error("table {table} has {columns} columns: {asked:?} are not distinct columns of it")]
    Columns {
        /// The table.
        table: &'static str,
        /// Its number of columns.
        columns: usize,
        /// The columns asked for.
        asked: Vec<usize>,
    },
    /// Converting rows to Arrow failed.
    #[error("table {table}: {message}")]
    Arrow {
        /// The table.
        table: &'static str,
        /// What went wrong.
        message: String,
    },
}

/// The rows of one table, one per key.
pub struct LiveTable<R: Row> {
    name: &'static str,
    fields: Vec<FieldRef>,
    /// In chunks, so that a table of millions of rows grows without a copy of all of them.
    rows: ChunkedVec<R>,
    /// Row positions, each with 32 bits of its key's hash beside it: a look-up reads the row
    /// only when those agree, and growing the index re-files from them alone, rather than
    /// reading and hashing every row's key again.
    index: PositionIndex,
    hasher: FxBuildHasher,
    /// While someone subscribes: each key changed since the last drain, with its row before.
    journal: Option<HashMap<R::Key, Option<R>, FxBuildHasher>>,
}

impl<R: Row> fmt::Debug for LiveTable<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveTable")
            .field("name", &self.name)
            .field("rows", &self.rows.len())
            .finish()
    }
}

pub(crate) fn fields_of<R: Row>(name: &'static str) -> Vec<FieldRef> {
    let options = TracingOptions::default()
        .allow_null_fields(true)
        .strings_as_large_utf8(false);
    let traced = Vec::<FieldRef>::from_type::<R>(options)
        .unwrap_or_else(|e| panic!("row type of table {name} cannot be traced: {e}"));
    traced
        .into_iter()
        .map(|field| {
            if R::TIMESTAMPS.contains(&field.name().as_str()) {
                Arc::new(Field::new(
                    field.name(),
                    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                    field.is_nullable(),
                ))
            } else {
                field
            }
        })
        .collect()
}

impl<R: Row> LiveTable<R> {
    /// An empty table.
    pub fn new(name: &'static str) -> Self {
        LiveTable {
            name,
            fields: fields_of::<R>(name),
            rows: ChunkedVec::new(),
            index: PositionIndex::default(),
            hasher: FxBuildHasher,
            journal: None,
        }
    }

    /// The 32 bits of the key's hash the index keeps.
    fn hash_key(&self, key: &R::Key) -> u32 {
        // Truncation intended: the index keeps 32 bits and spreads them again itself.
        self.hasher.hash_one(key) as u32
    }

    /// The same 32 bits, from a row (without building its key).
    fn hash_row(&self, row: &R) -> u32 {
        let mut state = self.hasher.build_hasher();
        row.hash_key(&mut state);
        state.finish() as u32
    }

    /// Applies one change.
    pub fn apply(&mut self, change: Change<R>) {
        match change {
            Change::Upsert(row) => self.upsert(row),
            Change::Delete(key) => self.delete(&key),
        }
    }

    /// While someone subscribes, notes the row at `at` (or none) as the row before for `key`,
    /// unless `key` already changed since the last drain.
    fn note_before(&mut self, key: impl FnOnce() -> R::Key, at: Option<u32>) {
        if let Some(journal) = &mut self.journal {
            let rows = &self.rows;
            journal
                .entry(key())
                .or_insert_with(|| at.map(|at| rows[at as usize].clone()));
        }
    }

    fn upsert(&mut self, row: R) {
        let hash = self.hash_row(&row);
        let rows = &self.rows;
        let found = self.index.find(hash, |at| rows[at as usize].same_key(&row));
        self.note_before(|| row.key(), found);
        if let Some(at) = found {
            self.rows[at as usize] = row;
            return;
        }
        let at = u32::try_from(self.rows.len()).expect("fewer than 2^32 rows per table");
        self.rows.push(row);
        self.index.insert(hash, at);
    }

    fn delete(&mut self, key: &R::Key) {
        let hash = self.hash_key(key);
        let found = self.index.find(hash, Self::holds(&self.rows, key));
        self.note_before(|| key.clone(), found);
        let Some(at) = found else {
            return;
        };
        self.index.remove(hash, at);
        let last = u32::try_from(self.rows.len() - 1).expect("fewer than 2^32 rows per table");
        self.rows.swap_remove(at as usize);
        if at != last {
            // The former last row now sits where the removed one was: repoint its entry.
            let moved = self.hash_row(&self.rows[at as usize]);
            self.index.repoint(moved, last, at);
        }
    }

    /// The row for `key`, if any.
    pub fn get(&self, key: &R::Key) -> Option<&R> {
        let hash = self.hash_key(key);
        self.index
            .find(hash, Self::holds(&self.rows, key))
            .map(|at| &self.rows[at as usize])
    }

    /// Whether the row at a position (whose stored hash agrees with the key's) is the one for
    /// `key`.
    fn holds<'a>(rows: &'a ChunkedVec<R>, key: &'a R::Key) -> impl Fn(u32) -> bool + 'a {
        move |at| rows[at as usize].has_key(key)
    }

    /// Every row, in no particular order.
    pub fn rows(&self) -> &ChunkedVec<R> {
        &self.rows
    }

    /// The rows as one Arrow batch.
    pub fn snapshot(&self) -> Result<RecordBatch, LiveError> {
        self.snapshot_of(None, None, None)
    }

    /// The rows of `tenant` (every row for `None`) as one Arrow batch, of the schema's
    /// `columns` (in that order; every column for `None`), at most `limit` of them (which ones
    /// is unspecified).
    pub fn snapshot_of(
        &self,
        tenant: Option<&str>,
        columns: Option<&[usize]>,
        limit: Option<usize>,
    ) -> Result<RecordBatch, LiveError> {
        if tenant.is_none() && limit.is_none_or(|limit| limit >= self.rows.len()) {
            return batch_of(
                self.name,
                &self.fields,
                columns,
                self.rows.len(),
                &self.rows,
            );
        }
        let rows: Vec<&R> = self
            .rows
            .iter()
            .filter(|row| tenant.is_none_or(|tenant| row.tenant() == Some(tenant)))
            .take(limit.unwrap_or(usize::MAX))
            .collect();
        batch_of(self.name, &self.fields, columns, rows.len(), &rows)
    }

    /// The row whose key is `key` (the key columns' values, as [`Row::KEY_COLUMNS`] orders
    /// them), as a batch of zero or one rows of `columns` (as for
    /// [`snapshot_of`](Self::snapshot_of)). Text in `key` that no row ever held matches
    /// nothing and is not remembered.
    pub fn lookup(
        &self,
        key: &[Value],
        columns: Option<&[usize]>,
    ) -> Result<RecordBatch, LiveError> {
        let row: Vec<&R> = key_of::<R>(key)
            .as_ref()
            .and_then(|k| self.get(k))
            .into_iter()
            .collect();
        batch_of(self.name, &self.fields, columns, row.len(), &row)
    }

    /// The Arrow schema of snapshots.
    pub fn schema(&self) -> SchemaRef {
        Arc::new(Schema::new(self.fields.clone()))
    }

    /// Starts (or stops) recording which keys change, for [`LiveTable::drain_changes`].
    pub fn watch(&mut self, on: bool) {
        match (on, self.journal.is_some()) {
            (true, false) => self.journal = Some(HashMap::default()),
            (false, true) => self.journal = None,
            _ => {}
        }
    }

    /// The net changes since the last drain, as rows out (−1) then rows in (+1): a key changed
    /// several times shows once, from its first old row to its last new one, and a key that
    /// came back to where it was shows not at all.
    pub fn drain_changes(&mut self) -> Vec<RowChange> {
        let Some(journal) = &mut self.journal else {
            return Vec::new();
        };
        let journal = std::mem::take(journal);
        row_changes(
            journal
                .iter()
                .map(|(key, before)| (before.as_ref(), self.get(key))),
        )
    }

    /// The rows passing `filter`, as JSON objects.
    pub fn rows_json(&self, filter: &RowFilter) -> Vec<Value> {
        self.rows
            .iter()
            .map(row_json)
            .filter(|row| filter.matches(row))
            .collect()
    }
}

/// The key of `R` whose key columns hold `key`, if it can be one. Text no row ever held is not
/// interned (it matches nothing).
fn key_of<R: Row>(key: &[Value]) -> Option<R::Key> {
    let value = match key {
        [single] => single.clone(),
        many => Value::Array(many.to_vec()),
    };
    keel_operators::sym::lookup_only(|| serde_json::from_value(value).ok())
}

/// The `count` rows `rows` serializes (as a sequence) as one Arrow batch of table `name`, of its
/// `columns` (indices into `fields`, distinct, in the batch's order; all for `None`). With no
/// column asked, `rows` is not read and the batch carries `count` alone.
fn batch_of<T: serde::Serialize>(
    name: &'static str,
    fields: &[FieldRef],
    columns: Option<&[usize]>,
    count: usize,
    rows: &T,
) -> Result<RecordBatch, LiveError> {
    let fields: Vec<FieldRef> = match columns {
        // A row's other fields are skipped as it is written: only these columns are built.
        // (Fields are filled by name, so a column asked twice would be left empty.)
        Some(columns) => {
            let mut seen = vec![false; fields.len()];
            let distinct = columns
                .iter()
                .all(|&i| i < fields.len() && !std::mem::replace(&mut seen[i], true));
            if !distinct {
                return Err(LiveError::Columns {
                    table: name,
                    columns: fields.len(),
                    asked: columns.to_vec(),
                });
            }
            columns.iter().map(|&i| fields[i].clone()).collect()
        }
        None => fields.to_vec(),
    };
    let arrow = |e: &dyn fmt::Display| LiveError::Arrow {
        table: name,
        message: e.to_string(),
    };
    if fields.is_empty() {
        // No column at all (`SELECT count(*)`): the rows' count is all there is.
        return RecordBatch::try_new_with_options(
            Arc::new(Schema::empty()),
            Vec::new(),
            &RecordBatchOptions::new().with_row_count(Some(count)),
        )
        .map_err(|e| arrow(&e));
    }
    if count == 0 {
        return Ok(RecordBatch::new_empty(Arc::new(Schema::new(fields))));
    }
    serde_arrow::to_record_batch(&fields, rows).map_err(|e| arrow(&e))
}

/// Net changes as the hub takes them: rows out (−1), then rows in (+1).
fn row_changes<'a, R: Row>(
    pairs: impl IntoIterator<Item = (Option<&'a R>, Option<&'a R>)>,
) -> Vec<RowChange> {
    let mut outs = Vec::new();
    let mut ins = Vec::new();
    for (before, after) in pairs {
        if before == after {
            continue;
        }
        if let Some(before) = before {
            outs.push(RowChange {
                diff: -1,
                row: Arc::new(JsonRow::of(before, R::TIMESTAMPS)),
            });
        }
        if let Some(after) = after {
            ins.push(RowChange {
                diff: 1,
                row: Arc::new(JsonRow::of(after, R::TIMESTAMPS)),
            });
        }
    }
    outs.append(&mut ins);
    outs
}

/// A row as a JSON object, its time fields as RFC 3339 strings.
pub fn row_json<R: Row>(row: &R) -> Value {
    let mut value = serde_json::to_value(row).unwrap_or(Value::Null);
    if let Value::Object(fields) = &mut value {
        for name in R::TIMESTAMPS {
            if let Some(field) = fields.get_mut(*name)
                && let Some(ms) = field.as_i64()
            {
                *field = Value::String(format_rfc3339(ms));
            }
        }
    }
    value
}

/// A live table of any row type.
trait AnyTable: Send + Sync + fmt::Debug {
    fn schema(&self) -> SchemaRef;
    fn len(&self) -> usize;
    fn snapshot(&self) -> Result<RecordBatch, LiveError>;
    fn watch(&mut self, on: bool);
    /// At the close of an epoch: the net changes since the last (empty unless watched).
    fn drain_changes(&mut self) -> Vec<RowChange>;
    /// Whether the workers hold the rows (changes to the table are not applied here).
    fn is_held(&self) -> bool {
        false
    }
    /// See [`TableSink::closed`].
    fn closed(&mut self, _worker: u32, _generation: u64) {}
    /// The rows of `tenant` (all for `None`), as a `Vec` of the row type.
    fn rows_any(&self, tenant: Option<&str>) -> Box<dyn Any>;
    fn rows_json(&self, filter: &RowFilter) -> Vec<Value>;
    fn key_columns(&self) -> &'static [&'static str];
    /// See [`LiveTable::snapshot_of`].
    fn snapshot_of(
        &self,
        tenant: Option<&str>,
        columns: Option<&[usize]>,
        limit: Option<usize>,
    ) -> Result<RecordBatch, LiveError>;
    /// See [`LiveTable::lookup`].
    fn lookup(&self, key: &[Value], columns: Option<&[usize]>) -> Result<RecordBatch, LiveError>;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<R: Row> AnyTable for LiveTable<R> {
    fn schema(&self) -> SchemaRef {
        LiveTable::schema(self)
    }
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn snapshot(&self) -> Result<RecordBatch, LiveError> {
        LiveTable::snapshot(self)
    }
    fn watch(&mut self, on: bool) {
        LiveTable::watch(self, on);
    }
    fn drain_changes(&mut self) -> Vec<RowChange> {
        LiveTable::drain_changes(self)
    }
    fn rows_json(&self, filter: &RowFilter) -> Vec<Value> {
        LiveTable::rows_json(self, filter)
    }
    fn key_columns(&self) -> &'static [&'static str] {
        R::KEY_COLUMNS
    }
    fn snapshot_of(
        &self,
        tenant: Option<&str>,
        columns: Option<&[usize]>,
        limit: Option<usize>,
    ) -> Result<RecordBatch, LiveError> {
        LiveTable::snapshot_of(self, tenant, columns, limit)
    }
    fn lookup(&self, key: &[Value], columns: Option<&[usize]>) -> Result<RecordBatch, LiveError> {
        LiveTable::lookup(self, key, columns)
    }
    fn rows_any(&self, tenant: Option<&str>) -> Box<dyn Any> {
        let rows: Vec<R> = self
            .rows
            .iter()
            .filter(|row| tenant.is_none_or(|t| row.tenant() == Some(t)))
            .cloned()
            .collect();
        Box::new(rows)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// A table whose rows the workers hold, read through `held`.
struct Held<H: HeldTable> {
    name: &'static str,
    fields: Vec<FieldRef>,
    held: H,
    watched: bool,
}

impl<H: HeldTable> fmt::Debug for Held<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held").field("name", &self.name).finish()
    }
}

impl<H: HeldTable> AnyTable for Held<H> {
    fn schema(&self) -> SchemaRef {
        Arc::new(Schema::new(self.fields.clone()))
    }
    fn len(&self) -> usize {
        self.held.len()
    }
    fn snapshot(&self) -> Result<RecordBatch, LiveError> {
        self.snapshot_of(None, None, None)
    }
    fn watch(&mut self, on: bool) {
        self.watched = on;
    }
    fn drain_changes(&mut self) -> Vec<RowChange> {
        let changes = self.held.commit(self.watched);
        row_changes(
            changes
                .iter()
                .map(|(before, after)| (before.as_ref(), after.as_ref())),
        )
    }
    fn is_held(&self) -> bool {
        true
    }
    fn closed(&mut self, worker: u32, generation: u64) {
        self.held.closed(worker, generation);
    }
    fn rows_json(&self, filter: &RowFilter) -> Vec<Value> {
        self.held
            .rows(filter.tenant.as_deref())
            .iter()
            .map(row_json)
            .filter(|row| filter.matches(row))
            .collect()
    }
    fn key_columns(&self) -> &'static [&'static str] {
        <H::Row as Row>::KEY_COLUMNS
    }
    fn snapshot_of(
        &self,
        tenant: Option<&str>,
        columns: Option<&[usize]>,
        limit: Option<usize>,
    ) -> Result<RecordBatch, LiveError> {
        if columns.is_some_and(<[usize]>::is_empty) {
            // Rows counted, none read: they are not copied out of the workers' store.
            let count = self.held.count(tenant).min(limit.unwrap_or(usize::MAX));
            return batch_of(self.name, &self.fields, columns, count, &());
        }
        // Only as many rows as the scan may need are copied out.
        let rows = self.held.rows_up_to(tenant, limit.unwrap_or(usize::MAX));
        batch_of(self.name, &self.fields, columns, rows.len(), &rows)
    }
    fn lookup(&self, key: &[Value], columns: Option<&[usize]>) -> Result<RecordBatch, LiveError> {
        let row: Vec<H::Row> = key_of::<H::Row>(key)
            .and_then(|k| self.held.get(&k))
            .into_iter()
            .collect();
        batch_of(self.name, &self.fields, columns, row.len(), &row)
    }
    fn rows_any(&self, tenant: Option<&str>) -> Box<dyn Any> {
        Box::new(self.held.rows(tenant))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The live tables of one dataflow, and the last epoch applied to them.
#[derive(Debug, Default)]
pub struct LiveTables {
    /// In declaration order; a handful, so a scan beats a map (and changes name their table
    /// with the same `&'static str` it was declared with, so the scan compares pointers).
    tables: Vec<(&'static str, Box<dyn AnyTable>)>,
    epoch: Option<u64>,
    hub: Option<Hub>,
}

impl TableRegistry for LiveTables {
    fn declare<R: Row>(&mut self, table: &'static str) {
        let boxed: Box<dyn AnyTable> = Box::new(LiveTable::<R>::new(table));
        match self.tables.iter_mut().find(|(name, _)| *name == table) {
            Some(entry) => entry.1 = boxed,
            None => self.tables.push((table, boxed)),
        }
    }
}

impl TableSink for LiveTables {
    fn apply<R: Row>(&mut self, table: &'static str, change: Change<R>) {
        if let Some(live) = self.table_mut::<R>(table) {
            live.apply(change);
        }
    }

    fn closed(&mut self, worker: u32, generation: u64) {
        for (_, table) in &mut self.tables {
            table.closed(worker, generation);
        }
    }
}

impl LiveTables {
    /// The typed table `name`. Panics if it was declared with another row type or not at all,
    /// which is a wiring bug, not a runtime condition.
    pub fn table<R: Row>(&self, name: &str) -> &LiveTable<R> {
        self.get(name)
            .ok()
            .and_then(|t| t.as_any().downcast_ref())
            .unwrap_or_else(|| panic!("table {name} is not declared with this row type"))
    }

    /// The typed table `name`, `None` when its rows are held by the workers (changes to it are
    /// not kept here). Panics if it was declared with another row type or not at all.
    fn table_mut<R: Row>(&mut self, name: &'static str) -> Option<&mut LiveTable<R>> {
        let index = self
            .tables
            .iter()
            .position(|(n, _)| std::ptr::eq(*n, name))
            .or_else(|| self.tables.iter().position(|(n, _)| *n == name));
        let table = index.map(|i| &mut self.tables[i].1);
        match table {
            Some(table) if table.is_held() => None,
            Some(table) => Some(
                table
                    .as_any_mut()
                    .downcast_mut()
                    .unwrap_or_else(|| panic!("table {name} is not declared with this row type")),
            ),
            None => panic!("table {name} is not declared"),
        }
    }

    /// Registers `name` (replacing its declaration, if any) as a table whose rows the workers
    /// hold and `held` reads.
    pub fn hold<H: HeldTable>(&mut self, name: &'static str, held: H) {
        let boxed: Box<dyn AnyTable> = Box::new(Held {
            name,
            fields: fields_of::<H::Row>(name),
            held,
            watched: false,
        });
        match self.tables.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = boxed,
            None => self.tables.push((name, boxed)),
        }
    }

    /// The rows of `name` belonging to `tenant` (all rows for `None`), copied out, whether the
    /// table keeps them or the workers hold them. Panics if `name` does not have rows of type
    /// `R`, which is a wiring bug.
    pub fn rows_of<R: Row>(&self, name: &str, tenant: Option<&str>) -> Vec<R> {
        self.get(name)
            .ok()
            .and_then(|t| t.rows_any(tenant).downcast::<Vec<R>>().ok())
            .map(|rows| *rows)
            .unwrap_or_else(|| panic!("table {name} is not declared with this row type"))
    }

    /// The held table `name`. Panics if it is not held by a `H`, which is a wiring bug.
    pub fn held<H: HeldTable>(&self, name: &str) -> &H {
        self.held_by(name)
            .unwrap_or_else(|| panic!("table {name} is not held this way"))
    }

    /// The held table `name`, if a `H` holds it.
    pub fn held_by<H: HeldTable>(&self, name: &str) -> Option<&H> {
        self.get(name)
            .ok()
            .and_then(|t| t.as_any().downcast_ref::<Held<H>>())
            .map(|held| &held.held)
    }

    /// Table names, in declaration order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.tables.iter().map(|(name, _)| *name)
    }

    /// Number of rows in `name`.
    pub fn len(&self, name: &str) -> Result<usize, LiveError> {
        self.get(name).map(|t| t.len())
    }

    /// The Arrow schema of `name`.
    pub fn schema(&self, name: &str) -> Result<SchemaRef, LiveError> {
        self.get(name).map(|t| t.schema())
    }

    /// The rows of `name` as one Arrow batch.
    pub fn snapshot(&self, name: &str) -> Result<RecordBatch, LiveError> {
        self.get(name)?.snapshot()
    }

    /// The rows of `name` belonging to `tenant` (all rows for `None`) as one Arrow batch, of
    /// the schema's `columns` in that order (all for `None`), at most `limit` rows (which ones
    /// is unspecified): a query reading a few columns of a large table builds only those, and
    /// one that wants a few rows reads only those.
    pub fn snapshot_of(
        &self,
        name: &str,
        tenant: Option<&str>,
        columns: Option<&[usize]>,
        limit: Option<usize>,
    ) -> Result<RecordBatch, LiveError> {
        self.get(name)?.snapshot_of(tenant, columns, limit)
    }

    /// The columns `name`'s key is made of, in order; empty if it offers no lookups.
    pub fn key_columns(&self, name: &str) -> Result<&'static [&'static str], LiveError> {
        self.get(name).map(|t| t.key_columns())
    }

    /// The row of `name` whose key columns hold `key`, as a batch of zero or one rows of
    /// `columns` (as for [`snapshot_of`](Self::snapshot_of)).
    pub fn lookup(
        &self,
        name: &str,
        key: &[Value],
        columns: Option<&[usize]>,
    ) -> Result<RecordBatch, LiveError> {
        self.get(name)?.lookup(key, columns)
    }

    fn get(&self, name: &str) -> Result<&dyn AnyTable, LiveError> {
        self.tables
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| &**t)
            .ok_or_else(|| LiveError::Unknown(name.to_owned()))
    }

    /// Pushes every epoch's net changes to `hub`'s subscribers from now on.
    pub fn attach(&mut self, hub: Hub) {
        self.hub = Some(hub);
    }

    /// The hub changes go to, if any.
    pub fn hub(&self) -> Option<&Hub> {
        self.hub.as_ref()
    }

    /// Called before an epoch's changes are applied: tables with subscribers start recording
    /// what changes, the others stop.
    pub fn begin_epoch(&mut self) {
        let Some(hub) = &self.hub else {
            return;
        };
        for (name, table) in &mut self.tables {
            table.watch(hub.wants(name));
        }
    }

    /// Records that every change of epochs up to `epoch` has been applied (held tables show
    /// it from now on too), and pushes the net changes since the last close to the hub.
    pub fn close_epoch(&mut self, epoch: u64) {
        self.epoch = Some(epoch);
        for (name, table) in &mut self.tables {
            let changes = table.drain_changes();
            if let Some(hub) = &self.hub
                && !changes.is_empty()
            {
                hub.publish_rows(name, epoch, &changes);
            }
        }
    }

    /// The rows of `name` passing `filter`, as JSON objects.
    pub fn rows_json(&self, name: &str, filter: &RowFilter) -> Result<Vec<Value>, LiveError> {
        Ok(self.get(name)?.rows_json(filter))
    }

    /// The last epoch whose changes are all applied, `None` before the first.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::{Deserialize, Serialize};
    use std::collections::HashMap;

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct Pair {
        k: u8,
        v: Option<String>,
    }

    impl Row for Pair {
        type Key = u8;
        fn key(&self) -> u8 {
            self.k
        }
    }

    proptest! {
        /// Any sequence of upserts and deletes leaves exactly the rows a plain map would hold,
        /// and every row stays reachable through the index.
        #[test]
        fn behaves_like_a_map(ops in prop::collection::vec((any::<bool>(), 0u8..40, any::<u16>()), 0..400)) {
            let mut table = LiveTable::<Pair>::new("pairs");
            let mut model: HashMap<u8, Pair> = HashMap::new();
            for (upsert, k, v) in ops {
                if upsert {
                    let row = Pair { k, v: (v % 3 != 0).then(|| v.to_string()) };
                    model.insert(k, row.clone());
                    table.apply(Change::Upsert(row));
                } else {
                    model.remove(&k);
                    table.apply(Change::Delete(k));
                }
                prop_assert_eq!(table.rows().len(), model.len());
            }
            for (k, row) in &model {
                prop_assert_eq!(table.get(k), Some(row));
            }
            let batch = table.snapshot().unwrap();
            prop_assert_eq!(batch.num_rows(), model.len());
        }

        /// While watched, each drain yields exactly the net difference between the rows at the
        /// last drain and now: the rows gone or changed out, the rows new or changed in.
        #[test]
        fn drains_give_the_net_changes(
            rounds in prop::collection::vec(
                prop::collection::vec((any::<bool>(), 0u8..12, 0u16..4), 0..30),
                1..6,
            ),
        ) {
            let mut table = LiveTable::<Pair>::new("pairs");
            table.watch(true);
            let mut model: HashMap<u8, Pair> = HashMap::new();
            for ops in rounds {
                let before = model.clone();
                for (upsert, k, v) in ops {
                    if upsert {
                        let row = Pair { k, v: Some(v.to_string()) };
                        model.insert(k, row.clone());
                        table.apply(Change::Upsert(row));
                    } else {
                        model.remove(&k);
                        table.apply(Change::Delete(k));
                    }
                }
                let text = |row: &Pair| JsonRow::of(row, &[]).text().to_owned();
                let mut expected: Vec<(i8, String)> = Vec::new();
                for (k, row) in &before {
                    if model.get(k) != Some(row) {
                        expected.push((-1, text(row)));
                    }
                }
                for (k, row) in &model {
                    if before.get(k) != Some(row) {
                        expected.push((1, text(row)));
                    }
                }
                let mut got: Vec<(i8, String)> = table
                    .drain_changes()
                    .iter()
                    .map(|change| (change.diff, change.row.text().to_owned()))
                    .collect();
                // Rows out come before rows in.
                prop_assert!(got.windows(2).all(|w| w[0].0 <= w[1].0));
                got.sort();
                expected.sort();
                prop_assert_eq!(got, expected);
            }
        }
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct Wide<V = u32> {
        k: u32,
        v: V,
    }

    impl<V> Row for Wide<V>
    where
        V: Serialize + serde::de::DeserializeOwned + Clone + fmt::Debug + PartialEq,
        V: Send + Sync + 'static,
    {
        type Key = u32;
        fn key(&self) -> u32 {
            self.k
        }
    }

    /// Past several chunks of rows and many index growths, with deletes moving rows between
    /// chunks: every row stays reachable by its key and no deleted key answers.
    #[test]
    fn large_tables_keep_every_row_reachable() {
        let mut table = LiveTable::<Wide>::new("wide");
        let n = 3 * keel_operators::chunked::CHUNK as u32 + 17;
        for k in 0..n {
            table.apply(Change::Upsert(Wide { k, v: k }));
        }
        for k in (0..n).step_by(3) {
            table.apply(Change::Delete(k));
        }
        for k in (1..n).step_by(3) {
            table.apply(Change::Upsert(Wide { k, v: k + 1 }));
        }
        for k in 0..n {
            let expected = match k % 3 {
                0 => None,
                1 => Some(Wide { k, v: k + 1 }),
                _ => Some(Wide { k, v: k }),
            };
            assert_eq!(table.get(&k), expected.as_ref(), "key {k}");
        }
        let live = n as usize - (0..n).step_by(3).count();
        assert_eq!(table.rows().len(), live);
        assert_eq!(table.snapshot().unwrap().num_rows(), live);
    }

    /// A snapshot or lookup of some columns is the full one projected to them, in the order
    /// asked, with no column at all still counting the rows; a column past the schema is an
    /// error.
    #[test]
    fn only_the_columns_asked_for_are_built() {
        let mut table = LiveTable::<Wide>::new("wide");
        for k in 0..100 {
            table.apply(Change::Upsert(Wide { k, v: 1000 - k }));
        }
        let full = table.snapshot().unwrap();
        assert_eq!(full.num_columns(), 2);
        for columns in [&[][..], &[0], &[1], &[1, 0], &[0, 1]] {
            let some = table.snapshot_of(None, Some(columns), None).unwrap();
            assert_eq!(some, full.project(columns).unwrap(), "{columns:?}");
            assert_eq!(some.num_rows(), 100, "{columns:?}");
            let one = table.lookup(&[Value::from(7)], Some(columns)).unwrap();
            assert_eq!((one.num_rows(), one.num_columns()), (1, columns.len()));
        }
        let one = table.lookup(&[Value::from(7)], Some(&[1])).unwrap();
        let v = one
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::UInt32Array>();
        assert_eq!(v.map(|v| v.value(0)), Some(993));
        // At most `limit` rows, each one of the table's.
        for limit in [0, 7, 100, 1000] {
            let few = table.snapshot_of(None, None, Some(limit)).unwrap();
            assert_eq!(few.num_rows(), limit.min(100));
            let ks = few
                .column(0)
                .as_any()
                .downcast_ref::<arrow::array::UInt32Array>();
            let vs = few
                .column(1)
                .as_any()
                .downcast_ref::<arrow::array::UInt32Array>();
            for (k, v) in ks.unwrap().iter().zip(vs.unwrap().iter()) {
                assert_eq!(table.get(&k.unwrap()).map(|row| row.v), v);
            }
        }
        let missing = table.lookup(&[Value::from(100)], Some(&[])).unwrap();
        assert_eq!((missing.num_rows(), missing.num_columns()), (0, 0));
        for wrong in [&[2][..], &[1, 1], &[0, 1, 0]] {
            let error = table.snapshot_of(None, Some(wrong), None).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!("table wide has 2 columns: {wrong:?} are not distinct columns of it"),
            );
        }
    }

    /// A value that counts how often it is written.
    #[derive(Clone, Debug, PartialEq, Deserialize)]
    struct Watched(u32);

    static WRITTEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    impl Serialize for Watched {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            WRITTEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            serializer.serialize_u32(self.0)
        }
    }

    /// A column that is not asked for is not built: its values are never written.
    #[test]
    fn columns_not_asked_for_are_not_written() {
        use std::sync::atomic::Ordering::Relaxed;
        let mut table = LiveTable::<Wide<Watched>>::new("costly");
        for k in 0..10 {
            table.apply(Change::Upsert(Wide { k, v: Watched(k) }));
        }
        let before = WRITTEN.load(Relaxed);
        for columns in [&[][..], &[0]] {
            table.snapshot_of(None, Some(columns), None).unwrap();
            table.lookup(&[Value::from(3)], Some(columns)).unwrap();
        }
        assert_eq!(WRITTEN.load(Relaxed), before);
        table.snapshot_of(None, Some(&[1]), None).unwrap();
        assert_eq!(WRITTEN.load(Relaxed), before + 10);
    }

    /// Rows held elsewhere, counting how often they are copied out.
    #[derive(Default)]
    struct Elsewhere {
        rows: Vec<Wide>,
        copies: std::sync::atomic::AtomicUsize,
    }

    impl HeldTable for Elsewhere {
        type Row = Wide;
        fn closed(&mut self, _worker: u32, _generation: u64) {}
        fn commit(&mut self, _diff: bool) -> Vec<keel_operators::table::BeforeAfter<Wide>> {
            Vec::new()
        }
        fn len(&self) -> usize {
            self.rows.len()
        }
        fn rows(&self, _tenant: Option<&str>) -> Vec<Wide> {
            self.copies
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.rows.clone()
        }
        fn get(&self, key: &u32) -> Option<Wide> {
            self.rows.iter().find(|row| row.k == *key).cloned()
        }
    }

    /// A held table gives the same projections; counting all its rows copies none out.
    #[test]
    fn held_rows_are_counted_without_being_copied() {
        let mut tables = LiveTables::default();
        let rows = (0..50).map(|k| Wide { k, v: k * 2 }).collect();
        tables.hold(
            "wide",
            Elsewhere {
                rows,
                ..Elsewhere::default()
            },
        );
        let copies = |tables: &LiveTables| {
            let held: &Elsewhere = tables.held_by("wide").unwrap();
            held.copies.load(std::sync::atomic::Ordering::Relaxed)
        };
        let count = tables.snapshot_of("wide", None, Some(&[]), None).unwrap();
        assert_eq!((count.num_rows(), count.num_columns()), (50, 0));
        assert_eq!(copies(&tables), 0);
        let full = tables.snapshot("wide").unwrap();
        let one = tables.snapshot_of("wide", None, Some(&[1]), None).unwrap();
        assert_eq!(one, full.project(&[1]).unwrap());
        assert_eq!(copies(&tables), 2);
        // A limited scan copies out only that many rows; a limited count reads none.
        let few = tables
            .snapshot_of("wide", None, Some(&[0]), Some(5))
            .unwrap();
        assert_eq!(few.num_rows(), 5);
        let counted = tables
            .snapshot_of("wide", None, Some(&[]), Some(5))
            .unwrap();
        assert_eq!(counted.num_rows(), 5);
        assert_eq!(copies(&tables), 3);
        let found = tables.lookup("wide", &[Value::from(3)], Some(&[])).unwrap();
        assert_eq!((found.num_rows(), found.num_columns()), (1, 0));
    }

    #[test]
    fn unknown_tables_are_errors() {
        let tables = LiveTables::default();
        assert_eq!(
            tables.snapshot("nope").unwrap_err().to_string(),
            "no table named \"nope\""
        );
    }
}
