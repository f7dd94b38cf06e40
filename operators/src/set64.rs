//! `Set64`: a set of 64-bit hashes in one flat array, for sets of millions that are probed
//! once per record.
//!
//! A `HashSet<u64>` keeps its control bytes and its values in two arrays, so a look-up in a set
//! much larger than the cache misses twice, and nothing can ask for either line ahead of time.
//! Here a value is its own entry (0 marks a vacant one; the value 0 itself is kept aside), probed
//! linearly from a home found by a multiplicative spread: one line per look-up (eight entries a
//! line), which [`Set64::prefetch`] can ask for records before the look-up. Filled up to seven
//! eighths, like a `HashSet<u64>`, it costs 9 to 18 bytes a value where that costs 10 to 21
//! (9 bytes a bucket).
//!
//! ```
//! use keel_operators::set64::Set64;
//! let mut set = Set64::default();
//! assert!(set.insert(42));
//! assert!(!set.insert(42));
//! assert!(set.contains(42));
//! assert!(set.remove(42));
//! assert!(set.is_empty());
//! ```

use crate::posindex::{close_hole, spread};

const VACANT: u64 = 0;

/// A set of `u64`; see the module documentation.
#[derive(Clone, Debug, Default)]
pub struct Set64 {
    /// A power of two long (or empty); at most seven eighths full.
    entries: Vec<u64>,
    /// Values held in `entries` (the value 0 not counted).
    len: usize,
    /// Whether the set holds 0, which `entries` cannot.
    zero: bool,
    /// 64 − log2(entries.len()).
    shift: u32,
}

impl Set64 {
    /// Number of values held.
    pub fn len(&self) -> usize {
        self.len + usize::from(self.zero)
    }

    /// Whether the set holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    fn home(&self, value: u64) -> usize {
        spread(value, self.shift)
    }

    #[inline]
    fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    /// Starts loading the line where a look-up of `value` begins.
    #[inline]
    pub fn prefetch(&self, value: u64) {
        if !self.entries.is_empty() {
            crate::prefetch::prefetch(&self.entries[self.home(value)]);
        }
    }

    /// Where `value` sits, or the vacant entry that ends its run.
    #[inline]
    fn probe(&self, value: u64) -> (usize, bool) {
        let mask = self.mask();
        let mut i = self.home(value);
        loop {
            match self.entries[i] {
                VACANT => return (i, false),
                v if v == value => return (i, true),
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Whether `value` is held.
    pub fn contains(&self, value: u64) -> bool {
        if value == VACANT {
            return self.zero;
        }
        !self.entries.is_empty() && self.probe(value).1
    }

    /// Adds `value`; returns whether it was new.
    pub fn insert(&mut self, value: u64) -> bool {
        if value == VACANT {
            return !std::mem::replace(&mut self.zero, true);
        }
        if (self.len + 1) * 8 > self.entries.len() * 7 {
            self.resize((self.entries.len() * 2).max(8));
        }
        let (at, found) = self.probe(value);
        if !found {
            self.entries[at] = value;
            self.len += 1;
        }
        !found
    }

    /// Removes `value`; returns whether it was held.
    pub fn remove(&mut self, value: u64) -> bool {
        if value == VACANT {
            return std::mem::replace(&mut self.zero, false);
        }
        if self.entries.is_empty() {
            return false;
        }
        let (hole, found) = self.probe(value);
        if !found {
            return false;
        }
        let shift = self.shift;
        close_hole(
            &mut self.entries,
            hole,
            VACANT,
            |&v| v == VACANT,
            |&v| spread(v, shift),
        );
        self.len -= 1;
        true
    }

    fn resize(&mut self, size: usize) {
        let old = std::mem::replace(&mut self.entries, vec![VACANT; size]);
        self.shift = 64 - size.trailing_zeros();
        for v in old.into_iter().filter(|&v| v != VACANT) {
            let (at, _) = self.probe(v);
            self.entries[at] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    proptest! {
        /// Against `HashSet`: the same answers to every insert, remove and look-up, with values
        /// drawn from a few so that runs collide, grow and are cut by removals (0 included).
        #[test]
        fn agrees_with_a_hash_set(
            steps in prop::collection::vec((0u8..3, 0u64..64, any::<bool>()), 0..600),
        ) {
            let mut set = Set64::default();
            let mut model = HashSet::new();
            for (op, small, high) in steps {
                // Half the values differ only in their high bits, which the spread must mix in.
                let value = if high { small << 58 } else { small };
                match op {
                    0 => prop_assert_eq!(set.insert(value), model.insert(value)),
                    1 => prop_assert_eq!(set.remove(value), model.remove(&value)),
                    _ => prop_assert_eq!(set.contains(value), model.contains(&value)),
                }
                prop_assert_eq!(set.len(), model.len());
            }
            for value in (0..64).chain((0..64).map(|v: u64| v << 58)) {
                prop_assert_eq!(set.contains(value), model.contains(&value));
            }
        }
    }
}
