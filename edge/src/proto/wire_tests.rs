//! Every declared field of every message, encoded by prost, against bytes written by hand from
//! the protobuf encoding rules and the field numbers of `edge/proto/*.proto`.

use std::collections::HashMap;

use prost::Message;

use super::*;

/// Hand-built protobuf: each call appends one field.
#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn key(&mut self, field: u32, wire: u64) {
        self.varint((u64::from(field) << 3) | wire);
    }
    /// varint field (int32/int64 as two's complement, uint, bool, enum)
    fn v(mut self, field: u32, v: i64) -> Self {
        self.key(field, 0);
        self.varint(v as u64);
        self
    }
    fn s(self, field: u32, text: &str) -> Self {
        self.b(field, text.as_bytes())
    }
    fn b(mut self, field: u32, bytes: &[u8]) -> Self {
        self.key(field, 2);
        self.varint(bytes.len() as u64);
        self.0.extend_from_slice(bytes);
        self
    }
    fn m(self, field: u32, inner: W) -> Self {
        let bytes = inner.0;
        self.b(field, &bytes)
    }
    fn d(mut self, field: u32, v: f64) -> Self {
        self.key(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn f(mut self, field: u32, v: f32) -> Self {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

fn pin<M: Message + Default + PartialEq + std::fmt::Debug>(message: &M, W(want): W) {
    assert_eq!(message.encode_to_vec(), want, "{message:?}");
    assert_eq!(&M::decode(&want[..]).unwrap(), message);
}

#[test]
fn mist_trigger_envelope() {
    let trigger = MistTrigger {
        trigger_type: "USER_END".into(),
        node_id: "n".into(),
        timestamp: 7,
        blocking: true,
        request_id: "r".into(),
        tenant_id: Some("t".into()),
        user_id: Some("u".into()),
        stream_id: Some("s".into()),
        payload: Some(Payload::RawMistWebhook(RawMistWebhookTrigger {
            payload_raw: vec![1, 2],
            parse_error: "e".into(),
        })),
        cluster_id: Some("c".into()),
        origin_cluster_id: Some("o".into()),
        source_region: "eu".into(),
        stream_origin_region: "us".into(),
        schema_version: 2,
        correlation_id: "k".into(),
        causation_id: "q".into(),
        event_id: "i".into(),
        trigger_uuid: "g".into(),
        trigger_unix_millis: -1,
    };
    let want = W::default()
        .s(1, "USER_END")
        .s(3, "n")
        .v(4, 7)
        .v(5, 1)
        .s(6, "r")
        .s(7, "t")
        .s(8, "u")
        .s(9, "s")
        .m(40, W::default().b(1, &[1, 2]).s(2, "e"))
        .s(33, "c")
        .s(37, "o")
        .s(50, "eu")
        .s(52, "us")
        .v(54, 2)
        .s(55, "k")
        .s(56, "q")
        .s(57, "i")
        .s(58, "g")
        .v(59, -1);
    pin(&trigger, want);
}

#[test]
fn oneof_field_numbers() {
    let cases: Vec<(Payload, u32)> = vec![
        (
            Payload::PushRewrite(PushRewriteTrigger {
                push_url: "x".into(),
                ..Default::default()
            }),
            10,
        ),
        (
            Payload::ViewerConnect(ViewerConnectTrigger {
                host: "x".into(),
                ..Default::default()
            }),
            15,
        ),
        (
            Payload::ViewerDisconnect(ViewerDisconnectTrigger {
                host: "x".into(),
                ..Default::default()
            }),
            16,
        ),
        (
            Payload::StreamBuffer(StreamBufferTrigger {
                stream_name: "x".into(),
                ..Default::default()
            }),
            17,
        ),
        (
            Payload::StreamEnd(StreamEndTrigger {
                stream_name: "x".into(),
                ..Default::default()
            }),
            18,
        ),
        (
            Payload::TrackList(StreamTrackListTrigger {
                stream_name: "x".into(),
                ..Default::default()
            }),
            19,
        ),
        (
            Payload::RecordingComplete(RecordingCompleteTrigger {
                stream_name: "x".into(),
                ..Default::default()
            }),
            21,
        ),
        (
            Payload::StreamLifecycleUpdate(StreamLifecycleUpdate {
                node_id: "x".into(),
                ..Default::default()
            }),
            22,
        ),
        (
            Payload::NodeLifecycleUpdate(NodeLifecycleUpdate {
                node_id: "x".into(),
                ..Default::default()
            }),
            24,
        ),
        (
            Payload::LoadBalancingData(LoadBalancingData {
                selected_node: "x".into(),
                ..Default::default()
            }),
            25,
        ),
        (
            Payload::RawMistWebhook(RawMistWebhookTrigger {
                payload_raw: b"x".to_vec(),
                ..Default::default()
            }),
            40,
        ),
    ];
    for (payload, field) in cases {
        let inner_field = match &payload {
            Payload::ViewerConnect(_) | Payload::ViewerDisconnect(_) => {
                if matches!(payload, Payload::ViewerConnect(_)) {
                    2
                } else {
                    4
                }
            }
            _ => 1,
        };
        let trigger = MistTrigger {
            payload: Some(payload),
            ..Default::default()
        };
        pin(
            &trigger,
            W::default().m(field, W::default().s(inner_field, "x")),
        );
    }
}

#[test]
fn viewer_triggers() {
    let connect = ViewerConnectTrigger {
        stream_name: "a".into(),
        host: "b".into(),
        connector: "c".into(),
        request_url: "d".into(),
        session_id: "e".into(),
        node_id: Some(String::new()),
        client_country: "f".into(),
        client_city: "g".into(),
        client_latitude: 1.5,
        client_longitude: -2.5,
        stream_id: "h".into(),
    };
    pin(
        &connect,
        W::default()
            .s(1, "a")
            .s(2, "b")
            .s(4, "c")
            .s(5, "d")
            .s(6, "e")
            .s(7, "")
            .s(9, "f")
            .s(10, "g")
            .d(11, 1.5)
            .d(12, -2.5)
            .s(15, "h"),
    );
    let end = ViewerDisconnectTrigger {
        session_id: "a".into(),
        stream_name: "b".into(),
        connector: "c".into(),
        host: "d".into(),
        duration: 300,
        up_bytes: 1,
        down_bytes: 2,
        tags: "e".into(),
        node_id: "f".into(),
        country_code: "g".into(),
        city: "h".into(),
        latitude: 3.0,
        longitude: 4.0,
        seconds_connected: 5,
        stream_id: "i".into(),
    };
    pin(
        &end,
        W::default()
            .s(1, "a")
            .s(2, "b")
            .s(3, "c")
            .s(4, "d")
            .v(5, 300)
            .v(6, 1)
            .v(7, 2)
            .s(8, "e")
            .s(9, "f")
            .s(10, "g")
            .s(11, "h")
            .d(12, 3.0)
            .d(13, 4.0)
            .v(15, 5)
            .s(18, "i"),
    );
}

#[test]
fn stream_triggers() {
    let buffer = StreamBufferTrigger {
        stream_name: "a".into(),
        buffer_state: "FULL".into(),
        has_issues: true,
        issues_description: "b".into(),
        track_count: 2,
        quality_tier: "c".into(),
        stream_buffer_ms: 3,
        stream_jitter_ms: 4,
        mist_issues: "d".into(),
        max_keepaway_ms: 5,
        stream_id: "e".into(),
    };
    pin(
        &buffer,
        W::default()
            .s(1, "a")
            .s(2, "FULL")
            .v(5, 1)
            .s(6, "b")
            .v(7, 2)
            .s(8, "c")
            .v(9, 3)
            .v(10, 4)
            .s(11, "d")
            .v(12, 5)
            .s(13, "e"),
    );
    let end = StreamEndTrigger {
        stream_name: "a".into(),
        downloaded_bytes: 1,
        uploaded_bytes: 2,
        total_viewers: 3,
        total_inputs: 4,
        total_outputs: 5,
        viewer_seconds: 6,
        node_id: "b".into(),
        stream_id: "c".into(),
    };
    pin(
        &end,
        W::default()
            .s(1, "a")
            .v(2, 1)
            .v(3, 2)
            .v(4, 3)
            .v(5, 4)
            .v(6, 5)
            .v(7, 6)
            .s(8, "b")
            .s(9, "c"),
    );
    let tracks = StreamTrackListTrigger {
        stream_name: "a".into(),
        total_tracks: 1,
        video_track_count: 2,
        audio_track_count: 3,
        quality_tier: "b".into(),
        primary_width: 4,
        primary_height: 5,
        primary_fps: 6.0,
        primary_video_bitrate: 7,
        primary_video_codec: "c".into(),
        stream_id: "d".into(),
    };
    pin(
        &tracks,
        W::default()
            .s(1, "a")
            .v(3, 1)
            .v(4, 2)
            .v(5, 3)
            .s(6, "b")
            .v(7, 4)
            .v(8, 5)
            .d(9, 6.0)
            .v(10, 7)
            .s(11, "c")
            .s(16, "d"),
    );
    let push = PushRewriteTrigger {
        push_url: "a".into(),
        hostname: "b".into(),
        stream_name: "c".into(),
        protocol: "d".into(),
        encoder: "e".into(),
        node_id: "f".into(),
        latitude: 1.0,
        longitude: 2.0,
        location: "g".into(),
        stream_id: "h".into(),
    };
    pin(
        &push,
        W::default()
            .s(1, "a")
            .s(2, "b")
            .s(3, "c")
            .s(4, "d")
            .s(5, "e")
            .s(7, "f")
            .d(8, 1.0)
            .d(9, 2.0)
            .s(10, "g")
            .s(17, "h"),
    );
    let recording = RecordingCompleteTrigger {
        stream_name: "a".into(),
        file_path: "b".into(),
        output_protocol: "c".into(),
        bytes_written: 1,
        seconds_writing: 2,
        time_started: 3,
        time_ended: 4,
        media_duration_ms: 5,
        node_id: "d".into(),
        stream_id: "e".into(),
        exit_reason: "f".into(),
        human_exit_reason: "g".into(),
    };
    pin(
        &recording,
        W::default()
            .s(1, "a")
            .s(2, "b")
            .s(3, "c")
            .v(4, 1)
            .v(5, 2)
            .v(6, 3)
            .v(7, 4)
            .v(8, 5)
            .s(9, "d")
            .s(10, "e")
            .s(11, "f")
            .s(12, "g"),
    );
}

#[test]
fn poller_updates_and_decisions() {
    let stream = StreamLifecycleUpdate {
        node_id: "a".into(),
        tenant_id: "b".into(),
        internal_name: "c".into(),
        status: "d".into(),
        buffer_state: "e".into(),
        uploaded_bytes: 1,
        downloaded_bytes: 2,
        total_viewers: 3,
        total_inputs: 4,
        viewer_seconds: 5,
        timestamp: 6,
        has_issues: true,
        quality_tier: "f".into(),
        primary_width: 7,
        primary_height: 8,
        primary_fps: 9.5,
        primary_bitrate: 10,
        started_at: 11,
        packets_sent: 12,
        packets_lost: 13,
        packets_retransmitted: 14,
        stream_id: "g".into(),
    };
    pin(
        &stream,
        W::default()
            .s(1, "a")
            .s(2, "b")
            .s(3, "c")
            .s(4, "d")
            .s(5, "e")
            .v(6, 1)
            .v(7, 2)
            .v(8, 3)
            .v(9, 4)
            .v(10, 5)
            .v(12, 6)
            .v(14, 1)
            .s(17, "f")
            .v(18, 7)
            .v(19, 8)
            .f(20, 9.5)
            .v(22, 10)
            .v(23, 11)
            .v(24, 12)
            .v(25, 13)
            .v(27, 14)
            .s(38, "g"),
    );
    let node = NodeLifecycleUpdate {
        node_id: "a".into(),
        cpu_tenths: 1,
        ram_max: 2,
        ram_current: 3,
        up_speed: 4,
        down_speed: 5,
        bw_limit: 6,
        latitude: 7.0,
        longitude: 8.0,
        location: "b".into(),
        active_streams: 9,
        base_url: "c".into(),
        is_healthy: true,
        timestamp: 10,
        capabilities: Some(NodeCapabilities {
            ingest: true,
            edge: true,
            storage: true,
            processing: true,
            roles: vec!["r".into()],
        }),
        streams: HashMap::from([(
            "s".to_owned(),
            StreamData {
                total: 1,
                inputs: 2,
                bytes_up: 3,
                bytes_down: 4,
                bandwidth: 5,
                replicated: true,
            },
        )]),
        tenant_id: "d".into(),
        connections_current: 11,
        operational_mode: 2,
    };
    let capabilities = W::default().v(1, 1).v(2, 1).v(3, 1).v(4, 1).s(5, "r");
    let data = W::default().v(1, 1).v(2, 2).v(3, 3).v(4, 4).v(5, 5).v(6, 1);
    pin(
        &node,
        W::default()
            .s(1, "a")
            .v(2, 1)
            .v(3, 2)
            .v(4, 3)
            .v(9, 4)
            .v(10, 5)
            .v(11, 6)
            .d(12, 7.0)
            .d(13, 8.0)
            .s(14, "b")
            .v(15, 9)
            .s(16, "c")
            .v(17, 1)
            .v(19, 10)
            .m(20, capabilities)
            .m(23, W::default().s(1, "s").m(2, data))
            .s(26, "d")
            .v(29, 11)
            .v(43, 2),
    );
    let decision = LoadBalancingData {
        selected_node: "a".into(),
        latitude: 1.0,
        longitude: 2.0,
        status: "b".into(),
        details: "c".into(),
        score: 3,
        client_country: "d".into(),
        node_latitude: 4.0,
        node_longitude: 5.0,
        selected_node_id: "e".into(),
        routing_distance_km: 6.0,
        tenant_id: "f".into(),
        internal_name: "g".into(),
        stream_tenant_id: "h".into(),
        stream_id: "i".into(),
        candidates_count: 7,
        source: "j".into(),
    };
    pin(
        &decision,
        W::default()
            .s(1, "a")
            .d(2, 1.0)
            .d(3, 2.0)
            .s(4, "b")
            .s(5, "c")
            .v(6, 3)
            .s(8, "d")
            .d(9, 4.0)
            .d(10, 5.0)
            .s(12, "e")
            .d(13, 6.0)
            .s(14, "f")
            .s(15, "g")
            .s(18, "h")
            .s(21, "i")
            .v(22, 7)
            .s(24, "j"),
    );
}

#[test]
fn batch_answer() {
    let answer = SendEventsResponse {
        accepted: 3,
        rejected: vec![Rejection {
            index: 1,
            reason: "r".into(),
            retryable: true,
        }],
        duplicates: 2,
    };
    pin(
        &answer,
        W::default()
            .v(1, 3)
            .m(2, W::default().v(1, 1).s(2, "r").v(3, 1))
            .v(3, 2),
    );
    pin(&Empty {}, W::default());
}

#[test]
fn version_one_messages() {
    let time = Timestamp {
        seconds: 1,
        nanos: 2,
    };
    let stamp = || W::default().v(1, 1).v(2, 2);
    let event = EventData {
        event_id: "a".into(),
        event_type: 4,
        timestamp: Some(time),
        source: "b".into(),
        stream_id: Some("c".into()),
        user_id: Some("d".into()),
        playback_id: Some("e".into()),
        internal_name: Some("f".into()),
        region: "g".into(),
        node_url: Some("h".into()),
        data: HashMap::from([("k".to_owned(), "v".to_owned())]),
        schema_version: "1.0".into(),
    };
    let event_bytes = || {
        W::default()
            .s(1, "a")
            .v(2, 4)
            .m(3, stamp())
            .s(4, "b")
            .s(5, "c")
            .s(6, "d")
            .s(7, "e")
            .s(8, "f")
            .s(9, "g")
            .s(10, "h")
            .m(11, W::default().s(1, "k").s(2, "v"))
            .s(12, "1.0")
    };
    pin(&event, event_bytes());
    let batch = Event {
        batch_id: "a".into(),
        source: "b".into(),
        tenant_id: "c".into(),
        events: vec![event],
        metadata: HashMap::from([("m".to_owned(), "n".to_owned())]),
        timestamp: Some(time),
    };
    pin(
        &batch,
        W::default()
            .s(1, "a")
            .s(2, "b")
            .s(3, "c")
            .m(4, event_bytes())
            .m(5, W::default().s(1, "m").s(2, "n"))
            .m(6, stamp()),
    );
    pin(
        &EventResponse {
            status: "a".into(),
            message: "b".into(),
            processed_count: 3,
        },
        W::default().s(1, "a").s(2, "b").v(3, 3),
    );
    let balancing = BalancingEvent {
        event_id: "a".into(),
        stream_id: "b".into(),
        selected_node: "c".into(),
        tenant_id: "d".into(),
        latitude: 1.0,
        longitude: 2.0,
        status: "e".into(),
        details: "f".into(),
        timestamp: Some(time),
        source: "g".into(),
        region: "h".into(),
        score: 3,
        client_ip: "i".into(),
        client_country: "j".into(),
        schema_version: "k".into(),
    };
    pin(
        &balancing,
        W::default()
            .s(1, "a")
            .s(2, "b")
            .s(3, "c")
            .s(4, "d")
            .d(5, 1.0)
            .d(6, 2.0)
            .s(7, "e")
            .s(8, "f")
            .m(9, stamp())
            .s(10, "g")
            .s(11, "h")
            .v(12, 3)
            .s(13, "i")
            .s(14, "j")
            .s(15, "k"),
    );
    pin(&HealthRequest {}, W::default());
    pin(
        &HealthResponse {
            status: "a".into(),
            version: "b".into(),
            timestamp: Some(time),
        },
        W::default().s(1, "a").s(2, "b").m(3, stamp()),
    );
}

#[test]
fn protobuf_json_follows_the_platform_rules() {
    let trigger = MistTrigger {
        trigger_type: "USER_END".into(),
        timestamp: 1_724_350_000,
        payload: Some(Payload::ViewerDisconnect(ViewerDisconnectTrigger {
            down_bytes: 98_000,
            latitude: 0.0,
            ..Default::default()
        })),
        ..Default::default()
    };
    let json = serde_json::to_value(&trigger).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"trigger_type": "USER_END", "timestamp": "1724350000",
            "viewer_disconnect": {"down_bytes": "98000"}})
    );
    let node = NodeLifecycleUpdate {
        operational_mode: 3,
        ..Default::default()
    };
    assert_eq!(
        serde_json::to_value(&node).unwrap(),
        serde_json::json!({"operational_mode": "NODE_OPERATIONAL_MODE_MAINTENANCE"})
    );
}
