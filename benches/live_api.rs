//! The live API benchmark: pushed incremental results against re-running queries, in one run.
//!
//! ```text
//! cargo bench --bench live_api -- [--rate 100000] [--seconds 10] [--subscribers 1000] [--pace-ratio 1] [--pace-most-ms 2]
//! ```
//!
//! An engine (one worker) reads viewer connections from memory at `--rate` events/s, spread over
//! 1,000 streams of 10 tenants; the API serves on loopback; `--subscribers` GraphQL clients
//! (graphql-transport-ws), one per stream, each with its tenant's token, subscribe to
//! `liveTable(table: "viewer_sessions", where: {internal_name: …})`. Each event carries its
//! send time, so every client measures, per row it receives, the time from the event entering
//! the engine to its change reaching the client. It prints:
//!
//! 1. **Push**: input rate achieved, change latency p50/p99/max, messages and rows delivered,
//!    updates dropped for slow clients, and the process's CPU.
//! 2. **Re-query (the naive alternative)**: the same subscriptions served by re-running each
//!    subscriber's query through DataFusion whenever its stream changed — measured on the same
//!    table in the same run, as queries per second against the rate the workload needs.
//! 3. **SQL point query** on the `viewer_sessions` table the run filled (topped up to a million
//!    sessions before parts 2 and 3): p50/p99 of one session looked up by a tenant's token.

mod support;

use support::cpu_seconds;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use keel::engine::{self, EngineOptions, Handles, Pace};
use keel::serve::Api;
use keel_api::auth::{Auth, Claims, Scope};
use keel_api::server::Limits;
use keel_operators::time::format_rfc3339;
use keel_sources::memory::{MemorySource, OwnedRecord};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const TENANTS: usize = 10;
const STREAMS: usize = 1000;
const SECRET: &str = "the-live-api-benchmark-secret";

struct Options {
    rate: u64,
    seconds: u64,
    subscribers: usize,
    /// The engine's `Pace::ratio` (0: a new epoch as soon as records are there). The engine
    /// paces only while nobody subscribes, so this matters with `--subscribers 0`.
    pace_ratio: u32,
    /// The engine's `Pace::most`, in milliseconds.
    pace_most_ms: u64,
    /// Most records per epoch (`keel run --batch`).
    batch: usize,
}

fn parse_args() -> Options {
    let mut options = Options {
        rate: 100_000,
        seconds: 10,
        subscribers: 1000,
        pace_ratio: Pace::default().ratio,
        pace_most_ms: Pace::default().most.as_millis() as u64,
        batch: EngineOptions::default().batch,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--rate" => options.rate = value().parse().expect("--rate N"),
            "--seconds" => options.seconds = value().parse().expect("--seconds N"),
            "--subscribers" => options.subscribers = value().parse().expect("--subscribers N"),
            "--pace-ratio" => options.pace_ratio = value().parse().expect("--pace-ratio N"),
            "--pace-most-ms" => options.pace_most_ms = value().parse().expect("--pace-most-ms N"),
            "--batch" => options.batch = value().parse().expect("--batch N"),
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    assert!(
        options.subscribers <= STREAMS,
        "at most {STREAMS} subscribers"
    );
    options
}

fn tenant(index: usize) -> String {
    format!("be0c4a11-0000-4000-8000-{index:012x}")
}

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A version-2 viewer connection on stream `s{stream}` whose session id carries its send time.
fn record(seq: u64, stream: usize, sent: u64) -> OwnedRecord {
    let tenant = tenant(stream % TENANTS);
    let value = format!(
        concat!(
            r#"{{"event_id":"00000000-0000-4000-8000-{seq:012x}","event_type":"viewer_connect","#,
            r#""timestamp":"{time}","source":"foghorn","tenant_id":"{tenant}","schema_version":2,"#,
            r#""data":{{"trigger_type":"USER_NEW","node_id":"edge-{node}","viewer_connect":{{"#,
            r#""stream_name":"live+s{stream}","connector":"HLS","session_id":"{sent}-{seq}","#,
            r#""client_country":"NL","client_city":"Amsterdam"}}}}}}"#
        ),
        seq = seq,
        time = format_rfc3339((sent / 1000) as i64),
        tenant = tenant,
        node = stream % 16,
        stream = stream,
        sent = sent,
    );
    OwnedRecord {
        value: value.into_bytes(),
        headers: Vec::new(),
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(micros: u64) -> String {
    format!("{:.2} ms", micros as f64 / 1000.0)
}

struct Measured {
    /// (arrival, latency) of every row, in microseconds.
    latencies: Mutex<Vec<(u64, u64)>>,
    messages: AtomicU64,
    rows: AtomicU64,
    measuring: AtomicBool,
}

/// The parts of a subscription message the clients read.
#[derive(serde::Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow)]
    payload: Option<Payload<'a>>,
}

#[derive(serde::Deserialize)]
struct Payload<'a> {
    #[serde(borrow)]
    data: Option<Data<'a>>,
}

#[derive(serde::Deserialize)]
struct Data<'a> {
    #[serde(rename = "liveTable", borrow)]
    live_table: Update<'a>,
}

#[derive(serde::Deserialize)]
struct Update<'a> {
    #[serde(default, borrow)]
    changes: Vec<Change<'a>>,
}

#[derive(serde::Deserialize)]
struct Change<'a> {
    diff: i8,
    #[serde(borrow)]
    row: SessionRow<'a>,
}

#[derive(serde::Deserialize)]
struct SessionRow<'a> {
    /// Borrowed from the message unless it holds escapes.
    #[serde(borrow)]
    session_id: std::borrow::Cow<'a, str>,
}

/// One subscriber: connects, subscribes to its stream's sessions, and records the latency of
/// every arriving row.
async fn subscriber(host: String, token: String, stream: usize, measured: Arc<Measured>) {
    let mut request = format!("ws://{host}/graphql")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    // The default 128 KiB read buffer is cleared before every read: most of a client's CPU.
    let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), false)
        .await
        .unwrap();
    let init = json!({"type": "connection_init", "payload": {"token": token}});
    ws.send(Message::text(init.to_string())).await.unwrap();
    let query = format!(
        "subscription {{ liveTable(table: \"viewer_sessions\", where: {{internal_name: \"s{stream}\"}}) {{ kind changes {{ diff row }} }} }}"
    );
    let subscribe = json!({"id": "1", "type": "subscribe", "payload": {"query": query}});
    ws.send(Message::text(subscribe.to_string())).await.unwrap();
    let mut mine = Vec::new();
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let arrived = micros_now();
        // Only what is measured is read out (every change's diff and session id); the rest of
        // each row is skipped by the parser rather than built into a tree, so that the clients,
        // which share the machine with the engine, cost it less.
        let message: Incoming<'_> = serde_json::from_str(&text).unwrap();
        let Some(data) = message
            .payload
            .and_then(|p| p.data)
            .filter(|_| message.kind == "next")
        else {
            continue;
        };
        if !measured.measuring.load(Ordering::Relaxed) {
            continue;
        }
        measured.messages.fetch_add(1, Ordering::Relaxed);
        for change in data.live_table.changes {
            if change.diff != 1 {
                continue;
            }
            measured.rows.fetch_add(1, Ordering::Relaxed);
            let sent: u64 = change
                .row
                .session_id
                .split('-')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(arrived);
            mine.push((arrived, arrived.saturating_sub(sent)));
        }
        if !mine.is_empty() {
            measured.latencies.lock().unwrap().append(&mut mine);
        }
    }
    measured.latencies.lock().unwrap().append(&mut mine);
}

fn main() {
    // As `keel` itself runs.
    keel::without_huge_pages();
    let options = parse_args();
    let handles = Handles::default();
    let (source, sender) = MemorySource::new("bench", 65_536);
    let auth = Auth::new(Some(SECRET.into()), Vec::new()).unwrap();
    let limits = Limits {
        connections_per_tenant: STREAMS,
        ..Limits::default()
    };
    let api = Api::start("127.0.0.1:0", None, auth.clone(), limits, &handles).unwrap();
    let host = api.address().to_string();
    let engine = {
        let handles = handles.clone();
        let options = EngineOptions {
            pace: Pace {
                ratio: options.pace_ratio,
                most: Duration::from_millis(options.pace_most_ms),
            },
            batch: options.batch,
            ..EngineOptions::default()
        };
        std::thread::spawn(move || {
            engine::run(Arc::new(source), &options, &handles).unwrap();
        })
    };

    println!("# Live API benchmark");
    println!();
    println!(
        "{} events/s for {} s over {STREAMS} streams of {TENANTS} tenants; {} GraphQL subscribers (one per stream, filtered, tenant tokens); engine: 1 worker, epochs of at most {} records, pace ratio {} (at most {} ms); machine: {} cores",
        options.rate,
        options.seconds,
        options.subscribers,
        options.batch,
        options.pace_ratio,
        options.pace_most_ms,
        std::thread::available_parallelism().map_or(1, usize::from)
    );
    println!();

    // Clients on their own runtime.
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let measured = Arc::new(Measured {
        latencies: Mutex::new(Vec::new()),
        messages: AtomicU64::new(0),
        rows: AtomicU64::new(0),
        measuring: AtomicBool::new(false),
    });
    let far = i64::try_from(micros_now() / 1_000_000).unwrap() + 3600;
    let tokens: Vec<String> = (0..TENANTS)
        .map(|t| {
            auth.issue(&Claims::member("bench", tenant(t).parse().unwrap(), far))
                .unwrap()
        })
        .collect();
    for stream in 0..options.subscribers {
        clients.spawn(subscriber(
            host.clone(),
            tokens[stream % TENANTS].clone(),
            stream,
            measured.clone(),
        ));
    }
    let started = Instant::now();
    while handles.hub.subscribers() < options.subscribers {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "subscribers did not connect"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The producer: paced in 0.5 ms steps; the first second warms up and is not measured.
    let warmup = Duration::from_secs(1);
    let total = Duration::from_secs(options.seconds) + warmup;
    let began = Instant::now();
    let mut seq = 0u64;
    let mut measured_from = None;
    let mut measured_seq = 0;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    while began.elapsed() < total {
        if measured_from.is_none() && began.elapsed() >= warmup {
            measured.measuring.store(true, Ordering::Relaxed);
            measured_from = Some((
                Instant::now(),
                cpu_seconds(),
                handles.stats.epochs.load(Ordering::Relaxed),
            ));
            measured_seq = seq;
        }
        let due = (began.elapsed().as_secs_f64() * options.rate as f64) as u64;
        while seq < due {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let stream = (rng % STREAMS as u64) as usize;
            sender.send(record(seq, stream, micros_now())).unwrap();
            seq += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let (from, cpu_from, epochs_from) = measured_from.unwrap();
    let elapsed = from.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_from;
    let epochs = handles.stats.epochs.load(Ordering::Relaxed) - epochs_from;
    std::thread::sleep(Duration::from_millis(500));
    measured.measuring.store(false, Ordering::Relaxed);
    let arrivals = std::mem::take(&mut *measured.latencies.lock().unwrap());
    // The p99 of each second of the run, by arrival: tells a steady tail from a few stalls.
    let first = arrivals.iter().map(|(at, _)| *at).min().unwrap_or(0);
    let mut by_second: Vec<Vec<u64>> = Vec::new();
    for &(at, latency) in &arrivals {
        let second = usize::try_from((at - first) / 1_000_000).unwrap();
        if by_second.len() <= second {
            by_second.resize_with(second + 1, Vec::new);
        }
        by_second[second].push(latency);
    }
    let per_second: Vec<String> = by_second
        .iter_mut()
        .map(|second| {
            second.sort_unstable();
            format!("{:.0}", percentile(second, 0.99) as f64 / 1000.0)
        })
        .collect();
    let mut latencies: Vec<u64> = arrivals.into_iter().map(|(_, latency)| latency).collect();
    latencies.sort_unstable();
    let sent = seq - measured_seq;
    println!("## 1. Push: changes to subscribers");
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| input rate achieved | {:.0} events/s |",
        sent as f64 / elapsed
    );
    println!(
        "| rows delivered while measuring (events sent meanwhile, to subscribed streams) | {} ({}) |",
        measured.rows.load(Ordering::Relaxed),
        sent * options.subscribers as u64 / STREAMS as u64
    );
    println!(
        "| messages delivered | {} |",
        measured.messages.load(Ordering::Relaxed)
    );
    println!(
        "| event → subscriber latency p50 | {} |",
        ms(percentile(&latencies, 0.50))
    );
    println!(
        "| event → subscriber latency p99 | {} |",
        ms(percentile(&latencies, 0.99))
    );
    println!(
        "| event → subscriber latency max | {} |",
        ms(latencies.last().copied().unwrap_or(0))
    );
    println!(
        "| latency p99 in each second of the run (ms) | {} |",
        per_second.join(", ")
    );
    println!(
        "| updates dropped for slow clients | {} |",
        handles.hub.dropped()
    );
    println!(
        "| process CPU (engine + API + clients) | {:.2} cores |",
        cpu / elapsed
    );
    println!(
        "| epochs the engine closed per second | {:.0} |",
        epochs as f64 / elapsed
    );
    println!();

    // Fill the table to a million sessions (unpaced), then stop the input.
    while seq < 1_000_000 {
        let stream = (seq % STREAMS as u64) as usize;
        sender.send(record(seq, stream, micros_now())).unwrap();
        seq += 1;
    }
    drop(sender);
    engine.join().unwrap();
    let rows = handles
        .tables
        .read()
        .unwrap()
        .snapshot("viewer_sessions")
        .map(|b| b.num_rows())
        .unwrap_or(0);

    // The naive alternative: re-run each subscriber's query when its stream changed.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Each pushed message is one subscriber's result changing: the naive way re-runs that
    // subscriber's query for it.
    let messages = measured.messages.load(Ordering::Relaxed);
    let changes_per_second = messages as f64 / elapsed;
    let mut naive = Vec::new();
    let budget = Instant::now();
    let mut k = 0usize;
    while budget.elapsed() < Duration::from_secs(10) && naive.len() < 200 {
        let stream = k % options.subscribers;
        k += 1;
        let scope = Scope::Tenant(tenant(stream % TENANTS).parse().unwrap());
        let sql = format!("SELECT * FROM viewer_sessions WHERE internal_name = 's{stream}'");
        let t = Instant::now();
        let batches = runtime
            .block_on(keel_api::sql::query(&handles.tables, scope, &sql))
            .unwrap();
        naive.push(t.elapsed().as_micros() as u64);
        assert!(batches.iter().map(|b| b.num_rows()).sum::<usize>() > 0);
    }
    naive.sort_unstable();
    let mean = naive.iter().sum::<u64>() as f64 / naive.len() as f64;
    let needed = changes_per_second;
    let achievable = 1e6 / mean;
    println!("## 2. Re-query: the same subscriptions by re-running each query through DataFusion");
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| table size | {rows} rows |");
    println!(
        "| one subscriber's query, p50 / p99 | {} / {} |",
        ms(percentile(&naive, 0.5)),
        ms(percentile(&naive, 0.99))
    );
    println!(
        "| re-queries needed per second (one per result change pushed in part 1) | {needed:.0} |"
    );
    println!("| re-queries one core sustains per second | {achievable:.1} |");
    println!(
        "| cores the naive way needs for this load | {:.0} |",
        needed / achievable
    );
    println!("| push, cores used for everything | {:.2} |", cpu / elapsed);
    println!(
        "| ratio (naive cores / push cores) | {:.0}× |",
        (needed / achievable) / (cpu / elapsed)
    );
    println!(
        "| naive latency: one round of {} re-queries on one core | {:.1} s |",
        options.subscribers,
        options.subscribers as f64 * mean / 1e6
    );
    println!();

    // SQL point query on the filled table.
    let mut point = Vec::new();
    let wanted: Vec<(usize, String)> = {
        let tables = handles.tables.read().unwrap();
        let batch = tables.snapshot("viewer_sessions").unwrap();
        let sessions = batch
            .column_by_name("session_id")
            .unwrap()
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap()
            .clone();
        let names = batch
            .column_by_name("internal_name")
            .unwrap()
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap()
            .clone();
        (0..200)
            .map(|i| {
                let row = (i * 7919) % batch.num_rows();
                let stream: usize = names.value(row)[1..].parse().unwrap();
                (stream, sessions.value(row).to_owned())
            })
            .collect()
    };
    for (stream, session) in &wanted {
        let scope = Scope::Tenant(tenant(stream % TENANTS).parse().unwrap());
        let sql = format!(
            "SELECT * FROM viewer_sessions WHERE internal_name = 's{stream}' AND node_id = 'edge-{}' AND session_id = '{session}'",
            stream % 16
        );
        let t = Instant::now();
        let batches = runtime
            .block_on(keel_api::sql::query(&handles.tables, scope, &sql))
            .unwrap();
        point.push(t.elapsed().as_micros() as u64);
        assert_eq!(
            batches.iter().map(|b| b.num_rows()).sum::<usize>(),
            1,
            "{sql}"
        );
    }
    point.sort_unstable();
    println!("## 3. SQL point query");
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| table size | {rows} rows |");
    println!(
        "| one session by key, tenant token, p50 | {} |",
        ms(percentile(&point, 0.5))
    );
    println!(
        "| one session by key, tenant token, p99 | {} |",
        ms(percentile(&point, 0.99))
    );
    api.stop();
    clients.shutdown_background();
}
