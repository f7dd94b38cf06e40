//! Decoding records of both wire versions into [`Event`]s, or into [`IngestError`] rows.
//!
//! [`decode`] reads one record in a single pass with the [`json`] cursor and never panics: every
//! way a record can be unusable is a `reason` in its error row. The rules (EVENTS.md):
//!
//! - **Version**: `schema_version` 2 (or an `event_type` without dashes) is version 2, a JSON
//!   envelope around a protobuf-JSON trigger with the payload under its oneof name; `"1.0"` (or a
//!   kebab-case type) is version 1, a flat map of strings.
//! - **Headers**: body fields win; the `tenant_id`, `event_type` and `event_id` headers fill in
//!   what the body lacks.
//! - **Tenant**: body, header, trigger, then payload; it must be a non-nil UUID, else the record
//!   is refused (fail closed).
//! - **Event id**: the envelope's (`event_id` or `id`), the header's, or the trigger's; a
//!   non-UUID id is mapped to a UUIDv5 of its text, and a record without one gets a UUIDv5 of its
//!   bytes, so a replayed record always has the same id.
//! - **Event time**: the envelope `timestamp`, unless a payload time is more precise
//!   (`trigger_unix_millis`, or integer timestamps, read as milliseconds from 10¹¹ up and as seconds
//!   below).
//! - **Streams**: `live+`/`vod+` prefixes are stripped from internal names, which may be at most
//!   [`MAX_STREAM_NAME`] characters long and hold no NUL; a `stream_id`, when present, must be
//!   a UUID.
//! - **Unknown types** become [`EventKind::Unknown`], never errors (but for a type name past
//!   [`MAX_FIELD_BYTES`]: the name is interned).
//! - **Lengths**: a string or number field a known type's record is read for may hold at most
//!   [`MAX_FIELD_BYTES`] bytes (unescaped).

mod fields;
pub mod json;
mod keys;
mod uuid_text;

use std::borrow::Cow;

use compact_str::CompactString;
use keel_operators::sym::Sym;
use keel_operators::time::{Precision, parse_rfc3339_precise};
use uuid::Uuid;

use crate::error::{EXCERPT_BYTES, IngestError, REASON_BYTES, clip, excerpt};
use crate::event::{
    Event, EventKind, IngestStart, NodeMode, NodeStream, NodeUpdate, RoutingDecision, SignalKind,
    StreamBuffer, StreamEnd, StreamRef, StreamSignal, StreamUpdate, TrackList, UnknownEvent,
    ViewerConnect, ViewerDisconnect, ViewerPlace,
};
use crate::record::Record;
use fields::{
    FIELD_NAMES, Fields, degrees, first_sym, first_text, flag, float, int, sym, text, uint, uint32,
};
use json::{Json, Key, Value};
use keys::{Row, Shape, Trail};

thread_local! {
    /// The key orders this thread's records followed so far (see [`keys`]).
    static TRAIL: Trail = const { Trail::new() };
}

/// The most bytes a string (unescaped) or number field of a known type's record may hold. Names,
/// ids, places and protocols are far shorter; a longer one is a producer fault, and kept as it
/// came it would stay in memory for good (names are interned, session ids kept per session).
pub const MAX_FIELD_BYTES: usize = 1024;

/// The most capabilities (roles and flags) a node may name: names are interned for good.
pub const MAX_CAPABILITIES: usize = 256;

/// The longest session a disconnect may report, in seconds: 30 days. A longer `duration` is a
/// counter gone wrong, and a session stretched over years would make a 5-minute window of its
/// stream for every five minutes of them (one such record took the engine's memory).
pub const MAX_SESSION_SECONDS: u64 = 30 * 24 * 3600;

/// The most bytes a session may report each way: 1 PiB, a gigabit per second for over three
/// months, past any viewer. One value of 2^64 - 1 wrapped a stream's total; totals past 2^64
/// now take over ten thousand sessions at this bound, and stop at the top rather than wrap.
pub const MAX_SESSION_BYTES: u64 = 1 << 50;

/// The farthest a client can be from a node, in km: half the Earth's circumference.
pub const MAX_DISTANCE_KM: f64 = 20_040.0;

/// The times a stream's `started_at` may give, ms: from 2000 (as event times) to 2100.
const STARTED_AT: std::ops::Range<i64> = 946_684_800_000..4_102_444_800_000;

/// Namespace for the UUIDv5 ids Keel derives for records that carry none.
pub const KEEL_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_2d65_7665_6e74_2d69_6473_0001);

/// How an event is built from its payload's fields, the trigger envelope's and the payload's
/// nested objects.
type Build = fn(&Fields<'_>, &Fields<'_>, &Nested<'_>) -> Result<EventKind, String>;

/// Version-2 payload keys Keel reads, each with the event type it belongs to and its builder.
const PAYLOADS: &[(&str, &str, Build)] = &[
    ("push_rewrite", "push_rewrite", |p, d, _| {
        Ok(EventKind::IngestStart(ingest_start(p, d)?))
    }),
    ("viewer_connect", "viewer_connect", |p, d, _| {
        Ok(EventKind::ViewerConnect(viewer_connect(p, d)?))
    }),
    ("viewer_disconnect", "viewer_disconnect", |p, d, _| {
        Ok(EventKind::ViewerDisconnect(viewer_disconnect(p, d)?))
    }),
    (
        "stream_lifecycle_update",
        "stream_lifecycle_update",
        |p, d, _| Ok(EventKind::StreamUpdate(stream_update(p, d)?)),
    ),
    ("stream_buffer", "stream_buffer", |p, d, _| {
        Ok(EventKind::StreamBuffer(stream_buffer(p, d)?))
    }),
    ("stream_end", "stream_end", |p, d, _| {
        Ok(EventKind::StreamEnd(stream_end(p, d)?))
    }),
    ("track_list", "stream_track_list", |p, d, _| {
        Ok(EventKind::TrackList(track_list(p, d)?))
    }),
    (
        "node_lifecycle_update",
        "node_lifecycle_update",
        |p, d, n| Ok(EventKind::NodeUpdate(node_update(p, d, n)?)),
    ),
    ("load_balancing_data", "load_balancing", |p, d, _| {
        Ok(EventKind::Routing(routing(p, d)?))
    }),
    ("push_end", "push_end", |p, d, _| {
        signal(SignalKind::PushEnd, p, d)
    }),
    ("push_out_start", "push_out_start", |p, d, _| {
        signal(SignalKind::PushOutStart, p, d)
    }),
    ("push_input_close", "push_input_close", |p, d, _| {
        signal(SignalKind::PushInputClose, p, d)
    }),
    ("recording_complete", "recording_complete", |p, d, _| {
        signal(SignalKind::RecordingComplete, p, d)
    }),
    ("recording_segment", "recording_segment", |p, d, _| {
        signal(SignalKind::RecordingSegment, p, d)
    }),
    ("play_rewrite", "play_rewrite", |p, d, _| {
        signal(SignalKind::PlayRewrite, p, d)
    }),
    ("stream_source", "stream_source", |p, d, _| {
        signal(SignalKind::StreamSource, p, d)
    }),
    (
        "client_lifecycle_batch",
        "client_lifecycle_batch",
        |p, d, _| signal(SignalKind::ClientLifecycle, p, d),
    ),
];

/// The envelope and payload of one record, as read.
#[derive(Default)]
struct Parsed<'a> {
    event_id: Option<Value<'a>>,
    id: Option<Value<'a>>,
    event_type: Option<Value<'a>>,
    type_: Option<Value<'a>>,
    timestamp: Option<Value<'a>>,
    tenant_id: Option<Value<'a>>,
    schema_version: Option<Value<'a>>,
    /// `data`'s own fields (version 1's map; version 2's trigger envelope).
    data: Fields<'a>,
    /// Version 2's payload, by its index in `PAYLOADS`, when there is one.
    payload_index: Option<usize>,
    /// Version 2's payload fields (read in place: `Fields` is large).
    payload: Fields<'a>,
    /// The payload's object-valued fields Keel reads, as raw text.
    nested: Nested<'a>,
}

/// Object-valued payload fields, kept as text and read only by the kinds that use them.
#[derive(Default)]
struct Nested<'a> {
    capabilities: Option<&'a str>,
    streams: Option<&'a str>,
}

/// Why a record cannot be used (the `reason` of its error row).
#[derive(Debug)]
pub(crate) struct Reason(pub String);

impl From<json::JsonError> for Reason {
    fn from(error: json::JsonError) -> Self {
        Reason(error.to_string())
    }
}

impl From<String> for Reason {
    fn from(reason: String) -> Self {
        Reason(reason)
    }
}

/// Indices in [`keys::NAMES`] of the keys whose values are kept in `Parsed` rather than in a
/// `Fields` (some of them are field names too, read into `Fields` inside `data`).
const DATA: usize = keys::index_of("data");
const ID: usize = keys::index_of("id");
const TYPE: usize = keys::index_of("type");
const SCHEMA_VERSION: usize = keys::index_of("schema_version");
const EVENT_ID: usize = keys::index_of("event_id");
const EVENT_TYPE: usize = keys::index_of("event_type");
const TIMESTAMP: usize = keys::index_of("timestamp");
const TENANT_ID: usize = keys::index_of("tenant_id");
const CAPABILITIES: usize = keys::index_of("capabilities");
const STREAMS: usize = keys::index_of("streams");

fn read_fields<'a>(
    json: &mut Json<'a>,
    row: Row<'_>,
    fields: &mut Fields<'a>,
    nested: &mut Nested<'a>,
) -> Result<(), Reason> {
    json.known_object(row, |json, key| {
        let slot = match key {
            Key::Known(field) if field < FIELD_NAMES.len() => return fields.set(field, json),
            Key::Known(CAPABILITIES) => &mut nested.capabilities,
            Key::Known(STREAMS) => &mut nested.streams,
            _ => return Ok(json.skip()?),
        };
        if json.peek() == Some(b'{') {
            *slot = Some(json.raw()?);
        } else {
            json.skip()?;
        }
        Ok(())
    })
}

fn read_data<'a>(
    json: &mut Json<'a>,
    trail: &Trail,
    parsed: &mut Parsed<'a>,
) -> Result<(), Reason> {
    if json.peek() != Some(b'{') {
        return Err(Reason("field \"data\": expected an object".to_owned()));
    }
    json.known_object(trail.row(Shape::Data), |json, key| {
        let payload = match key {
            Key::Known(field) if field < FIELD_NAMES.len() => return parsed.data.set(field, json),
            Key::Known(key) if (keys::FIRST_PAYLOAD..keys::END_PAYLOAD).contains(&key) => {
                key - keys::FIRST_PAYLOAD
            }
            _ => return Ok(json.skip()?),
        };
        let name = PAYLOADS[payload].0;
        if let Some(first) = parsed.payload_index {
            return Err(Reason(format!(
                "data holds two payloads, \"{}\" and \"{name}\"",
                PAYLOADS[first].0
            )));
        }
        if json.peek() != Some(b'{') {
            return Err(Reason(format!("payload \"{name}\": expected an object")));
        }
        let row = trail.row(Shape::Payload(payload));
        read_fields(json, row, &mut parsed.payload, &mut parsed.nested)?;
        parsed.payload_index = Some(payload);
        Ok(())
    })
}

fn read_record<'a>(value: &'a [u8], trail: &Trail, parsed: &mut Parsed<'a>) -> Result<(), Reason> {
    // Checked with SIMD (a record is mostly ASCII); only a refused record is checked again,
    // by the standard library, for the position of its first bad byte.
    let text = simdutf8::basic::from_utf8(value).or_else(|_| {
        std::str::from_utf8(value).map_err(|e| {
            Reason(format!(
                "record is not valid UTF-8 (at byte {})",
                e.valid_up_to()
            ))
        })
    })?;
    let mut json = Json::new(text);
    match json.peek() {
        None => return Err(Reason("empty record".to_owned())),
        Some(b'{') => {}
        Some(_) => return Err(Reason("record is not a JSON object".to_owned())),
    }
    json.known_object(trail.row(Shape::Record), |json, key| {
        let Key::Known(key) = key else {
            return Ok(json.skip()?);
        };
        let slot = match key {
            DATA => return read_data(json, trail, parsed),
            EVENT_ID => &mut parsed.event_id,
            ID => &mut parsed.id,
            EVENT_TYPE => &mut parsed.event_type,
            TYPE => &mut parsed.type_,
            TIMESTAMP => &mut parsed.timestamp,
            TENANT_ID => &mut parsed.tenant_id,
            SCHEMA_VERSION => &mut parsed.schema_version,
            _ => return Ok(json.skip()?),
        };
        fields::scalar(json, key, slot)
    })?;
    Ok(json.finish()?)
}

/// The event times Keel accepts. An event time outside them is refused: one record with a
/// clock years off would otherwise stretch every open session, and every 5-minute window,
/// to its time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeBounds {
    /// Earliest accepted event time, ms.
    pub earliest: i64,
    /// How far ahead of the local clock an event may be, ms.
    pub max_ahead: i64,
}

impl Default for TimeBounds {
    fn default() -> Self {
        TimeBounds {
            earliest: 946_684_800_000,
            max_ahead: keel_operators::time::HOUR,
        }
    }
}

impl TimeBounds {
    /// Whether an event at `time` is accepted when the local clock says `now` (ms); the reason
    /// in words when it is not.
    pub fn check(&self, time: i64, now: i64) -> Result<(), String> {
        use keel_operators::time::format_rfc3339;
        if time < self.earliest {
            return Err(format!(
                "event time {} is before {}",
                format_rfc3339(time),
                format_rfc3339(self.earliest)
            ));
        }
        if time > now.saturating_add(self.max_ahead) {
            return Err(format!(
                "event time {} is more than {} s ahead of this machine's clock",
                format_rfc3339(time),
                self.max_ahead / 1000
            ));
        }
        Ok(())
    }
}

/// Decodes one record and refuses event times outside `bounds` (`now` is the local clock, ms).
pub fn decode_checked(
    record: &Record<'_>,
    bounds: &TimeBounds,
    now: i64,
) -> Result<Event, IngestError> {
    let event = decode(record)?;
    match bounds.check(event.time, now) {
        Ok(()) => Ok(event),
        Err(reason) => Err(IngestError {
            position: record.position.clone(),
            reason,
            event_type: Some(event.kind.type_name().to_owned()),
            tenant_id: Some(event.tenant.to_string()),
            excerpt: excerpt(record.value),
        }),
    }
}

/// Decodes one record. Errors are rows, never panics.
pub fn decode(record: &Record<'_>) -> Result<Event, IngestError> {
    let mut parsed = Parsed::default();
    let read = TRAIL.with(|trail| read_record(record.value, trail, &mut parsed));
    let event_type = first_text(&[&parsed.event_type, &parsed.type_])
        .or_else(|| record.headers.event_type.as_deref().map(Cow::Borrowed));
    let tenant_text = first_text(&[&parsed.tenant_id])
        .or_else(|| record.headers.tenant_id.as_deref().map(Cow::Borrowed))
        .or_else(|| first_text(&[parsed.data.tenant_id()]))
        .or_else(|| first_text(&[parsed.payload.tenant_id()]));
    // What the row repeats of the record is cut to size, as its excerpt is.
    let fail = |reason: String| IngestError {
        position: record.position.clone(),
        reason: clip(&reason, REASON_BYTES),
        event_type: event_type.as_deref().map(|t| clip(t, EXCERPT_BYTES)),
        tenant_id: tenant_text.as_deref().map(|t| clip(t, EXCERPT_BYTES)),
        excerpt: excerpt(record.value),
    };
    read.map_err(|reason| fail(reason.0))?;
    let Some(event_type) = event_type.as_deref() else {
        return Err(fail("event_type missing (body and header)".to_owned()));
    };
    // Only a record longer than the bound can hold a field longer than it (most are shorter),
    // and only a known type's fields are kept (an unknown type is kept whole, as raw JSON).
    let long_field = if record.value.len() > MAX_FIELD_BYTES && known_type(event_type) {
        [&parsed.data, &parsed.payload]
            .into_iter()
            .find_map(|fields| fields.longer_than(MAX_FIELD_BYTES))
    } else {
        None
    };
    let too_long = long_field
        .or((event_type.len() > MAX_FIELD_BYTES).then_some(("event_type", event_type.len())));
    if let Some((name, length)) = too_long {
        return Err(fail(format!(
            "field \"{name}\" is {length} bytes long, more than the {MAX_FIELD_BYTES} a field \
             Keel reads may hold"
        )));
    }
    let tenant = parse_tenant(tenant_text.as_deref()).map_err(&fail)?;
    let id = event_id(&parsed, record).map_err(&fail)?;
    let time = event_time(&parsed).map_err(&fail)?;
    let kind = event_kind(&parsed, event_type, record).map_err(&fail)?;
    Ok(Event {
        id,
        tenant,
        time,
        kind,
    })
}

fn parse_tenant(text: Option<&str>) -> Result<Uuid, String> {
    let text = text.ok_or("tenant_id missing (body, header and payload)")?;
    let tenant =
        uuid_text::parse(text).ok_or_else(|| format!("tenant_id {text:?} is not a UUID"))?;
    if tenant.is_nil() {
        return Err("tenant_id is the nil UUID".to_owned());
    }
    Ok(tenant)
}

fn event_id(parsed: &Parsed<'_>, record: &Record<'_>) -> Result<Uuid, String> {
    let given = first_text(&[&parsed.event_id, &parsed.id])
        .or_else(|| record.headers.event_id.as_deref().map(Cow::Borrowed))
        .or_else(|| first_text(&[parsed.data.event_id()]));
    Ok(match given {
        Some(text) => uuid_text::parse(&text)
            .unwrap_or_else(|| Uuid::new_v5(&KEEL_NAMESPACE, text.as_bytes())),
        None => Uuid::new_v5(&KEEL_NAMESPACE, record.value),
    })
}

/// Milliseconds from an integer that may be seconds or milliseconds.
fn unix_time(n: i64) -> (i64, Precision) {
    if n.unsigned_abs() >= 100_000_000_000 {
        (n, Precision::Millis)
    } else {
        (n.saturating_mul(1000), Precision::Seconds)
    }
}

fn event_time(parsed: &Parsed<'_>) -> Result<i64, String> {
    let mut best: Option<(i64, Precision)> = None;
    let mut offer = |candidate: (i64, Precision)| {
        if best.is_none_or(|b| candidate.1 > b.1) {
            best = Some(candidate);
        }
    };
    match &parsed.timestamp {
        Some(Value::Str(text)) if !text.is_empty() => {
            let text = text.get();
            offer(
                parse_rfc3339_precise(&text)
                    .ok_or_else(|| format!("timestamp {text:?} is not an RFC 3339 time"))?,
            );
        }
        Some(Value::Num(_)) => {
            if let Some(n) = int(&parsed.timestamp, "timestamp")? {
                offer(unix_time(n));
            }
        }
        _ => {}
    }
    if let Some(ms) = int(parsed.data.trigger_unix_millis(), "trigger_unix_millis")? {
        offer((ms, Precision::Millis));
    }
    if let Some(n) = int(parsed.payload.timestamp(), "timestamp")? {
        offer(unix_time(n));
    }
    if let Some(n) = int(parsed.data.timestamp(), "timestamp")? {
        offer(unix_time(n));
    }
    best.map(|(t, _)| t)
        .ok_or_else(|| "no event time (timestamp missing)".to_owned())
}

/// Which wire version a record is.
fn is_version_1(parsed: &Parsed<'_>, event_type: &str) -> bool {
    match &parsed.schema_version {
        Some(Value::Num(n)) => n.starts_with('1'),
        Some(Value::Str(s)) if !s.is_empty() => s.get().starts_with('1'),
        _ => event_type.contains('-'),
    }
}

fn event_kind(
    parsed: &Parsed<'_>,
    event_type: &str,
    record: &Record<'_>,
) -> Result<EventKind, String> {
    if is_version_1(parsed, event_type) {
        version_1(parsed, event_type, record)
    } else {
        version_2(parsed, event_type, record)
    }
}

fn unknown(event_type: &str, record: &Record<'_>) -> EventKind {
    EventKind::Unknown(UnknownEvent {
        event_type: Sym::new(event_type),
        json: String::from_utf8_lossy(record.value).into_owned(),
    })
}

/// The event types of version 1 that [`version_1`] reads (others are version 2's or unknown).
const VERSION_1_TYPES: &[&str] = &[
    "stream-ingest",
    "user-connection",
    "stream-lifecycle",
    "stream-buffer",
    "stream-end",
    "track-list",
    "node-lifecycle",
    "load-balancing",
    "push-lifecycle",
    "recording-lifecycle",
    "client-lifecycle",
    "stream-view",
];

/// Whether either version names `event_type` (an unknown type's record is kept whole).
fn known_type(event_type: &str) -> bool {
    VERSION_1_TYPES.contains(&event_type) || PAYLOADS.iter().any(|(_, ty, _)| *ty == event_type)
}

fn version_2(
    parsed: &Parsed<'_>,
    event_type: &str,
    record: &Record<'_>,
) -> Result<EventKind, String> {
    if let Some(payload) = parsed.payload_index
        && PAYLOADS[payload].1 == event_type
    {
        return PAYLOADS[payload].2(&parsed.payload, &parsed.data, &parsed.nested);
    }
    let Some(&(expected, ..)) = PAYLOADS.iter().find(|(_, ty, _)| *ty == event_type) else {
        // Perhaps a version 1 type under a `schema_version` of 2: read in its own format (its
        // fields are those of version 1), rather than counted as an unknown type. A type
        // neither version knows is unknown there too.
        return version_1(parsed, event_type, record);
    };
    Err(match parsed.payload_index {
        Some(payload) => format!(
            "event_type {event_type} carries a \"{}\" payload instead of \"{expected}\"",
            PAYLOADS[payload].0
        ),
        None => format!("event_type {event_type} without its \"{expected}\" payload in data"),
    })
}

fn version_1(
    parsed: &Parsed<'_>,
    event_type: &str,
    record: &Record<'_>,
) -> Result<EventKind, String> {
    let d = &parsed.data;
    let sub_type = text(d.event_type());
    Ok(match event_type {
        "stream-ingest" => EventKind::IngestStart(ingest_start(d, d)?),
        "user-connection" => match text(d.action())
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("connect") => EventKind::ViewerConnect(viewer_connect(d, d)?),
            Some("disconnect") => EventKind::ViewerDisconnect(viewer_disconnect(d, d)?),
            Some(other) => return Err(format!("action {other:?} is not connect or disconnect")),
            None => return Err("user-connection without an action".to_owned()),
        },
        "stream-lifecycle" => match sub_type.as_deref() {
            Some("stream-buffer") => EventKind::StreamBuffer(stream_buffer(d, d)?),
            Some("stream-end") => EventKind::StreamEnd(stream_end(d, d)?),
            _ => EventKind::StreamUpdate(stream_update(d, d)?),
        },
        "stream-buffer" => EventKind::StreamBuffer(stream_buffer(d, d)?),
        "stream-end" => EventKind::StreamEnd(stream_end(d, d)?),
        "track-list" => EventKind::TrackList(track_list(d, d)?),
        "node-lifecycle" => EventKind::NodeUpdate(node_update(d, d, &Nested::default())?),
        "load-balancing" => EventKind::Routing(routing(d, d)?),
        "push-lifecycle" => match sub_type.as_deref() {
            Some("push_out_start") => signal(SignalKind::PushOutStart, d, d)?,
            _ => signal(SignalKind::PushEnd, d, d)?,
        },
        "recording-lifecycle" => signal(SignalKind::RecordingComplete, d, d)?,
        "client-lifecycle" => signal(SignalKind::ClientLifecycle, d, d)?,
        "stream-view" => signal(SignalKind::PlayRewrite, d, d)?,
        // A version 2 type under a `schema_version` of 1: read in its own format, as above.
        _ if PAYLOADS.iter().any(|(_, ty, _)| *ty == event_type) => {
            return version_2(parsed, event_type, record);
        }
        _ => unknown(event_type, record),
    })
}

/// The longest internal name accepted, in characters: the platform's `stream_analytics` (and
/// Keel's copy of it) keys streams by names of at most this many.
pub const MAX_STREAM_NAME: usize = 255;

/// Strips the `live+`/`vod+` prefix Mist puts on stream names.
pub fn internal_name(name: &str) -> &str {
    name.strip_prefix("live+")
        .or_else(|| name.strip_prefix("vod+"))
        .unwrap_or(name)
}

/// A stream's internal name (its prefix stripped), if it may be one: not empty, no NUL, at most
/// [`MAX_STREAM_NAME`] characters.
fn checked_name(name: &str) -> Result<&str, String> {
    let name = internal_name(name);
    if name.is_empty() {
        return Err("stream name is empty after its prefix".to_owned());
    }
    if name.contains('\0') {
        return Err("stream name holds a NUL character".to_owned());
    }
    if name.len() > MAX_STREAM_NAME && name.chars().count() > MAX_STREAM_NAME {
        return Err(format!(
            "stream name is longer than {MAX_STREAM_NAME} characters ({} characters)",
            name.chars().count()
        ));
    }
    Ok(name)
}

fn stream_ref(p: &Fields<'_>, d: &Fields<'_>) -> Result<StreamRef, String> {
    let name = first_text(&[
        p.internal_name(),
        p.stream_name(),
        d.internal_name(),
        d.stream_name(),
    ])
    .ok_or("no stream name (internal_name or stream_name)")?;
    let name = checked_name(&name)?;
    let stream_id = match first_text(&[p.stream_id(), d.stream_id()]) {
        None => None,
        Some(text) => Some(
            uuid_text::parse(&text).ok_or_else(|| format!("stream_id {text:?} is not a UUID"))?,
        ),
    };
    Ok(StreamRef {
        internal_name: Sym::new(name),
        stream_id,
    })
}

fn node(p: &Fields<'_>, d: &Fields<'_>) -> Sym {
    first_sym(&[p.node_id(), d.node_id()])
}

/// The first of several coordinate fields that has text, in degrees within `limit`; a refusal
/// names the field that was read.
fn coordinate(values: &[(&Option<Value<'_>>, &str)], limit: f64) -> Result<Option<f64>, String> {
    match values.iter().find(|(v, _)| text(v).is_some()) {
        Some((value, name)) => degrees(value, name, limit),
        None => Ok(None),
    }
}

fn latitude(values: &[(&Option<Value<'_>>, &str)]) -> Result<Option<f64>, String> {
    coordinate(values, 90.0)
}

fn longitude(values: &[(&Option<Value<'_>>, &str)]) -> Result<Option<f64>, String> {
    coordinate(values, 180.0)
}

fn first_uint(values: &[(&Option<Value<'_>>, &str)]) -> Result<Option<u64>, String> {
    for (value, name) in values {
        if let Some(n) = uint(value, name)? {
            return Ok(Some(n));
        }
    }
    Ok(None)
}

fn first_uint32(values: &[(&Option<Value<'_>>, &str)]) -> Result<Option<u32>, String> {
    for (value, name) in values {
        if let Some(n) = uint32(value, name)? {
            return Ok(Some(n));
        }
    }
    Ok(None)
}

/// A field as an interned name in lower case (empty when absent); text already in lower case,
/// as the platform writes it, is interned without a copy.
fn lowercase_sym(value: &Option<Value<'_>>) -> Sym {
    match text(value) {
        Some(t) if t.bytes().any(|b| b.is_ascii_uppercase()) => Sym::new(&t.to_ascii_lowercase()),
        Some(t) => Sym::new(&t),
        None => Sym::default(),
    }
}

/// A country code in upper case; empty when unknown, which the platform also writes as `--`
/// (the tables show both as `--`, so both must be one key).
fn country(values: &[&Option<Value<'_>>]) -> Sym {
    match first_text(values) {
        Some(code) if code == "--" => Sym::default(),
        Some(code) if code.bytes().any(|b| b.is_ascii_lowercase()) => {
            Sym::new(&code.to_ascii_uppercase())
        }
        Some(code) => Sym::new(&code),
        None => Sym::default(),
    }
}

fn ingest_start(p: &Fields<'_>, d: &Fields<'_>) -> Result<IngestStart, String> {
    Ok(IngestStart {
        stream: stream_ref(p, d)?,
        node: node(p, d),
        protocol: sym(p.protocol()),
        latitude: latitude(&[
            (p.publisher_latitude(), "publisher_latitude"),
            plain_latitude(p),
        ])?,
        longitude: longitude(&[
            (p.publisher_longitude(), "publisher_longitude"),
            plain_longitude(p),
        ])?,
    })
}

/// The fields `latitude` and `longitude` with their names, as [`coordinate`] takes them.
fn plain_latitude<'p, 'a>(p: &'p Fields<'a>) -> (&'p Option<Value<'a>>, &'static str) {
    (p.latitude(), "latitude")
}

fn plain_longitude<'p, 'a>(p: &'p Fields<'a>) -> (&'p Option<Value<'a>>, &'static str) {
    (p.longitude(), "longitude")
}

fn session_id(p: &Fields<'_>) -> Result<CompactString, String> {
    first_text(&[p.session_id()])
        .map(|s| CompactString::from(s.as_ref()))
        .ok_or_else(|| "viewer event without session_id".to_owned())
}

fn place(p: &Fields<'_>) -> Result<ViewerPlace, String> {
    Ok(ViewerPlace {
        host: first_text(&[p.host(), p.connection_addr()])
            .map(|h| CompactString::from(h.as_ref()))
            .unwrap_or_default(),
        connector: sym(p.connector()),
        country: country(&[p.client_country(), p.country_code()]),
        city: first_sym(&[p.client_city(), p.city()]),
        latitude: latitude(&[(p.client_latitude(), "client_latitude"), plain_latitude(p)])?,
        longitude: longitude(&[
            (p.client_longitude(), "client_longitude"),
            plain_longitude(p),
        ])?,
    })
}

fn viewer_connect(p: &Fields<'_>, d: &Fields<'_>) -> Result<ViewerConnect, String> {
    Ok(ViewerConnect {
        stream: stream_ref(p, d)?,
        node: node(p, d),
        session_id: session_id(p)?,
        place: place(p)?,
    })
}

fn viewer_disconnect(p: &Fields<'_>, d: &Fields<'_>) -> Result<ViewerDisconnect, String> {
    Ok(ViewerDisconnect {
        stream: stream_ref(p, d)?,
        node: node(p, d),
        session_id: session_id(p)?,
        place: place(p)?,
        duration_s: {
            let (seconds, field) = match uint(p.duration(), "duration")? {
                Some(seconds) => (Some(seconds), "duration"),
                None => (
                    uint(p.seconds_connected(), "seconds_connected")?,
                    "seconds_connected",
                ),
            };
            at_most(
                seconds,
                MAX_SESSION_SECONDS,
                field,
                "s, longer than a session may last (30 days)",
            )?
            .unwrap_or(0)
        },
        up_bytes: session_bytes(p.up_bytes(), "up_bytes")?,
        down_bytes: session_bytes(p.down_bytes(), "down_bytes")?,
    })
}

/// `n` when it is at most `max`; a refusal naming `field`, its value and `beyond` otherwise.
fn at_most(n: Option<u64>, max: u64, field: &str, beyond: &str) -> Result<Option<u64>, String> {
    match n {
        Some(n) if n > max => Err(format!("field \"{field}\": {n} {beyond}")),
        n => Ok(n),
    }
}

/// A session's byte count (0 when absent), at most [`MAX_SESSION_BYTES`].
fn session_bytes(value: &Option<Value<'_>>, field: &str) -> Result<u64, String> {
    let n = uint(value, field)?;
    Ok(at_most(
        n,
        MAX_SESSION_BYTES,
        field,
        "bytes, more than a session can carry (1 PiB)",
    )?
    .unwrap_or(0))
}

fn buffer_state(value: &Option<Value<'_>>) -> Result<Sym, String> {
    match text(value) {
        None => Ok(Sym::default()),
        Some(state) => {
            let upper = state.to_ascii_uppercase();
            match upper.as_str() {
                "FULL" | "EMPTY" | "DRY" | "RECOVER" => Ok(Sym::new(&upper)),
                _ => Err(format!(
                    "buffer_state {state:?} is not one of FULL, EMPTY, DRY, RECOVER"
                )),
            }
        }
    }
}

fn stream_update(p: &Fields<'_>, d: &Fields<'_>) -> Result<StreamUpdate, String> {
    Ok(StreamUpdate {
        stream: stream_ref(p, d)?,
        node: node(p, d),
        status: lowercase_sym(p.status()),
        buffer_state: buffer_state(p.buffer_state())?,
        uploaded_bytes: first_uint(&[
            (p.uploaded_bytes(), "uploaded_bytes"),
            (p.bandwidth_in(), "bandwidth_in"),
        ])?
        .unwrap_or(0),
        downloaded_bytes: first_uint(&[
            (p.downloaded_bytes(), "downloaded_bytes"),
            (p.bandwidth_out(), "bandwidth_out"),
        ])?
        .unwrap_or(0),
        viewers: first_uint32(&[
            (p.total_viewers(), "total_viewers"),
            (p.viewers(), "viewers"),
        ])?
        .unwrap_or(0),
        inputs: first_uint32(&[(p.total_inputs(), "total_inputs"), (p.inputs(), "inputs")])?
            .unwrap_or(0),
        has_issues: flag(p.has_issues(), "has_issues")?.unwrap_or(false),
        quality_tier: sym(p.quality_tier()),
        height: uint32(p.primary_height(), "primary_height")?.unwrap_or(0),
        fps: float(p.primary_fps(), "primary_fps")?
            .unwrap_or(0.0)
            .max(0.0),
        bitrate_bps: uint(p.primary_bitrate(), "primary_bitrate")?.unwrap_or(0),
        packets_sent: uint(p.packets_sent(), "packets_sent")?.unwrap_or(0),
        packets_lost: uint(p.packets_lost(), "packets_lost")?.unwrap_or(0),
        started_at: match int(p.started_at(), "started_at")?.filter(|&t| t > 0) {
            None => None,
            Some(t) if STARTED_AT.contains(&unix_time(t).0) => Some(unix_time(t).0),
            Some(t) => {
                return Err(format!(
                    "field \"started_at\": {t} is not a time between 2000 and 2100 (unix \
                     seconds or milliseconds)"
                ));
            }
        },
    })
}

fn stream_buffer(p: &Fields<'_>, d: &Fields<'_>) -> Result<StreamBuffer, String> {
    let state = buffer_state(p.buffer_state())?;
    if state.is_empty() {
        return Err("stream_buffer without buffer_state".to_owned());
    }
    Ok(StreamBuffer {
        stream: stream_ref(p, d)?,
        node: node(p, d),
        buffer_state: state,
        has_issues: flag(p.has_issues(), "has_issues")?.unwrap_or(false),
        quality_tier: sym(p.quality_tier()),
    })
}

fn stream_end(p: &Fields<'_>, d: &Fields<'_>) -> Result<StreamEnd, String> {
    Ok(StreamEnd {
        stream: stream_ref(p, d)?,
        node: node(p, d),
        downloaded_bytes: uint(p.downloaded_bytes(), "downloaded_bytes")?.unwrap_or(0),
        uploaded_bytes: uint(p.uploaded_bytes(), "uploaded_bytes")?.unwrap_or(0),
    })
}

fn track_list(p: &Fields<'_>, d: &Fields<'_>) -> Result<TrackList, String> {
    Ok(TrackList {
        stream: stream_ref(p, d)?,
        node: node(p, d),
        quality_tier: sym(p.quality_tier()),
        height: uint32(p.primary_height(), "primary_height")?.unwrap_or(0),
        tracks: first_uint32(&[
            (p.total_tracks(), "total_tracks"),
            (p.track_count(), "track_count"),
        ])?
        .unwrap_or(0),
    })
}

/// Reads a node's capability flags and roles: `{"ingest": true, ..., "roles": ["edge"]}`.
fn capabilities(text: Option<&str>) -> Result<Vec<Sym>, String> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    let bad = |e: json::JsonError| format!("field \"capabilities\": {e}");
    let mut json = Json::new(text);
    let mut found: Vec<Sym> = Vec::new();
    let mut long = None;
    let mut add = |name: &str| {
        if name.len() > MAX_FIELD_BYTES {
            long = Some(name.len());
            return;
        }
        // Compared as text before interning: only a new name counts towards the bound.
        let name = name.to_ascii_lowercase();
        if name.is_empty() || found.iter().any(|known| known.as_str() == name) {
            return;
        }
        if found.len() >= MAX_CAPABILITIES {
            long = Some(name.len());
            return;
        }
        found.push(Sym::new(&name));
    };
    json.object(|json, key| {
        let key = key.get();
        if key == "roles" {
            if json.peek() != Some(b'[') {
                return json.skip();
            }
            return json.array(|json| match json.scalar()? {
                Ok(Value::Str(role)) => {
                    add(&role.get());
                    Ok(())
                }
                _ => Ok(()),
            });
        }
        if let Ok(Value::Bool(true)) = json.scalar()? {
            add(&key);
        }
        Ok(())
    })
    .map_err(bad)?;
    if let Some(length) = long {
        return Err(if length > MAX_FIELD_BYTES {
            format!(
                "field \"capabilities\": a name {length} bytes long, more than the \
                 {MAX_FIELD_BYTES} a field Keel reads may hold"
            )
        } else {
            format!("field \"capabilities\": more than {MAX_CAPABILITIES} names")
        });
    }
    Ok(found)
}

/// Reads a node's stream map: `{"live+name": {"total": 4, "inputs": 1, ...}, ...}`.
fn node_streams(text: Option<&str>) -> Result<Vec<NodeStream>, String> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    let mut json = Json::new(text);
    let mut streams = Vec::new();
    json.object(|json, name| {
        let name = name.get();
        let field = |e: String| Reason(format!("field \"streams\" entry {name:?}: {e}"));
        if json.peek() != Some(b'{') {
            return Err(field("expected an object".to_owned()));
        }
        let mut f = Fields::default();
        TRAIL.with(|trail| {
            read_fields(
                json,
                trail.row(Shape::NodeStream),
                &mut f,
                &mut Nested::default(),
            )
        })?;
        // An entry whose name no stream may have is left out (that stream's own events are
        // refused for it too); the node's other figures stand.
        let Ok(checked) = checked_name(&name) else {
            return Ok(());
        };
        streams.push(NodeStream {
            name: Sym::new(checked),
            viewers: first_uint(&[(f.total(), "total"), (f.viewers(), "viewers")])
                .map_err(field)?
                .unwrap_or(0),
            inputs: uint(f.inputs(), "inputs").map_err(field)?.unwrap_or(0),
            bandwidth: uint(f.bandwidth(), "bandwidth")
                .map_err(field)?
                .unwrap_or(0),
            bytes_up: uint(f.bytes_up(), "bytes_up").map_err(field)?.unwrap_or(0),
            bytes_down: uint(f.bytes_down(), "bytes_down")
                .map_err(field)?
                .unwrap_or(0),
            replicated: flag(f.replicated(), "replicated")
                .map_err(field)?
                .unwrap_or(false),
        });
        Ok(())
    })
    .map_err(|e: Reason| {
        if e.0.starts_with("field") {
            e.0
        } else {
            format!("field \"streams\": {}", e.0)
        }
    })?;
    // In name order, which every process agrees on; of a name given twice (`live+a` and `a`,
    // or a repeated key), the later entry, as a JSON object's later member replaces an earlier
    // one. Each name's text is looked up once, not at each of the sort's comparisons: a node
    // reports every stream it carries, a hundred or more.
    streams.reverse();
    streams.sort_by_cached_key(|s| s.name.as_str());
    streams.dedup_by_key(|s| s.name);
    Ok(streams)
}

fn node_update(p: &Fields<'_>, d: &Fields<'_>, nested: &Nested<'_>) -> Result<NodeUpdate, String> {
    let node = node(p, d);
    if node.is_empty() {
        return Err("node update without node_id".to_owned());
    }
    let cpu_tenths =
        first_uint32(&[(p.cpu_tenths(), "cpu_tenths"), (p.cpu_usage(), "cpu_usage")])?.unwrap_or(0);
    if cpu_tenths > 1000 {
        return Err(format!("cpu_tenths {cpu_tenths} is above 1000 (100 %)"));
    }
    let mode = match text(p.operational_mode()) {
        Some(m) if m.to_ascii_uppercase().contains("DRAIN") => NodeMode::Draining,
        Some(m) if m.to_ascii_uppercase().contains("MAINT") => NodeMode::Maintenance,
        _ => NodeMode::Normal,
    };
    Ok(NodeUpdate {
        node,
        cpu_tenths,
        ram_current: uint(p.ram_current(), "ram_current")?.unwrap_or(0),
        ram_max: uint(p.ram_max(), "ram_max")?.unwrap_or(0),
        up_speed: uint(p.up_speed(), "up_speed")?.unwrap_or(0),
        down_speed: uint(p.down_speed(), "down_speed")?.unwrap_or(0),
        bw_limit: uint(p.bw_limit(), "bw_limit")?.unwrap_or(0),
        latitude: latitude(&[plain_latitude(p)])?,
        longitude: longitude(&[plain_longitude(p)])?,
        location: sym(p.location()),
        active_streams: first_uint32(&[
            (p.active_streams(), "active_streams"),
            (p.stream_count(), "stream_count"),
        ])?
        .unwrap_or(0),
        is_healthy: flag(p.is_healthy(), "is_healthy")?.unwrap_or(false),
        mode,
        base_url: sym(p.base_url()),
        capabilities: capabilities(nested.capabilities)?,
        streams: node_streams(nested.streams)?,
        connections: uint(p.connections_current(), "connections_current")?.unwrap_or(0),
    })
}

fn routing(p: &Fields<'_>, d: &Fields<'_>) -> Result<RoutingDecision, String> {
    let stream = if first_text(&[p.internal_name(), p.stream_name(), d.internal_name()]).is_some() {
        Some(stream_ref(p, d)?)
    } else {
        None
    };
    Ok(RoutingDecision {
        stream,
        selected_node: first_sym(&[p.selected_node_id(), p.selected_node()]),
        status: lowercase_sym(p.status()),
        score: uint(p.score(), "score")?,
        client_latitude: latitude(&[plain_latitude(p), (p.client_latitude(), "client_latitude")])?,
        client_longitude: longitude(&[
            plain_longitude(p),
            (p.client_longitude(), "client_longitude"),
        ])?,
        node_latitude: latitude(&[(p.node_latitude(), "node_latitude")])?,
        node_longitude: longitude(&[(p.node_longitude(), "node_longitude")])?,
        distance_km: match float(p.routing_distance_km(), "routing_distance_km")? {
            Some(km) if km > MAX_DISTANCE_KM => {
                // 1e308 in full is 309 digits.
                let shown = if km < 1e12 {
                    km.to_string()
                } else {
                    format!("{km:e}")
                };
                return Err(format!(
                    "field \"routing_distance_km\": {shown} is farther than any two places on \
                     Earth ({MAX_DISTANCE_KM} km)"
                ));
            }
            km => km.filter(|d| *d >= 0.0),
        },
        client_country: country(&[p.client_country()]),
    })
}

fn signal(kind: SignalKind, p: &Fields<'_>, d: &Fields<'_>) -> Result<EventKind, String> {
    Ok(EventKind::StreamSignal(StreamSignal {
        kind,
        stream: stream_ref(p, d)?,
        node: node(p, d),
    }))
}

#[cfg(test)]
mod tests;
