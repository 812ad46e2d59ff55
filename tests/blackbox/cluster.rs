//! Several nodes on one PostgreSQL database (issue 18, `docs/architecture.md`, "Cluster: fencing and
//! consistency"): a run's calls may reach any node, and whatever the routing every call is answered as
//! one node would answer it, one decision per (index, phase) is stored, and policy changes and expiries
//! hold cluster-wide. Only in the PostgreSQL pass (`RUNGUARD_TEST_STORE=postgres`); the sled pass prints
//! a skip line.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::fixtures::{budget, create_policy, create_run, post, pre};
use crate::harness::{Client, Node, fresh_postgres, on_postgres};

/// Two nodes on one fresh database, with this extra configuration; `None`, with a visible skip line, on
/// the sled pass.
fn two_nodes(test: &str, toml: &str) -> Option<(Node, Node)> {
    if !on_postgres() {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "skipping `{test}` on sled: it needs two nodes on one PostgreSQL");
        return None;
    }
    let db = fresh_postgres()?;
    let a = Node::start_on_postgres(&db.url, Some(toml));
    let b = Node::start_on_postgres(&db.url, Some(toml));
    Some((a, b))
}

/// Every decision of a run, in ledger order.
fn decisions(client: &Client, run: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut path = format!("/v1/runs/{run}/decisions?limit=100");
    loop {
        let page = client.get(&path).expect(200).clone();
        out.extend(page["items"].as_array().expect("items").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/runs/{run}/decisions?limit=100&cursor={cursor}"),
            None => return out,
        }
    }
}

/// The stored step decisions by (index, phase): each must be there once.
fn decided(client: &Client, run: &str) -> BTreeMap<(u64, String), String> {
    let mut out = BTreeMap::new();
    for d in decisions(client, run).iter().filter(|d| !d["step_index"].is_null()) {
        let key = (d["step_index"].as_u64().expect("index"), d["phase"].as_str().expect("phase").to_owned());
        let id = d["decision_id"].as_str().expect("id").to_owned();
        assert!(out.insert(key.clone(), id).is_none(), "two stored decisions for {key:?}");
    }
    out
}

fn verify_clean(node: &Node) {
    let verified = node.cli(&["verify"]);
    assert_eq!(verified.status.code(), Some(0), "{}", String::from_utf8_lossy(&verified.stdout));
}

#[test]
fn a_runs_calls_alternating_between_two_nodes_are_answered_as_on_one() {
    let Some((a, b)) = two_nodes("a_runs_calls_alternating_between_two_nodes_are_answered_as_on_one", "") else {
        return;
    };
    let nodes = [a.client(), b.client()];
    create_policy(&nodes[0], &budget("pol_budget", "tokens", 55));
    create_run(&nodes[1], "run-alt");
    // Each call goes to the node that did not answer the one before, so each node's copy of the run is
    // always one call behind.
    let mut turn = 0;
    let mut next = || {
        turn += 1;
        &nodes[turn % 2]
    };
    for index in 0..5u64 {
        let allowed = next().post("/v1/runs/run-alt/steps", &pre(index)).expect(200).clone();
        assert_eq!(allowed["action"], "allow", "pre {index}");
        let posted = next().post("/v1/runs/run-alt/steps", &post(index, 10)).expect(200).clone();
        assert_eq!(posted["action"], "allow", "post {index}");
        // The same call again on the other node is the same decision; a changed one is refused.
        let again = next().post("/v1/runs/run-alt/steps", &post(index, 10)).expect(200).clone();
        assert_eq!(again["decision_id"], posted["decision_id"], "a retry on another node is replayed");
        next().post("/v1/runs/run-alt/steps", &post(index, 11)).expect(409);
    }
    next().post("/v1/runs/run-alt/steps", &pre(5)).expect(200);
    let blocked = next().post("/v1/runs/run-alt/steps", &post(5, 10)).expect(200).clone();
    assert_eq!(blocked["action"], "block", "60 tokens pass the budget of 55 counted over both nodes");
    // The node that did not stop the run answers as the run now is.
    next().post("/v1/runs/run-alt/steps", &pre(6)).expect_error(409, "run_not_running");
    for client in &nodes {
        let run = client.get("/v1/runs/run-alt").expect(200).clone();
        assert_eq!((run["status"].as_str(), run["totals"]["tokens"].as_u64()), (Some("stopped"), Some(60)));
        assert_eq!(decided(client, "run-alt").len(), 12, "one decision per (index, phase)");
    }
    verify_clean(&a);
}

#[test]
fn calls_racing_on_two_nodes_never_get_two_decisions() {
    let Some((a, b)) = two_nodes("calls_racing_on_two_nodes_never_get_two_decisions", "") else { return };
    let nodes = [a.client(), b.client()];
    // 10 tokens are allowed, 20 blocked: a block writes a prevention record, which must exist only when
    // the block is the one decision stored.
    create_policy(&nodes[0], &budget("pol_budget", "tokens", 15));
    for round in 0..20u64 {
        let run = format!("run-race-{round}");
        create_run(&nodes[(round % 2) as usize], &run);
        // Identical calls, and one conflicting call, sent to both nodes at once.
        let calls = [post(0, 10), post(0, 10), post(0, 10), post(0, 20)];
        let answers: Vec<(usize, u16, Value)> = std::thread::scope(|scope| {
            let handles: Vec<_> = calls
                .iter()
                .enumerate()
                .map(|(i, call)| {
                    let client = nodes[i % 2].clone();
                    let path = format!("/v1/runs/{run}/steps");
                    scope.spawn(move || {
                        let resp = client.post(&path, call);
                        (i, resp.status, resp.body.clone())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        let acknowledged: BTreeSet<String> = answers
            .iter()
            .filter(|(_, status, _)| *status == 200)
            .map(|(_, _, body)| body["decision_id"].as_str().expect("id").to_owned())
            .collect();
        for (i, status, body) in &answers {
            assert!(matches!(status, 200 | 409), "call {i} of round {round}: {status} {body}");
        }
        assert_eq!(acknowledged.len(), 1, "round {round}: two acknowledged decisions for post 0: {answers:?}");
        let stored = decided(&nodes[0], &run);
        assert_eq!(stored.len(), 1, "round {round}");
        assert!(acknowledged.contains(stored.values().next().expect("one")), "round {round}");
        // Totals are those of the one decision stored: 10 or 20 tokens, never both.
        let winner = answers.iter().find(|(_, status, _)| *status == 200).map(|(i, _, _)| *i).expect("a winner");
        let tokens = nodes[1].get(&format!("/v1/runs/{run}")).expect(200)["totals"]["tokens"].as_u64();
        assert_eq!(tokens, Some(if winner == 3 { 20 } else { 10 }), "round {round}");
        let records = nodes[0].get(&format!("/v1/prevention-records?run_id={run}")).expect(200).clone();
        let records = records["items"].as_array().expect("items").len();
        assert_eq!(records, usize::from(winner == 3), "round {round}: a record only for a stored block");
    }
    verify_clean(&b);
}

#[test]
fn a_policy_changed_on_one_node_binds_a_run_created_on_the_other_at_once() {
    let Some((a, b)) = two_nodes("a_policy_changed_on_one_node_binds_a_run_created_on_the_other_at_once", "") else {
        return;
    };
    let (a, b) = (a.client(), b.client());
    create_policy(&a, &budget("pol_one", "tokens", 100));
    // B binds a run, so it caches the snapshot of one policy.
    assert_eq!(create_run(&b, "run-before")["snapshot"]["policy_count"], 1);
    create_policy(&a, &budget("pol_two", "tokens", 5));
    let after = create_run(&b, "run-after");
    assert_eq!(after["snapshot"]["policy_count"], 2, "the policy acknowledged on A binds B's next run");
    b.post("/v1/runs/run-after/steps", &pre(0)).expect(200);
    assert_eq!(b.post("/v1/runs/run-after/steps", &post(0, 10)).expect(200)["action"], "block");
}

#[test]
fn a_run_expires_once_with_two_nodes_sweeping() {
    let Some((a, b)) = two_nodes("a_run_expires_once_with_two_nodes_sweeping", "run_ttl_s = 2\n") else { return };
    let (ca, cb) = (a.client(), b.client());
    create_run(&ca, "run-ttl");
    // Both nodes hold the run (a call on each), then both sweep it.
    ca.post("/v1/runs/run-ttl/steps", &pre(0)).expect(200);
    cb.post("/v1/runs/run-ttl/steps", &post(0, 1)).expect(200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while cb.get("/v1/runs/run-ttl").expect(200)["status"] != "expired" {
        assert!(std::time::Instant::now() < deadline, "the run never expired");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let shown = ca.get("/v1/runs/run-ttl").expect(200).clone();
    assert_eq!(shown["status"], "expired");
    assert_eq!(shown, cb.get("/v1/runs/run-ttl").expect(200).clone(), "both nodes show the one expiry");
    // One expiry was written; the node that lost the race dropped its own quietly.
    let expiries = [&a, &b].iter().map(|node| node.logs().matches("run expired").count()).sum::<usize>();
    assert_eq!(expiries, 1, "the expiry was written {expiries} times");
    assert_eq!(ca.post("/v1/runs/run-ttl/steps", &pre(1)).status, 409);
    verify_clean(&a);
}

#[test]
fn failed_runs_ended_at_once_on_two_nodes_all_count_in_their_pattern() {
    let Some((a, b)) = two_nodes("failed_runs_ended_at_once_on_two_nodes_all_count_in_their_pattern", "") else {
        return;
    };
    let nodes = [a.client(), b.client()];
    let failing = serde_json::json!({ "index": 0, "phase": "post", "skill": "fetch", "api_endpoint": "/v1/users/7",
        "usage": { "tokens": 5 }, "error": { "type": "Timeout", "code": "e_upstream", "status": 504 } });
    const RUNS: usize = 8;
    for i in 0..RUNS {
        let client = &nodes[i % 2];
        create_run(client, &format!("run-fail-{i}"));
        client.post(&format!("/v1/runs/run-fail-{i}/steps"), &failing).expect(200);
    }
    // Every end reads the pattern and writes it back counted once more, on both nodes at once.
    std::thread::scope(|scope| {
        for i in 0..RUNS {
            let client = nodes[i % 2].clone();
            scope.spawn(move || {
                let end = serde_json::json!({ "outcome": "failed" });
                let ended = client.post(&format!("/v1/runs/run-fail-{i}/end"), &end).expect(200).clone();
                assert!(ended["incident_id"].is_string(), "{ended}");
            });
        }
    });
    let patterns = nodes[1].get("/v1/patterns").expect(200).clone();
    assert_eq!(patterns["items"].as_array().expect("items").len(), 1, "{patterns}");
    assert_eq!(patterns["items"][0]["occurrences"], RUNS, "no count was lost: {patterns}");
    assert_eq!(nodes[0].get("/v1/incidents?limit=100").expect(200)["items"].as_array().expect("items").len(), RUNS);
}

#[test]
fn a_node_names_itself_in_every_log_line_and_in_its_metrics() {
    // On both passes: a node's identity does not depend on its store.
    let node = Node::start_with_config("node_id = \"node-a\"\nlog_format = \"json\"\n");
    let metrics = node.client().get("/metrics").text;
    assert!(metrics.contains("runguard_node_info{node_id=\"node-a\"} 1"), "{metrics}");
    create_run(&node.client(), "run-named");
    let logs = node.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| l.starts_with('{')).collect();
    assert!(!lines.is_empty(), "{logs}");
    for line in lines {
        let parsed: Value = serde_json::from_str(line).expect("a JSON log line");
        assert_eq!(parsed["node_id"], "node-a", "{line}");
    }
    // Without one, a node derives a name of its own, and two on one host differ.
    let (x, y) = (Node::start(), Node::start());
    let name = |node: &Node| {
        let metrics = node.client().get("/metrics").text;
        let line = metrics.lines().find(|l| l.starts_with("runguard_node_info{")).map(str::to_owned);
        line.unwrap_or_else(|| panic!("no node info: {metrics}"))
    };
    assert_ne!(name(&x), name(&y));
}

/// Two children of one parent, each served by a different node whose view of the family does not hold
/// the other's usage: their posts together never pass the parent's limit. The second one's commit finds
/// the parent's stored rolled-up total past the bound it was allowed within, the node reads the family
/// back and blocks the call, with its record naming the parent.
#[test]
fn siblings_on_two_nodes_never_pass_their_parents_limit_together() {
    let test = "siblings_on_two_nodes_never_pass_their_parents_limit_together";
    let Some((a, b)) = two_nodes(test, "") else { return };
    let (on_a, on_b) = (a.client(), b.client());
    create_policy(&on_a, &budget("pol_family_tokens", "tokens", 100));
    create_run(&on_a, "run-parent");
    on_a.post("/v1/runs", &serde_json::json!({ "run_id": "run-child-a", "parent_run_id": "run-parent" })).expect(201);
    on_b.post("/v1/runs", &serde_json::json!({ "run_id": "run-child-b", "parent_run_id": "run-parent" })).expect(201);
    for (client, child) in [(&on_a, "run-child-a"), (&on_b, "run-child-b")] {
        client.post(&format!("/v1/runs/{child}/steps"), &pre(0)).expect(200);
    }
    let first = on_a.post("/v1/runs/run-child-a/steps", &post(0, 60)).expect(200).clone();
    assert_eq!(first["action"], "allow", "{first}");
    // Node B loaded the parent before child A's usage: only the bound in the commit can see it.
    let second = on_b.post("/v1/runs/run-child-b/steps", &post(0, 60)).expect(200).clone();
    assert_eq!(second["action"], "block", "the parent's 100 tokens would hold 120: {second}");
    assert_eq!(second["violations"][0]["run_id"], "run-parent", "{second}");
    let parent = on_a.get("/v1/runs/run-parent").expect(200).clone();
    assert_eq!(parent["rolled_up_totals"]["tokens"], 120, "a block still counts what was used: {parent}");
    assert_eq!(parent["status"], "running", "{parent}");
    let child = on_b.get("/v1/runs/run-child-b").expect(200).clone();
    assert_eq!(child["status"], "stopped", "{child}");
    assert_eq!(child["violation_run_id"], "run-parent", "{child}");
    verify_clean(&a);
}
