//! `IdSet`: the 128-bit ids (event ids) already counted, at 18 to 21 bytes each.
//!
//! Counting an event once whatever its redeliveries means keeping every id counted. A hash set of
//! 16-byte ids costs 17 bytes a bucket and has from 1.1 to 2.3 buckets per id: 19 to 39 bytes.
//! Here most ids sit in a sorted vector (16 bytes each) and only the newest in a small
//! open-addressed table (16 bytes a slot), merged into the vector once it holds an eighth as
//! many. Beside the vector, a filter of 8 bits
//! per id (each id sets 3 bits of one 64-bit word) answers "certainly not in the vector" for all
//! but a few per cent of new ids, so an insert of a new id — nearly every insert — costs a table
//! probe, one word of the filter and, amortised, a few moves in the merges; the vector is searched
//! only when the filter cannot rule the id out. Both the table slot and the filter word are
//! places the id alone names, so a caller that knows the next ids can prefetch them
//! ([`IdSet::prefetch`]).
//!
//! ```
//! use keel_operators::idset::IdSet;
//! let mut seen = IdSet::default();
//! assert!(seen.insert(7));
//! assert!(!seen.insert(7));
//! assert_eq!(seen.len(), 1);
//! ```

/// Ids held in the recent table before a merge, however small the vector.
const MIN_RECENT: usize = 256;
/// Ids per filter word (8 bits each).
const IDS_PER_WORD: usize = 8;

/// A set of 128-bit ids that only grows.
#[derive(Clone, Debug, Default)]
pub struct IdSet {
    /// Ascending, no repeats, none of them in `recent`.
    sorted: Vec<u128>,
    /// A power-of-two number of words (or none while `sorted` is empty); every id of `sorted`
    /// has its bits set in its word.
    filter: Vec<u64>,
    recent: Recent,
}

/// The newest ids: an open-addressed table (linear probing) of a power-of-two number of slots,
/// where 0 marks a vacant slot and the id 0 is a flag of its own. A look-up starts at a slot the
/// id alone names, so a hint can load that slot before the insert (a hash set's control bytes
/// and entries would be two misses, and neither can be asked for ahead).
#[derive(Clone, Debug, Default)]
struct Recent {
    slots: Vec<u128>,
    /// Occupied slots.
    len: usize,
    zero: bool,
}

impl Recent {
    fn home(&self, id: u128) -> usize {
        let bits = self.slots.len().trailing_zeros();
        (mix(id) >> (64 - bits)) as usize
    }

    fn prefetch(&self, id: u128) {
        if !self.slots.is_empty() {
            crate::prefetch::prefetch(&self.slots[self.home(id)]);
        }
    }

    /// Where `id` (not 0) sits, or the vacant slot that ends its run.
    fn probe(&self, id: u128) -> (usize, bool) {
        let mask = self.slots.len() - 1;
        let mut i = self.home(id);
        loop {
            match self.slots[i] {
                0 => return (i, false),
                held if held == id => return (i, true),
                _ => i = (i + 1) & mask,
            }
        }
    }

    fn contains(&self, id: u128) -> bool {
        match id {
            0 => self.zero,
            _ => !self.slots.is_empty() && self.probe(id).1,
        }
    }

    /// Adds `id`; returns whether it was new.
    fn insert(&mut self, id: u128) -> bool {
        if id == 0 {
            return !std::mem::replace(&mut self.zero, true);
        }
        if (self.len + 1) * 8 > self.slots.len() * 7 {
            self.grow();
        }
        let (at, found) = self.probe(id);
        if !found {
            self.len += 1;
            self.slots[at] = id;
        }
        !found
    }

    fn grow(&mut self) {
        let size = (self.slots.len() * 2).max(16);
        let old = std::mem::replace(&mut self.slots, vec![0; size]);
        for id in old.into_iter().filter(|&id| id != 0) {
            let (at, _) = self.probe(id);
            self.slots[at] = id;
        }
    }

    fn len(&self) -> usize {
        self.len + usize::from(self.zero)
    }

    /// Moves every id into `out` and leaves the table empty (its slots kept for the next ids).
    fn drain_into(&mut self, out: &mut Vec<u128>) {
        out.extend(self.slots.iter().copied().filter(|&id| id != 0));
        if std::mem::take(&mut self.zero) {
            out.push(0);
        }
        self.slots.fill(0);
        self.len = 0;
    }
}

/// The 64 bits both the filter and the recent table take their places from.
fn mix(id: u128) -> u64 {
    ((id as u64) ^ ((id >> 64) as u64).rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The filter word of `id` among `words` (a power of two) and the 3 bits it sets there.
fn probe(id: u128, words: usize) -> (usize, u64) {
    let h = mix(id);
    let word = (h >> 32) as usize & (words - 1);
    let bits = (1u64 << (h & 63)) | (1u64 << ((h >> 6) & 63)) | (1u64 << ((h >> 12) & 63));
    (word, bits)
}

impl IdSet {
    /// Adds `id`; returns whether it was new.
    pub fn insert(&mut self, id: u128) -> bool {
        // `sorted` and `recent` never share an id, so one probe of `recent` both asks and adds.
        if self.in_sorted(id) || !self.recent.insert(id) {
            return false;
        }
        if self.recent.len() > (self.sorted.len() / 8).max(MIN_RECENT) {
            self.merge();
        }
        true
    }

    /// Starts loading the filter word and the recent table's slot an insert of `id` reads: in
    /// a set of hundreds of thousands of ids each is a cache miss on nearly every new id.
    #[inline]
    pub fn prefetch(&self, id: u128) {
        if !self.filter.is_empty() {
            let (word, _) = probe(id, self.filter.len());
            crate::prefetch::prefetch(&self.filter[word]);
        }
        self.recent.prefetch(id);
    }

    /// Whether `id` is held.
    pub fn contains(&self, id: u128) -> bool {
        self.recent.contains(id) || self.in_sorted(id)
    }

    /// Number of ids held.
    pub fn len(&self) -> usize {
        self.sorted.len() + self.recent.len()
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn in_sorted(&self, id: u128) -> bool {
        if self.filter.is_empty() {
            return false;
        }
        let (word, bits) = probe(id, self.filter.len());
        self.filter[word] & bits == bits && self.sorted.binary_search(&id).is_ok()
    }

    /// Moves the recent ids into the sorted vector, merging from the back so that nothing
    /// is moved twice, and enters them in the filter (rebuilt at twice the size when the vector
    /// has outgrown it).
    fn merge(&mut self) {
        let mut fresh = Vec::with_capacity(self.recent.len());
        self.recent.drain_into(&mut fresh);
        fresh.sort_unstable();
        let old = self.sorted.len();
        self.sorted.resize(old + fresh.len(), 0);
        let (mut i, mut j) = (old, fresh.len());
        for k in (0..self.sorted.len()).rev() {
            if j == 0 {
                break;
            }
            if i > 0 && self.sorted[i - 1] > fresh[j - 1] {
                self.sorted[k] = self.sorted[i - 1];
                i -= 1;
            } else {
                self.sorted[k] = fresh[j - 1];
                j -= 1;
            }
        }
        if self.sorted.len() > self.filter.len() * IDS_PER_WORD {
            let words = self.sorted.len().div_ceil(IDS_PER_WORD).next_power_of_two();
            self.filter = vec![0; words];
            enter(&mut self.filter, &self.sorted);
        } else {
            enter(&mut self.filter, &fresh);
        }
    }
}

fn enter(filter: &mut [u64], ids: &[u128]) {
    for &id in ids {
        let (word, bits) = probe(id, filter.len());
        filter[word] |= bits;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Against a plain hash set: the same answers to every insert and lookup, through many
        /// merges and filter rebuilds (ids drawn from a small range so that repeats are common).
        #[test]
        fn agrees_with_a_hash_set(
            ids in prop::collection::vec(prop_oneof![0u128..3_000, any::<u128>()], 0..8_000),
            probes in prop::collection::vec(0u128..3_000, 0..200),
        ) {
            let mut set = IdSet::default();
            let mut model = HashSet::new();
            for &id in &ids {
                // A hint first, as the routing state gives one: it changes no answer.
                set.prefetch(id);
                prop_assert_eq!(set.insert(id), model.insert(id));
                prop_assert_eq!(set.len(), model.len());
            }
            for probe in probes {
                prop_assert_eq!(set.contains(probe), model.contains(&probe));
            }
            prop_assert!(set.sorted.windows(2).all(|w| w[0] < w[1]), "the vector stays sorted");
            prop_assert!(set.sorted.iter().all(|&id| !set.recent.contains(id)));
        }
    }

    fn spread(i: u128) -> u128 {
        i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
    }

    #[test]
    fn most_ids_end_up_in_the_vector_and_the_filter_rules_out_most_others() {
        let mut set = IdSet::default();
        for i in 0..100_000u128 {
            assert!(set.insert(spread(i)));
        }
        assert_eq!(set.len(), 100_000);
        for i in 0..100_000u128 {
            assert!(set.contains(spread(i)), "{i} was inserted");
            assert!(!set.insert(spread(i)), "{i} is held already");
        }
        assert!(
            set.recent.len() <= set.sorted.len() / 8 + 1,
            "{} recent beside {} sorted",
            set.recent.len(),
            set.sorted.len()
        );
        assert!(set.filter.len() * IDS_PER_WORD >= set.sorted.len());
        let passed = (100_000..200_000u128)
            .filter(|&i| {
                let (word, bits) = probe(spread(i), set.filter.len());
                set.filter[word] & bits == bits
            })
            .count();
        assert!(
            passed < 10_000,
            "{passed} of 100,000 absent ids passed the filter"
        );
    }
}
