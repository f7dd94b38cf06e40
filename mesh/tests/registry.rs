//! The join-token rules against real databases: every scenario runs on a SQLite file and on the
//! test PostgreSQL (`KEEL_TEST_POSTGRES`, started by `scripts/test`). Each test uses clusters of
//! its own, so tests share the PostgreSQL database without seeing each other.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use base64::Engine as _;
use keel_mesh::address::MeshCidr;
use keel_mesh::registry::{Issued, JoinError, JoinRequest, Registry, RegistryError, TokenRequest};
use keel_mesh::token::{AUDIENCE, Bootstrap, TokenError, TokenKey};

const NOW: i64 = 1_800_000_000;

/// The TTL of the sweeping test's tokens, shorter than every other test's.
const SWEPT_TTL: u64 = 600;

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// The registries every scenario runs on: a fresh SQLite file and the test PostgreSQL.
async fn registries(dir: &tempfile::TempDir) -> Vec<(&'static str, Registry)> {
    let sqlite = Registry::open(&format!("sqlite:{}", dir.path().join("mesh.db").display()))
        .await
        .expect("SQLite registry");
    let url = std::env::var("KEEL_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:15432/postgres".into());
    let postgres = Registry::open(&url).await.unwrap_or_else(|e| {
        panic!(
            "cannot use PostgreSQL at {url} ({e}): run the tests with `scripts/test` (which starts one), \
             or start it with `eval \"$(scripts/test-servers.sh start postgres)\"`"
        )
    });
    vec![("sqlite", sqlite), ("postgres", postgres)]
}

fn wg_key(n: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([n; 32])
}

fn bootstrap() -> Bootstrap {
    Bootstrap {
        public_key: wg_key(1),
        endpoint: "198.51.100.7:51820".into(),
        control: "http://198.51.100.7:18012".into(),
    }
}

async fn cluster(registry: &Registry, cidr: &str) -> String {
    let name = unique("c");
    registry
        .ensure_cluster(&name, cidr.parse().unwrap(), NOW)
        .await
        .unwrap();
    name
}

async fn issue(
    registry: &Registry,
    key: &TokenKey,
    cluster: &str,
    tenant: Option<&str>,
    uses: u32,
) -> Issued {
    issue_for(registry, key, cluster, tenant, uses, 3600).await
}

/// A token valid `ttl` seconds from `NOW`. Sweeping deletes expired tokens of every cluster, so
/// the sweeping test gives its tokens a TTL no other test uses.
async fn issue_for(
    registry: &Registry,
    key: &TokenKey,
    cluster: &str,
    tenant: Option<&str>,
    uses: u32,
    ttl: u64,
) -> Issued {
    registry
        .issue_token(
            key,
            TokenRequest {
                cluster: cluster.into(),
                tenant: tenant.map(str::to_owned),
                ttl: Duration::from_secs(ttl),
                uses,
                bootstrap: bootstrap(),
            },
            NOW,
        )
        .await
        .unwrap()
}

fn join_request(token: &str, name: &str, key: u8) -> JoinRequest {
    JoinRequest {
        token: token.into(),
        name: name.into(),
        public_key: wg_key(key),
        endpoint: Some(format!("192.0.2.{key}:51820")),
    }
}

#[tokio::test]
async fn a_token_joins_one_node_once_and_a_replay_gets_the_same_identity() {
    let dir = tempfile::tempdir().unwrap();
    let key = TokenKey::generate();
    for (db, registry) in registries(&dir).await {
        let cluster = cluster(&registry, "10.88.0.0/16").await;
        let issued = issue(&registry, &key, &cluster, None, 1).await;
        assert_eq!(issued.claims.aud, AUDIENCE);
        assert_eq!(issued.claims.exp, NOW + 3600);
        let first = registry
            .join(
                &key.verifier(),
                &join_request(&issued.token, "edge-1", 2),
                NOW + 5,
            )
            .await
            .unwrap();
        assert!(!first.replayed, "{db}");
        assert_eq!(first.mesh_cidr, "10.88.0.0/16");
        let cidr: MeshCidr = first.mesh_cidr.parse().unwrap();
        assert!(cidr.contains(first.node.address), "{db}");
        assert_eq!(
            first.node.address,
            keel_mesh::address::allocate(&cluster, "edge-1", cidr, &HashSet::new()).unwrap()
        );
        // The answer was lost; the node asks again with the same token, name and key.
        let again = registry
            .join(
                &key.verifier(),
                &join_request(&issued.token, "edge-1", 2),
                NOW + 9,
            )
            .await
            .unwrap();
        assert!(again.replayed, "{db}");
        assert_eq!(again.node, first.node, "{db}");
        // Anyone else with the same token is turned away: it is used up.
        let other = registry
            .join(
                &key.verifier(),
                &join_request(&issued.token, "edge-2", 3),
                NOW + 10,
            )
            .await;
        assert!(
            matches!(other, Err(JoinError::UsedUp(ref id)) if *id == issued.claims.jti),
            "{db}: {other:?}"
        );
        // So is the same name with another key (someone who copied the token).
        let stolen = registry
            .join(
                &key.verifier(),
                &join_request(&issued.token, "edge-1", 9),
                NOW + 10,
            )
            .await;
        assert!(
            matches!(stolen, Err(JoinError::UsedUp(_))),
            "{db}: {stolen:?}"
        );
    }
}

#[tokio::test]
async fn expired_tampered_foreign_and_revoked_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = TokenKey::generate();
    for (db, registry) in registries(&dir).await {
        let cluster = cluster(&registry, "10.88.0.0/16").await;
        let issued = issue(&registry, &key, &cluster, None, 1).await;
        // Expired: the signature's window says so first.
        let late = registry
            .join(
                &key.verifier(),
                &join_request(&issued.token, "n1", 2),
                NOW + 3600 + 60,
            )
            .await;
        assert!(
            matches!(late, Err(JoinError::Token(TokenError::Expired { .. }))),
            "{db}: {late:?}"
        );
        // Tampered: one character of the claims changed.
        let mut parts: Vec<String> = issued.token.split('.').map(str::to_owned).collect();
        let flipped = if parts[1].ends_with('A') { 'B' } else { 'A' };
        parts[1].pop();
        parts[1].push(flipped);
        let tampered = parts.join(".");
        let result = registry
            .join(&key.verifier(), &join_request(&tampered, "n1", 2), NOW)
            .await;
        assert!(
            matches!(
                result,
                Err(JoinError::Token(
                    TokenError::Signature | TokenError::Malformed(_)
                ))
            ),
            "{db}: {result:?}"
        );
        // Wrong audience: a verifier for another service refuses it.
        let result = registry
            .join(
                &key.verifier().with_audience("keel-api"),
                &join_request(&issued.token, "n1", 2),
                NOW,
            )
            .await;
        assert!(
            matches!(result, Err(JoinError::Token(TokenError::Audience { .. }))),
            "{db}: {result:?}"
        );
        // Signed by another control plane's key.
        let stranger = TokenKey::generate();
        let foreign = issue(&registry, &stranger, &cluster, None, 1).await;
        let result = registry
            .join(&key.verifier(), &join_request(&foreign.token, "n1", 2), NOW)
            .await;
        assert!(
            matches!(result, Err(JoinError::Token(TokenError::UnknownKey(_)))),
            "{db}: {result:?}"
        );
        // Revoked before use.
        assert!(
            registry
                .revoke_token(&issued.claims.jti, NOW + 1)
                .await
                .unwrap()
        );
        assert!(
            !registry
                .revoke_token(&issued.claims.jti, NOW + 2)
                .await
                .unwrap()
        );
        let result = registry
            .join(
                &key.verifier(),
                &join_request(&issued.token, "n1", 2),
                NOW + 3,
            )
            .await;
        assert!(
            matches!(result, Err(JoinError::Revoked(_))),
            "{db}: {result:?}"
        );
        assert!(registry.nodes(&cluster).await.unwrap().is_empty(), "{db}");
        // Genuine but never recorded here (another registry issued it): unknown.
        let dir2 = tempfile::tempdir().unwrap();
        let elsewhere = Registry::open(&format!("sqlite:{}", dir2.path().join("o.db").display()))
            .await
            .unwrap();
        elsewhere
            .ensure_cluster(&cluster, "10.88.0.0/16".parse().unwrap(), NOW)
            .await
            .unwrap();
        let unrecorded = issue(&elsewhere, &key, &cluster, None, 1).await;
        let result = registry
            .join(
                &key.verifier(),
                &join_request(&unrecorded.token, "n1", 2),
                NOW,
            )
            .await;
        assert!(
            matches!(result, Err(JoinError::Unknown(_))),
            "{db}: {result:?}"
        );
    }
}

#[tokio::test]
async fn a_reusable_token_stops_at_its_limit_and_sweeping_removes_expired_ones() {
    let dir = tempfile::tempdir().unwrap();
    let key = TokenKey::generate();
    for (db, registry) in registries(&dir).await {
        let cluster = cluster(&registry, "10.88.0.0/16").await;
        let issued = issue_for(&registry, &key, &cluster, None, 3, SWEPT_TTL).await;
        let mut addresses = HashSet::new();
        for n in 0..3u8 {
            let identity = registry
                .join(
                    &key.verifier(),
                    &join_request(&issued.token, &format!("n{n}"), 10 + n),
                    NOW,
                )
                .await
                .unwrap();
            assert!(addresses.insert(identity.node.address), "{db}");
            assert_eq!(identity.peers.len(), usize::from(n), "{db}");
        }
        let fourth = registry
            .join(&key.verifier(), &join_request(&issued.token, "n3", 13), NOW)
            .await;
        assert!(
            matches!(fourth, Err(JoinError::UsedUp(_))),
            "{db}: {fourth:?}"
        );
        // Bad requests are refused before any use is taken.
        let spare = issue_for(&registry, &key, &cluster, None, 1, SWEPT_TTL).await;
        for (name, public_key, why) in [
            ("Bad_Name", wg_key(20), "DNS label"),
            ("ok", "short".to_owned(), "WireGuard public key"),
        ] {
            let request = JoinRequest {
                token: spare.token.clone(),
                name: name.into(),
                public_key,
                endpoint: None,
            };
            let result = registry.join(&key.verifier(), &request, NOW).await;
            assert!(
                matches!(&result, Err(JoinError::Request(m)) if m.contains(why)),
                "{db}: {result:?}"
            );
        }
        registry
            .join(&key.verifier(), &join_request(&spare.token, "n4", 21), NOW)
            .await
            .expect("the refused requests used nothing up");
        // Sweeping: two minutes past expiry with a minute's grace removes all three; a join with one
        // is then refused as unknown even at a time its signature still allows.
        let unused = issue_for(&registry, &key, &cluster, None, 1, SWEPT_TTL).await;
        let swept = registry
            .sweep_tokens(NOW + SWEPT_TTL as i64 + 120, Duration::from_secs(60))
            .await
            .unwrap();
        assert!(swept >= 3, "{db}: swept {swept}");
        let result = registry
            .join(&key.verifier(), &join_request(&unused.token, "n5", 22), NOW)
            .await;
        assert!(
            matches!(result, Err(JoinError::Unknown(_))),
            "{db}: {result:?}"
        );
        assert!(
            registry
                .issue_token(
                    &key,
                    TokenRequest {
                        cluster: cluster.clone(),
                        tenant: None,
                        ttl: Duration::from_secs(60),
                        uses: 0,
                        bootstrap: bootstrap(),
                    },
                    NOW,
                )
                .await
                .is_err(),
            "{db}: a token with no uses"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_racing_for_one_token_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let key = TokenKey::generate();
    for (db, registry) in registries(&dir).await {
        let cluster = cluster(&registry, "10.88.0.0/16").await;
        for round in 0..10 {
            let issued = issue(&registry, &key, &cluster, None, 1).await;
            let racers: Vec<_> = (0..2u8)
                .map(|n| {
                    let registry = registry.clone();
                    let verifier = key.verifier();
                    let request = join_request(&issued.token, &format!("r{round}-{n}"), 30 + n);
                    tokio::spawn(async move { registry.join(&verifier, &request, NOW).await })
                })
                .collect();
            let mut won = 0;
            let mut lost = 0;
            for racer in racers {
                match racer.await.unwrap() {
                    Ok(_) => won += 1,
                    Err(JoinError::UsedUp(_)) => lost += 1,
                    Err(other) => panic!("{db}: unexpected {other}"),
                }
            }
            assert_eq!((won, lost), (1, 1), "{db} round {round}");
        }
        assert_eq!(registry.nodes(&cluster).await.unwrap().len(), 10, "{db}");
    }
}

#[tokio::test]
async fn tenants_see_their_own_segment_and_the_shared_one_only() {
    let dir = tempfile::tempdir().unwrap();
    let key = TokenKey::generate();
    for (db, registry) in registries(&dir).await {
        let cluster = cluster(&registry, "10.88.0.0/24").await;
        let shared = issue(&registry, &key, &cluster, None, 2).await;
        let red = issue(&registry, &key, &cluster, Some("red"), 2).await;
        let blue = issue(&registry, &key, &cluster, Some("blue"), 1).await;
        let verifier = key.verifier();
        for (token, name, n) in [
            (&shared.token, "core-1", 1),
            (&shared.token, "core-2", 2),
            (&red.token, "red-1", 3),
            (&red.token, "red-2", 4),
            (&blue.token, "blue-1", 5),
        ] {
            registry
                .join(&verifier, &join_request(token, name, n), NOW)
                .await
                .unwrap();
        }
        let peers_of = |name: &'static str| {
            let registry = registry.clone();
            let cluster = cluster.clone();
            async move {
                let node = registry.node(&cluster, name).await.unwrap().unwrap();
                let identity = registry.identity(node, false).await.unwrap();
                let mut names: Vec<String> = identity.peers.into_iter().map(|p| p.name).collect();
                names.sort();
                names
            }
        };
        assert_eq!(
            peers_of("red-1").await,
            ["core-1", "core-2", "red-2"],
            "{db}"
        );
        assert_eq!(peers_of("blue-1").await, ["core-1", "core-2"], "{db}");
        assert_eq!(
            peers_of("core-1").await,
            ["blue-1", "core-2", "red-1", "red-2"],
            "{db}"
        );
        // Each peer is allowed its own address only.
        let node = registry.node(&cluster, "red-1").await.unwrap().unwrap();
        let identity = registry.identity(node, false).await.unwrap();
        for peer in &identity.peers {
            let address = registry
                .node(&cluster, &peer.name)
                .await
                .unwrap()
                .unwrap()
                .address;
            assert_eq!(peer.allowed_ips, [format!("{address}/32")], "{db}");
        }
        // Revoking a node takes it out of every list and bumps the revision; its own list empties.
        let before = identity.revision;
        assert!(registry.revoke_node(&cluster, "red-2", NOW).await.unwrap());
        assert_eq!(peers_of("red-1").await, ["core-1", "core-2"], "{db}");
        let revoked = registry.node(&cluster, "red-2").await.unwrap().unwrap();
        let identity = registry.identity(revoked, false).await.unwrap();
        assert!(identity.peers.is_empty(), "{db}");
        assert_eq!(identity.revision, before + 1, "{db}");
    }
}

#[tokio::test]
async fn clusters_keep_their_range_and_a_full_range_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let key = TokenKey::generate();
    for (db, registry) in registries(&dir).await {
        let cluster = cluster(&registry, "10.99.0.0/28").await;
        let other_range = registry
            .ensure_cluster(&cluster, "10.98.0.0/16".parse().unwrap(), NOW)
            .await;
        assert!(
            matches!(other_range, Err(RegistryError::Cluster(ref m)) if m.contains("already has")),
            "{db}: {other_range:?}"
        );
        let issued = issue(&registry, &key, &cluster, None, 14).await;
        let mut taken = HashSet::new();
        for n in 0..13u8 {
            let identity = registry
                .join(
                    &key.verifier(),
                    &join_request(&issued.token, &format!("h{n}"), 40 + n),
                    NOW,
                )
                .await
                .unwrap();
            let address = identity.node.address;
            assert!(
                address != Ipv4Addr::new(10, 99, 0, 1),
                "{db}: gateway handed out"
            );
            assert!(taken.insert(address), "{db}: {address} twice");
        }
        let full = registry
            .join(
                &key.verifier(),
                &join_request(&issued.token, "h13", 99),
                NOW,
            )
            .await;
        assert!(matches!(full, Err(JoinError::Full(_))), "{db}: {full:?}");
        let missing = registry
            .issue_token(
                &key,
                TokenRequest {
                    cluster: "no-such-cluster".into(),
                    tenant: None,
                    ttl: Duration::from_secs(60),
                    uses: 1,
                    bootstrap: bootstrap(),
                },
                NOW,
            )
            .await;
        assert!(matches!(missing, Err(RegistryError::Cluster(_))), "{db}");
    }
}

#[tokio::test]
async fn an_active_nodes_name_is_not_taken_by_another_key_until_it_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let key = TokenKey::generate();
    for (db, registry) in registries(&dir).await {
        let cluster = cluster(&registry, "10.88.0.0/16").await;
        let issued = issue(&registry, &key, &cluster, None, 3).await;
        let first = registry
            .join(
                &key.verifier(),
                &join_request(&issued.token, "edge-1", 1),
                NOW,
            )
            .await
            .unwrap();
        // Another key asking for the same name is refused, and uses nothing up.
        let taken = registry
            .join(
                &key.verifier(),
                &join_request(&issued.token, "edge-1", 2),
                NOW,
            )
            .await;
        assert!(
            matches!(taken, Err(JoinError::NameTaken(ref name)) if name == "edge-1"),
            "{db}: {taken:?}"
        );
        let node = registry.node(&cluster, "edge-1").await.unwrap().unwrap();
        assert_eq!(node.public_key, first.node.public_key, "{db}");
        // Revoked, the name goes to the new key, at the same address.
        assert!(registry.revoke_node(&cluster, "edge-1", NOW).await.unwrap());
        let again = registry
            .join(
                &key.verifier(),
                &join_request(&issued.token, "edge-1", 2),
                NOW,
            )
            .await
            .unwrap();
        assert_eq!(again.node.address, first.node.address, "{db}");
        assert_eq!(again.node.public_key, wg_key(2), "{db}");
        // Two uses taken: the refused attempt took none, so a third node still joins.
        registry
            .join(
                &key.verifier(),
                &join_request(&issued.token, "edge-3", 3),
                NOW,
            )
            .await
            .unwrap();
    }
}
