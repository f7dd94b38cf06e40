//! `viewer_sessions` without a second copy: its rows are read from the sessions the stream
//! states keep.
//!
//! A session's row is a function of the session and of its stream (names and public id), so
//! instead of reporting each changed session as a row for the live table to store again, every
//! stream's sessions sit behind a lock the readers can take too (`HeldStream`), and the
//! [`SessionStore`] lists them. What the readers must not see is what the workers absorbed after
//! the epoch the other tables show. So:
//!
//! - each worker numbers its closes (*generations*, from 1, or on from an earlier run's last
//!   over the same store) and reports the number it closed
//!   with its changes ([`super::PeriscopeChange::Closed`]); the
//!   publisher notes them and, when it makes an epoch visible, makes visible per worker the
//!   newest generation that epoch holds (the worker's *boundary*);
//! - the first time a session changes in a generation, the worker logs the session as it was
//!   (its before-image) under that generation, and when the stream's public id changes at a
//!   close, the id before; a session created in the generation gets no image (it would only
//!   say "no row yet"): sessions are never removed and new ones take the next slot, so the
//!   generation logs once the first slot it created;
//! - a reader sees no session in slots created after the boundary, takes each other session as
//!   the first before-image logged after the boundary, and the session itself when there is
//!   none; a session without a connect or disconnect has no row;
//! - the worker drops before-images and first-created slots of generations at or under its
//!   boundary (readers never need them again) when it next logs to that stream, and at each of
//!   its closes for every stream that still has some, so a stream that goes quiet does not keep
//!   them.
//!
//! The boundaries only move while the publisher holds the live tables' write lock, and readers
//! read under the read lock, so a read sees one epoch from start to end. A reader takes a
//! stream's lock for [`READ_CHUNK`] sessions at a time, so a scan of a big stream holds its
//! worker up for short spells only; between them the worker may change sessions, but only by
//! logging images after the boundary, which the reader's next chunk takes. The logs hold only
//! the sessions changed in generations not yet visible: a few epochs' worth.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use keel_operators::shortstr::ShortStr;
use keel_operators::sym::Sym;
use keel_operators::sympair::SymPair;
use keel_operators::table::{BeforeAfter, Change, HeldTable};
use rustc_hash::FxBuildHasher;

use super::rows::{PeriscopeChange, ViewerSessionRow};
use super::sessions::{Session, Sessions, Span};

/// The country code as tables show it: `--` when unknown, as the platform does.
pub(crate) fn country_code(code: Sym) -> Sym {
    if code.is_empty() {
        Sym::new("--")
    } else {
        code
    }
}

/// The row of `session` in the stream `names` whose public id is `stream_id`; `None` before
/// the session's first connect or disconnect.
pub(crate) fn session_row(
    names: SymPair,
    stream_id: Sym,
    session: &Session,
) -> Option<ViewerSessionRow> {
    let span = session.span()?;
    Some(row_of(names, stream_id, session, &span))
}

fn row_of(names: SymPair, stream_id: Sym, session: &Session, span: &Span) -> ViewerSessionRow {
    ViewerSessionRow {
        stream: names,
        stream_id,
        session_id: session.session_id.clone(),
        node_id: session.node,
        connector: span.details.connector,
        country_code: country_code(span.details.country),
        city: span.details.city,
        connected_at: span.start,
        disconnected_at: span.end.into(),
        down_bytes: span.down_bytes,
        up_bytes: span.up_bytes,
    }
}

/// Sessions a reader turns into rows per hold of a stream's lock (3 in tests, so that their
/// small streams are read in several holds too).
pub const READ_CHUNK: u32 = if cfg!(test) { 3 } else { 4096 };

/// What one look at a stream's sessions finds for the session limit.
pub(crate) struct Expiry {
    /// Sessions that reach the limit within the horizon's move, as counted before and after.
    pub due: Vec<(Span, Span)>,
    /// Open sessions that reach it soon after (due time, slot), the latest first.
    pub soon: Vec<(i64, u32)>,
    /// The earliest time any other open session reaches it (`i64::MAX` if none).
    pub next: i64,
}

/// A session as it was before its first change in `generation`.
#[derive(Debug)]
struct Before {
    generation: u64,
    slot: u32,
    session: Session,
}

/// One stream's sessions, as its worker keeps them and readers read them.
#[derive(Debug, Default)]
pub(crate) struct StreamSessions {
    /// The sessions now.
    pub sessions: Sessions,
    /// The public id rows carry, as of the stream's last close.
    stream_id: Sym,
    /// Slots changed since the last close (marked in `sessions` too).
    dirty: Vec<u32>,
    /// Before-images, in generation order.
    log: Vec<Before>,
    /// The public id before each change of it: (generation of the close that changed it, id).
    ids: Vec<(u64, Sym)>,
    /// Sessions created in a generation get no before-image (it would only say "no row yet"):
    /// sessions are never removed and a new one takes the next slot, so each generation that
    /// created sessions logs the first slot it created (the slab's length at the last close),
    /// and readers before that generation treat every slot from there on as having no row.
    born: Vec<(u64, u32)>,
    /// Sessions held at the end of the last close.
    closed_len: u32,
    /// Sessions that have a row now.
    rows: usize,
}

impl StreamSessions {
    /// Forgets what readers at `boundary` or later never need; returns whether anything is
    /// left to forget later.
    pub fn forget(&mut self, boundary: u64) -> bool {
        if self.log.first().is_some_and(|b| b.generation <= boundary) {
            let done = self.log.partition_point(|b| b.generation <= boundary);
            self.log.drain(..done);
            // A burst's room is given back once the log is down to a quarter of it.
            if self.log.capacity() > 64 && self.log.len() * 4 < self.log.capacity() {
                self.log.shrink_to(self.log.len() * 2);
            }
        }
        if self.ids.first().is_some_and(|(g, _)| *g <= boundary) {
            let done = self.ids.partition_point(|(g, _)| *g <= boundary);
            self.ids.drain(..done);
        }
        if self.born.first().is_some_and(|(g, _)| *g <= boundary) {
            let done = self.born.partition_point(|(g, _)| *g <= boundary);
            self.born.drain(..done);
        }
        !self.log.is_empty() || !self.ids.is_empty() || !self.born.is_empty()
    }

    /// Applies `change` to the session in `slot` during `generation`, the worker's boundary
    /// being `boundary`. Returns the session's span before and after when it changed, as the
    /// aggregates count them at `horizon` ([`Session::counted_span`]).
    pub fn change(
        &mut self,
        slot: u32,
        (generation, boundary): (u64, u64),
        (horizon, limit): (i64, i64),
        change: impl FnOnce(&mut Session) -> bool,
    ) -> Option<(Option<Span>, Span)> {
        let first = !self.sessions.is_marked(slot);
        // Created since the last close, so in this generation: the stream state closes every
        // stream that absorbed an event in the generation it absorbed it (which moves
        // `closed_len` past every slot made then), and only an event's change makes a slot.
        let born = slot >= self.closed_len;
        let image = (first && !born).then(|| self.sessions.get(slot).clone());
        let before = self.sessions.get(slot).counted_span(horizon, limit);
        if !change(self.sessions.get_mut(slot)) {
            return None;
        }
        let after = self
            .sessions
            .get(slot)
            .counted_span(horizon, limit)
            .expect("a changed session has a connect or a disconnect");
        if first {
            self.sessions.mark(slot);
            self.dirty.push(slot);
        }
        if let Some(session) = image {
            self.forget(boundary);
            self.log.push(Before {
                generation,
                slot,
                session,
            });
        } else if born && self.born.last().is_none_or(|&(g, _)| g != generation) {
            self.forget(boundary);
            self.born.push((generation, self.closed_len));
        }
        if before.is_none() {
            self.rows += 1;
        }
        Some((before, after))
    }

    /// Looks at every session for those open ones that reach `limit` ms after their start
    /// once the horizon moves from `from` to `to` (see [`Expiry`]). Sessions themselves do not
    /// change (nor do their rows).
    pub fn expire(&self, (from, to): (i64, i64), soon: i64, limit: i64) -> Expiry {
        let mut expiry = Expiry {
            due: Vec::new(),
            soon: Vec::new(),
            next: i64::MAX,
        };
        for slot in self.sessions.slots() {
            let session = self.sessions.get(slot);
            let Some(span) = session.span().filter(|span| span.end.is_none()) else {
                continue;
            };
            let due = span.start.saturating_add(limit);
            if due > soon {
                expiry.next = expiry.next.min(due);
            } else if due > to {
                expiry.soon.push((due, slot));
            } else if due > from {
                expiry.due.extend(Self::counted(session, from, to, limit));
            }
        }
        expiry.soon.sort_unstable_by(|a, b| b.cmp(a));
        expiry
    }

    /// The sessions of `listed` (due time, slot; from a former [`Self::expire`]) that are
    /// still open and reach `limit` at that time, within `from..=to`, as counted before and
    /// after (a session since ended, or begun earlier, is skipped: its change moved it).
    pub fn expire_listed(
        &self,
        (from, to): (i64, i64),
        limit: i64,
        listed: impl IntoIterator<Item = (i64, u32)>,
    ) -> Vec<(Span, Span)> {
        let mut due = Vec::new();
        for (at, slot) in listed {
            let session = self.sessions.get(slot);
            let still = session
                .span()
                .is_some_and(|span| span.end.is_none() && span.start.saturating_add(limit) == at);
            if still && at > from && at <= to {
                due.extend(Self::counted(session, from, to, limit));
            }
        }
        due
    }

    /// `session` as counted at `from` and at `to`.
    fn counted(session: &Session, from: i64, to: i64, limit: i64) -> Option<(Span, Span)> {
        let before = session.counted_span(from, limit);
        let after = session.counted_span(to, limit);
        before.zip(after)
    }

    /// Closes `generation` with `stream_id` as the stream's public id; with `rows`, hands it
    /// the row of every session changed since the last close (every session, with `all`).
    pub fn close(
        &mut self,
        names: SymPair,
        generation: u64,
        stream_id: Sym,
        all: bool,
        rows: Option<&mut Vec<PeriscopeChange>>,
    ) {
        if stream_id != self.stream_id {
            self.ids.push((generation, self.stream_id));
            self.stream_id = stream_id;
        }
        for &slot in &self.dirty {
            self.sessions.unmark(slot);
        }
        self.closed_len = self.slab_len();
        if let Some(out) = rows {
            let mut report = |slot: u32| {
                if let Some(row) = session_row(names, stream_id, self.sessions.get(slot)) {
                    out.push(PeriscopeChange::ViewerSessions(Change::Upsert(row)));
                }
            };
            if all {
                self.sessions.slots().for_each(&mut report);
            } else {
                self.dirty.iter().copied().for_each(&mut report);
            }
        }
        self.dirty.clear();
    }

    /// The public id readers at `boundary` see.
    fn id_at(&self, boundary: u64) -> Sym {
        self.ids
            .iter()
            .find(|(g, _)| *g > boundary)
            .map_or(self.stream_id, |(_, id)| *id)
    }

    /// Slots in the stream's slab (sessions ever seen).
    fn slab_len(&self) -> u32 {
        u32::try_from(self.sessions.len()).expect("fewer than 2^32 sessions per stream")
    }

    /// The first slot readers at `boundary` see no session in (created after it).
    fn born_from(&self, boundary: u64) -> u32 {
        let from = self.born.partition_point(|(g, _)| *g <= boundary);
        self.born.get(from).map_or(u32::MAX, |&(_, slot)| slot)
    }

    /// The first before-image of each session changed after `boundary`.
    fn images_after(&self, boundary: u64) -> HashMap<u32, &Session, FxBuildHasher> {
        let from = self.log.partition_point(|b| b.generation <= boundary);
        let mut images = HashMap::default();
        for before in &self.log[from..] {
            images.entry(before.slot).or_insert(&before.session);
        }
        images
    }

    /// Every session as readers at `boundary` see it, by slot (as [`Self::session_at`], for
    /// many slots).
    fn view_at<'a>(&'a self, boundary: u64) -> impl Fn(u32) -> Option<&'a Session> + use<'a> {
        let born = self.born_from(boundary);
        let images = self.images_after(boundary);
        move |slot| {
            (slot < born).then(|| {
                images
                    .get(&slot)
                    .copied()
                    .unwrap_or_else(|| self.sessions.get(slot))
            })
        }
    }

    /// The session in `slot` as readers at `boundary` see it; `None` if it was created after.
    fn session_at(&self, slot: u32, boundary: u64) -> Option<&Session> {
        if slot >= self.born_from(boundary) {
            return None;
        }
        let from = self.log.partition_point(|b| b.generation <= boundary);
        Some(
            self.log[from..]
                .iter()
                .find(|b| b.slot == slot)
                .map_or_else(|| self.sessions.get(slot), |b| &b.session),
        )
    }

    /// The rows of slots `from..` (at most [`READ_CHUNK`] of them) readers at `boundary` see;
    /// returns the slot after the last one read, `None` at the end.
    fn rows_at(
        &self,
        names: SymPair,
        boundary: u64,
        from: u32,
        out: &mut Vec<ViewerSessionRow>,
    ) -> Option<u32> {
        let id = self.id_at(boundary);
        let at = self.view_at(boundary);
        // Sessions created after the boundary have no row for these readers: the scan ends at
        // the first of them (rather than walking empty chunks of a burst of new sessions).
        let len = self.slab_len().min(self.born_from(boundary));
        let to = from.saturating_add(READ_CHUNK).min(len);
        for slot in from..to {
            out.extend(at(slot).and_then(|session| session_row(names, id, session)));
        }
        (to < len).then_some(to)
    }

    /// How many rows readers at `boundary` see.
    fn len_at(&self, boundary: u64) -> usize {
        let born = self.born_from(boundary);
        let len = self.slab_len();
        let rows_born = (born.min(len)..len)
            .filter(|&slot| self.sessions.get(slot).span().is_some())
            .count();
        let images = self.images_after(boundary);
        images.iter().filter(|(slot, _)| **slot < born).fold(
            self.rows - rows_born,
            |rows, (slot, before)| {
                let now = self.sessions.get(*slot).span().is_some();
                match (before.span().is_some(), now) {
                    (false, true) => rows - 1,
                    (true, false) => rows + 1,
                    _ => rows,
                }
            },
        )
    }

    /// The rows that differ between readers at `from` and at `to` (`from` < `to`), as (before,
    /// after).
    fn changes(
        &self,
        names: SymPair,
        from: u64,
        to: u64,
        out: &mut Vec<BeforeAfter<ViewerSessionRow>>,
    ) {
        let (id_from, id_to) = (self.id_at(from), self.id_at(to));
        let logged = self.log.partition_point(|b| b.generation <= from)
            ..self.log.partition_point(|b| b.generation <= to);
        // Sessions created after `from`, up to `to`: no row at `from`.
        let len = self.slab_len();
        let born = self.born_from(from).min(len)..self.born_from(to).min(len);
        if id_from == id_to && logged.is_empty() && born.is_empty() {
            return;
        }
        // Each boundary's view is built once (its images in a map), not searched for per slot:
        // the log past `from` can hold thousands of images when epochs are large.
        let (at_from, at_to) = (self.view_at(from), self.view_at(to));
        let mut push = |slot: u32| {
            let before = at_from(slot).and_then(|session| session_row(names, id_from, session));
            let after = at_to(slot).and_then(|session| session_row(names, id_to, session));
            if before != after {
                out.push((before, after));
            }
        };
        if id_from != id_to {
            self.sessions.slots().for_each(&mut push);
            return;
        }
        let mut seen = hashbrown::HashSet::<u32, FxBuildHasher>::default();
        for before in &self.log[logged] {
            if seen.insert(before.slot) {
                push(before.slot);
            }
        }
        for slot in born {
            if seen.insert(slot) {
                push(slot);
            }
        }
    }
}

/// One stream's sessions, shared by its worker and the readers.
#[derive(Debug)]
pub(crate) struct HeldStream {
    names: SymPair,
    worker: usize,
    sessions: Mutex<StreamSessions>,
}

impl HeldStream {
    /// The stream's tenant and internal name.
    pub fn names(&self) -> SymPair {
        self.names
    }

    /// The sessions, if no one holds them now.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, StreamSessions>> {
        match self.sessions.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// The sessions, locked (a poisoned lock is taken over: the state is only ever changed by
    /// code that does not panic half way).
    pub fn lock(&self) -> MutexGuard<'_, StreamSessions> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The streams whose sessions are held, in the order they appeared.
#[derive(Debug, Default)]
struct Registry {
    streams: Vec<Arc<HeldStream>>,
    by_names: HashMap<(Sym, Sym), usize, FxBuildHasher>,
}

/// Every stream's sessions, for readers of `viewer_sessions`; shared by the engine's workers
/// and its live tables. See the module documentation.
#[derive(Debug)]
pub struct SessionStore {
    registry: RwLock<Registry>,
    /// Per worker: its boundary, the newest generation readers see (0: none).
    boundaries: RwLock<Vec<Arc<AtomicU64>>>,
    /// Whether the stream states also report session rows as changes (for stores that keep
    /// them, and for tests that compare them).
    report_rows: AtomicBool,
}

impl Default for SessionStore {
    fn default() -> Self {
        SessionStore {
            registry: RwLock::default(),
            boundaries: RwLock::default(),
            report_rows: AtomicBool::new(true),
        }
    }
}

impl SessionStore {
    /// Whether stream states report session rows as `viewer_sessions` changes too (on by
    /// default; the engine turns it off when no store keeps them).
    pub fn report_rows(&self, on: bool) {
        self.report_rows.store(on, Ordering::Relaxed);
    }

    pub(crate) fn reports_rows(&self) -> bool {
        self.report_rows.load(Ordering::Relaxed)
    }

    /// Worker `worker`'s boundary, shared.
    pub(crate) fn boundary(&self, worker: usize) -> Arc<AtomicU64> {
        let mut all = self
            .boundaries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while all.len() <= worker {
            all.push(Arc::default());
        }
        all[worker].clone()
    }

    fn boundaries(&self) -> Vec<u64> {
        self.boundaries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .collect()
    }

    fn set_boundaries(&self, to: &[u64]) {
        let all = self
            .boundaries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (boundary, &to) in all.iter().zip(to) {
            boundary.store(to, Ordering::Release);
        }
    }

    /// Holds the sessions of stream `names` for `worker`. A stream held before (by an earlier
    /// run over the same tables) is replaced.
    pub(crate) fn hold(&self, names: SymPair, worker: usize) -> Arc<HeldStream> {
        let stream = Arc::new(HeldStream {
            names,
            worker,
            sessions: Mutex::default(),
        });
        let mut registry = self
            .registry
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = registry.streams.len();
        match registry.by_names.get(&names.get()).copied() {
            Some(at) => registry.streams[at] = stream.clone(),
            None => {
                registry.streams.push(stream.clone());
                registry.by_names.insert(names.get(), at);
            }
        }
        stream
    }

    fn streams(&self) -> Vec<Arc<HeldStream>> {
        self.registry
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .streams
            .clone()
    }

    /// Every visible row of `tenant` (all for `None`). Only under the live tables' read lock
    /// (through [`HeldSessions`]): the boundaries must not move during the read.
    pub(crate) fn rows(&self, tenant: Option<&str>) -> Vec<ViewerSessionRow> {
        self.rows_up_to(tenant, usize::MAX)
    }

    /// At most `limit` of the rows [`SessionStore::rows`] gives: reading stops once it has
    /// them.
    pub(crate) fn rows_up_to(&self, tenant: Option<&str>, limit: usize) -> Vec<ViewerSessionRow> {
        let boundaries = self.boundaries();
        let mut out = Vec::new();
        for stream in self.streams() {
            if tenant.is_some_and(|t| stream.names.first().as_str() != t) {
                continue;
            }
            let boundary = boundaries.get(stream.worker).copied().unwrap_or(0);
            let mut from = Some(0);
            while let Some(at) = from
                && out.len() < limit
            {
                from = stream.lock().rows_at(stream.names, boundary, at, &mut out);
            }
            if out.len() >= limit {
                break;
            }
        }
        out.truncate(limit);
        out
    }

    /// Before-images, ids and first-created slots held in all streams' logs.
    #[cfg(test)]
    pub(crate) fn logged(&self) -> usize {
        self.streams()
            .iter()
            .map(|stream| {
                let held = stream.lock();
                held.log.len() + held.ids.len() + held.born.len()
            })
            .sum()
    }

    /// Number of visible rows (as [`SessionStore::rows`], under the read lock).
    pub(crate) fn len(&self) -> usize {
        self.count(None)
    }

    /// How many rows of `tenant` (all for `None`) [`SessionStore::rows`] would give.
    pub(crate) fn count(&self, tenant: Option<&str>) -> usize {
        let boundaries = self.boundaries();
        self.streams()
            .iter()
            .filter(|stream| tenant.is_none_or(|t| stream.names.first().as_str() == t))
            .map(|stream| {
                let boundary = boundaries.get(stream.worker).copied().unwrap_or(0);
                stream.lock().len_at(boundary)
            })
            .sum()
    }

    /// The visible row of (tenant, internal name, node, session id) (as [`SessionStore::rows`],
    /// under the read lock).
    pub(crate) fn get(&self, key: &(Sym, Sym, Sym, ShortStr)) -> Option<ViewerSessionRow> {
        let stream = {
            let registry = self
                .registry
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let at = *registry.by_names.get(&(key.0, key.1))?;
            registry.streams[at].clone()
        };
        let boundary = self.boundaries().get(stream.worker).copied().unwrap_or(0);
        let held = stream.lock();
        let slot = held.sessions.find(key.2, key.3.as_str())?;
        let id = held.id_at(boundary);
        session_row(stream.names, id, held.session_at(slot, boundary)?)
    }

    /// The rows that differ between boundaries `from` and `to` (per worker).
    fn changes(&self, from: &[u64], to: &[u64]) -> Vec<BeforeAfter<ViewerSessionRow>> {
        let mut out = Vec::new();
        for stream in self.streams() {
            let at = |b: &[u64]| b.get(stream.worker).copied().unwrap_or(0);
            let (from, to) = (at(from), at(to));
            if from < to {
                stream.lock().changes(stream.names, from, to, &mut out);
            }
        }
        out
    }
}

/// `viewer_sessions` as a [`HeldTable`]: reads go to the store, at the boundaries the publisher
/// last made visible.
#[derive(Debug)]
pub struct HeldSessions {
    store: Arc<SessionStore>,
    /// The newest generation each worker closed, as noted since the last commit.
    noted: Vec<u64>,
}

impl HeldSessions {
    /// The table over `store`.
    pub fn new(store: Arc<SessionStore>) -> Self {
        HeldSessions {
            store,
            noted: Vec::new(),
        }
    }

    /// Whether this table reads `store`.
    pub fn reads(&self, store: &Arc<SessionStore>) -> bool {
        Arc::ptr_eq(&self.store, store)
    }
}

impl HeldTable for HeldSessions {
    type Row = ViewerSessionRow;

    fn closed(&mut self, worker: u32, generation: u64) {
        let worker = worker as usize;
        if self.noted.len() <= worker {
            self.noted.resize(worker + 1, 0);
        }
        self.noted[worker] = self.noted[worker].max(generation);
    }

    fn commit(&mut self, diff: bool) -> Vec<BeforeAfter<ViewerSessionRow>> {
        let from = self.store.boundaries();
        let mut to = from.clone();
        for (worker, &noted) in self.noted.iter().enumerate() {
            if worker >= to.len() {
                // A worker's boundary exists from its state's start, before any close.
                self.store.boundary(worker);
                to.resize(worker + 1, 0);
            }
            to[worker] = to[worker].max(noted);
        }
        if to == from {
            return Vec::new();
        }
        let changes = if diff {
            self.store.changes(&from, &to)
        } else {
            Vec::new()
        };
        self.store.set_boundaries(&to);
        changes
    }

    fn len(&self) -> usize {
        self.store.len()
    }

    fn rows(&self, tenant: Option<&str>) -> Vec<ViewerSessionRow> {
        self.store.rows(tenant)
    }

    fn count(&self, tenant: Option<&str>) -> usize {
        self.store.count(tenant)
    }

    fn rows_up_to(&self, tenant: Option<&str>, limit: usize) -> Vec<ViewerSessionRow> {
        self.store.rows_up_to(tenant, limit)
    }

    fn get(&self, key: &(Sym, Sym, Sym, ShortStr)) -> Option<ViewerSessionRow> {
        self.store.get(key)
    }
}
