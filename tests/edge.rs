//! The edge over real sockets: Decklog (gRPC, TLS, tokens) into the embedded engine and into a
//! real Kafka-protocol broker (tansu, started by `scripts/test-servers.sh`), and the Helmsman
//! adapter surviving SIGKILL and a Decklog outage without losing or doubling a trigger.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{broker, fresh_topic};
use keel::edge::{DecklogSettings, EdgeServer, HelmsmanSettings};
use keel_api::auth::{Auth, Role, StaticToken};
use keel_edge::client::DecklogClient;
use keel_edge::decklog::Tls;
use keel_edge::envelope::trigger_event_id;
use keel_edge::handoff::Handoff;
use keel_edge::helmsman::AdapterConfig;
use keel_edge::proto::{
    BalancingEvent, Event, EventData, MistTrigger, Payload, StreamBufferTrigger,
    ViewerConnectTrigger,
};
use keel_sources::memory::Injector;
use keel_sources::source::Batch;
use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use uuid::Uuid;

const TENANT: &str = "5eed517e-ba5e-da7a-517e-ba5eda7a0001";
const OTHER: &str = "0ddba11c-0000-4000-8000-000000000002";
const PLATFORM_TOKEN: &str = "kt_platform-test-token";
const TENANT_TOKEN: &str = "kt_tenant-test-token";

fn tenant() -> Uuid {
    Uuid::parse_str(TENANT).unwrap()
}

fn auth() -> Auth {
    Auth::new(
        None,
        vec![
            StaticToken {
                name: "foghorn".into(),
                token: PLATFORM_TOKEN.into(),
                tenant_id: None,
                role: Role::Admin,
            },
            StaticToken {
                name: "helmsman".into(),
                token: TENANT_TOKEN.into(),
                tenant_id: Some(tenant()),
                role: Role::Member,
            },
        ],
    )
    .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn connect_trigger(session: &str) -> MistTrigger {
    MistTrigger {
        trigger_type: "USER_NEW".into(),
        node_id: "edge-1".into(),
        request_id: format!("req-{session}"),
        payload: Some(Payload::ViewerConnect(ViewerConnectTrigger {
            stream_name: "live+demo".into(),
            session_id: session.into(),
            connector: "HLS".into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn drained(injector: &Injector) -> Vec<serde_json::Value> {
    let mut batch = Batch::default();
    injector.drain_into(&mut batch, usize::MAX);
    batch
        .records()
        .map(|record| serde_json::from_slice(record.value).unwrap())
        .collect()
}

/// Decklog with TLS from a self-signed certificate: a client trusting it sends; one without
/// TLS is refused at the transport; bad, missing and wrong-tenant credentials are refused with
/// their reason; a batch keeps its good events and names the bad one.
#[test]
fn decklog_serves_tls_and_refuses_bad_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let injector = Injector::new("decklog");
    let server = EdgeServer::start(
        Some(DecklogSettings {
            listen: "127.0.0.1:0".into(),
            tls: Some(Tls::from_files(&cert, &key).unwrap()),
            handoff: Handoff::engine(injector.clone()),
            auth: auth(),
            metrics_listen: None,
        }),
        None,
    )
    .unwrap();
    let port = server.decklog_address().unwrap().port();
    let url = format!("https://localhost:{port}");
    let ca = certified.cert.pem().into_bytes();
    let rt = runtime();
    rt.block_on(async {
        let mut client = DecklogClient::connect(&url, TENANT_TOKEN, Some(&ca))
            .await
            .unwrap();
        client.send_event(connect_trigger("1")).await.unwrap();
        let health = client.check_health().await.unwrap();
        assert_eq!(health.status, "healthy");

        // Plaintext against the TLS port gets no answer.
        let plain = format!("http://127.0.0.1:{port}");
        match DecklogClient::connect(&plain, TENANT_TOKEN, None).await {
            Err(_) => {}
            Ok(mut client) => {
                let refused = client.send_event(connect_trigger("2")).await;
                assert!(refused.is_err(), "plaintext call accepted by a TLS server");
            }
        }

        for (token, want) in [("kt_nobody", "invalid token"), ("", "invalid token")] {
            let mut bad = DecklogClient::connect(&url, token, Some(&ca))
                .await
                .unwrap();
            let status = bad.send_event(connect_trigger("3")).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{token:?}");
            assert!(
                status.message().contains(want) || status.message().contains("missing"),
                "{}",
                status.message()
            );
        }

        // A tenant's token cannot write another tenant's events.
        let mut foreign = connect_trigger("4");
        foreign.tenant_id = Some(OTHER.into());
        let status = client.send_event(foreign).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("not the tenant"),
            "{}",
            status.message()
        );

        // A platform token must name the tenant: fail closed.
        let mut platform = DecklogClient::connect(&url, PLATFORM_TOKEN, Some(&ca))
            .await
            .unwrap();
        let status = platform.send_event(connect_trigger("5")).await.unwrap_err();
        assert!(
            status.message().contains("no tenant_id"),
            "{}",
            status.message()
        );
        let mut named = connect_trigger("6");
        named.tenant_id = Some(OTHER.into());
        platform.send_event(named).await.unwrap();

        // One bad event in a batch: the others are kept.
        let mut no_stream = connect_trigger("8");
        no_stream.payload = Some(Payload::StreamBuffer(StreamBufferTrigger::default()));
        let answer = client
            .send_events(vec![connect_trigger("7"), no_stream, connect_trigger("9")])
            .await
            .unwrap();
        assert_eq!(answer.accepted, 2);
        assert_eq!(answer.rejected.len(), 1);
        assert_eq!(answer.rejected[0].index, 1);
        assert!(!answer.rejected[0].retryable);
        assert!(
            answer.rejected[0].reason.contains("stream"),
            "{:?}",
            answer.rejected
        );

        // Sending the same triggers again writes nothing new.
        let again = client
            .send_events(vec![connect_trigger("7"), connect_trigger("9")])
            .await
            .unwrap();
        assert_eq!((again.accepted, again.duplicates), (2, 2));
        // The same request id from another tenant is another event, not a duplicate.
        let mut theirs = connect_trigger("7");
        theirs.tenant_id = Some(OTHER.into());
        platform.send_event(theirs).await.unwrap();
    });
    let records = drained(&injector);
    let sessions: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["tenant_id"].as_str().unwrap(),
                r["data"]["viewer_connect"]["session_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        sessions,
        [
            (TENANT, "1"),
            (OTHER, "6"),
            (TENANT, "7"),
            (TENANT, "9"),
            (OTHER, "7")
        ]
    );
}

fn consume(
    brokers: &str,
    topic: &str,
    want: usize,
    within: Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("edge-test-{}", Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut quiet_since = Instant::now();
    while started.elapsed() < within {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                got.push(message.detach());
                quiet_since = Instant::now();
            }
            Some(Err(error)) => panic!("consuming {topic}: {error}"),
            None if got.len() >= want && quiet_since.elapsed() > Duration::from_secs(2) => break,
            None => {}
        }
    }
    got
}

fn header(message: &rdkafka::message::OwnedMessage, name: &str) -> Option<String> {
    message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

/// Both protocol versions through Decklog into the real broker: records keyed by event id with
/// the platform's headers, decodable by Keel's own codec; a resent batch adds nothing.
#[test]
fn decklog_writes_both_versions_to_kafka_once() {
    let brokers = broker();
    let topic = fresh_topic(&brokers, "decklog", 3);
    let server = EdgeServer::start(
        Some(DecklogSettings {
            listen: "127.0.0.1:0".into(),
            tls: None,
            handoff: Handoff::kafka(&brokers, &topic, Duration::from_secs(10)).unwrap(),
            auth: auth(),
            metrics_listen: None,
        }),
        None,
    )
    .unwrap();
    let url = format!("http://{}", server.decklog_address().unwrap());
    let rt = runtime();
    let v2: Vec<MistTrigger> = (0..20).map(|i| connect_trigger(&format!("k{i}"))).collect();
    let ids: Vec<Uuid> = v2.iter().map(trigger_event_id).collect();
    rt.block_on(async {
        let mut client = DecklogClient::connect(&url, TENANT_TOKEN, None)
            .await
            .unwrap();
        let answer = client.send_events(v2.clone()).await.unwrap();
        assert_eq!((answer.accepted, answer.duplicates), (20, 0), "{answer:?}");
        let again = client.send_events(v2.clone()).await.unwrap();
        assert_eq!((again.accepted, again.duplicates), (20, 20));

        // Version 1: a batch over the bidirectional stream, with one bad event.
        let event = |action: &str, id: &str| EventData {
            event_id: id.into(),
            event_type: 4,
            internal_name: Some("demo".into()),
            region: "local".into(),
            data: HashMap::from([
                ("action".to_owned(), action.to_owned()),
                ("session_id".to_owned(), "v1-session".to_owned()),
                ("node_id".to_owned(), "edge-1".to_owned()),
            ]),
            ..Default::default()
        };
        let batch = Event {
            batch_id: Uuid::new_v4().to_string(),
            source: "helmsman".into(),
            tenant_id: TENANT.into(),
            events: vec![
                event("connect", &Uuid::new_v4().to_string()),
                event("teleport", &Uuid::new_v4().to_string()),
            ],
            ..Default::default()
        };
        let mut v1 = tonic::client::Grpc::new(
            tonic::transport::Channel::from_shared(url.clone())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
        v1.ready().await.unwrap();
        let mut request = tonic::Request::new(futures_util::stream::iter(vec![batch]));
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {TENANT_TOKEN}").parse().unwrap(),
        );
        let mut answers = v1
            .streaming(
                request,
                tonic::codegen::http::uri::PathAndQuery::from_static(
                    keel_edge::decklog::STREAM_EVENTS,
                ),
                tonic_prost::ProstCodec::<Event, keel_edge::proto::EventResponse>::default(),
            )
            .await
            .unwrap()
            .into_inner();
        let answer = answers.message().await.unwrap().unwrap();
        assert_eq!(answer.processed_count, 1, "{answer:?}");
        assert_eq!(answer.status, "error");
        assert!(
            answer.message.contains("event 1") && answer.message.contains("teleport"),
            "{}",
            answer.message
        );

        let mut request = tonic::Request::new(BalancingEvent {
            stream_id: "live+demo".into(),
            selected_node: "edge-1".into(),
            tenant_id: TENANT.into(),
            status: "success".into(),
            score: 1234,
            ..Default::default()
        });
        // The scheme is case-insensitive, as on the API.
        request.metadata_mut().insert(
            "authorization",
            format!("bearer {PLATFORM_TOKEN}").parse().unwrap(),
        );
        v1.ready().await.unwrap();
        let answer = v1
            .unary(
                request,
                tonic::codegen::http::uri::PathAndQuery::from_static(
                    keel_edge::decklog::SEND_BALANCING_EVENT,
                ),
                tonic_prost::ProstCodec::<BalancingEvent, keel_edge::proto::EventResponse>::default(
                ),
            )
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.status, "success");
    });
    let messages = consume(&brokers, &topic, 22, Duration::from_secs(30));
    assert_eq!(messages.len(), 22, "20 v2 + 1 v1 + 1 balancing, none twice");
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    for message in &messages {
        let event_type = header(message, "event_type").unwrap();
        *by_type.entry(event_type).or_default() += 1;
        assert_eq!(header(message, "tenant_id").as_deref(), Some(TENANT));
        let record = keel_sources::record::Record {
            position: keel_sources::record::Position::Simulated { seq: 0 },
            value: message.payload().unwrap(),
            headers: keel_sources::record::Headers::default(),
        };
        keel_sources::codec::decode(&record).unwrap();
    }
    assert_eq!(
        by_type,
        BTreeMap::from([
            ("load-balancing".to_owned(), 1),
            ("user-connection".to_owned(), 1),
            ("viewer_connect".to_owned(), 20),
        ])
    );
    let keys: Vec<Uuid> = messages
        .iter()
        .filter(|m| header(m, "event_type").as_deref() == Some("viewer_connect"))
        .map(|m| Uuid::parse_str(std::str::from_utf8(m.key().unwrap()).unwrap()).unwrap())
        .collect();
    let mut keys_sorted = keys;
    keys_sorted.sort();
    let mut want = ids;
    want.sort();
    assert_eq!(keys_sorted, want, "keys are the deterministic event ids");
}

/// The adapter answers Mist while Decklog is down (every trigger is on disk first) and
/// delivers all of them, oldest first, once Decklog is up.
#[test]
fn adapter_keeps_triggers_through_a_decklog_outage() {
    let dir = tempfile::tempdir().unwrap();
    // Reserve a port for the Decklog that is not there yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let adapter = EdgeServer::start(
        None,
        Some(HelmsmanSettings {
            listen: "127.0.0.1:0".into(),
            adapter: AdapterConfig {
                node_id: "edge-outage".into(),
                tenant_id: None,
                decklog_url: format!("http://127.0.0.1:{port}"),
                token: TENANT_TOKEN.into(),
                ca_pem: None,
                wal_dir: dir.path().join("wal"),
            },
        }),
    )
    .unwrap();
    let webhook = format!("http://{}", adapter.helmsman_address().unwrap());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    for i in 0..30 {
        let body = format!("live+demo\n192.0.2.{i}\n1\nHLS\nhttp://x/demo.m3u8\nsess-{i}");
        let mut response = agent
            .post(&format!("{webhook}/USER_NEW"))
            .send(&body)
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.body_mut().read_to_string().unwrap(), "true");
    }
    let mut response = agent
        .post(&format!("{webhook}/"))
        .header("X-Trigger", "USER_END")
        .send("sess-0\nlive+demo\nHLS\n192.0.2.0\nnot-a-number\n1\n2\n")
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "{:?}",
        response.body_mut().read_to_string()
    );
    let status = |agent: &ureq::Agent| -> serde_json::Value {
        agent
            .get(&format!("{webhook}/status"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .map(|text| serde_json::from_str(&text).unwrap())
            .unwrap()
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = status(&agent);
    assert_eq!(before["pending"], 31, "{before}");
    assert!(
        before["last_error"]
            .as_str()
            .unwrap()
            .contains("cannot connect"),
        "{before}"
    );

    let injector = Injector::new("decklog");
    let _decklog = EdgeServer::start(
        Some(DecklogSettings {
            listen: format!("127.0.0.1:{port}"),
            tls: None,
            handoff: Handoff::engine(injector.clone()),
            auth: auth(),
            metrics_listen: None,
        }),
        None,
    )
    .unwrap();
    let started = Instant::now();
    while status(&agent)["pending"] != 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}",
            status(&agent)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let records = drained(&injector);
    assert_eq!(records.len(), 31);
    let sessions: Vec<String> = records
        .iter()
        .take(30)
        .map(|r| {
            r["data"]["viewer_connect"]["session_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let want: Vec<String> = (0..30).map(|i| format!("sess-{i}")).collect();
    assert_eq!(sessions, want, "oldest first");
    // The USER_END whose duration is not a number is kept raw, with the reason.
    let raw = &records[30];
    assert_eq!(raw["event_type"], "raw_mist_webhook");
    assert!(
        raw["data"]["raw_mist_webhook"]["parse_error"]
            .as_str()
            .unwrap()
            .contains("duration")
    );
    assert_eq!(status(&agent)["forwarded"], 31);
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `keel` with `args`; returns it once a stderr line contains `ready`, with the lines
/// printed until then.
fn keel(args: &[&str], ready: &str) -> (Process, String) {
    let mut child = Process(
        Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let started = Instant::now();
    let mut printed = String::new();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("keel {args:?} exited before saying {ready:?}: {printed}"))
            .unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if line.contains(ready) {
            std::thread::spawn(move || for _ in lines {});
            return (child, printed);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "keel {args:?} is slow to start"
        );
    }
}

/// The address printed after `prefix` (e.g. `Decklog on http://`).
fn address_after(printed: &str, prefix: &str) -> String {
    printed
        .lines()
        .find_map(|line| line.split_once(prefix).map(|(_, rest)| rest))
        .and_then(|rest| rest.split([',', ' ', '/']).next())
        .unwrap_or_else(|| panic!("no {prefix:?} in {printed:?}"))
        .to_owned()
}

fn start_adapter(decklog: &str, wal: &Path, port: u16) -> Process {
    let port = port.to_string();
    keel(
        &[
            "helmsman",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--decklog",
            decklog,
            "--token",
            TENANT_TOKEN,
            "--node-id",
            "edge-kill",
            "--wal",
            wal.to_str().unwrap(),
        ],
        "Helmsman adapter on",
    )
    .0
}

/// SIGKILL the adapter (a separate `keel helmsman` process) three times while a client posts
/// USER_END webhooks; restart it each time on the same log. Every trigger Mist got a 200 for
/// reaches the broker exactly once (through a separate `keel decklog`), whatever the kill
/// interrupted.
#[test]
fn adapter_killed_mid_stream_loses_and_doubles_nothing() {
    let brokers = broker();
    let topic = fresh_topic(&brokers, "helmsman_kill", 2);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keel.toml");
    std::fs::write(
        &config,
        format!(
            "[[api.tokens]]\nname = \"helmsman\"\ntoken = \"{TENANT_TOKEN}\"\ntenant_id = \"{TENANT}\"\n"
        ),
    )
    .unwrap();
    let (_decklog, line) = keel(
        &[
            "decklog",
            "--listen",
            "127.0.0.1:0",
            "--kafka",
            &format!("kafka://{brokers}/{topic}"),
            "--config",
            config.to_str().unwrap(),
            "--insecure-plaintext",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        "Decklog metrics on",
    );
    let decklog = format!("http://{}", address_after(&line, "Decklog on http://"));
    let decklog_metrics = format!(
        "http://{}/metrics",
        address_after(&line, "metrics on http://")
    );
    let wal = dir.path().join("wal");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut adapter = start_adapter(&decklog, &wal, port);
    let webhook = format!("http://127.0.0.1:{port}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let posted = Arc::new(std::sync::Mutex::new(Vec::<(String, bool)>::new()));
    let poster = {
        let (posted, agent, webhook) = (posted.clone(), agent.clone(), webhook.clone());
        std::thread::spawn(move || {
            for i in 0..1500 {
                let body = format!(
                    "kill-{i}\nlive+demo\nHLS\n198.51.100.7\n{}\n10\n20\n",
                    i % 90
                );
                let ok = agent
                    .post(&format!("{webhook}/USER_END"))
                    .send(&body)
                    .is_ok_and(|r| r.status() == 200);
                posted.lock().unwrap().push((body, ok));
                if !ok {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        })
    };
    let mut rng = 0x9e37_79b9_u64;
    for _ in 0..3 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(300 + rng % 700));
        adapter.0.kill().unwrap();
        adapter.0.wait().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        adapter = start_adapter(&decklog, &wal, port);
    }
    poster.join().unwrap();
    let posted = posted.lock().unwrap().clone();
    let acknowledged: Vec<&String> = posted
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(b, _)| b)
        .collect();
    assert!(
        acknowledged.len() > 500,
        "only {} acknowledged",
        acknowledged.len()
    );
    let started = Instant::now();
    loop {
        let status: serde_json::Value = agent
            .get(&format!("{webhook}/status"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .map(|text| serde_json::from_str(&text).unwrap())
            .unwrap();
        if status["pending"] == 0 {
            assert_eq!(status["dead"], 0, "{status}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{status}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let messages = consume(
        &brokers,
        &topic,
        acknowledged.len(),
        Duration::from_secs(60),
    );
    // Each posted body is one viewer's end (its session id is unique): count records per session.
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut keys = std::collections::HashSet::new();
    for message in &messages {
        let value: serde_json::Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
        let session = value["data"]["viewer_disconnect"]["session_id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            keys.insert(message.key().unwrap().to_vec()),
            "an event id written twice"
        );
        *seen.entry(session).or_default() += 1;
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "written twice: {doubled:?}");
    // Decklog's own counters agree: every record written once, and what the adapter resent
    // after a kill was recognised.
    let text = |url: &str| -> String {
        agent
            .get(url)
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    };
    let metrics = text(&decklog_metrics);
    assert!(
        metrics.contains(&format!(
            "keel_decklog_events_total{{outcome=\"delivered\"}} {}",
            messages.len()
        )),
        "{} records in the topic; {metrics}",
        messages.len()
    );
    let adapter_metrics = text(&format!("{webhook}/metrics"));
    assert!(
        adapter_metrics.contains("keel_helmsman_pending 0"),
        "{adapter_metrics}"
    );
    for body in &acknowledged {
        let session = body.lines().next().unwrap();
        assert_eq!(
            seen.get(session),
            Some(&1),
            "acknowledged trigger lost: {body:?}"
        );
    }
}
