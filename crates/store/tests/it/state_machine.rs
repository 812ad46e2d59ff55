//! A state-machine property test of the record store against an in-memory model.
//!
//! Transitions append records one at a time or in batches, fail a batch on purpose, reopen the database,
//! and query by run and by time window. After every transition: sequence numbers are gap-free, every
//! index agrees with the primary records, the chain verifies, and everything acknowledged is readable
//! (across reopens too). Fenced ledger appends, some from a stale copy of their run, land exactly when
//! their fencing condition holds: each run's ledger holds what the model says. Steps of running runs, some
//! throttled, advance the run (`WriteOp::AdvanceRun`) or write it whole: every read of a running run shows
//! the model's totals and next call, across reopens, and its ledger checks out.

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use runguard_contract::{Action, NextCall, Phase, PreventionRecord, RecordId, StepCall, Totals, Usage, verify_chain};
use runguard_store::{
    LedgerCall, LedgerEntry, PageRequest, PgOptions, RecordQuery, Store, StoreErrorKind, StoreOptions, StoredRun,
    WriteBatch,
};

use crate::fixtures::{World, at};

const RUNS: usize = 3;

/// One record as the model knows it; its `seq` is its index plus one.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ModelRecord {
    run: usize,
    at_ms: i64,
    simulated: bool,
}

#[derive(Clone, Debug, Default)]
struct Model {
    records: Vec<ModelRecord>,
    /// Each run's ledger length.
    ledgers: [u64; RUNS],
    /// Whether each run was stopped (by a block).
    stopped: [bool; RUNS],
    /// Each run's totals after its steps.
    totals: [Totals; RUNS],
    /// The index of the step each run expects next (its `pre`).
    next: [u64; RUNS],
}

impl Model {
    /// Whether a fenced append lands: a writer with a current copy of a running run.
    fn fence_holds(&self, run: usize, stale: bool) -> bool {
        !stale && !self.stopped[run]
    }
}

/// (run, time offset, simulated)
type Append = (usize, i64, bool);

#[derive(Clone, Debug)]
enum Transition {
    Append(Append),
    AppendBatch(Vec<Append>),
    FailedBatch(Vec<Append>),
    Reopen,
    /// A ledger append fenced on the run's ledger length, or (stale) on one entry fewer.
    Fenced {
        run: usize,
        stale: bool,
    },
    /// A fenced `post` of a running run with `tokens` of usage; a throttled one moves nothing.
    Step {
        run: usize,
        tokens: u64,
        throttled: bool,
    },
    ScanRun {
        run: usize,
        limit: usize,
    },
    Range {
        since: i64,
        until: i64,
        limit: usize,
    },
}

fn append() -> impl Strategy<Value = Append> {
    (0..RUNS, 0i64..40, proptest::bool::weighted(0.2))
}

impl ReferenceStateMachine for Model {
    type State = Model;
    type Transition = Transition;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model::default()).boxed()
    }

    fn transitions(_: &Model) -> BoxedStrategy<Transition> {
        prop_oneof![
            4 => append().prop_map(Transition::Append),
            3 => proptest::collection::vec(append(), 1..6).prop_map(Transition::AppendBatch),
            1 => proptest::collection::vec(append(), 1..3).prop_map(Transition::FailedBatch),
            1 => Just(Transition::Reopen),
            2 => (0..RUNS, proptest::bool::weighted(0.3)).prop_map(|(run, stale)| Transition::Fenced { run, stale }),
            4 => (0..RUNS, 0u64..500, proptest::bool::weighted(0.2))
                .prop_map(|(run, tokens, throttled)| Transition::Step { run, tokens, throttled }),
            1 => (0..RUNS, 1usize..4).prop_map(|(run, limit)| Transition::ScanRun { run, limit }),
            1 => (0i64..40, 0i64..45, 1usize..4).prop_map(|(since, until, limit)| Transition::Range { since, until, limit }),
        ]
        .boxed()
    }

    fn apply(mut state: Model, transition: &Transition) -> Model {
        let mut push = |(run, at_ms, simulated): &Append| {
            state.records.push(ModelRecord { run: *run, at_ms: *at_ms, simulated: *simulated });
            if !simulated {
                state.ledgers[*run] += 1;
                state.stopped[*run] = true;
            }
        };
        match transition {
            Transition::Append(a) => push(a),
            Transition::AppendBatch(all) => all.iter().for_each(push),
            Transition::Fenced { run, stale } => {
                if state.fence_holds(*run, *stale) {
                    state.ledgers[*run] += 1;
                }
            }
            Transition::Step { run, tokens, throttled } => {
                if state.fence_holds(*run, false) {
                    state.ledgers[*run] += 1;
                    if !throttled {
                        state.totals[*run] = after_post(state.totals[*run], *tokens);
                        state.next[*run] += 1;
                    }
                }
            }
            Transition::FailedBatch(_) | Transition::Reopen | Transition::ScanRun { .. } | Transition::Range { .. } => {
            }
        }
        state
    }
}

/// A run's totals after a `post` that used `tokens` (the fixtures' cost and duration for it).
fn after_post(before: Totals, tokens: u64) -> Totals {
    Totals {
        tokens: before.tokens + tokens,
        cost_micros: before.cost_micros + 2 * tokens,
        duration_ms: before.duration_ms + 3,
        steps: before.steps + 1,
    }
}

/// Where the store under test lives, so that it can be opened again.
enum Place {
    Sled(tempfile::TempDir),
    Postgres(String),
}

impl Place {
    fn open(&self) -> Store {
        match self {
            Place::Sled(dir) => Store::open(dir.path(), &options()).unwrap(),
            Place::Postgres(url) => Store::open_postgres(url, &PgOptions::default()).unwrap(),
        }
    }
}

/// The backend a machine runs on.
trait Backend {
    /// A fresh place, or `None` when this backend cannot run here (the test then checks nothing).
    fn place() -> Option<Place>;
}

struct Sled;
struct Postgres;

impl Backend for Sled {
    fn place() -> Option<Place> {
        Some(Place::Sled(tempfile::tempdir().unwrap()))
    }
}

impl Backend for Postgres {
    fn place() -> Option<Place> {
        runguard_testpg::fresh_schema().map(|db| Place::Postgres(db.url))
    }
}

struct Sut {
    place: Place,
    store: Option<Store>,
    world: World,
    runs: Vec<StoredRun>,
}

impl Sut {
    fn store(&self) -> &Store {
        self.store.as_ref().unwrap()
    }
}

fn options() -> StoreOptions {
    StoreOptions { fsync: false, ..StoreOptions::default() }
}

/// Stages `appends` after the `existing` model records (which fix record ids and step numbers).
fn stage(sut: &Sut, existing: &[ModelRecord], appends: &[Append]) -> WriteBatch {
    let mut batch = WriteBatch::new();
    let mut seen: Vec<ModelRecord> = existing.to_vec();
    for &(run, at_ms, simulated) in appends {
        let step = seen.iter().filter(|r| r.run == run && !r.simulated).count() as u64;
        if simulated {
            let id = RecordId::new(format!("prv_sim_{}", seen.len())).unwrap();
            let decision = sut.world.block(&sut.runs[run].run_id, step, &id, at(at_ms));
            let mut record = sut.world.record_for(&decision, at(at_ms));
            record.is_simulated = true;
            batch.append_simulated_record(record);
        } else {
            sut.world.push_block(&mut batch, &sut.runs[run], step, at(at_ms));
        }
        seen.push(ModelRecord { run, at_ms, simulated });
    }
    batch
}

fn all_pages(store: &Store, mut query: RecordQuery, limit: usize) -> Vec<PreventionRecord> {
    let mut out = Vec::new();
    query.page = PageRequest::first(limit);
    loop {
        let page = store.list_records(&query).unwrap();
        assert!(page.items.len() <= limit);
        out.extend(page.items);
        match page.next_cursor {
            Some(cursor) => query.page = PageRequest::after(limit, cursor),
            None => return out,
        }
    }
}

/// The model's records (with their seqs) that match, in the order the store lists them.
fn expected(model: &Model, keep: impl Fn(&ModelRecord) -> bool, by_time: bool) -> Vec<u64> {
    let mut hits: Vec<(i64, u64)> =
        model.records.iter().enumerate().filter(|(_, r)| keep(r)).map(|(i, r)| (r.at_ms, i as u64 + 1)).collect();
    if by_time {
        hits.sort();
    }
    hits.into_iter().map(|(_, seq)| seq).collect()
}

fn seqs(records: &[PreventionRecord]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

struct StoreMachine<B>(std::marker::PhantomData<B>);

impl<B: Backend> StateMachineTest for StoreMachine<B> {
    type SystemUnderTest = Option<Sut>;
    type Reference = Model;

    fn init_test(_: &Model) -> Option<Sut> {
        let place = B::place()?;
        let store = place.open();
        let world = World::new("acme");
        let runs: Vec<StoredRun> = (0..RUNS).map(|i| world.run(&format!("run{i}"))).collect();
        let mut batch = WriteBatch::new();
        world.setup(&mut batch);
        for run in &runs {
            batch.put_run(run.clone());
        }
        store.commit(batch).unwrap();
        Some(Sut { place, store: Some(store), world, runs })
    }

    fn apply(sut: Option<Sut>, model: &Model, transition: Transition) -> Option<Sut> {
        sut.map(|sut| apply(sut, model, transition))
    }

    fn check_invariants(sut: &Option<Sut>, model: &Model) {
        if let Some(sut) = sut {
            check_invariants(sut, model);
        }
    }
}

fn apply(mut sut: Sut, model: &Model, transition: Transition) -> Sut {
    match transition {
        Transition::Append(a) => {
            let before = &model.records[..model.records.len() - 1];
            let receipt = sut.store().commit(stage(&sut, before, &[a])).unwrap();
            assert_eq!(seqs(&receipt.records), [model.records.len() as u64]);
        }
        Transition::AppendBatch(all) => {
            let before = &model.records[..model.records.len() - all.len()];
            let receipt = sut.store().commit(stage(&sut, before, &all)).unwrap();
            let first = before.len() as u64 + 1;
            assert_eq!(seqs(&receipt.records), (first..first + all.len() as u64).collect::<Vec<_>>());
        }
        Transition::FailedBatch(all) => {
            let batch = stage(&sut, &model.records, &all);
            sut.store().inject_commit_failure(true);
            let err = sut.store().commit(batch).unwrap_err();
            sut.store().inject_commit_failure(false);
            assert_eq!(err.kind(), StoreErrorKind::Injected);
        }
        Transition::Fenced { run, stale } => {
            let stored = &sut.runs[run];
            let len = model.ledgers[run];
            let holds = model.fence_holds(run, stale);
            // The model is the state after the transition: a landed append is already counted.
            let expected = match (holds, stale) {
                (true, _) => len - 1,
                (false, false) => len,
                // A copy that missed the latest entry, or (at 0) one that saw an entry that never landed.
                (false, true) => len.checked_sub(1).unwrap_or(1),
            };
            let mut batch = WriteBatch::new();
            batch.fence_run(stored.tenant_id.clone(), stored.run_id.clone(), expected).append_ledger(
                stored.tenant_id.clone(),
                stored.run_id.clone(),
                LedgerEntry::new(LedgerCall::RunStart, sut.world.allow(&stored.run_id, expected), model.totals[run]),
            );
            expect_fenced_unless(sut.store().commit(batch), holds, expected, "a stale or stopped run's fenced write");
        }
        Transition::Step { run, tokens, throttled } => {
            let holds = model.fence_holds(run, false);
            // The model is the state after the transition: undo a landed step to find the state before.
            let position = if holds { model.ledgers[run] - 1 } else { model.ledgers[run] };
            let moved = holds && !throttled;
            let index = if moved { model.next[run] - 1 } else { model.next[run] };
            let before = if moved {
                let t = model.totals[run];
                Totals {
                    tokens: t.tokens - tokens,
                    cost_micros: t.cost_micros - 2 * tokens,
                    duration_ms: t.duration_ms - 3,
                    steps: t.steps - 1,
                }
            } else {
                model.totals[run]
            };
            let mut call = StepCall::new(index, Phase::Post);
            call.usage = Some(Usage { tokens, cost_micros: 2 * tokens, duration_ms: 3 });
            let mut decision = sut.world.allow(&sut.runs[run].run_id, position);
            let mut after = sut.runs[run].clone();
            if throttled {
                decision.action = Action::Throttle;
                (after.totals, after.next) = (before, NextCall { index, phase: Phase::Pre });
            } else {
                after.totals = after_post(before, tokens);
                after.next = NextCall { index: index + 1, phase: Phase::Pre };
            }
            let entry = LedgerEntry::new(LedgerCall::Step(call), decision, after.totals);
            let mut batch = WriteBatch::new();
            batch.fence_run(after.tenant_id.clone(), after.run_id.clone(), position).append_ledger(
                after.tenant_id.clone(),
                after.run_id.clone(),
                entry,
            );
            if throttled {
                batch.put_run(after);
            } else {
                batch.advance_run(after);
            }
            expect_fenced_unless(sut.store().commit(batch), holds, position, "a step of a stopped run");
        }
        Transition::Reopen => {
            drop(sut.store.take());
            sut.store = Some(sut.place.open());
        }
        Transition::ScanRun { run, limit } => {
            let query = RecordQuery {
                run_id: Some(sut.runs[run].run_id.clone()),
                ..RecordQuery::tenant(sut.world.tenant.clone())
            };
            let got = all_pages(sut.store(), query, limit);
            assert_eq!(seqs(&got), expected(model, |r| r.run == run && !r.simulated, false));
        }
        Transition::Range { since, until, limit } => {
            let query = RecordQuery {
                since: Some(at(since)),
                until: Some(at(until)),
                ..RecordQuery::tenant(sut.world.tenant.clone())
            };
            let got = all_pages(sut.store(), query, limit);
            let want = expected(model, |r| !r.simulated && r.at_ms >= since && r.at_ms < until, true);
            assert_eq!(seqs(&got), want);
        }
    }
    sut
}

/// A fenced commit of one ledger entry: it lands at `position` when its fence `holds`, and is refused as
/// fenced otherwise (`what` names the write that must not land).
fn expect_fenced_unless(
    committed: Result<runguard_store::CommitReceipt, runguard_store::StoreError>,
    holds: bool,
    position: u64,
    what: &str,
) {
    match committed {
        Ok(receipt) => {
            assert!(holds, "{what} landed");
            assert_eq!(receipt.ledger_positions, [position]);
        }
        Err(err) => {
            assert!(!holds, "a write whose fence holds was refused: {err}");
            assert_eq!(err.kind(), StoreErrorKind::Fenced, "{err}");
        }
    }
}

fn check_invariants(sut: &Sut, model: &Model) {
    let store = sut.store();
    let n = model.records.len() as u64;
    // Gap-free sequence and the head recovered or advanced to it.
    assert_eq!(store.chain_head().unwrap().0, n);
    let all: Vec<PreventionRecord> = store.export_records(1).map(Result::unwrap).collect();
    assert_eq!(seqs(&all), (1..=n).collect::<Vec<_>>());
    // Every acknowledged record is there, as written.
    for (record, want) in all.iter().zip(&model.records) {
        assert_eq!(record.run_id, sut.runs[want.run].run_id);
        assert_eq!((record.prevented_at, record.is_simulated), (at(want.at_ms), want.simulated));
        let found = store.get_record(&sut.world.tenant, &record.id).unwrap();
        assert_eq!(found.as_ref(), Some(record), "rec_by_id agrees");
    }
    // The chain verifies, by the contract and by the store.
    verify_chain(&all).unwrap();
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records_checked, n);
    // Every run's ledger holds exactly what landed; a running run reads as its steps left it, whichever
    // way it is read, and its ledger checks out against it.
    let listed = store.list_runs(&sut.world.tenant, &PageRequest::first(10)).unwrap().items;
    let all_runs: Vec<StoredRun> = store.all_runs().map(Result::unwrap).collect();
    for (i, (run, len)) in sut.runs.iter().zip(model.ledgers).enumerate() {
        let loaded = store.load_run(&run.tenant_id, &run.run_id).unwrap().unwrap();
        assert_eq!(loaded.ledger.len() as u64, len, "the ledger of `{}`", run.run_id);
        if model.stopped[i] {
            continue;
        }
        let want = (model.totals[i], NextCall { index: model.next[i], phase: Phase::Pre });
        assert!(loaded.is_intact(), "`{}`: {:?}", run.run_id, loaded.ledger_problem);
        assert_eq!((loaded.run.totals, loaded.run.next), want, "load_run of `{}`", run.run_id);
        let got = store.get_run(&run.tenant_id, &run.run_id).unwrap().unwrap();
        assert_eq!((got.totals, got.next), want, "get_run of `{}`", run.run_id);
        for read in [&listed, &all_runs] {
            let found = read.iter().find(|r| r.run_id == run.run_id).unwrap();
            assert_eq!((found.totals, found.next), want, "a list of `{}`", run.run_id);
        }
    }
    // Tenant, policy and simulated indexes agree with the records.
    let tenant_q = RecordQuery::tenant(sut.world.tenant.clone());
    let live = expected(model, |r| !r.simulated, true);
    assert_eq!(seqs(&all_pages(store, tenant_q.clone(), 4)), live);
    let by_policy = RecordQuery { policy_id: Some(sut.world.policy.id.clone()), ..tenant_q.clone() };
    assert_eq!(seqs(&all_pages(store, by_policy, 5)), live);
    let simulated = RecordQuery { simulated: true, ..tenant_q };
    assert_eq!(seqs(&all_pages(store, simulated, 3)), expected(model, |r| r.simulated, true));
}

/// Cases of the PostgreSQL machine: each case migrates a fresh schema (about a quarter of a second), so a
/// quarter of `PROPTEST_CASES` (at least 4), and 12 when it is not set.
fn postgres_cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse::<u32>().ok()).map_or(12, |n| (n / 4).max(4))
}

prop_state_machine! {
    #![proptest_config(Config {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..Config::default()
    })]

    #[test]
    fn the_record_store_matches_its_model(sequential 1..16 => StoreMachine<Sled>);
}

/// The same machine on PostgreSQL, run without `prop_state_machine!`: its `proptest!` lets
/// `PROPTEST_CASES` override any case count given in code, and this one wants fewer cases than sled's.
#[test]
fn the_postgres_record_store_matches_its_model() {
    let config = Config {
        cases: postgres_cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        source_file: Some(file!()),
        test_name: Some("the_postgres_record_store_matches_its_model"),
        ..Config::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config.clone());
    let result = runner.run(&Model::sequential_strategy(1..16), |(initial, transitions, seen)| {
        StoreMachine::<Postgres>::test_sequential(config.clone(), initial, transitions, seen);
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
