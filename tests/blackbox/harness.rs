//! Starting, stopping and talking to a real `runguard` node.
//!
//! Each [`Node`] runs the binary on `127.0.0.1:0` with its own temporary directory (the sled data
//! directory, an optional config file and the node's log), reads the port from the one line the node
//! prints on stdout, and kills the process when dropped. [`Client`] is a small JSON client that answers
//! every status (never an error for non-2xx) as a [`Resp`], after checking it against the node's own
//! OpenAPI document (see [`contract`]): a status the document does not declare for the operation, a body
//! that does not match the schema declared for that status, or a missing `Retry-After` fails the test.
//!
//! The backend switch: with `RUNGUARD_TEST_STORE=postgres` every node keeps its data in a fresh database
//! of a private PostgreSQL server started once per test process (`runguard-testpg`) instead of sled;
//! tests that are about sled's files call [`sled_only`] and are skipped, with a message, on that pass.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::contract::Contract;

/// How long a node may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful shutdown may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Per-request timeout of the client.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The `runguard` binary next to the test executable (`target/<profile>/runguard`), built once per test
/// process with the same cargo, target directory and profile so that it is never stale.
pub fn runguard_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test executable has a path");
        // target/<profile>/deps/blackbox-<hash>
        let profile_dir = exe.parent().and_then(Path::parent).expect("the test executable lives in <profile>/deps");
        let bin = profile_dir.join(format!("runguard{}", std::env::consts::EXE_SUFFIX));
        build_binary(profile_dir, &bin);
        assert!(bin.is_file(), "the runguard binary was not found at {}", bin.display());
        bin
    })
}

/// `cargo build -p runguard-node --bin runguard` into the test's own target directory and profile. A
/// dependency on `runguard-node` builds its library but not its binary, and an old binary would test old
/// code. Without cargo (the test executable run directly) an existing binary is used as it is.
fn build_binary(profile_dir: &Path, bin: &Path) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let Some(target_dir) = profile_dir.parent() else { return };
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_owned(),
        Some(other) => other.to_owned(),
        None => return,
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace");
    let status = Command::new(&cargo)
        .current_dir(workspace)
        .args(["build", "--quiet", "-p", "runguard-node", "--bin", "runguard", "--profile", &profile])
        .arg("--target-dir")
        .arg(target_dir)
        .stdin(Stdio::null())
        .status();
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("building the runguard binary failed ({status})"),
        Err(err) if bin.is_file() => eprintln!("cannot run cargo ({err}); using the existing {}", bin.display()),
        Err(err) => panic!("cannot run cargo to build the runguard binary: {err}"),
    }
}

/// Runs `runguard ARGS…` to completion (for `verify`, `export`, `policy lint`).
pub fn run_cli(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let mut command = Command::new(runguard_bin());
    command.args(args).stdin(Stdio::null());
    clear_runguard_env(&mut command);
    command.output().expect("runguard runs")
}

fn clear_runguard_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| k.starts_with("RUNGUARD_")) {
            command.env_remove(key);
        }
    }
}

/// Whether this test process runs its nodes on PostgreSQL (`RUNGUARD_TEST_STORE=postgres`) rather than
/// on sled (the default, or `RUNGUARD_TEST_STORE=sled`).
pub fn on_postgres() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| match std::env::var("RUNGUARD_TEST_STORE").as_deref() {
        Ok("postgres") => true,
        Ok("sled" | "") | Err(_) => false,
        Ok(other) => panic!("RUNGUARD_TEST_STORE must be `sled` or `postgres`, not `{other}`"),
    })
}

/// For a test about sled's files (its data directory, watermark, corruption): true, with a visible
/// message, when the suite runs on PostgreSQL, where the test has nothing to check.
#[must_use]
pub fn sled_only(test: &str) -> bool {
    if on_postgres() {
        // Straight to the process's standard error: the test harness captures `eprintln!` of passing
        // tests, and a skip must show in the run's output.
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "skipping `{test}` on postgres: it is about the sled data directory");
    }
    on_postgres()
}

/// A fresh database on the test process's private PostgreSQL server (for the PostgreSQL pass, and for
/// tests that run on PostgreSQL whatever the pass): `None`, with a message, when PostgreSQL is not
/// installed, which fails the PostgreSQL pass and skips the others.
pub fn fresh_postgres() -> Option<runguard_testpg::Database> {
    let db = runguard_testpg::fresh_database();
    assert!(db.is_some() || !on_postgres(), "RUNGUARD_TEST_STORE=postgres, but PostgreSQL is not installed");
    db
}

/// A bearer token as configured in `[[tokens]]`.
#[derive(Clone, Copy, Debug)]
pub struct Token {
    /// `name` (appears in audits).
    pub name: &'static str,
    /// `tenant`.
    pub tenant: &'static str,
    /// `role`.
    pub role: &'static str,
    /// The bearer token itself (only its SHA-256 goes into the config).
    pub secret: &'static str,
}

impl Token {
    /// The `[[tokens]]` entry.
    pub fn toml(&self) -> String {
        let sha = hex::encode(Sha256::digest(self.secret.as_bytes()));
        format!(
            "[[tokens]]\nname = \"{}\"\ntenant = \"{}\"\nrole = \"{}\"\nsha256 = \"{sha}\"\n",
            self.name, self.tenant, self.role
        )
    }
}

/// acme's worker.
pub const ACME_WORKER: Token = Token { name: "acme-worker", tenant: "acme", role: "worker", secret: "acme-w-secret" };
/// acme's operator.
pub const ACME_OPERATOR: Token =
    Token { name: "acme-operator", tenant: "acme", role: "operator", secret: "acme-o-secret" };
/// beta's worker.
pub const BETA_WORKER: Token = Token { name: "beta-worker", tenant: "beta", role: "worker", secret: "beta-w-secret" };
/// beta's operator.
pub const BETA_OPERATOR: Token =
    Token { name: "beta-operator", tenant: "beta", role: "operator", secret: "beta-o-secret" };
/// An admin whose own tenant is `ops`.
pub const ADMIN: Token = Token { name: "root", tenant: "ops", role: "admin", secret: "admin-secret" };

/// A config with the five tokens above (so not development mode).
pub fn tokens_config() -> String {
    [ACME_WORKER, ACME_OPERATOR, BETA_WORKER, BETA_OPERATOR, ADMIN]
        .iter()
        .map(Token::toml)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A running (or stopped, restartable) node.
#[derive(Debug)]
pub struct Node {
    dir: TempDir,
    config: Option<PathBuf>,
    child: Option<Child>,
    port: u16,
    starts: u32,
    agent: ureq::Agent,
    /// Whether its clients check answers against the document (all but the node that serves it).
    checked: bool,
    /// The PostgreSQL URL of its store, when it keeps its data there rather than in sled.
    postgres: Option<String>,
    /// Whether the next start listens on the port of the last one (a node behind a load balancer).
    keep_port: bool,
}

impl Node {
    /// A node in development mode (no tokens: tenant `default`, admin).
    pub fn start() -> Node {
        Self::launch(None)
    }

    /// A node with this TOML configuration (`listen` and `data_dir` come from the command line).
    pub fn start_with_config(toml: &str) -> Node {
        Self::launch(Some(toml))
    }

    fn launch(toml: Option<&str>) -> Node {
        Self::launch_as(toml, true)
    }

    /// A node on PostgreSQL at `url` (whatever the pass), with this TOML configuration if any.
    pub fn start_on_postgres(url: &str, toml: Option<&str>) -> Node {
        Self::launch_on(toml, true, Some(url.to_owned()))
    }

    /// A node on sled (whatever the pass), with this TOML configuration if any.
    pub fn start_on_sled(toml: Option<&str>) -> Node {
        Self::launch_on(toml, true, None)
    }

    fn launch_as(toml: Option<&str>, checked: bool) -> Node {
        let postgres = on_postgres().then(|| fresh_postgres().map(|db| db.url)).flatten();
        Self::launch_on(toml, checked, postgres)
    }

    fn launch_on(toml: Option<&str>, checked: bool, postgres: Option<String>) -> Node {
        let dir = tempfile::Builder::new().prefix("runguard-bbt-").tempdir().expect("a temporary directory");
        let config = toml.map(|text| {
            let path = dir.path().join("runguard.toml");
            std::fs::write(&path, text).expect("write the config file");
            path
        });
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        let mut node =
            Node { dir, config, child: None, port: 0, starts: 0, agent, checked, postgres, keep_port: false };
        node.spawn();
        node
    }

    /// The sled data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The arguments that name this node's store to `verify` and `export`: `--data DIR` on sled,
    /// `--postgres-url URL` on PostgreSQL.
    pub fn store_args(&self) -> Vec<std::ffi::OsString> {
        match &self.postgres {
            Some(url) => vec!["--postgres-url".into(), url.into()],
            None => vec!["--data".into(), self.data_dir().into()],
        }
    }

    /// Runs `runguard ARGS… <this node's store>` to completion (`verify`, `export`).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut argv: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        argv.extend(self.store_args());
        let argv: Vec<&std::ffi::OsStr> = argv.iter().map(std::ffi::OsString::as_os_str).collect();
        run_cli(&argv)
    }

    /// The node's log so far (stderr of every start).
    ///
    /// The node writes its log lines from a thread of its own, a moment after the event: this waits until
    /// the logs have stopped growing for a while (at most two seconds) before reading them.
    pub fn logs(&self) -> String {
        let read = || {
            (1..=self.starts)
                .map(|n| std::fs::read_to_string(self.dir.path().join(format!("stderr-{n}.log"))).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n")
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut logs = read();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = read();
            if now.len() == logs.len() || Instant::now() >= deadline {
                return now;
            }
            logs = now;
        }
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the node is already running");
        self.starts += 1;
        let log = std::fs::File::create(self.dir.path().join(format!("stderr-{}.log", self.starts))).expect("log file");
        let mut command = Command::new(runguard_bin());
        let listen = format!("127.0.0.1:{}", if self.keep_port { self.port } else { 0 });
        command.arg("serve").arg("--listen").arg(listen).arg("--data").arg(self.data_dir());
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        clear_runguard_env(&mut command);
        if let Some(url) = &self.postgres {
            command.env("RUNGUARD_STORE", "postgres").env("RUNGUARD_POSTGRES_URL", url);
        }
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::from(log));
        let mut child = command.spawn().expect("spawn runguard serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Keep draining so the node never blocks on a full pipe.
            for _ in lines {}
        });
        let first = rx.recv_timeout(START_TIMEOUT);
        let port = match &first {
            Ok(Some(Ok(line))) => line
                .strip_prefix("runguard listening on http://127.0.0.1:")
                .and_then(|port| port.trim().parse::<u16>().ok()),
            _ => None,
        };
        self.child = Some(child);
        match port {
            Some(port) => self.port = port,
            None => {
                self.kill();
                panic!("runguard did not report its port (first stdout line: {first:?}); log:\n{}", self.logs());
            }
        }
        // Compiled now rather than at a test's first call, so that tests timing their calls time only theirs.
        if self.checked {
            contract();
        }
    }

    /// The base URL, e.g. `http://127.0.0.1:40213`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A client without a token (development mode accepts it).
    pub fn client(&self) -> Client {
        Client { agent: self.agent.clone(), base: self.base(), token: None, tenant: None, checked: self.checked }
    }

    /// A client presenting `token`.
    pub fn client_as(&self, token: Token) -> Client {
        Client { token: Some(token.secret.to_owned()), ..self.client() }
    }

    /// The process id while the node runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The node's resident set size in KiB (`VmRSS` of `/proc/PID/status`), while it runs on Linux.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// SIGKILL (a crash) and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (graceful shutdown); waits for the exit and returns its status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the node is running");
        let sent = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM failed");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for runguard") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("runguard did not stop within {STOP_TIMEOUT:?} of SIGTERM; log:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the binary again on the same data directory and config (after `kill` or `terminate`).
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// As [`Node::restart`], on the same port (where a load balancer expects the node).
    pub fn restart_on_same_port(&mut self) {
        self.keep_port = true;
        self.spawn();
    }

    /// Replaces the node's config file, read at its next (re)start.
    pub fn set_config(&mut self, toml: &str) {
        let path = self.dir.path().join("runguard.toml");
        std::fs::write(&path, toml).expect("write the config file");
        self.config = Some(path);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP answer of any status.
#[derive(Debug)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: ureq::http::HeaderMap,
    /// The body as text.
    pub text: String,
    /// The body as JSON (`Value::Null` when it is not JSON).
    pub body: Value,
}

impl Resp {
    /// Asserts the status and returns the JSON body.
    #[track_caller]
    pub fn expect(&self, status: u16) -> &Value {
        assert_eq!(self.status, status, "unexpected status; body: {}", self.text);
        &self.body
    }

    /// Asserts the status, the error shape `{"error": {"code", "message", "details"}}` and the code (unless
    /// `code` is empty); returns `details`.
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str) -> &Value {
        assert_eq!(self.status, status, "unexpected status; body: {}", self.text);
        let ct = self.header("content-type").unwrap_or_default();
        assert!(ct.starts_with("application/json"), "error content type `{ct}`; body: {}", self.text);
        let error = &self.body["error"];
        assert!(error["code"].is_string(), "no error.code in {}", self.text);
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "no error.message in {}", self.text);
        assert!(error["details"].is_object(), "no error.details object in {}", self.text);
        if !code.is_empty() {
            assert_eq!(error["code"], code, "error code; body: {}", self.text);
        }
        &error["details"]
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    }
}

/// A JSON client for one node, optionally with a token and an `X-Tenant` header.
#[derive(Clone, Debug)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    tenant: Option<String>,
    /// Whether answers are checked against the document.
    checked: bool,
}

impl Client {
    /// The same client sending `X-Tenant: tenant`.
    pub fn for_tenant(&self, tenant: &str) -> Client {
        Client { tenant: Some(tenant.to_owned()), ..self.clone() }
    }

    /// The same client sending to another base URL (a load balancer in front of nodes).
    pub fn at(&self, base: &str) -> Client {
        Client { base: base.to_owned(), ..self.clone() }
    }

    /// The same client with a raw bearer token.
    pub fn with_secret(&self, secret: &str) -> Client {
        Client { token: Some(secret.to_owned()), ..self.clone() }
    }

    /// `GET path`.
    #[track_caller]
    pub fn get(&self, path: &str) -> Resp {
        self.send("GET", path, None).expect("GET succeeds at the transport level")
    }

    /// `POST path` with a JSON body.
    #[track_caller]
    pub fn post(&self, path: &str, body: &Value) -> Resp {
        self.send("POST", path, Some(body.to_string().into_bytes())).expect("POST succeeds at the transport level")
    }

    /// `PUT path` with a JSON body.
    #[track_caller]
    pub fn put(&self, path: &str, body: &Value) -> Resp {
        self.send("PUT", path, Some(body.to_string().into_bytes())).expect("PUT succeeds at the transport level")
    }

    /// Any method with raw bytes as an `application/json` body.
    pub fn send(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<Resp, ureq::Error> {
        self.send_with(method, path, body, &[])
    }

    /// Any method, raw body, extra headers.
    pub fn send_with(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<Resp, ureq::Error> {
        let mut request = ureq::http::Request::builder().method(method).uri(format!("{}{path}", self.base));
        if body.is_some() && !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-type")) {
            request = request.header("content-type", "application/json");
        }
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(tenant) = &self.tenant {
            request = request.header("x-tenant", tenant);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(body.unwrap_or_default()).expect("a valid request");
        let resp = self.exchange(request)?;
        if self.checked {
            contract().check(method, path, &resp);
        }
        Ok(resp)
    }

    fn exchange(&self, request: ureq::http::Request<Vec<u8>>) -> Result<Resp, ureq::Error> {
        let mut response = self.agent.run(request)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.body_mut().read_to_string()?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Resp { status, headers, text, body })
    }
}

/// The OpenAPI document of the binary under test, compiled once per test process from a node of its own:
/// the document is the same for every configuration, and the nodes under test see no extra request.
pub fn contract() -> &'static Contract {
    static CONTRACT: OnceLock<Contract> = OnceLock::new();
    CONTRACT.get_or_init(|| {
        let node = Node::launch_as(None, false);
        let document = node.client().get("/openapi.json").expect(200).clone();
        Contract::new(&document)
    })
}

/// A proptest runner for properties that drive one node across their cases: the case count comes from
/// `PROPTEST_CASES`, and failures persist beside `source_file` (pass `file!()`) under `regressions`.
pub fn property_runner(source_file: &'static str) -> proptest::test_runner::TestRunner {
    use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};
    TestRunner::new(Config {
        source_file: Some(source_file),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..Config::default()
    })
}

/// Copies a directory tree (a data directory, to damage or move a copy of it).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}
