//! Parent and child runs (sub-agents, SPEC §13.2) against the real binary: children's spend counts
//! against their parent's budget, a child of a stopped parent is refused, chains are bounded, parents
//! are per tenant, rolled-up totals survive a restart, and a child whose parent ended is stopped.

use serde_json::{Value, json};

use crate::fixtures::{budget, create_policy, post, step};
use crate::harness::{Client, Node};

fn create_child(client: &Client, run_id: &str, parent: &str) -> Value {
    client.post("/v1/runs", &json!({ "run_id": run_id, "parent_run_id": parent })).expect(201).clone()
}

fn create_root(client: &Client, run_id: &str) -> Value {
    client.post("/v1/runs", &json!({ "run_id": run_id })).expect(201).clone()
}

fn run(client: &Client, run_id: &str) -> Value {
    client.get(&format!("/v1/runs/{run_id}")).expect(200).clone()
}

fn pre_and_post(client: &Client, run_id: &str, index: u64, tokens: u64) -> Value {
    let pre = step(client, run_id, &json!({ "index": index, "phase": "pre" }));
    assert_eq!(pre["action"], "allow", "{pre}");
    step(client, run_id, &post(index, tokens))
}

#[test]
fn three_children_are_stopped_together_at_their_parents_limit() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_tokens", "tokens", 100));
    create_root(&client, "parent");
    // A policy added after the parent started: the children are bound to another snapshot than their parent.
    create_policy(&client, &json!({ "id": "pol_no_rm", "name": "no rm", "rule": { "kind": "skill", "deny": ["rm"] } }));
    for child in ["child-a", "child-b", "child-c"] {
        let created = create_child(&client, child, "parent");
        assert_eq!(created["status"], "running", "{created}");
    }
    assert_eq!(pre_and_post(&client, "child-a", 0, 40)["action"], "allow");
    assert_eq!(pre_and_post(&client, "child-b", 0, 40)["action"], "allow");
    // 40 of its own is within every child's budget, but the parent's rolled-up 120 is not.
    let decision = pre_and_post(&client, "child-c", 0, 40);
    assert_eq!(decision["action"], "block", "{decision}");
    let deciding: Vec<&Value> =
        decision["violations"].as_array().unwrap().iter().filter(|v| v["action"] == "block").collect();
    assert_eq!(deciding.len(), 1, "{decision}");
    assert_eq!(deciding[0]["run_id"], "parent", "the violation names the ancestor: {decision}");
    assert_eq!(deciding[0]["actual"], "120", "{decision}");
    assert_eq!(decision["remaining"]["tokens"], 0, "{decision}");

    let record_id = decision["prevention_record_id"].as_str().expect("the block is recorded");
    let record = client.get(&format!("/v1/prevention-records/{record_id}")).expect(200).clone();
    assert_eq!(record["run_id"], "child-c", "{record}");
    assert_eq!(record["policy_id"], "pol_tokens", "{record}");
    let parent = run(&client, "parent");
    assert_eq!(record["snapshot_hash"], parent["snapshot"]["hash"], "the ancestor's snapshot: {record}");
    assert_ne!(record["snapshot_hash"], run(&client, "child-c")["snapshot"]["hash"], "{record}");
    assert_eq!(record["policy_version"], 1, "{record}");

    let child = run(&client, "child-c");
    assert_eq!(child["status"], "stopped", "{child}");
    assert_eq!(child["termination_reason"], "policy_block", "{child}");
    assert_eq!(child["violation_policy_id"], "pol_tokens", "{child}");
    assert_eq!(child["violation_run_id"], "parent", "{child}");
    assert_eq!(child["parent_run_id"], "parent", "{child}");

    assert_eq!(parent["status"], "running", "the ancestor itself is not stopped: {parent}");
    assert_eq!(parent["children"], 3, "{parent}");
    assert_eq!(parent["rolled_up_totals"]["tokens"], 120, "{parent}");
    assert_eq!(parent["totals"]["tokens"], 0, "{parent}");
    assert_eq!(run(&client, "child-a")["status"], "running");

    // The parent's own next call sees the rolled-up totals: blocked by its own budget.
    let decision = pre_and_post(&client, "parent", 0, 1);
    assert_eq!(decision["action"], "block", "{decision}");
    assert!(decision["violations"].as_array().unwrap().iter().all(|v| v["run_id"].is_null()), "{decision}");
    assert_eq!(run(&client, "parent")["status"], "stopped");
}

#[test]
fn a_child_of_a_stopped_parent_is_refused_and_running_children_stop_at_their_next_call() {
    let node = Node::start();
    let client = node.client();
    create_root(&client, "parent");
    create_child(&client, "child", "parent");
    assert_eq!(pre_and_post(&client, "child", 0, 5)["action"], "allow");
    client.post("/v1/runs/parent/end", &json!({ "outcome": "succeeded" })).expect(200);

    client
        .post("/v1/runs", &json!({ "run_id": "late", "parent_run_id": "parent" }))
        .expect_error(409, "parent_not_running");
    client.get("/v1/runs/late").expect_error(404, "not_found");

    client.post("/v1/runs/child/steps", &json!({ "index": 1, "phase": "pre" })).expect_error(409, "parent_not_running");
    let child = run(&client, "child");
    assert_eq!(child["status"], "stopped", "{child}");
    assert_eq!(child["termination_reason"], "parent_stopped", "{child}");
    let parent = run(&client, "parent");
    assert_eq!(parent["rolled_up_totals"]["tokens"], 5, "{parent}");
}

#[test]
fn a_chain_deeper_than_the_default_depth_is_refused() {
    let node = Node::start();
    let client = node.client();
    create_root(&client, "r1");
    for (child, parent) in [("r2", "r1"), ("r3", "r2"), ("r4", "r3")] {
        create_child(&client, child, parent);
    }
    let details = client
        .post("/v1/runs", &json!({ "run_id": "r5", "parent_run_id": "r4" }))
        .expect_error(409, "run_depth_exceeded")
        .clone();
    assert_eq!(details["max_run_depth"], 4, "{details}");
    client.get("/v1/runs/r5").expect_error(404, "not_found");
    // Usage three levels down reaches the root.
    assert_eq!(pre_and_post(&client, "r4", 0, 7)["action"], "allow");
    for ancestor in ["r1", "r2", "r3"] {
        assert_eq!(run(&client, ancestor)["rolled_up_totals"]["tokens"], 7, "{ancestor}");
    }
}

#[test]
fn a_parent_of_another_tenant_or_unknown_is_not_found() {
    let node = Node::start();
    let client = node.client();
    create_root(&client, "theirs");
    let beta = client.for_tenant("beta");
    beta.post("/v1/runs", &json!({ "run_id": "mine", "parent_run_id": "theirs" })).expect_error(404, "not_found");
    client.post("/v1/runs", &json!({ "run_id": "orphan", "parent_run_id": "ghost" })).expect_error(404, "not_found");
    client.post("/v1/runs", &json!({ "parent_run_id": "not a run id!" })).expect_error(400, "");
}

#[test]
fn rolled_up_totals_survive_a_restart_exactly() {
    let mut node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_tokens", "tokens", 100));
    create_root(&client, "parent");
    create_child(&client, "child", "parent");
    create_child(&client, "grandchild", "child");
    assert_eq!(pre_and_post(&client, "grandchild", 0, 30)["action"], "allow");
    assert_eq!(pre_and_post(&client, "child", 0, 20)["action"], "allow");
    assert_eq!(pre_and_post(&client, "parent", 0, 10)["action"], "allow");
    let before: Vec<Value> = ["parent", "child", "grandchild"].iter().map(|r| run(&client, r)).collect();
    assert_eq!(before[0]["rolled_up_totals"]["tokens"], 60);
    assert_eq!(before[1]["rolled_up_totals"]["tokens"], 50);
    node.terminate();
    node.restart();
    let client = node.client();
    let after: Vec<Value> = ["parent", "child", "grandchild"].iter().map(|r| run(&client, r)).collect();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b["rolled_up_totals"], a["rolled_up_totals"], "{a}");
        assert_eq!(b["children"], a["children"], "{a}");
    }
    // The rebuilt tally counts: 60 + 41 passes the parent's 100 on the grandchild's call.
    let decision = pre_and_post(&client, "grandchild", 1, 41);
    assert_eq!(decision["action"], "block", "{decision}");
    assert_eq!(decision["deciding_policy"]["id"], "pol_tokens");
    let blocking: Vec<&Value> =
        decision["violations"].as_array().unwrap().iter().filter(|v| v["action"] == "block").collect();
    assert_eq!(blocking.iter().map(|v| v["run_id"].clone()).collect::<Vec<_>>(), [json!("parent")], "{decision}");
}

#[test]
fn concurrent_siblings_never_pass_their_parents_limit_together() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_tokens", "tokens", 100));
    create_root(&client, "parent");
    let children: Vec<String> = (0..10).map(|i| format!("child-{i}")).collect();
    for child in &children {
        create_child(&client, child, "parent");
        step(&client, child, &json!({ "index": 0, "phase": "pre" }));
    }
    // Ten posts of 15 tokens at once: the run tree lets exactly six fit under 100, whatever the order.
    let actions: Vec<String> = std::thread::scope(|scope| {
        let posts: Vec<_> = children
            .iter()
            .map(|child| {
                let client = client.clone();
                scope
                    .spawn(move || step(&client, child, &post(0, 15))["action"].as_str().unwrap_or_default().to_owned())
            })
            .collect();
        posts.into_iter().map(|post| post.join().expect("a post thread")).collect()
    });
    assert_eq!(actions.iter().filter(|a| *a == "allow").count(), 6, "{actions:?}");
    assert_eq!(actions.iter().filter(|a| *a == "block").count(), 4, "{actions:?}");
    let parent = run(&client, "parent");
    assert_eq!(parent["rolled_up_totals"]["tokens"], 150, "every committed usage counts: {parent}");
}

#[test]
fn a_large_text_step_of_a_child_is_checked_against_its_parent_too() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_tokens", "tokens", 100));
    // A content rule makes a step over 16 KiB of text heavy: it is evaluated in the tenant's lane.
    create_policy(
        &client,
        &json!({ "id": "pol_words", "name": "no secrets", "action": "warn",
                 "rule": { "kind": "content", "target": "output", "keywords": ["topsecret"] } }),
    );
    create_root(&client, "parent");
    create_child(&client, "child", "parent");
    assert_eq!(pre_and_post(&client, "parent", 0, 60)["action"], "allow");
    step(&client, "child", &json!({ "index": 0, "phase": "pre" }));
    let text = "lorem ipsum ".repeat(2_000);
    let decision =
        step(&client, "child", &json!({ "index": 0, "phase": "post", "usage": { "tokens": 50 }, "output_text": text }));
    assert_eq!(decision["action"], "block", "{decision}");
    assert_eq!(decision["deciding_policy"]["id"], "pol_tokens", "{decision}");
    assert_eq!(run(&client, "child")["violation_run_id"], "parent");
}
