//! Property tests: the prevention contract, determinism and replay, monotonicity, shadow neutrality.

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use runguard_contract::prevention::{check_record_against_decision, requires_prevention_record};
use runguard_contract::strategies::*;
use runguard_contract::*;
use std::sync::Arc;

use runguard_engine::{CompiledSnapshot, Outcome, Run, RunLimits, TenantRates};

use crate::support::{T0, at};

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

/// A sequence of calls for steps 0..n, each with an optional `pre`, at increasing times.
fn calls(max_steps: u64) -> impl Strategy<Value = Vec<(StepCall, Timestamp)>> {
    (1..=max_steps)
        .prop_flat_map(|n| {
            (0..n).map(|i| (proptest::option::of(pre_call(i)), post_call(i), 0i64..20_000)).collect::<Vec<_>>()
        })
        .prop_map(|steps| {
            let mut out = Vec::new();
            let mut now = 0i64;
            for (pre, post, gap) in steps {
                if let Some(pre) = pre {
                    now += gap / 2;
                    out.push((pre, at(now)));
                }
                now += gap;
                out.push((post, at(now)));
            }
            out
        })
}

fn compile(tenant: &TenantId, policies: &[Policy]) -> Arc<CompiledSnapshot> {
    Arc::new(CompiledSnapshot::compile(&Snapshot::capture(tenant, policies), &PolicyLimits::default()).unwrap())
}

fn new_run(snapshot: &Arc<CompiledSnapshot>, tenant: &TenantId) -> Run {
    let labels = [("team".to_owned(), "red".to_owned())].into_iter().collect();
    let (mut run, start) =
        Run::start(Arc::clone(snapshot), tenant.clone(), RunId::new("run-prop").unwrap(), labels, at(0));
    run.commit(start);
    run
}

/// Drives a run through every call it evaluates; returns each outcome with the run before it.
fn drive(snapshot: &Arc<CompiledSnapshot>, tenant: &TenantId, calls: &[(StepCall, Timestamp)]) -> Vec<(Run, Outcome)> {
    let mut run = new_run(snapshot, tenant);
    let mut rates = TenantRates::default();
    let mut out = Vec::new();
    for (call, now) in calls {
        let Ok(outcome) = run.step(call, &RunLimits::default(), &mut rates, *now) else { continue };
        if outcome.is_replay() {
            continue;
        }
        let before = run.clone();
        run.commit(outcome.clone());
        out.push((before, outcome));
    }
    out
}

/// The outcome of `call` on `run` (which is left as it is), with empty tenant windows.
fn step(run: &Run, call: &StepCall, now: Timestamp) -> Outcome {
    run.step(call, &RunLimits::default(), &mut TenantRates::default(), now).unwrap()
}

proptest! {
    #![proptest_config(config())]

    /// The prevention contract: a record exists exactly when an active policy decides a block; it always satisfies the
    /// contract check the store applies; shadow, throttle, warn and integrity never produce one.
    #[test]
    fn records_come_only_from_blocks_decided_by_active_policies(
        policies in policies_for(TenantId::new("acme").unwrap(), 6),
        calls in calls(6),
    ) {
        let tenant = TenantId::new("acme").unwrap();
        let snapshot = compile(&tenant, &policies);
        for (_, evaluation) in drive(&snapshot, &tenant, &calls) {
            let decision = &evaluation.decision;
            let required = requires_prevention_record(decision, evaluation.deciding_mode);
            prop_assert_eq!(evaluation.record.is_some(), required);
            if let Some(record) = &evaluation.record {
                prop_assert_eq!(decision.action, Action::Block);
                prop_assert_eq!(evaluation.deciding_mode, Some(Mode::Active));
                let deciding = decision.deciding_policy.as_ref().unwrap();
                let policy = snapshot.policy(&deciding.id).unwrap();
                prop_assert!(check_record_against_decision(record, decision, policy, &tenant).is_ok());
            }
            if matches!(decision.action, Action::Allow | Action::Warn | Action::Throttle) {
                prop_assert!(evaluation.record.is_none());
            }
        }
    }

    /// A snapshot of only shadow policies never changes an action or writes a record.
    #[test]
    fn shadow_only_snapshots_always_allow(
        policies in policies_for(TenantId::new("acme").unwrap(), 6),
        calls in calls(5),
    ) {
        let tenant = TenantId::new("acme").unwrap();
        let shadow: Vec<Policy> = policies.into_iter().map(|mut p| { p.mode = Mode::Shadow; p }).collect();
        let snapshot = compile(&tenant, &shadow);
        for (_, evaluation) in drive(&snapshot, &tenant, &calls) {
            prop_assert_eq!(evaluation.decision.action, Action::Allow);
            prop_assert!(evaluation.record.is_none());
            prop_assert!(evaluation.decision.violations.is_empty());
        }
    }

    /// Adding shadow policies leaves the action, the deciding policy, the violations and the record as
    /// they were.
    #[test]
    fn shadow_policies_never_change_the_outcome(
        active in policies_for(TenantId::new("acme").unwrap(), 4),
        extra in policies_for(TenantId::new("acme").unwrap(), 4),
        calls in calls(4),
    ) {
        let tenant = TenantId::new("acme").unwrap();
        let active: Vec<Policy> = active.into_iter().map(|mut p| { p.mode = Mode::Active; p }).collect();
        let mut with_shadow = active.clone();
        for (i, mut p) in extra.into_iter().enumerate() {
            p.mode = Mode::Shadow;
            p.id = PolicyId::new(format!("pol_shadow_{i}")).unwrap();
            with_shadow.push(p);
        }
        let plain = drive(&compile(&tenant, &active), &tenant, &calls);
        let shadowed = drive(&compile(&tenant, &with_shadow), &tenant, &calls);
        // Both runs take the same calls: tier bookkeeping of shadow budgets is per policy and does not leak
        // into active decisions.
        prop_assert_eq!(plain.len(), shadowed.len());
        for ((_, base), (_, other)) in plain.iter().zip(&shadowed) {
            prop_assert_eq!(other.decision.action, base.decision.action);
            prop_assert_eq!(&other.decision.deciding_policy, &base.decision.deciding_policy);
            prop_assert_eq!(&other.decision.violations, &base.decision.violations);
            prop_assert_eq!(other.record.is_some(), base.record.is_some());
        }
    }

    /// Determinism: the same inputs give the same evaluation, and replaying a run's calls against its
    /// snapshot reproduces its decisions.
    #[test]
    fn evaluation_is_deterministic_and_replay_reproduces_decisions(
        policies in policies_for(TenantId::new("acme").unwrap(), 6),
        calls in calls(6),
    ) {
        let tenant = TenantId::new("acme").unwrap();
        let snapshot = compile(&tenant, &policies);
        let live = drive(&snapshot, &tenant, &calls);
        for (run, outcome) in &live {
            let call = calls.iter().find(|(c, now)| Some(c.index) == outcome.decision.step_index
                && DecisionPhase::from(c.phase) == outcome.decision.phase && *now == outcome.decision.evaluated_at);
            if let Some((call, now)) = call {
                let once = step(run, call, *now);
                let twice = step(&run.clone(), call, *now);
                prop_assert_eq!(&once.decision, &twice.decision);
                prop_assert_eq!(&once.record, &twice.record);
                prop_assert_eq!(&once.effects, &twice.effects);
                prop_assert_eq!(&once.shadow, &twice.shadow);
            }
        }
        // Replaying the calls on a new run of a snapshot compiled again reproduces every decision.
        let replayed: Vec<Decision> =
            drive(&compile(&tenant, &policies), &tenant, &calls).into_iter().map(|(_, e)| e.decision).collect();
        let live: Vec<Decision> = live.into_iter().map(|(_, e)| e.decision).collect();
        prop_assert_eq!(replayed, live);
    }

    /// More usage never turns a block into an allow (budgets and rates).
    #[test]
    fn more_usage_never_relaxes_a_block(
        budgets in proptest::collection::vec(budget_rule(), 1..4),
        rate in rate_rule(),
        prior in 0u64..3_000,
        usage in 0u64..3_000,
        more in 0u64..3_000,
    ) {
        let tenant = TenantId::new("acme").unwrap();
        let mut policies: Vec<Policy> = budgets.into_iter().enumerate().map(|(i, rule)| {
            let doc = PolicyDocument { id: None, name: "b".into(), scope: Scope::Tenant, mode: Mode::Active,
                action: PolicyAction::Block, precedence: 100, on_error: OnError::Block, bind_at: None, rule: Rule::Budget(rule) };
            Policy::create(doc, PolicyId::new(format!("pol_{i}")).unwrap(), Some(tenant.clone()), Timestamp::from_unix_millis(T0))
        }).collect();
        let doc = PolicyDocument { id: None, name: "r".into(), scope: Scope::Tenant, mode: Mode::Active,
            action: PolicyAction::Block, precedence: 100, on_error: OnError::Block, bind_at: None, rule: Rule::Rate(rate) };
        policies.push(Policy::create(doc, PolicyId::new("pol_rate").unwrap(), Some(tenant.clone()), Timestamp::from_unix_millis(T0)));
        let snapshot = compile(&tenant, &policies);
        let call = |index: u64, tokens: u64| StepCall { usage: Some(Usage { tokens, cost_micros: tokens, duration_ms: tokens }), ..StepCall::new(index, Phase::Post) };
        // The run's earlier usage comes from a first step when the run takes it, else it is part of this one.
        let mut run = new_run(&snapshot, &tenant);
        let (index, prior) = match run.step(&call(0, prior), &RunLimits::default(), &mut TenantRates::default(), at(1)) {
            Ok(first) if matches!(first.decision.action, Action::Allow | Action::Warn) => { run.commit(first); (1, 0) }
            _ => (0, prior),
        };
        let small = step(&run, &call(index, prior + usage), at(2));
        let large = step(&run, &call(index, prior + usage + more), at(2));
        prop_assert!(large.decision.action >= small.decision.action, "{:?} then {:?}", small.decision.action, large.decision.action);
        if small.decision.action == Action::Block {
            prop_assert_eq!(large.decision.action, Action::Block);
        }
    }

    /// Adding a policy never makes a decision less restrictive.
    #[test]
    fn adding_a_policy_never_relaxes_a_decision(
        policies in policies_for(TenantId::new("acme").unwrap(), 5),
        extra in policy_for(TenantId::new("acme").unwrap()),
        calls in calls(4),
    ) {
        let tenant = TenantId::new("acme").unwrap();
        let mut more = policies.clone();
        let mut extra = extra;
        extra.id = PolicyId::new("pol_extra").unwrap();
        more.push(extra);
        let base = drive(&compile(&tenant, &policies), &tenant, &calls);
        let extended = drive(&compile(&tenant, &more), &tenant, &calls);
        // The two runs take the same calls until their decisions first differ; from there their states do.
        for ((_, base), (_, other)) in base.iter().zip(&extended) {
            prop_assert_eq!(base.decision.step_index, other.decision.step_index);
            prop_assert!(other.decision.action >= base.decision.action);
            if other.decision.action != base.decision.action {
                break;
            }
        }
    }

    /// A pattern policy blocks only its own tenant's requests with its own signature (and endpoint).
    #[test]
    fn pattern_policies_block_only_matching_requests_of_their_tenant(
        policy_sig in signature(),
        request_sig_source in (skill(), endpoint(), input_keys()),
        same in any::<bool>(),
        name_endpoint in any::<bool>(),
        run_tenant in tenant_id(),
    ) {
        let owner = TenantId::new("acme").unwrap();
        let mut rule = pattern_rule_for(&policy_sig);
        if name_endpoint { rule.api_endpoint = Some(policy_sig.api_endpoint.clone()); }
        let doc = PolicyDocument { id: None, name: "p".into(), scope: Scope::Tenant, mode: Mode::Active,
            action: PolicyAction::Block, precedence: 100, on_error: OnError::Block, bind_at: None, rule: Rule::Pattern(rule.clone()) };
        let policy = Policy::create(doc, PolicyId::new("pol_p").unwrap(), Some(owner.clone()), Timestamp::from_unix_millis(T0));
        // Force the policy into the run's snapshot even for another tenant, to test the predicate itself.
        let mut snap = Snapshot::capture(&owner, [&policy]);
        snap.policies[0].tenant_id = Some(owner.clone());
        let snapshot = Arc::new(CompiledSnapshot::compile(&snap, &PolicyLimits::default()).unwrap());
        let (skill, endpoint, keys) = if same {
            (policy_sig.skill.clone(), policy_sig.api_endpoint.clone(), policy_sig.input_keys.clone())
        } else { request_sig_source };
        let call = StepCall { skill: Some(skill.clone()), api_endpoint: Some(endpoint.clone()), input_keys: keys.clone(), ..StepCall::new(0, Phase::Pre) };
        let (mut run, start) = Run::start(snapshot, run_tenant.clone(), RunId::new("r").unwrap(), Default::default(), at(0));
        run.commit(start);
        let e = step(&run, &call, at(1));
        let request_hash = Signature::normalize(Some(&skill), Some(&endpoint), &keys).hash();
        let should_block = run_tenant == owner && request_hash == rule.signature_hash;
        prop_assert_eq!(e.decision.action == Action::Block, should_block);
        prop_assert_eq!(e.record.is_some(), should_block);
        if let Some(record) = e.record {
            prop_assert_eq!(record.signature_hash.as_ref(), Some(&rule.signature_hash));
            prop_assert_eq!(&record.tenant_id, &owner);
        }
    }

    /// A block whose deciding violation is a fault (`evaluation_error`) stops the run like any
    /// block but is no prevention: no record, no record id, and the store's check refuses one forged for it.
    #[test]
    fn fault_blocks_stop_the_run_and_write_no_record(
        policies in policies_for(TenantId::new("acme").unwrap(), 4),
        faulty_precedence in 0u32..4,
        calls in calls(4),
    ) {
        let tenant = TenantId::new("acme").unwrap();
        // Dividing by zero is an evaluation error on every call.
        let doc = PolicyDocument { id: None, name: "faulty".into(), scope: Scope::Tenant, mode: Mode::Active,
            action: PolicyAction::Block, precedence: faulty_precedence, on_error: OnError::Block, bind_at: None,
            rule: Rule::Expr(ExprRule { cel: "run.tokens / (run.steps - run.steps) > 0".into() }) };
        let faulty = Policy::create(doc, PolicyId::new("pol_faulty").unwrap(), Some(tenant.clone()), Timestamp::from_unix_millis(T0));
        let mut all = policies;
        all.retain(|p| p.id != faulty.id);
        all.push(faulty.clone());
        let snapshot = compile(&tenant, &all);
        let mut saw_fault = false;
        for (before, evaluation) in drive(&snapshot, &tenant, &calls) {
            let decision = &evaluation.decision;
            let fault = decision.deciding_violation().is_some_and(|v| v.violation_type == ViolationType::EvaluationError);
            if !fault {
                continue;
            }
            saw_fault = true;
            prop_assert_eq!(decision.action, Action::Block);
            prop_assert!(evaluation.record.is_none());
            prop_assert!(decision.prevention_record_id.is_none());
            prop_assert!(!requires_prevention_record(decision, evaluation.deciding_mode));
            let mut run = before;
            run.commit(evaluation.clone());
            prop_assert_eq!(run.state().status, RunStatus::Stopped);
            // A record forged for the fault block is refused by the check the store applies.
            let deciding = decision.deciding_policy.as_ref().unwrap();
            let policy = snapshot.policy(&deciding.id).unwrap();
            let mut forged_decision = decision.clone();
            let record_id = RecordId::new("prv_forged").unwrap();
            forged_decision.prevention_record_id = Some(record_id.clone());
            let forged = PreventionRecord {
                id: record_id, seq: 0, tenant_id: tenant.clone(), run_id: decision.run_id.clone(),
                step_index: decision.step_index, phase: decision.phase, decision_id: decision.decision_id.clone(),
                policy_id: policy.id.clone(), policy_version: policy.version, pattern_id: None, signature_hash: None,
                incident_id_blocked: IncidentId::new("inc_forged").unwrap(), snapshot_hash: decision.snapshot_hash.clone(),
                prevented_at: decision.evaluated_at, is_simulated: false, prev_hash: RecordHash::genesis(), hash: RecordHash::genesis(),
            };
            prop_assert!(check_record_against_decision(&forged, &forged_decision, policy, &tenant).is_err());
        }
        // Alone, the faulty policy decides the first `post` (other policies may stop the run earlier).
        if all.len() == 1 {
            prop_assert!(saw_fault);
        }
    }
}
