//! Operations endpoints and the generic error answers: health, readiness, metrics, OpenAPI, unknown
//! paths and wrong methods.

use serde_json::json;

use crate::fixtures::{budget, create_policy, create_run, post, step};
use crate::harness::Node;

#[test]
fn health_and_readiness_answer_ok() {
    let node = Node::start();
    let client = node.client();
    assert_eq!(client.get("/healthz").expect(200)["status"], "ok");
    assert_eq!(client.get("/readyz").expect(200)["status"], "ready");
}

#[test]
fn metrics_count_decisions_in_prometheus_text() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_tokens", "tokens", 1000));
    create_run(&client, "run-metrics");
    step(&client, "run-metrics", &post(0, 10));
    let metrics = client.get("/metrics");
    assert_eq!(metrics.status, 200);
    let content_type = metrics.header("content-type").unwrap_or_default();
    assert!(content_type.starts_with("text/plain"), "content type {content_type}");
    let line = metrics
        .text
        .lines()
        .find(|l| l.starts_with("runguard_decisions_total") && l.contains("action=\"allow\""))
        .unwrap_or_else(|| panic!("no runguard_decisions_total{{action=\"allow\"}} in:\n{}", metrics.text));
    let count: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a sample value");
    assert!(count >= 2.0, "run start and one step were allowed: {line}");
}

#[test]
fn openapi_is_json_with_paths() {
    let node = Node::start();
    let doc = node.client().get("/openapi.json").expect(200).clone();
    let paths = doc["paths"].as_object().expect("`paths` is an object");
    for path in ["/v1/policies", "/v1/runs", "/v1/runs/{id}/steps", "/v1/prevention-records"] {
        assert!(paths.contains_key(path), "openapi lacks {path}");
    }
}

#[test]
fn unknown_paths_and_wrong_methods_answer_json_errors() {
    let node = Node::start();
    let client = node.client();
    client.get("/v1/nothing-here").expect_error(404, "not_found");
    client.get("/").expect_error(404, "not_found");
    let delete = client.send("DELETE", "/v1/policies", None).expect("transport");
    delete.expect_error(405, "method_not_allowed");
    client.put("/v1/runs", &json!({})).expect_error(405, "method_not_allowed");
    client.post("/healthz", &json!({})).expect_error(405, "method_not_allowed");
}
