"""Losses as small pure functions: masked next-token loss, sequence log-probs, the DPO family.

Notation: Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), the policy's gain
on the chosen answer y_w over the rejected y_l, relative to the frozen reference; β scales it.
Log-softmax always runs in fp32, whatever dtype the model computed its logits in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_ROWS = 256  # logit rows per fp32 block: 256 x 49k x 4 bytes = 50 MB, reused by the allocator


class _TokenLogps(torch.autograd.Function):
    """log p(label) = logit[label] − logsumexp(logits), keeping only the logits for backward.

    autograd through `log_softmax(-1)[rows, labels]` keeps the (K, V) log-softmax, then in
    backward fills a (K, V) zero tensor for the indexing and writes a third (K, V) tensor; with a
    49k vocabulary that is half a GiB each for a few thousand targets. Here forward keeps only the
    row's log-sum-exp, and backward writes one tensor in the logits' dtype:
    −softmax(logits) · (sum of the row's output grads), plus each output's grad at its label.
    Both run in fp32 blocks of `CHUNK_ROWS` rows, so no (K, V) fp32 tensor is ever made (a fresh
    one is a fresh mapping from the OS, page-faulted in on every step).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor, labels: Tensor) -> Tensor:
        lse = torch.cat([block.float().logsumexp(-1) for block in logits.split(CHUNK_ROWS)])
        ctx.save_for_backward(logits, lse, rows, labels)
        return logits[rows, labels].float() - lse[rows]

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, lse, rows, labels = ctx.saved_tensors
        grad = grad.float()
        per_row = torch.zeros_like(lse).index_add_(0, rows, grad)
        grad_logits = torch.empty_like(logits)
        for start in range(0, len(logits), CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, len(logits))
            block = logits[start:stop].float().sub_(lse[start:stop, None]).exp_().mul_(-per_row[start:stop, None])
            here = (rows >= start) & (rows < stop)  # the targets read from these rows
            block.index_put_((rows[here] - start, labels[here]), grad[here], accumulate=True)
            grad_logits[start:stop] = block
        return grad_logits, None, None


def token_logps(logits: Tensor, labels: Tensor, rows: Tensor | None = None) -> Tensor:
    """log p(labels[i]) under row `rows[i]` of `logits` (K, V) -> (N,), computed in fp32.

    `rows` lets one row score several labels (in DPO the prompt's last position predicts the
    first token of both answers) without copying the (K, V) logits; None means row i for label i.
    """
    if rows is None:
        rows = torch.arange(len(labels), device=labels.device)
    return _TokenLogps.apply(logits, rows, labels)


def sequence_logps(per_token: Tensor, seq_index: Tensor, n_seqs: int) -> Tensor:
    """Sum the per-token log-probs of each sequence: (N,) tokens -> (n_seqs,) sequences."""
    return torch.zeros(n_seqs, dtype=per_token.dtype, device=per_token.device).index_add(0, seq_index, per_token)


def masked_lm_loss(per_token: Tensor) -> Tensor:
    """Mean negative log-likelihood over the target (response) tokens only."""
    return -per_token.mean()


# ---------------------------------------------------------------- the DPO family
# Each takes Δ (one value per pair), β and ε, and returns one loss per pair.


def sigmoid_loss(delta: Tensor, beta: float, eps: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023): −log σ(βΔ); with ε > 0 it is cDPO (label smoothing).

    By hand: Δ = 0 gives log 2 = 0.693147; βΔ = 1 gives −log σ(1) = 0.313262;
    βΔ = 1, ε = 0.1 gives 0.9·0.313262 + 0.1·1.313262 = 0.413262;
    βΔ = 2, ε = 0.2 gives 0.8·0.126928 + 0.2·2.126928 = 0.526928.
    Users know it by two names, `sigmoid` and `cdpo` (Mitchell 2023): one function serves both.
    """
    z = beta * delta
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def ipo_loss(delta: Tensor, beta: float, eps: float = 0.0) -> Tensor:
    """IPO (Azar et al. 2023): (Δ − 1/(2β))², Δ built from length-normalised log-probs (as TRL).

    By hand: β = 0.1, Δ = 3 gives (3 − 5)² = 4; Δ = 5 gives 0.
    """
    return (delta - 1 / (2 * beta)) ** 2


def hinge_loss(delta: Tensor, beta: float, eps: float = 0.0) -> Tensor:
    """SLiC-style hinge: max(0, 1 − βΔ).

    By hand: βΔ = 0.25 gives 0.75; βΔ = 2 gives 0.
    """
    return torch.relu(1 - beta * delta)


def robust_loss(delta: Tensor, beta: float, eps: float = 0.0) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024): [−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε).

    By hand: βΔ = 1, ε = 0.1 gives (0.9·0.313262 − 0.1·1.313262) / 0.8 = 0.188261.
    """
    z = beta * delta
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


DPO_LOSSES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": sigmoid_loss,
    "cdpo": sigmoid_loss,  # conservative DPO: the same formula with label_smoothing ε > 0
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "robust": robust_loss,
}


def dpo_stats(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> dict[str, Tensor]:
    """The implicit rewards β·(log π − log π_ref) and the metrics TRL users know."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "logps/chosen": policy_chosen.mean(),
        "logps/rejected": policy_rejected.mean(),
    }
