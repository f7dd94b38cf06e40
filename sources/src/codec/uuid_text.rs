//! UUIDs read from their text eight characters at a time.
//!
//! A record carries three UUIDs the codec parses (tenant, event id, stream id), all in the
//! hyphenated 36-character form the platform writes. [`parse`] reads that form with word
//! arithmetic: each run of eight hex digits is checked and turned into four bytes with a few
//! operations on one `u64`, where the `uuid` crate looks each digit up in a table. Any other
//! text (braced, URN, 32 digits, or not a UUID) goes to the `uuid` crate, so the two accept
//! exactly the same strings.

use uuid::Uuid;

/// A one in every byte of a word, and every byte's high bit.
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The UUID `text` spells, in any form the `uuid` crate accepts.
#[inline]
pub(super) fn parse(text: &str) -> Option<Uuid> {
    hyphenated(text.as_bytes()).or_else(|| Uuid::try_parse(text).ok())
}

/// The hyphenated form only: `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, digits of either case.
#[inline]
fn hyphenated(text: &[u8]) -> Option<Uuid> {
    let text: &[u8; 36] = text.try_into().ok()?;
    if text[8] != b'-' || text[13] != b'-' || text[18] != b'-' || text[23] != b'-' {
        return None;
    }
    let half = |at: usize| u32::from_le_bytes([text[at], text[at + 1], text[at + 2], text[at + 3]]);
    let word = |low: usize, high: usize| u64::from(half(low)) | (u64::from(half(high)) << 32);
    let mut bytes = [0; 16];
    for (out, (low, high)) in bytes
        .chunks_exact_mut(4)
        .zip([(0, 4), (9, 14), (19, 24), (28, 32)])
    {
        out.copy_from_slice(&hex8(word(low, high))?);
    }
    Some(Uuid::from_bytes(bytes))
}

/// The four bytes eight hex digits spell (the first character in the word's lowest byte), or
/// `None` if any byte is not a hex digit.
#[inline]
fn hex8(word: u64) -> Option<[u8; 4]> {
    // Per byte `b` below 0x80, `(b | 0x80) - n` keeps its high bit exactly when `b >= n`, and
    // never borrows from the next byte.
    let at_least = |x: u64, n: u8| ((x | HIGHS).wrapping_sub(ONES * u64::from(n))) & HIGHS;
    let digit = at_least(word, b'0') & !at_least(word, b'9' + 1);
    let folded = word | (ONES * 0x20);
    let letter = at_least(folded, b'a') & !at_least(folded, b'f' + 1);
    if word & HIGHS != 0 || (digit | letter) != HIGHS {
        return None;
    }
    // A digit's value is its low nibble; a letter's is its low nibble plus nine.
    let nibbles = (word & (ONES * 0x0F)) + (letter >> 7) * 9;
    // Pairs of nibbles into bytes (the first of a pair is the high nibble), then the four bytes
    // of the even 16-bit lanes together.
    let pairs = ((nibbles & 0x000F_000F_000F_000F) << 4) | ((nibbles >> 8) & 0x000F_000F_000F_000F);
    let quads = (pairs | (pairs >> 8)) & 0x0000_FFFF_0000_FFFF;
    Some(((quads | (quads >> 16)) as u32).to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Text near the hyphenated form, which the word path reads: a hyphenated UUID with up to
    /// three of its bytes replaced by hex digits of either case, hyphens, or bytes just outside
    /// the digit and letter ranges.
    fn near_uuid() -> impl Strategy<Value = String> {
        let byte = prop::sample::select(b"0123456789abcdefABCDEF-/:@G`gFf{} \x7f".to_vec());
        (
            any::<u128>(),
            prop::collection::vec((any::<prop::sample::Index>(), byte), 0..4),
        )
            .prop_map(|(n, changes)| {
                let mut bytes = Uuid::from_u128(n).hyphenated().to_string().into_bytes();
                for (at, byte) in changes {
                    let at = at.index(bytes.len());
                    bytes[at] = byte;
                }
                String::from_utf8(bytes).expect("ASCII")
            })
    }

    /// A valid UUID's text in one of the forms, with one byte maybe changed.
    fn mutated_uuid() -> impl Strategy<Value = String> {
        (
            any::<u128>(),
            0..4usize,
            any::<bool>(),
            any::<prop::sample::Index>(),
            any::<char>(),
        )
            .prop_map(|(n, form, upper, at, replacement)| {
                let id = Uuid::from_u128(n);
                let mut text = match form {
                    0 => id.hyphenated().to_string(),
                    1 => id.simple().to_string(),
                    2 => id.braced().to_string(),
                    _ => id.urn().to_string(),
                };
                if upper {
                    text = text.to_uppercase();
                }
                if replacement != '\0' {
                    let cut = at.index(text.len());
                    text.replace_range(cut..=cut, &replacement.to_string());
                }
                text
            })
    }

    proptest! {
        /// On text near the fast form, the parse agrees with the `uuid` crate's.
        #[test]
        fn agrees_with_the_uuid_crate(text in near_uuid()) {
            prop_assert_eq!(parse(&text), Uuid::try_parse(&text).ok(), "{}", text);
        }

        /// So it does on every form of real UUIDs, intact or with one character changed.
        #[test]
        fn agrees_on_real_uuids(text in mutated_uuid()) {
            prop_assert_eq!(parse(&text), Uuid::try_parse(&text).ok(), "{}", text);
        }

        /// And on any text at all (where both mostly refuse: a check that neither panics).
        #[test]
        fn agrees_on_anything(text in ".{0,40}") {
            prop_assert_eq!(parse(&text), Uuid::try_parse(&text).ok(), "{:?}", text);
        }

        /// Every hyphenated UUID reads back, in both cases, through the word path itself.
        #[test]
        fn reads_every_hyphenated_uuid(n in any::<u128>()) {
            let id = Uuid::from_u128(n);
            let lower = id.hyphenated().to_string();
            prop_assert_eq!(hyphenated(lower.as_bytes()), Some(id));
            prop_assert_eq!(hyphenated(lower.to_uppercase().as_bytes()), Some(id));
        }
    }

    #[test]
    fn every_byte_value_in_each_place() {
        let base = "0123abcd-ef45-6789-ABCD-EF0123456789";
        for at in 0..base.len() {
            for byte in 0..=u8::MAX {
                let mut bytes = base.as_bytes().to_vec();
                bytes[at] = byte;
                let expected = std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|text| Uuid::try_parse(text).ok());
                assert_eq!(hyphenated(&bytes), expected, "byte {byte:#04x} at {at}");
            }
        }
    }
}
