//! The driver behind the engine's instruction counts in `docs/performance.md`: warms a run as the
//! `four_budgets` bench does (six complete steps, then the `pre` of step 6), then answers the `post` of
//! step 6 `N` times, uncommitted. Run it under callgrind twice, with `N` = 1000 and `N` = 0; the difference
//! over 1000 is the instructions of one `Run::step`:
//!
//! ```text
//! cargo build --release -p runguard-engine --example step_instructions
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/step_instructions 1000 1200
//! ```
//!
//! Arguments: `N`, the `post`'s tokens (1,200 is allowed; 20,000 crosses the per-step budget and blocks),
//! and optionally `cel` (one `expr` rule instead of the four budgets). It uses only `Run::step`, so the same
//! file measures an older engine too.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use runguard_contract::{
    Estimate, Phase, Policy, PolicyDocument, PolicyLimits, RunId, Snapshot, StepCall, TenantId, Timestamp, Usage,
};
use runguard_engine::{CompiledSnapshot, Run, RunLimits, TenantRates, validate_document};
use serde_json::{Value, json};

const START_MS: i64 = 1_795_000_000_000;
const WARM_STEPS: u64 = 6;

fn tenant() -> TenantId {
    TenantId::new("acme").expect("`acme` is a valid tenant id")
}

fn policy(doc: Value) -> Policy {
    let limits = PolicyLimits::default();
    let doc = PolicyDocument::from_value(doc, &limits).expect("the driver's policies parse");
    validate_document(&doc, &limits).expect("the driver's policies are valid");
    let id = doc.id.clone().expect("the driver's policies name their id");
    Policy::create(doc, id, Some(tenant()), Timestamp::from_unix_millis(START_MS))
}

fn budget(id: &str, metric: &str, per: &str, max: u64, warn_at: &[u32]) -> Policy {
    policy(json!({
        "id": id, "name": format!("{per} {metric} budget"), "action": "block", "precedence": 100,
        "rule": {"kind": "budget", "metric": metric, "per": per, "max": max, "warn_at": warn_at},
    }))
}

fn policies(cel: bool) -> Vec<Policy> {
    if cel {
        return vec![policy(json!({
            "id": "c_search_cost", "name": "search cost",
            "rule": {"kind": "expr", "cel": "has(step.usage) && step.usage.duration_ms > 30000"},
        }))];
    }
    vec![
        budget("b_tokens_run", "tokens", "run", 100_000, &[50, 90]),
        budget("b_cost_run", "cost_micros", "run", 5_000_000, &[]),
        budget("b_steps_run", "steps", "run", 200, &[]),
        budget("b_tokens_step", "tokens", "step", 16_000, &[]),
    ]
}

fn pre_time(index: u64) -> Timestamp {
    Timestamp::from_unix_millis(START_MS + 10_000 + 2_000 * i64::try_from(index).unwrap_or(0))
}

fn call(index: u64, phase: Phase, tokens: u64) -> StepCall {
    let mut call = StepCall {
        skill: Some("search".to_owned()),
        api_endpoint: Some("https://kb.example.com/v1/search".to_owned()),
        input_keys: vec!["query".to_owned(), "max_results".to_owned(), "filters".to_owned()],
        ..StepCall::new(index, phase)
    };
    match phase {
        Phase::Pre => call.estimate = Some(Estimate { tokens: Some(1_500), cost_micros: Some(3_000) }),
        Phase::Post => {
            call.usage = Some(Usage { tokens, cost_micros: 2 * tokens, duration_ms: 850 });
            call.output_text = Some("done".to_owned());
        }
    }
    call
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let tokens: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1_200);
    let cel = args.get(3).is_some_and(|a| a == "cel");

    let snapshot = Snapshot::capture(&tenant(), &policies(cel));
    let compiled =
        Arc::new(CompiledSnapshot::compile(&snapshot, &PolicyLimits::default()).expect("the snapshot hashes"));
    let labels = BTreeMap::from([("team".to_owned(), "blue".to_owned())]);
    let run_id = RunId::new("run-driver").expect("a valid run id");
    let (mut run, start) = Run::start(compiled, tenant(), run_id, labels, pre_time(0));
    run.commit(start);
    let limits = RunLimits::default();
    let warm = |run: &mut Run, call: &StepCall, at: Timestamp| {
        let outcome = run.step(call, &limits, &mut TenantRates::default(), at).expect("in order");
        run.commit(outcome);
    };
    for index in 0..WARM_STEPS {
        warm(&mut run, &call(index, Phase::Pre, 0), pre_time(index));
        warm(&mut run, &call(index, Phase::Post, 1_200), pre_time(index).plus_millis(1_000));
    }
    warm(&mut run, &call(WARM_STEPS, Phase::Pre, 0), pre_time(WARM_STEPS));
    let post = call(WARM_STEPS, Phase::Post, tokens);
    let at = pre_time(WARM_STEPS).plus_millis(1_000);
    let mut actions = 0u64;
    for _ in 0..n {
        let outcome = run.step(black_box(&post), &limits, &mut TenantRates::default(), at).expect("in order");
        actions += u64::from(outcome.decision.action == runguard_contract::Action::Allow);
    }
    println!("{n} calls, {actions} allowed");
}
