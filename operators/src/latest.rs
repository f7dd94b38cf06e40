//! `latest_by_key`: the newest value per key, by an order carried in the data (usually event time).
//!
//! Records are `(key, order, value)`. For each key the record with the greatest `order` wins; the
//! operator reports `(key, value)` whenever a key's winner changes. Because "greatest" does not
//! depend on arrival, the result is the same for any arrival order — make `order` total (event time,
//! then a tie-breaker such as the event id) and duplicates are harmless.
//!
//! ```
//! use keel_operators::latest::LatestByKey;
//! use keel_operators::maintain::GlobalWatermark;
//! use timely::dataflow::operators::{ToStream, Capture, capture::Extract};
//!
//! let captured = timely::example(|scope| {
//!     let marks = (0..1i64).to_stream(scope).global_watermark();
//!     vec![(1u32, 20, 50), (1, 10, 90), (2, 5, 10)]
//!         .to_stream(scope)
//!         .latest_by_key(marks, "latest", |k: &u32| u64::from(*k))
//!         .capture()
//! });
//! let mut out: Vec<_> = captured.extract().into_iter().flat_map(|(_, d)| d).collect();
//! out.sort();
//! assert_eq!(out, vec![(1, 50), (2, 10)]);
//! ```

use std::collections::HashMap;
use std::hash::Hash;

use rustc_hash::FxBuildHasher;
use timely::ExchangeData;
use timely::dataflow::StreamVec;
use timely::order::TotalOrder;
use timely::progress::Timestamp;

use crate::maintain::{EpochState, Maintain};

/// The per-worker state behind [`LatestByKey::latest_by_key`].
#[derive(Debug)]
pub struct Latest<K, O, V> {
    winners: HashMap<K, (O, V), FxBuildHasher>,
    changed: Vec<K>,
}

impl<K, O, V> Default for Latest<K, O, V> {
    fn default() -> Self {
        Latest {
            winners: HashMap::default(),
            changed: Vec::new(),
        }
    }
}

impl<K, O, V> EpochState for Latest<K, O, V>
where
    K: Hash + Eq + Clone + 'static,
    O: Ord + 'static,
    V: Clone + 'static,
{
    type Input = (K, O, V);
    type Output = (K, V);

    fn apply(&mut self, (key, order, value): (K, O, V)) {
        match self.winners.get_mut(&key) {
            Some(current) if current.0 >= order => {}
            Some(current) => {
                *current = (order, value);
                self.changed.push(key);
            }
            None => {
                self.winners.insert(key.clone(), (order, value));
                self.changed.push(key);
            }
        }
    }

    fn close(&mut self, _watermark: i64, output: &mut Vec<(K, V)>) {
        let mut seen =
            std::collections::HashSet::with_capacity_and_hasher(self.changed.len(), FxBuildHasher);
        for key in self.changed.drain(..) {
            if seen.insert(key.clone()) {
                let value = self.winners[&key].1.clone();
                output.push((key, value));
            }
        }
    }
}

/// Extension trait: keep the newest value per key.
pub trait LatestByKey<'scope, T: Timestamp, K, O, V> {
    /// Reports `(key, value)` each epoch in which the greatest-`order` record of a key changes.
    /// `route` must give equal keys equal numbers in every process.
    fn latest_by_key<R>(
        self,
        watermarks: StreamVec<'scope, T, i64>,
        name: &str,
        route: R,
    ) -> StreamVec<'scope, T, (K, V)>
    where
        R: Fn(&K) -> u64 + 'static;
}

impl<'scope, T, K, O, V> LatestByKey<'scope, T, K, O, V> for StreamVec<'scope, T, (K, O, V)>
where
    T: Timestamp + TotalOrder,
    K: ExchangeData + Hash + Eq + Clone,
    O: ExchangeData + Ord,
    V: ExchangeData + Clone,
{
    fn latest_by_key<R>(
        self,
        watermarks: StreamVec<'scope, T, i64>,
        name: &str,
        route: R,
    ) -> StreamVec<'scope, T, (K, V)>
    where
        R: Fn(&K) -> u64 + 'static,
    {
        self.maintain(
            watermarks,
            name,
            move |record: &(K, O, V)| route(&record.0),
            Latest::default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Oracle: after any arrival order, split into any epochs, the reported values per key
        /// (last report wins) equal the from-scratch maximum, and each close reports exactly
        /// the keys whose winner moved.
        #[test]
        fn equals_from_scratch(
            records in prop::collection::vec((0u8..6, 0u32..50, 0u16..1000), 0..200),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let mut state = Latest::default();
            let mut reported: HashMap<u8, u16> = HashMap::new();
            let mut cut_points: Vec<usize> = cuts.iter().map(|i| i.index(records.len() + 1)).collect();
            cut_points.push(records.len());
            cut_points.sort();
            let mut start = 0;
            for cut in cut_points {
                let before = state.winners.clone();
                for &(k, o, v) in &records[start..cut] {
                    state.apply((k, (o, v), v));
                }
                let mut out = Vec::new();
                state.close(0, &mut out);
                for (k, v) in &out {
                    reported.insert(*k, *v);
                }
                // Exactly the keys whose winner changed were reported, once each.
                let mut keys: Vec<u8> = out.iter().map(|(k, _)| *k).collect();
                keys.sort();
                let mut expected: Vec<u8> = state.winners.iter()
                    .filter(|(k, w)| before.get(*k).map(|b| b.0 != w.0) .unwrap_or(true))
                    .map(|(k, _)| *k).collect();
                expected.sort();
                prop_assert_eq!(keys, expected);
                start = cut;
            }
            let mut scratch: HashMap<u8, ((u32, u16), u16)> = HashMap::new();
            for &(k, o, v) in &records {
                let e = scratch.entry(k).or_insert(((o, v), v));
                if (o, v) > e.0 { *e = ((o, v), v); }
            }
            let scratch: HashMap<u8, u16> = scratch.into_iter().map(|(k, (_, v))| (k, v)).collect();
            prop_assert_eq!(reported, scratch);
        }
    }
}
