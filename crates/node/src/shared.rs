//! What every actor and handler shares: the store (reads), the writer (writes), configuration, the
//! tenant rate windows and the compiled-snapshot cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use actix::Addr;
use runguard_contract::{Snapshot, SnapshotHash, TenantId, Timestamp};
use runguard_engine::{CompiledSnapshot, TenantRates};
use runguard_store::{CommitReceipt, Store, StoreError, StoreErrorKind, WriteBatch};

use crate::actors::learning::Learning;
use crate::actors::writer::{Commit, Writer};
use crate::config::Config;
use crate::error::ApiError;

/// A commit that failed: the answer, and whether the batch surely did not land (`false`: unknown).
#[derive(Debug)]
pub struct Refused {
    /// What the call answers.
    pub error: ApiError,
    /// Whether the batch is known not to have landed.
    pub settled: bool,
}

/// The node's shared context.
pub struct Shared {
    /// Read access to the store (reads run on blocking threads, never on an actor or HTTP thread).
    pub store: Arc<Store>,
    /// The single writer.
    pub writer: Addr<Writer>,
    /// Configuration.
    pub config: Config,
    /// The learning actor (set once at start-up, after this context exists).
    pub learning: OnceLock<Addr<Learning>>,
    /// The live runs (looked up by every call; changed only by the registry).
    pub live_runs: crate::actors::registry::RunTable,
    /// Each tenant's current snapshot, captured once per change of the policies.
    pub current_snapshots: crate::current_snapshots::CurrentSnapshots,
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
    Timestamp::from_unix_millis(millis)
}

/// Maps a store failure to the answer a client gets: 503 (treat as block) for IO and injected faults,
/// 409 for conflicts, 404 for missing objects, 400 for bad arguments, 500 for corruption.
pub fn store_error(err: StoreError) -> ApiError {
    match err.kind() {
        StoreErrorKind::Io | StoreErrorKind::Injected => {
            tracing::error!(error = %err, "store unavailable");
            ApiError::unavailable(
                "the store cannot commit; the call was not acknowledged and must be treated as a block",
                1,
            )
        }
        StoreErrorKind::Conflict => ApiError::conflict("conflict", err.message().to_owned()),
        StoreErrorKind::NotFound => ApiError::conflict("not_found", err.message().to_owned()),
        StoreErrorKind::InvalidArgument => ApiError::bad_request("cursor", err.message().to_owned()),
        StoreErrorKind::Contract | StoreErrorKind::Corrupt | StoreErrorKind::Schema => {
            tracing::error!(error = %err, "store refused or found corrupt data");
            ApiError::internal()
        }
    }
}

impl Shared {
    /// A context over an open store and a started writer.
    pub fn new(store: Arc<Store>, writer: Addr<Writer>, config: Config) -> Self {
        let tenant_lanes = crate::tenant_lanes::TenantLanes::new(config.limits.tenant_heavy_jobs);
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let background = crate::background::BackgroundPool::start(cores);
        Self {
            store,
            writer,
            config,
            learning: OnceLock::new(),
            live_runs: Default::default(),
            current_snapshots: Default::default(),
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

    /// Makes `batch` durable through the writer; answers 503 if the writer is full, slow or failing.
    ///
    /// A call that times out answers 503 only if the writer has not taken its batch yet (and then never
    /// will); once taken, the call waits for the commit's real outcome, so that a 503 is never answered
    /// for a batch that lands (SPEC §12.10).
    pub async fn commit(&self, batch: WriteBatch) -> Result<CommitReceipt, ApiError> {
        self.commit_settled(batch).await.map_err(|refused| refused.error)
    }

    /// [`Shared::commit`], telling a failure whose batch surely did not land from one whose outcome is
    /// unknown (the writer stopped after taking it).
    pub async fn commit_settled(&self, batch: WriteBatch) -> Result<CommitReceipt, Refused> {
        let commit = Commit::new(batch);
        let ticket = commit.ticket.clone();
        let mut sent = std::pin::pin!(self.writer.send(commit));
        let answer = match actix_web::rt::time::timeout(self.call_timeout(), &mut sent).await {
            Ok(answer) => answer,
            Err(_) if ticket.abandon() => {
                metrics::counter!("runguard_refused_calls_total", "reason" => "commit_timeout").increment(1);
                let error = ApiError::unavailable("the writer is overloaded; treat the call as a block", 1);
                return Err(Refused { error, settled: true });
            }
            Err(_) => sent.await,
        };
        match answer {
            Ok(Ok(receipt)) => Ok(receipt),
            // The store writes nothing of a batch it answers with an error.
            Ok(Err(err)) => Err(Refused { error: store_error(err), settled: true }),
            Err(err) => {
                tracing::error!(error = %err, "writer unavailable");
                let error = ApiError::unavailable("the writer is overloaded or stopped; treat the call as a block", 1);
                // A batch the writer never took never will be; one it took may have landed.
                Err(Refused { error, settled: ticket.abandon() })
            }
        }
    }

    /// Sends a message to the learning actor and waits for its answer (503 if it is unavailable).
    pub async fn learn<M>(&self, msg: M) -> Result<M::Result, ApiError>
    where
        M: actix::Message + Send + 'static,
        M::Result: Send,
        Learning: actix::Handler<M>,
    {
        let learning = self.learning.get().ok_or_else(|| ApiError::unavailable("the node is starting", 1))?;
        // No timeout here: the actor answers at once with a future that bounds its own waiting and whose
        // commit must not be abandoned once the writer holds it (a timeout here could answer 503 for a
        // request that is applied afterwards).
        learning.send(msg).await.map_err(|err| {
            tracing::error!(error = %err, "learning actor unavailable");
            ApiError::unavailable("the learning loop is overloaded or stopped; retry", 1)
        })
    }

    /// Runs blocking or CPU-heavy work (store reads, compiling regexes and CEL, replays) on the blocking
    /// pool, never on an HTTP worker or actor thread.
    pub async fn blocking<T, F>(self: &Arc<Self>, work: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T, ApiError> + Send + 'static,
    {
        let shared = Arc::clone(self);
        actix_web::rt::task::spawn_blocking(move || work(&shared)).await.unwrap_or_else(|_| Err(ApiError::internal()))
    }

    /// Runs CPU-heavy work of `tenant` (large evaluations, simulations, graduation, list pages) on the
    /// background threads, in one of the tenant's lanes (`limits.tenant_heavy_jobs`): one tenant flooding
    /// expensive calls waits behind its own work and never takes more than its lanes' share of the cores.
    /// A tenant that cannot get a lane within the call timeout is answered 429.
    pub async fn heavy<T, F>(self: &Arc<Self>, tenant: &TenantId, work: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T, ApiError> + Send + 'static,
    {
        let Ok(_lane) = self.tenant_lanes.acquire(tenant, self.call_timeout()).await else {
            metrics::counter!("runguard_refused_calls_total", "reason" => "tenant_busy").increment(1);
            return Err(ApiError::overloaded("this tenant's expensive calls are queued; retry later", 1));
        };
        let shared = Arc::clone(self);
        self.background.run(move || work(&shared)).await.unwrap_or_else(|_| Err(ApiError::internal()))
    }

    /// Runs a blocking store read off the async threads.
    pub async fn read<T, F>(self: &Arc<Self>, read: F) -> Result<T, ApiError>
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
                    ApiError::unavailable("the store is recovering from a write failure; retry", 1)
                }
                _ => store_error(err),
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
