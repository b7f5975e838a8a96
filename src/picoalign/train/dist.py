"""Data-parallel training over several processes (DDP): where this process stands, and the few
collectives the loop needs. Without torchrun's environment every function here is a no-op.

    torchrun --nproc_per_node 2 -m picoalign sft --data runs/x/data --out runs/x/checkpoints/sft

torchrun starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK in each. The
processes join one group (gloo on CPU, NCCL on CUDA, each rank on `cuda:LOCAL_RANK`), load the
same model with the same seed, and split every optimiser step's micro-batches between them
(`train/loop.py`); DDP averages the gradients in backward. Rank 0 alone writes logs, checkpoints
and the final model, and it alone prints (the other ranks' stdout goes to /dev/null).

With `fsdp: true` the model is sharded instead of replicated (FSDP2, `fully_shard`): each
decoder block, and then the rest, keeps 1/N of its parameters, gradients and AdamW state on
each rank and gathers a block's weights only while it runs, for models too large for one
device. Saving then gathers the full weights on every rank (a collective) and rank 0 writes
them, so checkpoints and the final model have the same files as without FSDP.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from picoalign.models.load import unwrapped


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place among the processes torchrun started (one process without torchrun)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def init(device: torch.device) -> torch.device:
    """Join the process group when started by torchrun; returns this rank's device
    (`cuda:LOCAL_RANK` on GPUs). Safe to call more than once."""
    w = world()
    if not w.distributed:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        atexit.register(_leave)
        if not w.main:
            sys.stdout = open(os.devnull, "w")  # one copy of every message: rank 0's
    return device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class DDP(DistributedDataParallel):
    """DDP that answers what it lacks from the wrapped model, so task code written for the bare
    model (`model.disable_adapter()`, `model.config`) runs unchanged on the wrapper."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def bare(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, also where `model` is the DDP wrapper a training step runs the task's
    loss through (train/loop.py:Task): for forwards that must not sync gradients."""
    return model.module if isinstance(model, DDP) else model


def wrap(model: torch.nn.Module, device: torch.device) -> DDP:
    """Gradient sync for the trainable parameters. Every trainable parameter takes part in every
    forward (LoRA's frozen base has no gradients at all), so DDP need not search for unused ones."""
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=False)


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 in place: every decoder block (the classes the model lists in `_no_split_modules`)
    is one shard unit, the root (embeddings, final norm, output layer) another."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world().size,))
    hf = unwrapped(model)
    blocks = set(getattr(hf, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    if not units:
        raise ValueError(f"fsdp: {type(hf).__name__} names no decoder block class (_no_split_modules) to shard by")
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's whole state dict on the CPU (every rank must call it: it gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name, whole (a collective when sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: torch.nn.Module, opt: torch.optim.Optimizer, weights: dict, optim: dict) -> None:
    """Scatter whole saved weights (some of them: strict=False) and optimizer state into a sharded model."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, opt, optim_state_dict=optim, options=options)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (decisions that must agree: stop now or not)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_metrics(sums: dict[str, torch.Tensor], tokens: int, device: torch.device) -> tuple[dict[str, float], int]:
    """Each metric averaged over the ranks, the tokens summed: what one step did as a whole.

    The values are tensors on the device; they are stacked, reduced there and read in one transfer."""
    keys = list(sums)  # the same order on every rank: the same code made them
    t = torch.stack([torch.as_tensor(sums[k], device=device).to(torch.float64) for k in keys]
                    + [torch.tensor(float(tokens), dtype=torch.float64, device=device)])
    if dist.is_initialized():
        dist.all_reduce(t)
        t[:-1] /= dist.get_world_size()
    values = t.tolist()
    return dict(zip(keys, values[:-1])), int(values[-1])


def gather_shards(fn: Callable[[list], list], items: list) -> list:
    """`fn(items)` computed in parts: rank r runs `fn(items[r::world])`, and every rank gets the
    whole result in the order of `items` (`fn` returns one result per item)."""
    w = world()
    if not dist.is_initialized():
        return fn(items)
    parts: list = [None] * w.size
    dist.all_gather_object(parts, fn(items[w.rank::w.size]))
    return [parts[i % w.size][i // w.size] for i in range(len(items))]
