"""The asynchronous client (the same operations as :class:`~runguard.Client`, awaited)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

from . import _ops
from . import models as m
from ._arun import AsyncRun
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
from ._steps import StepOptions, as_block, error_of, log_fail_open, unavailable
from .errors import Blocked, RunguardError

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class AsyncPager(Generic[M]):
    """A list endpoint: ``async for`` it for every item across pages (fetched lazily by cursor)."""

    def __init__(self, client: AsyncClient, make: _ops.PageOp[M]) -> None:
        self._client = client
        self._make = make

    async def pages(self) -> AsyncIterator[_ops.Page[M]]:
        cursor: str | None = None
        while True:
            page = await self._client._call(self._make(cursor))
            yield page
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def first_page(self) -> _ops.Page[M]:
        return await self._client._call(self._make(None))

    async def __aiter__(self) -> AsyncIterator[M]:
        async for page in self.pages():
            for item in page.items:
                yield item


class AsyncClient:
    """A runguard node over HTTP (async). Close it (or use ``async with``) to free connections.

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
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.on_unavailable: OnUnavailable = on_unavailable
        self.stats = Stats()
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self._headers = headers(token, tenant)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, op: Op[T]) -> T:
        attempt = 0
        while True:
            try:
                try:
                    response = await self._http.request(
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
                await asyncio.sleep(delay)
                attempt += 1

    # runs and steps

    @asynccontextmanager
    async def run(
        self,
        run_id: str | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        api_endpoint: str | None = None,
        parent: str | AsyncRun | None = None,
        on_unavailable: OnUnavailable | None = None,
        wait_on_throttle: bool = False,
        max_throttle_wait_s: float = 30.0,
    ) -> AsyncIterator[AsyncRun]:
        """Creates a run and ends it on exit: `succeeded`, or `failed` with the error when the block raises.

        The run id is generated here when not given, so a re-sent creation is idempotent.
        """
        run = await self.start_run(
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
            await _end_quietly(run, "failed", exc)
            raise
        await _end_quietly(run, "succeeded", None)

    async def start_run(
        self,
        run_id: str | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        api_endpoint: str | None = None,
        parent: str | AsyncRun | None = None,
        on_unavailable: OnUnavailable | None = None,
        wait_on_throttle: bool = False,
        max_throttle_wait_s: float = 30.0,
    ) -> AsyncRun:
        """Creates a run without a ``with`` block; await :meth:`AsyncRun.end` yourself."""
        options = StepOptions(on_unavailable or self.on_unavailable, wait_on_throttle, max_throttle_wait_s)
        run_id = run_id or f"run-{uuid.uuid4().hex}"
        parent_id = parent.run_id if isinstance(parent, AsyncRun) else parent
        try:
            created = await self.create_run(run_id, labels=labels, api_endpoint=api_endpoint, parent_run_id=parent_id)
        except RunguardError as err:
            if options.on_unavailable == "allow" and unavailable(err):
                self.stats.count_fail_open()
                log_fail_open(run_id, 0, "run_start", err)
                return AsyncRun(self, run_id, None, options)
            raise as_block(run_id, err) from err
        if created.decision.action == "block":
            raise Blocked(f"run `{run_id}` is blocked at start: {created.decision.reason}", created.decision)
        return AsyncRun(self, run_id, created, options)

    async def create_run(
        self,
        run_id: str | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        api_endpoint: str | None = None,
        parent_run_id: str | None = None,
    ) -> m.RunCreated:
        return await self._call(
            _ops.create_run(run_id or f"run-{uuid.uuid4().hex}", labels, api_endpoint, parent_run_id)
        )

    async def get_run(self, run_id: str) -> m.Run:
        return await self._call(_ops.get_run(run_id))

    async def send_step(self, run_id: str, call: Mapping[str, Any]) -> m.Decision:
        """A raw step call (the step protocol is :meth:`run`): the decision, or the node's error raised."""
        return await self._call(_ops.step(run_id, encode(call)))

    async def end_run(
        self, run_id: str, outcome: str = "succeeded", error: Mapping[str, Any] | BaseException | None = None
    ) -> m.RunEnded:
        return await self._call(_ops.end_run(run_id, outcome, error_of(error)))

    def list_runs(
        self,
        *,
        status: str | None = None,
        label: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int | None = None,
    ) -> AsyncPager[m.Run]:
        """The tenant's runs by run id, narrowed by ``status``, a ``label`` (``"key"`` or ``"key=value"``)
        and creation time (``since`` inclusive, ``until`` exclusive; RFC 3339)."""
        return AsyncPager(self, _ops.list_runs(status, label, since, until, limit))

    def list_decisions(self, run_id: str, *, limit: int | None = None) -> AsyncPager[m.Decision]:
        return AsyncPager(self, _ops.list_decisions(run_id, limit))

    async def get_snapshot(self, snapshot_id: str) -> m.Snapshot:
        return await self._call(_ops.get_snapshot(snapshot_id))

    # policies

    async def create_policy(self, document: Mapping[str, Any]) -> m.Policy:
        return await self._call(_ops.create_policy(document))

    def list_policies(self, *, mode: str | None = None, limit: int | None = None) -> AsyncPager[m.Policy]:
        return AsyncPager(self, _ops.list_policies(mode, limit))

    async def get_policy(self, policy_id: str, *, version: int | None = None) -> m.Policy:
        return await self._call(_ops.get_policy(policy_id, version))

    async def update_policy(self, policy_id: str, document: Mapping[str, Any], *, expected_version: int) -> m.Policy:
        return await self._call(_ops.update_policy(policy_id, document, expected_version))

    async def set_policy_mode(self, policy_id: str, mode: str, *, reason: str | None = None) -> m.Policy:
        return await self._call(_ops.set_policy_mode(policy_id, mode, reason))

    async def confirm_policy(self, policy_id: str) -> m.Confirmation:
        return await self._call(_ops.confirm_policy(policy_id))

    def policy_audit(self, policy_id: str, *, limit: int | None = None) -> AsyncPager[m.AuditEntry]:
        return AsyncPager(self, _ops.policy_audit(policy_id, limit))

    def policy_versions(self, policy_id: str, *, limit: int | None = None) -> AsyncPager[m.Policy]:
        return AsyncPager(self, _ops.policy_versions(policy_id, limit))

    async def policy_shadow_stats(self, policy_id: str) -> m.ShadowStats:
        return await self._call(_ops.policy_shadow_stats(policy_id))

    async def policy_graduation(self, policy_id: str) -> m.PolicyGraduation:
        return await self._call(_ops.policy_graduation(policy_id))

    async def policy_usage(self, policy_id: str) -> m.PolicyUsage:
        """The caller's tenant's usage of a tenant-period budget (`per: "tenant"`) in the current period."""
        return await self._call(_ops.policy_usage(policy_id))

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
    ) -> AsyncPager[m.PreventionRecord]:
        return AsyncPager(self, _ops.list_prevention_records(policy_id, run_id, since, until, simulated, limit))

    async def get_prevention_record(self, record_id: str) -> m.PreventionRecord:
        return await self._call(_ops.get_prevention_record(record_id))

    async def regret(self, record_id: str, severity: int, *, note: str | None = None) -> m.RegretResult:
        return await self._call(_ops.regret(record_id, severity, note))

    def list_incidents(self, *, limit: int | None = None) -> AsyncPager[m.Incident]:
        return AsyncPager(self, _ops.list_incidents(limit))

    async def get_incident(self, incident_id: str) -> m.Incident:
        return await self._call(_ops.get_incident(incident_id))

    def list_patterns(self, *, limit: int | None = None) -> AsyncPager[m.Pattern]:
        return AsyncPager(self, _ops.list_patterns(limit))

    async def get_pattern(self, pattern_id: str) -> m.Pattern:
        return await self._call(_ops.get_pattern(pattern_id))

    async def propose_pattern(self, pattern_id: str) -> m.Policy:
        return await self._call(_ops.propose_pattern(pattern_id))

    async def tenant_graduation(self) -> m.TenantGraduation:
        return await self._call(_ops.tenant_graduation())

    async def simulate(
        self, policies: list[Mapping[str, Any]], run_ids: list[str], *, persist: bool = False
    ) -> m.Simulation:
        return await self._call(_ops.simulate(policies, run_ids, persist))

    # operations

    async def health(self) -> m.Health:
        return await self._call(_ops.health())

    async def ready(self) -> bool:
        """Whether the node accepts work (`/readyz` is 200)."""
        try:
            await self._call(_ops.ready())
        except RunguardError:
            return False
        return True

    async def metrics(self) -> str:
        return await self._call(_ops.metrics())

    async def openapi(self) -> dict[str, Any]:
        return await self._call(_ops.openapi())


async def _end_quietly(run: AsyncRun, outcome: str, exc: BaseException | None) -> None:
    """Ends a run on leaving its ``with`` block without hiding the block's own exception."""
    if run.offline or run._state.ended:
        return
    try:
        await run.end(outcome, exc)
    except RunguardError as err:
        from ._base import logger

        # The run expires after the node's TTL; the caller's outcome is not changed by this.
        logger.warning("runguard could not end run `%s`: %s", run.run_id, err, extra={"run_id": run.run_id})
