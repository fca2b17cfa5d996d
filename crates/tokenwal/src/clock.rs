//! The engine's clock.

use tokenwal_core::UnixMillis;

/// The current time by the system clock.
pub(crate) fn now() -> UnixMillis {
    UnixMillis::from_system_time(std::time::SystemTime::now())
}
