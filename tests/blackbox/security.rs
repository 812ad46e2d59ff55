//! Security (SPEC §2.1, §8, §9), beside `isolation.rs` and `bad_input.rs`: another tenant's object is
//! answered exactly like a never-created one (no existence oracle), secrets never reach the log,
//! pathological regexes and CEL are refused at validation or bounded at evaluation, and every field limit
//! is enforced with a 400 that names the field.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Value, json};

use crate::fixtures::{budget, create_run, post, step};
use crate::harness::{
    ACME_OPERATOR, ACME_WORKER, ADMIN, BETA_OPERATOR, BETA_WORKER, Client, Node, Resp, tokens_config,
};

/// A 404 with the id replaced, so that answers about different ids compare equal.
fn masked(resp: &Resp, id: &str) -> (u16, String) {
    (resp.status, resp.text.replace(id, "<id>"))
}

#[test]
fn another_tenants_ids_answer_exactly_like_unknown_ones() {
    let node = Node::start_with_config(&tokens_config());
    let (acme_op, acme_worker) = (node.client_as(ACME_OPERATOR), node.client_as(ACME_WORKER));
    let (beta_op, beta_worker) = (node.client_as(BETA_OPERATOR), node.client_as(BETA_WORKER));
    acme_op.post("/v1/policies", &budget("pol_blocker", "tokens", 0)).expect(201);
    let serial = std::sync::atomic::AtomicU64::new(0);
    let mut runner = crate::harness::property_runner(file!());
    let result = runner.run(&"[A-Za-z0-9][A-Za-z0-9._:-]{0,30}", |raw| {
        let n = serial.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (existing, absent) = (format!("{raw}-{n}"), format!("{raw}-{n}-absent"));
        let run = acme_worker.post("/v1/runs", &json!({ "run_id": existing }));
        prop_assert_eq!(run.status, 201, "{}", run.text);
        let block = acme_worker.post(&format!("/v1/runs/{existing}/steps"), &post(0, 1));
        let record = block.body["prevention_record_id"].as_str().unwrap_or_default().to_owned();
        let mut doc = budget(&existing, "tokens", 1);
        doc["mode"] = json!("disabled");
        prop_assert_eq!(acme_op.post("/v1/policies", &doc).status, 201);

        let probes: [(&Client, &str, &str, Option<Value>); 8] = [
            (&beta_op, "GET", "/v1/policies/{}", None),
            (&beta_op, "GET", "/v1/policies/{}/audit", None),
            (&beta_op, "POST", "/v1/policies/{}/mode", Some(json!({ "mode": "active" }))),
            (&beta_worker, "GET", "/v1/runs/{}", None),
            (&beta_op, "GET", "/v1/runs/{}/decisions", None),
            (&beta_worker, "POST", "/v1/runs/{}/steps", Some(post(1, 1))),
            (&beta_worker, "POST", "/v1/runs/{}/end", Some(json!({ "outcome": "failed" }))),
            (&beta_op, "GET", "/v1/prevention-records?run_id={}", None),
        ];
        for (client, method, template, body) in probes {
            let send = |id: &str| {
                let bytes = body.as_ref().map(|b| b.to_string().into_bytes());
                client.send(method, &template.replace("{}", id), bytes).expect("transport")
            };
            let (seen, unseen) = (send(&existing), send(&absent));
            prop_assert_eq!(masked(&seen, &existing), masked(&unseen, &absent), "{} {}", method, template);
        }
        let (seen, unseen) = (format!("/v1/prevention-records/{record}"), "/v1/prevention-records/prv_absent");
        prop_assert_eq!(beta_op.get(&seen).status, 404);
        prop_assert_eq!(masked(&beta_op.get(&seen), &record), masked(&beta_op.get(unseen), "prv_absent"), "records");
        Ok::<(), TestCaseError>(())
    });
    if let Err(err) = result {
        panic!("{err}\n{runner}");
    }
}

#[test]
fn secrets_never_reach_the_log() {
    let config = format!("log_level = \"debug\"\n{}", tokens_config());
    let mut node = Node::start_with_config(&config);
    let worker = node.client_as(ACME_WORKER);
    node.client_as(ACME_OPERATOR).post("/v1/policies", &budget("pol_b", "tokens", 5)).expect(201);
    create_run(&worker, "run-log");
    step(&worker, "run-log", &post(0, 10));
    node.client_as(ADMIN).for_tenant("acme").get("/v1/runs/run-log").expect(200);
    let wrong = "wrong-secret-9f2c1d";
    node.client().with_secret(wrong).get("/v1/runs/run-log").expect_error(401, "unauthorized");
    node.client_as(BETA_WORKER).for_tenant("acme").get("/v1/runs/run-log").expect_error(403, "forbidden");
    assert!(node.terminate().success());
    let logs = node.logs();
    assert!(logs.contains("run-log"), "the debug log covers the calls:\n{logs}");
    for secret in [ACME_WORKER.secret, ACME_OPERATOR.secret, ADMIN.secret, BETA_WORKER.secret, wrong] {
        assert!(!logs.contains(secret), "the log contains a bearer token");
    }
}

#[test]
fn pathological_regexes_and_cel_are_refused_or_bounded() {
    let node = Node::start();
    let client = node.client();
    let content = |pattern: &str| json!({ "name": "re", "rule": { "kind": "content", "target": "output", "patterns": [pattern] } });
    // Exponential-size regexes are refused by the compiled-size limit.
    for pattern in ["((a{100}){100}){100}", "(\\w{500}){500}", "[\\p{L}\\p{N}]{1000}{1000}"] {
        let resp = client.post("/v1/policies", &content(pattern));
        assert_eq!(resp.expect_error(400, "invalid_request")["field"], "rule.patterns[0]", "{pattern}");
    }
    // Catastrophic-backtracking shapes are accepted (the regex engine is linear) and stay fast on the
    // largest text a step may carry.
    for pattern in ["(a+)+$", "(a|aa)*c", "(.*a){20}"] {
        client.post("/v1/policies", &content(pattern)).expect(201);
    }
    // Exponential CEL: nested comprehensions over the static cost bound, and deep nesting.
    let cel = |source: String| json!({ "name": "cel", "rule": { "kind": "expr", "cel": source } });
    let nested = "step.input_keys.all(a, step.input_keys.all(b, step.input_keys.all(c, a == b && b == c)))";
    let resp = client.post("/v1/policies", &cel(nested.to_owned()));
    assert_eq!(resp.expect_error(400, "invalid_request")["field"], "rule.cel");
    // Deep nesting once aborted the node with a stack overflow (in the CEL parser at validation, and in
    // the interpreter at evaluation): it is refused now, naming the field.
    for deep in [
        format!("{}true{}", "(".repeat(1000), ")".repeat(1000)),
        format!("{}1{}", "[".repeat(1000), "]".repeat(1000)),
        format!("{}'x'{} > 0", "size(".repeat(100), ")".repeat(100)),
        format!("{}1{} == 1", "{1: ".repeat(100), "}".repeat(100)),
        (0..300).map(|_| "run.steps").collect::<Vec<_>>().join(" + ") + " > 0",
    ] {
        let resp = client.post("/v1/policies", &cel(deep));
        assert_eq!(resp.expect_error(400, "invalid_request")["field"], "rule.cel");
    }
    for deep in [
        format!("{}true", "!".repeat(4000)),
        format!("{}0 > 1", "-".repeat(4000)),
        format!("{}run.steps >= 0{}", "(".repeat(32), ")".repeat(32)),
        (0..40).map(|_| "run.steps").collect::<Vec<_>>().join(" + ") + " >= 0",
        format!("run{} == 1", ".a".repeat(40)),
    ] {
        let resp = client.post("/v1/policies", &cel(deep.clone()));
        assert!(matches!(resp.status, 201 | 400), "deep CEL answered {}: {}", resp.status, resp.text);
        client.get("/healthz").expect(200);
    }
    let resp = client.post("/v1/policies", &cel("x".repeat(5000)));
    assert_eq!(resp.expect_error(400, "invalid_request")["field"], "rule.cel");

    create_run(&client, "run-patho");
    let text = format!("{}b", "a".repeat(256 * 1024 - 1));
    let started = Instant::now();
    let call = json!({ "index": 0, "phase": "post", "usage": { "tokens": 1 }, "output_text": text });
    let decision = step(&client, "run-patho", &call);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "evaluating pathological rules on 256 KiB took {took:?}");
    assert!(decision["action"].is_string());
}

#[test]
fn field_limits_are_enforced_naming_the_field() {
    let node = Node::start();
    let client = node.client();
    create_run(&client, "run-lim");
    let field = |call: Value| -> String {
        let resp = client.post("/v1/runs/run-lim/steps", &call);
        resp.expect_error(400, "invalid_request")["field"].as_str().unwrap_or_default().to_owned()
    };
    let over_text = "x".repeat(256 * 1024 + 1);
    assert_eq!(field(json!({ "index": 0, "phase": "post", "output_text": over_text })), "output_text");
    assert_eq!(field(json!({ "index": 0, "phase": "pre", "input_text": over_text })), "input_text");
    assert_eq!(field(json!({ "index": 0, "phase": "pre", "skill": "s".repeat(2049) })), "skill");
    assert_eq!(field(json!({ "index": 0, "phase": "pre", "api_endpoint": "/".repeat(2049) })), "api_endpoint");
    let keys: Vec<String> = (0..257).map(|i| format!("k{i}")).collect();
    assert!(field(json!({ "index": 0, "phase": "pre", "input_keys": keys })).starts_with("input_keys"));
    let over_u64 = br#"{"index":0,"phase":"post","usage":{"tokens":18446744073709551616}}"#.to_vec();
    let resp = client.send("POST", "/v1/runs/run-lim/steps", Some(over_u64)).expect("transport");
    assert_eq!(resp.expect_error(400, "invalid_request")["field"], "usage.tokens");
    // Run labels and policy lists.
    let labels: serde_json::Map<String, Value> = (0..65).map(|i| (format!("l{i}"), json!("v"))).collect();
    client.post("/v1/runs", &json!({ "labels": labels })).expect_error(400, "invalid_request");
    let many: Vec<String> = (0..65).map(|i| format!("p{i}")).collect();
    let doc = json!({ "name": "n", "rule": { "kind": "content", "target": "output", "patterns": many } });
    assert!(
        client.post("/v1/policies", &doc).expect_error(400, "invalid_request")["field"]
            .as_str()
            .is_some_and(|f| f.starts_with("rule.patterns"))
    );
    let doc =
        json!({ "name": "n".repeat(257), "rule": { "kind": "budget", "metric": "tokens", "per": "run", "max": 1 } });
    assert_eq!(client.post("/v1/policies", &doc).expect_error(400, "invalid_request")["field"], "name");
    // None of that touched the run.
    assert_eq!(client.get("/v1/runs/run-lim").expect(200)["next"], json!({ "index": 0, "phase": "pre" }));
}

/// The median time of `n` GETs of `path`, each answered `status`.
fn median_time(client: &Client, path: &str, status: u16, n: usize) -> Duration {
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let started = Instant::now();
            assert_eq!(client.get(path).status, status, "GET {path}");
            started.elapsed()
        })
        .collect();
    times.sort();
    times[n / 2]
}

#[test]
fn snapshots_match_exactly_and_another_tenants_cost_nothing_to_refuse() {
    const POLICIES: usize = 150;
    let node = Node::start_with_config(&tokens_config());
    let (acme_op, acme_worker) = (node.client_as(ACME_OPERATOR), node.client_as(ACME_WORKER));
    for n in 0..POLICIES {
        let mut doc = budget(&format!("pol_{n}"), "tokens", 1_000_000);
        doc["name"] = json!(format!("{n} {}", "x".repeat(200)));
        acme_op.post("/v1/policies", &doc).expect(201);
    }
    let id = create_run(&acme_worker, "run-big")["snapshot"]["id"].as_str().expect("snapshot id").to_owned();
    acme_op.get(&format!("/v1/snapshots/{id}")).expect(200);
    // Ids are exact: neither a bare prefix nor a shortened id names a snapshot.
    for partial in ["snp_", &id[..6], &id[..12], &id[..id.len() - 1]] {
        acme_op.get(&format!("/v1/snapshots/{partial}")).expect_error(404, "not_found");
    }

    let beta = node.client_as(BETA_OPERATOR);
    let unknown = "snp_00000000000000000000000000000000";
    median_time(&beta, &format!("/v1/snapshots/{id}"), 404, 5);
    let foreign = median_time(&beta, &format!("/v1/snapshots/{id}"), 404, 21);
    let never = median_time(&beta, &format!("/v1/snapshots/{unknown}"), 404, 21);
    eprintln!("another tenant's {POLICIES}-policy snapshot: 404 in {foreign:?}; an unknown id: {never:?}");
    assert!(foreign < never * 3 + Duration::from_millis(2), "{foreign:?} vs {never:?}");
    // And an admin reads any snapshot.
    node.client_as(ADMIN).get(&format!("/v1/snapshots/{id}")).expect(200);
}
