//! A step function built from point changes, answering "what was the highest level, and when".
//!
//! `StepProfile` holds a multiset of `(time, delta)` changes. Its level at time `t` is the sum of
//! the deltas at times `≤ t`. Concurrency is the motivating case: a session `[start, end)` adds
//! `+1` at `start` and `-1` at `end`, and the level is then the number of open sessions — so the
//! true peak of concurrent viewers over any range is one query, whatever order the sessions arrived
//! in, and a change is just another `add`. Because changes at one instant are summed before the
//! level is read, a session that ends exactly when another starts does not overlap it.
//!
//! Storage is a list of sorted blocks with per-block sums and prefix maxima, so an update touches
//! one block and a range query walks whole blocks by their summaries. A point costs 8 bytes
//! (its time as a 32-bit offset from its block's base, and a 32-bit delta; a block spans less
//! than 2^32 ms, 49 days, and a point farther away starts a block of its own), and blocks fill up
//! when changes come in time order, as a live stream's do: a block that overflows at its end
//! keeps its points and the newest starts the next block, so only out-of-order changes leave
//! blocks half full.
//!
//! ```
//! use keel_operators::profile::StepProfile;
//! let mut viewers = StepProfile::default();
//! for (start, end) in [(0, 10), (5, 20), (10, 30)] {
//!     viewers.add(start, 1);
//!     viewers.add(end, -1);
//! }
//! assert_eq!(viewers.max_level(), 2);          // [5, 10) and [10, 20)
//! assert_eq!(viewers.level_at(4), 1);
//! assert_eq!(viewers.max_level_in(20, 100), 1); // only [10, 30) is left
//! ```

const BLOCK: usize = 64;
/// Points a block holds before it is split.
const FULL: usize = 2 * BLOCK;

#[derive(Clone, Debug, Default)]
struct Block {
    /// The time offsets count from: at or before the block's first point.
    base: i64,
    /// Each point's time less `base`, ascending: a block spans less than 2^32 ms (49 days), and
    /// a point beyond that starts a block of its own.
    offsets: Vec<u32>,
    deltas: Vec<i32>,
    sum: i64,
    /// Highest running sum within the block, over its points (the level just after each point,
    /// relative to the level before the block).
    max_prefix: i64,
    /// Changed since `sum` and `max_prefix` were computed.
    dirty: bool,
}

impl Block {
    /// A block of points at `base` plus `offsets` with `deltas`, with room for a full block (so
    /// it never grows by doubling past it).
    fn new(
        base: i64,
        offsets: impl Iterator<Item = u32>,
        deltas: impl Iterator<Item = i32>,
    ) -> Self {
        let mut block = Block {
            base,
            offsets: Vec::with_capacity(FULL + 1),
            deltas: Vec::with_capacity(FULL + 1),
            sum: 0,
            max_prefix: 0,
            dirty: true,
        };
        block.offsets.extend(offsets);
        block.deltas.extend(deltas);
        block
    }

    /// A block of the one point (`time`, `delta`).
    fn single(time: i64, delta: i32) -> Self {
        Block::new(time, std::iter::once(0), std::iter::once(delta))
    }

    /// The time of point `i`.
    fn time(&self, i: usize) -> i64 {
        self.base + i64::from(self.offsets[i])
    }

    fn first(&self) -> i64 {
        self.time(0)
    }

    fn last(&self) -> i64 {
        self.time(self.offsets.len() - 1)
    }

    /// `time` as an offset, if the block can hold it.
    fn offset_of(&self, time: i64) -> Option<u32> {
        u32::try_from(i128::from(time) - i128::from(self.base)).ok()
    }

    /// Moves the base back to `time` (before it), if every point still fits; returns whether
    /// it did.
    fn rebase(&mut self, time: i64) -> bool {
        let shift = i128::from(self.base) - i128::from(time);
        let last = self.offsets.last().map_or(0, |&o| i128::from(o));
        let Ok(shift) = u32::try_from(shift) else {
            return false;
        };
        if u32::try_from(last + i128::from(shift)).is_err() {
            return false;
        }
        for offset in &mut self.offsets {
            *offset += shift;
        }
        self.base = time;
        true
    }

    /// How many points are at or before `time`.
    fn count_upto(&self, time: i64) -> usize {
        let distance = i128::from(time) - i128::from(self.base);
        match u32::try_from(distance) {
            Ok(offset) => self.offsets.partition_point(|&o| o <= offset),
            Err(_) if distance < 0 => 0,
            Err(_) => self.offsets.len(),
        }
    }

    /// Moves the points from `at` on into a new block based at the first of them.
    fn split_off(&mut self, at: usize) -> Block {
        let shift = self.offsets[at];
        Block::new(
            self.base + i64::from(shift),
            self.offsets.drain(at..).map(|o| o - shift),
            self.deltas.drain(at..),
        )
    }

    fn summarise(&mut self) {
        let mut running = 0;
        let mut best = i64::MIN;
        for &d in &self.deltas {
            running += i64::from(d);
            best = best.max(running);
        }
        self.sum = running;
        self.max_prefix = best;
        self.dirty = false;
    }
}

/// A step function over `i64` time made of summed point changes. See the module documentation.
///
/// Changes only mark their block; the next query summarises the marked blocks and recomputes,
/// from the first of them on, the level before each block (a running sum over block sums) and
/// the peak through it (a running maximum), so a burst of changes costs one refresh, a change
/// far in the past one pass over block sums, not over points, and one at the newest times a
/// look at the last block.
#[derive(Clone, Debug, Default)]
pub struct StepProfile {
    blocks: Vec<Block>,
    /// First time of each block, kept beside the blocks so searches stay in one cache line run.
    firsts: Vec<i64>,
    /// Level before each block, valid below `stale`.
    before: Vec<i64>,
    /// Highest level reached just after any point up to the end of each block (from the first
    /// block on), valid below `stale`: changes come mostly at the newest times, so the peak over
    /// all time is read here rather than recomputed over every block after each change. It
    /// leaves out the level 0 before the first point, so it may be negative; `max_level` adds it.
    peak_through: Vec<i64>,
    /// Index of the first block whose `before` and `peak_through` entries may be out of date.
    stale: usize,
    /// The range and answer of the last `max_level_in`, until the next change. A stream's
    /// windows keep their own peaks; it asks again at every close only for the newest window
    /// while open sessions reach it before any session starts there.
    memo_range: Option<(i64, i64, i64)>,
}

impl StepProfile {
    /// The index of the block that holds (or would hold) `time`.
    fn block_for(&self, time: i64) -> usize {
        // Most changes are at the newest times: try the last block first.
        match self.firsts.last() {
            Some(&last) if last <= time => self.firsts.len() - 1,
            _ => self
                .firsts
                .partition_point(|&f| f <= time)
                .saturating_sub(1),
        }
    }

    /// Adds `delta` to the level from `time` on. A point whose deltas sum to zero disappears.
    ///
    /// Panics if the deltas at one time sum beyond `i32` (over two billion sessions starting at
    /// the same instant).
    pub fn add(&mut self, time: i64, delta: i32) {
        if delta == 0 {
            return;
        }
        self.memo_range = None;
        if self.blocks.is_empty() {
            self.blocks.push(Block::single(time, delta));
            self.firsts.push(time);
            self.stale = 0;
            return;
        }
        let index = self.block_for(time);
        self.stale = self.stale.min(index);
        let last = index + 1 == self.blocks.len();
        let block = &mut self.blocks[index];
        let offset = match block.offset_of(time) {
            Some(offset) => offset,
            // Before the first block's base: the base moves back if its points still fit.
            None if time < block.base && block.rebase(time) => 0,
            // Too far from the block's points to be held beside them (no point of the block is
            // at this time, and no other block's range holds it): a block of its own, before
            // or after.
            None => {
                let at = if time < block.base { index } else { index + 1 };
                self.blocks.insert(at, Block::single(time, delta));
                self.firsts.insert(at, time);
                return;
            }
        };
        block.dirty = true;
        let mut appended = false;
        match block.offsets.binary_search(&offset) {
            Ok(at) => {
                let sum = block.deltas[at]
                    .checked_add(delta)
                    .expect("the deltas at one time sum within i32");
                block.deltas[at] = sum;
                if sum == 0 {
                    block.offsets.remove(at);
                    block.deltas.remove(at);
                }
            }
            Err(at) => {
                appended = at == block.offsets.len();
                block.offsets.insert(at, offset);
                block.deltas.insert(at, delta);
            }
        }
        if block.offsets.is_empty() {
            self.blocks.remove(index);
            self.firsts.remove(index);
        } else if block.offsets.len() > FULL {
            // Appended to the last block: it stays full and the new point starts the next.
            // Anywhere else, halves, so that later changes nearby find room.
            let at_end = appended && last;
            let next = block.split_off(if at_end { FULL } else { BLOCK });
            self.firsts[index] = block.first();
            self.firsts.insert(index + 1, next.first());
            self.blocks.insert(index + 1, next);
        } else {
            self.firsts[index] = block.first();
        }
    }

    /// Brings block summaries, the levels before blocks and the peaks through them up to date.
    fn refresh(&mut self) {
        if self.stale >= self.blocks.len() && self.before.len() == self.blocks.len() {
            return;
        }
        let from = self.stale.min(self.blocks.len()).min(self.before.len());
        self.before.truncate(from);
        self.peak_through.truncate(from);
        let (mut level, mut peak) = match from {
            0 => (0, i64::MIN),
            _ => (
                self.before[from - 1] + self.blocks[from - 1].sum,
                self.peak_through[from - 1],
            ),
        };
        for block in &mut self.blocks[from..] {
            if block.dirty {
                block.summarise();
            }
            self.before.push(level);
            peak = peak.max(level + block.max_prefix);
            self.peak_through.push(peak);
            level += block.sum;
        }
        self.stale = self.blocks.len();
    }

    /// True when no change is recorded.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Number of distinct change points.
    pub fn points(&self) -> usize {
        self.blocks.iter().map(|b| b.offsets.len()).sum()
    }

    /// The level at `time`: the sum of all deltas at times `<= time`.
    pub fn level_at(&mut self, time: i64) -> i64 {
        self.refresh();
        self.locate(time).2
    }

    /// Where `time` falls, on up-to-date levels: the index of the first block starting after
    /// it, how many points of the block before that are at or before it, and the level there.
    fn locate(&self, time: i64) -> (usize, usize, i64) {
        let next = self.firsts.partition_point(|&f| f <= time);
        let Some(held) = next.checked_sub(1) else {
            return (next, 0, 0);
        };
        let block = &self.blocks[held];
        let upto = block.count_upto(time);
        let level = self.before[held]
            + block.deltas[..upto]
                .iter()
                .map(|&d| i64::from(d))
                .sum::<i64>();
        (next, upto, level)
    }

    /// The highest level ever reached, and 0 if the level never rises above 0.
    pub fn max_level(&mut self) -> i64 {
        self.refresh();
        self.peak_through.last().map_or(0, |&peak| peak.max(0))
    }

    /// The highest level at any time in `[from, to)`; the level at `from` counts even when no
    /// change happens inside the range.
    pub fn max_level_in(&mut self, from: i64, to: i64) -> i64 {
        if let Some((f, t, best)) = self.memo_range
            && (f, t) == (from, to)
        {
            return best;
        }
        let best = self.scan_max_in(from, to);
        self.memo_range = Some((from, to, best));
        best
    }

    fn scan_max_in(&mut self, from: i64, to: i64) -> i64 {
        self.refresh();
        // Blocks from `next` on start after `from`; the one before it holds `from`'s level.
        let (next, upto, mut level) = self.locate(from);
        let mut best = level;
        if let Some(held) = next.checked_sub(1) {
            let block = &self.blocks[held];
            // The rest of that block, one point at a time.
            for (&o, &d) in block.offsets[upto..].iter().zip(&block.deltas[upto..]) {
                if block.base + i64::from(o) >= to {
                    return best;
                }
                level += i64::from(d);
                best = best.max(level);
            }
        }
        for (block, &before) in self.blocks[next..].iter().zip(&self.before[next..]) {
            if block.first() >= to {
                break;
            }
            if block.last() < to {
                // Wholly inside the range: its summary answers.
                best = best.max(before + block.max_prefix);
                continue;
            }
            let mut level = before;
            for (&o, &d) in block.offsets.iter().zip(&block.deltas) {
                if block.base + i64::from(o) >= to {
                    break;
                }
                level += i64::from(d);
                best = best.max(level);
            }
            break;
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// The reference: a plain map of summed deltas, read point by point.
    fn reference(changes: &[(i64, i32)]) -> BTreeMap<i64, i64> {
        let mut map = BTreeMap::new();
        for &(t, d) in changes {
            *map.entry(t).or_insert(0) += i64::from(d);
        }
        map.retain(|_, d| *d != 0);
        map
    }

    fn ref_level(map: &BTreeMap<i64, i64>, time: i64) -> i64 {
        map.range(..=time).map(|(_, d)| d).sum()
    }

    fn ref_max_in(map: &BTreeMap<i64, i64>, from: i64, to: i64) -> i64 {
        let mut best = ref_level(map, from);
        for (&t, _) in map.range(from + 1..to.max(from + 1)) {
            best = best.max(ref_level(map, t));
        }
        best
    }

    proptest! {
        #[test]
        fn matches_reference(
            changes in prop::collection::vec((0i64..400, -3i32..4), 0..600),
            queries in prop::collection::vec((0i64..420, 0i64..60), 1..20),
        ) {
            let mut profile = StepProfile::default();
            for &(t, d) in &changes {
                profile.add(t, d);
            }
            let map = reference(&changes);
            prop_assert_eq!(profile.points(), map.len());
            let mut level = 0;
            let mut best = 0;
            for d in map.values() {
                level += d;
                best = best.max(level);
            }
            prop_assert_eq!(profile.max_level(), best);
            for &(from, len) in &queries {
                prop_assert_eq!(profile.level_at(from), ref_level(&map, from));
                prop_assert_eq!(profile.max_level_in(from, from + len + 1), ref_max_in(&map, from, from + len + 1));
            }
        }

        #[test]
        fn answers_follow_changes_between_queries(
            steps in prop::collection::vec((0i64..200, -2i32..3, 0i64..220, 0i64..40), 1..200),
        ) {
            // Each step changes the profile (or not: delta 0), then asks the same questions
            // twice, as a stream's close does.
            let mut profile = StepProfile::default();
            let mut changes = Vec::new();
            for &(t, d, from, len) in &steps {
                profile.add(t, d);
                changes.push((t, d));
                let map = reference(&changes);
                let best = map.values().scan(0, |level, d| { *level += d; Some(*level) }).fold(0, i64::max);
                for _ in 0..2 {
                    prop_assert_eq!(profile.max_level(), best);
                    prop_assert_eq!(profile.max_level_in(from, from + len + 1), ref_max_in(&map, from, from + len + 1));
                }
            }
        }

        #[test]
        fn sessions_in_any_order_give_the_same_profile(
            sessions in prop::collection::vec((0i64..1000, 0i64..200), 1..300),
            seed in any::<u64>(),
        ) {
            let mut forward = StepProfile::default();
            for &(s, len) in &sessions {
                forward.add(s, 1);
                forward.add(s + len, -1);
            }
            // A deterministic shuffle, and each session added as an end before its start.
            let mut order: Vec<usize> = (0..sessions.len()).collect();
            let mut state = seed | 1;
            for i in (1..order.len()).rev() {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                order.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let mut shuffled = StepProfile::default();
            for i in order {
                let (s, len) = sessions[i];
                shuffled.add(s + len, -1);
                shuffled.add(s, 1);
            }
            prop_assert_eq!(forward.max_level(), shuffled.max_level());
            for probe in (0..1200).step_by(37) {
                prop_assert_eq!(forward.max_level_in(probe, probe + 300), shuffled.max_level_in(probe, probe + 300));
            }
        }

        /// Times spread over far more than one block's 2^32 ms span, in clusters near its
        /// edges, in any order: blocks are rebased, and points too far from a block start their
        /// own, with the same answers as the reference.
        #[test]
        fn times_beyond_a_blocks_span_match_reference(
            changes in prop::collection::vec((0usize..6, 0i64..300, -2i32..3), 0..700),
            queries in prop::collection::vec((0usize..6, 0i64..320, 0i64..(1 << 34)), 1..20),
        ) {
            const CLUSTERS: [i64; 6] = [-(1 << 40), -5, 0, (1 << 32) - 150, 1 << 33, 1 << 45];
            let changes: Vec<(i64, i32)> =
                changes.iter().map(|&(c, t, d)| (CLUSTERS[c] + t, d)).collect();
            let mut profile = StepProfile::default();
            for &(t, d) in &changes {
                profile.add(t, d);
            }
            let map = reference(&changes);
            prop_assert_eq!(profile.points(), map.len());
            let best = map.values().scan(0, |level, d| { *level += d; Some(*level) }).fold(0, i64::max);
            prop_assert_eq!(profile.max_level(), best);
            for &(c, t, len) in &queries {
                let from = CLUSTERS[c] + t;
                prop_assert_eq!(profile.level_at(from), ref_level(&map, from));
                prop_assert_eq!(profile.max_level_in(from, from + len + 1), ref_max_in(&map, from, from + len + 1));
            }
            for block in &profile.blocks {
                prop_assert!(block.offsets.first() == Some(&0) || block.base < block.first());
                prop_assert!(block.offsets.windows(2).all(|w| w[0] < w[1]));
            }
        }

        /// Changes that mostly come in time order, as a live stream's do (blocks split where
        /// they were appended to), with some arriving late, answer as the reference does.
        #[test]
        fn mostly_ordered_changes_match_reference(
            steps in prop::collection::vec((0i64..5, -2i32..3, any::<bool>(), 0i64..2_000), 1..1_500),
            queries in prop::collection::vec((0i64..6_000, 0i64..500), 1..20),
        ) {
            let mut profile = StepProfile::default();
            let mut changes = Vec::new();
            let mut now = 0;
            for &(step, d, late, back) in &steps {
                now += step;
                let t = if late { (now - back).max(0) } else { now };
                profile.add(t, d);
                changes.push((t, d));
            }
            let map = reference(&changes);
            prop_assert_eq!(profile.points(), map.len());
            let best = map.values().scan(0, |level, d| { *level += d; Some(*level) }).fold(0, i64::max);
            prop_assert_eq!(profile.max_level(), best);
            for &(from, len) in &queries {
                prop_assert_eq!(profile.level_at(from), ref_level(&map, from));
                prop_assert_eq!(profile.max_level_in(from, from + len + 1), ref_max_in(&map, from, from + len + 1));
            }
        }
    }

    /// Ranges against the reference where blocks meet: ranges inside one block, from one block
    /// into the next (the next straddling the range's end) or over whole blocks, empty and
    /// reversed ranges, and ranges before and after every point.
    #[test]
    fn ranges_across_block_edges_match_reference() {
        let mut profile = StepProfile::default();
        let mut changes = Vec::new();
        for t in 0..(3 * FULL as i64 + 40) {
            // Levels that rise and fall, so each range has a peak of its own.
            let delta = if t % 7 < 4 { 1 } else { -1 };
            profile.add(t, delta);
            changes.push((t, delta));
        }
        assert!(profile.blocks.len() >= 4);
        let map = reference(&changes);
        let edges: Vec<i64> = profile.firsts.clone();
        let mut probes = vec![-5, 0, 1];
        for &edge in &edges {
            probes.extend([edge - 2, edge - 1, edge, edge + 1, edge + 3]);
        }
        probes.push(3 * FULL as i64 + 60);
        for &from in &probes {
            for &to in &probes {
                assert_eq!(
                    profile.max_level_in(from, to),
                    ref_max_in(&map, from, to),
                    "[{from}, {to})"
                );
            }
        }
    }

    /// Points added in time order fill their blocks: a stream's open sessions cost their 8
    /// bytes a point, not twice that in half-empty blocks.
    #[test]
    fn ordered_points_fill_their_blocks() {
        let mut profile = StepProfile::default();
        for t in 0..10_000 {
            profile.add(t, 1);
        }
        assert_eq!(profile.blocks.len(), 10_000usize.div_ceil(FULL));
        assert!(
            profile
                .blocks
                .iter()
                .all(|b| b.offsets.capacity() <= FULL + 1)
        );
        assert_eq!(profile.max_level(), 10_000);
    }
}
