//! A cluster for black-box tests: several real nodes on one fresh PostgreSQL database, behind nginx
//! configured by the shipped `deploy/nginx/runguard.conf` with this cluster's loopback ports.
//!
//! Clusters run only in the PostgreSQL pass (`RUNGUARD_TEST_STORE=postgres`) and only where an `nginx`
//! binary is installed (Debian's `nginx-light`; `.ci/run` installs it); elsewhere [`Cluster::start`]
//! prints a skip line and answers `None`. Nodes keep their ports across a restart, as behind a real load
//! balancer, and answer with an `x-runguard-node` header naming their `node_id` (`node-<i>`), which tells a test
//! which node served a call.

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::harness::{Client, Node, Resp, fresh_postgres, on_postgres, run_cli};

/// The header a node names itself in.
pub const NODE_HEADER: &str = "x-runguard-node";
/// The shipped configuration's own addresses, replaced by the cluster's.
const SHIPPED_LISTEN: &str = "127.0.0.1:8080";
const SHIPPED_NODES: [&str; 3] = ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"];

/// The shipped nginx configuration (`deploy/nginx/runguard.conf`).
pub fn shipped_nginx_conf() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nginx/runguard.conf");
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

/// The `nginx` binary: `RUNGUARD_NGINX`, else `nginx` on the path, else Debian's `/usr/sbin/nginx`.
pub fn nginx_bin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("RUNGUARD_NGINX") {
        return Some(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file());
    on_path.or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|path| path.is_file()))
}

/// Prints a skip line straight to the process's standard error (the test harness captures `eprintln!`).
fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "skipping `{test}`: {why}");
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    listener.local_addr().expect("a bound address").port()
}

/// nginx with the shipped configuration, listening on a loopback port of its own.
#[derive(Debug)]
pub struct Nginx {
    dir: TempDir,
    child: Option<Child>,
    port: u16,
}

impl Nginx {
    /// Writes the shipped configuration with `nodes` as the upstream servers and checks it with `nginx -t`
    /// (panics with nginx's complaint), without starting it.
    pub fn configure(bin: &Path, nodes: &[String]) -> Nginx {
        let dir = tempfile::Builder::new().prefix("runguard-nginx-").tempdir().expect("a temporary directory");
        // Workers drop root for `nobody`, which must reach the temporary directories nginx creates here.
        let _ = Command::new("chmod").arg("755").arg(dir.path()).status();
        let port = free_port();
        let mut site = shipped_nginx_conf().replace(SHIPPED_LISTEN, &format!("127.0.0.1:{port}"));
        let upstream: String =
            nodes.iter().map(|node| format!("    server {node} max_fails=1 fail_timeout=2s;\n")).collect();
        let first = site.find(&format!("    server {}", SHIPPED_NODES[0])).expect("the shipped upstream lists 8081");
        let last = site.find(&format!("    server {}", SHIPPED_NODES[2])).expect("the shipped upstream lists 8083");
        let end = last + site[last..].find('\n').expect("a line end") + 1;
        site.replace_range(first..end, &upstream);
        let d = dir.path().display();
        let main = format!(
            "pid {d}/nginx.pid;\nerror_log {d}/error.log;\nworker_processes 1;\nevents {{ worker_connections 512; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             include {d}/runguard.conf;\n}}\n"
        );
        std::fs::write(dir.path().join("runguard.conf"), site).expect("write the site");
        std::fs::write(dir.path().join("nginx.conf"), main).expect("write the main config");
        let nginx = Nginx { dir, child: None, port };
        let out = nginx.command(bin).arg("-t").stdin(Stdio::null()).output().expect("nginx runs");
        assert!(out.status.success(), "nginx -t refused the configuration: {}", String::from_utf8_lossy(&out.stderr));
        nginx
    }

    fn command(&self, bin: &Path) -> Command {
        let mut command = Command::new(bin);
        command.arg("-p").arg(self.dir.path()).arg("-c").arg(self.dir.path().join("nginx.conf"));
        command
    }

    /// Starts nginx in the foreground of a child process and waits until it accepts connections.
    pub fn start(&mut self, bin: &Path) {
        let log = std::fs::File::create(self.dir.path().join("stderr.log")).expect("log file");
        let child = self
            .command(bin)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn nginx");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen: {}", self.error_log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// nginx's error log (upstream failures and retries are logged there).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT is nginx's graceful stop: the master takes its workers with it (a SIGKILL would not).
            let _ = Command::new("kill").arg("-QUIT").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Nodes on one database behind nginx.
#[derive(Debug)]
pub struct Cluster {
    /// The nodes, in the order they were started.
    pub nodes: Vec<Node>,
    /// The load balancer in front of them.
    pub nginx: Nginx,
    url: String,
}

impl Cluster {
    /// `size` development-mode nodes on a fresh database behind nginx. `setup` runs against the first node
    /// before the others start (policies, which a node reads when it starts). `None`, with a skip line, when
    /// this is not the PostgreSQL pass or nginx is not installed.
    pub fn start(test: &str, size: usize, setup: impl FnOnce(&Client)) -> Option<Cluster> {
        if !on_postgres() {
            skip(test, "a cluster needs PostgreSQL (it runs with RUNGUARD_TEST_STORE=postgres)");
            return None;
        }
        let Some(bin) = nginx_bin() else {
            skip(test, "no nginx binary (install Debian's nginx-light, or set RUNGUARD_NGINX)");
            return None;
        };
        let url = fresh_postgres()?.url;
        let named = |i: usize| Node::start_on_postgres(&url, Some(&format!("node_id = \"node-{i}\"\n")));
        let first = named(0);
        setup(&first.client());
        let mut nodes = vec![first];
        nodes.extend((1..size).map(named));
        let addresses: Vec<String> =
            nodes.iter().map(|node| node.base().trim_start_matches("http://").to_owned()).collect();
        let mut nginx = Nginx::configure(&bin, &addresses);
        nginx.start(&bin);
        Some(Cluster { nodes, nginx, url })
    }

    /// A development-mode client through nginx.
    pub fn client(&self) -> Client {
        self.nodes[0].client().at(&self.nginx.base())
    }

    /// Which node answered `resp` (by its `x-runguard-node` header).
    #[track_caller]
    pub fn served_by(&self, resp: &Resp) -> usize {
        let name = resp.header(NODE_HEADER).unwrap_or_else(|| panic!("no {NODE_HEADER} header: {}", resp.text));
        name.strip_prefix("node-")
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|i| *i < self.nodes.len())
            .unwrap_or_else(|| panic!("{NODE_HEADER} `{name}` names no node of the cluster"))
    }

    /// `kill -9` of node `index`.
    pub fn kill(&mut self, index: usize) {
        self.nodes[index].kill();
    }

    /// Starts node `index` again on its port.
    pub fn restart(&mut self, index: usize) {
        self.nodes[index].restart_on_same_port();
    }

    /// `runguard verify` against the cluster's database.
    pub fn verify(&self) -> std::process::Output {
        run_cli(&["verify".as_ref(), "--postgres-url".as_ref(), self.url.as_ref()])
    }
}
