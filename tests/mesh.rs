//! `keel mesh`, run as an operator would: tokens issued and revoked, nodes listed and revoked,
//! against a control plane data directory of the test's own.

use std::path::Path;
use std::process::{Command, Output};

use base64::Engine as _;
use keel_mesh::registry::{JoinError, JoinRequest, Registry};
use keel_mesh::token::TokenKey;

fn keel(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("mesh")
        .args(args)
        .env("KEEL_MESH_DIR", dir)
        .env_remove("KEEL_MESH_REGISTRY")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The token id from `token create`'s stderr line.
fn token_id(stderr: &str) -> String {
    stderr
        .split_whitespace()
        .skip_while(|w| *w != "token")
        .nth(1)
        .expect("a token id")
        .to_owned()
}

async fn join(dir: &Path, token: &str, name: &str, key: u8) -> Result<(), JoinError> {
    let registry = Registry::open(&format!("sqlite:{}", dir.join("registry.db").display()))
        .await
        .unwrap();
    let signing = TokenKey::load_or_create(&dir.join("signing.key")).unwrap();
    let request = JoinRequest {
        token: token.into(),
        name: name.into(),
        public_key: base64::engine::general_purpose::STANDARD.encode([key; 32]),
        endpoint: Some("192.0.2.10:51820".into()),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    registry
        .join(&signing.verifier(), &request, now)
        .await
        .map(|_| ())
}

#[tokio::test]
async fn tokens_are_issued_redeemed_listed_and_revoked_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = keel(
        dir.path(),
        &["token", "create", "--ttl", "1h", "--uses", "2"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    // Standard output is the token alone, so `$(keel mesh token create)` captures it.
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let token = stdout.trim();
    assert_eq!(token.split('.').count(), 3, "{token}");
    assert!(
        stderr.contains("cluster default (10.88.0.0/16)"),
        "{stderr}"
    );
    assert!(stderr.contains("2 uses"), "{stderr}");
    let id = token_id(&stderr);
    // The keys were made private in the data directory.
    for file in ["signing.key", "wireguard.key", "registry.db"] {
        assert!(dir.path().join(file).exists(), "{file} missing");
    }
    // The token names this control plane's WireGuard key as the bootstrap peer.
    let signing = TokenKey::load_or_create(&dir.path().join("signing.key")).unwrap();
    let claims = signing
        .verifier()
        .verify(token, claims_time(token))
        .unwrap();
    let wireguard =
        keel_mesh::keys::WireguardKey::load_or_create(&dir.path().join("wireguard.key")).unwrap();
    assert_eq!(claims.bootstrap.public_key, wireguard.public_base64());
    assert_eq!(claims.jti, id);

    join(dir.path(), token, "edge-1", 1).await.unwrap();
    let out = keel(dir.path(), &["nodes"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listing = text(&out.stdout);
    assert!(
        listing.contains("cluster default (10.88.0.0/16): 1 node"),
        "{listing}"
    );
    assert!(
        listing.contains("edge-1") && listing.contains("10.88."),
        "{listing}"
    );

    // Revoked, the token's second use is refused.
    let out = keel(dir.path(), &["token", "revoke", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(matches!(
        join(dir.path(), token, "edge-2", 2).await,
        Err(JoinError::Revoked(_))
    ));
    let out = keel(dir.path(), &["token", "revoke", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no unrevoked token"),
        "{}",
        text(&out.stderr)
    );

    let out = keel(dir.path(), &["revoke-node", "edge-1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&keel(dir.path(), &["nodes"]).stdout).contains("revoked"));
    let out = keel(dir.path(), &["revoke-node", "edge-1"]);
    assert!(
        text(&out.stderr).contains("has no active node edge-1"),
        "{}",
        text(&out.stderr)
    );
}

fn claims_time(token: &str) -> i64 {
    let body = token.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap(),
    )
    .unwrap();
    claims["iat"].as_i64().unwrap()
}

#[test]
fn bad_options_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    for (args, expected) in [
        (&["token", "create", "--ttl", "soon"][..], "not a duration"),
        (&["token", "create", "--uses", "0"][..], "--uses"),
        (&["token", "create", "--tenant", "acme"][..], "--tenant"),
        (&["token", "create", "--cidr", "10.88.0.0/30"][..], "prefix"),
        (
            &["token", "create", "--endpoint", "nowhere"][..],
            "host:port",
        ),
        (
            &["token", "create", "--cluster", "Bad Name"][..],
            "DNS label",
        ),
        (&["nodes", "--cluster", "missing"][..], "no cluster missing"),
    ] {
        let out = keel(dir.path(), args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            text(&out.stderr).contains(expected),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // A cluster keeps its range.
    assert!(keel(dir.path(), &["token", "create"]).status.success());
    let out = keel(dir.path(), &["token", "create", "--cidr", "10.77.0.0/16"]);
    assert!(
        text(&out.stderr).contains("already has mesh range 10.88.0.0/16"),
        "{}",
        text(&out.stderr)
    );
    // A corrupt key file is named.
    std::fs::write(dir.path().join("signing.key"), "garbage").unwrap();
    let out = keel(dir.path(), &["token", "create"]);
    assert!(
        text(&out.stderr).contains("not a mesh signing key"),
        "{}",
        text(&out.stderr)
    );
}
