//! Authentication, roles and tenant isolation with configured tokens.

use serde_json::json;

use crate::fixtures::{budget, post};
use crate::harness::{ACME_OPERATOR, ACME_WORKER, ADMIN, BETA_OPERATOR, BETA_WORKER, Node, tokens_config};

#[test]
fn missing_or_bad_tokens_are_401() {
    let node = Node::start_with_config(&tokens_config());
    let anonymous = node.client();
    anonymous.get("/v1/policies").expect_error(401, "unauthorized");
    anonymous.post("/v1/runs", &json!({})).expect_error(401, "unauthorized");
    anonymous.get("/v1/runs/run-1").expect_error(401, "unauthorized");
    anonymous.with_secret("not-a-token").get("/v1/policies").expect_error(401, "unauthorized");
    anonymous.with_secret("not-a-token").post("/v1/runs", &json!({})).expect_error(401, "unauthorized");
    let basic =
        anonymous.send_with("GET", "/v1/policies", None, &[("authorization", "Basic YTpi")]).expect("transport");
    basic.expect_error(401, "unauthorized");
    // Operations endpoints need no token.
    anonymous.get("/healthz").expect(200);
    anonymous.get("/readyz").expect(200);
    anonymous.get("/openapi.json").expect(200);
    node.client_as(ACME_OPERATOR).get("/v1/policies").expect(200);
}

#[test]
fn roles_are_enforced() {
    let node = Node::start_with_config(&tokens_config());
    let worker = node.client_as(ACME_WORKER);
    let operator = node.client_as(ACME_OPERATOR);
    worker.post("/v1/policies", &budget("pol_w", "tokens", 5)).expect_error(403, "forbidden");
    operator.get("/v1/policies/pol_w").expect_error(404, "not_found");
    worker.get("/v1/policies").expect_error(403, "forbidden");
    worker.get("/v1/prevention-records").expect_error(403, "forbidden");
    // Workers run; operators may do what workers may.
    worker.post("/v1/runs", &json!({ "run_id": "run-w" })).expect(201);
    worker.post("/v1/runs/run-w/steps", &post(0, 1)).expect(200);
    worker.get("/v1/runs/run-w").expect(200);
    worker.get("/v1/runs/run-w/decisions").expect_error(403, "forbidden");
    operator.get("/v1/runs/run-w/decisions").expect(200);
    operator.post("/v1/runs", &json!({ "run_id": "run-o" })).expect(201);

    // Global policies: admins only change them; operators read them alongside their own.
    let mut global = budget("pol_global", "tokens", 1_000_000);
    global["scope"] = json!("global");
    operator.post("/v1/policies", &global).expect_error(403, "forbidden");
    let admin = node.client_as(ADMIN);
    assert_eq!(admin.post("/v1/policies", &global).expect(201)["scope"], "global");
    assert_eq!(operator.get("/v1/policies/pol_global").expect(200)["scope"], "global");
    let listed = operator.get("/v1/policies").expect(200).clone();
    assert!(listed["items"].as_array().unwrap().iter().any(|p| p["id"] == "pol_global"), "{listed}");
    operator.post("/v1/policies/pol_global/mode", &json!({ "mode": "disabled" })).expect_error(403, "forbidden");
    let mut change = global.clone();
    change["expected_version"] = json!(1);
    operator.put("/v1/policies/pol_global", &change).expect_error(403, "forbidden");
    assert_eq!(admin.get("/v1/policies/pol_global").expect(200)["mode"], "active");
    // A new run of any tenant carries the global policy.
    let run = worker.post("/v1/runs", &json!({ "run_id": "run-g" })).expect(201).clone();
    assert_eq!(run["snapshot"]["policy_count"], 1);
}

#[test]
fn x_tenant_is_for_admins_only() {
    let node = Node::start_with_config(&tokens_config());
    let acme = node.client_as(ACME_OPERATOR);
    acme.post("/v1/policies", &budget("pol_acme", "tokens", 5)).expect(201);
    acme.for_tenant("beta").get("/v1/policies").expect_error(403, "forbidden");
    acme.for_tenant("acme").get("/v1/policies").expect_error(403, "forbidden");
    node.client_as(ACME_WORKER).for_tenant("beta").post("/v1/runs", &json!({})).expect_error(403, "forbidden");

    let admin = node.client_as(ADMIN);
    admin.get("/v1/policies/pol_acme").expect_error(404, "not_found");
    let as_acme = admin.for_tenant("acme");
    assert_eq!(as_acme.get("/v1/policies/pol_acme").expect(200)["tenant_id"], "acme");
    let listed = as_acme.get("/v1/policies").expect(200).clone();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert_eq!(listed["items"][0]["id"], "pol_acme");
    // What an admin creates for acme belongs to acme.
    as_acme.post("/v1/policies", &budget("pol_by_admin", "tokens", 5)).expect(201);
    assert_eq!(acme.get("/v1/policies/pol_by_admin").expect(200)["tenant_id"], "acme");
}

#[test]
fn audits_name_the_token_not_the_secret() {
    let node = Node::start_with_config(&tokens_config());
    let acme = node.client_as(ACME_OPERATOR);
    acme.post("/v1/policies", &budget("pol_acme", "tokens", 5)).expect(201);
    acme.post("/v1/policies/pol_acme/mode", &json!({ "mode": "shadow", "reason": "calm" })).expect(200);
    let audit = acme.get("/v1/policies/pol_acme/audit").expect(200).clone();
    let entries = audit["items"].as_array().expect("items");
    assert_eq!(entries.len(), 2);
    assert!(entries.iter().all(|e| e["caller"] == "acme-operator"), "{audit}");
    assert!(!audit.to_string().contains(ACME_OPERATOR.secret));
}

#[test]
fn another_tenants_objects_are_not_found() {
    let node = Node::start_with_config(&tokens_config());
    let acme_op = node.client_as(ACME_OPERATOR);
    let acme_worker = node.client_as(ACME_WORKER);
    acme_op.post("/v1/policies", &budget("pol_acme", "tokens", 5)).expect(201);
    let run = acme_worker.post("/v1/runs", &json!({ "run_id": "run-acme" })).expect(201).clone();
    let snapshot = run["snapshot"]["id"].as_str().expect("snapshot id").to_owned();
    let block = acme_worker.post("/v1/runs/run-acme/steps", &post(0, 10)).expect(200).clone();
    assert_eq!(block["action"], "block");
    let record = block["prevention_record_id"].as_str().expect("record").to_owned();
    acme_worker.post("/v1/runs", &json!({ "run_id": "run-acme-live" })).expect(201);
    // acme itself reads all of it.
    acme_op.get(&format!("/v1/snapshots/{snapshot}")).expect(200);
    acme_op.get(&format!("/v1/prevention-records/{record}")).expect(200);

    let beta = node.client_as(BETA_OPERATOR);
    for path in [
        "/v1/policies/pol_acme".to_owned(),
        "/v1/policies/pol_acme?version=1".to_owned(),
        "/v1/policies/pol_acme/audit".to_owned(),
        "/v1/policies/pol_acme/shadow-stats".to_owned(),
        "/v1/policies/pol_acme/graduation".to_owned(),
        "/v1/runs/run-acme".to_owned(),
        "/v1/runs/run-acme/decisions".to_owned(),
        format!("/v1/prevention-records/{record}"),
        format!("/v1/snapshots/{snapshot}"),
    ] {
        beta.get(&path).expect_error(404, "not_found");
    }
    let mut update = budget("pol_acme", "tokens", 500);
    update["expected_version"] = json!(1);
    beta.put("/v1/policies/pol_acme", &update).expect_error(404, "not_found");
    beta.post("/v1/policies/pol_acme/mode", &json!({ "mode": "disabled" })).expect_error(404, "not_found");
    assert_eq!(beta.get("/v1/prevention-records").expect(200)["items"], json!([]));
    assert_eq!(beta.get("/v1/prevention-records?run_id=run-acme").expect(200)["items"], json!([]));
    assert_eq!(beta.get("/v1/policies").expect(200)["items"], json!([]));

    let beta_worker = node.client_as(BETA_WORKER);
    beta_worker.post("/v1/runs/run-acme-live/steps", &post(0, 1)).expect_error(404, "not_found");
    beta_worker.post("/v1/runs/run-acme-live/end", &json!({ "outcome": "failed" })).expect_error(404, "not_found");
    beta_worker.get("/v1/runs/run-acme-live").expect_error(404, "not_found");
    // Nothing beta tried reached acme's objects.
    let live = acme_worker.get("/v1/runs/run-acme-live").expect(200).clone();
    assert_eq!((live["status"].clone(), live["totals"]["steps"].clone()), (json!("running"), json!(0)));
    assert_eq!(acme_op.get("/v1/policies/pol_acme").expect(200)["version"], 1);
    // beta may use the same run id for its own run.
    let own = beta_worker.post("/v1/runs", &json!({ "run_id": "run-acme" })).expect(201).clone();
    assert_eq!(own["snapshot"]["policy_count"], 0);
    assert_eq!(beta_worker.get("/v1/runs/run-acme").expect(200)["tenant_id"], "beta");
}
