"""ORPO, SimPO and KTO in train/losses.py against values worked out by hand.

Constants (natural logs, 7 decimals): −log σ(1) = 0.3132617, −log σ(−1) = 1.3132617,
log 2 = 0.6931472, σ(0.2) = 0.5498340, σ(0.4) = 0.5986877, log 1.25 = 0.2231436,
log 0.2 = −1.6094379, log 0.8 = −0.2231436, log 0.5 = −0.6931472.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import t

from picoalign.train.losses import (
    kto_loss,
    kto_reference_point,
    kto_stats,
    log1mexp,
    orpo_loss,
    orpo_odds_ratio_loss,
    simpo_loss,
)


def test_log1mexp_by_hand_on_both_branches():
    """log(1 − eˣ): x = log 0.2 → log 0.8 = −0.2231436; x = log 0.5 → log 0.5; x = −1e-6 →
    log(1e-6 − 5e-13) ≈ −13.8155106 (the naive log1p(−eˣ) loses digits there)."""
    got = log1mexp(t(math.log(0.2), math.log(0.5), -1e-6))
    torch.testing.assert_close(got, t(-0.2231436, -0.6931472, -13.8155106), atol=1e-5, rtol=0)


def test_orpo_odds_ratio_by_hand():
    """ℓ_w = log 0.5: odds 0.5/0.5 = 1, log odds 0. ℓ_l = log 0.2: odds 0.2/0.8 = 0.25, log odds
    −1.3862944. Log odds ratio 1.3862944; −log σ(1.3862944) = log(1 + e^−1.3862944) = log 1.25
    = 0.2231436. Swapped, the ratio is −1.3862944 and the loss log(1 + 4) = 1.6094379."""
    loss, ratio = orpo_odds_ratio_loss(t(math.log(0.5), math.log(0.2)), t(math.log(0.2), math.log(0.5)))
    torch.testing.assert_close(ratio, t(1.3862944, -1.3862944), atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, t(0.2231436, 1.6094379), atol=1e-6, rtol=0)


def test_orpo_loss_is_nll_plus_lambda_times_mean_odds_term():
    """NLL 2.0, λ = 0.1, the two pairs above: 2.0 + 0.1 · (0.2231436 + 1.6094379)/2 = 2.0916291."""
    got = orpo_loss(torch.tensor(2.0), t(math.log(0.5), math.log(0.2)), t(math.log(0.2), math.log(0.5)), 0.1)
    torch.testing.assert_close(got, torch.tensor(2.0916291), atol=1e-6, rtol=0)
    # λ = 0 is plain SFT on the chosen answers
    assert orpo_loss(torch.tensor(2.0), t(-1.0), t(-2.0), 0.0).item() == 2.0


def test_simpo_loss_by_hand():
    """−log σ(β(ℓ_w − ℓ_l) − γ): β = 2, γ = 1, ℓ_w − ℓ_l = 1 → z = 1 → 0.3132617;
    ℓ_w = ℓ_l → z = −1 → 1.3132617 (the margin γ makes a tie cost more than log 2);
    γ = 0 and a tie → log 2 = 0.6931472."""
    torch.testing.assert_close(simpo_loss(t(-1.0, -1.5), t(-2.0, -1.5), beta=2.0, gamma=1.0),
                               t(0.3132617, 1.3132617), atol=1e-6, rtol=0)
    torch.testing.assert_close(simpo_loss(t(-1.5), t(-1.5), 2.0, 0.0), t(0.6931472), atol=1e-6, rtol=0)


def test_simpo_label_smoothing_by_hand():
    """z = 1, ε = 0.1: 0.9 · 0.3132617 + 0.1 · 1.3132617 = 0.4132617 (as cDPO)."""
    torch.testing.assert_close(simpo_loss(t(-1.0), t(-2.0), 2.0, 1.0, eps=0.1), t(0.4132617), atol=1e-6, rtol=0)


def test_kto_reference_point_is_a_clamped_detached_mean():
    """Log-ratios 0.5 and 1.5 → 1.0; −2 and 1 → −0.5, clamped to 0; no gradient flows back."""
    policy = t(0.5, 1.5).requires_grad_(True)
    z = kto_reference_point(policy, t(0.0, 0.0))
    assert z.item() == 1.0 and not z.requires_grad
    assert kto_reference_point(t(-2.0, 1.0), t(0.0, 0.0)).item() == 0.0


def test_kto_loss_by_hand():
    """β = 0.1. Desirable, r = 2 − 0 = 2, z₀ = 0: 1 − σ(0.2) = 0.4501660.
    Undesirable, r = −3, z₀ = 0: 1 − σ(0.3) = 1 − 0.5744425 = 0.4255575; with λ_U = 1.5: 0.6383362.
    z₀ = 1: desirable 1 − σ(0.1) = 1 − 0.5249792 = 0.4750208; undesirable 1 − σ(0.4) = 0.4013123,
    × 1.5 = 0.6019684."""
    desirable = torch.tensor([True, False])
    got = kto_loss(t(2.0, -3.0), t(0.0, 0.0), desirable, torch.tensor(0.0), 0.1, 1.0, 1.5)
    torch.testing.assert_close(got, t(0.4501660, 0.6383362), atol=1e-6, rtol=0)
    got = kto_loss(t(2.0, -3.0), t(0.0, 0.0), desirable, torch.tensor(1.0), 0.1, 1.0, 1.5)
    torch.testing.assert_close(got, t(0.4750208, 0.6019684), atol=1e-6, rtol=0)


def test_kto_loss_uses_the_log_ratio_not_the_log_prob():
    """The same example with policy −10 and reference −12 is r = 2: the value above, 0.4501660."""
    got = kto_loss(t(-10.0), t(-12.0), torch.tensor([True]), torch.tensor(0.0), 0.1)
    torch.testing.assert_close(got, t(0.4501660), atol=1e-6, rtol=0)


def test_kto_stats_by_hand():
    """β = 0.5, policy [−10, −20, −14], ref [−12, −20, −13], desirable [T, T, F]:
    rewards 0.5·[2, 0, −1] → chosen mean 0.5, rejected −0.5, margins 1.0;
    logps/chosen mean(−10, −20) = −15, logps/rejected −14; kl passed through."""
    stats = kto_stats(t(-10.0, -20.0, -14.0), t(-12.0, -20.0, -13.0), torch.tensor([True, True, False]),
                      torch.tensor(0.25), beta=0.5)
    assert {k: round(v.item(), 6) for k, v in stats.items()} == {
        "kl": 0.25, "rewards/chosen": 0.5, "logps/chosen": -15.0, "rewards/rejected": -0.5,
        "logps/rejected": -14.0, "rewards/margins": 1.0}


def test_kto_stats_of_a_batch_of_one_kind_are_nan_for_the_other():
    """The same keys every batch (the loop stacks them); what the batch cannot measure is NaN."""
    stats = kto_stats(t(-1.0), t(-3.0), torch.tensor([False]), torch.tensor(0.0), beta=0.1)
    assert set(stats) == {"kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected",
                          "rewards/margins"}
    assert stats["rewards/rejected"].item() == pytest.approx(0.2)
    assert all(math.isnan(stats[k].item()) for k in ("rewards/chosen", "logps/chosen", "rewards/margins"))


@pytest.mark.parametrize("method", ["orpo", "simpo", "kto"])
def test_method_losses_are_differentiable(method):
    chosen, rejected = t(-1.0, -0.5).requires_grad_(True), t(-2.0, -0.7).requires_grad_(True)
    if method == "orpo":
        loss = orpo_loss(-chosen.mean(), chosen, rejected, 0.1)
    elif method == "simpo":
        loss = simpo_loss(chosen, rejected, 2.0, 0.5).mean()
    else:
        loss = kto_loss(chosen, rejected.detach(), torch.tensor([True, False]), torch.tensor(0.1), 0.1).mean()
    loss.backward()
    assert torch.isfinite(chosen.grad).all() and chosen.grad.abs().sum() > 0
