"""The OpenAI Agents SDK guard through a real ``Runner.run`` loop with a fake ``Model`` (no network)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from agents import Agent, ModelSettings, Runner, function_tool, set_tracing_disabled
from agents.exceptions import ToolInputGuardrailTripwireTriggered
from agents.items import ModelResponse
from agents.models.interface import Model
from agents.usage import Usage
from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText

import runguard
from runguard.openai_agents import RunguardAgentsGuard, RunguardTripwireTriggered

from conftest import budget

set_tracing_disabled(True)
pytestmark = pytest.mark.anyio


class LoopingModel(Model):
    """Calls `lookup` every turn, 500 tokens a call; answers text after ``answer_after`` calls."""

    def __init__(self, answer_after: int | None = None) -> None:
        self.calls = 0
        self.answer_after = answer_after

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        self.calls += 1
        usage = Usage(requests=1, input_tokens=400, output_tokens=100, total_tokens=500)
        if self.answer_after is not None and self.calls > self.answer_after:
            text = ResponseOutputText(type="output_text", text="the answer", annotations=[])
            message = ResponseOutputMessage(
                id="msg", type="message", role="assistant", status="completed", content=[text]
            )
            return ModelResponse(output=[message], usage=usage, response_id=None)
        call = ResponseFunctionToolCall(
            type="function_call",
            call_id=f"call_{self.calls}",
            name="lookup",
            arguments=json.dumps({"term": f"attempt {self.calls}"}),
        )
        return ModelResponse(output=[call], usage=usage, response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError


@function_tool
def lookup(term: str) -> str:
    """Looks a term up."""
    return f"nothing about {term}"


def agent_with(model: Model) -> Agent[Any]:
    return Agent(
        name="looper",
        instructions="keep looking",
        model=model,
        tools=[lookup],
        model_settings=ModelSettings(max_tokens=256),
    )


async def test_an_agent_that_would_overspend_is_halted_before_the_call(aclient: runguard.AsyncClient) -> None:
    await aclient.create_policy(budget(1200))
    model = LoopingModel()
    prices = runguard.PriceTable({"fake-model": ("0.15", "0.60")})
    with pytest.raises(RunguardTripwireTriggered) as tripped:
        async with aclient.run(labels={"agent": "openai-agents"}) as run:
            guard = RunguardAgentsGuard(run, model_name="fake-model", prices=prices)
            await Runner.run(guard.protect(agent_with(model)), "find it", hooks=guard, max_turns=50)

    # Two calls of 500 tokens fit in 1200; the third is refused before the model is called.
    assert model.calls == 2
    record_id = tripped.value.record_id
    assert record_id is not None
    record = await aclient.get_prevention_record(record_id)
    assert record.phase == "pre" and record.run_id == run.run_id
    stopped = await aclient.get_run(run.run_id)
    assert stopped.status == "stopped" and stopped.totals.tokens == 1000 and stopped.totals.cost_micros == 240
    # model, lookup, model, lookup reported; the tools were steps too.
    posts = [d.step_index async for d in aclient.list_decisions(run.run_id) if d.phase == "post"]
    assert posts == [0, 1, 2, 3]


async def test_a_refused_tool_trips_the_tool_guardrail(aclient: runguard.AsyncClient) -> None:
    await aclient.create_policy(
        {"id": "pol_no_lookup", "name": "no lookup", "rule": {"kind": "skill", "deny": ["lookup"]}}
    )
    model = LoopingModel()
    with pytest.raises(ToolInputGuardrailTripwireTriggered) as tripped:
        async with aclient.run() as run:
            guard = RunguardAgentsGuard(run)
            await Runner.run(guard.protect(agent_with(model)), "find it", hooks=guard)
    assert model.calls == 1
    info = tripped.value.output.output_info
    assert info["action"] == "block" and info["prevention_record_id"] is not None
    assert (await aclient.get_run(run.run_id)).status == "stopped"


async def test_a_run_within_budget_succeeds(aclient: runguard.AsyncClient) -> None:
    await aclient.create_policy(budget(10_000))
    model = LoopingModel(answer_after=1)
    async with aclient.run() as run:
        guard = RunguardAgentsGuard(run)
        result = await Runner.run(guard.protect(agent_with(model)), "find it", hooks=guard)
    assert result.final_output == "the answer"
    finished = await aclient.get_run(run.run_id)
    assert finished.status == "succeeded" and finished.totals.tokens == 1000 and finished.totals.steps == 3
