//! Output tables as dataflows produce them: keyed rows and their changes.
//!
//! A dataflow output is a table of [`Row`]s with a primary key. Per closed epoch, an operator
//! reports each key it changed exactly once, as a [`Change`]: the row's new value, or its removal.
//! That is an upsert stream; a sink that keeps the previous rows (a live table does) can turn it
//! into `(row, diff)` pairs for subscribers, and idempotent stores (ClickHouse
//! `ReplacingMergeTree`, SQL upserts) apply it directly. Operators therefore keep only current
//! state, never copies of what they already published.
//!
//! Sinks implement [`TableSink`]; a dataflow's change type knows how to hand each change to the
//! right table, and which tables exist ([`TableSet`]), so adding an output adds no sink code.
//!
//! ```
//! use keel_operators::table::{Change, Row, TableSink};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
//! struct Count { word: String, n: u64 }
//! impl Row for Count {
//!     type Key = String;
//!     fn key(&self) -> String { self.word.clone() }
//! }
//!
//! /// A sink that logs which keys changed.
//! #[derive(Default)]
//! struct Log(Vec<String>);
//! impl TableSink for Log {
//!     fn apply<R: Row>(&mut self, table: &'static str, change: Change<R>) {
//!         self.0.push(format!("{table}: {:?}", change.key()));
//!     }
//! }
//! let mut log = Log::default();
//! log.apply("counts", Change::Upsert(Count { word: "a".into(), n: 2 }));
//! log.apply("counts", Change::<Count>::Delete("b".into()));
//! assert_eq!(log.0, ["counts: \"a\"", "counts: \"b\""]);
//! ```

use std::fmt::Debug;
use std::hash::{Hash, Hasher};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A row of an output table.
pub trait Row:
    Serialize + DeserializeOwned + Clone + Debug + PartialEq + Send + Sync + 'static
{
    /// The primary key.
    type Key: Serialize + DeserializeOwned + Clone + Debug + Hash + Eq + Ord + Send + Sync + 'static;
    /// Fields holding milliseconds since the epoch, which sinks present as UTC timestamps.
    const TIMESTAMPS: &'static [&'static str] = &[];
    /// The columns the key is made of, in the key's order (a tuple key serializes as an array
    /// of them). Empty: lookups by key are not offered.
    const KEY_COLUMNS: &'static [&'static str] = &[];
    /// Text columns with few distinct values, which stores may dictionary-encode (ClickHouse
    /// `LowCardinality`).
    const LOW_CARDINALITY: &'static [&'static str] = &[];
    /// How long stores keep a row after its first timestamp key column, in days (`None`: for
    /// ever). Only meaningful for rows keyed by a time window.
    const RETENTION_DAYS: Option<u32> = None;
    /// The tenant this row belongs to, if it belongs to one.
    fn tenant(&self) -> Option<&str> {
        None
    }
    /// This row's key.
    fn key(&self) -> Self::Key;
    /// Whether this row's key is `key`. The same as `self.key() == *key`; rows whose key owns
    /// heap data answer without building one.
    fn has_key(&self, key: &Self::Key) -> bool {
        self.key() == *key
    }
    /// Feeds this row's key to `state`: the same as `self.key().hash(state)`; rows whose key
    /// owns heap data hash its parts in place.
    fn hash_key<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
    /// Whether `other` has this row's key: the same as `other.has_key(&self.key())`.
    fn same_key(&self, other: &Self) -> bool {
        other.has_key(&self.key())
    }
}

/// One change to a keyed table within an epoch.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(bound = "")]
pub enum Change<R: Row> {
    /// The row for its key is now this.
    Upsert(R),
    /// The key has no row any more.
    Delete(R::Key),
}

impl<R: Row> Change<R> {
    /// The key this change is about.
    pub fn key(&self) -> R::Key {
        match self {
            Change::Upsert(row) => row.key(),
            Change::Delete(key) => key.clone(),
        }
    }
}

/// Something that applies table changes (a live table set, a database writer).
pub trait TableSink {
    /// Applies one change to `table`.
    fn apply<R: Row>(&mut self, table: &'static str, change: Change<R>);
    /// Worker `worker` has reported every change of its states up to its close number
    /// `generation` (see [`HeldTable`]). Sinks without held tables ignore it.
    fn closed(&mut self, worker: u32, generation: u64) {
        let _ = (worker, generation);
    }
}

/// A row before and after a change (`None`: no row).
pub type BeforeAfter<R> = (Option<R>, Option<R>);

/// A table whose rows the dataflow's workers hold in their own state, read where they are
/// instead of being copied into the sink.
///
/// Each worker numbers its closes (generations, rising from 1). The worker's state keeps, for every
/// row it changes after a generation it has not yet seen published, the row as it was before:
/// so a reader that knows, per worker, the newest generation published (its *boundary*) sees
/// every row exactly as the published epoch left it, whatever the worker has absorbed since.
/// The sink learns of generations through [`TableSink::closed`], which travels with the
/// epoch's changes, and makes them visible at once for all tables (`commit`), so a held table
/// and the copied tables always show the same epoch.
pub trait HeldTable: Send + Sync + 'static {
    /// The row type.
    type Row: Row;
    /// Notes that `worker` closed `generation`; not visible before the next `commit`.
    fn closed(&mut self, worker: u32, generation: u64);
    /// Makes every generation noted so far visible. With `diff`, returns each row that changed
    /// since the previous commit as (row before, row after), `None` for no row.
    fn commit(&mut self, diff: bool) -> Vec<BeforeAfter<Self::Row>>;
    /// Number of rows visible.
    fn len(&self) -> usize;
    /// Whether no row is visible.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of visible rows of `tenant` (all for `None`): `rows(tenant).len()`, which an
    /// implementation may count without copying the rows out.
    fn count(&self, tenant: Option<&str>) -> usize {
        match tenant {
            None => self.len(),
            Some(_) => self.rows(tenant).len(),
        }
    }
    /// The visible rows of `tenant` (all for `None`), in no particular order.
    fn rows(&self, tenant: Option<&str>) -> Vec<Self::Row>;
    /// At most `limit` of the rows [`rows`](Self::rows) gives (which ones is unspecified), for
    /// a scan that needs no more; an implementation may stop reading there.
    fn rows_up_to(&self, tenant: Option<&str>, limit: usize) -> Vec<Self::Row> {
        let mut rows = self.rows(tenant);
        rows.truncate(limit);
        rows
    }
    /// The visible row whose key is `key`.
    fn get(&self, key: &<Self::Row as Row>::Key) -> Option<Self::Row>;
}

/// Something that learns which tables exist and their row types.
pub trait TableRegistry {
    /// Declares `table` with rows of type `R`.
    fn declare<R: Row>(&mut self, table: &'static str);
}

/// The tables a dataflow outputs, and how its change records reach them.
pub trait TableSet: Sized {
    /// Declares every table to `registry`.
    fn declare_all(registry: &mut impl TableRegistry);
    /// Hands this change to its table in `sink`.
    fn apply_to(self, sink: &mut impl TableSink);
}
