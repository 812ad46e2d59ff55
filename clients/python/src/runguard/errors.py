"""Typed exceptions: the node's error body as an exception per status, and the step outcomes."""

from __future__ import annotations

from typing import Any

from .models import Decision


class RunguardError(Exception):
    """Base of every exception this package raises."""


class TransportError(RunguardError):
    """The request did not get an HTTP answer (connection refused or dropped, timeout)."""


class APIError(RunguardError):
    """The node answered with an error body ``{"error": {"code", "message", "details"}}``."""

    status: int
    code: str
    message: str
    details: dict[str, Any]
    retry_after_ms: int | None

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.retry_after_ms = retry_after_ms


class BadRequestError(APIError):
    """400: invalid JSON or field; :attr:`field` is the JSON path the node names."""

    @property
    def field(self) -> str | None:
        value = self.details.get("field")
        return value if isinstance(value, str) else None


class AuthenticationError(APIError):
    """401: no or unknown token."""


class PermissionDeniedError(APIError):
    """403: the token's role is too low, or `X-Tenant` from a non-admin."""


class NotFoundError(APIError):
    """404: unknown, or another tenant's."""


class MethodNotAllowedError(APIError):
    """405."""


class RequestTimeoutError(APIError):
    """408: the body did not arrive in time."""


class ConflictError(APIError):
    """409: order, stopped run, idempotency mismatch, version race, duplicate."""

    @property
    def decision(self) -> Decision | None:
        """The stopping decision that `run_not_running` carries, if any."""
        raw = self.details.get("decision")
        return Decision.model_validate(raw) if isinstance(raw, dict) else None


class PayloadTooLargeError(APIError):
    """413."""


class UnsupportedMediaTypeError(APIError):
    """415."""


class OverloadedError(APIError):
    """429: too many calls in flight for the run (retried)."""


class UnavailableError(APIError):
    """5xx: the store cannot commit, the node is overloaded or failing (retried)."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    408: RequestTimeoutError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    429: OverloadedError,
}


def error_for(
    status: int, code: str, message: str, details: dict[str, Any] | None, retry_after_ms: int | None
) -> APIError:
    """The exception class for an HTTP status."""
    cls = _BY_STATUS.get(status) or (UnavailableError if status >= 500 else APIError)
    return cls(status, code, message, details, retry_after_ms)


class StepRefused(RunguardError):
    """A step may not go ahead: base of :class:`Blocked` and :class:`Throttled`."""

    decision: Decision | None

    def __init__(self, message: str, decision: Decision | None) -> None:
        super().__init__(message)
        self.decision = decision


class Blocked(StepRefused):
    """The step is blocked: by a decision, or because no decision could be had (fail closed).

    ``decision`` is the node's blocking decision (``None`` when the node could not be reached or answered
    an error, with the error as ``cause``); ``record_id`` is its prevention record, when one was written.
    """

    cause: RunguardError | None

    def __init__(self, message: str, decision: Decision | None = None, cause: RunguardError | None = None) -> None:
        super().__init__(message, decision)
        self.cause = cause

    @property
    def record_id(self) -> str | None:
        return self.decision.prevention_record_id if self.decision else None

    @property
    def reason(self) -> str:
        return self.decision.reason if self.decision else str(self)


class Throttled(StepRefused):
    """A rate rule says wait ``retry_after_ms`` and send the same step again."""

    decision: Decision

    def __init__(self, message: str, decision: Decision) -> None:
        super().__init__(message, decision)
        self.decision = decision

    @property
    def retry_after_ms(self) -> int:
        return self.decision.retry_after_ms or 0


__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "Blocked",
    "ConflictError",
    "MethodNotAllowedError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RequestTimeoutError",
    "RunguardError",
    "StepRefused",
    "Throttled",
    "TransportError",
    "UnavailableError",
    "UnsupportedMediaTypeError",
    "error_for",
]
