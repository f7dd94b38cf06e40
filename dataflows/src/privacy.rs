//! Keeping client addresses inside the engine when raw record text is shown.
//!
//! Two tables keep raw text for people to debug with: `unknown_events.sample` (the newest
//! record of a type Keel does not know) and `ingest_errors.excerpt` (the start of a record that
//! could not be used). Both are readable by their tenant through SQL and subscriptions, so
//! their text passes through here first: values under address-like keys are blanked, and
//! anything shaped like an IPv4 address is masked.

use serde_json::Value;

/// Keys whose values are client addresses in the platform's events.
const ADDRESS_KEYS: &[&str] = &[
    "host",
    "client_ip",
    "connection_addr",
    "remote_addr",
    "ip",
    "client_address",
    "x_forwarded_for",
];

/// `json` with every address-like value blanked and IPv4 addresses masked; text that is not
/// JSON is only masked. Text with nothing to remove comes back exactly as it was.
pub fn scrub_json(json: &str) -> String {
    match serde_json::from_str::<Value>(json) {
        Ok(mut value) => {
            if scrub_value(&mut value) {
                value.to_string()
            } else {
                json.to_owned()
            }
        }
        Err(_) => mask_ipv4(json),
    }
}

/// Scrubs `value` in place; true if anything changed.
fn scrub_value(value: &mut Value) -> bool {
    match value {
        Value::Object(map) => {
            let mut changed = false;
            // Keys can be addresses too (a map keyed by client); masked alike.
            if map.keys().any(|key| mask_ipv4(key) != *key) {
                for (key, v) in std::mem::take(map) {
                    map.insert(mask_ipv4(&key), v);
                }
                changed = true;
            }
            for (key, v) in map.iter_mut() {
                let address = ADDRESS_KEYS.contains(&key.to_ascii_lowercase().as_str());
                if address && !matches!(v, Value::Null) && *v != Value::String(String::new()) {
                    *v = Value::String(String::new());
                    changed = true;
                } else if !address {
                    changed |= scrub_value(v);
                }
            }
            changed
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, v| scrub_value(v) | changed),
        Value::String(text) => {
            let masked = mask_ipv4(text);
            let changed = masked != *text;
            *text = masked;
            changed
        }
        _ => false,
    }
}

/// `text` with every dotted quad of 1–3 digit numbers replaced by `x.x.x.x`.
pub fn mask_ipv4(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_digit() || bytes[i - 1] == b'.');
        if boundary
            && bytes[i].is_ascii_digit()
            && let Some(end) = dotted_quad(bytes, i)
        {
            out.push_str(&text[copied..i]);
            out.push_str("x.x.x.x");
            i = end;
            copied = end;
            continue;
        }
        i += 1;
    }
    out.push_str(&text[copied..]);
    out
}

/// The end of a dotted quad starting at `start`, if one does.
fn dotted_quad(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start;
    for part in 0..4 {
        let digits = bytes[i..].iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 3 {
            return None;
        }
        i += digits;
        if part < 3 {
            if bytes.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
    }
    // Not the prefix of a longer number or version string.
    if bytes.get(i).is_some_and(|b| {
        b.is_ascii_digit() || (*b == b'.' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit))
    }) {
        return None;
    }
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn addresses_are_blanked_and_masked() {
        let scrubbed = scrub_json(
            r#"{"type":"x","data":{"host":"203.0.113.7","note":"from 198.51.100.4:443","list":[{"client_ip":"2001:db8::1"}],"version":"1.2.3.4.5","n":12}}"#,
        );
        assert!(!scrubbed.contains("203.0.113.7"));
        assert!(!scrubbed.contains("198.51.100.4"));
        assert!(!scrubbed.contains("2001:db8::1"));
        assert!(scrubbed.contains("from x.x.x.x:443"), "{scrubbed}");
        assert!(
            scrubbed.contains("1.2.3.4.5"),
            "version strings stay: {scrubbed}"
        );
        assert!(scrubbed.contains("\"n\":12"));
        let keyed = scrub_json(r#"{"by_client":{"203.0.113.9":3}}"#);
        assert_eq!(keyed, r#"{"by_client":{"x.x.x.x":3}}"#);
        assert_eq!(
            mask_ipv4("{\"a\":\"10.0.0.1\" truncated"),
            "{\"a\":\"x.x.x.x\" truncated"
        );
        assert_eq!(mask_ipv4("no address 1.2.3"), "no address 1.2.3");
    }

    proptest! {
        #[test]
        fn no_dotted_quad_survives(prefix in "[a-z :,\"{}]{0,12}", a in 0u8.., b in 0u8.., c in 0u8.., d in 0u8.., suffix in "[a-z :,\"{}]{0,12}") {
            let address = format!("{a}.{b}.{c}.{d}");
            let text = format!("{prefix}{address}{suffix}");
            prop_assert!(!mask_ipv4(&text).contains(&address));
            prop_assert!(!scrub_json(&text).contains(&address));
        }
    }
}
