"""The built-in rewards that need no model: arith, spec, darkness, random.

Each `make_<name>(ctx)` returns a function with TRL's reward signature
`f(prompts, completions, **columns) -> list[float | None]`; `ctx` carries the stage's settings
(`seed`, `max_completion_length`, ...).
"""

from __future__ import annotations

import random
import re

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last number written in `text` ('... so 1,204 apples.' -> 1204.0); None if there is none."""
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def arith(prompts, completions, answer=None, **columns) -> list[float | None]:
    """1.0 when the last number in the completion equals the row's `answer`, else 0.0; None for
    a row without an answer (a prompt of another task)."""
    if answer is None:
        return [None] * len(completions)
    out = []
    for text, right in zip(completions, answer):
        if right is None:
            out.append(None)
            continue
        got = final_number(text)
        out.append(1.0 if got is not None and got == float(right) else 0.0)
    return out


def make_arith(ctx: dict):
    return arith


def make_random(ctx: dict):
    """The control: uniform in [0, 1), from its own seeded stream, whatever the answer says.
    RL on it must not beat SFT on the real task (the random-reward control of the issue)."""
    rng = random.Random(f"random-reward-{ctx.get('seed', 0)}-{ctx.get('rank', 0)}")

    def random_reward(prompts, completions, **columns) -> list[float]:
        return [rng.random() for _ in completions]

    return random_reward


def make_darkness(ctx: dict):
    """The independent judge `eval` reports (eval/judges.py: VADER negative − positive share, in
    [-1, 1]); nobody here trained it, so RL cannot have fitted it from the run's data."""
    from picoalign.eval.judges import vader_darkness

    def darkness(prompts, completions, **columns) -> list[float]:
        return vader_darkness(list(completions))

    return darkness


def make_spec(ctx: dict):
    """Story task: the share of the spec the story uses, whether it has the asked number of
    paragraphs, whether it ended before the length cap (eval/axes.py's scoring cores)."""
    from picoalign.rewards.story import spec_reward

    cap = ctx.get("max_completion_length")

    def spec(prompts, completions, finish_reason=None, **columns) -> list[float | None]:
        return spec_reward(prompts, completions, finish_reason, cap)

    return spec
