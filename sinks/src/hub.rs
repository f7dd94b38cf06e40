//! The subscription hub: pushes each published epoch's table changes, and the live event feed,
//! to subscribers — without ever waiting for one.
//!
//! Two kinds of subscription:
//!
//! - **Table**: the rows of one live table that pass the subscriber's [`RowFilter`]. The
//!   subscriber gets a snapshot first, then, per published epoch, the rows that left (`-`) and
//!   arrived (`+`); an upsert of a key shows as `-old` and `+new`. [`table_updates`] turns a
//!   subscription into that stream.
//! - **Feed**: events as they are decoded ([`FeedItem`]), on the channels the subscriber holds
//!   (`streams`, `analytics`, `system`), passing its [`FeedFilter`].
//!
//! Every subscriber has a bounded queue: at most so many updates, and at most
//! [`Budget::per_subscriber`] bytes of them (or one larger update alone), while all queues together hold at most
//! [`Budget::total`] bytes, so subscribers that never read cannot take the memory however many
//! connections open them. Publishing never blocks: when an update does not fit the
//! subscriber is marked *lagged* and skipped. A lagged table subscriber recovers by taking a fresh
//! snapshot (it clears the mark first, so no epoch falls between the snapshot and the diffs that
//! follow it); a lagged feed subscriber is told how many events it missed. A slow client
//! therefore costs only itself.
//!
//! Rows reach the hub as JSON objects with time fields as RFC 3339 strings; every row carries
//! `tenant_id`, and a tenant's subscriptions see its own rows only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use futures_util::Stream;
use keel_sources::event::Event;
use serde_json::Value;
use tokio::sync::mpsc;
use uuid::Uuid;

pub use crate::json_row::JsonRow;
use crate::live::{LiveError, LiveTables};

/// Which rows of a table a subscriber sees: its tenant's (all, for `None`), with the given
/// columns equal to the given values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowFilter {
    /// The tenant whose rows pass; `None` passes every tenant's.
    pub tenant: Option<String>,
    /// Column → value pairs a row must all match.
    pub equals: Vec<(String, Value)>,
}

impl RowFilter {
    /// True when the changed row `row` passes (the same test as [`RowFilter::matches`] on its
    /// value, made on the columns' text).
    pub fn matches_row(&self, row: &JsonRow) -> bool {
        if let Some(tenant) = &self.tenant
            && row.str_column("tenant_id").as_deref() != Some(tenant.as_str())
        {
            return false;
        }
        self.equals
            .iter()
            .all(|(column, value)| row.column(column).is_some_and(|raw| same(raw, value)))
    }

    /// True when `row` passes.
    pub fn matches(&self, row: &Value) -> bool {
        if let Some(tenant) = &self.tenant
            && row.get("tenant_id").and_then(Value::as_str) != Some(tenant.as_str())
        {
            return false;
        }
        self.equals
            .iter()
            .all(|(column, value)| row.get(column) == Some(value))
    }
}

/// The text a value is grouped by: strings as themselves, anything else as JSON.
fn probe_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// One row change in an epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct RowChange {
    /// `-1`: the row left; `1`: it arrived.
    pub diff: i8,
    /// The row as JSON text, shared: a change goes to every subscriber it passes without a
    /// copy, and the last holder can take it (`Arc::unwrap_or_clone`).
    pub row: Arc<JsonRow>,
}

/// The text a column of `row` is grouped by, as [`probe_text`] gives it for a value.
fn row_probe(row: &JsonRow, column: &str) -> Option<String> {
    match row.str_column(column) {
        Some(text) => Some(text.into_owned()),
        None => row.column(column).map(str::to_owned),
    }
}

/// True when the JSON text `raw` is the value `value`.
fn same(raw: &str, value: &Value) -> bool {
    match value {
        Value::String(wanted) => match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
            Some(inner) if !inner.contains('\\') => inner == wanted,
            _ => serde_json::from_str::<Value>(raw).is_ok_and(|v| v == *value),
        },
        Value::Null => raw == "null",
        Value::Bool(true) => raw == "true",
        Value::Bool(false) => raw == "false",
        _ => serde_json::from_str::<Value>(raw).is_ok_and(|v| v == *value),
    }
}

/// Feed channels, as a bit set.
pub mod channel {
    /// Stream lifecycle, buffer, track list, end, pushes.
    pub const STREAMS: u8 = 1;
    /// Viewers and everything not on another channel.
    pub const ANALYTICS: u8 = 2;
    /// Nodes and load balancing.
    pub const SYSTEM: u8 = 4;
    /// Every channel.
    pub const ALL: u8 = STREAMS | ANALYTICS | SYSTEM;

    /// The bit of a channel name.
    pub fn parse(name: &str) -> Option<u8> {
        match name {
            "streams" => Some(STREAMS),
            "analytics" => Some(ANALYTICS),
            "system" => Some(SYSTEM),
            "all" => Some(ALL),
            _ => None,
        }
    }

    /// The names of the channels in `set`, in a fixed order.
    pub fn names(set: u8) -> Vec<&'static str> {
        [
            (STREAMS, "streams"),
            (ANALYTICS, "analytics"),
            (SYSTEM, "system"),
        ]
        .into_iter()
        .filter(|(bit, _)| set & bit != 0)
        .map(|(_, name)| name)
        .collect()
    }

    /// The name of a single channel bit.
    pub fn name(bit: u8) -> &'static str {
        match bit {
            STREAMS => "streams",
            SYSTEM => "system",
            _ => "analytics",
        }
    }
}

/// One decoded event on its way to feed subscribers. Client addresses are already gone.
#[derive(Debug)]
pub struct FeedItem {
    /// Its channel ([`channel`] bit).
    pub channel: u8,
    /// The event.
    pub event: Event,
    rendered: OnceLock<Arc<str>>,
}

impl FeedItem {
    /// An item for `event` on `channel`.
    pub fn new(channel: u8, event: Event) -> FeedItem {
        FeedItem {
            channel,
            event,
            rendered: OnceLock::new(),
        }
    }

    /// The event rendered once for every subscriber that wants it as text.
    pub fn rendered(&self, render: impl FnOnce(&Event) -> String) -> Arc<str> {
        self.rendered
            .get_or_init(|| Arc::from(render(&self.event)))
            .clone()
    }
}

/// Which feed events a subscriber sees. The channel set is shared with the connection, which
/// may change it while subscribed (Signalman's subscribe and unsubscribe).
#[derive(Clone, Debug, Default)]
pub struct FeedFilter {
    /// The tenant whose events pass; `None` passes every tenant's.
    pub tenant: Option<Uuid>,
    /// The channels held ([`channel`] bits).
    pub channels: Arc<AtomicU8>,
    /// Only events about this stream (public id or internal name).
    pub stream: Option<String>,
    /// Only these event types (the platform's version-2 names).
    pub types: Option<&'static [&'static str]>,
}

impl FeedFilter {
    /// A filter for `tenant` holding `channels`.
    pub fn new(tenant: Option<Uuid>, channels: u8) -> FeedFilter {
        FeedFilter {
            tenant,
            channels: Arc::new(AtomicU8::new(channels)),
            stream: None,
            types: None,
        }
    }

    /// True when `item` passes.
    pub fn matches(&self, item: &FeedItem) -> bool {
        if self.channels.load(Ordering::Relaxed) & item.channel == 0 {
            return false;
        }
        if self.tenant.is_some_and(|t| t != item.event.tenant) {
            return false;
        }
        if let Some(types) = self.types
            && !types.contains(&item.event.kind.type_name())
        {
            return false;
        }
        match &self.stream {
            None => true,
            Some(wanted) => item.event.kind.stream().is_some_and(|s| {
                s.internal_name.as_str() == wanted
                    || s.stream_id.is_some_and(|id| id.to_string() == *wanted)
            }),
        }
    }
}

/// What a subscriber's queue carries.
#[derive(Clone, Debug)]
pub enum Update {
    /// The changes of one table in one published epoch (only rows the subscriber sees).
    Rows {
        /// The table.
        table: &'static str,
        /// The epoch.
        epoch: u64,
        /// Rows out, then rows in.
        changes: Vec<RowChange>,
    },
    /// One event from the live feed.
    Event(Arc<FeedItem>),
}

impl Update {
    /// The bytes this update counts for against the queues' budgets: each row's text and its
    /// place in the list, or a fixed share per feed event (its event and rendering, shared with
    /// every other subscriber). The same update always weighs the same, so what a queue adds
    /// when it takes an update it takes off when the update leaves.
    fn weight(&self) -> usize {
        match self {
            Update::Rows { changes, .. } => {
                UPDATE_WEIGHT
                    + changes
                        .iter()
                        .map(|change| size_of::<RowChange>() + change.row.text().len())
                        .sum::<usize>()
            }
            Update::Event(_) => UPDATE_WEIGHT + EVENT_WEIGHT,
        }
    }
}

/// What an update costs a queue besides its rows: its slot and list.
const UPDATE_WEIGHT: usize = 64;
/// What a feed event counts for in a queue: about its decoded event and rendered text.
const EVENT_WEIGHT: usize = 512;

/// Bounds on the bytes subscriber queues hold: an [`Update`] counts its rows' text and their
/// places in its list, a feed event a fixed share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// What one subscriber's queue may hold (but for one larger update, taken into an empty
    /// queue alone).
    pub per_subscriber: usize,
    /// What all queues together may hold.
    pub total: usize,
}

impl Default for Budget {
    /// 16 MiB a subscriber (a reader that keeps up holds a few epochs' changes), 512 MiB in all.
    fn default() -> Self {
        Budget {
            per_subscriber: 16 << 20,
            total: 512 << 20,
        }
    }
}

/// The subscriber's side: its queue and its lag mark.
#[derive(Debug)]
pub struct Subscription {
    /// The updates, in order (taken through [`Subscription::recv`] and
    /// [`Subscription::try_recv`], which give their bytes back to the budgets).
    updates: mpsc::Receiver<Update>,
    state: Arc<SubscriberState>,
    hub: Arc<HubInner>,
}

#[derive(Debug, Default)]
struct SubscriberState {
    lagged: AtomicBool,
    missed: AtomicU64,
    /// Bytes in the queue.
    queued: AtomicUsize,
}

impl Subscription {
    /// True when updates were dropped since the last [`Subscription::recover`].
    pub fn lagged(&self) -> bool {
        self.state.lagged.load(Ordering::Acquire)
    }

    /// Clears the lag mark and says how many feed events were missed. A table subscriber takes
    /// its fresh snapshot *after* calling this, and skips queued diffs at or before the
    /// snapshot's epoch.
    pub fn recover(&self) -> u64 {
        self.state.lagged.store(false, Ordering::Release);
        self.state.missed.swap(0, Ordering::AcqRel)
    }

    /// The next update, waiting for one; `None` once the hub is gone and the queue empty.
    pub async fn recv(&mut self) -> Option<Update> {
        let update = self.updates.recv().await?;
        self.release(&update);
        Some(update)
    }

    /// The next update if one is queued.
    pub fn try_recv(&mut self) -> Result<Update, mpsc::error::TryRecvError> {
        let update = self.updates.try_recv()?;
        self.release(&update);
        Ok(update)
    }

    /// Bytes in this subscription's queue.
    pub fn queued_bytes(&self) -> usize {
        self.state.queued.load(Ordering::Relaxed)
    }

    fn release(&self, update: &Update) {
        let weight = update.weight();
        self.state.queued.fetch_sub(weight, Ordering::Relaxed);
        self.hub.queued.fetch_sub(weight, Ordering::Relaxed);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.subscribers.fetch_sub(1, Ordering::Relaxed);
        // Closed first, so nothing new is added while what is queued is given back. A send
        // already under way (its permit taken before the close) still lands: the channel says
        // `Empty`, not `Disconnected`, until it has, so wait for it rather than leave its bytes
        // counted for good.
        self.updates.close();
        loop {
            match self.updates.try_recv() {
                Ok(update) => self.release(&update),
                Err(mpsc::error::TryRecvError::Empty) => std::thread::yield_now(),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        }
    }
}

struct Subscriber<F> {
    filter: F,
    tx: mpsc::Sender<Update>,
    state: Arc<SubscriberState>,
}

impl<F> Subscriber<F> {
    /// Queues `update` unless the subscriber is lagged, its queue is full or the update would
    /// take its queue (unless empty) or all queues past the hub's [`Budget`] (then it becomes
    /// lagged and the hub counts the loss). Returns false once the subscriber is gone.
    fn offer(&self, update: Update, hub: &HubInner) -> bool {
        let dropped = &hub.dropped;
        let is_event = matches!(update, Update::Event(_));
        let lost = || {
            dropped.fetch_add(1, Ordering::Relaxed);
            if is_event {
                self.state.missed.fetch_add(1, Ordering::Relaxed);
            }
        };
        if self.state.lagged.load(Ordering::Acquire) {
            lost();
            return !self.tx.is_closed();
        }
        let weight = update.weight();
        let mine = self.state.queued.fetch_add(weight, Ordering::Relaxed) + weight;
        let all = hub.queued.fetch_add(weight, Ordering::Relaxed) + weight;
        let give_back = || {
            self.state.queued.fetch_sub(weight, Ordering::Relaxed);
            hub.queued.fetch_sub(weight, Ordering::Relaxed);
        };
        // An update larger than a queue's budget still goes into an empty queue: a large epoch
        // would otherwise never reach anyone, who would then re-read snapshots for good.
        let alone = mine == weight;
        if (mine > hub.budget.per_subscriber && !alone) || all > hub.budget.total {
            give_back();
            self.state.lagged.store(true, Ordering::Release);
            lost();
            return !self.tx.is_closed();
        }
        match self.tx.try_send(update) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                give_back();
                self.state.lagged.store(true, Ordering::Release);
                lost();
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                give_back();
                false
            }
        }
    }
}

/// One table's subscribers, and their grouping (rebuilt only when the set changes).
#[derive(Default)]
struct TableSubscribers {
    list: Vec<Subscriber<RowFilter>>,
    groups: Option<Groups>,
}

/// A subscriber group: its tenant (`None`: every tenant) and the column and value of its first
/// equality.
type GroupKey = (Option<String>, Option<(String, String)>);

/// Subscriber positions by tenant and by the column and value of their first equality; and
/// the columns that appear as a first equality.
#[derive(Default)]
struct Groups {
    by_key: HashMap<GroupKey, Vec<usize>>,
    probes: Vec<String>,
    any_tenant: bool,
}

impl Groups {
    fn of(list: &[Subscriber<RowFilter>]) -> Groups {
        let mut groups = Groups::default();
        for (index, s) in list.iter().enumerate() {
            let probe = s.filter.equals.first().map(|(column, value)| {
                if !groups.probes.contains(column) {
                    groups.probes.push(column.clone());
                }
                (column.clone(), probe_text(value))
            });
            groups.any_tenant |= s.filter.tenant.is_none();
            groups
                .by_key
                .entry((s.filter.tenant.clone(), probe))
                .or_default()
                .push(index);
        }
        groups
    }
}

#[derive(Default)]
struct HubInner {
    tables: Mutex<HashMap<&'static str, TableSubscribers>>,
    feed: Mutex<Vec<Subscriber<FeedFilter>>>,
    subscribers: AtomicUsize,
    dropped: AtomicU64,
    per_tenant: Mutex<HashMap<String, usize>>,
    /// Bytes in all subscribers' queues.
    queued: AtomicUsize,
    budget: Budget,
}

impl std::fmt::Debug for HubInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("subscribers", &self.subscribers.load(Ordering::Relaxed))
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .field("budget", &self.budget)
            .finish()
    }
}

/// The hub. Cheap to clone; all clones are one hub.
#[derive(Clone, Debug, Default)]
pub struct Hub {
    inner: Arc<HubInner>,
}

/// A connection slot of one tenant; the slot frees when this is dropped.
#[derive(Debug)]
pub struct TenantSlot {
    hub: Arc<HubInner>,
    tenant: String,
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        let mut counts = self
            .hub
            .per_tenant
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.tenant) {
            *count = count.saturating_sub(1);
        }
    }
}

impl Hub {
    /// A hub whose queues hold at most `budget`.
    pub fn with_budget(budget: Budget) -> Hub {
        Hub {
            inner: Arc::new(HubInner {
                budget,
                ..HubInner::default()
            }),
        }
    }

    /// Bytes in all subscribers' queues ([`Update`]s as their budgets count them).
    pub fn queued_bytes(&self) -> usize {
        self.inner.queued.load(Ordering::Relaxed)
    }

    /// Whether anyone subscribes to `table` (publishers skip the work of encoding otherwise).
    pub fn wants(&self, table: &str) -> bool {
        self.lock_tables()
            .get(table)
            .is_some_and(|subscribers| !subscribers.list.is_empty())
    }

    /// Whether anyone subscribes to the event feed.
    pub fn wants_events(&self) -> bool {
        !self.lock_feed().is_empty()
    }

    fn lock_tables(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, TableSubscribers>> {
        self.inner
            .tables
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_feed(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber<FeedFilter>>> {
        self.inner
            .feed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Live subscriptions.
    pub fn subscribers(&self) -> usize {
        self.inner.subscribers.load(Ordering::Relaxed)
    }

    /// Updates dropped because a subscriber's queue was full or over its byte budget.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Takes one of `tenant`'s `cap` connection slots, or `None` if all are taken.
    pub fn admit(&self, tenant: &str, cap: usize) -> Option<TenantSlot> {
        let mut counts = self
            .inner
            .per_tenant
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(tenant.to_owned()).or_insert(0);
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(TenantSlot {
            hub: self.inner.clone(),
            tenant: tenant.to_owned(),
        })
    }

    fn subscription(
        &self,
        capacity: usize,
    ) -> (Subscription, mpsc::Sender<Update>, Arc<SubscriberState>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let state = Arc::new(SubscriberState::default());
        self.inner.subscribers.fetch_add(1, Ordering::Relaxed);
        (
            Subscription {
                updates: rx,
                state: state.clone(),
                hub: self.inner.clone(),
            },
            tx,
            state,
        )
    }

    /// Subscribes to the changes of `table` that pass `filter`, with a queue of `capacity`.
    pub fn subscribe_table(
        &self,
        table: &'static str,
        filter: RowFilter,
        capacity: usize,
    ) -> Subscription {
        let (subscription, tx, state) = self.subscription(capacity);
        let mut tables = self.lock_tables();
        let subscribers = tables.entry(table).or_default();
        subscribers.list.push(Subscriber { filter, tx, state });
        subscribers.groups = None;
        subscription
    }

    /// Subscribes to feed events that pass `filter`, with a queue of `capacity`.
    pub fn subscribe_events(&self, filter: FeedFilter, capacity: usize) -> Subscription {
        let (subscription, tx, state) = self.subscription(capacity);
        self.lock_feed().push(Subscriber { filter, tx, state });
        subscription
    }

    /// Pushes one epoch's changes of `table` to its subscribers, each seeing only its rows.
    ///
    /// Subscribers are grouped by tenant and by their first equality, so a change costs a few
    /// hash lookups however many subscribers watch other streams or tenants.
    pub fn publish_rows(&self, table: &'static str, epoch: u64, changes: &[RowChange]) {
        let mut tables = self.lock_tables();
        let Some(subscribers) = tables.get_mut(table) else {
            return;
        };
        let groups = subscribers
            .groups
            .get_or_insert_with(|| Groups::of(&subscribers.list));
        let list = &subscribers.list;
        let mut mine: HashMap<usize, Vec<RowChange>> = HashMap::new();
        let mut key: GroupKey = (None, None);
        for change in changes {
            let tenant = change.row.str_column("tenant_id");
            let tenant = tenant.as_deref();
            let passes: &[Option<&str>] = match (tenant, groups.any_tenant) {
                (Some(_), true) => &[tenant, None],
                _ => &[tenant],
            };
            for &pass in passes {
                key.0 = pass.map(str::to_owned);
                key.1 = None;
                let mut visit = |key: &GroupKey| {
                    for &index in groups.by_key.get(key).into_iter().flatten() {
                        if list[index].filter.matches_row(&change.row) {
                            mine.entry(index).or_default().push(change.clone());
                        }
                    }
                };
                visit(&key);
                for column in &groups.probes {
                    if let Some(value) = row_probe(&change.row, column) {
                        key.1 = Some((column.clone(), value));
                        visit(&key);
                    }
                }
            }
        }
        let before = subscribers.list.len();
        let mut index = 0;
        subscribers.list.retain(|s| {
            let changes = mine.remove(&index);
            index += 1;
            match changes {
                None => !s.tx.is_closed(),
                Some(changes) => s.offer(
                    Update::Rows {
                        table,
                        epoch,
                        changes,
                    },
                    &self.inner,
                ),
            }
        });
        if subscribers.list.len() != before {
            subscribers.groups = None;
        }
    }

    /// Pushes decoded events to the feed subscribers whose filters pass them.
    pub fn publish_events(&self, items: &[Arc<FeedItem>]) {
        let mut feed = self.lock_feed();
        feed.retain(|s| {
            let mut alive = true;
            for item in items {
                if s.filter.matches(item) {
                    alive &= s.offer(Update::Event(item.clone()), &self.inner);
                }
            }
            alive && !s.tx.is_closed()
        });
    }
}

/// What a table subscription yields.
#[derive(Clone, Debug, PartialEq)]
pub enum TableUpdate {
    /// Every row that passes the filter as of `epoch`: replaces whatever the subscriber held
    /// (the first message, and again after the subscriber fell behind).
    Snapshot {
        /// The epoch the rows are as of (`None` before the first).
        epoch: Option<u64>,
        /// The rows.
        rows: Vec<Value>,
    },
    /// One epoch's changes: rows out (`diff` −1) and in (+1).
    Changes {
        /// The epoch.
        epoch: u64,
        /// The changes.
        changes: Vec<RowChange>,
    },
}

/// A snapshot of `table` through `filter`, and the epoch it is as of.
pub fn snapshot(
    tables: &RwLock<LiveTables>,
    table: &str,
    filter: &RowFilter,
) -> Result<TableUpdate, LiveError> {
    let tables = tables.read().unwrap_or_else(PoisonError::into_inner);
    let rows = tables.rows_json(table, filter)?;
    Ok(TableUpdate::Snapshot {
        epoch: tables.epoch(),
        rows,
    })
}

/// Subscribes to `table` through `filter` and yields a snapshot, then each epoch's changes — and
/// a fresh snapshot whenever the subscriber's queue overflowed. Ends when the hub is gone.
pub fn table_updates(
    tables: Arc<RwLock<LiveTables>>,
    hub: &Hub,
    table: &'static str,
    filter: RowFilter,
    capacity: usize,
) -> Result<impl Stream<Item = TableUpdate> + Send + 'static, LiveError> {
    tables
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .schema(table)?;
    // Subscribe before the snapshot: every epoch after it is then queued. The snapshot itself
    // is taken when the subscriber first asks for an update, so a client that opens many
    // subscriptions and reads none holds no snapshot of any.
    let subscription = hub.subscribe_table(table, filter.clone(), capacity);
    let state = TableStream {
        tables,
        table,
        filter,
        subscription,
        seen: None,
        snapshot_taken: false,
    };
    Ok(futures_util::stream::unfold(
        state,
        |mut state| async move {
            let update = state.next().await?;
            Some((update, state))
        },
    ))
}

fn first_epoch(update: &TableUpdate) -> Option<u64> {
    match update {
        TableUpdate::Snapshot { epoch, .. } => *epoch,
        TableUpdate::Changes { epoch, .. } => Some(*epoch),
    }
}

/// Most changes merged into one message from a subscriber's backlog.
const COALESCE_ROWS: usize = 4096;

struct TableStream {
    tables: Arc<RwLock<LiveTables>>,
    table: &'static str,
    filter: RowFilter,
    subscription: Subscription,
    /// The newest epoch the subscriber holds.
    seen: Option<u64>,
    /// Whether the first snapshot was taken.
    snapshot_taken: bool,
}

impl TableStream {
    async fn next(&mut self) -> Option<TableUpdate> {
        loop {
            if !self.snapshot_taken || self.subscription.lagged() {
                self.snapshot_taken = true;
                self.subscription.recover();
                // What is queued is older than the snapshot: given back now, not held until
                // read past one by one (it would count against the budgets meanwhile).
                while self.subscription.try_recv().is_ok() {}
                let fresh = snapshot(&self.tables, self.table, &self.filter).ok()?;
                self.seen = first_epoch(&fresh);
                return Some(fresh);
            }
            match self.subscription.recv().await? {
                Update::Rows {
                    mut epoch,
                    mut changes,
                    ..
                } => {
                    if self.seen.is_some_and(|seen| epoch <= seen) {
                        continue;
                    }
                    // A reader that fell behind takes what else is queued as one message: the
                    // changes in order, as of the newest epoch (fewer, larger messages exactly
                    // when the connection is the bottleneck).
                    while changes.len() < COALESCE_ROWS && !self.subscription.lagged() {
                        match self.subscription.try_recv() {
                            Ok(Update::Rows {
                                epoch: next,
                                changes: more,
                                ..
                            }) => {
                                epoch = next;
                                changes.extend(more);
                            }
                            Ok(Update::Event(_)) => {}
                            Err(_) => break,
                        }
                    }
                    self.seen = Some(epoch);
                    return Some(TableUpdate::Changes { epoch, changes });
                }
                Update::Event(_) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn change(diff: i8, tenant: &str, n: u64) -> RowChange {
        RowChange {
            diff,
            row: Arc::new(JsonRow::from_value(&json!({ "tenant_id": tenant, "n": n }))),
        }
    }

    fn tenant(t: &str) -> RowFilter {
        RowFilter {
            tenant: Some(t.to_owned()),
            equals: Vec::new(),
        }
    }

    #[tokio::test]
    async fn subscribers_see_their_tenant_only() {
        let hub = Hub::default();
        let mut a = hub.subscribe_table("t", tenant("a"), 8);
        let mut all = hub.subscribe_table("t", RowFilter::default(), 8);
        assert!(hub.wants("t") && !hub.wants("u"));
        hub.publish_rows("t", 1, &[change(1, "a", 1), change(1, "b", 2)]);
        hub.publish_rows("t", 2, &[change(1, "b", 3)]);
        let Some(Update::Rows { epoch, changes, .. }) = a.recv().await else {
            panic!("a gets epoch 1")
        };
        assert_eq!((epoch, changes), (1, vec![change(1, "a", 1)]));
        assert!(a.try_recv().is_err(), "epoch 2 holds nothing of a's");
        let Some(Update::Rows { changes, .. }) = all.recv().await else {
            panic!("the admin gets epoch 1")
        };
        assert_eq!(changes.len(), 2);
        assert_eq!(hub.subscribers(), 2);
        drop(a);
        assert_eq!(hub.subscribers(), 1);
    }

    #[test]
    fn filters_match_every_given_column() {
        let filter = RowFilter {
            tenant: Some("a".into()),
            equals: vec![("stream".into(), json!("s1")), ("n".into(), json!(2))],
        };
        assert!(filter.matches(&json!({"tenant_id": "a", "stream": "s1", "n": 2, "x": 0})));
        assert!(!filter.matches(&json!({"tenant_id": "a", "stream": "s1", "n": 3})));
        assert!(!filter.matches(&json!({"tenant_id": "b", "stream": "s1", "n": 2})));
        assert!(!filter.matches(&json!({"stream": "s1", "n": 2})));
    }

    #[tokio::test]
    async fn a_full_queue_marks_the_subscriber_lagged_without_blocking_others() {
        let hub = Hub::default();
        let slow = hub.subscribe_table("t", RowFilter::default(), 2);
        let mut fast = hub.subscribe_table("t", RowFilter::default(), 100);
        for epoch in 0..50 {
            hub.publish_rows("t", epoch, &[change(1, "a", epoch)]);
        }
        assert!(slow.lagged());
        assert_eq!(hub.dropped(), 48);
        let mut received = 0;
        while fast.try_recv().is_ok() {
            received += 1;
        }
        assert_eq!(received, 50, "the fast subscriber got every epoch");
        slow.recover();
        assert!(!slow.lagged());
    }

    /// Subscribers that never read hold at most their budget each, and all of them together
    /// at most the hub's; every byte comes back when updates are read or subscriptions end.
    #[tokio::test]
    async fn queues_hold_at_most_their_budgets() {
        let one = Update::Rows {
            table: "t",
            epoch: 0,
            changes: vec![change(1, "a", 0)],
        }
        .weight();
        let budget = Budget {
            per_subscriber: 10 * one,
            total: 25 * one,
        };
        let hub = Hub::with_budget(budget);
        let idle: Vec<Subscription> = (0..4)
            .map(|_| hub.subscribe_table("t", RowFilter::default(), 1000))
            .collect();
        let mut reader = hub.subscribe_table("t", tenant("a"), 1000);
        let mut read = 0;
        for epoch in 0..100 {
            hub.publish_rows("t", epoch, &[change(1, "a", epoch % 10)]);
            // The reader keeps up, so it never lags while others fill the budget.
            if reader.try_recv().is_ok() {
                read += 1;
            }
            for subscription in &idle {
                assert!(subscription.queued_bytes() <= budget.per_subscriber);
            }
            assert!(hub.queued_bytes() <= budget.total);
            let held: usize = idle.iter().map(Subscription::queued_bytes).sum();
            assert_eq!(hub.queued_bytes(), held + reader.queued_bytes());
        }
        assert!(idle.iter().all(Subscription::lagged));
        assert!(hub.dropped() > 0);
        // The idle ones filled the budget (once the hub's was full, the reader's next epoch
        // could not fit either), so the reader lagged too and would take a fresh snapshot.
        assert!(read < 100 && reader.lagged(), "{read}");
        drop(idle);
        assert_eq!(hub.queued_bytes(), reader.queued_bytes());
        reader.recover();
        hub.publish_rows("t", 100, &[change(1, "a", 1)]);
        assert!(
            reader.try_recv().is_ok(),
            "room again once the idle queues went"
        );
        assert_eq!(hub.queued_bytes(), 0);

        // Feed events count too.
        let feed = hub.subscribe_events(FeedFilter::new(None, channel::ALL), 1000);
        for _ in 0..100 {
            hub.publish_events(&[item(channel::STREAMS, Uuid::from_u128(1))]);
        }
        assert!(feed.queued_bytes() <= budget.per_subscriber && feed.lagged());
        assert_eq!(hub.queued_bytes(), feed.queued_bytes());
        drop(feed);
        assert_eq!(hub.queued_bytes(), 0);

        // An update larger than a queue's budget still reaches an empty queue, alone.
        drop(reader);
        let mut big = hub.subscribe_table("t", RowFilter::default(), 1000);
        let many: Vec<RowChange> = (0..40).map(|n| change(1, "a", n)).collect();
        hub.publish_rows("t", 200, &many);
        hub.publish_rows("t", 201, &many);
        assert!(big.queued_bytes() > budget.per_subscriber && big.lagged());
        assert!(matches!(
            big.try_recv(),
            Ok(Update::Rows { epoch: 200, .. })
        ));
        assert!(
            big.try_recv().is_err(),
            "the second did not fit beside the first"
        );
        assert_eq!(hub.queued_bytes(), 0);
    }

    proptest::proptest! {
        /// Whatever subscribers do (read some, recover, go, come), the hub's count is the sum
        /// of its queues', within budget (a queue past its own only by holding one update
        /// alone), and nothing once every subscriber has gone.
        #[test]
        fn queued_bytes_add_up(
            steps in proptest::collection::vec((0u8..5, 0usize..8, 1u64..40), 1..120),
            per in 1usize..6_000,
            total in 1usize..20_000,
        ) {
            let budget = Budget { per_subscriber: per, total };
            let hub = Hub::with_budget(budget);
            let mut subscribers: Vec<Subscription> = Vec::new();
            let mut largest = 0;
            for (epoch, (step, which, size)) in steps.into_iter().enumerate() {
                let pick = |len: usize| which % len.max(1);
                match step {
                    0 => subscribers.push(hub.subscribe_table("t", RowFilter::default(), 1 + which)),
                    1 => {
                        let changes: Vec<RowChange> =
                            (0..size).map(|n| change(1, "a", n)).collect();
                        hub.publish_rows("t", epoch as u64, &changes);
                        let update = Update::Rows { table: "t", epoch: 0, changes };
                        largest = largest.max(update.weight());
                    }
                    2 if !subscribers.is_empty() => {
                        let at = pick(subscribers.len());
                        let _ = subscribers[at].try_recv();
                    }
                    3 if !subscribers.is_empty() => {
                        let at = pick(subscribers.len());
                        subscribers[at].recover();
                    }
                    4 if !subscribers.is_empty() => {
                        let at = pick(subscribers.len());
                        subscribers.swap_remove(at);
                    }
                    _ => {}
                }
                let held: usize = subscribers.iter().map(Subscription::queued_bytes).sum();
                proptest::prop_assert_eq!(hub.queued_bytes(), held);
                proptest::prop_assert!(held <= total);
                for subscription in &subscribers {
                    proptest::prop_assert!(subscription.queued_bytes() <= per.max(largest));
                }
            }
            subscribers.clear();
            proptest::prop_assert_eq!(hub.queued_bytes(), 0);
        }
    }

    fn item(channel: u8, tenant: Uuid) -> Arc<FeedItem> {
        use keel_sources::event::{EventKind, UnknownEvent};
        Arc::new(FeedItem::new(
            channel,
            Event {
                id: Uuid::nil(),
                tenant,
                time: 0,
                kind: EventKind::Unknown(UnknownEvent {
                    event_type: keel_operators::sym::Sym::new("x"),
                    json: String::new(),
                }),
            },
        ))
    }

    #[tokio::test]
    async fn feeds_count_what_a_lagged_subscriber_missed() {
        let hub = Hub::default();
        let a = Uuid::from_u128(1);
        let filter = FeedFilter::new(Some(a), channel::STREAMS);
        let mut feed = hub.subscribe_events(filter.clone(), 1);
        for _ in 0..5 {
            hub.publish_events(&[
                item(channel::STREAMS, a),
                item(channel::SYSTEM, a),
                item(channel::STREAMS, Uuid::from_u128(2)),
            ]);
        }
        assert!(feed.lagged());
        assert!(feed.recv().await.is_some());
        assert_eq!(
            feed.recover(),
            4,
            "one queued, four missed; other channels and tenants do not count"
        );
        filter.channels.store(channel::SYSTEM, Ordering::Relaxed);
        hub.publish_events(&[item(channel::STREAMS, a), item(channel::SYSTEM, a)]);
        let Some(Update::Event(got)) = feed.recv().await else {
            panic!("a system event")
        };
        assert_eq!(got.channel, channel::SYSTEM, "the channel set changed live");
    }

    #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Score {
        tenant_id: String,
        k: u8,
        v: u16,
        at: i64,
    }

    impl keel_operators::table::Row for Score {
        type Key = (String, u8);
        const TIMESTAMPS: &'static [&'static str] = &["at"];
        fn key(&self) -> Self::Key {
            (self.tenant_id.clone(), self.k)
        }
    }

    /// What a subscriber holds after applying `update`.
    fn apply(held: &mut Vec<Value>, update: TableUpdate) {
        match update {
            TableUpdate::Snapshot { rows, .. } => *held = rows,
            TableUpdate::Changes { changes, .. } => {
                for change in changes {
                    if change.diff < 0 {
                        let at = held.iter().position(|r| r == change.row.value());
                        held.remove(at.expect("a removed row was held"));
                    } else {
                        held.push(Arc::unwrap_or_clone(change.row).into_value());
                    }
                }
            }
        }
    }

    fn sorted(mut rows: Vec<Value>) -> Vec<Value> {
        rows.sort_by_key(Value::to_string);
        rows
    }

    proptest::proptest! {
        /// Oracle: a subscriber that applies what it is sent — snapshot, then +/− rows, then a
        /// fresh snapshot whenever it fell behind — always ends holding exactly the rows of the
        /// table that pass its filter, however slowly it reads.
        #[test]
        fn subscribers_hold_what_the_table_holds(
            epochs in proptest::collection::vec(
                (proptest::collection::vec((0u8..2, 0u8..6, 0u16..4, proptest::bool::ANY), 0..8), 0usize..4),
                1..40,
            ),
            capacity in 1usize..4,
            only_k in proptest::option::of(0u8..6),
        ) {
            use futures_util::{FutureExt, StreamExt};
            use keel_operators::table::{Change, TableRegistry, TableSink};
            let hub = Hub::default();
            let mut live = LiveTables::default();
            live.declare::<Score>("scores");
            live.attach(hub.clone());
            live.apply("scores", Change::Upsert(Score { tenant_id: "t0".into(), k: 0, v: 9, at: 0 }));
            live.close_epoch(0);
            let tables = Arc::new(RwLock::new(live));
            let filter = RowFilter {
                tenant: Some("t0".into()),
                equals: only_k.map(|k| ("k".to_owned(), serde_json::json!(k))).into_iter().collect(),
            };
            let mut updates = Box::pin(
                table_updates(tables.clone(), &hub, "scores", filter.clone(), capacity).unwrap(),
            );
            let mut held = Vec::new();
            for (epoch, (ops, reads)) in epochs.into_iter().enumerate() {
                {
                    let mut live = tables.write().unwrap();
                    live.begin_epoch();
                    for (tenant, k, v, delete) in ops {
                        let tenant_id = format!("t{tenant}");
                        if delete {
                            live.apply("scores", Change::<Score>::Delete((tenant_id, k)));
                        } else {
                            let at = i64::from(v) * 1000;
                            live.apply("scores", Change::Upsert(Score { tenant_id, k, v, at }));
                        }
                    }
                    live.close_epoch(epoch as u64 + 1);
                }
                for _ in 0..reads {
                    match updates.next().now_or_never() {
                        Some(Some(update)) => apply(&mut held, update),
                        _ => break,
                    }
                }
            }
            while let Some(Some(update)) = updates.next().now_or_never() {
                apply(&mut held, update);
            }
            let expected = tables.read().unwrap().rows_json("scores", &filter).unwrap();
            proptest::prop_assert_eq!(sorted(held), sorted(expected));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]
        /// Oracle: a filter passes a row's text exactly when it passes the row's value.
        #[test]
        fn filters_read_row_text_as_they_read_values(
            row in proptest::collection::btree_map("[ab]", value(), 0..3),
            tenant in proptest::option::of(value()),
            wanted in proptest::option::of(value()),
            filter_tenant in proptest::option::weighted(0.3, "[xy\"\\\\]{0,1}"),
            filter_equals in proptest::collection::vec(("[ab]", value()), 0..2),
        ) {
            let mut row: serde_json::Map<String, Value> = row.into_iter().collect();
            if let Some(tenant) = tenant {
                row.insert("tenant_id".into(), tenant);
            }
            let mut equals = filter_equals;
            if let Some(wanted) = wanted {
                equals.push(("a".into(), wanted));
            }
            let row = Value::Object(row);
            let filter = RowFilter { tenant: filter_tenant, equals };
            proptest::prop_assert_eq!(filter.matches_row(&JsonRow::from_value(&row)), filter.matches(&row));
        }
    }

    fn value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        prop_oneof![
            1 => Just(Value::Null),
            1 => any::<bool>().prop_map(Value::from),
            2 => (-2i64..2).prop_map(Value::from),
            1 => (0u8..3).prop_map(|n| Value::from(f64::from(n) / 2.0)),
            6 => "[xy\"\\\\]{0,1}".prop_map(Value::from),
            1 => Just(serde_json::json!([1, "x"])),
            1 => Just(serde_json::json!({"x": 1, "a": null})),
        ]
    }

    #[test]
    fn rows_carry_times_as_text() {
        let row = crate::live::row_json(&Score {
            tenant_id: "t".into(),
            k: 1,
            v: 2,
            at: 1_500,
        });
        assert_eq!(row["at"], "1970-01-01T00:00:01.500Z");
        assert_eq!(row["v"], 2);
    }

    #[test]
    fn tenant_slots_are_capped_and_freed() {
        let hub = Hub::default();
        let first = hub.admit("a", 2).expect("a slot");
        let _second = hub.admit("a", 2).expect("a slot");
        assert!(hub.admit("a", 2).is_none());
        assert!(hub.admit("b", 2).is_some());
        drop(first);
        assert!(hub.admit("a", 2).is_some());
    }
}
