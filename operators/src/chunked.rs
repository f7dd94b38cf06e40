//! A growable array kept in fixed-size chunks, for tables of a million rows and more.
//!
//! A plain `Vec` doubles when full: it copies every element into a new allocation twice the
//! size, whose pages the kernel must first zero. With a million 72-byte rows that is one step
//! of well over 100 ms in which nothing else happens, and every subscriber's latency shows it.
//! [`ChunkedVec`] never moves what it stores: it adds one chunk of [`CHUNK`] elements at a time,
//! so growing costs the same small amount at every size. Indexing is one shift and one mask.
//!
//! Every chunk but the last is full; the last holds from zero to [`CHUNK`] elements. An empty
//! last chunk is kept until a second removal needs the chunk before it, so pushes and removals
//! alternating at a chunk boundary do not allocate and free a chunk each time.
//!
//! ```
//! use keel_operators::chunked::ChunkedVec;
//! let mut rows = ChunkedVec::new();
//! rows.push("a");
//! rows.push("b");
//! rows.push("c");
//! assert_eq!(rows.swap_remove(0), "a");
//! assert_eq!(rows.iter().copied().collect::<Vec<_>>(), ["c", "b"]);
//! ```

use std::fmt;
use std::ops::{Index, IndexMut};

/// log2 of the default chunk's length.
pub const CHUNK_BITS: u32 = 12;
/// Elements per chunk, by default.
pub const CHUNK: usize = 1 << CHUNK_BITS;

/// A growable array in chunks of `2^BITS` elements (by default [`CHUNK`]); see the module
/// documentation. Many small arrays that each grow to thousands of elements take shorter chunks,
/// so that what one of them has allocated and not yet filled stays small.
pub struct ChunkedVec<T, const BITS: u32 = CHUNK_BITS> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T> ChunkedVec<T> {
    /// An empty array in chunks of [`CHUNK`] elements; allocates nothing until the first push.
    pub const fn new() -> Self {
        ChunkedVec {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T, const BITS: u32> ChunkedVec<T, BITS> {
    /// Elements per chunk.
    pub const CHUNK: usize = 1 << BITS;
    const MASK: usize = Self::CHUNK - 1;

    /// An empty array; allocates nothing until the first push. (`Default` for other chunk
    /// lengths than the default one.)
    const fn empty() -> Self {
        ChunkedVec {
            chunks: Vec::new(),
            len: 0,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `value`; never moves the elements already stored.
    pub fn push(&mut self, value: T) {
        let needs_chunk = self
            .chunks
            .last()
            .is_none_or(|last| last.len() == Self::CHUNK);
        if needs_chunk {
            // The first chunk grows as a `Vec` does (small tables stay small); later chunks
            // are allocated whole, once.
            let chunk = if self.chunks.is_empty() {
                Vec::new()
            } else {
                Vec::with_capacity(Self::CHUNK)
            };
            self.chunks.push(chunk);
        }
        if let Some(last) = self.chunks.last_mut() {
            last.push(value);
            self.len += 1;
        }
    }

    /// Removes and returns the last element.
    pub fn pop(&mut self) -> Option<T> {
        if self.chunks.last().is_some_and(Vec::is_empty) {
            self.chunks.pop();
        }
        let value = self.chunks.last_mut()?.pop()?;
        self.len -= 1;
        Some(value)
    }

    /// Removes the element at `index`, moving the last element into its place.
    ///
    /// # Panics
    /// If `index` is out of bounds, as `Vec::swap_remove` does.
    pub fn swap_remove(&mut self, index: usize) -> T {
        let len = self.len;
        assert!(
            index < len,
            "swap_remove index {index} out of bounds (len {len})"
        );
        let last = self.pop().expect("a non-empty array has a last element");
        if index == len - 1 {
            last
        } else {
            std::mem::replace(&mut self[index], last)
        }
    }

    /// The element at `index`, if any.
    pub fn get(&self, index: usize) -> Option<&T> {
        self.chunks.get(index >> BITS)?.get(index & Self::MASK)
    }

    /// The element at `index`, mutably, if any.
    pub fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        self.chunks
            .get_mut(index >> BITS)?
            .get_mut(index & Self::MASK)
    }

    /// The elements in index order.
    pub fn iter(&self) -> Iter<'_, T> {
        self.chunks.iter().flatten()
    }

    /// Drops every element and every chunk.
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.len = 0;
    }
}

impl<T: Clone, const BITS: u32> ChunkedVec<T, BITS> {
    /// The elements in index order, copied into one `Vec`.
    pub fn to_vec(&self) -> Vec<T> {
        let mut all = Vec::with_capacity(self.len);
        for chunk in &self.chunks {
            all.extend_from_slice(chunk);
        }
        all
    }
}

/// Iterator over a [`ChunkedVec`]'s elements in index order.
pub type Iter<'a, T> = std::iter::Flatten<std::slice::Iter<'a, Vec<T>>>;

impl<T, const BITS: u32> Default for ChunkedVec<T, BITS> {
    fn default() -> Self {
        ChunkedVec::empty()
    }
}

impl<T: fmt::Debug, const BITS: u32> fmt::Debug for ChunkedVec<T, BITS> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T: Clone, const BITS: u32> Clone for ChunkedVec<T, BITS> {
    fn clone(&self) -> Self {
        let mut chunks = Vec::with_capacity(self.chunks.len());
        for chunk in &self.chunks {
            let mut copy = Vec::with_capacity(chunk.capacity().min(Self::CHUNK));
            copy.extend_from_slice(chunk);
            chunks.push(copy);
        }
        ChunkedVec {
            chunks,
            len: self.len,
        }
    }
}

impl<T: PartialEq, const BITS: u32> PartialEq for ChunkedVec<T, BITS> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl<T, const BITS: u32> Index<usize> for ChunkedVec<T, BITS> {
    type Output = T;
    fn index(&self, index: usize) -> &T {
        let len = self.len;
        self.get(index)
            .unwrap_or_else(|| panic!("index {index} out of bounds (len {len})"))
    }
}

impl<T, const BITS: u32> IndexMut<usize> for ChunkedVec<T, BITS> {
    fn index_mut(&mut self, index: usize) -> &mut T {
        let len = self.len;
        self.get_mut(index)
            .unwrap_or_else(|| panic!("index {index} out of bounds (len {len})"))
    }
}

impl<'a, T, const BITS: u32> IntoIterator for &'a ChunkedVec<T, BITS> {
    type Item = &'a T;
    type IntoIter = Iter<'a, T>;
    fn into_iter(self) -> Iter<'a, T> {
        self.iter()
    }
}

impl<T, const BITS: u32> FromIterator<T> for ChunkedVec<T, BITS> {
    fn from_iter<I: IntoIterator<Item = T>>(items: I) -> Self {
        let mut all = ChunkedVec::empty();
        all.extend(items);
        all
    }
}

impl<T, const BITS: u32> Extend<T> for ChunkedVec<T, BITS> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, items: I) {
        for item in items {
            self.push(item);
        }
    }
}

/// Serialized as a sequence, exactly as a `Vec` of the same elements is.
impl<T: serde::Serialize, const BITS: u32> serde::Serialize for ChunkedVec<T, BITS> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Push(u32),
        Pop,
        SwapRemove(usize),
        Set(usize, u32),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => any::<u32>().prop_map(Op::Push),
            2 => Just(Op::Pop),
            3 => any::<usize>().prop_map(Op::SwapRemove),
            2 => (any::<usize>(), any::<u32>()).prop_map(|(i, v)| Op::Set(i, v)),
            1 => Just(Op::Clear),
        ]
    }

    /// Checks the chunk invariant: all chunks but the last are full.
    fn chunks_are_packed<T, const BITS: u32>(v: &ChunkedVec<T, BITS>) -> bool {
        let n = v.chunks.len();
        v.chunks
            .iter()
            .take(n.saturating_sub(1))
            .all(|c| c.len() == ChunkedVec::<T, BITS>::CHUNK)
            && v.chunks.iter().map(Vec::len).sum::<usize>() == v.len
            && v.chunks.iter().filter(|c| c.is_empty()).count() <= 1
    }

    /// Applies `ops` to a `Vec` holding `0..bulk` and to a `ChunkedVec` in chunks of `2^BITS`
    /// built from it, and requires the same elements, in the same order, after every step.
    fn behaves_as_a_vec_in<const BITS: u32>(
        ops: Vec<Op>,
        bulk: usize,
    ) -> Result<(), TestCaseError> {
        let mut model: Vec<u32> = (0..u32::try_from(bulk).unwrap()).collect();
        let mut chunked: ChunkedVec<u32, BITS> = model.iter().copied().collect();
        for op in ops {
            match op {
                Op::Push(v) => {
                    // Several at a time, so boundaries are crossed both ways.
                    for k in 0..5 {
                        model.push(v.wrapping_add(k));
                        chunked.push(v.wrapping_add(k));
                    }
                }
                Op::Pop => {
                    for _ in 0..5 {
                        prop_assert_eq!(chunked.pop(), model.pop());
                    }
                }
                Op::SwapRemove(i) if !model.is_empty() => {
                    let i = i % model.len();
                    prop_assert_eq!(chunked.swap_remove(i), model.swap_remove(i));
                }
                Op::SwapRemove(_) => {}
                Op::Set(i, v) if !model.is_empty() => {
                    let i = i % model.len();
                    model[i] = v;
                    chunked[i] = v;
                }
                Op::Set(..) => {}
                Op::Clear => {
                    model.clear();
                    chunked.clear();
                }
            }
            prop_assert!(chunks_are_packed(&chunked));
            prop_assert_eq!(chunked.len(), model.len());
            prop_assert_eq!(chunked.get(model.len()), None);
        }
        prop_assert_eq!(chunked.iter().copied().collect::<Vec<_>>(), model.clone());
        prop_assert_eq!(chunked.to_vec(), model.clone());
        prop_assert_eq!(
            chunked.clone(),
            chunked.iter().copied().collect::<ChunkedVec<_, BITS>>()
        );
        prop_assert_eq!(
            serde_json::to_string(&chunked).unwrap(),
            serde_json::to_string(&model).unwrap()
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any sequence of operations leaves the same elements, in the same order, as a `Vec`
        /// given the same operations; runs of pushes and pops cross chunk boundaries often.
        #[test]
        fn behaves_as_a_vec(ops in proptest::collection::vec(op(), 0..64), bulk in 0usize..3 * CHUNK) {
            behaves_as_a_vec_in::<CHUNK_BITS>(ops, bulk)?;
        }

        /// The same in chunks of 8 elements, where nearly every step crosses a boundary.
        #[test]
        fn short_chunks_behave_as_a_vec(ops in proptest::collection::vec(op(), 0..64), bulk in 0usize..40) {
            behaves_as_a_vec_in::<3>(ops, bulk)?;
        }
    }

    #[test]
    fn growing_never_moves_stored_elements() {
        let mut v = ChunkedVec::new();
        // The first chunk grows as a Vec does until it is full; from then on nothing moves.
        for i in 0..(CHUNK as u64 + 1) {
            v.push(i);
        }
        let first: *const u64 = &v[0];
        let second: *const u64 = &v[CHUNK];
        for i in 0..(8 * CHUNK as u64) {
            v.push(i);
        }
        assert_eq!(first, &raw const v[0]);
        assert_eq!(second, &raw const v[CHUNK]);
        assert_eq!(v.len(), 9 * CHUNK + 1);
        assert_eq!((v[0], v[CHUNK], v[CHUNK + 1]), (0, CHUNK as u64, 0));
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn swap_remove_out_of_bounds_panics_like_a_vec() {
        let mut v: ChunkedVec<u8> = ChunkedVec::new();
        v.push(1);
        v.swap_remove(1);
    }
}
