//! Replaying a run's recorded calls against a snapshot (SPEC §3.10, §6 simulation).

use runguard_contract::{StepCall, Timestamp};

use crate::compiled::CompiledSnapshot;
use crate::evaluate::{Call, Evaluation, evaluate};
use crate::state::{Admission, RunState, TenantRates};

/// The result of one replayed call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayedCall {
    /// Evaluated afresh.
    Evaluated(Box<Evaluation>),
    /// Answered from the previous identical call.
    Replayed(Box<runguard_contract::Decision>),
    /// Refused (out of order, stopped run, retry mismatch).
    Refused(crate::state::Refusal),
}

/// Replays `calls` (each with the time it was evaluated) from `state`, as the node would have answered
/// them, with its own tenant rate windows. Returns each call's outcome and the final state.
pub fn replay(
    snapshot: &CompiledSnapshot,
    mut state: RunState,
    calls: &[(StepCall, Timestamp)],
) -> (Vec<ReplayedCall>, RunState) {
    let mut tenant = TenantRates::default();
    let mut out = Vec::with_capacity(calls.len());
    for (call, at) in calls {
        match state.admit(call) {
            Admission::Evaluate => {
                let evaluation = evaluate(snapshot, &state, Call::Step(call), &tenant, *at);
                state.apply(&evaluation.decision, &evaluation.effects);
                tenant.apply(&evaluation.effects);
                out.push(ReplayedCall::Evaluated(Box::new(evaluation)));
            }
            Admission::Replay(decision) => out.push(ReplayedCall::Replayed(decision)),
            Admission::Refused(refusal) => out.push(ReplayedCall::Refused(refusal)),
        }
    }
    (out, state)
}
