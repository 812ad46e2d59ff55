//! Damage between runs (SPEC §12.9): after a graceful stop the data directory is damaged in one of
//! several ways, and the node must either refuse to start (exit 1, with a message) or serve everything it
//! had acknowledged — never silently less. `runguard verify` exits 1 whenever anything is lost, and never
//! changes the directory. The outcome of each kind is printed (`--nocapture`) and tabled in
//! `docs/reliability.md`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::fixtures::{budget, create_policy, create_run, post, step};
use crate::harness::{Client, Node, copy_dir, run_cli, runguard_bin};

/// What the node had acknowledged: runs with totals and status, each run's decisions, records, policies.
fn acknowledged(client: &Client) -> Value {
    let answer = |path: String| {
        let resp = client.get(&path);
        json!({ "status": resp.status, "body": resp.body })
    };
    let mut runs = BTreeMap::new();
    for n in 0..RUNS {
        let id = format!("run-{n:02}");
        runs.insert(
            id.clone(),
            json!([answer(format!("/v1/runs/{id}")), answer(format!("/v1/runs/{id}/decisions?limit=100"))]),
        );
    }
    json!({
        "runs": runs,
        "records": answer("/v1/prevention-records?limit=100".to_owned()),
        "policies": answer("/v1/policies?limit=100".to_owned()),
    })
}

const RUNS: usize = 12;

/// Writes a few dozen commits: a policy, runs with steps, blocks with prevention records.
fn populate(client: &Client) {
    create_policy(client, &budget("pol_budget", "tokens", 100));
    for n in 0..RUNS {
        let run = format!("run-{n:02}");
        create_run(client, &run);
        step(client, &run, &post(0, 30));
        step(client, &run, &post(1, 30));
        if n % 3 == 0 {
            assert_eq!(step(client, &run, &post(2, 60))["action"], "block");
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    /// One bit of the first stored policy document (written first).
    FlipEarly,
    /// One bit of a run written in the middle.
    FlipMiddle,
    /// One bit of the last run written.
    FlipLate,
    /// The database file cut to half its length.
    Truncate,
    /// The database file deleted.
    DeleteDb,
    /// The acknowledgement watermark deleted.
    DeleteWatermark,
    /// 4 KiB of zeros in the middle of the database file.
    ZeroPage,
    /// sled's configuration file overwritten, so that the database cannot be opened at all.
    GarbageConf,
}

const ALL: [Damage; 8] = [
    Damage::FlipEarly,
    Damage::FlipMiddle,
    Damage::FlipLate,
    Damage::Truncate,
    Damage::DeleteDb,
    Damage::DeleteWatermark,
    Damage::ZeroPage,
    Damage::GarbageConf,
];

fn find(haystack: &[u8], needle: &[u8], last: bool) -> Option<usize> {
    let mut hits = haystack.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i);
    if last { hits.next_back() } else { hits.next() }
}

fn damage(data: &Path, how: Damage) {
    let db = data.join("db");
    let mut bytes = std::fs::read(&db).expect("read db");
    let flip = |bytes: &mut Vec<u8>, needle: &[u8], last: bool| {
        let at = find(bytes, needle, last).unwrap_or_else(|| panic!("`{}` is in db", String::from_utf8_lossy(needle)));
        bytes[at + needle.len() / 2] ^= 0x04;
    };
    match how {
        Damage::FlipEarly => flip(&mut bytes, b"pol_budget", false),
        Damage::FlipMiddle => flip(&mut bytes, b"run-06", false),
        Damage::FlipLate => flip(&mut bytes, b"run-11", true),
        Damage::Truncate => bytes.truncate(bytes.len() / 2),
        Damage::ZeroPage => {
            let start = (bytes.len() / 2) & !4095;
            let end = (start + 4096).min(bytes.len());
            bytes[start..end].fill(0);
        }
        Damage::DeleteDb => {
            std::fs::remove_file(&db).expect("delete db");
            return;
        }
        Damage::GarbageConf => {
            std::fs::write(data.join("conf"), b"not a sled configuration").expect("write conf");
            return;
        }
        Damage::DeleteWatermark => {
            std::fs::remove_file(data.join("runguard.ack")).expect("delete the watermark");
            return;
        }
    }
    std::fs::write(&db, bytes).expect("write db");
}

/// Starts `runguard serve` on `data`: `Ok` once it listens (it is then stopped), `Err((code, stderr))`
/// when it exits first.
fn try_serve(data: &Path, logs: &Path) -> Result<(), (Option<i32>, String)> {
    let log = std::fs::File::create(logs).expect("log file");
    let mut child = Command::new(runguard_bin())
        .env_remove("RUNGUARD_TEST_STORE")
        .args([OsStr::new("serve"), OsStr::new("--listen"), OsStr::new("127.0.0.1:0"), OsStr::new("--data")])
        .arg(data)
        .env_remove("RUNGUARD_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn runguard");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let first = BufReader::new(stdout).lines().next();
        let _ = tx.send(first.and_then(Result::ok));
    });
    let first = rx.recv_timeout(Duration::from_secs(60)).ok().flatten();
    if first.is_some_and(|line| line.starts_with("runguard listening")) {
        let _ = child.kill();
        let _ = child.wait();
        return Ok(());
    }
    let status = child.wait().expect("wait");
    Err((status.code(), std::fs::read_to_string(logs).unwrap_or_default()))
}

fn listing(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_dir() {
            out.extend(listing(&entry.path()));
        } else {
            out.insert(entry.path(), std::fs::read(entry.path()).expect("read"));
        }
    }
    out
}

fn verify(data: &Path) -> (Option<i32>, String) {
    let out = run_cli(&[OsStr::new("verify"), OsStr::new("--data"), data.as_os_str()]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

#[test]
fn damage_between_runs_is_refused_or_harmless_never_a_silent_loss() {
    if crate::harness::sled_only("damage_between_runs_is_refused_or_harmless_never_a_silent_loss") {
        return;
    }
    let mut node = Node::start();
    populate(&node.client());
    let before = acknowledged(&node.client());
    let status = node.terminate();
    assert!(status.success(), "graceful stop: {status}");
    let pristine = tempfile::tempdir().expect("tempdir");
    copy_dir(&node.data_dir(), pristine.path());
    let scratch = tempfile::tempdir().expect("tempdir");

    for how in ALL {
        let data = node.data_dir();
        std::fs::remove_dir_all(&data).expect("clear data");
        copy_dir(pristine.path(), &data);
        damage(&data, how);
        let damaged = listing(&data);
        let (verified, report) = verify(&data);
        assert_eq!(listing(&data), damaged, "{how:?}: verify changed the data directory");
        assert!(matches!(verified, Some(0 | 1)), "{how:?}: verify exit {verified:?}: {report}");
        match try_serve(&data, &scratch.path().join(format!("{how:?}.log"))) {
            Err((code, log)) => {
                let reason = log.lines().find(|l| l.starts_with("runguard:")).unwrap_or_default().to_owned();
                let finding = report.lines().find(|l| l.starts_with("lost:")).unwrap_or_default().to_owned();
                eprintln!("{how:?}: node refused (exit {code:?}) `{reason}`; verify exit {verified:?} `{finding}`");
                assert_eq!(code, Some(1), "{how:?}: a refusal exits 1; log:\n{log}");
                assert!(log.contains("runguard:"), "{how:?}: the refusal names its reason; log:\n{log}");
                assert_eq!(verified, Some(1), "{how:?}: verify must report what the node refuses: {report}");
            }
            Ok(()) => {
                node.restart();
                let after = acknowledged(&node.client());
                node.kill();
                eprintln!("{how:?}: node served; verify exit {verified:?}; complete: {}", after == before);
                assert_eq!(after, before, "{how:?}: the node served with acknowledged data missing");
            }
        }
    }
}
