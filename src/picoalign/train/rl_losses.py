"""The online-RL losses and advantages, pure functions on tensors (no model, no loop).

Shapes: `logps`, `old_logps`, `ref_logps`, `mask`: (B, T), one row per completion (its tokens,
right-padded; `mask` 1 on real tokens). `rewards`, `advantages`: (B,), completions of one prompt
adjacent: rows g*G .. g*G+G-1 are group g. These follow TRL 1.16 term for term
(`GRPOTrainer._generate_and_score_completions` and `_compute_loss`, `RLOOTrainer`'s, and
`OnlineDPOTrainer`'s DPO step); tests/test_trl_agreement_rl.py calls TRL on the same tensors.

  GRPO (Shao et al. 2024):  A_i = (r_i − mean_g r) / (std_g r + 1e-4)   (scale_rewards=group)
      ratio ρ_t = exp(logp_t − old_logp_t); per token  −min(ρ_t A, clip(ρ_t, 1−ε_low, 1+ε_high) A)
      + β·KL_t with KL_t = exp(ref−logp) − (ref−logp) − 1 (Schulman's k3, ≥ 0);
      loss_type grpo: mean over sequences of each one's token mean; dapo: sum over all tokens /
      all tokens; dr_grpo (Liu et al. 2025): sum over all tokens / (B · max_completion_length).
  GDPO (multi_objective_aggregation=normalize_then_sum, several rewards): each reward function's
      values are normalised within their group first, (r_ik − mean_g r_k) / (std_g r_k + 1e-4),
      then summed with the weights, and that sum normalised over the batch; a reward with a small
      spread (VADER darkness) then counts by its weight, not by its scale.
  RLOO (Ahmadian et al. 2024): A_i = r_i − mean of the other G−1 rewards of its group; the ratio
      is per sequence (summed log-probs), clipped the same way, mean over sequences.
  Online DPO: the best and the worst completion of each group by reward become a pair, trained
      with the DPO loss −log σ(β·Δ) against the frozen reference.

std uses Bessel's correction, as TRL's `nanstd`. A group whose rewards are all equal has
advantage 0 (never 0/0: the 1e-4 in the denominator) and is counted in `frac_reward_zero_std`.
A NaN reward (every reward function declined) is left out of its group's mean and std and gets
advantage 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (NaN for fewer than 2 values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) if dim is not None else torch.nanmean((x - mean) ** 2)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(x)).sum()
    var = var * torch.where(count > 1, count / (count - 1).clamp(min=1), torch.full_like(var, math.nan))
    std = var.sqrt()
    return std if keepdim or dim is None else std.squeeze(dim)


def grpo_advantages(rewards: torch.Tensor, num_generations: int,
                    scale_rewards: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (B,), zero-std flag per completion (B,) bool).

    Worked example, G = 2, rewards [1, 0, 1, 1], scale group: group 0 has mean 0.5 and std
    sqrt(((0.5)² + (0.5)²) / 1) = 0.7071, so A = ±0.5 / 0.7072 = [0.70700, −0.70700]; group 1
    has std 0, so A = [0, 0] and it counts as zero-std: frac_reward_zero_std = 2/4 = 0.5."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}; got {scale_rewards!r}")
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:  # "none" still needs the group std, for counting the groups with nothing to learn
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), zero_std


def gdpo_advantages(per_func: torch.Tensor, weights: torch.Tensor,
                    num_generations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GDPO (Liu et al. 2026; TRL's multi_objective_aggregation="normalize_then_sum"):
    (advantages (B,), zero-std flag per completion (B,) bool, from the batch std as TRL's).
    `per_func` (B, K) is each reward function's value, NaN where one declined.

    Worked example, G = 2, two rewards, weights [1, 2]: per_func [[1, 0.1], [0, 0.3], [1, 0.5], [1, 0.5]].
    Reward 0, group 0: mean 0.5, std 0.7071 → [+0.70700, −0.70700]; group 1: std 0 → [0, 0].
    Reward 1, group 0: mean 0.2, std 0.1414 → [−0.70661, +0.70661]; group 1 → [0, 0].
    Weighted sums: [0.70700 − 1.41322, −0.70700 + 1.41322, 0, 0] = [−0.70622, +0.70622, 0, 0];
    batch mean 0, std sqrt(2 · 0.70622² / 3) = 0.57663 → A = [−1.22453, +1.22453, 0, 0]
    (the equal group's 0 up to float rounding of the batch mean)."""
    k = per_func.shape[1]
    grouped = per_func.view(-1, num_generations, k)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    std = nanstd(grouped, dim=1, keepdim=True)
    normalised = ((grouped - mean) / (std + 1e-4)).view(-1, k)
    rewards = (normalised * weights.to(normalised)).nansum(dim=1)
    rewards[torch.isnan(per_func).all(dim=1)] = math.nan
    std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    zero_std = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    return torch.nan_to_num(advantages, nan=0.0), zero_std


def rloo_advantages(rewards: torch.Tensor, num_generations: int,
                    normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (B,), zero-std flag per group (B/G,)): each reward minus the mean of its
    G − 1 siblings' (the scorable ones).

    Worked example, G = 3, rewards [3, 0, 0]: baselines (0+0)/2 = 0, (3+0)/2 = 1.5, 1.5, so
    A = [3, −1.5, −1.5] (= G/(G−1) · (r − group mean), summing to 0)."""
    grouped = rewards.view(-1, num_generations)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    total = torch.nansum(grouped, dim=1, keepdim=True)
    baselines = ((total - grouped) / (counts - 1)).view(-1)
    advantages = rewards - baselines
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    std = nanstd(grouped, dim=1)
    return torch.nan_to_num(advantages, nan=0.0), torch.isclose(std, torch.zeros_like(std))


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate exp(r − p) − (r − p) − 1 (Schulman's k3; 0 where p = r)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
              loss_type: str = "dapo", epsilon_low: float = 0.2, epsilon_high: float = 0.2,
              beta: float = 0.0, max_completion_length: int | None = None,
              num_items: float | None = None, bias_correction_kl: bool = True,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped surrogate (+ β·KL): (loss, TRL's stats: kl, clip_ratio/*).

    `bias_correction_kl` (TRL 1.16's default `use_bias_correction_kl`): the KL term is multiplied
    by the ratio ρ_t (with its gradient), which makes its gradient the unbiased reverse-KL one
    (DeepSeek-V3.2); the logged `kl` is that product too, as TRL's.

    `old_logps` None: the rollout's own policy (num_iterations 1), ρ = 1 with its gradient.
    `num_items`: dapo's token count (default: this batch's). Worked example (grpo, one token per
    sequence, ρ = 1.5, ε = 0.2): A = +1 → −min(1.5, 1.2) = −1.2 (clipped high, no gradient);
    A = −1 → −min(−1.5, −1.2) = 1.5 (the pessimistic side keeps the gradient); the mean is 0.15.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    stats: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        kl = k3_kl(logps, ref_logps)
        if bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl
        stats["kl"] = _masked_mean(kl.detach(), mask)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type dr_grpo needs max_completion_length")
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    else:
        items = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=mask.dtype)
        loss = (per_token * mask).sum() / items.clamp(min=1.0)
    stats |= clip_stats(ratio.detach(), adv, mask, epsilon_low, epsilon_high)
    return loss, stats


def clip_stats(ratio, adv, mask, epsilon_low: float, epsilon_high: float) -> dict[str, torch.Tensor]:
    """TRL's clip_ratio/low_mean, high_mean, region_mean (token shares), low_min and high_max
    (over sequences of each one's token share)."""
    low = ((ratio < 1 - epsilon_low) & (adv < 0)).float()
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).float()
    per_seq = lambda x: (x * mask).sum(-1) / mask.sum(-1)  # noqa: E731 (NaN for a fully masked row, as TRL)
    seq_low, seq_high = per_seq(low), per_seq(high)
    return {"clip_ratio/low_mean": _masked_mean(low, mask), "clip_ratio/high_mean": _masked_mean(high, mask),
            "clip_ratio/region_mean": _masked_mean(torch.maximum(low, high), mask),
            "clip_ratio/low_min": _nan_reduce(seq_low, torch.min), "clip_ratio/high_max": _nan_reduce(seq_high, torch.max)}


def rloo_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logps: torch.Tensor,
              epsilon_low: float = 0.2, epsilon_high: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RLOO's loss as TRL's: the ratio of whole sequences exp(Σ logp − Σ old), clipped,
    −min(ρA, clip(ρ)A) averaged over sequences. `old_logps` (B, T) (the rollout's own log-probs,
    detached, when the batch is used once: ρ = 1 and the gradient is A·∇Σ logp)."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp((logps * mask).sum(1) - (old_logps * mask).sum(1))
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    low = ((ratio < 1 - epsilon_low) & (advantages < 0)).float().detach()
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float().detach()
    stats = {"clip_ratio/low_mean": low.mean(), "clip_ratio/low_min": low.min(), "clip_ratio/high_mean": high.mean(),
             "clip_ratio/high_max": high.max(), "clip_ratio/region_mean": torch.maximum(low, high).mean()}
    return loss, stats


def rloo_kl_rewards(rewards: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor,
                    mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO's KL in the reward (as TRL's): r − β·Σ_t (old − ref); returns (rewards, per-token mean KL)."""
    mask = mask.to(old_logps.dtype)
    per_token = old_logps - ref_logps
    kl = (per_token * mask).sum(-1)
    return rewards - beta * kl, (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def best_worst_pairs(rewards: torch.Tensor, num_generations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen index, rejected index, usable) per group: the first completion with the highest
    reward and the last with the lowest. A group whose rewards are all equal (or all NaN) has no
    preference: `usable` False, and the online-DPO loss leaves it out.

    Worked example, G = 3, rewards [0.2, 0.9, 0.2 | 1, 1, 1]: group 0 → chosen 1, rejected 2;
    group 1 → usable False."""
    grouped = rewards.view(-1, num_generations)
    filled_hi = torch.nan_to_num(grouped, nan=-math.inf)
    filled_lo = torch.nan_to_num(grouped, nan=math.inf)
    best = filled_hi.argmax(dim=1)
    worst = num_generations - 1 - filled_lo.flip(1).argmin(dim=1)
    usable = filled_hi.max(dim=1).values > filled_lo.min(dim=1).values
    offset = torch.arange(grouped.shape[0], device=rewards.device) * num_generations
    return best + offset, worst + offset, usable


def online_dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float, usable: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """−log σ(β·((πc − πr) − (refc − refr))) per pair (summed log-probs), mean over usable pairs
    (0 with a graph when none is). Returns (loss, per-pair losses)."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = -F.logsigmoid(beta * logits)
    if usable is None:
        return losses.mean(), losses
    weight = usable.to(losses.dtype)
    return (losses * weight).sum() / weight.sum().clamp(min=1.0), losses


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _nan_reduce(x: torch.Tensor, op) -> torch.Tensor:
    kept = x[~torch.isnan(x)]
    return op(kept) if kept.numel() else torch.tensor(math.nan, device=x.device)
