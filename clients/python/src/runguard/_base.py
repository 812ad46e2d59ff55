"""What the sync and async clients share: request descriptions, encoding, error mapping and retry policy.

Each API operation is an :class:`Op` (method, path, query, body, how to parse the answer, whether it is
safe to send twice). The sync and async clients only differ in how they send one; everything else lives
here, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import httpx

from .errors import APIError, RunguardError, TransportError, error_for

logger = logging.getLogger("runguard")

T = TypeVar("T")

OnUnavailable = Literal["block", "allow"]

DEFAULT_BASE_URL = "http://127.0.0.1:7070"
USER_AGENT = "runguard-python"


def encode(body: Mapping[str, Any]) -> bytes:
    """Compact JSON; a Python mapping cannot carry duplicate keys, so neither can the body."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def clip(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8 (the node limits fields in bytes), on a character
    boundary."""
    data = text.encode("utf-8")
    return text if len(data) <= max_bytes else data[:max_bytes].decode("utf-8", errors="ignore")


def drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    """The node's absent and null are not always the same (a list field refuses null): omit unset ones."""
    return {key: value for key, value in values.items() if value is not None}


@dataclass(frozen=True)
class Op(Generic[T]):
    """One HTTP call and how to read its answer."""

    method: str
    path: str
    parse: Callable[[Any], T]
    params: Mapping[str, str] | None = None
    body: bytes | None = None
    # Safe to send again after a transport error that may have happened after the node got it.
    idempotent: bool = True
    # The answer is text, not JSON (`/metrics`).
    text: bool = False


def path_segment(value: str) -> str:
    """An id as one path segment (ids never need it, but a caller's typo must not change the route)."""
    from urllib.parse import quote

    return quote(value, safe="")


@dataclass
class Stats:
    """Counters a caller can read or export: fail-opens are never silent."""

    retries: int = 0
    fail_opens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def count_fail_open(self) -> None:
        with self._lock:
            self.fail_opens += 1


@dataclass(frozen=True)
class RetryPolicy:
    """Retries for transport errors, 429 and 5xx: exponential backoff with jitter, ``Retry-After`` honoured
    up to ``max_delay`` seconds."""

    max_retries: int = 3
    base_delay: float = 0.1
    max_delay: float = 2.0

    def delay(self, attempt: int, error: RunguardError) -> float:
        hinted = error.retry_after_ms if isinstance(error, APIError) else None
        if hinted is not None:
            return min(hinted / 1000.0, self.max_delay)
        backoff: float = self.base_delay * (2**attempt)
        return min(backoff * (0.5 + random.random() / 2), self.max_delay)


def retryable(error: RunguardError, op: Op[Any]) -> bool:
    """Whether sending ``op`` again may help. A refused call is never applied, so 429 and 5xx
    are always safe to re-send; a transport error is, for a call that may have arrived, only when the call
    is idempotent (step calls are: the node answers an identical re-send with the same decision)."""
    if isinstance(error, APIError):
        return error.status == 429 or error.status >= 500 or error.status == 408
    if isinstance(error, TransportError):
        return op.idempotent or isinstance(error.__cause__, (httpx.ConnectError, httpx.ConnectTimeout))
    return False


def headers(token: str | None, tenant: str | None) -> dict[str, str]:
    values = {"accept": "application/json", "user-agent": USER_AGENT}
    if token is not None:
        values["authorization"] = f"Bearer {token}"
    if tenant is not None:
        values["x-tenant"] = tenant
    return values


def request_headers(op: Op[Any]) -> dict[str, str]:
    # The node requires this media type on every body (415 otherwise).
    return {"content-type": "application/json"} if op.body is not None else {}


def _retry_after_ms(response: httpx.Response) -> int | None:
    raw = response.headers.get("retry-after")
    if raw is None:
        return None
    try:
        return int(float(raw) * 1000)
    except ValueError:
        return None


def read_response(op: Op[T], response: httpx.Response) -> T:
    """The parsed answer, or the node's error as a typed exception."""
    if 200 <= response.status_code < 300:
        if op.text:
            return op.parse(response.text)
        try:
            payload = response.json()
        except ValueError as err:
            raise APIError(response.status_code, "invalid_response", "the node's answer is not JSON") from err
        return op.parse(payload)
    code, message, details = "http_error", response.reason_phrase or "error", {}
    try:
        payload = response.json()
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict):
            code = str(error.get("code", code))
            message = str(error.get("message", message))
            raw_details = error.get("details")
            details = raw_details if isinstance(raw_details, dict) else {}
    except ValueError:
        pass
    raise error_for(response.status_code, code, message, details, _retry_after_ms(response))


def transport_error(op: Op[Any], err: httpx.HTTPError) -> TransportError:
    wrapped = TransportError(f"{op.method} {op.path}: {type(err).__name__}: {err}")
    wrapped.__cause__ = err
    return wrapped


def log_retry(op: Op[Any], error: RunguardError, attempt: int, delay: float) -> None:
    logger.info(
        "runguard call failed, retrying with the identical body",
        extra={"method": op.method, "path": op.path, "attempt": attempt + 1, "delay_s": delay, "error": str(error)},
    )
