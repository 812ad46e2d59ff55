//! Policy documents: parse and validate as `POST /v1/policies` does, and for every document that passes,
//! compile it into a snapshot and evaluate steps against it (regexes, CEL, detectors, budgets, rates).
#![no_main]

use libfuzzer_sys::fuzz_target;
use runguard_contract::{PolicyDocument, PolicyLimits};

fuzz_target!(|data: &[u8]| {
    let limits = PolicyLimits::default();
    let Ok(doc) = PolicyDocument::from_json(data, &limits) else { return };
    if runguard_engine::validate_document(&doc, &limits).is_err() {
        return;
    }
    // A valid document round-trips through its JSON form unchanged.
    let json = serde_json::to_vec(&doc).expect("a document serialises");
    let again = PolicyDocument::from_json(&json, &limits).expect("a valid document re-parses");
    assert_eq!(doc, again, "the document does not round-trip");
    let policy = runguard_fuzz::policy(doc, 0);
    runguard_fuzz::exercise(&runguard_fuzz::compile(&[policy]));
});
