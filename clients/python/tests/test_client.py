"""The client on every endpoint of docs/api.md, against the real node."""

from __future__ import annotations

import pytest

import runguard

from conftest import FAST, budget
from node import ACME_OPERATOR, ACME_OPERATOR_2, ACME_WORKER, Node


def fail_three_times(client: runguard.Client) -> list[str]:
    """Three failed runs with the same signature: an incident each, one pattern."""
    run_ids = []
    for _ in range(3):
        run = client.start_run()
        client.send_step(
            run.run_id,
            {
                "index": 0,
                "phase": "post",
                "skill": "fetch",
                "api_endpoint": "/v1/users/42",
                "input_keys": ["id"],
                "error": {"type": "Timeout", "code": "E_UPSTREAM", "status": 504},
            },
        )
        ended = run.end("failed", {"type": "Timeout"})
        assert ended.incident_id is not None
        run_ids.append(run.run_id)
    return run_ids


def test_policies_endpoints(client: runguard.Client) -> None:
    created = client.create_policy(budget(1000, warn_at=[80]))
    assert created.version == 1 and created.mode == "active" and created.rule["max"] == 1000
    client.create_policy(
        {"id": "pol_skill", "name": "no rm", "mode": "shadow", "rule": {"kind": "skill", "deny": ["rm"]}}
    )

    assert {p.id for p in client.list_policies()} == {"pol_budget", "pol_skill"}
    # Pages of one item: the pager follows the cursor.
    pager = client.list_policies(limit=1)
    assert len(pager.first_page().items) == 1
    assert [p.id for p in pager] == ["pol_budget", "pol_skill"]
    assert [p.id for p in client.list_policies(mode="shadow")] == ["pol_skill"]

    updated = client.update_policy("pol_budget", {**budget(2000), "name": "wider"}, expected_version=1)
    assert updated.version == 2 and updated.name == "wider"
    with pytest.raises(runguard.ConflictError) as race:
        client.update_policy("pol_budget", budget(3000), expected_version=1)
    assert race.value.code == "version_conflict" and race.value.details["current_version"] == 2
    assert client.get_policy("pol_budget", version=1).rule["max"] == 1000
    assert client.get_policy("pol_budget").version == 2

    pending = client.set_policy_mode("pol_skill", "pending", reason="review")
    assert pending.mode == "pending"
    confirmed = client.confirm_policy("pol_skill")
    assert confirmed.confirmations == 1 and confirmed.required >= 1
    audit = list(client.policy_audit("pol_skill"))
    assert audit[0].to == "shadow" and audit[1].from_ == "shadow" and audit[1].reason == "review"

    stats = client.policy_shadow_stats("pol_skill")
    assert stats.evaluations == 0 and stats.policy_id == "pol_skill"
    graduation = client.policy_graduation("pol_budget")
    assert graduation.status == "unproven" and not graduation.gate_passed

    with pytest.raises(runguard.NotFoundError):
        client.get_policy("pol_missing")
    with pytest.raises(runguard.BadRequestError) as bad:
        client.create_policy({"name": "x", "rule": {"kind": "budget", "metric": "tokens", "per": "run", "max": -1}})
    assert bad.value.field == "rule.max"


def test_runs_snapshots_and_decisions(client: runguard.Client) -> None:
    client.create_policy(budget(1000, warn_at=[50]))
    created = client.create_run("run-a", labels={"team": "search"}, api_endpoint="/search")
    assert created.status == "running" and created.snapshot.policy_count == 1
    assert created.decision.phase == "run_start" and created.decision.remaining.tokens == 1000
    # The same body again is the same run (idempotent creation).
    again = client.create_run("run-a", labels={"team": "search"}, api_endpoint="/search")
    assert again.decision.decision_id == created.decision.decision_id

    pre = client.send_step("run-a", {"index": 0, "phase": "pre", "skill": "search", "estimate": {"tokens": 100}})
    assert pre.action == "allow"
    post = client.send_step("run-a", {"index": 0, "phase": "post", "usage": {"tokens": 600}})
    assert post.action == "warn" and post.remaining.tokens == 400
    with pytest.raises(runguard.ConflictError) as order:
        client.send_step("run-a", {"index": 5, "phase": "pre"})
    assert order.value.code == "step_out_of_order"

    run = client.get_run("run-a")
    assert run.totals.tokens == 600 and run.next.index == 1 and run.labels == {"team": "search"}
    assert run.steps_seen == 1
    decisions = list(client.list_decisions("run-a", limit=2))
    assert [d.phase for d in decisions] == ["run_start", "pre", "post"]

    snapshot = client.get_snapshot(created.snapshot.id)
    assert snapshot.verified and snapshot.hash == created.snapshot.hash
    assert snapshot.policies is not None and snapshot.policies[0].id == "pol_budget"

    client.create_run("run-b", labels={"team": "ads"})
    assert [r.run_id for r in client.list_runs(limit=1)] == ["run-a", "run-b"]
    (listed,) = client.list_runs(label="team=search", status="running")
    assert listed.run_id == "run-a" and listed.steps_seen == 1 and listed.labels == {"team": "search"}
    assert [r.run_id for r in client.list_runs(label="team")] == ["run-a", "run-b"]
    assert list(client.list_runs(since="2100-01-01T00:00:00Z")) == []
    with pytest.raises(runguard.BadRequestError) as bad:
        list(client.list_runs(status="done"))
    assert bad.value.field == "status"

    ended = client.end_run("run-a", "succeeded")
    assert ended.run.status == "succeeded" and ended.incident_id is None
    with pytest.raises(runguard.NotFoundError):
        client.get_run("run-missing")


def test_records_regret_and_learning_loop(node: Node, tenant: str) -> None:
    with runguard.Client(node.base_url, token="admin-secret", tenant=tenant, retry=FAST) as client:
        client.create_policy(budget(100))
        run = client.start_run()
        with pytest.raises(runguard.Blocked) as blocked:
            with run.step("search", estimate=10) as step:
                step.report(500)
        record_id = blocked.value.record_id
        assert record_id is not None

        records = list(client.list_prevention_records(run_id=run.run_id))
        assert [r.id for r in records] == [record_id]
        record = client.get_prevention_record(record_id)
        assert record.policy_id == "pol_budget" and not record.is_simulated
        assert list(client.list_prevention_records(simulated=True)) == []

        regret = client.regret(record_id, 2, note="a false positive")
        assert regret.regret.severity == 2 and regret.policy.policy_id == "pol_budget"
        with pytest.raises(runguard.ConflictError):
            client.regret(record_id, 2)

        failed = fail_three_times(client)
        incidents = list(client.list_incidents())
        assert {i.run_id for i in incidents} == set(failed)
        patterns = list(client.list_patterns())
        assert len(patterns) == 1 and patterns[0].occurrences == 3
        pattern = client.get_pattern(patterns[0].id)
        assert pattern.signature.api_endpoint == "/v1/users/{id}"
        proposed = client.propose_pattern(pattern.id)
        assert proposed.mode == "shadow" and proposed.rule["kind"] == "pattern"

        graduation = client.tenant_graduation()
        assert graduation.tenant_id == tenant and graduation.gates.prevention.counted_preventions == 1

        simulation = client.simulate(
            [{"name": "tight", "rule": {"kind": "budget", "metric": "tokens", "per": "run", "max": 1}}],
            [run.run_id],
        )
        assert simulation.results[0].run_id == run.run_id and simulation.results[0].differences >= 1


def test_operations_endpoints(client: runguard.Client) -> None:
    assert client.health().status == "ok"
    assert client.ready()
    assert "# TYPE" in client.metrics()
    assert client.openapi()["openapi"].startswith("3.")


def test_roles_tokens_and_tenants(node: Node) -> None:
    with runguard.Client(node.base_url, token=ACME_WORKER.secret, retry=FAST) as worker:
        with pytest.raises(runguard.PermissionDeniedError):
            list(worker.list_policies())
        run = worker.create_run()
        assert worker.get_run(run.run_id).tenant_id == "acme"
    with runguard.Client(node.base_url, token="wrong", retry=FAST) as stranger:
        with pytest.raises(runguard.AuthenticationError):
            stranger.create_run()
    with runguard.Client(node.base_url, token=ACME_OPERATOR.secret, tenant="beta", retry=FAST) as operator:
        with pytest.raises(runguard.PermissionDeniedError):
            operator.create_run()
    # Confirmations count distinct operators by token name.
    with runguard.Client(node.base_url, token=ACME_OPERATOR.secret, retry=FAST) as one:
        one.create_policy({"name": "p", "mode": "pending", "rule": {"kind": "skill", "deny": ["x"]}, "id": "pol_c"})
        assert one.confirm_policy("pol_c").confirmations == 1
        assert one.confirm_policy("pol_c").confirmations == 1
    with runguard.Client(node.base_url, token=ACME_OPERATOR_2.secret, retry=FAST) as two:
        assert two.confirm_policy("pol_c").confirmations >= 2


@pytest.mark.anyio
async def test_async_client_covers_the_same_calls(aclient: runguard.AsyncClient) -> None:
    await aclient.create_policy(budget(1000))
    await aclient.create_policy({"id": "pol_other", "name": "o", "rule": {"kind": "skill", "deny": ["rm"]}})
    ids = [p.id async for p in aclient.list_policies(limit=1)]
    assert ids == ["pol_budget", "pol_other"]
    created = await aclient.create_run("run-async")
    decision = await aclient.send_step("run-async", {"index": 0, "phase": "post", "usage": {"tokens": 5}})
    assert decision.action == "allow"
    decisions = [d async for d in aclient.list_decisions("run-async")]
    assert len(decisions) == 2
    assert (await aclient.get_run("run-async")).totals.tokens == 5
    assert [r.run_id async for r in aclient.list_runs(status="running")] == ["run-async"]
    assert (await aclient.get_snapshot(created.snapshot.id)).verified
    assert (await aclient.end_run("run-async")).run.status == "succeeded"
    assert (await aclient.health()).status == "ok" and await aclient.ready()


def day_budget(max_tokens: int, policy_id: str = "pol_day") -> dict[str, object]:
    return {
        "id": policy_id,
        "name": "tenant tokens a day",
        "rule": {"kind": "budget", "metric": "tokens", "per": "tenant", "period": "day", "max": max_tokens},
    }


def test_policy_usage_sums_the_tenants_runs_this_day(client: runguard.Client) -> None:
    client.create_policy(day_budget(100))
    for tokens in (30, 40):
        run = client.start_run()
        client.send_step(run.run_id, {"index": 0, "phase": "post", "usage": {"tokens": tokens}})
    usage = client.policy_usage("pol_day")
    assert (usage.period, usage.used, usage.max) == ("day", 70, 100)
    assert usage.period_start.endswith("T00:00:00Z") or "T00:00:00" in usage.period_start
    client.create_policy(budget(10))
    with pytest.raises(runguard.ConflictError):
        client.policy_usage("pol_budget")
    with pytest.raises(runguard.NotFoundError):
        client.policy_usage("pol_missing")


@pytest.mark.anyio
async def test_async_policy_usage(aclient: runguard.AsyncClient) -> None:
    await aclient.create_policy(day_budget(50))
    await aclient.create_run("run-day")
    await aclient.send_step("run-day", {"index": 0, "phase": "post", "usage": {"tokens": 5}})
    assert (await aclient.policy_usage("pol_day")).used == 5
