"""Usage and cost from the frameworks' numbers and a price table (no node needed)."""

from __future__ import annotations

from types import SimpleNamespace

import runguard
from runguard._base import clip


def test_prices_per_million_tokens_are_micro_usd_per_token_rounded_up() -> None:
    price = runguard.Price(input="0.15", output="0.60")
    assert price.cost_micros(1_000_000, 0) == 150_000  # $0.15
    assert price.cost_micros(1, 1) == 1  # 0.75 micro-USD is never free
    assert price.cost_micros(0, 0) == 0


def test_a_dated_model_falls_back_to_its_listed_prefix() -> None:
    table = runguard.PriceTable({"gpt-4o": ("2.5", "10"), "gpt-4o-mini": ("0.15", "0.6")})
    assert table.cost_micros("gpt-4o-mini-2024-07-18", 1000, 1000) == 750
    assert table.cost_micros("gpt-4o-2024-08-06", 1000, 1000) == 12_500
    assert table.cost_micros("unknown", 1000, 1000) == 0


def test_usage_from_openai_and_langchain_shapes() -> None:
    table = runguard.PriceTable({"m": ("1", "2")})
    chat = {"prompt_tokens": 10, "completion_tokens": 5}
    assert runguard.Usage.from_openai(chat, model="m", prices=table) == runguard.Usage(tokens=15, cost_micros=20)
    responses = SimpleNamespace(input_tokens=10, output_tokens=5)
    assert runguard.Usage.from_openai(responses).tokens == 15
    assert runguard.Usage.from_langchain({"input_tokens": 3, "output_tokens": 4}).tokens == 7
    assert runguard.Usage.from_langchain(None) == runguard.Usage()


def test_texts_are_cut_on_character_boundaries_in_bytes() -> None:
    assert clip("héllo", 2) == "h"
    assert clip("héllo", 3) == "hé"
    assert clip("short", 100) == "short"
