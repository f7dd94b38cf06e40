//! MistServer trigger webhooks as Mist sends them (the body's lines, in Mist's order) parsed
//! into [`MistTrigger`]s. Parsing never fails: a body that does not fit its trigger type, or a
//! trigger type Keel does not read, becomes a `raw_mist_webhook` trigger carrying the body and
//! the reason, so nothing a node reported is lost.
//!
//! ```
//! use keel_edge::mist::{Origin, parse};
//! use keel_edge::proto::Payload;
//!
//! let origin = Origin { node_id: "edge-1".into(), received_ms: 1_793_000_000_000, ..Origin::default() };
//! let body = b"sess-9\nlive+demo\nHLS\n203.0.113.7\n61\n1200\n98000\n";
//! let trigger = parse("USER_END", body, &origin);
//! let Some(Payload::ViewerDisconnect(end)) = &trigger.payload else { panic!() };
//! assert_eq!((end.duration, end.down_bytes), (61, 98000));
//! // The same body from the same node is the same trigger.
//! assert_eq!(trigger.request_id, parse("USER_END", body, &origin).request_id);
//! ```

use sha2::{Digest, Sha256};

use crate::proto::{
    MistTrigger, Payload, PushRewriteTrigger, RawMistWebhookTrigger, RecordingCompleteTrigger,
    StreamBufferTrigger, StreamEndTrigger, StreamTrackListTrigger, ViewerConnectTrigger,
    ViewerDisconnectTrigger,
};

/// What the adapter knows about a trigger besides its body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// The node that sent it (the adapter's own).
    pub node_id: String,
    /// Its tenant, when the adapter is configured with one.
    pub tenant_id: Option<String>,
    /// When the adapter received it, ms.
    pub received_ms: i64,
    /// Mist's `X-Trigger-UUID`, when sent.
    pub trigger_uuid: String,
    /// Mist's `X-Trigger-UnixMillis`, when sent.
    pub trigger_unix_millis: i64,
    /// Tells apart webhooks without Mist's trigger UUID that arrive in the same millisecond with
    /// the same body (the adapter counts from a random start).
    pub nonce: u64,
}

/// Triggers Mist waits on for an answer.
pub fn is_blocking(trigger_type: &str) -> bool {
    matches!(trigger_type, "USER_NEW" | "PUSH_REWRITE")
}

/// The answer Mist gets for a trigger it waits on: admit the viewer, keep the stream name.
pub fn answer(trigger_type: &str, body: &[u8]) -> String {
    match trigger_type {
        "USER_NEW" => "true".to_owned(),
        "PUSH_REWRITE" => lines(body)
            .get(2)
            .map(|s| (*s).to_owned())
            .unwrap_or_default(),
        _ => String::new(),
    }
}

fn lines(body: &[u8]) -> Vec<&str> {
    let text = std::str::from_utf8(body).unwrap_or("");
    let text = text.strip_suffix('\n').unwrap_or(text);
    text.split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect()
}

/// `hex(sha256(node ‖ 0 ‖ type ‖ 0 ‖ body ‖ 0 ‖ natural key))`: the trigger's identity. The
/// natural key is Mist's trigger UUID and time when Mist sends them (so a re-delivery of the same
/// webhook is the same trigger); without them it is the arrival time and the adapter's nonce, so
/// two genuine triggers with the same body (a stream's buffer going `EMPTY` twice) stay two
/// events. Once computed, the id travels in the log with the trigger: every resend of it is the
/// same event.
pub fn source_event_id(origin: &Origin, trigger_type: &str, body: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(origin.node_id.as_bytes());
    hash.update([0]);
    hash.update(trigger_type.as_bytes());
    hash.update([0]);
    hash.update(body);
    hash.update([0]);
    if origin.trigger_uuid.is_empty() {
        hash.update(format!("{}:{}", origin.received_ms, origin.nonce).as_bytes());
    } else {
        hash.update(origin.trigger_uuid.as_bytes());
        hash.update(origin.trigger_unix_millis.to_string().as_bytes());
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

struct Lines<'a> {
    lines: Vec<&'a str>,
}

impl<'a> Lines<'a> {
    fn need(&self, n: usize, names: &str) -> Result<(), String> {
        if self.lines.len() < n || self.lines[..n].iter().all(|l| l.is_empty()) {
            Err(format!(
                "expected {n} lines ({names}), got {}",
                self.lines.len()
            ))
        } else {
            Ok(())
        }
    }

    fn text(&self, i: usize) -> String {
        self.lines
            .get(i)
            .map(|s| (*s).to_owned())
            .unwrap_or_default()
    }

    fn int(&self, i: usize, name: &str) -> Result<i64, String> {
        match self.lines.get(i).map(|s| s.trim()) {
            None | Some("") => Ok(0),
            Some(text) => text
                .parse()
                .map_err(|_| format!("line {} ({name}) {text:?} is not an integer", i + 1)),
        }
    }
}

fn payload(trigger_type: &str, body: &[u8], node: &str) -> Result<Payload, String> {
    if std::str::from_utf8(body).is_err() {
        return Err("the body is not UTF-8".to_owned());
    }
    let l = Lines { lines: lines(body) };
    Ok(match trigger_type {
        "USER_NEW" => {
            l.need(6, "stream, address, connection, connector, URL, session")?;
            Payload::ViewerConnect(ViewerConnectTrigger {
                stream_name: l.text(0),
                host: l.text(1),
                connector: l.text(3),
                request_url: l.text(4),
                session_id: l.text(5),
                node_id: Some(node.to_owned()),
                ..ViewerConnectTrigger::default()
            })
        }
        "USER_END" => {
            l.need(7, "session, stream, connector, address, duration, up, down")?;
            let duration = l.int(4, "duration")?;
            Payload::ViewerDisconnect(ViewerDisconnectTrigger {
                session_id: l.text(0),
                stream_name: l.text(1),
                connector: l.text(2),
                host: l.text(3),
                duration,
                up_bytes: l.int(5, "uploaded bytes")?,
                down_bytes: l.int(6, "downloaded bytes")?,
                tags: l.text(7),
                node_id: node.to_owned(),
                seconds_connected: u64::try_from(duration).unwrap_or(0),
                ..ViewerDisconnectTrigger::default()
            })
        }
        "STREAM_BUFFER" => {
            l.need(2, "stream, buffer state")?;
            let state = l.text(1);
            if !matches!(state.as_str(), "FULL" | "EMPTY" | "DRY" | "RECOVER") {
                return Err(format!(
                    "buffer state {state:?} is not FULL, EMPTY, DRY or RECOVER"
                ));
            }
            let details: serde_json::Value =
                serde_json::from_str(l.lines.get(2).copied().unwrap_or("null")).unwrap_or_default();
            let issues = details
                .get("issues")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned();
            Payload::StreamBuffer(StreamBufferTrigger {
                stream_name: l.text(0),
                buffer_state: state,
                has_issues: !issues.is_empty(),
                mist_issues: issues,
                ..StreamBufferTrigger::default()
            })
        }
        "STREAM_END" => {
            l.need(1, "stream")?;
            Payload::StreamEnd(StreamEndTrigger {
                stream_name: l.text(0),
                downloaded_bytes: l.int(1, "downloaded bytes")?,
                uploaded_bytes: l.int(2, "uploaded bytes")?,
                total_viewers: l.int(3, "viewers")?,
                total_inputs: l.int(4, "inputs")?,
                total_outputs: l.int(5, "outputs")?,
                viewer_seconds: l.int(6, "viewer seconds")?,
                node_id: node.to_owned(),
                ..StreamEndTrigger::default()
            })
        }
        "PUSH_REWRITE" => {
            l.need(3, "push URL, host, stream")?;
            let url = l.text(0);
            Payload::PushRewrite(PushRewriteTrigger {
                protocol: url
                    .split_once("://")
                    .map(|(p, _)| p.to_owned())
                    .unwrap_or_default(),
                push_url: mask_key(&url),
                hostname: l.text(1),
                stream_name: l.text(2),
                node_id: node.to_owned(),
                ..PushRewriteTrigger::default()
            })
        }
        "LIVE_TRACK_LIST" => {
            l.need(1, "stream")?;
            Payload::TrackList(track_list(
                &l.text(0),
                l.lines.get(1).copied().unwrap_or(""),
            )?)
        }
        "RECORDING_END" => {
            l.need(
                8,
                "stream, path, protocol, bytes, seconds, start, end, duration",
            )?;
            Payload::RecordingComplete(RecordingCompleteTrigger {
                stream_name: l.text(0),
                file_path: l.text(1),
                output_protocol: l.text(2),
                bytes_written: l.int(3, "bytes written")?,
                seconds_writing: l.int(4, "seconds writing")?,
                time_started: l.int(5, "start time")?,
                time_ended: l.int(6, "end time")?,
                media_duration_ms: l.int(7, "media duration")?,
                exit_reason: l.text(10),
                human_exit_reason: l.text(11),
                node_id: node.to_owned(),
                ..RecordingCompleteTrigger::default()
            })
        }
        other => return Err(format!("trigger type {other:?} is not one Keel parses")),
    })
}

/// Replaces a stream key (the last path segment of a push URL, and any query string, where SRT
/// and others carry it) so it is never stored.
fn mask_key(url: &str) -> String {
    let (url, query) = match url.split_once('?') {
        Some((url, _)) => (url, "?***"),
        None => (url, ""),
    };
    match url.rsplit_once('/') {
        Some((base, key)) if !key.is_empty() && !base.ends_with('/') => {
            format!("{base}/***{query}")
        }
        _ => format!("{url}{query}"),
    }
}

fn track_list(stream: &str, json: &str) -> Result<StreamTrackListTrigger, String> {
    let tracks: serde_json::Map<String, serde_json::Value> = if json.trim().is_empty() {
        serde_json::Map::new()
    } else {
        serde_json::from_str(json)
            .map_err(|e| format!("the track list is not a JSON object: {e}"))?
    };
    let kind = |t: &serde_json::Value| t.get("type").and_then(|v| v.as_str()).map(str::to_owned);
    let number = |t: &serde_json::Value, k: &str| t.get(k).and_then(serde_json::Value::as_f64);
    let count = |k: &str| {
        tracks
            .values()
            .filter(|t| kind(t).as_deref() == Some(k))
            .count()
    };
    let primary = tracks
        .values()
        .filter(|t| kind(t).as_deref() == Some("video"))
        .max_by(|a, b| {
            let area = |t: &serde_json::Value| {
                number(t, "width").unwrap_or(0.0) * number(t, "height").unwrap_or(0.0)
            };
            area(a).total_cmp(&area(b))
        });
    let int = |v: Option<f64>| v.map_or(0, |v| v as i32);
    let total = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    Ok(StreamTrackListTrigger {
        stream_name: stream.to_owned(),
        total_tracks: total(tracks.len()),
        video_track_count: total(count("video")),
        audio_track_count: total(count("audio")),
        primary_width: int(primary.and_then(|t| number(t, "width"))),
        primary_height: int(primary.and_then(|t| number(t, "height"))),
        primary_fps: primary
            .and_then(|t| number(t, "fpks"))
            .map_or(0.0, |f| f / 1000.0),
        primary_video_bitrate: int(primary
            .and_then(|t| number(t, "bps"))
            .map(|b| b * 8.0 / 1000.0)),
        primary_video_codec: primary
            .and_then(|t| t.get("codec").and_then(|c| c.as_str()))
            .unwrap_or_default()
            .to_owned(),
        ..StreamTrackListTrigger::default()
    })
}

/// The trigger for one webhook; a body that cannot be read is kept raw with the reason.
pub fn parse(trigger_type: &str, body: &[u8], origin: &Origin) -> MistTrigger {
    let request_id = source_event_id(origin, trigger_type, body);
    let payload = payload(trigger_type, body, &origin.node_id).unwrap_or_else(|reason| {
        // A push URL may carry a stream key: such a body is never kept.
        let (payload_raw, parse_error) = if trigger_type == "PUSH_REWRITE" {
            (
                Vec::new(),
                format!("{reason} (body withheld: it may hold a stream key)"),
            )
        } else {
            (body.to_vec(), reason)
        };
        Payload::RawMistWebhook(RawMistWebhookTrigger {
            payload_raw,
            parse_error,
        })
    });
    MistTrigger {
        trigger_type: trigger_type.to_owned(),
        node_id: origin.node_id.clone(),
        timestamp: origin.received_ms,
        blocking: is_blocking(trigger_type),
        request_id,
        tenant_id: origin.tenant_id.clone(),
        payload: Some(payload),
        trigger_uuid: origin.trigger_uuid.clone(),
        trigger_unix_millis: origin.trigger_unix_millis,
        schema_version: 2,
        ..MistTrigger::default()
    }
}
