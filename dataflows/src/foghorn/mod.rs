//! Foghorn: every node's live load, kept by the dataflow, and the balancer that routes on it.
//!
//! ```text
//! node updates, stream events, viewer connects, routing decisions
//!     ──(by node)──> FoghornState ──(changed NodeLoad per epoch)──> publish_fleet (worker 0)
//!                                                                    └─> FleetCell (lock-free)
//! request ──> Fleet::route ──> ranked candidates ──> load_balancing event back into the input
//! ```
//!
//! The score is the platform's (a port of MistServer's balancer), in unsigned integers:
//!
//! ```text
//! cpu   = W_cpu − cpu_tenths·W_cpu/1000
//! ram   = W_ram − ram_current·W_ram/ram_max                  (ram_max = 0: host invalid)
//! bw    = W_bw  − (up_speed + add_bandwidth)·W_bw/bw_limit   (reject when ≥ bw_limit; 0 → 128 MiB/s)
//! geo   = W_geo − W_geo·acos(sin φ1 sin φ2 + cos φ1 cos φ2 cos(λ1−λ2))/π  (both places known)
//! bonus = W_bonus when the node already carries the stream
//! score = cpu + ram + bw + geo + bonus + Σ tag adjustments (never below 0); ties → lower node id
//! ```
//!
//! `add_bandwidth` is the current platform's virtual-viewer penalty: each routing decision is a
//! pending viewer for 30 s of event time unless a `viewer_connect` of that stream on that node
//! answers it; each pending viewer adds the node's per-viewer bandwidth estimate (the stream's
//! own figure, else upload over connections, else 128 KiB/s; clamped to 64 KiB/s–1 MiB/s).

pub mod fleet;
mod kdtree;
pub mod score;
mod state;
mod window;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use keel_operators::maintain::{GlobalWatermark, Maintain};
use keel_operators::sym::Sym;
use keel_sources::event::{Event, EventKind, NodeMode, NodeStream};
use rustc_hash::FxBuildHasher;
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use uuid::Uuid;

pub use fleet::{Candidate, Fleet, FleetCell, NoNode, Policy, Routed};
pub use score::{Breakdown, Cutoff, Place, Purpose, Reject, Request, TagAdjust, Weights};
pub use state::FoghornState;

/// A node without an update for this long (event time) is stale.
pub const STALE_MS: i64 = 90_000;
/// A routing decision no viewer answered within this long (event time) is abandoned.
pub const PENDING_MS: i64 = 30_000;
/// Per-viewer bandwidth estimate bounds and default, bytes/s.
pub const VIEWER_BW_MIN: u64 = 64 * 1024;
/// Upper bound of the estimate.
pub const VIEWER_BW_MAX: u64 = 1024 * 1024;
/// The estimate when nothing better is known (1 Mbit/s).
pub const VIEWER_BW_DEFAULT: u64 = 128 * 1024;

/// One node's load as routing sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Node id.
    pub node: Sym,
    /// Owning tenant (the cluster owner) from the node's updates.
    pub tenant: Uuid,
    /// Base URL the node reports.
    pub host: Sym,
    /// Event time of the newest update, ms.
    pub seen_at: i64,
    /// CPU, tenths of a percent.
    pub cpu_tenths: u32,
    /// RAM in use, bytes.
    pub ram_current: u64,
    /// RAM installed, bytes.
    pub ram_max: u64,
    /// Upload, bytes/s.
    pub up_speed: u64,
    /// Download, bytes/s.
    pub down_speed: u64,
    /// Bandwidth limit as reported (0 = not set; see [`NodeLoad::bw_limit`]).
    pub reported_bw_limit: u64,
    /// Bandwidth of pending virtual viewers, bytes/s.
    pub add_bandwidth: u64,
    /// Pending virtual viewers.
    pub pending_viewers: u64,
    /// Latitude.
    pub latitude: Option<f64>,
    /// Longitude.
    pub longitude: Option<f64>,
    /// Location name.
    pub location: Sym,
    /// Operational mode.
    pub mode: NodeMode,
    /// Health flag from the node.
    pub healthy: bool,
    /// Capabilities and roles (also the node's tags for tag adjustments).
    pub capabilities: Vec<Sym>,
    /// Streams on the node, by name.
    pub streams: Vec<NodeStream>,
    /// Viewer connections open.
    pub connections: u64,
}

/// True when an update seen at `seen_at` is more than [`STALE_MS`] older than `watermark`.
pub fn stale(seen_at: i64, watermark: i64) -> bool {
    watermark.saturating_sub(seen_at) > STALE_MS
}

impl NodeLoad {
    /// The bandwidth limit in force: the reported one, or 128 MiB/s when none was reported.
    pub fn bw_limit(&self) -> u64 {
        if self.reported_bw_limit == 0 {
            score::DEFAULT_BW_LIMIT
        } else {
            self.reported_bw_limit
        }
    }

    /// True when the newest update is more than [`STALE_MS`] older than `watermark`.
    pub fn is_stale(&self, watermark: i64) -> bool {
        stale(self.seen_at, watermark)
    }

    /// The node's entry for `stream`. Symbols compare as numbers for equality but as text for
    /// order, so short maps are scanned and only long ones searched.
    pub fn stream(&self, stream: Sym) -> Option<&NodeStream> {
        if self.streams.len() <= 64 {
            return self.streams.iter().find(|s| s.name == stream);
        }
        self.streams
            .binary_search_by(|s| s.name.cmp(&stream))
            .ok()
            .map(|i| &self.streams[i])
    }

    /// The node's coordinates, when it reported valid ones.
    pub fn place(&self) -> Option<Place> {
        Place::new(self.latitude?, self.longitude?).ok()
    }

    /// Viewers over all streams.
    pub fn viewers(&self) -> u64 {
        self.streams.iter().map(|s| s.viewers).sum()
    }

    /// The host name the Mist API answers with: the base URL without scheme, port or path;
    /// the node id when no URL was reported.
    pub fn host_name(&self) -> &'static str {
        let url = self.host.as_str();
        if url.is_empty() {
            return self.node.as_str();
        }
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let host = rest.split(['/', '?', '#']).next().unwrap_or(rest);
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    }
}

/// One pending viewer's bandwidth estimate on `node` for `stream`.
pub fn viewer_bandwidth(node: &NodeLoad, stream: Sym) -> u64 {
    let own = node.stream(stream).map(|s| s.bandwidth).filter(|&b| b > 0);
    let estimate = own.unwrap_or_else(|| {
        let viewers = if node.connections > 0 {
            node.connections
        } else {
            node.viewers()
        };
        if viewers > 0 && node.up_speed > 0 {
            node.up_speed / viewers
        } else {
            VIEWER_BW_DEFAULT
        }
    });
    estimate.clamp(VIEWER_BW_MIN, VIEWER_BW_MAX)
}

/// What the load state absorbs, derived from events by reference (only node updates copy).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LoadInput {
    /// A node poller update.
    Node {
        /// Event time.
        time: i64,
        /// Event id.
        id: Uuid,
        /// Tenant of the update.
        tenant: Uuid,
        /// The update.
        update: keel_sources::event::NodeUpdate,
    },
    /// A stream's presence reported from a node.
    Presence {
        /// Node.
        node: Sym,
        /// Stream.
        stream: Sym,
        /// Event time.
        time: i64,
        /// Event id.
        id: Uuid,
        /// Viewers on the node.
        viewers: u64,
        /// Inputs on the node.
        inputs: u64,
        /// The stream ended there.
        ended: bool,
    },
    /// A routing decision that sent a viewer to a node.
    Decision {
        /// Node chosen.
        node: Sym,
        /// Stream (empty when none was named).
        stream: Sym,
        /// Event time.
        time: i64,
        /// Event id.
        id: Uuid,
    },
    /// A viewer connected on a node.
    Connect {
        /// Node.
        node: Sym,
        /// Stream.
        stream: Sym,
        /// Event time.
        time: i64,
        /// Event id.
        id: Uuid,
    },
}

impl LoadInput {
    /// The load input an event carries, if any.
    pub fn from_event(event: &Event) -> Option<LoadInput> {
        let (time, id) = (event.time, event.id);
        match &event.kind {
            EventKind::NodeUpdate(update) => Some(LoadInput::Node {
                time,
                id,
                tenant: event.tenant,
                update: update.clone(),
            }),
            EventKind::StreamUpdate(e) if !e.node.is_empty() => Some(LoadInput::Presence {
                node: e.node,
                stream: e.stream.internal_name,
                time,
                id,
                viewers: u64::from(e.viewers),
                inputs: u64::from(e.inputs),
                ended: false,
            }),
            EventKind::StreamEnd(e) if !e.node.is_empty() => Some(LoadInput::Presence {
                node: e.node,
                stream: e.stream.internal_name,
                time,
                id,
                viewers: 0,
                inputs: 0,
                ended: true,
            }),
            EventKind::ViewerConnect(e) if !e.node.is_empty() => Some(LoadInput::Connect {
                node: e.node,
                stream: e.stream.internal_name,
                time,
                id,
            }),
            EventKind::Routing(r)
                if !r.selected_node.is_empty()
                    && matches!(r.status.as_str(), "success" | "redirect") =>
            {
                Some(LoadInput::Decision {
                    node: r.selected_node,
                    stream: r.stream.map(|s| s.internal_name).unwrap_or_default(),
                    time,
                    id,
                })
            }
            _ => None,
        }
    }

    /// The node the input is about.
    pub fn node(&self) -> Sym {
        match self {
            LoadInput::Node { update, .. } => update.node,
            LoadInput::Presence { node, .. }
            | LoadInput::Decision { node, .. }
            | LoadInput::Connect { node, .. } => *node,
        }
    }
}

/// Builds the load-state dataflow: the node loads that changed, per closed epoch. `watermarks`
/// carries each worker's newest event time per epoch (as for Periscope).
pub fn foghorn<'scope>(
    loads: StreamVec<'scope, u64, LoadInput>,
    watermarks: StreamVec<'scope, u64, i64>,
) -> StreamVec<'scope, u64, NodeLoad> {
    loads.maintain(
        watermarks.global_watermark(),
        "FoghornLoad",
        |input: &LoadInput| input.node().stable_hash(),
        FoghornState::default(),
    )
}

/// How often a changed fleet is published at most, and how often a moved watermark alone is.
#[derive(Clone, Copy, Debug)]
pub struct PublishEvery {
    /// Least time between snapshots when nodes changed.
    pub changes: Duration,
    /// Least time between snapshots when only event time moved.
    pub watermark: Duration,
}

impl Default for PublishEvery {
    fn default() -> Self {
        PublishEvery {
            changes: Duration::from_millis(5),
            watermark: Duration::from_secs(1),
        }
    }
}

/// `watermarks` are the raw per-worker marks (worker 0 takes their maximum).
///
/// Applies node changes on worker 0 and publishes fleet snapshots into `cell` once their epoch
/// is complete, at most as often as `every` allows. `cell` is `None` on the other workers.
pub fn publish_fleet<'scope>(
    changes: StreamVec<'scope, u64, NodeLoad>,
    watermarks: StreamVec<'scope, u64, i64>,
    cell: Option<Arc<FleetCell>>,
    every: PublishEvery,
) -> StreamVec<'scope, u64, ()> {
    changes.binary_frontier::<_, CapacityContainerBuilder<Vec<()>>, _, _, _, _>(
        watermarks,
        Exchange::new(|_: &NodeLoad| 0),
        Exchange::new(|_: &i64| 0),
        "FoghornPublish",
        move |_, _| {
            let mut nodes: HashMap<Sym, Arc<NodeLoad>, FxBuildHasher> = HashMap::default();
            let mut pending: BTreeMap<u64, Vec<NodeLoad>> = BTreeMap::new();
            let mut marks: BTreeMap<u64, i64> = BTreeMap::new();
            let mut watermark = i64::MIN;
            let mut published_mark = i64::MIN;
            let mut dirty = false;
            let mut changed: HashMap<Sym, Arc<NodeLoad>, FxBuildHasher> = HashMap::default();
            let mut last = Instant::now()
                .checked_sub(Duration::from_secs(3600))
                .unwrap_or_else(Instant::now);
            move |(loads, frontier), (mark_input, mark_frontier), _output| {
                loads.for_each(|cap, data| {
                    if let Some(&time) = cap.least() {
                        pending.entry(time).or_default().append(data);
                    }
                });
                mark_input.for_each(|cap, data| {
                    if let Some(&time) = cap.least() {
                        let slot = marks.entry(time).or_insert(i64::MIN);
                        for mark in data.drain(..) {
                            *slot = (*slot).max(mark);
                        }
                    }
                });
                let Some(cell) = &cell else {
                    pending.clear();
                    marks.clear();
                    return;
                };
                let complete = |t: &u64| {
                    !frontier.frontier().less_equal(t) && !mark_frontier.frontier().less_equal(t)
                };
                while let Some((&time, _)) = pending.first_key_value() {
                    if !complete(&time) {
                        break;
                    }
                    for load in pending.pop_first().map(|(_, v)| v).unwrap_or_default() {
                        let load = Arc::new(load);
                        nodes.insert(load.node, Arc::clone(&load));
                        changed.insert(load.node, load);
                    }
                    dirty = true;
                }
                while let Some((&time, &mark)) = marks.first_key_value() {
                    if !complete(&time) {
                        break;
                    }
                    marks.pop_first();
                    watermark = watermark.max(mark);
                }
                let elapsed = last.elapsed();
                // When the input has ended, whatever is left is published at once.
                let finished =
                    frontier.frontier().is_empty() && mark_frontier.frontier().is_empty();
                let due = (dirty && (elapsed >= every.changes || finished))
                    || (watermark > published_mark && (elapsed >= every.watermark || finished));
                if due {
                    let changes: Vec<Arc<NodeLoad>> =
                        changed.drain().map(|(_, load)| load).collect();
                    cell.publish_changes(&changes, || nodes.values().cloned().collect(), watermark);
                    published_mark = watermark;
                    dirty = false;
                    last = Instant::now();
                }
            }
        },
    )
}

#[cfg(test)]
mod tests;
