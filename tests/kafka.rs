//! System tests against a real Kafka-protocol broker (tansu, started by `scripts/test-servers.sh`).
//!
//! The broker address comes from `KEEL_TEST_KAFKA` (default `127.0.0.1:19092`). A missing broker
//! fails these tests with instructions; it never skips them.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{broker, counts, fresh_topic, replay, replay_file, write_values};
use keel::engine::{self, EngineOptions, Handles};
use keel_sources::kafka::{KafkaAddress, KafkaMode, KafkaSource, KafkaWriter};
use keel_sources::simulate::{SimConfig, Simulator, headers};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

/// Produces `n` simulated records to `topic` and returns their values.
fn produce(brokers: &str, topic: &str, config: SimConfig, n: usize) -> Vec<Vec<u8>> {
    let writer = KafkaWriter::new(&KafkaAddress {
        brokers: brokers.to_owned(),
        topic: topic.to_owned(),
    })
    .unwrap();
    let mut simulator = Simulator::new(config);
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        let mut value = Vec::new();
        let record = simulator.next_record(&mut value);
        writer
            .send(&record.event_id, &value, &headers(&record))
            .unwrap();
        values.push(value);
    }
    writer.flush(Duration::from_secs(60)).unwrap();
    values
}

/// Simulated events produced into the broker and read back through the Kafka source (two
/// workers sharing four partitions) give exactly the tables a file replay of them gives.
#[test]
fn kafka_replay_gives_the_file_replay_tables() {
    let brokers = broker();
    let topic = fresh_topic(&brokers, "analytics_events", 4);
    let values = produce(
        &brokers,
        &topic,
        SimConfig {
            seed: 31,
            malformed: 0.02,
            ..SimConfig::default()
        },
        20_000,
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("same.ndjson");
    write_values(&path, &values);
    let from_file = replay_file(&path, 1, 4096);

    let source = KafkaSource::new(
        KafkaAddress { brokers, topic },
        KafkaMode::Replay {
            idle: Duration::from_secs(3),
        },
    );
    let from_kafka = replay(Arc::new(source), 2, 1024);
    assert_eq!(counts(&from_kafka), counts(&from_file));
    assert!(from_kafka["viewer_sessions"].len() > 3_000);
    for (name, rows) in &from_file {
        if name == "ingest_errors" {
            // Same errors; positions name Kafka offsets instead of file lines.
            assert!(rows.len() > 200);
            assert!(
                from_kafka[name]
                    .iter()
                    .all(|r| r.contains("\"position\":\"kafka:"))
            );
            continue;
        }
        assert_eq!(&from_kafka[name], rows, "table {name}");
    }
}

fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let offsets = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .unwrap();
    offsets
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum()
}

/// Runs the engine on `topic` as a member of `group` with `workers` workers until it has read
/// `expected` records, then for `quiet` longer, then stops it.
fn run_group(
    brokers: &str,
    topic: &str,
    group: &str,
    workers: usize,
    expected: u64,
    quiet: Duration,
) -> Handles {
    let handles = Handles::default();
    let source = KafkaSource::new(
        KafkaAddress {
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
        },
        KafkaMode::Live {
            group: group.to_owned(),
        },
    );
    let options = EngineOptions {
        workers,
        batch: 500,
        ..EngineOptions::default()
    };
    let engine = {
        let handles = handles.clone();
        std::thread::spawn(move || engine::run(Arc::new(source), &options, &handles))
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while handles.stats.records.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(quiet);
    handles.shutdown.store(true, Ordering::SeqCst);
    engine.join().unwrap().unwrap();
    handles
}

/// A consumer group member per worker: the group spreads the partitions over the workers, every
/// record is read once, and every position is committed once its epoch is published.
#[test]
fn kafka_group_spreads_partitions_over_workers_and_commits() {
    let brokers = broker();
    let topic = fresh_topic(&brokers, "analytics_live", 3);
    let group = format!("keel-test-{topic}");
    produce(
        &brokers,
        &topic,
        SimConfig {
            seed: 32,
            ..SimConfig::default()
        },
        6_000,
    );
    let run = run_group(
        &brokers,
        &topic,
        &group,
        2,
        6_000,
        Duration::from_millis(500),
    );
    assert_eq!(
        run.stats.records.load(Ordering::Relaxed),
        6_000,
        "each record read once"
    );
    assert_eq!(
        committed(&brokers, &group, &topic, 3),
        6_000,
        "every published position committed"
    );
    let sessions = run.tables.read().unwrap().len("viewer_sessions").unwrap();
    assert!(sessions > 1_000, "{sessions} sessions");
}

/// A restarted member resumes after the group's commits and reads only what is new.
///
/// One worker per run: tansu 0.6 can keep a departed leader on record when several members of
/// a group leave at the same moment, and then never completes the next rebalance (a broker bug;
/// Kafka elects a new leader). With one member per run that race cannot happen.
#[test]
fn kafka_group_resumes_after_its_commits() {
    let brokers = broker();
    let topic = fresh_topic(&brokers, "analytics_resume", 2);
    let group = format!("keel-test-{topic}");
    produce(
        &brokers,
        &topic,
        SimConfig {
            seed: 34,
            ..SimConfig::default()
        },
        3_000,
    );
    let first = run_group(
        &brokers,
        &topic,
        &group,
        1,
        3_000,
        Duration::from_millis(500),
    );
    assert_eq!(first.stats.records.load(Ordering::Relaxed), 3_000);
    assert_eq!(committed(&brokers, &group, &topic, 2), 3_000);

    produce(
        &brokers,
        &topic,
        SimConfig {
            seed: 33,
            ..SimConfig::default()
        },
        1_000,
    );
    let second = run_group(&brokers, &topic, &group, 1, 1_000, Duration::from_secs(2));
    assert_eq!(
        second.stats.records.load(Ordering::Relaxed),
        1_000,
        "only the new records"
    );
    assert_eq!(committed(&brokers, &group, &topic, 2), 4_000);
}
