//! The rows of Periscope's live tables, and the change record that carries them.
//!
//! Names and columns follow the platform's tables (`stream_state_current`,
//! `viewer_sessions_current`, `node_state_current`, the 5-minute and hourly rollups), with the
//! corrections the platform lists as known gaps (a true concurrent peak, not unique viewers).
//! Times are milliseconds since the epoch; each row names its time columns (`Row::TIMESTAMPS`)
//! so sinks present them as UTC timestamps.

use std::hash::{Hash, Hasher};

use keel_operators::shortstr::ShortStr;
use keel_operators::sym::Sym;
use keel_operators::sympair::SymPair;
use keel_operators::table::{Change, Row, TableRegistry, TableSet, TableSink};
use keel_operators::time::SECOND;
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
    /// Sessions open now (without a disconnect, and connected less than 30 days before now).
    pub current_viewers: u64,
    /// Most sessions open at once, at any instant of event time.
    pub peak_viewers: u64,
    /// Distinct sessions ever seen.
    pub total_sessions: u64,
    /// Distinct viewers (client address, else node and session).
    pub unique_viewers: u64,
    /// Seconds watched; open sessions count up to the newest event time, each session at most
    /// 30 days.
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
///
/// The live table keeps one of these for every session it has seen, so the row is compact (72
/// bytes): tenant and internal name share one handle ([`SymPair`], read through
/// [`ViewerSessionRow::tenant_id`] and [`ViewerSessionRow::internal_name`]), the session id is a
/// [`ShortStr`] (inline up to 15 bytes), the end is a [`MaybeTime`] rather than an `Option`, and
/// the duration is derived from start and end rather than stored. Serialized, it has the table's
/// columns: `tenant_id`, `stream_id`, `internal_name`, then those below from `session_id`, with
/// `disconnected_at` and `duration_s` as nullable columns.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(from = "SessionRecord<ShortStr>")]
pub struct ViewerSessionRow {
    /// Tenant UUID and the stream's internal name, which every session of the stream shares.
    pub stream: SymPair,
    /// Public stream UUID.
    pub stream_id: Sym,
    /// Session id.
    pub session_id: ShortStr,
    /// Serving node.
    pub node_id: Sym,
    /// Output protocol.
    pub connector: Sym,
    /// Country code, `--` when unknown.
    pub country_code: Sym,
    /// City, empty when unknown (null in the table).
    pub city: Sym,
    /// Start: the connect time, else the disconnect time minus the reported duration.
    pub connected_at: i64,
    /// End, none while open.
    pub disconnected_at: MaybeTime,
    /// Bytes delivered.
    pub down_bytes: u64,
    /// Bytes received from the viewer.
    pub up_bytes: u64,
}

impl ViewerSessionRow {
    /// Tenant UUID.
    pub fn tenant_id(&self) -> Sym {
        self.stream.first()
    }

    /// The stream's internal name.
    pub fn internal_name(&self) -> Sym {
        self.stream.second()
    }

    /// Length in seconds, `None` while open.
    pub fn duration_s(&self) -> Option<f64> {
        self.disconnected_at
            .get()
            .map(|end| (end - self.connected_at) as f64 / SECOND as f64)
    }
}

/// An optional time (ms) in 8 bytes: `i64::MIN`, never a valid event time, stands for none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaybeTime(i64);

impl MaybeTime {
    /// No time.
    pub const NONE: MaybeTime = MaybeTime(i64::MIN);

    /// The time, if there is one.
    pub fn get(self) -> Option<i64> {
        (self != Self::NONE).then_some(self.0)
    }

    /// Whether there is no time.
    pub fn is_none(self) -> bool {
        self == Self::NONE
    }
}

impl From<Option<i64>> for MaybeTime {
    /// `Some(i64::MIN)` is not a time any source produces; it reads back as none.
    fn from(time: Option<i64>) -> Self {
        time.map_or(Self::NONE, MaybeTime)
    }
}

/// A `viewer_sessions` row as its columns: what [`ViewerSessionRow`] serializes to (with
/// `S = &ShortStr`) and is read back from (`S = ShortStr`).
#[derive(Serialize, Deserialize)]
#[serde(rename = "ViewerSessionRow")]
struct SessionRecord<S> {
    tenant_id: Sym,
    stream_id: Sym,
    internal_name: Sym,
    session_id: S,
    node_id: Sym,
    connector: Sym,
    country_code: Sym,
    city: Option<Sym>,
    connected_at: i64,
    /// Null while open.
    disconnected_at: Option<i64>,
    /// Null while open; derived from the row's times, so ignored when read back.
    duration_s: Option<f64>,
    down_bytes: u64,
    up_bytes: u64,
}

impl Serialize for ViewerSessionRow {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (tenant_id, internal_name) = self.stream.get();
        SessionRecord {
            tenant_id,
            stream_id: self.stream_id,
            internal_name,
            session_id: &self.session_id,
            node_id: self.node_id,
            connector: self.connector,
            country_code: self.country_code,
            city: self.city.non_empty(),
            connected_at: self.connected_at,
            disconnected_at: self.disconnected_at.get(),
            duration_s: self.duration_s(),
            down_bytes: self.down_bytes,
            up_bytes: self.up_bytes,
        }
        .serialize(serializer)
    }
}

impl From<SessionRecord<ShortStr>> for ViewerSessionRow {
    fn from(r: SessionRecord<ShortStr>) -> Self {
        ViewerSessionRow {
            stream: SymPair::new(r.tenant_id, r.internal_name),
            stream_id: r.stream_id,
            session_id: r.session_id,
            node_id: r.node_id,
            connector: r.connector,
            country_code: r.country_code,
            city: r.city.unwrap_or_default(),
            connected_at: r.connected_at,
            disconnected_at: r.disconnected_at.into(),
            down_bytes: r.down_bytes,
            up_bytes: r.up_bytes,
        }
    }
}

impl Row for ViewerSessionRow {
    const LOW_CARDINALITY: &'static [&'static str] =
        &["node_id", "connector", "country_code", "city"];
    const KEY_COLUMNS: &'static [&'static str] =
        &["tenant_id", "internal_name", "node_id", "session_id"];
    fn tenant(&self) -> Option<&str> {
        Some(self.tenant_id().as_str())
    }
    const TIMESTAMPS: &'static [&'static str] = &["connected_at", "disconnected_at"];
    type Key = (Sym, Sym, Sym, ShortStr);
    fn key(&self) -> Self::Key {
        let (tenant_id, internal_name) = self.stream.get();
        (
            tenant_id,
            internal_name,
            self.node_id,
            self.session_id.clone(),
        )
    }
    fn has_key(&self, key: &Self::Key) -> bool {
        self.node_id == key.2 && self.session_id == key.3 && self.stream.get() == (key.0, key.1)
    }
    fn hash_key<H: Hasher>(&self, state: &mut H) {
        let (tenant_id, internal_name) = self.stream.get();
        (tenant_id, internal_name, self.node_id, &self.session_id).hash(state);
    }
    fn same_key(&self, other: &Self) -> bool {
        // One handle per pair, so equal handles are equal names.
        self.stream == other.stream
            && self.node_id == other.node_id
            && self.session_id == other.session_id
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
    /// The position's source: `file:PATH`, `kafka:TOPIC/PARTITION`, `sim`, or a producer's name.
    pub source: String,
    /// The record's place in its source: line (from 1), Kafka offset, or sequence number
    /// (`ORDER BY source, record` is the source's own order).
    pub record: i64,
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
            /// Worker `worker` closed its `generation`: every change of that close and the
            /// ones before it is in this epoch or an earlier one (see [`HeldTable`](keel_operators::table::HeldTable)).
            Closed {
                /// The worker.
                worker: u32,
                /// Its close number.
                generation: u64,
            },
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
                    PeriscopeChange::Closed { worker, generation } => sink.closed(worker, generation),
                }
            }
        }
    };
}

impl PeriscopeChange {
    /// The span of time a change's row covers, `[start, end)` in milliseconds, for the
    /// windowed tables (`usage_5m`, `stream_health_5m`, `routing_hourly`); `None` for the others.
    pub fn window(&self) -> Option<(i64, i64)> {
        use keel_operators::time::HOUR;
        let five = super::WINDOW;
        match self {
            PeriscopeChange::Usage5m(change) => Some(change.key().2).map(|s| (s, s + five)),
            PeriscopeChange::StreamHealth5m(change) => Some(change.key().2).map(|s| (s, s + five)),
            PeriscopeChange::RoutingHourly(change) => Some(change.key().1).map(|s| (s, s + HOUR)),
            _ => None,
        }
    }
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
            stream: SymPair::new(Sym::new(tenant), Sym::new(name)),
            stream_id: Sym::new("stream"),
            session_id: ShortStr::from(id),
            node_id: Sym::new(node),
            connector: Sym::new("webrtc"),
            country_code: Sym::new("NL"),
            city: Sym::default(),
            connected_at: 0,
            disconnected_at: MaybeTime::NONE,
            down_bytes: 0,
            up_bytes: 0,
        }
    }

    proptest! {
        /// The live table finds session rows by `has_key`, `same_key` and `hash_key`, which must
        /// agree with comparing and hashing built keys, including session ids long enough to
        /// live on the heap.
        #[test]
        fn session_key_in_place_agrees_with_key(
            a in ("[ab]", "[ab]", "[ab]", "(x|y){0,30}"),
            b in ("[ab]", "[ab]", "[ab]", "(x|y){0,30}"),
        ) {
            let row = session(&a.0, &a.1, &a.2, &a.3);
            let other = session(&b.0, &b.1, &b.2, &b.3);
            prop_assert_eq!(row.has_key(&other.key()), row.key() == other.key());
            prop_assert_eq!(row.same_key(&other), row.key() == other.key());
            prop_assert!(row.has_key(&row.key()) && row.same_key(&row));
            let in_place = |r: &ViewerSessionRow| {
                let mut state = std::collections::hash_map::DefaultHasher::new();
                r.hash_key(&mut state);
                state.finish()
            };
            let built = |r: &ViewerSessionRow| {
                let mut state = std::collections::hash_map::DefaultHasher::new();
                r.key().hash(&mut state);
                state.finish()
            };
            prop_assert_eq!(in_place(&row), built(&row));
            prop_assert_eq!(in_place(&other), built(&other));
        }

        /// A session row reads back as itself, and serializes with its end and duration as
        /// nullable columns, the duration derived from its times.
        #[test]
        fn session_row_round_trips(
            start in -10_000_000_000_000i64..10_000_000_000_000,
            length in prop::option::of(0i64..1_000_000_000),
            city in prop::option::of("[a-z]{0,12}"),
            id in "(x|y){0,30}",
        ) {
            let mut row = session("t", "n", "node", &id);
            row.connected_at = start;
            row.disconnected_at = length.map(|l| start + l).into();
            row.city = city.as_deref().map_or(Sym::default(), Sym::new);
            let json = serde_json::to_value(&row).unwrap();
            prop_assert_eq!(&json["disconnected_at"], &serde_json::json!(length.map(|l| start + l)));
            prop_assert_eq!(
                &json["duration_s"],
                &serde_json::json!(length.map(|l| l as f64 / 1000.0))
            );
            prop_assert_eq!(&json["session_id"], &serde_json::json!(id));
            let back: ViewerSessionRow = serde_json::from_value(json).unwrap();
            prop_assert_eq!(back, row);
        }
    }

    /// The live table holds one row per session ever seen; this is its size.
    #[test]
    fn session_row_is_compact() {
        assert_eq!(size_of::<ViewerSessionRow>(), 72);
    }

    #[test]
    fn session_row_columns_in_order() {
        let json = serde_json::to_string(&session("t", "n", "node", "s1")).unwrap();
        assert_eq!(
            json,
            r#"{"tenant_id":"t","stream_id":"stream","internal_name":"n","session_id":"s1","node_id":"node","connector":"webrtc","country_code":"NL","city":null,"connected_at":0,"disconnected_at":null,"duration_s":null,"down_bytes":0,"up_bytes":0}"#
        );
    }
}
