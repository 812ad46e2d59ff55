//! Group commit: checking callers' batches (`Prepare`), one transaction, flush and fsync, and undo after
//! a flush that failed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use runguard_contract::canonical::{SNAPSHOT_DOMAIN, canonical_json, domain_hash};
use runguard_contract::prevention::check_record_against_decision;
use runguard_contract::{
    AuditEntry, Incident, Pattern, PatternId, Policy, PolicyId, PreventionRecord, RecordId, Regret, RunId, RunStatus,
    Scope, SignatureHash, Snapshot, SnapshotHash, SnapshotId, TenantId,
};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{Transactional, Tree};

use super::reads::{snapshot_id_digest, tenant_heads_hold};
use super::{ChainHead, Engine, Failure, META_COMMITS, Store, T, TREE_NAMES, Undo, WriterState};
use crate::batch::{CommitReceipt, RecordAppend, RecordAuthority, WriteBatch, WriteOp};
use crate::codec::{self, Stored};
use crate::error::{StoreError, StoreErrorKind};
use crate::keys;
use crate::model::{GraduationState, LedgerEntry, ShadowStats, StoredRun};
use crate::run_cache::{CachedRun, RunCache};

impl Engine {
    /// Writes back the values a failed commit replaced, in one transaction.
    pub(super) fn undo(&self, undo: &Undo) -> Result<(), StoreError> {
        if undo.is_empty() {
            return Ok(());
        }
        let refs: Vec<&Tree> = undo.iter().map(|(t, _)| &self.trees[*t]).collect();
        refs.as_slice()
            .transaction(|views: &Vec<TransactionalTree>| {
                for (view, (_, writes)) in views.iter().zip(undo) {
                    for (key, old) in writes {
                        match old {
                            Some(value) => view.insert(key.as_slice(), value.clone())?,
                            None => view.remove(key.as_slice())?,
                        };
                    }
                }
                Ok(())
            })
            .map_err(|err: TransactionError<StoreError>| match err {
                TransactionError::Abort(err) => err,
                TransactionError::Storage(err) => err.into(),
            })
    }
}

type TxError = ConflictableTransactionError<StoreError>;

/// What one caller's batch of a group commit got.
type Outcome = Result<CommitReceipt, StoreError>;

impl Store {
    /// Makes every write of `batch` durable together: checks them, assigns record sequence numbers and
    /// ledger positions, applies everything in one multi-tree transaction, then flushes and fsyncs. On any
    /// error nothing of the batch is written.
    pub fn commit(&self, batch: WriteBatch) -> Result<CommitReceipt, StoreError> {
        if batch.is_empty() {
            return Ok(CommitReceipt::default());
        }
        self.commit_group(vec![batch]).pop().unwrap_or_else(|| Ok(CommitReceipt::default()))
    }

    /// Group commit: several callers' batches in one transaction, one flush and one fsync, failing only
    /// the callers whose own writes are refused. Each batch is checked against the state the earlier ones
    /// leave; a refused one is dropped and the others are checked again without it. A store that cannot
    /// write fails every caller with the same (I/O) error. Answers one result per batch, in order; an
    /// empty group touches nothing (see `docs/store.md`, "Group commit").
    pub fn commit_group(&self, batches: Vec<WriteBatch>) -> Vec<Result<CommitReceipt, StoreError>> {
        if batches.is_empty() {
            // Not even the writer lock: an attempt that writes nothing must not report the store healthy.
            return Vec::new();
        }
        let mut outcomes: Vec<Option<Outcome>> = batches.iter().map(|_| None).collect();
        let writes_policies =
            batches.iter().any(|b| b.ops().iter().any(|op| matches!(op, WriteOp::PutPolicyVersion(_))));
        let mut writer = self.writer();
        let result = self.commit_locked(&mut writer, &batches, &mut outcomes);
        drop(writer);
        if writes_policies {
            self.policy_generation.fetch_add(1, Ordering::AcqRel);
        }
        outcomes
            .into_iter()
            .map(|outcome| match (outcome, &result) {
                (Some(outcome), _) => outcome,
                (None, Err(err)) => Err(err.clone()),
                (None, Ok(())) => Ok(CommitReceipt::default()),
            })
            .collect()
    }

    /// Fills `outcomes` for refused batches and, on success, for committed ones; an `Err` answers every
    /// batch left without an outcome.
    pub(super) fn commit_locked(
        &self,
        writer: &mut WriterState,
        batches: &[WriteBatch],
        outcomes: &mut [Option<Outcome>],
    ) -> Result<(), StoreError> {
        let delay = self.commit_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        let attempt = self.attempt_locked(writer, batches, outcomes);
        match &attempt {
            Ok(()) => self.healthy.store(true, Ordering::SeqCst),
            Err(err) if matches!(err.kind(), StoreErrorKind::Io | StoreErrorKind::Injected) => {
                self.healthy.store(false, Ordering::SeqCst);
            }
            Err(_) => {}
        }
        attempt
    }

    pub(super) fn attempt_locked(
        &self,
        writer: &mut WriterState,
        batches: &[WriteBatch],
        outcomes: &mut [Option<Outcome>],
    ) -> Result<(), StoreError> {
        let engine = self.recover_locked(writer)?;
        let prepared = loop {
            let included: Vec<usize> = (0..batches.len()).filter(|i| outcomes[*i].is_none()).collect();
            if included.is_empty() {
                return Ok(());
            }
            let chosen: Vec<&WriteBatch> = included.iter().map(|i| &batches[*i]).collect();
            match Prepare::new(self, &writer.runs, writer.head.clone(), writer.commits).run(&chosen) {
                Ok(prepared) => break (included, prepared),
                // A read that fails is the store's failure, not the caller's: everyone gets it. Anything else
                // (a refusal, or damage to what this caller touches) fails only this caller.
                Err((_, err)) if err.kind() == StoreErrorKind::Io => return Err(err),
                Err((which, err)) => outcomes[included[which]] = Some(Err(err)),
            }
        };
        let (included, prepared) = prepared;
        let fail = self.inject_failure.load(Ordering::SeqCst);
        if fail && prepared.writes.is_empty() {
            return Err(StoreError::new(StoreErrorKind::Injected, "commit failure injected by a test"));
        }
        let refs: Vec<&Tree> = prepared.writes.iter().filter_map(|(t, _)| engine.trees.get(*t)).collect();
        debug_assert_eq!(refs.len(), prepared.writes.len(), "every written tree exists");
        let outcome = refs.as_slice().transaction(|views: &Vec<TransactionalTree>| {
            let mut undo: Undo = Vec::with_capacity(views.len());
            for (view, (t, writes)) in views.iter().zip(&prepared.writes) {
                let mut old = Vec::with_capacity(writes.len());
                for (key, value) in writes {
                    let previous = match value {
                        Some(value) => view.insert(key.as_slice(), value.as_slice())?,
                        None => view.remove(key.as_slice())?,
                    };
                    old.push((key.clone(), previous));
                }
                undo.push((*t, old));
                if fail {
                    return Err(TxError::Abort(StoreError::new(
                        StoreErrorKind::Injected,
                        "commit failure injected by a test",
                    )));
                }
            }
            Ok(undo)
        });
        let undo = match outcome {
            Ok(undo) => undo,
            Err(TransactionError::Abort(err)) => return Err(err),
            Err(TransactionError::Storage(err)) => {
                // sled may keep the error for the life of this database: reopen before the next write.
                let err = StoreError::from(err);
                self.fail_locked(writer, Vec::new());
                return Err(err);
            }
        };
        if let Err(err) = self.durable(&engine) {
            // The transaction is applied in memory but not durable: it is refused, so it must vanish.
            self.fail_locked(writer, undo);
            return Err(err);
        }
        writer.commits = prepared.commits;
        if let Some(head) = prepared.head {
            writer.head = Ok(head);
        }
        for (key, learned) in prepared.runs {
            writer.runs.learn(key, learned);
        }
        for (i, receipt) in included.into_iter().zip(prepared.receipts) {
            outcomes[i] = Some(Ok(receipt));
        }
        Ok(())
    }

    pub(super) fn fail_locked(&self, writer: &mut WriterState, undo: Undo) {
        writer.failure = Some(Failure { undo });
        // What the cache learned may include the refused commit; the store is read again once recovered.
        writer.runs = RunCache::default();
        *self.engine.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

/// The index entries of a record.
pub(super) fn record_index_keys(r: &PreventionRecord) -> [(T, Vec<u8>); 4] {
    let sim = r.is_simulated;
    let mut by_tenant = keys::records_of_tenant(&r.tenant_id, sim);
    by_tenant.extend(keys::Key::new().time(r.prevented_at).u64(r.seq).into_vec());
    let mut by_policy = keys::records_of_policy(&r.tenant_id, sim, &r.policy_id);
    by_policy.extend(keys::Key::new().time(r.prevented_at).u64(r.seq).into_vec());
    let mut by_run = keys::records_of_run(&r.tenant_id, sim, &r.run_id);
    by_run.extend(keys::record(r.seq));
    [
        (T::RecById, keys::record_by_id(&r.id, r.seq)),
        (T::RecByTenant, by_tenant),
        (T::RecByPolicy, by_policy),
        (T::RecByRun, by_run),
    ]
}

/// The staged writes of one tree: each key's last value (`None`: removed).
type TreeWrites = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Checks and stages callers' batches without writing: every read happens here, under the writer lock.
struct Prepare<'a> {
    store: &'a Store,
    cache: &'a RunCache,
    writes: Vec<Option<TreeWrites>>,
    head: Result<ChainHead, StoreError>,
    commits: u64,
    receipt: CommitReceipt,
    policy_heads: HashMap<Vec<u8>, u32>,
    audit_next: HashMap<Vec<u8>, u64>,
    ledger_next: HashMap<Vec<u8>, u64>,
    graduation_next: HashMap<Vec<u8>, u64>,
    runs: HashMap<Vec<u8>, SnapshotHash>,
    live: HashMap<Vec<u8>, bool>,
    snapshots: HashSet<SnapshotHash>,
    record_ids: HashMap<RecordId, (TenantId, PolicyId)>,
    shadow: BTreeMap<Vec<u8>, ShadowStats>,
    incidents: HashSet<Vec<u8>>,
    patterns: HashMap<Vec<u8>, (SignatureHash, String)>,
    pattern_sigs: HashMap<Vec<u8>, PatternId>,
    regrets: HashSet<RecordId>,
}

struct Prepared {
    /// The writes of each tree the commit touches, by tree index; untouched trees are left out of the
    /// transaction (sled's transaction costs something per tree it spans).
    writes: Vec<(usize, TreeWrites)>,
    /// One receipt per batch, in order.
    receipts: Vec<CommitReceipt>,
    /// The chain head after the commit.
    head: Option<ChainHead>,
    /// The commit counter after the commit.
    commits: u64,
    /// What the commit establishes about the runs it writes, for the writer's cache once it succeeded.
    runs: HashMap<Vec<u8>, CachedRun>,
}

impl<'a> Prepare<'a> {
    fn new(store: &'a Store, cache: &'a RunCache, head: Result<ChainHead, StoreError>, commits: u64) -> Self {
        Self {
            store,
            cache,
            writes: TREE_NAMES.iter().map(|_| None).collect(),
            head,
            commits,
            receipt: CommitReceipt::default(),
            policy_heads: HashMap::new(),
            audit_next: HashMap::new(),
            ledger_next: HashMap::new(),
            graduation_next: HashMap::new(),
            runs: HashMap::new(),
            live: HashMap::new(),
            snapshots: HashSet::new(),
            record_ids: HashMap::new(),
            shadow: BTreeMap::new(),
            incidents: HashSet::new(),
            patterns: HashMap::new(),
            pattern_sigs: HashMap::new(),
            regrets: HashSet::new(),
        }
    }

    fn put(&mut self, t: T, key: Vec<u8>, value: Vec<u8>) {
        self.writes[t as usize].get_or_insert_with(BTreeMap::new).insert(key, Some(value));
    }

    fn remove(&mut self, t: T, key: Vec<u8>) {
        self.writes[t as usize].get_or_insert_with(BTreeMap::new).insert(key, None);
    }

    /// Stages `batches` in order, each checked against what the earlier ones leave; the first refused one
    /// is answered with its index.
    fn run(mut self, batches: &[&WriteBatch]) -> Result<Prepared, (usize, StoreError)> {
        let mut receipts = Vec::with_capacity(batches.len());
        for (which, batch) in batches.iter().enumerate() {
            self.stage(batch).map_err(|err| (which, err))?;
            receipts.push(std::mem::take(&mut self.receipt));
        }
        let commits = self.commits.saturating_add(1);
        let counter = commits.encode().map_err(|err| (0, err))?;
        self.put(T::Meta, META_COMMITS.to_vec(), counter);
        let mut runs: HashMap<Vec<u8>, CachedRun> = HashMap::new();
        for (key, hash) in self.runs {
            runs.entry(key).or_default().snapshot = Some(hash);
        }
        for (key, next) in self.ledger_next {
            runs.entry(key).or_default().next_position = Some(next);
        }
        for (key, live) in self.live {
            runs.entry(key).or_default().live = Some(live);
        }
        let writes = self.writes.into_iter().enumerate().filter_map(|(t, w)| w.map(|w| (t, w))).collect();
        Ok(Prepared { writes, receipts, head: self.head.ok(), commits, runs })
    }

    fn stage(&mut self, batch: &WriteBatch) -> Result<(), StoreError> {
        // Snapshots and run bindings first, so that a run, its ledger and its records may share a batch in
        // any order.
        for (i, op) in batch.ops().iter().enumerate() {
            let bound = match op {
                WriteOp::PutSnapshot(snapshot) => self.put_snapshot(snapshot),
                WriteOp::PutRun(run) => self.bind_run(run),
                _ => Ok(()),
            };
            bound.map_err(|err| err.context(format!("write {i} of the batch")))?;
        }
        for (i, op) in batch.ops().iter().enumerate() {
            self.apply(op).map_err(|err| err.context(format!("write {i} of the batch")))?;
        }
        self.receipt.ops = batch.len();
        Ok(())
    }

    fn apply(&mut self, op: &WriteOp) -> Result<(), StoreError> {
        match op {
            WriteOp::PutPolicyVersion(policy) => self.put_policy(policy),
            WriteOp::AppendAudit { tenant, entry } => self.append_audit(tenant.as_ref(), entry),
            WriteOp::PutSnapshot(_) => Ok(()),
            WriteOp::PutRun(run) => self.put_run(run),
            WriteOp::AppendLedger { tenant_id, run_id, entry } => self.append_ledger(tenant_id, run_id, entry),
            WriteOp::AppendRecord(append) => self.append_record(append),
            WriteOp::AddShadowStats { tenant, run_tenant, policy_id, delta } => {
                self.add_shadow(tenant.as_ref(), run_tenant, policy_id, *delta)
            }
            WriteOp::PutIncident(incident) => self.put_incident(incident),
            WriteOp::PutPattern(pattern) => self.put_pattern(pattern),
            WriteOp::PutRegret { tenant_id, regret } => self.put_regret(tenant_id, regret),
            WriteOp::SetGraduation { tenant_id, state } => self.set_graduation(tenant_id, state),
        }
    }

    /// The next number after the last key under `prefix` (from `first`), tracked across the batch.
    fn next_counter(&self, t: T, prefix: &[u8], overlay: &HashMap<Vec<u8>, u64>) -> Result<u64, StoreError> {
        if let Some(n) = overlay.get(prefix) {
            return Ok(*n);
        }
        match self.store.tree(t)?.scan_prefix(prefix).next_back() {
            None => Ok(0),
            Some(item) => {
                let (key, _) = item?;
                let last = keys::trailing_u64(&key).ok_or_else(|| StoreError::corrupt("a counter key is too short"))?;
                Ok(last.saturating_add(1))
            }
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
        let head_key = keys::policy_prefix(owner, &policy.id);
        let current = match self.policy_heads.get(&head_key) {
            Some(v) => Some(*v),
            None => self.store.policy_head(owner, &policy.id)?,
        };
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
        self.policy_heads.insert(head_key.clone(), policy.version);
        self.put(T::Policies, keys::policy_version(owner, &policy.id, policy.version), policy.encode()?);
        self.put(T::PolicyHeads, head_key, policy.version.encode()?);
        Ok(())
    }

    /// A new policy's id must name one policy in every tenant's view (SPEC §12.1): a tenant policy may not
    /// take a global policy's id, nor a global policy any tenant's. Checked here, under the writer lock,
    /// so that two racing creations cannot both pass the node's earlier check.
    fn check_policy_id_free(&self, policy: &Policy) -> Result<(), StoreError> {
        let taken = match &policy.tenant_id {
            Some(_) => {
                let global = keys::policy_prefix(None, &policy.id);
                self.policy_heads.contains_key(&global) || self.store.policy_head(None, &policy.id)?.is_some()
            }
            None => {
                tenant_heads_hold(self.policy_heads.keys().map(|k| Ok::<_, sled::Error>(k.as_slice())), &policy.id)?
                    || self.store.tenant_policy_id_exists(&policy.id)?
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
        let prefix = keys::policy_prefix(owner, &entry.policy_id);
        let exists =
            self.policy_heads.contains_key(&prefix) || self.store.policy_head(owner, &entry.policy_id)?.is_some();
        if !exists {
            return Err(StoreError::not_found(format!("policy `{}` to audit does not exist", entry.policy_id)));
        }
        let n = self.next_counter(T::Audit, &prefix, &self.audit_next)?;
        self.audit_next.insert(prefix, n.saturating_add(1));
        self.put(T::Audit, keys::audit(owner, &entry.policy_id, n), entry.encode()?);
        Ok(())
    }

    fn put_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let bytes = canonical_json(snapshot).map_err(|err| StoreError::contract(err.to_string()))?;
        let digest = domain_hash(SNAPSHOT_DOMAIN, &bytes);
        let hash = SnapshotHash::from_bytes(&digest);
        let value = codec::encode_raw("snapshot", &bytes)?;
        self.snapshots.insert(hash);
        self.put(T::Snapshots, digest.to_vec(), value);
        Ok(())
    }

    fn snapshot_exists(&self, hash: &SnapshotHash) -> Result<bool, StoreError> {
        if self.snapshots.contains(hash) {
            return Ok(true);
        }
        let key = hex::decode(hash.as_str()).map_err(|_| StoreError::contract("a snapshot hash is not hex"))?;
        Ok(self.store.tree(T::Snapshots)?.contains_key(key)?)
    }

    /// First pass over runs: the binding to a snapshot is immutable and the snapshot must exist.
    fn bind_run(&mut self, run: &StoredRun) -> Result<(), StoreError> {
        let key = keys::run(&run.tenant_id, &run.run_id);
        if run.snapshot.id != SnapshotId::for_hash(&run.snapshot.hash) {
            return Err(StoreError::contract(format!(
                "run `{}` names a snapshot id that is not its hash's",
                run.run_id
            )));
        }
        let bound = self.bound_snapshot(&key)?;
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
            let digest = snapshot_id_digest(&run.snapshot.id)
                .ok_or_else(|| StoreError::contract("a snapshot id is not `snp_` and 32 hex digits"))?;
            self.put(T::SnapshotBindings, keys::snapshot_binding(&run.tenant_id, &digest), Vec::new());
        }
        self.runs.insert(key, run.snapshot.hash.clone());
        Ok(())
    }

    /// The snapshot the run with `key` is bound to: from this batch, the writer's cache or the store.
    fn bound_snapshot(&self, key: &[u8]) -> Result<Option<SnapshotHash>, StoreError> {
        if let Some(hash) = self.runs.get(key) {
            return Ok(Some(hash.clone()));
        }
        if let Some(hash) = self.cache.get(key).and_then(|c| c.snapshot.as_ref()) {
            return Ok(Some(hash.clone()));
        }
        Ok(self.store.get_decoded::<StoredRun>(T::Runs, key)?.map(|r| r.snapshot.hash))
    }

    fn run_binding(&self, tenant: &TenantId, run: &RunId) -> Result<Option<SnapshotHash>, StoreError> {
        self.bound_snapshot(&keys::run(tenant, run))
    }

    fn put_run(&mut self, run: &StoredRun) -> Result<(), StoreError> {
        let key = keys::run(&run.tenant_id, &run.run_id);
        let live = run.status == RunStatus::Running;
        let listed = self.live.get(&key).copied().or_else(|| self.cache.get(&key).and_then(|c| c.live));
        // Every step rewrites its run; its live listing changes only when it stops running.
        if listed != Some(live) {
            if live {
                self.put(T::RunsLive, key.clone(), Vec::new());
            } else {
                self.remove(T::RunsLive, key.clone());
            }
            self.live.insert(key.clone(), live);
        }
        self.put(T::Runs, key, run.encode()?);
        Ok(())
    }

    fn append_ledger(&mut self, tenant: &TenantId, run: &RunId, entry: &LedgerEntry) -> Result<(), StoreError> {
        if self.run_binding(tenant, run)?.is_none() {
            return Err(StoreError::not_found(format!("run `{run}` of the ledger entry does not exist")));
        }
        let prefix = keys::run(tenant, run);
        let position = match (self.ledger_next.get(&prefix), self.cache.get(&prefix)) {
            (None, Some(CachedRun { next_position: Some(next), .. })) => *next,
            _ => self.next_counter(T::Ledger, &prefix, &self.ledger_next)?,
        };
        self.ledger_next.insert(prefix, position.saturating_add(1));
        let mut entry = entry.clone();
        entry.position = position;
        self.put(T::Ledger, keys::ledger(tenant, run, position), entry.encode()?);
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
            RecordAuthority::Simulated => {
                if !record.is_simulated {
                    return Err(StoreError::contract(format!(
                        "record `{}` is appended as simulated but is not flagged",
                        record.id
                    )));
                }
            }
        }
        let duplicate = self.record_ids.contains_key(&record.id)
            || self.store.tree(T::RecById)?.scan_prefix(keys::record_id_prefix(&record.id)).next().is_some();
        if duplicate {
            return Err(StoreError::conflict(format!("record `{}` already exists", record.id)));
        }
        let head = self.head.clone()?;
        let seq = head.seq.checked_add(1).ok_or_else(|| StoreError::contract("the record sequence is exhausted"))?;
        let sealed = record
            .clone()
            .seal(seq, head.hash)
            .map_err(|err| StoreError::contract(format!("cannot seal record `{}`: {err}", record.id)))?;
        self.put(T::Records, keys::record(seq), sealed.encode()?);
        for (t, key) in record_index_keys(&sealed) {
            self.put(t, key, Vec::new());
        }
        self.head = Ok(ChainHead { seq, hash: sealed.hash.clone() });
        self.record_ids.insert(sealed.id.clone(), (sealed.tenant_id.clone(), sealed.policy_id.clone()));
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
        let key = keys::shadow_stats(owner, policy, run_tenant);
        let current = match self.shadow.get(&key) {
            Some(stats) => *stats,
            None => self.store.get_decoded::<ShadowStats>(T::ShadowStatsTree, &key)?.unwrap_or_default(),
        };
        let next = current.plus(delta);
        self.shadow.insert(key.clone(), next);
        self.put(T::ShadowStatsTree, key, next.encode()?);
        Ok(())
    }

    fn put_incident(&mut self, incident: &Incident) -> Result<(), StoreError> {
        let key = keys::tenant_item(&incident.tenant_id, incident.id.as_str());
        if self.incidents.contains(&key) || self.store.tree(T::Incidents)?.contains_key(&key)? {
            return Err(StoreError::conflict(format!("incident `{}` already exists", incident.id)));
        }
        self.incidents.insert(key.clone());
        self.put(T::Incidents, key, incident.encode()?);
        self.put(
            T::IncidentsByTime,
            keys::incident_by_time(&incident.tenant_id, incident.created_at, incident.id.as_str()),
            Vec::new(),
        );
        Ok(())
    }

    fn put_pattern(&mut self, pattern: &Pattern) -> Result<(), StoreError> {
        let key = keys::tenant_item(&pattern.tenant_id, pattern.id.as_str());
        let existing = match self.patterns.get(&key) {
            Some(found) => Some(found.clone()),
            None => self.store.get_decoded::<Pattern>(T::Patterns, &key)?.map(|p| (p.signature_hash, p.error_type)),
        };
        if let Some((signature, error_type)) = existing
            && (signature != pattern.signature_hash || error_type != pattern.error_type)
        {
            return Err(StoreError::contract(format!(
                "pattern `{}` cannot change its signature hash or error type",
                pattern.id
            )));
        }
        let sig_key = keys::pattern_by_signature(&pattern.tenant_id, &pattern.signature_hash, &pattern.error_type);
        let owner = match self.pattern_sigs.get(&sig_key) {
            Some(id) => Some(id.clone()),
            None => self
                .store
                .get_decoded::<String>(T::PatternsBySig, &sig_key)?
                .map(PatternId::new)
                .transpose()
                .map_err(|_| StoreError::corrupt("the pattern index holds an invalid id"))?,
        };
        if let Some(owner) = owner
            && owner != pattern.id
        {
            return Err(StoreError::conflict(format!(
                "pattern `{owner}` already groups this signature and error type"
            )));
        }
        self.patterns.insert(key.clone(), (pattern.signature_hash.clone(), pattern.error_type.clone()));
        self.pattern_sigs.insert(sig_key.clone(), pattern.id.clone());
        self.put(T::Patterns, key, pattern.encode()?);
        self.put(T::PatternsBySig, sig_key, pattern.id.as_str().to_owned().encode()?);
        Ok(())
    }

    fn put_regret(&mut self, tenant: &TenantId, regret: &Regret) -> Result<(), StoreError> {
        let target = match self.record_ids.get(&regret.record_id) {
            Some(found) => Some(found.clone()),
            None => match self.store.get_record(tenant, &regret.record_id)? {
                // SPEC §12.4: a simulation's record prevented nothing and never changes a live policy.
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
        let key = keys::regret(&regret.record_id);
        if self.regrets.contains(&regret.record_id) || self.store.tree(T::Regrets)?.contains_key(&key)? {
            return Err(StoreError::conflict(format!("record `{}` is already regretted", regret.record_id)));
        }
        self.regrets.insert(regret.record_id.clone());
        self.put(T::Regrets, key, regret.encode()?);
        self.put(
            T::RegretsByPolicy,
            keys::regret_by_policy(tenant, &regret.policy_id, regret.at, &regret.record_id),
            Vec::new(),
        );
        Ok(())
    }

    fn set_graduation(&mut self, tenant: &TenantId, state: &GraduationState) -> Result<(), StoreError> {
        let prefix = keys::tenant(tenant);
        let n = self.next_counter(T::GraduationHistory, &prefix, &self.graduation_next)?;
        self.graduation_next.insert(prefix.clone(), n.saturating_add(1));
        let value = state.encode()?;
        self.put(T::Graduation, prefix, value.clone());
        self.put(T::GraduationHistory, keys::graduation_history(tenant, n), value);
        Ok(())
    }
}
