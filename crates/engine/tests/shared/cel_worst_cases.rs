//! The most expensive CEL rules the static check accepts at the default limits (`docs/evaluation.md`), and the
//! largest inputs they can meet: shared by the test that bounds their evaluation time
//! (`tests/it/cel_bounds.rs`) and the benchmark that measures it (`benches/cel_worst_case.rs`).
//!
//! Each family repeats one expensive shape (`||`-joined, so that nothing short-circuits on the inputs
//! below, which match nothing) as many times as the cost limit accepts.

use std::collections::BTreeMap;

use runguard_contract::{Phase, PolicyLimits, StepCall, StepError, Usage};
use runguard_engine::cel_cost;

/// Families of expensive shapes: (name, guard, one repetition).
const SHAPES: &[(&str, &str, &str)] = &[
    // Regexes over the largest text, including a Unicode word boundary (which a lazy DFA cannot decide past a
    // non-ASCII byte) and a counted repetition.
    ("regex_output", "has(step.output_text)", r"step.output_text.matches('\\bpassw(or)?d[0-9]{2,8}\\b')"),
    ("regex_input_ci", "has(step.input_text)", r"step.input_text.matches('(?i)(secret|token|key)=[a-z0-9]{16,32}')"),
    // Substring scans of the largest text with a needle that almost matches everywhere.
    ("contains_output", "has(step.output_text)", "step.output_text.contains('aaaaaaaaaaaaaaaaaaaaaaaaaaaaaab')"),
    ("ends_size_output", "has(step.output_text)", "(step.output_text.endsWith('zz') || size(step.output_text) < 0)"),
    // Concatenation of the largest texts.
    ("concat_texts", "has(step.output_text) && has(step.input_text)", "size(step.output_text + step.input_text) < 0"),
    // A comprehension over the input keys, scanning each key.
    ("keys_scan", "true", "step.input_keys.exists(k, k.contains('aaaaaaab') || k.endsWith('b'))"),
    // A regex compiled on every call of a loop (cel compiles `matches` patterns per call).
    ("regex_compiles", "true", "[1,2,3,4,5,6,7,8].exists(i, run.id.matches('^(b|c)+[0-9]{2}$'))"),
    ("keys_in", "true", "'zzz' in step.input_keys"),
    // Nested comprehensions over literal lists, reading the run.
    (
        "nested_literals",
        "true",
        "[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16].exists(i, [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16].exists(j, \
         i * j == run.tokens + 1000000))",
    ),
    // Labels (a map) iterated and indexed.
    ("labels", "true", "run.labels.exists(k, run.labels[k].startsWith('zz') || k.endsWith('zz'))"),
];

/// Each family at the most repetitions the default cost limit accepts, with its computed cost.
pub fn worst_cases() -> Vec<(&'static str, String, u64)> {
    let limits = PolicyLimits::default();
    SHAPES
        .iter()
        .map(|(name, guard, unit)| {
            let build = |n: usize| format!("{guard} && ({})", vec![*unit; n].join(" || "));
            let mut n = 1;
            let mut cost = cel_cost(&build(1), &limits).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(cost <= limits.max_cel_cost, "{name}: one repetition costs {cost}");
            while let Ok(next) = cel_cost(&build(n + 1), &limits) {
                if next > limits.max_cel_cost || build(n + 1).len() > limits.max_cel_len {
                    break;
                }
                n += 1;
                cost = next;
            }
            (*name, build(n), cost)
        })
        .collect()
}

/// The largest step the default step limits accept, built so that the families above match nothing and
/// scan everything: texts of `a`s with a non-ASCII character every 64 bytes, the most and longest keys.
pub fn largest_step() -> StepCall {
    let limits = runguard_contract::StepLimits::default();
    let mut text = String::with_capacity(limits.max_text_len);
    while text.len() + 64 <= limits.max_text_len {
        text.push_str(&"a".repeat(62));
        text.push('é');
    }
    let key = |i: usize| format!("{i:04}{}", "a".repeat(limits.max_field_len - 4));
    StepCall {
        skill: Some("a".repeat(limits.max_field_len)),
        api_endpoint: Some("a".repeat(limits.max_field_len)),
        input_keys: (0..limits.max_input_keys).map(key).collect(),
        input_text: Some(text.clone()),
        output_text: Some(text),
        usage: Some(Usage { tokens: 1, cost_micros: 1, duration_ms: 1 }),
        error: Some(StepError { message: Some("a".repeat(limits.max_field_len)), ..StepError::default() }),
        ..StepCall::new(0, Phase::Post)
    }
}

/// The most labels a run may carry (the node allows 64 of up to 256 bytes each).
pub fn largest_labels() -> BTreeMap<String, String> {
    (0..64).map(|i| (format!("{i:03}{}", "a".repeat(253)), "a".repeat(256))).collect()
}
