//! Simulation shared by `POST /v1/simulate` and `runguard simulate`: recorded runs replayed against
//! candidate policies, live decisions beside the candidate's.

use std::collections::BTreeMap;
use std::sync::Arc;

use runguard_contract::{
    Decision, Policy, PolicyDocument, PolicyId, PolicyLimits, PreventionRecord, RunId, Scope, TenantId, Timestamp,
    ValidationError,
};
use runguard_engine::learning::{RecordedCall, simulate_run};
use runguard_engine::{CompiledSnapshot, RunState};
use runguard_store::{LedgerCall, LedgerEntry, StoredRun};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// One call of a recorded run, as `runguard export --runs` writes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordedEntry {
    /// The call.
    pub call: RecordedCall,
    /// The live decision (its `evaluated_at` is the time the call is replayed at).
    pub decision: Decision,
}

/// A recorded run: one line of `runguard export --runs`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordedRun {
    /// Its tenant.
    pub tenant_id: TenantId,
    /// The run.
    pub run_id: RunId,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its calls, in order.
    pub calls: Vec<RecordedEntry>,
}

impl RecordedRun {
    /// From a stored run and its ledger.
    pub fn from_ledger(run: &StoredRun, ledger: &[LedgerEntry]) -> Self {
        let calls = ledger
            .iter()
            .map(|entry| RecordedEntry {
                call: match &entry.call {
                    LedgerCall::RunStart => RecordedCall::RunStart,
                    LedgerCall::Step(step) => RecordedCall::Step(step.clone()),
                    LedgerCall::RunEnd { outcome, error } => {
                        RecordedCall::RunEnd { outcome: *outcome, error: error.clone() }
                    }
                },
                decision: entry.decision.clone(),
            })
            .collect();
        Self { tenant_id: run.tenant_id.clone(), run_id: run.run_id.clone(), labels: run.labels.clone(), calls }
    }
}

/// How many calls were answered differently: pairs by (step, phase), counting missing counterparts.
pub fn differences(live: &[Decision], candidate: &[Decision]) -> usize {
    let key = |d: &Decision| (d.step_index, d.phase);
    let changed = live
        .iter()
        .filter(|l| candidate.iter().rev().find(|c| key(c) == key(l)).is_none_or(|c| c.action != l.action))
        .count();
    changed + candidate.iter().filter(|c| !live.iter().any(|l| key(l) == key(c))).count()
}

/// Candidate policies for `tenant` from documents: validated completely, tenant scope only, ids
/// `pol_candidate_<i>` where the document names none.
pub fn candidates(
    docs: Vec<Value>,
    tenant: &TenantId,
    limits: &PolicyLimits,
    at: Timestamp,
) -> Result<Vec<Policy>, ValidationError> {
    docs.into_iter()
        .enumerate()
        .map(|(i, value)| {
            let at_index = |e: ValidationError| e.within(&format!("policies[{i}]"));
            let doc = PolicyDocument::from_value(value, limits).map_err(at_index)?;
            runguard_engine::validate_document(&doc, limits).map_err(at_index)?;
            if doc.scope == Scope::Global {
                return Err(ValidationError::new(format!("policies[{i}].scope"), "candidates are tenant policies"));
            }
            let id = match &doc.id {
                Some(id) => id.clone(),
                None => PolicyId::new(format!("pol_candidate_{i}")).map_err(at_index)?,
            };
            Ok(Policy::create(doc, id, Some(tenant.clone()), at))
        })
        .collect()
}

/// Replays one recorded run against `candidate`: the result object and the records it would write.
pub fn simulate(candidate: &Arc<CompiledSnapshot>, run: &RecordedRun) -> (Value, Vec<PreventionRecord>) {
    let calls: Vec<(RecordedCall, Timestamp)> =
        run.calls.iter().map(|entry| (entry.call.clone(), entry.decision.evaluated_at)).collect();
    let live: Vec<Decision> = run.calls.iter().map(|entry| entry.decision.clone()).collect();
    let start = RunState::new(run.tenant_id.clone(), run.run_id.clone(), run.labels.clone());
    let simulated = simulate_run(candidate, start, &calls);
    let result = json!({
        "run_id": run.run_id,
        "differences": differences(&live, &simulated.decisions),
        "live": live,
        "candidate": simulated.decisions,
        "records": simulated.records,
    });
    (result, simulated.records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use runguard_contract::{Phase, Snapshot, StepCall, Usage};
    use runguard_engine::{Run, RunLimits, TenantRates};

    #[test]
    fn a_tighter_candidate_differs_and_would_write_a_simulated_record() {
        let tenant = TenantId::new("acme").unwrap();
        let run_id = RunId::new("r1").unwrap();
        let at = Timestamp::from_unix_millis(1_000);
        let live_snapshot =
            Arc::new(CompiledSnapshot::compile(&Snapshot::capture(&tenant, []), &PolicyLimits::default()).unwrap());
        let (mut run, start) = Run::start(live_snapshot, tenant.clone(), run_id.clone(), BTreeMap::new(), at);
        run.commit(start);
        let step = StepCall { usage: Some(Usage { tokens: 50, ..Usage::default() }), ..StepCall::new(0, Phase::Post) };
        let live = run.step(&step, &RunLimits::default(), &mut TenantRates::default(), at).unwrap();
        let recorded = RecordedRun {
            tenant_id: tenant.clone(),
            run_id,
            labels: BTreeMap::new(),
            calls: vec![RecordedEntry { call: RecordedCall::Step(step), decision: live.decision.clone() }],
        };
        let docs =
            vec![json!({"name": "tight", "rule": {"kind": "budget", "metric": "tokens", "per": "run", "max": 10}})];
        let policies = candidates(docs, &tenant, &PolicyLimits::default(), at).unwrap();
        let candidate = Arc::new(
            CompiledSnapshot::compile(&Snapshot::capture(&tenant, &policies), &PolicyLimits::default()).unwrap(),
        );
        let (result, records) = simulate(&candidate, &recorded);
        assert_eq!(result["differences"], 1);
        assert_eq!(records.len(), 1);
        assert!(records[0].is_simulated);
        assert_ne!(Some(&records[0].id), live.decision.prevention_record_id.as_ref());
        let bad = vec![json!({"name": "x", "rule": {"kind": "expr", "cel": "run.tokens >"}})];
        assert_eq!(candidates(bad, &tenant, &PolicyLimits::default(), at).unwrap_err().field(), "policies[0].rule.cel");
        let bad = vec![json!({"name": "x", "rule": {"kind": "repeat", "of": "call", "max": 0, "window_steps": 5}})];
        assert_eq!(candidates(bad, &tenant, &PolicyLimits::default(), at).unwrap_err().field(), "policies[0].rule.max");
    }

    #[test]
    fn a_recorded_loop_is_refused_by_a_candidate_repeat_rule() {
        let tenant = TenantId::new("acme").unwrap();
        let run_id = RunId::new("r-loop").unwrap();
        let at = Timestamp::from_unix_millis(1_000);
        let live_snapshot =
            Arc::new(CompiledSnapshot::compile(&Snapshot::capture(&tenant, []), &PolicyLimits::default()).unwrap());
        let (mut run, start) = Run::start(live_snapshot, tenant.clone(), run_id.clone(), BTreeMap::new(), at);
        run.commit(start);
        let mut calls = Vec::new();
        for index in 0..5 {
            let pre = StepCall {
                skill: Some("search".into()),
                input_text: Some("the same query".into()),
                ..StepCall::new(index, Phase::Pre)
            };
            for call in [pre, StepCall::new(index, Phase::Post)] {
                let live = run.step(&call, &RunLimits::default(), &mut TenantRates::default(), at).unwrap();
                calls.push(RecordedEntry { call: RecordedCall::Step(call), decision: live.decision.clone() });
                run.commit(live);
            }
        }
        let recorded = RecordedRun { tenant_id: tenant.clone(), run_id, labels: BTreeMap::new(), calls };
        let docs =
            vec![json!({"name": "loops", "rule": {"kind": "repeat", "of": "call", "max": 3, "window_steps": 10}})];
        let policies = candidates(docs, &tenant, &PolicyLimits::default(), at).unwrap();
        let candidate = Arc::new(
            CompiledSnapshot::compile(&Snapshot::capture(&tenant, &policies), &PolicyLimits::default()).unwrap(),
        );
        let (result, records) = simulate(&candidate, &recorded);
        let candidate_decisions = result["candidate"].as_array().unwrap();
        let last = candidate_decisions.last().unwrap();
        assert_eq!((last["step_index"].as_u64(), last["phase"].as_str()), (Some(3), Some("pre")));
        assert_eq!(last["action"], "block");
        assert_eq!(last["violations"][0]["violation_type"], "loop_detected");
        assert_eq!(records.len(), 1, "the fourth identical call would have been refused, with a record");
        assert_eq!(result["differences"], 4, "the blocked pre, and the calls after it that the candidate refuses");
    }
}
