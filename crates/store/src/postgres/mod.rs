//! The PostgreSQL backend: the same store on a database operators already run.
//!
//! Every PostgreSQL call of the crate is in this module: `schema` (versioned migrations), `commit` (group
//! commit: one transaction, a savepoint per caller, the chain head row locked), `reads` (queries) and
//! `verify`. The client is rust-postgres' sync `postgres` crate (the store's API is sync: the node calls
//! it from blocking threads and its writer thread), reads go through a small r2d2 pool and the writer
//! keeps one connection of its own.

mod commit;
mod reads;
mod schema;
mod verify;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use postgres::NoTls;
use r2d2_postgres::PostgresConnectionManager;
use r2d2_postgres::r2d2::{Pool, PooledConnection};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use schema::PG_SCHEMA_VERSION;

use crate::cluster_lock::{ClusterLock, lock_error};
use crate::error::{StoreError, StoreErrorKind};
use crate::group::CommitSignals;
use crate::run_cache::RunCache;

/// How to reach and use a PostgreSQL store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgOptions {
    /// Connections the read pool keeps at most (the writer has one more of its own).
    pub pool_size: u32,
    /// How long opening a connection, or waiting for a free pooled one, may take.
    pub connect_timeout: Duration,
    /// Whether opening creates or migrates the schema (`serve`). When false (the read-only commands:
    /// `verify`, `export`, `simulate`), a database without the runguard schema is refused as `NotFound`
    /// and an older schema as `Schema`, so that a mistyped URL is never answered with an empty, clean
    /// store.
    pub migrate: bool,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self { pool_size: 8, connect_timeout: Duration::from_secs(3), migrate: true }
    }
}

/// Brings the schema of the database at `url` to this build's version (`runguard migrate`); answers the
/// version it had before. A schema newer than this build is refused (`Schema`).
pub fn migrate(url: &str, options: &PgOptions) -> Result<u32, StoreError> {
    let config = parse_url(url, options)?;
    let mut client =
        config.connect(NoTls).map_err(|err| pg_error(format!("cannot connect to {}", redact(url)), err))?;
    schema::migrate_client(&mut client)
}

/// The writer's own connection and what it knows between commits.
#[derive(Default)]
struct WriterState {
    /// `None` until connected, and after a failure (reconnected on the next commit or probe).
    client: Option<postgres::Client>,
    /// The statements prepared on `client`.
    statements: Statements,
    /// The snapshot each recently written run is bound to. A binding never changes and runs are never
    /// deleted, so this stays true whichever node writes the database; learned only from commits that
    /// committed.
    bindings: RunCache,
    /// Commits made so far, as of the writer's last commit.
    commits: u64,
}

impl WriterState {
    /// Forgets the connection (and what was prepared on it): the next commit connects afresh.
    fn reset(&mut self) {
        self.client = None;
        self.statements = Statements::default();
    }
}

/// Statements prepared once per connection: a commit then costs one round trip per statement, not two.
#[derive(Default)]
pub(crate) struct Statements(HashMap<&'static str, postgres::Statement>);

impl Statements {
    /// The statement for `sql`, prepared on first use.
    pub(crate) fn get(
        &mut self,
        tx: &mut postgres::Transaction<'_>,
        sql: &'static str,
    ) -> Result<postgres::Statement, postgres::Error> {
        if let Some(statement) = self.0.get(sql) {
            return Ok(statement.clone());
        }
        let statement = tx.prepare(sql)?;
        self.0.insert(sql, statement.clone());
        Ok(statement)
    }
}

impl std::fmt::Debug for WriterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterState")
            .field("connected", &self.client.is_some())
            .field("commits", &self.commits)
            .finish()
    }
}

type Manager = PostgresConnectionManager<NoTls>;

/// A store in a PostgreSQL database.
pub(crate) struct PgStore {
    /// The URL with its password masked, for messages.
    shown: String,
    config: postgres::Config,
    pool: Pool<Manager>,
    writer: Mutex<WriterState>,
    /// Test switches, readiness and the policy generation.
    pub(super) signals: CommitSignals,
    /// The database's policy generation as last read.
    shared_policy_generation: AtomicU64,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("url", &self.shown).finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects, migrates and checks the chain head row.
    pub(crate) fn open(url: &str, options: &PgOptions) -> Result<Self, StoreError> {
        let shown = redact(url);
        let config = parse_url(url, options)?;
        let mut client = config.connect(NoTls).map_err(|err| pg_error(format!("cannot connect to {shown}"), err))?;
        if options.migrate {
            schema::migrate_client(&mut client)?;
        } else {
            schema::require_current(&mut client, &shown)?;
        }
        let row = client
            .query_one("SELECT commits FROM runguard_chain", &[])
            .map_err(|err| pg_error("cannot read the chain head", err))?;
        let commits = u64_of(row.try_get(0).map_err(|err| pg_error("cannot read the chain head", err))?)?;
        let pool = Pool::builder()
            .max_size(options.pool_size.max(1))
            .min_idle(Some(1))
            .connection_timeout(options.connect_timeout)
            // Not tested on checkout (a round trip per read): a connection that died with a database
            // restart fails its next query and the read is retried once on a new one (`PgStore::read`).
            .test_on_check_out(false)
            .build_unchecked(PostgresConnectionManager::new(config.clone(), NoTls));
        tracing::info!(url = %shown, "opened the postgres store");
        Ok(Self {
            shown,
            config,
            pool,
            writer: Mutex::new(WriterState {
                client: Some(client),
                statements: Statements::default(),
                bindings: RunCache::default(),
                commits,
            }),
            signals: CommitSignals::default(),
            shared_policy_generation: AtomicU64::new(0),
        })
    }

    fn writer(&self) -> MutexGuard<'_, WriterState> {
        // A panic while holding the lock cannot leave half a commit: an unfinished transaction rolls back.
        self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn pooled(&self) -> Result<PooledConnection<Manager>, StoreError> {
        self.pool.get().map_err(|err| StoreError::io(format!("no connection to {}", self.shown), err))
    }

    /// Runs a read on a pooled connection. Pooled connections outlive a database restart as dead
    /// sockets; a read that finds its connection so is run again on another (the pool drops closed ones),
    /// at most once per connection the pool can hold.
    fn read<T: Send>(
        &self,
        mut read: impl FnMut(&mut postgres::Client) -> Result<T, postgres::Error> + Send,
    ) -> Result<T, ReadError> {
        off_runtime(|| {
            let mut tries = self.pool.max_size();
            loop {
                let mut conn = self.pooled().map_err(ReadError::Store)?;
                match read(&mut conn) {
                    Err(_) if conn.is_closed() && tries > 0 => tries -= 1,
                    other => return other.map_err(ReadError::Db),
                }
            }
        })
    }

    /// A pooled connection known to be alive (for a long walk such as `verify`).
    fn live(&self) -> Result<PooledConnection<Manager>, StoreError> {
        let mut tries = self.pool.max_size();
        loop {
            let mut conn = self.pooled()?;
            match conn.simple_query("") {
                Err(_) if conn.is_closed() && tries > 0 => tries -= 1,
                Err(err) => return Err(pg_error("cannot read", err)),
                Ok(_) => return Ok(conn),
            }
        }
    }

    pub(crate) fn inject_commit_failure(&self, fail: bool) {
        self.signals.inject_commit_failure(fail);
    }

    pub(crate) fn inject_durability_failure(&self, fail: bool) {
        self.signals.inject_durability_failure(fail);
    }

    pub(crate) fn inject_commit_delay(&self, delay: Duration) {
        self.signals.inject_commit_delay(delay);
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.signals.is_healthy()
    }

    /// This node's attempts (as on sled) plus the database's count of policy commits by every node
    /// (`docs/architecture.md`, "Cluster: fencing and consistency"): both only grow, so their sum changes
    /// whenever either does. A read that fails counts as a change, so that nothing cached is trusted.
    pub(crate) fn policy_generation(&self) -> u64 {
        let shared = self.read(|client| {
            client
                .query_one("SELECT policy_generation FROM runguard_chain", &[])
                .and_then(|row| row.try_get::<_, i64>(0))
        });
        match shared {
            // The largest value any read found: concurrent readers never move it back.
            Ok(shared) => {
                self.shared_policy_generation.fetch_max(u64::try_from(shared).unwrap_or(0), Ordering::AcqRel);
            }
            Err(_) => self.signals.bump_policy_generation(),
        }
        self.signals.policy_generation().wrapping_add(self.shared_policy_generation.load(Ordering::Acquire))
    }

    /// Session advisory locks on a connection of their own (`cluster_lock.rs`), keyed by a 64-bit hash
    /// of each name; `lock_timeout` bounds the wait.
    pub(crate) fn cluster_lock(&self, names: &[String], wait: Duration) -> Result<ClusterLock, StoreError> {
        off_runtime(|| {
            let mut client =
                self.config.connect(NoTls).map_err(|err| pg_error(format!("cannot connect to {}", self.shown), err))?;
            let millis = wait.as_millis().clamp(1, i32::MAX as u128);
            client.batch_execute(&format!("SET lock_timeout = {millis}")).map_err(lock_error)?;
            for name in names {
                client.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[name]).map_err(lock_error)?;
            }
            Ok(ClusterLock::held_by(client))
        })
    }

    pub(crate) fn commit_count(&self) -> u64 {
        self.writer().commits
    }

    /// The database is the authority on what was acknowledged: there is no watermark to keep.
    pub(crate) fn sync_watermark(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The run/snapshot binding is a column of `runs`: nothing to index.
    pub(crate) fn index_snapshot_bindings(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Checks that the database takes writes: connected, and not a read-only standby.
    pub(crate) fn probe(&self) -> Result<(), StoreError> {
        off_runtime(|| self.probe_off_runtime())
    }

    fn probe_off_runtime(&self) -> Result<(), StoreError> {
        let mut writer = self.writer();
        let result = self.probe_locked(&mut writer);
        if result.as_ref().is_err_and(|err| err.kind() == StoreErrorKind::Io) {
            writer.reset();
        }
        self.signals.set_healthy(result.is_ok());
        result
    }

    fn probe_locked(&self, writer: &mut WriterState) -> Result<(), StoreError> {
        if self.signals.commit_failure_injected() {
            return Err(CommitSignals::injected());
        }
        let (client, _, _) = self.connect_writer(writer)?;
        let row = client
            .query_one("SELECT current_setting('transaction_read_only')", &[])
            .map_err(|err| pg_error("the readiness probe failed", err))?;
        let read_only: String = row.try_get(0).map_err(|err| pg_error("the readiness probe failed", err))?;
        if read_only == "on" {
            return Err(StoreError::new(StoreErrorKind::Io, format!("{} is read-only (a standby?)", self.shown)));
        }
        Ok(())
    }

    /// The writer's connection (opened if needed), the statements prepared on it and the run bindings it
    /// knows.
    fn connect_writer<'w>(
        &self,
        writer: &'w mut WriterState,
    ) -> Result<(&'w mut postgres::Client, &'w mut Statements, &'w RunCache), StoreError> {
        if writer.client.as_ref().is_some_and(postgres::Client::is_closed) {
            writer.reset();
        }
        let WriterState { client, statements, bindings, .. } = writer;
        match client {
            Some(client) => Ok((client, statements, bindings)),
            slot @ None => {
                let client = self
                    .config
                    .connect(NoTls)
                    .map_err(|err| pg_error(format!("cannot connect to {}", self.shown), err))?;
                Ok((slot.insert(client), statements, bindings))
            }
        }
    }
}

/// Checks that `url` is a PostgreSQL URL (or key=value string) the client can use, without connecting:
/// configuration validation. The error shows the URL with its password masked.
pub fn check_url(url: &str) -> Result<(), StoreError> {
    parse_url(url, &PgOptions::default()).map(drop)
}

/// Runs `work` where the sync client may block. The client drives a runtime of its own, which cannot
/// start on a thread that drives an async runtime (the node's actix arbiters: its writer, its learning
/// loop); there `work` runs on a scoped thread of its own, which costs a thread start per call. Elsewhere
/// (plain threads, `spawn_blocking` threads) it runs in place.
pub(crate) fn off_runtime<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() || ON_BLOCKING_THREAD.get() {
        return work();
    }
    std::thread::scope(|scope| match scope.spawn(work).join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

fn parse_url(url: &str, options: &PgOptions) -> Result<postgres::Config, StoreError> {
    let mut config: postgres::Config = url.parse().map_err(|_| {
        StoreError::new(StoreErrorKind::InvalidArgument, format!("`{}` is not a PostgreSQL URL", redact(url)))
    })?;
    config.connect_timeout(options.connect_timeout);
    config.application_name("runguard");
    Ok(config)
}

thread_local! {
    /// Whether this thread is one of the async runtime's blocking-pool threads, marked by
    /// [`on_blocking_thread`]: the PostgreSQL client may block on its own runtime there, so a call needs no
    /// thread of its own.
    static ON_BLOCKING_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `work` with this thread marked as a blocking-pool thread of the caller's async runtime (inside
/// `spawn_blocking`): store calls in it then run on this thread instead of starting one each, as they
/// must on a thread that drives async tasks (an actor's). Only for threads that drive no async task.
pub fn on_blocking_thread<T>(work: impl FnOnce() -> T) -> T {
    let before = ON_BLOCKING_THREAD.replace(true);
    let answer = work();
    ON_BLOCKING_THREAD.set(before);
    answer
}

/// The URL with its password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return "the configured database".to_owned() };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    let tail = redact_query(tail);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => format!("{scheme}://{userinfo}@{host}{tail}"),
        },
        None => format!("{scheme}://{authority}{tail}"),
    }
}

/// A `password=` query parameter masked.
fn redact_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else { return tail.to_owned() };
    let masked: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{path}?{}", masked.join("&"))
}

/// Why a read failed: no connection, or the database's answer.
pub(crate) enum ReadError {
    Store(StoreError),
    Db(postgres::Error),
}

impl ReadError {
    /// As a store error, `context` naming what was read.
    pub(crate) fn context(self, context: impl Into<String>) -> StoreError {
        match self {
            ReadError::Store(err) => err,
            ReadError::Db(err) => pg_error(context, err),
        }
    }
}

/// A database error as a store error: a violated constraint is a `Conflict` (another writer got there
/// first), anything else (connection lost, server down, disk full, read-only) is `Io`, which the node
/// answers with 503.
pub(crate) fn pg_error(context: impl Into<String>, err: postgres::Error) -> StoreError {
    let context = context.into();
    match err.code() {
        Some(code) if code.code().starts_with("23") => {
            StoreError::new(StoreErrorKind::Conflict, format!("{context}: {}", db_message(&err)))
        }
        _ => StoreError::io(context, err),
    }
}

fn db_message(err: &postgres::Error) -> String {
    err.as_db_error().map_or_else(|| err.to_string(), |db| db.message().to_owned())
}

/// A `u64` as PostgreSQL's `bigint`.
pub(crate) fn i64_of(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::contract(format!("{v} does not fit a PostgreSQL bigint")))
}

/// A stored `bigint` that must not be negative.
pub(crate) fn u64_of(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::corrupt(format!("a stored counter is negative ({v})")))
}

/// A counter that saturates rather than fails (shadow statistics).
pub(crate) fn i64_saturating(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_json<T: Serialize>(what: &str, value: &T) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(value).map_err(|err| StoreError::contract(format!("cannot encode {what}: {err}")))
}

pub(crate) fn from_json<T: DeserializeOwned>(what: &str, value: serde_json::Value) -> Result<T, StoreError> {
    serde_json::from_value(value).map_err(|err| StoreError::corrupt(format!("stored {what} does not decode: {err}")))
}

/// A plain string form of a serde enum (`running`, `active`, …).
pub(crate) fn enum_str<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(redact("postgres://rg:s3cret@db:5432/runguard"), "postgres://rg:***@db:5432/runguard");
        assert_eq!(redact("postgres://rg@db/runguard"), "postgres://rg@db/runguard");
        assert_eq!(redact("postgres://db/x?user=a&password=s3cret"), "postgres://db/x?user=a&password=***");
        assert!(!redact("host=db password=s3cret").contains("s3cret"));
    }
}
