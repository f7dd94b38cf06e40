//! Interned strings: `Sym` is a 4-byte handle to a string that lives for the whole process.
//!
//! The analytics stream repeats a small vocabulary millions of times: node ids, stream names,
//! connectors, countries, cities. Interning them once turns each occurrence in state and in output
//! rows into a `u32`, which is what keeps per-session state small. High-cardinality values (session
//! ids, client addresses) are *not* interned: the table only grows, by design.
//!
//! Reads are lock-free (the table is an append-only set of chunks); writes take one of sixteen
//! shard locks, and a per-thread cache answers repeated look-ups without touching shared memory.
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

thread_local! {
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
