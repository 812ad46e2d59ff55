//! Unit tests of durability under faults: the acknowledgement watermark, verification on a copy,
//! per-caller group commits and commits whose flush fails.

use std::collections::BTreeMap;
use std::path::Path;

use runguard_contract::{Mode, RunStatus};

use crate::fixtures::{World, at, budget_policy, tenant};
use crate::watermark::{self, Watermark};
use crate::{PageRequest, Store, StoreErrorKind, StoreOptions, StoredRun, WATERMARK_FILE, WriteBatch};

fn options() -> StoreOptions {
    StoreOptions { fsync: false, ..StoreOptions::default() }
}

fn open(dir: &Path) -> Store {
    Store::open(dir, &options()).unwrap()
}

/// What [`populated`] writes, on an open store of either backend.
fn populate(store: &Store, runs: usize) -> (World, Vec<StoredRun>) {
    let world = World::new("acme");
    let runs: Vec<StoredRun> = (0..runs).map(|i| world.run(&format!("r{i}"))).collect();
    let mut batch = WriteBatch::new();
    world.setup(&mut batch);
    for run in &runs {
        batch.put_run(run.clone());
    }
    store.commit(batch).unwrap();
    let mut batch = WriteBatch::new();
    world.push_block(&mut batch, &runs[0], 0, at(5));
    store.commit(batch).unwrap();
    (world, runs)
}

/// A store with one tenant's policy, snapshot and `runs` running runs, and one block (one record).
fn populated(dir: &Path, runs: usize) -> (World, Vec<StoredRun>) {
    let store = open(dir);
    let world = World::new("acme");
    let runs: Vec<StoredRun> = (0..runs).map(|i| world.run(&format!("r{i}"))).collect();
    let mut batch = WriteBatch::new();
    world.setup(&mut batch);
    for run in &runs {
        batch.put_run(run.clone());
    }
    store.commit(batch).unwrap();
    let mut batch = WriteBatch::new();
    world.push_block(&mut batch, &runs[0], 0, at(5));
    store.commit(batch).unwrap();
    store.sync_watermark().unwrap();
    (world, runs)
}

/// Every file of a directory with its bytes.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type().unwrap().is_dir() {
            for (inner, bytes) in contents(&entry.path()) {
                out.insert(format!("{name}/{inner}"), bytes);
            }
        } else {
            out.insert(name, std::fs::read(entry.path()).unwrap());
        }
    }
    out
}

#[test]
fn the_watermark_follows_durable_commits() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path(), 1);
    let mark = watermark::read(dir.path()).unwrap().unwrap();
    // Schema initialisation is not a commit; the two batches are.
    assert_eq!((mark.commits, mark.record_seq), (2, 1));
    let store = open(dir.path());
    assert_eq!(store.commit_count(), 2);
}

#[test]
fn a_store_behind_its_watermark_is_refused_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path(), 1);
    // As if sled had dropped the last three commits: the watermark says more was acknowledged.
    let mut mark = watermark::read(dir.path()).unwrap().unwrap();
    mark.commits += 3;
    mark.record_seq += 2;
    watermark::write(dir.path(), &mark).unwrap();
    let err = Store::open(dir.path(), &options()).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt);
    assert!(err.message().contains("commits 3..=5 are missing"), "{err}");
    assert!(err.message().contains("prevention records 2..=3 are missing"), "{err}");
    assert!(err.message().contains(&dir.path().display().to_string()), "{err}");
    let before = contents(dir.path());
    let report = Store::verify_dir(dir.path(), &options()).unwrap();
    assert!(!report.is_ok());
    let lost = report.lost.clone().unwrap_or_default();
    assert!(lost.contains("commits 3..=5 are missing"), "{report:?}");
    assert!(lost.contains(&dir.path().display().to_string()), "verify names the original directory: {lost}");
    assert_eq!(contents(dir.path()), before, "verify changed the data directory");
}

#[test]
fn an_empty_store_with_a_watermark_is_not_reinitialised() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path(), 1);
    let mark = watermark::read(dir.path()).unwrap().unwrap();
    // The database is gone (or recovered to nothing); the watermark remains.
    let fresh = tempfile::tempdir().unwrap();
    watermark::write(fresh.path(), &mark).unwrap();
    let err = Store::open(fresh.path(), &options()).unwrap_err();
    assert!(err.message().contains("is empty, but 2 commits"), "{err}");
    // Refused again on the next start: nothing was initialised in between.
    let err = Store::open(fresh.path(), &options()).unwrap_err();
    assert!(err.message().contains("is empty"), "{err}");
}

#[test]
fn a_missing_or_damaged_watermark_is_a_finding() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path(), 1);
    let file = dir.path().join(WATERMARK_FILE);
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    assert_eq!(Store::open(dir.path(), &options()).unwrap_err().kind(), StoreErrorKind::Corrupt);
    std::fs::remove_file(&file).unwrap();
    let err = Store::open(dir.path(), &options()).unwrap_err();
    assert!(err.message().contains("is missing"), "{err}");
    assert!(Store::verify_dir(dir.path(), &options()).unwrap().lost.is_some());
}

#[test]
fn a_store_from_before_the_watermark_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let mark = Watermark { commits: 0, record_seq: 0, record_hash: runguard_contract::RecordHash::genesis() };
    drop(open(dir.path()));
    watermark::write(dir.path(), &mark).unwrap();
    std::fs::remove_file(dir.path().join(WATERMARK_FILE)).unwrap();
    // No commit counter and no watermark: nothing is known to be missing.
    let store = open(dir.path());
    assert_eq!(store.commit_count(), 0);
}

#[test]
fn verify_on_an_intact_store_passes_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path(), 2);
    let before = contents(dir.path());
    let report = Store::verify_dir(dir.path(), &options()).unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records_checked, 1);
    assert_eq!(contents(dir.path()), before);
}

#[test]
fn verify_refuses_a_store_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let err = Store::verify_dir(dir.path(), &options()).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Io);
    drop(store);
}

on_both_backends! {
fn a_refused_caller_fails_alone_in_a_group_commit(store) {
    let (world, runs) = populate(&store, 3);
    let other = World::new("globex");
    let globex_run = other.run("g0");
    // Caller 1 (globex) creates its run; caller 2 (acme) repeats an existing record id; caller 3 (acme)
    // bumps a policy past a version conflict; caller 4 (acme) blocks a second run.
    let mut first = WriteBatch::new();
    other.setup(&mut first);
    first.put_run(globex_run.clone());
    let mut duplicate = WriteBatch::new();
    world.push_block(&mut duplicate, &runs[0], 0, at(6));
    let mut conflict = WriteBatch::new();
    let mut stale = budget_policy(Some(&world.tenant), "pol_budget", Mode::Active, 50);
    stale.version = 5;
    conflict.put_policy_version(stale);
    let mut fine = WriteBatch::new();
    world.push_block(&mut fine, &runs[1], 0, at(7));
    let outcomes = store.commit_group(vec![first, duplicate, conflict, fine]);
    assert!(outcomes[0].is_ok(), "{:?}", outcomes[0]);
    let dup = outcomes[1].as_ref().unwrap_err();
    assert_eq!(dup.kind(), StoreErrorKind::Conflict);
    assert!(!dup.message().contains("globex") && !dup.message().contains("g0"), "{dup}");
    assert_eq!(outcomes[2].as_ref().unwrap_err().kind(), StoreErrorKind::Conflict);
    let receipt = outcomes[3].as_ref().unwrap();
    assert_eq!(receipt.records.len(), 1);
    assert_eq!(receipt.records[0].seq, 2);
    assert!(store.get_run(&other.tenant, &globex_run.run_id).unwrap().is_some());
    assert_eq!(store.get_run(&world.tenant, &runs[1].run_id).unwrap().unwrap().status, RunStatus::Stopped);
    assert_eq!(store.ledger(&world.tenant, &runs[0].run_id, &PageRequest::first(10)).unwrap().items.len(), 1);
    assert!(store.verify().unwrap().is_ok());
}
}

on_both_backends! {
fn a_store_that_cannot_write_fails_every_caller_with_io(store) {
    let (world, runs) = populate(&store, 3);
    store.inject_commit_failure(true);
    let mut a = WriteBatch::new();
    a.put_run(runs[1].clone());
    let mut b = WriteBatch::new();
    world.push_block(&mut b, &runs[2], 0, at(6));
    for outcome in store.commit_group(vec![a, b]) {
        assert_eq!(outcome.unwrap_err().kind(), StoreErrorKind::Injected);
    }
    assert!(!store.is_healthy());
    store.inject_commit_failure(false);
    store.probe().unwrap();
    assert!(store.is_healthy());
}
}

on_both_backends! {
fn a_group_commit_answers_each_caller_in_order_with_one_commit(store) {
    let (world, runs) = populate(&store, 4);
    let before = store.commit_count();
    let batches: Vec<WriteBatch> = runs[1..]
        .iter()
        .enumerate()
        .map(|(i, run)| {
            let mut batch = WriteBatch::new();
            world.push_block(&mut batch, run, 0, at(10 + i64::try_from(i).unwrap()));
            batch
        })
        .collect();
    let outcomes = store.commit_group(batches);
    assert_eq!(outcomes.len(), 3);
    let seqs: Vec<u64> = outcomes.iter().map(|o| o.as_ref().unwrap().records[0].seq).collect();
    assert_eq!(seqs, vec![2, 3, 4], "each caller gets its own receipt, in the order sent");
    assert_eq!(store.commit_count(), before + 1, "one commit for the whole group");
    assert!(store.verify().unwrap().is_ok());
}
}

on_both_backends! {
fn an_empty_group_commits_nothing_and_proves_nothing(store) {
    let (_world, runs) = populate(&store, 2);
    let before = store.commit_count();
    assert!(store.commit_group(Vec::new()).is_empty());
    assert_eq!(store.commit_count(), before);
    // A store that just failed to write stays unready: an empty group wrote nothing, so it shows nothing.
    store.inject_commit_failure(true);
    let mut batch = WriteBatch::new();
    batch.put_run(runs[1].clone());
    assert!(store.commit(batch).is_err());
    store.inject_commit_failure(false);
    assert!(store.commit_group(Vec::new()).is_empty());
    assert!(!store.is_healthy());
    store.probe().unwrap();
    assert!(store.is_healthy());
}
}

on_both_backends! {
fn a_flush_failure_fails_every_caller_of_the_group_and_writes_none(store) {
    let (world, runs) = populate(&store, 3);
    let head = store.chain_head().unwrap();
    store.inject_durability_failure(true);
    let mut a = WriteBatch::new();
    world.push_block(&mut a, &runs[1], 0, at(6));
    let mut b = WriteBatch::new();
    world.push_block(&mut b, &runs[2], 0, at(7));
    let outcomes = store.commit_group(vec![a, b]);
    assert_eq!(outcomes.len(), 2);
    for outcome in outcomes {
        assert_eq!(outcome.unwrap_err().kind(), StoreErrorKind::Injected);
    }
    store.inject_durability_failure(false);
    store.probe().unwrap();
    assert_eq!(store.chain_head().unwrap(), head, "no caller's record survived the failed flush");
    assert!(store.ledger(&world.tenant, &runs[2].run_id, &PageRequest::first(10)).unwrap().items.is_empty());
}
}

#[test]
fn a_commit_whose_flush_fails_leaves_no_trace_and_the_store_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let (world, runs) = populated(dir.path(), 2);
    let store = open(dir.path());
    let before_run = store.get_run(&world.tenant, &runs[1].run_id).unwrap();
    store.inject_durability_failure(true);
    let mut batch = WriteBatch::new();
    world.push_block(&mut batch, &runs[1], 0, at(6));
    let err = store.commit(batch.clone()).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Injected);
    assert!(!store.is_healthy());
    // Still failing: the probe reopens the store and undoes the write in memory, but cannot make it durable.
    assert!(store.probe().is_err());
    assert!(!store.is_healthy());
    // Reads show the acknowledged state only.
    assert_eq!(store.get_run(&world.tenant, &runs[1].run_id).unwrap(), before_run);
    assert_eq!(store.chain_head().unwrap().0, 1);
    store.inject_durability_failure(false);
    store.probe().unwrap();
    assert!(store.is_healthy());
    assert_eq!(store.get_run(&world.tenant, &runs[1].run_id).unwrap(), before_run);
    assert!(store.ledger(&world.tenant, &runs[1].run_id, &PageRequest::first(10)).unwrap().items.is_empty());
    // The same call commits now, at the next sequence number.
    let receipt = store.commit(batch).unwrap();
    assert_eq!(receipt.records[0].seq, 2);
    assert_eq!(store.commit_count(), 3);
    store.sync_watermark().unwrap();
    drop(store);
    let store = open(dir.path());
    assert!(store.verify().unwrap().is_ok());
    assert_eq!(store.chain_head().unwrap().0, 2);
    let _ = tenant("acme");
}

#[test]
fn a_store_too_damaged_to_open_is_a_verify_finding() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path(), 1);
    std::fs::write(dir.path().join("conf"), b"this is not sled's configuration").unwrap();
    let before = contents(dir.path());
    let report = Store::verify_dir(dir.path(), &options()).unwrap();
    let lost = report.lost.clone().unwrap_or_default();
    assert!(lost.contains("cannot be opened"), "{report:?}");
    assert!(!lost.contains("runguard-verify-"), "names the copy: {lost}");
    assert_eq!(contents(dir.path()), before);
}
