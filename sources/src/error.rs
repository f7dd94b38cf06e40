//! Errors: records that cannot be used are *data* ([`IngestError`] rows); failures of a source
//! itself are [`SourceError`]s.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::record::Position;

/// A record that could not be used, with the reason. It becomes a row of `ingest_errors`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IngestError {
    /// Where the record came from.
    pub position: Position,
    /// Why it could not be used, in words a user can act on.
    pub reason: String,
    /// The record's event type, when it could be read.
    pub event_type: Option<String>,
    /// The record's tenant as given (it may be the very thing that is wrong).
    pub tenant_id: Option<String>,
    /// The start of the record, for finding it again.
    pub excerpt: String,
}

/// Longest reason kept in an error row, in bytes. A reason quotes the value it refuses, and a
/// megabyte `tenant_id` would otherwise be copied whole into the row.
pub const REASON_BYTES: usize = 512;

/// `text`, cut to at most `max` bytes (at a character boundary) and marked `…` when cut.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    format!("{}…", &text[..text.floor_char_boundary(max)])
}

/// Longest excerpt kept in an error row, in bytes.
pub const EXCERPT_BYTES: usize = 160;

/// The start of `value` as text, cut at a character boundary.
pub fn excerpt(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(&value[..value.len().min(EXCERPT_BYTES)]);
    let mut text = text.into_owned();
    if value.len() > EXCERPT_BYTES {
        text.push('…');
    }
    text
}

/// Why a source could not deliver records.
///
/// `Io` and `Kafka` are external and usually retryable (a file moved, a broker unreachable);
/// `Config` is the user's to fix (a bad URL or option). Neither is ever raised for bad *records*,
/// which become [`IngestError`] rows instead.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The Kafka client reported an error.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A source was configured wrongly.
    #[error("{0}")]
    Config(String),
}
