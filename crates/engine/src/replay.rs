//! Replaying a run's recorded calls against a snapshot: a loop over [`Run`], as the node answers them.

use std::sync::Arc;

use runguard_contract::{StepCall, Timestamp};

use crate::compiled::CompiledSnapshot;
use crate::run::{Outcome, Run, RunLimits};
use crate::state::{Refusal, RunState, TenantRates};

/// The result of one replayed call.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ReplayedCall {
    /// Evaluated afresh.
    Evaluated(Box<Outcome>),
    /// Answered from the previous identical call.
    Replayed(Box<runguard_contract::Decision>),
    /// Refused (out of order, stopped run, retry mismatch).
    Refused(Refusal),
}

/// Replays `calls` (each with the time it was evaluated) from `state`, as the node would have answered
/// them, with its own tenant rate windows. Returns each call's outcome and the final state.
pub fn replay(
    snapshot: Arc<CompiledSnapshot>,
    state: RunState,
    calls: &[(StepCall, Timestamp)],
) -> (Vec<ReplayedCall>, RunState) {
    let created_at = calls.first().map_or(Timestamp::from_unix_millis(0), |(_, at)| *at);
    let mut run = Run::resume(snapshot, state, created_at);
    let mut tenant = TenantRates::default();
    let mut out = Vec::with_capacity(calls.len());
    for (call, at) in calls {
        match run.step(call, &RunLimits::default(), &mut tenant, *at) {
            Ok(outcome) if outcome.is_replay() => out.push(ReplayedCall::Replayed(Box::new(outcome.decision))),
            Ok(outcome) => {
                run.commit(outcome.clone());
                out.push(ReplayedCall::Evaluated(Box::new(outcome)));
            }
            Err(refusal) => out.push(ReplayedCall::Refused(refusal)),
        }
    }
    (out, run.into_state())
}
