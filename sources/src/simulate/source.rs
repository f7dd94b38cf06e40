//! The simulator as a [`Source`], and the `kcat -J` line writer for `keel simulate --out`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::encode::{Obj, push_string};
use super::{SimConfig, SimRecord, Simulator};
use crate::error::SourceError;
use crate::record::Position;
use crate::source::{Batch, Poll, Source, SourceReader};

struct Shared {
    simulator: Simulator,
    produced: u64,
    limit: Option<u64>,
    rate: Option<f64>,
    started: Option<Instant>,
    scratch: Vec<u8>,
}

/// The simulator shared by all workers: each batch is generated under a lock (generation is
/// sequential by nature) and decoded by whichever worker asked for it.
#[derive(Clone)]
pub struct SimSource {
    shared: Arc<Mutex<Shared>>,
    description: String,
}

impl std::fmt::Debug for SimSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

impl SimSource {
    /// A simulated fleet; `limit` stops it after that many records, `rate` caps records per
    /// wall-clock second (as fast as possible without one).
    pub fn new(config: SimConfig, limit: Option<u64>, rate: Option<f64>) -> Self {
        let description = format!(
            "simulator (seed {}, {:?}, {})",
            config.seed,
            config.wire,
            rate.map_or("as fast as possible".to_owned(), |r| format!(
                "{r} records/s"
            ))
        );
        SimSource {
            shared: Arc::new(Mutex::new(Shared {
                simulator: Simulator::new(config),
                produced: 0,
                limit,
                rate,
                started: None,
                scratch: Vec::new(),
            })),
            description,
        }
    }
}

impl Source for SimSource {
    fn open(&self, _worker: usize, _workers: usize) -> Result<Box<dyn SourceReader>, SourceError> {
        Ok(Box::new(SimReader {
            shared: self.shared.clone(),
        }))
    }

    fn kind(&self) -> &'static str {
        "simulator"
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

struct SimReader {
    shared: Arc<Mutex<Shared>>,
}

impl SourceReader for SimReader {
    fn next_batch(&mut self, batch: &mut Batch, max: usize) -> Result<Poll, SourceError> {
        let mut shared = self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let shared = &mut *shared;
        let mut allowed = max as u64;
        if let Some(limit) = shared.limit {
            if shared.produced >= limit {
                return Ok(Poll::Done);
            }
            allowed = allowed.min(limit - shared.produced);
        }
        if let Some(rate) = shared.rate {
            let started = *shared.started.get_or_insert_with(Instant::now);
            let due = (started.elapsed().as_secs_f64() * rate) as u64 + 1;
            allowed = allowed.min(due.saturating_sub(shared.produced));
            if allowed == 0 {
                return Ok(Poll::Idle);
            }
        }
        for _ in 0..allowed {
            let seq = shared.produced;
            shared.scratch.clear();
            let record = shared.simulator.next_record(&mut shared.scratch);
            batch.push(
                Position::Simulated { seq },
                &shared.scratch,
                headers(&record),
            );
            shared.produced += 1;
        }
        Ok(Poll::Ready)
    }
}

/// The Kafka headers a producer would set for this record (an empty value means "not set").
pub fn headers(record: &SimRecord) -> [(&'static str, &[u8]); 4] {
    [
        ("event_type", record.event_type.as_bytes()),
        ("source", record.source.as_bytes()),
        ("tenant_id", record.tenant_id.as_bytes()),
        ("event_id", record.event_id.as_bytes()),
    ]
}

/// Writes one line in the shape `kcat -J` prints for a consumed message.
pub fn write_kcat_line(
    out: &mut Vec<u8>,
    topic: &str,
    partition: i32,
    offset: i64,
    record: &SimRecord,
    payload: &[u8],
) {
    let mut line = Obj::open(out);
    line.str("topic", topic)
        .raw("partition", &partition.to_string())
        .raw("offset", &offset.to_string())
        .str("tstype", "create")
        .raw("ts", &record.time.to_string())
        .raw("broker", "-1")
        .with("headers", |out| {
            out.push(b'[');
            let set = headers(record).into_iter().filter(|(_, v)| !v.is_empty());
            for (i, (name, value)) in set.enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                push_string(out, name);
                out.push(b',');
                push_string(out, &String::from_utf8_lossy(value));
            }
            out.push(b']');
        })
        .str("key", &record.event_id)
        .with("payload", |out| {
            push_string(out, &String::from_utf8_lossy(payload));
        });
    line.close();
    out.push(b'\n');
}
