//! The source contract: how a connector hands records to one timely worker.
//!
//! A source is opened once per worker ([`Source::open`]); each worker's [`SourceReader`] reads
//! its share — file chunks, Kafka partitions, simulated records — into a reusable [`Batch`].
//! The engine decodes the batch, sends it into the dataflow as one epoch, and later tells the
//! reader which epochs are complete ([`SourceReader::commit`]) so positions are acknowledged only
//! for input whose results are out.
//!
//! Lifecycle: `open` → repeated `next_batch` (each followed by `mark_epoch`) → `commit` as epochs
//! complete → dropped. A reader returns [`Poll::Done`] when its share is exhausted (files, the
//! simulator's event budget); live sources never do.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{IngestError, SourceError};
use crate::record::{Headers, Position, Record};

/// What a call to [`SourceReader::next_batch`] produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    /// Records were added to the batch (possibly fewer than asked for).
    Ready,
    /// Nothing is available right now; try again later.
    Idle,
    /// This reader's share is exhausted.
    Done,
}

/// How long a reader that waits for records lets a read wait for its first one: not at all
/// while records are coming (the last read got all it asked for, so the next, often the rest of
/// the same epoch, has records waiting), else up to an idle wait of the reader's choosing.
#[derive(Clone, Copy, Debug)]
pub struct FirstWait {
    idle: Duration,
    flowing: bool,
}

impl FirstWait {
    /// Waits up to `idle` until a read fills its batch.
    pub const fn new(idle: Duration) -> Self {
        FirstWait {
            idle,
            flowing: false,
        }
    }

    /// How long this read waits for its first record.
    pub fn first(&self) -> Duration {
        if self.flowing {
            Duration::ZERO
        } else {
            self.idle
        }
    }

    /// Records how a read went: it got `got` records of the `max` it asked for.
    pub fn note(&mut self, got: usize, max: usize) {
        self.flowing = got >= max;
    }
}

#[derive(Clone, Debug)]
struct Entry {
    position: Position,
    /// Where the value lies: 0 for the batch's own buffer, `n` for its `n`-th shared one.
    from: u32,
    value: Range<usize>,
    headers: [Option<Range<usize>>; 4],
    key: Option<Range<usize>>,
}

/// Records read in one go, stored in one buffer or in buffers shared with the reader (a file's
/// chunks, whose lines are not copied), plus those the connector already refused (a dump line
/// whose envelope is broken, say), which go straight to `ingest_errors`.
#[derive(Default)]
pub struct Batch {
    data: Vec<u8>,
    shared: Vec<Arc<Vec<u8>>>,
    entries: Vec<Entry>,
    refused: Vec<IngestError>,
}

/// Sizes only: a batch holds megabytes of shared file chunks, which a debug print would dump.
impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("records", &self.entries.len())
            .field("refused", &self.refused.len())
            .field("own_bytes", &self.data.len())
            .field("shared_chunks", &self.shared.len())
            .finish()
    }
}

const HEADER_NAMES: [&str; 4] = ["tenant_id", "event_type", "event_id", "source"];

impl Batch {
    /// Empties the batch, keeping its memory.
    pub fn clear(&mut self) {
        self.data.clear();
        self.shared.clear();
        self.entries.clear();
        self.refused.clear();
    }

    /// Number of records, refused ones included.
    pub fn len(&self) -> usize {
        self.entries.len() + self.refused.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a record the connector could not use.
    pub fn refuse(&mut self, error: IngestError) {
        self.refused.push(error);
    }

    /// Takes the refused records.
    pub fn take_refused(&mut self) -> impl Iterator<Item = IngestError> + '_ {
        self.refused.drain(..)
    }

    fn stash(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.data.len();
        self.data.extend_from_slice(bytes);
        start..self.data.len()
    }

    /// Adds a record; headers Keel does not read are dropped.
    pub fn push<'h>(
        &mut self,
        position: Position,
        value: &[u8],
        headers: impl IntoIterator<Item = (&'h str, &'h [u8])>,
    ) {
        self.push_with(position, headers, |data| data.extend_from_slice(value));
    }

    /// Adds a record whose value `write` appends straight to the batch buffer. Empty header
    /// values count as absent.
    pub fn push_with<'h>(
        &mut self,
        position: Position,
        headers: impl IntoIterator<Item = (&'h str, &'h [u8])>,
        write: impl FnOnce(&mut Vec<u8>),
    ) {
        let start = self.data.len();
        write(&mut self.data);
        let value = start..self.data.len();
        let mut kept: [Option<Range<usize>>; 4] = Default::default();
        for (name, bytes) in headers {
            if bytes.is_empty() {
                continue;
            }
            if let Some(i) = HEADER_NAMES.iter().position(|n| *n == name) {
                kept[i] = Some(self.stash(bytes));
            }
        }
        self.entries.push(Entry {
            position,
            from: 0,
            value,
            headers: kept,
            key: None,
        });
    }

    /// Adds a record without headers whose value is `value` within `buffer`, without copying
    /// it: the batch holds the buffer until it is cleared.
    pub fn push_shared(&mut self, position: Position, buffer: &Arc<Vec<u8>>, value: Range<usize>) {
        if !self
            .shared
            .last()
            .is_some_and(|last| Arc::ptr_eq(last, buffer))
        {
            self.shared.push(Arc::clone(buffer));
        }
        self.entries.push(Entry {
            position,
            from: u32::try_from(self.shared.len()).expect("at most u32::MAX shared buffers"),
            value,
            headers: Default::default(),
            key: None,
        });
    }

    /// Gives the record pushed last its Kafka key (an empty key counts as none).
    pub fn set_key(&mut self, key: &[u8]) {
        if key.is_empty() {
            return;
        }
        let range = self.stash(key);
        if let Some(entry) = self.entries.last_mut() {
            entry.key = Some(range);
        }
    }

    /// The records, borrowing from the batch.
    pub fn records(&self) -> impl Iterator<Item = Record<'_>> + '_ {
        self.entries.iter().map(|entry| {
            let text = |range: &Option<Range<usize>>| {
                range
                    .as_ref()
                    .map(|r| String::from_utf8_lossy(&self.data[r.clone()]))
            };
            let headers = Headers {
                tenant_id: text(&entry.headers[0]),
                event_type: text(&entry.headers[1]),
                event_id: text(&entry.headers[2]),
                source: text(&entry.headers[3]),
                key: entry
                    .key
                    .as_ref()
                    .map(|r| std::borrow::Cow::Borrowed(&self.data[r.clone()])),
            };
            let buffer = match entry.from {
                0 => &self.data,
                n => &*self.shared[n as usize - 1],
            };
            Record {
                position: entry.position.clone(),
                value: &buffer[entry.value.clone()],
                headers,
            }
        })
    }
}

/// A source of records, opened once per worker.
pub trait Source: Send + Sync {
    /// This worker's reader. `worker` is in `0..workers`.
    fn open(&self, worker: usize, workers: usize) -> Result<Box<dyn SourceReader>, SourceError>;
    /// A short description for logs and summaries.
    fn describe(&self) -> String;
    /// The kind of source, for metric labels: `file`, `kafka`, `simulator`, `memory`.
    fn kind(&self) -> &'static str;
    /// For a source that ends: the share of it handed to the readers so far, from 0 to 1, for
    /// progress. `None` (the default) where that is not known without reading ahead.
    fn progress(&self) -> Option<f64> {
        None
    }
}

/// One worker's share of a source.
pub trait SourceReader: Send {
    /// Appends up to `max` records to `batch`. A reader may wait a moment for the first record,
    /// but not right after a call that got all `max` it asked for: the engine reads an epoch in
    /// chunks and then asks at once for the next.
    fn next_batch(&mut self, batch: &mut Batch, max: usize) -> Result<Poll, SourceError>;
    /// Whether this reader has read everything its share held when it was handed out: a live
    /// consumer's rebuild of its state is complete. Sources that end say so with
    /// [`Poll::Done`] instead; this default says never.
    fn replayed(&self) -> bool {
        false
    }
    /// Whether the record at `position` had its results stored by an earlier run (a live
    /// consumer re-reading, to rebuild its state, what its group had already committed): what
    /// that run gave the outside world — a dead letter — is not given again.
    fn stored_before(&self, _position: &Position) -> bool {
        false
    }
    /// Declares that the records read since the previous call belong to `epoch`.
    fn mark_epoch(&mut self, _epoch: u64) {}
    /// Every epoch up to and including `epoch` has been fully processed by every sink.
    fn commit(&mut self, _epoch: u64) -> Result<(), SourceError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_prints_its_sizes_not_its_bytes() {
        let mut batch = Batch::default();
        let chunk = Arc::new(b"{\"event_type\":\"x\"}\n".repeat(10_000));
        batch.push_shared(Position::Simulated { seq: 7 }, &chunk, 0..19);
        batch.push(Position::Simulated { seq: 8 }, br#"{"event_type":"y"}"#, []);
        let shown = format!("{batch:?}");
        assert_eq!(
            shown,
            "Batch { records: 2, refused: 0, own_bytes: 18, shared_chunks: 1 }"
        );
    }

    /// A reader waits for its first record until a read fills its batch, not while reads keep
    /// filling them, and again after one comes up short.
    #[test]
    fn first_wait_follows_the_last_read() {
        let idle = Duration::from_millis(5);
        let mut wait = FirstWait::new(idle);
        assert_eq!(wait.first(), idle);
        wait.note(8, 8);
        assert_eq!(wait.first(), Duration::ZERO);
        wait.note(8, 8);
        assert_eq!(wait.first(), Duration::ZERO);
        wait.note(7, 8);
        assert_eq!(wait.first(), idle);
        wait.note(0, 8);
        assert_eq!(wait.first(), idle);
    }
}
