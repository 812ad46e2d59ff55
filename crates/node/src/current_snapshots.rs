//! Each tenant's current snapshot, kept between run creations.
//!
//! Creating a run captures the policies the tenant sees into a snapshot, hashes it and compiles it. With
//! the policies unchanged that work gives the same snapshot every time, so it is done once per change of
//! the policies: an entry is valid for the store's [`policy_generation`] it was captured under, and
//! remembers whether its snapshot is already stored, so that run creation writes it only once.
//!
//! [`policy_generation`]: runguard_store::Store::policy_generation

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use runguard_contract::{Snapshot, SnapshotRef, TenantId};
use runguard_engine::CompiledSnapshot;

/// Tenants whose current snapshot is kept at most; past it the cache starts over (a node serves few
/// tenants, this only bounds memory against many of them).
const MAX_TENANTS: usize = 4096;

/// A tenant's snapshot as of one policy generation.
#[derive(Clone, Debug)]
pub struct CurrentSnapshot {
    /// The policy generation it was captured under.
    pub generation: u64,
    /// Its reference (id and hash), shared by the runs bound to it.
    pub reference: Arc<SnapshotRef>,
    /// Its compiled form.
    pub compiled: Arc<CompiledSnapshot>,
    /// The snapshot itself while it may not be stored yet; `None` once a commit stored it.
    pub unstored: Option<Arc<Snapshot>>,
}

/// The cache.
#[derive(Debug, Default)]
pub struct CurrentSnapshots {
    by_tenant: Mutex<HashMap<TenantId, CurrentSnapshot>>,
}

impl CurrentSnapshots {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, CurrentSnapshot>> {
        self.by_tenant.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The tenant's snapshot if it was captured under `generation`.
    pub fn get(&self, tenant: &TenantId, generation: u64) -> Option<CurrentSnapshot> {
        self.lock().get(tenant).filter(|current| current.generation == generation).cloned()
    }

    /// Keeps a freshly captured snapshot (not stored yet), unless a newer one is kept already.
    pub fn insert(&self, tenant: &TenantId, current: CurrentSnapshot) {
        let mut cache = self.lock();
        if cache.get(tenant).is_some_and(|kept| kept.generation > current.generation) {
            return;
        }
        if cache.len() >= MAX_TENANTS && !cache.contains_key(tenant) {
            cache.clear();
        }
        cache.insert(tenant.clone(), current);
    }

    /// Notes that a commit stored the tenant's snapshot with `reference`, so later creations skip it.
    pub fn stored(&self, tenant: &TenantId, reference: &SnapshotRef) {
        if let Some(kept) = self.lock().get_mut(tenant)
            && kept.reference.hash == reference.hash
        {
            kept.unstored = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current(tenant: &TenantId, generation: u64) -> CurrentSnapshot {
        let snapshot = Snapshot::capture(tenant, &[]);
        let reference = Arc::new(snapshot.reference().unwrap());
        CurrentSnapshot {
            generation,
            compiled: Arc::new(CompiledSnapshot::tampered(reference.hash.clone())),
            reference,
            unstored: Some(Arc::new(snapshot)),
        }
    }

    #[test]
    fn an_entry_serves_only_its_generation_and_older_ones_never_replace_it() {
        let cache = CurrentSnapshots::default();
        let tenant = TenantId::new("acme").unwrap();
        cache.insert(&tenant, current(&tenant, 3));
        assert!(cache.get(&tenant, 3).is_some());
        assert!(cache.get(&tenant, 4).is_none(), "a policy change makes the entry stale");
        cache.insert(&tenant, current(&tenant, 2));
        assert!(cache.get(&tenant, 3).is_some(), "a slower capture of older policies does not win");
        assert!(cache.get(&TenantId::new("other").unwrap(), 3).is_none(), "entries are per tenant");
    }

    #[test]
    fn a_stored_snapshot_is_not_written_again() {
        let cache = CurrentSnapshots::default();
        let tenant = TenantId::new("acme").unwrap();
        let entry = current(&tenant, 1);
        let reference = SnapshotRef::clone(&entry.reference);
        cache.insert(&tenant, entry);
        assert!(cache.get(&tenant, 1).unwrap().unstored.is_some());
        cache.stored(&tenant, &reference);
        assert!(cache.get(&tenant, 1).unwrap().unstored.is_none());
    }
}
