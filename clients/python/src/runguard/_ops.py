"""Every endpoint of docs/api.md as an :class:`~runguard._base.Op` builder."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from . import models as m
from ._base import Op, drop_none, encode, path_segment

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Page(Generic[M]):
    """One page of a list: ``{"items": [...], "next_cursor": ...}``."""

    items: list[M]
    next_cursor: str | None


def _model(cls: type[M]) -> Callable[[Any], M]:
    return cls.model_validate


def _page(cls: type[M]) -> Callable[[Any], Page[M]]:
    def parse(payload: Any) -> Page[M]:
        return Page([cls.model_validate(item) for item in payload["items"]], payload.get("next_cursor"))

    return parse


def _params(values: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            continue
        out[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


PageOp = Callable[[str | None], Op[Page[M]]]


def paged(cls: type[M], path: str, limit: int | None, **filters: Any) -> PageOp[M]:
    def make(cursor: str | None) -> Op[Page[M]]:
        return Op("GET", path, _page(cls), params=_params({**filters, "limit": limit, "cursor": cursor}))

    return make


# policies
def create_policy(document: Mapping[str, Any]) -> Op[m.Policy]:
    # With an id a re-send after a lost answer is a clear 409; without one it could create a twin.
    return Op("POST", "/v1/policies", _model(m.Policy), body=encode(document), idempotent="id" in document)


def list_policies(mode: str | None, limit: int | None) -> PageOp[m.Policy]:
    return paged(m.Policy, "/v1/policies", limit, mode=mode)


def get_policy(policy_id: str, version: int | None) -> Op[m.Policy]:
    return Op("GET", f"/v1/policies/{path_segment(policy_id)}", _model(m.Policy), params=_params({"version": version}))


def update_policy(policy_id: str, document: Mapping[str, Any], expected_version: int) -> Op[m.Policy]:
    body = {**document, "expected_version": expected_version}
    return Op("PUT", f"/v1/policies/{path_segment(policy_id)}", _model(m.Policy), body=encode(body))


def set_policy_mode(policy_id: str, mode: str, reason: str | None) -> Op[m.Policy]:
    body = encode(drop_none({"mode": mode, "reason": reason}))
    return Op("POST", f"/v1/policies/{path_segment(policy_id)}/mode", _model(m.Policy), body=body)


def confirm_policy(policy_id: str) -> Op[m.Confirmation]:
    # The same operator confirming twice counts once: safe to re-send.
    return Op("POST", f"/v1/policies/{path_segment(policy_id)}/confirm", _model(m.Confirmation), body=b"{}")


def policy_audit(policy_id: str, limit: int | None) -> PageOp[m.AuditEntry]:
    return paged(m.AuditEntry, f"/v1/policies/{path_segment(policy_id)}/audit", limit)


def policy_versions(policy_id: str, limit: int | None) -> PageOp[m.Policy]:
    return paged(m.Policy, f"/v1/policies/{path_segment(policy_id)}/versions", limit)


def policy_shadow_stats(policy_id: str) -> Op[m.ShadowStats]:
    return Op("GET", f"/v1/policies/{path_segment(policy_id)}/shadow-stats", _model(m.ShadowStats))


def policy_graduation(policy_id: str) -> Op[m.PolicyGraduation]:
    return Op("GET", f"/v1/policies/{path_segment(policy_id)}/graduation", _model(m.PolicyGraduation))


def policy_usage(policy_id: str) -> Op[m.PolicyUsage]:
    return Op("GET", f"/v1/policies/{path_segment(policy_id)}/usage", _model(m.PolicyUsage))


# runs
def create_run(
    run_id: str, labels: Mapping[str, str] | None, api_endpoint: str | None, parent_run_id: str | None
) -> Op[m.RunCreated]:
    # `parent_run_id` is sent only when given, so the call works on nodes without sub-runs.
    body = drop_none(
        {
            "run_id": run_id,
            "labels": dict(labels) if labels else None,
            "api_endpoint": api_endpoint,
            "parent_run_id": parent_run_id,
        }
    )
    return Op("POST", "/v1/runs", _model(m.RunCreated), body=encode(body))


def get_run(run_id: str) -> Op[m.Run]:
    return Op("GET", f"/v1/runs/{path_segment(run_id)}", _model(m.Run))


def list_runs(
    status: str | None, label: str | None, since: str | None, until: str | None, limit: int | None
) -> PageOp[m.Run]:
    return paged(m.Run, "/v1/runs", limit, status=status, label=label, since=since, until=until)


def step(run_id: str, body: bytes) -> Op[m.Decision]:
    return Op("POST", f"/v1/runs/{path_segment(run_id)}/steps", _model(m.Decision), body=body)


def end_run(run_id: str, outcome: str, error: Mapping[str, Any] | None) -> Op[m.RunEnded]:
    body = encode(drop_none({"outcome": outcome, "error": dict(error) if error else None}))
    return Op("POST", f"/v1/runs/{path_segment(run_id)}/end", _model(m.RunEnded), body=body)


def list_decisions(run_id: str, limit: int | None) -> PageOp[m.Decision]:
    return paged(m.Decision, f"/v1/runs/{path_segment(run_id)}/decisions", limit)


def get_snapshot(snapshot_id: str) -> Op[m.Snapshot]:
    return Op("GET", f"/v1/snapshots/{path_segment(snapshot_id)}", _model(m.Snapshot))


# prevention records and the learning loop
def list_prevention_records(
    policy_id: str | None,
    run_id: str | None,
    since: str | None,
    until: str | None,
    simulated: bool | None,
    limit: int | None,
) -> PageOp[m.PreventionRecord]:
    return paged(
        m.PreventionRecord,
        "/v1/prevention-records",
        limit,
        policy_id=policy_id,
        run_id=run_id,
        since=since,
        until=until,
        simulated=simulated,
    )


def get_prevention_record(record_id: str) -> Op[m.PreventionRecord]:
    return Op("GET", f"/v1/prevention-records/{path_segment(record_id)}", _model(m.PreventionRecord))


def regret(record_id: str, severity: int, note: str | None) -> Op[m.RegretResult]:
    body = encode(drop_none({"severity": severity, "note": note}))
    return Op(
        "POST",
        f"/v1/prevention-records/{path_segment(record_id)}/regret",
        _model(m.RegretResult),
        body=body,
        idempotent=False,
    )


def list_incidents(limit: int | None) -> PageOp[m.Incident]:
    return paged(m.Incident, "/v1/incidents", limit)


def get_incident(incident_id: str) -> Op[m.Incident]:
    return Op("GET", f"/v1/incidents/{path_segment(incident_id)}", _model(m.Incident))


def list_patterns(limit: int | None) -> PageOp[m.Pattern]:
    return paged(m.Pattern, "/v1/patterns", limit)


def get_pattern(pattern_id: str) -> Op[m.Pattern]:
    return Op("GET", f"/v1/patterns/{path_segment(pattern_id)}", _model(m.Pattern))


def propose_pattern(pattern_id: str) -> Op[m.Policy]:
    # A second proposal is a 409, so a re-send after a lost answer shows up rather than duplicating.
    return Op("POST", f"/v1/patterns/{path_segment(pattern_id)}/propose", _model(m.Policy), body=b"{}")


def tenant_graduation() -> Op[m.TenantGraduation]:
    return Op("GET", "/v1/graduation", _model(m.TenantGraduation))


def simulate(policies: list[Mapping[str, Any]], run_ids: list[str], persist: bool) -> Op[m.Simulation]:
    body = encode({"policies": [dict(p) for p in policies], "run_ids": list(run_ids), "persist": persist})
    return Op("POST", "/v1/simulate", _model(m.Simulation), body=body, idempotent=not persist)


# operations
def health() -> Op[m.Health]:
    return Op("GET", "/healthz", _model(m.Health))


def ready() -> Op[m.Health]:
    return Op("GET", "/readyz", _model(m.Health))


def metrics() -> Op[str]:
    return Op("GET", "/metrics", str, text=True)


def openapi() -> Op[dict[str, Any]]:
    return Op("GET", "/openapi.json", dict)
