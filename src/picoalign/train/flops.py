"""Model FLOPs utilisation: the matmul work a step's tokens need, against what this machine's
matmuls reach on the model's own shapes.

FLOPs per token: a matmul with an (in x out) weight costs 2·in·out per token forward; backward
costs 2·in·out for the input's gradient and 2·in·out more for the weight's, which a frozen weight
skips. So with N the parameters of the model's linear layers (every projection and the output
layer; the embedding lookup is free), a LoRA step costs 4·N per token, a full fine-tuning step
6·N, and a live reference forward (DPO `reference: live`) 2·N more. Attention's own L² terms are
left out, as in the usual 6·N convention (Kaplan et al. 2020): on rows of a few hundred tokens they
are a few percent.

The peak is measured, not looked up: each distinct linear shape of the model as one
[tokens x in]·[in x out] matmul in the compute dtype, best of a few runs, weighted by how often the
model uses it; that is the ceiling a step of this model could reach if it did nothing but its
matmuls (`bench/peak.py` prints it per shape). It is measured once per machine, dtype, thread
count and shape set, and kept in the cache (`PICOALIGN_CACHE/peaks.json`).
"""

from __future__ import annotations

import json
import platform
import time
from collections import Counter
from pathlib import Path

import torch


def linear_shapes(model) -> Counter:
    """(in, out) -> how many linear layers of that shape the model runs per token (the LoRA
    factors included: they are matmuls too; a tied output layer counted once)."""
    seen, shapes = set(), Counter()
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and w is not None and id(w) not in seen:
            seen.add(id(w))
            shapes[(module.in_features, module.out_features)] += 1
    return shapes


def matmul_parameters(model) -> int:
    """N: the weights every token multiplies through (in·out summed over the linear layers)."""
    return sum(i * o * n for (i, o), n in linear_shapes(model).items())


def flops_per_token(model, full: bool, reference_forward: bool = False) -> int:
    """4·N for a step that trains adapters (or nothing but a few weights), 6·N for full fine-tuning,
    + 2·N for a live reference forward."""
    n = matmul_parameters(model)
    return (6 if full else 4) * n + (2 * n if reference_forward else 0)


def trains_in_full(model) -> bool:
    """Most weights trained (full fine-tuning), not a few (LoRA): whose backward computes weight grads."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trained > 0.5 * sum(p.numel() for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_shapes(shapes: Counter, tokens: int, dtype: torch.dtype, device: torch.device,
                   repeats: int = 3) -> dict[tuple[int, int], float]:
    """Best-of-`repeats` seconds of one [tokens x in]·[in x out] matmul for each shape."""
    out = {}
    for i, o in shapes:
        a = torch.randn(tokens, i, device=device).to(dtype)
        b = torch.randn(i, o, device=device).to(dtype)
        torch.mm(a, b)  # load the kernel for this shape
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        out[(i, o)] = best
    return out


def peak_from(shapes: Counter, tokens: int, seconds: dict[tuple[int, int], float]) -> float:
    """FLOP/s of the model's linear layers run back to back at their best: total FLOPs / total time."""
    flops = sum(2 * tokens * i * o * n for (i, o), n in shapes.items())
    return flops / sum(seconds[s] * n for s, n in shapes.items())


def model_peak(shapes: Counter, tokens: int, dtype: torch.dtype, device: torch.device) -> float:
    return peak_from(shapes, tokens, measure_shapes(shapes, tokens, dtype, device))


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def cached_peak(model, tokens: int, dtype: torch.dtype, device: torch.device, cache: Path | None = None) -> float:
    """The model's matmul peak on this machine (FLOP/s), measured on first use and then read back."""
    from picoalign.io import write_json
    from picoalign.models.load import cache_dir

    shapes = linear_shapes(model)
    tokens = max(64, round(tokens / 64) * 64)  # nearby token counts share one measurement
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    key = (f"{machine_name(device)}|{device.type}|{torch.__version__}|{dtype}|threads={threads}|tokens={tokens}|"
           + ",".join(f"{i}x{o}:{n}" for (i, o), n in sorted(shapes.items())))
    path = Path(cache) if cache else cache_dir() / "peaks.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = model_peak(shapes, tokens, dtype, device)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, known)
        except OSError:  # a read-only cache: measure again next time
            pass
    return known[key]


class Throughput:
    """tokens/s, TFLOP/s and MFU of a step, from its tokens and seconds."""

    def __init__(self, flops_per_token: int, peak: float | None, devices: int = 1) -> None:
        self.flops_per_token, self.peak, self.devices = flops_per_token, peak, devices  # peak: one device's

    def of(self, tokens: int, seconds: float) -> dict[str, float]:
        seconds = max(seconds, 1e-9)
        achieved = self.flops_per_token * tokens / seconds
        row = {"tokens_per_s": round(tokens / seconds, 1), "tflops": round(achieved / 1e12, 4)}
        if self.peak:
            row["mfu"] = round(achieved / (self.peak * self.devices), 4)
        return row

