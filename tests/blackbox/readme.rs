//! The README's walk-through, performed literally against the real binary: its `curl` commands are read
//! out of README.md (so that the test fails when the README drifts from the node) and sent in order, and
//! what the README says they answer is checked.

use std::path::Path;

use crate::harness::{Node, Resp};

/// One `curl` command: method, path (after `localhost:7070`) and body.
#[derive(Debug)]
struct Curl {
    method: String,
    path: String,
    body: Option<String>,
}

/// The shell words of `script`, one list per command: single quotes, `\` line continuations and `#`
/// comments as a POSIX shell reads them (all the README uses).
fn commands(script: &str) -> Vec<Vec<String>> {
    let (mut commands, mut words, mut word) = (Vec::new(), Vec::new(), None::<String>);
    let mut chars = script.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                let text = word.get_or_insert_with(String::new);
                for quoted in chars.by_ref() {
                    if quoted == '\'' {
                        break;
                    }
                    text.push(quoted);
                }
            }
            '\\' if chars.peek() == Some(&'\n') => {
                chars.next();
            }
            '#' if word.is_none() => {
                while chars.peek().is_some_and(|c| *c != '\n') {
                    chars.next();
                }
            }
            ' ' | '\t' | '\n' => {
                words.extend(word.take());
                if c == '\n' && !words.is_empty() {
                    commands.push(std::mem::take(&mut words));
                }
            }
            other => word.get_or_insert_with(String::new).push(other),
        }
    }
    words.extend(word);
    if !words.is_empty() {
        commands.push(words);
    }
    commands
}

fn curl(words: &[String]) -> Curl {
    let mut curl = Curl { method: "GET".to_owned(), path: String::new(), body: None };
    let mut words = words.iter().skip(1);
    while let Some(word) = words.next() {
        match word.as_str() {
            "-s" => {}
            "-H" => assert_eq!(words.next().map(String::as_str), Some("content-type: application/json")),
            "-d" => curl.body = words.next().cloned(),
            method if method.starts_with("-X") => method.trim_start_matches("-X").clone_into(&mut curl.method),
            url => {
                let path = url.strip_prefix("localhost:7070").unwrap_or_else(|| panic!("unexpected word `{url}`"));
                path.clone_into(&mut curl.path);
            }
        }
    }
    curl
}

/// The `sh` blocks of the README's walk-through section.
fn read_walkthrough() -> (Vec<Curl>, Vec<Vec<String>>) {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(readme).expect("README.md");
    let section = text.split("## A first walk-through").nth(1).expect("the walk-through section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let (mut curls, mut others) = (Vec::new(), Vec::new());
    for block in section.split("```sh\n").skip(1) {
        let script = block.split("```").next().unwrap_or_default();
        for words in commands(script) {
            if words[0] == "curl" {
                curls.push(curl(&words));
            } else {
                others.push(words);
            }
        }
    }
    (curls, others)
}

fn send(node: &Node, curl: &Curl) -> Resp {
    let body = curl.body.as_ref().map(|b| b.clone().into_bytes());
    node.client().send(&curl.method, &curl.path, body).expect("the node answers")
}

#[test]
fn walkthrough() {
    let (curls, others) = read_walkthrough();
    let paths: Vec<(&str, &str)> = curls.iter().map(|c| (c.method.as_str(), c.path.as_str())).collect();
    assert_eq!(
        paths[..7],
        [
            ("POST", "/v1/policies"),
            ("POST", "/v1/runs"),
            ("POST", "/v1/runs/run-1/steps"),
            ("POST", "/v1/runs/run-1/steps"),
            ("POST", "/v1/runs/run-1/steps"),
            ("GET", "/v1/runs/run-1"),
            ("GET", "/v1/prevention-records"),
        ],
        "the walk-through changed: {paths:?}"
    );
    let mut node = Node::start();
    let answers: Vec<Resp> = curls.iter().map(|c| send(&node, c)).collect();
    for (curl, answer) in curls.iter().zip(&answers) {
        assert!((200..300).contains(&answer.status), "{curl:?} answered {}: {}", answer.status, answer.text);
    }
    // What the README's comments say the calls answer.
    assert_eq!(answers[0].body["id"], "pol_budget");
    assert_eq!(answers[1].body["status"], "running");
    assert_eq!(answers[2].body["action"], "allow", "{}", answers[2].text);
    assert_eq!(answers[3].body["action"], "warn", "the 80% tier: {}", answers[3].text);
    assert_eq!(answers[3].body["remaining"]["tokens"], 150, "{}", answers[3].text);
    assert_eq!(answers[4].body["action"], "block", "{}", answers[4].text);
    let record = answers[4].body["prevention_record_id"].as_str().expect("a prevention record id");
    assert!(record.starts_with("prv_"), "{record}");
    assert_eq!(answers[5].body["status"], "stopped");
    assert_eq!(answers[5].body["termination_reason"], "policy_block");
    let records = answers[6].body["items"].as_array().expect("records");
    assert_eq!((records.len(), records[0]["id"].as_str()), (1, Some(record)), "{}", answers[6].text);
    assert!(records[0]["hash"].is_string(), "hash-chained: {}", answers[6].text);
    for answer in &answers[7..] {
        assert!(answer.body.is_object(), "{}", answer.text);
    }
    if let Some(list) = curls.iter().zip(&answers).find(|(c, _)| c.path.starts_with("/v1/runs?")) {
        assert_eq!(list.1.body["items"][0]["run_id"], "run-1", "{}", list.1.text);
    }

    // Stop the node, then check the data offline with the README's `verify` command.
    let verify = others.iter().find(|w| w.iter().any(|w| w == "verify")).expect("the verify command");
    let args = verify.iter().skip_while(|w| *w != "--").skip(1).map(String::as_str).collect::<Vec<_>>();
    assert_eq!(args, ["verify", "--data", "./runguard-data"]);
    assert!(node.terminate().success());
    let output = node.cli(&["verify"]);
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{out}");
    assert!(out.lines().any(|l| l == "ok") && out.contains("records checked: 1"), "{out}");
}

#[test]
fn the_shell_reader_follows_quotes_continuations_and_comments() {
    let script = "# a comment\ncurl -s -XPOST x -d '{\"a\": 1,\n \"b\": 2}'\ncurl -s y \\\n  -d '{}'   # trailing\n";
    let got = commands(script);
    assert_eq!(
        got,
        [vec!["curl", "-s", "-XPOST", "x", "-d", "{\"a\": 1,\n \"b\": 2}"], vec!["curl", "-s", "y", "-d", "{}"]]
    );
}

/// The configuration file shown in docs/operations.md is one the node accepts (unknown keys are errors,
/// so a renamed setting fails here). Its token hash is a placeholder there; any valid one stands in.
#[test]
fn the_operations_guide_configuration_is_accepted() {
    let guide = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
    let text = std::fs::read_to_string(guide).expect("docs/operations.md");
    let config = text.split("```toml\n").nth(1).and_then(|b| b.split("```").next()).expect("the configuration block");
    assert!(config.contains("[limits]") && config.contains("[[tokens]]"), "{config}");
    let config = config.replace("sha256 = \"…\"", &format!("sha256 = \"{}\"", "0".repeat(64)));
    let node = Node::start_with_config(&config);
    node.client().get("/healthz").expect(200);
    node.client().get("/v1/runs").expect_error(401, "unauthorized");
}
