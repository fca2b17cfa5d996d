//! Where a PostgreSQL store lives: a connection URL (whose password is never shown), the schema that
//! holds the store's tables, and the membership lease.

use super::tls::Tls;
use crate::error::StoreError;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The schema a store uses when the URL does not name one (`?schema=…`).
pub const DEFAULT_SCHEMA: &str = "tokenwal";

/// A PostgreSQL store: `postgres://user:password@host:port/database?schema=tokenwal`.
///
/// `Debug` and `Display` show the URL with its password replaced by `***`; errors name the
/// location the same way. The `schema` query parameter is tokenwal's own (it is removed before the
/// URL reaches the driver); every other parameter is the driver's (`connect_timeout`,
/// `application_name`, `options`, …).
#[derive(Clone)]
pub struct PgLocation {
    config: postgres::Config,
    schema: String,
    redacted: String,
    lease: Duration,
    tls: Tls,
}

impl PgLocation {
    /// Parses a `postgres://` or `postgresql://` URL.
    pub fn parse(url: &str) -> Result<PgLocation, StoreError> {
        let invalid = |reason: String| StoreError::InvalidLocation { reason };
        let mut parsed = url::Url::parse(url)
            .map_err(|e| invalid(format!("not a URL ({e}); expected postgres://user@host:port/database")))?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(invalid(format!("scheme {:?} is not postgres:// or postgresql://", parsed.scheme())));
        }
        let mut schema = DEFAULT_SCHEMA.to_string();
        let mut lease = Duration::from_secs(90);
        let mut rest = Vec::new();
        let (mut sslmode, mut sslrootcert) = (None, None);
        for (k, v) in parsed.query_pairs() {
            if k == "sslmode" {
                sslmode = Some(v.into_owned());
            } else if k == "sslrootcert" {
                sslrootcert = Some(v.into_owned());
            } else if k == "schema" {
                schema = v.into_owned();
            } else if k == "lease" {
                lease = match v.parse::<u64>() {
                    Ok(secs) if (4..=86_400).contains(&secs) => Duration::from_secs(secs),
                    _ => return Err(invalid(format!("lease={v:?}: expected whole seconds from 4 to 86400"))),
                };
            } else {
                rest.push((k.into_owned(), v.into_owned()));
            }
        }
        check_identifier(&schema)?;
        if rest.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(rest);
        }
        let mut shown = parsed.clone();
        if shown.password().is_some() {
            let _ = shown.set_password(Some("***"));
        }
        let redacted = shown.to_string();
        let mut config = postgres::Config::from_str(parsed.as_str())
            .map_err(|e| invalid(format!("{redacted}: {}", scrub(&e.to_string(), parsed.password()))))?;
        let (tls, mode) = Tls::from_url(sslmode.as_deref(), sslrootcert.as_deref())?;
        config.ssl_mode(mode);
        if config.get_dbname().is_none() {
            return Err(invalid(format!("{redacted}: the URL names no database")));
        }
        Ok(PgLocation { config, schema, redacted, lease, tls })
    }

    /// The same database with another schema (tests give every store its own).
    pub fn with_schema(mut self, schema: &str) -> Result<PgLocation, StoreError> {
        check_identifier(schema)?;
        self.schema = schema.to_string();
        Ok(self)
    }

    /// Sets the membership lease (default 90 s, or the URL's `?lease=SECONDS`; at least 4 s). A writer commits an intent only while
    /// more than half of its lease remains, so half the lease must exceed the longest token request.
    pub fn with_lease(mut self, lease: Duration) -> PgLocation {
        self.lease = lease.max(Duration::from_secs(4));
        self
    }

    /// The schema holding the store's tables.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The membership lease.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The URL with its password replaced by `***`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    pub(crate) fn driver_config(&self) -> &postgres::Config {
        &self.config
    }

    /// How its connections use TLS (the URL's `sslmode` and `sslrootcert`; see [`super::tls`]).
    pub(crate) fn tls(&self) -> &Tls {
        &self.tls
    }
}

impl fmt::Debug for PgLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgLocation")
            .field("url", &self.redacted)
            .field("schema", &self.schema)
            .field("lease", &self.lease)
            .field("sslmode", &self.tls.mode())
            .finish()
    }
}

impl fmt::Display for PgLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (schema {})", self.redacted, self.schema)
    }
}

/// A schema name tokenwal accepts: lower-case ASCII letters, digits and `_`, not starting with a
/// digit, at most 63 bytes (so it never needs quoting rules beyond plain double quotes).
fn check_identifier(s: &str) -> Result<(), StoreError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
        && !s.starts_with("pg_");
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidLocation {
            reason: format!(
                "schema {:?} is not a plain identifier (a-z, 0-9, _; not starting with a digit or pg_; ≤ 63 bytes)",
                s.chars().filter(|c| !c.is_control()).take(80).collect::<String>()
            ),
        })
    }
}

/// Removes `secret` from a driver message (belt and braces: the driver does not echo passwords).
pub(crate) fn scrub(message: &str, secret: Option<&str>) -> String {
    match secret {
        Some(s) if !s.is_empty() => message.replace(s, "***"),
        _ => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_shows() {
        let l =
            PgLocation::parse("postgres://app:s3cr3t-pw@db.internal:5432/shop?schema=tw&connect_timeout=5").unwrap();
        for text in [format!("{l:?}"), l.to_string(), l.redacted().to_string()] {
            assert!(!text.contains("s3cr3t-pw"), "{text}");
            assert!(text.contains("***"), "{text}");
        }
        assert_eq!(l.schema(), "tw");
        assert_eq!(l.driver_config().get_dbname(), Some("shop"));
        assert_eq!(l.driver_config().get_connect_timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(l.lease(), Duration::from_secs(90));
        assert_eq!(PgLocation::parse("postgres://h/db?lease=12").unwrap().lease(), Duration::from_secs(12));
    }

    #[test]
    fn bad_locations_are_refused_with_the_reason() {
        for (url, says) in [
            ("mysql://h/db", "scheme"),
            ("postgres://h:5432", "no database"),
            ("postgres://h/db?schema=Bad-Name", "plain identifier"),
            ("postgres://h/db?schema=pg_catalog", "plain identifier"),
            ("not a url", "not a URL"),
            ("postgres://h/db?lease=2", "lease"),
            ("postgres://h/db?lease=ten", "lease"),
            ("postgres://h/db?sslmode=allow-anything", "sslmode"),
            ("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem", "sslrootcert"),
            ("postgres://h/db?sslmode=require&sslrootcert=/dev/null", "no usable CA certificate"),
        ] {
            let e = PgLocation::parse(url).unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
        for (url, mode) in [
            ("postgres://h/db", "disable"),
            ("postgres://h/db?sslmode=require", "require"),
            ("postgres://h/db?sslmode=verify-full", "verify-full"),
        ] {
            let l = PgLocation::parse(url).unwrap();
            assert_eq!(l.tls().mode(), mode);
            assert!(format!("{l:?}").contains(mode));
        }
        let e = PgLocation::parse("postgres://u:hunter2@h/db?bogus_option=1").unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
