//! Removing from ClickHouse the rows a stopped process left that its replay never publishes.
//!
//! The stores hold upserts of computed rows, so an engine that rebuilds its state by replaying
//! its input writes every row it computes again, and the newest version wins. What a replay
//! cannot overwrite is a row the stopped process stored and would later have removed. The
//! dataflow removes rows in two tables: a `viewers_by_country` row and `usage_5m` windows when
//! events arriving out of order move a session (a disconnect seen before its connect places the
//! session at its end minus its duration, in the disconnect's country; the connect moves it).
//! If the process stopped after storing such a row but before storing its removal, the replay,
//! which may read both events into one epoch, never publishes the row and so never removes it.
//!
//! So once a restarted engine has caught up with its source, it reads the keys ClickHouse holds
//! in those two tables ([`Stored::fetch`]), compares them with the rebuilt live tables and
//! stages the removal of every stored row the state covers but does not have
//! ([`Stored::reconcile`]). What the state covers is what the
//! replay read in full ([`Coverage`]): after a replay of the whole topic, every row of a stream
//! it rebuilt; after a backfill, the windows of its range (a country row sums a stream's whole
//! life, which a range does not hold). A state rebuilt from a shorter horizon covers nothing:
//! sessions that began before the horizon and are still open are missing from it, so rows it
//! lacks may still be right.

use keel_dataflows::periscope::{CountryRow, StreamRow, UsageRow};
use keel_operators::sym::Sym;
use keel_operators::table::Row;
use keel_sinks::durable::{Durable, StoreError};
use keel_sinks::live::LiveTables;

/// Which stored rows a rebuilt state speaks for (always only of streams the state holds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coverage {
    /// `usage_5m` windows starting at or after this (milliseconds).
    pub since: i64,
    /// `usage_5m` windows starting before this (milliseconds; for a range, the last start
    /// whose window ends inside it, plus one).
    pub until: i64,
    /// `viewers_by_country` rows too (the state holds each stream's whole life).
    pub countries: bool,
}

impl Coverage {
    /// A replay of the whole input: every row of every stream the state holds.
    pub const ALL: Coverage = Coverage {
        since: i64::MIN,
        until: i64::MAX,
        countries: true,
    };

    /// A backfill of `[from, to)`: the windows wholly inside the range, the only ones it stores
    /// (one that straddles an end saw part of its events, and a stored one is left as it is).
    pub fn range(from: i64, to: i64) -> Coverage {
        Coverage {
            since: from,
            until: to.saturating_sub(keel_dataflows::periscope::WINDOW - 1),
            countries: false,
        }
    }

    fn window(&self, start: i64) -> bool {
        (self.since..self.until).contains(&start)
    }
}

/// What [`Stored::reconcile`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Stored `viewers_by_country` rows removed.
    pub countries: u64,
    /// Stored `usage_5m` windows removed.
    pub windows: u64,
    /// Stored keys compared.
    pub compared: u64,
}

const STREAMS: &str = "streams";
const COUNTRIES: &str = "viewers_by_country";
const USAGE: &str = "usage_5m";

/// The keys ClickHouse holds in the tables the dataflow deletes from, as far as a coverage
/// concerns them.
#[derive(Debug)]
pub struct Stored {
    coverage: Coverage,
    countries: Vec<<CountryRow as Row>::Key>,
    windows: Vec<<UsageRow as Row>::Key>,
}

impl Stored {
    /// Reads the stored keys `coverage` may concern (the windows from its start on).
    pub fn fetch(durable: &Durable, coverage: Coverage) -> Result<Stored, StoreError> {
        let countries = if coverage.countries {
            durable.stored_keys::<CountryRow>(COUNTRIES, None)?
        } else {
            Vec::new()
        };
        let since = (coverage.since > i64::MIN).then_some(coverage.since);
        let windows = durable.stored_keys::<UsageRow>(USAGE, since)?;
        Ok(Stored {
            coverage,
            countries,
            windows,
        })
    }

    /// Stages, in `durable`, the removal of every stored key that the coverage says the state
    /// speaks for and `tables` does not hold. Call where no other change is staged meanwhile
    /// (the publisher, between epochs).
    pub fn reconcile(self, tables: &LiveTables, durable: &Durable) -> Reconciled {
        let streams = tables.table::<StreamRow>(STREAMS);
        let rebuilt = |tenant: Sym, name: Sym| streams.get(&(tenant, name)).is_some();
        let mut done = Reconciled {
            compared: (self.countries.len() + self.windows.len()) as u64,
            ..Reconciled::default()
        };
        let countries = tables.table::<CountryRow>(COUNTRIES);
        let stale: Vec<_> = self
            .countries
            .into_iter()
            .filter(|key| rebuilt(key.0, key.1) && countries.get(key).is_none())
            .collect();
        done.countries = durable.stage_deletes::<CountryRow>(COUNTRIES, stale);
        let usage = tables.table::<UsageRow>(USAGE);
        let stale: Vec<_> = self
            .windows
            .into_iter()
            .filter(|key| {
                self.coverage.window(key.2) && rebuilt(key.0, key.1) && usage.get(key).is_none()
            })
            .collect();
        done.windows = durable.stage_deletes::<UsageRow>(USAGE, stale);
        done
    }
}
