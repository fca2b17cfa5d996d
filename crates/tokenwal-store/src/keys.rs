//! Store keys: the secret that seals every grant state and the fingerprint key at rest.
//!
//! A [`KeyRing`] holds the *active* key (every new seal uses it) and older keys that are still
//! accepted for reading, so a key can be rotated without downtime: prepend a new key, run
//! `tokenwal rekey` until no state remains under an old key id, then drop the old key.
//!
//! Keys come from the environment ([`KEY_ENV`]: base64 of 32 bytes), from a key file
//! ([`KEY_FILE_ENV`] or an explicit path), or — for in-memory stores, tests and demos — are
//! generated at random ([`KeyRing::ephemeral`]). There is no plaintext fallback: a missing key is a
//! [`KeyError::Missing`].
//!
//! ## Key file format
//!
//! UTF-8 text, one key per line as standard base64 of 32 bytes; blank lines and lines starting with
//! `#` are ignored. The first key is the active one, the others are read-only. The file must not be
//! world-accessible (`mode & 0o007 == 0`, else [`KeyError::UnsafePermissions`]); a group-readable
//! file is accepted with a warning. [`write_new_key_file`] and [`rotate_key_file`] create it 0600.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::RngCore;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Environment variable holding the active store key (standard base64 of 32 bytes).
pub const KEY_ENV: &str = "TOKENWAL_STORE_KEY";
/// Environment variable naming a key file.
pub const KEY_FILE_ENV: &str = "TOKENWAL_STORE_KEY_FILE";

/// Domain-separation label of key ids.
const KEY_ID_LABEL: &[u8] = b"tokenwal store key id v1";

/// One 32-byte store key. Zeroized on drop; `Debug` shows only its key id.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct StoreKey([u8; 32]);

impl StoreKey {
    /// Wraps 32 key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> StoreKey {
        StoreKey(bytes)
    }

    /// A new random key from the operating system's generator.
    pub fn generate() -> StoreKey {
        let mut b = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut b);
        let k = StoreKey(b);
        b.zeroize();
        k
    }

    /// **Tests only — the key is public.** The key of [`KeyRing::insecure_test_ring`]. Only with the
    /// `test-hooks` feature.
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn insecure_test_key() -> StoreKey {
        StoreKey(*b"tokenwal-insecure-test-key-32by!")
    }

    /// Parses standard base64 of exactly 32 bytes (surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<StoreKey, KeyError> {
        let bytes = Zeroizing::new(B64.decode(text.trim()).map_err(|_| KeyError::Malformed { what: "not base64" })?);
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Malformed { what: "not 32 bytes after base64 decoding" })?;
        Ok(StoreKey(arr))
    }

    /// The key as standard base64 (for writing a key file). The returned string is zeroized on drop.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(B64.encode(self.0))
    }

    /// The key bytes (for the AEAD).
    pub(crate) fn expose_secret(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key's id: the first 8 bytes of HMAC-SHA256(key, label). Identifies the key without
    /// revealing it.
    pub fn id(&self) -> KeyId {
        let full = tokenwal_core::mac::hmac_sha256(&self.0, &[KEY_ID_LABEL]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&full[..8]);
        KeyId(id)
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey(id {}, <redacted>)", self.id())
    }
}

/// The public id of a [`StoreKey`], stored in the clear with every ciphertext. Printed as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// The active key and the older keys still accepted for reading. `Debug` shows key ids only.
#[derive(Clone)]
pub struct KeyRing {
    /// `keys[0]` is active. Ids are distinct.
    keys: Vec<(KeyId, StoreKey)>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing").field("active", &self.active_id()).field("ids", &self.ids()).finish()
    }
}

impl KeyRing {
    /// A ring of one active key.
    pub fn new(active: StoreKey) -> KeyRing {
        KeyRing { keys: vec![(active.id(), active)] }
    }

    /// A ring whose first key is active and whose other keys are accepted for reading. Duplicates
    /// are dropped. `None` if `keys` is empty.
    pub fn from_keys(keys: impl IntoIterator<Item = StoreKey>) -> Option<KeyRing> {
        let mut out: Vec<(KeyId, StoreKey)> = Vec::new();
        for k in keys {
            let id = k.id();
            if !out.iter().any(|(i, _)| *i == id) {
                out.push((id, k));
            }
        }
        (!out.is_empty()).then_some(KeyRing { keys: out })
    }

    /// A ring of one new random key: for in-memory stores, tests and demos (what it sealed cannot
    /// be read once the ring is gone).
    pub fn ephemeral() -> KeyRing {
        KeyRing::new(StoreKey::generate())
    }

    /// **Tests only — the key is public.** A fixed ring, so a test can reopen a sled store (or hand
    /// the key to a child process through [`KEY_ENV`]) without plumbing a generated key around.
    /// Only with the `test-hooks` feature.
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn insecure_test_ring() -> KeyRing {
        KeyRing::new(StoreKey::insecure_test_key())
    }

    /// The same ring with `key` prepended as the new active key (the old active key stays readable).
    pub fn rotated(&self, key: StoreKey) -> KeyRing {
        KeyRing::from_keys(std::iter::once(key).chain(self.keys.iter().map(|(_, k)| k.clone()))).expect("not empty")
    }

    /// The ring without its older keys: what the key file should hold once `tokenwal rekey` reports
    /// nothing left under an old key.
    pub fn active_only(&self) -> KeyRing {
        KeyRing::new(self.keys[0].1.clone())
    }

    /// The same ring with every key of `older` appended as read-only keys.
    pub fn rotated_with_old(&self, older: &KeyRing) -> KeyRing {
        KeyRing::from_keys(self.keys.iter().chain(&older.keys).map(|(_, k)| k.clone())).expect("not empty")
    }

    /// The id of the active key.
    pub fn active_id(&self) -> KeyId {
        self.keys[0].0
    }

    /// The active key.
    pub(crate) fn active(&self) -> &StoreKey {
        &self.keys[0].1
    }

    /// Every key id, active first.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|(i, _)| *i).collect()
    }

    /// The key with this id.
    pub(crate) fn get(&self, id: KeyId) -> Option<&StoreKey> {
        self.keys.iter().find(|(i, _)| *i == id).map(|(_, k)| k)
    }

    /// Loads the ring from the environment: [`KEY_ENV`] (one key) if set and not empty, else the
    /// file named by [`KEY_FILE_ENV`]. Neither set is [`KeyError::Missing`].
    pub fn from_env() -> Result<KeyRing, KeyError> {
        if let Some(v) = std::env::var_os(KEY_ENV).filter(|v| !v.is_empty()) {
            let v = Zeroizing::new(v.into_string().map_err(|_| KeyError::Malformed { what: "not UTF-8" })?);
            return StoreKey::from_base64(&v).map(KeyRing::new);
        }
        match std::env::var_os(KEY_FILE_ENV) {
            Some(p) if !p.is_empty() => KeyRing::from_file(Path::new(&p)),
            _ => Err(KeyError::Missing),
        }
    }

    /// Loads the ring from a key file (see the module docs for the format). Refuses a
    /// world-accessible file; warns about a group-readable one.
    pub fn from_file(path: &Path) -> Result<KeyRing, KeyError> {
        let io = |source| KeyError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        check_mode(path, &file)?;
        let text = Zeroizing::new(io::read_to_string(file).map_err(io)?);
        parse_key_file(&text).map_err(|e| match e {
            KeyError::Malformed { what } => KeyError::MalformedFile { path: path.to_path_buf(), what },
            other => other,
        })
    }
}

/// Parses key-file text: active key first.
fn parse_key_file(text: &str) -> Result<KeyRing, KeyError> {
    let mut keys = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        keys.push(StoreKey::from_base64(line)?);
    }
    KeyRing::from_keys(keys).ok_or(KeyError::Malformed { what: "no key in the file" })
}

#[cfg(unix)]
fn check_mode(path: &Path, file: &File) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let mode =
        file.metadata().map_err(|source| KeyError::Io { path: path.to_path_buf(), source })?.permissions().mode();
    if mode & 0o007 != 0 {
        return Err(KeyError::UnsafePermissions { path: path.to_path_buf(), mode: mode & 0o777 });
    }
    if mode & 0o070 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "store key file is group-accessible; chmod 600 it");
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_path: &Path, _file: &File) -> Result<(), KeyError> {
    Ok(())
}

/// Where a store's keys come from.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum KeySource {
    /// [`KeyRing::from_env`]: [`KEY_ENV`], else the file named by [`KEY_FILE_ENV`]. The default.
    #[default]
    Env,
    /// [`KeyRing::from_file`].
    File(PathBuf),
    /// A ring the caller already holds.
    Ring(KeyRing),
}

impl KeySource {
    /// Loads the ring.
    pub fn load(&self) -> Result<KeyRing, KeyError> {
        match self {
            KeySource::Env => KeyRing::from_env(),
            KeySource::File(p) => KeyRing::from_file(p),
            KeySource::Ring(r) => Ok(r.clone()),
        }
    }
}

fn create_0600(path: &Path) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o.open(path)
}

fn write_keys(file: &mut File, keys: &[&StoreKey]) -> io::Result<()> {
    let mut text = Zeroizing::new(String::from(
        "# tokenwal store keys: the first is active, the others are read-only (see docs/security.md)\n",
    ));
    for k in keys {
        text.push_str(&k.to_base64());
        text.push('\n');
    }
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

fn sync_parent(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    if let Some(parent) = path.parent() {
        let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
        File::open(parent)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Creates a new key file at `path` (which must not exist) holding one random key, mode 0600.
/// Returns the new key's id.
pub fn write_new_key_file(path: &Path) -> Result<KeyId, KeyError> {
    let io = |source| KeyError::Io { path: path.to_path_buf(), source };
    let key = StoreKey::generate();
    let mut f = create_0600(path).map_err(io)?;
    write_keys(&mut f, &[&key]).map_err(io)?;
    sync_parent(path).map_err(io)?;
    Ok(key.id())
}

/// Prepends a new random active key to the key file at `path`, keeping the old keys readable.
/// Crash-safe: the new file is written 0600 beside it, synced, then renamed over it. Returns the
/// new ring.
pub fn rotate_key_file(path: &Path) -> Result<KeyRing, KeyError> {
    let old = KeyRing::from_file(path)?;
    let ring = old.rotated(StoreKey::generate());
    replace_key_file(path, &ring)?;
    Ok(ring)
}

/// Rewrites the key file at `path` to hold exactly `ring` (crash-safe: write beside, sync, rename).
pub fn replace_key_file(path: &Path, ring: &KeyRing) -> Result<(), KeyError> {
    let io = |source| KeyError::Io { path: path.to_path_buf(), source };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let mut f = create_0600(&tmp).map_err(io)?;
    let keys: Vec<&StoreKey> = ring.keys.iter().map(|(_, k)| k).collect();
    write_keys(&mut f, &keys).map_err(io)?;
    drop(f);
    fs::rename(&tmp, path).map_err(io)?;
    sync_parent(path).map_err(io)
}

/// Why store keys could not be loaded. Never carries key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// No key configured.
    #[error(
        "no store key: set {KEY_ENV} (base64 of 32 bytes) or {KEY_FILE_ENV} (a key file made by `tokenwal keygen`); \
         tokenwal never stores tokens unencrypted"
    )]
    Missing,
    /// The key text is not a key.
    #[error("malformed store key: {what}")]
    Malformed {
        /// What is wrong.
        what: &'static str,
    },
    /// A key file holds something that is not a key.
    #[error("malformed store key file {path:?}: {what}")]
    MalformedFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: &'static str,
    },
    /// The key file is readable or writable by other users.
    #[error("store key file {path:?} has mode {mode:o}, accessible to other users: refusing it (chmod 600 it)")]
    UnsafePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Reading or writing a key file failed.
    #[error("store key file {path:?}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_ids_never_show_the_key() {
        let k = StoreKey::from_bytes([7u8; 32]);
        let b64 = k.to_base64();
        let ring = KeyRing::new(k.clone());
        let shown = format!("{k:?} {ring:?} {}", ring.active_id());
        assert!(!shown.contains(b64.as_str()), "{shown}");
        assert!(!shown.contains("0707070707"), "{shown}");
        assert_eq!(ring.active_id(), k.id());
        assert_ne!(k.id(), StoreKey::from_bytes([8u8; 32]).id());
    }

    #[test]
    fn parses_key_files_active_first() {
        let a = StoreKey::generate();
        let b = StoreKey::generate();
        let text = format!(
            "# comment\n\n{}\n  {}  \n{}\n",
            a.to_base64().as_str(),
            b.to_base64().as_str(),
            a.to_base64().as_str()
        );
        let ring = parse_key_file(&text).unwrap();
        assert_eq!(ring.ids(), vec![a.id(), b.id()]);
        assert!(matches!(parse_key_file("# nothing\n"), Err(KeyError::Malformed { .. })));
        assert!(matches!(parse_key_file("AAAA\n"), Err(KeyError::Malformed { .. })));
        assert!(matches!(StoreKey::from_base64("not base64!"), Err(KeyError::Malformed { .. })));
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_0600_and_world_readable_ones_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.key");
        let id = write_new_key_file(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(write_new_key_file(&path), Err(KeyError::Io { .. })), "never overwrites");
        assert_eq!(KeyRing::from_file(&path).unwrap().active_id(), id);

        let ring = rotate_key_file(&path).unwrap();
        assert_eq!(ring.ids().len(), 2);
        assert_eq!(ring.ids()[1], id);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(KeyRing::from_file(&path).unwrap().ids(), ring.ids());

        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(KeyRing::from_file(&path).is_ok(), "group-readable: warned, accepted");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = KeyRing::from_file(&path).unwrap_err();
        assert!(matches!(err, KeyError::UnsafePermissions { mode: 0o644, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
}
