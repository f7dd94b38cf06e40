//! The Decklog wire messages, declared by hand with the field numbers of the platform's protos
//! (`edge/proto/decklog_v2.proto`, `edge/proto/decklog_v1.proto`); no code generation, so
//! building Keel needs no `protoc`. Version-2 messages also serialise to protobuf-JSON (proto
//! field names, 64-bit integers as strings, zero values left out), which is the `data` of a
//! version-2 Kafka record. Only the payloads Keel reads are declared, plus the raw fallback;
//! unknown fields of other payloads are skipped by the decoder, as protobuf requires.

use std::collections::HashMap;

use base64::Engine as _;
use serde::{Serialize, Serializer};

fn zero<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

fn int64<S: Serializer>(value: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

fn uint64<S: Serializer>(value: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

fn base64<S: Serializer>(value: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(value))
}

/// `google.protobuf.Empty`.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Empty {}

/// `google.protobuf.Timestamp`.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl Timestamp {
    /// Milliseconds since the epoch.
    pub fn millis(&self) -> i64 {
        self.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(self.nanos / 1_000_000))
    }
}

// ---------------------------------------------------------------------------------------------
// Version 2: `helmsmancontrol.DecklogService`
// ---------------------------------------------------------------------------------------------

/// `MistTrigger`: the envelope of every media event.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct MistTrigger {
    /// Mist's trigger name, e.g. `USER_END`.
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "zero")]
    pub trigger_type: String,
    #[prost(string, tag = "3")]
    #[serde(skip_serializing_if = "zero")]
    pub node_id: String,
    /// Unix seconds or milliseconds.
    #[prost(int64, tag = "4")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub timestamp: i64,
    #[prost(bool, tag = "5")]
    #[serde(skip_serializing_if = "zero")]
    pub blocking: bool,
    /// The producer's id of the trigger (`source_event_id`); the event id derives from it.
    #[prost(string, tag = "6")]
    #[serde(skip_serializing_if = "zero")]
    pub request_id: String,
    #[prost(string, optional, tag = "7")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    #[prost(string, optional, tag = "8")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[prost(string, optional, tag = "9")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
    #[prost(oneof = "Payload", tags = "10, 15, 16, 17, 18, 19, 21, 22, 24, 25, 40")]
    #[serde(flatten)]
    pub payload: Option<Payload>,
    #[prost(string, optional, tag = "33")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    #[prost(string, optional, tag = "37")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin_cluster_id: Option<String>,
    #[prost(string, tag = "50")]
    #[serde(skip_serializing_if = "zero")]
    pub source_region: String,
    #[prost(string, tag = "52")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_origin_region: String,
    #[prost(int32, tag = "54")]
    #[serde(skip_serializing_if = "zero")]
    pub schema_version: i32,
    #[prost(string, tag = "55")]
    #[serde(skip_serializing_if = "zero")]
    pub correlation_id: String,
    #[prost(string, tag = "56")]
    #[serde(skip_serializing_if = "zero")]
    pub causation_id: String,
    /// A producer-stamped event id (a UUID) wins over one derived from `request_id`.
    #[prost(string, tag = "57")]
    #[serde(skip_serializing_if = "zero")]
    pub event_id: String,
    /// Mist's `X-Trigger-UUID`.
    #[prost(string, tag = "58")]
    #[serde(skip_serializing_if = "zero")]
    pub trigger_uuid: String,
    /// Mist's `X-Trigger-UnixMillis`.
    #[prost(int64, tag = "59")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub trigger_unix_millis: i64,
}

/// The trigger's payload; the JSON key is the oneof field's name.
#[derive(Clone, PartialEq, prost::Oneof, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    #[prost(message, tag = "10")]
    PushRewrite(PushRewriteTrigger),
    #[prost(message, tag = "15")]
    ViewerConnect(ViewerConnectTrigger),
    #[prost(message, tag = "16")]
    ViewerDisconnect(ViewerDisconnectTrigger),
    #[prost(message, tag = "17")]
    StreamBuffer(StreamBufferTrigger),
    #[prost(message, tag = "18")]
    StreamEnd(StreamEndTrigger),
    #[prost(message, tag = "19")]
    TrackList(StreamTrackListTrigger),
    #[prost(message, tag = "21")]
    RecordingComplete(RecordingCompleteTrigger),
    #[prost(message, tag = "22")]
    StreamLifecycleUpdate(StreamLifecycleUpdate),
    #[prost(message, tag = "24")]
    NodeLifecycleUpdate(NodeLifecycleUpdate),
    #[prost(message, tag = "25")]
    LoadBalancingData(LoadBalancingData),
    #[prost(message, tag = "40")]
    RawMistWebhook(RawMistWebhookTrigger),
}

impl Payload {
    /// The Kafka `event_type` of this payload, as Decklog maps it.
    pub fn event_type(&self) -> &'static str {
        match self {
            Payload::PushRewrite(_) => "push_rewrite",
            Payload::ViewerConnect(_) => "viewer_connect",
            Payload::ViewerDisconnect(_) => "viewer_disconnect",
            Payload::StreamBuffer(_) => "stream_buffer",
            Payload::StreamEnd(_) => "stream_end",
            Payload::TrackList(_) => "stream_track_list",
            Payload::RecordingComplete(_) => "recording_complete",
            Payload::StreamLifecycleUpdate(_) => "stream_lifecycle_update",
            Payload::NodeLifecycleUpdate(_) => "node_lifecycle_update",
            Payload::LoadBalancingData(_) => "load_balancing",
            Payload::RawMistWebhook(_) => "raw_mist_webhook",
        }
    }

    /// The tenant a payload carries itself (poller updates and routing decisions), which is
    /// where Decklog takes the tenant of those event types from.
    pub fn own_tenant(&self) -> Option<&str> {
        match self {
            Payload::StreamLifecycleUpdate(p) => Some(&p.tenant_id),
            Payload::NodeLifecycleUpdate(p) => Some(&p.tenant_id),
            Payload::LoadBalancingData(p) => Some(&p.tenant_id),
            _ => None,
        }
        .filter(|t| !t.is_empty())
        .map(String::as_str)
    }
}

/// `PushRewriteTrigger` (Mist `PUSH_REWRITE`, ingest start).
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct PushRewriteTrigger {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "zero")]
    pub push_url: String,
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "zero")]
    pub hostname: String,
    #[prost(string, tag = "3")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_name: String,
    #[prost(string, tag = "4")]
    #[serde(skip_serializing_if = "zero")]
    pub protocol: String,
    #[prost(string, tag = "5")]
    #[serde(skip_serializing_if = "zero")]
    pub encoder: String,
    #[prost(string, tag = "7")]
    #[serde(skip_serializing_if = "zero")]
    pub node_id: String,
    #[prost(double, tag = "8")]
    #[serde(skip_serializing_if = "zero")]
    pub latitude: f64,
    #[prost(double, tag = "9")]
    #[serde(skip_serializing_if = "zero")]
    pub longitude: f64,
    #[prost(string, tag = "10")]
    #[serde(skip_serializing_if = "zero")]
    pub location: String,
    #[prost(string, tag = "17")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_id: String,
}

/// `ViewerConnectTrigger` (Mist `USER_NEW`).
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct ViewerConnectTrigger {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_name: String,
    /// The client's address.
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "zero")]
    pub host: String,
    #[prost(string, tag = "4")]
    #[serde(skip_serializing_if = "zero")]
    pub connector: String,
    #[prost(string, tag = "5")]
    #[serde(skip_serializing_if = "zero")]
    pub request_url: String,
    #[prost(string, tag = "6")]
    #[serde(skip_serializing_if = "zero")]
    pub session_id: String,
    #[prost(string, optional, tag = "7")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[prost(string, tag = "9")]
    #[serde(skip_serializing_if = "zero")]
    pub client_country: String,
    #[prost(string, tag = "10")]
    #[serde(skip_serializing_if = "zero")]
    pub client_city: String,
    #[prost(double, tag = "11")]
    #[serde(skip_serializing_if = "zero")]
    pub client_latitude: f64,
    #[prost(double, tag = "12")]
    #[serde(skip_serializing_if = "zero")]
    pub client_longitude: f64,
    #[prost(string, tag = "15")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_id: String,
}

/// `ViewerDisconnectTrigger` (Mist `USER_END`).
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct ViewerDisconnectTrigger {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "zero")]
    pub session_id: String,
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_name: String,
    #[prost(string, tag = "3")]
    #[serde(skip_serializing_if = "zero")]
    pub connector: String,
    #[prost(string, tag = "4")]
    #[serde(skip_serializing_if = "zero")]
    pub host: String,
    /// Seconds.
    #[prost(int64, tag = "5")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub duration: i64,
    #[prost(int64, tag = "6")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub up_bytes: i64,
    #[prost(int64, tag = "7")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub down_bytes: i64,
    #[prost(string, tag = "8")]
    #[serde(skip_serializing_if = "zero")]
    pub tags: String,
    #[prost(string, tag = "9")]
    #[serde(skip_serializing_if = "zero")]
    pub node_id: String,
    #[prost(string, tag = "10")]
    #[serde(skip_serializing_if = "zero")]
    pub country_code: String,
    #[prost(string, tag = "11")]
    #[serde(skip_serializing_if = "zero")]
    pub city: String,
    #[prost(double, tag = "12")]
    #[serde(skip_serializing_if = "zero")]
    pub latitude: f64,
    #[prost(double, tag = "13")]
    #[serde(skip_serializing_if = "zero")]
    pub longitude: f64,
    #[prost(uint64, tag = "15")]
    #[serde(skip_serializing_if = "zero", serialize_with = "uint64")]
    pub seconds_connected: u64,
    #[prost(string, tag = "18")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_id: String,
}

/// `StreamBufferTrigger` (Mist `STREAM_BUFFER`).
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct StreamBufferTrigger {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_name: String,
    /// FULL, EMPTY, DRY or RECOVER.
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "zero")]
    pub buffer_state: String,
    #[prost(bool, tag = "5")]
    #[serde(skip_serializing_if = "zero")]
    pub has_issues: bool,
    #[prost(string, tag = "6")]
    #[serde(skip_serializing_if = "zero")]
    pub issues_description: String,
    #[prost(int32, tag = "7")]
    #[serde(skip_serializing_if = "zero")]
    pub track_count: i32,
    #[prost(string, tag = "8")]
    #[serde(skip_serializing_if = "zero")]
    pub quality_tier: String,
    #[prost(int32, tag = "9")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_buffer_ms: i32,
    #[prost(int32, tag = "10")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_jitter_ms: i32,
    #[prost(string, tag = "11")]
    #[serde(skip_serializing_if = "zero")]
    pub mist_issues: String,
    #[prost(int32, tag = "12")]
    #[serde(skip_serializing_if = "zero")]
    pub max_keepaway_ms: i32,
    #[prost(string, tag = "13")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_id: String,
}

/// `StreamEndTrigger` (Mist `STREAM_END`).
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct StreamEndTrigger {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_name: String,
    #[prost(int64, tag = "2")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub downloaded_bytes: i64,
    #[prost(int64, tag = "3")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub uploaded_bytes: i64,
    #[prost(int64, tag = "4")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub total_viewers: i64,
    #[prost(int64, tag = "5")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub total_inputs: i64,
    #[prost(int64, tag = "6")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub total_outputs: i64,
    #[prost(int64, tag = "7")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub viewer_seconds: i64,
    #[prost(string, tag = "8")]
    #[serde(skip_serializing_if = "zero")]
    pub node_id: String,
    #[prost(string, tag = "9")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_id: String,
}

/// `StreamTrackListTrigger` (Mist `LIVE_TRACK_LIST`).
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct StreamTrackListTrigger {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_name: String,
    #[prost(int32, tag = "3")]
    #[serde(skip_serializing_if = "zero")]
    pub total_tracks: i32,
    #[prost(int32, tag = "4")]
    #[serde(skip_serializing_if = "zero")]
    pub video_track_count: i32,
    #[prost(int32, tag = "5")]
    #[serde(skip_serializing_if = "zero")]
    pub audio_track_count: i32,
    #[prost(string, tag = "6")]
    #[serde(skip_serializing_if = "zero")]
    pub quality_tier: String,
    #[prost(int32, tag = "7")]
    #[serde(skip_serializing_if = "zero")]
    pub primary_width: i32,
    #[prost(int32, tag = "8")]
    #[serde(skip_serializing_if = "zero")]
    pub primary_height: i32,
    #[prost(double, tag = "9")]
    #[serde(skip_serializing_if = "zero")]
    pub primary_fps: f64,
    #[prost(int32, tag = "10")]
    #[serde(skip_serializing_if = "zero")]
    pub primary_video_bitrate: i32,
    #[prost(string, tag = "11")]
    #[serde(skip_serializing_if = "zero")]
    pub primary_video_codec: String,
    #[prost(string, tag = "16")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_id: String,
}

/// `RecordingCompleteTrigger` (Mist `RECORDING_END`).
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct RecordingCompleteTrigger {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_name: String,
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "zero")]
    pub file_path: String,
    #[prost(string, tag = "3")]
    #[serde(skip_serializing_if = "zero")]
    pub output_protocol: String,
    #[prost(int64, tag = "4")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub bytes_written: i64,
    #[prost(int64, tag = "5")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub seconds_writing: i64,
    #[prost(int64, tag = "6")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub time_started: i64,
    #[prost(int64, tag = "7")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub time_ended: i64,
    #[prost(int64, tag = "8")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub media_duration_ms: i64,
    #[prost(string, tag = "9")]
    #[serde(skip_serializing_if = "zero")]
    pub node_id: String,
    #[prost(string, tag = "10")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_id: String,
    #[prost(string, tag = "11")]
    #[serde(skip_serializing_if = "zero")]
    pub exit_reason: String,
    #[prost(string, tag = "12")]
    #[serde(skip_serializing_if = "zero")]
    pub human_exit_reason: String,
}

/// `StreamLifecycleUpdate` (the node poller's per-stream figures).
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct StreamLifecycleUpdate {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "zero")]
    pub node_id: String,
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "zero")]
    pub tenant_id: String,
    #[prost(string, tag = "3")]
    #[serde(skip_serializing_if = "zero")]
    pub internal_name: String,
    #[prost(string, tag = "4")]
    #[serde(skip_serializing_if = "zero")]
    pub status: String,
    #[prost(string, tag = "5")]
    #[serde(skip_serializing_if = "zero")]
    pub buffer_state: String,
    #[prost(uint64, tag = "6")]
    #[serde(skip_serializing_if = "zero", serialize_with = "uint64")]
    pub uploaded_bytes: u64,
    #[prost(uint64, tag = "7")]
    #[serde(skip_serializing_if = "zero", serialize_with = "uint64")]
    pub downloaded_bytes: u64,
    #[prost(uint32, tag = "8")]
    #[serde(skip_serializing_if = "zero")]
    pub total_viewers: u32,
    #[prost(uint32, tag = "9")]
    #[serde(skip_serializing_if = "zero")]
    pub total_inputs: u32,
    #[prost(uint64, tag = "10")]
    #[serde(skip_serializing_if = "zero", serialize_with = "uint64")]
    pub viewer_seconds: u64,
    #[prost(int64, tag = "12")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub timestamp: i64,
    #[prost(bool, tag = "14")]
    #[serde(skip_serializing_if = "zero")]
    pub has_issues: bool,
    #[prost(string, tag = "17")]
    #[serde(skip_serializing_if = "zero")]
    pub quality_tier: String,
    #[prost(uint32, tag = "18")]
    #[serde(skip_serializing_if = "zero")]
    pub primary_width: u32,
    #[prost(uint32, tag = "19")]
    #[serde(skip_serializing_if = "zero")]
    pub primary_height: u32,
    #[prost(float, tag = "20")]
    #[serde(skip_serializing_if = "zero")]
    pub primary_fps: f32,
    #[prost(uint32, tag = "22")]
    #[serde(skip_serializing_if = "zero")]
    pub primary_bitrate: u32,
    #[prost(int64, tag = "23")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub started_at: i64,
    #[prost(uint64, tag = "24")]
    #[serde(skip_serializing_if = "zero", serialize_with = "uint64")]
    pub packets_sent: u64,
    #[prost(uint64, tag = "25")]
    #[serde(skip_serializing_if = "zero", serialize_with = "uint64")]
    pub packets_lost: u64,
    #[prost(uint64, tag = "27")]
    #[serde(skip_serializing_if = "zero", serialize_with = "uint64")]
    pub packets_retransmitted: u64,
    #[prost(string, tag = "38")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_id: String,
}

/// `NodeCapabilities`.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct NodeCapabilities {
    #[prost(bool, tag = "1")]
    #[serde(skip_serializing_if = "zero")]
    pub ingest: bool,
    #[prost(bool, tag = "2")]
    #[serde(skip_serializing_if = "zero")]
    pub edge: bool,
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "zero")]
    pub storage: bool,
    #[prost(bool, tag = "4")]
    #[serde(skip_serializing_if = "zero")]
    pub processing: bool,
    #[prost(string, repeated, tag = "5")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

/// `StreamData`: one stream on a node.
#[derive(Clone, Copy, PartialEq, prost::Message, Serialize)]
pub struct StreamData {
    /// Viewers.
    #[prost(uint64, tag = "1")]
    #[serde(skip_serializing_if = "zero", serialize_with = "uint64")]
    pub total: u64,
    #[prost(uint32, tag = "2")]
    #[serde(skip_serializing_if = "zero")]
    pub inputs: u32,
    #[prost(uint64, tag = "3")]
    #[serde(skip_serializing_if = "zero", serialize_with = "uint64")]
    pub bytes_up: u64,
    #[prost(uint64, tag = "4")]
    #[serde(skip_serializing_if = "zero", serialize_with = "uint64")]
    pub bytes_down: u64,
    /// Bytes/s per viewer.
    #[prost(uint32, tag = "5")]
    #[serde(skip_serializing_if = "zero")]
    pub bandwidth: u32,
    #[prost(bool, tag = "6")]
    #[serde(skip_serializing_if = "zero")]
    pub replicated: bool,
}

/// The names `NodeOperationalMode` values have in protobuf-JSON.
pub const OPERATIONAL_MODES: [&str; 4] = [
    "NODE_OPERATIONAL_MODE_UNSPECIFIED",
    "NODE_OPERATIONAL_MODE_NORMAL",
    "NODE_OPERATIONAL_MODE_DRAINING",
    "NODE_OPERATIONAL_MODE_MAINTENANCE",
];

fn operational_mode<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
    match usize::try_from(*value)
        .ok()
        .and_then(|i| OPERATIONAL_MODES.get(i))
    {
        Some(name) => s.serialize_str(name),
        None => s.serialize_i32(*value),
    }
}

/// `NodeLifecycleUpdate` (the node poller's figures, the routing input).
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct NodeLifecycleUpdate {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "zero")]
    pub node_id: String,
    /// CPU, tenths of a percent (0–1000).
    #[prost(uint32, tag = "2")]
    #[serde(skip_serializing_if = "zero")]
    pub cpu_tenths: u32,
    #[prost(uint64, tag = "3")]
    #[serde(skip_serializing_if = "zero", serialize_with = "uint64")]
    pub ram_max: u64,
    #[prost(uint64, tag = "4")]
    #[serde(skip_serializing_if = "zero", serialize_with = "uint64")]
    pub ram_current: u64,
    #[prost(uint64, tag = "9")]
    #[serde(skip_serializing_if = "zero", serialize_with = "uint64")]
    pub up_speed: u64,
    #[prost(uint64, tag = "10")]
    #[serde(skip_serializing_if = "zero", serialize_with = "uint64")]
    pub down_speed: u64,
    #[prost(uint64, tag = "11")]
    #[serde(skip_serializing_if = "zero", serialize_with = "uint64")]
    pub bw_limit: u64,
    #[prost(double, tag = "12")]
    #[serde(skip_serializing_if = "zero")]
    pub latitude: f64,
    #[prost(double, tag = "13")]
    #[serde(skip_serializing_if = "zero")]
    pub longitude: f64,
    #[prost(string, tag = "14")]
    #[serde(skip_serializing_if = "zero")]
    pub location: String,
    #[prost(uint32, tag = "15")]
    #[serde(skip_serializing_if = "zero")]
    pub active_streams: u32,
    #[prost(string, tag = "16")]
    #[serde(skip_serializing_if = "zero")]
    pub base_url: String,
    #[prost(bool, tag = "17")]
    #[serde(skip_serializing_if = "zero")]
    pub is_healthy: bool,
    #[prost(int64, tag = "19")]
    #[serde(skip_serializing_if = "zero", serialize_with = "int64")]
    pub timestamp: i64,
    #[prost(message, optional, tag = "20")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<NodeCapabilities>,
    #[prost(map = "string, message", tag = "23")]
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub streams: HashMap<String, StreamData>,
    #[prost(string, tag = "26")]
    #[serde(skip_serializing_if = "zero")]
    pub tenant_id: String,
    #[prost(uint64, tag = "29")]
    #[serde(skip_serializing_if = "zero", serialize_with = "uint64")]
    pub connections_current: u64,
    /// `NodeOperationalMode`: 1 normal, 2 draining, 3 maintenance.
    #[prost(int32, tag = "43")]
    #[serde(skip_serializing_if = "zero", serialize_with = "operational_mode")]
    pub operational_mode: i32,
}

/// `LoadBalancingData` (a routing decision).
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct LoadBalancingData {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "zero")]
    pub selected_node: String,
    #[prost(double, tag = "2")]
    #[serde(skip_serializing_if = "zero")]
    pub latitude: f64,
    #[prost(double, tag = "3")]
    #[serde(skip_serializing_if = "zero")]
    pub longitude: f64,
    #[prost(string, tag = "4")]
    #[serde(skip_serializing_if = "zero")]
    pub status: String,
    #[prost(string, tag = "5")]
    #[serde(skip_serializing_if = "zero")]
    pub details: String,
    #[prost(uint64, tag = "6")]
    #[serde(skip_serializing_if = "zero", serialize_with = "uint64")]
    pub score: u64,
    #[prost(string, tag = "8")]
    #[serde(skip_serializing_if = "zero")]
    pub client_country: String,
    #[prost(double, tag = "9")]
    #[serde(skip_serializing_if = "zero")]
    pub node_latitude: f64,
    #[prost(double, tag = "10")]
    #[serde(skip_serializing_if = "zero")]
    pub node_longitude: f64,
    #[prost(string, tag = "12")]
    #[serde(skip_serializing_if = "zero")]
    pub selected_node_id: String,
    #[prost(double, tag = "13")]
    #[serde(skip_serializing_if = "zero")]
    pub routing_distance_km: f64,
    #[prost(string, tag = "14")]
    #[serde(skip_serializing_if = "zero")]
    pub tenant_id: String,
    #[prost(string, tag = "15")]
    #[serde(skip_serializing_if = "zero")]
    pub internal_name: String,
    #[prost(string, tag = "18")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_tenant_id: String,
    #[prost(string, tag = "21")]
    #[serde(skip_serializing_if = "zero")]
    pub stream_id: String,
    #[prost(uint32, tag = "22")]
    #[serde(skip_serializing_if = "zero")]
    pub candidates_count: u32,
    #[prost(string, tag = "24")]
    #[serde(skip_serializing_if = "zero")]
    pub source: String,
}

/// `RawMistWebhookTrigger`: a trigger the adapter could not parse, kept whole.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct RawMistWebhookTrigger {
    #[prost(bytes = "vec", tag = "1")]
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "base64")]
    pub payload_raw: Vec<u8>,
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "zero")]
    pub parse_error: String,
}

/// `SendEventsResponse`: the answer to a batch (Keel's client-streaming method).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SendEventsResponse {
    /// Events handed off now, or recognised as handed off by an earlier send (durable in Kafka;
    /// in the embedded mode, queued in the engine's input).
    #[prost(uint32, tag = "1")]
    pub accepted: u32,
    /// Events refused, each with its position in the stream and the reason.
    #[prost(message, repeated, tag = "2")]
    pub rejected: Vec<Rejection>,
    /// Events that were already durable (a retried send), included in `accepted`.
    #[prost(uint32, tag = "3")]
    pub duplicates: u32,
}

/// One refused event of a batch.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Rejection {
    /// Zero-based position in the batch.
    #[prost(uint32, tag = "1")]
    pub index: u32,
    /// Why.
    #[prost(string, tag = "2")]
    pub reason: String,
    /// Worth sending again later (the hand-off failed), rather than a fault in the event.
    #[prost(bool, tag = "3")]
    pub retryable: bool,
}

// ---------------------------------------------------------------------------------------------
// Version 1: `decklog.DecklogService`
// ---------------------------------------------------------------------------------------------

/// `decklog.EventType` names, by number, as version-1 Kafka records spell them.
pub const V1_EVENT_TYPES: [&str; 13] = [
    "",
    "stream-ingest",
    "stream-view",
    "stream-lifecycle",
    "user-connection",
    "push-lifecycle",
    "recording-lifecycle",
    "client-lifecycle",
    "node-lifecycle",
    "load-balancing",
    "track-list",
    "stream-buffer",
    "stream-end",
];

/// `decklog.Event`: a batch.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(string, tag = "1")]
    pub batch_id: String,
    #[prost(string, tag = "2")]
    pub source: String,
    #[prost(string, tag = "3")]
    pub tenant_id: String,
    #[prost(message, repeated, tag = "4")]
    pub events: Vec<EventData>,
    #[prost(map = "string, string", tag = "5")]
    pub metadata: HashMap<String, String>,
    #[prost(message, optional, tag = "6")]
    pub timestamp: Option<Timestamp>,
}

/// `decklog.EventData`: one event, its fields as strings.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EventData {
    #[prost(string, tag = "1")]
    pub event_id: String,
    /// `decklog.EventType`.
    #[prost(int32, tag = "2")]
    pub event_type: i32,
    #[prost(message, optional, tag = "3")]
    pub timestamp: Option<Timestamp>,
    #[prost(string, tag = "4")]
    pub source: String,
    #[prost(string, optional, tag = "5")]
    pub stream_id: Option<String>,
    #[prost(string, optional, tag = "6")]
    pub user_id: Option<String>,
    #[prost(string, optional, tag = "7")]
    pub playback_id: Option<String>,
    #[prost(string, optional, tag = "8")]
    pub internal_name: Option<String>,
    #[prost(string, tag = "9")]
    pub region: String,
    #[prost(string, optional, tag = "10")]
    pub node_url: Option<String>,
    #[prost(map = "string, string", tag = "11")]
    pub data: HashMap<String, String>,
    #[prost(string, tag = "12")]
    pub schema_version: String,
}

/// `decklog.EventResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EventResponse {
    /// `success` or `error`.
    #[prost(string, tag = "1")]
    pub status: String,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(uint32, tag = "3")]
    pub processed_count: u32,
}

/// `decklog.BalancingEvent`: one routing decision (version 1).
#[derive(Clone, PartialEq, prost::Message)]
pub struct BalancingEvent {
    #[prost(string, tag = "1")]
    pub event_id: String,
    #[prost(string, tag = "2")]
    pub stream_id: String,
    #[prost(string, tag = "3")]
    pub selected_node: String,
    #[prost(string, tag = "4")]
    pub tenant_id: String,
    #[prost(double, tag = "5")]
    pub latitude: f64,
    #[prost(double, tag = "6")]
    pub longitude: f64,
    #[prost(string, tag = "7")]
    pub status: String,
    #[prost(string, tag = "8")]
    pub details: String,
    #[prost(message, optional, tag = "9")]
    pub timestamp: Option<Timestamp>,
    #[prost(string, tag = "10")]
    pub source: String,
    #[prost(string, tag = "11")]
    pub region: String,
    #[prost(uint64, tag = "12")]
    pub score: u64,
    #[prost(string, tag = "13")]
    pub client_ip: String,
    #[prost(string, tag = "14")]
    pub client_country: String,
    #[prost(string, tag = "15")]
    pub schema_version: String,
}

/// `decklog.HealthRequest`.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct HealthRequest {}

/// `decklog.HealthResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthResponse {
    #[prost(string, tag = "1")]
    pub status: String,
    #[prost(string, tag = "2")]
    pub version: String,
    #[prost(message, optional, tag = "3")]
    pub timestamp: Option<Timestamp>,
}

#[cfg(test)]
mod wire_tests;
