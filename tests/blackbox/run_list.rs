//! `GET /v1/runs`: a tenant's runs, paged by cursor and narrowed by status, label and creation time;
//! never another tenant's; bad filters answer 400 naming the parameter.

use serde_json::{Value, json};

use crate::fixtures::{budget, post};
use crate::harness::{ACME_OPERATOR, ACME_WORKER, BETA_WORKER, Client, Node, tokens_config};

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|r| r["run_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[track_caller]
fn list(client: &Client, query: &str) -> Value {
    client.get(&format!("/v1/runs{query}")).expect(200).clone()
}

#[test]
fn runs_are_listed_per_tenant_filtered_and_paged() {
    let node = Node::start_with_config(&tokens_config());
    let (acme, beta) = (node.client_as(ACME_WORKER), node.client_as(BETA_WORKER));
    node.client_as(ACME_OPERATOR).post("/v1/policies", &budget("pol_b", "tokens", 100)).expect(201);
    for (run, agent) in [("run-1", "alpha"), ("run-2", "beta"), ("run-3", "alpha")] {
        acme.post("/v1/runs", &json!({ "run_id": run, "labels": { "agent": agent } })).expect(201);
    }
    let between = list(&acme, "")["items"][2]["created_at"].as_str().expect("created_at").to_owned();
    beta.post("/v1/runs", &json!({ "run_id": "run-beta", "labels": { "agent": "alpha" } })).expect(201);
    // run-2 is stopped by a block, run-3 ends succeeded.
    assert_eq!(acme.post("/v1/runs/run-2/steps", &post(0, 500)).expect(200)["action"], "block");
    acme.post("/v1/runs/run-3/end", &json!({ "outcome": "succeeded" })).expect(200);

    let all = list(&acme, "");
    assert_eq!(ids(&all), ["run-1", "run-2", "run-3"], "{all}");
    assert_eq!(all["next_cursor"], Value::Null);
    assert_eq!(all["items"][1]["status"], "stopped");
    assert_eq!(all["items"][1]["steps_seen"], 1);
    assert_eq!(ids(&list(&beta, "")), ["run-beta"], "beta sees only its own runs");

    assert_eq!(ids(&list(&acme, "?status=running")), ["run-1"]);
    assert_eq!(ids(&list(&acme, "?status=succeeded")), ["run-3"]);
    assert_eq!(ids(&list(&acme, "?label=agent=alpha")), ["run-1", "run-3"]);
    assert_eq!(ids(&list(&acme, "?label=agent")), ["run-1", "run-2", "run-3"]);
    assert!(ids(&list(&acme, "?label=team")).is_empty());
    assert_eq!(ids(&list(&acme, "?label=agent%3Dalpha&status=running")), ["run-1"]);
    assert_eq!(ids(&list(&acme, &format!("?since={between}"))), ["run-3"]);
    assert_eq!(ids(&list(&acme, &format!("?until={between}"))), ["run-1", "run-2"]);
    assert!(ids(&list(&acme, "?since=2100-01-01T00:00:00Z")).is_empty());

    // Pages of one, filtered: the cursor carries on where the filter left off.
    let first = list(&acme, "?label=agent=alpha&limit=1");
    assert_eq!(ids(&first), ["run-1"]);
    let cursor = first["next_cursor"].as_str().expect("a next page");
    let second = list(&acme, &format!("?label=agent=alpha&limit=1&cursor={cursor}"));
    assert_eq!((ids(&second), second["next_cursor"].clone()), (vec!["run-3".to_owned()], Value::Null));
    // Another tenant's cursor names nothing of beta's.
    let resp = beta.get(&format!("/v1/runs?cursor={cursor}"));
    assert_eq!(resp.expect_error(400, "invalid_request")["field"], "cursor");

    for (query, field) in [
        ("status=done", "status"),
        ("since=yesterday", "since"),
        ("until=2026-13-01T00:00:00Z", "until"),
        ("label=", "label"),
        ("label==x", "label"),
        ("limit=0", "limit"),
        ("limit=many", "limit"),
        ("cursor=zz", "cursor"),
        ("tenant=beta", "tenant"),
        ("status=running&status=stopped", "status"),
    ] {
        let resp = acme.get(&format!("/v1/runs?{query}"));
        assert_eq!(resp.expect_error(400, "invalid_request")["field"], field, "{query}: {}", resp.text);
    }
    // Without a token: 401, as for every tenant view.
    node.client().get("/v1/runs").expect_error(401, "unauthorized");
}
