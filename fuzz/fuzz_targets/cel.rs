//! CEL: any expression within the policy limits is compiled as an `expr` rule (validation: syntax, the
//! static check of names, functions and result type, and the cost bound) and every one that compiles is
//! evaluated at run start and over several steps. Compilation must accept or reject without crashing;
//! evaluation must end (bounded cost) with a boolean or an error that `on_error` handles.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runguard_contract::{PolicyDocument, PolicyLimits};
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let limits = PolicyLimits::default();
    let Ok(source) = std::str::from_utf8(data) else { return };
    // The policy validation refuses longer expressions before compiling them.
    if source.len() > limits.max_cel_len {
        return;
    }
    let doc = json!({ "name": "fuzzed rule", "on_error": "warn", "bind_at": "step_post", "rule": { "kind": "expr", "cel": source } });
    let Ok(doc) = PolicyDocument::from_value(doc, &limits) else { return };
    if runguard_engine::validate_document(&doc, &limits).is_err() {
        return;
    }
    let mut pre = doc.clone();
    pre.bind_at = Some(runguard_contract::BindAt::StepPre);
    let policies = [runguard_fuzz::policy(doc, 0), runguard_fuzz::policy(pre, 1)];
    runguard_fuzz::exercise(&runguard_fuzz::compile(&policies));
});
