"""Two ways to keep the KV cache of a continuous batch, timed per decode step on one model.

    python bench/kv_rows.py                                  # the built-in model, 16 rows, 32 steps
    python bench/kv_rows.py --rows 4 16 32 --steps 32 --prompt-tokens 64
    python bench/kv_rows.py --rows 2 --steps 2 --prompt-tokens 8     # a quick smoke run

`batched` is what `picoalign serve` does (generation/continuous.py): one DynamicCache for all
rows, left-padded, appended to in place by the model, rows concatenated only when a request
joins. `stacked` keeps one DynamicCache per request and, every step, pads and stacks them into
a batch for the forward, then hands each request back its own rows. Both decode the same rows
greedily from prompts of different lengths (`--prompt-tokens` and shorter) and must write the
same tokens; the script prints the median time per step of each (the first step left out) and
their ratio. Run it on idle cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from picoalign.config import BUILTIN_MODEL


def pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - t.shape[-2]
    return t if missing == 0 else torch.cat([t.new_zeros(*t.shape[:-2], missing, t.shape[-1]), t], dim=-2)


def prompts_of(tokenizer, rows: int, length: int) -> list[list[int]]:
    ids = tokenizer("Once upon a time there was a lighthouse keeper who " * 40)["input_ids"]
    return [ids[: max(2, length - 3 * (i % 4))] for i in range(rows)]


def time_batched(model, tokenizer, prompts, steps: int) -> tuple[list[float], list[list[int]]]:
    from picoalign.generation.batched import Sampling
    from picoalign.generation.continuous import Batcher

    batcher = Batcher(model, tokenizer, max_batch=len(prompts), queue_size=0)
    batcher.ends = set()  # no row leaves early: both ways decode every row for every step
    jobs = [batcher.submit(p, Sampling(steps + 1), lambda *_: None) for p in prompts]
    batcher.step()  # the prefill (and the first token)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batcher.step()
        times.append(time.perf_counter() - t0)
    return times, [j.new_ids for j in jobs]


@torch.inference_mode()
def time_stacked(model, prompts, steps: int) -> tuple[list[float], list[list[int]]]:
    from transformers import DynamicCache

    caches, lengths, written = [], [], []
    for p in prompts:  # each request prefilled alone, its own cache
        out = model(input_ids=torch.tensor([p]), cache=DynamicCache(), use_cache=True, logits_to_keep=1)
        caches.append(out.cache)
        lengths.append(len(p))
        written.append([int(out.logits[0, -1].argmax())])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        width = max(lengths)
        layers = [(torch.cat([pad_left(c.layers[n].keys, width) for c in caches]),
                   torch.cat([pad_left(c.layers[n].values, width) for c in caches]))
                  for n in range(len(caches[0].layers))]
        mask = torch.tensor([[0] * (width - n) + [1] * (n + 1) for n in lengths])
        out = model(input_ids=torch.tensor([[w[-1]] for w in written]), attention_mask=mask,
                    position_ids=torch.tensor([[n] for n in lengths]), cache=DynamicCache(ddp_cache_data=layers),
                    use_cache=True)
        for i, cache in enumerate(caches):  # each request's own rows back, the new column included
            for n, layer in enumerate(cache.layers):
                layer.keys = out.cache.layers[n].keys[i:i + 1, :, width - lengths[i]:].clone()
                layer.values = out.cache.layers[n].values[i:i + 1, :, width - lengths[i]:].clone()
            lengths[i] += 1
            written[i].append(int(out.logits[i, -1].argmax()))
        times.append(time.perf_counter() - t0)
    return times, written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=BUILTIN_MODEL)
    ap.add_argument("--rows", type=int, nargs="+", default=[16], help="requests decoding together")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="the longest prompt (the others a few shorter)")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args(argv)
    from picoalign.models.load import load_for_inference

    model, tokenizer = load_for_inference(args.model, "cpu", args.dtype, True)
    for rows in args.rows:
        prompts = prompts_of(tokenizer, rows, args.prompt_tokens)
        batched, a = time_batched(model, tokenizer, prompts, args.steps)
        stacked, b = time_stacked(model, prompts, args.steps)
        same = a == b
        mb, ms = (statistics.median(t[1:] or t) for t in (batched, stacked))  # the first step warms kernels up
        print(f"rows {rows:3d}: batched {mb * 1000:.1f} ms/step, stacked {ms * 1000:.1f} ms/step, "
              f"stacked / batched {ms / mb:.2f}x, same tokens: {same}")


if __name__ == "__main__":
    main()
