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

/// Every family has `# HELP`; latencies are histograms (not summaries); the documented counters exist at
/// zero before their first event; HTTP requests are counted by route template; and `promtool check
/// metrics` (from the `prometheus` package, which `.ci/run` installs) accepts the exposition.
#[test]
fn metrics_are_described_zeroed_histograms_that_promtool_accepts() {
    let node = Node::start();
    let client = node.client();
    let fresh = client.get("/metrics").text;
    for zeroed in [
        "runguard_decisions_total{action=\"block\"} 0",
        "runguard_prevention_records_total 0",
        "runguard_fail_open_total 0",
        "runguard_writer_commit_failures_total 0",
        "runguard_refused_calls_total{reason=\"tenant_busy\"} 0",
    ] {
        assert!(fresh.lines().any(|line| line == zeroed), "no `{zeroed}` at start in:\n{fresh}");
    }
    create_policy(&client, &budget("pol_budget", "tokens", 100));
    create_run(&client, "run-metrics");
    step(&client, "run-metrics", &post(0, 10));
    client.get("/v1/runs/run-metrics").expect(200);
    let text = client.get("/metrics").text;
    let families: Vec<&str> = text.lines().filter_map(|line| line.strip_prefix("# TYPE ")).collect();
    assert!(families.len() >= 10, "{text}");
    for family in &families {
        let name = family.split(' ').next().unwrap_or_default();
        assert!(text.lines().any(|line| line.starts_with(&format!("# HELP {name} "))), "no HELP for {name}");
    }
    for histogram in ["runguard_evaluation_seconds", "runguard_writer_commit_seconds", "runguard_http_request_seconds"]
    {
        assert!(
            families.contains(&format!("{histogram} histogram").as_str()),
            "{histogram} is not a histogram: {families:?}"
        );
    }
    let by_route = "runguard_http_requests_total{method=\"GET\",route=\"/v1/runs/{id}\",status=\"200\"} 1";
    assert!(text.lines().any(|line| line == by_route), "no `{by_route}` in:\n{text}");
    let Ok(mut promtool) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("SKIPPED the promtool check: `promtool` is not installed (apt-get install prometheus)");
        return;
    };
    use std::io::Write;
    promtool.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write the scrape");
    let out = promtool.wait_with_output().expect("promtool runs");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check metrics failed ({}): {said}", out.status);
}

/// The evaluation latency counts step calls only: run starts and ends add no zero samples to it.
#[test]
fn evaluation_latency_counts_step_calls_only() {
    let node = Node::start();
    let client = node.client();
    let count = || {
        let text = client.get("/metrics").text;
        text.lines().find_map(|line| line.strip_prefix("runguard_evaluation_seconds_count ")).map(str::to_owned)
    };
    create_run(&client, "run-latency");
    client.post("/v1/runs/run-latency/end", &json!({ "outcome": "succeeded" })).expect(200);
    assert_eq!(count(), None, "a run start and end were timed as evaluations");
    create_run(&client, "run-stepped");
    step(&client, "run-stepped", &post(0, 10));
    assert_eq!(count().as_deref(), Some("1"));
}

/// Logs written to a file carry no terminal colour codes.
#[test]
fn logs_to_a_file_have_no_colour_codes() {
    let node = Node::start();
    node.client().post("/v1/runs", &json!({ "run_id": "run-logs" })).expect(201);
    let logs = node.logs();
    assert!(logs.contains("run created"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "ANSI escape codes in:\n{logs}");
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

fn signal(node: &Node, name: &str) {
    let pid = node.pid().expect("the node runs").to_string();
    let sent = std::process::Command::new("kill").arg(format!("-{name}")).arg(pid).status();
    assert!(sent.is_ok_and(|s| s.success()), "kill -{name} failed");
}

/// Waits for the node to exit after a signal.
fn wait_exit(node: &Node) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while node.rss_kib().is_some() {
        assert!(std::time::Instant::now() < deadline, "the node did not stop; log:\n{}", node.logs());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn every_stop_drains_the_writer_and_sighup_stops_gracefully() {
    let mut node = Node::start();
    let client = node.client();
    client.post("/v1/policies", &budget("pol_budget", "tokens", 1_000_000)).expect(201);
    let mut acknowledged = 0;
    for round in 0..6 {
        let client = node.client();
        let run = format!("run-{round}");
        create_run(&client, &run);
        for index in 0..5 {
            client.post(&format!("/v1/runs/{run}/steps"), &post(index, 1)).expect(200);
            acknowledged += 1;
        }
        if round == 5 {
            // SIGHUP (a closed terminal) is a graceful stop too, not a kill.
            signal(&node, "HUP");
            wait_exit(&node);
            node.kill();
        } else {
            assert!(node.terminate().success(), "round {round}; log:\n{}", node.logs());
        }
        node.restart();
    }
    let logs = node.logs();
    assert!(!logs.contains("stopped before draining"), "{logs}");
    assert_eq!(logs.matches("writer drained").count(), 6, "{logs}");
    let client = node.client();
    let mut found = 0;
    for round in 0..6 {
        let decisions = client.get(&format!("/v1/runs/run-{round}/decisions")).expect(200).clone();
        found += decisions["items"].as_array().map_or(0, |items| items.len().saturating_sub(1));
    }
    assert_eq!(found, acknowledged, "every acknowledged step survived the stops");
}
