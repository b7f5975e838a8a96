"""The `picoalign dpo` stage's entry: one command for every preference method.

KTO learns from unpaired rows (train/kto.py, whose task builds on DPO's); every other loss
(DPO and its variants, ORPO, SimPO) trains on pairs (train/dpo.py). The choice lives here, above
both modules, so neither imports the other back.
"""

from __future__ import annotations

from picoalign.config import DPOConfig
from picoalign.methods import METHODS
from picoalign.train.dpo import dpo
from picoalign.train.kto import kto


def train_preferences(cfg: DPOConfig) -> dict:
    """Train on preferences with `cfg.loss`; returns the training summary."""
    return kto(cfg) if METHODS[cfg.loss].rows == "unpaired" else dpo(cfg)
