//! Secrets as types.
//!
//! Every credential tokenwal handles is a newtype that:
//! * prints as `Name(<redacted>)` in `Debug` and has no `Display`, so neither `{:?}` in a log line,
//!   an error message nor a panic can carry it;
//! * gives its value only through an explicit, greppable [`AccessToken::expose_secret`];
//! * is zeroized when dropped;
//! * compares in constant time.
//!
//! They serialize as plain strings because the journal must store them (encryption at rest is a
//! separate layer); serialization is the only other way out, and only the store calls it.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Constant-time byte-slice equality (length is not secret).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

macro_rules! secret_string {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Zeroize, ZeroizeOnDrop)]
        pub struct $name(String);

        impl $name {
            /// Wraps a secret value. The `String` is moved, not copied.
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }

            /// The secret itself. Call only where it must leave the process (a request body,
            /// the store's encoder, an explicit `--reveal-secrets` export).
            pub fn expose_secret(&self) -> &str {
                &self.0
            }

            /// Whether the secret is the empty string (never a valid credential).
            pub fn is_empty(&self) -> bool {
                self.0.is_empty()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                ct_eq(self.0.as_bytes(), other.0.as_bytes())
            }
        }

        impl Eq for $name {}

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d).map(Self)
            }
        }
    };
}

secret_string!(
    /// An OAuth access token (Shopify: `shpat_…`), presented to the Admin API.
    AccessToken
);
secret_string!(
    /// An OAuth refresh token (Shopify: `shprt_…`), presented to the token endpoint.
    RefreshToken
);
secret_string!(
    /// The app's client secret. It is only ever sent to the validated token endpoint.
    ClientSecret
);
secret_string!(
    /// An App Bridge session token (a short-lived JWT) used for token exchange.
    SessionToken
);
secret_string!(
    /// A legacy non-expiring offline access token, the subject of a migration.
    LegacyToken
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let t = RefreshToken::new("shprt_super_secret_value");
        let s = format!("{t:?} {:?}", Some(&t));
        assert!(!s.contains("super_secret"), "{s}");
        assert_eq!(format!("{t:?}"), "RefreshToken(<redacted>)");
        assert_eq!(format!("{:?}", ClientSecret::new("x")), "ClientSecret(<redacted>)");
    }

    #[test]
    fn equality_is_by_value() {
        assert_eq!(AccessToken::new("a"), AccessToken::new("a"));
        assert_ne!(AccessToken::new("a"), AccessToken::new("b"));
        assert_ne!(AccessToken::new("a"), AccessToken::new("aa"));
    }
}
