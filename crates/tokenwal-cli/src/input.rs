//! Where `import` and `migrate` read their JSON lines from: a file, or stdin for `-`.

use std::io::BufRead;

use crate::error::CliError;

/// Opens `file` (or stdin for `-`, saying at a terminal that `what` JSON lines are expected).
pub fn open(file: &str, what: &str) -> Result<Box<dyn BufRead>, CliError> {
    if file == "-" {
        if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            eprintln!("reading {what} as JSON lines from stdin (end with Ctrl-D)");
        }
        return Ok(Box::new(std::io::BufReader::new(std::io::stdin())));
    }
    let f = std::fs::File::open(file).map_err(|e| CliError::io(format!("cannot open {file}"), e))?;
    Ok(Box::new(std::io::BufReader::new(f)))
}
