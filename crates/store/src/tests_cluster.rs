//! Unit tests of what several nodes on one store rely on: the fencing condition of run writes
//! (`docs/store.md`, "Fencing") on both backends, and on PostgreSQL, with two stores on one database
//! standing for two nodes, fencing across them and the shared policy generation.

use runguard_contract::{RunId, RunStatus};

use crate::fixtures::World;
use crate::{LedgerCall, LedgerEntry, Store, StoreErrorKind, StoredRun, WriteBatch};

/// A run's creation as a node writes it: fenced at an empty ledger, the run and its first entry.
fn create(world: &World, run: &StoredRun) -> WriteBatch {
    let mut batch = WriteBatch::new();
    batch.fence_run(run.tenant_id.clone(), run.run_id.clone(), 0).put_run(run.clone()).append_ledger(
        run.tenant_id.clone(),
        run.run_id.clone(),
        LedgerEntry::new(LedgerCall::RunStart, world.allow(&run.run_id, 0), run.totals),
    );
    batch
}

/// The post of `step` as a node whose copy of the run holds `len` ledger entries writes it.
fn post(world: &World, run: &mut StoredRun, step: u64, len: u64) -> WriteBatch {
    let entry = world.post(run, step, 10);
    let mut batch = WriteBatch::new();
    batch
        .fence_run(run.tenant_id.clone(), run.run_id.clone(), len)
        .append_ledger(run.tenant_id.clone(), run.run_id.clone(), entry)
        .put_run(run.clone());
    batch
}

fn ledger_len(store: &Store, world: &World, run: &RunId) -> usize {
    store.load_run(&world.tenant, run).unwrap().unwrap().ledger.len()
}

on_both_backends! {
fn a_write_fenced_on_a_stale_run_fails_alone_and_writes_nothing(store) {
    let world = World::new("acme");
    let mut setup = WriteBatch::new();
    world.setup(&mut setup);
    store.commit(setup).unwrap();
    let mut run = world.run("r0");
    store.commit(create(&world, &run)).unwrap();
    // A second creation of the same run (another node's) loses.
    let err = store.commit(create(&world, &run)).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Fenced, "{err}");

    let mut stale = run.clone();
    store.commit(post(&world, &mut run, 0, 1)).unwrap();
    // A writer still at one entry loses; in a group, only that caller fails.
    let other = world.run("r1");
    let results = store.commit_group(vec![post(&world, &mut stale, 0, 1), create(&world, &other)]);
    assert_eq!(results[0].as_ref().unwrap_err().kind(), StoreErrorKind::Fenced);
    assert!(results[1].is_ok());
    assert_eq!(ledger_len(&store, &world, &run.run_id), 2);

    // Two writes of one run in one group: the second is checked against the first.
    let mut second = run.clone();
    let results = store.commit_group(vec![post(&world, &mut run, 1, 2), post(&world, &mut second, 1, 2)]);
    assert!(results[0].is_ok());
    assert_eq!(results[1].as_ref().unwrap_err().kind(), StoreErrorKind::Fenced);
    assert_eq!(ledger_len(&store, &world, &run.run_id), 3);

    // A run that stopped (here: expired, which appends nothing) fences every later write.
    let mut expired = run.clone();
    expired.status = RunStatus::Expired;
    let mut batch = WriteBatch::new();
    batch.fence_run(run.tenant_id.clone(), run.run_id.clone(), 3).put_run(expired);
    store.commit(batch.clone()).unwrap();
    assert_eq!(store.commit(batch).unwrap_err().kind(), StoreErrorKind::Fenced, "an expiry happens once");
    let err = store.commit(post(&world, &mut run, 2, 3)).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Fenced);
    assert_eq!(ledger_len(&store, &world, &run.run_id), 3);
    assert!(store.verify().unwrap().is_ok());
}
}

/// Two stores on one PostgreSQL database stand for two nodes: each writes from its own stale copy, and
/// of the writers that raced for one ledger position exactly one wins.
#[test]
fn two_nodes_on_one_database_never_both_win_a_position() {
    let Some(db) = runguard_testpg::fresh_database() else { return };
    let nodes: Vec<Store> =
        (0..2).map(|_| Store::open_postgres(&db.url, &crate::PgOptions::default()).unwrap()).collect();
    let world = World::new("acme");
    let mut setup = WriteBatch::new();
    world.setup(&mut setup);
    nodes[0].commit(setup).unwrap();
    let mut run = world.run("r0");
    nodes[0].commit(create(&world, &run)).unwrap();
    for step in 0..5u64 {
        let len = step + 1;
        let batches: Vec<WriteBatch> = (0..6).map(|_| post(&world, &mut run.clone(), step, len)).collect();
        let wins = std::thread::scope(|scope| {
            let handles: Vec<_> = batches
                .into_iter()
                .enumerate()
                .map(|(i, batch)| {
                    let node = &nodes[i % 2];
                    scope.spawn(move || node.commit(batch))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|result| match result {
                    Ok(_) => true,
                    Err(err) => {
                        assert_eq!(err.kind(), StoreErrorKind::Fenced, "{err}");
                        false
                    }
                })
                .count()
        });
        assert_eq!(wins, 1, "step {step}");
        world.post(&mut run, step, 10);
    }
    assert_eq!(ledger_len(&nodes[1], &world, &run.run_id), 6);
    assert!(nodes[1].verify().unwrap().is_ok());
}

/// A policy version committed through one store changes the policy generation the other reads: the
/// other node's cached snapshots are then stale.
#[test]
fn a_policy_written_by_one_node_changes_the_generation_the_other_reads() {
    let Some(db) = runguard_testpg::fresh_database() else { return };
    let a = Store::open_postgres(&db.url, &crate::PgOptions::default()).unwrap();
    let b = Store::open_postgres(&db.url, &crate::PgOptions::default()).unwrap();
    let before = b.policy_generation();
    assert_eq!(b.policy_generation(), before, "nothing changed");
    let world = World::new("acme");
    let mut setup = WriteBatch::new();
    world.setup(&mut setup);
    a.commit(setup).unwrap();
    let after = b.policy_generation();
    assert_ne!(after, before, "a policy written on another node is seen at once");
    // A commit without policies leaves it.
    a.commit(create(&world, &world.run("r0"))).unwrap();
    assert_eq!(b.policy_generation(), after);
}
