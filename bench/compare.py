"""Benchmark picoalign against TRL (training) and plain transformers (generation), in one run.

    python bench/compare.py --mode sft --steps 5                 # TRL SFTTrainer vs `picoalign sft`
    python bench/compare.py --mode dpo --steps 4                 # TRL DPOTrainer vs `picoalign dpo`
    python bench/compare.py --mode dpo --peer-config best        # TRL with precomputed reference
    python bench/compare.py --mode generate                      # picoalign b1-64 vs HF generate, llama.cpp
    python bench/compare.py --mode grpo --steps 4                # TRL GRPOTrainer vs `picoalign rl` (compare_grpo.py)
    python bench/compare.py --mode sft --steps 1 --examples 8    # a quick smoke run

Both sides train the built-in SmolLM2-135M-Instruct (the same dequantised weights), on the same
story data, with LoRA r=16 alpha=32 on all linear layers, 4 examples (or pairs) per step and
max length 512. Each side runs in its own worker process, so its peak RSS is its own; the main
process hands them blocks of steps in turn (peer, picoalign, peer, picoalign, ...), so load from
other work on the machine falls on both sides alike. Compare ratios from one run, never
absolute numbers across runs. See bench/README.md for the formulas.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its modules beside it, when imported by path
from bench_common import BATCH, _quiet, environment, matmul_peak, resolve_dtype  # noqa: E402
from compare_train import print_training, run_training  # noqa: E402
from train_sides import ours_setup  # noqa: E402, F401  (the test drives one step of each mode)

# ---------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mode", choices=("sft", "dpo", "generate", "grpo"), required=True)
    ap.add_argument("--steps", type=int, default=10, help="timed optimiser steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side first (generate: warm-up calls)")
    ap.add_argument("--examples", type=int, default=64, help="SFT rows / preference pairs in the training data")
    ap.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                    help="compute dtype for both sides (auto: bf16 only where the CPU runs it fast)")
    ap.add_argument("--peer-config", choices=("default", "best"), default="default",
                    help="default: TRL's defaults; best: SFT + gradient checkpointing, DPO + precomputed reference")
    ap.add_argument("--block", type=int, default=1, help="steps per alternating block")
    ap.add_argument("--new-tokens", type=int, default=64, help="generate: new tokens per prompt (greedy)")
    ap.add_argument("--solo-prompts", type=int, default=4,
                    help="generate: prompts run one after the other for the batch-1 rows")
    ap.add_argument("--gguf-dir", default=str(Path(tempfile.gettempdir()) / "picoalign-bench-gguf"),
                    help="generate: where the f16 GGUF export for llama.cpp is written (reused when there)")
    ap.add_argument("--no-llamacpp", action="store_true", help="generate: leave llama.cpp out")
    ap.add_argument("--profile", action="store_true", help="profile one extra picoalign step and print the top ops")
    ap.add_argument("--peak-budget", type=float, default=20.0, help="seconds per dtype for the matmul peak")
    ap.add_argument("--peak-n", type=int, default=2048, help="matrix size for the matmul peak")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0: torch's default)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if min(args.steps, args.block, args.new_tokens, args.solo_prompts) < 1 or args.warmup < 0 or args.examples < BATCH:
        ap.error("need --steps >= 1, --warmup >= 0, --examples >= 4, --block >= 1, --new-tokens >= 1, "
                 "--solo-prompts >= 1")
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "grpo" in argv and argv[argv.index("grpo") - 1] == "--mode" or "--mode=grpo" in argv:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from compare_grpo import main as grpo  # noqa: I001 - its own module: rollouts and rewards, not the step API

        return grpo(argv)
    args = parse_args(argv)
    _quiet(args.threads)
    env = environment()
    print(f"{env['date']}  torch {env['torch']}  transformers {env['transformers']}  trl {env['trl']}  "
          f"peft {env['peft']}  python {env['python']}")
    print(f"CPU: {env['cpu']}, {env['cores']} cores, capability {env['cpu_capability']}, fast bf16: "
          f"{env['fast_bf16']}, torch threads {env['torch_threads']}, allocator {env['allocator']}", flush=True)
    peaks = {}
    for name in ("fp32", "bf16"):
        gflops, runs = matmul_peak(name, n=args.peak_n, budget_s=args.peak_budget)
        peaks[name] = {"gflops": gflops, "runs": runs}
    print(f"matmul peak ({args.peak_n}x{args.peak_n} @ {args.peak_n}x{args.peak_n}, best of N): "
          + ", ".join(f"{k} {v['gflops']:.1f} GFLOP/s (N={v['runs']})" for k, v in peaks.items()), flush=True)
    notes = []
    dtype = resolve_dtype(args.dtype)
    if args.dtype == "auto" and not env["fast_bf16"]:
        notes.append(f"this CPU ({env['cpu_capability']}) has no fast bf16 (no AVX512-BF16/AMX): TRL's default "
                     "bf16=True is replaced by fp32, and picoalign's dtype=auto picks fp32")
    if args.mode == "generate":  # its own module: the decode engine against HF generate and llama.cpp
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from compare_generate import print_generate, run_generate

        result = run_generate(args, env, peaks)
        print_generate(result)
    else:
        if args.peer_config == "best" and args.mode == "sft":
            notes.append("TRL 1.16 already turns gradient checkpointing on by default: for SFT `best` = `default`")
        if args.mode == "dpo":
            notes.append("tokens/s counts (prompt+chosen)+(prompt+rejected) on both sides; picoalign runs the prompt "
                         "once per pair (prefix sharing), so it pushes fewer tokens through the model")
        result = run_training(args, env, peaks)
        print_training(args, env, peaks, result, notes)
    for note in notes if args.mode == "generate" else []:
        print(f"  note: {note}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "env": env, "matmul_peak": peaks,
                                               "dtype": dtype, "notes": notes, **result}, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())

