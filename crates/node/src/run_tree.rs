//! The run tree: an in-memory tally of every run family (a root run and its descendants)
//! that has a live member, shared by the run actors of the family (`docs/architecture.md`, "Parent and
//! child runs").
//!
//! Each member keeps its own committed totals, what its descendants committed, what calls in flight have
//! reserved, and whether it is still running. A call of a family member is evaluated under its family's
//! lock against the rolled-up totals of its ancestors (own + descendants + reserved), and reserves its
//! usage on itself and every ancestor before it is committed; the commit (with the store's rolled-up
//! increments) is then settled here. Two descendants' calls therefore never both pass an ancestor's
//! limit that only one of them fits in, and no run ever waits for another's actor: the lock is held only
//! for an evaluation and never across a wait.
//!
//! One lock per root, so families never wait for each other. Members are loaded from the store when a
//! running member's actor loads (rehydration after a restart restores the stored rolled-up totals
//! exactly); a family none of whose members runs or has a call in flight is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use runguard_contract::{RunId, TenantId, Totals};
use runguard_engine::{Ancestor, CompiledSnapshot, Family};

/// One run of a family.
#[derive(Clone, Debug)]
pub struct Member {
    /// Its ancestors, root first and parent last.
    pub ancestors: Vec<RunId>,
    /// Its snapshot (its per-run budgets apply to its descendants' calls).
    pub snapshot: Arc<CompiledSnapshot>,
    /// Its own committed totals.
    pub own: Totals,
    /// Its descendants' committed usage.
    pub descendants: Totals,
    /// What calls in flight (its own or its descendants') have reserved.
    pub reserved: Totals,
    /// Whether it is still running.
    pub running: bool,
}

impl Member {
    fn rolled_up(&self) -> Totals {
        self.own.saturating_add(self.descendants).saturating_add(self.reserved)
    }
}

fn max(a: Totals, b: Totals) -> Totals {
    Totals {
        tokens: a.tokens.max(b.tokens),
        cost_micros: a.cost_micros.max(b.cost_micros),
        steps: a.steps.max(b.steps),
        duration_ms: a.duration_ms.max(b.duration_ms),
    }
}

type Members = HashMap<RunId, Member>;
type Families = HashMap<(TenantId, RunId), Arc<Mutex<Members>>>;

/// Why a family member's call cannot be evaluated now.
#[derive(Debug, PartialEq, Eq)]
pub enum Barred {
    /// An ancestor left `running`: the call is refused and the run stops (`parent_stopped`).
    ParentNotRunning(RunId),
    /// A member is not loaded (the caller loads it from the store and retries).
    Missing(RunId),
}

/// Usage a call reserved on its run and each ancestor, to settle once its commit is decided.
#[derive(Debug)]
#[must_use = "a reservation must be settled, or the family's totals stay reserved"]
pub struct Reservation {
    tenant: TenantId,
    root: RunId,
    run: RunId,
    ancestors: Vec<RunId>,
    delta: Totals,
}

impl Reservation {
    /// The usage the call adds to each ancestor.
    pub fn delta(&self) -> Totals {
        self.delta
    }

    /// The ancestors whose rolled-up totals the call changes.
    pub fn ancestors(&self) -> &[RunId] {
        &self.ancestors
    }
}

/// The tally of every family with a loaded member.
#[derive(Debug, Default)]
pub struct RunTree {
    families: Mutex<Families>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The root of a run whose ancestors are `ancestors`.
fn root_of<'a>(run: &'a RunId, ancestors: &'a [RunId]) -> &'a RunId {
    ancestors.first().unwrap_or(run)
}

/// Whether no loaded member of a family runs or has usage reserved.
fn finished(members: &Members) -> bool {
    members.values().all(|member| !member.running && member.reserved == Totals::default())
}

impl RunTree {
    /// The family of `root`, if it has a loaded member: lookups never add an empty family.
    fn existing(&self, tenant: &TenantId, root: &RunId) -> Option<Arc<Mutex<Members>>> {
        locked(&self.families).get(&(tenant.clone(), root.clone())).map(Arc::clone)
    }

    fn family(&self, tenant: &TenantId, root: &RunId) -> Arc<Mutex<Members>> {
        let mut families = locked(&self.families);
        Arc::clone(families.entry((tenant.clone(), root.clone())).or_default())
    }

    /// Whether `run` is loaded.
    pub fn contains(&self, tenant: &TenantId, run: &RunId, ancestors: &[RunId]) -> bool {
        let Some(family) = self.existing(tenant, root_of(run, ancestors)) else { return false };
        let members = locked(&family);
        members.contains_key(run)
    }

    /// Adds `member` as `run` unless it is loaded already: a loaded member is more recent than the store.
    pub fn insert(&self, tenant: &TenantId, run: &RunId, member: Member) {
        let family = self.family(tenant, root_of(run, &member.ancestors));
        let mut members = locked(&family);
        members.entry(run.clone()).or_insert(member);
    }

    /// Records a commit of `run`'s own that reserved nothing (a run end, an expiry, a stop): its totals
    /// only grow and a stopped run never runs again, so this never undoes a newer update.
    pub fn own_committed(&self, tenant: &TenantId, run: &RunId, ancestors: &[RunId], own: Totals, running: bool) {
        let Some(family) = self.existing(tenant, root_of(run, ancestors)) else { return };
        let mut members = locked(&family);
        if let Some(member) = members.get_mut(run) {
            member.own = max(member.own, own);
            member.running &= running;
        }
        let done = finished(&members);
        drop(members);
        if done {
            self.forget(tenant, root_of(run, ancestors), &family);
        }
    }

    /// Brings a loaded member up to what the store holds (another node committed to the family): totals
    /// only grow and a stopped run never runs again, so taking the larger of each never undoes an update
    /// this node made.
    pub fn stored(
        &self,
        tenant: &TenantId,
        run: &RunId,
        ancestors: &[RunId],
        own: Totals,
        descendants: Totals,
        running: bool,
    ) {
        let Some(family) = self.existing(tenant, root_of(run, ancestors)) else { return };
        let mut members = locked(&family);
        if let Some(member) = members.get_mut(run) {
            member.own = max(member.own, own);
            member.descendants = max(member.descendants, descendants);
            member.running &= running;
        }
    }

    /// Drops a family none of whose loaded members runs or has a call in flight: it can change no more
    /// (a stopped run takes no call and no child), and what it was is in the store, read again if one of
    /// its runs is ever loaded. Keeps the tree from growing with every finished family.
    fn forget(&self, tenant: &TenantId, root: &RunId, family: &Arc<Mutex<Members>>) {
        let mut families = locked(&self.families);
        let key = (tenant.clone(), root.clone());
        if families.get(&key).is_some_and(|current| Arc::ptr_eq(current, family)) {
            families.remove(&key);
        }
    }

    /// How many families the tree holds (for tests and metrics).
    pub fn families(&self) -> usize {
        locked(&self.families).len()
    }

    /// Evaluates a call of `run` with `step` under its family's lock and reserves the usage of the
    /// outcome `step` answers (its totals after the call less the run's `own` totals now) on the run and
    /// each ancestor. `Err` when an ancestor no longer runs or a member is not loaded.
    pub fn evaluate<T>(
        &self,
        tenant: &TenantId,
        run: &RunId,
        ancestors: &[RunId],
        own: Totals,
        step: impl FnOnce(&Family<'_>) -> (T, Option<Totals>),
    ) -> Result<(T, Option<Reservation>), Barred> {
        let root = root_of(run, ancestors).clone();
        let Some(family) = self.existing(tenant, &root) else { return Err(Barred::Missing(root)) };
        let mut members = locked(&family);
        let mut chain = Vec::with_capacity(ancestors.len());
        for id in ancestors {
            let member = members.get(id).ok_or_else(|| Barred::Missing(id.clone()))?;
            if !member.running {
                return Err(Barred::ParentNotRunning(id.clone()));
            }
            chain.push(Ancestor {
                run_id: id.clone(),
                snapshot: Arc::clone(&member.snapshot),
                rolled_up: member.rolled_up(),
            });
        }
        let this = members.get(run).ok_or_else(|| Barred::Missing(run.clone()))?;
        let descendants = this.descendants.saturating_add(this.reserved);
        let (answer, after) = step(&Family { descendants, ancestors: &chain });
        let Some(after) = after else { return Ok((answer, None)) };
        let delta = after.saturating_sub(own);
        for id in ancestors.iter().chain(std::iter::once(run)) {
            if let Some(member) = members.get_mut(id) {
                member.reserved = member.reserved.saturating_add(delta);
            }
        }
        let reservation =
            Reservation { tenant: tenant.clone(), root, run: run.clone(), ancestors: ancestors.to_vec(), delta };
        Ok((answer, Some(reservation)))
    }

    /// Settles a reservation: on a commit, the run's own totals become `own` (and `running`) and each
    /// ancestor's descendants grow by the reserved usage; on a refused commit, nothing but the release.
    pub fn settle(&self, reservation: Reservation, committed: Option<(Totals, bool)>) {
        let Some(family) = self.existing(&reservation.tenant, &reservation.root) else { return };
        let mut members = locked(&family);
        let delta = reservation.delta;
        for id in &reservation.ancestors {
            if let Some(member) = members.get_mut(id) {
                member.reserved = member.reserved.saturating_sub(delta);
                if committed.is_some() {
                    member.descendants = member.descendants.saturating_add(delta);
                }
            }
        }
        if let Some(member) = members.get_mut(&reservation.run) {
            member.reserved = member.reserved.saturating_sub(delta);
            if let Some((own, running)) = committed {
                member.own = max(member.own, own);
                member.running &= running;
            }
        }
        let done = finished(&members);
        drop(members);
        if done {
            self.forget(&reservation.tenant, &reservation.root, &family);
        }
    }

    /// Whether every ancestor of a run is loaded and running: `Err` names the first that is not.
    pub fn check_ancestors(&self, tenant: &TenantId, run: &RunId, ancestors: &[RunId]) -> Result<(), Barred> {
        let Some(family) = self.existing(tenant, root_of(run, ancestors)) else {
            return Err(Barred::Missing(root_of(run, ancestors).clone()));
        };
        let members = locked(&family);
        for id in ancestors {
            match members.get(id) {
                None => return Err(Barred::Missing(id.clone())),
                Some(member) if !member.running => return Err(Barred::ParentNotRunning(id.clone())),
                Some(_) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use runguard_contract::{PolicyLimits, Snapshot};

    use super::*;

    fn id(name: &str) -> RunId {
        RunId::new(name).unwrap()
    }

    fn member(ancestors: &[&str]) -> Member {
        let tenant = TenantId::new("acme").unwrap();
        let snapshot =
            CompiledSnapshot::compile(&Snapshot::capture(&tenant, std::iter::empty()), &PolicyLimits::default())
                .unwrap();
        Member {
            ancestors: ancestors.iter().map(|a| id(a)).collect(),
            snapshot: Arc::new(snapshot),
            own: Totals::default(),
            descendants: Totals::default(),
            reserved: Totals::default(),
            running: true,
        }
    }

    fn tokens(n: u64) -> Totals {
        Totals { tokens: n, ..Totals::default() }
    }

    #[test]
    fn a_reservation_is_seen_by_a_sibling_until_it_settles() {
        let tree = RunTree::default();
        let tenant = TenantId::new("acme").unwrap();
        tree.insert(&tenant, &id("root"), member(&[]));
        tree.insert(&tenant, &id("a"), member(&["root"]));
        tree.insert(&tenant, &id("b"), member(&["root"]));
        let chain = [id("root")];
        let ((), first) =
            tree.evaluate(&tenant, &id("a"), &chain, Totals::default(), |_| ((), Some(tokens(10)))).unwrap();
        let (seen, second) = tree
            .evaluate(&tenant, &id("b"), &chain, Totals::default(), |family| {
                (family.ancestors[0].rolled_up, Some(tokens(5)))
            })
            .unwrap();
        assert_eq!(seen, tokens(10), "the first call's reservation counts for the second");
        tree.settle(first.unwrap(), Some((tokens(10), true)));
        tree.settle(second.unwrap(), None);
        let (seen, _) = tree
            .evaluate(&tenant, &id("b"), &chain, Totals::default(), |family| (family.ancestors[0].rolled_up, None))
            .unwrap();
        assert_eq!(seen, tokens(10), "committed usage stays, a refused commit's is released");
        tree.own_committed(&tenant, &id("root"), &[], tokens(1), false);
        let barred = tree.evaluate(&tenant, &id("b"), &chain, Totals::default(), |_| ((), None)).unwrap_err();
        assert_eq!(barred, Barred::ParentNotRunning(id("root")));
        tree.own_committed(&tenant, &id("a"), &chain, tokens(10), false);
        assert_eq!(tree.families(), 1, "`b` still runs");
        tree.own_committed(&tenant, &id("b"), &chain, tokens(0), false);
        assert_eq!(tree.families(), 0, "a finished family is dropped");
    }
}
