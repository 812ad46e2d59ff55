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
