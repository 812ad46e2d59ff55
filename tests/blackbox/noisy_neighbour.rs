//! Noisy neighbours: one tenant (`beta`) runs each hostile pattern the faults issue found as fast as it can,
//! while another tenant (`acme`) runs ordinary agent runs. For every pattern acme must see no error at all,
//! and its p99 call latency must stay within [`GUARD_FACTOR`]× that of the same workload on a quiet node
//! plus [`LATENCY_FLOOR`]: a guard against stalls, loose enough for a debug build on a shared CI machine,
//! that every failure the faults issue reported (seconds-long stalls, 408s, 80 ms run ends) trips. The
//! ratios themselves — the target is 2× — are printed, and measured with the release build in
//! `docs/reliability.md`. The attacker's client runs at the lowest priority: on a real deployment it is on
//! other machines, here it shares the node's cores.
//!
//! The patterns: persisted simulations with a repeated run id (a refused write in a shared group commit), a
//! CEL rule written to be as slow as validation lets it be over the largest texts, step calls to runs that
//! do not exist (live-run slots), polling tenant graduation over many incidents (the learning loop), and
//! slow clients (trickling bodies, connections that never read a large answer).
//!
//! Timing-sensitive, so it runs alone, outside the parallel suite: `.ci/run` and `just neighbours` run it
//! with `--ignored --test-threads=1`. `RUNGUARD_NEIGHBOUR_SECS` (default 2) sets how long each phase
//! measures, `RUNGUARD_NEIGHBOUR_INCIDENTS` (default 200) how many incidents beta holds before it polls
//! graduation, `RUNGUARD_NEIGHBOUR_ATTACKERS` (default 2) how many connections attack at once, and
//! `RUNGUARD_NEIGHBOUR_REPORT_ONLY=1` prints the figures without the latency assertion.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fixtures::budget;
use crate::harness::{ACME_OPERATOR, ACME_WORKER, BETA_OPERATOR, BETA_WORKER, Client, Node, tokens_config};
use crate::soak::env_u64;

/// Room for every run this test creates (ended runs keep their slot until they are idle for `run_idle_s`),
/// but not for the probes of runs that do not exist when each of them takes a slot.
const LIMITS: &str = "run_idle_s = 60\n[limits]\nlive_runs = 4000\n";
/// How many times the quiet p99 acme's p99 may reach under a flood (see the module documentation).
const GUARD_FACTOR: u32 = 4;
/// Absolute slack on top of that, for timer and scheduler noise at millisecond latencies.
const LATENCY_FLOOR: Duration = Duration::from_millis(20);
/// Attacker connections per pattern (`RUNGUARD_NEIGHBOUR_ATTACKERS`), each sending as fast as it can.
fn attackers() -> usize {
    env_u64("RUNGUARD_NEIGHBOUR_ATTACKERS", 2) as usize
}

/// What acme saw in one phase.
#[derive(Debug)]
struct Measured {
    latencies: Vec<Duration>,
    errors: Vec<String>,
}

impl Measured {
    fn p99(&self) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let at = (sorted.len() * 99).div_ceil(100).saturating_sub(1);
        sorted.get(at).copied().unwrap_or_default()
    }
}

/// acme's workload: runs of two steps under a token budget; every other run fails at its second step and
/// ends `failed` (so that it creates an incident through the learning loop).
fn victim_workload(worker: &Client, phase: &str, secs: u64) -> Measured {
    let mut measured = Measured { latencies: Vec::new(), errors: Vec::new() };
    let deadline = Instant::now() + Duration::from_secs(secs);
    let timed = |what: &str, path: &str, body: Value, measured: &mut Measured| {
        let started = Instant::now();
        let resp = worker.post(path, &body);
        measured.latencies.push(started.elapsed());
        if resp.status != 200 && resp.status != 201 {
            measured.errors.push(format!("{what}: {} {}", resp.status, resp.text));
        }
    };
    let mut n = 0u64;
    while Instant::now() < deadline {
        let run = format!("acme-{phase}-{n}");
        let steps = format!("/v1/runs/{run}/steps");
        timed("create", "/v1/runs", json!({ "run_id": run }), &mut measured);
        timed("pre", &steps, json!({ "index": 0, "phase": "pre", "skill": "search" }), &mut measured);
        timed("post", &steps, json!({ "index": 0, "phase": "post", "usage": { "tokens": 10 } }), &mut measured);
        let failing = n % 2 == 1;
        let post = if failing {
            json!({ "index": 1, "phase": "post", "skill": "fetch", "api_endpoint": "/v1/items/42",
                    "error": { "type": "Timeout", "code": "e_timeout", "status": 504 } })
        } else {
            json!({ "index": 1, "phase": "post", "usage": { "tokens": 10 } })
        };
        timed("post", &steps, post, &mut measured);
        let outcome = if failing { "failed" } else { "succeeded" };
        timed("end", &format!("/v1/runs/{run}/end"), json!({ "outcome": outcome }), &mut measured);
        n += 1;
    }
    measured
}

/// Runs `attack` on [`attackers`] threads until the returned flag is set.
fn flood(
    attack: impl Fn(usize, u64) + Send + Sync + 'static,
) -> (Arc<AtomicBool>, Vec<JoinHandle<()>>, Arc<AtomicU64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let attack = Arc::new(attack);
    let handles = (0..attackers())
        .map(|thread| {
            let (stop, sent, attack) = (Arc::clone(&stop), Arc::clone(&sent), Arc::clone(&attack));
            std::thread::spawn(move || {
                // The attacker's own client runs at the lowest priority: on a real deployment it is on
                // other machines, and here it shares the node's two cores. What the node does for its
                // requests still runs at normal priority, which is what this test is about.
                let lowered = thread_priority::set_current_thread_priority(thread_priority::ThreadPriority::Min);
                assert!(lowered.is_ok(), "cannot lower the attacker thread's priority: {lowered:?}");
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    attack(thread, i);
                    i += 1;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    (stop, handles, sent)
}

fn measure_under(
    name: &str,
    worker: &Client,
    secs: u64,
    quiet: Duration,
    attack: impl Fn(usize, u64) + Send + Sync + 'static,
) -> String {
    let (stop, handles, sent) = flood(attack);
    // Let the flood build up before measuring.
    std::thread::sleep(Duration::from_millis(300));
    let measured = victim_workload(worker, name, secs);
    stop.store(true, Ordering::Relaxed);
    for handle in handles {
        let _ = handle.join();
    }
    let p99 = measured.p99();
    let line = format!(
        "{name}: acme {} calls, p99 {:.2} ms = {:.2}× quiet {:.2} ms, beta sent {}",
        measured.latencies.len(),
        p99.as_secs_f64() * 1e3,
        p99.as_secs_f64() / quiet.as_secs_f64().max(1e-6),
        quiet.as_secs_f64() * 1e3,
        sent.load(Ordering::Relaxed)
    );
    eprintln!("{line}");
    assert!(
        measured.errors.is_empty(),
        "{name}: acme saw errors: {:?}",
        &measured.errors[..measured.errors.len().min(5)]
    );
    if std::env::var_os("RUNGUARD_NEIGHBOUR_REPORT_ONLY").is_none() {
        assert!(p99 <= quiet * GUARD_FACTOR + LATENCY_FLOOR, "{line}: acme stalled under the flood");
    }
    line
}

/// Connections a slow-client attacker keeps open at once (the node's file descriptors and buffers).
const SLOW_CONNECTIONS: usize = 400;

/// Opens a connection that announces a 10-byte body and sends 2 bytes of it, or that asks for a large
/// list and never reads the answer; the caller keeps it open.
fn slow_connection(base: &str, secret: &str, trickling: bool) -> Option<TcpStream> {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).ok()?;
    let head = if trickling {
        format!(
            "POST /v1/runs HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {secret}\r\n\
             Content-Type: application/json\r\nContent-Length: 10\r\n\r\n{{\""
        )
    } else {
        format!("GET /v1/incidents?limit=1000 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {secret}\r\n\r\n")
    };
    stream.write_all(head.as_bytes()).ok()?;
    Some(stream)
}

#[test]
#[ignore = "timing-sensitive: run alone with `--ignored --test-threads=1` (.ci/run and `just neighbours` do)"]
fn one_tenant_flooding_never_fails_or_stalls_another() {
    let secs = env_u64("RUNGUARD_NEIGHBOUR_SECS", 2);
    let incidents = env_u64("RUNGUARD_NEIGHBOUR_INCIDENTS", 200);
    let node = Node::start_with_config(&format!("{LIMITS}\n{}", tokens_config()));
    let acme_worker = node.client_as(ACME_WORKER);
    let beta_worker = node.client_as(BETA_WORKER);
    let beta_operator = node.client_as(BETA_OPERATOR);
    node.client_as(ACME_OPERATOR).post("/v1/policies", &budget("pol_acme", "tokens", 1_000_000)).expect(201);

    // beta's history: incidents for graduation to read, and a recorded run to simulate against.
    for i in 0..incidents {
        let run = format!("beta-failed-{i}");
        beta_worker.post("/v1/runs", &json!({ "run_id": run })).expect(201);
        beta_worker
            .post(
                &format!("/v1/runs/{run}/steps"),
                &json!({ "index": 0, "phase": "post", "skill": "fetch",
                         "error": { "type": "Timeout", "code": "e_timeout", "status": 504 } }),
            )
            .expect(200);
        beta_worker.post(&format!("/v1/runs/{run}/end"), &json!({ "outcome": "failed" })).expect(200);
    }

    let quiet = victim_workload(&acme_worker, "quiet", secs);
    assert!(quiet.errors.is_empty(), "quiet run errors: {:?}", &quiet.errors[..quiet.errors.len().min(5)]);
    let quiet_p99 = quiet.p99();
    eprintln!("quiet: acme {} calls, p99 {:.2} ms", quiet.latencies.len(), quiet_p99.as_secs_f64() * 1e3);

    let mut lines = Vec::new();

    let client = beta_operator.clone();
    lines.push(measure_under("simulate-repeated-run-id", &acme_worker, secs, quiet_p99, move |_, _| {
        let candidate = budget("pol_candidate", "tokens", 0);
        let body = json!({ "policies": [candidate], "run_ids": ["beta-failed-0", "beta-failed-0"], "persist": true });
        let _ = client.post("/v1/simulate", &body);
    }));

    // The slowest CEL this node accepts, as far as an attacker can tell: every step carries the largest
    // texts allowed, and the rule scans them repeatedly. Validation may refuse some of these; the attacker
    // uses what is accepted.
    let mut accepted = 0;
    for (i, cel) in [
        "has(step.output_text) && step.output_text.matches(step.output_text)",
        "has(step.output_text) && has(step.input_text) && step.output_text.contains(step.input_text)",
        "has(step.output_text) && step.output_text.matches('(a|aa)*b')",
        "has(step.input_keys) && step.input_keys.all(k, step.input_keys.all(j, size(k) + size(j) > 0)) && false",
    ]
    .iter()
    .enumerate()
    {
        let doc = json!({ "id": format!("pol_slow_{i}"), "name": "slow", "action": "warn",
                          "rule": { "kind": "expr", "cel": cel } });
        if beta_operator.post("/v1/policies", &doc).status == 201 {
            accepted += 1;
        }
    }
    eprintln!("slow CEL rules accepted: {accepted}");
    let client = beta_worker.clone();
    let text = "a".repeat(64 * 1024);
    let keys: Vec<String> = (0..256).map(|k| format!("k{k}")).collect();
    lines.push(measure_under("slow-cel", &acme_worker, secs, quiet_p99, move |thread, i| {
        let run = format!("beta-cel-{thread}-{i}");
        let _ = client.post("/v1/runs", &json!({ "run_id": run }));
        let call = json!({ "index": 0, "phase": "post", "input_text": text, "output_text": text,
                           "input_keys": keys, "usage": { "tokens": 1 } });
        let _ = client.post(&format!("/v1/runs/{run}/steps"), &call);
    }));

    let client = beta_worker.clone();
    lines.push(measure_under("unknown-runs", &acme_worker, secs, quiet_p99, move |thread, i| {
        let _ = client.post(&format!("/v1/runs/nope-{thread}-{i}/steps"), &json!({ "index": 0, "phase": "pre" }));
    }));

    let client = beta_operator.clone();
    lines.push(measure_under("graduation-polling", &acme_worker, secs, quiet_p99, move |_, _| {
        let _ = client.get("/v1/graduation");
    }));

    let base = node.base();
    let secret = BETA_OPERATOR.secret;
    let held = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
    lines.push(measure_under("slow-clients", &acme_worker, secs, quiet_p99, move |thread, i| {
        let Some(stream) = slow_connection(&base, secret, (thread + i as usize).is_multiple_of(2)) else {
            std::thread::sleep(Duration::from_millis(10));
            return;
        };
        let mut held = held.lock().unwrap();
        held.push_back(stream);
        if held.len() > SLOW_CONNECTIONS {
            held.pop_front();
        }
    }));

    eprintln!("noisy neighbours:\n  {}", lines.join("\n  "));
}
