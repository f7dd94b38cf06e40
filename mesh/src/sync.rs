//! Peer sync: how a joined node asks the control plane for its current peer list, proving who
//! it is with the WireGuard key it joined with — no other secret is ever handed out.
//!
//! The node and the control plane share a secret without sending it: X25519 of the node's
//! private key and the control plane's public key (named in the join token) equals X25519 of
//! the control plane's private key and the node's registered public key ([`SharedKey`]). A
//! sync request carries the cluster, the node's name, the time, the revision it has and how
//! long it will wait, with an HMAC-SHA256 of all of them under that key; the control plane
//! recomputes it from the registry's public key and accepts it within [`SKEW`] of its own clock.
//! The answer — and the answer to the join itself — carries the HMAC of its body in
//! [`ANSWER_MAC_HEADER`], so a node takes peers only from its own control plane, even over
//! plain HTTP. A revoked node still authenticates, and is told it has no peers.

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

/// The header an answer's HMAC travels in.
pub const ANSWER_MAC_HEADER: &str = "x-keel-mesh-mac";

/// The key a node and its control plane share: derived from X25519 of one's private key and
/// the other's public key, so only the two of them can make it.
pub struct SharedKey([u8; 32]);

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedKey(..)")
    }
}

fn public_key(base64: &str) -> Option<x25519_dalek::PublicKey> {
    let bytes: [u8; 32] = STANDARD.decode(base64.trim()).ok()?.try_into().ok()?;
    Some(x25519_dalek::PublicKey::from(bytes))
}

impl SharedKey {
    /// The key between `ours` and the public key `theirs` (base64); `None` when `theirs` is not
    /// a WireGuard key or a degenerate one (which would make the key public).
    pub fn between(ours: &WireguardKey, theirs: &str) -> Option<Self> {
        let shared = ours.secret().diffie_hellman(&public_key(theirs)?);
        if !shared.was_contributory() {
            return None;
        }
        let mut hash = Sha256::new();
        hash.update(b"keel-mesh-sync-key\0");
        hash.update(shared.as_bytes());
        Some(SharedKey(hash.finalize().into()))
    }

    fn mac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256>>::new_from_slice(&self.0).expect("HMAC takes any key length");
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    fn request_mac(&self, request: &SyncRequest) -> Hmac<Sha256> {
        let optional = |value: Option<String>| value.unwrap_or_else(|| "-".into());
        self.mac(&[
            b"keel-mesh-sync",
            request.cluster.as_bytes(),
            request.name.as_bytes(),
            request.ts.to_string().as_bytes(),
            optional(request.after.map(|a| a.to_string())).as_bytes(),
            optional(request.wait.map(|w| w.to_string())).as_bytes(),
        ])
    }

    /// The MAC of an answer's body, base64url, for [`ANSWER_MAC_HEADER`].
    pub fn answer_mac(&self, body: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(
            self.mac(&[b"keel-mesh-answer", body])
                .finalize()
                .into_bytes(),
        )
    }

    /// Whether `mac` is the MAC of the answer `body`.
    pub fn check_answer(&self, body: &[u8], mac: &str) -> bool {
        URL_SAFE_NO_PAD.decode(mac.trim()).is_ok_and(|given| {
            self.mac(&[b"keel-mesh-answer", body])
                .verify_slice(&given)
                .is_ok()
        })
    }
}

impl SyncRequest {
    /// A request by the node holding `key` (shared with its control plane), signed over every
    /// field.
    pub fn new(
        key: &SharedKey,
        cluster: &str,
        name: &str,
        now: i64,
        after: Option<i64>,
        wait: Option<u32>,
    ) -> Self {
        let mut request = SyncRequest {
            cluster: cluster.to_owned(),
            name: name.to_owned(),
            ts: now,
            mac: String::new(),
            after,
            wait,
        };
        request.mac = URL_SAFE_NO_PAD.encode(key.request_mac(&request).finalize().into_bytes());
        request
    }

    /// Checks the request on the control plane (key `control`) against the node's registered
    /// public key (base64); the key shared with the node, for signing the answer.
    pub fn verify(
        &self,
        control: &WireguardKey,
        node_public: &str,
        now: i64,
    ) -> Result<SharedKey, SyncError> {
        if (self.ts - now).abs() > SKEW {
            return Err(SyncError::Skew(self.ts - now));
        }
        let key = SharedKey::between(control, node_public).ok_or(SyncError::BadKey)?;
        let given = URL_SAFE_NO_PAD
            .decode(&self.mac)
            .map_err(|_| SyncError::BadMac)?;
        key.request_mac(self)
            .verify_slice(&given)
            .map_err(|_| SyncError::BadMac)?;
        Ok(key)
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
        let shared = SharedKey::between(&node, &control.public_base64()).unwrap();
        let request = SyncRequest::new(&shared, "c", "edge-1", 1_000, Some(4), Some(25));
        let verified = request
            .verify(&control, &node.public_base64(), 1_010)
            .unwrap();
        // Another node's key, any field changed, a stale time, a damaged MAC.
        assert_eq!(
            request
                .verify(&control, &other.public_base64(), 1_010)
                .unwrap_err(),
            SyncError::BadMac
        );
        let changes: [fn(&mut SyncRequest); 5] = [
            |r| r.name = "edge-2".into(),
            |r| r.cluster = "d".into(),
            |r| r.after = Some(3),
            |r| r.wait = None,
            |r| r.ts += 1,
        ];
        for change in changes {
            let mut altered = request.clone();
            change(&mut altered);
            assert_eq!(
                altered
                    .verify(&control, &node.public_base64(), 1_010)
                    .unwrap_err(),
                SyncError::BadMac,
                "{altered:?}"
            );
        }
        assert_eq!(
            request
                .verify(&control, &node.public_base64(), 1_000 + SKEW + 1)
                .unwrap_err(),
            SyncError::Skew(-SKEW - 1)
        );
        let mut damaged = request.clone();
        damaged.mac = "not base64!".into();
        assert_eq!(
            damaged
                .verify(&control, &node.public_base64(), 1_000)
                .unwrap_err(),
            SyncError::BadMac
        );
        assert_eq!(
            request.verify(&control, "short", 1_000).unwrap_err(),
            SyncError::BadKey
        );
        // A degenerate registered key (all zeros) would make the shared key public: refused.
        let zero = STANDARD.encode([0u8; 32]);
        assert_eq!(
            request.verify(&control, &zero, 1_000).unwrap_err(),
            SyncError::BadKey
        );
        assert!(SharedKey::between(&node, &zero).is_none());
        assert!(SharedKey::between(&node, "garbage").is_none());
        // A request made for another control plane does not pass this one.
        let elsewhere = SharedKey::between(&node, &other.public_base64()).unwrap();
        let misdirected = SyncRequest::new(&elsewhere, "c", "edge-1", 1_000, None, None);
        assert_eq!(
            misdirected
                .verify(&control, &node.public_base64(), 1_000)
                .unwrap_err(),
            SyncError::BadMac
        );
        // Answers: the control plane's MAC checks on the node, and nothing altered passes.
        let body = br#"{"peers":[]}"#;
        let mac = verified.answer_mac(body);
        assert!(shared.check_answer(body, &mac));
        assert!(!shared.check_answer(br#"{"peers":[1]}"#, &mac));
        assert!(!shared.check_answer(body, "AAAA"));
        assert!(!elsewhere.check_answer(body, &mac));
    }
}
