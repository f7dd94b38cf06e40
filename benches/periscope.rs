//! The Periscope benchmark: Keel against ClickHouse on the same events, in one run.
//!
//! ```text
//! scripts/bench                      # installs and starts ClickHouse, then runs this
//! cargo bench --bench periscope -- --events 10000000 --sessions 1000000 \
//!     --clickhouse http://127.0.0.1:18123
//! ```
//!
//! It prints, for a generated file of version-2 events:
//!
//! 1. **Throughput**: Keel replaying the file through decode and every Periscope dataflow, with 1
//!    and 2 workers: events/s, and events per CPU-second (per core). Foghorn's routing dataflow
//!    runs beside them as in `keel run`, in its epochs of 8,192 records; `--no-routing` turns it
//!    off, as `keel sql` and backfills do (for the update path and the memory child too), and
//!    replays in `keel sql`'s epochs of 65,536 (`--batch N` sets either; the memory child uses
//!    the same epochs, the update path always `keel run`'s).
//! 2. **ClickHouse on the same events**: insert them (flattened by Keel's codec) into a MergeTree
//!    table, then compute the same tables with GROUP BY queries at `max_threads = 1`: load and
//!    query time, events per core-second, and a row-by-row check that the `streams` tables agree.
//! 3. **Update path**: one new event after the load — Keel's time until it shows in the live
//!    tables, against ClickHouse inserting it and re-running the queries.
//! 4. **Memory**: bytes of resident memory per open viewer session, with `--sessions` sessions
//!    open at once (measured in a child process so nothing else is resident), with Foghorn's
//!    dataflow on or off as for the throughput runs.

mod support;

use support::cpu_seconds;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keel::engine::{self, EngineOptions, Handles};
use keel_dataflows::periscope::{HeldSessions, StreamRow};
use keel_operators::sym::Sym;
use keel_operators::table::HeldTable;
use keel_sources::codec::decode;
use keel_sources::event::{Event, EventKind};
use keel_sources::file::FileSource;
use keel_sources::memory::{MemorySource, OwnedRecord};
use keel_sources::record::{Headers, Position, Record};
use keel_sources::simulate::{SimConfig, SimRecord, Simulator};

struct Options {
    events: u64,
    sessions: u64,
    clickhouse: Option<String>,
    dir: PathBuf,
    workers: Vec<usize>,
    /// Most records per worker per epoch (`--batch`); by default the epoch size of the command
    /// the run stands for: `keel run`'s with routing on, `keel sql`'s with it off.
    batch: usize,
    /// Foghorn's dataflow on (as `keel run`) or off (as `keel sql` and backfills).
    routing: bool,
}

const USAGE: &str = "\
usage: cargo bench --bench periscope -- [OPTIONS]

  --events N          version-2 events in the replayed file (default 10000000)
  --sessions N        viewer sessions open at once for the memory figure (default 1000000)
  --clickhouse URL    ClickHouse's HTTP address (default $KEEL_TEST_CLICKHOUSE)
  --no-clickhouse     Keel's figures only
  --dir DIR           where generated files are kept (default target/bench)
  --workers LIST      worker counts to replay with, comma-separated (default 1,2)
  --batch N           most records per worker per epoch (default: keel run's, or keel sql's
                      with --no-routing)
  --no-routing        Foghorn's routing dataflow off, as keel sql and backfills
  -h, --help          this text";

/// Stops the benchmark over a bad argument: the problem and the usage, no backtrace.
fn refuse(problem: &str) -> ! {
    eprintln!("bench: {problem}\n\n{USAGE}");
    std::process::exit(2)
}

/// A count of at least 1, checked as `keel` checks its own, or the benchmark stops naming `flag`.
fn count(flag: &str, text: &str) -> usize {
    keel::cli::at_least_one(text).unwrap_or_else(|e| refuse(&format!("{flag} {text:?}: {e}")))
}

fn parse_args() -> Options {
    let mut options = Options {
        events: 10_000_000,
        sessions: 1_000_000,
        clickhouse: std::env::var("KEEL_TEST_CLICKHOUSE").ok(),
        dir: PathBuf::from("target/bench"),
        workers: vec![1, 2],
        batch: 0,
        routing: true,
    };
    let mut batch = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| refuse(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--events" => options.events = count(&arg, &value()) as u64,
            "--sessions" => options.sessions = count(&arg, &value()) as u64,
            "--clickhouse" => options.clickhouse = Some(value()),
            "--no-clickhouse" => options.clickhouse = None,
            "--dir" => options.dir = PathBuf::from(value()),
            "--workers" => {
                options.workers = value().split(',').map(|w| count(&arg, w)).collect();
            }
            "--batch" => batch = Some(count(&arg, &value())),
            "--no-routing" => options.routing = false,
            "--bench" => {}
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0)
            }
            other => refuse(&format!("unknown argument {other}")),
        }
    }
    options.batch = batch.unwrap_or(if options.routing {
        EngineOptions::default().batch
    } else {
        engine::REPLAY_BATCH
    });
    options
}

/// The fleet the benchmark simulates: large enough that per-stream state is realistic.
fn fleet(seed: u64) -> SimConfig {
    SimConfig {
        seed,
        tenants: 10,
        nodes: 48,
        streams: 400,
        arrivals_per_second: 1_000.0,
        ..SimConfig::default()
    }
}

fn memory_kib(field: &str) -> u64 {
    keel_api::metrics::process_status_kib(field).unwrap_or(0)
}

fn group(n: f64) -> String {
    keel::summary::group(n.max(0.0) as u64)
}

/// Writes simulated records as bare values until `enough` says stop, unless a complete file is
/// already there; returns the number of records.
fn generate(
    path: &Path,
    config: SimConfig,
    mut enough: impl FnMut(u64, &SimRecord) -> bool,
) -> u64 {
    let marker = path.with_extension("complete");
    if let Ok(count) = std::fs::read_to_string(&marker)
        && let Ok(count) = count.trim().parse()
    {
        return count;
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    eprintln!("bench: generating {}", path.display());
    let started = Instant::now();
    let mut out = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(path).unwrap());
    let mut simulator = Simulator::new(config);
    let mut value = Vec::new();
    let mut written = 0;
    loop {
        value.clear();
        let record = simulator.next_record(&mut value);
        out.write_all(&value).unwrap();
        out.write_all(b"\n").unwrap();
        written += 1;
        if enough(written, &record) {
            break;
        }
    }
    out.flush().unwrap();
    std::fs::write(&marker, written.to_string()).unwrap();
    eprintln!(
        "bench: {} records in {:.1} s",
        group(written as f64),
        started.elapsed().as_secs_f64()
    );
    written
}

fn run_file(path: &Path, workers: usize, options: &Options) -> (Handles, f64, f64) {
    let handles = Handles::default();
    let options = EngineOptions {
        workers,
        batch: options.batch,
        routing: options.routing,
        ..EngineOptions::default()
    };
    let cpu = cpu_seconds();
    let started = Instant::now();
    engine::run(
        Arc::new(FileSource::open(path).unwrap()),
        &options,
        &handles,
    )
    .unwrap();
    (
        handles,
        started.elapsed().as_secs_f64(),
        cpu_seconds() - cpu,
    )
}

// ---------------------------------------------------------------------------------------------
// ClickHouse.

struct ClickHouse {
    url: String,
    http: std::net::SocketAddr,
}

impl ClickHouse {
    fn new(url: &str) -> Self {
        let host = url.trim_start_matches("http://").trim_end_matches('/');
        ClickHouse {
            url: url.to_owned(),
            http: std::net::ToSocketAddrs::to_socket_addrs(host)
                .unwrap()
                .next()
                .unwrap(),
        }
    }

    /// One HTTP request; returns the body or panics with ClickHouse's message.
    fn request(&self, query: &str, body: &[u8]) -> String {
        use std::io::Read;
        let mut stream = std::net::TcpStream::connect(self.http).unwrap_or_else(|e| {
            panic!(
                "ClickHouse at {} is not reachable ({e}): start it with scripts/bench",
                self.url
            )
        });
        let path = format!("/?query={}", percent(query));
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: ch\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        stream.write_all(body).unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        let text = String::from_utf8_lossy(&response).into_owned();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(rest)
        } else {
            rest.to_owned()
        };
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "ClickHouse: {query}\n{}",
            body.trim()
        );
        body
    }

    fn query(&self, sql: &str) -> String {
        self.request(sql, b"")
    }
}

fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
    out
}

const RAW_TABLE: &str = "CREATE TABLE bench.raw (
    event_id String, event_type String, tenant String, stream String, time_ms Int64,
    node String, session String, host String, country String, connector String,
    duration_s UInt64, down UInt64, up UInt64,
    status String, buffer_state String, has_issues UInt8, tier String, bitrate UInt64, fps Float64,
    sent UInt64, lost UInt64, uploaded UInt64,
    cpu_tenths UInt32, ram_used UInt64, ram_max UInt64,
    route_status String, score Int64, distance Float64
) ENGINE = MergeTree ORDER BY (tenant, stream, time_ms)";

fn tsv(out: &mut Vec<u8>, event: &Event) {
    let clean = |s: &str| s.replace(['\t', '\n', '\\'], " ");
    let tenant = event.tenant.to_string();
    let mut row = vec![
        event.id.to_string(),
        event.kind.type_name().to_owned(),
        tenant,
    ];
    let stream = event
        .kind
        .stream()
        .map(|s| s.internal_name.as_str())
        .unwrap_or("");
    row.push(stream.to_owned());
    row.push(event.time.to_string());
    let (mut node, mut session, mut host, mut country, mut connector) = (
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    );
    let (mut duration, mut down, mut up) = (0u64, 0u64, 0u64);
    let (mut status, mut buffer, mut issues, mut tier, mut bitrate, mut fps) = (
        String::new(),
        String::new(),
        0u8,
        String::new(),
        0u64,
        0.0f64,
    );
    let (mut sent, mut lost, mut uploaded) = (0u64, 0u64, 0u64);
    let (mut cpu, mut ram_used, mut ram_max) = (0u32, 0u64, 0u64);
    let (mut route_status, mut score, mut distance) = (String::new(), -1i64, -1.0f64);
    match &event.kind {
        EventKind::ViewerConnect(c) => {
            node = c.node.to_string();
            session = c.session_id.to_string();
            host = c.place.host.to_string();
            country = c.place.country.to_string();
            connector = c.place.connector.to_string();
        }
        EventKind::ViewerDisconnect(d) => {
            node = d.node.to_string();
            session = d.session_id.to_string();
            host = d.place.host.to_string();
            country = d.place.country.to_string();
            connector = d.place.connector.to_string();
            duration = d.duration_s;
            down = d.down_bytes;
            up = d.up_bytes;
        }
        EventKind::StreamUpdate(u) => {
            node = u.node.to_string();
            status = u.status.to_string();
            buffer = u.buffer_state.to_string();
            issues = u8::from(u.has_issues);
            tier = u.quality_tier.to_string();
            bitrate = u.bitrate_bps;
            fps = u.fps;
            sent = u.packets_sent;
            lost = u.packets_lost;
            uploaded = u.uploaded_bytes;
        }
        EventKind::StreamBuffer(b) => {
            node = b.node.to_string();
            buffer = b.buffer_state.to_string();
            issues = u8::from(b.has_issues);
            tier = b.quality_tier.to_string();
        }
        EventKind::TrackList(t) => tier = t.quality_tier.to_string(),
        EventKind::IngestStart(s) => {
            node = s.node.to_string();
            status = "live".to_owned();
        }
        EventKind::StreamEnd(e) => {
            node = e.node.to_string();
            status = "offline".to_owned();
            uploaded = e.uploaded_bytes;
        }
        EventKind::NodeUpdate(n) => {
            node = n.node.to_string();
            cpu = n.cpu_tenths;
            ram_used = n.ram_current;
            ram_max = n.ram_max;
        }
        EventKind::Routing(r) => {
            route_status = r.status.to_string();
            score = r.score.map_or(-1, |s| s as i64);
            distance = r.distance().unwrap_or(-1.0);
        }
        EventKind::StreamSignal(_) | EventKind::Unknown(_) => {}
    }
    for field in [node, session, host, country, connector] {
        row.push(clean(&field));
    }
    row.extend([duration.to_string(), down.to_string(), up.to_string()]);
    row.extend([
        clean(&status),
        clean(&buffer),
        issues.to_string(),
        clean(&tier),
        bitrate.to_string(),
        fps.to_string(),
    ]);
    row.extend([sent.to_string(), lost.to_string(), uploaded.to_string()]);
    row.extend([cpu.to_string(), ram_used.to_string(), ram_max.to_string()]);
    row.extend([
        clean(&route_status),
        score.to_string(),
        distance.to_string(),
    ]);
    out.extend_from_slice(row.join("\t").as_bytes());
    out.push(b'\n');
}

/// The Periscope tables as ClickHouse 18.16 queries over the raw events. `{W}` is the newest
/// event time (open sessions count up to it).
const SESSIONS: &str = "SELECT tenant, stream, node, session,
        countIf(event_type = 'viewer_connect') AS nc,
        minIf(time_ms, event_type = 'viewer_connect') AS c,
        countIf(event_type = 'viewer_disconnect') AS nd,
        maxIf(time_ms, event_type = 'viewer_disconnect') AS d,
        argMaxIf(duration_s, time_ms, event_type = 'viewer_disconnect') AS dur,
        argMaxIf(down, time_ms, event_type = 'viewer_disconnect') AS bytes,
        if(nc > 0, argMinIf(country, time_ms, event_type = 'viewer_connect'),
                   argMaxIf(country, time_ms, event_type = 'viewer_disconnect')) AS cc,
        if(nc > 0, argMinIf(if(host != '', host, concat(node, '|', session)), time_ms, event_type = 'viewer_connect'),
                   argMaxIf(if(host != '', host, concat(node, '|', session)), time_ms, event_type = 'viewer_disconnect')) AS identity,
        if(nc > 0, c, d - toInt64(dur) * 1000) AS s,
        if(nd > 0, greatest(d, s), toInt64({W})) AS e
    FROM bench.raw
    WHERE event_type IN ('viewer_connect', 'viewer_disconnect')
    GROUP BY tenant, stream, node, session";

fn queries(watermark: i64) -> Vec<(&'static str, String)> {
    let sessions = SESSIONS.replace("{W}", &watermark.to_string());
    let w = watermark;
    vec![
        (
            "streams",
            format!(
                "SELECT tenant, stream, count() AS total_sessions, countIf(nd = 0) AS current_viewers,
                    uniqExact(identity) AS unique_viewers, sum(e - s) AS viewer_ms, sum(bytes) AS egress,
                    arrayReduce('max', arrayCumSum(arrayMap(k -> if(k % 4 = 0, -1, 1),
                        arraySort(groupArrayArray(if(nd > 0, [s * 4 + 2, e * 4], [s * 4 + 2])))))) AS peak
                 FROM ({sessions}) GROUP BY tenant, stream ORDER BY tenant, stream"
            ),
        ),
        (
            "viewers_by_country",
            format!(
                "SELECT tenant, stream, cc, count(), countIf(nd = 0), sum(e - s), sum(bytes)
                 FROM ({sessions}) GROUP BY tenant, stream, cc"
            ),
        ),
        (
            "usage_5m",
            format!(
                "SELECT tenant, stream, w * 300000 AS window_start,
                    greatest(if(arrayCount(k -> k <= w * 1200000 + 3, keys) = 0, 0,
                                levels[arrayCount(k -> k <= w * 1200000 + 3, keys)]),
                             arrayReduce('max', arrayFilter((l, k) -> k > w * 1200000 + 3 AND k < (w + 1) * 1200000, levels, keys))) AS peak,
                    arrayCount(x -> intDiv(x, 300000) = w, starts) AS started,
                    arraySum(arrayMap((x, y) -> greatest(least(y, (w + 1) * 300000) - greatest(x, w * 300000), 0), starts, ends)) AS viewer_ms
                 FROM (
                    SELECT tenant, stream, keys, arrayCumSum(arrayMap(k -> if(k % 4 = 0, -1, 1), keys)) AS levels, starts, ends,
                        arrayJoin(arrayMap(i -> intDiv(arrayReduce('min', starts), 300000) + toInt64(i),
                            range(toUInt64(intDiv({w}, 300000) - intDiv(arrayReduce('min', starts), 300000) + 1)))) AS w
                    FROM (
                        SELECT tenant, stream,
                            arraySort(groupArrayArray(if(nd > 0, [s * 4 + 2, e * 4], [s * 4 + 2]))) AS keys,
                            groupArray(s) AS starts, groupArray(e) AS ends
                        FROM ({sessions}) GROUP BY tenant, stream))
                 WHERE peak > 0 OR started > 0 OR viewer_ms > 0"
            ),
        ),
        (
            "stream_health_5m",
            "SELECT tenant, stream, intDiv(time_ms, 300000) AS w, count(),
                countIf(buffer_state = 'DRY'), countIf(has_issues = 1),
                avgIf(bitrate / 1000, bitrate > 0), avgIf(fps, fps > 0),
                argMaxIf(tier, time_ms, tier != ''), sum(lost) / sum(sent)
             FROM bench.raw
             WHERE event_type IN ('stream_lifecycle_update', 'stream_buffer')
                OR (event_type = 'stream_track_list' AND tier != '')
             GROUP BY tenant, stream, w"
                .to_owned(),
        ),
        (
            "nodes",
            "SELECT tenant, node, argMax(cpu_tenths, time_ms) / 10, argMax(ram_used, time_ms), argMax(ram_max, time_ms), max(time_ms)
             FROM bench.raw WHERE event_type = 'node_lifecycle_update' GROUP BY tenant, node"
                .to_owned(),
        ),
        (
            "routing_hourly",
            "SELECT tenant, intDiv(time_ms, 3600000) AS h, count(), countIf(route_status = 'success'),
                avgIf(distance, distance >= 0), avgIf(score, score >= 0)
             FROM bench.raw WHERE event_type = 'load_balancing' GROUP BY tenant, h"
                .to_owned(),
        ),
        (
            "stream_status",
            "SELECT tenant, stream, argMax(status, time_ms), argMaxIf(uploaded, time_ms, uploaded > 0), max(time_ms)
             FROM bench.raw WHERE stream != '' GROUP BY tenant, stream"
                .to_owned(),
        ),
    ]
}

struct ClickHouseRun {
    load_s: f64,
    query_s: f64,
    requery_s: f64,
    requery_default_threads_s: f64,
    agree: String,
}

fn clickhouse(url: &str, file: &Path, keel_streams: &[StreamRow]) -> ClickHouseRun {
    let ch = ClickHouse::new(url);
    ch.query("CREATE DATABASE IF NOT EXISTS bench");
    ch.query("DROP TABLE IF EXISTS bench.raw");
    ch.query(RAW_TABLE);
    eprintln!("bench: flattening the events for ClickHouse");
    // Flattening is Keel's codec, not ClickHouse's work: it is done before the clock starts.
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut chunk = Vec::new();
    let mut watermark = i64::MIN;
    for (i, line) in BufReader::with_capacity(1 << 20, std::fs::File::open(file).unwrap())
        .split(b'\n')
        .enumerate()
    {
        let line = line.unwrap();
        let record = Record {
            position: Position::Simulated { seq: i as u64 },
            value: &line,
            headers: Headers::default(),
        };
        if let Ok(event) = decode(&record) {
            watermark = watermark.max(event.time);
            tsv(&mut chunk, &event);
        }
        if chunk.len() > 64 << 20 {
            chunks.push(std::mem::take(&mut chunk));
        }
    }
    chunks.push(chunk);
    eprintln!("bench: inserting into ClickHouse");
    let started = Instant::now();
    for chunk in &chunks {
        ch.request("INSERT INTO bench.raw FORMAT TabSeparated", chunk);
    }
    let load_s = started.elapsed().as_secs_f64();
    drop(chunks);
    let run_all = |threads: &str| {
        let started = Instant::now();
        let mut results = BTreeMap::new();
        for (name, sql) in queries(watermark) {
            results.insert(
                name,
                ch.query(&format!(
                    "{sql} SETTINGS max_threads = {threads} FORMAT TabSeparated"
                )),
            );
        }
        (started.elapsed().as_secs_f64(), results)
    };
    eprintln!("bench: querying ClickHouse");
    let (query_s, results) = run_all("1");
    // Row-by-row check of `streams` against Keel's live table.
    let mut mismatches = 0;
    let mut theirs: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for line in results["streams"].lines() {
        let f: Vec<String> = line.split('\t').map(str::to_owned).collect();
        theirs.insert((f[0].clone(), f[1].clone()), f[2..].to_vec());
    }
    let mut compared = 0;
    for row in keel_streams.iter().filter(|r| r.total_sessions > 0) {
        compared += 1;
        let ours = vec![
            row.total_sessions.to_string(),
            row.current_viewers.to_string(),
            row.unique_viewers.to_string(),
            ((row.viewer_seconds * 1000.0).round() as i64).to_string(),
            row.egress_bytes.to_string(),
            row.peak_viewers.to_string(),
        ];
        if theirs.get(&(row.tenant_id.to_string(), row.internal_name.to_string())) != Some(&ours) {
            mismatches += 1;
        }
    }
    let agree = format!("{compared} stream rows compared, {mismatches} differ");
    // The update path: one more event, then the same queries again.
    let one = {
        let mut out = Vec::new();
        let event = Event {
            id: uuid::Uuid::from_u128(7),
            tenant: uuid::Uuid::from_u128(8),
            time: watermark,
            kind: EventKind::ViewerConnect(keel_sources::event::ViewerConnect {
                stream: keel_sources::event::StreamRef {
                    internal_name: Sym::new("bench-late"),
                    stream_id: None,
                },
                node: Sym::new("edge-x"),
                session_id: "1".into(),
                place: Default::default(),
            }),
        };
        tsv(&mut out, &event);
        out
    };
    let started = Instant::now();
    ch.request("INSERT INTO bench.raw FORMAT TabSeparated", &one);
    let (q1, _) = run_all("1");
    let requery_s = started.elapsed().as_secs_f64().max(q1);
    let started = Instant::now();
    ch.request("INSERT INTO bench.raw FORMAT TabSeparated", &one);
    run_all("2");
    let requery_default_threads_s = started.elapsed().as_secs_f64();
    ClickHouseRun {
        load_s,
        query_s,
        requery_s,
        requery_default_threads_s,
        agree,
    }
}

// ---------------------------------------------------------------------------------------------
// Keel's update path.

fn keel_update_latency(file: &Path, routing: bool) -> (f64, f64, u64) {
    let (source, sender) = MemorySource::new("bench", 1 << 16);
    let handles = Handles::default();
    let engine = {
        let handles = handles.clone();
        let options = EngineOptions {
            routing,
            ..EngineOptions::default()
        };
        std::thread::spawn(move || engine::run(Arc::new(source), &options, &handles))
    };
    let mut loaded = 0u64;
    for line in BufReader::with_capacity(1 << 20, std::fs::File::open(file).unwrap()).split(b'\n') {
        sender
            .send(OwnedRecord {
                value: line.unwrap(),
                headers: Vec::new(),
            })
            .unwrap();
        loaded += 1;
    }
    while handles.stats.records.load(Ordering::Relaxed) < loaded {
        std::thread::sleep(Duration::from_millis(20));
    }
    let newest = handles.stats.newest_event.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    let tenant = "5eed517e-ba5e-da7a-517e-ba5eda7a0001";
    let mut samples = Vec::new();
    for i in 0..200 {
        let session = format!("late-{i}");
        let value = format!(
            r#"{{"event_id":"{}","event_type":"viewer_connect","timestamp":"{}","tenant_id":"{tenant}","schema_version":2,"data":{{"node_id":"edge-x","viewer_connect":{{"stream_name":"live+bench-late","session_id":"{session}","host":"192.0.2.{}"}}}}}}"#,
            uuid::Uuid::from_u128(1 << 100 | i as u128),
            keel_operators::time::format_rfc3339(newest),
            i % 250
        );
        let started = Instant::now();
        sender
            .send(OwnedRecord {
                value: value.into_bytes(),
                headers: Vec::new(),
            })
            .unwrap();
        let key = (
            Sym::new(tenant),
            Sym::new("bench-late"),
            Sym::new("edge-x"),
            session.as_str().into(),
        );
        loop {
            let visible = handles
                .tables
                .read()
                .unwrap()
                .held::<HeldSessions>("viewer_sessions")
                .get(&key)
                .is_some();
            if visible {
                break;
            }
            std::thread::yield_now();
        }
        samples.push(started.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(sender);
    engine.join().unwrap().unwrap();
    samples.sort_by(f64::total_cmp);
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
        loaded,
    )
}

// ---------------------------------------------------------------------------------------------
// Memory per open session (child process).

fn memory_child(file: &Path, batch: usize, routing: bool) {
    let handles = Handles::default();
    let before = memory_kib("VmRSS:");
    let options = EngineOptions {
        batch,
        routing,
        ..EngineOptions::default()
    };
    engine::run(
        Arc::new(FileSource::open(file).unwrap()),
        &options,
        &handles,
    )
    .unwrap();
    let after = memory_kib("VmRSS:");
    let peak = memory_kib("VmHWM:");
    let tables = handles.tables.read().unwrap();
    let open: u64 = tables
        .table::<StreamRow>("streams")
        .rows()
        .iter()
        .map(|s| s.current_viewers)
        .sum();
    println!("{open} {before} {after} {peak}");
}

fn main() {
    // As `keel` itself runs.
    keel::without_huge_pages();
    if std::env::args().nth(1).as_deref() == Some("--memory-child") {
        let args: Vec<String> = std::env::args().collect();
        memory_child(
            Path::new(&args[2]),
            args[3].parse().expect("a batch size"),
            // Foghorn's dataflow on unless told "no-routing", as in `keel run`.
            args.get(4).is_none_or(|routing| routing != "no-routing"),
        );
        return;
    }
    let options = parse_args();
    let file = options
        .dir
        .join(format!("events-v2-{}.ndjson", options.events));
    let events = options.events;
    generate(&file, fleet(1), |written, _| written >= events);
    let bytes = std::fs::metadata(&file).unwrap().len();
    println!(
        "# Periscope benchmark: {} version-2 events ({:.2} GB), {} cores, epochs of at most {} records",
        group(options.events as f64),
        bytes as f64 / 1e9,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        group(options.batch as f64)
    );
    println!();
    println!(
        "## Keel: decode + every Periscope dataflow, file replay ({})",
        if options.routing {
            "with Foghorn's routing dataflow, as `keel run`"
        } else {
            "routing off, as `keel sql`"
        }
    );
    println!("| workers | wall s | events/s | CPU s | events per CPU-second (per core) |");
    println!("|---|---|---|---|---|");
    let mut streams = Vec::new();
    let mut keel_per_core = 0.0;
    for &workers in &options.workers {
        let (handles, wall, cpu) = run_file(&file, workers, &options);
        let events = handles.stats.events.load(Ordering::Relaxed) as f64;
        println!(
            "| {workers} | {wall:.2} | {} | {cpu:.2} | {} |",
            group(events / wall),
            group(events / cpu)
        );
        if workers == 1 {
            keel_per_core = events / cpu;
            streams = handles
                .tables
                .read()
                .unwrap()
                .table::<StreamRow>("streams")
                .rows()
                .to_vec();
        }
    }
    println!();
    let clickhouse_run = options
        .clickhouse
        .as_deref()
        .map(|url| clickhouse(url, &file, &streams));
    if let Some(ch) = &clickhouse_run {
        let per_core = options.events as f64 / (ch.load_s + ch.query_s);
        println!("## ClickHouse 18.16 on the same events (max_threads = 1)");
        println!("| load s | queries s | events per core-second | Keel ÷ ClickHouse per core |");
        println!("|---|---|---|---|");
        println!(
            "| {:.2} | {:.2} | {} | {:.1}× |",
            ch.load_s,
            ch.query_s,
            group(per_core),
            keel_per_core / per_core
        );
        println!();
        println!("Results check: {}.", ch.agree);
        println!();
    }
    let (p50, p99, loaded) = keel_update_latency(&file, options.routing);
    println!(
        "## Update path: one new event after {} events",
        group(loaded as f64)
    );
    println!("| system | time until visible |");
    println!("|---|---|");
    println!(
        "| Keel, incremental (1 worker) | p50 {:.2} ms, p99 {:.2} ms |",
        p50 * 1e3,
        p99 * 1e3
    );
    if let Some(ch) = &clickhouse_run {
        println!(
            "| ClickHouse, insert + re-query, 1 thread | {:.0} ms ({:.0}× Keel's p50) |",
            ch.requery_s * 1e3,
            ch.requery_s / p50
        );
        println!(
            "| ClickHouse, insert + re-query, 2 threads | {:.0} ms |",
            ch.requery_default_threads_s * 1e3
        );
    }
    println!();
    let sessions_file = options
        .dir
        .join(format!("open-sessions-{}.ndjson", options.sessions));
    let mut open_config = fleet(2);
    // Nobody leaves and no stream ends: every session that connects stays open.
    open_config.mean_session_s = 1e9;
    open_config.mean_live_s = 1e9;
    let mut connects = 0;
    let needed = options.sessions;
    let lines = generate(&sessions_file, open_config, |_, record| {
        connects += u64::from(record.event_type == "viewer_connect");
        connects >= needed
    });
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--memory-child",
            sessions_file.to_str().unwrap(),
            &options.batch.to_string(),
            if options.routing {
                "routing"
            } else {
                "no-routing"
            },
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&child.stdout);
    let f: Vec<u64> = text
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let (open, before, after, peak) = (f[0], f[1], f[2], f[3]);
    println!(
        "## Memory: {} open viewer sessions ({} records, {})",
        group(open as f64),
        group(lines as f64),
        if options.routing {
            "with Foghorn's routing dataflow"
        } else {
            "routing off"
        }
    );
    println!(
        "| resident before | after | peak | bytes per open session (after − before) | (peak − before) |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {} MiB | {} MiB | {} MiB | {:.0} | {:.0} |",
        before / 1024,
        after / 1024,
        peak / 1024,
        (after - before) as f64 * 1024.0 / open as f64,
        (peak - before) as f64 * 1024.0 / open as f64
    );
}
