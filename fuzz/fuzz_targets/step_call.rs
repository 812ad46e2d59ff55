//! Step calls: decode and validate as `POST /v1/runs/{id}/steps` does, then answer the call through `Run`
//! against a snapshot holding one policy of every rule kind (twice, to check the retry path).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use runguard_contract::{StepCall, StepLimits};
use runguard_engine::{CompiledSnapshot, TenantRates};

static SNAPSHOT: OnceLock<Arc<CompiledSnapshot>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Ok(call) = StepCall::from_json(data, &StepLimits::default()) else { return };
    let snapshot = SNAPSHOT.get_or_init(runguard_fuzz::reference_snapshot);
    let mut run = runguard_fuzz::start(snapshot);
    let mut rates = TenantRates::default();
    // Fast-forward to the call's index when it is small, so that most inputs are evaluated.
    if call.index < 4 {
        for index in 0..call.index {
            let post = StepCall { usage: call.usage, ..StepCall::new(index, runguard_contract::Phase::Post) };
            runguard_fuzz::step(&mut run, &mut rates, &post);
        }
    }
    runguard_fuzz::step(&mut run, &mut rates, &call);
    runguard_fuzz::step(&mut run, &mut rates, &call);
});
