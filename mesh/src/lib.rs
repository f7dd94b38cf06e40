//! # keel-mesh
//!
//! Privateer: the WireGuard mesh connecting the platform's nodes.
//!
//! Built so far: the control plane's half of joining —
//! - [`address`]: a cluster's mesh range and the deterministic address of each host in it;
//! - [`token`]: join tokens, JWTs signed with Ed25519 that carry the cluster, tenant, expiry
//!   and the bootstrap peer;
//! - [`registry`]: clusters, tokens (by hash) and nodes in SQLite or PostgreSQL, with atomic
//!   single-use redemption, replay-safe joins and tenant-segmented peer lists.
//!
//! Tunnels (boringtun), the agent and mesh DNS come next.

pub mod address;
pub mod registry;
pub mod token;
