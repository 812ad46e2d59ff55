"""Fixtures: a real node per session (and fresh ones on demand), a tenant per test, clients."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

import runguard

from node import ADMIN, Node

# Nothing in these tests may reach beyond loopback: the frameworks must not look for real credentials or
# send traces.
os.environ.setdefault("OPENAI_API_KEY", "test-not-a-key")
os.environ["OPENAI_AGENTS_DISABLE_TRACING"] = "1"
os.environ.setdefault("LANGSMITH_TRACING", "false")
os.environ.setdefault("LANGCHAIN_TRACING_V2", "false")

FAST = runguard.RetryPolicy(max_retries=3, base_delay=0.01, max_delay=0.05)


@pytest.fixture(scope="session")
def node() -> Iterator[Node]:
    started = Node("fault_injection = false")
    yield started
    started.close()


@pytest.fixture
def fresh_node() -> Iterator[Node]:
    """A node of the test's own, with store fault injection on."""
    started = Node("fault_injection = true")
    yield started
    started.close()


@pytest.fixture
def tenant() -> str:
    """A tenant of the test's own, so policies of one test never bind another's runs."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client(node: Node, tenant: str) -> Iterator[runguard.Client]:
    with runguard.Client(node.base_url, token=ADMIN.secret, tenant=tenant, retry=FAST) as c:
        yield c


@pytest.fixture
async def aclient(node: Node, tenant: str) -> AsyncIterator[runguard.AsyncClient]:
    async with runguard.AsyncClient(node.base_url, token=ADMIN.secret, tenant=tenant, retry=FAST) as c:
        yield c


def budget(max_tokens: int, *, warn_at: list[int] | None = None, policy_id: str = "pol_budget") -> dict[str, object]:
    return {
        "id": policy_id,
        "name": "run token budget",
        "rule": {"kind": "budget", "metric": "tokens", "per": "run", "max": max_tokens, "warn_at": warn_at or []},
    }


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
