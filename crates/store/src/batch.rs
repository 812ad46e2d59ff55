//! What a group commit writes, and what it answers.

use runguard_contract::{
    AuditEntry, BudgetMetric, Decision, Incident, Pattern, Policy, PolicyId, PreventionRecord, Regret, RunId, Snapshot,
    TenantId, Timestamp,
};

use crate::model::{GraduationState, LedgerEntry, RunRollup, ShadowStats, StoredRun};

/// Why a prevention record may be appended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordAuthority {
    /// A live block: the record is checked with
    /// [`check_record_against_decision`](runguard_contract::prevention::check_record_against_decision)
    /// against the blocking decision and the deciding policy version, for a run of `run_tenant` that must
    /// exist (stored, or upserted in the same batch) and be bound to the record's snapshot.
    Live {
        /// The blocking decision.
        decision: Box<Decision>,
        /// The deciding policy, at the version the snapshot pins.
        policy: Box<Policy>,
        /// The tenant of the run.
        run_tenant: TenantId,
    },
    /// A block decided by an ancestor's per-run budget policy: the record is written for the
    /// descendant that made the call but names the ancestor's policy, version and snapshot hash. Checked
    /// like [`Live`](Self::Live) against the decision as the ancestor's snapshot gave it, with the
    /// record's snapshot bound to `ancestor`, which must be one of the run's ancestors.
    Ancestor {
        /// The blocking decision.
        decision: Box<Decision>,
        /// The ancestor's deciding policy, at the version its snapshot pins.
        policy: Box<Policy>,
        /// The tenant of both runs.
        run_tenant: TenantId,
        /// The ancestor whose policy decided.
        ancestor: RunId,
    },
    /// A record a simulation persisted (`is_simulated: true`). It is not checked against a live decision,
    /// is chained like every record, and is listed only when simulated records are asked for.
    Simulated,
}

/// A prevention record to append. The store assigns `seq` and `prev_hash` in batch order and seals it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordAppend {
    /// The record; its `seq`, `prev_hash` and `hash` are overwritten.
    pub record: PreventionRecord,
    /// Why it may exist.
    pub authority: RecordAuthority,
}

/// One call's consumption in a tenant-scope rate window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TenantRateUse {
    /// When.
    pub at: Timestamp,
    /// Steps admitted.
    pub steps: u64,
    /// Tokens reported.
    pub tokens: u64,
    /// Micro-USD reported.
    pub cost_micros: u64,
}

/// A rule the recording of a [`TenantRateEvent`] is conditional on: the tenant's recorded use of
/// `metric` after `since`, plus `request`, must stay within `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateBound {
    /// Events after this instant count.
    pub since: Timestamp,
    /// What is summed.
    pub metric: runguard_contract::RateMetric,
    /// What the call asks for.
    pub request: u64,
    /// The inclusive maximum.
    pub max: u64,
}

/// A call's event in its tenant's shared rate windows (`docs/architecture.md`, "Shared tenant state").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantRateEvent {
    /// The tenant.
    pub tenant: TenantId,
    /// The event.
    pub event: TenantRateUse,
    /// The tenant's events at or before this instant are outside every window and may be dropped.
    pub horizon: Timestamp,
    /// What the recording is conditional on; a bound that does not hold refuses the batch with a conflict
    /// for which [`StoreError::is_tenant_limit`](crate::StoreError::is_tenant_limit) holds.
    pub bounds: Vec<RateBound>,
}

/// One write of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    /// A new policy version. Optimistic concurrency: `policy.version` must be the current version plus one
    /// (1 for a policy that does not exist yet), else the batch fails with `Conflict`. A `PUT` with
    /// `expected_version = n` therefore writes version `n + 1` and loses any race.
    PutPolicyVersion(Box<Policy>),
    /// An activation audit entry, appended after the policy's earlier ones.
    AppendAudit {
        /// The policy's owner (`None` for a global policy).
        tenant: Option<TenantId>,
        /// The entry.
        entry: AuditEntry,
    },
    /// A snapshot, stored under the hash of its canonical bytes (idempotent).
    PutSnapshot(Box<Snapshot>),
    /// Creates or updates a run. Its snapshot must be stored or in the batch; its binding never changes.
    PutRun(Box<StoredRun>),
    /// A running run after a step that moved only its totals and the call it expects next (nothing else
    /// of the run changes on a step that is neither throttled nor stopping it). The batch must append
    /// that step's ledger entry to the run, and the run's totals and next call must be the ones the entry
    /// leaves; anything else is refused. A backend may keep the stored row as it was and read these two
    /// from the ledger's last entry (sled does: one write per step instead of two).
    AdvanceRun(Box<StoredRun>),
    /// The fencing condition of a run's writes (`docs/store.md`, "Fencing"): at this point of the commit
    /// the run's ledger holds exactly `ledger_len` entries and the run is running — or, with `ledger_len`
    /// 0, the run does not exist yet. Checked inside the commit transaction, after every commit before
    /// it, on any node; a mismatch fails this caller alone with [`StoreErrorKind::Fenced`]. A writer
    /// puts it first in a batch that writes the run.
    ///
    /// [`StoreErrorKind::Fenced`]: crate::StoreErrorKind::Fenced
    FenceRun {
        /// The run's tenant.
        tenant_id: TenantId,
        /// The run.
        run_id: RunId,
        /// How many ledger entries the writer's copy of the run holds.
        ledger_len: u64,
    },
    /// Appends an acknowledged call to a run's ledger (the run must exist). The store sets `position`.
    AppendLedger {
        /// The run's tenant.
        tenant_id: TenantId,
        /// The run.
        run_id: RunId,
        /// The entry.
        entry: Box<LedgerEntry>,
    },
    /// Appends a prevention record to the chain.
    AppendRecord(Box<RecordAppend>),
    /// Adds `delta` to a policy's shadow statistics as seen by the run's tenant: a global policy keeps
    /// them per tenant (`docs/policies.md`).
    AddShadowStats {
        /// The policy's owner (`None` for a global policy).
        tenant: Option<TenantId>,
        /// The tenant of the run that evaluated it (the owner itself for a tenant policy).
        run_tenant: TenantId,
        /// The policy.
        policy_id: PolicyId,
        /// What to add.
        delta: ShadowStats,
    },
    /// Adds `delta` to a tenant's usage of a tenant-period budget policy within the period starting at
    /// `period_start` (`docs/architecture.md`, "Shared tenant state"). With `at_most`, the increment is
    /// conditional: when the stored total plus `delta` would exceed it the batch is refused with a
    /// conflict for which [`StoreError::is_tenant_limit`](crate::StoreError::is_tenant_limit) holds.
    AddTenantUsage {
        /// The tenant whose runs used it (a global policy keeps one total per tenant).
        tenant: TenantId,
        /// The budget policy.
        policy_id: PolicyId,
        /// The start of the period.
        period_start: Timestamp,
        /// What to add.
        delta: u64,
        /// The inclusive bound the new total must stay within, if any.
        at_most: Option<u64>,
    },
    /// Records a call's event in its tenant's shared rate windows, conditionally (PostgreSQL only: a sled
    /// node keeps its tenants' windows in memory).
    AddTenantRateEvent(Box<TenantRateEvent>),
    /// A new incident (ids are unique; a second write of one is a `Conflict`).
    PutIncident(Box<Incident>),
    /// Creates or updates a pattern; one pattern per (tenant, signature hash, error type).
    PutPattern(Box<Pattern>),
    /// Marks a record as a false positive; at most one regret per record (`Conflict` otherwise).
    PutRegret {
        /// The record's tenant.
        tenant_id: TenantId,
        /// The regret.
        regret: Regret,
    },
    /// Adds `delta` to the rolled-up part of each of `runs` (descendants' usage, children count): a
    /// descendant's call names its ancestors, a child's creation its parent. An increment of what is
    /// stored when the batch commits, so that concurrent descendants never lose one another's usage;
    /// every run must exist.
    RollUp {
        /// The runs' tenant.
        tenant_id: TenantId,
        /// The runs to add to.
        runs: Vec<RunId>,
        /// What to add to each.
        delta: RunRollup,
    },
    /// Writes nothing; fails the batch (alone) unless the run's rolled-up `metric` — its own stored totals
    /// plus its descendants' rolled-up usage, both as this batch leaves them — is at most `at_most`. Added
    /// after a family member's allowed call's writes, once per budget of the run and of each ancestor that
    /// the decision was checked against, so that nodes with different views of a family never together
    /// pass a limit (`docs/architecture.md`, "Parent and child runs").
    CheckRolledUp {
        /// The run's tenant.
        tenant_id: TenantId,
        /// The run whose rolled-up total is bounded.
        run_id: RunId,
        /// What is bounded.
        metric: BudgetMetric,
        /// The largest value that holds.
        at_most: u64,
    },
    /// Sets a tenant's graduation state and appends it to the history.
    SetGraduation {
        /// The tenant.
        tenant_id: TenantId,
        /// The new state.
        state: GraduationState,
    },
}

/// Many writes from many runs, made durable together by [`Store::commit`](crate::Store::commit).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    ops: Vec<WriteOp>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a write.
    pub fn push(&mut self, op: WriteOp) -> &mut Self {
        self.ops.push(op);
        self
    }

    /// The writes, in order.
    pub fn ops(&self) -> &[WriteOp] {
        &self.ops
    }

    /// Moves every write of `other` to the end of this batch (group commit merges without copying).
    pub fn append(&mut self, other: WriteBatch) -> &mut Self {
        let mut ops = other.ops;
        self.ops.append(&mut ops);
        self
    }

    /// How many writes.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Adds a policy version.
    pub fn put_policy_version(&mut self, policy: Policy) -> &mut Self {
        self.push(WriteOp::PutPolicyVersion(Box::new(policy)))
    }

    /// Adds an audit entry.
    pub fn append_audit(&mut self, tenant: Option<TenantId>, entry: AuditEntry) -> &mut Self {
        self.push(WriteOp::AppendAudit { tenant, entry })
    }

    /// Adds a snapshot.
    pub fn put_snapshot(&mut self, snapshot: Snapshot) -> &mut Self {
        self.push(WriteOp::PutSnapshot(Box::new(snapshot)))
    }

    /// Adds a run upsert.
    pub fn put_run(&mut self, run: StoredRun) -> &mut Self {
        self.push(WriteOp::PutRun(Box::new(run)))
    }

    /// Adds a running run's step: its new totals and next call (see [`WriteOp::AdvanceRun`]).
    pub fn advance_run(&mut self, run: StoredRun) -> &mut Self {
        self.push(WriteOp::AdvanceRun(Box::new(run)))
    }

    /// Adds the fencing condition of a run's writes (see [`WriteOp::FenceRun`]).
    pub fn fence_run(&mut self, tenant_id: TenantId, run_id: RunId, ledger_len: u64) -> &mut Self {
        self.push(WriteOp::FenceRun { tenant_id, run_id, ledger_len })
    }

    /// Adds a ledger append.
    pub fn append_ledger(&mut self, tenant_id: TenantId, run_id: RunId, entry: LedgerEntry) -> &mut Self {
        self.push(WriteOp::AppendLedger { tenant_id, run_id, entry: Box::new(entry) })
    }

    /// Adds a live record, checked against its decision and deciding policy.
    pub fn append_record(
        &mut self,
        record: PreventionRecord,
        decision: Decision,
        policy: Policy,
        run_tenant: TenantId,
    ) -> &mut Self {
        self.push(WriteOp::AppendRecord(Box::new(RecordAppend {
            record,
            authority: RecordAuthority::Live { decision: Box::new(decision), policy: Box::new(policy), run_tenant },
        })))
    }

    /// Adds a simulated record.
    pub fn append_simulated_record(&mut self, record: PreventionRecord) -> &mut Self {
        self.push(WriteOp::AppendRecord(Box::new(RecordAppend { record, authority: RecordAuthority::Simulated })))
    }

    /// Adds a shadow statistics delta of the policy owned by `tenant`, evaluated by a run of `run_tenant`.
    pub fn add_shadow_stats(
        &mut self,
        tenant: Option<TenantId>,
        run_tenant: TenantId,
        policy_id: PolicyId,
        delta: ShadowStats,
    ) -> &mut Self {
        self.push(WriteOp::AddShadowStats { tenant, run_tenant, policy_id, delta })
    }

    /// Adds a (conditional) increment of a tenant's usage of a tenant-period budget.
    pub fn add_tenant_usage(
        &mut self,
        tenant: TenantId,
        policy_id: PolicyId,
        period_start: Timestamp,
        delta: u64,
        at_most: Option<u64>,
    ) -> &mut Self {
        self.push(WriteOp::AddTenantUsage { tenant, policy_id, period_start, delta, at_most })
    }

    /// Adds an incident.
    pub fn put_incident(&mut self, incident: Incident) -> &mut Self {
        self.push(WriteOp::PutIncident(Box::new(incident)))
    }

    /// Adds a pattern upsert.
    pub fn put_pattern(&mut self, pattern: Pattern) -> &mut Self {
        self.push(WriteOp::PutPattern(Box::new(pattern)))
    }

    /// Adds a regret.
    pub fn put_regret(&mut self, tenant_id: TenantId, regret: Regret) -> &mut Self {
        self.push(WriteOp::PutRegret { tenant_id, regret })
    }

    /// Adds `delta` to the rolled-up part of each of `runs`.
    pub fn roll_up(&mut self, tenant_id: TenantId, runs: Vec<RunId>, delta: RunRollup) -> &mut Self {
        self.push(WriteOp::RollUp { tenant_id, runs, delta })
    }

    /// Bounds a run's rolled-up total ([`WriteOp::CheckRolledUp`]).
    pub fn check_rolled_up(
        &mut self,
        tenant_id: TenantId,
        run_id: RunId,
        metric: BudgetMetric,
        at_most: u64,
    ) -> &mut Self {
        self.push(WriteOp::CheckRolledUp { tenant_id, run_id, metric, at_most })
    }

    /// Adds a graduation state.
    pub fn set_graduation(&mut self, tenant_id: TenantId, state: GraduationState) -> &mut Self {
        self.push(WriteOp::SetGraduation { tenant_id, state })
    }
}

/// What a successful commit made durable that the caller did not know before.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitReceipt {
    /// The appended records, sealed (`seq`, `prev_hash`, `hash`), in batch order.
    pub records: Vec<PreventionRecord>,
    /// The ledger position given to each ledger append, in batch order.
    pub ledger_positions: Vec<u64>,
    /// How many writes the batch held.
    pub ops: usize,
}
