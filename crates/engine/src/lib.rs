//! # runguard-engine
//!
//! Pure, synchronous, deterministic evaluation of runguard policy snapshots: no IO, no clock reads (time
//! is a parameter), no global state. Other services embed it as a library; the runguard node wraps it in
//! actors and persistence.
//!
//! 1. [`CompiledSnapshot::compile`] builds every regex and CEL program of a snapshot once (share it with
//!    `Arc`; it is `Send + Sync`).
//! 2. [`RunState::admit`] checks call order and recognises identical retries.
//! 3. [`evaluate`] answers a call with a [`Decision`](runguard_contract::Decision), the [`Effects`] on the
//!    run, and the prevention record the decision requires, if any.
//! 4. [`RunState::apply`] folds the effects in.
//!
//! ```
//! use runguard_contract::*;
//! use runguard_engine::{evaluate, Admission, Call, CompiledSnapshot, RunState, TenantRates};
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
//! let mut run = RunState::new(tenant, RunId::new("run-1").unwrap(), Default::default());
//! let step = StepCall { usage: Some(Usage { tokens: 1200, ..Usage::default() }), ..StepCall::new(0, Phase::Post) };
//! assert_eq!(run.admit(&step), Admission::Evaluate);
//! let now = Timestamp::from_unix_millis(1_000);
//! let evaluation = evaluate(&snapshot, &run, Call::Step(&step), &TenantRates::default(), now);
//! assert_eq!(evaluation.decision.action, Action::Block);
//! assert!(evaluation.record.is_some(), "an active block writes a prevention record");
//! run.apply(&evaluation.decision, &evaluation.effects);
//! assert_eq!(run.status, RunStatus::Stopped);
//! ```
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, clippy::string_slice)]

pub mod cel_check;
mod cel_rule;
mod compiled;
mod content;
mod evaluate;
mod failure;
pub mod learning;
mod rates;
mod replay;
mod run;
mod state;

pub use cel_rule::{CelContext, CelRule};
pub use compiled::{CompiledPolicy, CompiledSnapshot, Matcher, compile_rule, validate_document};
pub use content::{ContentMatcher, ScanText, luhn_valid, redact};
pub use evaluate::{Call, Evaluation, INTEGRITY_POLICY_ID, evaluate};
pub use replay::{ReplayedCall, replay};
pub use run::{IncidentBasis, IntegrityVerdict, LedgerItem, Outcome, Run, RunLimits, ShadowDelta, StoredHead};
pub use state::{
    Admission, Effects, LastCall, RateEvent, Refusal, RunState, TenantRates, Termination, TierKey, call_digest,
};
