"""One answer, streamed as it is generated: the decode engine runs in a thread, text comes
out as the answer grows.

    stream = Stream(model, tokenizer, prompt_ids, Sampling(...))
    for piece in stream:      # pieces of text; together, the answer
        print(piece, end="", flush=True)
    stream.result             # Generation: text, token counts, finish_reason

Stop strings are held back while they might still be starting, so the answer never shows a
piece of one. `cancel()` ends generation at the next token (a client that went away).
"""

from __future__ import annotations

import queue
import threading
from contextlib import AbstractContextManager, nullcontext

from picoalign.generation.answers import Generation, Sampling, finish, held_back

_END = object()


class Stream:
    """Iterate for the text pieces; `result` is set once the iteration is over."""

    def __init__(self, model, tokenizer, prompt_ids: list[int], sampling: Sampling,
                 hold: AbstractContextManager | None = None) -> None:
        self.model, self.tokenizer, self.prompt_ids, self.sampling = model, tokenizer, prompt_ids, sampling
        self.hold = hold or nullcontext()  # held while generating: the server's turn at the model
        self.result: Generation | None = None
        self._cancelled = threading.Event()
        self._error: BaseException | None = None
        self._pieces: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="picoalign-generate", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._cancelled.set()

    def _run(self) -> None:
        from picoalign.generation.engine import Engine

        try:
            with self.hold:
                engine = Engine(self.model, self.tokenizer, max_rows=1)
                row = engine.add(self.prompt_ids, self.sampling, track_text=True)
                shown = 0
                while engine.rows and not self._cancelled.is_set():
                    engine.step()
                    if row.error is not None:
                        raise row.error
                    safe = len(row.text) if row.done else len(row.text) - held_back(row.text, self.sampling.stop)
                    if safe > shown:
                        self._pieces.put(row.text[shown:safe])
                        shown = safe
                done = finish(self.tokenizer, row.new_ids, sorted(engine.ends), self.sampling.stop, len(self.prompt_ids))
                self.result = done if row.done else Generation(row.text, done.prompt_tokens, len(row.new_ids),
                                                               "length", list(row.new_ids))
        except BaseException as e:  # handed to the reader, which re-raises it
            self._error = e
        finally:
            self._pieces.put(_END)

    def __iter__(self):
        try:
            while (piece := self._pieces.get()) is not _END:
                yield piece
        finally:
            self.cancel()  # a reader that stops early (a closed connection) stops the model too
            self._thread.join()
        if self._error is not None:
            raise self._error
