//! Where the store is, the app's credentials, and engine settings: from the environment and an
//! optional JSON config file, never from command-line arguments (they show up in `ps` and shell
//! history).
//!
//! # The config file (`--config FILE` or `TOKENWAL_CONFIG`)
//!
//! A JSON object; every key is optional and unknown keys are refused (a typo must not silently
//! fall back to a default):
//!
//! ```json
//! {
//!   "client_id": "your-api-key",
//!   "client_secret": "your-api-secret",
//!   "db": "/var/lib/my-app/tokenwal",
//!   "store_key_file": "/etc/my-app/tokenwal.key",
//!   "app_handle": "my-app",
//!   "login_url": "https://store.example/account/login?customer={customer_id}",
//!   "insecure_test_endpoint": "http://127.0.0.1:8080",
//!   "refresh_margin": "5m",
//!   "refresh_token_margin": "7d",
//!   "connect_timeout": "5s",
//!   "request_timeout": "30s",
//!   "max_wait": "10s",
//!   "max_concurrent_refreshes": 64,
//!   "recovery_budget": "5s",
//!   "webhook_url": "https://alerts.example.com/tokenwal",
//!   "webhook_secret": "a-long-random-string",
//!   "webhook_max_attempts": 10,
//!   "webhook_min_backoff": "1s",
//!   "webhook_max_backoff": "5m",
//!   "retention": "30d",
//!   "history_per_grant": 64,
//!   "compact_interval": "10m",
//!   "providers_file": "/etc/my-app/providers.toml",
//!   "provider": "shopify-admin"
//! }
//! ```
//!
//! Durations are strings with a unit (`ms`, `s`, `m`, `h`, `d`) or a number of seconds.
//! `TOKENWAL_CLIENT_ID` and `TOKENWAL_CLIENT_SECRET` override the file's credentials; `--db`
//! (or `TOKENWAL_DB`) overrides `db`; `--insecure-test-endpoint` overrides the file's endpoint.
//! `webhook_url` turns on the webhook sink of `tokenwal run` (see `docs/webhooks.md`); its signing
//! secret comes from `TOKENWAL_WEBHOOK_SECRET` or `webhook_secret`; an event is attempted
//! `webhook_max_attempts` times, `webhook_min_backoff` doubling up to `webhook_max_backoff` apart,
//! then kept as a dead letter (`tokenwal webhooks dead-letters`, `tokenwal webhooks replay`).
//! `retention`, `history_per_grant` and `compact_interval` set the background compaction of `run`
//! (journal records older than `retention` go; each grant keeps its newest `history_per_grant`
//! records whatever their age) and what `tokenwal compact` does now (`history_per_grant` is at
//! least 1).
//! `provider` names the provider profile the engine serves (default: none, which is exactly
//! `shopify-admin`, today's behaviour); `providers_file` (or `TOKENWAL_PROVIDERS`) is a TOML file of
//! profiles (crate::providers): new providers, and settings of the built-in `shopify-admin` and
//! `shopify-customer-account`. A profile whose `client_auth` is `none` (a public client) needs no
//! client secret. `refresh_margin` in this file overrides the profile's `refresh_buffer`.
//! A file that holds a client secret should be readable by its owner only: tokenwal warns otherwise.
//!
//! # The store key
//!
//! The store is sealed under a key from `TOKENWAL_STORE_KEY` (base64 of 32 bytes), else the key
//! file named by `TOKENWAL_STORE_KEY_FILE`, else the config file's `store_key_file`. Never an
//! argument. No key is a configuration error (exit 78), never an unencrypted store; a world-readable
//! key file is refused. `tokenwal keygen FILE` makes one (see docs/security.md).

use crate::error::CliError;
use crate::providers::Providers;
use serde::{Deserialize, Deserializer};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokenwal::core::protocol::{ClientAuth, ProviderSpec};
use tokenwal::core::{ClientSecret, FingerprintKey, Machine, ProviderProfile};
use tokenwal::store::keys::{KEY_ENV, KEY_FILE_ENV};
use tokenwal::store::StoreError;
use tokenwal::{Config, KeyRing, KeySource, StoreLocation};
use tokenwal_sim::SimDuration;
use url::Url;

/// Environment variable of the app's client id.
pub const ENV_CLIENT_ID: &str = "TOKENWAL_CLIENT_ID";
/// Environment variable of the app's client secret.
pub const ENV_CLIENT_SECRET: &str = "TOKENWAL_CLIENT_SECRET";
/// Environment variable of the provider profiles file (overrides `providers_file`).
pub const ENV_PROVIDERS: &str = "TOKENWAL_PROVIDERS";
/// Environment variable of the webhook sink's signing secret.
pub const ENV_WEBHOOK_SECRET: &str = "TOKENWAL_WEBHOOK_SECRET";

/// The config file's contents.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    client_id: Option<String>,
    client_secret: Option<String>,
    db: Option<PathBuf>,
    store_key_file: Option<PathBuf>,
    app_handle: Option<String>,
    /// The re-login link of grants that are not Admin API shops (`{account}`, `{shop_id}`,
    /// `{customer_id}` replaced): in webhook events and `shops`.
    login_url: Option<String>,
    insecure_test_endpoint: Option<String>,
    #[serde(default, deserialize_with = "duration")]
    refresh_margin: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    refresh_token_margin: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    request_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    max_wait: Option<Duration>,
    max_concurrent_refreshes: Option<usize>,
    /// How long the engine's open waits for recovery before serving (the rest goes on in the
    /// background).
    #[serde(default, deserialize_with = "duration")]
    recovery_budget: Option<Duration>,
    webhook_url: Option<String>,
    webhook_secret: Option<String>,
    webhook_max_attempts: Option<u32>,
    #[serde(default, deserialize_with = "duration")]
    webhook_min_backoff: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    webhook_max_backoff: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    retention: Option<Duration>,
    history_per_grant: Option<usize>,
    #[serde(default, deserialize_with = "duration")]
    compact_interval: Option<Duration>,
    providers_file: Option<PathBuf>,
    provider: Option<String>,
}

/// A duration: `"90s"`-style string or a number of seconds.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(f64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Secs(s)) if (0.0..1e12).contains(&s) => Ok(Some(Duration::from_secs_f64(s))),
        Some(Raw::Secs(_)) => Err(serde::de::Error::custom("a duration in seconds must be a non-negative number")),
        Some(Raw::Text(t)) => t.parse::<SimDuration>().map(|d| Some(d.to_std())).map_err(serde::de::Error::custom),
    }
}

/// Everything resolved from flags, environment and config file.
pub struct Settings {
    /// The store directory (for a PostgreSQL store: its URL, as given; see [`Settings::postgres`]).
    pub db: PathBuf,
    /// The PostgreSQL store, when `db` is a `postgres://` or `postgresql://` URL.
    pg: Option<tokenwal::store::PgLocation>,
    /// `--skip-corrupt-records`: read histories under [`tokenwal::store::RecoveryMode::SkipCorruptRecords`].
    pub skip_corrupt_records: bool,
    file: ConfigFile,
    test_endpoint: Option<Url>,
    profile: Option<ProviderProfile>,
}

/// The platform's data directory for tokenwal: `$XDG_DATA_HOME/tokenwal` or
/// `~/.local/share/tokenwal` (Linux and other unixes), `~/Library/Application Support/tokenwal`
/// (macOS), `%APPDATA%\tokenwal` (Windows).
pub fn default_db() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if cfg!(windows) {
        return env("APPDATA").map(|p| p.join("tokenwal"));
    }
    if cfg!(target_os = "macos") {
        return env("HOME").map(|h| h.join("Library/Application Support/tokenwal"));
    }
    env("XDG_DATA_HOME")
        .filter(|p| p.is_absolute())
        .map(|p| p.join("tokenwal"))
        .or_else(|| env("HOME").map(|h| h.join(".local/share/tokenwal")))
}

impl Settings {
    /// Resolves settings: `db` and `endpoint` from the command line (or their environment
    /// variables), the rest from the config file.
    pub fn load(db: Option<PathBuf>, config: Option<&Path>, endpoint: Option<Url>) -> Result<Settings, CliError> {
        let file = match config {
            Some(p) => read_config(p)?,
            None => ConfigFile::default(),
        };
        if let Some(t) = &file.login_url {
            tokenwal::webhook_sink::check_login_url(t).map_err(CliError::Config)?;
        }
        let db = db
            .or_else(|| file.db.clone())
            .or_else(default_db)
            .ok_or_else(|| CliError::Config("cannot find a data directory: pass --db PATH".into()))?;
        let test_endpoint = match (endpoint, &file.insecure_test_endpoint) {
            (Some(u), _) => Some(u),
            (None, Some(s)) => {
                Some(Url::parse(s).map_err(|e| CliError::Config(format!("insecure_test_endpoint is not a URL: {e}")))?)
            }
            (None, None) => None,
        };
        let pg = match db.to_str() {
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                Some(tokenwal::store::PgLocation::parse(u).map_err(|e| CliError::Config(e.to_string()))?)
            }
            _ => None,
        };
        let profile = load_profile(&file)?;
        if let (Some(p), Some(_)) = (&profile, &test_endpoint) {
            if !p.is_shopify_admin() {
                return Err(CliError::Config(format!(
                    "insecure_test_endpoint is for the Admin API; profile {} has its own token_url (a loopback \
                     http URL is allowed there)",
                    p.name
                )));
            }
        }
        Ok(Settings { db, pg, skip_corrupt_records: false, file, test_endpoint, profile })
    }

    /// The provider profile named by `provider` in the config file, if any (none: Shopify's Admin
    /// API as always).
    pub fn profile(&self) -> Option<&ProviderProfile> {
        self.profile.as_ref()
    }

    fn public_client(&self) -> bool {
        matches!(
            &self.profile,
            Some(ProviderProfile { spec: ProviderSpec::OAuth2 { client_auth: ClientAuth::Public, .. }, .. })
        )
    }

    /// The PostgreSQL store, if `--db` names one.
    pub fn postgres(&self) -> Option<&tokenwal::store::PgLocation> {
        self.pg.as_ref()
    }

    /// The store for logs and messages: the directory, or the URL with its password replaced.
    pub fn db_display(&self) -> String {
        match &self.pg {
            Some(l) => l.to_string(),
            None => self.db.display().to_string(),
        }
    }

    /// The app handle named in the config file, if any (a label for output).
    pub fn app_handle(&self) -> Option<&str> {
        self.file.app_handle.as_deref()
    }

    /// The re-login link template of non-Admin grants named in the config file, if any.
    pub fn login_url(&self) -> Option<&str> {
        self.file.login_url.as_deref()
    }

    /// Where the store keys come from: the environment ([`KEY_ENV`], [`KEY_FILE_ENV`]) first, then
    /// the config file's `store_key_file`.
    pub fn key_source(&self) -> KeySource {
        let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
        match &self.file.store_key_file {
            Some(p) if !set(KEY_ENV) && !set(KEY_FILE_ENV) => KeySource::File(p.clone()),
            _ => KeySource::Env,
        }
    }

    /// The store key ring (see [`Settings::key_source`]). A missing key is an error, never a
    /// plaintext store.
    pub fn keys(&self) -> Result<KeyRing, CliError> {
        Ok(self.key_source().load().map_err(StoreError::Key)?)
    }

    /// The app's credentials: environment first, then the config file.
    pub fn credentials(&self) -> Result<(String, ClientSecret), CliError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let id = env(ENV_CLIENT_ID).or_else(|| self.file.client_id.clone());
        let secret = env(ENV_CLIENT_SECRET).or_else(|| self.file.client_secret.clone());
        match (id, secret) {
            (Some(id), Some(secret)) => Ok((id, ClientSecret::new(secret))),
            // A public client has no secret; none is ever sent (a configured one is ignored).
            (Some(id), None) if self.public_client() => Ok((id, ClientSecret::new(String::new()))),
            _ => Err(CliError::Config(format!(
                "app credentials missing: set {ENV_CLIENT_ID} and {ENV_CLIENT_SECRET}, or client_id and \
                 client_secret in a --config file (never on the command line)"
            ))),
        }
    }

    /// The engine configuration: credentials, endpoint, margins and timeouts.
    pub fn engine_config(&self, proactive: bool) -> Result<Config, CliError> {
        let (id, secret) = self.credentials()?;
        let store = match &self.pg {
            Some(l) => StoreLocation::Postgres(Box::new(l.clone())),
            None => StoreLocation::Path(self.db.clone()),
        };
        let mut c = Config::shopify(store, id, secret).with_store_keys(KeySource::Ring(self.keys()?));
        if let Some(p) = &self.profile {
            c = c.with_profile(p.clone());
        }
        if let Some(u) = &self.test_endpoint {
            c = c.with_insecure_test_endpoint(u.clone());
        }
        c.proactive = proactive;
        let f = &self.file;
        if let Some(d) = f.refresh_margin {
            c.refresh_margin = d;
        }
        if let Some(d) = f.refresh_token_margin {
            c.refresh_token_margin = d;
        }
        if let Some(d) = f.connect_timeout {
            c.timeouts.connect = d;
        }
        if let Some(d) = f.request_timeout {
            c.timeouts.total = d;
        }
        if let Some(d) = f.max_wait {
            c.max_wait = d;
        }
        if let Some(n) = f.max_concurrent_refreshes {
            c.max_concurrent_refreshes = n;
        }
        if let Some(d) = f.recovery_budget {
            c.recovery_budget = d;
        }
        c.webhook = self.webhook_config()?;
        c.compaction = Some(self.compaction()?);
        Ok(c)
    }

    /// The journal's compaction settings (the engine's defaults, overridden by the file).
    pub fn compaction(&self) -> Result<tokenwal::Compaction, CliError> {
        let f = &self.file;
        let mut c = tokenwal::Compaction::default();
        if let Some(d) = f.retention {
            c.retention = d;
        }
        if let Some(n) = f.history_per_grant {
            if n == 0 {
                return Err(CliError::Config("history_per_grant must be at least 1".into()));
            }
            c.history_per_grant = n;
        }
        if let Some(d) = f.compact_interval {
            if d.is_zero() {
                return Err(CliError::Config("compact_interval must be more than 0s".into()));
            }
            c.interval = d;
        }
        Ok(c)
    }

    /// The webhook sink's settings (`None` without `webhook_url`), validated: URL, signing secret
    /// (environment first), app handle, attempts and backoff. Needs no app credentials.
    pub fn webhook_config(&self) -> Result<Option<tokenwal::WebhookConfig>, CliError> {
        let f = &self.file;
        let Some(u) = &f.webhook_url else { return Ok(None) };
        let url = Url::parse(u).map_err(|e| CliError::Config(format!("webhook_url is not a URL: {e}")))?;
        let secret = std::env::var(ENV_WEBHOOK_SECRET)
            .ok()
            .filter(|v| !v.is_empty())
            .or_else(|| f.webhook_secret.clone())
            .ok_or_else(|| {
                CliError::Config(format!(
                    "webhook_url needs a signing secret: set {ENV_WEBHOOK_SECRET} or webhook_secret"
                ))
            })?;
        let mut w = tokenwal::WebhookConfig::new(url, ClientSecret::new(secret));
        w.app_handle = f.app_handle.clone();
        w.login_url = f.login_url.clone();
        if let Some(n) = f.webhook_max_attempts {
            w.max_attempts = n;
        }
        if let Some(d) = f.webhook_min_backoff {
            w.min_backoff = d;
        }
        if let Some(d) = f.webhook_max_backoff {
            w.max_backoff = d;
        }
        w.validate().map_err(CliError::Config)?;
        Ok(Some(w))
    }

    /// The state machine as the engine would configure it (for dry runs and due times; needs no
    /// credentials).
    pub fn machine(&self, key: FingerprintKey) -> Machine {
        let mut m = Machine::shopify(key);
        if let Some(p) = &self.profile {
            m.policy = p.retry_policy();
            m.refresh_margin = p.refresh_buffer;
        }
        if let Some(d) = self.file.refresh_margin {
            m.refresh_margin = d;
        }
        if let Some(d) = self.file.refresh_token_margin {
            m.refresh_token_margin = d;
        }
        m
    }
}

/// The profile `provider` names, from `TOKENWAL_PROVIDERS` or `providers_file` (or the built-ins).
fn load_profile(file: &ConfigFile) -> Result<Option<ProviderProfile>, CliError> {
    let path = std::env::var_os(ENV_PROVIDERS)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| file.providers_file.clone());
    let providers = match &path {
        Some(p) => Providers::load(p)?,
        None => Providers::default(),
    };
    match &file.provider {
        Some(name) => Ok(Some(providers.get(name)?.clone())),
        None => Ok(None),
    }
}

fn read_config(path: &Path) -> Result<ConfigFile, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Config(format!("cannot read config file {}: {e}", path.display())))?;
    let file: ConfigFile = serde_json::from_str(&text)
        .map_err(|e| CliError::Config(format!("config file {} is not valid: {e}", path.display())))?;
    if file.client_secret.is_some() || file.webhook_secret.is_some() {
        warn_if_shared(path);
    }
    Ok(file)
}

#[cfg(unix)]
fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                "config file holds a client secret but is readable by others: chmod 600 it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_shared(_path: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_parses_durations_and_refuses_unknown_keys() {
        let f: ConfigFile = serde_json::from_str(
            r#"{"client_id":"a","refresh_margin":"90s","request_timeout":2.5,"max_concurrent_refreshes":3}"#,
        )
        .unwrap();
        assert_eq!(f.refresh_margin, Some(Duration::from_secs(90)));
        assert_eq!(f.request_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(f.max_concurrent_refreshes, Some(3));
        assert!(serde_json::from_str::<ConfigFile>(r#"{"client_secrt":"x"}"#).is_err());
        assert!(serde_json::from_str::<ConfigFile>(r#"{"refresh_margin":"90"}"#).is_err());
        assert!(serde_json::from_str::<ConfigFile>(r#"{"refresh_margin":-1}"#).is_err());
    }

    #[test]
    fn recovery_budget_is_read_as_a_duration() {
        let f: ConfigFile = serde_json::from_str(r#"{"recovery_budget":"750ms"}"#).unwrap();
        assert_eq!(f.recovery_budget, Some(Duration::from_millis(750)));
        let f: ConfigFile = serde_json::from_str(r#"{"recovery_budget":0}"#).unwrap();
        assert_eq!(f.recovery_budget, Some(Duration::ZERO));
        assert!(serde_json::from_str::<ConfigFile>(r#"{"recovery_budget":"soon"}"#).is_err());
    }

    #[test]
    fn webhook_attempts_and_backoff_are_read_and_validated() {
        let settings = |json: &str| Settings {
            db: PathBuf::from("/nonexistent"),
            pg: None,
            skip_corrupt_records: false,
            file: serde_json::from_str(json).unwrap(),
            test_endpoint: None,
            profile: None,
        };
        let base = r#""webhook_url":"https://h.example.com/x","webhook_secret":"s""#;
        let w = settings(&format!(
            r#"{{{base},"webhook_max_attempts":3,"webhook_min_backoff":"50ms","webhook_max_backoff":"2s"}}"#
        ))
        .webhook_config()
        .unwrap()
        .unwrap();
        assert_eq!(
            (w.max_attempts, w.min_backoff, w.max_backoff),
            (3, Duration::from_millis(50), Duration::from_secs(2))
        );
        let defaults = settings(&format!("{{{base}}}")).webhook_config().unwrap().unwrap();
        assert_eq!(defaults.max_attempts, tokenwal::webhook_sink::DEFAULT_MAX_ATTEMPTS);
        assert_eq!(defaults.login_url, None);
        let login = r#""login_url":"https://store.example/login?c={customer_id}""#;
        let w = settings(&format!("{{{base},{login}}}")).webhook_config().unwrap().unwrap();
        assert_eq!(w.login_url.as_deref(), Some("https://store.example/login?c={customer_id}"));
        let err =
            settings(&format!(r#"{{{base},"login_url":"http://store.example/login"}}"#)).webhook_config().unwrap_err();
        assert!(err.to_string().contains("login_url"), "{err}");
        for bad in [r#""webhook_max_attempts":0"#, r#""webhook_min_backoff":"10s","webhook_max_backoff":"1s""#] {
            let err = settings(&format!("{{{base},{bad}}}")).webhook_config().unwrap_err();
            assert!(matches!(err, CliError::Config(_)), "{bad}: {err}");
        }
        assert!(settings("{}").webhook_config().unwrap().is_none());
    }
}

#[cfg(test)]
mod profile_tests {
    use super::*;

    fn settings(json: &str) -> Result<Settings, CliError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        Settings::load(Some(dir.path().join("db")), Some(&path), None)
    }

    #[test]
    fn no_provider_is_todays_admin_api() {
        let s = settings(r#"{"client_id":"a","client_secret":"b"}"#).unwrap();
        assert!(s.profile().is_none());
    }

    #[test]
    fn a_builtin_provider_needs_no_file_and_a_public_client_no_secret() {
        let s = settings(r#"{"client_id":"a","provider":"shopify-customer-account"}"#).unwrap();
        assert_eq!(s.profile(), Some(&ProviderProfile::shopify_customer_account()));
        let (id, secret) = s.credentials().unwrap();
        assert_eq!((id.as_str(), secret.expose_secret()), ("a", ""));
        let m = s.machine(FingerprintKey::from_bytes([1; 32]));
        assert_eq!(m.refresh_margin, Duration::from_secs(120));
        assert_eq!(m.policy, ProviderProfile::shopify_customer_account().retry_policy());
        // The Admin API still needs its secret.
        let s = settings(r#"{"client_id":"a","provider":"shopify-admin"}"#).unwrap();
        assert!(matches!(s.credentials(), Err(CliError::Config(_))));
    }

    #[test]
    fn a_profile_from_a_file_and_its_errors() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("providers.toml");
        std::fs::write(
            &toml,
            "[providers.idp]\ntoken_url = \"http://127.0.0.1:9/t\"\nclient_auth = \"client_secret_basic\"\n\
             rotation = \"non-rotating\"\nrefresh_buffer = \"1m\"\n",
        )
        .unwrap();
        let json = |provider: &str| {
            format!(r#"{{"client_id":"a","providers_file":{:?},"provider":"{provider}"}}"#, toml.to_str().unwrap())
        };
        let s = settings(&json("idp")).unwrap();
        assert_eq!(s.profile().unwrap().provider, "idp");
        assert_eq!(s.machine(FingerprintKey::from_bytes([1; 32])).refresh_margin, Duration::from_secs(60));
        let e = settings(&json("idq")).err().unwrap().to_string();
        assert!(e.contains("no provider profile \"idq\""), "{e}");
        std::fs::write(&toml, "[providers.idp]\nrotation = \"often\"\n").unwrap();
        let e = settings(&json("idp")).err().unwrap().to_string();
        assert!(e.contains("providers.toml") && e.contains("line 2"), "{e}");
    }
}
