//! How a configuration is refused: always one line naming the source (file or
//! `--set`), the key and what was expected.

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{path}: cannot read config file: {reason}")]
    Read { path: String, reason: String },
    #[error("{source_name}: invalid TOML at line {line}: {message}")]
    Syntax {
        source_name: String,
        line: usize,
        message: String,
    },
    #[error("{source_name}: unknown key `{key}`")]
    UnknownKey { source_name: String, key: String },
    #[error("{source_name}: `{key}` expects {expected}, got {got}")]
    WrongType {
        source_name: String,
        key: String,
        expected: String,
        got: String,
    },
    #[error("`--set {arg}`: expected KEY=VALUE, e.g. --set model.depth=4")]
    BadSet { arg: String },
    #[error("`{key}` = {value}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
}

/// The range checks every section's `validate` is written with: each error names the
/// key, its value and what was expected.
pub(super) fn check(
    ok: bool,
    key: &str,
    value: impl ToString,
    reason: &str,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key: key.into(),
            value: value.to_string(),
            reason: reason.into(),
        })
    }
}

pub(super) fn positive(key: &str, value: f64) -> Result<(), ConfigError> {
    check(
        value.is_finite() && value > 0.0,
        key,
        value,
        "must be a finite number > 0",
    )
}

pub(super) fn non_negative(key: &str, value: f64) -> Result<(), ConfigError> {
    check(
        value.is_finite() && value >= 0.0,
        key,
        value,
        "must be a finite number >= 0",
    )
}
