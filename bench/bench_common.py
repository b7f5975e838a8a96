"""What bench/compare.py's modes share: the settings both sides train with, machine facts (RSS,
the matmul peak, versions), the bench data, the worker processes' plumbing and the table printer.
"""

from __future__ import annotations

import math
import os
import platform
import resource
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



def print_table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")

