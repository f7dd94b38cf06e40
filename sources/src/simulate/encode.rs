//! Writing events as the platform's producers write them: version 2 (JSON envelope around a
//! protobuf-JSON trigger, 64-bit integers as strings, zero values omitted) or version 1 (flat
//! maps of strings).

use std::fmt::Write as _;

use keel_operators::time::format_rfc3339;

/// A JSON object being written into a byte buffer.
pub struct Obj<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Obj<'a> {
    /// Opens an object.
    pub fn open(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Obj { out, first: true }
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// A string field.
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        push_string(self.out, value);
        self
    }

    /// A string field, omitted when empty (protojson's rule for unset strings).
    pub fn str_opt(&mut self, key: &str, value: &str) -> &mut Self {
        if !value.is_empty() {
            self.str(key, value);
        }
        self
    }

    /// A 64-bit integer, written as a string (protojson), omitted when zero.
    pub fn int64(&mut self, key: &str, value: i64) -> &mut Self {
        if value != 0 {
            self.key(key);
            let _ = write!(Buf(self.out), "\"{value}\"");
        }
        self
    }

    /// A 32-bit integer or any number written bare, omitted when zero.
    pub fn num(
        &mut self,
        key: &str,
        value: impl Into<f64> + std::fmt::Display + Copy,
    ) -> &mut Self {
        if value.into() != 0.0 {
            self.key(key);
            let _ = write!(Buf(self.out), "{value}");
        }
        self
    }

    /// A boolean, omitted when false.
    pub fn flag(&mut self, key: &str, value: bool) -> &mut Self {
        if value {
            self.key(key);
            self.out.extend_from_slice(b"true");
        }
        self
    }

    /// A nested object.
    pub fn obj(&mut self, key: &str, fill: impl FnOnce(&mut Obj<'_>)) -> &mut Self {
        self.key(key);
        let mut inner = Obj::open(self.out);
        fill(&mut inner);
        inner.close();
        self
    }

    /// A field whose value `write` appends to the buffer itself.
    pub fn with(&mut self, key: &str, write: impl FnOnce(&mut Vec<u8>)) -> &mut Self {
        self.key(key);
        write(self.out);
        self
    }

    /// A field whose value text is written verbatim (already JSON).
    pub fn raw(&mut self, key: &str, json: &str) -> &mut Self {
        self.key(key);
        self.out.extend_from_slice(json.as_bytes());
        self
    }

    /// An RFC 3339 time.
    pub fn time(&mut self, key: &str, ms: i64) -> &mut Self {
        self.str(key, &format_rfc3339(ms))
    }

    /// Closes the object.
    pub fn close(self) {
        self.out.push(b'}');
    }
}

struct Buf<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Buf<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Writes `value` as a JSON string.
pub fn push_string(out: &mut Vec<u8>, value: &str) {
    out.push(b'"');
    for c in value.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(Buf(out), "\\u{:04x}", c as u32);
            }
            c => {
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// A version-1 `data` map: every value a string, as Helmsman's `fmt.Sprintf("%v")` made them.
pub struct V1Data<'a>(Obj<'a>);

impl<'a> V1Data<'a> {
    /// Opens the map.
    pub fn open(out: &'a mut Vec<u8>) -> Self {
        V1Data(Obj::open(out))
    }

    /// A value, stringified.
    pub fn put(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Self {
        let text = value.to_string();
        self.0.str(key, &text);
        self
    }

    /// Closes the map.
    pub fn close(self) {
        self.0.close();
    }
}
