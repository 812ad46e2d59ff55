//! One run's whole lifecycle as one type, so that a host (the node, a replay, an embedding service) does
//! not re-create it around [`evaluate`]: admission, the step limit, evaluation, tenant rate counting,
//! shadow-statistic deltas, the failing-step tracker, TTL expiry, incident eligibility and rehydration
//! from a ledger with its integrity check.
//!
//! The API has two phases so that a host can persist before it applies: [`Run::step`] and [`Run::end`]
//! compute an [`Outcome`] without changing the run; the host persists what the outcome carries, then hands
//! it back to [`Run::commit`]. A host whose persistence failed drops the outcome and the run is unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use runguard_contract::{
    Action, Decision, Mode, PolicyId, PolicyRef, PreventionRecord, RunId, RunStatus, Signature, SnapshotHash, StepCall,
    StepError, TenantId, Timestamp, Totals,
};

use crate::ancestors::Family;
use crate::compiled::CompiledSnapshot;
use crate::evaluate::{Call, Evaluation, evaluate};
use crate::failure::{FailureTracker, Observation};
use crate::periods::{PeriodDelta, PeriodTotals};
use crate::repeat::StepKeys;
use crate::state::{Admission, Effects, Refusal, RunState, TenantRates};

/// What a host configures about every run it hosts. The default limits nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunLimits {
    /// Step calls with an index at or above this are refused ([`Refusal::StepLimit`]).
    pub steps_per_run: u64,
    /// How long after its creation a run that has not ended expires; `None` keeps it running.
    pub ttl: Option<Duration>,
}

impl RunLimits {
    /// Limits allowing `steps_per_run` steps, without a TTL.
    pub fn new(steps_per_run: u64) -> Self {
        Self { steps_per_run, ttl: None }
    }

    /// These limits with runs expiring `ttl` after their creation.
    #[must_use]
    pub fn with_ttl(self, ttl: Duration) -> Self {
        Self { ttl: Some(ttl), ..self }
    }

    /// Whether a run created at `created_at` is past its TTL at `now`: the one TTL rule, for a live
    /// [`Run`] ([`Run::expire_if_due`]) and for a stored run of which only the creation time is at hand.
    pub fn ttl_elapsed(&self, created_at: Timestamp, now: Timestamp) -> bool {
        self.ttl.is_some_and(|ttl| {
            let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
            now >= created_at.plus_millis(ttl_ms)
        })
    }
}

impl Default for RunLimits {
    fn default() -> Self {
        Self { steps_per_run: u64::MAX, ttl: None }
    }
}

/// How one shadow policy's statistics change by one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShadowDelta {
    /// The shadow policy.
    pub policy_id: PolicyId,
    /// The policy's owner; `None` for a global policy, whose statistics are kept per tenant of the runs
    /// that evaluated it.
    pub owner: Option<TenantId>,
    /// Evaluations (1 per call that evaluated the policy).
    pub evaluations: u64,
    /// Would-be blocks.
    pub would_block: u64,
    /// Would-be warnings.
    pub would_warn: u64,
    /// Would-be throttles.
    pub would_throttle: u64,
}

/// What an incident created by a failed run is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncidentBasis {
    /// The failing step's normalised signature.
    pub signature: Signature,
    /// Its error.
    pub error: StepError,
}

/// Everything one call changes, for a host to persist before it hands the outcome to [`Run::commit`].
#[derive(Clone, Debug)]
#[must_use = "an outcome changes nothing until it is persisted and committed"]
pub struct Outcome {
    /// The decision to answer.
    pub decision: Decision,
    /// The prevention record the decision requires (unsealed: the host assigns its place in the chain).
    pub record: Option<PreventionRecord>,
    /// The run's effects; persisted with the ledger entry, they are what [`Run::rehydrate`] folds in again.
    pub effects: Effects,
    /// The mode of the deciding policy, if any.
    pub deciding_mode: Option<Mode>,
    /// Policies skipped because they failed with `on_error: allow`.
    pub fail_opens: Vec<PolicyRef>,
    /// Shadow-statistic changes, one per shadow policy the call evaluated.
    pub shadow: Vec<ShadowDelta>,
    /// The incident this call creates (only a failed end of a running run has one).
    pub incident: Option<IncidentBasis>,
    /// What the call adds to its tenant's period totals, for the host to commit with it as conditional
    /// increments ([`PeriodDelta`]).
    pub period_deltas: Vec<PeriodDelta>,
    /// What the call adds to its tenant's rate windows, for a host that shares them through a store
    /// ([`RateDelta`](crate::RateDelta)); a host that keeps them in memory ignores it.
    pub tenant_rate_delta: Option<crate::shared_rates::RateDelta>,
    change: Option<Change>,
}

/// What [`Run::commit`] applies besides the decision and effects; absent for an identical retry, which
/// changes nothing.
#[derive(Clone, Debug)]
struct Change {
    totals: Totals,
    repeat: Option<StepKeys>,
    at: Timestamp,
    observed: Option<Observation>,
    ended: Option<runguard_contract::Outcome>,
}

impl Outcome {
    /// Whether this answers an identical re-send of the last call: nothing to persist or commit.
    pub fn is_replay(&self) -> bool {
        self.change.is_none()
    }

    /// The run's totals once this outcome is committed.
    pub fn totals(&self) -> Option<Totals> {
        self.change.as_ref().map(|change| change.totals)
    }

    fn evaluated(
        snapshot: &CompiledSnapshot,
        state: &RunState,
        evaluation: Evaluation,
        at: Timestamp,
        observed: Option<Observation>,
        ended: Option<runguard_contract::Outcome>,
    ) -> Self {
        // As `RunState::apply` folds them: a throttled call changes no totals.
        let totals = if evaluation.decision.action == Action::Throttle {
            state.totals
        } else {
            state.totals_with(evaluation.effects.usage.as_ref(), evaluation.effects.counts_step)
        };
        let shadow = shadow_deltas(snapshot, &evaluation);
        Self {
            period_deltas: evaluation.periods,
            tenant_rate_delta: evaluation.rates,
            decision: evaluation.decision,
            record: evaluation.record,
            effects: evaluation.effects,
            deciding_mode: evaluation.deciding_mode,
            fail_opens: evaluation.fail_opens,
            shadow,
            incident: None,
            change: Some(Change { totals, repeat: evaluation.repeat, at, observed, ended }),
        }
    }
}

fn shadow_deltas(snapshot: &CompiledSnapshot, evaluation: &Evaluation) -> Vec<ShadowDelta> {
    evaluation
        .shadow_evaluated
        .iter()
        .map(|policy_id| {
            let mut delta = ShadowDelta {
                policy_id: policy_id.clone(),
                owner: snapshot.policy(policy_id).and_then(|p| p.tenant_id.clone()),
                evaluations: 1,
                would_block: 0,
                would_warn: 0,
                would_throttle: 0,
            };
            for entry in evaluation.decision.shadow.iter().filter(|s| &s.policy_id == policy_id) {
                match entry.would_action {
                    Action::Block => delta.would_block += 1,
                    Action::Warn => delta.would_warn += 1,
                    Action::Throttle => delta.would_throttle += 1,
                    Action::Allow => {}
                }
            }
            delta
        })
        .collect()
}

/// One entry of a run's ledger, as [`Run::rehydrate`] reads it back.
#[derive(Clone, Copy, Debug)]
pub struct LedgerItem<'a> {
    /// The step call, for a step entry (run start and run end have none).
    pub step: Option<&'a StepCall>,
    /// The decision recorded.
    pub decision: &'a Decision,
    /// The recorded effects; `None` when they could not be decoded, which fails the integrity check.
    pub effects: Option<&'a Effects>,
}

/// What a run's stored form says besides its ledger.
#[derive(Clone, Debug)]
pub struct StoredHead {
    /// Owner.
    pub tenant_id: TenantId,
    /// Run.
    pub run_id: RunId,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Status (expiry is not in the ledger, so the stored status is the one kept).
    pub status: RunStatus,
    /// Totals, checked against the ledger's.
    pub totals: Totals,
    /// The hash of the snapshot the run is bound to.
    pub snapshot_hash: SnapshotHash,
    /// Creation time (the TTL counts from it).
    pub created_at: Timestamp,
    /// End time, once it ended.
    pub ended_at: Option<Timestamp>,
    /// How it ended, once ended by its agent.
    pub outcome: Option<runguard_contract::Outcome>,
}

/// A run whose stored form did not check out. It still holds the run, bound to a snapshot that blocks
/// every call, so that a host fails it closed.
#[derive(Debug)]
pub struct IntegrityVerdict {
    /// The run, failing closed (boxed: the verdict is rare, a run is large).
    pub run: Box<Run>,
}

/// One run: its snapshot, its state and what its lifecycle rules need.
#[derive(Clone, Debug)]
pub struct Run {
    snapshot: Arc<CompiledSnapshot>,
    state: RunState,
    failure: FailureTracker,
    created_at: Timestamp,
    ended_at: Option<Timestamp>,
    outcome: Option<runguard_contract::Outcome>,
}

impl Run {
    /// A new run bound to `snapshot`, and the outcome of its run-start call, which the host persists and
    /// commits like any other.
    #[must_use = "the run-start outcome changes nothing until it is persisted and committed"]
    pub fn start(
        snapshot: Arc<CompiledSnapshot>,
        tenant: TenantId,
        run_id: RunId,
        labels: BTreeMap<String, String>,
        now: Timestamp,
    ) -> (Self, Outcome) {
        let state = RunState::new(tenant, run_id, labels);
        let run = Self::resume(snapshot, state, now);
        let outcome = run.start_call(now);
        (run, outcome)
    }

    /// The outcome of the run-start call on this run's current state.
    pub(crate) fn start_call(&self, now: Timestamp) -> Outcome {
        let evaluation = evaluate(
            &self.snapshot,
            &self.state,
            Call::RunStart,
            &TenantRates::default(),
            &PeriodTotals::default(),
            now,
        );
        Outcome::evaluated(&self.snapshot, &self.state, evaluation, now, None, None)
    }

    /// Answers a step call at `now`. The tenant's rate windows are read and, when the call counts against
    /// them, counted at once (a host holds the tenant's lock around this call): a call whose persistence
    /// then fails over-counts, which errs on the closed side.
    ///
    /// Tenant-period budgets count from zero here: a host that keeps tenant totals calls
    /// [`step_with_periods`](Self::step_with_periods).
    pub fn step(
        &self,
        call: &StepCall,
        limits: &RunLimits,
        tenant_rates: &mut TenantRates,
        now: Timestamp,
    ) -> Result<Outcome, Refusal> {
        self.step_in_family(call, limits, tenant_rates, &Family::default(), &PeriodTotals::default(), now)
    }

    /// [`step`](Self::step) with the tenant's current period totals (for the keys
    /// [`period_keys`](crate::period_keys) names): the outcome's `period_deltas` are what the host commits
    /// with the call.
    pub fn step_with_periods(
        &self,
        call: &StepCall,
        limits: &RunLimits,
        tenant_rates: &mut TenantRates,
        periods: &PeriodTotals,
        now: Timestamp,
    ) -> Result<Outcome, Refusal> {
        self.step_in_family(call, limits, tenant_rates, &Family::default(), periods, now)
    }

    /// Answers a step call of a run with a parent or children (`docs/architecture.md`, "Parent and child
    /// runs"): as [`step_with_periods`](Self::step_with_periods), with the run's per-run budgets compared
    /// against its rolled-up totals (its own plus `family.descendants`) and each ancestor's per-run budgets
    /// against that ancestor's rolled-up totals (see [`Family`]). The host adds the outcome's usage (its
    /// [`totals`](Outcome::totals) less the run's) to every ancestor's rolled-up totals when it persists the
    /// outcome.
    pub fn step_in_family(
        &self,
        call: &StepCall,
        limits: &RunLimits,
        tenant_rates: &mut TenantRates,
        family: &Family<'_>,
        periods: &PeriodTotals,
        now: Timestamp,
    ) -> Result<Outcome, Refusal> {
        match self.state.admit(call) {
            Admission::Evaluate => {}
            Admission::Replay(decision) => {
                return Ok(Outcome {
                    decision: *decision,
                    record: None,
                    effects: Effects::default(),
                    deciding_mode: None,
                    fail_opens: Vec::new(),
                    shadow: Vec::new(),
                    incident: None,
                    period_deltas: Vec::new(),
                    tenant_rate_delta: None,
                    change: None,
                });
            }
            Admission::Refused(refusal) => return Err(refusal),
        }
        if call.index >= limits.steps_per_run {
            return Err(Refusal::StepLimit { max: limits.steps_per_run });
        }
        let mut evaluation = evaluate(&self.snapshot, &self.state, Call::Step(call), tenant_rates, periods, now);
        let own_action = evaluation.decision.action;
        crate::ancestors::widen(&mut evaluation, &self.snapshot, &self.state, call, family, now);
        if evaluation.decision.action != own_action {
            // What the call adds to its tenant's periods and rate windows follows the action the family
            // settled: an ancestor's block at `pre` is recorded as any block, without a condition that
            // could refuse its commit. (A throttle the family turns into a block already dropped its rate
            // events: the call consumes no rate allowance.)
            let (labels, action) = (&self.state.labels, evaluation.decision.action);
            evaluation.periods = crate::periods::deltas(&self.snapshot, labels, Some(call), action, periods, now);
            evaluation.rates = crate::shared_rates::delta(&self.snapshot, &evaluation.effects, Some(call), action, now);
        }
        tenant_rates.apply(&evaluation.effects);
        let observed = self.failure.observation(call);
        Ok(Outcome::evaluated(&self.snapshot, &self.state, evaluation, now, Some(observed), None))
    }

    /// Ends the run as its agent reports; `None` when it is no longer running (ending it again changes
    /// nothing).
    #[must_use = "the run-end outcome changes nothing until it is persisted and committed"]
    pub fn end(
        &self,
        outcome: runguard_contract::Outcome,
        error: Option<&StepError>,
        now: Timestamp,
    ) -> Option<Outcome> {
        if !self.state.status.is_running() {
            return None;
        }
        let evaluation = evaluate(
            &self.snapshot,
            &self.state,
            Call::RunEnd { outcome },
            &TenantRates::default(),
            &PeriodTotals::default(),
            now,
        );
        let mut answer = Outcome::evaluated(&self.snapshot, &self.state, evaluation, now, None, Some(outcome));
        // Only a running run that ends failed, and is not stopped by a block, creates an incident.
        if runguard_contract::prevention::may_create_incident(self.state.status, outcome)
            && self.after(&answer).state.status == RunStatus::Failed
        {
            let (signature, error) = self.failure.incident_basis(error);
            answer.incident = Some(IncidentBasis { signature, error });
        }
        Some(answer)
    }

    /// Applies a persisted outcome of this run's latest [`step`](Self::step), [`end`](Self::end) or
    /// [`start`](Self::start). An outcome must be committed before the next call is answered.
    pub fn commit(&mut self, outcome: Outcome) {
        let Some(change) = outcome.change else { return };
        self.state.apply(&outcome.decision, &outcome.effects);
        let Change { at, observed, ended, repeat, .. } = change;
        self.state.record_repeat(&outcome.decision, repeat, self.snapshot.repeat_window());
        self.settle(at, observed, ended);
    }

    /// The run as it will be once `outcome` is committed, leaving this one unchanged: for a host that
    /// persists the run's new form before it applies the outcome (it then replaces the run with this one).
    #[must_use = "the run as it will be is to be persisted; `commit` applies an outcome in place"]
    pub fn after(&self, outcome: &Outcome) -> Self {
        let mut next = self.clone();
        if let Some(change) = &outcome.change {
            next.state.apply(&outcome.decision, &outcome.effects);
            next.state.record_repeat(&outcome.decision, change.repeat.clone(), self.snapshot.repeat_window());
            next.settle(change.at, change.observed.clone(), change.ended);
        }
        next
    }

    /// What a committed call changes besides the engine state.
    fn settle(&mut self, at: Timestamp, observed: Option<Observation>, ended: Option<runguard_contract::Outcome>) {
        if let Some(observation) = observed {
            self.failure.record(observation);
        }
        if !self.state.status.is_running() && self.ended_at.is_none() {
            self.ended_at = Some(at);
        }
        if ended.is_some() {
            self.outcome = ended;
        }
    }

    /// Stops a running run because an ancestor left `running` (termination `parent_stopped`); whether it
    /// did. The host persists the run's new status before it answers the refused call.
    #[must_use = "a stopped run's new status must be persisted"]
    pub fn stop_for_parent(&mut self, now: Timestamp) -> bool {
        if !self.state.status.is_running() {
            return false;
        }
        self.state.stop_for_parent();
        if self.ended_at.is_none() {
            self.ended_at = Some(now);
        }
        true
    }

    /// Expires a running run past the TTL of `limits` at `now`; whether it did. The host persists the
    /// run's new status before anything else happens to it.
    #[must_use = "an expired run's new status must be persisted"]
    pub fn expire_if_due(&mut self, now: Timestamp, limits: &RunLimits) -> bool {
        if !self.state.status.is_running() || !limits.ttl_elapsed(self.created_at, now) {
            return false;
        }
        self.state.expire();
        if self.ended_at.is_none() {
            self.ended_at = Some(now);
        }
        true
    }

    /// Rebuilds a run from its stored form and ledger. `snapshot` is the run's snapshot compiled, or `None`
    /// when it failed its own verification; `totals_consistent` is the store's check that each entry's
    /// totals follow from the previous one. Anything that does not check out fails the run closed.
    pub fn rehydrate<'a>(
        snapshot: Option<Arc<CompiledSnapshot>>,
        head: StoredHead,
        ledger: impl IntoIterator<Item = LedgerItem<'a>>,
        totals_consistent: bool,
    ) -> Result<Self, IntegrityVerdict> {
        let mut state = RunState::new(head.tenant_id, head.run_id, head.labels);
        let mut failure = FailureTracker::default();
        // A run is always stored with its run-start entry; without one it cannot be trusted.
        let mut entries = 0usize;
        let mut replay_ok = true;
        let repeat_window = snapshot.as_ref().map_or(0, |s| s.repeat_window());
        for item in ledger {
            entries += 1;
            if let Some(call) = item.step {
                failure.record(Observation::of(call));
                // The keys are computed from the stored call as the live run computed them from the sent one.
                if repeat_window > 0 {
                    let keys = state.repeat.keys_of(call);
                    state.record_repeat(item.decision, Some(keys), repeat_window);
                }
            }
            match item.effects {
                Some(effects) => state.apply(item.decision, effects),
                None => replay_ok = false,
            }
        }
        let trusted = replay_ok && entries > 0 && totals_consistent && state.totals == head.totals;
        // The status comes from the stored run (expiry is not in the ledger); totals were checked above.
        state.status = head.status;
        let run = |snapshot| Self {
            snapshot,
            state,
            failure,
            created_at: head.created_at,
            ended_at: head.ended_at,
            outcome: head.outcome,
        };
        match snapshot {
            Some(snapshot) if trusted => Ok(run(snapshot)),
            _ => Err(IntegrityVerdict { run: Box::new(run(Arc::new(CompiledSnapshot::tampered(head.snapshot_hash)))) }),
        }
    }

    /// A run continuing from `state` (replays start from a state rather than from a run-start call).
    pub(crate) fn resume(snapshot: Arc<CompiledSnapshot>, state: RunState, created_at: Timestamp) -> Self {
        Self { snapshot, state, failure: FailureTracker::default(), created_at, ended_at: None, outcome: None }
    }

    /// The run's engine state.
    pub fn state(&self) -> &RunState {
        &self.state
    }

    /// The snapshot it is bound to.
    pub fn snapshot(&self) -> &Arc<CompiledSnapshot> {
        &self.snapshot
    }

    /// When it was created.
    pub fn created_at(&self) -> Timestamp {
        self.created_at
    }

    /// When it ended or stopped, if it has.
    pub fn ended_at(&self) -> Option<Timestamp> {
        self.ended_at
    }

    /// How its agent ended it, if it did.
    pub fn outcome(&self) -> Option<runguard_contract::Outcome> {
        self.outcome
    }
}
