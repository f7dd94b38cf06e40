//! The Decklog benchmark: acknowledged events/s through Decklog into the real broker, and ack
//! latency, beside the broker's own produce rate for the same records.
//!
//! ```text
//! cargo bench --bench decklog -- [--events 1000000] [--batch 1000] [--connections 4]
//! ```
//!
//! The broker is the one at `KEEL_TEST_KAFKA` (`scripts/bench-decklog` starts tansu). In one
//! run, on fresh topics of 4 partitions, each first warmed with 20,000 untimed events:
//!
//! 1. **Ceiling**: the same version-2 records Decklog would write, produced straight to the
//!    broker with Decklog's producer settings (idempotent, `acks=all`), each acknowledged.
//! 2. **Decklog, batched**: `SendEvents` streams of `--batch` events over `--connections`
//!    connections on loopback; each call is answered once all its events are in Kafka.
//! 3. **Decklog, one event per call**: `SendEvent`, as the platform's producers call it.
//!
//! Each prints acknowledged events/s, ack latency per call p50/p99, and the CPU the whole
//! process (Decklog and load generator together) used.

mod support;

use std::time::Duration;

use keel::edge::{DecklogSettings, EdgeServer};
use keel::loadgen::{Load, Report, Target, run};
use keel_api::auth::{Auth, Role, StaticToken};
use keel_edge::handoff::Handoff;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
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

fn main() {
    let brokers = std::env::var("KEEL_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let events = arg("--events", 1_000_000);
    let batch = arg("--batch", 1000) as usize;
    let connections = arg("--connections", 4) as usize;
    let tenant = Uuid::parse_str("5eed517e-ba5e-da7a-517e-ba5eda7a0001").expect("a UUID");
    let load = |events: u64, batch: usize, seed: u64| Load {
        events,
        rate: 0.0,
        batch,
        connections,
        tenant,
        seed,
    };

    let ceiling_topic = create_topic(&brokers, "bench_ceiling");
    let decklog_topic = create_topic(&brokers, "bench_decklog");
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
            handoff: Handoff::kafka(&brokers, &decklog_topic, Duration::from_secs(30))
                .expect("a producer"),
            auth,
            metrics_listen: None,
        }),
        None,
    )
    .expect("Decklog");
    let url = format!("http://{}", server.decklog_address().expect("an address"));
    let decklog = Target::Decklog {
        url,
        token: TOKEN.into(),
        ca_pem: None,
    };

    // Warm both topics (partition leaders, producer connections) before anything is timed.
    for (target, seed) in [
        (
            Target::Kafka {
                brokers: brokers.clone(),
                topic: ceiling_topic.clone(),
            },
            10,
        ),
        (decklog.clone(), 11),
    ] {
        measured("warm-up", &target, &load(20_000, batch, seed));
    }
    let ceiling = measured(
        "broker ceiling",
        &Target::Kafka {
            brokers: brokers.clone(),
            topic: ceiling_topic,
        },
        &load(events, batch, 1),
    );
    let batched = measured("Decklog SendEvents", &decklog, &load(events, batch, 2));
    let single_events = (events / 20).max(1000);
    let single = measured("Decklog SendEvent", &decklog, &load(single_events, 1, 3));

    println!("## Decklog into the broker ({brokers}), {connections} connections");
    println!();
    println!(
        "| path | events per call | events | acknowledged events/s | ack p50 ms | ack p99 ms | CPU cores used |"
    );
    println!("|---|---|---|---|---|---|---|");
    row("broker's own produce rate (ceiling)", batch, &ceiling);
    row("Decklog `SendEvents`", batch, &batched);
    row("Decklog `SendEvent`", 1, &single);
    println!();
    println!(
        "Decklog batched reaches {:.0} % of the ceiling.",
        100.0 * batched.0.rate() / ceiling.0.rate()
    );
    let stats = server.handoff().expect("a hand-off").stats.clone();
    eprintln!(
        "decklog bench: hand-off delivered {}, duplicates {}, failed {}",
        stats.delivered.load(std::sync::atomic::Ordering::Relaxed),
        stats.duplicates.load(std::sync::atomic::Ordering::Relaxed),
        stats.failed.load(std::sync::atomic::Ordering::Relaxed)
    );
}
