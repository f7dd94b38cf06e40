//! Peer sync: how a joined node asks the control plane for its current peer list, proving who
//! it is with the WireGuard key it joined with — no other secret is ever handed out.
//!
//! The node and the control plane share a secret without sending it: X25519 of the node's
//! private key and the control plane's public key (named in the join token) equals X25519 of
//! the control plane's private key and the node's registered public key. A sync request
//! carries the cluster, the node's name, the time and an HMAC-SHA256 of those under a key
//! derived from that secret; the control plane recomputes it from the registry's public key
//! and accepts it within [`SKEW`] of its own clock. A revoked node still authenticates, and is
//! told it has no peers.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::keys::WireguardKey;

/// How far a request's time may be from the control plane's, seconds.
pub const SKEW: i64 = 120;

/// The longest a request may wait for a change, seconds.
pub const MAX_WAIT: u32 = 30;

/// A node's request for its peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    /// The node's cluster.
    pub cluster: String,
    /// The node's name.
    pub name: String,
    /// When the request was made, Unix seconds.
    pub ts: i64,
    /// The request's HMAC, base64url.
    pub mac: String,
    /// The revision the node has: the answer waits until the cluster's is newer (or `wait`
    /// runs out).
    #[serde(default)]
    pub after: Option<i64>,
    /// How long to wait for a newer revision, seconds (at most [`MAX_WAIT`]).
    #[serde(default)]
    pub wait: Option<u32>,
}

/// Why a sync request was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// The request's time is too far from the control plane's.
    #[error("the request's time is {0} s away from the control plane's clock (at most {SKEW} s)")]
    Skew(i64),
    /// The MAC is wrong (another key, or altered fields).
    #[error("the request is not signed by the node's registered key")]
    BadMac,
    /// The registered key is unusable.
    #[error("the node's registered public key is not a WireGuard key")]
    BadKey,
}

fn mac_key(shared: &[u8; 32]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(b"keel-mesh-sync-key\0");
    hash.update(shared);
    hash.finalize().into()
}

fn mac_of(key: &[u8; 32], cluster: &str, name: &str, ts: i64) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256>>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"keel-mesh-sync\0");
    mac.update(cluster.as_bytes());
    mac.update(b"\0");
    mac.update(name.as_bytes());
    mac.update(b"\0");
    mac.update(ts.to_string().as_bytes());
    mac
}

fn public_key(base64: &str) -> Option<x25519_dalek::PublicKey> {
    let bytes: [u8; 32] = STANDARD.decode(base64.trim()).ok()?.try_into().ok()?;
    Some(x25519_dalek::PublicKey::from(bytes))
}

impl SyncRequest {
    /// A request by the node with `key`, for a control plane whose WireGuard public key is
    /// `control_public` (base64). `None` when that key is not a WireGuard key.
    pub fn new(
        key: &WireguardKey,
        control_public: &str,
        cluster: &str,
        name: &str,
        now: i64,
    ) -> Option<Self> {
        let shared = key.secret().diffie_hellman(&public_key(control_public)?);
        let mac = mac_of(&mac_key(shared.as_bytes()), cluster, name, now);
        Some(SyncRequest {
            cluster: cluster.to_owned(),
            name: name.to_owned(),
            ts: now,
            mac: URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()),
            after: None,
            wait: None,
        })
    }

    /// Checks the request on the control plane (key `control`) against the node's registered
    /// public key (base64).
    pub fn verify(
        &self,
        control: &WireguardKey,
        node_public: &str,
        now: i64,
    ) -> Result<(), SyncError> {
        if (self.ts - now).abs() > SKEW {
            return Err(SyncError::Skew(self.ts - now));
        }
        let node = public_key(node_public).ok_or(SyncError::BadKey)?;
        let shared = control.secret().diffie_hellman(&node);
        let given = URL_SAFE_NO_PAD
            .decode(&self.mac)
            .map_err(|_| SyncError::BadMac)?;
        mac_of(
            &mac_key(shared.as_bytes()),
            &self.cluster,
            &self.name,
            self.ts,
        )
        .verify_slice(&given)
        .map_err(|_| SyncError::BadMac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_proves_its_key_and_nothing_else_passes() {
        let control = WireguardKey::generate();
        let node = WireguardKey::generate();
        let other = WireguardKey::generate();
        let request =
            SyncRequest::new(&node, &control.public_base64(), "c", "edge-1", 1_000).unwrap();
        assert_eq!(
            request.verify(&control, &node.public_base64(), 1_010),
            Ok(())
        );
        // Another node's key, a changed name or cluster, a stale time, a damaged MAC.
        assert_eq!(
            request.verify(&control, &other.public_base64(), 1_010),
            Err(SyncError::BadMac)
        );
        let mut renamed = request.clone();
        renamed.name = "edge-2".into();
        assert_eq!(
            renamed.verify(&control, &node.public_base64(), 1_010),
            Err(SyncError::BadMac)
        );
        let mut moved = request.clone();
        moved.cluster = "d".into();
        assert_eq!(
            moved.verify(&control, &node.public_base64(), 1_010),
            Err(SyncError::BadMac)
        );
        assert_eq!(
            request.verify(&control, &node.public_base64(), 1_000 + SKEW + 1),
            Err(SyncError::Skew(-SKEW - 1))
        );
        let mut damaged = request.clone();
        damaged.mac = "not base64!".into();
        assert_eq!(
            damaged.verify(&control, &node.public_base64(), 1_000),
            Err(SyncError::BadMac)
        );
        assert_eq!(
            request.verify(&control, "short", 1_000),
            Err(SyncError::BadKey)
        );
        // A request made for another control plane does not pass this one.
        let elsewhere =
            SyncRequest::new(&node, &other.public_base64(), "c", "edge-1", 1_000).unwrap();
        assert_eq!(
            elsewhere.verify(&control, &node.public_base64(), 1_000),
            Err(SyncError::BadMac)
        );
        assert!(SyncRequest::new(&node, "garbage", "c", "n", 1).is_none());
    }
}
