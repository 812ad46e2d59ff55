//! Sliding-window rate rules: throttle with `retry_after_ms`, no advance, run and tenant scope.

use runguard_contract::*;
use runguard_engine::RunLimits;

use crate::support::*;

fn steps_rate(scope: &str, max: u64, window_s: u32) -> Policy {
    policy(&format!(
        r#"{{"id":"pol_rate","name":"rate","rule":{{"kind":"rate","metric":"steps","max":{max},"window_s":{window_s},"scope":"{scope}"}}}}"#
    ))
}

#[test]
fn over_the_limit_throttles_with_the_time_until_the_step_fits() {
    let mut run = Driver::new(&[steps_rate("run", 2, 10)]);
    run.pass(&pre(0), at(0));
    run.pass(&post(0, 0), at(100));
    run.pass(&pre(1), at(1_000));
    run.pass(&post(1, 0), at(1_100));
    let e = run.send(&pre(2), at(2_000));
    assert_eq!(e.decision.action, Action::Throttle);
    assert_eq!(e.decision.violations[0].violation_type, ViolationType::RateLimit);
    // The step admitted at t=0 leaves the 10 s window at t=10 000.
    assert_eq!(e.decision.retry_after_ms, Some(8_000));
    assert!(e.record.is_none(), "rate limiting is mitigation, not prevention");
    assert_eq!(run.state().status, RunStatus::Running);
    assert_eq!(run.state().next, NextCall { index: 2, phase: Phase::Pre }, "a throttle does not advance");
    // Sent again once it fits, it is evaluated afresh, with a new decision.
    let again = run.send(&pre(2), at(10_000));
    assert_eq!(again.decision.action, Action::Allow);
    assert_ne!(again.decision.decision_id, e.decision.decision_id);
}

#[test]
fn a_throttled_call_sent_again_too_early_is_throttled_again() {
    let mut run = Driver::new(&[steps_rate("run", 1, 5)]);
    run.pass(&pre(0), at(0));
    run.pass(&post(0, 0), at(10));
    let first = run.send(&pre(1), at(1_000));
    assert_eq!(first.decision.action, Action::Throttle);
    let second = run.send(&pre(1), at(2_000));
    assert_eq!((second.decision.action, second.decision.retry_after_ms), (Action::Throttle, Some(3_000)));
}

#[test]
fn token_rates_count_reported_usage_and_the_estimate() {
    let rate =
        policy(r#"{"id":"pol_tpm","name":"tpm","rule":{"kind":"rate","metric":"tokens","max":100,"window_s":60}}"#);
    let mut run = Driver::new(&[rate]);
    run.pass(&post(0, 70), at(0));
    assert_eq!(run.peek(&pre_estimate(1, 30), at(1_000)).decision.action, Action::Allow);
    let e = run.peek(&pre_estimate(1, 31), at(1_000));
    assert_eq!((e.decision.action, e.decision.retry_after_ms), (Action::Throttle, Some(59_000)));
    let never = run.peek(&pre_estimate(1, 101), at(1_000));
    assert_eq!(never.decision.retry_after_ms, Some(60_000), "a request larger than the window waits a full window");
}

#[test]
fn tenant_scope_windows_are_shared_between_runs() {
    let rate = steps_rate("tenant", 1, 30);
    let mut first = Driver::new(std::slice::from_ref(&rate));
    first.pass(&pre(0), at(0));
    // A second run of the same tenant, sharing the tenant windows of the first.
    let second = start(std::sync::Arc::clone(first.run.snapshot()), "run-2", Default::default());
    let e = second.step(&pre(0), &RunLimits::default(), &mut first.tenant_rates, at(1_000)).unwrap();
    assert_eq!((e.decision.action, e.decision.retry_after_ms), (Action::Throttle, Some(29_000)));
}

#[test]
fn throttled_calls_do_not_fill_the_tenant_window() {
    let mut run = Driver::new(&[steps_rate("tenant", 1, 10)]);
    run.pass(&pre(0), at(0));
    run.pass(&post(0, 0), at(10));
    // Retried every second while throttled: none of the retries counts as a step of the tenant.
    for t in 1..10 {
        let e = run.send(&pre(1), at(t * 1_000));
        assert_eq!(e.decision.action, Action::Throttle, "at {t} s");
    }
    // The only step in the window leaves it at 10 s: the call fits then, not 10 s after the last retry.
    assert_eq!(run.send(&pre(1), at(10_000)).decision.action, Action::Allow);
}

#[test]
fn a_warn_rate_rule_warns_instead_of_throttling() {
    let rate = policy(
        r#"{"id":"pol_rate","name":"rate","action":"warn","rule":{"kind":"rate","metric":"steps","max":0,"window_s":5}}"#,
    );
    let mut run = Driver::new(&[rate]);
    let e = run.send(&pre(0), at(0));
    assert_eq!((e.decision.action, e.decision.retry_after_ms), (Action::Warn, None));
    assert_eq!(run.state().next.phase, Phase::Post);
}
