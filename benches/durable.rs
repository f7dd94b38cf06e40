//! The durable-outputs benchmark: rows/s from Keel's sink into ClickHouse, a backfill of a day
//! of simulated traffic from the broker into ClickHouse beside the broker's own read rate, and
//! the time to recover that day's state at start.
//!
//! ```text
//! cargo bench --bench durable -- [--rows 3000000] [--hours 24]    (--hours 0: the sink only)
//! ```
//!
//! The servers are the ones at `KEEL_TEST_KAFKA` and `KEEL_TEST_CLICKHOUSE`
//! (`scripts/bench-durable` starts tansu and ClickHouse 18.16). In one run:
//!
//! 1. **Sink**: `--rows` distinct `viewer_sessions` rows staged as closed epochs of 100,000 and
//!    written by the durable writer, until ClickHouse has them all; beside it, ClickHouse's own
//!    insert of the very same `RowBinary` bytes in one request. The default is three seconds or
//!    so of staging, so the writer's flushes (one per second) overlap it as they do in a
//!    running engine; a burst shorter than one flush measures staging plus one insert instead.
//! 2. **Broker read**: a plain consumer reading the whole topic (`--hours` of the simulated
//!    fleet's traffic, stamped with simulated times ending now) from its start to its end.
//! 3. **Backfill**: the engine reading the same topic into all of ClickHouse's tables, as
//!    `keel backfill` does: events/s, and per CPU-second of this process.
//! 4. **Recovery**: a live consumer-group member with `--state-horizon` of `--hours`, from start
//!    until every record is read and stored: what a restart after a crash costs.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keel::engine::{self, EngineOptions, Handles};
use keel_dataflows::periscope::ViewerSessionRow;
use keel_operators::sym::Sym;
use keel_operators::sympair::SymPair;
use keel_operators::table::{Change, TableSink as _};
use keel_sinks::clickhouse::{ClickHouse, TableSpec};
use keel_sinks::durable::Durable;
use keel_sources::kafka::{KafkaAddress, KafkaMode, KafkaSource, KafkaWriter};
use keel_sources::simulate::{SimConfig, Simulator, headers};
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use support::cpu_seconds;

const PARTITIONS: i32 = 4;

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

fn group(n: f64) -> String {
    keel::summary::group(n as u64)
}

fn unique(name: &str) -> String {
    format!("{name}_{}", uuid::Uuid::new_v4().simple())
}

fn session(i: u64) -> ViewerSessionRow {
    ViewerSessionRow {
        stream: SymPair::new(
            Sym::new("5b3c5a4e-9d0e-4c1e-8a52-1f0e8a1f5c11"),
            Sym::new(["alpha", "bravo", "charlie", "delta"][i as usize % 4]),
        ),
        stream_id: Sym::new("0f8fad5b-d9cb-469f-a165-70867728950e"),
        session_id: format!("s{i}").into(),
        node_id: Sym::new(["edge-ams-1", "edge-fra-1", "edge-nyc-1"][i as usize % 3]),
        connector: Sym::new("HLS"),
        country_code: Sym::new(["NL", "DE", "US", "BR"][i as usize % 4]),
        city: Sym::new("Amsterdam"),
        connected_at: 1_793_491_200_000 + i as i64,
        disconnected_at: (!i.is_multiple_of(3))
            .then_some(1_793_491_260_000 + i as i64)
            .into(),
        down_bytes: i * 1_000,
        up_bytes: i * 10,
    }
}

fn sink(url: &str, rows: u64) {
    let database = unique("keel_bench_sink");
    let clickhouse = ClickHouse::connect(url, &database).expect("ClickHouse");
    let spec = TableSpec::of::<ViewerSessionRow>("viewer_sessions");
    clickhouse.migrate(std::slice::from_ref(&spec)).unwrap();
    let durable = Durable::start(
        Some(clickhouse.clone()),
        vec![spec.clone()],
        None,
        None,
        Duration::from_secs(1),
    )
    .unwrap();
    // The rows exist before the clock starts: making them is the dataflow's work, not the sink's.
    let per_epoch = 100_000;
    let mut epochs: Vec<Vec<ViewerSessionRow>> = (0..rows.div_ceil(per_epoch))
        .map(|epoch| {
            (epoch * per_epoch..((epoch + 1) * per_epoch).min(rows))
                .map(session)
                .collect()
        })
        .collect();
    let (started, cpu) = (Instant::now(), cpu_seconds());
    for (epoch, batch) in epochs.iter_mut().enumerate() {
        durable.stage(Some(epoch as u64), |stage| {
            for row in batch.drain(..) {
                stage.apply("viewer_sessions", Change::Upsert(row));
            }
        });
    }
    let staged = started.elapsed().as_secs_f64();
    assert!(
        durable.finish(Duration::from_secs(600)),
        "the sink did not finish"
    );
    let (elapsed, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    let stored: u64 = clickhouse
        .query(&format!(
            "SELECT count() FROM `{database}`.viewer_sessions FORMAT TabSeparated"
        ))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(stored, rows);
    let inserts = durable.stats().inserts.load(Ordering::Relaxed);

    // The ceiling: ClickHouse inserting the same bytes, sent in one request.
    let (mut body, mut key) = (Vec::new(), Vec::new());
    for i in 0..rows {
        spec.encode(&Change::Upsert(session(i)), 1, &mut body, &mut key)
            .unwrap();
    }
    let raw = ClickHouse::connect(url, &database).unwrap();
    raw.query(&format!(
        "CREATE TABLE `{database}`.raw AS `{database}`.viewer_sessions"
    ))
    .unwrap();
    let ceiling = Instant::now();
    raw.insert("raw", &spec.column_list(), &body).unwrap();
    let ceiling = ceiling.elapsed().as_secs_f64();
    println!(
        "sink      {:>12} rows/s  ({} rows, {} inserts, {:.2} s: staging {:.2} s; {:.2} CPU-s in Keel)",
        group(rows as f64 / elapsed),
        group(rows as f64),
        inserts,
        elapsed,
        staged,
        cpu
    );
    println!(
        "ceiling   {:>12} rows/s  (ClickHouse {} inserting the same {:.0} MB of RowBinary in one request)",
        group(rows as f64 / ceiling),
        clickhouse.version(),
        body.len() as f64 / 1e6
    );
}

fn create_topic(brokers: &str) -> String {
    let topic = unique("keel_bench_day");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for result in runtime
        .block_on(admin.create_topics(
            &[NewTopic::new(
                &topic,
                PARTITIONS,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ))
        .unwrap()
    {
        result.unwrap();
    }
    topic
}

/// Fills a topic with `hours` of the default simulated fleet, the last record stamped now.
fn fill(brokers: &str, hours: u64) -> (String, u64) {
    let topic = create_topic(brokers);
    let span = hours as i64 * 3_600_000;
    let config = SimConfig {
        start: keel_operators::time::now_ms() - span,
        malformed: 0.001,
        ..SimConfig::default()
    };
    let end = config.start + span;
    let mut simulator = Simulator::new(config);
    let writer = KafkaWriter::new(&KafkaAddress {
        brokers: brokers.to_owned(),
        topic: topic.clone(),
    })
    .unwrap();
    let (started, mut records, mut value) = (Instant::now(), 0u64, Vec::new());
    loop {
        value.clear();
        let record = simulator.next_record(&mut value);
        if record.time >= end {
            break;
        }
        writer
            .send_stamped(
                &record.event_id,
                &value,
                &headers(&record),
                Some(record.time),
            )
            .unwrap();
        records += 1;
        if records.is_multiple_of(1_000_000) {
            eprintln!("  produced {} records", group(records as f64));
        }
    }
    writer.flush(Duration::from_secs(300)).unwrap();
    println!(
        "topic     {} records: {} h of the default simulated fleet ({:.0} records/s of simulated time), produced in {:.0} s",
        group(records as f64),
        hours,
        records as f64 / span as f64 * 1000.0,
        started.elapsed().as_secs_f64()
    );
    (topic, records)
}

/// The broker's own read rate: every record of `topic`, start to end, by a plain consumer.
fn broker_read(brokers: &str, topic: &str, records: u64) -> f64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "keel-bench-reader")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        list.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&list).unwrap();
    let (started, cpu) = (Instant::now(), cpu_seconds());
    let (mut read, mut bytes, mut ended) = (0u64, 0usize, 0);
    while ended < PARTITIONS {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                read += 1;
                bytes += m.payload().map_or(0, <[u8]>::len);
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => ended += 1,
            _ => {}
        }
    }
    let (elapsed, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    assert_eq!(read, records);
    let rate = read as f64 / elapsed;
    println!(
        "broker    {:>12} records/s  (a plain consumer reading the {:.0} MB topic: {:.1} s, {:.1} CPU-s here)",
        group(rate),
        bytes as f64 / 1e6,
        elapsed,
        cpu
    );
    rate
}

fn stores(url: &str, name: &str) -> Arc<Durable> {
    let database = unique(name);
    let clickhouse = ClickHouse::connect(url, &database).unwrap();
    let specs = keel::store::specs();
    clickhouse.migrate(&specs).unwrap();
    Durable::start(Some(clickhouse), specs, None, None, Duration::from_secs(1)).unwrap()
}

fn engine_run(label: &str, source: KafkaSource, url: &str, records: u64, broker: f64) {
    let durable = stores(url, "keel_bench_engine");
    let handles = Handles {
        durable: Some(durable.clone()),
        ..Handles::default()
    };
    let options = EngineOptions::default();
    let (started, cpu) = (Instant::now(), cpu_seconds());
    let live = matches!(label, "recovery");
    let runner = {
        let handles = handles.clone();
        std::thread::spawn(move || engine::run(Arc::new(source), &options, &handles))
    };
    if live {
        // A live member never ends: stop it once everything is read and stored.
        while handles.stats.records.load(Ordering::Relaxed) < records {
            std::thread::sleep(Duration::from_millis(20));
        }
        handles.shutdown.store(true, Ordering::Relaxed);
    }
    runner.join().unwrap().unwrap();
    assert!(durable.finish(Duration::from_secs(600)));
    let (elapsed, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    let read = handles.stats.records.load(Ordering::Relaxed);
    assert_eq!(read, records, "{label} read every record");
    let rate = read as f64 / elapsed;
    let written = durable.stats();
    println!(
        "{label:<9} {:>12} events/s  ({:.1} s; {} per CPU-second of Keel, {:.1} CPU-s; {:.2}x the broker's read rate; {} ClickHouse rows in {} inserts)",
        group(rate),
        elapsed,
        group(read as f64 / cpu),
        cpu,
        rate / broker,
        group(written.rows_written.load(Ordering::Relaxed) as f64),
        written.inserts.load(Ordering::Relaxed)
    );
}

fn main() {
    let brokers = std::env::var("KEEL_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let url =
        std::env::var("KEEL_TEST_CLICKHOUSE").unwrap_or_else(|_| "http://127.0.0.1:18123".into());
    let rows = arg("--rows", 3_000_000);
    let hours = arg("--hours", 24);
    println!("# Durable outputs: ClickHouse at {url}, broker at {brokers}");
    sink(&url, rows);
    if hours == 0 {
        // `--hours 0`: the sink alone.
        return;
    }
    let (topic, records) = fill(&brokers, hours);
    let broker = broker_read(&brokers, &topic, records);
    let address = KafkaAddress { brokers, topic };
    engine_run(
        "backfill",
        KafkaSource::new(
            address.clone(),
            KafkaMode::Replay {
                idle: Duration::from_secs(10),
            },
        ),
        &url,
        records,
        broker,
    );
    engine_run(
        "recovery",
        KafkaSource::new(
            address,
            KafkaMode::Live {
                group: unique("keel-bench-recovery"),
            },
        )
        .with_state_horizon(Duration::from_secs(hours * 3600 + 600)),
        &url,
        records,
        broker,
    );
}
