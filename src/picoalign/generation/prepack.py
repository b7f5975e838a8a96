"""Linear weights kept in the CPU matrix kernel's own layout while the engine runs the model.

On the CPU, `F.linear` gives each call's weight to the BLAS, which lays it out for its kernel
again on every call: at decode sizes (1 to 64 rows against a 576 x 1536 weight) that costs about
as much as the product itself. oneDNN can keep a weight in its kernel's layout
(`mkldnn._reorder_linear_weight`) and then run only the product (`mkldnn._linear_pointwise`).
Measured on 2 Zen 3 cores (bench/compare.py --mode generate has the whole step), SmolLM2-135M's
30 layers of projections took 65 ms instead of 107 at 32 rows and 21 instead of 31 at one row.

`packed_linears(packable(model))` is a context inside which every fp32 `nn.Linear` of the model on the CPU
runs on its packed copy. The copy is made once and made again when the weight changes (a full
fine-tune's optimizer step changes it in place, which bumps its version). The modules stay the
model's own: a peft LoRA layer still adds its adapters around its base layer, which now runs
packed. The packed copies double the weights' memory, so nothing is packed when they would not
fit in a quarter of the memory available; on CUDA, or without oneDNN, the context does nothing.
The result differs from `F.linear`'s in the last bits (another summation order), as a different
BLAS would.
"""

from __future__ import annotations

import contextlib
import os

import torch

MIN_WEIGHT = 1 << 16  # smaller weights gain nothing from packing (the call's overhead dominates)


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def packable(model) -> list[torch.nn.Linear]:
    """The model's linears worth packing (none when they would not fit; see the docstring)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return []
    found = [m for m in model.modules()
             if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
             and m.weight.numel() >= MIN_WEIGHT and "forward" not in m.__dict__]
    weight_bytes = sum(m.weight.numel() * 4 for m in found)
    return found if weight_bytes * 4 <= _available_bytes() else []


def _packed_forward(module: torch.nn.Linear):
    """The module's forward on its packed weight: made once, and again only when the weight
    changed (the context installs it at every engine step)."""
    weight = module.weight
    key = (weight.data_ptr(), weight._version)
    cached = module.__dict__.get("_picoalign_packed")
    if cached is not None and cached[0] == key:
        return cached[1]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    plain = type(module).forward.__get__(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.requires_grad:
            return plain(x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")

    module.__dict__["_picoalign_packed"] = (key, forward)
    return forward


@contextlib.contextmanager
def packed_linears(modules: list[torch.nn.Linear]):
    """Inside: these linears (`packable(model)`) run on packed weights."""
    try:
        for m in modules:
            m.forward = _packed_forward(m)
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)

