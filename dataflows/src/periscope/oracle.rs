//! Oracle tests: the incremental states against a from-scratch reference, at every epoch.
//!
//! Random events (few tenants, streams, nodes and sessions, so collisions, ties and duplicates
//! are common) are shuffled, split into random epochs and fed to the states; after every close
//! the accumulated upserts and deletes must equal a plain recomputation over the events seen so
//! far. The reference below is written for clarity, not speed: brute-force peaks and overlaps.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use compact_str::CompactString;
use keel_operators::latest::Latest;
use keel_operators::maintain::EpochState;
use keel_operators::sym::Sym;
use keel_operators::sympair::SymPair;
use keel_operators::table::{Change, Row, TableSink};
use keel_operators::time::{HOUR, SECOND, window_start};
use keel_sources::codec::KEEL_NAMESPACE;
use keel_sources::event::*;
use proptest::prelude::*;
use serde_json::Value;
use uuid::Uuid;

use super::held::{HeldSessions, SessionStore};
use super::rows::*;
use super::sessions::{ClientDetails, Ending, viewer_identity};
use super::streams::SESSION_LIMIT;
use super::streams::{WINDOW, micro};
use super::{RoutingState, StreamsState, UnknownState, node_row};
use keel_operators::table::HeldTable;
use std::sync::Arc;

const BASE: i64 = 1_793_527_200_000;

type Tables = BTreeMap<&'static str, BTreeMap<String, Value>>;

/// Applies changes to plain maps of JSON rows.
#[derive(Default)]
struct Store(Tables);

impl TableSink for Store {
    fn apply<R: Row>(&mut self, table: &'static str, change: Change<R>) {
        let key = serde_json::to_string(&change.key()).unwrap();
        let rows = self.0.entry(table).or_default();
        match change {
            Change::Upsert(row) => {
                rows.insert(key, serde_json::to_value(row).unwrap());
            }
            Change::Delete(_) => {
                assert!(
                    rows.remove(&key).is_some(),
                    "deleted a row that was never there: {table} {key}"
                );
            }
        }
        if rows.is_empty() {
            self.0.remove(table);
        }
    }
}

fn put<R: Row>(tables: &mut Tables, table: &'static str, row: R) {
    let key = serde_json::to_string(&row.key()).unwrap();
    tables
        .entry(table)
        .or_default()
        .insert(key, serde_json::to_value(row).unwrap());
}

fn tenant(i: u8) -> Uuid {
    Uuid::from_u128(0x5eed_0000_0000_4000_8000_0000_0000_0000 + u128::from(i))
}

/// A compact random event description.
#[derive(Clone, Debug)]
enum Spec {
    Connect {
        stream: u8,
        node: u8,
        session: u8,
        host: u8,
        country: u8,
    },
    Disconnect {
        stream: u8,
        node: u8,
        session: u8,
        host: u8,
        country: u8,
        duration: u64,
        bytes: u64,
    },
    Start {
        stream: u8,
        node: u8,
    },
    Update {
        stream: u8,
        status: u8,
        bitrate: u64,
        fps: u8,
        buffer: u8,
        issues: bool,
        sent: u64,
        lost: u64,
        tier: u8,
    },
    Buffer {
        stream: u8,
        buffer: u8,
        issues: bool,
    },
    End {
        stream: u8,
        bytes: u64,
    },
    Tracks {
        stream: u8,
        tier: u8,
    },
    Node {
        node: u8,
        cpu: u32,
    },
    Route {
        ok: bool,
        score: u64,
        km: u16,
    },
    Unknown {
        kind: u8,
    },
}

fn arb_spec() -> impl Strategy<Value = Spec> {
    let s = 0u8..3;
    let n = 0u8..2;
    prop_oneof![
        4 => (s.clone(), n.clone(), 0u8..5, 0u8..3, 0u8..3).prop_map(|(stream, node, session, host, country)| Spec::Connect { stream, node, session, host, country }),
        4 => (s.clone(), n.clone(), 0u8..5, 0u8..3, 0u8..3, 0u64..900, 0u64..5000).prop_map(|(stream, node, session, host, country, duration, bytes)| Spec::Disconnect { stream, node, session, host, country, duration, bytes }),
        1 => (s.clone(), n.clone()).prop_map(|(stream, node)| Spec::Start { stream, node }),
        2 => (s.clone(), 0u8..3, 0u64..3, 0u8..3, 0u8..4, any::<bool>(), 0u64..100, 0u64..10, 0u8..3).prop_map(|(stream, status, bitrate, fps, buffer, issues, sent, lost, tier)| Spec::Update { stream, status, bitrate, fps, buffer, issues, sent, lost, tier }),
        1 => (s.clone(), 0u8..4, any::<bool>()).prop_map(|(stream, buffer, issues)| Spec::Buffer { stream, buffer, issues }),
        1 => (s.clone(), 0u64..1000).prop_map(|(stream, bytes)| Spec::End { stream, bytes }),
        1 => (s, 0u8..3).prop_map(|(stream, tier)| Spec::Tracks { stream, tier }),
        1 => (n, 0u32..1000).prop_map(|(node, cpu)| Spec::Node { node, cpu }),
        1 => (any::<bool>(), 0u64..4, 0u16..3).prop_map(|(ok, score, km)| Spec::Route { ok, score, km }),
        1 => (0u8..2).prop_map(|kind| Spec::Unknown { kind }),
    ]
}

const STATUSES: [&str; 3] = ["live", "offline", ""];
const BUFFERS: [&str; 4] = ["FULL", "EMPTY", "DRY", "RECOVER"];
const TIERS: [&str; 3] = ["", "720p", "1080p"];
const COUNTRIES: [&str; 3] = ["NL", "DE", ""];
const HOSTS: [&str; 3] = ["", "198.51.100.1", "198.51.100.2"];

fn stream_ref(stream: u8) -> StreamRef {
    StreamRef {
        internal_name: Sym::new(&format!("stream{}", stream % 2)),
        // Stream 2 shares stream 0's name under another tenant; stream 1 carries a public id.
        stream_id: (stream == 1).then(|| Uuid::from_u128(0xabc)),
    }
}

fn place(host: u8, country: u8) -> ViewerPlace {
    ViewerPlace {
        host: CompactString::from(HOSTS[usize::from(host)]),
        connector: Sym::new(if host == 2 { "WebRTC" } else { "HLS" }),
        country: Sym::new(COUNTRIES[usize::from(country)]),
        city: Sym::new(if country == 0 { "Amsterdam" } else { "" }),
        latitude: None,
        longitude: None,
    }
}

fn build(spec: &Spec, seq: usize, time_s: u32) -> Event {
    let time = BASE + i64::from(time_s) * SECOND;
    let tenant_of = |stream: u8| tenant(u8::from(stream == 2));
    let (tenant, kind) = match spec.clone() {
        Spec::Connect {
            stream,
            node,
            session,
            host,
            country,
        } => (
            tenant_of(stream),
            EventKind::ViewerConnect(ViewerConnect {
                stream: stream_ref(stream),
                node: Sym::new(&format!("edge-{node}")),
                session_id: CompactString::from(session.to_string()),
                place: place(host, country),
            }),
        ),
        Spec::Disconnect {
            stream,
            node,
            session,
            host,
            country,
            duration,
            bytes,
        } => (
            tenant_of(stream),
            EventKind::ViewerDisconnect(ViewerDisconnect {
                stream: stream_ref(stream),
                node: Sym::new(&format!("edge-{node}")),
                session_id: CompactString::from(session.to_string()),
                place: place(host, country),
                duration_s: duration,
                up_bytes: bytes / 3,
                down_bytes: bytes,
            }),
        ),
        Spec::Start { stream, node } => (
            tenant_of(stream),
            EventKind::IngestStart(IngestStart {
                stream: stream_ref(stream),
                node: Sym::new(&format!("edge-{node}")),
                protocol: Sym::new("RTMP"),
                latitude: None,
                longitude: None,
            }),
        ),
        Spec::Update {
            stream,
            status,
            bitrate,
            fps,
            buffer,
            issues,
            sent,
            lost,
            tier,
        } => (
            tenant_of(stream),
            EventKind::StreamUpdate(StreamUpdate {
                stream: stream_ref(stream),
                node: Sym::new("edge-0"),
                status: Sym::new(STATUSES[usize::from(status)]),
                buffer_state: Sym::new(BUFFERS[usize::from(buffer)]),
                uploaded_bytes: sent * 1000,
                downloaded_bytes: 0,
                viewers: 0,
                inputs: 1,
                has_issues: issues,
                quality_tier: Sym::new(TIERS[usize::from(tier)]),
                height: 0,
                fps: [0.0, 29.97, 59.94][usize::from(fps)],
                bitrate_bps: bitrate * 1_500_000,
                packets_sent: sent,
                packets_lost: lost.min(sent),
                started_at: (status == 0).then_some(BASE),
            }),
        ),
        Spec::Buffer {
            stream,
            buffer,
            issues,
        } => (
            tenant_of(stream),
            EventKind::StreamBuffer(StreamBuffer {
                stream: stream_ref(stream),
                node: Sym::new("edge-0"),
                buffer_state: Sym::new(BUFFERS[usize::from(buffer)]),
                has_issues: issues,
                quality_tier: Sym::default(),
            }),
        ),
        Spec::End { stream, bytes } => (
            tenant_of(stream),
            EventKind::StreamEnd(StreamEnd {
                stream: stream_ref(stream),
                node: Sym::new("edge-1"),
                downloaded_bytes: bytes,
                uploaded_bytes: bytes / 2,
            }),
        ),
        Spec::Tracks { stream, tier } => (
            tenant_of(stream),
            EventKind::TrackList(TrackList {
                stream: stream_ref(stream),
                node: Sym::new("edge-0"),
                quality_tier: Sym::new(TIERS[usize::from(tier)]),
                height: 0,
                tracks: 2,
            }),
        ),
        Spec::Node { node, cpu } => (
            tenant(0),
            EventKind::NodeUpdate(NodeUpdate {
                node: Sym::new(&format!("edge-{node}")),
                cpu_tenths: cpu,
                is_healthy: cpu < 900,
                ..NodeUpdate::default()
            }),
        ),
        Spec::Route { ok, score, km } => (
            tenant(0),
            EventKind::Routing(RoutingDecision {
                selected_node: Sym::new("edge-0"),
                status: Sym::new(if ok { "success" } else { "failed" }),
                score: (score > 0).then_some(score * 100),
                distance_km: (km > 0).then_some(f64::from(km) * 12.5),
                ..RoutingDecision::default()
            }),
        ),
        Spec::Unknown { kind } => (
            tenant(0),
            EventKind::Unknown(UnknownEvent {
                event_type: Sym::new(["clip_lifecycle", "storage_snapshot"][usize::from(kind)]),
                json: format!("{{\"n\":{seq}}}"),
            }),
        ),
    };
    Event {
        id: Uuid::from_u128(seq as u128 + 1),
        tenant,
        time,
        kind,
    }
}

// ---------------------------------------------------------------------------------------------
// The reference: every table recomputed from the distinct events.

struct RefSession {
    start: i64,
    /// End as the aggregates count it: at most [`LIMIT`] after the start, and then even
    /// without a disconnect once `now` is there.
    end: Option<i64>,
    /// End as the row shows it: the disconnect's.
    row_end: Option<i64>,
    details: ClientDetails,
    down: u64,
    up: u64,
}

fn level(sessions: &[&RefSession], t: i64) -> i64 {
    sessions
        .iter()
        .filter(|s| s.start <= t && s.end.is_none_or(|e| e > t))
        .count() as i64
}

fn overlap_ms(s: &RefSession, from: i64, to: i64, now: i64) -> i128 {
    let end = s.end.unwrap_or(now);
    i128::from((end.min(to) - s.start.max(from)).max(0))
}

fn reference(events: &[Event], now: i64) -> Tables {
    let mut distinct: BTreeMap<Uuid, &Event> = BTreeMap::new();
    for e in events {
        distinct.insert(e.id, e);
    }
    let events: Vec<&Event> = distinct.into_values().collect();
    let mut tables = Tables::new();

    let mut by_stream: BTreeMap<(Uuid, Sym), Vec<&Event>> = BTreeMap::new();
    for e in &events {
        if let Some(s) = e.kind.stream() {
            by_stream
                .entry((e.tenant, s.internal_name))
                .or_default()
                .push(e);
        }
    }
    for ((tenant_uuid, name), evs) in by_stream {
        let tenant_id = Sym::new(&tenant_uuid.to_string());
        let stream_id = evs
            .iter()
            .filter_map(|e| e.kind.stream().and_then(|s| s.stream_id))
            .min()
            .unwrap_or_else(|| {
                Uuid::new_v5(&KEEL_NAMESPACE, format!("{tenant_id}:{name}").as_bytes())
            });
        let stream_id = Sym::new(&stream_id.to_string());

        // Sessions.
        let mut connects: HashMap<(Sym, CompactString), (i64, ClientDetails)> = HashMap::new();
        let mut endings: HashMap<(Sym, CompactString), Ending> = HashMap::new();
        for e in &evs {
            match &e.kind {
                EventKind::ViewerConnect(c) => {
                    let d = ClientDetails {
                        connector: c.place.connector,
                        country: c.place.country,
                        city: c.place.city,
                        identity: viewer_identity(&c.place.host, c.node, &c.session_id),
                    };
                    let entry = connects
                        .entry((c.node, c.session_id.clone()))
                        .or_insert((e.time, d));
                    *entry = (*entry).min((e.time, d));
                }
                EventKind::ViewerDisconnect(c) => {
                    let d = ClientDetails {
                        connector: c.place.connector,
                        country: c.place.country,
                        city: c.place.city,
                        identity: viewer_identity(&c.place.host, c.node, &c.session_id),
                    };
                    let ending = Ending {
                        time: e.time,
                        duration_s: c.duration_s,
                        down_bytes: c.down_bytes,
                        up_bytes: c.up_bytes,
                        details: d,
                    };
                    let entry = endings
                        .entry((c.node, c.session_id.clone()))
                        .or_insert(ending);
                    *entry = (*entry).max(ending);
                }
                _ => {}
            }
        }
        let keys: BTreeSet<(Sym, CompactString)> =
            connects.keys().chain(endings.keys()).cloned().collect();
        let sessions: Vec<((Sym, CompactString), RefSession)> = keys
            .into_iter()
            .map(|k| {
                let c = connects.get(&k).copied();
                let e = endings.get(&k).copied();
                let start = match (c, e) {
                    (Some((t, _)), _) => t,
                    (None, Some(e)) => e.time - e.duration_s as i64 * SECOND,
                    _ => unreachable!(),
                };
                let details = c.map(|(_, d)| d).unwrap_or_else(|| e.unwrap().details);
                let row_end = e.map(|e| e.time.max(start));
                let cap = start + LIMIT;
                let s = RefSession {
                    start,
                    end: row_end
                        .map(|end| end.min(cap))
                        .or((cap <= now).then_some(cap)),
                    row_end,
                    details,
                    down: e.map_or(0, |e| e.down_bytes),
                    up: e.map_or(0, |e| e.up_bytes),
                };
                (k, s)
            })
            .collect();
        let all: Vec<&RefSession> = sessions.iter().map(|(_, s)| s).collect();
        let code = |c: Sym| if c.is_empty() { Sym::new("--") } else { c };
        for ((node, id), s) in &sessions {
            put(
                &mut tables,
                "viewer_sessions",
                ViewerSessionRow {
                    stream: SymPair::new(tenant_id, name),
                    stream_id,
                    session_id: id.as_str().into(),
                    node_id: *node,
                    connector: s.details.connector,
                    country_code: code(s.details.country),
                    city: s.details.city,
                    connected_at: s.start,
                    disconnected_at: s.row_end.into(),
                    down_bytes: s.down,
                    up_bytes: s.up,
                },
            );
        }
        let seconds = |group: &[&RefSession]| -> f64 {
            let ms: i128 = group
                .iter()
                .map(|s| i128::from((s.end.unwrap_or(now) - s.start).max(0)))
                .sum();
            ms as f64 / SECOND as f64
        };
        // Countries.
        let mut countries: BTreeMap<Sym, Vec<&RefSession>> = BTreeMap::new();
        for s in &all {
            countries.entry(s.details.country).or_default().push(s);
        }
        for (country, group) in &countries {
            put(
                &mut tables,
                "viewers_by_country",
                CountryRow {
                    tenant_id,
                    stream_id,
                    internal_name: name,
                    country_code: code(*country),
                    sessions: group.len() as u64,
                    current_viewers: group.iter().filter(|s| s.end.is_none()).count() as u64,
                    viewer_seconds: seconds(group),
                    egress_bytes: group.iter().map(|s| s.down).sum(),
                },
            );
        }
        // Usage windows.
        // Every window a session starts in or overlaps (none other can have a row).
        let mut touched: BTreeSet<i64> = BTreeSet::new();
        for s in &all {
            let mut w = window_start(s.start, WINDOW);
            let last = window_start(s.end.unwrap_or(now).max(s.start), WINDOW);
            while w <= last {
                touched.insert(w);
                w += WINDOW;
            }
        }
        for w in touched {
            {
                let mut points: Vec<i64> = vec![w];
                for s in &all {
                    points.extend(
                        [s.start]
                            .into_iter()
                            .chain(s.end)
                            .filter(|&t| t > w && t < w + WINDOW),
                    );
                }
                let peak = points.iter().map(|&t| level(&all, t)).max().unwrap_or(0) as u64;
                let started = all
                    .iter()
                    .filter(|s| window_start(s.start, WINDOW) == w)
                    .count() as u64;
                let ms: i128 = all.iter().map(|s| overlap_ms(s, w, w + WINDOW, now)).sum();
                if peak > 0 || started > 0 || ms > 0 {
                    put(
                        &mut tables,
                        "usage_5m",
                        UsageRow {
                            tenant_id,
                            stream_id,
                            internal_name: name,
                            window_start: w,
                            peak_viewers: peak,
                            sessions_started: started,
                            viewer_seconds: ms as f64 / SECOND as f64,
                        },
                    );
                }
            }
        }
        // Health windows.
        let mut health: BTreeMap<i64, Vec<&Event>> = BTreeMap::new();
        for e in &evs {
            let counts = match &e.kind {
                EventKind::StreamUpdate(_) | EventKind::StreamBuffer(_) => true,
                EventKind::TrackList(t) => !t.quality_tier.is_empty(),
                _ => false,
            };
            if counts {
                health
                    .entry(window_start(e.time, WINDOW))
                    .or_default()
                    .push(e);
            }
        }
        for (w, group) in &health {
            let (mut dry, mut issues, mut br, mut brn, mut fps, mut fpsn, mut sent, mut lost) =
                (0, 0, 0u128, 0u64, 0i128, 0u64, 0u64, 0u64);
            let mut tier: Option<(i64, Sym)> = None;
            for e in group {
                let (state, has_issues, t) = match &e.kind {
                    EventKind::StreamUpdate(u) => {
                        if u.bitrate_bps > 0 {
                            br += u128::from(u.bitrate_bps);
                            brn += 1;
                        }
                        if u.fps > 0.0 {
                            fps += micro(u.fps);
                            fpsn += 1;
                        }
                        sent += u.packets_sent;
                        lost += u.packets_lost;
                        (u.buffer_state, u.has_issues, u.quality_tier)
                    }
                    EventKind::StreamBuffer(b) => (b.buffer_state, b.has_issues, b.quality_tier),
                    EventKind::TrackList(t) => (Sym::default(), false, t.quality_tier),
                    _ => unreachable!(),
                };
                dry += u64::from(state.as_str() == "DRY");
                issues += u64::from(has_issues);
                if !t.is_empty() {
                    tier = tier.max(Some((e.time, t)));
                }
            }
            put(
                &mut tables,
                "stream_health_5m",
                HealthRow {
                    tenant_id,
                    stream_id,
                    internal_name: name,
                    window_start: *w,
                    samples: group.len() as u64,
                    buffer_dry_count: dry,
                    issue_count: issues,
                    avg_bitrate_kbps: (brn > 0).then(|| br as f64 / brn as f64 / 1000.0),
                    avg_fps: (fpsn > 0).then(|| fps as f64 / fpsn as f64 / 1e6),
                    quality_tier: tier.map(|(_, t)| t),
                    packet_loss_rate: (sent > 0).then(|| lost as f64 / sent as f64),
                },
            );
        }
        // The stream row.
        let mut status: Option<(i64, u8, Sym, Sym)> = None;
        let mut started_at: Option<i64> = None;
        let mut ingress: Option<(i64, u64)> = None;
        let mut buffer: Option<(i64, Sym)> = None;
        let mut quality: Option<(i64, Sym)> = None;
        for e in &evs {
            match &e.kind {
                EventKind::IngestStart(s) => {
                    status = status.max(Some((e.time, 0, Sym::new("live"), s.node)));
                    started_at = started_at.max(Some(e.time));
                }
                EventKind::StreamUpdate(u) => {
                    if !u.status.is_empty() {
                        status = status.max(Some((e.time, 1, u.status, u.node)));
                    }
                    started_at = started_at.max(u.started_at);
                    ingress = ingress.max(Some((e.time, u.uploaded_bytes)));
                    if !u.buffer_state.is_empty() {
                        buffer = buffer.max(Some((e.time, u.buffer_state)));
                    }
                    if !u.quality_tier.is_empty() {
                        quality = quality.max(Some((e.time, u.quality_tier)));
                    }
                }
                EventKind::StreamBuffer(b) => {
                    buffer = buffer.max(Some((e.time, b.buffer_state)));
                    if !b.quality_tier.is_empty() {
                        quality = quality.max(Some((e.time, b.quality_tier)));
                    }
                }
                EventKind::TrackList(t) if !t.quality_tier.is_empty() => {
                    quality = quality.max(Some((e.time, t.quality_tier)));
                }
                EventKind::StreamEnd(s) => {
                    status = status.max(Some((e.time, 2, Sym::new("offline"), s.node)));
                    ingress = ingress.max(Some((e.time, s.uploaded_bytes)));
                }
                _ => {}
            }
        }
        let mut points: BTreeSet<i64> = BTreeSet::new();
        for s in &all {
            points.insert(s.start);
            points.extend(s.end);
        }
        let identities: BTreeSet<u64> = all.iter().map(|s| s.details.identity).collect();
        put(
            &mut tables,
            "streams",
            StreamRow {
                tenant_id,
                stream_id,
                internal_name: name,
                status: status.map_or(Sym::new("unknown"), |s| s.2),
                node_id: status.and_then(|s| s.3.non_empty()),
                current_viewers: all.iter().filter(|s| s.end.is_none()).count() as u64,
                peak_viewers: points.iter().map(|&t| level(&all, t)).max().unwrap_or(0) as u64,
                total_sessions: all.len() as u64,
                unique_viewers: identities.len() as u64,
                viewer_seconds: seconds(&all),
                egress_bytes: all.iter().map(|s| s.down).sum(),
                ingress_bytes: ingress.map_or(0, |i| i.1),
                buffer_state: buffer.map(|b| b.1),
                quality_tier: quality.map(|q| q.1),
                started_at,
                updated_at: evs.iter().map(|e| e.time).max().unwrap(),
            },
        );
    }

    // Nodes: newest by (time, id).
    let mut nodes: BTreeMap<(Uuid, Sym), &Event> = BTreeMap::new();
    for e in &events {
        if let EventKind::NodeUpdate(n) = &e.kind {
            let entry = nodes.entry((e.tenant, n.node)).or_insert(e);
            if (e.time, e.id) > (entry.time, entry.id) {
                *entry = e;
            }
        }
    }
    for e in nodes.into_values() {
        put(&mut tables, "nodes", node_row((*e).clone()).2);
    }
    // Routing per tenant-hour.
    let mut hours: BTreeMap<(Uuid, i64), Vec<&RoutingDecision>> = BTreeMap::new();
    for e in &events {
        if let EventKind::Routing(r) = &e.kind {
            hours
                .entry((e.tenant, window_start(e.time, HOUR)))
                .or_default()
                .push(r);
        }
    }
    for ((t, hour), group) in hours {
        let km: Vec<f64> = group.iter().filter_map(|r| r.distance()).collect();
        let scores: Vec<u64> = group.iter().filter_map(|r| r.score).collect();
        put(
            &mut tables,
            "routing_hourly",
            RoutingRow {
                tenant_id: Sym::new(&t.to_string()),
                hour,
                decisions: group.len() as u64,
                successes: group
                    .iter()
                    .filter(|r| r.status.as_str() == "success")
                    .count() as u64,
                avg_distance_km: (!km.is_empty()).then(|| {
                    km.iter().map(|&k| micro(k)).sum::<i128>() as f64 / km.len() as f64 / 1e6
                }),
                avg_score: (!scores.is_empty()).then(|| {
                    scores.iter().map(|&s| u128::from(s)).sum::<u128>() as f64 / scores.len() as f64
                }),
            },
        );
    }
    // Unknown types.
    let mut unknown: BTreeMap<(Uuid, Sym), Vec<&Event>> = BTreeMap::new();
    for e in &events {
        if let EventKind::Unknown(u) = &e.kind {
            unknown.entry((e.tenant, u.event_type)).or_default().push(e);
        }
    }
    for ((t, kind), group) in unknown {
        let newest = group.iter().max_by_key(|e| (e.time, e.id)).unwrap();
        let EventKind::Unknown(u) = &newest.kind else {
            unreachable!()
        };
        put(
            &mut tables,
            "unknown_events",
            UnknownEventRow {
                tenant_id: Sym::new(&t.to_string()),
                event_type: kind,
                events: group.len() as u64,
                last_seen: newest.time,
                sample: crate::privacy::scrub_json(&u.json),
            },
        );
    }
    tables
}

/// The session limit of the states checked here: 20 minutes, within the events' 40.
const LIMIT: i64 = 20 * 60 * SECOND;

/// All states of the dataflow, driven by hand (one worker).
struct States {
    streams: StreamsState,
    nodes: Latest<(Uuid, Sym), (i64, Uuid), NodeRow>,
    routing: RoutingState,
    unknown: UnknownState,
}

impl Default for States {
    fn default() -> Self {
        States {
            streams: StreamsState::default().with_session_limit(LIMIT),
            nodes: Latest::default(),
            routing: RoutingState::default(),
            unknown: UnknownState::default(),
        }
    }
}

impl States {
    fn apply(&mut self, event: Event) {
        match super::class(&event) {
            0 => self.streams.apply(event),
            1 => self.nodes.apply(node_row(event)),
            2 => self.routing.apply(event),
            _ => self.unknown.apply(event),
        }
    }

    fn close(&mut self, now: i64, store: &mut Store) {
        let mut out = Vec::new();
        self.streams.close(now, &mut out);
        self.routing.close(now, &mut out);
        self.unknown.close(now, &mut out);
        let mut nodes = Vec::new();
        self.nodes.close(now, &mut nodes);
        out.extend(
            nodes
                .into_iter()
                .map(|(_, row)| PeriscopeChange::Nodes(Change::Upsert(row))),
        );
        // Each key at most once per close.
        let mut seen = BTreeSet::new();
        for change in out {
            let tag = format!("{:?}", std::mem::discriminant(&change));
            let key = match &change {
                PeriscopeChange::Streams(c) => serde_json::to_string(&c.key()),
                PeriscopeChange::ViewerSessions(c) => serde_json::to_string(&c.key()),
                PeriscopeChange::Nodes(c) => serde_json::to_string(&c.key()),
                PeriscopeChange::ViewersByCountry(c) => serde_json::to_string(&c.key()),
                PeriscopeChange::Usage5m(c) => serde_json::to_string(&c.key()),
                PeriscopeChange::StreamHealth5m(c) => serde_json::to_string(&c.key()),
                PeriscopeChange::RoutingHourly(c) => serde_json::to_string(&c.key()),
                PeriscopeChange::IngestErrors(c) => serde_json::to_string(&c.key()),
                PeriscopeChange::UnknownEvents(c) => serde_json::to_string(&c.key()),
                PeriscopeChange::Closed { generation, .. } => serde_json::to_string(generation),
            }
            .unwrap();
            assert!(
                seen.insert((tag, key.clone())),
                "a key changed twice in one close: {key}"
            );
            keel_operators::table::TableSet::apply_to(change, store);
        }
    }
}

/// Puts `events` in a random order (seeded by `order`) and returns where the closes fall: at
/// `cuts` and at the end, ascending.
fn shuffled_with_cuts(
    events: &mut [Event],
    order: u64,
    cuts: &[prop::sample::Index],
) -> Vec<usize> {
    let mut state = order | 1;
    for i in (1..events.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        events.swap(i, (state % (i as u64 + 1)) as usize);
    }
    let mut cut_points: Vec<usize> = cuts.iter().map(|c| c.index(events.len() + 1)).collect();
    cut_points.push(events.len());
    cut_points.sort();
    cut_points
}

/// Seconds after [`BASE`]: mostly within 50 minutes (across the boundary of two pages of
/// windows, 40 minutes in, so that open sessions reach into a page no event made), some 23 days
/// later (past every page, so that a stream's windows have a gap, and every earlier session
/// reaches [`LIMIT`]).
fn event_time() -> impl Strategy<Value = u32> {
    prop_oneof![9 => 0u32..3000, 1 => 2_000_000u32..2_003_000]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_from_scratch(
        specs in prop::collection::vec((arb_spec(), event_time()), 1..120),
        duplicates in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        order in any::<u64>(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut events: Vec<Event> = specs.iter().enumerate().map(|(i, (spec, t))| build(spec, i, *t)).collect();
        // Replays of the same record: same id, same content.
        for d in &duplicates {
            let copy = events[d.index(events.len())].clone();
            events.push(copy);
        }
        let cut_points = shuffled_with_cuts(&mut events, order, &cuts);
        let mut states = States::default();
        let mut store = Store::default();
        let mut watermark = i64::MIN;
        let mut from = 0;
        for cut in cut_points {
            for e in &events[from..cut] {
                watermark = watermark.max(e.time);
                states.apply(e.clone());
            }
            from = cut;
            states.close(watermark, &mut store);
            let expected = reference(&events[..cut], watermark);
            for table in TABLES {
                prop_assert_eq!(store.0.get(table), expected.get(table), "table {} after {} events", table, cut);
            }
        }
    }
}

/// `viewer_sessions` rows as the oracle's maps hold them.
fn session_map(rows: impl IntoIterator<Item = ViewerSessionRow>) -> BTreeMap<String, Value> {
    rows.into_iter()
        .map(|row| {
            (
                serde_json::to_string(&row.key()).unwrap(),
                serde_json::to_value(row).unwrap(),
            )
        })
        .collect()
}

/// Has each event absorbed by the worker its stream routes to, moving `watermark` on.
fn absorb(workers: &mut [StreamsState], events: &[Event], watermark: &mut i64) {
    for e in events {
        *watermark = (*watermark).max(e.time);
        workers[(super::streams::route(e) % 2) as usize].apply(e.clone());
    }
}

/// The rows readers should see: each worker's rows as reported up to its last published close.
fn visible(published: &[BTreeMap<String, Value>]) -> BTreeMap<String, Value> {
    published
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Compares everything a reader of `held` can ask with `expected`; `keys` are every key the
/// states hold, visible or not.
fn check_held(
    held: &HeldSessions,
    expected: &BTreeMap<String, Value>,
    keys: &BTreeMap<String, ViewerSessionRow>,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(&session_map(held.rows(None)), expected);
    prop_assert_eq!(held.len(), expected.len());
    for limit in [0, 1, expected.len() / 2, expected.len() + 1] {
        let some = held.rows_up_to(None, limit);
        prop_assert_eq!(some.len(), limit.min(expected.len()));
        for (text, row) in &session_map(some) {
            prop_assert_eq!(
                Some(row),
                expected.get(text),
                "{} of {} rows",
                limit,
                expected.len()
            );
        }
    }
    for (text, row) in keys {
        let got = held
            .get(&row.key())
            .map(|r| serde_json::to_value(r).unwrap());
        prop_assert_eq!(got.as_ref(), expected.get(text), "look-up of {}", text);
    }
    for t in 0..2 {
        let tenant = tenant(t).to_string();
        let of_tenant: BTreeMap<String, Value> = expected
            .iter()
            .filter(|(_, row)| row["tenant_id"] == tenant.as_str())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        prop_assert_eq!(held.count(Some(&tenant)), of_tenant.len());
        prop_assert_eq!(session_map(held.rows(Some(&tenant))), of_tenant);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// The held `viewer_sessions` (read where the stream states of two workers keep the
    /// sessions) shows, after each publish and while the workers absorb the next events,
    /// exactly the rows each worker had reported up to its last published close, however far
    /// the workers have absorbed beyond it; its diffs take the previous published rows to the
    /// new ones; look-ups of every key held, counts and tenant scans agree.
    #[test]
    fn held_sessions_show_the_published_closes(
        specs in prop::collection::vec((arb_spec(), event_time()), 1..120),
        order in any::<u64>(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        lags in prop::collection::vec(0usize..4, 12),
    ) {
        let mut events: Vec<Event> = specs.iter().enumerate().map(|(i, (spec, t))| build(spec, i, *t)).collect();
        // Viewer events without stream 1's public id, so its id changes under existing
        // sessions when a lifecycle event brings it.
        for e in &mut events {
            if let EventKind::ViewerConnect(ViewerConnect { stream, .. })
            | EventKind::ViewerDisconnect(ViewerDisconnect { stream, .. }) = &mut e.kind
            {
                stream.stream_id = None;
            }
        }
        let cut_points = shuffled_with_cuts(&mut events, order, &cuts);
        let closes = cut_points.len();

        let store = Arc::new(SessionStore::default());
        let mut workers: Vec<StreamsState> = (0..2).map(|w| StreamsState::new(store.clone(), w)).collect();
        let mut held = HeldSessions::new(store.clone());
        // Per worker: the rows reported so far, its closes not yet published (with the rows
        // reported up to each), and the rows up to its last published close.
        let mut reported: Vec<Store> = (0..2).map(|_| Store::default()).collect();
        let mut unpublished: Vec<Vec<(u64, BTreeMap<String, Value>)>> = vec![Vec::new(); 2];
        let mut published: Vec<BTreeMap<String, Value>> = vec![BTreeMap::new(); 2];
        // Every key any state holds, and the rows readers saw at the last commit.
        let mut keys: BTreeMap<String, ViewerSessionRow> = BTreeMap::new();
        let mut shown = BTreeMap::new();
        let (mut watermark, mut from) = (i64::MIN, 0);
        for (k, cut) in cut_points.into_iter().enumerate() {
            let last = k + 1 == closes;
            let mid = (from + cut) / 2;
            absorb(&mut workers, &events[from..mid], &mut watermark);
            // Publish all but each worker's newest few closes (the publisher lags the states),
            // and everything after the last close.
            for w in 0..2 {
                let lag = lags[(2 * k + w) % lags.len()];
                let publish = unpublished[w].len().saturating_sub(lag);
                for (generation, rows) in unpublished[w].drain(..publish) {
                    held.closed(w as u32, generation);
                    published[w] = rows;
                }
            }
            let changes = held.commit(true);
            let expected = visible(&published);
            // The diffs take the rows shown before to the rows shown now.
            let mut after = shown.clone();
            for (before, row) in changes {
                prop_assert_ne!(&before, &row);
                let key = serde_json::to_string(&before.as_ref().or(row.as_ref()).unwrap().key()).unwrap();
                let before = before.map(|b| serde_json::to_value(b).unwrap());
                prop_assert_eq!(after.get(&key), before.as_ref());
                match row {
                    Some(row) => after.insert(key, serde_json::to_value(row).unwrap()),
                    None => after.remove(&key),
                };
            }
            prop_assert_eq!(&after, &expected, "diffs before close {}", k);
            shown = after;
            // Read while the workers are half way through their next generation.
            check_held(&held, &expected, &keys)?;
            absorb(&mut workers, &events[mid..cut], &mut watermark);
            from = cut;
            for w in 0..2 {
                let mut out = Vec::new();
                workers[w].close(watermark, &mut out);
                let mut generation = None;
                for change in out {
                    match change {
                        PeriscopeChange::Closed { generation: g, worker } => {
                            prop_assert_eq!(worker as usize, w);
                            generation = Some(g);
                        }
                        PeriscopeChange::ViewerSessions(Change::Upsert(row)) => {
                            keys.insert(serde_json::to_string(&row.key()).unwrap(), row.clone());
                            keel_operators::table::TableSet::apply_to(
                                PeriscopeChange::ViewerSessions(Change::Upsert(row)),
                                &mut reported[w],
                            );
                        }
                        _ => {}
                    }
                }
                let generation = generation.expect("every close reports its generation");
                let rows = reported[w].0.get("viewer_sessions").cloned().unwrap_or_default();
                unpublished[w].push((generation, rows));
                if last {
                    for (generation, rows) in unpublished[w].drain(..) {
                        held.closed(w as u32, generation);
                        published[w] = rows;
                    }
                }
            }
            if last {
                held.commit(true);
                check_held(&held, &visible(&published), &keys)?;
                // Once everything is visible, the next close forgets every before-image, also
                // of streams that get no more events.
                for worker in &mut workers {
                    worker.close(watermark, &mut Vec::new());
                }
                prop_assert_eq!(store.logged(), 0);
            }
        }
    }
}

/// One connect dated 2000 on a stream that is live now, with the engine's own session limit: it
/// counts for 30 days and then as ended (one usage row per 5 minutes of them, not one per 5
/// minutes since 2000), and its windows take that month's pages only.
#[test]
fn a_stray_connect_years_back_counts_for_the_session_limit() {
    const Y2000: i64 = 946_684_800_000;
    let connect = |session| Spec::Connect {
        stream: 0,
        node: 0,
        session,
        host: 0,
        country: 0,
    };
    let mut stray = build(&connect(0), 0, 0);
    stray.time = Y2000;
    let leave = Spec::Disconnect {
        stream: 0,
        node: 0,
        session: 1,
        host: 0,
        country: 0,
        duration: 60,
        bytes: 10,
    };
    let mut streams = StreamsState::default();
    for event in [stray, build(&connect(1), 1, 0), build(&leave, 2, 60)] {
        streams.apply(event);
    }
    let mut out = Vec::new();
    streams.close(BASE + 60 * SECOND, &mut out);

    let month = usize::try_from(SESSION_LIMIT / WINDOW).unwrap();
    let usage = out
        .iter()
        .filter(|c| matches!(c, PeriscopeChange::Usage5m(Change::Upsert(_))))
        .count();
    assert_eq!(
        usage,
        month + 1,
        "the stray month's windows and today's one"
    );
    let row = out
        .iter()
        .find_map(|c| match c {
            PeriscopeChange::Streams(Change::Upsert(row)) => Some(row),
            _ => None,
        })
        .expect("a streams row");
    assert_eq!(
        row.current_viewers, 0,
        "the stray session no longer counts as open"
    );
    assert_eq!(row.total_sessions, 2);
    assert_eq!(
        row.viewer_seconds,
        (SESSION_LIMIT / SECOND + 60) as f64,
        "30 days and a minute"
    );
    assert!(
        streams.window_pages() <= month.div_ceil(32) + 2,
        "{} pages of windows",
        streams.window_pages()
    );
}
