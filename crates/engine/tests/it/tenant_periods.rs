//! Tenant-period budgets (`per: "tenant"`): the host's totals in, the deltas out, UTC periods, labels,
//! warn tiers once per period, and a model host that commits the deltas blocking exactly at the limit.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use runguard_contract::*;
use runguard_engine::{
    CompiledSnapshot, Outcome, PeriodTotals, Run, RunLimits, TenantRates, period_keys, period_start,
};

use crate::support::*;

fn day_budget(max: u64, extra: &str) -> Policy {
    policy(&format!(
        r#"{{"id":"pol_day","name":"day","rule":{{"kind":"budget","metric":"tokens","per":"tenant","period":"day",
            "max":{max}{extra}}}}}"#
    ))
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// A host's view of the tenant's totals: the keys the run reads, filled from `store`.
fn totals_for(run: &Run, store: &BTreeMap<runguard_engine::PeriodKey, u64>, now: Timestamp) -> PeriodTotals {
    let mut totals = PeriodTotals::default();
    for key in period_keys(run.snapshot(), &run.state().labels, now) {
        let used = store.get(&key).copied().unwrap_or(0);
        totals.insert(key, used);
    }
    totals
}

fn step(run: &Run, call: &StepCall, totals: &PeriodTotals, now: Timestamp) -> Outcome {
    run.step_with_periods(call, &RunLimits::default(), &mut TenantRates::default(), totals, now).unwrap()
}

fn day_at(text: &str) -> Timestamp {
    Timestamp::parse(text).unwrap()
}

#[test]
fn a_post_compares_the_tenant_total_after_its_usage_and_returns_its_delta() {
    let snapshot = Arc::new(snapshot(&[day_budget(100, r#","warn_at":[50]"#)]));
    let run = start(Arc::clone(&snapshot), "run-a", BTreeMap::new());
    let now = at(1_000);
    let key = period_keys(&snapshot, &BTreeMap::new(), now).pop().unwrap();
    assert_eq!(key.period_start, period_start(BudgetPeriod::Day, now));
    let mut totals = PeriodTotals::default();
    totals.insert(key.clone(), 40);

    let allowed = step(&run, &post(0, 60), &totals, now);
    assert_eq!(allowed.decision.action, Action::Warn, "100 is within 100 and crosses the 50% tier");
    assert_eq!(types(&allowed), [ViolationType::BudgetWarning]);
    assert_eq!(allowed.decision.remaining.tokens, Some(0));
    assert_eq!(allowed.period_deltas.len(), 1);
    let delta = &allowed.period_deltas[0];
    assert_eq!((delta.key.clone(), delta.delta, delta.at_most), (key.clone(), 60, Some(100)));

    totals.insert(key.clone(), 60);
    let quiet = step(&run, &post(0, 10), &totals, now);
    assert_eq!(quiet.decision.action, Action::Allow, "the tier was crossed before: it does not fire again");

    let blocked = step(&run, &post(0, 41), &totals, now);
    assert_eq!(blocked.decision.action, Action::Block);
    let v = &blocked.decision.violations[0];
    assert_eq!((v.threshold.as_deref(), v.actual.as_deref()), (Some("100"), Some("101")));
    assert_eq!(v.reason, "tenant tokens this day 101 exceed 100");
    assert_eq!(blocked.period_deltas[0].at_most, None, "spent usage counts even when it blocks");
    assert!(blocked.record.is_some());
}

#[test]
fn a_pre_compares_the_total_plus_the_estimate_inclusively() {
    let snapshot = Arc::new(snapshot(&[day_budget(100, "")]));
    let run = start(Arc::clone(&snapshot), "run-a", BTreeMap::new());
    let now = at(1_000);
    let mut totals = PeriodTotals::default();
    totals.insert(period_keys(&snapshot, &BTreeMap::new(), now).pop().unwrap(), 90);
    assert_eq!(step(&run, &pre_estimate(0, 10), &totals, now).decision.action, Action::Allow);
    let over = step(&run, &pre_estimate(0, 11), &totals, now);
    assert_eq!(over.decision.action, Action::Block);
    assert!(over.period_deltas.is_empty(), "a pre adds nothing");
    assert_eq!(step(&run, &pre(0), &totals, now).decision.action, Action::Allow, "no estimate, no check");
}

#[test]
fn only_runs_with_every_label_count_and_a_new_day_starts_at_zero() {
    let snapshot = Arc::new(snapshot(&[day_budget(10, r#","labels":{"team":"search"}"#)]));
    let other = start(Arc::clone(&snapshot), "run-other", labels(&[("team", "ads")]));
    let now = day_at("2026-11-30T23:59:59.999Z");
    assert!(period_keys(&snapshot, &other.state().labels, now).is_empty());
    let free = step(&other, &post(0, 1_000), &PeriodTotals::default(), now);
    assert_eq!(free.decision.action, Action::Allow);
    assert!(free.period_deltas.is_empty());

    let counted = start(Arc::clone(&snapshot), "run-search", labels(&[("team", "search"), ("env", "prod")]));
    let key = period_keys(&snapshot, &counted.state().labels, now).pop().unwrap();
    let mut store = BTreeMap::from([(key, 10)]);
    assert_eq!(step(&counted, &post(0, 1), &totals_for(&counted, &store, now), now).decision.action, Action::Block);
    let tomorrow = day_at("2026-12-01T00:00:00Z");
    let next = period_keys(&snapshot, &counted.state().labels, tomorrow).pop().unwrap();
    assert_eq!(next.period_start, tomorrow);
    store.insert(next, 0);
    assert_eq!(
        step(&counted, &post(0, 1), &totals_for(&counted, &store, tomorrow), tomorrow).decision.action,
        Action::Allow
    );
}

#[test]
fn the_tightest_tenant_budget_lowers_remaining_and_a_month_budget_counts_steps() {
    let month = policy(
        r#"{"id":"pol_month","name":"month","rule":{"kind":"budget","metric":"steps","per":"tenant","period":"month","max":3}}"#,
    );
    let run_budget =
        policy(r#"{"id":"pol_run","name":"run","rule":{"kind":"budget","metric":"tokens","per":"run","max":1000}}"#);
    let snapshot = Arc::new(snapshot(&[day_budget(100, ""), month, run_budget]));
    let run = start(Arc::clone(&snapshot), "run-a", BTreeMap::new());
    let now = at(5);
    let mut totals = PeriodTotals::default();
    for key in period_keys(&snapshot, &BTreeMap::new(), now) {
        let used = if key.policy_id.as_str() == "pol_day" { 30 } else { 2 };
        totals.insert(key, used);
    }
    let outcome = step(&run, &post(0, 5), &totals, now);
    assert_eq!(outcome.decision.remaining.tokens, Some(65), "the day budget is tighter than the run's");
    assert_eq!(outcome.decision.remaining.steps, Some(0));
    assert_eq!(outcome.period_deltas.len(), 2);
    let pre_blocked = step(
        &run,
        &pre(0),
        &{
            let mut t = totals.clone();
            for key in period_keys(&snapshot, &BTreeMap::new(), now) {
                if key.policy_id.as_str() == "pol_month" {
                    t.insert(key, 3);
                }
            }
            t
        },
        now,
    );
    assert_eq!(pre_blocked.decision.action, Action::Block, "a fourth step this month is refused at pre");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(128)
    ))]

    /// A host that commits each outcome's deltas: a run's post is blocked exactly when the day's total
    /// after it exceeds the limit, each tier fires at most once a day, and a new day starts at zero.
    #[test]
    fn a_host_committing_the_deltas_blocks_exactly_at_the_limit(
        calls in proptest::collection::vec((0u64..40, 0i64..3), 1..40),
        max in 0u64..200,
    ) {
        let snapshot = Arc::new(snapshot(&[day_budget(max, r#","warn_at":[50,80]"#)]));
        let mut store: BTreeMap<runguard_engine::PeriodKey, u64> = BTreeMap::new();
        let mut fired: BTreeMap<(Timestamp, String), u32> = BTreeMap::new();
        let mut day = 0i64;
        for (i, (tokens, days_later)) in calls.into_iter().enumerate() {
            day += days_later;
            let now = day_at("2026-11-30T12:00:00Z").plus_millis(day * 86_400_000);
            let run = start(Arc::clone(&snapshot), &format!("run-{i}"), BTreeMap::new());
            let totals = totals_for(&run, &store, now);
            let outcome = step(&run, &post(0, tokens), &totals, now);
            let key = period_keys(&snapshot, &BTreeMap::new(), now).pop().unwrap();
            let before = store.get(&key).copied().unwrap_or(0);
            let blocks = before + tokens > max;
            prop_assert_eq!(outcome.decision.action == Action::Block, blocks);
            for v in outcome.decision.violations.iter().filter(|v| v.violation_type == ViolationType::BudgetWarning) {
                let tier = v.reason.split("reached the ").nth(1).unwrap_or_default().to_owned();
                let count = fired.entry((key.period_start, tier)).or_default();
                *count += 1;
                prop_assert!(*count == 1, "a tier fired twice in one day");
            }
            for delta in outcome.period_deltas {
                let stored = store.entry(delta.key).or_default();
                if let Some(at_most) = delta.at_most {
                    prop_assert!(*stored + delta.delta <= at_most);
                }
                *stored += delta.delta;
            }
        }
    }
}

#[test]
fn a_snapshot_without_tenant_budgets_reads_no_totals() {
    let compiled: CompiledSnapshot = snapshot(&[]);
    assert!(!runguard_engine::uses_tenant_periods(&compiled));
    assert!(period_keys(&compiled, &BTreeMap::new(), at(0)).is_empty());
}

/// Shared tenant rate windows: a host rebuilds the windows from the recorded events and records the
/// admitted call's event only while its checks hold.
#[test]
fn tenant_rate_windows_rebuilt_from_shared_events_throttle_and_carry_their_checks() {
    let rate = policy(
        r#"{"id":"pol_rate","name":"rate","rule":{"kind":"rate","metric":"steps","max":2,"window_s":10,"scope":"tenant"}}"#,
    );
    let snapshot = Arc::new(snapshot(&[rate]));
    assert_eq!(runguard_engine::tenant_rate_horizon_ms(&snapshot), 10_000);
    let run = start(Arc::clone(&snapshot), "run-a", BTreeMap::new());
    let now = at(20_000);
    let one = |ms| runguard_engine::RateUse { at: at(ms), steps: 1, tokens: 0, cost_micros: 0 };
    let mut rates = runguard_engine::tenant_rates_from([one(9_000), one(15_000)]);
    let call = pre(0);
    let admitted =
        run.step_with_periods(&call, &RunLimits::default(), &mut rates, &PeriodTotals::default(), now).unwrap();
    assert_eq!(admitted.decision.action, Action::Allow, "the event at 9s left the 10s window");
    let delta = admitted.tenant_rate_delta.expect("an admitted call records its event");
    assert_eq!(delta.event.steps, 1);
    assert_eq!(delta.horizon, at(10_000));
    assert_eq!(delta.checks.len(), 1);
    let check = delta.checks[0];
    assert_eq!((check.since, check.request, check.max), (at(10_000), 1, 2));

    let mut full = runguard_engine::tenant_rates_from([one(15_000), one(16_000)]);
    let throttled =
        run.step_with_periods(&call, &RunLimits::default(), &mut full, &PeriodTotals::default(), now).unwrap();
    assert_eq!(throttled.decision.action, Action::Throttle);
    assert_eq!(throttled.decision.retry_after_ms, Some(5_000));
    assert!(throttled.tenant_rate_delta.is_none(), "a throttled call records nothing");
}

/// A block that outranks a tenant throttle records its event as the in-memory windows do, without a
/// condition (its call was not admitted by the rate rule).
#[test]
fn a_block_outranking_a_tenant_throttle_records_its_event_unconditionally() {
    let rate = policy(
        r#"{"id":"pol_rate","name":"rate","rule":{"kind":"rate","metric":"steps","max":1,"window_s":10,"scope":"tenant"}}"#,
    );
    let deny = policy(r#"{"id":"pol_deny","name":"deny","rule":{"kind":"skill","deny":["shell"]}}"#);
    let snapshot = Arc::new(snapshot(&[rate, deny]));
    let run = start(Arc::clone(&snapshot), "run-a", BTreeMap::new());
    let now = at(20_000);
    let mut full = runguard_engine::tenant_rates_from([runguard_engine::RateUse {
        at: at(19_000),
        steps: 1,
        tokens: 0,
        cost_micros: 0,
    }]);
    let call = StepCall { skill: Some("shell".into()), ..pre(0) };
    let blocked =
        run.step_with_periods(&call, &RunLimits::default(), &mut full, &PeriodTotals::default(), now).unwrap();
    assert_eq!(blocked.decision.action, Action::Block);
    let delta = blocked.tenant_rate_delta.expect("a blocked call is recorded");
    assert!(delta.checks.is_empty(), "{delta:?}");
}
