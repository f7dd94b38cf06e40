//! # keel-mesh
//!
//! Privateer: the WireGuard mesh connecting the platform's nodes.
//!
//! The parts:
//! - [`address`]: a cluster's mesh range and the deterministic address of each host in it;
//! - [`token`]: join tokens, JWTs signed with Ed25519 that carry the cluster, tenant, expiry
//!   and the bootstrap peer;
//! - [`registry`]: clusters, tokens (by hash) and nodes in SQLite or PostgreSQL, with atomic
//!   single-use redemption, replay-safe joins and tenant-segmented peer lists;
//! - [`keys`]: WireGuard keys as `wg` writes them;
//! - [`tunnel`]: the data plane — WireGuard tunnels (boringtun) to the peers over UDP, packets
//!   routed by allowed addresses and dropped when their source is not the peer's;
//! - [`agent`]: a node's join kept on disk — the pending enrollment written before asking, the
//!   answer recorded before the pending file goes — so a crash at any point is safe — and the
//!   running agent's status;
//! - [`dns`]: mesh DNS — `<node>.internal` from the peer list, NXDOMAIN for other `.internal`
//!   names, the rest forwarded upstream;
//! - [`files`]: private files and directories for keys and join state;
//! - [`device`]: the node's TUN device, with clear errors when it cannot be made;
//! - [`sync`]: peer sync requests and answers, authenticated by a key the node and the control
//!   plane derive from their WireGuard keys.

pub mod address;
pub mod agent;
pub mod device;
pub mod dns;
pub mod files;
pub mod keys;
pub mod registry;
pub mod sync;
pub mod token;
pub mod tunnel;
