//! The rows of Periscope's live tables, and the change record that carries them.
//!
//! Names and columns follow the platform's tables (`stream_state_current`,
//! `viewer_sessions_current`, `node_state_current`, the 5-minute and hourly rollups), with the
//! corrections the platform lists as known gaps (a true concurrent peak, not unique viewers).
//! Times are milliseconds since the epoch; each row names its time columns (`Row::TIMESTAMPS`)
//! so sinks present them as UTC timestamps.

use compact_str::CompactString;
use keel_operators::sym::Sym;
use keel_operators::table::{Change, Row, TableRegistry, TableSet, TableSink};
use serde::{Deserialize, Serialize};

/// `streams`: one row per stream (tenant, internal name).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamRow {
    /// Tenant UUID.
    pub tenant_id: Sym,
    /// Public stream UUID (derived from the internal name when no event carried one).
    pub stream_id: Sym,
    /// Internal name, prefix stripped.
    pub internal_name: Sym,
    /// `live`, `offline`, or `unknown` before any lifecycle event.
    pub status: Sym,
    /// Node of the latest lifecycle event.
    pub node_id: Option<Sym>,
    /// Sessions open now.
    pub current_viewers: u64,
    /// Most sessions open at once, at any instant of event time.
    pub peak_viewers: u64,
    /// Distinct sessions ever seen.
    pub total_sessions: u64,
    /// Distinct viewers (client address, else node and session).
    pub unique_viewers: u64,
    /// Seconds watched; open sessions count up to the newest event time.
    pub viewer_seconds: f64,
    /// Bytes delivered to viewers (sum over sessions).
    pub egress_bytes: u64,
    /// Bytes received by the stream, from its latest counters.
    pub ingress_bytes: u64,
    /// Latest buffer state.
    pub buffer_state: Option<Sym>,
    /// Latest quality tier.
    pub quality_tier: Option<Sym>,
    /// Start of the current stream session.
    pub started_at: Option<i64>,
    /// Newest event time for the stream.
    pub updated_at: i64,
}

impl Row for StreamRow {
    const LOW_CARDINALITY: &'static [&'static str] =
        &["status", "node_id", "buffer_state", "quality_tier"];
    const KEY_COLUMNS: &'static [&'static str] = &["tenant_id", "internal_name"];
    fn tenant(&self) -> Option<&str> {
        Some(self.tenant_id.as_str())
    }
    const TIMESTAMPS: &'static [&'static str] = &["started_at", "updated_at"];
    type Key = (Sym, Sym);
    fn key(&self) -> Self::Key {
        (self.tenant_id, self.internal_name)
    }
}

/// `viewer_sessions`: one row per session (stream, node, session id).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ViewerSessionRow {
    /// Tenant UUID.
    pub tenant_id: Sym,
    /// Public stream UUID.
    pub stream_id: Sym,
    /// Internal name.
    pub internal_name: Sym,
    /// Session id.
    pub session_id: CompactString,
    /// Serving node.
    pub node_id: Sym,
    /// Output protocol.
    pub connector: Sym,
    /// Country code, `--` when unknown.
    pub country_code: Sym,
    /// City.
    pub city: Option<Sym>,
    /// Start: the connect time, else the disconnect time minus the reported duration.
    pub connected_at: i64,
    /// End, null while open.
    pub disconnected_at: Option<i64>,
    /// Length in seconds, null while open.
    pub duration_s: Option<f64>,
    /// Bytes delivered.
    pub down_bytes: u64,
    /// Bytes received from the viewer.
    pub up_bytes: u64,
}

impl Row for ViewerSessionRow {
    const LOW_CARDINALITY: &'static [&'static str] =
        &["node_id", "connector", "country_code", "city"];
    const KEY_COLUMNS: &'static [&'static str] =
        &["tenant_id", "internal_name", "node_id", "session_id"];
    fn tenant(&self) -> Option<&str> {
        Some(self.tenant_id.as_str())
    }
    const TIMESTAMPS: &'static [&'static str] = &["connected_at", "disconnected_at"];
    type Key = (Sym, Sym, Sym, CompactString);
    fn key(&self) -> Self::Key {
        (
            self.tenant_id,
            self.internal_name,
            self.node_id,
            self.session_id.clone(),
        )
    }
    fn has_key(&self, key: &Self::Key) -> bool {
        (self.tenant_id, self.internal_name, self.node_id) == (key.0, key.1, key.2)
            && self.session_id == key.3
    }
}

/// `nodes`: latest state per node by event time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRow {
    /// Tenant owning the node.
    pub tenant_id: Sym,
    /// Node id.
    pub node_id: Sym,
    /// CPU use, percent.
    pub cpu_percent: f64,
    /// RAM in use, bytes.
    pub ram_used: u64,
    /// RAM installed, bytes.
    pub ram_max: u64,
    /// Upload speed, bytes/s.
    pub up_speed: u64,
    /// Download speed, bytes/s.
    pub down_speed: u64,
    /// Bandwidth limit, bytes/s (0 = not set).
    pub bw_limit: u64,
    /// Latitude.
    pub latitude: Option<f64>,
    /// Longitude.
    pub longitude: Option<f64>,
    /// Location name.
    pub location: Option<Sym>,
    /// Streams active.
    pub active_streams: u64,
    /// Node reports itself healthy.
    pub is_healthy: bool,
    /// `normal`, `draining` or `maintenance`.
    pub mode: Sym,
    /// Event time of this state.
    pub updated_at: i64,
}

impl Row for NodeRow {
    const LOW_CARDINALITY: &'static [&'static str] = &["location", "mode"];
    const KEY_COLUMNS: &'static [&'static str] = &["tenant_id", "node_id"];
    fn tenant(&self) -> Option<&str> {
        Some(self.tenant_id.as_str())
    }
    const TIMESTAMPS: &'static [&'static str] = &["updated_at"];
    type Key = (Sym, Sym);
    fn key(&self) -> Self::Key {
        (self.tenant_id, self.node_id)
    }
}

/// `viewers_by_country`: per stream and country.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CountryRow {
    /// Tenant UUID.
    pub tenant_id: Sym,
    /// Public stream UUID.
    pub stream_id: Sym,
    /// Internal name.
    pub internal_name: Sym,
    /// Country code, `--` when unknown.
    pub country_code: Sym,
    /// Sessions from this country.
    pub sessions: u64,
    /// Of which open now.
    pub current_viewers: u64,
    /// Seconds watched (open sessions up to the newest event time).
    pub viewer_seconds: f64,
    /// Bytes delivered.
    pub egress_bytes: u64,
}

impl Row for CountryRow {
    const LOW_CARDINALITY: &'static [&'static str] = &["country_code"];
    const KEY_COLUMNS: &'static [&'static str] = &["tenant_id", "internal_name", "country_code"];
    fn tenant(&self) -> Option<&str> {
        Some(self.tenant_id.as_str())
    }
    type Key = (Sym, Sym, Sym);
    fn key(&self) -> Self::Key {
        (self.tenant_id, self.internal_name, self.country_code)
    }
}

/// `usage_5m`: per stream and 5-minute window of event time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    /// Tenant UUID.
    pub tenant_id: Sym,
    /// Public stream UUID.
    pub stream_id: Sym,
    /// Internal name.
    pub internal_name: Sym,
    /// Window start.
    pub window_start: i64,
    /// Most sessions open at once within the window.
    pub peak_viewers: u64,
    /// Sessions that started in the window.
    pub sessions_started: u64,
    /// Seconds of sessions overlapping the window (open ones up to the newest event time).
    pub viewer_seconds: f64,
}

impl Row for UsageRow {
    const RETENTION_DAYS: Option<u32> = Some(180);
    const KEY_COLUMNS: &'static [&'static str] = &["tenant_id", "internal_name", "window_start"];
    fn tenant(&self) -> Option<&str> {
        Some(self.tenant_id.as_str())
    }
    const TIMESTAMPS: &'static [&'static str] = &["window_start"];
    type Key = (Sym, Sym, i64);
    fn key(&self) -> Self::Key {
        (self.tenant_id, self.internal_name, self.window_start)
    }
}

/// `stream_health_5m`: per stream and 5-minute window, from poller, buffer and track events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthRow {
    /// Tenant UUID.
    pub tenant_id: Sym,
    /// Public stream UUID.
    pub stream_id: Sym,
    /// Internal name.
    pub internal_name: Sym,
    /// Window start.
    pub window_start: i64,
    /// Health events counted in the window.
    pub samples: u64,
    /// Events reporting the DRY buffer state.
    pub buffer_dry_count: u64,
    /// Events flagging issues.
    pub issue_count: u64,
    /// Mean primary bitrate, kbit/s, over samples that reported one.
    pub avg_bitrate_kbps: Option<f64>,
    /// Mean frame rate over samples that reported one.
    pub avg_fps: Option<f64>,
    /// Quality tier of the latest event that reported one.
    pub quality_tier: Option<Sym>,
    /// Packets lost over packets sent, summed over the poller samples.
    pub packet_loss_rate: Option<f64>,
}

impl Row for HealthRow {
    const RETENTION_DAYS: Option<u32> = Some(180);
    const LOW_CARDINALITY: &'static [&'static str] = &["quality_tier"];
    const KEY_COLUMNS: &'static [&'static str] = &["tenant_id", "internal_name", "window_start"];
    fn tenant(&self) -> Option<&str> {
        Some(self.tenant_id.as_str())
    }
    const TIMESTAMPS: &'static [&'static str] = &["window_start"];
    type Key = (Sym, Sym, i64);
    fn key(&self) -> Self::Key {
        (self.tenant_id, self.internal_name, self.window_start)
    }
}

/// `routing_hourly`: load-balancing decisions per tenant and hour.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoutingRow {
    /// Tenant UUID (the infrastructure owner, as the platform records it).
    pub tenant_id: Sym,
    /// Hour start.
    pub hour: i64,
    /// Decisions made.
    pub decisions: u64,
    /// Decisions with status `success`.
    pub successes: u64,
    /// Mean client-to-node distance over decisions where it is known.
    pub avg_distance_km: Option<f64>,
    /// Mean score over decisions that carried one.
    pub avg_score: Option<f64>,
}

impl Row for RoutingRow {
    const RETENTION_DAYS: Option<u32> = Some(365);
    const KEY_COLUMNS: &'static [&'static str] = &["tenant_id", "hour"];
    fn tenant(&self) -> Option<&str> {
        Some(self.tenant_id.as_str())
    }
    const TIMESTAMPS: &'static [&'static str] = &["hour"];
    type Key = (Sym, i64);
    fn key(&self) -> Self::Key {
        (self.tenant_id, self.hour)
    }
}

/// `ingest_errors`: records that could not be used, one row per source position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IngestErrorRow {
    /// Where the record came from.
    pub position: String,
    /// Why it could not be used.
    pub reason: String,
    /// Its event type, when readable.
    pub event_type: Option<String>,
    /// Its tenant as given.
    pub tenant_id: Option<String>,
    /// The start of the record.
    pub excerpt: String,
}

impl Row for IngestErrorRow {
    const KEY_COLUMNS: &'static [&'static str] = &["position"];
    fn tenant(&self) -> Option<&str> {
        self.tenant_id.as_deref()
    }
    type Key = String;
    fn key(&self) -> Self::Key {
        self.position.clone()
    }
}

/// `unknown_events`: events of types Keel does not know, counted per tenant and type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnknownEventRow {
    /// Tenant UUID.
    pub tenant_id: Sym,
    /// Event type as given.
    pub event_type: Sym,
    /// Distinct events.
    pub events: u64,
    /// Newest event time.
    pub last_seen: i64,
    /// The newest such record, as received.
    pub sample: String,
}

impl Row for UnknownEventRow {
    const LOW_CARDINALITY: &'static [&'static str] = &["event_type"];
    const KEY_COLUMNS: &'static [&'static str] = &["tenant_id", "event_type"];
    fn tenant(&self) -> Option<&str> {
        Some(self.tenant_id.as_str())
    }
    const TIMESTAMPS: &'static [&'static str] = &["last_seen"];
    type Key = (Sym, Sym);
    fn key(&self) -> Self::Key {
        (self.tenant_id, self.event_type)
    }
}

macro_rules! periscope_tables {
    ($($variant:ident($row:ty) => $table:literal,)*) => {
        /// A change to one of Periscope's tables.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub enum PeriscopeChange {
            $(
                #[doc = concat!("A change to `", $table, "`.")]
                $variant(Change<$row>),
            )*
        }

        /// The names of Periscope's tables, in declaration order.
        pub const TABLES: &[&str] = &[$($table),*];

        impl TableSet for PeriscopeChange {
            fn declare_all(registry: &mut impl TableRegistry) {
                $(registry.declare::<$row>($table);)*
            }
            fn apply_to(self, sink: &mut impl TableSink) {
                match self {
                    $(PeriscopeChange::$variant(change) => sink.apply($table, change),)*
                }
            }
        }
    };
}

periscope_tables! {
    Streams(StreamRow) => "streams",
    ViewerSessions(ViewerSessionRow) => "viewer_sessions",
    Nodes(NodeRow) => "nodes",
    ViewersByCountry(CountryRow) => "viewers_by_country",
    Usage5m(UsageRow) => "usage_5m",
    StreamHealth5m(HealthRow) => "stream_health_5m",
    RoutingHourly(RoutingRow) => "routing_hourly",
    IngestErrors(IngestErrorRow) => "ingest_errors",
    UnknownEvents(UnknownEventRow) => "unknown_events",
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn session(tenant: &str, name: &str, node: &str, id: &str) -> ViewerSessionRow {
        ViewerSessionRow {
            tenant_id: Sym::new(tenant),
            stream_id: Sym::new("stream"),
            internal_name: Sym::new(name),
            session_id: CompactString::from(id),
            node_id: Sym::new(node),
            connector: Sym::new("webrtc"),
            country_code: Sym::new("NL"),
            city: None,
            connected_at: 0,
            disconnected_at: None,
            duration_s: None,
            down_bytes: 0,
            up_bytes: 0,
        }
    }

    proptest! {
        /// The live table finds session rows by `has_key`, which must agree with comparing built
        /// keys, including session ids long enough to live on the heap.
        #[test]
        fn session_has_key_agrees_with_key(
            a in ("[ab]", "[ab]", "[ab]", "(x|y){0,30}"),
            b in ("[ab]", "[ab]", "[ab]", "(x|y){0,30}"),
        ) {
            let row = session(&a.0, &a.1, &a.2, &a.3);
            let other = session(&b.0, &b.1, &b.2, &b.3);
            prop_assert_eq!(row.has_key(&other.key()), row.key() == other.key());
            prop_assert!(row.has_key(&row.key()));
        }
    }
}
