//! A text as three numbers: its length and its first and last (up to) eight bytes.
//!
//! Short names (field names, node ids, countries) are compared and hashed many times per record.
//! As [`Words`] a name of up to 16 bytes is whole — the first and last eight bytes between them
//! hold every byte, and the length tells apart texts that differ only by trailing NUL bytes — so
//! two of them compare as three numbers, without a call to `memcmp`; for longer texts the words
//! are a filter and the bytes between still need comparing.
//!
//! ```
//! use keel_operators::words::Words;
//! assert_eq!(Words::of(b"edge-ams-1"), Words::of_const(b"edge-ams-1"));
//! assert_ne!(Words::of(b"a"), Words::of(b"a\0"));
//! assert!(Words::of(b"sixteen-bytes-ok").is_whole());
//! ```

/// A text's length and its first and last (up to) eight bytes, little-endian. Under eight
/// bytes both words hold the whole text, zero-padded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Words {
    /// Length in bytes.
    pub len: usize,
    /// The first eight bytes.
    pub head: u64,
    /// The last eight bytes.
    pub tail: u64,
}

impl Words {
    /// The compile-time form of [`Words::of`], with byte loops.
    pub const fn of_const(bytes: &[u8]) -> Self {
        let len = bytes.len();
        let start = len.saturating_sub(8);
        let (mut head, mut tail) = (0u64, 0u64);
        let mut i = 0;
        while i < len {
            if i < 8 {
                head |= (bytes[i] as u64) << (8 * i);
            }
            if i >= start {
                tail |= (bytes[i] as u64) << (8 * (i - start));
            }
            i += 1;
        }
        Words { len, head, tail }
    }

    /// The words of `bytes`, with word loads.
    #[inline]
    pub fn of(bytes: &[u8]) -> Self {
        let len = bytes.len();
        if len >= 8 {
            Words {
                len,
                head: word_at(bytes, 0),
                tail: word_at(bytes, len - 8),
            }
        } else {
            let word = bytes
                .iter()
                .rev()
                .fold(0u64, |word, &b| (word << 8) | u64::from(b));
            Words {
                len,
                head: word,
                tail: word,
            }
        }
    }

    /// Whether the words hold every byte (16 bytes or fewer), so equal words mean equal texts.
    pub const fn is_whole(&self) -> bool {
        self.len <= 16
    }
}

/// The eight bytes of `bytes` at `at` as a little-endian number.
#[inline]
pub fn word_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Run time and compile time agree, and whole words are equal exactly when the texts are.
        #[test]
        fn words_agree_and_tell_whole_texts_apart(a in "[ab\\x00]{0,20}", b in "[ab\\x00]{0,20}") {
            let (x, y) = (Words::of(a.as_bytes()), Words::of(b.as_bytes()));
            prop_assert_eq!(x, Words::of_const(a.as_bytes()));
            prop_assert_eq!(y, Words::of_const(b.as_bytes()));
            if x.is_whole() && y.is_whole() {
                prop_assert_eq!(x == y, a == b);
            }
        }
    }

    /// Every text over {a, NUL} of up to 16 bytes has words of its own: no two of the 131,071
    /// share them, across the NUL padding, every length and the overlap of head and tail.
    #[test]
    fn words_tell_every_small_text_apart() {
        let mut seen = std::collections::HashSet::new();
        let mut texts = 0;
        for len in 0..=16u32 {
            for bits in 0..1u32 << len {
                let text: Vec<u8> = (0..len)
                    .map(|i| if bits >> i & 1 == 1 { b'a' } else { 0 })
                    .collect();
                assert!(seen.insert(Words::of(&text)), "{text:?}");
                texts += 1;
            }
        }
        assert_eq!(texts, 131_071);
    }
}
