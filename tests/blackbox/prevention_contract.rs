//! Property (SPEC §4), through the node's own code paths: for generated policy sets and step sequences,
//! a prevention record exists exactly when an active policy decides a block, and every record follows
//! the contract — never from a shadow policy, a throttle, a warn, another tenant's run, or a request whose
//! signature does not match its pattern policy. One node serves every case; each case uses two fresh
//! tenants (an admin with `X-Tenant`), so cases never see each other's policies.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use runguard_contract::Signature;
use serde_json::{Value, json};

use crate::harness::{ADMIN, Client, Node, tokens_config};

const SKILLS: [&str; 3] = ["fetch", "shell", "search"];
const ENDPOINTS: [&str; 2] = ["/v1/users/", "/v1/orders/"];

fn pattern_signature() -> Signature {
    Signature::normalize(Some("fetch"), Some("/v1/users/1"), &["id".to_owned()])
}

/// Which policies a case creates (each optional) and their limits.
#[derive(Clone, Debug)]
struct Menu {
    budget: Option<u64>,
    shadow_budget: Option<u64>,
    warn_budget: Option<u64>,
    rate: Option<u64>,
    pattern: Option<bool>,
    deny_shell: bool,
}

fn menu() -> impl Strategy<Value = Menu> {
    (
        proptest::option::of(0u64..300),
        proptest::option::of(0u64..100),
        proptest::option::of(0u64..100),
        proptest::option::of(1u64..3),
        proptest::option::of(any::<bool>()),
        any::<bool>(),
    )
        .prop_map(|(budget, shadow_budget, warn_budget, rate, pattern, deny_shell)| Menu {
            budget,
            shadow_budget,
            warn_budget,
            rate,
            pattern,
            deny_shell,
        })
}

/// One step: an optional `pre` (skill, endpoint kind, id) and the `post` tokens.
type Step = (Option<(usize, usize, u32)>, u64);

fn steps() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec((proptest::option::of((0usize..3, 0usize..2, 0u32..1000)), 0u64..120), 1..6)
}

fn policies(menu: &Menu) -> Vec<(Value, &'static str)> {
    let budget = |id: &str, max: u64| {
        json!({ "id": id, "name": id,
        "rule": { "kind": "budget", "metric": "tokens", "per": "run", "max": max } })
    };
    let mut out = Vec::new();
    if let Some(max) = menu.budget {
        out.push((budget("pol_budget", max), "active"));
    }
    if let Some(max) = menu.shadow_budget {
        let mut doc = budget("pol_shadow", max);
        doc["mode"] = json!("shadow");
        out.push((doc, "shadow"));
    }
    if let Some(max) = menu.warn_budget {
        let mut doc = budget("pol_warn", max);
        doc["action"] = json!("warn");
        out.push((doc, "active"));
    }
    if let Some(max) = menu.rate {
        out.push((
            json!({ "id": "pol_rate", "name": "rate", "rule": { "kind": "rate", "metric": "steps", "max": max, "window_s": 60 } }),
            "active",
        ));
    }
    if let Some(active) = menu.pattern {
        let mode = if active { "active" } else { "shadow" };
        out.push((
            json!({ "id": "pol_pattern", "name": "pattern", "mode": mode, "rule": { "kind": "pattern",
                    "pattern_id": "pat_generated", "signature_hash": pattern_signature().hash() } }),
            mode,
        ));
    }
    if menu.deny_shell {
        out.push((
            json!({ "id": "pol_skill", "name": "skill", "rule": { "kind": "skill", "deny": ["shell"] } }),
            "active",
        ));
    }
    out
}

/// Drives one run through `steps`; returns every decision with the call that got it.
fn drive(client: &Client, run_id: &str, steps: &[Step]) -> Result<Vec<(Value, Value)>, TestCaseError> {
    let created = client.post("/v1/runs", &json!({ "run_id": run_id }));
    prop_assert_eq!(created.status, 201, "{}", created.text);
    let mut out = vec![(json!("run_start"), created.body["decision"].clone())];
    for (index, (pre, tokens)) in steps.iter().enumerate() {
        let mut calls = Vec::new();
        if let Some((skill, endpoint, id)) = pre {
            calls.push(json!({ "index": index, "phase": "pre", "skill": SKILLS[*skill],
                               "api_endpoint": format!("{}{id}", ENDPOINTS[*endpoint]), "input_keys": ["id"] }));
        }
        calls.push(json!({ "index": index, "phase": "post", "usage": { "tokens": tokens } }));
        for call in calls {
            let answer = client.post(&format!("/v1/runs/{run_id}/steps"), &call);
            if answer.status == 409 {
                prop_assert_eq!(&answer.body["error"]["code"], "run_not_running", "{}", answer.text);
                return Ok(out);
            }
            prop_assert_eq!(answer.status, 200, "{}", answer.text);
            out.push((call, answer.body.clone()));
        }
    }
    Ok(out)
}

#[test]
fn prevention_records_follow_the_contract() {
    let node = Node::start_with_config(&tokens_config());
    let admin = node.client_as(ADMIN);
    let serial = AtomicU64::new(0);
    let mut runner = crate::harness::property_runner(file!());
    let result = runner.run(&(menu(), steps()), |(menu, steps)| {
        let n = serial.fetch_add(1, Ordering::Relaxed);
        let (owner, other) = (admin.for_tenant(&format!("pc{n}a")), admin.for_tenant(&format!("pc{n}b")));
        let policies = policies(&menu);
        let modes: BTreeMap<String, &str> =
            policies.iter().map(|(doc, mode)| (doc["id"].as_str().unwrap_or_default().to_owned(), *mode)).collect();
        for (doc, _) in &policies {
            let created = owner.post("/v1/policies", doc);
            prop_assert_eq!(created.status, 201, "{}", created.text);
        }
        let owned = drive(&owner, "run", &steps)?;
        let foreign = drive(&other, "run", &steps)?;

        // The other tenant has no policies: nothing it sends ever writes a record.
        prop_assert!(foreign.iter().all(|(_, d)| d["prevention_record_id"].is_null() && d["action"] == "allow"));
        let foreign_records = other.get("/v1/prevention-records").body["items"].as_array().cloned().unwrap_or_default();
        prop_assert!(foreign_records.is_empty());

        let mut expected_records = BTreeMap::new();
        for (call, decision) in &owned {
            let deciding = decision["deciding_policy"]["id"].as_str().unwrap_or_default();
            let active_block = decision["action"] == "block" && modes.get(deciding) == Some(&"active");
            prop_assert_eq!(!decision["prevention_record_id"].is_null(), active_block, "{}", decision);
            if let Some(record) = decision["prevention_record_id"].as_str() {
                expected_records.insert(record.to_owned(), (call.clone(), decision.clone()));
            }
        }
        let records =
            owner.get("/v1/prevention-records?limit=1000").body["items"].as_array().cloned().unwrap_or_default();
        prop_assert_eq!(records.len(), expected_records.len());
        for record in &records {
            let id = record["id"].as_str().unwrap_or_default();
            let Some((call, decision)) = expected_records.get(id) else {
                return Err(TestCaseError::fail(format!("record {id} has no blocking decision")));
            };
            prop_assert_eq!(&record["decision_id"], &decision["decision_id"]);
            prop_assert_eq!(&record["policy_id"], &decision["deciding_policy"]["id"]);
            prop_assert_eq!(&record["tenant_id"], &json!(format!("pc{n}a")));
            prop_assert_eq!(&record["snapshot_hash"], &decision["snapshot_hash"]);
            prop_assert_eq!(&record["is_simulated"], &json!(false));
            if record["policy_id"] == "pol_pattern" {
                // Conditions (1)–(4): the blocked request's own signature is the pattern's.
                let sent = Signature::normalize(
                    call["skill"].as_str(),
                    call["api_endpoint"].as_str(),
                    &call["input_keys"]
                        .as_array()
                        .map(|k| k.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect::<Vec<_>>())
                        .unwrap_or_default(),
                );
                prop_assert_eq!(sent.hash(), pattern_signature().hash());
                prop_assert_eq!(&record["signature_hash"], &json!(pattern_signature().hash()));
                prop_assert_eq!(&record["pattern_id"], "pat_generated");
            } else {
                prop_assert!(record["pattern_id"].is_null() && record["signature_hash"].is_null());
            }
        }
        Ok(())
    });
    if let Err(err) = result {
        panic!("{err}\n--- node log ---\n{}", node.logs());
    }
}

/// SPEC §12.2: a block caused by an evaluation error stops the run and is kept in the ledger and the
/// decisions, but it is a fault, not a prevention: no record, and the decision names none.
#[test]
fn evaluation_error_blocks_stop_the_run_without_a_record() {
    let node = Node::start();
    let client = node.client();
    // `step.skill` is absent from the steps sent below: reading it fails on every call (on_error block).
    let doc = json!({ "id": "pol_faulty", "name": "faulty",
                      "rule": { "kind": "expr", "cel": "step.skill == 'shell'" } });
    client.post("/v1/policies", &doc).expect(201);
    client.post("/v1/runs", &json!({ "run_id": "run-fault" })).expect(201);
    let decision = client
        .post("/v1/runs/run-fault/steps", &json!({ "index": 0, "phase": "post", "usage": { "tokens": 1 } }))
        .expect(200)
        .clone();
    assert_eq!(decision["action"], "block", "{decision}");
    assert_eq!(decision["deciding_policy"]["id"], "pol_faulty");
    assert_eq!(decision["violations"][0]["violation_type"], "evaluation_error");
    assert!(decision["prevention_record_id"].is_null(), "{decision}");

    let run = client.get("/v1/runs/run-fault").expect(200).clone();
    assert_eq!(run["status"], "stopped");
    assert_eq!(run["violation_policy_id"], "pol_faulty");
    let refused = client.post("/v1/runs/run-fault/steps", &json!({ "index": 1, "phase": "post" }));
    refused.expect_error(409, "run_not_running");
    let decisions = client.get("/v1/runs/run-fault/decisions").expect(200).clone();
    assert!(decisions["items"].as_array().is_some_and(|items| items.iter().any(|d| d == &decision)), "{decisions}");
    let records = client.get("/v1/prevention-records?run_id=run-fault").expect(200).clone();
    assert_eq!(records["items"], json!([]), "{records}");
    let records = client.get("/v1/prevention-records").expect(200).clone();
    assert_eq!(records["items"], json!([]), "{records}");
}
