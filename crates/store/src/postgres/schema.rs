//! The versioned schema: migrations embedded in the binary, applied in order under an advisory lock.

use postgres::GenericClient;
use runguard_contract::RecordHash;

use super::pg_error;
use crate::error::{StoreError, StoreErrorKind};

/// The newest PostgreSQL schema version this build knows.
pub const PG_SCHEMA_VERSION: u32 = 4;

/// Every migration, in order: version `n` is the `n`-th.
const MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("migrations/0001_init.sql")),
    (2, include_str!("migrations/0002_cluster.sql")),
    (3, include_str!("migrations/0003_run_tree.sql")),
    (4, include_str!("migrations/0004_tenant_usage.sql")),
];

/// The advisory lock every migration runs under, so that nodes starting together migrate once.
const MIGRATION_LOCK: i64 = 0x7275_6e67_7561_7264; // "runguard"

const BOOKKEEPING: &str = "CREATE TABLE IF NOT EXISTS runguard_schema (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// Brings the schema of the database behind `client` to [`PG_SCHEMA_VERSION`]: applies each missing
/// migration in one transaction, refuses a schema newer than this build, and answers the version the
/// database had before.
pub(crate) fn migrate_client(client: &mut postgres::Client) -> Result<u32, StoreError> {
    let mut tx = client.transaction().map_err(|err| pg_error("cannot start the migration", err))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(|err| pg_error("cannot take the migration lock", err))?;
    tx.batch_execute(BOOKKEEPING).map_err(|err| pg_error("cannot create the schema table", err))?;
    let before = current_version(&mut tx)?;
    if before > PG_SCHEMA_VERSION {
        return Err(newer(before));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > before) {
        tx.batch_execute(sql).map_err(|err| pg_error(format!("migration {version} failed"), err))?;
        let v = i32::try_from(*version).unwrap_or(i32::MAX);
        tx.execute("INSERT INTO runguard_schema (version) VALUES ($1)", &[&v])
            .map_err(|err| pg_error(format!("cannot record migration {version}"), err))?;
    }
    tx.execute(
        "INSERT INTO runguard_chain (singleton, head_seq, head_hash, commits) VALUES (true, 0, $1, 0)
         ON CONFLICT (singleton) DO NOTHING",
        &[&RecordHash::genesis().as_str()],
    )
    .map_err(|err| pg_error("cannot create the chain head", err))?;
    tx.commit().map_err(|err| pg_error("cannot commit the migration", err))?;
    Ok(before)
}

/// Checks, without changing anything, that the database holds this build's schema version: a database
/// without the runguard schema is `NotFound`, an older or newer schema is `Schema`.
pub(crate) fn require_current(client: &mut postgres::Client, shown: &str) -> Result<(), StoreError> {
    let row = client
        .query_one("SELECT to_regclass('runguard_schema') IS NOT NULL", &[])
        .map_err(|err| pg_error("cannot read the schema version", err))?;
    let exists: bool = row.try_get(0).map_err(|err| pg_error("cannot read the schema version", err))?;
    if !exists {
        return Err(StoreError::not_found(format!(
            "the database at {shown} holds no runguard store (no runguard schema): check the URL, or run \
             `runguard migrate` to create one"
        )));
    }
    match current_version(client)? {
        version if version > PG_SCHEMA_VERSION => Err(newer(version)),
        version if version < PG_SCHEMA_VERSION => Err(StoreError::new(
            StoreErrorKind::Schema,
            format!(
                "the database has store schema version {version}, older than this build's \
                 {PG_SCHEMA_VERSION}: run `runguard migrate` first (this command does not change the database)"
            ),
        )),
        _ => Ok(()),
    }
}

/// The schema version the database holds (0: none yet).
pub(crate) fn current_version(client: &mut impl GenericClient) -> Result<u32, StoreError> {
    let row = client
        .query_one("SELECT coalesce(max(version), 0) FROM runguard_schema", &[])
        .map_err(|err| pg_error("cannot read the schema version", err))?;
    let version: i32 = row.try_get(0).map_err(|err| pg_error("cannot read the schema version", err))?;
    Ok(u32::try_from(version).unwrap_or(0))
}

fn newer(version: u32) -> StoreError {
    StoreError::new(
        StoreErrorKind::Schema,
        format!(
            "the database has store schema version {version}; this build knows versions up to \
             {PG_SCHEMA_VERSION}: run a newer runguard"
        ),
    )
}
