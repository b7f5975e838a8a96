"""The served model and its queue: one generation at a time, a bounded line of waiting requests.

A request first takes a ticket (`Gate.reserve`): if `queue_size` requests already wait behind
the running one, that fails at once with `QueueFull` (the API answers 503) instead of piling up
work. A ticket is then held while the request generates (`with ticket:`), which waits its turn.
The gate uses threading locks because generation runs in worker threads, not on the event loop.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from picoalign.generation.batched import Generation, Sampling, encode_prompt, generate_full
from picoalign.generation.stream import Stream


class QueueFull(RuntimeError):
    """The model is busy and `queue_size` requests are already waiting."""


class ClientGone(RuntimeError):
    """The client of a waiting request has gone: nothing to generate for."""


class Gate:
    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self._turn = threading.Lock()  # held by the one request that generates
        self._count = threading.Lock()
        self.pending = 0  # the running request and those waiting

    def reserve(self) -> Ticket:
        with self._count:
            if self.pending > self.queue_size:
                raise QueueFull(f"the model is busy and {self.queue_size} requests are already waiting; "
                                "try again shortly")
            self.pending += 1
        return Ticket(self)

    def status(self) -> dict:
        running = int(self._turn.locked())
        return {"running": running, "waiting": max(self.pending - running, 0), "queue_size": self.queue_size}


class Ticket:
    """A place in the queue: `with ticket:` waits for the model and generates; it is then given back."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self._released = False

    def __enter__(self) -> Ticket:
        self.gate._turn.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.gate._turn.release()
        self.release()

    def release(self) -> None:
        """Give the place back (idempotent); a ticket that is never used must still be released."""
        with self.gate._count:
            if not self._released:
                self._released = True
                self.gate.pending -= 1


@dataclass
class Engine:
    """A loaded model with its tokenizer, the id the API reports, and its gate."""

    model: object
    tokenizer: object
    name: str
    gate: Gate

    @property
    def context_length(self) -> int:
        return getattr(self.model.config, "max_position_embeddings", None) or 2048

    def encode(self, prompt, raw: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, raw)

    def complete(self, ticket: Ticket, prompts: list[list[int]] | list, sampling: Sampling,
                 raw: bool = False, cancel: threading.Event | None = None) -> list[Generation]:
        """Blocking: wait for the model, then generate the answers to `prompts` as one batch;
        `cancel` set (the client went away) ends it at the next token, or before it starts."""
        with ticket:
            if cancel is not None and cancel.is_set():
                raise ClientGone("the client closed the connection while the request waited")
            return generate_full(self.model, self.tokenizer, prompts, sampling, batch_size=len(prompts), raw=raw,
                                 cancel=cancel)

    def stream(self, ticket: Ticket, prompt_ids: list[int], sampling: Sampling) -> Stream:
        """Start generating in a thread (once the model is free); iterate the result for text."""
        return Stream(self.model, self.tokenizer, prompt_ids, sampling, hold=ticket)
