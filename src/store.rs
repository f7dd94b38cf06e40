//! The durable stores of `keel run` and `keel migrate`: ClickHouse tables mirroring the live
//! tables.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use keel_dataflows::periscope::PeriscopeChange;
use keel_operators::table::TableSet;
use keel_sinks::clickhouse::{ClickHouse, Specs, TableSpec};
use keel_sinks::durable::Durable;

/// Where results are stored durably.
#[derive(Clone, Debug, Args)]
pub struct StoreArgs {
    /// ClickHouse HTTP address (e.g. http://127.0.0.1:8123) to keep every output table in;
    /// Kafka positions are then committed only once ClickHouse holds their results.
    #[arg(long, env = "KEEL_CLICKHOUSE")]
    pub clickhouse: Option<String>,
    /// The ClickHouse database of Keel's tables.
    #[arg(long, default_value = "keel")]
    pub clickhouse_database: String,
    /// Seconds between writes to the stores (each write is one insert per changed table).
    #[arg(long, default_value_t = 1.0)]
    pub flush_every: f64,
}

/// The specs of every Periscope output table.
pub fn specs() -> Vec<TableSpec> {
    let mut specs = Specs::default();
    PeriscopeChange::declare_all(&mut specs);
    specs.0
}

impl StoreArgs {
    /// Connects to ClickHouse, if one is given.
    pub fn clickhouse(&self) -> anyhow::Result<Option<ClickHouse>> {
        let Some(url) = &self.clickhouse else {
            return Ok(None);
        };
        let client = ClickHouse::connect(url, &self.clickhouse_database)
            .with_context(|| format!("ClickHouse at {url}"))?;
        Ok(Some(client))
    }

    /// Starts the durable writer, if a store is given; its tables must exist.
    pub fn start(&self) -> anyhow::Result<Option<Arc<Durable>>> {
        let Some(clickhouse) = self.clickhouse()? else {
            return Ok(None);
        };
        if !(self.flush_every.is_finite() && self.flush_every > 0.0) {
            anyhow::bail!("--flush-every must be a positive number of seconds");
        }
        let every = Duration::from_secs_f64(self.flush_every);
        Ok(Some(Durable::start(clickhouse, specs(), every)?))
    }
}

/// `keel migrate`: creates the database and tables; prints what it did.
pub fn migrate(args: &StoreArgs) -> anyhow::Result<()> {
    let Some(clickhouse) = args.clickhouse()? else {
        anyhow::bail!("nothing to migrate: give --clickhouse URL");
    };
    let specs = specs();
    clickhouse.migrate(&specs)?;
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
    Ok(())
}
