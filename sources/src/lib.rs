//! # keel-sources
//!
//! Everything between a byte on the wire and a typed [`Event`](event::Event):
//!
//! - [`event`]: the one event model both wire versions decode into.
//! - [`record`]: records as connectors hand them over (value, headers, position).
//! - [`codec`]: decoding version 1 and version 2 records; bad records become
//!   [`IngestError`](error::IngestError) rows with a reason, never panics.
//! - [`error`]: error rows and source failures.
//!
//! ```
//! use keel_sources::codec::decode;
//! use keel_sources::record::{Headers, Position, Record};
//! use keel_sources::event::EventKind;
//!
//! let value = br#"{"event_id":"0b7d4a8e-5c1f-4e53-9a43-2f7e1d3c9b10","event_type":"viewer_connect",
//!   "timestamp":"2026-11-01T10:00:00.250Z","tenant_id":"5eed517e-ba5e-da7a-517e-ba5eda7a0001",
//!   "schema_version":2,"data":{"trigger_type":"USER_NEW","node_id":"edge-ams-1",
//!   "viewer_connect":{"stream_name":"live+demo","session_id":"17","connector":"HLS","client_country":"NL"}}}"#;
//! let record = Record { position: Position::Simulated { seq: 0 }, value, headers: Headers::default() };
//! let event = decode(&record).unwrap();
//! let EventKind::ViewerConnect(connect) = &event.kind else { panic!() };
//! assert_eq!(connect.stream.internal_name.as_str(), "demo");
//! assert_eq!(connect.place.country.as_str(), "NL");
//!
//! let bad = Record { value: b"{\"event_type\":\"viewer_connect\"", ..record };
//! assert_eq!(decode(&bad).unwrap_err().reason, "invalid JSON at byte 30: expected ',' or '}' in an object");
//! ```

pub mod codec;
pub mod dead_letter;
pub mod error;
pub mod event;
pub mod file;
pub mod kafka;
pub mod memory;
pub mod record;
pub mod simulate;
pub mod source;
