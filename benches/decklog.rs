//! The Decklog benchmark: acknowledged events/s through Decklog into the real broker, and ack
//! latency, beside the broker's own produce rate for the same records.
//!
//! ```text
//! cargo bench --bench decklog -- [--events 1000000] [--batch 1000] [--connections 8] [--fresh-broker]
//! ```
//!
//! The broker is the one at `KEEL_TEST_KAFKA` (`scripts/bench-decklog` starts tansu and passes
//! `--fresh-broker`, which restarts it before each phase through `scripts/test-servers.sh`: its
//! memory storage slows as it fills). In one run, each phase on a fresh topic of 4 partitions,
//! first warmed with 20,000 untimed events:
//!
//! 1. **Ceiling**: the same version-2 records Decklog would write, made before the clock starts
//!    and produced straight to the broker by one producer with Decklog's settings (idempotent,
//!    `acks=all`), as fast as the broker acknowledges them: what the broker itself takes.
//! 2. **Hand-off alone**: the load generator making those records and handing them to
//!    Decklog's hand-off in calls of `--batch`, without gRPC: what Decklog's Kafka side costs.
//! 3. **Decklog, batched**: `SendEvents` streams of `--batch` events over `--connections`
//!    connections on loopback; each call is answered once all its events are in Kafka.
//! 4. **Decklog, one event per call**: `SendEvent`, as the platform's producers call it.
//!
//! Each prints acknowledged events/s, ack latency per call p50/p99, and the CPU the whole
//! process (Decklog and load generator together) used.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keel::edge::{DecklogSettings, EdgeServer};
use keel::loadgen::{Load, Report, Target, Triggers, run};
use keel_api::auth::{Auth, Role, StaticToken};
use keel_edge::envelope::{Caller, trigger_into_record};
use keel_edge::handoff::{Handoff, kafka_record, producer_config};
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use support::cpu_seconds;
use uuid::Uuid;

const TOKEN: &str = "kt_decklog-benchmark-token";

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} {v}: not a number"))
        })
}

fn create_topic(brokers: &str, name: &str) -> String {
    let topic = format!("{name}_{}", Uuid::new_v4().simple());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("an admin client");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let results = runtime
        .block_on(admin.create_topics(
            &[NewTopic::new(&topic, 4, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ))
        .unwrap_or_else(|e| panic!("cannot create a topic on {brokers}: {e}"));
    for result in results {
        result.unwrap_or_else(|(t, e)| panic!("cannot create topic {t}: {e}"));
    }
    topic
}

fn measured(what: &str, target: &Target, load: &Load) -> (Report, f64) {
    eprintln!("decklog bench: {what} …");
    let cpu = cpu_seconds();
    let report = run(target, load, |_| {}).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert_eq!(report.rejected, 0, "{what}: events refused");
    assert_eq!(report.acknowledged, load.events, "{what}: events missing");
    (report, cpu_seconds() - cpu)
}

/// Counts the broker's acknowledgements.
#[derive(Default)]
struct Acks {
    ok: AtomicU64,
    failed: AtomicU64,
}

#[derive(Clone, Default)]
struct Counting(Arc<Acks>);

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, (): ()) {
        let counter = if result.is_ok() {
            &self.0.ok
        } else {
            &self.0.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The broker's own rate for Decklog's records: all made first, then produced by one producer
/// with Decklog's settings, without waiting between records; timed until every one is
/// acknowledged. Returns (events/s, CPU cores used).
fn broker_ceiling(brokers: &str, topic: &str, load: &Load) -> (f64, f64) {
    eprintln!(
        "decklog bench: broker ceiling (making {} records) …",
        load.events
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_millis() as i64;
    let triggers = Triggers::new(load);
    let records: Vec<_> = (0..load.events)
        .map(|i| {
            trigger_into_record(triggers.make(i, now), Caller::Tenant(load.tenant), now)
                .expect("a valid record")
        })
        .collect();
    let context = Counting::default();
    let producer: ThreadedProducer<Counting> = producer_config(brokers, Duration::from_secs(30))
        .create_with_context(context.clone())
        .expect("a producer");
    eprintln!("decklog bench: broker ceiling …");
    let (cpu, started) = (cpu_seconds(), Instant::now());
    for record in &records {
        let mut key = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let mut message = kafka_record(topic, record, &mut key, ());
        while let Err((_, back)) = producer.send(message) {
            // The producer's queue is full: let the broker catch up.
            message = back;
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("the broker acknowledges every record");
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu;
    let acks = &context.0;
    assert_eq!(acks.failed.load(Ordering::Relaxed), 0, "records refused");
    assert_eq!(
        acks.ok.load(Ordering::Relaxed),
        load.events,
        "records missing"
    );
    (load.events as f64 / elapsed, cpu / elapsed)
}

fn row(what: &str, batch: usize, (report, cpu): &(Report, f64)) {
    println!(
        "| {what} | {batch} | {} | {:.0} | {:.2} | {:.2} | {:.2} |",
        report.acknowledged,
        report.rate(),
        report.percentile(50.0).as_secs_f64() * 1e3,
        report.percentile(99.0).as_secs_f64() * 1e3,
        cpu / report.elapsed.as_secs_f64()
    );
}

/// Restarts the broker the benchmark was started with (`scripts/test-servers.sh start kafka`
/// stops it first), so the next phase writes into an empty broker: tansu's memory storage slows
/// as it fills, and a phase run after millions of stored records would measure that instead.
fn fresh_broker() {
    eprintln!("decklog bench: restarting the broker …");
    let status = std::process::Command::new("scripts/test-servers.sh")
        .args(["start", "kafka"])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("scripts/test-servers.sh runs");
    assert!(status.success(), "the broker did not restart: {status}");
}

/// A Decklog server handing off to `topic`, and the load generator's target for it.
fn decklog(brokers: &str, topic: &str, tenant: Uuid) -> (EdgeServer, Target) {
    let auth = Auth::new(
        None,
        vec![StaticToken {
            name: "bench".into(),
            token: TOKEN.into(),
            tenant_id: Some(tenant),
            role: Role::Member,
        }],
    )
    .expect("auth");
    let server = EdgeServer::start(
        Some(DecklogSettings {
            listen: "127.0.0.1:0".into(),
            tls: None,
            handoff: Handoff::kafka(brokers, topic, Duration::from_secs(30)).expect("a producer"),
            auth,
            metrics_listen: None,
        }),
        None,
    )
    .expect("Decklog");
    let url = format!("http://{}", server.decklog_address().expect("an address"));
    let target = Target::Decklog {
        url,
        token: TOKEN.into(),
        ca_pem: None,
    };
    (server, target)
}

fn main() {
    let brokers = std::env::var("KEEL_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let events = arg("--events", 1_000_000);
    let batch = arg("--batch", 1000) as usize;
    let connections = arg("--connections", 8) as usize;
    // Set by scripts/bench-decklog, which started the broker through scripts/test-servers.sh.
    let fresh = std::env::args().any(|a| a == "--fresh-broker");
    let tenant = Uuid::parse_str("5eed517e-ba5e-da7a-517e-ba5eda7a0001").expect("a UUID");
    let load = |events: u64, batch: usize, seed: u64| Load {
        events,
        rate: 0.0,
        batch,
        connections,
        tenant,
        seed,
    };
    // Every phase writes to a topic of its own, warmed with 20,000 untimed events first
    // (partition leaders, producer connections); with --fresh-broker, on a broker of its own.
    let prepare = |name: &str| {
        if fresh {
            fresh_broker();
        }
        create_topic(&brokers, name)
    };
    let warm = |target: &Target| {
        measured("warm-up", target, &load(20_000, batch, 10));
    };
    let kafka = |topic: String| Target::Kafka {
        brokers: brokers.clone(),
        topic,
    };

    let topic = prepare("bench_ceiling");
    warm(&kafka(topic.clone()));
    let ceiling = broker_ceiling(&brokers, &topic, &load(events, batch, 4));

    let topic = prepare("bench_handoff");
    warm(&kafka(topic.clone()));
    let handoff_alone = measured("hand-off alone", &kafka(topic), &load(events, batch, 1));

    let (mut delivered, mut duplicates, mut failed) = (0, 0, 0);
    let mut through_decklog = |what: &str, name: &str, load: Load| {
        let topic = prepare(name);
        let (server, target) = decklog(&brokers, &topic, tenant);
        warm(&target);
        let result = measured(what, &target, &load);
        let stats = &server.handoff().expect("a hand-off").stats;
        delivered += stats.delivered.load(Ordering::Relaxed);
        duplicates += stats.duplicates.load(Ordering::Relaxed);
        failed += stats.failed.load(Ordering::Relaxed);
        result
    };
    let batched = through_decklog(
        "Decklog SendEvents",
        "bench_batched",
        load(events, batch, 2),
    );
    let single_events = (events / 20).max(1000);
    let single = through_decklog(
        "Decklog SendEvent",
        "bench_single",
        load(single_events, 1, 3),
    );

    println!("## Decklog into the broker ({brokers}), {connections} connections");
    println!();
    if fresh {
        println!("Each row on a freshly started broker.");
        println!();
    }
    println!(
        "| path | events per call | events | acknowledged events/s | ack p50 ms | ack p99 ms | CPU cores used |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| broker's own produce rate (ceiling): one producer, records made beforehand | – | {events} | {:.0} | – | – | {:.2} |",
        ceiling.0, ceiling.1
    );
    row("Decklog's hand-off alone (no gRPC)", batch, &handoff_alone);
    row("Decklog `SendEvents`", batch, &batched);
    row("Decklog `SendEvent`", 1, &single);
    println!();
    println!(
        "Decklog batched reaches {:.0} % of the ceiling.",
        100.0 * batched.0.rate() / ceiling.0
    );
    eprintln!(
        "decklog bench: hand-off delivered {delivered}, duplicates {duplicates}, failed {failed}"
    );
}
