//! The live read side over real sockets: a running engine fed in memory, the API on a loopback
//! port, and WebSocket and HTTP clients as a dashboard or script would use them.

mod live_support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use keel_api::server::Limits;
use keel_sinks::hub::RowFilter;
use live_support::*;
use serde_json::{Value, json};
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The platform's channel for an event type, written out independently of the engine's mapping.
fn expected_channel(event_type: &str) -> &'static str {
    match event_type {
        "node_lifecycle_update" | "load_balancing" => "system",
        "push_rewrite"
        | "play_rewrite"
        | "stream_source"
        | "stream_lifecycle_update"
        | "stream_buffer"
        | "stream_end"
        | "stream_track_list" => "streams",
        _ => "analytics",
    }
}

fn assert_no_hosts(text: &str, hosts: &HashSet<String>) {
    for host in hosts {
        assert!(
            !text.contains(&format!("\"{host}\"")),
            "client address {host} left the engine in {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signalman_feed_is_the_token_tenants_own_and_never_carries_client_addresses() {
    let fleet = fleet(11, 3000);
    let (a, b) = (fleet.tenants[0].clone(), fleet.tenants[1].clone());
    let mut live = Live::start(roomy(), &b);
    let host = live.host();

    // Tenant A authenticates on the upgrade request.
    let mut ws_a = connect(
        &host,
        "/ws",
        &[("authorization", format!("Bearer {}", live.member(&a)))],
    )
    .await;
    send(
        &mut ws_a,
        json!({"action": "subscribe", "channels": ["streams", "analytics", "system"]}),
    )
    .await;
    let confirmed = next_json(&mut ws_a).await;
    assert_eq!(confirmed["type"], "subscription_confirmed");
    assert_eq!(
        confirmed["channels"],
        json!(["streams", "analytics", "system"])
    );

    // Tenant B (a static token) authenticates with a first message, as a browser must, and
    // subscribes to one channel only.
    let mut ws_b = connect(&host, "/ws", &[]).await;
    send(
        &mut ws_b,
        json!({"action": "subscribe", "channels": ["streams"]}),
    )
    .await;
    assert_eq!(next_json(&mut ws_b).await["code"], "unauthorized");
    send(&mut ws_b, json!({"action": "auth", "token": STATIC_TOKEN})).await;
    let authenticated = next_json(&mut ws_b).await;
    assert_eq!(authenticated["type"], "authenticated");
    assert_eq!(authenticated["tenant_id"], b.as_str());
    send(
        &mut ws_b,
        json!({"action": "subscribe", "channels": ["streams"], "tenant_id": b}),
    )
    .await;
    assert_eq!(next_json(&mut ws_b).await["channels"], json!(["streams"]));
    // Naming another tenant is refused, and the connection carries on.
    send(
        &mut ws_b,
        json!({"action": "subscribe", "channels": ["analytics"], "tenant_id": a}),
    )
    .await;
    assert_eq!(next_json(&mut ws_b).await["code"], "forbidden");
    // Its own tenant in capitals is its own tenant (GraphQL agrees).
    send(
        &mut ws_b,
        json!({"action": "subscribe", "channels": ["system"], "tenant_id": b.to_uppercase()}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws_b).await["channels"],
        json!(["streams", "system"])
    );

    // An admin sees every tenant.
    let mut ws_admin = connect(&host, "/ws", &[]).await;
    send(
        &mut ws_admin,
        json!({"action": "auth", "token": live.admin()}),
    )
    .await;
    assert_eq!(next_json(&mut ws_admin).await["type"], "authenticated");
    send(
        &mut ws_admin,
        json!({"action": "subscribe", "channels": ["all"]}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws_admin).await["type"],
        "subscription_confirmed"
    );

    // Readers keep up while the engine runs (this test is about scope, not backpressure).
    let quiet = Duration::from_secs(3);
    let readers = [ws_a, ws_b, ws_admin]
        .map(|mut ws| tokio::spawn(async move { drain_feed(&mut ws, quiet).await }));
    live.feed(&fleet.records).await;
    live.finish().await;
    let [got_a, got_b, got_admin] = readers;
    let (got_a, got_b, got_admin) = (
        got_a.await.unwrap(),
        got_b.await.unwrap(),
        got_admin.await.unwrap(),
    );
    assert_eq!(
        got_a.len(),
        accepted_for(&fleet.records, &a),
        "tenant A gets each of its events once"
    );
    let mut connects = 0;
    for (text, message) in &got_a {
        assert_eq!(message["tenant_id"], a.as_str(), "{text}");
        let kind = message["type"].as_str().unwrap();
        assert_eq!(message["channel"], expected_channel(kind), "{text}");
        assert!(message["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_no_hosts(text, &fleet.hosts);
        connects += usize::from(kind == "viewer_connect");
    }
    assert!(connects > 10, "viewers connect in the feed");

    assert!(!got_b.is_empty());
    for (text, message) in &got_b {
        assert_eq!(message["tenant_id"], b.as_str(), "{text}");
        assert_eq!(message["channel"], "streams", "{text}");
    }

    let every: usize = fleet
        .tenants
        .iter()
        .map(|t| accepted_for(&fleet.records, t))
        .sum();
    assert_eq!(got_admin.len(), every);
    let tenants: HashSet<&str> = got_admin
        .iter()
        .filter_map(|(_, m)| m["tenant_id"].as_str())
        .collect();
    assert_eq!(tenants.len(), 3);
    for (text, _) in &got_admin {
        assert_no_hosts(text, &fleet.hosts);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signalman_input_gets_errors_and_the_connection_lives_on() {
    let fleet = fleet(12, 10);
    let live = Live::start(Limits::default(), &fleet.tenants[1]);
    let host = live.host();

    // A bad token on the upgrade request is a 401 with a JSON error, before any upgrade.
    let mut request = format!("ws://{host}/ws").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer not-a-token".parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "unauthorized");
        }
        other => panic!("expected a 401, got {other:?}"),
    }

    let mut ws = connect(&host, "/ws", &[]).await;
    send(
        &mut ws,
        json!({"action": "auth", "token": "expired-or-forged"}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["code"], "unauthorized");
    send(
        &mut ws,
        json!({"action": "auth", "token": live.member(&fleet.tenants[0])}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "authenticated");
    let bad: Vec<(Message, &str)> = vec![
        (Message::text("not json"), "bad_request"),
        (Message::text("{\"action\": 7}"), "bad_request"),
        (Message::text("{\"action\": \"dance\"}"), "bad_request"),
        (
            Message::text("{\"action\": \"subscribe\", \"channels\": [\"secrets\"]}"),
            "bad_request",
        ),
        (Message::binary(vec![0u8, 159, 146, 150]), "bad_request"),
        (Message::text("x".repeat(10_000)), "too_large"),
        (
            Message::text(json!({"action": "auth", "token": "again"}).to_string()),
            "bad_request",
        ),
    ];
    for (message, code) in bad {
        ws.send(message).await.unwrap();
        let reply = next_json(&mut ws).await;
        assert_eq!(reply["type"], "error");
        assert_eq!(reply["code"], code, "{reply}");
        assert!(!reply["message"].as_str().unwrap().is_empty());
    }
    send(&mut ws, json!({"action": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    send(
        &mut ws,
        json!({"action": "subscribe", "channels": ["system"]}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["channels"], json!(["system"]));
    send(
        &mut ws,
        json!({"action": "unsubscribe", "channels": ["system"]}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["channels"], json!([]));

    // A frame beyond the transport limit closes that connection only, with 1009.
    let _ = ws.send(Message::text("y".repeat(200_000))).await;
    assert_eq!(
        close_code(&mut ws, Duration::from_secs(5)).await,
        Some(1009)
    );
    let mut other = connect(&host, "/ws", &[]).await;
    send(&mut other, json!({"action": "ping"})).await;
    assert_eq!(next_json(&mut other).await["code"], "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_holds_at_most_its_connection_cap() {
    let fleet = fleet(13, 10);
    let limits = Limits {
        connections_per_tenant: 2,
        ..Limits::default()
    };
    let live = Live::start(limits, &fleet.tenants[1]);
    let host = live.host();
    let bearer = [(
        "authorization",
        format!("Bearer {}", live.member(&fleet.tenants[0])),
    )];
    let first = connect(&host, "/ws", &bearer).await;
    let _second = connect(
        &host,
        "/graphql",
        &[("sec-websocket-protocol", "graphql-transport-ws".into())],
    )
    .await;
    let mut second = connect(&host, "/ws", &bearer).await;
    send(&mut second, json!({"action": "ping"})).await;
    assert_eq!(next_json(&mut second).await["type"], "pong");
    let mut request = format!("ws://{host}/ws").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", bearer[0].1.parse().unwrap());
    match tokio_tungstenite::connect_async(request.clone()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429);
        }
        other => panic!("expected a 429, got {other:?}"),
    }
    // Another tenant is not affected.
    let mut b = connect(
        &host,
        "/ws",
        &[("authorization", format!("Bearer {STATIC_TOKEN}"))],
    )
    .await;
    send(&mut b, json!({"action": "ping"})).await;
    assert_eq!(next_json(&mut b).await["type"], "pong");
    // A closed connection gives its slot back.
    drop(first);
    let mut admitted = false;
    for _ in 0..50 {
        if tokio_tungstenite::connect_async(request.clone())
            .await
            .is_ok()
        {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admitted, "the slot came back");
}

/// A live connection ends when its token expires: `/ws` with 1008, GraphQL's with 4403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_connections_end_when_their_token_expires() {
    let fleet = fleet(14, 10);
    let live = Live::start(Limits::default(), &fleet.tenants[1]);
    let host = live.host();
    let exp = keel_operators::time::now_ms() / 1000 + 3;
    let token = live.member_until(&fleet.tenants[0], exp);
    let closing = |mut ws: Ws| async move { close_code(&mut ws, Duration::from_secs(10)).await };
    let ws = connect(
        &host,
        "/ws",
        &[("authorization", format!("Bearer {token}"))],
    )
    .await;
    let (graphql, ack) = graphql_ws(&host, json!({ "token": token })).await;
    assert_eq!(ack["type"], "connection_ack", "{ack}");
    let (signalman, graphql) = tokio::join!(closing(ws), closing(graphql));
    assert_eq!(signalman, Some(1008));
    assert_eq!(graphql, Some(4403));
    assert!(
        keel_operators::time::now_ms() / 1000 >= exp,
        "closed at expiry, not before"
    );
    // A token that does not expire soon keeps its connection.
    let mut lasting = connect(
        &host,
        "/ws",
        &[(
            "authorization",
            format!("Bearer {}", live.member(&fleet.tenants[0])),
        )],
    )
    .await;
    send(&mut lasting, json!({"action": "ping"})).await;
    assert_eq!(next_json(&mut lasting).await["type"], "pong");
}

/// The code of the close frame that ends `ws` within `wait` (`None` when it ends without one).
async fn close_code(ws: &mut Ws, wait: Duration) -> Option<u16> {
    close_frame(ws, wait).await.map(|(code, _)| code)
}

/// The code and reason of the close frame that ends `ws` within `wait`.
async fn close_frame(ws: &mut Ws, wait: Duration) -> Option<(u16, String)> {
    tokio::time::timeout(wait, async {
        loop {
            match futures_util::StreamExt::next(ws).await {
                Some(Ok(Message::Close(frame))) => {
                    break frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                }
                Some(Ok(_)) => continue,
                _ => break None,
            }
        }
    })
    .await
    .expect("the connection closed in time")
}

/// A graphql-transport-ws message the protocol does not define closes the connection with
/// 4400 and a reason, as the protocol asks (unknown types dropped the connection without a
/// close frame, malformed ones closed with 1002); defined ones go on being answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphql_ws_closes_with_4400_at_a_message_the_protocol_does_not_define() {
    let fleet = fleet(6, 200);
    let a = fleet.tenants[0].clone();
    let mut live = Live::start(roomy(), &fleet.tenants[1]);
    let host = live.host();
    let token = live.member(&a);
    let long = "é".repeat(300);
    for (message, reason) in [
        (
            Message::text(r#"{"type": "bogus"}"#),
            "unknown message type \"bogus\"",
        ),
        (Message::text("not json"), "not a message"),
        (Message::text(r#"{"id": "1"}"#), "not a message"),
        (
            Message::text(r#"{"type": "subscribe", "id": 1, "payload": {}}"#),
            "\"id\" must be a string",
        ),
        (
            Message::text(r#"{"type": "subscribe", "id": "1"}"#),
            "payload",
        ),
        (Message::binary(&b"\xff\xfe"[..]), "not a message"),
        (
            Message::text(json!({"type": long}).to_string()),
            "unknown message type \"éé",
        ),
    ] {
        let (mut ws, ack) = graphql_ws(&host, json!({"token": token})).await;
        assert_eq!(ack["type"], "connection_ack");
        send(&mut ws, json!({"type": "ping"})).await;
        assert_eq!(next_json(&mut ws).await["type"], "pong");
        let shown = message.to_string().chars().take(40).collect::<String>();
        ws.send(message).await.unwrap();
        let (code, said) = close_frame(&mut ws, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("{shown}: closed without a frame"));
        assert_eq!(code, 4400, "{shown}: {said}");
        assert!(said.contains(reason), "{shown}: {said}");
        assert!(said.len() <= 123, "{shown}: {} bytes", said.len());
    }
    live.finish().await;
}

/// A graphql-transport-ws client, connected.
async fn graphql_ws_connect(host: &str) -> Ws {
    connect(
        host,
        "/graphql",
        &[("sec-websocket-protocol", "graphql-transport-ws".into())],
    )
    .await
}

/// A graphql-transport-ws client that has sent `connection_init` with `payload`.
async fn graphql_ws_init(host: &str, payload: Value) -> Ws {
    let mut ws = graphql_ws_connect(host).await;
    send(
        &mut ws,
        json!({"type": "connection_init", "payload": payload}),
    )
    .await;
    ws
}

/// A graphql-transport-ws client after `connection_init` with `payload`, and the answer.
async fn graphql_ws(host: &str, payload: Value) -> (Ws, Value) {
    let mut ws = graphql_ws_init(host, payload).await;
    let ack = match next_text(&mut ws, Duration::from_secs(10)).await {
        Some(text) => serde_json::from_str(&text).unwrap(),
        None => Value::Null,
    };
    (ws, ack)
}

async fn subscribe(ws: &mut Ws, id: &str, query: &str) {
    send(
        ws,
        json!({"id": id, "type": "subscribe", "payload": {"query": query}}),
    )
    .await;
}

const TABLE_QUERY: &str = "subscription($w: JSON) { liveTable(table: \"streams\", where: $w) { table epoch kind rows changes { diff row } } }";

/// Applies table messages to a multiset of rows; returns the newest epoch seen.
fn apply(rows: &mut BTreeMap<String, i64>, message: &Value, epoch: &mut Option<u64>) {
    let update = &message["payload"]["data"]["liveTable"];
    assert!(message["payload"]["errors"].is_null(), "{message}");
    match update["kind"].as_str().unwrap() {
        "SNAPSHOT" => {
            rows.clear();
            for row in update["rows"].as_array().unwrap() {
                *rows.entry(row.to_string()).or_default() += 1;
            }
        }
        "CHANGES" => {
            for change in update["changes"].as_array().unwrap() {
                let count = rows.entry(change["row"].to_string()).or_default();
                *count += change["diff"].as_i64().unwrap();
                assert!(*count >= 0, "a row went out that was never in: {change}");
            }
            rows.retain(|_, n| *n != 0);
        }
        other => panic!("kind {other}"),
    }
    if let Some(e) = update["epoch"].as_u64() {
        assert!(epoch.is_none_or(|old| e >= old), "epochs go forward");
        *epoch = Some(e);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_subscription_is_a_snapshot_then_changes_that_add_up_to_the_table() {
    let fleet = fleet(14, 4000);
    let a = fleet.tenants[0].clone();
    let mut live = Live::start(Limits::default(), &fleet.tenants[1]);
    let host = live.host();
    let token = live.member(&a);

    // Unauthenticated or wrongly authenticated clients are refused at connection_init.
    let (mut refused, answer) = graphql_ws(&host, json!({})).await;
    assert_ne!(answer["type"], "connection_ack", "{answer}");
    assert!(
        next_text(&mut refused, Duration::from_secs(2))
            .await
            .is_none()
    );
    let (_, answer) = graphql_ws(&host, json!({"Authorization": "Bearer forged"})).await;
    assert_ne!(answer["type"], "connection_ack", "{answer}");
    // Closed with 4403, as graphql-transport-ws asks of a server refusing a connection.
    // A subscription before connection_init is closed with 4401, even one nested too deep to
    // be read.
    let deep = format!("subscription {}{}", "{a".repeat(100), "}".repeat(100));
    for query in [TABLE_QUERY, deep.as_str()] {
        let mut early = graphql_ws_connect(&host).await;
        subscribe(&mut early, "early", query).await;
        assert_eq!(
            close_code(&mut early, Duration::from_secs(10)).await,
            Some(4401),
            "{query}"
        );
    }
    let mut forged = graphql_ws_init(&host, json!({"Authorization": "Bearer forged"})).await;
    assert_eq!(
        close_code(&mut forged, Duration::from_secs(10)).await,
        Some(4403)
    );
    // One that never sends connection_init is closed with 4408 once its time is up.
    let started = Instant::now();
    let mut silent = graphql_ws_connect(&host).await;
    let wait = keel_api::graphql_ws::INIT_WAIT;
    assert_eq!(
        close_code(&mut silent, wait + Duration::from_secs(10)).await,
        Some(4408)
    );
    assert!(started.elapsed() >= wait, "{:?}", started.elapsed());

    // One subscriber from the start, one filtered to a single stream, one joining halfway.
    let (mut early, ack) =
        graphql_ws(&host, json!({"Authorization": format!("Bearer {token}")})).await;
    assert_eq!(ack["type"], "connection_ack");
    subscribe(&mut early, "all", TABLE_QUERY).await;
    let first = next_json(&mut early).await;
    assert_eq!(
        first["payload"]["data"]["liveTable"]["kind"], "SNAPSHOT",
        "{first}"
    );
    let (mut filtered, _) = graphql_ws(&host, json!({"token": token})).await;
    send(
        &mut filtered,
        json!({"id": "one", "type": "subscribe", "payload": {"query": TABLE_QUERY, "variables": {"w": {"status": "live"}}}}),
    )
    .await;
    let mut filtered_rows = BTreeMap::new();
    let mut filtered_epoch = None;
    apply(
        &mut filtered_rows,
        &next_json(&mut filtered).await,
        &mut filtered_epoch,
    );

    let half = fleet.records.len() / 2;
    live.feed(&fleet.records[..half]).await;
    let (mut late, _) =
        graphql_ws(&host, json!({"Authorization": format!("Bearer {token}")})).await;
    subscribe(&mut late, "late", TABLE_QUERY).await;
    live.feed(&fleet.records[half..]).await;
    live.finish().await;

    let mut early_rows = BTreeMap::new();
    let mut early_epoch = None;
    apply(&mut early_rows, &first, &mut early_epoch);
    let mut late_rows = BTreeMap::new();
    let mut late_epoch = None;
    let quiet = Duration::from_millis(1500);
    let mut messages = 0;
    for (ws, rows, epoch) in [
        (&mut early, &mut early_rows, &mut early_epoch),
        (&mut late, &mut late_rows, &mut late_epoch),
        (&mut filtered, &mut filtered_rows, &mut filtered_epoch),
    ] {
        while let Some(text) = next_text(ws, quiet).await {
            apply(rows, &serde_json::from_str(&text).unwrap(), epoch);
            messages += 1;
        }
    }
    assert!(messages > 5, "changes came epoch by epoch, not once");

    let tables = live.handles.tables.read().unwrap();
    let expect = |equals: Vec<(String, Value)>| -> BTreeMap<String, i64> {
        let filter = RowFilter {
            tenant: Some(a.clone()),
            equals,
        };
        multiset(tables.rows_json("streams", &filter).unwrap())
    };
    let all = expect(Vec::new());
    assert!(all.len() > 2, "tenant A has streams");
    assert_eq!(early_rows, all, "the early subscriber holds the table");
    assert_eq!(late_rows, all, "the late subscriber holds the table");
    assert_eq!(
        filtered_rows,
        expect(vec![("status".into(), json!("live"))])
    );
    assert!(early_epoch.is_some() && early_epoch <= tables.epoch());
    for row in early_rows.keys() {
        assert!(row.contains(&a), "only tenant A's rows: {row}");
    }
}

/// Plain table subscriptions are served by Keel's direct path, the rest by async-graphql; ids
/// follow one set of rules across both: `complete` is answered with `complete` and stops the
/// updates, and a `subscribe` under a live id replaces that subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_subscription_ids_keep_the_protocol_rules_on_both_paths() {
    let fleet = fleet(5, 1500);
    let a = fleet.tenants[0].clone();
    let mut live = Live::start(roomy(), &fleet.tenants[1]);
    let host = live.host();
    let token = live.member(&a);
    let (mut ws, ack) = graphql_ws(&host, json!({"token": token})).await;
    assert_eq!(ack["type"], "connection_ack");

    subscribe(
        &mut ws,
        "x",
        "subscription { liveTable(table: \"streams\") { kind rows } }",
    )
    .await;
    let first = next_json(&mut ws).await;
    assert_eq!(first["id"], "x");
    assert_eq!(first["payload"]["data"]["liveTable"]["kind"], "SNAPSHOT");
    send(&mut ws, json!({"id": "x", "type": "complete"})).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "complete", "id": "x"})
    );

    subscribe(
        &mut ws,
        "y",
        "subscription { liveTable(table: \"streams\") { kind } }",
    )
    .await;
    let old = next_json(&mut ws).await;
    assert_eq!(
        old["payload"]["data"]["liveTable"],
        json!({"kind": "SNAPSHOT"})
    );
    subscribe(
        &mut ws,
        "y",
        "subscription { liveTable(table: \"streams\") { kind epoch } }",
    )
    .await;
    let new = next_json(&mut ws).await;
    assert_eq!(
        new["payload"]["data"]["liveTable"]["kind"], "SNAPSHOT",
        "{new}"
    );

    // An id async-graphql holds (an event feed) taken over by a table subscription.
    subscribe(&mut ws, "z", "subscription { liveFirehose { type } }").await;
    subscribe(
        &mut ws,
        "z",
        "subscription { liveTable(table: \"streams\") { kind epoch } }",
    )
    .await;

    live.feed(&fleet.records).await;
    live.finish().await;
    let mut by_id: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut completed = HashSet::new();
    while let Some(text) = next_text(&mut ws, Duration::from_millis(1500)).await {
        let message: Value = serde_json::from_str(&text).unwrap();
        let id = message["id"].as_str().unwrap().to_owned();
        assert!(
            !completed.contains(&id),
            "nothing after complete: {message}"
        );
        match message["type"].as_str() {
            // The engine stopped: the subscriptions end.
            Some("complete") => _ = completed.insert(id),
            // The feed's events may reach z before its replacement is read.
            Some("next") if message["payload"]["data"]["liveFirehose"].is_object() => {
                assert!(!by_id.contains_key(&id), "the feed was replaced: {message}");
            }
            Some("next") => by_id
                .entry(id)
                .or_default()
                .push(message["payload"]["data"]["liveTable"].clone()),
            _ => panic!("{message}"),
        }
    }
    assert!(
        !by_id.contains_key("x") && !completed.contains("x"),
        "x is over"
    );
    for id in ["y", "z"] {
        let updates = &by_id[id];
        assert!(updates.len() > 1, "{id}: {updates:?}");
        for update in updates {
            let keys: Vec<&String> = update
                .as_object()
                .unwrap_or_else(|| panic!("{id}: {updates:?}"))
                .keys()
                .collect();
            assert_eq!(
                keys,
                ["epoch", "kind"],
                "{id}: only the replacement's fields"
            );
        }
        assert!(updates.iter().any(|u| u["kind"] == "CHANGES"), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphql_event_subscriptions_carry_no_addresses_and_bad_operations_get_errors() {
    let fleet = fleet(15, 2000);
    let a = fleet.tenants[0].clone();
    let mut live = Live::start(roomy(), &fleet.tenants[1]);
    let host = live.host();
    let token = live.member(&a);
    // A client that offers no subprotocol Keel speaks is told which ones it does.
    for offer in [None, Some("mqtt, chat")] {
        let mut request = format!("ws://{host}/graphql")
            .into_client_request()
            .unwrap();
        if let Some(offer) = offer {
            request
                .headers_mut()
                .insert("sec-websocket-protocol", offer.parse().unwrap());
        }
        match tokio_tungstenite::connect_async(request).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 400, "{offer:?}");
                let body = String::from_utf8(response.body().clone().unwrap_or_default());
                assert!(
                    body.as_deref()
                        .is_ok_and(|b| b.contains("graphql-transport-ws")),
                    "{offer:?}: {body:?}"
                );
            }
            other => panic!("{offer:?}: expected a 400, got {other:?}"),
        }
    }
    let (mut ws, ack) =
        graphql_ws(&host, json!({"Authorization": format!("Bearer {token}")})).await;
    assert_eq!(ack["type"], "connection_ack");
    subscribe(
        &mut ws,
        "fire",
        "subscription { liveFirehose { type channel tenantId data missed } }",
    )
    .await;
    subscribe(
        &mut ws,
        "conn",
        "subscription { liveConnectionEvents { sessionId connectionAddr internalName } }",
    )
    .await;
    // Another tenant's id is forbidden; an unknown table is bad input; neither ends the socket.
    let other = &fleet.tenants[2];
    subscribe(
        &mut ws,
        "x",
        &format!(
            "subscription {{ liveTable(table: \"streams\", tenantId: \"{other}\") {{ kind }} }}"
        ),
    )
    .await;
    // Resolver errors come as a `next` carrying the error, then `complete`; the socket lives on.
    let refused = next_json(&mut ws).await;
    assert_eq!(refused["id"], "x", "{refused}");
    assert_eq!(
        refused["payload"]["errors"][0]["extensions"]["code"], "FORBIDDEN",
        "{refused}"
    );
    assert!(refused["payload"]["data"].is_null());
    assert_eq!(
        next_json(&mut ws).await,
        json!({"id": "x", "type": "complete"})
    );
    subscribe(
        &mut ws,
        "y",
        "subscription { liveTable(table: \"passwords\") { kind } }",
    )
    .await;
    let refused = next_json(&mut ws).await;
    assert_eq!(
        refused["payload"]["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
        "{refused}"
    );
    assert_eq!(next_json(&mut ws).await["type"], "complete");
    // An invalid operation is answered with its validation errors.
    subscribe(&mut ws, "z", "subscription { nope }").await;
    let invalid = next_json(&mut ws).await;
    assert_eq!(invalid["id"], "z", "{invalid}");
    let message = invalid["payload"]["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("nope"), "{invalid}");
    assert_eq!(next_json(&mut ws).await["type"], "complete");

    let reader = tokio::spawn(async move {
        let mut frames = Vec::new();
        while let Some(text) = next_text(&mut ws, Duration::from_secs(3)).await {
            frames.push(text);
        }
        frames
    });
    live.feed(&fleet.records).await;
    live.finish().await;
    let (mut fire, mut conn) = (0, 0);
    for text in reader.await.unwrap() {
        assert_no_hosts(&text, &fleet.hosts);
        let message: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(message["type"], "next", "{message}");
        match message["id"].as_str().unwrap() {
            "fire" => {
                assert_eq!(
                    message["payload"]["data"]["liveFirehose"]["tenantId"],
                    a.as_str()
                );
                fire += 1;
            }
            "conn" => {
                assert!(
                    message["payload"]["data"]["liveConnectionEvents"]["connectionAddr"].is_null()
                );
                conn += 1;
            }
            other => panic!("id {other}"),
        }
    }
    assert_eq!(fire, accepted_for(&fleet.records, &a));
    assert!(conn > 10, "connections arrive");
}

/// `POST path` with a JSON body; returns status and JSON answer.
fn post(host: &str, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent.post(&format!("http://{host}{path}"));
    if let Some(token) = token {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    let mut response = request
        .header("Content-Type", "application/json")
        .send(body.to_string().as_bytes())
        .unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphql_queries_answer_from_the_live_tables_within_the_tenant() {
    let fleet = fleet(16, 3000);
    let (a, b) = (fleet.tenants[0].clone(), fleet.tenants[1].clone());
    let mut live = Live::start(Limits::default(), &b);
    live.feed(&fleet.records).await;
    live.finish().await;
    let host = live.host();
    let token = live.member(&a);
    let (status, answer) = tokio::task::spawn_blocking({
        let host = host.clone();
        move || {
            post(
                &host,
                "/graphql",
                None,
                &json!({"query": "{ platformOverview { totalStreams } }"}),
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(status, 401);
    assert_eq!(answer["error"]["code"], "unauthorized");

    let query = |token: String, query: String| {
        let host = host.clone();
        tokio::task::spawn_blocking(move || {
            post(&host, "/graphql", Some(&token), &json!({"query": query}))
        })
    };
    // Page through every stream of tenant A, three at a time.
    let mut names = Vec::new();
    let mut after = Value::Null;
    loop {
        let q = format!(
            "{{ streams(first: 3, after: {after}) {{ totalCount pageInfo {{ hasNextPage endCursor }} edges {{ node {{ internalName tenantId }} }} }} }}"
        );
        let (status, answer) = query(token.clone(), q).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        let page = &answer["data"]["streams"];
        for edge in page["edges"].as_array().unwrap() {
            assert_eq!(edge["node"]["tenantId"], a.as_str());
            names.push(edge["node"]["internalName"].as_str().unwrap().to_owned());
        }
        if !page["pageInfo"]["hasNextPage"].as_bool().unwrap() {
            assert_eq!(page["totalCount"].as_u64().unwrap() as usize, names.len());
            break;
        }
        after = page["pageInfo"]["endCursor"].clone();
    }
    let mut expected: Vec<String> = live
        .rows("streams", &a)
        .iter()
        .map(|r| r["internal_name"].as_str().unwrap().to_owned())
        .collect();
    expected.sort();
    names.sort();
    assert_eq!(names, expected);

    let (_, answer) = query(
        token.clone(),
        format!("{{ streams(tenantId: \"{b}\") {{ totalCount }} }}"),
    )
    .await
    .unwrap();
    assert_eq!(
        answer["errors"][0]["extensions"]["code"], "FORBIDDEN",
        "{answer}"
    );
    let (_, answer) = query(
        live.admin(),
        format!("{{ streams(tenantId: \"{b}\") {{ edges {{ node {{ tenantId }} }} }} }}"),
    )
    .await
    .unwrap();
    let edges = answer["data"]["streams"]["edges"].as_array().unwrap();
    assert!(!edges.is_empty());
    assert!(edges.iter().all(|e| e["node"]["tenantId"] == b.as_str()));
    let (status, answer) = query(token.clone(), "{ streams(".into()).await.unwrap();
    assert_eq!(status, 200);
    assert!(
        answer["errors"][0]["message"].as_str().is_some(),
        "{answer}"
    );
    let (_, answer) = query(
        token,
        "{ geographicDistribution(topN: 3) { totalViewers topCountries { countryCode viewerCount } } }".into(),
    )
    .await
    .unwrap();
    assert!(answer["errors"].is_null(), "{answer}");
    let geo = &answer["data"]["geographicDistribution"];
    let top = geo["topCountries"].as_array().unwrap();
    assert!(!top.is_empty() && top.len() <= 3, "{geo}");
    let counts: Vec<i64> = top
        .iter()
        .map(|c| c["viewerCount"].as_i64().unwrap())
        .collect();
    assert!(
        counts.windows(2).all(|w| w[0] >= w[1]),
        "most first: {counts:?}"
    );
    assert!(counts.iter().sum::<i64>() <= geo["totalViewers"].as_i64().unwrap());
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Whatever a client sends on either socket, the server answers or closes that one
        /// connection, and keeps serving everyone else.
        #[test]
        fn arbitrary_frames_never_break_the_sockets(
            frames in proptest::collection::vec(
                prop_oneof![
                    any::<String>(),
                    "\\{\"(action|type|id)\": ?\"[a-z_]{0,12}\"(, ?\"[a-z]{1,8}\": ?[^}]{0,20})?\\}",
                    Just("{\"type\":\"subscribe\",\"id\":\"1\",\"payload\":{\"query\":\"subscription { liveFirehose { type } }\"}}".to_owned()),
                ],
                1..8,
            )
        ) {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            runtime.block_on(async {
                let fleet = Fleet { records: Vec::new(), tenants: Vec::new(), hosts: HashSet::new() };
                let tenant = "5eed517e-ba5e-da7a-517e-ba5eda7a0001";
                let live = Live::start(Limits::default(), tenant);
                let host = live.host();
                let token = live.member(tenant);
                let (mut graphql, _) = graphql_ws(&host, json!({"token": token})).await;
                let mut signal = connect(&host, "/ws", &[("authorization", format!("Bearer {token}"))]).await;
                for frame in &frames {
                    let _ = graphql.send(Message::text(frame.clone())).await;
                    let _ = signal.send(Message::text(frame.clone())).await;
                }
                // The Signalman socket answers every frame (an error at worst) and stays open.
                send(&mut signal, json!({"action": "ping"})).await;
                let mut pong = false;
                while let Some(text) = next_text(&mut signal, Duration::from_secs(5)).await {
                    for line in text.split('\n') {
                        let reply: Value = serde_json::from_str(line).unwrap();
                        if reply["type"] == "pong" { pong = true; }
                    }
                    if pong { break; }
                }
                assert!(pong, "the Signalman connection lives on after {frames:?}");
                // A fresh GraphQL connection still works.
                let (_, ack) = graphql_ws(&host, json!({"token": token})).await;
                assert_eq!(ack["type"], "connection_ack");
                drop(fleet);
            });
        }
    }
}

/// A WebSocket whose socket receive buffer is tiny, so that a client that stops reading
/// soon stops the server's writes too — as a stalled browser tab over a real network would.
async fn connect_stalling(host: &str, path: &str, headers: &[(&'static str, String)]) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(host.parse().unwrap()).await.unwrap();
    let mut request = format!("ws://{host}{path}").into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    let (ws, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
        .await
        .unwrap();
    ws
}

/// A GraphQL WebSocket over [`connect_stalling`]'s socket, initialised with `token`.
async fn graphql_stalling(host: &str, token: &str) -> Ws {
    let mut ws = connect_stalling(
        host,
        "/graphql",
        &[("sec-websocket-protocol", "graphql-transport-ws".into())],
    )
    .await;
    send(
        &mut ws,
        json!({"type": "connection_init", "payload": {"token": token}}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "connection_ack");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_loses_events_with_a_count_and_slows_no_one() {
    let fleet = fleet(17, 20_000);
    let a = fleet.tenants[0].clone();
    // Short queues, and kernel send buffers small enough that the stalled connections'
    // megabytes cannot all hide in the kernel (autotuning would let them grow to several MiB,
    // and then whether anyone lags would depend on the machine).
    let limits = Limits {
        queue: 16,
        send_buffer: Some(16 * 1024),
        // The stalled clients are read again only after the others: they must not be let go.
        write_wait: Duration::from_secs(120),
        ..Limits::default()
    };
    let mut live = Live::start(limits, &fleet.tenants[1]);
    let host = live.host();
    let bearer = [("authorization", format!("Bearer {}", live.member(&a)))];
    let subscribe_all = json!({"action": "subscribe", "channels": ["all"]});

    let mut stalled = connect_stalling(&host, "/ws", &bearer).await;
    send(&mut stalled, subscribe_all.clone()).await;
    assert_eq!(
        next_json(&mut stalled).await["type"],
        "subscription_confirmed"
    );
    let mut stalled_table = graphql_stalling(&host, &live.member(&a)).await;
    subscribe(
        &mut stalled_table,
        "t",
        &TABLE_QUERY.replace("streams", "viewer_sessions"),
    )
    .await;
    // The firehose on the same connection: enough traffic to fill the socket's buffers.
    subscribe(
        &mut stalled_table,
        "f",
        "subscription { liveFirehose { type data missed } }",
    )
    .await;

    // A reader that keeps up, with a queue long enough for everything.
    let mut fast = connect(&host, "/ws", &bearer).await;
    send(&mut fast, subscribe_all).await;
    assert_eq!(next_json(&mut fast).await["type"], "subscription_confirmed");
    let fast = tokio::spawn(async move { drain_feed(&mut fast, Duration::from_secs(3)).await });

    live.feed(&fleet.records).await;
    live.finish().await;
    let expected = accepted_for(&fleet.records, &a);

    // Every client here has a 16-deep queue, so the reader that keeps up may miss some too;
    // what each got plus what it was told it missed is everything.
    let account = |messages: &[(String, Value)]| {
        let mut got = 0u64;
        let mut missed = 0u64;
        for (_, m) in messages {
            if m["type"] == "missed" {
                assert_eq!(m["channel"], "system");
                missed += m["data"]["count"].as_u64().unwrap();
            } else {
                assert_eq!(m["tenant_id"], a.as_str());
                got += 1;
            }
        }
        (got, missed)
    };
    let (got, missed) = account(&fast.await.unwrap());
    assert_eq!(
        got + missed,
        expected as u64,
        "nothing vanishes without a count"
    );

    let stalled_messages = drain_feed(&mut stalled, Duration::from_secs(3)).await;
    let (got, missed) = account(&stalled_messages);
    assert!(missed > 0, "the stalled client was told what it missed");
    assert_eq!(
        got + missed,
        expected as u64,
        "nothing vanishes without a count"
    );

    // The stalled table subscriber is resynchronised with a fresh snapshot and ends up
    // holding exactly the table.
    let mut rows = BTreeMap::new();
    let mut epoch = None;
    let mut snapshots = 0;
    let (mut fire_got, mut fire_missed) = (0u64, 0u64);
    while let Some(text) = next_text(&mut stalled_table, Duration::from_secs(3)).await {
        let message: Value = serde_json::from_str(&text).unwrap();
        if message["id"] == "f" {
            match message["payload"]["data"]["liveFirehose"]["missed"].as_u64() {
                Some(missed) => fire_missed += missed,
                None => fire_got += 1,
            }
            continue;
        }
        snapshots += usize::from(message["payload"]["data"]["liveTable"]["kind"] == "SNAPSHOT");
        apply(&mut rows, &message, &mut epoch);
    }
    assert_eq!(fire_got + fire_missed, expected as u64);
    assert!(
        snapshots >= 2,
        "the lagging table subscriber got a fresh snapshot"
    );
    assert_eq!(rows, multiset(live.rows("viewer_sessions", &a)));
    let dropped = live.handles.hub.dropped();
    assert!(dropped > 0);

    // Every byte the queues held comes back once the connections are gone.
    drop(stalled);
    drop(stalled_table);
    let hub = &live.handles.hub;
    let deadline = Instant::now() + Duration::from_secs(10);
    while (hub.queued_bytes() != 0 || hub.subscribers() != 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!((hub.queued_bytes(), hub.subscribers()), (0, 0));
}

/// A GraphQL WebSocket client that stops reading is let go once a write to it has waited
/// `write_wait` (10 s by default), as on `/ws`: its subscriptions end and their queued bytes
/// come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graphql_client_that_stops_reading_is_let_go() {
    let fleet = fleet(19, 20_000);
    let a = fleet.tenants[0].clone();
    let limits = Limits {
        send_buffer: Some(16 * 1024),
        write_wait: Duration::from_secs(2),
        ..Limits::default()
    };
    let mut live = Live::start(limits, &fleet.tenants[1]);
    let host = live.host();
    let mut ws = graphql_stalling(&host, &live.member(&a)).await;
    subscribe(
        &mut ws,
        "f",
        "subscription { liveFirehose { type data missed } }",
    )
    .await;
    subscribe(
        &mut ws,
        "t",
        &TABLE_QUERY.replace("streams", "viewer_sessions"),
    )
    .await;
    let hub = live.handles.hub.clone();
    let subscribed = Instant::now();
    while hub.subscribers() != 2 && subscribed.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hub.subscribers(), 2, "both subscriptions are served");
    live.feed(&fleet.records).await;
    live.finish().await;
    let stalled = Instant::now();
    while hub.subscribers() != 0 && stalled.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        (hub.subscribers(), hub.queued_bytes()),
        (0, 0),
        "let go after {:?}",
        stalled.elapsed()
    );
    drop(ws);
}

/// One GraphQL WebSocket holds at most `MAX_SUBSCRIPTIONS` subscriptions, on either path
/// (plain `liveTable` documents are served directly, others by async-graphql); the next is
/// refused with an error naming the bound, and a completed or refused one frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graphql_connection_holds_a_bounded_number_of_subscriptions() {
    use keel_api::graphql_ws::MAX_SUBSCRIPTIONS;
    let fleet = fleet(15, 300);
    let a = fleet.tenants[0].clone();
    let mut live = Live::start(Limits::default(), &fleet.tenants[1]);
    live.feed(&fleet.records).await;
    live.finish().await;
    let host = live.host();
    let token = live.member(&a);
    let (mut ws, ack) = graphql_ws(&host, json!({ "token": token })).await;
    assert_eq!(ack["type"], "connection_ack");
    // Half through the direct path, half through async-graphql (a fragment sends it there);
    // none of them is read yet.
    let fragment = "subscription { liveTable(table: \"streams\") { ...F } } fragment F on TableUpdateMessage { kind epoch }";
    for i in 0..MAX_SUBSCRIPTIONS {
        let query = if i % 2 == 0 { TABLE_QUERY } else { fragment };
        subscribe(&mut ws, &format!("s{i}"), query).await;
    }
    subscribe(&mut ws, "over", TABLE_QUERY).await;
    let refused = loop {
        let message = next_json(&mut ws).await;
        match message["type"].as_str() {
            Some("error") => break message,
            Some("next") => {}
            other => panic!("{other:?}: {message}"),
        }
    };
    assert_eq!(refused["id"], "over", "{refused}");
    let said = refused["payload"][0]["message"].as_str().unwrap();
    assert!(
        said.contains(&format!("holds {MAX_SUBSCRIPTIONS} subscriptions")),
        "{said}"
    );
    // Completing one makes room for one more, which is served; so does one that is refused
    // for its own reasons (an unknown table).
    send(&mut ws, json!({"id": "s0", "type": "complete"})).await;
    subscribe(&mut ws, "after", TABLE_QUERY).await;
    served(&mut ws, "after").await;
    send(&mut ws, json!({"id": "s1", "type": "complete"})).await;
    subscribe(
        &mut ws,
        "bad",
        "subscription { liveTable(table: \"nope\") { kind } }",
    )
    .await;
    loop {
        let message = next_json(&mut ws).await;
        if message["id"] == "bad" && message["type"] != "next" {
            break;
        }
        if message["id"] == "bad" {
            assert!(!message["payload"]["errors"].is_null(), "{message}");
        }
    }
    subscribe(&mut ws, "again", TABLE_QUERY).await;
    served(&mut ws, "again").await;
}

/// Reads `ws` until subscription `id` gets its first `next`; an error for it fails the test
/// (others' errors are let by).
async fn served(ws: &mut Ws, id: &str) {
    while let Some(text) = next_text(ws, Duration::from_secs(10)).await {
        let message: Value = serde_json::from_str(&text).unwrap();
        if message["id"] == id {
            assert_eq!(message["type"], "next", "{message}");
            return;
        }
    }
    panic!("subscription {id} was not served");
}

/// Runs `psql` against Keel's PostgreSQL port; returns (exit code, stdout, stderr).
fn psql(port: u16, password: &str, sslmode: &str, sql: &str) -> (i32, String, String) {
    let out = std::process::Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={port} user=grafana dbname=keel sslmode={sslmode} connect_timeout=10"
        ))
        .args(["-X", "-A", "-t", "-F", ",", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGPASSWORD", password)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run psql ({e}); install the PostgreSQL client: `apt-get install postgresql-client` (scripts/test-servers.sh does)"
            )
        });
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_reads_the_live_tables_with_a_token_as_password_within_the_tenant() {
    let fleet = fleet(18, 3000);
    let (a, b) = (fleet.tenants[0].clone(), fleet.tenants[1].clone());
    let mut live = Live::start(Limits::default(), &b);
    live.feed(&fleet.records).await;
    live.finish().await;
    let port = live.api.as_ref().unwrap().pg_address().unwrap().port();
    let member = live.member(&a);
    let admin = live.admin();
    let tables = live.handles.tables.clone();
    let expected = move |tenant: &str| {
        let mut names: Vec<String> = tenant_rows(&tables, "streams", tenant)
            .iter()
            .map(|r| r["internal_name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };

    tokio::task::spawn_blocking(move || {
        // The tenant's streams, and nothing of anyone else's, however it asks.
        let (code, out, err) = psql(port, &member, "disable", "SELECT internal_name FROM streams ORDER BY internal_name");
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.lines().map(str::to_owned).collect::<Vec<_>>(), expected(&a));
        let (code, out, err) = psql(
            port,
            &member,
            "prefer",
            "SELECT count(DISTINCT tenant_id) FROM (SELECT tenant_id FROM streams UNION ALL SELECT tenant_id FROM viewer_sessions) AS t",
        );
        assert_eq!((code, out.as_str()), (0, "1"), "{err}");
        // Types arrive as Postgres types: numbers, booleans and times are usable as such.
        let (code, out, err) = psql(
            port,
            &member,
            "disable",
            "SELECT sum(total_sessions) > 0, max(started_at) IS NOT NULL, pg_typeof_is_not_needed FROM (SELECT *, 1 AS pg_typeof_is_not_needed FROM streams) AS s GROUP BY pg_typeof_is_not_needed",
        );
        assert_eq!((code, out.as_str()), (0, "t,t,1"), "{err}");
        // An admin token sees every tenant.
        let (code, out, err) = psql(port, &admin, "disable", "SELECT count(DISTINCT tenant_id) FROM streams");
        assert_eq!((code, out.as_str()), (0, "3"), "{err}");
        let (code, out, _) = psql(port, &admin, "disable", &format!("SELECT count(*) FROM streams WHERE tenant_id = '{b}'"));
        assert_eq!(code, 0);
        assert_eq!(out.parse::<usize>().unwrap(), expected(&b).len());

        // Bad tokens, bad SQL and writes are clear errors.
        let (code, _, err) = psql(port, "forged", "disable", "SELECT 1");
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("password must be a Keel token"), "{err}");
        let (code, _, err) = psql(port, &member, "disable", "SELEKT 1");
        assert_eq!(code, 1);
        assert!(err.contains("ERROR"), "{err}");
        for write in ["DROP TABLE streams", "SET datafusion.execution.batch_size = 1", "INSERT INTO streams VALUES (1)"] {
            let (code, _, err) = psql(port, &member, "disable", write);
            assert_eq!(code, 1, "{write}");
            assert!(err.contains("only queries are allowed"), "{write}: {err}");
        }
        // A time with no text form is an error naming its column, not its error as the value.
        let (code, out, err) = psql(port, &member, "disable", "SELECT arrow_cast(-99999999999999, 'Timestamp(Second, None)') AS far");
        assert_eq!(code, 1, "{out}");
        assert!(err.contains("column far has a value with no text form"), "{err}");
        assert!(!out.contains("ERROR"), "{out}");
    })
    .await
    .unwrap();
}

/// Threads of this process running an SQL statement (the API runs in the test's process).
fn query_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|task| {
            let comm = task.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|name| name.trim() == "keel-sql")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_in_psql_cancels_the_running_statement() {
    let fleet = fleet(19, 500);
    let b = fleet.tenants[1].clone();
    let mut live = Live::start(Limits::default(), &b);
    live.feed(&fleet.records).await;
    live.finish().await;
    let port = live.api.as_ref().unwrap().pg_address().unwrap().port();
    let member = live.member(&fleet.tenants[0]);
    let limit = Limits::default().query.time;

    tokio::task::spawn_blocking(move || {
        // Hours of work at this machine's speed, far past the statement time limit.
        let slow = "SELECT sum(value % 7) FROM generate_series(1, 100000000000)";
        let child = std::process::Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={port} user=grafana dbname=keel sslmode=disable connect_timeout=10"
            ))
            .args(["-X", "-A", "-t", "-c", slow])
            .env("PGPASSWORD", &member)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("psql is installed (scripts/test-servers.sh installs postgresql-client)");
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(query_threads(), 1, "the statement is running");
        let started = Instant::now();
        // What Ctrl-C sends: psql answers it with a cancel request on a second connection.
        let signalled = std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(signalled.success());
        let out = child.wait_with_output().unwrap();
        let waited = started.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("canceling statement due to user request"), "{err}");
        assert!(
            waited < limit / 4,
            "the statement stopped {waited:?} after the cancel; the time limit is {limit:?}"
        );
        // Not only answered: the statement's thread stops too.
        let deadline = Instant::now() + Duration::from_secs(10);
        while query_threads() > 0 {
            assert!(Instant::now() < deadline, "the cancelled statement still runs");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (code, out, err) = psql(port, &member, "disable", "SELECT count(*) > 0 FROM streams");
        assert_eq!((code, out.as_str()), (0, "t"), "{err}");
    })
    .await
    .unwrap();
}

/// A failed PostgreSQL login ends its connection (FATAL, then closed), as PostgreSQL's does:
/// left open after an ERROR, a thousand such connections held every place the port has. A
/// session whose token expires is ended at its next statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_login_or_an_expired_token_ends_the_postgres_connection() {
    use sqlx::Connection;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fleet = fleet(21, 300);
    let a = fleet.tenants[0].clone();
    let mut live = Live::start(Limits::default(), &fleet.tenants[1]);
    live.feed(&fleet.records).await;
    live.finish().await;
    let port = live.api.as_ref().unwrap().pg_address().unwrap().port();

    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut startup = Vec::new();
    startup.extend_from_slice(&196_608i32.to_be_bytes());
    startup.extend_from_slice(b"user\0grafana\0database\0keel\0\0");
    let mut message = ((startup.len() + 4) as i32).to_be_bytes().to_vec();
    message.extend_from_slice(&startup);
    socket.write_all(&message).await.unwrap();
    let mut ask = [0u8; 9];
    socket.read_exact(&mut ask).await.unwrap();
    assert_eq!(ask[0], b'R', "asked for a password");
    let mut password = vec![b'p'];
    password.extend_from_slice(&(4 + 7i32).to_be_bytes());
    password.extend_from_slice(b"forged\0");
    socket.write_all(&password).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer))
        .await
        .expect("the connection is closed after a failed login")
        .unwrap();
    assert_eq!(answer.first(), Some(&b'E'), "{answer:?}");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("FATAL"), "{text}");
    assert!(text.contains("28P01"), "{text}");

    let expires = keel_operators::time::now_ms() / 1000 + 3;
    let url = format!(
        "postgres://grafana:{}@127.0.0.1:{port}/keel?sslmode=disable",
        live.member_until(&a, expires)
    );
    let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM streams")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert!(count > 0);
    while keel_operators::time::now_ms() / 1000 <= expires {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let error = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM streams")
        .fetch_one(&mut db)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("the token expired"), "{error}");
    assert!(
        sqlx::query("SELECT 1").execute(&mut db).await.is_err(),
        "the connection of an expired token is closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_on_the_extended_protocol_gets_typed_binary_values() {
    use sqlx::{Connection, Row};
    let fleet = fleet(19, 2000);
    let a = fleet.tenants[0].clone();
    let mut live = Live::start(Limits::default(), &fleet.tenants[1]);
    live.feed(&fleet.records).await;
    live.finish().await;
    let port = live.api.as_ref().unwrap().pg_address().unwrap().port();
    let url = format!(
        "postgres://grafana:{}@127.0.0.1:{port}/keel?sslmode=disable",
        live.member(&a)
    );
    let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
    let rows = sqlx::query(
        "SELECT internal_name, total_sessions, viewer_seconds, started_at, current_viewers > 0 AS busy FROM streams ORDER BY internal_name",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    let mut expected = live.rows("streams", &a);
    expected.sort_by_key(|r| r["internal_name"].as_str().unwrap().to_owned());
    assert_eq!(rows.len(), expected.len());
    assert!(!rows.is_empty());
    for (row, want) in rows.iter().zip(&expected) {
        assert_eq!(
            row.get::<String, _>(0),
            want["internal_name"].as_str().unwrap()
        );
        assert_eq!(
            row.get::<i64, _>(1),
            want["total_sessions"].as_i64().unwrap()
        );
        let seconds: f64 = row.get(2);
        assert!((seconds - want["viewer_seconds"].as_f64().unwrap()).abs() < 1e-6);
        // Binary timestamps: microseconds since 2000-01-01, read back as the same instant.
        if let Some(started) = want["started_at"].as_str() {
            let micros: i64 = row.try_get_unchecked(3).unwrap();
            let millis = (micros + 946_684_800_000_000) / 1000;
            assert_eq!(keel_operators::time::format_rfc3339(millis), started);
        }
        let busy: bool = row.get(4);
        assert_eq!(busy, want["current_viewers"].as_i64().unwrap() > 0);
    }
    let error = sqlx::query("DELETE FROM streams")
        .execute(&mut db)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("only queries are allowed"),
        "{error}"
    );
    let error = sqlx::query("SELECT * FROM streams WHERE stream_id = $1")
        .bind("x")
        .fetch_all(&mut db)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("parameters"), "{error}");
    // A `$1` inside a string is text, not a parameter.
    let text: String = sqlx::query_scalar("SELECT '$1 each' AS price")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(text, "$1 each");
    // An unsigned 64-bit value past int8's range is an error, not a wrong number; one within
    // it arrives as itself, and an untyped NULL as a null.
    let error = sqlx::query("SELECT arrow_cast(9223372036854775808, 'UInt64') AS big")
        .fetch_one(&mut db)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("past the range of int8"),
        "{error}"
    );
    let row =
        sqlx::query("SELECT arrow_cast(9223372036854775807, 'UInt64') AS big, NULL AS nothing")
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert_eq!(row.get::<i64, _>(0), i64::MAX);
    assert_eq!(row.get::<Option<String>, _>(1), None);
    // A timestamp past what microseconds since 2000 can hold is an error, not a wrong time.
    let error = sqlx::query("SELECT arrow_cast(-99999999999999, 'Timestamp(Second, None)') AS far")
        .fetch_one(&mut db)
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("column far has a value with no text form"),
        "{error}"
    );
    // One whose microseconds fit but whose offset from 2000 does not: an error, not a wrap.
    let error = sqlx::query(
        "SELECT arrow_cast(-9223372036854775000, 'Timestamp(Microsecond, None)') AS edge",
    )
    .fetch_one(&mut db)
    .await
    .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("column edge has a value with no text form"),
        "{error}"
    );
    // The connection is still good after errors.
    let one: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert!(one > 0);
}

/// A selection of every field of `type_name` without required arguments, nested `depth` deep,
/// from the schema's own introspection.
fn selection(types: &BTreeMap<String, Value>, type_name: &str, depth: usize) -> Option<String> {
    let fields = types.get(type_name)?["fields"].as_array()?;
    let mut parts = Vec::new();
    for field in fields {
        let needs_args = field["args"].as_array().is_some_and(|args| {
            args.iter()
                .any(|a| a["type"]["kind"] == "NON_NULL" && a["defaultValue"].is_null())
        });
        if needs_args {
            continue;
        }
        let mut ty = &field["type"];
        while ty["ofType"].is_object() {
            ty = &ty["ofType"];
        }
        let name = field["name"].as_str().unwrap();
        match ty["kind"].as_str().unwrap() {
            "SCALAR" | "ENUM" => parts.push(name.to_owned()),
            "OBJECT" if depth > 0 => {
                if let Some(inner) = selection(types, ty["name"].as_str().unwrap(), depth - 1) {
                    parts.push(format!("{name} {inner}"));
                }
            }
            _ => {}
        }
    }
    (!parts.is_empty()).then(|| format!("{{ {} }}", parts.join(" ")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_token_never_sees_another_tenants_row_through_any_door() {
    let fleet = fleet(22, 4000);
    let b = fleet.tenants[1].clone();
    let mut live = Live::start(roomy(), &b);
    let host = live.host();
    let pg_port = live.api.as_ref().unwrap().pg_address().unwrap().port();
    // Tenant B uses its static token everywhere.
    let token = STATIC_TOKEN.to_owned();

    // The feed, read while events flow.
    let mut feed = connect(&host, "/ws", &[]).await;
    send(&mut feed, json!({"action": "auth", "token": token})).await;
    assert_eq!(next_json(&mut feed).await["type"], "authenticated");
    send(
        &mut feed,
        json!({"action": "subscribe", "channels": ["all"]}),
    )
    .await;
    assert_eq!(next_json(&mut feed).await["type"], "subscription_confirmed");
    let feed = tokio::spawn(async move { drain_feed(&mut feed, Duration::from_secs(3)).await });
    // Every table as an incremental subscription, also while events flow.
    let (mut subscriptions, ack) = graphql_ws(&host, json!({"token": token})).await;
    assert_eq!(ack["type"], "connection_ack");
    for table in keel_dataflows::periscope::TABLES {
        let query = format!(
            "subscription {{ liveTable(table: \"{table}\") {{ table epoch kind rows changes {{ diff row }} }} }}"
        );
        subscribe(&mut subscriptions, table, &query).await;
    }
    let subscriptions = tokio::spawn(async move {
        let mut frames = Vec::new();
        while let Some(text) = next_text(&mut subscriptions, Duration::from_secs(3)).await {
            frames.push(text);
        }
        frames
    });
    live.feed(&fleet.records).await;
    live.finish().await;

    // What must never reach tenant B: the other tenants' ids and their streams' ids.
    let mut forbidden: Vec<String> = Vec::new();
    {
        for tenant in fleet.tenants.iter().filter(|t| **t != b) {
            forbidden.push(tenant.clone());
            let rows = live.rows("streams", tenant);
            assert!(!rows.is_empty(), "tenant {tenant} has streams to leak");
            forbidden.extend(
                rows.iter()
                    .filter_map(|r| r["stream_id"].as_str().map(str::to_owned)),
            );
        }
    }
    let mut seen: Vec<(String, String)> = Vec::new(); // (door, text)

    let mut feed_text = String::new();
    for (text, _) in feed.await.unwrap() {
        feed_text.push_str(&text);
    }
    assert!(feed_text.contains(&b), "the feed carried B's own events");
    seen.push(("/ws".into(), feed_text));
    let frames = subscriptions.await.unwrap().join("\n");
    assert!(
        frames.contains(&b),
        "the subscriptions carried B's own rows"
    );
    // No table a subscriber can see carries a client address either (raw samples included).
    assert_no_hosts(&frames, &fleet.hosts);
    seen.push(("liveTable".into(), frames));

    let sqls = [
        "SELECT * FROM streams",
        "SELECT * FROM viewer_sessions",
        "SELECT * FROM keel.live.nodes",
        "SELECT tenant_id FROM streams UNION SELECT tenant_id FROM viewer_sessions UNION SELECT tenant_id FROM usage_5m",
        "WITH s AS (SELECT * FROM viewer_sessions) SELECT * FROM s WHERE tenant_id <> '00000000-0000-0000-0000-000000000000'",
        "SELECT * FROM streams s JOIN viewer_sessions v ON s.stream_id = v.stream_id",
        "SELECT * FROM (SELECT * FROM routing_hourly) AS r, (SELECT * FROM stream_health_5m) AS h LIMIT 500",
        "SELECT * FROM information_schema.tables",
        "SELECT * FROM information_schema.columns",
        "SELECT * FROM viewers_by_country WHERE stream_id IN (SELECT stream_id FROM streams)",
        "SELECT * FROM ingest_errors",
        "SELECT * FROM unknown_events",
    ];
    let admin = live.admin();
    let all = tokio::task::spawn_blocking({
        let host = host.clone();
        let token = token.clone();
        move || {
            let mut out = Vec::new();
            for sql in sqls {
                let (status, answer) = post(&host, "/v1/sql", Some(&token), &json!({"sql": sql}));
                assert!(status == 200 || status == 400, "{sql}: {status} {answer}");
                out.push((format!("/v1/sql {sql}"), answer.to_string()));
                let (code, text, err) = psql(pg_port, &token, "disable", sql);
                out.push((format!("psql {sql}"), format!("{code} {text} {err}")));
            }
            // GraphQL: every query field with every field it can select, from introspection.
            let (_, schema) = post(
                &host,
                "/graphql",
                Some(&admin),
                &json!({"query": "{ __schema { types { name fields { name args { name defaultValue type { kind } } type { kind name ofType { kind name ofType { kind name ofType { kind name } } } } } } } }"}),
            );
            let types: BTreeMap<String, Value> = schema["data"]["__schema"]["types"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| (t["name"].as_str().unwrap().to_owned(), t.clone()))
                .collect();
            let query = selection(&types, "Query", 4).unwrap();
            let (status, answer) = post(&host, "/graphql", Some(&token), &json!({"query": query}));
            assert_eq!(status, 200);
            assert!(answer["errors"].is_null(), "{query}: {answer}");
            out.push(("graphql".into(), answer.to_string()));
            out
        }
    })
    .await
    .unwrap();
    seen.extend(all);

    for (door, text) in &seen {
        for id in &forbidden {
            assert!(
                !text.contains(id.as_str()),
                "{door} showed tenant B another tenant's {id}"
            );
        }
    }
    // The doors were open: B saw its own data through each of them.
    let own = seen.iter().filter(|(_, text)| text.contains(&b)).count();
    assert!(own >= 10, "B's own rows came through the doors ({own})");
}
