"""Pure scoring cores for the axes a reader judges a story on: spec, paragraphs, repetition,
finished, fluency. `eval` scores every sample with them and the RL stage wraps them as rewards,
so each takes plain text (or token ids) and returns plain floats, with no state of its own.

- `spec_coverage(prompt, story)`: how much of the story specification the story uses, in [0, 1].
  The spec is read from the prompt text itself (the `Protagonist:` … lines that
  `data/stories.format_prompt` writes), so a reward function that only gets `prompts,
  completions` can score it. A field counts by word recall: the protagonist by their first name,
  every other field by the share of its content words the story uses.
- `paragraphs_ok(story, prompt)`: 1.0 when the story has the asked number of paragraphs (the
  prompt's "2-4 paragraphs"; 2-4 when it asks none), a leading title line not counted.
- `repetition(story)`: rep-4, the share of the story's word 4-grams that repeat an earlier one
  (Welleck et al. 2019); `distinct_n(story, 2)`, the share of its 2-grams that are distinct
  (Li et al. 2016).
- `finished(...)`: 1.0 when the answer ended by itself (end-of-turn token or stop string), not
  at the length cap.
- `fluency(model, tokenizer, answers)`: the mean per-token log-probability of each answer, as
  plain text, under a frozen scoring model. It is not conditioned on the prompt, so it measures
  the prose and not whether it follows the spec; a language model finds repeated text likely,
  which is why repetition is an axis of its own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

# The spec fields a story should use, as `format_prompt` labels them (title and twist are left
# out: a good story need not print its title or spell out its twist).
SPEC_FIELDS = {
    "protagonist": "Protagonist",
    "supporting_character": "Supporting character",
    "important_object": "Important object",
    "setting": "Setting",
    "taboo_rule": "Taboo rule",
}
DEFAULT_PARAGRAPHS = (2, 4)
# Words that carry no content of a spec field: a story using "the" says nothing about it.
STOPWORDS = frozenset("""
a an the of to in on at by for from with without into onto over under after before about as and or
but nor not no never every each all any some one who whom whose which that this these those it its
is are was were be been being has have had do does did will would can could may might must shall
should than then there their them they he she his her him you your we our us i me my only so too
very just what when where while how why if
""".split())
_WORD = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?")


def _text(prompt) -> str:
    """A prompt as text: a string, or the contents of a list of chat messages."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt)


def parse_spec(prompt) -> dict[str, str]:
    """The spec fields found in a prompt's `Label: value` lines (absent ones left out)."""
    found = {}
    for key, label in SPEC_FIELDS.items():
        m = re.search(rf"^\s*{re.escape(label)}:[ \t]*(.+?)\s*$", _text(prompt), re.MULTILINE | re.IGNORECASE)
        if m:
            found[key] = m.group(1)
    return found


def _stem(word: str) -> str:
    """A crude stem so "knocks"/"knock" and "house's"/"house" match: possessive and plural -s off."""
    word = re.sub(r"['’]s$", "", word)
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def content_words(text: str) -> set[str]:
    """Stemmed lower-case words of `text` that are not stopwords."""
    return {_stem(w) for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def field_recall(key: str, value: str, story_words: set[str]) -> float:
    """How far the story uses one field: the protagonist's first name (1 or 0), or the share of
    the field's content words found in the story."""
    if key == "protagonist":
        name = _WORD.findall(value.split(",")[0].lower())
        return float(bool(name) and _stem(name[0]) in story_words)
    words = content_words(value)
    return len(words & story_words) / len(words) if words else 1.0


def spec_coverage(prompt, story: str) -> float | None:
    """Mean field recall over the spec fields the prompt names, in [0, 1]; None when the prompt
    has no spec (not a story prompt), so callers can skip it rather than score it 0."""
    spec = parse_spec(prompt)
    if not spec:
        return None
    words = content_words(story)
    return sum(field_recall(k, v, words) for k, v in spec.items()) / len(spec)


def asked_paragraphs(prompt) -> tuple[int, int]:
    """The paragraph range a prompt asks for ("2-4 paragraphs", "3 paragraphs"); 2-4 if none."""
    text = _text(prompt) if prompt is not None else ""
    m = re.search(r"(\d+)\s*(?:[-–]|to)\s*(\d+)\s+paragraphs", text, re.IGNORECASE)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = re.search(r"(\d+)\s+paragraphs", text, re.IGNORECASE)
    return (int(m.group(1)),) * 2 if m else DEFAULT_PARAGRAPHS


def _is_title(line: str) -> bool:
    """A short line with no sentence end: a title, not a paragraph."""
    return len(line.split()) <= 8 and not line.rstrip().endswith((".", "!", "?", '"', "”", "…"))


def paragraph_count(story: str) -> int:
    """Non-empty lines or blank-line-separated blocks, a leading title line not counted."""
    lines = [line.strip() for line in story.splitlines() if line.strip()]
    if len(lines) > 1 and _is_title(lines[0]):
        lines = lines[1:]
    return len(lines)


def paragraphs_ok(story: str, prompt=None) -> float:
    """1.0 when the story has as many paragraphs as the prompt asks for, else 0.0."""
    lo, hi = asked_paragraphs(prompt)
    return float(lo <= paragraph_count(story) <= hi)


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def repetition(story: str, n: int = 4) -> float:
    """rep-n: the share of word n-grams that repeat one seen earlier in the story (0 = none,
    near 1 = a loop); 0.0 for a text shorter than n words."""
    grams = _ngrams(story, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(story: str, n: int = 2) -> float:
    """distinct-n: the share of word n-grams that are distinct; 0.0 for a text shorter than n words."""
    grams = _ngrams(story, n)
    return len(set(grams)) / len(grams) if grams else 0.0


def finished(finish_reason: str | None = None, token_ids: Sequence[int] | None = None,
             end_ids: Sequence[int] = (), max_new_tokens: int | None = None) -> float:
    """1.0 when the answer ended by itself. From a `finish_reason` (stop | length) where known;
    else from its token ids: ended by an end-of-turn id, or shorter than the cap."""
    if finish_reason is not None:
        return float(finish_reason == "stop")
    if token_ids is None:
        raise ValueError("finished() needs a finish_reason or the answer's token_ids")
    if token_ids and token_ids[-1] in set(end_ids):
        return 1.0
    return float(max_new_tokens is not None and len(token_ids) < max_new_tokens)


def _answer_ids(tokenizer, answer: str, max_tokens: int) -> list[int]:
    """The answer as plain text, after the BOS token where the tokenizer has one (so the first
    word is predicted too); cut at `max_tokens` answer tokens."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"][:max_tokens]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return ([bos] if bos is not None else []) + ids


@torch.no_grad()
def fluency(model, tokenizer, answers: Sequence[str], batch_size: int = 8, max_tokens: int = 512,
            device=None, logit_budget: int = 2**27) -> list[float]:
    """Mean per-token log-probability (nats, <= 0, higher = more fluent) of each answer under
    `model`, frozen: no gradients, up to `batch_size` right-padded rows a forward, sorted by
    length, fewer where rows x width x vocabulary would pass `logit_budget` logits (a 262k-word
    vocabulary makes the logits the largest tensor). NaN for an answer with no token to score."""
    device = device or next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = [_answer_ids(tokenizer, a, max_tokens) for a in answers]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [math.nan] * len(seqs)
    start = 0
    while start < len(order):
        width = max(len(seqs[order[start]]), 2)
        rows = max(1, min(batch_size, logit_budget // (width * vocab)))
        chunk = order[start:start + rows]
        width = max(max(len(seqs[i]) for i in chunk), 2)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):
            ids[r, :len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
            mask[r, :len(seqs[i])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for r, i in enumerate(chunk):
            n = len(seqs[i]) - 1  # positions that predict a real next token
            if n > 0:
                lp = logits[r, :n].float().log_softmax(-1)
                out[i] = lp.gather(-1, ids[r, 1:n + 1, None].to(lp.device)).mean().item()
        start += len(chunk)
    return out
