//! Time as a value. The core never reads a clock: every function that needs "now" takes it.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// Milliseconds since the Unix epoch, as read by the caller's clock.
///
/// Arithmetic saturates: an absurd server-supplied lifetime can never wrap around into the past.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// The earliest representable instant.
    pub const EPOCH: UnixMillis = UnixMillis(0);

    /// `self + d`, saturating at `u64::MAX` milliseconds.
    pub fn saturating_add(self, d: Duration) -> UnixMillis {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        UnixMillis(self.0.saturating_add(ms))
    }

    /// `self - d`, saturating at the epoch.
    pub fn saturating_sub(self, d: Duration) -> UnixMillis {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        UnixMillis(self.0.saturating_sub(ms))
    }

    /// How long after `earlier` this instant is (zero if it is not after it).
    pub fn since(self, earlier: UnixMillis) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// Converts a [`std::time::SystemTime`]; instants before 1970 map to the epoch.
    pub fn from_system_time(t: std::time::SystemTime) -> UnixMillis {
        let ms = t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        UnixMillis(ms)
    }
}

impl fmt::Debug for UnixMillis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

impl fmt::Display for UnixMillis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Render as RFC 3339 UTC without pulling in a date crate (civil-from-days, Howard Hinnant).
        let secs = self.0 / 1000;
        let millis = self.0 % 1000;
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let mo = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(mo <= 2);
        write!(f, "{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_rfc3339() {
        assert_eq!(UnixMillis(0).to_string(), "1970-01-01T00:00:00.000Z");
        // 2027-01-01T00:00:00Z, the enforcement date.
        assert_eq!(UnixMillis(1_798_761_600_000).to_string(), "2027-01-01T00:00:00.000Z");
        assert_eq!(UnixMillis(951_782_400_123).to_string(), "2000-02-29T00:00:00.123Z");
    }

    #[test]
    fn arithmetic_saturates() {
        assert_eq!(UnixMillis(u64::MAX - 1).saturating_add(Duration::from_secs(10)), UnixMillis(u64::MAX));
        assert_eq!(UnixMillis(5).saturating_sub(Duration::from_secs(1)), UnixMillis(0));
        assert_eq!(UnixMillis(5).since(UnixMillis(10)), Duration::ZERO);
    }
}
