//! # keel-sinks
//!
//! Where dataflow outputs go. Every sink is generic over row types: it sees rows through the
//! [`Row`](keel_operators::table::Row) trait and serde, never through a concrete type.
//!
//! - [`live`]: in-memory live tables, applied per epoch and read as Arrow snapshots.
//! - [`hub`]: pushes each epoch's net table changes, and decoded events, to subscribers without
//!   ever waiting for one.

pub mod hub;
pub mod live;
