//! # keel-mesh
//!
//! Privateer: the WireGuard mesh connecting the platform's nodes — join tokens, the node
//! registry, address allocation, tunnels (boringtun) and mesh DNS. Nothing is built here yet.
