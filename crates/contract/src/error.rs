//! The validation error shared by every type that checks input at the edge.

use std::fmt;

use crate::strict::Strict;

/// Input that was rejected, with the JSON path of the offending field.
///
/// Messages are lowercase, have no trailing period, and put caller input in backticks.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` {message}")]
pub struct ValidationError {
    field: String,
    message: String,
}

impl ValidationError {
    /// A problem with `field` (a JSON path such as `rule.warn_at[0]`).
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }

    /// The JSON path of the field at fault.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What is wrong with it.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The same problem seen from a containing object: `max` under `rule` becomes `rule.max`.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() || self.field == "." {
            parent.to_owned()
        } else if self.field.starts_with('[') {
            format!("{parent}{}", self.field)
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

impl fmt::Debug for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ValidationError({}: {})", self.field, self.message)
    }
}

/// Parses JSON into `T`, reporting the JSON path of the first field that does not fit.
///
/// Unknown fields, wrong types, negative or fractional numbers where an unsigned integer is expected, and
/// malformed JSON all come back as a [`ValidationError`] whose `field` is the path (empty for syntax errors).
/// The input is read strictly (see [`crate::strict`]): a repeated key, an array where an object is
/// expected, or an integer beyond 2^53 − 1 is refused the same way.
pub fn from_json_slice<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ValidationError> {
    // Tracking the path costs on every read and only explains a failure: read without it first (the same
    // strict rules), and again with it only to describe what failed.
    let mut fast = serde_json::Deserializer::from_slice(bytes);
    if let Ok(value) = T::deserialize(Strict::new(&mut fast))
        && fast.end().is_ok()
    {
        return Ok(value);
    }
    read_with_path(bytes)
}

/// [`from_json_slice`] with the path tracked from the start: what explains a failure.
fn read_with_path<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ValidationError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(Strict::new(&mut de)).map_err(|err| located(&err))?;
    de.end().map_err(|err| ValidationError::new("", describe_json_error(&err)))?;
    Ok(value)
}

/// Deserializes `T` from an already parsed JSON value, reporting the path of the first field that does
/// not fit. Read strictly, like [`from_json_slice`] (a value converted from TOML has not been checked).
pub fn from_json_value<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, ValidationError> {
    serde_path_to_error::deserialize(Strict::new(value)).map_err(|err| located(&err))
}

/// The error at the path serde reached. serde reports a missing field at its parent's path, with the
/// field's name only in the message: the field's own path is put together here.
fn located(err: &serde_path_to_error::Error<serde_json::Error>) -> ValidationError {
    let path = err.path().to_string();
    let parent = if path == "." { String::new() } else { path };
    let message = describe_json_error(err.inner());
    let missing = message.strip_prefix("missing field `").and_then(|rest| rest.strip_suffix('`'));
    match missing {
        Some(name) if parent.is_empty() => ValidationError::new(name, "is required"),
        Some(name) => ValidationError::new(format!("{parent}.{name}"), "is required"),
        None => ValidationError::new(parent, message),
    }
}

fn describe_json_error(err: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let text = err.to_string();
    // serde_json appends " at line L column C"; keep the position only for syntax errors.
    let without_position = match text.rfind(" at line ") {
        Some(cut) if err.classify() != Category::Syntax && err.classify() != Category::Eof => {
            text.get(..cut).unwrap_or(&text).to_owned()
        }
        _ => text,
    };
    match err.classify() {
        Category::Syntax | Category::Eof => format!("is not valid JSON: {without_position}"),
        Category::Data | Category::Io => crate::wording::in_our_words(&without_position),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StepCall;

    /// The fast read accepts exactly what the path-tracking read accepts, and a failure is explained by
    /// the path-tracking read.
    #[test]
    fn the_fast_read_agrees_with_the_path_tracking_read() {
        let bodies: &[&str] = &[
            r#"{"index":0,"phase":"pre","estimate":{"tokens":10}}"#,
            r#"{"index":0,"phase":"post","usage":{"tokens":5,"cost_micros":1,"duration_ms":2}}"#,
            r#"{"index":0,"phase":"pre","phase":"post"}"#,
            r#"{"index":0,"phase":"pre","unknown":1}"#,
            r#"{"index":9007199254740992,"phase":"pre"}"#,
            r#"{"index":1.0,"phase":"pre"}"#,
            r#"{"index":0,"phase":"post","usage":[5,1,2]}"#,
            r#"{"index":0}"#,
            r#"{"index":0,"phase":"pre"} trailing"#,
            r#"{"index":0,"phase":"pre""#,
            r#"[]"#,
            "",
        ];
        for body in bodies {
            let fast = from_json_slice::<StepCall>(body.as_bytes());
            let tracked = read_with_path::<StepCall>(body.as_bytes());
            match (fast, tracked) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{body}"),
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{body}"),
                (a, b) => panic!("`{body}`: fast {a:?}, tracked {b:?}"),
            }
        }
        assert!(from_json_slice::<StepCall>(bodies[0].as_bytes()).is_ok());
        let err = from_json_slice::<StepCall>(bodies[2].as_bytes()).unwrap_err();
        assert!(err.to_string().contains("phase"), "{err}");
    }
}
