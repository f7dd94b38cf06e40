//! Per-stream state: everything keyed by (tenant, internal name) in one place.
//!
//! All events of a stream are routed to one worker, whose [`StreamsState`] keeps, per stream,
//! its sessions and the aggregates that sessions feed — concurrency profile, identities, country
//! and 5-minute window accumulators — plus lifecycle and health state. Sessions feed aggregates
//! through [`Span`]s: when a session changes, its old span is subtracted and its new span added,
//! so every aggregate stays equal to a from-scratch computation over the current sessions.
//!
//! At close, a stream reports the rows of `streams`, `viewers_by_country`, `usage_5m` and
//! `stream_health_5m` that changed, and those of `viewer_sessions` when a store keeps them (the
//! live table reads the sessions where they are held, [`super::held`]). Rows that depend on "now" (open sessions count
//! up to the newest event time) are refreshed for streams with open sessions whenever the
//! watermark moves. A session counts for at most [`SESSION_LIMIT`]: one still open when the
//! watermark passes that far beyond its start counts as ended there from that close on.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keel_operators::idset::IdSet;
use keel_operators::maintain::EpochState;
use keel_operators::profile::StepProfile;
use keel_operators::set64::Set64;
use keel_operators::sym::Sym;
use keel_operators::sympair::SymPair;
use keel_operators::table::Change;
use keel_operators::time::{MINUTE, SECOND, window_start};
use keel_sources::codec::{KEEL_NAMESPACE, MAX_SESSION_SECONDS};
use keel_sources::event::{Event, EventKind};
use rustc_hash::FxBuildHasher;
use uuid::Uuid;

use super::held::{HeldStream, SessionStore, country_code};
use super::rows::{CountryRow, HealthRow, PeriscopeChange, StreamRow, UsageRow};
use super::sessions::{ClientDetails, Ending, Span, viewer_identity};

/// Width of the usage and health windows.
pub const WINDOW: i64 = 5 * MINUTE;

/// Which stream: tenant and internal name.
pub type StreamKey = (Uuid, Sym);

/// Rank of lifecycle events at the same instant: an end outranks an update, which outranks a
/// start, so the status at a tie is the most final one.
const RANK_START: u8 = 0;
const RANK_UPDATE: u8 = 1;
const RANK_END: u8 = 2;

/// The latest status-bearing event: (time, rank, status, node).
type StatusMark = (i64, u8, Sym, Sym);

/// Sums over sessions, shared by the stream, each country and each window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct SessionSums {
    sessions: i64,
    open: i64,
    /// Sum of the start times of open sessions, for "seconds up to now" in O(1).
    open_start_sum: i128,
    /// Milliseconds of closed sessions.
    closed_ms: i128,
    down_bytes: i128,
}

impl SessionSums {
    fn add(&mut self, span: &Span, sign: i64) {
        self.sessions += sign;
        match span.end {
            None => {
                self.open += sign;
                self.open_start_sum += i128::from(sign) * i128::from(span.start);
            }
            Some(end) => self.closed_ms += i128::from(sign) * i128::from(end - span.start),
        }
        self.down_bytes += i128::from(sign) * i128::from(span.down_bytes);
    }

    /// Viewer seconds with open sessions counted up to `now`.
    fn seconds(&self, now: i64) -> f64 {
        let open_ms = i128::from(self.open) * i128::from(now) - self.open_start_sum;
        (self.closed_ms + open_ms.max(0)) as f64 / SECOND as f64
    }
}

/// A byte total as the tables show it: within 0..=u64::MAX (a total past it, which only
/// sessions near `codec::MAX_SESSION_BYTES` by the ten thousand could reach, stays at the top).
fn bytes(total: i128) -> u64 {
    u64::try_from(total.max(0)).unwrap_or(u64::MAX)
}

/// A 5-minute window of one stream.
#[derive(Debug, Default)]
struct Window {
    started: i64,
    closed_ms: i128,
    /// Open sessions that started in this window, and the sum of their starts.
    open_started: i64,
    open_start_sum: i128,
    /// What was last reported: (peak, started, viewer ms).
    published: Option<(u64, u64, i128)>,
    /// The highest concurrency within the window as last computed; none until it is, and again
    /// after any change of the concurrency profile before the window's end (which is all that
    /// can move it). Most closes revisit windows whose peak no change has reached.
    peak: Option<u64>,
}

/// Windows per page of [`Windows`]: 32 windows, 2 hours 40 minutes.
const PAGE: usize = 32;
const PAGE_SPAN: i64 = PAGE as i64 * WINDOW;

/// The 5-minute windows of one stream, in pages of up to [`PAGE`] windows aligned to multiples
/// of their span: dense where the stream has sessions, nothing between (one stray record years
/// away from the rest costs a page, not every window between). A page holds its windows up to
/// the latest touched in it, so a stream of a few minutes keeps a few windows.
#[derive(Debug, Default)]
struct Windows {
    /// Pages by their first window's start, ascending; each holds its windows from the first.
    pages: Vec<(i64, Vec<Window>)>,
    /// The earliest and latest window touched.
    touched: Option<(i64, i64)>,
}

/// The page holding the window that starts at `start`, and the window's place in it.
fn page_of(start: i64) -> (i64, usize) {
    let page = start.div_euclid(PAGE_SPAN) * PAGE_SPAN;
    let slot = usize::try_from((start - page) / WINDOW).expect("within a page");
    (page, slot)
}

impl Windows {
    fn find(&self, page: i64) -> Result<usize, usize> {
        self.pages.binary_search_by_key(&page, |(start, _)| *start)
    }

    /// Whether `start` lies between the earliest and latest window touched (a page's windows
    /// outside that are not there yet: nothing may be cached in them).
    fn spans(&self, start: i64) -> bool {
        self.touched
            .is_some_and(|(first, last)| first <= start && start <= last)
    }

    fn get(&self, start: i64) -> Option<&Window> {
        let (page, slot) = page_of(start);
        let at = self.find(page).ok().filter(|_| self.spans(start))?;
        self.pages[at].1.get(slot)
    }

    fn get_mut(&mut self, start: i64) -> Option<&mut Window> {
        let (page, slot) = page_of(start);
        let at = self.find(page).ok().filter(|_| self.spans(start))?;
        self.pages[at].1.get_mut(slot)
    }

    /// The window starting at `start`, created (with those before it in its page) if missing.
    fn entry(&mut self, start: i64) -> &mut Window {
        let (page, slot) = page_of(start);
        self.touched = Some(self.touched.map_or((start, start), |(first, last)| {
            (first.min(start), last.max(start))
        }));
        let at = self.find(page).unwrap_or_else(|at| {
            self.pages.insert(at, (page, Vec::new()));
            at
        });
        let windows = &mut self.pages[at].1;
        if slot >= windows.len() {
            windows.resize_with(slot + 1, Window::default);
        }
        &mut windows[slot]
    }

    fn first(&self) -> Option<i64> {
        self.touched.map(|(first, _)| first)
    }

    fn last(&self) -> Option<i64> {
        self.touched.map(|(_, last)| last)
    }

    /// Calls `f` on each window from `start` to the latest touched.
    fn each_from(&mut self, start: i64, mut f: impl FnMut(&mut Window)) {
        let Some((first, last)) = self.touched else {
            return;
        };
        let start = start.max(first);
        if start > last {
            return;
        }
        let at = self.find(page_of(start).0).unwrap_or_else(|at| at);
        for (page, windows) in &mut self.pages[at..] {
            if *page > last {
                break;
            }
            let from = usize::try_from((start - *page).max(0) / WINDOW).expect("within a page");
            let to = usize::try_from((last - *page) / WINDOW + 1)
                .map_or(windows.len(), |n| n.min(windows.len()));
            if from < to {
                windows[from..to].iter_mut().for_each(&mut f);
            }
        }
    }

    /// The start of the first window at or after `start` that is there.
    fn next_held(&self, start: i64) -> Option<i64> {
        let (first, last) = self.touched?;
        let start = start.max(first);
        if start > last {
            return None;
        }
        let (page, slot) = page_of(start);
        let next = match self.find(page) {
            Ok(at) if slot < self.pages[at].1.len() => return Some(start),
            Ok(at) => at + 1,
            Err(at) => at,
        };
        self.pages.get(next).map(|(page, _)| *page)
    }

    /// Open sessions that started at or after `start`.
    fn open_started_from(&mut self, start: i64) -> i64 {
        let mut open = 0;
        self.each_from(start, |window| open += window.open_started);
        open
    }

    /// Forgets the computed peak of every window a profile change at `time` can move: those
    /// ending after it.
    fn forget_peaks_from(&mut self, time: i64) {
        self.each_from(window_start(time, WINDOW), |window| window.peak = None);
    }

    fn clear_published(&mut self) {
        for (_, windows) in &mut self.pages {
            for window in windows.iter_mut() {
                window.published = None;
            }
        }
    }
}

/// Health accumulators of one 5-minute window.
#[derive(Debug, Default)]
struct HealthWindow {
    counted: IdSet,
    dry: u64,
    issues: u64,
    /// Sums are kept exact (bits/s and micro-frames/s as integers) so that the averages do not
    /// depend on the order events arrive in.
    bitrate_bps_sum: u128,
    bitrate_n: u64,
    fps_micro_sum: i128,
    fps_n: u64,
    tier: Option<(i64, Sym)>,
    packets_sent: u64,
    packets_lost: u64,
    published: Option<HealthRow>,
    dirty: bool,
}

#[derive(Debug, Default)]
struct Country {
    sums: SessionSums,
    published: Option<(u64, u64, u64, u64)>,
    dirty: bool,
}

impl Country {
    /// Reports this country's row if it changed since it was last reported: its new values, or
    /// its removal once it has no sessions. Returns whether it has none (the caller drops it).
    fn publish(
        &mut self,
        (tenant, internal_name, id): (Sym, Sym, Sym),
        code: Sym,
        now: i64,
        out: &mut Vec<PeriscopeChange>,
    ) -> bool {
        self.dirty = false;
        let key_code = country_code(code);
        if self.sums.sessions == 0 {
            if self.published.take().is_some() {
                out.push(PeriscopeChange::ViewersByCountry(Change::Delete((
                    tenant,
                    internal_name,
                    key_code,
                ))));
            }
            return true;
        }
        let seconds = self.sums.seconds(now);
        let values = (
            self.sums.sessions as u64,
            self.sums.open as u64,
            seconds.to_bits(),
            bytes(self.sums.down_bytes),
        );
        if self.published != Some(values) {
            self.published = Some(values);
            out.push(PeriscopeChange::ViewersByCountry(Change::Upsert(
                CountryRow {
                    tenant_id: tenant,
                    stream_id: id,
                    internal_name,
                    country_code: key_code,
                    sessions: values.0,
                    current_viewers: values.1,
                    viewer_seconds: seconds,
                    egress_bytes: values.3,
                },
            )));
        }
        false
    }
}

/// The viewer identities of a stream's sessions, with how many sessions each has. Most viewers
/// have one session, so those sit in a flat set (8 bytes an entry, its line prefetched before a
/// new session arrives) and only the rest carry a count (17 bytes a bucket): about 15 bytes less
/// per open session than one counted map (BENCHMARKS.md).
#[derive(Debug, Default)]
struct Identities {
    once: Set64,
    /// Identities with two sessions or more.
    more: HashMap<u64, u32, FxBuildHasher>,
}

impl Identities {
    fn add(&mut self, identity: u64) {
        if let Some(count) = self.more.get_mut(&identity) {
            *count += 1;
        } else if !self.once.insert(identity) {
            self.once.remove(identity);
            self.more.insert(identity, 2);
        }
    }

    fn remove(&mut self, identity: u64) {
        match self.more.get_mut(&identity) {
            Some(count) if *count > 2 => *count -= 1,
            Some(_) => {
                self.more.remove(&identity);
                self.once.insert(identity);
            }
            None => {
                self.once.remove(identity);
            }
        }
    }

    /// Distinct identities.
    fn len(&self) -> usize {
        self.once.len() + self.more.len()
    }
}

fn offer<T: Ord>(slot: &mut Option<(i64, T)>, time: i64, value: T) {
    let candidate = (time, value);
    if slot.as_ref().is_none_or(|current| *current < candidate) {
        *slot = Some(candidate);
    }
}

/// Everything Keel knows about one stream.
#[derive(Debug)]
struct StreamState {
    tenant: Sym,
    internal_name: Sym,
    /// The smallest public stream id any event carried.
    stream_id: Option<Uuid>,
    /// The id rows carry (`stream_id`, or derived), and whether rows were published with it.
    published_id: Option<Sym>,
    /// The id text last made, and the `stream_id` it was made from (hashing and interning it
    /// at every close was a few percent of the engine).
    id_text: Option<(Option<Uuid>, Sym)>,
    status: Option<StatusMark>,
    started_at: Option<i64>,
    updated_at: i64,
    ingress: Option<(i64, u64)>,
    buffer_state: Option<(i64, Sym)>,
    quality_tier: Option<(i64, Sym)>,
    /// The sessions, where readers of `viewer_sessions` read them too.
    held: Arc<HeldStream>,
    /// Whether every session's row is to be reported at the next close (its public id changed).
    republish_sessions: bool,
    /// Whether the stream is in [`StreamsState::remembering`].
    remembering: bool,
    profile: StepProfile,
    identities: Identities,
    sums: SessionSums,
    countries: HashMap<Sym, Country, FxBuildHasher>,
    windows: Windows,
    health: BTreeMap<i64, HealthWindow>,
    dirty_countries: Vec<Sym>,
    dirty_windows: Option<(i64, i64)>,
    dirty_health: Vec<i64>,
    /// Watermark at the last close: the horizon sessions are counted at (see
    /// [`Session::counted_span`](super::sessions::Session::counted_span)).
    closed_at: i64,
    /// Longest a session counts, ms.
    limit: i64,
    /// No open session reaches `limit` before this time, but those in `soon`.
    next_due: i64,
    /// Open sessions found to reach `limit` within a window of the last look (due time, slot),
    /// the latest first: later closes take them from here rather than look at every session.
    soon: Vec<(i64, u32)>,
    published: Option<StreamRow>,
    dirty: bool,
}

impl StreamState {
    fn new(
        tenant: Uuid,
        internal_name: Sym,
        store: &SessionStore,
        worker: usize,
        limit: i64,
    ) -> Self {
        let tenant = Sym::new(&tenant.to_string());
        let names = SymPair::new(tenant, internal_name);
        StreamState {
            tenant,
            internal_name,
            stream_id: None,
            published_id: None,
            id_text: None,
            status: None,
            started_at: None,
            updated_at: i64::MIN,
            ingress: None,
            buffer_state: None,
            quality_tier: None,
            held: store.hold(names, worker),
            republish_sessions: false,
            remembering: false,
            profile: StepProfile::default(),
            identities: Identities::default(),
            sums: SessionSums::default(),
            countries: HashMap::default(),
            windows: Windows::default(),
            health: BTreeMap::new(),
            dirty_countries: Vec::new(),
            dirty_windows: None,
            dirty_health: Vec::new(),
            closed_at: i64::MIN,
            limit,
            next_due: i64::MAX,
            soon: Vec::new(),
            published: None,
            dirty: false,
        }
    }

    fn stream_id_sym(&mut self) -> Sym {
        if let Some((from, text)) = self.id_text
            && from == self.stream_id
        {
            return text;
        }
        let id = self.stream_id.unwrap_or_else(|| {
            let name = format!("{}:{}", self.tenant, self.internal_name);
            Uuid::new_v5(&KEEL_NAMESPACE, name.as_bytes())
        });
        let text = Sym::new(&id.to_string());
        self.id_text = Some((self.stream_id, text));
        text
    }

    /// Absorbs `event` in the worker's close `generation`; `boundary` is the newest
    /// generation readers see.
    fn absorb(&mut self, event: Event, generation: u64, boundary: u64) {
        let time = event.time;
        self.updated_at = self.updated_at.max(time);
        if let Some(id) = event.kind.stream().and_then(|s| s.stream_id) {
            self.stream_id = Some(self.stream_id.map_or(id, |current| current.min(id)));
        }
        match event.kind {
            EventKind::IngestStart(e) => {
                self.mark_status((time, RANK_START, Sym::new("live"), e.node));
                self.started_at = Some(self.started_at.map_or(time, |s| s.max(time)));
            }
            EventKind::StreamUpdate(e) => {
                if !e.status.is_empty() {
                    self.mark_status((time, RANK_UPDATE, e.status, e.node));
                }
                if let Some(started) = e.started_at {
                    self.started_at = Some(self.started_at.map_or(started, |s| s.max(started)));
                }
                offer(&mut self.ingress, time, e.uploaded_bytes);
                if !e.buffer_state.is_empty() {
                    offer(&mut self.buffer_state, time, e.buffer_state);
                }
                if !e.quality_tier.is_empty() {
                    offer(&mut self.quality_tier, time, e.quality_tier);
                }
                let window = self.health_window(event.id, time);
                if let Some(h) = window {
                    if e.buffer_state.as_str() == "DRY" {
                        h.dry += 1;
                    }
                    if e.has_issues {
                        h.issues += 1;
                    }
                    if e.bitrate_bps > 0 {
                        h.bitrate_bps_sum += u128::from(e.bitrate_bps);
                        h.bitrate_n += 1;
                    }
                    if e.fps > 0.0 {
                        h.fps_micro_sum += micro(e.fps);
                        h.fps_n += 1;
                    }
                    if !e.quality_tier.is_empty() {
                        offer(&mut h.tier, time, e.quality_tier);
                    }
                    h.packets_sent += e.packets_sent;
                    h.packets_lost += e.packets_lost;
                }
            }
            EventKind::StreamBuffer(e) => {
                offer(&mut self.buffer_state, time, e.buffer_state);
                if !e.quality_tier.is_empty() {
                    offer(&mut self.quality_tier, time, e.quality_tier);
                }
                if let Some(h) = self.health_window(event.id, time) {
                    if e.buffer_state.as_str() == "DRY" {
                        h.dry += 1;
                    }
                    if e.has_issues {
                        h.issues += 1;
                    }
                    if !e.quality_tier.is_empty() {
                        offer(&mut h.tier, time, e.quality_tier);
                    }
                }
            }
            EventKind::TrackList(e) => {
                if !e.quality_tier.is_empty() {
                    offer(&mut self.quality_tier, time, e.quality_tier);
                    if let Some(h) = self.health_window(event.id, time) {
                        offer(&mut h.tier, time, e.quality_tier);
                    }
                }
            }
            EventKind::StreamEnd(e) => {
                self.mark_status((time, RANK_END, Sym::new("offline"), e.node));
                offer(&mut self.ingress, time, e.uploaded_bytes);
            }
            EventKind::ViewerConnect(e) => {
                let details = ClientDetails {
                    connector: e.place.connector,
                    country: e.place.country,
                    city: e.place.city,
                    identity: viewer_identity(&e.place.host, e.node, &e.session_id),
                };
                self.change_session(e.node, &e.session_id, generation, boundary, |s| {
                    s.connect(time, details)
                });
            }
            EventKind::ViewerDisconnect(e) => {
                let ending = Ending {
                    time,
                    duration_s: e.duration_s,
                    down_bytes: e.down_bytes,
                    up_bytes: e.up_bytes,
                    details: ClientDetails {
                        connector: e.place.connector,
                        country: e.place.country,
                        city: e.place.city,
                        identity: viewer_identity(&e.place.host, e.node, &e.session_id),
                    },
                };
                self.change_session(e.node, &e.session_id, generation, boundary, |s| {
                    s.disconnect(ending)
                });
            }
            EventKind::StreamSignal(_)
            | EventKind::Routing(_)
            | EventKind::NodeUpdate(_)
            | EventKind::Unknown(_) => {}
        }
    }

    /// Starts loading what a coming viewer event of this stream will touch: where its session
    /// is indexed (see [`Sessions::prefetch`](super::sessions::Sessions::prefetch); skipped
    /// while a reader holds the sessions) and, for a connect, where its viewer identity goes.
    fn prefetch(&self, event: &Event) {
        let (node, session_id, place) = match &event.kind {
            EventKind::ViewerConnect(e) => (e.node, &e.session_id, Some(&e.place)),
            EventKind::ViewerDisconnect(e) => (e.node, &e.session_id, None),
            _ => return,
        };
        if let Some(place) = place {
            let identity = viewer_identity(&place.host, node, session_id);
            self.identities.once.prefetch(identity);
        }
        if let Some(held) = self.held.try_lock() {
            held.sessions.prefetch(node, session_id);
        }
    }

    /// The second hint of a disconnect: loads the session its look-up will compare and update.
    fn prefetch_session(&self, node: Sym, session_id: &str) {
        if let Some(held) = self.held.try_lock() {
            held.sessions.prefetch_session(node, session_id);
        }
    }

    fn mark_status(&mut self, mark: StatusMark) {
        if self.status.is_none_or(|current| current < mark) {
            self.status = Some(mark);
        }
    }

    /// The health window of an event, or `None` if this event was already counted there.
    fn health_window(&mut self, id: Uuid, time: i64) -> Option<&mut HealthWindow> {
        let start = window_start(time, WINDOW);
        let window = self.health.entry(start).or_default();
        if !window.counted.insert(id.as_u128()) {
            return None;
        }
        if !window.dirty {
            window.dirty = true;
            self.dirty_health.push(start);
        }
        Some(window)
    }

    fn change_session(
        &mut self,
        node: Sym,
        session_id: &str,
        generation: u64,
        boundary: u64,
        change: impl FnOnce(&mut super::sessions::Session) -> bool,
    ) {
        let changed = {
            let mut held = self.held.lock();
            let slot = held.sessions.slot(node, session_id);
            held.change(
                slot,
                (generation, boundary),
                (self.closed_at, self.limit),
                change,
            )
        };
        let Some((before, after)) = changed else {
            return;
        };
        self.move_profile(before.as_ref(), &after);
        self.move_identity(before.as_ref(), &after);
        if let Some(before) = before {
            self.contribute(&before, -1);
        }
        self.contribute(&after, 1);
    }

    /// Adds (`sign` = 1) or removes (-1) a session's span from every aggregate.
    /// Moves a session's points in the concurrency profile, touching only points that changed
    /// (typically a disconnect adds an end and leaves the start alone).
    fn move_profile(&mut self, before: Option<&Span>, after: &Span) {
        let old = before.map(|b| (b.start, b.end));
        let (start, end) = (after.start, after.end);
        match old {
            Some((old_start, old_end)) => {
                if old_start != start {
                    self.profile_add(old_start, -1);
                    self.profile_add(start, 1);
                }
                if old_end != end {
                    if let Some(old_end) = old_end {
                        self.profile_add(old_end, 1);
                    }
                    if let Some(end) = end {
                        self.profile_add(end, -1);
                    }
                }
            }
            None => {
                self.profile_add(start, 1);
                if let Some(end) = end {
                    self.profile_add(end, -1);
                }
            }
        }
    }

    /// One change of the concurrency profile, and the windows whose peak it may move.
    fn profile_add(&mut self, time: i64, delta: i32) {
        self.profile.add(time, delta);
        self.windows.forget_peaks_from(time);
    }

    /// Moves a session between viewer identities (nothing to do when it stays the same).
    fn move_identity(&mut self, before: Option<&Span>, after: &Span) {
        let new = after.details.identity;
        if let Some(before) = before {
            let old = before.details.identity;
            if old == new {
                return;
            }
            self.identities.remove(old);
        }
        self.identities.add(new);
    }

    /// Adds (`sign` = 1) or removes (-1) a session's span from the sums of the stream, its country
    /// and its windows.
    fn contribute(&mut self, span: &Span, sign: i64) {
        self.sums.add(span, sign);
        let country = self.countries.entry(span.details.country).or_default();
        country.sums.add(span, sign);
        if !country.dirty {
            country.dirty = true;
            self.dirty_countries.push(span.details.country);
        }
        let first = window_start(span.start, WINDOW);
        let window = self.windows.entry(first);
        window.started += sign;
        let last = match span.end {
            None => {
                if sign > 0 {
                    self.next_due = self.next_due.min(span.start.saturating_add(self.limit));
                }
                window.open_started += sign;
                window.open_start_sum += i128::from(sign) * i128::from(span.start);
                i64::MAX
            }
            Some(end) => {
                let mut w = first;
                while w < end {
                    let overlap = end.min(w + WINDOW) - span.start.max(w);
                    self.windows.entry(w).closed_ms += i128::from(sign) * i128::from(overlap);
                    w += WINDOW;
                }
                window_start(end.max(span.start + 1) - 1, WINDOW)
            }
        };
        self.dirty_windows = Some(match self.dirty_windows {
            None => (first, last),
            Some((lo, hi)) => (lo.min(first), hi.max(last)),
        });
    }

    /// Reports every changed row, closing the worker's `generation`; `now` is the global
    /// watermark. Session rows are reported only with `report_rows` (they are read where they
    /// are held otherwise).
    fn close(
        &mut self,
        now: i64,
        generation: u64,
        report_rows: bool,
        out: &mut Vec<PeriscopeChange>,
    ) {
        let id = self.stream_id_sym();
        if self.published_id.is_some_and(|published| published != id) {
            self.republish_all();
        }
        self.published_id = Some(id);
        let watermark_moved = now != self.closed_at && self.sums.open > 0;
        if watermark_moved {
            let from = window_start(self.closed_at.max(i64::MIN / 2), WINDOW);
            self.dirty_windows = Some(match self.dirty_windows {
                None => (from, i64::MAX),
                Some((lo, _)) => (lo.min(from), i64::MAX),
            });
        }
        if now >= self.next_due || self.soon.last().is_some_and(|&(due, _)| due <= now) {
            self.expire(now);
        }
        self.closed_at = now;
        self.close_sessions(id, generation, report_rows, out);
        if watermark_moved {
            self.close_all_countries(id, now, out);
        } else {
            self.close_countries(id, now, out);
        }
        self.close_windows(id, now, out);
        self.close_health(id, out);
        let row = self.stream_row(id, now);
        if self.published.as_ref() != Some(&row) {
            self.published = Some(row.clone());
            out.push(PeriscopeChange::Streams(Change::Upsert(row)));
        }
    }

    /// Counts the open sessions that reach the session limit by `now` as ended there. Every
    /// session is looked at only when one not listed in `soon` is due, and then those due
    /// within the next window are listed: at most one look per window of event time.
    fn expire(&mut self, now: i64) {
        let horizon = (self.closed_at, now);
        let expired = {
            let held = self.held.lock();
            if now >= self.next_due {
                let found = held.expire(horizon, now.saturating_add(WINDOW), self.limit);
                self.soon = found.soon;
                self.next_due = found.next;
                found.due
            } else {
                let listed = self
                    .soon
                    .split_off(self.soon.partition_point(|&(due, _)| due > now));
                held.expire_listed(horizon, self.limit, listed)
            }
        };
        for (before, after) in expired {
            self.move_profile(Some(&before), &after);
            self.contribute(&before, -1);
            self.contribute(&after, 1);
        }
    }

    fn republish_all(&mut self) {
        self.republish_sessions = true;
        for (code, country) in &mut self.countries {
            country.published = None;
            if !country.dirty {
                country.dirty = true;
                self.dirty_countries.push(*code);
            }
        }
        if let Some(first) = self.windows.first() {
            self.windows.clear_published();
            self.dirty_windows = Some((first, i64::MAX));
        }
        for (start, health) in &mut self.health {
            health.published = None;
            if !health.dirty {
                health.dirty = true;
                self.dirty_health.push(*start);
            }
        }
    }

    fn close_sessions(
        &mut self,
        id: Sym,
        generation: u64,
        report_rows: bool,
        out: &mut Vec<PeriscopeChange>,
    ) {
        let all = std::mem::take(&mut self.republish_sessions);
        let rows = report_rows.then_some(out);
        self.held
            .lock()
            .close(self.held.names(), generation, id, all, rows);
    }

    /// Reports the countries whose sessions changed.
    fn close_countries(&mut self, id: Sym, now: i64, out: &mut Vec<PeriscopeChange>) {
        let key = (self.tenant, self.internal_name, id);
        for code in self.dirty_countries.drain(..) {
            let Some(country) = self.countries.get_mut(&code) else {
                continue;
            };
            if country.publish(key, code, now, out) {
                self.countries.remove(&code);
            }
        }
    }

    /// Reports the countries whose sessions changed and every country with open sessions (their
    /// viewer-seconds follow the watermark), in one walk over the map rather than a lookup each.
    fn close_all_countries(&mut self, id: Sym, now: i64, out: &mut Vec<PeriscopeChange>) {
        let key = (self.tenant, self.internal_name, id);
        let mut emptied = false;
        for (&code, country) in &mut self.countries {
            if country.dirty || country.sums.open > 0 {
                emptied |= country.publish(key, code, now, out);
            }
        }
        self.dirty_countries.clear();
        if emptied {
            self.countries
                .retain(|_, country| country.sums.sessions != 0);
        }
    }

    fn close_windows(&mut self, id: Sym, now: i64, out: &mut Vec<PeriscopeChange>) {
        let Some((lo, hi)) = self.dirty_windows.take() else {
            return;
        };
        let (Some(first), Some(last_key)) = (self.windows.first(), self.windows.last()) else {
            return;
        };
        let lo = lo.max(first);
        let hi = hi.min(window_start(now, WINDOW).max(last_key));
        // Open sessions that started before `lo`: all open ones minus those starting at or after.
        let mut open_before = self.sums.open - self.windows.open_started_from(lo);
        let mut w = lo;
        while w <= hi {
            let window = self.windows.get(w);
            if window.is_none() && open_before == 0 {
                // Nothing covers the windows up to the next page, or after the last: skip.
                match self.windows.next_held(w) {
                    Some(next) if next <= hi => {
                        w = next;
                        continue;
                    }
                    _ => break,
                }
            }
            let end = (w + WINDOW).min(now.max(w));
            let (started, closed_ms, open_started, open_start_sum, known_peak, published) = window
                .map_or((0, 0, 0, 0, None, None), |x| {
                    (
                        x.started,
                        x.closed_ms,
                        x.open_started,
                        x.open_start_sum,
                        x.peak,
                        x.published,
                    )
                });
            let open_ms = i128::from(open_before) * i128::from(end - w)
                + (i128::from(open_started) * i128::from(end) - open_start_sum).max(0);
            let viewer_ms = closed_ms + open_ms;
            let peak = match known_peak {
                Some(peak) => peak,
                None => {
                    let peak = self.profile.max_level_in(w, w + WINDOW).max(0) as u64;
                    if let Some(x) = self.windows.get_mut(w) {
                        x.peak = Some(peak);
                    }
                    peak
                }
            };
            let values = (peak, started.max(0) as u64, viewer_ms);
            let has_row = viewer_ms > 0 || started > 0 || peak > 0;
            if has_row && published != Some(values) {
                self.windows.entry(w).published = Some(values);
                out.push(PeriscopeChange::Usage5m(Change::Upsert(UsageRow {
                    tenant_id: self.tenant,
                    stream_id: id,
                    internal_name: self.internal_name,
                    window_start: w,
                    peak_viewers: peak,
                    sessions_started: values.1,
                    viewer_seconds: viewer_ms as f64 / SECOND as f64,
                })));
            } else if !has_row && published.is_some() {
                if let Some(x) = self.windows.get_mut(w) {
                    x.published = None;
                }
                out.push(PeriscopeChange::Usage5m(Change::Delete((
                    self.tenant,
                    self.internal_name,
                    w,
                ))));
            }
            open_before += open_started;
            w += WINDOW;
        }
    }

    fn close_health(&mut self, id: Sym, out: &mut Vec<PeriscopeChange>) {
        for start in self.dirty_health.drain(..) {
            let Some(h) = self.health.get_mut(&start) else {
                continue;
            };
            h.dirty = false;
            let row = HealthRow {
                tenant_id: self.tenant,
                stream_id: id,
                internal_name: self.internal_name,
                window_start: start,
                samples: h.counted.len() as u64,
                buffer_dry_count: h.dry,
                issue_count: h.issues,
                avg_bitrate_kbps: (h.bitrate_n > 0)
                    .then(|| h.bitrate_bps_sum as f64 / h.bitrate_n as f64 / 1000.0),
                avg_fps: (h.fps_n > 0).then(|| h.fps_micro_sum as f64 / h.fps_n as f64 / 1e6),
                quality_tier: h.tier.map(|(_, tier)| tier),
                packet_loss_rate: (h.packets_sent > 0)
                    .then(|| h.packets_lost as f64 / h.packets_sent as f64),
            };
            if h.published.as_ref() != Some(&row) {
                h.published = Some(row.clone());
                out.push(PeriscopeChange::StreamHealth5m(Change::Upsert(row)));
            }
        }
    }

    fn stream_row(&mut self, id: Sym, now: i64) -> StreamRow {
        StreamRow {
            tenant_id: self.tenant,
            stream_id: id,
            internal_name: self.internal_name,
            status: self.status.map_or(Sym::new("unknown"), |s| s.2),
            node_id: self.status.and_then(|s| s.3.non_empty()),
            current_viewers: self.sums.open.max(0) as u64,
            peak_viewers: self.profile.max_level().max(0) as u64,
            total_sessions: self.held.lock().sessions.len() as u64,
            unique_viewers: self.identities.len() as u64,
            viewer_seconds: self.sums.seconds(now),
            egress_bytes: bytes(self.sums.down_bytes),
            ingress_bytes: self.ingress.map_or(0, |(_, bytes)| bytes),
            buffer_state: self.buffer_state.map(|(_, s)| s),
            quality_tier: self.quality_tier.map(|(_, s)| s),
            started_at: self.started_at,
            updated_at: self.updated_at,
        }
    }
}

/// A non-negative quantity in millionths, for exact, order-independent sums.
pub(crate) fn micro(value: f64) -> i128 {
    (value * 1e6).round() as i128
}

/// The per-worker state of the streams dataflow.
#[derive(Debug)]
pub struct StreamsState {
    streams: HashMap<StreamKey, StreamState, FxBuildHasher>,
    dirty: Vec<StreamKey>,
    /// Streams with open sessions, refreshed when the watermark moves.
    open: HashSet<StreamKey, FxBuildHasher>,
    watermark: i64,
    /// Where the streams' sessions are held for readers.
    store: Arc<SessionStore>,
    worker: usize,
    /// The close being absorbed into (see [`super::held`]).
    generation: u64,
    /// The newest of this worker's generations readers see.
    boundary: Arc<AtomicU64>,
    /// Streams that may hold before-images readers do not need any more once their generation
    /// is visible: forgotten at each close, so a stream that goes quiet lets them go.
    remembering: Vec<StreamKey>,
    /// Longest a session counts in the aggregates, ms.
    session_limit: i64,
}

/// Longest a session counts in the aggregates: as long as a disconnect may report
/// ([`MAX_SESSION_SECONDS`]).
pub const SESSION_LIMIT: i64 = MAX_SESSION_SECONDS as i64 * SECOND;

impl Default for StreamsState {
    /// A state of worker 0 over a store of its own that reports session rows.
    fn default() -> Self {
        StreamsState::new(Arc::default(), 0)
    }
}

impl StreamsState {
    /// The state of `worker`, holding its streams' sessions in `store`.
    pub fn new(store: Arc<SessionStore>, worker: usize) -> Self {
        let boundary = store.boundary(worker);
        // Generations go on from the last one readers see (a store's first run starts at 1).
        let generation = boundary.load(Ordering::Acquire) + 1;
        StreamsState {
            streams: HashMap::default(),
            dirty: Vec::new(),
            open: HashSet::default(),
            watermark: 0,
            store,
            worker,
            generation,
            boundary,
            remembering: Vec::new(),
            session_limit: SESSION_LIMIT,
        }
    }

    /// Pages of usage windows held over all streams.
    #[cfg(test)]
    pub(crate) fn window_pages(&self) -> usize {
        self.streams.values().map(|s| s.windows.pages.len()).sum()
    }

    /// The same state counting sessions for at most `limit` ms (tests use minutes).
    pub fn with_session_limit(mut self, limit: i64) -> Self {
        self.session_limit = limit;
        self
    }
}

/// Routes a stream event: every event of one stream goes to the same worker.
pub fn route(event: &Event) -> u64 {
    let name = event
        .kind
        .stream()
        .map_or(0, |s| s.internal_name.stable_hash());
    name ^ (event.tenant.as_u128() as u64).rotate_left(17)
}

impl EpochState for StreamsState {
    type Input = Event;
    type Output = PeriscopeChange;

    fn apply(&mut self, event: Event) {
        let Some(stream) = event.kind.stream() else {
            return;
        };
        let key = (event.tenant, stream.internal_name);
        let (store, worker, limit) = (&self.store, self.worker, self.session_limit);
        let state = self
            .streams
            .entry(key)
            .or_insert_with(|| StreamState::new(key.0, key.1, store, worker, limit));
        let boundary = self.boundary.load(Ordering::Acquire);
        state.absorb(event, self.generation, boundary);
        if !state.dirty {
            state.dirty = true;
            self.dirty.push(key);
        }
    }

    fn prefetch(&self, event: &Event) {
        if let Some(stream) = event.kind.stream()
            && let Some(state) = self.streams.get(&(event.tenant, stream.internal_name))
        {
            state.prefetch(event);
        }
    }

    /// Only a disconnect's look-up reads a session (a connect nearly always makes a new one).
    fn prefetch_near(&self, event: &Event) {
        if let EventKind::ViewerDisconnect(e) = &event.kind
            && let Some(state) = self.streams.get(&(event.tenant, e.stream.internal_name))
        {
            state.prefetch_session(e.node, &e.session_id);
        }
    }

    fn close(&mut self, watermark: i64, output: &mut Vec<PeriscopeChange>) {
        if watermark != self.watermark {
            self.watermark = watermark;
            for key in &self.open {
                let state = self.streams.get_mut(key).expect("open streams are held");
                if !state.dirty {
                    state.dirty = true;
                    self.dirty.push(*key);
                }
            }
        }
        let report_rows = self.store.reports_rows();
        for key in self.dirty.drain(..) {
            let state = self.streams.get_mut(&key).expect("dirty streams are held");
            state.dirty = false;
            state.close(watermark, self.generation, report_rows, output);
            if state.sums.open > 0 {
                self.open.insert(key);
            } else {
                self.open.remove(&key);
            }
            if !state.remembering {
                state.remembering = true;
                self.remembering.push(key);
            }
        }
        let boundary = self.boundary.load(Ordering::Acquire);
        let streams = &mut self.streams;
        self.remembering.retain(|key| {
            let state = streams.get_mut(key).expect("remembering streams are held");
            state.remembering = state.held.lock().forget(boundary);
            state.remembering
        });
        output.push(PeriscopeChange::Closed {
            worker: u32::try_from(self.worker).expect("fewer than 2^32 workers"),
            generation: self.generation,
        });
        self.generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Against one counted map: the same number of distinct identities after every add and
        /// remove (a remove only of an identity that has a session, as sessions move).
        #[test]
        fn identities_agree_with_a_counted_map(
            steps in prop::collection::vec((any::<bool>(), 0u64..8), 0..300),
        ) {
            let mut identities = Identities::default();
            let mut model: HashMap<u64, u32> = HashMap::new();
            for (add, identity) in steps {
                if add {
                    identities.add(identity);
                    *model.entry(identity).or_insert(0) += 1;
                } else if let Some(count) = model.get_mut(&identity) {
                    identities.remove(identity);
                    *count -= 1;
                    if *count == 0 {
                        model.remove(&identity);
                    }
                }
                prop_assert_eq!(identities.len(), model.len());
                for (identity, &count) in &model {
                    let held = if count == 1 {
                        identities.once.contains(*identity) && !identities.more.contains_key(identity)
                    } else {
                        identities.more.get(identity) == Some(&count) && !identities.once.contains(*identity)
                    };
                    prop_assert!(held, "identity {} with {} sessions", identity, count);
                }
            }
        }
    }
}
