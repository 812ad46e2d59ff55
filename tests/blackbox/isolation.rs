//! Property: ids created in one tenant are never visible to another. One node (with tokens for tenants
//! acme and beta) serves every case of the property; each case creates a policy, a run and a prevention
//! record with generated ids in acme, and beta's every read or write of them answers 404.

use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::json;

use crate::fixtures::budget;
use crate::harness::{ACME_OPERATOR, ACME_WORKER, BETA_OPERATOR, BETA_WORKER, Client, Node, tokens_config};

/// Ids in the caller alphabet (`[A-Za-z0-9._:-]`), starting with an alphanumeric so they are plain path
/// segments.
fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9._:-]{0,40}"
}

#[track_caller]
fn status(client: &Client, method: &str, path: &str, body: Option<serde_json::Value>) -> u16 {
    let bytes = body.map(|b| b.to_string().into_bytes());
    client.send(method, path, bytes).expect("transport").status
}

#[test]
fn ids_never_leak_across_tenants() {
    let node = Node::start_with_config(&tokens_config());
    let (acme_op, acme_worker) = (node.client_as(ACME_OPERATOR), node.client_as(ACME_WORKER));
    let (beta_op, beta_worker) = (node.client_as(BETA_OPERATOR), node.client_as(BETA_WORKER));
    // One active budget blocks every acme run's first step (a record per case); per-case policies are
    // disabled so that snapshots stay small.
    acme_op.post("/v1/policies", &budget("pol_blocker", "tokens", 0)).expect(201);
    let serial = AtomicU64::new(0);

    let mut runner = crate::harness::property_runner(file!());
    let result = runner.run(&(id(), id()), |(policy_id, run_id)| {
        // Unique per case (cases and shrinking may repeat a generated id).
        let n = serial.fetch_add(1, Ordering::Relaxed);
        let (policy_id, run_id) = (format!("{policy_id}-{n}"), format!("{run_id}-{n}"));
        let mut doc = budget(&policy_id, "tokens", 1);
        doc["mode"] = json!("disabled");
        prop_assert_eq!(acme_op.post("/v1/policies", &doc).status, 201);
        let run = acme_worker.post("/v1/runs", &json!({ "run_id": run_id }));
        prop_assert_eq!(run.status, 201, "{}", run.text);
        let snapshot = run.body["snapshot"]["id"].as_str().unwrap_or_default().to_owned();
        let block = acme_worker.post(
            &format!("/v1/runs/{run_id}/steps"),
            &json!({
            "index": 0, "phase": "post", "usage": { "tokens": 1 } }),
        );
        prop_assert_eq!(&block.body["action"], "block");
        let record = block.body["prevention_record_id"].as_str().unwrap_or_default().to_owned();

        let reads = [
            format!("/v1/policies/{policy_id}"),
            format!("/v1/policies/{policy_id}?version=1"),
            format!("/v1/policies/{policy_id}/audit"),
            format!("/v1/policies/{policy_id}/shadow-stats"),
            format!("/v1/policies/{policy_id}/graduation"),
            format!("/v1/runs/{run_id}"),
            format!("/v1/runs/{run_id}/decisions"),
            format!("/v1/prevention-records/{record}"),
            format!("/v1/snapshots/{snapshot}"),
        ];
        for path in &reads {
            // acme sees it (so the ids are right), beta never does.
            prop_assert_eq!(status(&acme_op, "GET", path, None), 200, "acme GET {}", path);
            prop_assert_eq!(status(&beta_op, "GET", path, None), 404, "beta GET {}", path);
        }
        let mode = json!({ "mode": "active" });
        prop_assert_eq!(status(&beta_op, "POST", &format!("/v1/policies/{policy_id}/mode"), Some(mode)), 404);
        let step = json!({ "index": 1, "phase": "pre" });
        prop_assert_eq!(status(&beta_worker, "POST", &format!("/v1/runs/{run_id}/steps"), Some(step)), 404);
        let listed = beta_op.get(&format!("/v1/prevention-records?run_id={run_id}"));
        prop_assert_eq!(&listed.body["items"], &json!([]));
        // acme's policy is still disabled after beta's attempt.
        let policy = acme_op.get(&format!("/v1/policies/{policy_id}"));
        prop_assert_eq!(&policy.body["mode"], "disabled");
        Ok::<(), TestCaseError>(())
    });
    if let Err(err) = result {
        panic!("{err}\n{runner}");
    }
}
