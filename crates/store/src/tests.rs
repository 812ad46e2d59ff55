//! Unit tests: encoding round trips, group commit, every store and query, corruption and recovery.

use proptest::prelude::*;
use runguard_contract::strategies as strat;
use runguard_contract::{
    Action, ApprovalPath, AuditEntry, ChainBreak, Decision, DecisionId, DecisionPhase, Evidence, EvidenceMatch,
    Incident, IncidentId, Mode, NextCall, Pattern, PatternId, Phase, Policy, PolicyId, PolicyRef, PreventionRecord,
    RecordHash, RecordId, Regret, Remaining, RunId, RunStatus, ShadowEntry, Snapshot, SnapshotHash, StepCall,
    StepError, TenantId, Timestamp, Totals, Violation, ViolationType,
};

use crate::codec::{ENVELOPE_V1, Stored};
use crate::fixtures::{World, at, budget_policy, tenant};
use crate::test_stores::{fresh, fresh_postgres};
use crate::{
    GraduationGates, GraduationState, IntegrityError, LedgerCall, LedgerEntry, PageRequest, RecordBreak, RecordQuery,
    ShadowStats, Store, StoreErrorKind, StoreOptions, StoredRun, WriteBatch,
};

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(dir.path(), &StoreOptions { fsync: false, ..StoreOptions::default() }).unwrap()
}

fn commit(store: &Store, f: impl FnOnce(&mut WriteBatch)) -> crate::CommitReceipt {
    let mut batch = WriteBatch::new();
    f(&mut batch);
    store.commit(batch).unwrap()
}

/// A world stored with `runs` running runs named r0, r1, …
fn world_with_runs(store: &Store, runs: usize) -> (World, Vec<StoredRun>) {
    let world = World::new("acme");
    let runs: Vec<StoredRun> = (0..runs).map(|i| world.run(&format!("r{i}"))).collect();
    commit(store, |b| {
        world.setup(b);
        for run in &runs {
            b.put_run(run.clone());
        }
    });
    (world, runs)
}

// ---- round trips ------------------------------------------------------------------------------------

fn round_trip<V: Stored + PartialEq + std::fmt::Debug>(value: &V) {
    let bytes = value.encode().unwrap();
    assert!(bytes[0] == ENVELOPE_V1 || bytes[0] == crate::legacy::ENVELOPE_V2);
    assert_eq!(&V::decode(&bytes).unwrap(), value);
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    (0i64..4_000_000_000_000).prop_map(Timestamp::from_unix_millis)
}

fn record_id() -> impl Strategy<Value = RecordId> {
    any::<u128>().prop_map(RecordId::from_u128)
}

fn hash64() -> impl Strategy<Value = [u8; 32]> {
    any::<[u8; 32]>()
}

fn opt_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(strat::text())
}

fn violation() -> impl Strategy<Value = Violation> {
    (strat::policy_id(), 1u32..5, any::<bool>(), opt_text(), any::<bool>()).prop_map(
        |(policy_id, version, block, actual, with_evidence)| Violation {
            policy_id,
            policy_name: "budget".into(),
            policy_version: version,
            violation_type: if block { ViolationType::TokenLimit } else { ViolationType::ContentPolicy },
            action: if block { Action::Block } else { Action::Warn },
            threshold: Some("100".into()),
            actual,
            reason: "because".into(),
            evidence: with_evidence.then(|| Evidence {
                text: Some("output_text".into()),
                matches: vec![EvidenceMatch {
                    kind: "detector".into(),
                    name: "email".into(),
                    count: 2,
                    samples: vec!["ja…om".into()],
                }],
                signature_hash: None,
                api_endpoint: Some("/v1/users/{id}".into()),
            }),
            run_id: None,
        },
    )
}

fn decision() -> impl Strategy<Value = Decision> {
    (
        strat::run_id(),
        proptest::option::of(0u64..100),
        prop_oneof![
            Just(DecisionPhase::RunStart),
            Just(DecisionPhase::Pre),
            Just(DecisionPhase::Post),
            Just(DecisionPhase::RunEnd)
        ],
        proptest::collection::vec(violation(), 0..3),
        proptest::option::of(0u64..1000),
        hash64(),
        proptest::option::of(record_id()),
        timestamp(),
        any::<u128>(),
    )
        .prop_map(|(run_id, step_index, phase, violations, retry, hash, record, when, id)| Decision {
            decision_id: DecisionId::from_u128(id),
            run_id,
            step_index,
            phase,
            action: if violations.is_empty() { Action::Allow } else { Action::Block },
            deciding_policy: violations.first().map(|v| PolicyRef {
                id: v.policy_id.clone(),
                name: v.policy_name.clone(),
                version: v.policy_version,
            }),
            shadow: violations
                .iter()
                .map(|v| ShadowEntry {
                    policy_id: v.policy_id.clone(),
                    policy_version: 1,
                    would_action: Action::Throttle,
                    violation_type: ViolationType::RateLimit,
                    reason: "r".into(),
                })
                .collect(),
            violations,
            remaining: Remaining { tokens: retry, cost_micros: None, steps: Some(3), duration_ms: None },
            retry_after_ms: retry,
            snapshot_hash: SnapshotHash::from_bytes(&hash),
            prevention_record_id: record,
            evaluated_at: when,
        })
}

fn record() -> impl Strategy<Value = PreventionRecord> {
    (
        record_id(),
        1u64..u64::MAX,
        strat::tenant_id(),
        strat::run_id(),
        proptest::option::of(0u64..50),
        strat::policy_id(),
        proptest::option::of(strat::signature()),
        hash64(),
        hash64(),
        timestamp(),
        any::<bool>(),
    )
        .prop_map(|(id, seq, tenant_id, run_id, step_index, policy_id, signature, h1, h2, when, sim)| {
            PreventionRecord {
                id,
                seq,
                tenant_id,
                run_id,
                step_index,
                phase: DecisionPhase::Pre,
                decision_id: DecisionId::from_u128(7),
                policy_id,
                policy_version: 3,
                pattern_id: signature.as_ref().map(|s| strat::pattern_rule_for(s).pattern_id),
                signature_hash: signature.map(|s| s.hash()),
                incident_id_blocked: IncidentId::from_u128(9),
                snapshot_hash: SnapshotHash::from_bytes(&h1),
                prevented_at: when,
                is_simulated: sim,
                prev_hash: RecordHash::from_bytes(&h2),
                hash: RecordHash::from_bytes(&h1),
            }
        })
}

fn step_call() -> impl Strategy<Value = StepCall> {
    (0u64..20, any::<bool>())
        .prop_flat_map(|(i, pre)| if pre { strat::pre_call(i).boxed() } else { strat::post_call(i).boxed() })
}

fn totals() -> impl Strategy<Value = Totals> {
    (any::<u64>(), any::<u64>(), 0u64..1000, any::<u64>())
        .prop_map(|(tokens, cost_micros, steps, duration_ms)| Totals { tokens, cost_micros, steps, duration_ms })
}

proptest! {
    #[test]
    fn records_round_trip(r in record()) {
        round_trip(&r);
    }

    #[test]
    fn ledger_entries_round_trip(call in step_call(), d in decision(), t in totals(), which in 0u8..3, pos in any::<u64>()) {
        let call = match which {
            0 => LedgerCall::Step(call),
            1 => LedgerCall::RunStart,
            _ => LedgerCall::RunEnd { outcome: runguard_contract::Outcome::Failed, error: Some(StepError { error_type: Some("Timeout".into()), code: None, status: Some(504), message: Some("m".into()) }) },
        };
        round_trip(&LedgerEntry { position: pos, call, decision: d, totals_after: t, effects: vec![7, 8, 9] });
    }

    #[test]
    fn policies_round_trip(p in strat::policy_for(tenant("acme")), g in strat::policy_for(tenant("acme"))) {
        round_trip(&p);
        let mut global = g;
        global.tenant_id = None;
        global.scope = runguard_contract::Scope::Global;
        global.activated_at = None;
        round_trip(&global);
    }

    #[test]
    fn snapshots_store_and_verify(policies in strat::policies_for(tenant("acme"), 6)) {
        let (_dir, store) = fresh();
        let snapshot = Snapshot::capture(&tenant("acme"), &policies);
        commit(&store, |b| { b.put_snapshot(snapshot.clone()); });
        prop_assert_eq!(store.load_snapshot(&snapshot.hash().unwrap()).unwrap(), snapshot);
    }

    #[test]
    fn learning_loop_types_round_trip(sig in strat::signature(), t in strat::tenant_id(), run in strat::run_id(), when in timestamp(), n in 1u64..100, sev in 1u8..=10, rid in record_id()) {
        let pattern_id = strat::pattern_rule_for(&sig).pattern_id;
        round_trip(&Incident { id: IncidentId::from_u128(u128::from(n)), tenant_id: t.clone(), run_id: run, signature_hash: sig.hash(), signature: sig.clone(), error: StepError { error_type: Some("timeout".into()), code: Some("E".into()), status: None, message: None }, pattern_id: pattern_id.clone(), created_at: when });
        round_trip(&Pattern { id: pattern_id, tenant_id: t, signature_hash: sig.hash(), signature: sig, error_type: "timeout".into(), occurrences: n, first_seen: when, last_seen: when, incident_ids: vec![IncidentId::from_u128(1)], policy_id: Some(PolicyId::new("pol_x").unwrap()) });
        round_trip(&AuditEntry { policy_id: PolicyId::new("pol_x").unwrap(), from: Some(Mode::Shadow), to: Mode::Active, at: when, caller: "ops".into(), reason: None, approval_path: ApprovalPath::AutoRegret });
        round_trip(&Regret { record_id: rid, policy_id: PolicyId::new("pol_x").unwrap(), severity: sev, note: Some("fp".into()), caller: "ops".into(), at: when });
        round_trip(&ShadowStats { evaluations: n, would_block: 1, would_warn: 2, would_throttle: 3 });
        round_trip(&GraduationState { level: "beta".into(), degraded_from: None, reason: Some("gate 1".into()), at: when, gates: GraduationGates { prevention_passed: true, counted_preventions: n, last_prevention_at: Some(when), ..GraduationGates::default() } });
    }

    #[test]
    fn runs_round_trip(t in totals(), labels in proptest::collection::btree_map("[a-z]{1,5}", "[a-z ]{0,8}", 0..4), status in 0u8..5, when in timestamp()) {
        let mut run = World::new("acme").run("r1");
        run.totals = t;
        run.labels = labels;
        run.status = [RunStatus::Running, RunStatus::Stopped, RunStatus::Succeeded, RunStatus::Failed, RunStatus::Expired][usize::from(status)];
        run.ended_at = Some(when);
        run.termination_reason = Some(runguard_contract::TerminationReason::IntegrityFailure);
        run.next = NextCall { index: 4, phase: Phase::Post };
        round_trip(&run);
    }
}

#[test]
fn envelopes_reject_unknown_versions_trailing_bytes_and_garbage() {
    let entry = ShadowStats { evaluations: 1, ..ShadowStats::default() };
    let mut bytes = entry.encode().unwrap();
    bytes.push(0);
    assert!(ShadowStats::decode(&bytes).unwrap_err().message().contains("trailing"));
    bytes.pop();
    bytes[0] = 9;
    assert!(ShadowStats::decode(&bytes).unwrap_err().message().contains("unknown envelope version 9"));
    assert_eq!(ShadowStats::decode(&[]).unwrap_err().kind(), StoreErrorKind::Corrupt);
    // A length prefix claiming far more than the limit fails without allocating it.
    let huge = [ENVELOPE_V1, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
    assert_eq!(String::decode(&huge).unwrap_err().kind(), StoreErrorKind::Corrupt);
}

// ---- group commit and the chain ---------------------------------------------------------------------

on_both_backends! {
fn records_get_gap_free_seqs_and_a_verifying_chain_in_batch_order(store) {
    let (world, runs) = world_with_runs(&store, 3);
    let receipt = commit(&store, |b| {
        world.push_block(b, &runs[0], 0, at(100));
        world.push_block(b, &runs[1], 2, at(50));
    });
    let seqs: Vec<u64> = receipt.records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2]);
    assert_eq!(receipt.records[0].prev_hash, RecordHash::genesis());
    assert_eq!(receipt.records[1].prev_hash, receipt.records[0].hash);
    assert_eq!(receipt.ledger_positions, [0, 0]);
    let receipt = commit(&store, |b| {
        world.push_block(b, &runs[2], 0, at(70));
    });
    assert_eq!(receipt.records[0].seq, 3);
    assert_eq!(store.chain_head().unwrap(), (3, receipt.records[0].hash.clone()));
    let all: Vec<PreventionRecord> = store.export_records(1).map(Result::unwrap).collect();
    assert_eq!(runguard_contract::verify_chain(&all).unwrap(), receipt.records[0].hash);
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!((report.records_checked, report.snapshots_checked), (3, 1));
    let run = store.get_run(&world.tenant, &runs[0].run_id).unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Stopped);
    assert_eq!(run.violation_policy_id, Some(world.policy.id.clone()));
}
}

on_both_backends! {
fn a_contract_breach_fails_the_whole_batch_and_writes_nothing(store) {
    let (world, runs) = world_with_runs(&store, 2);
    let mut batch = WriteBatch::new();
    world.push_block(&mut batch, &runs[0], 0, at(5));
    // A record whose decision names a different policy version.
    let record_id = RecordId::new("prv_bad").unwrap();
    let decision = world.block(&runs[1].run_id, 0, &record_id, at(6));
    let record = world.record_for(&decision, at(6));
    let mut other_version = world.policy.clone();
    other_version.version = 2;
    batch.append_record(record, decision, other_version, world.tenant.clone());
    let err = store.commit(batch).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Contract);
    assert!(
        err.message().contains("write 3 of the batch") && err.message().contains("prevention record refused"),
        "{err}"
    );
    assert_eq!(store.chain_head().unwrap().0, 0);
    assert!(store.export_records(1).next().is_none());
    assert_eq!(store.get_run(&world.tenant, &runs[0].run_id).unwrap().unwrap().status, RunStatus::Running);
    assert!(store.last_ledger_entry(&world.tenant, &runs[0].run_id).unwrap().is_none());
}
}

on_both_backends! {
fn shadow_and_foreign_tenant_records_are_refused(store) {
    let (world, runs) = world_with_runs(&store, 1);
    let record_id = RecordId::new("prv_x").unwrap();
    let decision = world.block(&runs[0].run_id, 0, &record_id, at(6));
    let record = world.record_for(&decision, at(6));
    let mut shadow = world.policy.clone();
    shadow.mode = Mode::Shadow;
    let mut batch = WriteBatch::new();
    batch.append_record(record.clone(), decision.clone(), shadow, world.tenant.clone());
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Contract);
    let mut batch = WriteBatch::new();
    batch.append_record(record.clone(), decision.clone(), world.policy.clone(), tenant("globex"));
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Contract);
    // A live record of a run that does not exist.
    let ghost = RunId::new("ghost").unwrap();
    let decision = world.block(&ghost, 0, &record_id, at(6));
    let mut batch = WriteBatch::new();
    batch.append_record(world.record_for(&decision, at(6)), decision, world.policy.clone(), world.tenant.clone());
    let err = store.commit(batch).unwrap_err();
    assert!(err.message().contains("does not exist"), "{err}");
    // A simulated record appended as live, and a live one appended as simulated.
    let mut simulated = record.clone();
    simulated.is_simulated = true;
    let mut batch = WriteBatch::new();
    batch.append_record(
        simulated,
        decision_for(&world, &runs[0], &record_id),
        world.policy.clone(),
        world.tenant.clone(),
    );
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Contract);
    let mut batch = WriteBatch::new();
    batch.append_simulated_record(record);
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Contract);
    assert!(store.verify().unwrap().is_ok());
    assert_eq!(store.chain_head().unwrap().0, 0);
}
}

fn decision_for(world: &World, run: &StoredRun, record: &RecordId) -> Decision {
    world.block(&run.run_id, 0, record, at(6))
}

on_both_backends! {
fn duplicate_record_ids_conflict(store) {
    let (world, runs) = world_with_runs(&store, 1);
    commit(&store, |b| {
        world.push_block(b, &runs[0], 0, at(5));
    });
    let mut batch = WriteBatch::new();
    world.push_block(&mut batch, &runs[0], 0, at(5));
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Conflict);
}
}

on_both_backends! {
fn injected_failures_write_nothing_and_the_store_recovers(store) {
    let (world, runs) = world_with_runs(&store, 2);
    store.inject_commit_failure(true);
    let mut batch = WriteBatch::new();
    world.push_block(&mut batch, &runs[0], 0, at(5));
    let err = store.commit(batch.clone()).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Injected);
    assert_eq!(store.chain_head().unwrap().0, 0);
    assert!(store.last_ledger_entry(&world.tenant, &runs[0].run_id).unwrap().is_none());
    assert_eq!(store.get_run(&world.tenant, &runs[0].run_id).unwrap().unwrap().status, RunStatus::Running);
    store.inject_commit_failure(false);
    let receipt = store.commit(batch).unwrap();
    assert_eq!(receipt.records[0].seq, 1);
    assert!(store.verify().unwrap().is_ok());
}
}

// ---- policies ---------------------------------------------------------------------------------------

on_both_backends! {
fn policy_versions_are_kept_and_races_conflict(store) {
    let acme = tenant("acme");
    let v1 = budget_policy(Some(&acme), "pol_a", Mode::Shadow, 10);
    let generation = store.policy_generation();
    commit(&store, |b| {
        b.put_policy_version(v1.clone());
    });
    assert_ne!(store.policy_generation(), generation, "a policy write changes the policy generation");
    let v2 = v1.with_mode(Mode::Active, at(5));
    commit(&store, |b| {
        b.put_policy_version(v2.clone());
    });
    let (world, _) = world_with_runs(&store, 1);
    let generation = store.policy_generation();
    commit(&store, |b| {
        b.put_run(world.run("r-other"));
    });
    assert_eq!(store.policy_generation(), generation, "writes of other things leave it alone");
    assert_eq!(store.get_policy(Some(&acme), &v1.id, None).unwrap(), Some(v2.clone()));
    assert_eq!(store.get_policy(Some(&acme), &v1.id, Some(1)).unwrap(), Some(v1.clone()));
    assert_eq!(store.get_policy(Some(&acme), &v1.id, Some(3)).unwrap(), None);
    assert_eq!(store.policy_versions(Some(&acme), &v1.id).unwrap(), [v1.clone(), v2.clone()]);
    // A writer that read version 1 and writes its version 2 loses the race.
    let stale = v1.with_mode(Mode::Disabled, at(6));
    let mut batch = WriteBatch::new();
    batch.put_policy_version(stale);
    let err = store.commit(batch).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict);
    assert!(err.message().contains("is at version 2"), "{err}");
    assert_ne!(store.policy_generation(), generation, "so does a failed attempt (caches only get colder)");
    // Creating an existing id conflicts; two versions in one batch chain.
    let mut batch = WriteBatch::new();
    batch.put_policy_version(v1.clone());
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Conflict);
    let v3 = v2.with_mode(Mode::Disabled, at(7));
    let v4 = v3.with_mode(Mode::Active, at(8));
    commit(&store, |b| {
        b.put_policy_version(v3).put_policy_version(v4.clone());
    });
    assert_eq!(store.get_policy(Some(&acme), &v1.id, None).unwrap(), Some(v4));
    // Scope and owner must agree.
    let mut bad = budget_policy(Some(&acme), "pol_b", Mode::Active, 1);
    bad.tenant_id = None;
    let mut batch = WriteBatch::new();
    batch.put_policy_version(bad);
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Contract);
}
}

on_both_backends! {
fn policies_list_global_then_own_filtered_and_paginated(store) {
    let acme = tenant("acme");
    let globex = tenant("globex");
    commit(&store, |b| {
        b.put_policy_version(budget_policy(None, "pol_g1", Mode::Active, 1));
        b.put_policy_version(budget_policy(Some(&acme), "pol_a1", Mode::Active, 1));
        b.put_policy_version(budget_policy(Some(&acme), "pol_a2", Mode::Shadow, 1));
        b.put_policy_version(budget_policy(Some(&acme), "pol_a3", Mode::Active, 1));
        b.put_policy_version(budget_policy(Some(&globex), "pol_x", Mode::Active, 1));
    });
    let ids = |page: &crate::Page<Policy>| page.items.iter().map(|p| p.id.to_string()).collect::<Vec<_>>();
    let all = store.list_policies(&acme, None, &PageRequest::first(100)).unwrap();
    assert_eq!(ids(&all), ["pol_g1", "pol_a1", "pol_a2", "pol_a3"]);
    assert_eq!(all.next_cursor, None);
    let active = store.list_policies(&acme, Some(Mode::Active), &PageRequest::first(100)).unwrap();
    assert_eq!(ids(&active), ["pol_g1", "pol_a1", "pol_a3"]);
    // Walk with limit 1 across the global/tenant boundary.
    let mut seen = Vec::new();
    let mut page = PageRequest::first(1);
    loop {
        let got = store.list_policies(&acme, None, &page).unwrap();
        seen.extend(ids(&got));
        match got.next_cursor {
            Some(c) => page = PageRequest::after(1, c),
            None => break,
        }
    }
    assert_eq!(seen, ["pol_g1", "pol_a1", "pol_a2", "pol_a3"]);
    // A cursor from another tenant's list is refused.
    let other = store.list_policies(&globex, None, &PageRequest::first(1)).unwrap();
    assert_eq!(ids(&other), ["pol_g1"]);
    let other = store.list_policies(&globex, None, &PageRequest::after(1, other.next_cursor.unwrap())).unwrap();
    assert_eq!(ids(&other), ["pol_x"]);
    assert_eq!(
        store.list_policies(&acme, None, &PageRequest::after(5, "00zz")).unwrap_err().kind(),
        StoreErrorKind::InvalidArgument
    );
    assert_eq!(store.find_policy(&acme, &PolicyId::new("pol_g1").unwrap(), None).unwrap().unwrap().tenant_id, None);
    assert!(store.find_policy(&acme, &PolicyId::new("pol_x").unwrap(), None).unwrap().is_none());
}
}

/// An operator's manual mode change of `policy` to `to`, at `at(n)`.
fn manual_audit(policy: &PolicyId, to: Mode, n: i64, reason: Option<String>) -> AuditEntry {
    AuditEntry {
        policy_id: policy.clone(),
        from: None,
        to,
        at: at(n),
        caller: "ops".into(),
        reason,
        approval_path: ApprovalPath::Manual,
    }
}

on_both_backends! {
fn the_activation_audit_appends_in_order(store) {
    let acme = tenant("acme");
    let policy = budget_policy(Some(&acme), "pol_a", Mode::Shadow, 1);
    let entry = |to: Mode, n: i64| manual_audit(&policy.id, to, n, Some(format!("step {n}")));
    commit(&store, |b| {
        b.put_policy_version(policy.clone()).append_audit(Some(acme.clone()), entry(Mode::Shadow, 0));
    });
    commit(&store, |b| {
        b.append_audit(Some(acme.clone()), entry(Mode::Active, 1))
            .append_audit(Some(acme.clone()), entry(Mode::Disabled, 2));
    });
    let audit = store.policy_audit(Some(&acme), &policy.id, &PageRequest::first(10)).unwrap();
    assert_eq!(audit.items.iter().map(|e| e.to).collect::<Vec<_>>(), [Mode::Shadow, Mode::Active, Mode::Disabled]);
    let mut batch = WriteBatch::new();
    batch.append_audit(None, entry(Mode::Active, 3));
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::NotFound);
}
}

// ---- snapshots and runs -----------------------------------------------------------------------------

on_both_backends! {
fn snapshots_are_content_addressed_and_found_by_id(store) {
    let world = World::new("acme");
    commit(&store, |b| {
        b.put_snapshot(world.snapshot.clone()).put_snapshot(world.snapshot.clone());
    });
    let found = store.snapshot_by_id(&world.snapshot_ref.id).unwrap().unwrap();
    assert_eq!(found.hash, world.snapshot_ref.hash);
    assert_eq!(found.snapshot.unwrap(), world.snapshot);
    assert!(store.snapshot_by_id(&runguard_contract::SnapshotId::new("snp_00").unwrap()).unwrap().is_none());
    let missing = SnapshotHash::from_bytes(&[7; 32]);
    assert_eq!(store.load_snapshot(&missing).unwrap_err(), IntegrityError::SnapshotMissing { hash: missing });
    assert_eq!(store.verify().unwrap().snapshots_checked, 1);
}
}

on_both_backends! {
fn runs_bind_once_need_their_snapshot_and_list_by_tenant(store) {
    let (world, runs) = world_with_runs(&store, 3);
    let mut rebound = runs[0].clone();
    let other = Snapshot::capture(&world.tenant, []);
    rebound.snapshot = other.reference().unwrap();
    let mut unbound = rebound.clone();
    unbound.run_id = RunId::new("r9").unwrap();
    let mut batch = WriteBatch::new();
    batch.put_run(unbound);
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::NotFound, "snapshot not stored");
    let mut batch = WriteBatch::new();
    batch.put_snapshot(other).put_run(rebound);
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Conflict);

    let page = store.list_runs(&world.tenant, &PageRequest::first(2)).unwrap();
    assert_eq!(page.items.len(), 2);
    let rest = store.list_runs(&world.tenant, &PageRequest::after(2, page.next_cursor.unwrap())).unwrap();
    assert_eq!((rest.items.len(), rest.next_cursor), (1, None));
    assert!(store.list_runs(&tenant("globex"), &PageRequest::first(5)).unwrap().items.is_empty());
    assert!(store.get_run(&tenant("globex"), &runs[0].run_id).unwrap().is_none());
    // A filtered page skips what the filter refuses and still pages by run id.
    let odd = |run: &StoredRun| run.run_id != runs[1].run_id;
    let page = store.list_runs_where(&world.tenant, &PageRequest::first(1), &odd).unwrap();
    assert_eq!(page.items[0].run_id, runs[0].run_id);
    let rest = store.list_runs_where(&world.tenant, &PageRequest::after(1, page.next_cursor.unwrap()), &odd).unwrap();
    assert_eq!((rest.items.len(), rest.next_cursor), (1, None));
    assert_eq!(rest.items[0].run_id, runs[2].run_id);

    let mut ended = runs[1].clone();
    ended.status = RunStatus::Succeeded;
    commit(&store, |b| {
        b.put_run(ended);
    });
    let starts: Vec<crate::RunStart> = store.running_run_starts().map(Result::unwrap).collect();
    let expected: Vec<crate::RunStart> = [&runs[0], &runs[2]]
        .iter()
        .map(|r| crate::RunStart { tenant_id: r.tenant_id.clone(), run_id: r.run_id.clone(), created_at: r.created_at })
        .collect();
    assert_eq!(starts, expected, "the expiry sweep's view of the running runs");
}
}

on_both_backends! {
fn ledgers_keep_every_call_and_load_run_checks_totals(store) {
    let (world, runs) = world_with_runs(&store, 2);
    let mut run = runs[0].clone();
    let e0 = world.post(&mut run, 0, 30);
    let e1 = world.post(&mut run, 1, 40);
    let receipt = commit(&store, |b| {
        b.append_ledger(world.tenant.clone(), run.run_id.clone(), e0.clone())
            .append_ledger(world.tenant.clone(), run.run_id.clone(), e1.clone())
            .put_run(run.clone());
    });
    assert_eq!(receipt.ledger_positions, [0, 1]);
    let loaded = store.load_run(&world.tenant, &run.run_id).unwrap().unwrap();
    assert!(loaded.is_intact(), "{:?}", loaded.ledger_problem);
    assert_eq!(loaded.snapshot.as_ref().unwrap(), &world.snapshot);
    assert_eq!(loaded.ledger.len(), 2);
    assert_eq!(loaded.ledger[1].position, 1);
    assert_eq!(store.last_ledger_entry(&world.tenant, &run.run_id).unwrap().unwrap().decision, e1.decision);
    let page = store.ledger(&world.tenant, &run.run_id, &PageRequest::first(1)).unwrap();
    assert_eq!(page.items[0].position, 0);
    assert!(page.next_cursor.is_some());

    // A run whose stored totals disagree with its ledger is reported. (A running run's totals on sled are
    // its last ledger entry's, so the run is ended here: its row is then the one that counts.)
    let mut lying = run.clone();
    lying.status = RunStatus::Succeeded;
    lying.totals.tokens = 5;
    commit(&store, |b| {
        b.put_run(lying);
    });
    let loaded = store.load_run(&world.tenant, &run.run_id).unwrap().unwrap();
    assert!(!loaded.totals_consistent && !loaded.is_intact());
    assert!(matches!(loaded.ledger_problem, Some(IntegrityError::TotalsMismatch { .. })));

    // A ledger entry whose totals do not follow from the call's usage is reported too.
    let mut run2 = runs[1].clone();
    let mut bad = world.post(&mut run2, 0, 10);
    bad.totals_after.tokens += 1;
    run2.totals = bad.totals_after;
    commit(&store, |b| {
        b.append_ledger(world.tenant.clone(), run2.run_id.clone(), bad).put_run(run2.clone());
    });
    assert!(!store.load_run(&world.tenant, &run2.run_id).unwrap().unwrap().totals_consistent);
    assert!(store.load_run(&world.tenant, &RunId::new("nope").unwrap()).unwrap().is_none());
    let mut batch = WriteBatch::new();
    batch.append_ledger(world.tenant.clone(), RunId::new("nope").unwrap(), e0);
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::NotFound);
}
}

// ---- record queries ---------------------------------------------------------------------------------

/// Four live records over two runs and one simulated record; returns the world and the runs.
fn records_fixture(store: &Store) -> (World, Vec<StoredRun>) {
    let (world, runs) = world_with_runs(store, 4);
    commit(store, |b| {
        world.push_block(b, &runs[0], 0, at(100));
        world.push_block(b, &runs[1], 1, at(200));
    });
    commit(store, |b| {
        world.push_block(b, &runs[2], 0, at(300));
        world.push_block(b, &runs[3], 4, at(150));
    });
    let record_id = RecordId::new("prv_sim").unwrap();
    let mut simulated = world.record_for(&world.block(&runs[0].run_id, 0, &record_id, at(120)), at(120));
    simulated.is_simulated = true;
    commit(store, |b| {
        b.append_simulated_record(simulated);
    });
    (world, runs)
}

fn seqs(page: &crate::Page<PreventionRecord>) -> Vec<u64> {
    page.items.iter().map(|r| r.seq).collect()
}

on_both_backends! {
fn record_queries_filter_by_time_policy_run_and_simulation(store) {
    let (world, runs) = records_fixture(&store);
    let q = RecordQuery::tenant(world.tenant.clone());
    assert_eq!(seqs(&store.list_records(&q).unwrap()), [1, 4, 2, 3], "ordered by prevented_at");
    let window = RecordQuery { since: Some(at(150)), until: Some(at(300)), ..q.clone() };
    assert_eq!(seqs(&store.list_records(&window).unwrap()), [4, 2]);
    let by_policy = RecordQuery { policy_id: Some(world.policy.id.clone()), since: Some(at(200)), ..q.clone() };
    assert_eq!(seqs(&store.list_records(&by_policy).unwrap()), [2, 3]);
    let other_policy = RecordQuery { policy_id: Some(PolicyId::new("pol_other").unwrap()), ..q.clone() };
    assert!(store.list_records(&other_policy).unwrap().items.is_empty());
    let by_run = RecordQuery { run_id: Some(runs[1].run_id.clone()), ..q.clone() };
    assert_eq!(seqs(&store.list_records(&by_run).unwrap()), [2]);
    let simulated = RecordQuery { simulated: true, ..q.clone() };
    assert_eq!(seqs(&store.list_records(&simulated).unwrap()), [5]);
    let sim_run = RecordQuery { simulated: true, run_id: Some(runs[0].run_id.clone()), ..q.clone() };
    assert_eq!(seqs(&store.list_records(&sim_run).unwrap()), [5]);
    let other = RecordQuery::tenant(tenant("globex"));
    assert!(store.list_records(&other).unwrap().items.is_empty());
    let one = store.list_records(&q).unwrap().items[0].clone();
    assert_eq!(store.get_record(&world.tenant, &one.id).unwrap(), Some(one.clone()));
    assert_eq!(store.get_record(&tenant("globex"), &one.id).unwrap(), None);
    assert!(store.verify().unwrap().is_ok());
}
}

on_both_backends! {
fn record_pagination_edges(store) {
    // Empty.
    let q = RecordQuery::tenant(tenant("acme"));
    let empty = store.list_records(&q).unwrap();
    assert!(empty.items.is_empty() && empty.next_cursor.is_none());
    let (world, _) = records_fixture(&store);
    let q = RecordQuery::tenant(world.tenant.clone());
    // Exactly one page.
    let page = store.list_records(&RecordQuery { page: PageRequest::first(4), ..q.clone() }).unwrap();
    assert_eq!((page.items.len(), page.next_cursor.clone()), (4, None));
    // Limit 1 walks every record once, and the cursor at the end gives an empty last page.
    let mut walked = Vec::new();
    let mut page = PageRequest::first(1);
    let mut last_cursor = None;
    loop {
        let got = store.list_records(&RecordQuery { page: page.clone(), ..q.clone() }).unwrap();
        walked.extend(seqs(&got));
        match got.next_cursor {
            Some(c) => {
                last_cursor = Some(c.clone());
                page = PageRequest::after(1, c);
            }
            None => break,
        }
    }
    assert_eq!(walked, [1, 4, 2, 3]);
    assert!(last_cursor.is_some());
    let last = store.record_at(3).unwrap().unwrap();
    let mut end_cursor = crate::keys::records_of_tenant(&world.tenant, false);
    end_cursor.extend(crate::keys::Key::new().time(last.prevented_at).u64(3).into_vec());
    let after_end = store
        .list_records(&RecordQuery { page: PageRequest::after(10, hex::encode(end_cursor)), ..q.clone() })
        .unwrap();
    assert!(after_end.items.is_empty() && after_end.next_cursor.is_none());
    // Cursors with time windows continue inside the window.
    let window = RecordQuery { since: Some(at(150)), page: PageRequest::first(1), ..q.clone() };
    let first = store.list_records(&window).unwrap();
    let second = store
        .list_records(&RecordQuery { page: PageRequest::after(5, first.next_cursor.clone().unwrap()), ..window })
        .unwrap();
    assert_eq!((seqs(&first), seqs(&second)), (vec![4], vec![2, 3]));
    // Bad cursors and limits are clear errors.
    for cursor in ["not hex", "00", &hex::encode("globex\0\0")] {
        let err = store.list_records(&RecordQuery { page: PageRequest::after(5, cursor), ..q.clone() }).unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::InvalidArgument);
        assert!(err.to_string().contains("cursor"), "{err}");
    }
    let err = store.list_records(&RecordQuery { page: PageRequest::first(1001), ..q.clone() }).unwrap_err();
    assert!(err.to_string().contains("limit 1001"), "{err}");
}
}

// ---- learning loop ----------------------------------------------------------------------------------

on_both_backends! {
fn shadow_stats_add_batch_deltas(store) {
    let acme = tenant("acme");
    let id = PolicyId::new("pol_s").unwrap();
    let d = ShadowStats { evaluations: 3, would_block: 1, would_warn: 1, would_throttle: 0 };
    commit(&store, |b| {
        b.add_shadow_stats(Some(acme.clone()), acme.clone(), id.clone(), d).add_shadow_stats(
            Some(acme.clone()),
            acme.clone(),
            id.clone(),
            d,
        );
    });
    commit(&store, |b| {
        let throttles = ShadowStats { would_throttle: 2, ..ShadowStats::default() };
        b.add_shadow_stats(Some(acme.clone()), acme.clone(), id.clone(), throttles);
    });
    assert_eq!(
        store.shadow_stats(Some(&acme), &id, &acme).unwrap(),
        ShadowStats { evaluations: 6, would_block: 2, would_warn: 2, would_throttle: 2 }
    );
    assert_eq!(store.shadow_stats(None, &id, &acme).unwrap(), ShadowStats::default());
}
}

on_both_backends! {
fn a_global_policys_shadow_stats_are_kept_per_tenant(store) {
    let (acme, beta) = (tenant("acme"), tenant("beta"));
    let id = PolicyId::new("pol_g").unwrap();
    let one = ShadowStats { evaluations: 1, would_block: 1, ..ShadowStats::default() };
    commit(&store, |b| {
        b.add_shadow_stats(None, acme.clone(), id.clone(), one).add_shadow_stats(None, acme.clone(), id.clone(), one);
        b.add_shadow_stats(None, beta.clone(), id.clone(), one);
    });
    assert_eq!(store.shadow_stats(None, &id, &acme).unwrap().evaluations, 2);
    assert_eq!(store.shadow_stats(None, &id, &beta).unwrap().evaluations, 1);
    assert_eq!(store.shadow_stats(Some(&acme), &id, &acme).unwrap(), ShadowStats::default());
    // A tenant policy's statistics come only from its own tenant's runs.
    let mut batch = WriteBatch::new();
    batch.add_shadow_stats(Some(acme.clone()), beta.clone(), id.clone(), one);
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Contract);
}
}

on_both_backends! {
fn policy_ids_name_one_policy_in_every_tenant_view(store) {
    let (acme, globex) = (tenant("acme"), tenant("globex"));
    commit(&store, |b| {
        b.put_policy_version(budget_policy(None, "pol_shared", Mode::Shadow, 1));
        b.put_policy_version(budget_policy(Some(&acme), "pol_own", Mode::Active, 1));
    });
    let refused = |policy: Policy| {
        let mut batch = WriteBatch::new();
        batch.put_policy_version(policy);
        store.commit(batch).unwrap_err().kind()
    };
    // Both ways: a tenant may not take a global id, a global policy may not take any tenant's id.
    assert_eq!(refused(budget_policy(Some(&acme), "pol_shared", Mode::Active, 10)), StoreErrorKind::Conflict);
    assert_eq!(refused(budget_policy(None, "pol_own", Mode::Active, 10)), StoreErrorKind::Conflict);
    // Two creations racing into one commit are caught as well, in either order.
    for global_first in [true, false] {
        let mut batch = WriteBatch::new();
        let (global, own) = (
            budget_policy(None, "pol_race", Mode::Active, 1),
            budget_policy(Some(&globex), "pol_race", Mode::Active, 1),
        );
        if global_first {
            batch.put_policy_version(global).put_policy_version(own);
        } else {
            batch.put_policy_version(own).put_policy_version(global);
        }
        assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Conflict);
    }
    // Another tenant's id, or a prefix of one, is free; a new version of an existing policy is not a creation.
    commit(&store, |b| {
        b.put_policy_version(budget_policy(Some(&globex), "pol_own", Mode::Active, 1));
        b.put_policy_version(budget_policy(None, "pol_ow", Mode::Active, 1));
        b.put_policy_version(budget_policy(None, "pol_shared", Mode::Shadow, 1).with_mode(Mode::Active, at(5)));
    });
    assert!(store.tenant_policy_id_exists(&PolicyId::new("pol_own").unwrap()).unwrap());
    assert!(!store.tenant_policy_id_exists(&PolicyId::new("pol_shared").unwrap()).unwrap());
}
}

#[test]
fn a_tenant_sees_its_own_policy_where_an_older_store_holds_a_global_one_with_its_id() {
    let (_dir, store) = fresh();
    let (acme, globex) = (tenant("acme"), tenant("globex"));
    let own = budget_policy(Some(&acme), "pol_shared", Mode::Active, 10);
    commit(&store, |b| {
        b.put_policy_version(own.clone());
    });
    // Written as a store from before the check would hold it.
    let global = budget_policy(None, "pol_shared", Mode::Shadow, 100);
    store
        .raw_tree("policies")
        .insert(crate::keys::policy_version(None, &global.id, 1), global.encode().unwrap())
        .unwrap();
    store
        .raw_tree("policy_heads")
        .insert(crate::keys::policy_prefix(None, &global.id), 1u32.encode().unwrap())
        .unwrap();
    let listed = store.list_policies(&acme, None, &PageRequest::first(10)).unwrap().items;
    assert_eq!(listed, std::slice::from_ref(&own), "only the tenant's own policy, never both");
    assert_eq!(store.find_policy(&acme, &own.id, None).unwrap(), Some(own));
    assert_eq!(store.list_policies(&globex, None, &PageRequest::first(10)).unwrap().items, [global]);
}

on_both_backends! {
fn incidents_and_audits_are_read_from_the_window_on(store) {
    let acme = tenant("acme");
    let sig = runguard_contract::Signature::normalize(Some("fetch"), Some("/v1/users/1"), &[]);
    let pid = PatternId::new("pat_1").unwrap();
    commit(&store, |b| {
        for n in 0..50u128 {
            b.put_incident(incident(&acme, n, i64::try_from(n).unwrap(), &sig, &pid));
        }
        b.put_incident(incident(&tenant("globex"), 99, 45, &sig, &pid));
    });
    let since = store.incidents_since(&acme, at(45)).unwrap();
    assert_eq!(since.iter().map(|i| i.created_at).collect::<Vec<_>>(), (45..50).map(at).collect::<Vec<_>>());
    assert!(store.incidents_since(&acme, at(50)).unwrap().is_empty());

    let policy = budget_policy(Some(&acme), "pol_a", Mode::Shadow, 1);
    let entry = |to: Mode, n: i64| manual_audit(&policy.id, to, n, None);
    commit(&store, |b| {
        b.put_policy_version(policy.clone());
        for n in 0..10 {
            b.append_audit(Some(acme.clone()), entry(if n % 2 == 0 { Mode::Active } else { Mode::Shadow }, n));
        }
    });
    let recent = store.policy_audit_since(Some(&acme), &policy.id, at(7)).unwrap();
    assert_eq!(recent.iter().map(|e| e.at).collect::<Vec<_>>(), [at(7), at(8), at(9)]);
    assert!(store.policy_audit_since(None, &policy.id, at(0)).unwrap().is_empty());
}
}

on_both_backends! {
fn simulated_records_cannot_be_regretted_and_live_ones_find_their_decision(store) {
    let (world, runs) = records_fixture(&store);
    let simulated = store.get_record(&world.tenant, &RecordId::new("prv_sim").unwrap()).unwrap().unwrap();
    assert!(simulated.is_simulated);
    let regret = Regret {
        record_id: simulated.id.clone(),
        policy_id: simulated.policy_id.clone(),
        severity: 10,
        note: None,
        caller: "ops".into(),
        at: at(1000),
    };
    let mut batch = WriteBatch::new();
    batch.put_regret(world.tenant.clone(), regret);
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Contract);
    assert!(store.get_regret(&simulated.id).unwrap().is_none());

    let live = store.record_at(1).unwrap().unwrap();
    let decision = store.record_decision(&live).unwrap().unwrap();
    assert_eq!((decision.decision_id, decision.run_id), (live.decision_id.clone(), runs[0].run_id.clone()));
}
}

fn incident(t: &TenantId, n: u128, when: i64, sig: &runguard_contract::Signature, pattern: &PatternId) -> Incident {
    Incident {
        id: IncidentId::from_u128(n),
        tenant_id: t.clone(),
        run_id: RunId::new(format!("r{n}")).unwrap(),
        signature_hash: sig.hash(),
        signature: sig.clone(),
        error: StepError { error_type: Some("timeout".into()), ..StepError::default() },
        pattern_id: pattern.clone(),
        created_at: at(when),
    }
}

on_both_backends! {
fn incidents_and_patterns_are_tenant_scoped_and_unique(store) {
    let acme = tenant("acme");
    let sig = runguard_contract::Signature::normalize(Some("fetch"), Some("/v1/users/1"), &[]);
    let pid = PatternId::new("pat_1").unwrap();
    let pattern = Pattern {
        id: pid.clone(),
        tenant_id: acme.clone(),
        signature_hash: sig.hash(),
        signature: sig.clone(),
        error_type: "timeout".into(),
        occurrences: 2,
        first_seen: at(5),
        last_seen: at(9),
        incident_ids: vec![IncidentId::from_u128(2), IncidentId::from_u128(1)],
        policy_id: None,
    };
    commit(&store, |b| {
        b.put_incident(incident(&acme, 2, 9, &sig, &pid))
            .put_incident(incident(&acme, 1, 5, &sig, &pid))
            .put_pattern(pattern.clone());
    });
    let listed = store.list_incidents(&acme, &PageRequest::first(10)).unwrap();
    assert_eq!(listed.items.iter().map(|i| i.created_at).collect::<Vec<_>>(), [at(5), at(9)]);
    assert!(store.list_incidents(&tenant("globex"), &PageRequest::first(10)).unwrap().items.is_empty());
    assert!(store.get_incident(&acme, &IncidentId::from_u128(1)).unwrap().is_some());
    let mut batch = WriteBatch::new();
    batch.put_incident(incident(&acme, 1, 5, &sig, &pid));
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Conflict);

    assert_eq!(store.find_pattern(&acme, &sig.hash(), "timeout").unwrap(), Some(pattern.clone()));
    assert_eq!(store.find_pattern(&acme, &sig.hash(), "other").unwrap(), None);
    assert_eq!(store.find_pattern(&tenant("globex"), &sig.hash(), "timeout").unwrap(), None);
    let mut grown = pattern.clone();
    grown.occurrences = 3;
    grown.policy_id = Some(PolicyId::new("pol_pat").unwrap());
    commit(&store, |b| {
        b.put_pattern(grown.clone());
    });
    assert_eq!(store.get_pattern(&acme, &pid).unwrap(), Some(grown.clone()));
    let mut twin = grown.clone();
    twin.id = PatternId::new("pat_2").unwrap();
    let mut batch = WriteBatch::new();
    batch.put_pattern(twin);
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Conflict);
    let mut moved = grown;
    moved.error_type = "other".into();
    let mut batch = WriteBatch::new();
    batch.put_pattern(moved);
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Contract);
    assert_eq!(store.list_patterns(&acme, &PageRequest::first(10)).unwrap().items.len(), 1);
}
}

on_both_backends! {
fn a_record_can_be_regretted_once(store) {
    let (world, _) = records_fixture(&store);
    let record = store.record_at(1).unwrap().unwrap();
    let regret = Regret {
        record_id: record.id.clone(),
        policy_id: record.policy_id.clone(),
        severity: 4,
        note: None,
        caller: "ops".into(),
        at: at(1000),
    };
    commit(&store, |b| {
        b.put_regret(world.tenant.clone(), regret.clone());
    });
    assert_eq!(store.get_regret(&record.id).unwrap(), Some(regret.clone()));
    assert_eq!(
        store.regrets_for_policy(&world.tenant, &record.policy_id, Some(at(999))).unwrap(),
        std::slice::from_ref(&regret)
    );
    assert!(store.regrets_for_policy(&world.tenant, &record.policy_id, Some(at(1001))).unwrap().is_empty());
    let mut batch = WriteBatch::new();
    batch.put_regret(world.tenant.clone(), regret.clone());
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Conflict);
    let mut batch = WriteBatch::new();
    batch.put_regret(tenant("globex"), Regret { record_id: store.record_at(2).unwrap().unwrap().id, ..regret.clone() });
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::NotFound, "another tenant's record");
    let mut batch = WriteBatch::new();
    batch.put_regret(world.tenant.clone(), Regret { record_id: RecordId::new("prv_none").unwrap(), ..regret });
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::NotFound);
}
}

on_both_backends! {
fn graduation_keeps_its_history(store) {
    let acme = tenant("acme");
    let state = |level: &str, n: i64| GraduationState {
        level: level.into(),
        degraded_from: (level == "degraded").then(|| "beta".into()),
        reason: None,
        at: at(n),
        gates: GraduationGates::default(),
    };
    commit(&store, |b| {
        b.set_graduation(acme.clone(), state("alpha", 0)).set_graduation(acme.clone(), state("beta", 1));
    });
    commit(&store, |b| {
        b.set_graduation(acme.clone(), state("degraded", 2));
    });
    assert_eq!(store.graduation(&acme).unwrap(), Some(state("degraded", 2)));
    let history = store.graduation_history(&acme, &PageRequest::first(10)).unwrap();
    assert_eq!(history.items.iter().map(|s| s.level.as_str()).collect::<Vec<_>>(), ["alpha", "beta", "degraded"]);
    assert_eq!(store.graduation(&tenant("globex")).unwrap(), None);
}
}

// ---- recovery and corruption ------------------------------------------------------------------------

#[test]
fn reopening_recovers_the_chain_head_and_everything_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (world, runs, head) = {
        let store = open(&dir);
        let (world, runs) = records_fixture(&store);
        let head = store.chain_head().unwrap();
        (world, runs, head)
    };
    let store = open(&dir);
    assert_eq!(store.chain_head().unwrap(), head);
    let receipt = commit(&store, |b| {
        let mut run = runs[0].clone();
        run.run_id = RunId::new("late").unwrap();
        b.put_run(run.clone());
        world.push_block(b, &run, 0, at(999));
    });
    assert_eq!(receipt.records[0].seq, head.0 + 1);
    assert_eq!(receipt.records[0].prev_hash, head.1);
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn unknown_schema_versions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(&dir);
        store.raw_tree("meta").insert(b"schema_version", 7u32.encode().unwrap()).unwrap();
        store.raw_tree("meta").flush().unwrap();
    }
    let err = Store::open(dir.path(), &StoreOptions::default()).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Schema);
    assert!(err.message().contains("schema version 7"), "{err}");
}

fn flip_last_byte(tree: &sled::Tree, key: &[u8]) {
    let mut value = tree.get(key).unwrap().unwrap().to_vec();
    let last = value.len() - 2;
    value[last] ^= 0x01;
    tree.insert(key, value).unwrap();
}

#[test]
fn a_flipped_snapshot_byte_fails_loading_closed_and_verify_names_it() {
    let (_dir, store) = fresh();
    let (world, runs) = world_with_runs(&store, 1);
    let key = hex::decode(world.snapshot_ref.hash.as_str()).unwrap();
    // Flip a byte inside the canonical JSON (a digit of `max`), keeping it parseable.
    let tree = store.raw_tree("snapshots");
    let mut value = tree.get(&key).unwrap().unwrap().to_vec();
    let pos = value.windows(6).position(|w| w == b"\"max\":").unwrap() + 6;
    value[pos] = b'9';
    tree.insert(key, value).unwrap();
    let loaded = store.load_run(&world.tenant, &runs[0].run_id).unwrap().unwrap();
    assert!(matches!(loaded.snapshot, Err(IntegrityError::SnapshotHashMismatch { .. })), "{:?}", loaded.snapshot);
    assert!(!loaded.is_intact());
    let report = store.verify().unwrap();
    let broken = report.snapshot_break.unwrap();
    assert_eq!(broken.id, world.snapshot_ref.id);
    assert!(broken.to_string().contains(world.snapshot_ref.id.as_str()), "{broken}");
    // Garbage that no longer parses is reported too.
    flip_last_byte(&tree, &hex::decode(world.snapshot_ref.hash.as_str()).unwrap());
    assert!(store.load_snapshot(&world.snapshot_ref.hash).is_err());
}

#[test]
fn a_flipped_record_byte_breaks_the_chain_at_that_record() {
    let (_dir, store) = fresh();
    let _ = records_fixture(&store);
    let tree = store.raw_tree("records");
    let key = 3u64.to_be_bytes();
    let mut record = PreventionRecord::decode(&tree.get(key).unwrap().unwrap()).unwrap();
    record.step_index = Some(77);
    tree.insert(key, record.encode().unwrap()).unwrap();
    let report = store.verify().unwrap();
    assert_eq!(report.records_checked, 2);
    assert_eq!(
        report.record_break,
        Some(RecordBreak::Chain(ChainBreak::HashMismatch { id: record.id.clone(), seq: 3 }))
    );
    // A raw flip that breaks decoding is named by its seq.
    flip_last_byte(&tree, &key);
    let broken = store.verify().unwrap().record_break.unwrap();
    assert!(matches!(broken, RecordBreak::Undecodable { seq: 3, .. } | RecordBreak::Chain(_)), "{broken:?}");
    assert!(broken.to_string().contains('3'), "{broken}");
    // Listing through the broken record fails closed instead of skipping it.
    let mut raw = tree.get(key).unwrap().unwrap().to_vec();
    raw.truncate(raw.len() / 2);
    tree.insert(key, raw).unwrap();
    let err = store.list_records(&RecordQuery::tenant(tenant("acme"))).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt);
}

#[test]
fn a_corrupt_chain_head_blocks_appends_but_not_verification() {
    let dir = tempfile::tempdir().unwrap();
    let (world, runs) = {
        let store = open(&dir);
        let fixture = records_fixture(&store);
        let tree = store.raw_tree("records");
        let key = 5u64.to_be_bytes();
        let mut raw = tree.get(key).unwrap().unwrap().to_vec();
        raw.truncate(10);
        tree.insert(key, raw).unwrap();
        store.raw_tree("records").flush().unwrap();
        fixture
    };
    let store = open(&dir);
    assert_eq!(store.chain_head().unwrap_err().kind(), StoreErrorKind::Corrupt);
    let mut batch = WriteBatch::new();
    let mut run = runs[0].clone();
    run.run_id = RunId::new("late").unwrap();
    batch.put_run(run.clone());
    world.push_block(&mut batch, &run, 0, at(5));
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Corrupt);
    assert!(matches!(store.verify().unwrap().record_break, Some(RecordBreak::Undecodable { seq: 5, .. })));
}

#[test]
fn verify_notices_a_missing_index_entry() {
    let (_dir, store) = fresh();
    let _ = records_fixture(&store);
    let record = store.record_at(2).unwrap().unwrap();
    let index = store.raw_tree("rec_by_id");
    let key = index.scan_prefix(format!("{}\0", record.id)).next().unwrap().unwrap().0;
    index.remove(key).unwrap();
    assert_eq!(
        store.verify().unwrap().record_break,
        Some(RecordBreak::IndexMissing { id: record.id, seq: 2, index: "rec_by_id" })
    );
}

on_both_backends! {
fn every_entry_of_a_failed_multi_run_batch_is_absent(store) {
    let (world, runs) = world_with_runs(&store, 2);
    let mut run = runs[0].clone();
    let entry = world.post(&mut run, 0, 10);
    let mut batch = WriteBatch::new();
    batch.append_ledger(world.tenant.clone(), run.run_id.clone(), entry).put_run(run.clone());
    batch.add_shadow_stats(
        Some(world.tenant.clone()),
        world.tenant.clone(),
        world.policy.id.clone(),
        ShadowStats { evaluations: 1, ..ShadowStats::default() },
    );
    batch.put_policy_version(world.policy.clone()); // version 1 again: conflict
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Conflict);
    assert_eq!(store.get_run(&world.tenant, &run.run_id).unwrap().unwrap().totals, Totals::default());
    assert!(store.last_ledger_entry(&world.tenant, &run.run_id).unwrap().is_none());
    assert_eq!(
        store.shadow_stats(Some(&world.tenant), &world.policy.id, &world.tenant).unwrap(),
        ShadowStats::default()
    );
}
}

#[test]
fn snapshot_ids_are_exact_and_bindings_are_per_tenant() {
    let (_dir, store) = fresh();
    let (world, _runs) = world_with_runs(&store, 2);
    let id = world.snapshot_ref.id.clone();
    assert!(store.snapshot_by_id(&id).unwrap().is_some());
    for partial in ["snp_", &id.as_str()[..6], &id.as_str()[..id.as_str().len() - 1]] {
        let partial = runguard_contract::SnapshotId::new(partial).unwrap();
        assert!(store.snapshot_by_id(&partial).unwrap().is_none(), "{partial:?} is not an id");
        assert!(!store.snapshot_bound_to(&world.tenant, &partial).unwrap());
    }
    assert!(store.snapshot_bound_to(&world.tenant, &id).unwrap());
    assert!(!store.snapshot_bound_to(&tenant("globex"), &id).unwrap(), "another tenant has no run on it");

    // A store written before the index existed is indexed once by the node.
    store.raw_tree("snapshot_bindings").clear().unwrap();
    assert!(!store.snapshot_bound_to(&world.tenant, &id).unwrap());
    store.index_snapshot_bindings().unwrap();
    assert!(store.snapshot_bound_to(&world.tenant, &id).unwrap());
    assert!(!store.snapshot_bound_to(&tenant("globex"), &id).unwrap());
}

// ---- PostgreSQL twins of the tests above that reach into sled's trees or directory ------------------

fn fresh_postgres_at() -> Option<(String, Store)> {
    let db = runguard_testpg::fresh_database()?;
    let store = Store::open_postgres(&db.url, &crate::PgOptions::default()).unwrap();
    Some((db.url, store))
}

#[test]
fn snapshot_ids_are_exact_and_bindings_are_per_tenant_on_postgres() {
    let Some(store) = fresh_postgres() else { return };
    let (world, _runs) = world_with_runs(&store, 2);
    let id = world.snapshot_ref.id.clone();
    assert!(store.snapshot_by_id(&id).unwrap().is_some());
    for partial in ["snp_", &id.as_str()[..6], &id.as_str()[..id.as_str().len() - 1]] {
        let partial = runguard_contract::SnapshotId::new(partial).unwrap();
        assert!(store.snapshot_by_id(&partial).unwrap().is_none(), "{partial:?} is not an id");
        assert!(!store.snapshot_bound_to(&world.tenant, &partial).unwrap());
    }
    assert!(store.snapshot_bound_to(&world.tenant, &id).unwrap());
    assert!(!store.snapshot_bound_to(&tenant("globex"), &id).unwrap(), "another tenant has no run on it");
    // The binding is the run row itself: nothing to index.
    store.index_snapshot_bindings().unwrap();
    assert!(store.snapshot_bound_to(&world.tenant, &id).unwrap());
}

#[test]
fn a_tenant_sees_its_own_policy_where_an_older_store_holds_a_global_one_with_its_id_on_postgres() {
    let Some((url, store)) = fresh_postgres_at() else { return };
    let (acme, globex) = (tenant("acme"), tenant("globex"));
    let own = budget_policy(Some(&acme), "pol_shared", Mode::Active, 10);
    commit(&store, |b| {
        b.put_policy_version(own.clone());
    });
    // Written with SQL, as a database from before the check (or an operator) could hold it.
    let global = budget_policy(None, "pol_shared", Mode::Shadow, 100);
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let body = serde_json::to_value(&global).unwrap();
    client
        .execute(
            "INSERT INTO policies (owner, policy_id, version, mode, body) VALUES ('', 'pol_shared', 1, 'shadow', $1)",
            &[&body],
        )
        .unwrap();
    client.batch_execute("INSERT INTO policy_heads (owner, policy_id, version) VALUES ('', 'pol_shared', 1)").unwrap();
    let listed = store.list_policies(&acme, None, &PageRequest::first(10)).unwrap().items;
    assert_eq!(listed, std::slice::from_ref(&own), "only the tenant's own policy, never both");
    assert_eq!(store.find_policy(&acme, &own.id, None).unwrap(), Some(own));
    assert_eq!(store.list_policies(&globex, None, &PageRequest::first(10)).unwrap().items, [global]);
}

#[test]
fn reopening_recovers_the_chain_head_and_everything_acknowledged_on_postgres() {
    let Some((url, store)) = fresh_postgres_at() else { return };
    let (world, runs) = records_fixture(&store);
    let head = store.chain_head().unwrap();
    let commits = store.commit_count();
    drop(store);
    let store = Store::open_postgres(&url, &crate::PgOptions::default()).unwrap();
    assert_eq!(store.chain_head().unwrap(), head);
    assert_eq!(store.commit_count(), commits);
    let receipt = commit(&store, |b| {
        let mut run = runs[0].clone();
        run.run_id = RunId::new("late").unwrap();
        b.put_run(run.clone());
        world.push_block(b, &run, 0, at(999));
    });
    assert_eq!(receipt.records[0].seq, head.0 + 1);
    assert_eq!(receipt.records[0].prev_hash, head.1);
    assert!(store.verify().unwrap().is_ok());
}

// ---- parent and child runs --------------------------------------------------------------------------

fn usage(tokens: u64) -> crate::RunRollup {
    crate::RunRollup { descendants: Totals { tokens, steps: 1, ..Totals::default() }, children: 0 }
}

on_both_backends! {
fn descendants_roll_up_into_every_ancestor_without_losing_a_concurrent_increment(store) {
    let (world, runs) = world_with_runs(&store, 3);
    let (root, parent) = (runs[0].run_id.clone(), runs[1].run_id.clone());
    commit(&store, |b| {
        b.roll_up(world.tenant.clone(), vec![root.clone()], crate::RunRollup { children: 1, ..Default::default() });
    });
    // Two descendants' calls in one group: each adds to what the other left.
    let batches: Vec<WriteBatch> = [10u64, 32]
        .into_iter()
        .map(|tokens| {
            let mut batch = WriteBatch::new();
            batch.append_ledger(
                world.tenant.clone(),
                runs[2].run_id.clone(),
                LedgerEntry::new(crate::LedgerCall::RunStart, world.allow(&runs[2].run_id, 0), Totals::default()),
            );
            batch.roll_up(world.tenant.clone(), vec![root.clone(), parent.clone()], usage(tokens));
            batch
        })
        .collect();
    for result in store.commit_group(batches) {
        result.unwrap();
    }
    let root_rollup = store.run_rollup(&world.tenant, &root).unwrap();
    assert_eq!(root_rollup.descendants.tokens, 42);
    assert_eq!(root_rollup.descendants.steps, 2);
    assert_eq!(root_rollup.children, 1);
    assert_eq!(store.run_rollup(&world.tenant, &parent).unwrap().descendants.tokens, 42);
    assert_eq!(store.run_rollup(&world.tenant, &runs[2].run_id).unwrap(), crate::RunRollup::default());
}
}

on_both_backends! {
fn a_roll_up_into_a_missing_run_fails_the_batch_with_its_ledger_entry(store) {
    let (world, runs) = world_with_runs(&store, 1);
    let mut batch = WriteBatch::new();
    batch.append_ledger(
        world.tenant.clone(),
        runs[0].run_id.clone(),
        LedgerEntry::new(crate::LedgerCall::RunStart, world.allow(&runs[0].run_id, 0), Totals::default()),
    );
    batch.roll_up(world.tenant.clone(), vec![RunId::new("ghost").unwrap()], usage(5));
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::NotFound);
    assert!(store.full_ledger(&world.tenant, &runs[0].run_id).unwrap().is_empty(), "nothing half-written");
}
}

on_both_backends! {
fn a_rolled_up_bound_that_no_longer_holds_fails_only_its_callers_batch(store) {
    let (world, runs) = world_with_runs(&store, 3);
    let (parent, first, second) = (runs[0].run_id.clone(), runs[1].run_id.clone(), runs[2].run_id.clone());
    // Two children's posts of 60 tokens each, both decided within the parent's budget of 100, reach one
    // group commit: the first fits, the second's bound sees the first's increment and fails alone.
    let batches: Vec<WriteBatch> = [&first, &second]
        .into_iter()
        .map(|child| {
            let mut batch = WriteBatch::new();
            batch.append_ledger(
                world.tenant.clone(),
                child.clone(),
                LedgerEntry::new(crate::LedgerCall::RunStart, world.allow(child, 0), Totals::default()),
            );
            batch.roll_up(world.tenant.clone(), vec![parent.clone()], usage(60));
            batch.check_rolled_up(world.tenant.clone(), parent.clone(), runguard_contract::BudgetMetric::Tokens, 100);
            batch
        })
        .collect();
    let results = store.commit_group(batches);
    assert!(results[0].is_ok(), "{:?}", results[0]);
    let refused = results[1].as_ref().unwrap_err();
    assert!(refused.is_rolled_up_limit(), "{refused}");
    assert_eq!(store.run_rollup(&world.tenant, &parent).unwrap().descendants.tokens, 60);
    assert!(store.full_ledger(&world.tenant, &second).unwrap().is_empty(), "nothing of the refused batch");
    // A bound below what is stored fails by itself, without any write.
    let mut batch = WriteBatch::new();
    batch.check_rolled_up(world.tenant.clone(), parent.clone(), runguard_contract::BudgetMetric::Tokens, 59);
    assert!(store.commit(batch).unwrap_err().is_rolled_up_limit());
}
}

on_both_backends! {
fn an_advanced_run_reads_back_with_its_steps_totals_and_next_call(store) {
    let (world, runs) = world_with_runs(&store, 2);
    let mut run = runs[0].clone();
    for step in 0..3 {
        let entry = world.post(&mut run, step, 10 + step);
        commit(&store, |b| {
            b.append_ledger(world.tenant.clone(), run.run_id.clone(), entry).advance_run(run.clone());
        });
    }
    assert_eq!(store.get_run(&world.tenant, &run.run_id).unwrap().unwrap(), run);
    let listed = store.list_runs(&world.tenant, &PageRequest::first(10)).unwrap();
    assert_eq!(listed.items[0], run);
    assert_eq!(listed.items[1], runs[1], "a run without steps reads as written");
    let all: Vec<StoredRun> = store.all_runs().map(Result::unwrap).collect();
    assert_eq!(all[0], run);
    let loaded = store.load_run(&world.tenant, &run.run_id).unwrap().unwrap();
    assert!(loaded.is_intact(), "{:?}", loaded.ledger_problem);
    assert_eq!(loaded.run, run);
    assert_eq!(loaded.ledger.len(), 3);

    // An entry that moves nothing, appended without writing the run, leaves the run as its last step did.
    let mut quiet = world.post(&mut run.clone(), 3, 99);
    quiet.decision.action = runguard_contract::Action::Throttle;
    quiet.decision.decision_id = runguard_contract::DecisionId::new("dec_r0_quiet").unwrap();
    quiet.totals_after = run.totals;
    commit(&store, |b| {
        b.append_ledger(world.tenant.clone(), run.run_id.clone(), quiet);
    });
    assert_eq!(store.get_run(&world.tenant, &run.run_id).unwrap().unwrap(), run);
    // A throttled step moves nothing: the run is written whole, and reads as written.
    let mut throttled = world.post(&mut run.clone(), 3, 99);
    throttled.decision.action = runguard_contract::Action::Throttle;
    throttled.totals_after = run.totals;
    commit(&store, |b| {
        b.append_ledger(world.tenant.clone(), run.run_id.clone(), throttled).put_run(run.clone());
    });
    assert_eq!(store.get_run(&world.tenant, &run.run_id).unwrap().unwrap(), run);
    // Stopping writes the run whole too; it then reads exactly as written.
    let mut stopped = run.clone();
    stopped.status = RunStatus::Stopped;
    commit(&store, |b| {
        b.put_run(stopped.clone());
    });
    assert_eq!(store.get_run(&world.tenant, &run.run_id).unwrap().unwrap(), stopped);
}
}

on_both_backends! {
fn an_advanced_runs_totals_bound_its_rolled_up_checks_and_outlast_a_long_run_of_throttles(store) {
    let (world, runs) = world_with_runs(&store, 1);
    let mut run = runs[0].clone();
    let entry = world.post(&mut run, 0, 40);
    commit(&store, |b| {
        b.append_ledger(world.tenant.clone(), run.run_id.clone(), entry).advance_run(run.clone());
    });
    let tokens = run.totals.tokens;
    assert!(tokens > 0);
    // A family bound on the run counts the totals its newest entry leaves, not its row's.
    let bound = |max: u64| {
        let mut batch = WriteBatch::new();
        batch.check_rolled_up(world.tenant.clone(), run.run_id.clone(), runguard_contract::BudgetMetric::Tokens, max);
        store.commit(batch)
    };
    assert!(bound(tokens - 1).unwrap_err().is_rolled_up_limit());
    assert!(bound(tokens).is_ok());
    // More throttles than a read looks at first, none of them rewriting the run: it reads as its step left it.
    for n in 0..12 {
        let mut throttled = world.post(&mut run.clone(), 1, 99);
        throttled.decision.action = runguard_contract::Action::Throttle;
        throttled.decision.decision_id = runguard_contract::DecisionId::new(format!("dec_r0_t{n}")).unwrap();
        throttled.totals_after = run.totals;
        commit(&store, |b| {
            b.append_ledger(world.tenant.clone(), run.run_id.clone(), throttled);
        });
    }
    assert_eq!(store.get_run(&world.tenant, &run.run_id).unwrap().unwrap(), run);
    assert_eq!(store.list_runs(&world.tenant, &PageRequest::first(10)).unwrap().items, [run.clone()]);
}
}

on_both_backends! {
fn an_advance_its_ledger_entry_does_not_account_for_is_refused_and_writes_nothing(store) {
    let (world, runs) = world_with_runs(&store, 1);
    let before = runs[0].clone();
    let refused = |f: &dyn Fn(&mut WriteBatch)| {
        let mut batch = WriteBatch::new();
        f(&mut batch);
        let err = store.commit(batch).unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Contract, "{err}");
        assert_eq!(store.get_run(&world.tenant, &before.run_id).unwrap().unwrap(), before);
        assert!(store.last_ledger_entry(&world.tenant, &before.run_id).unwrap().is_none());
        err
    };
    let mut run = before.clone();
    let entry = world.post(&mut run, 0, 10);
    // No ledger entry.
    let err = refused(&|b| {
        b.advance_run(run.clone());
    });
    assert!(err.message().contains("without its step's ledger entry"), "{err}");
    // Totals the entry does not leave.
    let mut wrong = run.clone();
    wrong.totals.tokens += 1;
    refused(&|b| {
        b.append_ledger(world.tenant.clone(), run.run_id.clone(), entry.clone()).advance_run(wrong.clone());
    });
    // A next call the entry does not leave.
    let mut skipped = run.clone();
    skipped.next.index += 1;
    refused(&|b| {
        b.append_ledger(world.tenant.clone(), run.run_id.clone(), entry.clone()).advance_run(skipped.clone());
    });
    // A throttled entry moves nothing, so it cannot advance the run.
    let mut throttled = entry.clone();
    throttled.decision.action = runguard_contract::Action::Throttle;
    refused(&|b| {
        b.append_ledger(world.tenant.clone(), run.run_id.clone(), throttled.clone()).advance_run(run.clone());
    });
    // A run that stops is written whole.
    let mut stopped = run.clone();
    stopped.status = RunStatus::Stopped;
    let err = refused(&|b| {
        b.append_ledger(world.tenant.clone(), run.run_id.clone(), entry.clone()).advance_run(stopped.clone());
    });
    assert!(err.message().contains("not running"), "{err}");
}
}

#[test]
fn sled_leaves_an_advanced_runs_row_alone_and_a_reopened_store_still_reads_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let (world, runs) = world_with_runs(&store, 1);
    let key = crate::keys::run(&world.tenant, &runs[0].run_id);
    let row = store.raw_tree("runs").get(&key).unwrap().unwrap();
    let mut run = runs[0].clone();
    let entry = world.post(&mut run, 0, 25);
    commit(&store, |b| {
        b.append_ledger(world.tenant.clone(), run.run_id.clone(), entry).advance_run(run.clone());
    });
    assert_eq!(store.raw_tree("runs").get(&key).unwrap().unwrap(), row, "one write per step: the ledger entry");
    store.sync_watermark().unwrap();
    drop(store);
    let store = open(&dir);
    assert_eq!(store.get_run(&world.tenant, &run.run_id).unwrap().unwrap(), run);
}
