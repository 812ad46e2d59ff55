//! JSON builders for policies and step calls shared by the tests.

use serde_json::{Value, json};

use crate::harness::Client;

/// A per-run budget policy that blocks above `max`.
pub fn budget(id: &str, metric: &str, max: u64) -> Value {
    json!({
        "id": id,
        "name": format!("{metric} budget"),
        "rule": { "kind": "budget", "metric": metric, "per": "run", "max": max },
    })
}

/// A `post` call reporting `tokens`.
pub fn post(index: u64, tokens: u64) -> Value {
    json!({ "index": index, "phase": "post", "usage": { "tokens": tokens } })
}

/// A `pre` call without an estimate.
pub fn pre(index: u64) -> Value {
    json!({ "index": index, "phase": "pre" })
}

/// Creates a policy and asserts 201; returns the stored policy.
#[track_caller]
pub fn create_policy(client: &Client, doc: &Value) -> Value {
    client.post("/v1/policies", doc).expect(201).clone()
}

/// Creates a run with this id and asserts 201; returns the answer.
#[track_caller]
pub fn create_run(client: &Client, run_id: &str) -> Value {
    client.post("/v1/runs", &json!({ "run_id": run_id })).expect(201).clone()
}

/// Sends a step call and asserts 200; returns the decision.
#[track_caller]
pub fn step(client: &Client, run_id: &str, call: &Value) -> Value {
    client.post(&format!("/v1/runs/{run_id}/steps"), call).expect(200).clone()
}
