//! `FoghornState`: per node, the newest poller update, stream presence and pending viewers.
//!
//! Records are routed by node id, so one worker holds everything about a node. The state is a
//! function of the multiset of inputs and the watermark:
//! - the node's figures are those of its newest update by (event time, event id);
//! - a stream's presence on the node is the newest of the node's stream map and the stream
//!   events reported from that node (a `stream_end` removes it);
//! - pending virtual viewers are the routing decisions of the last 30 s of event time that no
//!   `viewer_connect` of the same stream on the same node has answered yet, matching in time
//!   order, each connect answering the oldest open decision before it. Each one adds the
//!   node's estimate of a viewer's bandwidth to `add_bandwidth`.

use std::collections::BTreeMap;

use hashbrown::{HashMap, HashSet};
use keel_operators::maintain::EpochState;
use keel_operators::sym::Sym;
use keel_sources::event::{NodeStream, NodeUpdate};
use rustc_hash::FxBuildHasher;
use uuid::Uuid;

use super::window::{Stamp, Window};
use super::{LoadInput, NodeLoad, PENDING_MS, viewer_bandwidth};

#[derive(Debug, Default)]
struct NodeState {
    latest: Option<(Stamp, Uuid, NodeUpdate)>,
    /// Stream events newer than the latest update: stamp, viewers, inputs, ended.
    presence: HashMap<Sym, (Stamp, u64, u64, bool), FxBuildHasher>,
    /// Decisions and connects within the pending window, per stream.
    window: HashMap<Sym, Pending, FxBuildHasher>,
    emitted: Option<NodeLoad>,
    /// The update or the presence changed since the last close (not only the window).
    figures_changed: bool,
}

/// One stream's window on a node.
#[derive(Debug, Default)]
struct Pending {
    events: Window,
    /// The expiry bucket this window was last queued in (to queue it once per bucket).
    queued: Option<i64>,
}

impl NodeState {
    fn newer_than_update(&self, stamp: Stamp) -> bool {
        self.latest.as_ref().is_none_or(|(s, _, _)| stamp > *s)
    }

    /// Drops the events of `stream`'s window that are at or before `horizon`; returns whether
    /// any were. `bucket` is the expiry bucket being emptied, if all of it is due: the window
    /// is then no longer queued there.
    fn prune(&mut self, stream: Sym, horizon: i64, bucket: Option<i64>) -> bool {
        let Some(pending) = self.window.get_mut(&stream) else {
            return false;
        };
        let dropped = pending.events.expire(horizon);
        if pending.events.is_empty() {
            self.window.remove(&stream);
        } else if bucket.is_some() && pending.queued == bucket {
            pending.queued = None;
        }
        dropped
    }

    fn load(&self) -> Option<NodeLoad> {
        let (stamp, tenant, update) = self.latest.as_ref()?;
        let mut streams: Vec<NodeStream> = update.streams.clone();
        streams.sort_by_key(|s| s.name);
        streams.dedup_by_key(|s| s.name);
        for (name, &(_, viewers, inputs, ended)) in &self.presence {
            let at = streams.binary_search_by(|s| s.name.cmp(name));
            match (at, ended) {
                (Ok(i), true) => {
                    streams.remove(i);
                }
                (Ok(i), false) => {
                    streams[i].viewers = viewers;
                    streams[i].inputs = inputs;
                }
                (Err(i), false) => streams.insert(
                    i,
                    NodeStream {
                        name: *name,
                        viewers,
                        inputs,
                        ..NodeStream::default()
                    },
                ),
                (Err(_), true) => {}
            }
        }
        let mut load = NodeLoad {
            node: update.node,
            tenant: *tenant,
            host: update.base_url,
            seen_at: stamp.0,
            cpu_tenths: update.cpu_tenths,
            ram_current: update.ram_current,
            ram_max: update.ram_max,
            up_speed: update.up_speed,
            down_speed: update.down_speed,
            reported_bw_limit: update.bw_limit,
            add_bandwidth: 0,
            pending_viewers: 0,
            latitude: update.latitude,
            longitude: update.longitude,
            location: update.location,
            mode: update.mode,
            healthy: update.is_healthy,
            capabilities: update.capabilities.clone(),
            streams,
            connections: update.connections,
        };
        (load.pending_viewers, load.add_bandwidth) = self.pending(&load);
        Some(load)
    }

    /// Pending viewers and their bandwidth, with estimates from `figures`.
    fn pending(&self, figures: &NodeLoad) -> (u64, u64) {
        let (mut viewers, mut bandwidth) = (0u64, 0u64);
        for (stream, pending) in &self.window {
            let open = pending.events.pending();
            if open > 0 {
                viewers += open;
                bandwidth = bandwidth
                    .saturating_add(open.saturating_mul(viewer_bandwidth(figures, *stream)));
            }
        }
        (viewers, bandwidth)
    }

    /// The load to report now, if it changed. When only the window changed, the figures of
    /// the last report are reused, so a viewer connecting costs no copy of the node's figures.
    fn changed_load(&mut self) -> Option<NodeLoad> {
        if !std::mem::take(&mut self.figures_changed)
            && let Some(emitted) = &self.emitted
        {
            let pending = self.pending(emitted);
            if pending == (emitted.pending_viewers, emitted.add_bandwidth) {
                return None;
            }
            let mut load = emitted.clone();
            (load.pending_viewers, load.add_bandwidth) = pending;
            self.emitted = Some(load.clone());
            return Some(load);
        }
        let load = self.load();
        if load.is_some() && load != self.emitted {
            self.emitted.clone_from(&load);
            return load;
        }
        None
    }
}

/// The per-worker state behind [`super::foghorn`].
#[derive(Debug, Default)]
pub struct FoghornState {
    nodes: HashMap<Sym, NodeState, FxBuildHasher>,
    dirty: HashSet<Sym, FxBuildHasher>,
    /// (node, stream) windows by the expiry bucket of their decisions and connects: when the
    /// watermark moves, only the windows of the buckets it reaches are looked at.
    expiry: BTreeMap<i64, Vec<(Sym, Sym)>>,
    watermark: i64,
}

/// Width of an expiry bucket, ms of event time.
const EXPIRY_BUCKET_MS: i64 = 10;

impl EpochState for FoghornState {
    type Input = LoadInput;
    type Output = NodeLoad;

    fn apply(&mut self, input: LoadInput) {
        let node = input.node();
        let decision = matches!(input, LoadInput::Decision { .. });
        let state = self.nodes.entry(node).or_default();
        match input {
            LoadInput::Node {
                time,
                id,
                tenant,
                update,
            } => {
                let stamp = (time, id);
                if !state.newer_than_update(stamp) {
                    return;
                }
                state.presence.retain(|_, p| p.0 > stamp);
                state.latest = Some((stamp, tenant, update));
                state.figures_changed = true;
            }
            LoadInput::Presence {
                stream,
                time,
                id,
                viewers,
                inputs,
                ended,
                ..
            } => {
                let stamp = (time, id);
                if !state.newer_than_update(stamp) {
                    return;
                }
                let entry = state
                    .presence
                    .entry(stream)
                    .or_insert((stamp, viewers, inputs, ended));
                if stamp >= entry.0 {
                    *entry = (stamp, viewers, inputs, ended);
                }
                state.figures_changed = true;
            }
            LoadInput::Decision {
                stream, time, id, ..
            }
            | LoadInput::Connect {
                stream, time, id, ..
            } => {
                let pending = state.window.entry(stream).or_default();
                pending.events.insert((time, id), decision);
                let bucket = time.div_euclid(EXPIRY_BUCKET_MS);
                if pending.queued != Some(bucket) {
                    pending.queued = Some(bucket);
                    self.expiry.entry(bucket).or_default().push((node, stream));
                }
            }
        }
        self.dirty.insert(node);
    }

    fn close(&mut self, watermark: i64, output: &mut Vec<NodeLoad>) {
        self.watermark = self.watermark.max(watermark);
        // Events leave a window only through the buckets the horizon has reached (the last of
        // them perhaps only in part): a late event is queued in its own bucket, so this also
        // drops events that arrived already outside the window.
        let horizon = self.watermark.saturating_sub(PENDING_MS);
        while let Some(entry) = self.expiry.first_entry() {
            let bucket = *entry.key();
            if bucket.saturating_mul(EXPIRY_BUCKET_MS) > horizon {
                break;
            }
            let whole = (bucket + 1).saturating_mul(EXPIRY_BUCKET_MS) <= horizon + 1;
            for &(node, stream) in entry.get() {
                if let Some(state) = self.nodes.get_mut(&node)
                    && state.prune(stream, horizon, whole.then_some(bucket))
                {
                    self.dirty.insert(node);
                }
            }
            if !whole {
                break;
            }
            entry.remove();
        }
        let recompute: Vec<Sym> = self.dirty.drain().collect();
        for node in recompute {
            if let Some(state) = self.nodes.get_mut(&node) {
                output.extend(state.changed_load());
            }
        }
    }
}
