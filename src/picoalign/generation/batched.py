"""Batched, seeded generation through the chat template (transformers `generate`).

`generate` returns the answers' text (eval uses it); `generate_full` also returns the token
counts and why each answer ended, which `picoalign generate` and the server report. An answer
ends at an end-of-turn token (`end_ids`), at one of the `stop` strings (cut off, not included),
or after `max_new_tokens`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from picoalign.models.chat import render_prompt

# End-of-turn tokens of common chat templates; one counts only where the template writes it.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>", "</s>")


@dataclass
class Sampling:
    """How to pick tokens. Greedy when `greedy` or `temperature == 0`; top_p 1 and top_k 0 are off."""

    max_new_tokens: int = 200
    greedy: bool = True
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0  # > 1 divides the logits of tokens already in the row (CTRL)

    def generate_kwargs(self) -> dict:
        penalty = {"repetition_penalty": self.repetition_penalty} if self.repetition_penalty != 1 else {}
        if self.greedy or self.temperature == 0:
            return {"do_sample": False, **penalty}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                **penalty}


@dataclass
class Generation:
    """One answer: its text, the tokens it read and wrote, and `finish_reason` stop | length.

    `token_ids` are the answer's own token ids as sampled (the end-of-turn token included where
    one ended it; nothing after a stop string's token): what RL scores the policy's log-probs on."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    token_ids: list[int] = field(default_factory=list)


def end_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the tokenizer's and the model's EOS, and the end-of-turn
    token the chat template writes after each turn (where that is not the EOS)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([model_eos] if isinstance(model_eos, int) else model_eos or [])
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    named = [t for t in END_OF_TURN if t in template]
    if named:
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in named if t in vocab)
    return sorted(ids)


def cancel_criteria(cancel: threading.Event | None) -> list:
    """transformers stopping criteria that end every row at the next decode step once `cancel`
    is set (a client that went away); none without an event."""
    if cancel is None:
        return []
    from transformers import StoppingCriteria

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    return [Cancelled()]


def encode_prompt(tokenizer, prompt, raw: bool = False) -> list[int]:
    """Prompt ids: through the chat template with the generation prompt, or as plain text."""
    if not raw:
        return render_prompt(tokenizer, prompt)
    if not isinstance(prompt, str):
        raise ValueError("a raw prompt must be plain text, not a list of messages")
    return tokenizer(prompt)["input_ids"]


def cut_at_stop(text: str, stop) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def held_back(text: str, stop) -> int:
    """Characters at the end of a growing answer not to show yet: the start of a stop string
    that may be coming, or a character whose bytes are not all decoded yet (U+FFFD)."""
    partial = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    undecoded = len(text) - len(text.rstrip("\ufffd"))
    return max(partial, undecoded)


def finish(tokenizer, new_ids: list[int], ends: list[int], stop, prompt_tokens: int) -> Generation:
    """The answer in `new_ids` (what generate wrote after the prompt, padding included)."""
    first_end = next((i for i, t in enumerate(new_ids) if t in ends), None)
    body = new_ids if first_end is None else new_ids[:first_end]
    text, stopped = cut_at_stop(tokenizer.decode(body, skip_special_tokens=True), stop)
    if stopped:  # generation stopped on the string; what follows it is padding
        return Generation(text, prompt_tokens, len(body), "stop", list(body))
    if first_end is not None:
        return Generation(text, prompt_tokens, first_end + 1, "stop", list(new_ids[: first_end + 1]))
    return Generation(text, prompt_tokens, len(new_ids), "length", list(new_ids))


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
    from picoalign.generation.engine import Engine, check_request, context_length

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    encoded = [encode_prompt(tokenizer, p, raw) for p in prompts]
    context = context_length(model)
    for ids in encoded:
        check_request(len(ids), sampling, context)
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
