//! Conflict resolution: block > throttle > warn > allow, then precedence, then policy id.

use runguard_contract::*;

use crate::support::*;

fn budget(id: &str, precedence: u32, action: &str, max: u64) -> Policy {
    policy(&format!(
        r#"{{"id":"{id}","name":"{id}","precedence":{precedence},"action":"{action}","rule":{{"kind":"budget","metric":"tokens","per":"run","max":{max}}}}}"#
    ))
}

#[test]
fn the_most_restrictive_action_wins_and_every_violation_is_listed() {
    let warn = budget("pol_a_warn", 1, "warn", 0);
    let block = budget("pol_z_block", 500, "block", 0);
    let run = Driver::new(&[warn, block]);
    let e = run.peek(&post(0, 1), at(1));
    assert_eq!(e.decision.action, Action::Block);
    assert_eq!(e.decision.deciding_policy.unwrap().id.as_str(), "pol_z_block", "block beats a lower-precedence warn");
    assert_eq!(e.decision.violations.len(), 2);
}

#[test]
fn among_equal_actions_the_lowest_precedence_decides_then_the_smallest_id() {
    let run = Driver::new(&[
        budget("pol_b", 10, "block", 0),
        budget("pol_c", 5, "block", 0),
        budget("pol_a", 10, "block", 0),
    ]);
    assert_eq!(run.peek(&post(0, 1), at(1)).decision.deciding_policy.unwrap().id.as_str(), "pol_c");
    let run = Driver::new(&[budget("pol_b", 10, "block", 0), budget("pol_a", 10, "block", 0)]);
    let e = run.peek(&post(0, 1), at(1));
    assert_eq!(e.decision.deciding_policy.unwrap().id.as_str(), "pol_a", "ties break by id byte order");
    let ids: Vec<&str> = e.decision.violations.iter().map(|v| v.policy_id.as_str()).collect();
    assert_eq!(ids, ["pol_a", "pol_b"]);
}

#[test]
fn throttle_beats_warn_and_block_beats_throttle() {
    let rate =
        policy(r#"{"id":"pol_rate","name":"rate","rule":{"kind":"rate","metric":"steps","max":0,"window_s":5}}"#);
    let steps_warn = policy(
        r#"{"id":"pol_w","name":"w","action":"warn","precedence":0,"rule":{"kind":"budget","metric":"steps","per":"run","max":0}}"#,
    );
    let run = Driver::new(&[rate.clone(), steps_warn]);
    let e = run.peek(&pre(0), at(1));
    assert_eq!((e.decision.action, e.decision.deciding_policy.unwrap().id.as_str()), (Action::Throttle, "pol_rate"));
    let steps_block =
        policy(r#"{"id":"pol_s","name":"s","rule":{"kind":"budget","metric":"steps","per":"run","max":0}}"#);
    let run = Driver::new(&[rate, steps_block]);
    let e = run.peek(&pre(0), at(1));
    assert_eq!((e.decision.action, e.decision.retry_after_ms), (Action::Block, None));
}

#[test]
fn shadow_policies_are_reported_but_never_decide() {
    let mut shadow = budget("pol_shadow", 0, "block", 0);
    shadow.mode = Mode::Shadow;
    let run = Driver::new(&[shadow]);
    let e = run.peek(&post(0, 1), at(1));
    assert_eq!(e.decision.action, Action::Allow);
    assert!(e.decision.violations.is_empty());
    assert_eq!(e.decision.shadow[0].would_action, Action::Block);
    assert_eq!(e.shadow.len(), 1);
    assert!(e.record.is_none());
    assert_eq!(e.decision.remaining.tokens, None, "shadow budgets do not clamp");
}
