//! Tests only PostgreSQL has: a record row edited with SQL, the database stopped under commits, the
//! schema version check, and the password kept out of messages. Each skips, with a message, where the
//! PostgreSQL binaries are not installed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use runguard_contract::ChainBreak;
use runguard_store::{PG_SCHEMA_VERSION, PgOptions, RecordBreak, Store, StoreErrorKind, StoredRun, WriteBatch};
use runguard_testpg::Cluster;

use crate::fixtures::{World, at};

fn options() -> PgOptions {
    PgOptions { connect_timeout: Duration::from_secs(1), ..PgOptions::default() }
}

/// A world with `runs` runs and one block on each of the first `blocks` of them (records 1..=blocks).
fn populate(store: &Store, runs: usize, blocks: usize) -> (World, Vec<StoredRun>) {
    let world = World::new("acme");
    let runs: Vec<StoredRun> = (0..runs).map(|i| world.run(&format!("r{i}"))).collect();
    let mut batch = WriteBatch::new();
    world.setup(&mut batch);
    for run in &runs {
        batch.put_run(run.clone());
    }
    store.commit(batch).unwrap();
    for (i, run) in runs.iter().take(blocks).enumerate() {
        let mut batch = WriteBatch::new();
        world.push_block(&mut batch, run, 0, at(10 + i as i64));
        store.commit(batch).unwrap();
    }
    (world, runs)
}

fn sql(url: &str, statement: &str) {
    let mut client = postgres::Client::connect(url, postgres::NoTls).unwrap();
    client.batch_execute(statement).unwrap();
}

#[test]
fn verify_finds_a_record_row_edited_with_sql() {
    let Some(db) = runguard_testpg::fresh_database() else { return };
    let store = Store::open_postgres(&db.url, &options()).unwrap();
    populate(&store, 3, 3);
    assert!(store.verify().unwrap().is_ok());

    // A column the queries select by, changed without the record: the row no longer agrees with itself.
    sql(&db.url, "UPDATE records SET tenant_id = 'globex' WHERE seq = 3");
    let report = store.verify().unwrap();
    assert_eq!(report.records_checked, 2, "{report:?}");
    match &report.record_break {
        Some(RecordBreak::IndexMissing { seq: 3, index, .. }) => assert_eq!(*index, "records.tenant_id"),
        other => panic!("expected the tenant column of record 3 to be named, got {other:?}"),
    }

    // The record itself, edited as an operator with SQL could: its hash no longer matches.
    sql(&db.url, "UPDATE records SET body = jsonb_set(body, '{step_index}', '41') WHERE seq = 2");
    let report = store.verify().unwrap();
    assert_eq!(report.records_checked, 1, "{report:?}");
    match &report.record_break {
        Some(RecordBreak::Chain(ChainBreak::HashMismatch { seq: 2, .. })) => {}
        other => panic!("expected record 2's hash to break, got {other:?}"),
    }
    assert!(!report.is_ok());

    // A deleted record is a gap.
    sql(
        &db.url,
        "UPDATE records SET body = jsonb_set(body, '{step_index}', '0') WHERE seq = 2; DELETE FROM records WHERE seq = 2",
    );
    let report = store.verify().unwrap();
    match &report.record_break {
        Some(RecordBreak::Chain(ChainBreak::SequenceGap { expected: 2, found: 3, .. })) => {}
        other => panic!("expected the gap at seq 2, got {other:?}"),
    }
}

#[test]
fn commits_fail_as_io_while_postgres_is_down_and_recover_with_nothing_half_written() {
    let Some(cluster) = Cluster::start() else { return };
    let db = cluster.fresh_database();
    let store = Arc::new(Store::open_postgres(&db.url, &options()).unwrap());
    let (world, runs) = populate(&store, 1, 0);
    let run = runs[0].clone();

    // A writer commits one block after another while the database crashes under it and comes back.
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, acked, failures, stop, world) =
            (Arc::clone(&store), Arc::clone(&acked), Arc::clone(&failures), Arc::clone(&stop), world.clone());
        std::thread::spawn(move || {
            let mut step = 0u64;
            while !stop.load(Ordering::SeqCst) && step < 100_000 {
                let mut batch = WriteBatch::new();
                world.push_block(&mut batch, &run, step, at(100 + step as i64));
                match store.commit(batch) {
                    Ok(receipt) => acked.lock().unwrap().extend(receipt.records.iter().map(|r| r.seq)),
                    Err(err) => failures.lock().unwrap().push(err.kind()),
                }
                step += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for("acknowledged commits", &|| acked.lock().unwrap().len() >= 5);
    cluster.stop_immediately();
    wait_for("failed commits", &|| failures.lock().unwrap().len() >= 3);
    assert!(!store.is_healthy(), "a store that cannot commit is not ready");
    assert_eq!(store.get_run(&world.tenant, &runs[0].run_id).unwrap_err().kind(), StoreErrorKind::Io);
    assert!(store.probe().is_err());

    cluster.restart();
    let acked_before = acked.lock().unwrap().len();
    wait_for("commits after the restart", &|| acked.lock().unwrap().len() >= acked_before + 5);
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert!(store.is_healthy());

    let failures = failures.lock().unwrap().clone();
    assert!(failures.iter().all(|kind| *kind == StoreErrorKind::Io), "{failures:?}");
    let acked = acked.lock().unwrap().clone();
    let (head, _) = store.chain_head().unwrap();
    for seq in &acked {
        let record = store.record_at(*seq).unwrap();
        assert!(record.is_some_and(|r| r.seq == *seq), "acknowledged record {seq} is missing");
    }
    // Nothing half-written: every record has its ledger entry, the chain is whole and the head row names
    // its last record. (A commit cut at COMMIT may have landed unacknowledged, whole.)
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records_checked, head);
    let ledger = store.full_ledger(&world.tenant, &runs[0].run_id).unwrap();
    assert_eq!(ledger.len() as u64, head, "one ledger entry per record, no more, no less");
}

#[test]
fn two_stores_on_one_database_keep_one_gap_free_chain() {
    let Some(db) = runguard_testpg::fresh_database() else { return };
    let first = Store::open_postgres(&db.url, &options()).unwrap();
    let (world, runs) = populate(&first, 2, 0);
    // Two writers as two nodes would be: separate stores, connections and caches, one database.
    let stores = [first, Store::open_postgres(&db.url, &options()).unwrap()];
    let acked: Vec<Vec<u64>> = std::thread::scope(|scope| {
        let writers: Vec<_> = stores
            .iter()
            .zip(&runs)
            .map(|(store, run)| {
                let world = world.clone();
                scope.spawn(move || {
                    (0..40u64)
                        .flat_map(|step| {
                            let mut batch = WriteBatch::new();
                            world.push_block(&mut batch, run, step, at(step as i64));
                            store.commit(batch).unwrap().records.into_iter().map(|r| r.seq)
                        })
                        .collect()
                })
            })
            .collect();
        writers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut all: Vec<u64> = acked.concat();
    all.sort_unstable();
    assert_eq!(all, (1..=80).collect::<Vec<u64>>(), "every seq given once, none skipped");
    for store in &stores {
        assert_eq!(store.chain_head().unwrap().0, 80);
        let report = store.verify().unwrap();
        assert!(report.is_ok() && report.records_checked == 80, "{report:?}");
    }
    for run in &runs {
        let ledger = stores[0].full_ledger(&world.tenant, &run.run_id).unwrap();
        let positions: Vec<u64> = ledger.iter().map(|e| e.position).collect();
        assert_eq!(positions, (0..40).collect::<Vec<u64>>());
    }
}

#[test]
fn a_policy_version_raced_from_two_stores_conflicts_for_the_loser() {
    let Some(db) = runguard_testpg::fresh_database() else { return };
    let (a, b) =
        (Store::open_postgres(&db.url, &options()).unwrap(), Store::open_postgres(&db.url, &options()).unwrap());
    let (world, _) = populate(&a, 0, 0);
    let mut next = world.policy.clone();
    next.version = 2;
    let mut batch = WriteBatch::new();
    batch.put_policy_version(next.clone());
    a.commit(batch.clone()).unwrap();
    let err = b.commit(batch).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict, "{err}");
    assert_eq!(b.get_policy(Some(&world.tenant), &next.id, None).unwrap(), Some(next));
}

#[test]
fn a_newer_schema_is_refused_and_migrate_is_idempotent() {
    let Some(db) = runguard_testpg::fresh_database() else { return };
    assert_eq!(runguard_store::migrate(&db.url, &options()).unwrap(), 0, "a new database had no schema");
    assert_eq!(runguard_store::migrate(&db.url, &options()).unwrap(), PG_SCHEMA_VERSION);
    Store::open_postgres(&db.url, &options()).unwrap();
    sql(&db.url, &format!("INSERT INTO runguard_schema (version) VALUES ({})", PG_SCHEMA_VERSION + 1));
    let err = Store::open_postgres(&db.url, &options()).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Schema);
    assert!(err.message().contains(&format!("version {}", PG_SCHEMA_VERSION + 1)), "{err}");
}

#[test]
fn an_unreachable_database_is_io_and_its_password_is_never_shown() {
    // Nothing listens on port 1 of the loopback.
    let err = Store::open_postgres("postgres://runguard:s3cret-pw@127.0.0.1:1/runguard", &options()).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Io);
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("s3cret-pw"), "{shown}");
    assert!(shown.contains("127.0.0.1:1"), "{shown}");
}

/// Durable commit rates of the two backends side by side, as the node writes blocks (ledger entry,
/// record, stopped run): one block per commit, then groups of 8 callers. Prints, asserts nothing; run by
/// hand: `cargo test -p runguard-store --test it commit_rates -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, run by hand"]
fn commit_rates_on_sled_and_postgres() {
    let Some(db) = runguard_testpg::fresh_database() else { return };
    let dir = tempfile::tempdir().unwrap();
    let stores = [
        ("sled", Store::open(dir.path(), &runguard_store::StoreOptions::default()).unwrap()),
        ("postgres", Store::open_postgres(&db.url, &options()).unwrap()),
    ];
    for (name, store) in &stores {
        let (world, runs) = populate(store, 1, 0);
        let run = &runs[0];
        let mut step = 0u64;
        let mut block = || {
            let mut batch = WriteBatch::new();
            world.push_block(&mut batch, run, step, at(step as i64));
            step += 1;
            batch
        };
        let n = 300;
        let started = Instant::now();
        for _ in 0..n {
            store.commit(block()).unwrap();
        }
        let single = started.elapsed();
        let groups = 60;
        let started = Instant::now();
        for _ in 0..groups {
            let outcomes = store.commit_group((0..8).map(|_| block()).collect());
            assert!(outcomes.iter().all(Result::is_ok));
        }
        let grouped = started.elapsed();
        eprintln!(
            "{name}: {:.0} commits/s of 1 block ({:.2} ms each); {:.0} blocks/s in groups of 8 ({:.2} ms per group)",
            f64::from(n) / single.as_secs_f64(),
            single.as_secs_f64() * 1000.0 / f64::from(n),
            f64::from(groups * 8) / grouped.as_secs_f64(),
            grouped.as_secs_f64() * 1000.0 / f64::from(groups),
        );
    }
}
