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

/// SPEC §12.1: what a global policy does in one tenant's runs is kept for that tenant only. Its shadow
/// statistics and graduation count only the caller's tenant's runs, and a tenant's regrets never demote
/// it (for anyone: the node's documented choice).
#[test]
fn a_global_policys_statistics_graduation_and_regrets_stay_with_each_tenant() {
    use crate::harness::ADMIN;
    let node = Node::start_with_config(&tokens_config());
    let admin = node.client_as(ADMIN);
    let (acme_op, acme_worker) = (node.client_as(ACME_OPERATOR), node.client_as(ACME_WORKER));
    let (beta_op, beta_worker) = (node.client_as(BETA_OPERATOR), node.client_as(BETA_WORKER));
    let global = |id: &str, metric: &str, mode: &str| {
        let mut doc = budget(id, metric, 5);
        doc["scope"] = json!("global");
        doc["mode"] = json!(mode);
        doc
    };
    admin.post("/v1/policies", &global("pol_g_shadow", "tokens", "shadow")).expect(201);
    // acme's runs would be blocked twice, beta's once.
    for (worker, run_id) in [(&acme_worker, "a1"), (&acme_worker, "a2"), (&beta_worker, "b1")] {
        worker.post("/v1/runs", &json!({ "run_id": run_id })).expect(201);
        let call = json!({ "index": 0, "phase": "post", "usage": { "tokens": 10 } });
        let decision = worker.post(&format!("/v1/runs/{run_id}/steps"), &call).expect(200).clone();
        assert_eq!(
            (decision["action"].as_str(), decision["shadow"][0]["would_action"].as_str()),
            (Some("allow"), Some("block"))
        );
    }
    let stats = |op: &Client| op.get("/v1/policies/pol_g_shadow/shadow-stats").expect(200).clone();
    let (acme_stats, beta_stats) = (stats(&acme_op), stats(&beta_op));
    assert_eq!(
        (acme_stats["evaluations"].as_u64(), acme_stats["would_block"].as_u64()),
        (Some(2), Some(2)),
        "{acme_stats}"
    );
    assert_eq!(
        (beta_stats["evaluations"].as_u64(), beta_stats["would_block"].as_u64()),
        (Some(1), Some(1)),
        "{beta_stats}"
    );

    // An active global policy blocks in both tenants; each tenant's graduation counts its own records.
    admin.post("/v1/policies", &global("pol_g_block", "cost_micros", "active")).expect(201);
    let blocked = |worker: &Client, run_id: &str| {
        worker.post("/v1/runs", &json!({ "run_id": run_id })).expect(201);
        let call = json!({ "index": 0, "phase": "post", "usage": { "cost_micros": 10 } });
        let decision = worker.post(&format!("/v1/runs/{run_id}/steps"), &call).expect(200).clone();
        assert_eq!(decision["deciding_policy"]["id"], "pol_g_block", "{decision}");
        decision["prevention_record_id"].as_str().expect("a record").to_owned()
    };
    let acme_records: Vec<String> = (0..3).map(|i| blocked(&acme_worker, &format!("ca{i}"))).collect();
    blocked(&beta_worker, "cb0");
    let counted = |op: &Client| op.get("/v1/policies/pol_g_block/graduation").expect(200)["counted_records"].clone();
    assert_eq!((counted(&acme_op), counted(&beta_op)), (json!(3), json!(1)));

    // acme regrets every record at the highest severity: recorded, but the global policy stays active for
    // everyone, and still blocks in beta.
    for id in &acme_records {
        let answer = acme_op
            .post(&format!("/v1/prevention-records/{id}/regret"), &json!({ "severity": 10 }))
            .expect(201)
            .clone();
        assert_eq!(answer["policy"]["demoted"], false, "{answer}");
    }
    let policy = admin.get("/v1/policies/pol_g_block").expect(200).clone();
    assert_eq!((policy["mode"].as_str(), policy["version"].as_u64()), (Some("active"), Some(1)), "{policy}");
    blocked(&beta_worker, "cb1");
    let level = acme_op.get("/v1/graduation").expect(200).clone();
    assert_eq!(level["gates"]["rollback"]["regrets"], 3, "acme's regrets count in acme's regret rate: {level}");
    let level = beta_op.get("/v1/graduation").expect(200).clone();
    assert_eq!(level["gates"]["rollback"]["regrets"], 0, "{level}");
    assert_eq!(level["gates"]["prevention"]["counted_preventions"], 2, "{level}");
}
