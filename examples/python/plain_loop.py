"""A plain agent loop guarded step by step: admission with an estimate, report with the usage, stopped
before the call that would overspend. Run a node (`cargo run --release -p runguard-node --bin runguard --
serve`), then `python examples/python/plain_loop.py`."""

from __future__ import annotations

import logging

import runguard

from _common import connect, ensure_budget

PRICES = runguard.PriceTable({"fake-llm": runguard.Price(input="0.15", output="0.60")})


def fake_llm(prompt: str, max_tokens: int) -> tuple[str, dict[str, int]]:
    """Stands in for a provider call: answers 400 prompt tokens and 100 completion tokens."""
    return f"thought about {prompt!r}", {"prompt_tokens": 400, "completion_tokens": min(100, max_tokens)}


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with connect() as client:
        ensure_budget(client)
        try:
            with client.run(labels={"example": "plain-loop"}) as run:
                for turn in range(100):  # a loop that never decides it is done
                    with run.step("llm", estimate=400 + 256, input_text=f"turn {turn}") as step:
                        max_tokens = step.clamp(256)  # never ask for more than the budget has left
                        text, usage = fake_llm(f"turn {turn}", max_tokens)
                        step.report(
                            runguard.Usage.from_openai(usage, model="fake-llm", prices=PRICES), output_text=text
                        )
                    print(f"turn {turn}: {run.remaining.tokens if run.remaining else '?'} tokens left")
        except runguard.Blocked as blocked:
            print(f"stopped: {blocked.reason}")
            print(f"prevention record {blocked.record_id}")


if __name__ == "__main__":
    main()
