//! The named fields the codec reads, and the lenient conversions that turn them into numbers,
//! flags and names.
//!
//! Both wire versions are read into one [`Fields`] struct: version 1's flat string map and
//! version 2's trigger envelope and payload use overlapping names, so one set of names covers
//! both. Conversions accept what the platform writes — 64-bit integers as strings (protojson),
//! every value as a string (version 1, including Go's `1.5e+06` float formatting and the literal
//! `<nil>`) — and say exactly which field was wrong when they refuse.

use std::borrow::Cow;

use arrayvec::ArrayVec;
use keel_operators::sym::Sym;

use super::Reason;
use super::json::{Compound, Json, Value};

/// Declares a set of optional scalar fields, an accessor per field, and a setter that reads a
/// field's value from the cursor. The field names come first in [`KEYS`](super::keys::KEYS)'s
/// index space, so a key's index is its field's slot in the array.
macro_rules! fields {
    ($(#[$meta:meta])* $name:ident { $($field:ident),* $(,)? }) => {
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy)]
        enum Slot { $($field),* }

        /// The wire names of the fields, by slot.
        pub(super) const FIELD_NAMES: &[&str] = &[$(stringify!($field)),*];

        $(#[$meta])*
        ///
        /// A record names a few dozen of the fields at most, so values are kept in the order
        /// they were read, with a byte per field saying where: a new record clears that small
        /// index, not a slot per field.
        #[derive(Clone, Debug)]
        pub struct $name<'a> {
            /// For each slot, 1 + the position of its value in `values`; 0 when it has none.
            at: [u8; FIELD_NAMES.len()],
            values: ArrayVec<Option<Value<'a>>, { FIELD_NAMES.len() }>,
        }

        // A slot's position, plus one, fits in its byte.
        const _: () = assert!(FIELD_NAMES.len() < u8::MAX as usize);

        impl Default for $name<'_> {
            fn default() -> Self {
                $name { at: [0; FIELD_NAMES.len()], values: ArrayVec::new() }
            }
        }

        impl<'a> $name<'a> {
            $(
                #[doc = concat!("`", stringify!($field), "`")]
                pub fn $field(&self) -> &Option<Value<'a>> {
                    self.get(Slot::$field as usize)
                }
            )*

            /// The first field read whose text (a string unescaped, or a number as written) is
            /// longer than `most` bytes: its name and length.
            pub(super) fn longer_than(&self, most: usize) -> Option<(&'static str, usize)> {
                let (position, length) = self.values.iter().enumerate().find_map(|(i, value)| {
                    let length = match value {
                        // Escapes are never shorter than what they stand for, so only a string
                        // long as written is unescaped to be measured.
                        Some(Value::Str(text)) if text.len() > most => text.get().len(),
                        Some(Value::Num(number)) => number.len(),
                        _ => 0,
                    };
                    (length > most).then_some((i, length))
                })?;
                let slot = self.at.iter().position(|&at| usize::from(at) == position + 1)?;
                Some((FIELD_NAMES[slot], length))
            }

            #[inline]
            fn get(&self, slot: usize) -> &Option<Value<'a>> {
                match self.at[slot] {
                    0 => &None,
                    at => &self.values[usize::from(at) - 1],
                }
            }

            /// Sets field `slot` (below `FIELD_NAMES.len()`) from the cursor's next value; a
            /// field given twice keeps the later value.
            pub(super) fn set(&mut self, slot: usize, json: &mut Json<'a>) -> Result<(), Reason> {
                let out = match self.at[slot] {
                    0 => {
                        // Each slot is pushed at most once, so `values` never fills up.
                        self.values.push(None);
                        self.at[slot] = self.values.len() as u8;
                        self.values.last_mut().expect("just pushed")
                    }
                    at => &mut self.values[usize::from(at) - 1],
                };
                scalar(json, slot, out)
            }
        }
    };
}

fields! {
    /// Every scalar field Keel reads, by its wire name, in either version.
    Fields {
        // Envelope of a version-2 trigger, shared names in version 1.
        node_id, timestamp, tenant_id, stream_id, trigger_unix_millis, event_id,
        event_type, action, internal_name, stream_name,
        // Viewers.
        host, connection_addr, connector, session_id, client_country, client_city,
        client_latitude, client_longitude, country_code, city, latitude, longitude, duration,
        seconds_connected, up_bytes, down_bytes,
        // Ingest.
        protocol, publisher_latitude, publisher_longitude,
        // Stream poller, buffer, end, track list.
        status, buffer_state, uploaded_bytes, downloaded_bytes, total_viewers, total_inputs,
        viewers, inputs, bandwidth_in, bandwidth_out, has_issues, quality_tier, primary_height,
        primary_fps, primary_bitrate, packets_sent, packets_lost,
        started_at, track_count, total_tracks,
        // Nodes.
        cpu_tenths, cpu_usage, ram_max, ram_current, up_speed, down_speed, bw_limit, location,
        active_streams, stream_count, base_url, is_healthy, operational_mode,
        connections_current,
        // A node's stream map entries.
        total, bandwidth, bytes_up, bytes_down, replicated,
        // Routing.
        selected_node, selected_node_id, score, node_latitude, node_longitude,
        routing_distance_km,
    }
}

/// Reads the scalar value at the cursor of the key with index `key` in
/// [`NAMES`](super::keys::NAMES) (where a field's slot is its index) into `out`; an object or
/// array there is refused (and skipped) with the key named.
#[inline]
pub(super) fn scalar<'a>(
    json: &mut Json<'a>,
    key: usize,
    out: &mut Option<Value<'a>>,
) -> Result<(), Reason> {
    let Some(kind) = json.scalar_into(out)? else {
        return Ok(());
    };
    let name = super::keys::NAMES[key];
    let found = match kind {
        Compound::Object => "an object",
        Compound::Array => "an array",
    };
    Err(Reason(format!(
        "field \"{name}\": expected a string, number or boolean, found {found}"
    )))
}

/// A field's text, or `None` when it is absent, null, empty or version 1's `<nil>`.
#[inline]
pub fn text<'a>(value: &Option<Value<'a>>) -> Option<Cow<'a, str>> {
    match value.as_ref()? {
        Value::Str(s) => Some(s.get()).filter(|t| !t.is_empty() && t != "<nil>"),
        Value::Num(n) => Some(Cow::Borrowed(*n)),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        Value::Null => None,
    }
}

/// The first of several fields that has text.
pub fn first_text<'a>(values: &[&Option<Value<'a>>]) -> Option<Cow<'a, str>> {
    values.iter().find_map(|v| text(v))
}

/// A field as an interned name (empty when absent).
pub fn sym(value: &Option<Value<'_>>) -> Sym {
    text(value).map(|t| Sym::new(&t)).unwrap_or_default()
}

/// The first of several fields that has text, interned.
pub fn first_sym(values: &[&Option<Value<'_>>]) -> Sym {
    first_text(values).map(|t| Sym::new(&t)).unwrap_or_default()
}

fn describe(value: &Value<'_>) -> String {
    match value {
        Value::Str(s) => format!("{:?}", s.get().chars().take(40).collect::<String>()),
        Value::Num(n) => (*n).to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".to_owned(),
    }
}

/// Parses integer text; also accepts integral float text such as Go's `1.5e+06`.
fn parse_integer(text: &str) -> Option<i128> {
    if let Ok(n) = text.parse::<i64>() {
        return Some(i128::from(n));
    }
    if let Ok(n) = text.parse::<u64>() {
        return Some(i128::from(n));
    }
    let f = text.parse::<f64>().ok()?;
    (f.is_finite() && f.fract() == 0.0 && f.abs() < 1.8e19).then_some(f as i128)
}

fn number_text<'a>(value: &Value<'a>) -> Option<Cow<'a, str>> {
    match value {
        Value::Num(n) => Some(Cow::Borrowed(*n)),
        Value::Str(s) => {
            let text = s.get();
            let trimmed = text.trim();
            if trimmed.is_empty() || trimmed == "<nil>" {
                None
            } else if trimmed.len() == text.len() {
                Some(text)
            } else {
                Some(Cow::Owned(trimmed.to_owned()))
            }
        }
        _ => None,
    }
}

fn absent(value: &Value<'_>) -> bool {
    match value {
        Value::Null => true,
        Value::Str(s) => s.is_empty() || s.get() == "<nil>",
        _ => false,
    }
}

/// The value of a number or string written as 1 to 19 ASCII digits and nothing else (so it
/// fits 64 bits), read without the general parsers: how the platform spells almost every count
/// and time. `None` for any other spelling, which the general path reads or refuses.
#[inline]
fn plain_digits(value: &Value<'_>) -> Option<u64> {
    let text = match value {
        Value::Num(n) => n,
        Value::Str(s) => s.plain()?,
        _ => return None,
    };
    if !(1..=19).contains(&text.len()) {
        return None;
    }
    text.bytes().try_fold(0u64, |n, b| {
        let digit = b.wrapping_sub(b'0');
        (digit < 10).then(|| n * 10 + u64::from(digit))
    })
}

/// A field as a non-negative integer.
pub fn uint(value: &Option<Value<'_>>, name: &str) -> Result<Option<u64>, String> {
    if let Some(n) = value.as_ref().and_then(plain_digits) {
        return Ok(Some(n));
    }
    let Some(value) = value.as_ref().filter(|v| !absent(v)) else {
        return Ok(None);
    };
    number_text(value)
        .and_then(|t| parse_integer(&t))
        .and_then(|n| u64::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| {
            format!(
                "field \"{name}\": expected a non-negative integer, found {}",
                describe(value)
            )
        })
}

/// A field as a non-negative integer that fits 32 bits.
pub fn uint32(value: &Option<Value<'_>>, name: &str) -> Result<Option<u32>, String> {
    match uint(value, name)? {
        None => Ok(None),
        Some(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| format!("field \"{name}\": {n} is out of range")),
    }
}

/// A field as a signed integer.
pub fn int(value: &Option<Value<'_>>, name: &str) -> Result<Option<i64>, String> {
    if let Some(n) = value
        .as_ref()
        .and_then(plain_digits)
        .and_then(|n| i64::try_from(n).ok())
    {
        return Ok(Some(n));
    }
    let Some(value) = value.as_ref().filter(|v| !absent(v)) else {
        return Ok(None);
    };
    number_text(value)
        .and_then(|t| parse_integer(&t))
        .and_then(|n| i64::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| {
            format!(
                "field \"{name}\": expected an integer, found {}",
                describe(value)
            )
        })
}

/// A field as a finite number.
pub fn float(value: &Option<Value<'_>>, name: &str) -> Result<Option<f64>, String> {
    // A JSON number is never absent and needs no trimming: straight to the parser.
    if let Some(Value::Num(n)) = value
        && let Ok(f) = n.parse::<f64>()
        && f.is_finite()
    {
        return Ok(Some(f));
    }
    let Some(value) = value.as_ref().filter(|v| !absent(v)) else {
        return Ok(None);
    };
    number_text(value)
        .and_then(|t| t.parse::<f64>().ok())
        .filter(|f| f.is_finite())
        .map(Some)
        .ok_or_else(|| {
            format!(
                "field \"{name}\": expected a number, found {}",
                describe(value)
            )
        })
}

/// A field as a coordinate in degrees within `limit` (90 for latitude, 180 for longitude).
pub fn degrees(value: &Option<Value<'_>>, name: &str, limit: f64) -> Result<Option<f64>, String> {
    match float(value, name)? {
        Some(d) if d.abs() > limit => {
            Err(format!("field \"{name}\": {d} is outside ±{limit} degrees"))
        }
        other => Ok(other),
    }
}

/// A field as a flag: JSON booleans, `"true"`/`"false"`, `1`/`0`.
pub fn flag(value: &Option<Value<'_>>, name: &str) -> Result<Option<bool>, String> {
    let Some(value) = value.as_ref().filter(|v| !absent(v)) else {
        return Ok(None);
    };
    let text = match value {
        Value::Str(s) => s.get(),
        _ => Cow::Borrowed(""),
    };
    match value {
        Value::Bool(b) => Ok(Some(*b)),
        Value::Str(_) if text.eq_ignore_ascii_case("true") || text == "1" => Ok(Some(true)),
        Value::Str(_) if text.eq_ignore_ascii_case("false") || text == "0" => Ok(Some(false)),
        Value::Num("1") => Ok(Some(true)),
        Value::Num("0") => Ok(Some(false)),
        other => Err(format!(
            "field \"{name}\": expected true or false, found {}",
            describe(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A string value, read the way the codec reads one.
    fn v(text: &'static str) -> Option<Value<'static>> {
        let quoted: &'static str = Box::leak(format!("{text:?}").into_boxed_str());
        Some(Json::new(quoted).scalar().unwrap().unwrap())
    }

    #[test]
    fn integers_in_every_spelling() {
        assert_eq!(uint(&v("1724350000"), "t"), Ok(Some(1_724_350_000)));
        assert_eq!(uint(&Some(Value::Num("42")), "t"), Ok(Some(42)));
        assert_eq!(uint(&v("1.5e+06"), "t"), Ok(Some(1_500_000)));
        assert_eq!(uint(&v("18446744073709551615"), "t"), Ok(Some(u64::MAX)));
        assert_eq!(uint(&v("<nil>"), "t"), Ok(None));
        assert_eq!(uint(&None, "t"), Ok(None));
        assert_eq!(
            uint(&v("-3"), "up_bytes"),
            Err("field \"up_bytes\": expected a non-negative integer, found \"-3\"".to_owned())
        );
        assert!(uint(&v("1.5"), "t").is_err());
        assert!(uint(&Some(Value::Bool(true)), "t").is_err());
        assert_eq!(int(&v("-3"), "t"), Ok(Some(-3)));
        // The digits-only path and the general one agree at their edges.
        assert_eq!(uint(&v("007"), "t"), Ok(Some(7)));
        assert_eq!(
            uint(&v("9999999999999999999"), "t"),
            Ok(Some(9_999_999_999_999_999_999))
        );
        assert_eq!(int(&v("9223372036854775807"), "t"), Ok(Some(i64::MAX)));
        assert!(int(&v("9223372036854775808"), "t").is_err());
        assert!(uint(&v("18446744073709551616"), "t").is_err());
        assert_eq!(uint(&v(" 42"), "t"), Ok(Some(42)));
        let escaped = Json::new(r#""4\u0032""#).scalar().unwrap().unwrap();
        assert_eq!(uint(&Some(escaped), "t"), Ok(Some(42)));
    }

    proptest::proptest! {
        /// Any run of digits reads as the standard parsers read it, through whichever path.
        #[test]
        fn digit_runs_read_as_std_reads_them(digits in "[0-9]{1,21}") {
            let text = format!("{digits:?}");
            let quoted = Some(Json::new(&text).scalar().unwrap().unwrap());
            let bare = Some(Value::Num(&digits));
            for value in [&quoted, &bare] {
                proptest::prop_assert_eq!(uint(value, "n").ok().flatten(), digits.parse::<u64>().ok());
                proptest::prop_assert_eq!(int(value, "n").ok().flatten(), digits.parse::<i64>().ok());
            }
        }
    }

    proptest::proptest! {
        /// Fields set in any order, some of them more than once, read back their last values,
        /// as a map kept beside them says; fields never set read as absent.
        #[test]
        fn fields_read_back_their_last_values(
            writes in proptest::collection::vec((0..FIELD_NAMES.len(), 0u32..1000), 0..200),
        ) {
            let texts: Vec<String> = writes.iter().map(|(_, n)| n.to_string()).collect();
            let mut fields = Fields::default();
            let mut expected = std::collections::HashMap::new();
            for ((slot, _), text) in writes.iter().zip(&texts) {
                fields.set(*slot, &mut Json::new(text)).unwrap();
                expected.insert(*slot, text.as_str());
            }
            for slot in 0..FIELD_NAMES.len() {
                let read = match fields.get(slot) {
                    Some(Value::Num(n)) => Some(*n),
                    None => None,
                    other => panic!("slot {slot}: {other:?}"),
                };
                proptest::prop_assert_eq!(read, expected.get(&slot).copied(), "slot {}", slot);
            }
        }
    }

    #[test]
    fn flags_and_coordinates() {
        assert_eq!(flag(&v("true"), "f"), Ok(Some(true)));
        assert_eq!(flag(&Some(Value::Num("0")), "f"), Ok(Some(false)));
        assert!(flag(&v("maybe"), "f").is_err());
        assert_eq!(
            degrees(&Some(Value::Num("52.37")), "lat", 90.0),
            Ok(Some(52.37))
        );
        assert!(degrees(&Some(Value::Num("91")), "lat", 90.0).is_err());
        assert!(float(&v("NaN"), "x").is_err());
        // A JSON number too large for a float is refused, not read as infinity.
        assert_eq!(
            float(&Some(Value::Num("1e999")), "x"),
            Err("field \"x\": expected a number, found 1e999".to_owned())
        );
    }

    #[test]
    fn reading_refuses_objects_for_scalar_fields() {
        let mut fields = Fields::default();
        let mut json = Json::new(r#"{"ip": "1.2.3.4"}"#);
        let reason = fields.set(Slot::host as usize, &mut json).unwrap_err();
        assert_eq!(
            reason.0,
            "field \"host\": expected a string, number or boolean, found an object"
        );
        let mut json = Json::new(r#""1.2.3.4""#);
        fields.set(Slot::host as usize, &mut json).unwrap();
        assert_eq!(text(fields.host()).as_deref(), Some("1.2.3.4"));
    }
}
