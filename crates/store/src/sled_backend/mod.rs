//! The sled-backed store: the [`Store`] facade, its trees and the state its writer keeps.
//!
//! Every sled call of the crate is in this module, split by concern: `open` (opening, the schema and
//! acknowledgement checks, recovery after a write failure), `commit` (group commit), `reads` (queries)
//! and `verify` (integrity walks). Another backend replaces this module behind the same facade.

mod commit;
#[cfg(feature = "floor")]
mod floor;
mod open;
mod reads;
mod verify;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use runguard_contract::RecordHash;
use sled::{IVec, Tree};

use crate::error::{StoreError, StoreErrorKind};
use crate::group::CommitSignals;
use crate::run_cache::RunCache;

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
    TenantUsage => "tenant_usage",
    RunRollups => "run_rollups",
}

pub(crate) use crate::prepare::ChainHead;
#[cfg(feature = "floor")]
pub use floor::SledFloor;
pub(crate) use reads::snapshot_id_digest;

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
/// [`Store::commit_group`].
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
    /// Test switches, readiness and the policy generation.
    signals: CommitSignals,
    /// What the acknowledgement check found (only with [`Acknowledged::Report`]).
    lost: Option<String>,
}

impl Store {
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
        self.signals.inject_commit_failure(fail);
    }

    /// Makes every flush fail after the commit's transaction applied, until turned off: the test stand-in
    /// for a full or read-only disk (which a test running as root cannot arrange with permissions).
    pub fn inject_durability_failure(&self, fail: bool) {
        self.signals.inject_durability_failure(fail);
    }

    /// Makes every commit wait this long (under the writer lock) before its transaction: a test hook for
    /// commits that outlive their callers' timeout. Zero turns it off.
    pub fn inject_commit_delay(&self, delay: Duration) {
        self.signals.inject_commit_delay(delay);
    }

    /// Whether the latest commit attempt (or [`Store::probe`]) could write: readiness.
    pub fn is_healthy(&self) -> bool {
        self.signals.is_healthy()
    }

    /// A number that changes whenever a commit that writes policy versions was attempted (it is bumped
    /// after the attempt, whether it committed or not). A cache of anything derived from the policies —
    /// a tenant's current snapshot — reads it before reading the policies and is stale once it differs.
    /// One process writes a sled store: its in-process serialisation is the whole of it.
    pub fn cluster_lock(&self, _: &[String], _: std::time::Duration) -> Result<crate::ClusterLock, StoreError> {
        Ok(crate::ClusterLock::none())
    }

    pub fn policy_generation(&self) -> u64 {
        self.signals.policy_generation()
    }

    /// The sequence number and hash of the last record, as recovered and advanced by commits.
    pub fn chain_head(&self) -> Result<(u64, RecordHash), StoreError> {
        self.writer().head.as_ref().map(|h| (h.seq, h.hash.clone())).map_err(Clone::clone)
    }

    /// Commits made durable so far (the counter the acknowledgement watermark is checked against).
    pub fn commit_count(&self) -> u64 {
        self.writer().commits
    }
}

impl StoreError {
    /// The same error with `context` in front of its message.
    pub fn context(mut self, context: impl std::fmt::Display) -> Self {
        self.prepend(context.to_string());
        self
    }
}
