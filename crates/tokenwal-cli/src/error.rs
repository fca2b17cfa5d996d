//! The command's one error type, and the exit code each case maps to.
//!
//! | code | meaning | what a script does |
//! |---|---|---|
//! | 0 | success | — |
//! | 1 | failure: store I/O error, corrupt state, internal error; `migrate`: some shops failed definitively | look at stderr |
//! | 2 | usage: bad arguments, invalid shop domain, `export` without `--reveal-secrets` | fix the command line |
//! | 65 | `import` / `migrate`: at least one line was invalid (the valid ones were processed) | fix those lines, run again |
//! | 66 | no such shop in the store, no store at that path, or the shop is uninstalled | — |
//! | 70 | `demo`: tokenwal locked a shop out (a broken guarantee) | report a bug |
//! | 74 | `run`: the store failed a write or sync and fail-stopped (nothing further was sent) | restart it: recovery runs at open (a supervisor does this) |
//! | 75 | transient: refresh outcome unknown (being retried), token endpoint unavailable or throttling, store in use by another process; `migrate`: some shops not migrated yet | try again later |
//! | 77 | the shop needs re-auth: the merchant must open the app (token exchange) | alert someone |
//! | 78 | configuration: missing or rejected app credentials (`migrate` stops), bad config file | fix the configuration |

use std::path::PathBuf;
use std::process::ExitCode;
use tokenwal::store::StoreError;

/// Exit code: generic failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: usage error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: invalid input data (`import`).
pub const EXIT_DATAERR: u8 = 65;
/// Exit code: no such shop / store.
pub const EXIT_NOINPUT: u8 = 66;
/// Exit code: tokenwal broke a guarantee (`demo`).
pub const EXIT_SOFTWARE: u8 = 70;
/// Exit code: `run`'s store fail-stopped after an I/O error (EX_IOERR); a restart runs recovery.
pub const EXIT_IOERR: u8 = 74;
/// Exit code: transient failure, try again later.
pub const EXIT_TEMPFAIL: u8 = 75;
/// Exit code: the shop needs re-auth.
pub const EXIT_NEEDS_REAUTH: u8 = 77;
/// Exit code: configuration error.
pub const EXIT_CONFIG: u8 = 78;

/// Why a command failed. Messages are short, lowercase, name the shop, and never contain a secret.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line is wrong.
    #[error("{0}")]
    Usage(String),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// Another process holds the store.
    #[error("store is in use by another process: is `tokenwal run` running? ({})", path.display())]
    Locked {
        /// The store directory.
        path: PathBuf,
    },
    /// There is no store at the path.
    #[error("no store at {}: import tokens first (`tokenwal import`) or pass --db", path.display())]
    NoStore {
        /// The store directory.
        path: PathBuf,
    },
    /// The shop is not in the store.
    #[error("{shop}: not in the store")]
    NotInstalled {
        /// The shop or grant.
        shop: String,
    },
    /// The app is uninstalled from the shop.
    #[error("{shop}: the app is uninstalled from this shop")]
    Uninstalled {
        /// The shop or grant.
        shop: String,
    },
    /// The shop's grant is dead.
    #[error("{shop}: needs re-auth ({reason}); the merchant must open the app")]
    NeedsReauth {
        /// The shop or grant.
        shop: String,
        /// Why.
        reason: String,
    },
    /// Try again later.
    #[error("{0}")]
    Transient(String),
    /// `import` found invalid lines (already reported one by one).
    #[error("{failed} of {total} lines were invalid and not imported")]
    ImportFailed {
        /// Invalid lines.
        failed: usize,
        /// All non-blank lines.
        total: usize,
    },
    /// `migrate` finished with failures, unresolved shops or invalid lines (already reported).
    #[error("{summary}")]
    Migration {
        /// The exit code (see `migrate`).
        code: u8,
        /// One line.
        summary: String,
    },
    /// `demo`: tokenwal locked shops out.
    #[error("tokenwal locked {0} shop(s) out: a broken guarantee, please report it")]
    DemoLockout(usize),
    /// `run`: the store failed a write or sync and fail-stopped.
    #[error(
        "store fail-stopped ({error}): no further token request was sent; exiting with status 74 so that a \
         restart runs recovery"
    )]
    FailStopped {
        /// What failed (an operation and an OS error; never a token).
        error: String,
    },
    /// A store error other than the lock.
    #[error("store: {0}")]
    Store(StoreError),
    /// A journal record failed its checks while reading a history (strict by default).
    #[error(
        "store: corrupt {what}: {detail}; refusing to read this history as is \
         (rerun with --skip-corrupt-records to skip and list corrupt journal records)"
    )]
    CorruptRecord {
        /// The record, e.g. `journal/42`.
        what: String,
        /// What the codec found.
        detail: String,
    },
    /// An engine error with no better category.
    #[error("{0}")]
    Engine(tokenwal::Error),
    /// An I/O error with context.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

impl CliError {
    /// The process exit code for this error (see the module table).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Config(_) => EXIT_CONFIG,
            CliError::Locked { .. } | CliError::Transient(_) => EXIT_TEMPFAIL,
            CliError::NoStore { .. } | CliError::NotInstalled { .. } | CliError::Uninstalled { .. } => EXIT_NOINPUT,
            CliError::NeedsReauth { .. } => EXIT_NEEDS_REAUTH,
            CliError::ImportFailed { .. } => EXIT_DATAERR,
            CliError::DemoLockout(_) => EXIT_SOFTWARE,
            CliError::FailStopped { .. } => EXIT_IOERR,
            CliError::Migration { code, .. } => *code,
            CliError::Store(_) | CliError::CorruptRecord { .. } | CliError::Engine(_) | CliError::Io { .. } => {
                EXIT_FAILURE
            }
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> CliError {
        CliError::Io { what: what.into(), source }
    }

    /// The `ExitCode` for this error.
    pub fn exit(&self) -> ExitCode {
        ExitCode::from(self.exit_code())
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> CliError {
        match e {
            StoreError::Locked { path } => CliError::Locked { path },
            // Another process has this grant's attempt in flight: try again in a moment.
            e @ StoreError::Busy { .. } => CliError::Transient(e.to_string()),
            // The operator's configuration or the database's set-up: say what to do.
            e @ (StoreError::InvalidLocation { .. }
            | StoreError::ForeignSchema { .. }
            | StoreError::SchemaTooNew { .. }
            | StoreError::MigrationNeeded { .. }) => CliError::Config(e.to_string()),
            StoreError::Corrupt { what, source } if what.starts_with("journal/") => {
                CliError::CorruptRecord { what, detail: source.to_string() }
            }
            // No key, a malformed or unsafe key file, the wrong key: the operator's configuration.
            e @ (StoreError::Key(_) | StoreError::KeyUnavailable { .. } | StoreError::PlaintextFormat { .. }) => {
                CliError::Config(e.to_string())
            }
            other => CliError::Store(other),
        }
    }
}

impl From<tokenwal::Error> for CliError {
    fn from(e: tokenwal::Error) -> CliError {
        use tokenwal::Error as E;
        match e {
            E::NotInstalled { grant } => CliError::NotInstalled { shop: grant.account().to_owned() },
            E::Uninstalled { grant } => CliError::Uninstalled { shop: grant.account().to_owned() },
            E::NeedsReauth { grant, reason } => {
                CliError::NeedsReauth { shop: grant.account().to_owned(), reason: reason.to_string() }
            }
            E::AppCredentialsRejected { .. } => CliError::Config(format!(
                "{e}; check TOKENWAL_CLIENT_ID / TOKENWAL_CLIENT_SECRET (no shop was marked for re-auth)"
            )),
            E::Store(s) => s.into(),
            E::InvalidShop(s) => CliError::Usage(format!("invalid shop domain: {s}")),
            E::Config(c) => CliError::Config(c),
            e if e.is_transient() => CliError::Transient(e.to_string()),
            E::ShuttingDown => CliError::Transient(e.to_string()),
            other => CliError::Engine(other),
        }
    }
}
