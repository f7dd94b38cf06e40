//! The fleet snapshot routing reads, and the cell that publishes it without locks for readers.
//!
//! A [`Fleet`] is immutable: every node's load and the static part of its score (cpu + ram +
//! bw, which depends only on the node and the weights), with the nodes that have a place in a
//! k-d tree over place and static score (`kdtree`) and the few without one in a list
//! by static score. Routing opens the tree's cells best bound first and passes over every cell
//! and node that could not beat the candidates it holds even with every positive tag adjustment
//! (and, for a client with a place, the best geo term the cell allows); the nodes carrying the
//! requested stream, the only ones its bonus can lift, are indexed per stream and considered
//! after the search. For the rest it calls [`score_node`](super::score::score_node)'s pieces, so the fast path and the
//! formula cannot drift apart. A patch (changed nodes) costs copies of the per-node arrays and
//! work on the changed nodes only: nothing is re-sorted.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::{ArcSwap, Guard};
use hashbrown::HashMap;
use keel_operators::sym::Sym;
use rustc_hash::FxBuildHasher;
use serde::{Deserialize, Serialize};

use super::kdtree::Tree;
use super::score::{
    Breakdown, Cutoff, GeoCuts, Reject, Request, Trig, Weights, check_request, cos_angle, finish,
    gate, geo_of_cos, static_terms, tag_sum,
};
use super::{NodeLoad, stale};

/// Weights and the opt-in cutoff: what `/?weights=` and the config change at run time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Score weights.
    pub weights: Weights,
    /// Opt-in hard utilisation limits.
    pub cutoff: Cutoff,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    index: u32,
    cpu: u64,
    ram: u64,
    bw: u64,
    sum: u64,
    trig: Option<Trig>,
}

/// One ranked candidate.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// The node.
    pub node: Arc<NodeLoad>,
    /// Its score, term by term.
    pub score: Breakdown,
}

/// Why no node was chosen, in the platform's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoNode {
    /// No node with fresh, valid figures.
    MetricsNotReady,
    /// Every node that could serve is in maintenance or draining.
    Maintenance,
    /// No node advertises what the request needs.
    NoSuitableNode,
    /// Source selection found no node with an input for the stream.
    NoOrigin,
    /// Ingest: every node would pass 100 % CPU.
    Full,
    /// Every node that could serve is out of bandwidth.
    OutOfBandwidth,
}

impl NoNode {
    /// The message the platform gives.
    pub fn message(self) -> &'static str {
        match self {
            NoNode::MetricsNotReady => "node metrics not ready",
            NoNode::Maintenance => "all suitable nodes are in maintenance/draining",
            NoNode::NoSuitableNode => "no suitable node",
            NoNode::NoOrigin => "can't find origin for stream (not present / no active inputs)",
            NoNode::Full => "all suitable nodes are too busy for another ingest",
            NoNode::OutOfBandwidth => "all suitable nodes are out of bandwidth",
        }
    }

    fn from_furthest(reject: Option<Reject>) -> NoNode {
        match reject {
            None | Some(Reject::Invalid | Reject::Stale | Reject::Unhealthy) => {
                NoNode::MetricsNotReady
            }
            Some(Reject::Mode) => NoNode::Maintenance,
            Some(Reject::Capability | Reject::Cutoff) => NoNode::NoSuitableNode,
            Some(Reject::NoOrigin) => NoNode::NoOrigin,
            Some(Reject::Full) => NoNode::Full,
            Some(Reject::Bandwidth) => NoNode::OutOfBandwidth,
        }
    }
}

/// The result of one routing question.
#[derive(Clone, Debug)]
pub struct Routed {
    /// Best first; ties go to the lower node id.
    pub candidates: Vec<Candidate>,
    /// True when the opt-in cutoff excluded every node and the plain gradient decided.
    pub cutoff_fallback: bool,
}

/// An immutable snapshot of the fleet's load.
#[derive(Debug)]
pub struct Fleet {
    built: Instant,
    policy: Policy,
    watermark: i64,
    nodes: Vec<Arc<NodeLoad>>,
    /// Each node's index by id (shared by the patches of one build, which keep the order).
    positions: Arc<HashMap<Sym, u32, FxBuildHasher>>,
    /// Static terms (or why there are none) by node index.
    entries: Vec<Result<Entry, Reject>>,
    /// When each node was last heard from, by node index: staleness without reading the nodes.
    seen_at: Vec<i64>,
    /// Each node's static sum by node index (0 when it has none): the stream bonus pass reads
    /// it for the few holders rather than their entries.
    sums: Vec<u64>,
    /// Routable nodes without a place, best static sum first.
    placeless: Vec<Entry>,
    /// The nodes carrying each stream (indices): the only ones a request for it can give the
    /// stream bonus, so the tree's bounds leave the bonus out and these are considered apart.
    holders: Arc<Holders>,
    /// Nodes with a place, for clients with one.
    tree: Tree,
    /// Node changes patched into the tree's bounds since it was shaped.
    tree_age: usize,
    /// Which nodes' geo terms surely fall short, for the policy's geo weight.
    cuts: Arc<GeoCuts>,
    /// How many nodes fail each check on their static terms alone, by [`Reject`] in order.
    rejected: [u32; REJECTS.len()],
}

/// A node with a place carrying a stream, with what the bonus pass needs to pass over it
/// without reading its entry.
#[derive(Clone, Copy, Debug)]
struct Holder {
    index: u32,
    trig: Trig,
}

type Holders = HashMap<Sym, Arc<Vec<Holder>>, FxBuildHasher>;

fn trig_of(node: &NodeLoad) -> Option<Trig> {
    node.place().map(|p| Trig::new(p.latitude, p.longitude))
}

/// The placed nodes carrying each stream (those without a place are all considered anyway).
fn holders_of(nodes: &[Arc<NodeLoad>]) -> Holders {
    let mut lists: HashMap<Sym, Vec<Holder>, FxBuildHasher> = HashMap::default();
    for (index, node) in nodes.iter().enumerate() {
        let Some(trig) = trig_of(node) else {
            continue;
        };
        let index = index as u32;
        for stream in &node.streams {
            let list = lists.entry(stream.name).or_default();
            if list.last().is_none_or(|h| h.index != index) {
                list.push(Holder { index, trig });
            }
        }
    }
    lists.into_iter().map(|(s, l)| (s, Arc::new(l))).collect()
}

fn sum_of(entry: &Result<Entry, Reject>) -> u64 {
    entry.as_ref().map_or(0, |e| e.sum)
}

/// Moves node `at` in `holders` from the streams of `old` to those of `new` (same place).
fn rehold(holders: &mut Arc<Holders>, at: u32, old: &NodeLoad, new: &NodeLoad) {
    let Some(trig) = trig_of(new) else {
        return;
    };
    // Most updates change a node's loads, not which streams it carries: then nothing moves,
    // and equal names in the same places say so without a lookup per stream.
    let same_streams = old.streams.len() == new.streams.len()
        && old
            .streams
            .iter()
            .zip(&new.streams)
            .all(|(o, n)| o.name == n.name);
    if same_streams {
        return;
    }
    let carries = |node: &NodeLoad, name: Sym| node.stream(name).is_some();
    for stream in &old.streams {
        if !carries(new, stream.name) {
            let holders = Arc::make_mut(holders);
            if let Some(list) = holders.get_mut(&stream.name) {
                Arc::make_mut(list).retain(|h| h.index != at);
                if list.is_empty() {
                    holders.remove(&stream.name);
                }
            }
        }
    }
    for stream in &new.streams {
        if !carries(old, stream.name) {
            let list = Arc::make_mut(holders).entry(stream.name).or_default();
            if !list.iter().any(|h| h.index == at) {
                Arc::make_mut(list).push(Holder { index: at, trig });
            }
        }
    }
}

/// Every reason a node is refused, in their order (a reason's index is its discriminant).
const REJECTS: [Reject; 9] = [
    Reject::Invalid,
    Reject::Stale,
    Reject::Unhealthy,
    Reject::Mode,
    Reject::Capability,
    Reject::NoOrigin,
    Reject::Full,
    Reject::Bandwidth,
    Reject::Cutoff,
];

// The tally indexes by discriminant: the list must be the enum's order, to the last reason.
const _: () = {
    let mut i = 0;
    while i < REJECTS.len() {
        assert!(REJECTS[i] as usize == i);
        i += 1;
    }
    assert!(Reject::Cutoff as usize + 1 == REJECTS.len());
};

/// A node's entry: its static terms, or why no request can have it (its figures, or the
/// request-independent gate at `watermark`).
fn entry(index: u32, node: &NodeLoad, weights: &Weights, watermark: i64) -> Result<Entry, Reject> {
    let (cpu, ram, bw) = static_terms(node, weights)?;
    gate(node, watermark)?;
    Ok(Entry {
        index,
        cpu,
        ram,
        bw,
        sum: cpu + ram + bw,
        trig: node.place().map(|p| Trig::new(p.latitude, p.longitude)),
    })
}

fn unit(node: &NodeLoad) -> Option<[f64; 3]> {
    node.place()
        .map(|p| Trig::new(p.latitude, p.longitude).unit())
}

/// Highest static sum first; among equals the lower node id (nodes are sorted by id).
fn rank(a: &Entry, b: &Entry) -> std::cmp::Ordering {
    b.sum.cmp(&a.sum).then(a.index.cmp(&b.index))
}

/// The score a node must reach to enter `top` once it holds `n` candidates (a tie may still
/// win on the node id); `None` while there is room.
fn bar(top: &[Candidate], n: usize) -> Option<u64> {
    (top.len() == n).then(|| top.last().map_or(0, |c| c.score.total))
}

/// The routable nodes without a place, best static sum first.
fn placeless_of(entries: &[Result<Entry, Reject>]) -> Vec<Entry> {
    let mut placeless: Vec<Entry> = entries
        .iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.trig.is_none())
        .collect();
    placeless.sort_by(rank);
    placeless
}

/// Counts `entry` (+1) or takes it back (−1) in the tally of static refusals.
fn tally(rejected: &mut [u32; REJECTS.len()], entry: &Result<Entry, Reject>, add: bool) {
    if let Err(reject) = entry {
        let count = &mut rejected[*reject as usize];
        *count = if add { *count + 1 } else { *count - 1 };
    }
}

impl Fleet {
    /// Builds a snapshot. `watermark` is the engine's event-time "now" (staleness is judged
    /// against it).
    pub fn build(nodes: Vec<Arc<NodeLoad>>, policy: Policy, watermark: i64) -> Fleet {
        let mut nodes = nodes;
        nodes.sort_by_key(|n| n.node);
        let entries: Vec<Result<Entry, Reject>> = nodes
            .iter()
            .enumerate()
            .map(|(index, node)| {
                let index = u32::try_from(index).expect("fewer than 2^32 nodes");
                entry(index, node, &policy.weights, watermark)
            })
            .collect();
        let placed: Vec<(u32, [f64; 3])> = nodes
            .iter()
            .enumerate()
            .filter_map(|(index, node)| Some((index as u32, unit(node)?)))
            .collect();
        let tree = Tree::build(&placed, nodes.len(), policy.weights.geo, |i| {
            entries[i as usize].as_ref().ok().map(|e| e.sum)
        });
        let mut rejected = [0; REJECTS.len()];
        for e in &entries {
            tally(&mut rejected, e, true);
        }
        let placeless = placeless_of(&entries);
        let holders = Arc::new(holders_of(&nodes));
        let positions = nodes
            .iter()
            .enumerate()
            .map(|(index, node)| (node.node, index as u32))
            .collect();
        Fleet {
            built: Instant::now(),
            policy,
            watermark,
            seen_at: nodes.iter().map(|n| n.seen_at).collect(),
            sums: entries.iter().map(sum_of).collect(),
            positions: Arc::new(positions),
            nodes,
            entries,
            placeless,
            holders,
            tree,
            tree_age: 0,
            cuts: Arc::new(GeoCuts::new(policy.weights.geo)),
            rejected,
        }
    }

    /// This snapshot with `changed` nodes replaced, when every one of them is already known
    /// and has not moved (otherwise `None`: build afresh). Unchanged nodes keep their entries,
    /// the tree keeps its shape (only the bounds on the changed nodes' paths are refreshed, until
    /// enough have changed to reshape it), the tally of refusals is adjusted for the changed
    /// entries, and the list of nodes without a place is redone only if one of them changed.
    pub fn with_changes(&self, changed: &[Arc<NodeLoad>], watermark: i64) -> Option<Fleet> {
        let mut nodes = self.nodes.clone();
        let mut entries = self.entries.clone();
        let mut seen_at = self.seen_at.clone();
        let mut sums = self.sums.clone();
        let mut rejected = self.rejected;
        let mut indices = Vec::with_capacity(changed.len());
        let mut holders = Arc::clone(&self.holders);
        let weights = &self.policy.weights;
        let mut replace = |entries: &mut Vec<Result<Entry, Reject>>, at: usize, new| {
            tally(&mut rejected, &entries[at], false);
            tally(&mut rejected, &new, true);
            sums[at] = sum_of(&new);
            entries[at] = new;
        };
        for node in changed {
            let index = *self.positions.get(&node.node)?;
            let at = index as usize;
            if !self.tree.placed_at(index, unit(node)) {
                return None;
            }
            rehold(&mut holders, index, &nodes[at], node);
            nodes[at] = Arc::clone(node);
            seen_at[at] = node.seen_at;
            replace(&mut entries, at, entry(index, node, weights, watermark));
            indices.push(index);
        }
        if watermark != self.watermark {
            // Event time moved: nodes may have gone stale (or, going back, fresh again).
            for (at, &seen) in seen_at.iter().enumerate() {
                if stale(seen, watermark) != stale(seen, self.watermark) {
                    let index = at as u32;
                    replace(
                        &mut entries,
                        at,
                        entry(index, &nodes[at], weights, watermark),
                    );
                    indices.push(index);
                }
            }
        }
        let sum = |i: u32| entries[i as usize].as_ref().ok().map(|e| e.sum);
        let mut tree_age = self.tree_age + indices.len();
        // Patched bounds loosen as scores drift from those the tree was shaped for: once a
        // quarter of the fleet has changed, shape it afresh.
        let tree = if tree_age > (nodes.len() / 4).max(64) {
            tree_age = 0;
            self.tree.rebuilt(self.policy.weights.geo, sum)
        } else {
            let mut tree = self.tree.clone();
            for &index in &indices {
                tree.update(index, sum);
            }
            tree
        };
        // Nodes without a place are few; their list is redone only when one of them changed.
        let placeless = if indices.iter().any(|&i| !self.tree.contains(i)) {
            placeless_of(&entries)
        } else {
            self.placeless.clone()
        };
        Some(Fleet {
            built: Instant::now(),
            policy: self.policy,
            watermark,
            nodes,
            positions: Arc::clone(&self.positions),
            entries,
            seen_at,
            sums,
            placeless,
            holders,
            tree,
            tree_age,
            cuts: Arc::clone(&self.cuts),
            rejected,
        })
    }

    /// When the snapshot was built.
    pub fn built(&self) -> Instant {
        self.built
    }

    /// The weights and cutoff this snapshot was scored with.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The event-time "now" of the snapshot.
    pub fn watermark(&self) -> i64 {
        self.watermark
    }

    /// Every node, by id.
    pub fn nodes(&self) -> &[Arc<NodeLoad>] {
        &self.nodes
    }

    /// A node by id.
    pub fn node(&self, id: &str) -> Option<&Arc<NodeLoad>> {
        let id = Sym::find(id)?;
        self.positions.get(&id).map(|&i| &self.nodes[i as usize])
    }

    /// A node by the host name the Mist API shows (or by id).
    pub fn by_host(&self, host: &str) -> Option<&Arc<NodeLoad>> {
        self.node(host)
            .or_else(|| self.nodes.iter().find(|n| n.host_name() == host))
    }

    /// The best `n` nodes for `request`, or why there is none.
    pub fn route(&self, request: &Request, n: usize) -> Result<Routed, NoNode> {
        let n = n.max(1);
        let mut furthest = REJECTS
            .iter()
            .zip(&self.rejected)
            .rev()
            .find(|(_, count)| **count > 0)
            .map(|(reject, _)| *reject);
        let mut top = Vec::with_capacity(n);
        let first = self.best(request, n, &self.policy.cutoff, &mut top, &mut furthest);
        if top.is_empty() && first && !self.policy.cutoff.is_off() {
            self.best(request, n, &Cutoff::default(), &mut top, &mut furthest);
            if !top.is_empty() {
                return Ok(Routed {
                    candidates: top,
                    cutoff_fallback: true,
                });
            }
        }
        if top.is_empty() {
            return Err(NoNode::from_furthest(furthest));
        }
        Ok(Routed {
            candidates: top,
            cutoff_fallback: false,
        })
    }

    /// Fills `top` with the best `n`; returns whether the cutoff excluded any node.
    fn best(
        &self,
        request: &Request,
        n: usize,
        cutoff: &Cutoff,
        top: &mut Vec<Candidate>,
        furthest: &mut Option<Reject>,
    ) -> bool {
        let w = &self.policy.weights;
        let client = request.client.map(|c| Trig::new(c.latitude, c.longitude));
        let bonus_max = if request.stream.is_some() { w.bonus } else { 0 };
        let tag_max: u64 = request
            .tags
            .iter()
            .filter(|a| a.adjust > 0)
            .map(|a| a.adjust.unsigned_abs())
            .sum();
        let mut cut = false;
        // Scores one node and keeps it if it is among the best `n`; returns the score a node
        // must reach from now on (once `n` are held).
        let mut consider = |entry: &Entry, top: &mut Vec<Candidate>| -> Option<u64> {
            let worst = |top: &Vec<Candidate>| bar(top, n);
            let cos = match (&client, &entry.trig) {
                (Some(c), Some(t)) => Some(cos_angle(c, t)),
                _ => None,
            };
            // A node that cannot beat the candidates held even with the bonus and every
            // positive adjustment is passed over before its figures are read — most of them
            // by the cosine alone, the rest once their geo term is known.
            let bar = worst(top);
            if let Some(bar) = bar
                && let Some(needed) = bar.checked_sub(entry.sum + bonus_max + tag_max)
                // Without a geo term the node reaches the bar at best: a tie it may still win
                // on its id.
                && cos.map_or(needed > 0, |c| self.cuts.surely_below(c, needed))
            {
                return Some(bar);
            }
            let geo = cos.map_or(0, |c| geo_of_cos(w.geo, c));
            if let Some(bar) = bar
                && entry.sum + geo + bonus_max + tag_max < bar
            {
                return Some(bar);
            }
            let node = &self.nodes[entry.index as usize];
            if let Err(reject) = check_request(node, request, cutoff) {
                cut |= reject == Reject::Cutoff;
                *furthest = (*furthest).max(Some(reject));
                return worst(top);
            }
            let bonus = match request.stream {
                Some(s) if node.stream(s).is_some() => w.bonus,
                _ => 0,
            };
            let tags = if request.tags.is_empty() {
                0
            } else {
                tag_sum(&request.tags, &node.capabilities)
            };
            let score = finish(entry.cpu, entry.ram, entry.bw, geo, bonus, tags);
            let better = |c: &Candidate| {
                score.total > c.score.total
                    || (score.total == c.score.total && node.node < c.node.node)
            };
            if top.len() == n && !top.last().is_some_and(better) {
                return worst(top);
            }
            let at = top.iter().position(better).unwrap_or(top.len());
            if top.len() == n {
                top.pop();
            }
            top.insert(
                at,
                Candidate {
                    node: Arc::clone(node),
                    score,
                },
            );
            worst(top)
        };
        // Nodes without a place, best static sum first, until none left could win.
        for entry in &self.placeless {
            if top.len() == n
                && let Some(last) = top.last()
                && entry.sum.saturating_add(bonus_max + tag_max) < last.score.total
            {
                break;
            }
            consider(entry, top);
        }
        let worst = bar(top, n);
        let entries = &self.entries;
        // Only the stream's holders can have its bonus: the tree's bounds leave it out, and the
        // holders the search passed over are considered after it. Considering a node twice
        // changes nothing (the bar only rises), except that one already held must not be added
        // again.
        let holders = request.stream.and_then(|s| self.holders.get(&s));
        let extra = if holders.is_some() {
            tag_max
        } else {
            bonus_max + tag_max
        };
        // A client without a place gets no geo term: the tree's bounds are its static ones.
        let (point, geo_weight) = client.map_or(([0.0; 3], 0), |c| (c.unit(), w.geo));
        self.tree.search(point, geo_weight, extra, worst, |index| {
            match &entries[index as usize] {
                Ok(entry) => consider(entry, top),
                Err(_) => bar(top, n),
            }
        });
        // Most holders are passed over from their static sum and place alone.
        for holder in holders.map_or(&[][..], |h| h.as_slice()) {
            let reach = self.sums[holder.index as usize] + bonus_max + tag_max;
            if let Some(bar) = bar(top, n)
                && let Some(needed) = bar.checked_sub(reach)
                && client.as_ref().map_or(needed > 0, |c| {
                    self.cuts.surely_below(cos_angle(c, &holder.trig), needed)
                })
            {
                continue;
            }
            let node = &self.nodes[holder.index as usize];
            if let Ok(entry) = &entries[holder.index as usize]
                && !top.iter().any(|c| Arc::ptr_eq(&c.node, node))
            {
                consider(entry, top);
            }
        }
        cut
    }
}

/// Where the engine publishes fleet snapshots and routing reads them. Readers never lock;
/// writers (the engine's publisher and `/?weights=`) take turns.
#[derive(Debug)]
pub struct FleetCell {
    fleet: ArcSwap<Fleet>,
    writer: Mutex<()>,
}

impl Default for FleetCell {
    fn default() -> Self {
        FleetCell::new(Policy::default())
    }
}

impl FleetCell {
    /// An empty fleet scored with `policy`.
    pub fn new(policy: Policy) -> FleetCell {
        FleetCell {
            fleet: ArcSwap::from_pointee(Fleet::build(Vec::new(), policy, i64::MIN)),
            writer: Mutex::new(()),
        }
    }

    /// The current snapshot (cheap, lock-free).
    pub fn load(&self) -> Guard<Arc<Fleet>> {
        self.fleet.load()
    }

    /// The current snapshot as an owned handle.
    pub fn snapshot(&self) -> Arc<Fleet> {
        self.fleet.load_full()
    }

    /// Publishes these nodes as of `watermark`, scored with the current policy.
    pub fn publish(&self, nodes: Vec<Arc<NodeLoad>>, watermark: i64) {
        let _turn = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let policy = *self.fleet.load().policy();
        self.fleet
            .store(Arc::new(Fleet::build(nodes, policy, watermark)));
    }

    /// Publishes the current snapshot with `changed` nodes replaced or added; `all` gives every
    /// node when a full build is needed (a node routing has not seen before).
    pub fn publish_changes(
        &self,
        changed: &[Arc<NodeLoad>],
        all: impl FnOnce() -> Vec<Arc<NodeLoad>>,
        watermark: i64,
    ) {
        let _turn = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.fleet.load_full();
        let next = current
            .with_changes(changed, watermark)
            .unwrap_or_else(|| Fleet::build(all(), current.policy, watermark));
        self.fleet.store(Arc::new(next));
    }

    /// Changes weights or cutoff and rescores the current nodes at once.
    pub fn set_policy(&self, policy: Policy) {
        let _turn = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.fleet.load_full();
        self.fleet.store(Arc::new(Fleet::build(
            current.nodes.clone(),
            policy,
            current.watermark,
        )));
    }
}
