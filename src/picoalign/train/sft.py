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

import torch

from picoalign.config import SFTConfig
from picoalign.data.formats import read_preferences, read_sft
from picoalign.train.batching import (
    PackedBatch,
    encode,
    encode_conversation,
    forward_logps,
    pack_examples,
    pack_pairs,
)
from picoalign.train.loop import fit
from picoalign.train.losses import masked_lm_loss, sequence_logps
from picoalign.train.stage import chunks, prepare, save_model


def encode_sft_rows(tokenizer, rows: list[dict], max_length: int) -> tuple[list, int]:
    """Tokenise SFT records; returns (examples, number dropped because the prompt fills max_length)."""
    examples, dropped = [], 0
    for row in rows:
        if row.get("messages"):
            ex = encode_conversation(tokenizer, row["messages"], max_length)
        else:
            ex = encode(tokenizer, row["prompt"], [row["response"]], max_length)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    return examples, dropped


def _length(ex) -> int:
    return sum(len(ids) for ids, _ in ex.segments) if hasattr(ex, "segments") else len(ex.prompt) + sum(map(len, ex.answers))


def sft_batches(tokenizer, rows: list[dict], cfg) -> list[PackedBatch]:
    """Micro-batches of `batch_size` examples of similar length (the loop shuffles their order)."""
    examples, dropped = encode_sft_rows(tokenizer, rows, cfg.max_length)
    if dropped:
        print(f"sft: {dropped} examples dropped: their prompt alone fills max_length={cfg.max_length}")
    examples.sort(key=_length)
    return [pack_examples(group, tokenizer.pad_token_id) for group in chunks(examples, cfg.batch_size)]


def pair_batches(tokenizer, rows: list[dict], cfg, share_prefix: bool = True, sort: bool = True) -> list[PackedBatch]:
    """Preference pairs, `batch_size` per micro-batch (chosen = even sequences, rejected = odd).

    Without `sort` the pairs keep their file order (for scoring that is matched to rows)."""
    pairs = [encode(tokenizer, r["prompt"], [r["chosen"], r["rejected"]], cfg.max_length) for r in rows]
    pairs = [p for p in pairs if p is not None]
    if sort:
        pairs.sort(key=_length)
    return [pack_pairs(group, share_prefix, tokenizer.pad_token_id) for group in chunks(pairs, cfg.batch_size)]


def mean_response_nll(model, batches: list[PackedBatch], device) -> float:
    """Token-weighted mean negative log-likelihood of the response tokens."""
    total, count = 0.0, 0
    for batch in batches:
        logps = forward_logps(model, batch.to(device))
        total -= logps.sum().item()
        count += logps.numel()
    return total / max(count, 1)


def pair_logps(model, batches: list[PackedBatch], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of every chosen and rejected answer, in file order."""
    chosen, rejected = [], []
    for batch in batches:
        seq = sequence_logps(forward_logps(model, batch.to(device)), batch.seq_index.to(device), batch.n_seqs)
        chosen.append(seq[0::2].float().cpu())
        rejected.append(seq[1::2].float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


@dataclass
class SFTRows:
    train: list[dict]
    val: list[dict]
    monitor: list[dict]  # preference pairs whose log-probs are logged at each eval


def read_sft_splits(cfg: SFTConfig) -> SFTRows:
    """Every row the stage uses, read and checked (a bad one raises file:line) before a model loads."""
    data = Path(cfg.data)
    train = read_sft(data / cfg.train_file)
    val_path = data / cfg.val_file
    val = read_sft(val_path, allow_empty=True) if val_path.exists() else []
    monitor = []
    if cfg.monitor_file and (data / cfg.monitor_file).exists():
        monitor = read_preferences(data / cfg.monitor_file, allow_empty=True)
        monitor = monitor[: cfg.monitor_pairs] if cfg.monitor_pairs else monitor
    return SFTRows(train, val, monitor)


class SFTTask:
    def __init__(self, model, tokenizer, cfg: SFTConfig, device, rows: SFTRows | None = None) -> None:
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        rows = rows or read_sft_splits(cfg)
        self.train = sft_batches(tokenizer, rows.train, cfg)
        val = sft_batches(tokenizer, rows.val, cfg)
        self.val = val[: cfg.eval_batches] if cfg.eval_batches else val
        self.monitor = pair_batches(tokenizer, rows.monitor, cfg)
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
