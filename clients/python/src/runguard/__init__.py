"""runguard: a Python client for the runguard policy prevention node.

``Client``/``AsyncClient`` call every endpoint; ``client.run()`` is the step protocol done right (admission
before each step, report after it, fail closed). Framework guards live in ``runguard.langchain`` and
``runguard.openai_agents`` (extras ``runguard[langchain]``, ``runguard[openai-agents]``).
"""

from . import models
from ._arun import AsyncAdmission, AsyncRun, AsyncStepGuard
from ._async_client import AsyncClient, AsyncPager
from ._base import RetryPolicy, Stats
from ._client import Client, Pager
from ._ops import Page
from ._run import Run, StepGuard
from .errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    Blocked,
    ConflictError,
    MethodNotAllowedError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RequestTimeoutError,
    RunguardError,
    StepRefused,
    Throttled,
    TransportError,
    UnavailableError,
    UnsupportedMediaTypeError,
)
from .models import Decision, Remaining
from .pricing import Price, PriceTable, Usage, approx_tokens

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "AsyncAdmission",
    "AsyncClient",
    "AsyncPager",
    "AsyncRun",
    "AsyncStepGuard",
    "AuthenticationError",
    "BadRequestError",
    "Blocked",
    "Client",
    "ConflictError",
    "Decision",
    "MethodNotAllowedError",
    "NotFoundError",
    "OverloadedError",
    "Page",
    "Pager",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Price",
    "PriceTable",
    "Remaining",
    "RequestTimeoutError",
    "RetryPolicy",
    "Run",
    "RunguardError",
    "Stats",
    "StepGuard",
    "StepRefused",
    "Throttled",
    "TransportError",
    "UnavailableError",
    "UnsupportedMediaTypeError",
    "Usage",
    "__version__",
    "approx_tokens",
    "models",
]
