//! The typed event model that both wire versions decode into.
//!
//! An [`Event`] is what the dataflows see: a tenant (always a UUID), an event id (a replayed
//! record has the same one), an event time in milliseconds, and a [`EventKind`] with only the
//! fields Keel uses. Version 1 and version 2 records describing the same thing produce equal
//! events, which is what makes their tables equal.
//!
//! Low-cardinality strings are [`Sym`]s; session ids and client addresses are `CompactString`s
//! (inline up to 24 bytes, so typical values never allocate).

use compact_str::CompactString;
use keel_operators::sym::Sym;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One decoded analytics event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Event id: the envelope's, or derived deterministically (see the codec).
    pub id: Uuid,
    /// Owning tenant, validated as a UUID.
    pub tenant: Uuid,
    /// Event time, milliseconds since the Unix epoch.
    pub time: i64,
    /// What happened.
    pub kind: EventKind,
}

/// The kinds of events Keel understands; anything else is [`EventKind::Unknown`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EventKind {
    /// An ingest started (`push_rewrite`, v1 `stream-ingest`).
    IngestStart(IngestStart),
    /// A viewer connected (`viewer_connect`, v1 `user-connection` connect).
    ViewerConnect(ViewerConnect),
    /// A viewer disconnected (`viewer_disconnect`, v1 `user-connection` disconnect).
    ViewerDisconnect(ViewerDisconnect),
    /// A stream poller update (`stream_lifecycle_update`, v1 `stream-lifecycle`).
    StreamUpdate(StreamUpdate),
    /// A buffer state change (`stream_buffer`, v1 `stream-buffer`).
    StreamBuffer(StreamBuffer),
    /// A stream ended (`stream_end`, v1 `stream-end`).
    StreamEnd(StreamEnd),
    /// A stream's track list (`stream_track_list`, v1 `track-list`).
    TrackList(TrackList),
    /// A node poller update (`node_lifecycle_update`, v1 `node-lifecycle`).
    NodeUpdate(NodeUpdate),
    /// A load-balancing decision (`load_balancing`, v1 `load-balancing`).
    Routing(RoutingDecision),
    /// Other stream activity Keel recognises but does not aggregate (pushes, recordings, ...).
    StreamSignal(StreamSignal),
    /// An event type Keel does not know: kept, counted, never an error.
    Unknown(UnknownEvent),
}

impl EventKind {
    /// The stream this event is about, if it is about one.
    pub fn stream(&self) -> Option<&StreamRef> {
        match self {
            EventKind::IngestStart(e) => Some(&e.stream),
            EventKind::ViewerConnect(e) => Some(&e.stream),
            EventKind::ViewerDisconnect(e) => Some(&e.stream),
            EventKind::StreamUpdate(e) => Some(&e.stream),
            EventKind::StreamBuffer(e) => Some(&e.stream),
            EventKind::StreamEnd(e) => Some(&e.stream),
            EventKind::TrackList(e) => Some(&e.stream),
            EventKind::StreamSignal(e) => Some(&e.stream),
            EventKind::Routing(_) | EventKind::NodeUpdate(_) | EventKind::Unknown(_) => None,
        }
    }

    /// The platform's version-2 event type name for this kind.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::IngestStart(_) => "push_rewrite",
            EventKind::ViewerConnect(_) => "viewer_connect",
            EventKind::ViewerDisconnect(_) => "viewer_disconnect",
            EventKind::StreamUpdate(_) => "stream_lifecycle_update",
            EventKind::StreamBuffer(_) => "stream_buffer",
            EventKind::StreamEnd(_) => "stream_end",
            EventKind::TrackList(_) => "stream_track_list",
            EventKind::NodeUpdate(_) => "node_lifecycle_update",
            EventKind::Routing(_) => "load_balancing",
            EventKind::StreamSignal(s) => s.kind.type_name(),
            EventKind::Unknown(_) => "unknown",
        }
    }
}

/// Which stream: the internal name (prefix stripped) is the identity; the public stream UUID is
/// carried when the producer knew it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StreamRef {
    /// Internal name without its `live+`/`vod+` prefix.
    pub internal_name: Sym,
    /// Public stream UUID, when given.
    pub stream_id: Option<Uuid>,
}

/// Ingest start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IngestStart {
    /// Stream.
    pub stream: StreamRef,
    /// Ingesting node.
    pub node: Sym,
    /// Ingest protocol (RTMP, SRT, WHIP, ...).
    pub protocol: Sym,
    /// Node or publisher latitude.
    pub latitude: Option<f64>,
    /// Node or publisher longitude.
    pub longitude: Option<f64>,
}

/// Where a viewer is, as the edge saw it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ViewerPlace {
    /// Client address (never leaves the engine).
    pub host: CompactString,
    /// Output protocol (HLS, WebRTC, ...).
    pub connector: Sym,
    /// ISO 3166 country code, empty when unknown.
    pub country: Sym,
    /// City, empty when unknown.
    pub city: Sym,
    /// Client latitude.
    pub latitude: Option<f64>,
    /// Client longitude.
    pub longitude: Option<f64>,
}

/// A viewer session opened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ViewerConnect {
    /// Stream.
    pub stream: StreamRef,
    /// Serving node.
    pub node: Sym,
    /// Session id, unique per node.
    pub session_id: CompactString,
    /// Client details.
    pub place: ViewerPlace,
}

/// A viewer session closed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ViewerDisconnect {
    /// Stream.
    pub stream: StreamRef,
    /// Serving node.
    pub node: Sym,
    /// Session id, unique per node.
    pub session_id: CompactString,
    /// Client details.
    pub place: ViewerPlace,
    /// Session length in seconds, as reported.
    pub duration_s: u64,
    /// Bytes sent by the viewer.
    pub up_bytes: u64,
    /// Bytes delivered to the viewer.
    pub down_bytes: u64,
}

/// A stream poller update.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamUpdate {
    /// Stream.
    pub stream: StreamRef,
    /// Node reporting.
    pub node: Sym,
    /// `live`, `offline`, ...
    pub status: Sym,
    /// FULL / EMPTY / DRY / RECOVER, when reported.
    pub buffer_state: Sym,
    /// Cumulative bytes received by the stream.
    pub uploaded_bytes: u64,
    /// Cumulative bytes delivered by the stream.
    pub downloaded_bytes: u64,
    /// Viewers the node counts now.
    pub viewers: u32,
    /// Inputs now.
    pub inputs: u32,
    /// The node flags a problem.
    pub has_issues: bool,
    /// Quality tier (`1080p`, ...), empty when unknown.
    pub quality_tier: Sym,
    /// Primary video height in pixels, 0 when unknown.
    pub height: u32,
    /// Primary video frame rate, 0 when unknown.
    pub fps: f64,
    /// Primary bitrate in bits per second, 0 when unknown.
    pub bitrate_bps: u64,
    /// Cumulative packets sent.
    pub packets_sent: u64,
    /// Cumulative packets lost.
    pub packets_lost: u64,
    /// When the current stream session started (ms), when reported.
    pub started_at: Option<i64>,
}

/// Buffer state change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamBuffer {
    /// Stream.
    pub stream: StreamRef,
    /// Node reporting.
    pub node: Sym,
    /// FULL / EMPTY / DRY / RECOVER.
    pub buffer_state: Sym,
    /// The node flags a problem.
    pub has_issues: bool,
    /// Quality tier, empty when unknown.
    pub quality_tier: Sym,
}

/// Stream end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamEnd {
    /// Stream.
    pub stream: StreamRef,
    /// Node reporting.
    pub node: Sym,
    /// Bytes delivered over the stream's life.
    pub downloaded_bytes: u64,
    /// Bytes received over the stream's life.
    pub uploaded_bytes: u64,
}

/// Track list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrackList {
    /// Stream.
    pub stream: StreamRef,
    /// Node reporting.
    pub node: Sym,
    /// Quality tier, empty when unknown.
    pub quality_tier: Sym,
    /// Primary video height, 0 when unknown.
    pub height: u32,
    /// Number of tracks.
    pub tracks: u32,
}

/// A node's operational mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeMode {
    /// Serving normally.
    #[default]
    Normal,
    /// Finishing existing sessions, taking no new ones.
    Draining,
    /// Out of service.
    Maintenance,
}

impl NodeMode {
    /// Lower-case name, as Periscope stores it.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeMode::Normal => "normal",
            NodeMode::Draining => "draining",
            NodeMode::Maintenance => "maintenance",
        }
    }
}

/// A node poller update.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeUpdate {
    /// Node.
    pub node: Sym,
    /// CPU in tenths of a percent (0–1000).
    pub cpu_tenths: u32,
    /// RAM in use, bytes.
    pub ram_current: u64,
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
    /// Human location name.
    pub location: Sym,
    /// Streams active on the node.
    pub active_streams: u32,
    /// Health flag from the node.
    pub is_healthy: bool,
    /// Operational mode.
    pub mode: NodeMode,
    /// Node's base URL.
    pub base_url: Sym,
    /// What the node offers (`ingest`, `edge`, `storage`, `processing`, then its roles),
    /// lower-case; empty when the producer did not say (version 1).
    pub capabilities: Vec<Sym>,
    /// The node's stream map: what it carries and for how many viewers.
    pub streams: Vec<NodeStream>,
    /// Viewer connections open on the node.
    pub connections: u64,
}

/// One entry of a node's stream map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStream {
    /// Internal name without its prefix.
    pub name: Sym,
    /// Viewers of the stream on this node.
    pub viewers: u64,
    /// Inputs (an origin has at least one).
    pub inputs: u64,
    /// Bandwidth per viewer, bytes/s (0 = not reported).
    pub bandwidth: u64,
    /// Bytes sent to viewers so far.
    pub bytes_up: u64,
    /// Bytes received so far.
    pub bytes_down: u64,
    /// Pulled from another node rather than ingested here.
    pub replicated: bool,
}

/// A load-balancing decision.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingDecision {
    /// Stream routed, when known.
    pub stream: Option<StreamRef>,
    /// Chosen node (host or id).
    pub selected_node: Sym,
    /// success / failed / redirect / ...
    pub status: Sym,
    /// Balancer score of the chosen node.
    pub score: Option<u64>,
    /// Client latitude.
    pub client_latitude: Option<f64>,
    /// Client longitude.
    pub client_longitude: Option<f64>,
    /// Node latitude.
    pub node_latitude: Option<f64>,
    /// Node longitude.
    pub node_longitude: Option<f64>,
    /// Distance client to node, km, when the producer computed it.
    pub distance_km: Option<f64>,
    /// Client country.
    pub client_country: Sym,
}

impl RoutingDecision {
    /// The routing distance: the producer's figure, else the great-circle distance between the
    /// client and node coordinates when both are known.
    pub fn distance(&self) -> Option<f64> {
        self.distance_km.or_else(|| {
            Some(great_circle_km(
                self.client_latitude?,
                self.client_longitude?,
                self.node_latitude?,
                self.node_longitude?,
            ))
        })
    }
}

/// Great-circle distance in km on a sphere of radius 6371 km (as Periscope computes it).
pub fn great_circle_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    6371.0 * 2.0 * a.sqrt().min(1.0).asin()
}

/// Recognised stream activity that no Periscope table aggregates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignalKind {
    /// `push_end`.
    PushEnd,
    /// `push_out_start`.
    PushOutStart,
    /// `push_input_close`.
    PushInputClose,
    /// `recording_complete`.
    RecordingComplete,
    /// `recording_segment`.
    RecordingSegment,
    /// `play_rewrite` (viewer resolve; v1 `stream-view`).
    PlayRewrite,
    /// `stream_source`.
    StreamSource,
    /// `client_lifecycle_batch` (v1 `client-lifecycle`).
    ClientLifecycle,
}

impl SignalKind {
    /// Version-2 type name.
    pub fn type_name(self) -> &'static str {
        match self {
            SignalKind::PushEnd => "push_end",
            SignalKind::PushOutStart => "push_out_start",
            SignalKind::PushInputClose => "push_input_close",
            SignalKind::RecordingComplete => "recording_complete",
            SignalKind::RecordingSegment => "recording_segment",
            SignalKind::PlayRewrite => "play_rewrite",
            SignalKind::StreamSource => "stream_source",
            SignalKind::ClientLifecycle => "client_lifecycle_batch",
        }
    }
}

/// Stream activity without aggregates of its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamSignal {
    /// What happened.
    pub kind: SignalKind,
    /// Stream.
    pub stream: StreamRef,
    /// Node reporting.
    pub node: Sym,
}

/// An event of a type Keel does not know, kept whole.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnknownEvent {
    /// The record's event type as given.
    pub event_type: Sym,
    /// The record's value, as received.
    pub json: String,
}
