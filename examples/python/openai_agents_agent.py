"""An OpenAI Agents SDK agent guarded by runguard: run hooks admit and report each model call, tool
guardrails each tool call. The model is a fake ``Model`` that calls a tool forever; runguard trips a
tripwire before the call that would overspend. Needs ``pip install 'runguard[openai-agents]'``."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from agents import Agent, ModelSettings, Runner, function_tool, set_tracing_disabled
from agents.items import ModelResponse
from agents.models.interface import Model
from agents.usage import Usage
from openai.types.responses import ResponseFunctionToolCall

import runguard
from runguard.openai_agents import RunguardAgentsGuard, RunguardTripwireTriggered

from _common import ensure_budget


class LoopingModel(Model):
    def __init__(self) -> None:
        self.calls = 0

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        self.calls += 1
        call = ResponseFunctionToolCall(
            type="function_call",
            call_id=f"call_{self.calls}",
            name="lookup",
            arguments=json.dumps({"term": f"attempt {self.calls}"}),
        )
        usage = Usage(requests=1, input_tokens=400, output_tokens=100, total_tokens=500)
        return ModelResponse(output=[call], usage=usage, response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError


@function_tool
def lookup(term: str) -> str:
    """Looks a term up."""
    return f"nothing about {term}"


async def main() -> None:
    set_tracing_disabled(True)  # nothing leaves this machine
    url = os.environ.get("RUNGUARD_URL", "http://127.0.0.1:7070")
    token, tenant = os.environ.get("RUNGUARD_TOKEN"), os.environ.get("RUNGUARD_TENANT")
    with runguard.Client(url, token=token, tenant=tenant) as admin:
        ensure_budget(admin)
    async with runguard.AsyncClient(url, token=token, tenant=tenant) as client:
        agent = Agent(
            name="looper",
            instructions="keep looking",
            model=LoopingModel(),
            tools=[lookup],
            model_settings=ModelSettings(max_tokens=256),
        )
        try:
            async with client.run(labels={"example": "openai-agents"}) as run:
                guard = RunguardAgentsGuard(run, model_name="fake-model")
                await Runner.run(guard.protect(agent), "find it", hooks=guard, max_turns=100)
        except RunguardTripwireTriggered as tripped:
            print(f"stopped: {tripped.refused}")
            print(f"prevention record {tripped.record_id}")


if __name__ == "__main__":
    asyncio.run(main())
