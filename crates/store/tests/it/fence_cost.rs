//! What the fencing condition costs a sled commit (`docs/store.md`, "Fencing"): the same single-step
//! commits of one run with and without `FenceRun`, interleaved so that both see the same machine. A
//! measurement, not a check: `cargo test -p runguard-store --test it fence_cost -- --ignored --nocapture`.

use std::time::{Duration, Instant};

use runguard_store::{Store, StoreOptions, WriteBatch};

use crate::fixtures::World;

#[test]
#[ignore = "a measurement; run it by name"]
fn fence_cost() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions { fsync: false, ..StoreOptions::default() }).unwrap();
    let world = World::new("acme");
    let mut setup = WriteBatch::new();
    world.setup(&mut setup);
    let mut runs = [world.run("fenced"), world.run("plain")];
    for run in &runs {
        setup.put_run(run.clone());
    }
    store.commit(setup).unwrap();
    let rounds: u64 = std::env::var("FENCE_COST_ROUNDS").ok().and_then(|n| n.parse().ok()).unwrap_or(5_000);
    let mut spent = [Duration::ZERO, Duration::ZERO];
    for step in 0..rounds {
        for (i, run) in runs.iter_mut().enumerate() {
            let entry = world.post(run, step, 1);
            let mut batch = WriteBatch::new();
            if i == 0 {
                batch.fence_run(run.tenant_id.clone(), run.run_id.clone(), step);
            }
            batch.append_ledger(run.tenant_id.clone(), run.run_id.clone(), entry).put_run(run.clone());
            let started = Instant::now();
            store.commit(batch).unwrap();
            spent[i] += started.elapsed();
        }
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / rounds as f64;
    println!(
        "sled, {rounds} single-step commits per run: fenced {:.1} µs, unfenced {:.1} µs per commit",
        per(spent[0]),
        per(spent[1])
    );
}
