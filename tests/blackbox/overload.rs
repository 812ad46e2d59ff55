//! Overload (SPEC §9): many more concurrent callers than the node can serve, for a bounded time.
//!
//! Two kinds of traffic at once: "hot" callers all hammer one run whose every call is throttled (each
//! throttle is evaluated afresh and committed, so the run's actor is the bottleneck and its mailbox fills),
//! and "wide" callers create runs and step them until the live-run limit sheds them. Every answer must be
//! a success, or 429/503 with `Retry-After` and a JSON error body — never a 5xx of another kind, a reset
//! connection or a client timeout; refusals come fast; the node's RSS stays bounded; every acknowledged
//! decision is in its run's ledger afterwards; and normal service returns once the flood stops.
//!
//! `RUNGUARD_OVERLOAD_SECS` (default 3) and `RUNGUARD_OVERLOAD_CLIENTS` (default 48) size the flood;
//! `just overload` runs the long version.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fixtures::{budget, create_policy, create_run, post, pre, step};
use crate::harness::{Client, Node, Resp};
use crate::soak::env_u64;

/// Limits small enough that a test-sized flood reaches them.
const CONFIG: &str = "run_idle_s = 1\n[limits]\nlive_runs = 64\nrun_mailbox = 4\n";
/// The node may grow by at most this much RSS under the flood (KiB).
const RSS_GROWTH_LIMIT_KIB: u64 = 256 * 1024;
/// A refusal (429/503) must come at least this fast: well under the 10 s `limits.call_timeout_ms`.
const REFUSAL_LIMIT: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
struct Tally {
    by_status: Mutex<BTreeMap<u16, u64>>,
    slowest_refusal_ms: AtomicU64,
    slowest_success_ms: AtomicU64,
    /// Acknowledged decision ids by `(tenant, run)`.
    acked: Mutex<BTreeMap<(String, String), BTreeSet<String>>>,
    bad: Mutex<Vec<String>>,
}

impl Tally {
    fn answer(&self, what: &str, started: Instant, resp: Result<Resp, ureq::Error>) -> Option<Resp> {
        let elapsed = started.elapsed();
        let resp = match resp {
            Ok(resp) => resp,
            Err(err) => {
                self.bad.lock().unwrap().push(format!("{what}: transport error {err}"));
                return None;
            }
        };
        *self.by_status.lock().unwrap().entry(resp.status).or_default() += 1;
        match resp.status {
            200 | 201 => {
                self.slowest_success_ms.fetch_max(elapsed.as_millis() as u64, Ordering::Relaxed);
                Some(resp)
            }
            429 | 503 => {
                self.slowest_refusal_ms.fetch_max(elapsed.as_millis() as u64, Ordering::Relaxed);
                let retry = resp.header("retry-after").and_then(|r| r.parse::<u64>().ok());
                let code = resp.body["error"]["code"].as_str().unwrap_or_default();
                if retry.is_none_or(|r| r == 0) || code.is_empty() {
                    self.bad
                        .lock()
                        .unwrap()
                        .push(format!("{what}: {} without Retry-After or code: {}", resp.status, resp.text));
                }
                None
            }
            other => {
                self.bad.lock().unwrap().push(format!("{what}: unexpected {other} {}", resp.text));
                None
            }
        }
    }

    fn ack(&self, tenant: &str, run: &str, decision: &Value) {
        let id = decision["decision_id"].as_str().unwrap_or_default().to_owned();
        self.acked.lock().unwrap().entry((tenant.to_owned(), run.to_owned())).or_default().insert(id);
    }
}

/// Identical throttled `pre 1` calls to the hot run, as fast as the node answers.
fn hot(client: &Client, tally: &Tally, stop: &AtomicBool) {
    let call = pre(1).to_string().into_bytes();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let resp = client.send("POST", "/v1/runs/hot/steps", Some(call.clone()));
        if let Some(resp) = tally.answer("hot step", started, resp) {
            if resp.body["action"] != "throttle" {
                tally.bad.lock().unwrap().push(format!("hot run not throttled: {}", resp.text));
            }
            tally.ack("hot", "hot", &resp.body);
        }
    }
}

/// New runs with a few steps each, until stopped.
fn wide(client: &Client, worker: usize, tally: &Tally, stop: &AtomicBool) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let run = format!("wide-{worker}-{n}");
        let started = Instant::now();
        let body = json!({ "run_id": run }).to_string().into_bytes();
        let Some(created) = tally.answer("create", started, client.send("POST", "/v1/runs", Some(body))) else {
            continue;
        };
        tally.ack("default", &run, &created.body["decision"]);
        let mut index = 0;
        while index < 5 && !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let call = post(index, 1).to_string().into_bytes();
            let resp = client.send("POST", &format!("/v1/runs/{run}/steps"), Some(call));
            if let Some(resp) = tally.answer("step", started, resp) {
                tally.ack("default", &run, &resp.body);
                index += 1;
            }
        }
    }
}

fn ledger(client: &Client, run: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut path = format!("/v1/runs/{run}/decisions?limit=1000");
    loop {
        let page = client.get(&path).expect(200).clone();
        for decision in page["items"].as_array().expect("items") {
            out.insert(decision["decision_id"].as_str().expect("id").to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/runs/{run}/decisions?limit=1000&cursor={cursor}"),
            None => return out,
        }
    }
}

#[test]
fn a_flood_is_shed_with_429_or_503_and_service_returns() {
    let secs = env_u64("RUNGUARD_OVERLOAD_SECS", 3);
    let clients = env_u64("RUNGUARD_OVERLOAD_CLIENTS", 48).max(2) as usize;
    let node = Node::start_with_config(CONFIG);
    let client = node.client();
    let hot_client = client.for_tenant("hot");
    let rate = json!({
        "id": "pol_rate", "name": "one step a day",
        "rule": { "kind": "rate", "metric": "steps", "max": 1, "window_s": 86400, "scope": "run" },
    });
    create_policy(&hot_client, &rate);
    create_policy(&client, &budget("pol_budget", "tokens", 1_000_000));
    create_run(&hot_client, "hot");
    assert_eq!(step(&hot_client, "hot", &pre(0))["action"], "allow");
    step(&hot_client, "hot", &post(0, 1));
    assert_eq!(step(&hot_client, "hot", &pre(1))["action"], "throttle");
    let baseline_rss = node.rss_kib().unwrap_or(0);

    let tally = Tally::default();
    let stop = AtomicBool::new(false);
    let mut peak_rss = baseline_rss;
    let started = Instant::now();
    std::thread::scope(|scope| {
        for worker in 0..clients {
            let (client, hot_client, tally, stop) = (client.clone(), hot_client.clone(), &tally, &stop);
            if worker % 2 == 0 {
                scope.spawn(move || hot(&hot_client, tally, stop));
            } else {
                scope.spawn(move || wide(&client, worker, tally, stop));
            }
        }
        let deadline = started + Duration::from_secs(secs);
        while Instant::now() < deadline {
            peak_rss = peak_rss.max(node.rss_kib().unwrap_or(0));
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let flood = started.elapsed();
    let statuses = tally.by_status.lock().unwrap().clone();
    let answers: u64 = statuses.values().sum();
    let slowest = tally.slowest_refusal_ms.load(Ordering::Relaxed);
    let slowest_success = tally.slowest_success_ms.load(Ordering::Relaxed);
    eprintln!(
        "overload: {clients} clients for {flood:.1?}: {answers} answers {statuses:?}, slowest refusal {slowest} ms, \
         slowest success {slowest_success} ms, RSS {baseline_rss} KiB → peak {peak_rss} KiB"
    );
    let bad = tally.bad.lock().unwrap().clone();
    assert!(bad.is_empty(), "{} bad answers, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
    let refused = statuses.get(&429).copied().unwrap_or(0) + statuses.get(&503).copied().unwrap_or(0);
    assert!(refused > 0, "the flood never reached a limit: {statuses:?}");
    assert!(slowest <= REFUSAL_LIMIT.as_millis() as u64, "a refusal took {slowest} ms");
    assert!(peak_rss <= baseline_rss + RSS_GROWTH_LIMIT_KIB, "RSS grew from {baseline_rss} to {peak_rss} KiB");

    // Normal service returns: a fresh run is created and stepped promptly (the flood's idle runs expire).
    let deadline = Instant::now() + Duration::from_secs(15);
    let recovered = loop {
        let started = Instant::now();
        let created = client.post("/v1/runs", &json!({}));
        if created.status == 201 {
            let run = created.body["run_id"].as_str().expect("run_id").to_owned();
            let decision = step(&client, &run, &post(0, 1));
            assert_eq!(decision["action"], "allow");
            break started.elapsed();
        }
        assert!(Instant::now() < deadline, "service did not return after the flood: {}", created.text);
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(recovered < Duration::from_secs(1), "a normal call took {recovered:?} after the flood");

    // Nothing acknowledged was lost.
    let acked = tally.acked.lock().unwrap().clone();
    let mut checked = 0;
    for ((tenant, run), ids) in &acked {
        let reader = if tenant == "hot" { hot_client.clone() } else { client.clone() };
        let stored = ledger(&reader, run);
        let missing: Vec<_> = ids.difference(&stored).collect();
        assert!(missing.is_empty(), "run {run}: acknowledged decisions missing: {missing:?}");
        checked += ids.len();
    }
    eprintln!("overload: {checked} acknowledged decisions of {} runs found in their ledgers", acked.len());
}
