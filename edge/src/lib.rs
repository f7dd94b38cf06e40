//! # keel-edge
//!
//! The way in for the platform's producers.
//!
//! - [`proto`]: the Decklog messages of both versions, declared by hand with the platform's
//!   field numbers (contracts in `edge/proto/`), and their protobuf-JSON form.
//! - [`envelope`]: a message to the Kafka record the platform writes — event id (deterministic
//!   from the producer's request id), tenant (from the caller's credentials, fail closed), time,
//!   headers — checked by the engine's own decoder.
//! - [`handoff`]: where accepted events go: Kafka, acknowledged once the broker has them, or the
//!   embedded engine's input; a retried send of an event this process has delivered is not
//!   written twice.
//! - [`decklog`]: the gRPC service (version 2 `SendEvent` + batch `SendEvents`, version 1
//!   `StreamEvents`, `SendBalancingEvent`, `CheckHealth`), bearer tokens, TLS.
//! - [`client`]: a Decklog client.
//! - [`mist`], [`wal`], [`helmsman`]: the adapter MistServer posts trigger webhooks to; every
//!   trigger is on disk before Mist is answered (a blocking one whose write takes over 4 s
//!   excepted) and is forwarded oldest first until Decklog has it.
//!
//! ```
//! use keel_edge::mist::{Origin, parse};
//! use keel_edge::envelope::{Caller, trigger_record};
//!
//! let origin = Origin { node_id: "edge-1".into(), received_ms: 1_793_000_000_000, ..Origin::default() };
//! let trigger = parse("STREAM_BUFFER", b"live+demo\nFULL\n", &origin);
//! let tenant = uuid::Uuid::parse_str("5eed517e-ba5e-da7a-517e-ba5eda7a0001").unwrap();
//! let record = trigger_record(&trigger, Caller::Tenant(tenant), origin.received_ms).unwrap();
//! assert_eq!(record.event_type, "stream_buffer");
//! let json: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
//! assert_eq!(json["data"]["stream_buffer"]["buffer_state"], "FULL");
//! ```

pub mod client;
pub mod decklog;
pub mod envelope;
pub mod handoff;
pub mod helmsman;
pub mod mist;
pub mod proto;
pub mod wal;
