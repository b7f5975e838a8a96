"""The built-in rewards that need no model: arith, spec, darkness, overlong, random.

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


def soft_overlong_punishment(lengths, max_completion_len: int, soft_punish_cache: int) -> list[float]:
    """DAPO's length penalty (Yu et al. 2025, arXiv 2503.14476, eq. 13; TRL's
    `get_soft_overlong_punishment`): 0 up to `max_completion_len - soft_punish_cache` tokens, then
    falling linearly to -1 at `max_completion_len`, -1 beyond. It takes nothing from an answer
    that ends in time and pays nothing for being short."""
    start = max_completion_len - soft_punish_cache
    out = []
    for n in lengths:
        if n <= start:
            out.append(0.0)
        elif n <= max_completion_len:
            out.append((start - n) / soft_punish_cache)
        else:
            out.append(-1.0)
    return out


def make_overlong(ctx: dict):
    """`overlong`: the soft overlong punishment on each completion's token count, with the
    stage's `max_completion_length` and `soft_punish_cache` (0: a quarter of the cap). Why a
    reward and not only `mask_truncated_completions`: a reward that pays for length (a mean
    log-prob, a count of the spec's words) drives the rollouts to the cap, and masking the cut
    ones still pushes down every answer that ended below its group's mean, its end token too."""
    cap = int(ctx.get("max_completion_length") or 64)
    cache = int(ctx.get("soft_punish_cache") or 0) or max(1, cap // 4)

    def overlong(prompts, completions, completion_ids=None, **columns) -> list[float]:
        if completion_ids is None:
            raise ValueError("overlong needs completion_ids (the answers' token ids)")
        return soft_overlong_punishment([len(ids) for ids in completion_ids], cap, cache)

    return overlong
