//! `AppendOnly<T>`: a process-wide table that only grows, read without locks.
//!
//! Interners hand out small numbers for values that live as long as the process (texts,
//! pairs of texts) and must turn a number back into its value on hot paths, from any thread.
//! Here values sit in chunks that never move: chunk `k` holds `1024 << k` values, each chunk is
//! allocated once by whoever first needs it, and each value is written once. A read is a shift,
//! a leading-zeros count and two atomic loads; a push is one atomic increment plus the write.
//! Twenty-two chunks hold more than four billion values.
//!
//! ```
//! use keel_operators::appendonly::AppendOnly;
//! let table = AppendOnly::new();
//! let a = table.push("a");
//! let b = table.push("b");
//! assert_eq!((table.get(a), table.get(b)), (Some(&"a"), Some(&"b")));
//! assert_eq!(table.get(b + 1), None);
//! ```

use std::fmt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

const FIRST_CHUNK: usize = 1024;
const CHUNKS: usize = 22;

/// A table of values numbered from 0 in the order pushed; see the module documentation.
pub struct AppendOnly<T> {
    chunks: [OnceLock<Box<[OnceLock<T>]>>; CHUNKS],
    next: AtomicU32,
}

impl<T> fmt::Debug for AppendOnly<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppendOnly")
            .field("len", &self.next.load(Ordering::Relaxed))
            .finish()
    }
}

impl<T> Default for AppendOnly<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Where value `id` lives: its chunk and its index there.
fn slot(id: u32) -> (usize, usize) {
    let scaled = id as usize / FIRST_CHUNK + 1;
    let chunk = (usize::BITS - 1 - scaled.leading_zeros()) as usize;
    let start = FIRST_CHUNK * ((1 << chunk) - 1);
    (chunk, id as usize - start)
}

impl<T> AppendOnly<T> {
    /// An empty table; allocates nothing until the first push.
    pub const fn new() -> Self {
        AppendOnly {
            chunks: [const { OnceLock::new() }; CHUNKS],
            next: AtomicU32::new(0),
        }
    }

    /// Appends `value` and returns its number. Two values pushed at once get different numbers;
    /// a caller that wants one number per distinct value checks (under its own lock) first.
    pub fn push(&self, value: T) -> u32 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (chunk, index) = slot(id);
        let values = self.chunks[chunk]
            .get_or_init(|| (0..FIRST_CHUNK << chunk).map(|_| OnceLock::new()).collect());
        if values[index].set(value).is_err() {
            unreachable!("each number is handed out once");
        }
        id
    }

    /// Value `id`, if it was pushed (and its push has finished).
    pub fn get(&self, id: u32) -> Option<&T> {
        let (chunk, index) = slot(id);
        self.chunks.get(chunk)?.get()?.get(index)?.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cover_ids_without_gaps() {
        let mut expected = (0, 0);
        for id in 0..(FIRST_CHUNK as u32 * 7) {
            assert_eq!(slot(id), expected, "id {id}");
            expected.1 += 1;
            if expected.1 == FIRST_CHUNK << expected.0 {
                expected = (expected.0 + 1, 0);
            }
        }
    }

    #[test]
    fn values_from_many_threads_are_all_kept_under_their_numbers() {
        let table = AppendOnly::new();
        let numbered: Vec<Vec<(u32, u32)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4u32)
                .map(|t| {
                    let table = &table;
                    s.spawn(move || {
                        (0..3000u32)
                            .map(|i| {
                                let value = t * 10_000 + i;
                                (table.push(value), value)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut ids: Vec<u32> = numbered.iter().flatten().map(|&(id, _)| id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..12_000).collect::<Vec<_>>(), "numbers are dense");
        for &(id, value) in numbered.iter().flatten() {
            assert_eq!(table.get(id), Some(&value));
        }
        assert_eq!(table.get(12_000), None);
        assert_eq!(table.get(u32::MAX), None);
    }
}
