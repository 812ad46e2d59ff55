//! Stored values: decode arbitrary bytes as each value the store keeps (the first byte picks the type),
//! with the store's envelope rule and bincode configuration; whatever decodes must re-encode and decode
//! to the same value. Corrupt data must be an error, never a crash or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runguard_contract::{AuditEntry, Incident, Pattern, PreventionRecord, Regret};
use runguard_store::{GraduationState, LedgerEntry, ShadowStats, StoredRun};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else { return };
    match kind % 11 {
        0 => runguard_fuzz::stored::round_trip::<PreventionRecord>(bytes),
        1 => runguard_fuzz::stored::round_trip::<StoredRun>(bytes),
        2 => runguard_fuzz::stored::round_trip::<LedgerEntry>(bytes),
        3 => runguard_fuzz::stored::round_trip::<AuditEntry>(bytes),
        4 => runguard_fuzz::stored::round_trip::<Incident>(bytes),
        5 => runguard_fuzz::stored::round_trip::<Pattern>(bytes),
        6 => runguard_fuzz::stored::round_trip::<Regret>(bytes),
        7 => runguard_fuzz::stored::round_trip::<ShadowStats>(bytes),
        8 => runguard_fuzz::stored::round_trip::<GraduationState>(bytes),
        9 => runguard_fuzz::stored::policy(bytes),
        _ => runguard_fuzz::stored::snapshot(bytes),
    }
});
