//! Prevention records: reading one, listing with filters and cursors.

use std::time::Duration;

use serde_json::{Value, json};

use crate::fixtures::{budget, create_policy, create_run, post, step};
use crate::harness::{Client, Node};

fn ids(client: &Client, query: &str) -> Vec<String> {
    let page = client.get(&format!("/v1/prevention-records{query}")).expect(200).clone();
    page["items"].as_array().expect("items").iter().map(|r| r["id"].as_str().expect("id").to_owned()).collect()
}

/// Runs `run_id` into a block with `usage` and returns the decision's record.
fn blocked_record(client: &Client, run_id: &str, usage: Value) -> Value {
    create_run(client, run_id);
    let decision = step(client, run_id, &json!({ "index": 0, "phase": "post", "usage": usage }));
    assert_eq!(decision["action"], "block", "{decision}");
    let id = decision["prevention_record_id"].as_str().expect("a record id");
    let record = client.get(&format!("/v1/prevention-records/{id}")).expect(200).clone();
    assert_eq!(record["decision_id"], decision["decision_id"]);
    record
}

/// Waits until the node's clock (as seen in `prevented_at`, millisecond precision) has moved on.
fn next_millisecond() {
    std::thread::sleep(Duration::from_millis(3));
}

#[test]
fn records_filter_by_policy_run_and_time_and_paginate() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_tokens", "tokens", 5));
    create_policy(&client, &budget("pol_cost", "cost_micros", 5));
    let first = blocked_record(&client, "run-1", json!({ "tokens": 10 }));
    next_millisecond();
    let second = blocked_record(&client, "run-2", json!({ "cost_micros": 10 }));
    next_millisecond();
    let third = blocked_record(&client, "run-3", json!({ "tokens": 10 }));
    let id = |r: &Value| r["id"].as_str().unwrap().to_owned();
    assert_eq!(first["policy_id"], "pol_tokens");
    assert_eq!(second["policy_id"], "pol_cost");
    assert!(first["prevented_at"].as_str() < third["prevented_at"].as_str());

    assert_eq!(ids(&client, ""), vec![id(&first), id(&second), id(&third)], "oldest first");
    assert_eq!(ids(&client, "?policy_id=pol_tokens"), vec![id(&first), id(&third)]);
    assert_eq!(ids(&client, "?policy_id=pol_cost"), vec![id(&second)]);
    assert_eq!(ids(&client, "?policy_id=pol_other"), Vec::<String>::new());
    assert_eq!(ids(&client, "?run_id=run-2"), vec![id(&second)]);
    assert_eq!(ids(&client, "?run_id=run-3&policy_id=pol_cost"), Vec::<String>::new());

    // `since` is inclusive, `until` exclusive.
    let at = |r: &Value| r["prevented_at"].as_str().unwrap().to_owned();
    assert_eq!(ids(&client, &format!("?since={}", at(&second))), vec![id(&second), id(&third)]);
    assert_eq!(ids(&client, &format!("?until={}", at(&second))), vec![id(&first)]);
    assert_eq!(ids(&client, &format!("?since={}&until={}", at(&second), at(&third))), vec![id(&second)]);
    assert_eq!(ids(&client, "?since=2999-01-01T00:00:00.000Z"), Vec::<String>::new());
    assert_eq!(ids(&client, "?simulated=true"), Vec::<String>::new(), "live records are not simulated");
    assert_eq!(ids(&client, "?simulated=false").len(), 3);

    // Cursor pagination.
    let page = client.get("/v1/prevention-records?limit=2").expect(200).clone();
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let cursor = page["next_cursor"].as_str().expect("a next cursor").to_owned();
    let rest = client.get(&format!("/v1/prevention-records?limit=2&cursor={cursor}")).expect(200).clone();
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert_eq!(rest["items"][0]["id"], id(&third));
    assert!(rest["next_cursor"].is_null());

    // Each record links to the previous one.
    assert_eq!(second["prev_hash"], first["hash"]);
    assert_eq!(third["prev_hash"], second["hash"]);

    client.get("/v1/prevention-records/prv_00000000000000000000000000000000").expect_error(404, "not_found");
    let bad_time = client.get("/v1/prevention-records?since=yesterday");
    assert_eq!(bad_time.expect_error(400, "invalid_request")["field"], "since");
    let bad_flag = client.get("/v1/prevention-records?simulated=maybe");
    assert_eq!(bad_flag.expect_error(400, "invalid_request")["field"], "simulated");
}

#[test]
fn warns_and_passing_steps_write_no_records() {
    let node = Node::start();
    let client = node.client();
    let mut warn = budget("pol_warn", "tokens", 5);
    warn["action"] = json!("warn");
    create_policy(&client, &warn);
    create_run(&client, "run-w");
    let decision = step(&client, "run-w", &post(0, 10));
    assert_eq!(decision["action"], "warn");
    assert_eq!(decision["deciding_policy"]["id"], "pol_warn");
    assert!(decision["prevention_record_id"].is_null());
    assert_eq!(client.get("/v1/runs/run-w").expect(200)["status"], "running");
    assert_eq!(ids(&client, ""), Vec::<String>::new());
}

/// SPEC §12.4: a simulated record cannot be regretted (409) and never changes a live policy.
#[test]
fn simulated_records_cannot_be_regretted_and_never_change_a_live_policy() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_live", "tokens", 100));
    create_run(&client, "sim-run");
    assert_eq!(step(&client, "sim-run", &post(0, 50))["action"], "allow");
    // A tighter candidate with the live policy's id would have blocked; its record is persisted.
    let candidate = budget("pol_live", "tokens", 10);
    let sim = client
        .post("/v1/simulate", &json!({ "policies": [candidate], "run_ids": ["sim-run"], "persist": true }))
        .expect(200)
        .clone();
    let record = sim["results"][0]["records"][0]["id"].as_str().expect("a simulated record").to_owned();
    assert_eq!(client.get(&format!("/v1/prevention-records/{record}")).expect(200)["is_simulated"], true);
    client
        .post(&format!("/v1/prevention-records/{record}/regret"), &json!({ "severity": 10 }))
        .expect_error(409, "simulated_record");
    let policy = client.get("/v1/policies/pol_live").expect(200).clone();
    assert_eq!((policy["mode"].as_str(), policy["version"].as_u64()), (Some("active"), Some(1)), "{policy}");
    let level = client.get("/v1/graduation").expect(200).clone();
    assert_eq!(level["gates"]["rollback"]["regrets"], 0, "{level}");
}
