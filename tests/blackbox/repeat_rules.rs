//! Repeat rules (loop detection, SPEC §13.1) against the real binary: a loop of identical tool calls is
//! refused at the fourth with `max: 3`, repeated identical errors are blocked at `post`, only steps inside
//! the window count, and a restart in the middle of a loop keeps counting.

use serde_json::{Value, json};

use crate::fixtures::{create_policy, create_run, step};
use crate::harness::{Client, Node};

fn repeat_policy(id: &str, of: &str, max: u64, window_steps: u32) -> Value {
    json!({
        "id": id,
        "name": format!("no {of} loops"),
        "rule": { "kind": "repeat", "of": of, "max": max, "window_steps": window_steps },
    })
}

/// A tool call: the same skill, endpoint, input keys and text unless `text` differs.
fn tool_call(index: u64, text: &str) -> Value {
    json!({
        "index": index, "phase": "pre", "skill": "web_search", "api_endpoint": "/v1/search?page=2",
        "input_keys": ["query"], "input_text": text,
    })
}

fn done(index: u64) -> Value {
    json!({ "index": index, "phase": "post", "usage": { "tokens": 10 } })
}

fn failed(index: u64) -> Value {
    json!({ "index": index, "phase": "post", "error": { "type": "Timeout", "code": "upstream_slow", "message": "try 1" } })
}

#[track_caller]
fn allowed(client: &Client, run: &str, call: &Value) {
    let decision = step(client, run, call);
    assert_eq!(decision["action"], "allow", "for {call}: {decision}");
}

#[track_caller]
fn loop_block<'a>(decision: &'a Value, policy: &str) -> &'a Value {
    assert_eq!(decision["action"], "block", "{decision}");
    assert_eq!(decision["deciding_policy"]["id"], policy, "{decision}");
    let violation = &decision["violations"][0];
    assert_eq!(violation["violation_type"], "loop_detected", "{decision}");
    violation
}

#[test]
fn the_fourth_identical_tool_call_is_refused_and_recorded() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &repeat_policy("pol_loop", "call", 3, 10));
    create_run(&client, "run-loop");
    for i in 0..3 {
        allowed(&client, "run-loop", &tool_call(i, "weather in Paris"));
        allowed(&client, "run-loop", &done(i));
    }
    let decision = step(&client, "run-loop", &tool_call(3, "weather in Paris"));
    let violation = loop_block(&decision, "pol_loop");
    assert_eq!((violation["threshold"].clone(), violation["actual"].clone()), (json!("3"), json!("4")));
    let evidence = &violation["evidence"]["matches"][0];
    assert_eq!((evidence["kind"].clone(), evidence["count"].clone()), (json!("repeat"), json!(4)));
    assert_eq!(evidence["samples"], json!(["0", "1", "2"]), "the earlier matching steps, by index");
    assert!(!decision.to_string().contains("Paris"), "no text in the decision: {decision}");

    let record_id = decision["prevention_record_id"].as_str().expect("a block writes a prevention record");
    let record = client.get(&format!("/v1/prevention-records/{record_id}")).expect(200).clone();
    assert_eq!((record["policy_id"].clone(), record["step_index"].clone()), (json!("pol_loop"), json!(3)));
    let run = client.get("/v1/runs/run-loop").expect(200).clone();
    assert_eq!((run["status"].clone(), run["termination_reason"].clone()), (json!("stopped"), json!("policy_block")));
}

#[test]
fn repeated_identical_errors_are_blocked_at_post() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &repeat_policy("pol_errors", "error", 2, 5));
    create_run(&client, "run-errors");
    for i in 0..2 {
        allowed(&client, "run-errors", &tool_call(i, &format!("attempt {i}")));
        allowed(&client, "run-errors", &failed(i));
    }
    allowed(&client, "run-errors", &tool_call(2, "attempt 2"));
    let decision = step(&client, "run-errors", &failed(2));
    assert_eq!(decision["phase"], "post");
    let violation = loop_block(&decision, "pol_errors");
    assert_eq!(violation["evidence"]["matches"][0]["samples"], json!(["0", "1"]));
}

#[test]
fn only_steps_inside_the_window_count() {
    let node = Node::start();
    let client = node.client();
    // At most one equal call among a step and the two before it.
    create_policy(&client, &repeat_policy("pol_window", "call", 1, 2));
    create_run(&client, "run-window");
    // Step 3 repeats step 0 and step 4 step 1, both outside the window: allowed.
    for (i, text) in [(0, "a"), (1, "b"), (2, "c"), (3, "a"), (4, "b")] {
        allowed(&client, "run-window", &tool_call(i, text));
        allowed(&client, "run-window", &done(i));
    }
    // Step 5 repeats step 3, inside the window; the different call of step 4 between them resets nothing.
    let decision = step(&client, "run-window", &tool_call(5, "a"));
    let violation = loop_block(&decision, "pol_window");
    assert_eq!(violation["evidence"]["matches"][0]["samples"], json!(["3"]));
}

#[test]
fn a_restart_in_the_middle_of_a_loop_keeps_counting() {
    let mut node = Node::start();
    let client = node.client();
    create_policy(&client, &repeat_policy("pol_loop", "call", 3, 10));
    create_run(&client, "run-restart");
    for i in 0..2 {
        allowed(&client, "run-restart", &tool_call(i, "same"));
        allowed(&client, "run-restart", &done(i));
    }
    node.kill();
    node.restart();
    let client = node.client();
    client.get("/readyz").expect(200);
    allowed(&client, "run-restart", &tool_call(2, "same"));
    allowed(&client, "run-restart", &done(2));
    let decision = step(&client, "run-restart", &tool_call(3, "same"));
    let violation = loop_block(&decision, "pol_loop");
    assert_eq!(violation["evidence"]["matches"][0]["samples"], json!(["0", "1", "2"]));
}

#[test]
fn a_simulated_loop_is_refused_by_a_candidate_repeat_rule() {
    let node = Node::start();
    let client = node.client();
    create_run(&client, "run-recorded");
    for i in 0..5 {
        allowed(&client, "run-recorded", &tool_call(i, "same"));
        allowed(&client, "run-recorded", &done(i));
    }
    let body = json!({ "policies": [repeat_policy("pol_loop", "call", 3, 10)], "run_ids": ["run-recorded"] });
    let sim = client.post("/v1/simulate", &body).expect(200).clone();
    let result = &sim["results"][0];
    let candidate = result["candidate"].as_array().expect("candidate decisions");
    let last = candidate.last().expect("the candidate decided something");
    assert_eq!((last["step_index"].clone(), last["phase"].clone()), (json!(3), json!("pre")), "{result}");
    loop_block(last, "pol_loop");
    assert_eq!(result["records"].as_array().map(Vec::len), Some(1), "{result}");
    assert_eq!(result["records"][0]["is_simulated"], true);
}
