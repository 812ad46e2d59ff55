//! # runguard-testpg
//!
//! A private, throw-away PostgreSQL server for runguard's tests, run from the PostgreSQL binaries
//! installed on the machine (the Debian `postgresql` package): `initdb` into a temporary directory (as the
//! `postgres` system user when the tests run as root, since `initdb` refuses root), with page checksums,
//! then `pg_ctl start` on a free loopback port with `fsync=on`, trust authentication for the `runguard`
//! role, and a Unix socket only inside that directory.
//!
//! [`shared`] is one server per test process (started on first use, stopped by a small watchdog once the
//! process is gone, since Rust tests have no global teardown); [`Cluster::fresh_database`] gives each
//! test its own database on it. [`Cluster::start`] is a server of the test's own, stopped on drop, for
//! tests that stop and restart PostgreSQL. When the binaries are absent both print why and answer `None`,
//! so that a test can skip visibly; any other failure panics.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The role tests connect as (a superuser of the private cluster).
pub const USER: &str = "runguard";

/// A running private PostgreSQL server.
#[derive(Debug)]
pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
    /// Whether dropping this value stops the server (false for the shared one).
    owned: bool,
    /// Keeps the directory while the value lives (`None` once handed to the watchdog).
    _temp: Option<tempfile::TempDir>,
    /// The database [`Cluster::fresh_schema`] creates schemas in.
    schema_database: OnceLock<Database>,
}

/// A fresh database on a cluster.
#[derive(Debug, Clone)]
pub struct Database {
    /// `postgres://runguard@127.0.0.1:PORT/NAME`.
    pub url: String,
    /// The database's name.
    pub name: String,
}

static SHARED: OnceLock<Option<Cluster>> = OnceLock::new();
static NEXT_DB: AtomicU64 = AtomicU64::new(0);

/// The server shared by every test of this process, started on first use; `None` (with a message on
/// stderr) when the PostgreSQL binaries are not installed.
pub fn shared() -> Option<&'static Cluster> {
    SHARED
        .get_or_init(|| {
            let mut cluster = Cluster::start()?;
            cluster.hand_to_watchdog();
            Some(cluster)
        })
        .as_ref()
}

/// A fresh database on the shared server, or `None` (with a message) when PostgreSQL is absent.
pub fn fresh_database() -> Option<Database> {
    shared().map(Cluster::fresh_database)
}

/// A fresh schema on the shared server (see [`Cluster::fresh_schema`]), or `None` when PostgreSQL is
/// absent.
pub fn fresh_schema() -> Option<Database> {
    shared().map(Cluster::fresh_schema)
}

/// Where the PostgreSQL server binaries are: `RUNGUARD_PG_BINDIR`, else `pg_config --bindir`, else the
/// newest version under Debian's `/usr/lib/postgresql`.
pub fn bin_dir() -> Option<PathBuf> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("RUNGUARD_PG_BINDIR").map(PathBuf::from) {
        return has_initdb(&dir).then_some(dir);
    }
    let from_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    if let Some(dir) = from_config.filter(|dir| has_initdb(dir)) {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_initdb(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0").unwrap_or(false)
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    listener.local_addr().expect("a bound address").port()
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|err| panic!("cannot run {what}: {err}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    /// Starts a server of the caller's own, stopped (immediately) when dropped; `None` (with a message on
    /// stderr) when the PostgreSQL binaries are not installed.
    pub fn start() -> Option<Cluster> {
        Self::start_in(&std::env::temp_dir())
    }

    /// As [`Cluster::start`], with the server's directory created under `parent` (a benchmark keeps it on
    /// the disk under test).
    pub fn start_in(parent: &Path) -> Option<Cluster> {
        let Some(bin) = bin_dir() else {
            eprintln!(
                "skipping the PostgreSQL tests: no PostgreSQL server binaries found (install the `postgresql` \
                 package, or set RUNGUARD_PG_BINDIR)"
            );
            return None;
        };
        let temp = tempfile::Builder::new().prefix("runguard-pg-").tempdir_in(parent).expect("a temporary directory");
        let dir = temp.path().to_path_buf();
        let as_postgres = is_root();
        if as_postgres {
            run(Command::new("chown").arg("postgres").arg(&dir), "chown of the cluster directory to `postgres`");
        }
        let mut cluster = Cluster {
            bin,
            dir,
            port: free_port(),
            as_postgres,
            owned: true,
            _temp: Some(temp),
            schema_database: OnceLock::new(),
        };
        let data = cluster.data_dir();
        run(
            cluster.command("initdb").arg("-D").arg(&data).args([
                "-U",
                USER,
                "--auth=trust",
                "-k",
                "--no-sync",
                "--locale=C",
                "-E",
                "UTF8",
            ]),
            "initdb",
        );
        // A port found free may be taken by the time the server binds it: try a few.
        for attempt in 0..3 {
            if cluster.try_start() {
                return Some(cluster);
            }
            assert!(attempt < 2, "PostgreSQL did not start: {}", cluster.log());
            cluster.port = free_port();
        }
        None
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn try_start(&self) -> bool {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on -c max_connections=200",
            self.port,
            self.dir.display()
        );
        self.command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "-t", "30", "-o", &options, "start"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// Starts the server again after [`Cluster::stop_immediately`], on the same port.
    pub fn restart(&self) {
        assert!(self.try_start(), "PostgreSQL did not restart: {}", self.log());
    }

    /// Stops the server the way a crash does (`pg_ctl -m immediate stop`): no checkpoint, connections cut.
    pub fn stop_immediately(&self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// The process id of the server's postmaster (the parent of every backend), from `postmaster.pid`.
    pub fn server_pid(&self) -> Option<u32> {
        let pid_file = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        pid_file.lines().next()?.trim().parse().ok()
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a new, empty database and answers its URL.
    pub fn fresh_database(&self) -> Database {
        let name = format!("t{}_{}", std::process::id(), NEXT_DB.fetch_add(1, Ordering::Relaxed));
        let mut client = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .unwrap_or_else(|err| panic!("cannot connect to the test PostgreSQL: {err}"));
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .unwrap_or_else(|err| panic!("cannot create database `{name}`: {err}"));
        Database { url: self.url(&name), name }
    }

    /// Creates a new, empty schema in one database of this process and answers a URL whose connections
    /// use it (`search_path`): far cheaper than a database, for property tests that want a fresh store
    /// per case.
    pub fn fresh_schema(&self) -> Database {
        let db = self.schema_database.get_or_init(|| self.fresh_database());
        let name = format!("s{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
        let mut client = postgres::Client::connect(&db.url, postgres::NoTls)
            .unwrap_or_else(|err| panic!("cannot connect to the test PostgreSQL: {err}"));
        client
            .batch_execute(&format!("CREATE SCHEMA \"{name}\""))
            .unwrap_or_else(|err| panic!("cannot create schema `{name}`: {err}"));
        Database { url: format!("{}?options=-csearch_path%3D{name}", db.url), name }
    }

    /// This server, stopped (and its directory removed) once this process ends however it ends — a panic
    /// or a kill included — rather than when the value is dropped: for a tool that must not leave a
    /// server behind.
    #[must_use]
    pub fn stopped_with_process(mut self) -> Self {
        self.hand_to_watchdog();
        self
    }

    /// Leaves stopping the server (and removing its directory) to a watchdog process that waits for this
    /// process to end.
    #[expect(clippy::zombie_processes, reason = "the watchdog outlives this process on purpose")]
    fn hand_to_watchdog(&mut self) {
        let Some(temp) = self._temp.take() else { return };
        let dir = temp.keep();
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = if self.as_postgres {
            format!("runuser -u postgres -- '{}' -D '{}/data' -m immediate stop", pg_ctl.display(), dir.display())
        } else {
            format!("'{}' -D '{}/data' -m immediate stop", pg_ctl.display(), dir.display())
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            dir = dir.display()
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the cluster's watchdog starts");
        self.owned = false;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.owned {
            self.stop_immediately();
        }
    }
}
