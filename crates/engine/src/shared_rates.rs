//! Tenant-scope rate windows kept where several hosts share them (`docs/architecture.md`, "Shared tenant
//! state"): the host reads the tenant's recent calls from the shared store, builds a [`TenantRates`] from
//! them with [`tenant_rates_from`], and commits the [`RateDelta`] an outcome carries in the same batch as
//! the call's ledger entry, as an insertion that applies only while every admitting rule still holds on
//! the shared events. A host that is the only one deciding for its tenants (one node on sled) keeps its
//! `TenantRates` in memory instead and ignores the delta.

use runguard_contract::{Action, Mode, Phase, PolicyAction, RateMetric, RateScope, Rule, StepCall, Timestamp};

use crate::compiled::CompiledSnapshot;
use crate::rates::RateEvent;
use crate::state::{Effects, TenantRates};

/// Consumption of one call in a tenant-scope rate window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateUse {
    /// When.
    pub at: Timestamp,
    /// Steps admitted.
    pub steps: u64,
    /// Tokens reported.
    pub tokens: u64,
    /// Micro-USD reported.
    pub cost_micros: u64,
}

/// One rule that admitted a call: the call's event may be recorded only while the tenant's use of
/// `metric` after `since`, plus `request`, stays within `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateCheck {
    /// The start of the rule's window at the call (events after it count).
    pub since: Timestamp,
    /// What the rule counts.
    pub metric: RateMetric,
    /// What the call asks for.
    pub request: u64,
    /// The rule's inclusive maximum.
    pub max: u64,
}

/// What a call adds to its tenant's shared rate windows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateDelta {
    /// The call's event.
    pub event: RateUse,
    /// Events at or before this instant are outside every window of the snapshot: a host may drop them.
    pub horizon: Timestamp,
    /// The checks the insertion is conditional on (enforced rules only; empty at `post`).
    pub checks: Vec<RateCheck>,
}

/// A tenant's rate windows rebuilt from its recorded events, in the order they were recorded.
pub fn tenant_rates_from(events: impl IntoIterator<Item = RateUse>) -> TenantRates {
    let mut rates = TenantRates::default();
    for e in events {
        rates.record(RateEvent { at: e.at, steps: e.steps, tokens: e.tokens, cost_micros: e.cost_micros });
    }
    rates
}

/// How far back a host must read a tenant's events for `snapshot` (0: it has no tenant-scope rule).
pub fn tenant_rate_horizon_ms(snapshot: &CompiledSnapshot) -> i64 {
    snapshot.tenant_window_ms()
}

/// The delta of an evaluated call: its tenant event (none when throttled), conditional for a call admitted
/// at `pre` on every active blocking tenant-scope rate rule.
pub(crate) fn delta(
    snapshot: &CompiledSnapshot,
    effects: &Effects,
    step: Option<&StepCall>,
    action: Action,
    now: Timestamp,
) -> Option<RateDelta> {
    let event = effects.tenant_rate_event.filter(|_| action != Action::Throttle)?;
    let step = step?;
    let mut checks = Vec::new();
    // Only an admitted call was admitted by every rule; a block (which may outrank a throttle) is
    // recorded as the in-memory windows record it, without a condition.
    if step.phase == Phase::Pre && action != Action::Block {
        for compiled in snapshot.policies() {
            let policy = &compiled.policy;
            let Rule::Rate(rule) = &policy.rule else { continue };
            if rule.scope != RateScope::Tenant || policy.mode != Mode::Active || policy.action != PolicyAction::Block {
                continue;
            }
            let request = match rule.metric {
                RateMetric::Steps => 1,
                RateMetric::Tokens => step.estimate.and_then(|e| e.tokens).unwrap_or(0),
                RateMetric::CostMicros => step.estimate.and_then(|e| e.cost_micros).unwrap_or(0),
            };
            let since = now.plus_millis(i64::from(rule.window_s).saturating_mul(1000).saturating_neg());
            checks.push(RateCheck { since, metric: rule.metric, request, max: rule.max });
        }
    }
    Some(RateDelta {
        event: RateUse { at: event.at, steps: event.steps, tokens: event.tokens, cost_micros: event.cost_micros },
        horizon: now.plus_millis(effects.tenant_window_ms.saturating_neg()),
        checks,
    })
}
