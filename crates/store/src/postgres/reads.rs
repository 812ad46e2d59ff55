//! Reads on PostgreSQL: every query is tenant-scoped as on sled, ordered as on sled, and paginated with
//! the same cursors (the hex of the sled key of the last item, so a cursor means the same on both).

use postgres::types::ToSql;
use runguard_contract::{
    AuditEntry, Decision, Incident, IncidentId, Mode, Pattern, PatternId, Policy, PolicyId, PreventionRecord,
    RecordHash, RecordId, Regret, RunId, SignatureHash, Snapshot, SnapshotHash, SnapshotId, TenantId, Timestamp,
};
use serde::de::DeserializeOwned;

use super::{PgStore, enum_str, from_json, i64_of, pg_error, u64_of};
use crate::backend::Items;
use crate::error::StoreError;
use crate::integrity::verify_snapshot_bytes;
use crate::integrity::{IntegrityError, LoadedRun, StoredSnapshot};
use crate::keys::{self, owner as owner_str};
use crate::model::{GraduationState, LedgerEntry, RunRollup, RunStart, ShadowStats, StoredRun};
use crate::query::{Page, PageRequest, RecordQuery};

type Params<'a> = Vec<&'a (dyn ToSql + Sync)>;

pub(super) const SHADOW_SQL: &str = "SELECT evaluations, would_block, would_warn, would_throttle FROM shadow_stats
     WHERE owner = $1 AND policy_id = $2 AND run_tenant = $3";

/// A tenant's usage of a tenant-period budget (migration 0004).
pub(super) const TENANT_USAGE_SQL: &str =
    "SELECT used FROM tenant_usage WHERE tenant_id = $1 AND policy_id = $2 AND period_start_ms = $3";

/// The statistics of a [`SHADOW_SQL`] row (zero when there is none).
pub(super) fn shadow_row(row: Option<&postgres::Row>) -> Result<ShadowStats, StoreError> {
    let Some(row) = row else { return Ok(ShadowStats::default()) };
    let n = |i: usize| -> Result<u64, StoreError> {
        let v: i64 = row.try_get(i).map_err(|err| pg_error("cannot read shadow statistics", err))?;
        u64_of(v)
    };
    Ok(ShadowStats { evaluations: n(0)?, would_block: n(1)?, would_warn: n(2)?, would_throttle: n(3)? })
}

pub(super) const ROLLUP_SQL: &str =
    "SELECT tokens, cost_micros, steps, duration_ms, children FROM run_rollups WHERE tenant_id = $1 AND run_id = $2";

/// The rolled-up part of a [`ROLLUP_SQL`] row (zero when there is none).
pub(super) fn rollup_row(row: Option<&postgres::Row>) -> Result<RunRollup, StoreError> {
    let Some(row) = row else { return Ok(RunRollup::default()) };
    let n = |i: usize| -> Result<u64, StoreError> {
        let v: i64 = row.try_get(i).map_err(|err| pg_error("cannot read rolled-up totals", err))?;
        u64_of(v)
    };
    let descendants = runguard_contract::Totals { tokens: n(0)?, cost_micros: n(1)?, steps: n(2)?, duration_ms: n(3)? };
    Ok(RunRollup { descendants, children: n(4)? })
}

/// The run key of a tenant policy's statistics: its owner, as on sled.
fn shadow_run_tenant<'a>(owner: Option<&'a TenantId>, tenant: &'a TenantId) -> &'a TenantId {
    owner.unwrap_or(tenant)
}

/// The rest of a cursor's key after `prefix`, for a query whose keys are `prefix ‖ rest`.
fn cursor_rest(page: &PageRequest, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(page.cursor_key(prefix)?.map(|key| key.get(prefix.len()..).unwrap_or_default().to_vec()))
}

fn bad_cursor(page: &PageRequest) -> StoreError {
    StoreError::invalid(format!("cursor `{}` is not valid for this query", page.cursor.as_deref().unwrap_or_default()))
}

/// A terminated id segment (`id\0`) of a cursor.
fn cursor_id(page: &PageRequest, rest: &[u8]) -> Result<String, StoreError> {
    let id = rest.strip_suffix(&[0]).ok_or_else(|| bad_cursor(page))?;
    String::from_utf8(id.to_vec()).map_err(|_| bad_cursor(page))
}

/// A big-endian `u64` of exactly 8 bytes.
fn cursor_u64(page: &PageRequest, bytes: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = bytes.try_into().map_err(|_| bad_cursor(page))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Milliseconds from the sortable form of a timestamp in a key.
fn millis_of_bits(bits: u64) -> i64 {
    i64::from_be_bytes((bits ^ (1u64 << 63)).to_be_bytes())
}

/// A page of `limit` items from rows fetched with `LIMIT limit + 1`: the extra row only tells that there
/// is a next page, whose cursor is the key of the last item kept.
fn page_of<V>(
    rows: Vec<postgres::Row>,
    limit: usize,
    mut item: impl FnMut(&postgres::Row) -> Result<(V, Vec<u8>), StoreError>,
) -> Result<Page<V>, StoreError> {
    let more = rows.len() > limit;
    let mut items = Vec::with_capacity(limit.min(rows.len()));
    let mut last_key = None;
    for row in rows.iter().take(limit) {
        let (value, key) = item(row)?;
        items.push(value);
        last_key = Some(key);
    }
    let next_cursor = if more { last_key.map(hex::encode) } else { None };
    Ok(Page { items, next_cursor })
}

fn body<T: DeserializeOwned>(row: &postgres::Row, what: &str) -> Result<T, StoreError> {
    let value: serde_json::Value = row.try_get("body").map_err(|err| pg_error(format!("cannot read {what}"), err))?;
    from_json(what, value)
}

fn column<'a, T: postgres::types::FromSql<'a>>(row: &'a postgres::Row, name: &str) -> Result<T, StoreError> {
    row.try_get(name).map_err(|err| pg_error(format!("cannot read column `{name}`"), err))
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1)
}

impl PgStore {
    fn rows(&self, what: &str, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<postgres::Row>, StoreError> {
        self.read(|conn| conn.query(sql, params)).map_err(|err| err.context(format!("cannot read {what}")))
    }

    fn one<T: DeserializeOwned>(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<T>, StoreError> {
        let row =
            self.read(|conn| conn.query_opt(sql, params)).map_err(|err| err.context(format!("cannot read {what}")))?;
        row.map(|row| body(&row, what)).transpose()
    }

    fn all<T: DeserializeOwned>(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<T>, StoreError> {
        self.rows(what, sql, params)?.iter().map(|row| body(row, what)).collect()
    }

    /// A running run as its ledger leaves it (`StoredRun::catch_up`): a step that moves only its totals
    /// and next call appends its ledger entry without rewriting the row (`WriteOp::AdvanceRun`). Reads the
    /// newest entries first, and the whole ledger only when none of them moved the run (a long series of
    /// throttles).
    fn caught_up(&self, mut run: StoredRun) -> Result<StoredRun, StoreError> {
        const NEWEST: i64 = 8;
        if !run.status.is_running() {
            // Its row was written whole when it stopped: no query.
            return Ok(run);
        }
        let newest = |limit: Option<i64>| {
            self.all::<LedgerEntry>(
                "the ledger",
                "SELECT body FROM ledger WHERE tenant_id = $1 AND run_id = $2 ORDER BY position DESC LIMIT $3",
                &[&run.tenant_id.as_str(), &run.run_id.as_str(), &limit],
            )
        };
        let mut entries = newest(Some(NEWEST))?;
        if entries.len() as i64 == NEWEST && entries.iter().all(|entry| entry.next_call().is_none()) {
            entries = newest(None)?;
        }
        run.catch_up_from(entries.iter());
        Ok(run)
    }

    // ---- chain ------------------------------------------------------------------------------------

    pub(crate) fn chain_head(&self) -> Result<(u64, RecordHash), StoreError> {
        let rows = self.rows("the chain head", "SELECT head_seq, head_hash FROM runguard_chain", &[])?;
        let row = rows.first().ok_or_else(|| StoreError::corrupt("the chain head row is missing"))?;
        let seq = u64_of(column(row, "head_seq")?)?;
        let hash = RecordHash::new(column::<String>(row, "head_hash")?)
            .map_err(|_| StoreError::corrupt("the chain head holds an invalid hash"))?;
        Ok((seq, hash))
    }

    // ---- policies ---------------------------------------------------------------------------------

    pub(crate) fn get_policy(
        &self,
        owner: Option<&TenantId>,
        id: &PolicyId,
        version: Option<u32>,
    ) -> Result<Option<Policy>, StoreError> {
        let owner = owner_str(owner);
        match version {
            Some(v) => {
                let v = i32::try_from(v).unwrap_or(i32::MAX);
                self.one(
                    "a policy",
                    "SELECT body FROM policies WHERE owner = $1 AND policy_id = $2 AND version = $3",
                    &[&owner, &id.as_str(), &v],
                )
            }
            None => self.one(
                "a policy",
                "SELECT p.body FROM policy_heads h JOIN policies p USING (owner, policy_id, version)
                 WHERE h.owner = $1 AND h.policy_id = $2",
                &[&owner, &id.as_str()],
            ),
        }
    }

    pub(crate) fn policy_versions(&self, owner: Option<&TenantId>, id: &PolicyId) -> Result<Vec<Policy>, StoreError> {
        self.all(
            "policy versions",
            "SELECT body FROM policies WHERE owner = $1 AND policy_id = $2 ORDER BY version",
            &[&owner_str(owner), &id.as_str()],
        )
    }

    pub(crate) fn list_policies(
        &self,
        tenant: &TenantId,
        mode: Option<Mode>,
        page: &PageRequest,
    ) -> Result<Page<Policy>, StoreError> {
        let limit = page.checked_limit()?;
        let global = keys::owner_prefix(None);
        let own = keys::owner_prefix(Some(tenant));
        let (after_owner, after_id) = match &page.cursor {
            None => (String::new(), None),
            Some(_) => match cursor_rest(page, &global) {
                Ok(Some(rest)) => (String::new(), Some(cursor_id(page, &rest)?)),
                _ => match cursor_rest(page, &own)? {
                    Some(rest) => (tenant.as_str().to_owned(), Some(cursor_id(page, &rest)?)),
                    None => (String::new(), None),
                },
            },
        };
        let mode = mode.map(|m| enum_str(&m));
        // A tenant's own policy hides a global one with its id (see the sled backend's `list_policies`).
        let rows = self.rows(
            "policies",
            "SELECT h.owner, h.policy_id, p.body FROM policy_heads h JOIN policies p USING (owner, policy_id, version)
             WHERE h.owner IN ('', $1)
               AND ($2::text IS NULL OR (h.owner, h.policy_id) > ($3, $2))
               AND ($4::text IS NULL OR p.mode = $4)
               AND NOT (h.owner = '' AND EXISTS
                   (SELECT 1 FROM policy_heads o WHERE o.owner = $1 AND o.policy_id = h.policy_id))
             ORDER BY h.owner, h.policy_id LIMIT $5",
            &[&tenant.as_str(), &after_id, &after_owner, &mode, &limit_param(limit)],
        )?;
        page_of(rows, limit, |row| {
            let owner: String = column(row, "owner")?;
            let id: String = column(row, "policy_id")?;
            let key = keys::Key::new().seg(&owner).seg(&id).into_vec();
            Ok((body(row, "policy")?, key))
        })
    }

    pub(crate) fn policy_audit(
        &self,
        owner: Option<&TenantId>,
        id: &PolicyId,
        page: &PageRequest,
    ) -> Result<Page<AuditEntry>, StoreError> {
        let limit = page.checked_limit()?;
        let prefix = keys::policy_prefix(owner, id);
        let after = cursor_rest(page, &prefix)?.map(|rest| cursor_u64(page, &rest)).transpose()?;
        let after = after.map(i64_of).transpose()?;
        let rows = self.rows(
            "the audit",
            "SELECT n, body FROM policy_audit WHERE owner = $1 AND policy_id = $2 AND ($3::bigint IS NULL OR n > $3)
             ORDER BY n LIMIT $4",
            &[&owner_str(owner), &id.as_str(), &after, &limit_param(limit)],
        )?;
        page_of(rows, limit, |row| {
            let n = u64_of(column(row, "n")?)?;
            Ok((body(row, "audit entry")?, keys::audit(owner, id, n)))
        })
    }

    pub(crate) fn tenant_usage(
        &self,
        tenant: &TenantId,
        policy: &PolicyId,
        period_start: runguard_contract::Timestamp,
    ) -> Result<u64, StoreError> {
        let rows = self.rows(
            "a tenant usage total",
            TENANT_USAGE_SQL,
            &[&tenant.as_str(), &policy.as_str(), &period_start.unix_millis()],
        )?;
        rows.first().map_or(Ok(0), |row| u64_of(column(row, "used")?))
    }

    pub(crate) fn tenant_rate_events(
        &self,
        tenant: &TenantId,
        after: runguard_contract::Timestamp,
    ) -> Result<Vec<crate::TenantRateUse>, StoreError> {
        let rows = self.rows(
            "tenant rate events",
            "SELECT at_ms, steps, tokens, cost_micros FROM tenant_rate_events
             WHERE tenant_id = $1 AND at_ms > $2 ORDER BY id",
            &[&tenant.as_str(), &after.unix_millis()],
        )?;
        rows.iter()
            .map(|row| {
                Ok(crate::TenantRateUse {
                    at: runguard_contract::Timestamp::from_unix_millis(column(row, "at_ms")?),
                    steps: u64_of(column(row, "steps")?)?,
                    tokens: u64_of(column(row, "tokens")?)?,
                    cost_micros: u64_of(column(row, "cost_micros")?)?,
                })
            })
            .collect()
    }

    pub(crate) fn run_rollup(&self, tenant: &TenantId, run: &RunId) -> Result<RunRollup, StoreError> {
        let rows = self.rows("rolled-up totals", ROLLUP_SQL, &[&tenant.as_str(), &run.as_str()])?;
        rollup_row(rows.first())
    }

    pub(crate) fn shadow_stats(
        &self,
        owner: Option<&TenantId>,
        id: &PolicyId,
        tenant: &TenantId,
    ) -> Result<ShadowStats, StoreError> {
        let run_tenant = shadow_run_tenant(owner, tenant);
        let rows =
            self.rows("shadow statistics", SHADOW_SQL, &[&owner_str(owner), &id.as_str(), &run_tenant.as_str()])?;
        shadow_row(rows.first())
    }

    pub(crate) fn policy_owners(&self) -> Result<Vec<TenantId>, StoreError> {
        let rows = self.rows(
            "policy owners",
            "SELECT DISTINCT owner FROM policy_heads WHERE owner <> '' ORDER BY owner",
            &[],
        )?;
        rows.iter()
            .map(|row| {
                let owner: String = column(row, "owner")?;
                TenantId::new(owner).map_err(|err| StoreError::corrupt(format!("a stored policy owner: {err}")))
            })
            .collect()
    }

    pub(crate) fn tenant_policy_id_exists(&self, id: &PolicyId) -> Result<bool, StoreError> {
        let rows = self.rows(
            "policy heads",
            "SELECT 1 FROM policy_heads WHERE policy_id = $1 AND owner <> '' LIMIT 1",
            &[&id.as_str()],
        )?;
        Ok(!rows.is_empty())
    }

    pub(crate) fn policy_audit_since(
        &self,
        owner: Option<&TenantId>,
        id: &PolicyId,
        since: Timestamp,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        // Entries are appended in time order: as on sled, the window is the tail after the last entry made
        // before `since`.
        self.all(
            "the audit",
            "SELECT body FROM policy_audit WHERE owner = $1 AND policy_id = $2 AND n > coalesce(
                 (SELECT max(n) FROM policy_audit a WHERE a.owner = $1 AND a.policy_id = $2 AND a.at_ms < $3), -1)
             ORDER BY n",
            &[&owner_str(owner), &id.as_str(), &since.unix_millis()],
        )
    }

    // ---- snapshots --------------------------------------------------------------------------------

    pub(crate) fn load_snapshot(&self, hash: &SnapshotHash) -> Result<Snapshot, IntegrityError> {
        let unreadable = |reason: String| IntegrityError::SnapshotUndecodable { hash: hash.clone(), reason };
        let rows = self
            .rows("a snapshot", "SELECT canonical FROM snapshots WHERE hash = $1", &[&hash.as_str()])
            .map_err(|err| unreadable(err.to_string()))?;
        let Some(row) = rows.first() else { return Err(IntegrityError::SnapshotMissing { hash: hash.clone() }) };
        let canonical: String = column(row, "canonical").map_err(|err| unreadable(err.to_string()))?;
        verify_snapshot_bytes(hash, canonical.as_bytes())
    }

    pub(crate) fn snapshot_by_id(&self, id: &SnapshotId) -> Result<Option<StoredSnapshot>, StoreError> {
        if crate::sled_backend::snapshot_id_digest(id).is_none() {
            return Ok(None);
        }
        let rows = self.rows(
            "a snapshot",
            "SELECT hash, canonical FROM snapshots WHERE snapshot_id = $1 ORDER BY hash LIMIT 1",
            &[&id.as_str()],
        )?;
        let Some(row) = rows.first() else { return Ok(None) };
        let hash = SnapshotHash::new(column::<String>(row, "hash")?)
            .map_err(|_| StoreError::corrupt("a snapshot key is not a hash"))?;
        let canonical: String = column(row, "canonical")?;
        let snapshot = verify_snapshot_bytes(&hash, canonical.as_bytes());
        Ok(Some(StoredSnapshot { hash, snapshot }))
    }

    pub(crate) fn snapshot_bound_to(&self, tenant: &TenantId, id: &SnapshotId) -> Result<bool, StoreError> {
        if crate::sled_backend::snapshot_id_digest(id).is_none() {
            return Ok(false);
        }
        let rows = self.rows(
            "runs",
            "SELECT 1 FROM runs WHERE tenant_id = $1 AND snapshot_id = $2 LIMIT 1",
            &[&tenant.as_str(), &id.as_str()],
        )?;
        Ok(!rows.is_empty())
    }

    // ---- runs and ledger --------------------------------------------------------------------------

    pub(crate) fn get_run(&self, tenant: &TenantId, run: &RunId) -> Result<Option<StoredRun>, StoreError> {
        self.run_row(tenant, run)?.map(|run| self.caught_up(run)).transpose()
    }

    /// A run's row as stored, not caught up from its ledger.
    fn run_row(&self, tenant: &TenantId, run: &RunId) -> Result<Option<StoredRun>, StoreError> {
        self.one(
            "a run",
            "SELECT body FROM runs WHERE tenant_id = $1 AND run_id = $2",
            &[&tenant.as_str(), &run.as_str()],
        )
    }

    /// Reads the tenant's runs in chunks after the cursor until a page of kept runs (and one more, to know
    /// whether a next page exists) is found or the runs are exhausted.
    pub(crate) fn list_runs_where(
        &self,
        tenant: &TenantId,
        page: &PageRequest,
        keep: &dyn Fn(&StoredRun) -> bool,
    ) -> Result<Page<StoredRun>, StoreError> {
        const CHUNK: usize = 512;
        let limit = page.checked_limit()?;
        let mut after = cursor_rest(page, &keys::tenant(tenant))?.map(|rest| cursor_id(page, &rest)).transpose()?;
        let mut items: Vec<StoredRun> = Vec::with_capacity(limit.min(CHUNK));
        loop {
            let rows = self.rows(
                "runs",
                "SELECT run_id, body FROM runs WHERE tenant_id = $1 AND ($2::text IS NULL OR run_id > $2)
                 ORDER BY run_id LIMIT $3",
                &[&tenant.as_str(), &after, &i64::try_from(CHUNK).unwrap_or(i64::MAX)],
            )?;
            for row in &rows {
                let run = self.caught_up(body(row, "run")?)?;
                after = Some(run.run_id.as_str().to_owned());
                if !keep(&run) {
                    continue;
                }
                if items.len() == limit {
                    let next_cursor = items.last().map(|last| hex::encode(keys::run(tenant, &last.run_id)));
                    return Ok(Page { items, next_cursor });
                }
                items.push(run);
            }
            if rows.len() < CHUNK {
                return Ok(Page { items, next_cursor: None });
            }
        }
    }

    pub(crate) fn list_runs(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<StoredRun>, StoreError> {
        self.list_runs_where(tenant, page, &|_| true)
    }

    pub(crate) fn running_run_starts(&self) -> Items<'_, RunStart> {
        let sql =
            "SELECT tenant_id, run_id, created_at_ms FROM runs WHERE status = 'running' ORDER BY tenant_id, run_id";
        let starts = self.rows("running runs", sql, &[]).and_then(|rows| {
            rows.iter()
                .map(|row| {
                    let tenant_id = TenantId::new(column::<String>(row, "tenant_id")?)
                        .map_err(|_| StoreError::corrupt("a run row holds an invalid tenant id"))?;
                    let run_id = RunId::new(column::<String>(row, "run_id")?)
                        .map_err(|_| StoreError::corrupt("a run row holds an invalid run id"))?;
                    let created_at = Timestamp::from_unix_millis(column::<i64>(row, "created_at_ms")?);
                    Ok(RunStart { tenant_id, run_id, created_at })
                })
                .collect::<Result<Vec<_>, StoreError>>()
        });
        match starts {
            Ok(starts) => Box::new(starts.into_iter().map(Ok)),
            Err(err) => Box::new(std::iter::once(Err(err))),
        }
    }

    pub(crate) fn all_runs(&self) -> Items<'_, StoredRun> {
        // Keyset pages, so that an export of many runs never holds them all.
        let mut after: Option<(String, String)> = None;
        let mut buffer: std::vec::IntoIter<StoredRun> = Vec::new().into_iter();
        let mut done = false;
        Box::new(std::iter::from_fn(move || {
            loop {
                if let Some(run) = buffer.next() {
                    return Some(self.caught_up(run));
                }
                if done {
                    return None;
                }
                let (tenant, run) = after.clone().unwrap_or_default();
                let page = self.all::<StoredRun>(
                    "runs",
                    "SELECT body FROM runs WHERE $1::boolean OR (tenant_id, run_id) > ($2, $3)
                     ORDER BY tenant_id, run_id LIMIT 500",
                    &[&after.is_none(), &tenant, &run],
                );
                match page {
                    Err(err) => {
                        done = true;
                        return Some(Err(err));
                    }
                    Ok(runs) => {
                        done = runs.len() < 500;
                        after = runs.last().map(|r| (r.tenant_id.as_str().to_owned(), r.run_id.as_str().to_owned()));
                        buffer = runs.into_iter();
                    }
                }
            }
        }))
    }

    pub(crate) fn full_ledger(&self, tenant: &TenantId, run: &RunId) -> Result<Vec<LedgerEntry>, StoreError> {
        self.all(
            "the ledger",
            "SELECT body FROM ledger WHERE tenant_id = $1 AND run_id = $2 ORDER BY position",
            &[&tenant.as_str(), &run.as_str()],
        )
    }

    pub(crate) fn ledger(
        &self,
        tenant: &TenantId,
        run: &RunId,
        page: &PageRequest,
    ) -> Result<Page<LedgerEntry>, StoreError> {
        let limit = page.checked_limit()?;
        let after = cursor_rest(page, &keys::run(tenant, run))?.map(|rest| cursor_u64(page, &rest)).transpose()?;
        let after = after.map(i64_of).transpose()?;
        let rows = self.rows(
            "the ledger",
            "SELECT position, body FROM ledger
             WHERE tenant_id = $1 AND run_id = $2 AND ($3::bigint IS NULL OR position > $3)
             ORDER BY position LIMIT $4",
            &[&tenant.as_str(), &run.as_str(), &after, &limit_param(limit)],
        )?;
        page_of(rows, limit, |row| {
            let position = u64_of(column(row, "position")?)?;
            Ok((body(row, "ledger entry")?, keys::ledger(tenant, run, position)))
        })
    }

    pub(crate) fn last_ledger_entry(&self, tenant: &TenantId, run: &RunId) -> Result<Option<LedgerEntry>, StoreError> {
        self.one(
            "the ledger",
            "SELECT body FROM ledger WHERE tenant_id = $1 AND run_id = $2 ORDER BY position DESC LIMIT 1",
            &[&tenant.as_str(), &run.as_str()],
        )
    }

    pub(crate) fn load_run(&self, tenant: &TenantId, run: &RunId) -> Result<Option<LoadedRun>, StoreError> {
        // The row as stored: `LoadedRun::checked` catches it up from the ledger read below.
        let Some(stored) = self.run_row(tenant, run)? else { return Ok(None) };
        let snapshot = self.load_snapshot(&stored.snapshot.hash);
        let rows = self.rows(
            "the ledger",
            "SELECT position, body FROM ledger WHERE tenant_id = $1 AND run_id = $2 ORDER BY position",
            &[&tenant.as_str(), &run.as_str()],
        )?;
        let mut ledger = Vec::with_capacity(rows.len());
        let mut problem = None;
        for row in &rows {
            match body::<LedgerEntry>(row, "ledger entry") {
                Ok(entry) => ledger.push(entry),
                Err(err) => {
                    let position = column::<i64>(row, "position").ok().and_then(|p| u64::try_from(p).ok());
                    problem = Some(IntegrityError::LedgerUndecodable {
                        position: position.unwrap_or(0),
                        reason: err.message().to_owned(),
                    });
                    break;
                }
            }
        }
        Ok(Some(LoadedRun::checked(stored, snapshot, ledger, problem)))
    }

    // ---- records ----------------------------------------------------------------------------------

    pub(crate) fn get_record(&self, tenant: &TenantId, id: &RecordId) -> Result<Option<PreventionRecord>, StoreError> {
        self.one(
            "a record",
            "SELECT body FROM records WHERE record_id = $1 AND tenant_id = $2",
            &[&id.as_str(), &tenant.as_str()],
        )
    }

    pub(crate) fn record_decision(&self, record: &PreventionRecord) -> Result<Option<Decision>, StoreError> {
        let entry: Option<LedgerEntry> = self.one(
            "the ledger",
            "SELECT body FROM ledger WHERE tenant_id = $1 AND run_id = $2 AND decision_id = $3
             ORDER BY position DESC LIMIT 1",
            &[&record.tenant_id.as_str(), &record.run_id.as_str(), &record.decision_id.as_str()],
        )?;
        Ok(entry.map(|e| e.decision))
    }

    pub(crate) fn record_at(&self, seq: u64) -> Result<Option<PreventionRecord>, StoreError> {
        self.one("a record", "SELECT body FROM records WHERE seq = $1", &[&i64_of(seq)?])
    }

    pub(crate) fn list_records(&self, query: &RecordQuery) -> Result<Page<PreventionRecord>, StoreError> {
        let page = &query.page;
        let limit = page.checked_limit()?;
        let tenant = query.tenant.as_str();
        let policy = query.policy_id.as_ref().map(PolicyId::as_str);
        let since = query.since.map(Timestamp::unix_millis);
        let until = query.until.map(Timestamp::unix_millis);
        let limit_rows = limit_param(limit);
        if let Some(run) = &query.run_id {
            let prefix = keys::records_of_run(&query.tenant, query.simulated, run);
            let after = cursor_rest(page, &prefix)?.map(|rest| cursor_u64(page, &rest)).transpose()?;
            let after = after.map(i64_of).transpose()?;
            let rows = self.rows(
                "records",
                "SELECT seq, body FROM records
                 WHERE tenant_id = $1 AND is_simulated = $2 AND run_id = $3 AND ($4::bigint IS NULL OR seq > $4)
                   AND ($5::text IS NULL OR policy_id = $5)
                   AND ($6::bigint IS NULL OR prevented_at_ms >= $6) AND ($7::bigint IS NULL OR prevented_at_ms < $7)
                 ORDER BY seq LIMIT $8",
                &[&tenant, &query.simulated, &run.as_str(), &after, &policy, &since, &until, &limit_rows],
            )?;
            return page_of(rows, limit, |row| {
                let record: PreventionRecord = body(row, "prevention record")?;
                let mut key = prefix.clone();
                key.extend_from_slice(&record.seq.to_be_bytes());
                Ok((record, key))
            });
        }
        let prefix = match &query.policy_id {
            Some(policy) => keys::records_of_policy(&query.tenant, query.simulated, policy),
            None => keys::records_of_tenant(&query.tenant, query.simulated),
        };
        let after = match cursor_rest(page, &prefix)? {
            None => None,
            Some(rest) => {
                let (time, seq) = rest.split_at_checked(8).ok_or_else(|| bad_cursor(page))?;
                Some((millis_of_bits(cursor_u64(page, time)?), i64_of(cursor_u64(page, seq)?)?))
            }
        };
        let (after_ms, after_seq) = (after.map(|a| a.0), after.map(|a| a.1));
        let mut params: Params<'_> = vec![&tenant, &query.simulated, &policy, &since, &until];
        params.extend([&after_ms as &(dyn ToSql + Sync), &after_seq, &limit_rows]);
        let rows = self.rows(
            "records",
            "SELECT body FROM records
             WHERE tenant_id = $1 AND is_simulated = $2 AND ($3::text IS NULL OR policy_id = $3)
               AND ($4::bigint IS NULL OR prevented_at_ms >= $4) AND ($5::bigint IS NULL OR prevented_at_ms < $5)
               AND ($6::bigint IS NULL OR (prevented_at_ms, seq) > ($6, $7))
             ORDER BY prevented_at_ms, seq LIMIT $8",
            &params,
        )?;
        page_of(rows, limit, |row| {
            let record: PreventionRecord = body(row, "prevention record")?;
            let key = [prefix.clone(), keys::Key::new().time(record.prevented_at).u64(record.seq).into_vec()].concat();
            Ok((record, key))
        })
    }

    pub(crate) fn export_records(&self, from_seq: u64) -> Items<'_, PreventionRecord> {
        let mut next = from_seq;
        let mut buffer: std::vec::IntoIter<PreventionRecord> = Vec::new().into_iter();
        let mut done = false;
        Box::new(std::iter::from_fn(move || {
            loop {
                if let Some(record) = buffer.next() {
                    return Some(Ok(record));
                }
                if done {
                    return None;
                }
                let page = i64_of(next).and_then(|from| {
                    self.all::<PreventionRecord>(
                        "records",
                        "SELECT body FROM records WHERE seq >= $1 ORDER BY seq LIMIT 1000",
                        &[&from],
                    )
                });
                match page {
                    Err(err) => {
                        done = true;
                        return Some(Err(err));
                    }
                    Ok(records) => {
                        done = records.len() < 1000;
                        next = records.last().map_or(next, |r| r.seq.saturating_add(1));
                        buffer = records.into_iter();
                    }
                }
            }
        }))
    }

    // ---- learning loop ----------------------------------------------------------------------------

    pub(crate) fn get_incident(&self, tenant: &TenantId, id: &IncidentId) -> Result<Option<Incident>, StoreError> {
        self.one(
            "an incident",
            "SELECT body FROM incidents WHERE tenant_id = $1 AND incident_id = $2",
            &[&tenant.as_str(), &id.as_str()],
        )
    }

    pub(crate) fn list_incidents(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Incident>, StoreError> {
        let limit = page.checked_limit()?;
        let after = match cursor_rest(page, &keys::tenant(tenant))? {
            None => None,
            Some(rest) => {
                let (time, id) = rest.split_at_checked(8).ok_or_else(|| bad_cursor(page))?;
                let id = String::from_utf8(id.to_vec()).map_err(|_| bad_cursor(page))?;
                Some((millis_of_bits(cursor_u64(page, time)?), id))
            }
        };
        let (after_ms, after_id) = (after.as_ref().map(|a| a.0), after.as_ref().map(|a| a.1.clone()));
        let rows = self.rows(
            "incidents",
            "SELECT body FROM incidents WHERE tenant_id = $1
               AND ($2::bigint IS NULL OR (created_at_ms, incident_id) > ($2, $3))
             ORDER BY created_at_ms, incident_id LIMIT $4",
            &[&tenant.as_str(), &after_ms, &after_id, &limit_param(limit)],
        )?;
        page_of(rows, limit, |row| {
            let incident: Incident = body(row, "incident")?;
            let key = keys::incident_by_time(tenant, incident.created_at, incident.id.as_str());
            Ok((incident, key))
        })
    }

    pub(crate) fn incidents_since(&self, tenant: &TenantId, since: Timestamp) -> Result<Vec<Incident>, StoreError> {
        self.all(
            "incidents",
            "SELECT body FROM incidents WHERE tenant_id = $1 AND created_at_ms >= $2 ORDER BY created_at_ms, incident_id",
            &[&tenant.as_str(), &since.unix_millis()],
        )
    }

    pub(crate) fn get_pattern(&self, tenant: &TenantId, id: &PatternId) -> Result<Option<Pattern>, StoreError> {
        self.one(
            "a pattern",
            "SELECT body FROM patterns WHERE tenant_id = $1 AND pattern_id = $2",
            &[&tenant.as_str(), &id.as_str()],
        )
    }

    pub(crate) fn find_pattern(
        &self,
        tenant: &TenantId,
        signature: &SignatureHash,
        error_type: &str,
    ) -> Result<Option<Pattern>, StoreError> {
        self.one(
            "a pattern",
            "SELECT body FROM patterns WHERE tenant_id = $1 AND signature_hash = $2 AND error_type = $3",
            &[&tenant.as_str(), &signature.as_str(), &error_type],
        )
    }

    pub(crate) fn list_patterns(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Pattern>, StoreError> {
        let limit = page.checked_limit()?;
        let after = cursor_rest(page, &keys::tenant(tenant))?.map(|rest| cursor_id(page, &rest)).transpose()?;
        let rows = self.rows(
            "patterns",
            "SELECT body FROM patterns WHERE tenant_id = $1 AND ($2::text IS NULL OR pattern_id > $2)
             ORDER BY pattern_id LIMIT $3",
            &[&tenant.as_str(), &after, &limit_param(limit)],
        )?;
        page_of(rows, limit, |row| {
            let pattern: Pattern = body(row, "pattern")?;
            let key = keys::tenant_item(tenant, pattern.id.as_str());
            Ok((pattern, key))
        })
    }

    pub(crate) fn get_regret(&self, record: &RecordId) -> Result<Option<Regret>, StoreError> {
        self.one("a regret", "SELECT body FROM regrets WHERE record_id = $1", &[&record.as_str()])
    }

    pub(crate) fn regrets_for_policy(
        &self,
        tenant: &TenantId,
        policy: &PolicyId,
        since: Option<Timestamp>,
    ) -> Result<Vec<Regret>, StoreError> {
        let since = since.map(Timestamp::unix_millis);
        self.all(
            "regrets",
            "SELECT body FROM regrets WHERE tenant_id = $1 AND policy_id = $2 AND ($3::bigint IS NULL OR at_ms >= $3)
             ORDER BY at_ms, record_id",
            &[&tenant.as_str(), &policy.as_str(), &since],
        )
    }

    pub(crate) fn graduation(&self, tenant: &TenantId) -> Result<Option<GraduationState>, StoreError> {
        self.one("a graduation state", "SELECT body FROM graduation WHERE tenant_id = $1", &[&tenant.as_str()])
    }

    pub(crate) fn graduation_history(
        &self,
        tenant: &TenantId,
        page: &PageRequest,
    ) -> Result<Page<GraduationState>, StoreError> {
        let limit = page.checked_limit()?;
        let after = cursor_rest(page, &keys::tenant(tenant))?.map(|rest| cursor_u64(page, &rest)).transpose()?;
        let after = after.map(i64_of).transpose()?;
        let rows = self.rows(
            "the graduation history",
            "SELECT n, body FROM graduation_history WHERE tenant_id = $1 AND ($2::bigint IS NULL OR n > $2)
             ORDER BY n LIMIT $3",
            &[&tenant.as_str(), &after, &limit_param(limit)],
        )?;
        page_of(rows, limit, |row| {
            let n = u64_of(column(row, "n")?)?;
            Ok((body(row, "graduation state")?, keys::graduation_history(tenant, n)))
        })
    }
}
