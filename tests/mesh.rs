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
        .env_remove("KEEL_MESH_CONTROL_URL")
        .env_remove("KEEL_MESH_ENDPOINT")
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
    ] {
        let out = keel(dir.path(), args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            text(&out.stderr).contains(expected),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // Where nothing was issued, commands that read or revoke say there is no registry, and a
    // mistyped data directory is not made.
    let typo = dir.path().join("typo");
    for args in [
        &["nodes"][..],
        &["revoke-node", "edge-1"],
        &["token", "revoke", "abc"],
    ] {
        let out = keel(&typo, args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            text(&out.stderr).contains("no mesh registry at"),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(!typo.exists(), "{args:?}");
    }
    // A cluster keeps its range.
    assert!(keel(dir.path(), &["token", "create"]).status.success());
    let out = keel(dir.path(), &["nodes", "--cluster", "missing"]);
    assert!(
        text(&out.stderr).contains("no cluster missing"),
        "{}",
        text(&out.stderr)
    );
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

/// `keel mesh serve` on a free port, with the address it printed.
struct Served {
    child: std::process::Child,
    url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path, secret: &str) -> Served {
    serve_with(dir, secret, &[])
}

fn serve_with(dir: &Path, secret: &str, extra: &[&str]) -> Served {
    use std::io::BufRead as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["mesh", "serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env("KEEL_MESH_DIR", dir)
        .env("KEEL_JWT_SECRET", secret)
        .env_remove("KEEL_MESH_REGISTRY")
        .env_remove("KEEL_MESH_CONTROL_URL")
        .env_remove("KEEL_MESH_ENDPOINT")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufReader::new(stderr).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("keel mesh serve ended before listening")
            .unwrap();
        if let Some((_, url)) = line.split_once("listening on ") {
            break url.trim().to_owned();
        }
    };
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Served { child, url }
}

fn call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    bearer: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let mut request = ureq::http::Request::builder().method(method).uri(url);
    if let Some(token) = bearer {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = agent.run(request.body(body.to_owned()).unwrap()).unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

#[test]
fn the_control_plane_issues_tokens_to_administrators_and_joins_nodes_over_http() {
    use keel_api::auth::{Auth, Claims};
    let dir = tempfile::tempdir().unwrap();
    let secret = "mesh-test-secret-of-some-length";
    let served = serve(dir.path(), secret);
    let url = &served.url;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let auth = Auth::new(Some(secret.into()), vec![]).unwrap();
    let exp = 4_000_000_000;
    let admin = auth.issue(&Claims::admin("ops", exp)).unwrap();
    let member = auth
        .issue(&Claims::member("u", uuid::Uuid::new_v4(), exp))
        .unwrap();
    let tokens = format!("{url}/api/v1/mesh/tokens");

    // Only administrators issue tokens.
    let (status, body) = call(&agent, "POST", &tokens, None, "");
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "missing bearer token");
    let (status, body) = call(&agent, "POST", &tokens, Some(&member), "");
    assert_eq!(status, 403, "{body}");
    let (status, body) = call(&agent, "POST", &tokens, Some("forged"), "");
    assert_eq!(status, 401, "{body}");
    let (status, body) = call(&agent, "POST", &tokens, Some(&admin), r#"{"ttl":"soon"}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("ttl"), "{body}");
    let (status, body) = call(&agent, "POST", &tokens, Some(&admin), r#"{"uses":0}"#);
    assert_eq!(status, 400, "{body}");
    let (status, issued) = call(
        &agent,
        "POST",
        &tokens,
        Some(&admin),
        r#"{"ttl":"10m","uses":1}"#,
    );
    assert_eq!(status, 201, "{issued}");
    let token = issued["token"].as_str().unwrap();

    // A node joins with it; asking again gets the same identity; a second node is refused.
    let join = format!("{url}/api/v1/mesh/join");
    let request = |name: &str, key: u8| {
        serde_json::json!({
            "token": token,
            "name": name,
            "public_key": base64::engine::general_purpose::STANDARD.encode([key; 32]),
            "endpoint": "192.0.2.1:51820",
        })
        .to_string()
    };
    let (status, first) = call(&agent, "POST", &join, None, &request("edge-1", 1));
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["mesh_cidr"], "10.88.0.0/16");
    assert_eq!(first["replayed"], false);
    let (status, again) = call(&agent, "POST", &join, None, &request("edge-1", 1));
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["replayed"], true);
    assert_eq!(again["node"]["address"], first["node"]["address"]);
    let (status, body) = call(&agent, "POST", &join, None, &request("edge-2", 2));
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("used up"),
        "{body}"
    );
    let (status, body) = call(&agent, "POST", &join, None, "{not json");
    assert_eq!(status, 400, "{body}");
    let tampered = request("edge-3", 3).replace(&token[token.len() - 6..], "AAAAAA");
    let (status, body) = call(&agent, "POST", &join, None, &tampered);
    assert_eq!(status, 401, "{body}");

    // The node list, and revocation of an unused token.
    let (status, nodes) = call(
        &agent,
        "GET",
        &format!("{url}/api/v1/mesh/nodes"),
        Some(&admin),
        "",
    );
    assert_eq!(status, 200, "{nodes}");
    assert_eq!(nodes.as_array().unwrap().len(), 1);
    let (_, spare) = call(&agent, "POST", &tokens, Some(&admin), "");
    let id = spare["id"].as_str().unwrap();
    let (status, _) = call(
        &agent,
        "DELETE",
        &format!("{tokens}/{id}"),
        Some(&admin),
        "",
    );
    assert_eq!(status, 204);
    let spare_token = spare["token"].as_str().unwrap();
    let body = request("edge-4", 4).replace(token, spare_token);
    let (status, refused) = call(&agent, "POST", &join, None, &body);
    assert_eq!(status, 403, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("revoked"));
}

#[test]
fn a_join_that_dies_before_saving_its_answer_resumes_with_the_same_identity() {
    let control_dir = tempfile::tempdir().unwrap();
    let node_dir = tempfile::tempdir().unwrap();
    let served = serve(control_dir.path(), "mesh-test-secret-of-some-length");
    let out = keel(control_dir.path(), &["token", "create", "--ttl", "10m"]);
    let token = text(&out.stdout).trim().to_owned();
    let node = |args: &[&str], crash: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        command
            .args(["mesh"])
            .args(args)
            .args(["--node-dir", node_dir.path().to_str().unwrap()])
            .env_remove("KEEL_MESH_JOIN_TOKEN");
        if crash {
            command.env("KEEL_MESH_TEST_CRASH_AFTER_JOIN", "1");
        }
        command.output().unwrap()
    };
    let join = [
        "join",
        "--token",
        &token,
        "--name",
        "edge-1",
        "--control",
        &served.url,
        "--enroll-only",
    ];
    // Dies after the control plane registered it, before recording the answer.
    let out = node(&join, true);
    assert_eq!(out.status.code(), Some(86), "{}", text(&out.stderr));
    assert!(node_dir.path().join("pending-enrollment.json").exists());
    assert!(!node_dir.path().join("enrollment.json").exists());
    let listing = text(&keel(control_dir.path(), &["nodes"]).stdout);
    assert!(listing.contains("edge-1"), "{listing}");
    let out = node(&["status"], false);
    assert!(
        text(&out.stderr).contains("did not finish"),
        "{}",
        text(&out.stderr)
    );

    // Run again with nothing but the directory: same key, same identity, no use taken.
    let out = node(&["join", "--control", &served.url, "--enroll-only"], false);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resuming the join of edge-1"), "{stderr}");
    assert!(stderr.contains("already had this join"), "{stderr}");
    assert!(!node_dir.path().join("pending-enrollment.json").exists());
    let enrollment: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node_dir.path().join("enrollment.json")).unwrap())
            .unwrap();
    let address = enrollment["identity"]["node"]["address"].as_str().unwrap();
    assert!(listing.contains(address), "{listing} lacks {address}");
    let key = keel_mesh::keys::WireguardKey::load_or_create(&node_dir.path().join("wireguard.key"))
        .unwrap();
    assert_eq!(
        enrollment["identity"]["node"]["public_key"],
        key.public_base64()
    );
    let status = node(&["status"], false);
    assert!(
        text(&status.stdout).contains(&format!("edge-1 {address}")),
        "{}",
        text(&status.stdout)
    );
    // A joined node says so; a refused join says why and leaves nothing pending.
    let out = node(&join, false);
    assert!(text(&out.stderr).contains("already in the mesh"));
    let other = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["mesh", "join", "--token", &token, "--name", "edge-2"])
        .args(["--control", &served.url, "--enroll-only"])
        .args(["--node-dir", other.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("refused the join (409)"),
        "{}",
        text(&out.stderr)
    );
    assert!(!other.path().join("pending-enrollment.json").exists());
}

#[test]
fn a_joined_node_resolves_its_peers_by_name() {
    use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};
    use std::io::BufRead as _;
    let control_dir = tempfile::tempdir().unwrap();
    let served = serve(control_dir.path(), "mesh-test-secret-of-some-length");
    let out = keel(control_dir.path(), &["token", "create", "--uses", "2"]);
    let token = text(&out.stdout).trim().to_owned();
    let nodes: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for (n, dir) in nodes.iter().enumerate() {
        let out = Command::new(env!("CARGO_BIN_EXE_keel"))
            .args([
                "mesh",
                "join",
                "--token",
                &token,
                "--name",
                &format!("n{n}"),
            ])
            .args(["--control", &served.url, "--enroll-only"])
            .args(["--node-dir", dir.path().to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    // The second node joined last, so its peer list already holds the first.
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["mesh", "dns", "--listen", "127.0.0.1:0"])
        .args(["--node-dir", nodes[1].path().to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    let address: std::net::SocketAddr = line
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .parse()
        .unwrap();
    let ask = |name: &str| {
        let mut query = Message::new();
        query
            .set_id(7)
            .set_message_type(MessageType::Query)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        socket.send_to(&query.to_vec().unwrap(), address).unwrap();
        let mut buffer = [0u8; 1500];
        let len = socket.recv(&mut buffer).unwrap();
        Message::from_vec(&buffer[..len]).unwrap()
    };
    let enrollment = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("enrollment.json")).unwrap()).unwrap()
    };
    for (n, dir) in nodes.iter().enumerate() {
        let expected: std::net::Ipv4Addr = enrollment(dir.path())["identity"]["node"]["address"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let answer = ask(&format!("n{n}.internal."));
        let found: Vec<_> = answer
            .answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        assert_eq!(found, [expected], "n{n}");
    }
    assert_eq!(ask("n9.internal.").response_code(), ResponseCode::NXDomain);
    assert_eq!(ask("example.com.").response_code(), ResponseCode::ServFail);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn keel_run_serves_the_control_plane_with_its_own_admin_tokens() {
    use std::io::BufRead as _;
    let workdir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .current_dir(workdir.path())
        .args(["run", "--rate", "100", "--listen", "127.0.0.1:0"])
        .args(["--pg-listen", "off", "--foghorn-listen", "off"])
        .args(["--foghorn-grpc-listen", "off", "--summary-every", "5"])
        .args(["--mesh-listen", "127.0.0.1:0"])
        .env("KEEL_MESH_DIR", workdir.path().join("mesh"))
        .env("KEEL_MESH_CONTROL_URL", "https://mesh.example:18012")
        .env("KEEL_MESH_ENDPOINT", "192.0.2.1:51820")
        .env_remove("KEEL_JWT_SECRET")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut url, mut admin) = (None, None);
    while url.is_none() || admin.is_none() {
        let line = lines
            .next()
            .expect("keel run ended before printing its mesh address and tokens")
            .unwrap();
        if let Some(rest) = line.strip_prefix("keel: mesh control plane on ") {
            url = Some(rest.trim().to_owned());
        }
        if let Some(rest) = line.trim().strip_prefix("admin: ") {
            admin = Some(rest.trim().to_owned());
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let (url, admin) = (url.unwrap(), admin.unwrap());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let tokens = format!("{url}/api/v1/mesh/tokens");
    let (status, body) = call(&agent, "POST", &tokens, None, "");
    assert_eq!(status, 401, "{body}");
    let (status, issued) = call(&agent, "POST", &tokens, Some(&admin), r#"{"ttl":"5m"}"#);
    assert_eq!(status, 201, "{issued}");
    // The token names what the environment said, not the listening address.
    let claims = keel_mesh::agent::peek_claims(issued["token"].as_str().unwrap()).unwrap();
    assert_eq!(claims.bootstrap.control, "https://mesh.example:18012");
    assert_eq!(claims.bootstrap.endpoint, "192.0.2.1:51820");
    let key = keel_mesh::keys::WireguardKey::generate();
    let request = serde_json::json!({
        "token": issued["token"],
        "name": "edge-1",
        "public_key": key.public_base64(),
    })
    .to_string();
    let (status, identity) = call(
        &agent,
        "POST",
        &format!("{url}/api/v1/mesh/join"),
        None,
        &request,
    );
    assert_eq!(status, 200, "{identity}");
    assert!(workdir.path().join("mesh/registry.db").exists());
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_node_syncs_with_its_own_key_and_changes_are_pushed_to_it() {
    use keel_api::auth::{Auth, Claims};
    use keel_mesh::keys::WireguardKey;
    use keel_mesh::sync::{ANSWER_MAC_HEADER, SharedKey, SyncRequest};
    let dir = tempfile::tempdir().unwrap();
    let secret = "mesh-test-secret-of-some-length";
    let served = serve(dir.path(), secret);
    let url = served.url.clone();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let admin = Auth::new(Some(secret.into()), vec![])
        .unwrap()
        .issue(&Claims::admin("ops", 4_000_000_000))
        .unwrap();
    let (_, issued) = call(
        &agent,
        "POST",
        &format!("{url}/api/v1/mesh/tokens"),
        Some(&admin),
        r#"{"uses":3}"#,
    );
    let token = issued["token"].as_str().unwrap().to_owned();
    let control_key = keel_mesh::agent::peek_claims(&token)
        .unwrap()
        .bootstrap
        .public_key;
    let keys: Vec<WireguardKey> = (0..3).map(|_| WireguardKey::generate()).collect();
    let join = |name: &str, key: &WireguardKey| {
        let body = serde_json::json!({
            "token": token, "name": name, "public_key": key.public_base64(),
        })
        .to_string();
        call(
            &agent,
            "POST",
            &format!("{url}/api/v1/mesh/join"),
            None,
            &body,
        )
    };
    let (status, first) = join("edge-1", &keys[0]);
    assert_eq!(status, 200, "{first}");
    let sync_url = format!("{url}/api/v1/mesh/sync");
    let sync = |key: &WireguardKey, name: &str, after: Option<i64>| {
        let shared = SharedKey::between(key, &control_key).unwrap();
        let request = SyncRequest::new(&shared, "default", name, now(), after, after.map(|_| 20));
        call(
            &agent,
            "POST",
            &sync_url,
            None,
            &serde_json::to_string(&request).unwrap(),
        )
    };

    // Another key, an unknown node, a damaged body: refused with the reason.
    let (status, body) = sync(&keys[1], "edge-1", None);
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("registered key"));
    let (status, body) = sync(&keys[0], "edge-9", None);
    assert_eq!(status, 404, "{body}");
    let (status, body) = call(&agent, "POST", &sync_url, None, "{}");
    assert_eq!(status, 400, "{body}");
    let (status, now_known) = sync(&keys[0], "edge-1", None);
    assert_eq!(status, 200, "{now_known}");
    // The answer carries the MAC of its body under the key the node shares with the control
    // plane, and no other key checks it.
    let shared = SharedKey::between(&keys[0], &control_key).unwrap();
    let request = SyncRequest::new(&shared, "default", "edge-1", now(), None, None);
    let mut response = agent
        .post(&sync_url)
        .send(serde_json::to_string(&request).unwrap())
        .unwrap();
    let mac = response
        .headers()
        .get(ANSWER_MAC_HEADER)
        .expect("a MAC header")
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.body_mut().read_to_string().unwrap();
    assert!(shared.check_answer(body.as_bytes(), &mac));
    let other = SharedKey::between(&keys[1], &control_key).unwrap();
    assert!(!other.check_answer(body.as_bytes(), &mac));
    let revision = now_known["revision"].as_i64().unwrap();

    // A waiting sync is answered as soon as another node joins, not at the end of its wait.
    let waiting = {
        let sync = sync_url.clone();
        let control_key = control_key.clone();
        let key = WireguardKey::from_base64(&keys[0].private_base64()).unwrap();
        std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let shared = SharedKey::between(&key, &control_key).unwrap();
            let request = SyncRequest::new(
                &shared,
                "default",
                "edge-1",
                now(),
                Some(revision),
                Some(20),
            );
            let started = std::time::Instant::now();
            let (status, body) = call(
                &agent,
                "POST",
                &sync,
                None,
                &serde_json::to_string(&request).unwrap(),
            );
            (status, body, started.elapsed())
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (status, _) = join("edge-2", &keys[1]);
    assert_eq!(status, 200);
    let (status, pushed, took) = waiting.join().unwrap();
    assert_eq!(status, 200, "{pushed}");
    assert!(
        took < std::time::Duration::from_secs(5),
        "answered after {took:?}"
    );
    assert!(pushed["revision"].as_i64().unwrap() > revision);
    let names = |identity: &serde_json::Value| -> Vec<String> {
        identity["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&pushed), ["edge-2"]);

    // Revoked over the API: the node itself hears it has no peers, the others drop it.
    let (status, body) = call(
        &agent,
        "DELETE",
        &format!("{url}/api/v1/mesh/nodes/edge-2"),
        Some(&admin),
        "",
    );
    assert_eq!(status, 204, "{body}");
    let (status, revoked) = sync(&keys[1], "edge-2", None);
    assert_eq!(status, 200, "{revoked}");
    assert!(revoked["node"]["revoked_at"].is_i64(), "{revoked}");
    assert!(names(&revoked).is_empty(), "{revoked}");
    let (_, after) = sync(&keys[0], "edge-1", None);
    assert!(names(&after).is_empty(), "{after}");
    let (status, _) = call(
        &agent,
        "DELETE",
        &format!("{url}/api/v1/mesh/nodes/edge-2"),
        Some(&admin),
        "",
    );
    assert_eq!(status, 404);
}

/// Unix seconds.
fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .try_into()
        .unwrap()
}

#[test]
fn over_https_a_node_joins_only_when_it_trusts_the_control_planes_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let control = dir.path().join("control");
    let served = serve_with(
        &control,
        "mesh-test-secret-of-some-length",
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(
        served.url.starts_with("https://127.0.0.1:"),
        "{}",
        served.url
    );
    let out = keel(
        &control,
        &[
            "token",
            "create",
            "--uses",
            "2",
            "--control-url",
            &served.url,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_owned();
    let join = |node: &Path, ca: Option<&Path>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        command
            .args(["mesh", "join", "--token", &token, "--name", "edge-1"])
            .args(["--enroll-only", "--node-dir", node.to_str().unwrap()])
            .env_remove("KEEL_MESH_JOIN_TOKEN");
        if let Some(ca) = ca {
            command.arg("--control-ca").arg(ca);
        }
        command.output().unwrap()
    };
    // Without the certificate the node refuses the control plane, and keeps its join.
    let node = dir.path().join("node");
    let out = join(&node, None);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot reach the control plane"),
        "{stderr}"
    );
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    assert!(node.join("pending-enrollment.json").exists());
    // With it, the join goes through, and the certificate is kept for peer sync.
    let out = join(&node, Some(&cert));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let enrollment: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node.join("enrollment.json")).unwrap()).unwrap();
    assert_eq!(enrollment["control"], served.url.as_str());
    assert!(
        enrollment["control_ca"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    // Plain HTTP to the HTTPS port gets nowhere.
    let plain = served.url.replace("https://", "http://");
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["mesh", "join", "--token", &token, "--name", "edge-2"])
        .args(["--control", &plain, "--enroll-only", "--node-dir"])
        .arg(dir.path().join("other"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out.stderr));
}
