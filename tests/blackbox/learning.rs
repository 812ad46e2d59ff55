//! The learning-loop endpoints answer what they are for, in the standard shapes (the whole loop is
//! driven in `learning_loop.rs`).

use serde_json::json;

use crate::fixtures::{budget, create_policy, create_run, post, step};
use crate::harness::Node;

#[test]
fn learning_loop_endpoints_answer_their_shapes() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_budget", "tokens", 5));
    create_run(&client, "run-1");
    let record = step(&client, "run-1", &post(0, 6))["prevention_record_id"].as_str().expect("record").to_owned();

    // Lists: `{"items": [...], "next_cursor": null}`; nothing failed yet, so no incidents or patterns.
    for path in ["/v1/incidents", "/v1/patterns"] {
        let list = client.get(path).expect(200).clone();
        assert_eq!((list["items"].as_array().map(Vec::len), &list["next_cursor"]), (Some(0), &json!(null)), "{path}");
    }
    let unknown = "pat_00000000000000000000000000000000";
    client.get(&format!("/v1/patterns/{unknown}")).expect_error(404, "not_found");
    client.post(&format!("/v1/patterns/{unknown}/propose"), &json!({})).expect_error(404, "not_found");

    // One counted prevention and no missed recurrence: the prevention gate is passed.
    let level = client.get("/v1/graduation").expect(200).clone();
    assert_eq!(level["level"], "beta", "{level}");
    assert_eq!(level["gates"]["prevention"]["counted_preventions"], 1);

    // No candidate policies: the run replays to the same actions but writes no record.
    let sim = client.post("/v1/simulate", &json!({ "policies": [], "run_ids": ["run-1"] })).expect(200).clone();
    assert_eq!(sim["results"][0]["run_id"], "run-1");
    assert_eq!(sim["results"][0]["records"], json!([]));
    assert_eq!(sim["results"][0]["live"].as_array().map(Vec::len), Some(2), "run start and the blocked post");

    // Confirming an active policy changes nothing.
    let confirmed = client.post("/v1/policies/pol_budget/confirm", &json!({})).expect(200).clone();
    assert_eq!((confirmed["confirmations"].as_u64(), confirmed["policy"]["mode"].as_str()), (Some(0), Some("active")));

    let regret =
        client.post(&format!("/v1/prevention-records/{record}/regret"), &json!({ "severity": 3, "note": "fine" }));
    assert_eq!(regret.expect(201)["regret"]["severity"], 3);
    client
        .post(&format!("/v1/prevention-records/{record}/regret"), &json!({ "severity": 3 }))
        .expect_error(409, "already_regretted");
    client
        .post(&format!("/v1/prevention-records/{record}/regret"), &json!({ "severity": 11 }))
        .expect_error(400, "invalid_request");

    // Unknown objects are 404.
    client.post("/v1/policies/pol_nope/confirm", &json!({})).expect_error(404, "not_found");
    client
        .post("/v1/prevention-records/prv_00000000000000000000000000000000/regret", &json!({ "severity": 3 }))
        .expect_error(404, "not_found");
}

/// SPEC §6: a persisted simulation answers its records as stored (sealed into the chain, not with
/// placeholder `seq` and hashes), and a simulation naming a run twice is refused (400) with nothing stored.
#[test]
fn persisted_simulations_answer_what_was_stored_and_refuse_repeated_runs() {
    let node = Node::start();
    let client = node.client();
    create_run(&client, "ra1");
    step(&client, "ra1", &post(0, 50));
    create_run(&client, "ra2");
    step(&client, "ra2", &post(0, 60));
    let candidate = budget("pol_tight", "tokens", 10);
    let repeated = json!({ "policies": [candidate], "run_ids": ["ra1", "ra1"], "persist": true });
    let details = client.post("/v1/simulate", &repeated).expect_error(400, "invalid_request").clone();
    assert_eq!(details["field"], "run_ids[1]");
    let stored = |c: &crate::harness::Client| {
        c.get("/v1/prevention-records?simulated=true").expect(200)["items"].as_array().unwrap().clone()
    };
    assert!(stored(&client).is_empty(), "a refused simulation stores nothing");

    let body = json!({ "policies": [candidate], "run_ids": ["ra1", "ra2"], "persist": true });
    let sim = client.post("/v1/simulate", &body).expect(200).clone();
    let answered: Vec<serde_json::Value> =
        sim["results"].as_array().unwrap().iter().map(|r| r["records"][0].clone()).collect();
    assert_eq!(answered.len(), 2);
    let zero = "0".repeat(64);
    for record in &answered {
        assert!(record["seq"].as_u64() > Some(0), "{record}");
        assert_ne!(record["hash"].as_str(), Some(zero.as_str()), "{record}");
        let id = record["id"].as_str().unwrap();
        assert_eq!(&client.get(&format!("/v1/prevention-records/{id}")).expect(200).clone(), record);
    }
    assert_eq!(answered[1]["prev_hash"], answered[0]["hash"], "chained one after the other");
    assert_eq!(stored(&client).len(), 2);
}

/// SPEC §12.2: a block caused by an evaluation error is a fault, not a prevention: it never proves a
/// policy, never raises the tenant's level, and cannot be regretted.
#[test]
fn blocks_by_evaluation_errors_never_count_as_preventions() {
    let node = Node::start();
    let client = node.client();
    // Reading an absent field is an evaluation error; `on_error` defaults to block.
    let broken = json!({ "id": "pol_broken", "name": "always errors",
                         "rule": { "kind": "expr", "cel": "step.output_text == 'boom'" } });
    create_policy(&client, &broken);
    create_run(&client, "fault-run");
    let decision = step(&client, "fault-run", &post(0, 1));
    assert_eq!(decision["action"], "block", "{decision}");
    assert_eq!(decision["violations"][0]["violation_type"], "evaluation_error", "{decision}");
    let graduation = client.get("/v1/policies/pol_broken/graduation").expect(200).clone();
    assert_eq!((graduation["status"].as_str(), graduation["counted_records"].as_u64()), (Some("unproven"), Some(0)));
    let level = client.get("/v1/graduation").expect(200).clone();
    assert_eq!(level["level"], "alpha", "{level}");
    assert_eq!(level["gates"]["prevention"]["counted_preventions"], 0, "{level}");
    // Where a record exists (a store from before faults stopped writing them), it cannot be regretted.
    if let Some(record) = decision["prevention_record_id"].as_str() {
        client
            .post(&format!("/v1/prevention-records/{record}/regret"), &json!({ "severity": 10 }))
            .expect_error(409, "not_a_prevention");
        assert_eq!(client.get("/v1/policies/pol_broken").expect(200)["mode"], "active");
    }
}

/// The incident id a failed run's end answers can be opened; an unknown one is not found.
#[test]
fn an_incident_named_by_a_run_end_can_be_read() {
    let node = Node::start();
    let client = node.client();
    create_run(&client, "run-failed");
    let failing = json!({ "index": 0, "phase": "post", "skill": "fetch", "error": { "type": "Timeout" } });
    step(&client, "run-failed", &failing);
    let ended = client.post("/v1/runs/run-failed/end", &json!({ "outcome": "failed" })).expect(200).clone();
    let id = ended["incident_id"].as_str().expect("an incident");
    let incident = client.get(&format!("/v1/incidents/{id}")).expect(200).clone();
    assert_eq!(incident["run_id"], "run-failed");
    assert_eq!(incident["signature"]["skill"], "fetch");
    client.get("/v1/incidents/inc_nope").expect_error(404, "not_found");
}
