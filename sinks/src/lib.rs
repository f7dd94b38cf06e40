//! # keel-sinks
//!
//! Where dataflow outputs go. Every sink is generic over row types: it sees rows through the
//! [`Row`](keel_operators::table::Row) trait and serde, never through a concrete type.
//!
//! - [`live`]: in-memory live tables, applied per epoch and read as Arrow snapshots.
//! - [`clickhouse`]: ClickHouse tables mirroring the live tables (`ReplacingMergeTree`, one
//!   version column), created by `keel migrate`, read back for checks.
//! - [`rowbinary`]: rows as ClickHouse `RowBinary`, serialized straight from the row types.
//! - [`durable`]: changes staged per closed epoch, written in batches by a thread of their own,
//!   and the watermark of epochs safely stored (source positions are committed below it).
//! - [`sql`]: the platform's `stream_analytics` table in PostgreSQL or SQLite, upserted from
//!   the `streams` rows.
//! - [`hub`]: pushes each epoch's net table changes, and decoded events, to subscribers without
//!   ever waiting for one.

pub mod clickhouse;
pub mod durable;
pub mod hub;
pub mod json_row;
pub mod live;
pub mod rowbinary;
pub mod sql;
