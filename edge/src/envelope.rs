//! From a producer's message to the Kafka record the platform writes: identity, tenant, time,
//! headers, and validation by the same codec the engine reads with, so a record Decklog accepts
//! is one the engine can use.
//!
//! ```
//! use keel_edge::envelope::{Caller, trigger_record};
//! use keel_edge::proto::{MistTrigger, Payload, ViewerConnectTrigger};
//! use uuid::Uuid;
//!
//! let tenant = Uuid::parse_str("5eed517e-ba5e-da7a-517e-ba5eda7a0001").unwrap();
//! let trigger = MistTrigger {
//!     trigger_type: "USER_NEW".into(),
//!     node_id: "edge-ams-1".into(),
//!     request_id: "abc".into(),
//!     payload: Some(Payload::ViewerConnect(ViewerConnectTrigger {
//!         stream_name: "live+demo".into(),
//!         session_id: "17".into(),
//!         ..Default::default()
//!     })),
//!     ..Default::default()
//! };
//! let record = trigger_record(&trigger, Caller::Tenant(tenant), 1_793_000_000_000).unwrap();
//! assert_eq!(record.event_type, "viewer_connect");
//! // A retried send of the same trigger is the same event.
//! let again = trigger_record(&trigger, Caller::Tenant(tenant), 1_793_000_005_000).unwrap();
//! assert_eq!(record.event_id, again.event_id);
//! // A trigger naming another tenant than the caller's is refused.
//! let other = MistTrigger { tenant_id: Some(Uuid::nil().to_string()), ..trigger };
//! assert!(trigger_record(&other, Caller::Tenant(tenant), 0).unwrap_err().contains("tenant"));
//! ```

use std::collections::BTreeMap;

use keel_operators::sym::Sym;
use keel_operators::time::format_rfc3339;
use keel_sources::codec::{TimeBounds, decode_checked, internal_name};
use keel_sources::record::{Headers, Position, Record};
use serde::Serialize;
use uuid::Uuid;

use crate::proto::{BalancingEvent, Event, EventData, MistTrigger, V1_EVENT_TYPES};

/// Who is sending, as the credentials say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A producer of one tenant: its events are that tenant's, whatever they claim.
    Tenant(Uuid),
    /// A platform service acting for every tenant: each event must name its tenant.
    Platform,
}

/// A record ready for Kafka (or the embedded engine).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// The event id, also the record key.
    pub event_id: Uuid,
    /// The Kafka `event_type`.
    pub event_type: &'static str,
    /// The tenant.
    pub tenant: Uuid,
    /// The record value (JSON).
    pub value: Vec<u8>,
    /// The record headers (their names are always the platform's fixed ones).
    pub headers: Vec<(&'static str, String)>,
}

/// A UUID in its hyphenated lower-case text, without the formatting machinery (this runs twice
/// per record on Decklog's path).
fn uuid_text(id: Uuid) -> String {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut text).to_owned()
}

/// The namespace-URL prefix of deterministic trigger ids, as the platform derives them.
const TRIGGER_ID_PREFIX: &str = "frameworks:mist-trigger:";

/// The event id of a trigger: the producer's own UUID if it stamped one, else a UUIDv5 of the
/// producer's request id (so a retried send is the same event), else a random one.
pub fn trigger_event_id(trigger: &MistTrigger) -> Uuid {
    if let Ok(id) = Uuid::parse_str(&trigger.event_id) {
        return id;
    }
    if !trigger.request_id.is_empty() {
        let mut name = Vec::with_capacity(TRIGGER_ID_PREFIX.len() + trigger.request_id.len());
        name.extend_from_slice(TRIGGER_ID_PREFIX.as_bytes());
        name.extend_from_slice(trigger.request_id.as_bytes());
        return Uuid::new_v5(&Uuid::NAMESPACE_URL, &name);
    }
    Uuid::new_v4()
}

fn tenant_of(given: Option<&str>, caller: Caller) -> Result<Uuid, String> {
    let given = given.map(str::trim).filter(|t| !t.is_empty());
    match (caller, given) {
        (Caller::Tenant(own), None) => Ok(own),
        (Caller::Tenant(own), Some(text)) => match Uuid::parse_str(text) {
            Ok(tenant) if tenant == own => Ok(own),
            _ => Err(format!(
                "tenant_id {text:?} is not the tenant of the caller's credentials ({own})"
            )),
        },
        (Caller::Platform, None) => {
            Err("no tenant_id: a platform caller must name each event's tenant".to_owned())
        }
        (Caller::Platform, Some(text)) => {
            Uuid::parse_str(text).map_err(|_| format!("tenant_id {text:?} is not a UUID"))
        }
    }
}

/// Unix seconds or milliseconds (by size) as milliseconds; zero or negative for unknown.
fn to_millis(t: i64) -> i64 {
    if t > 100_000_000_000 {
        t
    } else {
        t.saturating_mul(1000)
    }
}

#[derive(Serialize)]
struct V2Envelope<'a> {
    event_id: String,
    event_type: &'a str,
    timestamp: String,
    source: &'a str,
    tenant_id: String,
    schema_version: i32,
    #[serde(skip_serializing_if = "str::is_empty")]
    source_region: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_cluster_id: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    stream_origin_region: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_origin_cluster_id: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    correlation_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    causation_id: &'a str,
    data: &'a MistTrigger,
}

/// The source name Decklog writes on its records.
pub const SOURCE: &str = "decklog";

/// The version-2 record of a trigger, checked; `received_ms` is used as the event time only
/// when the trigger carries no time of its own. Errors are the reason, for the caller.
pub fn trigger_record(
    trigger: &MistTrigger,
    caller: Caller,
    received_ms: i64,
) -> Result<Outgoing, String> {
    trigger_into_record(trigger.clone(), caller, received_ms)
}

/// [`trigger_record`] for a trigger the caller no longer needs (Decklog's own path): the
/// trigger becomes the record's `data` without being copied.
pub fn trigger_into_record(
    mut trigger: MistTrigger,
    caller: Caller,
    received_ms: i64,
) -> Result<Outgoing, String> {
    let Some(payload) = &trigger.payload else {
        return Err("the trigger has no payload".to_owned());
    };
    let tenant = tenant_of(
        payload.own_tenant().or(trigger.tenant_id.as_deref()),
        caller,
    )?;
    let event_type = payload.event_type();
    let event_id = trigger_event_id(&trigger);
    let time = [trigger.trigger_unix_millis, to_millis(trigger.timestamp)]
        .into_iter()
        .find(|&t| t > 0)
        .unwrap_or(received_ms);
    let (id_text, tenant_text) = (uuid_text(event_id), uuid_text(tenant));
    trigger.tenant_id = Some(tenant_text.clone());
    trigger.event_id = id_text.clone();
    if trigger.schema_version == 0 {
        trigger.schema_version = 2;
    }
    let envelope = V2Envelope {
        event_id: id_text.clone(),
        event_type,
        timestamp: format_rfc3339(time),
        source: SOURCE,
        tenant_id: tenant_text.clone(),
        schema_version: 2,
        source_region: &trigger.source_region,
        source_cluster_id: trigger.cluster_id.as_deref(),
        stream_origin_region: &trigger.stream_origin_region,
        stream_origin_cluster_id: trigger.origin_cluster_id.as_deref(),
        correlation_id: &trigger.correlation_id,
        causation_id: &trigger.causation_id,
        data: &trigger,
    };
    // Room for a typical record up front instead of growing by doubling.
    let mut value = Vec::with_capacity(1024);
    serde_json::to_writer(&mut value, &envelope).map_err(|e| format!("cannot encode: {e}"))?;
    let mut headers = Vec::with_capacity(8);
    headers.extend([
        ("source", SOURCE.to_owned()),
        ("event_type", event_type.to_owned()),
        ("event_id", id_text),
        ("tenant_id", tenant_text),
    ]);
    for (name, value) in [
        ("source_region", Some(trigger.source_region.as_str())),
        ("source_cluster_id", trigger.cluster_id.as_deref()),
        (
            "stream_origin_region",
            Some(trigger.stream_origin_region.as_str()),
        ),
        (
            "stream_origin_cluster_id",
            trigger.origin_cluster_id.as_deref(),
        ),
    ] {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            headers.push((name, value.to_owned()));
        }
    }
    let outgoing = Outgoing {
        event_id,
        event_type,
        tenant,
        value,
        headers,
    };
    check(&outgoing, received_ms)?;
    Ok(outgoing)
}

/// Runs the record through the engine's own decoder (with its time bounds), so what is
/// accepted here is what the dataflows can use.
fn check(outgoing: &Outgoing, now_ms: i64) -> Result<(), String> {
    let headers = Headers::from_pairs(
        outgoing
            .headers
            .iter()
            .map(|(name, value)| (*name, value.as_str())),
    );
    let record = Record {
        position: Position::Memory {
            source: Sym::new(SOURCE),
            seq: 0,
        },
        value: &outgoing.value,
        headers,
    };
    decode_checked(&record, &TimeBounds::default(), now_ms)
        .map(drop)
        .map_err(|e| e.reason)
}

#[derive(Serialize)]
struct V1Record<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'a str,
    event_id: String,
    event_type: &'a str,
    timestamp: String,
    source: &'a str,
    schema_version: &'a str,
    data: &'a BTreeMap<&'a str, &'a str>,
}

/// Fields a version-1 event type needs (beyond the stream name where it needs one), as the
/// platform's first validator has them.
fn v1_required(event_type: &str) -> (bool, &'static [&'static str]) {
    match event_type {
        "stream-ingest" => (true, &["stream_key", "protocol", "push_url"]),
        "stream-view" => (true, &["playback_id"]),
        "user-connection" => (true, &["action"]),
        "client-lifecycle" => (true, &["bandwidth_in", "bandwidth_out"]),
        "node-lifecycle" => (false, &["node_id", "is_healthy"]),
        "track-list" => (true, &["track_list"]),
        "stream-buffer" => (true, &["buffer_state"]),
        "load-balancing" => (false, &["selected_node", "status"]),
        _ => (true, &[]),
    }
}

fn v1_check(event_type: &str, data: &BTreeMap<&str, &str>) -> Result<(), String> {
    let (needs_stream, fields) = v1_required(event_type);
    if needs_stream && !data.contains_key("internal_name") {
        return Err(format!(
            "{event_type} needs internal_name (or data.stream_name)"
        ));
    }
    if let Some(missing) = fields.iter().find(|f| !data.contains_key(*f)) {
        return Err(format!("{event_type} needs data.{missing}"));
    }
    let allowed: &[&str] = match event_type {
        "user-connection" => &["connect", "disconnect"],
        "stream-buffer" => &["FULL", "EMPTY", "DRY", "RECOVER"],
        "load-balancing" => &["success", "redirect", "failed"],
        _ => &[],
    };
    let field = match event_type {
        "user-connection" => "action",
        "stream-buffer" => "buffer_state",
        _ => "status",
    };
    match data.get(field) {
        Some(value) if !allowed.is_empty() && !allowed.contains(value) => Err(format!(
            "{event_type}: data.{field} {value:?} is not one of {}",
            allowed.join(", ")
        )),
        _ => Ok(()),
    }
}

fn v1_encode(
    event_id: Uuid,
    event_type: &str,
    time: i64,
    source: &str,
    data: &BTreeMap<&str, &str>,
) -> Result<Vec<u8>, String> {
    serde_json::to_vec(&V1Record {
        id: event_id.to_string(),
        kind: event_type,
        event_id: event_id.to_string(),
        event_type,
        timestamp: format_rfc3339(time),
        source,
        schema_version: "1.0",
        data,
    })
    .map_err(|e| format!("cannot encode: {e}"))
}

/// The version-1 record of event `index` of `batch`.
pub fn v1_record(
    batch: &Event,
    index: usize,
    caller: Caller,
    received_ms: i64,
) -> Result<Outgoing, String> {
    let event: &EventData = &batch.events[index];
    let event_type = usize::try_from(event.event_type)
        .ok()
        .and_then(|i| V1_EVENT_TYPES.get(i))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("event_type {} is not a known EventType", event.event_type))?;
    let mut data: BTreeMap<&str, &str> = event
        .data
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for (key, value) in [
        ("stream_id", event.stream_id.as_deref()),
        ("user_id", event.user_id.as_deref()),
        ("playback_id", event.playback_id.as_deref()),
        ("internal_name", event.internal_name.as_deref()),
        ("node_url", event.node_url.as_deref()),
        ("region", Some(event.region.as_str())),
    ] {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            data.insert(key, value);
        }
    }
    if !data.contains_key("internal_name")
        && let Some(name) = data.get("stream_name")
    {
        let stripped = name.split_once('+').map_or(*name, |(_, rest)| rest);
        data.insert("internal_name", internal_name(stripped));
    }
    v1_check(event_type, &data)?;
    let tenant = tenant_of(
        data.get("tenant_id")
            .copied()
            .filter(|t| !t.trim().is_empty())
            .or(Some(batch.tenant_id.as_str())),
        caller,
    )?;
    let tenant_text = tenant.to_string();
    data.insert("tenant_id", &tenant_text);
    let event_id = Uuid::parse_str(&event.event_id).unwrap_or_else(|_| {
        if batch.batch_id.is_empty() {
            Uuid::new_v4()
        } else {
            Uuid::new_v5(
                &Uuid::NAMESPACE_URL,
                format!("frameworks:decklog-batch:{}:{index}", batch.batch_id).as_bytes(),
            )
        }
    });
    let time = event
        .timestamp
        .or(batch.timestamp)
        .map(|t| t.millis())
        .filter(|&t| t > 0)
        .unwrap_or(received_ms);
    let source = if event.source.is_empty() {
        batch.source.as_str()
    } else {
        event.source.as_str()
    };
    let value = v1_encode(event_id, event_type, time, source, &data)?;
    let mut headers = vec![
        ("source", source.to_owned()),
        ("event_type", (*event_type).to_owned()),
        ("tenant_id", tenant_text.clone()),
    ];
    if !batch.batch_id.is_empty() {
        headers.push(("batch_id", batch.batch_id.clone()));
    }
    let outgoing = Outgoing {
        event_id,
        event_type,
        tenant,
        value,
        headers,
    };
    check(&outgoing, received_ms)?;
    Ok(outgoing)
}

/// The version-1 record of a routing decision sent with `SendBalancingEvent`.
pub fn balancing_record(
    event: &BalancingEvent,
    caller: Caller,
    received_ms: i64,
) -> Result<Outgoing, String> {
    let tenant = tenant_of(Some(&event.tenant_id), caller)?;
    let tenant_text = tenant.to_string();
    let event_id = Uuid::parse_str(&event.event_id).unwrap_or_else(|_| Uuid::new_v4());
    let time = event
        .timestamp
        .map(|t| t.millis())
        .filter(|&t| t > 0)
        .unwrap_or(received_ms);
    let (lat, lon, score) = (
        event.latitude.to_string(),
        event.longitude.to_string(),
        event.score.to_string(),
    );
    let mut data: BTreeMap<&str, &str> = BTreeMap::new();
    for (key, value) in [
        ("internal_name", internal_name(&event.stream_id)),
        ("selected_node", &event.selected_node),
        ("tenant_id", &tenant_text),
        ("client_latitude", &lat),
        ("client_longitude", &lon),
        ("status", &event.status),
        ("details", &event.details),
        ("client_country", &event.client_country),
        ("score", &score),
        ("region", &event.region),
    ] {
        if !value.is_empty() {
            data.insert(key, value);
        }
    }
    v1_check("load-balancing", &data)?;
    let value = v1_encode(event_id, "load-balancing", time, "", &data)?;
    let outgoing = Outgoing {
        event_id,
        event_type: "load-balancing",
        tenant,
        value,
        headers: vec![
            ("source", "foghorn".to_owned()),
            ("event_type", "load-balancing".to_owned()),
            ("tenant_id", tenant_text.clone()),
        ],
    };
    check(&outgoing, received_ms)?;
    Ok(outgoing)
}
