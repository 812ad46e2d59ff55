//! The command line: `policy lint` exit codes, `export` and `verify`.

use std::ffi::OsStr;
use std::path::Path;

use serde_json::{Value, json};

use crate::fixtures::{budget, create_policy, create_run, post, step};
use crate::harness::{Node, run_cli};

fn lint(files: &[&Path]) -> (Option<i32>, String) {
    let mut args = vec![OsStr::new("policy"), OsStr::new("lint")];
    args.extend(files.iter().map(|f| f.as_os_str()));
    let output = run_cli(&args);
    (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[test]
fn policy_lint_exit_codes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let valid_json = write("valid.json", &budget("pol_a", "tokens", 10).to_string());
    let valid_list =
        write("list.json", &json!([budget("pol_a", "tokens", 10), budget("pol_b", "steps", 3)]).to_string());
    let valid_toml = write(
        "valid.toml",
        r#"[[policies]]
id = "pol_a"
name = "tokens"
rule = { kind = "budget", metric = "tokens", per = "run", max = 10 }

[[policies]]
name = "one step a minute"
mode = "shadow"
rule = { kind = "rate", metric = "steps", max = 1, window_s = 60 }
"#,
    );
    let bad_regex = json!({ "name": "n", "rule": { "kind": "content", "target": "output", "patterns": ["("] } });
    let invalid_json = write("invalid.json", &bad_regex.to_string());
    let invalid_toml = write(
        "invalid.toml",
        r#"[[policies]]
name = "fine"
rule = { kind = "budget", metric = "tokens", per = "run", max = 10 }

[[policies]]
name = "bad window"
rule = { kind = "rate", metric = "steps", max = 1, window_s = 0 }
"#,
    );
    let not_json = write("broken.json", "{ \"name\": ");
    let missing = dir.path().join("missing.json");

    assert_eq!(lint(&[&valid_json]).0, Some(0));
    assert_eq!(lint(&[&valid_list]).0, Some(0));
    assert_eq!(lint(&[&valid_toml]).0, Some(0));
    // The three files all give `pol_a`: which would a node get? Refused, naming where it came first.
    let (code, out) = lint(&[&valid_json, &valid_list, &valid_toml]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("list.json[0]: `id` `pol_a` is already the id of the policy in ") && out.contains("valid.json"),
        "{out}"
    );

    let (code, out) = lint(&[&invalid_json]);
    assert_eq!(code, Some(1));
    assert!(out.contains("rule.patterns[0]"), "the problem names the field: {out}");
    let (code, out) = lint(&[&invalid_toml]);
    assert_eq!(code, Some(1));
    assert!(out.contains("rule.window_s"), "{out}");
    assert_eq!(lint(&[&valid_json, &invalid_json]).0, Some(1));
    // A file that does not parse is a finding about that file (1); a file that cannot be read is a usage
    // error (2).
    let (code, out) = lint(&[&not_json]);
    assert_eq!(code, Some(1), "exit {code:?}");
    assert!(out.contains("broken.json"), "{out}");

    assert_eq!(lint(&[&missing]).0, Some(2));
    assert_eq!(lint(&[&valid_json, &missing]).0, Some(2));
    assert_eq!(lint(&[]).0, Some(2), "no files is a usage error");
}

#[test]
fn export_prints_one_json_line_per_record_and_verify_passes() {
    let mut node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_budget", "tokens", 5));
    let mut ids = Vec::new();
    for run in ["run-1", "run-2", "run-3"] {
        create_run(&client, run);
        ids.push(step(&client, run, &post(0, 6))["prevention_record_id"].clone());
    }
    let listed = client.get("/v1/prevention-records").expect(200)["items"].clone();
    node.terminate();

    let output = node.cli(&["export"]);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).expect("utf-8");
    let lines: Vec<Value> =
        stdout.lines().map(|line| serde_json::from_str(line).expect("each line is one JSON record")).collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert_eq!(lines.iter().map(|r| r["id"].clone()).collect::<Vec<_>>(), ids);
    assert_eq!(Value::Array(lines), listed, "export and the API agree");

    let verified = node.cli(&["verify"]);
    assert_eq!(verified.status.code(), Some(0), "{}", String::from_utf8_lossy(&verified.stdout));

    let nowhere = node.data_dir().join("does-not-exist");
    let missing = run_cli(&[OsStr::new("verify"), OsStr::new("--data"), nowhere.as_os_str()]);
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn export_of_an_empty_store_is_empty() {
    let mut node = Node::start();
    node.client().get("/healthz").expect(200);
    node.terminate();
    let output = node.cli(&["export"]);
    assert_eq!(output.status.code(), Some(0));
    assert!(output.stdout.is_empty());
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let node = Node::start();
    let taken = node.base().trim_start_matches("http://").to_owned();
    let data = tempfile::tempdir().expect("temp dir");
    let output = run_cli(&[
        OsStr::new("serve"),
        OsStr::new("--listen"),
        OsStr::new(&taken),
        OsStr::new("--data"),
        data.path().as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot listen on") && stderr.contains("in use"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Runs `runguard ARGS…` with its standard output a pipe whose reader is already gone (`… | head` after
/// `head` exited); returns the exit code and standard error.
fn into_closed_pipe(args: &[&OsStr]) -> (Option<i32>, String) {
    use std::process::{Command, Stdio};
    let mut child = Command::new(crate::harness::runguard_bin())
        .env_remove("RUNGUARD_TEST_STORE")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runguard runs");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("runguard exits");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn writing_into_a_closed_pipe_exits_quietly() {
    let mut node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_budget", "tokens", 5));
    create_run(&client, "run-1");
    step(&client, "run-1", &post(0, 6));
    node.terminate();
    let store = node.store_args();

    for args in [vec!["export"], vec!["export", "--runs"]] {
        let mut argv: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        argv.extend(store.iter().map(std::ffi::OsString::as_os_str));
        let (code, stderr) = into_closed_pipe(&argv);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let runs = dir.path().join("runs.ndjson");
    let exported = node.cli(&["export", "--runs"]);
    std::fs::write(&runs, &exported.stdout).expect("write runs");
    let policy = dir.path().join("policy.json");
    std::fs::write(&policy, budget("pol_candidate", "tokens", 1).to_string()).expect("write policy");
    let (code, stderr) =
        into_closed_pipe(&[OsStr::new("simulate"), OsStr::new("--runs"), runs.as_os_str(), policy.as_os_str()]);
    assert_eq!(code, Some(0), "simulate: {stderr}");
    assert!(stderr.is_empty(), "simulate: {stderr}");
}

#[test]
fn serve_with_closed_output_streams_runs_and_stops_cleanly() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let data = tempfile::tempdir().expect("temp dir");
    // `runguard serve 2>&1 | head` once `head` has exited: both streams lead nowhere.
    let mut child = Command::new(crate::harness::runguard_bin())
        .env_remove("RUNGUARD_TEST_STORE")
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(data.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runguard runs");
    drop((child.stdout.take(), child.stderr.take()));
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if agent.get(&format!("http://127.0.0.1:{port}/healthz")).call().is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(child.try_wait().expect("wait").is_none(), "the node exited early");
        assert!(Instant::now() < deadline, "the node never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Calls that log, with nowhere to log to.
    let created = agent
        .post(&format!("http://127.0.0.1:{port}/v1/runs"))
        .content_type("application/json")
        .send("{}")
        .expect("run");
    assert_eq!(created.status(), 201);
    let sent = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    assert!(sent.is_ok_and(|s| s.success()));
    let status = child.wait().expect("the node exits");
    assert_eq!(status.code(), Some(0), "{status}");
}
