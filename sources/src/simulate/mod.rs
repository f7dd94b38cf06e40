//! A deterministic simulator of a FrameWorks fleet, producing records in either wire version.
//!
//! The fleet: a few tenants, edge nodes in real cities, streams that start, run and end, and
//! viewers from many countries who are routed (a `load_balancing` decision), connect, watch and
//! disconnect. Streams and nodes are polled every 10 s of simulated time, as Helmsman does;
//! buffers occasionally run dry and recover; now and then an event of a type Keel does not know
//! appears. A configurable share of extra, malformed records is mixed in — drawn from a separate
//! random stream, so the good records are the same with or without them.
//!
//! Everything follows from the seed: the same [`SimConfig`] gives the same records, byte for
//! byte, on every machine. Simulated time is independent of wall time; a rate limit, if any, is
//! the caller's business (see [`SimSource`]).
//!
//! ```
//! use keel_sources::simulate::{SimConfig, Simulator};
//! let mut a = Simulator::new(SimConfig { seed: 7, ..SimConfig::default() });
//! let mut b = Simulator::new(SimConfig { seed: 7, ..SimConfig::default() });
//! let (mut x, mut y) = (Vec::new(), Vec::new());
//! for _ in 0..1000 {
//!     x.clear();
//!     y.clear();
//!     assert_eq!(a.next_record(&mut x).event_type, b.next_record(&mut y).event_type);
//!     assert_eq!(x, y);
//! }
//! ```

mod encode;
mod fleet;
mod source;

pub use fleet::{SimConfig, Simulator, Wire};
pub use source::{SimSource, headers, write_kcat_line};

/// One record the simulator produced: headers as a producer would set them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimRecord {
    /// `event_type` header (empty for records too broken to have one).
    pub event_type: &'static str,
    /// `tenant_id` header (empty when the record deliberately lacks one).
    pub tenant_id: String,
    /// `event_id` header and Kafka key.
    pub event_id: String,
    /// `source` header.
    pub source: &'static str,
    /// Simulated event time, ms.
    pub time: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode;
    use crate::event::EventKind;
    use crate::record::{Headers, Position, Record};
    use std::collections::BTreeMap;

    fn decode_all(
        config: SimConfig,
        n: usize,
    ) -> Vec<Result<crate::event::Event, crate::error::IngestError>> {
        let mut sim = Simulator::new(config);
        let mut out = Vec::new();
        (0..n)
            .map(|seq| {
                out.clear();
                let record = sim.next_record(&mut out);
                let mut headers = Headers::default();
                if !record.tenant_id.is_empty() {
                    headers.set("tenant_id", record.tenant_id.into());
                }
                decode(&Record {
                    position: Position::Simulated { seq: seq as u64 },
                    value: &out,
                    headers,
                })
            })
            .collect()
    }

    #[test]
    fn every_good_record_decodes_and_the_fleet_is_busy() {
        for wire in [Wire::V1, Wire::V2] {
            let events = decode_all(
                SimConfig {
                    seed: 3,
                    wire,
                    ..SimConfig::default()
                },
                20_000,
            );
            let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
            for event in &events {
                let event = event
                    .as_ref()
                    .unwrap_or_else(|e| panic!("{wire:?}: {} in {}", e.reason, e.excerpt));
                *kinds.entry(event.kind.type_name()).or_default() += 1;
            }
            for kind in [
                "viewer_connect",
                "viewer_disconnect",
                "load_balancing",
                "stream_lifecycle_update",
                "node_lifecycle_update",
                "push_rewrite",
                "stream_track_list",
            ] {
                assert!(
                    kinds.get(kind).copied().unwrap_or(0) > 10,
                    "{wire:?}: too few {kind}: {kinds:?}"
                );
            }
            let countries: std::collections::BTreeSet<_> = events
                .iter()
                .filter_map(|e| match &e.as_ref().unwrap().kind {
                    EventKind::ViewerConnect(c) => Some(c.place.country),
                    _ => None,
                })
                .collect();
            assert!(
                countries.len() >= 10,
                "viewers come from many countries: {countries:?}"
            );
        }
    }

    /// A fleet is sized for its traffic, busy (eight times the viewers a node carries at full
    /// load in a small fleet) or modest (where some nodes stay at their base size, and their
    /// links must still carry them): once sessions reach their steady number, nodes report
    /// healthy loads within their links, so there are nodes to route viewers to.
    #[test]
    fn a_fleet_is_sized_for_its_traffic() {
        for (arrivals, session, least) in [(400.0, 20.0, 1_000), (25.0, 240.0, 500)] {
            let events = decode_all(
                SimConfig {
                    seed: 5,
                    arrivals_per_second: arrivals,
                    mean_session_s: session,
                    ..SimConfig::default()
                },
                90_000,
            );
            let nodes: Vec<_> = events[60_000..]
                .iter()
                .filter_map(|e| match &e.as_ref().ok()?.kind {
                    EventKind::NodeUpdate(n) => Some(n.clone()),
                    _ => None,
                })
                .collect();
            assert!(nodes.len() > 20, "{}", nodes.len());
            let busiest = nodes.iter().map(|n| n.connections).max().unwrap();
            assert!(
                busiest > least,
                "{arrivals}/s: {busiest} viewers on the busiest node"
            );
            for node in &nodes {
                assert!(node.is_healthy, "{node:?}");
                assert!(node.cpu_tenths < 900, "{node:?}");
                assert!(node.up_speed < node.bw_limit, "{node:?}");
            }
        }
    }

    #[test]
    fn both_wires_describe_the_same_events() {
        let v1 = decode_all(
            SimConfig {
                seed: 11,
                wire: Wire::V1,
                ..SimConfig::default()
            },
            5_000,
        );
        let v2 = decode_all(
            SimConfig {
                seed: 11,
                wire: Wire::V2,
                ..SimConfig::default()
            },
            5_000,
        );
        for (i, (a, b)) in v1.iter().zip(&v2).enumerate() {
            let (a, mut b) = (a.as_ref().unwrap(), b.clone().unwrap());
            if let (EventKind::Unknown(_), EventKind::Unknown(_)) = (&a.kind, &b.kind) {
                continue;
            }
            // Version 1 has no capabilities, stream map or connection count: only version 2
            // carries them, and they must be there.
            if let EventKind::NodeUpdate(n) = &mut b.kind {
                assert!(!n.capabilities.is_empty(), "record {i}: {n:?}");
                n.capabilities.clear();
                n.streams.clear();
                n.connections = 0;
            }
            assert_eq!(a, &b, "record {i}");
        }
    }

    #[test]
    fn malformed_records_are_extra_and_refused() {
        let clean = decode_all(
            SimConfig {
                seed: 5,
                ..SimConfig::default()
            },
            4_000,
        );
        let dirty = decode_all(
            SimConfig {
                seed: 5,
                malformed: 0.05,
                ..SimConfig::default()
            },
            4_200,
        );
        let good: Vec<_> = dirty
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .cloned()
            .collect();
        let bad: Vec<_> = dirty.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            bad.len() > 120 && bad.len() < 300,
            "about 5 %: {}",
            bad.len()
        );
        let clean: Vec<_> = clean.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            &good[..],
            &clean[..good.len()],
            "good records are unchanged by the bad ones"
        );
        let reasons: std::collections::BTreeSet<_> = bad
            .iter()
            .map(|e| e.reason.split(':').next().unwrap().to_owned())
            .collect();
        assert!(reasons.len() >= 4, "several kinds of damage: {reasons:?}");
    }
}
