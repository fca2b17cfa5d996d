//! Time for people: RFC 3339 parsing (import) and "in 4m" / "3m ago" rendering.

use std::time::Duration;
use tokenwal::core::UnixMillis;

/// The current time by the system clock.
pub fn now() -> UnixMillis {
    UnixMillis::from_system_time(std::time::SystemTime::now())
}

/// A short human duration: `850ms`, `12s`, `4m10s`, `3h05m`, `89d`.
pub fn short(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d", s / 86_400),
    }
}

/// `at` relative to `now`: `in 4m10s`, `3m05s ago`, `now`.
pub fn relative(at: UnixMillis, now: UnixMillis) -> String {
    if at > now {
        format!("in {}", short(at.since(now)))
    } else if now.since(at) < Duration::from_secs(1) {
        "now".into()
    } else {
        format!("{} ago", short(now.since(at)))
    }
}

/// `2026-…Z (in 4m10s)`.
pub fn stamp(at: UnixMillis, now: UnixMillis) -> String {
    format!("{at} ({})", relative(at, now))
}

/// Why an RFC 3339 timestamp was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeParseError {
    /// Not of the form `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
    #[error("not an RFC 3339 timestamp (YYYY-MM-DDTHH:MM:SS[.fff]Z or ±HH:MM)")]
    Shape,
    /// A field is out of range.
    #[error("RFC 3339 timestamp has a field out of range")]
    Range,
    /// Before 1970.
    #[error("timestamp is before 1970")]
    BeforeEpoch,
}

/// Parses an RFC 3339 timestamp (`2027-01-01T00:00:00Z`, `2027-01-01T01:00:00.250+01:00`) to
/// unix milliseconds. Fractions beyond milliseconds are truncated.
pub fn parse_rfc3339(s: &str) -> Result<UnixMillis, TimeParseError> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(TimeParseError::Shape);
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, TimeParseError> {
        let part = &b[r];
        if part.iter().all(u8::is_ascii_digit) {
            Ok(part.iter().fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0')))
        } else {
            Err(TimeParseError::Shape)
        }
    };
    let sep = |i: usize, c: &[u8]| if c.contains(&b[i]) { Ok(()) } else { Err(TimeParseError::Shape) };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    sep(4, b"-")?;
    sep(7, b"-")?;
    sep(10, b"Tt ")?;
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    sep(13, b":")?;
    sep(16, b":")?;
    let mut i = 19;
    let mut millis = 0i64;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                millis = millis * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        let digits = i - start;
        if digits == 0 {
            return Err(TimeParseError::Shape);
        }
        for _ in digits..3 {
            millis *= 10;
        }
    }
    let offset_min = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() => {
            sep(i + 3, b":")?;
            let (h, m) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return Err(TimeParseError::Range);
            }
            let o = h * 60 + m;
            if *sign == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return Err(TimeParseError::Shape),
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(TimeParseError::Range),
    };
    // 60 seconds: a leap second, counted as the next second's start.
    if day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return Err(TimeParseError::Range);
    }
    // days from civil (Howard Hinnant).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_min * 60;
    if secs < 0 {
        return Err(TimeParseError::BeforeEpoch);
    }
    Ok(UnixMillis(secs as u64 * 1000 + millis as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_with_display() {
        for ms in [0u64, 951_782_400_123, 1_798_761_600_000, 1_800_000_000_999] {
            let s = UnixMillis(ms).to_string();
            assert_eq!(parse_rfc3339(&s), Ok(UnixMillis(ms)), "{s}");
        }
        assert_eq!(parse_rfc3339("2027-01-01T01:00:00+01:00"), Ok(UnixMillis(1_798_761_600_000)));
        assert_eq!(parse_rfc3339("2026-12-31T23:30:00-00:30"), Ok(UnixMillis(1_798_761_600_000)));
        assert_eq!(parse_rfc3339("2027-01-01T00:00:00.5Z"), Ok(UnixMillis(1_798_761_600_500)));
        assert_eq!(parse_rfc3339("2027-01-01T00:00:00.123456789Z"), Ok(UnixMillis(1_798_761_600_123)));
    }

    #[test]
    fn rfc3339_refuses_garbage() {
        for s in [
            "",
            "2027-01-01",
            "2027-01-01T00:00:00",
            "2027-13-01T00:00:00Z",
            "2027-02-29T00:00:00Z",
            "2027-01-01T24:00:00Z",
            "2027-01-01T00:00:00.Z",
            "2027-01-01T00:00:00+0100",
            "1969-12-31T23:59:59Z",
            "２０２７-01-01T00:00:00Z",
            "2027-01-01T00:00:00Zjunk",
        ] {
            assert!(parse_rfc3339(s).is_err(), "accepted {s:?}");
        }
    }

    #[test]
    fn relative_times() {
        let now = UnixMillis(1_000_000);
        assert_eq!(relative(UnixMillis(1_250_000), now), "in 4m10s");
        assert_eq!(relative(UnixMillis(815_000), now), "3m05s ago");
        assert_eq!(relative(now, now), "now");
        assert_eq!(short(Duration::from_secs(89 * 86_400 + 5)), "89d");
    }
}
