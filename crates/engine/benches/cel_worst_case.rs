//! Criterion benchmark of the most expensive CEL rules the static check accepts (`docs/evaluation.md`): each family
//! of `tests/shared/cel_worst_cases.rs`, at the most repetitions the default cost limit accepts, evaluated
//! through [`Run::step`] against the largest step (256 KiB texts, 256 keys of 2 KiB) and labels the
//! default limits allow.
//! `docs/evaluation.md` quotes the figures as the documented bound.
//!
//! `cargo bench -p runguard-engine --bench cel_worst_case`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use runguard_contract::{Action, Policy, PolicyDocument, PolicyId, PolicyLimits, RunId, Snapshot, TenantId, Timestamp};
use runguard_engine::{CompiledSnapshot, Run, RunLimits, TenantRates, validate_document};

#[path = "../tests/shared/cel_worst_cases.rs"]
#[allow(dead_code, reason = "shared with the test, which uses every helper")]
mod cases;

const START_MS: i64 = 1_795_000_000_000;

fn bench(c: &mut Criterion) {
    let limits = PolicyLimits::default();
    let tenant = TenantId::new("acme").expect("`acme` is a valid tenant id");
    let step = cases::largest_step();
    let mut group = c.benchmark_group("cel_worst_case");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for (name, cel, cost) in cases::worst_cases() {
        let doc = serde_json::json!({ "id": "pol_worst", "name": name, "rule": { "kind": "expr", "cel": cel } });
        let doc = PolicyDocument::from_value(doc, &limits).expect("the document parses");
        validate_document(&doc, &limits).expect("the worst case is accepted");
        let id = PolicyId::new("pol_worst").expect("valid policy id");
        let policy = Policy::create(doc, id, Some(tenant.clone()), Timestamp::from_unix_millis(START_MS));
        let snapshot =
            CompiledSnapshot::compile(&Snapshot::capture(&tenant, [&policy]), &limits).expect("the snapshot compiles");
        let now = Timestamp::from_unix_millis(START_MS + 1);
        let run_id = RunId::new("run-worst").expect("valid run id");
        let (mut run, start) =
            Run::start(std::sync::Arc::new(snapshot), tenant.clone(), run_id, cases::largest_labels(), now);
        run.commit(start);
        let limits = RunLimits::default();
        let first = run.step(&step, &limits, &mut TenantRates::default(), now).expect("in order");
        assert_eq!(first.decision.action, Action::Allow, "{name} matches nothing and fails nowhere");
        println!("{name}: cost {cost}");
        group.bench_function(name, |b| {
            b.iter(|| black_box(run.step(black_box(&step), &limits, &mut TenantRates::default(), now)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
