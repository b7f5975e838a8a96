"""Generation, in one place: used by eval (answers to score), `picoalign generate` and `chat`
(use/), `picoalign serve` and the RL stage's rollouts, all on one decode engine.

* `engine`: the decode engine: rows over a preallocated KV cache, chunked prefill, prompt
  sharing, one step for every row (`kv`: the cache and the forwards; `sampling`: per-row
  settings and generators, vectorised);
* `batched`: `generate_full` (n answers per prompt, checked before decoding), sampling
  settings, stop strings, why an answer ended;
* `stream`: one answer streamed as it is generated (the engine stepped by the reading thread);
* `continuous`: continuous batching for the server: requests join and leave the engine's rows.
"""
