//! The run actor: one per live run. It holds the run's compiled snapshot (shared by `Arc`) and its
//! state, and handles the run's calls strictly one at a time: a call is evaluated, committed through the
//! writer, and only then applied and answered (`AtomicResponse`), so the next call sees its effects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::WeakAddr;
use actix::prelude::*;
use runguard_contract::{
    Action, Decision, Outcome, RunStatus, Snapshot, SnapshotRef, StepCall, StepError, TenantId, Timestamp,
    ViolationType,
};
use runguard_engine::Outcome as Answer;
use runguard_engine::{CompiledSnapshot, Effects, LedgerItem, Refusal, Run, RunLimits, StoredHead, TenantRates};
use runguard_store::{
    LedgerCall, LedgerEntry, LoadedRun, RecordAppend, RecordAuthority, ShadowStats, StoredRun, WriteBatch, WriteOp,
};
use serde::Serialize;
use serde_json::json;

use crate::actors::learning::{EndRun, IncidentDraft};
use crate::actors::registry::{Deregister, Registry, RunKey};
use crate::current_snapshots::CurrentSnapshot;
use crate::error::ApiError;
use crate::shared::{Refused, Shared, now};

/// `POST /v1/runs` after the id is settled.
#[derive(Clone, Debug)]
pub struct CreateRun {
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The endpoint the run works against, if given.
    pub api_endpoint: Option<String>,
}

/// The answer to run creation (and to an identical re-creation).
#[derive(Clone, Debug, Serialize)]
pub struct CreateAnswer {
    /// The run.
    pub run_id: String,
    /// Its status.
    pub status: &'static str,
    /// Its snapshot.
    pub snapshot: SnapshotRef,
    /// The run-start decision.
    pub decision: Decision,
}

/// Messages a run actor handles.
#[derive(Debug, Message)]
#[rtype(result = "Result<RunReply, ApiError>")]
pub enum RunMsg {
    /// Create the run, or answer its creation again.
    Create(CreateRun),
    /// A step call.
    Step(Box<StepCall>),
    /// Apply the TTL if it has passed (sent by the registry's sweep); answers the run's status.
    Touch,
    /// End the run.
    End {
        /// How it ended.
        outcome: Outcome,
        /// The failing step's error.
        error: Option<StepError>,
    },
}

/// A call from the HTTP edge: `msg`, done only if the actor takes `ticket` before the caller's timeout
/// abandons it (a call answered 503 is never applied, SPEC §12.10).
#[derive(Debug, Message)]
#[rtype(result = "Result<RunReply, ApiError>")]
pub struct RunCall {
    /// What to do.
    pub msg: RunMsg,
    /// Raced for with the caller.
    pub ticket: crate::ticket::Ticket,
}

/// What a run actor answers.
#[derive(Clone, Debug)]
pub enum RunReply {
    /// Creation: 201 when `created`, else 200.
    Created {
        /// Whether this call created it.
        created: bool,
        /// The answer.
        answer: Box<CreateAnswer>,
    },
    /// A decision.
    Decision(Box<Decision>),
    /// The run's status after a touch (`None` if the run does not exist).
    Touched(Option<runguard_contract::RunStatus>),
    /// The run after `end`, and the incident it created.
    Ended(Box<StoredRun>, Option<runguard_contract::IncidentId>),
}

struct Live {
    run: Run,
    meta: RunMeta,
}

/// What a live run keeps of its stored form besides the engine's run, which holds the rest (ids, labels,
/// status, totals, termination, next call, times, outcome): one copy of each, which matters with 100,000
/// idle runs.
#[derive(Clone, Debug)]
struct RunMeta {
    /// Shared with every run created on the same snapshot.
    snapshot: Arc<SnapshotRef>,
    api_endpoint: Option<String>,
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
        }
    }
}

/// The actor.
pub struct RunActor {
    key: Arc<RunKey>,
    generation: u64,
    shared: Arc<Shared>,
    /// Weak: a strong address costs two allocations per live run, and it is only used when stopping.
    registry: WeakAddr<Registry>,
    live: Option<Live>,
}

impl std::fmt::Debug for RunActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunActor").field("run", &self.key.run_id).finish_non_exhaustive()
    }
}

impl RunActor {
    /// A run actor for `key`, not yet loaded.
    pub fn new(key: Arc<RunKey>, generation: u64, shared: Arc<Shared>, registry: WeakAddr<Registry>) -> Self {
        Self { key, generation, shared, registry, live: None }
    }
}

impl Actor for RunActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // No timer of its own: the registry drops idle runs' addresses, and an actor whose last address
        // is gone stops (one timer per live run would cost memory with 100,000 idle runs).
        ctx.set_mailbox_capacity(self.shared.config.limits.run_mailbox);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        if let Some(registry) = self.registry.upgrade() {
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
    Live { run, meta: RunMeta { snapshot: Arc::new(stored.snapshot), api_endpoint: stored.api_endpoint } }
}

/// How a run that no longer runs came to stop, in words.
fn why_not_running(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Stopped => "was stopped by a block",
        RunStatus::Succeeded => "has ended (`succeeded`)",
        RunStatus::Failed => "has ended (`failed`)",
        RunStatus::Expired => "has expired (its TTL passed before it ended)",
        RunStatus::Running => "is running",
    }
}

fn refusal(refusal: Refusal) -> ApiError {
    match refusal {
        Refusal::OutOfOrder { expected } => ApiError::conflict(
            "step_out_of_order",
            format!("expected step {} `{}` next", expected.index, expected.phase.as_str()),
        )
        .with_details(json!({ "expected": { "index": expected.index, "phase": expected.phase } })),
        Refusal::NotRunning { status, stopping_decision } => ApiError::conflict(
            "run_not_running",
            format!("the run {}; it accepts no more step calls", why_not_running(status)),
        )
        .with_details(json!({ "status": status, "decision": stopping_decision })),
        Refusal::StepLimit { max } => {
            ApiError::conflict("run_step_limit", format!("runs take at most {max} steps on this node"))
        }
        Refusal::RetryMismatch { index, phase } => ApiError::conflict(
            "idempotency_mismatch",
            format!("step {index} `{}` was already answered; a retry must send the identical body", phase.as_str()),
        ),
        // The engine's refusals may grow; one this node does not know yet is still a conflict.
        other => ApiError::conflict("run_refused", other.to_string()),
    }
}

fn strip_texts(call: &StepCall, keep: bool) -> StepCall {
    if keep {
        return call.clone();
    }
    StepCall { input_text: None, output_text: None, ..call.clone() }
}

/// Adds what an outcome must persist besides the ledger entry: its record and shadow statistics.
fn persist_outcome(batch: &mut WriteBatch, snapshot: &CompiledSnapshot, outcome: &Answer, tenant: &TenantId) {
    if let Some(record) = &outcome.record
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

/// Answers a step, with the tenant's rate windows locked when the snapshot has tenant-scope rate rules.
fn step_run(shared: &Shared, run: &Run, call: &StepCall, at: Timestamp) -> (Result<Answer, Refusal>, Duration) {
    let started = Instant::now();
    let limits = RunLimits::new(shared.config.limits.steps_per_run);
    let answer = if run.snapshot().uses_tenant_rates() {
        shared.with_tenant_rates(&run.state().tenant_id, |rates| run.step(call, &limits, rates, at))
    } else {
        run.step(call, &limits, &mut TenantRates::default(), at)
    };
    (answer, started.elapsed())
}

/// Counts a decision; `evaluated` is the engine time of a step call (run starts and ends are not timed, so
/// they stay out of the evaluation latency rather than add zeros to it).
fn record_metrics(outcome: &Answer, evaluated: Option<Duration>) {
    metrics::counter!("runguard_decisions_total", "action" => outcome.decision.action.as_str()).increment(1);
    if let Some(elapsed) = evaluated {
        metrics::histogram!("runguard_evaluation_seconds").record(elapsed.as_secs_f64());
    }
    if outcome.record.is_some() {
        metrics::counter!("runguard_prevention_records_total").increment(1);
    }
    if outcome.decision.action == Action::Throttle {
        metrics::counter!("runguard_throttles_total").increment(1);
    }
    let would_block = outcome.decision.shadow.iter().filter(|s| s.would_action == Action::Block).count();
    if would_block > 0 {
        metrics::counter!("runguard_shadow_would_block_total").increment(would_block as u64);
    }
    for policy in &outcome.fail_opens {
        tracing::warn!(policy_id = %policy.id, decision_id = %outcome.decision.decision_id, "policy failed open (on_error: allow)");
        metrics::counter!("runguard_fail_open_total").increment(1);
    }
}

impl RunActor {
    async fn load(shared: Arc<Shared>, key: Arc<RunKey>) -> Result<Option<Live>, ApiError> {
        let (tenant, run_id) = (key.tenant.clone(), key.run_id.clone());
        shared
            .blocking(move |shared| {
                let loaded = shared.store.load_run(&tenant, &run_id).map_err(crate::shared::store_error)?;
                Ok(loaded.map(|loaded| rehydrate(shared, loaded)))
            })
            .await
    }

    async fn create(shared: Arc<Shared>, key: Arc<RunKey>, request: CreateRun) -> Result<(Live, Decision), ApiError> {
        let current = Self::current_snapshot(&shared, &key.tenant).await?;
        let (reference, compiled) = (Arc::clone(&current.reference), Arc::clone(&current.compiled));
        let at = now();
        let (run, answer) = Run::start(compiled, key.tenant.clone(), key.run_id.clone(), request.labels, at);
        let run = run.after(&answer);
        let meta = RunMeta { snapshot: reference, api_endpoint: request.api_endpoint };
        let mut batch = WriteBatch::new();
        if let Some(snapshot) = &current.unstored {
            batch.put_snapshot(Snapshot::clone(snapshot));
        }
        batch.put_run(meta.stored(&run));
        let entry = LedgerEntry::new(LedgerCall::RunStart, answer.decision.clone(), run.state().totals)
            .with_effects(effects_bytes(&answer.effects));
        batch.append_ledger(key.tenant.clone(), key.run_id.clone(), entry);
        persist_outcome(&mut batch, run.snapshot(), &answer, &key.tenant);
        shared.commit(batch).await?;
        if current.unstored.is_some() {
            shared.current_snapshots.stored(&key.tenant, &current.reference);
        }
        record_metrics(&answer, None);
        tracing::info!(run_id = %key.run_id, tenant = %key.tenant, decision_id = %answer.decision.decision_id, "run created");
        Ok((Live { run, meta }, answer.decision))
    }

    /// The snapshot a run of `tenant` created now is bound to: the cached one while the policies are
    /// unchanged, else captured anew. Reading the policies, hashing the snapshot and compiling it (regexes,
    /// CEL) all block: off the actor's thread.
    async fn current_snapshot(shared: &Arc<Shared>, tenant: &TenantId) -> Result<CurrentSnapshot, ApiError> {
        // Read before the policies: a policy change committed after this read makes the entry stale.
        let generation = shared.store.policy_generation();
        if let Some(current) = shared.current_snapshots.get(tenant, generation) {
            return Ok(current);
        }
        let tenant = tenant.clone();
        shared
            .blocking(move |shared| {
                let policies = runguard_store::all_pages(|page| shared.store.list_policies(&tenant, None, page))
                    .map_err(crate::shared::store_error)?;
                let snapshot = Snapshot::capture(&tenant, &policies);
                let reference = Arc::new(snapshot.reference().map_err(|_| ApiError::internal())?);
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
        let limits = RunLimits::default().with_ttl(Duration::from_secs(self.shared.config.run_ttl_s));
        if !live.run.expire_if_due(at, &limits) {
            return None;
        }
        let mut batch = WriteBatch::new();
        batch.put_run(live.meta.stored(&live.run));
        Some(batch)
    }
}

impl Handler<RunMsg> for RunActor {
    type Result = AtomicResponse<Self, Result<RunReply, ApiError>>;

    fn handle(&mut self, msg: RunMsg, _: &mut Self::Context) -> Self::Result {
        let shared = Arc::clone(&self.shared);
        let key = self.key.clone();
        let loaded = self.live.is_some();
        let load = async move { if loaded { Ok(None) } else { RunActor::load(shared, key).await.map(Some) } };
        AtomicResponse::new(Box::pin(load.into_actor(self).then(move |loaded, actor, _| {
            let shared = Arc::clone(&actor.shared);
            match loaded {
                Err(err) => return Box::pin(fut::ready(Err(err))) as Pending,
                Ok(Some(Some(live))) => actor.live = Some(live),
                Ok(Some(None)) | Ok(None) => {}
            }
            actor.dispatch(msg, shared)
        })))
    }
}

impl Handler<RunCall> for RunActor {
    type Result = AtomicResponse<Self, Result<RunReply, ApiError>>;

    fn handle(&mut self, call: RunCall, ctx: &mut Self::Context) -> Self::Result {
        if !call.ticket.take() {
            // The caller already answered 503: the call must not happen.
            return AtomicResponse::new(Box::pin(fut::ready(Err(ApiError::unavailable(
                "the call timed out before the run took it; treat it as a block",
                1,
            )))));
        }
        <Self as Handler<RunMsg>>::handle(self, call.msg, ctx)
    }
}

type Reply = Result<RunReply, ApiError>;
type Pending = std::pin::Pin<Box<dyn ActorFuture<RunActor, Output = Reply>>>;

impl RunActor {
    /// Forgets the run's state, so that its next call reads it back from the store (SPEC §12.10): after a
    /// commit whose outcome is unknown (the writer stopped after taking it, or the learning actor did not
    /// answer in time), or after an expiry applied in memory whose commit failed.
    fn forget(&mut self) {
        self.live = None;
    }

    fn dispatch(&mut self, msg: RunMsg, shared: Arc<Shared>) -> Pending {
        let at = now();
        if let Some(batch) = self.expiry(at) {
            let shared2 = Arc::clone(&shared);
            return Box::pin(async move { shared2.commit(batch).await }.into_actor(self).then(
                move |committed, actor, _| match committed {
                    Err(err) => {
                        // The expiry was applied in memory before its commit failed.
                        actor.forget();
                        Box::pin(fut::ready(Err(err))) as Pending
                    }
                    Ok(_) => actor.dispatch(msg, shared),
                },
            ));
        }
        match msg {
            RunMsg::Create(request) => self.handle_create(request, shared),
            RunMsg::Step(call) => self.handle_step(*call, shared, at),
            RunMsg::Touch => {
                Box::pin(fut::ready(Ok(RunReply::Touched(self.live.as_ref().map(|l| l.run.state().status)))))
            }
            RunMsg::End { outcome, error } => self.handle_end(outcome, error, shared, at),
        }
    }

    fn handle_create(&mut self, request: CreateRun, shared: Arc<Shared>) -> Pending {
        if self.live.is_some() {
            // The same run again: answer its creation, whose decision is the ledger's first entry (kept in
            // the store rather than in every live run's memory).
            let (tenant, run_id) = (self.key.tenant.clone(), self.key.run_id.clone());
            let first = async move {
                shared.read(move |store| store.ledger(&tenant, &run_id, &runguard_store::PageRequest::first(1))).await
            };
            return Box::pin(first.into_actor(self).map(|page, actor, _| {
                let decision =
                    page?.items.into_iter().next().map(|entry| entry.decision).ok_or_else(ApiError::internal)?;
                let live = actor.live.as_ref().ok_or_else(ApiError::internal)?;
                Ok(RunReply::Created { created: false, answer: Box::new(Self::answer(live, decision)) })
            }));
        }
        let key = self.key.clone();
        Box::pin(RunActor::create(shared, key, request).into_actor(self).map(|created, actor, _| {
            let (live, decision) = created?;
            let answer = Box::new(Self::answer(&live, decision));
            actor.live = Some(live);
            Ok(RunReply::Created { created: true, answer })
        }))
    }

    fn handle_step(&mut self, call: StepCall, shared: Arc<Shared>, at: Timestamp) -> Pending {
        let Some(live) = self.live.as_ref() else {
            return Box::pin(fut::ready(Err(ApiError::not_found("run", self.key.run_id.as_str()))));
        };
        if scans_large_texts(live.run.snapshot(), &call) {
            // Content and CEL rules over large texts cost milliseconds: evaluated in the tenant's lane on the
            // blocking pool, so that one tenant's heavy steps neither stall the HTTP worker this actor lives
            // on nor take more than the tenant's share of the cores. The actor stays busy meanwhile, so the
            // run's calls keep their order.
            let (run, tenant) = (live.run.clone(), live.run.state().tenant_id.clone());
            let lane = Arc::clone(&shared);
            let evaluated = async move {
                lane.heavy(&tenant, move |shared| {
                    let (answer, elapsed) = step_run(shared, &run, &call, at);
                    Ok((answer, elapsed, call))
                })
                .await
            };
            return Box::pin(evaluated.into_actor(self).then(move |evaluated, actor, _| match evaluated {
                Ok((answer, elapsed, call)) => actor.persist_step(call, answer, elapsed, shared),
                Err(err) => Box::pin(fut::ready(Err(err))) as Pending,
            }));
        }
        let (answer, elapsed) = step_run(&shared, &live.run, &call, at);
        self.persist_step(call, answer, elapsed, shared)
    }

    /// Commits an evaluated step and, once it is durable, applies it and answers its decision.
    fn persist_step(
        &mut self,
        call: StepCall,
        answer: Result<Answer, Refusal>,
        elapsed: Duration,
        shared: Arc<Shared>,
    ) -> Pending {
        let answer = match answer {
            Ok(answer) if answer.is_replay() => {
                return Box::pin(fut::ready(Ok(RunReply::Decision(Box::new(answer.decision)))));
            }
            Ok(answer) => answer,
            Err(why) => {
                let reason = if matches!(why, Refusal::StepLimit { .. }) { "step_limit" } else { "order" };
                metrics::counter!("runguard_refused_calls_total", "reason" => reason).increment(1);
                return Box::pin(fut::ready(Err(refusal(why))));
            }
        };
        let Some(live) = self.live.as_ref() else {
            return Box::pin(fut::ready(Err(ApiError::not_found("run", self.key.run_id.as_str()))));
        };
        let next = live.run.after(&answer);
        let (tenant, run_id) = (&live.run.state().tenant_id, &live.run.state().run_id);
        let mut batch = WriteBatch::new();
        let stored_call = strip_texts(&call, shared.config.ledger_texts);
        let entry = LedgerEntry::new(LedgerCall::Step(stored_call), answer.decision.clone(), next.state().totals)
            .with_effects(effects_bytes(&answer.effects));
        batch.append_ledger(tenant.clone(), run_id.clone(), entry);
        batch.put_run(live.meta.stored(&next));
        persist_outcome(&mut batch, live.run.snapshot(), &answer, tenant);
        Box::pin(async move { shared.commit_settled(batch).await }.into_actor(self).map(move |committed, actor, _| {
            if let Err(refused) = committed {
                if !refused.settled {
                    actor.forget();
                }
                return Err(refused.error);
            }
            record_metrics(&answer, Some(elapsed));
            if let Some(live) = actor.live.as_mut() {
                live.run = next;
            }
            let decision = answer.decision;
            if decision.action == Action::Block {
                let integrity = decision.violations.iter().any(|v| v.violation_type == ViolationType::Integrity);
                tracing::warn!(run_id = %decision.run_id, decision_id = %decision.decision_id, integrity, "run stopped by a block");
            }
            Ok(RunReply::Decision(Box::new(decision)))
        }))
    }

    fn handle_end(
        &mut self,
        outcome: Outcome,
        error: Option<StepError>,
        shared: Arc<Shared>,
        at: Timestamp,
    ) -> Pending {
        let Some(live) = self.live.as_ref() else {
            return Box::pin(fut::ready(Err(ApiError::not_found("run", self.key.run_id.as_str()))));
        };
        let Some(answer) = live.run.end(outcome, error.as_ref(), at) else {
            // Ending an ended or stopped run changes nothing.
            return Box::pin(fut::ready(Ok(RunReply::Ended(Box::new(live.meta.stored(&live.run)), None))));
        };
        let next = live.run.after(&answer);
        let run = live.meta.stored(&next);
        let (tenant, run_id) = (&live.run.state().tenant_id, &live.run.state().run_id);
        let mut batch = WriteBatch::new();
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
        let committed = async move {
            match incident {
                // A refused end is rare: the run is read back from the store before its next call rather
                // than trusting that the learning actor's refusal says whether its commit landed.
                Some(incident) => shared
                    .learn(EndRun { batch, incident: Some(incident) })
                    .await
                    .and_then(|answer| answer)
                    .map_err(|error| Refused { error, settled: false }),
                None => shared.commit_settled(batch).await.map(|_| None),
            }
        };
        Box::pin(committed.into_actor(self).map(move |committed, actor, _| {
            let incident_id = match committed {
                Ok(incident_id) => incident_id,
                Err(refused) => {
                    if !refused.settled {
                        actor.forget();
                    }
                    return Err(refused.error);
                }
            };
            record_metrics(&answer, None);
            if let Some(live) = actor.live.as_mut() {
                live.run = next;
            }
            Ok(RunReply::Ended(Box::new(run), incident_id))
        }))
    }
}
