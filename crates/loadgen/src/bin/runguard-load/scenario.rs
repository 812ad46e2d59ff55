//! The HTTP scenarios: a closed loop at fixed concurrency for throughput, an open loop at a fixed rate
//! for latency, each against the node and the trivial baseline in the same run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::client::Conn;

/// What a scenario drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Each connection runs whole runs one after another: create, `steps` × (pre, post), end.
    Runs { steps: u64 },
    /// Untimed: create `runs` runs. Timed: one blocking `pre` call to each (a durable block with its
    /// prevention record).
    Blocks { runs: u64 },
}

/// A named scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub shape: Shape,
    pub concurrency: usize,
    /// Policies created (through the API) before the load.
    pub policies: Vec<Value>,
}

fn budget(id: &str, metric: &str, per: &str, max: u64, warn_at: &[u32]) -> Value {
    let mut rule = json!({ "kind": "budget", "metric": metric, "per": per, "max": max });
    if !warn_at.is_empty() {
        rule["warn_at"] = json!(warn_at);
    }
    json!({ "id": id, "name": format!("budget {id}"), "rule": rule })
}

/// The 4-budget rule set of the engine benchmark (and the peer benchmark): run tokens (warn at 50 and
/// 90 %), run cost, run steps and step tokens. The run mix stays well inside every budget.
pub fn four_budgets() -> Vec<Value> {
    vec![
        budget("b_tokens_run", "tokens", "run", 100_000, &[50, 90]),
        budget("b_cost_run", "cost_micros", "run", 5_000_000, &[]),
        budget("b_steps_run", "steps", "run", 200, &[]),
        budget("b_tokens_step", "tokens", "step", 16_000, &[]),
    ]
}

/// The skill the block scenario's deny rule stops.
pub const BLOCKED_SKILL: &str = "shell.exec";

/// The four budgets plus an active skill deny list (the block scenario).
pub fn blocking_rules() -> Vec<Value> {
    let mut policies = four_budgets();
    policies
        .push(json!({ "id": "deny_shell", "name": "no shell", "rule": { "kind": "skill", "deny": [BLOCKED_SKILL] } }));
    policies
}

/// The four budgets plus a tenant-scope step rate rule that the load never reaches: every call reads and
/// updates the tenant's shared rate window.
pub fn tenant_rate_rules() -> Vec<Value> {
    let mut policies = four_budgets();
    policies.push(json!({ "id": "rate_tenant", "name": "tenant step rate",
        "rule": { "kind": "rate", "metric": "steps", "max": 1_000_000_000u64, "window_s": 60, "scope": "tenant" } }));
    policies
}

const OUTPUT_TEXT: &str = "Found 3 matching documents. The quarterly report lists revenue by region; the summary \
    table shows growth in every region except the north-east, where a supplier change delayed two shipments. \
    Next: fetch the appendix and compare it with last year's figures.";

fn pre(index: u64) -> String {
    json!({ "index": index, "phase": "pre", "skill": "search", "api_endpoint": "/v1/search",
        "input_keys": ["query", "limit"], "input_text": "quarterly revenue by region",
        "estimate": { "tokens": 800, "cost_micros": 1200 } })
    .to_string()
}

fn post(index: u64) -> String {
    json!({ "index": index, "phase": "post", "usage": { "tokens": 812, "cost_micros": 1180, "duration_ms": 950 },
        "output_text": OUTPUT_TEXT })
    .to_string()
}

fn block_call() -> String {
    json!({ "index": 0, "phase": "pre", "skill": BLOCKED_SKILL, "input_keys": ["cmd"] }).to_string()
}

/// What one measurement saw.
pub struct Sample {
    pub requests: u64,
    pub decisions: u64,
    pub blocks: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// CPU time the server used during the measurement, when it was read.
    pub server_cpu: Option<Duration>,
    /// CPU time the node's PostgreSQL server (postmaster and backends) used during the measurement, for a
    /// node on PostgreSQL.
    pub store_cpu: Option<Duration>,
    /// Latency in microseconds.
    pub latency: Histogram<u64>,
    /// Latency of the step calls alone (decisions), in microseconds.
    pub decision_latency: Histogram<u64>,
    /// Latency of the other calls (run creation and end), in microseconds.
    pub other_latency: Histogram<u64>,
}

impl Sample {
    fn new() -> Self {
        Self {
            requests: 0,
            decisions: 0,
            blocks: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            server_cpu: None,
            store_cpu: None,
            latency: latency_histogram(),
            decision_latency: latency_histogram(),
            other_latency: latency_histogram(),
        }
    }

    fn merge(&mut self, other: &Sample) {
        self.requests += other.requests;
        self.decisions += other.decisions;
        self.blocks += other.blocks;
        self.errors += other.errors;
        let _ = self.latency.add(&other.latency);
        let _ = self.decision_latency.add(&other.decision_latency);
        let _ = self.other_latency.add(&other.other_latency);
    }

    /// Requests per second.
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Blocks per second.
    pub fn block_rate(&self) -> f64 {
        self.blocks as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Server CPU microseconds per request, when the server's CPU time was read.
    pub fn cpu_us_per_request(&self) -> Option<f64> {
        let cpu = self.server_cpu?;
        (self.requests > 0).then(|| cpu.as_secs_f64() * 1e6 / self.requests as f64)
    }

    /// PostgreSQL CPU microseconds per request, when the node runs on PostgreSQL.
    pub fn store_cpu_us_per_request(&self) -> Option<f64> {
        let cpu = self.store_cpu?;
        (self.requests > 0).then(|| cpu.as_secs_f64() * 1e6 / self.requests as f64)
    }

    /// A latency quantile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// A latency quantile of the step calls alone, in milliseconds.
    pub fn decision_ms(&self, q: f64) -> f64 {
        self.decision_latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// A latency quantile of run creations and ends, in milliseconds.
    pub fn other_ms(&self, q: f64) -> f64 {
        self.other_latency.value_at_quantile(q) as f64 / 1000.0
    }
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).unwrap_or_else(|_| unreachable!("valid bounds"))
}

/// How requests are paced.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// As fast as answers come back.
    Closed,
    /// `rate` requests per second in total, spread over the connections; latency counts from the
    /// scheduled send time (no coordinated omission).
    Open { rate: f64 },
}

struct Worker {
    conn: Conn,
    sample: Sample,
    /// Whether answers are checked (the node); the baseline answers a constant.
    check: bool,
    pace: Pace,
    next_send: Instant,
    interval: Duration,
}

impl Worker {
    async fn call(&mut self, path: &str, body: String, expect: &[u8], decision: bool) -> anyhow::Result<()> {
        let scheduled = match self.pace {
            Pace::Closed => Instant::now(),
            Pace::Open { .. } => {
                let at = self.next_send;
                self.next_send += self.interval;
                tokio::time::sleep_until(at.into()).await;
                at
            }
        };
        let answer = self.conn.post(path, body).await?;
        let took = (scheduled.elapsed().as_micros() as u64).max(1);
        self.sample.requests += 1;
        let _ = self.sample.latency.record(took);
        let _ =
            if decision { self.sample.decision_latency.record(took) } else { self.sample.other_latency.record(took) };
        if self.check {
            if !(200..300).contains(&answer.status) || !answer.contains(expect) {
                self.sample.errors += 1;
                if self.sample.errors <= 3 {
                    eprintln!(
                        "unexpected answer {} to {path}: {}",
                        answer.status,
                        String::from_utf8_lossy(&answer.body)
                    );
                }
            } else if decision {
                self.sample.decisions += 1;
                if answer.contains(br#""action":"block""#) {
                    self.sample.blocks += 1;
                }
            }
        } else if decision {
            self.sample.decisions += 1;
            if expect == br#""action":"block""# {
                self.sample.blocks += 1;
            }
        }
        Ok(())
    }
}

async fn open_workers(addr: SocketAddr, n: usize, check: bool, pace: Pace) -> anyhow::Result<Vec<Worker>> {
    let mut workers = Vec::with_capacity(n);
    let interval = match pace {
        Pace::Closed => Duration::ZERO,
        Pace::Open { rate } => Duration::from_secs_f64(n as f64 / rate.max(1.0)),
    };
    let start = Instant::now() + Duration::from_millis(50);
    for i in 0..n {
        let offset = interval.mul_f64(i as f64 / n as f64);
        workers.push(Worker {
            conn: Conn::open(addr).await?,
            sample: Sample::new(),
            check,
            pace,
            next_send: start + offset,
            interval,
        });
    }
    Ok(workers)
}

/// Runs whole runs on every connection until `duration` has passed (runs in flight then finish, but
/// only requests answered within the window count).
pub async fn runs(
    addr: SocketAddr,
    scenario: &Scenario,
    steps: u64,
    pace: Pace,
    duration: Duration,
    check: bool,
    tag: &str,
) -> anyhow::Result<Sample> {
    let workers = open_workers(addr, scenario.concurrency, check, pace).await?;
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for (w, mut worker) in workers.into_iter().enumerate() {
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            'runs: while Instant::now() < deadline {
                let run = format!("{tag}-{w}-{seq}");
                seq += 1;
                worker.call("/v1/runs", json!({ "run_id": run }).to_string(), br#""status":"running""#, false).await?;
                let path = format!("/v1/runs/{run}/steps");
                for index in 0..steps {
                    if Instant::now() >= deadline {
                        break 'runs;
                    }
                    worker.call(&path, pre(index), br#""action":"allow""#, true).await?;
                    worker.call(&path, post(index), br#""action":"allow""#, true).await?;
                }
                worker
                    .call(&format!("/v1/runs/{run}/end"), r#"{"outcome":"succeeded"}"#.to_owned(), b"succeeded", false)
                    .await?;
            }
            anyhow::Ok(worker.sample)
        }));
    }
    merged(tasks, started).await
}

/// Waits for every connection's task and merges their samples; `elapsed` is measured from `started`.
async fn merged(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Sample>>>,
    started: Instant,
) -> anyhow::Result<Sample> {
    let mut total = Sample::new();
    for task in tasks {
        total.merge(&task.await??);
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

/// One request of a striped batch: path, body, the bytes a good answer contains, and whether it is a
/// decision.
type Request = (String, String, &'static [u8], bool);

/// Sends `request(i)` for every `i` in `0..count`, striped over the scenario's connections (connection `w`
/// sends `w`, `w + n`, …); answers the merged sample and how long it took.
async fn striped(
    addr: SocketAddr,
    concurrency: usize,
    count: u64,
    check: bool,
    request: impl Fn(u64) -> Request + Clone + Send + 'static,
) -> anyhow::Result<Sample> {
    let workers = open_workers(addr, concurrency, check, Pace::Closed).await?;
    let started = Instant::now();
    let n = workers.len() as u64;
    let mut tasks = Vec::new();
    for (w, mut worker) in workers.into_iter().enumerate() {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w as u64;
            while i < count {
                let (path, body, expect, decision) = request(i);
                worker.call(&path, body, expect, decision).await?;
                i += n;
            }
            anyhow::Ok(worker.sample)
        }));
    }
    merged(tasks, started).await
}

/// Creates `runs` runs over the scenario's connections; answers how long it took.
pub async fn create_runs(
    addr: SocketAddr,
    concurrency: usize,
    runs: u64,
    check: bool,
    tag: &str,
) -> anyhow::Result<Sample> {
    let tag = tag.to_owned();
    striped(addr, concurrency, runs, check, move |i| {
        let body = json!({ "run_id": format!("{tag}-{i}") }).to_string();
        ("/v1/runs".to_owned(), body, br#""status":"running""#.as_slice(), false)
    })
    .await
}

/// Sends the blocking call to each of the `runs` runs created by [`create_runs`] with the same tag.
pub async fn blocks(addr: SocketAddr, concurrency: usize, runs: u64, check: bool, tag: &str) -> anyhow::Result<Sample> {
    let tag = tag.to_owned();
    striped(addr, concurrency, runs, check, move |i| {
        (format!("/v1/runs/{tag}-{i}/steps"), block_call(), br#""action":"block""#.as_slice(), true)
    })
    .await
}

/// Sends `steps` × (`pre`, `post`) allow calls to each of the `runs` runs created by [`create_runs`] with the
/// same tag, each run's calls in order on one connection (runs striped over the connections).
pub async fn steps(
    addr: SocketAddr,
    concurrency: usize,
    runs: u64,
    steps: u64,
    check: bool,
    tag: &str,
) -> anyhow::Result<Sample> {
    let workers = open_workers(addr, concurrency, check, Pace::Closed).await?;
    let started = Instant::now();
    let n = workers.len() as u64;
    let mut tasks = Vec::new();
    for (w, mut worker) in workers.into_iter().enumerate() {
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut i = w as u64;
            while i < runs {
                let path = format!("/v1/runs/{tag}-{i}/steps");
                for index in 0..steps {
                    worker.call(&path, pre(index), br#""action":"allow""#, true).await?;
                    worker.call(&path, post(index), br#""action":"allow""#, true).await?;
                }
                i += n;
            }
            anyhow::Ok(worker.sample)
        }));
    }
    merged(tasks, started).await
}

/// Ends each of the `runs` runs created by [`create_runs`] with the same tag (succeeded).
pub async fn ends(addr: SocketAddr, concurrency: usize, runs: u64, check: bool, tag: &str) -> anyhow::Result<Sample> {
    let tag = tag.to_owned();
    striped(addr, concurrency, runs, check, move |i| {
        (format!("/v1/runs/{tag}-{i}/end"), r#"{"outcome":"succeeded"}"#.to_owned(), b"succeeded".as_slice(), false)
    })
    .await
}

/// Creates the scenario's policies on the node.
pub async fn setup_policies(addr: SocketAddr, policies: &[Value]) -> anyhow::Result<()> {
    let mut conn = Conn::open(addr).await?;
    for policy in policies {
        let answer = conn.post("/v1/policies", policy.to_string()).await?;
        if answer.status != 201 {
            bail!(
                "creating policy {} answered {}: {}",
                policy["id"],
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
        }
    }
    Ok(())
}

/// The node's `runguard_live_runs` gauge.
pub async fn live_runs(addr: SocketAddr) -> anyhow::Result<Option<f64>> {
    let mut conn = Conn::open(addr).await?;
    let answer = conn.get("/metrics").await?;
    let text = String::from_utf8_lossy(&answer.body);
    Ok(text
        .lines()
        .find(|l| l.starts_with("runguard_live_runs"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok()))
}

/// Waits until `/readyz` answers 200; answers how long that took from `since`.
pub async fn wait_ready(addr: SocketAddr, since: Instant) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(mut conn) = Conn::open(addr).await
            && let Ok(answer) = conn.get("/readyz").await
            && answer.status == 200
        {
            return Ok(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    bail!("the node did not become ready within 120 s")
}
