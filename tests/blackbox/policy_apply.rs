//! `runguard policy apply`: declarative sync of policy files to a real node, and `policy lint` as it
//! guards it (every problem, shared ids, standard input).

use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::json;

use crate::fixtures::budget;
use crate::harness::{ACME_OPERATOR, ACME_WORKER, ADMIN, Node, runguard_bin, tokens_config};

/// What a finished `runguard` said: exit code, stdout, stderr.
struct Ran {
    code: Option<i32>,
    out: String,
    err: String,
}

fn runguard(args: &[&OsStr], stdin: Option<&str>) -> Ran {
    let mut command = Command::new(runguard_bin());
    command.args(args).stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    for key in ["RUNGUARD_TOKEN", "RUNGUARD_SERVER", "RUNGUARD_CONFIG", "RUNGUARD_TEST_STORE"] {
        command.env_remove(key);
    }
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("runguard runs");
    if let Some(text) = stdin {
        child.stdin.take().expect("piped stdin").write_all(text.as_bytes()).expect("write stdin");
    }
    let output = child.wait_with_output().expect("runguard finishes");
    Ran {
        code: output.status.code(),
        out: String::from_utf8_lossy(&output.stdout).into_owned(),
        err: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn apply(node: &Node, dir: &Path, token: &str, extra: &[&str]) -> Ran {
    let base = node.base();
    let mut args: Vec<&OsStr> = ["policy", "apply"].iter().map(OsStr::new).collect();
    args.push(dir.as_os_str());
    args.extend([OsStr::new("--server"), OsStr::new(&base), OsStr::new("--token"), OsStr::new(token)]);
    args.extend(extra.iter().map(OsStr::new));
    runguard(&args, None)
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write a policy file");
}

/// Every policy of acme's view, id → version.
fn versions(node: &Node) -> Vec<(String, u64)> {
    let list = node.client_as(ACME_OPERATOR).get("/v1/policies").expect(200).clone();
    let mut out: Vec<(String, u64)> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|p| (p["id"].as_str().unwrap_or_default().to_owned(), p["version"].as_u64().unwrap_or_default()))
        .collect();
    out.sort();
    out
}

#[test]
fn apply_creates_then_changes_nothing_then_updates_only_what_changed() {
    let node = Node::start_with_config(&tokens_config());
    let dir = tempfile::tempdir().expect("temp dir");
    write(dir.path(), "a.json", &budget("pol_a", "tokens", 100).to_string());
    write(
        dir.path(),
        "b.toml",
        "[[policies]]\nid = \"pol_b\"\nname = \"steps\"\nrule = { kind = \"budget\", metric = \"steps\", per = \"run\", max = 5 }\n\n\
         [[policies]]\nid = \"pol_c\"\nname = \"rate\"\nmode = \"shadow\"\nrule = { kind = \"rate\", metric = \"steps\", max = 10, window_s = 60 }\n",
    );
    let secret = ACME_OPERATOR.secret;

    // A dry run prints the plan and changes nothing.
    let dry = apply(&node, dir.path(), secret, &["--dry-run"]);
    assert_eq!(dry.code, Some(0), "{}{}", dry.out, dry.err);
    for id in ["pol_a", "pol_b", "pol_c"] {
        assert!(dry.out.contains(&format!("create {id}")), "{}", dry.out);
    }
    assert!(versions(&node).is_empty(), "a dry run created policies");

    let first = apply(&node, dir.path(), secret, &[]);
    assert_eq!(first.code, Some(0), "{}{}", first.out, first.err);
    let created = versions(&node);
    assert_eq!(created, [("pol_a".into(), 1), ("pol_b".into(), 1), ("pol_c".into(), 1)]);
    let shadow = node.client_as(ACME_OPERATOR).get("/v1/policies/pol_c").expect(200).clone();
    assert_eq!(shadow["mode"], "shadow");

    // The same files again: nothing to do, no version moves.
    let second = apply(&node, dir.path(), secret, &[]);
    assert_eq!(second.code, Some(0), "{}{}", second.out, second.err);
    assert!(second.out.contains("nothing to do"), "{}", second.out);
    assert_eq!(versions(&node), created);

    // One file changes: a dry run shows the field, then exactly that policy gets a new version.
    let mut changed = budget("pol_a", "tokens", 250);
    changed["rule"]["warn_at"] = json!([80]);
    write(dir.path(), "a.json", &changed.to_string());
    let dry = apply(&node, dir.path(), secret, &["--dry-run"]);
    assert_eq!(dry.code, Some(0), "{}{}", dry.out, dry.err);
    assert!(dry.out.contains("update pol_a") && dry.out.contains("rule.max: 100 → 250"), "{}", dry.out);
    assert!(dry.out.contains("unchanged pol_b"), "{}", dry.out);
    assert_eq!(versions(&node), created, "a dry run changed a policy");
    let third = apply(&node, dir.path(), secret, &[]);
    assert_eq!(third.code, Some(0), "{}{}", third.out, third.err);
    assert_eq!(versions(&node), [("pol_a".into(), 2), ("pol_b".into(), 1), ("pol_c".into(), 1)]);
    let pol_a = node.client_as(ACME_OPERATOR).get("/v1/policies/pol_a").expect(200).clone();
    assert_eq!((pol_a["rule"]["max"].as_u64(), pol_a["rule"]["warn_at"].clone()), (Some(250), json!([80])));

    // Disabling is a mode change; removing a file deletes nothing.
    let mut disabled = budget("pol_b", "steps", 5);
    disabled["name"] = json!("steps");
    disabled["mode"] = json!("disabled");
    std::fs::remove_file(dir.path().join("b.toml")).expect("remove");
    write(dir.path(), "b.json", &disabled.to_string());
    let fourth = apply(&node, dir.path(), secret, &[]);
    assert_eq!(fourth.code, Some(0), "{}{}", fourth.out, fourth.err);
    let pol_b = node.client_as(ACME_OPERATOR).get("/v1/policies/pol_b").expect(200).clone();
    assert_eq!((pol_b["mode"].as_str(), pol_b["version"].as_u64()), (Some("disabled"), Some(2)));
    let audit = node.client_as(ACME_OPERATOR).get("/v1/policies/pol_b/audit").expect(200).clone();
    assert!(audit["items"].as_array().is_some_and(|a| a.iter().any(|e| e["reason"] == "policy apply")), "{audit}");
    assert!(versions(&node).iter().any(|(id, _)| id == "pol_c"), "pol_c was deleted");
    assert!(apply(&node, dir.path(), secret, &[]).out.contains("nothing to do"));
}

#[test]
fn apply_refuses_everything_when_a_file_fails_lint() {
    let node = Node::start_with_config(&tokens_config());
    let dir = tempfile::tempdir().expect("temp dir");
    write(dir.path(), "a.json", &budget("pol_a", "tokens", 100).to_string());
    write(dir.path(), "b.json", &json!({ "id": "pol_b", "name": "bad", "rule": { "kind": "rate", "metric": "steps", "max": 1, "window_s": 0 } }).to_string());
    let ran = apply(&node, dir.path(), ACME_OPERATOR.secret, &[]);
    assert_eq!(ran.code, Some(1), "{}{}", ran.out, ran.err);
    assert!(ran.err.contains("rule.window_s") && ran.err.contains("nothing applied"), "{}", ran.err);
    assert!(versions(&node).is_empty(), "a policy was created although a file failed lint");

    // Two files giving one id would make the outcome depend on file order.
    write(dir.path(), "b.json", &budget("pol_a", "steps", 3).to_string());
    let ran = apply(&node, dir.path(), ACME_OPERATOR.secret, &[]);
    assert_eq!(ran.code, Some(1), "{}{}", ran.out, ran.err);
    assert!(ran.err.contains("`pol_a`") && ran.err.contains("a.json"), "{}", ran.err);
    assert!(versions(&node).is_empty());
}

#[test]
fn apply_with_a_wrong_token_or_no_node_says_so_and_exits_2() {
    let node = Node::start_with_config(&tokens_config());
    let dir = tempfile::tempdir().expect("temp dir");
    write(dir.path(), "a.json", &budget("pol_a", "tokens", 100).to_string());
    let wrong = apply(&node, dir.path(), "not-a-token", &[]);
    assert_eq!(wrong.code, Some(2), "{}{}", wrong.out, wrong.err);
    assert!(wrong.err.contains("refused the token (401)"), "{}", wrong.err);
    assert!(!wrong.err.contains("not-a-token"), "the token was echoed: {}", wrong.err);
    // A worker may not write policies: refused too, and nothing changed.
    let worker = apply(&node, dir.path(), ACME_WORKER.secret, &[]);
    assert_eq!(worker.code, Some(2), "{}{}", worker.out, worker.err);
    assert!(worker.err.contains("(403)"), "{}", worker.err);
    assert!(versions(&node).is_empty());

    // A change the token's role may not make is that change refused (exit 1), not a bad token.
    let global = tempfile::tempdir().expect("temp dir");
    let mut doc = budget("pol_global", "tokens", 100);
    doc["scope"] = json!("global");
    write(global.path(), "g.json", &doc.to_string());
    let operator = apply(&node, global.path(), ACME_OPERATOR.secret, &[]);
    assert_eq!(operator.code, Some(1), "{}{}", operator.out, operator.err);
    assert!(operator.err.contains("creating `pol_global`: the node answered 403"), "{}", operator.err);
    let admin = apply(&node, global.path(), ADMIN.secret, &[]);
    assert_eq!(admin.code, Some(0), "{}{}", admin.out, admin.err);
    assert_eq!(versions(&node), [("pol_global".to_owned(), 1)], "acme sees the global policy");

    // A port nothing listens on: this node's, once it is gone.
    let base = node.base();
    drop(node);
    let args: Vec<&OsStr> = vec![
        OsStr::new("policy"),
        OsStr::new("apply"),
        dir.path().as_os_str(),
        OsStr::new("--server"),
        OsStr::new(&base),
    ];
    let gone = runguard(&args, None);
    assert_eq!(gone.code, Some(2), "{}{}", gone.out, gone.err);
    assert!(gone.err.contains("cannot reach the node"), "{}", gone.err);
}

#[test]
fn lint_reports_every_problem_shared_ids_and_reads_standard_input() {
    let dir = tempfile::tempdir().expect("temp dir");
    let many = json!({ "id": "pol_x", "name": "n", "precedence": -1,
        "rule": { "kind": "content", "target": "output", "patterns": ["(", "fine", "[a"] } });
    write(dir.path(), "many.json", &many.to_string());
    let lint = |args: &[&OsStr], stdin: Option<&str>| {
        let mut all: Vec<&OsStr> = vec![OsStr::new("policy"), OsStr::new("lint")];
        all.extend(args);
        runguard(&all, stdin)
    };
    let ran = lint(&[dir.path().join("many.json").as_os_str()], None);
    assert_eq!(ran.code, Some(1), "{}", ran.out);
    for field in ["`precedence`", "`rule.patterns[0]`", "`rule.patterns[2]`"] {
        assert!(ran.out.contains(field), "{field} not reported: {}", ran.out);
    }
    assert!(!ran.out.contains("`rule.patterns[1]`"), "a valid pattern was reported: {}", ran.out);

    // Ids shared across files: the later one is the problem, and both files are named.
    write(dir.path(), "one.json", &budget("pol_same", "tokens", 1).to_string());
    write(dir.path(), "two.json", &budget("pol_same", "steps", 1).to_string());
    let ran = lint(&[dir.path().join("one.json").as_os_str(), dir.path().join("two.json").as_os_str()], None);
    assert_eq!(ran.code, Some(1), "{}", ran.out);
    let line = ran.out.lines().find(|l| l.contains("pol_same")).unwrap_or_default();
    assert!(line.contains("two.json") && line.contains("one.json"), "{}", ran.out);

    // `-` is standard input, JSON or TOML.
    let ran = lint(&[OsStr::new("-")], Some(&budget("pol_in", "tokens", 5).to_string()));
    assert_eq!(ran.code, Some(0), "{}{}", ran.out, ran.err);
    let toml = "[[policies]]\nid = \"pol_t\"\nname = \"t\"\nrule = { kind = \"budget\", metric = \"tokens\", per = \"run\", max = 5 }\n";
    assert_eq!(lint(&[OsStr::new("-")], Some(toml)).code, Some(0));
    let ran = lint(&[OsStr::new("-")], Some("{\"name\": \"n\"}"));
    assert_eq!(ran.code, Some(1), "{}", ran.out);
    assert!(ran.out.contains("(standard input)") && ran.out.contains("`rule`"), "{}", ran.out);

    // A directory stands for its policy files.
    let ok = tempfile::tempdir().expect("temp dir");
    write(ok.path(), "a.json", &budget("pol_1", "tokens", 5).to_string());
    write(ok.path(), "b.toml", toml);
    write(ok.path(), "notes.txt", "not a policy");
    let ran = lint(&[ok.path().as_os_str()], None);
    assert_eq!(ran.code, Some(0), "{}", ran.out);
    assert_eq!(ran.out.lines().count(), 2, "{}", ran.out);
}
