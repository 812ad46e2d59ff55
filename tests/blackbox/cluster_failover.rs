//! Failover behind nginx (SPEC §14.2): a node that dies loses nothing acknowledged, and its runs continue
//! on the other nodes with their totals; a stopped run stays stopped.

use serde_json::json;

use crate::cluster_harness::{Cluster, NODE_HEADER, nginx_bin, shipped_nginx_conf};
use crate::fixtures::{budget, create_policy, post, pre, step};
use crate::harness::Client;

/// Creates runs named `prefix-N` through nginx until one lands on node `node`; answers its id.
fn run_on(cluster: &Cluster, client: &Client, prefix: &str, node: usize) -> String {
    for n in 0..64 {
        let run_id = format!("{prefix}-{n}");
        let created = client.post("/v1/runs", &json!({ "run_id": run_id }));
        created.expect(201);
        if cluster.served_by(&created) == node {
            return run_id;
        }
    }
    panic!("no run of 64 was routed to node {node}");
}

#[test]
fn a_killed_nodes_runs_continue_on_another_node_with_their_totals() {
    let test = "a_killed_nodes_runs_continue_on_another_node_with_their_totals";
    let Some(mut cluster) = Cluster::start(test, 3, |first| {
        create_policy(first, &budget("pol_budget", "tokens", 100));
    }) else {
        return;
    };
    let client = cluster.client();

    // A live run: every call lands on the node its creation landed on (consistent hashing on the run id).
    let created = client.post("/v1/runs", &json!({ "run_id": "run-live" }));
    created.expect(201);
    let a = cluster.served_by(&created);
    for (index, tokens) in [(0, 30), (1, 20)] {
        let answer = client.post("/v1/runs/run-live/steps", &pre(index));
        assert_eq!(answer.expect(200)["action"], "allow");
        assert_eq!(cluster.served_by(&answer), a, "a run's calls stay on one node");
        let answer = client.post("/v1/runs/run-live/steps", &post(index, tokens));
        assert_eq!(answer.expect(200)["action"], "allow");
        assert_eq!(cluster.served_by(&answer), a, "a run's calls stay on one node");
    }
    let last_call = post(1, 20);

    // A stopped run on the same node: over its budget, blocked.
    let stopped = run_on(&cluster, &client, "run-stopped", a);
    let path = format!("/v1/runs/{stopped}/steps");
    step(&client, &stopped, &post(0, 60));
    let blocking_call = post(1, 60);
    let block = step(&client, &stopped, &blocking_call);
    assert_eq!(block["action"], "block");

    cluster.kill(a);

    // The live run continues on another node, from its totals.
    let retry = client.post("/v1/runs/run-live/steps", &last_call);
    let b = cluster.served_by(&retry);
    assert_ne!(b, a, "the dead node cannot answer");
    assert_eq!(retry.expect(200)["action"], "allow", "the acknowledged call is answered again, identically");
    let next = client.post("/v1/runs/run-live/steps", &post(2, 40));
    assert_eq!(cluster.served_by(&next), b);
    let next = next.expect(200);
    assert_eq!(next["action"], "allow");
    assert_eq!(next["remaining"]["tokens"], 10, "30 + 20 before the failover, 40 after: 10 of 100 left");
    let over = client.post("/v1/runs/run-live/steps", &post(3, 11));
    assert_eq!(over.expect(200)["action"], "block", "the budget counts the calls the dead node acknowledged");
    let run = client.get("/v1/runs/run-live").expect(200).clone();
    assert_eq!(run["totals"]["tokens"], 101);
    assert_eq!(run["status"], "stopped");

    // The stopped run stays stopped, with its decision.
    let run = client.get(&format!("/v1/runs/{stopped}")).expect(200).clone();
    assert_eq!(run["status"], "stopped");
    assert_eq!(run["totals"]["tokens"], 120);
    let refused = client.post(&path, &pre(2));
    assert_ne!(cluster.served_by(&refused), a);
    assert_eq!(refused.expect_error(409, "")["decision"]["decision_id"], block["decision_id"]);
    assert_eq!(client.post(&path, &blocking_call).expect(200), &block);

    // The dead node comes back on its port, and the store it shares verifies.
    cluster.restart(a);
    client.get("/readyz").expect(200);
    let out = cluster.verify();
    assert!(
        out.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_shipped_nginx_config_passes_nginx_t_and_routes_steps_idempotently() {
    let conf = shipped_nginx_conf();
    for needle in ["hash $runguard_run_key consistent", "max_fails=", "fail_timeout=", "http_503", "non_idempotent"] {
        assert!(conf.contains(needle), "deploy/nginx/runguard.conf lacks `{needle}`");
    }
    let Some(bin) = nginx_bin() else {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"skipping the nginx -t check: no nginx binary (install Debian's nginx-light)\n",
        );
        return;
    };
    // `configure` runs `nginx -t` on the shipped file with these upstreams and panics on a refusal.
    let nginx = crate::cluster_harness::Nginx::configure(&bin, &["127.0.0.1:1".to_owned()]);
    assert!(nginx.base().starts_with("http://127.0.0.1:"));
    assert_eq!(NODE_HEADER, "x-runguard-node");
}
