//! A small pull parser for JSON text, made for reading a few fields out of each event fast.
//!
//! The codec walks each record once: objects are visited key by key, the fields it wants are read
//! as [`Value`]s, and everything else is skipped — but still checked, so a truncated or garbled
//! record is an error, not a partial event. Errors carry the byte offset, which ends up in the
//! `ingest_errors` row.
//!
//! Objects whose keys the codec knows are walked with `Json::known_object`, which checks the
//! key it expects in place and reads a key only when the guess is wrong (see `keys.rs`).
//!
//! The input is `&str`, validated as UTF-8 once, so strings are slices of it: a [`Text`] is the
//! raw slice between the quotes plus whether it holds escapes, which are checked while scanning
//! and decoded only if the text is actually used. Values are `Copy`; nothing is allocated for
//! fields that are read and then not needed.

use std::borrow::Cow;
use std::fmt;

use super::keys::{KEYS, NAMES, Row};

/// How deep objects and arrays may nest before a record is refused.
const MAX_DEPTH: u32 = 64;

/// A one in every byte of a word, and every byte's high bit: for scanning eight bytes at a time.
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// A JSON syntax error at a byte offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonError {
    /// Byte offset in the record where parsing stopped.
    pub offset: usize,
    /// What was expected there.
    pub message: &'static str,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid JSON at byte {}: {}", self.offset, self.message)
    }
}

/// A string as it appears between its quotes; escapes (already checked) are decoded by
/// [`Text::get`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Text<'a> {
    raw: &'a str,
    escaped: bool,
}

impl<'a> Text<'a> {
    /// The string, unescaped.
    #[inline]
    pub fn get(&self) -> Cow<'a, str> {
        if self.escaped {
            Cow::Owned(unescape(self.raw))
        } else {
            Cow::Borrowed(self.raw)
        }
    }

    /// True when the string is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Its length in bytes as written: escapes count as written, so never less than unescaped.
    #[inline]
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// The string when it holds no escapes (then it is its own text), else `None`.
    #[inline]
    pub fn plain(&self) -> Option<&'a str> {
        (!self.escaped).then_some(self.raw)
    }
}

/// Decodes the escapes of a string whose escapes were already checked.
fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('u') => {
                let mut code = hex4_of(&mut chars);
                if (0xD800..0xDC00).contains(&code) {
                    chars.next();
                    chars.next();
                    let low = hex4_of(&mut chars);
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                }
                out.push(char::from_u32(code).unwrap_or('\u{FFFD}'));
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

fn hex4_of(chars: &mut std::str::Chars<'_>) -> u32 {
    let digits: String = chars.take(4).collect();
    u32::from_str_radix(&digits, 16).unwrap_or(0xFFFD)
}

/// The position of the first `"` or `\\` at or after `from`, eight bytes at a time. The word
/// loads run on past the string while the record lasts (the match is the first one either way),
/// so short strings need no byte-by-byte tail.
#[inline]
fn next_quote_or_backslash(bytes: &[u8], from: usize) -> Option<usize> {
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut at = from;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        // Borrows only run upwards, so the lowest flagged byte is a true match.
        let hits = zero_byte(word ^ (ONES * u64::from(b'"')))
            | zero_byte(word ^ (ONES * u64::from(b'\\')));
        if hits != 0 {
            return Some(at + hits.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    bytes
        .get(at..)?
        .iter()
        .position(|&b| b == b'"' || b == b'\\')
        .map(|i| at + i)
}

/// The position of the first byte at or after `from` that is not an ASCII digit (or the end),
/// eight bytes at a time: coordinates and byte counts run to 10–17 digits.
#[inline]
fn digits_end(bytes: &[u8], from: usize) -> usize {
    let mut at = from;
    while let Some(chunk) = bytes.get(at..at + 8) {
        // Digits become 0..=9; a byte is flagged when it is 10 or more, computed with its high
        // bit set so no borrow crosses bytes, or when its own high bit is set.
        let x = u64::from_le_bytes(chunk.try_into().expect("eight bytes")) ^ (ONES * 0x30);
        let other = ((x | HIGHS).wrapping_sub(ONES * 10) | x) & HIGHS;
        if other != 0 {
            return at + other.trailing_zeros() as usize / 8;
        }
        at += 8;
    }
    at + bytes[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count()
}

/// A scalar value as it appears in the text: numbers keep their text so the reader decides
/// between integer and float (and so 64-bit integers never pass through `f64`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    /// A string.
    Str(Text<'a>),
    /// A number, as written.
    Num(&'a str),
    /// `true` or `false`.
    Bool(bool),
    /// `null`.
    Null,
}

/// A key of an object walked with [`Json::known_object`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Key<'a> {
    /// The name with this index in [`NAMES`].
    Known(usize),
    /// A key the table does not know.
    Other(Text<'a>),
}

/// The kind of a non-scalar value met where a scalar was expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compound {
    /// An object.
    Object,
    /// An array.
    Array,
}

/// A cursor over one JSON text.
#[derive(Debug)]
pub struct Json<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    depth: u32,
}

impl<'a> Json<'a> {
    /// A cursor at the start of `text`.
    pub fn new(text: &'a str) -> Self {
        Json {
            text,
            bytes: text.as_bytes(),
            pos: 0,
            depth: 0,
        }
    }

    fn error(&self, message: &'static str) -> JsonError {
        JsonError {
            offset: self.pos,
            message,
        }
    }

    #[inline]
    fn skip_ws(&mut self) {
        while let Some(&b) = self.bytes.get(self.pos) {
            if matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    /// The next non-space byte, without consuming it.
    #[inline]
    pub fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.bytes.get(self.pos).copied()
    }

    #[inline]
    fn expect(&mut self, byte: u8, message: &'static str) -> Result<(), JsonError> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(message))
        }
    }

    /// Checks that only whitespace follows.
    pub fn finish(&mut self) -> Result<(), JsonError> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.error("unexpected text after the value")),
        }
    }

    /// Visits the members of an object. `member` gets each key and must consume its value.
    /// Errors of `member` pass through unchanged.
    pub fn object<E, F>(&mut self, member: F) -> Result<(), E>
    where
        E: From<JsonError>,
        F: FnMut(&mut Self, Text<'a>) -> Result<(), E>,
    {
        self.members(Self::string_body, member)
    }

    /// [`Json::object`] for objects whose keys [`KEYS`] knows: each key is first checked in
    /// place against the one `row` guesses, and read and looked up only when the guess is wrong.
    pub(super) fn known_object<E, F>(&mut self, mut row: Row<'_>, member: F) -> Result<(), E>
    where
        E: From<JsonError>,
        F: FnMut(&mut Self, Key<'a>) -> Result<(), E>,
    {
        let key = |json: &mut Self| {
            if let Some(guess) = row.guess()
                && KEYS.is_at(guess, json.bytes, json.pos)
            {
                json.pos += NAMES[guess].len() + 1;
                row.learn(Some(guess), true);
                return Ok(Key::Known(guess));
            }
            let text = json.string_body()?;
            let found = KEYS.find(&text.get());
            row.learn(found, false);
            Ok(found.map_or(Key::Other(text), Key::Known))
        };
        self.members(key, member)
    }

    /// The object walk: `key` reads each key (the cursor is past its opening quote).
    fn members<K, E, R, F>(&mut self, mut key: R, mut member: F) -> Result<(), E>
    where
        E: From<JsonError>,
        R: FnMut(&mut Self) -> Result<K, JsonError>,
        F: FnMut(&mut Self, K) -> Result<(), E>,
    {
        self.expect(b'{', "expected an object")?;
        self.enter()?;
        if self.peek() == Some(b'}') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a string key").into());
            }
            self.pos += 1;
            let key = key(self)?;
            self.expect(b':', "expected ':' after a key")?;
            member(self, key)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return Err(self.error("expected ',' or '}' in an object").into()),
            }
        }
    }

    /// Visits the elements of an array. `element` must consume each value.
    /// Errors of `element` pass through unchanged.
    pub fn array<E, F>(&mut self, mut element: F) -> Result<(), E>
    where
        E: From<JsonError>,
        F: FnMut(&mut Self) -> Result<(), E>,
    {
        self.expect(b'[', "expected an array")?;
        self.enter()?;
        if self.peek() == Some(b']') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            element(self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return Err(self.error("expected ',' or ']' in an array").into()),
            }
        }
    }

    fn enter(&mut self) -> Result<(), JsonError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        Ok(())
    }

    /// Reads a scalar; an object or array is reported (and skipped) as `Ok(Err(kind))`.
    #[inline]
    pub fn scalar(&mut self) -> Result<Result<Value<'a>, Compound>, JsonError> {
        let mut value = None;
        Ok(match self.scalar_into(&mut value)? {
            Some(kind) => Err(kind),
            None => Ok(value.expect("a scalar was read")),
        })
    }

    /// [`Json::scalar`] stored straight into `out`, which is left alone when an object or array
    /// is met (and skipped) instead: the kind is returned then.
    ///
    /// The value is built where it stays. Built in a temporary and copied, as `scalar`'s result
    /// is, its tag and padding are written a byte at a time and read back a word at a time,
    /// which the processor cannot forward from its store buffer: the copy waits for the stores
    /// to retire, at every field the codec reads.
    #[inline]
    pub fn scalar_into(
        &mut self,
        out: &mut Option<Value<'a>>,
    ) -> Result<Option<Compound>, JsonError> {
        match self.peek() {
            Some(b'"') => {
                self.pos += 1;
                *out = Some(Value::Str(self.string_body()?));
            }
            Some(b'{') => {
                self.skip()?;
                return Ok(Some(Compound::Object));
            }
            Some(b'[') => {
                self.skip()?;
                return Ok(Some(Compound::Array));
            }
            Some(b't') => *out = Some(self.literal(b"true", Value::Bool(true))?),
            Some(b'f') => *out = Some(self.literal(b"false", Value::Bool(false))?),
            Some(b'n') => *out = Some(self.literal(b"null", Value::Null)?),
            Some(b'-' | b'0'..=b'9') => *out = Some(Value::Num(self.number()?)),
            Some(_) => return Err(self.error("expected a value")),
            None => return Err(self.error("unexpected end of input")),
        }
        Ok(None)
    }

    fn literal(&mut self, word: &'static [u8], value: Value<'a>) -> Result<Value<'a>, JsonError> {
        if self.bytes[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(value)
        } else {
            Err(self.error("expected true, false or null"))
        }
    }

    #[inline]
    fn number(&mut self) -> Result<&'a str, JsonError> {
        let start = self.pos;
        let b = self.bytes;
        let mut i = self.pos;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        let int_start = i;
        i = digits_end(b, i);
        if i == int_start || (b[int_start] == b'0' && i - int_start > 1) {
            self.pos = i;
            return Err(self.error("malformed number"));
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            let frac = i;
            i = digits_end(b, i);
            if i == frac {
                self.pos = i;
                return Err(self.error("malformed number"));
            }
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            let exp = i;
            i = digits_end(b, i);
            if i == exp {
                self.pos = i;
                return Err(self.error("malformed number"));
            }
        }
        self.pos = i;
        // Both ends are ASCII, so they are character boundaries.
        Ok(&self.text[start..i])
    }

    /// Reads a string (the cursor must be at its opening quote), checking its escapes.
    pub fn string(&mut self) -> Result<Text<'a>, JsonError> {
        self.expect(b'"', "expected a string")?;
        self.string_body()
    }

    /// Reads the rest of a string whose opening quote was just consumed.
    ///
    /// Always inlined: its result is too large to come back in registers, and read back from
    /// memory straight after the callee wrote it, the 16-byte load of the text spans two 8-byte
    /// stores, which the processor cannot forward, so every string read would wait for them.
    #[inline(always)]
    fn string_body(&mut self) -> Result<Text<'a>, JsonError> {
        let start = self.pos;
        let mut escaped = false;
        loop {
            let Some(at) = next_quote_or_backslash(self.bytes, self.pos) else {
                self.pos = self.bytes.len();
                return Err(self.error("unterminated string"));
            };
            self.pos = at;
            if self.bytes[at] == b'"' {
                let raw = &self.text[start..at];
                self.pos = at + 1;
                return Ok(Text { raw, escaped });
            }
            escaped = true;
            self.pos += 1;
            self.escape()?;
        }
    }

    /// Checks one escape (the cursor is just past its backslash).
    fn escape(&mut self) -> Result<(), JsonError> {
        let Some(&b) = self.bytes.get(self.pos) else {
            return Err(self.error("unterminated escape"));
        };
        self.pos += 1;
        match b {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Ok(()),
            b'u' => {
                let code = self.hex4()?;
                if (0xD800..0xDC00).contains(&code) {
                    if !self.bytes[self.pos..].starts_with(b"\\u") {
                        return Err(self.error("unpaired surrogate in \\u escape"));
                    }
                    self.pos += 2;
                    let low = self.hex4()?;
                    if !(0xDC00..0xE000).contains(&low) {
                        return Err(self.error("unpaired surrogate in \\u escape"));
                    }
                } else if (0xDC00..0xE000).contains(&code) {
                    return Err(self.error("unpaired surrogate in \\u escape"));
                }
                Ok(())
            }
            _ => Err(self.error("invalid escape")),
        }
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let digits = self
            .bytes
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| self.error("short \\u escape"))?;
        let mut code = 0;
        for &d in digits {
            let v = (d as char)
                .to_digit(16)
                .ok_or_else(|| self.error("invalid \\u escape"))?;
            code = code * 16 + v;
        }
        self.pos += 4;
        Ok(code)
    }

    /// Skips one value of any kind, checking its syntax, and returns its text.
    pub fn raw(&mut self) -> Result<&'a str, JsonError> {
        self.skip_ws();
        let start = self.pos;
        self.skip()?;
        Ok(&self.text[start..self.pos])
    }

    /// Skips one value of any kind, checking its syntax.
    pub fn skip(&mut self) -> Result<(), JsonError> {
        match self.peek() {
            Some(b'{') => self.object::<JsonError, _>(|json, _| json.skip()),
            Some(b'[') => self.array::<JsonError, _>(Json::skip),
            Some(b'"') => self.skip_string(),
            _ => self.scalar().map(|_| ()),
        }
    }

    fn skip_string(&mut self) -> Result<(), JsonError> {
        self.pos += 1;
        self.string_body().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reads any JSON text into serde_json's model using only the cursor.
    fn read(json: &mut Json<'_>) -> Result<serde_json::Value, JsonError> {
        match json.peek() {
            Some(b'{') => {
                let mut map = serde_json::Map::new();
                json.object(|json, key| {
                    let value = read(json)?;
                    map.insert(key.get().into_owned(), value);
                    Ok::<(), JsonError>(())
                })?;
                Ok(serde_json::Value::Object(map))
            }
            Some(b'[') => {
                let mut items = Vec::new();
                json.array(|json| {
                    items.push(read(json)?);
                    Ok::<(), JsonError>(())
                })?;
                Ok(serde_json::Value::Array(items))
            }
            _ => Ok(match json.scalar()? {
                Ok(Value::Str(s)) => serde_json::Value::String(s.get().into_owned()),
                Ok(Value::Num(n)) => n
                    .parse::<i64>()
                    .map(serde_json::Value::from)
                    .or_else(|_| n.parse::<u64>().map(serde_json::Value::from))
                    .unwrap_or_else(|_| serde_json::Value::from(n.parse::<f64>().unwrap())),
                Ok(Value::Bool(b)) => serde_json::Value::Bool(b),
                Ok(Value::Null) => serde_json::Value::Null,
                Err(_) => unreachable!("compound values are handled above"),
            }),
        }
    }

    fn parse(text: &str) -> Result<serde_json::Value, JsonError> {
        let mut json = Json::new(text);
        let value = read(&mut json)?;
        json.finish()?;
        Ok(value)
    }

    fn skip_all(text: &str) -> Result<(), JsonError> {
        let mut json = Json::new(text);
        json.skip()?;
        json.finish()
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            (-1e12f64..1e12).prop_map(serde_json::Value::from),
            ".*".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                prop::collection::btree_map(".{0,8}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// The word-at-a-time digit scan stops where a byte-by-byte one does, on any bytes.
        #[test]
        fn digit_runs_end_where_bytes_say(
            bytes in prop::collection::vec(prop_oneof![b'0'..=b'9', any::<u8>()], 0..40),
            from in any::<prop::sample::Index>(),
        ) {
            let from = from.index(bytes.len() + 1);
            let expected = from + bytes[from..].iter().take_while(|b| b.is_ascii_digit()).count();
            prop_assert_eq!(digits_end(&bytes, from), expected);
        }

        /// Anything serde_json writes, the cursor reads back to the same value, and skips.
        #[test]
        fn reads_what_serde_json_writes(value in arb_json(), pretty in any::<bool>()) {
            let text = if pretty { serde_json::to_string_pretty(&value) } else { serde_json::to_string(&value) }.unwrap();
            prop_assert_eq!(parse(&text).unwrap(), value);
            prop_assert!(skip_all(&text).is_ok());
        }

        /// On arbitrary text the cursor never panics, and it accepts only what serde_json accepts.
        #[test]
        fn agrees_with_serde_json_on_garbage(text in "[\\[\\]{}\":,0-9a-z\\\\ .eE+-]{0,40}") {
            let ours = parse(&text).is_ok();
            let theirs = serde_json::from_str::<serde_json::Value>(&text).is_ok();
            prop_assert_eq!(ours, theirs, "{}", text);
            prop_assert_eq!(skip_all(&text).is_ok(), theirs, "{}", text);
        }

        /// Every prefix of a valid document is an error, never a panic.
        #[test]
        fn truncation_is_an_error(value in arb_json(), cut in any::<prop::sample::Index>()) {
            let text = serde_json::to_string(&serde_json::json!({ "v": value })).unwrap();
            let cut = cut.index(text.len());
            if let Ok(prefix) = std::str::from_utf8(&text.as_bytes()[..cut]) {
                prop_assert!(parse(prefix).is_err());
            }
        }
    }

    #[test]
    fn escapes_and_surrogates() {
        let value = parse(r#"{"a":"x\"y\\z\u00e9\ud83d\ude00\n"}"#).unwrap();
        assert_eq!(value["a"], "x\"y\\z\u{e9}\u{1F600}\n");
        assert!(parse(r#""\ud83d""#).is_err());
        assert!(parse(r#""\q""#).is_err());
    }

    #[test]
    fn depth_is_bounded() {
        let deep = "[".repeat(100) + &"]".repeat(100);
        let error = parse(&deep).unwrap_err();
        assert_eq!(error.message, "nested too deeply");
    }

    #[test]
    fn errors_say_where() {
        let error = parse(r#"{"a": 1,, "b": 2}"#).unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid JSON at byte 8: expected a string key"
        );
    }
}
