"""The synchronous client."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

from . import _ops
from . import models as m
from ._base import (
    DEFAULT_BASE_URL,
    OnUnavailable,
    Op,
    RetryPolicy,
    Stats,
    encode,
    headers,
    log_retry,
    read_response,
    request_headers,
    retryable,
    transport_error,
)
from ._run import Run
from ._steps import StepOptions, as_block, error_of, log_fail_open, unavailable
from .errors import Blocked, RunguardError

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class Pager(Generic[M]):
    """A list endpoint: iterate it for every item across pages (fetched lazily by cursor)."""

    def __init__(self, client: Client, make: _ops.PageOp[M]) -> None:
        self._client = client
        self._make = make

    def pages(self) -> Iterator[_ops.Page[M]]:
        cursor: str | None = None
        while True:
            page = self._client._call(self._make(cursor))
            yield page
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def first_page(self) -> _ops.Page[M]:
        return self._client._call(self._make(None))

    def __iter__(self) -> Iterator[M]:
        for page in self.pages():
            yield from page.items


class Client:
    """A runguard node over HTTP (sync). Thread-safe; close it (or use ``with``) to free connections.

    ``on_unavailable`` is the default for runs: ``"block"`` (fail closed) or ``"allow"``.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        token: str | None = None,
        tenant: str | None = None,
        timeout: float | httpx.Timeout = 15.0,
        retry: RetryPolicy | None = None,
        on_unavailable: OnUnavailable = "block",
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.on_unavailable: OnUnavailable = on_unavailable
        self.stats = Stats()
        self._http = http_client or httpx.Client(timeout=timeout)
        self._headers = headers(token, tenant)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, op: Op[T]) -> T:
        attempt = 0
        while True:
            try:
                try:
                    response = self._http.request(
                        op.method,
                        self.base_url + op.path,
                        params=op.params,
                        content=op.body,
                        headers={**self._headers, **request_headers(op)},
                    )
                except httpx.HTTPError as err:
                    raise transport_error(op, err) from err
                return read_response(op, response)
            except RunguardError as err:
                if attempt >= self.retry.max_retries or not retryable(err, op):
                    raise
                delay = self.retry.delay(attempt, err)
                log_retry(op, err, attempt, delay)
                self.stats.count_retry()
                time.sleep(delay)
                attempt += 1

    # runs and steps

    @contextmanager
    def run(
        self,
        run_id: str | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        api_endpoint: str | None = None,
        parent: str | Run | None = None,
        on_unavailable: OnUnavailable | None = None,
        wait_on_throttle: bool = False,
        max_throttle_wait_s: float = 30.0,
    ) -> Iterator[Run]:
        """Creates a run and ends it on exit: `succeeded`, or `failed` with the error when the block raises.

        The run id is generated here when not given, so a re-sent creation is idempotent.
        """
        run = self.start_run(
            run_id,
            labels=labels,
            api_endpoint=api_endpoint,
            parent=parent,
            on_unavailable=on_unavailable,
            wait_on_throttle=wait_on_throttle,
            max_throttle_wait_s=max_throttle_wait_s,
        )
        try:
            yield run
        except BaseException as exc:
            _end_quietly(run, "failed", exc)
            raise
        _end_quietly(run, "succeeded", None)

    def start_run(
        self,
        run_id: str | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        api_endpoint: str | None = None,
        parent: str | Run | None = None,
        on_unavailable: OnUnavailable | None = None,
        wait_on_throttle: bool = False,
        max_throttle_wait_s: float = 30.0,
    ) -> Run:
        """Creates a run without a ``with`` block; call :meth:`Run.end` yourself."""
        options = StepOptions(on_unavailable or self.on_unavailable, wait_on_throttle, max_throttle_wait_s)
        run_id = run_id or f"run-{uuid.uuid4().hex}"
        parent_id = parent.run_id if isinstance(parent, Run) else parent
        try:
            created = self.create_run(run_id, labels=labels, api_endpoint=api_endpoint, parent_run_id=parent_id)
        except RunguardError as err:
            if options.on_unavailable == "allow" and unavailable(err):
                self.stats.count_fail_open()
                log_fail_open(run_id, 0, "run_start", err)
                return Run(self, run_id, None, options)
            raise as_block(run_id, err) from err
        if created.decision.action == "block":
            raise Blocked(f"run `{run_id}` is blocked at start: {created.decision.reason}", created.decision)
        return Run(self, run_id, created, options)

    def create_run(
        self,
        run_id: str | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        api_endpoint: str | None = None,
        parent_run_id: str | None = None,
    ) -> m.RunCreated:
        return self._call(_ops.create_run(run_id or f"run-{uuid.uuid4().hex}", labels, api_endpoint, parent_run_id))

    def get_run(self, run_id: str) -> m.Run:
        return self._call(_ops.get_run(run_id))

    def send_step(self, run_id: str, call: Mapping[str, Any]) -> m.Decision:
        """A raw step call (the step protocol is :meth:`run`): the decision, or the node's error raised."""
        return self._call(_ops.step(run_id, encode(call)))

    def end_run(
        self, run_id: str, outcome: str = "succeeded", error: Mapping[str, Any] | BaseException | None = None
    ) -> m.RunEnded:
        return self._call(_ops.end_run(run_id, outcome, error_of(error)))

    def list_runs(
        self,
        *,
        status: str | None = None,
        label: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int | None = None,
    ) -> Pager[m.Run]:
        """The tenant's runs by run id, narrowed by ``status``, a ``label`` (``"key"`` or ``"key=value"``)
        and creation time (``since`` inclusive, ``until`` exclusive; RFC 3339)."""
        return Pager(self, _ops.list_runs(status, label, since, until, limit))

    def list_decisions(self, run_id: str, *, limit: int | None = None) -> Pager[m.Decision]:
        return Pager(self, _ops.list_decisions(run_id, limit))

    def get_snapshot(self, snapshot_id: str) -> m.Snapshot:
        return self._call(_ops.get_snapshot(snapshot_id))

    # policies

    def create_policy(self, document: Mapping[str, Any]) -> m.Policy:
        return self._call(_ops.create_policy(document))

    def list_policies(self, *, mode: str | None = None, limit: int | None = None) -> Pager[m.Policy]:
        return Pager(self, _ops.list_policies(mode, limit))

    def get_policy(self, policy_id: str, *, version: int | None = None) -> m.Policy:
        return self._call(_ops.get_policy(policy_id, version))

    def update_policy(self, policy_id: str, document: Mapping[str, Any], *, expected_version: int) -> m.Policy:
        return self._call(_ops.update_policy(policy_id, document, expected_version))

    def set_policy_mode(self, policy_id: str, mode: str, *, reason: str | None = None) -> m.Policy:
        return self._call(_ops.set_policy_mode(policy_id, mode, reason))

    def confirm_policy(self, policy_id: str) -> m.Confirmation:
        return self._call(_ops.confirm_policy(policy_id))

    def policy_audit(self, policy_id: str, *, limit: int | None = None) -> Pager[m.AuditEntry]:
        return Pager(self, _ops.policy_audit(policy_id, limit))

    def policy_versions(self, policy_id: str, *, limit: int | None = None) -> Pager[m.Policy]:
        return Pager(self, _ops.policy_versions(policy_id, limit))

    def policy_shadow_stats(self, policy_id: str) -> m.ShadowStats:
        return self._call(_ops.policy_shadow_stats(policy_id))

    def policy_graduation(self, policy_id: str) -> m.PolicyGraduation:
        return self._call(_ops.policy_graduation(policy_id))

    def policy_usage(self, policy_id: str) -> m.PolicyUsage:
        """The caller's tenant's usage of a tenant-period budget (`per: "tenant"`) in the current period."""
        return self._call(_ops.policy_usage(policy_id))

    # prevention records and the learning loop

    def list_prevention_records(
        self,
        *,
        policy_id: str | None = None,
        run_id: str | None = None,
        since: str | None = None,
        until: str | None = None,
        simulated: bool | None = None,
        limit: int | None = None,
    ) -> Pager[m.PreventionRecord]:
        return Pager(self, _ops.list_prevention_records(policy_id, run_id, since, until, simulated, limit))

    def get_prevention_record(self, record_id: str) -> m.PreventionRecord:
        return self._call(_ops.get_prevention_record(record_id))

    def regret(self, record_id: str, severity: int, *, note: str | None = None) -> m.RegretResult:
        return self._call(_ops.regret(record_id, severity, note))

    def list_incidents(self, *, limit: int | None = None) -> Pager[m.Incident]:
        return Pager(self, _ops.list_incidents(limit))

    def get_incident(self, incident_id: str) -> m.Incident:
        return self._call(_ops.get_incident(incident_id))

    def list_patterns(self, *, limit: int | None = None) -> Pager[m.Pattern]:
        return Pager(self, _ops.list_patterns(limit))

    def get_pattern(self, pattern_id: str) -> m.Pattern:
        return self._call(_ops.get_pattern(pattern_id))

    def propose_pattern(self, pattern_id: str) -> m.Policy:
        return self._call(_ops.propose_pattern(pattern_id))

    def tenant_graduation(self) -> m.TenantGraduation:
        return self._call(_ops.tenant_graduation())

    def simulate(self, policies: list[Mapping[str, Any]], run_ids: list[str], *, persist: bool = False) -> m.Simulation:
        return self._call(_ops.simulate(policies, run_ids, persist))

    # operations

    def health(self) -> m.Health:
        return self._call(_ops.health())

    def ready(self) -> bool:
        """Whether the node accepts work (`/readyz` is 200)."""
        try:
            self._call(_ops.ready())
        except RunguardError:
            return False
        return True

    def metrics(self) -> str:
        return self._call(_ops.metrics())

    def openapi(self) -> dict[str, Any]:
        return self._call(_ops.openapi())


def _end_quietly(run: Run, outcome: str, exc: BaseException | None) -> None:
    """Ends a run on leaving its ``with`` block without hiding the block's own exception."""
    if run.offline or run._state.ended:
        return
    try:
        run.end(outcome, exc)
    except RunguardError as err:
        from ._base import logger

        # The run expires after the node's TTL; the caller's outcome is not changed by this.
        logger.warning("runguard could not end run `%s`: %s", run.run_id, err, extra={"run_id": run.run_id})
