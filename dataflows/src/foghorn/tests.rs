//! Routing against a plain reference of the formula, and the load state against a brute-force
//! reference of its rules, on random fleets, requests and event orders.

use std::collections::BTreeMap;
use std::sync::Arc;

use keel_operators::maintain::EpochState;
use keel_operators::sym::Sym;
use keel_sources::event::{NodeMode, NodeStream, NodeUpdate};
use proptest::prelude::*;
use uuid::Uuid;

use super::*;

const TAGS: [&str; 4] = ["edge", "ingest", "eu", "gpu"];
const STREAMS: [&str; 4] = ["a", "b", "c", "d"];

/// The balancer as the platform describes it, one node at a time, nothing precomputed.
fn reference_score(
    n: &NodeLoad,
    req: &Request,
    w: &Weights,
    watermark: i64,
    cutoff: &Cutoff,
) -> Option<u64> {
    let bw_limit = if n.reported_bw_limit == 0 {
        128 * 1024 * 1024
    } else {
        n.reported_bw_limit
    };
    let used = n.up_speed + n.add_bandwidth;
    if n.ram_max == 0 || used >= bw_limit {
        return None;
    }
    if watermark - n.seen_at > 90_000 || !n.healthy || n.mode != NodeMode::Normal {
        return None;
    }
    let needed = req.capability.map(|c| c.as_str()).or(match req.purpose {
        Purpose::View => Some("edge"),
        Purpose::Ingest(_) => Some("ingest"),
        Purpose::Source => None,
    });
    if let Some(needed) = needed
        && !n.capabilities.is_empty()
        && !n.capabilities.iter().any(|c| c.as_str() == needed)
    {
        return None;
    }
    let on_node = req
        .stream
        .and_then(|s| n.streams.iter().find(|x| x.name == s));
    match req.purpose {
        Purpose::Source if !on_node.is_some_and(|s| s.inputs > 0 && !s.replicated) => return None,
        Purpose::Ingest(p) if f64::from(n.cpu_tenths) + p * 10.0 >= 1000.0 => return None,
        _ => {}
    }
    if let Some(limit) = cutoff.cpu_percent
        && f64::from(n.cpu_tenths) / 10.0 > limit
    {
        return None;
    }
    if let Some(limit) = cutoff.ram_percent
        && n.ram_current as f64 / n.ram_max as f64 * 100.0 > limit
    {
        return None;
    }
    if let Some(limit) = cutoff.bw_percent
        && used as f64 / bw_limit as f64 * 100.0 > limit
    {
        return None;
    }
    let cpu = w.cpu - u64::from(n.cpu_tenths) * w.cpu / 1000;
    let ram = w.ram.saturating_sub(
        (u128::from(n.ram_current) * u128::from(w.ram) / u128::from(n.ram_max)) as u64,
    );
    let bw = w.bw - (u128::from(used) * u128::from(w.bw) / u128::from(bw_limit)) as u64;
    let valid =
        |lat: f64, lon: f64| (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon);
    let geo = match (req.client, n.latitude, n.longitude) {
        (Some(c), Some(lat), Some(lon)) if valid(lat, lon) => {
            let r = 57.295_779_513_082_32;
            let (p1, p2) = (c.latitude / r, lat / r);
            let cos = p1.sin() * p2.sin() + p1.cos() * p2.cos() * ((c.longitude - lon) / r).cos();
            let d = cos.clamp(-1.0, 1.0).acos() / std::f64::consts::PI;
            w.geo - (w.geo as f64 * d) as u64
        }
        _ => 0,
    };
    let bonus = if on_node.is_some() { w.bonus } else { 0 };
    let mut tags = 0i64;
    for adj in &req.tags {
        let has = adj.tags.iter().any(|t| n.capabilities.contains(t));
        if has != adj.invert {
            tags += adj.adjust;
        }
    }
    Some(((cpu + ram + bw + geo + bonus) as i64 + tags).max(0) as u64)
}

/// Every node's reference score, best first, ties to the lower id; the cutoff falls back to the
/// plain gradient when it excludes everyone.
fn reference_ranking(
    nodes: &[NodeLoad],
    req: &Request,
    policy: &Policy,
    watermark: i64,
) -> Vec<(Sym, u64)> {
    let rank = |cutoff: &Cutoff| {
        let mut all: Vec<(Sym, u64)> = nodes
            .iter()
            .filter_map(|n| {
                Some((
                    n.node,
                    reference_score(n, req, &policy.weights, watermark, cutoff)?,
                ))
            })
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        all
    };
    let ranked = rank(&policy.cutoff);
    if ranked.is_empty() {
        rank(&Cutoff::default())
    } else {
        ranked
    }
}

fn node_strategy(i: usize) -> impl Strategy<Value = NodeLoad> {
    (
        (0u32..=1000, prop_oneof![1 => Just(0u64), 9 => 1u64..64_000_000_000], 0u64..80_000_000_000),
        (0u64..200_000_000, 0u64..6_000_000, prop_oneof![1 => Just(0u64), 4 => 1_000_000u64..200_000_000]),
        proptest::option::weighted(0.9, (-95.0f64..95.0, -185.0f64..185.0)),
        (prop_oneof![8 => Just(NodeMode::Normal), 1 => Just(NodeMode::Draining), 1 => Just(NodeMode::Maintenance)], proptest::bool::weighted(0.9), 0i64..120_000),
        proptest::sample::subsequence(TAGS.to_vec(), 0..=4),
        proptest::collection::vec((0usize..4, 0u64..50, 0u64..2, any::<bool>()), 0..4),
    )
        .prop_map(move |((cpu, ram_max, ram_cur), (up, add, bw), geo, (mode, healthy, age), caps, streams)| {
            let mut streams: Vec<NodeStream> = streams
                .into_iter()
                .map(|(s, viewers, inputs, replicated)| NodeStream {
                    name: Sym::new(STREAMS[s]),
                    viewers,
                    inputs,
                    replicated,
                    ..NodeStream::default()
                })
                .collect();
            streams.sort_by_key(|s| s.name);
            streams.dedup_by_key(|s| s.name);
            NodeLoad {
                node: Sym::new(&format!("node-{:02}", (i * 7) % 40)),
                tenant: Uuid::nil(),
                host: Sym::new(&format!("https://n{i}.example:4433/")),
                seen_at: 1_000_000 - age,
                cpu_tenths: cpu,
                ram_current: ram_cur.min(ram_max.saturating_mul(6) / 5),
                ram_max,
                up_speed: up,
                down_speed: 0,
                reported_bw_limit: bw,
                add_bandwidth: add,
                pending_viewers: 0,
                latitude: geo.map(|g| g.0),
                longitude: geo.map(|g| g.1),
                location: Sym::default(),
                mode,
                healthy,
                capabilities: caps.iter().map(|t| Sym::new(t)).collect(),
                streams,
                connections: 0,
            }
        })
}

fn fleet_strategy() -> impl Strategy<Value = Vec<NodeLoad>> {
    (0usize..40).prop_flat_map(|count| (0..count).map(node_strategy).collect::<Vec<_>>())
}

fn request_strategy() -> impl Strategy<Value = Request> {
    (
        proptest::option::of(0usize..4),
        prop_oneof![3 => Just(Purpose::View), 1 => Just(Purpose::Source), 1 => (0.0f64..60.0).prop_map(Purpose::Ingest)],
        proptest::option::weighted(0.8, (-90.0f64..90.0, -180.0f64..180.0)),
        proptest::collection::vec((proptest::sample::subsequence(TAGS.to_vec(), 1..=2), any::<bool>(), -400i64..400), 0..3),
        proptest::option::weighted(0.2, 0usize..4),
    )
        .prop_map(|(stream, purpose, client, tags, capability)| Request {
            stream: stream.map(|s| Sym::new(STREAMS[s])),
            purpose,
            client: client.map(|(lat, lon)| Place::new(lat, lon).expect("in range")),
            tags: tags
                .into_iter()
                .map(|(tags, invert, adjust)| TagAdjust {
                    tags: tags.iter().map(|t| Sym::new(t)).collect(),
                    invert,
                    adjust,
                })
                .collect(),
            capability: capability.map(|c| Sym::new(TAGS[c])),
        })
}

fn policy_strategy() -> impl Strategy<Value = Policy> {
    (
        proptest::option::weighted(
            0.8,
            (0u64..1000, 0u64..1000, 0u64..2000, 0u64..2000, 0u64..200),
        ),
        proptest::option::weighted(0.3, (50.0f64..100.0, 50.0f64..100.0, 50.0f64..100.0)),
    )
        .prop_map(|(weights, cutoff)| Policy {
            weights: weights.map_or_else(Weights::default, |(cpu, ram, bw, geo, bonus)| Weights {
                cpu,
                ram,
                bw,
                geo,
                bonus,
            }),
            cutoff: cutoff.map_or_else(Cutoff::default, |(c, r, b)| Cutoff {
                cpu_percent: Some(c),
                ram_percent: Some(r),
                bw_percent: Some(b),
            }),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The fleet's fast path picks the same nodes with the same scores as the plain formula.
    #[test]
    fn routing_matches_the_reference(
        nodes in fleet_strategy(),
        request in request_strategy(),
        policy in policy_strategy(),
        n in 1usize..5,
    ) {
        let mut unique = nodes;
        unique.sort_by_key(|x| x.node);
        unique.dedup_by_key(|x| x.node);
        let fleet = Fleet::build(unique.iter().cloned().map(Arc::new).collect(), policy, 1_000_000);
        let expected = reference_ranking(&unique, &request, &policy, 1_000_000);
        match fleet.route(&request, n) {
            Ok(routed) => {
                let got: Vec<(Sym, u64)> = routed.candidates.iter().map(|c| (c.node.node, c.score.total)).collect();
                let want: Vec<(Sym, u64)> = expected.iter().take(n).copied().collect();
                prop_assert_eq!(got, want);
                let off = Cutoff::default();
                let cutoff = if routed.cutoff_fallback { &off } else { &policy.cutoff };
                for c in &routed.candidates {
                    let direct = score::score_node(&c.node, &request, &policy.weights, 1_000_000, cutoff);
                    prop_assert_eq!(direct, Ok(c.score));
                }
            }
            Err(reason) => prop_assert!(expected.is_empty(), "{:?} but the reference found {:?}", reason, expected),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A snapshot patched with changed nodes routes exactly like one built afresh.
    #[test]
    fn patched_snapshots_route_like_fresh_ones(
        before in fleet_strategy(),
        after in fleet_strategy(),
        requests in proptest::collection::vec(request_strategy(), 1..8),
    ) {
        let dedup = |mut nodes: Vec<NodeLoad>| {
            nodes.sort_by_key(|x| x.node);
            nodes.dedup_by_key(|x| x.node);
            nodes
        };
        let before = dedup(before);
        // Changes for nodes the snapshot knows; others would need a full build.
        // Load changes keep a node's place (a move rebuilds the snapshot instead).
        let changes: Vec<Arc<NodeLoad>> = dedup(after)
            .into_iter()
            .filter_map(|mut n| {
                let old = before.iter().find(|b| b.node == n.node)?;
                n.latitude = old.latitude;
                n.longitude = old.longitude;
                Some(Arc::new(n))
            })
            .collect();
        let base = Fleet::build(before.iter().cloned().map(Arc::new).collect(), Policy::default(), 1_000_000);
        let patched = base.with_changes(&changes, 1_000_000).expect("every changed node is known");
        let mut merged = before.clone();
        for change in &changes {
            let at = merged.iter().position(|n| n.node == change.node).unwrap();
            merged[at] = (**change).clone();
        }
        let fresh = Fleet::build(merged.into_iter().map(Arc::new).collect(), Policy::default(), 1_000_000);
        for request in &requests {
            prop_assert_eq!(top3(&patched, request), top3(&fresh, request));
        }
        // Many small patches, going back and forth, end where one patch does — across the
        // points where the snapshot reshapes its tree.
        if !changes.is_empty() {
            let originals: Vec<Arc<NodeLoad>> = changes
                .iter()
                .map(|c| Arc::new(before.iter().find(|b| b.node == c.node).unwrap().clone()))
                .collect();
            let mut chained = base.with_changes(&[], 1_000_000).expect("no node changed");
            let mut patched_nodes = 0;
            while patched_nodes < 200 {
                for (back, forth) in originals.iter().zip(&changes) {
                    for node in [back, forth] {
                        chained = chained
                            .with_changes(std::slice::from_ref(node), 1_000_000)
                            .expect("a known node");
                        patched_nodes += 1;
                    }
                }
            }
            for request in &requests {
                prop_assert_eq!(top3(&chained, request), top3(&fresh, request));
            }
        }
        // Event time alone moving on turns nodes stale in a patched snapshot too.
        let later = base.with_changes(&[], 1_050_000).expect("no node changed");
        let later_fresh = Fleet::build(before.iter().cloned().map(Arc::new).collect(), Policy::default(), 1_050_000);
        for request in &requests {
            prop_assert_eq!(top3(&later, request), top3(&later_fresh, request));
        }
        let unknown = Arc::new(NodeLoad { node: Sym::new("never-seen"), ..blank() });
        prop_assert!(base.with_changes(&[unknown], 1).is_none());
        if let Some(first) = before.first() {
            let moved = Arc::new(NodeLoad {
                latitude: Some(first.latitude.unwrap_or(0.0) / 2.0 + 1.0),
                longitude: Some(1.0),
                ..first.clone()
            });
            prop_assert!(base.with_changes(&[moved], 1).is_none(), "a moved node needs a rebuild");
        }
    }
}

/// The best three nodes for `request` with their scores, or why there are none.
fn top3(fleet: &Fleet, request: &Request) -> Result<Vec<(Sym, Breakdown)>, NoNode> {
    fleet.route(request, 3).map(|r| {
        r.candidates
            .iter()
            .map(|c| (c.node.node, c.score))
            .collect()
    })
}

fn blank() -> NodeLoad {
    NodeLoad {
        node: Sym::new("blank"),
        tenant: Uuid::nil(),
        host: Sym::default(),
        seen_at: 0,
        cpu_tenths: 0,
        ram_current: 0,
        ram_max: 0,
        up_speed: 0,
        down_speed: 0,
        reported_bw_limit: 0,
        add_bandwidth: 0,
        pending_viewers: 0,
        latitude: None,
        longitude: None,
        location: Sym::default(),
        mode: NodeMode::Normal,
        healthy: true,
        capabilities: Vec::new(),
        streams: Vec::new(),
        connections: 0,
    }
}

fn update(node: &str, time: i64, up_speed: u64, streams: &[(&str, u64)]) -> LoadInput {
    LoadInput::Node {
        time,
        id: Uuid::from_u128(time as u128),
        tenant: Uuid::nil(),
        update: NodeUpdate {
            node: Sym::new(node),
            ram_max: 1 << 34,
            up_speed,
            is_healthy: true,
            connections: 10,
            streams: streams
                .iter()
                .map(|(s, bw)| NodeStream {
                    name: Sym::new(s),
                    viewers: 1,
                    inputs: 1,
                    bandwidth: *bw,
                    ..NodeStream::default()
                })
                .collect(),
            ..NodeUpdate::default()
        },
    }
}

/// Node, pending viewers, their bandwidth, and (stream, viewers, inputs) per stream.
type Summary = (Sym, u64, u64, Vec<(Sym, u64, u64)>);

/// A brute-force reading of the state's rules over every input at once.
fn reference_loads(inputs: &[LoadInput], watermark: i64) -> Vec<Summary> {
    let mut nodes: Vec<Sym> = inputs.iter().map(LoadInput::node).collect();
    nodes.sort();
    nodes.dedup();
    let mut out = Vec::new();
    for node in nodes {
        let mine: Vec<&LoadInput> = inputs.iter().filter(|i| i.node() == node).collect();
        let Some((stamp, update)) = mine
            .iter()
            .filter_map(|i| match i {
                LoadInput::Node {
                    time, id, update, ..
                } => Some(((*time, *id), update)),
                _ => None,
            })
            .max_by_key(|(stamp, _)| *stamp)
        else {
            continue;
        };
        let mut streams: Vec<(Sym, u64, u64)> = Vec::new();
        for s in &update.streams {
            if !streams.iter().any(|x| x.0 == s.name) {
                streams.push((s.name, s.viewers, s.inputs));
            }
        }
        let mut names: Vec<Sym> = mine
            .iter()
            .filter_map(|i| match i {
                LoadInput::Presence { stream, .. } => Some(*stream),
                _ => None,
            })
            .collect();
        names.sort();
        names.dedup();
        for name in names {
            let newest = mine
                .iter()
                .filter_map(|i| match i {
                    LoadInput::Presence {
                        stream,
                        time,
                        id,
                        viewers,
                        inputs,
                        ended,
                        ..
                    } if *stream == name && (*time, *id) > stamp => {
                        Some(((*time, *id), *viewers, *inputs, *ended))
                    }
                    _ => None,
                })
                .max_by_key(|p| p.0);
            if let Some((_, viewers, inputs, ended)) = newest {
                streams.retain(|s| s.0 != name);
                if !ended {
                    streams.push((name, viewers, inputs));
                }
            }
        }
        streams.sort();
        let mut pending = 0u64;
        let mut add = 0u64;
        let mut windows: Vec<Sym> = mine
            .iter()
            .filter_map(|i| match i {
                LoadInput::Decision { stream, .. } | LoadInput::Connect { stream, .. } => {
                    Some(*stream)
                }
                _ => None,
            })
            .collect();
        windows.sort();
        windows.dedup();
        for stream in windows {
            let mut events: Vec<((i64, Uuid), bool)> = mine
                .iter()
                .filter_map(|i| match i {
                    LoadInput::Decision {
                        stream: s,
                        time,
                        id,
                        ..
                    } if *s == stream => Some(((*time, *id), true)),
                    LoadInput::Connect {
                        stream: s,
                        time,
                        id,
                        ..
                    } if *s == stream => Some(((*time, *id), false)),
                    _ => None,
                })
                .filter(|e| e.0.0 > watermark - PENDING_MS)
                .collect();
            events.sort();
            events.dedup();
            let mut open = 0u64;
            for (_, decision) in events {
                open = if decision {
                    open + 1
                } else {
                    open.saturating_sub(1)
                };
            }
            // The stream's own figure counts while the stream is still on the node.
            let present = streams.iter().any(|s| s.0 == stream);
            let own = update
                .streams
                .iter()
                .find(|s| s.name == stream && present)
                .map(|s| s.bandwidth)
                .filter(|b| *b > 0);
            let estimate = own
                .unwrap_or(if update.up_speed > 0 {
                    update.up_speed / 10
                } else {
                    131_072
                })
                .clamp(65_536, 1_048_576);
            pending += open;
            add += open * estimate;
        }
        out.push((node, pending, add, streams));
    }
    out
}

fn input_strategy() -> impl Strategy<Value = LoadInput> {
    let node = (0usize..3).prop_map(|n| ["x", "y", "z"][n]);
    let stream = (0usize..3).prop_map(|s| STREAMS[s]);
    let time = 0i64..100_000;
    prop_oneof![
        (
            node.clone(),
            time.clone(),
            0u64..20_000_000,
            proptest::collection::vec(
                (
                    stream.clone(),
                    prop_oneof![Just(0u64), 10_000u64..2_000_000]
                ),
                0..3
            ),
            any::<u64>()
        )
            .prop_map(|(n, t, up, s, id)| {
                // Distinct updates get distinct ids (the same id is the same event).
                let mut input = update(n, t, up, &s);
                if let LoadInput::Node { id: slot, .. } = &mut input {
                    *slot = Uuid::from_u128(u128::from(id));
                }
                input
            }),
        (
            node.clone(),
            stream.clone(),
            time.clone(),
            0u64..9,
            0u64..2,
            any::<bool>(),
            any::<u64>()
        )
            .prop_map(
                |(n, s, t, viewers, inputs, ended, id)| LoadInput::Presence {
                    node: Sym::new(n),
                    stream: Sym::new(s),
                    time: t,
                    id: Uuid::from_u128(u128::from(id)),
                    viewers,
                    inputs,
                    ended
                }
            ),
        (node.clone(), stream.clone(), time.clone(), any::<u16>()).prop_map(|(n, s, t, id)| {
            LoadInput::Decision {
                node: Sym::new(n),
                stream: Sym::new(s),
                time: t,
                id: Uuid::from_u128(u128::from(id) << 20),
            }
        }),
        (node, stream, time, any::<u16>()).prop_map(|(n, s, t, id)| LoadInput::Connect {
            node: Sym::new(n),
            stream: Sym::new(s),
            time: t,
            id: Uuid::from_u128(u128::from(id) << 40)
        }),
    ]
}

/// The newest event time among `inputs` (0 when there are none).
fn newest_time(inputs: &[LoadInput]) -> i64 {
    inputs
        .iter()
        .map(|i| match i {
            LoadInput::Node { time, .. }
            | LoadInput::Presence { time, .. }
            | LoadInput::Decision { time, .. }
            | LoadInput::Connect { time, .. } => *time,
        })
        .max()
        .unwrap_or(0)
}

/// The last loads reported, as the reference states them.
fn summaries(last: &BTreeMap<Sym, NodeLoad>) -> Vec<Summary> {
    last.values()
        .map(|l| {
            let streams = l
                .streams
                .iter()
                .map(|s| (s.name, s.viewers, s.inputs))
                .collect();
            (l.node, l.pending_viewers, l.add_bandwidth, streams)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the order, the duplicates and the closes in between, the last loads each node
    /// reported equal the rules applied to all inputs at once.
    #[test]
    fn load_state_matches_the_reference(
        inputs in proptest::collection::vec(input_strategy(), 0..80),
        order in Just(()).prop_perturb(|_, mut rng| rng.random::<u64>()),
        closes in proptest::collection::vec(0usize..80, 0..5),
    ) {
        let mut shuffled = inputs.clone();
        // A deterministic shuffle from the drawn seed, plus a duplicate of the first input.
        let mut seed = order | 1;
        for i in (1..shuffled.len()).rev() {
            seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
            shuffled.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        if let Some(first) = inputs.first() {
            shuffled.push(first.clone());
        }
        let watermark = newest_time(&inputs);
        let mut state = FoghornState::default();
        let mut last: BTreeMap<Sym, NodeLoad> = Default::default();
        let mut out = Vec::new();
        for (i, input) in shuffled.into_iter().enumerate() {
            state.apply(input);
            if closes.contains(&i) {
                // An early close sees a lower watermark: only what arrived so far.
                state.close(i64::MIN, &mut out);
            }
        }
        state.close(watermark, &mut out);
        for load in out {
            last.insert(load.node, load);
        }
        let want = reference_loads(&inputs, watermark);
        let got = summaries(&last);
        prop_assert_eq!(got, want);
    }
}

/// A routing decision for stream `a` on node `x` at `time`.
fn decision_on_x(time: i64) -> LoadInput {
    LoadInput::Decision {
        node: Sym::new("x"),
        stream: Sym::new("a"),
        time,
        id: Uuid::from_u128(time as u128),
    }
}

#[test]
fn decisions_raise_the_penalty_until_viewers_arrive_or_time_passes() {
    let mut state = FoghornState::default();
    let mut out = Vec::new();
    state.apply(update("x", 0, 0, &[("a", 300_000)]));
    for t in [1_000, 2_000] {
        state.apply(decision_on_x(t));
    }
    state.close(2_000, &mut out);
    assert_eq!(
        out.last().map(|l| (l.pending_viewers, l.add_bandwidth)),
        Some((2, 600_000))
    );
    state.apply(LoadInput::Connect {
        node: Sym::new("x"),
        stream: Sym::new("a"),
        time: 2_500,
        id: Uuid::from_u128(7),
    });
    state.close(2_500, &mut out);
    assert_eq!(out.last().map(|l| l.pending_viewers), Some(1));
    // 30 s after the second decision it is abandoned, and the watermark alone says so.
    state.close(32_000, &mut out);
    assert_eq!(
        out.last().map(|l| (l.pending_viewers, l.add_bandwidth)),
        Some((0, 0))
    );
}

/// The fleet with unique node ids and one stream per node: `stream` on the `holders`, `other`
/// on the rest. A node that stops or starts holding `stream` keeps its number of streams, so
/// the move is one name for another in the same place.
fn with_holders(nodes: Vec<NodeLoad>, holders: &[usize], stream: Sym, other: Sym) -> Vec<NodeLoad> {
    nodes
        .into_iter()
        .enumerate()
        .map(|(i, mut n)| {
            n.node = Sym::new(&format!("holder-test-{i:03}"));
            n.streams.clear();
            n.streams.push(NodeStream {
                name: if holders.contains(&i) { stream } else { other },
                viewers: 1,
                ..NodeStream::default()
            });
            n
        })
        .collect()
}

fn big_fleet_strategy() -> impl Strategy<Value = Vec<NodeLoad>> {
    (60usize..240).prop_flat_map(|count| (0..count).map(node_strategy).collect::<Vec<_>>())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Only the few nodes carrying a stream can have its bonus, so the tree's bounds leave it
    /// out and those nodes are considered apart: with a large bonus, fleets big enough for the
    /// bounds to pass over most cells, and holders that move between patches, routing still
    /// equals the plain formula.
    #[test]
    fn the_stream_bonus_reaches_holders_wherever_they_are(
        nodes in big_fleet_strategy(),
        holders in proptest::collection::vec(0usize..240, 0..6),
        moved in proptest::collection::vec(0usize..240, 0..6),
        bonus in 100u64..3000,
        clients in proptest::collection::vec(
            proptest::option::weighted(0.9, (-90.0f64..90.0, -180.0f64..180.0)), 1..6),
        n in 1usize..4,
    ) {
        let (stream, other) = (Sym::new(STREAMS[0]), Sym::new(STREAMS[1]));
        let policy = Policy {
            weights: Weights { bonus, ..Weights::default() },
            cutoff: Cutoff::default(),
        };
        let before = with_holders(nodes.clone(), &holders, stream, other);
        let after = with_holders(nodes, &moved, stream, other);
        let base = Fleet::build(before.iter().cloned().map(Arc::new).collect(), policy, 1_000_000);
        let changes: Vec<Arc<NodeLoad>> = after.iter().cloned().map(Arc::new).collect();
        let patched = base.with_changes(&changes, 1_000_000).expect("every node is known");
        for (fleet, nodes) in [(&base, &before), (&patched, &after)] {
            for client in &clients {
                let request = Request::view(
                    Some(STREAMS[0]),
                    client.map(|(lat, lon)| Place::new(lat, lon).expect("in range")),
                );
                let want: Vec<(Sym, u64)> = reference_ranking(nodes, &request, &policy, 1_000_000)
                    .into_iter()
                    .take(n)
                    .collect();
                let got: Vec<(Sym, u64)> = fleet
                    .route(&request, n)
                    .map(|r| r.candidates.iter().map(|c| (c.node.node, c.score.total)).collect())
                    .unwrap_or_default();
                prop_assert_eq!(got, want);
            }
        }
    }
}

/// Equal scores go to the lower node id, also when the search meets the higher one first and
/// no geo term separates them (a client without a place).
#[test]
fn ties_without_a_geo_term_go_to_the_lower_id_whatever_the_search_order() {
    for direction in [1.0, -1.0] {
        let nodes: Vec<Arc<NodeLoad>> = (0..64)
            .map(|i| {
                Arc::new(NodeLoad {
                    node: Sym::new(&format!("tie-{i:02}")),
                    seen_at: 1_000_000,
                    ram_max: 1 << 30,
                    latitude: Some(direction * (-60.0 + 2.0 * f64::from(i))),
                    longitude: Some(direction * (170.0 - 5.0 * f64::from(i))),
                    ..blank()
                })
            })
            .collect();
        let fleet = Fleet::build(nodes, Policy::default(), 1_000_000);
        for stream in [None, Some(STREAMS[0])] {
            let routed = fleet.route(&Request::view(stream, None), 2).expect("nodes");
            let ids: Vec<&str> = routed
                .candidates
                .iter()
                .map(|c| c.node.node.as_str())
                .collect();
            assert_eq!(
                ids,
                ["tie-00", "tie-01"],
                "direction {direction}, stream {stream:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Event time moving on with no new input lets decisions and connects leave the window on
    /// time, at any step (window edges inside an expiry bucket or on its boundary).
    #[test]
    fn the_watermark_alone_expires_pending_viewers_like_the_reference(
        inputs in proptest::collection::vec(input_strategy(), 0..60),
        steps in proptest::collection::vec(prop_oneof![1i64..20, 20i64..40_000], 1..12),
    ) {
        let start = newest_time(&inputs);
        let mut state = FoghornState::default();
        for input in inputs.iter().cloned() {
            state.apply(input);
        }
        let mut last: BTreeMap<Sym, NodeLoad> = Default::default();
        let mut watermark = start;
        for step in std::iter::once(0).chain(steps) {
            watermark += step;
            let mut out = Vec::new();
            state.close(watermark, &mut out);
            for load in out {
                last.insert(load.node, load);
            }
            let got = summaries(&last);
            prop_assert_eq!(got, reference_loads(&inputs, watermark), "at watermark {}", watermark);
        }
    }
}

/// A window edge inside an expiry bucket: the bucket's older event leaves first, the newer
/// one when the watermark passes it, with no input in between.
#[test]
fn events_of_one_expiry_bucket_leave_one_by_one() {
    let mut state = FoghornState::default();
    let mut out = Vec::new();
    state.apply(update("x", 0, 0, &[("a", 300_000)]));
    for t in [1_000, 1_005] {
        state.apply(decision_on_x(t));
    }
    let mut pending_at = |watermark: i64| {
        state.close(watermark, &mut out);
        out.last().map(|l| l.pending_viewers)
    };
    assert_eq!(pending_at(1_005), Some(2));
    assert_eq!(pending_at(31_000), Some(1));
    assert_eq!(pending_at(31_004), Some(1));
    assert_eq!(pending_at(31_005), Some(0));
}
