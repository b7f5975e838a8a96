"""Generation, in one place: used by eval (answers to score), `picoalign generate` and `chat`
(use/), and `picoalign serve`.

* `batched`: batched, seeded generation through the chat template (transformers `generate`),
  sampling settings, stop strings, why an answer ended;
* `stream`: one answer streamed as it is generated (transformers `generate` in a thread);
* `continuous`: continuous batching for the server: requests join and leave a running batch.
"""
