//! In-process mesh nodes exchanging real WireGuard datagrams (boringtun) over UDP on loopback,
//! with identities and peer lists from a real registry: delivery between allowed peers, a
//! packet with a forged source dropped, a cross-tenant attempt refused, and a revoked node cut
//! off.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_mesh::keys::WireguardKey;
use keel_mesh::registry::{Identity, JoinRequest, Registry, TokenRequest};
use keel_mesh::token::{Bootstrap, TokenKey};
use keel_mesh::tunnel::{
    AllowedIp, Channels, PeerSpec, Router, SharedRouter, TunnelStats, peer_specs, run, source,
    udp_packet,
};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

const NOW: i64 = 1_800_000_000;

struct Node {
    name: &'static str,
    address: Ipv4Addr,
    key: WireguardKey,
    endpoint: SocketAddr,
    router: SharedRouter,
    send: mpsc::Sender<Vec<u8>>,
    receive: mpsc::Receiver<Vec<u8>>,
}

impl Node {
    async fn send(&self, source: Ipv4Addr, to: Ipv4Addr, payload: &[u8]) {
        self.send
            .send(udp_packet(source, to, payload))
            .await
            .unwrap();
    }

    /// The next packet delivered to this node's interface, if one comes within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<Vec<u8>> {
        tokio::time::timeout(wait, self.receive.recv())
            .await
            .ok()
            .flatten()
    }

    fn stats(&self) -> TunnelStats {
        self.router.lock().unwrap().stats()
    }
}

fn payload(packet: &[u8]) -> &[u8] {
    &packet[28..]
}

/// Joins `name` through the registry and starts its tunnel on a loopback socket.
async fn start(
    registry: &Registry,
    signing: &TokenKey,
    cluster: &str,
    tenant: Option<&str>,
    name: &'static str,
) -> (Node, Identity) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let endpoint = socket.local_addr().unwrap();
    let key = WireguardKey::generate();
    let issued = registry
        .issue_token(
            signing,
            TokenRequest {
                cluster: cluster.into(),
                tenant: tenant.map(str::to_owned),
                ttl: Duration::from_secs(600),
                uses: 1,
                bootstrap: Bootstrap {
                    public_key: key.public_base64(),
                    endpoint: "127.0.0.1:1".into(),
                    control: "http://127.0.0.1:1".into(),
                },
            },
            NOW,
        )
        .await
        .unwrap();
    let identity = registry
        .join(
            &signing.verifier(),
            &JoinRequest {
                token: issued.token,
                name: name.into(),
                public_key: key.public_base64(),
                endpoint: Some(endpoint.to_string()),
            },
            NOW,
        )
        .await
        .unwrap();
    let router = Arc::new(Mutex::new(Router::new(&key, Vec::new())));
    let (send, from_device) = mpsc::channel(64);
    let (to_device, receive) = mpsc::channel(64);
    tokio::spawn(run(
        router.clone(),
        socket,
        Channels {
            from_node: from_device,
            to_node: to_device,
        },
    ));
    let node = Node {
        name,
        address: identity.node.address,
        key,
        endpoint,
        router,
        send,
        receive,
    };
    (node, identity)
}

/// Gives every node the peer list the registry has for it now.
async fn sync(registry: &Registry, cluster: &str, nodes: &[&Node]) {
    for node in nodes {
        let record = registry.node(cluster, node.name).await.unwrap().unwrap();
        let identity = registry.identity(record, false).await.unwrap();
        node.router
            .lock()
            .unwrap()
            .set_peers(peer_specs(&identity.peers));
    }
}

const WAIT: Duration = Duration::from_secs(3);
const QUIET: Duration = Duration::from_millis(700);

#[tokio::test]
async fn peers_talk_forged_sources_and_other_tenants_are_dropped_and_revocation_cuts_off() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(&format!("sqlite:{}", dir.path().join("m.db").display()))
        .await
        .unwrap();
    registry
        .ensure_cluster("lab", "10.88.0.0/16".parse().unwrap(), NOW)
        .await
        .unwrap();
    let signing = TokenKey::generate();
    let (mut core, _) = start(&registry, &signing, "lab", None, "core").await;
    let (mut red, _) = start(&registry, &signing, "lab", Some("red"), "red").await;
    let (blue, _) = start(&registry, &signing, "lab", Some("blue"), "blue").await;
    sync(&registry, "lab", &[&core, &red, &blue]).await;

    // Tenant segments in the routers: red and blue see core only; core sees both.
    assert_eq!(red.router.lock().unwrap().peer_names(), ["core"]);
    assert_eq!(blue.router.lock().unwrap().peer_names(), ["core"]);
    let mut core_peers = core.router.lock().unwrap().peer_names();
    core_peers.sort();
    assert_eq!(core_peers, ["blue", "red"]);

    // core → red: handshake, then the packet arrives decrypted, from core's address.
    core.send(core.address, red.address, b"hello red").await;
    let packet = red.next(WAIT).await.expect("red got core's packet");
    assert_eq!(payload(&packet), b"hello red");
    assert_eq!(source(&packet), Some(core.address));
    // And back.
    red.send(red.address, core.address, b"hello core").await;
    let packet = core.next(WAIT).await.expect("core got red's answer");
    assert_eq!(payload(&packet), b"hello core");
    let peers = core.router.lock().unwrap().peer_status();
    assert!(
        peers
            .iter()
            .any(|peer| peer.name == "red" && peer.handshake_secs_ago.is_some())
    );

    // core sends a packet claiming to come from blue's address: red drops it.
    let before = red.stats();
    core.send(blue.address, red.address, b"forged").await;
    core.send(core.address, red.address, b"genuine").await;
    let packet = red.next(WAIT).await.expect("the genuine packet");
    assert_eq!(
        payload(&packet),
        b"genuine",
        "the forged packet was delivered"
    );
    let after = red.stats();
    assert_eq!(after.bad_source, before.bad_source + 1);
    assert_eq!(after.delivered, before.delivered + 1);

    // blue has no route to red: the packet never leaves.
    let before = blue.stats();
    blue.send(blue.address, red.address, b"cross-tenant").await;
    assert!(red.next(QUIET).await.is_none());
    assert_eq!(blue.stats().no_route, before.no_route + 1);

    // blue forces the issue: it learned red's key and endpoint and adds red as a peer itself.
    // red does not know blue's key, so the handshake goes nowhere.
    blue.router.lock().unwrap().set_peers(vec![PeerSpec {
        name: "red".into(),
        public_key: public_key(&red.key),
        endpoint: Some(red.endpoint),
        allowed: vec![AllowedIp::parse(&format!("{}/32", red.address)).unwrap()],
        keepalive: None,
    }]);
    let before = red.stats();
    blue.send(blue.address, red.address, b"let me in").await;
    assert!(red.next(QUIET).await.is_none(), "red accepted blue");
    assert!(red.stats().unknown_peer > before.unknown_peer);
    assert_eq!(red.stats().delivered, before.delivered);

    // core is revoked; red syncs and loses it: core's packets no longer arrive.
    assert!(registry.revoke_node("lab", "core", NOW).await.unwrap());
    sync(&registry, "lab", &[&red]).await;
    assert!(red.router.lock().unwrap().peer_names().is_empty());
    let before = red.stats();
    core.send(core.address, red.address, b"still there?").await;
    assert!(
        red.next(QUIET).await.is_none(),
        "a revoked node got through"
    );
    let after = red.stats();
    assert!(after.unknown_peer + after.invalid > before.unknown_peer + before.invalid);
    // core's own list is emptied too when it syncs.
    sync(&registry, "lab", &[&core]).await;
    assert!(core.router.lock().unwrap().peer_names().is_empty());
    drop(blue);
}

fn public_key(key: &WireguardKey) -> [u8; 32] {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(key.public_base64())
        .unwrap()
        .try_into()
        .unwrap()
}
