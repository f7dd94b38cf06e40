//! Viewer sessions of one stream: compact storage and order-insensitive merging.
//!
//! A session is identified by (node, session id). Its connect and disconnect can arrive in
//! either order, more than once, or not at all; the merge rules make the session a function of
//! the set of events that describe it:
//!
//! - the **start** is the earliest connect's time, or — without a connect — the winning
//!   disconnect's time minus its reported duration;
//! - the **end** is the winning disconnect's time (the latest; ties broken by its other fields);
//! - the **client details** (connector, country, city, identity) come from the earliest connect,
//!   or from the winning disconnect when no connect is known.
//!
//! Rows show the session as its events say; the aggregates count it for at most a session limit
//! (30 days in the engine, [`Session::counted_span`]).
//!
//! Storage is a slab of [`Session`]s plus a [`PositionIndex`] of slot numbers, so each session
//! costs its own size and a few bytes of index — no key is stored twice — and a bit for "changed
//! since the last close".

use std::hash::{BuildHasher, Hash, Hasher};

use keel_operators::chunked::ChunkedVec;
use keel_operators::posindex::PositionIndex;
use keel_operators::shortstr::{INLINE, ShortStr};
use keel_operators::sym::Sym;
use keel_operators::time::SECOND;
use rustc_hash::FxBuildHasher;

use super::rows::MaybeTime;

/// The client details a session takes from one of its events. Ordered so ties between events
/// at the same instant resolve the same way whatever the arrival order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClientDetails {
    /// Output protocol.
    pub connector: Sym,
    /// Country code (empty when unknown).
    pub country: Sym,
    /// City (empty when unknown).
    pub city: Sym,
    /// Viewer identity: a hash of the client address, else of node and session id.
    pub identity: u64,
}

/// What a disconnect says about a session; the greatest one wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ending {
    /// Event time.
    pub time: i64,
    /// Reported duration, seconds.
    pub duration_s: u64,
    /// Bytes delivered.
    pub down_bytes: u64,
    /// Bytes received.
    pub up_bytes: u64,
    /// Client details it carried.
    pub details: ClientDetails,
}

/// One viewer session, in 80 bytes.
#[derive(Clone, Debug)]
pub struct Session {
    /// Session id.
    pub session_id: ShortStr,
    /// Serving node.
    pub node: Sym,
    /// Details of the earliest connect, or of the winning disconnect while no connect is known.
    /// (Once a connect is known its details are final, so a disconnect's details only matter,
    /// and are only kept, before that.) Kept field by field: a nested [`ClientDetails`] would
    /// bring its 4 bytes of padding.
    connector: Sym,
    country: Sym,
    city: Sym,
    identity: u64,
    /// Earliest connect time, if any connect is known.
    connect_time: MaybeTime,
    /// Winning disconnect: time (none before any disconnect), reported duration and bytes.
    end_time: MaybeTime,
    duration_s: u64,
    down_bytes: u64,
    up_bytes: u64,
}

/// The part of a session that aggregates see: its interval and who and where it was.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Span {
    /// Start, ms.
    pub start: i64,
    /// End, ms; `None` while open.
    pub end: Option<i64>,
    /// Client details in force.
    pub details: ClientDetails,
    /// Bytes delivered.
    pub down_bytes: u64,
    /// Bytes received.
    pub up_bytes: u64,
}

impl Session {
    fn new(node: Sym, session_id: ShortStr) -> Self {
        Session {
            session_id,
            node,
            connector: Sym::default(),
            country: Sym::default(),
            city: Sym::default(),
            identity: 0,
            connect_time: MaybeTime::NONE,
            end_time: MaybeTime::NONE,
            duration_s: 0,
            down_bytes: 0,
            up_bytes: 0,
        }
    }

    fn details(&self) -> ClientDetails {
        ClientDetails {
            connector: self.connector,
            country: self.country,
            city: self.city,
            identity: self.identity,
        }
    }

    fn set_details(&mut self, details: ClientDetails) {
        self.connector = details.connector;
        self.country = details.country;
        self.city = details.city;
        self.identity = details.identity;
    }

    fn has_connect(&self) -> bool {
        !self.connect_time.is_none()
    }

    /// Absorbs a connect; returns whether the session changed.
    pub fn connect(&mut self, time: i64, details: ClientDetails) -> bool {
        if let Some(known) = self.connect_time.get()
            && (known, self.details()) <= (time, details)
        {
            return false;
        }
        self.connect_time = MaybeTime::from(Some(time));
        self.set_details(details);
        true
    }

    /// Absorbs a disconnect; returns whether the session changed.
    pub fn disconnect(&mut self, ending: Ending) -> bool {
        if let Some(end_time) = self.end_time.get() {
            let numbers = (end_time, self.duration_s, self.down_bytes, self.up_bytes);
            let candidate = (
                ending.time,
                ending.duration_s,
                ending.down_bytes,
                ending.up_bytes,
            );
            let newer = if self.has_connect() {
                // The details are the connect's whichever disconnect wins.
                candidate > numbers
            } else {
                (candidate, ending.details) > (numbers, self.details())
            };
            if !newer {
                return false;
            }
        }
        self.end_time = MaybeTime::from(Some(ending.time));
        self.duration_s = ending.duration_s;
        self.down_bytes = ending.down_bytes;
        self.up_bytes = ending.up_bytes;
        if !self.has_connect() {
            self.set_details(ending.details);
        }
        true
    }

    /// The session's interval and details, `None` before any connect or disconnect.
    pub fn span(&self) -> Option<Span> {
        let end = self.end_time.get();
        let start = match (self.connect_time.get(), end) {
            (Some(connect), _) => connect,
            (None, Some(end)) => {
                let duration = i64::try_from(self.duration_s).unwrap_or(i64::MAX);
                end.saturating_sub(duration.saturating_mul(SECOND))
            }
            (None, None) => return None,
        };
        Some(Span {
            start,
            end: end.map(|end| end.max(start)),
            details: self.details(),
            down_bytes: self.down_bytes,
            up_bytes: self.up_bytes,
        })
    }

    /// The session as the aggregates count it, at most `limit` ms long: a disconnect later than
    /// that counts as ending `limit` after the start, and a session still open when `horizon`
    /// (the watermark of the stream's last close) reaches `limit` past its start counts as
    /// ending then. A lost disconnect, or one stray record dated years back, would otherwise
    /// keep a viewer on the stream, and a window row in each of its five minutes, for good.
    pub fn counted_span(&self, horizon: i64, limit: i64) -> Option<Span> {
        let mut span = self.span()?;
        let cap = span.start.saturating_add(limit);
        span.end = match span.end {
            Some(end) => Some(end.min(cap)),
            None => (cap <= horizon).then_some(cap),
        };
        Some(span)
    }
}

/// The identity hash of a viewer: the client address when known, else node and session id.
pub fn viewer_identity(host: &str, node: Sym, session_id: &str) -> u64 {
    let mut hasher = FxBuildHasher.build_hasher();
    if host.is_empty() {
        b's'.hash(&mut hasher);
        node.as_str().hash(&mut hasher);
        session_id.hash(&mut hasher);
    } else {
        b'h'.hash(&mut hasher);
        host.hash(&mut hasher);
    }
    hasher.finish()
}

/// The 32 bits of (node, session id)'s hash the index keeps.
fn slot_hash(node: Sym, session_id: &str) -> u32 {
    let mut hasher = FxBuildHasher.build_hasher();
    node.hash(&mut hasher);
    session_id.hash(&mut hasher);
    // Truncation intended: the index keeps 32 bits (and spreads them itself).
    hasher.finish() as u32
}

/// log2 of the session slab's chunk length: 256 sessions (22 KiB) a chunk. A stream's slab
/// grows a chunk at a time and never copies what it holds, so hundreds of streams growing to
/// thousands of sessions each do not leave behind, freed, the smaller arrays they outgrew.
const SLAB_CHUNK_BITS: u32 = 8;

/// The sessions of one stream.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    slots: ChunkedVec<Session, SLAB_CHUNK_BITS>,
    index: PositionIndex,
    /// One bit per slot: changed since the last close.
    dirty: Vec<u64>,
}

impl Sessions {
    /// The slot of (node, session id), created empty if new.
    pub fn slot(&mut self, node: Sym, session_id: &str) -> u32 {
        let hash = slot_hash(node, session_id);
        // A short id is made a `ShortStr` up front: it compares as fixed-size words, and a new
        // session keeps it. A long one is compared as text, so a look-up never allocates.
        let short = (session_id.len() <= INLINE).then(|| ShortStr::from(session_id));
        let slots = &mut self.slots;
        let found = self.index.find(hash, |slot| {
            let s = &slots[slot as usize];
            s.node == node
                && match &short {
                    Some(short) => s.session_id == *short,
                    None => s.session_id == session_id,
                }
        });
        if let Some(slot) = found {
            return slot;
        }
        let slot = u32::try_from(slots.len()).expect("fewer than 2^32 sessions per stream");
        let session_id = short.unwrap_or_else(|| ShortStr::from(session_id));
        slots.push(Session::new(node, session_id));
        if slot % 64 == 0 {
            self.dirty.push(0);
        }
        self.index.insert(hash, slot);
        slot
    }

    /// Starts loading the index line a coming `slot(node, session_id)` will read.
    pub fn prefetch(&self, node: Sym, session_id: &str) {
        self.index.prefetch(slot_hash(node, session_id));
    }

    /// Starts loading the session a coming `slot(node, session_id)` will most likely find: the
    /// first one filed under the same hash. Worth it once [`prefetch`](Self::prefetch) has
    /// brought the index line in; an index line not yet in the cache is waited for here.
    pub fn prefetch_session(&self, node: Sym, session_id: &str) {
        if let Some(slot) = self.index.find(slot_hash(node, session_id), |_| true)
            && let Some(session) = self.slots.get(slot as usize)
        {
            keel_operators::prefetch::prefetch_whole(session);
        }
    }

    /// The slot of (node, session id), if the stream has that session.
    pub fn find(&self, node: Sym, session_id: &str) -> Option<u32> {
        let slots = &self.slots;
        self.index.find(slot_hash(node, session_id), |slot| {
            let s = &slots[slot as usize];
            s.node == node && s.session_id == session_id
        })
    }

    /// The session in `slot`.
    pub fn get(&self, slot: u32) -> &Session {
        &self.slots[slot as usize]
    }

    /// The session in `slot`, to change.
    pub fn get_mut(&mut self, slot: u32) -> &mut Session {
        &mut self.slots[slot as usize]
    }

    /// Marks the session in `slot` changed; returns whether it was not marked yet.
    pub fn mark(&mut self, slot: u32) -> bool {
        let (word, bit) = (slot as usize / 64, 1u64 << (slot % 64));
        let fresh = self.dirty[word] & bit == 0;
        self.dirty[word] |= bit;
        fresh
    }

    /// Whether the session in `slot` is marked changed.
    pub fn is_marked(&self, slot: u32) -> bool {
        self.dirty[slot as usize / 64] & (1u64 << (slot % 64)) != 0
    }

    /// Clears the mark of the session in `slot`.
    pub fn unmark(&mut self, slot: u32) {
        self.dirty[slot as usize / 64] &= !(1u64 << (slot % 64));
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Every slot number.
    pub fn slots(&self) -> impl Iterator<Item = u32> + use<> {
        0..u32::try_from(self.slots.len()).expect("fewer than 2^32 sessions per stream")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn details(n: u8) -> ClientDetails {
        ClientDetails {
            connector: Sym::new(["HLS", "WebRTC"][usize::from(n % 2)]),
            country: Sym::new(["NL", "DE", "US"][usize::from(n % 3)]),
            city: Sym::default(),
            identity: u64::from(n),
        }
    }

    #[derive(Clone, Debug)]
    enum Ev {
        Connect(i64, u8),
        Disconnect(i64, u64, u64, u8),
    }

    fn arb_event() -> impl Strategy<Value = Ev> {
        prop_oneof![
            (0i64..50_000, 0u8..6).prop_map(|(t, d)| Ev::Connect(t, d)),
            (0i64..50_000, 0u64..40, 0u64..1000, 0u8..6)
                .prop_map(|(t, s, b, d)| Ev::Disconnect(t, s, b, d)),
        ]
    }

    fn apply(session: &mut Session, ev: &Ev) {
        match *ev {
            Ev::Connect(t, d) => {
                session.connect(t, details(d));
            }
            Ev::Disconnect(t, s, b, d) => {
                session.disconnect(Ending {
                    time: t,
                    duration_s: s,
                    down_bytes: b,
                    up_bytes: b / 2,
                    details: details(d),
                });
            }
        }
    }

    proptest! {
        /// The merged session depends on the set of events only: any order, any duplication.
        #[test]
        fn merge_is_order_insensitive(events in prop::collection::vec(arb_event(), 1..12), seed in any::<u64>()) {
            let mut forward = Session::new(Sym::new("n"), ShortStr::from("s"));
            for ev in &events { apply(&mut forward, ev); }
            let mut order: Vec<usize> = (0..events.len()).chain(0..events.len() / 2).collect();
            let mut state = seed | 1;
            for i in (1..order.len()).rev() {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                order.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let mut shuffled = Session::new(Sym::new("n"), ShortStr::from("s"));
            for i in order { apply(&mut shuffled, &events[i]); }
            prop_assert_eq!(forward.span(), shuffled.span());
        }
    }

    #[test]
    fn a_disconnect_alone_makes_a_session() {
        let mut s = Session::new(Sym::new("n"), ShortStr::from("s"));
        s.disconnect(Ending {
            time: 100_000,
            duration_s: 30,
            down_bytes: 5,
            up_bytes: 1,
            details: details(1),
        });
        let span = s.span().unwrap();
        assert_eq!((span.start, span.end), (70_000, Some(100_000)));
        assert!(
            s.connect(80_000, details(2)),
            "a later-arriving connect moves the start"
        );
        assert_eq!(s.span().unwrap().start, 80_000);
        assert_eq!(s.span().unwrap().details, details(2));
        assert!(
            !s.connect(90_000, details(3)),
            "a later connect changes nothing"
        );
    }

    #[test]
    fn slots_are_stable_and_unique() {
        let mut sessions = Sessions::default();
        // Hints on no sessions and (below) on sessions there and not neither panic nor get in the
        // way of the look-ups after them.
        sessions.prefetch(Sym::new("n1"), "1");
        sessions.prefetch_session(Sym::new("n1"), "1");
        let a = sessions.slot(Sym::new("n1"), "1");
        let b = sessions.slot(Sym::new("n2"), "1");
        let c = sessions.slot(Sym::new("n1"), "2");
        assert_eq!(sessions.slot(Sym::new("n1"), "1"), a);
        assert_eq!([a, b, c], [0, 1, 2]);
        for i in 0..10_000 {
            sessions.slot(Sym::new("n3"), &i.to_string());
        }
        for (node, id) in [("n2", "1"), ("n3", "9999"), ("n3", "10000"), ("n9", "1")] {
            sessions.prefetch(Sym::new(node), id);
            sessions.prefetch_session(Sym::new(node), id);
        }
        assert_eq!(sessions.slot(Sym::new("n2"), "1"), b);
        assert_eq!(sessions.len(), 10_003);
        // Ids at and past the inline limit (compared as words, and as text).
        let at = "x".repeat(INLINE);
        let long = "x".repeat(INLINE + 1);
        let d = sessions.slot(Sym::new("n1"), &at);
        let e = sessions.slot(Sym::new("n1"), &long);
        assert_eq!([d, e], [10_003, 10_004]);
        assert_eq!(sessions.slot(Sym::new("n1"), &long), e);
        assert_eq!(sessions.slot(Sym::new("n1"), &at), d);
        assert_eq!(sessions.get(e).session_id, long.as_str());
    }

    #[test]
    fn marks_are_per_slot() {
        let mut sessions = Sessions::default();
        for i in 0..200 {
            sessions.slot(Sym::new("n"), &i.to_string());
        }
        assert!(sessions.mark(0));
        assert!(sessions.mark(63));
        assert!(sessions.mark(64));
        assert!(sessions.mark(199));
        assert!(!sessions.mark(63), "a marked slot stays marked");
        sessions.unmark(63);
        assert!(sessions.mark(63), "unmarked, it can be marked again");
        assert!(!sessions.mark(64) && !sessions.mark(0) && !sessions.mark(199));
        assert!(
            sessions.mark(1) && sessions.mark(65),
            "neighbours are not marked"
        );
    }

    #[test]
    fn a_session_is_80_bytes() {
        assert_eq!(size_of::<Session>(), 80);
    }
}
