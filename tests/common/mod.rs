//! Helpers shared by the integration tests: run a source to the end, dump every table.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use keel::engine::{self, EngineOptions, Handles};
use keel_sinks::live::LiveTables;
use keel_sources::file::FileSource;
use keel_sources::simulate::{SimConfig, Simulator, write_kcat_line};
use keel_sources::source::Source;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Every table as sorted JSON lines (explicit nulls), by table name.
pub type Tables = BTreeMap<String, Vec<String>>;

/// Renders every live table.
pub fn dump(tables: &LiveTables) -> Tables {
    tables
        .names()
        .map(|name| {
            let batch = tables.snapshot(name).unwrap();
            let mut out = Vec::new();
            {
                let mut writer = arrow::json::WriterBuilder::new()
                    .with_explicit_nulls(true)
                    .build::<_, arrow::json::writer::LineDelimited>(&mut out);
                writer.write(&batch).unwrap();
                writer.finish().unwrap();
            }
            let mut rows: Vec<String> = String::from_utf8(out)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect();
            rows.sort();
            (name.to_owned(), rows)
        })
        .collect()
}

/// Runs `source` to its end and dumps the tables.
pub fn replay(source: Arc<dyn Source>, workers: usize, batch: usize) -> Tables {
    let options = EngineOptions {
        workers,
        batch,
        ..EngineOptions::default()
    };
    replay_with(source, &options).0
}

/// Runs `source` to its end with `options`; the tables, and the engine's handles.
pub fn replay_with(source: Arc<dyn Source>, options: &EngineOptions) -> (Tables, Handles) {
    let handles = Handles::default();
    engine::run(source, options, &handles).unwrap();
    let tables = {
        let tables = handles.tables.read().unwrap();
        assert!(tables.epoch().is_some(), "the final epoch is published");
        dump(&tables)
    };
    (tables, handles)
}

/// Replays an NDJSON file.
pub fn replay_file(path: &Path, workers: usize, batch: usize) -> Tables {
    replay(Arc::new(FileSource::open(path).unwrap()), workers, batch)
}

/// Writes `n` simulated records to `path` as `kcat -J` lines; returns the raw values too.
pub fn simulate_file(path: &Path, config: SimConfig, n: usize) -> Vec<Vec<u8>> {
    let mut simulator = Simulator::new(config);
    let mut out = Vec::new();
    let mut values = Vec::new();
    for offset in 0..n {
        let mut value = Vec::new();
        let record = simulator.next_record(&mut value);
        write_kcat_line(
            &mut out,
            "analytics_events",
            (offset % 4) as i32,
            offset as i64,
            &record,
            &value,
        );
        values.push(value);
    }
    std::fs::write(path, out).unwrap();
    values
}

/// Writes bare values as NDJSON.
pub fn write_values(path: &Path, values: &[Vec<u8>]) {
    let mut out = Vec::new();
    for v in values {
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    std::fs::write(path, out).unwrap();
}

/// Row counts per table, for messages.
pub fn counts(tables: &Tables) -> BTreeMap<&str, usize> {
    tables.iter().map(|(k, v)| (k.as_str(), v.len())).collect()
}

/// The test broker's address (`KEEL_TEST_KAFKA`, default `127.0.0.1:19092`); a missing broker
/// fails the test with instructions.
pub fn broker() -> String {
    let address = std::env::var("KEEL_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".to_owned());
    let reachable = address
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    assert!(
        reachable,
        "no Kafka-protocol broker at {address}: run the tests with `scripts/test` (which starts one), \
         or start tansu with `eval \"$(scripts/test-servers.sh start)\"`"
    );
    address
}

/// A new topic with `partitions` partitions, named after `name`, this process and the time.
pub fn fresh_topic(brokers: &str, name: &str, partitions: i32) -> String {
    let topic = format!(
        "{name}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros()
    );
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let results = runtime
        .block_on(admin.create_topics(
            &[NewTopic::new(
                &topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ))
        .unwrap();
    for result in results {
        result.unwrap_or_else(|(t, e)| panic!("cannot create topic {t}: {e}"));
    }
    topic
}
