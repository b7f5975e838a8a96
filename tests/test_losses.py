"""train/losses.py against values worked out by hand.

Constants used below (natural logs, 7 decimals):
    e = 2.7182818, e² = 7.3890561, e³ = 20.0855369
    −log σ(0)  = log 2          = 0.6931472
    −log σ(1)  = log(1 + e⁻¹)   = 0.3132617
    −log σ(−1) = log(1 + e)     = 1.3132617
    −log σ(2)  = log(1 + e⁻²)   = 0.1269280
    −log σ(−2) = log(1 + e²)    = 2.1269280
"""

from __future__ import annotations

import pytest
import torch
from helpers import t

from picoalign.train.losses import (
    DPO_LOSSES,
    dpo_stats,
    hinge_loss,
    ipo_loss,
    masked_lm_loss,
    robust_loss,
    sequence_logps,
    sigmoid_loss,
    token_logps,
)


def test_registry_names_every_loss():
    assert DPO_LOSSES == {"sigmoid": sigmoid_loss, "cdpo": sigmoid_loss, "ipo": ipo_loss,
                          "hinge": hinge_loss, "robust": robust_loss}


def test_sigmoid_loss_by_hand():
    """−log σ(βΔ): Δ = 0 → log 2 = 0.6931472; β = 0.1, Δ = 10 (βΔ = 1) → 0.3132617;
    β = 0.5, Δ = −4 (βΔ = −2) → log(1 + e²) = 2.1269280. One loss per pair, not reduced."""
    got = sigmoid_loss(t(0.0, 10.0), beta=0.1)
    torch.testing.assert_close(got, t(0.6931472, 0.3132617), atol=1e-6, rtol=0)
    torch.testing.assert_close(sigmoid_loss(t(-4.0), beta=0.5), t(2.1269280), atol=1e-6, rtol=0)


def test_cdpo_loss_by_hand():
    """−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ).
    βΔ = 1, ε = 0.1: 0.9·0.3132617 + 0.1·1.3132617 = 0.2819355 + 0.1313262 = 0.4132617.
    βΔ = 2, ε = 0.2: 0.8·0.1269280 + 0.2·2.1269280 = 0.1015424 + 0.4253856 = 0.5269280.
    ε = 0 is plain DPO; `sigmoid` with ε gives the same numbers (one formula)."""
    torch.testing.assert_close(DPO_LOSSES["cdpo"](t(10.0), 0.1, 0.1), t(0.4132617), atol=1e-6, rtol=0)
    torch.testing.assert_close(DPO_LOSSES["cdpo"](t(20.0), 0.1, 0.2), t(0.5269280), atol=1e-6, rtol=0)
    torch.testing.assert_close(sigmoid_loss(t(20.0), 0.1, 0.2), t(0.5269280), atol=1e-6, rtol=0)
    torch.testing.assert_close(DPO_LOSSES["cdpo"](t(10.0), 0.1, 0.0), t(0.3132617), atol=1e-6, rtol=0)


def test_ipo_loss_by_hand():
    """(Δ − 1/(2β))²: β = 0.1 → target 5: Δ = 3 → 4, Δ = 5 → 0, Δ = 7 → 4 (symmetric, unlike
    DPO it also punishes overshooting); β = 0.25 → target 2: Δ = 0.5 → 2.25."""
    torch.testing.assert_close(ipo_loss(t(3.0, 5.0, 7.0), 0.1), t(4.0, 0.0, 4.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(ipo_loss(t(0.5), 0.25), t(2.25), atol=1e-6, rtol=0)


def test_hinge_loss_by_hand():
    """max(0, 1 − βΔ), β = 0.1: Δ = 2.5 → 0.75; Δ = 20 → 0; Δ = −10 → 2."""
    torch.testing.assert_close(hinge_loss(t(2.5, 20.0, -10.0), 0.1), t(0.75, 0.0, 2.0), atol=1e-6, rtol=0)


def test_robust_loss_by_hand():
    """[−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε).
    βΔ = 1, ε = 0.1: (0.9·0.3132617 − 0.1·1.3132617) / 0.8 = (0.2819355 − 0.1313262) / 0.8 = 0.1882617.
    ε = 0 is plain DPO."""
    torch.testing.assert_close(robust_loss(t(10.0), 0.1, 0.1), t(0.1882617), atol=1e-6, rtol=0)
    torch.testing.assert_close(robust_loss(t(10.0), 0.1, 0.0), t(0.3132617), atol=1e-6, rtol=0)


def test_robust_loss_is_unbiased_under_label_flips():
    """Chowdhury et al.'s point: if a label is flipped with probability ε, the expected robust loss
    is the clean DPO loss: (1−ε)·L(Δ) + ε·L(−Δ) = −log σ(βΔ). Expanding, the log σ(−βΔ) terms
    cancel and log σ(βΔ) is left with the factor (ε² − (1−ε)²)/(1−2ε) = −1."""
    delta, beta, eps = t(-3.0, 0.0, 1.5, 8.0), 0.3, 0.2
    expected = (1 - eps) * robust_loss(delta, beta, eps) + eps * robust_loss(-delta, beta, eps)
    torch.testing.assert_close(expected, sigmoid_loss(delta, beta), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(DPO_LOSSES))
def test_every_loss_is_per_pair_and_differentiable(name):
    delta = t(-1.0, 0.5, 2.0).requires_grad_(True)
    loss = DPO_LOSSES[name](delta, 0.1, 0.1)
    assert loss.shape == (3,)
    loss.sum().backward()
    assert torch.isfinite(delta.grad).all()


def test_dpo_stats_two_pairs_by_hand():
    """β = 0.5.
    policy chosen  [−10, −20], reference chosen   [−12, −20] → rewards/chosen   0.5·[2, 0]  = [1, 0]
    policy rejected [−14, −17], reference rejected [−13, −18] → rewards/rejected 0.5·[−1, 1] = [−0.5, 0.5]
    margins [1.5, −0.5] → mean 0.5; accuracies [1, 0] → 0.5; rewards means 0.5 and 0;
    logps/chosen = mean(−10, −20) = −15; logps/rejected = mean(−14, −17) = −15.5."""
    stats = dpo_stats(t(-10.0, -20.0), t(-14.0, -17.0), t(-12.0, -20.0), t(-13.0, -18.0), beta=0.5)
    expected = {"rewards/chosen": 0.5, "rewards/rejected": 0.0, "rewards/margins": 0.5,
                "rewards/accuracies": 0.5, "logps/chosen": -15.0, "logps/rejected": -15.5}
    assert {k: round(v.item(), 6) for k, v in stats.items()} == expected


def test_dpo_stats_tie_is_not_accurate():
    """A pair whose rewards are equal counts as wrong (strict >, as TRL)."""
    stats = dpo_stats(t(-5.0), t(-6.0), t(-5.0), t(-6.0), beta=0.1)
    assert stats["rewards/accuracies"].item() == 0.0
    assert stats["rewards/margins"].item() == 0.0


def test_token_logps_and_masked_lm_loss_by_hand():
    """logits row 0 = [1, 2, 3], label 2: 3 − log(e + e² + e³) = 3 − log 30.1928748 = 3 − 3.4076059
    = −0.4076059; row 1 = [0, 0, 0], label 0: −log 3 = −1.0986123.
    masked_lm_loss = mean NLL = (0.4076059 + 1.0986123) / 2 = 0.7531091."""
    logits = t(1.0, 2.0, 3.0, 0.0, 0.0, 0.0).reshape(2, 3)
    labels = torch.tensor([2, 0])
    per_token = token_logps(logits, labels)
    torch.testing.assert_close(per_token, t(-0.4076059, -1.0986123), atol=1e-6, rtol=0)
    torch.testing.assert_close(masked_lm_loss(per_token), torch.tensor(0.7531091), atol=1e-6, rtol=0)


def test_token_logps_run_in_fp32_for_bf16_logits():
    """The same logits in bf16 (1, 2, 3 and 0 are exact in bf16) give fp32 log-probs, not bf16 ones
    (bf16 would round −0.4076059 to −0.40625)."""
    logits = t(1.0, 2.0, 3.0, 0.0, 0.0, 0.0).reshape(2, 3).bfloat16()
    per_token = token_logps(logits, torch.tensor([2, 0]))
    assert per_token.dtype == torch.float32
    torch.testing.assert_close(per_token, t(-0.4076059, -1.0986123), atol=1e-6, rtol=0)


def test_sequence_logps_sums_per_sequence():
    """Tokens [−1, −2, −3, −4, −5] of sequences [0, 0, 1, 2, 2] → [−3, −3, −9] and 0 for sequence 3,
    which has no target token."""
    got = sequence_logps(t(-1.0, -2.0, -3.0, -4.0, -5.0), torch.tensor([0, 0, 1, 2, 2]), 4)
    torch.testing.assert_close(got, t(-3.0, -3.0, -9.0, 0.0))


def test_sequence_logps_keep_gradients():
    per_token = t(-1.0, -2.0, -3.0).requires_grad_(True)
    sequence_logps(per_token, torch.tensor([1, 0, 1]), 2).sum().backward()
    torch.testing.assert_close(per_token.grad, t(1.0, 1.0, 1.0))


@pytest.mark.parametrize("chunk_rows", [256, 3, 1])
def test_token_logps_gradient_equals_autograd_through_log_softmax(monkeypatch, chunk_rows):
    """The hand-written backward (one row scoring two labels, as the prompt's last position does in
    DPO; fp32 and bf16 logits) gives autograd's gradient of log_softmax(logits)[rows, labels],
    whether the 4 rows are one fp32 block, blocks of 3 + 1 rows, or a block per row."""
    import picoalign.train.losses as losses

    monkeypatch.setattr(losses, "CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    rows, labels = torch.tensor([0, 0, 1, 2, 3]), torch.tensor([4, 1, 6, 6, 0])
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(4, 7) * 3).to(dtype)
        a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        got = token_logps(a, labels, rows)
        want = b.float().log_softmax(-1)[rows, labels]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        (got * weights).sum().backward()
        (want * weights).sum().backward()
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=1e-6, rtol=0)


def test_the_loss_names_are_listed_once_and_the_cli_offers_exactly_them():
    """config.DPO_LOSS_NAMES is the one list: the registry, the config check and the --help agree;
    the methods beside DPO (config.METHOD_NAMES) are offered after them."""
    from picoalign.cli import build_parser
    from picoalign.config import DPO_LOSS_NAMES, METHOD_NAMES, ConfigError, DPOConfig

    assert tuple(DPO_LOSSES) == DPO_LOSS_NAMES
    for name in DPO_LOSS_NAMES + METHOD_NAMES:
        assert DPOConfig(loss=name).loss == name
    with pytest.raises(ConfigError, match="loss"):
        DPOConfig(loss="dpo")
    dpo_help = build_parser()._subparsers._group_actions[0].choices["dpo"].format_help()
    assert " | ".join(DPO_LOSS_NAMES + METHOD_NAMES) in " ".join(dpo_help.split())
