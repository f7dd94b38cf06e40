//! The harness the live-API tests share: a simulated fleet, and an engine fed in memory with
//! the API on loopback ports.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use keel::engine::{self, EngineOptions, Handles};
use keel::serve::Api;
use keel_api::auth::{Auth, Claims, Role, StaticToken};
use keel_api::server::Limits;
use keel_sinks::hub::RowFilter;
use keel_sinks::live::LiveTables;
use keel_sources::codec::{TimeBounds, decode_checked};
use keel_sources::memory::{MemorySender, MemorySource, OwnedRecord};
use keel_sources::record::Position;
use keel_sources::simulate::{SimConfig, Simulator};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "a-live-test-secret-of-some-length";
pub const FAR: i64 = 4_102_444_800;
pub const STATIC_TOKEN: &str = "kt_live_static_token_for_tenant_two";

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Simulated records and what the tests need to know about them.
pub struct Fleet {
    pub records: Vec<OwnedRecord>,
    pub tenants: Vec<String>,
    /// Every client address that appears anywhere in the records.
    pub hosts: HashSet<String>,
}

pub fn fleet(seed: u64, n: usize) -> Fleet {
    let mut sim = Simulator::new(SimConfig {
        seed,
        tenants: 3,
        nodes: 6,
        streams: 12,
        arrivals_per_second: 40.0,
        ..SimConfig::default()
    });
    let tenants = sim.tenants();
    let mut records = Vec::with_capacity(n);
    let mut hosts = HashSet::new();
    let mut out = Vec::new();
    for _ in 0..n {
        out.clear();
        let meta = sim.next_record(&mut out);
        if let Ok(value) = serde_json::from_slice::<Value>(&out) {
            collect_hosts(&value, &mut hosts);
        }
        let mut headers = Vec::new();
        if !meta.tenant_id.is_empty() {
            headers.push(("tenant_id".to_owned(), meta.tenant_id.clone()));
        }
        records.push(OwnedRecord {
            value: out.clone(),
            headers,
        });
    }
    assert!(
        n < 1000 || hosts.len() > 10,
        "the fleet has viewers with addresses"
    );
    Fleet {
        records,
        tenants,
        hosts,
    }
}

pub fn collect_hosts(value: &Value, hosts: &mut HashSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                if matches!(key.as_str(), "host" | "client_ip" | "connection_addr")
                    && let Some(text) = v.as_str()
                    && !text.is_empty()
                {
                    hosts.insert(text.to_owned());
                }
                collect_hosts(v, hosts);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_hosts(v, hosts)),
        _ => {}
    }
}

/// How many records of `tenant` the engine accepts as events, decoded as it decodes them.
pub fn accepted_for(records: &[OwnedRecord], tenant: &str) -> usize {
    records
        .iter()
        .enumerate()
        .filter(|(seq, r)| {
            let record = r.at(Position::Simulated { seq: *seq as u64 });
            decode_checked(&record, &TimeBounds::default(), i64::MAX / 4)
                .is_ok_and(|e| e.tenant.to_string() == tenant)
        })
        .count()
}

/// An engine reading from memory, with the API on a loopback port.
pub struct Live {
    pub handles: Handles,
    pub api: Option<Api>,
    pub sender: Option<MemorySender>,
    pub engine: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    pub auth: Auth,
}

impl Live {
    pub fn start(limits: Limits, second_tenant: &str) -> Live {
        let handles = Handles::default();
        let (source, sender) = MemorySource::new("memory", 1024);
        let tokens = vec![StaticToken {
            name: "dashboard-two".into(),
            token: STATIC_TOKEN.into(),
            tenant_id: Some(second_tenant.parse().unwrap()),
            role: Role::Member,
        }];
        let auth = Auth::new(Some(SECRET.into()), tokens).unwrap();
        let api = Api::start(
            "127.0.0.1:0",
            Some("127.0.0.1:0"),
            auth.clone(),
            limits,
            &handles,
        )
        .unwrap();
        let engine_handles = handles.clone();
        let options = EngineOptions {
            // Small epochs, so that changes arrive as many updates.
            batch: 64,
            ..EngineOptions::default()
        };
        let engine =
            std::thread::spawn(move || engine::run(Arc::new(source), &options, &engine_handles));
        Live {
            handles,
            api: Some(api),
            sender: Some(sender),
            engine: Some(engine),
            auth,
        }
    }

    pub fn host(&self) -> String {
        self.api.as_ref().unwrap().address().to_string()
    }

    pub fn member(&self, tenant: &str) -> String {
        self.member_until(tenant, FAR)
    }

    /// A member token of `tenant` that expires at `exp` (seconds since the epoch).
    pub fn member_until(&self, tenant: &str, exp: i64) -> String {
        self.auth
            .issue(&Claims::member("viewer", tenant.parse().unwrap(), exp))
            .unwrap()
    }

    /// The rows of `table` that `tenant` owns, as the API renders them.
    pub fn rows(&self, table: &str, tenant: &str) -> Vec<Value> {
        tenant_rows(&self.handles.tables, table, tenant)
    }

    pub fn admin(&self) -> String {
        self.auth.issue(&Claims::admin("ops", FAR)).unwrap()
    }

    /// Feeds `records` from another thread (the sender blocks when the engine is behind).
    pub async fn feed(&self, records: &[OwnedRecord]) {
        let sender = self.sender.clone().unwrap();
        let records = records.to_vec();
        tokio::task::spawn_blocking(move || {
            for record in records {
                sender.send(record).unwrap();
            }
        })
        .await
        .unwrap();
    }

    /// Ends the input and waits for the engine to publish its last epoch.
    pub async fn finish(&mut self) {
        drop(self.sender.take());
        let engine = self.engine.take().unwrap();
        tokio::task::spawn_blocking(move || engine.join().unwrap().unwrap())
            .await
            .unwrap();
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        drop(self.sender.take());
        if let Some(api) = self.api.take() {
            api.stop();
        }
    }
}

/// Limits with queues long enough that readers in a test never lag.
pub fn roomy() -> Limits {
    Limits {
        queue: 1 << 16,
        ..Limits::default()
    }
}

pub async fn connect(host: &str, path: &str, headers: &[(&'static str, String)]) -> Ws {
    let mut request = format!("ws://{host}{path}").into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws
}

pub async fn send(ws: &mut Ws, value: Value) {
    ws.send(Message::text(value.to_string())).await.unwrap();
}

/// The next text frame, or None after `wait` of silence or when the connection closes.
pub async fn next_text(ws: &mut Ws, wait: Duration) -> Option<String> {
    loop {
        match tokio::time::timeout(wait, ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return Some(text.to_string()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) | Err(_) => return None,
            Ok(Some(Ok(other))) => panic!("unexpected frame {other:?}"),
        }
    }
}

pub async fn next_json(ws: &mut Ws) -> Value {
    let text = next_text(ws, Duration::from_secs(10))
        .await
        .expect("an answer within 10 s");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"))
}

/// Every Signalman message until `quiet` passes without one (frames may hold several).
pub async fn drain_feed(ws: &mut Ws, quiet: Duration) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    while let Some(frame) = next_text(ws, quiet).await {
        for line in frame.split('\n') {
            out.push((line.to_owned(), serde_json::from_str(line).unwrap()));
        }
    }
    out
}

/// The rows of `table` that `tenant` owns, as the API renders them.
pub fn tenant_rows(tables: &RwLock<LiveTables>, table: &str, tenant: &str) -> Vec<Value> {
    let filter = RowFilter {
        tenant: Some(tenant.to_owned()),
        equals: Vec::new(),
    };
    tables.read().unwrap().rows_json(table, &filter).unwrap()
}

/// Rows as a multiset keyed by their JSON text.
pub fn multiset(rows: impl IntoIterator<Item = Value>) -> BTreeMap<String, i64> {
    let mut counts = BTreeMap::new();
    for row in rows {
        *counts.entry(row.to_string()).or_default() += 1;
    }
    counts
}
