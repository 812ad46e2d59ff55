//! The OpenAPI document the node serves: complete enough to generate a client and to fuzz the node with
//! (schemathesis), and checked against every answer the other tests receive (`contract.rs`).

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::contract::Contract;
use crate::harness::{Node, Resp, run_cli};

fn document() -> Value {
    let node = Node::start();
    node.client().get("/openapi.json").expect(200).clone()
}

fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut found = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            found.push((method.clone(), path.clone(), operation.clone()));
        }
    }
    found
}

fn statuses(operation: &Value) -> BTreeSet<u16> {
    operation["responses"].as_object().expect("responses").keys().map(|s| s.parse().expect("a status")).collect()
}

#[test]
fn every_operation_has_an_id_tags_parameters_bodies_and_answer_schemas() {
    let doc = document();
    let version = run_cli(&["--version".as_ref()]);
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    assert_eq!(version, format!("runguard {}", doc["info"]["version"].as_str().expect("info.version")));
    assert_ne!(doc["info"]["version"], "0.0.0");
    let operations = operations(&doc);
    assert!(operations.len() >= 30, "only {} operations", operations.len());
    let mut ids = BTreeSet::new();
    for (method, path, operation) in &operations {
        let at = format!("{method} {path}");
        let id = operation["operationId"].as_str().unwrap_or_else(|| panic!("{at} has no operationId"));
        assert!(ids.insert(id.to_owned()), "operationId {id} repeats");
        assert!(operation["tags"].as_array().is_some_and(|tags| !tags.is_empty()), "{at} has no tag");
        for (status, response) in operation["responses"].as_object().expect("responses") {
            let content = response["content"].as_object().unwrap_or_else(|| panic!("{at} {status} has no content"));
            let (media_type, media) = content.iter().next().expect("a media type");
            let schema = &media["schema"];
            assert!(schema.is_object(), "{at} {status} has no schema");
            if media_type == "application/json" && path != "/openapi.json" {
                assert!(schema.get("$ref").is_some(), "{at} {status} answers an undescribed object: {schema}");
            }
            if matches!(status.as_str(), "429" | "503") {
                assert_eq!(response["headers"]["Retry-After"]["required"], true, "{at} {status} lacks Retry-After");
            }
        }
        let protected = operation["security"].as_array().is_some_and(|s| !s.is_empty());
        assert_eq!(protected, statuses(operation).contains(&401), "{at}: 401 declared iff a token is needed");
        if method != "get" && operation["responses"].get("413").is_some() {
            assert!(operation["requestBody"]["content"]["application/json"]["schema"].is_object(), "{at} body");
        }
        if method == "get" {
            assert!(!statuses(operation).contains(&413), "{at} declares 413 but reads no body");
        }
    }
    let op = |method: &str, path: &str| doc["paths"][path][method].clone();
    assert_eq!(statuses(&op("get", "/healthz")), BTreeSet::from([200]));
    assert!(op("get", "/metrics")["responses"]["200"]["content"]["text/plain"].is_object());
    assert_eq!(
        statuses(&op("post", "/v1/runs")),
        BTreeSet::from([200, 201, 400, 401, 403, 404, 408, 409, 413, 415, 429, 503])
    );
    let parameters: BTreeSet<String> = op("get", "/v1/prevention-records")["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .filter(|p| p["in"] == "query")
        .map(|p| p["name"].as_str().expect("a name").to_owned())
        .collect();
    let expected = ["policy_id", "run_id", "since", "until", "simulated", "limit", "cursor"];
    assert_eq!(parameters, expected.iter().map(|s| (*s).to_owned()).collect());
    let limit = op("get", "/v1/policies")["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .find(|p| p["name"] == "limit")
        .cloned();
    assert_eq!(limit.expect("limit")["schema"]["maximum"], 1000);
    // The policy document is described as the node reads it, integers bounded as the node bounds them.
    let create = op("post", "/v1/policies")["requestBody"]["content"]["application/json"]["schema"].to_string();
    assert!(create.contains("\"window_s\"") && create.contains("9007199254740991"), "{create}");
    let update = &op("put", "/v1/policies/{id}")["requestBody"]["content"]["application/json"]["schema"];
    assert!(update["required"].as_array().expect("required").contains(&json!("expected_version")));
}

#[test]
fn answers_link_to_the_operations_they_lead_to() {
    let doc = document();
    let links = |method: &str, path: &str, status: &str| -> BTreeSet<String> {
        doc["paths"][path][method]["responses"][status]["links"]
            .as_object()
            .map(|links| links.values().map(|l| l["operationId"].as_str().expect("operationId").to_owned()).collect())
            .unwrap_or_default()
    };
    let ids: BTreeSet<String> =
        operations(&doc).iter().map(|(_, _, op)| op["operationId"].as_str().expect("id").to_owned()).collect();
    for (method, path, operation) in operations(&doc) {
        for response in operation["responses"].as_object().expect("responses").values() {
            for link in response["links"].as_object().into_iter().flat_map(|l| l.values()) {
                assert!(ids.contains(link["operationId"].as_str().expect("id")), "{method} {path}: dangling {link}");
            }
        }
    }
    assert!(links("post", "/v1/runs", "201").is_superset(&BTreeSet::from(["createStep".into(), "getRun".into()])));
    assert!(links("post", "/v1/runs/{id}/steps", "200").contains("listDecisions"));
    let policy = links("post", "/v1/policies", "201");
    for target in ["listPolicyAudit", "getPolicyShadowStats", "getPolicyGraduation"] {
        assert!(policy.contains(target), "createPolicy does not link {target}");
    }
    assert!(links("get", "/v1/prevention-records/{id}", "200").contains("regretPreventionRecord"));
}

/// The checker of `contract.rs` refuses what the document does not say.
#[test]
fn answers_that_drift_from_the_document_fail() {
    let contract = Contract::new(&document());
    let resp = |status: u16, text: &str| Resp {
        status,
        headers: Default::default(),
        text: text.to_owned(),
        body: serde_json::from_str(text).unwrap_or(Value::Null),
    };
    contract.check("GET", "/healthz", &resp(200, r#"{"status":"ok"}"#));
    let drifts = [
        ("GET", "/healthz", resp(401, r#"{"error":{"code":"unauthorized","message":"m","details":{}}}"#)),
        ("GET", "/healthz", resp(200, r#"{"state":"ok"}"#)),
        ("GET", "/v1/runs/r1", resp(200, r#"{"run_id":"r1"}"#)),
        ("POST", "/v1/runs/r1/steps", resp(429, r#"{"error":{"code":"overloaded","message":"m","details":{}}}"#)),
        ("GET", "/v1/policies", resp(400, r#"{"error":"bad"}"#)),
    ];
    for (method, path, answer) in drifts {
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| contract.check(method, path, &answer)));
        assert!(caught.is_err(), "{method} {path} {} {} passed", answer.status, answer.text);
    }
}

/// openapi-spec-validator, where the machine has it (CI's Python venv does not need it).
#[test]
fn the_document_is_valid_openapi_3_1() {
    let doc = document();
    let python = std::env::var("RUNGUARD_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let probe = Command::new(&python).args(["-c", "import openapi_spec_validator"]).stderr(Stdio::null()).status();
    if !probe.is_ok_and(|status| status.success()) {
        eprintln!("SKIPPED: openapi-spec-validator is not installed for `{python}`; the structural tests still ran");
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, doc.to_string()).expect("write the document");
    let out = Command::new(&python)
        .args([
            "-c",
            "import json,sys; from openapi_spec_validator import validate; validate(json.load(open(sys.argv[1])))",
        ])
        .arg(&file)
        .output()
        .expect("python runs");
    assert!(out.status.success(), "openapi-spec-validator: {}", String::from_utf8_lossy(&out.stderr));
}
