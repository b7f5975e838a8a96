"""The served model and its batcher: every request is a job of the continuous batcher
(`picoalign.generation.continuous`), which decodes up to `max_batch` of them together in its
own thread while up to `queue_size` more wait; beyond that a request fails at once with
`QueueFull` (the API answers 503) instead of piling up work.

The batcher calls a job's `emit` from its thread; a `Listener` hands those events to the event
loop of the request that waits for them, so a waiting request holds no worker thread.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from picoalign.generation.batched import Generation, Sampling, encode_prompt
from picoalign.generation.continuous import Batcher, Job, QueueFull, Wants

__all__ = ["Engine", "Listener", "QueueFull"]


class Listener:
    """The events of one job (`("text", piece)`, then `("done", Generation)` or `("error", exc)`),
    passed from the batcher's thread to an asyncio queue on the request's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()

    def __call__(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    async def events(self):
        while True:
            kind, value = await self.queue.get()
            yield kind, value
            if kind in ("done", "error"):
                return

    async def result(self) -> Generation:
        async for kind, value in self.events():
            if kind == "error":
                raise value
            if kind == "done":
                return value
        raise AssertionError("unreachable: events end with done or error")


@dataclass
class Engine:
    """A loaded model with its tokenizer, the id the API reports, and the batcher that serves it."""

    model: object
    tokenizer: object
    name: str
    batcher: Batcher

    @property
    def context_length(self) -> int:
        return getattr(self.model.config, "max_position_embeddings", None) or 2048

    def encode(self, prompt, raw: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, raw)

    def submit(self, prompts: list[list[int]], sampling: Sampling, wants: Wants) -> list[tuple[Job, Listener]]:
        """Queue one job per prompt (all or none: QueueFull); call on the request's event loop."""
        loop = asyncio.get_running_loop()
        listeners = [Listener(loop) for _ in prompts]
        jobs = self.batcher.submit_all([Job(list(p), sampling, lis, wants) for p, lis in zip(prompts, listeners)])
        return list(zip(jobs, listeners))
