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
