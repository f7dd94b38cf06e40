//! # keel
//!
//! The `keel` binary's library: command-line interface and the wiring of sources, dataflows and
//! sinks into a running engine.
//!
//! - [`engine`]: one source → the Periscope dataflow on timely workers → live tables.
//! - [`cli`]: `keel run`, `keel simulate`, `keel sql`.
//! - [`config`]: the TOML settings file.
//! - [`serve`]: running the HTTP API beside the engine, and the `keel sql --url` client.
//! - [`summary`]: the one-line live summary `keel run` prints.
//!
//! The crates underneath, in dependency order: `keel-operators` (domain-free operators),
//! `keel-sources` (event model, codecs, connectors), `keel-dataflows` (Periscope),
//! `keel-sinks` (live tables), `keel-api` (SQL).

pub mod cli;
pub mod config;
pub mod edge;
pub mod engine;
pub mod foghorn;
pub mod loadgen;
pub mod serve;
pub mod summary;

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
