//! Where the broker listens: a Unix socket created with mode 0600 (the default), or a loopback TCP
//! address. Anything else is refused before binding.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::CliError;

/// `--listen`: `unix:PATH` or `tcp:ADDR:PORT` (loopback only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP address (must be loopback: [`Listen::check`]).
    Tcp(SocketAddr),
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Listen, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a path, e.g. unix:/run/my-app/tokenwal.sock".into());
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            return a.parse::<SocketAddr>().map(Listen::Tcp).map_err(|_| {
                format!("tcp:{a} is not an IP address and port, e.g. tcp:127.0.0.1:8787 (host names are not resolved)")
            });
        }
        Err("expected unix:PATH or tcp:127.0.0.1:PORT".into())
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl Listen {
    /// The default: `$XDG_RUNTIME_DIR/tokenwal.sock` when that directory is set, else the store
    /// directory's path with `.sock` appended (`/var/lib/app/tokenwal` → `/var/lib/app/tokenwal.sock`).
    pub fn default_for(db: &Path) -> Listen {
        let runtime = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).filter(|p| p.is_absolute());
        match runtime {
            Some(dir) => Listen::Unix(dir.join("tokenwal.sock")),
            None => {
                let mut s = db.as_os_str().to_owned();
                s.push(".sock");
                Listen::Unix(PathBuf::from(s))
            }
        }
    }

    /// Refuses a non-loopback TCP address, with the reason.
    pub fn check(&self) -> Result<(), CliError> {
        match self {
            Listen::Tcp(a) if !a.ip().is_loopback() => Err(CliError::Usage(format!(
                "refusing to listen on tcp:{a}: not a loopback address. The broker hands out live access tokens to \
                 whoever holds its bearer token, and over TCP that bearer travels in clear text: it must only be \
                 reachable from this machine. Use a Unix socket (--listen unix:PATH, the default) or \
                 tcp:127.0.0.1:PORT"
            ))),
            _ => Ok(()),
        }
    }

    /// Binds. Needs a Tokio runtime. A Unix socket is created with mode 0600 without a moment at a
    /// wider mode; a stale socket file (nobody listening) is replaced, a live one is refused.
    pub fn bind(&self) -> Result<Bound, CliError> {
        match self {
            Listen::Tcp(a) => {
                let l =
                    std::net::TcpListener::bind(a).map_err(|e| CliError::io(format!("cannot listen on tcp:{a}"), e))?;
                l.set_nonblocking(true).map_err(|e| CliError::io("cannot set the listener non-blocking", e))?;
                let addr = l.local_addr().map_err(|e| CliError::io("cannot read the bound address", e))?;
                let l = tokio::net::TcpListener::from_std(l)
                    .map_err(|e| CliError::io("cannot register the listener", e))?;
                Ok(Bound::Tcp(l, addr))
            }
            Listen::Unix(p) => bind_unix(p),
        }
    }
}

/// A bound listener.
pub enum Bound {
    /// A Unix socket; the file is removed when the [`SocketFile`] is dropped.
    Unix(tokio::net::UnixListener, SocketFile),
    /// A TCP socket and its actual address (port 0 resolved).
    Tcp(tokio::net::TcpListener, SocketAddr),
}

impl Bound {
    /// What to print: `unix:/path` or `tcp:127.0.0.1:PORT`.
    pub fn describe(&self) -> String {
        match self {
            Bound::Unix(_, f) => format!("unix:{}", f.path.display()),
            Bound::Tcp(_, a) => format!("tcp:{a}"),
        }
    }
}

/// The socket file this process created: removed on drop if it is still ours (same inode).
pub struct SocketFile {
    path: PathBuf,
    #[cfg(unix)]
    ino: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            if let Ok(m) = std::fs::symlink_metadata(&self.path) {
                if (m.dev(), m.ino()) == self.ino {
                    let _ = std::fs::remove_file(&self.path);
                }
            }
        }
    }
}

#[cfg(unix)]
fn bind_unix(path: &Path) -> Result<Bound, CliError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let shown = path.display();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(CliError::Config(format!("{shown} exists and is not a socket: refusing to replace it")));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(CliError::Transient(format!(
                "another process is listening on unix:{shown} (is a broker already running?)"
            )));
        }
        std::fs::remove_file(path).map_err(|e| CliError::io(format!("cannot remove the stale socket {shown}"), e))?;
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    // Bind inside a fresh 0700 directory, tighten the socket to 0600, then move it into place: at no
    // moment can anyone but the owner connect.
    let staging = tempfile::Builder::new()
        .prefix(".tokenwal-serve-")
        .tempdir_in(&parent)
        .map_err(|e| CliError::io(format!("cannot create a private directory in {}", parent.display()), e))?;
    let tmp = staging.path().join("s");
    let l = std::os::unix::net::UnixListener::bind(&tmp)
        .map_err(|e| CliError::io(format!("cannot create the socket for {shown}"), e))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| CliError::io(format!("cannot set mode 0600 on the socket for {shown}"), e))?;
    std::fs::rename(&tmp, path).map_err(|e| CliError::io(format!("cannot move the socket to {shown}"), e))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| CliError::io(format!("cannot stat {shown}"), e))?;
    let file = SocketFile { path: path.to_owned(), ino: (meta.dev(), meta.ino()) };
    l.set_nonblocking(true).map_err(|e| CliError::io("cannot set the listener non-blocking", e))?;
    let l = tokio::net::UnixListener::from_std(l).map_err(|e| CliError::io("cannot register the listener", e))?;
    Ok(Bound::Unix(l, file))
}

#[cfg(not(unix))]
fn bind_unix(_path: &Path) -> Result<Bound, CliError> {
    Err(CliError::Usage("Unix sockets need a Unix system: use --listen tcp:127.0.0.1:PORT".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_and_only_loopback_passes() {
        assert_eq!("unix:/run/x.sock".parse::<Listen>(), Ok(Listen::Unix("/run/x.sock".into())));
        assert!("unix:".parse::<Listen>().is_err());
        assert!("tcp:localhost:80".parse::<Listen>().is_err());
        assert!("http://127.0.0.1:80".parse::<Listen>().is_err());
        for ok in ["tcp:127.0.0.1:0", "tcp:[::1]:8787", "tcp:127.3.4.5:1"] {
            ok.parse::<Listen>().unwrap().check().unwrap();
        }
        for bad in ["tcp:0.0.0.0:8787", "tcp:10.0.0.1:1", "tcp:[::]:1"] {
            let e = bad.parse::<Listen>().unwrap().check().unwrap_err().to_string();
            assert!(e.contains("not a loopback address"), "{e}");
        }
    }
}
