//! The broker's bearer token: read once at start (environment or a private file), compared in
//! constant time, never logged.

use sha2::{Digest, Sha256};
use std::path::Path;
use subtle::ConstantTimeEq;

use crate::error::CliError;

/// Environment variable holding the broker's bearer token.
pub const ENV_BROKER_TOKEN: &str = "TOKENWAL_BROKER_TOKEN";

/// The expected bearer token, kept only as its SHA-256 digest: comparing digests in constant time
/// leaks neither the token's bytes nor its length through timing.
pub struct Bearer {
    digest: [u8; 32],
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer(<redacted>)")
    }
}

impl Bearer {
    /// From `--token-file` if given (a file others can read is refused), else from
    /// [`ENV_BROKER_TOKEN`]. None, or an empty one, is a configuration error: the broker does not
    /// start without a bearer token.
    pub fn load(file: Option<&Path>) -> Result<Bearer, CliError> {
        let token = match file {
            Some(p) => read_private(p)?,
            None => std::env::var(ENV_BROKER_TOKEN).map_err(|_| {
                CliError::Config(format!(
                    "no broker token: set {ENV_BROKER_TOKEN} or pass --token-file FILE (mode 0600); the broker \
                     never serves without one"
                ))
            })?,
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(CliError::Config("the broker token is empty".into()));
        }
        if token.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(CliError::Config("the broker token contains whitespace or control characters".into()));
        }
        if token.len() < 16 {
            tracing::warn!(
                "the broker token is shorter than 16 characters: use a long random one (openssl rand -hex 32)"
            );
        }
        Ok(Bearer::new(token))
    }

    /// The bearer `token`.
    pub fn new(token: &str) -> Bearer {
        Bearer { digest: Sha256::digest(token.as_bytes()).into() }
    }

    /// Whether an `Authorization` header value is `Bearer <the token>`.
    pub fn accepts(&self, header: Option<&[u8]>) -> bool {
        let Some(h) = header else { return false };
        let Some(given) = strip_scheme(h) else { return false };
        let d: [u8; 32] = Sha256::digest(given).into();
        d.ct_eq(&self.digest).into()
    }
}

/// The credentials after a case-insensitive `Bearer ` scheme.
fn strip_scheme(h: &[u8]) -> Option<&[u8]> {
    if h.len() < 7 || !h[..7].eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let rest = &h[7..];
    let start = rest.iter().position(|b| *b != b' ')?;
    Some(&rest[start..])
}

#[cfg(unix)]
fn read_private(p: &Path) -> Result<String, CliError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(p)
        .map_err(|e| CliError::Config(format!("cannot read the broker token file {}: {e}", p.display())))?;
    if meta.permissions().mode() & 0o007 != 0 {
        return Err(CliError::Config(format!(
            "the broker token file {} is accessible to other users (mode {:o}): chmod 600 it",
            p.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    read(p)
}

#[cfg(not(unix))]
fn read_private(p: &Path) -> Result<String, CliError> {
    read(p)
}

fn read(p: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(p)
        .map_err(|e| CliError::Config(format!("cannot read the broker token file {}: {e}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_accepted() {
        let b = Bearer::new("s3cret-broker-token");
        assert!(b.accepts(Some(b"Bearer s3cret-broker-token")));
        assert!(b.accepts(Some(b"bearer s3cret-broker-token")));
        for bad in [
            &b"Bearer s3cret-broker-tokem"[..],
            b"Bearer s3cret-broker-token2",
            b"Bearer ",
            b"Basic s3cret-broker-token",
            b"s3cret-broker-token",
            b"",
        ] {
            assert!(!b.accepts(Some(bad)), "{}", String::from_utf8_lossy(bad));
        }
        assert!(!b.accepts(None));
        assert!(!format!("{b:?}").contains("s3cret"));
    }
}
