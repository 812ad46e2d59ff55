//! Group commit: checking callers' batches (`Prepare`), one transaction, flush and fsync, and undo after
//! a flush that failed.

use std::collections::BTreeMap;

use runguard_contract::{
    IncidentId, PatternId, PolicyId, PreventionRecord, RecordId, RunId, SignatureHash, SnapshotHash, TenantId,
};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{Transactional, Tree};

use super::reads::snapshot_id_digest;
use super::{ChainHead, Engine, Failure, META_COMMITS, Store, T, TREE_NAMES, Undo, WriterState};
use crate::batch::{CommitReceipt, WriteBatch};
use crate::codec::{self, Stored};
use crate::error::{StoreError, StoreErrorKind};
use crate::group::{self, Outcome};
use crate::keys;
use crate::model::{RunRollup, ShadowStats, StoredRun};
use crate::prepare::{Prepare, Prepared, ReadView, RunHead, Staged};
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

impl Store {
    /// Makes every write of `batch` durable together: checks them, assigns record sequence numbers and
    /// ledger positions, applies everything in one multi-tree transaction, then flushes and fsyncs. On any
    /// error nothing of the batch is written.
    pub fn commit(&self, batch: WriteBatch) -> Result<CommitReceipt, StoreError> {
        group::single(batch, |batches| self.commit_group(batches))
    }

    /// Group commit: several callers' batches in one transaction, one flush and one fsync, failing only
    /// the callers whose own writes are refused. Each batch is checked against the state the earlier ones
    /// leave; a refused one is dropped and the others are checked again without it. A store that cannot
    /// write fails every caller with the same (I/O) error. Answers one result per batch, in order; an
    /// empty group touches nothing (see `docs/store.md`, "Group commit").
    pub fn commit_group(&self, batches: Vec<WriteBatch>) -> Vec<Result<CommitReceipt, StoreError>> {
        self.signals.group(
            &batches,
            || self.writer(),
            |writer, outcomes| self.attempt_locked(writer, &batches, outcomes),
            |_| {},
        )
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
            let view = SledView { store: self, cache: &writer.runs };
            match Prepare::new(&view, writer.head.clone()).run(&chosen).and_then(|p| sled_writes(p, writer.commits)) {
                Ok(prepared) => break (included, prepared),
                // A read that fails is the store's failure, not the caller's: everyone gets it. Anything else
                // (a refusal, or damage to what this caller touches) fails only this caller.
                Err((_, err)) if err.kind() == StoreErrorKind::Io => return Err(err),
                Err((which, err)) => outcomes[included[which]] = Some(Err(err)),
            }
        };
        let (included, prepared) = prepared;
        let fail = self.signals.commit_failure_injected();
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
        if let Some(head) = prepared.head.clone() {
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

/// A prepared group commit in sled's layout.
struct SledPrepared {
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
    runs: std::collections::HashMap<Vec<u8>, CachedRun>,
}

/// Lays the checked writes out as sled keys and values, with the commit counter bumped.
fn sled_writes(prepared: Prepared, commits: u64) -> Result<SledPrepared, (usize, StoreError)> {
    let mut trees: Vec<Option<TreeWrites>> = TREE_NAMES.iter().map(|_| None).collect();
    let mut put = |t: T, key: Vec<u8>, value: Option<Vec<u8>>| {
        trees[t as usize].get_or_insert_with(BTreeMap::new).insert(key, value);
    };
    for (which, staged) in prepared.writes {
        // An encoding failure (a value over the size limit) is its caller's alone.
        let fail = |err: StoreError| (which, err);
        match staged {
            Staged::PolicyVersion(policy) => {
                let owner = policy.tenant_id.as_ref();
                let value = policy.encode().map_err(fail)?;
                put(T::Policies, keys::policy_version(owner, &policy.id, policy.version), Some(value));
                put(
                    T::PolicyHeads,
                    keys::policy_prefix(owner, &policy.id),
                    Some(policy.version.encode().map_err(fail)?),
                );
            }
            Staged::Audit { owner, n, entry } => {
                let value = entry.encode().map_err(fail)?;
                put(T::Audit, keys::audit(owner.as_ref(), &entry.policy_id, n), Some(value));
            }
            Staged::Snapshot { hash, canonical } => {
                let key =
                    hex::decode(hash.as_str()).map_err(|_| fail(StoreError::contract("a snapshot hash is not hex")))?;
                put(T::Snapshots, key, Some(codec::encode_raw("snapshot", &canonical).map_err(fail)?));
            }
            Staged::Binding { tenant, snapshot } => {
                let digest = snapshot_id_digest(&snapshot)
                    .ok_or_else(|| fail(StoreError::contract("a snapshot id is not `snp_` and 32 hex digits")))?;
                put(T::SnapshotBindings, keys::snapshot_binding(&tenant, &digest), Some(Vec::new()));
            }
            Staged::Run { run, listed, advanced } => {
                let key = keys::run(&run.tenant_id, &run.run_id);
                match listed {
                    Some(true) => put(T::RunsLive, key.clone(), Some(Vec::new())),
                    Some(false) => put(T::RunsLive, key.clone(), None),
                    None => {}
                }
                // A step's run is its stored row plus the ledger entry written beside it (reads catch the
                // row up): the row is written when more than the step changed.
                if !advanced {
                    put(T::Runs, key, Some(run.encode().map_err(fail)?));
                }
            }
            Staged::Ledger { tenant, run, entry } => {
                let value = entry.encode().map_err(fail)?;
                put(T::Ledger, keys::ledger(&tenant, &run, entry.position), Some(value));
            }
            Staged::Record(record) => {
                put(T::Records, keys::record(record.seq), Some(record.encode().map_err(fail)?));
                for (t, key) in record_index_keys(&record) {
                    put(t, key, Some(Vec::new()));
                }
            }
            Staged::Shadow { owner, run_tenant, policy, total } => {
                let key = keys::shadow_stats(owner.as_ref(), &policy, &run_tenant);
                put(T::ShadowStatsTree, key, Some(total.encode().map_err(fail)?));
            }
            Staged::TenantUsage { tenant, policy, period_start, used } => {
                put(
                    T::TenantUsage,
                    keys::tenant_usage(&tenant, &policy, period_start),
                    Some(used.encode().map_err(fail)?),
                );
            }
            // Refused by the view before it is staged: a sled node keeps its tenants' rate windows in memory.
            Staged::TenantRate(_) => {
                return Err(fail(StoreError::contract("shared tenant rate windows need the postgres store")));
            }
            Staged::Incident(incident) => {
                let key = keys::tenant_item(&incident.tenant_id, incident.id.as_str());
                put(T::Incidents, key, Some(incident.encode().map_err(fail)?));
                let by_time = keys::incident_by_time(&incident.tenant_id, incident.created_at, incident.id.as_str());
                put(T::IncidentsByTime, by_time, Some(Vec::new()));
            }
            Staged::Pattern(pattern) => {
                let key = keys::tenant_item(&pattern.tenant_id, pattern.id.as_str());
                put(T::Patterns, key, Some(pattern.encode().map_err(fail)?));
                let sig_key =
                    keys::pattern_by_signature(&pattern.tenant_id, &pattern.signature_hash, &pattern.error_type);
                put(T::PatternsBySig, sig_key, Some(pattern.id.as_str().to_owned().encode().map_err(fail)?));
            }
            Staged::Regret { tenant, regret } => {
                put(T::Regrets, keys::regret(&regret.record_id), Some(regret.encode().map_err(fail)?));
                let by_policy = keys::regret_by_policy(&tenant, &regret.policy_id, regret.at, &regret.record_id);
                put(T::RegretsByPolicy, by_policy, Some(Vec::new()));
            }
            Staged::Rollup { tenant, run, total } => {
                put(T::RunRollups, keys::run(&tenant, &run), Some(total.encode().map_err(fail)?));
            }
            Staged::Graduation { tenant, n, state } => {
                let value = state.encode().map_err(fail)?;
                put(T::Graduation, keys::tenant(&tenant), Some(value.clone()));
                put(T::GraduationHistory, keys::graduation_history(&tenant, n), Some(value));
            }
        }
    }
    let commits = commits.saturating_add(1);
    put(T::Meta, META_COMMITS.to_vec(), Some(commits.encode().map_err(|err| (0, err))?));
    let writes = trees.into_iter().enumerate().filter_map(|(t, w)| w.map(|w| (t, w))).collect();
    Ok(SledPrepared { writes, receipts: prepared.receipts, head: prepared.head, commits, runs: prepared.runs })
}

/// What the write rules read of a sled store: the trees, and the writer's cache of recent runs.
struct SledView<'a> {
    store: &'a Store,
    cache: &'a RunCache,
}

impl SledView<'_> {
    /// The next number after the last key under `prefix` (from 0).
    fn next_counter(&self, t: T, prefix: &[u8]) -> Result<u64, StoreError> {
        match self.store.tree(t)?.scan_prefix(prefix).next_back() {
            None => Ok(0),
            Some(item) => {
                let (key, _) = item?;
                let last = keys::trailing_u64(&key).ok_or_else(|| StoreError::corrupt("a counter key is too short"))?;
                Ok(last.saturating_add(1))
            }
        }
    }
}

impl ReadView for SledView<'_> {
    fn policy_head(&self, owner: Option<&TenantId>, id: &PolicyId) -> Result<Option<u32>, StoreError> {
        self.store.policy_head(owner, id)
    }

    fn tenant_policy_id_exists(&self, id: &PolicyId) -> Result<bool, StoreError> {
        self.store.tenant_policy_id_exists(id)
    }

    fn next_audit(&self, owner: Option<&TenantId>, id: &PolicyId) -> Result<u64, StoreError> {
        self.next_counter(T::Audit, &keys::policy_prefix(owner, id))
    }

    fn snapshot_exists(&self, hash: &SnapshotHash) -> Result<bool, StoreError> {
        let key = hex::decode(hash.as_str()).map_err(|_| StoreError::contract("a snapshot hash is not hex"))?;
        Ok(self.store.tree(T::Snapshots)?.contains_key(key)?)
    }

    fn run_binding(&self, tenant: &TenantId, run: &RunId) -> Result<Option<SnapshotHash>, StoreError> {
        let key = keys::run(tenant, run);
        if let Some(hash) = self.cache.get(&key).and_then(|c| c.snapshot.as_ref()) {
            return Ok(Some(hash.clone()));
        }
        Ok(self.store.get_decoded::<StoredRun>(T::Runs, &key)?.map(|r| r.snapshot.hash))
    }

    fn run_listed_live(&self, tenant: &TenantId, run: &RunId) -> Option<bool> {
        self.cache.get(&keys::run(tenant, run)).and_then(|c| c.live)
    }

    /// From the writer's cache when it knows the run (every run this writer wrote since it opened):
    /// the fencing condition then costs no read. A single writer owns a sled store, so the cache is the
    /// store's state.
    fn run_head(&self, tenant: &TenantId, run: &RunId) -> Result<Option<RunHead>, StoreError> {
        let key = keys::run(tenant, run);
        let cached = self.cache.get(&key);
        let exists = match cached.and_then(|c| c.snapshot.as_ref()) {
            Some(_) => true,
            None => self.store.tree(T::Runs)?.contains_key(&key)?,
        };
        if !exists {
            return Ok(None);
        }
        let ledger_len = self.next_ledger_position(tenant, run)?;
        let running = match cached.and_then(|c| c.live) {
            Some(live) => live,
            None => self.store.tree(T::RunsLive)?.contains_key(&key)?,
        };
        Ok(Some(RunHead { ledger_len, running }))
    }

    fn next_ledger_position(&self, tenant: &TenantId, run: &RunId) -> Result<u64, StoreError> {
        let key = keys::run(tenant, run);
        match self.cache.get(&key) {
            Some(CachedRun { next_position: Some(next), .. }) => Ok(*next),
            _ => self.next_counter(T::Ledger, &key),
        }
    }

    fn record_id_exists(&self, id: &RecordId) -> Result<bool, StoreError> {
        Ok(self.store.tree(T::RecById)?.scan_prefix(keys::record_id_prefix(id)).next().is_some())
    }

    fn record(&self, tenant: &TenantId, id: &RecordId) -> Result<Option<PreventionRecord>, StoreError> {
        self.store.get_record(tenant, id)
    }

    fn shadow_stats(
        &self,
        owner: Option<&TenantId>,
        policy: &PolicyId,
        run_tenant: &TenantId,
    ) -> Result<ShadowStats, StoreError> {
        let key = keys::shadow_stats(owner, policy, run_tenant);
        Ok(self.store.get_decoded::<ShadowStats>(T::ShadowStatsTree, &key)?.unwrap_or_default())
    }

    fn tenant_usage(
        &self,
        tenant: &TenantId,
        policy: &PolicyId,
        period_start: runguard_contract::Timestamp,
    ) -> Result<u64, StoreError> {
        self.store.tenant_usage(tenant, policy, period_start)
    }

    fn tenant_rate_used(
        &self,
        _: &TenantId,
        _: runguard_contract::Timestamp,
        _: runguard_contract::RateMetric,
    ) -> Result<u64, StoreError> {
        Err(StoreError::contract("a sled node keeps its tenants' rate windows in memory, not in the store"))
    }

    fn incident_exists(&self, tenant: &TenantId, id: &IncidentId) -> Result<bool, StoreError> {
        Ok(self.store.tree(T::Incidents)?.contains_key(keys::tenant_item(tenant, id.as_str()))?)
    }

    fn pattern_identity(
        &self,
        tenant: &TenantId,
        id: &PatternId,
    ) -> Result<Option<(SignatureHash, String)>, StoreError> {
        let key = keys::tenant_item(tenant, id.as_str());
        Ok(self
            .store
            .get_decoded::<runguard_contract::Pattern>(T::Patterns, &key)?
            .map(|p| (p.signature_hash, p.error_type)))
    }

    fn pattern_for_signature(
        &self,
        tenant: &TenantId,
        signature: &SignatureHash,
        error_type: &str,
    ) -> Result<Option<PatternId>, StoreError> {
        self.store
            .get_decoded::<String>(T::PatternsBySig, &keys::pattern_by_signature(tenant, signature, error_type))?
            .map(PatternId::new)
            .transpose()
            .map_err(|_| StoreError::corrupt("the pattern index holds an invalid id"))
    }

    fn regret_exists(&self, record: &RecordId) -> Result<bool, StoreError> {
        Ok(self.store.tree(T::Regrets)?.contains_key(keys::regret(record))?)
    }

    fn next_graduation(&self, tenant: &TenantId) -> Result<u64, StoreError> {
        self.next_counter(T::GraduationHistory, &keys::tenant(tenant))
    }

    fn run_totals(&self, tenant: &TenantId, run: &RunId) -> Result<Option<runguard_contract::Totals>, StoreError> {
        Ok(self.store.get_run(tenant, run)?.map(|run| run.totals))
    }

    fn run_rollup(&self, tenant: &TenantId, run: &RunId) -> Result<RunRollup, StoreError> {
        Ok(self.store.get_decoded::<RunRollup>(T::RunRollups, &keys::run(tenant, run))?.unwrap_or_default())
    }
}
