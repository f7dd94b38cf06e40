//! Where accepted events go: Kafka (acknowledged only once the broker has them, through an
//! idempotent producer with `acks=all`) or, in the embedded mode, straight into the engine's
//! input (acknowledged once queued there: the embedded engine keeps its state in memory, so an
//! event acknowledged this way lives as long as the process does).
//!
//! Retries: the ids of the last [`REMEMBERED_IDS`] delivered events are remembered per tenant, in
//! this process, so a producer's resend of an event already handed off (its answer lost, or the
//! producer killed mid-call) is answered without a second write. That memory does not survive a
//! restart and does not cover an attempt that timed out after the broker in fact wrote it; there
//! the deterministic event id is what lets consumers (Keel's own decoder among them) drop the
//! copy.
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_sources::memory::{Injector, OwnedRecord};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::IntoOpaque;
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::envelope::Outgoing;

/// Why a hand-off failed. Always external and worth retrying: the event itself was fine.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HandoffError(pub String);

/// How one event of a delivery ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Written now.
    New,
    /// Already written by an earlier send; not written again.
    Duplicate,
}

/// Counters for `/metrics` and the load generator.
#[derive(Debug, Default)]
pub struct HandoffStats {
    /// Events written (counted when the write is acknowledged, even if its caller has gone).
    pub delivered: AtomicU64,
    /// Events recognised as already written.
    pub duplicates: AtomicU64,
    /// Events whose hand-off failed (the producer was told to retry).
    pub failed: AtomicU64,
}

impl HandoffStats {
    /// Appends the counters in Prometheus text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP keel_decklog_events_total Events Decklog handed off, by outcome.\n# TYPE keel_decklog_events_total counter"
        );
        for (outcome, value) in [
            ("delivered", &self.delivered),
            ("duplicate", &self.duplicates),
            ("failed", &self.failed),
        ] {
            let _ = writeln!(
                out,
                "keel_decklog_events_total{{outcome=\"{outcome}\"}} {}",
                value.load(Ordering::Relaxed)
            );
        }
    }
}

/// How many delivered event ids are remembered for recognising retries.
pub const REMEMBERED_IDS: usize = 1 << 20;

/// How long a record may wait for room in the producer's queue before its hand-off fails.
const QUEUE_WAIT: Duration = Duration::from_secs(5);

/// The outcomes of one hand-off's records, filled in by the producer's delivery reports.
struct Batch {
    outcomes: Mutex<Vec<Result<(), HandoffError>>>,
    /// Records not yet reported; the report that brings it to zero wakes the hand-off.
    outstanding: AtomicUsize,
    done: Mutex<Option<oneshot::Sender<()>>>,
}

impl Batch {
    fn report(&self, index: usize, outcome: Result<(), HandoffError>) {
        if outcome.is_err() {
            let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
            outcomes[index] = outcome;
        }
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(done) = self.done.lock().unwrap_or_else(|e| e.into_inner()).take()
        {
            let _ = done.send(());
        }
    }
}

/// Routes the producer's delivery reports to the hand-off that sent each record: one wake-up
/// per hand-off instead of one future per record.
struct Reports;

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<(Arc<Batch>, usize)>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let (batch, index) = *opaque;
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(HandoffError(format!(
                "Kafka did not take the event: {error}"
            ))),
        };
        batch.report(index, outcome);
    }
}

enum Target {
    Kafka {
        producer: ThreadedProducer<Reports>,
        topic: String,
    },
    Engine(Injector),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Kafka { topic, .. } => write!(f, "Kafka topic {topic}"),
            Target::Engine(_) => write!(f, "the embedded engine"),
        }
    }
}

/// An event's identity for recognising retries: ids are only unique within a tenant (one
/// tenant's producer cannot make another's event look already written).
type EventKey = (Uuid, Uuid);

fn key(record: &Outgoing) -> EventKey {
    (record.tenant, record.event_id)
}

/// Ends a hand-off attempt however it ends (a panic included): its events stop being in flight,
/// delivered ones are remembered, and whoever waits on them is woken.
struct Attempt {
    handoff: Handoff,
    number: u64,
    keys: Vec<EventKey>,
    delivered: Vec<bool>,
    done: watch::Sender<bool>,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        {
            let mut remembered = self.handoff.remembered();
            remembered.attempts.remove(&self.number);
            for (i, key) in self.keys.iter().enumerate() {
                if self.delivered.get(i).copied().unwrap_or(false) {
                    remembered.delivered(*key);
                } else {
                    remembered.slots.remove(key);
                }
            }
        }
        let _ = self.done.send(true);
    }
}

/// What the retry memory knows of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Being handed off by this attempt.
    InFlight(u64),
    /// Written.
    Delivered,
}

/// The retry memory: one map answers both "already written?" and "being written now?", so an
/// event costs one lookup when its hand-off starts and one when it ends (plus one to forget the
/// oldest event once the memory is full).
#[derive(Debug)]
struct Remembered {
    /// How many delivered events are remembered ([`REMEMBERED_IDS`]).
    limit: usize,
    slots: HashMap<EventKey, Slot>,
    /// Delivered events, oldest first, for forgetting beyond [`REMEMBERED_IDS`].
    order: VecDeque<EventKey>,
    /// Attempts under way; each one's flag turns true when it has ended.
    attempts: HashMap<u64, watch::Receiver<bool>>,
    next_attempt: u64,
}

impl Remembered {
    fn new(limit: usize) -> Self {
        Remembered {
            limit,
            slots: HashMap::new(),
            order: VecDeque::new(),
            attempts: HashMap::new(),
            next_attempt: 0,
        }
    }

    fn delivered(&mut self, key: EventKey) {
        if self.slots.insert(key, Slot::Delivered) == Some(Slot::Delivered) {
            return;
        }
        self.order.push_back(key);
        if self.order.len() > self.limit
            && let Some(old) = self.order.pop_front()
        {
            self.slots.remove(&old);
        }
    }
}

/// The producer settings of the hand-off: idempotent with `acks=all` (an acknowledged event is
/// in every in-sync replica, once), lz4 batches, and a 2 ms linger so a lone event is not held
/// back long. A send not acknowledged within `timeout` fails.
pub fn producer_config(brokers: &str, timeout: Duration) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("client.id", "keel-decklog")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("compression.type", "lz4")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("message.timeout.ms", timeout.as_millis().to_string());
    config
}

/// The hand-off: cheap to clone, shared by every connection.
#[derive(Clone, Debug)]
pub struct Handoff {
    target: Arc<Target>,
    remembered: Arc<Mutex<Remembered>>,
    /// Its counters.
    pub stats: Arc<HandoffStats>,
}

impl Handoff {
    fn with(target: Target) -> Self {
        Handoff {
            target: Arc::new(target),
            remembered: Arc::new(Mutex::new(Remembered::new(REMEMBERED_IDS))),
            stats: Arc::default(),
        }
    }

    /// Hands off to `topic` on `brokers`; a send not acknowledged within `timeout` fails (and is
    /// retried by the producer of the event).
    pub fn kafka(brokers: &str, topic: &str, timeout: Duration) -> Result<Self, String> {
        let producer: ThreadedProducer<Reports> = producer_config(brokers, timeout)
            .create_with_context(Reports)
            .map_err(|e| format!("cannot create a Kafka producer for {brokers}: {e}"))?;
        Ok(Self::with(Target::Kafka {
            producer,
            topic: topic.to_owned(),
        }))
    }

    /// Hands off into the embedded engine's input.
    pub fn engine(injector: Injector) -> Self {
        Self::with(Target::Engine(injector))
    }

    /// Where events go, for logs.
    pub fn describe(&self) -> String {
        format!("{:?}", self.target)
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, Remembered> {
        self.remembered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Delivers `records`, answering for each in order once it is durable (or known to be).
    ///
    /// The hand-off itself runs as a task of its own: if the caller goes away mid-way (a
    /// producer killed during its call), the attempt still finishes and is remembered, so the
    /// producer's retry is recognised instead of written twice. A retry arriving while the
    /// first attempt is still out waits for its outcome.
    pub async fn deliver(&self, records: Vec<Outgoing>) -> Vec<Result<Delivered, HandoffError>> {
        let mut results: Vec<Option<Result<Delivered, HandoffError>>> = vec![None; records.len()];
        let mut waiting: Vec<(usize, Outgoing)> = records.into_iter().enumerate().collect();
        while !waiting.is_empty() {
            let mut fresh = Vec::new();
            let mut blocked = Vec::new();
            let mut watchers: Vec<watch::Receiver<bool>> = Vec::new();
            let mut waited = HashSet::new();
            let (done, ended) = watch::channel(false);
            let number;
            {
                let mut remembered = self.remembered();
                number = remembered.next_attempt;
                remembered.next_attempt += 1;
                // Registered first: a record repeated within this call waits on this attempt.
                remembered.attempts.insert(number, ended);
                let Remembered {
                    slots, attempts, ..
                } = &mut *remembered;
                for (i, record) in waiting.drain(..) {
                    match slots.entry(key(&record)) {
                        Entry::Occupied(mut slot) => match *slot.get() {
                            Slot::Delivered => results[i] = Some(Ok(Delivered::Duplicate)),
                            Slot::InFlight(other) => match attempts.get(&other) {
                                Some(watcher) => {
                                    if waited.insert(other) {
                                        watchers.push(watcher.clone());
                                    }
                                    blocked.push((i, record));
                                }
                                // An attempt that ended without clearing its events (it cannot:
                                // `Attempt` clears them however it ends): take the event over
                                // rather than wait for nothing.
                                None => {
                                    slot.insert(Slot::InFlight(number));
                                    fresh.push((i, record));
                                }
                            },
                        },
                        Entry::Vacant(slot) => {
                            slot.insert(Slot::InFlight(number));
                            fresh.push((i, record));
                        }
                    }
                }
                if fresh.is_empty() {
                    remembered.attempts.remove(&number);
                }
            }
            if !fresh.is_empty() {
                let (indices, records): (Vec<usize>, Vec<Outgoing>) = fresh.into_iter().unzip();
                // Made before the task is spawned: if the task never runs (the runtime shutting
                // down), dropping it still clears these events from the memory.
                let mut attempt = Attempt {
                    number,
                    keys: records.iter().map(key).collect(),
                    delivered: Vec::new(),
                    handoff: self.clone(),
                    done,
                };
                let task = tokio::spawn(async move {
                    let outcomes = attempt.handoff.hand_off(&records).await;
                    attempt.delivered = outcomes.iter().map(Result::is_ok).collect();
                    // Counted here, not by the caller: a write counts even if its caller died.
                    let stats = &attempt.handoff.stats;
                    for outcome in &outcomes {
                        let counter = if outcome.is_ok() {
                            &stats.delivered
                        } else {
                            &stats.failed
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(attempt);
                    indices.into_iter().zip(outcomes).collect::<Vec<_>>()
                });
                match task.await {
                    Ok(outcomes) => {
                        for (i, outcome) in outcomes {
                            results[i] = Some(outcome.map(|()| Delivered::New));
                        }
                    }
                    Err(error) => tracing::error!(%error, "a hand-off task failed"),
                }
            }
            for mut watcher in watchers {
                let _ = watcher.wait_for(|ended| *ended).await;
            }
            // Look again: each blocked event is now remembered (a duplicate) or free to try.
            waiting = blocked;
        }
        let results: Vec<_> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(HandoffError("not delivered".to_owned()))))
            .collect();
        let duplicates = results
            .iter()
            .filter(|r| matches!(r, Ok(Delivered::Duplicate)))
            .count();
        self.stats
            .duplicates
            .fetch_add(duplicates as u64, Ordering::Relaxed);
        results
    }

    async fn hand_off(&self, records: &[Outgoing]) -> Vec<Result<(), HandoffError>> {
        match &*self.target {
            Target::Kafka { producer, topic } => send_all(producer, topic, records).await,
            Target::Engine(injector) => records
                .iter()
                .map(|record| {
                    let pushed = injector.push(OwnedRecord {
                        value: record.value.clone(),
                        headers: record
                            .headers
                            .iter()
                            .map(|(name, value)| ((*name).to_owned(), value.clone()))
                            .collect(),
                    });
                    if pushed {
                        Ok(())
                    } else {
                        Err(HandoffError(
                            "the engine's input is full; send again shortly".to_owned(),
                        ))
                    }
                })
                .collect(),
        }
    }
}

/// The producer's record of `record` on `topic`: the event id's text as key (written into
/// `key`), the value, and the headers. Decklog's hand-off and the benchmark's ceiling both send
/// what this makes, so the ceiling is measured with the same records.
pub fn kafka_record<'a, D: IntoOpaque>(
    topic: &'a str,
    record: &'a Outgoing,
    key: &'a mut [u8; uuid::fmt::Hyphenated::LENGTH],
    opaque: D,
) -> BaseRecord<'a, [u8], Vec<u8>, D> {
    let key = record.event_id.hyphenated().encode_lower(key);
    BaseRecord::with_opaque_to(topic, opaque)
        .key(key.as_bytes())
        .payload(&record.value)
        .headers(kafka_headers(record))
}

/// A record's headers as the producer takes them.
fn kafka_headers(record: &Outgoing) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
    for (name, value) in &record.headers {
        headers = headers.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    headers
}

/// Sends `records` and waits until the broker has answered for every one.
async fn send_all(
    producer: &ThreadedProducer<Reports>,
    topic: &str,
    records: &[Outgoing],
) -> Vec<Result<(), HandoffError>> {
    if records.is_empty() {
        return Vec::new();
    }
    let (done, finished) = oneshot::channel();
    let batch = Arc::new(Batch {
        outcomes: Mutex::new(vec![Ok(()); records.len()]),
        outstanding: records.len().into(),
        done: Mutex::new(Some(done)),
    });
    for (index, record) in records.iter().enumerate() {
        let mut key = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let mut message = kafka_record(topic, record, &mut key, Box::new((batch.clone(), index)));
        let waiting_since = std::time::Instant::now();
        loop {
            match producer.send(message) {
                Ok(()) => break,
                Err((error, back)) => {
                    let full = error.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull);
                    if !full || waiting_since.elapsed() >= QUEUE_WAIT {
                        let reason = if full {
                            format!("the producer's queue stayed full for {QUEUE_WAIT:?}")
                        } else {
                            error.to_string()
                        };
                        let (batch, index) = *back.delivery_opaque;
                        batch.report(
                            index,
                            Err(HandoffError(format!(
                                "Kafka did not take the event: {reason}"
                            ))),
                        );
                        break;
                    }
                    message = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    // The reports arrive on the producer's polling thread; the last one wakes this task.
    let _ = finished.await;
    let outcomes = batch.outcomes.lock().unwrap_or_else(|e| e.into_inner());
    outcomes.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tenant: u128, id: u128) -> Outgoing {
        Outgoing {
            event_id: Uuid::from_u128(id),
            event_type: "viewer_connect",
            tenant: Uuid::from_u128(tenant),
            value: format!("{{\"id\":{id}}}").into_bytes(),
            headers: Vec::new(),
        }
    }

    fn drained(injector: &Injector) -> Vec<String> {
        let mut batch = keel_sources::source::Batch::default();
        injector.drain_into(&mut batch, usize::MAX);
        batch
            .records()
            .map(|r| String::from_utf8_lossy(r.value).into_owned())
            .collect()
    }

    /// Eight concurrent calls of 40 events over a pool of 46 (tenant, id) pairs: repeats within a
    /// call, across calls, and while another call has the same id in flight. Returns what was
    /// sent and what each call was answered.
    fn concurrent_calls(
        runtime: &tokio::runtime::Runtime,
        handoff: &Handoff,
        round: u64,
    ) -> Vec<(EventKey, Delivered)> {
        let calls: Vec<Vec<Outgoing>> = (0..8u64)
            .map(|call| {
                (0..40u64)
                    .map(|i| {
                        let mixed = (round * 7919 + call * 104_729 + i * 31) % 97;
                        record(1 + u128::from(mixed % 2), u128::from(mixed % 23))
                    })
                    .collect()
            })
            .collect();
        let sent: Vec<Vec<EventKey>> = calls
            .iter()
            .map(|call| call.iter().map(key).collect())
            .collect();
        let answers = runtime.block_on(async {
            let tasks: Vec<_> = calls
                .into_iter()
                .map(|call| {
                    let handoff = handoff.clone();
                    tokio::spawn(async move { handoff.deliver(call).await })
                })
                .collect();
            let mut answers = Vec::new();
            for task in tasks {
                answers.push(task.await.expect("a call"));
            }
            answers
        });
        sent.into_iter()
            .zip(answers)
            .flat_map(|(keys, answers)| {
                assert_eq!(keys.len(), answers.len());
                keys.into_iter().zip(answers)
            })
            .map(|(key, answer)| (key, answer.unwrap_or_else(|e| panic!("round {round}: {e}"))))
            .collect()
    }

    /// Each (tenant, id) was answered `New` exactly once and `Duplicate` every other time, the
    /// counters agree, and nothing is left in flight. Returns how many distinct events there were.
    fn each_new_once(handoff: &Handoff, answers: &[(EventKey, Delivered)], round: u64) -> usize {
        let mut news: HashMap<EventKey, usize> = HashMap::new();
        for (key, answer) in answers {
            let count = news.entry(*key).or_default();
            if *answer == Delivered::New {
                *count += 1;
            }
        }
        assert!(
            news.values().all(|&n| n == 1),
            "round {round}: not exactly one New per event: {news:?}"
        );
        let distinct = news.len();
        let stats = &handoff.stats;
        assert_eq!(stats.delivered.load(Ordering::Relaxed) as usize, distinct);
        assert_eq!(
            stats.duplicates.load(Ordering::Relaxed) as usize,
            answers.len() - distinct
        );
        let remembered = handoff.remembered();
        assert!(
            remembered.attempts.is_empty(),
            "round {round}: attempts left"
        );
        assert_eq!(remembered.slots.len(), distinct);
        assert!(remembered.slots.values().all(|s| *s == Slot::Delivered));
        distinct
    }

    #[test]
    fn each_event_reaches_the_engine_once_whatever_the_retries() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .build()
            .expect("a runtime");
        for round in 0..20 {
            let injector = Injector::new("test");
            let handoff = Handoff::engine(injector.clone());
            let answers = concurrent_calls(&runtime, &handoff, round);
            let distinct = each_new_once(&handoff, &answers, round);
            assert_eq!(drained(&injector).len(), distinct, "round {round}");
        }
    }

    /// The same through Kafka (librdkafka's mock cluster), where a hand-off takes long enough
    /// for calls to find each other's events in flight.
    #[test]
    fn each_event_is_written_to_kafka_once_whatever_the_retries() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("a runtime");
        let cluster = rdkafka::mocking::MockCluster::new(1).expect("a mock cluster");
        for round in 0..5 {
            let topic = format!("handoff-{round}");
            cluster
                .create_topic(&topic, 2, 1)
                .expect("a topic on the mock cluster");
            let handoff = Handoff::kafka(
                &cluster.bootstrap_servers(),
                &topic,
                Duration::from_secs(10),
            )
            .expect("a producer");
            let answers = concurrent_calls(&runtime, &handoff, round);
            each_new_once(&handoff, &answers, round);
        }
    }

    /// A failed hand-off is not remembered: the resend is written.
    #[test]
    fn a_failed_event_can_be_sent_again() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let injector = Injector::new("test");
        let handoff = Handoff::engine(injector.clone());
        // Fill the engine's input so the next push is refused.
        for i in 0..keel_sources::memory::INJECT_CAPACITY {
            assert!(injector.push(OwnedRecord {
                value: i.to_string().into_bytes(),
                headers: Vec::new(),
            }));
        }
        let first = runtime.block_on(handoff.deliver(vec![record(1, 5)]));
        assert!(first[0].is_err(), "{first:?}");
        assert!(handoff.remembered().slots.is_empty());
        drained(&injector);
        let again = runtime.block_on(handoff.deliver(vec![record(1, 5)]));
        assert_eq!(again, vec![Ok(Delivered::New)]);
        assert_eq!(drained(&injector), vec!["{\"id\":5}".to_owned()]);
    }

    /// Beyond its limit the memory forgets the oldest delivered events, and only those.
    #[test]
    fn the_memory_forgets_oldest_first() {
        let mut remembered = Remembered::new(3);
        let keys: Vec<EventKey> = (0..5u128)
            .map(|i| (Uuid::from_u128(1), Uuid::from_u128(i)))
            .collect();
        for key in &keys {
            remembered.delivered(*key);
        }
        // Delivered twice still counts once.
        remembered.delivered(keys[4]);
        assert_eq!(remembered.order.len(), 3);
        assert_eq!(remembered.slots.len(), 3);
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(remembered.slots.contains_key(key), i >= 2, "key {i}");
        }
    }
}
