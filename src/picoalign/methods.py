"""The preference methods `picoalign dpo --loss NAME` trains, listed once.

    from picoalign.methods import METHODS
    METHODS["ipo"].reference        # True: trained against a frozen reference
    METHODS["simpo"].function()     # picoalign.train.methods:simpo_pair_loss, imported only now

A method is one `Method` entry: its name (the value of `dpo.loss`), its loss as "module:function"
(imported only when a stage trains, so `picoalign --help` stays instant), whether it needs a
reference model, the rows it learns from, the metrics it logs (TRL's names) and its name in the
report in each language. The config check (`DPOConfig.loss`), the CLI help of `--loss`, the
trainer (`train/preference.py`, `train/dpo.py`) and the report all read this table.

What the loss function receives depends on the method's kind:
    reference, pairs    loss(Δ, β, ε) -> per-pair losses, Δ = (log π_c − log π_ref,c) − (rejected)
    no reference        loss(model, batch, cfg) -> (mean loss, metrics, margin per pair)
    unpaired            KTO's loss(policy, ref, desirable, z₀, β, λ_D, λ_U) (train/kto.py)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

# What every preference method logs, under TRL's names (DPOTrainer's).
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")


@dataclass(frozen=True)
class Method:
    name: str  # the value of dpo.loss
    loss: str  # "module:function" (see the module's docstring for what it receives)
    reference: bool  # trains against a frozen reference (precomputed, live or a named checkpoint)
    title: dict[str, str]  # the method's name in the report, by language ("en", "zh")
    metrics: tuple[str, ...] = REWARDS  # the step metrics it logs besides `loss`
    rows: str = "pairs"  # "pairs" (prompt, chosen, rejected) | "unpaired" (prompt, completion, label)
    normalise: bool = False  # Δ from the mean log-prob per token rather than the sum (IPO)
    no_sft_weight: str = ""  # why the method refuses `sft_weight` > 0 (empty: it takes one)
    min_batch: tuple[int, str] = (1, "")  # the smallest batch_size it trains with, and why

    def function(self) -> Callable:
        module, name = self.loss.split(":")
        return getattr(importlib.import_module(module), name)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method (a new one is this call and its loss function)."""
    METHODS[method.name] = method
    return method


def method(name: str) -> Method:
    return METHODS[name]


def names(reference: bool | None = None, rows: str | None = None) -> tuple[str, ...]:
    """The methods' names in the table's order, those with a reference or without, of a kind of rows."""
    return tuple(m.name for m in METHODS.values()
                 if (reference is None or m.reference == reference) and (rows is None or m.rows == rows))


def loss_help() -> str:
    """The `--loss` choices, as the CLI help and the config check list them."""
    return " | ".join(METHODS)


L = "picoalign.train.losses"
for entry in (
    Method("sigmoid", f"{L}:sigmoid_loss", True, {"en": "DPO", "zh": "DPO"}),
    Method("cdpo", f"{L}:sigmoid_loss", True, {"en": "cDPO", "zh": "cDPO"}),  # the same loss with ε > 0
    Method("ipo", f"{L}:ipo_loss", True, {"en": "IPO", "zh": "IPO"}, normalise=True),
    Method("hinge", f"{L}:hinge_loss", True, {"en": "hinge (SLiC)", "zh": "hinge（SLiC）"}),
    Method("robust", f"{L}:robust_loss", True, {"en": "robust DPO", "zh": "robust DPO"}),
    Method("orpo", "picoalign.train.dpo:orpo_pair_loss", False,
           {"en": "ORPO", "zh": "ORPO"}, REWARDS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"),
           no_sft_weight="orpo trains the NLL of the chosen answer already"),
    Method("simpo", "picoalign.train.dpo:simpo_pair_loss", False,
           {"en": "SimPO, without a reference model", "zh": "SimPO，不用参考模型"}),
    Method("kto", f"{L}:kto_loss", True,
           {"en": "KTO, on unpaired answers (pairs split into a desirable and an undesirable row)",
            "zh": "KTO，使用非成对回答（每个偏好对拆成一条正例和一条负例）"},
           ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"),
           rows="unpaired", no_sft_weight="kto has no chosen answer",
           min_batch=(2, "its reference point comes from the other examples of the batch (with one, it is the "
                         "example's own reward)")),
):
    register(entry)
del L, entry
