//! The pending-viewer window of one stream on one node, kept incrementally.
//!
//! Pending viewers are what a walk over the window's events in time order leaves: a decision
//! adds one, a connect takes one away if there is one. Such a walk is a function of the shape
//! `x ↦ max(x − a, 0) + b`, and these compose (a monoid, [`Clamp`]), so the window is a queue
//! of events with the composition of its contents kept up to date: appending (events mostly
//! arrive in time order) and expiring from the front are O(1) amortised, the classic two-stack
//! queue. An event older than the newest one rebuilds the queue (rare; O(window)).

use uuid::Uuid;

/// Order of events: event time, then event id.
pub type Stamp = (i64, Uuid);

/// `x ↦ max(x − take, 0) + give`: the effect of a run of events on the pending count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clamp {
    take: u64,
    give: u64,
}

impl Clamp {
    const DECISION: Clamp = Clamp { take: 0, give: 1 };
    const CONNECT: Clamp = Clamp { take: 1, give: 0 };

    fn of(decision: bool) -> Clamp {
        if decision {
            Clamp::DECISION
        } else {
            Clamp::CONNECT
        }
    }

    /// `self` first, then `next`.
    fn then(self, next: Clamp) -> Clamp {
        if self.give >= next.take {
            Clamp {
                take: self.take,
                give: self.give - next.take + next.give,
            }
        } else {
            Clamp {
                take: self.take + next.take - self.give,
                give: next.give,
            }
        }
    }
}

/// Decisions and connects in time order, with the pending count they leave.
#[derive(Debug, Default)]
pub struct Window {
    /// Oldest events, newest first (pop from the end), each with the composition of itself and
    /// every newer event of this stack.
    front: Vec<(Stamp, bool, Clamp)>,
    /// Newer events, oldest first, and their composition.
    back: Vec<(Stamp, bool)>,
    back_all: Clamp,
}

impl Window {
    /// True when no event is inside.
    pub fn is_empty(&self) -> bool {
        self.front.is_empty() && self.back.is_empty()
    }

    /// Pending viewers: decisions no later connect has answered.
    pub fn pending(&self) -> u64 {
        let front = self.front.last().map_or(Clamp::default(), |f| f.2);
        front.then(self.back_all).give
    }

    fn newest(&self) -> Option<Stamp> {
        self.back
            .last()
            .map(|b| b.0)
            .or_else(|| self.front.first().map(|f| f.0))
    }

    /// Adds an event; an event already inside (same stamp) changes nothing.
    pub fn insert(&mut self, stamp: Stamp, decision: bool) {
        match self.newest() {
            Some(newest) if stamp == newest => {}
            Some(newest) if stamp < newest => self.insert_late(stamp, decision),
            _ => {
                self.back.push((stamp, decision));
                self.back_all = self.back_all.then(Clamp::of(decision));
            }
        }
    }

    fn insert_late(&mut self, stamp: Stamp, decision: bool) {
        let mut all: Vec<(Stamp, bool)> = self
            .front
            .iter()
            .rev()
            .map(|f| (f.0, f.1))
            .chain(self.back.iter().copied())
            .collect();
        match all.binary_search_by(|e| e.0.cmp(&stamp)) {
            Ok(_) => return,
            Err(at) => all.insert(at, (stamp, decision)),
        }
        self.front.clear();
        self.back_all = all
            .iter()
            .fold(Clamp::default(), |acc, e| acc.then(Clamp::of(e.1)));
        self.back = all;
    }

    /// Drops every event at or before `horizon` (event time); returns whether any was dropped.
    pub fn expire(&mut self, horizon: i64) -> bool {
        let mut dropped = false;
        loop {
            if self.front.is_empty() {
                if self.back.first().is_none_or(|b| b.0.0 > horizon) {
                    return dropped;
                }
                // Move the back stack over, newest first, composing suffixes.
                let mut suffix = Clamp::default();
                for &(stamp, decision) in self.back.iter().rev() {
                    suffix = Clamp::of(decision).then(suffix);
                    self.front.push((stamp, decision, suffix));
                }
                self.back.clear();
                self.back_all = Clamp::default();
            }
            match self.front.last() {
                Some(oldest) if oldest.0.0 <= horizon => {
                    self.front.pop();
                    dropped = true;
                }
                _ => return dropped,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn walk(events: &[(Stamp, bool)]) -> u64 {
        let mut sorted = events.to_vec();
        sorted.sort();
        sorted.dedup_by_key(|e| e.0);
        sorted.iter().fold(0u64, |open, e| {
            if e.1 {
                open + 1
            } else {
                open.saturating_sub(1)
            }
        })
    }

    proptest! {
        /// Any interleaving of inserts (in and out of order, duplicated) and expiries leaves
        /// the count a plain walk over the surviving events gives.
        #[test]
        fn the_queue_equals_a_walk(
            ops in proptest::collection::vec((0i64..200, 0u8..4, any::<bool>(), 0u8..6), 0..200),
        ) {
            let mut window = Window::default();
            let mut alive: Vec<(Stamp, bool)> = Vec::new();
            let mut horizon = i64::MIN;
            for (time, id, decision, op) in ops {
                if op == 0 {
                    horizon = horizon.max(time - 100);
                    window.expire(horizon);
                    alive.retain(|e| e.0.0 > horizon);
                } else if time > horizon {
                    let stamp = (time, Uuid::from_u128(u128::from(id)));
                    // The first event with a stamp wins, as in the window.
                    if !alive.iter().any(|e| e.0 == stamp) {
                        alive.push((stamp, decision));
                    }
                    window.insert(stamp, decision);
                }
                prop_assert_eq!(window.pending(), walk(&alive));
                prop_assert_eq!(window.is_empty(), alive.is_empty());
            }
        }
    }
}
