"""bench/compare.py --mode sft|dpo: the two sides' workers driven in alternating blocks, then
their step times, tokens/s, MFU and peak RSS summarised and printed.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path

from bench_common import BATCH, BUILTIN, _expect, make_bench_data, print_table, resolve_dtype
from train_sides import ours_worker, peer_worker

# ---------------------------------------------------------------- training comparison


def schedule(warmup: int, steps: int, block: int) -> list[tuple[str, int, bool]]:
    """(side, steps, timed): warmup for each, then alternating blocks peer, ours, peer, ours..."""
    plan = []
    if warmup:
        plan += [("peer", warmup, False), ("picoalign", warmup, False)]
    done = 0
    while done < steps:
        k = min(block, steps - done)
        plan += [("peer", k, True), ("picoalign", k, True)]
        done += k
    return plan


def run_training(args, env: dict, peaks: dict) -> dict:
    import multiprocessing as mp

    from picoalign.models.load import resolve

    tmp = Path(tempfile.mkdtemp(prefix="picoalign-bench-"))
    data = make_bench_data(tmp / "data", args.examples)
    dtype = resolve_dtype(args.dtype)
    spec = {"mode": args.mode, "data": str(data), "tmp": str(tmp), "dtype": dtype,
            "model_dir": resolve(BUILTIN).path, "total_steps": args.warmup + args.steps,
            "peer_config": args.peer_config, "threads": args.threads}
    ctx = mp.get_context("spawn")
    sides: dict = {}
    try:
        for name, target in (("peer", peer_worker), ("picoalign", ours_worker)):  # one at a time: fair setup
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(child, spec), daemon=True)
            proc.start()
            child.close()
            sides[name] = {"proc": proc, "conn": parent, "info": _expect(parent, "ready", name), "steps": []}
            print(f"[{name}] ready: setup {sides[name]['info']['setup_s']:.1f}s", flush=True)
        peaks["model"] = model_shape_peak(dtype, int(sides["picoalign"]["info"]["padded_tokens"]))  # both idle
        for name, k, timed in schedule(args.warmup, args.steps, args.block):
            sides[name]["conn"].send(("run", k))
            steps = _expect(sides[name]["conn"], "block", name)["steps"]
            print(f"[{name}] {'timed' if timed else 'warmup'} {k} step(s): "
                  + ", ".join(f"{s['s']:.2f}s/{s['tokens']}tok" for s in steps), flush=True)
            if timed:
                sides[name]["steps"] += steps
        if args.profile:
            sides["picoalign"]["conn"].send(("profile",))
            print("\npicoalign: one step under torch.profiler (self CPU time)\n"
                  + _expect(sides["picoalign"]["conn"], "profile", "picoalign")["table"], flush=True)
        for name, side in sides.items():
            side["conn"].send(("stop",))
            side["done"] = _expect(side["conn"], "done", name)
            side["proc"].join(timeout=60)
    finally:
        for side in sides.values():
            if side["proc"].is_alive():
                side["proc"].terminate()
    return summarise_training(args, sides, peaks, dtype)


def model_shape_peak(dtype_name: str, tokens: int) -> dict:
    """The ceiling for this model's own matmuls: each linear shape of the built-in model as one
    [tokens x in]·[in x out] matmul at the step's token count, best of 3, weighted by its use
    (picoalign.train.flops, the figure the training log's MFU is against); both sides idle meanwhile."""
    import torch

    from picoalign.models.load import load_model
    from picoalign.train.flops import linear_shapes, measure_shapes, peak_from

    model, _ = load_model(BUILTIN)
    shapes = linear_shapes(model)
    del model
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    seconds = measure_shapes(shapes, tokens, dtype, torch.device("cpu"))
    per_shape = {f"[{tokens}x{i}]·[{i}x{o}]": 2 * tokens * i * o / seconds[(i, o)] / 1e9 for i, o in shapes}
    peak = peak_from(shapes, tokens, seconds) / 1e9
    print(f"model-shape peak ({dtype_name}, {tokens} tokens): {peak:.1f} GFLOP/s; per shape: "
          + ", ".join(f"{k} {v:.0f}" for k, v in per_shape.items()), flush=True)
    return {"gflops": peak, "tokens": tokens, "per_shape_gflops": per_shape}


def flops_factor(mode: str, side: str, peer_config: str) -> int:
    """FLOPs per parameter per token: 4 (forward + input-grad, LoRA), +2 for a live reference forward."""
    live_reference = mode == "dpo" and side == "peer" and peer_config == "default"
    return 4 + (2 if live_reference else 0)


def summarise_training(args, sides: dict, peaks: dict, dtype: str) -> dict:
    rows = {}
    for name, side in sides.items():
        steps, info = side["steps"], side["info"]
        total_s = sum(s["s"] for s in steps)
        tokens = sum(s["tokens"] for s in steps)
        factor = flops_factor(args.mode, name, args.peer_config)
        # N = the weights of the linear layers (the same model on both sides; the embedding is a lookup)
        n_matmul = sides["picoalign"]["info"]["n_matmul"]
        gflops = factor * n_matmul * tokens / total_s / 1e9 if total_s else float("nan")
        rows[name] = {
            "config": info["config"], "dtype": info["dtype"], "threads": info["threads"],
            "s_per_step": total_s / len(steps), "s_per_step_sd": statistics.pstdev([s["s"] for s in steps]),
            "s_per_step_median": statistics.median(s["s"] for s in steps), "step_s": [s["s"] for s in steps],
            "tokens_per_step": tokens / len(steps), "tokens_per_s": tokens / total_s,
            "pairs_per_s": (sum(s["pairs"] for s in steps) / total_s) if args.mode == "dpo" else None,
            "computed_tokens_per_step": (sum(s.get("computed_tokens", s["tokens"]) for s in steps) / len(steps)),
            "flops_factor": factor, "gflops": gflops, "peak_share": gflops / peaks[info["dtype"]]["gflops"],
            "mfu": gflops / peaks["model"]["gflops"], "n_matmul": n_matmul,
            "peak_rss_gib": side["done"]["rss_gib"], "train_rss_gib": side["done"]["train_rss_gib"],
            "setup_s": info["setup_s"], "precompute_s": info["precompute_s"], "n_params": info["n_params"],
            # one epoch of the --examples pairs, its reference precompute included
            "epoch_pairs_per_s": (args.examples / ((info["precompute_s"] or 0.0)
                                                   + total_s / len(steps) * math.ceil(args.examples / BATCH)))
            if args.mode == "dpo" else None,
            "n_trainable": info["n_trainable"], "steps_timed": len(steps),
        }
    peer, ours = rows["peer"], rows["picoalign"]
    ratio = {"step_time_ours_over_peer": ours["s_per_step"] / peer["s_per_step"],
             "epoch_pairs_per_s_ours_over_peer": (ours["epoch_pairs_per_s"] / peer["epoch_pairs_per_s"]
                                                   if args.mode == "dpo" else None),
             "tokens_per_s_ours_over_peer": ours["tokens_per_s"] / peer["tokens_per_s"],
             "peak_rss_ours_over_peer": ours["peak_rss_gib"] / peer["peak_rss_gib"],
             # each picoalign step against the peer step just before it: robust to load that comes and goes
             "paired_median_step_ratio": statistics.median(o / p for o, p in zip(ours["step_s"], peer["step_s"]))}
    return {"rows": rows, "ratio": ratio}


def print_training(args, env: dict, peaks: dict, result: dict, notes: list[str]) -> None:
    rows, ratio = result["rows"], result["ratio"]
    pairs = args.mode == "dpo"
    head = ["side", "dtype", "s/step (mean ± sd)", "median", "tokens/s"] + (["pairs/s", "epoch pairs/s"] if pairs else []) + \
        ["GFLOP/s", "MFU", "% 2048² peak", "peak RSS", "train RSS", "precompute"]
    table = []
    for name, r in rows.items():
        cells = [name, r["dtype"], f"{r['s_per_step']:.2f} ± {r['s_per_step_sd']:.2f}",
                 f"{r['s_per_step_median']:.2f}", f"{r['tokens_per_s']:.0f}"]
        cells += [f"{r['pairs_per_s']:.3f}", f"{r['epoch_pairs_per_s']:.3f}"] if pairs else []
        pre = "-" if r["precompute_s"] is None else f"{r['precompute_s']:.1f}s"
        cells += [f"{r['gflops']:.1f}", f"{100 * r['mfu']:.1f}%", f"{100 * r['peak_share']:.1f}%",
                  f"{r['peak_rss_gib']:.2f} GiB",
                  f"{r['train_rss_gib']:.2f} GiB", pre]
        table.append(cells)
    print()
    print_table(head, table)
    print(f"\nratio picoalign/peer: s/step {ratio['step_time_ours_over_peer']:.2f}x "
          f"(speed-up {1 / ratio['step_time_ours_over_peer']:.2f}x), tokens/s "
          f"{ratio['tokens_per_s_ours_over_peer']:.2f}x, peak RSS {ratio['peak_rss_ours_over_peer']:.2f}x; "
          f"median of step-by-step ratios (each picoalign step / the peer step before it) "
          f"{ratio['paired_median_step_ratio']:.2f}x"
          + (f"; pairs/s over one epoch with its precompute {ratio['epoch_pairs_per_s_ours_over_peer']:.2f}x"
             if pairs else ""))
    for name, r in rows.items():
        print(f"  {name}: {r['config']}; {r['steps_timed']} timed steps, {r['tokens_per_step']:.0f} real tokens/step"
              + (f" ({r['computed_tokens_per_step']:.0f} run through the model)"
                 if r["computed_tokens_per_step"] != r["tokens_per_step"] else "")
              + f", setup {r['setup_s']:.1f}s, {r['n_trainable'] / 1e6:.2f}M of {r['n_params'] / 1e6:.1f}M params "
              f"trainable, FLOPs = {r['flops_factor']} x N x tokens (N = the linear layers' "
              f"{r['n_matmul'] / 1e6:.1f}M weights); MFU against the model-shape peak")
    for note in notes:
        print(f"  note: {note}")

