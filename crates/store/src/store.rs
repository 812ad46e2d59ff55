//! The sled-backed store: opening and recovery, group commit, queries and verification.
//!
//! Every sled call of the crate is in this file; another backend replaces this file behind the same
//! [`Store`] facade.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use runguard_contract::canonical::{SNAPSHOT_DOMAIN, canonical_json, domain_hash};
use runguard_contract::prevention::check_record_against_decision;
use runguard_contract::record::verify_chain_from;
use runguard_contract::{
    AuditEntry, Incident, IncidentId, Mode, Pattern, PatternId, Policy, PolicyId, PreventionRecord, RecordHash,
    RecordId, Regret, RunId, RunStatus, Scope, SignatureHash, Snapshot, SnapshotHash, SnapshotId, TenantId, Timestamp,
};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{Batch, IVec, Transactional, Tree};

use crate::batch::{CommitReceipt, RecordAppend, RecordAuthority, WriteBatch, WriteOp};
use crate::codec::{self, Stored};
use crate::error::{StoreError, StoreErrorKind};
use crate::integrity::{IntegrityError, LoadedRun, RecordBreak, SnapshotBreak, StoredSnapshot, VerifyReport};
use crate::keys;
use crate::model::{GraduationState, LedgerCall, LedgerEntry, ShadowStats, StoredRun};
use crate::query::{Page, PageRequest, RecordQuery, prefix_end};
use crate::run_cache::{CachedRun, RunCache};

/// The schema this build reads and writes, kept in the `meta` tree.
pub const SCHEMA_VERSION: u32 = 1;

const META_SCHEMA: &[u8] = b"schema_version";

/// How to open a store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// sled's page cache budget in bytes (on-disk page size, not RSS).
    pub cache_capacity_bytes: u64,
    /// Whether each commit ends with `fsync` of the database file (after sled's flush). Turn off only in
    /// tests that do not care about power loss.
    pub fsync: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { cache_capacity_bytes: 32 * 1024 * 1024, fsync: true }
    }
}

macro_rules! trees {
    ($($variant:ident => $name:literal),* $(,)?) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        enum T { $($variant),* }
        const TREE_NAMES: &[&str] = &[$($name),*];
    };
}

trees! {
    Meta => "meta",
    Policies => "policies",
    PolicyHeads => "policy_heads",
    Audit => "audit",
    Snapshots => "snapshots",
    Runs => "runs",
    RunsLive => "runs_live",
    Ledger => "ledger",
    Records => "records",
    RecById => "rec_by_id",
    RecByTenant => "rec_by_tenant",
    RecByPolicy => "rec_by_policy",
    RecByRun => "rec_by_run",
    ShadowStatsTree => "shadow_stats",
    Incidents => "incidents",
    IncidentsByTime => "incidents_by_time",
    Patterns => "patterns",
    PatternsBySig => "patterns_by_sig",
    Regrets => "regrets",
    RegretsByPolicy => "regrets_by_policy",
    Graduation => "graduation",
    GraduationHistory => "graduation_history",
    SnapshotBindings => "snapshot_bindings",
}

/// The last record of the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ChainHead {
    seq: u64,
    hash: RecordHash,
}

#[derive(Debug)]
struct WriterState {
    /// The chain head recovered at open and advanced by each commit; an error when the last record does not
    /// decode (then no record can be appended until the store is repaired).
    head: Result<ChainHead, StoreError>,
    /// Set when a transaction committed but flush or fsync failed: the store refuses further commits.
    poisoned: Option<String>,
    /// Recently written runs, so that their next commit need not read them back.
    runs: RunCache,
}

/// The runguard store: one sled database holding every tree, written only through [`Store::commit`].
///
/// Reads may run on any thread concurrently with a commit; commits are serialised by an internal lock.
#[derive(Debug)]
pub struct Store {
    db: sled::Db,
    dir: PathBuf,
    trees: Vec<Tree>,
    db_file: Option<File>,
    writer: Mutex<WriterState>,
    inject_failure: AtomicBool,
    policy_generation: AtomicU64,
}

type TxError = ConflictableTransactionError<StoreError>;

impl Store {
    /// Opens (creating if needed) the store in `dir`, checks the schema version and recovers the chain head.
    pub fn open(dir: impl AsRef<Path>, options: &StoreOptions) -> Result<Self, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        let db = open_db(&dir, options)?;
        let trees = TREE_NAMES.iter().map(|name| db.open_tree(name)).collect::<Result<Vec<Tree>, _>>()?;
        let db_file = if options.fsync { Some(File::open(dir.join("db"))?) } else { None };
        let mut store = Self {
            db,
            dir,
            trees,
            db_file,
            writer: Mutex::new(WriterState {
                head: Ok(ChainHead { seq: 0, hash: RecordHash::genesis() }),
                poisoned: None,
                runs: RunCache::default(),
            }),
            inject_failure: AtomicBool::new(false),
            policy_generation: AtomicU64::new(0),
        };
        store.check_schema()?;
        let head = store.recover_head();
        store.writer = Mutex::new(WriterState { head, poisoned: None, runs: RunCache::default() });
        Ok(store)
    }

    /// The directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A tree by name, for tests that corrupt stored bytes on purpose.
    #[cfg(test)]
    pub(crate) fn raw_tree(&self, name: &str) -> Tree {
        let index = TREE_NAMES.iter().position(|n| *n == name).unwrap_or(0);
        self.trees[index].clone()
    }

    fn tree(&self, t: T) -> &Tree {
        // `trees` is built from TREE_NAMES, which the enum mirrors one to one.
        &self.trees[t as usize]
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        let meta = self.tree(T::Meta);
        match meta.get(META_SCHEMA)? {
            Some(bytes) => {
                let version = u32::decode(&bytes)?;
                if version != SCHEMA_VERSION {
                    return Err(StoreError::new(
                        StoreErrorKind::Schema,
                        format!(
                            "the store in `{}` has schema version {version}; this build reads version {SCHEMA_VERSION}",
                            self.dir.display()
                        ),
                    ));
                }
            }
            None => {
                let populated = self.trees.iter().skip(1).any(|t| !t.is_empty());
                if populated {
                    return Err(StoreError::new(
                        StoreErrorKind::Schema,
                        format!("the store in `{}` holds data but no schema version", self.dir.display()),
                    ));
                }
                meta.insert(META_SCHEMA, SCHEMA_VERSION.encode()?)?;
                self.db.flush()?;
            }
        }
        Ok(())
    }

    fn recover_head(&self) -> Result<ChainHead, StoreError> {
        match self.tree(T::Records).last()? {
            None => Ok(ChainHead { seq: 0, hash: RecordHash::genesis() }),
            Some((key, value)) => {
                let record = PreventionRecord::decode(&value)?;
                let key_seq = keys::trailing_u64(&key).unwrap_or(0);
                if record.seq != key_seq {
                    return Err(StoreError::corrupt(format!(
                        "the last record `{}` carries seq {} but is stored at seq {key_seq}",
                        record.id, record.seq
                    )));
                }
                Ok(ChainHead { seq: record.seq, hash: record.hash })
            }
        }
    }

    fn writer(&self) -> MutexGuard<'_, WriterState> {
        // A panic while holding the lock cannot leave half a batch: sled transactions are atomic.
        self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes every commit fail inside its transaction (after some writes were staged) until turned off:
    /// the fault-injection point of reliability tests. A failed commit writes nothing.
    pub fn inject_commit_failure(&self, fail: bool) {
        self.inject_failure.store(fail, Ordering::SeqCst);
    }

    /// A number that changes whenever a commit that writes policy versions was attempted (it is bumped
    /// after the attempt, whether it committed or not). A cache of anything derived from the policies —
    /// a tenant's current snapshot — reads it before reading the policies and is stale once it differs.
    pub fn policy_generation(&self) -> u64 {
        self.policy_generation.load(Ordering::Acquire)
    }

    /// The sequence number and hash of the last record, as recovered and advanced by commits.
    pub fn chain_head(&self) -> Result<(u64, RecordHash), StoreError> {
        self.writer().head.as_ref().map(|h| (h.seq, h.hash.clone())).map_err(Clone::clone)
    }

    // ---- group commit -----------------------------------------------------------------------------

    /// Makes every write of `batch` durable together: checks them, assigns record sequence numbers and
    /// ledger positions, applies everything in one multi-tree transaction, then flushes and fsyncs. On any
    /// error nothing of the batch is written.
    pub fn commit(&self, batch: WriteBatch) -> Result<CommitReceipt, StoreError> {
        if batch.is_empty() {
            return Ok(CommitReceipt::default());
        }
        let mut writer = self.writer();
        if let Some(why) = &writer.poisoned {
            return Err(StoreError::new(
                StoreErrorKind::Io,
                format!("the store refuses writes after an earlier durability failure ({why}); restart the node"),
            ));
        }
        let writes_policies = batch.ops().iter().any(|op| matches!(op, WriteOp::PutPolicyVersion(_)));
        let result = self.commit_locked(&mut writer, &batch);
        if writes_policies {
            self.policy_generation.fetch_add(1, Ordering::AcqRel);
        }
        result
    }

    fn commit_locked(&self, writer: &mut WriterState, batch: &WriteBatch) -> Result<CommitReceipt, StoreError> {
        let head = writer.head.clone();
        let prepared = Prepare::new(self, &writer.runs, head).run(batch)?;
        let fail = self.inject_failure.load(Ordering::SeqCst);
        if fail && prepared.batches.is_empty() {
            return Err(StoreError::new(StoreErrorKind::Injected, "commit failure injected by a test"));
        }
        let refs: Vec<&Tree> = prepared.batches.iter().filter_map(|(t, _)| self.trees.get(*t)).collect();
        debug_assert_eq!(refs.len(), prepared.batches.len(), "every written tree exists");
        let outcome = refs.as_slice().transaction(|views: &Vec<TransactionalTree>| {
            for (view, (_, tree_batch)) in views.iter().zip(&prepared.batches) {
                view.apply_batch(tree_batch)?;
                if fail {
                    return Err(TxError::Abort(StoreError::new(
                        StoreErrorKind::Injected,
                        "commit failure injected by a test",
                    )));
                }
            }
            Ok(())
        });
        match outcome {
            Ok(()) => {}
            Err(TransactionError::Abort(err)) => return Err(err),
            Err(TransactionError::Storage(err)) => return Err(err.into()),
        }
        if let Some(last) = prepared.receipt.records.last() {
            writer.head = Ok(ChainHead { seq: last.seq, hash: last.hash.clone() });
        }
        if let Err(err) = self.make_durable() {
            writer.poisoned = Some(err.to_string());
            return Err(err);
        }
        for (key, learned) in prepared.runs {
            writer.runs.learn(key, learned);
        }
        Ok(prepared.receipt)
    }

    fn make_durable(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|err| StoreError::from(err).context("flush failed"))?;
        if let Some(file) = &self.db_file {
            // fdatasync: the data and the metadata needed to read it back (the file size), not timestamps.
            file.sync_data().map_err(|err| StoreError::io("fsync of the database file failed", err))?;
        }
        Ok(())
    }

    // ---- policies ---------------------------------------------------------------------------------

    /// A policy of `owner` (`None`: global): the current version, or `version`.
    pub fn get_policy(
        &self,
        owner: Option<&TenantId>,
        id: &PolicyId,
        version: Option<u32>,
    ) -> Result<Option<Policy>, StoreError> {
        let version = match version {
            Some(v) => v,
            None => match self.policy_head(owner, id)? {
                Some(v) => v,
                None => return Ok(None),
            },
        };
        self.get_decoded(T::Policies, &keys::policy_version(owner, id, version))
    }

    /// The policy `id` as `tenant` sees it: its own, else a global one.
    pub fn find_policy(
        &self,
        tenant: &TenantId,
        id: &PolicyId,
        version: Option<u32>,
    ) -> Result<Option<Policy>, StoreError> {
        match self.get_policy(Some(tenant), id, version)? {
            Some(policy) => Ok(Some(policy)),
            None => self.get_policy(None, id, version),
        }
    }

    /// Every version of a policy, oldest first.
    pub fn policy_versions(&self, owner: Option<&TenantId>, id: &PolicyId) -> Result<Vec<Policy>, StoreError> {
        self.tree(T::Policies)
            .scan_prefix(keys::policy_prefix(owner, id))
            .map(|item| Policy::decode(&item?.1))
            .collect()
    }

    fn policy_head(&self, owner: Option<&TenantId>, id: &PolicyId) -> Result<Option<u32>, StoreError> {
        self.get_decoded(T::PolicyHeads, &keys::policy_prefix(owner, id))
    }

    /// The current versions of the policies `tenant` sees: global ones first, then its own, each by id;
    /// only those in `mode` when given.
    pub fn list_policies(
        &self,
        tenant: &TenantId,
        mode: Option<Mode>,
        page: &PageRequest,
    ) -> Result<Page<Policy>, StoreError> {
        let limit = page.checked_limit()?;
        let global = keys::owner_prefix(None);
        let own = keys::owner_prefix(Some(tenant));
        let cursor = match &page.cursor {
            None => None,
            Some(_) => match page.cursor_key(&global) {
                Ok(key) => key,
                Err(_) => page.cursor_key(&own)?,
            },
        };
        let heads = self.tree(T::PolicyHeads);
        let ranges = [global, own].into_iter().map(|prefix| {
            let start = match &cursor {
                Some(c) if c.as_slice() >= prefix.as_slice() => Bound::Excluded(c.clone()),
                _ => Bound::Included(prefix.clone()),
            };
            let end = prefix_end(&prefix).map_or(Bound::Unbounded, Bound::Excluded);
            heads.range::<Vec<u8>, _>((start, end))
        });
        let mut iter = ranges.flatten();
        collect_page(&mut iter, limit, |key, value| {
            let version = u32::decode(value)?;
            let mut policy_key = key.to_vec();
            policy_key.extend_from_slice(&version.to_be_bytes());
            let policy: Policy = self
                .get_decoded(T::Policies, &policy_key)?
                .ok_or_else(|| StoreError::corrupt("a policy head points at a missing version"))?;
            Ok(mode.is_none_or(|m| policy.mode == m).then_some(policy))
        })
    }

    /// A policy's activation audit, oldest first.
    pub fn policy_audit(
        &self,
        owner: Option<&TenantId>,
        id: &PolicyId,
        page: &PageRequest,
    ) -> Result<Page<AuditEntry>, StoreError> {
        self.page_prefix(T::Audit, &keys::policy_prefix(owner, id), page, |_, v| AuditEntry::decode(v).map(Some))
    }

    /// A policy's shadow statistics (zero when none were recorded).
    pub fn shadow_stats(&self, owner: Option<&TenantId>, id: &PolicyId) -> Result<ShadowStats, StoreError> {
        Ok(self.get_decoded(T::ShadowStatsTree, &keys::policy_prefix(owner, id))?.unwrap_or_default())
    }

    // ---- snapshots --------------------------------------------------------------------------------

    /// Loads and verifies the snapshot with `hash`: the stored canonical bytes must hash to it.
    pub fn load_snapshot(&self, hash: &SnapshotHash) -> Result<Snapshot, IntegrityError> {
        let key = match hex::decode(hash.as_str()) {
            Ok(key) => key,
            Err(err) => {
                return Err(IntegrityError::SnapshotUndecodable { hash: hash.clone(), reason: err.to_string() });
            }
        };
        match self.tree(T::Snapshots).get(&key) {
            Ok(Some(value)) => verify_snapshot(hash, &value),
            Ok(None) => Err(IntegrityError::SnapshotMissing { hash: hash.clone() }),
            Err(err) => Err(IntegrityError::SnapshotUndecodable { hash: hash.clone(), reason: err.to_string() }),
        }
    }

    /// The snapshot with exactly `id` (`snp_` and the first 32 hex digits of its hash): its hash and the
    /// verified snapshot, or `None` when no such snapshot exists. A shorter id names nothing: ids are not
    /// prefixes to search by.
    pub fn snapshot_by_id(&self, id: &SnapshotId) -> Result<Option<StoredSnapshot>, StoreError> {
        let Some(prefix) = snapshot_id_digest(id) else { return Ok(None) };
        match self.tree(T::Snapshots).scan_prefix(prefix).next() {
            None => Ok(None),
            Some(item) => {
                let (key, value) = item?;
                let hash = SnapshotHash::new(hex::encode(&key))
                    .map_err(|_| StoreError::corrupt("a snapshot key is not a hash"))?;
                let snapshot = verify_snapshot(&hash, &value);
                Ok(Some(StoredSnapshot { hash, snapshot }))
            }
        }
    }

    /// Whether one of `tenant`'s runs is bound to the snapshot with exactly `id`. One key lookup that
    /// reads nothing of the snapshot, so a tenant asking for another tenant's snapshot learns nothing from
    /// how long the answer takes.
    pub fn snapshot_bound_to(&self, tenant: &TenantId, id: &SnapshotId) -> Result<bool, StoreError> {
        let Some(digest) = snapshot_id_digest(id) else { return Ok(false) };
        Ok(self.tree(T::SnapshotBindings).contains_key(keys::snapshot_binding(tenant, &digest))?)
    }

    /// Fills the (tenant, snapshot) binding index from the stored runs when the store was written before
    /// the index existed (every run adds its binding, so an empty index beside runs means exactly that).
    /// The node calls it once after opening; offline tools do not, so that they never write.
    pub fn index_snapshot_bindings(&self) -> Result<(), StoreError> {
        let bindings = self.tree(T::SnapshotBindings);
        if !bindings.is_empty() || self.tree(T::Runs).is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for run in self.all_runs() {
            let run = run?;
            if let Some(digest) = snapshot_id_digest(&run.snapshot.id) {
                batch.insert(keys::snapshot_binding(&run.tenant_id, &digest), Vec::new());
            }
        }
        bindings.apply_batch(batch)?;
        bindings.flush()?;
        Ok(())
    }

    // ---- runs and ledger --------------------------------------------------------------------------

    /// A run of `tenant`.
    pub fn get_run(&self, tenant: &TenantId, run: &RunId) -> Result<Option<StoredRun>, StoreError> {
        self.get_decoded(T::Runs, &keys::run(tenant, run))
    }

    /// A tenant's runs, by run id.
    pub fn list_runs(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<StoredRun>, StoreError> {
        self.page_prefix(T::Runs, &keys::tenant(tenant), page, |_, v| StoredRun::decode(v).map(Some))
    }

    /// Every run whose status is `running`, across tenants (for expiry and rehydration).
    pub fn running_runs(&self) -> impl Iterator<Item = Result<StoredRun, StoreError>> + '_ {
        self.tree(T::RunsLive).iter().map(move |item| {
            let (key, _) = item?;
            self.get_decoded::<StoredRun>(T::Runs, &key)?
                .ok_or_else(|| StoreError::corrupt("the live-run index names a missing run"))
        })
    }

    /// Every run of every tenant, in key order (for exports).
    pub fn all_runs(&self) -> impl Iterator<Item = Result<StoredRun, StoreError>> + '_ {
        self.tree(T::Runs).iter().map(|item| StoredRun::decode(&item?.1))
    }

    /// A run's whole ledger, in order.
    pub fn full_ledger(&self, tenant: &TenantId, run: &RunId) -> Result<Vec<LedgerEntry>, StoreError> {
        self.tree(T::Ledger).scan_prefix(keys::run(tenant, run)).map(|item| LedgerEntry::decode(&item?.1)).collect()
    }

    /// A run's ledger, in order.
    pub fn ledger(&self, tenant: &TenantId, run: &RunId, page: &PageRequest) -> Result<Page<LedgerEntry>, StoreError> {
        self.page_prefix(T::Ledger, &keys::run(tenant, run), page, |_, v| LedgerEntry::decode(v).map(Some))
    }

    /// The last ledger entry of a run (the answer to an identical retry).
    pub fn last_ledger_entry(&self, tenant: &TenantId, run: &RunId) -> Result<Option<LedgerEntry>, StoreError> {
        match self.tree(T::Ledger).scan_prefix(keys::run(tenant, run)).next_back() {
            None => Ok(None),
            Some(item) => Ok(Some(LedgerEntry::decode(&item?.1)?)),
        }
    }

    /// Loads a run for rehydration, re-verifying its snapshot and checking its ledger against its totals.
    ///
    /// Integrity problems are reported in the [`LoadedRun`] (the node then fails closed); only a run that
    /// cannot be read at all is an `Err`.
    pub fn load_run(&self, tenant: &TenantId, run: &RunId) -> Result<Option<LoadedRun>, StoreError> {
        let Some(stored) = self.get_run(tenant, run)? else { return Ok(None) };
        let snapshot = self.load_snapshot(&stored.snapshot.hash);
        let mut ledger = Vec::new();
        let mut problem = None;
        for item in self.tree(T::Ledger).scan_prefix(keys::run(tenant, run)) {
            let (key, value) = item?;
            match LedgerEntry::decode(&value) {
                Ok(entry) => ledger.push(entry),
                Err(err) => {
                    problem = Some(IntegrityError::LedgerUndecodable {
                        position: keys::trailing_u64(&key).unwrap_or(0),
                        reason: err.message().to_owned(),
                    });
                    break;
                }
            }
        }
        if problem.is_none() {
            problem = check_ledger_totals(&stored, &ledger).err();
        }
        Ok(Some(LoadedRun {
            run: stored,
            snapshot,
            ledger,
            totals_consistent: problem.is_none(),
            ledger_problem: problem,
        }))
    }

    // ---- records ----------------------------------------------------------------------------------

    /// A record of `tenant` (another tenant's record is `None`).
    pub fn get_record(&self, tenant: &TenantId, id: &RecordId) -> Result<Option<PreventionRecord>, StoreError> {
        let Some(item) = self.tree(T::RecById).scan_prefix(keys::record_id_prefix(id)).next() else {
            return Ok(None);
        };
        let (key, _) = item?;
        let seq = keys::trailing_u64(&key).ok_or_else(|| StoreError::corrupt("a record index key is too short"))?;
        let record =
            self.record_at(seq)?.ok_or_else(|| StoreError::corrupt("a record index names a missing record"))?;
        Ok((&record.tenant_id == tenant).then_some(record))
    }

    /// The record at `seq`.
    pub fn record_at(&self, seq: u64) -> Result<Option<PreventionRecord>, StoreError> {
        self.get_decoded(T::Records, &keys::record(seq))
    }

    /// Lists a tenant's records (see [`RecordQuery`] for order and filters).
    pub fn list_records(&self, query: &RecordQuery) -> Result<Page<PreventionRecord>, StoreError> {
        let in_window = |r: &PreventionRecord| {
            query.since.is_none_or(|s| r.prevented_at >= s) && query.until.is_none_or(|u| r.prevented_at < u)
        };
        if let Some(run) = &query.run_id {
            let prefix = keys::records_of_run(&query.tenant, query.simulated, run);
            return self.page_prefix(T::RecByRun, &prefix, &query.page, |key, _| {
                let record = self.indexed_record(key)?;
                let keep = in_window(&record) && query.policy_id.as_ref().is_none_or(|p| &record.policy_id == p);
                Ok(keep.then_some(record))
            });
        }
        let (tree, prefix) = match &query.policy_id {
            Some(policy) => (T::RecByPolicy, keys::records_of_policy(&query.tenant, query.simulated, policy)),
            None => (T::RecByTenant, keys::records_of_tenant(&query.tenant, query.simulated)),
        };
        let lower = query.since.map(|s| keys::Key::new().time(s).into_vec());
        let upper = query.until.map(|u| keys::Key::new().time(u).into_vec());
        self.page_range(tree, &prefix, lower.as_deref(), upper.as_deref(), &query.page, |key, _| {
            self.indexed_record(key).map(Some)
        })
    }

    fn indexed_record(&self, index_key: &[u8]) -> Result<PreventionRecord, StoreError> {
        let seq =
            keys::trailing_u64(index_key).ok_or_else(|| StoreError::corrupt("a record index key is too short"))?;
        self.record_at(seq)?.ok_or_else(|| StoreError::corrupt(format!("a record index names missing seq {seq}")))
    }

    /// Every record from `from_seq` on, in chain order (for `runguard export`).
    pub fn export_records(&self, from_seq: u64) -> impl Iterator<Item = Result<PreventionRecord, StoreError>> + '_ {
        self.tree(T::Records)
            .range(keys::record(from_seq)..)
            .map(|item| item.map_err(StoreError::from).and_then(|(_, v)| PreventionRecord::decode(&v)))
    }

    // ---- learning loop ----------------------------------------------------------------------------

    /// An incident of `tenant`.
    pub fn get_incident(&self, tenant: &TenantId, id: &IncidentId) -> Result<Option<Incident>, StoreError> {
        self.get_decoded(T::Incidents, &keys::tenant_item(tenant, id.as_str()))
    }

    /// A tenant's incidents, oldest first.
    pub fn list_incidents(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Incident>, StoreError> {
        self.page_prefix(T::IncidentsByTime, &keys::tenant(tenant), page, |key, _| {
            let prefix_len = keys::tenant(tenant).len() + 8;
            let id = key.get(prefix_len..).and_then(|b| std::str::from_utf8(b).ok()).unwrap_or_default();
            self.get_decoded(T::Incidents, &keys::tenant_item(tenant, id))?
                .ok_or_else(|| StoreError::corrupt("the incident index names a missing incident"))
                .map(Some)
        })
    }

    /// A pattern of `tenant`.
    pub fn get_pattern(&self, tenant: &TenantId, id: &PatternId) -> Result<Option<Pattern>, StoreError> {
        self.get_decoded(T::Patterns, &keys::tenant_item(tenant, id.as_str()))
    }

    /// The pattern of `tenant` grouping (signature hash, error type).
    pub fn find_pattern(
        &self,
        tenant: &TenantId,
        signature: &SignatureHash,
        error_type: &str,
    ) -> Result<Option<Pattern>, StoreError> {
        let Some(id) =
            self.get_decoded::<String>(T::PatternsBySig, &keys::pattern_by_signature(tenant, signature, error_type))?
        else {
            return Ok(None);
        };
        self.get_decoded(T::Patterns, &keys::tenant_item(tenant, &id))
    }

    /// A tenant's patterns, by id.
    pub fn list_patterns(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Pattern>, StoreError> {
        self.page_prefix(T::Patterns, &keys::tenant(tenant), page, |_, v| Pattern::decode(v).map(Some))
    }

    /// The regret of a record, if any.
    pub fn get_regret(&self, record: &RecordId) -> Result<Option<Regret>, StoreError> {
        self.get_decoded(T::Regrets, &keys::regret(record))
    }

    /// The regrets of `tenant` on a policy's records made at or after `since`, oldest first.
    pub fn regrets_for_policy(
        &self,
        tenant: &TenantId,
        policy: &PolicyId,
        since: Option<Timestamp>,
    ) -> Result<Vec<Regret>, StoreError> {
        let prefix = keys::Key::new().seg(tenant.as_str()).seg(policy.as_str()).into_vec();
        let start = match since {
            Some(at) => keys::Key::new().seg(tenant.as_str()).seg(policy.as_str()).time(at).into_vec(),
            None => prefix.clone(),
        };
        let end = prefix_end(&prefix).map_or(Bound::Unbounded, Bound::Excluded);
        let mut out = Vec::new();
        for item in self.tree(T::RegretsByPolicy).range::<Vec<u8>, _>((Bound::Included(start), end)) {
            let (key, _) = item?;
            let id = key.get(prefix.len() + 8..).and_then(|b| std::str::from_utf8(b).ok()).unwrap_or_default();
            let regret = self
                .get_decoded::<Regret>(T::Regrets, &keys::Key::new().seg(id).into_vec())?
                .ok_or_else(|| StoreError::corrupt("the regret index names a missing regret"))?;
            out.push(regret);
        }
        Ok(out)
    }

    /// A tenant's current graduation state.
    pub fn graduation(&self, tenant: &TenantId) -> Result<Option<GraduationState>, StoreError> {
        self.get_decoded(T::Graduation, &keys::tenant(tenant))
    }

    /// Every graduation state a tenant went through, oldest first.
    pub fn graduation_history(
        &self,
        tenant: &TenantId,
        page: &PageRequest,
    ) -> Result<Page<GraduationState>, StoreError> {
        self.page_prefix(T::GraduationHistory, &keys::tenant(tenant), page, |_, v| GraduationState::decode(v).map(Some))
    }

    // ---- verification -----------------------------------------------------------------------------

    /// Walks every snapshot and the whole record chain (with its indexes) and reports the first break of
    /// each. Used by `runguard verify`; reads only.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        for item in self.tree(T::Snapshots).iter() {
            let (key, value) = item?;
            report.snapshots_checked += 1;
            let hex_key = hex::encode(&key);
            let hash =
                SnapshotHash::new(hex_key.clone()).map_err(|_| StoreError::corrupt("a snapshot key is not a hash"))?;
            if let Err(problem) = verify_snapshot(&hash, &value) {
                report.snapshot_break = Some(SnapshotBreak { id: SnapshotId::for_hash(&hash), problem });
                break;
            }
        }
        let mut prev = RecordHash::genesis();
        let mut next_seq = 1u64;
        for item in self.tree(T::Records).iter() {
            let (key, value) = item?;
            let key_seq = keys::trailing_u64(&key).unwrap_or(0);
            let record = match PreventionRecord::decode(&value) {
                Ok(record) => record,
                Err(err) => {
                    report.record_break =
                        Some(RecordBreak::Undecodable { seq: key_seq, reason: err.message().to_owned() });
                    break;
                }
            };
            if record.seq != key_seq {
                report.record_break = Some(RecordBreak::KeyMismatch { id: record.id, key: key_seq, found: record.seq });
                break;
            }
            match verify_chain_from(prev.clone(), next_seq, std::iter::once(&record)) {
                Ok(hash) => prev = hash,
                Err(chain) => {
                    report.record_break = Some(RecordBreak::Chain(chain));
                    break;
                }
            }
            if let Some(index) = self.missing_index(&record)? {
                report.record_break = Some(RecordBreak::IndexMissing { id: record.id, seq: record.seq, index });
                break;
            }
            report.records_checked += 1;
            next_seq = next_seq.saturating_add(1);
        }
        Ok(report)
    }

    fn missing_index(&self, r: &PreventionRecord) -> Result<Option<&'static str>, StoreError> {
        for (t, key) in record_index_keys(r) {
            if !self.tree(t).contains_key(key)? {
                return Ok(Some(TREE_NAMES[t as usize]));
            }
        }
        Ok(None)
    }

    // ---- helpers ----------------------------------------------------------------------------------

    fn get_decoded<V: Stored>(&self, t: T, key: &[u8]) -> Result<Option<V>, StoreError> {
        match self.tree(t).get(key)? {
            Some(value) => Ok(Some(V::decode(&value)?)),
            None => Ok(None),
        }
    }

    fn page_prefix<V>(
        &self,
        t: T,
        prefix: &[u8],
        page: &PageRequest,
        map: impl FnMut(&[u8], &[u8]) -> Result<Option<V>, StoreError>,
    ) -> Result<Page<V>, StoreError> {
        self.page_range(t, prefix, None, None, page, map)
    }

    /// A page over keys `prefix ‖ lower ..< prefix ‖ upper` (the whole prefix when unbounded), after the
    /// cursor.
    fn page_range<V>(
        &self,
        t: T,
        prefix: &[u8],
        lower: Option<&[u8]>,
        upper: Option<&[u8]>,
        page: &PageRequest,
        mut map: impl FnMut(&[u8], &[u8]) -> Result<Option<V>, StoreError>,
    ) -> Result<Page<V>, StoreError> {
        let limit = page.checked_limit()?;
        let cursor = page.cursor_key(prefix)?;
        let mut start_key = prefix.to_vec();
        start_key.extend_from_slice(lower.unwrap_or_default());
        let start = match cursor {
            Some(c) if c >= start_key => Bound::Excluded(c),
            _ => Bound::Included(start_key),
        };
        let end = match upper {
            Some(upper) => {
                let mut end = prefix.to_vec();
                end.extend_from_slice(upper);
                Bound::Excluded(end)
            }
            None => prefix_end(prefix).map_or(Bound::Unbounded, Bound::Excluded),
        };
        if let (Bound::Excluded(s) | Bound::Included(s), Bound::Excluded(e)) = (&start, &end)
            && s >= e
        {
            return Ok(Page::empty());
        }
        let mut iter = self.tree(t).range::<Vec<u8>, _>((start, end));
        collect_page(&mut iter, limit, |k, v| map(k, v))
    }
}

/// How long `open` waits for the directory lock: sled's background threads release it shortly after the
/// previous `Db` of this process is dropped.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn open_db(dir: &Path, options: &StoreOptions) -> Result<sled::Db, StoreError> {
    let started = std::time::Instant::now();
    loop {
        match sled::Config::new().path(dir).cache_capacity(options.cache_capacity_bytes).open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(err)) if err.to_string().contains("could not acquire lock") => {
                if started.elapsed() >= LOCK_WAIT {
                    return Err(StoreError::io(
                        format!("the store in `{}` is locked by another process", dir.display()),
                        err,
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(err) => {
                return Err(StoreError::from(err).context(format!("cannot open the store in `{}`", dir.display())));
            }
        }
    }
}

/// Reads matches from `iter` until `limit` are found, then looks for one more to decide `next_cursor`.
fn collect_page<V>(
    iter: &mut dyn Iterator<Item = sled::Result<(IVec, IVec)>>,
    limit: usize,
    mut map: impl FnMut(&[u8], &[u8]) -> Result<Option<V>, StoreError>,
) -> Result<Page<V>, StoreError> {
    let mut items = Vec::new();
    let mut last_key: Option<IVec> = None;
    for item in iter {
        let (key, value) = item?;
        if let Some(v) = map(&key, &value)? {
            if items.len() == limit {
                let cursor = last_key.map(|k| hex::encode(&k));
                return Ok(Page { items, next_cursor: cursor });
            }
            items.push(v);
            last_key = Some(key);
        }
    }
    Ok(Page { items, next_cursor: None })
}

/// The 16 hash bytes a snapshot id names, when it is exactly `snp_` and 32 hex digits.
fn snapshot_id_digest(id: &SnapshotId) -> Option<Vec<u8>> {
    let hex_digits = id.as_str().strip_prefix(SnapshotId::PREFIX)?;
    if hex_digits.len() != SnapshotHash::HEX_LEN / 2 {
        return None;
    }
    hex::decode(hex_digits).ok()
}

fn verify_snapshot(hash: &SnapshotHash, value: &[u8]) -> Result<Snapshot, IntegrityError> {
    let undecodable = |reason: String| IntegrityError::SnapshotUndecodable { hash: hash.clone(), reason };
    let bytes = codec::decode_raw("snapshot", value).map_err(|err| undecodable(err.message().to_owned()))?;
    let actual = SnapshotHash::from_bytes(&domain_hash(SNAPSHOT_DOMAIN, bytes));
    if &actual != hash {
        return Err(IntegrityError::SnapshotHashMismatch { expected: hash.clone(), actual });
    }
    let snapshot: Snapshot = serde_json::from_slice(bytes).map_err(|err| undecodable(err.to_string()))?;
    if !snapshot.verify(hash) {
        return Err(undecodable("the decoded snapshot does not re-encode to its hash".to_owned()));
    }
    Ok(snapshot)
}

/// Checks a run's ledger against its stored totals: the totals after the last entry are the run's, each
/// post adds exactly its usage (a throttled call adds nothing), and steps grow by at most one per post.
fn check_ledger_totals(run: &StoredRun, ledger: &[LedgerEntry]) -> Result<(), IntegrityError> {
    let mismatch = |reason: String| Err(IntegrityError::TotalsMismatch { reason });
    let mut before = runguard_contract::Totals::default();
    for (i, entry) in ledger.iter().enumerate() {
        let expected_position = u64::try_from(i).unwrap_or(u64::MAX);
        if entry.position != expected_position {
            return mismatch(format!("entry {i} carries position {}", entry.position));
        }
        let after = entry.totals_after;
        let throttled = entry.decision.action == runguard_contract::Action::Throttle;
        let (usage, is_post) = match &entry.call {
            LedgerCall::Step(call) if call.phase == runguard_contract::Phase::Post => {
                (call.usage.unwrap_or_default(), true)
            }
            _ => (runguard_contract::Usage::default(), false),
        };
        let (add_tokens, add_cost, add_ms) =
            if is_post && !throttled { (usage.tokens, usage.cost_micros, usage.duration_ms) } else { (0, 0, 0) };
        let steps_delta = after.steps.checked_sub(before.steps);
        let consistent = after.tokens == before.tokens.saturating_add(add_tokens)
            && after.cost_micros == before.cost_micros.saturating_add(add_cost)
            && after.duration_ms == before.duration_ms.saturating_add(add_ms)
            && match steps_delta {
                Some(0) => true,
                Some(1) => is_post && !throttled,
                _ => false,
            };
        if !consistent {
            return mismatch(format!("entry {i} moves totals from {before:?} to {after:?}"));
        }
        before = after;
    }
    if before != run.totals {
        return mismatch(format!("the ledger sums to {before:?}, the run stores {:?}", run.totals));
    }
    Ok(())
}

/// The index entries of a record.
fn record_index_keys(r: &PreventionRecord) -> [(T, Vec<u8>); 4] {
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

/// Checks and stages one batch without writing: every read happens here, under the writer lock.
struct Prepare<'a> {
    store: &'a Store,
    cache: &'a RunCache,
    batches: Vec<Option<Batch>>,
    head: Result<ChainHead, StoreError>,
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
    /// The batch of each tree the commit writes, by tree index; untouched trees are left out of the
    /// transaction (sled's transaction costs something per tree it spans).
    batches: Vec<(usize, Batch)>,
    receipt: CommitReceipt,
    /// What the commit establishes about the runs it writes, for the writer's cache once it succeeded.
    runs: HashMap<Vec<u8>, CachedRun>,
}

impl<'a> Prepare<'a> {
    fn new(store: &'a Store, cache: &'a RunCache, head: Result<ChainHead, StoreError>) -> Self {
        Self {
            store,
            cache,
            batches: TREE_NAMES.iter().map(|_| None).collect(),
            head,
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

    fn tree_batch(&mut self, t: T) -> &mut Batch {
        self.batches[t as usize].get_or_insert_with(Batch::default)
    }

    fn put(&mut self, t: T, key: Vec<u8>, value: Vec<u8>) {
        self.tree_batch(t).insert(key, value);
    }

    fn remove(&mut self, t: T, key: Vec<u8>) {
        self.tree_batch(t).remove(key);
    }

    fn run(mut self, batch: &WriteBatch) -> Result<Prepared, StoreError> {
        // Snapshots and run bindings first, so that a run, its ledger and its records may share a batch in
        // any order.
        for op in batch.ops() {
            match op {
                WriteOp::PutSnapshot(snapshot) => self.put_snapshot(snapshot)?,
                WriteOp::PutRun(run) => self.bind_run(run)?,
                _ => {}
            }
        }
        for (i, op) in batch.ops().iter().enumerate() {
            self.apply(op).map_err(|err| err.context(format!("write {i} of the batch")))?;
        }
        self.receipt.ops = batch.len();
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
        let batches = self.batches.into_iter().enumerate().filter_map(|(t, b)| b.map(|b| (t, b))).collect();
        Ok(Prepared { batches, receipt: self.receipt, runs })
    }

    fn apply(&mut self, op: &WriteOp) -> Result<(), StoreError> {
        match op {
            WriteOp::PutPolicyVersion(policy) => self.put_policy(policy),
            WriteOp::AppendAudit { tenant, entry } => self.append_audit(tenant.as_ref(), entry),
            WriteOp::PutSnapshot(_) => Ok(()),
            WriteOp::PutRun(run) => self.put_run(run),
            WriteOp::AppendLedger { tenant_id, run_id, entry } => self.append_ledger(tenant_id, run_id, entry),
            WriteOp::AppendRecord(append) => self.append_record(append),
            WriteOp::AddShadowStats { tenant, policy_id, delta } => self.add_shadow(tenant.as_ref(), policy_id, *delta),
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
        match self.store.tree(t).scan_prefix(prefix).next_back() {
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
        Ok(self.store.tree(T::Snapshots).contains_key(key)?)
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
            || self.store.tree(T::RecById).scan_prefix(keys::record_id_prefix(&record.id)).next().is_some();
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
        policy: &PolicyId,
        delta: ShadowStats,
    ) -> Result<(), StoreError> {
        let key = keys::policy_prefix(owner, policy);
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
        if self.incidents.contains(&key) || self.store.tree(T::Incidents).contains_key(&key)? {
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
            None => self.store.get_record(tenant, &regret.record_id)?.map(|r| (r.tenant_id, r.policy_id)),
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
        if self.regrets.contains(&regret.record_id) || self.store.tree(T::Regrets).contains_key(&key)? {
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

impl StoreError {
    /// The same error with `context` in front of its message.
    pub fn context(mut self, context: impl std::fmt::Display) -> Self {
        self.prepend(context.to_string());
        self
    }
}
