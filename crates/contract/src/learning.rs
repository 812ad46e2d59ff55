//! Learning-loop types (`docs/learning-loop.md`): incidents, patterns, the activation audit and regrets.

use serde::{Deserialize, Serialize};

use crate::ids::{IncidentId, PatternId, PolicyId, RecordId, RunId, SignatureHash, TenantId};
use crate::policy::Mode;
use crate::signature::Signature;
use crate::step::StepError;
use crate::timestamp::Timestamp;

/// A failed run, with the signature and error of its failing step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Incident {
    /// `inc_…`.
    pub id: IncidentId,
    /// The run's tenant.
    pub tenant_id: TenantId,
    /// The failed run.
    pub run_id: RunId,
    /// Hash of the failing step's signature.
    pub signature_hash: SignatureHash,
    /// The failing step's normalised signature.
    pub signature: Signature,
    /// How it failed.
    pub error: StepError,
    /// The pattern it was grouped into.
    pub pattern_id: PatternId,
    /// When it was created.
    pub created_at: Timestamp,
}

/// One tenant's incidents grouped by (signature hash, error type).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Pattern {
    /// `pat_…`.
    pub id: PatternId,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// The shared signature hash.
    pub signature_hash: SignatureHash,
    /// The shared signature.
    pub signature: Signature,
    /// The shared, lower-cased error type.
    pub error_type: String,
    /// How many incidents.
    pub occurrences: u64,
    /// The first incident's time.
    pub first_seen: Timestamp,
    /// The latest incident's time.
    pub last_seen: Timestamp,
    /// Up to 10 example incidents.
    pub incident_ids: Vec<IncidentId>,
    /// The pattern policy, once proposed.
    pub policy_id: Option<PolicyId>,
}

/// How a mode change was approved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ApprovalPath {
    /// An operator set the mode.
    #[serde(rename = "manual")]
    Manual,
    /// Enough operator confirmations.
    #[serde(rename = "confirmations")]
    Confirmations,
    /// Automatic demotion by regret.
    #[serde(rename = "auto:regret")]
    AutoRegret,
}

/// One entry of a policy's activation audit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AuditEntry {
    /// The policy.
    pub policy_id: PolicyId,
    /// Mode before (`None` on creation).
    pub from: Option<Mode>,
    /// Mode after.
    pub to: Mode,
    /// When.
    pub at: Timestamp,
    /// The caller's token name (or `system`).
    pub caller: String,
    /// The reason given.
    pub reason: Option<String>,
    /// How it was approved.
    pub approval_path: ApprovalPath,
}

/// An operator's judgement that a prevention record was a false positive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Regret {
    /// The record.
    pub record_id: RecordId,
    /// Its policy.
    pub policy_id: PolicyId,
    /// 1–10.
    pub severity: u8,
    /// Free text.
    pub note: Option<String>,
    /// Who.
    pub caller: String,
    /// When.
    pub at: Timestamp,
}
