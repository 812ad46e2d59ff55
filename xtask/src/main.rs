//! The project's task runner (the `cargo xtask` convention: a plain binary in the workspace, run through
//! the alias in `.cargo/config.toml`, so tasks need nothing but cargo).
//!
//! `cargo xtask test` is the test command of README.md: `cargo test --workspace` (the black-box suite on
//! sled), the black-box suite again on PostgreSQL (`RUNGUARD_TEST_STORE=postgres`: each node gets a fresh
//! database of a private server the suite starts from the installed PostgreSQL binaries), then the Python
//! SDK's tests. `cargo xtask blackbox sled|postgres` runs the black-box suite on one backend. The Python side needs only `python3` (override with `PYTHON`): a virtual environment is created
//! under the target directory and the SDK is installed into it with its test extras, at the versions
//! pinned in `clients/python/constraints.txt`. pytest then builds and starts the real `runguard` binary.
//! `cargo xtask test-python` runs only the Python part. `cargo xtask layering` checks that the node's and
//! the engine's modules form no cycle (see `layering.rs`; `cargo test --workspace` runs the check too).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod layering;

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    let result = match task.as_str() {
        "test" => rust_tests().and_then(|()| blackbox("postgres")).and_then(|()| python_tests()),
        "blackbox" => match std::env::args().nth(2).as_deref() {
            Some(store @ ("sled" | "postgres")) => blackbox(store),
            _ => Err("usage: cargo xtask blackbox sled|postgres".to_owned()),
        },
        "test-python" => python_tests(),
        "layering" => layering::check(&workspace()),
        _ => {
            eprintln!("usage: cargo xtask test | blackbox sled|postgres | test-python | layering");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

fn workspace() -> PathBuf {
    // xtask/ sits at the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), PathBuf::from)
}

/// Runs `command` (in the workspace unless it names a directory); an error names it when it cannot start
/// or fails.
fn run(command: &mut Command) -> Result<(), String> {
    if command.get_current_dir().is_none() {
        command.current_dir(workspace());
    }
    let shown = format!("{command:?}");
    let status = command.status().map_err(|err| format!("cannot run {shown}: {err}"))?;
    if status.success() { Ok(()) } else { Err(format!("{shown} failed ({status})")) }
}

fn rust_tests() -> Result<(), String> {
    run(Command::new(cargo()).args(["test", "--workspace"]))
}

/// The black-box suite with every node on `store` (`sled` or `postgres`).
fn blackbox(store: &str) -> Result<(), String> {
    run(Command::new(cargo())
        .args(["test", "-p", "runguard-tests", "--test", "blackbox"])
        .env("RUNGUARD_TEST_STORE", store))
}

fn python_tests() -> Result<(), String> {
    let venv = target_dir().join("py");
    let python = venv.join("bin").join("python");
    if !python.is_file() {
        create_venv(&venv)?;
    }
    install_sdk(&venv, &python)?;
    let sdk = workspace().join("clients").join("python");
    // pytest starts in the SDK's folder to find its configuration (pyproject.toml).
    run(Command::new(&python).args(["-m", "pytest", "-p", "no:cacheprovider"]).current_dir(&sdk))
}

fn system_python() -> OsString {
    std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into())
}

fn create_venv(venv: &Path) -> Result<(), String> {
    let with_pip = Command::new(system_python()).arg("-m").arg("venv").arg(venv).status();
    if with_pip.is_ok_and(|s| s.success()) {
        return Ok(());
    }
    // Some distributions ship python3 without `ensurepip`: a bare venv, filled by the system's pip.
    run(Command::new(system_python()).arg("-m").arg("venv").arg("--without-pip").arg("--clear").arg(venv))
}

/// Installs the SDK (editable) with its test extras when its dependencies changed since the last install.
fn install_sdk(venv: &Path, python: &Path) -> Result<(), String> {
    let sdk = workspace().join("clients").join("python");
    let constraints = sdk.join("constraints.txt");
    let wanted = [sdk.join("pyproject.toml"), constraints.clone()]
        .iter()
        .map(|path| std::fs::read_to_string(path).map_err(|err| format!("cannot read {}: {err}", path.display())))
        .collect::<Result<Vec<_>, _>>()?
        .join("\n");
    let stamp = venv.join("runguard-installed.txt");
    if std::fs::read_to_string(&stamp).is_ok_and(|done| done == wanted) {
        return Ok(());
    }
    let has_pip = Command::new(python).args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success());
    let mut pip = if has_pip {
        let mut command = Command::new(python);
        command.args(["-m", "pip"]);
        command
    } else {
        let mut command = Command::new(system_python());
        command.args(["-m", "pip", "--python"]).arg(python);
        command
    };
    pip.args(["install", "--quiet", "--disable-pip-version-check", "--constraint"])
        .arg(&constraints)
        .arg("--editable")
        .arg(format!("{}[test]", sdk.display()));
    run(&mut pip)?;
    std::fs::write(&stamp, wanted).map_err(|err| format!("cannot write {}: {err}", stamp.display()))
}
