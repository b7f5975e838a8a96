"""What an answer is and how it ends: sampling settings, the answer record, end-of-turn ids,
stop strings. Shared by the decode engine (engine.py, sampling.py) and its callers (batched.py,
continuous.py, stream.py), below all of them so none imports the other for these."""

from __future__ import annotations

from dataclasses import dataclass, field

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
