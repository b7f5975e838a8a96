"""GRPO: TRL 1.16's GRPOTrainer (no vLLM) against `picoalign rl --method grpo`, in one run.

    python bench/compare.py --mode grpo --steps 4                  # dispatched here
    python bench/compare_grpo.py --steps 4 --prompts 4 --generations 4 --completion-length 32

Both sides: the built-in SmolLM2-135M-Instruct (the same dequantised weights), LoRA r=16 alpha=32
on all linear layers, the same arith prompts (data/arith.py) and `arith` reward, `--prompts`
prompts per step with `--generations` (G) completions each, sampled at temperature 1 up to
`--completion-length` tokens, loss_type dapo, β = 0, one optimiser step per rollout, the same
dtype and torch threads. TRL samples with transformers' `generate` (its default without vLLM);
picoalign with `generation/batched.generate_full`. Each side runs in its own process (its own
memory), one after the other: `--warmup` untimed steps, then `--steps` timed ones. Reported:
seconds per step (rollout + update), completions per second, and the ratio. Run timed only
through /work/bin/alone, and compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

BUILTIN = "builtin:smollm2-135m-instruct"
LORA_R, LORA_ALPHA, SEED = 16, 32, 1234


def _quiet(threads: int) -> None:
    import os
    import warnings

    import torch

    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")


def peer_side(spec: dict) -> dict:
    """TRL's GRPOTrainer: per-step seconds from its own callbacks."""
    _quiet(spec["threads"])
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from picoalign.data.arith import arith_rows
    from picoalign.models.load import load_model
    from picoalign.rewards.builtin import arith

    model, tokenizer = load_model(spec["model"], "cpu")
    rows = arith_rows(spec["prompts"] * (spec["steps"] + spec["warmup"]), SEED, "train")
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                              for r in rows])
    n = spec["prompts"] * spec["generations"]
    args = GRPOConfig(output_dir=spec["tmp"], report_to=[], per_device_train_batch_size=n,
                      num_generations=spec["generations"], max_completion_length=spec["completion_length"],
                      temperature=1.0, top_p=1.0, loss_type="dapo", beta=0.0, learning_rate=2e-4,
                      max_steps=spec["steps"] + spec["warmup"], logging_steps=1, save_strategy="no", use_cpu=True,
                      bf16=spec["dtype"] == "bf16", seed=SEED, gradient_checkpointing=False, shuffle_dataset=False,
                      disable_tqdm=True)
    times, lengths = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    def arith_reward(prompts, completions, answer, **kw):
        return arith(prompts, [c[0]["content"] if isinstance(c, list) else c for c in completions], answer)

    trainer = GRPOTrainer(model=model, reward_funcs=arith_reward, args=args, train_dataset=data,
                          processing_class=tokenizer, callbacks=[Timer()],
                          peft_config=LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    torch.manual_seed(SEED)
    trainer.train()
    return {"step_s": times[spec["warmup"]:], "mean_length": lengths[spec["warmup"]:]}


def ours_side(spec: dict) -> dict:
    """`picoalign rl` through its stage function: per-step seconds from its log's elapsed times."""
    _quiet(spec["threads"])
    from picoalign.config import LoraConfig, RLConfig
    from picoalign.io import read_jsonl_lenient
    from picoalign.train.rl import rl

    out = Path(spec["tmp"]) / "ours"
    rl(RLConfig(model=spec["model"], out=str(out), data=spec["tmp"], device="cpu", dtype=spec["dtype"], seed=SEED,
                n_prompts=spec["prompts"] * (spec["steps"] + spec["warmup"]), val_prompts=0,
                batch_size=spec["prompts"], num_generations=spec["generations"],
                max_completion_length=spec["completion_length"], temperature=1.0, loss_type="dapo", beta=0.0,
                lr=2e-4, max_steps=spec["steps"] + spec["warmup"], sample_every=0, tensorboard=False,
                progress=False, threads=spec["threads"], lora=LoraConfig(r=LORA_R, alpha=LORA_ALPHA)))
    rows = [r for r in read_jsonl_lenient(out / "logs" / "rl.jsonl") if r["kind"] == "train"]
    elapsed = [0.0] + [r["elapsed"] for r in rows]
    steps = [b - a for a, b in zip(elapsed, elapsed[1:])]
    return {"step_s": steps[spec["warmup"]:], "mean_length": [r["completions/mean_length"] for r in rows][spec["warmup"]:],
            "rollout_s": [r["time/rollout"] for r in rows][spec["warmup"]:]}


def _run(side: str, spec: dict, queue) -> None:
    try:
        queue.put({"ok": (peer_side if side == "peer" else ours_side)(spec)})
    except Exception as e:  # noqa: BLE001 - reported by the main process
        import traceback

        queue.put({"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})


def run_side(side: str, spec: dict) -> dict:
    """One side in a fresh process (spawn), so its memory and threads are its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(side, spec, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{side}: {result['error']}")
    return result["ok"]


def summarise(result: dict, completions_per_step: int) -> dict:
    med = statistics.median(result["step_s"])
    # three significant figures, not two decimals: a tiny model's 0.045 s step read 0.04 (11% off)
    return {"s_per_step": float(f"{med:.3g}"), "completions_per_s": float(f"{completions_per_step / med:.3g}"),
            "mean_completion_tokens": round(statistics.mean(result["mean_length"]), 1),
            "steps": [float(f"{s:.3g}") for s in result["step_s"]]}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="grpo", choices=("grpo",), help="(from bench/compare.py)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--generations", type=int, default=4, help="G: completions per prompt")
    ap.add_argument("--completion-length", type=int, default=32, help="max completion tokens")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0: torch's default)")
    ap.add_argument("--model", default=BUILTIN)
    ap.add_argument("--sides", default="peer,ours", help="which sides to run (a smoke test: ours)")
    ap.add_argument("--json", help="also write the results to this file")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    n = args.prompts * args.generations
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in [s.strip() for s in args.sides.split(",") if s.strip()]:
            spec = {"model": args.model, "tmp": str(Path(tmp) / side), "threads": args.threads, "dtype": args.dtype,
                    "steps": args.steps, "warmup": args.warmup, "prompts": args.prompts,
                    "generations": args.generations, "completion_length": args.completion_length}
            Path(spec["tmp"]).mkdir(parents=True)
            print(f"grpo: {side}: {args.warmup} + {args.steps} steps of {args.prompts} prompts x {args.generations} "
                  f"completions (<= {args.completion_length} tokens), {args.dtype}", flush=True)
            results[side] = summarise(run_side(side, spec), n)
            print(f"grpo: {side}: {json.dumps(results[side])}", flush=True)
    if {"peer", "ours"} <= set(results):
        ratio = results["peer"]["s_per_step"] / results["ours"]["s_per_step"]
        results["speedup"] = round(ratio, 2)
        print("| side | s/step | completions/s | mean completion tokens |\n|---|---|---|---|")
        for side, name in (("peer", "TRL GRPOTrainer (transformers generate)"), ("ours", "picoalign rl")):
            r = results[side]
            print(f"| {name} | {r['s_per_step']} | {r['completions_per_s']} | {r['mean_completion_tokens']} |")
        print(f"picoalign / TRL: {ratio:.2f}x the steps per second (and completions per second)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
