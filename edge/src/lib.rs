//! # keel-edge
//!
//! The way in for the platform's producers: the Decklog gRPC ingest service (tonic) and the
//! Helmsman-side adapter that turns MistServer trigger webhooks into events. Nothing is built
//! here yet; until it is, events reach Keel through the sources in `keel-sources` (Kafka, files,
//! the simulator, an in-memory channel).
