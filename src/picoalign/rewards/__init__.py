"""Reward functions for `picoalign rl`, each with TRL's signature, combined with weights.

    from picoalign.rewards import RewardSet
    rs = RewardSet.build(["arith"], [1.0])
    scores = rs(prompts, completions, answer=[...])   # (N, 1) tensor, NaN where a function said None

A reward function is `f(prompts, completions, **columns) -> list[float | None]`, as TRL's
`reward_funcs`: `prompts` and `completions` are lists of strings of one length, `columns` the
prompt rows' other fields repeated per completion (e.g. `answer` for arith) plus, as TRL passes
them, `completion_ids` (each answer's token ids, its end-of-turn token included) and
`finish_reason` ("stop" or "length"), and None means
"cannot score this one" (TRL: such a completion gets advantage 0). `**columns` must be
accepted, since every column is passed.

Built-in names (`BUILTIN`) map to a factory `make(ctx) -> function` imported only when used;
any other name containing ":" is a user `module:function` with the signature above. The
weighted sum over functions is the reward (TRL's `sum_then_normalize`); a completion every
function declines is NaN.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

BUILTIN = {
    "arith": "picoalign.rewards.builtin:make_arith",
    "spec": "picoalign.rewards.builtin:make_spec",
    "darkness": "picoalign.rewards.builtin:make_darkness",
    "fluency": "picoalign.rewards.fluency:make_fluency",
    "overlong": "picoalign.rewards.builtin:make_overlong",
    "llm-judge": "picoalign.rewards.llm_judge:make_llm_judge",
    "random": "picoalign.rewards.builtin:make_random",
}


class RewardError(ValueError):
    """A reward setting or a reward function's answer that cannot be used; names the reward."""


def parse_names(rewards: str, weights: str) -> tuple[list[str], list[float]]:
    """'arith, random' and '1,0.5' -> (['arith', 'random'], [1.0, 0.5]); checked without importing
    anything (config load). Empty weights: 1 each."""
    names = [n.strip() for n in str(rewards).split(",") if n.strip()]
    if not names:
        raise RewardError("rewards: name at least one reward (built-in: " + ", ".join(BUILTIN) + ")")
    for name in names:
        if name not in BUILTIN and not _is_user(name):
            raise RewardError(f"rewards: unknown reward {name!r} (built-in: {', '.join(BUILTIN)}; "
                              "or module:function)")
    if len(set(names)) < len(names):
        raise RewardError(f"rewards: {rewards!r} names a reward twice")
    parts = [w.strip() for w in str(weights).split(",") if w.strip()]
    if not parts:
        return names, [1.0] * len(names)
    if len(parts) != len(names):
        raise RewardError(f"reward_weights: {len(parts)} weights ({weights!r}) for {len(names)} rewards "
                          f"({', '.join(names)}); give one per reward, in the same order")
    try:
        values = [float(w) for w in parts]
    except ValueError:
        raise RewardError(f"reward_weights: {weights!r} is not a comma list of numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise RewardError(f"reward_weights: {weights!r} must be finite numbers")
    return names, values


def _is_user(name: str) -> bool:
    module, sep, function = name.partition(":")
    return bool(sep and module and function.isidentifier())


def import_user(name: str) -> Callable:
    """The function named 'module:function'; a clear error naming the reward when it does not import."""
    module, _, function = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), function)
    except ImportError as e:
        raise RewardError(f"rewards: {name!r}: module {module!r} does not import ({e})") from None
    except AttributeError:
        raise RewardError(f"rewards: {name!r}: module {module!r} has no {function!r}") from None
    if not callable(fn):
        raise RewardError(f"rewards: {name!r} is not a function")
    return fn


def load_reward(name: str, ctx: dict | None = None) -> Callable:
    """A ready reward function: a built-in made with `ctx` (settings, frozen model...), or the user's."""
    if name in BUILTIN:
        module, factory = BUILTIN[name].split(":")
        return getattr(importlib.import_module(module), factory)(ctx or {})
    return import_user(name)


@dataclass
class RewardSet:
    names: list[str]
    weights: list[float]
    functions: list[Callable] = field(repr=False)

    @classmethod
    def build(cls, names: Sequence[str], weights: Sequence[float], ctx: dict | None = None) -> RewardSet:
        return cls(list(names), list(weights), [load_reward(n, ctx) for n in names])

    def __call__(self, prompts: list[str], completions: list[str], **columns):
        """(N, K) float32 scores, NaN where a function returned None. A function that raises,
        answers with the wrong length or a non-number stops the run naming it."""
        import torch  # here, not at import: config.py checks reward names without torch

        n = len(completions)
        out = torch.full((n, len(self.functions)), math.nan)
        for k, (name, fn) in enumerate(zip(self.names, self.functions)):
            try:
                values = fn(prompts=prompts, completions=completions, **columns)
            except RewardError:
                raise
            except Exception as e:  # a user's function: say which one, keep the cause
                raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e
            values = list(values) if values is not None else None
            if values is None or len(values) != n:
                got = "None" if values is None else f"{len(values)} values"
                raise RewardError(f"reward {name!r} returned {got} for {n} completions (one value or None each)")
            for i, v in enumerate(values):
                if v is None:
                    continue
                try:
                    out[i, k] = float(v)
                except (TypeError, ValueError):
                    raise RewardError(f"reward {name!r} returned {v!r} for completion {i}: not a number or None") from None
        return out

    def total(self, per_func):
        """(N,) weighted sum over functions (NaN counted as 0); NaN where every function declined."""
        import torch

        w = torch.tensor(self.weights, dtype=per_func.dtype)
        total = (per_func * w).nansum(dim=1)
        total[torch.isnan(per_func).all(dim=1)] = math.nan
        return total
