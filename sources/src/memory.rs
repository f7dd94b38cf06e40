//! Records handed over in memory: a source fed through a channel by another thread.
//!
//! For embedding Keel in a process that already holds events (tests, benchmarks, and later the
//! edge's embedded mode). Worker 0 reads the channel; other workers get nothing and simply keep
//! pace. The source is done when every [`MemorySender`] is dropped and the channel is drained.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_operators::sym::Sym;

use crate::error::SourceError;
use crate::event::Event;
use crate::record::{Headers, Position, Record};
use crate::source::{Batch, FirstWait, Poll, Source, SourceReader};

/// One record: value and the headers Keel reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnedRecord {
    /// The record value.
    pub value: Vec<u8>,
    /// `(name, value)` headers.
    pub headers: Vec<(String, String)>,
}

impl OwnedRecord {
    /// The record as the codec reads it, at `position`.
    pub fn at(&self, position: Position) -> Record<'_> {
        Record {
            position,
            value: &self.value,
            headers: Headers::from_pairs(
                self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            ),
        }
    }
}

/// The sending side: cloneable, blocking when the channel is full (backpressure).
#[derive(Clone, Debug)]
pub struct MemorySender(SyncSender<OwnedRecord>);

impl MemorySender {
    /// Sends a record, waiting for room; fails only if the engine has gone.
    pub fn send(&self, record: OwnedRecord) -> Result<(), SourceError> {
        match self.0.try_send(record) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(record)) => self
                .0
                .send(record)
                .map_err(|_| SourceError::Config("the engine stopped reading".to_owned())),
            Err(TrySendError::Disconnected(_)) => {
                Err(SourceError::Config("the engine stopped reading".to_owned()))
            }
        }
    }
}

/// A source fed through a bounded channel.
#[derive(Clone, Debug)]
pub struct MemorySource {
    receiver: Arc<Mutex<Option<Receiver<OwnedRecord>>>>,
    label: Sym,
}

impl MemorySource {
    /// A source and its sender; at most `capacity` records wait in between.
    pub fn new(label: &str, capacity: usize) -> (Self, MemorySender) {
        let (sender, receiver) = sync_channel(capacity);
        (
            MemorySource {
                receiver: Arc::new(Mutex::new(Some(receiver))),
                label: Sym::new(label),
            },
            MemorySender(sender),
        )
    }
}

impl Source for MemorySource {
    fn open(&self, worker: usize, _workers: usize) -> Result<Box<dyn SourceReader>, SourceError> {
        let receiver = if worker == 0 {
            locked(&self.receiver).take()
        } else {
            None
        };
        Ok(Box::new(MemoryReader {
            receiver,
            label: self.label,
            seq: 0,
            first_wait: FirstWait::new(Duration::from_millis(5)),
        }))
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn describe(&self) -> String {
        format!("in-memory source {}", self.label)
    }
}

struct MemoryReader {
    receiver: Option<Receiver<OwnedRecord>>,
    label: Sym,
    seq: u64,
    first_wait: FirstWait,
}

impl SourceReader for MemoryReader {
    fn next_batch(&mut self, batch: &mut Batch, max: usize) -> Result<Poll, SourceError> {
        let Some(receiver) = &self.receiver else {
            return Ok(Poll::Done);
        };
        let mut wait = self.first_wait.first();
        let mut got = 0;
        while got < max {
            match receiver.recv_timeout(wait) {
                Ok(record) => {
                    let position = Position::Memory {
                        source: self.label,
                        seq: self.seq,
                    };
                    self.seq += 1;
                    batch.push(
                        position,
                        &record.value,
                        record
                            .headers
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_bytes())),
                    );
                    got += 1;
                    wait = Duration::ZERO;
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    if got == 0 {
                        return Ok(Poll::Done);
                    }
                    break;
                }
            }
        }
        self.first_wait.note(got, max);
        Ok(if got > 0 { Poll::Ready } else { Poll::Idle })
    }
}

/// Records the engine itself produces (routing decisions), queued for worker 0 to read with
/// its next batch. Pushing never blocks the producer; when the engine has stopped reading and
/// [`INJECT_CAPACITY`] records wait, further ones are counted as dropped.
#[derive(Clone, Debug)]
pub struct Injector {
    inner: Arc<InjectorInner>,
}

#[derive(Debug)]
struct InjectorInner {
    label: Sym,
    queue: Mutex<Vec<OwnedRecord>>,
    events: Mutex<Vec<(Event, Option<OwnedRecord>)>>,
    keep_records: std::sync::atomic::AtomicBool,
    seq: std::sync::atomic::AtomicU64,
    dropped: std::sync::atomic::AtomicU64,
}

/// An event a service of the engine built itself, already typed (no decode needed), with its
/// record when the engine keeps raw records (see [`Injector::keep_records`]).
#[derive(Clone, Debug, PartialEq)]
pub struct InjectedEvent {
    /// Where it came from: the injector's label and a sequence shared with its records.
    pub position: Position,
    /// The event.
    pub event: Event,
    /// Its record, as a consumer on Kafka would have read it.
    pub record: Option<OwnedRecord>,
}

/// A lock, also after a holder panicked (the plain values behind these stay usable).
fn locked<T>(queue: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Most records an [`Injector`] holds before it drops.
pub const INJECT_CAPACITY: usize = 1 << 20;

impl Injector {
    /// An injector whose records are positioned as `label:seq`.
    pub fn new(label: &str) -> Injector {
        Injector {
            inner: Arc::new(InjectorInner {
                label: Sym::new(label),
                queue: Mutex::new(Vec::new()),
                events: Mutex::new(Vec::new()),
                keep_records: std::sync::atomic::AtomicBool::new(false),
                seq: std::sync::atomic::AtomicU64::new(0),
                dropped: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// Queues a record; false (and counted) when the queue is full.
    pub fn push(&self, record: OwnedRecord) -> bool {
        self.push_bounded(&self.inner.queue, record)
    }

    /// Appends `item` to `queue` unless it holds [`INJECT_CAPACITY`] already (then counted as
    /// dropped).
    fn push_bounded<T>(&self, queue: &Mutex<Vec<T>>, item: T) -> bool {
        let mut queue = locked(queue);
        if queue.len() >= INJECT_CAPACITY {
            self.inner
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return false;
        }
        queue.push(item);
        true
    }

    /// Moves up to `max` queued records into `batch`; returns how many.
    pub fn drain_into(&self, batch: &mut Batch, max: usize) -> usize {
        let taken: Vec<OwnedRecord> = {
            let mut queue = locked(&self.inner.queue);
            if queue.is_empty() {
                return 0;
            }
            let n = queue.len().min(max);
            queue.drain(..n).collect()
        };
        let first = self
            .inner
            .seq
            .fetch_add(taken.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for (i, record) in taken.iter().enumerate() {
            batch.push(
                Position::Memory {
                    source: self.inner.label,
                    seq: first + i as u64,
                },
                &record.value,
                record
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_bytes())),
            );
        }
        taken.len()
    }

    /// Says whether events pushed with [`Injector::push_event`] must carry their records too
    /// (the engine keeps raw records, e.g. for an `events_raw` table).
    pub fn keep_records(&self, keep: bool) {
        self.inner
            .keep_records
            .store(keep, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether events pushed with [`Injector::push_event`] must carry their records.
    pub fn keeps_records(&self) -> bool {
        self.inner
            .keep_records
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Queues an already typed event, built by the engine's own service, so the engine need not
    /// decode it; `record` is its wire form, needed only when [`Injector::keeps_records`].
    /// False (and counted) when the queue is full.
    pub fn push_event(&self, event: Event, record: Option<OwnedRecord>) -> bool {
        self.push_bounded(&self.inner.events, (event, record))
    }

    /// Moves up to `max` queued typed events into `out`; returns how many.
    pub fn drain_events(&self, out: &mut Vec<InjectedEvent>, max: usize) -> usize {
        let mut events = locked(&self.inner.events);
        let n = events.len().min(max);
        if n == 0 {
            return 0;
        }
        let first = self
            .inner
            .seq
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        out.extend(
            events
                .drain(..n)
                .enumerate()
                .map(|(i, (event, record))| InjectedEvent {
                    position: Position::Memory {
                        source: self.inner.label,
                        seq: first + i as u64,
                    },
                    event,
                    record,
                }),
        );
        n
    }

    /// Records refused because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.inner
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}
