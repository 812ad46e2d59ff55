"""Typed models of what the node answers (docs/api.md).

Pydantic v2 models: they validate what the node sends (an integer that is not one, a missing field), give
editors and type checkers the shapes, and produce JSON schemas that a test compares with the node's
`/openapi.json`. Fields the node adds later are kept (``extra="allow"``) rather than refused, so an older
SDK keeps working against a newer node; the drift test (`tests/test_openapi.py`) checks that every field a
real answer carries is known to the model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Action = Literal["allow", "warn", "throttle", "block"]
DecisionPhase = Literal["run_start", "pre", "post", "run_end"]
Phase = Literal["pre", "post"]
RunStatus = Literal["running", "stopped", "succeeded", "failed", "expired"]
Outcome = Literal["succeeded", "failed"]
Mode = Literal["active", "shadow", "pending", "disabled"]


class Model(BaseModel):
    """Base of every wire model: unknown fields are kept (forward compatible), names are exact."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)


class PolicyRef(Model):
    id: str
    name: str
    version: int


class EvidenceMatch(Model):
    kind: str
    name: str
    count: int
    samples: list[str]


class Evidence(Model):
    text: str | None
    matches: list[EvidenceMatch]
    signature_hash: str | None
    api_endpoint: str | None


class Violation(Model):
    policy_id: str
    policy_name: str
    policy_version: int
    violation_type: str
    action: Action
    threshold: str | None
    actual: str | None
    reason: str
    evidence: Evidence | None
    # The ancestor run whose per-run budget this is; `None` for the run's own policies.
    run_id: str | None


class ShadowEntry(Model):
    policy_id: str
    policy_version: int
    would_action: Action
    violation_type: str
    reason: str


class Remaining(Model):
    """The tightest per-run budget left per metric; ``None`` where no per-run budget applies."""

    tokens: int | None
    cost_micros: int | None
    steps: int | None
    duration_ms: int | None


class Decision(Model):
    decision_id: str
    run_id: str
    step_index: int | None
    phase: DecisionPhase
    action: Action
    deciding_policy: PolicyRef | None
    violations: list[Violation]
    shadow: list[ShadowEntry]
    remaining: Remaining
    retry_after_ms: int | None
    snapshot_hash: str
    prevention_record_id: str | None
    evaluated_at: str

    @property
    def reason(self) -> str:
        """The deciding violation's reason, or the action when nothing was violated."""
        if self.deciding_policy is not None:
            for violation in self.violations:
                if violation.policy_id == self.deciding_policy.id and violation.action == self.action:
                    return violation.reason
        return self.violations[0].reason if self.violations else self.action


class SnapshotRef(Model):
    id: str
    hash: str
    policy_count: int


class Totals(Model):
    tokens: int
    cost_micros: int
    steps: int
    duration_ms: int


class NextCall(Model):
    index: int
    phase: Phase


class Run(Model):
    run_id: str
    tenant_id: str
    snapshot: SnapshotRef
    status: RunStatus
    totals: Totals
    termination_reason: str | None
    stopped_at_step: int | None
    violation_policy_id: str | None
    labels: dict[str, str]
    api_endpoint: str | None
    created_at: str
    ended_at: str | None
    outcome: Outcome | None
    next: NextCall
    # Only `GET /v1/runs/{id}` adds it; the run inside an end answer has none.
    steps_seen: int | None = None
    # Parent and child runs: the run that spawned it, and the ancestor whose policy stopped it.
    parent_run_id: str | None
    violation_run_id: str | None
    # Its own totals plus its descendants', and its number of children: `GET /v1/runs/{id}` and the run of
    # an end answer carry them, the run list does not.
    rolled_up_totals: Totals | None = None
    children: int | None = None


class RunCreated(Model):
    run_id: str
    status: RunStatus
    snapshot: SnapshotRef
    decision: Decision


class RunEnded(Model):
    run: Run
    incident_id: str | None


class Policy(Model):
    id: str
    tenant_id: str | None
    version: int
    name: str
    scope: Literal["tenant", "global"]
    mode: Mode
    action: Literal["block", "warn"]
    precedence: int
    on_error: Literal["block", "warn", "allow"]
    bind_at: str | None
    rule: dict[str, Any]
    created_at: str
    updated_at: str
    activated_at: str | None


class Confirmation(Model):
    confirmations: int
    required: int
    policy: Policy


class AuditEntry(Model):
    policy_id: str
    from_: Mode | None = Field(alias="from")
    to: Mode
    at: str
    caller: str
    reason: str | None
    approval_path: str


class ShadowStats(Model):
    policy_id: str
    mode: Mode
    evaluations: int
    would_block: int
    would_warn: int
    would_throttle: int


class PolicyGraduation(Model):
    policy_id: str
    status: str
    gate_passed: bool
    counted_records: int
    activated_at: str | None


class PolicyUsage(Model):
    """A tenant-period budget's usage by the caller's tenant in the current UTC period."""

    period: str
    period_start: str
    used: int
    max: int


class Snapshot(Model):
    id: str
    hash: str
    verified: bool
    policy_count: int | None = None
    policies: list[Policy] | None = None
    # Only for an admin reading a snapshot that fails verification.
    problem: str | None = None


class PreventionRecord(Model):
    id: str
    seq: int
    tenant_id: str
    run_id: str
    step_index: int | None
    phase: DecisionPhase
    decision_id: str
    policy_id: str
    policy_version: int
    pattern_id: str | None
    signature_hash: str | None
    incident_id_blocked: str
    snapshot_hash: str
    prevented_at: str
    is_simulated: bool
    prev_hash: str
    hash: str


class Regret(Model):
    record_id: str
    policy_id: str
    severity: int
    note: str | None
    caller: str
    at: str


class RegretPolicySummary(Model):
    policy_id: str
    demoted: bool
    scope: Literal["tenant", "global"] | None = None
    regret_score: float | None = None
    regrets_since_activation: int | None = None
    reason: str | None = None


class RegretResult(Model):
    regret: Regret
    policy: RegretPolicySummary


class Signature(Model):
    skill: str
    api_endpoint: str
    input_keys: list[str]


class StepError(Model):
    type: str | None
    code: str | None
    status: int | None
    message: str | None


class Incident(Model):
    id: str
    tenant_id: str
    run_id: str
    signature_hash: str
    signature: Signature
    error: StepError
    pattern_id: str
    created_at: str


class Pattern(Model):
    id: str
    tenant_id: str
    signature_hash: str
    signature: Signature
    error_type: str
    occurrences: int
    first_seen: str
    last_seen: str
    incident_ids: list[str]
    policy_id: str | None


class PreventionGate(Model):
    passed: bool
    counted_preventions: int
    missed_recurrences: int
    prevention_rate: float
    last_prevention_at: str | None


class RollbackGate(Model):
    passed: bool
    demotions: int
    regrets: int
    regret_rate: float


class Gates(Model):
    prevention: PreventionGate
    rollback: RollbackGate


class GraduationHistoryEntry(Model):
    level: str
    degraded_from: str | None
    reason: str | None
    at: str


class TenantGraduation(Model):
    tenant_id: str
    level: str
    degraded_from: str | None
    reason: str | None
    evaluated_at: str
    gates: Gates
    history: list[GraduationHistoryEntry]


class SimulatedRun(Model):
    run_id: str
    differences: int
    live: list[Decision]
    candidate: list[Decision]
    records: list[PreventionRecord]


class Simulation(Model):
    candidate_snapshot_hash: str
    results: list[SimulatedRun]


class Health(Model):
    status: str


class ErrorDetail(Model):
    code: str
    message: str
    details: dict[str, Any]


class ErrorBody(Model):
    error: ErrorDetail


__all__ = [
    "Action",
    "AuditEntry",
    "Confirmation",
    "Decision",
    "DecisionPhase",
    "ErrorBody",
    "ErrorDetail",
    "Evidence",
    "EvidenceMatch",
    "Gates",
    "GraduationHistoryEntry",
    "Health",
    "Incident",
    "Model",
    "Mode",
    "NextCall",
    "Outcome",
    "Pattern",
    "Phase",
    "Policy",
    "PolicyGraduation",
    "PolicyUsage",
    "PolicyRef",
    "PreventionGate",
    "PreventionRecord",
    "Regret",
    "RegretPolicySummary",
    "RegretResult",
    "Remaining",
    "RollbackGate",
    "Run",
    "RunCreated",
    "RunEnded",
    "RunStatus",
    "ShadowEntry",
    "ShadowStats",
    "Signature",
    "Simulation",
    "SimulatedRun",
    "Snapshot",
    "SnapshotRef",
    "StepError",
    "TenantGraduation",
    "Totals",
    "Violation",
]
