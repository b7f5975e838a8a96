"""`picoalign sft`: supervised fine-tuning with the loss on the response tokens only.

    picoalign sft --data runs/demo/data --out runs/demo/checkpoints/sft --max-seconds 120
    picoalign sft ... --resume          # continue the same curve after an interruption

Each example is the prompt as a user turn (chat template + generation prompt) and the response
as the assistant turn, end-of-turn token included and trained. A micro-batch is one padded row
per example, examples sorted by length so padding stays small (one long block-diagonal row was
slower on CPU: attention cost grows with the square of the row).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from picoalign.config import SFTConfig
from picoalign.data.formats import parse_columns, read_preferences, read_sft
from picoalign.data.sources import data_split
from picoalign.train.attention import shared_prefix_why_not
from picoalign.train.batching import PackedBatch, forward_logps, pair_batches, sft_batches
from picoalign.train.loop import fit
from picoalign.train.losses import masked_lm_loss
from picoalign.train.scoring import mean_response_nll, pair_logps
from picoalign.train.stage import prepare, save_model


@dataclass
class SFTRows:
    train: list[dict]
    val: list[dict]
    monitor: list[dict]  # preference pairs whose log-probs are logged at each eval


def read_sft_splits(cfg: SFTConfig) -> SFTRows:
    """Every row the stage uses, read and checked (a bad one raises file:line) before a model loads."""
    columns = parse_columns(cfg.columns)
    train = read_sft(data_split(cfg.data, cfg.train_file, main=True), columns=columns)
    val_path = data_split(cfg.data, cfg.val_file, main=False)
    val = read_sft(val_path, allow_empty=True, columns=columns) if val_path else []
    monitor = []
    monitor_path = data_split(cfg.data, cfg.monitor_file, main=False) if cfg.monitor_file else None
    if monitor_path:  # a preference file of the data folder: `columns` names the SFT set's columns
        monitor = read_preferences(monitor_path, allow_empty=True)
        monitor = monitor[: cfg.monitor_pairs] if cfg.monitor_pairs else monitor
    return SFTRows(train, val, monitor)


class SFTTask:
    def __init__(self, model, tokenizer, cfg: SFTConfig, device, rows: SFTRows | None = None) -> None:
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        rows = rows or read_sft_splits(cfg)
        self.train = sft_batches(tokenizer, rows.train, cfg)
        val = sft_batches(tokenizer, rows.val, cfg)
        self.val = val[: cfg.eval_batches] if cfg.eval_batches else val
        self.monitor = pair_batches(tokenizer, rows.monitor, cfg, not shared_prefix_why_not(model, cfg.max_length))
        truncated = sum(b.n_truncated for b in self.train)
        print(f"sft: {sum(b.n_seqs for b in self.train)} training examples in {len(self.train)} batches "
              f"({truncated} truncated at max_length={cfg.max_length}), {len(self.val)} val batches")

    def batches(self) -> list[PackedBatch]:
        return self.train

    def loss(self, batch: PackedBatch):
        logps = forward_logps(self.model, batch)
        return masked_lm_loss(logps), {}

    def evaluate(self) -> dict[str, float]:
        out = {}
        if self.val:
            out["val/loss"] = round(mean_response_nll(self.model, self.val, self.device), 6)
        if self.monitor:
            chosen, rejected = pair_logps(self.model, self.monitor, self.device)
            out["monitor/logps_chosen"] = round(chosen.mean().item(), 4)
            out["monitor/logps_rejected"] = round(rejected.mean().item(), 4)
        return out

    def save(self, folder: Path, state_dict: dict | None = None) -> None:
        save_model(self.model, self.tokenizer, folder, state_dict)


def sft(cfg: SFTConfig) -> dict:
    """Fine-tune `cfg.model` on `cfg.data`'s SFT split; returns the training summary."""
    rows = read_sft_splits(cfg)  # a bad row stops here: before the model loads, before --out is touched
    p = prepare(cfg, "sft")
    task = SFTTask(p.model, p.tokenizer, cfg, p.device, rows)
    return fit(task, cfg, "sft", p.device, p.dtype, p.log_dir, p.marker)
