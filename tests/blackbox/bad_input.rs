//! Bad input: malformed JSON, unknown fields, negative and fractional numbers, body limits, media types.

use serde_json::json;

use crate::fixtures::{create_run, post, step};
use crate::harness::{Client, Node};

#[track_caller]
fn step_field(client: &Client, body: &str) -> String {
    let resp = client.send("POST", "/v1/runs/run-x/steps", Some(body.as_bytes().to_vec())).expect("transport");
    resp.expect_error(400, "invalid_request")["field"].as_str().expect("details.field").to_owned()
}

#[test]
fn bad_step_bodies_are_400_naming_the_field() {
    let node = Node::start();
    let client = node.client();
    create_run(&client, "run-x");
    for malformed in ["{\"index\": 0,", "not json", "[1, 2", "{\"index\": 0, \"phase\": \"post\"}}"] {
        let resp = client.send("POST", "/v1/runs/run-x/steps", Some(malformed.as_bytes().to_vec())).expect("transport");
        resp.expect_error(400, "invalid_request");
    }
    assert_eq!(step_field(&client, r#"{"index":0,"phase":"post","bogus":1}"#), "bogus");
    assert_eq!(step_field(&client, r#"{"index":0,"phase":"post","usage":{"tokens":1,"extra":2}}"#), "usage.extra");
    assert_eq!(step_field(&client, r#"{"index":0,"phase":"post","usage":{"tokens":-1}}"#), "usage.tokens");
    assert_eq!(step_field(&client, r#"{"index":0,"phase":"post","usage":{"tokens":1.5}}"#), "usage.tokens");
    assert_eq!(step_field(&client, r#"{"index":0,"phase":"post","usage":{"cost_micros":1e3}}"#), "usage.cost_micros");
    assert_eq!(step_field(&client, r#"{"index":0,"phase":"post","usage":{"tokens":"7"}}"#), "usage.tokens");
    assert_eq!(step_field(&client, r#"{"index":-1,"phase":"post"}"#), "index");
    assert_eq!(step_field(&client, r#"{"index":0.5,"phase":"post"}"#), "index");
    assert_eq!(step_field(&client, r#"{"index":0,"phase":"during"}"#), "phase");
    assert_eq!(step_field(&client, r#"{"index":0,"phase":"pre","estimate":{"tokens":-3}}"#), "estimate.tokens");
    assert_eq!(step_field(&client, r#"{"index":0,"phase":"pre","usage":{"tokens":1}}"#), "usage");
    assert_eq!(step_field(&client, r#"{"index":0,"phase":"post","estimate":{"tokens":1}}"#), "estimate");
    // Nothing of that reached the run.
    let run = client.get("/v1/runs/run-x").expect(200).clone();
    assert_eq!(run["next"], json!({ "index": 0, "phase": "pre" }));
    assert_eq!(step(&client, "run-x", &post(0, 1))["action"], "allow");
}

#[test]
fn bad_run_and_end_bodies_are_400() {
    let node = Node::start();
    let client = node.client();
    let resp = client.post("/v1/runs", &json!({ "run_id": "r", "colour": "red" }));
    assert_eq!(resp.expect_error(400, "invalid_request")["field"], "colour");
    let resp = client.post("/v1/runs", &json!({ "run_id": "has space" }));
    assert_eq!(resp.expect_error(400, "invalid_request")["field"], "run_id");
    let resp = client.send("POST", "/v1/runs", Some(b"{\"run_id\":".to_vec())).expect("transport");
    resp.expect_error(400, "invalid_request");
    create_run(&client, "run-end");
    let resp = client.post("/v1/runs/run-end/end", &json!({ "outcome": "maybe" }));
    assert_eq!(resp.expect_error(400, "invalid_request")["field"], "outcome");
    assert_eq!(client.get("/v1/runs/run-end").expect(200)["status"], "running");
    let resp = client.send("POST", "/v1/policies", Some(b"{\"name\": ".to_vec())).expect("transport");
    resp.expect_error(400, "invalid_request");
}

#[test]
fn non_json_content_types_are_refused() {
    let node = Node::start();
    let client = node.client();
    create_run(&client, "run-ct");
    let body = post(0, 1).to_string().into_bytes();
    let resp = client
        .send_with("POST", "/v1/runs/run-ct/steps", Some(body), &[("content-type", "text/plain")])
        .expect("transport");
    resp.expect_error(415, "unsupported_media_type");
}

fn padded_step(len: usize) -> Vec<u8> {
    let mut body = post(0, 1).to_string().into_bytes();
    body.resize(len, b' ');
    body
}

#[test]
fn bodies_over_the_configured_limit_are_413() {
    let node = Node::start_with_config("[limits]\nbody_bytes = 4096\n");
    let client = node.client();
    create_run(&client, "run-big");
    let resp = client.send("POST", "/v1/runs/run-big/steps", Some(padded_step(5000))).expect("transport");
    let details = resp.expect_error(413, "body_too_large");
    assert_eq!(details["limit_bytes"], 4096);
    let big_policy =
        json!({ "name": "x".repeat(5000), "rule": { "kind": "budget", "metric": "tokens", "per": "run", "max": 1 } });
    client.post("/v1/policies", &big_policy).expect_error(413, "body_too_large");
    // Nothing was applied; a body within the limit is accepted.
    assert_eq!(client.get("/v1/runs/run-big").expect(200)["totals"]["steps"], 0);
    let resp = client.send("POST", "/v1/runs/run-big/steps", Some(padded_step(4096))).expect("transport");
    assert_eq!(resp.expect(200)["action"], "allow");
}

#[test]
fn the_default_limit_is_one_mebibyte() {
    let node = Node::start();
    let client = node.client();
    create_run(&client, "run-big");
    let resp = client.send("POST", "/v1/runs/run-big/steps", Some(padded_step(2 * 1024 * 1024))).expect("transport");
    resp.expect_error(413, "body_too_large");
    // Just under 1 MiB is still read (and then judged on its content).
    let resp = client.send("POST", "/v1/runs/run-big/steps", Some(padded_step(1024 * 1024 - 16))).expect("transport");
    assert_eq!(resp.expect(200)["action"], "allow");
}

/// SPEC §12.6: an array never stands in for an object, and a key given twice in any JSON body is invalid;
/// SPEC §12.3: integers above 2^53 − 1 are invalid. All 400, naming the field, and nothing is applied.
#[test]
fn arrays_repeated_keys_and_unsafe_integers_are_400_naming_the_field() {
    let node = Node::start();
    let client = node.client();
    create_run(&client, "run-x");
    assert_eq!(step_field(&client, r#"{"index":0,"phase":"post","usage":[500,0,0]}"#), "usage");
    let resp = client.send("POST", "/v1/runs/run-x/steps", Some(br#"[0,"post"]"#.to_vec())).expect("transport");
    resp.expect_error(400, "invalid_request");
    assert_eq!(step_field(&client, r#"{"index":0,"phase":"post","phase":"pre"}"#), "phase");
    assert_eq!(step_field(&client, r#"{"index":0,"phase":"post","usage":{"tokens":1,"tokens":2}}"#), "usage.tokens");
    assert_eq!(
        step_field(&client, r#"{"index":0,"phase":"post","usage":{"tokens":9007199254740992}}"#),
        "usage.tokens"
    );
    assert_eq!(
        step_field(&client, r#"{"index":0,"phase":"post","usage":{"tokens":18446744073709551615}}"#),
        "usage.tokens"
    );
    // A zero fraction is not an integer.
    assert_eq!(step_field(&client, r#"{"index":0,"phase":"post","usage":{"tokens":2.0}}"#), "usage.tokens");
    assert_eq!(client.get("/v1/runs/run-x").expect(200)["totals"]["steps"], 0, "nothing was applied");
    let largest = br#"{"index":0,"phase":"post","usage":{"tokens":9007199254740991}}"#.to_vec();
    let resp = client.send("POST", "/v1/runs/run-x/steps", Some(largest)).expect("transport");
    assert_eq!(resp.expect(200)["action"], "allow");
    assert_eq!(client.get("/v1/runs/run-x").expect(200)["totals"]["tokens"], 9_007_199_254_740_991u64);

    // Policy documents: the repeated `mode` is refused, not read as its last value; nothing is stored.
    let send_policy = |body: &str| {
        let resp = client.send("POST", "/v1/policies", Some(body.as_bytes().to_vec())).expect("transport");
        resp.expect_error(400, "invalid_request")["field"].as_str().unwrap_or_default().to_owned()
    };
    let budget =
        |max: &str| format!(r#"{{"name":"b","rule":{{"kind":"budget","metric":"tokens","per":"run","max":{max}}}}}"#);
    assert_eq!(
        send_policy(r#"{"name":"b","mode":"active","mode":"disabled","rule":{"kind":"expr","cel":"run.tokens > 5"}}"#),
        "mode"
    );
    assert_eq!(send_policy(&budget("18446744073709551615")), "rule.max");
    assert_eq!(send_policy(&budget("9007199254740992")), "rule.max");
    assert_eq!(send_policy(&budget("2.0")), "rule.max");
    assert_eq!(send_policy(r#"{"name":"b","rule":["budget","tokens","run",5]}"#), "rule");
    assert_eq!(client.get("/v1/policies").expect(200)["items"], json!([]));
    let resp = client.send("POST", "/v1/policies", Some(budget("9007199254740991").into_bytes())).expect("transport");
    assert_eq!(resp.expect(201)["rule"]["max"], 9_007_199_254_740_991u64);

    // Run bodies.
    let resp = client.send("POST", "/v1/runs", Some(br#"{"run_id":"r1","run_id":"r2"}"#.to_vec())).expect("transport");
    assert_eq!(resp.expect_error(400, "invalid_request")["field"], "run_id");
    let resp = client
        .send("POST", "/v1/runs", Some(br#"{"run_id":"r3","labels":{"a":"1","a":"2"}}"#.to_vec()))
        .expect("transport");
    assert_eq!(resp.expect_error(400, "invalid_request")["field"], "labels.a");
    let resp = client.send("POST", "/v1/runs", Some(br#"{"labels":["a"]}"#.to_vec())).expect("transport");
    assert_eq!(resp.expect_error(400, "invalid_request")["field"], "labels");
    client.get("/v1/runs/r1").expect_error(404, "not_found");
}

/// SPEC §12.6: every text field has a configured length limit, the `error` of an end body included.
#[test]
fn end_bodies_are_read_strictly_and_their_error_texts_are_limited() {
    let node = Node::start_with_config("[limits.step]\nmax_field_len = 64\n");
    let client = node.client();
    create_run(&client, "run-end");
    let end = |body: &str| {
        let resp = client.send("POST", "/v1/runs/run-end/end", Some(body.as_bytes().to_vec())).expect("transport");
        resp.expect_error(400, "invalid_request")["field"].as_str().unwrap_or_default().to_owned()
    };
    let long = "x".repeat(65);
    assert_eq!(end(&format!(r#"{{"outcome":"failed","error":{{"message":"{long}"}}}}"#)), "error.message");
    assert_eq!(end(&format!(r#"{{"outcome":"failed","error":{{"type":"{long}"}}}}"#)), "error.type");
    assert_eq!(end(&format!(r#"{{"outcome":"failed","error":{{"code":"{long}"}}}}"#)), "error.code");
    assert_eq!(end(r#"{"outcome":"failed","outcome":"succeeded"}"#), "outcome");
    assert_eq!(end(r#"{"outcome":"failed","error":["timeout"]}"#), "error");
    assert_eq!(client.get("/v1/runs/run-end").expect(200)["status"], "running", "nothing was applied");
    let fits = "x".repeat(64);
    let body = format!(r#"{{"outcome":"failed","error":{{"type":"timeout","message":"{fits}"}}}}"#);
    let resp = client.send("POST", "/v1/runs/run-end/end", Some(body.into_bytes())).expect("transport");
    assert_eq!(resp.expect(200)["run"]["status"], "failed");
}

pub fn lint(files: &[&std::path::Path]) -> (Option<i32>, String) {
    let mut args = vec![std::ffi::OsStr::new("policy"), std::ffi::OsStr::new("lint")];
    args.extend(files.iter().map(|f| f.as_os_str()));
    let output = crate::harness::run_cli(&args);
    (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `runguard policy lint` applies the same checks as the node: repeated keys, unsafe integers (JSON and
/// TOML), and CEL typos and non-literal regexes are findings naming the field.
#[test]
fn policy_lint_refuses_what_the_node_refuses() {
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let cases = [
        (
            write(
                "repeated.json",
                r#"{"name":"b","mode":"active","mode":"disabled","rule":{"kind":"expr","cel":"true"}}"#,
            ),
            "`mode`",
        ),
        (
            write(
                "huge.json",
                r#"{"name":"b","rule":{"kind":"budget","metric":"tokens","per":"run","max":18446744073709551615}}"#,
            ),
            "`rule.max`",
        ),
        (
            write(
                "huge.toml",
                "name = \"b\"\n[rule]\nkind = \"budget\"\nmetric = \"tokens\"\nper = \"run\"\nmax = 9007199254740992\n",
            ),
            "`rule.max`",
        ),
        (write("repeated.toml", "name = \"b\"\nname = \"c\"\n"), "TOML"),
        (write("typo.json", r#"{"name":"b","rule":{"kind":"expr","cel":"rn.tokens > 5"}}"#), "`rule.cel`"),
        (write("nofn.json", r#"{"name":"b","rule":{"kind":"expr","cel":"nosuchfn(run.tokens)"}}"#), "`rule.cel`"),
        (write("nonbool.json", r#"{"name":"b","rule":{"kind":"expr","cel":"run.tokens + 1"}}"#), "`rule.cel`"),
        (
            write(
                "regex.json",
                r#"{"name":"b","rule":{"kind":"expr","cel":"has(step.output_text) && step.output_text.matches(step.output_text)"}}"#,
            ),
            "`rule.cel`",
        ),
    ];
    for (path, says) in &cases {
        let (code, out) = lint(&[path]);
        assert_eq!(code, Some(1), "{}: {out}", path.display());
        assert!(out.contains(says), "{}: {out}", path.display());
    }
    let fine = write(
        "fine.json",
        r#"{"name":"b","rule":{"kind":"expr","cel":"has(step.skill) && step.skill.matches('^sh')"}}"#,
    );
    assert_eq!(lint(&[&fine]).0, Some(0));
}

/// SPEC §12.6: labels, a mode change's reason and a regret's note are limited by configuration too, and a
/// refused run creation leaves no run behind.
#[test]
fn label_reason_and_note_lengths_follow_the_configuration() {
    let node = Node::start_with_config("[limits]\nlabels_per_run = 2\nlabel_len = 8\nreason_len = 16\nnote_len = 16\n");
    let client = node.client();
    let field = |path: &str, body: serde_json::Value| {
        client.post(path, &body).expect_error(400, "invalid_request")["field"].as_str().unwrap_or_default().to_owned()
    };
    let three = json!({ "run_id": "r1", "labels": { "a": "1", "b": "2", "c": "3" } });
    assert_eq!(field("/v1/runs", three), "labels");
    let long_value = json!({ "run_id": "r1", "labels": { "team": "x".repeat(9) } });
    assert_eq!(field("/v1/runs", long_value), "labels.team");
    client.get("/v1/runs/r1").expect_error(404, "not_found");
    client.post("/v1/runs", &json!({ "run_id": "r1", "labels": { "team": "x".repeat(8) } })).expect(201);
    let reason = json!({ "mode": "shadow", "reason": "x".repeat(17) });
    assert_eq!(field("/v1/policies/pol_any/mode", reason), "reason");
    let note = json!({ "severity": 3, "note": "x".repeat(17) });
    assert_eq!(field("/v1/prevention-records/prv_any/regret", note), "note");
}

/// A missing field is named by its own path, not its parent's (`rule.max`, not `rule`; `outcome`, not "").
#[test]
fn missing_fields_are_named_by_their_own_path() {
    let node = Node::start();
    let client = node.client();
    create_run(&client, "run-missing");
    let field = |path: &str, body: serde_json::Value| {
        let details = client.post(path, &body).expect_error(400, "invalid_request").clone();
        details["field"].as_str().unwrap_or_default().to_owned()
    };
    assert_eq!(field("/v1/runs/run-missing/end", json!({})), "outcome");
    let no_max = json!({ "name": "x", "rule": { "kind": "budget", "metric": "tokens", "per": "run" } });
    assert_eq!(field("/v1/policies", no_max), "rule.max");
    let no_name = json!({ "rule": { "kind": "budget", "metric": "tokens", "per": "run", "max": 1 } });
    assert_eq!(field("/v1/policies", no_name), "name");
    let resp = client.post("/v1/policies", &json!({ "rule": { "kind": "skill", "deny": ["rm"] } }));
    assert_eq!(resp.body["error"]["message"], "`name` is required");
}
