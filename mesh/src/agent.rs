//! A node's side of joining, kept on disk so a crash at any point is safe.
//!
//! Before it asks the control plane, the node writes `pending-enrollment.json` (mode 0600): its
//! name, the WireGuard key it made, the token and where it is going. If it dies before the answer
//! is saved, the next attempt finds that file and asks again with the same token, name and key —
//! which the registry answers with the identity it already gave, using nothing up. Once the
//! answer is in, the key goes to `wireguard.key`, the identity to `enrollment.json` and the peer
//! list to `last-known-peers.json` (each written atomically), and only then is the pending file
//! removed. A running agent rewrites `status.json` (its tunnels and peer sync) every few
//! seconds, for `keel mesh status`.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::files::{create_private_dir, write_private};
use crate::keys::WireguardKey;
use crate::registry::Identity;
use crate::token::JoinClaims;
use crate::tunnel::{PeerStatus, TunnelStats};

/// A join begun and not yet recorded as done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The node's name.
    pub name: String,
    /// The WireGuard private key made for this join (base64).
    pub private_key: String,
    /// Its public key (base64).
    pub public_key: String,
    /// The join token.
    pub token: String,
    /// The control plane's URL.
    pub control: String,
    /// The node's own WireGuard endpoint, if it gave one.
    pub endpoint: Option<String>,
    /// The certificate (PEM) an `https://` control plane's must chain to, when not a public
    /// one.
    #[serde(default)]
    pub control_ca: Option<String>,
    /// When the join began, Unix seconds.
    pub started_at: i64,
}

/// A finished join.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// What the control plane answered.
    pub identity: Identity,
    /// The control plane's URL.
    pub control: String,
    /// When the answer was recorded, Unix seconds.
    pub enrolled_at: i64,
    /// The control plane's WireGuard public key (from the token): peer sync proves the node's
    /// key against it.
    #[serde(default)]
    pub control_public_key: String,
    /// The certificate (PEM) an `https://` control plane's must chain to, when not a public
    /// one.
    #[serde(default)]
    pub control_ca: Option<String>,
}

/// What a running agent reports about itself, rewritten every few seconds for
/// `keel mesh status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The agent's process id.
    pub pid: u32,
    /// When this was written, Unix seconds.
    pub updated_at: i64,
    /// The TUN interface.
    pub interface: String,
    /// The UDP address the tunnel listens on.
    pub listen: String,
    /// The peer list's revision.
    pub revision: i64,
    /// Whether the control plane said this node is revoked.
    pub revoked: bool,
    /// When the control plane last answered a sync, Unix seconds.
    pub last_sync: Option<i64>,
    /// The last sync's error, when it failed.
    pub sync_error: Option<String>,
    /// Whether a sync is waiting at the control plane for the next change (peer sync is
    /// live).
    #[serde(default)]
    pub sync_waiting: bool,
    /// The tunnel's counters.
    pub stats: TunnelStats,
    /// Each peer's tunnel.
    pub peers: Vec<PeerStatus>,
}

/// A node's mesh state directory.
#[derive(Clone, Debug)]
pub struct NodeState {
    dir: PathBuf,
}

const PENDING: &str = "pending-enrollment.json";
const ENROLLMENT: &str = "enrollment.json";
const PEERS: &str = "last-known-peers.json";
const KEY: &str = "wireguard.key";
const STATUS: &str = "status.json";

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    write_private(path, &bytes)
}

/// The claims of `token`, read without checking the signature: a node cannot check it (it has
/// no key), and needs only to know where to send it. The control plane checks everything.
pub fn peek_claims(token: &str) -> Option<JoinClaims> {
    let body = token.trim().split('.').nth(1)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).ok()?).ok()
}

impl NodeState {
    /// The state in `dir`, made (mode 0700) if missing.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        create_private_dir(dir)?;
        Ok(NodeState {
            dir: dir.to_owned(),
        })
    }

    /// The finished join, if there is one.
    pub fn enrollment(&self) -> std::io::Result<Option<Enrollment>> {
        read_json(&self.dir.join(ENROLLMENT))
    }

    /// The unfinished join, if there is one.
    pub fn pending(&self) -> std::io::Result<Option<Pending>> {
        read_json(&self.dir.join(PENDING))
    }

    /// Records a join about to be asked for, durably, before asking. An unfinished earlier join
    /// keeps its key (the control plane may already know it); a new one gets a new key.
    pub fn begin(
        &self,
        name: &str,
        token: &str,
        control: &str,
        endpoint: Option<&str>,
        control_ca: Option<&str>,
        now: i64,
    ) -> std::io::Result<Pending> {
        let (private_key, public_key) = match self.pending()? {
            Some(earlier) => (earlier.private_key, earlier.public_key),
            None => {
                let key = WireguardKey::generate();
                (key.private_base64(), key.public_base64())
            }
        };
        let pending = Pending {
            name: name.to_owned(),
            private_key,
            public_key,
            token: token.to_owned(),
            control: control.to_owned(),
            endpoint: endpoint.map(str::to_owned),
            control_ca: control_ca.map(str::to_owned),
            started_at: now,
        };
        write_json(&self.dir.join(PENDING), &pending)?;
        Ok(pending)
    }

    /// Records the control plane's answer: key, identity and peers first, then the pending file
    /// goes.
    pub fn complete(
        &self,
        pending: &Pending,
        identity: Identity,
        now: i64,
    ) -> std::io::Result<Enrollment> {
        write_private(
            &self.dir.join(KEY),
            format!("{}\n", pending.private_key).as_bytes(),
        )?;
        self.save_peers(&identity)?;
        let enrollment = Enrollment {
            identity,
            control: pending.control.clone(),
            enrolled_at: now,
            control_public_key: peek_claims(&pending.token)
                .map(|claims| claims.bootstrap.public_key)
                .unwrap_or_default(),
            control_ca: pending.control_ca.clone(),
        };
        write_json(&self.dir.join(ENROLLMENT), &enrollment)?;
        self.abandon()?;
        Ok(enrollment)
    }

    /// Drops an unfinished join the control plane refused for good.
    pub fn abandon(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.dir.join(PENDING)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Keeps `identity`'s peer list as the last known good one, for when the control plane is
    /// away.
    pub fn save_peers(&self, identity: &Identity) -> std::io::Result<()> {
        write_json(&self.dir.join(PEERS), identity)
    }

    /// The last known good identity and peer list.
    pub fn last_known(&self) -> std::io::Result<Option<Identity>> {
        read_json(&self.dir.join(PEERS))
    }

    /// Forgets a finished join (the node was revoked and joins again with a new token); the
    /// key goes with it, so the new join gets a new one.
    pub fn forget(&self) -> std::io::Result<()> {
        for file in [ENROLLMENT, PEERS, KEY, STATUS] {
            match std::fs::remove_file(self.dir.join(file)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Records what the running agent is doing.
    pub fn save_status(&self, status: &AgentStatus) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
        crate::files::write_private_unsynced(&self.dir.join(STATUS), &bytes)
    }

    /// What the agent last recorded, if it ever ran.
    pub fn status(&self) -> std::io::Result<Option<AgentStatus>> {
        read_json(&self.dir.join(STATUS))
    }

    /// The node's WireGuard key, once joined.
    pub fn key(&self) -> std::io::Result<Option<WireguardKey>> {
        match std::fs::read_to_string(self.dir.join(KEY)) {
            Ok(text) => Ok(WireguardKey::from_base64(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Node;

    fn identity(public_key: &str) -> Identity {
        Identity {
            node: Node {
                cluster: "c".into(),
                name: "n".into(),
                tenant: None,
                public_key: public_key.into(),
                address: "10.88.0.9".parse().unwrap(),
                endpoint: None,
                joined_at: 1,
                revoked_at: None,
            },
            mesh_cidr: "10.88.0.0/16".into(),
            revision: 1,
            peers: vec![],
            replayed: false,
        }
    }

    #[test]
    fn an_interrupted_join_resumes_with_the_same_key_and_a_finished_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = NodeState::open(&dir.path().join("node")).unwrap();
        assert!(state.pending().unwrap().is_none());
        let first = state.begin("n", "t1", "http://c", None, None, 10).unwrap();
        // A crash here: the next attempt reuses the key, even with a new token.
        let again = NodeState::open(&dir.path().join("node")).unwrap();
        let second = again.begin("n", "t2", "http://c", None, None, 20).unwrap();
        assert_eq!(second.public_key, first.public_key);
        assert_eq!(second.token, "t2");
        let enrollment = again
            .complete(&second, identity(&second.public_key), 30)
            .unwrap();
        assert!(again.pending().unwrap().is_none());
        assert_eq!(again.enrollment().unwrap(), Some(enrollment));
        assert_eq!(
            again.key().unwrap().unwrap().public_base64(),
            second.public_key
        );
        assert_eq!(
            again.last_known().unwrap().unwrap().node.public_key,
            second.public_key
        );
        // After an abandoned join a new one makes a new key.
        let third = again.begin("n", "t3", "http://c", None, None, 40).unwrap();
        again.abandon().unwrap();
        let fourth = again.begin("n", "t4", "http://c", None, None, 50).unwrap();
        assert_ne!(fourth.public_key, third.public_key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = |p: &str| {
                std::fs::metadata(dir.path().join("node").join(p))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777
            };
            assert_eq!(mode(PENDING), 0o600);
            assert_eq!(mode(KEY), 0o600);
        }
    }

    #[test]
    fn a_damaged_state_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let state = NodeState::open(dir.path()).unwrap();
        std::fs::write(dir.path().join(ENROLLMENT), "{").unwrap();
        let error = state.enrollment().unwrap_err();
        assert!(error.to_string().contains("enrollment.json"), "{error}");
    }

    #[test]
    fn claims_are_read_without_the_key() {
        let key = crate::token::TokenKey::from_seed([3; 32]);
        let claims = JoinClaims {
            aud: crate::token::AUDIENCE.into(),
            jti: "j".into(),
            iat: 1,
            nbf: 1,
            exp: 2,
            cluster: "c".into(),
            tenant: None,
            uses: 1,
            bootstrap: crate::token::Bootstrap {
                public_key: "k".into(),
                endpoint: "e:1".into(),
                control: "http://control:18012".into(),
            },
        };
        assert_eq!(peek_claims(&key.sign(&claims)), Some(claims));
        assert_eq!(peek_claims("garbage"), None);
    }
}
