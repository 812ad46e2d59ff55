"""Parent and child runs (sub-agents) through the SDK, against the real node."""

from __future__ import annotations

import pytest

import runguard

from conftest import budget


def test_children_count_against_their_parent(client: runguard.Client) -> None:
    client.create_policy(budget(100))
    parent = client.start_run()
    children = [client.start_run(parent=parent) for _ in range(3)]
    for child in children[:2]:
        client.send_step(child.run_id, {"index": 0, "phase": "pre"})
        assert client.send_step(child.run_id, {"index": 0, "phase": "post", "usage": {"tokens": 40}}).action == "allow"
    last = children[2].run_id
    client.send_step(last, {"index": 0, "phase": "pre"})
    decision = client.send_step(last, {"index": 0, "phase": "post", "usage": {"tokens": 40}})
    assert decision.action == "block"
    assert [v.run_id for v in decision.violations if v.action == "block"] == [parent.run_id]

    stopped = client.get_run(last)
    assert stopped.parent_run_id == parent.run_id
    assert stopped.violation_run_id == parent.run_id and stopped.termination_reason == "policy_block"
    shown = client.get_run(parent.run_id)
    assert shown.children == 3 and shown.rolled_up_totals is not None
    assert shown.rolled_up_totals.tokens == 120 and shown.totals.tokens == 0 and shown.parent_run_id is None

    ended = parent.end()
    assert ended.run.rolled_up_totals is not None and ended.run.rolled_up_totals.tokens == 120
    with pytest.raises(runguard.ConflictError) as refused:
        client.create_run(parent_run_id=parent.run_id)
    assert refused.value.code == "parent_not_running"
    with pytest.raises(runguard.ConflictError) as refused:
        client.send_step(children[0].run_id, {"index": 1, "phase": "pre"})
    assert refused.value.code == "parent_not_running"
    assert client.get_run(children[0].run_id).termination_reason == "parent_stopped"
    with pytest.raises(runguard.NotFoundError):
        client.create_run(parent_run_id="run-missing")
