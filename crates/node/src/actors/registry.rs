//! The registry: maps `(tenant, run id)` to the live run actor, spawning (and so rehydrating) actors on
//! demand, by default on the arbiter (HTTP worker thread) of the call that needed the actor, so that a
//! run's calls arriving on that worker reach its actor without waking another thread. Entries carry a
//! generation so that a stopping actor's late deregistration never evicts its replacement.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use actix::prelude::*;

use crate::actors::learning::CommitRunEnd;
pub use crate::actors::run::{Deregister, RunKey};
use crate::actors::run::{RunActor, RunDeps, Touch};
use crate::node_error::NodeError;
use crate::shared::Shared;

/// Returns the live actor of a run, spawning it if needed.
#[derive(Debug, Message)]
#[rtype(result = "Result<RunHandle, NodeError>")]
pub struct Resolve {
    /// The run.
    pub key: RunKey,
    /// The arbiter of the caller, where a new actor is placed unless the node has dedicated run arbiters.
    pub home: Option<ArbiterHandle>,
}

impl Resolve {
    /// Resolves `key` for a caller on the current arbiter (an HTTP worker), if any.
    pub fn from_here(key: RunKey) -> Self {
        Self { key, home: Arbiter::try_current() }
    }
}

/// A live run actor and the count of calls sent to it and not yet answered. actix holds a sender while
/// a mailbox is full instead of refusing it; the count lets callers refuse at once (429) instead.
#[derive(Clone, Debug)]
pub struct RunHandle {
    /// The actor.
    pub addr: Addr<RunActor>,
    /// Calls in flight to it, and when one last entered.
    pub activity: Arc<Activity>,
    /// The actor's generation (a replacement has a higher one).
    pub generation: u64,
}

impl RunHandle {
    /// Counts a call in, unless `limit` calls are already in flight.
    pub fn enter(&self, limit: usize) -> Option<InFlight> {
        self.touch();
        self.activity.enter(limit)
    }

    fn touch(&self) {
        self.activity.last_used.store(crate::shared::now().unix_millis(), Ordering::Release);
    }
}

/// The live runs: read by the HTTP handlers on every call without a round trip to the registry, changed
/// only by the registry (spawn, deregistration, idle eviction).
#[derive(Debug, Default)]
pub struct RunTable {
    /// Keyed by the same `Arc` the run's actor holds (one copy of the ids per live run).
    runs: RwLock<HashMap<Arc<RunKey>, RunHandle>>,
}

impl RunTable {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Arc<RunKey>, RunHandle>> {
        self.runs.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Arc<RunKey>, RunHandle>> {
        self.runs.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The live actor of a run, if it has one.
    pub fn get(&self, key: &RunKey) -> Option<RunHandle> {
        self.read().get(key).filter(|run| run.addr.connected()).cloned()
    }

    /// Whether `generation` is still the run's live actor. A caller that found a handle, then counted
    /// its call in, checks this before sending: eviction only removes runs with nothing in flight, so a
    /// handle still current after the count cannot be evicted before the call is answered.
    pub fn is_current(&self, key: &RunKey, generation: u64) -> bool {
        self.read().get(key).is_some_and(|run| run.generation == generation)
    }

    /// How many runs are live.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no run is live.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }
}

/// What every caller of one run shares: the calls in flight to it and when one last entered (one
/// allocation per live run).
#[derive(Debug, Default)]
pub struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since the Unix epoch (for idle eviction).
    last_used: AtomicI64,
}

impl Activity {
    fn starting_now() -> Arc<Self> {
        Arc::new(Self { in_flight: AtomicUsize::new(0), last_used: AtomicI64::new(crate::shared::now().unix_millis()) })
    }

    /// Counts a call in, unless `limit` calls are already in flight.
    pub fn enter(self: &Arc<Self>, limit: usize) -> Option<InFlight> {
        let previous = self.in_flight.fetch_add(1, Ordering::AcqRel);
        // The guard is made first so that a refused call is counted out again when it drops.
        let guard = InFlight(Arc::clone(self));
        (previous < limit).then_some(guard)
    }

    /// Calls in flight now.
    pub fn current(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// One call counted in an [`Activity`]; released when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sent by a caller whose call found no run in the actor (a creation that failed before its commit, a
/// run that is not stored): the actor holds nothing worth a live-run slot, so it is dropped at once
/// rather than at idle eviction (`docs/reliability.md`: calls naming runs that do not exist take no slot). Like eviction, only an actor with no call in flight goes.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Forget {
    /// The run.
    pub key: RunKey,
    /// The generation of the actor that answered.
    pub generation: u64,
}

/// The registry actor: the only writer of the [`RunTable`] it is given.
pub struct Registry {
    shared: Arc<Shared>,
    runs: Arc<RunTable>,
    learning: Recipient<CommitRunEnd>,
    /// What each run actor is given; made once the registry has an address (in `started`).
    deps: Option<Arc<RunDeps>>,
    arbiters: Vec<ArbiterHandle>,
    next_generation: u64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("live", &self.runs.len()).finish_non_exhaustive()
    }
}

impl Registry {
    /// A registry of the live runs in `runs`, whose actors send the ends of failed runs to `learning`,
    /// placing run actors on `arbiters` (by hash of the run key), or, when there are none, on the arbiter
    /// of the call that needed the actor.
    pub fn new(
        shared: Arc<Shared>,
        runs: Arc<RunTable>,
        learning: Recipient<CommitRunEnd>,
        arbiters: Vec<ArbiterHandle>,
    ) -> Self {
        Self { shared, runs, learning, deps: None, arbiters, next_generation: 0 }
    }

    /// The dedicated run arbiter of `key`, by hash, if the node has any.
    fn placement(&self, key: &RunKey) -> Option<&ArbiterHandle> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        let slot = usize::try_from(hasher.finish() % (self.arbiters.len().max(1) as u64)).unwrap_or(0);
        self.arbiters.get(slot)
    }

    fn gauge(&self, live: usize) {
        metrics::gauge!("runguard_live_runs").set(live as f64);
    }
}

/// Runs past their TTL are looked for this often at most (more often when the TTL is shorter).
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.deps = Some(Arc::new(RunDeps {
            shared: Arc::clone(&self.shared),
            learning: self.learning.clone(),
            stopped: ctx.address().downgrade().recipient(),
        }));
        ctx.set_mailbox_capacity(self.shared.config.limits.writer_queue.max(1024));
        let every = SWEEP_EVERY.min(std::time::Duration::from_secs(self.shared.config.run_ttl_s.max(1)));
        ctx.run_interval(every, |registry, ctx| registry.sweep(ctx));
        let idle = std::time::Duration::from_secs(self.shared.config.run_idle_s.max(1));
        ctx.run_interval(SWEEP_EVERY.min(idle), move |registry, _| registry.evict_idle(idle));
    }
}

impl Registry {
    /// Drops the addresses of runs with no call in flight and none entered for `idle`; each such actor
    /// stops once the last address (held only during a call) is gone, and is rehydrated on its next call.
    fn evict_idle(&mut self, idle: std::time::Duration) {
        let oldest =
            crate::shared::now().unix_millis().saturating_sub(i64::try_from(idle.as_millis()).unwrap_or(i64::MAX));
        let live = {
            let mut runs = self.runs.write();
            runs.retain(|_, run| run.activity.current() > 0 || run.activity.last_used.load(Ordering::Acquire) > oldest);
            runs.len()
        };
        self.gauge(live);
    }

    /// Finds running runs past their TTL and touches each through its own actor, which expires it and
    /// persists that; going through the actor keeps its in-memory state and the store in agreement.
    fn sweep(&mut self, ctx: &mut Context<Self>) {
        let shared = Arc::clone(&self.shared);
        let runs = Arc::clone(&self.runs);
        let me = ctx.address();
        actix::spawn(async move {
            let limits = shared.config.run_limits();
            let now = crate::shared::now();
            let due = shared
                .read(move |store| {
                    let mut due = Vec::new();
                    for run in store.running_run_starts() {
                        let run = run?;
                        if limits.ttl_elapsed(run.created_at, now) {
                            due.push(RunKey { tenant: run.tenant_id, run_id: run.run_id });
                        }
                    }
                    Ok(due)
                })
                .await;
            let Ok(due) = due else { return };
            for key in due {
                let Ok(Ok(run)) = me.send(Resolve { key: key.clone(), home: None }).await else { continue };
                // Counted in like any call, so idle eviction cannot drop the actor while it expires the run.
                let Some(_in_flight) = run.enter(usize::MAX) else { continue };
                if runs.is_current(&key, run.generation) {
                    let _ = run.addr.send(Touch).await;
                }
            }
        });
    }
}

impl Handler<Resolve> for Registry {
    type Result = Result<RunHandle, NodeError>;

    fn handle(&mut self, Resolve { key, home }: Resolve, _: &mut Self::Context) -> Self::Result {
        if let Some(run) = self.runs.get(&key) {
            run.touch();
            return Ok(run);
        }
        if self.runs.len() >= self.shared.config.limits.live_runs {
            let live = {
                let mut runs = self.runs.write();
                runs.retain(|_, run| run.addr.connected());
                runs.len()
            };
            if live >= self.shared.config.limits.live_runs {
                metrics::counter!("runguard_refused_calls_total", "reason" => "live_runs").increment(1);
                return Err(NodeError::unavailable("too many live runs on this node; retry later"));
            }
        }
        let deps = Arc::clone(self.deps.as_ref().ok_or(NodeError::Internal)?);
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        let key = Arc::new(key);
        let actor_key = Arc::clone(&key);
        let make = move |_: &mut Context<RunActor>| RunActor::new(actor_key, generation, deps);
        let addr = match self.placement(&key).or(home.as_ref()) {
            Some(arbiter) => RunActor::start_in_arbiter(arbiter, make),
            None => RunActor::create(make),
        };
        let run = RunHandle { addr, activity: Activity::starting_now(), generation };
        let live = {
            let mut runs = self.runs.write();
            runs.insert(key, run.clone());
            runs.len()
        };
        self.gauge(live);
        Ok(run)
    }
}

impl Handler<Forget> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Forget, _: &mut Self::Context) {
        let live = {
            let mut runs = self.runs.write();
            if runs.get(&msg.key).is_some_and(|run| run.generation == msg.generation && run.activity.current() == 0) {
                runs.remove(&msg.key);
            }
            runs.len()
        };
        self.gauge(live);
    }
}

impl Handler<Deregister> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Deregister, _: &mut Self::Context) {
        let live = {
            let mut runs = self.runs.write();
            if runs.get(&msg.key).is_some_and(|run| run.generation == msg.generation) {
                runs.remove(&msg.key);
            }
            runs.len()
        };
        self.gauge(live);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::test_support::{Node, key};

    /// A registry over a fresh store with `live_runs` slots, started in this (test) system.
    fn registry(live_runs: usize) -> (Node, Arc<RunTable>, Addr<Registry>) {
        let node = Node::start(|config| config.limits.live_runs = live_runs);
        let (runs, registry) = (Arc::clone(&node.runs), node.registry.clone());
        (node, runs, registry)
    }

    async fn resolve(registry: &Addr<Registry>, key: &RunKey) -> Result<RunHandle, NodeError> {
        registry.send(Resolve { key: key.clone(), home: None }).await.unwrap()
    }

    #[actix_rt::test]
    async fn concurrent_resolves_of_one_run_spawn_one_actor() {
        let (_node, runs, registry) = registry(16);
        let run = key("acme", "run_1");
        let handles = futures_util::future::join_all((0..32).map(|_| resolve(&registry, &run))).await;
        let generations: std::collections::HashSet<u64> = handles.into_iter().map(|h| h.unwrap().generation).collect();
        assert_eq!(generations.len(), 1, "every caller got the same actor");
        assert_eq!(runs.len(), 1);
        let other = resolve(&registry, &key("acme", "run_2")).await.unwrap();
        assert!(!generations.contains(&other.generation), "another run gets its own actor");
        assert_eq!(runs.len(), 2);
    }

    #[actix_rt::test]
    async fn a_run_over_the_live_run_limit_is_refused_and_live_ones_still_resolve() {
        let (_node, runs, registry) = registry(2);
        let first = resolve(&registry, &key("acme", "run_1")).await.unwrap();
        resolve(&registry, &key("acme", "run_2")).await.unwrap();
        let refused = resolve(&registry, &key("globex", "run_3")).await.unwrap_err();
        assert!(matches!(refused, NodeError::Unavailable { retry_after_s: 1, .. }), "{refused:?}");
        assert_eq!(runs.len(), 2, "the refused run took no slot");
        let again = resolve(&registry, &key("acme", "run_1")).await.unwrap();
        assert_eq!(again.generation, first.generation, "a live run resolves at the limit");
    }

    #[actix_rt::test]
    async fn a_run_whose_call_found_none_is_forgotten_unless_busy_or_replaced() {
        let (_node, runs, registry) = registry(16);
        let run = key("acme", "run_1");
        let handle = resolve(&registry, &run).await.unwrap();
        // A call still in flight keeps the actor.
        let in_flight = handle.enter(usize::MAX).unwrap();
        registry.send(Forget { key: run.clone(), generation: handle.generation }).await.unwrap();
        assert!(runs.is_current(&run, handle.generation));
        drop(in_flight);
        // An older generation's forget never drops the current actor.
        registry.send(Forget { key: run.clone(), generation: handle.generation.wrapping_sub(1) }).await.unwrap();
        assert!(runs.is_current(&run, handle.generation));
        registry.send(Forget { key: run.clone(), generation: handle.generation }).await.unwrap();
        assert!(runs.get(&run).is_none());
        assert!(runs.is_empty());
        let next = resolve(&registry, &run).await.unwrap();
        assert_ne!(next.generation, handle.generation, "the next call spawns (rehydrates) a new actor");
    }

    #[actix_rt::test]
    async fn a_stale_deregistration_never_evicts_the_replacement() {
        let (_node, runs, registry) = registry(16);
        let run = key("acme", "run_1");
        let first = resolve(&registry, &run).await.unwrap();
        registry.send(Forget { key: run.clone(), generation: first.generation }).await.unwrap();
        let second = resolve(&registry, &run).await.unwrap();
        registry.send(Deregister { key: Arc::new(run.clone()), generation: first.generation }).await.unwrap();
        assert!(runs.is_current(&run, second.generation));
        registry.send(Deregister { key: Arc::new(run.clone()), generation: second.generation }).await.unwrap();
        assert!(runs.is_empty());
    }

    #[actix_rt::test]
    async fn idle_runs_are_evicted_and_busy_or_recent_ones_kept() {
        let (node, runs, registry) = registry(16);
        let idle = resolve(&registry, &key("acme", "idle")).await.unwrap();
        let busy = resolve(&registry, &key("acme", "busy")).await.unwrap();
        let recent = resolve(&registry, &key("acme", "recent")).await.unwrap();
        for run in [&idle, &busy] {
            run.activity.last_used.store(0, Ordering::Release);
        }
        let _in_flight = busy.activity.enter(usize::MAX).unwrap();
        // The same sweep the started registry runs on its timer, over the same table.
        Registry::new(Arc::clone(&node.shared), Arc::clone(&runs), node.learning.clone().recipient(), Vec::new())
            .evict_idle(std::time::Duration::from_secs(60));
        assert!(runs.get(&key("acme", "idle")).is_none(), "an idle run is evicted");
        assert!(runs.is_current(&key("acme", "busy"), busy.generation), "a call in flight keeps it");
        assert!(runs.is_current(&key("acme", "recent"), recent.generation), "recent use keeps it");
    }

    #[test]
    fn calls_in_flight_are_bounded_and_released() {
        let counter = Arc::new(Activity::default());
        let first = counter.enter(2).expect("room for one");
        let second = counter.enter(2).expect("room for two");
        assert!(counter.enter(2).is_none(), "a third call is refused");
        assert_eq!(counter.current(), 2, "the refused call is not counted");
        drop(second);
        let again = counter.enter(2).expect("a released slot is reused");
        drop((first, again));
        assert_eq!(counter.current(), 0, "every guard released its slot");
    }
}
