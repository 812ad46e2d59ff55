//! The backend seam: one sync trait that the sled and the PostgreSQL stores implement, and the [`Store`]
//! facade the node, `verify`, `export` and `simulate` call (in the style of quickwit's metastore: one
//! trait, a file-backed and a PostgreSQL implementation).
//!
//! The trait and the facade are generated from one list of methods, so that a method cannot be added to
//! one and forgotten in the other. The write rules are not part of the seam: both backends run the same
//! [`Prepare`](crate::prepare::Prepare) over their own [`ReadView`](crate::prepare::ReadView).

use std::path::Path;
use std::time::Duration;

use runguard_contract::{
    AuditEntry, Decision, Incident, IncidentId, Mode, Pattern, PatternId, Policy, PolicyId, PreventionRecord,
    RecordHash, RecordId, Regret, RunId, SignatureHash, Snapshot, SnapshotHash, SnapshotId, TenantId, Timestamp,
};

use crate::batch::{CommitReceipt, WriteBatch};
use crate::cluster_lock::ClusterLock;
use crate::error::StoreError;
use crate::integrity::{IntegrityError, LoadedRun, StoredSnapshot, VerifyReport};
use crate::model::{GraduationState, LedgerEntry, RunRollup, RunStart, ShadowStats, StoredRun};
use crate::postgres::{PgOptions, PgStore};
use crate::query::{Page, PageRequest, RecordQuery};
use crate::sled_backend::{self, StoreOptions};

/// A boxed iterator of stored items (the trait is object safe, so iterators are boxed).
pub(crate) type Items<'a, T> = Box<dyn Iterator<Item = Result<T, StoreError>> + 'a>;

macro_rules! seam {
    ($(
        $(#[$doc:meta])*
        fn $name:ident(&self $(, $arg:ident: $ty:ty)* $(,)?) -> $ret:ty;
    )*) => {
        /// The calls every backend answers alike; see the methods of [`Store`] for each one's contract.
        pub(crate) trait Calls {
            $( fn $name(&self $(, $arg: $ty)*) -> $ret; )*
        }

        impl Store {
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

            $( $(#[$doc])* pub fn $name(&self $(, $arg: $ty)*) -> $ret { self.backend.$name($($arg),*) } )*
        }

        impl Calls for sled_backend::Store {
            $( fn $name(&self $(, $arg: $ty)*) -> $ret { sled_backend::Store::$name(self $(, $arg)*) } )*
        }

        impl Calls for PgStore {
            $( fn $name(&self $(, $arg: $ty)*) -> $ret { PgStore::$name(self $(, $arg)*) } )*
        }
    };
}

/// A store backend: the common calls, and what differs in shape (iterators are boxed, so that the trait
/// is object safe).
pub(crate) trait Backend: Calls + Send + Sync + std::fmt::Debug {
    /// The data directory (sled) or `None` (PostgreSQL).
    fn dir(&self) -> Option<&Path>;
    /// The identity and creation time of every running run.
    fn running_run_starts(&self) -> Items<'_, RunStart>;
    /// Every run of every tenant.
    fn all_runs(&self) -> Items<'_, StoredRun>;
    /// Every record from `from_seq` on, in chain order.
    fn export_records(&self, from_seq: u64) -> Items<'_, PreventionRecord>;
    /// The backend itself, for tests that reach into one.
    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any;
}

impl Backend for sled_backend::Store {
    fn dir(&self) -> Option<&Path> {
        Some(self.path())
    }

    fn running_run_starts(&self) -> Items<'_, RunStart> {
        Box::new(sled_backend::Store::running_run_starts(self))
    }

    fn all_runs(&self) -> Items<'_, StoredRun> {
        Box::new(sled_backend::Store::all_runs(self))
    }

    fn export_records(&self, from_seq: u64) -> Items<'_, PreventionRecord> {
        Box::new(sled_backend::Store::export_records(self, from_seq))
    }

    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Backend for PgStore {
    fn dir(&self) -> Option<&Path> {
        None
    }

    fn running_run_starts(&self) -> Items<'_, RunStart> {
        PgStore::running_run_starts(self)
    }

    fn all_runs(&self) -> Items<'_, StoredRun> {
        PgStore::all_runs(self)
    }

    fn export_records(&self, from_seq: u64) -> Items<'_, PreventionRecord> {
        PgStore::export_records(self, from_seq)
    }

    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

seam! {
    /// Makes every commit fail inside its transaction (after some writes were staged) until turned off:
    /// the fault-injection point of reliability tests. A failed commit writes nothing.
    fn inject_commit_failure(&self, fail: bool) -> ();
    /// Makes every commit's durability step fail after its writes were applied, until turned off: the
    /// test stand-in for a full or read-only disk. Nothing of such a commit survives.
    fn inject_durability_failure(&self, fail: bool) -> ();
    /// Makes every commit wait this long (under the writer lock) before its transaction: a test hook for
    /// commits that outlive their callers' timeout. Zero turns it off.
    fn inject_commit_delay(&self, delay: Duration) -> ();
    /// Whether the latest commit attempt (or [`Store::probe`]) could write: readiness.
    fn is_healthy(&self) -> bool;
    /// A number that changes whenever a commit that writes policy versions was attempted (it is bumped
    /// after the attempt, whether it committed or not). A cache of anything derived from the policies —
    /// a tenant's current snapshot — reads it before reading the policies and is stale once it differs.
    fn policy_generation(&self) -> u64;
    /// Takes the locks `names` (in the order given) for every node of the store, waiting at most
    /// `wait` for them; held until the answer is dropped (see [`ClusterLock`]).
    fn cluster_lock(&self, names: &[String], wait: Duration) -> Result<ClusterLock, StoreError>;
    /// The sequence number and hash of the last record.
    fn chain_head(&self) -> Result<(u64, RecordHash), StoreError>;
    /// Commits made durable so far.
    fn commit_count(&self) -> u64;
    /// Records what was acknowledged so far where the backend keeps such a mark (sled's watermark file);
    /// the node calls it about once a second and at a graceful stop.
    fn sync_watermark(&self) -> Result<(), StoreError>;
    /// Checks that the store can write (recovering it from an earlier write failure first): the
    /// readiness probe, run while the store is unhealthy. Sets readiness either way.
    fn probe(&self) -> Result<(), StoreError>;
    /// Makes every write of `batch` durable together: checks them, assigns record sequence numbers and
    /// ledger positions and writes them in one transaction. On any error nothing of the batch is written.
    fn commit(&self, batch: WriteBatch) -> Result<CommitReceipt, StoreError>;
    /// Group commit: several callers' batches made durable together, failing only the callers whose own
    /// writes are refused. A store that cannot write fails every caller with the same (I/O) error.
    /// Answers one result per batch, in order (see `docs/store.md`, "Group commit").
    fn commit_group(&self, batches: Vec<WriteBatch>) -> Vec<Result<CommitReceipt, StoreError>>;
    /// Walks every snapshot and the whole record chain (with its indexes) and reports the first break of
    /// each. Used by `runguard verify`; reads only.
    fn verify(&self) -> Result<VerifyReport, StoreError>;
    /// A policy of `owner` (`None`: global): the current version, or `version`.
    fn get_policy(&self, owner: Option<&TenantId>, id: &PolicyId, version: Option<u32>) -> Result<Option<Policy>, StoreError>;
    /// Every version of a policy, oldest first.
    fn policy_versions(&self, owner: Option<&TenantId>, id: &PolicyId) -> Result<Vec<Policy>, StoreError>;
    /// The current versions of the policies `tenant` sees: global ones first, then its own, each by id;
    /// only those in `mode` when given.
    fn list_policies(&self, tenant: &TenantId, mode: Option<Mode>, page: &PageRequest) -> Result<Page<Policy>, StoreError>;
    /// A policy's activation audit, oldest first.
    fn policy_audit(&self, owner: Option<&TenantId>, id: &PolicyId, page: &PageRequest) -> Result<Page<AuditEntry>, StoreError>;
    /// A policy's shadow statistics as `tenant` sees them (zero when none were recorded): a tenant policy's
    /// own, a global policy's from `tenant`'s runs only.
    fn shadow_stats(&self, owner: Option<&TenantId>, id: &PolicyId, tenant: &TenantId) -> Result<ShadowStats, StoreError>;
    /// A tenant's usage of a tenant-period budget policy within the period starting at `period_start`
    /// (0 when none was recorded): the durable total that [`WriteOp::AddTenantUsage`](crate::WriteOp::AddTenantUsage)
    /// increments.
    fn tenant_usage(&self, tenant: &TenantId, policy: &PolicyId, period_start: Timestamp) -> Result<u64, StoreError>;
    /// A tenant's shared rate events after `after`, in the order they were recorded (PostgreSQL; a sled
    /// store holds none: its node keeps its tenants' windows in memory).
    fn tenant_rate_events(&self, tenant: &TenantId, after: Timestamp) -> Result<Vec<crate::TenantRateUse>, StoreError>;
    /// Every tenant that owns a policy, by id (global policies are listed through any tenant): the
    /// starting point of `runguard migrate-store`, which copies every tenant's policies.
    fn policy_owners(&self) -> Result<Vec<TenantId>, StoreError>;
    /// Whether any tenant has a policy with this id (a global policy may not take it, `docs/learning-loop.md`, policy ids).
    fn tenant_policy_id_exists(&self, id: &PolicyId) -> Result<bool, StoreError>;
    /// A policy's audit entries made at or after `since`, oldest first.
    fn policy_audit_since(&self, owner: Option<&TenantId>, id: &PolicyId, since: Timestamp) -> Result<Vec<AuditEntry>, StoreError>;
    /// Loads and verifies the snapshot with `hash`: the stored canonical bytes must hash to it.
    fn load_snapshot(&self, hash: &SnapshotHash) -> Result<Snapshot, IntegrityError>;
    /// The snapshot with exactly `id` (`snp_` and the first 32 hex digits of its hash): its hash and the
    /// verified snapshot, or `None` when no such snapshot exists.
    fn snapshot_by_id(&self, id: &SnapshotId) -> Result<Option<StoredSnapshot>, StoreError>;
    /// Whether one of `tenant`'s runs is bound to the snapshot with exactly `id`.
    fn snapshot_bound_to(&self, tenant: &TenantId, id: &SnapshotId) -> Result<bool, StoreError>;
    /// Fills the (tenant, snapshot) binding index of a store written before it existed; the node calls it
    /// once after opening.
    fn index_snapshot_bindings(&self) -> Result<(), StoreError>;
    /// What a run's descendants add to it: their summed usage and its children count (zero for a run
    /// without children).
    fn run_rollup(&self, tenant: &TenantId, run: &RunId) -> Result<RunRollup, StoreError>;
    /// A run of `tenant`.
    fn get_run(&self, tenant: &TenantId, run: &RunId) -> Result<Option<StoredRun>, StoreError>;
    /// A tenant's runs, by run id.
    fn list_runs(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<StoredRun>, StoreError>;
    /// A tenant's runs that `keep` accepts, by run id. The filter runs over the tenant's runs in key
    /// order, so a page of a narrow filter may read many runs; no index is kept for it (the filters an
    /// operator combines — status, label, creation time — would each need their own).
    fn list_runs_where(
        &self,
        tenant: &TenantId,
        page: &PageRequest,
        keep: &dyn Fn(&StoredRun) -> bool,
    ) -> Result<Page<StoredRun>, StoreError>;
    /// A run's whole ledger, in order.
    fn full_ledger(&self, tenant: &TenantId, run: &RunId) -> Result<Vec<LedgerEntry>, StoreError>;
    /// A run's ledger, in order.
    fn ledger(&self, tenant: &TenantId, run: &RunId, page: &PageRequest) -> Result<Page<LedgerEntry>, StoreError>;
    /// The last ledger entry of a run (the answer to an identical retry).
    fn last_ledger_entry(&self, tenant: &TenantId, run: &RunId) -> Result<Option<LedgerEntry>, StoreError>;
    /// Loads a run for rehydration, re-verifying its snapshot and checking its ledger against its totals.
    fn load_run(&self, tenant: &TenantId, run: &RunId) -> Result<Option<LoadedRun>, StoreError>;
    /// A record of `tenant` (another tenant's record is `None`).
    fn get_record(&self, tenant: &TenantId, id: &RecordId) -> Result<Option<PreventionRecord>, StoreError>;
    /// The decision a live record was written for, from its run's ledger.
    fn record_decision(&self, record: &PreventionRecord) -> Result<Option<Decision>, StoreError>;
    /// The record at `seq`.
    fn record_at(&self, seq: u64) -> Result<Option<PreventionRecord>, StoreError>;
    /// Lists a tenant's records (see [`RecordQuery`] for order and filters).
    fn list_records(&self, query: &RecordQuery) -> Result<Page<PreventionRecord>, StoreError>;
    /// An incident of `tenant`.
    fn get_incident(&self, tenant: &TenantId, id: &IncidentId) -> Result<Option<Incident>, StoreError>;
    /// A tenant's incidents, oldest first.
    fn list_incidents(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Incident>, StoreError>;
    /// A tenant's incidents created at or after `since`, oldest first.
    fn incidents_since(&self, tenant: &TenantId, since: Timestamp) -> Result<Vec<Incident>, StoreError>;
    /// A pattern of `tenant`.
    fn get_pattern(&self, tenant: &TenantId, id: &PatternId) -> Result<Option<Pattern>, StoreError>;
    /// The pattern of `tenant` grouping (signature hash, error type).
    fn find_pattern(&self, tenant: &TenantId, signature: &SignatureHash, error_type: &str) -> Result<Option<Pattern>, StoreError>;
    /// A tenant's patterns, by id.
    fn list_patterns(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Pattern>, StoreError>;
    /// The regret of a record, if any.
    fn get_regret(&self, record: &RecordId) -> Result<Option<Regret>, StoreError>;
    /// The regrets of `tenant` on a policy's records made at or after `since`, oldest first.
    fn regrets_for_policy(&self, tenant: &TenantId, policy: &PolicyId, since: Option<Timestamp>) -> Result<Vec<Regret>, StoreError>;
    /// A tenant's current graduation state.
    fn graduation(&self, tenant: &TenantId) -> Result<Option<GraduationState>, StoreError>;
    /// Every graduation state a tenant went through, oldest first.
    fn graduation_history(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<GraduationState>, StoreError>;
}

/// The runguard store: embedded sled ([`Store::open`]) or PostgreSQL ([`Store::open_postgres`]), written
/// only through [`Store::commit`] and [`Store::commit_group`].
///
/// Reads may run on any thread concurrently with a commit; commits are serialised.
#[derive(Debug)]
pub struct Store {
    backend: Box<dyn Backend>,
}

impl Store {
    /// Opens (creating if needed) the sled store in `dir`, checks the schema version, checks that the
    /// store holds everything its acknowledgement watermark says was acknowledged, and recovers the chain
    /// head. A store that recovered to an earlier state than it acknowledged is refused (`Corrupt`).
    pub fn open(dir: impl AsRef<Path>, options: &StoreOptions) -> Result<Self, StoreError> {
        Ok(Self { backend: Box::new(sled_backend::Store::open(dir, options)?) })
    }

    /// Connects to the PostgreSQL database at `url`, applies the migrations its schema lacks (refusing a
    /// schema newer than this build knows) and checks the chain head row.
    pub fn open_postgres(url: &str, options: &PgOptions) -> Result<Self, StoreError> {
        Ok(Self { backend: Box::new(PgStore::open(url, options)?) })
    }

    /// Verifies the sled store in `dir` without changing it (on a copy; see `docs/store.md`).
    pub fn verify_dir(dir: impl AsRef<Path>, options: &StoreOptions) -> Result<VerifyReport, StoreError> {
        sled_backend::Store::verify_dir(dir, options)
    }

    /// The directory a sled store lives in; empty for a PostgreSQL store.
    pub fn path(&self) -> &Path {
        self.backend.dir().unwrap_or_else(|| Path::new(""))
    }

    /// Which backend this is: `sled` or `postgres`.
    pub fn backend_name(&self) -> &'static str {
        if self.backend.dir().is_some() { "sled" } else { "postgres" }
    }

    /// Whether other nodes may write this store too (PostgreSQL), so that what this node holds in memory
    /// of a run, a family, a tenant's windows or the policies may be behind it. Sled is opened by one
    /// process: what the node holds is exact.
    pub fn is_shared(&self) -> bool {
        self.backend.dir().is_none()
    }

    /// The tenant, id and creation time of every running run, without reading more of it (for expiry).
    pub fn running_run_starts(&self) -> impl Iterator<Item = Result<RunStart, StoreError>> + '_ {
        self.backend.running_run_starts()
    }

    /// Every run of every tenant, in key order (for exports).
    pub fn all_runs(&self) -> impl Iterator<Item = Result<StoredRun, StoreError>> + '_ {
        self.backend.all_runs()
    }

    /// Every record from `from_seq` on, in chain order (for `runguard export`).
    pub fn export_records(&self, from_seq: u64) -> impl Iterator<Item = Result<PreventionRecord, StoreError>> + '_ {
        self.backend.export_records(from_seq)
    }

    /// The sled store behind this facade, for tests that damage its trees on purpose.
    #[cfg(test)]
    pub(crate) fn raw_tree(&self, name: &str) -> sled::Tree {
        match self.backend.as_any().downcast_ref::<sled_backend::Store>() {
            Some(store) => store.raw_tree(name),
            None => unreachable!("raw trees exist only on sled"),
        }
    }
}
