//! Reads: policies, snapshots, runs and ledgers, records, and the learning loop.

use std::ops::Bound;

use runguard_contract::{
    AuditEntry, Decision, Incident, IncidentId, Mode, Pattern, PatternId, Policy, PolicyId, PreventionRecord, RecordId,
    Regret, RunId, SignatureHash, Snapshot, SnapshotHash, SnapshotId, TenantId, Timestamp,
};
use sled::IVec;

use super::verify::verify_snapshot;
use super::{Store, T};
use crate::codec::Stored;
use crate::error::StoreError;
use crate::integrity::{IntegrityError, LoadedRun, StoredSnapshot};
use crate::keys;
use crate::model::{GraduationState, LedgerEntry, RunRollup, RunStart, ShadowStats, StoredRun};
use crate::query::{Page, PageRequest, RecordQuery, prefix_end};

impl Store {
    // ---- policies ---------------------------------------------------------------------------------

    /// A policy of `owner` (`None`: global): the current version, or `version`.
    pub fn get_policy(
        &self,
        owner: Option<&TenantId>,
        id: &PolicyId,
        version: Option<u32>,
    ) -> Result<Option<Policy>, StoreError> {
        let version = match version {
            Some(v) => v,
            None => match self.policy_head(owner, id)? {
                Some(v) => v,
                None => return Ok(None),
            },
        };
        self.get_decoded(T::Policies, &keys::policy_version(owner, id, version))
    }

    /// Every version of a policy, oldest first.
    pub fn policy_versions(&self, owner: Option<&TenantId>, id: &PolicyId) -> Result<Vec<Policy>, StoreError> {
        self.tree(T::Policies)?
            .scan_prefix(keys::policy_prefix(owner, id))
            .map(|item| Policy::decode(&item?.1))
            .collect()
    }

    pub(super) fn policy_head(&self, owner: Option<&TenantId>, id: &PolicyId) -> Result<Option<u32>, StoreError> {
        self.get_decoded(T::PolicyHeads, &keys::policy_prefix(owner, id))
    }

    /// The current versions of the policies `tenant` sees: global ones first, then its own, each by id;
    /// only those in `mode` when given.
    pub fn list_policies(
        &self,
        tenant: &TenantId,
        mode: Option<Mode>,
        page: &PageRequest,
    ) -> Result<Page<Policy>, StoreError> {
        let limit = page.checked_limit()?;
        let global = keys::owner_prefix(None);
        let own = keys::owner_prefix(Some(tenant));
        let cursor = match &page.cursor {
            None => None,
            Some(_) => match page.cursor_key(&global) {
                Ok(key) => key,
                Err(_) => page.cursor_key(&own)?,
            },
        };
        let heads = self.tree(T::PolicyHeads)?;
        let ranges = [global.clone(), own.clone()].into_iter().map(|prefix| {
            let start = match &cursor {
                Some(c) if c.as_slice() >= prefix.as_slice() => Bound::Excluded(c.clone()),
                _ => Bound::Included(prefix.clone()),
            };
            let end = prefix_end(&prefix).map_or(Bound::Unbounded, Bound::Excluded);
            heads.range::<Vec<u8>, _>((start, end))
        });
        let mut iter = ranges.flatten();
        collect_page(&mut iter, limit, |key, value| {
            // One id names one policy in a tenant's view (`docs/learning-loop.md`, policy ids). Creation
            // refuses collisions; a store written before that may hold a global policy and a tenant policy
            // with one id, and then the tenant's own wins here as in `find_policy`, so that snapshots never
            // hold both.
            if let Some(id_segment) = key.strip_prefix(global.as_slice()) {
                let mut own_key = own.clone();
                own_key.extend_from_slice(id_segment);
                if heads.contains_key(own_key)? {
                    return Ok(None);
                }
            }
            let version = u32::decode(value)?;
            let mut policy_key = key.to_vec();
            policy_key.extend_from_slice(&version.to_be_bytes());
            let policy: Policy = self
                .get_decoded(T::Policies, &policy_key)?
                .ok_or_else(|| StoreError::corrupt("a policy head points at a missing version"))?;
            Ok(mode.is_none_or(|m| policy.mode == m).then_some(policy))
        })
    }

    /// A policy's activation audit, oldest first.
    pub fn policy_audit(
        &self,
        owner: Option<&TenantId>,
        id: &PolicyId,
        page: &PageRequest,
    ) -> Result<Page<AuditEntry>, StoreError> {
        self.page_prefix(T::Audit, &keys::policy_prefix(owner, id), page, |_, v| AuditEntry::decode(v).map(Some))
    }

    /// A tenant's usage of a tenant-period budget within the period starting at `period_start`.
    pub fn tenant_usage(
        &self,
        tenant: &TenantId,
        policy: &PolicyId,
        period_start: runguard_contract::Timestamp,
    ) -> Result<u64, StoreError> {
        Ok(self.get_decoded::<u64>(T::TenantUsage, &keys::tenant_usage(tenant, policy, period_start))?.unwrap_or(0))
    }

    /// A sled node keeps its tenants' rate windows in memory: the store holds none.
    pub fn tenant_rate_events(
        &self,
        _: &TenantId,
        _: runguard_contract::Timestamp,
    ) -> Result<Vec<crate::TenantRateUse>, StoreError> {
        Ok(Vec::new())
    }

    /// A policy's shadow statistics as `tenant` sees them (zero when none were recorded): a tenant policy's
    /// own, a global policy's from `tenant`'s runs only.
    pub fn shadow_stats(
        &self,
        owner: Option<&TenantId>,
        id: &PolicyId,
        tenant: &TenantId,
    ) -> Result<ShadowStats, StoreError> {
        Ok(self.get_decoded(T::ShadowStatsTree, &keys::shadow_stats(owner, id, tenant))?.unwrap_or_default())
    }

    /// Whether any tenant has a policy with this id (a global policy may not take it).
    ///
    /// Reads every policy head: creating a global policy is rare and done by an admin.
    pub fn policy_owners(&self) -> Result<Vec<TenantId>, StoreError> {
        let mut owners: Vec<TenantId> = Vec::new();
        for key in self.tree(T::PolicyHeads)?.iter().keys() {
            let key = key?;
            // `owner\0 id\0`; a global policy's owner segment is empty.
            let owner = key.split(|b| *b == 0).next().unwrap_or_default();
            if owner.is_empty() || owners.last().is_some_and(|last| last.as_str().as_bytes() == owner) {
                continue;
            }
            let owner = std::str::from_utf8(owner)
                .ok()
                .and_then(|owner| TenantId::new(owner).ok())
                .ok_or_else(|| StoreError::corrupt("a policy head key names no valid tenant"))?;
            owners.push(owner);
        }
        Ok(owners)
    }

    pub fn tenant_policy_id_exists(&self, id: &PolicyId) -> Result<bool, StoreError> {
        tenant_heads_hold(self.tree(T::PolicyHeads)?.iter().keys(), id)
    }

    /// A policy's audit entries made at or after `since`, oldest first. Entries are appended in time
    /// order, so the audit is read backwards from its end and only as far as `since`.
    pub fn policy_audit_since(
        &self,
        owner: Option<&TenantId>,
        id: &PolicyId,
        since: Timestamp,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree(T::Audit)?.scan_prefix(keys::policy_prefix(owner, id)).rev() {
            let entry = AuditEntry::decode(&item?.1)?;
            if entry.at < since {
                break;
            }
            out.push(entry);
        }
        out.reverse();
        Ok(out)
    }

    // ---- snapshots --------------------------------------------------------------------------------

    /// Loads and verifies the snapshot with `hash`: the stored canonical bytes must hash to it.
    pub fn load_snapshot(&self, hash: &SnapshotHash) -> Result<Snapshot, IntegrityError> {
        let key = match hex::decode(hash.as_str()) {
            Ok(key) => key,
            Err(err) => {
                return Err(IntegrityError::SnapshotUndecodable { hash: hash.clone(), reason: err.to_string() });
            }
        };
        match self.tree(T::Snapshots).and_then(|tree| Ok(tree.get(&key)?)) {
            Ok(Some(value)) => verify_snapshot(hash, &value),
            Ok(None) => Err(IntegrityError::SnapshotMissing { hash: hash.clone() }),
            Err(err) => Err(IntegrityError::SnapshotUndecodable { hash: hash.clone(), reason: err.to_string() }),
        }
    }

    /// The snapshot with exactly `id` (`snp_` and the first 32 hex digits of its hash): its hash and the
    /// verified snapshot, or `None` when no such snapshot exists. A shorter id names nothing: ids are not
    /// prefixes to search by.
    pub fn snapshot_by_id(&self, id: &SnapshotId) -> Result<Option<StoredSnapshot>, StoreError> {
        let Some(prefix) = snapshot_id_digest(id) else { return Ok(None) };
        match self.tree(T::Snapshots)?.scan_prefix(prefix).next() {
            None => Ok(None),
            Some(item) => {
                let (key, value) = item?;
                let hash = SnapshotHash::new(hex::encode(&key))
                    .map_err(|_| StoreError::corrupt("a snapshot key is not a hash"))?;
                let snapshot = verify_snapshot(&hash, &value);
                Ok(Some(StoredSnapshot { hash, snapshot }))
            }
        }
    }

    /// Whether one of `tenant`'s runs is bound to the snapshot with exactly `id`. One key lookup that
    /// reads nothing of the snapshot, so a tenant asking for another tenant's snapshot learns nothing from
    /// how long the answer takes.
    pub fn snapshot_bound_to(&self, tenant: &TenantId, id: &SnapshotId) -> Result<bool, StoreError> {
        let Some(digest) = snapshot_id_digest(id) else { return Ok(false) };
        Ok(self.tree(T::SnapshotBindings)?.contains_key(keys::snapshot_binding(tenant, &digest))?)
    }

    /// Fills the (tenant, snapshot) binding index from the stored runs when the store was written before
    /// the index existed (every run adds its binding, so an empty index beside runs means exactly that).
    /// The node calls it once after opening; offline tools do not, so that they never write.
    pub fn index_snapshot_bindings(&self) -> Result<(), StoreError> {
        let bindings = self.tree(T::SnapshotBindings)?;
        if !bindings.is_empty() || self.tree(T::Runs)?.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for run in self.all_runs() {
            let run = run?;
            if let Some(digest) = snapshot_id_digest(&run.snapshot.id) {
                batch.insert(keys::snapshot_binding(&run.tenant_id, &digest), Vec::new());
            }
        }
        bindings.apply_batch(batch)?;
        bindings.flush()?;
        Ok(())
    }

    // ---- runs and ledger --------------------------------------------------------------------------

    /// What a run's descendants add to it (zero when nothing was rolled up).
    pub fn run_rollup(&self, tenant: &TenantId, run: &RunId) -> Result<RunRollup, StoreError> {
        Ok(self.get_decoded(T::RunRollups, &keys::run(tenant, run))?.unwrap_or_default())
    }

    /// A run of `tenant`.
    pub fn get_run(&self, tenant: &TenantId, run: &RunId) -> Result<Option<StoredRun>, StoreError> {
        self.get_decoded(T::Runs, &keys::run(tenant, run))?.map(|run| self.caught_up(run)).transpose()
    }

    /// A stored run with what its steps since the row was written moved: a running run's row is written
    /// when more than its totals and next call change, and each step's ledger entry carries those two
    /// (`WriteOp::AdvanceRun`). A run that is not running had its row written when it stopped.
    fn caught_up(&self, mut run: StoredRun) -> Result<StoredRun, StoreError> {
        let ledger = self.tree(T::Ledger)?;
        let newest_first =
            ledger.scan_prefix(keys::run(&run.tenant_id, &run.run_id)).rev().map(|item| LedgerEntry::decode(&item?.1));
        run.catch_up(newest_first)?;
        Ok(run)
    }

    /// A tenant's runs, by run id.
    pub fn list_runs(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<StoredRun>, StoreError> {
        self.list_runs_where(tenant, page, &|_| true)
    }

    /// A tenant's runs that `keep` accepts, by run id. The filter runs over the tenant's runs in key
    /// order, so a page of a narrow filter may read many runs; no index is kept for it (the runs tree is
    /// already per tenant, and the filters an operator combines — status, label, creation time — would each
    /// need their own).
    pub fn list_runs_where(
        &self,
        tenant: &TenantId,
        page: &PageRequest,
        keep: &dyn Fn(&StoredRun) -> bool,
    ) -> Result<Page<StoredRun>, StoreError> {
        self.page_prefix(T::Runs, &keys::tenant(tenant), page, |_, v| {
            let run = self.caught_up(StoredRun::decode(v)?)?;
            Ok(keep(&run).then_some(run))
        })
    }

    /// The tenant, id and creation time of every run the live-run index lists, from its stored row (no
    /// ledger read: what the TTL sweep needs).
    pub fn running_run_starts(&self) -> impl Iterator<Item = Result<RunStart, StoreError>> + '_ {
        self.items_from(T::RunsLive, Vec::new()).map(move |item| {
            let (key, _) = item?;
            let run = self
                .get_decoded::<StoredRun>(T::Runs, &key)?
                .ok_or_else(|| StoreError::corrupt("the live-run index names a missing run"))?;
            Ok(RunStart { tenant_id: run.tenant_id, run_id: run.run_id, created_at: run.created_at })
        })
    }

    /// Every run of every tenant, in key order (for exports).
    pub fn all_runs(&self) -> impl Iterator<Item = Result<StoredRun, StoreError>> + '_ {
        self.items_from(T::Runs, Vec::new()).map(|item| self.caught_up(StoredRun::decode(&item?.1)?))
    }

    /// A run's whole ledger, in order.
    pub fn full_ledger(&self, tenant: &TenantId, run: &RunId) -> Result<Vec<LedgerEntry>, StoreError> {
        self.tree(T::Ledger)?.scan_prefix(keys::run(tenant, run)).map(|item| LedgerEntry::decode(&item?.1)).collect()
    }

    /// A run's ledger, in order.
    pub fn ledger(&self, tenant: &TenantId, run: &RunId, page: &PageRequest) -> Result<Page<LedgerEntry>, StoreError> {
        self.page_prefix(T::Ledger, &keys::run(tenant, run), page, |_, v| LedgerEntry::decode(v).map(Some))
    }

    /// The last ledger entry of a run (the answer to an identical retry).
    pub fn last_ledger_entry(&self, tenant: &TenantId, run: &RunId) -> Result<Option<LedgerEntry>, StoreError> {
        match self.tree(T::Ledger)?.scan_prefix(keys::run(tenant, run)).next_back() {
            None => Ok(None),
            Some(item) => Ok(Some(LedgerEntry::decode(&item?.1)?)),
        }
    }

    /// Loads a run for rehydration, re-verifying its snapshot and checking its ledger against its totals.
    ///
    /// Integrity problems are reported in the [`LoadedRun`] (the node then fails closed); only a run that
    /// cannot be read at all is an `Err`.
    pub fn load_run(&self, tenant: &TenantId, run: &RunId) -> Result<Option<LoadedRun>, StoreError> {
        // The row as stored: `LoadedRun::checked` catches it up from the ledger read below.
        let Some(stored) = self.get_decoded::<StoredRun>(T::Runs, &keys::run(tenant, run))? else { return Ok(None) };
        let snapshot = self.load_snapshot(&stored.snapshot.hash);
        let mut ledger = Vec::new();
        let mut problem = None;
        for item in self.tree(T::Ledger)?.scan_prefix(keys::run(tenant, run)) {
            let (key, value) = item?;
            match LedgerEntry::decode(&value) {
                Ok(entry) => ledger.push(entry),
                Err(err) => {
                    problem = Some(IntegrityError::LedgerUndecodable {
                        position: keys::trailing_u64(&key).unwrap_or(0),
                        reason: err.message().to_owned(),
                    });
                    break;
                }
            }
        }
        Ok(Some(LoadedRun::checked(stored, snapshot, ledger, problem)))
    }

    // ---- records ----------------------------------------------------------------------------------

    /// A record of `tenant` (another tenant's record is `None`).
    pub fn get_record(&self, tenant: &TenantId, id: &RecordId) -> Result<Option<PreventionRecord>, StoreError> {
        let Some(item) = self.tree(T::RecById)?.scan_prefix(keys::record_id_prefix(id)).next() else {
            return Ok(None);
        };
        let (key, _) = item?;
        let seq = keys::trailing_u64(&key).ok_or_else(|| StoreError::corrupt("a record index key is too short"))?;
        let record =
            self.record_at(seq)?.ok_or_else(|| StoreError::corrupt("a record index names a missing record"))?;
        Ok((&record.tenant_id == tenant).then_some(record))
    }

    /// The decision a live record was written for, from its run's ledger (`None` when the ledger does not
    /// hold it). The blocking decision is almost always the run's last entry, since a block stops the run.
    pub fn record_decision(&self, record: &PreventionRecord) -> Result<Option<Decision>, StoreError> {
        let prefix = keys::run(&record.tenant_id, &record.run_id);
        for item in self.tree(T::Ledger)?.scan_prefix(prefix).rev() {
            let entry = LedgerEntry::decode(&item?.1)?;
            if entry.decision.decision_id == record.decision_id {
                return Ok(Some(entry.decision));
            }
        }
        Ok(None)
    }

    /// The record at `seq`.
    pub fn record_at(&self, seq: u64) -> Result<Option<PreventionRecord>, StoreError> {
        self.get_decoded(T::Records, &keys::record(seq))
    }

    /// Lists a tenant's records (see [`RecordQuery`] for order and filters).
    pub fn list_records(&self, query: &RecordQuery) -> Result<Page<PreventionRecord>, StoreError> {
        let in_window = |r: &PreventionRecord| {
            query.since.is_none_or(|s| r.prevented_at >= s) && query.until.is_none_or(|u| r.prevented_at < u)
        };
        if let Some(run) = &query.run_id {
            let prefix = keys::records_of_run(&query.tenant, query.simulated, run);
            return self.page_prefix(T::RecByRun, &prefix, &query.page, |key, _| {
                let record = self.indexed_record(key)?;
                let keep = in_window(&record) && query.policy_id.as_ref().is_none_or(|p| &record.policy_id == p);
                Ok(keep.then_some(record))
            });
        }
        let (tree, prefix) = match &query.policy_id {
            Some(policy) => (T::RecByPolicy, keys::records_of_policy(&query.tenant, query.simulated, policy)),
            None => (T::RecByTenant, keys::records_of_tenant(&query.tenant, query.simulated)),
        };
        let lower = query.since.map(|s| keys::Key::new().time(s).into_vec());
        let upper = query.until.map(|u| keys::Key::new().time(u).into_vec());
        self.page_range(tree, &prefix, lower.as_deref(), upper.as_deref(), &query.page, |key, _| {
            self.indexed_record(key).map(Some)
        })
    }

    pub(super) fn indexed_record(&self, index_key: &[u8]) -> Result<PreventionRecord, StoreError> {
        let seq =
            keys::trailing_u64(index_key).ok_or_else(|| StoreError::corrupt("a record index key is too short"))?;
        self.record_at(seq)?.ok_or_else(|| StoreError::corrupt(format!("a record index names missing seq {seq}")))
    }

    /// Every record from `from_seq` on, in chain order (for `runguard export`).
    pub fn export_records(&self, from_seq: u64) -> impl Iterator<Item = Result<PreventionRecord, StoreError>> + '_ {
        self.items_from(T::Records, keys::record(from_seq)).map(|item| PreventionRecord::decode(&item?.1))
    }

    // ---- learning loop ----------------------------------------------------------------------------

    /// An incident of `tenant`.
    pub fn get_incident(&self, tenant: &TenantId, id: &IncidentId) -> Result<Option<Incident>, StoreError> {
        self.get_decoded(T::Incidents, &keys::tenant_item(tenant, id.as_str()))
    }

    /// A tenant's incidents, oldest first.
    pub fn list_incidents(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Incident>, StoreError> {
        self.page_prefix(T::IncidentsByTime, &keys::tenant(tenant), page, |key, _| {
            let prefix_len = keys::tenant(tenant).len() + 8;
            let id = key.get(prefix_len..).and_then(|b| std::str::from_utf8(b).ok()).unwrap_or_default();
            self.get_decoded(T::Incidents, &keys::tenant_item(tenant, id))?
                .ok_or_else(|| StoreError::corrupt("the incident index names a missing incident"))
                .map(Some)
        })
    }

    /// A tenant's incidents created at or after `since`, oldest first: a range of the time index, so the
    /// cost follows the incidents in the window, not every incident ever stored.
    pub fn incidents_since(&self, tenant: &TenantId, since: Timestamp) -> Result<Vec<Incident>, StoreError> {
        let prefix = keys::tenant(tenant);
        let end = prefix_end(&prefix).map_or(Bound::Unbounded, Bound::Excluded);
        let start = Bound::Included(keys::incidents_from(tenant, since));
        let mut out = Vec::new();
        for item in self.tree(T::IncidentsByTime)?.range::<Vec<u8>, _>((start, end)) {
            let (key, _) = item?;
            let id = key.get(prefix.len() + 8..).and_then(|b| std::str::from_utf8(b).ok()).unwrap_or_default();
            let incident = self
                .get_decoded(T::Incidents, &keys::tenant_item(tenant, id))?
                .ok_or_else(|| StoreError::corrupt("the incident index names a missing incident"))?;
            out.push(incident);
        }
        Ok(out)
    }

    /// A pattern of `tenant`.
    pub fn get_pattern(&self, tenant: &TenantId, id: &PatternId) -> Result<Option<Pattern>, StoreError> {
        self.get_decoded(T::Patterns, &keys::tenant_item(tenant, id.as_str()))
    }

    /// The pattern of `tenant` grouping (signature hash, error type).
    pub fn find_pattern(
        &self,
        tenant: &TenantId,
        signature: &SignatureHash,
        error_type: &str,
    ) -> Result<Option<Pattern>, StoreError> {
        let Some(id) =
            self.get_decoded::<String>(T::PatternsBySig, &keys::pattern_by_signature(tenant, signature, error_type))?
        else {
            return Ok(None);
        };
        self.get_decoded(T::Patterns, &keys::tenant_item(tenant, &id))
    }

    /// A tenant's patterns, by id.
    pub fn list_patterns(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Pattern>, StoreError> {
        self.page_prefix(T::Patterns, &keys::tenant(tenant), page, |_, v| Pattern::decode(v).map(Some))
    }

    /// The regret of a record, if any.
    pub fn get_regret(&self, record: &RecordId) -> Result<Option<Regret>, StoreError> {
        self.get_decoded(T::Regrets, &keys::regret(record))
    }

    /// The regrets of `tenant` on a policy's records made at or after `since`, oldest first.
    pub fn regrets_for_policy(
        &self,
        tenant: &TenantId,
        policy: &PolicyId,
        since: Option<Timestamp>,
    ) -> Result<Vec<Regret>, StoreError> {
        let prefix = keys::Key::new().seg(tenant.as_str()).seg(policy.as_str()).into_vec();
        let start = match since {
            Some(at) => keys::Key::new().seg(tenant.as_str()).seg(policy.as_str()).time(at).into_vec(),
            None => prefix.clone(),
        };
        let end = prefix_end(&prefix).map_or(Bound::Unbounded, Bound::Excluded);
        let mut out = Vec::new();
        for item in self.tree(T::RegretsByPolicy)?.range::<Vec<u8>, _>((Bound::Included(start), end)) {
            let (key, _) = item?;
            let id = key.get(prefix.len() + 8..).and_then(|b| std::str::from_utf8(b).ok()).unwrap_or_default();
            let regret = self
                .get_decoded::<Regret>(T::Regrets, &keys::Key::new().seg(id).into_vec())?
                .ok_or_else(|| StoreError::corrupt("the regret index names a missing regret"))?;
            out.push(regret);
        }
        Ok(out)
    }

    /// A tenant's current graduation state.
    pub fn graduation(&self, tenant: &TenantId) -> Result<Option<GraduationState>, StoreError> {
        self.get_decoded(T::Graduation, &keys::tenant(tenant))
    }

    /// Every graduation state a tenant went through, oldest first.
    pub fn graduation_history(
        &self,
        tenant: &TenantId,
        page: &PageRequest,
    ) -> Result<Page<GraduationState>, StoreError> {
        self.page_prefix(T::GraduationHistory, &keys::tenant(tenant), page, |_, v| GraduationState::decode(v).map(Some))
    }

    // ---- helpers ----------------------------------------------------------------------------------

    /// Every entry of a tree from key `from` on; a store that cannot be read yields one error.
    pub(super) fn items_from(
        &self,
        t: T,
        from: Vec<u8>,
    ) -> impl Iterator<Item = Result<(IVec, IVec), StoreError>> + use<> {
        let (tree, unreadable) = match self.tree(t) {
            Ok(tree) => (Some(tree), None),
            Err(err) => (None, Some(err)),
        };
        unreadable
            .map(Err)
            .into_iter()
            .chain(tree.into_iter().flat_map(move |tree| tree.range(from.clone()..)).map(|item| Ok(item?)))
    }

    pub(super) fn get_decoded<V: Stored>(&self, t: T, key: &[u8]) -> Result<Option<V>, StoreError> {
        match self.tree(t)?.get(key)? {
            Some(value) => Ok(Some(V::decode(&value)?)),
            None => Ok(None),
        }
    }

    pub(super) fn page_prefix<V>(
        &self,
        t: T,
        prefix: &[u8],
        page: &PageRequest,
        map: impl FnMut(&[u8], &[u8]) -> Result<Option<V>, StoreError>,
    ) -> Result<Page<V>, StoreError> {
        self.page_range(t, prefix, None, None, page, map)
    }

    /// A page over keys `prefix ‖ lower ..< prefix ‖ upper` (the whole prefix when unbounded), after the
    /// cursor.
    pub(super) fn page_range<V>(
        &self,
        t: T,
        prefix: &[u8],
        lower: Option<&[u8]>,
        upper: Option<&[u8]>,
        page: &PageRequest,
        mut map: impl FnMut(&[u8], &[u8]) -> Result<Option<V>, StoreError>,
    ) -> Result<Page<V>, StoreError> {
        let limit = page.checked_limit()?;
        let cursor = page.cursor_key(prefix)?;
        let mut start_key = prefix.to_vec();
        start_key.extend_from_slice(lower.unwrap_or_default());
        let start = match cursor {
            Some(c) if c >= start_key => Bound::Excluded(c),
            _ => Bound::Included(start_key),
        };
        let end = match upper {
            Some(upper) => {
                let mut end = prefix.to_vec();
                end.extend_from_slice(upper);
                Bound::Excluded(end)
            }
            None => prefix_end(prefix).map_or(Bound::Unbounded, Bound::Excluded),
        };
        if let (Bound::Excluded(s) | Bound::Included(s), Bound::Excluded(e)) = (&start, &end)
            && s >= e
        {
            return Ok(Page::empty());
        }
        let mut iter = self.tree(t)?.range::<Vec<u8>, _>((start, end));
        collect_page(&mut iter, limit, |k, v| map(k, v))
    }
}

/// Reads matches from `iter` until `limit` are found, then looks for one more to decide `next_cursor`.
pub(super) fn collect_page<V>(
    iter: &mut dyn Iterator<Item = sled::Result<(IVec, IVec)>>,
    limit: usize,
    mut map: impl FnMut(&[u8], &[u8]) -> Result<Option<V>, StoreError>,
) -> Result<Page<V>, StoreError> {
    let mut items = Vec::new();
    let mut last_key: Option<IVec> = None;
    for item in iter {
        let (key, value) = item?;
        if let Some(v) = map(&key, &value)? {
            if items.len() == limit {
                let cursor = last_key.map(|k| hex::encode(&k));
                return Ok(Page { items, next_cursor: cursor });
            }
            items.push(v);
            last_key = Some(key);
        }
    }
    Ok(Page { items, next_cursor: None })
}

/// The 16 hash bytes a snapshot id names, when it is exactly `snp_` and 32 hex digits.
pub(crate) fn snapshot_id_digest(id: &SnapshotId) -> Option<Vec<u8>> {
    let hex_digits = id.as_str().strip_prefix(SnapshotId::PREFIX)?;
    if hex_digits.len() != SnapshotHash::HEX_LEN / 2 {
        return None;
    }
    hex::decode(hex_digits).ok()
}

/// Whether any of these `policy_heads` keys is a tenant's policy (not a global one) with this id.
pub(super) fn tenant_heads_hold<K: AsRef<[u8]>, E>(
    keys: impl Iterator<Item = Result<K, E>>,
    id: &PolicyId,
) -> Result<bool, StoreError>
where
    StoreError: From<E>,
{
    let mut id_segment = id.as_str().as_bytes().to_vec();
    id_segment.push(0);
    for key in keys {
        let key = key?;
        let key = key.as_ref();
        // `owner\0 id\0`: a global policy's owner segment is empty, so its key starts with 0.
        if key.first().is_some_and(|b| *b != 0) && key.ends_with(&id_segment) {
            let owner_len = key.len() - id_segment.len();
            if key.get(owner_len.wrapping_sub(1)) == Some(&0) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}
