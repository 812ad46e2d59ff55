//! Budgets at their boundaries: equal, one above, zero, absent; estimates at `pre`; warn tiers.

use runguard_contract::*;

use crate::support::*;

fn tokens_budget(max: u64) -> Policy {
    policy(&format!(
        r#"{{"id":"pol_tokens","name":"tokens","rule":{{"kind":"budget","metric":"tokens","per":"run","max":{max}}}}}"#
    ))
}

#[test]
fn a_total_equal_to_max_is_allowed_and_one_above_blocks() {
    let mut run = Driver::new(&[tokens_budget(100)]);
    let e = run.send(&post(0, 100), at(1));
    assert_eq!(e.decision.action, Action::Allow);
    assert_eq!(e.decision.remaining.tokens, Some(0));
    let e = run.send(&post(1, 1), at(2));
    assert_eq!(e.decision.action, Action::Block);
    let v = &e.decision.violations[0];
    assert_eq!(
        (v.violation_type, v.threshold.as_deref(), v.actual.as_deref()),
        (ViolationType::TokenLimit, Some("100"), Some("101"))
    );
    assert_eq!(v.reason, "run tokens 101 exceed 100");
    assert_eq!(e.decision.deciding_policy.as_ref().unwrap().id.as_str(), "pol_tokens");
    assert!(e.record.is_some());
    assert_eq!(run.state().status, RunStatus::Stopped);
    assert_eq!(run.state().totals.tokens, 101, "usage is added before budgets compare");
}

#[test]
fn max_zero_allows_nothing_and_absent_budget_means_no_limit() {
    let mut run = Driver::new(&[tokens_budget(0)]);
    assert_eq!(run.send(&post(0, 0), at(1)).decision.action, Action::Allow, "zero usage stays at 0");
    assert_eq!(run.send(&post(1, 1), at(2)).decision.action, Action::Block);

    let mut free = Driver::new(&[]);
    let e = free.send(&post(0, u64::MAX), at(1));
    assert_eq!(e.decision.action, Action::Allow);
    assert_eq!(e.decision.remaining, Remaining::default(), "no budget, no remaining");
}

#[test]
fn a_pre_estimate_is_refused_before_it_spends() {
    let mut run = Driver::new(&[tokens_budget(100)]);
    run.pass(&post(0, 60), at(1));
    assert_eq!(run.peek(&pre_estimate(1, 40), at(2)).decision.action, Action::Allow, "60 + 40 = max");
    let e = run.send(&pre_estimate(1, 41), at(2));
    assert_eq!(e.decision.action, Action::Block);
    assert_eq!(e.decision.violations[0].actual.as_deref(), Some("101"));
    assert_eq!(run.state().totals.tokens, 60, "a refused pre spends nothing");
}

#[test]
fn a_pre_without_estimate_does_not_trip_token_budgets() {
    let mut run = Driver::new(&[tokens_budget(10)]);
    assert_eq!(run.send(&pre(0), at(1)).decision.action, Action::Allow);
}

#[test]
fn steps_budget_counts_accepted_posts_and_refuses_the_next_pre() {
    let steps =
        policy(r#"{"id":"pol_steps","name":"steps","rule":{"kind":"budget","metric":"steps","per":"run","max":2}}"#);
    let mut run = Driver::new(&[steps]);
    run.pass(&post(0, 0), at(1));
    let e = run.send(&post(1, 0), at(2));
    assert_eq!((e.decision.action, e.decision.remaining.steps), (Action::Allow, Some(0)));
    let e = run.send(&pre(2), at(3));
    assert_eq!(e.decision.action, Action::Block);
    assert_eq!(e.decision.violations[0].reason, "run steps would reach 3, above 2");
}

#[test]
fn per_step_budgets_compare_usage_and_estimates() {
    let per_step = policy(
        r#"{"id":"pol_step","name":"per step","rule":{"kind":"budget","metric":"tokens","per":"step","max":50}}"#,
    );
    let mut run = Driver::new(&[per_step]);
    assert_eq!(run.peek(&pre_estimate(0, 51), at(1)).decision.action, Action::Block);
    assert_eq!(run.send(&post(0, 50), at(1)).decision.action, Action::Allow);
    assert_eq!(run.send(&post(1, 50), at(2)).decision.action, Action::Allow, "per step, not cumulative");
    assert_eq!(run.send(&post(2, 51), at(3)).decision.action, Action::Block);
}

#[test]
fn cost_and_duration_budgets_use_their_metric() {
    let cost = policy(
        r#"{"id":"pol_cost","name":"cost","rule":{"kind":"budget","metric":"cost_micros","per":"run","max":10000}}"#,
    );
    let time = policy(
        r#"{"id":"pol_time","name":"time","rule":{"kind":"budget","metric":"duration_ms","per":"run","max":500}}"#,
    );
    let mut run = Driver::new(&[cost, time]);
    let step = StepCall {
        usage: Some(Usage { tokens: 0, cost_micros: 10_000, duration_ms: 501 }),
        ..StepCall::new(0, Phase::Post)
    };
    let e = run.send(&step, at(1));
    assert_eq!(types(&e), vec![ViolationType::DurationLimit]);
    assert_eq!(e.decision.remaining.cost_micros, Some(0));
}

#[test]
fn warn_tiers_fire_once_each() {
    let budget = policy(
        r#"{"id":"pol_tokens","name":"tokens","rule":{"kind":"budget","metric":"tokens","per":"run","max":100,"warn_at":[50,80]}}"#,
    );
    let mut run = Driver::new(&[budget]);
    assert_eq!(run.send(&post(0, 49), at(1)).decision.action, Action::Allow);
    let e = run.send(&post(1, 1), at(2));
    assert_eq!((e.decision.action, types(&e)), (Action::Warn, vec![ViolationType::BudgetWarning]));
    assert_eq!(e.decision.violations[0].threshold.as_deref(), Some("50"));
    assert_eq!(run.send(&post(2, 1), at(3)).decision.action, Action::Allow, "the 50% tier never fires again");
    let e = run.send(&post(3, 40), at(4));
    assert_eq!(e.decision.violations.len(), 1, "only the 80% tier is new");
    assert_eq!(e.decision.violations[0].threshold.as_deref(), Some("80"));
    assert_eq!(run.send(&post(4, 0), at(5)).decision.action, Action::Allow);
}

#[test]
fn a_warn_budget_warns_instead_of_blocking() {
    let budget = policy(
        r#"{"id":"pol_soft","name":"soft","action":"warn","rule":{"kind":"budget","metric":"tokens","per":"run","max":10}}"#,
    );
    let mut run = Driver::new(&[budget]);
    let e = run.send(&post(0, 11), at(1));
    assert_eq!(e.decision.action, Action::Warn);
    assert!(e.record.is_none());
    assert_eq!(run.state().status, RunStatus::Running);
    assert_eq!(e.decision.remaining.tokens, None, "warn budgets do not clamp");
}

#[test]
fn remaining_is_the_tightest_budget_and_never_negative() {
    let a = tokens_budget(100);
    let b = policy(r#"{"id":"pol_b","name":"b","rule":{"kind":"budget","metric":"tokens","per":"run","max":70}}"#);
    let mut run = Driver::new(&[a, b]);
    assert_eq!(run.send(&post(0, 30), at(1)).decision.remaining.tokens, Some(40));
    assert_eq!(run.send(&post(1, 50), at(2)).decision.remaining.tokens, Some(0));
}
