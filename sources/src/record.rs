//! Records as sources hand them over: a value, the headers Keel reads, and where it came from.

use std::borrow::Cow;
use std::fmt;

use keel_operators::sym::Sym;
use serde::{Deserialize, Serialize};

/// Where a record came from; printed in `ingest_errors` so a bad record can be found again.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Position {
    /// A line of a file (1-based).
    File {
        /// The file as given on the command line.
        path: Sym,
        /// Line number, from 1.
        line: u64,
    },
    /// A Kafka record.
    Kafka {
        /// Topic.
        topic: Sym,
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
    },
    /// The n-th record the simulator produced (from 0).
    Simulated {
        /// Sequence number.
        seq: u64,
    },
    /// The n-th record handed over in memory (from 0) by the named producer.
    Memory {
        /// Who handed it over.
        source: Sym,
        /// Sequence number.
        seq: u64,
    },
}

impl Position {
    /// The source without the record's place in it (`file:PATH`, `kafka:TOPIC/PARTITION`,
    /// `sim`, or the producer's name), and that place as a number (line from 1, offset, or
    /// sequence number): together they sort records in the order the source holds them, which
    /// the text of the position does not (`…@11378` sorts before `…@2000`).
    pub fn origin(&self) -> (String, i64) {
        let number = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        match self {
            Position::File { path, line } => (format!("file:{path}"), number(*line)),
            Position::Kafka {
                topic,
                partition,
                offset,
            } => (format!("kafka:{topic}/{partition}"), *offset),
            Position::Simulated { seq } => ("sim".to_owned(), number(*seq)),
            Position::Memory { source, seq } => (source.to_string(), number(*seq)),
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::File { path, line } => write!(f, "file:{path}:{line}"),
            Position::Kafka {
                topic,
                partition,
                offset,
            } => write!(f, "kafka:{topic}/{partition}@{offset}"),
            Position::Simulated { seq } => write!(f, "sim:{seq}"),
            Position::Memory { source, seq } => write!(f, "{source}:{seq}"),
        }
    }
}

/// The Kafka headers the codec honours (body fields win; headers fill in what the body lacks),
/// and the record's key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers<'a> {
    /// `tenant_id` header.
    pub tenant_id: Option<Cow<'a, str>>,
    /// `event_type` header.
    pub event_type: Option<Cow<'a, str>>,
    /// `event_id` header.
    pub event_id: Option<Cow<'a, str>>,
    /// `source` header.
    pub source: Option<Cow<'a, str>>,
    /// The Kafka record key, when the record has one. Not a header, but it travels with them:
    /// the codec ignores it and dead letters carry it back (`key_base64`).
    pub key: Option<Cow<'a, [u8]>>,
}

impl<'a> Headers<'a> {
    /// The headers the codec reads among `(name, value)` pairs (later ones win).
    pub fn from_pairs<'n>(pairs: impl IntoIterator<Item = (&'n str, &'a str)>) -> Headers<'a> {
        let mut headers = Headers::default();
        for (name, value) in pairs {
            headers.set(name, Cow::Borrowed(value));
        }
        headers
    }

    /// Records a header if it is one the codec reads; other names are ignored.
    pub fn set(&mut self, name: &str, value: Cow<'a, str>) {
        match name {
            "tenant_id" => self.tenant_id = Some(value),
            "event_type" => self.event_type = Some(value),
            "event_id" => self.event_id = Some(value),
            "source" => self.source = Some(value),
            _ => {}
        }
    }
}

/// One record to decode.
#[derive(Clone, Debug)]
pub struct Record<'a> {
    /// Where it came from.
    pub position: Position,
    /// The record value (the event JSON).
    pub value: &'a [u8],
    /// Headers, when the transport has them.
    pub headers: Headers<'a>,
}
