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
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_sources::memory::{Injector, OwnedRecord};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
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

/// Ends a hand-off attempt however it ends (a panic included): its events leave the in-flight
/// set, delivered ones are remembered, and whoever waits on them is woken.
struct Attempt {
    handoff: Handoff,
    keys: Vec<EventKey>,
    delivered: Vec<bool>,
    done: watch::Sender<bool>,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        {
            let mut remembered = self.handoff.remembered();
            for (i, key) in self.keys.iter().enumerate() {
                remembered.in_flight.remove(key);
                if self.delivered.get(i).copied().unwrap_or(false) {
                    remembered.insert(*key);
                }
            }
        }
        let _ = self.done.send(true);
    }
}

#[derive(Debug, Default)]
struct Remembered {
    ids: HashSet<EventKey>,
    order: VecDeque<EventKey>,
    /// Events being handed off now; the flag turns true when that attempt has ended.
    in_flight: HashMap<EventKey, watch::Receiver<bool>>,
}

impl Remembered {
    fn insert(&mut self, id: EventKey) {
        if self.ids.insert(id) {
            self.order.push_back(id);
            if self.order.len() > REMEMBERED_IDS
                && let Some(old) = self.order.pop_front()
            {
                self.ids.remove(&old);
            }
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
            remembered: Arc::default(),
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
            let mut watchers = Vec::new();
            let (done, _) = watch::channel(false);
            {
                let mut remembered = self.remembered();
                for (i, record) in waiting.drain(..) {
                    if remembered.ids.contains(&key(&record)) {
                        results[i] = Some(Ok(Delivered::Duplicate));
                    } else if let Some(watcher) = remembered.in_flight.get(&key(&record)) {
                        watchers.push(watcher.clone());
                        blocked.push((i, record));
                    } else {
                        remembered.in_flight.insert(key(&record), done.subscribe());
                        fresh.push((i, record));
                    }
                }
            }
            if !fresh.is_empty() {
                let this = self.clone();
                let task = tokio::spawn(async move {
                    let (indices, records): (Vec<usize>, Vec<Outgoing>) = fresh.into_iter().unzip();
                    let mut attempt = Attempt {
                        keys: records.iter().map(key).collect(),
                        delivered: Vec::new(),
                        handoff: this,
                        done,
                    };
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
                        headers: record.headers.clone(),
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

/// A record's headers as the producer takes them.
pub fn kafka_headers(record: &Outgoing) -> OwnedHeaders {
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
    let mut key = [0u8; uuid::fmt::Hyphenated::LENGTH];
    for (index, record) in records.iter().enumerate() {
        let key = record.event_id.hyphenated().encode_lower(&mut key);
        let mut message = BaseRecord::with_opaque_to(topic, Box::new((batch.clone(), index)))
            .key(key.as_bytes())
            .payload(&record.value)
            .headers(kafka_headers(record));
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
