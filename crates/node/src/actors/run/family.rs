//! A run actor's part in its family of parent and child runs (`docs/architecture.md`,
//! "Parent and child runs"), kept apart from the rest of the run actor.
//!
//! - A child is created only after its parent's actor answered [`Adopt`]: the parent is running, joins
//!   the run tree with its exact live totals, and names the child's ancestors.
//! - A call of a run with a parent or children is evaluated under its family's lock in the run tree
//!   against its ancestors' rolled-up totals, and reserves its usage there; its commit carries the
//!   increments of every ancestor's stored rolled-up totals (and the record of a block decided by an
//!   ancestor's policy); the reservation is settled once the commit is decided.
//! - A run whose ancestor left `running` is stopped (`parent_stopped`) at its next call, which is
//!   refused with 409 `parent_not_running`.
//!
//! A parent never waits for a child: a child's actor reads and reserves in the shared tree, and only a
//! child's creation waits for its parent's actor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use runguard_contract::{
    Action, BudgetMetric, Decision, DecisionPhase, PreventionRecord, RunId, StepCall, Timestamp, Totals,
};
use runguard_engine::{CompiledSnapshot, Family, Outcome as Answer, Refusal, Run, TenantRates};
use runguard_store::{RecordAppend, RecordAuthority, RunRollup, WriteBatch, WriteOp};

use super::{Decided, Live, Pending, Reply, RunActor, RunKey, RunMeta, RunRequest, ready};
use crate::node_error::NodeError;
use crate::run_tree::{Barred, Member, Reservation};
use crate::shared::Shared;
use crate::tenant_state::TenantView;

/// Sent to a run before a child of it is created: answers the child's ancestors, or refuses when the
/// run is not running (409 `parent_not_running`).
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<Lineage, NodeError>")]
pub struct Adopt;

impl RunRequest for Adopt {
    type Answer = Lineage;
}

/// The ancestors of a child about to be created: its parent's ancestors, then its parent.
#[derive(Clone, Debug)]
pub struct Lineage {
    /// Root first, parent last.
    pub ancestors: Vec<RunId>,
}

impl Handler<Adopt> for RunActor {
    type Result = Reply<Lineage>;

    fn handle(&mut self, _: Adopt, _: &mut Self::Context) -> Self::Result {
        self.serve(Box::new(|actor, shared, _| ready(actor.adopt(&shared))))
    }
}

fn parent_not_running(parent: &RunId) -> NodeError {
    NodeError::conflict("parent_not_running", format!("parent run `{parent}` is not running"))
}

/// The member a live run is in the tree.
fn member_of(live: &Live, descendants: Totals) -> Member {
    let state = live.run.state();
    Member {
        ancestors: live.meta.ancestors.clone(),
        snapshot: Arc::clone(live.run.snapshot()),
        own: state.totals,
        descendants,
        reserved: Totals::default(),
        running: state.status.is_running(),
    }
}

impl RunActor {
    fn adopt(&mut self, shared: &Shared) -> Result<Lineage, NodeError> {
        let Some(live) = self.live.as_mut() else {
            return Err(NodeError::not_found("run", self.key.run_id.as_str()));
        };
        let state = live.run.state();
        if !state.status.is_running() {
            return Err(parent_not_running(&state.run_id));
        }
        if live.meta.in_family {
            match shared.run_tree.check_ancestors(&state.tenant_id, &state.run_id, &live.meta.ancestors) {
                Ok(()) => {}
                Err(Barred::ParentNotRunning(ancestor)) => return Err(parent_not_running(&ancestor)),
                Err(Barred::Missing(_)) => return Err(NodeError::unavailable("the run's family is reloading; retry")),
            }
        } else {
            // A run without children or parent so far has no descendants: its live totals are exact.
            shared.run_tree.insert(&state.tenant_id, &state.run_id, member_of(live, Totals::default()));
            live.meta.in_family = true;
        }
        let mut ancestors = live.meta.ancestors.clone();
        ancestors.push(state.run_id.clone());
        Ok(Lineage { ancestors })
    }

    /// A step of a run in a family: evaluated and reserved under the family's lock, then committed with
    /// the ancestors' rolled-up increments. A snapshot with tenant-period budgets (or, on a shared store,
    /// tenant-scope rate rules) first reads the tenant's totals from the store, as any run's does
    /// (`crate::tenant_state`), and a call whose bounded increments another call beat is decided again.
    pub(super) fn family_step(&mut self, call: StepCall, shared: Arc<Shared>, at: Timestamp) -> Pending<Decided> {
        self.family_step_reading(call, shared, at, crate::tenant_state::REEVALUATIONS)
    }

    fn family_step_reading(
        &mut self,
        call: StepCall,
        shared: Arc<Shared>,
        at: Timestamp,
        retries: u32,
    ) -> Pending<Decided> {
        let Some(live) = self.live.as_ref() else {
            return ready(Err(NodeError::not_found("run", self.key.run_id.as_str())));
        };
        let needs_view = crate::tenant_state::needs_view(&shared.store, live.run.snapshot());
        // After a refused bound another node has committed to the family: read it back first.
        let reread_family = retries < crate::tenant_state::REEVALUATIONS;
        let shared_store = shared.store.is_shared();
        if !needs_view && !reread_family && !shared_store {
            // One node's view of a family is exact and no bound can fail: nothing to read, nothing to retry.
            return self.family_step_with(call, shared, at, TenantView::default());
        }
        if !needs_view && !reread_family {
            let stepped = self.family_step_with(call.clone(), Arc::clone(&shared), at, TenantView::default());
            return self.retry_refused_bound(stepped, call, shared, retries);
        }
        let run = live.run.clone();
        let ancestors = live.meta.ancestors.clone();
        let reading = Arc::clone(&shared);
        let read = async move {
            reading
                .blocking(move |shared| {
                    if reread_family {
                        reread(shared, &run, &ancestors)?;
                    }
                    if !needs_view {
                        return Ok(TenantView::default());
                    }
                    crate::tenant_state::read_view(&shared.store, &run, at).map_err(NodeError::Store)
                })
                .await
        };
        Box::pin(read.into_actor(self).then(move |view, actor, _| {
            let view = match view {
                Ok(view) => view,
                Err(err) => return ready(Err(err)),
            };
            let stepped = actor.family_step_with(call.clone(), Arc::clone(&shared), at, view);
            actor.retry_refused_bound(stepped, call, shared, retries)
        }))
    }

    /// Decides `call` again, on state read back from the store, when `stepped`'s commit found a bound it
    /// was decided within no longer holds (a tenant total or a family's rolled-up total another call
    /// moved meanwhile); at most `retries` more times, then 503.
    fn retry_refused_bound(
        &mut self,
        stepped: Pending<Decided>,
        call: StepCall,
        shared: Arc<Shared>,
        retries: u32,
    ) -> Pending<Decided> {
        Box::pin(stepped.then(move |result, actor, _| match result {
            Err(NodeError::Store(err)) if err.is_tenant_limit() || err.is_rolled_up_limit() => {
                let counter = if err.is_tenant_limit() {
                    "runguard_tenant_total_reevaluations_total"
                } else {
                    "runguard_family_total_reevaluations_total"
                };
                metrics::counter!(counter).increment(1);
                if retries == 0 {
                    return ready(Err(NodeError::unavailable("the run's shared totals are contended; retry the call")));
                }
                actor.family_step_reading(call, shared, super::now(), retries - 1)
            }
            other => ready(other),
        }))
    }

    fn family_step_with(
        &mut self,
        call: StepCall,
        shared: Arc<Shared>,
        at: Timestamp,
        view: TenantView,
    ) -> Pending<Decided> {
        let Some(live) = self.live.as_ref() else {
            return ready(Err(NodeError::not_found("run", self.key.run_id.as_str())));
        };
        let state = live.run.state();
        if !state.status.is_running() {
            // A stopped or ended run takes no call (the run's own refusal), and its family may be gone
            // from the tree.
            let (answer, elapsed) = super::step_run(&shared, &live.run, &call, &view.periods, at);
            return self.persist_step(call, answer, elapsed, shared);
        }
        let ancestors = live.meta.ancestors.clone();
        if super::scans_large_texts(live.run.snapshot(), &call) {
            // As for any run: large texts are evaluated in the tenant's lane off the actor's thread (under the
            // family's lock there), and the actor stays busy meanwhile.
            let run = live.run.clone();
            let lane = Arc::clone(&shared);
            let tenant = state.tenant_id.clone();
            let evaluated = async move {
                lane.heavy(&tenant, move |shared| Ok(evaluate_in_tree(shared, &run, &ancestors, call, view, at))).await
            };
            return Box::pin(evaluated.into_actor(self).then(move |evaluated, actor, _| match evaluated {
                Ok(evaluated) => actor.after_tree(evaluated, shared, at),
                Err(err) => ready(Err(err)),
            }));
        }
        let evaluated = evaluate_in_tree(&shared, &live.run, &ancestors, call, view, at);
        self.after_tree(evaluated, shared, at)
    }

    /// Persists a call the tree evaluated, or stops the run when an ancestor no longer runs.
    fn after_tree(&mut self, evaluated: InTree, shared: Arc<Shared>, at: Timestamp) -> Pending<Decided> {
        match evaluated {
            Ok((call, answer, elapsed, family)) => self.persist_family_step(call, answer, elapsed, shared, family),
            Err(Barred::ParentNotRunning(ancestor)) => self.stop_for_parent(ancestor, shared, at),
            Err(Barred::Missing(run)) => {
                tracing::warn!(run_id = %run, "a family member is not loaded; the run reloads");
                self.forget();
                ready(Err(NodeError::unavailable("the run's family is reloading; treat the call as a block and retry")))
            }
        }
    }

    /// Stops the run because `ancestor` left `running`, persists that, and refuses the call.
    fn stop_for_parent(&mut self, ancestor: RunId, shared: Arc<Shared>, at: Timestamp) -> Pending<Decided> {
        let Some(live) = self.live.as_mut() else {
            return ready(Err(NodeError::not_found("run", self.key.run_id.as_str())));
        };
        if !live.run.stop_for_parent(at) {
            return ready(Err(parent_not_running(&ancestor)));
        }
        let mut batch = WriteBatch::new();
        // Fenced like every run write: another node may have moved the run on since this copy was read.
        let state = live.run.state();
        batch.fence_run(state.tenant_id.clone(), state.run_id.clone(), live.ledger_len);
        batch.put_run(live.meta.stored(&live.run));
        Box::pin(async move { shared.commit(batch).await }.into_actor(self).map(move |committed, actor, _| {
            match committed {
                Err(err) if super::fenced(&err) => {
                    // The run changed elsewhere: read it back next time; its parent still does not run.
                    actor.forget();
                    Err(parent_not_running(&ancestor))
                }
                Err(err) => {
                    // Stopped in memory before the commit failed: read back from the store next time.
                    actor.forget();
                    Err(err)
                }
                Ok(_) => {
                    if let Some(live) = actor.live.as_ref() {
                        left_running(&actor.deps.shared, &actor.key, live);
                    }
                    metrics::counter!("runguard_refused_calls_total", "reason" => "parent_not_running").increment(1);
                    Err(parent_not_running(&ancestor))
                }
            }
        }))
    }
}

/// A call evaluated in the run tree: the call, its answer, the evaluation time and its reservation.
type InTree = Result<(StepCall, Result<Answer, Refusal>, Duration, Option<FamilyCall>), Barred>;

/// Evaluates a step of a family member under its family's lock and reserves its usage.
fn evaluate_in_tree(
    shared: &Shared,
    run: &Run,
    ancestors: &[RunId],
    call: StepCall,
    mut view: TenantView,
    at: Timestamp,
) -> InTree {
    let state = run.state();
    let ((answer, elapsed, snapshots), reservation) =
        shared.run_tree.evaluate(&state.tenant_id, &state.run_id, ancestors, state.totals, |family| {
            let snapshots: Vec<(RunId, Arc<CompiledSnapshot>)> =
                family.ancestors.iter().map(|a| (a.run_id.clone(), Arc::clone(&a.snapshot))).collect();
            let (answer, elapsed) = step_in_family(shared, run, &call, family, &mut view, at);
            let after = answer.as_ref().ok().and_then(Answer::totals);
            ((answer, elapsed, snapshots), after)
        })?;
    let family = reservation.map(|reservation| FamilyCall { reservation, snapshots });
    Ok((call, answer, elapsed, family))
}

/// Answers a step of a family member, with the tenant's rate windows locked when its snapshot needs them.
fn step_in_family(
    shared: &Shared,
    run: &Run,
    call: &StepCall,
    family: &Family<'_>,
    view: &mut TenantView,
    at: Timestamp,
) -> (Result<Answer, Refusal>, Duration) {
    let started = Instant::now();
    let limits = shared.config.run_limits();
    let periods = &view.periods;
    let answer = match view.rates.as_mut() {
        // Rebuilt from the shared store: the outcome's rate delta is committed with the call.
        Some(rates) => run.step_in_family(call, &limits, rates, family, periods, at),
        None if run.snapshot().uses_tenant_rates() => shared.with_tenant_rates(&run.state().tenant_id, |rates| {
            run.step_in_family(call, &limits, rates, family, periods, at)
        }),
        None => run.step_in_family(call, &limits, &mut TenantRates::default(), family, periods, at),
    };
    (answer, started.elapsed())
}

/// A family member's evaluated call: its reservation and its ancestors' snapshots.
pub(super) struct FamilyCall {
    reservation: Reservation,
    snapshots: Vec<(RunId, Arc<CompiledSnapshot>)>,
}

/// The record of a block an ancestor's policy decided, taken from the outcome before its decision moves.
pub(super) struct RecordBasis {
    ancestor: RunId,
    record: PreventionRecord,
    decision: Decision,
}

impl RecordBasis {
    pub(super) fn of(answer: &Answer) -> Option<Self> {
        let record = answer.record.as_ref()?;
        let ancestor = answer.decision.deciding_violation()?.run_id.clone()?;
        Some(Self { ancestor, record: record.clone(), decision: answer.decision.clone() })
    }
}

/// Whether a family member's call is committed with bounds on its family's rolled-up totals: on a store
/// several nodes share (another node may have committed to the family since this node's view of it), for
/// a `post` that was not blocked. A block adds its usage unconditionally, as the run's own does.
pub(super) fn bounds_apply(shared: &Shared, answer: &Answer) -> bool {
    shared.store.is_shared() && answer.decision.phase == DecisionPhase::Post && answer.decision.action != Action::Block
}

impl FamilyCall {
    /// Bounds, for the commit, every rolled-up total the call was allowed within: each blocking per-run
    /// budget of the run and of each ancestor. A bound that no longer holds in the store fails the commit
    /// (`StoreError::is_rolled_up_limit`); the node then reads the family back and decides again.
    /// The bounds go after the call's writes and rolled-up increments, so that they bound the totals as
    /// the commit leaves them.
    pub(super) fn bounds(&self, run: &RunId, snapshot: &Arc<CompiledSnapshot>) -> Vec<(RunId, BudgetMetric, u64)> {
        let own = std::iter::once((run, snapshot));
        own.chain(self.snapshots.iter().map(|(run, snapshot)| (run, snapshot)))
            .flat_map(|(run_id, snapshot)| {
                runguard_engine::rolled_up_limits(snapshot).map(move |(metric, max)| (run_id.clone(), metric, max))
            })
            .collect()
    }

    /// Adds the ancestors' rolled-up increments and an ancestor-decided record to the call's batch.
    pub(super) fn extend(
        self,
        batch: &mut WriteBatch,
        basis: &Option<RecordBasis>,
        tenant: &runguard_contract::TenantId,
    ) -> Reservation {
        let delta = self.reservation.delta();
        let ancestors = self.reservation.ancestors();
        if delta != Totals::default() && !ancestors.is_empty() {
            batch.roll_up(tenant.clone(), ancestors.to_vec(), RunRollup { descendants: delta, children: 0 });
        }
        if let Some(basis) = basis
            && let Some(policy) = self
                .snapshots
                .iter()
                .find(|(run, _)| *run == basis.ancestor)
                .and_then(|(_, snapshot)| snapshot.policy(&basis.record.policy_id))
        {
            batch.push(WriteOp::AppendRecord(Box::new(RecordAppend {
                record: basis.record.clone(),
                authority: RecordAuthority::Ancestor {
                    decision: Box::new(basis.decision.clone()),
                    policy: Box::new(policy.clone()),
                    run_tenant: tenant.clone(),
                    ancestor: basis.ancestor.clone(),
                },
            })));
        }
        self.reservation
    }
}

/// Settles a call's reservation: `committed` is the run's totals and whether it still runs, when the
/// commit landed. A commit whose outcome is unknown is settled as landed, which errs on the closed side.
pub(super) fn settle(shared: &Shared, reservation: Option<Reservation>, committed: Option<(Totals, bool)>) {
    if let Some(reservation) = reservation {
        shared.run_tree.settle(reservation, committed);
    }
}

/// Tells the tree that a family member's own commit changed its totals or status (an end, an expiry,
/// a stop).
pub(super) fn left_running(shared: &Shared, key: &RunKey, live: &Live) {
    if live.meta.in_family {
        let state = live.run.state();
        shared.run_tree.own_committed(
            &key.tenant,
            &key.run_id,
            &live.meta.ancestors,
            state.totals,
            state.status.is_running(),
        );
    }
}

/// Brings the tree's members of `run`'s family (the run and its ancestors) up to what the store holds, on
/// a blocking thread: after a commit whose rolled-up bound failed because another node committed to the
/// family.
fn reread(shared: &Shared, run: &Run, ancestors: &[RunId]) -> Result<(), NodeError> {
    let tenant = &run.state().tenant_id;
    let own = run.state().run_id.clone();
    for (i, member) in ancestors.iter().chain(std::iter::once(&own)).enumerate() {
        let Some(stored) = shared.store.get_run(tenant, member)? else { continue };
        let descendants = shared.store.run_rollup(tenant, member)?.descendants;
        let above = ancestors.get(..i).unwrap_or_default();
        shared.run_tree.stored(tenant, member, above, stored.totals, descendants, stored.status.is_running());
    }
    Ok(())
}

/// On load (a blocking thread): a run with a parent or children joins the tree, with each ancestor not
/// loaded yet read from the store (its stored totals and rolled-up totals, exact after a restart).
pub(super) fn join_on_load(shared: &Shared, live: &mut Live) -> Result<(), NodeError> {
    let (tenant, run_id) = (live.run.state().tenant_id.clone(), live.run.state().run_id.clone());
    let rollup = shared.store.run_rollup(&tenant, &run_id)?;
    if rollup.children > 0 {
        live.meta.in_family = true;
    }
    // A run that no longer runs takes no call and no child: it needs no place in the tree.
    if !live.meta.in_family || !live.run.state().status.is_running() {
        return Ok(());
    }
    for ancestor in &live.meta.ancestors {
        if shared.run_tree.contains(&tenant, ancestor, &live.meta.ancestors) {
            continue;
        }
        let Some(stored) = shared.store.get_run(&tenant, ancestor)? else { continue };
        let snapshot = match shared.store.load_snapshot(&stored.snapshot.hash) {
            Ok(snapshot) => shared.compiled(&snapshot, &stored.snapshot.hash),
            Err(err) => {
                tracing::error!(run_id = %ancestor, error = %err, "an ancestor's snapshot failed verification");
                Arc::new(CompiledSnapshot::tampered(stored.snapshot.hash.clone()))
            }
        };
        let descendants = shared.store.run_rollup(&tenant, ancestor)?.descendants;
        let member = Member {
            ancestors: stored.ancestors.clone(),
            snapshot,
            own: stored.totals,
            descendants,
            reserved: Totals::default(),
            running: stored.status.is_running(),
        };
        shared.run_tree.insert(&tenant, ancestor, member);
    }
    shared.run_tree.insert(&tenant, &run_id, member_of(live, rollup.descendants));
    Ok(())
}

/// Before a child's creation commits: its ancestors must still run, and its parent counts one child more.
pub(super) fn on_create(
    shared: &Shared,
    meta: &RunMeta,
    key: &RunKey,
    batch: &mut WriteBatch,
) -> Result<(), NodeError> {
    let Some(parent) = meta.ancestors.last() else { return Ok(()) };
    match shared.run_tree.check_ancestors(&key.tenant, &key.run_id, &meta.ancestors) {
        Ok(()) => {}
        Err(Barred::ParentNotRunning(ancestor)) => return Err(parent_not_running(&ancestor)),
        Err(Barred::Missing(_)) => return Err(NodeError::unavailable("the parent's family is reloading; retry")),
    }
    batch.roll_up(key.tenant.clone(), vec![parent.clone()], RunRollup { descendants: Totals::default(), children: 1 });
    Ok(())
}

/// After a child's creation committed: it joins the tree.
pub(super) fn created(shared: &Shared, meta: &RunMeta, key: &RunKey, run: &Run) {
    if meta.in_family {
        let state = run.state();
        let member = Member {
            ancestors: meta.ancestors.clone(),
            snapshot: Arc::clone(run.snapshot()),
            own: state.totals,
            descendants: Totals::default(),
            reserved: Totals::default(),
            running: state.status.is_running(),
        };
        shared.run_tree.insert(&key.tenant, &key.run_id, member);
    }
}

#[cfg(test)]
mod model;
