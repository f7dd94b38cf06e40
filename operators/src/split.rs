//! `split`: one stream into several by a function of each record, every record moved once.
//!
//! Timely's own `partition` gathers each incoming batch into a growing vector per part before it
//! builds the outgoing containers, so a record is moved three times and the vectors grow from
//! empty on every batch. With records of a couple of hundred bytes (events) those copies and
//! re-allocations showed in the replay's profile. Here each record goes from the incoming batch
//! straight into its part's output buffer, whose containers keep their capacity.
//!
//! ```
//! use keel_operators::split::Split;
//! use timely::dataflow::operators::vec::ToStream;
//! use timely::dataflow::operators::Inspect;
//!
//! timely::example(|scope| {
//!     let parts = (0..10u32).to_stream(scope).split(2, "EvenOdd", |n| (n % 2) as usize);
//!     parts[0].clone().inspect(|n| assert!(n % 2 == 0));
//!     parts[1].clone().inspect(|n| assert!(n % 2 == 1));
//! });
//! ```

use timely::container::CapacityContainerBuilder;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::progress::Timestamp;
use timely::progress::operate::FrontierInterest;

/// Splits a stream of records into `parts` streams.
pub trait Split<'scope, T: Timestamp, D> {
    /// Sends each record to the stream at `route(&record)`, which must be below `parts`; the
    /// order of records within each part is their order in the input.
    ///
    /// Panics if `route` returns `parts` or more.
    fn split<F>(self, parts: usize, name: &str, route: F) -> Vec<StreamVec<'scope, T, D>>
    where
        F: FnMut(&D) -> usize + 'static;
}

impl<'scope, T: Timestamp, D: 'static> Split<'scope, T, D> for StreamVec<'scope, T, D> {
    fn split<F>(self, parts: usize, name: &str, mut route: F) -> Vec<StreamVec<'scope, T, D>>
    where
        F: FnMut(&D) -> usize + 'static,
    {
        let mut builder = OperatorBuilder::new(name.to_owned(), self.scope());
        let mut input = builder.new_input(self, Pipeline);
        builder.set_notify_for(0, FrontierInterest::Never);
        let (mut outputs, streams): (Vec<_>, Vec<_>) = (0..parts)
            .map(|_| {
                let (output, stream) = builder.new_output::<Vec<D>>();
                (
                    OutputBuilder::<T, CapacityContainerBuilder<Vec<D>>>::from(output),
                    stream,
                )
            })
            .unzip();
        builder.build(move |_capabilities| {
            move |_frontiers| {
                let mut handles: Vec<_> = outputs.iter_mut().map(OutputBuilder::activate).collect();
                input.for_each(|capability, data| {
                    let mut sessions: Vec<_> = handles
                        .iter_mut()
                        .map(|handle| handle.session(&capability))
                        .collect();
                    for record in data.drain(..) {
                        let part = route(&record);
                        sessions[part].give(record);
                    }
                });
            }
        });
        streams
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::{Arc, Mutex};
    use timely::dataflow::operators::vec::Input;
    use timely::dataflow::operators::{Inspect, Probe, probe};

    /// What each part received, as (epoch, record) in arrival order.
    type Received = Arc<Mutex<Vec<Vec<(u64, u32)>>>>;

    proptest! {
        /// Every record reaches exactly the part its route names, at its epoch, and each part
        /// keeps the input's order.
        #[test]
        fn records_reach_their_part_in_order(
            epochs in proptest::collection::vec(proptest::collection::vec(0u32..1000, 0..300), 1..4),
            parts in 1usize..5,
        ) {
            let seen: Received = Arc::new(Mutex::new(vec![Vec::new(); parts]));
            let sink = seen.clone();
            let sent = epochs.clone();
            timely::execute(timely::Config::thread(), move |worker| {
                let probe = probe::Handle::new();
                let sink = sink.clone();
                let mut input = worker.dataflow::<u64, _, _>(|scope| {
                    let (input, records) = scope.new_input::<u32>();
                    let split = records.split(parts, "Test", move |n| *n as usize % parts);
                    for (part, stream) in split.into_iter().enumerate() {
                        let sink = sink.clone();
                        stream
                            .inspect_core(move |event| {
                                if let Ok((stamp, data)) = event {
                                    let time = *stamp.least().expect("records carry a time");
                                    sink.lock().unwrap()[part].extend(data.iter().map(|n| (time, *n)));
                                }
                            })
                            .probe_with(&probe);
                    }
                    input
                });
                for (epoch, records) in sent.iter().enumerate() {
                    for &n in records {
                        input.send(n);
                    }
                    input.advance_to(epoch as u64 + 1);
                    while probe.less_than(&(epoch as u64 + 1)) {
                        worker.step();
                    }
                }
            })
            .unwrap();
            let seen = seen.lock().unwrap();
            for (part, got) in seen.iter().enumerate() {
                let expected: Vec<(u64, u32)> = epochs
                    .iter()
                    .enumerate()
                    .flat_map(|(epoch, records)| records.iter().map(move |&n| (epoch as u64, n)))
                    .filter(|(_, n)| *n as usize % parts == part)
                    .collect();
                prop_assert_eq!(got, &expected, "part {}", part);
            }
        }
    }
}
