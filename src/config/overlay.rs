//! The TOML overlay: a user file and `--set key=value` arguments written onto the
//! defaults' table, accepting only keys the defaults have, with the defaults' types,
//! so that every mistake is named (source, key, value) before anything deserialises.

use super::error::ConfigError;

pub(super) fn parse_table(source_name: &str, text: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| {
        let line = e.span().map_or(1, |s| {
            text[..s.start.min(text.len())].lines().count().max(1)
        });
        ConfigError::Syntax {
            source_name: source_name.into(),
            line,
            message: e.message().trim().to_string(),
        }
    })
}

/// Splits `key=value`; the value is read as TOML (`4`, `1e-3`, `true`, `"x"`),
/// or taken as a plain string when it is not TOML (`--set data.dataset=synthetic`).
pub(super) fn parse_set(arg: &str) -> Result<(String, toml::Value), ConfigError> {
    let (key, raw) = arg
        .split_once('=')
        .filter(|(k, _)| !k.trim().is_empty())
        .ok_or_else(|| ConfigError::BadSet { arg: arg.into() })?;
    let raw = raw.trim();
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    Ok((key.trim().to_string(), value))
}

pub(super) fn insert_dotted(table: &mut toml::Table, key: &str, value: toml::Value) {
    match key.split_once('.') {
        None => {
            table.insert(key.to_string(), value);
        }
        Some((head, rest)) => {
            let entry = table
                .entry(head.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(inner) = entry {
                insert_dotted(inner, rest, value);
            }
        }
    }
}

/// `key` extended down to the first non-table value, as the user wrote it.
fn first_leaf(key: &str, value: &toml::Value) -> String {
    match value {
        toml::Value::Table(t) => match t.iter().next() {
            Some((k, v)) => first_leaf(&format!("{key}.{k}"), v),
            None => key.to_string(),
        },
        _ => key.to_string(),
    }
}

fn type_name(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "true or false",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// Writes `over` onto `base`, accepting only keys that `base` has, with the same type
/// (an integer is accepted where a number is expected; integers must be >= 0).
pub(super) fn overlay(
    base: &mut toml::Table,
    over: &toml::Table,
    source_name: &str,
    prefix: &str,
) -> Result<(), ConfigError> {
    for (key, value) in over {
        let full = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let Some(slot) = base.get_mut(key) else {
            return Err(ConfigError::UnknownKey {
                source_name: source_name.into(),
                key: first_leaf(&full, value),
            });
        };
        let expected = type_name(slot);
        let wrong_type = || ConfigError::WrongType {
            source_name: source_name.into(),
            key: full.clone(),
            expected: expected.into(),
            got: value.to_string(),
        };
        match (&mut *slot, value) {
            (toml::Value::Table(inner), toml::Value::Table(v)) => {
                overlay(inner, v, source_name, &full)?;
            }
            (toml::Value::Table(_), _) | (_, toml::Value::Table(_)) => return Err(wrong_type()),
            (toml::Value::Float(_), toml::Value::Integer(i)) => {
                *slot = toml::Value::Float(*i as f64);
            }
            (toml::Value::Integer(_), toml::Value::Integer(i)) if *i < 0 => {
                return Err(ConfigError::WrongType {
                    source_name: source_name.into(),
                    key: full,
                    expected: "a non-negative integer".into(),
                    got: i.to_string(),
                });
            }
            (current, v) if std::mem::discriminant(current) == std::mem::discriminant(v) => {
                *slot = v.clone();
            }
            _ => return Err(wrong_type()),
        }
    }
    Ok(())
}
