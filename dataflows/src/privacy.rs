//! Keeping client addresses inside the engine when raw record text is shown.
//!
//! Two tables keep raw text for people to debug with: `unknown_events.sample` (the newest
//! record of a type Keel does not know) and `ingest_errors.excerpt` (the start of a record that
//! could not be used). Both are readable by their tenant through SQL and subscriptions, so
//! their text passes through here first: values under address-like keys are blanked, anything
//! shaped like an IPv4 address is masked, and so is any IPv6 address within text. Raw webhook
//! bodies are base64 in the record (`payload_raw`), where
//! no address can be seen: they are decoded, masked and encoded again.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
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

/// Keys whose values are raw bodies in base64: the unparsed Mist webhooks the edge keeps.
const RAW_KEYS: &[&str] = &["payload_raw", "payloadraw"];

/// `json` with every address-like value blanked and IP addresses masked (`mask_text`); text
/// that is not JSON is only masked. Text with nothing to remove comes back exactly as it was.
pub fn scrub_json(json: &str) -> String {
    match serde_json::from_str::<Value>(json) {
        Ok(mut value) => {
            if scrub_value(&mut value) {
                value.to_string()
            } else {
                json.to_owned()
            }
        }
        Err(_) => mask_text(json),
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
                let key = key.to_ascii_lowercase();
                if let Value::String(raw) = v
                    && RAW_KEYS.contains(&key.as_str())
                    && let Some(masked) = mask_base64(raw)
                {
                    *raw = masked;
                    changed = true;
                    continue;
                }
                let address = ADDRESS_KEYS.contains(&key.as_str());
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
            let masked = mask_text(text);
            let changed = masked != *text;
            *text = masked;
            changed
        }
        _ => false,
    }
}

/// `text` with its IP addresses masked: its IPv6 addresses, then its dotted quads. Most values
/// hold no colon (every event's strings pass here when raw events are kept): no IPv6 scan.
fn mask_text(text: &str) -> String {
    if text.contains(':') {
        return mask_ipv4(&mask_ipv6(text));
    }
    mask_ipv4(text)
}

/// The IPv6 mask.
const IPV6_MASK: &str = "x:x:x:x:x:x:x:x";

/// `text` with every IPv6 address in it masked: each run of hex digits, colons and dots that
/// holds two colons or more and, without the colons and dots it may end with, reads as an IPv6
/// address (`[2001:db8::1]:443`, `from fe80::1%eth0`). Times and MAC addresses do not read as
/// one.
fn mask_ipv6(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let part = |b: u8| b.is_ascii_hexdigit() || b == b':' || b == b'.';
    let (mut copied, mut i) = (0, 0);
    while i < bytes.len() {
        if !part(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && part(bytes[i]) {
            i += 1;
        }
        let run = &text[start..i];
        let address = run.trim_end_matches(['.', ':']);
        // "::" alone ends in the colons trimmed; it is an address all the same.
        let address = if address.is_empty() { run } else { address };
        if run.bytes().filter(|&b| b == b':').count() >= 2
            && address.parse::<std::net::Ipv6Addr>().is_ok()
        {
            out.push_str(&text[copied..start]);
            out.push_str(IPV6_MASK);
            copied = start + address.len();
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// The base64 body `raw` with its addresses masked ([`mask_text`]), or `None` when nothing had
/// to change or it is not base64 (it is then masked as any other text). A body that is not
/// UTF-8 is masked as text with its other bytes replaced.
fn mask_base64(raw: &str) -> Option<String> {
    let body = STANDARD.decode(raw).ok()?;
    let text = String::from_utf8_lossy(&body);
    let masked = mask_text(&text);
    (masked != text).then(|| STANDARD.encode(masked.as_bytes()))
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
        // A value that is an IPv6 address, under any key, or holds one.
        let v6 = scrub_json(r#"{"note":"2001:db8::7","other":"a:b"}"#);
        assert_eq!(v6, r#"{"note":"x:x:x:x:x:x:x:x","other":"a:b"}"#);
        for (text, masked) in [
            ("from [2001:db8::1]:443 ok", "from [x:x:x:x:x:x:x:x]:443 ok"),
            ("http://[fe80::1%eth0]/x", "http://[x:x:x:x:x:x:x:x%eth0]/x"),
            ("peer ::1: gone", "peer x:x:x:x:x:x:x:x: gone"),
            ("mapped ::ffff:10.0.0.1.", "mapped x:x:x:x:x:x:x:x."),
            // Times, MAC addresses and ratios are not addresses.
            ("at 2026-11-01T00:00:00.003Z", "at 2026-11-01T00:00:00.003Z"),
            ("mac aa:bb:cc:dd:ee:ff", "mac aa:bb:cc:dd:ee:ff"),
            ("ratio 16:9, 4:3", "ratio 16:9, 4:3"),
        ] {
            assert_eq!(mask_text(text), masked, "{text}");
        }
    }

    /// A raw webhook body is base64 in the record: its client addresses (on a line of their
    /// own, as Mist sends them, or inside a URL) are masked in the decoded body, which is
    /// encoded again; a body without one is left exactly as it was.
    #[test]
    fn raw_webhook_bodies_are_masked_inside_their_base64() {
        let body = "w-3\nlive+demo\nHLS\n203.0.113.11\nhttp://198.51.100.2/x\n2001:db8::9\nabc";
        let record = serde_json::json!({
            "type": "raw_mist_webhook",
            "raw": {"payload_raw": STANDARD.encode(body), "parse_error": "bad"},
        })
        .to_string();
        let scrubbed: Value = serde_json::from_str(&scrub_json(&record)).unwrap();
        let kept = STANDARD
            .decode(scrubbed["raw"]["payload_raw"].as_str().unwrap())
            .unwrap();
        assert_eq!(
            String::from_utf8(kept).unwrap(),
            "w-3\nlive+demo\nHLS\nx.x.x.x\nhttp://x.x.x.x/x\nx:x:x:x:x:x:x:x\nabc"
        );
        assert_eq!(scrubbed["raw"]["parse_error"], "bad");
        // Not base64: masked as text.
        let plain = serde_json::json!({"payload_raw": "w-3\n203.0.113.11\n2001:db8::9"});
        assert_eq!(
            scrub_json(&plain.to_string()),
            r#"{"payload_raw":"w-3\nx.x.x.x\nx:x:x:x:x:x:x:x"}"#
        );
        // Text that is not JSON (an excerpt cut short) is masked too.
        assert_eq!(
            scrub_json("{\"a\":\"x\n2001:db8::1\n10.0.0.1 …"),
            "{\"a\":\"x\nx:x:x:x:x:x:x:x\nx.x.x.x …"
        );
        let clean =
            serde_json::json!({"payloadRaw": STANDARD.encode("live+demo\nHLS")}).to_string();
        assert_eq!(scrub_json(&clean), clean);
    }

    proptest! {
        /// No IPv6 address survives inside text, whatever surrounds it.
        #[test]
        fn no_ipv6_address_survives(prefix in "[g-z \\[(,\"]{0,8}", groups in prop::array::uniform8(any::<u16>()), suffix in "[g-z \\]),\"%]{0,8}") {
            let address = std::net::Ipv6Addr::from(groups).to_string();
            let text = format!("{prefix}{address}{suffix}");
            let masked = mask_text(&text);
            prop_assert!(!masked.contains(&address), "{} -> {}", text, masked);
        }

        #[test]
        fn no_dotted_quad_survives(prefix in "[a-z :,\"{}]{0,12}", a in 0u8.., b in 0u8.., c in 0u8.., d in 0u8.., suffix in "[a-z :,\"{}]{0,12}") {
            let address = format!("{a}.{b}.{c}.{d}");
            let text = format!("{prefix}{address}{suffix}");
            prop_assert!(!mask_ipv4(&text).contains(&address));
            prop_assert!(!scrub_json(&text).contains(&address));
        }
    }
}
