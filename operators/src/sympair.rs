//! `SymPair`: two interned strings under one 4-byte handle.
//!
//! Rows kept a million times over repeat a few pairs of names (every session row of a stream
//! names the same two owners): a handle for the pair takes 4 bytes where the two
//! [`Sym`]s take 8. Pairs are interned like texts, for the life of the process, so a handle is
//! the same pair on every thread; reading the pair back takes no lock.
//!
//! ```
//! use keel_operators::sym::Sym;
//! use keel_operators::sympair::SymPair;
//! let pair = SymPair::new(Sym::new("tenant-a"), Sym::new("stream-1"));
//! assert_eq!(pair, SymPair::new(Sym::new("tenant-a"), Sym::new("stream-1")));
//! assert_ne!(pair, SymPair::new(Sym::new("stream-1"), Sym::new("tenant-a")));
//! assert_eq!(pair.first().as_str(), "tenant-a");
//! assert_eq!(pair.second().as_str(), "stream-1");
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, OnceLock};

use rustc_hash::FxBuildHasher;

use crate::appendonly::AppendOnly;
use crate::sym::Sym;

/// A handle to an interned pair of [`Sym`]s; see the module documentation.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SymPair(u32);

struct Pairs {
    values: AppendOnly<(Sym, Sym)>,
    ids: Mutex<HashMap<(Sym, Sym), u32, FxBuildHasher>>,
}

fn pairs() -> &'static Pairs {
    static PAIRS: OnceLock<Pairs> = OnceLock::new();
    PAIRS.get_or_init(|| Pairs {
        values: AppendOnly::new(),
        ids: Mutex::new(HashMap::default()),
    })
}

impl SymPair {
    /// Interns (`first`, `second`), or finds it, and returns its handle. Takes a lock: callers
    /// that make many rows of one pair make the handle once.
    pub fn new(first: Sym, second: Sym) -> SymPair {
        let pairs = pairs();
        let mut ids = pairs
            .ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let id = *ids
            .entry((first, second))
            .or_insert_with(|| pairs.values.push((first, second)));
        SymPair(id)
    }

    /// Both names.
    pub fn get(self) -> (Sym, Sym) {
        *pairs()
            .values
            .get(self.0)
            .expect("a SymPair always refers to an interned pair")
    }

    /// The first name.
    pub fn first(self) -> Sym {
        self.get().0
    }

    /// The second name.
    pub fn second(self) -> Sym {
        self.get().1
    }
}

impl fmt::Debug for SymPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (first, second) = self.get();
        f.debug_tuple("SymPair")
            .field(&first)
            .field(&second)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pair_one_handle_across_threads() {
        let names: Vec<(Sym, Sym)> = (0..2000)
            .map(|i| {
                (
                    Sym::new(&format!("pair-tenant-{}", i % 7)),
                    Sym::new(&format!("pair-stream-{i}")),
                )
            })
            .collect();
        let handles: Vec<Vec<SymPair>> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        names
                            .iter()
                            .map(|&(a, b)| SymPair::new(a, b))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        for other in &handles[1..] {
            assert_eq!(&handles[0], other);
        }
        for (&(a, b), pair) in names.iter().zip(&handles[0]) {
            assert_eq!(pair.get(), (a, b));
        }
        let distinct: std::collections::HashSet<_> = handles[0].iter().collect();
        assert_eq!(
            distinct.len(),
            names.len(),
            "different pairs, different handles"
        );
    }
}
