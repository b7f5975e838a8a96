"""The online-RL advantages and losses (train/rl_losses.py) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from picoalign.train import rl_losses as L


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_grpo_advantages_by_hand():
    """G = 2, rewards [1, 0 | 1, 1]. Group 0: mean 0.5, std (Bessel) sqrt((0.25 + 0.25) / 1) =
    0.707107, A = ±0.5 / 0.707207 = ±0.707007. Group 1: std 0 -> A = 0 (no 0/0), zero-std."""
    adv, zero = L.grpo_advantages(t(1, 0, 1, 1), 2, "group")
    assert adv.tolist() == pytest.approx([0.707007, -0.707007, 0.0, 0.0], abs=1e-6)
    assert zero.tolist() == [False, False, True, True]
    # scale none: just r - group mean; zero-std still counted from the group std
    adv, zero = L.grpo_advantages(t(1, 0, 1, 1), 2, "none")
    assert adv.tolist() == [0.5, -0.5, 0.0, 0.0] and zero.float().mean().item() == 0.5
    # scale batch: std over all 4 = sqrt(((0.25)*3 + 0.5625) / 3) with mean 0.75 -> 0.5
    adv, _ = L.grpo_advantages(t(1, 0, 1, 1), 2, "batch")
    assert adv.tolist() == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001, 0.0, 0.0], abs=1e-6)


def test_all_equal_groups_and_nan_rewards():
    """Every group flat: advantages exactly 0, nothing divided by zero; a NaN reward (every
    reward function declined) is left out of its group and gets advantage 0."""
    adv, zero = L.grpo_advantages(t(0, 0, 0, 0, 0, 0), 3, "group")
    assert adv.tolist() == [0.0] * 6 and bool(zero.all())
    adv, _ = L.grpo_advantages(t(1, math.nan, 0), 3, "none")
    assert adv.tolist() == [0.5, 0.0, -0.5]


def test_gdpo_advantages_by_hand():
    """normalize_then_sum, G = 2, weights [1, 2]. Reward 0 in group 0: mean 0.5, std 0.707107 ->
    ±0.5 / 0.707207 = ±0.707007; reward 1 there: mean 0.2, std 0.141421 -> ∓0.1 / 0.141521 =
    ∓0.706609; group 1 is flat on both (0). Sums: ∓(1.413218 − 0.707007) = ∓0.706211; over the
    batch mean 0, std sqrt(2 · 0.706211² / 3) = 0.576619 -> A = ∓0.706211 / 0.576719."""
    per_func = torch.tensor([[1, 0.1], [0, 0.3], [1, 0.5], [1, 0.5]])
    adv, zero = L.gdpo_advantages(per_func, t(1, 2), 2)
    assert adv.tolist() == pytest.approx([-1.224532, 1.224532, 0.0, 0.0], abs=1e-5)
    assert not zero.any()
    # Summing first, the small-spread reward 1 (std 0.14 against 0.71) would lose: 1·1 + 2·0.1 = 1.2
    # against 0 + 0.6 = 0.6, so completion 0 wins; normalised first, reward 1's weight 2 decides.
    sum_first, _ = L.grpo_advantages(per_func @ t(1, 2), 2, "group")
    assert sum_first[0] > 0 > adv[0]
    # A NaN (one function declined) is left out of that function's group; a row where every
    # function declined gets advantage 0.
    adv, _ = L.gdpo_advantages(torch.tensor([[1, math.nan], [0, 0.3], [math.nan, math.nan], [1, 0.5]]), t(1, 2), 2)
    assert adv[2].item() == 0.0 and adv[0] > 0 > adv[1]


def test_rloo_advantages_by_hand():
    """G = 3, rewards [3, 0, 0]: baselines 0, 1.5, 1.5 -> A = [3, -1.5, -1.5]; G = 2 reduces to r - other."""
    adv, zero = L.rloo_advantages(t(3, 0, 0), 3)
    assert adv.tolist() == [3.0, -1.5, -1.5] and zero.tolist() == [False]
    adv, zero = L.rloo_advantages(t(1, 0, 2, 2), 2)
    assert adv.tolist() == [1.0, -1.0, 0.0, 0.0] and zero.tolist() == [False, True]


def test_grpo_clipping_by_hand():
    """One token per sequence, ratio exp(log 1.5) = 1.5, ε = 0.2.
    A = +1: −min(1.5, 1.2) = −1.2, clipped high (gradient 0).
    A = −1: −min(−1.5, −1.2) = 1.5, not clipped (gradient −A·ρ = 1.5 on logp).
    grpo loss = mean(−1.2, 1.5) = 0.15; clip_ratio/high_mean = 1/2, low_mean = 0."""
    old = t(0.0, 0.0).unsqueeze(1)
    logps = (old + math.log(1.5)).requires_grad_()
    loss, stats = L.grpo_loss(logps, t(1, -1), torch.ones(2, 1), old_logps=old, loss_type="grpo")
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    loss.backward()
    assert logps.grad[:, 0].tolist() == pytest.approx([0.0, 1.5 / 2], abs=1e-6)
    assert stats["clip_ratio/high_mean"].item() == 0.5 and stats["clip_ratio/low_mean"].item() == 0.0
    assert stats["clip_ratio/region_mean"].item() == 0.5
    # ε_high 0.6 (DAPO's clip-higher): 1.5 is inside, so A = +1 gives −1.5: loss (−1.5 + 1.5)/2 = 0
    loss, stats = L.grpo_loss(logps.detach(), t(1, -1), torch.ones(2, 1), old_logps=old, loss_type="grpo",
                              epsilon_high=0.6)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and stats["clip_ratio/high_mean"].item() == 0.0


def test_grpo_loss_types_by_hand():
    """On-policy (ρ = 1): per token −A. Row 0 (A = 1) has 2 tokens, row 1 (A = −0.5) 1 token.
    grpo: mean of row means = (−1 + 0.5) / 2 = −0.25; dapo: token sum / tokens = (−2 + 0.5) / 3 =
    −0.5; dr_grpo with max length 4: (−2 + 0.5) / (2 · 4) = −0.1875."""
    logps = t(-1.0, -2.0, -3.0, 0.0).view(2, 2)
    mask = t(1, 1, 1, 0).view(2, 2)
    adv = t(1.0, -0.5)
    expect = {"grpo": -0.25, "dapo": -0.5, "dr_grpo": -0.1875}
    for loss_type, value in expect.items():
        loss, _ = L.grpo_loss(logps, adv, mask, loss_type=loss_type, max_completion_length=4)
        assert loss.item() == pytest.approx(value, abs=1e-6), loss_type


def test_grpo_kl_term_by_hand():
    """β = 0.5, logp = 0, ref = log 2: k3 = e^{log 2} − log 2 − 1 = 0.306853; with A = 0 the
    loss is β·k3 = 0.153426 and `kl` is 0.306853."""
    logps = torch.zeros(1, 1)
    loss, stats = L.grpo_loss(logps, t(0.0), torch.ones(1, 1), ref_logps=torch.full((1, 1), math.log(2)),
                              beta=0.5, loss_type="grpo")
    assert loss.item() == pytest.approx(0.153426, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(0.306853, abs=1e-6)


def test_rloo_loss_by_hand():
    """Sequence ratio exp((−1 − 2) − (−1.5 − 2)) = e^{0.5} = 1.648721, ε = 0.2: A = 2 -> −min(3.297, 2.4) = −2.4;
    second row ρ = 1, A = −1 -> 1. Mean: (−2.4 + 1) / 2 = −0.7."""
    logps = t(-1.0, -2.0, -1.0, 0.0).view(2, 2)
    old = t(-1.5, -2.0, -1.0, 0.0).view(2, 2)
    mask = t(1, 1, 1, 0).view(2, 2)
    loss, stats = L.rloo_loss(logps, t(2.0, -1.0), mask, old)
    assert loss.item() == pytest.approx(-0.7, abs=1e-6)
    assert stats["clip_ratio/high_mean"].item() == 0.5


def test_best_worst_pairs_and_online_dpo_by_hand():
    """G = 3, rewards [0.2, 0.9, 0.2 | 1, 1, 1]: group 0 -> chosen 1, rejected 2 (the last lowest);
    group 1 has no preference. DPO: πc − πr = 1, refc − refr = 0, β = 0.5 -> −log σ(0.5) = 0.474077;
    the unusable pair is left out of the mean."""
    chosen, rejected, usable = L.best_worst_pairs(t(0.2, 0.9, 0.2, 1, 1, 1), 3)
    assert chosen.tolist()[0] == 1 and rejected.tolist()[0] == 2 and usable.tolist() == [True, False]
    loss, per_pair = L.online_dpo_loss(t(-1.0, -5.0), t(-2.0, -1.0), t(-3.0, -3.0), t(-3.0, -3.0), 0.5, usable)
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)
    assert per_pair[1].item() == pytest.approx(-math.log(1 / (1 + math.exp(2.0))), abs=1e-5)
