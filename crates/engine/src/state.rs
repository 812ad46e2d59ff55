//! Run state: what a run has consumed, which call it expects next, and the facts that make retries
//! idempotent. The state changes only through [`RunState::apply`], a pure fold over the [`Effects`] that
//! evaluation returns, so a run can be rebuilt by replaying its ledger.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use runguard_contract::{
    Action, Decision, DecisionPhase, NextCall, Outcome, Phase, PolicyId, RunId, RunStatus, StepCall, TenantId,
    TerminationReason, Timestamp, Totals, Usage,
};
use serde::{Deserialize, Serialize};

use crate::rates::{RateEvent, RateWindow};
use crate::repeat::{RepeatHistory, StepKeys};

/// A warn tier of a budget policy that has fired in this run.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub(crate) struct TierKey {
    /// The budget policy.
    pub(crate) policy_id: PolicyId,
    /// The tier, in percent.
    pub(crate) tier: u32,
}

/// Run-scope rate events older than the longest window are dropped.
fn prune(events: &mut VecDeque<RateEvent>, now: Timestamp, horizon_ms: i64) {
    let oldest_kept = now.plus_millis(horizon_ms.saturating_neg());
    while events.front().is_some_and(|e| e.at <= oldest_kept) {
        events.pop_front();
    }
}

/// One tenant's rate windows, shared by all its runs: a host keeps one per tenant and passes it to every
/// [`Run::step`](crate::Run::step) of the tenant's runs, which reads it and counts the call in it.
///
/// A tenant's window holds every call of the tenant within the longest window (hundreds of thousands
/// under load): running totals are kept beside the events, so that a rate check takes time logarithmic
/// in their number. Events of the same millisecond recorded one after the other are kept as one.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(from = "TenantEvents", into = "TenantEvents")]
pub struct TenantRates {
    window: RateWindow,
}

/// How [`TenantRates`] serialises: its events, in the order they were recorded.
#[derive(Serialize, Deserialize)]
struct TenantEvents {
    events: VecDeque<RateEvent>,
}

impl From<TenantEvents> for TenantRates {
    fn from(stored: TenantEvents) -> Self {
        let mut window = RateWindow::default();
        stored.events.into_iter().for_each(|event| window.push(event));
        Self { window }
    }
}

impl From<TenantRates> for TenantEvents {
    fn from(rates: TenantRates) -> Self {
        Self { events: rates.events().collect() }
    }
}

impl PartialEq for TenantRates {
    fn eq(&self, other: &Self) -> bool {
        self.events().eq(other.events())
    }
}

impl Eq for TenantRates {}

impl TenantRates {
    /// Records the tenant-scope consumption of an applied evaluation.
    pub(crate) fn apply(&mut self, effects: &Effects) {
        if let Some(event) = effects.tenant_rate_event {
            self.window.push(event);
            self.window.drop_through(event.at.plus_millis(effects.tenant_window_ms.saturating_neg()));
        }
    }

    /// Records an event read back from a shared store (`crate::shared_rates`).
    pub(crate) fn record(&mut self, event: RateEvent) {
        self.window.push(event);
    }

    /// The events still inside some window, in the order they were recorded; consecutive events of the
    /// same millisecond come merged into one.
    pub(crate) fn events(&self) -> impl Iterator<Item = RateEvent> + '_ {
        self.window.events()
    }

    pub(crate) fn window(&self) -> &RateWindow {
        &self.window
    }
}

/// The last call a run accepted, with its decision, for idempotent retries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LastCall {
    /// Step index, `None` at run start or end.
    pub(crate) index: Option<u64>,
    /// Where in the run.
    pub(crate) phase: DecisionPhase,
    /// SHA-256 of the call's canonical JSON.
    pub(crate) digest: String,
    /// The decision it got.
    pub(crate) decision: Decision,
}

/// Why a run stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Termination {
    /// Policy block or integrity failure.
    pub reason: TerminationReason,
    /// The blocked step (`None` at run start or end).
    pub stopped_at_step: Option<u64>,
    /// The deciding policy (`None` for integrity failures).
    pub violation_policy_id: Option<PolicyId>,
    /// The ancestor whose policy decided, when it was an ancestor's.
    #[serde(default)]
    pub violation_run_id: Option<RunId>,
}

/// The state of one run, as a host reads it ([`Run::state`](crate::Run::state)); it changes only when a
/// [`Run`](crate::Run) commits an outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    /// The run's tenant.
    pub tenant_id: TenantId,
    /// The run.
    pub run_id: RunId,
    /// Labels given at creation.
    pub labels: BTreeMap<String, String>,
    /// Running, stopped or ended.
    pub status: RunStatus,
    /// Consumption so far.
    pub totals: Totals,
    /// The next call expected.
    pub next: NextCall,
    /// Decisions made so far (each evaluation, including throttles); seeds decision ids.
    pub(crate) decisions: u64,
    /// Warn tiers that already fired.
    pub(crate) fired_tiers: BTreeSet<TierKey>,
    /// Run-scope rate events inside the longest window.
    pub(crate) rate_events: VecDeque<RateEvent>,
    /// The last accepted call (boxed: most live runs are idle, and an idle run's state stays small).
    pub(crate) last: Option<Box<LastCall>>,
    /// Set once the run is stopped.
    pub termination: Option<Termination>,
    /// The keys of the latest steps, for repeat rules (empty without them).
    #[serde(default, skip_serializing_if = "RepeatHistory::is_empty")]
    pub(crate) repeat: RepeatHistory,
}

/// Whether a step call may be evaluated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// In order: evaluate it.
    Evaluate,
    /// An identical re-send of the last call: answer its decision again.
    Replay(Box<Decision>),
    /// Refused (409).
    Refused(Refusal),
}

/// Why a call was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The run is stopped or ended.
    #[error("run is {}; it accepts no more step calls", status.as_str())]
    NotRunning {
        /// Its status.
        status: RunStatus,
        /// The decision that stopped it, if a block did.
        stopping_decision: Option<Box<Decision>>,
    },
    /// The call is not the one expected next.
    #[error("expected step {} `{}`", expected.index, expected.phase.as_str())]
    OutOfOrder {
        /// The call expected.
        expected: NextCall,
    },
    /// The step's index is at or above the host's step limit.
    #[error("runs take at most {max} steps here")]
    StepLimit {
        /// The limit.
        max: u64,
    },
    /// The last call was sent again with a different body.
    #[error("step {index} `{phase}` was already answered with a different body", phase = phase.as_str())]
    RetryMismatch {
        /// Its index.
        index: u64,
        /// Its phase.
        phase: Phase,
    },
}

/// SHA-256 (hex) of a call's fields, to recognise identical re-sends. Each field is fed with a tag and
/// its length, so distinct calls cannot collide by shifting bytes between fields; no serialisation is
/// needed (it would cost more than evaluating a typical snapshot).
pub(crate) fn call_digest(call: &StepCall) -> String {
    use crate::repeat::field;
    use sha2::{Digest, Sha256};
    fn number(hasher: &mut Sha256, tag: u8, value: Option<u64>) {
        field(hasher, tag, value.map(u64::to_be_bytes).as_ref().map(|b| b.as_slice()));
    }
    let mut h = Sha256::new();
    h.update(b"runguard/step-call/v2\0");
    number(&mut h, 1, Some(call.index));
    field(&mut h, 2, Some(call.phase.as_str().as_bytes()));
    field(&mut h, 3, call.skill.as_deref().map(str::as_bytes));
    field(&mut h, 4, call.api_endpoint.as_deref().map(str::as_bytes));
    number(&mut h, 5, Some(u64::try_from(call.input_keys.len()).unwrap_or(u64::MAX)));
    for key in &call.input_keys {
        field(&mut h, 6, Some(key.as_bytes()));
    }
    field(&mut h, 7, call.input_text.as_deref().map(str::as_bytes));
    field(&mut h, 8, call.estimate.map(|_| b"".as_slice()));
    number(&mut h, 9, call.estimate.and_then(|e| e.tokens));
    number(&mut h, 10, call.estimate.and_then(|e| e.cost_micros));
    field(&mut h, 11, call.usage.map(|_| b"".as_slice()));
    number(&mut h, 12, call.usage.map(|u| u.tokens));
    number(&mut h, 13, call.usage.map(|u| u.cost_micros));
    number(&mut h, 14, call.usage.map(|u| u.duration_ms));
    field(&mut h, 15, call.output_text.as_deref().map(str::as_bytes));
    let error = call.error.as_ref();
    field(&mut h, 16, error.map(|_| b"".as_slice()));
    field(&mut h, 17, error.and_then(|e| e.error_type.as_deref()).map(str::as_bytes));
    field(&mut h, 18, error.and_then(|e| e.code.as_deref()).map(str::as_bytes));
    number(&mut h, 19, error.and_then(|e| e.status).map(u64::from));
    field(&mut h, 20, error.and_then(|e| e.message.as_deref()).map(str::as_bytes));
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use runguard_contract::{Phase, Usage};

    #[test]
    fn digests_tell_every_field_apart() {
        let base = StepCall { output_text: Some("ab".into()), ..StepCall::new(1, Phase::Post) };
        let variants = [
            StepCall { output_text: Some("abc".into()), ..base.clone() },
            StepCall { input_text: Some("ab".into()), output_text: None, ..base.clone() },
            StepCall { usage: Some(Usage::default()), ..base.clone() },
            StepCall { input_keys: vec!["a".into(), "b".into()], ..base.clone() },
            StepCall { input_keys: vec!["ab".into()], ..base.clone() },
            StepCall { index: 2, ..base.clone() },
        ];
        let digest = call_digest(&base);
        assert_eq!(digest, call_digest(&base.clone()));
        let mut seen = std::collections::BTreeSet::from([digest]);
        for variant in &variants {
            assert!(seen.insert(call_digest(variant)), "{variant:?} collides");
        }
    }
}

/// How a call changes its run. Opaque to a host, which persists it (serialised) with the call's ledger
/// entry so that [`Run::rehydrate`](crate::Run::rehydrate) can fold it in again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effects {
    /// The call's digest (step calls).
    pub(crate) digest: Option<String>,
    /// The call's step index and phase (step calls).
    pub(crate) step: Option<(u64, Phase)>,
    /// Usage added to the totals (`post`).
    pub(crate) usage: Option<Usage>,
    /// Whether the call counts a step (`post`).
    pub(crate) counts_step: bool,
    /// Warn tiers that fired.
    pub(crate) fired_tiers: Vec<TierKey>,
    /// Run-scope rate event to record.
    pub(crate) run_rate_event: Option<RateEvent>,
    /// Longest run-scope window, in ms.
    pub(crate) run_window_ms: i64,
    /// Tenant-scope rate event for the caller's [`TenantRates`].
    pub(crate) tenant_rate_event: Option<RateEvent>,
    /// Longest tenant-scope window, in ms.
    pub(crate) tenant_window_ms: i64,
    /// The outcome, for a run-end call.
    pub(crate) end_outcome: Option<Outcome>,
}

impl RunState {
    /// A new running run expecting step 0 (where a simulation of recorded calls starts).
    pub fn new(tenant_id: TenantId, run_id: RunId, labels: BTreeMap<String, String>) -> Self {
        Self {
            tenant_id,
            run_id,
            labels,
            status: RunStatus::Running,
            totals: Totals::default(),
            next: NextCall { index: 0, phase: Phase::Pre },
            decisions: 0,
            fired_tiers: BTreeSet::new(),
            rate_events: VecDeque::new(),
            last: None,
            termination: None,
            repeat: RepeatHistory::default(),
        }
    }

    /// Decides whether `call` may be evaluated now (`docs/evaluation.md`).
    pub(crate) fn admit(&self, call: &StepCall) -> Admission {
        let last_same_call = self.last.as_ref().filter(|last| {
            last.index == Some(call.index)
                && last.phase == DecisionPhase::from(call.phase)
                && last.decision.action != Action::Throttle
        });
        // The digest is only needed to tell a retry from a changed body.
        if let Some(last) = last_same_call
            && last.digest == call_digest(call)
        {
            return Admission::Replay(Box::new(last.decision.clone()));
        }
        if !self.status.is_running() {
            let stopping =
                self.last.as_ref().filter(|l| l.decision.action == Action::Block).map(|l| Box::new(l.decision.clone()));
            return Admission::Refused(Refusal::NotRunning { status: self.status, stopping_decision: stopping });
        }
        if last_same_call.is_some() {
            return Admission::Refused(Refusal::RetryMismatch { index: call.index, phase: call.phase });
        }
        let in_order = call.index == self.next.index && (self.next.phase == Phase::Pre || call.phase == Phase::Post);
        if in_order { Admission::Evaluate } else { Admission::Refused(Refusal::OutOfOrder { expected: self.next }) }
    }

    /// The totals a call is compared against: at `post` its usage and one step are added first.
    pub(crate) fn totals_with(&self, usage: Option<&Usage>, counts_step: bool) -> Totals {
        let mut totals = self.totals;
        if let Some(usage) = usage {
            totals.tokens = totals.tokens.saturating_add(usage.tokens);
            totals.cost_micros = totals.cost_micros.saturating_add(usage.cost_micros);
            totals.duration_ms = totals.duration_ms.saturating_add(usage.duration_ms);
        }
        if counts_step {
            totals.steps = totals.steps.saturating_add(1);
        }
        totals
    }

    /// Records the repeat keys of an applied step call. They are not effects: [`Run::rehydrate`](crate::Run::rehydrate)
    /// computes them again from the ledger's calls, so the stored effects stay as they were.
    pub(crate) fn record_repeat(&mut self, decision: &Decision, keys: Option<StepKeys>, window: u64) {
        // A throttled call is not accepted (as in `apply`): the step's first call is still to come.
        if let Some(keys) = keys
            && decision.action != Action::Throttle
        {
            self.repeat.record(keys, window);
        }
    }

    /// Applies an evaluated call: a pure fold, so replaying a ledger of (decision, effects) rebuilds the
    /// state exactly.
    pub(crate) fn apply(&mut self, decision: &Decision, effects: &Effects) {
        self.decisions = self.decisions.saturating_add(1);
        if let Some(digest) = &effects.digest {
            self.last = Some(Box::new(LastCall {
                index: decision.step_index,
                phase: decision.phase,
                digest: digest.clone(),
                decision: decision.clone(),
            }));
        }
        if decision.action == Action::Throttle {
            return;
        }
        self.totals = self.totals_with(effects.usage.as_ref(), effects.counts_step);
        self.fired_tiers.extend(effects.fired_tiers.iter().cloned());
        if let Some(event) = effects.run_rate_event {
            self.rate_events.push_back(event);
            prune(&mut self.rate_events, event.at, effects.run_window_ms);
        }
        if let Some((index, phase)) = effects.step {
            self.next = match phase {
                Phase::Pre => NextCall { index, phase: Phase::Post },
                Phase::Post => NextCall { index: index.saturating_add(1), phase: Phase::Pre },
            };
        }
        if decision.action == Action::Block {
            self.status = RunStatus::Stopped;
            let integrity =
                decision.violations.iter().any(|v| v.violation_type == runguard_contract::ViolationType::Integrity);
            self.termination = Some(Termination {
                reason: if integrity { TerminationReason::IntegrityFailure } else { TerminationReason::PolicyBlock },
                stopped_at_step: decision.step_index,
                violation_policy_id: decision.deciding_policy.as_ref().map(|p| p.id.clone()),
                violation_run_id: decision.deciding_violation().and_then(|v| v.run_id.clone()),
            });
        } else if let Some(outcome) = effects.end_outcome {
            self.status = match outcome {
                Outcome::Succeeded => RunStatus::Succeeded,
                Outcome::Failed => RunStatus::Failed,
            };
        }
    }

    /// Stops a running run because an ancestor left `running`.
    pub(crate) fn stop_for_parent(&mut self) {
        if self.status.is_running() {
            self.status = RunStatus::Stopped;
            self.termination = Some(Termination {
                reason: TerminationReason::ParentStopped,
                stopped_at_step: None,
                violation_policy_id: None,
                violation_run_id: None,
            });
        }
    }

    /// Marks a running run expired (TTL passed). Ended and stopped runs keep their status.
    pub(crate) fn expire(&mut self) {
        if self.status.is_running() {
            self.status = RunStatus::Expired;
        }
    }
}
