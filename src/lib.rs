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

/// Turns transparent huge pages off for this process, whatever the host's setting; call it first
/// thing in `main`. mimalloc is built not to ask for them (`no_thp`), which is enough where the
/// kernel gives huge pages only on request ("madvise", as on the project's machines); where it
/// gives them to all memory ("always"), this does the rest. With huge pages every first touch of
/// fresh memory zeroes 2 MiB at once, and at 100,000 events/s those faults bunched into stalls of
/// 100–200 ms on the engine thread (BENCHMARKS.md, live API). Returns whether the flag is set;
/// a kernel that refuses it leaves Keel working, only exposed to those stalls.
pub fn without_huge_pages() -> bool {
    nix::sys::prctl::set_thp_disable(true).is_ok()
        && nix::sys::prctl::get_thp_disable().unwrap_or(false)
}

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
