//! Counters and the Prometheus text the `/metrics` endpoint serves.
//!
//! [`EngineStats`] is written by the engine (records, events, errors, newest event time, the
//! clock its epochs count from); [`Metrics`] adds request latencies. [`render`] writes both, plus
//! live-table row counts and the age of the newest published epoch, in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keel_sinks::live::LiveTables;

/// Counters the engine keeps while it runs.
#[derive(Debug)]
pub struct EngineStats {
    /// What kind of source feeds the engine (`simulator`, `file`, `kafka`, `memory`).
    pub source: Mutex<String>,
    /// Records read from the source.
    pub records: AtomicU64,
    /// Records decoded into events.
    pub events: AtomicU64,
    /// Records refused (now rows of `ingest_errors`).
    pub errors: AtomicU64,
    /// Events left out because their time is outside the range asked for (backfills).
    pub skipped: AtomicU64,
    /// Epochs the workers have sent into the dataflow (each is published as a whole).
    pub epochs: AtomicU64,
    /// Newest event time seen, ms.
    pub newest_event: AtomicI64,
    /// When the engine's epoch clock started (epochs are microseconds since then).
    pub started: Instant,
}

impl Default for EngineStats {
    fn default() -> Self {
        EngineStats {
            source: Mutex::new("none".to_owned()),
            records: AtomicU64::new(0),
            events: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            epochs: AtomicU64::new(0),
            newest_event: AtomicI64::new(i64::MIN),
            started: Instant::now(),
        }
    }
}

impl EngineStats {
    /// Microseconds on the engine's epoch clock.
    pub fn clock(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// Upper bounds of the request latency buckets, seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Request metrics of the API.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), Histogram>>,
}

impl Metrics {
    /// Records one request to `route` that answered `status` after `elapsed`.
    pub fn observe(&self, route: &str, status: u16, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let mut requests = self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let histogram = requests
            .entry((route.to_owned(), status))
            .or_insert_with(|| Histogram {
                counts: vec![0; BUCKETS.len()],
                ..Histogram::default()
            });
        for (bound, count) in BUCKETS.iter().zip(&mut histogram.counts) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        histogram.sum += seconds;
        histogram.count += 1;
    }
}

/// Metrics of services that run beside the API (the edge) and register themselves: each
/// renderer appends its Prometheus text.
#[derive(Default)]
pub struct ExtraMetrics(Mutex<Vec<MetricsRenderer>>);

/// Appends a service's Prometheus text.
pub type MetricsRenderer = Box<dyn Fn(&mut String) + Send + Sync>;

impl std::fmt::Debug for ExtraMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExtraMetrics")
    }
}

impl ExtraMetrics {
    /// Adds a renderer.
    pub fn add(&self, render: impl Fn(&mut String) + Send + Sync + 'static) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Box::new(render));
    }

    /// Appends every renderer's text to `out`.
    pub fn render(&self, out: &mut String) {
        for render in self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            render(out);
        }
    }
}

/// A memory figure of this process from `/proc/self/status`, in KiB: `field` is its name with
/// the colon (`"VmRSS:"` resident now, `"VmHWM:"` resident at the peak). `None` where there is
/// no such file (not Linux) or no such field.
pub fn process_status_kib(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The Prometheus text for the engine, the API and the live tables.
pub fn render(stats: &EngineStats, metrics: &Metrics, tables: &LiveTables) -> String {
    let mut out = String::new();
    let source = stats.source.lock().map(|s| s.clone()).unwrap_or_default();
    let counter = |out: &mut String, name: &str, help: &str, value: u64, labels: &str| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name}{labels} {value}"
        );
    };
    counter(
        &mut out,
        "keel_records_total",
        "Records read from the source.",
        stats.records.load(Ordering::Relaxed),
        &format!("{{source=\"{source}\"}}"),
    );
    counter(
        &mut out,
        "keel_events_total",
        "Records decoded into events.",
        stats.events.load(Ordering::Relaxed),
        &format!("{{source=\"{source}\"}}"),
    );
    counter(
        &mut out,
        "keel_decode_errors_total",
        "Records refused (rows of ingest_errors).",
        stats.errors.load(Ordering::Relaxed),
        &format!("{{source=\"{source}\"}}"),
    );
    counter(
        &mut out,
        "keel_epochs_total",
        "Epochs sent into the dataflow by the workers.",
        stats.epochs.load(Ordering::Relaxed),
        "",
    );
    let lag = tables.epoch().map_or(f64::NAN, |epoch| {
        stats.clock().saturating_sub(epoch) as f64 / 1e6
    });
    let _ = writeln!(
        out,
        "# HELP keel_epoch_lag_seconds Age of the newest epoch published to the live tables.\n# TYPE keel_epoch_lag_seconds gauge\nkeel_epoch_lag_seconds {lag}"
    );
    // The live tables hold every session and window ever seen, so resident memory grows with
    // the traffic for as long as the engine runs (README, "Memory over time"): watch it.
    if let Some(bytes) = process_status_kib("VmRSS:").map(|kib| kib * 1024) {
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory of this process.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {bytes}"
        );
    }
    let newest = stats.newest_event.load(Ordering::Relaxed);
    if newest > i64::MIN {
        let _ = writeln!(
            out,
            "# HELP keel_newest_event_time_seconds Newest event time seen.\n# TYPE keel_newest_event_time_seconds gauge\nkeel_newest_event_time_seconds {}",
            newest as f64 / 1000.0
        );
    }
    let _ = writeln!(
        out,
        "# HELP keel_table_rows Rows in each live table.\n# TYPE keel_table_rows gauge"
    );
    for name in tables.names() {
        let _ = writeln!(
            out,
            "keel_table_rows{{table=\"{name}\"}} {}",
            tables.len(name).unwrap_or(0)
        );
    }
    if let Some(hub) = tables.hub() {
        let _ = writeln!(
            out,
            "# HELP keel_subscribers Live subscriptions (table changes and event feeds).\n# TYPE keel_subscribers gauge\nkeel_subscribers {}",
            hub.subscribers()
        );
        let _ = writeln!(
            out,
            "# HELP keel_subscriber_queued_bytes Bytes of updates waiting in subscribers' queues.\n# TYPE keel_subscriber_queued_bytes gauge\nkeel_subscriber_queued_bytes {}",
            hub.queued_bytes()
        );
        counter(
            &mut out,
            "keel_dropped_messages_total",
            "Updates not delivered because a subscriber's queue was full or over its byte budget.",
            hub.dropped(),
            "",
        );
    }
    let requests = metrics
        .requests
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "# HELP keel_http_request_duration_seconds API request latency.\n# TYPE keel_http_request_duration_seconds histogram"
    );
    for ((route, status), histogram) in &requests {
        let labels = format!("route=\"{route}\",status=\"{status}\"");
        for (bound, count) in BUCKETS.iter().zip(&histogram.counts) {
            let _ = writeln!(
                out,
                "keel_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "keel_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
            histogram.count
        );
        let _ = writeln!(
            out,
            "keel_http_request_duration_seconds_sum{{{labels}}} {}",
            histogram.sum
        );
        let _ = writeln!(
            out,
            "keel_http_request_duration_seconds_count{{{labels}}} {}",
            histogram.count
        );
    }
    out
}
