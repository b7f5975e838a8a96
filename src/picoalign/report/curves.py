"""The panels of curves.png, each stage's own: its registry entry (stages.py) names them, and
report/plots.py draws every stage's in the registry's order. Data only: no matplotlib here, so
the registry (and `picoalign --help`) stays instant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

COLORS = {"train": "#1f77b4", "val": "#d62728", "chosen": "#2ca02c", "rejected": "#d62728", "margin": "#555555"}


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    lines: tuple[tuple[str, str, str, str], ...]  # (kind, key, label, color); kind "ref": a train key, dashed
    ref: tuple[float, str] | None = None  # a dashed horizontal reference line
    percent: bool = False


def loss_panel(title: str) -> Panel:
    """Train and validation loss of a language-modelling stage."""
    return Panel(title, "cross-entropy (nats/token)",
                 (("train", "loss", "train", COLORS["train"]), ("eval", "val/loss", "val", COLORS["val"])))


PRETRAIN = (loss_panel("Pretraining loss (optional stage)"),)
SFT = (
    loss_panel("SFT loss (response tokens only)"),
    Panel("SFT monitor: preference pairs under the SFT model", "mean log-prob of the response",
          (("eval", "monitor/logps_chosen", "chosen", COLORS["chosen"]),
           ("eval", "monitor/logps_rejected", "rejected", COLORS["rejected"]))),
)
DPO = (
    Panel("DPO loss", "loss",
          (("train", "loss", "train", COLORS["train"]), ("eval", "val/loss", "val", COLORS["val"]),
           ("train", "loss/preference", "train, preference term (with sft_weight)", "#9467bd")),
          ref=(math.log(2), "ln 2 (sigmoid loss at the start)")),
    Panel("DPO implicit rewards  β·log(π/π_ref)", "reward",
          (("train", "rewards/chosen", "chosen", COLORS["chosen"]),
           ("train", "rewards/rejected", "rejected", COLORS["rejected"]),
           ("train", "rewards/margins", "margin", COLORS["margin"]),
           ("eval", "val/margin", "val margin", "#000000")),
          ref=(0.0, "")),
    # Likelihood displacement (train/diagnostics.py) shows here: the chosen curve sinking under its
    # reference while the margin in the panel above still grows.
    Panel("DPO log-probs of the answers against the reference", "summed log-prob of the answer",
          (("train", "logps/chosen", "chosen (policy)", COLORS["chosen"]),
           ("ref", "logps/ref_chosen", "chosen (reference)", COLORS["chosen"]),
           ("train", "logps/rejected", "rejected (policy)", COLORS["rejected"]),
           ("ref", "logps/ref_rejected", "rejected (reference)", COLORS["rejected"]))),
    Panel("DPO reward accuracy (train) and preference accuracy (val)", "accuracy",
          (("train", "rewards/accuracies", "train reward acc.", COLORS["train"]),
           ("eval", "val/pref_acc", "val preference acc.", COLORS["val"])),
          ref=(0.5, "chance"), percent=True),
)
RL = (
    Panel("RL reward on the model's own samples (optional stage)", "mean reward",
          (("train", "reward", "reward", COLORS["train"]),
           ("train", "frac_reward_zero_std", "share of groups with one reward", COLORS["margin"]))),
)
