//! Policies: create, versions, optimistic concurrency, listing, modes and their audit, graduation, and
//! the validation of policy documents.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::fixtures::{budget, create_policy};
use crate::harness::{Client, Node};

#[test]
fn create_get_update_and_read_older_versions() {
    let node = Node::start();
    let client = node.client();
    let created = client.post("/v1/policies", &budget("pol_budget", "tokens", 1000)).expect(201).clone();
    assert_eq!(created["id"], "pol_budget");
    assert_eq!(created["version"], 1);
    assert_eq!(created["mode"], "active", "mode defaults to active");
    assert_eq!(created["action"], "block", "action defaults to block");
    assert_eq!(created["precedence"], 100);
    assert_eq!(created["on_error"], "block");
    assert_eq!(created["scope"], "tenant");
    assert_eq!(created["rule"]["max"], 1000);
    assert!(created["created_at"].is_string() && created["updated_at"].is_string());
    assert!(created["activated_at"].is_string(), "a policy created active has activated_at");

    // The same id again is a conflict; the stored policy is untouched.
    client.post("/v1/policies", &budget("pol_budget", "tokens", 5)).expect_error(409, "");
    assert_eq!(client.get("/v1/policies/pol_budget").expect(200), &created);

    let mut update = budget("pol_budget", "tokens", 500);
    update["expected_version"] = json!(1);
    let v2 = client.put("/v1/policies/pol_budget", &update).expect(200).clone();
    assert_eq!(v2["version"], 2);
    assert_eq!(v2["rule"]["max"], 500);
    assert_eq!(client.get("/v1/policies/pol_budget").expect(200)["version"], 2);

    let v1 = client.get("/v1/policies/pol_budget?version=1").expect(200).clone();
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["rule"]["max"], 1000, "older versions stay readable as they were");
    assert_eq!(client.get("/v1/policies/pol_budget?version=2").expect(200)["rule"]["max"], 500);
    client.get("/v1/policies/pol_budget?version=3").expect_error(404, "not_found");
    assert_eq!(
        client.get("/v1/policies/pol_budget?version=0").expect_error(400, "invalid_request")["field"],
        "version"
    );

    // A stale expected_version loses the race and changes nothing.
    let mut stale = budget("pol_budget", "tokens", 1);
    stale["expected_version"] = json!(1);
    let details = client.put("/v1/policies/pol_budget", &stale).expect_error(409, "version_conflict").clone();
    assert_eq!(details["current_version"], 2);
    assert_eq!(client.get("/v1/policies/pol_budget").expect(200)["rule"]["max"], 500);

    // expected_version is required.
    let missing = client.put("/v1/policies/pol_budget", &budget("pol_budget", "tokens", 1));
    assert_eq!(missing.expect_error(400, "invalid_request")["field"], "expected_version");

    client.get("/v1/policies/pol_nope").expect_error(404, "not_found");
    let mut unknown = budget("pol_nope", "tokens", 1);
    unknown["expected_version"] = json!(1);
    client.put("/v1/policies/pol_nope", &unknown).expect_error(404, "not_found");
}

#[test]
fn generated_ids_have_the_pol_prefix() {
    let node = Node::start();
    let doc = json!({ "name": "steps", "rule": { "kind": "budget", "metric": "steps", "per": "run", "max": 3 } });
    let created = create_policy(&node.client(), &doc);
    let id = created["id"].as_str().expect("an id");
    assert!(id.starts_with("pol_"), "generated id {id}");
    node.client().get(&format!("/v1/policies/{id}")).expect(200);
}

fn collect_pages(client: &Client, query: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let path = match &cursor {
            Some(c) => format!("/v1/policies?{query}&cursor={c}"),
            None => format!("/v1/policies?{query}"),
        };
        let page = client.get(&path).expect(200).clone();
        let batch = page["items"].as_array().expect("items").clone();
        assert!(batch.len() <= 2, "a page holds at most `limit` items");
        items.extend(batch);
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return items,
        }
    }
    panic!("pagination did not end");
}

#[test]
fn list_filters_by_mode_and_paginates_with_cursors() {
    let node = Node::start();
    let client = node.client();
    for i in 0..3 {
        create_policy(&client, &budget(&format!("pol_active_{i}"), "tokens", 100));
    }
    for i in 0..2 {
        let mut doc = budget(&format!("pol_shadow_{i}"), "tokens", 100);
        doc["mode"] = json!("shadow");
        create_policy(&client, &doc);
    }
    let all = client.get("/v1/policies").expect(200).clone();
    assert_eq!(all["items"].as_array().expect("items").len(), 5);
    assert!(all["next_cursor"].is_null());

    let shadow = client.get("/v1/policies?mode=shadow").expect(200).clone();
    let shadow_ids: BTreeSet<_> =
        shadow["items"].as_array().expect("items").iter().map(|p| p["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(shadow_ids, BTreeSet::from(["pol_shadow_0".to_owned(), "pol_shadow_1".to_owned()]));
    let active = client.get("/v1/policies?mode=active").expect(200).clone();
    assert_eq!(active["items"].as_array().expect("items").len(), 3);
    assert!(active["items"].as_array().unwrap().iter().all(|p| p["mode"] == "active"));
    assert_eq!(client.get("/v1/policies?mode=disabled").expect(200)["items"], json!([]));

    let first = client.get("/v1/policies?limit=2").expect(200).clone();
    assert_eq!(first["items"].as_array().expect("items").len(), 2);
    assert!(first["next_cursor"].is_string(), "more items follow");
    let paged = collect_pages(&client, "limit=2");
    let ids: BTreeSet<_> = paged.iter().map(|p| p["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!((paged.len(), ids.len()), (5, 5), "every policy exactly once across pages");

    assert_eq!(client.get("/v1/policies?limit=0").expect_error(400, "invalid_request")["field"], "limit");
    assert_eq!(client.get("/v1/policies?limit=1001").expect_error(400, "invalid_request")["field"], "limit");
    client.get("/v1/policies?limit=1000").expect(200);
    client.get("/v1/policies?mode=sleeping").expect_error(400, "invalid_request");
    client.get("/v1/policies?colour=red").expect_error(400, "invalid_request");
}

#[test]
fn mode_changes_are_versioned_and_audited_oldest_first() {
    let node = Node::start();
    let client = node.client();
    let created = create_policy(&client, &budget("pol_modes", "tokens", 100));
    let shadow = client
        .post("/v1/policies/pol_modes/mode", &json!({ "mode": "shadow", "reason": "observe first" }))
        .expect(200)
        .clone();
    assert_eq!(shadow["mode"], "shadow");
    assert_eq!(shadow["version"], 2, "a mode change is a new version");
    assert_eq!(shadow["activated_at"], created["activated_at"], "activated_at is the latest change to active");
    let active = client
        .post("/v1/policies/pol_modes/mode", &json!({ "mode": "active", "reason": "looks good" }))
        .expect(200)
        .clone();
    assert_eq!(active["mode"], "active");
    assert_eq!(active["version"], 3);
    assert!(active["activated_at"].as_str() >= created["activated_at"].as_str());
    assert_ne!(active["activated_at"], created["activated_at"], "re-activation moves activated_at");
    client.post("/v1/policies/pol_modes/mode", &json!({ "mode": "disabled" })).expect(200);

    let audit = client.get("/v1/policies/pol_modes/audit").expect(200).clone();
    let entries = audit["items"].as_array().expect("items");
    let transitions: Vec<_> = entries.iter().map(|e| (e["from"].clone(), e["to"].clone())).collect();
    assert_eq!(
        transitions,
        vec![
            (Value::Null, json!("active")),
            (json!("active"), json!("shadow")),
            (json!("shadow"), json!("active")),
            (json!("active"), json!("disabled")),
        ],
        "audit, oldest first: {audit}"
    );
    assert_eq!(entries[1]["reason"], "observe first");
    assert_eq!(entries[2]["reason"], "looks good");
    for entry in entries {
        assert_eq!(entry["approval_path"], "manual");
        assert_eq!(entry["caller"], "development");
        assert!(entry["at"].is_string());
    }
    let times: Vec<_> = entries.iter().map(|e| e["at"].as_str().unwrap().to_owned()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "oldest first: {times:?}");

    client.post("/v1/policies/pol_modes/mode", &json!({ "mode": "asleep" })).expect_error(400, "invalid_request");
    client.post("/v1/policies/pol_nope/mode", &json!({ "mode": "active" })).expect_error(404, "not_found");
    client.get("/v1/policies/pol_nope/audit").expect_error(404, "not_found");
}

#[test]
fn graduation_and_shadow_stats_of_fresh_policies() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_active", "tokens", 100));
    let mut doc = budget("pol_shadow", "tokens", 100);
    doc["mode"] = json!("shadow");
    create_policy(&client, &doc);

    let active = client.get("/v1/policies/pol_active/graduation").expect(200).clone();
    assert_eq!(active["policy_id"], "pol_active");
    assert_eq!(active["status"], "unproven");
    assert_eq!(active["gate_passed"], false);
    assert_eq!(active["counted_records"], 0);
    assert!(active["activated_at"].is_string());
    let shadow = client.get("/v1/policies/pol_shadow/graduation").expect(200).clone();
    assert_eq!(shadow["status"], "observing");
    assert_eq!(shadow["gate_passed"], false);

    let stats = client.get("/v1/policies/pol_shadow/shadow-stats").expect(200).clone();
    for key in ["evaluations", "would_block", "would_warn", "would_throttle"] {
        assert_eq!(stats[key], 0, "{key} of an unused policy: {stats}");
    }
    client.get("/v1/policies/pol_nope/shadow-stats").expect_error(404, "not_found");
    client.get("/v1/policies/pol_nope/graduation").expect_error(404, "not_found");
}

/// Posts an invalid document and returns the `details.field` of the 400; the policy must not exist after.
#[track_caller]
fn rejected_field(client: &Client, doc: Value) -> String {
    let resp = client.post("/v1/policies", &doc);
    let field = resp.expect_error(400, "invalid_request")["field"].as_str().unwrap_or_default().to_owned();
    if let Some(id) = doc["id"].as_str() {
        client.get(&format!("/v1/policies/{id}")).expect_error(404, "not_found");
    }
    field
}

#[test]
fn invalid_policy_documents_are_rejected_naming_the_field() {
    let node = Node::start();
    let client = node.client();
    let content = |patterns: Value| json!({ "id": "pol_bad", "name": "n", "rule": { "kind": "content", "target": "output", "patterns": patterns } });
    assert_eq!(rejected_field(&client, content(json!(["("]))), "rule.patterns[0]");
    assert_eq!(rejected_field(&client, content(json!(["ok", "[z-a]"]))), "rule.patterns[1]");
    let cel = json!({ "id": "pol_bad", "name": "n", "rule": { "kind": "expr", "cel": "run.tokens >" } });
    assert_eq!(rejected_field(&client, cel), "rule.cel");
    let skills = json!({ "id": "pol_bad", "name": "n", "rule": { "kind": "skill", "allow": [] } });
    assert_eq!(rejected_field(&client, skills), "rule.allow");
    let deny = json!({ "id": "pol_bad", "name": "n", "rule": { "kind": "skill", "deny": [] } });
    assert_eq!(rejected_field(&client, deny), "rule.deny");
    let rate = |window: i64| json!({ "id": "pol_bad", "name": "n", "rule": { "kind": "rate", "metric": "steps", "max": 1, "window_s": window } });
    assert_eq!(rejected_field(&client, rate(0)), "rule.window_s");
    assert_eq!(rejected_field(&client, rate(86_401)), "rule.window_s");
    assert_eq!(rejected_field(&client, rate(-1)), "rule.window_s");
    let mut negative = budget("pol_bad", "tokens", 0);
    negative["rule"]["max"] = json!(-5);
    assert_eq!(rejected_field(&client, negative), "rule.max");
    let mut unknown = budget("pol_bad", "tokens", 10);
    unknown["colour"] = json!("red");
    assert_eq!(rejected_field(&client, unknown), "colour");
    let mut unknown_nested = budget("pol_bad", "tokens", 10);
    unknown_nested["rule"]["colour"] = json!("red");
    assert!(rejected_field(&client, unknown_nested).contains("colour"));
    let mut warn_at = budget("pol_bad", "tokens", 10);
    warn_at["rule"]["warn_at"] = json!([100]);
    assert!(rejected_field(&client, warn_at).starts_with("rule.warn_at"));
    let mut mode = budget("pol_bad", "tokens", 10);
    mode["mode"] = json!("sometimes");
    assert_eq!(rejected_field(&client, mode), "mode");
    let content_empty = json!({ "id": "pol_bad", "name": "n", "rule": { "kind": "content", "target": "output" } });
    assert!(rejected_field(&client, content_empty).starts_with("rule"));
    let bad_id = budget("pol bad/id", "tokens", 10);
    assert_eq!(client.post("/v1/policies", &bad_id).expect_error(400, "invalid_request")["field"], "id");

    // An invalid update is refused too and leaves the policy as it was.
    create_policy(&client, &budget("pol_good", "tokens", 10));
    let bad_update = json!({ "id": "pol_good", "name": "n", "expected_version": 1,
        "rule": { "kind": "content", "target": "output", "patterns": ["("] } });
    let resp = client.put("/v1/policies/pol_good", &bad_update);
    assert_eq!(resp.expect_error(400, "invalid_request")["field"], "rule.patterns[0]");
    let stored = client.get("/v1/policies/pol_good").expect(200).clone();
    assert_eq!((stored["version"].clone(), stored["rule"]["kind"].clone()), (json!(1), json!("budget")));
}

/// SPEC §12.1: within what a tenant sees, one id names one policy. A tenant may not take a global
/// policy's id, an admin may not give a global policy an id a tenant uses, and two creations racing for
/// one id never both succeed.
#[test]
fn a_policy_id_names_one_policy_wherever_a_tenant_sees_it() {
    use crate::harness::{ACME_OPERATOR, ACME_WORKER, ADMIN, BETA_OPERATOR, tokens_config};
    let node = Node::start_with_config(&tokens_config());
    let (admin, acme, beta) = (node.client_as(ADMIN), node.client_as(ACME_OPERATOR), node.client_as(BETA_OPERATOR));
    let global = |id: &str, max: u64| {
        let mut doc = budget(id, "tokens", max);
        doc["scope"] = json!("global");
        doc
    };
    let mut shadow = global("pol_shared", 100);
    shadow["mode"] = json!("shadow");
    admin.post("/v1/policies", &shadow).expect(201);
    acme.post("/v1/policies", &budget("pol_shared", "tokens", 10)).expect_error(409, "policy_id_taken");
    // Ids are unique per tenant view: two tenants may each have `pol_mine`, but no global policy may.
    acme.post("/v1/policies", &budget("pol_mine", "tokens", 10)).expect(201);
    beta.post("/v1/policies", &budget("pol_mine", "tokens", 10)).expect(201);
    admin.post("/v1/policies", &global("pol_mine", 10)).expect_error(409, "policy_id_taken");

    // The one `pol_shared` acme sees is the global shadow policy: it never blocks acme's run.
    let worker = node.client_as(ACME_WORKER);
    crate::fixtures::create_run(&worker, "shared-run");
    let decision = crate::fixtures::step(&worker, "shared-run", &crate::fixtures::post(0, 11));
    assert_eq!(decision["action"], "block", "pol_mine (max 10) blocks: {decision}");
    assert_eq!(decision["deciding_policy"]["id"], "pol_mine", "{decision}");
    assert!(decision["prevention_record_id"].is_string(), "{decision}");

    // Racing creations of one id, tenant against global: exactly one wins, the other is told why.
    for n in 0..6 {
        let id = format!("pol_race_{n}");
        let (own, shared) = (budget(&id, "tokens", 1), global(&id, 1));
        let (acme_race, admin_race) = (acme.clone(), admin.clone());
        let tenant = std::thread::spawn(move || acme_race.post("/v1/policies", &own));
        let everyone = std::thread::spawn(move || admin_race.post("/v1/policies", &shared));
        let (tenant, everyone) = (tenant.join().unwrap(), everyone.join().unwrap());
        let mut statuses = [tenant.status, everyone.status];
        statuses.sort_unstable();
        assert_eq!(statuses, [201, 409], "{id}: tenant {} / global {}", tenant.text, everyone.text);
        let loser = if tenant.status == 409 { &tenant } else { &everyone };
        loser.expect_error(409, "policy_id_taken");
    }
    // Every id in acme's list names exactly one policy.
    let listed = acme.get("/v1/policies?limit=1000").expect(200).clone();
    let ids: Vec<&str> = listed["items"].as_array().unwrap().iter().filter_map(|p| p["id"].as_str()).collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "{ids:?}");
}

/// `GET /v1/policies/{id}/versions` lists every version oldest first, page by page; another tenant's
/// policy is not found.
#[test]
fn a_policys_versions_are_listed_oldest_first_in_pages() {
    let node = Node::start_with_config(&crate::harness::tokens_config());
    let acme = node.client_as(crate::harness::ACME_OPERATOR);
    create_policy(&acme, &budget("pol_v", "tokens", 10));
    for (expected_version, max) in [(1, 20), (2, 30)] {
        let mut doc = budget("pol_v", "tokens", max);
        doc["expected_version"] = json!(expected_version);
        acme.put("/v1/policies/pol_v", &doc).expect(200);
    }
    let first = acme.get("/v1/policies/pol_v/versions?limit=2").expect(200).clone();
    let versions: Vec<_> = first["items"].as_array().unwrap().iter().map(|p| p["version"].clone()).collect();
    assert_eq!(versions, [json!(1), json!(2)]);
    let cursor = first["next_cursor"].as_str().expect("a second page");
    let second = acme.get(&format!("/v1/policies/pol_v/versions?limit=2&cursor={cursor}")).expect(200).clone();
    assert_eq!(second["items"][0]["version"], 3);
    assert_eq!(second["items"][0]["rule"]["max"], 30);
    assert!(second["next_cursor"].is_null());
    acme.get("/v1/policies/pol_v/versions?cursor=zz").expect_error(400, "invalid_request");
    let beta = node.client_as(crate::harness::BETA_OPERATOR);
    beta.get("/v1/policies/pol_v/versions").expect_error(404, "not_found");
}
