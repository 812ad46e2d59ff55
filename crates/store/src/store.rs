//! The sled-backed store: opening and recovery, group commit, queries and verification.
//!
//! Every sled call of the crate is in this file; another backend replaces this file behind the same
//! [`Store`] facade.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use runguard_contract::canonical::{SNAPSHOT_DOMAIN, canonical_json, domain_hash};
use runguard_contract::prevention::check_record_against_decision;
use runguard_contract::record::verify_chain_from;
use runguard_contract::{
    AuditEntry, Decision, Incident, IncidentId, Mode, Pattern, PatternId, Policy, PolicyId, PreventionRecord,
    RecordHash, RecordId, Regret, RunId, RunStatus, Scope, SignatureHash, Snapshot, SnapshotHash, SnapshotId, TenantId,
    Timestamp,
};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{IVec, Transactional, Tree};

use crate::batch::{CommitReceipt, RecordAppend, RecordAuthority, WriteBatch, WriteOp};
use crate::codec::{self, Stored};
use crate::error::{StoreError, StoreErrorKind};
use crate::integrity::{IntegrityError, LoadedRun, RecordBreak, SnapshotBreak, StoredSnapshot, VerifyReport};
use crate::keys;
use crate::model::{GraduationState, LedgerCall, LedgerEntry, ShadowStats, StoredRun};
use crate::query::{Page, PageRequest, RecordQuery, prefix_end};
use crate::run_cache::{CachedRun, RunCache};
use crate::watermark::{self, Watermark};

/// The schema this build reads and writes, kept in the `meta` tree.
pub const SCHEMA_VERSION: u32 = 1;

const META_SCHEMA: &[u8] = b"schema_version";
/// The number of commits made so far, bumped inside every commit's own transaction.
const META_COMMITS: &[u8] = b"commits";

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

/// One open sled database with its trees. Replaced as a whole when the store reopens itself after a
/// write failure (sled keeps an I/O error for the life of a `Db`, so only a new one can write again).
struct Engine {
    db: sled::Db,
    trees: Vec<Tree>,
    db_file: Option<File>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

impl Engine {
    fn open(dir: &Path, options: &StoreOptions) -> Result<Self, StoreError> {
        let db = open_db(dir, options)?;
        let trees = TREE_NAMES.iter().map(|name| db.open_tree(name)).collect::<Result<Vec<Tree>, _>>()?;
        let db_file = if options.fsync { Some(File::open(dir.join("db"))?) } else { None };
        Ok(Self { db, trees, db_file })
    }

    fn tree(&self, t: T) -> &Tree {
        // `trees` is built from TREE_NAMES, which the enum mirrors one to one.
        &self.trees[t as usize]
    }

    fn make_durable(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|err| StoreError::from(err).context("flush failed"))?;
        if let Some(file) = &self.db_file {
            // fdatasync: the data and the metadata needed to read it back (the file size), not timestamps.
            file.sync_data().map_err(|err| StoreError::io("fsync of the database file failed", err))?;
        }
        Ok(())
    }

    fn commits(&self) -> Result<Option<u64>, StoreError> {
        self.tree(T::Meta).get(META_COMMITS)?.map(|bytes| u64::decode(&bytes)).transpose()
    }

    fn head(&self) -> Result<ChainHead, StoreError> {
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

    /// Writes back the values a failed commit replaced, in one transaction.
    fn undo(&self, undo: &Undo) -> Result<(), StoreError> {
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

/// For each tree a failed commit wrote: every key it wrote with the value it had before.
type Undo = Vec<(usize, Vec<(Vec<u8>, Option<IVec>)>)>;

/// A commit whose transaction applied in memory but whose flush or fsync failed: it was refused, so its
/// writes must not be seen or survive. The store reopens itself from disk and writes `undo` back
/// (durably) before it serves again.
#[derive(Debug)]
struct Failure {
    undo: Undo,
}

#[derive(Debug)]
struct WriterState {
    /// The chain head recovered at open and advanced by each durable commit; an error when the last record
    /// does not decode (then no record can be appended until the store is repaired).
    head: Result<ChainHead, StoreError>,
    /// Commits made durable: the `commits` counter of the meta tree.
    commits: u64,
    /// The commit count the watermark file holds.
    watermarked: u64,
    /// Set when a commit's transaction applied but its flush or fsync failed.
    failure: Option<Failure>,
    /// Recently written runs, so that their next commit need not read them back.
    runs: RunCache,
}

/// What the acknowledgement check at open does with a store behind its watermark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Acknowledged {
    /// Refuse to open (serving).
    Enforce,
    /// Open anyway and report it (`verify`, on a copy).
    Report,
}

/// The runguard store: one sled database holding every tree, written only through [`Store::commit`] and
/// [`Store::commit_each`].
///
/// Reads may run on any thread concurrently with a commit; commits are serialised by an internal lock.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    options: StoreOptions,
    /// `None` while the store reopens itself after a write failure: reads then fail (503) rather than
    /// show writes that were refused.
    engine: RwLock<Option<Arc<Engine>>>,
    writer: Mutex<WriterState>,
    /// Whether the latest commit attempt (or readiness probe) could write.
    healthy: AtomicBool,
    inject_failure: AtomicBool,
    inject_durability_failure: AtomicBool,
    commit_delay_ms: AtomicU64,
    policy_generation: AtomicU64,
    /// What the acknowledgement check found (only with [`Acknowledged::Report`]).
    lost: Option<String>,
}

type TxError = ConflictableTransactionError<StoreError>;

/// What one caller's batch of a [`Store::commit_each`] got.
pub type CommitOutcome = Result<CommitReceipt, StoreError>;

impl Store {
    /// Opens (creating if needed) the store in `dir`, checks the schema version, checks that the store
    /// holds everything its acknowledgement watermark says was acknowledged, and recovers the chain head.
    ///
    /// A store that recovered to an earlier state than it acknowledged is refused (`Corrupt`, naming
    /// what is missing) and never re-initialised.
    pub fn open(dir: impl AsRef<Path>, options: &StoreOptions) -> Result<Self, StoreError> {
        Self::open_with(dir.as_ref(), dir.as_ref(), options, Acknowledged::Enforce)
    }

    /// Opens the store in `dir`, naming it `shown` in messages (the original of a copy).
    fn open_with(dir: &Path, shown: &Path, options: &StoreOptions, check: Acknowledged) -> Result<Self, StoreError> {
        let dir = dir.to_path_buf();
        let mark = watermark::read(&dir);
        let engine = Engine::open(&dir, options)?;
        let mut lost = None;
        let mark = match mark {
            Ok(mark) => mark,
            Err(err) if check == Acknowledged::Report => {
                lost = Some(err.message().to_owned());
                None
            }
            Err(err) => return Err(err),
        };
        let fresh = check_schema(&engine, shown)?;
        let commits = engine.commits()?;
        let head = engine.head();
        if let Some(problem) = acknowledged_problem(&engine, fresh, commits, head.as_ref().ok(), mark.as_ref())? {
            let problem = format!("the store in `{}` {problem}", shown.display());
            match check {
                Acknowledged::Enforce => return Err(StoreError::corrupt(problem)),
                Acknowledged::Report => lost = lost.or(Some(problem)),
            }
        }
        let commits = commits.unwrap_or(0);
        if fresh && lost.is_none() {
            engine.tree(T::Meta).insert(META_SCHEMA, SCHEMA_VERSION.encode()?)?;
            engine.make_durable()?;
        }
        let store = Self {
            dir,
            options: options.clone(),
            engine: RwLock::new(Some(Arc::new(engine))),
            writer: Mutex::new(WriterState {
                head,
                commits,
                watermarked: u64::MAX,
                failure: None,
                runs: RunCache::default(),
            }),
            healthy: AtomicBool::new(true),
            inject_failure: AtomicBool::new(false),
            inject_durability_failure: AtomicBool::new(false),
            commit_delay_ms: AtomicU64::new(0),
            policy_generation: AtomicU64::new(0),
            lost,
        };
        if check == Acknowledged::Enforce {
            // The store holds at least what was acknowledged: from now on it is the new baseline.
            store.sync_watermark()?;
        }
        Ok(store)
    }

    /// Verifies the store in `dir` without changing it: the directory is copied (under sled's lock, so
    /// that no node writes it meanwhile) into a temporary directory beside nothing else, and the copy is
    /// opened and walked. Finds a store behind its acknowledgement watermark, a store too damaged to open
    /// (both reported in [`VerifyReport::lost`]), and every break [`Store::verify`] finds.
    ///
    /// Errors only when the directory cannot be read or copied, or another process holds the store.
    pub fn verify_dir(dir: impl AsRef<Path>, options: &StoreOptions) -> Result<VerifyReport, StoreError> {
        let dir = dir.as_ref();
        let copy = crate::offline::locked_copy(dir)?;
        let opened = std::panic::catch_unwind(|| Self::open_with(copy.path(), dir, options, Acknowledged::Report));
        let store = match opened {
            Ok(Ok(store)) => store,
            Ok(Err(err)) if err.kind() == StoreErrorKind::Io && crate::offline::is_lock_error(&err) => return Err(err),
            Ok(Err(err)) => {
                // Name the original, not the copy.
                let why = err.to_string().replace(&copy.path().display().to_string(), &dir.display().to_string());
                return Ok(VerifyReport {
                    lost: Some(format!("the store cannot be opened: {why}")),
                    ..Default::default()
                });
            }
            Err(_) => {
                return Ok(VerifyReport {
                    lost: Some("the store cannot be opened: the database engine panicked on its files".to_owned()),
                    ..Default::default()
                });
            }
        };
        let mut report = store.verify().unwrap_or_else(|err| VerifyReport {
            lost: Some(format!("the store cannot be read: {err}")),
            ..VerifyReport::default()
        });
        report.lost = report.lost.or_else(|| store.lost.clone());
        Ok(report)
    }

    /// The directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A tree by name, for tests that corrupt stored bytes on purpose.
    #[cfg(test)]
    pub(crate) fn raw_tree(&self, name: &str) -> Tree {
        let index = TREE_NAMES.iter().position(|n| *n == name).unwrap_or(0);
        self.engine().map(|e| e.trees[index].clone()).unwrap_or_else(|_| unreachable!("the engine is open"))
    }

    fn engine(&self) -> Result<Arc<Engine>, StoreError> {
        let engine = self.engine.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        engine.clone().ok_or_else(|| {
            StoreError::new(StoreErrorKind::Io, "the store is recovering from a write failure and cannot be read")
        })
    }

    fn tree(&self, t: T) -> Result<Tree, StoreError> {
        Ok(self.engine()?.tree(t).clone())
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

    /// Makes every flush fail after the commit's transaction applied, until turned off: the test stand-in
    /// for a full or read-only disk (which a test running as root cannot arrange with permissions).
    pub fn inject_durability_failure(&self, fail: bool) {
        self.inject_durability_failure.store(fail, Ordering::SeqCst);
    }

    /// Makes every commit wait this long (under the writer lock) before its transaction: a test hook for
    /// commits that outlive their callers' timeout. Zero turns it off.
    pub fn inject_commit_delay(&self, delay: Duration) {
        self.commit_delay_ms.store(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// Whether the latest commit attempt (or [`Store::probe`]) could write: readiness.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
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

    /// Commits made durable so far (the counter the acknowledgement watermark is checked against).
    pub fn commit_count(&self) -> u64 {
        self.writer().commits
    }

    /// Rewrites the acknowledgement watermark if commits were made durable since it was last written. The
    /// node calls it about once a second and at a graceful stop; the check at open lags by that much.
    pub fn sync_watermark(&self) -> Result<(), StoreError> {
        let mut writer = self.writer();
        if writer.failure.is_some() || writer.commits == writer.watermarked {
            return Ok(());
        }
        let Ok(head) = writer.head.clone() else { return Ok(()) };
        let mark = Watermark { commits: writer.commits, record_seq: head.seq, record_hash: head.hash };
        watermark::write(&self.dir, &mark)?;
        writer.watermarked = mark.commits;
        Ok(())
    }

    /// Checks that the store can write (recovering it from an earlier write failure first): the
    /// readiness probe, run while the store is unhealthy. Sets readiness either way.
    pub fn probe(&self) -> Result<(), StoreError> {
        let mut writer = self.writer();
        let result = self.recover_locked(&mut writer).and_then(|engine| {
            if self.inject_failure.load(Ordering::SeqCst) {
                return Err(StoreError::new(StoreErrorKind::Injected, "commit failure injected by a test"));
            }
            self.durable(&engine)
        });
        self.healthy.store(result.is_ok(), Ordering::SeqCst);
        result
    }

    fn durable(&self, engine: &Engine) -> Result<(), StoreError> {
        if self.inject_durability_failure.load(Ordering::SeqCst) {
            return Err(StoreError::new(StoreErrorKind::Injected, "flush failure injected by a test"));
        }
        engine.make_durable()
    }

    /// After a write failure: reopens sled from disk, writes back what the failed commit replaced, makes
    /// that durable and checks the store still holds every acknowledged commit. Until it succeeds, reads
    /// and commits fail.
    fn recover_locked(&self, writer: &mut WriterState) -> Result<Arc<Engine>, StoreError> {
        let Some(failure) = &writer.failure else { return self.engine() };
        // Every handle to the old database must go before sled lets the directory be opened again.
        *self.engine.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        let engine = Arc::new(Engine::open(&self.dir, &self.options)?);
        engine.undo(&failure.undo)?;
        let commits = engine.commits()?.unwrap_or(0);
        if commits != writer.commits {
            return Err(StoreError::corrupt(format!(
                "after reopening, the store holds {commits} commits; {} were acknowledged",
                writer.commits
            )));
        }
        let head = engine.head();
        // The store now shows exactly what was acknowledged: reads may go on even if it cannot write yet.
        *self.engine.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::clone(&engine));
        self.durable(&engine)?;
        writer.failure = None;
        writer.head = head;
        Ok(engine)
    }

    // ---- group commit -----------------------------------------------------------------------------

    /// Makes every write of `batch` durable together: checks them, assigns record sequence numbers and
    /// ledger positions, applies everything in one multi-tree transaction, then flushes and fsyncs. On any
    /// error nothing of the batch is written.
    pub fn commit(&self, batch: WriteBatch) -> Result<CommitReceipt, StoreError> {
        if batch.is_empty() {
            return Ok(CommitReceipt::default());
        }
        self.commit_each(vec![batch]).pop().unwrap_or_else(|| Ok(CommitReceipt::default()))
    }

    /// Group commit of several callers' batches in one transaction, flush and fsync, failing only the
    /// callers whose own writes are refused (SPEC §12.8): each batch is checked against the state the
    /// earlier ones leave; a refused one is dropped and the others are checked again without it. A store
    /// that cannot write fails every caller with the same (I/O) error. Answers one outcome per batch, in
    /// order.
    pub fn commit_each(&self, batches: Vec<WriteBatch>) -> Vec<CommitOutcome> {
        let mut outcomes: Vec<Option<CommitOutcome>> = batches.iter().map(|_| None).collect();
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
    fn commit_locked(
        &self,
        writer: &mut WriterState,
        batches: &[WriteBatch],
        outcomes: &mut [Option<CommitOutcome>],
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

    fn attempt_locked(
        &self,
        writer: &mut WriterState,
        batches: &[WriteBatch],
        outcomes: &mut [Option<CommitOutcome>],
    ) -> Result<(), StoreError> {
        let engine = self.recover_locked(writer)?;
        let prepared = loop {
            let included: Vec<usize> = (0..batches.len()).filter(|i| outcomes[*i].is_none()).collect();
            if included.is_empty() {
                return Ok(());
            }
            let chosen: Vec<&WriteBatch> = included.iter().map(|i| &batches[*i]).collect();
            match Prepare::new(self, &engine, &writer.runs, writer.head.clone(), writer.commits).run(&chosen) {
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

    fn fail_locked(&self, writer: &mut WriterState, undo: Undo) {
        writer.failure = Some(Failure { undo });
        // What the cache learned may include the refused commit; the store is read again once recovered.
        writer.runs = RunCache::default();
        *self.engine.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
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
        self.tree(T::Policies)?
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
        let heads = self.tree(T::PolicyHeads)?;
        let ranges = [global.clone(), own.clone()].into_iter().map(|prefix| {
            let start = match &cursor {
                Some(c) if c.as_slice() >= prefix.as_slice() => Bound::Excluded(c.clone()),
                _ => Bound::Included(prefix.clone()),
            };
            let end = prefix_end(&prefix).map_or(Bound::Unbounded, Bound::Excluded);
            heads.range::<Vec<u8>, _>((start, end))
        });
        let mut iter = ranges.flatten();
        collect_page(&mut iter, limit, |key, value| {
            // One id names one policy in a tenant's view (SPEC §12.1). Creation refuses collisions; a store
            // written before that may hold a global policy and a tenant policy with one id, and then the
            // tenant's own wins here as in `find_policy`, so that snapshots never hold both.
            if let Some(id_segment) = key.strip_prefix(global.as_slice()) {
                let mut own_key = own.clone();
                own_key.extend_from_slice(id_segment);
                if heads.contains_key(own_key)? {
                    return Ok(None);
                }
            }
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

    /// A policy's shadow statistics as `tenant` sees them (zero when none were recorded): a tenant policy's
    /// own, a global policy's from `tenant`'s runs only.
    pub fn shadow_stats(
        &self,
        owner: Option<&TenantId>,
        id: &PolicyId,
        tenant: &TenantId,
    ) -> Result<ShadowStats, StoreError> {
        Ok(self.get_decoded(T::ShadowStatsTree, &keys::shadow_stats(owner, id, tenant))?.unwrap_or_default())
    }

    /// Whether any tenant has a policy with this id (a global policy may not take it, SPEC §12.1).
    ///
    /// Reads every policy head: creating a global policy is rare and done by an admin.
    pub fn tenant_policy_id_exists(&self, id: &PolicyId) -> Result<bool, StoreError> {
        tenant_heads_hold(self.tree(T::PolicyHeads)?.iter().keys(), id)
    }

    /// A policy's audit entries made at or after `since`, oldest first. Entries are appended in time
    /// order, so the audit is read backwards from its end and only as far as `since`.
    pub fn policy_audit_since(
        &self,
        owner: Option<&TenantId>,
        id: &PolicyId,
        since: Timestamp,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree(T::Audit)?.scan_prefix(keys::policy_prefix(owner, id)).rev() {
            let entry = AuditEntry::decode(&item?.1)?;
            if entry.at < since {
                break;
            }
            out.push(entry);
        }
        out.reverse();
        Ok(out)
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
        match self.tree(T::Snapshots).and_then(|tree| Ok(tree.get(&key)?)) {
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
        match self.tree(T::Snapshots)?.scan_prefix(prefix).next() {
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
        Ok(self.tree(T::SnapshotBindings)?.contains_key(keys::snapshot_binding(tenant, &digest))?)
    }

    /// Fills the (tenant, snapshot) binding index from the stored runs when the store was written before
    /// the index existed (every run adds its binding, so an empty index beside runs means exactly that).
    /// The node calls it once after opening; offline tools do not, so that they never write.
    pub fn index_snapshot_bindings(&self) -> Result<(), StoreError> {
        let bindings = self.tree(T::SnapshotBindings)?;
        if !bindings.is_empty() || self.tree(T::Runs)?.is_empty() {
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
        self.items_from(T::RunsLive, Vec::new()).map(move |item| {
            let (key, _) = item?;
            self.get_decoded::<StoredRun>(T::Runs, &key)?
                .ok_or_else(|| StoreError::corrupt("the live-run index names a missing run"))
        })
    }

    /// Every run of every tenant, in key order (for exports).
    pub fn all_runs(&self) -> impl Iterator<Item = Result<StoredRun, StoreError>> + '_ {
        self.items_from(T::Runs, Vec::new()).map(|item| StoredRun::decode(&item?.1))
    }

    /// A run's whole ledger, in order.
    pub fn full_ledger(&self, tenant: &TenantId, run: &RunId) -> Result<Vec<LedgerEntry>, StoreError> {
        self.tree(T::Ledger)?.scan_prefix(keys::run(tenant, run)).map(|item| LedgerEntry::decode(&item?.1)).collect()
    }

    /// A run's ledger, in order.
    pub fn ledger(&self, tenant: &TenantId, run: &RunId, page: &PageRequest) -> Result<Page<LedgerEntry>, StoreError> {
        self.page_prefix(T::Ledger, &keys::run(tenant, run), page, |_, v| LedgerEntry::decode(v).map(Some))
    }

    /// The last ledger entry of a run (the answer to an identical retry).
    pub fn last_ledger_entry(&self, tenant: &TenantId, run: &RunId) -> Result<Option<LedgerEntry>, StoreError> {
        match self.tree(T::Ledger)?.scan_prefix(keys::run(tenant, run)).next_back() {
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
        for item in self.tree(T::Ledger)?.scan_prefix(keys::run(tenant, run)) {
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
        let Some(item) = self.tree(T::RecById)?.scan_prefix(keys::record_id_prefix(id)).next() else {
            return Ok(None);
        };
        let (key, _) = item?;
        let seq = keys::trailing_u64(&key).ok_or_else(|| StoreError::corrupt("a record index key is too short"))?;
        let record =
            self.record_at(seq)?.ok_or_else(|| StoreError::corrupt("a record index names a missing record"))?;
        Ok((&record.tenant_id == tenant).then_some(record))
    }

    /// The decision a live record was written for, from its run's ledger (`None` when the ledger does not
    /// hold it). The blocking decision is almost always the run's last entry, since a block stops the run.
    pub fn record_decision(&self, record: &PreventionRecord) -> Result<Option<Decision>, StoreError> {
        let prefix = keys::run(&record.tenant_id, &record.run_id);
        for item in self.tree(T::Ledger)?.scan_prefix(prefix).rev() {
            let entry = LedgerEntry::decode(&item?.1)?;
            if entry.decision.decision_id == record.decision_id {
                return Ok(Some(entry.decision));
            }
        }
        Ok(None)
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
        self.items_from(T::Records, keys::record(from_seq)).map(|item| PreventionRecord::decode(&item?.1))
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

    /// A tenant's incidents created at or after `since`, oldest first: a range of the time index, so the
    /// cost follows the incidents in the window, not every incident ever stored.
    pub fn incidents_since(&self, tenant: &TenantId, since: Timestamp) -> Result<Vec<Incident>, StoreError> {
        let prefix = keys::tenant(tenant);
        let end = prefix_end(&prefix).map_or(Bound::Unbounded, Bound::Excluded);
        let start = Bound::Included(keys::incidents_from(tenant, since));
        let mut out = Vec::new();
        for item in self.tree(T::IncidentsByTime)?.range::<Vec<u8>, _>((start, end)) {
            let (key, _) = item?;
            let id = key.get(prefix.len() + 8..).and_then(|b| std::str::from_utf8(b).ok()).unwrap_or_default();
            let incident = self
                .get_decoded(T::Incidents, &keys::tenant_item(tenant, id))?
                .ok_or_else(|| StoreError::corrupt("the incident index names a missing incident"))?;
            out.push(incident);
        }
        Ok(out)
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
        for item in self.tree(T::RegretsByPolicy)?.range::<Vec<u8>, _>((Bound::Included(start), end)) {
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
        for item in self.tree(T::Snapshots)?.iter() {
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
        for item in self.tree(T::Records)?.iter() {
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
            if !self.tree(t)?.contains_key(key)? {
                return Ok(Some(TREE_NAMES[t as usize]));
            }
        }
        Ok(None)
    }

    // ---- helpers ----------------------------------------------------------------------------------

    /// Every entry of a tree from key `from` on; a store that cannot be read yields one error.
    fn items_from(&self, t: T, from: Vec<u8>) -> impl Iterator<Item = Result<(IVec, IVec), StoreError>> + use<> {
        let (tree, unreadable) = match self.tree(t) {
            Ok(tree) => (Some(tree), None),
            Err(err) => (None, Some(err)),
        };
        unreadable
            .map(Err)
            .into_iter()
            .chain(tree.into_iter().flat_map(move |tree| tree.range(from.clone()..)).map(|item| Ok(item?)))
    }

    fn get_decoded<V: Stored>(&self, t: T, key: &[u8]) -> Result<Option<V>, StoreError> {
        match self.tree(t)?.get(key)? {
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
        let mut iter = self.tree(t)?.range::<Vec<u8>, _>((start, end));
        collect_page(&mut iter, limit, |k, v| map(k, v))
    }
}

/// Checks the schema version; answers whether the store is fresh (no schema version and no data), which
/// the caller initialises only once it knows nothing acknowledged is missing.
fn check_schema(engine: &Engine, dir: &Path) -> Result<bool, StoreError> {
    match engine.tree(T::Meta).get(META_SCHEMA)? {
        Some(bytes) => {
            let version = u32::decode(&bytes)?;
            if version != SCHEMA_VERSION {
                return Err(StoreError::new(
                    StoreErrorKind::Schema,
                    format!(
                        "the store in `{}` has schema version {version}; this build reads version {SCHEMA_VERSION}",
                        dir.display()
                    ),
                ));
            }
            Ok(false)
        }
        None => {
            let populated = engine.trees.iter().skip(1).any(|t| !t.is_empty());
            if populated {
                return Err(StoreError::new(
                    StoreErrorKind::Schema,
                    format!("the store in `{}` holds data but no schema version", dir.display()),
                ));
            }
            Ok(true)
        }
    }
}

/// Compares the store with its acknowledgement watermark (SPEC §12.9); describes what is missing.
///
/// A store without a commit counter and without a watermark was written before either existed and is
/// accepted as it is (the counting starts now).
fn acknowledged_problem(
    engine: &Engine,
    fresh: bool,
    commits: Option<u64>,
    head: Option<&ChainHead>,
    mark: Option<&Watermark>,
) -> Result<Option<String>, StoreError> {
    let file = watermark::WATERMARK_FILE;
    let Some(mark) = mark else {
        return Ok(match commits {
            Some(n) if n > 0 => Some(format!(
                "holds {n} commits but its acknowledgement file `{file}` is missing; what was acknowledged is unknown"
            )),
            _ => None,
        });
    };
    if fresh {
        return Ok((mark.commits > 0).then(|| {
            format!(
                "is empty, but {} commits (prevention records up to seq {}) had been acknowledged: the database \
                 recovered to an earlier state, everything is missing",
                mark.commits, mark.record_seq
            )
        }));
    }
    let held = commits.unwrap_or(0);
    if held < mark.commits {
        let records = match head {
            Some(head) if head.seq < mark.record_seq => {
                format!("; {} missing", span("prevention record", head.seq.saturating_add(1), mark.record_seq))
            }
            _ => String::new(),
        };
        return Ok(Some(format!(
            "holds {held} commits, but {} had been acknowledged: the database recovered to an earlier state, \
             {} missing{records}",
            mark.commits,
            span("commit", held.saturating_add(1), mark.commits)
        )));
    }
    let Some(head) = head else { return Ok(None) };
    if head.seq < mark.record_seq {
        return Ok(Some(format!(
            "ends its record chain at seq {}, but records up to seq {} had been acknowledged: {} missing",
            head.seq,
            mark.record_seq,
            span("prevention record", head.seq.saturating_add(1), mark.record_seq)
        )));
    }
    if mark.record_seq > 0 {
        let at = engine.tree(T::Records).get(keys::record(mark.record_seq))?;
        let same = at.and_then(|v| PreventionRecord::decode(&v).ok()).is_some_and(|r| r.hash == mark.record_hash);
        if !same {
            return Ok(Some(format!(
                "holds another record at seq {} than the one acknowledged (hash `{}`)",
                mark.record_seq, mark.record_hash
            )));
        }
    }
    Ok(None)
}

/// `commit 5 is` or `commits 5..=9 are`.
fn span(what: &str, first: u64, last: u64) -> String {
    if first == last { format!("{what} {first} is") } else { format!("{what}s {first}..={last} are") }
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

/// Whether any of these `policy_heads` keys is a tenant's policy (not a global one) with this id.
fn tenant_heads_hold<K: AsRef<[u8]>, E>(
    keys: impl Iterator<Item = Result<K, E>>,
    id: &PolicyId,
) -> Result<bool, StoreError>
where
    StoreError: From<E>,
{
    let mut id_segment = id.as_str().as_bytes().to_vec();
    id_segment.push(0);
    for key in keys {
        let key = key?;
        let key = key.as_ref();
        // `owner\0 id\0`: a global policy's owner segment is empty, so its key starts with 0.
        if key.first().is_some_and(|b| *b != 0) && key.ends_with(&id_segment) {
            let owner_len = key.len() - id_segment.len();
            if key.get(owner_len.wrapping_sub(1)) == Some(&0) {
                return Ok(true);
            }
        }
    }
    Ok(false)
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
    fn new(
        store: &'a Store,
        _engine: &'a Engine,
        cache: &'a RunCache,
        head: Result<ChainHead, StoreError>,
        commits: u64,
    ) -> Self {
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

impl StoreError {
    /// The same error with `context` in front of its message.
    pub fn context(mut self, context: impl std::fmt::Display) -> Self {
        self.prepend(context.to_string());
        self
    }
}
