//! Kafka: consuming `analytics_events` (and producing to it, for tests and seeding).
//!
//! Two ways to consume:
//!
//! - **Live** ([`KafkaMode::Live`]): every worker is a member of one consumer group, so the group
//!   protocol spreads the topic's partitions over all workers of all processes. Positions read
//!   into an epoch are remembered with it and committed to the group only when the engine reports
//!   the epoch published, so a restart re-reads anything whose results were not yet out.
//! - **Replay** ([`KafkaMode::Replay`]): the topic from its beginning, partitions dealt to workers
//!   round-robin, no group and no commits; a worker is done when its partitions have been silent
//!   for the idle time. This is how `keel sql --source kafka://…` reads a topic once.
//!
//! **Recovery.** Keel's state lives in memory, so a live member rebuilds it when it is handed a
//! partition: with a state horizon ([`KafkaSource::with_state_horizon`]) it starts reading at
//! the earlier of the group's committed position and the first record newer than now − horizon
//! (found by timestamp), so the state covers the horizon and nothing after the last commit is
//! skipped. Results of the re-read epochs are written again; stores apply them idempotently.
//! Positions are never committed below where the group stood, so a recovery that is interrupted
//! does not move the group back. Without a horizon the member resumes at the committed position.
//!
//! Broker trouble (unreachable, rebalancing) is logged and retried by the client; only
//! configuration mistakes stop the source.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use keel_operators::sym::Sym;
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use crate::error::{IngestError, SourceError, excerpt};
use crate::record::Position;
use crate::source::{Batch, FirstWait, Poll, Source, SourceReader};

/// How a Kafka source reads its topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KafkaMode {
    /// Follow the topic as a consumer group member, committing per published epoch.
    Live {
        /// Consumer group id.
        group: String,
    },
    /// Read the topic once from the beginning; stop after this much silence.
    Replay {
        /// Silence that ends the replay.
        idle: Duration,
    },
}

/// Where to find a topic: `kafka://HOST:PORT[,HOST:PORT…]/TOPIC`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaAddress {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    /// Topic.
    pub topic: String,
}

impl KafkaAddress {
    /// Parses `kafka://HOST:PORT/TOPIC`.
    pub fn parse(url: &str) -> Result<Self, SourceError> {
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| SourceError::Config(format!("{url:?} is not a kafka:// address")))?;
        let (brokers, topic) = rest.split_once('/').ok_or_else(|| {
            SourceError::Config(format!(
                "{url:?} names no topic: use kafka://HOST:PORT/TOPIC"
            ))
        })?;
        if brokers.is_empty() || topic.is_empty() || topic.contains('/') {
            return Err(SourceError::Config(format!(
                "{url:?} is not of the form kafka://HOST:PORT/TOPIC"
            )));
        }
        Ok(KafkaAddress {
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
        })
    }
}

/// The partitions of `topic` as the broker's metadata lists them.
fn topic_partitions(consumer: &BaseConsumer<Recovery>, topic: &str) -> KafkaResult<Vec<i32>> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// A Kafka topic as a source.
#[derive(Clone, Debug)]
pub struct KafkaSource {
    address: KafkaAddress,
    mode: KafkaMode,
    /// Extra client settings (`key=value`), applied last.
    settings: Vec<(String, String)>,
    /// How far back a live member reads to rebuild its state.
    horizon: Option<Duration>,
    /// Replay only records whose broker timestamps fall in `[from, to)` (milliseconds).
    range: Option<(i64, i64)>,
    /// Which partitions this process's live members hold (for [`SourceReader::replayed`]).
    holdings: Arc<Holdings>,
}

/// The partitions a process's live members were handed, by worker, and the topic's count.
#[derive(Debug, Default)]
struct Holdings {
    partitions: AtomicUsize,
    by_worker: Mutex<HashMap<usize, Vec<i32>>>,
}

impl Holdings {
    /// Whether this process's members hold every partition of the topic.
    fn complete(&self) -> bool {
        let partitions = self.partitions.load(Ordering::Acquire);
        let held: HashSet<i32> = self
            .by_worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .flatten()
            .copied()
            .collect();
        partitions > 0 && held.len() >= partitions
    }
}

/// One live member's latest hand-over: where each partition's recovery replay ends.
#[derive(Debug, Default)]
struct Handover {
    /// Bumped at every assignment and revocation.
    generation: AtomicU64,
    /// Per partition handed over, the offset its replay must reach (its high watermark then;
    /// `i64::MIN` when it started there, `i64::MAX` when unknown: its end is then seen only as
    /// the partition's end-of-file). `None` while nothing is handed over.
    ends: Mutex<Option<HashMap<i32, i64>>>,
}

impl KafkaSource {
    /// A source reading `address` in `mode`.
    pub fn new(address: KafkaAddress, mode: KafkaMode) -> Self {
        KafkaSource {
            address,
            mode,
            settings: Vec::new(),
            horizon: None,
            range: None,
            holdings: Arc::default(),
        }
    }

    /// In replay mode, reads each partition from its first record stamped at or after
    /// `from_ms` (found with the broker's offsets-for-times, which may answer earlier) up to
    /// its first record stamped at or after `to_ms`, or its end.
    pub fn with_time_range(mut self, from_ms: i64, to_ms: i64) -> Self {
        self.range = Some((from_ms, to_ms));
        self
    }

    /// The topic's partitions.
    fn partitions(&self, consumer: &BaseConsumer<Recovery>) -> Result<Vec<i32>, SourceError> {
        let topic = &self.address.topic;
        let partitions = topic_partitions(consumer, topic)?;
        if partitions.is_empty() {
            return Err(SourceError::Config(format!(
                "topic {topic} has no partitions on {}",
                self.address.brokers
            )));
        }
        Ok(partitions)
    }

    /// Where a replay of `partitions` starts: the first offset stamped at or after the range's
    /// start (`Offset::End` when none is), else the beginning.
    fn starts(
        &self,
        consumer: &BaseConsumer<Recovery>,
        partitions: &[i32],
    ) -> Result<HashMap<i32, Offset>, SourceError> {
        let topic = &self.address.topic;
        let Some((from, _)) = self.range else {
            return Ok(partitions.iter().map(|p| (*p, Offset::Beginning)).collect());
        };
        let mut list = TopicPartitionList::new();
        for p in partitions {
            list.add_partition_offset(topic, *p, Offset::Offset(from))?;
        }
        let starts = consumer.offsets_for_times(list, Duration::from_secs(10))?;
        Ok(partitions
            .iter()
            .map(|p| {
                let start = starts
                    .find_partition(topic, *p)
                    .map_or(Offset::End, |e| e.offset());
                (*p, start)
            })
            .collect())
    }

    /// How many records a replay will read, when the broker can tell (for progress): the sum of
    /// each partition's end (or high watermark) minus its start.
    pub fn estimate_records(&self) -> Result<Option<u64>, SourceError> {
        let context = Recovery {
            horizon: None,
            floors: Arc::default(),
            handover: Arc::default(),
            holdings: Arc::default(),
            worker: 0,
        };
        let consumer: BaseConsumer<Recovery> = self.client_config().create_with_context(context)?;
        let partitions = self.partitions(&consumer)?;
        let starts = self.starts(&consumer, &partitions)?;
        let mut total = 0u64;
        for (p, start) in starts {
            let (low, high) =
                consumer.fetch_watermarks(&self.address.topic, p, Duration::from_secs(10))?;
            let start = match start {
                Offset::Offset(o) => o,
                Offset::End => continue,
                _ => low,
            };
            total += high.saturating_sub(start).max(0) as u64;
        }
        Ok(Some(total))
    }

    /// Rebuilds state at start from the records of the last `horizon` (live mode).
    pub fn with_state_horizon(mut self, horizon: Duration) -> Self {
        self.horizon = Some(horizon);
        self
    }

    /// Adds a librdkafka setting (for example `security.protocol=ssl`).
    pub fn with_setting(mut self, key: &str, value: &str) -> Self {
        self.settings.push((key.to_owned(), value.to_owned()));
        self
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.address.brokers)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            // The group join waits about half of this; keep restarts and tests quick.
            .set("session.timeout.ms", "6000")
            .set("client.id", "keel");
        match &self.mode {
            KafkaMode::Live { group } => {
                // Also bounds how long a rebalance waits for members that went away.
                config
                    .set("group.id", group)
                    .set("max.poll.interval.ms", "60000");
                if self.horizon.is_some() {
                    // End-of-partition events tell when a recovery's replay has reached the end.
                    config.set("enable.partition.eof", "true");
                }
            }
            KafkaMode::Replay { .. } => {
                config
                    .set("group.id", "keel-replay")
                    .set("enable.partition.eof", "true");
            }
        }
        for (key, value) in &self.settings {
            config.set(key, value);
        }
        config
    }
}

impl Source for KafkaSource {
    fn open(&self, worker: usize, workers: usize) -> Result<Box<dyn SourceReader>, SourceError> {
        let context = Recovery {
            horizon: match self.mode {
                KafkaMode::Live { .. } => self.horizon,
                KafkaMode::Replay { .. } => None,
            },
            floors: Arc::default(),
            handover: Arc::default(),
            holdings: self.holdings.clone(),
            worker,
        };
        let floors = context.floors.clone();
        let handover = context.handover.clone();
        let consumer: BaseConsumer<Recovery> = self.client_config().create_with_context(context)?;
        let topic = &self.address.topic;
        let (mut finished, mut assigned) = (HashSet::new(), 0);
        match &self.mode {
            KafkaMode::Live { .. } => consumer.subscribe(&[topic])?,
            KafkaMode::Replay { .. } => {
                let partitions: Vec<i32> = self
                    .partitions(&consumer)?
                    .into_iter()
                    .filter(|p| *p as usize % workers == worker)
                    .collect();
                let mut mine = TopicPartitionList::new();
                for (p, start) in self.starts(&consumer, &partitions)? {
                    if start == Offset::End {
                        // Nothing stamped in the range: finished before it starts.
                        finished.insert(p);
                        continue;
                    }
                    mine.add_partition_offset(topic, p, start)?;
                }
                assigned = partitions.len();
                consumer.assign(&mine)?;
            }
        }
        Ok(Box::new(KafkaReader {
            consumer,
            topic: Sym::new(topic),
            replay_idle: match &self.mode {
                KafkaMode::Replay { idle } => Some(*idle),
                KafkaMode::Live { .. } => None,
            },
            last_record: Instant::now(),
            reading: HashMap::new(),
            epochs: BTreeMap::new(),
            floors,
            handover,
            generation: 0,
            holdings: self.holdings.clone(),
            read_to: HashMap::new(),
            at_end: HashSet::new(),
            stop_at: self.range.map(|(_, to)| to),
            finished,
            assigned,
            first_wait: FirstWait::new(Duration::from_millis(50)),
        }))
    }

    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn describe(&self) -> String {
        format!(
            "kafka://{}/{} ({})",
            self.address.brokers,
            self.address.topic,
            match &self.mode {
                KafkaMode::Live { group } => format!("group {group}"),
                KafkaMode::Replay { idle } =>
                    format!("replay, done after {} s idle", idle.as_secs_f64()),
            }
        )
    }
}

/// Where a live member starts on each partition it is handed (see the module's recovery notes).
struct Recovery {
    horizon: Option<Duration>,
    /// The group's committed position per partition when it was handed to this member: commits
    /// below it are skipped.
    floors: Arc<Mutex<HashMap<i32, i64>>>,
    /// This member's hand-overs, for recovery.
    handover: Arc<Handover>,
    holdings: Arc<Holdings>,
    worker: usize,
}

impl ClientContext for Recovery {}

impl Recovery {
    /// Sets each partition of `assigned` to its recovery start.
    fn starts(
        &self,
        consumer: &BaseConsumer<Recovery>,
        horizon: Duration,
        assigned: &mut TopicPartitionList,
    ) -> KafkaResult<()> {
        let timeout = Duration::from_secs(10);
        let committed = consumer.committed_offsets(assigned.clone(), timeout)?;
        let since = keel_operators::time::now_ms().saturating_sub(horizon.as_millis() as i64);
        if since <= 0 {
            // A horizon older than any timestamp: everything.
            for element in assigned.clone().elements() {
                if let Offset::Offset(c) = committed
                    .find_partition(element.topic(), element.partition())
                    .map_or(Offset::Invalid, |e| e.offset())
                {
                    self.floors
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(element.partition(), c);
                }
                assigned.set_partition_offset(
                    element.topic(),
                    element.partition(),
                    Offset::Beginning,
                )?;
            }
            return Ok(());
        }
        let mut by_time = TopicPartitionList::new();
        for element in assigned.elements() {
            by_time.add_partition_offset(
                element.topic(),
                element.partition(),
                Offset::Offset(since),
            )?;
        }
        let by_time = consumer.offsets_for_times(by_time, timeout)?;
        let mut floors = self.floors.lock().unwrap_or_else(PoisonError::into_inner);
        for element in assigned.clone().elements() {
            let (topic, partition) = (element.topic(), element.partition());
            let committed =
                committed
                    .find_partition(topic, partition)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    });
            let from_time = by_time.find_partition(topic, partition).map(|e| e.offset());
            let start = match (from_time, committed) {
                (Some(Offset::Offset(t)), Some(c)) => Offset::Offset(t.min(c)),
                (Some(Offset::Offset(t)), None) => Offset::Offset(t),
                // Nothing newer than the horizon: resume where the group stood.
                (Some(Offset::End), Some(c)) => Offset::Offset(c),
                (Some(Offset::End), None) => Offset::End,
                (_, _) => Offset::Beginning,
            };
            if let Some(c) = committed {
                floors.insert(partition, c);
            }
            tracing::info!(partition, ?committed, ?start, "kafka: recovering state");
            assigned.set_partition_offset(topic, partition, start)?;
        }
        Ok(())
    }

    /// Remembers where the replay of each partition of `assigned` (at its recovery start) ends,
    /// and which partitions this member holds.
    fn note_ends(&self, consumer: &BaseConsumer<Recovery>, assigned: &TopicPartitionList) {
        if let Some(topic) = assigned.elements().first().map(|e| e.topic().to_owned())
            && let Ok(partitions) = topic_partitions(consumer, &topic)
        {
            self.holdings
                .partitions
                .store(partitions.len(), Ordering::Release);
        }
        self.holdings
            .by_worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                self.worker,
                assigned.elements().iter().map(|e| e.partition()).collect(),
            );
        let mut ends = HashMap::new();
        for element in assigned.elements() {
            let marks = consumer.fetch_watermarks(
                element.topic(),
                element.partition(),
                Duration::from_secs(10),
            );
            let end = match (marks, element.offset()) {
                (Ok((_, high)), Offset::Offset(start)) if start >= high => i64::MIN,
                (Ok(_), Offset::End) => i64::MIN,
                (Ok((low, high)), Offset::Beginning) if low >= high => i64::MIN,
                (Ok((_, high)), _) => high,
                (Err(error), _) => {
                    tracing::warn!(%error, partition = element.partition(), "kafka: no high watermark; the replay ends at the partition's end");
                    i64::MAX
                }
            };
            ends.insert(element.partition(), end);
        }
        *self
            .handover
            .ends
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(ends);
        self.handover.generation.fetch_add(1, Ordering::AcqRel);
    }
}

impl ConsumerContext for Recovery {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Recovery>,
        err: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Some(horizon) = self.horizon
                    && let Err(error) = self.starts(consumer, horizon, partitions)
                {
                    // Without the positions the state cannot be rebuilt exactly from the
                    // horizon: read everything instead, which is slower but never wrong.
                    tracing::warn!(%error, "kafka: cannot find recovery positions; reading the partitions from their beginning");
                    for element in partitions.clone().elements() {
                        let _ = partitions.set_partition_offset(
                            element.topic(),
                            element.partition(),
                            Offset::Beginning,
                        );
                    }
                }
                if self.horizon.is_some() {
                    self.note_ends(consumer, partitions);
                }
                consumer.assign(partitions)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                *self
                    .handover
                    .ends
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                self.handover.generation.fetch_add(1, Ordering::AcqRel);
                self.holdings
                    .by_worker
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&self.worker);
                consumer.unassign()
            }
            other => {
                tracing::warn!(error = ?other, "kafka: rebalance failed");
                consumer.unassign()
            }
        };
        if let Err(error) = result {
            tracing::warn!(%error, "kafka: applying a rebalance");
        }
    }
}

struct KafkaReader {
    consumer: BaseConsumer<Recovery>,
    /// Committed positions the group had when partitions were handed over.
    floors: Arc<Mutex<HashMap<i32, i64>>>,
    /// Replay: a partition is finished at its first record stamped at or after this.
    stop_at: Option<i64>,
    /// Replay: partitions read to their end (or bound).
    finished: HashSet<i32>,
    /// Replay: partitions this reader was dealt.
    assigned: usize,
    topic: Sym,
    replay_idle: Option<Duration>,
    last_record: Instant,
    /// Next offset per partition, for records read since the last epoch mark.
    reading: HashMap<i32, i64>,
    /// Next offsets per partition, by the epoch that holds the records before them.
    epochs: BTreeMap<u64, HashMap<i32, i64>>,
    /// Live recovery: where each partition's replay ends (shared with the rebalance callback).
    handover: Arc<Handover>,
    /// The hand-over `read_to` and `at_end` speak of.
    generation: u64,
    holdings: Arc<Holdings>,
    /// Live recovery: the next offset read per partition as of the last epoch mark.
    read_to: HashMap<i32, i64>,
    /// Live recovery: partitions whose end was reached.
    at_end: HashSet<i32>,
    first_wait: FirstWait,
}

/// After a new hand-over, forgets how far the previous one's partitions were read (the
/// rebalance callback runs inside a poll).
fn notice_handover(
    handover: &Handover,
    seen: &mut u64,
    read_to: &mut HashMap<i32, i64>,
    at_end: &mut HashSet<i32>,
) {
    let generation = handover.generation.load(Ordering::Acquire);
    if generation != *seen {
        *seen = generation;
        read_to.clear();
        at_end.clear();
    }
}

impl SourceReader for KafkaReader {
    fn next_batch(&mut self, batch: &mut Batch, max: usize) -> Result<Poll, SourceError> {
        let start = batch.len();
        let mut wait = self.first_wait.first();
        while batch.len() - start < max {
            let polled = self.consumer.poll(wait);
            notice_handover(
                &self.handover,
                &mut self.generation,
                &mut self.read_to,
                &mut self.at_end,
            );
            let Some(result) = polled else {
                break;
            };
            wait = Duration::ZERO;
            let message = match result {
                Ok(message) => message,
                Err(rdkafka::error::KafkaError::PartitionEOF(partition)) => {
                    if self.replay_idle.is_some() {
                        self.finished.insert(partition);
                    } else {
                        self.at_end.insert(partition);
                    }
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, "kafka consumer");
                    break;
                }
            };
            if let (Some(stop), Some(stamp)) = (self.stop_at, message.timestamp().to_millis())
                && stamp >= stop
            {
                self.finished.insert(message.partition());
                continue;
            }
            let position = Position::Kafka {
                topic: self.topic,
                partition: message.partition(),
                offset: message.offset(),
            };
            self.reading
                .insert(message.partition(), message.offset() + 1);
            match message.payload() {
                Some(payload) => {
                    let headers = message.headers();
                    let pairs = headers
                        .iter()
                        .flat_map(|h| h.iter())
                        .filter_map(|h| Some((h.key, h.value?)));
                    batch.push(position, payload, pairs);
                    if let Some(key) = message.key() {
                        batch.set_key(key);
                    }
                }
                None => batch.refuse(IngestError {
                    position,
                    reason: "record has no value (a tombstone)".to_owned(),
                    event_type: None,
                    tenant_id: None,
                    excerpt: excerpt(message.key().unwrap_or_default()),
                }),
            }
        }
        self.first_wait.note(batch.len() - start, max);
        if batch.len() > start {
            self.last_record = Instant::now();
            return Ok(Poll::Ready);
        }
        match self.replay_idle {
            Some(_) if self.finished.len() >= self.assigned => Ok(Poll::Done),
            Some(idle) if self.last_record.elapsed() >= idle => Ok(Poll::Done),
            _ => Ok(Poll::Idle),
        }
    }

    fn replayed(&self) -> bool {
        let ends = self
            .handover
            .ends
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Only a process holding the whole topic has whole streams (records are spread over
        // partitions by event id).
        self.holdings.complete()
            && ends.as_ref().is_some_and(|ends| {
                ends.iter().all(|(partition, end)| {
                    self.at_end.contains(partition)
                        || self.read_to.get(partition).copied().unwrap_or(i64::MIN) >= *end
                })
            })
    }

    fn stored_before(&self, position: &Position) -> bool {
        let Position::Kafka {
            partition, offset, ..
        } = position
        else {
            return false;
        };
        // A floor is the group's committed position: the next record to read.
        self.floors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(partition)
            .is_some_and(|floor| offset < floor)
    }

    fn mark_epoch(&mut self, epoch: u64) {
        for (partition, next) in &self.reading {
            let to = self.read_to.entry(*partition).or_insert(*next);
            *to = (*to).max(*next);
        }
        if !self.reading.is_empty() {
            self.epochs.insert(epoch, std::mem::take(&mut self.reading));
        }
    }

    fn commit(&mut self, epoch: u64) -> Result<(), SourceError> {
        if self.replay_idle.is_some() {
            self.epochs.clear();
            return Ok(());
        }
        let later = self.epochs.split_off(&(epoch + 1));
        let done = std::mem::replace(&mut self.epochs, later);
        if done.is_empty() {
            return Ok(());
        }
        let mut next: HashMap<i32, i64> = HashMap::new();
        for offsets in done.into_values() {
            for (partition, offset) in offsets {
                let entry = next.entry(partition).or_insert(offset);
                *entry = (*entry).max(offset);
            }
        }
        let floors = self.floors.lock().unwrap_or_else(PoisonError::into_inner);
        next.retain(|partition, offset| floors.get(partition).is_none_or(|f| *offset > *f));
        drop(floors);
        if next.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for (partition, offset) in next {
            list.add_partition_offset(self.topic.as_str(), partition, Offset::Offset(offset))?;
        }
        if let Err(error) = self.consumer.commit(&list, CommitMode::Async) {
            // A partition moved to another member during a rebalance: its new owner re-reads
            // from the last commit, which is safe because sinks apply epochs idempotently.
            tracing::warn!(%error, "kafka commit");
        }
        Ok(())
    }
}

/// Writes records to a topic (used by `keel simulate --out kafka://…` and by tests).
pub struct KafkaWriter {
    producer: ThreadedProducer<Deliveries>,
    deliveries: Deliveries,
    address: KafkaAddress,
}

/// Counts a producer's deliveries that failed, and keeps the first failure's reason: without
/// it, a record the broker never took (its topic missing, the broker gone past the message
/// timeout) was dropped without a word.
#[derive(Clone, Debug, Default)]
pub struct Deliveries {
    failed: Arc<AtomicU64>,
    first: Arc<Mutex<Option<String>>>,
}

impl Deliveries {
    /// Deliveries failed so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// The failures since the last call, and the first one's reason, starting the count
    /// afresh: a batch reports its own failures, not an earlier one's.
    pub fn take(&self) -> (u64, String) {
        let mut first = self.first.lock().unwrap_or_else(PoisonError::into_inner);
        let failed = self.failed.swap(0, Ordering::Relaxed);
        (failed, first.take().unwrap_or_default())
    }
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            tracing::warn!(%error, "a record was not delivered");
            self.first
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert_with(|| error.to_string());
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How long [`KafkaWriter::new`] waits for the brokers to answer.
const REACH: Duration = Duration::from_secs(10);
/// The longest a record waits to be delivered before it counts as failed.
const DELIVERY: Duration = Duration::from_secs(30);

impl std::fmt::Debug for KafkaWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaWriter")
            .field("address", &self.address)
            .finish()
    }
}

impl KafkaWriter {
    /// An idempotent producer for `address` (acks from all in-sync replicas), once its brokers
    /// have answered for the topic: an unreachable address is an error within seconds, not a
    /// minute of waiting at the end for a flush that says only "timed out".
    pub fn new(address: &KafkaAddress) -> Result<Self, SourceError> {
        let deliveries = Deliveries::default();
        let producer: ThreadedProducer<Deliveries> = ClientConfig::new()
            .set("bootstrap.servers", &address.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "200000")
            .set("message.timeout.ms", DELIVERY.as_millis().to_string())
            .create_with_context(deliveries.clone())?;
        producer
            .client()
            .fetch_metadata(Some(&address.topic), REACH)
            .map_err(|error| {
                SourceError::Config(format!(
                    "no answer from the Kafka brokers at {} within {} s: {error}",
                    address.brokers,
                    REACH.as_secs()
                ))
            })?;
        Ok(KafkaWriter {
            producer,
            deliveries,
            address: address.clone(),
        })
    }

    /// The error for the deliveries that failed since the last report, naming the first reason.
    fn undelivered(&self) -> SourceError {
        let (failed, first) = self.deliveries.take();
        SourceError::Config(format!(
            "{failed} record{} not delivered to {} at {}: {first}",
            if failed == 1 { " was" } else { "s were" },
            self.address.topic,
            self.address.brokers,
        ))
    }

    /// Queues one record, waiting for room when the client's queue is full.
    pub fn send(
        &self,
        key: &str,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<(), SourceError> {
        self.send_stamped(key, value, headers, None)
    }

    /// [`send`](KafkaWriter::send) with the record's timestamp set (milliseconds; `None`: the
    /// producer's clock), as a producer stamping events with their own time would.
    pub fn send_stamped(
        &self,
        key: &str,
        value: &[u8],
        headers: &[(&str, &[u8])],
        timestamp: Option<i64>,
    ) -> Result<(), SourceError> {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for (name, value) in headers {
            if !value.is_empty() {
                owned = owned.insert(Header {
                    key: name,
                    value: Some(*value),
                });
            }
        }
        let mut record = BaseRecord::to(&self.address.topic)
            .key(key)
            .payload(value)
            .headers(owned);
        if let Some(timestamp) = timestamp {
            record = record.timestamp(timestamp);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    returned,
                )) => {
                    // A full queue that is failing empties only by timing out: stop at once.
                    if self.deliveries.failed() > 0 {
                        return Err(self.undelivered());
                    }
                    record = returned;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
    }

    /// Waits until every queued record is acknowledged; a record that was not is an error
    /// counting them and naming the first reason.
    pub fn flush(&self, timeout: Duration) -> Result<(), SourceError> {
        self.producer.flush(timeout)?;
        if self.deliveries.failed() > 0 {
            return Err(self.undelivered());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer to brokers that do not answer is refused when made, within seconds, naming the
    /// address; one whose records the broker refuses says so at the flush, with the count and
    /// the reason, where they were dropped without a word.
    #[test]
    fn a_writer_reports_unreachable_brokers_and_undelivered_records() {
        let started = Instant::now();
        let error = KafkaWriter::new(&KafkaAddress::parse("kafka://127.0.0.1:1/t").unwrap())
            .expect_err("refused")
            .to_string();
        assert!(
            error.contains("no answer from the Kafka brokers at 127.0.0.1:1 within 10 s"),
            "{error}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );

        let cluster = rdkafka::mocking::MockCluster::new(1).expect("a mock cluster");
        cluster.create_topic("events", 1, 1).expect("a topic");
        let address = KafkaAddress {
            brokers: cluster.bootstrap_servers(),
            topic: "events".into(),
        };
        let writer = KafkaWriter::new(&address).expect("a producer");
        writer.send("a", b"{}", &[]).unwrap();
        writer.flush(Duration::from_secs(30)).expect("delivered");
        cluster.request_errors(
            rdkafka::types::RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 4],
        );
        writer.send("b", b"{}", &[]).unwrap();
        let error = writer
            .flush(Duration::from_secs(30))
            .expect_err("an undelivered record is an error")
            .to_string();
        assert!(
            error.starts_with("1 record was not delivered to events at"),
            "{error}"
        );
        assert!(error.contains("authoriz"), "{error}");
        // Reported once: a later flush has none of its own to report.
        writer
            .flush(Duration::from_secs(30))
            .expect("the earlier failure was reported with its own flush");
    }

    #[test]
    fn addresses() {
        assert_eq!(
            KafkaAddress::parse("kafka://127.0.0.1:9092/analytics_events").unwrap(),
            KafkaAddress {
                brokers: "127.0.0.1:9092".to_owned(),
                topic: "analytics_events".to_owned()
            }
        );
        for bad in [
            "127.0.0.1:9092/x",
            "kafka://127.0.0.1:9092",
            "kafka:///x",
            "kafka://h:1/a/b",
        ] {
            assert!(KafkaAddress::parse(bad).is_err(), "{bad}");
        }
    }
}
