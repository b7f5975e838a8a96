"""`fluency`: the completion's mean per-token log-prob under a frozen model that is not trained
(default: the run's base model), minus a penalty for repetition, so that incoherent or looping
text scores low while the policy cannot raise the score by moving its own weights.

    reward = fluency(frozen, text) - fluency_repetition_weight * rep-4(text)

Both parts are eval's scoring cores (eval/axes.py: `fluency`, the mean log-prob of the answer
as plain text; `repetition`, the share of repeated word 4-grams), so RL optimises what eval
reports. Context settings: `fluency_model` (a model spec; empty: the base model),
`fluency_repetition_weight` (default 1.0), `device`, `max_completion_length`.
"""

from __future__ import annotations


def make_fluency(ctx: dict):
    from picoalign.eval.axes import fluency, repetition
    from picoalign.models.load import load_model

    spec = ctx.get("fluency_model") or ctx.get("base_model")
    if not spec:
        raise ValueError("fluency: no frozen model to score with (set fluency_model)")
    model, tokenizer = load_model(spec, ctx.get("device", "cpu"))
    model.eval().requires_grad_(False)
    weight = float(ctx.get("fluency_repetition_weight", 1.0))
    cap = int(ctx.get("max_completion_length") or 512)

    def fluency_reward(prompts, completions, **columns) -> list[float | None]:
        logps = fluency(model, tokenizer, list(completions), max_tokens=cap)
        return [None if lp != lp else lp - weight * repetition(c) for lp, c in zip(logps, completions)]

    return fluency_reward
