"""The LangChain middleware through a real ``create_agent`` loop with LangChain's fake chat model."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool

import runguard
from runguard.langchain import RunguardMiddleware

from conftest import budget


class FakeToolCallingModel(GenericFakeChatModel):
    """LangChain's generic fake model, accepting tools (the agent binds them; the script decides calls)."""

    calls: int = 0

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> FakeToolCallingModel:
        return self

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return super()._generate(*args, **kwargs)


def looping_model() -> FakeToolCallingModel:
    """A model that calls `search` forever, 500 tokens a turn: it would overspend any budget."""

    def turns() -> Iterator[AIMessage]:
        for n in itertools.count():
            yield AIMessage(
                content="",
                tool_calls=[{"name": "search", "args": {"query": f"attempt {n}"}, "id": f"call_{n}"}],
                usage_metadata={"input_tokens": 400, "output_tokens": 100, "total_tokens": 500},
                response_metadata={"model_name": "gpt-4o-mini"},
            )

    return FakeToolCallingModel(messages=turns())


@tool
def search(query: str) -> str:
    """Searches the web."""
    return f"no results for {query}"


def test_an_agent_that_would_overspend_is_stopped_before_the_call(client: runguard.Client) -> None:
    client.create_policy(budget(1200))
    model = looping_model()
    prices = runguard.PriceTable({"gpt-4o-mini": runguard.Price(input="0.15", output="0.60")})
    guard = RunguardMiddleware(client, labels={"agent": "langchain"}, max_tokens=256, prices=prices)
    agent = create_agent(model, tools=[search], middleware=[guard])

    result = agent.invoke({"messages": [HumanMessage("find the answer")]})

    # Two calls of 500 tokens fit in 1200; the third (1000 + its estimate) is refused before it is made.
    assert model.calls == 2
    final = result["messages"][-1]
    meta = final.additional_kwargs["runguard"]
    assert final.content.startswith("Stopped by runguard:") and meta["prevention_record_id"] in final.content
    record = client.get_prevention_record(meta["prevention_record_id"])
    assert record.phase == "pre" and record.policy_id == "pol_budget"

    run = client.get_run(record.run_id)
    assert run.status == "stopped" and run.labels == {"agent": "langchain"}
    assert run.totals.tokens == 1000
    # Usage was priced: 2 × (400 × 0.15 + 100 × 0.60) micro-USD.
    assert run.totals.cost_micros == 240
    # Model calls and tool calls are steps: model, search, model, search, then the refused model call.
    indexes = [d.step_index for d in client.list_decisions(run.run_id) if d.phase == "post"]
    assert indexes == [0, 1, 2, 3]


def test_a_tool_refused_by_a_skill_rule_ends_the_agent(client: runguard.Client) -> None:
    client.create_policy({"id": "pol_no_search", "name": "no search", "rule": {"kind": "skill", "deny": ["search"]}})
    model = looping_model()
    agent = create_agent(model, tools=[search], middleware=[RunguardMiddleware(client)])

    result = agent.invoke({"messages": [HumanMessage("find the answer")]})

    assert model.calls == 1
    tool_message = result["messages"][2]
    assert tool_message.type == "tool" and tool_message.status == "error"
    assert "Stopped by runguard" in tool_message.content
    final = result["messages"][-1]
    assert final.additional_kwargs["runguard"]["prevention_record_id"] is not None


def test_a_run_of_your_own_is_used_and_left_to_you(client: runguard.Client) -> None:
    with client.run(labels={"owner": "caller"}) as run:
        model = FakeToolCallingModel(
            messages=iter(
                [AIMessage(content="done", usage_metadata={"input_tokens": 10, "output_tokens": 5, "total_tokens": 15})]
            )
        )
        agent = create_agent(model, tools=[search], middleware=[RunguardMiddleware(client, run=run)])
        result = agent.invoke({"messages": [HumanMessage("hi")]})
        assert result["messages"][-1].content == "done"
        assert client.get_run(run.run_id).status == "running"
    finished = client.get_run(run.run_id)
    assert finished.status == "succeeded" and finished.totals.tokens == 15


@pytest.mark.anyio
async def test_an_async_agent_is_stopped_the_same_way(client: runguard.Client) -> None:
    client.create_policy(budget(1200))
    model = looping_model()
    agent = create_agent(model, tools=[search], middleware=[RunguardMiddleware(client, max_tokens=256)])

    result = await agent.ainvoke({"messages": [HumanMessage("find the answer")]})

    assert model.calls == 2
    record_id = result["messages"][-1].additional_kwargs["runguard"]["prevention_record_id"]
    assert client.get_prevention_record(record_id).phase == "pre"


def test_a_model_without_usage_is_counted_approximately(client: runguard.Client) -> None:
    model = FakeToolCallingModel(messages=iter(["x" * 400]))  # plain text, no usage_metadata
    with client.run() as run:
        agent = create_agent(model, tools=[search], middleware=[RunguardMiddleware(client, run=run)])
        agent.invoke({"messages": [HumanMessage("hi")]})
    # ~4 characters a token: 100 for the answer, a few for the prompt; never zero.
    assert client.get_run(run.run_id).totals.tokens > 100
