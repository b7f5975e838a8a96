"""What every training stage does before its loop: device, dtype, model, adapter.

Nothing here writes into `cfg.out`: a stage reads and checks its data first, then loads the
model, and the loop (`train/loop.py:fit`) records the config and `picoalign.json` only once
the data is tokenised and any checkpoint to resume is loaded, so a run that fails on its data
leaves a finished checkpoint in `--out` as it was. (DPO's reference log-probs, `ref_logps.pt`,
may be stored before: a cache keyed by what it was computed from, which no marker depends on.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from picoalign.data.formats import parse_columns
from picoalign.data.sources import data_split
from picoalign.models.load import (
    add_lora,
    load_model,
    model_identity,
    pick_device,
    pick_dtype,
    store_frozen_in,
    unwrapped,
)
from picoalign.train import dist


@dataclass
class Prepared:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    log_dir: Path
    marker: dict  # what picoalign.json says while the stage trains (the loop writes it)


def prepare(cfg, stage: str) -> Prepared:
    """Load the model for training (a fresh LoRA adapter unless full fine-tuning)."""
    device = dist.init(pick_device(cfg.device))  # under torchrun: join the group, cuda:LOCAL_RANK
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, device, cfg.load_in)
    if cfg.gradient_checkpointing:
        # Non-reentrant: gradients reach a LoRA adapter even though the embeddings are frozen.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
        if dtype != torch.float32 and cfg.load_in == "none" and not cfg.fsdp:
            store_frozen_in(model, dtype)  # the base is frozen: its weights live in the compute dtype
    if cfg.compile:  # in place, so peft, saving and the span attention see the same modules
        hf = unwrapped(model)
        getattr(hf, "model", hf).compile(dynamic=True)  # the decoder (HF's `.model`); dynamic: lengths vary
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"{stage}: {cfg.model} on {device} ({str(dtype).replace('torch.', '')}"
          + (f", {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}"
             if device.type == "cpu" else "")
          + (", torch.compile: step 1 includes compiling" if cfg.compile else "")
          + f"), {n_train / 1e6:.2f}M of {n_all / 1e6:.1f}M parameters trainable")
    log_dir = Path(cfg.logs) if cfg.logs else Path(cfg.out) / "logs"
    marker = {"stage": stage, "base_model": model_identity(cfg.model), "complete": False, "lora": cfg.lora.enabled}
    return Prepared(model, tokenizer, device, dtype, log_dir, marker)


def read_splits(cfg, reader) -> tuple[list[dict], list[dict]]:
    """(train, val) rows of a preference stage's data (a folder's files or a data set's splits:
    data/sources.py), read by `reader` (pairs or unpaired rows) above `min_confidence`, under the
    `columns` mapping; the val split may be missing or empty."""
    columns = parse_columns(cfg.columns)
    train = reader(data_split(cfg.data, cfg.train_file, main=True), cfg.min_confidence, columns=columns)
    val_path = data_split(cfg.data, cfg.val_file, main=False)
    val = reader(val_path, cfg.min_confidence, allow_empty=True, columns=columns) if val_path else []
    return train, val


def save_model(model, tokenizer, folder: Path, state_dict: dict | None = None) -> None:
    """An HF folder: the adapter (peft) or the full model, safetensors, tokenizer + template.
    `state_dict`: the whole weights of a sharded (FSDP) model, gathered by the caller."""
    model.save_pretrained(folder, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    tokenizer.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None and not (Path(folder) / "generation_config.json").exists():
        gen.save_pretrained(folder)
