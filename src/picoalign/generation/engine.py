"""The decode engine every generating path shares: `generate_full` (eval, `picoalign
generate`, RL rollouts), `chat`'s stream and the server's continuous batcher.

    engine = Engine(model, tokenizer, max_rows=32)
    row = engine.add(prompt_ids, Sampling(max_new_tokens=64), seed=0)   # joins at the next step
    while engine.rows:
        for row in engine.step():        # rows that got a token, finished or failed this step
            ...                          # row.new_ids, row.text, row.finish_reason, row.error

A step decodes one token for every row that is decoding, then prefills waiting prompts in
chunks of at most `prefill_chunk` tokens in all, so a long prompt is spread over several steps
instead of stalling the rows already decoding. A row added with `share=other` (the n answers of
one prompt) does not run the prompt: once `other`'s prompt is in the cache it is copied to the
new row's slot, and its first token is drawn from `other`'s last prompt logits.

Rows own the slots 0..len(rows)-1 of the KV cache (`kv.py`); a finished row leaves at the end
of the step and the last row moves into its slot. Sampling is vectorised over the rows, with a
generator per row (`sampling.py`). The model runs in eval mode under `torch.inference_mode`;
a peft model's adapters stay live (nothing is merged).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from picoalign.generation.answers import Sampling, cut_at_stop, end_ids
from picoalign.generation.kv import LlamaKV, backend_for, causal_lm
from picoalign.generation.sampling import RowSettings

MAX_STOP_STRINGS = 16


def context_length(model) -> int:
    return getattr(causal_lm(model).config, "max_position_embeddings", None) or 2048


def check_request(prompt_len: int, s: Sampling, context: int, allow_zero: bool = False) -> None:
    """A clear error before any decoding for what cannot be generated."""
    if prompt_len < 1:
        raise ValueError("the prompt is empty")
    if prompt_len >= context:
        raise ValueError(f"the prompt ({prompt_len} tokens) does not fit the model's context of {context} tokens")
    if s.max_new_tokens < (0 if allow_zero else 1):
        raise ValueError(f"max_new_tokens must be at least 1, got {s.max_new_tokens}")
    if prompt_len + s.max_new_tokens > context:
        raise ValueError(f"the prompt ({prompt_len} tokens) and max_new_tokens ({s.max_new_tokens}) exceed the "
                         f"model's context of {context} tokens")
    if not 0 < s.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {s.top_p}")
    if s.top_k < 0 or s.temperature < 0:
        raise ValueError("top_k and temperature must not be negative")
    if s.repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive, got {s.repetition_penalty}")
    if len(s.stop) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(s.stop)}")


@dataclass(eq=False)
class Row:
    """One answer being generated."""

    prompt_ids: list[int]
    sampling: Sampling
    seed: int
    share: Row | None = None  # take the prompt's cache from this row
    echo: bool = False  # keep the logits at every prompt position (`prompt_logits`)
    keep_logits: bool = False  # keep each step's raw logits (`logits`) for log-probs
    track_text: bool = False  # keep `text` up to date every token (streaming)
    owner: object = None  # whoever added the row (the batcher's job)
    new_ids: list[int] = field(default_factory=list)
    text: str = ""
    filled: int = 0  # prompt tokens in the cache
    finish_reason: str | None = None
    error: BaseException | None = None
    logits: torch.Tensor | None = None
    prompt_logits: list[torch.Tensor] = field(default_factory=list)
    last_prompt_logits: torch.Tensor | None = None  # kept for rows that share this prompt

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def decoding(self) -> bool:
        return bool(self.new_ids) and not self.done


class Engine:
    """Rows decoding together over one preallocated cache; see the module's docstring."""

    def __init__(self, model, tokenizer, max_rows: int = 8, prefill_chunk: int = 256) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_rows, self.prefill_chunk = max_rows, prefill_chunk
        self.kv = backend_for(model, max_rows)
        self.device = next(model.parameters()).device
        self.vocab = causal_lm(model).config.vocab_size
        self.settings = RowSettings(max_rows, self.vocab, self.device)
        self.ends = set(end_ids(model, tokenizer))
        self.context = context_length(model)
        self.rows: list[Row] = []  # row i owns cache slot i
        self.tokens = torch.zeros(max_rows, dtype=torch.long, device=self.device)  # each slot's pending token

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    @torch.inference_mode()  # the cache's tensors are made and changed in inference mode only
    def add(self, prompt_ids: list[int], sampling: Sampling, seed: int | None = None, **options) -> Row:
        """A new row (checked first: ValueError for what cannot be generated); it starts at the
        next step."""
        if not self.free:
            raise RuntimeError(f"all {self.max_rows} rows are in use")
        row = Row(list(prompt_ids), sampling, sampling.seed if seed is None else seed, **options)
        check_request(len(row.prompt_ids), sampling, self.context, allow_zero=row.echo)
        slot = len(self.rows)
        self.rows.append(row)
        self.kv.reset(slot)
        self.settings.set(slot, sampling, row.seed, row.prompt_ids)
        return row

    @torch.inference_mode()
    def remove(self, row: Row, reason: str = "cancelled") -> None:
        """End `row` now (cancelled, past its deadline) and free its slot."""
        if not row.done:
            row.finish_reason = reason
        self._drop([row])

    # ------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """Decode a token for the decoding rows, prefill the waiting ones; the rows touched."""
        was_training = self.model.training
        if was_training:  # no dropout while sampling; the mode is given back
            self.model.eval()
        try:
            touched = self._decode()
            touched += self._prefill()
        finally:
            if was_training:
                self.model.train()
        self._drop([r for r in self.rows if r.done])
        return touched

    def _decode(self) -> list[Row]:
        active = [r.decoding for r in self.rows]
        if not any(active):
            return []
        n = max(i for i, on in enumerate(active) if on) + 1
        try:
            logits = self.kv.decode(self.tokens, n, active[:n])
        except Exception as e:  # the batched forward failed: no row can go on
            for row, on in zip(self.rows, active):
                if on:
                    row.error, row.finish_reason = e, "error"
            return [r for r, on in zip(self.rows, active) if on]
        slots = [i for i, on in enumerate(active[:n]) if on]
        return self._pick(logits if len(slots) == n else logits[slots], slots)

    def _prefill(self) -> list[Row]:
        budget, ready, firsts = self.prefill_chunk, [], []
        for slot, row in enumerate(self.rows):
            if row.new_ids or row.done or (budget <= 0 and row.share is None):
                continue
            try:
                last, taken = self._prefill_row(slot, row, budget)
            except Exception as e:  # this prompt fails alone (a token id past the vocabulary, ...)
                row.error, row.finish_reason = e, "error"
                ready.append(row)
                continue
            budget -= taken
            if last is not None:
                firsts.append((slot, last))
        if firsts:
            ready += self._pick(torch.stack([lg for _, lg in firsts]), [s for s, _ in firsts])
        return ready

    def _prefill_row(self, slot: int, row: Row, budget: int) -> tuple[torch.Tensor | None, int]:
        """Advance `row`'s prompt by one chunk of at most `budget` tokens: its last prompt logits
        (V,) once all of it is in (else None), and the tokens run."""
        src = row.share
        if src is not None and (src not in self.rows or src.done or row.echo):
            src = row.share = None  # nothing to share any more: run the prompt
        if src is not None and src.last_prompt_logits is None:
            return None, 0  # wait for the source's prompt
        if src is not None and (not src.new_ids or isinstance(self.kv, LlamaKV)):
            self.kv.copy(self.rows.index(src), slot, len(row.prompt_ids))
            row.filled = len(row.prompt_ids)
            row.last_prompt_logits = src.last_prompt_logits
            return row.last_prompt_logits, 0
        row.share = None  # the fallback cache cannot give back just the prompt once decoding went on
        take = min(budget, len(row.prompt_ids) - row.filled)
        if take <= 0:
            return None, 0
        out = self.kv.prefill(slot, row.prompt_ids[row.filled:row.filled + take], all_logits=row.echo)
        row.filled += take
        if row.echo:
            row.prompt_logits.append(out.float())
        if row.filled < len(row.prompt_ids):
            return None, take
        row.last_prompt_logits = out[-1].float()
        return row.last_prompt_logits, take

    def _pick(self, logits: torch.Tensor, slots: list[int]) -> list[Row]:
        """Choose, record and check each slot's next token."""
        index = torch.tensor(slots, device=self.device)
        tokens = self.settings.pick(logits, index, slots)
        self.tokens[index] = tokens
        self.settings.saw(index, tokens)
        rows = []
        for slot, token, lg in zip(slots, tokens.tolist(), logits):
            row = self.rows[slot]
            if row.keep_logits:
                row.logits = lg.float()
            if row.sampling.max_new_tokens == 0:  # only the prompt's log-probs were asked for
                row.finish_reason = "length"
            else:
                self._accept(row, token)
            rows.append(row)
        return rows

    def _accept(self, row: Row, token: int) -> None:
        row.new_ids.append(token)
        if token in self.ends:
            row.finish_reason = "stop"
            return
        if row.sampling.stop or row.track_text:
            row.text, stopped = cut_at_stop(self.tokenizer.decode(row.new_ids, skip_special_tokens=True),
                                            row.sampling.stop)
            if stopped:
                row.finish_reason = "stop"
                return
        if len(row.new_ids) >= row.sampling.max_new_tokens:
            row.finish_reason = "length"

    def _drop(self, leaving: list[Row]) -> None:
        """Free the slots of `leaving`: the last row moves into each hole."""
        for row in leaving:
            if row not in self.rows:
                continue
            hole, last = self.rows.index(row), len(self.rows) - 1
            if hole != last:
                self.kv.move(last, hole)
                self.settings.move(last, hole)
                self.tokens[hole] = self.tokens[last]
                self.rows[hole] = self.rows[last]
            self.rows.pop()
