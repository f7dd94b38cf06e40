//! # keel-api
//!
//! The read side of Keel: how people and programs get at the live tables.
//!
//! - [`auth`]: bearer JWTs (HS256) and static tokens; the token decides whose rows a caller sees.
//! - [`sql`]: read-only SQL over the live tables (DataFusion), scoped by tenant, with key lookups.
//! - [`values`]: the bound on the values one function call builds in a served query.
//! - [`server`]: the HTTP API (axum): the routes (`/`, `/v1/sql`, `/graphql`, `/ws`, health, readiness, metrics), errors, limits.
//! - [`graphql`]: GraphQL queries and subscriptions, incremental table results among them.
//! - [`signalman`]: the `/ws` event feed in the platform's JSON protocol.
//! - [`pg`]: the same SQL over the PostgreSQL wire protocol, for `psql` and Grafana.
//! - [`dashboard`]: the live dashboard page at `/`.
//! - [`metrics`]: engine counters and the Prometheus text.
//! - [`mod@format`]: rendering results as a text table, CSV, JSON or Arrow IPC.

pub mod auth;
pub mod dashboard;
pub mod foghorn;
pub mod foghorn_grpc;
pub mod foghorn_http;
pub mod foghorn_limit;
pub mod format;
pub mod graphql;
pub mod graphql_ws;
pub mod listener;
pub mod metrics;
pub mod pg;
pub mod server;
pub mod signalman;
pub mod sql;
pub mod values;
