//! # keel
//!
//! The `keel` binary's library: command-line interface and the wiring of sources, dataflows,
//! sinks and services into a running engine.
//!
//! - [`engine`]: one source → the Periscope and Foghorn dataflows on timely workers → live
//!   tables and the routing snapshot.
//! - [`backfill`]: `keel backfill`, a time range replayed into the durable stores.
//! - [`cli`]: `keel run`, `simulate`, `sql`, `graphql-schema`, `decklog`, `helmsman`, `loadgen`,
//!   `migrate`, `backfill`, `mesh`.
//! - [`config`]: the TOML settings file.
//! - [`serve`]: running the HTTP API beside the engine, and the `keel sql --url` client.
//! - [`foghorn`]: Foghorn's routing fronts (HTTP, gRPC) on a runtime of their own.
//! - [`edge`]: Decklog and the Helmsman adapter on a runtime of their own; Decklog's
//!   credentials from the API's.
//! - [`loadgen`]: the load generator behind `keel loadgen` and the Decklog benchmark.
//! - [`mesh`]: `keel mesh`, the Privateer mesh's commands: the control plane's (tokens, nodes,
//!   HTTP API) and a node's (join, status, DNS).
//! - [`reconcile`]: after a replay, removing stored rows the rebuilt state no longer has.
//! - [`store`]: the durable stores of `keel run` (ClickHouse) and `keel migrate`.
//! - [`summary`]: the one-line live summary `keel run` prints.
//!
//! The crates underneath, in dependency order: `keel-operators` (domain-free operators),
//! `keel-sources` (event model, codecs, connectors), `keel-dataflows` (Periscope, Foghorn),
//! `keel-sinks` (live tables, ClickHouse, the durable writer), `keel-api` (SQL, GraphQL, feeds, routing fronts), `keel-edge`
//! (Decklog, the Helmsman adapter), `keel-mesh` (join tokens, node registry, WireGuard tunnels).

/// Every program built on this library allocates with mimalloc: the engine, Decklog and the API
/// allocate and free many small, short-lived objects across threads, where glibc's allocator
/// spent a fifth of Decklog's CPU (see BENCHMARKS.md). With the crate's `override` feature the
/// C libraries linked in (librdkafka above all) allocate with it too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod backfill;
pub mod cli;
pub mod config;
pub mod edge;
pub mod engine;
pub mod foghorn;
pub mod loadgen;
pub mod mesh;
pub mod reconcile;
pub mod serve;
pub mod store;
pub mod summary;

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
