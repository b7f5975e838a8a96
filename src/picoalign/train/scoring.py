"""Scoring a model on packed batches: mean response NLL, summed log-probs of preference pairs.

Used by SFT (validation loss, monitored pairs), pretraining (validation loss) and `eval`.
"""

from __future__ import annotations

import torch

from picoalign.train.batching import PackedBatch, forward_logps
from picoalign.train.losses import sequence_logps


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


def batch_sequence_logps(model, batch: PackedBatch, normalise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs per sequence, token-level log-probs) for one preference batch."""
    tokens = forward_logps(model, batch)
    seq = sequence_logps(tokens, batch.seq_index, batch.n_seqs)
    if normalise:  # IPO works on the mean log-prob per token of each answer
        seq = seq / batch.token_counts().to(seq.device)
    return seq, tokens
