//! Shared tenant state (`docs/architecture.md`, "Shared tenant state"): the tenant-period totals a run's
//! call is evaluated against, and the conditional increments its decision commits; on PostgreSQL the
//! tenant-scope rate windows too, read from and recorded in the store in the same way.
//!
//! The store is the truth. Every call of a run whose snapshot has a tenant-period budget reads the
//! tenant's current totals from it (on sled an in-memory tree read; on PostgreSQL one indexed row per
//! budget), and commits what its decision adds in the same batch as its ledger entry, as increments
//! bounded by the limit they were allowed within. A bound that no longer holds when the batch commits
//! (another call of the tenant, on this node or another, committed first) refuses that caller's batch
//! only; the run actor then reads the totals again and evaluates the call once more, which answers what
//! the fresh totals dictate.

use runguard_contract::{BudgetPer, Policy, Rule, TenantId, Timestamp};
use runguard_engine::{
    CompiledSnapshot, PeriodDelta, PeriodKey, PeriodTotals, RateDelta, RateUse, TenantRates, period_keys, period_start,
    tenant_rate_horizon_ms, tenant_rates_from,
};
use runguard_store::{RateBound, Store, StoreError, TenantRateEvent, TenantRateUse, WriteBatch, WriteOp};

/// How many times a call whose bounded increment was refused is evaluated again before the node gives
/// up and answers 503 (each retry reads fresher totals; only a tenant whose calls race on several nodes
/// at once needs more than one).
pub const REEVALUATIONS: u32 = 3;

/// The tenant's current totals for the tenant-period budgets of `snapshot` that count a run with
/// `labels` at `now`.
pub fn read_totals(
    store: &Store,
    tenant: &TenantId,
    snapshot: &CompiledSnapshot,
    labels: &std::collections::BTreeMap<String, String>,
    now: Timestamp,
) -> Result<PeriodTotals, StoreError> {
    let mut totals = PeriodTotals::default();
    for key in period_keys(snapshot, labels, now) {
        let used = store.tenant_usage(tenant, &key.policy_id, key.period_start)?;
        totals.insert(key, used);
    }
    Ok(totals)
}

/// What a call of a run whose snapshot needs its tenant's shared state reads before it is evaluated.
#[derive(Debug, Default)]
pub struct TenantView {
    /// The tenant's totals for the snapshot's tenant-period budgets.
    pub periods: PeriodTotals,
    /// The tenant's rate windows rebuilt from the store, when this node shares them
    /// (`Store::is_shared`); `None` means the node's in-memory windows.
    pub rates: Option<TenantRates>,
}

/// Whether a call of a run under `snapshot` reads its tenant's state from the store first.
pub fn needs_view(store: &Store, snapshot: &CompiledSnapshot) -> bool {
    runguard_engine::uses_tenant_periods(snapshot) || (snapshot.uses_tenant_rates() && store.is_shared())
}

/// Reads the tenant's state a call of `run` is evaluated against at `now`.
pub fn read_view(store: &Store, run: &runguard_engine::Run, now: Timestamp) -> Result<TenantView, StoreError> {
    let state = run.state();
    let snapshot = run.snapshot();
    let periods = read_totals(store, &state.tenant_id, snapshot, &state.labels, now)?;
    let rates = if snapshot.uses_tenant_rates() && store.is_shared() {
        Some(read_rates(store, &state.tenant_id, snapshot, now)?)
    } else {
        None
    };
    Ok(TenantView { periods, rates })
}

/// Adds a call's increments to its batch.
pub fn add_deltas(batch: &mut WriteBatch, tenant: &TenantId, deltas: &[PeriodDelta]) {
    for PeriodDelta { key, delta, at_most } in deltas {
        let PeriodKey { policy_id, period_start, .. } = key;
        batch.add_tenant_usage(tenant.clone(), policy_id.clone(), *period_start, *delta, *at_most);
    }
}

/// The tenant's rate windows for `snapshot` at `now`, rebuilt from the events the store holds.
pub fn read_rates(
    store: &Store,
    tenant: &TenantId,
    snapshot: &CompiledSnapshot,
    now: Timestamp,
) -> Result<TenantRates, StoreError> {
    let after = now.plus_millis(tenant_rate_horizon_ms(snapshot).saturating_neg());
    let events = store.tenant_rate_events(tenant, after)?;
    Ok(tenant_rates_from(events.into_iter().map(|e| RateUse {
        at: e.at,
        steps: e.steps,
        tokens: e.tokens,
        cost_micros: e.cost_micros,
    })))
}

/// Adds a call's event in its tenant's shared rate windows to its batch, when this node shares them.
pub fn add_rate_delta(batch: &mut WriteBatch, store: &Store, tenant: &TenantId, delta: Option<&RateDelta>) {
    let Some(delta) = delta.filter(|_| store.is_shared()) else { return };
    let e = delta.event;
    batch.push(WriteOp::AddTenantRateEvent(Box::new(TenantRateEvent {
        tenant: tenant.clone(),
        event: TenantRateUse { at: e.at, steps: e.steps, tokens: e.tokens, cost_micros: e.cost_micros },
        horizon: delta.horizon,
        bounds: delta
            .checks
            .iter()
            .map(|c| RateBound { since: c.since, metric: c.metric, request: c.request, max: c.max })
            .collect(),
    })));
}

/// A tenant-period budget's usage by one tenant, as `GET /v1/policies/{id}/usage` answers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    /// `day` or `month`.
    pub period: runguard_contract::BudgetPeriod,
    /// The start of the current period.
    pub period_start: Timestamp,
    /// What the tenant used in it.
    pub used: u64,
    /// The budget's limit.
    pub max: u64,
}

/// The current period's usage of `policy` by `tenant` at `now`; `None` when the policy is not a
/// tenant-period budget.
pub fn usage(store: &Store, tenant: &TenantId, policy: &Policy, now: Timestamp) -> Result<Option<Usage>, StoreError> {
    let Rule::Budget(rule) = &policy.rule else { return Ok(None) };
    let Some(period) = rule.period.filter(|_| rule.per == BudgetPer::Tenant) else { return Ok(None) };
    let start = period_start(period, now);
    let used = store.tenant_usage(tenant, &policy.id, start)?;
    Ok(Some(Usage { period, period_start: start, used, max: rule.max }))
}
