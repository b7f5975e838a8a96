"""`fluency`: the completion's mean per-token log-prob under a frozen model that is not trained
(default: the run's base model), minus a penalty for repeated n-grams, so that incoherent or
looping text scores low while the policy cannot raise the score by moving its own weights.

    reward = mean log p_frozen(token | prompt, earlier tokens) - repetition_weight * repeated share

The log-probs come from one packed forward per batch (prompt once, its G answers branching from
it: train/batching.py), in fp32 log-softmax. Context settings: `fluency_model` (a model spec),
`fluency_repetition_weight` (default 1.0), `device`.
"""

from __future__ import annotations

import torch

from picoalign.train.batching import Encoded, pack_examples, render_answer, render_prompt


def repeated_share(text: str, n: int = 3) -> float:
    """Share of the word n-grams of `text` that already occurred earlier in it (0: no repeats)."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@torch.no_grad()
def mean_logprobs(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 8) -> list[float]:
    """Mean per-token log-prob of each completion (as an assistant turn after its prompt)."""
    from picoalign.train.batching import forward_logps

    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        examples = [Encoded(render_prompt(tokenizer, p), [render_answer(tokenizer, p, c)])
                    for p, c in zip(prompts[start:start + batch_size], completions[start:start + batch_size])]
        batch = pack_examples(examples, tokenizer.pad_token_id or 0).to(device)
        tokens = forward_logps(model, batch).float()
        sums = torch.zeros(batch.n_seqs, device=device).index_add_(0, batch.seq_index, tokens)
        out += (sums / batch.token_counts().to(device)).tolist()
    return out


def make_fluency(ctx: dict):
    from picoalign.models.load import load_model

    spec = ctx.get("fluency_model") or ctx.get("base_model")
    if not spec:
        raise ValueError("fluency: no frozen model to score with (set fluency_model)")
    model, tokenizer = load_model(spec, ctx.get("device", "cpu"))
    model.eval().requires_grad_(False)
    weight = float(ctx.get("fluency_repetition_weight", 1.0))

    def fluency(prompts, completions, **columns) -> list[float]:
        logps = mean_logprobs(model, tokenizer, list(prompts), list(completions))
        return [lp - weight * repeated_share(c) for lp, c in zip(logps, completions)]

    return fluency
