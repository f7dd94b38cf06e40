//! `maintain`: keep per-worker state up to date with a stream and emit its changes per epoch.
//!
//! Timely time in Keel is the ingestion epoch; event time is data. A maintained state receives
//! the records routed to its worker, applies them in epoch order, and when an epoch is complete
//! (both input frontiers have passed it) it is *closed*: the state reports what changed, as output
//! records at that epoch. Several epochs completing together are closed once, at the latest of them,
//! which is how the operator keeps up when it falls behind. Records of the oldest open epoch are
//! applied as they arrive once nothing of an earlier epoch can still come; records of later epochs
//! wait for it, so the order holds while an epoch's records are not all kept until its end.
//!
//! The second input carries watermarks: the newest event time seen by each worker in an epoch,
//! broadcast to every worker (see [`GlobalWatermark`]). A state reads the highest one at close,
//! so every worker agrees on "now" for each epoch, whatever share of the events it holds.
//!
//! The contract for an [`EpochState`] is what makes results a function of the multiset of events:
//! `apply` must commute (the same inputs in any order give the same state), and `close` must
//! report the difference between what it reported before and what the state says now.
//!
//! ```
//! use keel_operators::maintain::{EpochState, Maintain, GlobalWatermark};
//! use timely::dataflow::operators::{ToStream, Capture, capture::Extract};
//!
//! /// Counts records per parity, reporting the counts that changed.
//! #[derive(Default)]
//! struct Parity { counts: [u64; 2], dirty: [bool; 2] }
//! impl EpochState for Parity {
//!     type Input = u64;
//!     type Output = (u64, u64);
//!     fn apply(&mut self, x: u64) { self.counts[(x % 2) as usize] += 1; self.dirty[(x % 2) as usize] = true; }
//!     fn close(&mut self, _watermark: i64, out: &mut Vec<(u64, u64)>) {
//!         for p in 0..2 { if std::mem::take(&mut self.dirty[p]) { out.push((p as u64, self.counts[p])); } }
//!     }
//! }
//!
//! let captured = timely::example(|scope| {
//!     let watermarks = (0..1i64).to_stream(scope).global_watermark();
//!     (0..10u64).to_stream(scope).maintain(watermarks, "parity", |x| *x, Parity::default()).capture()
//! });
//! let mut out: Vec<_> = captured.extract().into_iter().flat_map(|(_, d)| d).collect();
//! out.sort();
//! assert_eq!(out, vec![(0, 5), (1, 5)]);
//! ```

use std::collections::BTreeMap;

use timely::ExchangeData;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Capability, InputCapability};
use timely::order::TotalOrder;
use timely::progress::Timestamp;

/// State kept by one worker of a [`Maintain::maintain`] operator.
pub trait EpochState: 'static {
    /// The records the state absorbs.
    type Input;
    /// The change records it reports when an epoch closes.
    type Output;
    /// Absorbs one record. Applying the same records in any order must give the same state.
    fn apply(&mut self, input: Self::Input);
    /// A hint that `input` is [`PREFETCH_AHEAD`] records from being applied (fewer for the
    /// first records of each run applied at once: a message, or what an epoch held back):
    /// states whose look-ups miss the cache start loading what it will touch (see
    /// [`prefetch`](crate::prefetch)). Must not change what the state holds or reports.
    fn prefetch(&self, _input: &Self::Input) {}
    /// A second hint, [`PREFETCH_NEAR`] records before `input` is applied, when what
    /// [`prefetch`](EpochState::prefetch) asked for has most likely arrived: for look-ups
    /// through two dependent loads (an index, then the entry it names), the first hint loads the
    /// index and this one reads it and loads the entry (for the first records of each run the
    /// two hints come one after the other, and this one waits for the index). Must not change
    /// what the state holds or reports.
    fn prefetch_near(&self, _input: &Self::Input) {}
    /// Reports every change since the previous close. `watermark` is the newest event time any
    /// worker has seen up to this epoch (`i64::MIN` before the first event).
    fn close(&mut self, watermark: i64, output: &mut Vec<Self::Output>);
}

/// Records between [`EpochState::prefetch`] hearing of a record and its apply: enough for a
/// line to arrive from memory while the records before it are applied.
pub const PREFETCH_AHEAD: usize = 8;

/// Records between [`EpochState::prefetch_near`] and the apply: half of [`PREFETCH_AHEAD`], so
/// that each of the two dependent loads has about as many applies to arrive in.
pub const PREFETCH_NEAR: usize = PREFETCH_AHEAD / 2;
const _: () = assert!(PREFETCH_NEAR >= 1 && PREFETCH_NEAR < PREFETCH_AHEAD);

/// Applies `records` in order, hinting each one [`PREFETCH_AHEAD`] and again [`PREFETCH_NEAR`]
/// records before it is applied, so that look-ups of neighbouring records overlap their cache
/// misses.
fn absorb<S: EpochState>(state: &mut S, records: &mut Vec<S::Input>) {
    let mut records = records.drain(..);
    for record in records.as_slice().iter().take(PREFETCH_AHEAD) {
        state.prefetch(record);
    }
    for record in records.as_slice().iter().take(PREFETCH_NEAR) {
        state.prefetch_near(record);
    }
    while let Some(record) = records.next() {
        let rest = records.as_slice();
        if let Some(ahead) = rest.get(PREFETCH_AHEAD - 1) {
            state.prefetch(ahead);
        }
        if let Some(near) = rest.get(PREFETCH_NEAR - 1) {
            state.prefetch_near(near);
        }
        state.apply(record);
    }
}

/// Records pending for one epoch, with the capability to answer at it.
struct Pending<T: Timestamp, I> {
    capability: Capability<T>,
    records: Vec<I>,
    watermark: i64,
}

impl<T: Timestamp + TotalOrder, I> Pending<T, I> {
    fn new(capability: &InputCapability<T>, port: usize) -> Self {
        Pending {
            capability: capability
                .retain_least(port)
                .expect("only messages with a least time are pending"),
            records: Vec::new(),
            watermark: i64::MIN,
        }
    }
}

/// Extension trait: maintain an [`EpochState`] per worker over a stream.
pub trait Maintain<'scope, T: Timestamp, I> {
    /// Routes each record to worker `route(record) % peers`, applies it to that worker's `state`,
    /// and emits the state's changes whenever epochs complete. `watermarks` must already be
    /// global (see [`GlobalWatermark::global_watermark`]).
    fn maintain<S, R>(
        self,
        watermarks: StreamVec<'scope, T, i64>,
        name: &str,
        route: R,
        state: S,
    ) -> StreamVec<'scope, T, S::Output>
    where
        S: EpochState<Input = I>,
        R: Fn(&I) -> u64 + 'static;
}

impl<'scope, T, I> Maintain<'scope, T, I> for StreamVec<'scope, T, I>
where
    T: Timestamp + TotalOrder,
    I: ExchangeData,
{
    fn maintain<S, R>(
        self,
        watermarks: StreamVec<'scope, T, i64>,
        name: &str,
        route: R,
        mut state: S,
    ) -> StreamVec<'scope, T, S::Output>
    where
        S: EpochState<Input = I>,
        R: Fn(&I) -> u64 + 'static,
    {
        let exchange = Exchange::new(move |record: &I| route(record));
        self.binary_frontier(watermarks, exchange, Pipeline, name, move |_, _| {
            let mut pending: BTreeMap<T, Pending<T, I>> = BTreeMap::new();
            let mut watermark = i64::MIN;
            let mut changes = Vec::new();
            move |(records, records_frontier), (marks, marks_frontier), output| {
                // The oldest open epoch's records can be absorbed before it completes once
                // nothing of an earlier epoch can still come (every earlier one is closed):
                // the epoch's records are then not all held until its end, only its changes.
                let settled = |time: &T| {
                    records_frontier
                        .frontier()
                        .iter()
                        .all(|f| time.less_equal(f))
                        && marks_frontier.frontier().iter().all(|f| time.less_equal(f))
                };
                records.for_each(|cap, data| match cap.least() {
                    Some(time) => {
                        let oldest = pending
                            .first_key_value()
                            .is_none_or(|(first, _)| time.less_equal(first));
                        let entry = pending
                            .entry(time.clone())
                            .or_insert_with(|| Pending::new(&cap, output.output_index()));
                        // Straight from the message when it may be absorbed already: each
                        // record is then moved once less.
                        if oldest && settled(time) {
                            absorb(&mut state, data);
                        } else {
                            entry.records.append(data);
                        }
                    }
                    // A message under no capability claims no epoch: absorb it now.
                    None => absorb(&mut state, data),
                });
                marks.for_each(|cap, data| {
                    if let Some(time) = cap.least() {
                        let entry = pending
                            .entry(time.clone())
                            .or_insert_with(|| Pending::new(&cap, output.output_index()));
                        entry.watermark = data.iter().copied().fold(entry.watermark, i64::max);
                    } else {
                        watermark = data.iter().copied().fold(watermark, i64::max);
                    }
                });
                let complete = |time: &T| {
                    !records_frontier.frontier().less_equal(time)
                        && !marks_frontier.frontier().less_equal(time)
                };
                let mut latest = None;
                while let Some(entry) = pending.first_entry() {
                    if !complete(entry.key()) {
                        break;
                    }
                    let mut epoch = entry.remove();
                    watermark = watermark.max(epoch.watermark);
                    absorb(&mut state, &mut epoch.records);
                    latest = Some(epoch.capability);
                }
                if let Some(capability) = latest {
                    state.close(watermark, &mut changes);
                    if !changes.is_empty() {
                        output.session(&capability).give_iterator(changes.drain(..));
                    }
                }
                // What waited in the oldest open epoch, once it may be absorbed.
                if let Some(mut entry) = pending.first_entry()
                    && settled(entry.key())
                {
                    absorb(&mut state, &mut entry.get_mut().records);
                }
            }
        })
    }
}

/// Extension trait: turn per-worker watermarks into the global one every worker sees.
pub trait GlobalWatermark<'scope, T: Timestamp> {
    /// Broadcasts each worker's newest event time per epoch to every worker.
    fn global_watermark(self) -> StreamVec<'scope, T, i64>;
}

impl<'scope, T: Timestamp> GlobalWatermark<'scope, T> for StreamVec<'scope, T, i64> {
    fn global_watermark(self) -> StreamVec<'scope, T, i64> {
        self.broadcast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use timely::dataflow::operators::vec::Input;
    use timely::dataflow::operators::{Inspect, Probe, probe};

    /// (epoch, key, count, watermark) as reported.
    type Report = (u64, u8, u64, i64);

    /// Counts records per key and reports the counts that changed.
    #[derive(Default)]
    struct Counts {
        counts: HashMap<u8, u64>,
        changed: Vec<u8>,
    }

    impl EpochState for Counts {
        type Input = u8;
        type Output = (u8, u64, i64);
        fn apply(&mut self, key: u8) {
            *self.counts.entry(key).or_default() += 1;
            self.changed.push(key);
        }
        fn close(&mut self, watermark: i64, out: &mut Vec<(u8, u64, i64)>) {
            self.changed.sort_unstable();
            self.changed.dedup();
            for key in self.changed.drain(..) {
                out.push((key, self.counts[&key], watermark));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// On three workers, with records spread over random epochs and workers, the last report
        /// per key is the true count, and every report carries the watermark of its epoch. The
        /// workers either wait for each epoch to complete or send every epoch before stepping,
        /// so that records of several epochs are in flight together, and may step after every
        /// record, so that records are absorbed while their epoch is still open.
        #[test]
        fn reports_equal_from_scratch_counts(
            records in prop::collection::vec((0u8..12, 0u64..6, 0usize..3, 0i64..1000), 1..300),
            wait_each_epoch in any::<bool>(),
            step_each_record in any::<bool>(),
        ) {
            let reports: Arc<Mutex<Vec<Report>>> = Arc::default();
            let collected = reports.clone();
            let input = records.clone();
            timely::execute(timely::Config::process(3), move |worker| {
                let index = worker.index();
                let probe = probe::Handle::new();
                let sink = collected.clone();
                let (mut keys, mut marks) = worker.dataflow::<u64, _, _>(|scope| {
                    let (keys_in, keys) = scope.new_input::<u8>();
                    let (marks_in, marks) = scope.new_input::<i64>();
                    keys.maintain(marks.global_watermark(), "Counts", |k: &u8| u64::from(*k), Counts::default())
                        .inspect_core(move |event| {
                            if let Ok((stamp, data)) = event {
                                let time = *stamp.least().expect("reports carry a time");
                                sink.lock().unwrap().extend(data.iter().map(|(k, n, w)| (time, *k, *n, *w)));
                            }
                        })
                        .probe_with(&probe);
                    (keys_in, marks_in)
                });
                for epoch in 0..6u64 {
                    for &(key, e, w, t) in &input {
                        if e == epoch && w == index {
                            keys.send(key);
                            marks.send(t);
                            if step_each_record {
                                worker.step();
                            }
                        }
                    }
                    keys.advance_to(epoch + 1);
                    marks.advance_to(epoch + 1);
                    while wait_each_epoch && probe.less_than(&(epoch + 1)) {
                        worker.step();
                    }
                }
                while probe.less_than(&6) {
                    worker.step();
                }
            })
            .unwrap();
            let mut reports = reports.lock().unwrap().clone();
            reports.sort();
            let mut last: HashMap<u8, u64> = HashMap::new();
            for &(time, key, count, watermark) in &reports {
                last.insert(key, count);
                let expected_mark = records.iter().filter(|r| r.1 <= time).map(|r| r.3).max().unwrap_or(i64::MIN);
                prop_assert_eq!(watermark, expected_mark, "epoch {}", time);
                let expected_count = records.iter().filter(|r| r.0 == key && r.1 <= time).count() as u64;
                prop_assert_eq!(count, expected_count, "key {} at epoch {}", key, time);
            }
            let mut truth: HashMap<u8, u64> = HashMap::new();
            for r in &records {
                *truth.entry(r.0).or_default() += 1;
            }
            prop_assert_eq!(last, truth);
        }
    }

    /// Counts what it absorbed, where the test can see it.
    struct Absorbed(Arc<Mutex<u64>>);

    impl EpochState for Absorbed {
        type Input = u8;
        type Output = u64;
        fn apply(&mut self, _: u8) {
            *self.0.lock().unwrap() += 1;
        }
        fn close(&mut self, _: i64, out: &mut Vec<u64>) {
            out.push(*self.0.lock().unwrap());
        }
    }

    /// Records of the oldest open epoch are absorbed as they come, not held until it ends; its
    /// report still comes once, when it completes, and counts each record once.
    #[test]
    fn the_open_epoch_is_absorbed_as_it_comes() {
        let seen: Arc<Mutex<u64>> = Arc::default();
        let reports: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
        let sink = reports.clone();
        timely::execute(timely::Config::thread(), move |worker| {
            let probe = probe::Handle::new();
            let state = Absorbed(seen.clone());
            let (sink, reported) = (sink.clone(), sink.clone());
            let (mut keys, mut marks) = worker.dataflow::<u64, _, _>(|scope| {
                let (keys_in, keys) = scope.new_input::<u8>();
                let (marks_in, marks) = scope.new_input::<i64>();
                keys.maintain(marks.global_watermark(), "Absorbed", |_| 0, state)
                    .inspect_core(move |event| {
                        if let Ok((stamp, data)) = event {
                            let time = *stamp.least().expect("reports carry a time");
                            sink.lock().unwrap().extend(data.iter().map(|n| (time, *n)));
                        }
                    })
                    .probe_with(&probe);
                (keys_in, marks_in)
            });
            for epoch in 0..2u64 {
                for key in 0..100u8 {
                    keys.send(key);
                    if key % 10 == 9 {
                        keys.flush();
                        for _ in 0..5 {
                            worker.step();
                        }
                    }
                }
                assert_eq!(
                    *seen.lock().unwrap(),
                    100 * (epoch + 1),
                    "every record sent so far is absorbed while epoch {epoch} is open"
                );
                assert_eq!(
                    reported.lock().unwrap().len() as u64,
                    epoch,
                    "no report before the end"
                );
                marks.send(0);
                keys.advance_to(epoch + 1);
                marks.advance_to(epoch + 1);
                while probe.less_than(&(epoch + 1)) {
                    worker.step();
                }
            }
        })
        .unwrap();
        assert_eq!(*reports.lock().unwrap(), vec![(0, 100), (1, 200)]);
    }

    /// What [`Hinted`] heard of a record.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Step {
        Ahead,
        Near,
        Apply,
    }

    /// Notes every hint (through a cell: hints see the state shared) and apply, in order.
    #[derive(Default)]
    struct Hinted {
        steps: std::cell::RefCell<Vec<(Step, u32)>>,
    }

    impl EpochState for Hinted {
        type Input = u32;
        type Output = ();
        fn apply(&mut self, record: u32) {
            self.steps.get_mut().push((Step::Apply, record));
        }
        fn prefetch(&self, record: &u32) {
            self.steps.borrow_mut().push((Step::Ahead, *record));
        }
        fn prefetch_near(&self, record: &u32) {
            self.steps.borrow_mut().push((Step::Near, *record));
        }
        fn close(&mut self, _watermark: i64, _out: &mut Vec<()>) {}
    }

    proptest! {
        /// `absorb` applies every record once, in order, and hints each one once of each
        /// kind, exactly `PREFETCH_AHEAD` and `PREFETCH_NEAR` applies before its own (fewer for
        /// the first records), the far hint first.
        #[test]
        fn absorb_hints_each_record_shortly_before_it(n in 0u32..40) {
            let records: Vec<u32> = (0..n).collect();
            let mut hinted = Hinted::default();
            let mut input = records.clone();
            absorb(&mut hinted, &mut input);
            prop_assert!(input.is_empty());
            let steps = hinted.steps.into_inner();
            let applied: Vec<u32> =
                steps.iter().filter(|s| s.0 == Step::Apply).map(|s| s.1).collect();
            prop_assert_eq!(&applied, &records);
            for &record in &records {
                let apply = steps.iter().position(|s| *s == (Step::Apply, record)).unwrap();
                let mut at = Vec::new();
                for (kind, distance) in [(Step::Ahead, PREFETCH_AHEAD), (Step::Near, PREFETCH_NEAR)] {
                    let hints: Vec<usize> =
                        (0..steps.len()).filter(|&i| steps[i] == (kind, record)).collect();
                    prop_assert_eq!(hints.len(), 1, "record {} hinted once {:?}", record, kind);
                    let applied_between =
                        steps[hints[0]..apply].iter().filter(|s| s.0 == Step::Apply).count();
                    prop_assert!(hints[0] < apply);
                    prop_assert_eq!(applied_between, (record as usize).min(distance));
                    at.push(hints[0]);
                }
                prop_assert!(at[0] < at[1], "record {}: the far hint first", record);
            }
        }
    }
}
