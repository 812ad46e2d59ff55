//! A call of a run with a parent or children: the run's own evaluation widened by its
//! ancestors' per-run budget policies, each compared against that ancestor's rolled-up totals, and the
//! run's own per-run budgets compared against its own rolled-up totals.
//!
//! Pure like [`evaluate`](crate::evaluate): the host passes what it knows of the family at the call
//! ([`Family`]), and the widened evaluation depends on nothing else.
//!
//! - **Comparisons.** At `post` a budget compares the rolled-up total after this call's usage; at `pre`
//!   the rolled-up total plus the call's estimate (steps: plus one); inclusive, as for a run's own totals.
//! - **Warn tiers.** An ancestor's warn tier fires in the call whose usage crosses it (reached after the
//!   call, not before it), so that it fires once for that ancestor whichever run's call crosses it,
//!   without the descendant writing to the ancestor's state. A run's own tier that its descendants
//!   crossed first does not fire again on its own call.
//! - **Decision.** The most restrictive action over the run's own violations and its ancestors'; among
//!   equals the lowest precedence, then the smallest policy id, then the run's own policy before an
//!   ancestor's. A violation from an ancestor names it in `run_id`.
//! - **Record.** A block decided by an ancestor's policy is recorded for the calling run, naming the
//!   ancestor's policy, version and snapshot hash.
//! - **Remaining.** The minimum, per metric, over the run's and every ancestor's remaining.
//!
//! Shadow budget policies of ancestors are not evaluated on a descendant's calls (their statistics
//! belong to the ancestor's own calls), and run-end budgets see the run's own totals only.

use std::sync::Arc;

use runguard_contract::prevention::requires_prevention_record;
use runguard_contract::{
    Action, BindAt, BudgetMetric, BudgetPer, BudgetRule, Mode, Phase, Policy, PolicyAction, PolicyRef, RecordId,
    Remaining, Rule, RunId, StepCall, Totals, Violation, ViolationType,
};

use crate::compiled::CompiledSnapshot;
use crate::evaluate::{Evaluation, budget_remaining as remaining, decision_seed, record_of};
use crate::state::{RunState, TierKey};

/// An ancestor of the calling run, as the host sees it when the call is evaluated.
#[derive(Clone, Debug)]
pub struct Ancestor {
    /// The ancestor run.
    pub run_id: RunId,
    /// The snapshot it is bound to (its per-run budget policies apply to its descendants' calls).
    pub snapshot: Arc<CompiledSnapshot>,
    /// Its rolled-up totals before this call: its own usage plus every descendant's (a host that lets
    /// calls overlap adds what other calls have reserved but not yet committed, which errs closed).
    pub rolled_up: Totals,
}

/// What a call of a run in a family is evaluated against besides the run's own snapshot and state.
#[derive(Clone, Copy, Debug, Default)]
pub struct Family<'a> {
    /// What the run's descendants add to its own totals (committed, plus reserved by calls in flight).
    pub descendants: Totals,
    /// Its ancestors, in any order (root first by convention).
    pub ancestors: &'a [Ancestor],
}

impl Family<'_> {
    /// Whether the family changes nothing: no ancestor and no descendant usage.
    fn is_empty(&self) -> bool {
        self.ancestors.is_empty() && self.descendants == Totals::default()
    }
}

fn kind(metric: BudgetMetric) -> ViolationType {
    match metric {
        BudgetMetric::Tokens => ViolationType::TokenLimit,
        BudgetMetric::CostMicros => ViolationType::CostLimit,
        BudgetMetric::Steps => ViolationType::StepLimit,
        BudgetMetric::DurationMs => ViolationType::DurationLimit,
    }
}

fn reached(actual: u64, max: u64, tier: u32) -> bool {
    u128::from(actual) * 100 >= u128::from(max) * u128::from(tier)
}

/// Whose budget is checked, and how its tiers fire.
struct Level<'a> {
    run_id: Option<&'a RunId>,
    before: Totals,
    after: Totals,
    /// Whether a tier may fire: the run's own fired tiers, or nothing for an ancestor.
    fired: &'a dyn Fn(&TierKey) -> bool,
}

/// A finding of a per-run budget at one level: the violation, the policy's precedence, and the tier
/// to record when it is the run's own.
struct Found {
    violation: Violation,
    precedence: u32,
    tier: Option<TierKey>,
}

fn violation(
    policy: &Policy,
    run_id: Option<&RunId>,
    kind: ViolationType,
    action: Action,
    limit: (u64, u64),
    reason: String,
) -> Violation {
    Violation {
        policy_id: policy.id.clone(),
        policy_name: policy.name.clone(),
        policy_version: policy.version,
        violation_type: kind,
        action,
        threshold: Some(limit.0.to_string()),
        actual: Some(limit.1.to_string()),
        reason,
        evidence: None,
        run_id: run_id.cloned(),
    }
}

/// The findings of one per-run budget rule at one level.
fn check(policy: &Policy, rule: &BudgetRule, bind: BindAt, step: &StepCall, level: &Level<'_>, out: &mut Vec<Found>) {
    let action = match policy.action {
        PolicyAction::Block => Action::Block,
        PolicyAction::Warn => Action::Warn,
    };
    let metric = rule.metric.as_str();
    let whose = if level.run_id.is_some() { "ancestor" } else { "rolled-up" };
    let mut push = |violation| out.push(Found { violation, precedence: policy.precedence, tier: None });
    match bind {
        BindAt::StepPost => {
            let actual = level.after.get(rule.metric);
            if actual > rule.max {
                let reason = format!("{whose} {metric} {actual} exceed {}", rule.max);
                push(violation(policy, level.run_id, kind(rule.metric), action, (rule.max, actual), reason));
            }
            let before = level.before.get(rule.metric);
            for &tier in &rule.warn_at {
                let key = TierKey { policy_id: policy.id.clone(), tier };
                if !reached(actual, rule.max, tier) || reached(before, rule.max, tier) || (level.fired)(&key) {
                    continue;
                }
                let threshold = u64::try_from(u128::from(rule.max) * u128::from(tier) / 100).unwrap_or(u64::MAX);
                let reason = format!("{whose} {metric} {actual} reached the {tier}% warn tier of {}", rule.max);
                let found = violation(
                    policy,
                    level.run_id,
                    ViolationType::BudgetWarning,
                    Action::Warn,
                    (threshold, actual),
                    reason,
                );
                out.push(Found { violation: found, precedence: policy.precedence, tier: Some(key) });
            }
        }
        BindAt::StepPre => {
            let total = level.before.get(rule.metric);
            let estimate = match rule.metric {
                BudgetMetric::Steps => Some(1),
                BudgetMetric::Tokens => step.estimate.and_then(|e| e.tokens),
                BudgetMetric::CostMicros => step.estimate.and_then(|e| e.cost_micros),
                BudgetMetric::DurationMs => None,
            };
            if let Some(estimate) = estimate {
                let actual = total.saturating_add(estimate);
                if actual > rule.max {
                    let reason = format!("{whose} {metric} {total} plus estimate {estimate} would exceed {}", rule.max);
                    push(violation(policy, level.run_id, kind(rule.metric), action, (rule.max, actual), reason));
                }
            }
        }
        BindAt::RunStart | BindAt::RunEnd => {}
    }
}

/// The active per-run budget rules of a snapshot that bind at `bind`.
/// The limits a `post` allowed under `snapshot` was decided within, for a run's rolled-up totals: each
/// active blocking per-run budget's metric and maximum (a rolled-up value above the maximum blocks). A host
/// whose view of a family may be stale commits an allowed call on condition that the stored rolled-up
/// totals still hold them.
pub fn rolled_up_limits(snapshot: &CompiledSnapshot) -> impl Iterator<Item = (BudgetMetric, u64)> + '_ {
    run_budgets(snapshot, BindAt::StepPost)
        .filter(|(policy, _)| policy.action == PolicyAction::Block)
        .map(|(_, rule)| (rule.metric, rule.max))
}

fn run_budgets(snapshot: &CompiledSnapshot, bind: BindAt) -> impl Iterator<Item = (&Policy, &BudgetRule)> {
    snapshot.policies().iter().filter(move |p| p.binds_at(bind) && p.policy.mode == Mode::Active).filter_map(|p| {
        match &p.policy.rule {
            Rule::Budget(rule) if rule.per == BudgetPer::Run => Some((&p.policy, rule)),
            _ => None,
        }
    })
}

fn is_budget_finding(kind: ViolationType) -> bool {
    matches!(
        kind,
        ViolationType::TokenLimit
            | ViolationType::CostLimit
            | ViolationType::StepLimit
            | ViolationType::DurationLimit
            | ViolationType::BudgetWarning
    )
}

fn min_remaining(a: Remaining, b: Remaining) -> Remaining {
    let min = |x: Option<u64>, y: Option<u64>| match (x, y) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    };
    Remaining {
        tokens: min(a.tokens, b.tokens),
        cost_micros: min(a.cost_micros, b.cost_micros),
        steps: min(a.steps, b.steps),
        duration_ms: min(a.duration_ms, b.duration_ms),
    }
}

/// Widens the run's own evaluation of step call `step` by its family. `own_after` is the run's own
/// totals once the call's usage is added (its totals at `pre`).
pub(crate) fn widen(
    evaluation: &mut Evaluation,
    snapshot: &CompiledSnapshot,
    state: &RunState,
    step: &StepCall,
    family: &Family<'_>,
    now: runguard_contract::Timestamp,
) {
    if family.is_empty() || snapshot.is_tampered() {
        return;
    }
    let bind = match step.phase {
        Phase::Pre => BindAt::StepPre,
        Phase::Post => BindAt::StepPost,
    };
    let own_after = state.totals_with(evaluation.effects.usage.as_ref(), evaluation.effects.counts_step);
    let delta = own_after.saturating_sub(state.totals);
    let mut found: Vec<Found> = Vec::new();

    // The run's own per-run budgets, re-checked on its rolled-up totals when descendants add to them.
    let own_budget = |id: &runguard_contract::PolicyId| {
        snapshot.policy(id).is_some_and(|p| matches!(&p.rule, Rule::Budget(rule) if rule.per == BudgetPer::Run))
    };
    if family.descendants != Totals::default() {
        let fired = |key: &TierKey| state.fired_tiers.contains(key);
        let level = Level {
            run_id: None,
            before: state.totals.saturating_add(family.descendants),
            after: own_after.saturating_add(family.descendants),
            fired: &fired,
        };
        evaluation.decision.violations.retain(|v| !(own_budget(&v.policy_id) && is_budget_finding(v.violation_type)));
        evaluation.effects.fired_tiers.retain(|key| !own_budget(&key.policy_id));
        for (policy, rule) in run_budgets(snapshot, bind) {
            check(policy, rule, bind, step, &level, &mut found);
            // A tier the descendants crossed first counts as fired for the run.
            for &tier in &rule.warn_at {
                let key = TierKey { policy_id: policy.id.clone(), tier };
                if bind == BindAt::StepPost && reached(level.before.get(rule.metric), rule.max, tier) && !fired(&key) {
                    evaluation.effects.fired_tiers.push(key);
                }
            }
        }
    }
    // What the run's own evaluation left (its tenant-period budgets among it), tightened by its budgets on
    // the rolled-up totals and by every ancestor's.
    let mut left = min_remaining(
        evaluation.decision.remaining,
        remaining(snapshot, &own_after.saturating_add(family.descendants)),
    );
    for ancestor in family.ancestors {
        let none = |_: &TierKey| false;
        let level = Level {
            run_id: Some(&ancestor.run_id),
            before: ancestor.rolled_up,
            after: ancestor.rolled_up.saturating_add(delta),
            fired: &none,
        };
        for (policy, rule) in run_budgets(&ancestor.snapshot, bind) {
            check(policy, rule, bind, step, &level, &mut found);
        }
        left = min_remaining(left, remaining(&ancestor.snapshot, &level.after));
    }
    evaluation.decision.remaining = left;
    for f in &found {
        if let Some(key) = &f.tier {
            evaluation.effects.fired_tiers.push(key.clone());
        }
    }
    decide(evaluation, snapshot, state, family, found, now);
}

/// Merges the family's findings into the decision and settles its action, deciding policy and record.
fn decide(
    evaluation: &mut Evaluation,
    snapshot: &CompiledSnapshot,
    state: &RunState,
    family: &Family<'_>,
    found: Vec<Found>,
    now: runguard_contract::Timestamp,
) {
    let decision = &mut evaluation.decision;
    let precedence_of = |v: &Violation| match &v.run_id {
        None => snapshot.policy(&v.policy_id).map_or(u32::MAX, |p| p.precedence),
        Some(run) => family
            .ancestors
            .iter()
            .find(|a| &a.run_id == run)
            .and_then(|a| a.snapshot.policy(&v.policy_id))
            .map_or(u32::MAX, |p| p.precedence),
    };
    let mut all: Vec<(Violation, u32)> = decision
        .violations
        .drain(..)
        .map(|v| {
            let p = precedence_of(&v);
            (v, p)
        })
        .collect();
    all.extend(found.into_iter().map(|f| (f.violation, f.precedence)));
    let action = all.iter().map(|(v, _)| v.action).max().unwrap_or(Action::Allow);
    let deciding = all
        .iter()
        .filter(|(v, _)| v.action == action && action != Action::Allow)
        .min_by(|(a, pa), (b, pb)| (pa, a.policy_id.as_str(), &a.run_id).cmp(&(pb, b.policy_id.as_str(), &b.run_id)))
        .map(|(v, _)| v.clone());
    let (policy, policy_snapshot) = match &deciding {
        None => (None, None),
        Some(v) => match &v.run_id {
            None => (snapshot.policy(&v.policy_id), Some(snapshot)),
            Some(run) => {
                let owner = family.ancestors.iter().find(|a| &a.run_id == run).map(|a| a.snapshot.as_ref());
                (owner.and_then(|s| s.policy(&v.policy_id)), owner)
            }
        },
    };
    decision.action = action;
    decision.deciding_policy = policy.map(|p| PolicyRef { id: p.id.clone(), name: p.name.clone(), version: p.version });
    evaluation.deciding_mode = policy.map(|p| p.mode);
    if action != Action::Throttle {
        decision.retry_after_ms = None;
    }
    all.sort_by(|(a, _), (b, _)| {
        (&a.policy_id, a.violation_type, &a.run_id).cmp(&(&b.policy_id, b.violation_type, &b.run_id))
    });
    decision.violations = all.into_iter().map(|(v, _)| v).collect();
    decision.prevention_record_id = None;
    evaluation.record = None;
    if let (Some(policy), Some(owner)) = (policy, policy_snapshot)
        && requires_prevention_record(decision, evaluation.deciding_mode)
    {
        let seed = decision_seed(state);
        let id = RecordId::from_digest(&seed);
        decision.prevention_record_id = Some(id.clone());
        evaluation.record = Some(record_of(policy, owner.hash().clone(), state, decision, id, &seed, now));
    }
}

#[cfg(test)]
mod tests;
