//! The node's log as an operator reads it: an access-log line per request (route template, status,
//! latency, tenant, token name — never the token), and one line per decision with tenant, run, decision
//! and policy, at DEBUG for every decision and at INFO/WARN for throttles, blocks and fail-opens.

use serde_json::{Value, json};

use crate::fixtures::{budget, post};
use crate::harness::{ACME_OPERATOR, ACME_WORKER, ADMIN, BETA_OPERATOR, BETA_WORKER, Node, Resp, tokens_config};

fn lines(node: &Node) -> Vec<Value> {
    node.logs().lines().filter_map(|line| serde_json::from_str::<Value>(line).ok()).collect()
}

fn find<'a>(lines: &'a [Value], message: &str, fields: &[(&str, &str)]) -> Option<&'a Value> {
    lines.iter().find(|line| line["message"] == message && fields.iter().all(|(key, value)| line[*key] == *value))
}

#[track_caller]
fn ok(resp: &Resp, status: u16) -> Value {
    resp.expect(status).clone()
}

#[test]
fn requests_and_decisions_are_logged_with_who_and_what_and_never_the_token() {
    let config =
        format!("log_format = \"json\"\nlog_level = \"info,runguard_node::decision_log=debug\"\n{}", tokens_config());
    let node = Node::start_with_config(&config);
    let (acme, acme_ops) = (node.client_as(ACME_WORKER), node.client_as(ACME_OPERATOR));
    ok(&acme_ops.post("/v1/policies", &budget("pol_budget", "tokens", 100)), 201);
    let open = json!({ "id": "pol_open", "name": "reads a missing field", "on_error": "allow",
                       "rule": { "kind": "expr", "cel": "step.output_text == 'boom'" } });
    ok(&acme_ops.post("/v1/policies", &open), 201);
    let started = ok(&acme.post("/v1/runs", &json!({ "run_id": "run-log" })), 201);
    let allowed = ok(&acme.post("/v1/runs/run-log/steps", &post(0, 10)), 200);
    assert_eq!(allowed["action"], "allow", "{allowed}");
    let blocked = ok(&acme.post("/v1/runs/run-log/steps", &post(1, 200)), 200);
    assert_eq!(blocked["action"], "block", "{blocked}");

    let (beta, beta_ops) = (node.client_as(BETA_WORKER), node.client_as(BETA_OPERATOR));
    let rate = json!({ "id": "pol_rate", "name": "one step a minute",
                       "rule": { "kind": "rate", "metric": "steps", "max": 1, "window_s": 60, "scope": "tenant" } });
    ok(&beta_ops.post("/v1/policies", &rate), 201);
    for run in ["run-b1", "run-b2"] {
        ok(&beta.post("/v1/runs", &json!({ "run_id": run })), 201);
    }
    ok(&beta.post("/v1/runs/run-b1/steps", &json!({ "index": 0, "phase": "pre" })), 200);
    let throttled = ok(&beta.post("/v1/runs/run-b2/steps", &json!({ "index": 0, "phase": "pre" })), 200);
    assert_eq!(throttled["action"], "throttle", "{throttled}");
    // Refused requests are logged too, with whatever identity was established.
    node.client().with_secret("wrong-secret").get("/v1/policies").expect_error(401, "unauthorized");
    node.client_as(ADMIN).for_tenant("acme").get("/v1/runs/run-log").expect(200);
    std::thread::sleep(std::time::Duration::from_millis(200));

    let logs = node.logs();
    for secret in [ACME_WORKER.secret, ACME_OPERATOR.secret, BETA_WORKER.secret, ADMIN.secret, "wrong-secret"] {
        assert!(!logs.contains(secret), "a token reached the log");
    }
    let lines = lines(&node);
    let step = find(&lines, "request", &[("method", "POST"), ("route", "/v1/runs/{id}/steps"), ("run_id", "run-log")])
        .unwrap_or_else(|| panic!("no access-log line for a step call:\n{logs}"));
    assert_eq!((step["tenant"].as_str(), step["token_name"].as_str()), (Some("acme"), Some("acme-worker")), "{step}");
    assert_eq!(step["status"], 200, "{step}");
    let decisions = [allowed["decision_id"].clone(), blocked["decision_id"].clone()];
    assert!(decisions.contains(&step["decision_id"]), "the step's line names its decision: {step}");
    assert!(step["latency_us"].is_u64(), "{step}");
    assert_eq!(step["level"], "INFO", "{step}");
    let refused =
        find(&lines, "request", &[("route", "/v1/policies"), ("method", "GET")]).filter(|l| l["status"] == 401);
    assert!(refused.is_some_and(|l| l["token_name"].is_null()), "no access-log line for the 401:\n{logs}");
    let admin = find(&lines, "request", &[("route", "/v1/runs/{id}"), ("token_name", "root")]);
    assert!(admin.is_some_and(|l| l["tenant"] == "acme"), "an admin's line names the tenant it acted for:\n{logs}");

    let id = |decision: &Value| decision["decision_id"].as_str().unwrap_or_default().to_owned();
    let block = find(&lines, "run stopped by a block", &[("decision_id", &id(&blocked))])
        .unwrap_or_else(|| panic!("no block line:\n{logs}"));
    assert_eq!((block["level"].as_str(), block["tenant"].as_str()), (Some("WARN"), Some("acme")), "{block}");
    assert_eq!(
        (block["run_id"].as_str(), block["policy_id"].as_str()),
        (Some("run-log"), Some("pol_budget")),
        "{block}"
    );
    let throttle = find(&lines, "call throttled", &[("decision_id", &id(&throttled))])
        .unwrap_or_else(|| panic!("no throttle line:\n{logs}"));
    assert_eq!((throttle["level"].as_str(), throttle["tenant"].as_str()), (Some("INFO"), Some("beta")), "{throttle}");
    assert_eq!((throttle["run_id"].as_str(), throttle["policy_id"].as_str()), (Some("run-b2"), Some("pol_rate")));
    let open = find(&lines, "policy failed open (on_error: allow)", &[("decision_id", &id(&allowed))])
        .unwrap_or_else(|| panic!("no fail-open line:\n{logs}"));
    assert_eq!((open["tenant"].as_str(), open["run_id"].as_str()), (Some("acme"), Some("run-log")), "{open}");
    assert_eq!((open["policy_id"].as_str(), open["level"].as_str()), (Some("pol_open"), Some("WARN")), "{open}");
    let allow = find(&lines, "decision", &[("decision_id", &id(&allowed))])
        .unwrap_or_else(|| panic!("no DEBUG line for an allow:\n{logs}"));
    assert_eq!(
        (allow["level"].as_str(), allow["action"].as_str(), allow["tenant"].as_str()),
        (Some("DEBUG"), Some("allow"), Some("acme"))
    );
    assert_eq!(allow["phase"], "post", "{allow}");
    let start = find(&lines, "decision", &[("decision_id", &id(&started["decision"]))])
        .unwrap_or_else(|| panic!("no line for the run-start decision:\n{logs}"));
    assert_eq!((start["phase"].as_str(), start["run_id"].as_str()), (Some("run_start"), Some("run-log")), "{start}");
}
