"""`bench/compare.py --mode generate`: the decode engine against its peers, in one run.

On the built-in SmolLM2-135M-Instruct, the same chat prompts (story requests, ~60-150 tokens)
and the same number of new tokens (greedy, `--new-tokens`, end-of-turn masked off nowhere: an
answer may end early, and tokens/s counts the tokens really written):

* picoalign `generate_full` at batch 1, 8, 32 and 64: aggregate tokens/s (new tokens / wall
  time of the call, prefill included), ms per decode step (the engine's decode forward with
  the whole batch decoding, timed around `kv.decode`), prefill tokens/s (prompt tokens / time
  in `kv.prefill`);
* transformers `generate`, batch 1 (prompt by prompt) and batched (left-padded, batch 32);
* llama.cpp (`llama-cpp-python`, the `[llamacpp]` extra) on the same weights exported by
  `picoalign export --format gguf --gguf-type f16`, batch 1, n_threads = the cores;
* the machine's bound for one decode step: the bytes of the weights one step reads / the
  measured memory bandwidth (a sum over a 1 GiB tensor), and 2 x matmul weights x batch FLOPs /
  the measured matmul peak of the dtype; the bound is the larger of the two.

All sides run in this one process, one after the other, under the same allocator and threads:
compare ratios from one run (and run it with nothing else on the cores: /work/bin/alone).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUILTIN = "builtin:smollm2-135m-instruct"
BATCHES = (1, 8, 32, 64)


def memory_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Best-of-N read bandwidth: sum over a `gib` GiB fp32 tensor."""
    import torch

    x = torch.ones(int(gib * 2**30 / 4))
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(repeats))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class Timings:
    """Wraps the engine's backend class: time of each decode (with its row count) and prefill."""

    def __init__(self) -> None:
        from picoalign.generation import kv

        self.kv, self.decode, self.prefill = kv.LlamaKV, [], []
        self.real = (kv.LlamaKV.decode, kv.LlamaKV.prefill_many)

    def __enter__(self):
        real_decode, real_prefill = self.real

        def decode(kv_self, tokens, rows, active=None):
            t = time.perf_counter()
            out = real_decode(kv_self, tokens, rows, active)
            self.decode.append((rows if active is None else sum(active), time.perf_counter() - t))
            return out

        def prefill_many(kv_self, chunks):  # several prompts' chunks in one forward
            t = time.perf_counter()
            out = real_prefill(kv_self, chunks)
            self.prefill.append((sum(len(ids) for _, ids, _ in chunks), time.perf_counter() - t))
            return out

        self.kv.decode, self.kv.prefill_many = decode, prefill_many
        return self

    def __exit__(self, *exc):
        self.kv.decode, self.kv.prefill_many = self.real


def ours(model, tok, prompts, batch: int, new: int) -> dict:
    from picoalign.generation.batched import Sampling, generate_full

    with Timings() as timing:
        t = time.perf_counter()
        out = generate_full(model, tok, prompts, Sampling(new), batch_size=batch)
        wall = time.perf_counter() - t
    full = [dt for rows, dt in timing.decode if rows == min(batch, len(prompts))] or [dt for _, dt in timing.decode]
    return {"s": wall, "tokens": sum(g.completion_tokens for g in out), "outputs": [g.token_ids for g in out],
            "step_ms": 1000 * statistics.median(full),
            "prefill_tps": sum(n for n, _ in timing.prefill) / sum(dt for _, dt in timing.prefill)}


def hf(model, tok, prompt_ids: list[list[int]], batch: int, new: int, ends: list[int]) -> dict:
    import torch

    pad = tok.pad_token_id
    t, tokens, outputs = time.perf_counter(), 0, []
    for start in range(0, len(prompt_ids), batch):
        part = prompt_ids[start:start + batch]
        width = max(map(len, part))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in part])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                 eos_token_id=ends, pad_token_id=pad)
        for row in out[:, width:].tolist():
            end = next((i + 1 for i, x in enumerate(row) if x in ends), len(row))
            tokens += end
            outputs.append(row[:end])
    return {"s": time.perf_counter() - t, "tokens": tokens, "outputs": outputs}


def export_gguf(folder: Path) -> Path:
    path = folder / "model-f16.gguf"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "picoalign", "export", "--model", BUILTIN, "--out", str(folder),
                        "--format", "gguf", "--gguf-type", "f16", "--overwrite"], check=True)
    return path


def llamacpp(path: Path, prompt_ids: list[list[int]], new: int, ends: list[int], threads: int) -> dict:
    from llama_cpp import Llama

    from picoalign.use.llamacpp_check import greedy

    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, seed=0,
                verbose=False, logits_all=False)
    t = time.perf_counter()
    outputs = [greedy(llm, ids, new, set(ends)) for ids in prompt_ids]  # the GGUF check's own argmax loop
    return {"s": time.perf_counter() - t, "tokens": sum(map(len, outputs)), "outputs": outputs}


def bound(model, dtype, batch: int, bandwidth: float, peak_gflops: float) -> dict:
    """One decode step's floor: weights read once, 2 FLOPs per matmul weight per row."""
    import torch

    size = torch.finfo(dtype).bits // 8
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    read = (matmul + sum(p.numel() for n, p in model.named_parameters() if "norm" in n)) * size
    memory_ms = read / bandwidth * 1e3
    flops_ms = 2 * matmul * batch / peak_gflops / 1e6
    return {"bytes": read, "memory_ms": memory_ms, "flops_ms": flops_ms, "ms": max(memory_ms, flops_ms)}


def run_generate(args, env: dict, peaks: dict) -> dict:
    import torch
    from bench_common import make_bench_data

    from picoalign.data.formats import read_sft
    from picoalign.generation.batched import encode_prompt, end_ids
    from picoalign.models.load import load_model, pick_dtype

    tmp = Path(tempfile.mkdtemp(prefix="picoalign-bench-"))
    data = make_bench_data(tmp / "data", 8, max(BATCHES))
    prompts = [r["prompt"] for r in read_sft(data / "sft_test.jsonl")][: max(BATCHES)]
    dtype = pick_dtype(args.dtype, torch.device("cpu"))
    model, tok = load_model(BUILTIN)
    model.to(dtype).eval()
    ids = [encode_prompt(tok, p) for p in prompts]
    ends = end_ids(model, tok)
    new = args.new_tokens
    gguf = export_gguf(Path(args.gguf_dir)) if not args.no_llamacpp else None
    bandwidth = memory_bandwidth_gbs() * 1e9
    dname = "bf16" if dtype == torch.bfloat16 else "fp32"
    print(f"memory bandwidth (read, best of 5): {bandwidth / 1e9:.1f} GB/s; model in {dname}", flush=True)
    ours(model, tok, prompts[:2], 2, 4)  # warm-up: kernels, the engine's layout check
    rows, one = {}, max(1, args.solo_prompts)
    for b in BATCHES:
        rows[f"picoalign batch {b}"] = r = ours(model, tok, prompts[: max(b, one)], b, new)
        r["bound"] = bound(model, dtype, b, bandwidth, peaks[dname]["gflops"])
        print(f"[picoalign batch {b}] {r['s']:.1f}s {r['tokens']} tokens", flush=True)
    rows["HF generate batch 1"] = hf(model, tok, ids[:one], 1, new, ends)
    rows["HF generate batch 32"] = hf(model, tok, ids[:32], 32, new, ends)
    if gguf is not None:
        rows["llama.cpp batch 1 (f16 GGUF)"] = llamacpp(gguf, ids[:one], new, ends, env["cores"])
    for r in rows.values():
        r["tokens_per_s"] = r["tokens"] / r["s"]
    same = {name: sum(a == b for a, b in zip(r["outputs"], rows["picoalign batch 1"]["outputs"]))
            for name, r in rows.items() if name != "picoalign batch 1"}
    return {"rows": rows, "same_as_ours_batch1": same, "dtype": dname, "bandwidth_gbs": bandwidth / 1e9,
            "new_tokens": new, "solo_prompts": one,
            "prompt_tokens": statistics.mean(map(len, ids))}


def print_generate(result: dict) -> None:
    from bench_common import print_table

    rows = result["rows"]
    hf1 = rows["HF generate batch 1"]["tokens_per_s"]
    llama = rows.get("llama.cpp batch 1 (f16 GGUF)", {}).get("tokens_per_s")
    head = ["side", "tokens/s", "x HF b1", "x llama.cpp", "ms / decode step", "bound ms (mem / FLOPs)",
            "step / bound", "prefill tokens/s", "same greedy as ours b1"]
    table = []
    for name, r in rows.items():
        b = r.get("bound")
        table.append([name, f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s'] / hf1:.2f}",
                      f"{r['tokens_per_s'] / llama:.2f}" if llama else "-",
                      f"{r['step_ms']:.1f}" if "step_ms" in r else "-",
                      f"{b['ms']:.1f} ({b['memory_ms']:.1f} / {b['flops_ms']:.1f})" if b else "-",
                      f"{r['step_ms'] / b['ms']:.2f}" if b else "-",
                      f"{r['prefill_tps']:.0f}" if "prefill_tps" in r else "-",
                      str(result["same_as_ours_batch1"].get(name, "-"))])
    print()
    print_table(head, table)
    print(f"\n{result['dtype']}; {result['new_tokens']} new tokens per prompt (greedy; fewer where an answer "
          f"ends), prompts of {result['prompt_tokens']:.0f} tokens on average; batch 1 rows: "
          f"{result['solo_prompts']} prompts one after the other; bandwidth {result['bandwidth_gbs']:.1f} GB/s")
    print("  tokens/s = new tokens / wall time (prefill included); step = median decode forward with the whole "
          "batch decoding; bound = max(weight bytes / bandwidth, 2 x matmul weights x batch / matmul peak)")
