//! # runguard-engine
//!
//! Pure, synchronous, deterministic evaluation of runguard policy snapshots: no IO, no clock reads (time
//! is a parameter), no global state. Other services embed it as a library; the runguard node wraps it in
//! actors and persistence.
//!
//! 1. [`CompiledSnapshot::compile`] builds every regex and CEL program of a snapshot once (share it with
//!    `Arc`; it is `Send + Sync`).
//! 2. [`Run`] is one run's whole lifecycle: [`Run::start`], then [`Run::step`] and [`Run::end`] answer
//!    calls with an [`Outcome`] (decision, record draft, effects, shadow deltas, incident basis) without
//!    changing the run; the host persists the outcome, then [`Run::commit`]s it. [`Run::rehydrate`]
//!    rebuilds a run from its ledger and fails it closed when it does not check out.
//! 3. [`TenantRates`] holds one tenant's rate windows, shared by all its runs: pass the same value to
//!    every run's [`Run::step`], which counts the call in it.
//!
//! ```
//! use std::sync::Arc;
//! use runguard_contract::*;
//! use runguard_engine::{CompiledSnapshot, Run, RunLimits, TenantRates};
//!
//! let tenant = TenantId::new("acme").unwrap();
//! let doc = PolicyDocument::from_json(
//!     br#"{"id": "pol_budget", "name": "Run token budget",
//!          "rule": {"kind": "budget", "metric": "tokens", "per": "run", "max": 1000}}"#,
//!     &PolicyLimits::default(),
//! ).unwrap();
//! let policy = Policy::create(doc, PolicyId::new("pol_budget").unwrap(), Some(tenant.clone()),
//!                             Timestamp::from_unix_millis(0));
//! let snapshot = CompiledSnapshot::compile(&Snapshot::capture(&tenant, [&policy]), &PolicyLimits::default())
//!     .unwrap();
//!
//! let (mut run, start) = Run::start(Arc::new(snapshot), tenant, RunId::new("run-1").unwrap(),
//!                                   Default::default(), Timestamp::from_unix_millis(0));
//! run.commit(start); // after persisting it
//! let mut tenant_rates = TenantRates::default();
//! let step = StepCall { usage: Some(Usage { tokens: 1200, ..Usage::default() }), ..StepCall::new(0, Phase::Post) };
//! let outcome = run.step(&step, &RunLimits::default(), &mut tenant_rates, Timestamp::from_unix_millis(1_000))
//!     .unwrap();
//! assert_eq!(outcome.decision.action, Action::Block);
//! assert!(outcome.record.is_some(), "an active block writes a prevention record");
//! run.commit(outcome); // after persisting its ledger entry and record
//! assert_eq!(run.state().status, RunStatus::Stopped);
//! ```
//!
//! A tenant-scope rate rule counts every run of the tenant in one window: pass the same [`TenantRates`]
//! to the steps of all its runs (behind the tenant's lock in a multi-threaded host), and the second run
//! is throttled by what the first consumed:
//!
//! ```
//! # use std::sync::Arc;
//! # use runguard_contract::*;
//! # use runguard_engine::{CompiledSnapshot, Run, RunLimits, TenantRates};
//! # let tenant = TenantId::new("acme").unwrap();
//! let doc = PolicyDocument::from_json(
//!     br#"{"id": "pol_rate", "name": "One step a minute per tenant",
//!          "rule": {"kind": "rate", "metric": "steps", "max": 1, "window_s": 60, "scope": "tenant"}}"#,
//!     &PolicyLimits::default(),
//! ).unwrap();
//! let policy = Policy::create(doc, PolicyId::new("pol_rate").unwrap(), Some(tenant.clone()),
//!                             Timestamp::from_unix_millis(0));
//! let snapshot = Arc::new(CompiledSnapshot::compile(&Snapshot::capture(&tenant, [&policy]),
//!                                                   &PolicyLimits::default()).unwrap());
//! let mut tenant_rates = TenantRates::default();
//! let mut actions = Vec::new();
//! for name in ["run-a", "run-b"] {
//!     let now = Timestamp::from_unix_millis(1_000);
//!     let (mut run, start) = Run::start(Arc::clone(&snapshot), tenant.clone(), RunId::new(name).unwrap(),
//!                                       Default::default(), now);
//!     run.commit(start);
//!     let outcome = run.step(&StepCall::new(0, Phase::Pre), &RunLimits::default(), &mut tenant_rates, now)
//!         .unwrap();
//!     actions.push(outcome.decision.action);
//!     run.commit(outcome);
//! }
//! assert_eq!(actions, [Action::Allow, Action::Throttle]);
//! ```
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, clippy::string_slice)]
#![deny(missing_docs, unreachable_pub)]

mod ancestors;
mod cel_check;
mod cel_rule;
mod compiled;
mod content;
mod error;
mod evaluate;
mod failure;
pub mod learning;
mod periods;
mod rates;
mod repeat;
mod run;
mod shared_rates;
mod state;

pub use ancestors::{Ancestor, Family, rolled_up_limits};
pub use compiled::{CompiledSnapshot, cel_cost, validate_document};
pub use error::Error;
pub use periods::{PeriodDelta, PeriodKey, PeriodTotals, period_keys, period_start, uses_tenant_periods};
pub use run::{IncidentBasis, IntegrityVerdict, LedgerItem, Outcome, Run, RunLimits, ShadowDelta, StoredHead};
pub use shared_rates::{RateCheck, RateDelta, RateUse, tenant_rate_horizon_ms, tenant_rates_from};
pub use state::{Effects, Refusal, RunState, TenantRates, Termination};

/// The engine's internals stay out of reach of a host; each of these fails to compile.
///
/// ```compile_fail
/// use runguard_engine::evaluate;
/// ```
/// ```compile_fail
/// use runguard_engine::cel_check;
/// ```
/// ```compile_fail
/// use runguard_engine::{CelContext, CelRule, Matcher, ContentMatcher};
/// ```
/// ```compile_fail
/// fn fold(state: &mut runguard_engine::RunState, effects: &runguard_engine::Effects, d: &runguard_contract::Decision) {
///     state.apply(d, effects);
/// }
/// ```
/// ```compile_fail
/// fn peek(effects: &runguard_engine::Effects) -> bool { effects.counts_step }
/// ```
/// ```compile_fail
/// fn count(rates: &mut runguard_engine::TenantRates, effects: &runguard_engine::Effects) { rates.apply(effects) }
/// ```
#[cfg(doctest)]
struct PrivateApi;
