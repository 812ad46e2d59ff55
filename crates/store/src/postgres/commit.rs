//! Group commit on PostgreSQL: one transaction per group, a savepoint per caller.
//!
//! The transaction first locks the chain head row (`FOR UPDATE`), which serialises every writer of the
//! database, this node's and any other's, so the record chain stays gap-free and each caller's batch is
//! checked against everything committed before it. Each caller's batch is then checked by the shared
//! [`Prepare`] (reading through the transaction, so it sees the earlier callers' writes) and written
//! inside its own savepoint: a refusal, or a constraint another writer's row violates, rolls back that
//! savepoint only. The head row is updated once and the transaction committed; with
//! `synchronous_commit = on` the commit returns once it is durable, so the callers are acknowledged then.

use std::cell::RefCell;

use postgres::types::ToSql;
use postgres::{IsolationLevel, Transaction};
use runguard_contract::{
    IncidentId, PatternId, PolicyId, PreventionRecord, RecordHash, RecordId, RunId, SignatureHash, SnapshotHash,
    TenantId,
};

use super::{PgStore, Statements, WriterState, enum_str, from_json, i64_of, i64_saturating, pg_error, to_json, u64_of};
use crate::batch::{CommitReceipt, WriteBatch};
use crate::error::{StoreError, StoreErrorKind};
use crate::keys::{self, owner as owner_str};
use crate::model::{RunRollup, ShadowStats};
use crate::prepare::{ChainHead, Prepare, ReadView, RunHead, Staged};
use crate::run_cache::{CachedRun, RunCache};

use crate::group::{self, Outcome};

impl PgStore {
    pub(crate) fn commit(&self, batch: WriteBatch) -> Result<CommitReceipt, StoreError> {
        group::single(batch, |batches| self.commit_group(batches))
    }

    pub(crate) fn commit_group(&self, batches: Vec<WriteBatch>) -> Vec<Result<CommitReceipt, StoreError>> {
        super::off_runtime(|| {
            self.signals.group(
                &batches,
                || self.writer(),
                |writer, outcomes| self.attempt(writer, &batches, outcomes),
                // The connection may be gone or mid-transaction: start afresh next time.
                |writer| writer.reset(),
            )
        })
    }

    fn attempt(
        &self,
        writer: &mut WriterState,
        batches: &[WriteBatch],
        outcomes: &mut [Option<Outcome>],
    ) -> Result<(), StoreError> {
        let fail = self.signals.commit_failure_injected();
        let fail_durability = self.signals.durability_failure_injected();
        let (client, statements, bindings) = self.connect_writer(writer)?;
        // Read committed, whatever the server's default: once the chain head row is locked, each statement
        // sees every commit made before the lock was granted (a snapshot taken earlier would not).
        let mut tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
            .map_err(|err| pg_error("cannot start the commit", err))?;
        let row = tx
            .query_one("SELECT head_seq, head_hash, commits FROM runguard_chain FOR UPDATE", &[])
            .map_err(|err| pg_error("cannot lock the chain head", err))?;
        let head_seq: i64 = row.try_get(0).map_err(|err| pg_error("cannot read the chain head", err))?;
        let head_hash: String = row.try_get(1).map_err(|err| pg_error("cannot read the chain head", err))?;
        let commits: i64 = row.try_get(2).map_err(|err| pg_error("cannot read the chain head", err))?;
        let hash = RecordHash::new(head_hash).map_err(|_| StoreError::corrupt("the chain head holds an invalid hash"));
        let mut head = hash.map(|hash| ChainHead { seq: u64_of(head_seq).unwrap_or(0), hash });
        let mut committed = 0usize;
        let mut policies_written = false;
        let mut learned = Vec::new();
        for (i, batch) in batches.iter().enumerate() {
            let mut savepoint = tx.savepoint("caller").map_err(|err| pg_error("cannot open a savepoint", err))?;
            let staged = {
                let view =
                    PgView { tx: RefCell::new(&mut savepoint), statements: RefCell::new(&mut *statements), bindings };
                Prepare::new(&view, head.clone()).run(&[batch])
            };
            let prepared = match staged {
                Ok(prepared) => prepared,
                // A read that fails is the store's failure, not the caller's: everyone gets it.
                Err((_, err)) if err.kind() == StoreErrorKind::Io => return Err(err),
                Err((_, err)) => {
                    savepoint.rollback().map_err(|err| pg_error("cannot roll back a savepoint", err))?;
                    outcomes[i] = Some(Err(err));
                    continue;
                }
            };
            let mut written = Ok(());
            for (_, staged) in &prepared.writes {
                written = apply(&mut savepoint, statements, staged);
                if written.is_err() {
                    break;
                }
                if fail {
                    return Err(StoreError::new(StoreErrorKind::Injected, "commit failure injected by a test"));
                }
            }
            match written {
                Err(err) if err.kind() == StoreErrorKind::Io => return Err(err),
                Err(err) => {
                    savepoint.rollback().map_err(|err| pg_error("cannot roll back a savepoint", err))?;
                    outcomes[i] = Some(Err(err));
                }
                Ok(()) => {
                    savepoint.commit().map_err(|err| pg_error("cannot release a savepoint", err))?;
                    policies_written |= prepared.writes.iter().any(|(_, w)| matches!(w, Staged::PolicyVersion(_)));
                    if let Some(new_head) = prepared.head {
                        head = Ok(new_head);
                    }
                    outcomes[i] = Some(Ok(prepared.receipts.into_iter().next().unwrap_or_default()));
                    learned.extend(prepared.runs.into_iter().filter_map(|(key, run)| Some((key, run.snapshot?))));
                    committed += 1;
                }
            }
        }
        if fail {
            return Err(StoreError::new(StoreErrorKind::Injected, "commit failure injected by a test"));
        }
        if committed == 0 {
            tx.rollback().map_err(|err| pg_error("cannot end the commit", err))?;
            return Ok(());
        }
        let commits = commits.saturating_add(1);
        if policies_written {
            // In the commit's transaction: a node that reads the new generation also reads the policies.
            tx.execute("UPDATE runguard_chain SET policy_generation = policy_generation + 1", &[])
                .map_err(|err| pg_error("cannot advance the policy generation", err))?;
        }
        if let Ok(head) = &head {
            let seq = i64_of(head.seq)?;
            tx.execute(
                "UPDATE runguard_chain SET head_seq = $1, head_hash = $2, commits = $3",
                &[&seq, &head.hash.as_str(), &commits],
            )
        } else {
            tx.execute("UPDATE runguard_chain SET commits = $1", &[&commits])
        }
        .map_err(|err| pg_error("cannot advance the chain head", err))?;
        if fail_durability {
            return Err(StoreError::new(StoreErrorKind::Injected, "flush failure injected by a test"));
        }
        tx.commit().map_err(|err| pg_error("the commit failed", err))?;
        writer.commits = u64_of(commits)?;
        for (key, hash) in learned {
            writer.bindings.learn(key, CachedRun { snapshot: Some(hash), ..CachedRun::default() });
        }
        Ok(())
    }
}

/// Writes one checked write inside the caller's savepoint.
fn apply(tx: &mut Transaction<'_>, statements: &mut Statements, staged: &Staged) -> Result<(), StoreError> {
    let mut exec = |tx: &mut Transaction<'_>, what: &str, sql: &'static str, params: &[&(dyn ToSql + Sync)]| {
        let statement = statements.get(tx, sql).map_err(|err| pg_error(format!("cannot write {what}"), err))?;
        tx.execute(&statement, params).map(|_| ()).map_err(|err| pg_error(format!("cannot write {what}"), err))
    };
    match staged {
        Staged::PolicyVersion(policy) => {
            let owner = owner_str(policy.tenant_id.as_ref());
            let version = i32::try_from(policy.version).map_err(|_| StoreError::contract("a policy version is too large"))?;
            let body = to_json("policy", policy)?;
            exec(
                tx,
                "a policy version",
                "INSERT INTO policies (owner, policy_id, version, mode, body) VALUES ($1, $2, $3, $4, $5)",
                &[&owner, &policy.id.as_str(), &version, &enum_str(&policy.mode), &body],
            )?;
            exec(
                tx,
                "a policy head",
                "INSERT INTO policy_heads (owner, policy_id, version) VALUES ($1, $2, $3)
                 ON CONFLICT (owner, policy_id) DO UPDATE SET version = EXCLUDED.version",
                &[&owner, &policy.id.as_str(), &version],
            )
        }
        Staged::Audit { owner, n, entry } => exec(
            tx,
            "an audit entry",
            "INSERT INTO policy_audit (owner, policy_id, n, at_ms, body) VALUES ($1, $2, $3, $4, $5)",
            &[
                &owner_str(owner.as_ref()),
                &entry.policy_id.as_str(),
                &i64_of(*n)?,
                &entry.at.unix_millis(),
                &to_json("audit entry", entry)?,
            ],
        ),
        Staged::Snapshot { hash, canonical } => {
            let text = std::str::from_utf8(canonical)
                .map_err(|_| StoreError::contract("a snapshot's canonical form is not UTF-8"))?;
            let id = runguard_contract::SnapshotId::for_hash(hash);
            exec(
                tx,
                "a snapshot",
                "INSERT INTO snapshots (hash, snapshot_id, canonical) VALUES ($1, $2, $3)
                 ON CONFLICT (hash) DO NOTHING",
                &[&hash.as_str(), &id.as_str(), &text],
            )
        }
        // The binding is the run row's snapshot columns.
        Staged::Binding { .. } => Ok(()),
        // An advanced run's totals and next call are its new ledger entry's: its row stays as it was, and
        // reads catch it up from the ledger (`reads.rs`, `caught_up`).
        Staged::Run { advanced: true, .. } => Ok(()),
        Staged::Run { run, .. } => exec(
            tx,
            "a run",
            "INSERT INTO runs (tenant_id, run_id, snapshot_hash, snapshot_id, status, created_at_ms, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (tenant_id, run_id) DO UPDATE SET status = EXCLUDED.status, body = EXCLUDED.body",
            &[
                &run.tenant_id.as_str(),
                &run.run_id.as_str(),
                &run.snapshot.hash.as_str(),
                &run.snapshot.id.as_str(),
                &enum_str(&run.status),
                &run.created_at.unix_millis(),
                &to_json("run", run)?,
            ],
        ),
        Staged::Ledger { tenant, run, entry } => exec(
            tx,
            "a ledger entry",
            "INSERT INTO ledger (tenant_id, run_id, position, decision_id, body) VALUES ($1, $2, $3, $4, $5)",
            &[
                &tenant.as_str(),
                &run.as_str(),
                &i64_of(entry.position)?,
                &entry.decision.decision_id.as_str(),
                &to_json("ledger entry", entry)?,
            ],
        ),
        Staged::Record(record) => exec(
            tx,
            "a prevention record",
            "INSERT INTO records (seq, record_id, tenant_id, run_id, policy_id, is_simulated, prevented_at_ms, hash, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &i64_of(record.seq)?,
                &record.id.as_str(),
                &record.tenant_id.as_str(),
                &record.run_id.as_str(),
                &record.policy_id.as_str(),
                &record.is_simulated,
                &record.prevented_at.unix_millis(),
                &record.hash.as_str(),
                &to_json("prevention record", record)?,
            ],
        ),
        Staged::Shadow { owner, run_tenant, policy, total } => exec(
            tx,
            "shadow statistics",
            "INSERT INTO shadow_stats (owner, policy_id, run_tenant, evaluations, would_block, would_warn, would_throttle)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (owner, policy_id, run_tenant) DO UPDATE SET evaluations = EXCLUDED.evaluations,
                 would_block = EXCLUDED.would_block, would_warn = EXCLUDED.would_warn,
                 would_throttle = EXCLUDED.would_throttle",
            &[
                &owner_str(owner.as_ref()),
                &policy.as_str(),
                &run_tenant.as_str(),
                &i64_saturating(total.evaluations),
                &i64_saturating(total.would_block),
                &i64_saturating(total.would_warn),
                &i64_saturating(total.would_throttle),
            ],
        ),
        Staged::TenantUsage { tenant, policy, period_start, used } => exec(
            tx,
            "a tenant usage total",
            "INSERT INTO tenant_usage (tenant_id, policy_id, period_start_ms, used) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant_id, policy_id, period_start_ms) DO UPDATE SET used = EXCLUDED.used",
            &[&tenant.as_str(), &policy.as_str(), &period_start.unix_millis(), &i64_of(*used)?],
        ),
        Staged::TenantRate(rate) => {
            let e = rate.event;
            exec(
                tx,
                "a tenant rate event",
                "INSERT INTO tenant_rate_events (tenant_id, at_ms, steps, tokens, cost_micros) VALUES ($1, $2, $3, $4, $5)",
                &[
                    &rate.tenant.as_str(),
                    &e.at.unix_millis(),
                    &i64_saturating(e.steps),
                    &i64_saturating(e.tokens),
                    &i64_saturating(e.cost_micros),
                ],
            )?;
            // Events every window has left: dropped by the writer that passes them, so a table holds
            // about one longest window of each tenant's calls.
            exec(
                tx,
                "tenant rate events",
                "DELETE FROM tenant_rate_events WHERE tenant_id = $1 AND at_ms <= $2",
                &[&rate.tenant.as_str(), &rate.horizon.unix_millis()],
            )
        }
        Staged::Incident(incident) => exec(
            tx,
            "an incident",
            "INSERT INTO incidents (tenant_id, incident_id, created_at_ms, body) VALUES ($1, $2, $3, $4)",
            &[
                &incident.tenant_id.as_str(),
                &incident.id.as_str(),
                &incident.created_at.unix_millis(),
                &to_json("incident", incident)?,
            ],
        ),
        Staged::Pattern(pattern) => exec(
            tx,
            "a pattern",
            "INSERT INTO patterns (tenant_id, pattern_id, signature_hash, error_type, body) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant_id, pattern_id) DO UPDATE SET body = EXCLUDED.body",
            &[
                &pattern.tenant_id.as_str(),
                &pattern.id.as_str(),
                &pattern.signature_hash.as_str(),
                &pattern.error_type,
                &to_json("pattern", pattern)?,
            ],
        ),
        Staged::Regret { tenant, regret } => exec(
            tx,
            "a regret",
            "INSERT INTO regrets (record_id, tenant_id, policy_id, at_ms, body) VALUES ($1, $2, $3, $4, $5)",
            &[
                &regret.record_id.as_str(),
                &tenant.as_str(),
                &regret.policy_id.as_str(),
                &regret.at.unix_millis(),
                &to_json("regret", regret)?,
            ],
        ),
        Staged::Rollup { tenant, run, total } => exec(
            tx,
            "rolled-up totals",
            "INSERT INTO run_rollups (tenant_id, run_id, tokens, cost_micros, steps, duration_ms, children)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (tenant_id, run_id) DO UPDATE SET tokens = EXCLUDED.tokens,
                 cost_micros = EXCLUDED.cost_micros, steps = EXCLUDED.steps,
                 duration_ms = EXCLUDED.duration_ms, children = EXCLUDED.children",
            &[
                &tenant.as_str(),
                &run.as_str(),
                &i64_saturating(total.descendants.tokens),
                &i64_saturating(total.descendants.cost_micros),
                &i64_saturating(total.descendants.steps),
                &i64_saturating(total.descendants.duration_ms),
                &i64_saturating(total.children),
            ],
        ),
        Staged::Graduation { tenant, n, state } => {
            let body = to_json("graduation state", state)?;
            exec(
                tx,
                "a graduation state",
                "INSERT INTO graduation (tenant_id, body) VALUES ($1, $2)
                 ON CONFLICT (tenant_id) DO UPDATE SET body = EXCLUDED.body",
                &[&tenant.as_str(), &body],
            )?;
            exec(
                tx,
                "the graduation history",
                "INSERT INTO graduation_history (tenant_id, n, body) VALUES ($1, $2, $3)",
                &[&tenant.as_str(), &i64_of(*n)?, &body],
            )
        }
    }
}

/// What the write rules read, inside the commit's transaction.
struct PgView<'t, 'c> {
    tx: RefCell<&'t mut Transaction<'c>>,
    statements: RefCell<&'t mut Statements>,
    bindings: &'t RunCache,
}

impl PgView<'_, '_> {
    fn opt(
        &self,
        what: &str,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<postgres::Row>, StoreError> {
        let mut tx = self.tx.borrow_mut();
        let read = |err| pg_error(format!("cannot read {what}"), err);
        let statement = self.statements.borrow_mut().get(&mut tx, sql).map_err(read)?;
        tx.query_opt(&statement, params).map_err(read)
    }

    fn exists(&self, what: &str, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<bool, StoreError> {
        Ok(self.opt(what, sql, params)?.is_some())
    }

    /// One `bigint` (or `NULL`) the query answers, as the next number: `NULL` → 0, `n` → n + 1.
    fn next(&self, what: &str, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let Some(row) = self.opt(what, sql, params)? else { return Ok(0) };
        let last: Option<i64> = row.try_get(0).map_err(|err| pg_error(format!("cannot read {what}"), err))?;
        Ok(match last {
            None => 0,
            Some(last) => u64_of(last)?.saturating_add(1),
        })
    }
}

fn get<'a, T: postgres::types::FromSql<'a>>(row: &'a postgres::Row, i: usize, what: &str) -> Result<T, StoreError> {
    row.try_get(i).map_err(|err| pg_error(format!("cannot read {what}"), err))
}

impl ReadView for PgView<'_, '_> {
    fn policy_head(&self, owner: Option<&TenantId>, id: &PolicyId) -> Result<Option<u32>, StoreError> {
        let row = self.opt(
            "a policy head",
            "SELECT version FROM policy_heads WHERE owner = $1 AND policy_id = $2",
            &[&owner_str(owner), &id.as_str()],
        )?;
        row.map(|row| get::<i32>(&row, 0, "a policy head").map(|v| u32::try_from(v).unwrap_or(0))).transpose()
    }

    fn tenant_policy_id_exists(&self, id: &PolicyId) -> Result<bool, StoreError> {
        self.exists(
            "policy heads",
            "SELECT 1 FROM policy_heads WHERE policy_id = $1 AND owner <> '' LIMIT 1",
            &[&id.as_str()],
        )
    }

    fn next_audit(&self, owner: Option<&TenantId>, id: &PolicyId) -> Result<u64, StoreError> {
        self.next(
            "the audit",
            "SELECT max(n) FROM policy_audit WHERE owner = $1 AND policy_id = $2",
            &[&owner_str(owner), &id.as_str()],
        )
    }

    fn snapshot_exists(&self, hash: &SnapshotHash) -> Result<bool, StoreError> {
        self.exists("snapshots", "SELECT 1 FROM snapshots WHERE hash = $1", &[&hash.as_str()])
    }

    fn run_binding(&self, tenant: &TenantId, run: &RunId) -> Result<Option<SnapshotHash>, StoreError> {
        if let Some(hash) = self.bindings.get(&keys::run(tenant, run)).and_then(|c| c.snapshot.clone()) {
            return Ok(Some(hash));
        }
        let row = self.opt(
            "a run",
            "SELECT snapshot_hash FROM runs WHERE tenant_id = $1 AND run_id = $2",
            &[&tenant.as_str(), &run.as_str()],
        )?;
        row.map(|row| {
            SnapshotHash::new(get::<String>(&row, 0, "a run")?)
                .map_err(|_| StoreError::corrupt(format!("run `{run}` names an invalid snapshot hash")))
        })
        .transpose()
    }

    fn run_listed_live(&self, _: &TenantId, _: &RunId) -> Option<bool> {
        // There is no listing to keep: the run's `status` column is the listing.
        None
    }

    /// Read committed, after the chain head lock: every commit of every node made before this one. A run's
    /// totals are those its newest ledger entry leaves (an advanced run's row keeps older ones).
    fn run_totals(&self, tenant: &TenantId, run: &RunId) -> Result<Option<runguard_contract::Totals>, StoreError> {
        let row = self.opt(
            "a run's totals",
            "SELECT COALESCE((SELECT l.body->'totals_after' FROM ledger l
                               WHERE l.tenant_id = r.tenant_id AND l.run_id = r.run_id
                               ORDER BY l.position DESC LIMIT 1), r.body->'totals')
             FROM runs r WHERE r.tenant_id = $1 AND r.run_id = $2",
            &[&tenant.as_str(), &run.as_str()],
        )?;
        row.map(|row| super::from_json("run totals", get(&row, 0, "a run's totals")?)).transpose()
    }

    fn run_head(&self, tenant: &TenantId, run: &RunId) -> Result<Option<RunHead>, StoreError> {
        let row = self.opt(
            "a run",
            "SELECT r.status, (SELECT max(l.position) FROM ledger l WHERE l.tenant_id = r.tenant_id AND l.run_id = r.run_id)
             FROM runs r WHERE r.tenant_id = $1 AND r.run_id = $2",
            &[&tenant.as_str(), &run.as_str()],
        )?;
        let Some(row) = row else { return Ok(None) };
        let status: String = get(&row, 0, "a run")?;
        let last: Option<i64> = get(&row, 1, "a run")?;
        let ledger_len = match last {
            None => 0,
            Some(last) => u64_of(last)?.saturating_add(1),
        };
        Ok(Some(RunHead { ledger_len, running: status == runguard_contract::RunStatus::Running.as_str() }))
    }

    fn next_ledger_position(&self, tenant: &TenantId, run: &RunId) -> Result<u64, StoreError> {
        self.next(
            "the ledger",
            "SELECT max(position) FROM ledger WHERE tenant_id = $1 AND run_id = $2",
            &[&tenant.as_str(), &run.as_str()],
        )
    }

    fn record_id_exists(&self, id: &RecordId) -> Result<bool, StoreError> {
        self.exists("records", "SELECT 1 FROM records WHERE record_id = $1", &[&id.as_str()])
    }

    fn record(&self, tenant: &TenantId, id: &RecordId) -> Result<Option<PreventionRecord>, StoreError> {
        let row = self.opt(
            "a record",
            "SELECT body FROM records WHERE record_id = $1 AND tenant_id = $2",
            &[&id.as_str(), &tenant.as_str()],
        )?;
        row.map(|row| from_json("prevention record", get(&row, 0, "a record")?)).transpose()
    }

    fn shadow_stats(
        &self,
        owner: Option<&TenantId>,
        policy: &PolicyId,
        run_tenant: &TenantId,
    ) -> Result<ShadowStats, StoreError> {
        super::reads::shadow_row(
            self.opt(
                "shadow statistics",
                super::reads::SHADOW_SQL,
                &[&owner_str(owner), &policy.as_str(), &run_tenant.as_str()],
            )?
            .as_ref(),
        )
    }

    fn tenant_usage(
        &self,
        tenant: &TenantId,
        policy: &PolicyId,
        period_start: runguard_contract::Timestamp,
    ) -> Result<u64, StoreError> {
        let row = self.opt(
            "a tenant usage total",
            super::reads::TENANT_USAGE_SQL,
            &[&tenant.as_str(), &policy.as_str(), &period_start.unix_millis()],
        )?;
        row.map_or(Ok(0), |row| u64_of(get::<i64>(&row, 0, "a tenant usage total")?))
    }

    fn tenant_rate_used(
        &self,
        tenant: &TenantId,
        since: runguard_contract::Timestamp,
        metric: runguard_contract::RateMetric,
    ) -> Result<u64, StoreError> {
        let sql = match metric {
            runguard_contract::RateMetric::Steps => {
                "SELECT coalesce(sum(steps), 0)::bigint FROM tenant_rate_events WHERE tenant_id = $1 AND at_ms > $2"
            }
            runguard_contract::RateMetric::Tokens => {
                "SELECT coalesce(sum(tokens), 0)::bigint FROM tenant_rate_events WHERE tenant_id = $1 AND at_ms > $2"
            }
            runguard_contract::RateMetric::CostMicros => {
                "SELECT coalesce(sum(cost_micros), 0)::bigint FROM tenant_rate_events WHERE tenant_id = $1 AND at_ms > $2"
            }
        };
        let row = self.opt("tenant rate events", sql, &[&tenant.as_str(), &since.unix_millis()])?;
        row.map_or(Ok(0), |row| u64_of(get::<i64>(&row, 0, "tenant rate events")?))
    }

    fn incident_exists(&self, tenant: &TenantId, id: &IncidentId) -> Result<bool, StoreError> {
        self.exists(
            "incidents",
            "SELECT 1 FROM incidents WHERE tenant_id = $1 AND incident_id = $2",
            &[&tenant.as_str(), &id.as_str()],
        )
    }

    fn pattern_identity(
        &self,
        tenant: &TenantId,
        id: &PatternId,
    ) -> Result<Option<(SignatureHash, String)>, StoreError> {
        let row = self.opt(
            "a pattern",
            "SELECT signature_hash, error_type FROM patterns WHERE tenant_id = $1 AND pattern_id = $2",
            &[&tenant.as_str(), &id.as_str()],
        )?;
        row.map(|row| {
            let hash = SignatureHash::new(get::<String>(&row, 0, "a pattern")?)
                .map_err(|_| StoreError::corrupt(format!("pattern `{id}` holds an invalid signature hash")))?;
            Ok((hash, get::<String>(&row, 1, "a pattern")?))
        })
        .transpose()
    }

    fn pattern_for_signature(
        &self,
        tenant: &TenantId,
        signature: &SignatureHash,
        error_type: &str,
    ) -> Result<Option<PatternId>, StoreError> {
        let row = self.opt(
            "a pattern",
            "SELECT pattern_id FROM patterns WHERE tenant_id = $1 AND signature_hash = $2 AND error_type = $3",
            &[&tenant.as_str(), &signature.as_str(), &error_type],
        )?;
        row.map(|row| {
            PatternId::new(get::<String>(&row, 0, "a pattern")?)
                .map_err(|_| StoreError::corrupt("the pattern table holds an invalid id"))
        })
        .transpose()
    }

    fn regret_exists(&self, record: &RecordId) -> Result<bool, StoreError> {
        self.exists("regrets", "SELECT 1 FROM regrets WHERE record_id = $1", &[&record.as_str()])
    }

    fn next_graduation(&self, tenant: &TenantId) -> Result<u64, StoreError> {
        self.next(
            "the graduation history",
            "SELECT max(n) FROM graduation_history WHERE tenant_id = $1",
            &[&tenant.as_str()],
        )
    }

    fn run_rollup(&self, tenant: &TenantId, run: &RunId) -> Result<RunRollup, StoreError> {
        let row = self.opt("rolled-up totals", super::reads::ROLLUP_SQL, &[&tenant.as_str(), &run.as_str()])?;
        super::reads::rollup_row(row.as_ref())
    }
}
