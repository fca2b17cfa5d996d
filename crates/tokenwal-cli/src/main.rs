//! `tokenwal`: the command-line face of the tokenwal engine.
//!
//! ## Layout
//!
//! * `main` — the command line (clap derive), logging, dispatch, exit codes.
//! * `settings` — store path, credentials (environment or a JSON config file, never arguments).
//! * `commands` — import, run, status, shops, inspect, recover, token, export, sim, keygen, rekey.
//! * `serve` — `tokenwal serve`: the local token broker (HTTP over a Unix socket, docs/broker.md).
//! * `dead_letters` — `webhooks dead-letters` and `webhooks replay`: what the webhook sink gave up on.
//! * `migrate` — bulk migration of legacy non-expiring tokens (resumable, rate-limited, canary).
//! * `import` — the JSON-lines token-set format shared by `import` and `export`.
//! * `views` — secret-free views of states and journal records (tables and JSON).
//! * `demo` — the simulator, the engine under faults and crashes, and a naive baseline.
//! * `error` — the error type and its exit codes.

#![forbid(unsafe_code)]

mod commands;
mod dead_letters;
mod demo;
mod error;
mod import;
mod input;
mod migrate;
mod providers;
mod serve;
mod settings;
mod timefmt;
mod views;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use tokenwal_sim::{SimConfig, SimDuration};
use url::Url;

use crate::error::CliError;
use crate::settings::Settings;

const AFTER_LONG_HELP: &str = "\
CREDENTIALS
  The app's client id and secret come from TOKENWAL_CLIENT_ID and TOKENWAL_CLIENT_SECRET, or from
  client_id / client_secret in a JSON --config file (environment wins). Never from arguments: they
  would show up in `ps` and shell history. Only run, serve, recover and token need them.

STORE KEY
  Every token in the store is encrypted (XChaCha20-Poly1305) under a store key from TOKENWAL_STORE_KEY
  (base64 of 32 bytes), else the key file named by TOKENWAL_STORE_KEY_FILE, else store_key_file in
  the config file. Never an argument. No key is an error (exit 78), never an unencrypted store; a
  world-readable key file is refused. Make one with `tokenwal keygen FILE`; rotate with
  `tokenwal keygen --rotate FILE` then `tokenwal rekey`. The demo needs none (ephemeral key).

CONFIG FILE (--config FILE or TOKENWAL_CONFIG), JSON, every key optional, unknown keys refused:
  {\"client_id\": \"...\", \"client_secret\": \"...\", \"db\": \"/var/lib/app/tokenwal\",
   \"store_key_file\": \"/etc/app/tokenwal.key\",
   \"app_handle\": \"my-app\", \"login_url\": \"https://store.example/login?customer={customer_id}\",
   \"insecure_test_endpoint\": \"http://127.0.0.1:8080\",
   \"refresh_margin\": \"5m\", \"refresh_token_margin\": \"7d\", \"connect_timeout\": \"5s\",
   \"request_timeout\": \"30s\", \"max_wait\": \"10s\", \"max_concurrent_refreshes\": 64,
   \"recovery_budget\": \"5s\", \"webhook_url\": \"https://...\", \"webhook_secret\": \"...\", \"webhook_max_attempts\": 10,
   \"webhook_min_backoff\": \"1s\", \"webhook_max_backoff\": \"5m\"}
  webhook_url: tokenwal run POSTs needs_reauth / recovered / app_credentials_rejected events there,
  signed with TOKENWAL_WEBHOOK_SECRET (or webhook_secret); see docs/webhooks.md. An event refused
  webhook_max_attempts times becomes a dead letter: `tokenwal webhooks dead-letters`, `... replay`.
  Durations: a string with a unit (ms, s, m, h, d) or a number of seconds.
  provider: the provider profile to serve (default: Shopify's Admin API, as always);
  providers_file (or TOKENWAL_PROVIDERS): a TOML file of profiles (docs/providers.md). With a
  profile other than shopify-admin, `token` takes and `import` lines carry an `account` of that
  provider (shopify-customer-account: SHOP_ID:CUSTOMER_ID); a public client needs no secret.

ONE PROCESS PER STORE DIRECTORY; A POSTGRESQL STORE IS SHARED
  A store directory is locked by whichever command has it open: while `tokenwal run` (or `serve`) runs,
  the other commands answer \"store is in use by another process\" (exit 75). A PostgreSQL store
  (--db postgres://...) is shared: any number of run/serve processes on any hosts, and the other
  commands beside them (docs/journal.md, \"PostgreSQL\").

EXIT CODES
   0  success
   1  failure (store I/O error, corrupt state, internal error; migrate: some shops failed)
   2  usage error (bad arguments, invalid shop domain, export without --reveal-secrets)
  65  import, migrate: some lines were invalid (the valid ones were processed)
  66  no such shop in the store, no store at --db, or the app is uninstalled from the shop
  70  demo: tokenwal locked a shop out (a broken guarantee)
  74  run: the store failed a write or sync and fail-stopped; restart it (recovery runs at open)
      (serve too)
  75  transient, try again later: refresh outcome unknown and being retried, token endpoint
      unavailable or throttling, store in use by another process; migrate: shops left to resume
  77  the shop needs re-auth: the merchant must open the app (token exchange)
  78  configuration: credentials missing or rejected (invalid_client), bad config file, store key
      missing, unsafe (world-readable) or wrong

EXAMPLES
  tokenwal demo                                  # no Shopify account needed, about a minute
  tokenwal import tokens.jsonl                   # then: tokenwal status
  TOKENWAL_CLIENT_ID=... TOKENWAL_CLIENT_SECRET=... tokenwal run
  TOKENWAL_BROKER_TOKEN=... tokenwal serve --listen unix:/run/app/tokenwal.sock   # the local token broker
  tokenwal token my-shop.myshopify.com           # for scripts: token on stdout";

/// Crash-safe rotating OAuth refresh tokens (Shopify expiring offline tokens).
///
/// Every refresh writes an intent to a journal and syncs it before the request leaves, and commits
/// the new pair durably before anyone uses it; after a crash or a lost answer, recovery retries the
/// old refresh token instead of locking the shop out.
#[derive(Parser)]
#[command(name = "tokenwal", version, after_long_help = AFTER_LONG_HELP, max_term_width = 110)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// The store directory [default: the platform data dir, e.g. ~/.local/share/tokenwal]
    #[arg(long, global = true, env = "TOKENWAL_DB", value_name = "PATH", help_heading = "Global options")]
    db: Option<PathBuf>,
    /// A JSON config file: credentials, endpoint, margins, timeouts (see --help)
    #[arg(long, global = true, env = "TOKENWAL_CONFIG", value_name = "FILE", help_heading = "Global options")]
    config: Option<PathBuf>,
    /// Log to stderr: -v info, -vv debug, -vvv trace (RUST_LOG overrides). Secrets are never logged
    #[arg(short, long, global = true, action = ArgAction::Count, help_heading = "Global options")]
    verbose: u8,
    /// TEST ONLY: send token requests to this loopback simulator instead of Shopify
    #[arg(
        long,
        global = true,
        env = "TOKENWAL_INSECURE_TEST_ENDPOINT",
        value_name = "URL",
        help_heading = "Global options"
    )]
    insecure_test_endpoint: Option<Url>,
    /// Skip (and list) journal records that fail their checks instead of refusing to read a
    /// history. Corrupt grant states are never served either way
    #[arg(long, global = true, help_heading = "Global options")]
    skip_corrupt_records: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Import existing token sets (JSON lines) into the store
    #[command(long_about = IMPORT_ABOUT)]
    Import {
        /// The file to read, or - for stdin
        #[arg(default_value = "-", value_name = "FILE|-")]
        file: String,
        /// Install a line's pair even if the store holds a newer one (needs --reason)
        #[arg(long, requires = "reason")]
        force: bool,
        /// Why the held pairs are known dead (required with --force; logged)
        #[arg(long, value_name = "TEXT", requires = "force")]
        reason: Option<String>,
        /// Also print a JSON summary on stdout: counts, and per line its grant, outcome and why
        #[arg(long)]
        json: bool,
    },
    /// Migrate legacy non-expiring offline tokens (JSON lines {shop, access_token}) to expiring pairs
    #[command(long_about = MIGRATE_ABOUT)]
    Migrate {
        /// The file to read, or - for stdin
        #[arg(default_value = "-", value_name = "FILE|-")]
        file: String,
        /// Shops migrated at once
        #[arg(long, default_value_t = 4, value_name = "N")]
        concurrency: usize,
        /// Token requests per second across all workers (0: unlimited); a 429 pauses every worker
        /// for its Retry-After
        #[arg(long, default_value_t = 10.0, value_name = "PER_SECOND")]
        rate: f64,
        /// Migrate a sample first (N shops or P% of them, in file order), then stop unless --yes
        #[arg(long, value_name = "N|P%")]
        canary: Option<migrate::Canary>,
        /// Continue past a clean canary without asking
        #[arg(long)]
        yes: bool,
        /// Print what would be done (from the store alone); send and write nothing, no credentials needed
        #[arg(long)]
        dry_run: bool,
        /// Attempts per shop in this run for retryable failures (throttled, outcome unknown, not sent)
        #[arg(long, default_value_t = 20, value_name = "N")]
        max_attempts: u32,
        /// The longest wait before one shop's next attempt
        #[arg(long, default_value = "30s", value_name = "DURATION")]
        max_retry_wait: SimDuration,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Run the refresh worker: recovery, then keep every shop fresh until SIGINT/SIGTERM
    #[command(long_about = RUN_ABOUT)]
    Run {
        /// Recover, refresh every shop that is due, and exit (for cron and tests)
        #[arg(long)]
        once: bool,
        /// How often a full sweep double-checks for due shops the scheduler has not picked up
        #[arg(long, default_value = "5m", value_name = "DURATION")]
        sweep: SimDuration,
        /// On SIGINT/SIGTERM, how long to let refreshes in flight finish (the rest stay journaled
        /// and are resolved by recovery at the next start); a second signal stops at once
        #[arg(long, default_value = "5s", value_name = "DURATION")]
        grace: SimDuration,
    },
    /// Run the local token broker: HTTP over a Unix socket (or loopback TCP) for apps in any language
    #[command(long_about = SERVE_ABOUT)]
    Serve {
        /// Where to listen: unix:PATH (mode 0600) or tcp:127.0.0.1:PORT (loopback only)
        /// [default: unix:$XDG_RUNTIME_DIR/tokenwal.sock, else unix:DB.sock next to the store]
        #[arg(long, value_name = "unix:PATH|tcp:ADDR")]
        listen: Option<serve::Listen>,
        /// Read the bearer token from FILE (not readable by others) instead of TOKENWAL_BROKER_TOKEN
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// How often a full sweep double-checks for due shops the scheduler has not picked up
        #[arg(long, default_value = "5m", value_name = "DURATION")]
        sweep: SimDuration,
        /// On SIGINT/SIGTERM, how long to let requests and refreshes in flight finish
        #[arg(long, default_value = "5s", value_name = "DURATION")]
        grace: SimDuration,
        /// Threads of the async runtime that answers requests (the journal's committer and its syncs run on
        /// threads of their own); docs/benchmarks.md §12c measures 1 against 2
        #[arg(long, default_value_t = 2, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
        workers: u16,
    },
    /// Create or upgrade the PostgreSQL schema of --db postgres://… (run it as the schema's owner
    /// when the application's role may not run DDL); every other command migrates by itself
    MigrateSchema {
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Compact the journal now: each grant keeps its newest history_per_grant records, and records
    /// older than retention go (what `run` does in the background)
    Compact {
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Summarise the store: shops per state, oldest ambiguous rotation, next refresh due
    Status {
        #[command(flatten)]
        out: JsonFlag,
    },
    /// List shops: state, generation, access and refresh expiry; why for needs-reauth
    Shops {
        /// Only shops in this state (needs-reauth: why, since when, and the re-auth link)
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// The app's handle in the Shopify admin, for re-auth links [default: app_handle in --config]
        #[arg(long, value_name = "HANDLE")]
        app_handle: Option<String>,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Show one grant's state and journal history (never its secrets)
    Inspect {
        /// The shop, e.g. my-shop.myshopify.com; with a non-Admin `provider`, its account (e.g.
        /// SHOP_ID:CUSTOMER_ID); or any grant in full as PROVIDER/ACCOUNT
        shop: String,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Run recovery now and print its report, or print the plan with --dry-run
    Recover {
        /// Print what recovery would do; write and send nothing (needs no credentials)
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Print a valid access token for SHOP to stdout, refreshing first if needed (for scripts)
    #[command(long_about = TOKEN_ABOUT)]
    Token {
        /// The shop, e.g. my-shop.myshopify.com (with a non-Admin `provider`: its account, e.g.
        /// SHOP_ID:CUSTOMER_ID; any grant in full: PROVIDER/ACCOUNT)
        shop: String,
        /// Print {"grant","provider","account","access_token","access_expires"} (holds the token)
        #[arg(long)]
        json: bool,
    },
    /// List every grant of every provider: provider/account, state, generation, expiries, why
    Grants {
        /// Only grants of this provider id (e.g. shopify, shopify-customer-account)
        #[arg(long, value_name = "PROVIDER")]
        provider: Option<String>,
        /// Only grants in this state
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Export every stored token set as JSON lines, the shape `import` reads
    Export {
        /// Required: the output holds every access and refresh token in clear text
        #[arg(long)]
        reveal_secrets: bool,
        /// Accepted for uniformity: export always writes JSON lines
        #[arg(long)]
        json: bool,
    },
    /// Run the Shopify token-endpoint simulator standalone (prints its URL; Ctrl-C stops it)
    Sim {
        /// Port on 127.0.0.1 (0 picks a free one)
        #[arg(long, default_value_t = 0)]
        port: u16,
        #[command(flatten)]
        sim: Box<SimConfig>,
    },
    /// The main demo: a simulated Shopify with faults and crashes, tokenwal vs a naive refresher
    #[command(long_about = demo::ABOUT)]
    Demo(demo::DemoArgs),
    /// Create a store key file (mode 0600), or rotate one: prepend a new active key.
    #[command(long_about = KEYGEN_ABOUT)]
    Keygen {
        /// The key file. Without --rotate it must not exist.
        file: PathBuf,
        /// Prepend a new active key to an existing key file, keeping the old keys for reading.
        #[arg(long)]
        rotate: bool,
    },
    /// Webhook events the sink gave up on (dead letters): list them, send them again
    #[command(subcommand)]
    Webhooks(dead_letters::WebhooksCommand),
    /// Re-seal every grant state under the active store key (crash-safe, resumable).
    #[command(long_about = REKEY_ABOUT)]
    Rekey {
        /// Only report which key ids seal what (re-seals nothing but the fingerprint key).
        #[arg(long)]
        check: bool,
        /// Re-seal at most N grants in this run.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// First upgrade a format-1 (unencrypted) store in place.
        #[arg(long)]
        upgrade: bool,
        #[command(flatten)]
        out: JsonFlag,
    },
}

const KEYGEN_ABOUT: &str = "Create a store key file, or rotate the key in one.

`tokenwal keygen FILE` writes one new random key (base64, 32 bytes) to FILE, created with mode 0600;
it never overwrites. `tokenwal keygen --rotate FILE` prepends a new active key and keeps the older keys
for reading (the file is replaced atomically, mode 0600). After rotating, restart whatever uses the
store and run `tokenwal rekey`; when it reports 0 remaining under old keys, the old lines may be
deleted from the file. See docs/security.md.";

const REKEY_ABOUT: &str = "Re-seal every grant state and the fingerprint key under the active store key.

Each grant is re-sealed by one durable compare-and-swap, so a run that is interrupted (killed, power
loss) leaves a mix of old and new seals that the key ring still reads; running it again finishes.
It reports how many values remain under old key ids: only when that is 0 may the old key be dropped.
--check reports without re-sealing grants. --upgrade first converts a format-1 (unencrypted) store.
The store is locked while it runs (stop `tokenwal run` first).";

const IMPORT_ABOUT: &str = "Import existing token sets (JSON lines) into the store.

One JSON object per line: shop, access_token, refresh_token, expires_at (unix seconds or RFC 3339) or
expires_in (seconds), optionally refresh_token_expires_at or refresh_token_expires_in, and scope.
Every line is validated first; each invalid line is reported with its number and the reason (never
its values) and nothing of it is stored; the valid lines are installed. Exits 65 if any line was
invalid.

Re-running an import is safe: a line whose pair the store already holds is left unchanged, and a line
whose pair is older than the one held (the worker has rotated since: its access token expires earlier)
is refused and reported, never installed — it would put a superseded refresh token back in use. To
install over a newer pair anyway (you know it is dead), pass --force with --reason TEXT.";

const MIGRATE_ABOUT: &str = "Migrate legacy non-expiring offline tokens to expiring pairs.

Input: one JSON object per line, {\"shop\": \"x.myshopify.com\", \"access_token\": \"shpat_...\"} (other keys
ignored). Every line is validated first; a bad line is reported with its number and reason (never its
values) and skipped. Each migration is journaled: the legacy token is durable before it is sent, and a
shop counts as migrated only once its new pair is durable. Re-running is safe: shops already holding
an expiring pair are skipped, interrupted or ambiguous migrations are resumed with the same legacy
token. A failure for one shop never stops the others; invalid_client (the app's own credentials)
stops the run. Progress (with ETA) goes to stderr on a terminal; the report to stdout (--json: one
document).

Exit: 0 done; 65 invalid lines (the rest done); 1 some shops failed (see the report); 75 some shops
not migrated yet (re-run later: they resume); 78 app credentials rejected.";

const RUN_ABOUT: &str = "Run the refresh worker: recovery, then keep every shop fresh until SIGINT/SIGTERM.

Exit: 0 stopped by a signal (or --once done); 74 the store failed a write or sync (full disk, I/O
error) and fail-stopped: nothing further was sent, and a restart runs recovery, so run it under a
supervisor that restarts it (systemd Restart=on-failure, a Kubernetes restart policy); 75 the store is
in use by another process; 78 configuration.";

const SERVE_ABOUT: &str = "Run the local token broker: the engine (recovery, proactive refresh) behind an HTTP API.

Apps that cannot embed the Rust crate (Node, Ruby, anything with HTTP) ask the broker for a shop's fresh
access token: GET /v1/shops/{shop}/token. HTTP/1.1 over a Unix socket created with mode 0600 (default),
or loopback TCP; a non-loopback address is refused. Every request needs `Authorization: Bearer <token>`,
the token from TOKENWAL_BROKER_TOKEN or --token-file (not readable by others); without one the broker
does not start (exit 78). Credentials, store key and config as for `tokenwal run`. Prints `listening on
unix:PATH` to stderr once bound; token calls answer 503 \"recovering\" until recovery is done (a
PostgreSQL store that cannot be reached yet is retried meanwhile).
API: docs/broker-openapi.json; guide: docs/broker.md.

Exit: 0 stopped by a signal; 74 the store fail-stopped (restart it); 75 the socket is in use by a live
broker or the store by another process; 2 bad --listen; 78 configuration.";

const TOKEN_ABOUT: &str = "Print a valid access token for SHOP to stdout, refreshing first if needed.

Errors go to stderr; the exit code tells a script what to do: 75 transient (try again later), 77 the
shop needs re-auth (the merchant must open the app), 66 not in the store or uninstalled, 78
credentials missing or rejected.";

#[derive(Args)]
struct JsonFlag {
    /// Machine-readable JSON on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum StateArg {
    Healthy,
    Refreshing,
    Ambiguous,
    NeedsReauth,
    Uninstalled,
    /// A first migration or token exchange that certainly was not processed (no tokens yet)
    NotInstalled,
}

impl StateArg {
    fn name(self) -> &'static str {
        match self {
            StateArg::Healthy => "healthy",
            StateArg::Refreshing => "refreshing",
            StateArg::Ambiguous => "ambiguous",
            StateArg::NeedsReauth => "needs-reauth",
            StateArg::Uninstalled => "uninstalled",
            StateArg::NotInstalled => "not-installed",
        }
    }
}

/// The most verbose level sled's own (`log`-bridged) messages get unless `RUST_LOG` names `sled`
/// explicitly. sled 0.34.7 logs at trace level from crossbeam-epoch deferred closures, and those can run
/// while a thread's thread-locals are being destroyed (any thread's exit collects the global garbage,
/// e.g. the committer's when a store closes). tracing-subscriber's fmt layer formats into a
/// thread-local buffer, so such a message panics inside a TLS destructor and the process aborts
/// ("thread local panicked on drop"). Seen with `RUST_LOG=trace` in `tokenwal demo`
/// (crates/tokenwal-cli/tests/demo_no_leak.rs) about once in ten runs under load.
const SLED_LOG_CAP: &str = "sled=info";

/// The log filter: `RUST_LOG` if set (sled capped, see [`SLED_LOG_CAP`]), else by `-v` count.
fn log_filter(rust_log: Option<&str>, verbose: u8, default: &str) -> String {
    let base = match rust_log {
        Some(s) if !s.trim().is_empty() => s.trim().to_owned(),
        _ => match verbose {
            0 => default,
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
        .to_owned(),
    };
    if base.split(',').any(|d| d.trim_start().starts_with("sled")) {
        base
    } else {
        format!("{base},{SLED_LOG_CAP}")
    }
}

fn init_logging(verbose: u8, default: &str) {
    use tracing_subscriber::EnvFilter;
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = EnvFilter::new(log_filter(rust_log.as_deref(), verbose, default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    runtime_with(2)
}

fn runtime_with(workers: usize) -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .map_err(|e| CliError::io("cannot start the async runtime", e))
}

fn dispatch(cli: Cli) -> Result<(), CliError> {
    let g = cli.global;
    let settings = || {
        Settings::load(g.db.clone(), g.config.as_deref(), g.insecure_test_endpoint.clone()).map(|mut s| {
            s.skip_corrupt_records = g.skip_corrupt_records;
            s
        })
    };
    match cli.command {
        Command::Import { file, force, reason, json } => {
            let options = commands::ImportOptions { force, reason, json };
            runtime()?.block_on(commands::import(&settings()?, &file, &options))
        }
        Command::Migrate { file, concurrency, rate, canary, yes, dry_run, max_attempts, max_retry_wait, out } => {
            let o = migrate::Options {
                file,
                concurrency,
                rate,
                canary,
                yes,
                dry_run,
                max_attempts,
                max_retry_wait: max_retry_wait.to_std(),
                json: out.json,
            };
            runtime()?.block_on(migrate::migrate(&settings()?, o))
        }
        Command::Run { once, sweep, grace } => {
            runtime()?.block_on(commands::run(&settings()?, once, sweep.to_std(), grace.to_std()))
        }
        Command::Serve { listen, token_file, sweep, grace, workers } => {
            let o = serve::ServeOptions { listen, token_file, sweep: sweep.to_std(), grace: grace.to_std() };
            runtime_with(usize::from(workers))?.block_on(serve::serve(&settings()?, o))
        }
        Command::Status { out } => commands::status(&settings()?, out.json),
        Command::Compact { out } => commands::compact(&settings()?, out.json),
        Command::MigrateSchema { out } => commands::migrate_schema(&settings()?, out.json),
        Command::Shops { state, app_handle, out } => {
            commands::shops(&settings()?, state.map(StateArg::name), app_handle.as_deref(), out.json)
        }
        Command::Inspect { shop, out } => commands::inspect(&settings()?, &shop, out.json),
        Command::Recover { dry_run: true, out } => commands::recover_dry_run(&settings()?, out.json),
        Command::Recover { dry_run: false, out } => runtime()?.block_on(commands::recover(&settings()?, out.json)),
        Command::Token { shop, json } => runtime()?.block_on(commands::token(&settings()?, &shop, json)),
        Command::Grants { provider, state, out } => {
            commands::grants(&settings()?, provider.as_deref(), state.map(StateArg::name), out.json)
        }
        Command::Export { reveal_secrets: false, .. } => Err(CliError::Usage(commands::EXPORT_REFUSAL.into())),
        Command::Export { reveal_secrets: true, .. } => commands::export(&settings()?),
        Command::Sim { port, sim } => runtime()?.block_on(commands::sim(*sim, port)),
        Command::Demo(args) => demo::run(args),
        Command::Keygen { file, rotate } => commands::keygen(&file, rotate),
        Command::Webhooks(cmd) => dead_letters::dispatch(cmd, &settings()?),
        Command::Rekey { check, limit, upgrade, out } => commands::rekey(&settings()?, check, limit, upgrade, out.json),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Run { .. } | Command::Serve { .. } | Command::Sim { .. } => "info",
        // The demo provokes hundreds of faults on purpose: their warnings would drown the table.
        Command::Demo(_) => "error",
        _ => "warn",
    };
    init_logging(cli.global.verbose, default_level);
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokenwal: {e}");
            e.exit()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sled_is_capped_unless_named() {
        assert_eq!(log_filter(Some("trace"), 0, "warn"), "trace,sled=info");
        assert_eq!(log_filter(None, 3, "warn"), "trace,sled=info");
        assert_eq!(log_filter(Some("  "), 0, "warn"), "warn,sled=info");
        assert_eq!(log_filter(Some("debug,sled=trace"), 0, "warn"), "debug,sled=trace");
    }
}
