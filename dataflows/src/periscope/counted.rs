//! Per-key counters over distinct events: `routing_hourly` and `unknown_events`.
//!
//! Both count events, so both keep the ids already counted per key: a repeated event id counts
//! once, whatever the order. Each key reports its row when it changed at close.

use std::collections::HashMap;

use keel_operators::idset::IdSet;
use keel_operators::maintain::EpochState;
use keel_operators::sym::Sym;
use keel_operators::table::Change;
use keel_operators::time::{HOUR, window_start};
use keel_sources::event::{Event, EventKind};
use rustc_hash::FxBuildHasher;
use uuid::Uuid;

use super::rows::{PeriscopeChange, RoutingRow, UnknownEventRow};
use super::streams::micro;

/// The events counted under one key, their accumulator, and whether it changed since close.
#[derive(Debug, Default)]
struct Entry<A> {
    ids: IdSet,
    sums: A,
    dirty: bool,
}

/// Keys with the events already counted under them, and which keys changed.
#[derive(Debug)]
struct Counted<K, A> {
    keys: HashMap<K, Entry<A>, FxBuildHasher>,
    dirty: Vec<K>,
}

impl<K, A> Default for Counted<K, A> {
    fn default() -> Self {
        Counted {
            keys: HashMap::default(),
            dirty: Vec::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Copy, A: Default> Counted<K, A> {
    /// The accumulator of `key` if `id` is new under it.
    fn first_time(&mut self, key: K, id: Uuid) -> Option<&mut A> {
        let entry = self.keys.entry(key).or_default();
        if !entry.ids.insert(id.as_u128()) {
            return None;
        }
        if !entry.dirty {
            entry.dirty = true;
            self.dirty.push(key);
        }
        Some(&mut entry.sums)
    }

    /// Starts loading the places in `key`'s id set that `first_time(key, id)` will look `id` up
    /// in, if `key` is held (the key's own entry is read now: the map holds a few keys).
    fn prefetch(&self, key: &K, id: Uuid) {
        if let Some(entry) = self.keys.get(key) {
            entry.ids.prefetch(id.as_u128());
        }
    }

    /// Drains the changed keys with their accumulators.
    fn drain_dirty(&mut self, mut each: impl FnMut(K, &A)) {
        for key in self.dirty.drain(..) {
            let entry = self.keys.get_mut(&key).expect("dirty keys are held");
            entry.dirty = false;
            each(key, &entry.sums);
        }
    }
}

/// Sums of one tenant-hour of decisions.
#[derive(Debug, Default)]
struct HourSums {
    decisions: u64,
    successes: u64,
    /// Exact sums (micro-kilometres, integer scores) so averages do not depend on arrival order.
    distance_micro_sum: i128,
    distance_n: u64,
    score_sum: u128,
    score_n: u64,
}

/// The per-worker state of `routing_hourly`.
#[derive(Debug, Default)]
pub struct RoutingState {
    hours: Counted<(Uuid, i64), HourSums>,
}

/// Routes a routing decision by tenant and hour.
pub fn route_routing(event: &Event) -> u64 {
    (event.tenant.as_u128() as u64) ^ (window_start(event.time, HOUR) as u64).rotate_left(29)
}

impl EpochState for RoutingState {
    type Input = Event;
    type Output = PeriscopeChange;

    fn prefetch(&self, event: &Event) {
        if let EventKind::Routing(_) = &event.kind {
            self.hours
                .prefetch(&(event.tenant, window_start(event.time, HOUR)), event.id);
        }
    }

    fn apply(&mut self, event: Event) {
        let EventKind::Routing(decision) = &event.kind else {
            return;
        };
        let key = (event.tenant, window_start(event.time, HOUR));
        if let Some(sums) = self.hours.first_time(key, event.id) {
            sums.decisions += 1;
            if decision.status.as_str() == "success" {
                sums.successes += 1;
            }
            if let Some(km) = decision.distance() {
                sums.distance_micro_sum += micro(km);
                sums.distance_n += 1;
            }
            if let Some(score) = decision.score {
                sums.score_sum += u128::from(score);
                sums.score_n += 1;
            }
        }
    }

    fn close(&mut self, _watermark: i64, output: &mut Vec<PeriscopeChange>) {
        self.hours.drain_dirty(|key, sums| {
            output.push(PeriscopeChange::RoutingHourly(Change::Upsert(RoutingRow {
                tenant_id: Sym::new(&key.0.to_string()),
                hour: key.1,
                decisions: sums.decisions,
                successes: sums.successes,
                avg_distance_km: (sums.distance_n > 0)
                    .then(|| sums.distance_micro_sum as f64 / sums.distance_n as f64 / 1e6),
                avg_score: (sums.score_n > 0).then(|| sums.score_sum as f64 / sums.score_n as f64),
            })));
        });
    }
}

/// Count and newest sample of one unknown event type.
#[derive(Debug, Default)]
struct UnknownSums {
    events: u64,
    newest: Option<(i64, Uuid)>,
    sample: String,
}

/// The per-worker state of `unknown_events`.
#[derive(Debug, Default)]
pub struct UnknownState {
    types: Counted<(Uuid, Sym), UnknownSums>,
}

/// Routes an unknown event by tenant and type.
pub fn route_unknown(event: &Event) -> u64 {
    let kind = match &event.kind {
        EventKind::Unknown(u) => u.event_type.stable_hash(),
        _ => 0,
    };
    (event.tenant.as_u128() as u64) ^ kind
}

impl EpochState for UnknownState {
    type Input = Event;
    type Output = PeriscopeChange;

    fn apply(&mut self, event: Event) {
        let EventKind::Unknown(unknown) = event.kind else {
            return;
        };
        let key = (event.tenant, unknown.event_type);
        if let Some(sums) = self.types.first_time(key, event.id) {
            sums.events += 1;
            let stamp = (event.time, event.id);
            if sums.newest.is_none_or(|newest| newest < stamp) {
                sums.newest = Some(stamp);
                sums.sample = crate::privacy::scrub_json(&unknown.json);
            }
        }
    }

    fn close(&mut self, _watermark: i64, output: &mut Vec<PeriscopeChange>) {
        self.types.drain_dirty(|key, sums| {
            output.push(PeriscopeChange::UnknownEvents(Change::Upsert(
                UnknownEventRow {
                    tenant_id: Sym::new(&key.0.to_string()),
                    event_type: key.1,
                    events: sums.events,
                    last_seen: sums.newest.map_or(0, |(time, _)| time),
                    sample: sums.sample.clone(),
                },
            )));
        });
    }
}
