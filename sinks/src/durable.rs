//! Durable outputs: table changes staged per closed epoch, written in large batches by a thread
//! of their own, and a watermark of what is safely stored.
//!
//! The engine's publisher stages each closed epoch's changes ([`Durable::stage`]). Staged rows
//! are kept per table and key, so a key changed in many epochs is written once, with its newest
//! row: what waits to be written is bounded by the number of keys, not by time. A writer thread
//! flushes everything staged about once per `every` (one insert per table), and when the stores
//! have it all, raises the durable watermark to the newest epoch it included
//! ([`Durable::covers`]). The engine commits source positions only for epochs below that mark,
//! so a crash re-reads whatever might not be stored, and stops reading when too many epochs wait
//! (backpressure while a store is down).
//!
//! A failed write keeps its rows (newer changes to the same keys win) and is retried with
//! exponential backoff from 0.5 s to 30 s; each failure is logged and counted.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hashbrown::{DefaultHashBuilder, HashTable};
use parking_lot::{Condvar, Mutex};

use keel_operators::table::{Change, Row, TableSink};

use serde_json::Value;

use keel_sources::dead_letter::{DeadLetter, DeadLetterWriter};
use keel_sources::error::SourceError;

use crate::clickhouse::{ClickHouse, ClickHouseError, TableSpec};
use crate::sql::{SOURCE_TABLE, SqlError, SqlStore, StagedRow};

/// Why the durable stores could not start or write.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// ClickHouse.
    #[error(transparent)]
    ClickHouse(#[from] ClickHouseError),
    /// PostgreSQL or SQLite.
    #[error(transparent)]
    Sql(#[from] SqlError),
    /// The dead-letter topic.
    #[error("dead-letter topic: {0}")]
    DeadLetters(#[from] SourceError),
    /// Anything else (the writer thread, its runtime).
    #[error("{0}")]
    Other(String),
}

/// Counters of the durable writer, shown by `/metrics` and the summary line.
#[derive(Debug, Default)]
pub struct DurableStats {
    /// Rows (and tombstones) written to ClickHouse.
    pub rows_written: AtomicU64,
    /// Rows upserted into (or deleted from) the SQL state table.
    pub sql_rows_written: AtomicU64,
    /// Dead letters acknowledged by the broker.
    pub dead_letters: AtomicU64,
    /// Inserts that succeeded.
    pub inserts: AtomicU64,
    /// Flushes that failed and were retried.
    pub failures: AtomicU64,
    /// Why the stores could not be reconciled with a rebuilt state at the end of its input
    /// (a backfill then fails, as rows it no longer computes may remain).
    pub unreconciled: Mutex<Option<String>>,
    /// Rows staged and not yet written.
    pub pending_rows: AtomicU64,
    /// Rows that could not be encoded for their ClickHouse table (a row type that does not fit
    /// its table; always 0 unless Keel has a bug).
    pub encode_errors: AtomicU64,
    /// The last failure, cleared by the next success.
    pub last_error: Mutex<Option<String>>,
}

/// Rows staged for one table: the newest encoded row per key, back to back in one buffer that
/// is the insert's body. Keys live back to back in a buffer of their own, so staging a row costs
/// no allocation of its own.
#[derive(Default)]
struct Pending {
    /// Encoded rows; a row replaced by a newer one for its key stays until compaction.
    body: Vec<u8>,
    /// Every key's bytes.
    keys: Vec<u8>,
    /// One entry per key: where its bytes and its newest row lie.
    rows: HashTable<Slot>,
    hasher: DefaultHashBuilder,
    /// Bytes of `body` taken by replaced rows.
    stale: usize,
}

#[derive(Clone, Debug)]
struct Slot {
    hash: u64,
    key: Range<usize>,
    row: Range<usize>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("rows", &self.rows.len())
            .field("bytes", &self.body.len())
            .field("stale", &self.stale)
            .finish()
    }
}

impl Pending {
    /// Records the row just appended to `body` from `start` as `key`'s newest; returns whether
    /// the key is new.
    fn staged(&mut self, key: &[u8], start: usize) -> bool {
        let row = start..self.body.len();
        let new = self.place(key, row, true);
        // Keys changed in every epoch would otherwise grow the buffer with time.
        if self.stale > (1 << 26) && self.stale > self.body.len() / 2 {
            self.compact();
        }
        new
    }

    /// Points `key` at `row`: always when it is new, and when `replace` for a key already here.
    /// Returns whether the key is new.
    fn place(&mut self, key: &[u8], row: Range<usize>, replace: bool) -> bool {
        let hash = self.hasher.hash_one(key);
        let keys = &self.keys;
        match self.rows.entry(
            hash,
            |slot| slot.hash == hash && keys[slot.key.clone()] == *key,
            |slot| slot.hash,
        ) {
            hashbrown::hash_table::Entry::Occupied(mut slot) => {
                if replace {
                    let slot = slot.get_mut();
                    self.stale += slot.row.len();
                    slot.row = row;
                }
                false
            }
            hashbrown::hash_table::Entry::Vacant(slot) => {
                let start = self.keys.len();
                self.keys.extend_from_slice(key);
                slot.insert(Slot {
                    hash,
                    key: start..self.keys.len(),
                    row,
                });
                true
            }
        }
    }

    /// Drops replaced rows, so `body` holds each key's newest row once.
    fn compact(&mut self) {
        if self.stale == 0 {
            return;
        }
        let mut body = Vec::with_capacity(self.body.len() - self.stale);
        for slot in self.rows.iter_mut() {
            let start = body.len();
            body.extend_from_slice(&self.body[slot.row.clone()]);
            slot.row = start..body.len();
        }
        self.body = body;
        self.stale = 0;
    }

    /// Takes every row of `older` whose key has no newer row here; returns how many were
    /// superseded.
    fn keep_older(&mut self, older: &Pending) -> u64 {
        let mut superseded = 0;
        for slot in older.rows.iter() {
            let start = self.body.len();
            self.body.extend_from_slice(&older.body[slot.row.clone()]);
            if !self.place(&older.keys[slot.key.clone()], start..self.body.len(), false) {
                self.body.truncate(start);
                superseded += 1;
            }
        }
        superseded
    }
}

#[derive(Debug, Default)]
struct Staged {
    tables: HashMap<&'static str, Pending>,
    /// `stream_analytics` rows by (tenant, internal name); `None` removes one.
    sql: HashMap<(String, String), Option<Value>>,
    /// Dead letters, in the order they were staged.
    dead: Vec<DeadLetter>,
    /// The newest epoch whose changes are all staged, plus one (0: none).
    closed: u64,
    /// Microseconds of the last version handed out.
    last_version: u64,
}

struct Shared {
    staged: Mutex<Staged>,
    wake: Condvar,
    /// The newest epoch stored everywhere, plus one (0: none).
    durable: AtomicU64,
    /// The newest staging version stored everywhere (changes staged outside an epoch, such as
    /// reconciliation's removals, are waited for by this).
    written_version: AtomicU64,
    stop: AtomicBool,
    stats: Arc<DurableStats>,
}

/// The stores a [`Durable`] writes to.
#[derive(Clone, Debug)]
struct Stores {
    clickhouse: Option<ClickHouse>,
    /// Each ClickHouse table's column list, as its inserts name it.
    columns: Arc<HashMap<&'static str, String>>,
    sql: Option<(SqlStore, Arc<tokio::runtime::Runtime>)>,
    dead_letters: Option<Arc<DeadLetterWriter>>,
}

/// Where closed epochs become durable: ClickHouse tables and the SQL state table.
pub struct Durable {
    shared: Arc<Shared>,
    stores: Stores,
    specs: HashMap<&'static str, TableSpec>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("clickhouse", &self.stores.clickhouse)
            .field("sql", &self.stores.sql.as_ref().map(|(s, _)| s))
            .field("durable", &self.shared.durable.load(Ordering::Relaxed))
            .finish()
    }
}

/// The staging side, handed to a dataflow's change type as a [`TableSink`].
#[derive(Debug)]
pub struct Stage<'a> {
    staged: &'a mut Staged,
    specs: &'a HashMap<&'static str, TableSpec>,
    /// Whether ClickHouse is written.
    clickhouse: bool,
    sql: bool,
    /// The key bytes of the change being staged (reused).
    key: Vec<u8>,
    stats: &'a DurableStats,
    version: u64,
    added: u64,
}

impl TableSink for Stage<'_> {
    fn apply<R: Row>(&mut self, table: &'static str, change: Change<R>) {
        if self.sql && table == SOURCE_TABLE {
            let key = serde_json::to_value(change.key()).expect("keys serialize");
            if let Some([Value::String(tenant), Value::String(name)]) =
                key.as_array().map(Vec::as_slice)
            {
                let row = match &change {
                    Change::Upsert(row) => Some(serde_json::to_value(row).expect("rows serialize")),
                    Change::Delete(_) => None,
                };
                if self
                    .staged
                    .sql
                    .insert((tenant.clone(), name.clone()), row)
                    .is_none()
                {
                    self.added += 1;
                }
            }
        }
        let Some(spec) = self.specs.get(table).filter(|_| self.clickhouse) else {
            return;
        };
        let pending = self.staged.tables.entry(table).or_default();
        let start = pending.body.len();
        self.key.clear();
        match spec.encode(&change, self.version, &mut pending.body, &mut self.key) {
            Ok(()) => {
                if pending.staged(&self.key, start) {
                    self.added += 1;
                }
            }
            Err(error) => {
                // A row type that does not fit its table: a bug, reported without stopping.
                tracing::error!(%error, "row not staged for ClickHouse");
                self.stats.encode_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Durable {
    /// Starts a writer into `clickhouse` (the tables of `specs`), the SQL state database at
    /// `sql_url` and the dead-letter topic, flushing about once per `every`. The tables must
    /// exist (`keel migrate`).
    pub fn start(
        clickhouse: Option<ClickHouse>,
        specs: Vec<TableSpec>,
        sql_url: Option<&str>,
        dead_letters: Option<DeadLetterWriter>,
        every: Duration,
    ) -> Result<Arc<Durable>, StoreError> {
        // Versions are the clock's microseconds, and never below what is stored: a clock that
        // stepped back (or a host behind the last one) would otherwise write rows that lose to
        // older ones until it caught up.
        let stored_version = match &clickhouse {
            Some(clickhouse) => {
                clickhouse.check_tables(&specs)?;
                clickhouse.newest_version(&specs)?
            }
            None => 0,
        };
        let sql = match sql_url {
            Some(url) => {
                let runtime = Arc::new(
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| StoreError::Other(format!("cannot start a runtime: {e}")))?,
                );
                let store = runtime.block_on(async {
                    let store = SqlStore::connect_existing(url).await?;
                    store.check().await?;
                    Ok::<_, SqlError>(store)
                })?;
                Some((store, runtime))
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            staged: Mutex::new(Staged {
                last_version: stored_version,
                ..Staged::default()
            }),
            wake: Condvar::new(),
            durable: AtomicU64::new(0),
            written_version: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            stats: Arc::default(),
        });
        let specs: HashMap<&'static str, TableSpec> =
            specs.into_iter().map(|s| (s.name, s)).collect();
        let stores = Stores {
            clickhouse,
            columns: Arc::new(
                specs
                    .values()
                    .map(|spec| (spec.name, spec.column_list()))
                    .collect(),
            ),
            sql,
            dead_letters: dead_letters.map(Arc::new),
        };
        let durable = Arc::new(Durable {
            shared: shared.clone(),
            stores: stores.clone(),
            specs,
            writer: Mutex::new(None),
        });
        let writer = std::thread::Builder::new()
            .name("keel-durable".into())
            .spawn(move || write_loop(&shared, &stores, every))
            .map_err(|e| StoreError::Other(format!("cannot start the writer: {e}")))?;
        *durable.writer.lock() = Some(writer);
        Ok(durable)
    }

    /// The writer's counters.
    pub fn stats(&self) -> Arc<DurableStats> {
        self.shared.stats.clone()
    }

    /// The ClickHouse the writer writes to.
    pub fn clickhouse(&self) -> Option<&ClickHouse> {
        self.stores.clickhouse.as_ref()
    }

    /// Whether ClickHouse table `name` is written.
    pub fn writes(&self, name: &str) -> bool {
        self.stores.clickhouse.is_some() && self.specs.contains_key(name)
    }

    /// Whether dead letters are kept (a dead-letter topic is set).
    pub fn keeps_dead_letters(&self) -> bool {
        self.stores.dead_letters.is_some()
    }

    /// The dead-letter topic's writer, if there is one.
    pub fn dead_letter_topic(&self) -> Option<&str> {
        self.stores
            .dead_letters
            .as_deref()
            .map(|w| w.address().topic.as_str())
    }

    /// Stages dead letters; call before the epoch holding their records enters the dataflow,
    /// so the epoch is not stored before they are.
    pub fn stage_dead_letters(&self, letters: &mut Vec<DeadLetter>) {
        if letters.is_empty() || self.stores.dead_letters.is_none() {
            letters.clear();
            return;
        }
        let mut staged = self.shared.staged.lock();
        self.shared
            .stats
            .pending_rows
            .fetch_add(letters.len() as u64, Ordering::Relaxed);
        staged.dead.append(letters);
    }

    /// The SQL state database the writer writes to.
    pub fn sql(&self) -> Option<&SqlStore> {
        self.stores.sql.as_ref().map(|(s, _)| s)
    }

    /// Stages the changes `fill` hands to its sink, then marks every epoch up to `closed` as
    /// staged. Call once per closed epoch, with all of that epoch's changes.
    pub fn stage(&self, closed: Option<u64>, fill: impl FnOnce(&mut Stage<'_>)) {
        let mut staged = self.shared.staged.lock();
        let version = now_micros().max(staged.last_version.saturating_add(1));
        staged.last_version = version;
        let mut stage = Stage {
            staged: &mut staged,
            specs: &self.specs,
            clickhouse: self.stores.clickhouse.is_some(),
            sql: self.stores.sql.is_some(),
            key: Vec::new(),
            stats: &self.shared.stats,
            version,
            added: 0,
        };
        fill(&mut stage);
        let added = stage.added;
        if let Some(closed) = closed {
            staged.closed = staged.closed.max(closed + 1);
        }
        self.shared
            .stats
            .pending_rows
            .fetch_add(added, Ordering::Relaxed);
    }

    /// The keys of `table`'s rows that ClickHouse holds now (tombstoned ones left out; for a
    /// table of time windows, only windows from `since` on when given). Empty when ClickHouse is
    /// not written or does not keep this table.
    pub fn stored_keys<R: Row>(
        &self,
        table: &'static str,
        since: Option<i64>,
    ) -> Result<Vec<R::Key>, StoreError> {
        let (Some(clickhouse), Some(spec)) = (&self.stores.clickhouse, self.specs.get(table))
        else {
            return Ok(Vec::new());
        };
        clickhouse
            .current_keys(spec, since)?
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                spec.parse_key(line)
                    .map_err(|e| StoreError::Other(format!("{table}: a stored key: {e}")))
            })
            .collect()
    }

    /// Stages the removal of `keys` from `table`, as the dataflow's own deletions are staged.
    /// Returns how many were staged.
    pub fn stage_deletes<R: Row>(
        &self,
        table: &'static str,
        keys: impl IntoIterator<Item = R::Key>,
    ) -> u64 {
        let mut staged = 0;
        self.stage(None, |stage| {
            for key in keys {
                stage.apply(table, Change::<R>::Delete(key));
                staged += 1;
            }
        });
        staged
    }

    /// Whether everything up to `epoch` is stored.
    pub fn covers(&self, epoch: u64) -> bool {
        self.shared.durable.load(Ordering::Acquire) > epoch
    }

    /// Writes what is staged now and waits up to `timeout` for it to be stored. Returns whether
    /// everything staged was stored.
    pub fn sync(&self, timeout: Duration) -> bool {
        let (target, version) = {
            let staged = self.shared.staged.lock();
            (staged.closed, staged.last_version)
        };
        let deadline = Instant::now() + timeout;
        while self.shared.durable.load(Ordering::Acquire) < target
            || self.shared.written_version.load(Ordering::Acquire) < version
        {
            if Instant::now() >= deadline || self.shared.stop.load(Ordering::Acquire) {
                return false;
            }
            self.shared.wake.notify_all();
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// [`sync`](Durable::sync), then stops the writer.
    pub fn finish(&self, timeout: Duration) -> bool {
        let stored = self.sync(timeout);
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        if let Some(writer) = self.writer.lock().take() {
            let _ = writer.join();
        }
        stored
    }
}

fn write_loop(shared: &Shared, stores: &Stores, every: Duration) {
    let mut backoff = Duration::from_millis(500);
    let mut last = Instant::now();
    // After a failed write (and its backoff), the next one is due at once.
    let mut retry_now = false;
    loop {
        // Wait for the interval (or a finish request), then take everything staged.
        let (tables, sql, dead, closed, version) = {
            let mut staged = shared.staged.lock();
            loop {
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                let waited = last.elapsed();
                if waited >= every || retry_now {
                    break;
                }
                // parking_lot's lock is eventually fair: epochs staged back to back (a
                // backfill) cannot keep the writer from taking its turn.
                if !shared
                    .wake
                    .wait_for(&mut staged, every - waited)
                    .timed_out()
                {
                    // A finish request: write at once.
                    break;
                }
            }
            (
                std::mem::take(&mut staged.tables),
                std::mem::take(&mut staged.sql),
                std::mem::take(&mut staged.dead),
                staged.closed,
                staged.last_version,
            )
        };
        last = Instant::now();
        retry_now = false;
        match write_all(stores, &shared.stats, tables, sql, dead) {
            Ok(()) => {
                shared.durable.fetch_max(closed, Ordering::AcqRel);
                shared.written_version.fetch_max(version, Ordering::AcqRel);
                backoff = Duration::from_millis(500);
                *shared.stats.last_error.lock() = None;
            }
            Err(failed) => {
                let Failed {
                    error,
                    tables: unwritten,
                    sql: unwritten_sql,
                    dead: mut unwritten_dead,
                } = *failed;
                shared.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, retry_in = ?backoff, "durable write failed; positions are not committed until it succeeds");
                *shared.stats.last_error.lock() = Some(error.to_string());
                let mut staged = shared.staged.lock();
                let mut superseded = 0;
                for (table, pending) in unwritten {
                    // A change staged meanwhile is newer: keep it.
                    superseded += staged.tables.entry(table).or_default().keep_older(&pending);
                }
                for (key, row) in unwritten_sql {
                    match staged.sql.entry(key) {
                        std::collections::hash_map::Entry::Occupied(_) => superseded += 1,
                        std::collections::hash_map::Entry::Vacant(slot) => {
                            slot.insert(row);
                        }
                    }
                }
                shared
                    .stats
                    .pending_rows
                    .fetch_sub(superseded, Ordering::Relaxed);
                // Letters are sent again in their order, ahead of newer ones (a letter the broker
                // did take may then be there twice; its key tells the copies apart).
                unwritten_dead.append(&mut staged.dead);
                staged.dead = unwritten_dead;
                drop(staged);
                let sleep_until = Instant::now() + backoff;
                while Instant::now() < sleep_until && !shared.stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                // (`Instant::now() - every` panicked, killing the writer unseen, when `every`
                // was longer than the machine's uptime.)
                retry_now = true;
            }
        }
    }
}

type Unwritten = Vec<(&'static str, Pending)>;
type SqlRows = HashMap<(String, String), Option<Value>>;

/// A write that failed, with what it did not write.
struct Failed {
    error: StoreError,
    tables: Unwritten,
    sql: SqlRows,
    dead: Vec<DeadLetter>,
}

/// Writes every table's pending rows, ClickHouse first; on failure returns what is not written.
fn write_all(
    stores: &Stores,
    stats: &DurableStats,
    tables: HashMap<&'static str, Pending>,
    sql: SqlRows,
    dead: Vec<DeadLetter>,
) -> Result<(), Box<Failed>> {
    if let Some(writer) = &stores.dead_letters
        && !dead.is_empty()
    {
        if let Err(error) = writer.send_all(&dead) {
            return Err(Box::new(Failed {
                error: error.into(),
                tables: tables.into_iter().collect(),
                sql,
                dead,
            }));
        }
        let n = dead.len() as u64;
        stats.dead_letters.fetch_add(n, Ordering::Relaxed);
        stats.pending_rows.fetch_sub(n, Ordering::Relaxed);
    }
    if let Some(clickhouse) = &stores.clickhouse {
        let mut tables: Vec<(&'static str, Pending)> = tables.into_iter().collect();
        tables.sort_by_key(|(name, _)| *name);
        let mut rest = tables.into_iter();
        while let Some((table, mut pending)) = rest.next() {
            if pending.rows.is_empty() {
                continue;
            }
            let rows = pending.rows.len() as u64;
            pending.compact();
            let columns = stores.columns.get(table).map_or("", String::as_str);
            if let Err(error) = clickhouse.insert(table, columns, &pending.body) {
                let mut unwritten = vec![(table, pending)];
                unwritten.extend(rest);
                return Err(Box::new(Failed {
                    error: error.into(),
                    tables: unwritten,
                    sql,
                    dead: Vec::new(),
                }));
            }
            stats.rows_written.fetch_add(rows, Ordering::Relaxed);
            stats.inserts.fetch_add(1, Ordering::Relaxed);
            stats.pending_rows.fetch_sub(rows, Ordering::Relaxed);
        }
    }
    if let Some((store, runtime)) = &stores.sql
        && !sql.is_empty()
    {
        let rows: Vec<StagedRow> = sql
            .iter()
            .map(|((tenant, name), row)| (tenant.clone(), name.clone(), row.clone()))
            .collect();
        if let Err(error) = runtime.block_on(store.write(&rows)) {
            return Err(Box::new(Failed {
                error: error.into(),
                tables: Vec::new(),
                sql,
                dead: Vec::new(),
            }));
        }
        let n = rows.len() as u64;
        stats.sql_rows_written.fetch_add(n, Ordering::Relaxed);
        stats.pending_rows.fetch_sub(n, Ordering::Relaxed);
    }
    Ok(())
}

impl DurableStats {
    /// Appends these counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let failing = self.last_error.lock().is_some();
        let _ = write!(
            out,
            "# HELP keel_durable_rows_written_total Rows and tombstones written to ClickHouse.\n\
             # TYPE keel_durable_rows_written_total counter\n\
             keel_durable_rows_written_total {}\n\
             # HELP keel_durable_sql_rows_written_total Rows upserted into stream_analytics.\n\
             # TYPE keel_durable_sql_rows_written_total counter\n\
             keel_durable_sql_rows_written_total {}\n\
             # HELP keel_durable_dead_letters_total Dead letters acknowledged by the broker.\n\
             # TYPE keel_durable_dead_letters_total counter\n\
             keel_durable_dead_letters_total {}\n\
             # HELP keel_durable_inserts_total Inserts into ClickHouse that succeeded.\n\
             # TYPE keel_durable_inserts_total counter\n\
             keel_durable_inserts_total {}\n\
             # HELP keel_durable_failures_total Flushes that failed and are retried.\n\
             # TYPE keel_durable_failures_total counter\n\
             keel_durable_failures_total {}\n\
             # HELP keel_durable_pending_rows Rows staged and not yet written.\n\
             # TYPE keel_durable_pending_rows gauge\n\
             keel_durable_pending_rows {}\n\
             # HELP keel_durable_encode_errors_total Rows that could not be encoded for ClickHouse.\n\
             # TYPE keel_durable_encode_errors_total counter\n\
             keel_durable_encode_errors_total {}\n\
             # HELP keel_durable_failing Whether the last flush failed (1) or succeeded (0).\n\
             # TYPE keel_durable_failing gauge\n\
             keel_durable_failing {}\n",
            self.rows_written.load(Ordering::Relaxed),
            self.sql_rows_written.load(Ordering::Relaxed),
            self.dead_letters.load(Ordering::Relaxed),
            self.inserts.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
            self.pending_rows.load(Ordering::Relaxed),
            self.encode_errors.load(Ordering::Relaxed),
            u8::from(failing),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(pending: &mut Pending, key: &str, row: &str) -> bool {
        let start = pending.body.len();
        pending.body.extend_from_slice(row.as_bytes());
        pending.staged(key.as_bytes(), start)
    }

    fn rows(pending: &Pending) -> Vec<(String, String)> {
        let mut rows: Vec<(String, String)> = pending
            .rows
            .iter()
            .map(|slot| {
                (
                    String::from_utf8(pending.keys[slot.key.clone()].to_vec()).unwrap(),
                    String::from_utf8(pending.body[slot.row.clone()].to_vec()).unwrap(),
                )
            })
            .collect();
        rows.sort();
        rows
    }

    #[test]
    fn a_key_keeps_its_newest_row_and_compaction_drops_the_rest() {
        let mut pending = Pending::default();
        assert!(stage(&mut pending, "a", "a1"));
        assert!(stage(&mut pending, "b", "b1"));
        assert!(!stage(&mut pending, "a", "a22"));
        assert_eq!(pending.stale, 2);
        pending.compact();
        assert_eq!(pending.stale, 0);
        assert_eq!(pending.body.len(), 5);
        assert_eq!(
            rows(&pending),
            [("a".into(), "a22".into()), ("b".into(), "b1".into())]
        );
    }

    #[test]
    fn rows_of_a_failed_write_yield_to_newer_ones() {
        let mut failed = Pending::default();
        stage(&mut failed, "a", "old-a");
        stage(&mut failed, "b", "old-b");
        let mut now = Pending::default();
        stage(&mut now, "a", "new-a");
        assert_eq!(now.keep_older(&failed), 1);
        assert_eq!(
            rows(&now),
            [("a".into(), "new-a".into()), ("b".into(), "old-b".into())]
        );
    }
}
