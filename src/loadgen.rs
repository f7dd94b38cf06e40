//! `keel loadgen`: drives Decklog (or the Helmsman adapter, or Kafka itself for the ceiling)
//! with generated viewer triggers at a set rate and reports acknowledged events/s and ack
//! latency.

use keel_operators::time::now_ms;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use keel_edge::client::DecklogClient;
use keel_edge::envelope::{Caller, Outgoing, trigger_into_record};
use keel_edge::handoff::Handoff;
use keel_edge::proto::{MistTrigger, Payload, ViewerConnectTrigger, ViewerDisconnectTrigger};
use uuid::Uuid;

/// Where the load goes.
#[derive(Clone, Debug)]
pub enum Target {
    /// Decklog's gRPC (`SendEvents` batches, or `SendEvent` with a batch of 1).
    Decklog {
        /// URL.
        url: String,
        /// Bearer token.
        token: String,
        /// Certificate authority for `https`.
        ca_pem: Option<Vec<u8>>,
    },
    /// The Helmsman adapter's webhook endpoint.
    Webhook(String),
    /// Straight to Kafka with Decklog's producer settings: the ceiling Decklog works under.
    Kafka {
        /// Brokers.
        brokers: String,
        /// Topic.
        topic: String,
    },
}

/// The run's shape.
#[derive(Clone, Debug)]
pub struct Load {
    /// Events in all.
    pub events: u64,
    /// Events per second in all; 0 for as fast as acknowledged.
    pub rate: f64,
    /// Events per call.
    pub batch: usize,
    /// Concurrent connections.
    pub connections: usize,
    /// Tenant named in every event.
    pub tenant: Uuid,
    /// Seed of the generated ids (a different seed makes different events).
    pub seed: u64,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Events acknowledged.
    pub acknowledged: u64,
    /// Events refused.
    pub rejected: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Ack latency per call (per post for webhooks), sorted.
    pub latencies: Vec<Duration>,
}

impl Report {
    /// Acknowledged events per second.
    pub fn rate(&self) -> f64 {
        self.acknowledged as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `p`-th latency percentile.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * p / 100.0).round() as usize;
        self.latencies[i]
    }
}

const STREAMS: u64 = 50;
const NODES: u64 = 20;

/// Makes a run's triggers, with the names they repeat (streams, nodes, the tenant) formatted
/// once: the generator shares the machine with what it measures.
#[derive(Clone, Debug)]
pub struct Triggers {
    seed: u64,
    tenant: String,
    streams: Vec<String>,
    nodes: Vec<String>,
}

impl Triggers {
    /// The generator of `load`'s triggers.
    pub fn new(load: &Load) -> Self {
        Triggers {
            seed: load.seed,
            tenant: load.tenant.to_string(),
            streams: (0..STREAMS).map(|s| format!("live+load{s}")).collect(),
            nodes: (0..NODES).map(|n| format!("edge-{n}")).collect(),
        }
    }

    /// Event `i`: a viewer connecting (even) or leaving (odd).
    pub fn make(&self, i: u64, now_ms: i64) -> MistTrigger {
        let session = i / 2;
        let stream = self.streams[(session % STREAMS) as usize].clone();
        let node = &self.nodes[(session % NODES) as usize];
        let session_id = format!("s{}-{session}", self.seed);
        let connect = i.is_multiple_of(2);
        let payload = if connect {
            Payload::ViewerConnect(ViewerConnectTrigger {
                stream_name: stream,
                host: "192.0.2.1".to_owned(),
                connector: "HLS".to_owned(),
                session_id,
                node_id: Some(node.clone()),
                client_country: "NL".to_owned(),
                ..ViewerConnectTrigger::default()
            })
        } else {
            Payload::ViewerDisconnect(ViewerDisconnectTrigger {
                session_id,
                stream_name: stream,
                connector: "HLS".to_owned(),
                duration: 30,
                down_bytes: 1_500_000,
                up_bytes: 2_000,
                node_id: node.clone(),
                country_code: "NL".to_owned(),
                ..ViewerDisconnectTrigger::default()
            })
        };
        MistTrigger {
            trigger_type: if connect { "USER_NEW" } else { "USER_END" }.to_owned(),
            node_id: node.clone(),
            timestamp: now_ms,
            request_id: format!("loadgen-{}-{i}", self.seed),
            tenant_id: Some(self.tenant.clone()),
            payload: Some(payload),
            schema_version: 2,
            ..MistTrigger::default()
        }
    }
}

/// Mist's webhook body for a trigger made by [`Triggers::make`].
fn webhook_body(trigger: &MistTrigger) -> String {
    match &trigger.payload {
        Some(Payload::ViewerConnect(c)) => format!(
            "{}\n{}\n1\n{}\nhttp://edge/{}.m3u8\n{}",
            c.stream_name, c.host, c.connector, c.stream_name, c.session_id
        ),
        Some(Payload::ViewerDisconnect(d)) => format!(
            "{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
            d.session_id,
            d.stream_name,
            d.connector,
            "192.0.2.1",
            d.duration,
            d.up_bytes,
            d.down_bytes
        ),
        _ => String::new(),
    }
}

/// Runs the load; `progress` is called about once a second with events acknowledged so far.
pub fn run(target: &Target, load: &Load, mut progress: impl FnMut(u64)) -> anyhow::Result<Report> {
    anyhow::ensure!(
        load.batch >= 1 && load.connections >= 1,
        "--batch and --connections must be at least 1"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let next = Arc::new(AtomicU64::new(0));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let per_connection = if load.rate > 0.0 {
        Some(load.rate / load.connections as f64)
    } else {
        None
    };
    let handoff = match target {
        Target::Kafka { brokers, topic } => Some(
            Handoff::kafka(brokers, topic, Duration::from_secs(30)).map_err(anyhow::Error::msg)?,
        ),
        _ => None,
    };
    let mut tasks = Vec::new();
    for _ in 0..load.connections {
        let (target, load) = (target.clone(), load.clone());
        let (next, acknowledged, rejected, handoff) = (
            next.clone(),
            acknowledged.clone(),
            rejected.clone(),
            handoff.clone(),
        );
        tasks.push(runtime.spawn(async move {
            let mut latencies = Vec::new();
            let mut client = match &target {
                Target::Decklog { url, token, ca_pem } => Some(
                    DecklogClient::connect(url, token, ca_pem.as_deref())
                        .await
                        .map_err(anyhow::Error::msg)?,
                ),
                _ => None,
            };
            let http = webhook_agent();
            let made = Triggers::new(&load);
            let begun = Instant::now();
            let mut sent = 0u64;
            loop {
                let first = next.fetch_add(load.batch as u64, Ordering::Relaxed);
                if first >= load.events {
                    break;
                }
                let last = (first + load.batch as u64).min(load.events);
                if let Some(rate) = per_connection {
                    let due = Duration::from_secs_f64(sent as f64 / rate);
                    if let Some(wait) = due.checked_sub(begun.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                let now = now_ms();
                let triggers: Vec<MistTrigger> = (first..last).map(|i| made.make(i, now)).collect();
                let n = triggers.len() as u64;
                sent += n;
                let call = Instant::now();
                let (ok, bad) = match (&target, client.as_mut()) {
                    (Target::Decklog { .. }, Some(client)) if load.batch == 1 => {
                        match client
                            .send_event(triggers.into_iter().next().unwrap_or_default())
                            .await
                        {
                            Ok(()) => (1, 0),
                            Err(status) => anyhow::bail!("Decklog: {}", status.message()),
                        }
                    }
                    (Target::Decklog { .. }, Some(client)) => {
                        let answer = client
                            .send_events(triggers)
                            .await
                            .map_err(|s| anyhow::anyhow!("Decklog: {}", s.message()))?;
                        (u64::from(answer.accepted), answer.rejected.len() as u64)
                    }
                    (Target::Webhook(url), _) => {
                        // One webhook per event: each post is a call of its own.
                        let (url, agent) = (url.clone(), http.clone());
                        let (ok, posts) = tokio::task::spawn_blocking(move || {
                            let mut ok = 0;
                            let mut posts = Vec::with_capacity(triggers.len());
                            for trigger in &triggers {
                                let post = Instant::now();
                                let response = agent
                                    .post(&format!("{url}/{}", trigger.trigger_type))
                                    .send(webhook_body(trigger));
                                if response.is_ok_and(|r| r.status().is_success()) {
                                    ok += 1;
                                }
                                posts.push(post.elapsed());
                            }
                            (ok, posts)
                        })
                        .await?;
                        latencies.extend(posts);
                        acknowledged.fetch_add(ok, Ordering::Relaxed);
                        rejected.fetch_add(n - ok, Ordering::Relaxed);
                        continue;
                    }
                    (Target::Kafka { .. }, _) => {
                        let handoff = handoff.as_ref().context("no producer")?;
                        let records: Vec<Outgoing> = triggers
                            .into_iter()
                            .filter_map(|t| {
                                trigger_into_record(t, Caller::Tenant(load.tenant), now).ok()
                            })
                            .collect();
                        let results = handoff.deliver(records).await;
                        let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
                        (ok, n - ok)
                    }
                    (Target::Decklog { .. }, None) => anyhow::bail!("not connected"),
                };
                latencies.push(call.elapsed());
                acknowledged.fetch_add(ok, Ordering::Relaxed);
                rejected.fetch_add(bad, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut shown = Instant::now();
    while tasks.iter().any(|t| !t.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        if shown.elapsed() >= Duration::from_secs(1) {
            shown = Instant::now();
            progress(acknowledged.load(Ordering::Relaxed));
        }
    }
    let elapsed = started.elapsed();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(runtime.block_on(task)??);
    }
    latencies.sort();
    Ok(Report {
        acknowledged: acknowledged.load(Ordering::Relaxed),
        rejected: rejected.load(Ordering::Relaxed),
        elapsed,
        latencies,
    })
}

fn webhook_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}
