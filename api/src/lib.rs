//! # keel-api
//!
//! The read side of Keel: how people and programs get at the live tables.
//!
//! - [`sql`]: read-only SQL over snapshots of the live tables (DataFusion).
//! - [`format`]: rendering results as a text table, CSV or JSON.

pub mod format;
pub mod sql;
