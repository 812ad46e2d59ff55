"""The step protocol's rules, shared by the sync and async runs (docs/api.md).

- A step is an admission (`pre`, with the estimate) and a report (`post`, with the usage), strictly in
  order: the post of step n comes before anything of step n+1, so a run admits one step at a time.
- Any non-2xx answer to a step call is a block (fail closed). Transport errors, 429 and 5xx are first
  retried by re-sending the identical bytes; when retries run out the step is blocked, unless the caller
  chose ``on_unavailable="allow"`` — then it goes ahead, a warning is logged and ``Stats.fail_opens``
  counts it, and the unacknowledged post is re-sent before the run's next call so the node still learns
  the usage.
- ``throttle`` does not advance the run: the same call is sent again after ``retry_after_ms``, for at most
  ``max_throttle_wait_s`` in all; past that the step raises :class:`~runguard.Throttled`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._base import OnUnavailable, clip, drop_none, encode, logger
from .errors import APIError, Blocked, ConflictError, RunguardError, TransportError, UnavailableError
from .models import Decision, Remaining
from .pricing import Usage

UsageLike = Usage | Mapping[str, int] | int | None

# How long a step waits for the run's previous step to be reported before it names the problem.
OPEN_STEP_WAIT_S = 300.0

# The node's default limits on a step's short fields and on its texts, in bytes (docs/operations.md).
MAX_FIELD_BYTES = 2048
MAX_TEXT_BYTES = 256 * 1024
MAX_INPUT_KEYS = 256


@dataclass(frozen=True)
class StepOptions:
    """How a run reacts to what is not a plain allow."""

    on_unavailable: OnUnavailable = "block"
    wait_on_throttle: bool = False
    max_throttle_wait_s: float = 30.0


@dataclass
class RunState:
    """What a run tracks between calls."""

    run_id: str
    next_index: int = 0
    last_decision: Decision | None = None
    # Post bodies the node has not acknowledged (only after a fail-open), oldest first.
    unsettled: list[bytes] = field(default_factory=list)
    warnings: list[Decision] = field(default_factory=list)
    ended: bool = False

    @property
    def remaining(self) -> Remaining | None:
        return self.last_decision.remaining if self.last_decision else None


def pre_body(
    index: int,
    *,
    skill: str | None,
    api_endpoint: str | None,
    input_keys: Sequence[str] | None,
    input_text: str | None,
    estimate_tokens: int | None,
    estimate_cost_micros: int | None,
) -> bytes:
    # Texts and names past the node's default limits are cut rather than sent to a certain 400 (a block).
    estimate = drop_none({"tokens": estimate_tokens, "cost_micros": estimate_cost_micros})
    return encode(
        drop_none(
            {
                "index": index,
                "phase": "pre",
                "skill": _short(skill),
                "api_endpoint": _short(api_endpoint),
                "input_keys": [clip(k, MAX_FIELD_BYTES) for k in input_keys][:MAX_INPUT_KEYS]
                if input_keys is not None
                else None,
                "input_text": clip(input_text, MAX_TEXT_BYTES) if input_text is not None else None,
                "estimate": estimate or None,
            }
        )
    )


def _short(value: str | None) -> str | None:
    return clip(value, MAX_FIELD_BYTES) if value is not None else None


def usage_of(usage: UsageLike, duration_ms: int | None) -> dict[str, int]:
    if usage is None:
        value = Usage()
    elif isinstance(usage, int):
        value = Usage(tokens=usage)
    elif isinstance(usage, Usage):
        value = usage
    else:
        value = Usage(
            tokens=int(usage.get("tokens", 0)),
            cost_micros=int(usage.get("cost_micros", 0)),
            duration_ms=usage.get("duration_ms"),
        )
    body = value.body()
    if "duration_ms" not in body and duration_ms is not None:
        body["duration_ms"] = duration_ms
    return body


def error_of(error: BaseException | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A step or run error body (`type`, `code`, `status`, `message`) from an exception or a mapping."""
    if error is None:
        return None
    if isinstance(error, Mapping):
        fields = drop_none({k: error.get(k) for k in ("type", "code", "status", "message")})
        return {k: clip(v, MAX_FIELD_BYTES) if isinstance(v, str) else v for k, v in fields.items()}
    status = getattr(error, "status_code", None) or getattr(error, "status", None)
    code = getattr(error, "code", None)
    return drop_none(
        {
            "type": type(error).__name__,
            "code": code if isinstance(code, str) else None,
            "status": status if isinstance(status, int) and 100 <= status <= 599 else None,
            # The node limits text fields; a message is a summary, not a dump.
            "message": clip(str(error), MAX_FIELD_BYTES) or None,
        }
    )


def post_body(index: int, *, usage: dict[str, int], output_text: str | None, error: dict[str, Any] | None) -> bytes:
    return encode(
        drop_none(
            {
                "index": index,
                "phase": "post",
                "usage": usage,
                "output_text": clip(output_text, MAX_TEXT_BYTES) if output_text is not None else None,
                "error": error,
            }
        )
    )


def as_block(run_id: str, error: RunguardError) -> Blocked:
    """Any failed step call as a block; a stopped run's 409 carries the decision that stopped it."""
    if isinstance(error, ConflictError) and error.decision is not None:
        decision = error.decision
        return Blocked(f"run `{run_id}` is stopped: {decision.reason}", decision, cause=error)
    return Blocked(f"runguard gave no decision for run `{run_id}`; failing closed: {error}", cause=error)


def unavailable(error: RunguardError) -> bool:
    """The node could not be asked: what ``on_unavailable`` governs (a 4xx answer is not)."""
    return isinstance(error, (TransportError, UnavailableError)) or (
        isinstance(error, APIError) and error.status == 429
    )


def log_fail_open(run_id: str, index: int, phase: str, error: RunguardError) -> None:
    logger.warning(
        "runguard unavailable; the step goes ahead because on_unavailable='allow'",
        extra={"run_id": run_id, "step_index": index, "phase": phase, "error": str(error)},
    )


def log_warn(decision: Decision) -> None:
    logger.warning(
        "runguard warns: %s",
        decision.reason,
        extra={"run_id": decision.run_id, "step_index": decision.step_index, "decision_id": decision.decision_id},
    )


class ThrottleClock:
    """Bounds the total time one call may wait on throttles."""

    def __init__(self, options: StepOptions) -> None:
        self._options = options
        self._start = time.monotonic()

    def wait_for(self, decision: Decision) -> float | None:
        """Seconds to wait before the re-send, or ``None`` when the caller must get :class:`Throttled`."""
        if not self._options.wait_on_throttle:
            return None
        delay = (decision.retry_after_ms or 0) / 1000.0
        if time.monotonic() - self._start + delay > self._options.max_throttle_wait_s:
            return None
        return delay
