//! The run actor: one per live run. It holds the run's compiled snapshot (shared by `Arc`) and its
//! state, and handles the run's calls strictly one at a time: a call is evaluated, committed through the
//! writer, and only then applied and answered (`AtomicResponse`), so the next call sees its effects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::WeakRecipient;
use actix::prelude::*;
use runguard_contract::{
    Action, Decision, DecisionId, IncidentId, Outcome, RunId, RunStatus, Snapshot, SnapshotRef, StepCall, StepError,
    TenantId, Timestamp,
};
use runguard_engine::Outcome as Answer;
use runguard_engine::{CompiledSnapshot, Effects, LedgerItem, PeriodTotals, Refusal, Run, StoredHead, TenantRates};
use runguard_store::{
    LedgerCall, LedgerEntry, LoadedRun, RecordAppend, RecordAuthority, RunRollup, ShadowStats, StoredRun, WriteBatch,
    WriteOp,
};
use serde::Serialize;

use crate::actors::learning::{CommitRunEnd, IncidentDraft};
use crate::commit::Refused;
use crate::current_snapshots::CurrentSnapshot;
use crate::metric_families::with_hot;
use crate::node_error::NodeError;
use crate::shared::{Shared, now};
use crate::ticket::Ticket;

mod family;

pub use family::{Adopt, Lineage};

/// A run's identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RunKey {
    /// Its tenant.
    pub tenant: TenantId,
    /// Its id.
    pub run_id: RunId,
}

/// A message a run actor answers with `Result<Answer, NodeError>`; sent from the HTTP edge inside a
/// [`Ticketed`] call.
pub trait RunRequest: Message<Result = Result<Self::Answer, NodeError>> + Clone + Send + 'static {
    /// What the run answers.
    type Answer: Send + 'static;
    /// Whether the request creates the run (an actor whose creation failed holds no run).
    const CREATES: bool = false;
}

/// `POST /v1/runs` after the id is settled: create the run, or answer its creation again.
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<Created, NodeError>")]
pub struct CreateRun {
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The endpoint the run works against, if given.
    pub api_endpoint: Option<String>,
    /// The run's ancestors, root first and parent last, as its parent answered [`Adopt`]; empty for a
    /// root run.
    pub ancestors: Vec<RunId>,
}

impl RunRequest for CreateRun {
    type Answer = Created;
    const CREATES: bool = true;
}

/// A step call.
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<Decided, NodeError>")]
pub struct Step(pub Box<StepCall>);

impl RunRequest for Step {
    type Answer = Decided;
}

/// A step's answer: its decision's action and JSON. The JSON is encoded before the commit, so that the
/// decision itself moves into its ledger entry instead of being copied for the answer.
#[derive(Clone, Debug)]
pub struct Decided {
    /// The decision's action.
    pub action: Action,
    /// The decision's id (for the access log).
    pub decision_id: DecisionId,
    /// The decision as the step call answers it.
    pub json: Vec<u8>,
}

impl Decided {
    fn of(decision: &Decision) -> Result<Self, NodeError> {
        let json = serde_json::to_vec(decision).map_err(|_| NodeError::Internal)?;
        Ok(Self { action: decision.action, decision_id: decision.decision_id.clone(), json })
    }
}

/// End the run.
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<Ended, NodeError>")]
pub struct EndRun {
    /// How it ended.
    pub outcome: Outcome,
    /// The failing step's error.
    pub error: Option<StepError>,
}

impl RunRequest for EndRun {
    type Answer = Ended;
}

/// Apply the TTL if it has passed (sent by the registry's sweep); answers the run's status (`None` if the
/// run does not exist).
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<Option<RunStatus>, NodeError>")]
pub struct Touch;

impl RunRequest for Touch {
    type Answer = Option<RunStatus>;
}

/// A call from the HTTP edge: `msg`, done only if the actor takes `ticket` before the caller's timeout
/// abandons it (a call answered 503 is never applied, `docs/reliability.md`).
#[derive(Debug)]
pub struct Ticketed<M> {
    /// What to do.
    pub msg: M,
    /// Raced for with the caller.
    pub ticket: Ticket,
}

impl<M: Message> Message for Ticketed<M> {
    type Result = M::Result;
}

/// Sent by a run actor when it stops, to whoever placed it (the registry).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Deregister {
    /// The run.
    pub key: Arc<RunKey>,
    /// The generation of the stopping actor.
    pub generation: u64,
}

/// The answer to run creation (and to an identical re-creation).
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
#[schemars(rename = "RunCreated")]
pub struct CreateAnswer {
    /// The run.
    #[schemars(with = "runguard_contract::RunId")]
    pub run_id: String,
    /// Its status.
    #[schemars(with = "RunStatus")]
    pub status: &'static str,
    /// Its snapshot.
    pub snapshot: SnapshotRef,
    /// The run-start decision.
    pub decision: Decision,
}

/// Creation: 201 when `created`, else 200.
#[derive(Clone, Debug)]
pub struct Created {
    /// Whether this call created the run.
    pub created: bool,
    /// The answer.
    pub answer: Box<CreateAnswer>,
}

/// The run after `end`, and the incident its end created (serialised as it is: alphabetical fields).
#[derive(Clone, Debug, Serialize)]
pub struct Ended {
    /// The incident, if the run failed.
    pub incident_id: Option<IncidentId>,
    /// The run.
    pub run: Box<StoredRun>,
    /// What the run's descendants add, when the actor knows it without reading the store: a run that
    /// never had a parent or a child, on a store no other node writes (where every adoption of a child
    /// goes through this actor). `None`: read it from the store.
    #[serde(skip)]
    pub rollup: Option<RunRollup>,
}

impl Ended {
    fn new(run: StoredRun, incident_id: Option<IncidentId>, live: Option<&Live>, shared: &Shared) -> Self {
        let known = live.is_some_and(|live| !live.meta.in_family) && !shared.store.is_shared();
        Self { incident_id, run: Box::new(run), rollup: known.then(RunRollup::default) }
    }
}

/// What every run actor is given: the shared context, where run ends that create incidents go (the
/// learning loop), and whom to tell when it stops (the registry). One per registry, shared by `Arc`
/// (one pointer per live run).
#[derive(Debug)]
pub struct RunDeps {
    /// Store, writer and configuration.
    pub shared: Arc<Shared>,
    /// Commits run ends that create incidents.
    pub learning: Recipient<CommitRunEnd>,
    /// Told when an actor stops (weak: it must not keep its placer alive).
    pub stopped: WeakRecipient<Deregister>,
}

struct Live {
    run: Run,
    meta: RunMeta,
    /// How many ledger entries the stored run holds as this copy knows it: the fencing condition of its
    /// next write (`docs/store.md`, "Fencing").
    ledger_len: u64,
}

/// What a live run keeps of its stored form besides the engine's run, which holds the rest (ids, labels,
/// status, totals, termination, next call, times, outcome): one copy of each, which matters with 100,000
/// idle runs.
#[derive(Clone, Debug)]
struct RunMeta {
    /// Shared with every run created on the same snapshot.
    snapshot: Arc<SnapshotRef>,
    api_endpoint: Option<String>,
    /// Root first, parent last; empty for a root run.
    ancestors: Vec<RunId>,
    /// Whether the run has a parent or children: its calls then go through the run tree
    /// (`actors/run/family.rs`).
    in_family: bool,
}

impl RunMeta {
    /// The run as stored, from this and the engine's run.
    fn stored(&self, run: &Run) -> StoredRun {
        let state = run.state();
        let termination = state.termination.as_ref();
        StoredRun {
            tenant_id: state.tenant_id.clone(),
            run_id: state.run_id.clone(),
            snapshot: SnapshotRef::clone(&self.snapshot),
            status: state.status,
            totals: state.totals,
            termination_reason: termination.map(|t| t.reason),
            stopped_at_step: termination.and_then(|t| t.stopped_at_step),
            violation_policy_id: termination.and_then(|t| t.violation_policy_id.clone()),
            labels: state.labels.clone(),
            api_endpoint: self.api_endpoint.clone(),
            created_at: run.created_at(),
            ended_at: run.ended_at(),
            outcome: run.outcome(),
            next: state.next,
            parent_run_id: self.ancestors.last().cloned(),
            ancestors: self.ancestors.clone(),
            violation_run_id: termination.and_then(|t| t.violation_run_id.clone()),
        }
    }
}

/// The actor.
pub struct RunActor {
    key: Arc<RunKey>,
    generation: u64,
    deps: Arc<RunDeps>,
    live: Option<Live>,
    /// Lost fencing checks of the call being served.
    fenced: u32,
}

impl std::fmt::Debug for RunActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunActor").field("run", &self.key.run_id).finish_non_exhaustive()
    }
}

impl RunActor {
    /// A run actor for `key`, not yet loaded.
    pub fn new(key: Arc<RunKey>, generation: u64, deps: Arc<RunDeps>) -> Self {
        Self { key, generation, deps, live: None, fenced: 0 }
    }
}

impl Actor for RunActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // No timer of its own: the registry drops idle runs' addresses, and an actor whose last address
        // is gone stops (one timer per live run would cost memory with 100,000 idle runs).
        ctx.set_mailbox_capacity(self.deps.shared.config.limits.run_mailbox);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        if let Some(registry) = self.deps.stopped.upgrade() {
            registry.do_send(Deregister { key: Arc::clone(&self.key), generation: self.generation });
        }
    }
}

fn effects_bytes(effects: &Effects) -> Vec<u8> {
    serde_json::to_vec(effects).unwrap_or_default()
}

/// Rebuilds a run from the store; the engine re-checks it and fails it closed (integrity) when anything
/// does not check out.
fn rehydrate(shared: &Shared, loaded: LoadedRun) -> Live {
    let stored = loaded.run;
    let effects: Vec<Option<Effects>> =
        loaded.ledger.iter().map(|entry| serde_json::from_slice::<Effects>(&entry.effects).ok()).collect();
    let ledger = loaded.ledger.iter().zip(&effects).map(|(entry, effects)| LedgerItem {
        step: match &entry.call {
            LedgerCall::Step(call) => Some(call),
            _ => None,
        },
        decision: &entry.decision,
        effects: effects.as_ref(),
    });
    let snapshot = loaded.snapshot.as_ref().ok().map(|snapshot| shared.compiled(snapshot, &stored.snapshot.hash));
    let head = StoredHead {
        tenant_id: stored.tenant_id.clone(),
        run_id: stored.run_id.clone(),
        labels: stored.labels.clone(),
        status: stored.status,
        totals: stored.totals,
        snapshot_hash: stored.snapshot.hash.clone(),
        created_at: stored.created_at,
        ended_at: stored.ended_at,
        outcome: stored.outcome,
    };
    let run = Run::rehydrate(snapshot, head, ledger, loaded.totals_consistent).unwrap_or_else(|verdict| {
        tracing::error!(run_id = %stored.run_id, "run failed its integrity checks on load; every call will block");
        *verdict.run
    });
    let ledger_len = loaded.ledger.len() as u64;
    let in_family = !stored.ancestors.is_empty();
    let meta = RunMeta {
        snapshot: Arc::new(stored.snapshot),
        api_endpoint: stored.api_endpoint,
        ancestors: stored.ancestors,
        in_family,
    };
    Live { run, meta, ledger_len }
}

/// The call as its ledger entry keeps it: taken, not copied, since nothing needs it after evaluation.
fn strip_texts(call: StepCall, keep: bool) -> StepCall {
    if keep {
        return call;
    }
    StepCall { input_text: None, output_text: None, ..call }
}

/// Adds what an outcome must persist besides the ledger entry: its record and shadow statistics.
fn persist_outcome(batch: &mut WriteBatch, snapshot: &CompiledSnapshot, outcome: &Answer, tenant: &TenantId) {
    // A block decided by an ancestor's policy is recorded by `family::persist` with that ancestor's policy.
    let own_decision = outcome.decision.deciding_violation().is_none_or(|v| v.run_id.is_none());
    if let Some(record) = &outcome.record
        && own_decision
        && let Some(deciding) = outcome.decision.deciding_policy.as_ref().and_then(|p| snapshot.policy(&p.id))
    {
        batch.push(WriteOp::AppendRecord(Box::new(RecordAppend {
            record: record.clone(),
            authority: RecordAuthority::Live {
                decision: Box::new(outcome.decision.clone()),
                policy: Box::new(deciding.clone()),
                run_tenant: tenant.clone(),
            },
        })));
    }
    for delta in &outcome.shadow {
        let stats = ShadowStats {
            evaluations: delta.evaluations,
            would_block: delta.would_block,
            would_warn: delta.would_warn,
            would_throttle: delta.would_throttle,
        };
        batch.add_shadow_stats(delta.owner.clone(), tenant.clone(), delta.policy_id.clone(), stats);
    }
}

/// Texts above this many bytes make a step heavy when its snapshot scans texts.
const HEAVY_TEXT_BYTES: usize = 16 * 1024;

/// Whether evaluating `call` against `snapshot` scans large texts (content or CEL rules over more than
/// [`HEAVY_TEXT_BYTES`] of input text, output text and input keys).
fn scans_large_texts(snapshot: &CompiledSnapshot, call: &StepCall) -> bool {
    let text_bytes = call.input_text.as_ref().map_or(0, String::len)
        + call.output_text.as_ref().map_or(0, String::len)
        + call.input_keys.iter().map(String::len).sum::<usize>();
    text_bytes > HEAVY_TEXT_BYTES && snapshot.scans_texts()
}

/// Answers a step, with the tenant's rate windows locked when the snapshot has tenant-scope rate rules,
/// against the tenant's period totals (empty unless the snapshot has tenant-period budgets).
fn step_run(
    shared: &Shared,
    run: &Run,
    call: &StepCall,
    periods: &PeriodTotals,
    at: Timestamp,
) -> (Result<Answer, Refusal>, Duration) {
    let started = Instant::now();
    let limits = shared.config.run_limits();
    let answer = if run.snapshot().uses_tenant_rates() {
        shared
            .with_tenant_rates(&run.state().tenant_id, |rates| run.step_with_periods(call, &limits, rates, periods, at))
    } else {
        run.step_with_periods(call, &limits, &mut TenantRates::default(), periods, at)
    };
    (answer, started.elapsed())
}

/// What is counted of a decision once it is committed: taken from the outcome before its decision moves
/// into the ledger entry.
struct Counted {
    action: Action,
    record: bool,
    would_block: u64,
    fail_opens: u64,
}

impl Counted {
    fn of(outcome: &Answer) -> Self {
        let decision = &outcome.decision;
        Self {
            action: decision.action,
            record: outcome.record.is_some(),
            would_block: decision.shadow.iter().filter(|s| s.would_action == Action::Block).count() as u64,
            fail_opens: outcome.fail_opens.len() as u64,
        }
    }
}

/// Counts a decision; `evaluated` is the engine time of a step call (run starts and ends are not timed, so
/// they stay out of the evaluation latency rather than add zeros to it).
fn record_metrics(counted: &Counted, evaluated: Option<Duration>) {
    with_hot(|hot| {
        hot.decisions(counted.action).increment(1);
        if let Some(elapsed) = evaluated {
            hot.evaluation().record(elapsed.as_secs_f64());
        }
        if counted.record {
            hot.prevention_records.increment(1);
        }
        if counted.action == Action::Throttle {
            hot.throttles.increment(1);
        }
        if counted.would_block > 0 {
            hot.shadow_would_block.increment(counted.would_block);
        }
        if counted.fail_opens > 0 {
            hot.fail_open.increment(counted.fail_opens);
        }
    });
}

impl RunActor {
    async fn load(shared: Arc<Shared>, key: Arc<RunKey>) -> Result<Option<Live>, NodeError> {
        let (tenant, run_id) = (key.tenant.clone(), key.run_id.clone());
        shared
            .blocking(move |shared| {
                let loaded = shared.store.load_run(&tenant, &run_id)?;
                let Some(mut live) = loaded.map(|loaded| rehydrate(shared, loaded)) else { return Ok(None) };
                family::join_on_load(shared, &mut live)?;
                Ok(Some(live))
            })
            .await
    }

    async fn create(shared: Arc<Shared>, key: Arc<RunKey>, request: CreateRun) -> Result<(Live, Decision), NodeError> {
        let current = Self::current_snapshot(&shared, &key.tenant).await?;
        let (reference, compiled) = (Arc::clone(&current.reference), Arc::clone(&current.compiled));
        let at = now();
        let (run, answer) = Run::start(compiled, key.tenant.clone(), key.run_id.clone(), request.labels, at);
        let run = run.after(&answer);
        let in_family = !request.ancestors.is_empty();
        let meta = RunMeta {
            snapshot: reference,
            api_endpoint: request.api_endpoint,
            ancestors: request.ancestors,
            in_family,
        };
        let mut batch = WriteBatch::new();
        family::on_create(&shared, &meta, &key, &mut batch)?;
        if let Some(snapshot) = &current.unstored {
            batch.put_snapshot(Snapshot::clone(snapshot));
        }
        batch.fence_run(key.tenant.clone(), key.run_id.clone(), 0);
        batch.put_run(meta.stored(&run));
        let entry = LedgerEntry::new(LedgerCall::RunStart, answer.decision.clone(), run.state().totals)
            .with_effects(effects_bytes(&answer.effects));
        batch.append_ledger(key.tenant.clone(), key.run_id.clone(), entry);
        persist_outcome(&mut batch, run.snapshot(), &answer, &key.tenant);
        shared.commit(batch).await?;
        family::created(&shared, &meta, &key, &run);
        if current.unstored.is_some() {
            shared.current_snapshots.stored(&key.tenant, &current.reference);
        }
        record_metrics(&Counted::of(&answer), None);
        crate::decision_log::applied(&key.tenant, &answer);
        tracing::info!(run_id = %key.run_id, tenant = %key.tenant, decision_id = %answer.decision.decision_id, "run created");
        Ok((Live { run, meta, ledger_len: 1 }, answer.decision))
    }

    /// The snapshot a run of `tenant` created now is bound to: the cached one while the policies are
    /// unchanged, else captured anew. Reading the policies, hashing the snapshot and compiling it (regexes,
    /// CEL) all block: off the actor's thread.
    async fn current_snapshot(shared: &Arc<Shared>, tenant: &TenantId) -> Result<CurrentSnapshot, NodeError> {
        // Read before the policies: a policy change committed after this read makes the entry stale.
        let generation = if shared.store.is_shared() {
            // A read of the database's generation, shared by every node: off the actor's thread.
            shared.blocking(|shared| Ok::<_, NodeError>(shared.store.policy_generation())).await?
        } else {
            shared.store.policy_generation()
        };
        if let Some(current) = shared.current_snapshots.get(tenant, generation) {
            return Ok(current);
        }
        let tenant = tenant.clone();
        shared
            .blocking(move |shared| {
                let policies = runguard_store::all_pages(|page| shared.store.list_policies(&tenant, None, page))?;
                let snapshot = Snapshot::capture(&tenant, &policies);
                let reference = Arc::new(snapshot.reference().map_err(|_| NodeError::Internal)?);
                let compiled = shared.compiled(&snapshot, &reference.hash);
                let current = CurrentSnapshot { generation, reference, compiled, unstored: Some(Arc::new(snapshot)) };
                shared.current_snapshots.insert(&tenant, current.clone());
                Ok(current)
            })
            .await
    }

    fn answer(live: &Live, decision: Decision) -> CreateAnswer {
        CreateAnswer {
            run_id: live.run.state().run_id.to_string(),
            status: live.run.state().status.as_str(),
            snapshot: SnapshotRef::clone(&live.meta.snapshot),
            decision,
        }
    }

    /// A running run past its TTL becomes `expired` (persisted) before anything else happens to it.
    fn expiry(&mut self, at: Timestamp) -> Option<WriteBatch> {
        let live = self.live.as_mut()?;
        let limits = self.deps.shared.config.run_limits();
        if !live.run.expire_if_due(at, &limits) {
            return None;
        }
        let mut batch = WriteBatch::new();
        batch.fence_run(self.key.tenant.clone(), self.key.run_id.clone(), live.ledger_len);
        batch.put_run(live.meta.stored(&live.run));
        Some(batch)
    }
}

/// An operation on the loaded run, done once any due expiry is persisted.
type Op<T> = Box<dyn FnOnce(&mut RunActor, Arc<Shared>, Timestamp) -> Pending<T>>;
type Pending<T> = std::pin::Pin<Box<dyn ActorFuture<RunActor, Output = Result<T, NodeError>>>>;
type Reply<T> = AtomicResponse<RunActor, Result<T, NodeError>>;

/// Whether the actor has read its run from the store before a creation.
#[derive(Clone, Copy, Debug)]
enum Read {
    /// Not yet: the creation is committed on the condition that the run does not exist.
    NotYet,
    /// Read: what the actor holds (or that it holds nothing) is the store's.
    Done,
}

fn ready<T: 'static>(answer: Result<T, NodeError>) -> Pending<T> {
    Box::pin(fut::ready(answer))
}

impl RunActor {
    /// Loads the run if this actor has not yet, then runs `op` on it, strictly one call at a time.
    fn serve<T: 'static>(&mut self, op: Op<T>) -> Reply<T> {
        self.fenced = 0;
        let shared = Arc::clone(&self.deps.shared);
        let key = self.key.clone();
        let loaded = self.live.is_some();
        let load = async move { if loaded { Ok(None) } else { RunActor::load(shared, key).await.map(Some) } };
        AtomicResponse::new(Box::pin(load.into_actor(self).then(move |loaded, actor, _| {
            match loaded {
                Err(err) => return ready(Err(err)),
                Ok(Some(Some(live))) => actor.live = Some(live),
                Ok(Some(None)) | Ok(None) => {}
            }
            actor.dispatch(op)
        })))
    }

    /// Forgets the run's state, so that its next call reads it back from the store: after a commit whose
    /// outcome is unknown (the writer stopped after taking it, or the learning actor did not answer in
    /// time), or after an expiry applied in memory whose commit failed.
    fn forget(&mut self) {
        self.live = None;
    }

    /// Persists a due expiry first, so that nothing happens to a run past its TTL but its expiry.
    fn dispatch<T: 'static>(&mut self, op: Op<T>) -> Pending<T> {
        let shared = Arc::clone(&self.deps.shared);
        let at = now();
        if let Some(batch) = self.expiry(at) {
            let committing = Arc::clone(&shared);
            return Box::pin(async move { committing.commit(batch).await }.into_actor(self).then(
                move |committed, actor, _| match committed {
                    // Another node expired, ended or stepped the run first: what it did stands.
                    Err(err) if fenced(&err) => actor.recover("fenced", op),
                    Err(err) => {
                        // The expiry was applied in memory before its commit failed.
                        actor.forget();
                        ready(Err(err))
                    }
                    Ok(_) => {
                        tracing::info!(run_id = %actor.key.run_id, tenant = %actor.key.tenant, "run expired");
                        if let Some(live) = actor.live.as_ref() {
                            family::left_running(&shared, &actor.key, live);
                        }
                        op(actor, shared, now())
                    }
                },
            ));
        }
        op(self, shared, at)
    }
}

impl Handler<CreateRun> for RunActor {
    type Result = Reply<Created>;

    fn handle(&mut self, msg: CreateRun, _: &mut Self::Context) -> Self::Result {
        if self.live.is_none() {
            // A creation does not read the run first: its commit is fenced on the run not existing, and a
            // run that does exist (a creation sent again) is read back then. One blocking store read less
            // for every new run, which is nearly every creation.
            self.fenced = 0;
            let shared = Arc::clone(&self.deps.shared);
            return AtomicResponse::new(self.handle_create(msg, shared, Read::NotYet));
        }
        self.serve(Box::new(move |actor, shared, _| actor.handle_create(msg, shared, Read::Done)))
    }
}

impl Handler<Step> for RunActor {
    type Result = Reply<Decided>;

    fn handle(&mut self, Step(call): Step, _: &mut Self::Context) -> Self::Result {
        self.serve(Box::new(move |actor, shared, at| actor.handle_step(*call, shared, at)))
    }
}

impl Handler<EndRun> for RunActor {
    type Result = Reply<Ended>;

    fn handle(&mut self, msg: EndRun, _: &mut Self::Context) -> Self::Result {
        self.serve(Box::new(move |actor, shared, at| actor.handle_end(msg.outcome, msg.error, shared, at)))
    }
}

impl Handler<Touch> for RunActor {
    type Result = Reply<Option<RunStatus>>;

    fn handle(&mut self, _: Touch, _: &mut Self::Context) -> Self::Result {
        self.serve(Box::new(|actor, _, _| ready(Ok(actor.live.as_ref().map(|l| l.run.state().status)))))
    }
}

/// The ticketed form of each request: done only if the actor takes the ticket first.
macro_rules! ticketed {
    ($($request:ty),*) => {$(
        impl Handler<Ticketed<$request>> for RunActor {
            type Result = Reply<<$request as RunRequest>::Answer>;

            fn handle(&mut self, call: Ticketed<$request>, ctx: &mut Self::Context) -> Self::Result {
                if !call.ticket.take() {
                    // The caller already answered 503: the call must not happen.
                    return AtomicResponse::new(ready(Err(NodeError::unavailable(
                        "the call timed out before the run took it; treat it as a block",
                    ))));
                }
                <Self as Handler<$request>>::handle(self, call.msg, ctx)
            }
        }
    )*};
}

ticketed!(CreateRun, Step, EndRun, Touch, family::Adopt);

impl RunActor {
    fn handle_create(&mut self, request: CreateRun, shared: Arc<Shared>, read: Read) -> Pending<Created> {
        if self.live.is_some() {
            // The same run again: answer its creation, whose decision is the ledger's first entry (kept in
            // the store rather than in every live run's memory).
            let (tenant, run_id) = (self.key.tenant.clone(), self.key.run_id.clone());
            let first = async move {
                shared.read(move |store| store.ledger(&tenant, &run_id, &runguard_store::PageRequest::first(1))).await
            };
            return Box::pin(first.into_actor(self).map(|page, actor, _| {
                let decision = page?.items.into_iter().next().map(|entry| entry.decision).ok_or(NodeError::Internal)?;
                let live = actor.live.as_ref().ok_or(NodeError::Internal)?;
                Ok(Created { created: false, answer: Box::new(Self::answer(live, decision)) })
            }));
        }
        let key = self.key.clone();
        let again = request.clone();
        Box::pin(RunActor::create(shared, key, request).into_actor(self).then(move |created, actor, _| {
            let (live, decision) = match created {
                Ok(created) => created,
                // The run exists: created by an earlier call (not read yet), or by another node meanwhile.
                // Either way its creation is answered as a repeated one.
                Err(err) if fenced(&err) => {
                    let op: Op<Created> =
                        Box::new(move |actor, shared, _| actor.handle_create(again, shared, Read::Done));
                    return match read {
                        Read::NotYet => actor.reload(op),
                        Read::Done => actor.recover("fenced", op),
                    };
                }
                Err(err) => return ready(Err(err)),
            };
            let answer = Box::new(Self::answer(&live, decision));
            actor.live = Some(live);
            ready(Ok(Created { created: true, answer }))
        }))
    }

    fn handle_step(&mut self, call: StepCall, shared: Arc<Shared>, at: Timestamp) -> Pending<Decided> {
        let Some(live) = self.live.as_ref() else {
            return ready(Err(NodeError::not_found("run", self.key.run_id.as_str())));
        };
        if live.meta.in_family {
            return self.family_step(call, shared, at);
        }
        if crate::tenant_state::needs_view(&shared.store, live.run.snapshot()) {
            return self.step_in_periods(call, shared, at, crate::tenant_state::REEVALUATIONS);
        }
        if scans_large_texts(live.run.snapshot(), &call) {
            // Content and CEL rules over large texts cost milliseconds: evaluated in the tenant's lane on the
            // blocking pool, so that one tenant's heavy steps neither stall the HTTP worker this actor lives
            // on nor take more than the tenant's share of the cores. The actor stays busy meanwhile, so the
            // run's calls keep their order.
            let (run, tenant) = (live.run.clone(), live.run.state().tenant_id.clone());
            let lane = Arc::clone(&shared);
            let evaluated = async move {
                lane.heavy(&tenant, move |shared| {
                    let (answer, elapsed) = step_run(shared, &run, &call, &PeriodTotals::default(), at);
                    Ok((answer, elapsed, call))
                })
                .await
            };
            return Box::pin(evaluated.into_actor(self).then(move |evaluated, actor, _| match evaluated {
                Ok((answer, elapsed, call)) => actor.persist_step(call, answer, elapsed, shared),
                Err(err) => ready(Err(err)),
            }));
        }
        let (answer, elapsed) = step_run(&shared, &live.run, &call, &PeriodTotals::default(), at);
        self.persist_step(call, answer, elapsed, shared)
    }

    /// A step of a run whose snapshot has tenant-period budgets, or tenant-scope rate rules on a node
    /// that shares them through PostgreSQL (`crate::tenant_state`): the tenant's totals and windows are
    /// read from the store and the call evaluated against them off the actor's thread; when the commit
    /// finds a bounded increment no longer fits (the tenant's state moved meanwhile, on this node or
    /// another), the call is evaluated again on fresh state, at most `retries` more times.
    fn step_in_periods(
        &mut self,
        call: StepCall,
        shared: Arc<Shared>,
        at: Timestamp,
        retries: u32,
    ) -> Pending<Decided> {
        let Some(live) = self.live.as_ref() else {
            return ready(Err(NodeError::not_found("run", self.key.run_id.as_str())));
        };
        let run = live.run.clone();
        let again = call.clone();
        let reading = Arc::clone(&shared);
        let evaluated = async move {
            reading
                .blocking(move |shared| {
                    let view = crate::tenant_state::read_view(&shared.store, &run, at).map_err(NodeError::Store)?;
                    if let Some(mut rates) = view.rates {
                        let started = Instant::now();
                        let limits = shared.config.run_limits();
                        let answer = run.step_with_periods(&call, &limits, &mut rates, &view.periods, at);
                        return Ok((answer, started.elapsed(), call));
                    }
                    let (answer, elapsed) = step_run(shared, &run, &call, &view.periods, at);
                    Ok::<_, NodeError>((answer, elapsed, call))
                })
                .await
        };
        Box::pin(evaluated.into_actor(self).then(move |evaluated, actor, _| {
            let (answer, elapsed, call) = match evaluated {
                Ok(evaluated) => evaluated,
                Err(err) => return ready(Err(err)),
            };
            let persisted = actor.persist_step(call, answer, elapsed, Arc::clone(&shared));
            Box::pin(persisted.then(move |result, actor, _| match result {
                Err(NodeError::Store(err)) if err.is_tenant_limit() => {
                    metrics::counter!("runguard_tenant_total_reevaluations_total").increment(1);
                    if retries == 0 {
                        tracing::warn!(run_id = %actor.key.run_id, error = %err, "tenant totals kept moving");
                        return ready(Err(NodeError::unavailable("the tenant's totals are contended; retry the call")));
                    }
                    actor.step_in_periods(again, shared, now(), retries - 1)
                }
                other => ready(other),
            })) as Pending<Decided>
        }))
    }

    /// Commits an evaluated step and, once it is durable, applies it and answers its decision.
    fn persist_step(
        &mut self,
        call: StepCall,
        answer: Result<Answer, Refusal>,
        elapsed: Duration,
        shared: Arc<Shared>,
    ) -> Pending<Decided> {
        self.persist_family_step(call, answer, elapsed, shared, None)
    }

    /// [`persist_step`](Self::persist_step) for a call that reserved usage in the run tree: its rolled-up
    /// increments and an ancestor-decided record join the batch, and the reservation is settled once the
    /// commit is decided (`actors/run/family.rs`).
    fn persist_family_step(
        &mut self,
        call: StepCall,
        answer: Result<Answer, Refusal>,
        elapsed: Duration,
        shared: Arc<Shared>,
        family: Option<family::FamilyCall>,
    ) -> Pending<Decided> {
        let answer = match answer {
            Ok(answer) if answer.is_replay() => return ready(Decided::of(&answer.decision)),
            Ok(answer) => answer,
            // Refused by a copy of the run that may be stale: read it back once and decide again.
            Err(why) if !matches!(why, Refusal::StepLimit { .. }) && self.may_be_stale(&shared) => {
                return self
                    .recheck_refusal(why, Box::new(move |actor, shared, at| actor.handle_step(call, shared, at)));
            }
            Err(why) => {
                let reason = if matches!(why, Refusal::StepLimit { .. }) { "step_limit" } else { "order" };
                metrics::counter!("runguard_refused_calls_total", "reason" => reason).increment(1);
                return ready(Err(NodeError::Refused(why)));
            }
        };
        let Some(live) = self.live.as_ref() else {
            return ready(Err(NodeError::not_found("run", self.key.run_id.as_str())));
        };
        let decided = match Decided::of(&answer.decision) {
            Ok(decided) => decided,
            Err(err) => return ready(Err(err)),
        };
        let counted = Counted::of(&answer);
        let logged = crate::decision_log::Deferred::of(&answer);
        let next = live.run.after(&answer);
        let (tenant, run_id) = (&live.run.state().tenant_id, &live.run.state().run_id);
        let mut batch = WriteBatch::new();
        batch.fence_run(tenant.clone(), run_id.clone(), live.ledger_len);
        persist_outcome(&mut batch, live.run.snapshot(), &answer, tenant);
        let again = retry_copy(&shared, &call);
        crate::tenant_state::add_deltas(&mut batch, tenant, &answer.period_deltas);
        crate::tenant_state::add_rate_delta(&mut batch, &shared.store, tenant, answer.tenant_rate_delta.as_ref());
        let answer_record = family::RecordBasis::of(&answer);
        let bounded = family::bounds_apply(&shared, &answer);
        let stored_call = strip_texts(call, shared.config.ledger_texts);
        let effects = effects_bytes(&answer.effects);
        let entry =
            LedgerEntry::new(LedgerCall::Step(stored_call), answer.decision, next.state().totals).with_effects(effects);
        // A step that neither stops the run nor is throttled moves only its totals and next call, which its
        // ledger entry carries: the store need not rewrite the whole run.
        let moved_only = next.state().status.is_running() && entry.decision.action != Action::Throttle;
        batch.append_ledger(tenant.clone(), run_id.clone(), entry);
        if moved_only {
            batch.advance_run(live.meta.stored(&next));
        } else {
            batch.put_run(live.meta.stored(&next));
        }
        let family = family.map(|family| {
            let bounds = if bounded { family.bounds(run_id, live.run.snapshot()) } else { Vec::new() };
            let reservation = family.extend(&mut batch, &answer_record, tenant);
            for (run, metric, max) in bounds {
                batch.check_rolled_up(tenant.clone(), run, metric, max);
            }
            reservation
        });
        let settled = (Arc::clone(&shared), next.state().totals, next.state().status.is_running());
        Box::pin(async move { shared.commit_settled(batch).await }.into_actor(self).then(move |committed, actor, _| {
            let landed = committed.as_ref().map_or_else(|refused| !refused.settled, |_| true);
            family::settle(&settled.0, family, landed.then_some((settled.1, settled.2)));
            if let Err(refused) = committed {
                if let Some(call) = again.filter(|_| fenced(&refused.error)) {
                    return actor
                        .recover("fenced", Box::new(move |actor, shared, at| actor.handle_step(call, shared, at)));
                }
                if !refused.settled || fenced(&refused.error) {
                    actor.forget();
                }
                return ready(Err(refused.error));
            }
            record_metrics(&counted, Some(elapsed));
            logged.applied(&actor.key.tenant);
            if let Some(live) = actor.live.as_mut() {
                live.run = next;
                live.ledger_len += 1;
            }
            ready(Ok(decided))
        }))
    }

    fn handle_end(
        &mut self,
        outcome: Outcome,
        error: Option<StepError>,
        shared: Arc<Shared>,
        at: Timestamp,
    ) -> Pending<Ended> {
        let Some(live) = self.live.as_ref() else {
            return ready(Err(NodeError::not_found("run", self.key.run_id.as_str())));
        };
        let Some(answer) = live.run.end(outcome, error.as_ref(), at) else {
            // Ending an ended or stopped run changes nothing.
            return ready(Ok(Ended::new(live.meta.stored(&live.run), None, Some(live), &shared)));
        };
        let next = live.run.after(&answer);
        let run = live.meta.stored(&next);
        let (tenant, run_id) = (&live.run.state().tenant_id, &live.run.state().run_id);
        let mut batch = WriteBatch::new();
        batch.fence_run(tenant.clone(), run_id.clone(), live.ledger_len);
        let again = EndRun { outcome, error: error.clone() };
        let entry =
            LedgerEntry::new(LedgerCall::RunEnd { outcome, error }, answer.decision.clone(), next.state().totals)
                .with_effects(effects_bytes(&answer.effects));
        batch.append_ledger(tenant.clone(), run_id.clone(), entry);
        batch.put_run(run.clone());
        persist_outcome(&mut batch, live.run.snapshot(), &answer, tenant);
        let incident = answer.incident.as_ref().map(|basis| IncidentDraft {
            tenant: tenant.clone(),
            run_id: run_id.clone(),
            signature: basis.signature.clone(),
            error: basis.error.clone(),
        });
        // Only an end that creates an incident goes through the learning actor, which serialises the
        // pattern read-modify-writes; any other end commits directly rather than queue behind them.
        let learning = self.deps.learning.clone();
        let committed = async move {
            match incident {
                // A refused end is rare: the run is read back from the store before its next call rather
                // than trusting that the learning actor's refusal says whether its commit landed. No
                // timeout on the send: the learning actor answers at once with a future that bounds its
                // own waiting and whose commit must not be abandoned once the writer holds it.
                Some(incident) => match learning.send(CommitRunEnd { batch, incident: Some(incident) }).await {
                    Ok(answer) => answer,
                    Err(err) => {
                        tracing::error!(error = %err, "learning actor unavailable");
                        Err(NodeError::unavailable("the learning loop is overloaded or stopped; retry"))
                    }
                }
                .map_err(|error| Refused { error, settled: false }),
                None => shared.commit_settled(batch).await.map(|_| None),
            }
        };
        Box::pin(committed.into_actor(self).then(move |committed, actor, _| {
            let incident_id = match committed {
                Ok(incident_id) => incident_id,
                Err(refused) if fenced(&refused.error) => {
                    let EndRun { outcome, error } = again;
                    return actor.recover(
                        "fenced",
                        Box::new(move |actor, shared, at| actor.handle_end(outcome, error, shared, at)),
                    );
                }
                Err(refused) => {
                    if !refused.settled {
                        actor.forget();
                    }
                    return ready(Err(refused.error));
                }
            };
            record_metrics(&Counted::of(&answer), None);
            crate::decision_log::applied(&actor.key.tenant, &answer);
            if let Some(live) = actor.live.as_mut() {
                live.run = next;
                live.ledger_len += 1;
                family::left_running(&actor.deps.shared, &actor.key, live);
            }
            ready(Ok(Ended::new(run, incident_id, actor.live.as_ref(), &actor.deps.shared)))
        }))
    }
}

/// How often one call may lose its fencing check and start again before it is refused: each loss means
/// another node wrote the run meanwhile, so a call that keeps losing is racing a busy writer elsewhere.
const FENCE_RETRIES: u32 = 4;

/// Whether a commit lost its fencing check (`docs/architecture.md`, "Cluster: fencing and consistency").
fn fenced(err: &NodeError) -> bool {
    matches!(err, NodeError::Store(err) if err.kind() == runguard_store::StoreErrorKind::Fenced)
}

/// A copy of a step call to evaluate again should its commit lose the fencing check. Only a store other
/// nodes write can fence a node (sled has one writer, this node), so only then is the call copied.
fn retry_copy(shared: &Shared, call: &StepCall) -> Option<StepCall> {
    shared.store.is_shared().then(|| call.clone())
}

impl RunActor {
    /// Whether a refusal by this node's copy of the run may come from a copy another node made stale:
    /// only when other nodes write the store, and only before this call read the run back.
    fn may_be_stale(&self, shared: &Shared) -> bool {
        self.fenced == 0 && shared.store.is_shared()
    }

    /// A refusal by a copy that may be stale: answered as it is when the store's ledger is as long as the
    /// copy's (one indexed read of the last entry), else the run is read back and the call decided again.
    /// The check keeps a client that keeps sending out-of-order calls from making the node reload a long
    /// run's whole ledger on every one.
    fn recheck_refusal<T: 'static>(&mut self, why: Refusal, op: Op<T>) -> Pending<T> {
        let known = self.live.as_ref().map(|live| live.ledger_len);
        let (shared, key) = (Arc::clone(&self.deps.shared), Arc::clone(&self.key));
        let stored = async move { shared.read(move |store| store.last_ledger_entry(&key.tenant, &key.run_id)).await };
        Box::pin(stored.into_actor(self).then(move |stored, actor, _| match stored {
            Ok(Some(last)) if Some(last.position.saturating_add(1)) == known => {
                metrics::counter!("runguard_refused_calls_total", "reason" => "order").increment(1);
                ready(Err(NodeError::Refused(why)))
            }
            Err(err) => ready(Err(err)),
            Ok(_) => actor.recover("refused", op),
        }))
    }

    /// After a lost fencing check: drops this node's copy of the run, reads the run back and does `op` on
    /// what it now is — evaluated if the call is still the next one, the stored decision if an identical
    /// call was decided elsewhere (the engine's replay), the run's status if it stopped or ended, else
    /// the refusal one node would answer.
    fn recover<T: 'static>(&mut self, reason: &'static str, op: Op<T>) -> Pending<T> {
        self.fenced += 1;
        metrics::counter!("runguard_cluster_reloads_total", "reason" => reason).increment(1);
        tracing::info!(run_id = %self.key.run_id, tenant = %self.key.tenant, reason, attempt = self.fenced, "reloading a run another node may have changed");
        if self.fenced > FENCE_RETRIES {
            return ready(Err(NodeError::unavailable("the run is being changed on another node; retry the call")));
        }
        self.reload(op)
    }

    /// Reads the run from the store and then does `op`.
    fn reload<T: 'static>(&mut self, op: Op<T>) -> Pending<T> {
        self.forget();
        let load = RunActor::load(Arc::clone(&self.deps.shared), Arc::clone(&self.key));
        Box::pin(load.into_actor(self).then(move |loaded, actor, _| match loaded {
            Err(err) => ready(Err(err)),
            Ok(live) => {
                actor.live = live;
                actor.dispatch(op)
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use runguard_contract::{Phase, RunStatus};

    use super::*;
    use crate::actors::test_support::{Node, key};

    fn create() -> CreateRun {
        CreateRun { labels: BTreeMap::new(), api_endpoint: None, ancestors: Vec::new() }
    }

    fn step(index: u64, phase: Phase) -> Step {
        Step(Box::new(StepCall::new(index, phase)))
    }

    #[actix_rt::test]
    async fn a_run_is_created_stepped_and_ended_through_its_messages() {
        let node = Node::start(|_| {});
        let run = node.run("acme", "run_1").await;
        let created = run.send(create()).await.unwrap().unwrap();
        assert!(created.created);
        assert_eq!(created.answer.status, "running");
        let again = run.send(create()).await.unwrap().unwrap();
        assert!(!again.created, "a second creation answers the first");
        assert_eq!(again.answer.decision.decision_id, created.answer.decision.decision_id);
        for phase in [Phase::Pre, Phase::Post] {
            let decision = run.send(step(0, phase)).await.unwrap().unwrap();
            assert_eq!(decision.action, Action::Allow);
        }
        let ended = run.send(EndRun { outcome: Outcome::Succeeded, error: None }).await.unwrap().unwrap();
        assert_eq!(ended.run.status, RunStatus::Succeeded);
        assert!(ended.incident_id.is_none());
        let key = key("acme", "run_1");
        let stored = node.store.get_run(&key.tenant, &key.run_id).unwrap().unwrap();
        assert_eq!(stored.status, RunStatus::Succeeded, "the end was committed before it was answered");
        assert_eq!(node.store.full_ledger(&key.tenant, &key.run_id).unwrap().len(), 4);
    }

    #[actix_rt::test]
    async fn a_creation_sent_again_to_a_new_actor_answers_the_first_and_writes_nothing() {
        let node = Node::start(|_| {});
        let first = node.run("acme", "run_1").await.send(create()).await.unwrap().unwrap();
        node.run("acme", "run_1").await.send(step(0, Phase::Pre)).await.unwrap().unwrap();
        let ended = node.run("acme", "run_2").await;
        ended.send(create()).await.unwrap().unwrap();
        ended.send(EndRun { outcome: Outcome::Succeeded, error: None }).await.unwrap().unwrap();
        // New actors: the creation is committed without reading the run, and its fencing finds it.
        let node = node.restarted();
        let again = node.run("acme", "run_1").await.send(create()).await.unwrap().unwrap();
        assert!(!again.created, "a second creation answers the first");
        assert_eq!(again.answer.decision.decision_id, first.answer.decision.decision_id);
        assert_eq!(again.answer.status, "running");
        let key1 = key("acme", "run_1");
        assert_eq!(node.store.full_ledger(&key1.tenant, &key1.run_id).unwrap().len(), 2, "nothing was written");
        let decision = node.run("acme", "run_1").await.send(step(0, Phase::Post)).await.unwrap().unwrap();
        assert_eq!(decision.action, Action::Allow, "the run goes on where it was");
        let stopped = node.run("acme", "run_2").await.send(create()).await.unwrap().unwrap();
        assert!(!stopped.created);
        assert_eq!(stopped.answer.status, "succeeded", "an ended run is answered as it is");
    }

    #[actix_rt::test]
    async fn an_end_knows_a_lone_runs_rollup_and_leaves_a_parents_to_the_store() {
        let node = Node::start(|_| {});
        let lone = node.run("acme", "lone").await;
        lone.send(create()).await.unwrap().unwrap();
        let ended = lone.send(EndRun { outcome: Outcome::Succeeded, error: None }).await.unwrap().unwrap();
        assert_eq!(ended.rollup, Some(RunRollup::default()), "no parent, no child: nothing to read");
        let parent = node.run("acme", "parent").await;
        parent.send(create()).await.unwrap().unwrap();
        let lineage = parent.send(family::Adopt).await.unwrap().unwrap();
        let child = node.run("acme", "child").await;
        child.send(CreateRun { ancestors: lineage.ancestors, ..create() }).await.unwrap().unwrap();
        let ended = child.send(EndRun { outcome: Outcome::Succeeded, error: None }).await.unwrap().unwrap();
        assert_eq!(ended.rollup, None, "a child's end reads what it rolls up");
        let ended = parent.send(EndRun { outcome: Outcome::Succeeded, error: None }).await.unwrap().unwrap();
        assert_eq!(ended.rollup, None, "a parent's children are read from the store");
    }

    #[actix_rt::test]
    async fn a_step_answers_the_json_of_the_decision_its_ledger_entry_holds() {
        let node = Node::start(|_| {});
        let run = node.run("acme", "run_1").await;
        run.send(create()).await.unwrap().unwrap();
        let decided = run.send(step(0, Phase::Pre)).await.unwrap().unwrap();
        let key = key("acme", "run_1");
        let ledger = node.store.full_ledger(&key.tenant, &key.run_id).unwrap();
        let stored = &ledger.last().unwrap().decision;
        assert_eq!(decided.json, serde_json::to_vec(stored).unwrap(), "the answer is the committed decision");
        assert_eq!(decided.action, stored.action);
        let again = run.send(step(0, Phase::Pre)).await.unwrap().unwrap();
        assert_eq!(again.json, decided.json, "an identical retry answers the same bytes");
    }

    #[actix_rt::test]
    async fn a_call_out_of_order_is_refused_and_changes_nothing() {
        let node = Node::start(|_| {});
        let run = node.run("acme", "run_1").await;
        run.send(create()).await.unwrap().unwrap();
        let refused = run.send(step(3, Phase::Pre)).await.unwrap().unwrap_err();
        assert!(matches!(refused, NodeError::Refused(Refusal::OutOfOrder { ref expected }) if expected.index == 0));
        let decision = run.send(step(0, Phase::Pre)).await.unwrap().unwrap();
        assert_eq!(decision.action, Action::Allow, "the expected call is still taken");
    }

    #[actix_rt::test]
    async fn a_call_to_a_run_that_was_never_created_is_not_found() {
        let node = Node::start(|_| {});
        let run = node.run("acme", "ghost").await;
        let err = run.send(step(0, Phase::Pre)).await.unwrap().unwrap_err();
        assert!(matches!(err, NodeError::NotFound { what: "run", .. }), "{err:?}");
        let status = run.send(Touch).await.unwrap().unwrap();
        assert_eq!(status, None);
    }

    #[actix_rt::test]
    async fn a_call_whose_ticket_was_abandoned_is_never_done() {
        let node = Node::start(|_| {});
        let run = node.run("acme", "run_1").await;
        let ticket = Ticket::new();
        assert!(ticket.abandon());
        let err = run.send(Ticketed { msg: create(), ticket }).await.unwrap().unwrap_err();
        assert!(matches!(err, NodeError::Unavailable { .. }), "{err:?}");
        let key = key("acme", "run_1");
        assert!(node.store.get_run(&key.tenant, &key.run_id).unwrap().is_none());
    }

    #[actix_rt::test]
    async fn a_run_past_its_ttl_expires_and_refuses_steps() {
        let node = Node::start(|config| config.run_ttl_s = 1);
        let run = node.run("acme", "run_1").await;
        run.send(create()).await.unwrap().unwrap();
        actix_rt::time::sleep(Duration::from_millis(1_100)).await;
        assert_eq!(run.send(Touch).await.unwrap().unwrap(), Some(RunStatus::Expired));
        let key = key("acme", "run_1");
        let stored = node.store.get_run(&key.tenant, &key.run_id).unwrap().unwrap();
        assert_eq!(stored.status, RunStatus::Expired, "the expiry was persisted");
        let refused = run.send(step(0, Phase::Pre)).await.unwrap().unwrap_err();
        assert!(
            matches!(refused, NodeError::Refused(Refusal::NotRunning { status: RunStatus::Expired, .. })),
            "{refused:?}"
        );
    }
}
