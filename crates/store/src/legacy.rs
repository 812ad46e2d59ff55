//! The format-2 layouts of runs and ledger entries, and how format-1 values (written before runs had
//! parents) are still read.
//!
//! Format 2 added trailing fields to [`StoredRun`] (parent, ancestors, the ancestor that stopped it) and
//! `run_id` to every violation of a ledger entry's decision. bincode has no optional trailing fields, so
//! these two types are written under envelope [`ENVELOPE_V2`], and an envelope-1 value is decoded with
//! the layout it was written in and completed with the new fields' defaults.

use std::collections::BTreeMap;

use runguard_contract::{
    Action, Decision, DecisionId, DecisionPhase, Evidence, NextCall, Outcome, PolicyId, PolicyRef, RecordId, Remaining,
    RunId, RunStatus, ShadowEntry, SnapshotHash, SnapshotRef, TenantId, TerminationReason, Timestamp, Totals,
    Violation, ViolationType,
};
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::StoreError;
use crate::model::{LedgerCall, LedgerEntry, StoredRun};

/// Format 2 of the envelope: runs and ledger entries with parent and child runs.
pub const ENVELOPE_V2: u8 = 2;

/// Envelope 2 plus the bincode payload of the current layout.
pub(crate) fn encode_v2<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    let mut bytes = codec::encode_bincode(what, value)?;
    if let Some(first) = bytes.first_mut() {
        *first = ENVELOPE_V2;
    }
    Ok(bytes)
}

/// Decodes envelope 2 as `T`, or envelope 1 as `Old` converted.
pub(crate) fn decode_v2<T: for<'de> Deserialize<'de>, Old: for<'de> Deserialize<'de> + Into<T>>(
    what: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&ENVELOPE_V2, payload)) => codec::decode_bincode_payload(what, payload),
        _ => codec::decode_bincode::<Old>(what, bytes).map(Into::into),
    }
}

/// A run as format 1 stored it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
pub(crate) struct RunV1 {
    tenant_id: TenantId,
    run_id: RunId,
    snapshot: SnapshotRef,
    status: RunStatus,
    totals: Totals,
    termination_reason: Option<TerminationReason>,
    stopped_at_step: Option<u64>,
    violation_policy_id: Option<PolicyId>,
    labels: BTreeMap<String, String>,
    api_endpoint: Option<String>,
    created_at: Timestamp,
    ended_at: Option<Timestamp>,
    outcome: Option<Outcome>,
    next: NextCall,
}

impl From<RunV1> for StoredRun {
    fn from(old: RunV1) -> Self {
        StoredRun {
            tenant_id: old.tenant_id,
            run_id: old.run_id,
            snapshot: old.snapshot,
            status: old.status,
            totals: old.totals,
            termination_reason: old.termination_reason,
            stopped_at_step: old.stopped_at_step,
            violation_policy_id: old.violation_policy_id,
            labels: old.labels,
            api_endpoint: old.api_endpoint,
            created_at: old.created_at,
            ended_at: old.ended_at,
            outcome: old.outcome,
            next: old.next,
            parent_run_id: None,
            ancestors: Vec::new(),
            violation_run_id: None,
        }
    }
}

#[derive(Deserialize)]
struct ViolationV1 {
    policy_id: PolicyId,
    policy_name: String,
    policy_version: u32,
    violation_type: ViolationType,
    action: Action,
    threshold: Option<String>,
    actual: Option<String>,
    reason: String,
    evidence: Option<Evidence>,
}

#[derive(Deserialize)]
struct DecisionV1 {
    decision_id: DecisionId,
    run_id: RunId,
    step_index: Option<u64>,
    phase: DecisionPhase,
    action: Action,
    deciding_policy: Option<PolicyRef>,
    violations: Vec<ViolationV1>,
    shadow: Vec<ShadowEntry>,
    remaining: Remaining,
    retry_after_ms: Option<u64>,
    snapshot_hash: SnapshotHash,
    prevention_record_id: Option<RecordId>,
    evaluated_at: Timestamp,
}

/// A ledger entry as format 1 stored it.
#[derive(Deserialize)]
pub(crate) struct LedgerEntryV1 {
    position: u64,
    call: LedgerCall,
    decision: DecisionV1,
    totals_after: Totals,
    effects: Vec<u8>,
}

impl From<LedgerEntryV1> for LedgerEntry {
    fn from(old: LedgerEntryV1) -> Self {
        let d = old.decision;
        let violations = d
            .violations
            .into_iter()
            .map(|v| Violation {
                policy_id: v.policy_id,
                policy_name: v.policy_name,
                policy_version: v.policy_version,
                violation_type: v.violation_type,
                action: v.action,
                threshold: v.threshold,
                actual: v.actual,
                reason: v.reason,
                evidence: v.evidence,
                run_id: None,
            })
            .collect();
        let decision = Decision {
            decision_id: d.decision_id,
            run_id: d.run_id,
            step_index: d.step_index,
            phase: d.phase,
            action: d.action,
            deciding_policy: d.deciding_policy,
            violations,
            shadow: d.shadow,
            remaining: d.remaining,
            retry_after_ms: d.retry_after_ms,
            snapshot_hash: d.snapshot_hash,
            prevention_record_id: d.prevention_record_id,
            evaluated_at: d.evaluated_at,
        };
        LedgerEntry {
            position: old.position,
            call: old.call,
            decision,
            totals_after: old.totals_after,
            effects: old.effects,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Stored;

    #[test]
    fn a_run_written_before_run_trees_is_still_read() {
        let run = crate::fixtures::World::new("acme").run("r1");
        let old = RunV1 {
            tenant_id: run.tenant_id.clone(),
            run_id: run.run_id.clone(),
            snapshot: run.snapshot.clone(),
            status: run.status,
            totals: run.totals,
            termination_reason: run.termination_reason,
            stopped_at_step: run.stopped_at_step,
            violation_policy_id: run.violation_policy_id.clone(),
            labels: run.labels.clone(),
            api_endpoint: run.api_endpoint.clone(),
            created_at: run.created_at,
            ended_at: run.ended_at,
            outcome: run.outcome,
            next: run.next,
        };
        let bytes = codec::encode_bincode("run", &old).unwrap();
        assert_eq!(bytes.first(), Some(&codec::ENVELOPE_V1));
        assert_eq!(StoredRun::decode(&bytes).unwrap(), run);
        let new = run.encode().unwrap();
        assert_eq!(new.first(), Some(&ENVELOPE_V2));
        assert_eq!(StoredRun::decode(&new).unwrap(), run);
    }
}
