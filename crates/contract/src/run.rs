//! Runs: status, totals and termination (`docs/api.md`).

use serde::{Deserialize, Serialize};

use crate::step::Phase;

/// The status of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Accepting calls.
    Running,
    /// Stopped by a block.
    Stopped,
    /// Ended with outcome `succeeded`.
    Succeeded,
    /// Ended with outcome `failed`.
    Failed,
    /// Not ended before its TTL.
    Expired,
}

impl RunStatus {
    /// Whether the run still accepts step calls.
    pub const fn is_running(self) -> bool {
        matches!(self, RunStatus::Running)
    }

    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Stopped => "stopped",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Expired => "expired",
        }
    }
}

/// How a run ended, as the worker reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The agent finished its task.
    Succeeded,
    /// The agent failed.
    Failed,
}

/// Why a run was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum TerminationReason {
    /// An active policy blocked.
    PolicyBlock,
    /// Its snapshot failed verification.
    IntegrityFailure,
    /// An ancestor run left `running`.
    ParentStopped,
}

/// What a run has consumed so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Totals {
    /// Tokens.
    pub tokens: u64,
    /// Micro-USD.
    pub cost_micros: u64,
    /// Steps whose `post` was accepted.
    pub steps: u64,
    /// Milliseconds.
    pub duration_ms: u64,
}

impl Totals {
    /// `self + other` per metric, saturating.
    #[must_use]
    pub const fn saturating_add(self, other: Totals) -> Totals {
        Totals {
            tokens: self.tokens.saturating_add(other.tokens),
            cost_micros: self.cost_micros.saturating_add(other.cost_micros),
            steps: self.steps.saturating_add(other.steps),
            duration_ms: self.duration_ms.saturating_add(other.duration_ms),
        }
    }

    /// `self - other` per metric, never below 0.
    #[must_use]
    pub const fn saturating_sub(self, other: Totals) -> Totals {
        Totals {
            tokens: self.tokens.saturating_sub(other.tokens),
            cost_micros: self.cost_micros.saturating_sub(other.cost_micros),
            steps: self.steps.saturating_sub(other.steps),
            duration_ms: self.duration_ms.saturating_sub(other.duration_ms),
        }
    }

    /// The total a budget on `metric` compares.
    pub const fn get(&self, metric: crate::BudgetMetric) -> u64 {
        match metric {
            crate::BudgetMetric::Tokens => self.tokens,
            crate::BudgetMetric::CostMicros => self.cost_micros,
            crate::BudgetMetric::Steps => self.steps,
            crate::BudgetMetric::DurationMs => self.duration_ms,
        }
    }
}

/// The next call a run expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct NextCall {
    /// Step index.
    pub index: u64,
    /// Phase; a `pre` may be skipped, so `pre` here also admits the `post` of the same index.
    pub phase: Phase,
}
