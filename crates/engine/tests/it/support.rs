//! Builders shared by the engine tests.

use runguard_contract::*;
use runguard_engine::{Admission, Call, CompiledSnapshot, Evaluation, RunState, TenantRates, evaluate};

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

pub fn run() -> RunState {
    RunState::new(tenant(), RunId::new("run-1").unwrap(), Default::default())
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

/// A run driven through admission, evaluation and apply, as the node does it.
pub struct Driver {
    pub snapshot: CompiledSnapshot,
    pub state: RunState,
    pub tenant_rates: TenantRates,
}

impl Driver {
    pub fn new(policies: &[Policy]) -> Self {
        Self { snapshot: snapshot(policies), state: run(), tenant_rates: TenantRates::default() }
    }

    /// Sends a call at `now`; panics if it is refused or replayed.
    pub fn send(&mut self, call: &StepCall, now: Timestamp) -> Evaluation {
        assert_eq!(self.state.admit(call), Admission::Evaluate, "call {call:?} not admitted");
        let evaluation = evaluate(&self.snapshot, &self.state, Call::Step(call), &self.tenant_rates, now);
        self.state.apply(&evaluation.decision, &evaluation.effects);
        self.tenant_rates.apply(&evaluation.effects);
        evaluation
    }

    /// Evaluates without applying.
    pub fn peek(&self, call: &StepCall, now: Timestamp) -> Evaluation {
        evaluate(&self.snapshot, &self.state, Call::Step(call), &self.tenant_rates, now)
    }
}

pub fn types(evaluation: &Evaluation) -> Vec<ViolationType> {
    evaluation.decision.violations.iter().map(|v| v.violation_type).collect()
}
