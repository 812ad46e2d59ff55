//! Decisions: what runguard answers to each call.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{DecisionId, PolicyId, RecordId, RunId, SnapshotHash};
use crate::step::Phase;
use crate::timestamp::Timestamp;

/// The answer to a call, ordered from least to most restrictive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Go ahead.
    Allow,
    /// Go ahead, with a warning.
    Warn,
    /// Wait `retry_after_ms`, then send the same call again.
    Throttle,
    /// Stop: the run is over.
    Block,
}

impl Action {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Warn => "warn",
            Action::Throttle => "throttle",
            Action::Block => "block",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which kind of check a violation comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ViolationType {
    /// A token budget.
    TokenLimit,
    /// A cost budget.
    CostLimit,
    /// A steps budget.
    StepLimit,
    /// A duration budget.
    DurationLimit,
    /// A budget's warn tier was reached.
    BudgetWarning,
    /// A rate rule.
    RateLimit,
    /// A content rule.
    ContentPolicy,
    /// A skill rule.
    SkillPolicy,
    /// A learned pattern.
    PatternMatch,
    /// A CEL rule.
    CustomRule,
    /// The policy could not be evaluated.
    EvaluationError,
    /// The snapshot failed verification.
    Integrity,
    /// A repeat rule: the same call or error too often within its window.
    LoopDetected,
}

impl ViolationType {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            ViolationType::TokenLimit => "token_limit",
            ViolationType::CostLimit => "cost_limit",
            ViolationType::StepLimit => "step_limit",
            ViolationType::DurationLimit => "duration_limit",
            ViolationType::BudgetWarning => "budget_warning",
            ViolationType::RateLimit => "rate_limit",
            ViolationType::ContentPolicy => "content_policy",
            ViolationType::SkillPolicy => "skill_policy",
            ViolationType::PatternMatch => "pattern_match",
            ViolationType::CustomRule => "custom_rule",
            ViolationType::EvaluationError => "evaluation_error",
            ViolationType::Integrity => "integrity",
            ViolationType::LoopDetected => "loop_detected",
        }
    }
}

/// Where in a run a decision was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum DecisionPhase {
    /// At run creation.
    RunStart,
    /// A step's `pre` call.
    Pre,
    /// A step's `post` call.
    Post,
    /// At run end.
    RunEnd,
}

impl From<Phase> for DecisionPhase {
    fn from(phase: Phase) -> Self {
        match phase {
            Phase::Pre => DecisionPhase::Pre,
            Phase::Post => DecisionPhase::Post,
        }
    }
}

impl DecisionPhase {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            DecisionPhase::RunStart => "run_start",
            DecisionPhase::Pre => "pre",
            DecisionPhase::Post => "post",
            DecisionPhase::RunEnd => "run_end",
        }
    }
}

/// The policy that decided.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PolicyRef {
    /// Its id.
    pub id: PolicyId,
    /// Its name.
    pub name: String,
    /// The version pinned by the snapshot.
    pub version: u32,
}

/// One redacted match: the detector, pattern or keyword, how often, and up to 3 redacted samples.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EvidenceMatch {
    /// `detector`, `pattern` or `keyword`.
    pub kind: String,
    /// The detector name, or `patterns[i]` / `keywords[i]` (never the matched text).
    pub name: String,
    /// How many matches.
    pub count: u64,
    /// At most 3 redacted samples: first 2 and last 2 characters kept when that hides at least half.
    pub samples: Vec<String>,
}

/// Why a violation was raised, without the matched text.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Evidence {
    /// Which text was read (`input_text`, `output_text`), for content rules.
    pub text: Option<String>,
    /// Content matches.
    pub matches: Vec<EvidenceMatch>,
    /// The request signature hash, for pattern rules.
    pub signature_hash: Option<String>,
    /// The normalised endpoint, for pattern rules.
    pub api_endpoint: Option<String>,
}

/// A violated policy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Violation {
    /// The policy.
    pub policy_id: PolicyId,
    /// Its name.
    pub policy_name: String,
    /// Its pinned version.
    pub policy_version: u32,
    /// Which check.
    pub violation_type: ViolationType,
    /// What the policy asks for.
    pub action: Action,
    /// The limit, as a decimal string, when there is one.
    pub threshold: Option<String>,
    /// The value that broke it, as a decimal string, when there is one.
    pub actual: Option<String>,
    /// A sentence that says why.
    pub reason: String,
    /// Redacted details.
    pub evidence: Option<Evidence>,
    /// The ancestor run whose per-run budget policy this is, when the violation comes from an ancestor
    /// of the calling run; `null` for the run's own policies.
    #[serde(default)]
    pub run_id: Option<RunId>,
}

/// What a shadow policy would have done.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ShadowEntry {
    /// The shadow policy.
    pub policy_id: PolicyId,
    /// Its pinned version.
    pub policy_version: u32,
    /// What it would have done.
    pub would_action: Action,
    /// Which check.
    pub violation_type: ViolationType,
    /// Why.
    pub reason: String,
}

/// The tightest per-run budget left for each metric, never below 0; `None` where no budget applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Remaining {
    /// Tokens left.
    pub tokens: Option<u64>,
    /// Micro-USD left.
    pub cost_micros: Option<u64>,
    /// Steps left.
    pub steps: Option<u64>,
    /// Milliseconds left.
    pub duration_ms: Option<u64>,
}

/// A decision.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Decision {
    /// Unique; identical retries return the same one.
    pub decision_id: DecisionId,
    /// The run.
    pub run_id: RunId,
    /// The step, or `None` at run start and run end.
    pub step_index: Option<u64>,
    /// Where in the run.
    pub phase: DecisionPhase,
    /// The answer.
    pub action: Action,
    /// The active policy whose violation decided, if any.
    pub deciding_policy: Option<PolicyRef>,
    /// Every active violation (and evaluation errors), in policy id order.
    pub violations: Vec<Violation>,
    /// What shadow policies would have done.
    pub shadow: Vec<ShadowEntry>,
    /// Budget left after this call.
    pub remaining: Remaining,
    /// For a throttle: how long to wait before sending the call again.
    pub retry_after_ms: Option<u64>,
    /// The snapshot evaluated.
    pub snapshot_hash: SnapshotHash,
    /// The prevention record written for this block, if any.
    pub prevention_record_id: Option<RecordId>,
    /// The evaluation time.
    pub evaluated_at: Timestamp,
}

impl Decision {
    /// The deciding violation: the one raised by the deciding policy with the decision's action.
    pub fn deciding_violation(&self) -> Option<&Violation> {
        let deciding = self.deciding_policy.as_ref()?;
        self.violations.iter().find(|v| v.policy_id == deciding.id && v.action == self.action)
    }
}
