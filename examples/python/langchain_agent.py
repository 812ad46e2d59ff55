"""A LangChain v1 agent (``create_agent``) whose model and tool calls are guarded by runguard middleware.
The model is LangChain's fake chat model scripted to call a tool forever; runguard ends the agent before
the call that would overspend. Needs ``pip install 'runguard[langchain]'``."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool

import runguard
from runguard.langchain import RunguardMiddleware

from _common import connect, ensure_budget


class FakeToolCallingModel(GenericFakeChatModel):
    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> FakeToolCallingModel:
        return self


def turns() -> Iterator[AIMessage]:
    for n in itertools.count():
        yield AIMessage(
            content="",
            tool_calls=[{"name": "search", "args": {"query": f"attempt {n}"}, "id": f"call_{n}"}],
            usage_metadata={"input_tokens": 400, "output_tokens": 100, "total_tokens": 500},
        )


@tool
def search(query: str) -> str:
    """Searches the web."""
    return f"no results for {query}"


def main() -> None:
    with connect() as client:
        ensure_budget(client)
        guard = RunguardMiddleware(
            client,
            labels={"example": "langchain"},
            model_name="gpt-4o-mini",
            prices=runguard.PriceTable({"gpt-4o-mini": ("0.15", "0.60")}),
            max_tokens=256,
        )
        agent = create_agent(FakeToolCallingModel(messages=turns()), tools=[search], middleware=[guard])
        result = agent.invoke({"messages": [HumanMessage("find the answer")]})
        final = result["messages"][-1]
        print(final.content)
        meta = final.additional_kwargs.get("runguard")
        if meta:
            print(f"prevention record {meta['prevention_record_id']}")


if __name__ == "__main__":
    main()
