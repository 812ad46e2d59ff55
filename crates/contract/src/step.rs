//! Step calls (`docs/api.md`, step calls): what a worker sends before (`pre`) and after (`post`) each step.

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::limits::StepLimits;

/// The phase of a step call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Admission, before the step executes.
    Pre,
    /// Report, after it executed.
    Post,
}

impl Phase {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Pre => "pre",
            Phase::Post => "post",
        }
    }
}

/// What a `pre` call expects the step to consume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Estimate {
    /// Expected tokens.
    #[serde(default)]
    pub tokens: Option<u64>,
    /// Expected micro-USD.
    #[serde(default)]
    pub cost_micros: Option<u64>,
}

/// What a step consumed, reported at `post`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Usage {
    /// Tokens consumed.
    #[serde(default)]
    pub tokens: u64,
    /// Micro-USD spent.
    #[serde(default)]
    pub cost_micros: u64,
    /// Wall time of the step.
    #[serde(default)]
    pub duration_ms: u64,
}

/// How a step failed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct StepError {
    /// Error type, e.g. `timeout` (lower-cased when classifying).
    #[serde(default, rename = "type")]
    pub error_type: Option<String>,
    /// Error code, e.g. `E_RATE` (upper-cased when classifying).
    #[serde(default)]
    pub code: Option<String>,
    /// HTTP-like status, if any.
    #[serde(default)]
    pub status: Option<u16>,
    /// Free text; never part of a signature.
    #[serde(default)]
    pub message: Option<String>,
}

/// A step call, `POST /v1/runs/{id}/steps`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("anyOf" = [
    {"properties": {"phase": {"const": "pre"},
                    "usage": {"type": "null"}, "output_text": {"type": "null"}, "error": {"type": "null"}}},
    {"properties": {"phase": {"const": "post"}, "estimate": {"type": "null"}}},
])))]
#[serde(deny_unknown_fields)]
pub struct StepCall {
    /// Step index, from 0.
    pub index: u64,
    /// `pre` or `post`.
    pub phase: Phase,
    /// The skill (tool) the step uses.
    #[serde(default)]
    pub skill: Option<String>,
    /// The endpoint the step calls.
    #[serde(default)]
    pub api_endpoint: Option<String>,
    /// Top-level keys of the step's input.
    #[serde(default)]
    pub input_keys: Vec<String>,
    /// The step's input text.
    #[serde(default)]
    pub input_text: Option<String>,
    /// Expected consumption (`pre` only).
    #[serde(default)]
    pub estimate: Option<Estimate>,
    /// Actual consumption (`post` only).
    #[serde(default)]
    pub usage: Option<Usage>,
    /// The step's output text (`post` only).
    #[serde(default)]
    pub output_text: Option<String>,
    /// How the step failed (`post` only).
    #[serde(default)]
    pub error: Option<StepError>,
}

impl StepCall {
    /// A bare call with only index and phase.
    pub fn new(index: u64, phase: Phase) -> Self {
        Self {
            index,
            phase,
            skill: None,
            api_endpoint: None,
            input_keys: Vec::new(),
            input_text: None,
            estimate: None,
            usage: None,
            output_text: None,
            error: None,
        }
    }

    /// Parses and validates a step call from JSON.
    pub fn from_json(bytes: &[u8], limits: &StepLimits) -> Result<Self, ValidationError> {
        let call: StepCall = crate::error::from_json_slice(bytes)?;
        call.validate(limits)?;
        Ok(call)
    }

    /// Checks phase-specific fields and sizes, naming the field at fault.
    pub fn validate(&self, limits: &StepLimits) -> Result<(), ValidationError> {
        if self.phase == Phase::Pre {
            for (present, field) in [
                (self.usage.is_some(), "usage"),
                (self.output_text.is_some(), "output_text"),
                (self.error.is_some(), "error"),
            ] {
                if present {
                    return Err(ValidationError::new(field, "is reported at `post`, not at `pre`"));
                }
            }
        } else if self.estimate.is_some() {
            return Err(ValidationError::new("estimate", "is sent at `pre`, not at `post`"));
        }
        for (value, field) in [(&self.input_text, "input_text"), (&self.output_text, "output_text")] {
            if let Some(text) = value
                && text.len() > limits.max_text_len
            {
                return Err(ValidationError::new(
                    field,
                    format!("is {} bytes long, the limit is {}", text.len(), limits.max_text_len),
                ));
            }
        }
        check_short("skill", self.skill.as_deref(), limits)?;
        check_short("api_endpoint", self.api_endpoint.as_deref(), limits)?;
        if self.input_keys.len() > limits.max_input_keys {
            return Err(ValidationError::new(
                "input_keys",
                format!("has {} keys, the limit is {}", self.input_keys.len(), limits.max_input_keys),
            ));
        }
        for (i, key) in self.input_keys.iter().enumerate() {
            check_short(&format!("input_keys[{i}]"), Some(key), limits)?;
        }
        if let Some(error) = &self.error {
            error.validate(limits)?;
        }
        Ok(())
    }
}

impl StepError {
    /// Checks the length of each text (in a step call, and in the `error` of a run's end body), naming
    /// the field under `error`.
    pub fn validate(&self, limits: &StepLimits) -> Result<(), ValidationError> {
        check_short("error.type", self.error_type.as_deref(), limits)?;
        check_short("error.code", self.code.as_deref(), limits)?;
        check_short("error.message", self.message.as_deref(), limits)
    }
}

fn check_short(field: &str, value: Option<&str>, limits: &StepLimits) -> Result<(), ValidationError> {
    match value {
        Some(text) if text.len() > limits.max_field_len => Err(ValidationError::new(
            field,
            format!("is {} bytes long, the limit is {}", text.len(), limits.max_field_len),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<StepCall, ValidationError> {
        StepCall::from_json(json.as_bytes(), &StepLimits::default())
    }

    #[test]
    fn a_post_call_parses() {
        let call = parse(r#"{"index":0,"phase":"post","usage":{"tokens":5},"error":{"type":"Timeout"}}"#).unwrap();
        assert_eq!(call.usage.unwrap().tokens, 5);
        assert_eq!(call.error.unwrap().error_type.as_deref(), Some("Timeout"));
    }

    #[test]
    fn bad_numbers_name_their_path() {
        let err = parse(r#"{"index":0,"phase":"post","usage":{"tokens":-5}}"#).unwrap_err();
        assert_eq!(err.field(), "usage.tokens");
        let err = parse(r#"{"index":0.5,"phase":"post"}"#).unwrap_err();
        assert_eq!(err.field(), "index");
        let err = parse(r#"{"index":0,"phase":"post","usage":{"tokens":1,"cents":2}}"#).unwrap_err();
        assert_eq!(err.field(), "usage.cents");
        assert!(err.to_string().starts_with("`usage.cents` is not a known field"), "{err}");
    }

    #[test]
    fn phase_specific_fields_are_enforced() {
        assert_eq!(parse(r#"{"index":0,"phase":"pre","usage":{}}"#).unwrap_err().field(), "usage");
        assert_eq!(parse(r#"{"index":0,"phase":"post","estimate":{}}"#).unwrap_err().field(), "estimate");
        assert_eq!(parse(r#"{"index":0,"phase":"during"}"#).unwrap_err().field(), "phase");
    }

    #[test]
    fn malformed_json_is_a_clear_error() {
        let err = parse(r#"{"index":0,"#).unwrap_err();
        assert!(err.message().contains("not valid JSON"), "{err}");
        let err = parse(r#"{"index":0,"phase":"pre"} trailing"#).unwrap_err();
        assert!(err.message().contains("not valid JSON"), "{err}");
    }

    #[test]
    fn arrays_duplicate_keys_and_unsafe_integers_are_refused() {
        let err = parse(r#"{"index":0,"phase":"post","usage":[500,0,0]}"#).unwrap_err();
        assert_eq!(err.field(), "usage");
        assert_eq!(err.message(), "must be an object, not a list", "{err}");
        assert_eq!(parse(r#"[0,"post"]"#).unwrap_err().field(), "");
        let err = parse(r#"{"index":0,"phase":"post","phase":"pre"}"#).unwrap_err();
        assert_eq!((err.field(), err.message()), ("phase", "is given more than once"));
        let err = parse(r#"{"index":0,"phase":"post","usage":{"tokens":1,"tokens":2}}"#).unwrap_err();
        assert_eq!(err.field(), "usage.tokens");
        let err = parse(r#"{"index":0,"phase":"post","error":{"type":"a","typ\u0065":"b"}}"#).unwrap_err();
        assert_eq!(err.field(), "error.type", "an escaped repeat is a repeat");
        let err = parse(r#"{"index":0,"phase":"post","usage":{"tokens":9007199254740992}}"#).unwrap_err();
        assert_eq!(err.field(), "usage.tokens");
        assert!(err.message().contains("2^53"), "{err}");
        assert_eq!(
            parse(r#"{"index":0,"phase":"post","usage":{"tokens":9007199254740991}}"#).unwrap().usage.unwrap().tokens,
            crate::MAX_SAFE_INTEGER
        );
        assert_eq!(parse(r#"{"index":0,"phase":"post","usage":{"tokens":2.0}}"#).unwrap_err().field(), "usage.tokens");
        // The same key in two different objects is no repeat.
        assert!(parse(r#"{"index":0,"phase":"post","usage":{"tokens":1},"error":{"type":"tokens"}}"#).is_ok());
    }

    #[test]
    fn error_texts_are_limited() {
        let limits = StepLimits { max_field_len: 4, ..StepLimits::default() };
        let error = StepError { message: Some("12345".into()), ..StepError::default() };
        assert_eq!(error.validate(&limits).unwrap_err().field(), "error.message");
    }

    #[test]
    fn oversized_texts_are_rejected() {
        let limits = StepLimits { max_text_len: 4, ..StepLimits::default() };
        let call = StepCall { output_text: Some("12345".into()), ..StepCall::new(0, Phase::Post) };
        assert_eq!(call.validate(&limits).unwrap_err().field(), "output_text");
    }
}
