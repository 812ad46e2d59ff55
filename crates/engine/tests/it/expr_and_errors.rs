//! CEL rules, failure modes (`on_error`) and integrity failures.

use runguard_contract::*;
use std::sync::Arc;

use runguard_engine::{CompiledSnapshot, Run};

use crate::support::*;

fn expr(id: &str, cel: &str, on_error: &str) -> Policy {
    policy(&format!(r#"{{"id":"{id}","name":"{id}","on_error":"{on_error}","rule":{{"kind":"expr","cel":"{cel}"}}}}"#))
}

#[test]
fn a_true_expression_is_a_custom_rule_violation() {
    let mut run = Driver::new(&[expr("pol_x", "run.tokens > 10 && step.index >= 1", "block")]);
    assert_eq!(run.send(&post(0, 11), at(1)).decision.action, Action::Allow);
    let e = run.send(&post(1, 0), at(2));
    assert_eq!((e.decision.action, types(&e)), (Action::Block, vec![ViolationType::CustomRule]));
}

#[test]
fn evaluation_errors_follow_on_error() {
    // `step.skill` is absent: reading it is an error, not false.
    let cel = "step.skill == 'x'";
    let block = Driver::new(&[expr("pol_b", cel, "block")]);
    let e = block.peek(&post(0, 0), at(1));
    assert_eq!((e.decision.action, types(&e)), (Action::Block, vec![ViolationType::EvaluationError]));
    // A fault is not a prevention. The block stops the run, but writes no record.
    assert!(e.record.is_none(), "an evaluation error prevents nothing");
    assert_eq!(e.decision.prevention_record_id, None);
    assert_eq!(e.decision.deciding_policy.as_ref().map(|p| p.id.as_str()), Some("pol_b"));

    let warn = Driver::new(&[expr("pol_w", cel, "warn")]);
    let e = warn.peek(&post(0, 0), at(1));
    assert_eq!((e.decision.action, types(&e)), (Action::Warn, vec![ViolationType::EvaluationError]));

    let allow = Driver::new(&[expr("pol_a", cel, "allow")]);
    let e = allow.peek(&post(0, 0), at(1));
    assert_eq!(e.decision.action, Action::Allow);
    assert_eq!(e.fail_opens.len(), 1, "fail-open is counted");
    assert_eq!(e.decision.violations[0].action, Action::Allow, "and visible in the decision");
    assert!(e.decision.deciding_policy.is_none());
}

#[test]
fn a_rule_that_no_longer_compiles_fails_closed() {
    let mut broken = expr("pol_x", "true", "block");
    broken.rule = Rule::Expr(ExprRule { cel: "run.tokens >".into() });
    let run = Driver::new(&[broken]);
    let e = run.peek(&post(0, 0), at(1));
    assert_eq!((e.decision.action, types(&e)), (Action::Block, vec![ViolationType::EvaluationError]));
}

#[test]
fn run_start_and_run_end_policies_evaluate_at_their_point() {
    let start = expr("pol_s", "run.labels.env == 'prod'", "block");
    let mut start = start;
    start.bind_at = Some(BindAt::RunStart);
    let snapshot = Arc::new(snapshot(&[start]));
    let labels = [("env".to_owned(), "prod".to_owned())].into_iter().collect();
    let (mut run, e) = Run::start(snapshot, tenant(), RunId::new("r").unwrap(), labels, at(0));
    assert_eq!(
        (e.decision.action, e.decision.phase, e.decision.step_index),
        (Action::Block, DecisionPhase::RunStart, None)
    );
    run.commit(e);
    assert_eq!(run.state().status, RunStatus::Stopped);

    let mut end = expr("pol_e", "run.steps == 0", "block");
    end.bind_at = Some(BindAt::RunEnd);
    let mut run = crate::support::start(Arc::new(crate::support::snapshot(&[end])), "r", Default::default());
    let e = run.end(Outcome::Succeeded, None, at(0)).unwrap();
    assert_eq!(e.decision.action, Action::Block);
    run.commit(e);
    assert_eq!(run.state().status, RunStatus::Stopped);

    let mut ok = crate::support::start(Arc::new(crate::support::snapshot(&[])), "r2", Default::default());
    let e = ok.end(Outcome::Failed, None, at(0)).unwrap();
    ok.commit(e);
    assert_eq!(ok.state().status, RunStatus::Failed);
}

#[test]
fn a_tampered_snapshot_blocks_every_call_with_integrity_and_no_record() {
    let budget = policy(
        r#"{"id":"pol_t","name":"t","on_error":"allow","rule":{"kind":"budget","metric":"tokens","per":"run","max":10}}"#,
    );
    let snap = Snapshot::capture(&tenant(), [&budget]);
    let hash = snap.hash().unwrap();
    let mut tampered = snap.clone();
    tampered.policies[0].rule = Rule::Budget(BudgetRule {
        metric: BudgetMetric::Tokens,
        per: BudgetPer::Run,
        max: 1_000_000,
        warn_at: vec![],
        period: None,
        labels: Default::default(),
    });
    let compiled = CompiledSnapshot::load(&tampered, &hash, &PolicyLimits::default());
    assert!(compiled.is_tampered());
    // The run-start call is the first to meet the snapshot, and blocks.
    let (mut run, e) =
        Run::start(Arc::new(compiled), tenant(), RunId::new("run-1").unwrap(), Default::default(), at(1));
    assert_eq!((e.decision.action, types(&e)), (Action::Block, vec![ViolationType::Integrity]));
    assert_eq!(e.decision.snapshot_hash, hash);
    assert!(e.record.is_none(), "an integrity block is a system fault, not a prevention");
    run.commit(e);
    assert_eq!(run.state().termination.clone().unwrap().reason, TerminationReason::IntegrityFailure);

    let intact = CompiledSnapshot::load(&snap, &hash, &PolicyLimits::default());
    assert!(!intact.is_tampered());
    // A snapshot of another format version is not trusted even when its hash is recomputed to match.
    let mut future = snap.clone();
    future.format_version += 1;
    let future_hash = future.hash().unwrap();
    assert!(CompiledSnapshot::load(&future, &future_hash, &PolicyLimits::default()).is_tampered());
}
