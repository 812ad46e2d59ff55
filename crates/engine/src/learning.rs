//! The learning loop's pure rules (`docs/learning-loop.md`): regret scores, policy and tenant graduation, and
//! simulation of candidate policies against recorded runs. The node feeds them stored data and persists
//! what they decide.

use std::sync::Arc;

use runguard_contract::prevention::counts_for_graduation;
use runguard_contract::{
    Decision, Incident, Mode, Outcome, Policy, PreventionRecord, RecordId, Regret, Rule, StepCall, StepError,
    Timestamp, ViolationType,
};
use serde::{Deserialize, Serialize};

use crate::compiled::CompiledSnapshot;
use crate::run::{Run, RunLimits};
use crate::state::{RunState, TenantRates};

const DAY_MS: i64 = 86_400_000;

/// The score at which a policy is demoted automatically.
pub const DEMOTION_SCORE: f64 = 5.0;
/// The number of regrets at which a policy is demoted automatically.
pub const DEMOTION_REGRETS: usize = 3;

/// A policy's regret score at `now`: each regret since the latest activation adds `severity × 0.5`,
/// decayed by 10% per full day since it was made.
pub fn regret_score(regrets: &[Regret], activated_at: Option<Timestamp>, now: Timestamp) -> (f64, usize) {
    let counted: Vec<&Regret> = regrets.iter().filter(|r| activated_at.is_some_and(|at| r.at >= at)).collect();
    let score = counted
        .iter()
        .map(|r| {
            let days =
                i32::try_from(now.unix_millis().saturating_sub(r.at.unix_millis()).max(0) / DAY_MS).unwrap_or(i32::MAX);
            f64::from(r.severity) * 0.5 * 0.9f64.powi(days)
        })
        .sum();
    (score, counted.len())
}

/// Whether a blocking decision was a fault rather than a prevention (`docs/learning-loop.md`): its deciding violation
/// is an `evaluation_error` or an `integrity` failure. A record of such a block (an older store may hold
/// one) never counts for graduation, prevention rates or regret.
pub fn is_fault(decision: &Decision) -> bool {
    decision
        .deciding_violation()
        .is_some_and(|v| matches!(v.violation_type, ViolationType::EvaluationError | ViolationType::Integrity))
}

/// Whether regrets demote the policy (score ≥ 5.0 or 3 regrets since its latest activation).
pub fn should_demote(score: f64, count: usize) -> bool {
    score >= DEMOTION_SCORE || count >= DEMOTION_REGRETS
}

/// A policy's graduation status (`docs/learning-loop.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyStatus {
    /// Shadow (or pending): watching.
    Observing,
    /// Active, no counted prevention yet.
    Unproven,
    /// Active with at least one counted prevention since its latest activation.
    Proven,
    /// Disabled (by regret or by an operator).
    Demoted,
}

/// One policy's prevention gate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyGraduation {
    /// The policy.
    pub policy_id: runguard_contract::PolicyId,
    /// Its status.
    pub status: PolicyStatus,
    /// At least one counted record since the latest activation.
    pub gate_passed: bool,
    /// Records counted (`docs/learning-loop.md`).
    pub counted_records: u64,
    /// The latest activation.
    pub activated_at: Option<Timestamp>,
}

/// The prevention gate of one policy, from its records.
pub fn policy_graduation(policy: &Policy, records: &[PreventionRecord]) -> PolicyGraduation {
    let counted =
        records.iter().filter(|r| r.policy_id == policy.id && counts_for_graduation(r, policy.activated_at)).count();
    let counted = u64::try_from(counted).unwrap_or(u64::MAX);
    let gate_passed = counted > 0 && policy.mode == Mode::Active;
    let status = match policy.mode {
        Mode::Shadow | Mode::Pending => PolicyStatus::Observing,
        Mode::Active if gate_passed => PolicyStatus::Proven,
        Mode::Active => PolicyStatus::Unproven,
        Mode::Disabled => PolicyStatus::Demoted,
    };
    PolicyGraduation {
        policy_id: policy.id.clone(),
        status,
        gate_passed,
        counted_records: counted,
        activated_at: policy.activated_at,
    }
}

/// A tenant's level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// No gate passed.
    Alpha,
    /// Gate 1 (prevention) passed.
    Beta,
    /// Both gates passed.
    Complete,
    /// A level reached before was lost.
    Degraded,
}

impl Level {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Level::Alpha => "alpha",
            Level::Beta => "beta",
            Level::Complete => "complete",
            Level::Degraded => "degraded",
        }
    }

    /// Parses a wire name.
    pub fn parse(text: &str) -> Option<Level> {
        match text {
            "alpha" => Some(Level::Alpha),
            "beta" => Some(Level::Beta),
            "complete" => Some(Level::Complete),
            "degraded" => Some(Level::Degraded),
            _ => None,
        }
    }
}

/// What the tenant gates are computed from (all of the tenant's data; the window is applied here).
#[derive(Clone, Copy, Debug)]
pub struct TenantEvidence<'a> {
    /// The tenant's live prevention records.
    pub records: &'a [PreventionRecord],
    /// The tenant's policies (current versions), for activation times and pattern signatures.
    pub policies: &'a [Policy],
    /// The tenant's incidents.
    pub incidents: &'a [Incident],
    /// The tenant's regrets.
    pub regrets: &'a [Regret],
    /// Times of automatic demotions (audit entries with approval path `auto:regret`).
    pub demotions: &'a [Timestamp],
}

/// The graduation gates (`docs/learning-loop.md`) over the 30 days before `now`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TenantGates {
    /// Gate 1: at least one counted prevention and a prevention rate ≥ 0.5.
    pub prevention_passed: bool,
    /// Counted preventions in the window.
    pub counted_preventions: u64,
    /// Incidents after a matching pattern policy's activation (recurrences not prevented).
    pub missed_recurrences: u64,
    /// counted / (counted + missed); 0 when both are 0.
    pub prevention_rate: f64,
    /// Gate 2: at least one automatic demotion and a regret rate ≤ 0.3.
    pub rollback_passed: bool,
    /// Automatic demotions in the window.
    pub demotions: u64,
    /// Regrets in the window.
    pub regrets: u64,
    /// regrets / counted preventions; 0 without preventions.
    pub regret_rate: f64,
    /// The latest counted prevention, if any.
    pub last_prevention_at: Option<Timestamp>,
}

/// The window of tenant graduation.
pub const GRADUATION_WINDOW_MS: i64 = 30 * DAY_MS;
/// A tenant with no prevention for this long degrades.
pub const PREVENTION_SILENCE_MS: i64 = 14 * DAY_MS;

/// Whether a policy was active at `at`: activated at or before it and, if it is no longer active, left
/// the active mode after it (its latest version, which made the change, is newer than `at`).
fn was_active_at(policy: &Policy, at: Timestamp) -> bool {
    let activated = policy.activated_at.is_some_and(|activated| activated <= at);
    activated && (policy.mode == Mode::Active || policy.updated_at > at)
}

/// Computes the gates at `now`.
pub fn tenant_gates(evidence: &TenantEvidence<'_>, now: Timestamp) -> TenantGates {
    let start = now.plus_millis(-GRADUATION_WINDOW_MS);
    let activation =
        |id: &runguard_contract::PolicyId| evidence.policies.iter().find(|p| &p.id == id).and_then(|p| p.activated_at);
    let counted: Vec<&PreventionRecord> = evidence
        .records
        .iter()
        .filter(|r| r.prevented_at >= start && counts_for_graduation(r, activation(&r.policy_id)))
        .collect();
    let missed = evidence
        .incidents
        .iter()
        .filter(|i| i.created_at >= start)
        .filter(|i| {
            evidence.policies.iter().any(|p| match &p.rule {
                Rule::Pattern(rule) => rule.signature_hash == i.signature_hash && was_active_at(p, i.created_at),
                _ => false,
            })
        })
        .count();
    let regrets = evidence.regrets.iter().filter(|r| r.at >= start).count();
    let demotions = evidence.demotions.iter().filter(|at| **at >= start).count();
    let n = counted.len();
    let prevention_rate = if n + missed == 0 { 0.0 } else { n as f64 / (n + missed) as f64 };
    let regret_rate = if n == 0 { 0.0 } else { regrets as f64 / n as f64 };
    let as_u64 = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
    TenantGates {
        prevention_passed: n >= 1 && prevention_rate >= 0.5,
        counted_preventions: as_u64(n),
        missed_recurrences: as_u64(missed),
        prevention_rate,
        rollback_passed: demotions >= 1 && n >= 1 && regret_rate <= 0.3,
        demotions: as_u64(demotions),
        regrets: as_u64(regrets),
        regret_rate,
        last_prevention_at: counted.iter().map(|r| r.prevented_at).max(),
    }
}

/// A tenant's level, computed from the gates and the previously persisted level.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TenantLevel {
    /// The level.
    pub level: Level,
    /// For `degraded`: the level it fell from.
    pub degraded_from: Option<Level>,
    /// Why.
    pub reason: Option<String>,
}

/// The level after `previous` (the persisted level and, if degraded, the level it fell from) given the
/// gates at `now`. A tenant that reached a level and loses a gate, whose prevention rate drops below 0.3,
/// or that has seen no prevention for 14 days is `degraded`, naming the level it fell from.
pub fn tenant_level(previous: Option<(Level, Option<Level>)>, gates: &TenantGates, now: Timestamp) -> TenantLevel {
    let earned = match (gates.prevention_passed, gates.rollback_passed) {
        (true, true) => Level::Complete,
        (true, false) => Level::Beta,
        _ => Level::Alpha,
    };
    let best_before = match previous {
        Some((Level::Degraded, from)) => from.unwrap_or(Level::Alpha),
        Some((level, _)) => level,
        None => Level::Alpha,
    };
    if best_before == Level::Alpha {
        return TenantLevel { level: earned, degraded_from: None, reason: Some(describe(earned)) };
    }
    let silent = gates
        .last_prevention_at
        .is_none_or(|last| now.millis_since(last) >= u64::try_from(PREVENTION_SILENCE_MS).unwrap_or(u64::MAX));
    let reason = if earned < best_before {
        Some(if !gates.prevention_passed {
            format!(
                "the prevention gate is no longer passed ({} counted preventions, rate {:.2})",
                gates.counted_preventions, gates.prevention_rate
            )
        } else {
            format!(
                "the rollback gate is no longer passed ({} demotions, regret rate {:.2})",
                gates.demotions, gates.regret_rate
            )
        })
    } else if gates.prevention_rate < 0.3 {
        Some(format!("the prevention rate dropped to {:.2}, below 0.30", gates.prevention_rate))
    } else if silent {
        Some("no prevention was seen for 14 days".to_owned())
    } else {
        None
    };
    match reason {
        Some(reason) => TenantLevel { level: Level::Degraded, degraded_from: Some(best_before), reason: Some(reason) },
        None => TenantLevel { level: earned, degraded_from: None, reason: Some(describe(earned)) },
    }
}

fn describe(level: Level) -> String {
    match level {
        Level::Alpha => "no gate passed yet".to_owned(),
        Level::Beta => "the prevention gate is passed".to_owned(),
        Level::Complete => "the prevention and rollback gates are passed".to_owned(),
        Level::Degraded => "a level reached before was lost".to_owned(),
    }
}

/// A call as recorded in a run's ledger, for replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordedCall {
    /// Run creation.
    RunStart,
    /// A step call.
    Step(StepCall),
    /// Run end.
    RunEnd {
        /// The outcome.
        outcome: Outcome,
        /// The error, if any.
        error: Option<StepError>,
    },
}

/// One run replayed against a candidate snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimulatedRun {
    /// The candidate's decision for each recorded call it evaluated, in order.
    pub decisions: Vec<runguard_contract::Decision>,
    /// The prevention records the candidate would have written, flagged `is_simulated`, with ids
    /// distinct from any live record.
    pub records: Vec<PreventionRecord>,
}

/// Replays a run's recorded calls (with their original evaluation times) against `candidate`: a loop over
/// [`Run`]. Calls the candidate refuses (for example steps after it stopped the run) produce no decision.
/// Each call sees empty tenant rate windows: the other runs of the tenant that filled them live are not
/// part of the recording.
pub fn simulate_run(
    candidate: &Arc<CompiledSnapshot>,
    start: RunState,
    calls: &[(RecordedCall, Timestamp)],
) -> SimulatedRun {
    let created_at = calls.first().map_or(Timestamp::from_unix_millis(0), |(_, at)| *at);
    let mut run = Run::resume(Arc::clone(candidate), start, created_at);
    let mut decisions = Vec::new();
    let mut records = Vec::new();
    for (call, at) in calls {
        let mut outcome = match call {
            RecordedCall::RunStart => run.start_call(*at),
            RecordedCall::Step(step) => match run.step(step, &RunLimits::default(), &mut TenantRates::default(), *at) {
                Ok(outcome) if !outcome.is_replay() => outcome,
                Ok(_) | Err(_) => continue,
            },
            RecordedCall::RunEnd { outcome, error } => match run.end(*outcome, error.as_ref(), *at) {
                Some(outcome) => outcome,
                None => continue,
            },
        };
        let mut decision = outcome.decision.clone();
        if let Some(mut record) = outcome.record.take() {
            let salt = format!("{}\n{}", record.id, candidate.hash());
            let id = RecordId::from_digest(&runguard_contract::canonical::domain_hash(
                "runguard/simulated-record/v1",
                salt.as_bytes(),
            ));
            record.id = id.clone();
            record.is_simulated = true;
            decision.prevention_record_id = Some(id);
            records.push(record);
        }
        run.commit(outcome);
        decisions.push(decision);
    }
    SimulatedRun { decisions, records }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runguard_contract::{PolicyId, RecordId};

    fn regret(days_ago: i64, severity: u8, now: Timestamp) -> Regret {
        Regret {
            record_id: RecordId::from_u128(1),
            policy_id: PolicyId::from_u128(1),
            severity,
            note: None,
            caller: "op".into(),
            at: now.plus_millis(-days_ago * DAY_MS),
        }
    }

    #[test]
    fn a_block_decided_by_an_evaluation_error_or_integrity_is_a_fault_not_a_prevention() {
        use runguard_contract::{
            Action, DecisionId, DecisionPhase, PolicyRef, Remaining, RunId, SnapshotHash, Violation, ViolationType,
        };
        let block = |violation_type: ViolationType| Decision {
            decision_id: DecisionId::new("dec_1").unwrap(),
            run_id: RunId::new("r").unwrap(),
            step_index: Some(0),
            phase: DecisionPhase::Post,
            action: Action::Block,
            deciding_policy: Some(PolicyRef { id: PolicyId::from_u128(1), name: "p".into(), version: 1 }),
            violations: vec![Violation {
                policy_id: PolicyId::from_u128(1),
                policy_name: "p".into(),
                policy_version: 1,
                violation_type,
                action: Action::Block,
                threshold: None,
                actual: None,
                reason: "r".into(),
                evidence: None,
                run_id: None,
            }],
            shadow: Vec::new(),
            remaining: Remaining::default(),
            retry_after_ms: None,
            snapshot_hash: SnapshotHash::from_bytes(&[0; 32]),
            prevention_record_id: None,
            evaluated_at: Timestamp::from_unix_millis(0),
        };
        assert!(is_fault(&block(ViolationType::EvaluationError)));
        assert!(is_fault(&block(ViolationType::Integrity)));
        assert!(!is_fault(&block(ViolationType::TokenLimit)));
        assert!(!is_fault(&block(ViolationType::PatternMatch)));
    }

    #[test]
    fn regret_scores_decay_by_ten_percent_per_full_day_and_reset_on_activation() {
        let now = Timestamp::from_unix_millis(100 * DAY_MS);
        let activated = Some(Timestamp::from_unix_millis(0));
        let (score, n) = regret_score(&[regret(0, 10, now)], activated, now);
        assert!((score - 5.0).abs() < 1e-9 && n == 1);
        assert!(should_demote(score, n));
        let (score, _) = regret_score(&[regret(1, 10, now)], activated, now);
        assert!((score - 4.5).abs() < 1e-9);
        assert!(!should_demote(score, 1));
        let (score, n) = regret_score(&[regret(0, 10, now)], Some(now.plus_millis(1)), now);
        assert_eq!((score, n), (0.0, 0), "a new activation starts from zero");
        let three = [regret(0, 1, now), regret(0, 1, now), regret(0, 1, now)];
        let (score, n) = regret_score(&three, activated, now);
        assert!(score < DEMOTION_SCORE && should_demote(score, n));
    }

    #[test]
    fn recurrences_count_only_while_the_pattern_policy_was_active() {
        use runguard_contract::{
            IncidentId, PatternId, PatternRule, PolicyDocument, RunId, Signature, StepError, TenantId,
        };
        let tenant = TenantId::new("acme").unwrap();
        let signature = Signature::normalize(Some("fetch"), Some("/a/1"), &[]);
        let doc = PolicyDocument {
            id: None,
            name: "p".into(),
            scope: runguard_contract::Scope::Tenant,
            mode: Mode::Active,
            action: Default::default(),
            precedence: 100,
            on_error: Default::default(),
            bind_at: None,
            rule: Rule::Pattern(PatternRule {
                pattern_id: PatternId::from_u128(1),
                signature_hash: signature.hash(),
                api_endpoint: None,
            }),
        };
        let t = |ms: i64| Timestamp::from_unix_millis(40 * DAY_MS + ms);
        let active = Policy::create(doc, PolicyId::from_u128(1), Some(tenant.clone()), t(100));
        let demoted = active.with_mode(Mode::Disabled, t(300));
        let incident = |at: i64| Incident {
            id: IncidentId::from_u128(u128::try_from(at).unwrap()),
            tenant_id: tenant.clone(),
            run_id: RunId::new("r").unwrap(),
            signature_hash: signature.hash(),
            signature: signature.clone(),
            error: StepError::default(),
            pattern_id: PatternId::from_u128(1),
            created_at: t(at),
        };
        let incidents = [incident(50), incident(200), incident(400)];
        let gates = |policy: &Policy| {
            let evidence = TenantEvidence {
                records: &[],
                policies: std::slice::from_ref(policy),
                incidents: &incidents,
                regrets: &[],
                demotions: &[],
            };
            tenant_gates(&evidence, t(500)).missed_recurrences
        };
        assert_eq!(gates(&active), 2, "after activation, while active");
        assert_eq!(gates(&demoted), 1, "only the incident between activation and demotion");
    }

    #[test]
    fn tenant_levels_rise_and_degrade_with_a_reason() {
        let now = Timestamp::from_unix_millis(100 * DAY_MS);
        let beta_gates = TenantGates {
            prevention_passed: true,
            counted_preventions: 2,
            prevention_rate: 1.0,
            last_prevention_at: Some(now),
            ..TenantGates::default()
        };
        assert_eq!(tenant_level(None, &beta_gates, now).level, Level::Beta);
        let lost = TenantGates { prevention_passed: false, ..TenantGates::default() };
        let level = tenant_level(Some((Level::Beta, None)), &lost, now);
        assert_eq!((level.level, level.degraded_from), (Level::Degraded, Some(Level::Beta)));
        assert!(level.reason.unwrap().contains("prevention gate"));
        let still = tenant_level(Some((Level::Degraded, Some(Level::Beta))), &lost, now);
        assert_eq!(still.level, Level::Degraded, "degradation persists until the gate is regained");
        assert_eq!(tenant_level(Some((Level::Degraded, Some(Level::Beta))), &beta_gates, now).level, Level::Beta);
        let quiet = TenantGates { last_prevention_at: Some(now.plus_millis(-15 * DAY_MS)), ..beta_gates.clone() };
        let level = tenant_level(Some((Level::Beta, None)), &quiet, now);
        assert_eq!(level.level, Level::Degraded);
        assert!(level.reason.unwrap().contains("14 days"));
    }
}
