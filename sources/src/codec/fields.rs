//! The named fields the codec reads, and the lenient conversions that turn them into numbers,
//! flags and names.
//!
//! Both wire versions are read into one [`Fields`] struct: version 1's flat string map and
//! version 2's trigger envelope and payload use overlapping names, so one set of names covers
//! both. Conversions accept what the platform writes — 64-bit integers as strings (protojson),
//! every value as a string (version 1, including Go's `1.5e+06` float formatting and the literal
//! `<nil>`) — and say exactly which field was wrong when they refuse.

use std::borrow::Cow;

use keel_operators::sym::Sym;

use super::Reason;
use super::json::{Compound, Json, Value};

/// Declares a struct of optional scalar fields and a parser that fills it from one JSON object.
macro_rules! fields {
    ($(#[$meta:meta])* $name:ident { $($field:ident),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub struct $name<'a> {
            $(
                #[doc = concat!("`", stringify!($field), "`")]
                pub $field: Option<Value<'a>>,
            )*
        }

        impl<'a> $name<'a> {
            /// Sets `key` from the cursor's next value if it is one of ours; returns whether it was.
            pub fn read(&mut self, key: &str, json: &mut Json<'a>) -> Result<bool, Reason> {
                let slot = match key {
                    $(stringify!($field) => &mut self.$field,)*
                    _ => return Ok(false),
                };
                match json.scalar()? {
                    Ok(value) => *slot = Some(value),
                    Err(kind) => {
                        let found = match kind { Compound::Object => "an object", Compound::Array => "an array" };
                        return Err(Reason(format!("field \"{key}\": expected a string, number or boolean, found {found}")));
                    }
                }
                Ok(true)
            }
        }
    };
}

fields! {
    /// Every scalar field Keel reads, by its wire name, in either version.
    Fields {
        // Envelope of a version-2 trigger, shared names in version 1.
        trigger_type, node_id, timestamp, tenant_id, stream_id, trigger_unix_millis, event_id,
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
        primary_fps, primary_bitrate, primary_video_bitrate, packets_sent, packets_lost,
        started_at, track_count, total_tracks,
        // Nodes.
        cpu_tenths, cpu_usage, ram_max, ram_current, up_speed, down_speed, bw_limit, location,
        active_streams, stream_count, base_url, is_healthy, operational_mode,
        // Routing.
        selected_node, selected_node_id, score, node_latitude, node_longitude,
        routing_distance_km, stream_tenant_id,
    }
}

/// A field's text, or `None` when it is absent, null, empty or version 1's `<nil>`.
pub fn text<'v>(value: &'v Option<Value<'_>>) -> Option<Cow<'v, str>> {
    match value.as_ref()? {
        Value::Str(s) if s.is_empty() || s == "<nil>" => None,
        Value::Str(s) => Some(Cow::Borrowed(s.as_ref())),
        Value::Num(n) => Some(Cow::Borrowed(n)),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        Value::Null => None,
    }
}

/// The first of several fields that has text.
pub fn first_text<'v>(values: &[&'v Option<Value<'_>>]) -> Option<Cow<'v, str>> {
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
        Value::Str(s) => format!("{:?}", s.chars().take(40).collect::<String>()),
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

fn number_text<'v>(value: &'v Value<'_>) -> Option<&'v str> {
    match value {
        Value::Num(n) => Some(n),
        Value::Str(s) if !s.is_empty() && s != "<nil>" => Some(s.trim()),
        _ => None,
    }
}

fn absent(value: &Value<'_>) -> bool {
    match value {
        Value::Null => true,
        Value::Str(s) => s.is_empty() || s == "<nil>",
        _ => false,
    }
}

/// A field as a non-negative integer.
pub fn uint(value: &Option<Value<'_>>, name: &str) -> Result<Option<u64>, String> {
    let Some(value) = value.as_ref().filter(|v| !absent(v)) else {
        return Ok(None);
    };
    number_text(value)
        .and_then(parse_integer)
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
    let Some(value) = value.as_ref().filter(|v| !absent(v)) else {
        return Ok(None);
    };
    number_text(value)
        .and_then(parse_integer)
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
    match value {
        Value::Bool(b) => Ok(Some(*b)),
        Value::Str(s) if s.eq_ignore_ascii_case("true") || s == "1" => Ok(Some(true)),
        Value::Str(s) if s.eq_ignore_ascii_case("false") || s == "0" => Ok(Some(false)),
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

    fn v(text: &str) -> Option<Value<'_>> {
        Some(Value::Str(Cow::Borrowed(text)))
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
    }

    #[test]
    fn reading_refuses_objects_for_scalar_fields() {
        let mut fields = Fields::default();
        let mut json = Json::new(br#"{"host": {"ip": "1.2.3.4"}}"#);
        let mut reason = None;
        let _ = json.object(|json, key| match fields.read(&key, json) {
            Ok(_) => Ok(()),
            Err(r) => {
                reason = Some(r.0);
                Ok::<(), Reason>(())
            }
        });
        assert_eq!(
            reason.as_deref(),
            Some("field \"host\": expected a string, number or boolean, found an object")
        );
    }
}
