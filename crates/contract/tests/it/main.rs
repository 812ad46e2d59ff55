//! Property tests of the contract's invariants: validation, canonical hashing, the record chain and
//! signature normalisation.

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use runguard_contract::prevention::{counts_for_graduation, may_create_incident};
use runguard_contract::strategies::*;
use runguard_contract::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

fn record(n: u64) -> PreventionRecord {
    PreventionRecord {
        id: RecordId::from_u128(u128::from(n)),
        seq: 0,
        tenant_id: TenantId::new("acme").unwrap(),
        run_id: RunId::new(format!("run-{n}")).unwrap(),
        step_index: Some(n),
        phase: DecisionPhase::Post,
        decision_id: DecisionId::from_u128(u128::from(n)),
        policy_id: PolicyId::new("pol_budget").unwrap(),
        policy_version: 1,
        pattern_id: None,
        signature_hash: None,
        incident_id_blocked: IncidentId::from_u128(u128::from(n)),
        snapshot_hash: SnapshotHash::from_bytes(&[7; 32]),
        prevented_at: Timestamp::from_unix_millis(1_000 + i64::try_from(n).unwrap()),
        is_simulated: false,
        prev_hash: RecordHash::genesis(),
        hash: RecordHash::genesis(),
    }
}

fn chain(len: u64) -> Vec<PreventionRecord> {
    let mut prev = RecordHash::genesis();
    (1..=len)
        .map(|seq| {
            let sealed = record(seq).seal(seq, prev.clone()).unwrap();
            prev = sealed.hash.clone();
            sealed
        })
        .collect()
}

proptest! {
    #![proptest_config(config())]

    /// Every generated document validates, and survives a JSON round trip unchanged.
    #[test]
    fn generated_documents_are_valid_and_round_trip(doc in policy_document()) {
        let limits = PolicyLimits::default();
        prop_assert!(doc.validate(&limits).is_ok(), "{:?}", doc.validate(&limits));
        let json = serde_json::to_vec(&doc).unwrap();
        let back = PolicyDocument::from_json(&json, &limits).unwrap();
        prop_assert_eq!(back, doc);
    }

    /// The snapshot hash depends on the policy set, not on the order policies were listed in.
    #[test]
    fn snapshot_hashes_ignore_listing_order(policies in policies_for(TenantId::new("acme").unwrap(), 6), seed in any::<u64>()) {
        let tenant = TenantId::new("acme").unwrap();
        let mut shuffled = policies.clone();
        if !shuffled.is_empty() {
            let len = shuffled.len();
            shuffled.rotate_left(usize::try_from(seed).unwrap_or(0) % len);
        }
        let a = Snapshot::capture(&tenant, &policies);
        let b = Snapshot::capture(&tenant, &shuffled);
        prop_assert_eq!(a.hash().unwrap(), b.hash().unwrap());
        prop_assert!(a.verify(&b.hash().unwrap()));
    }

    /// Changing any policy's precedence or name changes the snapshot hash.
    #[test]
    fn any_policy_change_changes_the_snapshot_hash(policies in policies_for(TenantId::new("acme").unwrap(), 4), which in any::<prop::sample::Index>()) {
        prop_assume!(!policies.is_empty());
        let tenant = TenantId::new("acme").unwrap();
        let original = Snapshot::capture(&tenant, &policies);
        let mut changed = original.clone();
        let i = which.index(changed.policies.len());
        changed.policies[i].precedence = changed.policies[i].precedence.wrapping_add(1);
        prop_assert!(!changed.verify(&original.hash().unwrap()));
    }

    /// A chain verifies, and tampering with any field of any record is reported at that record.
    #[test]
    fn the_record_chain_detects_any_tampering(len in 1u64..12, victim in any::<prop::sample::Index>(), field in 0u8..6) {
        let mut records = chain(len);
        prop_assert!(verify_chain(&records).is_ok());
        let i = victim.index(records.len());
        let target = &mut records[i];
        match field {
            0 => target.policy_version += 1,
            1 => target.is_simulated = !target.is_simulated,
            2 => target.prevented_at = target.prevented_at.plus_millis(1),
            3 => target.step_index = None,
            4 => target.seq += 1,
            _ => target.prev_hash = RecordHash::from_bytes(&[1; 32]),
        }
        let err = verify_chain(&records).unwrap_err();
        let id = match &err {
            ChainBreak::HashMismatch { id, .. } | ChainBreak::BrokenLink { id, .. } | ChainBreak::SequenceGap { id, .. } => id.clone(),
        };
        prop_assert_eq!(&id, &records[i].id, "{}", err);
    }

    /// Normalisation is idempotent and insensitive to key order, duplicates, case of the skill and ids.
    #[test]
    fn signature_normalisation_is_idempotent(skill in skill(), endpoint in endpoint(), keys in input_keys(), other_id in 0u32..1_000_000) {
        let sig = Signature::normalize(Some(&skill), Some(&endpoint), &keys);
        let again = Signature::normalize(Some(&sig.skill), Some(&sig.api_endpoint), &sig.input_keys);
        prop_assert_eq!(&again, &sig);
        let mut reversed = keys.clone();
        reversed.reverse();
        reversed.extend(keys.iter().cloned());
        let base = endpoint.trim_end_matches('/').rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap_or_default();
        let other = Signature::normalize(Some(&skill.to_uppercase()), Some(&format!("{base}/{other_id}?q=1")), &reversed);
        prop_assert_eq!(other.hash(), sig.hash());
    }

    /// Prevention contract rule (6): only real records at or after the latest activation count.
    #[test]
    fn graduation_counts_only_real_records_after_activation(offset in -5_000i64..5_000, simulated in any::<bool>()) {
        let mut r = record(1);
        r.is_simulated = simulated;
        let activation = r.prevented_at.plus_millis(offset);
        prop_assert_eq!(counts_for_graduation(&r, Some(activation)), !simulated && offset <= 0);
        prop_assert!(!counts_for_graduation(&r, None));
    }
}

#[test]
fn only_running_runs_that_fail_create_incidents() {
    for status in [RunStatus::Running, RunStatus::Stopped, RunStatus::Succeeded, RunStatus::Failed, RunStatus::Expired]
    {
        for outcome in [Outcome::Succeeded, Outcome::Failed] {
            let expected = status == RunStatus::Running && outcome == Outcome::Failed;
            assert_eq!(may_create_incident(status, outcome), expected, "{status:?} {outcome:?}");
        }
    }
}

proptest! {
    #![proptest_config(config())]

    /// A budget is accepted exactly when its `max` is at most 2^53 − 1, and every accepted one
    /// keeps its snapshot hash through a JSON round trip (a larger one was written as a float by RFC 8785
    /// and failed its integrity check after a restart).
    #[test]
    fn only_integers_canonical_json_keeps_exact_are_accepted(
        max in prop_oneof![0..=MAX_SAFE_INTEGER, (MAX_SAFE_INTEGER - 4)..=MAX_SAFE_INTEGER + 4, any::<u64>()],
    ) {
        let limits = PolicyLimits::default();
        let json = format!(r#"{{"name":"b","rule":{{"kind":"budget","metric":"tokens","per":"run","max":{max}}}}}"#);
        let parsed = PolicyDocument::from_json(json.as_bytes(), &limits);
        prop_assert_eq!(parsed.is_ok(), max <= MAX_SAFE_INTEGER);
        if let Ok(doc) = parsed {
            let tenant = TenantId::new("acme").unwrap();
            let policy = Policy::create(doc, PolicyId::new("pol_b").unwrap(), Some(tenant.clone()), Timestamp::from_unix_millis(0));
            let snapshot = Snapshot::capture(&tenant, [&policy]);
            let hash = snapshot.hash().unwrap();
            let reloaded: Snapshot = serde_json::from_slice(&serde_json::to_vec(&snapshot).unwrap()).unwrap();
            prop_assert!(reloaded.verify(&hash));
        } else if let Err(err) = parsed {
            prop_assert_eq!(err.field(), "rule.max");
        }
        let step = format!(r#"{{"index":0,"phase":"post","usage":{{"cost_micros":{max}}}}}"#);
        let call = StepCall::from_json(step.as_bytes(), &StepLimits::default());
        prop_assert_eq!(call.is_ok(), max <= MAX_SAFE_INTEGER);
    }
}
