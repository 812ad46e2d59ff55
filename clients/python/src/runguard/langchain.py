"""runguard as LangChain v1 agent middleware (``pip install runguard[langchain]``).

Each model call and each tool call of a ``create_agent`` loop is a runguard step:

- ``before_model``: admission (`pre`) with the estimate = prompt tokens (approximate, or your counter) +
  ``max_tokens``; a block ends the agent (``jump_to="end"``) with the reason and the prevention record id
  in the final message, so the call that would overspend is never made.
- ``after_model``: the report (`post`) with the model's own ``usage_metadata`` (cost from a
  :class:`~runguard.PriceTable`) and the output text; a block there ends the agent the same way.
- ``wrap_tool_call``: one step per tool call (skill = tool name, input keys = argument names); a refused
  tool answers the model with an error ``ToolMessage`` and the run is stopped, so the next model call ends
  the agent.

A warn is logged (logger ``runguard``); a throttle is waited out and re-sent within ``max_throttle_wait_s``
(a longer throttle ends the agent like a block). The run is created in ``before_agent`` and ended in
``after_agent`` unless you pass your own ``run=`` (then you own its lifetime, e.g. ``with client.run()``).
Parallel tool calls of one model turn are admitted one at a time: the step protocol is strictly ordered.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any

from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ModelResponse, hook_config
from langchain.agents.middleware.types import PrivateStateAttr
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.messages.utils import count_tokens_approximately
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.runtime import Runtime
from langgraph.types import Command
from typing_extensions import NotRequired

from ._base import clip
from ._client import Client
from ._run import Run, StepGuard
from ._steps import MAX_FIELD_BYTES
from .errors import Blocked, StepRefused, Throttled
from .pricing import PriceTable, Usage, approx_tokens


class RunguardState(AgentState[Any]):
    """The agent state plus the runguard run id (private: not in the agent's input or output)."""

    runguard_run_id: NotRequired[Annotated[str | None, PrivateStateAttr]]


def _text(message: BaseMessage | None) -> str:
    if message is None:
        return ""
    text = message.text
    return text if isinstance(text, str) else str(text)


def _stop_message(refused: StepRefused) -> AIMessage:
    decision = refused.decision
    record = decision.prevention_record_id if decision else None
    reason = refused.reason if isinstance(refused, Blocked) else str(refused)
    content = f"Stopped by runguard: {reason}" + (f" (prevention record {record})" if record else "")
    meta = {
        "action": decision.action if decision else "block",
        "reason": reason,
        "decision_id": decision.decision_id if decision else None,
        "prevention_record_id": record,
        "run_id": decision.run_id if decision else None,
    }
    return AIMessage(content=content, name="runguard", additional_kwargs={"runguard": meta})


class RunguardMiddleware(AgentMiddleware[RunguardState, Any, Any]):
    """Guards every model and tool call of a LangChain agent with a runguard run."""

    state_schema = RunguardState

    def __init__(
        self,
        client: Client,
        *,
        run: Run | None = None,
        labels: Mapping[str, str] | None = None,
        model_name: str | None = None,
        prices: PriceTable | None = None,
        max_tokens: int = 1024,
        token_counter: Callable[[Sequence[BaseMessage]], int] | None = None,
        model_skill: str = "model",
        wait_on_throttle: bool = True,
        max_throttle_wait_s: float = 30.0,
    ) -> None:
        super().__init__()
        self.client = client
        self.labels = dict(labels or {})
        self.model_name = model_name
        self.prices = prices
        self.max_tokens = max_tokens
        self.token_counter = token_counter or count_tokens_approximately
        self.model_skill = model_skill
        self.wait_on_throttle = wait_on_throttle
        self.max_throttle_wait_s = max_throttle_wait_s
        self._fixed = run
        self._runs: dict[str, Run] = {}
        self._open: dict[str, StepGuard] = {}
        self._prompt_tokens: dict[str, int] = {}
        self._mutex = threading.Lock()

    # the run's lifetime

    @hook_config(can_jump_to=["end"])
    def before_agent(self, state: RunguardState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        if self._fixed is not None:
            with self._mutex:
                self._runs[self._fixed.run_id] = self._fixed
            return {"runguard_run_id": self._fixed.run_id}
        try:
            run = self.client.start_run(
                labels=self.labels, wait_on_throttle=self.wait_on_throttle, max_throttle_wait_s=self.max_throttle_wait_s
            )
        except Blocked as blocked:
            return {"jump_to": "end", "messages": [_stop_message(blocked)]}
        with self._mutex:
            self._runs[run.run_id] = run
        return {"runguard_run_id": run.run_id}

    def after_agent(self, state: RunguardState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        run_id = state.get("runguard_run_id")
        with self._mutex:
            run = self._runs.pop(run_id, None) if run_id else None
            guard = self._open.pop(run_id, None) if run_id else None
        if guard is not None:
            self._report_quietly(guard, None)
        if run is not None and run is not self._fixed:
            try:
                run.end("succeeded")
            except Exception:  # noqa: BLE001 - the agent's answer stands; the run expires by TTL
                pass
        return None

    def _run(self, state: Mapping[str, Any]) -> Run | None:
        run_id = state.get("runguard_run_id")
        with self._mutex:
            return self._runs.get(run_id) if run_id else None

    # model calls

    @hook_config(can_jump_to=["end"])
    def before_model(self, state: RunguardState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        run = self._run(state)
        if run is None:
            return None
        messages = state["messages"]
        prompt_tokens = int(self.token_counter(messages))
        estimate = prompt_tokens + self.max_tokens
        try:
            guard = run.step(
                self.model_skill,
                estimate=estimate,
                input_text=_text(messages[-1] if messages else None) or None,
            )
        except StepRefused as refused:
            return {"jump_to": "end", "messages": [_stop_message(refused)]}
        with self._mutex:
            self._open[run.run_id] = guard
            self._prompt_tokens[run.run_id] = prompt_tokens
        return None

    def wrap_model_call(
        self, request: ModelRequest[Any], handler: Callable[[ModelRequest[Any]], ModelResponse[Any]]
    ) -> ModelResponse[Any]:
        try:
            return handler(request)
        except Exception as exc:
            # The admitted step failed: report it with the error, or the run would wait for it forever.
            run_id = str(request.state.get("runguard_run_id") or "")
            with self._mutex:
                guard = self._open.pop(run_id, None) if run_id else None
            if guard is not None:
                self._report_quietly(guard, exc)
            raise

    @hook_config(can_jump_to=["end"])
    def after_model(self, state: RunguardState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        run_id = state.get("runguard_run_id")
        with self._mutex:
            guard = self._open.pop(run_id, None) if run_id else None
            prompt_tokens = self._prompt_tokens.pop(run_id, 0) if run_id else 0
        if guard is None:
            return None
        last = state["messages"][-1] if state["messages"] else None
        usage_metadata = getattr(last, "usage_metadata", None)
        model = self.model_name or (getattr(last, "response_metadata", {}) or {}).get("model_name")
        if usage_metadata:
            usage = Usage.from_langchain(usage_metadata, model=model, prices=self.prices)
        else:
            # A model that reports no usage must not count as free: approximate what was sent and received.
            usage = Usage.from_tokens(prompt_tokens, approx_tokens(_text(last)), model=model, prices=self.prices)
        try:
            guard.report(usage, output_text=_text(last) or None)
        except StepRefused as refused:
            return {"jump_to": "end", "messages": [_stop_message(refused)]}
        return None

    # tool calls

    def wrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], ToolMessage | Command[Any]]
    ) -> ToolMessage | Command[Any]:
        admitted = self._admit_tool(request)
        if isinstance(admitted, ToolMessage):
            return admitted
        try:
            result = handler(request)
        except Exception as exc:
            if admitted is not None:
                self._report_quietly(admitted, exc)
            raise
        if admitted is not None:
            self._finish_tool(admitted, result)
        return result

    def _admit_tool(self, request: ToolCallRequest) -> StepGuard | ToolMessage | None:
        """The tool's step, a refusal to answer the model with, or ``None`` outside a run."""
        run = self._run(request.state if isinstance(request.state, Mapping) else {})
        if run is None:
            return None
        call = request.tool_call
        args = call.get("args") or {}
        try:
            return run.step(
                call["name"],
                input_keys=sorted(args) if isinstance(args, Mapping) else None,
                input_text=json.dumps(args, default=str, ensure_ascii=False),
            )
        except StepRefused as refused:
            return ToolMessage(
                content=_stop_message(refused).content,
                tool_call_id=call["id"] or "",
                name=call["name"],
                status="error",
            )

    def _finish_tool(self, guard: StepGuard, result: ToolMessage | Command[Any]) -> None:
        output = result.content if isinstance(result, ToolMessage) else None
        error = (
            {"type": "tool_error", "message": clip(str(output), MAX_FIELD_BYTES)}
            if isinstance(result, ToolMessage) and result.status == "error"
            else None
        )
        # A block here stops the run; the tool already ran, so its answer goes back and the next model
        # call is the one refused.
        self._report_quietly(guard, None, output_text=str(output) if output else None, error=error)

    # async agents (`ainvoke`): the same steps; the client's blocking calls run in a worker thread

    @hook_config(can_jump_to=["end"])
    async def abefore_agent(self, state: RunguardState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.before_agent, state, runtime)

    async def aafter_agent(self, state: RunguardState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.after_agent, state, runtime)

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: RunguardState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.before_model, state, runtime)

    @hook_config(can_jump_to=["end"])
    async def aafter_model(self, state: RunguardState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.after_model, state, runtime)

    async def awrap_model_call(
        self, request: ModelRequest[Any], handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]]
    ) -> ModelResponse[Any]:
        try:
            return await handler(request)
        except Exception as exc:
            run_id = str(request.state.get("runguard_run_id") or "")
            with self._mutex:
                guard = self._open.pop(run_id, None) if run_id else None
            if guard is not None:
                await asyncio.to_thread(self._report_quietly, guard, exc)
            raise

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
    ) -> ToolMessage | Command[Any]:
        admitted = await asyncio.to_thread(self._admit_tool, request)
        if isinstance(admitted, ToolMessage):
            return admitted
        try:
            result = await handler(request)
        except Exception as exc:
            if admitted is not None:
                await asyncio.to_thread(self._report_quietly, admitted, exc)
            raise
        if admitted is not None:
            await asyncio.to_thread(self._finish_tool, admitted, result)
        return result

    @staticmethod
    def _report_quietly(
        guard: StepGuard,
        exc: BaseException | None,
        *,
        output_text: str | None = None,
        error: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            guard.report(output_text=output_text, error=exc if exc is not None else error)
        except (Blocked, Throttled):
            pass


__all__ = ["RunguardMiddleware", "RunguardState"]
