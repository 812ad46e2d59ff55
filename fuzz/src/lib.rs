//! Shared pieces of the fuzz targets: a fixed snapshot with one policy of every rule kind, and the steps
//! every fuzzed snapshot is evaluated against.

use std::collections::BTreeMap;
use std::sync::Arc;

use runguard_contract::{
    Estimate, Phase, Policy, PolicyDocument, PolicyId, PolicyLimits, RunId, Snapshot, StepCall, StepError, TenantId,
    Timestamp, Usage,
};
use runguard_engine::{CompiledSnapshot, Run, RunLimits, TenantRates};

/// The tenant every target works in.
pub fn tenant() -> TenantId {
    TenantId::new("fuzz").expect("a valid tenant id")
}

/// A fixed evaluation time.
pub fn now() -> Timestamp {
    Timestamp::from_unix_millis(1_800_000_000_000)
}

/// A stored policy from a document that validated.
pub fn policy(doc: PolicyDocument, n: usize) -> Policy {
    let id = doc.id.clone().unwrap_or_else(|| PolicyId::new(format!("pol_fuzz_{n}")).expect("a valid id"));
    Policy::create(doc, id, Some(tenant()), now())
}

/// Compiles the snapshot of `policies` (as a run would capture it).
pub fn compile(policies: &[Policy]) -> Arc<CompiledSnapshot> {
    let snapshot = Snapshot::capture(&tenant(), policies);
    Arc::new(CompiledSnapshot::compile(&snapshot, &PolicyLimits::default()).expect("a captured snapshot hashes"))
}

/// One policy of every rule kind, so that fuzzed steps reach every evaluator.
pub fn reference_snapshot() -> Arc<CompiledSnapshot> {
    let docs = [
        r#"{"name":"tokens","rule":{"kind":"budget","metric":"tokens","per":"run","max":1000,"warn_at":[50,90]}}"#,
        r#"{"name":"step cost","rule":{"kind":"budget","metric":"cost_micros","per":"step","max":5000}}"#,
        r#"{"name":"rate","rule":{"kind":"rate","metric":"steps","max":3,"window_s":60}}"#,
        r#"{"name":"pii","rule":{"kind":"content","target":"both","detectors":["email","ssn","credit_card","phone","ip_address","api_key"],"patterns":["(?i)secret-[0-9]+"],"keywords":["forbidden"],"case_insensitive":true}}"#,
        r#"{"name":"skills","rule":{"kind":"skill","deny":["rm","drop_table"]}}"#,
        r#"{"name":"pattern","rule":{"kind":"pattern","pattern_id":"pat_x","signature_hash":"0123456789abcdef0123456789abcdef"}}"#,
        r#"{"name":"cel","on_error":"warn","rule":{"kind":"expr","cel":"has(step.usage) && step.usage.tokens > 100 || run.steps > 5 || (has(step.output_text) && step.output_text.contains('x'))"}}"#,
    ];
    let limits = PolicyLimits::default();
    let policies: Vec<Policy> = docs
        .iter()
        .enumerate()
        .map(|(n, json)| {
            let doc = PolicyDocument::from_json(json.as_bytes(), &limits).expect("a valid reference policy");
            runguard_engine::validate_document(&doc, &limits).expect("a valid reference policy");
            policy(doc, n)
        })
        .collect();
    compile(&policies)
}

/// A run started on `snapshot`.
pub fn start(snapshot: &Arc<CompiledSnapshot>) -> Run {
    let run_id = RunId::new("run-fuzz").expect("a valid run id");
    let (mut run, outcome) = Run::start(Arc::clone(snapshot), tenant(), run_id, BTreeMap::new(), now());
    run.commit(outcome);
    run
}

/// A few steps (a pre with an estimate, a post with usage, texts and an error) run through `snapshot`,
/// then a failed end.
pub fn exercise(snapshot: &Arc<CompiledSnapshot>) {
    let mut run = start(snapshot);
    let mut rates = TenantRates::default();
    for index in 0..3u64 {
        let pre = StepCall {
            skill: Some("Fetch".into()),
            api_endpoint: Some(format!("/v1/users/{index}?x=1")),
            input_keys: vec!["id".into(), "q".into()],
            input_text: Some("mail me at a@example.com, secret-42".into()),
            estimate: Some(Estimate { tokens: Some(400), cost_micros: Some(3000) }),
            ..StepCall::new(index, Phase::Pre)
        };
        let post = StepCall {
            usage: Some(Usage { tokens: 450, cost_micros: 2500, duration_ms: 10 }),
            output_text: Some("4111 1111 1111 1111 forbidden 10.0.0.1".into()),
            error: (index == 2).then(|| StepError {
                error_type: Some("Timeout".into()),
                code: Some("e_up".into()),
                status: Some(504),
                message: Some("upstream".into()),
            }),
            ..StepCall::new(index, Phase::Post)
        };
        for call in [pre, post] {
            step(&mut run, &mut rates, &call);
        }
    }
    if let Some(end) = run.end(runguard_contract::Outcome::Failed, None, now()) {
        run.commit(end);
    }
}

/// Answers one call and commits its outcome.
pub fn step(run: &mut Run, rates: &mut TenantRates, call: &StepCall) {
    // Deterministic: the same inputs give the same outcome.
    let again = run.step(call, &RunLimits::default(), &mut rates.clone(), now());
    if let Ok(outcome) = run.step(call, &RunLimits::default(), rates, now()) {
        let again = again.expect("a call answered once is answered again");
        assert_eq!(outcome.decision, again.decision, "evaluation is not deterministic");
        run.commit(outcome);
    }
}

/// The store's value decoding, step by step as `runguard-store`'s `codec` module does it (which is private
/// to that crate): the envelope byte, the size limit, bincode with [`runguard_store::codec::CONFIG`], no
/// trailing bytes; JSON for policies; canonical JSON for snapshots.
pub mod stored {
    use runguard_contract::{Policy, Snapshot};
    use runguard_store::codec::{CONFIG, ENVELOPE_V1, MAX_VALUE_LEN};
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    fn payload(bytes: &[u8]) -> Option<&[u8]> {
        match bytes.split_first() {
            Some((&ENVELOPE_V1, payload)) if payload.len() <= MAX_VALUE_LEN => Some(payload),
            _ => None,
        }
    }

    /// Decodes a bincode value; if it decodes, its re-encoding decodes to the same value.
    pub fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
        let Some(payload) = payload(bytes) else { return };
        let Ok((value, read)) = bincode::serde::decode_from_slice::<T, _>(payload, CONFIG) else { return };
        if read != payload.len() {
            return;
        }
        let encoded = bincode::serde::encode_to_vec(&value, CONFIG).expect("a decoded value encodes");
        let (again, _) =
            bincode::serde::decode_from_slice::<T, _>(&encoded, CONFIG).expect("a re-encoded value decodes");
        assert_eq!(value, again, "stored value does not round-trip");
    }

    /// A stored policy (JSON payload).
    pub fn policy(bytes: &[u8]) {
        let Some(payload) = payload(bytes) else { return };
        let Ok(policy) = serde_json::from_slice::<Policy>(payload) else { return };
        let json = serde_json::to_vec(&policy).expect("a policy serialises");
        let again: Policy = serde_json::from_slice(&json).expect("a policy re-parses");
        assert_eq!(policy, again, "stored policy does not round-trip");
    }

    /// A stored snapshot (canonical JSON payload): parse, hash and compile, as loading a run does.
    pub fn snapshot(bytes: &[u8]) {
        let Some(payload) = payload(bytes) else { return };
        let Ok(snapshot) = serde_json::from_slice::<Snapshot>(payload) else { return };
        if let Ok(reference) = snapshot.reference() {
            let compiled = runguard_engine::CompiledSnapshot::load(
                &snapshot,
                &reference.hash,
                &runguard_contract::PolicyLimits::default(),
            );
            assert!(!compiled.is_tampered(), "a snapshot does not verify against its own hash");
            super::exercise(&std::sync::Arc::new(compiled));
        }
    }
}
