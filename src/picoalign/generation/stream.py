"""One answer, streamed as it is generated: `generate` runs in a thread, text comes out of
transformers' `TextIteratorStreamer` (whole words at a time).

    stream = Stream(model, tokenizer, prompt_ids, Sampling(...))
    for piece in stream:      # pieces of text; together, the answer
        print(piece, end="", flush=True)
    stream.result             # Generation: text, token counts, finish_reason

Stop strings are held back while they might still be starting, so the answer never shows a
piece of one. `cancel()` ends generation at the next token (a client that went away).
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext

import torch

from picoalign.generation.batched import (
    Generation,
    Sampling,
    cancel_criteria,
    cut_at_stop,
    end_ids,
    finish,
    held_back,
)


class Stream:
    """Iterate for the text pieces; `result` is set once the iteration is over."""

    def __init__(self, model, tokenizer, prompt_ids: list[int], sampling: Sampling,
                 hold: AbstractContextManager | None = None) -> None:
        from transformers import TextIteratorStreamer

        self.model, self.tokenizer, self.prompt_ids, self.sampling = model, tokenizer, prompt_ids, sampling
        self.hold = hold or nullcontext()  # held while generating: the server's turn at the model
        self.result: Generation | None = None
        self._cancelled = threading.Event()
        self._error: BaseException | None = None
        self._new_ids: list[int] = []
        self._streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._criteria = cancel_criteria(self._cancelled)
        self._thread = threading.Thread(target=self._run, name="picoalign-generate", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._cancelled.set()

    @torch.no_grad()
    def _run(self) -> None:
        try:
            with self.hold:
                if self._cancelled.is_set():
                    return
                device = next(self.model.parameters()).device
                ids = torch.tensor([self.prompt_ids], device=device)
                torch.manual_seed(self.sampling.seed)
                out = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), streamer=self._streamer,
                    max_new_tokens=self.sampling.max_new_tokens, stopping_criteria=self._criteria,
                    pad_token_id=self.tokenizer.pad_token_id, eos_token_id=end_ids(self.model, self.tokenizer),
                    **self.sampling.generate_kwargs(),
                )
                self._new_ids = out[0, len(self.prompt_ids):].tolist()
        except BaseException as e:  # handed to the reader, which re-raises it
            self._error = e
        finally:
            self._streamer.end()  # unblocks the reader (a second end after generate's own is harmless)

    def __iter__(self):
        stop = self.sampling.stop
        text, shown, stopped = "", 0, False
        try:
            for piece in self._streamer:
                text += piece
                cut, stopped = cut_at_stop(text, stop)
                if stopped:
                    self.cancel()
                    if len(cut) > shown:
                        yield cut[shown:]
                    text = cut
                    break
                safe = len(text) - held_back(text, stop)
                if safe > shown:
                    yield text[shown:safe]
                    shown = safe
            if not stopped and len(text) > shown:
                yield text[shown:]
        finally:
            self.cancel()  # a reader that stops early (a closed connection) stops the model too
            self._thread.join()
        if self._error is not None:
            raise self._error
        self.result = self._result(text, stopped)

    def _result(self, text: str, stopped: bool) -> Generation:
        done = finish(self.tokenizer, self._new_ids, end_ids(self.model, self.tokenizer), (), len(self.prompt_ids))
        return Generation(text, done.prompt_tokens, done.completion_tokens, "stop" if stopped else done.finish_reason)
