//! Chaos behind nginx (SPEC §14.2, `docs/reliability.md`): clients drive runs through nginx on three nodes
//! while nodes are killed with SIGKILL at random and started again; afterwards every decision a client
//! saw acknowledged is in the store with the same id and action, no run's totals went backwards, every
//! stopped run is still stopped, and `runguard verify` is clean.
//!
//! It runs in the PostgreSQL pass of the default test run and as `just cluster-soak`. A node whose copy of
//! a run is stale reloads it and answers as the run now is, so no stale refusal may reach a client.
//! `RUNGUARD_CLUSTER_CHAOS_SECS` sets how long the load runs (default 6, the CI version; `just
//! cluster-soak` runs minutes) and `RUNGUARD_CLUSTER_CHAOS_SEED` replays a kill schedule.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::cluster_harness::Cluster;
use crate::fixtures::{budget, create_policy, post};

/// The per-run token budget, and what each step reports: the 7th step of a run crosses it and is blocked.
const BUDGET: u64 = 1000;
const TOKENS: u64 = 150;
const STEPS: u64 = 8;
const CLIENTS: usize = 3;
/// How long one call may keep failing (a node dying, nginx moving off it) before the test gives up.
const CALL_DEADLINE: Duration = Duration::from_secs(30);

/// xorshift64*: a reproducible kill schedule without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A raw client through nginx: answers every status (a 502 while nginx moves off a dead node is a
/// retry, not a contract violation), and a transport error as `None`.
struct Raw {
    agent: ureq::Agent,
    base: String,
}

impl Raw {
    fn new(base: String) -> Raw {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        Raw { agent, base }
    }

    fn post(&self, path: &str, body: &Value) -> Option<(u16, Value)> {
        let mut answer = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .send(body.to_string())
            .ok()?;
        let status = answer.status().as_u16();
        let text = answer.body_mut().read_to_string().ok()?;
        Some((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// Sends `body` until an answer other than a transient failure: a transport error, 502, 503, 504, or a
    /// 409 `step_out_of_order` from a node whose copy of the run is behind the database (a run whose calls
    /// moved between nodes while nginx routed around a dead one; until the cluster fences stale copies in
    /// the database, such a node refuses the call, and the retry reaches the run's own node once nginx
    /// routes there again). None of these acknowledges anything.
    #[track_caller]
    fn acknowledged(&self, path: &str, body: &Value, counts: &Counts) -> (u16, Value) {
        let deadline = Instant::now() + CALL_DEADLINE;
        loop {
            let answer = self.post(path, body);
            let stale = answer
                .as_ref()
                .is_some_and(|(status, answer)| *status == 409 && answer["error"]["code"] == "step_out_of_order");
            match answer {
                Some((status, answer)) if !matches!(status, 502..=504) && !stale => return (status, answer),
                _ => {
                    let counter = if stale { &counts.stale } else { &counts.retries };
                    counter.fetch_add(1, Ordering::Relaxed);
                    assert!(
                        Instant::now() < deadline,
                        "`POST {path}` {body} was not answered within {CALL_DEADLINE:?}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// Calls that were not acknowledged and were sent again.
#[derive(Debug, Default)]
struct Counts {
    /// Transport errors and 502/503/504.
    retries: AtomicU64,
    /// 409 `step_out_of_order` from a node with a stale copy of the run.
    stale: AtomicU64,
}

/// What a client saw acknowledged for one run: each step's decision id, action and remaining tokens.
#[derive(Debug, Default)]
struct Acked {
    decisions: Vec<(u64, String, String, Option<u64>)>,
    stopped: bool,
}

fn drive_runs(raw: &Raw, client: usize, stop: &AtomicBool, acked: &Mutex<BTreeMap<String, Acked>>, counts: &Counts) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let run_id = format!("chaos-{client}-{n}");
        n += 1;
        // A creation re-sent after a node died with it may find the run created: 200, the run as it is.
        let (status, _) = raw.acknowledged("/v1/runs", &json!({ "run_id": run_id }), counts);
        assert!(status == 201 || status == 200, "creating `{run_id}`: {status}");
        acked.lock().expect("lock").insert(run_id.clone(), Acked::default());
        for index in 0..STEPS {
            let (status, decision) =
                raw.acknowledged(&format!("/v1/runs/{run_id}/steps"), &post(index, TOKENS), counts);
            assert_eq!(status, 200, "`{run_id}` step {index}: {decision}");
            let action = decision["action"].as_str().unwrap_or_default().to_owned();
            let id = decision["decision_id"].as_str().unwrap_or_default().to_owned();
            let remaining = decision["remaining"]["tokens"].as_u64();
            let expected = BUDGET.saturating_sub(TOKENS * (index + 1));
            assert_eq!(remaining, Some(expected), "`{run_id}` step {index}: totals wrong in {decision}");
            let mut acked = acked.lock().expect("lock");
            let run = acked.get_mut(&run_id).expect("recorded above");
            run.decisions.push((index, id, action.clone(), remaining));
            if action == "block" {
                run.stopped = true;
                break;
            }
        }
    }
}

fn seed() -> u64 {
    std::env::var("RUNGUARD_CLUSTER_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) | 1)
}

#[test]
fn acknowledged_decisions_survive_random_node_kills_behind_nginx() {
    let test = "acknowledged_decisions_survive_random_node_kills_behind_nginx";
    let Some(mut cluster) = Cluster::start(test, 3, |first| {
        create_policy(first, &budget("pol_budget", "tokens", BUDGET));
    }) else {
        return;
    };
    let secs: u64 = std::env::var("RUNGUARD_CLUSTER_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    let seed = seed();
    eprintln!("cluster chaos: {secs} s, seed {seed} (replay with RUNGUARD_CLUSTER_CHAOS_SEED={seed})");
    let mut rng = Rng(seed);

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (raw, stop, acked, counts) =
                (Raw::new(cluster.nginx.base()), Arc::clone(&stop), Arc::clone(&acked), Arc::clone(&counts));
            std::thread::spawn(move || drive_runs(&raw, client, &stop, &acked, &counts))
        })
        .collect();

    // One node down at a time: killed at a random moment, started again on its port a moment later.
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(500 + rng.below(1500)));
        if clients.iter().any(std::thread::JoinHandle::is_finished) {
            break;
        }
        let victim = usize::try_from(rng.below(3)).expect("small");
        cluster.kill(victim);
        kills += 1;
        std::thread::sleep(Duration::from_millis(200 + rng.below(800)));
        cluster.restart(victim);
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        if let Err(panic) = client.join() {
            std::panic::resume_unwind(panic);
        }
    }
    let duration = started.elapsed();
    // nginx leaves a node that failed alone for its `fail_timeout` (2 s): after it, every run's calls go
    // to the run's own node again, which holds the run as the database does (a restart emptied it).
    std::thread::sleep(Duration::from_millis(2500));

    // Every acknowledged decision is stored with its id and action; totals only grew.
    let acked = acked.lock().expect("lock");
    let client = cluster.client();
    let (mut calls, mut stopped, mut duplicates) = (0, 0, 0);
    for (run_id, seen) in acked.iter() {
        let run = client.get(&format!("/v1/runs/{run_id}")).expect(200).clone();
        let stored = client.get(&format!("/v1/runs/{run_id}/decisions?limit=100")).expect(200).clone();
        let stored: Vec<&Value> =
            stored["items"].as_array().expect("items").iter().filter(|d| d["phase"] == "post").collect();
        for (index, id, action, remaining) in &seen.decisions {
            let at_index: Vec<&&Value> = stored.iter().filter(|d| d["step_index"] == *index).collect();
            let found = at_index
                .iter()
                .find(|d| d["decision_id"] == id.as_str())
                .unwrap_or_else(|| panic!("`{run_id}` step {index}: acknowledged {id} is not stored: {stored:?}"));
            assert_eq!(found["action"], action.as_str(), "`{run_id}` step {index}");
            duplicates += at_index.len() - 1;
            let expected = BUDGET.saturating_sub(TOKENS * (index + 1));
            assert_eq!(
                (remaining.unwrap_or(0), found["remaining"]["tokens"].as_u64()),
                (expected, Some(expected)),
                "`{run_id}` step {index}: the answer and the stored decision count every acknowledged step"
            );
        }
        let mut last_remaining = BUDGET;
        for decision in &stored {
            let remaining = decision["remaining"]["tokens"].as_u64().unwrap_or(0);
            assert!(remaining <= last_remaining, "`{run_id}`: the totals went backwards: {stored:?}");
            last_remaining = remaining;
        }
        calls += seen.decisions.len() + 1;
        let tokens = run["totals"]["tokens"].as_u64().expect("totals.tokens");
        let acked_tokens = TOKENS * u64::try_from(seen.decisions.len()).expect("small");
        assert!(tokens >= acked_tokens, "`{run_id}` totals {tokens} below the {acked_tokens} acknowledged");
        if seen.stopped {
            stopped += 1;
            assert_eq!(run["status"], "stopped", "`{run_id}` was blocked and must stay stopped");
            let after = client.post(&format!("/v1/runs/{run_id}/steps"), &post(STEPS, 1));
            after.expect_error(409, "run_not_running");
        }
    }
    // A call re-sent to a node whose copy of the run is behind the database (the first node committed it
    // and died before answering) loses its fencing check there and is answered with the stored decision:
    // never a second one (`docs/architecture.md`, "Cluster: fencing and consistency").
    assert_eq!(duplicates, 0, "a (run, index, phase) holds more than one stored decision");
    assert_eq!(counts.stale.load(Ordering::Relaxed), 0, "a node answered from a stale copy of a run");
    let out = cluster.verify();
    assert!(
        out.status.success(),
        "verify after the chaos: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "cluster chaos: {} runs ({stopped} blocked and stopped), {calls} acknowledged calls, {kills} kills, \
             {} transient failures and {} stale refusals retried, 0 lost, {duplicates} duplicate stored decisions, \
             {:.1} s, seed {seed}\n",
            acked.len(),
            counts.retries.load(Ordering::Relaxed),
            counts.stale.load(Ordering::Relaxed),
            duration.as_secs_f64()
        )
        .as_bytes(),
    );
}
