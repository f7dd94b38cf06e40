//! The engine: one source, the Periscope dataflow on N timely workers, live tables out.
//!
//! Each worker runs the same loop: read a batch from its share of the source, decode it (good
//! records become events, bad ones error rows), send it into the dataflow as one epoch, and step
//! the dataflow. Epochs are microseconds since start, so idle workers keep advancing with the
//! clock (every millisecond) and no worker holds back the others. When the source could not
//! fill a batch, the worker publishes what is in flight before reading again, so a lone event
//! shows in the tables within a millisecond or so. All table changes are routed to worker 0, which
//! applies each epoch to the live tables once every worker has passed it — so a reader always
//! sees whole epochs, and [`LiveTables::epoch`] says which.
//!
//! Changes of tables someone subscribes to go to the [`Hub`] as each epoch closes; decoded
//! events go to feed subscribers straight from the worker that read them, client addresses
//! removed, before they enter the dataflow.
//!
//! A worker keeps at most [`EngineOptions::max_inflight`] batches unpublished (backpressure), and
//! tells its source reader when a batch's epoch is published, which is when Kafka positions may
//! be committed.

use keel_operators::time::now_ms;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use keel_api::metrics::EngineStats;
use keel_dataflows::foghorn::{FleetCell, LoadInput, PublishEvery, foghorn, publish_fleet};
use keel_dataflows::periscope::{HeldSessions, PeriscopeChange, SessionStore, periscope};
use keel_dataflows::signalman;
use keel_operators::table::{Change, TableSet, TableSink as _};
use keel_sinks::durable::Durable;
use keel_sinks::hub::{FeedItem, Hub, channel};
use keel_sinks::live::LiveTables;
use keel_sources::codec::{TimeBounds, decode_checked};
use keel_sources::dead_letter::dead_letter;
use keel_sources::error::{IngestError, excerpt};
use keel_sources::event::Event;
use keel_sources::memory::{InjectedEvent, Injector};
use keel_sources::record::Record;
use keel_sources::source::{Batch, Poll, Source};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::{Input, input::Handle as InputHandle};
use timely::dataflow::operators::{Capability, Probe, probe};

use crate::reconcile::{Coverage, Stored};
use crate::store::RawEventRow;

/// How long a caught-up engine lets its own records (routing decisions) gather before it reads
/// them: under routing load this makes at most about 200 epochs a second rather than one per
/// handful of decisions (each epoch costs a wake-up, progress tracking and a snapshot patch), a
/// decision still reaches the pending viewers well within Foghorn's 30 s, and a node update that
/// comes in meanwhile waits at most this long (freshness stays far inside its 100 ms).
const INJECTED_LINGER: Duration = Duration::from_millis(5);

/// Most records read and decoded at a time within an epoch. An epoch's raw bytes are never all
/// held at once: with replays' 8,192-record epochs of ~900-byte records, that was some 12 MB of
/// buffer (12 bytes per session in the memory benchmark), and it grew with `--batch`.
const READ_CHUNK: usize = 1024;

/// Most records per worker per epoch for a replay that runs to its end and is read once it has
/// (`keel sql`, `keel backfill`): nobody reads its tables between epochs, so it need not keep
/// epochs short for freshness, and an epoch's fixed work (every stream with open sessions
/// republishes the values that follow the watermark, see [`Pace`]; a backfill also stages each
/// epoch's changed rows for the stores) is spread over eight times as many records as at
/// `keel run`'s 8,192. On the 10-million-event benchmark that made the replay about 8 % faster
/// (5–11 % run by run) and did not raise the memory per open session (BENCHMARKS.md, thirteenth
/// sitting); a backfill of a million events into ClickHouse took a quarter to a third less CPU
/// (seventeenth sitting).
pub const REPLAY_BATCH: usize = 65_536;

/// How long a caught-up engine lets records gather before its next epoch.
///
/// Closing an epoch costs more than its records: when the newest event time moves, every stream
/// with open sessions republishes the values that grow with it (viewer-seconds of the stream,
/// of its countries and of its current window). With a thousand open streams that is about half
/// a millisecond per epoch, and a caught-up engine that read records as soon as they came closed
/// about 1,500 epochs a second at 50,000 events/s, spending most of a core on that fixed work.
/// So after publishing an epoch that took `busy`, a caught-up worker waits `ratio × busy` (at
/// most `most`) before it reads again: while epochs take less than `most / ratio`, fixed
/// per-epoch work takes at most about `1 / (1 + ratio)` of a worker; a lone event after a quiet
/// spell is read at once, and an event waits at most `most` longer than it would have. A worker
/// that is behind (it filled a batch) never waits, and neither does one while anybody subscribes
/// to live changes: their latency is better served by small epochs, whose changes the API
/// streams out while the next epoch is computed (with 1,000 subscribers at 30,000 events/s,
/// pacing saved 0.1–0.15 of a core but raised p50 from about 2 ms to 8–9 ms and p99 from 40–50
/// ms to 52–68 ms, because each epoch then fans out as one larger burst of messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    /// Wait this many times as long as the last epoch took (0: never wait).
    pub ratio: u32,
    /// The longest wait.
    pub most: Duration,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            ratio: 1,
            most: Duration::from_millis(2),
        }
    }
}

impl Pace {
    /// How long to wait after an epoch that took `busy` to read and publish.
    pub fn wait(&self, busy: Duration) -> Duration {
        busy.saturating_mul(self.ratio).min(self.most)
    }
}

/// How the engine runs.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Timely worker threads.
    pub workers: usize,
    /// Most records a worker reads into one epoch.
    pub batch: usize,
    /// How long a caught-up worker lets records gather between epochs.
    pub pace: Pace,
    /// Most unpublished batches per worker before it waits for the dataflow.
    pub max_inflight: usize,
    /// Most records per worker not yet stored by the durable sinks before it stops reading
    /// (backpressure while a store is slow or down); at most [`UNDURABLE_EPOCHS`] epochs wait
    /// whatever their size.
    pub max_undurable: usize,
    /// Event times accepted.
    pub time_bounds: TimeBounds,
    /// Only events with times in `[from, to)` (milliseconds) enter the dataflows; others are
    /// counted as skipped (backfills of a time range).
    pub event_range: Option<(i64, i64)>,
    /// After a replay that rebuilt the state (a restart, a backfill), the stored rows this
    /// state speaks for: once the source is caught up, ClickHouse rows it does not hold are
    /// removed ([`crate::reconcile`]). `None`: no reconciliation.
    pub reconcile: Option<Coverage>,
    /// Whether Foghorn's dataflow keeps node loads for routing ([`Handles::fleet`]). Replays
    /// that route no viewer (`keel sql`, backfills) turn it off and save its share of the work;
    /// the Periscope tables are the same either way.
    pub routing: bool,
}

/// Records a worker may read past what the durable sinks hold before it waits for them (while
/// a store is slow or down): 512 full epochs of 8,192, or at least 8 epochs of a larger
/// `--batch` ([`EngineOptions::with_batch`]).
pub const UNDURABLE_RECORDS: usize = 512 * 8192;

/// Epochs a worker may have read past what the durable sinks hold, however small: a caught-up
/// engine closes hundreds of small epochs a second, and stores write once a second (or less
/// often with `--flush-every`), so a bound of full epochs' count stalled reading at every
/// write. Sized for minutes of such epochs; the list they wait in costs 16 bytes an epoch.
pub const UNDURABLE_EPOCHS: usize = 1 << 16;

impl EngineOptions {
    /// These options with epochs of at most `batch` records (at least 1), and as many records
    /// not yet stored as [`UNDURABLE_RECORDS`], or 8 full epochs where that is more (so very
    /// large epochs still overlap their stores).
    pub fn with_batch(self, batch: usize) -> Self {
        EngineOptions {
            batch,
            max_undurable: UNDURABLE_RECORDS.max(batch.saturating_mul(8)),
            ..self
        }
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            workers: 1,
            batch: 8192,
            pace: Pace::default(),
            max_inflight: 8,
            max_undurable: UNDURABLE_RECORDS,
            time_bounds: TimeBounds::default(),
            event_range: None,
            reconcile: None,
            routing: true,
        }
    }
}

/// Shared handles to a running (or finished) engine.
#[derive(Clone, Debug)]
pub struct Handles {
    /// The live tables.
    pub tables: Arc<RwLock<LiveTables>>,
    /// The streams' sessions, which the workers keep and `viewer_sessions` reads where they are
    /// (one copy of each session, not a row beside it).
    pub sessions: Arc<SessionStore>,
    /// Subscribers to table changes and to the event feed.
    pub hub: Hub,
    /// Counters.
    pub stats: Arc<EngineStats>,
    /// Set to stop reading; the engine then drains what it has and returns.
    pub shutdown: Arc<AtomicBool>,
    /// Foghorn's view of the fleet, published by the engine as node loads change.
    pub fleet: Arc<FleetCell>,
    /// Records the engine's own services produce (routing decisions), read by worker 0.
    pub injector: Injector,
    /// Foghorn's routing counters.
    pub foghorn: Arc<keel_api::foghorn::FoghornStats>,
    /// Metrics of the services beside the engine (the edge), shown by `/metrics`.
    pub extra_metrics: Arc<keel_api::metrics::ExtraMetrics>,
    /// The durable stores (ClickHouse), when configured: source positions are committed only
    /// for epochs they hold.
    pub durable: Option<Arc<Durable>>,
}

impl Default for Handles {
    fn default() -> Self {
        let mut tables = LiveTables::default();
        PeriscopeChange::declare_all(&mut tables);
        let sessions = Arc::new(SessionStore::default());
        tables.hold("viewer_sessions", HeldSessions::new(sessions.clone()));
        let hub = Hub::default();
        tables.attach(hub.clone());
        Handles {
            tables: Arc::new(RwLock::new(tables)),
            sessions,
            hub,
            stats: Arc::new(EngineStats::default()),
            shutdown: Arc::new(AtomicBool::new(false)),
            fleet: Arc::new(FleetCell::default()),
            injector: Injector::new("foghorn"),
            foghorn: Arc::default(),
            extra_metrics: Arc::default(),
            durable: None,
        }
    }
}

/// The checks a decode would make of an event the engine's own service built typed: its time
/// within `bounds`. With `raw`, also its raw row (from its record, or from the event itself in
/// the moment before the service learnt that records are kept).
fn injected_checked(
    injected: InjectedEvent,
    bounds: &TimeBounds,
    now: i64,
    raw: bool,
) -> Result<(Event, Option<RawEventRow>), IngestError> {
    let InjectedEvent {
        position,
        event,
        record,
    } = injected;
    if let Err(reason) = bounds.check(event.time, now) {
        return Err(IngestError {
            position,
            reason,
            event_type: Some(event.kind.type_name().to_owned()),
            tenant_id: Some(event.tenant.to_string()),
            excerpt: record.map(|r| excerpt(&r.value)).unwrap_or_default(),
        });
    }
    let row = raw.then(|| {
        let value = match record {
            Some(record) => record.value,
            None => serde_json::to_vec(&event).unwrap_or_default(),
        };
        RawEventRow::of(&event, &position, &value)
    });
    Ok((event, row))
}

/// How far the workers' replays (the reading that rebuilds the state) have come.
#[derive(Debug, Default)]
struct Replays {
    /// Workers whose replay is over.
    over: AtomicUsize,
    /// The newest first epoch after a worker's replay.
    after: AtomicU64,
}

impl Replays {
    /// Records that one worker's replay is over, at `epoch` (once per worker).
    fn over_at(&self, epoch: u64) {
        self.after.fetch_max(epoch, Ordering::AcqRel);
        self.over.fetch_add(1, Ordering::AcqRel);
    }

    /// Once every one of `workers` is over: the epoch from which the state holds every replay.
    fn all_over(&self, workers: usize) -> Option<u64> {
        (self.over.load(Ordering::Acquire) >= workers).then(|| self.after.load(Ordering::Acquire))
    }
}

/// A reconciliation the publisher owes the stores: run once the live tables hold every epoch
/// before the one where the last worker's replay was over.
struct Owed {
    coverage: Coverage,
    replays: Arc<Replays>,
    workers: usize,
    /// Not before this (a failed attempt waits before the next).
    not_before: Instant,
    /// The wait after the next failed attempt (doubling, at most 5 minutes: an attempt fetches
    /// every stored key of two tables).
    backoff: Duration,
}

impl Owed {
    /// Runs the reconciliation if it is due; returns whether it is done. `last`: the input has
    /// ended (every epoch is in the tables, and there is no later chance). Called by the
    /// publisher between epochs: nothing else stages changes meanwhile, and readers of the
    /// tables are held up only while the stored keys are compared, not while they are fetched.
    fn settle(&mut self, tables: &RwLock<LiveTables>, durable: &Durable, last: bool) -> bool {
        let read = || {
            tables
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let replayed = self.replays.all_over(self.workers).is_some_and(|after| {
            last || read().epoch().is_some_and(|e| e.saturating_add(1) >= after)
        });
        if !replayed || (!last && Instant::now() < self.not_before) {
            return false;
        }
        let result =
            Stored::fetch(durable, self.coverage).map(|stored| stored.reconcile(&read(), durable));
        match result {
            Ok(done) => {
                eprintln!(
                    "keel: ClickHouse reconciled with the rebuilt state: {} stored keys compared, \
                     {} stale viewers_by_country rows and {} stale usage_5m windows removed",
                    done.compared, done.countries, done.windows
                );
                true
            }
            Err(error) if last => {
                eprintln!(
                    "keel: could not reconcile ClickHouse with the rebuilt state ({error}); stored \
                     rows this run no longer computes may remain until the next run"
                );
                *durable.stats().unreconciled.lock() = Some(error.to_string());
                true
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?self.backoff, "reconciling ClickHouse with the rebuilt state failed");
                self.not_before = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(Duration::from_secs(300));
                false
            }
        }
    }
}

/// A worker's inputs to its dataflow.
struct Inputs {
    events: InputHandle<u64, Event>,
    errors: InputHandle<u64, IngestError>,
    /// The newest event time of each epoch.
    marks: InputHandle<u64, i64>,
    /// Node loads, only when the engine routes ([`EngineOptions::routing`]).
    loads: Option<InputHandle<u64, LoadInput>>,
}

impl Inputs {
    /// Moves every input on to `epoch`.
    fn advance_to(&mut self, epoch: u64) {
        self.events.advance_to(epoch);
        self.errors.advance_to(epoch);
        self.marks.advance_to(epoch);
        if let Some(loads) = &mut self.loads {
            loads.advance_to(epoch);
        }
    }
}

/// Emptied vectors of epochs' changes the publisher keeps for reuse: enough for the epochs in
/// flight at once.
const SPARE_EPOCHS: usize = 4;

/// Applies table changes on worker 0 once every worker has passed their epoch, and stages them
/// for the durable stores when there are any. Only worker 0 holds `tables`; the other workers'
/// instances receive nothing. With `owed`, it reconciles the stores with the live tables once,
/// between two epochs, so no change is staged in the middle.
fn publish<'scope>(
    changes: StreamVec<'scope, u64, PeriscopeChange>,
    tables: Option<Arc<RwLock<LiveTables>>>,
    durable: Option<Arc<Durable>>,
    mut owed: Option<Owed>,
    event_range: Option<(i64, i64)>,
) -> StreamVec<'scope, u64, ()> {
    changes.unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
        Exchange::new(|_: &PeriscopeChange| 0),
        "Publish",
        move |_, _| {
            let mut pending: BTreeMap<u64, (Capability<u64>, Vec<PeriscopeChange>)> =
                BTreeMap::new();
            // Vectors of applied epochs, emptied and kept for the next ones: an epoch's changes
            // then land in memory that is already there, not in a vector grown (copied, and its
            // fresh pages zeroed by the kernel) anew each epoch.
            let mut spare: Vec<Vec<PeriscopeChange>> = Vec::new();
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    if let Some(&time) = cap.least() {
                        pending
                            .entry(time)
                            .or_insert_with(|| {
                                let cap = cap
                                    .retain_least(output.output_index())
                                    .expect("a message with a least time");
                                (cap, spare.pop().unwrap_or_default())
                            })
                            .1
                            .append(data);
                    }
                });
                let Some(tables) = &tables else {
                    return;
                };
                let frontier = frontier.frontier();
                let complete = |t: &u64| !frontier.less_equal(t);
                let ready: Vec<u64> = pending.keys().copied().take_while(complete).collect();
                let closed = match frontier.first() {
                    Some(&f) => f.checked_sub(1),
                    None => pending.keys().next_back().copied(),
                };
                let settle = |owed: &mut Option<Owed>| {
                    if let (Some(debt), Some(durable)) = (owed.as_mut(), &durable)
                        && debt.settle(tables, durable, frontier.is_empty())
                    {
                        *owed = None;
                    }
                };
                if ready.is_empty() && closed.is_none() {
                    settle(&mut owed);
                    return;
                }
                // Each complete epoch's changes, applied from where they were gathered.
                let epochs: Vec<Vec<PeriscopeChange>> = ready
                    .iter()
                    .map(|time| pending.remove(time).expect("ready times are pending").1)
                    .collect();
                if let Some(durable) = &durable {
                    durable.stage(closed, |stage| {
                        for change in epochs.iter().flatten() {
                            // A backfill stores only the windows wholly inside its range: the
                            // others saw part of their events, and would replace whole ones.
                            if let (Some((from, to)), Some((start, end))) =
                                (event_range, change.window())
                                && (start < from || end > to)
                            {
                                continue;
                            }
                            change.clone().apply_to(stage);
                        }
                    });
                }
                {
                    let mut tables = tables
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    tables.begin_epoch();
                    for mut epoch in epochs {
                        for change in epoch.drain(..) {
                            change.apply_to(&mut *tables);
                        }
                        if spare.len() < SPARE_EPOCHS {
                            spare.push(epoch);
                        }
                    }
                    if let Some(closed) = closed
                        && tables.epoch().is_none_or(|e| e < closed)
                    {
                        tables.close_epoch(closed);
                    }
                }
                settle(&mut owed);
            }
        },
    )
}

/// Runs `source` through the Periscope dataflow until the source is exhausted or `handles`
/// says stop. Returns once every read record is reflected in the live tables.
pub fn run(
    source: Arc<dyn Source>,
    options: &EngineOptions,
    handles: &Handles,
) -> anyhow::Result<()> {
    let options = options.clone();
    let handles = handles.clone();
    if let Ok(mut kind) = handles.stats.source.lock() {
        *kind = source.kind().to_owned();
    }
    let raw_events = handles
        .durable
        .as_ref()
        .is_some_and(|d| d.writes(crate::store::RAW_EVENTS));
    // Session rows are reported as changes only for stores that keep them; the live table
    // reads the sessions where the workers hold them, so it must read this store.
    anyhow::ensure!(
        handles
            .tables
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .held_by::<HeldSessions>("viewer_sessions")
            .is_some_and(|held| held.reads(&handles.sessions)),
        "the live tables' viewer_sessions reads another session store than the engine's"
    );
    handles.sessions.report_rows(handles.durable.is_some());
    // The engine's own services hand their events over typed; their records are built only
    // when raw events are kept.
    handles.injector.keep_records(raw_events);
    // Each worker's replay is over when it has caught up with what its share held at the
    // start, or at its source's end.
    let replays = Arc::new(Replays::default());
    let config = timely::Config::process(options.workers.max(1));
    let guards = timely::execute(config, move |worker| -> Result<(), String> {
        let index = worker.index();
        let mut reader = source
            .open(index, worker.peers())
            .map_err(|e| format!("worker {index}: {e}"))?;
        let probe = probe::Handle::new();
        let tables = (index == 0).then(|| handles.tables.clone());
        let fleet = (index == 0).then(|| handles.fleet.clone());
        let durable = handles.durable.clone().filter(|_| index == 0);
        // Whether the stores are owed a reconciliation once every worker's replay is over
        // (only then do the workers watch for that).
        let owes_reconcile = options.reconcile.is_some()
            && handles
                .durable
                .as_ref()
                .is_some_and(|d| d.clickhouse().is_some());
        let owed = options
            .reconcile
            .filter(|_| owes_reconcile && index == 0)
            .map(|coverage| Owed {
                coverage,
                replays: replays.clone(),
                workers: worker.peers(),
                not_before: Instant::now(),
                backoff: Duration::from_secs(5),
            });
        let stored = |epoch: u64| handles.durable.as_ref().is_none_or(|d| d.covers(epoch));
        let mut inputs = worker.dataflow::<u64, _, _>(|scope| {
            let (events_in, events) = scope.new_input::<Event>();
            let (errors_in, errors) = scope.new_input::<IngestError>();
            let (marks_in, marks) = scope.new_input::<i64>();
            publish(
                periscope(events, errors, marks.clone(), &handles.sessions),
                tables,
                durable,
                owed,
                options.event_range,
            )
            .probe_with(&probe);
            // Replays route no viewer: without routing there is no input for node loads,
            // and nothing of Foghorn's dataflow is built.
            let loads = options.routing.then(|| {
                let (loads_in, loads) = scope.new_input::<LoadInput>();
                publish_fleet(
                    foghorn(loads, marks.clone()),
                    marks,
                    fleet,
                    PublishEvery::default(),
                )
                .probe_with(&probe);
                loads_in
            });
            Inputs {
                events: events_in,
                errors: errors_in,
                marks: marks_in,
                loads,
            }
        });
        let clock = || handles.stats.clock();
        let mut epoch = 0u64;
        // Epochs not yet both published and stored, oldest first, with their records.
        let mut inflight: VecDeque<(u64, usize)> = VecDeque::new();
        let mut unstored_records = 0usize;
        let mut replay_over = false;
        let mut batch = Batch::default();
        let stats = &handles.stats;
        let hub = &handles.hub;
        let mut feed: Vec<Arc<FeedItem>> = Vec::new();
        let dead_letters = handles
            .durable
            .as_ref()
            .is_some_and(|d| d.keeps_dead_letters());
        let mut letters = Vec::new();
        let mut raw = Vec::new();
        let mut injected = Vec::new();
        loop {
            if handles.shutdown.load(Ordering::Relaxed) {
                break;
            }
            // When the first read returned: what the epoch takes, without waiting for records.
            let mut began = Instant::now();
            let now = now_ms();
            let mut newest = i64::MIN;
            let (mut events, mut errors, mut skipped) = (0u64, 0u64, 0u64);
            let (mut from_source, mut taken) = (0, 0);
            let poll = {
                let feeding = hub.wants_events();
                // One event that passed its checks, with its raw row when raw events are kept.
                let mut accept = |event: Event, raw_row: Option<RawEventRow>| {
                    if options
                        .event_range
                        .is_some_and(|(from, to)| !(from..to).contains(&event.time))
                    {
                        skipped += 1;
                        return;
                    }
                    raw.extend(raw_row);
                    newest = newest.max(event.time);
                    events += 1;
                    if feeding {
                        let bit = channel::parse(signalman::channel(&event.kind))
                            .unwrap_or(channel::ANALYTICS);
                        let redacted = signalman::redact(event.clone());
                        feed.push(Arc::new(FeedItem::new(bit, redacted)));
                    }
                    if let Some(loads) = &mut inputs.loads
                        && let Some(load) = LoadInput::from_event(&event)
                    {
                        loads.send(load);
                    }
                    inputs.events.send(event);
                };
                // One record that cannot be used: an error row, and a dead letter when kept.
                let mut refuse = |record: Option<&Record<'_>>, error: IngestError| {
                    if dead_letters {
                        letters.push(dead_letter(record, &error, now));
                    }
                    errors += 1;
                    inputs.errors.send(error);
                };
                // An epoch takes up to `options.batch` records, read and decoded a chunk at a
                // time: the raw bytes held at once are a chunk's, not an epoch's.
                loop {
                    batch.clear();
                    let want = READ_CHUNK.min(options.batch - from_source);
                    let poll = reader
                        .next_batch(&mut batch, want)
                        .map_err(|e| format!("worker {index}: {e}"))?;
                    if from_source == 0 {
                        began = Instant::now();
                    }
                    let read = batch.len();
                    from_source += read;
                    if index == 0 && taken == 0 {
                        handles.injector.drain_into(&mut batch, options.batch);
                        handles.injector.drain_events(&mut injected, options.batch);
                    }
                    taken += batch.len() + injected.len();
                    // Counted as the chunk is taken, not the epoch, so that progress moves while
                    // a large epoch is read (65,536 records take seconds in a debug build).
                    let mut handled = batch.len() + injected.len();
                    for record in batch.records() {
                        match decode_checked(&record, &options.time_bounds, now) {
                            Ok(event) => {
                                let row = raw_events.then(|| RawEventRow::new(&event, &record));
                                accept(event, row);
                            }
                            Err(error) => refuse(Some(&record), error),
                        }
                    }
                    // The engine's own events come typed: only the checks a decode would add.
                    for injected in injected.drain(..) {
                        match injected_checked(injected, &options.time_bounds, now, raw_events) {
                            Ok((event, row)) => accept(event, row),
                            Err(error) => refuse(None, error),
                        }
                    }
                    for error in batch.take_refused() {
                        handled += 1;
                        refuse(None, error);
                    }
                    stats.records.fetch_add(handled as u64, Ordering::Relaxed);
                    if !matches!(poll, Poll::Ready) || read < want || from_source >= options.batch {
                        break poll;
                    }
                    // Let the dataflow absorb this chunk before the next is read.
                    worker.step();
                }
            };
            if taken > 0 {
                if let Some(durable) = &handles.durable {
                    // A record re-read to rebuild the state had its letter sent by the run
                    // that first read it: sent again at every restart, the topic filled with
                    // copies.
                    letters.retain(|letter| !reader.stored_before(&letter.position));
                    // Before the epoch enters the dataflow, so it cannot be stored without them.
                    durable.stage_dead_letters(&mut letters);
                    if !raw.is_empty() {
                        durable.stage(None, |stage| {
                            for row in raw.drain(..) {
                                stage.apply(crate::store::RAW_EVENTS, Change::Upsert(row));
                            }
                        });
                    }
                }
                if !feed.is_empty() {
                    hub.publish_events(&feed);
                    feed.clear();
                }
                if newest > i64::MIN {
                    inputs.marks.send(newest);
                    stats.newest_event.fetch_max(newest, Ordering::Relaxed);
                }
                stats.events.fetch_add(events, Ordering::Relaxed);
                stats.errors.fetch_add(errors, Ordering::Relaxed);
                stats.skipped.fetch_add(skipped, Ordering::Relaxed);
                stats.epochs.fetch_add(1, Ordering::Relaxed);
                reader.mark_epoch(epoch);
                inflight.push_back((epoch, taken));
                unstored_records += taken;
                epoch = epoch.saturating_add(1).max(clock());
                inputs.advance_to(epoch);
            } else if clock() > epoch + 1_000 {
                // Idle: keep pace with the clock so other workers' epochs can close.
                epoch = clock();
                inputs.advance_to(epoch);
            }
            // A source that could not fill a batch is caught up: publish what is in flight
            // before asking it again (which may block), so a new event shows at once.
            let caught_up = taken < options.batch;
            // The replay that rebuilt the state is over (for a reconciliation owed to the stores).
            if owes_reconcile
                && !replay_over
                && (matches!(poll, Poll::Done) || (caught_up && reader.replayed()))
            {
                replay_over = true;
                replays.over_at(epoch);
            }
            let allowed = if caught_up { 0 } else { options.max_inflight };
            let mut rounds = 0;
            worker.step();
            loop {
                // Commit what is published and stored; count what is not yet published.
                while let Some(&(oldest, records)) = inflight.front() {
                    if probe.less_equal(&oldest) || !stored(oldest) {
                        break;
                    }
                    inflight.pop_front();
                    unstored_records -= records;
                    reader
                        .commit(oldest)
                        .map_err(|e| format!("worker {index}: {e}"))?;
                }
                // Epochs close in order: the unpublished ones are the newest.
                let published = inflight.partition_point(|(e, _)| !probe.less_equal(e));
                let unpublished = inflight.len() - published;
                let within =
                    unstored_records <= options.max_undurable && inflight.len() <= UNDURABLE_EPOCHS;
                if unpublished <= allowed && within {
                    break;
                }
                if handles.shutdown.load(Ordering::Relaxed) && unpublished <= allowed {
                    break;
                }
                if caught_up || unpublished <= allowed {
                    // Waiting for a caught-up source's last epochs (briefly), or for the stores
                    // (as long as it takes): park rather than spin, the writer needs the CPU.
                    rounds += 1;
                    if caught_up && rounds > 100 && within {
                        break;
                    }
                    worker.step_or_park(Some(Duration::from_micros(100)));
                } else {
                    worker.step();
                }
            }
            match poll {
                Poll::Done => break,
                Poll::Idle if taken == 0 => {
                    worker.step_or_park(Some(Duration::from_millis(2)));
                }
                // Only the engine's own records (routing decisions) came in: let them gather
                // for a moment rather than open an epoch for every few of them.
                Poll::Idle if from_source == 0 => {
                    worker.step_or_park(Some(INJECTED_LINGER));
                }
                // Caught up and nobody subscribes: let the next records gather for a while
                // (see `Pace`). A sleep, because a worker with activations pending does not park.
                _ if caught_up
                    && hub.subscribers() == 0
                    && !handles.shutdown.load(Ordering::Relaxed) =>
                {
                    std::thread::sleep(options.pace.wait(began.elapsed()));
                }
                _ => {}
            }
        }
        drop(inputs);
        while !probe.done() {
            worker.step();
        }
        // Give the stores a last chance to take everything; epochs they have not confirmed stay
        // uncommitted, and the next run re-reads them.
        if let Some(durable) = &handles.durable {
            durable.sync(Duration::from_secs(30));
        }
        while let Some((oldest, _)) = inflight.pop_front() {
            if !stored(oldest) {
                break;
            }
            reader
                .commit(oldest)
                .map_err(|e| format!("worker {index}: {e}"))?;
        }
        Ok(())
    })
    .map_err(|e| anyhow::anyhow!("cannot start timely workers: {e}"))?;
    for result in guards.join() {
        result
            .map_err(|panic| anyhow::anyhow!("a worker stopped: {panic}"))?
            .map_err(|e| anyhow::anyhow!(e))
            .context("the source failed")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_operators::sym::Sym;
    use keel_sources::codec::decode;
    use keel_sources::event::{EventKind, RoutingDecision};
    use keel_sources::memory::OwnedRecord;
    use keel_sources::record::Position;

    #[test]
    fn a_caught_up_worker_waits_in_proportion_to_its_last_epoch() {
        let pace = Pace {
            ratio: 3,
            most: Duration::from_millis(5),
        };
        let ms = Duration::from_millis;
        // A cheap epoch: wait `ratio` times its cost.
        assert_eq!(
            pace.wait(Duration::from_micros(100)),
            Duration::from_micros(300)
        );
        // A costly one waits at most `most`.
        assert_eq!(pace.wait(ms(4)), ms(5));
        // Ratio 0 never waits.
        let eager = Pace { ratio: 0, ..pace };
        assert_eq!(eager.wait(ms(4)), Duration::ZERO);
        // The default adds at most 2 ms.
        let default = Pace::default();
        assert_eq!(default.wait(ms(1)), ms(1));
        assert_eq!(default.wait(ms(10)), ms(2));
    }

    fn decision(time: i64) -> Event {
        Event {
            id: uuid::Uuid::from_u128(7),
            tenant: uuid::Uuid::from_u128(0x5eed),
            time,
            kind: EventKind::Routing(RoutingDecision {
                stream: None,
                selected_node: Sym::new("edge-1"),
                status: Sym::new("success"),
                score: Some(42),
                client_latitude: None,
                client_longitude: None,
                node_latitude: None,
                node_longitude: None,
                distance_km: None,
                client_country: Sym::default(),
            }),
        }
    }

    fn injected(event: Event, record: Option<OwnedRecord>) -> InjectedEvent {
        InjectedEvent {
            position: Position::Memory {
                source: Sym::new("foghorn"),
                seq: 3,
            },
            event,
            record,
        }
    }

    #[test]
    fn injected_events_get_the_time_checks_and_raw_rows_of_decoded_ones() {
        let bounds = TimeBounds::default();
        let now = 1_800_000_000_000;
        let value = br#"{"event_id":"00000000-0000-0000-0000-000000000007","event_type":"load_balancing","timestamp":"2027-01-15T08:00:00Z","tenant_id":"00000000-0000-0000-0000-000000005eed","data":{"load_balancing_data":{"status":"success","selected_node_id":"edge-1","score":"42"}}}"#;
        let record = OwnedRecord {
            value: value.to_vec(),
            headers: Vec::new(),
        };
        let wire = record.at(Position::Memory {
            source: Sym::new("foghorn"),
            seq: 3,
        });
        let event = decode(&wire).expect("the record decodes");
        assert_eq!(event, decision(event.time));

        // Kept records give the very row a decoded record would.
        let (accepted, row) = injected_checked(
            injected(event.clone(), Some(record.clone())),
            &bounds,
            now,
            true,
        )
        .expect("in bounds");
        assert_eq!(accepted, event);
        assert_eq!(row, Some(RawEventRow::new(&event, &wire)));
        // Without raw events, no row; without a record, one from the event itself.
        let (_, row) = injected_checked(injected(event.clone(), None), &bounds, now, false)
            .expect("in bounds");
        assert_eq!(row, None);
        let (_, row) =
            injected_checked(injected(event.clone(), None), &bounds, now, true).expect("in bounds");
        let row = row.expect("a row");
        assert_eq!(row.event_id, event.id.to_string());
        assert!(row.payload.contains("edge-1"), "{}", row.payload);

        // Out of bounds: an error row naming the event, as a decode would write it.
        let late = decision(now + 2 * keel_operators::time::HOUR);
        let error = injected_checked(injected(late, Some(record.clone())), &bounds, now, true)
            .expect_err("too far ahead");
        assert!(error.reason.contains("ahead"), "{}", error.reason);
        assert_eq!(error.event_type.as_deref(), Some("load_balancing"));
        assert_eq!(error.position.to_string(), wire.position.to_string());
        assert!(error.excerpt.starts_with("{\"event_id\""));
    }
}
