//! Starting and stopping the servers under test, and reading their memory.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// A server process started by the load generator; killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// From spawning the process to its "listening" line.
    pub started_in: Duration,
    /// The postmaster of the PostgreSQL server a node stores its data in (`None` on sled).
    pub store_pid: Option<u32>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// The resident set size of the process in bytes (Linux; `None` elsewhere).
    pub fn rss_bytes(&self) -> Option<u64> {
        rss_bytes(self.child.id())
    }

    /// CPU time the process has used so far.
    pub fn cpu_time(&self) -> Option<Duration> {
        cpu_time(self.child.id())
    }

    /// CPU time the node's PostgreSQL server has used so far (`None` on sled).
    pub fn store_cpu_time(&self) -> Option<Duration> {
        postgres_cpu_time(self.store_pid?)
    }

    /// Stops the process with SIGTERM (graceful) and waits for it, falling back to SIGKILL.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        if Command::new("kill").args(["-TERM", &pid]).status().is_ok() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Drop kills it.
    }
}

/// User plus system CPU time `pid` has used so far (Linux; `None` elsewhere). Dividing the CPU a server
/// spent during a measurement by the requests it answered gives a cost per request that, unlike a
/// throughput, barely moves when other work shares the machine.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = stat_ticks(pid)?;
    // /proc reports clock ticks of USER_HZ, which is 100 on Linux.
    Some(Duration::from_millis((stat.user + stat.system) * 10))
}

/// CPU time a PostgreSQL server has used so far: its postmaster's own and reaped children's time plus
/// the time of every live backend (the children of `postmaster`). A backend that exits during a
/// measurement moves its time into the postmaster's reaped-children figure, so nothing is lost.
pub fn postgres_cpu_time(postmaster: u32) -> Option<Duration> {
    let own = stat_ticks(postmaster)?;
    let reaped = own.children;
    let mut ticks = own.user + own.system + reaped;
    for entry in std::fs::read_dir("/proc").ok()?.filter_map(Result::ok) {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        if let Some(child) = stat_ticks(pid).filter(|stat| stat.parent == postmaster) {
            ticks += child.user + child.system;
        }
    }
    Some(Duration::from_millis(ticks * 10))
}

/// The fields of `/proc/<pid>/stat` the CPU figures need, in clock ticks.
struct StatTicks {
    parent: u32,
    user: u64,
    system: u64,
    /// Reaped children's user plus system time.
    children: u64,
}

fn stat_ticks(pid: u32) -> Option<StatTicks> {
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // After the name: state, ppid (4th field of the line), …, utime (14th), stime, cutime, cstime.
    Some(StatTicks {
        parent: u32::try_from(field(1)?).ok()?,
        user: field(11)?,
        system: field(12)?,
        children: field(13)? + field(14)?,
    })
}

/// `VmRSS` of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The directory holding this executable (where cargo also puts `runguard` and `runguard-baseline`).
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the load generator's own path")?;
    let path = exe.parent().map(|dir| dir.join(name)).context("the executable has no directory")?;
    if !path.exists() {
        bail!(
            "`{}` not found: build it first (`cargo build --release -p runguard-node -p runguard-loadgen`)",
            path.display()
        );
    }
    Ok(path)
}

fn spawn(mut command: Command, marker: &str) -> anyhow::Result<Server> {
    let started = Instant::now();
    let mut child = command.stdout(Stdio::piped()).stdin(Stdio::null()).spawn().context("cannot start the server")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let Some(line) = lines.next() else {
            let _ = child.kill();
            bail!("the server exited before listening");
        };
        let line = line?;
        if let Some(rest) = line.strip_prefix(marker) {
            let addr: SocketAddr = rest.trim().trim_start_matches("http://").parse()?;
            let started_in = started.elapsed();
            // Keep draining stdout so the server never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines.by_ref() {});
            return Ok(Server { child, addr, started_in, store_pid: None });
        }
    }
}

/// Starts `runguard serve` on a free loopback port over `data`, with `env` added (`RUNGUARD_*` keys).
/// Its log goes to `log` (default level and format).
pub fn start_node(data: &Path, env: &[(&str, String)], log: &Path) -> anyhow::Result<Server> {
    let mut command = Command::new(sibling("runguard")?);
    command.args(["serve", "--listen", "127.0.0.1:0", "--data"]).arg(data);
    command.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    command.stderr(std::fs::File::create(log)?);
    spawn(command, "runguard listening on ")
}

/// What a baseline does before it answers (see `runguard-baseline`).
#[derive(Clone, Copy, Debug)]
pub enum Baseline<'a> {
    /// Nothing: it reads the body and answers.
    Bare,
    /// Appends the body to a file in this directory, group-committed with `fdatasync`.
    File(&'a Path),
    /// Inserts the body under this many keys into a sled database in this directory, group-committed
    /// with sled's flush and `fdatasync`.
    Sled(&'a Path, u64),
}

/// Starts a trivial actix-web baseline with `workers` HTTP workers.
pub fn start_baseline(workers: usize, baseline: Baseline<'_>) -> anyhow::Result<Server> {
    let mut command = Command::new(sibling("runguard-baseline")?);
    command.args(["--listen", "127.0.0.1:0", "--workers", &workers.to_string()]);
    match baseline {
        Baseline::Bare => {}
        Baseline::File(dir) => _ = command.arg("--durable").arg(dir),
        Baseline::Sled(dir, keys) => {
            _ = command.arg("--durable-sled").arg(dir).arg("--sled-keys").arg(keys.to_string())
        }
    }
    command.stderr(Stdio::null());
    spawn(command, "baseline listening on ")
}
