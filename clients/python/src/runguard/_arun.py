"""The step protocol for :class:`~runguard.AsyncClient` (rules in :mod:`runguard._steps`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _ops
from ._steps import (
    OPEN_STEP_WAIT_S,
    RunState,
    StepOptions,
    ThrottleClock,
    UsageLike,
    as_block,
    error_of,
    log_fail_open,
    log_warn,
    post_body,
    pre_body,
    unavailable,
    usage_of,
)
from .errors import Blocked, RunguardError, Throttled
from .models import Decision, Remaining, RunCreated, RunEnded

if TYPE_CHECKING:
    from ._async_client import AsyncClient


class AsyncRun:
    """A run on the node: admits one step at a time (see :meth:`step`) and ends once."""

    def __init__(self, client: AsyncClient, run_id: str, created: RunCreated | None, options: StepOptions) -> None:
        self._client = client
        self._options = options
        self._state = RunState(run_id)
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[object] | None = None
        self.created = created
        if created is not None:
            self._state.last_decision = created.decision

    @property
    def run_id(self) -> str:
        return self._state.run_id

    @property
    def offline(self) -> bool:
        """True when the node could not create the run and the caller chose to go on without it."""
        return self.created is None

    @property
    def last_decision(self) -> Decision | None:
        return self._state.last_decision

    @property
    def remaining(self) -> Remaining | None:
        """The budget left after the latest decision (clamp the next call's ``max_tokens`` to it)."""
        return self._state.remaining

    @property
    def warnings(self) -> list[Decision]:
        """Every ``warn`` decision of this run so far."""
        return list(self._state.warnings)

    @property
    def next_index(self) -> int:
        return self._state.next_index

    def step(
        self,
        skill: str | None = None,
        *,
        estimate: int | None = None,
        estimate_cost_micros: int | None = None,
        input_keys: Sequence[str] | None = None,
        input_text: str | None = None,
        api_endpoint: str | None = None,
    ) -> AsyncAdmission:
        """Admits the next step (its `pre` call): ``async with run.step(...) as step`` or
        ``step = await run.step(...)``. Raises as :meth:`runguard.Run.step` does."""
        return AsyncAdmission(
            self,
            dict(
                skill=skill,
                estimate=estimate,
                estimate_cost_micros=estimate_cost_micros,
                input_keys=input_keys,
                input_text=input_text,
                api_endpoint=api_endpoint,
            ),
        )

    async def _admit(
        self,
        skill: str | None = None,
        *,
        estimate: int | None = None,
        estimate_cost_micros: int | None = None,
        input_keys: Sequence[str] | None = None,
        input_text: str | None = None,
        api_endpoint: str | None = None,
    ) -> AsyncStepGuard:
        """Admits the next step (its `pre` call) and returns the guard that reports it.

        Raises :class:`Blocked` when the step may not run (a block decision, a stopped run, no answer and
        fail-closed) and :class:`Throttled` when a throttle outlasts ``max_throttle_wait_s``. Steps of one
        run are admitted one at a time: another task's ``step`` waits until this one is reported.
        """
        me = asyncio.current_task()
        if self._owner == me:
            raise RuntimeError(f"step {self._state.next_index} of run `{self.run_id}` is open; report it first")
        try:
            await asyncio.wait_for(self._lock.acquire(), OPEN_STEP_WAIT_S)
        except asyncio.TimeoutError:
            raise RuntimeError(
                f"step {self._state.next_index} of run `{self.run_id}` is still open after {OPEN_STEP_WAIT_S:.0f} s;"
                " report each step before the next"
            ) from None
        self._owner = me
        try:
            index = self._state.next_index
            if self.offline:
                self._client.stats.count_fail_open()
                return AsyncStepGuard(self, index, None, failed_open=True)
            settled = await self._settle()
            body = pre_body(
                index,
                skill=skill,
                api_endpoint=api_endpoint,
                input_keys=input_keys,
                input_text=input_text,
                estimate_tokens=estimate,
                estimate_cost_micros=estimate_cost_micros,
            )
            decision = await self._send(body, index, "pre") if settled else self._fail_open_or_block(index, "pre", None)
            return AsyncStepGuard(self, index, decision, failed_open=decision is None)
        except BaseException:
            self._release()
            raise

    async def end(self, outcome: str = "succeeded", error: BaseException | Mapping[str, Any] | None = None) -> RunEnded:
        """Ends the run (`succeeded` or `failed`); ending an ended or stopped run changes nothing."""
        await self._settle()
        ended = await self._client.end_run(self.run_id, outcome, error_of(error))
        self._state.ended = True
        return ended

    # internals

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    async def _settle(self) -> bool:
        """Re-sends unacknowledged posts in order; False while the node still cannot be reached."""
        while self._state.unsettled:
            try:
                decision = await self._client._call(_ops.step(self.run_id, self._state.unsettled[0]))
            except RunguardError as err:
                if unavailable(err):
                    return False
                raise as_block(self.run_id, err) from err
            self._state.unsettled.pop(0)
            self._judge(decision)
        return True

    async def _send(self, body: bytes, index: int, phase: str) -> Decision | None:
        clock = ThrottleClock(self._options)
        while True:
            try:
                decision = await self._client._call(_ops.step(self.run_id, body))
            except RunguardError as err:
                if phase == "post" and unavailable(err):
                    # Blocked or not, the node must still learn what the step used: re-sent before the
                    # run's next call.
                    self._state.unsettled.append(body)
                return self._fail_open_or_block(index, phase, err)
            if decision.action == "throttle":
                delay = clock.wait_for(decision)
                if delay is None:
                    self._state.last_decision = decision
                    raise Throttled(f"step {index} of run `{self.run_id}` is throttled: {decision.reason}", decision)
                await asyncio.sleep(delay)
                continue
            self._judge(decision)
            return decision

    def _judge(self, decision: Decision) -> None:
        self._state.last_decision = decision
        if decision.action == "warn":
            self._state.warnings.append(decision)
            log_warn(decision)
        elif decision.action == "block":
            raise Blocked(f"step {decision.step_index} of run `{self.run_id}` is blocked: {decision.reason}", decision)

    def _fail_open_or_block(self, index: int, phase: str, err: RunguardError | None) -> Decision | None:
        """Raises the block, or (failing open) answers no decision."""
        if err is not None and not unavailable(err):
            raise as_block(self.run_id, err) from err
        if self._options.on_unavailable != "allow":
            cause = err or RunguardError("earlier reports are still unacknowledged")
            raise as_block(self.run_id, cause) from err
        self._client.stats.count_fail_open()
        log_fail_open(self.run_id, index, phase, err or RunguardError("earlier reports are unacknowledged"))
        return None

    async def _report(self, guard: AsyncStepGuard, body: bytes) -> Decision | None:
        try:
            if self.offline:
                self._client.stats.count_fail_open()
                return None
            if not await self._settle():
                self._state.unsettled.append(body)
                return self._fail_open_or_block(guard.index, "post", None)
            return await self._send(body, guard.index, "post")
        finally:
            self._state.next_index = guard.index + 1
            self._release()


class AsyncStepGuard:
    """An admitted step. Call :meth:`report` with what it used, or leave the ``async with`` block: the guard
    reports on exit (the exception as the step's ``error`` when the block raised)."""

    def __init__(self, run: AsyncRun, index: int, decision: Decision | None, *, failed_open: bool) -> None:
        self.run = run
        self.index = index
        self.decision = decision
        self.failed_open = failed_open
        self.report_decision: Decision | None = None
        self._reported = False
        self._started = time.monotonic()

    @property
    def remaining(self) -> Remaining | None:
        """What the admission decision left (clamp ``max_tokens`` to ``remaining.tokens``)."""
        return self.decision.remaining if self.decision else None

    def clamp(self, max_tokens: int) -> int:
        """``max_tokens`` limited to the run's remaining token budget (never below 1)."""
        left = self.remaining.tokens if self.remaining else None
        return max_tokens if left is None else max(1, min(max_tokens, left))

    async def report(
        self,
        usage: UsageLike = None,
        *,
        output_text: str | None = None,
        error: BaseException | Mapping[str, Any] | None = None,
        duration_ms: int | None = None,
    ) -> Decision | None:
        """Sends the step's `post`. Raises :class:`Blocked` when the report stops the run (the usage
        crossed a budget); answers ``None`` when it failed open."""
        if self._reported:
            raise RuntimeError(f"step {self.index} of run `{self.run.run_id}` is already reported")
        self._reported = True
        elapsed = duration_ms if duration_ms is not None else int((time.monotonic() - self._started) * 1000)
        body = post_body(self.index, usage=usage_of(usage, elapsed), output_text=output_text, error=error_of(error))
        self.report_decision = await self.run._report(self, body)
        return self.report_decision

    async def __aenter__(self) -> AsyncStepGuard:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reported:
            return
        if exc is None:
            await self.report()
            return
        try:
            await self.report(error=exc)
        except Blocked:
            # The block is recorded by the node; the caller's own exception is the one to see.
            pass


class AsyncAdmission:
    """What :meth:`AsyncRun.step` returns: await it for the guard, or use it with ``async with``."""

    def __init__(self, run: AsyncRun, arguments: dict[str, Any]) -> None:
        self._run = run
        self._arguments = arguments
        self._guard: AsyncStepGuard | None = None

    def __await__(self) -> Generator[Any, None, AsyncStepGuard]:
        return self._run._admit(**self._arguments).__await__()

    async def __aenter__(self) -> AsyncStepGuard:
        self._guard = await self._run._admit(**self._arguments)
        return self._guard

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._guard is not None:
            await self._guard.__aexit__(exc_type, exc, tb)
