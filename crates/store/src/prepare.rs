//! Checking callers' batches before anything is written: the one place that knows the store's write
//! rules, shared by every backend.
//!
//! [`Prepare`] walks a batch's writes against a [`ReadView`] (the state the backend holds, read inside
//! its write transaction or under its writer lock) plus what the batch itself already staged, and answers
//! either a refusal or the [`Staged`] writes with sealed records and assigned positions. A backend only
//! reads what the view asks and writes what `Staged` names, in its own layout.

use std::collections::{BTreeMap, HashMap, HashSet};

use runguard_contract::canonical::{SNAPSHOT_DOMAIN, canonical_json, domain_hash};
use runguard_contract::prevention::check_record_against_decision;
use runguard_contract::{
    AuditEntry, BudgetMetric, Decision, Incident, IncidentId, Pattern, PatternId, Policy, PolicyId, PreventionRecord,
    RateMetric, RecordHash, RecordId, Regret, RunId, RunStatus, Scope, SignatureHash, Snapshot, SnapshotHash,
    SnapshotId, TenantId, Timestamp, Totals,
};

use crate::batch::{CommitReceipt, RecordAppend, RecordAuthority, TenantRateEvent, WriteBatch, WriteOp};
use crate::error::StoreError;
use crate::keys;
use crate::model::{GraduationState, LedgerEntry, RunRollup, ShadowStats, StoredRun};
use crate::run_cache::CachedRun;

/// The last record of the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ChainHead {
    pub(crate) seq: u64,
    pub(crate) hash: RecordHash,
}

/// What the write rules need to know of the stored state. Every answer is about committed data plus,
/// for a backend that applies callers one after another inside one transaction, the earlier callers'
/// writes; never about the batch being checked (that is [`Prepare`]'s own overlay).
pub(crate) trait ReadView {
    /// The current version of a policy.
    fn policy_head(&self, owner: Option<&TenantId>, id: &PolicyId) -> Result<Option<u32>, StoreError>;
    /// Whether any tenant has a policy with this id.
    fn tenant_policy_id_exists(&self, id: &PolicyId) -> Result<bool, StoreError>;
    /// The number the next audit entry of a policy takes (0 for the first).
    fn next_audit(&self, owner: Option<&TenantId>, id: &PolicyId) -> Result<u64, StoreError>;
    /// Whether a snapshot is stored.
    fn snapshot_exists(&self, hash: &SnapshotHash) -> Result<bool, StoreError>;
    /// The snapshot a stored run is bound to.
    fn run_binding(&self, tenant: &TenantId, run: &RunId) -> Result<Option<SnapshotHash>, StoreError>;
    /// Whether the run is known to be listed as live (`None`: unknown, or the backend keeps no listing).
    fn run_listed_live(&self, tenant: &TenantId, run: &RunId) -> Option<bool>;
    /// What a run's fencing condition compares: `None` when the run does not exist.
    fn run_head(&self, tenant: &TenantId, run: &RunId) -> Result<Option<RunHead>, StoreError>;
    /// A run's stored totals (its own usage), `None` when it does not exist.
    fn run_totals(&self, tenant: &TenantId, run: &RunId) -> Result<Option<Totals>, StoreError>;
    /// The position the next ledger entry of a run takes.
    fn next_ledger_position(&self, tenant: &TenantId, run: &RunId) -> Result<u64, StoreError>;
    /// Whether a record with this id exists, in any tenant.
    fn record_id_exists(&self, id: &RecordId) -> Result<bool, StoreError>;
    /// A record of `tenant`.
    fn record(&self, tenant: &TenantId, id: &RecordId) -> Result<Option<PreventionRecord>, StoreError>;
    /// A policy's shadow statistics as the key of [`Staged::Shadow`] names them.
    fn shadow_stats(
        &self,
        owner: Option<&TenantId>,
        policy: &PolicyId,
        run_tenant: &TenantId,
    ) -> Result<ShadowStats, StoreError>;
    /// A tenant's usage of a tenant-period budget within the period starting at `period_start` (0 when
    /// none was recorded).
    fn tenant_usage(&self, tenant: &TenantId, policy: &PolicyId, period_start: Timestamp) -> Result<u64, StoreError>;
    /// The sum of `metric` over a tenant's shared rate events after `since` (a backend without shared
    /// rate windows refuses).
    fn tenant_rate_used(&self, tenant: &TenantId, since: Timestamp, metric: RateMetric) -> Result<u64, StoreError>;
    /// Whether an incident exists.
    fn incident_exists(&self, tenant: &TenantId, id: &IncidentId) -> Result<bool, StoreError>;
    /// The (signature hash, error type) a stored pattern groups.
    fn pattern_identity(
        &self,
        tenant: &TenantId,
        id: &PatternId,
    ) -> Result<Option<(SignatureHash, String)>, StoreError>;
    /// The pattern that groups (signature hash, error type).
    fn pattern_for_signature(
        &self,
        tenant: &TenantId,
        signature: &SignatureHash,
        error_type: &str,
    ) -> Result<Option<PatternId>, StoreError>;
    /// Whether a record is regretted.
    fn regret_exists(&self, record: &RecordId) -> Result<bool, StoreError>;
    /// The number the next graduation state of a tenant takes in its history.
    fn next_graduation(&self, tenant: &TenantId) -> Result<u64, StoreError>;
    /// What a run's descendants add to it (zero when nothing was rolled up yet).
    fn run_rollup(&self, tenant: &TenantId, run: &RunId) -> Result<RunRollup, StoreError>;
}

/// A stored run as its fencing condition sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RunHead {
    /// How many entries its ledger holds (the position the next one takes).
    pub(crate) ledger_len: u64,
    /// Whether its status is `running`.
    pub(crate) running: bool,
}

/// One checked write, in the order the batches staged them. A later write of the same row replaces an
/// earlier one (a run rewritten twice in a group).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Staged {
    /// A policy version, which also becomes its current one.
    PolicyVersion(Box<Policy>),
    /// An audit entry at number `n` of its policy.
    Audit {
        /// The policy's owner.
        owner: Option<TenantId>,
        /// Its number.
        n: u64,
        /// The entry.
        entry: AuditEntry,
    },
    /// A snapshot as its canonical bytes.
    Snapshot {
        /// The hash of `canonical`.
        hash: SnapshotHash,
        /// The RFC 8785 bytes.
        canonical: Vec<u8>,
    },
    /// A run was bound to a snapshot for the first time.
    Binding {
        /// The run's tenant.
        tenant: TenantId,
        /// The snapshot.
        snapshot: SnapshotId,
    },
    /// A run; `listed` says whether it must now be listed as live or not, when that changes.
    Run {
        /// The run.
        run: Box<StoredRun>,
        /// The live listing, when it changes.
        listed: Option<bool>,
        /// Whether only its totals and next call moved, as the ledger entry staged with it says
        /// ([`WriteOp::AdvanceRun`]): a backend may leave the stored row as it was.
        advanced: bool,
    },
    /// A ledger entry with its position set.
    Ledger {
        /// The run's tenant.
        tenant: TenantId,
        /// The run.
        run: RunId,
        /// The entry.
        entry: Box<LedgerEntry>,
    },
    /// A sealed record.
    Record(Box<PreventionRecord>),
    /// A policy's shadow statistics after the batch's deltas (the total, not the delta).
    Shadow {
        /// The policy's owner.
        owner: Option<TenantId>,
        /// The tenant whose runs evaluated it.
        run_tenant: TenantId,
        /// The policy.
        policy: PolicyId,
        /// The new total.
        total: ShadowStats,
    },
    /// A tenant's usage of a tenant-period budget after the batch's increments (the total, not the delta).
    TenantUsage {
        /// The tenant.
        tenant: TenantId,
        /// The budget policy.
        policy: PolicyId,
        /// The start of the period.
        period_start: Timestamp,
        /// The new total.
        used: u64,
    },
    /// A call's event in its tenant's shared rate windows, its bounds checked.
    TenantRate(Box<TenantRateEvent>),
    /// A new incident.
    Incident(Box<Incident>),
    /// A pattern, new or updated.
    Pattern(Box<Pattern>),
    /// A regret.
    Regret {
        /// The record's tenant.
        tenant: TenantId,
        /// The regret.
        regret: Regret,
    },
    /// A run's rolled-up part after the batch's increments (the total, not the delta).
    Rollup {
        /// The run's tenant.
        tenant: TenantId,
        /// The run.
        run: RunId,
        /// The new total.
        total: RunRollup,
    },
    /// A tenant's graduation state, `n`-th of its history.
    Graduation {
        /// The tenant.
        tenant: TenantId,
        /// Its place in the history.
        n: u64,
        /// The state.
        state: GraduationState,
    },
}

/// What a successful [`Prepare::run`] answers.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// Every write, in order, with the index of the batch it belongs to.
    pub(crate) writes: Vec<(usize, Staged)>,
    /// One receipt per batch, in order.
    pub(crate) receipts: Vec<CommitReceipt>,
    /// The chain head after the commit (`None` when it was unknown and nothing was appended).
    pub(crate) head: Option<ChainHead>,
    /// What the commit establishes about the runs it writes (by run key), for a writer's cache.
    pub(crate) runs: HashMap<Vec<u8>, CachedRun>,
}

type PolicyKey = (Option<TenantId>, PolicyId);
type RunKey = (TenantId, RunId);

/// Checks and stages callers' batches without writing: every read goes through the view.
pub(crate) struct Prepare<'a> {
    view: &'a dyn ReadView,
    writes: Vec<(usize, Staged)>,
    batch: usize,
    head: Result<ChainHead, StoreError>,
    receipt: CommitReceipt,
    policy_heads: HashMap<PolicyKey, u32>,
    audit_next: HashMap<PolicyKey, u64>,
    ledger_next: HashMap<RunKey, u64>,
    graduation_next: HashMap<TenantId, u64>,
    runs: HashMap<RunKey, SnapshotHash>,
    live: HashMap<RunKey, bool>,
    /// Whether each run the commit fenced or wrote is running (`None`: it does not exist).
    running: HashMap<RunKey, Option<bool>>,
    snapshots: HashSet<SnapshotHash>,
    record_ids: HashMap<RecordId, (TenantId, PolicyId)>,
    shadow: BTreeMap<(Option<TenantId>, PolicyId, TenantId), ShadowStats>,
    tenant_usage: BTreeMap<(TenantId, PolicyId, Timestamp), u64>,
    rate_events: Vec<TenantRateEvent>,
    incidents: HashSet<(TenantId, IncidentId)>,
    patterns: HashMap<(TenantId, PatternId), (SignatureHash, String)>,
    pattern_sigs: HashMap<(TenantId, SignatureHash, String), PatternId>,
    regrets: HashSet<RecordId>,
    rollups: HashMap<RunKey, RunRollup>,
    /// The totals of the runs this commit wrote, as it leaves them.
    run_totals: HashMap<RunKey, Totals>,
}

impl<'a> Prepare<'a> {
    /// A preparation on top of `view`, appending records after `head`.
    pub(crate) fn new(view: &'a dyn ReadView, head: Result<ChainHead, StoreError>) -> Self {
        Self {
            view,
            writes: Vec::new(),
            batch: 0,
            head,
            receipt: CommitReceipt::default(),
            policy_heads: HashMap::new(),
            audit_next: HashMap::new(),
            ledger_next: HashMap::new(),
            graduation_next: HashMap::new(),
            runs: HashMap::new(),
            live: HashMap::new(),
            running: HashMap::new(),
            snapshots: HashSet::new(),
            record_ids: HashMap::new(),
            shadow: BTreeMap::new(),
            tenant_usage: BTreeMap::new(),
            rate_events: Vec::new(),
            incidents: HashSet::new(),
            patterns: HashMap::new(),
            pattern_sigs: HashMap::new(),
            regrets: HashSet::new(),
            rollups: HashMap::new(),
            run_totals: HashMap::new(),
        }
    }

    /// Stages `batches` in order, each checked against what the earlier ones leave; the first refused one
    /// is answered with its index.
    pub(crate) fn run(mut self, batches: &[&WriteBatch]) -> Result<Prepared, (usize, StoreError)> {
        let mut receipts = Vec::with_capacity(batches.len());
        for (which, batch) in batches.iter().enumerate() {
            self.batch = which;
            self.stage(batch).map_err(|err| (which, err))?;
            receipts.push(std::mem::take(&mut self.receipt));
        }
        let mut runs: HashMap<Vec<u8>, CachedRun> = HashMap::new();
        for ((tenant, run), hash) in self.runs {
            runs.entry(keys::run(&tenant, &run)).or_default().snapshot = Some(hash);
        }
        for ((tenant, run), next) in self.ledger_next {
            runs.entry(keys::run(&tenant, &run)).or_default().next_position = Some(next);
        }
        for ((tenant, run), live) in self.live {
            runs.entry(keys::run(&tenant, &run)).or_default().live = Some(live);
        }
        Ok(Prepared { writes: self.writes, receipts, head: self.head.ok(), runs })
    }

    fn write(&mut self, staged: Staged) {
        self.writes.push((self.batch, staged));
    }

    fn stage(&mut self, batch: &WriteBatch) -> Result<(), StoreError> {
        // Snapshots and run bindings first, so that a run, its ledger and its records may share a batch in
        // any order.
        for (i, op) in batch.ops().iter().enumerate() {
            let bound = match op {
                WriteOp::PutSnapshot(snapshot) => self.put_snapshot(snapshot),
                WriteOp::PutRun(run) | WriteOp::AdvanceRun(run) => self.bind_run(run),
                _ => Ok(()),
            };
            bound.map_err(|err| err.context(format!("write {i} of the batch")))?;
        }
        for (i, op) in batch.ops().iter().enumerate() {
            self.apply(op).map_err(|err| err.context(format!("write {i} of the batch")))?;
        }
        self.check_advances()?;
        self.receipt.ops = batch.len();
        Ok(())
    }

    fn apply(&mut self, op: &WriteOp) -> Result<(), StoreError> {
        match op {
            WriteOp::PutPolicyVersion(policy) => self.put_policy(policy),
            WriteOp::AppendAudit { tenant, entry } => self.append_audit(tenant.as_ref(), entry),
            WriteOp::PutSnapshot(_) => Ok(()),
            WriteOp::PutRun(run) => self.put_run(run, false),
            WriteOp::AdvanceRun(run) => self.advance_run(run),
            WriteOp::FenceRun { tenant_id, run_id, ledger_len } => self.fence_run(tenant_id, run_id, *ledger_len),
            WriteOp::AppendLedger { tenant_id, run_id, entry } => self.append_ledger(tenant_id, run_id, entry),
            WriteOp::AppendRecord(append) => self.append_record(append),
            WriteOp::AddShadowStats { tenant, run_tenant, policy_id, delta } => {
                self.add_shadow(tenant.as_ref(), run_tenant, policy_id, *delta)
            }
            WriteOp::AddTenantUsage { tenant, policy_id, period_start, delta, at_most } => {
                self.add_tenant_usage(tenant, policy_id, *period_start, *delta, *at_most)
            }
            WriteOp::AddTenantRateEvent(event) => self.add_tenant_rate_event(event),
            WriteOp::PutIncident(incident) => self.put_incident(incident),
            WriteOp::PutPattern(pattern) => self.put_pattern(pattern),
            WriteOp::PutRegret { tenant_id, regret } => self.put_regret(tenant_id, regret),
            WriteOp::SetGraduation { tenant_id, state } => self.set_graduation(tenant_id, state),
            WriteOp::RollUp { tenant_id, runs, delta } => self.roll_up(tenant_id, runs, *delta),
            WriteOp::CheckRolledUp { tenant_id, run_id, metric, at_most } => {
                self.check_rolled_up(tenant_id, run_id, *metric, *at_most)
            }
        }
    }

    fn current_head(&self, owner: Option<&TenantId>, id: &PolicyId) -> Result<Option<u32>, StoreError> {
        match self.policy_heads.get(&(owner.cloned(), id.clone())) {
            Some(v) => Ok(Some(*v)),
            None => self.view.policy_head(owner, id),
        }
    }

    fn put_policy(&mut self, policy: &Policy) -> Result<(), StoreError> {
        let global = policy.scope == Scope::Global;
        if global != policy.tenant_id.is_none() {
            return Err(StoreError::contract(format!(
                "policy `{}` must have a tenant exactly when its scope is `tenant`",
                policy.id
            )));
        }
        let owner = policy.tenant_id.as_ref();
        let current = self.current_head(owner, &policy.id)?;
        if current.is_none() {
            self.check_policy_id_free(policy)?;
        }
        let expected = current.map_or(1, |v| v.saturating_add(1));
        if policy.version != expected {
            return Err(StoreError::conflict(match current {
                Some(v) => {
                    format!("policy `{}` is at version {v}; version {} cannot follow it", policy.id, policy.version)
                }
                None => format!(
                    "policy `{}` does not exist; its first version must be 1, not {}",
                    policy.id, policy.version
                ),
            }));
        }
        self.policy_heads.insert((owner.cloned(), policy.id.clone()), policy.version);
        self.write(Staged::PolicyVersion(Box::new(policy.clone())));
        Ok(())
    }

    /// A new policy's id must name one policy in every tenant's view (`docs/learning-loop.md`, policy
    /// ids): a tenant policy may not
    /// take a global policy's id, nor a global policy any tenant's. Checked here, under the writer lock
    /// or inside the write transaction, so that two racing creations cannot both pass the node's earlier
    /// check.
    fn check_policy_id_free(&self, policy: &Policy) -> Result<(), StoreError> {
        let taken = match &policy.tenant_id {
            Some(_) => self.current_head(None, &policy.id)?.is_some(),
            None => {
                self.policy_heads.keys().any(|(owner, id)| owner.is_some() && id == &policy.id)
                    || self.view.tenant_policy_id_exists(&policy.id)?
            }
        };
        if taken {
            return Err(StoreError::conflict(format!(
                "policy id `{}` is taken: one id names one policy wherever a tenant sees it",
                policy.id
            )));
        }
        Ok(())
    }

    fn append_audit(&mut self, owner: Option<&TenantId>, entry: &AuditEntry) -> Result<(), StoreError> {
        if self.current_head(owner, &entry.policy_id)?.is_none() {
            return Err(StoreError::not_found(format!("policy `{}` to audit does not exist", entry.policy_id)));
        }
        let key = (owner.cloned(), entry.policy_id.clone());
        let n = match self.audit_next.get(&key) {
            Some(n) => *n,
            None => self.view.next_audit(owner, &entry.policy_id)?,
        };
        self.audit_next.insert(key, n.saturating_add(1));
        self.write(Staged::Audit { owner: owner.cloned(), n, entry: entry.clone() });
        Ok(())
    }

    fn put_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let canonical = canonical_json(snapshot).map_err(|err| StoreError::contract(err.to_string()))?;
        let hash = SnapshotHash::from_bytes(&domain_hash(SNAPSHOT_DOMAIN, &canonical));
        self.snapshots.insert(hash.clone());
        self.write(Staged::Snapshot { hash, canonical });
        Ok(())
    }

    fn snapshot_exists(&self, hash: &SnapshotHash) -> Result<bool, StoreError> {
        if self.snapshots.contains(hash) {
            return Ok(true);
        }
        self.view.snapshot_exists(hash)
    }

    /// First pass over runs: the binding to a snapshot is immutable and the snapshot must exist.
    fn bind_run(&mut self, run: &StoredRun) -> Result<(), StoreError> {
        if run.snapshot.id != SnapshotId::for_hash(&run.snapshot.hash) {
            return Err(StoreError::contract(format!(
                "run `{}` names a snapshot id that is not its hash's",
                run.run_id
            )));
        }
        let bound = self.run_binding(&run.tenant_id, &run.run_id)?;
        if let Some(bound) = &bound
            && *bound != run.snapshot.hash
        {
            return Err(StoreError::conflict(format!(
                "run `{}` is bound to snapshot `{bound}` and cannot be rebound",
                run.run_id
            )));
        }
        // A run already bound to this snapshot was checked when it was bound; snapshots are never deleted.
        if bound.is_none() && !self.snapshot_exists(&run.snapshot.hash)? {
            return Err(StoreError::not_found(format!(
                "snapshot `{}` of run `{}` is not stored",
                run.snapshot.hash, run.run_id
            )));
        }
        if bound.is_none() {
            self.write(Staged::Binding { tenant: run.tenant_id.clone(), snapshot: run.snapshot.id.clone() });
        }
        self.runs.insert((run.tenant_id.clone(), run.run_id.clone()), run.snapshot.hash.clone());
        Ok(())
    }

    /// The snapshot a run is bound to: from this batch or the store.
    fn run_binding(&self, tenant: &TenantId, run: &RunId) -> Result<Option<SnapshotHash>, StoreError> {
        if let Some(hash) = self.runs.get(&(tenant.clone(), run.clone())) {
            return Ok(Some(hash.clone()));
        }
        self.view.run_binding(tenant, run)
    }

    fn advance_run(&mut self, run: &StoredRun) -> Result<(), StoreError> {
        if run.status != RunStatus::Running {
            return Err(StoreError::contract(format!(
                "run `{}` is advanced but not running: a run whose status changes is written whole",
                run.run_id
            )));
        }
        self.put_run(run, true)
    }

    /// Every run the current batch advanced has its step's ledger entry in the batch, and leaves the
    /// totals and next call that entry says: reading the stored row plus the entry gives back the run.
    fn check_advances(&self) -> Result<(), StoreError> {
        let staged = || self.writes.iter().filter(|(b, _)| *b == self.batch).map(|(_, w)| w);
        for advanced in staged() {
            let Staged::Run { run, advanced: true, .. } = advanced else { continue };
            let entry = staged().rev().find_map(|w| match w {
                Staged::Ledger { tenant, run: id, entry } if *tenant == run.tenant_id && *id == run.run_id => {
                    Some(entry)
                }
                _ => None,
            });
            let Some(entry) = entry else {
                return Err(StoreError::contract(format!(
                    "run `{}` is advanced without its step's ledger entry in the same batch",
                    run.run_id
                )));
            };
            if entry.totals_after != run.totals || entry.next_call() != Some(run.next) {
                return Err(StoreError::contract(format!(
                    "run `{}` is advanced to totals and a next call its ledger entry does not leave",
                    run.run_id
                )));
            }
        }
        Ok(())
    }

    fn put_run(&mut self, run: &StoredRun, advanced: bool) -> Result<(), StoreError> {
        let key = (run.tenant_id.clone(), run.run_id.clone());
        let live = run.status == RunStatus::Running;
        let listed = self.live.get(&key).copied().or_else(|| self.view.run_listed_live(&run.tenant_id, &run.run_id));
        // Every step rewrites its run; its live listing changes only when it stops running.
        let change = (listed != Some(live)).then_some(live);
        if change.is_some() {
            self.live.insert(key.clone(), live);
        }
        self.running.insert(key.clone(), Some(live));
        self.run_totals.insert(key, run.totals);
        self.write(Staged::Run { run: Box::new(run.clone()), listed: change, advanced });
        Ok(())
    }

    /// The fencing condition (`docs/store.md`, "Fencing"): the run as this commit leaves it so far — the
    /// store's state after every earlier commit, plus the earlier writes of this group — must be the run
    /// the writer read. One comparison against what the append and the upsert read anyway.
    fn fence_run(&mut self, tenant: &TenantId, run: &RunId, expected: u64) -> Result<(), StoreError> {
        let key = (tenant.clone(), run.clone());
        let (len, running) = match (self.ledger_next.get(&key), self.running.get(&key)) {
            (Some(len), Some(running)) => (*len, *running),
            (len, running) => {
                let head = self.view.run_head(tenant, run)?;
                let len = len.copied().unwrap_or_else(|| head.map_or(0, |h| h.ledger_len));
                let running = running.copied().unwrap_or_else(|| head.map(|h| h.running));
                self.ledger_next.insert(key.clone(), len);
                self.running.insert(key, running);
                (len, running)
            }
        };
        let holds = len == expected && (running == Some(true) || (running.is_none() && expected == 0));
        if holds {
            return Ok(());
        }
        Err(StoreError::fenced(match running {
            None => format!("run `{run}` does not exist; the writer expected {expected} ledger entries"),
            Some(running) => format!(
                "run `{run}` holds {len} ledger entries and is {}; the writer expected {expected} and running",
                if running { "running" } else { "not running" }
            ),
        }))
    }

    fn append_ledger(&mut self, tenant: &TenantId, run: &RunId, entry: &LedgerEntry) -> Result<(), StoreError> {
        if self.run_binding(tenant, run)?.is_none() {
            return Err(StoreError::not_found(format!("run `{run}` of the ledger entry does not exist")));
        }
        let key = (tenant.clone(), run.clone());
        let position = match self.ledger_next.get(&key) {
            Some(next) => *next,
            None => self.view.next_ledger_position(tenant, run)?,
        };
        self.ledger_next.insert(key, position.saturating_add(1));
        let mut entry = entry.clone();
        entry.position = position;
        self.write(Staged::Ledger { tenant: tenant.clone(), run: run.clone(), entry: Box::new(entry) });
        self.receipt.ledger_positions.push(position);
        Ok(())
    }

    fn append_record(&mut self, append: &RecordAppend) -> Result<(), StoreError> {
        let record = &append.record;
        match &append.authority {
            RecordAuthority::Live { decision, policy, run_tenant } => {
                if record.is_simulated {
                    return Err(StoreError::contract(format!(
                        "record `{}` is simulated but appended as live",
                        record.id
                    )));
                }
                check_record_against_decision(record, decision, policy, run_tenant)
                    .map_err(|breach| StoreError::contract(format!("record `{}`: {breach}", record.id)))?;
                match self.run_binding(run_tenant, &record.run_id)? {
                    None => {
                        return Err(StoreError::contract(format!(
                            "record `{}` names run `{}`, which does not exist in its tenant",
                            record.id, record.run_id
                        )));
                    }
                    Some(hash) if hash != record.snapshot_hash => {
                        return Err(StoreError::contract(format!(
                            "record `{}` names snapshot `{}`, but its run is bound to `{hash}`",
                            record.id, record.snapshot_hash
                        )));
                    }
                    Some(_) => {}
                }
            }
            RecordAuthority::Ancestor { decision, policy, run_tenant, ancestor } => {
                if record.is_simulated {
                    return Err(StoreError::contract(format!(
                        "record `{}` is simulated but appended as live",
                        record.id
                    )));
                }
                // The decision answered the descendant on its own snapshot; the record pins the ancestor's.
                let mut as_decided = Decision::clone(decision);
                as_decided.snapshot_hash = record.snapshot_hash.clone();
                check_record_against_decision(record, &as_decided, policy, run_tenant)
                    .map_err(|breach| StoreError::contract(format!("record `{}`: {breach}", record.id)))?;
                if self.run_binding(run_tenant, &record.run_id)?.is_none() {
                    return Err(StoreError::contract(format!(
                        "record `{}` names run `{}`, which does not exist in its tenant",
                        record.id, record.run_id
                    )));
                }
                match self.run_binding(run_tenant, ancestor)? {
                    Some(hash) if hash == record.snapshot_hash => {}
                    _ => {
                        return Err(StoreError::contract(format!(
                            "record `{}` names snapshot `{}`, which ancestor `{ancestor}` is not bound to",
                            record.id, record.snapshot_hash
                        )));
                    }
                }
            }
            RecordAuthority::Simulated => {
                if !record.is_simulated {
                    return Err(StoreError::contract(format!(
                        "record `{}` is appended as simulated but is not flagged",
                        record.id
                    )));
                }
            }
        }
        if self.record_ids.contains_key(&record.id) || self.view.record_id_exists(&record.id)? {
            return Err(StoreError::conflict(format!("record `{}` already exists", record.id)));
        }
        let head = self.head.clone()?;
        let seq = head.seq.checked_add(1).ok_or_else(|| StoreError::contract("the record sequence is exhausted"))?;
        let sealed = record
            .clone()
            .seal(seq, head.hash)
            .map_err(|err| StoreError::contract(format!("cannot seal record `{}`: {err}", record.id)))?;
        self.head = Ok(ChainHead { seq, hash: sealed.hash.clone() });
        self.record_ids.insert(sealed.id.clone(), (sealed.tenant_id.clone(), sealed.policy_id.clone()));
        self.write(Staged::Record(Box::new(sealed.clone())));
        self.receipt.records.push(sealed);
        Ok(())
    }

    fn add_shadow(
        &mut self,
        owner: Option<&TenantId>,
        run_tenant: &TenantId,
        policy: &PolicyId,
        delta: ShadowStats,
    ) -> Result<(), StoreError> {
        if owner.is_some_and(|owner| owner != run_tenant) {
            return Err(StoreError::contract(format!(
                "shadow statistics of tenant policy `{policy}` from another tenant's run"
            )));
        }
        let key = (owner.cloned(), policy.clone(), run_tenant.clone());
        let current = match self.shadow.get(&key) {
            Some(stats) => *stats,
            None => self.view.shadow_stats(owner, policy, run_tenant)?,
        };
        let total = current.plus(delta);
        self.shadow.insert(key, total);
        self.write(Staged::Shadow {
            owner: owner.cloned(),
            run_tenant: run_tenant.clone(),
            policy: policy.clone(),
            total,
        });
        Ok(())
    }

    /// The conditional increment is checked here, against the total the view reads inside the backend's
    /// write transaction (serialised with every other writer of the store, on PostgreSQL by the chain
    /// head lock), so that a bound holds across every node sharing the store.
    fn add_tenant_usage(
        &mut self,
        tenant: &TenantId,
        policy: &PolicyId,
        period_start: Timestamp,
        delta: u64,
        at_most: Option<u64>,
    ) -> Result<(), StoreError> {
        let key = (tenant.clone(), policy.clone(), period_start);
        let current = match self.tenant_usage.get(&key) {
            Some(used) => *used,
            None => self.view.tenant_usage(tenant, policy, period_start)?,
        };
        let used = current.saturating_add(delta);
        if let Some(bound) = at_most
            && used > bound
        {
            return Err(StoreError::tenant_limit(format!(
                "tenant `{tenant}` has used {current} of policy `{policy}` this period; adding {delta} would exceed {bound}"
            )));
        }
        self.tenant_usage.insert(key, used);
        self.write(Staged::TenantUsage { tenant: tenant.clone(), policy: policy.clone(), period_start, used });
        Ok(())
    }

    /// Checked like a tenant total: against the events the view reads inside the write transaction (on
    /// PostgreSQL serialised with every node's commits), plus the ones this preparation staged.
    fn add_tenant_rate_event(&mut self, event: &TenantRateEvent) -> Result<(), StoreError> {
        for bound in &event.bounds {
            let staged: u64 = self
                .rate_events
                .iter()
                .filter(|e| e.tenant == event.tenant && e.event.at > bound.since)
                .map(|e| match bound.metric {
                    RateMetric::Steps => e.event.steps,
                    RateMetric::Tokens => e.event.tokens,
                    RateMetric::CostMicros => e.event.cost_micros,
                })
                .fold(0u64, u64::saturating_add);
            let used = self.view.tenant_rate_used(&event.tenant, bound.since, bound.metric)?.saturating_add(staged);
            if used.saturating_add(bound.request) > bound.max {
                return Err(StoreError::tenant_limit(format!(
                    "tenant `{}` used {used} {} in its window; {} more would exceed {}",
                    event.tenant,
                    bound.metric.as_str(),
                    bound.request,
                    bound.max
                )));
            }
        }
        self.rate_events.push(event.clone());
        self.write(Staged::TenantRate(Box::new(event.clone())));
        Ok(())
    }

    fn put_incident(&mut self, incident: &Incident) -> Result<(), StoreError> {
        let key = (incident.tenant_id.clone(), incident.id.clone());
        if self.incidents.contains(&key) || self.view.incident_exists(&incident.tenant_id, &incident.id)? {
            return Err(StoreError::conflict(format!("incident `{}` already exists", incident.id)));
        }
        self.incidents.insert(key);
        self.write(Staged::Incident(Box::new(incident.clone())));
        Ok(())
    }

    fn put_pattern(&mut self, pattern: &Pattern) -> Result<(), StoreError> {
        let key = (pattern.tenant_id.clone(), pattern.id.clone());
        let existing = match self.patterns.get(&key) {
            Some(found) => Some(found.clone()),
            None => self.view.pattern_identity(&pattern.tenant_id, &pattern.id)?,
        };
        if let Some((signature, error_type)) = existing
            && (signature != pattern.signature_hash || error_type != pattern.error_type)
        {
            return Err(StoreError::contract(format!(
                "pattern `{}` cannot change its signature hash or error type",
                pattern.id
            )));
        }
        let sig_key = (pattern.tenant_id.clone(), pattern.signature_hash.clone(), pattern.error_type.clone());
        let owner = match self.pattern_sigs.get(&sig_key) {
            Some(id) => Some(id.clone()),
            None => {
                self.view.pattern_for_signature(&pattern.tenant_id, &pattern.signature_hash, &pattern.error_type)?
            }
        };
        if let Some(owner) = owner
            && owner != pattern.id
        {
            return Err(StoreError::conflict(format!(
                "pattern `{owner}` already groups this signature and error type"
            )));
        }
        self.patterns.insert(key, (pattern.signature_hash.clone(), pattern.error_type.clone()));
        self.pattern_sigs.insert(sig_key, pattern.id.clone());
        self.write(Staged::Pattern(Box::new(pattern.clone())));
        Ok(())
    }

    fn put_regret(&mut self, tenant: &TenantId, regret: &Regret) -> Result<(), StoreError> {
        let target = match self.record_ids.get(&regret.record_id) {
            Some(found) => Some(found.clone()),
            None => match self.view.record(tenant, &regret.record_id)? {
                // A simulation's record prevented nothing and never changes a live policy.
                Some(record) if record.is_simulated => {
                    return Err(StoreError::contract(format!(
                        "record `{}` is simulated and cannot be regretted",
                        regret.record_id
                    )));
                }
                found => found.map(|r| (r.tenant_id, r.policy_id)),
            },
        };
        match target {
            Some((record_tenant, policy)) if &record_tenant == tenant && policy == regret.policy_id => {}
            Some(_) => {
                return Err(StoreError::contract(format!(
                    "regret names record `{}` with another tenant or policy",
                    regret.record_id
                )));
            }
            None => return Err(StoreError::not_found(format!("record `{}` does not exist", regret.record_id))),
        }
        if self.regrets.contains(&regret.record_id) || self.view.regret_exists(&regret.record_id)? {
            return Err(StoreError::conflict(format!("record `{}` is already regretted", regret.record_id)));
        }
        self.regrets.insert(regret.record_id.clone());
        self.write(Staged::Regret { tenant: tenant.clone(), regret: regret.clone() });
        Ok(())
    }

    /// The one rule for rolled-up totals on every backend: each increment is added to what the store
    /// holds (inside the write transaction or under the writer lock) plus what earlier writes of the
    /// group staged, and lands in the same commit as the descendant's ledger entry: a crash keeps both or
    /// neither, and two descendants' increments both count.
    fn roll_up(&mut self, tenant: &TenantId, runs: &[RunId], delta: RunRollup) -> Result<(), StoreError> {
        for run in runs {
            if self.run_binding(tenant, run)?.is_none() {
                return Err(StoreError::not_found(format!("run `{run}` to roll up into does not exist")));
            }
            let key = (tenant.clone(), run.clone());
            let current = match self.rollups.get(&key) {
                Some(rollup) => *rollup,
                None => self.view.run_rollup(tenant, run)?,
            };
            let total = current.plus(delta);
            self.rollups.insert(key, total);
            self.write(Staged::Rollup { tenant: tenant.clone(), run: run.clone(), total });
        }
        Ok(())
    }

    fn check_rolled_up(
        &mut self,
        tenant: &TenantId,
        run: &RunId,
        metric: BudgetMetric,
        at_most: u64,
    ) -> Result<(), StoreError> {
        let key = (tenant.clone(), run.clone());
        // A call bounds several budgets of one run: its totals and rollup are read once per commit.
        let own = match self.run_totals.get(&key) {
            Some(totals) => *totals,
            None => {
                let totals = self
                    .view
                    .run_totals(tenant, run)?
                    .ok_or_else(|| StoreError::not_found(format!("run `{run}` to bound does not exist")))?;
                *self.run_totals.entry(key.clone()).or_insert(totals)
            }
        };
        let descendants = match self.rollups.get(&key) {
            Some(rollup) => rollup.descendants,
            None => {
                let rollup = self.view.run_rollup(tenant, run)?;
                self.rollups.entry(key).or_insert(rollup).descendants
            }
        };
        let value = own.get(metric).saturating_add(descendants.get(metric));
        if value <= at_most {
            return Ok(());
        }
        Err(StoreError::rolled_up_limit(format!(
            "run `{run}`'s rolled-up {metric:?} would be {value}, past the {at_most} the decision was made within"
        )))
    }

    fn set_graduation(&mut self, tenant: &TenantId, state: &GraduationState) -> Result<(), StoreError> {
        let n = match self.graduation_next.get(tenant) {
            Some(n) => *n,
            None => self.view.next_graduation(tenant)?,
        };
        self.graduation_next.insert(tenant.clone(), n.saturating_add(1));
        self.write(Staged::Graduation { tenant: tenant.clone(), n, state: state.clone() });
        Ok(())
    }
}
