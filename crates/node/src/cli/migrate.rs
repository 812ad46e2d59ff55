//! `runguard migrate`: bring a PostgreSQL store's schema to this build's version.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use runguard_contract::{PolicyId, RecordHash, TenantId};
use runguard_store::{
    PG_SCHEMA_VERSION, PgOptions, RecordAppend, RecordAuthority, ShadowStats, Store, StoreError, StoreErrorKind,
    StoreOptions, WriteBatch, WriteOp, all_pages,
};

use super::{FINDING, USAGE, load_config};
use crate::config::{Overrides, StoreKind};

#[derive(Debug, Args)]
pub(super) struct MigrateArgs {
    /// TOML configuration file (for `store = "postgres"` and `postgres_url`).
    #[arg(long, env = "RUNGUARD_CONFIG")]
    config: Option<PathBuf>,
    /// The PostgreSQL store's URL (overrides the file and `RUNGUARD_POSTGRES_URL`).
    #[arg(long)]
    postgres_url: Option<String>,
}

/// Applies the migrations the database lacks (none when it is current, so running it twice changes
/// nothing) and prints the version before and after. A schema newer than this build is refused (exit 1).
pub(super) fn migrate(args: MigrateArgs) -> ExitCode {
    let overrides = Overrides { postgres_url: args.postgres_url, ..Overrides::default() };
    let config = match load_config(args.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let Some(url) = config.postgres_url.as_ref().filter(|_| config.store == StoreKind::Postgres) else {
        complain!(
            "runguard: migrate needs a PostgreSQL store: `--postgres-url URL`, or `--config` with `store = \"postgres\"`"
        );
        return ExitCode::from(USAGE);
    };
    match runguard_store::migrate(url.expose(), &config.pg_options()) {
        Ok(before) if before == PG_SCHEMA_VERSION => {
            say!("schema version {PG_SCHEMA_VERSION}: up to date");
            ExitCode::SUCCESS
        }
        Ok(before) => {
            say!("schema version {PG_SCHEMA_VERSION}: migrated from version {before}");
            ExitCode::SUCCESS
        }
        Err(err) if err.kind() == StoreErrorKind::InvalidArgument => {
            complain!("runguard: {err}");
            ExitCode::from(USAGE)
        }
        Err(err) => {
            complain!("runguard: cannot migrate the store at `{url}`: {err}");
            ExitCode::from(FINDING)
        }
    }
}

#[derive(Debug, Args)]
pub(super) struct MigrateStoreArgs {
    /// The store to copy: `sled:DIR` (stop its node first).
    #[arg(long)]
    from: String,
    /// The empty store to fill: `postgres:URL`.
    #[arg(long)]
    to: String,
}

/// Copies a sled store into an empty PostgreSQL database through the store API, then verifies the copy:
/// exit 0 only when the target verifies and ends on the source's chain head; 1 when the copy or the
/// check fails (or the target is not empty), 2 a usage error.
pub(super) fn migrate_store(args: &MigrateStoreArgs) -> ExitCode {
    let (Some(dir), Some(url)) = (args.from.strip_prefix("sled:"), args.to.strip_prefix("postgres:")) else {
        complain!("runguard: migrate-store copies `--from sled:DIR` `--to postgres:URL`");
        return ExitCode::from(USAGE);
    };
    let shown = runguard_store::redact_postgres_url(url);
    if !std::path::Path::new(dir).is_dir() {
        complain!("runguard: data directory `{dir}` does not exist");
        return ExitCode::from(USAGE);
    }
    let source = match Store::open(dir, &StoreOptions::default()) {
        Ok(store) => store,
        Err(err) => {
            complain!("runguard: cannot open the store in `{dir}`: {err}");
            return ExitCode::from(FINDING);
        }
    };
    let target = match Store::open_postgres(url, &PgOptions::default()) {
        Ok(store) => store,
        Err(err) => {
            complain!("runguard: cannot open the postgres store at `{shown}`: {err}");
            return ExitCode::from(if err.kind() == StoreErrorKind::InvalidArgument { USAGE } else { FINDING });
        }
    };
    let copied = copy_store(&source, &target).and_then(|counts| {
        let report = target.verify()?;
        Ok((counts, report))
    });
    match copied {
        Ok((counts, report)) => {
            say!(
                "copied {} policy versions, {} runs, {} ledger entries, {} records, {} learning-loop items",
                counts.policy_versions,
                counts.runs,
                counts.ledger_entries,
                counts.records,
                counts.learning
            );
            let heads = (source.chain_head(), target.chain_head());
            match heads {
                (Ok(from), Ok(to)) if from == to && report.is_ok() => {
                    say!(
                        "verified: {} records checked, the chain ends on the source's head; ok",
                        report.records_checked
                    );
                    ExitCode::SUCCESS
                }
                (from, to) => {
                    complain!(
                        "runguard: the copy does not check out: {report:?}; source head {from:?}, target head {to:?}"
                    );
                    ExitCode::from(FINDING)
                }
            }
        }
        Err(err) => {
            complain!("runguard: migrate-store stopped: {err}");
            ExitCode::from(FINDING)
        }
    }
}

/// What was copied.
#[derive(Debug, Default)]
struct Counts {
    policy_versions: usize,
    runs: usize,
    ledger_entries: usize,
    records: usize,
    learning: usize,
}

/// Records committed per batch.
const RECORDS_PER_BATCH: usize = 256;

fn commit(target: &Store, batch: WriteBatch) -> Result<(), StoreError> {
    target.commit(batch).map(drop)
}

/// Replays the source into the target in dependency order: policies (every version and audit entry),
/// runs with their snapshots and ledgers, the records in chain order (so each gets its source seq and
/// hash), then shadow statistics, the current period's tenant-period totals, patterns, incidents, regrets
/// and graduation.
fn copy_store(source: &Store, target: &Store) -> Result<Counts, StoreError> {
    let empty = target.chain_head()? == (0, RecordHash::genesis())
        && target.all_runs().next().is_none()
        && target.policy_owners()?.is_empty();
    if !empty {
        return Err(StoreError::new(StoreErrorKind::Conflict, "the target database is not empty"));
    }
    let mut counts = Counts::default();
    let mut tenants: BTreeSet<TenantId> = source.policy_owners()?.into_iter().collect();
    for run in source.all_runs() {
        tenants.insert(run?.tenant_id);
    }
    // Policies: global ones are seen through any tenant.
    let anyone = match tenants.iter().next() {
        Some(tenant) => tenant.clone(),
        None => TenantId::new("default").map_err(|err| StoreError::new(StoreErrorKind::Contract, err.to_string()))?,
    };
    let mut policies: Vec<(Option<TenantId>, PolicyId)> = all_pages(|page| source.list_policies(&anyone, None, page))?
        .into_iter()
        .filter(|p| p.tenant_id.is_none())
        .map(|p| (None, p.id))
        .collect();
    for tenant in &tenants {
        for policy in all_pages(|page| source.list_policies(tenant, None, page))? {
            if policy.tenant_id.as_ref() == Some(tenant) {
                policies.push((Some(tenant.clone()), policy.id));
            }
        }
    }
    for (owner, id) in &policies {
        let mut batch = WriteBatch::new();
        for version in source.policy_versions(owner.as_ref(), id)? {
            batch.push(WriteOp::PutPolicyVersion(Box::new(version)));
            counts.policy_versions += 1;
        }
        for entry in all_pages(|page| source.policy_audit(owner.as_ref(), id, page))? {
            batch.push(WriteOp::AppendAudit { tenant: owner.clone(), entry });
        }
        commit(target, batch)?;
    }
    // Runs, each with its snapshot and ledger.
    for run in source.all_runs() {
        let run = run?;
        let mut batch = WriteBatch::new();
        batch.push(WriteOp::PutSnapshot(Box::new(source.load_snapshot(&run.snapshot.hash).map_err(integrity)?)));
        let ledger = source.full_ledger(&run.tenant_id, &run.run_id)?;
        counts.ledger_entries += ledger.len();
        let (tenant_id, run_id) = (run.tenant_id.clone(), run.run_id.clone());
        let rollup = source.run_rollup(&tenant_id, &run_id)?;
        batch.push(WriteOp::PutRun(Box::new(run)));
        if rollup != runguard_store::RunRollup::default() {
            batch.roll_up(tenant_id.clone(), vec![run_id.clone()], rollup);
        }
        for entry in ledger {
            batch.push(WriteOp::AppendLedger {
                tenant_id: tenant_id.clone(),
                run_id: run_id.clone(),
                entry: Box::new(entry),
            });
        }
        commit(target, batch)?;
        counts.runs += 1;
    }
    // Records in chain order, with the authority each was written under.
    let mut batch = WriteBatch::new();
    let mut regrets = Vec::new();
    for record in source.export_records(1) {
        let record = record?;
        if let Some(regret) = source.get_regret(&record.id)? {
            regrets.push((record.tenant_id.clone(), regret));
        }
        if record.is_simulated {
            if let Ok(snapshot) = source.load_snapshot(&record.snapshot_hash) {
                batch.push(WriteOp::PutSnapshot(Box::new(snapshot)));
            }
            batch.append_simulated_record(record);
        } else {
            let decision = source.record_decision(&record)?.ok_or_else(|| {
                StoreError::new(
                    StoreErrorKind::Corrupt,
                    format!("record `{}` has no decision in its run's ledger", record.id),
                )
            })?;
            let snapshot = source.load_snapshot(&record.snapshot_hash).map_err(integrity)?;
            let policy = snapshot.policies.into_iter().find(|p| p.id == record.policy_id).ok_or_else(|| {
                StoreError::new(
                    StoreErrorKind::Corrupt,
                    format!("record `{}` names a policy its snapshot lacks", record.id),
                )
            })?;
            let run_tenant = record.tenant_id.clone();
            // A block decided by an ancestor's policy names the ancestor's snapshot.
            let authority = match decision.deciding_violation().and_then(|v| v.run_id.clone()) {
                Some(ancestor) => RecordAuthority::Ancestor {
                    decision: Box::new(decision),
                    policy: Box::new(policy),
                    run_tenant,
                    ancestor,
                },
                None => RecordAuthority::Live { decision: Box::new(decision), policy: Box::new(policy), run_tenant },
            };
            batch.push(WriteOp::AppendRecord(Box::new(RecordAppend { record, authority })));
        }
        counts.records += 1;
        if counts.records % RECORDS_PER_BATCH == 0 {
            commit(target, std::mem::take(&mut batch))?;
        }
    }
    commit(target, batch)?;
    // The learning loop, tenant by tenant.
    for tenant in &tenants {
        let mut batch = WriteBatch::new();
        for (owner, id) in &policies {
            if owner.as_ref().is_some_and(|owner| owner != tenant) {
                continue;
            }
            // A tenant-period budget's current period goes along, so that moving stores resets no total.
            if let Some(policy) = source.get_policy(owner.as_ref(), id, None)?
                && let Some(usage) = crate::tenant_state::usage(source, tenant, &policy, crate::shared::now())?
                && usage.used > 0
            {
                batch.add_tenant_usage(tenant.clone(), id.clone(), usage.period_start, usage.used, None);
            }
            let delta = source.shadow_stats(owner.as_ref(), id, tenant)?;
            if delta != ShadowStats::default() {
                batch.push(WriteOp::AddShadowStats {
                    tenant: owner.clone(),
                    run_tenant: tenant.clone(),
                    policy_id: id.clone(),
                    delta,
                });
            }
        }
        for pattern in all_pages(|page| source.list_patterns(tenant, page))? {
            batch.push(WriteOp::PutPattern(Box::new(pattern)));
            counts.learning += 1;
        }
        for incident in all_pages(|page| source.list_incidents(tenant, page))? {
            batch.push(WriteOp::PutIncident(Box::new(incident)));
            counts.learning += 1;
        }
        for state in all_pages(|page| source.graduation_history(tenant, page))? {
            batch.push(WriteOp::SetGraduation { tenant_id: tenant.clone(), state });
            counts.learning += 1;
        }
        commit(target, batch)?;
    }
    let mut batch = WriteBatch::new();
    for (tenant_id, regret) in regrets {
        batch.push(WriteOp::PutRegret { tenant_id, regret });
        counts.learning += 1;
    }
    commit(target, batch)?;
    Ok(counts)
}

fn integrity(err: runguard_store::IntegrityError) -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, format!("the source store: {err}"))
}
