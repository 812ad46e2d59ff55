//! A descendant's calls against its ancestors' budgets, through the public `Run` API.

use std::sync::Arc;

use proptest::prelude::*;
use runguard_contract::{
    Action, Estimate, Phase, Policy, PolicyDocument, PolicyLimits, RunId, RunStatus, Snapshot, StepCall, TenantId,
    TerminationReason, Timestamp, Totals, Usage, ViolationType,
};

use crate::{Ancestor, CompiledSnapshot, Family, Outcome, PeriodTotals, Run, RunLimits, TenantRates};

fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

fn snapshot(docs: &[&str]) -> Arc<CompiledSnapshot> {
    let policies: Vec<Policy> = docs
        .iter()
        .map(|doc| {
            let doc = PolicyDocument::from_json(doc.as_bytes(), &PolicyLimits::default()).unwrap();
            let id = doc.id.clone().unwrap();
            Policy::create(doc, id, Some(tenant()), Timestamp::from_unix_millis(0))
        })
        .collect();
    Arc::new(
        CompiledSnapshot::compile(&Snapshot::capture(&tenant(), policies.iter()), &PolicyLimits::default()).unwrap(),
    )
}

fn budget(id: &str, max: u64, warn: &str) -> String {
    format!(
        r#"{{"id": "{id}", "name": "{id}", "rule": {{"kind": "budget", "metric": "tokens", "per": "run", "max": {max}{warn}}}}}"#
    )
}

fn run(name: &str, snapshot: &Arc<CompiledSnapshot>) -> Run {
    let (mut run, start) = Run::start(
        Arc::clone(snapshot),
        tenant(),
        RunId::new(name).unwrap(),
        Default::default(),
        Timestamp::from_unix_millis(0),
    );
    run.commit(start);
    run
}

fn post(index: u64, tokens: u64) -> StepCall {
    StepCall { usage: Some(Usage { tokens, ..Usage::default() }), ..StepCall::new(index, Phase::Post) }
}

fn ancestor(name: &str, snapshot: &Arc<CompiledSnapshot>, tokens: u64) -> Ancestor {
    Ancestor {
        run_id: RunId::new(name).unwrap(),
        snapshot: Arc::clone(snapshot),
        rolled_up: Totals { tokens, ..Totals::default() },
    }
}

fn at() -> Timestamp {
    Timestamp::from_unix_millis(1_000)
}

/// `run`'s call in `family`, with default limits, no tenant windows and no tenant-period budgets.
fn step(run: &Run, call: &StepCall, family: &Family<'_>) -> Outcome {
    run.step_in_family(call, &RunLimits::default(), &mut TenantRates::default(), family, &PeriodTotals::default(), at())
        .unwrap()
}

#[test]
fn an_ancestors_budget_blocks_the_descendant_and_names_the_ancestor() {
    let parent = snapshot(&[&budget("pol_parent", 100, "")]);
    let child_snapshot = snapshot(&[]);
    let child = run("child", &child_snapshot);
    let ancestors = [ancestor("parent", &parent, 90)];
    let family = Family { descendants: Totals::default(), ancestors: &ancestors };
    let outcome = step(&child, &post(0, 11), &family);
    assert_eq!(outcome.decision.action, Action::Block);
    let violation = outcome.decision.deciding_violation().unwrap();
    assert_eq!(violation.run_id.as_ref().map(RunId::as_str), Some("parent"));
    assert_eq!(violation.violation_type, ViolationType::TokenLimit);
    let record = outcome.record.as_ref().expect("an ancestor's block is recorded for the descendant");
    assert_eq!(record.run_id.as_str(), "child");
    assert_eq!(record.policy_id.as_str(), "pol_parent");
    assert_eq!(&record.snapshot_hash, parent.hash());
    assert_eq!(outcome.decision.remaining.tokens, Some(0));
    let stopped = child.after(&outcome);
    let termination = stopped.state().termination.clone().unwrap();
    assert_eq!(stopped.state().status, RunStatus::Stopped);
    assert_eq!(termination.reason, TerminationReason::PolicyBlock);
    assert_eq!(termination.violation_run_id.as_ref().map(RunId::as_str), Some("parent"));
}

#[test]
fn the_limit_is_inclusive_and_remaining_is_the_minimum_over_the_chain() {
    let root = snapshot(&[&budget("pol_root", 1_000, "")]);
    let parent = snapshot(&[&budget("pol_parent", 100, "")]);
    let child = run("child", &snapshot(&[&budget("pol_child", 500, "")]));
    let ancestors = [ancestor("root", &root, 900), ancestor("parent", &parent, 90)];
    let family = Family { descendants: Totals::default(), ancestors: &ancestors };
    let outcome = step(&child, &post(0, 10), &family);
    assert_eq!(outcome.decision.action, Action::Allow, "100 of 100 is within the limit");
    assert_eq!(outcome.decision.remaining.tokens, Some(0));
    let pre =
        StepCall { estimate: Some(Estimate { tokens: Some(1), cost_micros: None }), ..StepCall::new(0, Phase::Pre) };
    let ancestors = [ancestor("root", &root, 900), ancestor("parent", &parent, 100)];
    let family = Family { descendants: Totals::default(), ancestors: &ancestors };
    let outcome = step(&child, &pre, &family);
    assert_eq!(outcome.decision.action, Action::Block, "at pre: rolled-up total plus the estimate");
}

#[test]
fn an_ancestors_warn_tier_fires_only_in_the_call_that_crosses_it() {
    let parent = snapshot(&[&budget("pol_parent", 100, r#", "warn_at": [50]"#)]);
    let child = run("child", &snapshot(&[]));
    let warns = |before: u64, tokens: u64| {
        let ancestors = [ancestor("parent", &parent, before)];
        let family = Family { descendants: Totals::default(), ancestors: &ancestors };
        let outcome = step(&child, &post(0, tokens), &family);
        outcome.decision.violations.iter().filter(|v| v.violation_type == ViolationType::BudgetWarning).count()
    };
    assert_eq!(warns(40, 10), 1, "crossing 50%");
    assert_eq!(warns(50, 10), 0, "already crossed by another call");
    assert_eq!(warns(10, 10), 0, "not reached");
}

#[test]
fn a_parents_own_budget_counts_its_descendants() {
    let snapshot = snapshot(&[&budget("pol_run", 100, r#", "warn_at": [50]"#)]);
    let mut parent = run("parent", &snapshot);
    let family = Family { descendants: Totals { tokens: 60, ..Totals::default() }, ancestors: &[] };
    let outcome = step(&parent, &post(0, 10), &family);
    assert_eq!(outcome.decision.action, Action::Allow);
    assert!(
        outcome.decision.violations.is_empty(),
        "the 50% tier was crossed by the descendants, not by this call: {:?}",
        outcome.decision.violations
    );
    parent.commit(outcome);
    let family = Family { descendants: Totals { tokens: 95, ..Totals::default() }, ancestors: &[] };
    let outcome = step(&parent, &post(1, 10), &family);
    assert_eq!(outcome.decision.action, Action::Block, "20 own + 95 descendants exceed 100");
    assert!(outcome.decision.violations.iter().all(|v| v.run_id.is_none()));
}

#[test]
fn an_empty_family_is_the_plain_step() {
    let snapshot = snapshot(&[&budget("pol_run", 100, r#", "warn_at": [50]"#)]);
    let run = run("solo", &snapshot);
    let call = post(0, 70);
    let plain = run.step(&call, &RunLimits::default(), &mut TenantRates::default(), at()).unwrap();
    let family = step(&run, &call, &Family::default());
    assert_eq!(plain.decision, family.decision);
}

proptest! {
    /// Whatever the split of usage between a parent and its children, the widened evaluation blocks
    /// exactly when a rolled-up total passes an ancestor's limit, and the most restrictive ancestor decides.
    #[test]
    fn a_descendants_post_blocks_exactly_when_an_ancestors_rolled_up_total_passes_its_limit(
        limits in proptest::collection::vec(1u64..500, 1..4),
        rolled in proptest::collection::vec(0u64..500, 3),
        tokens in 0u64..300,
    ) {
        let ancestors: Vec<Ancestor> = limits
            .iter()
            .enumerate()
            .map(|(i, max)| {
                let id = format!("pol_a{i}");
                ancestor(&format!("a{i}"), &snapshot(&[&budget(&id, *max, "")]), rolled.get(i).copied().unwrap_or(0))
            })
            .collect();
        let child = run("child", &snapshot(&[]));
        let family = Family { descendants: Totals::default(), ancestors: &ancestors };
        let outcome = step(&child, &post(0, tokens), &family);
        let over: Vec<&Ancestor> =
            ancestors.iter().zip(&limits).filter(|(a, max)| a.rolled_up.tokens + tokens > **max).map(|(a, _)| a).collect();
        prop_assert_eq!(outcome.decision.action == Action::Block, !over.is_empty());
        let left = ancestors.iter().zip(&limits).map(|(a, max)| max.saturating_sub(a.rolled_up.tokens + tokens)).min();
        prop_assert_eq!(outcome.decision.remaining.tokens, left);
        if let Some(deciding) = outcome.decision.deciding_violation() {
            let named = deciding.run_id.clone().unwrap();
            prop_assert!(over.iter().any(|a| a.run_id == named));
            prop_assert_eq!(outcome.record.as_ref().map(|r| r.policy_id.clone()), Some(deciding.policy_id.clone()));
        }
    }
}

/// What a call adds to its tenant's rate windows and periods follows the action its family settles, not
/// the run's own evaluation: a `pre` the run alone allows and an ancestor blocks is recorded as any block
/// (no condition on the window's count, which could otherwise refuse the block's commit), and a `post`
/// an ancestor blocks still adds its usage to the tenant's period.
#[test]
fn what_a_widened_block_adds_to_tenant_windows_and_periods_is_a_blocks() {
    let parent = snapshot(&[&budget("pol_parent", 100, "")]);
    let rate = r#"{"id": "pol_rate", "name": "pol_rate", "rule": {"kind": "rate", "metric": "steps", "max": 1000, "window_s": 60, "scope": "tenant"}}"#;
    let period = r#"{"id": "pol_month", "name": "pol_month", "rule": {"kind": "budget", "metric": "tokens", "per": "tenant", "period": "month", "max": 1000000}}"#;
    let own = snapshot(&[rate, period]);
    let child = run("child", &own);
    let ancestors = [ancestor("parent", &parent, 100)];
    let family = Family { descendants: Totals::default(), ancestors: &ancestors };

    let pre =
        StepCall { estimate: Some(Estimate { tokens: Some(1), cost_micros: None }), ..StepCall::new(0, Phase::Pre) };
    let alone = step(&child, &pre, &Family::default());
    assert_eq!(alone.decision.action, Action::Allow);
    assert!(!alone.tenant_rate_delta.as_ref().unwrap().checks.is_empty(), "an admitted pre is conditional");
    let widened = step(&child, &pre, &family);
    assert_eq!(widened.decision.action, Action::Block);
    let delta = widened.tenant_rate_delta.as_ref().expect("a block is recorded in the tenant's window");
    assert!(delta.checks.is_empty(), "a block is recorded without a condition: {:?}", delta.checks);

    let post = post(0, 5);
    let alone = step(&child, &post, &Family::default());
    let widened = step(&child, &post, &family);
    assert_eq!(widened.decision.action, Action::Block);
    assert_eq!(widened.period_deltas, alone.period_deltas, "the usage was spent either way");
    assert!(!widened.period_deltas.is_empty());
}
