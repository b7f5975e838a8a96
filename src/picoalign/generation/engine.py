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
from picoalign.generation.kv import LlamaKV, backend_for, causal_lm, sampling_mode
from picoalign.generation.prepack import packable, packed_linears
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
        self.linears = packable(model)  # run on weights packed for the CPU's kernels (prepack.py)

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
        with sampling_mode(self.model), packed_linears(self.linears):  # no dropout while sampling
            touched = self._decode()
            touched += self._prefill()
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
        """The waiting prompts' next chunks, all in one forward (at most `prefill_chunk` tokens
        while other rows decode, four times that when none does: nothing waits on it then);
        then the rows that share a prompt now in the cache."""
        budget = self.prefill_chunk * (1 if any(r.decoding for r in self.rows) else 4)
        chunks, ready, firsts = [], [], []
        for slot, row in enumerate(self.rows):
            if row.new_ids or row.done or budget <= 0 or self._sharing(row):
                continue
            take = min(budget, len(row.prompt_ids) - row.filled)
            if take > 0:
                chunks.append((slot, row, take))
                budget -= take
        for (slot, row, _), out in zip(chunks, self._run_chunks(chunks)):
            if isinstance(out, BaseException):  # this prompt fails alone (a token id past the vocabulary, ...)
                row.error, row.finish_reason = out, "error"
                ready.append(row)
            elif row.filled == len(row.prompt_ids):
                firsts.append((slot, out))
        for slot, row in enumerate(self.rows):
            if not row.new_ids and not row.done and self._sharing(row) and row.share.last_prompt_logits is not None:
                self.kv.copy(self.rows.index(row.share), slot, len(row.prompt_ids))
                row.filled = len(row.prompt_ids)
                row.last_prompt_logits = row.share.last_prompt_logits
                firsts.append((slot, row.last_prompt_logits))
        if firsts:
            ready += self._pick(torch.stack([lg for _, lg in firsts]), [s for s, _ in firsts])
        return ready

    def _sharing(self, row: Row) -> bool:
        """Whether `row` takes its prompt's cache from `row.share` (else it runs the prompt)."""
        src = row.share
        if src is not None and (src not in self.rows or src.done or row.echo):
            src = row.share = None  # nothing to share any more: run the prompt
        if src is not None and src.new_ids and not isinstance(self.kv, LlamaKV):
            src = row.share = None  # the fallback cache cannot give back just the prompt once decoding went on
        return src is not None

    def _run_chunks(self, chunks: list[tuple[int, Row, int]]) -> list:
        """Each chunk's logits (its last prompt logits once the prompt is all in), or the
        exception its prompt raised: a failed joint forward is retried a prompt at a time."""
        if not chunks:
            return []
        try:
            outs = self.kv.prefill_many([(slot, row.prompt_ids[row.filled:row.filled + take], row.echo)
                                         for slot, row, take in chunks])
        except Exception as e:
            return [e] if len(chunks) == 1 else [self._one_chunk(*c) for c in chunks]
        return [self._took(row, take, out) for (_, row, take), out in zip(chunks, outs)]

    def _one_chunk(self, slot: int, row: Row, take: int):
        try:
            return self._took(row, take, self.kv.prefill(slot, row.prompt_ids[row.filled:row.filled + take],
                                                         all_logits=row.echo))
        except Exception as e:
            return e

    def _took(self, row: Row, take: int, out: torch.Tensor) -> torch.Tensor:
        row.filled += take
        if row.echo:
            row.prompt_logits.append(out.float())
        if row.filled == len(row.prompt_ids):
            row.last_prompt_logits = out[-1].float()
        return row.last_prompt_logits

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
