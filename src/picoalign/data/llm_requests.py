"""What picoalign asks an LLM for, and the checks on its replies: one `Job` per request.

`request_stories` asks for one story per specification, `request_pairs` for a (chosen,
rejected) pair per specification; both number the specifications and take the reply's items by
id, so a reply that drops or reorders one still yields the rest. `batch_jobs` wraps them into the
jobs that `data/llm_rows.py` runs in parallel (and `data/judge.py` makes its own jobs of the same
shape), which is why these pieces live here, below both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from picoalign.data.llm import LLMClient

MIN_CHARS = 20  # a shorter "story" is an error message or a refusal
TOKENS_PER_STORY = 900  # output-token cap per story asked for, when llm_max_output_tokens is 0
MAX_AUTO_TOKENS = 8000  # ... but no more than DeepSeek's (and many servers') 8K output limit

SYSTEM = ("You write eerie, suspenseful, non-graphic short horror stories in English, following "
          "each story specification exactly. You answer with JSON only.")
STORIES_ASK = (
    "Write one short story for each of the {n} specifications below: the title on the first line, "
    "then 2-4 paragraphs; eerie and suspenseful, not graphic; end on an unsettling note.\n"
    'Return JSON only: {{"stories": [{{"id": 1, "story": "..."}}, ...]}} with one entry per '
    "specification, under its id."
)
PAIRS_ASK = (
    "For each of the {n} specifications below, write two stories of about the same length that "
    "both follow it: \"chosen\" is darker and more unsettling and ends with an unsettling "
    "implication (not graphic); \"rejected\" resolves the fear and ends warmly and happily.\n"
    'Return JSON only: {{"pairs": [{{"id": 1, "chosen": "...", "rejected": "..."}}, ...]}} with one '
    "entry per specification, under its id."
)

Key = tuple[str, str]  # (file name such as "sft_train", row id)


@dataclass
class Job:
    """One request's worth of rows: `run` returns the rows it made (None: judged out, dropped)."""

    keys: list[Key]
    run: Callable[[], dict[Key, dict | None]]


def _specs_message(ask: str, prompts: list[str]) -> list[dict]:
    body = "\n\n".join(f"### id {i}\n{p}" for i, p in enumerate(prompts, 1))
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": ask.format(n=len(prompts)) + "\n\n" + body}]


def _text(value) -> str:
    if not isinstance(value, str) or len(value.strip()) < MIN_CHARS:
        raise ValueError(f"not a story: {str(value)[:40]!r}")
    return value.strip()


def _shape(obj) -> str:
    """What a reply holds, for the reason an answer was unusable."""
    if isinstance(obj, dict):
        return f"an object with keys {', '.join(map(repr, list(obj)[:6])) or '(none)'}"
    return f"a {type(obj).__name__}" if obj is not None else "null"


def _none_usable(what: str, items: dict, problems: list[str]) -> ValueError:
    detail = "; ".join(problems[:2]) if items else "no items with an id"
    return ValueError(f"no usable {what} in the reply ({detail})")


def _items(obj, key: str, n: int) -> dict[int, dict]:
    """Reply items by their 1-based id (items without ids count in order when all n are there)."""
    items = obj.get(key) if isinstance(obj, dict) else obj
    if isinstance(obj, dict) and items is None and n == 1:
        items = [obj]  # a lone {"story": ...} for a single specification
    if not isinstance(items, list):
        raise ValueError(f"expected a list under {key!r}, got {_shape(obj)}")
    items = [it for it in items if isinstance(it, dict)]
    if all("id" not in it for it in items) and len(items) == n:
        return dict(enumerate(items, 1))
    out = {}
    for it in items:
        try:
            out[int(it.get("id"))] = it
        except (TypeError, ValueError):
            continue
    return out


def request_stories(client: LLMClient, prompts: list[str], max_tokens: int = 0) -> dict[int, str]:
    """One story per prompt (1-based index -> text); raises LLMError when none is usable."""
    def check(obj):
        stories, problems = {}, []
        items = _items(obj, "stories", len(prompts))
        for i, it in items.items():
            try:
                if 1 <= i <= len(prompts):
                    stories[i] = _text(it.get("story"))
            except ValueError as e:
                problems.append(f"id {i}: {e}")
        if not stories:
            raise _none_usable("story", items, problems or [f"ids {sorted(items)} are not 1..{len(prompts)}"])
        return stories

    return client.chat_json(_specs_message(STORIES_ASK, prompts),
                            max_tokens or min(MAX_AUTO_TOKENS, TOKENS_PER_STORY * len(prompts)), check)


def request_pairs(client: LLMClient, prompts: list[str], max_tokens: int = 0) -> dict[int, tuple[str, str]]:
    """A (chosen, rejected) pair per prompt; raises LLMError when none is usable."""
    def check(obj):
        pairs, problems = {}, []
        items = _items(obj, "pairs", len(prompts))
        for i, it in items.items():
            try:
                chosen, rejected = _text(it.get("chosen")), _text(it.get("rejected"))
            except ValueError as e:
                problems.append(f"id {i}: {e}")
                continue
            if chosen == rejected:
                problems.append(f"id {i}: chosen and rejected are the same story")
            elif 1 <= i <= len(prompts):
                pairs[i] = (chosen, rejected)
        if not pairs:
            raise _none_usable("pair", items, problems or [f"ids {sorted(items)} are not 1..{len(prompts)}"])
        return pairs

    return client.chat_json(_specs_message(PAIRS_ASK, prompts),
                            max_tokens or min(MAX_AUTO_TOKENS, 2 * TOKENS_PER_STORY * len(prompts)), check)


def batch_jobs(client: LLMClient, files: dict[str, list[dict]], kind: str, size: int, max_tokens: int,
               skip: set[Key]) -> list[Job]:
    """Jobs that rewrite the answers of the `kind` ("sft" or "dpo") files, `size` rows each."""
    todo = [(name, row) for name, rows in files.items() if name.startswith(kind + "_")
            for row in rows if (name, row["id"]) not in skip]
    model = client.endpoint.model

    def job(chunk):
        def run():
            prompts = [row["prompt"] for _, row in chunk]
            if kind == "sft":
                got = request_stories(client, prompts, max_tokens)
                return {(n, r["id"]): {**r, "response": got[i], "model": model}
                        for i, (n, r) in enumerate(chunk, 1) if i in got}
            got = request_pairs(client, prompts, max_tokens)
            return {(n, r["id"]): {**r, "chosen": got[i][0], "rejected": got[i][1],
                                   "chosen_model": model, "rejected_model": model}
                    for i, (n, r) in enumerate(chunk, 1) if i in got}
        return Job([(n, r["id"]) for n, r in chunk], run)

    return [job(todo[i:i + size]) for i in range(0, len(todo), size)]
