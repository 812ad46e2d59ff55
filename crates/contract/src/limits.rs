//! Input limits that validation enforces. The node makes each one configurable.

use serde::{Deserialize, Serialize};

/// Limits on policy documents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyLimits {
    /// Longest policy name, in bytes.
    pub max_name_len: usize,
    /// Most regexes in one content rule.
    pub max_patterns: usize,
    /// Longest regex source, in bytes.
    pub max_pattern_len: usize,
    /// Most keywords in one content rule.
    pub max_keywords: usize,
    /// Longest keyword or skill name, in bytes.
    pub max_keyword_len: usize,
    /// Most skills in an allow or deny list.
    pub max_skills: usize,
    /// Longest CEL expression, in bytes.
    pub max_cel_len: usize,
    /// Highest static cost of a CEL expression: nodes plus the text it may scan at the step limits of
    /// `cel_inputs`, multiplied through comprehensions (see `crates/engine/src/cel_check.rs`).
    pub max_cel_cost: u64,
    /// Longest endpoint or other short text, in bytes.
    pub max_text_len: usize,
    /// The step limits a CEL rule's cost is bounded for (`docs/evaluation.md`, CEL custom rules). Not
    /// configured on its own: the node copies its `[limits.step]` here, so that raising a text limit raises
    /// every rule's computed cost.
    #[serde(skip)]
    pub cel_inputs: StepLimits,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        Self {
            max_name_len: 256,
            max_patterns: 64,
            max_pattern_len: 1024,
            max_keywords: 1024,
            max_keyword_len: 256,
            max_skills: 1024,
            max_cel_len: 4096,
            max_cel_cost: 100_000,
            max_text_len: 2048,
            cel_inputs: StepLimits::default(),
        }
    }
}

/// Limits on step calls.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StepLimits {
    /// Longest `input_text` or `output_text`, in bytes.
    pub max_text_len: usize,
    /// Longest skill, endpoint, error field or input key, in bytes.
    pub max_field_len: usize,
    /// Most `input_keys`.
    pub max_input_keys: usize,
}

impl Default for StepLimits {
    fn default() -> Self {
        Self { max_text_len: 256 * 1024, max_field_len: 2048, max_input_keys: 256 }
    }
}
