//! Signalman: decoded events as live messages for dashboards.
//!
//! Every event goes to one channel, by the platform's mapping: stream lifecycle, buffer, track
//! list, end, source and the push/play rewrites to `streams`; node updates and load-balancing
//! decisions to `system`; everything else to `analytics`. Before an event leaves the engine its
//! client address is blanked ([`redact`]), and an unknown event's raw record is dropped (it may
//! hold anything).
//!
//! [`message`] renders the platform's version-1 WebSocket message,
//! `{"type", "channel", "data", "timestamp", "tenant_id"}`, with the version-2 event type name.

use keel_operators::time::format_rfc3339;
use keel_sources::event::{Event, EventKind, SignalKind};
use serde_json::{Map, Value, json};

/// The channel of an event: `streams`, `system` or `analytics`.
pub fn channel(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::IngestStart(_)
        | EventKind::StreamUpdate(_)
        | EventKind::StreamBuffer(_)
        | EventKind::StreamEnd(_)
        | EventKind::TrackList(_) => "streams",
        EventKind::StreamSignal(s) => match s.kind {
            SignalKind::PlayRewrite | SignalKind::StreamSource => "streams",
            _ => "analytics",
        },
        EventKind::NodeUpdate(_) | EventKind::Routing(_) => "system",
        EventKind::ViewerConnect(_) | EventKind::ViewerDisconnect(_) | EventKind::Unknown(_) => {
            "analytics"
        }
    }
}

/// `event` with everything that must not leave the engine removed: client addresses, and the
/// raw record of an unknown event.
pub fn redact(mut event: Event) -> Event {
    match &mut event.kind {
        EventKind::ViewerConnect(e) => e.place.host.clear(),
        EventKind::ViewerDisconnect(e) => e.place.host.clear(),
        EventKind::Unknown(e) => e.json.clear(),
        _ => {}
    }
    event
}

/// The event's fields as a flat JSON object: the stream (`internal_name`, `stream_id`) and the
/// viewer's place are lifted to the top, the client address and raw records are left out.
pub fn data(event: &Event) -> Value {
    let inner = match serde_json::to_value(&event.kind) {
        Ok(Value::Object(mut tagged)) => tagged
            .values_mut()
            .next()
            .map(Value::take)
            .unwrap_or(Value::Null),
        _ => Value::Null,
    };
    let mut out = Map::new();
    out.insert("event_id".into(), json!(event.id.to_string()));
    if let Value::Object(fields) = inner {
        for (name, value) in fields {
            match (name.as_str(), value) {
                ("stream", Value::Object(stream)) | ("place", Value::Object(stream)) => {
                    for (name, value) in stream {
                        if name != "host" {
                            out.insert(name, value);
                        }
                    }
                }
                ("json", _) => {}
                (_, value) => {
                    out.insert(name, value);
                }
            }
        }
    }
    Value::Object(out)
}

/// The version-1 Signalman message for `event`.
pub fn message(event: &Event) -> Value {
    let type_name = match &event.kind {
        EventKind::Unknown(u) => u.event_type.as_str(),
        kind => kind.type_name(),
    };
    json!({
        "type": type_name,
        "channel": channel(&event.kind),
        "data": data(event),
        "timestamp": format_rfc3339(event.time),
        "tenant_id": event.tenant.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use compact_str::CompactString;
    use keel_operators::sym::Sym;
    use keel_sources::event::{NodeUpdate, StreamRef, ViewerConnect, ViewerPlace};
    use uuid::Uuid;

    fn connect() -> Event {
        Event {
            id: Uuid::from_u128(7),
            tenant: Uuid::from_u128(1),
            time: 1_700_000_000_000,
            kind: EventKind::ViewerConnect(ViewerConnect {
                stream: StreamRef {
                    internal_name: Sym::new("demo"),
                    stream_id: None,
                },
                node: Sym::new("edge-1"),
                session_id: CompactString::new("s1"),
                place: ViewerPlace {
                    host: CompactString::new("203.0.113.9"),
                    connector: Sym::new("HLS"),
                    country: Sym::new("NL"),
                    city: Sym::new("Amsterdam"),
                    latitude: Some(52.4),
                    longitude: None,
                },
            }),
        }
    }

    #[test]
    fn client_addresses_never_leave() {
        let message = message(&connect());
        assert!(!message.to_string().contains("203.0.113.9"), "{message}");
        let redacted = redact(connect());
        let EventKind::ViewerConnect(e) = &redacted.kind else {
            panic!("still a connect")
        };
        assert!(e.place.host.is_empty());
    }

    #[test]
    fn messages_follow_the_platform_shape() {
        let message = message(&connect());
        assert_eq!(message["type"], "viewer_connect");
        assert_eq!(message["channel"], "analytics");
        assert_eq!(message["timestamp"], "2023-11-14T22:13:20.000Z");
        assert_eq!(message["tenant_id"], Uuid::from_u128(1).to_string());
        assert_eq!(message["data"]["internal_name"], "demo");
        assert_eq!(message["data"]["country"], "NL");
        assert_eq!(message["data"]["session_id"], "s1");
        let node = Event {
            kind: EventKind::NodeUpdate(NodeUpdate::default()),
            ..connect()
        };
        assert_eq!(channel(&node.kind), "system");
    }
}
