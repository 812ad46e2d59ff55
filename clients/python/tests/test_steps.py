"""The step protocol against the real node: allow, warn tier, throttle, block with record, identical
re-send after a dropped connection, node down, store failure — fail closed unless told otherwise."""

from __future__ import annotations

import logging
import socket

import httpx
import pytest

import runguard

from conftest import FAST, budget
from node import ADMIN, Node
from proxy import DroppingProxy


def test_allowed_steps_report_usage_and_remaining(client: runguard.Client) -> None:
    client.create_policy(budget(1000))
    with client.run(labels={"agent": "plain"}) as run:
        with run.step("search", estimate=200, input_keys=["q"], input_text="what is runguard") as step:
            assert step.decision is not None and step.decision.action == "allow"
            assert step.remaining is not None and step.remaining.tokens == 1000
            assert step.clamp(4096) == 1000
            decision = step.report(runguard.Usage(tokens=300, cost_micros=12), output_text="an answer")
        assert decision is not None and decision.remaining.tokens == 700
        assert run.remaining is not None and run.remaining.tokens == 700
        with run.step("summarise"):
            pass  # reported on exit with zero usage and the elapsed time
        run_id = run.run_id
    finished = client.get_run(run_id)
    assert finished.status == "succeeded" and finished.totals.tokens == 300 and finished.totals.steps == 2


def test_warn_tier_is_logged_and_kept(client: runguard.Client, caplog: pytest.LogCaptureFixture) -> None:
    client.create_policy(budget(1000, warn_at=[50]))
    with caplog.at_level(logging.WARNING, logger="runguard"), client.run() as run:
        with run.step("a") as step:
            step.report(600)
        assert [w.action for w in run.warnings] == ["warn"]
    assert "50% warn tier" in caplog.text


def test_block_before_the_step_runs_with_prevention_record(client: runguard.Client) -> None:
    client.create_policy(budget(1000))
    executed = []
    with pytest.raises(runguard.Blocked) as blocked:
        with client.run() as run:
            with run.step("a", estimate=100) as step:
                step.report(900)
            with run.step("b", estimate=500):  # 900 + 500 > 1000: refused at admission
                executed.append("b")
    assert executed == []
    assert blocked.value.decision is not None and blocked.value.decision.phase == "pre"
    record = client.get_prevention_record(blocked.value.record_id or "")
    assert record.run_id == run.run_id and record.step_index == 1
    stopped = client.get_run(run.run_id)
    assert stopped.status == "stopped" and stopped.termination_reason == "policy_block"
    # A later step of the stopped run is a block carrying the stopping decision.
    with pytest.raises(runguard.Blocked) as again:
        run.step("c")
    assert again.value.record_id == blocked.value.record_id


def test_a_failing_block_ends_the_run_failed_with_the_error(client: runguard.Client) -> None:
    with pytest.raises(ValueError):
        with client.run() as run:
            with run.step("parse"):
                raise ValueError("bad input")
    assert client.get_run(run.run_id).status == "failed"
    assert [d.phase for d in client.list_decisions(run.run_id)][-2:] == ["post", "run_end"]
    # The step's error went with its report: the failed run is an incident of that error.
    (incident,) = [i for i in client.list_incidents() if i.run_id == run.run_id]
    assert incident.error.type == "ValueError" and incident.signature.skill == "parse"


def test_throttle_waits_and_resends(client: runguard.Client) -> None:
    client.create_policy(
        {
            "id": "pol_rate",
            "name": "one step a second",
            "rule": {"kind": "rate", "metric": "steps", "max": 1, "window_s": 1},
        }
    )
    with client.run() as run:  # waiting is opt-in: by default the caller gets Throttled
        with run.step("a"):
            pass
        with pytest.raises(runguard.Throttled) as throttled:
            run.step("b")
        assert 0 < throttled.value.retry_after_ms <= 1000
    with client.run(wait_on_throttle=True, max_throttle_wait_s=5) as run:
        with run.step("a"):
            pass
        with run.step("b") as step:  # waits retry_after_ms, re-sends, admitted
            assert step.decision is not None and step.decision.action == "allow"


def test_identical_resend_after_a_dropped_connection_gets_the_same_decision(node: Node, tenant: str) -> None:
    proxy = DroppingProxy(node.base_url)
    try:
        with runguard.Client(proxy.base_url, token=ADMIN.secret, tenant=tenant, retry=FAST) as client:
            with client.run() as run:
                proxy.drop_steps = 1
                with run.step("search", estimate=10) as step:
                    pass
                assert step.decision is not None
                assert client.stats.retries == 1
                # The node saw the same bytes twice and answered the same decision.
                assert proxy.step_bodies[0] == proxy.step_bodies[1]
                decisions = [d for d in client.list_decisions(run.run_id) if d.phase == "pre"]
                assert [d.decision_id for d in decisions] == [step.decision.decision_id]
    finally:
        proxy.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_node_down_is_a_block() -> None:
    with runguard.Client(f"http://127.0.0.1:{free_port()}", retry=FAST) as client:
        with pytest.raises(runguard.Blocked) as blocked:
            with client.run():
                pass
        assert isinstance(blocked.value.cause, runguard.TransportError)
        assert blocked.value.decision is None and client.stats.retries == 3


def test_node_down_mid_run_blocks_or_fails_open_when_asked(
    fresh_node: Node, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    with runguard.Client(fresh_node.base_url, token=ADMIN.secret, tenant=tenant, retry=FAST) as client:
        closed = client.start_run()
        opened = client.start_run(on_unavailable="allow")
        with opened.step("a") as step:
            step.report(5)
        fresh_node.stop()
        with pytest.raises(runguard.Blocked) as blocked:
            closed.step("a")
        assert isinstance(blocked.value.cause, runguard.TransportError)

        with caplog.at_level(logging.WARNING, logger="runguard"):
            with opened.step("b") as step:
                step.report(7)
        assert step.failed_open and client.stats.fail_opens == 2  # the pre and the post
        assert "on_unavailable='allow'" in caplog.text

        # Back up (on a new port): the unacknowledged report is re-sent before the next step.
        fresh_node.start()
        client.base_url = fresh_node.base_url
        with opened.step("c") as step:
            assert not step.failed_open
        assert client.get_run(opened.run_id).totals.tokens == 12


def test_store_failure_503_is_retried_then_blocks(fresh_node: Node, tenant: str) -> None:
    with runguard.Client(fresh_node.base_url, token=ADMIN.secret, tenant=tenant, retry=FAST) as client:
        run = client.start_run()
        admin = httpx.Client(base_url=fresh_node.base_url, headers={"authorization": f"Bearer {ADMIN.secret}"})
        admin.post("/v1/faults/store", json={"commit_failure": True}).raise_for_status()
        with pytest.raises(runguard.Blocked) as blocked:
            run.step("a")
        assert isinstance(blocked.value.cause, runguard.UnavailableError)
        assert client.stats.retries == 3
        admin.post("/v1/faults/store", json={"commit_failure": False}).raise_for_status()
        # The refused call left no trace: the same step is admitted now.
        with run.step("a") as step:
            assert step.decision is not None and step.decision.action == "allow"
        run.end()


@pytest.mark.anyio
async def test_async_run_blocks_and_reports(aclient: runguard.AsyncClient) -> None:
    await aclient.create_policy(budget(100))
    with pytest.raises(runguard.Blocked) as blocked:
        async with aclient.run() as run:
            async with run.step("a", estimate=10) as step:
                await step.report(60)
            async with run.step("b", estimate=60):
                raise AssertionError("admitted over budget")
    assert blocked.value.record_id is not None
    assert (await aclient.get_run(run.run_id)).status == "stopped"


@pytest.mark.anyio
async def test_async_node_down_blocks_or_fails_open(fresh_node: Node, tenant: str) -> None:
    async with runguard.AsyncClient(fresh_node.base_url, token=ADMIN.secret, tenant=tenant, retry=FAST) as client:
        closed = await client.start_run()
        opened = await client.start_run(on_unavailable="allow")
        fresh_node.stop()
        with pytest.raises(runguard.Blocked) as blocked:
            await closed.step("a")
        assert isinstance(blocked.value.cause, runguard.TransportError)
        async with opened.step("a") as step:
            await step.report(3)
        assert step.failed_open and client.stats.fail_opens == 2
        fresh_node.start()
        client.base_url = fresh_node.base_url
        async with opened.step("b") as step:
            assert not step.failed_open
        assert (await client.get_run(opened.run_id)).totals.tokens == 3


@pytest.mark.anyio
async def test_async_resend_after_a_dropped_connection(node: Node, tenant: str) -> None:
    proxy = DroppingProxy(node.base_url)
    try:
        async with runguard.AsyncClient(proxy.base_url, token=ADMIN.secret, tenant=tenant, retry=FAST) as client:
            async with client.run() as run:
                proxy.drop_steps = 1
                step = await run.step("search", estimate=10)
                await step.report(4)
            assert client.stats.retries == 1 and proxy.step_bodies[0] == proxy.step_bodies[1]
            assert (await client.get_run(run.run_id)).totals.tokens == 4
    finally:
        proxy.close()
