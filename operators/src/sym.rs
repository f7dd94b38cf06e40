//! Interned strings: `Sym` is a 4-byte handle to a string that lives for the whole process.
//!
//! The analytics stream repeats a small vocabulary millions of times: node ids, stream names,
//! connectors, countries, cities. Interning them once turns each occurrence in state and in output
//! rows into a `u32`, which is what keeps per-session state small. High-cardinality values (session
//! ids, client addresses) are *not* interned: the table only grows, by design.
//!
//! Reads are lock-free (the table is an append-only set of chunks); writes take one of sixteen
//! shard locks, and a per-thread cache answers repeated look-ups without touching shared memory.
//! In front of that cache, names of up to 16 bytes (nearly every name in events) are found in a
//! per-thread table of 1,024 slots picked from the text's length and two words, and compared as
//! those three words; texts that share a slot replace each other there.
//!
//! `Sym` compares and sorts by its text, never by its number, so anything ordered by `Sym` is
//! ordered the same in every process and run; equality is by number, which is the same thing because
//! one text has one number. Serde sees the text, so rows that cross a process boundary stay exact.
//!
//! ```
//! use keel_operators::sym::Sym;
//! let a = Sym::new("edge-ams-1");
//! assert_eq!(a, Sym::new("edge-ams-1"));
//! assert_eq!(a.as_str(), "edge-ams-1");
//! assert!(Sym::new("a") < Sym::new("b"));
//! assert!(Sym::default().is_empty());
//! ```

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Mutex, OnceLock};

use rustc_hash::FxBuildHasher;

use crate::appendonly::AppendOnly;
use crate::words::Words;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A handle to an interned string. `Sym::default()` is the empty string.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Sym(u32);

const SHARDS: usize = 16;

struct Entry {
    text: &'static str,
    hash: u64,
}

struct Interner {
    entries: AppendOnly<Entry>,
    shards: [Mutex<HashMap<&'static str, u32, FxBuildHasher>>; SHARDS],
}

fn interner() -> &'static Interner {
    static INTERNER: OnceLock<Interner> = OnceLock::new();
    INTERNER.get_or_init(|| {
        let interner = Interner {
            entries: AppendOnly::new(),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::default())),
        };
        // Id 0 is the empty string, so `Sym::default()` needs no look-up.
        interner.push_entry("", text_hash(""));
        interner
    })
}

/// The hash every process computes for the same text (used to route keys to workers).
pub fn text_hash(text: &str) -> u64 {
    FxBuildHasher.hash_one(text)
}

impl Interner {
    fn entry(&self, id: u32) -> &Entry {
        self.entries
            .get(id)
            .expect("a Sym always refers to an interned entry")
    }

    /// Appends a new entry and returns its id; callers make sure `text` is not in the table yet.
    fn push_entry(&self, text: &str, hash: u64) -> (u32, &'static str) {
        let text: &'static str = Box::leak(text.to_owned().into_boxed_str());
        (self.entries.push(Entry { text, hash }), text)
    }

    fn find(&self, text: &str) -> Option<u32> {
        let hash = text_hash(text);
        let shard = self.shards[hash as usize % SHARDS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        shard.get(text).copied()
    }

    fn intern(&self, text: &str) -> u32 {
        let hash = text_hash(text);
        let mut shard = self.shards[hash as usize % SHARDS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(&id) = shard.get(text) {
            return id;
        }
        let (id, text) = self.push_entry(text, hash);
        shard.insert(text, id);
        id
    }
}

/// A text of 1 to 16 bytes as its [`Words`], which are then the whole text: comparing them costs
/// three compares, where the thread's cache hashes the whole text and compares it with `memcmp`.
#[inline]
fn short(text: &str) -> Option<Words> {
    (1..=16)
        .contains(&text.len())
        .then(|| Words::of(text.as_bytes()))
}

/// The slot of [`RECENT`] for a short text's words.
#[inline]
fn spread(short: &Words) -> usize {
    let mixed = (short.head ^ short.tail.rotate_left(29) ^ short.len as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> (64 - RECENT_BITS)) as usize
}

/// One slot of [`RECENT`]: a short text and its handle (length 0: empty slot).
#[derive(Clone, Copy)]
struct Recent {
    short: Words,
    sym: u32,
}

/// log2 of the slots in [`RECENT`] (1,024 slots, 32 KiB a thread).
const RECENT_BITS: u32 = 10;
const _: () = assert!(size_of::<Recent>() == 32);

thread_local! {
    /// The short texts this thread interned lately, one per slot: most names in events (nodes,
    /// streams' internal names, connectors, countries) are 16 bytes or less and repeat, and a hit
    /// here needs neither a hash of the text nor a `memcmp`.
    static RECENT: [std::cell::Cell<Recent>; 1 << RECENT_BITS] = const {
        [const {
            std::cell::Cell::new(Recent {
                short: Words { len: 0, head: 0, tail: 0 },
                sym: 0,
            })
        }; 1 << RECENT_BITS]
    };
    /// Set while deserializing text that must not grow the interner (see [`lookup_only`]).
    static LOOKUP_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static CACHE: RefCell<HashMap<&'static str, Sym, FxBuildHasher>> = RefCell::new(HashMap::default());
}

/// Runs `f` with `Sym` deserialization in lookup-only mode: text that was never interned fails
/// to deserialize instead of being interned. For keys built from user input (a SQL literal),
/// which must not grow the interner, and which cannot match any row if they fail.
pub fn lookup_only<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            LOOKUP_ONLY.with(|flag| flag.set(self.0));
        }
    }
    let _reset = Reset(LOOKUP_ONLY.with(|flag| flag.replace(true)));
    f()
}

impl Sym {
    /// The handle of `text` if it was interned; never interns.
    pub fn find(text: &str) -> Option<Sym> {
        if text.is_empty() {
            return Some(Sym(0));
        }
        CACHE.with(|cache| {
            if let Some(&sym) = cache.borrow().get(text) {
                return Some(sym);
            }
            // Found names are cached too: a thread that only looks names up (routing) then
            // stops taking the shard locks the interning threads take.
            let table = interner();
            let sym = Sym(table.find(text)?);
            cache.borrow_mut().insert(table.entry(sym.0).text, sym);
            Some(sym)
        })
    }

    /// Interns `text` (or finds it) and returns its handle.
    pub fn new(text: &str) -> Sym {
        if text.is_empty() {
            return Sym(0);
        }
        let Some(short) = short(text) else {
            return Sym::new_in_cache(text);
        };
        RECENT.with(|recent| {
            let slot = &recent[spread(&short)];
            let seen = slot.get();
            if seen.short == short {
                return Sym(seen.sym);
            }
            let sym = Sym::new_in_cache(text);
            slot.set(Recent { short, sym: sym.0 });
            sym
        })
    }

    /// [`Sym::new`] through the thread's cache of every handle it used.
    fn new_in_cache(text: &str) -> Sym {
        CACHE.with(|cache| {
            if let Some(&sym) = cache.borrow().get(text) {
                return sym;
            }
            let table = interner();
            let sym = Sym(table.intern(text));
            cache.borrow_mut().insert(table.entry(sym.0).text, sym);
            sym
        })
    }

    /// The text this handle stands for.
    pub fn as_str(self) -> &'static str {
        if self.0 == 0 {
            return "";
        }
        interner().entry(self.0).text
    }

    /// True for the empty string.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// `None` for the empty string, else `Some(self)`.
    pub fn non_empty(self) -> Option<Sym> {
        (!self.is_empty()).then_some(self)
    }

    /// A hash of the text that is the same in every process (see [`text_hash`]).
    pub fn stable_hash(self) -> u64 {
        interner().entry(self.0).hash
    }
}

impl Ord for Sym {
    fn cmp(&self, other: &Self) -> Ordering {
        if self.0 == other.0 {
            Ordering::Equal
        } else {
            self.as_str().cmp(other.as_str())
        }
    }
}

impl PartialOrd for Sym {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Debug for Sym {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Sym {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Sym {
    fn from(text: &str) -> Self {
        Sym::new(text)
    }
}

impl Serialize for Sym {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Sym {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        if LOOKUP_ONLY.with(std::cell::Cell::get) {
            return Sym::find(&text)
                .ok_or_else(|| serde::de::Error::custom("text that was never interned"));
        }
        Ok(Sym::new(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Two short texts have equal words exactly when they are equal (NUL bytes included,
        /// which the zero padding must not confuse with a shorter text), and only texts of 1 to
        /// 16 bytes have words.
        #[test]
        fn short_words_are_equal_exactly_when_texts_are(a in "[ab\\x00]{0,17}", b in "[ab\\x00]{0,17}") {
            prop_assert_eq!(short(&a).is_some(), (1..=16).contains(&a.len()));
            prop_assert_eq!(short(&b).is_some(), (1..=16).contains(&b.len()));
            if let (Some(x), Some(y)) = (short(&a), short(&b)) {
                prop_assert_eq!(x == y, a == b);
            }
        }

        /// Through the recent-texts slots or not, one text has one handle: many texts in turn
        /// (more than the slots hold, so they evict each other) keep their handles and texts.
        #[test]
        fn handles_survive_the_recent_slots(texts in proptest::collection::vec("[a-d\\x00]{0,20}", 1..300)) {
            let first: Vec<Sym> = texts.iter().map(|t| Sym::new(t)).collect();
            for _ in 0..2 {
                for (text, sym) in texts.iter().zip(&first) {
                    prop_assert_eq!(Sym::new(text), *sym);
                    prop_assert_eq!(sym.as_str(), text.as_str());
                    prop_assert_eq!(Sym::find(text), Some(*sym));
                }
            }
            for i in 0..2_000 {
                Sym::new(&format!("evict-{i}"));
            }
            for (text, sym) in texts.iter().zip(&first) {
                prop_assert_eq!(Sym::new(text), *sym);
            }
        }
    }

    /// A text one byte away from a text just interned (changed, added, or a character across the
    /// eighth byte) gets its own handle, not the neighbour's slot.
    #[test]
    fn near_texts_get_their_own_handles() {
        let letters = "abcdefghijklmnop";
        for n in 1..=16 {
            let base = &letters[..n];
            let mut variants: Vec<String> =
                vec![format!("{base}\0"), format!("{}é", &base[..n - 1])];
            for i in 0..n {
                for byte in [b'\0', b'z'] {
                    let mut bytes = base.as_bytes().to_vec();
                    bytes[i] = byte;
                    variants.push(String::from_utf8(bytes).expect("ASCII"));
                }
            }
            for variant in variants {
                let sym = Sym::new(base);
                assert_eq!(Sym::new(&variant).as_str(), variant);
                assert_eq!(Sym::new(base), sym);
                assert_eq!(sym.as_str(), base);
            }
        }
    }

    #[test]
    fn lookup_only_finds_interned_text_and_never_interns_new_text() {
        let known = Sym::new("lookup-only-known");
        let parsed: Result<(Sym, Sym), _> = lookup_only(|| {
            serde_json::from_str(r#"["lookup-only-known", "lookup-only-never-seen"]"#)
        });
        assert!(parsed.is_err(), "unknown text fails");
        let parsed: (Sym, Sym) =
            lookup_only(|| serde_json::from_str(r#"["lookup-only-known", ""]"#)).unwrap();
        assert_eq!(parsed, (known, Sym::new("")));
        assert_eq!(Sym::find("lookup-only-never-seen"), None);
        // Short texts (the per-thread slots' size) behave the same.
        let short = Sym::new("lo-known");
        let parsed: Result<Sym, _> = lookup_only(|| serde_json::from_str(r#""lo-never""#));
        assert!(parsed.is_err(), "unknown short text fails");
        assert_eq!(Sym::find("lo-never"), None);
        let parsed: Sym = lookup_only(|| serde_json::from_str(r#""lo-known""#)).unwrap();
        assert_eq!(parsed, short);
        // Outside the mode, deserializing interns as before.
        let outside: Sym = serde_json::from_str(r#""lookup-only-later""#).unwrap();
        assert_eq!(Sym::find("lookup-only-later"), Some(outside));
    }

    #[test]
    fn a_thread_that_only_looks_up_finds_what_others_interned_and_nothing_else() {
        let interned = std::thread::spawn(|| Sym::new("find-from-another-thread"))
            .join()
            .unwrap();
        std::thread::spawn(move || {
            assert_eq!(Sym::find("find-from-another-thread-not"), None);
            for _ in 0..2 {
                // Once from the shared table, then from this thread's cache.
                assert_eq!(Sym::find("find-from-another-thread"), Some(interned));
            }
            assert_eq!(Sym::find("find-from-another-thread-not"), None);
            assert_eq!(
                CACHE.with(|c| c.borrow().get("find-from-another-thread").copied()),
                Some(interned)
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn one_text_one_id_across_threads() {
        let texts: Vec<String> = (0..3000).map(|i| format!("node-{i}")).collect();
        let ids: Vec<Vec<Sym>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| texts.iter().map(|t| Sym::new(t)).collect::<Vec<_>>()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for other in &ids[1..] {
            assert_eq!(&ids[0], other);
        }
        for (text, sym) in texts.iter().zip(&ids[0]) {
            assert_eq!(sym.as_str(), text);
            assert_eq!(sym.stable_hash(), text_hash(text));
        }
    }

    #[test]
    fn serde_round_trip_is_by_text() {
        let sym = Sym::new("München");
        let json = serde_json::to_string(&sym).unwrap();
        assert_eq!(json, "\"München\"");
        let back: Sym = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sym);
    }
}
