//! The run lifecycle through `Run`: two phases, the step limit, TTL expiry, incidents, shadow deltas and
//! rehydration with its integrity check.

use std::sync::Arc;

use runguard_contract::*;
use runguard_engine::{LedgerItem, Refusal, Run, RunLimits, StoredHead, TenantRates};

use crate::support::*;

const BUDGET: &str =
    r#"{"id":"pol_budget","name":"budget","rule":{"kind":"budget","metric":"tokens","per":"run","max":1000}}"#;
const SHADOW: &str = r#"{"id":"pol_shadow","name":"shadow","mode":"shadow","rule":{"kind":"budget","metric":"tokens","per":"run","max":10}}"#;

fn started(policies: &[Policy]) -> Run {
    let snapshot = Arc::new(snapshot(policies));
    let (mut run, outcome) = Run::start(snapshot, tenant(), RunId::new("run-1").unwrap(), Default::default(), at(0));
    let fresh = runguard_engine::RunState::new(tenant(), RunId::new("run-1").unwrap(), Default::default());
    assert_eq!(run.state(), &fresh, "start changes nothing before its commit");
    run.commit(outcome);
    run
}

fn step(run: &mut Run, call: &StepCall, now: Timestamp) -> runguard_engine::Outcome {
    let outcome = run.step(call, &RunLimits::default(), &mut TenantRates::default(), now).unwrap();
    run.commit(outcome.clone());
    outcome
}

#[test]
fn a_step_changes_the_run_only_when_committed() {
    let mut run = started(&[policy(BUDGET)]);
    let outcome = run.step(&post(0, 100), &RunLimits::default(), &mut TenantRates::default(), at(1)).unwrap();
    assert_eq!(run.state().totals.tokens, 0);
    assert_eq!(outcome.totals().map(|t| t.tokens), Some(100));
    // Dropped (its persistence failed): the same call is evaluated again, not answered as a retry.
    let again = run.step(&post(0, 100), &RunLimits::default(), &mut TenantRates::default(), at(1)).unwrap();
    assert!(!again.is_replay());
    run.commit(again);
    assert_eq!(run.state().totals.tokens, 100);
    let retry = run.step(&post(0, 100), &RunLimits::default(), &mut TenantRates::default(), at(2)).unwrap();
    assert!(retry.is_replay() && retry.totals().is_none());
}

#[test]
fn the_step_limit_refuses_calls_past_it() {
    let run = started(&[]);
    let limits = RunLimits::new(1);
    assert_eq!(
        run.step(&pre(1), &limits, &mut TenantRates::default(), at(1)).unwrap_err(),
        Refusal::OutOfOrder { expected: NextCall { index: 0, phase: Phase::Pre } }
    );
    let mut run = run;
    let _ = step(&mut run, &post(0, 1), at(1));
    assert_eq!(
        run.step(&pre(1), &limits, &mut TenantRates::default(), at(2)).unwrap_err(),
        Refusal::StepLimit { max: 1 }
    );
}

#[test]
fn shadow_deltas_count_evaluations_and_would_be_blocks() {
    let mut run = started(&[policy(SHADOW)]);
    let outcome = step(&mut run, &post(0, 100), at(1));
    assert_eq!(outcome.shadow.len(), 1);
    let delta = &outcome.shadow[0];
    assert_eq!((delta.evaluations, delta.would_block, delta.owner.as_ref()), (1, 1, Some(&tenant())));
}

#[test]
fn a_failed_end_carries_its_failing_step_as_incident_basis() {
    let mut run = started(&[]);
    let failing = StepCall {
        skill: Some("fetch".into()),
        error: Some(StepError { error_type: Some("Timeout".into()), ..StepError::default() }),
        ..post(0, 1)
    };
    let _ = step(&mut run, &failing, at(1));
    let end = run.end(Outcome::Failed, None, at(2)).unwrap();
    let incident = end.incident.clone().expect("a failed end of a running run creates an incident");
    assert_eq!((incident.signature.skill.as_str(), incident.error.error_type.as_deref()), ("fetch", Some("Timeout")));
    run.commit(end);
    assert_eq!(
        (run.state().status, run.ended_at(), run.outcome()),
        (RunStatus::Failed, Some(at(2)), Some(Outcome::Failed))
    );
    assert!(run.end(Outcome::Failed, None, at(3)).is_none(), "ending an ended run changes nothing");

    let mut succeeded = started(&[]);
    let end = succeeded.end(Outcome::Succeeded, None, at(1)).unwrap();
    assert!(end.incident.is_none());
    succeeded.commit(end);
}

#[test]
fn a_running_run_expires_once_its_ttl_has_passed() {
    let mut run = started(&[]);
    let limits = RunLimits::default().with_ttl(std::time::Duration::from_secs(1));
    assert!(!run.expire_if_due(at(999), &limits));
    assert!(!run.expire_if_due(at(1_000_000), &RunLimits::default()), "without a TTL a run never expires");
    assert!(run.expire_if_due(at(1000), &limits));
    assert_eq!((run.state().status, run.ended_at()), (RunStatus::Expired, Some(at(1000))));
    assert!(!run.expire_if_due(at(5000), &limits), "an expired run does not expire again");
}

/// The rule a host applies to a stored run, of which it knows only the creation time, is the one a live
/// run expires by.
#[test]
fn a_stored_run_is_due_exactly_when_a_live_run_expires() {
    let limits = RunLimits::new(10).with_ttl(std::time::Duration::from_millis(1500));
    for now in [at(0), at(1499), at(1500), at(9000)] {
        let mut live = started(&[]);
        assert_eq!(limits.ttl_elapsed(live.created_at(), now), live.expire_if_due(now, &limits), "at {now:?}");
    }
    assert!(!RunLimits::default().ttl_elapsed(at(0), Timestamp::from_unix_millis(i64::MAX)));
    let forever = RunLimits::default().with_ttl(std::time::Duration::MAX);
    assert!(!forever.ttl_elapsed(at(0), at(1_000_000_000)), "a TTL too long for a timestamp never elapses");
}

#[test]
fn rehydration_replays_the_ledger_and_fails_closed_when_it_does_not_check_out() {
    let policies = [policy(BUDGET)];
    let snapshot = Arc::new(snapshot(&policies));
    let (mut run, start) =
        Run::start(Arc::clone(&snapshot), tenant(), RunId::new("run-1").unwrap(), Default::default(), at(0));
    let mut ledger = vec![(None, start.decision.clone(), start.effects.clone())];
    run.commit(start);
    let call = post(0, 300);
    let outcome = step(&mut run, &call, at(1));
    ledger.push((Some(call), outcome.decision.clone(), outcome.effects.clone()));
    let head = |totals| StoredHead {
        tenant_id: tenant(),
        run_id: RunId::new("run-1").unwrap(),
        labels: Default::default(),
        status: RunStatus::Running,
        totals,
        snapshot_hash: snapshot.reference().hash.clone(),
        created_at: at(0),
        ended_at: None,
        outcome: None,
    };
    let items = || {
        ledger.iter().map(|(step, decision, effects)| LedgerItem {
            step: step.as_ref(),
            decision,
            effects: Some(effects),
        })
    };

    let back = Run::rehydrate(Some(Arc::clone(&snapshot)), head(run.state().totals), items(), true).unwrap();
    assert_eq!(back.state().totals, run.state().totals);
    assert_eq!(back.state().next, run.state().next);

    let tampered = Run::rehydrate(Some(Arc::clone(&snapshot)), head(Totals::default()), items(), true).unwrap_err();
    let blocked = tampered.run.step(&pre(1), &RunLimits::default(), &mut TenantRates::default(), at(2)).unwrap();
    assert_eq!(blocked.decision.action, Action::Block, "a run failing its integrity check blocks every call");
    assert!(Run::rehydrate(Some(Arc::clone(&snapshot)), head(run.state().totals), items(), false).is_err());
    assert!(Run::rehydrate(None, head(run.state().totals), items(), true).is_err());
    assert!(Run::rehydrate(Some(Arc::clone(&snapshot)), head(Totals::default()), std::iter::empty(), true).is_err());
}

#[test]
fn an_outcome_knows_the_totals_its_commit_leaves() {
    let rate = r#"{"id":"pol_rate","name":"rate","rule":{"kind":"rate","metric":"steps","max":1,"window_s":60}}"#;
    let mut run = started(&[policy(rate)]);
    for (index, at_ms) in [(0, 1), (1, 2)] {
        let call = StepCall { usage: Some(Usage { tokens: 5, ..Usage::default() }), ..pre(index) };
        let outcome = run.step(&call, &RunLimits::default(), &mut TenantRates::default(), at(at_ms)).unwrap();
        let totals = outcome.totals();
        let after = run.after(&outcome);
        run.commit(outcome);
        assert_eq!(totals, Some(run.state().totals));
        assert_eq!(after.state().totals, run.state().totals);
        if run.state().next == (NextCall { index, phase: Phase::Post }) {
            let post = post(index, 5);
            let outcome = run.step(&post, &RunLimits::default(), &mut TenantRates::default(), at(at_ms)).unwrap();
            assert_eq!(outcome.totals(), Some(run.after(&outcome).state().totals));
            run.commit(outcome);
        }
    }
}
