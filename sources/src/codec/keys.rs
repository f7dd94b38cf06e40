//! The object keys the codec knows, and how it finds them without reading them.
//!
//! Records of one kind repeat the same keys in the same order, so which key comes next is
//! usually known before it is read. [`KEYS`] holds every name the codec reads or knowingly skips
//! in one index space: the [`Fields`](super::fields::Fields) slots first, then the envelope's
//! own names, the version-2 payload names and the names Keel skips. A [`Trail`] remembers, per
//! kind of object ([`Shape`]), which key followed each key last time. The guessed key is checked
//! by comparing one or two words of the record with the name and its closing quote (and the
//! bytes between for names of 16 bytes or more); only when that
//! fails is the key scanned and looked up by hash, and the trail learns the new order. A wrong
//! guess costs one comparison, never a wrong key: the quote after the name must match too, so
//! a longer key that starts with the name is not taken for it.

use std::cell::Cell;

use keel_operators::words::{Words, word_at};

use super::PAYLOADS;
use super::fields::FIELD_NAMES;

/// Keys of the record envelope and of payloads that are not `Fields`.
const ENVELOPE: &[&str] = &[
    "data",
    "id",
    "type",
    "schema_version",
    "capabilities",
    "streams",
];

/// Keys the platform sends that Keel does not read; knowing them keeps the guesses going.
const SKIPPED: &[&str] = &[
    "source",
    "source_region",
    "source_cluster_id",
    "trigger_type",
    "request_id",
    "push_url",
    "hostname",
    "details",
    "stream_tenant_id",
    "candidates_count",
    "video_track_count",
    "audio_track_count",
    "primary_width",
    "primary_video_bitrate",
    "primary_video_codec",
    "issues_description",
];

/// How many names there are.
pub(super) const COUNT: usize = FIELD_NAMES.len() + ENVELOPE.len() + PAYLOADS.len() + SKIPPED.len();

/// Every name, by index.
pub(super) const NAMES: [&str; COUNT] = all_names();

/// The index of the first payload name; payload `p` of `PAYLOADS` is `FIRST_PAYLOAD + p`.
pub(super) const FIRST_PAYLOAD: usize = FIELD_NAMES.len() + ENVELOPE.len();

/// One past the last payload name.
pub(super) const END_PAYLOAD: usize = FIRST_PAYLOAD + PAYLOADS.len();

/// The payload names, in `PAYLOADS` order.
const PAYLOAD_KEYS: [&str; PAYLOADS.len()] = {
    let mut keys = [""; PAYLOADS.len()];
    let mut p = 0;
    while p < PAYLOADS.len() {
        keys[p] = PAYLOADS[p].0;
        p += 1;
    }
    keys
};

const fn all_names() -> [&'static str; COUNT] {
    let parts: [&[&str]; 4] = [FIELD_NAMES, ENVELOPE, &PAYLOAD_KEYS, SKIPPED];
    let mut names = [""; COUNT];
    let mut n = 0;
    let mut part = 0;
    while part < parts.len() {
        let mut i = 0;
        while i < parts[part].len() {
            names[n] = parts[part][i];
            n += 1;
            i += 1;
        }
        part += 1;
    }
    names
}

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The index of `name`; a name that is not in the table fails the build.
pub(super) const fn index_of(name: &str) -> usize {
    let mut i = 0;
    while i < COUNT {
        if same(NAMES[i], name) {
            return i;
        }
        i += 1;
    }
    panic!("not a known key")
}

/// The words of `name` followed by its closing quote.
const fn quoted(name: &[u8]) -> Words {
    let mut bytes = [0u8; 64];
    assert!(name.len() < bytes.len(), "key names are short");
    let mut i = 0;
    while i < name.len() {
        bytes[i] = name[i];
        i += 1;
    }
    bytes[name.len()] = b'"';
    Words::of_const(bytes.split_at(name.len() + 1).0)
}

/// A cheap hash of a name's words into 0..256.
const fn slot_of(words: &Words) -> usize {
    let h = (words.len as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ words.head.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ words.tail.wrapping_mul(0x1656_67B1_9E37_79F9);
    (h >> 56) as usize
}

/// The table of names: a hash table for keys that were read, and each name's words with its
/// closing quote for checking a guess in place.
#[derive(Debug)]
pub(super) struct Keys {
    /// [`slot_of`] slots to 1 + the index of a name (0 = empty), open addressing.
    table: [u8; 256],
    words: [Words; COUNT],
    quoted: [Words; COUNT],
}

/// The table, built at compile time.
pub(super) static KEYS: Keys = Keys::new();

impl Keys {
    const fn new() -> Self {
        const { assert!(COUNT < 200, "the table must stay sparse") };
        let blank = Words {
            len: 0,
            head: 0,
            tail: 0,
        };
        let mut keys = Keys {
            table: [0; 256],
            words: [blank; COUNT],
            quoted: [blank; COUNT],
        };
        let mut i = 0;
        while i < COUNT {
            let mut j = i + 1;
            while j < COUNT {
                assert!(!same(NAMES[i], NAMES[j]), "a key name is listed twice");
                j += 1;
            }
            let name = NAMES[i].as_bytes();
            keys.words[i] = Words::of_const(name);
            keys.quoted[i] = quoted(name);
            let mut slot = slot_of(&keys.words[i]);
            while keys.table[slot] != 0 {
                slot = (slot + 1) % 256;
            }
            keys.table[slot] = (i + 1) as u8;
            i += 1;
        }
        keys
    }

    /// The index of the name `key`, if it is one.
    pub(super) fn find(&self, key: &str) -> Option<usize> {
        let key = key.as_bytes();
        let words = Words::of(key);
        let mut slot = slot_of(&words);
        loop {
            let entry = self.table[slot];
            if entry == 0 {
                return None;
            }
            let index = usize::from(entry) - 1;
            if self.words[index] == words
                && (words.is_whole()
                    || key[8..words.len - 8] == NAMES[index].as_bytes()[8..words.len - 8])
            {
                return Some(index);
            }
            slot = (slot + 1) % self.table.len();
        }
    }

    /// Whether `bytes` holds name `index` and its closing quote at `at`.
    #[inline(always)]
    pub(super) fn is_at(&self, index: usize, bytes: &[u8], at: usize) -> bool {
        let quoted = &self.quoted[index];
        let len = quoted.len;
        let name = NAMES[index].as_bytes();
        let Some(window) = bytes.get(at..at + len.max(8)) else {
            return bytes.get(at..at + name.len()) == Some(name)
                && bytes.get(at + name.len()) == Some(&b'"');
        };
        let head = word_at(window, 0);
        if len <= 8 {
            let mask = u64::MAX >> (8 * (8 - len));
            return head & mask == quoted.head;
        }
        head == quoted.head
            && word_at(window, len - 8) == quoted.tail
            && (quoted.is_whole() || window[8..len - 8] == name[8..len - 8])
    }
}

/// The kinds of object whose key orders a [`Trail`] keeps apart.
#[derive(Clone, Copy, Debug)]
pub(super) enum Shape {
    /// The record itself.
    Record,
    /// `data`: version 2's trigger envelope, version 1's map.
    Data,
    /// A version-2 payload, by its index in `PAYLOADS`.
    Payload(usize),
    /// An entry of a node's stream map.
    NodeStream,
}

/// Where, in a trail row, the guess for an object's first key is kept.
const START: usize = COUNT;
/// Where the guess after a key the table does not know is kept.
const AFTER_OTHER: usize = COUNT + 1;
const ROW: usize = COUNT + 2;
const SHAPES: usize = PAYLOADS.len() + 3;

/// Per shape and per key, 1 + the index of the key that followed it last time (0 = no guess).
/// Cells, so the nested objects of one record can each use their own row while the record's
/// row is in use.
#[derive(Debug)]
pub(super) struct Trail {
    next: [[Cell<u8>; ROW]; SHAPES],
}

impl Trail {
    /// A trail that knows no order yet.
    pub(super) const fn new() -> Self {
        Trail {
            next: [const { [const { Cell::new(0) }; ROW] }; SHAPES],
        }
    }

    /// The row of one shape.
    pub(super) fn row(&self, shape: Shape) -> Row<'_> {
        let index = match shape {
            Shape::Record => 0,
            Shape::Data => 1,
            Shape::Payload(p) => 2 + p,
            Shape::NodeStream => 2 + PAYLOADS.len(),
        };
        Row {
            next: &self.next[index],
            last: START,
        }
    }
}

/// One object's walk along its shape's row: [`Row::guess`] before each key, [`Row::learn`]
/// after it.
#[derive(Debug)]
pub(super) struct Row<'t> {
    next: &'t [Cell<u8>; ROW],
    last: usize,
}

impl Row<'_> {
    /// The key that followed the previous one last time, if any.
    #[inline]
    pub(super) fn guess(&self) -> Option<usize> {
        match self.next[self.last].get() {
            0 => None,
            n => Some(usize::from(n) - 1),
        }
    }

    /// Records that `key` (`None`: a key the table does not know) came next; `guessed` says
    /// whether the guess was right, which leaves the row as it was.
    #[inline]
    pub(super) fn learn(&mut self, key: Option<usize>, guessed: bool) {
        if !guessed {
            self.next[self.last].set(key.map_or(0, |k| (k + 1) as u8));
        }
        self.last = key.unwrap_or(AFTER_OTHER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        for (i, name) in NAMES.iter().enumerate() {
            assert_eq!(KEYS.find(name), Some(i), "{name}");
            assert_eq!(index_of(name), i);
        }
        assert_eq!(KEYS.find("requestid"), None);
        assert_eq!(KEYS.find(""), None);
    }

    #[test]
    fn run_time_words_match_compile_time() {
        for name in NAMES
            .iter()
            .chain(&["", "a", "abcdefg", "abcdefgh", "abcdefghi"])
        {
            assert_eq!(
                Words::of(name.as_bytes()),
                Words::of_const(name.as_bytes()),
                "{name}"
            );
            let mut with_quote = name.as_bytes().to_vec();
            with_quote.push(b'"');
            assert_eq!(quoted(name.as_bytes()), Words::of(&with_quote), "{name}");
        }
    }

    /// Keys near the guessed name, and records that end in a key, give the keys and the errors
    /// (with their offsets) a trail that guesses nothing gives.
    #[test]
    fn near_misses_read_as_without_guesses() {
        use super::super::json::{Json, JsonError, Key};
        let walk = |trail: &Trail, text: &str| {
            let mut keys = Vec::new();
            let done = Json::new(text).known_object(trail.row(Shape::Data), |json, key| {
                keys.push(match key {
                    Key::Known(index) => Ok(NAMES[index].to_owned()),
                    Key::Other(other) => Err(other.get().into_owned()),
                });
                json.skip()
            });
            (keys, done.map_err(|e: JsonError| e.to_string()))
        };
        let taught = Trail::new();
        assert_eq!(walk(&taught, r#"{"id":1,"host":2}"#).1, Ok(()));
        for text in [
            r#"{"id":1,"hostname":2}"#,
            r#"{"id":1,"host\u006eame":2}"#,
            r#"{"id":1,"hos":2}"#,
            r#"{"id":1,"hos"#,
            r#"{"id":1,"host"#,
            r#"{"id":1,"host""#,
            r#"{"id":1,"host":2}"#,
        ] {
            assert_eq!(walk(&taught, text), walk(&Trail::new(), text), "{text}");
        }
    }

    proptest::proptest! {
        /// A key is found exactly when it is one of the names, including keys that share a
        /// name's length, first and last eight bytes and differ only between them.
        #[test]
        fn keys_are_found_exactly_when_they_are_names(
            pick in 0..COUNT,
            at in 0usize..32,
            byte in 95u8..=122,
            other in "[a-z_]{0,24}",
        ) {
            let mut changed = NAMES[pick].as_bytes().to_vec();
            let at = at % changed.len();
            changed[at] = byte;
            let changed = String::from_utf8(changed).expect("ASCII");
            for key in [changed, other] {
                let expected = NAMES.iter().position(|name| *name == key);
                proptest::prop_assert_eq!(KEYS.find(&key), expected, "{}", key);
            }
        }

        /// Walking objects with guesses yields the keys a plain walk and a look-up give, while
        /// one trail is shared by objects that vary one key order: each key is the name itself,
        /// the name with an escape, a longer key that starts with the name, or the name cut
        /// short; some keys are not names at all.
        #[test]
        fn guessed_keys_are_the_keys_read(
            order in proptest::collection::vec(0..COUNT + 4, 0..12),
            forms in proptest::collection::vec(proptest::collection::vec(0u8..6, 12), 1..12),
        ) {
            use super::super::json::{Json, Key};
            let trail = Trail::new();
            for form in &forms {
                let keys: Vec<String> = order
                    .iter()
                    .zip(form)
                    .map(|(&pick, &form)| {
                        let name = NAMES.get(pick).copied().unwrap_or("not_a_key");
                        match form {
                            0..=2 => name.to_owned(),
                            3 => name.replacen('_', "\\u005f", 1),
                            4 => format!("{name}s"),
                            _ => name[..name.len() - 1].to_owned(),
                        }
                    })
                    .collect();
                let text = format!(
                    "{{{}}}",
                    keys.iter().map(|k| format!("\"{k}\": 1")).collect::<Vec<_>>().join(", ")
                );
                let mut plain = Vec::new();
                Json::new(&text)
                    .object(|json, key| {
                        plain.push(KEYS.find(&key.get()));
                        json.skip()
                    })
                    .expect("valid JSON");
                let mut guessed = Vec::new();
                Json::new(&text)
                    .known_object(trail.row(Shape::Record), |json, key| {
                        guessed.push(match key {
                            Key::Known(index) => Some(index),
                            Key::Other(_) => None,
                        });
                        json.skip()
                    })
                    .expect("valid JSON");
                proptest::prop_assert_eq!(&guessed, &plain, "{}", text);
            }
        }

        /// A name is seen at a place exactly when the text there is the name and a quote,
        /// wherever the text ends.
        #[test]
        fn a_guess_is_right_exactly_when_the_name_is_there(
            pick in 0..COUNT,
            other in 0..COUNT,
            same in proptest::prelude::any::<bool>(),
            cut in 0usize..40,
            after in "[a-z\"_]{0,12}",
            before in "[a-z_]{0,3}",
        ) {
            let written = if same { pick } else { other };
            let text = format!("{before}{}{after}", NAMES[written]);
            let text = &text[..text.len() - cut.min(text.len() - before.len())];
            let there = text[before.len()..].starts_with(&format!("{}\"", NAMES[pick]));
            proptest::prop_assert_eq!(KEYS.is_at(pick, text.as_bytes(), before.len()), there, "{}", text);
        }
    }
}
