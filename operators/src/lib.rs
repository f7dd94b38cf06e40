//! # keel-operators
//!
//! The domain-free building blocks of Keel's dataflows. Nothing here knows about streams,
//! viewers or nodes; everything here is about time, keys and incremental state.
//!
//! - [`sym`]: interned strings, the 4-byte currency of compact state and rows.
//! - [`sympair`]: two interned strings that travel together under one 4-byte handle.
//! - [`appendonly`]: the lock-free, append-only table interners keep their values in.
//! - [`shortstr`]: identifiers too many to intern (session ids) in 16 bytes, inline up to 15.
//! - [`time`]: event time as milliseconds, RFC 3339 parsing and printing, windows.
//! - [`profile`]: a step function answering "highest level in a range" (true peak concurrency).
//! - [`maintain`]: the operator that keeps per-worker state current with a timely stream and
//!   reports changes when epochs close, with a global watermark.
//! - [`latest`]: a thin wrapper over `maintain` keeping the newest value per key by event time.
//! - [`chunked`]: a growable array in fixed chunks, so tables of millions of rows grow without
//!   stalls.
//! - [`posindex`]: positions of rows by 32-bit key hash, one cache line per look-up before the
//!   row.
//! - [`prefetch`]: asking for a value's cache line ahead of its use (the one `unsafe` block).
//! - [`set64`]: a flat set of 64-bit hashes, one line per look-up, prefetchable.
//! - [`split`]: one stream into several by a function of each record, each record moved once.
//! - [`table`]: keyed rows and the upsert changes operators report, and the sink traits.
//!
//! ```
//! use keel_operators::{profile::StepProfile, time};
//! let mut open = StepProfile::default();
//! let start = time::parse_rfc3339("2026-11-01T10:00:00Z").unwrap();
//! open.add(start, 1);
//! open.add(start + 90 * time::SECOND, -1);
//! assert_eq!(open.max_level(), 1);
//! ```

pub mod appendonly;
pub mod chunked;
pub mod idset;
pub mod latest;
pub mod maintain;
pub mod posindex;
pub mod prefetch;
pub mod profile;
pub mod set64;
pub mod shortstr;
pub mod split;
pub mod sym;
pub mod sympair;
pub mod table;
pub mod time;
pub mod words;
