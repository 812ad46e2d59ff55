//! Types the store defines for what it keeps beyond the contract's own types.

use std::collections::BTreeMap;

use runguard_contract::{
    Action, Decision, NextCall, Outcome, Phase, PolicyId, RunId, RunStatus, SnapshotRef, StepCall, StepError, TenantId,
    TerminationReason, Timestamp, Totals,
};
use serde::{Deserialize, Serialize};

/// A run as stored: its binding to a snapshot and everything `GET /v1/runs/{id}` shows.
///
/// The binding `(tenant_id, run_id) → snapshot` is immutable: an upsert naming another snapshot fails
/// the batch with `Conflict`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRun {
    /// The run's tenant.
    pub tenant_id: TenantId,
    /// The run, unique within its tenant.
    pub run_id: RunId,
    /// The snapshot it evaluates (id, hash, policy count).
    pub snapshot: SnapshotRef,
    /// Current status.
    pub status: RunStatus,
    /// Totals after the last acknowledged call.
    pub totals: Totals,
    /// Why it was stopped, if it was.
    pub termination_reason: Option<TerminationReason>,
    /// The step at which it was stopped.
    pub stopped_at_step: Option<u64>,
    /// The policy that stopped it.
    pub violation_policy_id: Option<PolicyId>,
    /// Caller labels.
    pub labels: BTreeMap<String, String>,
    /// The endpoint given at run creation, if any.
    pub api_endpoint: Option<String>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it ended, stopped or expired.
    pub ended_at: Option<Timestamp>,
    /// The outcome reported at run end.
    pub outcome: Option<Outcome>,
    /// The next call it expects.
    pub next: NextCall,
    /// The run that spawned it; `None` for a root run.
    #[serde(default)]
    pub parent_run_id: Option<RunId>,
    /// Its ancestors, root first and parent last (empty for a root run); immutable, so that a child's
    /// call names every run whose rolled-up totals it changes without reading them.
    #[serde(default)]
    pub ancestors: Vec<RunId>,
    /// The ancestor whose policy stopped it, when an ancestor's budget did.
    #[serde(default)]
    pub violation_run_id: Option<RunId>,
}

/// A running run's identity and creation time: what expiry needs of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunStart {
    /// The run's tenant.
    pub tenant_id: TenantId,
    /// The run.
    pub run_id: RunId,
    /// When it was created.
    pub created_at: Timestamp,
}

impl StoredRun {
    /// How many runs its chain holds, the root and itself included.
    pub fn depth(&self) -> usize {
        self.ancestors.len().saturating_add(1)
    }

    /// The run as its ledger leaves it, from its entries newest first: the newest entry's totals, and the
    /// call expected after the newest entry that moved it (a throttled call or a run start moves nothing).
    /// A step that moves only these two may leave the stored row as it was (`WriteOp::AdvanceRun`); nothing
    /// else changes them, so the row plus its ledger is the run now. A run that is not running had its row
    /// written whole when it stopped, and is left as it is (without reading `newest_first`).
    pub(crate) fn catch_up<E>(
        &mut self,
        newest_first: impl Iterator<Item = Result<impl std::borrow::Borrow<LedgerEntry>, E>>,
    ) -> Result<(), E> {
        if !self.status.is_running() {
            return Ok(());
        }
        let mut newest = true;
        for entry in newest_first {
            let entry = entry?;
            let entry = entry.borrow();
            if newest {
                self.totals = entry.totals_after;
                newest = false;
            }
            if let Some(next) = entry.next_call() {
                self.next = next;
                break;
            }
        }
        Ok(())
    }

    /// [`catch_up`](Self::catch_up) from entries already read.
    pub(crate) fn catch_up_from<'a>(&mut self, newest_first: impl Iterator<Item = &'a LedgerEntry>) {
        self.catch_up(newest_first.map(Ok)).unwrap_or_else(|never: std::convert::Infallible| match never {});
    }
}

impl LedgerEntry {
    /// The call a run expects after this entry, when the entry moved it: an evaluated step that was not
    /// throttled (the engine's rule: after a `pre` its `post`, after a `post` the next step's `pre`).
    pub(crate) fn next_call(&self) -> Option<NextCall> {
        let LedgerCall::Step(call) = &self.call else { return None };
        if self.decision.action == Action::Throttle {
            return None;
        }
        Some(match call.phase {
            Phase::Pre => NextCall { index: call.index, phase: Phase::Post },
            Phase::Post => NextCall { index: call.index.saturating_add(1), phase: Phase::Pre },
        })
    }
}

/// What a run's descendants add to it: kept apart from [`StoredRun`], which only the run's own calls
/// rewrite, so that a descendant's call increments it without touching the run's row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRollup {
    /// The summed usage of every descendant (children, grandchildren, …).
    pub descendants: Totals,
    /// How many children it has.
    pub children: u64,
}

impl RunRollup {
    /// `self + delta`, saturating.
    pub fn plus(self, delta: RunRollup) -> RunRollup {
        RunRollup {
            descendants: self.descendants.saturating_add(delta.descendants),
            children: self.children.saturating_add(delta.children),
        }
    }
}

/// The call an acknowledged decision answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerCall {
    /// Run creation.
    RunStart,
    /// A step call, as sent (texts stripped by the node when `ledger_texts = false`).
    Step(StepCall),
    /// Run end.
    RunEnd {
        /// The reported outcome.
        outcome: Outcome,
        /// The reported error, if any.
        error: Option<StepError>,
    },
}

/// One acknowledged call of a run: the call, its decision, and the run totals after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Position in the run's ledger, from 0; assigned by the store at commit.
    pub position: u64,
    /// The call.
    pub call: LedgerCall,
    /// The decision returned for it.
    pub decision: Decision,
    /// The run totals after the call.
    pub totals_after: Totals,
    /// How the call changed the run state, encoded by the node (opaque here); replaying these rebuilds
    /// the run's state exactly (rate windows, warn tiers, idempotency) on rehydration.
    pub effects: Vec<u8>,
}

impl LedgerEntry {
    /// An entry to append; the store sets `position`.
    pub fn new(call: LedgerCall, decision: Decision, totals_after: Totals) -> Self {
        Self { position: 0, call, decision, totals_after, effects: Vec::new() }
    }

    /// The same entry carrying the node's encoded state effects.
    pub fn with_effects(mut self, effects: Vec<u8>) -> Self {
        self.effects = effects;
        self
    }
}

/// Per-policy shadow statistics, also used as the delta added by a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShadowStats {
    /// Evaluations of the shadow policy.
    pub evaluations: u64,
    /// Would-be blocks.
    pub would_block: u64,
    /// Would-be warns.
    pub would_warn: u64,
    /// Would-be throttles.
    pub would_throttle: u64,
}

impl ShadowStats {
    /// `self + delta`, saturating.
    pub fn plus(self, delta: ShadowStats) -> ShadowStats {
        ShadowStats {
            evaluations: self.evaluations.saturating_add(delta.evaluations),
            would_block: self.would_block.saturating_add(delta.would_block),
            would_warn: self.would_warn.saturating_add(delta.would_warn),
            would_throttle: self.would_throttle.saturating_add(delta.would_throttle),
        }
    }
}

/// The gates of tenant graduation (`docs/learning-loop.md`), as plain fields the node computes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraduationGates {
    /// Gate 1 passed.
    pub prevention_passed: bool,
    /// Counted preventions in the window.
    pub counted_preventions: u64,
    /// Recurrences the pattern policies failed to prevent in the window.
    pub missed_recurrences: u64,
    /// Prevention rate in parts per million.
    pub prevention_rate_ppm: u32,
    /// Gate 2 passed.
    pub rollback_passed: bool,
    /// Automatic demotions in the window.
    pub demotions: u64,
    /// Regrets in the window.
    pub regrets: u64,
    /// Regret rate in parts per million.
    pub regret_rate_ppm: u32,
    /// The latest counted prevention.
    pub last_prevention_at: Option<Timestamp>,
}

/// A tenant's graduation level as last evaluated; every state written is also kept in its history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraduationState {
    /// `alpha`, `beta`, `complete` or `degraded`.
    pub level: String,
    /// The level a `degraded` tenant fell from.
    pub degraded_from: Option<String>,
    /// Why the level is what it is.
    pub reason: Option<String>,
    /// When it was evaluated.
    pub at: Timestamp,
    /// The gates at that time.
    pub gates: GraduationGates,
}
