//! The durable stores of `keel run` and `keel migrate`: ClickHouse tables mirroring the live
//! tables, and the platform's `stream_analytics` table in PostgreSQL or a SQLite file.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use keel_dataflows::periscope::PeriscopeChange;
use keel_dataflows::privacy::scrub_json;
use keel_operators::table::{Row, TableSet};
use keel_sinks::clickhouse::{ClickHouse, Specs, TableSpec};
use keel_sinks::durable::Durable;
use keel_sinks::sql::SqlStore;
use keel_sources::dead_letter::DeadLetterWriter;
use keel_sources::event::{Event, EventKind};
use keel_sources::kafka::KafkaAddress;
use keel_sources::record::{Position, Record};
use serde::{Deserialize, Serialize};

/// The SQLite file `keel run` keeps `stream_analytics` in when it runs on the simulator.
pub const DEFAULT_SQLITE: &str = "sqlite:keel-state.db";

/// Where results are stored durably.
#[derive(Clone, Debug, Args)]
pub struct StoreArgs {
    /// ClickHouse HTTP address (e.g. http://127.0.0.1:8123) to keep every output table in;
    /// Kafka positions are then committed only once ClickHouse holds their results.
    #[arg(long, env = "KEEL_CLICKHOUSE", hide_env_values = true)]
    pub clickhouse: Option<String>,
    /// The ClickHouse database of Keel's tables.
    #[arg(long, default_value = LIVE_DATABASE)]
    pub clickhouse_database: String,
    /// The SQL database for `stream_analytics`: `postgres://USER@HOST:PORT/DB` or `sqlite:PATH`
    /// (`keel run` on the simulator uses `sqlite:keel-state.db` unless told otherwise; `off`
    /// keeps none).
    #[arg(long, env = "KEEL_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
    /// Copy records that cannot be used to this Kafka topic as well (the platform's DLQ shape):
    /// a topic name on the source's brokers, or `kafka://HOST:PORT/TOPIC`.
    #[arg(long)]
    pub dlq_topic: Option<String>,
    /// Also keep every valid event in ClickHouse table `events_raw` (keyed by tenant, time and
    /// event id; client addresses masked), as the platform's ingest keeps its event tables.
    #[arg(long, requires = "clickhouse")]
    pub raw_events: bool,
    /// Seconds between writes to the stores (each write is one insert per changed table).
    #[arg(long, default_value_t = 1.0, value_parser = crate::cli::seconds)]
    pub flush_every: f64,
}

/// The ClickHouse database `keel run` writes unless told otherwise.
pub const LIVE_DATABASE: &str = "keel";

/// The ClickHouse table of raw events (`--raw-events`).
pub const RAW_EVENTS: &str = "events_raw";

/// One valid event as `events_raw` keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RawEventRow {
    /// Tenant UUID.
    pub tenant_id: String,
    /// Event time.
    pub time: i64,
    /// Event id (the envelope's, or the codec's deterministic one).
    pub event_id: String,
    /// The platform's event type name (`unknown` types keep their own name).
    pub event_type: String,
    /// The stream's internal name, for stream events.
    pub internal_name: Option<String>,
    /// Where the record was read.
    pub position: String,
    /// The record as received, client addresses masked.
    pub payload: String,
}

impl Row for RawEventRow {
    type Key = (String, i64, String);
    const KEY_COLUMNS: &'static [&'static str] = &["tenant_id", "time", "event_id"];
    const TIMESTAMPS: &'static [&'static str] = &["time"];
    const LOW_CARDINALITY: &'static [&'static str] = &["event_type"];
    const RETENTION_DAYS: Option<u32> = Some(90);
    fn tenant(&self) -> Option<&str> {
        Some(&self.tenant_id)
    }
    fn key(&self) -> Self::Key {
        (self.tenant_id.clone(), self.time, self.event_id.clone())
    }
}

impl RawEventRow {
    /// The row of `event`, read from `record`.
    pub fn new(event: &Event, record: &Record<'_>) -> RawEventRow {
        RawEventRow::of(event, &record.position, record.value)
    }

    /// The row of `event`, read at `position` as `value`.
    pub fn of(event: &Event, position: &Position, value: &[u8]) -> RawEventRow {
        RawEventRow {
            tenant_id: event.tenant.to_string(),
            time: event.time,
            event_id: event.id.to_string(),
            event_type: match &event.kind {
                EventKind::Unknown(unknown) => unknown.event_type.as_str().to_owned(),
                kind => kind.type_name().to_owned(),
            },
            internal_name: event
                .kind
                .stream()
                .map(|s| s.internal_name.as_str().to_owned()),
            position: position.to_string(),
            payload: scrub_json(&String::from_utf8_lossy(value)),
        }
    }
}

/// The specs of every Periscope output table.
pub fn specs() -> Vec<TableSpec> {
    let mut specs = Specs::default();
    PeriscopeChange::declare_all(&mut specs);
    specs.0
}

impl StoreArgs {
    /// The ClickHouse tables these options write.
    pub fn specs(&self) -> Vec<TableSpec> {
        let mut all = specs();
        if self.raw_events {
            all.push(TableSpec::of::<RawEventRow>(RAW_EVENTS));
        }
        all
    }
}

impl StoreArgs {
    /// Connects to ClickHouse, if one is given.
    pub fn clickhouse(&self) -> anyhow::Result<Option<ClickHouse>> {
        let Some(url) = &self.clickhouse else {
            return Ok(None);
        };
        let client = ClickHouse::connect(url, &self.clickhouse_database)
            .with_context(|| format!("ClickHouse at {}", redact(url)))?;
        Ok(Some(client))
    }

    /// The SQL database to use: the one given, else `default`; `off` means none.
    fn database_url<'a>(&'a self, default: Option<&'a str>) -> Option<&'a str> {
        match self.database.as_deref() {
            Some("off") => None,
            Some(url) => Some(url),
            None => default,
        }
    }

    /// The dead-letter topic, a bare name resolved against the `source`'s brokers.
    fn dead_letters(&self, source: &str) -> anyhow::Result<Option<DeadLetterWriter>> {
        let Some(topic) = &self.dlq_topic else {
            return Ok(None);
        };
        let address = if topic.starts_with("kafka://") {
            KafkaAddress::parse(topic)?
        } else if source.starts_with("kafka://") {
            KafkaAddress {
                topic: topic.clone(),
                ..KafkaAddress::parse(source)?
            }
        } else {
            anyhow::bail!(
                "--dlq-topic {topic:?} names no brokers: use kafka://HOST:PORT/TOPIC (the source is not Kafka)"
            );
        };
        Ok(Some(DeadLetterWriter::new(address)?))
    }

    /// Starts the durable writer, if a store is given (`default_database` when none is named);
    /// its tables must exist, except a default SQLite file, which is migrated here. `source` is
    /// the engine's source (a bare `--dlq-topic` lives on its brokers).
    pub fn start(
        &self,
        default_database: Option<&str>,
        source: &str,
    ) -> anyhow::Result<Option<Arc<Durable>>> {
        let clickhouse = self.clickhouse()?;
        let database = self.database_url(default_database);
        let dead_letters = self.dead_letters(source)?;
        if clickhouse.is_none() && database.is_none() && dead_letters.is_none() {
            return Ok(None);
        }
        if !(self.flush_every.is_finite() && self.flush_every > 0.0) {
            anyhow::bail!("--flush-every must be a positive number of seconds");
        }
        if self.database.is_none()
            && let Some(url) = database
        {
            migrate_sql(url)?;
        }
        let every = Duration::from_secs_f64(self.flush_every);
        let started = Durable::start(clickhouse, self.specs(), database, dead_letters, every);
        // Which store refused: a SQL database's error does not name it.
        let started = match (started, database) {
            (Err(error @ keel_sinks::durable::StoreError::Sql(_)), Some(url)) => {
                return Err(anyhow::Error::from(error).context(format!("database {}", redact(url))));
            }
            (started, _) => started?,
        };
        Ok(Some(started))
    }
}

fn migrate_sql(url: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime
        .block_on(async {
            let store = SqlStore::connect(url).await?;
            store.migrate().await
        })
        .with_context(|| format!("database {}", redact(url)))
}

/// `keel migrate`: creates the ClickHouse database and tables, and `stream_analytics`; prints
/// what it did.
pub fn migrate(args: &StoreArgs) -> anyhow::Result<()> {
    let clickhouse = args.clickhouse()?;
    let database = args.database_url(None);
    if clickhouse.is_none() && database.is_none() {
        anyhow::bail!("nothing to migrate: give --clickhouse URL and/or --database URL");
    }
    if let Some(clickhouse) = clickhouse {
        let specs = args.specs();
        let ran = clickhouse.migrate(&specs)?;
        println!(
            "ClickHouse {} at {}: database {} has {} tables ({}){}",
            clickhouse.version(),
            clickhouse.url(),
            clickhouse.database(),
            specs.len(),
            specs.iter().map(|s| s.name).collect::<Vec<_>>().join(", "),
            if clickhouse.features().datetime64 {
                ""
            } else {
                "; an old server: times are Int64 milliseconds, no TTL or LowCardinality"
            }
        );
        // Columns added to tables an older Keel made.
        for statement in ran.iter().filter(|s| s.starts_with("ALTER TABLE")) {
            println!("  {statement}");
        }
    }
    if let Some(url) = database {
        migrate_sql(url)?;
        println!("{}: table stream_analytics is ready", redact(url));
    }
    Ok(())
}

/// `url` without its password.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
