"""Losses as small pure functions: masked next-token loss, sequence log-probs, the DPO family,
and the methods beside it: ORPO and SimPO (no reference), KTO (unpaired examples).

Notation: Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), the policy's gain
on the chosen answer y_w over the rejected y_l, relative to the frozen reference; β scales it.
Log-softmax always runs in fp32, whatever dtype the model computed its logits in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Logit rows per fp32 block: 32 x 49k x 4 bytes = 6 MB, which stays in cache through the cast, the
# exp and the sum. Blocks of 256 rows (50 MB) were 2.5x slower here (forward + backward of 1,020
# targets: 440 vs 170 ms): glibc maps every block over 32 MB fresh from the OS, page faults and all.
CHUNK_ROWS = 32


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


# ---------------------------------------------------------------- beside DPO: ORPO, SimPO, KTO
# ORPO and SimPO score each answer by its mean log-prob per token (ℓ = log π(y)/|y|) and need no
# reference model; KTO scores single answers, each desirable or not, against a frozen reference.


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, accurate on both sides of −log 2 (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio_loss(chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    """ORPO's odds-ratio term per pair, −log σ(log odds(y_w) − log odds(y_l)), and the log odds ratio.

    ORPO (Hong et al. 2024, arXiv 2403.07691, eqs. 4-7): odds(y) = p/(1 − p) with p = exp(ℓ), the
    length-normalised likelihood, so log odds = ℓ − log(1 − exp(ℓ)).
    By hand: ℓ_w = log 0.5 → odds 1, log odds 0; ℓ_l = log 0.2 → odds 0.25, log odds −1.386294;
    ratio 1.386294, loss −log σ(1.386294) = log(1 + 0.25) = 0.223144.
    """
    log_odds = (chosen - log1mexp(chosen)) - (rejected - log1mexp(rejected))
    return -F.logsigmoid(log_odds), log_odds


def orpo_loss(chosen_nll: Tensor, chosen: Tensor, rejected: Tensor, lam: float) -> Tensor:
    """ORPO: L_SFT + λ · mean odds-ratio term; `chosen_nll` is the mean NLL of the chosen tokens.

    One stage instead of SFT + DPO: the NLL teaches the answers, the odds ratio pushes the
    rejected style down, relative to the policy itself (no reference model).
    By hand (the pair above): NLL 2.0, λ = 0.1 → 2.0 + 0.1·0.223144 = 2.022314.
    """
    return chosen_nll + lam * orpo_odds_ratio_loss(chosen, rejected)[0].mean()


def simpo_loss(chosen: Tensor, rejected: Tensor, beta: float, gamma: float, eps: float = 0.0) -> Tensor:
    """SimPO (Meng et al. 2024, arXiv 2405.14734): −log σ(β·ℓ_w − β·ℓ_l − γ) per pair.

    The reward is β times the mean log-prob per token, so no reference; γ is a target margin.
    With ε > 0 it is label-smoothed as cDPO (TRL's CPO trainer does the same).
    By hand: ℓ_w = −1, ℓ_l = −2, β = 2, γ = 1 → −log σ(1) = 0.313262; ℓ_w = ℓ_l, γ = 0 → log 2;
    β = 2.5, ℓ_w = −1.2, ℓ_l = −1.6, γ = 2 → z = −1, −log σ(−1) = 1.313262.
    """
    z = beta * (chosen - rejected) - gamma
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def kto_reference_point(policy_kl: Tensor, ref_kl: Tensor) -> Tensor:
    """KTO's z₀: the policy's KL from the reference, estimated as the mean log-ratio on mismatched
    (prompt, answer) pairs of the batch, clamped at 0 and detached (no gradient flows through it).

    By hand: log-ratios 0.5 and 1.5 → 1.0; −2 and 1 → mean −0.5, clamped to 0.
    """
    return (policy_kl - ref_kl).mean().clamp(min=0).detach()


def kto_loss(policy: Tensor, ref: Tensor, desirable: Tensor, kl: Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Tensor:
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306, eq. 7): one loss per unpaired example.

    With r = log π(y) − log π_ref(y) and z₀ = `kl`: a desirable answer costs λ_D·(1 − σ(β(r − z₀))),
    an undesirable one λ_U·(1 − σ(β(z₀ − r))).
    By hand, β = 0.1: desirable r = 2, z₀ = 0 → 1 − σ(0.2) = 1 − 0.549834 = 0.450166;
    undesirable r = −3, z₀ = 1 → 1 − σ(0.4) = 1 − 0.598688 = 0.401312, ×λ_U 1.5 = 0.601968.
    """
    r = policy - ref
    gain = torch.where(desirable, r - kl, kl - r)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(r.dtype)
    return weight * (1 - torch.sigmoid(beta * gain))


def kto_stats(policy: Tensor, ref: Tensor, desirable: Tensor, kl: Tensor, beta: float) -> dict[str, Tensor]:
    """KTO's logged metrics under TRL's names: the mean reward and log-prob of each kind of answer,
    their margin, and the reference point `kl`. The keys are always the same (the loop reduces them
    across processes as one tensor); a kind the batch lacks gives NaN, "not measured" (the mean of
    an empty selection), where TRL leaves the value out."""
    rewards = beta * (policy - ref)
    stats = {"kl": kl}
    for name, mask in (("chosen", desirable), ("rejected", ~desirable)):
        stats[f"rewards/{name}"] = rewards[mask].mean()
        stats[f"logps/{name}"] = policy[mask].mean()
    stats["rewards/margins"] = stats["rewards/chosen"] - stats["rewards/rejected"]
    return stats
