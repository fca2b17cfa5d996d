//! `tokenwal webhooks dead-letters` and `tokenwal webhooks replay`: the webhook events the sink of
//! `tokenwal run` gave up on after its attempts (see docs/webhooks.md), listed and sent again.
//!
//! Both open the store, so they work while `tokenwal run` is not holding it (the store is locked
//! by one process at a time). Nothing printed holds a secret: a dead letter is the event's body,
//! and events carry none.

use clap::Subcommand;
use serde::Serialize;
use tokenwal::webhook_sink::{self, DeadLetterError, Replay};

use crate::commands::open_store;
use crate::error::CliError;
use crate::settings::Settings;
use crate::timefmt::{self, now};
use crate::views::{self, Instant};

/// `tokenwal webhooks …`.
#[derive(Subcommand)]
pub enum WebhooksCommand {
    /// List the events the webhook sink gave up on after its attempts (no secrets)
    #[command(long_about = DEAD_LETTERS_ABOUT)]
    DeadLetters {
        #[command(flatten)]
        out: crate::JsonFlag,
    },
    /// Send dead letters again (one attempt each): delivered ones are removed, refused ones kept
    #[command(long_about = REPLAY_ABOUT)]
    Replay {
        /// The dead letter's event id (as listed), or its lsn
        #[arg(required_unless_present = "all", conflicts_with = "all", value_name = "ID")]
        id: Option<String>,
        /// Every dead letter, in journal order
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        out: crate::JsonFlag,
    },
}

const DEAD_LETTERS_ABOUT: &str = "List the webhook events the sink of `tokenwal run` gave up on.

An event the receiver refuses (non-2xx, or no answer in time) webhook_max_attempts times is kept in
the store as a dead letter, and later events keep flowing. Each is listed with its event id, kind,
shop, attempts and last error. A letter that fails its checks is named on stderr (exit 1); the
others are still listed. Needs the store key, not the app credentials. The store is locked by one
process at a time: run this while `tokenwal run` is stopped.";

const REPLAY_ABOUT: &str = "Send webhook dead letters again: one ID, or --all.

Each is POSTed once to webhook_url, signed afresh with the webhook secret (same body, same event id:
receivers deduplicate on it). Delivered: the letter is removed. Refused again: it is kept with its
attempt count and last error updated, and the command exits 75 (try again later). Needs webhook_url
and its secret; not the app credentials. The store is locked by one process at a time: run this
while `tokenwal run` is stopped.";

/// Runs one `tokenwal webhooks …` command.
pub fn dispatch(cmd: WebhooksCommand, settings: &Settings) -> Result<(), CliError> {
    match cmd {
        WebhooksCommand::DeadLetters { out } => list(settings, out.json),
        WebhooksCommand::Replay { id, all: _, out } => crate::runtime()?.block_on(replay(settings, id, out.json)),
    }
}

/// The sink's cursor (and dead-letter) name: the CLI always runs the default sink.
fn cursor(settings: &Settings) -> Result<String, CliError> {
    Ok(settings.webhook_config()?.map_or_else(|| "webhook".to_owned(), |w| w.cursor))
}

fn cli_error(e: DeadLetterError) -> CliError {
    match e {
        DeadLetterError::Store(e) => CliError::from(e),
        DeadLetterError::Config(c) => CliError::Config(c),
        other => CliError::Usage(other.to_string()),
    }
}

#[derive(Serialize)]
struct LetterView {
    id: String,
    lsn: u64,
    kind: String,
    shop: String,
    attempts: u32,
    first_failed: Instant,
    last_attempt: Instant,
    last_error: String,
}

#[derive(Serialize)]
struct ListView {
    dead_letters: Vec<LetterView>,
    /// Letters that failed their checks, each named (`meta/dead_letter/webhook/{lsn}`).
    corrupt: Vec<String>,
}

/// `tokenwal webhooks dead-letters [--json]`. Exits 1 after listing if a letter is corrupt.
pub fn list(settings: &Settings, json: bool) -> Result<(), CliError> {
    let name = cursor(settings)?;
    let (store, _) = open_store(settings, false)?;
    let mut view = ListView { dead_letters: Vec::new(), corrupt: Vec::new() };
    let mut first_error = None;
    for l in webhook_sink::dead_letters(&store, &name).map_err(cli_error)? {
        match l {
            Ok(l) => view.dead_letters.push(LetterView {
                id: l.id,
                lsn: l.lsn,
                kind: l.kind,
                shop: l.shop,
                attempts: l.attempts,
                first_failed: Instant::of(tokenwal::core::UnixMillis(l.first_failed_ms)),
                last_attempt: Instant::of(tokenwal::core::UnixMillis(l.last_attempt_ms)),
                last_error: l.last_error,
            }),
            Err(e) => {
                view.corrupt.push(e.to_string());
                first_error.get_or_insert(e);
            }
        }
    }
    if json {
        let s = serde_json::to_string_pretty(&view).map_err(|e| CliError::Usage(format!("cannot render JSON: {e}")))?;
        println!("{s}");
    } else if view.dead_letters.is_empty() && view.corrupt.is_empty() {
        println!("no dead letters");
    } else {
        let t = now();
        let rows: Vec<Vec<String>> = view
            .dead_letters
            .iter()
            .map(|l| {
                vec![
                    l.id.clone(),
                    l.kind.clone(),
                    l.shop.clone(),
                    l.attempts.to_string(),
                    timefmt::stamp(tokenwal::core::UnixMillis(l.last_attempt.at_ms), t),
                    l.last_error.clone(),
                ]
            })
            .collect();
        print!("{}", views::table(&["ID", "KIND", "SHOP", "ATTEMPTS", "LAST ATTEMPT", "LAST ERROR"], &rows));
        for c in &view.corrupt {
            eprintln!("tokenwal: {c}");
        }
    }
    match first_error {
        Some(e) => Err(cli_error(e)),
        None => Ok(()),
    }
}

/// `tokenwal webhooks replay <id> | --all [--json]`: one attempt per letter; delivered ones are
/// removed. Exits 75 if any was refused again (kept, attempts updated), 1 if one is corrupt.
pub async fn replay(settings: &Settings, id: Option<String>, json: bool) -> Result<(), CliError> {
    let config = settings.webhook_config()?.ok_or_else(|| {
        CliError::Config("replay needs the webhook settings: webhook_url and its signing secret".into())
    })?;
    let (store, _) = open_store(settings, false)?;
    let which = id.map_or(Replay::All, Replay::One);
    let report = webhook_sink::replay(&store, &config, which).await.map_err(cli_error)?;
    if json {
        let s =
            serde_json::to_string_pretty(&report).map_err(|e| CliError::Usage(format!("cannot render JSON: {e}")))?;
        println!("{s}");
    } else {
        for id in &report.delivered {
            println!("{id}: delivered (removed)");
        }
        for (id, why) in &report.failed {
            println!("{id}: refused again ({why}); kept");
        }
        for c in &report.corrupt {
            eprintln!("tokenwal: {c}");
        }
        if report.delivered.is_empty() && report.failed.is_empty() && report.corrupt.is_empty() {
            println!("no dead letters");
        }
    }
    if !report.failed.is_empty() {
        return Err(CliError::Transient(format!(
            "{} dead letter(s) refused again and kept; replay later",
            report.failed.len()
        )));
    }
    if !report.corrupt.is_empty() {
        let why = format!("{} dead letter(s) are corrupt and were not sent", report.corrupt.len());
        return Err(CliError::io("replay", std::io::Error::new(std::io::ErrorKind::InvalidData, why)));
    }
    Ok(())
}
