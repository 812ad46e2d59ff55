//! Tenant-period usage totals: conditional increments refused past their bound without failing other
//! callers of the group, durable across a reopen, and exact under writers on two handles of one
//! PostgreSQL database (two nodes).

use std::sync::Arc;
use std::time::Duration;

use runguard_contract::{PolicyId, TenantId, Timestamp};
use runguard_store::{PgOptions, Store, StoreErrorKind, StoreOptions, WriteBatch};

use crate::fixtures::tenant;

fn policy() -> PolicyId {
    PolicyId::new("pol_day").unwrap()
}

fn day() -> Timestamp {
    Timestamp::from_unix_millis(1_795_000_000_000 / 86_400_000 * 86_400_000)
}

fn add(tenant: &TenantId, delta: u64, at_most: Option<u64>) -> WriteBatch {
    let mut batch = WriteBatch::new();
    batch.add_tenant_usage(tenant.clone(), policy(), day(), delta, at_most);
    batch
}

/// The rules every backend keeps: a bound refuses only its own caller, unbounded increments always
/// apply, each tenant and each period has its own total.
fn conditional_increments_hold_their_bound(store: &Store) {
    let acme = tenant("acme");
    let beta = tenant("beta");
    store.commit(add(&acme, 6, Some(10))).unwrap();
    let err = store.commit(add(&acme, 5, Some(10))).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict);
    assert!(err.is_tenant_limit(), "{err}");
    assert_eq!(store.tenant_usage(&acme, &policy(), day()).unwrap(), 6, "a refused increment writes nothing");
    let results = store.commit_group(vec![add(&acme, 4, Some(10)), add(&acme, 1, Some(10)), add(&beta, 3, Some(3))]);
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(results[1].as_ref().unwrap_err().is_tenant_limit(), "the second caller sees the first's increment");
    store.commit(add(&acme, 5, None)).unwrap();
    assert_eq!(store.tenant_usage(&acme, &policy(), day()).unwrap(), 15, "spent usage always counts");
    assert_eq!(store.tenant_usage(&beta, &policy(), day()).unwrap(), 3);
    let tomorrow = day().plus_millis(86_400_000);
    assert_eq!(store.tenant_usage(&acme, &policy(), tomorrow).unwrap(), 0, "a new period starts at zero");
}

#[test]
fn sled_keeps_tenant_totals_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        conditional_increments_hold_their_bound(&store);
    }
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    assert_eq!(store.tenant_usage(&tenant("acme"), &policy(), day()).unwrap(), 15);
}

#[test]
fn postgres_totals_stay_within_their_bound_under_two_writers() {
    let Some(db) = runguard_testpg::fresh_database() else { return };
    let options = PgOptions { connect_timeout: Duration::from_secs(2), ..PgOptions::default() };
    let first = Store::open_postgres(&db.url, &options).unwrap();
    conditional_increments_hold_their_bound(&first);

    // Two handles stand for two nodes: 60 bounded increments of 1 toward a fresh tenant's bound of 25.
    let nodes = [Arc::new(first), Arc::new(Store::open_postgres(&db.url, &options).unwrap())];
    let gamma = tenant("gamma");
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let store = Arc::clone(&nodes[i % 2]);
            let gamma = gamma.clone();
            std::thread::spawn(move || (0..15).filter(|_| store.commit(add(&gamma, 1, Some(25))).is_ok()).count())
        })
        .collect();
    let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(admitted, 25, "exactly the bound is admitted across both writers");
    assert_eq!(nodes[1].tenant_usage(&gamma, &policy(), day()).unwrap(), 25);
}

fn rate_event(tenant: &TenantId, at_ms: i64, max: u64) -> WriteBatch {
    use runguard_store::{RateBound, TenantRateEvent, TenantRateUse, WriteOp};
    let at = day().plus_millis(at_ms);
    let mut batch = WriteBatch::new();
    batch.push(WriteOp::AddTenantRateEvent(Box::new(TenantRateEvent {
        tenant: tenant.clone(),
        event: TenantRateUse { at, steps: 1, tokens: 0, cost_micros: 0 },
        horizon: at.plus_millis(-10_000),
        bounds: vec![RateBound {
            since: at.plus_millis(-10_000),
            metric: runguard_contract::RateMetric::Steps,
            request: 1,
            max,
        }],
    })));
    batch
}

#[test]
fn postgres_records_tenant_rate_events_within_their_bounds_and_sled_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let sled = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    assert_eq!(sled.commit(rate_event(&tenant("acme"), 0, 5)).unwrap_err().kind(), StoreErrorKind::Contract);

    let Some(db) = runguard_testpg::fresh_database() else { return };
    let options = PgOptions { connect_timeout: Duration::from_secs(2), ..PgOptions::default() };
    let store = Store::open_postgres(&db.url, &options).unwrap();
    let acme = tenant("acme");
    store.commit(rate_event(&acme, 0, 2)).unwrap();
    store.commit(rate_event(&acme, 1_000, 2)).unwrap();
    let err = store.commit(rate_event(&acme, 2_000, 2)).unwrap_err();
    assert!(err.is_tenant_limit(), "{err}");
    store.commit(rate_event(&acme, 10_500, 2)).unwrap();
    let events = store.tenant_rate_events(&acme, day()).unwrap();
    assert_eq!(events.iter().map(|e| e.at.unix_millis() - day().unix_millis()).collect::<Vec<_>>(), [1_000, 10_500]);
}
