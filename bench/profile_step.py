"""Where a training step's time goes: data, forward, backward, optimizer, logging.

    python bench/profile_step.py                                  # SFT and DPO, built-in model, batch 4
    python bench/profile_step.py --mode sft --model runs/x/checkpoints/base --batch-size 8
    python bench/profile_step.py --mode dpo --trace dpo_trace.json  # also a Chrome/Perfetto trace

Each mode runs the real stage (`prepare` -> SFTTask/DPOTask -> `fit`) for `--warmup` + 1 steps
under torch.profiler and reads the labels the loop puts on its phases (`picoalign/data`,
`picoalign/forward`, `picoalign/backward`, `picoalign/optimizer`, `picoalign/log`) inside the
last `picoalign/step`, so the first step's one-off costs stay out. `forward` is the task's loss
(model forward, log-softmax, loss and its metrics); `log` is the metrics' averaging across
ranks, the JSONL/TensorBoard/MLflow line and the progress bar; `other` is the step minus its
phases. The model trains a LoRA adapter (r=16, alpha=32, all linear layers) on the story data,
max length 512, as bench/compare.py does; DPO uses the precomputed reference (its one-off cost,
before the first step, is printed apart). Times are CPU-side: on CUDA, run with
CUDA_LAUNCH_BLOCKING=1 for a wall-time split, or read the device times in `--trace`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

BUILTIN = "builtin:smollm2-135m-instruct"
PHASES = ("data", "forward", "backward", "optimizer", "log")


def stage_config(mode: str, args, data: Path, out: Path):
    from picoalign.config import DPOConfig, LoraConfig, SFTConfig

    common = dict(model=args.model, data=str(data), out=str(out), dtype=args.dtype, device=args.device, seed=1234,
                  lora=LoraConfig(r=16, alpha=32), batch_size=args.batch_size, max_length=args.max_length,
                  max_steps=args.warmup + 1, epochs=0, eval_every=0, warmup_steps=0, progress=False,
                  tensorboard=False)
    if mode == "sft":
        return SFTConfig(**common, monitor_file=None)
    return DPOConfig(**common, reference="precompute", prefix_sharing=True)


def profile_mode(mode: str, args, tmp: Path) -> dict:
    """Run one stage under the profiler; returns the last step's phases in ms and its tokens."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from picoalign.config import DataConfig
    from picoalign.data.make import make_data
    from picoalign.io import read_jsonl_lenient
    from picoalign.train.dpo import DPOTask
    from picoalign.train.loop import fit
    from picoalign.train.sft import SFTTask
    from picoalign.train.stage import prepare

    n = args.batch_size * (args.warmup + 1)  # every step a fresh batch, no reference log-probs to spare
    data = tmp / "data"
    if not data.exists():
        make_data(DataConfig(out=str(data), n_sft_train=n, n_sft_val=0, n_sft_test=0, n_dpo_train=n,
                             n_dpo_val=0, n_dpo_test=0))
    cfg = stage_config(mode, args, data, tmp / mode)
    p = prepare(cfg, mode)
    t = time.perf_counter()
    task = SFTTask(p.model, p.tokenizer, cfg, p.device) if mode == "sft" else \
        DPOTask(p.model, p.tokenizer, cfg, p.device, p.dtype)
    setup_s = time.perf_counter() - t  # tokenising (and DPO's reference precompute)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if p.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fit(task, cfg, mode, p.device, p.dtype, p.log_dir)
    if args.trace:
        prof.export_chrome_trace(str(Path(args.trace).with_suffix(f".{mode}.json")))
    steps = [e for e in prof.events() if e.name == "picoalign/step"]
    last = max(steps, key=lambda e: e.time_range.start)
    inside = [e for e in prof.events() if e.time_range.start >= last.time_range.start
              and e.time_range.end <= last.time_range.end]
    ms = {ph: sum(e.time_range.elapsed_us() for e in inside if e.name == f"picoalign/{ph}") / 1e3 for ph in PHASES}
    step_ms = last.time_range.elapsed_us() / 1e3
    ms["other"] = step_ms - sum(ms.values())
    row = [r for r in read_jsonl_lenient(Path(cfg.out) / "logs" / f"{mode}.jsonl") if r["kind"] == "train"][-1]
    return {"mode": mode, "step_ms": step_ms, "phases": ms, "tokens": row["tokens"], "setup_s": setup_s,
            "dtype": str(p.dtype).replace("torch.", ""), "device": str(p.device), "threads": torch.get_num_threads(),
            "ops": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops)
            if args.ops else ""}


def report(r: dict, args) -> None:
    what = "reference precompute + tokenising" if r["mode"] == "dpo" else "tokenising"
    print(f"\n{r['mode']}: {args.model}, LoRA r=16, batch {args.batch_size}, max length {args.max_length}, "
          f"{r['dtype']} on {r['device']} (torch threads: {r['threads']}); step {args.warmup + 1} of {args.warmup + 1}: "
          f"{r['step_ms'] / 1e3:.2f} s, {r['tokens']} tokens ({r['tokens'] / r['step_ms'] * 1e3:.0f} tokens/s); "
          f"before step 1: {what} {r['setup_s']:.1f} s")
    print("| phase | ms | share |\n|---|---:|---:|")
    for name, v in r["phases"].items():
        print(f"| {name} | {v:.1f} | {100 * v / r['step_ms']:.1f}% |")
    if r["ops"]:
        print(f"\n{r['mode']}: the most expensive operators over all {args.warmup + 1} steps (self CPU time)\n{r['ops']}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("sft", "dpo", "both"), default="both")
    ap.add_argument("--model", default=BUILTIN, help="any model picoalign loads (default: the built-in)")
    ap.add_argument("--batch-size", type=int, default=4, help="examples (SFT) or pairs (DPO) per step")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=1, help="steps before the profiled one")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--ops", type=int, default=0, help="also print the N most expensive operators")
    ap.add_argument("--trace", help="write Chrome traces to TRACE.sft.json / TRACE.dpo.json")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="picoalign-profile-"))
    for mode in ("sft", "dpo") if args.mode == "both" else (args.mode,):
        report(profile_mode(mode, args, tmp), args)


if __name__ == "__main__":
    sys.exit(main())
