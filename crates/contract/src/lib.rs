//! # runguard-contract
//!
//! The wire and domain types of runguard, their validation, canonical hashing, and the **prevention
//! contract** as pure predicates. No IO, no clock, no globals: everything here is a value or a function of
//! values, so the engine, the store and the node all agree on what the types mean.
//!
//! - [`PolicyDocument`] and [`Policy`]: the seven rule kinds (`docs/policies.md`), validated with errors that name
//!   the JSON path of the field at fault.
//! - [`Snapshot`]: the immutable, content-addressed set of policies a run evaluates (SHA-256 over RFC 8785
//!   canonical JSON with a domain prefix and a format version).
//! - [`StepCall`], [`Decision`], [`PreventionRecord`] (hash-chained), [`Signature`].
//! - [`prevention`]: the predicates that decide when a record may exist.
//!
//! With the `proptest` feature, [`strategies`] generates valid values by construction.
//!
//! ```
//! use runguard_contract::{PolicyDocument, PolicyLimits, Rule};
//!
//! let json = br#"{"name": "Run token budget",
//!                 "rule": {"kind": "budget", "metric": "tokens", "per": "run", "max": 100000}}"#;
//! let doc = PolicyDocument::from_json(json, &PolicyLimits::default()).unwrap();
//! assert!(matches!(doc.rule, Rule::Budget(_)));
//!
//! let bad = br#"{"name": "x", "rule": {"kind": "budget", "metric": "tokens", "per": "run", "max": -1}}"#;
//! let err = PolicyDocument::from_json(bad, &PolicyLimits::default()).unwrap_err();
//! assert_eq!(err.field(), "rule.max");
//! ```
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, clippy::string_slice)]

pub mod canonical;
pub mod decision;
pub mod error;
pub mod ids;
pub mod learning;
pub mod limits;
pub mod policy;
pub mod prevention;
pub mod record;
pub mod run;
#[cfg(feature = "schema")]
pub mod schema;
pub mod signature;
pub mod snapshot;
pub mod step;
pub mod strict;
pub mod timestamp;
mod wording;

#[cfg(feature = "proptest")]
pub mod strategies;

pub use decision::{
    Action, Decision, DecisionPhase, Evidence, EvidenceMatch, PolicyRef, Remaining, ShadowEntry, Violation,
    ViolationType,
};
pub use error::{ValidationError, from_json_slice};
pub use ids::{
    DecisionId, IncidentId, PatternId, PolicyId, RecordHash, RecordId, RunId, SignatureHash, SnapshotHash, SnapshotId,
    TenantId,
};
pub use learning::{ApprovalPath, AuditEntry, Incident, Pattern, Regret};
pub use limits::{PolicyLimits, StepLimits};
pub use policy::{
    BindAt, BudgetMetric, BudgetPer, BudgetPeriod, BudgetRule, ContentRule, ContentTarget, Detector, ExprRule,
    MAX_REPEAT_WINDOW_STEPS, Mode, OnError, PatternRule, Policy, PolicyAction, PolicyDocument, RateMetric, RateRule,
    RateScope, RepeatOf, RepeatRule, Rule, Scope, SkillRule,
};
pub use record::{ChainBreak, PreventionRecord, verify_chain};
pub use run::{NextCall, Outcome, RunStatus, TerminationReason, Totals};
pub use signature::{ErrorClass, Signature, normalize_endpoint};
pub use snapshot::{Snapshot, SnapshotRef};
pub use step::{Estimate, Phase, StepCall, StepError, Usage};
pub use strict::MAX_SAFE_INTEGER;
pub use timestamp::Timestamp;
