//! `tokenwal export --reveal-secrets`.

use std::io::Write;
use tokenwal::core::Phase;

use super::{all_grants, open_store};
use crate::error::CliError;
use crate::import;
use crate::settings::Settings;

/// Why `export` needs `--reveal-secrets`.
pub const EXPORT_REFUSAL: &str = "export writes every shop's access and refresh tokens in clear text. \
Anyone holding a refresh token can mint access tokens for that shop. If that is what you want (a migration, \
a backup you will keep safe), run `tokenwal export --reveal-secrets > file` and protect the file.";

/// `tokenwal export --reveal-secrets`.
pub fn export(settings: &Settings) -> Result<(), CliError> {
    let (store, _) = open_store(settings, false)?;
    let grants = all_grants(&store)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut n, mut dead) = (0, 0);
    for s in &grants {
        let Some(t) = &s.tokens else { continue };
        writeln!(out, "{}", import::export_line(s.grant.account(), t))
            .map_err(|e| CliError::io("cannot write to stdout", e))?;
        n += 1;
        if matches!(s.phase, Phase::NeedsReauth { .. }) {
            dead += 1;
        }
    }
    out.flush().map_err(|e| CliError::io("cannot write to stdout", e))?;
    eprintln!("exported {n} token set(s) ({dead} of them need re-auth: their tokens are dead)");
    Ok(())
}
