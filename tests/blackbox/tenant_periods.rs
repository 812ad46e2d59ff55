//! Tenant-period budgets (SPEC §13.3) against the real binary: a day budget summed over a tenant's runs
//! blocks at its limit, survives a restart, resets at the next UTC day (the node's test clock offset),
//! counts only runs with its labels, and is read back through `GET /v1/policies/{id}/usage`. In the
//! PostgreSQL pass, two nodes on one database never admit more than the budget between them.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::fixtures::{create_policy, step};
use crate::harness::{ACME_OPERATOR, ACME_WORKER, ADMIN, BETA_OPERATOR, Client, Node, on_postgres, tokens_config};

const DAY_MS: i64 = 86_400_000;

fn day_budget(id: &str, max: u64, labels: Value) -> Value {
    json!({
        "id": id,
        "name": "tenant tokens a day",
        "rule": { "kind": "budget", "metric": "tokens", "per": "tenant", "period": "day", "max": max,
                  "labels": labels },
    })
}

fn run_with(client: &Client, run_id: &str, labels: Value) {
    client.post("/v1/runs", &json!({ "run_id": run_id, "labels": labels })).expect(201);
}

/// A run that reports one step using `tokens`; answers the `post` decision's action.
fn spend(client: &Client, run_id: &str, tokens: u64) -> String {
    run_with(client, run_id, json!({}));
    step(client, run_id, &json!({ "index": 0, "phase": "pre" }));
    let decision = step(client, run_id, &json!({ "index": 0, "phase": "post", "usage": { "tokens": tokens } }));
    decision["action"].as_str().unwrap_or_default().to_owned()
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The date part (`YYYY-MM-DDT00:00:00`) of the UTC day holding `ms`.
fn rfc3339_day(ms: i64) -> String {
    let start = runguard_contract::Timestamp::from_unix_millis(ms).start_of_utc_day().to_rfc3339();
    start.get(..19).unwrap_or_default().to_owned()
}

#[track_caller]
fn usage(client: &Client, policy: &str) -> Value {
    client.get(&format!("/v1/policies/{policy}/usage")).expect(200).clone()
}

#[test]
fn a_day_budget_blocks_at_its_limit_across_runs_and_survives_a_restart() {
    let mut node = Node::start();
    let client = node.client();
    create_policy(&client, &day_budget("pol_day", 100, json!({})));
    assert_eq!(spend(&client, "run-1", 60), "allow");

    // The second run's estimate would take the tenant past the day's limit: refused at `pre`.
    run_with(&client, "run-2", json!({}));
    let estimate = json!({ "index": 0, "phase": "pre", "estimate": { "tokens": 41 } });
    let decision = step(&client, "run-2", &estimate);
    assert_eq!(decision["action"], "block", "{decision}");
    assert_eq!(decision["violations"][0]["actual"], "101", "{decision}");

    let third = json!({ "index": 0, "phase": "post", "usage": { "tokens": 40 } });
    run_with(&client, "run-3", json!({}));
    let decision = step(&client, "run-3", &third);
    assert_eq!(decision["action"], "allow", "exactly at the limit: {decision}");
    assert_eq!(decision["remaining"]["tokens"], 0, "{decision}");
    let decision = step(&client, "run-3", &json!({ "index": 1, "phase": "post", "usage": { "tokens": 1 } }));
    assert_eq!(decision["action"], "block", "{decision}");
    assert_eq!(decision["violations"][0]["reason"], "tenant tokens this day 101 exceed 100");

    node.terminate();
    node.restart();
    let client = node.client();
    let used = usage(&client, "pol_day");
    assert_eq!(
        (used["used"].clone(), used["max"].clone(), used["period"].clone()),
        (json!(101), json!(100), json!("day"))
    );
    assert!(used["period_start"].as_str().unwrap().starts_with(&rfc3339_day(now_ms())), "{used}");
    assert_eq!(spend(&client, "run-4", 1), "block", "the restart kept the day's total");
}

#[test]
fn a_day_budget_starts_again_at_zero_on_the_next_utc_day() {
    let mut node = Node::start();
    let client = node.client();
    create_policy(&client, &day_budget("pol_day", 100, json!({})));
    assert_eq!(spend(&client, "run-1", 100), "allow");
    assert_eq!(spend(&client, "run-2", 1), "block");

    // One minute past the next UTC midnight, by the node's test clock.
    let now = now_ms();
    let offset = (now.div_euclid(DAY_MS) + 1) * DAY_MS - now + 60_000;
    node.terminate();
    node.set_config(&format!("test_clock_offset_ms = {offset}\n"));
    node.restart();
    let client = node.client();
    assert_eq!(usage(&client, "pol_day")["used"], 0, "a new day starts at zero");
    assert_eq!(spend(&client, "run-3", 100), "allow");
    let used = usage(&client, "pol_day");
    assert_eq!(used["used"], 100);
    assert!(used["period_start"].as_str().unwrap().starts_with(&rfc3339_day(now + offset)), "{used}");
    assert_eq!(spend(&client, "run-4", 1), "block");
}

#[test]
fn only_runs_with_every_label_of_the_budget_count() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &day_budget("pol_search", 10, json!({ "team": "search" })));
    run_with(&client, "run-ads", json!({ "team": "ads" }));
    let big = json!({ "index": 0, "phase": "post", "usage": { "tokens": 1000 } });
    assert_eq!(step(&client, "run-ads", &big)["action"], "allow");
    assert_eq!(usage(&client, "pol_search")["used"], 0);
    run_with(&client, "run-search", json!({ "team": "search", "env": "prod" }));
    let decision = step(&client, "run-search", &json!({ "index": 0, "phase": "post", "usage": { "tokens": 11 } }));
    assert_eq!(decision["action"], "block", "{decision}");
    assert_eq!(usage(&client, "pol_search")["used"], 11);
}

#[test]
fn usage_answers_the_callers_tenant_only() {
    let node = Node::start_with_config(&tokens_config());
    let (acme, acme_worker) = (node.client_as(ACME_OPERATOR), node.client_as(ACME_WORKER));
    let beta = node.client_as(BETA_OPERATOR);
    create_policy(&acme, &day_budget("pol_acme_day", 50, json!({})));
    assert_eq!(spend(&acme_worker, "run-a", 20), "allow");
    assert_eq!(usage(&acme_worker, "pol_acme_day")["used"], 20);
    beta.get("/v1/policies/pol_acme_day/usage").expect_error(404, "not_found");
    acme.get("/v1/policies/pol_nothing/usage").expect_error(404, "not_found");
    create_policy(
        &acme,
        &json!({
            "id": "pol_run", "name": "run tokens", "rule": { "kind": "budget", "metric": "tokens", "per": "run", "max": 5 },
        }),
    );
    acme.get("/v1/policies/pol_run/usage").expect_error(409, "not_a_tenant_budget");

    // A global budget counts each tenant on its own.
    let admin = node.client_as(ADMIN);
    let mut global = day_budget("pol_global_day", 1000, json!({}));
    global["scope"] = json!("global");
    create_policy(&admin, &global);
    assert_eq!(spend(&acme_worker, "run-b", 3), "allow");
    assert_eq!(usage(&acme, "pol_global_day")["used"], 3);
    assert_eq!(usage(&beta, "pol_global_day")["used"], 0);
}

#[test]
fn two_nodes_on_one_database_admit_exactly_the_day_budget() {
    if !on_postgres() {
        eprintln!("skipped: two nodes on one database need the PostgreSQL pass (RUNGUARD_TEST_STORE=postgres)");
        return;
    }
    let Some(db) = crate::harness::fresh_postgres() else { return };
    let nodes = [Node::start_on_postgres(&db.url, None), Node::start_on_postgres(&db.url, None)];
    create_policy(&nodes[0].client(), &day_budget("pol_day", 20, json!({})));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let client = nodes[t % 2].client();
            std::thread::spawn(move || {
                let (mut allowed, mut posted) = (0u64, 0u64);
                for i in 0..10 {
                    let run = format!("run-{t}-{i}");
                    run_with(&client, &run, json!({}));
                    let pre = json!({ "index": 0, "phase": "pre", "estimate": { "tokens": 1 } });
                    if step(&client, &run, &pre)["action"] != "allow" {
                        continue;
                    }
                    let post = json!({ "index": 0, "phase": "post", "usage": { "tokens": 1 } });
                    posted += 1;
                    if step(&client, &run, &post)["action"] == "allow" {
                        allowed += 1;
                    }
                }
                (allowed, posted)
            })
        })
        .collect();
    let (allowed, posted) =
        threads.into_iter().map(|t| t.join().unwrap()).fold((0, 0), |(a, p), (ta, tp)| (a + ta, p + tp));
    assert_eq!(allowed, 20, "the two nodes together admit exactly the day's budget");
    let used = usage(&nodes[1].client(), "pol_day");
    assert_eq!(used["used"].as_u64(), Some(posted), "every post counts what it used, allowed or not: {used}");
    let pre = json!({ "index": 0, "phase": "pre", "estimate": { "tokens": 1 } });
    run_with(&nodes[1].client(), "run-late", json!({}));
    assert_eq!(step(&nodes[1].client(), "run-late", &pre)["action"], "block", "a pre check reads the shared total");
}

#[test]
fn three_nodes_on_one_database_admit_exactly_a_tenant_rate_limit() {
    if !on_postgres() {
        eprintln!("skipped: three nodes on one database need the PostgreSQL pass (RUNGUARD_TEST_STORE=postgres)");
        return;
    }
    let Some(db) = crate::harness::fresh_postgres() else { return };
    let nodes: Vec<Node> = (0..3).map(|_| Node::start_on_postgres(&db.url, None)).collect();
    create_policy(
        &nodes[0].client(),
        &json!({
            "id": "pol_rate", "name": "30 steps per window per tenant",
            "rule": { "kind": "rate", "metric": "steps", "max": 30, "window_s": 600, "scope": "tenant" },
        }),
    );
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let client = nodes[t % 3].client();
            std::thread::spawn(move || {
                let mut admitted = 0;
                for i in 0..10 {
                    let run = format!("run-{t}-{i}");
                    run_with(&client, &run, json!({}));
                    let decision = step(&client, &run, &json!({ "index": 0, "phase": "pre" }));
                    match decision["action"].as_str() {
                        Some("allow") => admitted += 1,
                        Some("throttle") => assert!(decision["retry_after_ms"].as_u64().unwrap() > 0, "{decision}"),
                        _ => panic!("unexpected decision {decision}"),
                    }
                }
                admitted
            })
        })
        .collect();
    let admitted: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(admitted, 30, "the three nodes together admit exactly the tenant's limit in the window");
}

#[test]
fn migrate_store_carries_the_current_day_total_to_postgres() {
    use std::ffi::OsStr;
    let Some(db) = crate::harness::fresh_postgres() else { return };
    let mut sled = Node::start_on_sled(None);
    create_policy(&sled.client(), &day_budget("pol_day", 100, json!({})));
    assert_eq!(spend(&sled.client(), "run-1", 60), "allow");
    assert!(sled.terminate().success());
    let (from, to) = (format!("sled:{}", sled.data_dir().display()), format!("postgres:{}", db.url));
    let args = ["migrate-store", "--from", &from, "--to", &to];
    let out = crate::harness::run_cli(&args.map(OsStr::new));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let pg = Node::start_on_postgres(&db.url, None);
    assert_eq!(usage(&pg.client(), "pol_day")["used"], 60, "moving the store kept the day's total");
    assert_eq!(spend(&pg.client(), "run-2", 41), "block");
}

/// A child run's usage counts toward its tenant's day budget as any run's does, and a child is blocked
/// by the day budget even while its parent's own budgets still allow it.
#[test]
fn a_child_runs_usage_counts_toward_the_tenants_day_budget() {
    let node = Node::start();
    let client = node.client();
    create_policy(&client, &day_budget("pol_day_family", 100, json!({})));
    run_with(&client, "run-parent", json!({}));
    client.post("/v1/runs", &json!({ "run_id": "run-child", "parent_run_id": "run-parent" })).expect(201);
    step(&client, "run-child", &json!({ "index": 0, "phase": "pre" }));
    let first = step(&client, "run-child", &json!({ "index": 0, "phase": "post", "usage": { "tokens": 70 } }));
    assert_eq!(first["action"], "allow", "{first}");
    assert_eq!(usage(&client, "pol_day_family")["used"], 70);

    step(&client, "run-child", &json!({ "index": 1, "phase": "pre" }));
    let over = step(&client, "run-child", &json!({ "index": 1, "phase": "post", "usage": { "tokens": 40 } }));
    assert_eq!(over["action"], "block", "{over}");
    assert_eq!(usage(&client, "pol_day_family")["used"], 110, "a block at post still counts what was used");
    let parent = client.get("/v1/runs/run-parent").expect(200).clone();
    assert_eq!(parent["status"], "running", "the parent's own budgets did not stop it: {parent}");
    assert_eq!(parent["rolled_up_totals"]["tokens"], 110, "{parent}");
}
