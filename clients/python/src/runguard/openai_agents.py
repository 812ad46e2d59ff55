"""runguard for the OpenAI Agents SDK (``pip install runguard[openai-agents]``).

:class:`RunguardAgentsGuard` is the SDK's ``RunHooks`` for model calls and a source of tool guardrails
for tool calls, all on one :class:`~runguard.AsyncRun`:

- ``on_llm_start``: admission (`pre`) with the estimate = input tokens (approximate) + ``max_tokens``
  (the agent's ``model_settings.max_tokens`` or the guard's); ``on_llm_end``: the report (`post`) with the
  response's own ``usage`` (cost from a :class:`~runguard.PriceTable`). A refusal raises
  :class:`RunguardTripwireTriggered`, which halts ``Runner.run`` before the model is called.
- :meth:`RunguardAgentsGuard.protect` returns a copy of the agent whose function tools carry a tool input
  guardrail (the tool's `pre`: skill = tool name, input keys = argument names) and a tool output guardrail
  (its `post`, with the output). A refusal trips the guardrail (``raise_exception``): the SDK raises
  ``ToolInputGuardrailTripwireTriggered`` / ``ToolOutputGuardrailTripwireTriggered`` and the run halts.

The guard belongs to one run: create it inside ``async with client.run() as run`` so the run ends
`failed` when a tripwire (or anything else) stops the agent. Tools of handed-off agents are protected
only if you ``protect`` those agents too.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from agents import Agent, FunctionTool, RunContextWrapper, RunHooks, Tool
from agents.exceptions import AgentsException
from agents.items import ModelResponse, TResponseInputItem
from agents.tool_guardrails import (
    ToolGuardrailFunctionOutput,
    ToolInputGuardrail,
    ToolInputGuardrailData,
    ToolOutputGuardrail,
    ToolOutputGuardrailData,
)

from ._arun import AsyncRun, AsyncStepGuard
from .errors import Blocked, StepRefused
from .models import Decision
from .pricing import PriceTable, Usage, approx_tokens


class RunguardTripwireTriggered(AgentsException):
    """runguard refused a model call: the run halts. ``decision`` and ``record_id`` say why and where the
    prevention record is."""

    refused: StepRefused

    def __init__(self, refused: StepRefused) -> None:
        super().__init__(f"runguard tripwire: {refused}")
        self.refused = refused

    @property
    def decision(self) -> Decision | None:
        return self.refused.decision

    @property
    def record_id(self) -> str | None:
        return self.refused.decision.prevention_record_id if self.refused.decision else None


def _info(refused: StepRefused) -> dict[str, Any]:
    decision = refused.decision
    return {
        "action": decision.action if decision else "block",
        "reason": refused.reason if isinstance(refused, Blocked) else str(refused),
        "decision_id": decision.decision_id if decision else None,
        "prevention_record_id": decision.prevention_record_id if decision else None,
    }


def _output_text(response: ModelResponse) -> str | None:
    parts: list[str] = []
    for item in response.output:
        for content in getattr(item, "content", None) or []:
            text = getattr(content, "text", None)
            if isinstance(text, str):
                parts.append(text)
    return "\n".join(parts) or None


class RunguardAgentsGuard(RunHooks[Any]):
    """Run hooks and tool guardrails that make every model and tool call a runguard step."""

    def __init__(
        self,
        run: AsyncRun,
        *,
        model_name: str | None = None,
        prices: PriceTable | None = None,
        max_tokens: int = 1024,
        model_skill: str = "model",
    ) -> None:
        self.run = run
        self.model_name = model_name
        self.prices = prices
        self.max_tokens = max_tokens
        self.model_skill = model_skill
        self._model_step: AsyncStepGuard | None = None
        self._prompt_tokens = 0
        self._tool_steps: dict[str, AsyncStepGuard] = {}
        self.tool_input_guardrail: ToolInputGuardrail[Any] = ToolInputGuardrail(
            guardrail_function=self._tool_pre, name="runguard"
        )
        self.tool_output_guardrail: ToolOutputGuardrail[Any] = ToolOutputGuardrail(
            guardrail_function=self._tool_post, name="runguard"
        )

    def protect(self, agent: Agent[Any]) -> Agent[Any]:
        """A copy of ``agent`` whose function tools are guarded (the original is left unchanged)."""
        tools: list[Tool] = []
        for tool in agent.tools:
            if isinstance(tool, FunctionTool):
                tool = dataclasses.replace(
                    tool,
                    tool_input_guardrails=[*(tool.tool_input_guardrails or []), self.tool_input_guardrail],
                    tool_output_guardrails=[*(tool.tool_output_guardrails or []), self.tool_output_guardrail],
                )
            tools.append(tool)
        return agent.clone(tools=tools)

    # model calls

    def _model(self, agent: Agent[Any]) -> str | None:
        if self.model_name:
            return self.model_name
        model = agent.model
        return model if isinstance(model, str) else getattr(model, "model", None)

    async def on_llm_start(
        self,
        context: RunContextWrapper[Any],
        agent: Agent[Any],
        system_prompt: str | None,
        input_items: list[TResponseInputItem],
    ) -> None:
        prompt = (system_prompt or "") + json.dumps(input_items, default=str, ensure_ascii=False)
        max_tokens = agent.model_settings.max_tokens or self.max_tokens
        last = input_items[-1] if input_items else None
        last_text = last.get("content") if isinstance(last, dict) else None
        self._prompt_tokens = approx_tokens(prompt)
        try:
            self._model_step = await self.run.step(
                self.model_skill,
                estimate=self._prompt_tokens + max_tokens,
                input_text=last_text if isinstance(last_text, str) and last_text else None,
            )
        except StepRefused as refused:
            raise RunguardTripwireTriggered(refused) from refused

    async def on_llm_end(self, context: RunContextWrapper[Any], agent: Agent[Any], response: ModelResponse) -> None:
        step, self._model_step = self._model_step, None
        if step is None:
            return
        usage = Usage.from_openai(response.usage, model=self._model(agent), prices=self.prices)
        if usage.tokens == 0:
            # A provider that reports no usage must not count as free: approximate what went in and out.
            output = _output_text(response) or ""
            usage = Usage.from_tokens(
                self._prompt_tokens, approx_tokens(output), model=self._model(agent), prices=self.prices
            )
        try:
            await step.report(usage, output_text=_output_text(response))
        except StepRefused as refused:
            raise RunguardTripwireTriggered(refused) from refused

    # tool calls

    async def _tool_pre(self, data: ToolInputGuardrailData) -> ToolGuardrailFunctionOutput:
        context = data.context
        try:
            arguments = json.loads(context.tool_arguments or "{}")
        except ValueError:
            arguments = None
        try:
            step = await self.run.step(
                context.tool_name,
                input_keys=sorted(arguments) if isinstance(arguments, dict) else None,
                input_text=(context.tool_arguments or "") or None,
            )
        except StepRefused as refused:
            return ToolGuardrailFunctionOutput.raise_exception(output_info=_info(refused))
        self._tool_steps[context.tool_call_id] = step
        return ToolGuardrailFunctionOutput.allow()

    async def _tool_post(self, data: ToolOutputGuardrailData) -> ToolGuardrailFunctionOutput:
        step = self._tool_steps.pop(data.context.tool_call_id, None)
        if step is None:
            return ToolGuardrailFunctionOutput.allow()
        try:
            await step.report(output_text=str(data.output) or None)
        except StepRefused as refused:
            return ToolGuardrailFunctionOutput.raise_exception(output_info=_info(refused))
        return ToolGuardrailFunctionOutput.allow()


__all__ = ["RunguardAgentsGuard", "RunguardTripwireTriggered"]
