//! # keel-sinks
//!
//! Where dataflow outputs go. Every sink is generic over row types: it sees rows through the
//! [`Row`](keel_operators::table::Row) trait and serde, never through a concrete type.
//!
//! - [`live`]: in-memory live tables, applied per epoch and read as Arrow snapshots.

pub mod live;
