//! What every actor and handler shares: the store (reads), the writer's commit handle (writes),
//! configuration, the tenant rate windows and the compiled-snapshot cache. It knows no actor: the actors
//! are given their collaborators when they start (`docs/architecture.md`, "Module layering").

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use runguard_contract::{Snapshot, SnapshotHash, TenantId, Timestamp};
use runguard_engine::{CompiledSnapshot, TenantRates};
use runguard_store::{CommitReceipt, Store, StoreError, StoreErrorKind, WriteBatch};

use crate::commit::{CommitHandle, Refused};
use crate::config::Config;
use crate::node_error::NodeError;

/// The node's shared context.
pub struct Shared {
    /// Read access to the store (reads run on blocking threads, never on an actor or HTTP thread).
    pub store: Arc<Store>,
    /// The single writer.
    pub writer: CommitHandle,
    /// Configuration.
    pub config: Config,
    /// Each tenant's current snapshot, captured once per change of the policies.
    pub current_snapshots: crate::current_snapshots::CurrentSnapshots,
    /// The in-memory tally of every run family (parent and child runs) a live run belongs to.
    pub run_tree: crate::run_tree::RunTree,
    /// Each tenant's share of the background threads.
    tenant_lanes: crate::tenant_lanes::TenantLanes,
    /// Threads for CPU-heavy work, one per core.
    background: crate::background::BackgroundPool,
    /// One lock per tenant, so that one tenant's rate-limited calls never wait for another's.
    tenant_rates: Mutex<HashMap<TenantId, Arc<Mutex<TenantRates>>>>,
    snapshots: Mutex<HashMap<SnapshotHash, Weak<CompiledSnapshot>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// The wall clock, read only at the edges (the engine takes time as a parameter).
pub fn now() -> Timestamp {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Timestamp::from_unix_millis(millis).plus_millis(test_clock::offset())
}

/// `test_clock_offset_ms`: a shift of the node's clock that only debug builds honour, so that tests of
/// calendar periods need not wait for midnight; a release build always reads the wall clock.
pub mod test_clock {
    use std::sync::atomic::{AtomicI64, Ordering};

    static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

    /// Sets the shift (the node's config sets it once at start).
    pub fn set(offset_ms: i64) {
        if cfg!(debug_assertions) {
            OFFSET_MS.store(offset_ms, Ordering::Relaxed);
        } else if offset_ms != 0 {
            tracing::warn!(offset_ms, "test_clock_offset_ms is honoured by debug builds only; ignored");
        }
    }

    pub(crate) fn offset() -> i64 {
        OFFSET_MS.load(Ordering::Relaxed)
    }
}

impl Shared {
    /// A context over an open store, committing through `writer` (the writer's commit handle).
    pub fn new(store: Arc<Store>, writer: actix::Recipient<crate::commit::Commit>, config: Config) -> Self {
        let tenant_lanes = crate::tenant_lanes::TenantLanes::new(config.limits.tenant_heavy_jobs);
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let background = crate::background::BackgroundPool::start(cores);
        let writer = CommitHandle::new(writer, Duration::from_millis(config.limits.call_timeout_ms));
        test_clock::set(config.test_clock_offset_ms);
        Self {
            store,
            writer,
            config,
            current_snapshots: Default::default(),
            run_tree: Default::default(),
            tenant_lanes,
            background,
            tenant_rates: Mutex::new(HashMap::new()),
            snapshots: Mutex::new(HashMap::new()),
        }
    }

    /// How long a call may wait for its run or the writer.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.config.limits.call_timeout_ms)
    }

    /// Makes `batch` durable through the writer ([`CommitHandle::commit`]).
    pub async fn commit(&self, batch: WriteBatch) -> Result<CommitReceipt, NodeError> {
        self.writer.commit(batch).await
    }

    /// [`CommitHandle::commit_settled`].
    pub async fn commit_settled(&self, batch: WriteBatch) -> Result<CommitReceipt, Refused> {
        self.writer.commit_settled(batch).await
    }

    /// Runs blocking or CPU-heavy work (store reads, compiling regexes and CEL, replays) on the blocking
    /// pool, never on an HTTP worker or actor thread.
    /// Generic over the error so that HTTP handlers can plan with their own answers.
    pub async fn blocking<T, E, F>(self: &Arc<Self>, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<NodeError> + Send + 'static,
        F: FnOnce(&Shared) -> Result<T, E> + Send + 'static,
    {
        let shared = Arc::clone(self);
        actix_web::rt::task::spawn_blocking(move || runguard_store::on_blocking_thread(|| work(&shared)))
            .await
            .unwrap_or_else(|_| Err(E::from(NodeError::Internal)))
    }

    /// Runs CPU-heavy work of `tenant` (large evaluations, simulations, graduation, list pages) on the
    /// background threads, in one of the tenant's lanes (`limits.tenant_heavy_jobs`): one tenant flooding
    /// expensive calls waits behind its own work and never takes more than its lanes' share of the cores.
    /// A tenant that cannot get a lane within the call timeout is refused as overloaded.
    pub async fn heavy<T, E, F>(self: &Arc<Self>, tenant: &TenantId, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<NodeError> + Send + 'static,
        F: FnOnce(&Shared) -> Result<T, E> + Send + 'static,
    {
        let Ok(_lane) = self.tenant_lanes.acquire(tenant, self.call_timeout()).await else {
            metrics::counter!("runguard_refused_calls_total", "reason" => "tenant_busy").increment(1);
            let message = "this tenant's expensive calls are queued; retry later";
            return Err(E::from(NodeError::Overloaded { message, retry_after_s: 1 }));
        };
        let shared = Arc::clone(self);
        self.background.run(move || work(&shared)).await.unwrap_or_else(|_| Err(E::from(NodeError::Internal)))
    }

    /// Runs a blocking store read off the async threads.
    pub async fn read<T, F>(self: &Arc<Self>, read: F) -> Result<T, NodeError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        self.blocking(move |shared| {
            read(&shared.store).map_err(|err| match err.kind() {
                // After a write failure the store hides what it applied but could not make durable until
                // it has reopened itself from disk.
                StoreErrorKind::Io => {
                    tracing::warn!(error = %err, "store unreadable");
                    NodeError::unavailable("the store is recovering from a write failure; retry")
                }
                _ => NodeError::Store(err),
            })
        })
        .await
    }

    /// The compiled form of `snapshot`, shared between runs bound to the same hash. The snapshot must
    /// already be verified against `hash` (or be the one just captured).
    pub fn compiled(&self, snapshot: &Snapshot, hash: &SnapshotHash) -> Arc<CompiledSnapshot> {
        let mut cache = self.snapshots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(existing) = cache.get(hash).and_then(Weak::upgrade) {
            return existing;
        }
        let compiled = Arc::new(CompiledSnapshot::load(snapshot, hash, &self.config.limits.policy));
        if cache.len() > 1024 {
            cache.retain(|_, weak| weak.strong_count() > 0);
        }
        cache.insert(hash.clone(), Arc::downgrade(&compiled));
        compiled
    }

    /// Runs `f` with the tenant's rate windows locked (only snapshots with tenant-scope rate rules need it).
    pub fn with_tenant_rates<T>(&self, tenant: &TenantId, f: impl FnOnce(&mut TenantRates) -> T) -> T {
        let rates = {
            let mut tenants = self.tenant_rates.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            Arc::clone(tenants.entry(tenant.clone()).or_default())
        };
        let mut rates = rates.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut rates)
    }
}
