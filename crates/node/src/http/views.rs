//! The answers the handlers build themselves, as types: what they serialise is what the OpenAPI
//! document describes, so the two cannot drift.
//!
//! Where an answer used to be a `json!` object, it is still sent through a JSON value ([`sorted`]), whose
//! keys serde_json sorts at every depth, so that every byte on the wire stays as it was; fields are
//! declared in that order too.
//!
//! The actors' typed answers (run creation, confirmation, regret, tenant graduation) carry their own
//! schemas. Only the engine's simulation types, which the engine keeps free of schema derives, are
//! described here by `…Doc` structs mirroring their JSON; the black-box suite checks every answer
//! against the document, so a mirror that drifts fails a test.

use std::collections::BTreeMap;

use runguard_contract::{
    Decision, IncidentId, NextCall, Outcome, Policy, PolicyId, PreventionRecord, RunId, RunStatus, SnapshotHash,
    SnapshotId, SnapshotRef, TenantId, TerminationReason, Timestamp, Totals,
};
use runguard_engine::learning::{PolicyGraduation, PolicyStatus};
use runguard_store::StoredRun;
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// The view as a JSON value: keys sorted at every depth, as the `json!` answers it replaces had them.
pub fn sorted<T: Serialize>(view: &T) -> Result<Value, ApiError> {
    serde_json::to_value(view).map_err(|_| ApiError::internal())
}

/// One page of a list: `next_cursor` is passed back as `cursor` for the next page; `null` on the last.
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(rename = "{T}Page")]
pub struct Page<T> {
    /// The items of this page, in the list's order.
    pub items: Vec<T>,
    /// The cursor of the next page, if there is one.
    pub next_cursor: Option<String>,
}

/// `/healthz` and `/readyz`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Health {
    /// `ok` (alive) or `ready`.
    pub status: &'static str,
}

/// Every error answer.
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(rename = "Error")]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `step_out_of_order`.
    pub code: String,
    /// A sentence for humans.
    pub message: String,
    /// Structured details: `field` (the JSON path) for 400s, `expected` for order errors, …
    pub details: Map<String, Value>,
}

/// A run as `GET /v1/runs/{id}` and the end of a run answer it.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RunView {
    /// The endpoint given at run creation, if any.
    pub api_endpoint: Option<String>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it ended, stopped or expired.
    pub ended_at: Option<Timestamp>,
    /// Caller labels.
    pub labels: BTreeMap<String, String>,
    /// The next call it expects.
    pub next: NextCall,
    /// The outcome reported at run end.
    pub outcome: Option<Outcome>,
    /// The run that spawned it; `null` for a root run.
    pub parent_run_id: Option<RunId>,
    /// How many children it has (`GET /v1/runs/{id}` and run end only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub children: Option<u64>,
    /// Its own totals plus every descendant's: what its per-run budgets compare against
    /// (`GET /v1/runs/{id}` and run end only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rolled_up_totals: Option<Totals>,
    /// The run.
    pub run_id: RunId,
    /// The snapshot it evaluates.
    pub snapshot: SnapshotRef,
    /// Current status.
    pub status: RunStatus,
    /// Step calls seen (`GET /v1/runs/{id}` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps_seen: Option<u64>,
    /// The step at which it was stopped.
    pub stopped_at_step: Option<u64>,
    /// The run's tenant.
    pub tenant_id: TenantId,
    /// Why it was stopped, if it was.
    pub termination_reason: Option<TerminationReason>,
    /// Totals after the last acknowledged call.
    pub totals: Totals,
    /// The policy that stopped it.
    pub violation_policy_id: Option<PolicyId>,
    /// The ancestor whose policy stopped it, when an ancestor's budget did.
    pub violation_run_id: Option<RunId>,
}

impl RunView {
    /// The view with the run's rolled-up totals and children count.
    #[must_use]
    pub fn with_rollup(mut self, rollup: runguard_store::RunRollup) -> Self {
        self.rolled_up_totals = Some(self.totals.saturating_add(rollup.descendants));
        self.children = Some(rollup.children);
        self
    }
}

/// A stored run's status as the run views show it: a running run past its TTL is `expired`, as it will be
/// persisted on its next call.
pub fn shown_status(run: &StoredRun, limits: &runguard_engine::RunLimits, now: Timestamp) -> RunStatus {
    if run.status == RunStatus::Running && limits.ttl_elapsed(run.created_at, now) {
        RunStatus::Expired
    } else {
        run.status
    }
}

impl RunView {
    /// The stored run, with `steps_seen` when the answer carries it.
    pub fn new(run: StoredRun, steps_seen: Option<u64>) -> Self {
        // Destructured field by field: a field added to the stored run does not compile until it is shown.
        let StoredRun {
            tenant_id,
            run_id,
            snapshot,
            status,
            totals,
            termination_reason,
            stopped_at_step,
            violation_policy_id,
            labels,
            api_endpoint,
            created_at,
            ended_at,
            outcome,
            next,
            parent_run_id,
            ancestors: _,
            violation_run_id,
        } = run;
        Self {
            api_endpoint,
            created_at,
            ended_at,
            labels,
            next,
            outcome,
            run_id,
            snapshot,
            status,
            steps_seen,
            stopped_at_step,
            tenant_id,
            termination_reason,
            totals,
            violation_policy_id,
            parent_run_id,
            children: None,
            rolled_up_totals: None,
            violation_run_id,
        }
    }
}

/// `POST /v1/runs/{id}/end`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RunEnded {
    /// The incident a failed run created (open it at `GET /v1/incidents/{id}`).
    pub incident_id: Option<IncidentId>,
    /// The run as it ended.
    pub run: RunView,
}

/// `GET /v1/policies/{id}/shadow-stats`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ShadowStats {
    /// Evaluations of the policy while in shadow mode.
    pub evaluations: u64,
    /// Its current mode.
    pub mode: runguard_contract::Mode,
    /// The policy.
    pub policy_id: PolicyId,
    /// Would-be blocks.
    pub would_block: u64,
    /// Would-be throttles.
    pub would_throttle: u64,
    /// Would-be warns.
    pub would_warn: u64,
}

/// `GET /v1/policies/{id}/graduation`: the prevention gate of one policy.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PolicyGraduationView {
    /// The policy.
    pub policy_id: PolicyId,
    /// `observing`, `unproven`, `proven` or `demoted`.
    #[schemars(with = "PolicyStatusDoc")]
    pub status: PolicyStatus,
    /// At least one counted record since the latest activation.
    pub gate_passed: bool,
    /// Records counted.
    pub counted_records: u64,
    /// The latest activation.
    pub activated_at: Option<Timestamp>,
}

impl From<PolicyGraduation> for PolicyGraduationView {
    fn from(graduation: PolicyGraduation) -> Self {
        let PolicyGraduation { policy_id, status, gate_passed, counted_records, activated_at } = graduation;
        Self { policy_id, status, gate_passed, counted_records, activated_at }
    }
}

/// A policy's graduation status.
#[derive(Debug, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[schemars(rename = "PolicyStatus")]
pub enum PolicyStatusDoc {
    /// In shadow or pending.
    Observing,
    /// Active, no counted prevention yet.
    Unproven,
    /// Active with at least one counted prevention since its latest activation.
    Proven,
    /// Disabled.
    Demoted,
}

/// `GET /v1/snapshots/{id}`: `policy_count` and `policies` when it verifies, `problem` when it does not.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SnapshotView {
    /// Its hash.
    pub hash: SnapshotHash,
    /// Its id.
    pub id: SnapshotId,
    /// Its policies, as captured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policies: Option<Vec<Policy>>,
    /// How many.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_count: Option<u64>,
    /// Why it fails verification (admins only see such a snapshot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Whether its content matches its hash.
    pub verified: bool,
}

/// `POST /v1/simulate`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Simulation {
    /// The hash of the snapshot of the candidate policies.
    pub candidate_snapshot_hash: SnapshotHash,
    /// One result per run, in the order asked.
    #[schemars(with = "Vec<SimulatedRunDoc>")]
    pub results: Vec<Value>,
}

/// One replayed run (describes `simulation::simulate`'s answer).
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(rename = "SimulatedRun")]
pub struct SimulatedRunDoc {
    /// The decisions the candidates made.
    pub candidate: Vec<Decision>,
    /// How many calls were answered differently.
    pub differences: u64,
    /// The decisions made live.
    pub live: Vec<Decision>,
    /// The records the candidates would have written (stored, with `persist`).
    pub records: Vec<PreventionRecord>,
    /// The run.
    pub run_id: RunId,
}

#[cfg(test)]
mod tests {
    use super::*;
    use runguard_contract::{Phase, SnapshotHash};

    fn stored_run() -> StoredRun {
        let hash = SnapshotHash::from_bytes(&[7; 32]);
        StoredRun {
            tenant_id: TenantId::new("acme").unwrap(),
            run_id: RunId::new("run-1").unwrap(),
            snapshot: SnapshotRef { id: SnapshotId::for_hash(&hash), hash, policy_count: 2 },
            status: RunStatus::Stopped,
            totals: Totals { tokens: 5, cost_micros: 6, steps: 1, duration_ms: 7 },
            termination_reason: Some(TerminationReason::PolicyBlock),
            stopped_at_step: Some(1),
            violation_policy_id: Some(PolicyId::new("pol_b").unwrap()),
            labels: BTreeMap::from([("env".to_owned(), "prod".to_owned())]),
            api_endpoint: Some("/x".to_owned()),
            created_at: Timestamp::from_unix_millis(1_000),
            ended_at: Some(Timestamp::from_unix_millis(2_000)),
            outcome: None,
            next: NextCall { index: 1, phase: Phase::Pre },
            parent_run_id: None,
            ancestors: Vec::new(),
            violation_run_id: None,
        }
    }

    /// The views answer exactly the bytes the `json!` objects they replace answered.
    #[test]
    fn run_views_keep_the_bytes_of_the_json_objects_they_replace() {
        let run = stored_run();
        let mut before = serde_json::to_value(&run).unwrap();
        before["steps_seen"] = serde_json::json!(run.next.index);
        // The ancestors are the store's; the view names the parent only.
        let drop_ancestors = |v: &mut serde_json::Value| v.as_object_mut().unwrap().remove("ancestors");
        drop_ancestors(&mut before);
        let after = sorted(&RunView::new(run.clone(), Some(1))).unwrap();
        assert_eq!(after.to_string(), before.to_string());
        let mut before = serde_json::json!({ "run": run, "incident_id": None::<IncidentId> });
        drop_ancestors(&mut before["run"]);
        let after = sorted(&RunEnded { run: RunView::new(run, None), incident_id: None }).unwrap();
        assert_eq!(after.to_string(), before.to_string());
        let page = Page { items: vec![1, 2], next_cursor: Some("c".to_owned()) };
        let before = serde_json::json!({ "items": [1, 2], "next_cursor": "c" });
        assert_eq!(serde_json::to_string(&sorted(&page).unwrap()).unwrap(), before.to_string());
    }
}
