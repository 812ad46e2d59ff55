//! runguard's load generator and measurement helpers (docs/performance.md).
//!
//! - `http`: drives the node and a trivial actix-web baseline (`runguard-baseline`), both started here,
//!   with the same request mix over keep-alive connections at fixed concurrency, alternating between the
//!   two in each repeat; prints medians, the node/baseline ratio and HDR latency percentiles.
//! - `mem`: resident memory of the node holding many idle live runs.
//! - `fill`: bulk-writes durable blocks into a store (for `restart`).
//! - `restart`: time from starting the node over a large store to its first `/readyz` 200.
//! - `calls`: a fixed number of calls of one kind against a node started elsewhere (for instruction counts
//!   under a profiler, which a timed run cannot give).
//!
//! Everything targets 127.0.0.1 only, is bounded in requests and time, and stops the servers it started.

mod client;
mod fill;
mod procs;
mod scenario;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::procs::{Baseline, Server, start_baseline, start_node};
use crate::scenario::{Pace, Sample, Scenario, Shape};

#[derive(Debug, Parser)]
#[command(about = "runguard load generator and measurement helpers")]
struct Args {
    /// Tokio worker threads of the load generator itself (it shares the machine with the server).
    #[arg(long, default_value_t = 1, global = true)]
    client_threads: usize,
    /// Where stores are created (on the disk under test, not a tmpfs).
    #[arg(long, default_value = "target/loadgen", global = true)]
    work_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    /// Allow decisions: whole runs, 4 budgets; then the half-load latency run.
    Allow,
    /// Durable blocks with prevention records.
    Block,
    /// 1,000 runs in flight at once (1,000 connections).
    Concurrent,
    /// Allow decisions under a tenant-scope rate rule (shared tenant window).
    TenantRate,
}

/// The store a node under load keeps its data in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// Embedded sled under the work dir (the default).
    Sled,
    /// A private PostgreSQL server started under the work dir (fsync on, `synchronous_commit = on`), a
    /// fresh database per node.
    Postgres,
}

impl Backend {
    fn label(self) -> &'static str {
        match self {
            Backend::Sled => "node",
            Backend::Postgres => "node (pg)",
        }
    }
}

/// One kind of call for `calls`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Phase {
    /// The block scenario's policies (four budgets and a skill deny list; allow steps stay allowed).
    Policies,
    /// `POST /v1/runs` for each run.
    Create,
    /// Allow step calls: `steps` × (pre, post) per run.
    Steps,
    /// `POST /v1/runs/{id}/end` (succeeded) for each run.
    End,
    /// One blocking pre call per run (a durable block with its prevention record).
    Block,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// HTTP scenarios against the node and the baseline.
    Http {
        /// Scenarios to run (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "allow,block,concurrent,tenant-rate")]
        scenario: Vec<Which>,
        /// Seconds per timed measurement.
        #[arg(long, default_value_t = 8)]
        duration_s: u64,
        /// Measurements per server; figures are medians.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Connections (= runs in flight) for the allow, tenant-rate and block scenarios.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Steps per run (each a pre and a post call).
        #[arg(long, default_value_t = 10)]
        steps: u64,
        /// Runs created, then blocked, per block measurement.
        #[arg(long, default_value_t = 30_000)]
        block_runs: u64,
        /// For the block scenario: start the node over a store already holding this many records (filled
        /// once under the work dir and copied for each node), to see whether blocks slow as the store grows.
        #[arg(long, default_value_t = 0)]
        prefill_records: u64,
        /// Stores to measure the node on, each beside the same baseline (comma-separated); `postgres`
        /// starts a private PostgreSQL server from the installed binaries.
        #[arg(long, value_delimiter = ',', default_value = "sled")]
        store: Vec<Backend>,
    },
    /// A fixed number of calls of one kind against a node already listening at `addr`, each run's calls
    /// in order on one connection; prints what was sent, answered and refused.
    Calls {
        /// The node.
        #[arg(long)]
        addr: SocketAddr,
        /// What to send.
        #[arg(long, value_enum)]
        phase: Phase,
        /// Runs the phase covers (named `<tag>-<i>`).
        #[arg(long, default_value_t = 1_000)]
        runs: u64,
        /// Steps per run for `steps` (each a pre and a post call).
        #[arg(long, default_value_t = 10)]
        steps: u64,
        /// Connections.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Names the runs, so that later phases find the runs an earlier one created.
        #[arg(long, default_value = "c")]
        tag: String,
    },
    /// RSS of the node with many idle live runs.
    Mem {
        /// Live runs to create.
        #[arg(long, default_value_t = 100_000)]
        runs: u64,
        /// Measurements (each on a fresh node); figures are medians.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Connections used to create the runs.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Bulk-write durable blocks into a store.
    Fill {
        /// The store directory.
        #[arg(long)]
        data: PathBuf,
        /// Records the store should hold.
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        /// Blocks per commit.
        #[arg(long, default_value_t = 1_000)]
        batch: u64,
    },
    /// Time to ready after a restart over a store holding many records.
    Restart {
        /// Records in the store (filled once, kept under the work dir for later runs).
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        /// Restarts measured; figures are medians.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.client_threads.max(1)).enable_all().build()?;
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("cannot create the work directory `{}`", args.work_dir.display()))?;
    match args.command {
        Command::Http { scenario, duration_s, repeats, concurrency, steps, block_runs, prefill_records, store } => {
            let duration = Duration::from_secs(duration_s.max(1));
            let shape = Load { duration, repeats: repeats.max(1), concurrency, steps, block_runs, prefill_records };
            let postgres = if store.contains(&Backend::Postgres) {
                let work_dir = std::path::absolute(&args.work_dir)?;
                let cluster = runguard_testpg::Cluster::start_in(&work_dir).context(
                    "`--store postgres` needs the PostgreSQL server binaries (the Debian `postgresql` package)",
                )?;
                Some(cluster.stopped_with_process())
            } else {
                None
            };
            for which in scenario {
                for backend in &store {
                    let on = NodeStore { backend: *backend, postgres: postgres.as_ref() };
                    runtime.block_on(http(&args.work_dir, which, &shape, on))?;
                }
            }
            Ok(())
        }
        Command::Calls { addr, phase, runs, steps, concurrency, tag } => {
            runtime.block_on(calls(addr, phase, runs, steps, concurrency.max(1), &tag))
        }
        Command::Mem { runs, repeats, concurrency } => {
            runtime.block_on(mem(&args.work_dir, runs, repeats.max(1), concurrency))
        }
        Command::Fill { data, records, batch } => fill::fill(&data, records, batch),
        Command::Restart { records, repeats } => runtime.block_on(restart(&args.work_dir, records, repeats.max(1))),
    }
}

fn fresh_node(work_dir: &Path, env: &[(&str, String)]) -> anyhow::Result<(Server, tempfile::TempDir)> {
    fresh_node_over(work_dir, env, None)
}

/// A node over a fresh store, or over a copy of `prefilled`.
fn fresh_node_over(
    work_dir: &Path,
    env: &[(&str, String)],
    prefilled: Option<&Path>,
) -> anyhow::Result<(Server, tempfile::TempDir)> {
    let dir = tempfile::Builder::new().prefix("node-").tempdir_in(work_dir)?;
    let data = dir.path().join("data");
    if let Some(source) = prefilled {
        copy_dir(source, &data).with_context(|| format!("cannot copy the store `{}`", source.display()))?;
    }
    let server = start_node(&data, env, &dir.path().join("node.log"))?;
    Ok((server, dir))
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Where a `http` run's node keeps its data.
#[derive(Clone, Copy, Debug)]
struct NodeStore<'a> {
    backend: Backend,
    /// The private PostgreSQL server, when one of the stores measured is `postgres`.
    postgres: Option<&'a runguard_testpg::Cluster>,
}

impl NodeStore<'_> {
    /// A node over a fresh store: a fresh sled directory (or a copy of `prefilled`), or a fresh database.
    fn start(&self, work_dir: &Path, prefilled: Option<&Path>) -> anyhow::Result<(Server, tempfile::TempDir)> {
        match (self.backend, self.postgres) {
            (Backend::Sled, _) => fresh_node_over(work_dir, &[], prefilled),
            (Backend::Postgres, Some(cluster)) => {
                if prefilled.is_some() {
                    anyhow::bail!(
                        "`--prefill-records` fills a sled store; it is not available with `--store postgres`"
                    );
                }
                // The PostgreSQL client blocks on a runtime of its own, which may not start inside this one.
                let database = std::thread::scope(|scope| scope.spawn(|| cluster.fresh_database()).join())
                    .map_err(|_| anyhow::anyhow!("cannot create a database on the private PostgreSQL server"))?;
                let env = [("RUNGUARD_STORE", "postgres".to_owned()), ("RUNGUARD_POSTGRES_URL", database.url)];
                let (mut node, dir) = fresh_node(work_dir, &env)?;
                node.store_pid = cluster.server_pid();
                Ok((node, dir))
            }
            (Backend::Postgres, None) => anyhow::bail!("no PostgreSQL server was started"),
        }
    }
}

/// What a `http` run drives.
#[derive(Clone, Copy, Debug)]
struct Load {
    duration: Duration,
    repeats: usize,
    concurrency: usize,
    steps: u64,
    block_runs: u64,
    prefill_records: u64,
}

async fn calls(
    addr: SocketAddr,
    phase: Phase,
    runs: u64,
    steps: u64,
    concurrency: usize,
    tag: &str,
) -> anyhow::Result<()> {
    let sample = match phase {
        Phase::Policies => {
            scenario::setup_policies(addr, &scenario::blocking_rules()).await?;
            println!("policies: {} created", scenario::blocking_rules().len());
            return Ok(());
        }
        Phase::Create => scenario::create_runs(addr, concurrency, runs, true, tag).await?,
        Phase::Steps => scenario::steps(addr, concurrency, runs, steps, true, tag).await?,
        Phase::End => scenario::ends(addr, concurrency, runs, true, tag).await?,
        Phase::Block => scenario::blocks(addr, concurrency, runs, true, tag).await?,
    };
    println!(
        "{phase:?}: {} requests ({} decisions, {} blocks), {} errors, {:.1} s",
        sample.requests,
        sample.decisions,
        sample.blocks,
        sample.errors,
        sample.elapsed.as_secs_f64()
    );
    if sample.errors > 0 {
        anyhow::bail!("{} calls were not answered as expected", sample.errors);
    }
    Ok(())
}

fn line(label: &str, sample: &[Sample], rate: impl Fn(&Sample) -> f64) {
    let rates: Vec<f64> = sample.iter().map(&rate).collect();
    let cpu: Vec<f64> = sample.iter().filter_map(Sample::cpu_us_per_request).collect();
    let mut cpu = if cpu.is_empty() { String::new() } else { format!("  server cpu {:>6.1} us/req", median(cpu)) };
    let store_cpu: Vec<f64> = sample.iter().filter_map(Sample::store_cpu_us_per_request).collect();
    if !store_cpu.is_empty() {
        cpu.push_str(&format!("  postgres cpu {:>6.1} us/req", median(store_cpu)));
    }
    println!(
        "  {label:<9} median {:>9.0}/s  (runs: {})  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}{cpu}",
        median(rates.clone()),
        rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(" "),
        median(sample.iter().map(|s| s.ms(0.5)).collect()),
        median(sample.iter().map(|s| s.ms(0.99)).collect()),
        sample.iter().map(|s| s.errors).sum::<u64>(),
    );
}

/// Prints latency percentiles, each the median over the repeats of `samples`.
fn percentiles(label: &str, samples: &[Sample], quantile_ms: impl Fn(&Sample, f64) -> f64) {
    let parts: Vec<String> = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)]
        .iter()
        .map(|(name, q)| format!("{name} {:.2} ms", median(samples.iter().map(|s| quantile_ms(s, *q)).collect())))
        .collect();
    println!("  {label}: {}", parts.join("  "));
}

/// Runs one measurement against `server` and records the CPU time the server spent during it.
async fn with_server_cpu(
    server: &Server,
    measurement: impl std::future::Future<Output = anyhow::Result<Sample>>,
) -> anyhow::Result<Sample> {
    let before = (server.cpu_time(), server.store_cpu_time());
    let mut sample = measurement.await?;
    sample.server_cpu = before.0.zip(server.cpu_time()).map(|(b, a)| a.saturating_sub(b));
    sample.store_cpu = before.1.zip(server.store_cpu_time()).map(|(b, a)| a.saturating_sub(b));
    Ok(sample)
}

async fn http(work_dir: &Path, which: Which, load: &Load, store: NodeStore<'_>) -> anyhow::Result<()> {
    let Load { duration, repeats, concurrency, steps, block_runs, prefill_records } = *load;
    let scenario = match which {
        Which::Allow => {
            Scenario { name: "allow", shape: Shape::Runs { steps }, concurrency, policies: scenario::four_budgets() }
        }
        Which::Concurrent => Scenario {
            name: "concurrent",
            shape: Shape::Runs { steps },
            concurrency: 1_000,
            policies: scenario::four_budgets(),
        },
        Which::TenantRate => Scenario {
            name: "tenant-rate",
            shape: Shape::Runs { steps },
            concurrency,
            policies: scenario::tenant_rate_rules(),
        },
        Which::Block => Scenario {
            name: "block",
            shape: Shape::Blocks { runs: block_runs },
            concurrency,
            policies: scenario::blocking_rules(),
        },
    };
    let prefilled = if which == Which::Block && prefill_records > 0 {
        let filled = work_dir.join(format!("filled-{prefill_records}"));
        fill::fill(&filled, prefill_records, 1_000)?;
        println!("block scenario over a store already holding {prefill_records} records");
        Some(filled)
    } else {
        None
    };
    let (node, _dir) = store.start(work_dir, prefilled.as_deref())?;
    let label = store.backend.label();
    scenario::setup_policies(node.addr, &scenario.policies).await?;
    // The bare endpoint first: every ratio below is to it, and the durable ones say what the disk and sled
    // allow before any of the node's own work. The sled baseline writes as many keys per request as the
    // node writes per call at the least: a step's ledger entry; a block's entry, stopped run, live
    // listing, record and its four indexes.
    let sled_keys = match scenario.shape {
        Shape::Runs { .. } => 1,
        Shape::Blocks { .. } => 8,
    };
    let durable_dirs = (tempfile::tempdir_in(work_dir)?, tempfile::tempdir_in(work_dir)?);
    let bare = start_baseline(2, Baseline::Bare)?;
    let durable = start_baseline(2, Baseline::File(durable_dirs.0.path()))?;
    let sled = start_baseline(2, Baseline::Sled(durable_dirs.1.path(), sled_keys))?;
    let baselines = [("baseline", &bare), ("durable", &durable), ("sled", &sled)];
    println!("baselines: bare; durable = one group-committed append; sled = {sled_keys} sled key(s) per request");
    match scenario.shape {
        Shape::Runs { steps } => {
            println!(
                "scenario {} on {:?}: {} connections, runs of create + {steps} x (pre, post) + end, {repeats} x {} s per server",
                scenario.name,
                store.backend,
                scenario.concurrency,
                duration.as_secs()
            );
            let warm = Duration::from_secs(1);
            for (_, server) in &baselines {
                scenario::runs(server.addr, &scenario, steps, Pace::Closed, warm, false, "warm").await?;
            }
            scenario::runs(node.addr, &scenario, steps, Pace::Closed, warm, true, "warm").await?;
            let mut base: Vec<Vec<Sample>> = baselines.iter().map(|_| Vec::new()).collect();
            let mut ours = Vec::new();
            for r in 0..repeats {
                for ((_, server), samples) in baselines.iter().zip(&mut base) {
                    let run = scenario::runs(server.addr, &scenario, steps, Pace::Closed, duration, false, "b");
                    samples.push(with_server_cpu(server, run).await?);
                }
                let tag = format!("r{r}");
                let run = scenario::runs(node.addr, &scenario, steps, Pace::Closed, duration, true, &tag);
                ours.push(with_server_cpu(&node, run).await?);
            }
            println!("  closed loop, requests per second (every request but the bare baseline's is a durable commit):");
            compare(&baselines, &base, label, &ours, Sample::rate);
            println!(
                "  node decisions/s median {:.0}",
                median(ours.iter().map(|s| s.decisions as f64 / s.elapsed.as_secs_f64()).collect()),
            );
            if which == Which::Allow {
                let rate = median(ours.iter().map(Sample::rate).collect()) / 2.0;
                let pace = Pace::Open { rate };
                // The durable baselines at the same rate, interleaved with the node so that the disk's
                // moods fall on all three alike: what the disk and sled allow the tail before the node's work.
                let durables = [("durable", &durable), ("sled", &sled)];
                let mut half = Vec::new();
                let mut half_durables: Vec<Vec<Sample>> = durables.iter().map(|_| Vec::new()).collect();
                for r in 0..repeats {
                    let tag = format!("h{r}");
                    let run = scenario::runs(node.addr, &scenario, steps, pace, duration, true, &tag);
                    half.push(with_server_cpu(&node, run).await?);
                    for ((_, server), samples) in durables.iter().zip(&mut half_durables) {
                        let run = scenario::runs(server.addr, &scenario, steps, pace, duration, false, "b");
                        samples.push(with_server_cpu(server, run).await?);
                    }
                }
                println!(
                    "  open loop at half the node's median ({rate:.0} requests/s), latency from the scheduled send:"
                );
                line(label, &half, Sample::rate);
                for ((name, _), samples) in durables.iter().zip(&half_durables) {
                    line(name, samples, Sample::rate);
                }
                percentiles("half load (medians over repeats)", &half, Sample::ms);
                percentiles("half load, step calls only", &half, Sample::decision_ms);
                percentiles("half load, run creations and ends", &half, Sample::other_ms);
                for ((name, _), samples) in durables.iter().zip(&half_durables) {
                    percentiles(&format!("half load, {name} baseline"), samples, Sample::ms);
                }
            }
        }
        Shape::Blocks { runs } => {
            println!(
                "scenario block on {:?}: {} connections; per repeat create {runs} runs, then one blocking pre call to each; {repeats} repeats",
                store.backend, scenario.concurrency
            );
            let mut base: Vec<Vec<Sample>> = baselines.iter().map(|_| Vec::new()).collect();
            let (mut ours, mut creates) = (Vec::new(), Vec::new());
            for r in 0..repeats {
                for ((_, server), samples) in baselines.iter().zip(&mut base) {
                    samples.push(block_round(server, scenario.concurrency, runs, false, "b").await?.1);
                }
                let (c, n) = block_round(&node, scenario.concurrency, runs, true, &format!("k{r}")).await?;
                creates.push(c.rate());
                ours.push(n);
            }
            println!("  durable blocks per second (each with its prevention record):");
            compare(&baselines, &base, label, &ours, Sample::block_rate);
            println!("  node run creations/s median {:.0}", median(creates));
        }
    }
    node.stop();
    Ok(())
}

/// Prints each baseline's and the node's rates, then the node's ratio to each baseline and each durable
/// baseline's ratio to the bare one (the first).
fn compare(
    baselines: &[(&str, &Server)],
    base: &[Vec<Sample>],
    label: &str,
    ours: &[Sample],
    rate: impl Fn(&Sample) -> f64 + Copy,
) {
    for ((name, _), samples) in baselines.iter().zip(base) {
        line(name, samples, rate);
    }
    line(label, ours, rate);
    for ((name, _), samples) in baselines.iter().zip(base) {
        ratio_line(&format!("node/{name}"), ours, samples, rate);
    }
    if let Some((bare, durable)) = base.split_first() {
        for ((name, _), samples) in baselines.iter().skip(1).zip(durable) {
            ratio_line(&format!("{name}/baseline"), samples, bare, rate);
        }
    }
}

/// Prints the median of the per-repeat ratios of `over` to `under` (repeat `r` against repeat `r`).
fn ratio_line(label: &str, over: &[Sample], under: &[Sample], rate: impl Fn(&Sample) -> f64) {
    let ratios: Vec<f64> = over.iter().zip(under).map(|(o, u)| rate(o) / rate(u)).collect();
    println!(
        "  ratio {label}: median {:.3}  (runs: {})",
        median(ratios.clone()),
        ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(" ")
    );
}

async fn block_round(
    server: &Server,
    concurrency: usize,
    runs: u64,
    check: bool,
    tag: &str,
) -> anyhow::Result<(Sample, Sample)> {
    let created = scenario::create_runs(server.addr, concurrency, runs, check, tag).await?;
    let blocked = with_server_cpu(server, scenario::blocks(server.addr, concurrency, runs, check, tag)).await?;
    Ok((created, blocked))
}

async fn mem(work_dir: &Path, runs: u64, repeats: usize, concurrency: usize) -> anyhow::Result<()> {
    println!("memory: {runs} idle live runs (4 budgets), {repeats} fresh nodes");
    let env = [
        ("RUNGUARD_RUN_IDLE_S", "86400".to_owned()),
        ("RUNGUARD_LIMITS__LIVE_RUNS", (runs * 2).max(200_000).to_string()),
    ];
    let (mut empty, mut full, mut live) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..repeats {
        let (node, _dir) = fresh_node(work_dir, &env)?;
        scenario::setup_policies(node.addr, &scenario::four_budgets()).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = node.rss_bytes().context("RSS is read from /proc (Linux only)")?;
        let created = scenario::create_runs(node.addr, concurrency, runs, true, &format!("m{r}")).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = node.rss_bytes().context("RSS is read from /proc (Linux only)")?;
        let gauge = scenario::live_runs(node.addr).await?.unwrap_or(f64::NAN);
        println!(
            "  node {r}: RSS {:.1} MiB with policies only, {:.1} MiB with {gauge:.0} live runs ({:.0} runs/s created, {} errors)",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0,
            created.rate(),
            created.errors
        );
        empty.push(before as f64);
        full.push(after as f64);
        live.push(gauge);
        node.stop();
    }
    let (e, f) = (median(empty), median(full));
    println!(
        "  median RSS: {:.1} MiB with {:.0} idle live runs; {:.1} MiB before them (same node); {:.0} bytes per run",
        f / 1048576.0,
        median(live),
        e / 1048576.0,
        (f - e) / runs as f64
    );
    Ok(())
}

async fn restart(work_dir: &Path, records: u64, repeats: usize) -> anyhow::Result<()> {
    let data = work_dir.join(format!("restart-{records}"));
    fill::fill(&data, records, 1_000)?;
    let empty = tempfile::Builder::new().prefix("empty-").tempdir_in(work_dir)?;
    println!("restart: time from spawn to listening and to the first /readyz 200; {repeats} restarts each");
    let (mut big, mut small, mut big_listen) = (Vec::new(), Vec::new(), Vec::new());
    // `fill` writes the store into `data` itself: the node must open that directory, not one below it.
    let empty_data = empty.path().join("data");
    for _ in 0..repeats {
        for (dir, ready, listen) in
            [(data.as_path(), &mut big, &mut big_listen), (empty_data.as_path(), &mut small, &mut Vec::new())]
        {
            let since = Instant::now();
            let node = start_node(dir, &[], &empty.path().join("node.log"))?;
            let took = scenario::wait_ready(node.addr, since).await?;
            ready.push(took.as_secs_f64() * 1000.0);
            listen.push(node.started_in.as_secs_f64() * 1000.0);
            node.stop();
        }
    }
    println!(
        "  {records} records: ready in median {:.0} ms (listening at {:.0} ms; runs: {})",
        median(big.clone()),
        median(big_listen),
        big.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(" ")
    );
    println!(
        "  empty store (baseline): ready in median {:.0} ms; ratio {:.1}",
        median(small.clone()),
        median(big) / median(small)
    );
    Ok(())
}
