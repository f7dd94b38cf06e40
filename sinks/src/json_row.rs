//! A changed row on its way to subscribers, as JSON text.
//!
//! The hub passes every changed row of a subscribed table to the subscribers whose filters it
//! passes, and the API writes it into their messages. Building a `serde_json::Value` tree for
//! each row, and writing it out again per message, was most of that work; a [`JsonRow`] is the
//! row's JSON text written once from the typed row, with the place of each column's value, so
//! that filters compare the column's text and the API copies the text as it is. The tree is
//! still there for whoever wants one ([`JsonRow::value`], parsed on first use).
//!
//! The text is the one `serde_json` writes for the row's `Value`: columns in name order, time
//! columns as RFC 3339 strings (see [`crate::live::row_json`]), no white space.

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

use keel_operators::time::format_rfc3339;
use serde::Serialize;
use serde_json::Value;

/// A row as JSON text with the place of each top-level column.
#[derive(Clone)]
pub struct JsonRow {
    text: Box<str>,
    /// Each column: the byte ranges of its name (inside the quotes) and of its value.
    columns: Box<[Column]>,
    value: OnceLock<Value>,
}

#[derive(Clone, Copy, Debug)]
struct Column {
    name: (u32, u32),
    value: (u32, u32),
}

impl JsonRow {
    /// The row `row` (a struct of scalar columns), with the integer columns named in
    /// `timestamps` (milliseconds since the epoch) written as RFC 3339 strings.
    pub fn of<R: Serialize>(row: &R, timestamps: &[&str]) -> JsonRow {
        let Ok(text) = serde_json::to_string(row) else {
            return JsonRow::from_value(&Value::Null);
        };
        match columns(&text) {
            // Nested objects keep their own key order in typed text: take the tree's.
            Some(found)
                if !found
                    .iter()
                    .any(|c| text.as_bytes()[c.value.0 as usize] == b'{') =>
            {
                JsonRow::canonical(&text, found, timestamps)
            }
            _ => {
                let value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let mut row = JsonRow::from_value(&value);
                if !timestamps.is_empty() {
                    let found = row.columns.to_vec();
                    row = JsonRow::canonical(&row.text, found, timestamps);
                }
                row
            }
        }
    }

    /// The row `value` (any JSON value; columns are found when it is an object).
    pub fn from_value(value: &Value) -> JsonRow {
        let text = value.to_string();
        let columns = columns(&text).unwrap_or_default();
        JsonRow {
            text: text.into_boxed_str(),
            columns: columns.into_boxed_slice(),
            value: OnceLock::new(),
        }
    }

    /// Rewrites `text` (an object with `found` columns) with columns in name order and time
    /// columns as RFC 3339 strings.
    fn canonical(text: &str, mut found: Vec<Column>, timestamps: &[&str]) -> JsonRow {
        let name = |c: &Column| &text[c.name.0 as usize..c.name.1 as usize];
        let sorted = found.is_sorted_by(|a, b| name(a) < name(b));
        let times = |c: &Column| {
            timestamps
                .contains(&name(c))
                .then(|| {
                    text[c.value.0 as usize..c.value.1 as usize]
                        .parse::<i64>()
                        .ok()
                })
                .flatten()
        };
        if sorted && !found.iter().any(|c| times(c).is_some()) {
            return JsonRow {
                text: text.into(),
                columns: found.into_boxed_slice(),
                value: OnceLock::new(),
            };
        }
        found.sort_by(|a, b| name(a).cmp(name(b)));
        let mut out = String::with_capacity(text.len() + 16 * timestamps.len());
        let mut placed = Vec::with_capacity(found.len());
        out.push('{');
        for (i, column) in found.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let start = out.len();
            out.push('"');
            out.push_str(name(column));
            out.push_str("\":");
            let value_start = out.len();
            match times(column) {
                Some(ms) => {
                    out.push('"');
                    out.push_str(&format_rfc3339(ms));
                    out.push('"');
                }
                None => out.push_str(&text[column.value.0 as usize..column.value.1 as usize]),
            }
            placed.push(Column {
                name: (at(start + 1), at(value_start - 2)),
                value: (at(value_start), at(out.len())),
            });
        }
        out.push('}');
        JsonRow {
            text: out.into_boxed_str(),
            columns: placed.into_boxed_slice(),
            value: OnceLock::new(),
        }
    }

    /// The JSON text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The JSON text of column `name`'s value.
    pub fn column(&self, name: &str) -> Option<&str> {
        self.columns
            .iter()
            .find(|c| &self.text[c.name.0 as usize..c.name.1 as usize] == name)
            .map(|c| &self.text[c.value.0 as usize..c.value.1 as usize])
    }

    /// Column `name` when it holds a string: the string.
    pub fn str_column(&self, name: &str) -> Option<Cow<'_, str>> {
        let raw = self.column(name)?;
        let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
        if inner.contains('\\') {
            serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
        } else {
            Some(Cow::Borrowed(inner))
        }
    }

    /// The row as a JSON value, taken.
    pub fn into_value(self) -> Value {
        match self.value.into_inner() {
            Some(value) => value,
            None => serde_json::from_str(&self.text).unwrap_or(Value::Null),
        }
    }

    /// The row as a JSON value (parsed once, on first use).
    pub fn value(&self) -> &Value {
        self.value
            .get_or_init(|| serde_json::from_str(&self.text).unwrap_or(Value::Null))
    }
}

fn at(offset: usize) -> u32 {
    u32::try_from(offset).expect("a row's text is under 4 GiB")
}

impl fmt::Debug for JsonRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq for JsonRow {
    fn eq(&self, other: &JsonRow) -> bool {
        self.text == other.text
    }
}

impl Serialize for JsonRow {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value().serialize(serializer)
    }
}

/// The columns of `text` when it is a JSON object as `serde_json` writes it (no white space):
/// the byte ranges of each name (inside its quotes) and of each value.
fn columns(text: &str) -> Option<Vec<Column>> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    if bytes.first() != Some(&b'{') {
        return None;
    }
    let mut i = 1;
    if bytes.get(i) == Some(&b'}') {
        return (i + 1 == bytes.len()).then_some(found);
    }
    loop {
        if bytes.get(i) != Some(&b'"') {
            return None;
        }
        let name_end = string_end(bytes, i)?;
        if bytes.get(name_end) != Some(&b':') {
            return None;
        }
        let value_start = name_end + 1;
        let value_end = value_end(bytes, value_start)?;
        found.push(Column {
            name: (at(i + 1), at(name_end - 1)),
            value: (at(value_start), at(value_end)),
        });
        match bytes.get(value_end) {
            Some(b',') => i = value_end + 1,
            Some(b'}') if value_end + 1 == bytes.len() => return Some(found),
            _ => return None,
        }
    }
}

/// The index just past the string that opens at `start` (a `"`).
fn string_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The index just past the value that starts at `start`.
fn value_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = start;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i = string_end(bytes, i)?;
                if depth == 0 {
                    return Some(i);
                }
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            b',' | b'}' if depth == 0 => return (i > start).then_some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[derive(Serialize)]
    struct Typed {
        zeta: String,
        alpha: Option<i64>,
        at_ms: i64,
        ends_ms: Option<i64>,
        ratio: f64,
        big: u64,
        flag: bool,
        list: Vec<i32>,
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "\\PC{0,10}".prop_map(Value::from),
            Just(Value::from("\" \\ \n \u{1} , } ] { [ :")),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("\\PC{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Oracle: the text is `Value`'s text, every column is found with its value's text, and
        /// the value parses back.
        #[test]
        fn a_row_reads_as_its_value(fields in prop::collection::btree_map("[a-z_\"\\\\é]{0,6}", value(), 0..8)) {
            let value = Value::Object(fields.into_iter().collect());
            let row = JsonRow::from_value(&value);
            prop_assert_eq!(row.text(), value.to_string());
            prop_assert_eq!(row.value(), &value);
            for (name, field) in value.as_object().unwrap() {
                if !name.contains(['"', '\\']) {
                    let text = field.to_string();
                    prop_assert_eq!(row.column(name), Some(text.as_str()));
                    let string = row.str_column(name);
                    prop_assert_eq!(string.as_deref(), field.as_str());
                }
            }
            prop_assert_eq!(row.column("absent column"), None);
        }

        /// Oracle: a typed row's text is what the old path wrote — its `Value` with time columns
        /// replaced by RFC 3339 strings — whatever order its fields are declared in.
        #[test]
        fn a_typed_row_reads_as_its_value_with_times(
            zeta in "\\PC{0,8}",
            alpha in any::<Option<i64>>(),
            at_ms in 0i64..4_000_000_000_000,
            ends_ms in any::<Option<i64>>(),
            ratio in any::<f64>(),
            big in any::<u64>(),
            flag in any::<bool>(),
            list in prop::collection::vec(any::<i32>(), 0..3),
        ) {
            let typed = Typed { zeta, alpha, at_ms, ends_ms, ratio, big, flag, list };
            let times = ["at_ms", "ends_ms"];
            let row = JsonRow::of(&typed, &times);
            let mut value = serde_json::to_value(&typed).unwrap();
            for name in times {
                if let Some(ms) = value[name].as_i64() {
                    value[name] = Value::String(format_rfc3339(ms));
                }
            }
            prop_assert_eq!(row.text(), value.to_string());
            prop_assert_eq!(row.value(), &value);
            for (name, field) in value.as_object().unwrap() {
                let text = field.to_string();
                prop_assert_eq!(row.column(name), Some(text.as_str()));
            }
        }
    }

    #[test]
    fn texts_that_are_not_flat_objects_have_no_columns() {
        for value in [json!(null), json!([1, 2]), json!("x"), json!({})] {
            let row = JsonRow::from_value(&value);
            assert_eq!(row.text(), value.to_string());
            assert_eq!(row.column("a"), None);
        }
        for text in [
            "{",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":1}x",
            "{\"a\":\"x}",
        ] {
            assert!(columns(text).is_none(), "{text}");
        }
        let nested = json!({"b": {"y": 1, "x": [2, {"k": "}"}]}, "a": "\"q\""});
        let row = JsonRow::of(&nested, &[]);
        assert_eq!(row.text(), nested.to_string());
        assert_eq!(row.column("b"), Some(nested["b"].to_string().as_str()));
        assert_eq!(row.str_column("a").as_deref(), Some("\"q\""));
    }
}
