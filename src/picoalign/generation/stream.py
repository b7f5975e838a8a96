"""One answer, streamed as it is generated: text comes out as the answer grows.

    stream = Stream(model, tokenizer, prompt_ids, Sampling(...))
    for piece in stream:      # pieces of text; together, the answer
        print(piece, end="", flush=True)
    stream.result             # Generation: text, token counts, finish_reason

The decode engine runs in the thread that iterates, a step per piece: the thread that loaded the
model, as a rule. A second thread running torch would give libgomp a second pool of workers,
more than the cores, and every op of the step would then wait on sleeping workers (see
`Batcher.launch`: one request 3.4 s instead of 2.2 on 2 Zen 3 cores). Stop strings are held back
while they might still be starting, so the answer never shows a piece of one. `cancel()` (or
leaving the loop) ends generation at the next token.
"""

from __future__ import annotations

from picoalign.generation.answers import Generation, Sampling, finish, held_back


class Stream:
    """Iterate (once) for the text pieces; `result` is set once the iteration is over."""

    def __init__(self, model, tokenizer, prompt_ids: list[int], sampling: Sampling) -> None:
        self.model, self.tokenizer, self.prompt_ids, self.sampling = model, tokenizer, prompt_ids, sampling
        self.result: Generation | None = None
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    def __iter__(self):
        from picoalign.generation.engine import Engine

        engine = Engine(self.model, self.tokenizer, max_rows=1)
        row = engine.add(self.prompt_ids, self.sampling, track_text=True)
        shown = 0
        try:
            while engine.rows and not self._cancelled:
                engine.step()
                if row.error is not None:
                    raise row.error
                safe = len(row.text) if row.done else len(row.text) - held_back(row.text, self.sampling.stop)
                if safe > shown:
                    yield row.text[shown:safe]
                    shown = safe
        finally:  # also when the reader stops early: the answer so far, ended by "length"
            done = finish(self.tokenizer, row.new_ids, sorted(engine.ends), self.sampling.stop,
                          len(self.prompt_ids))
            self.result = done if row.done else Generation(row.text, done.prompt_tokens, len(row.new_ids),
                                                           "length", list(row.new_ids))
