//! Runs and steps: the lifecycle, budget blocks, snapshot immutability, shadow policies, throttling,
//! idempotent retries and call order.

use serde_json::{Value, json};

use crate::fixtures::{budget, create_policy, create_run, post, pre, step};
use crate::harness::{Client, Node};

fn records(client: &Client, query: &str) -> Vec<Value> {
    client.get(&format!("/v1/prevention-records{query}")).expect(200)["items"].as_array().expect("items").clone()
}

#[test]
fn run_lifecycle_create_steps_end_and_decisions() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_tokens", "tokens", 1000));

    let created = client.post("/v1/runs", &json!({ "run_id": "run-1", "labels": { "team": "search" } }));
    let answer = created.expect(201).clone();
    assert_eq!(answer["run_id"], "run-1");
    assert_eq!(answer["status"], "running");
    assert_eq!(answer["snapshot"]["policy_count"], 1);
    let snapshot_id = answer["snapshot"]["id"].as_str().expect("snapshot id").to_owned();
    let snapshot_hash = answer["snapshot"]["hash"].as_str().expect("snapshot hash").to_owned();
    assert!(snapshot_id.starts_with("snp_"), "{snapshot_id}");
    assert_eq!(snapshot_hash.len(), 64);
    assert_eq!(answer["decision"]["phase"], "run_start");
    assert_eq!(answer["decision"]["action"], "allow");
    assert_eq!(answer["decision"]["snapshot_hash"], snapshot_hash.as_str());

    // The same run_id again: 200 with the same answer.
    let again = client.post("/v1/runs", &json!({ "run_id": "run-1", "labels": { "team": "search" } }));
    assert_eq!(again.expect(200), &answer);

    let run = client.get("/v1/runs/run-1").expect(200).clone();
    assert_eq!(run["run_id"], "run-1");
    assert_eq!(run["tenant_id"], "default");
    assert_eq!(run["status"], "running");
    assert_eq!(run["labels"], json!({ "team": "search" }));
    assert_eq!(run["snapshot"], answer["snapshot"]);
    assert_eq!(run["totals"], json!({ "tokens": 0, "cost_micros": 0, "steps": 0, "duration_ms": 0 }));
    assert_eq!(run["next"], json!({ "index": 0, "phase": "pre" }));
    assert!(run["termination_reason"].is_null() && run["stopped_at_step"].is_null());
    assert!(run["created_at"].is_string() && run["ended_at"].is_null());

    let admitted = step(
        &client,
        "run-1",
        &json!({ "index": 0, "phase": "pre", "skill": "search",
        "estimate": { "tokens": 100 } }),
    );
    assert_eq!(admitted["action"], "allow");
    assert_eq!((admitted["step_index"].clone(), admitted["phase"].clone()), (json!(0), json!("pre")));
    assert!(admitted["decision_id"].as_str().is_some_and(|d| d.starts_with("dec_")));
    let reported = step(
        &client,
        "run-1",
        &json!({ "index": 0, "phase": "post",
        "usage": { "tokens": 120, "cost_micros": 7, "duration_ms": 30 }, "output_text": "done" }),
    );
    assert_eq!(reported["action"], "allow");
    assert_eq!(reported["remaining"]["tokens"], 880);
    assert!(reported["remaining"]["cost_micros"].is_null(), "no cost budget applies");
    assert_eq!(reported["snapshot_hash"], snapshot_hash.as_str());
    assert!(reported["prevention_record_id"].is_null());

    let run = client.get("/v1/runs/run-1").expect(200).clone();
    assert_eq!(run["totals"], json!({ "tokens": 120, "cost_micros": 7, "steps": 1, "duration_ms": 30 }));
    assert_eq!(run["next"], json!({ "index": 1, "phase": "pre" }));

    // `pre` is optional.
    assert_eq!(step(&client, "run-1", &post(1, 10))["action"], "allow");

    let ended = client.post("/v1/runs/run-1/end", &json!({ "outcome": "succeeded" })).expect(200).clone();
    assert_eq!(ended["run"]["status"], "succeeded");
    assert_eq!(ended["run"]["totals"]["tokens"], 130);
    assert!(ended["run"]["ended_at"].is_string());
    assert!(ended["incident_id"].is_null());
    // Ending again changes nothing.
    let twice = client.post("/v1/runs/run-1/end", &json!({ "outcome": "failed" })).expect(200).clone();
    assert_eq!(twice["run"], ended["run"]);
    assert_eq!(client.get("/v1/runs/run-1").expect(200)["status"], "succeeded");
    client.post("/v1/runs/run-1/steps", &post(2, 1)).expect_error(409, "");

    let decisions = client.get("/v1/runs/run-1/decisions").expect(200).clone();
    let items = decisions["items"].as_array().expect("items");
    let order: Vec<_> = items.iter().map(|d| (d["step_index"].clone(), d["phase"].clone())).collect();
    assert_eq!(
        order,
        vec![
            (Value::Null, json!("run_start")),
            (json!(0), json!("pre")),
            (json!(0), json!("post")),
            (json!(1), json!("post")),
            (Value::Null, json!("run_end")),
        ]
    );
    assert_eq!(items[1]["decision_id"], admitted["decision_id"]);
    assert_eq!(items[2]["decision_id"], reported["decision_id"]);
    assert!(items.iter().all(|d| d["snapshot_hash"] == snapshot_hash.as_str()));

    let snapshot = client.get(&format!("/v1/snapshots/{snapshot_id}")).expect(200).clone();
    assert_eq!(snapshot["verified"], true);
    assert_eq!(snapshot["hash"], snapshot_hash.as_str());
    let policies = snapshot["policies"].as_array().expect("policies");
    assert_eq!(policies.len(), 1);
    assert_eq!(policies[0]["id"], "pol_tokens");
    client.get("/v1/snapshots/snp_00000000000000000000000000000000").expect_error(404, "not_found");
}

#[test]
fn runs_without_an_id_get_one_and_unknown_runs_are_404() {
    let node = Node::start();
    let client = node.client();
    let answer = client.post("/v1/runs", &json!({})).expect(201).clone();
    let id = answer["run_id"].as_str().expect("a generated run id");
    assert!(!id.is_empty());
    assert_eq!(client.get(&format!("/v1/runs/{id}")).expect(200)["status"], "running");
    assert_eq!(answer["snapshot"]["policy_count"], 0);

    client.get("/v1/runs/run-unknown").expect_error(404, "not_found");
    client.post("/v1/runs/run-unknown/steps", &post(0, 1)).expect_error(404, "not_found");
    client.post("/v1/runs/run-unknown/end", &json!({ "outcome": "failed" })).expect_error(404, "not_found");
    client.get("/v1/runs/run-unknown/decisions").expect_error(404, "not_found");
}

#[test]
fn a_budget_block_stops_the_run_and_writes_a_record() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_budget", "tokens", 100));
    create_run(&client, "run-b");
    assert_eq!(step(&client, "run-b", &post(0, 60))["action"], "allow");
    let blocking_call = post(1, 41);
    let block = step(&client, "run-b", &blocking_call);
    assert_eq!(block["action"], "block");
    assert_eq!(block["deciding_policy"], json!({ "id": "pol_budget", "name": "tokens budget", "version": 1 }));
    let violation = &block["violations"][0];
    assert_eq!(violation["violation_type"], "token_limit");
    assert_eq!((violation["threshold"].clone(), violation["actual"].clone()), (json!("100"), json!("101")));
    assert_eq!(block["remaining"]["tokens"], 0, "remaining never goes below 0");
    let record_id = block["prevention_record_id"].as_str().expect("a block by an active policy has a record");
    assert!(record_id.starts_with("prv_"));

    let run = client.get("/v1/runs/run-b").expect(200).clone();
    assert_eq!(run["status"], "stopped");
    assert_eq!(run["termination_reason"], "policy_block");
    assert_eq!(run["stopped_at_step"], 1);
    assert_eq!(run["violation_policy_id"], "pol_budget");
    assert_eq!(run["totals"]["tokens"], 101);

    // Every later call is refused with the stopping decision; the identical re-send gets it again.
    for call in [pre(2), post(2, 0), post(1, 1), pre(1)] {
        let refused = client.post("/v1/runs/run-b/steps", &call);
        let details = refused.expect_error(409, "");
        assert_eq!(details["decision"]["decision_id"], block["decision_id"], "for {call}: {}", refused.text);
        assert_eq!(details["decision"]["action"], "block");
    }
    assert_eq!(client.post("/v1/runs/run-b/steps", &blocking_call).expect(200), &block);

    let record = client.get(&format!("/v1/prevention-records/{record_id}")).expect(200).clone();
    assert_eq!(record["id"], record_id);
    assert_eq!(record["decision_id"], block["decision_id"]);
    assert_eq!(record["tenant_id"], "default");
    assert_eq!(record["run_id"], "run-b");
    assert_eq!(record["policy_id"], "pol_budget");
    assert_eq!(record["policy_version"], 1);
    assert_eq!((record["step_index"].clone(), record["phase"].clone()), (json!(1), json!("post")));
    assert_eq!(record["snapshot_hash"], block["snapshot_hash"]);
    assert_eq!(record["is_simulated"], false);
    assert!(record["pattern_id"].is_null() && record["signature_hash"].is_null());
    assert!(record["incident_id_blocked"].as_str().is_some_and(|i| i.starts_with("inc_")));
    assert!(record["hash"].is_string() && record["prev_hash"].is_string() && record["prevented_at"].is_string());
    let listed = records(&client, "");
    assert_eq!(listed, vec![record.clone()]);

    let graduation = client.get("/v1/policies/pol_budget/graduation").expect(200).clone();
    assert_eq!(graduation["status"], "proven");
    assert_eq!(graduation["gate_passed"], true);
    assert_eq!(graduation["counted_records"], 1);

    // Ending a stopped run changes nothing.
    let ended = client.post("/v1/runs/run-b/end", &json!({ "outcome": "failed" })).expect(200).clone();
    assert_eq!(ended["run"]["status"], "stopped");
    assert!(ended["incident_id"].is_null(), "a run stopped by a block never creates an incident");
    assert_eq!(records(&client, "").len(), 1);
}

#[test]
fn pre_estimates_are_refused_before_they_spend() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_budget", "tokens", 100));
    create_run(&client, "run-e");
    step(&client, "run-e", &post(0, 90));
    let block = step(&client, "run-e", &json!({ "index": 1, "phase": "pre", "estimate": { "tokens": 11 } }));
    assert_eq!(block["action"], "block");
    let run = client.get("/v1/runs/run-e").expect(200).clone();
    assert_eq!((run["status"].clone(), run["totals"]["tokens"].clone()), (json!("stopped"), json!(90)));
}

#[test]
fn policy_changes_never_affect_runs_already_started() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_budget", "tokens", 100));
    let old = create_run(&client, "run-old");
    let old_hash = old["snapshot"]["hash"].as_str().expect("hash").to_owned();
    assert_eq!(step(&client, "run-old", &post(0, 50))["snapshot_hash"], old_hash.as_str());

    let mut tighter = budget("pol_budget", "tokens", 10);
    tighter["expected_version"] = json!(1);
    client.put("/v1/policies/pol_budget", &tighter).expect(200);

    // The running run keeps its snapshot: 90 of 100 is still allowed.
    let decision = step(&client, "run-old", &post(1, 40));
    assert_eq!(decision["action"], "allow", "{decision}");
    assert_eq!(decision["snapshot_hash"], old_hash.as_str());
    assert_eq!(decision["remaining"]["tokens"], 10);
    let decisions = client.get("/v1/runs/run-old/decisions").expect(200).clone();
    assert!(decisions["items"].as_array().unwrap().iter().all(|d| d["snapshot_hash"] == old_hash.as_str()));

    // A new run gets the new snapshot and the tighter limit.
    let new = create_run(&client, "run-new");
    let new_hash = new["snapshot"]["hash"].as_str().expect("hash").to_owned();
    assert_ne!(new_hash, old_hash);
    let block = step(&client, "run-new", &post(0, 40));
    assert_eq!(block["action"], "block");
    assert_eq!(block["snapshot_hash"], new_hash.as_str());
    assert_eq!(block["deciding_policy"]["version"], 2);
    assert_eq!(block["violations"][0]["threshold"], "10");

    // Snapshots pin versions: the old one holds version 1, the new one version 2.
    let old_snapshot =
        client.get(&format!("/v1/snapshots/{}", old["snapshot"]["id"].as_str().unwrap())).expect(200).clone();
    assert_eq!(old_snapshot["policies"][0]["version"], 1);
    assert_eq!(old_snapshot["verified"], true);
    let new_snapshot =
        client.get(&format!("/v1/snapshots/{}", new["snapshot"]["id"].as_str().unwrap())).expect(200).clone();
    assert_eq!(new_snapshot["policies"][0]["version"], 2);
}

#[test]
fn identical_policy_sets_share_one_snapshot() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_budget", "tokens", 100));
    let a = create_run(&client, "run-a");
    let b = create_run(&client, "run-b");
    assert_eq!(a["snapshot"], b["snapshot"]);
}

#[test]
fn shadow_policies_never_block_and_are_counted() {
    let node = Node::start();
    let client = node.client();
    let mut doc = budget("pol_shadow", "tokens", 5);
    doc["mode"] = json!("shadow");
    create_policy(&client, &doc);
    let answer = create_run(&client, "run-s");
    assert_eq!(answer["snapshot"]["policy_count"], 1, "shadow policies are in snapshots");

    let decision = step(&client, "run-s", &post(0, 10));
    assert_eq!(decision["action"], "allow");
    assert_eq!(decision["violations"], json!([]));
    assert!(decision["deciding_policy"].is_null());
    assert!(decision["prevention_record_id"].is_null());
    let shadow = decision["shadow"].as_array().expect("shadow entries");
    assert_eq!(shadow.len(), 1, "{decision}");
    assert_eq!(shadow[0]["policy_id"], "pol_shadow");
    assert_eq!(shadow[0]["would_action"], "block");
    assert_eq!(shadow[0]["violation_type"], "token_limit");
    assert!(shadow[0]["reason"].as_str().is_some_and(|r| !r.is_empty()));

    assert_eq!(client.get("/v1/runs/run-s").expect(200)["status"], "running");
    assert_eq!(step(&client, "run-s", &post(1, 10))["action"], "allow");
    assert!(records(&client, "").is_empty(), "a shadow would-block writes no record");
    let stats = client.get("/v1/policies/pol_shadow/shadow-stats").expect(200).clone();
    assert!(stats["would_block"].as_u64().is_some_and(|n| n >= 2), "{stats}");
    assert!(stats["evaluations"].as_u64().is_some_and(|n| n >= 2), "{stats}");
    assert_eq!(stats["would_throttle"], 0);
    assert_eq!(client.get("/v1/policies/pol_shadow/graduation").expect(200)["status"], "observing");
}

#[test]
fn rate_limits_throttle_without_stopping_the_run() {
    let node = Node::start();
    let client = node.client();
    let rate = json!({ "id": "pol_rate", "name": "one step a minute",
        "rule": { "kind": "rate", "metric": "steps", "max": 1, "window_s": 60 } });
    create_policy(&client, &rate);
    create_run(&client, "run-t");
    assert_eq!(step(&client, "run-t", &pre(0))["action"], "allow");
    assert_eq!(step(&client, "run-t", &post(0, 1))["action"], "allow");

    let throttle = step(&client, "run-t", &pre(1));
    assert_eq!(throttle["action"], "throttle", "{throttle}");
    let wait = throttle["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(wait > 0 && wait <= 60_000, "retry_after_ms {wait}");
    assert_eq!(throttle["violations"][0]["violation_type"], "rate_limit");
    assert!(throttle["prevention_record_id"].is_null());

    let run = client.get("/v1/runs/run-t").expect(200).clone();
    assert_eq!(run["status"], "running");
    assert_eq!(run["next"], json!({ "index": 1, "phase": "pre" }), "a throttle does not advance the run");
    assert!(records(&client, "").is_empty(), "a throttle writes no record");

    // The same call again is evaluated afresh.
    let again = step(&client, "run-t", &pre(1));
    assert_eq!(again["action"], "throttle");
    assert_ne!(again["decision_id"], throttle["decision_id"]);
}

#[test]
fn identical_retries_replay_and_different_bodies_conflict() {
    let node = Node::start();
    let client = node.client();
    create_run(&client, "run-i");
    let pre_call = json!({ "index": 0, "phase": "pre", "skill": "search" });
    let first = step(&client, "run-i", &pre_call);
    assert_eq!(step(&client, "run-i", &pre_call), first, "identical retry, identical decision");
    let different = json!({ "index": 0, "phase": "pre", "skill": "browse" });
    client.post("/v1/runs/run-i/steps", &different).expect_error(409, "idempotency_mismatch");

    let post_call = post(0, 5);
    let reported = step(&client, "run-i", &post_call);
    assert_ne!(reported["decision_id"], first["decision_id"]);
    assert_eq!(step(&client, "run-i", &post_call)["decision_id"], reported["decision_id"]);
    client.post("/v1/runs/run-i/steps", &post(0, 6)).expect_error(409, "idempotency_mismatch");
    // The totals counted the step once.
    assert_eq!(client.get("/v1/runs/run-i").expect(200)["totals"]["tokens"], 5);
}

#[track_caller]
fn expect_out_of_order(client: &Client, run: &str, call: &Value, index: u64, phase: &str) {
    let resp = client.post(&format!("/v1/runs/{run}/steps"), call);
    let details = resp.expect_error(409, "step_out_of_order");
    assert_eq!(details["expected"], json!({ "index": index, "phase": phase }), "for {call}");
}

#[test]
fn out_of_order_calls_say_what_was_expected() {
    let node = Node::start();
    let client = node.client();
    create_run(&client, "run-o");
    // Skipping index 0.
    expect_out_of_order(&client, "run-o", &post(1, 1), 0, "pre");
    expect_out_of_order(&client, "run-o", &pre(1), 0, "pre");
    step(&client, "run-o", &pre(0));
    // post of the wrong index, and pre after pre.
    expect_out_of_order(&client, "run-o", &post(1, 1), 0, "post");
    expect_out_of_order(&client, "run-o", &pre(1), 0, "post");
    step(&client, "run-o", &post(0, 1));
    // Skipping index 1.
    expect_out_of_order(&client, "run-o", &post(2, 1), 1, "pre");
    expect_out_of_order(&client, "run-o", &pre(2), 1, "pre");
    // Refused calls change nothing.
    let run = client.get("/v1/runs/run-o").expect(200).clone();
    assert_eq!((run["totals"]["steps"].clone(), run["totals"]["tokens"].clone()), (json!(1), json!(1)));
    assert_eq!(step(&client, "run-o", &post(1, 1))["action"], "allow");
}

#[test]
fn resending_a_creation_with_a_different_body_is_an_idempotency_mismatch() {
    let mut node = Node::start();
    let client = node.client();
    let body = json!({ "run_id": "run-idem", "labels": { "team": "search" }, "api_endpoint": "/v1/search" });
    let created = client.post("/v1/runs", &body).expect(201).clone();
    step(&client, "run-idem", &pre(0));
    // Identical: 200 with the run as it is now.
    let again = client.post("/v1/runs", &body).expect(200).clone();
    assert_eq!(again["run_id"], created["run_id"]);
    assert_eq!(again["snapshot"], created["snapshot"]);
    for changed in [
        json!({ "run_id": "run-idem", "labels": { "team": "ads" }, "api_endpoint": "/v1/search" }),
        json!({ "run_id": "run-idem", "labels": { "team": "search" }, "api_endpoint": "/v1/other" }),
        json!({ "run_id": "run-idem", "labels": { "team": "search" } }),
        json!({ "run_id": "run-idem", "api_endpoint": "/v1/search" }),
        json!({ "run_id": "run-idem" }),
    ] {
        client.post("/v1/runs", &changed).expect_error(409, "idempotency_mismatch");
    }
    let run = client.get("/v1/runs/run-idem").expect(200).clone();
    assert_eq!(run["labels"], json!({ "team": "search" }), "a refused re-creation changes nothing");
    // After a restart no actor holds the run: the creation is committed without reading it first, its
    // fencing finds the run, and the answer is the same as before.
    node.terminate();
    node.restart();
    let client = node.client();
    let again = client.post("/v1/runs", &body).expect(200).clone();
    assert_eq!(again["decision"]["decision_id"], created["decision"]["decision_id"]);
    assert_eq!(again["snapshot"], created["snapshot"]);
    client.post("/v1/runs", &json!({ "run_id": "run-idem" })).expect_error(409, "idempotency_mismatch");
    assert_eq!(step(&client, "run-idem", &post(0, 1))["action"], "allow", "the run goes on where it was");
    let decisions = client.get("/v1/runs/run-idem/decisions").expect(200).clone();
    assert_eq!(decisions["items"].as_array().map(Vec::len), Some(3), "start, pre and post: nothing more");
}

/// A call to a run that no longer runs says, in words, how it stopped.
#[test]
fn a_call_to_an_ended_run_says_how_it_ended() {
    let node = Node::start();
    let client = node.client();
    create_run(&client, "run-ended");
    client.post("/v1/runs/run-ended/end", &json!({ "outcome": "succeeded" })).expect(200);
    let resp = client.post("/v1/runs/run-ended/steps", &json!({ "index": 0, "phase": "pre" }));
    assert_eq!(resp.expect_error(409, "run_not_running")["status"], "succeeded");
    assert_eq!(resp.body["error"]["message"], "the run has ended (`succeeded`); it accepts no more step calls");
}
