//! The run actor: one per live run. It holds the run's compiled snapshot (shared by `Arc`) and its
//! state, and handles the run's calls strictly one at a time: a call is evaluated, committed through the
//! writer, and only then applied and answered (`AtomicResponse`), so the next call sees its effects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::WeakAddr;
use actix::prelude::*;
use runguard_contract::{
    Action, Decision, Outcome, Snapshot, SnapshotRef, StepCall, StepError, TenantId, Timestamp, ViolationType,
};
use runguard_engine::{
    Admission, Call, CompiledSnapshot, Effects, Evaluation, Matcher, Refusal, RunState, TenantRates, evaluate,
};
use runguard_store::{
    LedgerCall, LedgerEntry, LoadedRun, RecordAppend, RecordAuthority, ShadowStats, StoredRun, WriteBatch, WriteOp,
};
use serde::Serialize;
use serde_json::json;

use crate::actors::learning::{EndRun, IncidentDraft};
use crate::actors::registry::{Deregister, Registry, RunKey};
use crate::current_snapshots::CurrentSnapshot;
use crate::error::ApiError;
use crate::failure::FailureTracker;
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
    snapshot: Arc<CompiledSnapshot>,
    state: RunState,
    meta: RunMeta,
    failure: FailureTracker,
}

/// What a live run keeps of its stored form besides its engine state, which holds the rest (ids, labels,
/// status, totals, termination, next call): one copy of each, which matters with 100,000 idle runs.
#[derive(Clone, Debug)]
struct RunMeta {
    /// Shared with every run created on the same snapshot.
    snapshot: Arc<SnapshotRef>,
    api_endpoint: Option<String>,
    created_at: Timestamp,
    ended_at: Option<Timestamp>,
    outcome: Option<Outcome>,
}

impl RunMeta {
    fn of(run: &StoredRun) -> Self {
        Self {
            snapshot: Arc::new(run.snapshot.clone()),
            api_endpoint: run.api_endpoint.clone(),
            created_at: run.created_at,
            ended_at: run.ended_at,
            outcome: run.outcome,
        }
    }

    /// The run as stored, from this and the engine state.
    fn stored(&self, state: &RunState) -> StoredRun {
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
            created_at: self.created_at,
            ended_at: self.ended_at,
            outcome: self.outcome,
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

/// Rebuilds a run from the store: re-verifies the snapshot, replays the ledger's effects, and fails the
/// run closed (integrity) when anything does not check out.
fn rehydrate(shared: &Shared, loaded: LoadedRun) -> Live {
    let run = loaded.run;
    let mut state = RunState::new(run.tenant_id.clone(), run.run_id.clone(), run.labels.clone());
    // A run is always stored with its run-start entry; without one it cannot be trusted.
    let mut replay_ok = !loaded.ledger.is_empty();
    let mut failure = FailureTracker::default();
    for entry in &loaded.ledger {
        if let LedgerCall::Step(call) = &entry.call {
            failure.observe(call);
        }
        match serde_json::from_slice::<Effects>(&entry.effects) {
            Ok(effects) => state.apply(&entry.decision, &effects),
            Err(_) => replay_ok = false,
        }
    }
    let snapshot = match &loaded.snapshot {
        Ok(snapshot) if replay_ok && loaded.totals_consistent && state.totals == run.totals => {
            shared.compiled(snapshot, &run.snapshot.hash)
        }
        _ => {
            tracing::error!(run_id = %run.run_id, "run failed its integrity checks on load; every call will block");
            Arc::new(CompiledSnapshot::tampered(run.snapshot.hash.clone()))
        }
    };
    // The status comes from the stored run (expiry is not in the ledger); totals were checked above.
    state.status = run.status;
    Live { snapshot, state, meta: RunMeta::of(&run), failure }
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
            format!("the run is {}; it accepts no more step calls", status.as_str()),
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

/// The run's metadata and stored form after a call at `at` left it in `state`.
fn run_after(meta: &RunMeta, state: &RunState, at: Timestamp, outcome: Option<Outcome>) -> (RunMeta, StoredRun) {
    let mut next = meta.clone();
    if !state.status.is_running() && next.ended_at.is_none() {
        next.ended_at = Some(at);
    }
    if outcome.is_some() {
        next.outcome = outcome;
    }
    let stored = next.stored(state);
    (next, stored)
}

fn strip_texts(call: &StepCall, keep: bool) -> StepCall {
    if keep {
        return call.clone();
    }
    StepCall { input_text: None, output_text: None, ..call.clone() }
}

/// Adds what an evaluation must persist besides the ledger entry: its record and shadow statistics.
fn persist_evaluation(batch: &mut WriteBatch, snapshot: &CompiledSnapshot, evaluation: &Evaluation, tenant: &TenantId) {
    if let Some(record) = &evaluation.record
        && let Some(deciding) = evaluation.decision.deciding_policy.as_ref().and_then(|p| snapshot.policy(&p.id))
    {
        batch.push(WriteOp::AppendRecord(Box::new(RecordAppend {
            record: record.clone(),
            authority: RecordAuthority::Live {
                decision: Box::new(evaluation.decision.clone()),
                policy: Box::new(deciding.policy.clone()),
                run_tenant: tenant.clone(),
            },
        })));
    }
    for policy_id in &evaluation.shadow_evaluated {
        let mut delta = ShadowStats { evaluations: 1, ..ShadowStats::default() };
        for entry in evaluation.decision.shadow.iter().filter(|s| &s.policy_id == policy_id) {
            match entry.would_action {
                Action::Block => delta.would_block += 1,
                Action::Warn => delta.would_warn += 1,
                Action::Throttle => delta.would_throttle += 1,
                Action::Allow => {}
            }
        }
        // A global policy's statistics are kept per tenant of the runs that evaluated it (SPEC §12.1).
        let owner = snapshot.policy(policy_id).and_then(|p| p.policy.tenant_id.clone());
        batch.add_shadow_stats(owner, tenant.clone(), policy_id.clone(), delta);
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
    text_bytes > HEAVY_TEXT_BYTES
        && snapshot.policies().iter().any(|p| matches!(p.matcher, Ok(Matcher::Content(_) | Matcher::Expr(_))))
}

/// Evaluates a step, with the tenant's rate windows locked when the snapshot has tenant-scope rate rules.
fn evaluate_step(
    shared: &Shared,
    snapshot: &CompiledSnapshot,
    state: &RunState,
    call: &StepCall,
    at: Timestamp,
) -> (Evaluation, Duration) {
    let started = Instant::now();
    let evaluation = if snapshot.uses_tenant_rates() {
        shared.with_tenant_rates(&state.tenant_id, |rates| {
            let evaluation = evaluate(snapshot, state, Call::Step(call), rates, at);
            // Counted before the commit: a failed commit over-counts, which errs on the closed side.
            rates.apply(&evaluation.effects);
            evaluation
        })
    } else {
        evaluate(snapshot, state, Call::Step(call), &TenantRates::default(), at)
    };
    (evaluation, started.elapsed())
}

fn record_metrics(evaluation: &Evaluation, elapsed: Duration) {
    metrics::counter!("runguard_decisions_total", "action" => evaluation.decision.action.as_str()).increment(1);
    metrics::histogram!("runguard_evaluation_seconds").record(elapsed.as_secs_f64());
    if evaluation.record.is_some() {
        metrics::counter!("runguard_prevention_records_total").increment(1);
    }
    if evaluation.decision.action == Action::Throttle {
        metrics::counter!("runguard_throttles_total").increment(1);
    }
    let would_block = evaluation.decision.shadow.iter().filter(|s| s.would_action == Action::Block).count();
    if would_block > 0 {
        metrics::counter!("runguard_shadow_would_block_total").increment(would_block as u64);
    }
    for policy in &evaluation.fail_opens {
        tracing::warn!(policy_id = %policy.id, decision_id = %evaluation.decision.decision_id, "policy failed open (on_error: allow)");
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
        let mut state = RunState::new(key.tenant.clone(), key.run_id.clone(), request.labels.clone());
        let evaluation = evaluate(&compiled, &state, Call::RunStart, &TenantRates::default(), at);
        state.apply(&evaluation.decision, &evaluation.effects);
        let base = RunMeta {
            snapshot: reference,
            api_endpoint: request.api_endpoint,
            created_at: at,
            ended_at: None,
            outcome: None,
        };
        let (meta, run) = run_after(&base, &state, at, None);
        let mut batch = WriteBatch::new();
        if let Some(snapshot) = &current.unstored {
            batch.put_snapshot(Snapshot::clone(snapshot));
        }
        batch.put_run(run);
        let entry = LedgerEntry::new(LedgerCall::RunStart, evaluation.decision.clone(), state.totals)
            .with_effects(effects_bytes(&evaluation.effects));
        batch.append_ledger(key.tenant.clone(), key.run_id.clone(), entry);
        persist_evaluation(&mut batch, &compiled, &evaluation, &key.tenant);
        shared.commit(batch).await?;
        if current.unstored.is_some() {
            shared.current_snapshots.stored(&key.tenant, &current.reference);
        }
        record_metrics(&evaluation, Duration::ZERO);
        tracing::info!(run_id = %key.run_id, tenant = %key.tenant, decision_id = %evaluation.decision.decision_id, "run created");
        Ok(Live { snapshot: compiled, state, meta, failure: FailureTracker::default() })
            .map(|live| (live, evaluation.decision))
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
            run_id: live.state.run_id.to_string(),
            status: live.state.status.as_str(),
            snapshot: SnapshotRef::clone(&live.meta.snapshot),
            decision,
        }
    }

    /// A running run past its TTL becomes `expired` (persisted) before anything else happens to it.
    fn expiry(&mut self, at: Timestamp) -> Option<WriteBatch> {
        let live = self.live.as_mut()?;
        let ttl_ms = i64::try_from(self.shared.config.run_ttl_s.saturating_mul(1000)).unwrap_or(i64::MAX);
        if !live.state.status.is_running() || at < live.meta.created_at.plus_millis(ttl_ms) {
            return None;
        }
        live.state.expire();
        let (meta, run) = run_after(&live.meta, &live.state, at, None);
        live.meta = meta;
        let mut batch = WriteBatch::new();
        batch.put_run(run);
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
            RunMsg::Touch => Box::pin(fut::ready(Ok(RunReply::Touched(self.live.as_ref().map(|l| l.state.status))))),
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
        match live.state.admit(&call) {
            Admission::Replay(decision) => return Box::pin(fut::ready(Ok(RunReply::Decision(decision)))),
            Admission::Refused(why) => {
                metrics::counter!("runguard_refused_calls_total", "reason" => "order").increment(1);
                return Box::pin(fut::ready(Err(refusal(why))));
            }
            Admission::Evaluate => {}
        }
        if call.index >= shared.config.limits.steps_per_run {
            metrics::counter!("runguard_refused_calls_total", "reason" => "step_limit").increment(1);
            return Box::pin(fut::ready(Err(ApiError::conflict(
                "run_step_limit",
                format!("runs take at most {} steps on this node", shared.config.limits.steps_per_run),
            ))));
        }
        if scans_large_texts(&live.snapshot, &call) {
            // Content and CEL rules over large texts cost milliseconds: evaluated in the tenant's lane on the
            // blocking pool, so that one tenant's heavy steps neither stall the HTTP worker this actor lives
            // on nor take more than the tenant's share of the cores. The actor stays busy meanwhile, so the
            // run's calls keep their order.
            let (snapshot, state, tenant) =
                (Arc::clone(&live.snapshot), live.state.clone(), live.state.tenant_id.clone());
            let lane = Arc::clone(&shared);
            let evaluated = async move {
                lane.heavy(&tenant, move |shared| {
                    let (evaluation, elapsed) = evaluate_step(shared, &snapshot, &state, &call, at);
                    Ok((evaluation, elapsed, call))
                })
                .await
            };
            return Box::pin(evaluated.into_actor(self).then(move |evaluated, actor, _| match evaluated {
                Ok((evaluation, elapsed, call)) => actor.persist_step(call, evaluation, elapsed, shared, at),
                Err(err) => Box::pin(fut::ready(Err(err))) as Pending,
            }));
        }
        let (evaluation, elapsed) = evaluate_step(&shared, &live.snapshot, &live.state, &call, at);
        self.persist_step(call, evaluation, elapsed, shared, at)
    }

    /// Commits an evaluated step and, once it is durable, applies it and answers its decision.
    fn persist_step(
        &mut self,
        call: StepCall,
        evaluation: Evaluation,
        elapsed: Duration,
        shared: Arc<Shared>,
        at: Timestamp,
    ) -> Pending {
        let Some(live) = self.live.as_ref() else {
            return Box::pin(fut::ready(Err(ApiError::not_found("run", self.key.run_id.as_str()))));
        };
        let mut next_state = live.state.clone();
        next_state.apply(&evaluation.decision, &evaluation.effects);
        let (meta, run) = run_after(&live.meta, &next_state, at, None);
        let mut batch = WriteBatch::new();
        let stored_call = strip_texts(&call, shared.config.ledger_texts);
        let entry = LedgerEntry::new(LedgerCall::Step(stored_call), evaluation.decision.clone(), next_state.totals)
            .with_effects(effects_bytes(&evaluation.effects));
        batch.append_ledger(live.state.tenant_id.clone(), live.state.run_id.clone(), entry);
        batch.put_run(run);
        persist_evaluation(&mut batch, &live.snapshot, &evaluation, &live.state.tenant_id);
        Box::pin(async move { shared.commit_settled(batch).await }.into_actor(self).map(move |committed, actor, _| {
            if let Err(refused) = committed {
                if !refused.settled {
                    actor.forget();
                }
                return Err(refused.error);
            }
            record_metrics(&evaluation, elapsed);
            if let Some(live) = actor.live.as_mut() {
                live.state = next_state;
                live.meta = meta;
                live.failure.observe(&call);
            }
            let decision = evaluation.decision;
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
        if !live.state.status.is_running() {
            // Ending an ended or stopped run changes nothing.
            return Box::pin(fut::ready(Ok(RunReply::Ended(Box::new(live.meta.stored(&live.state)), None))));
        }
        let evaluation = evaluate(
            &live.snapshot,
            &live.state,
            Call::RunEnd { outcome, error: error.as_ref() },
            &TenantRates::default(),
            at,
        );
        let mut next_state = live.state.clone();
        next_state.apply(&evaluation.decision, &evaluation.effects);
        let (meta, run) = run_after(&live.meta, &next_state, at, Some(outcome));
        let mut batch = WriteBatch::new();
        let error_for_incident = error.clone();
        let entry =
            LedgerEntry::new(LedgerCall::RunEnd { outcome, error }, evaluation.decision.clone(), next_state.totals)
                .with_effects(effects_bytes(&evaluation.effects));
        batch.append_ledger(live.state.tenant_id.clone(), live.state.run_id.clone(), entry);
        batch.put_run(run.clone());
        persist_evaluation(&mut batch, &live.snapshot, &evaluation, &live.state.tenant_id);
        // SPEC §4 (5), §5: only a running run that ends failed, and is not stopped by a block, creates one.
        let incident = (runguard_contract::prevention::may_create_incident(live.state.status, outcome)
            && next_state.status == runguard_contract::RunStatus::Failed)
            .then(|| {
                let (signature, error) = live.failure.incident_basis(error_for_incident.as_ref());
                IncidentDraft {
                    tenant: live.state.tenant_id.clone(),
                    run_id: live.state.run_id.clone(),
                    signature,
                    error,
                }
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
            record_metrics(&evaluation, Duration::ZERO);
            if let Some(live) = actor.live.as_mut() {
                live.state = next_state;
                live.meta = meta;
            }
            Ok(RunReply::Ended(Box::new(run), incident_id))
        }))
    }
}
