//! The prevention contract (`docs/contract.md`) as pure predicates.
//!
//! The engine calls [`pattern_policy_matches`] to decide whether a pattern policy is violated, and
//! [`requires_prevention_record`] to decide whether a decision earns a record. The store calls
//! [`check_record_against_decision`] before it appends a record, so that no code path can write a record
//! the contract does not allow. Graduation uses [`counts_for_graduation`]; run ending uses
//! [`may_create_incident`].

use crate::decision::{Action, Decision, ViolationType};
use crate::ids::{SignatureHash, TenantId};
use crate::policy::{Mode, Policy, Rule};
use crate::record::PreventionRecord;
use crate::run::{Outcome, RunStatus};
use crate::signature::normalize_endpoint;
use crate::timestamp::Timestamp;

/// What a pattern policy and a request look like, for conditions (1)–(3) of the prevention contract.
#[derive(Clone, Copy, Debug)]
pub struct PatternRequest<'a> {
    /// The tenant owning the pattern policy.
    pub policy_tenant: Option<&'a TenantId>,
    /// The run's tenant.
    pub run_tenant: &'a TenantId,
    /// The signature the policy prevents.
    pub policy_signature: &'a SignatureHash,
    /// The request's signature.
    pub request_signature: &'a SignatureHash,
    /// The endpoint the policy names, if any (as written; normalised here).
    pub policy_endpoint: Option<&'a str>,
    /// The request's endpoint (as sent; normalised here).
    pub request_endpoint: Option<&'a str>,
}

/// Conditions (1)–(3): same signature, same tenant, and the named endpoint if any. Condition (4), the
/// policy being active, decides between a prevention and a shadow would-block, and is checked by
/// [`requires_prevention_record`].
pub fn pattern_policy_matches(req: &PatternRequest<'_>) -> bool {
    let same_signature = req.policy_signature == req.request_signature;
    let same_tenant = req.policy_tenant == Some(req.run_tenant);
    let endpoint_ok = match req.policy_endpoint {
        None => true,
        Some(wanted) => req.request_endpoint.is_some_and(|sent| normalize_endpoint(sent) == normalize_endpoint(wanted)),
    };
    same_signature && same_tenant && endpoint_ok
}

/// Whether a deciding violation of this type is a fault of the system or of the policy's evaluation
/// rather than a policy that held (`docs/learning-loop.md`): such a block stops the run but prevents nothing.
pub const fn is_fault(violation_type: ViolationType) -> bool {
    matches!(violation_type, ViolationType::EvaluationError | ViolationType::Integrity)
}

/// Whether a decision earns a prevention record: it blocks, an **active** policy decided it, and the
/// deciding violation is not a fault (`evaluation_error` or `integrity`, see [`is_fault`]). Shadow
/// would-blocks, throttles and warns never do.
pub fn requires_prevention_record(decision: &Decision, deciding_mode: Option<Mode>) -> bool {
    decision.action == Action::Block
        && deciding_mode == Some(Mode::Active)
        && decision.deciding_violation().is_some_and(|v| v.action == Action::Block && !is_fault(v.violation_type))
}

/// A record the contract does not allow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("prevention record refused: {0}")]
pub struct ContractBreach(pub String);

/// Checks, before a record is stored, that it follows from `decision` under `policy` for a run of
/// `run_tenant`: a block decided by that active policy version, the same run, step, phase and snapshot,
/// the tenant of the run, and pattern fields exactly when the policy is a pattern policy whose tenant is
/// the run's.
pub fn check_record_against_decision(
    record: &PreventionRecord,
    decision: &Decision,
    policy: &Policy,
    run_tenant: &TenantId,
) -> Result<(), ContractBreach> {
    let breach = |why: &str| Err(ContractBreach(why.to_owned()));
    if decision.deciding_violation().is_some_and(|v| is_fault(v.violation_type)) {
        return breach("a block caused by a fault (an evaluation error or an integrity failure) prevents nothing");
    }
    if !requires_prevention_record(decision, Some(policy.mode)) {
        return breach("the decision is not a block decided by an active policy");
    }
    let Some(deciding) = &decision.deciding_policy else {
        return breach("the decision has no deciding policy");
    };
    if deciding.id != policy.id || deciding.version != policy.version {
        return breach("the policy is not the deciding policy version");
    }
    if record.policy_id != policy.id || record.policy_version != policy.version {
        return breach("the record names another policy version");
    }
    if &record.tenant_id != run_tenant {
        return breach("the record's tenant is not the run's tenant");
    }
    if record.run_id != decision.run_id
        || record.decision_id != decision.decision_id
        || record.step_index != decision.step_index
        || record.phase != decision.phase
        || record.snapshot_hash != decision.snapshot_hash
    {
        return breach("the record does not match its decision");
    }
    if decision.prevention_record_id.as_ref() != Some(&record.id) {
        return breach("the decision does not name this record");
    }
    match &policy.rule {
        Rule::Pattern(rule) => {
            if policy.tenant_id.as_ref() != Some(run_tenant) {
                return breach("a pattern policy prevents only in its own tenant");
            }
            if record.pattern_id.as_ref() != Some(&rule.pattern_id)
                || record.signature_hash.as_ref() != Some(&rule.signature_hash)
            {
                return breach("the record's pattern fields do not match the pattern policy");
            }
        }
        _ => {
            if record.pattern_id.is_some() || record.signature_hash.is_some() {
                return breach("only pattern policies carry pattern fields");
            }
        }
    }
    Ok(())
}

/// Condition (6): a record counts for graduation only if it is real (not simulated) and was prevented at
/// or after the policy's latest activation.
pub fn counts_for_graduation(record: &PreventionRecord, latest_activation: Option<Timestamp>) -> bool {
    !record.is_simulated && latest_activation.is_some_and(|at| record.prevented_at >= at)
}

/// Condition (5) and the learning loop (`docs/learning-loop.md`): only a running run that ends `failed`
/// creates an incident; a run stopped by a block (or already ended) never does.
pub fn may_create_incident(status_before_end: RunStatus, outcome: Outcome) -> bool {
    status_before_end == RunStatus::Running && outcome == Outcome::Failed
}
