//! `tokenwal migrate`'s input: JSON lines `{"shop", "access_token"}`, every line validated before
//! anything is sent. Messages are written here, so none can quote a token.

use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::io::BufRead;
use tokenwal::core::{LegacyToken, ShopDomain};

use crate::error::CliError;

/// The longest input line accepted.
const MAX_LINE: usize = 16 * 1024;

/// One input line's problem.
#[derive(Serialize, Clone)]
pub struct InputError {
    /// 1-based line number.
    pub line: usize,
    /// Why (never the line's values).
    pub error: String,
}

/// Parses one line. Messages are written here, so none can quote the token.
pub(super) fn parse_line(line: &str) -> Result<(ShopDomain, LegacyToken), String> {
    if line.len() > MAX_LINE {
        return Err(format!("line longer than {MAX_LINE} bytes"));
    }
    let value: Value = serde_json::from_str(line).map_err(|e| {
        format!("not valid JSON ({})", e.to_string().split(" at line").next().unwrap_or("syntax error"))
    })?;
    let Value::Object(obj) = value else { return Err("not a JSON object".into()) };
    let shop = match obj.get("shop") {
        None | Some(Value::Null) => return Err("missing field `shop`".into()),
        Some(Value::String(s)) => ShopDomain::parse(s).map_err(|e| format!("invalid shop domain: {e}"))?,
        Some(_) => return Err("`shop` must be a string".into()),
    };
    let token = match obj.get("access_token") {
        None | Some(Value::Null) => return Err("missing field `access_token`".into()),
        Some(Value::String(s)) if s.trim().is_empty() => return Err("`access_token` is empty".into()),
        Some(Value::String(s)) if s.trim() != s || s.chars().any(char::is_control) => {
            return Err("`access_token` has surrounding whitespace or control characters".into())
        }
        Some(Value::String(s)) => LegacyToken::new(s.clone()),
        Some(_) => return Err("`access_token` must be a string".into()),
    };
    Ok((shop, token))
}

/// A valid input line: its number, the shop and its legacy token.
pub(super) type Line = (usize, ShopDomain, LegacyToken);

/// Reads and validates the whole input.
pub(super) fn read_input(file: &str) -> Result<(Vec<Line>, Vec<InputError>), CliError> {
    let reader = crate::input::open(file, "{shop, access_token}")?;
    let mut valid = Vec::new();
    let mut errors = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, line) in reader.split(b'\n').enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| CliError::io(format!("cannot read line {n}"), e))?;
        let Ok(line) = String::from_utf8(line) else {
            errors.push(InputError { line: n, error: "not UTF-8".into() });
            continue;
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match parse_line(line) {
            Ok((shop, token)) => match seen.get(shop.as_str()) {
                Some(first) => {
                    errors.push(InputError { line: n, error: format!("{shop} was already given on line {first}") })
                }
                None => {
                    seen.insert(shop.as_str().to_owned(), n);
                    valid.push((n, shop, token));
                }
            },
            Err(error) => errors.push(InputError { line: n, error }),
        }
    }
    Ok((valid, errors))
}
