//! Builders shared by the engine tests: runs are driven through the public [`Run`] API only, as a host
//! drives them (`start` → `step` → `commit`).

use std::sync::Arc;

use runguard_contract::*;
use runguard_engine::{CompiledSnapshot, Outcome, Refusal, Run, RunLimits, RunState, TenantRates};

pub const T0: i64 = 1_795_000_000_000;

pub fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

pub fn at(ms: i64) -> Timestamp {
    Timestamp::from_unix_millis(T0 + ms)
}

/// A validated policy of tenant `acme` from a JSON document (its `id` is required here).
pub fn policy(json: &str) -> Policy {
    policy_of(&tenant(), json)
}

pub fn policy_of(tenant: &TenantId, json: &str) -> Policy {
    let limits = PolicyLimits::default();
    let doc = PolicyDocument::from_json(json.as_bytes(), &limits).unwrap();
    runguard_engine::validate_document(&doc, &limits).unwrap();
    let id = doc.id.clone().expect("test policies name their id");
    Policy::create(doc, id, Some(tenant.clone()), Timestamp::from_unix_millis(T0))
}

pub fn snapshot(policies: &[Policy]) -> CompiledSnapshot {
    CompiledSnapshot::compile(&Snapshot::capture(&tenant(), policies), &PolicyLimits::default()).unwrap()
}

/// A run of `acme` on `snapshot`, its run-start call committed.
pub fn start(snapshot: Arc<CompiledSnapshot>, run_id: &str, labels: std::collections::BTreeMap<String, String>) -> Run {
    let (mut run, started) = Run::start(snapshot, tenant(), RunId::new(run_id).unwrap(), labels, at(0));
    run.commit(started);
    run
}

pub fn post(index: u64, tokens: u64) -> StepCall {
    StepCall { usage: Some(Usage { tokens, ..Usage::default() }), ..StepCall::new(index, Phase::Post) }
}

pub fn pre(index: u64) -> StepCall {
    StepCall::new(index, Phase::Pre)
}

pub fn pre_estimate(index: u64, tokens: u64) -> StepCall {
    StepCall { estimate: Some(Estimate { tokens: Some(tokens), cost_micros: None }), ..pre(index) }
}

/// How a run would answer a call, without answering it.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Evaluated afresh.
    Evaluate,
    /// An identical re-send: the earlier decision again.
    Replay(Box<Decision>),
    /// Refused.
    Refused(Refusal),
}

/// A run driven the way a host drives it, with its tenant's rate windows.
pub struct Driver {
    pub run: Run,
    pub tenant_rates: TenantRates,
}

impl Driver {
    pub fn new(policies: &[Policy]) -> Self {
        Self::named(policies, "run-1")
    }

    pub fn named(policies: &[Policy], run_id: &str) -> Self {
        Self {
            run: start(Arc::new(snapshot(policies)), run_id, Default::default()),
            tenant_rates: TenantRates::default(),
        }
    }

    pub fn state(&self) -> &RunState {
        self.run.state()
    }

    /// Sends a call at `now` and commits its outcome; panics if it is refused or replayed.
    pub fn send(&mut self, call: &StepCall, now: Timestamp) -> Outcome {
        let outcome = self
            .run
            .step(call, &RunLimits::default(), &mut self.tenant_rates, now)
            .unwrap_or_else(|refusal| panic!("call {call:?} refused: {refusal}"));
        assert!(!outcome.is_replay(), "call {call:?} replayed");
        self.run.commit(outcome.clone());
        outcome
    }

    /// Sends a call whose outcome the test does not read.
    pub fn pass(&mut self, call: &StepCall, now: Timestamp) {
        let _committed = self.send(call, now);
    }

    /// The outcome of a call at `now`, neither committed nor counted in the tenant's windows.
    pub fn peek(&self, call: &StepCall, now: Timestamp) -> Outcome {
        self.run
            .step(call, &RunLimits::default(), &mut self.tenant_rates.clone(), now)
            .unwrap_or_else(|refusal| panic!("call {call:?} refused: {refusal}"))
    }

    /// Whether the run would evaluate, replay or refuse `call`.
    pub fn admit(&self, call: &StepCall) -> Admission {
        match self.run.step(call, &RunLimits::default(), &mut self.tenant_rates.clone(), at(0)) {
            Ok(outcome) if outcome.is_replay() => Admission::Replay(Box::new(outcome.decision)),
            Ok(_) => Admission::Evaluate,
            Err(refusal) => Admission::Refused(refusal),
        }
    }
}

pub fn types(outcome: &Outcome) -> Vec<ViolationType> {
    outcome.decision.violations.iter().map(|v| v.violation_type).collect()
}
