//! Configuration: defaults, an optional TOML file, `RUNGUARD_*` environment variables, then flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use runguard_contract::{PolicyLimits, StepLimits, TenantId};
use serde::{Deserialize, Serialize};

/// What a caller may do. Roles nest: admin ⊃ operator ⊃ worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs and steps.
    Worker,
    /// Policies, records, patterns and graduation of its tenant.
    Operator,
    /// Everything, all tenants, global policies.
    Admin,
}

impl Role {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// One bearer token: its name (shown in audits and logs), tenant, role and SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Appears in audits and logs; the token itself never does.
    pub name: String,
    /// The tenant the token acts for.
    pub tenant: TenantId,
    /// worker, operator or admin.
    pub role: Role,
    /// Hex SHA-256 of the bearer token.
    pub sha256: String,
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Which store backend the node keeps its data in (`docs/operations.md`, "Running on PostgreSQL").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// Embedded sled under `data_dir`.
    #[default]
    Sled,
    /// A PostgreSQL database at `postgres_url`.
    Postgres,
}

impl StoreKind {
    /// The config name.
    pub const fn as_str(self) -> &'static str {
        match self {
            StoreKind::Sled => "sled",
            StoreKind::Postgres => "postgres",
        }
    }
}

/// A PostgreSQL URL, which may hold a password: its `Debug` and `Display` forms mask the password, so
/// that a logged or printed configuration never shows it. Only [`PostgresUrl::expose`] gives the URL.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PostgresUrl(String);

impl PostgresUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL itself, password included: only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", runguard_store::redact_postgres_url(&self.0))
    }
}

impl std::fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&runguard_store::redact_postgres_url(&self.0))
    }
}

/// Every limit of the node, with safe defaults (`docs/operations.md`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request body, in bytes.
    pub body_bytes: usize,
    /// Most policies one tenant may own.
    pub policies_per_tenant: usize,
    /// Most steps one run may take.
    pub steps_per_run: u64,
    /// Most runs one chain of parent and child runs holds, the root and the deepest child included:
    /// creating a deeper child is refused with 409 `run_depth_exceeded`.
    pub max_run_depth: usize,
    /// Most live (in-memory) runs.
    pub live_runs: usize,
    /// Depth of each run actor's mailbox.
    pub run_mailbox: usize,
    /// Depth of the writer's mailbox.
    pub writer_queue: usize,
    /// Most calls one group commit carries.
    pub writer_batch: usize,
    /// How long a call may wait for its run or the writer before it is answered 503, in ms.
    pub call_timeout_ms: u64,
    /// CPU-heavy jobs (evaluations over large texts, simulations, policy compiles) one tenant may run at
    /// once; more wait for a lane. Default: half the cores, at least one.
    pub tenant_heavy_jobs: usize,
    /// Most labels on one run.
    pub labels_per_run: usize,
    /// Longest label key or value, in bytes.
    pub label_len: usize,
    /// Longest `reason` of a mode change, in bytes.
    pub reason_len: usize,
    /// Longest `note` of a regret, in bytes.
    pub note_len: usize,
    /// Policy document limits.
    pub policy: PolicyLimits,
    /// Step call limits.
    pub step: StepLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            body_bytes: 1024 * 1024,
            policies_per_tenant: 1000,
            steps_per_run: 100_000,
            max_run_depth: 4,
            live_runs: 200_000,
            run_mailbox: 32,
            writer_queue: 4096,
            writer_batch: 1024,
            call_timeout_ms: 10_000,
            tenant_heavy_jobs: std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            labels_per_run: 64,
            label_len: 256,
            reason_len: 1024,
            note_len: 4096,
            policy: PolicyLimits::default(),
            step: StepLimits::default(),
        }
    }
}

/// The HTTP edge (`docs/reliability.md`, overload): how many connections the node holds and how long a
/// client may take, so that slow or hostile clients cannot pin file descriptors or memory. Durations are
/// in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpEdge {
    /// Most open client connections, across all HTTP workers; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// A request's head must arrive within this time of the connection or the previous request (408).
    pub request_head_timeout_ms: u64,
    /// A request's body must arrive within this time of its head (408 with the JSON error body).
    pub body_timeout_ms: u64,
    /// An idle keep-alive connection is closed after this long (0 closes after every answer).
    pub keep_alive_ms: u64,
    /// After an answer on a closing connection, the node waits this long for the client to close.
    pub disconnect_timeout_ms: u64,
    /// A connection whose client stops reading (or vanishes) is dropped, and the answer it pinned freed,
    /// once the kernel has had data unacknowledged this long (`TCP_USER_TIMEOUT`); 0 leaves the default.
    pub send_timeout_ms: u64,
    /// Most bytes of large answers (64 KiB and over) held for clients at once; a large answer beyond it
    /// is refused with 503 until earlier ones are sent or their connections dropped.
    pub answer_budget_bytes: usize,
}

impl Default for HttpEdge {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            request_head_timeout_ms: 5_000,
            body_timeout_ms: 10_000,
            keep_alive_ms: 5_000,
            disconnect_timeout_ms: 1_000,
            send_timeout_ms: 30_000,
            answer_budget_bytes: 64 * 1024 * 1024,
        }
    }
}

impl HttpEdge {
    fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("http.max_connections", self.max_connections as u64),
            ("http.request_head_timeout_ms", self.request_head_timeout_ms),
            ("http.body_timeout_ms", self.body_timeout_ms),
            ("http.disconnect_timeout_ms", self.disconnect_timeout_ms),
            ("http.answer_budget_bytes", self.answer_budget_bytes as u64),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("`{name}` must be at least 1")));
            }
        }
        Ok(())
    }
}

/// The node's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listen address.
    pub listen: String,
    /// Where sled keeps its files.
    pub data_dir: PathBuf,
    /// The store backend: `sled` (the default, under `data_dir`) or `postgres` (at `postgres_url`).
    pub store: StoreKind,
    /// The PostgreSQL database of `store = "postgres"` (also `RUNGUARD_POSTGRES_URL`), e.g.
    /// `postgres://runguard:PASSWORD@db.internal:5432/runguard`. Its password is never logged or shown.
    pub postgres_url: Option<PostgresUrl>,
    /// Connections the PostgreSQL read pool keeps at most (the writer has one more of its own).
    pub postgres_pool_size: u32,
    /// Bearer tokens; none means development mode (loopback only, tenant `default`, admin, no auth).
    pub tokens: Vec<TokenConfig>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax).
    pub log_level: String,
    /// A run not ended within this many seconds expires.
    pub run_ttl_s: u64,
    /// A run actor idle this long is stopped (and rehydrated on its next call).
    pub run_idle_s: u64,
    /// Keep each call's texts in the run ledger (for replay and simulation).
    pub ledger_texts: bool,
    /// HTTP worker threads.
    pub http_workers: usize,
    /// Dedicated arbiters (threads) that host run actors; 0 (the default) places each run actor on the
    /// HTTP worker thread that first needed it, which spares a thread wake-up per call.
    pub run_arbiters: usize,
    /// sled's page cache budget in bytes (on-disk page size; most of what an idle node holds besides
    /// its live runs).
    pub store_cache_bytes: u64,
    /// Operator confirmations that activate a pending or shadow policy.
    pub confirmations_required: u32,
    /// Occurrences a pattern needs before it can be proposed.
    pub proposal_min_occurrences: u64,
    /// Limits.
    pub limits: Limits,
    /// Connection and timing limits of the HTTP edge.
    pub http: HttpEdge,
    /// This node's name in its logs (`node_id` field) and metrics (`runguard_node_info`): letters, digits
    /// and `.-_:`, at most 64. Left empty (the default), it is the host name and the listen port
    /// (`host:7070`), or the host name and eight random hex digits when the port is chosen by the system
    /// (`--listen …:0`); see `docs/operations.md`.
    pub node_id: String,
    /// For tests and drills only: serve `POST /v1/faults/store` (admin), which makes store commits fail.
    pub fault_injection: bool,
    /// For tests only: milliseconds added to the node's clock, so that a black-box test can move to the
    /// next UTC day (tenant-period budgets). Honoured only by debug builds; a release build ignores it.
    pub test_clock_offset_ms: i64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7070".to_owned(),
            data_dir: PathBuf::from("./runguard-data"),
            store: StoreKind::Sled,
            postgres_url: None,
            postgres_pool_size: runguard_store::PgOptions::default().pool_size,
            tokens: Vec::new(),
            log_format: LogFormat::Text,
            log_level: "info".to_owned(),
            run_ttl_s: 86_400,
            run_idle_s: 300,
            ledger_texts: true,
            http_workers: 2,
            run_arbiters: 0,
            store_cache_bytes: 32 * 1024 * 1024,
            confirmations_required: 3,
            proposal_min_occurrences: 3,
            limits: Limits::default(),
            http: HttpEdge::default(),
            node_id: String::new(),
            fault_injection: false,
            test_clock_offset_ms: 0,
        }
    }
}

/// Whether `c` may appear in a node id (it goes into log lines and metric labels unescaped).
fn node_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':')
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, environment or flags do not parse.
    #[error("invalid configuration: {0}")]
    Parse(Box<figment::Error>),
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Values given on the command line, which override everything else.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--data`.
    pub data_dir: Option<PathBuf>,
    /// `--postgres-url` (implies `store = "postgres"`).
    pub postgres_url: Option<String>,
}

impl Config {
    /// The engine's limits for every run of this node: the step limit and the TTL (the one TTL rule is
    /// [`RunLimits::ttl_elapsed`]).
    pub fn run_limits(&self) -> runguard_engine::RunLimits {
        runguard_engine::RunLimits::new(self.limits.steps_per_run)
            .with_ttl(std::time::Duration::from_secs(self.run_ttl_s))
    }

    /// Loads defaults, then `file` (if any; it must exist), then `RUNGUARD_*` variables (nested keys with
    /// `__`, e.g. `RUNGUARD_LIMITS__BODY_BYTES`), then `overrides`; and validates the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError::Invalid(format!("config file `{}` does not exist", file.display())));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment.merge(Env::prefixed("RUNGUARD_").split("__").ignore(&["config"]));
        if let Some(listen) = &overrides.listen {
            figment = figment.merge(Serialized::default("listen", listen));
        }
        if let Some(data) = &overrides.data_dir {
            figment = figment.merge(Serialized::default("data_dir", data));
        }
        if let Some(url) = &overrides.postgres_url {
            figment = figment
                .merge(Serialized::default("store", StoreKind::Postgres))
                .merge(Serialized::default("postgres_url", url));
        }
        let mut config: Config = figment.extract().map_err(|e| ConfigError::Parse(Box::new(e)))?;
        // CEL costs are bounded for the step inputs the node accepts (`docs/evaluation.md`).
        config.limits.policy.cel_inputs = config.limits.step.clone();
        config.validate()?;
        if config.node_id.is_empty() {
            config.node_id = config.derived_node_id();
        }
        Ok(config)
    }

    /// The node id when none is configured: host name and listen port, or host name and a random suffix
    /// when the port is the system's choice (two such nodes on one host must not share a name).
    fn derived_node_id(&self) -> String {
        let host: String =
            whoami::hostname().unwrap_or_default().chars().filter(|c| node_id_char(*c)).take(40).collect();
        let host = if host.is_empty() { "runguard".to_owned() } else { host };
        match self.listen_addr().map(|addr| addr.port()) {
            Ok(port) if port != 0 => format!("{host}:{port}"),
            _ => format!("{host}-{:08x}", uuid::Uuid::now_v7().as_u128() as u32),
        }
    }

    /// Whether no tokens are configured (development mode).
    pub fn dev_mode(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|e| ConfigError::Invalid(format!("`listen` = `{}`: {e}", self.listen)))
    }

    /// Checks tokens, ranges, and that development mode listens on loopback only.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let addr = self.listen_addr()?;
        if self.dev_mode() && !addr.ip().is_loopback() {
            return invalid(format!(
                "no [[tokens]] are configured (development mode), which serves only on loopback; `listen` = `{}` is not",
                self.listen
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut hashes = std::collections::BTreeSet::new();
        for (i, token) in self.tokens.iter().enumerate() {
            if token.name.trim().is_empty() {
                return invalid(format!("`tokens[{i}].name` must not be empty"));
            }
            let hash = token.sha256.to_ascii_lowercase();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return invalid(format!("`tokens[{i}].sha256` must be 64 hex digits (the SHA-256 of the token)"));
            }
            if !names.insert(token.name.clone()) {
                return invalid(format!("`tokens[{i}].name` `{}` is used twice", token.name));
            }
            if !hashes.insert(hash) {
                return invalid(format!("`tokens[{i}].sha256` is used by another token"));
            }
        }
        let l = &self.limits;
        for (name, value) in [
            ("limits.body_bytes", l.body_bytes),
            ("limits.policies_per_tenant", l.policies_per_tenant),
            ("limits.live_runs", l.live_runs),
            ("limits.run_mailbox", l.run_mailbox),
            ("limits.writer_queue", l.writer_queue),
            ("limits.writer_batch", l.writer_batch),
            ("limits.tenant_heavy_jobs", l.tenant_heavy_jobs),
            ("limits.label_len", l.label_len),
            ("http_workers", self.http_workers),
        ] {
            if value == 0 {
                return invalid(format!("`{name}` must be at least 1"));
            }
        }
        if self.store_cache_bytes < 1024 * 1024 {
            return invalid("`store_cache_bytes` must be at least 1 MiB".into());
        }
        if l.max_run_depth == 0 {
            return invalid("`limits.max_run_depth` must be at least 1".into());
        }
        if self.run_ttl_s == 0 || self.run_idle_s == 0 || l.steps_per_run == 0 || l.call_timeout_ms == 0 {
            return invalid(
                "`run_ttl_s`, `run_idle_s`, `limits.steps_per_run` and `limits.call_timeout_ms` must be at least 1"
                    .into(),
            );
        }
        if self.confirmations_required == 0 || self.proposal_min_occurrences == 0 {
            return invalid("`confirmations_required` and `proposal_min_occurrences` must be at least 1".into());
        }
        if self.node_id.len() > 64 || !self.node_id.chars().all(node_id_char) {
            return invalid(format!(
                "`node_id` = `{}` must be at most 64 letters, digits, `.`, `-`, `_` or `:`",
                self.node_id
            ));
        }
        self.http.validate()?;
        self.validate_store()
    }

    /// A PostgreSQL store needs a URL that parses; the message shows it with its password masked.
    fn validate_store(&self) -> Result<(), ConfigError> {
        if self.store == StoreKind::Sled {
            return Ok(());
        }
        let Some(url) = &self.postgres_url else {
            return Err(ConfigError::Invalid(
                "`store` = `postgres` needs `postgres_url` (or RUNGUARD_POSTGRES_URL), e.g. \
                 `postgres://runguard@localhost:5432/runguard`"
                    .into(),
            ));
        };
        if self.postgres_pool_size == 0 {
            return Err(ConfigError::Invalid("`postgres_pool_size` must be at least 1".into()));
        }
        runguard_store::check_postgres_url(url.expose())
            .map_err(|err| ConfigError::Invalid(format!("`postgres_url`: {}", err.message())))
    }

    /// The PostgreSQL connection options of this configuration.
    pub fn pg_options(&self) -> runguard_store::PgOptions {
        runguard_store::PgOptions { pool_size: self.postgres_pool_size, ..runguard_store::PgOptions::default() }
    }

    /// The PostgreSQL options of the read-only commands (`verify`, `export`, `simulate`): they never
    /// create or migrate the schema.
    pub fn pg_options_read_only(&self) -> runguard_store::PgOptions {
        runguard_store::PgOptions { migrate: false, ..self.pg_options() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_dev_mode_is_loopback_only() {
        let config = Config::default();
        assert!(config.validate().is_ok());
        assert!(config.dev_mode());
        let open = Config { listen: "0.0.0.0:7070".into(), ..Config::default() };
        assert!(open.validate().unwrap_err().to_string().contains("loopback"));
    }

    #[test]
    fn files_and_overrides_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("runguard.toml");
        std::fs::write(
            &file,
            r#"listen = "127.0.0.1:9000"
run_ttl_s = 60
[limits]
body_bytes = 2048
[[tokens]]
name = "acme-worker"
tenant = "acme"
role = "worker"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
"#,
        )
        .unwrap();
        let config =
            Config::load(Some(&file), &Overrides { listen: Some("127.0.0.1:9001".into()), ..Overrides::default() })
                .unwrap();
        assert_eq!(config.listen, "127.0.0.1:9001");
        assert_eq!(config.run_ttl_s, 60);
        assert_eq!(config.limits.body_bytes, 2048);
        assert_eq!(config.tokens[0].role, Role::Worker);
    }

    /// CEL costs are computed for the step inputs the node accepts, whatever the file says.
    #[test]
    fn cel_costs_follow_the_step_limits() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("runguard.toml");
        std::fs::write(&file, "[limits.step]\nmax_text_len = 1048576\nmax_input_keys = 16\n").unwrap();
        let config = Config::load(Some(&file), &Overrides::default()).unwrap();
        assert_eq!(config.limits.policy.cel_inputs, config.limits.step);
        assert_eq!(config.limits.policy.cel_inputs.max_text_len, 1_048_576);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        assert!(
            Config::load(Some(&missing), &Overrides::default()).unwrap_err().to_string().contains("does not exist")
        );
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "listen = 7\ncolour = 'red'\n").unwrap();
        assert!(Config::load(Some(&file), &Overrides::default()).is_err());
        std::fs::write(&file, "[[tokens]]\nname='a'\ntenant='t'\nrole='root'\nsha256='00'\n").unwrap();
        assert!(Config::load(Some(&file), &Overrides::default()).is_err());
        std::fs::write(&file, "[[tokens]]\nname='a'\ntenant='t'\nrole='admin'\nsha256='00'\n").unwrap();
        assert!(Config::load(Some(&file), &Overrides::default()).unwrap_err().to_string().contains("sha256"));
    }

    #[test]
    fn a_postgres_store_needs_a_url_and_never_shows_its_password() {
        let missing = Config { store: StoreKind::Postgres, ..Config::default() };
        assert!(missing.validate().unwrap_err().to_string().contains("`postgres_url`"));
        let url = PostgresUrl::new("postgres://rg:hunter2@db:5432/runguard");
        let config = Config { store: StoreKind::Postgres, postgres_url: Some(url.clone()), ..Config::default() };
        assert!(config.validate().is_ok());
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(url.to_string(), "postgres://rg:***@db:5432/runguard");
        assert_eq!(url.expose(), "postgres://rg:hunter2@db:5432/runguard");
        let bad = Config { postgres_url: Some(PostgresUrl::new("postgres://rg:hunter2@db:port/x")), ..config };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("postgres_url") && !err.contains("hunter2"), "{err}");
        // sled ignores the URL.
        assert!(Config { store: StoreKind::Sled, ..bad }.validate().is_ok());
    }

    #[test]
    fn the_postgres_url_flag_chooses_the_postgres_store() {
        let overrides = Overrides { postgres_url: Some("postgres://rg@db/x".into()), ..Overrides::default() };
        let config = Config::load(None, &overrides).unwrap();
        assert_eq!(config.store, StoreKind::Postgres);
        assert_eq!(config.postgres_url.unwrap().expose(), "postgres://rg@db/x");
    }
}
