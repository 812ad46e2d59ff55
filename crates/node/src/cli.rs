//! The command line: `serve`, `verify`, `export`, `simulate`, `policy lint`, `policy apply`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use runguard_contract::PolicyLimits;
use runguard_store::{Store, StoreOptions};

use crate::config::{Config, Overrides, StoreKind};

/// runguard: a policy prevention node for LLM agent runs.
#[derive(Debug, Parser)]
#[command(name = "runguard", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node.
    Serve(ServeArgs),
    /// Check every snapshot hash and the prevention record chain offline; exit 1 at the first break.
    Verify(DataArgs),
    /// Write every prevention record (or, with `--runs`, every run with its calls and decisions) as NDJSON
    /// on standard output.
    Export(ExportArgs),
    /// Replay exported runs (`export --runs`) against candidate policy files, offline.
    Simulate(SimulateArgs),
    /// Policy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Bring a PostgreSQL store's schema to this build's version and say which version it is at.
    /// Idempotent. Exit 0 done, 1 the database cannot be migrated (unreachable, or a newer schema), 2 a
    /// usage error.
    Migrate(migrate::MigrateArgs),
    /// Copy a stopped node's sled store into an empty PostgreSQL database (`--from sled:DIR --to
    /// postgres:URL`): policies with every version and audit entry, runs with their ledgers, the record
    /// chain with the same sequence numbers and hashes, and the learning loop; then verify the copy. Exit 0
    /// only when the copy verifies and ends on the source's chain head.
    MigrateStore(migrate::MigrateStoreArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "RUNGUARD_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address (overrides the file and the environment).
    #[arg(long)]
    listen: Option<String>,
    /// Data directory (overrides the file and the environment).
    #[arg(long)]
    data: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct DataArgs {
    /// TOML configuration file (for `data_dir`, or `store` and `postgres_url`).
    #[arg(long, env = "RUNGUARD_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (a sled store).
    #[arg(long, conflicts_with = "postgres_url")]
    data: Option<PathBuf>,
    /// A PostgreSQL store's URL (implies `store = "postgres"`).
    #[arg(long)]
    postgres_url: Option<String>,
}

impl DataArgs {
    fn overrides(self) -> Overrides {
        Overrides { listen: None, data_dir: self.data, postgres_url: self.postgres_url }
    }
}

#[derive(Debug, Args)]
struct ExportArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Export runs with their recorded calls instead of prevention records.
    #[arg(long)]
    runs: bool,
}

#[derive(Debug, Args)]
struct SimulateArgs {
    /// NDJSON file of runs, as `runguard export --runs` writes it.
    #[arg(long)]
    runs: PathBuf,
    /// Candidate policy files (JSON or TOML, as for `policy lint`).
    #[arg(required = true)]
    policies: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate policy files (JSON or TOML; one document or a list) offline: every problem of every
    /// document, and ids that two documents share. Exit 0 valid, 1 a problem, 2 a file cannot be read.
    Lint {
        /// The files; a directory stands for its `.json` and `.toml` files; `-` reads standard input.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Make a node's policies match policy files: create what is new, update what changed, never delete
    /// (mark a policy `"mode": "disabled"` to switch it off). Nothing changes unless every file passes
    /// `policy lint`. Exit 0 done (or nothing to do), 1 a problem in the files or a change the node refused,
    /// 2 a usage error (unreadable file, unreachable node, refused token).
    Apply(apply::ApplyArgs),
    /// Print the JSON Schema (2020-12) of a policy document, for editors and CI checks.
    Schema,
}

const FINDING: u8 = 1;
const USAGE: u8 = 2;

/// `println!` without its panic: a reader that went away (`runguard … | head`) ends the output, not the
/// process with a backtrace.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` without its panic when standard error is closed.
macro_rules! complain {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod apply;
mod lint;
mod migrate;

pub use lint::{lint_document, problems};

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Verify(args) => verify(args),
        Command::Export(args) => with_store(args.data, if args.runs { export_runs } else { export }),
        Command::Simulate(args) => simulate(&args),
        Command::Policy(PolicyCommand::Lint { files }) => lint(&files),
        Command::Policy(PolicyCommand::Apply(args)) => apply::apply(&args),
        Command::Policy(PolicyCommand::Schema) => policy_schema(),
        Command::Migrate(args) => migrate::migrate(args),
        Command::MigrateStore(args) => migrate::migrate_store(&args),
    }
}

fn load_config(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ExitCode> {
    Config::load(file, overrides).map_err(|err| {
        complain!("runguard: {err}");
        ExitCode::from(USAGE)
    })
}

fn serve(args: ServeArgs) -> ExitCode {
    let overrides = Overrides { listen: args.listen, data_dir: args.data, postgres_url: None };
    let config = match load_config(args.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let _log_thread = crate::telemetry::init(config.log_format, &config.log_level, &config.node_id);
    match crate::server::serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "runguard stopped with an error");
            complain!("runguard: {err:#}");
            ExitCode::from(FINDING)
        }
    }
}

fn with_store(args: DataArgs, action: fn(&Store) -> ExitCode) -> ExitCode {
    let config = match load_config(args.config.clone().as_deref(), &args.overrides()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if config.store == StoreKind::Sled && !config.data_dir.is_dir() {
        complain!("runguard: data directory `{}` does not exist", config.data_dir.display());
        return ExitCode::from(USAGE);
    }
    match crate::server::open_store_with(&config, &config.pg_options_read_only()) {
        Ok(store) => action(&store),
        Err(err) => {
            complain!("runguard: {err:#}");
            ExitCode::from(USAGE)
        }
    }
}

/// `verify` works on a copy of a sled data directory (see `Store::verify_dir`), so it never changes it;
/// on PostgreSQL it reads the live database. A store too damaged to open, or behind what it had
/// acknowledged, is a finding (exit 1).
fn verify(args: DataArgs) -> ExitCode {
    let config = match load_config(args.config.clone().as_deref(), &args.overrides()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let report = match (config.store, &config.postgres_url) {
        (StoreKind::Postgres, Some(url)) => match Store::open_postgres(url.expose(), &config.pg_options_read_only()) {
            Ok(store) => store.verify(),
            Err(err) => {
                eprintln!("runguard: cannot open the postgres store at `{url}`: {err}");
                let usage = matches!(
                    err.kind(),
                    runguard_store::StoreErrorKind::Io
                        | runguard_store::StoreErrorKind::NotFound
                        | runguard_store::StoreErrorKind::Schema
                );
                return ExitCode::from(if usage { USAGE } else { FINDING });
            }
        },
        _ => {
            if !config.data_dir.is_dir() {
                eprintln!("runguard: data directory `{}` does not exist", config.data_dir.display());
                return ExitCode::from(USAGE);
            }
            let options = StoreOptions { cache_capacity_bytes: config.store_cache_bytes, fsync: false };
            Store::verify_dir(&config.data_dir, &options)
        }
    };
    match report {
        Ok(report) => print_report(&report),
        Err(err) if err.kind() == runguard_store::StoreErrorKind::Io => {
            eprintln!("runguard: cannot verify the store: {err}");
            ExitCode::from(USAGE)
        }
        Err(err) => {
            eprintln!("runguard: verification could not run: {err}");
            ExitCode::from(FINDING)
        }
    }
}

/// Prints what `verify` found; exit 0 when nothing, 1 otherwise.
fn print_report(report: &runguard_store::VerifyReport) -> ExitCode {
    println!("snapshots checked: {}", report.snapshots_checked);
    println!("records checked: {}", report.records_checked);
    if let Some(lost) = &report.lost {
        println!("lost: {lost}");
    }
    if let Some(broken) = &report.snapshot_break {
        println!("first broken snapshot: {broken}");
    }
    if let Some(broken) = &report.record_break {
        println!("first broken record: {broken}");
    }
    if report.is_ok() {
        println!("ok");
        ExitCode::SUCCESS
    } else {
        ExitCode::from(FINDING)
    }
}

fn export(store: &Store) -> ExitCode {
    write_ndjson("record", store.export_records(1))
}

/// Writes each item as one JSON line on standard output; stops with exit 1 at the first item that cannot
/// be read or encoded.
fn write_ndjson<T: serde::Serialize>(
    what: &str,
    items: impl Iterator<Item = Result<T, runguard_store::StoreError>>,
) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for item in items {
        let line = match item.map(|item| serde_json::to_string(&item)) {
            Ok(Ok(line)) => line,
            Ok(Err(err)) => {
                complain!("runguard: cannot encode a {what}: {err}");
                return ExitCode::from(FINDING);
            }
            Err(err) => {
                complain!("runguard: export stopped at a {what} that cannot be read: {err}");
                return ExitCode::from(FINDING);
            }
        };
        if let Err(err) = writeln!(out, "{line}") {
            return write_failed(&err);
        }
    }
    match out.flush() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => write_failed(&err),
    }
}

/// `runguard policy schema`.
fn policy_schema() -> ExitCode {
    let schema = runguard_contract::schema::policy_document();
    let mut out = std::io::stdout().lock();
    match serde_json::to_writer_pretty(&mut out, &schema).map_err(std::io::Error::from).and_then(|()| writeln!(out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => write_failed(&err),
    }
}

/// A reader that stopped reading (`runguard export | head`) got what it wanted: exit 0 quietly. Any
/// other failure to write is reported.
fn write_failed(err: &std::io::Error) -> ExitCode {
    if err.kind() == std::io::ErrorKind::BrokenPipe {
        return ExitCode::SUCCESS;
    }
    complain!("runguard: cannot write to standard output: {err}");
    ExitCode::from(FINDING)
}

fn export_runs(store: &Store) -> ExitCode {
    let runs = store.all_runs().map(|run| {
        let run = run?;
        let ledger = store.full_ledger(&run.tenant_id, &run.run_id)?;
        Ok(crate::simulation::RecordedRun::from_ledger(&run, &ledger))
    });
    write_ndjson("run", runs)
}

fn simulate(args: &SimulateArgs) -> ExitCode {
    use crate::simulation::{RecordedRun, candidates, simulate};
    let limits = PolicyLimits::default();
    let mut documents = Vec::new();
    for file in &args.policies {
        match read_documents(file) {
            Ok(docs) => documents.extend(docs),
            Err(ReadError::Unreadable(why)) => {
                complain!("runguard: {}: {why}", file.display());
                return ExitCode::from(USAGE);
            }
            Err(ReadError::Invalid(why)) => {
                complain!("runguard: {}: {why}", file.display());
                return ExitCode::from(FINDING);
            }
        }
    }
    let text = match std::fs::read_to_string(&args.runs) {
        Ok(text) => text,
        Err(err) => {
            complain!("runguard: {}: cannot read: {err}", args.runs.display());
            return ExitCode::from(USAGE);
        }
    };
    let mut results = Vec::new();
    for (line_no, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let run: RecordedRun = match runguard_contract::from_json_slice(line.as_bytes()) {
            Ok(run) => run,
            Err(err) => {
                complain!("runguard: {} line {}: {err}", args.runs.display(), line_no + 1);
                return ExitCode::from(USAGE);
            }
        };
        let at =
            run.calls.first().map_or(runguard_contract::Timestamp::from_unix_millis(0), |c| c.decision.evaluated_at);
        let policies = match candidates(documents.clone(), &run.tenant_id, &limits, at) {
            Ok(policies) => policies,
            Err(err) => {
                complain!("runguard: candidate {err}");
                return ExitCode::from(FINDING);
            }
        };
        let snapshot = runguard_contract::Snapshot::capture(&run.tenant_id, &policies);
        let Ok(candidate) = runguard_engine::CompiledSnapshot::compile(&snapshot, &limits).map(std::sync::Arc::new)
        else {
            complain!("runguard: the candidate snapshot cannot be encoded");
            return ExitCode::from(FINDING);
        };
        results.push(simulate(&candidate, &run).0);
    }
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{}", serde_json::json!({ "results": results })).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => write_failed(&err),
    }
}

/// Why a policy file could not be read as documents.
enum ReadError {
    /// The file cannot be read at all (a usage problem: exit 2).
    Unreadable(String),
    /// The file is not valid JSON or TOML, or not shaped as documents (a finding: exit 1).
    Invalid(String),
}

/// Reads a policy file: JSON, or TOML (by extension), holding one document or a list of them (a TOML
/// file lists them as `[[policies]]`). `-` is standard input, read as JSON when it starts like JSON
/// (`{`, or `[` followed by `{` or `]`) and as TOML otherwise.
fn read_documents(path: &Path) -> Result<Vec<serde_json::Value>, ReadError> {
    let stdin = path == Path::new("-");
    let text = if stdin { std::io::read_to_string(std::io::stdin()) } else { std::fs::read_to_string(path) }
        .map_err(|e| ReadError::Unreadable(format!("cannot read: {e}")))?;
    let toml = if stdin {
        let start = text.trim_start();
        let json_list = start.strip_prefix('[').is_some_and(|rest| rest.trim_start().starts_with(['{', ']']));
        !(start.starts_with('{') || json_list)
    } else {
        path.extension().is_some_and(|e| e.eq_ignore_ascii_case("toml"))
    };
    let value: serde_json::Value = if toml {
        let table: toml::Table =
            toml::from_str(&text).map_err(|e| ReadError::Invalid(format!("is not valid TOML: {e}")))?;
        serde_json::to_value(table).map_err(|e| ReadError::Invalid(format!("cannot be read as a document: {e}")))?
    } else {
        runguard_contract::from_json_slice(text.as_bytes()).map_err(|e| ReadError::Invalid(e.to_string()))?
    };
    Ok(match value {
        serde_json::Value::Array(items) => items,
        serde_json::Value::Object(mut object) if object.len() == 1 && object.contains_key("policies") => {
            match object.remove("policies") {
                Some(serde_json::Value::Array(items)) => items,
                _ => return Err(ReadError::Invalid("`policies` must be a list of policy documents".to_owned())),
            }
        }
        other => vec![other],
    })
}

fn lint(paths: &[PathBuf]) -> ExitCode {
    let files = match lint::expand(paths) {
        Ok(files) => files,
        Err(why) => {
            say!("{why}");
            return ExitCode::from(USAGE);
        }
    };
    let checks = lint::check(&files, &PolicyLimits::default(), &mut |line, _| say!("{line}"));
    if checks.unreadable {
        ExitCode::from(USAGE)
    } else if checks.problems > 0 {
        ExitCode::from(FINDING)
    } else {
        ExitCode::SUCCESS
    }
}
