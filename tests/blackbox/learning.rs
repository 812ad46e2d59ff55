//! The learning-loop endpoints exist (they are routed, authenticated and answer JSON), whether or not
//! this version implements them yet.

use serde_json::json;

use crate::fixtures::{budget, create_policy, create_run, post, step};
use crate::harness::{Node, Resp};

/// Routed: not the unknown-path 404 nor a 405, and a JSON answer (an error in the standard shape).
#[track_caller]
fn routed(resp: &Resp, what: &str) {
    assert!(resp.body.is_object() || resp.body.is_array(), "{what}: not JSON: {}", resp.text);
    assert_ne!(resp.status, 405, "{what}: {}", resp.text);
    if resp.status >= 400 {
        resp.expect_error(resp.status, "");
        let message = resp.body["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.starts_with("no endpoint"), "{what} is not routed: {}", resp.text);
    }
    if resp.status == 501 {
        assert_eq!(resp.body["error"]["code"], "not_implemented", "{what}");
    }
}

#[test]
fn learning_loop_endpoints_are_routed_and_answer_json() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_budget", "tokens", 5));
    create_run(&client, "run-1");
    let record = step(&client, "run-1", &post(0, 6))["prevention_record_id"].as_str().expect("record").to_owned();

    routed(&client.get("/v1/incidents"), "GET /v1/incidents");
    routed(&client.get("/v1/patterns"), "GET /v1/patterns");
    routed(&client.get("/v1/patterns/pat_00000000000000000000000000000000"), "GET /v1/patterns/{id}");
    routed(
        &client.post("/v1/patterns/pat_00000000000000000000000000000000/propose", &json!({})),
        "POST /v1/patterns/{id}/propose",
    );
    routed(&client.get("/v1/graduation"), "GET /v1/graduation");
    routed(&client.post("/v1/simulate", &json!({ "policies": [], "run_ids": ["run-1"] })), "POST /v1/simulate");
    routed(&client.post("/v1/policies/pol_budget/confirm", &json!({})), "POST /v1/policies/{id}/confirm");
    routed(
        &client.post(&format!("/v1/prevention-records/{record}/regret"), &json!({ "severity": 3, "note": "fine" })),
        "POST /v1/prevention-records/{id}/regret",
    );
    // Unknown objects are still 404 on the routed endpoints.
    client.post("/v1/policies/pol_nope/confirm", &json!({})).expect_error(404, "not_found");
    client
        .post("/v1/prevention-records/prv_00000000000000000000000000000000/regret", &json!({ "severity": 3 }))
        .expect_error(404, "not_found");
}
