//! Tenant-period budgets (`per: "tenant"`, `docs/policies.md`): a tenant's usage summed over a UTC
//! calendar day or month, across all its runs.
//!
//! The engine holds none of that usage: the host reads the tenant's current totals ([`PeriodTotals`])
//! for the keys [`period_keys`] names, passes them to [`Run::step_with_periods`](crate::Run::step_with_periods),
//! and commits the [`PeriodDelta`]s the outcome carries in the same batch as the call's ledger entry, each
//! as a conditional increment where the shared total lives (`docs/architecture.md`, "Shared tenant
//! state"). That keeps the engine pure and lets several hosts share one total exactly.

use std::collections::BTreeMap;

use runguard_contract::{
    Action, BindAt, BudgetMetric, BudgetPer, BudgetPeriod, BudgetRule, Mode, Phase, Policy, PolicyAction, PolicyId,
    Remaining, Rule, StepCall, Timestamp,
};

use crate::compiled::CompiledSnapshot;

/// One tenant-period total: a policy's usage by one tenant within the period that starts at
/// `period_start`. A global policy has one per tenant, so the tenant is the host's part of the key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeriodKey {
    /// The budget policy.
    pub policy_id: PolicyId,
    /// Its period.
    pub period: BudgetPeriod,
    /// The start of the period (UTC midnight of the day, or of the month's first day).
    pub period_start: Timestamp,
}

/// The tenant's current totals the host read for one call; a key it did not fill counts as zero (a new
/// period starts at zero).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeriodTotals {
    used: BTreeMap<PeriodKey, u64>,
}

impl PeriodTotals {
    /// Sets the usage of `key`.
    pub fn insert(&mut self, key: PeriodKey, used: u64) {
        self.used.insert(key, used);
    }

    /// The usage of `key` (zero when unknown).
    pub fn get(&self, key: &PeriodKey) -> u64 {
        self.used.get(key).copied().unwrap_or(0)
    }
}

/// What one call adds to one tenant-period total. The host commits it atomically with the call:
/// `at_most` set means the decision allowed the call on the total it was given, so the increment may only
/// apply while the stored total plus `delta` stays within it; a stored total that makes it exceed means the
/// host's total was stale, and the host reads the total again and evaluates the call once more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeriodDelta {
    /// Which total.
    pub key: PeriodKey,
    /// What to add.
    pub delta: u64,
    /// The inclusive bound the stored total plus `delta` must stay within, if any.
    pub at_most: Option<u64>,
}

/// The start of the UTC calendar `period` that contains `now`.
pub fn period_start(period: BudgetPeriod, now: Timestamp) -> Timestamp {
    match period {
        BudgetPeriod::Day => now.start_of_utc_day(),
        BudgetPeriod::Month => now.start_of_utc_month(),
    }
}

/// A tenant-period budget rule of a policy, with its key at `now`.
fn tenant_budget(policy: &Policy, now: Timestamp) -> Option<(&BudgetRule, PeriodKey)> {
    let Rule::Budget(rule) = &policy.rule else { return None };
    let period = rule.period.filter(|_| rule.per == BudgetPer::Tenant)?;
    let key = PeriodKey { policy_id: policy.id.clone(), period, period_start: period_start(period, now) };
    Some((rule, key))
}

/// The tenant-period totals a call of a run with `labels` at `now` reads and may change: the host fills
/// these into the [`PeriodTotals`] it passes. Empty when the snapshot has no tenant-period budget that
/// counts this run.
pub fn period_keys(snapshot: &CompiledSnapshot, labels: &BTreeMap<String, String>, now: Timestamp) -> Vec<PeriodKey> {
    snapshot
        .policies()
        .iter()
        .filter_map(|compiled| tenant_budget(&compiled.policy, now))
        .filter(|(rule, _)| rule.counts_labels(labels))
        .map(|(_, key)| key)
        .collect()
}

/// What a call adds to a total of `metric`: at `post`, its usage (a step for `steps`); nothing at `pre`.
fn call_usage(step: Option<&StepCall>, metric: BudgetMetric) -> u64 {
    let Some(step) = step.filter(|s| s.phase == Phase::Post) else { return 0 };
    let usage = step.usage.unwrap_or_default();
    match metric {
        BudgetMetric::Tokens => usage.tokens,
        BudgetMetric::CostMicros => usage.cost_micros,
        BudgetMetric::Steps => 1,
        BudgetMetric::DurationMs => 0,
    }
}

/// One violation of a tenant-period budget, before the evaluator attributes it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PeriodFinding {
    pub(crate) warning: bool,
    pub(crate) threshold: u64,
    pub(crate) actual: u64,
    pub(crate) reason: String,
}

/// Checks one tenant-period budget for a call of a run with `labels`, bound at `bind`, against the
/// tenant's `totals`. Inclusive like a run budget: at `pre` the total plus the estimate (plus one step for
/// `steps`), at `post` the total after adding the call's usage. A warn tier fires for the call whose usage
/// crosses it, so once per tier per period.
pub(crate) fn check(
    policy: &Policy,
    labels: &BTreeMap<String, String>,
    step: Option<&StepCall>,
    bind: BindAt,
    totals: &PeriodTotals,
    now: Timestamp,
) -> Vec<PeriodFinding> {
    let Some((rule, key)) = tenant_budget(policy, now) else { return Vec::new() };
    if !rule.counts_labels(labels) {
        return Vec::new();
    }
    let total = totals.get(&key);
    let metric = rule.metric.as_str();
    let period = key.period.as_str();
    let mut found = Vec::new();
    match bind {
        BindAt::StepPre => {
            let estimate = match rule.metric {
                BudgetMetric::Steps => Some(1),
                BudgetMetric::Tokens => step.and_then(|s| s.estimate).and_then(|e| e.tokens),
                BudgetMetric::CostMicros => step.and_then(|s| s.estimate).and_then(|e| e.cost_micros),
                BudgetMetric::DurationMs => None,
            };
            if let Some(estimate) = estimate {
                let actual = total.saturating_add(estimate);
                if actual > rule.max {
                    found.push(PeriodFinding {
                        warning: false,
                        threshold: rule.max,
                        actual,
                        reason: format!(
                            "tenant {metric} this {period} {total} plus {estimate} would exceed {}",
                            rule.max
                        ),
                    });
                }
            }
        }
        BindAt::StepPost => {
            let actual = total.saturating_add(call_usage(step, rule.metric));
            if actual > rule.max {
                found.push(PeriodFinding {
                    warning: false,
                    threshold: rule.max,
                    actual,
                    reason: format!("tenant {metric} this {period} {actual} exceed {}", rule.max),
                });
            }
            for &tier in &rule.warn_at {
                let bound = u128::from(rule.max) * u128::from(tier);
                let reached = |value: u64| u128::from(value) * 100 >= bound;
                if reached(actual) && !reached(total) {
                    found.push(PeriodFinding {
                        warning: true,
                        threshold: u64::try_from(bound / 100).unwrap_or(u64::MAX),
                        actual,
                        reason: format!(
                            "tenant {metric} this {period} {actual} reached the {tier}% warn tier of {}",
                            rule.max
                        ),
                    });
                }
            }
        }
        BindAt::RunStart | BindAt::RunEnd => {}
    }
    found
}

/// Whether a policy's violation would refuse the call: what an `at_most` guards.
fn enforced(policy: &Policy) -> bool {
    policy.mode == Mode::Active && policy.action == PolicyAction::Block
}

/// The increments a call's decision implies: at a `post` that was not throttled, its usage added to every
/// tenant-period total that counts the run (whatever the decision: the usage was spent). Where the total
/// stayed within an enforced budget, the increment carries that budget as `at_most`.
pub(crate) fn deltas(
    snapshot: &CompiledSnapshot,
    labels: &BTreeMap<String, String>,
    step: Option<&StepCall>,
    action: Action,
    totals: &PeriodTotals,
    now: Timestamp,
) -> Vec<PeriodDelta> {
    if !snapshot.tenant_periods() || action == Action::Throttle || step.is_none_or(|s| s.phase != Phase::Post) {
        return Vec::new();
    }
    let mut deltas = Vec::new();
    for compiled in snapshot.policies() {
        let policy = &compiled.policy;
        let Some((rule, key)) = tenant_budget(policy, now) else { continue };
        let delta = call_usage(step, rule.metric);
        if delta == 0 || !rule.counts_labels(labels) {
            continue;
        }
        let within = totals.get(&key).saturating_add(delta) <= rule.max;
        let at_most = (within && enforced(policy) && compiled.binds_at(BindAt::StepPost)).then_some(rule.max);
        deltas.push(PeriodDelta { key, delta, at_most });
    }
    deltas
}

/// Lowers `remaining` to what the tightest enforced tenant-period budget leaves after this call.
pub(crate) fn lower_remaining(
    remaining: &mut Remaining,
    snapshot: &CompiledSnapshot,
    labels: &BTreeMap<String, String>,
    step: Option<&StepCall>,
    totals: &PeriodTotals,
    now: Timestamp,
) {
    if !snapshot.tenant_periods() {
        return;
    }
    for compiled in snapshot.policies() {
        let policy = &compiled.policy;
        let Some((rule, key)) = tenant_budget(policy, now) else { continue };
        if !enforced(policy) || !rule.counts_labels(labels) {
            continue;
        }
        let used = totals.get(&key).saturating_add(call_usage(step, rule.metric));
        let value = rule.max.saturating_sub(used);
        let slot = match rule.metric {
            BudgetMetric::Tokens => &mut remaining.tokens,
            BudgetMetric::CostMicros => &mut remaining.cost_micros,
            BudgetMetric::Steps => &mut remaining.steps,
            BudgetMetric::DurationMs => continue,
        };
        *slot = Some(slot.map_or(value, |current| current.min(value)));
    }
}

/// Whether any policy of the snapshot is a tenant-period budget (the host then reads the totals).
pub fn uses_tenant_periods(snapshot: &CompiledSnapshot) -> bool {
    snapshot.tenant_periods()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const DAY_MS: i64 = 86_400_000;

    fn at(text: &str) -> Timestamp {
        Timestamp::parse(text).unwrap()
    }

    #[test]
    fn periods_start_at_utc_midnight_of_the_day_and_of_the_month() {
        let now = at("2026-03-01T00:00:00Z");
        assert_eq!(period_start(BudgetPeriod::Day, now), now);
        assert_eq!(period_start(BudgetPeriod::Month, now), now);
        let late = at("2026-02-28T23:59:59.999Z");
        assert_eq!(period_start(BudgetPeriod::Day, late), at("2026-02-28T00:00:00Z"));
        assert_eq!(period_start(BudgetPeriod::Month, late), at("2026-02-01T00:00:00Z"));
        assert_eq!(period_start(BudgetPeriod::Month, at("2024-02-29T12:00:00Z")), at("2024-02-01T00:00:00Z"));
        assert_eq!(period_start(BudgetPeriod::Month, at("1969-12-31T23:00:00Z")), at("1969-12-01T00:00:00Z"));
        assert_eq!(period_start(BudgetPeriod::Month, at("2000-12-31T23:59:59Z")), at("2000-12-01T00:00:00Z"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512)
        ))]

        /// A period contains its start, not the instant before it, and every instant up to the next start.
        #[test]
        fn every_instant_lies_in_the_period_that_starts_at_its_period_start(
            millis in -4_000_000_000_000i64..8_000_000_000_000,
            month in any::<bool>(),
        ) {
            let period = if month { BudgetPeriod::Month } else { BudgetPeriod::Day };
            let now = Timestamp::from_unix_millis(millis);
            let start = period_start(period, now);
            prop_assert!(start <= now);
            prop_assert_eq!(period_start(period, start), start);
            prop_assert!(period_start(period, start.plus_millis(-1)) < start, "the instant before starts earlier");
            prop_assert_eq!(start.unix_millis().rem_euclid(DAY_MS), 0);
            let length = now.unix_millis() - start.unix_millis();
            let longest = if month { 31 * DAY_MS } else { DAY_MS };
            prop_assert!(length < longest);
            if month {
                let rendered = start.to_rfc3339();
                prop_assert!(rendered.get(7..11) == Some("-01T"), "{}", rendered);
            }
        }

        /// A rule's labels select exactly the runs whose labels hold every pair.
        #[test]
        fn labels_select_the_runs_that_hold_every_pair(
            rule_labels in proptest::collection::btree_map("[ab]", "[xy]", 0..3),
            run_labels in proptest::collection::btree_map("[abc]", "[xy]", 0..4),
        ) {
            let rule = BudgetRule {
                metric: BudgetMetric::Tokens,
                per: BudgetPer::Tenant,
                max: 1,
                warn_at: Vec::new(),
                period: Some(BudgetPeriod::Day),
                labels: rule_labels.clone(),
            };
            let expected = rule_labels.iter().all(|(k, v)| run_labels.get(k) == Some(v));
            prop_assert_eq!(rule.counts_labels(&run_labels), expected);
        }
    }
}
