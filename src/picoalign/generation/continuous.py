"""Continuous batching: many requests decode as one batch; each joins at the next decode step
and leaves the moment it is done, with its own sampling settings, stop strings and stream.

    batcher = Batcher(model, tokenizer, max_batch=16, queue_size=64)
    batcher.start()                                     # the decode loop, in its own thread
    job = batcher.submit(prompt_ids, Sampling(max_new_tokens=64), emit=print)   # any thread
    # emit("text", piece) as the answer grows, then emit("done", Generation) or emit("error", exc)
    job.cancel()                                        # a client that went away: gone next step
    batcher.stop()

Each running request owns one row of a batched KV cache (transformers' `DynamicCache`). The
rows are left-padded to the longest; the attention mask hides the padding and every row has its
own position ids, so a row's logits are the ones its request would get alone (to float
rounding). Requests that arrive together are prefilled as one padded batch; their cache rows
are then padded and concatenated to the running ones. A finished request's row is dropped
(`batch_select_indices`) and padding columns that no row needs any more are cut off.

Why one batched cache and not a cache per request stacked each step: stacking copies every
row's whole cache on every step, while the batched cache is copied only when a request joins
(the transformers `DynamicLayer` appends by concatenation either way).

Log-probs are those of the model itself (log-softmax of the raw logits, before temperature or
top-p), as vLLM and OpenAI report them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from picoalign.generation.batched import Generation, Sampling, cut_at_stop, end_ids, held_back

TOKENS_PER_S_WINDOW_S = 10.0  # /health's tokens/s: tokens written over the last this many seconds


class QueueFull(RuntimeError):
    """`max_batch` requests are generating and `queue_size` more are waiting."""


@dataclass
class TokenLogprob:
    """One token of a prompt or an answer: its log-prob and the `top` most likely ones there."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Wants:
    """What a request wants besides the text."""

    logprobs: int | None = None  # alternatives per token (0: the chosen token's log-prob only); None: none
    echo: bool = False  # the prompt's own token log-probs too (the first token has none)
    deadline: float | None = None  # time.monotonic() past which the answer ends with finish_reason "deadline"


@dataclass
class Job:
    """One request: its prompt, settings and answer so far. `emit(kind, value)` is called from the
    decode thread: ("text", piece) as the answer grows, then ("done", Generation) or ("error", exc)."""

    prompt_ids: list[int]
    sampling: Sampling
    emit: Callable[[str, object], None]
    wants: Wants = field(default_factory=Wants)
    new_ids: list[int] = field(default_factory=list)  # written so far, an end-of-turn token included
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    text: str = ""
    shown: int = 0  # characters of `text` already emitted
    result: Generation | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """End this request at the next step (safe from any thread)."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.result is not None


class Batcher:
    """The decode loop over the running batch, and the line of requests waiting to join it."""

    def __init__(self, model, tokenizer, max_batch: int = 16, queue_size: int = 8) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.queue_size = max_batch, queue_size
        self.device = next(model.parameters()).device
        self.ends = set(end_ids(model, tokenizer))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []  # row i of the cache is running[i]
        self.joining: list[Job] = []  # taken from the queue, being prefilled
        self.cache = None  # DynamicCache of the running rows
        self.mask = None  # (rows, columns) 1 where a cache column is a real token of that row
        self.positions = None  # (rows,) the position of each row's next token
        self.pending = None  # (rows,) each row's last token, written but not yet through the model
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._written: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps

    # ------------------------------------------------------------ the outside

    def submit(self, prompt_ids: list[int], sampling: Sampling, emit, wants: Wants | None = None) -> Job:
        """Queue a request; it joins the batch at the next step with a free row. QueueFull when
        the batch and the queue are both full."""
        return self.submit_all([Job(list(prompt_ids), sampling, emit, wants or Wants())])[0]

    def submit_all(self, jobs: list[Job]) -> list[Job]:
        """Queue all of `jobs` or, when they do not all fit, none (QueueFull)."""
        with self._wake:
            if self._generating() + len(self.waiting) + len(jobs) > self.max_batch + self.queue_size:
                raise QueueFull(f"{self.max_batch} requests are generating and {self.queue_size} are already "
                                "waiting; try again shortly")
            self.waiting.extend(jobs)
            self._wake.notify()
        return jobs

    def status(self) -> dict:
        now = time.monotonic()
        recent = sum(n for t, n in list(self._written) if now - t <= TOKENS_PER_S_WINDOW_S)
        return {"running": self._generating(), "waiting": len(self.waiting), "max_batch": self.max_batch,
                "queue_size": self.queue_size, "tokens_per_s": round(recent / TOKENS_PER_S_WINDOW_S, 2)}

    def _generating(self) -> int:
        # A request answered in this step keeps its cache row until the step's end drops it; it is
        # not generating any more (its client may already hold the answer), so it is not counted.
        return sum(not job.done for job in [*self.running, *self.joining])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="picoalign-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def run_forever(self) -> None:
        while True:
            with self._wake:
                while not (self.waiting or self.running or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as e:  # a bug of ours in a step: fail what it held, keep serving the rest
                for job in [*self.running, *self.joining]:
                    self._fail(job, e)
                self._reset()
                self.joining = []
        for job in [*self.running, *self.waiting]:
            self._fail(job, RuntimeError("the server is shutting down"))

    # ------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self) -> None:
        """End cancelled and late requests, let waiting ones join (prefilled), decode one token
        for every row, and drop the rows that finished."""
        self._end_cancelled_and_late()
        joining = self._take_joining()
        if self.running:
            try:
                self._decode()
            except Exception as e:  # the batched forward itself failed: no row can go on
                for job in self.running:
                    self._fail(job, e)
                self._reset()
        plain = [j for j in joining if not j.wants.echo]
        if plain:
            self._prefill(plain)
        for job in joining:  # echo needs the logits at every prompt position: one prompt at a time bounds them
            if job.wants.echo:
                self._prefill([job])
        with self._wake:
            self.joining = []
        self._drop_finished()

    def _take_joining(self) -> list[Job]:
        with self._wake:
            free = self.max_batch - len(self.running)
            self.joining = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
            return self.joining

    def _end_cancelled_and_late(self) -> None:
        now = time.monotonic()
        with self._wake:
            queued = list(self.waiting)
        for job in [*self.running, *queued]:
            if job.cancelled:
                self._finish(job, "cancelled")
            elif job.wants.deadline is not None and now > job.wants.deadline:
                self._finish(job, "deadline")
        with self._wake:
            self.waiting = deque(j for j in self.waiting if not j.done)
        self._drop_finished()

    def _decode(self) -> None:
        rows = len(self.running)
        self.mask = torch.cat([self.mask, self.mask.new_ones(rows, 1)], dim=1)
        out = self.model(input_ids=self.pending[:, None], attention_mask=self.mask,
                         position_ids=self.positions[:, None], cache=self.cache, use_cache=True)
        self.cache = out.cache
        self.positions = self.positions + 1
        logits = out.logits[:, -1].float()
        self._written.append((time.monotonic(), rows))
        while self._written and time.monotonic() - self._written[0][0] > TOKENS_PER_S_WINDOW_S:
            self._written.popleft()
        self.pending = self.pending.clone()
        for i, job in enumerate(self.running):
            self.pending[i] = self._next_token(job, logits[i])

    def _prefill(self, jobs: list[Job]) -> None:
        """Run the joiners' prompts as one left-padded batch; each failing request fails alone."""
        try:
            rows = self._prefill_rows(jobs)
        except Exception as e:
            if len(jobs) == 1:
                return self._fail(jobs[0], e)
            for job in jobs:  # find the one that fails: each alone
                self._prefill([job])
            return
        self._join(jobs, *rows)

    def _prefill_rows(self, jobs: list[Job]):
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.tensor([[self.pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=self.device)
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        echo = any(j.wants.echo for j in jobs)  # (then `jobs` is that one request)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         cache=DynamicCache(), use_cache=True, logits_to_keep=0 if echo else 1)
        logits = out.logits.float()
        firsts = []
        for i, job in enumerate(jobs):
            if job.wants.echo:
                job.prompt_logprobs = self._prompt_logprobs(job, logits[i, width - len(job.prompt_ids):])
            job.generator = torch.Generator(device=self.device).manual_seed(job.sampling.seed)
            firsts.append(self._next_token(job, logits[i, -1]))
        return out.cache, mask, mask.sum(-1), torch.tensor(firsts, device=self.device)

    def _join(self, jobs: list[Job], cache, mask, positions, pending) -> None:
        """Append the prefilled rows to the running batch (both padded on the left to one width)."""
        if not self.running:
            self.running, self.cache, self.mask, self.positions, self.pending = list(jobs), cache, mask, positions, pending
            return
        from transformers import DynamicCache

        width = max(self.mask.shape[1], mask.shape[1])
        layers = [(torch.cat([_pad_left(a.keys, width, -2), _pad_left(b.keys, width, -2)]),
                   torch.cat([_pad_left(a.values, width, -2), _pad_left(b.values, width, -2)]))
                  for a, b in zip(self.cache.layers, cache.layers)]
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = torch.cat([_pad_left(self.mask, width, -1), _pad_left(mask, width, -1)])
        self.positions = torch.cat([self.positions, positions])
        self.pending = torch.cat([self.pending, pending])
        self.running += jobs

    def _drop_finished(self) -> None:
        keep = [i for i, job in enumerate(self.running) if not job.done]
        if len(keep) == len(self.running):
            return
        if not keep:
            return self._reset()
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.pending = self.mask[index], self.positions[index], self.pending[index]
        self.running = [self.running[i] for i in keep]
        unused = int(self.mask.any(0).int().argmax())  # leading columns that are padding in every row
        if unused:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]

    def _reset(self) -> None:
        self.running, self.cache, self.mask, self.positions, self.pending = [], None, None, None, None

    # ------------------------------------------------------------ one request's token

    def _next_token(self, job: Job, logits: torch.Tensor) -> int:
        """Pick the request's next token from its logits (V,), record it, and finish the request
        if it ended; returns the token (a finished row's is never fed back). Fails the job alone."""
        if job.done:
            return self.pad
        if job.sampling.max_new_tokens == 0:  # only the prompt's log-probs were asked for
            self._finish(job, "length")
            return self.pad
        try:
            token = pick_token(logits, job.sampling, job.generator, seen=(job.prompt_ids, job.new_ids))
            if job.wants.logprobs is not None:
                job.logprobs.append(token_logprob(logits, token, job.wants.logprobs))
            self._accept(job, token)
        except Exception as e:
            self._fail(job, e)
            return self.pad
        return self.pad if job.done else token

    def _accept(self, job: Job, token: int) -> None:
        job.new_ids.append(token)
        if token in self.ends:
            return self._finish(job, "stop")
        text, stopped = cut_at_stop(self.tokenizer.decode(job.new_ids, skip_special_tokens=True), job.sampling.stop)
        job.text = text
        if stopped:
            return self._finish(job, "stop")
        if len(job.new_ids) >= job.sampling.max_new_tokens:
            return self._finish(job, "length")
        safe = len(text) - held_back(text, job.sampling.stop)
        if safe > job.shown:
            self._emit(job, "text", text[job.shown:safe])
            job.shown = safe

    def _finish(self, job: Job, reason: str) -> None:
        if job.done:
            return
        if reason != "cancelled" and len(job.text) > job.shown:
            self._emit(job, "text", job.text[job.shown:])
            job.shown = len(job.text)
        ended_on_token = bool(job.new_ids) and job.new_ids[-1] in self.ends
        kept = len(job.new_ids) - ended_on_token  # tokens of the text; the end-of-turn token is not
        if job.logprobs:
            job.logprobs = job.logprobs[:kept]
        job.result = Generation(job.text, len(job.prompt_ids), len(job.new_ids), reason)
        self._emit(job, "done", job.result)

    def _fail(self, job: Job, error: BaseException) -> None:
        if job.done:
            return
        job.result = Generation(job.text, len(job.prompt_ids), len(job.new_ids), "error")
        self._emit(job, "error", error)

    def _emit(self, job: Job, kind: str, value) -> None:
        try:
            job.emit(kind, value)
        except Exception:  # nobody to tell (its listener is gone): end the request
            job.cancel()

    def _prompt_logprobs(self, job: Job, logits: torch.Tensor) -> list[TokenLogprob | None]:
        """Log-probs of prompt tokens 1.. from the logits before them (L, V); the first has none."""
        logp = torch.log_softmax(logits[:-1], dim=-1)
        ids = torch.tensor(job.prompt_ids[1:], device=logp.device)
        chosen = logp.gather(-1, ids[:, None])[:, 0].tolist()
        k = job.wants.logprobs or 0
        tops = logp.topk(k, dim=-1) if k else None
        rows: list[TokenLogprob | None] = [None]
        for n, (token, lp) in enumerate(zip(job.prompt_ids[1:], chosen)):
            top = list(zip(tops.indices[n].tolist(), tops.values[n].tolist())) if tops is not None else []
            rows.append(TokenLogprob(token, lp, top))
        return rows


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def pick_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None,
               seen: tuple[list[int], ...] = ()) -> int:
    """The next token from one row's logits (V,): argmax when greedy, else sampled after the
    repetition penalty (over the tokens in `seen`), temperature, top-k and top-p (in the order
    transformers applies them)."""
    scores = logits
    if s.repetition_penalty != 1 and any(seen):
        ids = torch.tensor(sorted({t for part in seen for t in part}), device=logits.device)
        picked = scores[ids]
        scores = scores.clone()
        scores[ids] = torch.where(picked < 0, picked * s.repetition_penalty, picked / s.repetition_penalty)
    if s.greedy or s.temperature == 0:
        return int(scores.argmax())
    scores = scores / s.temperature
    if s.top_k > 0:
        kth = scores.topk(min(s.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, -torch.inf)
    if s.top_p < 1:
        ordered, order = scores.sort(descending=True)
        probs = ordered.softmax(-1)
        outside = probs.cumsum(-1) - probs > s.top_p  # the tokens after the nucleus (the first one stays)
        scores = scores.clone()
        scores[order[outside]] = -torch.inf
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    logp = torch.log_softmax(logits, dim=-1)
    top = logp.topk(k) if k else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return TokenLogprob(token, float(logp[token]), pairs)
