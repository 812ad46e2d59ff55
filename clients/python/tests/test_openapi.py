"""The SDK's models against the node: its `/openapi.json` and the answers it really sends.

- Every operation the document lists has a model here, and every model here names a listed operation.
- Where the document defines a schema (today: the error body only), its properties and required fields
  must equal the model's; an operation whose success answer has no schema yet is skipped with the reason.
- So that drift shows today: a scenario drives every endpoint and every real JSON answer is checked
  against its model — every field the node sends must be known to the model, and every field of a model
  must appear in some real answer.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, create_model

import runguard
from runguard import models as m

from conftest import FAST, budget
from node import ADMIN, Node


def page_of(item: type[BaseModel]) -> type[BaseModel]:
    return create_model(f"{item.__name__}Page", items=(list[item], ...), next_cursor=(str | None, ...))  # type: ignore[valid-type]


# (method, path, success status) → the model of the answer.
OPERATIONS: dict[tuple[str, str, str], type[BaseModel] | None] = {
    ("post", "/v1/policies", "201"): m.Policy,
    ("get", "/v1/policies", "200"): page_of(m.Policy),
    ("get", "/v1/policies/{id}", "200"): m.Policy,
    ("put", "/v1/policies/{id}", "200"): m.Policy,
    ("post", "/v1/policies/{id}/mode", "200"): m.Policy,
    ("post", "/v1/policies/{id}/confirm", "200"): m.Confirmation,
    ("get", "/v1/policies/{id}/audit", "200"): page_of(m.AuditEntry),
    ("get", "/v1/policies/{id}/versions", "200"): page_of(m.Policy),
    ("get", "/v1/policies/{id}/shadow-stats", "200"): m.ShadowStats,
    ("get", "/v1/policies/{id}/graduation", "200"): m.PolicyGraduation,
    ("get", "/v1/policies/{id}/usage", "200"): m.PolicyUsage,
    ("post", "/v1/runs", "201"): m.RunCreated,
    ("get", "/v1/runs", "200"): page_of(m.Run),
    ("post", "/v1/runs", "200"): m.RunCreated,  # the same creation sent again
    ("get", "/v1/runs/{id}", "200"): m.Run,
    ("post", "/v1/runs/{id}/steps", "200"): m.Decision,
    ("post", "/v1/runs/{id}/end", "200"): m.RunEnded,
    ("get", "/v1/runs/{id}/decisions", "200"): page_of(m.Decision),
    ("get", "/v1/snapshots/{id}", "200"): m.Snapshot,
    ("get", "/v1/prevention-records", "200"): page_of(m.PreventionRecord),
    ("get", "/v1/prevention-records/{id}", "200"): m.PreventionRecord,
    ("post", "/v1/prevention-records/{id}/regret", "201"): m.RegretResult,
    ("get", "/v1/incidents", "200"): page_of(m.Incident),
    ("get", "/v1/incidents/{id}", "200"): m.Incident,
    ("get", "/v1/patterns", "200"): page_of(m.Pattern),
    ("get", "/v1/patterns/{id}", "200"): m.Pattern,
    ("post", "/v1/patterns/{id}/propose", "201"): m.Policy,
    ("get", "/v1/graduation", "200"): m.TenantGraduation,
    ("post", "/v1/simulate", "200"): m.Simulation,
    ("get", "/healthz", "200"): m.Health,
    ("get", "/readyz", "200"): m.Health,
    ("get", "/metrics", "200"): None,  # Prometheus text, not JSON
    ("get", "/openapi.json", "200"): None,  # the document itself
}

# Fields no scenario here can make the node send, and why.
NEVER_SEEN = {
    (m.Snapshot, "problem"): "only an admin reading a snapshot that fails verification gets it",
    (m.RegretPolicySummary, "reason"): "only a regret on a global policy's record says why it is not demoted",
}


@pytest.fixture(scope="module")
def document(node: Node) -> dict[str, Any]:
    with runguard.Client(node.base_url, retry=FAST) as client:
        return client.openapi()


def test_every_documented_operation_has_a_model_and_back(document: dict[str, Any]) -> None:
    documented = {
        (method, path, status)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        # HEAD mirrors GET without a body; nothing to model.
        if method not in ("head", "options")
        for status in operation["responses"]
        if status.startswith("2")
    }
    assert documented == set(OPERATIONS)


def resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        schema = target
    options = [s for s in schema.get("anyOf", []) if s.get("type") != "null"]
    return resolve(options[0], root) if len(options) == 1 else schema


def compare(
    node_schema: dict[str, Any], node_root: dict[str, Any], ours: dict[str, Any], our_root: dict[str, Any], at: str
) -> None:
    node_schema, ours = resolve(node_schema, node_root), resolve(ours, our_root)
    if "properties" in node_schema:
        node_props, our_props = node_schema["properties"], ours.get("properties", {})
        assert set(node_props) == set(our_props), (
            f"{at}: the node has {sorted(node_props)}, the model {sorted(our_props)}"
        )
        assert set(node_schema.get("required", [])) == set(ours.get("required", [])), f"{at}: required fields differ"
        for name, sub in node_props.items():
            compare(sub, node_root, our_props[name], our_root, f"{at}.{name}")
    elif node_schema.get("type") == "array" and "items" in node_schema:
        compare(node_schema["items"], node_root, ours.get("items", {}), our_root, f"{at}[]")


def success_schema(document: dict[str, Any], method: str, path: str, status: str) -> dict[str, Any] | None:
    content = document["paths"][path][method]["responses"][status].get("content", {})
    return content.get("application/json", {}).get("schema")


@pytest.mark.parametrize(("method", "path", "status"), sorted(OPERATIONS), ids=lambda v: str(v))
def test_success_schemas_match_the_models(document: dict[str, Any], method: str, path: str, status: str) -> None:
    model = OPERATIONS[(method, path, status)]
    schema = success_schema(document, method, path, status)
    if model is None:
        pytest.skip(f"{method.upper()} {path} answers no JSON object the SDK models")
    if schema is None:
        pytest.skip(f"the node's OpenAPI document has no response schema for {method.upper()} {path} {status}")
    ours = model.model_json_schema(by_alias=True, ref_template="#/$defs/{model}")
    compare(schema, document, ours, ours, f"{method.upper()} {path}")


def test_error_schemas_match_the_error_model(document: dict[str, Any]) -> None:
    ours = m.ErrorBody.model_json_schema(by_alias=True)
    checked = 0
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if not status.startswith("2") and schema is not None:
                    compare(schema, document, ours, ours, f"{method.upper()} {path} {status}")
                    checked += 1
    assert checked > 0


# Real answers


def template_of(method: str, path: str) -> tuple[str, str, str] | None:
    for key in OPERATIONS:
        pattern = "^" + re.sub(r"\\\{id\\\}", "[^/]+", re.escape(key[1])) + "$"
        if key[0] == method and re.match(pattern, path):
            return key
    return None


def walk(value: Any, seen: dict[type[BaseModel], set[str]], at: str) -> None:
    if isinstance(value, BaseModel):
        assert not value.model_extra, (
            f"{at}: the node sends fields the model does not know: {sorted(value.model_extra)}"
        )
        seen[type(value)].update((type(value).model_fields[name].alias or name) for name in value.model_fields_set)
        for name in type(value).model_fields:
            walk(getattr(value, name), seen, f"{at}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            walk(item, seen, f"{at}[{i}]")


def drive_every_endpoint(client: runguard.Client) -> None:
    client.create_policy(budget(100, warn_at=[50]))
    client.create_policy(
        {"id": "pol_shadow", "name": "no rm", "mode": "shadow", "rule": {"kind": "skill", "deny": ["rm"]}}
    )
    client.create_policy(
        {
            "id": "pol_content",
            "name": "no emails",
            "action": "warn",
            "rule": {"kind": "content", "detectors": ["email"]},
        }
    )
    list(client.list_policies(limit=1))
    client.update_policy("pol_budget", budget(100, warn_at=[50]), expected_version=1)
    client.get_policy("pol_budget", version=1)
    client.set_policy_mode("pol_shadow", "pending", reason="review")
    client.confirm_policy("pol_shadow")
    list(client.policy_audit("pol_shadow"))
    versions = [p.version for p in client.policy_versions("pol_shadow", limit=1)]
    assert versions == list(range(1, client.get_policy("pol_shadow").version + 1))
    client.policy_shadow_stats("pol_shadow")
    client.policy_graduation("pol_budget")
    client.create_policy(
        {
            "id": "pol_day",
            "name": "tenant tokens a day",
            "rule": {"kind": "budget", "metric": "tokens", "per": "tenant", "period": "day", "max": 1_000_000},
        }
    )
    client.policy_usage("pol_day")
    client.set_policy_mode("pol_shadow", "shadow")
    with pytest.raises(runguard.Blocked):
        with client.run(labels={"k": "v"}, api_endpoint="/x") as run:
            with run.step("rm", estimate=10) as step:
                step.report(60, output_text="mail me at someone@example.com")
            with run.step("b", estimate=100):
                pass
    client.get_run(run.run_id)
    assert [r.run_id for r in client.list_runs(status="stopped", label="k=v")] == [run.run_id]
    again = client.create_run(labels={"k": "v"})
    client.create_run(again.run_id, labels={"k": "v"})
    list(client.list_decisions(run.run_id))
    client.get_snapshot(client.get_run(run.run_id).snapshot.id)
    (record,) = list(client.list_prevention_records(run_id=run.run_id))
    client.get_prevention_record(record.id)
    client.regret(record.id, 1, note="fine")
    for _ in range(3):
        failed = client.start_run()
        client.send_step(
            failed.run_id,
            {"index": 0, "phase": "post", "skill": "fetch", "input_keys": ["id"], "error": {"type": "Timeout"}},
        )
        failed.end("failed", {"type": "Timeout", "code": "E", "status": 504, "message": "slow"})
    incidents = list(client.list_incidents())
    assert client.get_incident(incidents[0].id) == incidents[0]
    (pattern,) = list(client.list_patterns())
    client.get_pattern(pattern.id)
    client.propose_pattern(pattern.id)
    client.tenant_graduation()
    client.simulate([budget(1, policy_id="pol_tight")], [run.run_id])
    client.health()
    client.ready()


def test_every_real_answer_matches_its_model(node: Node, tenant: str) -> None:
    answers: list[tuple[tuple[str, str, str], Any]] = []

    def record(response: httpx.Response) -> None:
        response.read()
        key = template_of(response.request.method.lower(), response.request.url.path)
        if key is not None and response.is_success and OPERATIONS[key] is not None:
            key = (key[0], key[1], str(response.status_code))
            answers.append((key, response.json()))

    http = httpx.Client(timeout=15, event_hooks={"response": [record]})
    with runguard.Client(node.base_url, token=ADMIN.secret, tenant=tenant, retry=FAST, http_client=http) as client:
        drive_every_endpoint(client)

    assert {key for key, _ in answers} == {key for key, model in OPERATIONS.items() if model is not None}
    seen: dict[type[BaseModel], set[str]] = defaultdict(set)
    for key, payload in answers:
        model = OPERATIONS[key]
        assert model is not None
        walk(model.model_validate(payload), seen, f"{key[0].upper()} {key[1]}")
    for model, fields in seen.items():
        declared = {field.alias or name for name, field in model.model_fields.items()}
        never = {name for (cls, name) in NEVER_SEEN if cls is model}
        assert declared - never <= fields, f"{model.__name__}: the node never sent {sorted(declared - never - fields)}"
