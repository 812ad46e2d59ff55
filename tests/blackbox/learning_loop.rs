//! The whole learning loop end to end (SPEC §4–§6): failed runs → one pattern → proposal → shadow →
//! confirmations → prevention at `pre` → graduation → simulation → missed recurrences degrade the tenant
//! → regrets demote the policy → the level survives a restart.

use serde_json::{Value, json};

use crate::harness::{ACME_OPERATOR, ACME_WORKER, BETA_WORKER, Client, Node, Token, tokens_config};

const OPERATOR_2: Token = Token { name: "acme-operator-2", tenant: "acme", role: "operator", secret: "acme-o2-secret" };
const OPERATOR_3: Token = Token { name: "acme-operator-3", tenant: "acme", role: "operator", secret: "acme-o3-secret" };

fn pre(skill: &str, endpoint: &str) -> Value {
    json!({ "index": 0, "phase": "pre", "skill": skill, "api_endpoint": endpoint, "input_keys": ["id"] })
}

fn failing_post(with_fields: Option<(&str, &str)>) -> Value {
    let mut call = json!({ "index": 0, "phase": "post", "usage": { "tokens": 5 },
                           "error": { "type": "Timeout", "code": "e_upstream", "status": 504 } });
    if let Some((skill, endpoint)) = with_fields {
        call["skill"] = json!(skill);
        call["api_endpoint"] = json!(endpoint);
        call["input_keys"] = json!(["id"]);
    }
    call
}

/// A run that fails at step 0 (sending `pre` first, or only a `post` that carries the fields); returns
/// the incident id the end answered.
fn failed_run(worker: &Client, run_id: &str, endpoint: &str, send_pre: bool) -> Value {
    worker.post("/v1/runs", &json!({ "run_id": run_id })).expect(201);
    if send_pre {
        let decision = worker.post(&format!("/v1/runs/{run_id}/steps"), &pre("fetch", endpoint)).expect(200).clone();
        assert_eq!(decision["action"], "allow", "{decision}");
        worker.post(&format!("/v1/runs/{run_id}/steps"), &failing_post(None)).expect(200);
    } else {
        worker.post(&format!("/v1/runs/{run_id}/steps"), &failing_post(Some(("fetch", endpoint)))).expect(200);
    }
    let end = worker.post(&format!("/v1/runs/{run_id}/end"), &json!({ "outcome": "failed" })).expect(200).clone();
    end["incident_id"].clone()
}

/// A run whose matching `pre` is blocked by the active pattern policy; returns its record id.
fn prevented_run(worker: &Client, run_id: &str) -> String {
    worker.post("/v1/runs", &json!({ "run_id": run_id })).expect(201);
    let decision =
        worker.post(&format!("/v1/runs/{run_id}/steps"), &pre("Fetch", "/v1/users/4242/")).expect(200).clone();
    assert_eq!(decision["action"], "block", "{decision}");
    assert_eq!(decision["violations"][0]["violation_type"], "pattern_match");
    let end = worker.post(&format!("/v1/runs/{run_id}/end"), &json!({ "outcome": "failed" })).expect(200).clone();
    assert_eq!(end["incident_id"], Value::Null, "a run stopped by a block never creates an incident");
    assert_eq!(end["run"]["status"], "stopped");
    decision["prevention_record_id"].as_str().expect("a record id").to_owned()
}

#[test]
fn the_learning_loop_end_to_end() {
    let config = format!("{}\n{}\n{}", tokens_config(), OPERATOR_2.toml(), OPERATOR_3.toml());
    let mut node = Node::start_with_config(&config);
    let worker = node.client_as(ACME_WORKER);
    let op = node.client_as(ACME_OPERATOR);

    // Three failed runs, same normalised signature, different ids in the endpoint: one pattern.
    for (i, id) in ["101", "202", "550e8400-e29b-41d4-a716-446655440000"].iter().enumerate() {
        let incident = failed_run(&worker, &format!("fail-{i}"), &format!("/v1/users/{id}?page=2"), true);
        assert!(incident.as_str().is_some_and(|s| s.starts_with("inc_")), "{incident}");
    }
    let patterns = op.get("/v1/patterns").expect(200).clone();
    assert_eq!(patterns["items"].as_array().unwrap().len(), 1, "{patterns}");
    let pattern = &patterns["items"][0];
    assert_eq!(pattern["occurrences"], 3);
    assert_eq!(pattern["signature"]["api_endpoint"], "/v1/users/{id}");
    assert_eq!(pattern["error_type"], "timeout");
    let pattern_id = pattern["id"].as_str().unwrap().to_owned();
    assert_eq!(op.get("/v1/incidents").expect(200)["items"].as_array().unwrap().len(), 3);

    // Propose: a shadow pattern policy, once.
    let policy = op.post(&format!("/v1/patterns/{pattern_id}/propose"), &json!({})).expect(201).clone();
    assert_eq!((policy["mode"].as_str(), policy["rule"]["kind"].as_str()), (Some("shadow"), Some("pattern")));
    let policy_id = policy["id"].as_str().unwrap().to_owned();
    op.post(&format!("/v1/patterns/{pattern_id}/propose"), &json!({})).expect_error(409, "already_proposed");

    // Shadow: a matching step is allowed, the would-block is reported and counted.
    worker.post("/v1/runs", &json!({ "run_id": "shadowed" })).expect(201);
    let decision = worker.post("/v1/runs/shadowed/steps", &pre("fetch", "/v1/users/7")).expect(200).clone();
    assert_eq!(decision["action"], "allow");
    assert_eq!(decision["shadow"][0]["would_action"], "block", "{decision}");
    assert_eq!(decision["prevention_record_id"], Value::Null);
    let stats = op.get(&format!("/v1/policies/{policy_id}/shadow-stats")).expect(200).clone();
    assert!(stats["would_block"].as_u64() >= Some(1) && stats["evaluations"].as_u64() >= Some(1), "{stats}");

    // Three confirmations by distinct operators activate it; a repeated confirmation does not count.
    let first = op.post(&format!("/v1/policies/{policy_id}/confirm"), &json!({})).expect(200).clone();
    assert_eq!((first["confirmations"].as_u64(), first["required"].as_u64()), (Some(1), Some(3)));
    let again = op.post(&format!("/v1/policies/{policy_id}/confirm"), &json!({})).expect(200).clone();
    assert_eq!(again["confirmations"], 1, "the same operator confirms once");
    node.client_as(OPERATOR_2).post(&format!("/v1/policies/{policy_id}/confirm"), &json!({})).expect(200);
    let third =
        node.client_as(OPERATOR_3).post(&format!("/v1/policies/{policy_id}/confirm"), &json!({})).expect(200).clone();
    assert_eq!(third["policy"]["mode"], "active", "{third}");
    let audit = op.get(&format!("/v1/policies/{policy_id}/audit")).expect(200).clone();
    let last = audit["items"].as_array().unwrap().last().unwrap().clone();
    assert_eq!((last["to"].as_str(), last["approval_path"].as_str()), (Some("active"), Some("confirmations")));

    // Other tenants and other endpoints are not affected.
    let beta = node.client_as(BETA_WORKER);
    beta.post("/v1/runs", &json!({ "run_id": "beta-run" })).expect(201);
    assert_eq!(beta.post("/v1/runs/beta-run/steps", &pre("fetch", "/v1/users/1")).expect(200)["action"], "allow");
    worker.post("/v1/runs", &json!({ "run_id": "other-endpoint" })).expect(201);
    assert_eq!(
        worker.post("/v1/runs/other-endpoint/steps", &pre("fetch", "/v1/orders/1")).expect(200)["action"],
        "allow"
    );

    // Prevention at `pre`, with a record that carries the pattern; the policy is proven.
    let record_id = prevented_run(&worker, "prevented-1");
    let record = op.get(&format!("/v1/prevention-records/{record_id}")).expect(200).clone();
    assert_eq!(record["pattern_id"], pattern_id.as_str());
    assert_eq!(record["signature_hash"], pattern["signature_hash"]);
    assert!(record["incident_id_blocked"].as_str().is_some_and(|s| s.starts_with("inc_")));
    let graduation = op.get(&format!("/v1/policies/{policy_id}/graduation")).expect(200).clone();
    assert_eq!((graduation["status"].as_str(), graduation["counted_records"].as_u64()), (Some("proven"), Some(1)));
    assert_eq!(op.get("/v1/graduation").expect(200)["level"], "beta");

    // Simulated records are stored apart and never graduate the policy.
    let candidate = json!({ "id": policy_id, "name": "candidate", "rule": policy["rule"] });
    let sim = op
        .post("/v1/simulate", &json!({ "policies": [candidate], "run_ids": ["fail-0", "fail-1"], "persist": true }))
        .expect(200)
        .clone();
    let results = sim["results"].as_array().unwrap();
    assert!(
        results.iter().all(|r| r["records"].as_array().unwrap().len() == 1 && r["differences"].as_u64() >= Some(1)),
        "{sim}"
    );
    assert_eq!(op.get("/v1/prevention-records?simulated=true").expect(200)["items"].as_array().unwrap().len(), 2);
    assert_eq!(op.get(&format!("/v1/policies/{policy_id}/graduation")).expect(200)["counted_records"], 1);

    // Two more preventions, then recurrences it failed to prevent (workers that skip `pre`): the rate
    // falls to 3 / (3 + 4) < 0.5 and the tenant degrades from beta, with a reason.
    let mut records = vec![record_id, prevented_run(&worker, "prevented-2"), prevented_run(&worker, "prevented-3")];
    for i in 0..4 {
        let incident = failed_run(&worker, &format!("missed-{i}"), "/v1/users/9", false);
        assert!(incident.is_string(), "a failed run that was not blocked creates an incident");
    }
    let level = op.get("/v1/graduation").expect(200).clone();
    assert_eq!((level["level"].as_str(), level["degraded_from"].as_str()), (Some("degraded"), Some("beta")), "{level}");
    assert!(level["reason"].as_str().is_some_and(|r| r.contains("prevention")), "{level}");

    // Three regrets demote the policy automatically; a confirmation does not bring it back.
    for (i, id) in records.drain(..).enumerate() {
        let answer =
            op.post(&format!("/v1/prevention-records/{id}/regret"), &json!({ "severity": 1 })).expect(201).clone();
        assert_eq!(answer["policy"]["demoted"], i == 2, "{answer}");
    }
    let demoted = op.get(&format!("/v1/policies/{policy_id}")).expect(200).clone();
    assert_eq!(demoted["mode"], "disabled");
    let audit = op.get(&format!("/v1/policies/{policy_id}/audit")).expect(200).clone();
    assert_eq!(audit["items"].as_array().unwrap().last().unwrap()["approval_path"], "auto:regret");
    op.post(&format!("/v1/policies/{policy_id}/confirm"), &json!({})).expect_error(409, "policy_disabled");
    assert_eq!(op.get(&format!("/v1/policies/{policy_id}/graduation")).expect(200)["status"], "demoted");
    // A run created after the demotion no longer carries the policy: the call it blocked goes ahead (the
    // demotion is a policy write of the learning loop, which must make the node capture a new snapshot).
    worker.post("/v1/runs", &json!({ "run_id": "after-demotion" })).expect(201);
    let decision = worker.post("/v1/runs/after-demotion/steps", &pre("Fetch", "/v1/users/4242/")).expect(200).clone();
    assert_eq!(decision["action"], "allow", "{decision}");

    // The level and its history survive a restart.
    node.kill();
    node.restart();
    let op = node.client_as(ACME_OPERATOR);
    let level = op.get("/v1/graduation").expect(200).clone();
    assert_eq!((level["level"].as_str(), level["degraded_from"].as_str()), (Some("degraded"), Some("beta")), "{level}");
    let history: Vec<&str> = level["history"].as_array().unwrap().iter().filter_map(|h| h["level"].as_str()).collect();
    assert!(history.starts_with(&["beta"]) && history.contains(&"degraded"), "{history:?}");
}
