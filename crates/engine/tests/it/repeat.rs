//! Repeat rules (loop detection, `docs/evaluation.md`) through the `Run` facade: the counting and its window, the
//! evidence, and rehydration from the ledger; a property test against a model that keeps every key.

use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use runguard_contract::*;
use runguard_engine::{CompiledSnapshot, Effects, LedgerItem, Outcome, Run, RunLimits, StoredHead, TenantRates};

use crate::support::{Driver, at, policy, pre, snapshot, tenant, types};

fn repeat(id: &str, action: &str, of: &str, max: u64, window: u32) -> Policy {
    policy(&format!(
        r#"{{"id":"{id}","name":"{id}","action":"{action}","rule":{{"kind":"repeat","of":"{of}","max":{max},"window_steps":{window}}}}}"#
    ))
}

fn tool_call(index: u64, skill: &str, text: &str) -> StepCall {
    StepCall {
        skill: Some(skill.into()),
        api_endpoint: Some("/v1/search".into()),
        input_keys: vec!["q".into()],
        input_text: Some(text.into()),
        ..pre(index)
    }
}

fn failed_post(index: u64, error_type: &str) -> StepCall {
    StepCall {
        error: Some(StepError {
            error_type: Some(error_type.into()),
            code: Some("e42".into()),
            ..StepError::default()
        }),
        ..StepCall::new(index, Phase::Post)
    }
}

fn repeat_evidence(outcome: &Outcome) -> (u64, Vec<String>) {
    let violation = outcome.decision.violations.iter().find(|v| v.violation_type == ViolationType::LoopDetected);
    let entry = violation.and_then(|v| v.evidence.as_ref()).and_then(|e| e.matches.first()).expect("repeat evidence");
    assert_eq!(entry.kind, "repeat");
    (entry.count, entry.samples.clone())
}

#[test]
fn the_fourth_identical_call_is_refused_with_max_three() {
    let mut run = Driver::new(&[repeat("pol_loop", "block", "call", 3, 10)]);
    for i in 0..3 {
        assert_eq!(run.send(&tool_call(i, "search", "same"), at(1)).decision.action, Action::Allow, "step {i}");
        run.pass(&StepCall::new(i, Phase::Post), at(2));
    }
    let fourth = run.send(&tool_call(3, " Search", "same"), at(3));
    assert_eq!((fourth.decision.action, types(&fourth)), (Action::Block, vec![ViolationType::LoopDetected]));
    let violation = &fourth.decision.violations[0];
    assert_eq!((violation.threshold.as_deref(), violation.actual.as_deref()), (Some("3"), Some("4")));
    assert_eq!(repeat_evidence(&fourth), (4, vec!["0".to_owned(), "1".to_owned(), "2".to_owned()]));
    let record = fourth.record.expect("a block writes a prevention record");
    assert_eq!((record.policy_id.as_str(), record.step_index), ("pol_loop", Some(3)));
    assert!(!format!("{record:?}").contains("same"), "evidence never carries the input text");
}

#[test]
fn a_different_text_or_an_old_repeat_does_not_count() {
    let mut run = Driver::new(&[repeat("pol_loop", "block", "call", 1, 2)]);
    let steps = [("search", "a"), ("search", "b"), ("fetch", "a"), ("search", "a"), ("search", "b")];
    for (i, (skill, text)) in (0u64..).zip(steps) {
        assert_eq!(run.send(&tool_call(i, skill, text), at(1)).decision.action, Action::Allow, "step {i}");
        run.pass(&StepCall::new(i, Phase::Post), at(2));
    }
    // Step 5 repeats step 3 (inside the window of 2 steps: 3 and 4).
    let blocked = run.send(&tool_call(5, "search", "a"), at(3));
    assert_eq!(blocked.decision.action, Action::Block);
    assert_eq!(repeat_evidence(&blocked), (2, vec!["3".to_owned()]));
}

#[test]
fn repeated_errors_are_blocked_at_post() {
    let mut run = Driver::new(&[repeat("pol_errors", "block", "error", 2, 5)]);
    for (i, error_type) in [(0, "Timeout"), (1, "timeout")] {
        run.pass(&tool_call(i, "fetch", &format!("try {i}")), at(1));
        assert_eq!(run.send(&failed_post(i, error_type), at(2)).decision.action, Action::Allow);
    }
    run.pass(&tool_call(2, "fetch", "try 2"), at(3));
    let third = run.send(&failed_post(2, "TIMEOUT"), at(4));
    assert_eq!((third.decision.action, types(&third)), (Action::Block, vec![ViolationType::LoopDetected]));
    assert_eq!(repeat_evidence(&third), (3, vec!["0".to_owned(), "1".to_owned()]));
}

#[test]
fn runs_without_repeat_rules_keep_no_keys() {
    let mut with = Driver::new(&[repeat("pol_loop", "warn", "call", 5, 3)]);
    let mut without = Driver::new(&[]);
    for i in 0..6 {
        for run in [&mut with, &mut without] {
            run.pass(&tool_call(i, "s", "t"), at(1));
            run.pass(&StepCall::new(i, Phase::Post), at(2));
        }
    }
    let size = |run: &Driver| serde_json::to_string(run.state()).unwrap().len();
    assert!(size(&with) > size(&without));
    assert!(!serde_json::to_string(without.state()).unwrap().contains("repeat"));
}

/// One step of a random run: its call (skill and text from small sets, some equal once normalised), with
/// or without a `pre`, and the error of its `post`.
#[derive(Clone, Debug)]
struct Step {
    skill: usize,
    text: usize,
    with_pre: bool,
    error: Option<usize>,
    restart_after: bool,
}

const SKILLS: [&str; 3] = ["search", " Search", "fetch"];
const TEXTS: [Option<&str>; 3] = [None, Some("a"), Some("b")];
const ERRORS: [&str; 3] = ["Timeout", "timeout", "auth"];

fn step() -> impl Strategy<Value = Step> {
    (0..3usize, 0..3usize, prop::bool::weighted(0.8), prop::option::of(0..3usize), prop::bool::weighted(0.2))
        .prop_map(|(skill, text, with_pre, error, restart_after)| Step { skill, text, with_pre, error, restart_after })
}

/// The model: every step's keys, and the count over a window by scanning all of them.
#[derive(Default)]
struct Model {
    calls: Vec<(usize, usize)>,
    errors: Vec<Option<(usize, usize)>>,
}

impl Model {
    fn earlier<T: PartialEq>(keys: &[T], index: usize, window: usize, key: &T) -> Vec<u64> {
        (index.saturating_sub(window)..index).filter(|&j| keys.get(j) == Some(key)).map(|j| j as u64).collect()
    }
}

fn call_key(step: &Step) -> (usize, usize) {
    (if step.skill == 2 { 1 } else { 0 }, step.text)
}

fn error_key(error: usize) -> usize {
    if error == 2 { 1 } else { 0 }
}

fn to_calls(index: u64, step: &Step) -> (Option<StepCall>, StepCall) {
    let call = StepCall {
        skill: Some(SKILLS[step.skill].into()),
        api_endpoint: Some("/v1/items/17".into()),
        input_keys: vec!["q".into()],
        input_text: TEXTS[step.text].map(str::to_owned),
        ..StepCall::new(index, Phase::Pre)
    };
    let error = step.error.map(|e| StepError { error_type: Some(ERRORS[e].into()), ..StepError::default() });
    let post = if step.with_pre {
        StepCall { error, ..StepCall::new(index, Phase::Post) }
    } else {
        StepCall { phase: Phase::Post, error, ..call.clone() }
    };
    (step.with_pre.then_some(call), post)
}

fn rehydrate(snapshot: &Arc<CompiledSnapshot>, run: &Run, ledger: &[(Option<StepCall>, Decision, Effects)]) -> Run {
    let head = StoredHead {
        tenant_id: tenant(),
        run_id: run.state().run_id.clone(),
        labels: Default::default(),
        status: run.state().status,
        totals: run.state().totals,
        snapshot_hash: snapshot.reference().hash.clone(),
        created_at: at(0),
        ended_at: None,
        outcome: None,
    };
    let items = ledger.iter().map(|(step, decision, effects)| LedgerItem {
        step: step.as_ref(),
        decision,
        effects: Some(effects),
    });
    Run::rehydrate(Some(Arc::clone(snapshot)), head, items, true).expect("a run's own ledger checks out")
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    /// Warn-only repeat rules (so that the run goes on) of random limits and windows decide every call as a
    /// model that keeps every key predicts, and a run rebuilt from its ledger at random points carries on
    /// exactly as the live one.
    #[test]
    fn repeat_rules_count_as_a_model_of_all_keys(
        steps in prop::collection::vec(step(), 1..40),
        call_rules in prop::collection::vec((1u64..4, 1u32..8), 1..3),
        error_rule in (1u64..3, 1u32..6),
    ) {
        let mut policies: Vec<Policy> = call_rules
            .iter()
            .enumerate()
            .map(|(i, (max, window))| repeat(&format!("pol_call_{i}"), "warn", "call", *max, *window))
            .collect();
        policies.push(repeat("pol_error", "warn", "error", error_rule.0, error_rule.1));
        let snapshot = Arc::new(snapshot(&policies));
        let (mut run, started) =
            Run::start(Arc::clone(&snapshot), tenant(), RunId::new("run-p").unwrap(), Default::default(), at(0));
        let mut ledger = vec![(None, started.decision.clone(), started.effects.clone())];
        run.commit(started);
        let mut model = Model::default();
        for (i, step) in steps.iter().enumerate() {
            let index = i as u64;
            let (pre_call, post_call) = to_calls(index, step);
            let key = call_key(step);
            if let Some(call) = pre_call {
                let outcome = run.step(&call, &RunLimits::default(), &mut TenantRates::default(), at(1)).unwrap();
                let mut expected: Vec<(String, u64, Vec<u64>)> = call_rules
                    .iter()
                    .enumerate()
                    .filter_map(|(r, (max, window))| {
                        let earlier = Model::earlier(&model.calls, i, *window as usize, &key);
                        let count = earlier.len() as u64 + 1;
                        (count > *max).then(|| (format!("pol_call_{r}"), count, earlier))
                    })
                    .collect();
                expected.sort();
                let mut seen: Vec<(String, u64, Vec<u64>)> = outcome
                    .decision
                    .violations
                    .iter()
                    .map(|v| {
                        let m = &v.evidence.as_ref().unwrap().matches[0];
                        (v.policy_id.to_string(), m.count, m.samples.iter().map(|s| s.parse().unwrap()).collect())
                    })
                    .collect();
                seen.sort();
                prop_assert_eq!(seen, expected, "pre of step {}", i);
                ledger.push((Some(call), outcome.decision.clone(), outcome.effects.clone()));
                run.commit(outcome);
            }
            model.calls.push(key);
            let error = step.error.map(|e| (key.0, error_key(e)));
            model.errors.push(error);
            let outcome = run.step(&post_call, &RunLimits::default(), &mut TenantRates::default(), at(2)).unwrap();
            let expected: Option<(u64, Vec<u64>)> = error.and_then(|error| {
                let earlier = Model::earlier(&model.errors, i, error_rule.1 as usize, &Some(error));
                let count = earlier.len() as u64 + 1;
                (count > error_rule.0).then_some((count, earlier))
            });
            let seen = outcome.decision.violations.first().map(|v| {
                let m = &v.evidence.as_ref().unwrap().matches[0];
                (m.count, m.samples.iter().map(|s| s.parse().unwrap()).collect::<Vec<u64>>())
            });
            prop_assert_eq!(seen, expected, "post of step {}", i);
            ledger.push((Some(post_call), outcome.decision.clone(), outcome.effects.clone()));
            run.commit(outcome);
            if step.restart_after {
                let back = rehydrate(&snapshot, &run, &ledger);
                prop_assert_eq!(back.state(), run.state(), "rehydrated after step {}", i);
                run = back;
            }
        }
    }
}
