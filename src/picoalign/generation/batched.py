"""Batched, seeded generation through the chat template, on the decode engine (`engine.py`).

`generate` returns the answers' text (eval uses it); `generate_full` also returns the token
counts and why each answer ended, which `picoalign generate` and the server report. An answer
ends at an end-of-turn token (`end_ids`), at one of the `stop` strings (cut off, not included),
or after `max_new_tokens`.
"""

from __future__ import annotations

import threading

import torch

from picoalign.generation.answers import (  # noqa: F401  (re-exported: the API callers import from here)
    END_OF_TURN,
    Generation,
    Sampling,
    cut_at_stop,
    encode_prompt,
    end_ids,
    finish,
    held_back,
)
from picoalign.generation.engine import Engine, check_request, context_length
from picoalign.generation.kv import sampling_mode


def generate_full(model, tokenizer, prompts: list, sampling: Sampling, batch_size: int = 8,
                  raw: bool = False, cancel: threading.Event | None = None, n: int = 1) -> list[Generation]:
    """Answers to `prompts` (strings or message lists), up to `batch_size` rows decoding at once
    on the decode engine (`engine.py`); `raw` skips the template. Every prompt is checked before
    any decoding (ValueError). Once `cancel` is set, every answer ends at the next token
    ("length").

    `n` answers per prompt (RL's group, OpenAI's `n`) come back prompt by prompt: prompt 0's n,
    then prompt 1's; the prompt runs once and its cache is shared by its n rows. Answer j of
    prompt i samples with its own generator seeded `sampling.seed + i * n + j`, so it is the same
    whatever `batch_size` or the other prompts.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    encoded = [encode_prompt(tokenizer, p, raw) for p in prompts]
    context = context_length(model)
    for ids in encoded:
        check_request(len(ids), sampling, context)
    with sampling_mode(model):  # once for the call, not at every step (see sampling_mode)
        return _generate(model, tokenizer, encoded, sampling, batch_size, cancel, n)


def _generate(model, tokenizer, encoded: list[list[int]], sampling: Sampling, batch_size: int,
              cancel: threading.Event | None, n: int) -> list[Generation]:
    engine = Engine(model, tokenizer, max_rows=max(1, batch_size))
    with torch.inference_mode():
        engine.kv.reserve(max(map(len, encoded), default=0) + sampling.max_new_tokens)
    todo = [(i, j) for i in range(len(encoded)) for j in range(n)]
    results: dict[tuple[int, int], Generation] = {}
    first_of: dict[int, object] = {}  # prompt -> a live row holding its prompt (to share)
    while todo or engine.rows:
        while todo and engine.free:
            i, j = todo.pop(0)
            row = engine.add(encoded[i], sampling, seed=sampling.seed + i * n + j, owner=(i, j),
                             share=first_of.get(i))
            first_of.setdefault(i, row)
        if cancel is not None and cancel.is_set():
            for row in list(engine.rows):
                engine.remove(row, "length")
                results[row.owner] = finish(tokenizer, row.new_ids, engine.ends, sampling.stop, len(row.prompt_ids))
            todo = []
            break
        for row in engine.step():
            if row.error is not None:
                raise row.error
            if row.done:
                results[row.owner] = finish(tokenizer, row.new_ids, engine.ends, sampling.stop, len(row.prompt_ids))
                if first_of.get(row.owner[0]) is row:  # another live row of the prompt shares it now
                    others = [r for r in engine.rows if r.owner[0] == row.owner[0] and not r.done]
                    first_of.pop(row.owner[0]) if not others else first_of.update({row.owner[0]: others[0]})
    return [results.get((i, j)) or finish(tokenizer, [], engine.ends, (), len(encoded[i]))
            for i in range(len(encoded)) for j in range(n)]


def generate(
    model,
    tokenizer,
    prompts: list,
    max_new_tokens: int = 200,
    greedy: bool = True,
    temperature: float = 0.8,
    top_p: float = 0.9,
    seed: int = 0,
    batch_size: int = 8,
    raw: bool = False,
    top_k: int = 0,
    stop: tuple[str, ...] = (),
    repetition_penalty: float = 1.0,
) -> list[str]:
    """The answers' text only (stripped); see `generate_full`."""
    sampling = Sampling(max_new_tokens, greedy, temperature, top_p, top_k, seed, tuple(stop), repetition_penalty)
    return [g.text.strip() for g in generate_full(model, tokenizer, prompts, sampling, batch_size, raw)]
