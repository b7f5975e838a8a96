"""The LR schedule and the budgets agree: the cosine reaches its end exactly at the last step.

A fake task (a 2-weight linear model, constant batches) runs through the real `loop.fit`, so
the steps counted are the steps the loop takes, not a re-derivation of them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from picoalign.config import TrainConfig
from picoalign.io import read_jsonl_lenient
from picoalign.train import loop

LR = 0.1


class Batch:
    n_tokens = 1

    def __init__(self) -> None:
        self.x = torch.ones(1, 2)

    def to(self, device):
        return self


class FakeTask:
    def __init__(self, n_batches: int) -> None:
        self.model = torch.nn.Linear(2, 1)
        self._batches = [Batch() for _ in range(n_batches)]

    def batches(self):
        return self._batches

    def loss(self, batch):
        return self.model(batch.x).pow(2).mean(), {}

    def evaluate(self):
        return {"val/loss": 0.0}

    def save(self, folder: Path, state_dict=None) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), Path(folder) / "model.pt")


@pytest.mark.parametrize(("grad_accum", "steps"), [(3, 3), (4, 2), (1, 10), (5, 2)])
def test_cosine_ends_exactly_at_the_last_step(tmp_path, monkeypatch, grad_accum, steps):
    """10 batches, one epoch: floor(10 / grad_accum) whole steps run (3 at grad_accum 3, 2 at 4).

    Without warmup the rate of step s (0-based) of n is LR * (1 + cos(pi * s / n)) / 2, so the
    last step (s = n - 1) runs at LR * (1 + cos(pi * (n - 1) / n)) / 2 and the schedule stands at
    0 after it. Planning ceil(10 / 3) = 4 steps left it at LR * (1 + cos(3 pi / 4)) / 2 = 0.0146.
    """
    made = []
    real = loop.make_schedule
    monkeypatch.setattr(loop, "make_schedule", lambda *a: made.append(real(*a)) or made[-1])
    cfg = TrainConfig(out=str(tmp_path / "out"), device="cpu", dtype="fp32", seed=0, lr=LR, warmup_steps=0,
                      schedule="cosine", batch_size=1, grad_accum=grad_accum, epochs=1, max_steps=0,
                      tensorboard=False, progress=False)
    assert loop.planned_steps(cfg, 10) == steps
    summary = loop.fit(FakeTask(10), cfg, "fake", torch.device("cpu"), torch.float32)
    assert summary["steps"] == steps and summary["stop_reason"] == "epochs"
    rows = [r for r in read_jsonl_lenient(tmp_path / "out" / "logs" / "fake.jsonl") if r.get("kind") == "train"]
    expected = [LR * (1 + math.cos(math.pi * s / steps)) / 2 for s in range(steps)]
    assert [r["lr"] for r in rows] == pytest.approx(expected, abs=1e-12)
    assert made[-1].get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the cosine's end, no step short


def test_planned_steps_counts_whole_steps_across_ranks():
    cfg = TrainConfig(grad_accum=2, epochs=1, max_steps=0)
    assert loop.planned_steps(cfg, 10, world_size=4) == 1  # 8 of the 10 batches fill one step on 4 ranks
    assert loop.planned_steps(TrainConfig(grad_accum=3, epochs=2, max_steps=0), 10) == 6  # 20 batches
    assert loop.planned_steps(TrainConfig(grad_accum=3, epochs=1, max_steps=2), 10) == 2  # max_steps first
    assert loop.planned_steps(TrainConfig(epochs=0, max_steps=0, max_seconds=5), 10) is None
