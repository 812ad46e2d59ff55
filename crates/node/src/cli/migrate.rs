//! `runguard migrate`: bring a PostgreSQL store's schema to this build's version.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use runguard_store::{PG_SCHEMA_VERSION, StoreErrorKind};

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
