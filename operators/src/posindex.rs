//! An index from keys to positions in a vector of rows, for tables of millions of rows.
//!
//! The rows live elsewhere (a slab, a chunked vector); the index keeps, per row, its position and
//! 32 bits of its key's hash side by side in one 8-byte entry. Entries sit in one array probed
//! linearly, so a look-up reads one cache line of the index, compares stored hashes there, and
//! only then reads the row whose hash agrees. (hashbrown keeps its control bytes and its entries
//! in two places, so a look-up in a large table misses the cache twice before it reaches a row:
//! about a third of the time of a `viewer_sessions` upsert in the replay's profile.)
//!
//! Growing re-files entries from their stored hashes alone, without reading a row. The caller
//! says which entry is its key's by looking at the row (`is`), and keeps hashes and positions
//! in step with its rows (`insert`, `remove`, `repoint`).
//!
//! ```
//! use keel_operators::posindex::PositionIndex;
//! let rows = ["a", "b", "c"];
//! let hash = |s: &str| s.len() as u32 * 7 + s.as_bytes()[0] as u32;
//! let mut index = PositionIndex::default();
//! for (at, row) in rows.iter().enumerate() {
//!     index.insert(hash(row), at as u32);
//! }
//! assert_eq!(index.find(hash("b"), |at| rows[at as usize] == "b"), Some(1));
//! assert_eq!(index.find(hash("d"), |at| rows[at as usize] == "d"), None);
//! ```

/// Marks an empty entry (no table holds 2^32 − 1 rows).
const EMPTY: u32 = u32::MAX;

/// One row: its key's hash (32 bits) and its position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    hash: u32,
    at: u32,
}

const VACANT: Entry = Entry { hash: 0, at: EMPTY };

/// The home entry of `hash` in a table of 2^(64 − `shift`) entries: the high bits of a
/// multiplicative spread, so that hashes differing only in their high bits still land apart.
#[inline]
pub(crate) fn spread(hash: u64, shift: u32) -> usize {
    (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> shift) as usize
}

/// Empties entry `hole` of a linearly probed table (a power of two long, with a vacant entry
/// somewhere): every later entry of the run that may live in the hole moves into it (backward
/// shift), so no probe ever stops early at a hole in its run.
pub(crate) fn close_hole<T: Copy>(
    entries: &mut [T],
    mut hole: usize,
    vacant: T,
    is_vacant: impl Fn(&T) -> bool,
    home: impl Fn(&T) -> usize,
) {
    let mask = entries.len() - 1;
    let mut j = hole;
    loop {
        j = (j + 1) & mask;
        let entry = entries[j];
        if is_vacant(&entry) {
            break;
        }
        // The entry may sit in the hole when the hole lies on its path from home to j.
        if (j.wrapping_sub(home(&entry)) & mask) >= (j.wrapping_sub(hole) & mask) {
            entries[hole] = entry;
            hole = j;
        }
    }
    entries[hole] = vacant;
}

/// Positions by 32-bit hash; see the module documentation.
#[derive(Clone, Debug, Default)]
pub struct PositionIndex {
    /// A power of two long (or empty); at most three quarters full.
    entries: Vec<Entry>,
    len: usize,
    /// 64 − log2(entries.len()): the shift that takes a spread hash to its home entry.
    shift: u32,
}

impl PositionIndex {
    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the index holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where probing for `hash` starts: the high bits of a multiplicative spread, so that hashes
    /// differing only in their high bits still land apart.
    #[inline]
    fn home(&self, hash: u32) -> usize {
        spread(u64::from(hash), self.shift)
    }

    #[inline]
    fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    /// The position whose row `is` accepts among those filed under `hash`.
    #[inline]
    pub fn find(&self, hash: u32, is: impl FnMut(u32) -> bool) -> Option<u32> {
        self.probe(hash, is).map(|i| self.entries[i].at)
    }

    /// Starts loading the index line where a look-up of `hash` begins.
    #[inline]
    pub fn prefetch(&self, hash: u32) {
        if !self.entries.is_empty() {
            crate::prefetch::prefetch(&self.entries[self.home(hash)]);
        }
    }

    /// Where the entry filed under `hash` whose position `is` accepts sits.
    #[inline]
    fn probe(&self, hash: u32, mut is: impl FnMut(u32) -> bool) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut i = self.home(hash);
        loop {
            let entry = self.entries[i];
            if entry.at == EMPTY {
                return None;
            }
            if entry.hash == hash && is(entry.at) {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// Files position `at` under `hash`. The caller makes sure no entry for the same row is
    /// there already.
    pub fn insert(&mut self, hash: u32, at: u32) {
        assert_ne!(at, EMPTY, "positions stay below 2^32 - 1");
        if (self.len + 1) * 4 > self.entries.len() * 3 {
            self.resize((self.entries.len() * 2).max(8));
        }
        self.place(Entry { hash, at });
        self.len += 1;
    }

    /// Puts an entry in the first vacant place from its home on.
    fn place(&mut self, entry: Entry) {
        let mask = self.mask();
        let mut i = self.home(entry.hash);
        while self.entries[i].at != EMPTY {
            i = (i + 1) & mask;
        }
        self.entries[i] = entry;
    }

    fn resize(&mut self, size: usize) {
        let old = std::mem::replace(&mut self.entries, vec![VACANT; size]);
        self.shift = 64 - size.trailing_zeros();
        for entry in old {
            if entry.at != EMPTY {
                self.place(entry);
            }
        }
    }

    /// Where the entry (`hash`, `at`) sits.
    fn slot_of(&self, hash: u32, at: u32) -> Option<usize> {
        self.probe(hash, |filed| filed == at)
    }

    /// Removes the entry of position `at`, filed under `hash`; returns whether it was there.
    pub fn remove(&mut self, hash: u32, at: u32) -> bool {
        let Some(hole) = self.slot_of(hash, at) else {
            return false;
        };
        let shift = self.shift;
        close_hole(
            &mut self.entries,
            hole,
            VACANT,
            |entry| entry.at == EMPTY,
            |entry| spread(u64::from(entry.hash), shift),
        );
        self.len -= 1;
        true
    }

    /// Refiles the row filed under `hash` at position `from` to position `to` (after the row
    /// moved); returns whether it was there.
    pub fn repoint(&mut self, hash: u32, from: u32, to: u32) -> bool {
        assert_ne!(to, EMPTY, "positions stay below 2^32 - 1");
        match self.slot_of(hash, from) {
            Some(i) => {
                self.entries[i].at = to;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Clone, Debug)]
    enum Op {
        /// Insert a key (if absent) at the end of the rows.
        Insert(u16),
        /// Delete a key (if present) by swapping the last row into its place.
        Delete(u16),
    }

    fn arb_op(keys: u16) -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..keys).prop_map(Op::Insert),
            2 => (0..keys).prop_map(Op::Delete),
        ]
    }

    /// Few distinct hashes, so runs are long, collide and wrap around the end of the array.
    fn weak_hash(key: u16) -> u32 {
        u32::from(key % 13) * 0x0100_0001
    }

    proptest! {
        /// A table of rows kept with swap-removes, indexed by key: every key's position agrees
        /// with a plain map after every step, and absent keys are not found.
        #[test]
        fn agrees_with_a_map(ops in prop::collection::vec(arb_op(64), 1..400), weak in any::<bool>()) {
            let hash = |key: u16| if weak { weak_hash(key) } else { u32::from(key).wrapping_mul(0x85EB_CA6B) };
            let mut rows: Vec<u16> = Vec::new();
            let mut index = PositionIndex::default();
            let mut model: HashMap<u16, u32> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(key) => {
                        if index.find(hash(key), |at| rows[at as usize] == key).is_none() {
                            let at = rows.len() as u32;
                            rows.push(key);
                            index.insert(hash(key), at);
                            model.insert(key, at);
                        }
                    }
                    Op::Delete(key) => {
                        if let Some(at) = index.find(hash(key), |at| rows[at as usize] == key) {
                            prop_assert!(index.remove(hash(key), at));
                            model.remove(&key);
                            let last = rows.len() as u32 - 1;
                            rows.swap_remove(at as usize);
                            if at != last {
                                let moved = rows[at as usize];
                                prop_assert!(index.repoint(hash(moved), last, at));
                                model.insert(moved, at);
                            }
                        }
                    }
                }
                prop_assert_eq!(index.len(), model.len());
                for key in 0..64u16 {
                    let found = index.find(hash(key), |at| rows[at as usize] == key);
                    prop_assert_eq!(found, model.get(&key).copied(), "key {}", key);
                }
            }
        }
    }

    #[test]
    fn grows_past_three_quarters_and_keeps_everything() {
        let mut index = PositionIndex::default();
        for at in 0..10_000u32 {
            index.insert(at.wrapping_mul(2_654_435_761), at);
            assert!(index.len() * 4 <= index.entries.len() * 3);
        }
        for at in 0..10_000u32 {
            assert_eq!(
                index.find(at.wrapping_mul(2_654_435_761), |p| p == at),
                Some(at)
            );
        }
        assert_eq!(index.entries.len(), 16_384);
        assert_eq!(index.entries.capacity() * size_of::<Entry>(), 16_384 * 8);
    }

    #[test]
    fn removing_what_is_not_there_changes_nothing() {
        let mut index = PositionIndex::default();
        index.insert(5, 0);
        assert!(!index.remove(5, 1));
        assert!(!index.remove(6, 0));
        assert!(!index.repoint(5, 3, 4));
        assert_eq!(index.find(5, |_| true), Some(0));
        assert!(index.remove(5, 0));
        assert!(index.is_empty() && index.find(5, |_| true).is_none());
    }
}
