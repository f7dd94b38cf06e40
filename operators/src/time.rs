//! Event time: milliseconds since the Unix epoch (UTC), parsed from and printed as RFC 3339.
//!
//! Event time is data in Keel (the timely timestamp is the ingestion epoch), so these helpers are
//! plain functions on `i64` milliseconds. Parsing is hand-written because it runs once per event.
//!
//! ```
//! use keel_operators::time::{format_rfc3339, parse_rfc3339, window_start, MINUTE};
//! let t = parse_rfc3339("2026-11-01T10:07:30.250Z").unwrap();
//! assert_eq!(format_rfc3339(t), "2026-11-01T10:07:30.250Z");
//! assert_eq!(format_rfc3339(window_start(t, 5 * MINUTE)), "2026-11-01T10:05:00.000Z");
//! assert_eq!(parse_rfc3339("2026-11-01T12:07:30+02:00"), parse_rfc3339("2026-11-01T10:07:30Z"));
//! assert_eq!(parse_rfc3339("yesterday"), None);
//! ```

/// One second in milliseconds.
pub const SECOND: i64 = 1_000;
/// One minute in milliseconds.
pub const MINUTE: i64 = 60 * SECOND;
/// One hour in milliseconds.
pub const HOUR: i64 = 60 * MINUTE;
/// One day in milliseconds.
pub const DAY: i64 = 24 * HOUR;

/// The wall clock in milliseconds since the Unix epoch (0 before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Precision of a parsed timestamp, used to prefer the more precise of two event times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Precision {
    /// Whole seconds.
    Seconds,
    /// Milliseconds or finer.
    Millis,
}

/// The start of the window of `width` milliseconds that contains `t`.
pub fn window_start(t: i64, width: i64) -> i64 {
    t.div_euclid(width) * width
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn digits(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() {
        return None;
    }
    bytes.iter().try_fold(0i64, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + i64::from(b - b'0'))
    })
}

/// Parses an RFC 3339 timestamp (`T` or space separator, optional fraction, `Z` or `±HH:MM`)
/// into milliseconds since the epoch; fractions finer than a millisecond are truncated.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    parse_rfc3339_precise(text).map(|(t, _)| t)
}

/// Like [`parse_rfc3339`], and says whether the text carried a fraction of a second.
pub fn parse_rfc3339_precise(text: &str) -> Option<(i64, Precision)> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let year = digits(&b[0..4])?;
    let month = digits(&b[5..7])?;
    let day = digits(&b[8..10])?;
    let hour = digits(&b[11..13])?;
    let minute = digits(&b[14..16])?;
    let second = digits(&b[17..19])?;
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &b[19..];
    let mut millis = 0;
    let mut precision = Precision::Seconds;
    if let Some(after_dot) = rest.strip_prefix(b".") {
        let len = after_dot.iter().take_while(|c| c.is_ascii_digit()).count();
        if len == 0 {
            return None;
        }
        let frac = &after_dot[..len];
        let mut ms = digits(&frac[..len.min(3)])?;
        for _ in len..3 {
            ms *= 10;
        }
        millis = ms;
        precision = Precision::Millis;
        rest = &after_dot[len..];
    }
    let offset_minutes = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let hours = digits(&[*h1, *h2])?;
            let minutes = digits(&[*m1, *m2])?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            let total = hours * 60 + minutes;
            if *sign == b'+' { total } else { -total }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    Some((seconds * SECOND + millis, precision))
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// Formats milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_rfc3339(t: i64) -> String {
    let days = t.div_euclid(DAY);
    let in_day = t.rem_euclid(DAY);
    let (year, month, day) = civil_from_days(days);
    let hour = in_day / HOUR;
    let minute = in_day % HOUR / MINUTE;
    let second = in_day % MINUTE / SECOND;
    let millis = in_day % SECOND;
    if !(0..=9999).contains(&year) {
        return format!(
            "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z"
        );
    }
    // Digits written in place: this runs once per record on the ingest paths, where the
    // formatting machinery cost more than the arithmetic.
    let mut text = *b"0000-00-00T00:00:00.000Z";
    for (at, width, mut value) in [
        (0, 4, year),
        (5, 2, month),
        (8, 2, day),
        (11, 2, hour),
        (14, 2, minute),
        (17, 2, second),
        (20, 3, millis),
    ] {
        for digit in text[at..at + width].iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_instants() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Some(951_782_400_000));
        assert_eq!(
            parse_rfc3339("2026-08-22T10:00:00.123456789Z"),
            Some(1_787_392_800_123)
        );
        assert_eq!(
            parse_rfc3339("2026-08-22 10:00:00.1Z"),
            Some(1_787_392_800_100)
        );
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59.999Z"), Some(-1));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T00:00:00",
            "2026-01-01T00:00:00.Z",
            "2026-01-01T00:00:00+0200",
            "2026-01-01X00:00:00Z",
            "２０２６-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn precision_follows_the_fraction() {
        assert_eq!(
            parse_rfc3339_precise("2026-01-01T00:00:00Z").unwrap().1,
            Precision::Seconds
        );
        assert_eq!(
            parse_rfc3339_precise("2026-01-01T00:00:00.5Z").unwrap().1,
            Precision::Millis
        );
    }

    proptest! {
        #[test]
        fn format_then_parse_is_identity(t in -2_000_000_000_000i64..8_000_000_000_000i64) {
            prop_assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t));
        }

        #[test]
        fn format_writes_what_the_formatting_machinery_would(
            t in prop_oneof![
                // Years 0 to 9999, written digit by digit …
                -62_167_219_200_000i64..253_402_300_800_000i64,
                // … and far outside them, left to the formatting machinery.
                -10_000_000_000_000_000i64..10_000_000_000_000_000i64,
            ]
        ) {
            let (days, in_day) = (t.div_euclid(DAY), t.rem_euclid(DAY));
            let (year, month, day) = civil_from_days(days);
            let expected = format!(
                "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
                in_day / HOUR,
                in_day % HOUR / MINUTE,
                in_day % MINUTE / SECOND,
                in_day % SECOND
            );
            prop_assert_eq!(format_rfc3339(t), expected);
        }

        #[test]
        fn windows_contain_their_instants(t in any::<i32>(), width in 1i64..10_000_000) {
            let t = i64::from(t) * 997;
            let start = window_start(t, width);
            prop_assert!(start <= t && t < start + width);
            prop_assert_eq!(start.rem_euclid(width), 0);
        }
    }
}
