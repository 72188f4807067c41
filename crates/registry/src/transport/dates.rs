//! The two timestamp forms the registry protocol brings: RFC 3339 in token answers
//! (`issued_at`) and the HTTP date in `Retry-After`. Hand-rolled and small, apart from the
//! transport so the formats can be tested on their own.

use std::time::{Duration, SystemTime};

/// Parses the IMF-fixdate form, `Sun, 06 Nov 1994 08:49:37 GMT`.
pub(super) fn parse_http_date(text: &str) -> Option<SystemTime> {
    let (_, rest) = text.split_once(", ")?;
    let mut parts = rest.split(' ');
    let day: i64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let time = parts.next()?;
    if parts.next()? != "GMT" || time.len() != 8 {
        return None;
    }
    parse_rfc3339(&format!("{year:04}-{month:02}-{day:02}T{time}Z"))
}

/// Parses the RFC 3339 timestamps token servers put in `issued_at`
/// (`2024-01-02T03:04:05.678Z`, `...+02:00`).
pub(super) fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let bytes = text.as_bytes();
    if bytes.len() < 20
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || !matches!(bytes[10], b'T' | b't' | b' ')
    {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> { text.get(range)?.parse().ok() };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let h: i64 = rest.get(1..3)?.parse().ok()?;
            let m: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (h * 3600 + m * 60)
        }
    };
    // Days from civil date (proleptic Gregorian), after Howard Hinnant's well-known formula.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    u64::try_from(secs)
        .ok()
        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_token_timestamps() {
        let t = parse_rfc3339("2024-01-02T03:04:05Z").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_704_164_645
        );
        let with_offset = parse_rfc3339("2024-01-02T05:04:05.123456+02:00").unwrap();
        assert_eq!(with_offset, t);
        assert!(parse_rfc3339("yesterday").is_none());
        assert_eq!(parse_http_date("Tue, 02 Jan 2024 03:04:05 GMT"), Some(t));
        assert!(parse_http_date("Tue, 02 Foo 2024 03:04:05 GMT").is_none());
        assert!(parse_http_date("2 hours").is_none());
        assert!(parse_rfc3339("2024-13-02T03:04:05Z").is_none());
    }
}
