//! Call order, idempotent retries and stopped runs (`docs/api.md`, step calls).

use runguard_contract::*;
use runguard_engine::Refusal;

use crate::support::*;

#[test]
fn pre_is_optional_but_post_must_follow_before_the_next_index() {
    let mut run = Driver::new(&[]);
    run.pass(&post(0, 1), at(1));
    run.pass(&pre(1), at(2));
    assert_eq!(
        run.admit(&pre(2)),
        Admission::Refused(Refusal::OutOfOrder { expected: NextCall { index: 1, phase: Phase::Post } })
    );
    run.pass(&post(1, 1), at(3));
    assert!(matches!(run.admit(&post(5, 1)), Admission::Refused(Refusal::OutOfOrder { .. })));
    assert!(matches!(run.admit(&pre(0)), Admission::Refused(Refusal::OutOfOrder { .. })));
}

#[test]
fn an_identical_resend_replays_the_decision_and_a_different_body_is_refused() {
    let mut run = Driver::new(&[]);
    let first = run.send(&post(0, 5), at(1));
    match run.admit(&post(0, 5)) {
        Admission::Replay(decision) => assert_eq!(decision.decision_id, first.decision.decision_id),
        other => panic!("expected a replay, got {other:?}"),
    }
    assert_eq!(run.admit(&post(0, 6)), Admission::Refused(Refusal::RetryMismatch { index: 0, phase: Phase::Post }));
    assert_eq!(run.state().totals.tokens, 5, "a retry is not counted twice");
}

#[test]
fn a_stopped_run_replays_its_blocking_call_and_refuses_everything_else() {
    let budget = policy(r#"{"id":"pol_t","name":"t","rule":{"kind":"budget","metric":"tokens","per":"run","max":1}}"#);
    let mut run = Driver::new(&[budget]);
    let block = run.send(&post(0, 2), at(1));
    assert!(matches!(run.admit(&post(0, 2)), Admission::Replay(d) if d.decision_id == block.decision.decision_id));
    match run.admit(&pre(1)) {
        Admission::Refused(Refusal::NotRunning { status, stopping_decision }) => {
            assert_eq!(status, RunStatus::Stopped);
            assert_eq!(stopping_decision.unwrap().decision_id, block.decision.decision_id);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(matches!(run.admit(&post(0, 3)), Admission::Refused(Refusal::NotRunning { .. })));
    let termination = run.state().termination.clone().unwrap();
    assert_eq!((termination.stopped_at_step, termination.violation_policy_id.unwrap().as_str()), (Some(0), "pol_t"));
}

#[test]
fn decision_ids_are_unique_within_a_run_and_across_runs() {
    let mut a = Driver::new(&[]);
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..5 {
        ids.insert(a.send(&post(i, 0), at(1)).decision.decision_id);
    }
    let mut b = Driver::named(&[], "run-2");
    ids.insert(b.send(&post(0, 0), at(1)).decision.decision_id);
    assert_eq!(ids.len(), 6);
}
