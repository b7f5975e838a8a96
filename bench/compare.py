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
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

BUILTIN = "builtin:smollm2-135m-instruct"
LORA_R, LORA_ALPHA = 16, 32
BATCH, MAX_LENGTH, BETA, SEED = 4, 512, 0.1, 1234


# ---------------------------------------------------------------- machine facts


def peak_rss_gib() -> float:
    """This process's lifetime peak resident set (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_rss_peak() -> bool:
    """Reset the kernel's high-water mark (VmHWM) so a later read covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak_since_reset_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return peak_rss_gib()


def has_fast_bf16() -> bool:
    from picoalign.models.load import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def resolve_dtype(setting: str) -> str:
    """"fp32" or "bf16": what `--dtype` means on this machine (auto = bf16 only where it is fast)."""
    import torch

    from picoalign.models.load import pick_dtype

    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[pick_dtype(setting, torch.device("cpu"))]


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 10, budget_s: float = 20.0) -> tuple[float, int]:
    """Best-of-N GFLOP/s of one n x n @ n x n matmul (2 n^3 FLOPs); stops early past `budget_s`."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a[:256, :256], b[:256, :256])  # load the kernels
    best, spent, runs = math.inf, 0.0, 0
    while runs < repeats and (runs == 0 or spent < budget_s):
        t0 = time.perf_counter()
        torch.mm(a, b)
        dt = time.perf_counter() - t0
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return 2 * n**3 / best / 1e9, runs


def environment() -> dict:
    import peft
    import torch
    import transformers
    import trl

    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fast_bf16": has_fast_bf16(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "allocator": "jemalloc (LD_PRELOAD)" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "glibc malloc",
    }


def _cpu_name() -> str:
    import torch

    from picoalign.train.flops import machine_name

    return machine_name(torch.device("cpu"))


# ---------------------------------------------------------------- data


def make_bench_data(folder: Path, examples: int, test_prompts: int = 16) -> Path:
    """The story data: `examples` SFT rows and preference pairs, `test_prompts` for generation."""
    from picoalign.config import DataConfig
    from picoalign.data.make import make_data

    make_data(DataConfig(out=str(folder), n_sft_train=examples, n_sft_val=0, n_sft_test=test_prompts,
                         n_dpo_train=examples, n_dpo_val=0, n_dpo_test=0))
    return folder


# ---------------------------------------------------------------- worker plumbing
# Each side lives in a worker process and answers the main process over a pipe:
#   -> ("run", k)  <- {"event": "block", "steps": [{"s", "tokens", "pairs", ...}, ...]}
#   -> ("profile",) <- {"event": "profile", "table": str}     (picoalign only)
#   -> ("stop",)   <- {"event": "done", "rss_gib", "train_rss_gib"}


def _quiet(threads: int = 0) -> None:
    import warnings

    import torch

    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' v6 renames


def _worker(conn, setup, spec: dict) -> None:
    """Run one side: `setup(spec)` returns (info, step_fn, profile_fn); then obey the pipe."""
    try:
        _quiet(spec["threads"])
        info, step, profile = setup(spec)
        conn.send({"event": "ready", **info})
        started = False
        while True:
            cmd = conn.recv()
            if cmd[0] == "run":
                if not started:
                    started = reset_rss_peak()
                conn.send({"event": "block", "steps": [step() for _ in range(cmd[1])]})
            elif cmd[0] == "profile":
                conn.send({"event": "profile", "table": profile() if profile else "not supported"})
            else:
                break
        conn.send({"event": "done", "rss_gib": peak_rss_gib(), "train_rss_gib": rss_peak_since_reset_gib()})
    except Exception:  # noqa: BLE001 - report anything to the main process, which stops the run
        conn.send({"event": "error", "trace": traceback.format_exc()})


def _expect(conn, event: str, who: str) -> dict:
    try:
        msg = conn.recv()
    except EOFError:
        raise RuntimeError(f"{who}: worker died (out of memory?)") from None
    if msg["event"] == "error":
        raise RuntimeError(f"{who} failed:\n{msg['trace']}")
    if msg["event"] != event:
        raise RuntimeError(f"{who}: expected {event}, got {msg['event']}")
    return msg


# ---------------------------------------------------------------- picoalign side


def ours_setup(spec: dict):
    """`picoalign sft/dpo`'s own path: prepare() -> SFTTask/DPOTask -> the loop's `train_step`."""
    import torch

    from picoalign.config import DPOConfig, LoraConfig, SFTConfig
    from picoalign.train import loop
    from picoalign.train.sft import SFTTask
    from picoalign.train.stage import prepare

    common = dict(model=spec.get("model", BUILTIN), data=spec["data"], out=str(Path(spec["tmp"]) / "ours"), dtype=spec["dtype"],
                  seed=SEED, lora=LoraConfig(r=LORA_R, alpha=LORA_ALPHA), batch_size=BATCH,
                  max_length=MAX_LENGTH, max_steps=spec["total_steps"], epochs=0, progress=False,
                  tensorboard=False)
    t0 = time.perf_counter()
    if spec["mode"] == "sft":
        cfg = SFTConfig(**common, monitor_file=None)
        p = prepare(cfg, "sft")
        task = SFTTask(p.model, p.tokenizer, cfg, p.device)
    else:
        cfg = DPOConfig(**common, beta=BETA, reference="precompute", prefix_sharing=True)
        p = prepare(cfg, "dpo")
        task = _timed_dpo_task()(p.model, p.tokenizer, cfg, p.device, p.dtype)
    setup_s = time.perf_counter() - t0
    batches = task.batches()
    params = [q for q in task.model.parameters() if q.requires_grad]
    opt = loop.make_optimizer(params, cfg)
    sched = loop.make_schedule(opt, cfg, loop.planned_steps(cfg, len(batches)))
    state = loop.LoopState()
    loop.seed_everything(cfg.seed)
    device, dtype = p.device, p.dtype

    def step() -> dict:
        epoch, k = divmod(state.micro, len(batches))  # the batch `train_step` is about to take
        batch = batches[loop.batch_order(len(batches), epoch, cfg.seed)[k]]
        t = time.perf_counter()
        metrics, computed = loop.train_step(task, batches, state, cfg, opt, sched, params, device, dtype).read(device)
        dt = time.perf_counter() - t
        tokens, pairs = (computed, 0) if spec["mode"] == "sft" else (logical_pair_tokens(batch), batch.n_seqs // 2)
        return {"s": dt, "tokens": tokens, "computed_tokens": computed, "pairs": pairs, "loss": metrics["loss"]}

    def profile() -> str:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48)

    from picoalign.train.flops import matmul_parameters

    n_all = sum(q.numel() for q in task.model.parameters())
    info = {"setup_s": setup_s, "n_matmul": matmul_parameters(task.model),
            "padded_tokens": sum(b.input_ids.numel() for b in batches) / len(batches),
            "precompute_s": getattr(task, "precompute_s", None), "n_params": n_all,
            "n_trainable": sum(q.numel() for q in params), "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
            "threads": torch.get_num_threads(), "n_batches": len(batches),
            "config": ("one row per example, length-sorted batches, logits only at targets" if spec["mode"] == "sft" else
                       "precomputed reference, prefix sharing, logits only at targets")}
    return info, step, profile


def _timed_dpo_task():
    from picoalign.train.dpo import DPOTask

    class TimedDPOTask(DPOTask):
        """DPOTask that records how long its reference precompute took."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.precompute_s = getattr(self, "setup_seconds", None)  # None: nothing to precompute

    return TimedDPOTask


def logical_pair_tokens(batch) -> int:
    """Real tokens of a preference batch counted as TRL feeds them: (prompt+chosen) + (prompt+rejected).

    A prefix-shared row is [prompt, chosen, rejected]; position 0 occurs only at its first token
    (padding has position 0 too), so the row's real length is the count of non-zero positions + 1.
    """
    import torch

    lengths = (batch.position_ids != 0).sum(1) + 1
    rows = batch.input_ids.shape[0]
    if rows == batch.n_seqs:  # no prefix sharing: each row is already prompt + one answer
        return int(lengths.sum())
    targets = torch.bincount(batch.seq_index // 2, minlength=rows)
    return int((2 * lengths - targets).sum())


# ---------------------------------------------------------------- TRL side


def peer_setup(spec: dict):
    """TRL's trainer, driven by its own `train()`; a callback pauses it between blocks."""
    os.environ.setdefault("HF_DATASETS_CACHE", str(Path(spec["tmp"]) / "hf-datasets"))
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from picoalign.data.formats import read_preferences, read_sft

    folder = spec["model_dir"]
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    gc = True  # TRL 1.16's default, and what `best` asks for SFT
    common = dict(output_dir=str(Path(spec["tmp"]) / "peer"), per_device_train_batch_size=BATCH,
                  max_steps=spec["total_steps"], max_length=MAX_LENGTH, bf16=spec["dtype"] == "bf16",
                  gradient_checkpointing=gc, use_cpu=True, report_to="none", save_strategy="no",
                  disable_tqdm=True, seed=SEED)
    data = Path(spec["data"])
    timer: dict = {}
    counter = {"tokens": 0, "pairs": 0}
    if spec["mode"] == "sft":
        from trl import SFTConfig, SFTTrainer

        rows = read_sft(data / "sft_train.jsonl")
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                 "completion": [{"role": "assistant", "content": r["response"]}]} for r in rows])
        args = SFTConfig(**common, completion_only_loss=True)
        trainer_cls, precompute = _counting(SFTTrainer, counter, timer, pairs=False), False
    else:
        from trl import DPOConfig, DPOTrainer

        rows = read_preferences(data / "dpo_train.jsonl")
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
        precompute = spec["peer_config"] == "best"
        args = DPOConfig(**common, beta=BETA, precompute_ref_log_probs=precompute)
        trainer_cls = _counting(DPOTrainer, counter, timer, pairs=True)
    t0 = time.perf_counter()
    trainer = trainer_cls(model=model, args=args, train_dataset=ds, processing_class=tokenizer, peft_config=lora)
    setup_s = time.perf_counter() - t0
    n_all = sum(q.numel() for q in trainer.model.parameters())
    n_train = sum(q.numel() for q in trainer.model.parameters() if q.requires_grad)
    what = {"sft": "TRL SFTTrainer defaults", "dpo": "TRL DPOTrainer defaults (live reference: adapter off)"}
    config = what[spec["mode"]] if spec["peer_config"] == "default" else (
        "TRL + gradient checkpointing" if spec["mode"] == "sft" else "TRL + precompute_ref_log_probs")
    info = {"setup_s": setup_s, "precompute_s": timer.get("precompute") if precompute else None,
            "n_params": n_all, "n_trainable": n_train, "dtype": spec["dtype"], "threads": torch.get_num_threads(),
            "config": f"{config}, gradient checkpointing {'on' if gc else 'off'}"}
    return info, trainer, counter, TrainerCallback


def _counting(trainer_cls, counter: dict, timer: dict, pairs: bool):
    """A subclass that counts the real tokens of every training batch and times the precompute."""

    class Counting(trainer_cls):
        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            counter["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            if pairs:  # DPO batches are [chosen rows..., rejected rows...]
                counter["pairs"] += inputs["input_ids"].shape[0] // 2
            return super().training_step(model, inputs, *args, **kwargs)

        def _precompute_ref_logps(self, *args, **kwargs):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            timer["precompute"] = timer.get("precompute", 0.0) + time.perf_counter() - t
            return out

    return Counting


def peer_worker(conn, spec: dict) -> None:
    """Like `_worker`, but TRL owns the loop: the pipe is served from inside a callback."""
    try:
        _quiet(spec["threads"])
        info, trainer, counter, TrainerCallback = peer_setup(spec)
        conn.send({"event": "ready", **info})
        state = {"quota": 0, "steps": [], "stopped": False, "t": 0.0, "tokens": 0, "pairs": 0}

        def wait_for_work() -> None:
            while True:
                cmd = conn.recv()
                if cmd[0] == "run":
                    state["quota"] = cmd[1]
                    state["t"], state["tokens"], state["pairs"] = time.perf_counter(), counter["tokens"], counter["pairs"]
                    return
                if cmd[0] == "profile":
                    conn.send({"event": "profile", "table": "not supported"})
                    continue
                state["stopped"] = True
                return

        class Pause(TrainerCallback):
            def on_train_begin(self, args, st, control, **kw):
                reset_rss_peak()
                wait_for_work()

            def on_step_end(self, args, st, control, **kw):
                now = time.perf_counter()
                state["steps"].append({"s": now - state["t"], "tokens": counter["tokens"] - state["tokens"],
                                       "pairs": counter["pairs"] - state["pairs"]})
                state["t"], state["tokens"], state["pairs"] = now, counter["tokens"], counter["pairs"]
                state["quota"] -= 1
                if state["quota"] <= 0:
                    conn.send({"event": "block", "steps": state["steps"]})
                    state["steps"] = []
                    wait_for_work()
                    if state["stopped"]:
                        control.should_training_stop = True
                return control

        trainer.add_callback(Pause())
        trainer.train()
        if not state["stopped"]:
            wait_for_work()
        conn.send({"event": "done", "rss_gib": peak_rss_gib(), "train_rss_gib": rss_peak_since_reset_gib()})
    except Exception:  # noqa: BLE001
        conn.send({"event": "error", "trace": traceback.format_exc()})


def ours_worker(conn, spec: dict) -> None:
    _worker(conn, ours_setup, spec)


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


def print_table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")


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
