//! `keel backfill`: a time range of past events replayed through the same dataflows into the
//! durable stores.
//!
//! It is the recovery path run on purpose: the engine reads the range (a Kafka topic positioned
//! by the broker's timestamps, or a file), keeps only events whose own time is in
//! `[--from, --to)`, and the durable writer stores every closed epoch exactly as `keel run`
//! does. Rows are upserts of computed state, so running the same backfill twice — or again
//! after an interruption — leaves the same tables. Because Keel's state lives in memory, a
//! re-run reads the range from its start again; what the stores already hold is replaced by
//! equal rows, and stored windows of the range it no longer computes are removed at the end
//! ([`crate::reconcile`]).

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use keel_operators::time::parse_rfc3339;
use keel_sources::file::FileSource;
use keel_sources::kafka::{KafkaAddress, KafkaMode, KafkaSource};
use keel_sources::source::Source;

use crate::engine::{self, Handles};

use crate::store::LIVE_DATABASE;
use crate::summary::group;

/// Records are positioned by broker time, events kept by their own time: reading starts this
/// long before `--from` (a clock a little ahead of the broker's) …
const EARLY: i64 = 5 * 60 * 1000;
/// … and continues this long past `--to` (events that reached the broker late).
const LATE: i64 = 60 * 60 * 1000;

/// `keel backfill` options.
#[derive(Debug, Args)]
pub struct BackfillArgs {
    /// Where the events are: `kafka://HOST:PORT/TOPIC` or `file:PATH` (NDJSON).
    #[arg(long)]
    source: String,
    /// Start of the range (RFC 3339, e.g. 2026-11-01T00:00:00Z), inclusive.
    #[arg(long)]
    from: String,
    /// End of the range (RFC 3339), exclusive.
    #[arg(long)]
    to: String,
    /// Seconds without a record after which a Kafka partition counts as read to its end.
    #[arg(long, default_value_t = 10.0, value_parser = crate::cli::seconds)]
    idle: f64,
    #[command(flatten)]
    store: crate::store::StoreArgs,
    /// Timely worker threads.
    #[arg(long, short = 'w', default_value_t = 1, value_parser = crate::cli::at_least_one)]
    workers: usize,
    /// Most records per worker per epoch (as `keel sql`'s replays: nobody reads a backfill's
    /// tables between its epochs, and larger ones cost less).
    #[arg(long, default_value_t = engine::REPLAY_BATCH, value_parser = crate::cli::at_least_one)]
    batch: usize,
}

impl BackfillArgs {
    /// The engine's settings for the range `[from, to)`.
    pub(crate) fn engine_options(&self, from: i64, to: i64) -> engine::EngineOptions {
        engine::EngineOptions {
            workers: self.workers,
            event_range: Some((from, to)),
            // The range's windows are the backfill's own: stored ones it no longer computes
            // (left by an interrupted run) are removed.
            reconcile: Some(crate::reconcile::Coverage::range(from, to)),
            // A backfill routes no viewer.
            routing: false,
            ..engine::EngineOptions::default()
        }
        .with_batch(self.batch)
    }
}

fn time(text: &str, flag: &str) -> anyhow::Result<i64> {
    parse_rfc3339(text).with_context(|| {
        format!("{flag} {text:?} is not an RFC 3339 time such as 2026-11-01T00:00:00Z")
    })
}

fn clock(seconds: f64) -> String {
    let s = seconds.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// One progress line: records read, how far that is, rate, ETA. How far is the share of the
/// input read where the source tells it (`Source::progress`: a file, by its bytes, so its
/// lines need not be counted first), else records of the `expected` (a broker's estimate).
fn progress(read: u64, expected: Option<u64>, share: Option<f64>, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64().max(1e-3);
    let rate = group((read as f64 / seconds) as u64);
    // Time left at the rate so far, with a share `done` of the work done.
    let eta = |done: f64| {
        if done >= 1.0 {
            clock(0.0)
        } else if done > 0.0 {
            clock(seconds * (1.0 - done) / done)
        } else {
            "?".into()
        }
    };
    if let Some(done) = share {
        return format!(
            "backfill: {} records, {:.1}% of the input | {rate} records/s | ETA {}",
            group(read),
            done * 100.0,
            eta(done)
        );
    }
    match expected.filter(|e| *e > 0) {
        Some(expected) => {
            let done = (read as f64 / expected as f64).min(1.0);
            format!(
                "backfill: {} of ~{} records ({:.1}%) | {rate} records/s | ETA {}",
                group(read),
                group(expected),
                done * 100.0,
                eta(done)
            )
        }
        None => format!("backfill: {} records | {rate} records/s", group(read)),
    }
}

/// Runs a backfill.
pub fn backfill(args: &BackfillArgs) -> anyhow::Result<()> {
    let (from, to) = (time(&args.from, "--from")?, time(&args.to, "--to")?);
    if from >= to {
        bail!("--from must be before --to");
    }
    if args.store.clickhouse.is_none() && args.store.database.as_deref().is_none_or(|d| d == "off")
    {
        bail!("nothing to fill: give --clickhouse URL and/or --database URL");
    }
    // A backfill's per-stream tables hold its range's own totals: written over `keel run`'s
    // (whose database is `keel` unless told otherwise) they would replace the whole history's.
    if args.store.clickhouse.is_some() && args.store.clickhouse_database == LIVE_DATABASE {
        bail!(
            "a backfill writes its range's own per-stream totals (streams, nodes, \
             viewers_by_country, unknown_events), which would replace those `keel run` keeps in \
             ClickHouse database {LIVE_DATABASE}: name a database of its own with \
             --clickhouse-database (and `keel migrate` it first)"
        );
    }
    let (source, expected): (Arc<dyn Source>, Option<u64>) =
        if let Some(path) = args.source.strip_prefix("file:") {
            (Arc::new(FileSource::open(path.as_ref())?), None)
        } else if args.source.starts_with("kafka://") {
            let kafka = KafkaSource::new(
                KafkaAddress::parse(&args.source)?,
                KafkaMode::Replay {
                    idle: Duration::from_secs_f64(args.idle.max(0.1)),
                },
            )
            .with_time_range(from - EARLY, to + LATE);
            let expected = kafka.estimate_records().unwrap_or(None);
            (Arc::new(kafka), expected)
        } else {
            bail!(
                "unknown source {:?}: use kafka://HOST:PORT/TOPIC or file:PATH",
                args.source
            )
        };
    let durable = args
        .store
        .start(None, &args.source)?
        .context("no store to fill")?;
    let handles = Handles {
        durable: Some(durable.clone()),
        ..Handles::default()
    };
    let options = args.engine_options(from, to);
    eprintln!(
        "backfill: {} from {} to {} into {}",
        source.describe(),
        args.from,
        args.to,
        [
            durable
                .clickhouse()
                .map(|c| format!("ClickHouse {} ({})", c.url(), c.database())),
            args.store
                .database
                .as_deref()
                .map(|d| format!("stream_analytics in {}", crate::store::redact(d))),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" and ")
    );
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let stats = handles.stats.clone();
    let every = Duration::from_millis(if tty { 200 } else { 1000 });
    let input = source.clone();
    crate::cli::run_engine(source, &options, &handles, every, |elapsed| {
        let read = stats.records.load(Ordering::Relaxed);
        let line = progress(read, expected, input.progress(), elapsed);
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    })?;
    if tty {
        eprintln!();
    }
    if !durable.finish(Duration::from_secs(120)) {
        bail!(
            "the stores did not take every epoch (see the errors above); run the same backfill \
             again — it replaces what is stored"
        );
    }
    let written = durable.stats();
    if let Some(error) = written.unreconciled.lock().clone() {
        bail!(
            "the stores took every epoch, but stored windows of the range that this run no \
             longer computes could not be removed ({error}); run the same backfill again"
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    let records = stats.records.load(Ordering::Relaxed);
    eprintln!(
        "backfill done in {:.1} s: {} records ({} events in the range, {} outside it, {} errors), \
         {} records/s; {} ClickHouse rows and {} stream_analytics rows written",
        elapsed,
        group(records),
        group(stats.events.load(Ordering::Relaxed)),
        group(stats.skipped.load(Ordering::Relaxed)),
        group(stats.errors.load(Ordering::Relaxed)),
        group((records as f64 / elapsed.max(1e-3)) as u64),
        group(written.rows_written.load(Ordering::Relaxed)),
        group(written.sql_rows_written.load(Ordering::Relaxed)),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        assert_eq!(
            progress(250_000, Some(1_000_000), None, Duration::from_secs(1)),
            "backfill: 250,000 of ~1,000,000 records (25.0%) | 250,000 records/s | ETA 0:00:03"
        );
        assert_eq!(
            progress(10, None, None, Duration::from_secs(2)),
            "backfill: 10 records | 5 records/s"
        );
        assert!(progress(5, Some(3), None, Duration::from_secs(1)).contains("(100.0%)"));
    }

    /// A file's progress is the share of its bytes handed to the readers, which it learns
    /// while replaying: nothing before the first read, all of it once read.
    #[test]
    fn a_files_progress_is_its_share_of_bytes_read() {
        use keel_sources::source::{Batch, Poll};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.ndjson");
        // Two 1 MiB chunks' worth of lines, and a bit: the first read hands out under half.
        let line = format!("{{\"pad\":\"{}\"}}\n", "x".repeat(1000));
        std::fs::write(&path, line.repeat(2_500)).unwrap();
        let file = FileSource::open(&path).unwrap();
        let second = Duration::from_secs(1);
        assert_eq!(
            progress(0, None, file.progress(), second),
            "backfill: 0 records, 0.0% of the input | 0 records/s | ETA ?"
        );
        let mut reader = file.open(0, 1).unwrap();
        let mut batch = Batch::default();
        assert_eq!(reader.next_batch(&mut batch, 10).unwrap(), Poll::Ready);
        // 1,037 whole lines of 1,011 bytes make the first chunk: 41.5 % of 2,527,500 bytes,
        // and 1.4 s more at the rate so far.
        assert_eq!(
            progress(10, None, file.progress(), second),
            "backfill: 10 records, 41.5% of the input | 10 records/s | ETA 0:00:01"
        );
        while reader.next_batch(&mut batch, 10_000).unwrap() == Poll::Ready {}
        assert_eq!(
            progress(2_500, None, file.progress(), second),
            "backfill: 2,500 records, 100.0% of the input | 2,500 records/s | ETA 0:00:00"
        );
    }

    /// An empty file is all read from the start.
    #[test]
    fn an_empty_files_progress_is_complete() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.ndjson");
        std::fs::write(&path, "").unwrap();
        let share = FileSource::open(&path).unwrap().progress();
        assert_eq!(
            progress(0, None, share, Duration::from_secs(1)),
            "backfill: 0 records, 100.0% of the input | 0 records/s | ETA 0:00:00"
        );
    }
}
