//! Every CEL rule the static check accepts evaluates in bounded time at the node's size limits.
//! The most expensive accepted rule of each family (see `tests/shared/cel_worst_cases.rs`) is evaluated
//! against the largest step and labels the default limits allow. The bound here is generous (an
//! unoptimised build on a shared machine); `benches/cel_worst_case.rs` measures the real figures, which
//! `docs/evaluation.md` quotes.

use std::time::{Duration, Instant};

use runguard_contract::*;
use runguard_engine::{CompiledSnapshot, RunLimits, TenantRates, validate_document};

#[path = "../shared/cel_worst_cases.rs"]
mod cases;

use crate::support::{T0, at, start, tenant};

/// Per evaluation, in a debug build on a busy machine (measured up to 0.7 s); release figures are in
/// `docs/evaluation.md` (at most about 25 ms).
const BOUND: Duration = Duration::from_secs(5);

#[test]
fn the_worst_accepted_rules_evaluate_in_bounded_time_at_the_size_limits() {
    let limits = PolicyLimits::default();
    let step = cases::largest_step();
    step.validate(&StepLimits::default()).unwrap();
    let mut report = Vec::new();
    for (name, cel, cost) in cases::worst_cases() {
        let doc = serde_json::json!({ "id": "pol_worst", "name": name, "rule": { "kind": "expr", "cel": cel } });
        let doc = PolicyDocument::from_value(doc, &limits).unwrap();
        validate_document(&doc, &limits).unwrap_or_else(|e| panic!("{name} is refused: {e}"));
        let policy =
            Policy::create(doc, PolicyId::new("pol_worst").unwrap(), Some(tenant()), Timestamp::from_unix_millis(T0));
        let snapshot = CompiledSnapshot::compile(&Snapshot::capture(&tenant(), [&policy]), &limits).unwrap();
        let run = start(std::sync::Arc::new(snapshot), "run-worst", cases::largest_labels());
        let started = Instant::now();
        let evaluation = run.step(&step, &RunLimits::default(), &mut TenantRates::default(), at(1)).unwrap();
        let took = started.elapsed();
        // Nothing matches: every repetition ran to the end, and none failed.
        assert_eq!(evaluation.decision.action, Action::Allow, "{name}: {:?}", evaluation.decision.violations);
        report.push(format!("{name}: cost {cost}, {} bytes, {took:?}", cel.len()));
        assert!(took < BOUND, "{name} took {took:?} (cost {cost}): {cel}");
    }
    println!("{}", report.join("\n"));
}

/// The rule of the issue, and any regex computed from the input, is refused at validation.
#[test]
fn the_rule_that_froze_the_node_is_refused() {
    let limits = PolicyLimits::default();
    let doc = serde_json::json!({ "name": "self match", "rule": { "kind": "expr",
        "cel": "has(step.output_text) && step.output_text.matches(step.output_text)" } });
    let doc = PolicyDocument::from_value(doc, &limits).unwrap();
    let err = validate_document(&doc, &limits).unwrap_err();
    assert_eq!(err.field(), "rule.cel");
    assert!(err.message().contains("literal"), "{err}");
}
