//! Evaluation semantics seen over HTTP: inclusive limits, warn tiers, per-step and step budgets,
//! conflict resolution, content evidence redaction, CEL failure modes, skills, tenant-wide rates,
//! run expiry, the node's configured limits, what the ledger keeps of texts, and run-start policies.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fixtures::{budget, create_policy, create_run, post, pre, step};
use crate::harness::{Client, Node};

fn rule_policy(id: &str, rule: Value) -> Value {
    json!({ "id": id, "name": id, "rule": rule })
}

#[test]
fn limits_are_inclusive_and_max_zero_allows_nothing() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &budget("pol_zero", "cost_micros", 0));
    create_policy(&client, &budget("pol_tokens", "tokens", 10));
    create_run(&client, "run-1");
    assert_eq!(step(&client, "run-1", &post(0, 10))["action"], "allow", "a total equal to max is allowed");
    let spend = step(&client, "run-1", &json!({ "index": 1, "phase": "post", "usage": { "cost_micros": 1 } }));
    assert_eq!(spend["action"], "block");
    assert_eq!(spend["deciding_policy"]["id"], "pol_zero");
    assert_eq!(spend["violations"][0]["violation_type"], "cost_limit");
}

#[test]
fn warn_tiers_warn_once_each() {
    let node = Node::start();
    let client = node.client();
    let mut doc = budget("pol_warn", "tokens", 100);
    doc["rule"]["warn_at"] = json!([50, 80]);
    create_policy(&client, &doc);
    create_run(&client, "run-w");
    let actions: Vec<_> = [55, 1, 30, 1, 13]
        .iter()
        .enumerate()
        .map(|(i, tokens)| step(&client, "run-w", &post(i as u64, *tokens)))
        .collect();
    let summary: Vec<_> = actions.iter().map(|d| d["action"].as_str().unwrap().to_owned()).collect();
    assert_eq!(summary, ["warn", "allow", "warn", "allow", "allow"], "{actions:?}");
    assert_eq!(actions[0]["violations"][0]["violation_type"], "budget_warning");
    assert_eq!(actions[4]["remaining"]["tokens"], 0);
    assert_eq!(step(&client, "run-w", &post(5, 1))["action"], "block");
}

#[test]
fn per_step_budgets_steps_budgets_and_precedence() {
    let node = Node::start();
    let client = node.client();
    let mut per_step = budget("pol_b_step", "tokens", 10);
    per_step["rule"]["per"] = json!("step");
    per_step["precedence"] = json!(50);
    create_policy(&client, &per_step);
    let mut steps = budget("pol_a_steps", "steps", 2);
    steps["precedence"] = json!(50);
    create_policy(&client, &steps);
    let mut run_tokens = budget("pol_c_run", "tokens", 25);
    run_tokens["precedence"] = json!(10);
    create_policy(&client, &run_tokens);

    create_run(&client, "run-p");
    assert_eq!(step(&client, "run-p", &post(0, 10))["action"], "allow");
    assert_eq!(step(&client, "run-p", &post(1, 10))["action"], "allow");
    // Step 2 at pre: steps + 1 > 2 violates the steps budget.
    let at_pre = step(&client, "run-p", &pre(2));
    assert_eq!(at_pre["action"], "block", "{at_pre}");
    assert_eq!(at_pre["violations"][0]["violation_type"], "step_limit");

    // All violations listed; the lowest precedence decides, ties broken by id.
    create_run(&client, "run-q");
    let many = step(&client, "run-q", &post(0, 30));
    assert_eq!(many["action"], "block");
    assert_eq!(many["deciding_policy"]["id"], "pol_c_run", "precedence 10 wins: {many}");
    let mut violated: Vec<_> = many["violations"].as_array().unwrap().iter().map(|v| v["policy_id"].clone()).collect();
    violated.sort_by_key(|v| v.to_string());
    assert_eq!(violated, vec![json!("pol_b_step"), json!("pol_c_run")]);

    client.post("/v1/policies/pol_c_run/mode", &json!({ "mode": "disabled" })).expect(200);
    let mut tie = budget("pol_a_tokens", "tokens", 5);
    tie["precedence"] = json!(50);
    create_policy(&client, &tie);
    create_run(&client, "run-r");
    let tied = step(&client, "run-r", &post(0, 30));
    assert_eq!(tied["deciding_policy"]["id"], "pol_a_tokens", "ties are broken by id: {tied}");
}

#[test]
fn content_evidence_is_redacted_everywhere() {
    let node = Node::start();
    let client = node.client();
    let rule = json!({ "kind": "content", "target": "output", "detectors": ["email"], "keywords": ["zebracorn"] });
    create_policy(&client, &rule_policy("pol_pii", rule));
    create_run(&client, "run-c");
    let secret = "alice.smith@example.com";
    let call = json!({ "index": 0, "phase": "post", "usage": { "tokens": 1 },
        "output_text": format!("write to {secret} about the zebracorn") });
    let block = step(&client, "run-c", &call);
    assert_eq!(block["action"], "block");
    let violation = &block["violations"][0];
    assert_eq!(violation["violation_type"], "content_policy");
    let matches = violation["evidence"]["matches"].as_array().expect("evidence matches");
    let email = matches.iter().find(|m| m["name"] == "email").expect("the email detector matched");
    assert_eq!(email["count"], 1);
    for sample in email["samples"].as_array().unwrap() {
        let sample = sample.as_str().unwrap();
        assert!(sample.starts_with("al") && sample.ends_with("om") && sample != secret, "sample {sample}");
    }
    let record_id = block["prevention_record_id"].as_str().unwrap();
    let record = client.get(&format!("/v1/prevention-records/{record_id}")).expect(200).to_string();
    let decisions = client.get("/v1/runs/run-c/decisions").expect(200).to_string();
    let metrics = client.get("/metrics").text;
    for (what, text) in
        [("decision", block.to_string()), ("record", record), ("decisions", decisions), ("metrics", metrics)]
    {
        assert!(!text.contains(secret), "the matched email appears in the {what}");
        assert!(!text.contains("zebracorn"), "the matched keyword appears in the {what}");
    }
}

#[test]
fn cel_failures_follow_on_error() {
    let node = Node::start();
    let client = node.client();
    // Reading an absent field is an evaluation error, not false.
    let mut warn = rule_policy("pol_cel_warn", json!({ "kind": "expr", "cel": "step.skill == 'x'" }));
    warn["on_error"] = json!("warn");
    create_policy(&client, &warn);
    let mut allow = rule_policy("pol_cel_allow", json!({ "kind": "expr", "cel": "step.api_endpoint == 'x'" }));
    allow["on_error"] = json!("allow");
    create_policy(&client, &allow);
    create_run(&client, "run-cel");
    let decision = step(&client, "run-cel", &post(0, 1));
    assert_eq!(decision["action"], "warn", "{decision}");
    assert_eq!(decision["deciding_policy"]["id"], "pol_cel_warn");
    let violations = decision["violations"].as_array().unwrap();
    let warned = violations.iter().find(|v| v["policy_id"] == "pol_cel_warn").expect("the warn policy's violation");
    assert_eq!(
        (warned["violation_type"].clone(), warned["action"].clone()),
        (json!("evaluation_error"), json!("warn"))
    );
    // on_error allow skips the policy: if it is listed at all, it is as an `allow`.
    for skipped in violations.iter().filter(|v| v["policy_id"] == "pol_cel_allow") {
        assert_eq!(skipped["action"], "allow", "{decision}");
    }
    let metrics = client.get("/metrics").text;
    assert!(metrics.lines().any(|l| l.starts_with("runguard_fail_open_total")), "fail-open is never silent");

    // The default on_error blocks (fail closed); a guarded expression does not fail.
    let strict = rule_policy("pol_cel_block", json!({ "kind": "expr", "cel": "step.error.code == 'E'" }));
    create_policy(&client, &strict);
    let guarded =
        rule_policy("pol_cel_guarded", json!({ "kind": "expr", "cel": "has(step.skill) && step.skill == 'rm'" }));
    create_policy(&client, &guarded);
    create_run(&client, "run-cel-2");
    let blocked = step(&client, "run-cel-2", &post(0, 1));
    assert_eq!(blocked["action"], "block");
    assert_eq!(blocked["deciding_policy"]["id"], "pol_cel_block");
    assert!(blocked["violations"].as_array().unwrap().iter().all(|v| v["policy_id"] != "pol_cel_guarded"));
    assert!(blocked["prevention_record_id"].is_null(), "an evaluation error is a fault, not a prevention");
}

/// SPEC §12.5: an expression may name only `run`, `step`, `now` and the documented functions and macros,
/// must be seen to return a bool, and takes regexes as literals: anything else is 400 `rule.cel`, and
/// nothing is stored.
#[test]
fn cel_rules_are_checked_before_they_are_stored() {
    let node = Node::start();
    let client = node.client();
    for cel in [
        "nosuchfn(run.tokens)",
        "rn.tokens > 5",
        "foo.bar > 1",
        "run.tokens + 1",
        "run.tokns > 5",
        "has(step.output_text) && step.output_text.matches(step.output_text)",
        "step.input_keys.exists(k, has(step.output_text) && step.output_text.contains(k))",
    ] {
        let resp = client.post("/v1/policies", &rule_policy("pol_cel", json!({ "kind": "expr", "cel": cel })));
        let details = resp.expect_error(400, "invalid_request");
        assert_eq!(details["field"], "rule.cel", "{cel}: {details}");
    }
    assert_eq!(client.get("/v1/policies").expect(200)["items"], json!([]));
}

/// SPEC §12.5: the most expensive rules the check accepts stay fast at the largest step text. The rule of
/// the issue (a self-match) took 4 s on 32 KiB of output and over 60 s on 128 KiB; these are accepted
/// and answered well inside the bound with 256 KiB (an unoptimised node build; the release figures are in
/// `docs/evaluation.md`).
#[test]
fn the_worst_accepted_rules_are_fast_at_the_largest_text() {
    let node = Node::start();
    let client = node.client();
    let scan = "step.output_text.matches('\\\\bpassw(or)?d[0-9]{2,8}\\\\b')";
    let regexes = format!("has(step.output_text) && ({})", [scan; 3].join(" || "));
    let contains = format!("has(step.output_text) && ({})", ["step.output_text.contains('aaaaaaab')"; 20].join(" || "));
    for (id, cel) in [("pol_regexes", regexes), ("pol_contains", contains)] {
        create_policy(&client, &rule_policy(id, json!({ "kind": "expr", "cel": cel })));
    }
    let text: String = std::iter::repeat_n(format!("{}\u{e9}", "a".repeat(62)), 256 * 1024 / 64).collect();
    create_run(&client, "run-worst");
    let call = json!({ "index": 0, "phase": "post", "usage": { "tokens": 1 }, "output_text": text });
    let started = Instant::now();
    let decision = step(&client, "run-worst", &call);
    let took = started.elapsed();
    assert_eq!(decision["action"], "allow", "{decision}");
    assert!(took < Duration::from_secs(5), "two worst-case rules on 256 KiB took {took:?}");
}

#[test]
fn skill_rules_and_tenant_wide_rates() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &rule_policy("pol_skills", json!({ "kind": "skill", "deny": ["shell"] })));
    let rate = json!({ "kind": "rate", "metric": "steps", "max": 1, "window_s": 60, "scope": "tenant" });
    create_policy(&client, &rule_policy("pol_rate", rate));
    create_run(&client, "run-a");
    create_run(&client, "run-b");
    assert_eq!(step(&client, "run-a", &json!({ "index": 0, "phase": "pre", "skill": "search" }))["action"], "allow");
    let throttled = step(&client, "run-b", &json!({ "index": 0, "phase": "pre", "skill": "search" }));
    assert_eq!(throttled["action"], "throttle", "the tenant's window is shared: {throttled}");
    assert!(throttled["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0));
    let denied = step(&client, "run-b", &json!({ "index": 0, "phase": "pre", "skill": "shell" }));
    assert_eq!(denied["action"], "block", "block outranks throttle: {denied}");
    assert_eq!(denied["deciding_policy"]["id"], "pol_skills");
    assert_eq!(client.get("/v1/runs/run-b").expect(200)["status"], "stopped");
}

fn wait_for_status(client: &Client, run: &str, status: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let view = client.get(&format!("/v1/runs/{run}")).expect(200).clone();
        if view["status"] == status || Instant::now() > deadline {
            return view;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_sweep_expires_a_run_nobody_calls_again() {
    let node = Node::start_with_config("run_ttl_s = 1\n");
    let client = node.client();
    create_run(&client, "run-swept");
    step(&client, "run-swept", &post(0, 1));
    // Nothing reads or calls the run from here: only the node's periodic sweep can expire it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.logs().contains("run expired") {
        assert!(Instant::now() < deadline, "the sweep never expired the run:\n{}", node.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(client.get("/v1/runs/run-swept").expect(200)["status"], "expired");
}

#[test]
fn runs_expire_after_their_ttl() {
    let node = Node::start_with_config("run_ttl_s = 1\n");
    let client = node.client();
    create_run(&client, "run-ttl");
    step(&client, "run-ttl", &post(0, 1));
    let view = wait_for_status(&client, "run-ttl", "expired", Duration::from_secs(5));
    assert_eq!(view["status"], "expired");
    let refused = client.post("/v1/runs/run-ttl/steps", &post(1, 1));
    assert_eq!(refused.expect_error(409, "")["status"], "expired", "{}", refused.text);
    let ended = client.post("/v1/runs/run-ttl/end", &json!({ "outcome": "succeeded" })).expect(200).clone();
    assert_eq!(ended["run"]["status"], "expired");
    assert_eq!(client.get("/v1/runs/run-ttl").expect(200)["status"], "expired");
}

#[test]
fn configured_limits_answer_clear_errors() {
    let node = Node::start_with_config("[limits]\npolicies_per_tenant = 2\nsteps_per_run = 2\n");
    let client = node.client();
    // A global policy is listed with the tenant's but does not count against the tenant's limit.
    let mut global = budget("pol_global", "tokens", 100);
    global["scope"] = json!("global");
    create_policy(&client, &global);
    create_policy(&client, &budget("pol_1", "tokens", 100));
    create_policy(&client, &budget("pol_2", "tokens", 100));
    client.post("/v1/policies", &budget("pol_3", "tokens", 100)).expect_error(409, "policy_limit");
    client.get("/v1/policies/pol_3").expect_error(404, "not_found");

    create_run(&client, "run-l");
    step(&client, "run-l", &post(0, 1));
    step(&client, "run-l", &post(1, 1));
    client.post("/v1/runs/run-l/steps", &post(2, 1)).expect_error(409, "run_step_limit");
    assert_eq!(client.get("/v1/runs/run-l").expect(200)["totals"]["steps"], 2);

    let labels: serde_json::Map<String, Value> = (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    let resp = client.post("/v1/runs", &json!({ "run_id": "run-labels", "labels": labels }));
    assert_eq!(resp.expect_error(400, "invalid_request")["field"], "labels");
}

/// The runs a stopped node's data directory exports (`runguard export --runs`), one JSON value each.
fn exported_runs(node: &mut Node) -> Vec<Value> {
    node.terminate();
    let output = node.cli(&["export", "--runs"]);
    assert!(output.status.success(), "export failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

/// SPEC §3.6: the ledger keeps each call's texts for replay unless `ledger_texts = false`; either way the
/// texts are evaluated, and matched text never reaches the decision.
#[test]
fn ledger_texts_are_kept_unless_turned_off() {
    let secret = "jane.doe@example.com";
    let call = json!({ "index": 0, "phase": "post", "usage": { "tokens": 1 },
                       "input_text": "look up the customer", "output_text": format!("mail {secret}") });
    for (config, kept) in [("", true), ("ledger_texts = false\n", false)] {
        let mut node = Node::start_with_config(config);
        let client = node.client();
        let rule = json!({ "kind": "content", "target": "output", "detectors": ["email"] });
        create_policy(&client, &rule_policy("pol_pii", rule));
        create_run(&client, "run-texts");
        let decision = step(&client, "run-texts", &call);
        assert_eq!(decision["action"], "block", "texts are evaluated whatever the ledger keeps");
        assert!(!decision.to_string().contains(secret));
        let runs = exported_runs(&mut node);
        let recorded = &runs[0]["calls"][1]["call"]["Step"];
        assert_eq!(recorded["index"], 0, "{recorded}");
        assert_eq!(recorded["output_text"].is_string(), kept, "ledger_texts {kept}: {recorded}");
        assert_eq!(recorded["input_text"].is_string(), kept, "ledger_texts {kept}: {recorded}");
        assert_eq!(recorded["usage"]["tokens"], 1, "the rest of the call is always kept");
    }
}

/// SPEC §3.1 and §4: `run_start` policies are evaluated at run creation; an active one that blocks stops
/// the run at once and writes its prevention record, and the run refuses every step.
#[test]
fn run_start_policies_decide_at_run_creation() {
    let node = Node::start();
    let client = node.client();
    let mut doc = rule_policy("pol_no_prod", json!({ "kind": "expr", "cel": "run.labels.env == 'prod'" }));
    doc["bind_at"] = json!("run_start");
    create_policy(&client, &doc);

    let staging = client.post("/v1/runs", &json!({ "run_id": "run-staging", "labels": { "env": "staging" } }));
    assert_eq!(staging.expect(201)["decision"]["action"], "allow");

    let created =
        client.post("/v1/runs", &json!({ "run_id": "run-prod", "labels": { "env": "prod" } })).expect(201).clone();
    let decision = &created["decision"];
    assert_eq!((decision["phase"].as_str(), decision["action"].as_str()), (Some("run_start"), Some("block")));
    assert_eq!(decision["step_index"], Value::Null);
    assert_eq!(created["status"], "stopped");
    let record_id = decision["prevention_record_id"].as_str().expect("an active block writes a record");
    let record = client.get(&format!("/v1/prevention-records/{record_id}")).expect(200).clone();
    assert_eq!((record["phase"].as_str(), record["policy_id"].as_str()), (Some("run_start"), Some("pol_no_prod")));
    let run = client.get("/v1/runs/run-prod").expect(200).clone();
    assert_eq!(
        (run["termination_reason"].as_str(), run["violation_policy_id"].as_str()),
        (Some("policy_block"), Some("pol_no_prod"))
    );
    client.post("/v1/runs/run-prod/steps", &pre(0)).expect_error(409, "run_not_running");
}
