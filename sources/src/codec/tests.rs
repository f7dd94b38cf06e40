use super::*;
use crate::record::{Headers, Position};
use proptest::prelude::*;

const TENANT: &str = "5eed517e-ba5e-da7a-517e-ba5eda7a0001";
const STREAM: &str = "5eedfeed-11fe-ca57-feed-11feca570001";

fn record(value: &str) -> Record<'_> {
    Record {
        position: Position::File {
            path: Sym::new("test.ndjson"),
            line: 7,
        },
        value: value.as_bytes(),
        headers: Headers::default(),
    }
}

fn ok(value: &str) -> Event {
    decode(&record(value)).unwrap_or_else(|e| panic!("{}: {}", e.reason, value))
}

fn err(value: &str) -> IngestError {
    decode(&record(value)).expect_err("the record should be refused")
}

fn v2(event_type: &str, data: &str) -> String {
    format!(
        r#"{{"event_id":"0b7d4a8e-5c1f-4e53-9a43-2f7e1d3c9b10","event_type":"{event_type}","timestamp":"2026-11-01T10:00:00.250Z","source":"foghorn","tenant_id":"{TENANT}","schema_version":2,"data":{data}}}"#
    )
}

fn v1(event_type: &str, data: &str) -> String {
    format!(
        r#"{{"id":"1c2d3e4f-0000-4000-8000-000000000001","type":"{event_type}","event_id":"1c2d3e4f-0000-4000-8000-000000000001","event_type":"{event_type}","timestamp":"2026-11-01T10:00:00Z","source":"helmsman","schema_version":"1.0","data":{data}}}"#
    )
}

#[test]
fn version_2_viewer_connect() {
    let event = ok(&v2(
        "viewer_connect",
        &format!(
            r#"{{"trigger_type":"USER_NEW","node_id":"edge-ams-1","timestamp":"1793527200","request_id":"r1","stream_id":"{STREAM}","tenant_id":"{TENANT}","viewer_connect":{{"stream_name":"live+demo_live_stream_001","host":"203.0.113.7","connector":"HLS","session_id":"3184512","client_country":"nl","client_city":"Amsterdam","client_latitude":52.37,"client_longitude":4.89,"stream_id":"{STREAM}"}}}}"#
        ),
    ));
    assert_eq!(event.tenant.to_string(), TENANT);
    assert_eq!(
        event.time, 1_793_527_200_250,
        "the RFC 3339 time has milliseconds"
    );
    let EventKind::ViewerConnect(c) = event.kind else {
        panic!("{:?}", event.kind)
    };
    assert_eq!(c.stream.internal_name.as_str(), "demo_live_stream_001");
    assert_eq!(c.stream.stream_id.unwrap().to_string(), STREAM);
    assert_eq!(c.node.as_str(), "edge-ams-1");
    assert_eq!(c.session_id, "3184512");
    assert_eq!(c.place.host, "203.0.113.7");
    assert_eq!(c.place.country.as_str(), "NL");
    assert_eq!(c.place.city.as_str(), "Amsterdam");
    assert_eq!(c.place.latitude, Some(52.37));
}

#[test]
fn version_2_disconnect_reads_int64_strings() {
    let event = ok(&v2(
        "viewer_disconnect",
        r#"{"trigger_type":"USER_END","node_id":"edge-ams-1","viewer_disconnect":{"session_id":"9","stream_name":"vod+clip","duration":"125","up_bytes":"1024","down_bytes":"1125899906842623","country_code":"DE"}}"#,
    ));
    let EventKind::ViewerDisconnect(d) = event.kind else {
        panic!()
    };
    assert_eq!(d.stream.internal_name.as_str(), "clip");
    assert_eq!(d.duration_s, 125);
    assert_eq!(d.down_bytes, 1_125_899_906_842_623);
    assert_eq!(d.place.country.as_str(), "DE");
}

#[test]
fn version_2_poller_updates() {
    let event = ok(&v2(
        "node_lifecycle_update",
        &format!(
            r#"{{"trigger_type":"NODE_LIFECYCLE_UPDATE","node_id":"edge-1","node_lifecycle_update":{{"node_id":"edge-1","cpu_tenths":455,"ram_max":"17179869184","ram_current":"4294967296","up_speed":"1250000","down_speed":"250000","bw_limit":"125000000","latitude":52.1,"longitude":4.4,"location":"Leiden","active_streams":3,"is_healthy":true,"operational_mode":"NODE_OPERATIONAL_MODE_DRAINING","tenant_id":"{TENANT}","capabilities":{{"ingest":true,"roles":["edge"]}},"streams":{{"demo":{{"total":"4"}}}}}}}}"#
        ),
    ));
    let EventKind::NodeUpdate(n) = event.kind else {
        panic!()
    };
    assert_eq!(n.cpu_tenths, 455);
    assert_eq!(n.ram_max, 17_179_869_184);
    assert_eq!(n.mode, NodeMode::Draining);
    assert!(n.is_healthy);
    assert_eq!(n.location.as_str(), "Leiden");
    assert_eq!(
        n.capabilities
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>(),
        ["ingest", "edge"]
    );
    assert_eq!(n.streams.len(), 1);
    assert_eq!(n.streams[0].name.as_str(), "demo");
    assert_eq!(n.streams[0].viewers, 4);

    let event = ok(&v2(
        "stream_lifecycle_update",
        r#"{"trigger_type":"STREAM_LIFECYCLE_UPDATE","stream_lifecycle_update":{"node_id":"edge-1","internal_name":"demo","status":"LIVE","buffer_state":"full","uploaded_bytes":"500","downloaded_bytes":"9007199254740993","total_viewers":4,"has_issues":true,"quality_tier":"1080p","primary_height":1080,"primary_fps":29.97,"primary_bitrate":"4500000","packets_sent":"100","packets_lost":"2","started_at":"1793526000"}}"#,
    ));
    let EventKind::StreamUpdate(u) = event.kind else {
        panic!()
    };
    assert_eq!(u.status.as_str(), "live");
    assert_eq!(u.buffer_state.as_str(), "FULL");
    assert_eq!(
        (u.uploaded_bytes, u.downloaded_bytes, u.viewers),
        (500, 9_007_199_254_740_993, 4),
        "no trip through f64"
    );
    assert_eq!(u.started_at, Some(1_793_526_000_000));
    assert_eq!(u.fps, 29.97);
}

#[test]
fn version_2_routing_and_unknown() {
    let event = ok(&v2(
        "load_balancing",
        r#"{"load_balancing_data":{"selected_node":"edge-2.example.net","selected_node_id":"edge-2","latitude":48.85,"longitude":2.35,"status":"SUCCESS","score":"2150","node_latitude":50.11,"node_longitude":8.68,"client_country":"FR","internal_name":"demo"}}"#,
    ));
    let EventKind::Routing(r) = event.kind else {
        panic!()
    };
    assert_eq!(r.selected_node.as_str(), "edge-2");
    assert_eq!(r.status.as_str(), "success");
    assert_eq!(r.score, Some(2150));
    let km = r.distance().unwrap();
    assert!(
        (km - 478.0).abs() < 5.0,
        "Paris to Frankfurt is about 478 km, got {km}"
    );

    let unknown = v2(
        "orchestrator_ai_outcome",
        r#"{"gateway_id":"g1","model":"x"}"#,
    );
    let event = ok(&unknown);
    assert_eq!(
        event.kind,
        EventKind::Unknown(UnknownEvent {
            event_type: Sym::new("orchestrator_ai_outcome"),
            json: unknown
        })
    );
}

#[test]
fn version_1_events_match_version_2() {
    let connect_v1 = ok(&v1(
        "user-connection",
        r#"{"action":"connect","internal_name":"demo","stream_name":"live+demo","session_id":"17","connection_addr":"198.51.100.4","connector":"HLS","node_id":"edge-1","tenant_id":"5eed517e-ba5e-da7a-517e-ba5eda7a0001","timestamp":"1793527200","country_code":"<nil>"}"#,
    ));
    let connect_v2 = ok(&v2(
        "viewer_connect",
        r#"{"node_id":"edge-1","viewer_connect":{"stream_name":"live+demo","host":"198.51.100.4","connector":"HLS","session_id":"17"}}"#,
    ));
    assert_eq!(connect_v1.kind, connect_v2.kind);

    let end = ok(&v1(
        "user-connection",
        &format!(
            r#"{{"action":"disconnect","internal_name":"demo","session_id":"17","connection_addr":"198.51.100.4","connector":"HLS","node_id":"edge-1","tenant_id":"{TENANT}","down_bytes":"1.048576e+06","up_bytes":"300","seconds_connected":"61"}}"#
        ),
    ));
    let EventKind::ViewerDisconnect(d) = end.kind else {
        panic!()
    };
    assert_eq!(
        (d.down_bytes, d.up_bytes, d.duration_s),
        (1_048_576, 300, 61)
    );

    let node = ok(&v1(
        "node-lifecycle",
        &format!(
            r#"{{"node_id":"edge-1","is_healthy":"true","cpu_usage":"250","ram_max":"1000","ram_current":"500","latitude":"52.1","longitude":"4.4","stream_count":"2","tenant_id":"{TENANT}"}}"#
        ),
    ));
    let EventKind::NodeUpdate(n) = node.kind else {
        panic!()
    };
    assert_eq!(
        (n.cpu_tenths, n.active_streams, n.is_healthy),
        (250, 2, true)
    );

    let buffer = ok(&v1(
        "stream-lifecycle",
        &format!(
            r#"{{"internal_name":"demo","event_type":"stream-buffer","buffer_state":"DRY","tenant_id":"{TENANT}"}}"#
        ),
    ));
    assert!(matches!(buffer.kind, EventKind::StreamBuffer(b) if b.buffer_state.as_str() == "DRY"));
}

#[test]
fn headers_fill_what_the_body_lacks() {
    let value = r#"{"event_type":"viewer_connect","timestamp":"2026-11-01T10:00:00Z","data":{"viewer_connect":{"stream_name":"demo","session_id":"1"}}}"#;
    let mut rec = record(value);
    assert_eq!(
        decode(&rec).unwrap_err().reason,
        "tenant_id missing (body, header and payload)"
    );
    rec.headers.tenant_id = Some(TENANT.into());
    rec.headers.event_id = Some("7f6c7a52-6a36-4e3b-9a4e-7d9b6c9b5a01".into());
    let event = decode(&rec).unwrap();
    assert_eq!(event.tenant.to_string(), TENANT);
    assert_eq!(event.id.to_string(), "7f6c7a52-6a36-4e3b-9a4e-7d9b6c9b5a01");

    // The body wins over a header.
    let other = "11111111-2222-4333-8444-555555555555";
    let with_body = value.replacen('{', &format!(r#"{{"tenant_id":"{other}","#), 1);
    let mut rec = record(&with_body);
    rec.headers.tenant_id = Some(TENANT.into());
    assert_eq!(decode(&rec).unwrap().tenant.to_string(), other);

    // The event type can come from a header.
    let no_type = value.replace(r#""event_type":"viewer_connect","#, "");
    let mut rec = record(&no_type);
    rec.headers.tenant_id = Some(TENANT.into());
    assert_eq!(
        decode(&rec).unwrap_err().reason,
        "event_type missing (body and header)"
    );
    rec.headers.event_type = Some("viewer_connect".into());
    assert!(matches!(
        decode(&rec).unwrap().kind,
        EventKind::ViewerConnect(_)
    ));
}

#[test]
fn tenants_fail_closed() {
    let with_tenant = |t: &str| {
        format!(
            r#"{{"event_type":"stream_end","timestamp":"2026-11-01T10:00:00Z","tenant_id":"{t}","data":{{"stream_end":{{"stream_name":"demo"}}}}}}"#
        )
    };
    assert_eq!(
        err(&with_tenant("acme")).reason,
        "tenant_id \"acme\" is not a UUID"
    );
    assert_eq!(
        err(&with_tenant("00000000-0000-0000-0000-000000000000")).reason,
        "tenant_id is the nil UUID"
    );
    let e = err(&with_tenant("acme"));
    assert_eq!(e.tenant_id.as_deref(), Some("acme"));
    assert_eq!(e.event_type.as_deref(), Some("stream_end"));
    assert_eq!(e.position.to_string(), "file:test.ndjson:7");
}

#[test]
fn event_time_prefers_the_more_precise_source() {
    let data = r#"{"trigger_unix_millis":"1793527200123","viewer_connect":{"stream_name":"demo","session_id":"1"}}"#;
    let whole_seconds = v2("viewer_connect", data).replace(".250Z", "Z");
    assert_eq!(ok(&whole_seconds).time, 1_793_527_200_123);
    let no_envelope_time = v2(
        "viewer_connect",
        r#"{"timestamp":"1793527201","viewer_connect":{"stream_name":"demo","session_id":"1"}}"#,
    )
    .replace(r#""timestamp":"2026-11-01T10:00:00.250Z","#, "");
    assert_eq!(ok(&no_envelope_time).time, 1_793_527_201_000);
    let bad = v2("stream_end", r#"{"stream_end":{"stream_name":"demo"}}"#)
        .replace("2026-11-01T10:00:00.250Z", "yesterday");
    assert_eq!(
        err(&bad).reason,
        "timestamp \"yesterday\" is not an RFC 3339 time"
    );
    let none = v2("stream_end", r#"{"stream_end":{"stream_name":"demo"}}"#)
        .replace(r#""timestamp":"2026-11-01T10:00:00.250Z","#, "");
    assert_eq!(err(&none).reason, "no event time (timestamp missing)");
}

#[test]
fn event_ids_are_stable() {
    let text = v2("stream_end", r#"{"stream_end":{"stream_name":"demo"}}"#)
        .replace(r#""event_id":"0b7d4a8e-5c1f-4e53-9a43-2f7e1d3c9b10","#, "");
    assert_eq!(ok(&text).id, ok(&text).id);
    assert_eq!(ok(&text).id, Uuid::new_v5(&KEEL_NAMESPACE, text.as_bytes()));
    let odd = text.replacen('{', r#"{"event_id":"evt-42","#, 1);
    assert_eq!(ok(&odd).id, Uuid::new_v5(&KEEL_NAMESPACE, b"evt-42"));
}

#[test]
fn refusals_name_the_problem() {
    let cases = [
        ("", "empty record"),
        ("[1,2]", "record is not a JSON object"),
        (
            r#"{"event_type":"viewer_connect""#,
            "invalid JSON at byte 30: expected ',' or '}' in an object",
        ),
        (
            &v2(
                "viewer_connect",
                r#"{"viewer_connect":{"stream_name":"demo"}}"#,
            ),
            "viewer event without session_id",
        ),
        (
            &v2("viewer_connect", r#"{"viewer_connect":{"session_id":"1"}}"#),
            "no stream name (internal_name or stream_name)",
        ),
        (
            &v2("viewer_connect", r#"{"stream_end":{"stream_name":"demo"}}"#),
            "event_type viewer_connect carries a \"stream_end\" payload instead of \"viewer_connect\"",
        ),
        (
            &v2("viewer_connect", r#"{"node_id":"x"}"#),
            "event_type viewer_connect without its \"viewer_connect\" payload in data",
        ),
        (
            &v2(
                "viewer_disconnect",
                r#"{"viewer_disconnect":{"stream_name":"d","session_id":"1","up_bytes":"-5"}}"#,
            ),
            "field \"up_bytes\": expected a non-negative integer, found \"-5\"",
        ),
        (
            &v2(
                "stream_end",
                r#"{"stream_end":{"stream_name":"d","stream_id":"nope"}}"#,
            ),
            "stream_id \"nope\" is not a UUID",
        ),
        (
            &v2(
                "stream_buffer",
                r#"{"stream_buffer":{"stream_name":"d","buffer_state":"SOGGY"}}"#,
            ),
            "buffer_state \"SOGGY\" is not one of FULL, EMPTY, DRY, RECOVER",
        ),
        (
            &v2(
                "node_lifecycle_update",
                r#"{"node_lifecycle_update":{"node_id":"n","cpu_tenths":1500}}"#,
            ),
            "cpu_tenths 1500 is above 1000 (100 %)",
        ),
        (
            &v2(
                "viewer_connect",
                r#"{"viewer_connect":{"stream_name":"d","session_id":"1","client_latitude":123}}"#,
            ),
            "field \"client_latitude\": 123 is outside ±90 degrees",
        ),
        (
            &v2(
                "viewer_connect",
                r#"{"viewer_connect":{"stream_name":"d","session_id":"1"},"stream_end":{}}"#,
            ),
            "data holds two payloads, \"viewer_connect\" and \"stream_end\"",
        ),
        (
            &v2("viewer_connect", r#""flat""#),
            "field \"data\": expected an object",
        ),
        // Scalars refused alike in the envelope and in a payload, naming what was found.
        (
            r#"{"event_type":"viewer_connect","timestamp":[1]}"#,
            "field \"timestamp\": expected a string, number or boolean, found an array",
        ),
        (
            &v2(
                "viewer_connect",
                r#"{"viewer_connect":{"stream_name":"d","session_id":{"n":1}}}"#,
            ),
            "field \"session_id\": expected a string, number or boolean, found an object",
        ),
        (
            &v1(
                "user-connection",
                r#"{"action":"wave","internal_name":"d","session_id":"1","tenant_id":"5eed517e-ba5e-da7a-517e-ba5eda7a0001"}"#,
            ),
            "action \"wave\" is not connect or disconnect",
        ),
    ];
    for (value, reason) in cases {
        assert_eq!(err(value).reason, reason, "{value}");
    }
    // Names are measured in characters, after their prefix.
    let named = |name: &str| {
        v2(
            "stream_end",
            &format!(r#"{{"stream_end":{{"stream_name":"live+{name}"}}}}"#),
        )
    };
    assert_eq!(
        err(&named(&"x".repeat(256))).reason,
        "stream name is longer than 255 characters (256 characters)"
    );
    assert_eq!(
        err(&named("a\\u0000b")).reason,
        "stream name holds a NUL character"
    );
    let longest = "é".repeat(255);
    match ok(&named(&longest)).kind {
        EventKind::StreamEnd(end) => assert_eq!(end.stream.internal_name.as_str(), longest),
        other => panic!("{other:?}"),
    }
}

#[test]
fn implausible_values_are_refused_with_their_field() {
    let disconnect = |fields: &str| {
        v2(
            "viewer_disconnect",
            &format!(r#"{{"viewer_disconnect":{{"stream_name":"d","session_id":"1",{fields}}}}}"#),
        )
    };
    let routing = |km: &str| {
        v2(
            "load_balancing",
            &format!(
                r#"{{"load_balancing_data":{{"selected_node_id":"e","status":"success","internal_name":"d","routing_distance_km":{km}}}}}"#
            ),
        )
    };
    let update = |started: &str| {
        v2(
            "stream_lifecycle_update",
            &format!(
                r#"{{"stream_lifecycle_update":{{"internal_name":"d","status":"live","started_at":"{started}"}}}}"#
            ),
        )
    };
    // At the bounds: accepted as given.
    let EventKind::ViewerDisconnect(d) = ok(&disconnect(&format!(
        r#""duration":"{MAX_SESSION_SECONDS}","down_bytes":"{MAX_SESSION_BYTES}","up_bytes":"{MAX_SESSION_BYTES}""#
    )))
    .kind
    else {
        panic!()
    };
    assert_eq!(
        (d.duration_s, d.down_bytes, d.up_bytes),
        (MAX_SESSION_SECONDS, MAX_SESSION_BYTES, MAX_SESSION_BYTES)
    );
    let EventKind::Routing(r) = ok(&routing("20040")).kind else {
        panic!()
    };
    assert_eq!(r.distance_km, Some(MAX_DISTANCE_KM));
    for started in ["946684800", "4102444799999"] {
        let EventKind::StreamUpdate(u) = ok(&update(started)).kind else {
            panic!()
        };
        assert!(u.started_at.is_some(), "{started}");
    }
    // Past them: refused, the field and its value named.
    let past = MAX_SESSION_BYTES + 1;
    let cases = [
        (
            disconnect(r#""duration":"99999999999""#),
            "field \"duration\": 99999999999 s, longer than a session may last (30 days)",
        ),
        (
            disconnect(r#""seconds_connected":"4294967295""#),
            "field \"seconds_connected\": 4294967295 s, longer than a session may last (30 days)",
        ),
        (
            disconnect(r#""down_bytes":"18446744073709551615""#),
            "field \"down_bytes\": 18446744073709551615 bytes, more than a session can carry (1 PiB)",
        ),
        (
            disconnect(&format!(r#""up_bytes":"{past}""#)),
            "field \"up_bytes\": 1125899906842625 bytes, more than a session can carry (1 PiB)",
        ),
        (
            routing("1e308"),
            "field \"routing_distance_km\": 1e308 is farther than any two places on Earth (20040 km)",
        ),
        (
            routing("20040.5"),
            "field \"routing_distance_km\": 20040.5 is farther than any two places on Earth (20040 km)",
        ),
        (
            update("1"),
            "field \"started_at\": 1 is not a time between 2000 and 2100 (unix seconds or milliseconds)",
        ),
        (
            update("99999999999999"),
            "field \"started_at\": 99999999999999 is not a time between 2000 and 2100 (unix seconds or milliseconds)",
        ),
    ];
    for (record, reason) in cases {
        assert_eq!(err(&record).reason, reason, "{record}");
    }
}

/// A string field longer than `MAX_FIELD_BYTES` refuses its record, naming the field: kept, it
/// would stay in memory for good. One of exactly that length is taken.
#[test]
fn overlong_fields_are_refused_by_name() {
    let connect = |city: &str| {
        v2(
            "viewer_connect",
            &format!(
                r#"{{"viewer_connect":{{"stream_name":"s","session_id":"1","client_city":"{city}"}}}}"#
            ),
        )
    };
    let most = "é".repeat(MAX_FIELD_BYTES / 2);
    match ok(&connect(&most)).kind {
        EventKind::ViewerConnect(c) => assert_eq!(c.place.city.as_str(), most),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err(&connect(&format!("{most}x"))).reason,
        format!(
            "field \"client_city\" is {} bytes long, more than the {MAX_FIELD_BYTES} a field Keel \
             reads may hold",
            MAX_FIELD_BYTES + 1
        )
    );
    // Measured unescaped: the same text is taken whether the producer escaped it or not.
    let escaped = "\\u00e9".repeat(MAX_FIELD_BYTES / 2);
    match ok(&connect(&escaped)).kind {
        EventKind::ViewerConnect(c) => assert_eq!(c.place.city.as_str(), most),
        other => panic!("{other:?}"),
    }
    let escaped = "\\u00e9".repeat(MAX_FIELD_BYTES / 2 + 1);
    let refused = err(&connect(&escaped)).reason;
    assert!(
        refused.starts_with("field \"client_city\" is 1026 bytes"),
        "{refused}"
    );
    // A number's text counts too: it is kept as text where a field is read as text.
    let digits = "1".repeat(MAX_FIELD_BYTES + 1);
    let numeric = v2(
        "viewer_connect",
        &format!(
            r#"{{"viewer_connect":{{"stream_name":"s","session_id":"1","client_city":{digits}}}}}"#
        ),
    );
    let refused = err(&numeric).reason;
    assert!(
        refused.starts_with("field \"client_city\" is 1025 bytes"),
        "{refused}"
    );
    // In the trigger envelope, version 1's flat map, and an unknown event type.
    let long = "x".repeat(MAX_FIELD_BYTES + 1);
    let node = v2(
        "stream_end",
        &format!(r#"{{"node_id":"{long}","stream_end":{{"stream_name":"s"}}}}"#),
    );
    assert!(
        err(&node)
            .reason
            .starts_with("field \"node_id\" is 1025 bytes long")
    );
    let flat = v1(
        "stream-end",
        &format!(r#"{{"stream_name":"s","node_id":"{long}"}}"#),
    );
    assert!(
        err(&flat)
            .reason
            .starts_with("field \"node_id\" is 1025 bytes long")
    );
    assert!(
        err(&v2(&long, "{}"))
            .reason
            .starts_with("field \"event_type\" is 1025 bytes long")
    );
    // An unknown type's fields are not read, so not refused: its record is kept whole.
    let unknown = v2("clip_created", &format!(r#"{{"node_id":"{long}"}}"#));
    assert!(matches!(ok(&unknown).kind, EventKind::Unknown(_)));
    // Names inside a node's object fields: capabilities, and its streams as stream names are.
    let nodes = |fields: &str| {
        v2(
            "node_lifecycle_update",
            &format!(r#"{{"node_lifecycle_update":{{"node_id":"n",{fields}}}}}"#),
        )
    };
    assert!(
        err(&nodes(&format!(r#""capabilities":{{"roles":["{long}"]}}"#)))
            .reason
            .starts_with("field \"capabilities\": a name 1025 bytes long")
    );
    // Only distinct names count: 256 of them, repeated and with an empty one, are taken.
    let roles: Vec<String> = (0..MAX_CAPABILITIES).map(|i| format!("\"r{i}\"")).collect();
    let twice = format!("{},{},\"\",\"R0\"", roles.join(","), roles.join(","));
    match ok(&nodes(&format!(r#""capabilities":{{"roles":[{twice}]}}"#))).kind {
        EventKind::NodeUpdate(node) => assert_eq!(node.capabilities.len(), MAX_CAPABILITIES),
        other => panic!("{other:?}"),
    }
    let roles: Vec<String> = (0..=MAX_CAPABILITIES)
        .map(|i| format!("\"r{i}\""))
        .collect();
    assert_eq!(
        err(&nodes(&format!(
            r#""capabilities":{{"roles":[{}]}}"#,
            roles.join(",")
        )))
        .reason,
        format!("field \"capabilities\": more than {MAX_CAPABILITIES} names")
    );
    // A stream entry whose name no stream may have is left out; the node's figures stand.
    let streams = format!(
        r#""cpu_tenths":250,"streams":{{"live+{}":{{"total":1}},"":{{"total":2}},"ok":{{"total":3}}}}"#,
        "y".repeat(256)
    );
    match ok(&nodes(&streams)).kind {
        EventKind::NodeUpdate(node) => {
            let names: Vec<&str> = node.streams.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, ["ok"]);
            assert_eq!(node.cpu_tenths, 250);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn error_rows_repeat_at_most_an_excerpt_of_a_huge_value() {
    let tenant = "x".repeat(1 << 20);
    let refused = err(&format!(
        r#"{{"event_id":"0b7d4a8e-5c1f-4e53-9a43-2f7e1d3c9b10","event_type":"viewer_connect","timestamp":"2026-11-01T10:00:00Z","tenant_id":"{tenant}","data":{{}}}}"#
    ));
    assert!(
        refused.reason.starts_with("tenant_id \"xxx"),
        "{}",
        &refused.reason[..40]
    );
    assert!(refused.reason.ends_with('…'));
    assert_eq!(refused.reason.len(), REASON_BYTES + '…'.len_utf8());
    let kept = refused.tenant_id.unwrap();
    assert_eq!(kept.len(), EXCERPT_BYTES + '…'.len_utf8());
    assert!(kept.starts_with("xxx"));
}

#[test]
fn the_unknown_country_is_one_key_however_written() {
    let country = |code: &str| {
        let EventKind::ViewerConnect(c) = ok(&v2(
            "viewer_connect",
            &format!(
                r#"{{"viewer_connect":{{"stream_name":"d","session_id":"1","client_country":"{code}"}}}}"#
            ),
        ))
        .kind
        else {
            panic!()
        };
        c.place.country
    };
    assert!(country("--").is_empty());
    assert!(country("").is_empty());
    assert!(country("<nil>").is_empty());
    assert_eq!(country("de").as_str(), "DE");
}

#[test]
fn event_times_outside_the_bounds_are_refused() {
    let now = 1_793_527_200_000;
    let bounds = TimeBounds::default();
    let at = |t: &str| {
        v2("stream_end", r#"{"stream_end":{"stream_name":"demo"}}"#)
            .replace("2026-11-01T10:00:00.250Z", t)
    };
    let text = at("2026-11-01T10:30:00Z");
    assert!(decode_checked(&record(&text), &bounds, now).is_ok());
    let text = at("2026-11-01T12:00:00Z");
    assert_eq!(
        decode_checked(&record(&text), &bounds, now)
            .unwrap_err()
            .reason,
        "event time 2026-11-01T12:00:00.000Z is more than 3600 s ahead of this machine's clock"
    );
    let text = at("1970-01-01T00:00:01Z");
    assert_eq!(
        decode_checked(&record(&text), &bounds, now)
            .unwrap_err()
            .reason,
        "event time 1970-01-01T00:00:01.000Z is before 2000-01-01T00:00:00.000Z"
    );
}

proptest! {
    /// Whatever the bytes, decoding returns an event or an error row: it never panics, and an
    /// error row always says something.
    #[test]
    fn never_panics_on_garbage(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let rec = Record { position: Position::Simulated { seq: 1 }, value: &bytes, headers: Headers::default() };
        if let Err(e) = decode(&rec) {
            prop_assert!(!e.reason.is_empty());
        }
    }

    /// Damaging a valid record anywhere yields an event or a reasoned error, never a panic.
    #[test]
    fn never_panics_on_damaged_records(at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<bool>()) {
        let good = v2("viewer_disconnect", r#"{"node_id":"e","viewer_disconnect":{"session_id":"9","stream_name":"live+x","duration":"5","up_bytes":"1","down_bytes":"2","client_latitude":1.5}}"#);
        let mut bytes = good.into_bytes();
        let i = at.index(bytes.len());
        if cut { bytes.truncate(i) } else { bytes[i] = byte }
        let rec = Record { position: Position::Simulated { seq: 1 }, value: &bytes, headers: Headers::default() };
        if let Err(e) = decode(&rec) {
            prop_assert!(!e.reason.is_empty());
        }
    }

    /// What a record decodes to does not depend on the key orders this thread learnt from the
    /// records before it: a damaged record gives the same event or error on a new thread, whose
    /// trail is empty, as after the good record taught this thread its keys.
    #[test]
    fn decoding_does_not_depend_on_the_records_before(at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<bool>()) {
        let good = v2("viewer_disconnect", r#"{"node_id":"e","viewer_disconnect":{"session_id":"9","stream_name":"live+x","duration":"5","up_bytes":"1","down_bytes":"2","client_latitude":1.5}}"#);
        let mut bytes = good.clone().into_bytes();
        let i = at.index(bytes.len());
        if cut { bytes.truncate(i) } else { bytes[i] = byte }
        let rec = Record { position: Position::Simulated { seq: 1 }, value: &bytes, headers: Headers::default() };
        prop_assert!(decode(&record(&good)).is_ok());
        let warm = decode(&rec);
        let cold = std::thread::scope(|scope| scope.spawn(|| decode(&rec)).join().expect("decode never panics"));
        prop_assert_eq!(warm, cold);
    }

    /// A record is refused as not UTF-8 exactly when it is not, with the offset of its first
    /// bad byte, wherever the bad bytes sit (the fast check works in blocks of 64 bytes).
    #[test]
    fn refused_as_not_utf8_exactly_when_it_is_not(
        at in any::<prop::sample::Index>(),
        bad in prop::collection::vec(0x80u8..=0xff, 1..4),
        pad in 0usize..130,
    ) {
        let good = v2("viewer_connect", &format!(
            r#"{{"node_id":"e","viewer_connect":{{"session_id":"9","stream_name":"live+x","client_city":"{}é"}}}}"#,
            "a".repeat(pad)
        ));
        let mut bytes = good.into_bytes();
        let i = at.index(bytes.len());
        bytes.splice(i..i, bad);
        let rec = Record { position: Position::Simulated { seq: 1 }, value: &bytes, headers: Headers::default() };
        let expected = std::str::from_utf8(&bytes)
            .err()
            .map(|e| format!("record is not valid UTF-8 (at byte {})", e.valid_up_to()));
        let refused = decode(&rec).err().map(|e| e.reason).filter(|r| r.contains("UTF-8"));
        prop_assert_eq!(refused, expected);
    }
}

#[test]
fn records_that_are_not_utf8_are_refused_with_the_offset() {
    let mut bytes = v2("viewer_connect", r#"{"node_id":"e"}"#).into_bytes();
    bytes[10] = 0xff;
    let rec = Record {
        position: Position::Simulated { seq: 1 },
        value: &bytes,
        headers: Headers::default(),
    };
    assert_eq!(
        decode(&rec).unwrap_err().reason,
        "record is not valid UTF-8 (at byte 10)"
    );
}

#[test]
fn node_stream_map_entries() {
    let event = ok(&v2(
        "node_lifecycle_update",
        r#"{"node_lifecycle_update":{"node_id":"e","connections_current":"12","capabilities":{"edge":true,"ingest":false,"roles":["Edge","transcode",7]},"streams":{"live+b":{"total":"3","inputs":0,"bandwidth":"200000","bytes_up":"9","bytes_down":"8","replicated":true},"vod+a":{"viewers":2,"inputs":1}}}}"#,
    ));
    let EventKind::NodeUpdate(n) = event.kind else {
        panic!("{event:?}")
    };
    assert_eq!(n.connections, 12);
    assert_eq!(
        n.capabilities
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>(),
        ["edge", "transcode"]
    );
    let a = NodeStream {
        name: Sym::new("a"),
        viewers: 2,
        inputs: 1,
        ..NodeStream::default()
    };
    let b = NodeStream {
        name: Sym::new("b"),
        viewers: 3,
        inputs: 0,
        bandwidth: 200_000,
        bytes_up: 9,
        bytes_down: 8,
        replicated: true,
    };
    assert_eq!(n.streams, vec![a, b]);
}

#[test]
fn a_stream_named_twice_keeps_its_later_entry() {
    let event = ok(&v2(
        "node_lifecycle_update",
        r#"{"node_lifecycle_update":{"node_id":"e","streams":{"live+c":{"total":1},"b":{"total":5},"c":{"total":2},"a":{"total":7},"vod+c":{"total":3},"b":{"total":6}}}}"#,
    ));
    let EventKind::NodeUpdate(n) = event.kind else {
        panic!("{event:?}")
    };
    let entries: Vec<_> = n
        .streams
        .iter()
        .map(|s| (s.name.as_str(), s.viewers))
        .collect();
    assert_eq!(entries, [("a", 7), ("b", 6), ("c", 3)]);
}

#[test]
fn bad_node_stream_maps_are_refused_with_the_entry() {
    let error = err(&v2(
        "node_lifecycle_update",
        r#"{"node_lifecycle_update":{"node_id":"e","streams":{"x":{"total":"many"}}}}"#,
    ));
    assert!(
        error.reason.contains("streams") && error.reason.contains("\"x\""),
        "{}",
        error.reason
    );
    let error = err(&v2(
        "node_lifecycle_update",
        r#"{"node_lifecycle_update":{"node_id":"e","streams":{"x":5}}}"#,
    ));
    assert!(
        error.reason.contains("expected an object"),
        "{}",
        error.reason
    );
    // A stream map that is not an object is ignored, like any field of the wrong shape.
    let event = ok(&v2(
        "node_lifecycle_update",
        r#"{"node_lifecycle_update":{"node_id":"e","streams":[1,2],"capabilities":"edge"}}"#,
    ));
    let EventKind::NodeUpdate(n) = event.kind else {
        panic!("{event:?}")
    };
    assert!(n.streams.is_empty() && n.capabilities.is_empty());
}

/// A record whose `schema_version` names the other version than its event type is read in its
/// type's own format (it was counted as an unknown type, and its event lost from the tables).
#[test]
fn a_type_is_read_in_its_own_format_whatever_the_schema_version() {
    let connect_v1_data = &format!(
        r#"{{"action":"connect","internal_name":"demo","session_id":"17","connection_addr":"198.51.100.4","connector":"HLS","node_id":"edge-1","tenant_id":"{TENANT}"}}"#
    );
    let under_2 = ok(&v2("user-connection", connect_v1_data));
    let proper = ok(&v1("user-connection", connect_v1_data));
    assert!(
        matches!(under_2.kind, EventKind::ViewerConnect(_)),
        "{under_2:?}"
    );
    assert_eq!(under_2.kind, proper.kind);

    let connect_v2_data = &format!(
        r#"{{"node_id":"edge-1","tenant_id":"{TENANT}","viewer_connect":{{"stream_name":"live+demo","host":"198.51.100.4","connector":"HLS","session_id":"17"}}}}"#
    );
    let under_1 = ok(&v1("viewer_connect", connect_v2_data));
    assert_eq!(
        under_1.kind,
        ok(&v2("viewer_connect", connect_v2_data)).kind
    );

    // Every version 1 type has a format under either version: none reads as unknown.
    for event_type in VERSION_1_TYPES {
        let data = format!(r#"{{"internal_name":"demo","tenant_id":"{TENANT}"}}"#);
        for value in [v1(event_type, &data), v2(event_type, &data)] {
            let kind = decode(&record(&value)).map(|event| event.kind);
            assert!(
                !matches!(kind, Ok(EventKind::Unknown(_))),
                "{event_type} read as an unknown type: {value}"
            );
        }
    }
    // A type neither version knows is still kept as unknown.
    assert!(matches!(
        ok(&v2("clip_lifecycle", "{}")).kind,
        EventKind::Unknown(_)
    ));
}

/// `known_type` names the types the decoder reads (see above for version 1's), and no other.
#[test]
fn known_types_are_the_ones_read() {
    for ty in VERSION_1_TYPES {
        assert!(known_type(ty));
    }
    for (_, ty, _) in PAYLOADS {
        assert!(known_type(ty));
    }
    assert!(!known_type("made-up-type"));
    let data = format!(r#"{{"tenant_id":"{TENANT}"}}"#);
    let decoded = decode(&record(&v1("made-up-type", &data)));
    assert!(matches!(
        decoded,
        Ok(Event {
            kind: EventKind::Unknown(_),
            ..
        })
    ));
}
