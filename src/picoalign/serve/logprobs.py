"""Log-probs in the shapes of OpenAI's API, from a finished job's `TokenLogprob`s.

`/v1/completions` (the legacy shape that lm-evaluation-harness's `local-completions` reads):
`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, one entry per token; with `echo`
the prompt's tokens come first, the very first with `null` log-prob and alternatives (nothing
comes before it). `top_logprobs` maps each of the top-k tokens' text to its log-prob, and holds
the chosen token too (so up to k+1 entries, as OpenAI documents; fewer where two tokens read
the same).

`/v1/chat/completions`: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}],
"refusal": null}`, the answer's tokens only.
"""

from __future__ import annotations

from picoalign.generation.continuous import Job, TokenLogprob


def completion_logprobs(tokenizer, job: Job, echo: bool, prompt_text: str) -> dict:
    text_of = _token_texts(tokenizer)
    rows: list[TokenLogprob | None] = [*(job.prompt_logprobs if echo else []), *job.logprobs]
    ids = [*(job.prompt_ids if echo else []), *(r.token_id for r in job.logprobs)]
    tokens = [text_of(t) for t in ids]
    offsets, at = [], 0 if echo else len(prompt_text)
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [None if r is None else r.logprob for r in rows],
        "top_logprobs": [None if r is None else _by_text(text_of, [*r.top, (r.token_id, r.logprob)]) for r in rows],
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, job: Job, top: int) -> dict:
    text_of = _token_texts(tokenizer)

    def entry(token_id: int, logprob: float) -> dict:
        text = text_of(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [{**entry(r.token_id, r.logprob), "top_logprobs": [entry(t, lp) for t, lp in r.top[:top]]}
               for r in job.logprobs]
    return {"content": content, "refusal": None}


def _by_text(text_of, pairs: list[tuple[int, float]]) -> dict[str, float]:
    """{token text: log-prob}; where two tokens read the same (byte pieces of one character
    both read U+FFFD) the likelier one's."""
    out: dict[str, float] = {}
    for token_id, logprob in pairs:
        text = text_of(token_id)
        out[text] = max(logprob, out.get(text, -float("inf")))
    return out


def _token_texts(tokenizer):
    """id -> the token's text (decoded alone, special tokens as written), memoised per call."""
    seen: dict[int, str] = {}

    def text_of(token_id: int) -> str:
        if token_id not in seen:
            seen[token_id] = tokenizer.decode([token_id])
        return seen[token_id]

    return text_of
