//! Crash soak (SPEC §7): workers drive step calls against the real binary, which is SIGKILLed at a random
//! moment, verified offline, restarted, and checked — many times over the same data directory.
//!
//! After every kill: `runguard verify` passes. After every restart, for every run touched so far in the
//! round: every acknowledged decision is in the run's ledger, at its position and unchanged, with at most
//! one unacknowledged call after it; the run's token total is at least the sum of its acknowledged usage
//! (at most one unacknowledged step more) and never below what an earlier restart showed; a run stopped by
//! an acknowledged block is still stopped, has nothing after its block, and refuses another step (409);
//! every acknowledged prevention record is readable. At the end the whole record list is compared with the
//! blocks of every run.
//!
//! `RUNGUARD_SOAK_KILLS` sets the number of kills (default 3, the normal test run); `RUNGUARD_SOAK_SEED`
//! replays a seed (printed at the start). `just soak` runs the long version in release mode.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fixtures::{budget, create_policy};
use crate::harness::{Client, Node};

/// Tokens a run may use before its budget blocks it (a run takes about ten steps).
const BUDGET: u64 = 300;
/// Concurrent workers, each driving one run at a time.
const WORKERS: usize = 4;

/// A small deterministic generator (SplitMix64), so a failing seed replays the same schedule.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// From a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `low..=high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }
}

/// `name` from the environment as a number, else `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var("RUNGUARD_SOAK_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos() as u64)
    })
}

/// What the client knows about one run.
#[derive(Debug, Default)]
struct RunModel {
    id: String,
    /// Creation was acknowledged (201).
    created: bool,
    /// Acknowledged decisions in order, the run-start decision first.
    acked: Vec<Value>,
    /// Sum of the acknowledged steps' tokens.
    tokens: u64,
    /// The call in flight when the node died (its tokens), which may or may not have been committed.
    pending: Option<u64>,
    /// The token total seen at the last check.
    seen_tokens: u64,
    /// The acknowledged block that stopped the run.
    stopped: bool,
    /// Whether the run was used in the current round.
    touched: bool,
}

impl RunModel {
    fn next_index(&self) -> u64 {
        // One ledger entry for run start, then one per post call.
        self.acked.len().saturating_sub(1) as u64
    }
}

#[derive(Debug, Default)]
struct Totals {
    acked_decisions: u64,
    acked_records: u64,
    checked_entries: u64,
    refused_after_stop: u64,
}

/// Drives runs until the node stops answering. Returns when a call fails at the transport level.
fn drive(client: &Client, runs: &mut Vec<RunModel>, worker: usize, rng: &mut Rng, dead: &AtomicBool) {
    while !dead.load(Ordering::Relaxed) {
        let need_new = runs.last().is_none_or(|r| r.stopped || !r.created);
        if need_new {
            let id = format!("soak-{worker}-{}", runs.len());
            runs.push(RunModel { id: id.clone(), touched: true, ..RunModel::default() });
            let run = runs.last_mut().expect("just pushed");
            match client.send("POST", "/v1/runs", Some(json!({ "run_id": id }).to_string().into_bytes())) {
                Ok(resp) if resp.status == 201 => {
                    run.created = true;
                    run.acked.push(resp.body["decision"].clone());
                }
                Ok(resp) => panic!("creating {id}: unexpected {} {}", resp.status, resp.text),
                Err(_) => return,
            }
            continue;
        }
        let run = runs.last_mut().expect("a current run");
        run.touched = true;
        let tokens = rng.range(1, 60);
        let call = json!({ "index": run.next_index(), "phase": "post", "usage": { "tokens": tokens } });
        run.pending = Some(tokens);
        let path = format!("/v1/runs/{}/steps", run.id);
        match client.send("POST", &path, Some(call.to_string().into_bytes())) {
            Ok(resp) if resp.status == 200 => {
                run.pending = None;
                run.tokens += tokens;
                run.stopped = resp.body["action"] == "block";
                run.acked.push(resp.body.clone());
                if run.stopped {
                    // A stopped run refuses the next step, live as after every restart.
                    let next = json!({ "index": run.next_index(), "phase": "post", "usage": { "tokens": 1 } });
                    match client.send("POST", &path, Some(next.to_string().into_bytes())) {
                        Ok(resp) => assert_eq!(resp.status, 409, "a stopped run took a step: {}", resp.text),
                        Err(_) => return,
                    }
                }
            }
            // The node is going down under us (a 503 from a call it could not finish is not acknowledged).
            Ok(resp) if resp.status == 503 => return,
            Ok(resp) => panic!("step on {}: unexpected {} {}", run.id, resp.status, resp.text),
            Err(_) => return,
        }
    }
}

fn all_decisions(client: &Client, run: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut path = format!("/v1/runs/{run}/decisions?limit=1000");
    loop {
        let page = client.get(&path).expect(200).clone();
        out.extend(page["items"].as_array().expect("items").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/runs/{run}/decisions?limit=1000&cursor={cursor}"),
            None => return out,
        }
    }
}

/// Checks one run against the model after a restart and adopts a committed but unacknowledged call.
fn check_run(client: &Client, run: &mut RunModel, totals: &mut Totals) {
    let id = run.id.clone();
    let resp = client.get(&format!("/v1/runs/{id}"));
    if !run.created {
        // Creation was in flight: the run exists or not, but as a whole.
        if resp.status == 404 {
            return;
        }
        let stored = all_decisions(client, &id);
        assert_eq!(stored.len(), 1, "{id}: a run whose creation was not acknowledged has steps");
        run.created = true;
        run.acked = stored;
        return;
    }
    let state = resp.expect(200).clone();
    let stored = all_decisions(client, &id);
    assert!(
        stored.len() >= run.acked.len(),
        "{id}: {} acknowledged decisions, {} stored",
        run.acked.len(),
        stored.len()
    );
    for (i, (acked, stored)) in run.acked.iter().zip(&stored).enumerate() {
        assert_eq!(acked, stored, "{id}: decision {i} differs from the acknowledged one");
    }
    totals.checked_entries += stored.len() as u64;
    let extra = stored.len() - run.acked.len();
    assert!(extra <= usize::from(run.pending.is_some()), "{id}: {extra} decisions nobody sent");
    let tokens = state["totals"]["tokens"].as_u64().expect("totals.tokens");
    if extra == 1 {
        // The call in flight was committed before the kill: it counts from now on.
        run.tokens += run.pending.unwrap_or(0);
        run.stopped = stored.last().is_some_and(|d| d["action"] == "block");
        run.acked = stored.clone();
    }
    run.pending = None;
    assert_eq!(tokens, run.tokens, "{id}: totals do not match the acknowledged steps");
    assert!(tokens >= run.seen_tokens, "{id}: the token total went backwards ({} → {tokens})", run.seen_tokens);
    run.seen_tokens = tokens;
    if let Some(block) = stored.iter().position(|d| d["action"] == "block") {
        assert_eq!(block + 1, stored.len(), "{id}: a stopped run accepted another step");
    }
    if run.stopped {
        assert_eq!(state["status"], "stopped", "{id}: a blocked run is running again");
        let next = json!({ "index": run.next_index(), "phase": "post", "usage": { "tokens": 1 } });
        let refused = client.post(&format!("/v1/runs/{id}/steps"), &next);
        assert_eq!(refused.expect_error(409, "run_not_running")["decision"], stored[stored.len() - 1]);
        totals.refused_after_stop += 1;
    } else {
        assert_eq!(state["status"], "running", "{id}");
        assert_eq!(state["next"]["index"].as_u64(), Some(run.next_index()), "{id}");
    }
    for decision in &stored {
        if let Some(record) = decision["prevention_record_id"].as_str() {
            let found = client.get(&format!("/v1/prevention-records/{record}")).expect(200).clone();
            assert_eq!(found["decision_id"], decision["decision_id"], "{id}: record {record}");
        }
    }
}

fn verify(node: &Node) {
    let out = node.cli(&["verify"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify after a kill: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn all_records(client: &Client) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut path = "/v1/prevention-records?limit=1000".to_owned();
    loop {
        let page = client.get(&path).expect(200).clone();
        for record in page["items"].as_array().expect("items") {
            out.insert(record["id"].as_str().expect("id").to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/prevention-records?limit=1000&cursor={cursor}"),
            None => return out,
        }
    }
}

#[test]
fn crash_soak() {
    let kills = env_u64("RUNGUARD_SOAK_KILLS", 3);
    let seed = seed();
    eprintln!("crash soak: {kills} kills, RUNGUARD_SOAK_SEED={seed}");
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut node = Node::start();
    create_policy(&node.client(), &budget("pol_budget", "tokens", BUDGET));
    let mut workers: Vec<(Vec<RunModel>, Rng)> = (0..WORKERS).map(|_| (Vec::new(), Rng::new(rng.next_u64()))).collect();
    let mut totals = Totals::default();

    for round in 0..kills {
        let client = node.client();
        let dead = AtomicBool::new(false);
        let load_for = Duration::from_millis(rng.range(100, 800));
        std::thread::scope(|scope| {
            for (w, (runs, wrng)) in workers.iter_mut().enumerate() {
                let (client, dead) = (client.clone(), &dead);
                scope.spawn(move || drive(&client, runs, w, wrng, dead));
            }
            // The random kill moment: workers are mid-call, the writer mid-commit.
            std::thread::sleep(load_for);
            node.kill();
            dead.store(true, Ordering::Relaxed);
        });
        verify(&node);
        node.restart();
        let client = node.client();
        for (runs, _) in &mut workers {
            for run in runs.iter_mut().filter(|r| r.touched) {
                check_run(&client, run, &mut totals);
                run.touched = false;
            }
        }
        eprintln!("crash soak: kill {} survived ({:.1?})", round + 1, started.elapsed());
    }

    // Finally every run of every round, and the record list against the blocks of all runs.
    let client = node.client();
    let mut blocks = BTreeSet::new();
    let mut runs_total = 0;
    for (runs, _) in &mut workers {
        for run in runs.iter_mut() {
            run.pending = None;
            check_run(&client, run, &mut totals);
            runs_total += 1;
            totals.acked_decisions += run.acked.len() as u64;
            for decision in &run.acked {
                if let Some(record) = decision["prevention_record_id"].as_str() {
                    blocks.insert(record.to_owned());
                }
            }
        }
    }
    totals.acked_records = blocks.len() as u64;
    assert_eq!(all_records(&client), blocks, "the record list differs from the blocks of the runs");
    node.terminate();
    verify(&node);
    eprintln!(
        "crash soak: {kills} kills survived, {runs_total} runs, {} decisions and {} prevention records \
         acknowledged, {} ledger entries checked, {} stopped-run refusals, {:.1?}",
        totals.acked_decisions,
        totals.acked_records,
        totals.checked_entries,
        totals.refused_after_stop,
        started.elapsed()
    );
    assert!(totals.acked_records > 0 || kills == 0, "the soak never blocked a run");
}
