//! `ShortStr`: an immutable string in 16 bytes, held inline up to 15 bytes long.
//!
//! High-cardinality identifiers (viewer session ids) are kept once per session, in state and in
//! output rows, a million times over; they are short (a node's session counter, a hex token). A
//! `String` costs 24 bytes plus its heap block, `CompactString` 24 bytes inline. `ShortStr` holds
//! up to 15 bytes in its own 16, and a longer text on the heap behind one thin pointer (16 bytes
//! for that pointer's box plus the text's block: a few bytes more than `CompactString` for long
//! texts, 8 bytes less for short ones).
//!
//! It compares, orders and hashes as its text, and serde sees the text.
//!
//! ```
//! use keel_operators::shortstr::ShortStr;
//! let short = ShortStr::from("8731");
//! let long = ShortStr::from("a0e8f6b2-51c4-4d6e-9a51-2f8f3c1d9e70");
//! assert_eq!(short, "8731");
//! assert_eq!(long.as_str().len(), 36);
//! assert!(short < long);
//! assert_eq!(size_of::<ShortStr>(), 16);
//! ```

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest text held inline.
pub const INLINE: usize = 15;

/// A string of at most [`INLINE`] bytes, stored in place.
#[derive(Clone, Copy)]
struct Inline {
    /// Length + 1, so that zero is free to mark the other representation.
    len_plus_one: std::num::NonZeroU8,
    bytes: [u8; INLINE],
}

#[derive(Clone)]
enum Repr {
    Inline(Inline),
    /// A thin pointer: the fat `Box<str>` sits in a box of its own.
    Heap(Box<Box<str>>),
}

/// An immutable string in 16 bytes; see the module documentation.
#[derive(Clone)]
pub struct ShortStr(Repr);

impl ShortStr {
    /// The text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline(inline) => {
                let len = usize::from(inline.len_plus_one.get() - 1);
                std::str::from_utf8(&inline.bytes[..len])
                    .expect("inline bytes are copied from a str whole")
            }
            Repr::Heap(text) => text,
        }
    }

    /// The text's bytes (no UTF-8 check, for comparisons).
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline(inline) => &inline.bytes[..usize::from(inline.len_plus_one.get() - 1)],
            Repr::Heap(text) => text.as_bytes(),
        }
    }

    /// Whether the text is held on the heap (longer than [`INLINE`] bytes).
    pub fn is_heap(&self) -> bool {
        matches!(self.0, Repr::Heap(_))
    }
}

impl From<&str> for ShortStr {
    fn from(text: &str) -> Self {
        if text.len() > INLINE {
            return ShortStr(Repr::Heap(Box::new(Box::from(text))));
        }
        let mut bytes = [0; INLINE];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        let len_plus_one = std::num::NonZeroU8::new(text.len() as u8 + 1)
            .expect("at most 15 plus one is not zero");
        ShortStr(Repr::Inline(Inline {
            len_plus_one,
            bytes,
        }))
    }
}

impl From<String> for ShortStr {
    fn from(text: String) -> Self {
        ShortStr::from(text.as_str())
    }
}

impl Default for ShortStr {
    fn default() -> Self {
        ShortStr::from("")
    }
}

impl Deref for ShortStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for ShortStr {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for ShortStr {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            // Inline bytes past the text are zero, so equal texts are equal in all 16 bytes:
            // a comparison of fixed size, with no call to `memcmp`.
            (Repr::Inline(a), Repr::Inline(b)) => {
                a.len_plus_one == b.len_plus_one && a.bytes == b.bytes
            }
            _ => self.as_bytes() == other.as_bytes(),
        }
    }
}

impl Eq for ShortStr {}

impl PartialEq<str> for ShortStr {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for ShortStr {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Ord for ShortStr {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl PartialOrd for ShortStr {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Hash for ShortStr {
    /// As `str` does by default (its bytes, then `0xff`), without checking the bytes are UTF-8.
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.as_bytes());
        state.write_u8(0xff);
    }
}

impl fmt::Debug for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ShortStr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ShortStr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ShortStr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ShortStr, E> {
                Ok(ShortStr::from(text))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::hash_map::DefaultHasher;

    fn hash_of<T: Hash + ?Sized>(value: &T) -> u64 {
        let mut hasher = DefaultHasher::new();
        value.hash(&mut hasher);
        hasher.finish()
    }

    #[test]
    fn is_16_bytes() {
        assert_eq!(size_of::<ShortStr>(), 16);
    }

    #[test]
    fn the_inline_limit_is_15_bytes() {
        let at = "x".repeat(INLINE);
        let over = "x".repeat(INLINE + 1);
        assert!(!ShortStr::from(at.as_str()).is_heap());
        assert!(ShortStr::from(over.as_str()).is_heap());
        assert_eq!(ShortStr::from(over.as_str()), over.as_str());
        // Multi-byte characters count in bytes: 5 × 3 bytes inline, 6 × 3 on the heap.
        assert!(!ShortStr::from("€€€€€").is_heap());
        assert!(ShortStr::from("€€€€€€").is_heap());
    }

    proptest! {
        /// Text, equality, order, hash and serde are the text's, for short and long texts alike.
        #[test]
        fn behaves_as_its_text(a in "\\PC{0,24}", b in "\\PC{0,24}") {
            let (sa, sb) = (ShortStr::from(a.as_str()), ShortStr::from(b.as_str()));
            prop_assert_eq!(sa.as_str(), a.as_str());
            prop_assert_eq!(sa.is_heap(), a.len() > INLINE);
            prop_assert_eq!(sa == sb, a == b);
            prop_assert_eq!(sa.cmp(&sb), a.cmp(&b));
            prop_assert_eq!(hash_of(&sa), hash_of(a.as_str()));
            let json = serde_json::to_string(&sa).unwrap();
            prop_assert_eq!(&json, &serde_json::to_string(&a).unwrap());
            let back: ShortStr = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back, sa);
        }

        /// Equality is the texts' also where texts often agree, differ by a trailing zero byte
        /// (which the inline padding holds) or cross the inline limit.
        #[test]
        fn equal_exactly_when_the_texts_are(a in "[ab\\x00]{0,17}", b in "[ab\\x00]{0,17}") {
            let (sa, sb) = (ShortStr::from(a.as_str()), ShortStr::from(b.as_str()));
            prop_assert_eq!(sa == sb, a == b);
            prop_assert_eq!(sa == b.as_str(), a == b);
        }
    }
}
