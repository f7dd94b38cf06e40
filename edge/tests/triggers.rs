//! Mist webhook bodies to triggers to records, for every trigger type the adapter reads, and
//! the validation rules of both versions (each record is checked by the engine's own decoder).

use std::collections::HashMap;

use keel_edge::envelope::{Caller, balancing_record, trigger_record, v1_record};
use keel_edge::mist::{Origin, answer, is_blocking, parse};
use keel_edge::proto::{BalancingEvent, Event, EventData, Payload, Timestamp};
use serde_json::Value;
use uuid::Uuid;

const TENANT: &str = "5eed517e-ba5e-da7a-517e-ba5eda7a0001";
const NOW: i64 = 1_793_000_000_000;

fn tenant() -> Uuid {
    Uuid::parse_str(TENANT).unwrap()
}

fn origin() -> Origin {
    Origin {
        node_id: "edge-ams-1".into(),
        received_ms: NOW,
        ..Origin::default()
    }
}

/// The record's JSON, after the engine's decoder accepted it.
fn record(trigger_type: &str, body: &str) -> Value {
    let trigger = parse(trigger_type, body.as_bytes(), &origin());
    let out = trigger_record(&trigger, Caller::Tenant(tenant()), NOW)
        .unwrap_or_else(|e| panic!("{trigger_type}: {e}"));
    serde_json::from_slice(&out.value).unwrap()
}

#[test]
fn every_trigger_type_parses_into_its_payload() {
    let connect = record(
        "USER_NEW",
        "live+demo\n203.0.113.9\n42\nHLS\nhttp://edge/hls/demo/index.m3u8\nsess-1",
    );
    assert_eq!(connect["event_type"], "viewer_connect");
    let c = &connect["data"]["viewer_connect"];
    assert_eq!(
        (c["stream_name"].as_str(), c["session_id"].as_str()),
        (Some("live+demo"), Some("sess-1"))
    );
    assert_eq!(c["host"], "203.0.113.9");
    assert_eq!(connect["data"]["blocking"], true);

    let end = record(
        "USER_END",
        "sess-1\nlive+demo\nHLS\n203.0.113.9\n61\n1200\n98000\ntag1,tag2\n",
    );
    let e = &end["data"]["viewer_disconnect"];
    assert_eq!(
        (e["duration"].as_str(), e["down_bytes"].as_str()),
        (Some("61"), Some("98000"))
    );
    assert_eq!(e["tags"], "tag1,tag2");

    let buffer = record(
        "STREAM_BUFFER",
        "live+demo\nDRY\n{\"issues\":\"HLSnoaudio!\"}",
    );
    let b = &buffer["data"]["stream_buffer"];
    assert_eq!(
        (b["buffer_state"].as_str(), b["has_issues"].as_bool()),
        (Some("DRY"), Some(true))
    );

    let stream_end = record("STREAM_END", "live+demo\n5000\n700\n12\n1\n3\n900");
    let s = &stream_end["data"]["stream_end"];
    assert_eq!(
        (s["total_viewers"].as_str(), s["viewer_seconds"].as_str()),
        (Some("12"), Some("900"))
    );

    let push = record(
        "PUSH_REWRITE",
        "rtmp://ingest.example/live/sk_secret\n198.51.100.4\nlive+demo",
    );
    let p = &push["data"]["push_rewrite"];
    assert_eq!(p["protocol"], "rtmp");
    assert!(
        !p["push_url"].as_str().unwrap().contains("sk_secret"),
        "stream keys are never kept"
    );

    let tracks = record(
        "LIVE_TRACK_LIST",
        "live+demo\n{\"video_H264_1\":{\"type\":\"video\",\"codec\":\"H264\",\"width\":1280,\"height\":720,\"fpks\":25000,\"bps\":250000},\"audio_AAC_2\":{\"type\":\"audio\",\"codec\":\"AAC\"}}",
    );
    let t = &tracks["data"]["track_list"];
    assert_eq!(
        (t["total_tracks"].as_i64(), t["video_track_count"].as_i64()),
        (Some(2), Some(1))
    );
    assert_eq!(
        (t["primary_width"].as_i64(), t["primary_fps"].as_f64()),
        (Some(1280), Some(25.0))
    );
    assert_eq!(t["primary_video_bitrate"], 2000);

    let recording = record(
        "RECORDING_END",
        "live+demo\n/rec/demo.mkv\nmkv\n123456\n60\n1792999940\n1793000000\n60000\n0\n60000\nCLEAN_EOF\nClean end",
    );
    let r = &recording["data"]["recording_complete"];
    assert_eq!(
        (r["bytes_written"].as_str(), r["exit_reason"].as_str()),
        (Some("123456"), Some("CLEAN_EOF"))
    );
}

#[test]
fn unreadable_bodies_are_kept_raw_with_the_reason() {
    for (kind, body, reason) in [
        (
            "USER_END",
            "sess\nlive+demo\nHLS\n1.2.3.4\nlong\n1\n2",
            "duration",
        ),
        ("USER_NEW", "live+demo\n1.2.3.4", "expected 6 lines"),
        ("STREAM_BUFFER", "live+demo\nSOGGY", "SOGGY"),
        ("LIVE_TRACK_LIST", "live+demo\n{not json", "track list"),
        ("CONN_OPEN", "whatever", "not one Keel parses"),
    ] {
        let raw = record(kind, body);
        assert_eq!(raw["event_type"], "raw_mist_webhook", "{kind}");
        let kept = &raw["data"]["raw_mist_webhook"];
        assert!(
            kept["parse_error"].as_str().unwrap().contains(reason),
            "{kind}: {kept}"
        );
        let payload = base64_decode(kept["payload_raw"].as_str().unwrap());
        assert_eq!(payload, body.as_bytes(), "{kind}: the body is kept whole");
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

#[test]
fn blocking_triggers_are_answered_as_mist_expects() {
    assert!(is_blocking("USER_NEW") && is_blocking("PUSH_REWRITE") && !is_blocking("USER_END"));
    assert_eq!(
        answer("USER_NEW", b"live+demo\n1.2.3.4\n1\nHLS\nu\ns"),
        "true"
    );
    assert_eq!(
        answer("PUSH_REWRITE", b"rtmp://x/live/k\nhost\nlive+demo\n"),
        "live+demo"
    );
    assert_eq!(answer("USER_END", b"x"), "");
}

#[test]
fn identity_is_stable_per_webhook_and_distinct_across_them() {
    let body = b"sess-1\nlive+demo\nHLS\n1.2.3.4\n5\n6\n7";
    let a = parse("USER_END", body, &origin());
    // The same webhook (same arrival, same nonce) is the same trigger…
    assert_eq!(a.request_id, parse("USER_END", body, &origin()).request_id);
    // …but the same body arriving again is a new one (a buffer can go EMPTY twice).
    let later = Origin {
        received_ms: NOW + 5000,
        ..origin()
    };
    assert_ne!(a.request_id, parse("USER_END", body, &later).request_id);
    let next = Origin {
        nonce: 1,
        ..origin()
    };
    assert_ne!(a.request_id, parse("USER_END", body, &next).request_id);
    let other_node = Origin {
        node_id: "edge-2".into(),
        ..origin()
    };
    assert_ne!(
        a.request_id,
        parse("USER_END", body, &other_node).request_id
    );
    // With Mist's trigger UUID, a re-delivery is the same trigger whenever it arrives.
    let with_uuid = Origin {
        trigger_uuid: "u-1".into(),
        trigger_unix_millis: 5,
        ..origin()
    };
    let redelivered = Origin {
        received_ms: NOW + 9000,
        nonce: 7,
        ..with_uuid.clone()
    };
    assert_eq!(
        parse("USER_END", body, &with_uuid).request_id,
        parse("USER_END", body, &redelivered).request_id
    );
}

#[test]
fn stream_keys_are_never_kept() {
    for url in [
        "rtmp://ingest.example/live/sk_secret",
        "srt://ingest.example:9000?streamid=sk_secret",
    ] {
        let push = record("PUSH_REWRITE", &format!("{url}\n198.51.100.4\nlive+demo"));
        let kept = push["data"]["push_rewrite"]["push_url"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(!kept.contains("sk_secret"), "{kept}");
    }
    // A push body that cannot be read is not kept raw either.
    let raw = record("PUSH_REWRITE", "rtmp://ingest.example/live/sk_secret");
    let text = raw.to_string();
    assert!(
        !text.contains("sk_secret") && text.contains("withheld"),
        "{text}"
    );
}

fn v1_batch(events: Vec<EventData>) -> Event {
    Event {
        batch_id: "9f0c7c1e-4f55-4c55-9b55-1d0f00000001".into(),
        source: "helmsman".into(),
        tenant_id: TENANT.into(),
        events,
        timestamp: Some(Timestamp {
            seconds: NOW / 1000,
            nanos: 0,
        }),
        ..Event::default()
    }
}

fn v1_event(kind: i32, data: &[(&str, &str)]) -> EventData {
    EventData {
        event_type: kind,
        region: "local".into(),
        data: data
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<HashMap<_, _>>(),
        ..EventData::default()
    }
}

#[test]
fn version_one_rules_refuse_with_reasons_and_ids_are_deterministic() {
    let batch = v1_batch(vec![
        v1_event(
            4,
            &[
                ("action", "connect"),
                ("stream_name", "live+demo"),
                ("session_id", "s"),
            ],
        ),
        v1_event(4, &[("action", "connect")]),
        v1_event(11, &[("internal_name", "demo"), ("buffer_state", "SOGGY")]),
        v1_event(99, &[]),
        v1_event(
            8,
            &[
                ("node_id", "edge-1"),
                ("is_healthy", "true"),
                ("cpu_usage", "300"),
            ],
        ),
    ]);
    let caller = Caller::Tenant(tenant());
    let first = v1_record(&batch, 0, caller, NOW).unwrap();
    let value: Value = serde_json::from_slice(&first.value).unwrap();
    assert_eq!(
        value["data"]["internal_name"], "demo",
        "stream_name back-fills internal_name"
    );
    assert_eq!(value["type"], "user-connection");
    assert_eq!(
        first.event_id,
        v1_record(&batch, 0, caller, NOW + 9).unwrap().event_id
    );
    assert!(
        v1_record(&batch, 1, caller, NOW)
            .unwrap_err()
            .contains("internal_name")
    );
    assert!(
        v1_record(&batch, 2, caller, NOW)
            .unwrap_err()
            .contains("SOGGY")
    );
    assert!(
        v1_record(&batch, 3, caller, NOW)
            .unwrap_err()
            .contains("99")
    );
    assert!(v1_record(&batch, 4, caller, NOW).is_ok());
    // A platform caller with a batch that names no tenant: refused (fail closed).
    let anonymous = Event {
        tenant_id: String::new(),
        ..batch
    };
    assert!(
        v1_record(&anonymous, 0, Caller::Platform, NOW)
            .unwrap_err()
            .contains("tenant")
    );
}

#[test]
fn routing_decisions_of_version_one_keep_no_client_address() {
    let event = BalancingEvent {
        stream_id: "live+demo".into(),
        selected_node: "edge-1".into(),
        tenant_id: TENANT.into(),
        status: "success".into(),
        client_ip: "203.0.113.50".into(),
        latitude: 52.1,
        longitude: 4.3,
        score: 2100,
        ..BalancingEvent::default()
    };
    let out = balancing_record(&event, Caller::Platform, NOW).unwrap();
    let text = String::from_utf8(out.value).unwrap();
    assert!(text.contains("\"internal_name\":\"demo\""), "{text}");
    assert!(!text.contains("203.0.113.50"), "{text}");
    let bad = BalancingEvent {
        status: "maybe".into(),
        ..event
    };
    assert!(
        balancing_record(&bad, Caller::Platform, NOW)
            .unwrap_err()
            .contains("maybe")
    );
}

#[test]
fn a_trigger_without_payload_or_with_a_wild_time_is_refused() {
    let mut trigger = parse(
        "USER_END",
        b"s\nlive+demo\nHLS\n1.2.3.4\n5\n6\n7",
        &origin(),
    );
    trigger.payload = None;
    assert!(
        trigger_record(&trigger, Caller::Tenant(tenant()), NOW)
            .unwrap_err()
            .contains("payload")
    );
    let mut future = parse(
        "USER_END",
        b"s\nlive+demo\nHLS\n1.2.3.4\n5\n6\n7",
        &origin(),
    );
    future.trigger_unix_millis = NOW + 3 * 3_600_000;
    assert!(
        trigger_record(&future, Caller::Tenant(tenant()), NOW)
            .unwrap_err()
            .contains("ahead")
    );
    assert!(matches!(
        parse(
            "USER_END",
            b"s\nlive+demo\nHLS\n1.2.3.4\n5\n6\n7",
            &origin()
        )
        .payload,
        Some(Payload::ViewerDisconnect(_))
    ));
}
