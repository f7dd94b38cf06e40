//! Foghorn over real sockets: the engine keeps node loads from `node_lifecycle_update` records,
//! the MistServer-compatible surface, the JSON route API and gRPC answer from them, and every
//! decision comes back through the engine as a pending viewer (the feedback loop).

use keel_operators::time::now_ms;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel::engine::{self, EngineOptions, Handles};
use keel::foghorn::FoghornServer;
use keel_api::auth::{Auth, Claims};
use keel_api::foghorn_grpc::{RouteRequest, RouteResponse, call_route};
use keel_operators::time::format_rfc3339;
use keel_sinks::hub::RowFilter;
use keel_sources::memory::{MemorySender, MemorySource, OwnedRecord};
use serde_json::{Value, json};

const SECRET: &str = "a-foghorn-test-secret";
/// A token year far ahead (seconds).
const FAR: i64 = 4_102_444_800;

fn token(claims: &Claims) -> String {
    Auth::new(Some(SECRET.into()), Vec::new())
        .unwrap()
        .issue(claims)
        .unwrap()
}

const TENANT: &str = "7e1a0b0c-aaaa-4bbb-8ccc-000000000001";

/// One node as its poller reports it.
#[derive(Clone)]
struct Node {
    id: &'static str,
    lat: f64,
    lon: f64,
    cpu_tenths: u32,
    up_speed: u64,
    bw_limit: u64,
    mode: &'static str,
    /// `(stream, viewers, inputs, per-viewer bandwidth)`.
    streams: Vec<(&'static str, u64, u64, u64)>,
    age_ms: i64,
}

impl Node {
    fn new(id: &'static str, lat: f64, lon: f64) -> Node {
        Node {
            id,
            lat,
            lon,
            cpu_tenths: 200,
            up_speed: 0,
            bw_limit: 10_000_000,
            mode: "NODE_OPERATIONAL_MODE_NORMAL",
            streams: Vec::new(),
            age_ms: 0,
        }
    }

    fn host(&self) -> String {
        format!("{}.edge.example", self.id)
    }

    fn record(&self, time: i64) -> OwnedRecord {
        let streams: serde_json::Map<String, Value> = self
            .streams
            .iter()
            .map(|(name, viewers, inputs, bw)| {
                (
                    format!("live+{name}"),
                    json!({"total": viewers.to_string(), "inputs": inputs, "bandwidth": bw.to_string(),
                           "bytes_up": "1000", "bytes_down": "10", "replicated": *inputs == 0}),
                )
            })
            .collect();
        let time = time - self.age_ms;
        let value = json!({
            "event_id": uuid::Uuid::new_v4().to_string(),
            "event_type": "node_lifecycle_update",
            "timestamp": format_rfc3339(time),
            "tenant_id": TENANT,
            "schema_version": 2,
            "data": {
                "trigger_type": "NODE_LIFECYCLE_UPDATE",
                "node_id": self.id,
                "timestamp": time.to_string(),
                "tenant_id": TENANT,
                "node_lifecycle_update": {
                    "node_id": self.id,
                    "cpu_tenths": self.cpu_tenths,
                    "ram_max": "16000000000",
                    "ram_current": "4000000000",
                    "up_speed": self.up_speed.to_string(),
                    "down_speed": "1000",
                    "bw_limit": self.bw_limit.to_string(),
                    "latitude": self.lat,
                    "longitude": self.lon,
                    "base_url": format!("https://{}:443", self.host()),
                    "is_healthy": true,
                    "operational_mode": self.mode,
                    "capabilities": {"edge": true, "ingest": true, "roles": ["edge"]},
                    "connections_current": self.streams.iter().map(|s| s.1).sum::<u64>(),
                    "streams": Value::Object(streams),
                }
            }
        });
        OwnedRecord {
            value: serde_json::to_vec(&value).unwrap(),
            headers: Vec::new(),
        }
    }
}

struct Fixture {
    handles: Handles,
    sender: Option<MemorySender>,
    engine: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    server: Option<FoghornServer>,
    agent: ureq::Agent,
}

impl Fixture {
    fn start(nodes: &[Node]) -> Fixture {
        Fixture::start_with(nodes, None)
    }

    fn start_with(nodes: &[Node], geoip: Option<&std::path::Path>) -> Fixture {
        let handles = Handles::default();
        let (source, sender) = MemorySource::new("memory", 1024);
        let engine_handles = handles.clone();
        let options = EngineOptions {
            batch: 64,
            ..EngineOptions::default()
        };
        let engine =
            std::thread::spawn(move || engine::run(Arc::new(source), &options, &engine_handles));
        let admins = Auth::new(Some(SECRET.into()), Vec::new()).unwrap();
        let server = FoghornServer::start(
            "127.0.0.1:0",
            Some("127.0.0.1:0"),
            geoip,
            Some(admins),
            None,
            &handles,
        )
        .unwrap();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .build()
            .into();
        let mut fixture = Fixture {
            handles,
            sender: Some(sender),
            engine: Some(engine),
            server: Some(server),
            agent,
        };
        fixture.report(nodes);
        fixture
    }

    /// Sends one poller update per node and waits until routing sees all of them.
    fn report(&mut self, nodes: &[Node]) {
        let time = now_ms();
        for node in nodes {
            self.sender
                .as_ref()
                .unwrap()
                .send(node.record(time))
                .unwrap();
        }
        self.wait("the fleet to show every update", |f| {
            let fleet = f.handles.fleet.snapshot();
            nodes.iter().all(|n| {
                fleet
                    .node(n.id)
                    .is_some_and(|load| load.seen_at == time - n.age_ms)
            })
        });
    }

    fn wait(&self, what: &str, mut ready: impl FnMut(&Fixture) -> bool) {
        let started = Instant::now();
        while !ready(self) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.as_ref().unwrap().address())
    }

    /// GET with optional headers: (status, Location, body).
    fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, Option<String>, String) {
        let mut request = self.agent.get(&self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut response = request.call().unwrap();
        let status = response.status().as_u16();
        let location = response
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response.body_mut().read_to_string().unwrap();
        (status, location, body)
    }

    /// Calls gRPC `Route` on the fixture's gRPC port.
    fn grpc(&self, request: RouteRequest) -> Result<RouteResponse, tonic::Status> {
        let url = format!(
            "http://{}",
            self.server.as_ref().unwrap().grpc_address().unwrap()
        );
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(call_route(&url, request))
    }

    fn get_json(&self, path: &str) -> (u16, Value) {
        let (status, _, body) = self.get(path, &[]);
        (
            status,
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")),
        )
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
        drop(self.sender.take());
        if let Some(engine) = self.engine.take() {
            let _ = engine.join();
        }
    }
}

/// Amsterdam and Tokyo, equally loaded; Amsterdam is the origin of `demo`.
fn two_cities() -> Vec<Node> {
    let mut ams = Node::new("edge-ams", 52.37, 4.90);
    ams.streams = vec![("demo", 3, 1, 250_000)];
    let mut tyo = Node::new("edge-tyo", 35.68, 139.69);
    tyo.streams = vec![("demo", 2, 0, 250_000)];
    vec![ams, tyo]
}

#[test]
fn viewer_routing_answers_the_nearest_host_and_redirects_with_proto() {
    let f = Fixture::start(&two_cities());
    let (status, _, body) = f.get(
        "/live+demo",
        &[("X-Latitude", "48.85"), ("X-Longitude", "2.35")],
    );
    assert_eq!((status, body.as_str()), (200, "edge-ams.edge.example"));
    let (status, _, body) = f.get("/demo?lat=37.5&lon=127.0", &[]);
    assert_eq!((status, body.as_str()), (200, "edge-tyo.edge.example"));
    // Cloudflare's headers work too.
    let (_, _, body) = f.get(
        "/demo",
        &[("CF-IPLatitude", "35.0"), ("CF-IPLongitude", "135.0")],
    );
    assert_eq!(body, "edge-tyo.edge.example");
    let (status, location, _) = f.get("/demo?proto=hls&lat=50&lon=5&quality=hd", &[]);
    assert_eq!(status, 307);
    assert_eq!(
        location.as_deref(),
        Some("hls://edge-ams.edge.example/demo?quality=hd")
    );
    // Bad coordinates and a malformed tag adjustment are refused with a reason.
    let (status, _, body) = f.get("/demo?lat=123&lon=5", &[]);
    assert_eq!(status, 400);
    assert!(body.contains("latitude 123"), "{body}");
    let (status, _, body) = f.get("/demo?lat=north&lon=5", &[]);
    assert_eq!(status, 400);
    assert!(body.contains("not a number"), "{body}");
    let (status, _, body) = f.get("/demo", &[("X-Tag-Adjust", "{\"edge\": \"lots\"}")]);
    assert_eq!(status, 400);
    assert!(body.contains("not an integer"), "{body}");
    let (status, _, _) = f.get("/demo?proto=ht%20tp", &[]);
    assert_eq!(status, 400);
    // Names from requests are never interned: routing a viewer of a stream nobody carries, or
    // with a tag nobody has, leaves no trace in the symbol table (requests come from anyone).
    let odd = format!("no-such-stream-{}", uuid::Uuid::new_v4().simple());
    let (status, _, body) = f.get(
        &format!("/{odd}?lat=48.85&lon=2.35&capability=edge"),
        &[("X-Tag-Adjust", "{\"odd-tag-x9\": 5}")],
    );
    assert_eq!((status, body.as_str()), (200, "edge-ams.edge.example"));
    let (status, _, _) = f.get(&format!("/?source={odd}x&viewers={odd}y"), &[]);
    assert_eq!(status, 200);
    for name in [
        odd.clone(),
        format!("{odd}x"),
        format!("{odd}y"),
        "odd-tag-x9".to_owned(),
    ] {
        assert!(
            keel_operators::sym::Sym::find(&name).is_none(),
            "{name} was interned"
        );
    }
}

#[test]
fn no_node_answers_the_fallback() {
    let mut down = Node::new("edge-down", 0.0, 0.0);
    down.mode = "NODE_OPERATIONAL_MODE_MAINTENANCE";
    let f = Fixture::start(&[down]);
    assert_eq!(f.get("/demo", &[]).2, "localhost");
    assert_eq!(
        f.get("/demo?fallback=backup.example", &[]).2,
        "backup.example"
    );
    let (status, json) = f.get_json("/v1/foghorn/route?stream=demo");
    assert_eq!(status, 503);
    assert_eq!(json["reason"], "maintenance");
    assert_eq!(
        json["error"],
        "all suitable nodes are in maintenance/draining"
    );
}

#[test]
fn source_selection_finds_the_origin() {
    let f = Fixture::start(&two_cities());
    // Tokyo is closer but only replicates `demo`: the origin is Amsterdam.
    let (status, _, body) = f.get("/?source=demo&lat=35&lon=135", &[]);
    assert_eq!(
        (status, body.as_str()),
        (200, "dtsc://edge-ams.edge.example:4200")
    );
    let (status, location, _) = f.get("/?source=live%2Bdemo&redirect=1", &[]);
    assert_eq!(status, 302);
    assert_eq!(
        location.as_deref(),
        Some("dtsc://edge-ams.edge.example:4200")
    );
    assert_eq!(f.get("/?source=nope", &[]).2, "dtsc://localhost:4200");
    assert_eq!(
        f.get("/?source=nope&fallback=dtsc://backup:4200", &[]).2,
        "dtsc://backup:4200"
    );
    // Redirected, a fallback must be a DTSC address: the port is no open redirect.
    let (status, location, _) = f.get("/?source=nope&redirect=1&fallback=dtsc://backup:4200", &[]);
    assert_eq!(
        (status, location.as_deref()),
        (302, Some("dtsc://backup:4200"))
    );
    let (status, location, body) = f.get(
        "/?source=nope&redirect=1&fallback=https://elsewhere.example/x",
        &[],
    );
    assert_eq!((status, location), (400, None), "{body}");
    let (status, json) = f.get_json("/v1/foghorn/route?stream=nope&purpose=source");
    assert_eq!(status, 503);
    assert_eq!(
        json["error"],
        "can't find origin for stream (not present / no active inputs)"
    );
}

#[test]
fn ingest_selection_answers_a_host_or_full() {
    let mut busy = two_cities();
    busy[0].cpu_tenths = 900;
    busy[1].cpu_tenths = 700;
    let f = Fixture::start(&busy);
    assert_eq!(f.get("/?ingest=20", &[]).2, "edge-tyo.edge.example");
    assert_eq!(f.get("/?ingest=35", &[]).2, "FULL");
    let (status, _, body) = f.get("/?ingest=lots", &[]);
    assert_eq!(status, 400);
    assert!(body.contains("CPU percentage"), "{body}");
}

#[test]
fn server_list_host_details_stream_stats_and_viewers() {
    let mut nodes = two_cities();
    let mut old = Node::new("edge-old", 40.0, -74.0);
    old.age_ms = 120_000;
    nodes.push(old);
    let mut draining = Node::new("edge-drn", 50.0, 8.0);
    draining.mode = "NODE_OPERATIONAL_MODE_DRAINING";
    nodes.push(draining);
    let f = Fixture::start(&nodes);
    let (status, list) = f.get_json("/?lstserver=1");
    assert_eq!(status, 200);
    assert_eq!(
        list,
        json!({
            "edge-ams.edge.example": "Monitored (online)",
            "edge-tyo.edge.example": "Monitored (online)",
            "edge-old.edge.example": "Offline",
            "edge-drn.edge.example": "Monitored (draining)",
        })
    );
    let (status, host) = f.get_json("/?host=edge-ams.edge.example");
    assert_eq!(status, 200);
    let ams = &host["edge-ams.edge.example"];
    assert_eq!(ams["cpu"], 20.0);
    assert_eq!(ams["ram"], 25.0);
    assert_eq!(ams["viewers"], 3);
    assert_eq!(ams["streams"], 1);
    assert_eq!(ams["bwlimit"], 10_000_000);
    assert_eq!(ams["geo"], json!({"lat": 52.37, "lon": 4.90}));
    assert_eq!(ams["tags"], json!(["edge", "ingest"]));
    assert_eq!(ams["score"], json!({"cpu": 400, "ram": 375, "bw": 1000}));
    let (_, all) = f.get_json("/?host=");
    assert_eq!(all.as_object().unwrap().len(), 4);
    let (status, _) = f.get_json("/?host=nowhere");
    assert_eq!(status, 404);
    let (status, stats) = f.get_json("/?streamstats=demo");
    assert_eq!(status, 200);
    assert_eq!(stats, json!({"demo": [5, 1_250_000, 2000, 20]}));
    assert_eq!(f.get("/?viewers=live+demo", &[]).2, "5");
    assert_eq!(f.get("/?viewers=unknown", &[]).2, "0");
    let (status, _, body) = f.get("/?addserver=x", &[]);
    assert_eq!(status, 400);
    assert!(body.contains("node_lifecycle_update"), "{body}");
    // An unknown route and a method a route does not serve say so, not an empty body.
    let (status, _, body) = f.get("/a/b", &[]);
    assert_eq!(status, 404);
    assert!(body.contains("no such route: /a/b"), "{body}");
    let mut posted = f
        .agent
        .post(&f.url("/v1/foghorn/route"))
        .send_empty()
        .unwrap();
    assert_eq!(posted.status().as_u16(), 405);
    let body = posted.body_mut().read_to_string().unwrap();
    assert!(body.contains("answers GET"), "{body}");
}

#[test]
fn weights_read_set_and_refuse_bad_json() {
    let mut nodes = two_cities();
    // Tokyo idles, Amsterdam is busy: distance decides for a Paris viewer until geo weighs 0.
    nodes[0].cpu_tenths = 800;
    nodes[1].cpu_tenths = 0;
    let f = Fixture::start(&nodes);
    let (status, weights) = f.get_json("/?weights=");
    assert_eq!(status, 200);
    assert_eq!(
        weights,
        json!({"cpu": 500, "ram": 500, "bw": 1000, "geo": 1000, "bonus": 50})
    );
    assert_eq!(
        f.get("/demo?lat=48.85&lon=2.35", &[]).2,
        "edge-ams.edge.example"
    );
    // Changing them needs an admin token: none, a tenant's or a forged one is refused and
    // changes nothing.
    let change = "/?weights=%7B%22geo%22%3A0%7D";
    let admin = format!("Bearer {}", token(&Claims::admin("ops", FAR)));
    let member = format!(
        "Bearer {}",
        token(&Claims::member("t", uuid::Uuid::nil(), FAR))
    );
    for (refused, wanted) in [
        (&[][..], 401),
        (&[("authorization", "Bearer forged")], 401),
        (&[("authorization", member.as_str())], 403),
    ] {
        let (status, _, body) = f.get(change, refused);
        assert_eq!(status, wanted, "{refused:?}: {body}");
        assert!(body.contains("needs an admin token"), "{body}");
    }
    assert_eq!(f.get_json("/?weights=").1["geo"], 1000);
    let (status, _, body) = f.get(change, &[("authorization", &admin)]);
    assert_eq!(status, 200, "{body}");
    let weights: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(weights["geo"], 0);
    assert_eq!(weights["cpu"], 500);
    assert_eq!(
        f.get("/demo?lat=48.85&lon=2.35", &[]).2,
        "edge-tyo.edge.example"
    );
    for bad in [
        "%7Bgeo%7D",
        "%7B%22geo%22%3A-1%7D",
        "%7B%22speed%22%3A1%7D",
        "%7B%22cpu%22%3A1e12%7D",
    ] {
        let (status, _, body) = f.get(&format!("/?weights={bad}"), &[("authorization", &admin)]);
        assert_eq!(status, 400, "{bad}: {body}");
    }
    assert_eq!(
        f.get_json("/?weights=").1["geo"],
        0,
        "a refused change changes nothing"
    );
}

#[test]
fn json_route_ranks_candidates_with_their_breakdown_and_grpc_agrees() {
    let f = Fixture::start(&two_cities());
    let (status, json) = f.get_json("/v1/foghorn/route?stream=demo&lat=48.85&lon=2.35&n=2");
    assert_eq!(status, 200, "{json}");
    let candidates = json["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 2);
    assert_eq!(candidates[0]["node_id"], "edge-ams");
    assert_eq!(candidates[1]["node_id"], "edge-tyo");
    for c in candidates {
        let b = &c["breakdown"];
        let sum: i64 = ["cpu", "ram", "bw", "geo", "bonus", "tags"]
            .iter()
            .map(|k| b[k].as_i64().unwrap())
            .sum();
        assert_eq!(c["score"].as_i64().unwrap(), sum, "{c}");
        assert_eq!(b["bonus"], 50);
    }
    assert!(candidates[0]["distance_km"].as_f64().unwrap() < 500.0);
    // Tag adjustments show in the breakdown: no node has `gpu`, so `-gpu` applies to both.
    let (_, adjusted) = f.get_json(
        "/v1/foghorn/route?stream=demo&lat=48.85&lon=2.35&tag_adjust=%7B%22-gpu%22%3A-100%7D",
    );
    assert_eq!(adjusted["candidates"][0]["breakdown"]["tags"], -100);
    for bad in [
        "n=0",
        "n=65",
        "n=x",
        "lat=1",
        "purpose=teleport",
        "purpose=source",
        "tag_adjust=%5B%5D",
    ] {
        let (status, json) = f.get_json(&format!("/v1/foghorn/route?{bad}"));
        assert_eq!(status, 400, "{bad}: {json}");
        assert!(
            json["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{json}"
        );
    }

    let response = f
        .grpc(RouteRequest {
            stream: "demo".into(),
            latitude: Some(48.85),
            longitude: Some(2.35),
            n: 2,
            ..RouteRequest::default()
        })
        .unwrap();
    assert_eq!(response.candidates.len(), 2);
    assert_eq!(response.candidates[0].node_id, "edge-ams");
    assert_eq!(response.candidates[0].host, "edge-ams.edge.example");
    // Both fronts score alike (the decisions recorded in between may have added a penalty,
    // which only lowers the bandwidth term).
    let grpc_b = response.candidates[0].breakdown.unwrap();
    assert_eq!(
        grpc_b.geo,
        candidates[0]["breakdown"]["geo"].as_u64().unwrap()
    );
    assert_eq!(
        grpc_b.cpu,
        candidates[0]["breakdown"]["cpu"].as_u64().unwrap()
    );
    let refused = f
        .grpc(RouteRequest {
            latitude: Some(100.0),
            longitude: Some(0.0),
            ..RouteRequest::default()
        })
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("latitude"),
        "{}",
        refused.message()
    );
}

#[test]
fn decisions_feed_back_as_pending_viewers_and_move_later_viewers() {
    // Two identical nodes in the same city: ties go to the lower id until its penalty grows.
    let mut a = Node::new("edge-a", 52.0, 5.0);
    a.streams = vec![("demo", 1, 1, 1_000_000)];
    let mut b = Node::new("edge-b", 52.0, 5.0);
    b.streams = vec![("demo", 1, 1, 1_000_000)];
    let f = Fixture::start(&[a, b]);
    // Probes (`HEAD`) and names no event ever carried are answered but make no decision:
    // neither moves a node's pending load nor counts in routing_hourly below.
    for _ in 0..3 {
        for path in [
            "/demo?lat=52&lon=5",
            "/?lat=52&lon=5",
            "/?source=demo&lat=52&lon=5",
            "/v1/foghorn/route?stream=demo&lat=52&lon=5",
        ] {
            let probe = f.agent.head(&f.url(path)).call().unwrap();
            assert_eq!(probe.status().as_u16(), 200, "{path}");
        }
        assert_eq!(f.get("/favicon.ico?lat=52&lon=5", &[]).0, 200);
    }
    assert_eq!(f.get("/demo?lat=52&lon=5", &[]).2, "edge-a.edge.example");
    // The decision travels through the engine and comes back as a pending viewer on edge-a.
    f.wait("edge-a's pending viewer", |f| {
        f.handles
            .fleet
            .snapshot()
            .node("edge-a")
            .is_some_and(|n| n.pending_viewers == 1 && n.add_bandwidth == 1_000_000)
    });
    let (_, host) = f.get_json("/?host=edge-a.edge.example");
    assert_eq!(host["edge-a.edge.example"]["up_add"], 1_000_000);
    assert_eq!(host["edge-a.edge.example"]["score"]["bw"], 900);
    // Now edge-b scores higher; after it takes one as well, edge-a is first again.
    assert_eq!(f.get("/demo?lat=52&lon=5", &[]).2, "edge-b.edge.example");
    f.wait("edge-b's pending viewer", |f| {
        f.handles
            .fleet
            .snapshot()
            .node("edge-b")
            .is_some_and(|n| n.pending_viewers == 1)
    });
    assert_eq!(f.get("/demo?lat=52&lon=5", &[]).2, "edge-a.edge.example");
    // The decisions are rows of routing_hourly too.
    f.wait("routing_hourly to count three decisions", |f| {
        let filter = RowFilter {
            tenant: Some(TENANT.to_owned()),
            equals: Vec::new(),
        };
        let tables = f.handles.tables.read().unwrap();
        let rows = tables.rows_json("routing_hourly", &filter).unwrap();
        rows.iter()
            .map(|r| r["decisions"].as_u64().unwrap_or(0))
            .sum::<u64>()
            == 3
    });
}

/// A MaxMind DB file, written from the format's specification: an IPv4 search tree with 24-bit
/// records that leads one /24 network to a record `{"location": {"latitude", "longitude"}}`,
/// then the metadata map.
fn mmdb_one_network(net: [u8; 3], latitude: f64, longitude: f64) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.push(0x40 | s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }
    fn double(out: &mut Vec<u8>, v: f64) {
        out.push(0x68);
        out.extend_from_slice(&v.to_be_bytes());
    }
    fn uint16(out: &mut Vec<u8>, v: u16) {
        out.push(0xa2);
        out.extend_from_slice(&v.to_be_bytes());
    }
    fn uint32(out: &mut Vec<u8>, v: u32) {
        out.push(0xc4);
        out.extend_from_slice(&v.to_be_bytes());
    }
    let node_count: u32 = 24;
    let mut out = Vec::new();
    for depth in 0..24usize {
        let bit = (net[depth / 8] >> (7 - depth % 8)) & 1;
        // The last bit of the network leads to the data section's first record.
        let next = if depth == 23 {
            node_count + 16
        } else {
            depth as u32 + 1
        };
        let (left, right) = if bit == 0 {
            (next, node_count)
        } else {
            (node_count, next)
        };
        for record in [left, right] {
            out.extend_from_slice(&record.to_be_bytes()[1..]);
        }
    }
    out.extend_from_slice(&[0; 16]);
    out.push(0xe1);
    string(&mut out, "location");
    out.push(0xe2);
    string(&mut out, "latitude");
    double(&mut out, latitude);
    string(&mut out, "longitude");
    double(&mut out, longitude);
    out.extend_from_slice(b"\xab\xcd\xefMaxMind.com");
    out.push(0xe9);
    string(&mut out, "binary_format_major_version");
    uint16(&mut out, 2);
    string(&mut out, "binary_format_minor_version");
    uint16(&mut out, 0);
    string(&mut out, "build_epoch");
    out.extend_from_slice(&[0x08, 0x02]);
    out.extend_from_slice(&1_700_000_000u64.to_be_bytes());
    string(&mut out, "database_type");
    string(&mut out, "Keel-Test-City");
    string(&mut out, "description");
    out.push(0xe1);
    string(&mut out, "en");
    string(&mut out, "one network, for tests");
    string(&mut out, "ip_version");
    uint16(&mut out, 4);
    string(&mut out, "languages");
    out.extend_from_slice(&[0x01, 0x04]);
    string(&mut out, "en");
    string(&mut out, "node_count");
    uint32(&mut out, node_count);
    string(&mut out, "record_size");
    uint16(&mut out, 24);
    out
}

#[test]
fn clients_without_coordinates_are_placed_by_geoip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("city.mmdb");
    // 203.0.113.0/24 is in Seoul: Tokyo is the nearer node.
    std::fs::write(&path, mmdb_one_network([203, 0, 113], 37.56, 126.97)).unwrap();
    let mut nodes = two_cities();
    // Without a place, Amsterdam wins on load.
    nodes[1].cpu_tenths = 500;
    let f = Fixture::start_with(&nodes, Some(&path));
    assert_eq!(
        f.get("/demo", &[]).2,
        "edge-ams.edge.example",
        "loopback is not in the database"
    );
    for header in ["X-Forwarded-For", "CF-Connecting-IP", "X-Real-IP"] {
        let (_, _, body) = f.get("/demo", &[(header, "203.0.113.9")]);
        assert_eq!(body, "edge-tyo.edge.example", "{header}");
    }
    let (_, _, body) = f.get("/demo", &[("X-Forwarded-For", "203.0.113.9, 10.0.0.1")]);
    assert_eq!(body, "edge-tyo.edge.example");
    // Coordinates given win over the address.
    let (_, _, body) = f.get(
        "/demo?lat=52.37&lon=4.9",
        &[("X-Forwarded-For", "203.0.113.9")],
    );
    assert_eq!(body, "edge-ams.edge.example");
    let (_, json) = f.get_json("/v1/foghorn/route?stream=demo");
    assert!(json["client"].is_null(), "{json}");
    let response = f
        .grpc(RouteRequest {
            stream: "demo".into(),
            client_ip: "203.0.113.200".into(),
            ..RouteRequest::default()
        })
        .unwrap();
    assert_eq!(response.candidates[0].node_id, "edge-tyo");

    // A file that is not a database is refused at start, with the reason.
    let bad = dir.path().join("bad.mmdb");
    std::fs::write(&bad, b"not a database").unwrap();
    let error = FoghornServer::start(
        "127.0.0.1:0",
        None,
        Some(&bad),
        None,
        None,
        &Handles::default(),
    )
    .expect_err("refused")
    .to_string();
    assert!(
        error.contains("cannot use") && error.contains("bad.mmdb"),
        "{error}"
    );
}
