"""The examples in examples/python run against a real node (so they cannot rot)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from node import ADMIN, WORKSPACE, Node

EXAMPLES = sorted(p for p in (WORKSPACE / "examples" / "python").glob("*.py") if not p.name.startswith("_"))


def test_there_are_three_examples() -> None:
    assert {p.name for p in EXAMPLES} == {"plain_loop.py", "langchain_agent.py", "openai_agents_agent.py"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_and_is_stopped_with_a_record(example: Path, node: Node, tenant: str) -> None:
    env = {
        **os.environ,
        "RUNGUARD_URL": node.base_url,
        "RUNGUARD_TOKEN": ADMIN.secret,
        "RUNGUARD_TENANT": tenant,
        "OPENAI_AGENTS_DISABLE_TRACING": "1",
    }
    done = subprocess.run(
        [sys.executable, str(example)], env=env, capture_output=True, text=True, timeout=120, cwd=example.parent
    )
    assert done.returncode == 0, done.stderr
    assert "prevention record prv_" in done.stdout, done.stdout + done.stderr
