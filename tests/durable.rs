//! Durable outputs against real servers: Keel consuming a topic on the test broker (tansu) into
//! ClickHouse 18.16 and PostgreSQL (all started by `scripts/test-servers.sh start kafka clickhouse
//! postgres`), killed with SIGKILL at random points and restarted, must leave exactly the tables
//! of an uninterrupted run; and while ClickHouse is unreachable it must stop committing
//! positions, then catch up.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use common::{broker, fresh_topic};
use keel::store::specs;
use keel_sinks::clickhouse::ClickHouse;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

const PARTITIONS: i32 = 4;

/// The test ClickHouse (`KEEL_TEST_CLICKHOUSE`, default http://127.0.0.1:18123); a missing
/// server fails the test with instructions.
fn clickhouse_url() -> String {
    let url =
        std::env::var("KEEL_TEST_CLICKHOUSE").unwrap_or_else(|_| "http://127.0.0.1:18123".into());
    let reachable = ClickHouse::connect(&url, "default").is_ok();
    assert!(
        reachable,
        "no ClickHouse at {url}: run the tests with `scripts/test` (which starts one), or start it \
         with `eval \"$(scripts/test-servers.sh start kafka clickhouse)\"`"
    );
    url
}

/// The test PostgreSQL (`KEEL_TEST_POSTGRES`); a missing server fails the test with
/// instructions. Returns the URL of a new, empty database.
fn fresh_postgres(name: &str) -> String {
    let url = std::env::var("KEEL_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:15432/postgres".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use sqlx::Connection;
        let mut db = sqlx::PgConnection::connect(&url).await.unwrap_or_else(|e| {
            panic!(
                "no PostgreSQL at {url} ({e}): run the tests with `scripts/test` (which starts one), \
                 or start it with `eval \"$(scripts/test-servers.sh start kafka clickhouse postgres)\"`"
            )
        });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut db)
            .await
            .unwrap();
    });
    let base = url.rsplit_once('/').unwrap().0;
    format!("{base}/{name}")
}

/// `stream_analytics` in `url`, one line per row in key order.
fn stream_analytics(url: &str) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use sqlx::Connection;
        let mut db = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT string_agg(t::text, E'\\n' ORDER BY tenant_id, internal_name) FROM stream_analytics t",
        )
        .fetch_one(&mut db)
        .await
        .unwrap()
        .unwrap_or_default()
    })
}

fn unique(name: &str) -> String {
    format!(
        "{name}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    )
}

/// Fills a fresh topic with `records` simulated records (a share of them malformed).
fn seeded_topic(brokers: &str, records: u64) -> String {
    let topic = fresh_topic(brokers, "durable", PARTITIONS);
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "simulate",
            "--events",
            &records.to_string(),
            "--out",
            &format!("kafka://{brokers}/{topic}"),
            "--malformed",
            "0.01",
            "--seed",
            "11",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    topic
}

/// `keel migrate` of ClickHouse's `database` at `url` with `more` options; what it said.
fn keel_migrate(url: &str, database: &str, more: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "migrate",
            "--clickhouse",
            url,
            "--clickhouse-database",
            database,
        ])
        .args(more)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn migrate(url: &str, database: &str, sql: &str) {
    let said = keel_migrate(url, database, &["--database", sql]);
    assert!(said.contains("has 9 tables"), "{said}");
    assert!(said.contains("stream_analytics is ready"), "{said}");
}

/// A running `keel run`, killed when dropped; its summary lines arrive on `progress` as the
/// number of records (events and errors) read so far.
struct Keel {
    child: Child,
    progress: Receiver<u64>,
    /// Everything it printed on stderr.
    log: Arc<std::sync::Mutex<String>>,
    /// Its summary lines (stdout).
    summary: Arc<std::sync::Mutex<String>>,
}

impl Drop for Keel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_count(text: &str) -> u64 {
    text.trim().replace(',', "").parse().unwrap_or(0)
}

impl Keel {
    fn start(
        brokers: &str,
        topic: &str,
        group: &str,
        url: &str,
        database: &str,
        sql: &str,
    ) -> Keel {
        Keel::start_with(brokers, topic, group, url, database, sql, &[])
    }

    fn start_with(
        brokers: &str,
        topic: &str,
        group: &str,
        url: &str,
        database: &str,
        sql: &str,
        extra: &[&str],
    ) -> Keel {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .args([
                "run",
                "--source",
                &format!("kafka://{brokers}/{topic}"),
                "--group",
                group,
                // The simulated records are stamped with simulated (past) times.
                "--state-horizon",
                "all",
                "--clickhouse",
                url,
                "--clickhouse-database",
                database,
                "--database",
                sql,
                "--flush-every",
                "0.3",
                "--batch",
                "512",
                "--summary-every",
                "0.1",
                "--listen",
                "127.0.0.1:0",
                "--pg-listen",
                "off",
                "--foghorn-listen",
                "off",
                "--foghorn-grpc-listen",
                "off",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (sender, progress) = channel();
        let stdout = child.stdout.take().unwrap();
        let summary = Arc::new(std::sync::Mutex::new(String::new()));
        let lines = summary.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap().push_str(&line);
                lines.lock().unwrap().push('\n');
                // "[  1s]  2,000 events/s | 12,084 events | … | 3 errors"
                let fields: Vec<&str> = line.split(" | ").collect();
                let events = fields
                    .iter()
                    .find(|f| f.ends_with(" events") && !f.contains("events/s"));
                let errors = fields.iter().find(|f| f.ends_with(" errors"));
                if let (Some(events), Some(errors)) = (events, errors) {
                    let events = parse_count(
                        events
                            .trim_start_matches("stopped: ")
                            .trim_end_matches(" events"),
                    );
                    let errors = parse_count(errors.trim_end_matches(" errors"));
                    if sender.send(events + errors).is_err() {
                        return;
                    }
                }
            }
        });
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let into = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                into.lock().unwrap().push_str(&line);
                into.lock().unwrap().push('\n');
            }
        });
        Keel {
            child,
            progress,
            log,
            summary,
        }
    }

    /// Waits until it has read at least `records`; panics after `timeout`.
    fn wait_for(&self, records: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.progress.recv_timeout(left) {
                Ok(read) if read >= records => return read,
                Ok(_) => {}
                Err(_) => panic!(
                    "keel did not read {records} records within {timeout:?}; its log:\n{}",
                    self.log.lock().unwrap()
                ),
            }
        }
    }

    /// Waits until its stderr contains `text`.
    fn wait_log(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log.lock().unwrap().contains(text) {
            assert!(
                Instant::now() < deadline,
                "keel did not print {text:?}; its log:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops it with Ctrl-C (SIGINT) and checks that it stored everything and exited cleanly.
    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "keel exited with {status}; its log:\n{}",
                    self.log.lock().unwrap()
                );
                break;
            }
            assert!(Instant::now() < deadline, "keel did not stop after SIGINT");
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = self.log.lock().unwrap();
        assert!(!log.contains("did not take the last epochs"), "{log}");
    }
}

/// Every table's current rows in `database`, as ClickHouse returns them in key order.
fn tables(url: &str, database: &str) -> Vec<(&'static str, String)> {
    let clickhouse = ClickHouse::connect(url, database).unwrap();
    specs()
        .iter()
        .map(|spec| (spec.name, clickhouse.current_rows(spec).unwrap()))
        .collect()
}

/// The group's committed positions, summed over partitions (each is the next offset to read,
/// so the sum is the number of records committed when offsets start at 0).
fn committed(brokers: &str, topic: &str, group: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        list.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .unwrap();
    committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum()
}

/// A small random number from the clock (the kill points only need to differ between runs;
/// they are printed so a failure can be related to them).
fn random_fraction(salt: u64) -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let mixed =
        (nanos ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (mixed >> 11) as f64 / (1u64 << 53) as f64
}

#[test]
fn sigkill_at_random_points_leaves_the_tables_of_an_uninterrupted_run() {
    let brokers = broker();
    let url = clickhouse_url();
    let records = 60_000u64;
    let topic = seeded_topic(&brokers, records);

    // The reference: one run, start to end.
    let reference = unique("keel_ref");
    let reference_sql = fresh_postgres(&reference);
    migrate(&url, &reference, &reference_sql);
    let keel = Keel::start(
        &brokers,
        &topic,
        &unique("ref"),
        &url,
        &reference,
        &reference_sql,
    );
    keel.wait_for(records, Duration::from_secs(240));
    keel.stop();
    let expected = tables(&url, &reference);
    let rows = |name: &str| {
        expected
            .iter()
            .find(|(t, _)| *t == name)
            .map_or(0, |(_, text)| text.lines().count())
    };
    assert!(rows("streams") > 10, "{expected:?}");
    assert!(rows("viewer_sessions") > 1_000);
    assert!(
        rows("ingest_errors") > 0,
        "malformed records become error rows"
    );
    let expected_sql = stream_analytics(&reference_sql);
    assert_eq!(expected_sql.lines().count(), rows("streams"));

    // The same topic, killed five times at random points while it reads and writes.
    let killed = unique("keel_kill");
    let killed_sql = fresh_postgres(&killed);
    let group = unique("kill");
    migrate(&url, &killed, &killed_sql);
    for round in 0..5u64 {
        let keel = Keel::start(&brokers, &topic, &group, &url, &killed, &killed_sql);
        let point = (0.1 + 0.8 * random_fraction(round)) * records as f64;
        let read = keel.wait_for(point as u64, Duration::from_secs(240));
        // Let a flush or two land (writes in flight at the kill are the point).
        std::thread::sleep(Duration::from_millis(
            (random_fraction(round + 7) * 700.0) as u64,
        ));
        eprintln!("round {round}: SIGKILL after {read} of {records} records");
        drop(keel);
    }
    let keel = Keel::start(&brokers, &topic, &group, &url, &killed, &killed_sql);
    keel.wait_for(records, Duration::from_secs(240));
    keel.stop();

    let got = tables(&url, &killed);
    for ((table, want), (_, have)) in expected.iter().zip(&got) {
        assert!(
            want == have,
            "{table} differs after the kills: {} rows expected, {} stored; first difference: {:?}",
            want.lines().count(),
            have.lines().count(),
            want.lines().zip(have.lines()).find(|(a, b)| a != b)
        );
    }
    let got_sql = stream_analytics(&killed_sql);
    assert!(
        expected_sql == got_sql,
        "stream_analytics differs after the kills:\n{expected_sql}\n---\n{got_sql}"
    );
    // Everything read is committed, and nothing past the end.
    assert_eq!(committed(&brokers, &topic, &group), records as i64);
}

/// The current rows of one table in `database`, parsed.
fn stored(url: &str, database: &str, table: &str) -> Vec<serde_json::Value> {
    tables(url, database)
        .into_iter()
        .find(|(name, _)| *name == table)
        .map(|(_, text)| {
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        })
        .unwrap_or_default()
}

/// A version-2 viewer event of stream `demo` for the first simulated tenant, as the platform
/// sends it.
fn viewer_event(id: u32, trigger: &str, time: &str, payload: &serde_json::Value) -> String {
    let event_type = if trigger == "USER_NEW" {
        "viewer_connect"
    } else {
        "viewer_disconnect"
    };
    serde_json::json!({
        "event_id": format!("00000000-0000-4000-8000-{id:012}"),
        "event_type": event_type,
        "timestamp": time,
        "source": "foghorn",
        "tenant_id": "5eed517e-ba5e-da7a-517e-ba5eda7a0001",
        "schema_version": 2,
        "data": {
            "trigger_type": trigger,
            "node_id": "edge-ams-1",
            "stream_id": "5eedfeed-11fe-ca57-feed-11feca570001",
            event_type: payload,
        }
    })
    .to_string()
}

/// A viewer's disconnect (10:30, after 1,800 s, from NL) and its connect (10:20, from DE), as
/// the platform sends them: read in this order, the session is first placed at 10:00–10:30 in
/// NL, then moved to 10:20–10:30 in DE.
fn out_of_order_pair() -> (String, String) {
    let disconnect = viewer_event(
        1,
        "USER_END",
        "2026-11-01T10:30:00.000Z",
        &serde_json::json!({"session_id": "s1", "stream_name": "live+demo", "connector": "HLS",
            "host": "203.0.113.7", "duration": "1800", "up_bytes": "1000", "down_bytes": "90000",
            "country_code": "NL", "city": "Amsterdam"}),
    );
    let connect = viewer_event(
        2,
        "USER_NEW",
        "2026-11-01T10:20:00.000Z",
        &serde_json::json!({"stream_name": "live+demo", "host": "203.0.113.7", "connector": "HLS",
            "session_id": "s1", "client_country": "DE", "client_city": "Berlin"}),
    );
    (disconnect, connect)
}

/// A disconnect read before its connect places the session at its end minus its duration, in
/// the disconnect's country; the connect moves it, and the dataflow removes the rows of the
/// first placement. A run that stored those rows and stopped before reading the connect leaves
/// them in ClickHouse, and a restart that replays both events in one epoch never publishes
/// them, so never removes them: the restarted engine compares the stored keys with its rebuilt
/// state once its replay is over and removes what it no longer computes — and nothing of
/// streams it does not hold.
#[test]
fn a_restart_removes_stored_rows_its_replay_no_longer_computes() {
    // ClickHouse 18.16 (times as Int64), then current semantics (DateTime64, is_deleted).
    restart_removes_stale_rows(&clickhouse_url());
    restart_removes_stale_rows(&chdb_url());
}

/// The current-ClickHouse test server (chDB behind HTTP); a missing one fails with
/// instructions.
fn chdb_url() -> String {
    let url = std::env::var("KEEL_TEST_CHDB").unwrap_or_else(|_| "http://127.0.0.1:18130".into());
    if let Err(e) = ClickHouse::connect(&url, "default") {
        panic!(
            "no current-ClickHouse test server at {url} ({e}): run the tests with \
             `scripts/test`, or start it with `eval \"$(scripts/test-servers.sh start chdb)\"`"
        )
    }
    url
}

fn restart_removes_stale_rows(url: &str) {
    use keel_sources::kafka::{KafkaAddress, KafkaWriter};
    let brokers = broker();
    let url = url.to_owned();
    let topic = fresh_topic(&brokers, "reconcile", 1);
    let writer =
        KafkaWriter::new(&KafkaAddress::parse(&format!("kafka://{brokers}/{topic}")).unwrap())
            .unwrap();
    let (disconnect, connect) = out_of_order_pair();
    writer.send("demo", disconnect.as_bytes(), &[]).unwrap();
    writer.flush(Duration::from_secs(10)).unwrap();

    let database = unique("keel_reconcile");
    let sql = fresh_postgres(&database);
    migrate(&url, &database, &sql);
    let group = unique("reconcile");
    let countries = |url: &str| {
        let mut codes: Vec<String> = stored(url, &database, "viewers_by_country")
            .iter()
            .map(|r| format!("{}/{}", r["internal_name"], r["country_code"]))
            .collect();
        codes.sort();
        codes
    };
    let windows = |url: &str| demo_windows(url, &database);

    // First run: only the disconnect; the session is placed at 10:00–10:30 in NL.
    let keel = Keel::start(&brokers, &topic, &group, &url, &database, &sql);
    keel.wait_for(1, Duration::from_secs(120));
    keel.stop();
    assert_eq!(countries(&url), ["\"demo\"/\"NL\""]);
    let first: Vec<i64> = ["10:00", "10:05", "10:10", "10:15", "10:20", "10:25"]
        .iter()
        .map(|t| at(t))
        .collect();
    assert_eq!(windows(&url), first);
    // A row of a stream this topic never mentions (another source's, or older than any replay).
    ClickHouse::connect(&url, &database)
        .unwrap()
        .query(&format!(
            "INSERT INTO `{database}`.viewers_by_country FORMAT JSONEachRow \
             {{\"tenant_id\":\"5eed517e-ba5e-da7a-517e-ba5eda7a0001\",\"stream_id\":\"x\",\
             \"internal_name\":\"elsewhere\",\"country_code\":\"FR\",\"sessions\":3,\
             \"current_viewers\":0,\"viewer_seconds\":9.5,\"egress_bytes\":7,\"_version\":1,\"_deleted\":0}}"
        ))
        .unwrap();

    // The connect arrives; the restart replays both records in one epoch.
    writer.send("demo", connect.as_bytes(), &[]).unwrap();
    writer.flush(Duration::from_secs(10)).unwrap();
    let keel = Keel::start(&brokers, &topic, &group, &url, &database, &sql);
    keel.wait_for(2, Duration::from_secs(120));
    keel.wait_log("ClickHouse reconciled", Duration::from_secs(60));
    let log = keel.log.lock().unwrap().clone();
    keel.stop();
    assert!(
        log.contains("1 stale viewers_by_country rows and 4 stale usage_5m windows removed"),
        "{log}"
    );
    assert_eq!(
        countries(&url),
        ["\"demo\"/\"DE\"", "\"elsewhere\"/\"FR\""],
        "the NL row of the first placement is removed, the other stream's row kept"
    );
    assert_eq!(windows(&url), [at("10:20"), at("10:25")]);
}

/// The same out-of-order pair through `keel backfill` from files: a first backfill that read
/// only the disconnect stored the session's first placement; a second one over both records
/// removes the windows of its range it no longer computes.
#[test]
fn a_backfill_removes_windows_of_its_range_it_no_longer_computes() {
    let url = clickhouse_url();
    let (disconnect, connect) = out_of_order_pair();
    let dir = std::env::temp_dir().join(unique("keel_backfill_reconcile"));
    std::fs::create_dir_all(&dir).unwrap();
    let first = dir.join("first.ndjson");
    let both = dir.join("both.ndjson");
    std::fs::write(&first, format!("{disconnect}\n")).unwrap();
    std::fs::write(&both, format!("{disconnect}\n{connect}\n")).unwrap();
    let database = unique("keel_backfill_reconcile");
    let sql = fresh_postgres(&database);
    migrate(&url, &database, &sql);
    // A column an operator added (with a default) takes its default: inserts name their
    // columns, where one of every column in the table's order failed for good.
    ClickHouse::connect(&url, &database)
        .unwrap()
        .query(&format!(
            "ALTER TABLE `{database}`.usage_5m ADD COLUMN note String DEFAULT 'kept'"
        ))
        .unwrap();
    let (from, to) = ("2026-11-01T10:00:00Z", "2026-11-01T11:00:00Z");
    let source = |path: &std::path::Path| format!("file:{}", path.display());
    backfill(&source(&first), from, to, &url, &database, &sql);
    assert_eq!(demo_windows(&url, &database).len(), 6);
    // A row written by a clock far ahead (a host whose clock was ahead, then replaced): the
    // next writer's versions start above what is stored, so its rows still win.
    let mut ahead = stored(&url, &database, "usage_5m")
        .into_iter()
        .find(|w| {
            w["internal_name"] == "demo"
                && w["window_start"]
                    .to_string()
                    .contains(&at("10:20").to_string())
        })
        .expect("the 10:20 window");
    ahead["sessions_started"] = serde_json::json!(999);
    let future = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
        + 10_000_000_000_000;
    ahead["_version"] = serde_json::json!(future);
    ahead["_deleted"] = serde_json::json!(0);
    ClickHouse::connect(&url, &database)
        .unwrap()
        .query(&format!(
            "INSERT INTO `{database}`.usage_5m FORMAT JSONEachRow\n{ahead}"
        ))
        .unwrap();
    let said = backfill(&source(&both), from, to, &url, &database, &sql);
    assert!(
        said.contains("0 stale viewers_by_country rows and 4 stale usage_5m windows removed"),
        "{said}"
    );
    assert_eq!(
        demo_windows(&url, &database),
        [at("10:20"), at("10:25")],
        "only the connect's placement is left"
    );
    assert!(
        stored(&url, &database, "usage_5m")
            .iter()
            .all(|w| w["sessions_started"] != 999 && w["sessions_started"] != "999"),
        "a row of a clock ahead outlived a newer write"
    );
    let notes = ClickHouse::connect(&url, &database)
        .unwrap()
        .query(&format!(
            "SELECT DISTINCT note FROM `{database}`.usage_5m FORMAT TabSeparated"
        ))
        .unwrap();
    assert_eq!(notes.trim(), "kept", "the added column took its default");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// 2026-11-01 at `hh_mm`, in milliseconds.
fn at(hh_mm: &str) -> i64 {
    keel_operators::time::parse_rfc3339(&format!("2026-11-01T{hh_mm}:00Z")).unwrap()
}

/// The stored `usage_5m` window starts of stream `demo`.
fn demo_windows(url: &str, database: &str) -> Vec<i64> {
    stored(url, database, "usage_5m")
        .iter()
        .filter(|r| r["internal_name"] == "demo")
        .map(|r| {
            r["window_start"]
                .as_i64()
                .or_else(|| r["window_start"].as_str()?.parse().ok())
                .unwrap()
        })
        .collect()
}

/// A TCP proxy to ClickHouse that can be cut.
struct Proxy {
    up: Arc<AtomicBool>,
    open: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// Refuses new connections and cuts the open ones (the client pools them).
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// Forwards TCP connections to `target` while it is up; closes them at once otherwise.
fn switchable_proxy(target: &str) -> (String, Proxy) {
    let up = Arc::new(AtomicBool::new(true));
    let open = Arc::new(std::sync::Mutex::new(Vec::new()));
    let proxy = Proxy {
        up: up.clone(),
        open: open.clone(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let target = target
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            if !up.load(Ordering::SeqCst) {
                drop(client);
                continue;
            }
            let Ok(server) = TcpStream::connect(&target) else {
                continue;
            };
            open.lock().unwrap().push(client.try_clone().unwrap());
            let pipe = |mut from: TcpStream, mut to: TcpStream| {
                std::thread::spawn(move || {
                    let mut buffer = [0u8; 64 * 1024];
                    while let Ok(n) = from.read(&mut buffer) {
                        if n == 0 || to.write_all(&buffer[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            };
            pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
            pipe(server, client);
        }
    });
    (format!("http://{address}"), proxy)
}

#[test]
fn an_unreachable_clickhouse_holds_back_commits_until_it_returns() {
    let brokers = broker();
    let url = clickhouse_url();
    let records = 20_000u64;
    let topic = seeded_topic(&brokers, records);
    let database = unique("keel_outage");
    let sql = fresh_postgres(&database);
    migrate(&url, &database, &sql);
    let (proxied, proxy) = switchable_proxy(&url);
    let group = unique("outage");

    let keel = Keel::start(&brokers, &topic, &group, &proxied, &database, &sql);
    // Up for the start-up checks, then away while Keel reads.
    keel.wait_log("tables stored in ClickHouse", Duration::from_secs(60));
    proxy.cut();
    // Whatever was committed before the outage stays put while ClickHouse is away.
    std::thread::sleep(Duration::from_secs(2));
    let before = committed(&brokers, &topic, &group);
    keel.wait_for(records, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(3));
    let during = committed(&brokers, &topic, &group);
    assert_eq!(
        before, during,
        "positions advanced while ClickHouse was unreachable"
    );
    assert!(
        during < records as i64,
        "everything was committed although ClickHouse was unreachable"
    );
    assert!(
        keel.log.lock().unwrap().contains("durable write failed"),
        "the failure is logged: {}",
        keel.log.lock().unwrap()
    );
    assert!(
        keel.summary.lock().unwrap().contains("rows waiting): "),
        "the summary line says the stores are failing: {}",
        keel.summary.lock().unwrap()
    );
    proxy.restore();
    keel.stop();
    assert_eq!(committed(&brokers, &topic, &group), records as i64);
    let stored = tables(&url, &database);
    let sessions = stored
        .iter()
        .find(|(t, _)| *t == "viewer_sessions")
        .map_or(0, |(_, text)| text.lines().count());
    assert!(sessions > 100, "{sessions} sessions stored");
}

/// Runs `keel backfill` of `source` over `[from, to)` into `database` and `sql`; returns its
/// stderr.
fn backfill(source: &str, from: &str, to: &str, url: &str, database: &str, sql: &str) -> String {
    backfill_with(source, from, to, url, database, sql, &[])
}

/// [`backfill`] with `extra` arguments.
fn backfill_with(
    source: &str,
    from: &str,
    to: &str,
    url: &str,
    database: &str,
    sql: &str,
    extra: &[&str],
) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "backfill",
            "--source",
            source,
            "--from",
            from,
            "--to",
            to,
            "--clickhouse",
            url,
            "--clickhouse-database",
            database,
            "--database",
            sql,
        ])
        // A Kafka range ends after 3 s without records (`--idle` is refused for a file).
        .args(if source.starts_with("kafka://") {
            &["--idle", "3"][..]
        } else {
            &[]
        })
        .args(extra)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    said
}

#[test]
fn a_backfill_run_twice_or_interrupted_leaves_the_same_tables() {
    let brokers = broker();
    let url = clickhouse_url();
    let records = 60_000u64;
    let topic = seeded_topic(&brokers, records);
    let source = format!("kafka://{brokers}/{topic}");
    // The simulated fleet starts at 2026-11-01T00:00:00Z; 60,000 records span about seven
    // minutes of it. Take a range that cuts through the first window and holds the second.
    let (from, to) = ("2026-11-01T00:02:00Z", "2026-11-01T00:10:00Z");

    let database = unique("keel_backfill");
    let sql = fresh_postgres(&database);
    migrate(&url, &database, &sql);
    let said = backfill(&source, from, to, &url, &database, &sql);
    assert!(said.contains("backfill: "), "progress is shown: {said}");
    assert!(said.contains(" outside it"), "{said}");
    // A first backfill into empty tables has nothing stale to remove.
    assert!(
        said.contains("ClickHouse reconciled with the rebuilt state: ")
            && said
                .contains("0 stale viewers_by_country rows and 0 stale usage_5m windows removed"),
        "{said}"
    );
    let first = tables(&url, &database);
    let first_sql = stream_analytics(&sql);
    let windows: Vec<serde_json::Value> = first
        .iter()
        .find(|(t, _)| *t == "usage_5m")
        .unwrap()
        .1
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!windows.is_empty());
    // Windows are 5 minutes: only those wholly inside the range are stored (one that straddles
    // an end saw part of its events).
    let (from_ms, to_ms) = (
        keel_operators::time::parse_rfc3339(from).unwrap(),
        keel_operators::time::parse_rfc3339(to).unwrap(),
    );
    for window in &windows {
        // ClickHouse quotes 64-bit integers in JSON.
        let start = &window["window_start"];
        let start = start
            .as_i64()
            .or_else(|| start.as_str()?.parse().ok())
            .unwrap();
        assert!(
            start >= from_ms && start + 300_000 <= to_ms,
            "a window not wholly inside the range: {window}"
        );
    }

    // Into tables that hold the whole first window (a backfill of it): the straddling window
    // is left as it was, not replaced by the part the range saw.
    let whole = unique("keel_backfill_whole");
    let whole_sql = fresh_postgres(&whole);
    migrate(&url, &whole, &whole_sql);
    let straddling = from_ms - from_ms % 300_000;
    let first_window = |database: &str| -> Vec<serde_json::Value> {
        stored(&url, database, "usage_5m")
            .into_iter()
            .filter(|w| {
                let start = &w["window_start"];
                start.as_i64().or_else(|| start.as_str()?.parse().ok()) == Some(straddling)
            })
            .collect()
    };
    backfill(
        &source,
        "2026-11-01T00:00:00Z",
        to,
        &url,
        &whole,
        &whole_sql,
    );
    let before = first_window(&whole);
    assert!(!before.is_empty(), "the first window is stored");
    backfill(&source, from, to, &url, &whole, &whole_sql);
    assert_eq!(
        before,
        first_window(&whole),
        "a straddling window was replaced"
    );

    // Again, in epochs of 1,024 records where the first run took 65,536: nothing changes
    // (rows superseded over many epochs end as over a few).
    backfill_with(
        &source,
        from,
        to,
        &url,
        &database,
        &sql,
        &["--batch", "1024"],
    );
    assert!(
        first == tables(&url, &database),
        "a second backfill changed ClickHouse"
    );
    assert_eq!(first_sql, stream_analytics(&sql));

    // Interrupted at its first progress line, then run again: the same tables as one run.
    let other = unique("keel_backfill_cut");
    let other_sql = fresh_postgres(&other);
    migrate(&url, &other, &other_sql);
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "backfill",
            "--source",
            &source,
            "--from",
            from,
            "--to",
            to,
            "--clickhouse",
            &url,
            "--clickhouse-database",
            &other,
            "--database",
            &other_sql,
            "--batch",
            "256",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines
        .find(|l| l.as_ref().is_ok_and(|l| l.contains(" records/s")))
        .expect("a progress line")
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!line.contains("done"), "{line}");
    backfill(&source, from, to, &url, &other, &other_sql);
    assert!(
        first == tables(&url, &other),
        "an interrupted and repeated backfill differs"
    );
    assert_eq!(first_sql, stream_analytics(&other_sql));
}

/// Every record of `topic` (all partitions), as (partition, offset, key, value).
fn read_all(brokers: &str, topic: &str) -> Vec<(i32, i64, String, Vec<u8>)> {
    use rdkafka::Message;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "keel-test-reader")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        list.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&list).unwrap();
    let (mut records, mut ended) = (Vec::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while ended < PARTITIONS && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => records.push((
                m.partition(),
                m.offset(),
                String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                m.payload().unwrap_or_default().to_vec(),
            )),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => ended += 1,
            _ => {}
        }
    }
    records
}

#[test]
fn bad_records_reach_the_dead_letter_topic_and_good_ones_events_raw() {
    use base64::Engine as _;
    let brokers = broker();
    let url = clickhouse_url();
    let records = 20_000u64;
    let topic = seeded_topic(&brokers, records);
    let dlq = fresh_topic(&brokers, "dlq", PARTITIONS);
    let database = unique("keel_dlq");
    let sql = fresh_postgres(&database);
    migrate(&url, &database, &sql);
    // Without its table, --raw-events is refused with the command that makes it.
    let refused = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "run",
            "--source",
            &format!("kafka://{brokers}/{topic}"),
            "--clickhouse",
            &url,
            "--clickhouse-database",
            &database,
            "--raw-events",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        said.contains("events_raw") && said.contains("keel migrate"),
        "{said}"
    );
    keel_migrate(&url, &database, &["--raw-events"]);
    let group = unique("dlq");
    let run = || {
        let keel = Keel::start_with(
            &brokers,
            &topic,
            &group,
            &url,
            &database,
            &sql,
            &["--dlq-topic", &dlq, "--raw-events"],
        );
        keel.wait_log("copied to topic", Duration::from_secs(60));
        keel.wait_for(records, Duration::from_secs(120));
        keel.stop();
    };
    run();

    // One letter per ingest_errors row, naming the same position.
    let errors = tables(&url, &database)
        .into_iter()
        .find(|(t, _)| *t == "ingest_errors")
        .unwrap()
        .1;
    let mut positions: Vec<String> = errors
        .lines()
        .map(|l| {
            let row: serde_json::Value = serde_json::from_str(l).unwrap();
            row["position"].as_str().unwrap().to_owned()
        })
        .collect();
    assert!(positions.len() > 50, "{} error rows", positions.len());
    let letters = read_all(&brokers, &dlq);
    let mut named: Vec<String> = letters
        .iter()
        .map(|(_, _, _, value)| {
            let letter: serde_json::Value = serde_json::from_slice(value).unwrap();
            format!(
                "kafka:{}/{}@{}",
                letter["topic"].as_str().unwrap(),
                letter["partition"],
                letter["offset"]
            )
        })
        .collect();
    positions.sort();
    named.sort();
    assert_eq!(named, positions);
    // A restart re-reads the whole topic to rebuild its state (`--state-horizon all`): the
    // letters of records its group had committed are not sent again.
    run();
    assert_eq!(
        read_all(&brokers, &dlq).len(),
        letters.len(),
        "a restart sent its recovered records' letters again"
    );

    // Every valid record is in events_raw once, by event id, and no client address is.
    let clickhouse = ClickHouse::connect(&url, &database).unwrap();
    let counts = clickhouse
        .query(&format!(
            "SELECT count(), uniqExact(event_id), countIf(match(payload, '\\\\b\\\\d{{1,3}}\\\\.\\\\d{{1,3}}\\\\.\\\\d{{1,3}}\\\\.\\\\d{{1,3}}\\\\b')), \
             0 \
             FROM `{database}`.events_raw FINAL FORMAT TabSeparated"
        ))
        .unwrap();
    let counts: Vec<u64> = counts
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(counts[0], counts[1], "one row per event id");
    assert!(
        counts[0] + positions.len() as u64 <= records && counts[0] * 100 >= records * 95,
        "{counts:?} raw events of {records} records"
    );
    assert_eq!(counts[2], 0, "a client address reached events_raw");

    // Each letter carries the original bytes and says why.
    let originals: std::collections::HashMap<(i32, i64), (String, Vec<u8>)> =
        read_all(&brokers, &topic)
            .into_iter()
            .map(|(p, o, k, v)| ((p, o), (k, v)))
            .collect();
    let dotted_quad = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes)
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .any(|word| {
                let parts: Vec<&str> = word.split('.').collect();
                parts.len() == 4 && parts.iter().all(|p| (1..=3).contains(&p.len()))
            })
    };
    assert!(
        originals.values().any(|(_, v)| dotted_quad(v)),
        "the simulated records carry client addresses (so events_raw had some to remove)"
    );
    let mut keyed = 0;
    for (_, _, key, value) in &letters {
        let letter: serde_json::Value = serde_json::from_slice(value).unwrap();
        let at = (
            letter["partition"].as_i64().unwrap() as i32,
            letter["offset"].as_i64().unwrap(),
        );
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(letter["value_base64"].as_str().unwrap())
            .unwrap();
        let (original_key, original) = &originals[&at];
        assert_eq!(&bytes, original, "{letter}");
        // The letter keeps the record's key (the simulator keys records by event id), or
        // names the record's position when it had none.
        if original_key.is_empty() {
            assert_eq!(*key, format!("{topic}:{}:{}", at.0, at.1));
            assert!(letter.get("key_base64").is_none(), "{letter}");
        } else {
            keyed += 1;
            assert_eq!(key, original_key);
            let sent = base64::engine::general_purpose::STANDARD
                .decode(letter["key_base64"].as_str().unwrap())
                .unwrap();
            assert_eq!(sent, original_key.as_bytes());
        }
        assert_eq!(letter["topic"], topic.as_str());
        assert_eq!(letter["consumer"], "keel");
        assert!(!letter["error"].as_str().unwrap().is_empty());
    }
    assert!(keyed > 0, "no letter of a keyed record");
}

/// `rows` (JSONEachRow) as values, with 64-bit integers that a server quoted turned back into
/// numbers, so two ClickHouse versions' answers compare by value.
fn normalized(rows: &str) -> Vec<serde_json::Value> {
    fn fix(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::String(text) => {
                if let Ok(n) = text.parse::<i64>() {
                    *value = n.into();
                } else if let Ok(n) = text.parse::<u64>() {
                    *value = n.into();
                }
            }
            serde_json::Value::Object(map) => map.values_mut().for_each(fix),
            serde_json::Value::Array(items) => items.iter_mut().for_each(fix),
            _ => {}
        }
    }
    rows.lines()
        .map(|line| {
            let mut value = serde_json::from_str(line).unwrap();
            fix(&mut value);
            value
        })
        .collect()
}

/// Equal values; floats within 1e-12 relative (the old server prints 17 digits, the current
/// one the shortest form, and the test's JSON parser may round either by one unit).
fn same(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 1e-12 * x.abs().max(y.abs())
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same(v, w))
        }
        _ => a == b,
    }
}

#[test]
fn current_clickhouse_semantics_hold_the_same_tables_as_the_old_server() {
    let brokers = broker();
    let old = clickhouse_url();
    let current = chdb_url();
    let server = ClickHouse::connect(&current, "default").unwrap();
    assert!(server.features().datetime64 && server.features().is_deleted);
    let records = 20_000u64;
    let topic = seeded_topic(&brokers, records);
    let mut answers = Vec::new();
    for url in [&old, &current] {
        let database = unique("keel_versions");
        let sql = fresh_postgres(&database);
        migrate(url, &database, &sql);
        let keel = Keel::start(&brokers, &topic, &unique("versions"), url, &database, &sql);
        keel.wait_for(records, Duration::from_secs(120));
        keel.stop();
        answers.push(tables(url, &database));
    }
    for ((table, on_old), (_, on_current)) in answers[0].iter().zip(&answers[1]) {
        let (on_old, on_current) = (normalized(on_old), normalized(on_current));
        assert!(
            !on_old.is_empty() || *table == "unknown_events",
            "{table} is empty"
        );
        assert!(
            on_old.len() == on_current.len()
                && on_old.iter().zip(&on_current).all(|(a, b)| same(a, b)),
            "{table} differs between ClickHouse 18.16 and current ClickHouse: first difference {:?}",
            on_old.iter().zip(&on_current).find(|(a, b)| !same(a, b))
        );
    }
}

/// A `streams` row with text PostgreSQL cannot hold as is (a NUL character, values wider than
/// their columns) is fitted to `stream_analytics`, and the rows written beside it are kept: one
/// such value used to fail every write, so the store, and the positions behind it, never moved.
#[test]
fn odd_text_never_blocks_the_rows_written_beside_it() {
    use keel_sinks::sql::SqlStore;
    let sql = fresh_postgres(&unique("odd_text"));
    let tenant = "5b3c5a4e-9d0e-4c1e-8a52-1f0e8a1f5c11";
    let row = |name: &str, status: &str, node: &str| {
        let value = serde_json::json!({
            "tenant_id": tenant, "stream_id": "0f8fad5b-d9cb-469f-a165-70867728950e",
            "internal_name": name, "status": status, "node_id": node,
            "current_viewers": 2, "peak_viewers": 3, "total_sessions": 4, "unique_viewers": 3,
            "viewer_seconds": 1.5, "egress_bytes": 10, "ingress_bytes": 20,
            "buffer_state": "FULL", "quality_tier": "1080p",
            "started_at": 1_700_000_000_000i64, "updated_at": 1_700_000_100_000i64,
        });
        (tenant.to_owned(), name.to_owned(), Some(value))
    };
    let long_name = "x".repeat(300);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = SqlStore::connect(&sql).await.unwrap();
        store.migrate().await.unwrap();
        store
            .write(&[
                row("good", "live", "edge-1"),
                row("odd", "li\0ve", &"n".repeat(120)),
                row("nul\0name", "live", "edge-1"),
                row("nul\u{FFFD}name", "live", "edge-2"),
                row(&long_name, "live", "edge-1"),
            ])
            .await
            .expect("the write goes through");
        // Removing rows whose names were never kept (too long, or with a NUL) goes through too.
        store
            .write(&[
                (tenant.to_owned(), long_name.clone(), None),
                (tenant.to_owned(), "nul\0name".to_owned(), None),
            ])
            .await
            .unwrap();
    });
    let rows = stream_analytics(&sql);
    let lines: Vec<&str> = rows.lines().collect();
    assert_eq!(lines.len(), 3, "{rows}");
    assert!(
        lines[0].contains(",good,") && lines[0].contains(",live,edge-1,"),
        "{rows}"
    );
    // The name with a NUL was refused, not merged into its look-alike, which is kept whole.
    assert!(
        lines[1].contains(",nul\u{FFFD}name,") && lines[1].contains(",live,edge-2,"),
        "{rows}"
    );
    assert!(
        lines[2].contains(",odd,") && lines[2].contains(",li\u{FFFD}ve,"),
        "{rows}"
    );
    assert!(
        lines[2].contains(&format!(",{},", "n".repeat(100))),
        "{rows}"
    );
}

/// Tables an older Keel made lack the columns a newer one writes: a writer refuses to start
/// against them, naming the columns and `keel migrate`, which adds each in its place (rows
/// are sent column by column in the table's order), after which the writer accepts them.
#[test]
fn migrate_adds_the_columns_an_older_keel_did_not_make() {
    let url = clickhouse_url();
    let database = unique("keel_columns");
    let migrate = || keel_migrate(&url, &database, &[]);
    let said = migrate();
    assert!(!said.contains("ALTER TABLE"), "{said}");
    let client = ClickHouse::connect(&url, &database).unwrap();
    for column in ["source", "record"] {
        client
            .query(&format!(
                "ALTER TABLE `{database}`.`ingest_errors` DROP COLUMN `{column}`"
            ))
            .unwrap();
    }
    let refusal = client.check_tables(&specs()).unwrap_err().to_string();
    assert!(
        refusal.contains("ingest_errors.source, ingest_errors.record")
            && refusal.contains("keel migrate"),
        "{refusal}"
    );

    let said = migrate();
    assert!(
        said.contains("ADD COLUMN `source` String AFTER `position`")
            && said.contains("ADD COLUMN `record` Int64 AFTER `source`"),
        "{said}"
    );
    client.check_tables(&specs()).unwrap();
    let order = client
        .query(&format!(
            "SELECT name FROM system.columns WHERE database = '{database}' AND table = 'ingest_errors' FORMAT TabSeparated"
        ))
        .unwrap();
    let order: Vec<&str> = order.lines().take(3).collect();
    assert_eq!(order, ["position", "source", "record"]);
    // Once more changes nothing.
    assert!(!migrate().contains("ALTER TABLE"));
}
