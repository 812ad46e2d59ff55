"""Usage and cost: the numbers a step reports, from the framework's own token counts and a price table."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any


@dataclass(frozen=True)
class Price:
    """USD per 1M input and per 1M output tokens, as providers list them.

    One USD per 1M tokens is exactly one micro-USD per token, so ``cost_micros`` is
    ``input_tokens × input + output_tokens × output``, rounded up (a budget never under-counts).
    """

    input: Decimal | float | str
    output: Decimal | float | str

    def cost_micros(self, input_tokens: int, output_tokens: int) -> int:
        total = Decimal(str(self.input)) * input_tokens + Decimal(str(self.output)) * output_tokens
        return math.ceil(total)


class PriceTable:
    """Prices per model name. A model missing from the table costs nothing unless ``default`` is given;
    a dated variant (``gpt-4o-2024-08-06``) falls back to the longest listed prefix (``gpt-4o``)."""

    def __init__(self, prices: Mapping[str, Price | tuple[Any, Any]], default: Price | None = None) -> None:
        self._prices = {name: p if isinstance(p, Price) else Price(*p) for name, p in prices.items()}
        self._default = default

    def price(self, model: str | None) -> Price | None:
        if model is None:
            return self._default
        if model in self._prices:
            return self._prices[model]
        prefixes = [name for name in self._prices if model.startswith(name)]
        return self._prices[max(prefixes, key=len)] if prefixes else self._default

    def cost_micros(self, model: str | None, input_tokens: int, output_tokens: int) -> int:
        price = self.price(model)
        return price.cost_micros(input_tokens, output_tokens) if price else 0


@dataclass(frozen=True)
class Usage:
    """What a step consumed (`usage` of a post call)."""

    tokens: int = 0
    cost_micros: int = 0
    duration_ms: int | None = None

    def body(self) -> dict[str, int]:
        out = {"tokens": self.tokens, "cost_micros": self.cost_micros}
        if self.duration_ms is not None:
            out["duration_ms"] = self.duration_ms
        return out

    @classmethod
    def from_tokens(
        cls,
        input_tokens: int,
        output_tokens: int,
        *,
        model: str | None = None,
        prices: PriceTable | None = None,
        duration_ms: int | None = None,
    ) -> Usage:
        cost = prices.cost_micros(model, input_tokens, output_tokens) if prices else 0
        return cls(tokens=input_tokens + output_tokens, cost_micros=cost, duration_ms=duration_ms)

    @classmethod
    def from_openai(cls, usage: Any, *, model: str | None = None, prices: PriceTable | None = None) -> Usage:
        """From an OpenAI ``usage`` (Chat Completions ``prompt_tokens``/``completion_tokens``, Responses and
        the Agents SDK ``input_tokens``/``output_tokens``), as an object or a dict."""

        def read(*names: str) -> int:
            for name in names:
                value = usage.get(name) if isinstance(usage, Mapping) else getattr(usage, name, None)
                if isinstance(value, int):
                    return value
            return 0

        return cls.from_tokens(
            read("input_tokens", "prompt_tokens"),
            read("output_tokens", "completion_tokens"),
            model=model,
            prices=prices,
        )

    @classmethod
    def from_langchain(
        cls, usage_metadata: Mapping[str, Any] | None, *, model: str | None = None, prices: PriceTable | None = None
    ) -> Usage:
        """From a LangChain ``AIMessage.usage_metadata`` (``input_tokens``, ``output_tokens``)."""
        if not usage_metadata:
            return cls()
        return cls.from_tokens(
            int(usage_metadata.get("input_tokens", 0) or 0),
            int(usage_metadata.get("output_tokens", 0) or 0),
            model=model,
            prices=prices,
        )


def approx_tokens(text: str) -> int:
    """A provider-free token estimate (about 4 characters per token), for admission estimates only."""
    return max(1, math.ceil(len(text) / 4)) if text else 0
