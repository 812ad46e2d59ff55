//! Concurrent callers: retries racing on one run are answered once, many runs blocking at once each get
//! their record, and the record chain still verifies.

use std::collections::BTreeSet;

use serde_json::json;

use crate::fixtures::{budget, create_policy, create_run, post};
use crate::harness::Node;

#[test]
fn racing_identical_calls_are_evaluated_once() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_budget", "tokens", 1000));
    create_run(&client, "run-race");
    let call = post(0, 7);
    let answers: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (client, call) = (client.clone(), call.clone());
                scope.spawn(move || client.post("/v1/runs/run-race/steps", &call))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let ids: BTreeSet<_> = answers.iter().map(|a| a.expect(200)["decision_id"].to_string()).collect();
    assert_eq!(ids.len(), 1, "one decision for one call: {ids:?}");
    let run = client.get("/v1/runs/run-race").expect(200).clone();
    assert_eq!((run["totals"]["tokens"].clone(), run["totals"]["steps"].clone()), (json!(7), json!(1)));
}

#[test]
fn concurrent_blocks_each_get_a_record_in_one_chain() {
    let mut node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_budget", "tokens", 5));
    let runs: Vec<String> = (0..16).map(|i| format!("run-{i}")).collect();
    for run in &runs {
        create_run(&client, run);
    }
    let records: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .iter()
            .map(|run| {
                let client = client.clone();
                scope.spawn(move || {
                    let decision = client.post(&format!("/v1/runs/{run}/steps"), &post(0, 6)).expect(200).clone();
                    assert_eq!(decision["action"], "block");
                    decision["prevention_record_id"].as_str().expect("record").to_owned()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let listed = client.get("/v1/prevention-records").expect(200)["items"].clone();
    let listed: BTreeSet<_> = listed.as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(listed, records.into_iter().collect::<BTreeSet<_>>());
    node.terminate();
    let verified = node.cli(&["verify"]);
    assert_eq!(verified.status.code(), Some(0), "{}", String::from_utf8_lossy(&verified.stdout));
}
