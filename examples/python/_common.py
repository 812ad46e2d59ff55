"""Where the examples find the node: ``RUNGUARD_URL`` (default ``http://127.0.0.1:7070``, the node's
development mode), with ``RUNGUARD_TOKEN`` and ``RUNGUARD_TENANT`` when the node has tokens."""

from __future__ import annotations

import os

import runguard

BUDGET = {
    "id": "pol_example_budget",
    "name": "Example run token budget",
    "rule": {"kind": "budget", "metric": "tokens", "per": "run", "max": 1200, "warn_at": [50]},
}


def connect() -> runguard.Client:
    return runguard.Client(
        os.environ.get("RUNGUARD_URL", "http://127.0.0.1:7070"),
        token=os.environ.get("RUNGUARD_TOKEN"),
        tenant=os.environ.get("RUNGUARD_TENANT"),
    )


def ensure_budget(client: runguard.Client) -> None:
    """A 1200-token run budget (created once; a second run of the example finds it in place)."""
    try:
        client.create_policy(BUDGET)
    except runguard.ConflictError:
        pass
