//! Human-friendly durations for the command line: `1500ms`, `3s`, `60m`, `2h`, `30d`.

use std::fmt;
use std::str::FromStr;

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

/// A duration in whole milliseconds, parsed from `<integer><unit>` with unit one of
/// `ms`, `s`, `m`, `h`, `d`.
///
/// A bare number is rejected: "90" could mean seconds or days, and guessing wrong silently
/// changes what a test exercises.
///
/// ```
/// use tokenwal_sim::SimDuration;
/// assert_eq!("60m".parse::<SimDuration>().unwrap().as_millis(), 3_600_000);
/// assert_eq!("1500ms".parse::<SimDuration>().unwrap().as_millis(), 1_500);
/// assert!("90".parse::<SimDuration>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SimDuration(u64);

impl SimDuration {
    /// A duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Self(ms)
    }

    /// A duration of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(secs * SECOND_MS)
    }

    /// A duration of `days` days.
    pub const fn from_days(days: u64) -> Self {
        Self(days * DAY_MS)
    }

    /// The duration in milliseconds.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// The duration as a [`std::time::Duration`].
    pub const fn to_std(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0)
    }
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationParseError {
    /// The string was empty.
    #[error("empty duration")]
    Empty,
    /// The string had no unit or an unknown one.
    #[error("duration {0:?} needs a unit: ms, s, m, h or d")]
    BadUnit(String),
    /// The numeric part was not a non-negative integer.
    #[error("duration {0:?} does not start with a whole number")]
    BadNumber(String),
    /// The value does not fit in 64-bit milliseconds.
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

impl FromStr for SimDuration {
    type Err = DurationParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(DurationParseError::Empty);
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| DurationParseError::BadUnit(s.to_owned()))?;
        let (digits, unit) = s.split_at(split);
        if digits.is_empty() {
            return Err(DurationParseError::BadNumber(s.to_owned()));
        }
        let n: u64 = digits.parse().map_err(|_| DurationParseError::Overflow(s.to_owned()))?;
        let scale = match unit {
            "ms" => 1,
            "s" => SECOND_MS,
            "m" => MINUTE_MS,
            "h" => HOUR_MS,
            "d" => DAY_MS,
            _ => return Err(DurationParseError::BadUnit(s.to_owned())),
        };
        n.checked_mul(scale).map(SimDuration).ok_or_else(|| DurationParseError::Overflow(s.to_owned()))
    }
}

impl fmt::Display for SimDuration {
    /// Formats with the largest unit that represents the value exactly, so that
    /// `parse(display(d)) == d`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        for (scale, unit) in [(DAY_MS, "d"), (HOUR_MS, "h"), (MINUTE_MS, "m"), (SECOND_MS, "s")] {
            if ms != 0 && ms % scale == 0 {
                return write!(f, "{}{unit}", ms / scale);
            }
        }
        write!(f, "{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        let cases = [
            ("1500ms", 1_500),
            ("3s", 3_000),
            ("60m", 3_600_000),
            ("2h", 7_200_000),
            ("30d", 2_592_000_000),
            ("0s", 0),
        ];
        for (text, ms) in cases {
            assert_eq!(text.parse::<SimDuration>().unwrap().as_millis(), ms, "{text}");
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!("".parse::<SimDuration>(), Err(DurationParseError::Empty));
        assert!(matches!("90".parse::<SimDuration>(), Err(DurationParseError::BadUnit(_))));
        assert!(matches!("5w".parse::<SimDuration>(), Err(DurationParseError::BadUnit(_))));
        assert!(matches!("ms".parse::<SimDuration>(), Err(DurationParseError::BadNumber(_))));
        assert!(matches!("-3s".parse::<SimDuration>(), Err(DurationParseError::BadNumber(_))));
        assert!(matches!("99999999999999999999d".parse::<SimDuration>(), Err(DurationParseError::Overflow(_))));
    }

    #[test]
    fn display_round_trips() {
        for ms in [0, 1, 999, 1_000, 61_000, 3_600_000, 90 * DAY_MS, 1_500] {
            let d = SimDuration::from_millis(ms);
            assert_eq!(d.to_string().parse::<SimDuration>().unwrap(), d);
        }
        assert_eq!(SimDuration::from_days(90).to_string(), "90d");
        assert_eq!(SimDuration::from_millis(1_500).to_string(), "1500ms");
    }
}
