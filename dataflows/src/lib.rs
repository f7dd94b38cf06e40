//! # keel-dataflows
//!
//! The domain logic of Keel as timely dataflows over decoded events.
//!
//! - [`periscope`]: the analytics tables (streams, sessions, nodes, geography, 5-minute usage and
//!   health, hourly routing, errors), kept live per epoch.
//! - [`signalman`]: events as live messages on channels, client addresses removed.
//! - [`privacy`]: client addresses removed from raw record text the tables show.

pub mod foghorn;
pub mod periscope;
pub mod privacy;
pub mod signalman;
