"""Continuous batching: many requests decode as one batch; each joins at the next decode step
and leaves the moment it is done, with its own sampling settings, stop strings and stream.

    batcher = Batcher.launch(lambda: load_for_inference(spec), max_batch=16, queue_size=64)
    # the model loads, and the decode loop runs, in one thread of its own (`launch` says why)
    job = batcher.submit(prompt_ids, Sampling(max_new_tokens=64), emit=print)   # any thread
    # emit("text", piece) as the answer grows, then emit("done", Generation) or emit("error", exc)
    job.cancel()                                        # a client that went away: gone next step
    batcher.stop()

Each running request owns one row of the decode engine (`engine.py`): its slot of the
preallocated KV cache, its sampling settings and generator. A request joins at the next step
(its prompt prefilled in chunks, so a long one does not stall the others) and leaves the
moment it is done, without copying the other rows' caches.

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

from picoalign.generation.answers import Generation, Sampling, held_back

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
    row: object = None  # its row in the decode engine, once it joined

    def cancel(self) -> None:
        """End this request at the next step (safe from any thread)."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.result is not None


class Batcher:
    """The decode loop over the running batch, and the line of requests waiting to join it."""

    def __init__(self, model, tokenizer, max_batch: int = 16, queue_size: int = 8) -> None:
        from picoalign.generation.engine import Engine

        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.queue_size = max_batch, queue_size
        self.engine = Engine(model, tokenizer, max_rows=max_batch)
        self.device = self.engine.device
        self.ends = self.engine.ends
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []  # requests with a row in the engine
        self.joining: list[Job] = []  # taken from the queue at this step
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
        # A request answered in this step keeps its row until the step's end drops it; it is not
        # generating any more (its client may already hold the answer), so it is not counted.
        return sum(not job.done for job in [*self.running, *self.joining])

    @classmethod
    def launch(cls, load: Callable[[], tuple], **options) -> Batcher:
        """`load()` -> (model, tokenizer), the batcher and its decode loop, all in one new thread;
        returns once the model is loaded (re-raising what loading raised).

        Why one thread: torch's OpenMP (libgomp) keeps a pool of workers for every thread that
        has run a parallel region, and once there are more of them than cores it stops spinning
        between regions and sleeps. A server that loaded its model in one thread and decoded in
        another ran every op of the decode step at that slower pace: on 2 Zen 3 cores a one-row
        packed linear took 150 us instead of 75 and one request 3.4 s instead of `generate_full`'s
        2.2 s. With the load and the loop in the same thread, the thread's one pool is the only one."""
        ready, box = threading.Event(), {}

        def main() -> None:
            try:
                box["batcher"] = batcher = cls(*load(), **options)
            except BaseException as e:  # noqa: BLE001  (handed to the caller)
                box["error"] = e
                ready.set()
                return
            batcher._thread = threading.current_thread()
            ready.set()
            batcher.run_forever()

        threading.Thread(target=main, name="picoalign-batcher", daemon=True).start()
        ready.wait()
        if "error" in box:
            raise box["error"]
        return box["batcher"]

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
        for job in [*self.running, *self.waiting]:
            self._fail(job, RuntimeError("the server is shutting down"))

    # ------------------------------------------------------------ one step

    def step(self) -> None:
        """End cancelled and late requests, let waiting ones join, decode one token for every
        running row and prefill the joiners, and let the finished requests go."""
        self._end_cancelled_and_late()
        self._join(self._take_joining())
        touched = self.engine.step()
        self._written.append((time.monotonic(), sum(bool(r.new_ids) for r in touched)))
        while self._written and time.monotonic() - self._written[0][0] > TOKENS_PER_S_WINDOW_S:
            self._written.popleft()
        for row in touched:
            self._took(row.owner, row)
        with self._wake:
            self.joining = []
        self.running = [j for j in self.running if not j.done]

    def _take_joining(self) -> list[Job]:
        with self._wake:
            free = self.max_batch - len(self.running)
            self.joining = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
            return self.joining

    def _join(self, jobs: list[Job]) -> None:
        for job in list(jobs):  # `jobs` is `self.joining`, which each join takes one from
            try:
                row = self.engine.add(job.prompt_ids, job.sampling, owner=job, track_text=True,
                                      echo=job.wants.echo, keep_logits=job.wants.logprobs is not None)
            except Exception as e:
                self._fail(job, e)
                with self._wake:
                    self.joining.remove(job)
                continue
            job.row, job.new_ids = row, row.new_ids
            with self._wake:  # counted once: running now, not joining
                self.running.append(job)
                self.joining.remove(job)

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
        self.running = [j for j in self.running if not j.done]

    def _reset(self) -> None:
        for job in self.running:
            if job.row is not None:
                self.engine.remove(job.row, "error")
        self.running, self.joining = [], []

    # ------------------------------------------------------------ one request's token

    def _took(self, job: Job, row) -> None:
        """What the engine did for `job` this step: a token (log-probs, text to stream), an end,
        or an error."""
        if job.done:
            return
        if row.error is not None:
            return self._fail(job, row.error)
        try:
            if job.wants.echo and not job.prompt_logprobs:
                job.prompt_logprobs = self._prompt_logprobs(job, torch.cat(row.prompt_logits))
            if job.wants.logprobs is not None and row.new_ids and row.logits is not None:
                job.logprobs.append(token_logprob(row.logits, row.new_ids[-1], job.wants.logprobs))
        except Exception as e:
            return self._fail(job, e)
        job.text = row.text
        if row.done:
            return self._finish(job, row.finish_reason)
        safe = len(job.text) - held_back(job.text, job.sampling.stop)
        if safe > job.shown:
            self._emit(job, "text", job.text[job.shown:safe])
            job.shown = safe

    def _finish(self, job: Job, reason: str) -> None:
        if job.done:
            return
        if job.row is not None and not job.row.done:
            self.engine.remove(job.row, reason)
        if reason != "cancelled" and len(job.text) > job.shown:
            self._emit(job, "text", job.text[job.shown:])
            job.shown = len(job.text)
        ended_on_token = bool(job.new_ids) and job.new_ids[-1] in self.ends
        kept = len(job.new_ids) - ended_on_token  # tokens of the text; the end-of-turn token is not
        if job.logprobs:
            job.logprobs = job.logprobs[:kept]
        job.result = Generation(job.text, len(job.prompt_ids), len(job.new_ids), reason, list(job.new_ids))
        self._emit(job, "done", job.result)

    def _fail(self, job: Job, error: BaseException) -> None:
        if job.done:
            return
        if job.row is not None and not job.row.done:
            self.engine.remove(job.row, "error")
        job.result = Generation(job.text, len(job.prompt_ids), len(job.new_ids), "error", list(job.new_ids))
        self._emit(job, "error", error)

    def _emit(self, job: Job, kind: str, value) -> None:
        try:
            job.emit(kind, value)
        except Exception:  # nobody to tell (its listener is gone): end the request
            job.cancel()

    def _prompt_logprobs(self, job: Job, logits: torch.Tensor) -> list[TokenLogprob | None]:
        """Log-probs of prompt tokens 1.. from the logits before them (L, V); the first has none."""
        logp = torch.log_softmax(logits[:-1].float(), dim=-1)
        ids = torch.tensor(job.prompt_ids[1:], device=logp.device)
        chosen = logp.gather(-1, ids[:, None])[:, 0].tolist()
        k = job.wants.logprobs or 0
        tops = logp.topk(k, dim=-1) if k else None
        rows: list[TokenLogprob | None] = [None]
        for n, (token, lp) in enumerate(zip(job.prompt_ids[1:], chosen)):
            top = list(zip(tops.indices[n].tolist(), tops.values[n].tolist())) if tops is not None else []
            rows.append(TokenLogprob(token, lp, top))
        return rows


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    logp = torch.log_softmax(logits, dim=-1)
    top = logp.topk(k) if k else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return TokenLogprob(token, float(logp[token]), pairs)
