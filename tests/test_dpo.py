"""`picoalign.train.dpo.dpo` end to end on the tiny Llama, from a tiny SFT checkpoint.

The preference pairs are the data folder's story prompts with, as chosen and rejected, the two
story endings from where they diverge (the stories share their opening paragraph, so cut at
`max_length` the full answers would often be identical token for token).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import picoalign.train.dpo as dpo_module
import picoalign.train.reference as reference_module
from picoalign.config import DPOConfig, LoraConfig, SFTConfig
from picoalign.io import read_jsonl_lenient, write_jsonl
from picoalign.models.load import load_model, read_marker
from picoalign.train.batching import pair_batches
from picoalign.train.dpo import dpo
from picoalign.train.reference import ReferenceCache, batch_key
from picoalign.train.scoring import batch_sequence_logps
from picoalign.train.sft import sft

MAX_LENGTH = 240
LN2 = round(math.log(2), 6)  # 0.693147
STEP_KEYS = {"kind", "step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tflops", "mfu", "elapsed",
             "logps/ref_chosen", "logps/ref_rejected",
             "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected"}


def endings(row: dict) -> dict:
    """The pair with chosen/rejected cut to where they diverge (back to a word boundary)."""
    common = os.path.commonprefix([row["chosen"], row["rejected"]])
    cut = len(common)
    while cut > 0 and not common[cut - 1].isspace():
        cut -= 1
    return {"id": row["id"], "prompt": row["prompt"], "chosen": row["chosen"][cut:], "rejected": row["rejected"][cut:]}


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="session")
def pref_dir(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("prefs")
    for split in ("train", "val"):
        write_jsonl(out / f"dpo_{split}.jsonl", [endings(r) for r in rows_of(data_dir / f"dpo_{split}.jsonl")])
    return out


def sft_cfg(out: Path, model: Path, data: Path, lora: bool, **kw) -> SFTConfig:
    return SFTConfig(data=str(data), model=str(model), out=str(out), device="cpu", dtype="fp32", seed=0,
                     tensorboard=False, progress=False, max_length=208, batch_size=8, warmup_steps=0,
                     epochs=0, monitor_file=None, lora=LoraConfig(enabled=lora, r=4, alpha=8), **kw)


@pytest.fixture(scope="session")
def sft_full(tmp_path_factory, chat_model, data_dir) -> Path:
    """A full-model SFT checkpoint (2 steps)."""
    out = tmp_path_factory.mktemp("sft_full") / "sft"
    sft(sft_cfg(out, chat_model, data_dir, lora=False, lr=1e-2, max_steps=2))
    return out


@pytest.fixture(scope="session")
def sft_lora(tmp_path_factory, chat_model, data_dir) -> Path:
    """A LoRA SFT adapter folder (3 steps at a high rate, so the adapter changes the model)."""
    out = tmp_path_factory.mktemp("sft_lora") / "sft"
    sft(sft_cfg(out, chat_model, data_dir, lora=True, lr=5e-2, max_steps=3))
    return out


def dpo_cfg(out: Path, model: Path, data: Path, lora: bool = True, **overrides) -> DPOConfig:
    settings = dict(
        data=str(data), model=str(model), out=str(out), device="cpu", dtype="fp32", seed=0,
        tensorboard=False, progress=False, max_length=MAX_LENGTH, batch_size=4, lr=1e-3,
        warmup_steps=0, max_steps=2, epochs=0, eval_every=0, lora=LoraConfig(enabled=lora, r=4, alpha=8),
    )
    settings.update(overrides)
    return DPOConfig(**settings)


def log_rows(out: Path, kind: str = "train") -> list[dict]:
    return [r for r in read_jsonl_lenient(out / "logs" / "dpo.jsonl") if r["kind"] == kind]


def saved_ref(out: Path, batches: list | None = None) -> torch.Tensor:
    """The stored reference log-probs of `batches` in their order (the file keys them by content;
    a batch it lacks is a KeyError), or all of them."""
    saved = torch.load(out / "ref_logps.pt", weights_only=False)["logps"]
    return torch.cat([saved[batch_key(b)] for b in batches] if batches is not None else list(saved.values()))


def all_batches(tokenizer, cfg: DPOConfig) -> list:
    """The train batches then the val batches, as DPOTask builds them (the order of ref_logps.pt)."""
    data = Path(cfg.data)
    return [b for f in (cfg.train_file, cfg.val_file)
            for b in pair_batches(tokenizer, rows_of(data / f), cfg, cfg.prefix_sharing)]


def model_logps(model, batches) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([batch_sequence_logps(model, b)[0] for b in batches])


# ---------------------------------------------------------------- the first step, the reference cache


def test_first_step_has_zero_rewards_and_loss_ln2(tmp_path, sft_full, pref_dir, monkeypatch):
    """With a fresh LoRA adapter (B = 0) the policy is the reference: Δ = 0, so every reward is 0,
    the loss is −log σ(0) = ln 2 = 0.693147 and no pair counts as accurate (strict >)."""
    out = tmp_path / "dpo"
    summary = dpo(dpo_cfg(out, sft_full, pref_dir, eval_every=1))
    train = log_rows(out)
    assert [r["step"] for r in train] == [1, 2] and summary["stop_reason"] == "max_steps"
    assert all(set(r) == STEP_KEYS for r in train)
    first = train[0]
    assert first["loss"] == LN2
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert first[key] == 0.0, key
    assert first["logps/chosen"] < -50 and first["logps/rejected"] < -50  # summed, not averaged

    evals = log_rows(out, "eval")
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert all({"val/loss", "val/pref_acc", "val/margin"} <= set(r) for r in evals)
    assert evals[0]["val/loss"] == LN2 and evals[0]["val/margin"] == 0.0 and evals[0]["val/pref_acc"] == 0.0
    assert evals[-1]["val/margin"] != 0.0

    # the precomputed reference is the SFT model's summed log-probs of every train and val answer
    cache = out / "ref_logps.pt"
    model, tokenizer = load_model(str(sft_full))
    cfg = dpo_cfg(out, sft_full, pref_dir)
    torch.testing.assert_close(saved_ref(out, all_batches(tokenizer, cfg)), model_logps(model, all_batches(tokenizer, cfg)), atol=1e-4, rtol=0)

    # a second run in the same folder reuses the file: not recomputed, not rewritten
    mtime = cache.stat().st_mtime_ns

    def no_recompute(self, policy, batches):
        raise AssertionError("the reference log-probs were computed again")

    monkeypatch.setattr(ReferenceCache, "compute", no_recompute)
    dpo(dpo_cfg(out, sft_full, pref_dir, max_steps=1))
    assert cache.stat().st_mtime_ns == mtime
    again = log_rows(out)[-1]
    assert again["step"] == 1
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
        assert again[key] == first[key], key


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_live_reference_matches_precomputed(tmp_path, sft_full, pref_dir, lora):
    """`reference: live` (LoRA: adapter disabled; full: a frozen copy) gives the metrics of the
    precomputed reference, at step 1 and after the policy has moved (step 3)."""
    kw = dict(lora=lora, max_steps=3, batch_size=8, lr=1e-2 if lora else 1e-3)
    dpo(dpo_cfg(tmp_path / "pre", sft_full, pref_dir, **kw))
    dpo(dpo_cfg(tmp_path / "live", sft_full, pref_dir, reference="live", **kw))
    assert not (tmp_path / "live" / "ref_logps.pt").exists()
    pre, live = log_rows(tmp_path / "pre"), log_rows(tmp_path / "live")
    assert pre[0]["loss"] == live[0]["loss"] == LN2
    assert pre[-1]["rewards/margins"] != 0.0
    for a, b in zip(pre, live):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert b[key] == pytest.approx(a[key], abs=2e-5), (a["step"], key)


# ---------------------------------------------------------------- the other losses


@pytest.mark.parametrize(
    ("loss", "eps", "first_loss"),
    [
        ("ipo", 0.0, 25.0),  # (0 − 1/(2·0.1))² = 25
        ("hinge", 0.0, 1.0),  # max(0, 1 − 0) = 1
        ("robust", 0.1, LN2),  # (0.9·ln2 − 0.1·ln2) / 0.8 = ln2
        ("cdpo", 0.1, LN2),  # 0.9·ln2 + 0.1·ln2 = ln2
    ],
)
def test_other_losses_run(tmp_path, sft_full, pref_dir, loss, eps, first_loss):
    """Each loss trains two steps; at step 1 Δ = 0, so the loss is its value at 0 (worked out above)."""
    out = tmp_path / "dpo"
    dpo(dpo_cfg(out, sft_full, pref_dir, loss=loss, label_smoothing=eps, beta=0.1))
    first, second = log_rows(out)
    assert first["loss"] == pytest.approx(first_loss, abs=1e-5)
    assert math.isfinite(second["loss"]) and second["loss"] != first["loss"]
    ref = saved_ref(out)
    if loss == "ipo":  # IPO's reference is the mean log-prob per token, not the sum
        assert (-12 < ref).all() and (ref < 0).all()
    else:
        assert (ref < -50).all()


# ---------------------------------------------------------------- it learns


def test_preference_accuracy_rises_on_two_pairs(tmp_path, sft_full, pref_dir):
    """Two training pairs, also used as the validation set, a high learning rate: after 10 steps
    both pairs are ranked right (val/pref_acc 0 → 1) and the loss is well under ln 2."""
    data = tmp_path / "two"
    pairs = rows_of(pref_dir / "dpo_train.jsonl")[:2]
    write_jsonl(data / "dpo_train.jsonl", pairs)
    write_jsonl(data / "dpo_val.jsonl", pairs)
    out = tmp_path / "dpo"
    dpo(dpo_cfg(out, sft_full, data, lora=False, lr=1e-2, batch_size=2, max_steps=10, eval_every=10,
                schedule="constant"))
    start, end = log_rows(out, "eval")
    assert (start["step"], end["step"]) == (0, 10)
    assert start["val/pref_acc"] == 0.0 and start["val/margin"] == 0.0 and start["val/loss"] == LN2
    assert end["val/pref_acc"] == 1.0
    assert end["val/margin"] > 0.5
    assert end["val/loss"] < 0.5
    assert log_rows(out)[-1]["rewards/accuracies"] == 1.0


# ---------------------------------------------------------------- the reference of a LoRA SFT adapter


def test_lora_sft_adapter_reference_is_the_merged_sft_model(tmp_path, sft_lora, chat_model, pref_dir):
    """Starting from an SFT adapter folder, the reference is base + SFT adapter (merged), not the
    raw base: the precomputed log-probs equal those of peft's merged model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (sft_lora / "adapter_config.json").exists()
    out = tmp_path / "dpo"
    cfg = dpo_cfg(out, sft_lora, pref_dir, max_steps=2)  # both training batches: all scored
    dpo(cfg)
    assert log_rows(out)[0]["loss"] == LN2
    base = AutoModelForCausalLM.from_pretrained(str(chat_model), dtype=torch.float32)
    _, tokenizer = load_model(str(chat_model))
    batches = all_batches(tokenizer, cfg)
    raw = model_logps(base, batches)
    merged = PeftModel.from_pretrained(base, str(sft_lora)).merge_and_unload()
    expected = model_logps(merged, batches)
    assert (expected - raw).abs().max() > 0.1  # the adapter matters, so the check below can tell
    torch.testing.assert_close(saved_ref(out, batches), expected, atol=1e-4, rtol=0)


def test_reference_cache_follows_the_reference(tmp_path, sft_full, chat_model, pref_dir):
    out = tmp_path / "dpo"
    dpo(dpo_cfg(out, sft_full, pref_dir, max_steps=2))
    cfg = dpo_cfg(out, sft_full, pref_dir, max_steps=2, reference=str(chat_model))
    dpo(cfg)
    base, tokenizer = load_model(str(chat_model))
    batches = all_batches(tokenizer, cfg)
    torch.testing.assert_close(saved_ref(out, batches), model_logps(base, batches), atol=1e-4, rtol=0)


def test_the_reference_scores_only_what_the_budget_uses(tmp_path, sft_full, pref_dir, monkeypatch):
    """max_steps 1 of 2 training batches: the one the loop takes first and the val batch are scored
    before step 1; a longer run in the same folder scores only the other; a run limited by time
    alone scores its training batches as it reaches them, each once, and the time counts."""
    from picoalign.train.loop import batch_order

    out = tmp_path / "dpo"
    scored = []
    real = ReferenceCache.compute
    monkeypatch.setattr(ReferenceCache, "compute", lambda self, m, b: scored.append(len(b)) or real(self, m, b))
    cfg = dpo_cfg(out, sft_full, pref_dir, max_steps=1)
    dpo(cfg)
    _, tokenizer = load_model(str(sft_full))
    data = Path(cfg.data)
    train = pair_batches(tokenizer, rows_of(data / cfg.train_file), cfg, cfg.prefix_sharing)
    val = pair_batches(tokenizer, rows_of(data / cfg.val_file), cfg, cfg.prefix_sharing)
    first = train[batch_order(len(train), 0, cfg.seed)[0]]
    saved = torch.load(out / "ref_logps.pt", weights_only=False)["logps"]
    assert len(train) == 2 and set(saved) == {batch_key(first), *map(batch_key, val)}
    assert scored == [1 + len(val)]
    dpo(dpo_cfg(out, sft_full, pref_dir, max_steps=2))
    assert scored == [1 + len(val), 1]  # the other training batch only
    timed = tmp_path / "timed"
    scored.clear()
    seen = {}
    real_fit = dpo_module.fit
    monkeypatch.setattr(dpo_module, "fit", lambda task, *a, **k: seen.setdefault("task", task) and real_fit(task, *a, **k))
    summary = dpo(dpo_cfg(timed, sft_full, pref_dir, max_steps=0, epochs=0, max_seconds=2))
    assert scored == [len(val)]  # before step 1: the val batch only
    assert summary["steps"] >= 2 and summary["stop_reason"] == "max_seconds"
    assert len(seen["task"].reference.scored) == len(train)  # each training batch scored once, when first used
    assert summary["seconds"] >= 2


class FakeClock:
    """`time` for the loop and the DPO module: a millisecond a reading, and what the test adds."""

    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        self.now += 0.001
        return self.now


def costly_reference(monkeypatch, seconds: float, step_seconds: float = 0.0) -> FakeClock:
    """Every forward without gradients (the reference's; evaluation's too) costs `seconds` on the
    clock, every forward with them (a training step's) `step_seconds`."""
    import picoalign.train.loop as loop_module

    clock = FakeClock()
    monkeypatch.setattr(reference_module, "time", clock)
    monkeypatch.setattr(loop_module, "time", clock)
    real = dpo_module.batch_sequence_logps

    def scored(model, batch, normalise=False):
        clock.now += step_seconds if torch.is_grad_enabled() else seconds
        return real(model, batch, normalise)

    monkeypatch.setattr(dpo_module, "batch_sequence_logps", scored)  # the policy's forward
    monkeypatch.setattr(reference_module, "batch_sequence_logps", scored)  # the reference's
    return clock


def test_a_time_budget_smaller_than_the_precompute_still_trains(tmp_path, sft_full, pref_dir, monkeypatch, capsys):
    """Issue 31. The reference costs 10 s a batch on a fake clock: 30 s for the 2 training batches
    and the val batch, against max_seconds=15 and one epoch (2 steps). Once the precompute took all
    30 s and the run 'finished' after 0 steps. Now it stops at its share (7.5 s), after one batch
    (10 s), and says before step 1 what the whole would take of the budget; step 1 uses that
    batch, step 2 scores its own as it reaches it (10 s more): 2 steps, a complete output."""
    costly_reference(monkeypatch, 10.0)
    seen = {}
    real_fit = dpo_module.fit
    monkeypatch.setattr(dpo_module, "fit", lambda task, *a, **k: seen.setdefault("task", task) and real_fit(task, *a, **k))
    out = tmp_path / "dpo"
    summary = dpo(dpo_cfg(out, sft_full, pref_dir, max_steps=0, epochs=1, max_seconds=15))
    said = capsys.readouterr().out
    assert "takes about 30s, 200% of max_seconds=15; it stops at 50% of it" in said
    assert "reference log-probs of 4 pairs took 10s, 67% of max_seconds=15" in said
    assert summary["steps"] == 2 and summary["stop_reason"] == "epochs" and 20 <= summary["seconds"] < 21
    assert read_marker(out)["complete"] is True
    assert len(torch.load(out / "ref_logps.pt", weights_only=False)["logps"]) == 1
    assert len(seen["task"].reference.scored) == 2  # the second training batch in step 2, the val batch at the end


def test_full_fine_tuning_scores_late_batches_against_the_start(tmp_path, sft_full, pref_dir, monkeypatch):
    """Full fine-tuning, a run limited by time alone (15 s; the reference 10 s a batch, a step 2 s):
    the precompute scores one batch; the other, reached at step 2, is scored by a frozen copy of the
    starting model, so step 2 and the final eval log what a run with every batch precomputed logs.
    (Once the policy itself scored the batches as it reached them, after it had moved.)"""
    kw = dict(lora=False, lr=1e-3, schedule="constant")  # time alone: no cosine end to aim at
    dpo(dpo_cfg(tmp_path / "all", sft_full, pref_dir, max_steps=2, **kw))
    costly_reference(monkeypatch, 10.0, step_seconds=2.0)
    summary = dpo(dpo_cfg(tmp_path / "timed", sft_full, pref_dir, max_steps=0, epochs=0, max_seconds=15, **kw))
    assert summary["steps"] == 2 and summary["stop_reason"] == "max_seconds"
    everything, timed = log_rows(tmp_path / "all"), log_rows(tmp_path / "timed")
    assert everything[1]["rewards/margins"] != 0.0
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        assert timed[1][key] == pytest.approx(everything[1][key], abs=1e-5), key
    # the val batch too, left to the copy at the final eval
    assert log_rows(tmp_path / "timed", "eval")[-1]["val/margin"] == log_rows(tmp_path / "all", "eval")[-1]["val/margin"]


def test_a_time_budget_the_precompute_uses_up_fails_loudly(tmp_path, sft_full, pref_dir, monkeypatch):
    """A budget of 5 s against a first batch of 10 s: no step fits. The stage fails saying why and
    what to change, and the output is not marked complete (once: 0 steps, exit 0, complete)."""
    from picoalign.train.loop import TooFewSteps

    costly_reference(monkeypatch, 10.0)
    out = tmp_path / "dpo"
    with pytest.raises(TooFewSteps, match=r"after 0 optimiser steps.*max_seconds=5 was spent; 10 s of it went to "
                                          r"work before step 1 \(the reference log-probs\).*larger max_seconds, "
                                          r"fewer pairs, or reference=live"):
        dpo(dpo_cfg(out, sft_full, pref_dir, max_steps=0, epochs=1, max_seconds=5))
    assert read_marker(out)["complete"] is False
    assert not (out / "adapter_model.safetensors").exists()


def test_bad_pairs_leave_a_finished_checkpoint_as_it_was(tmp_path, sft_full, pref_dir, monkeypatch):
    """`--out` at a copy of a finished DPO checkpoint, a pair with `"prompt": null` in the
    training file: refused with file:line before any model loads; not a byte of it changes."""
    import shutil

    import picoalign.train.stage as stage
    from picoalign.data.formats import DataError

    finished = tmp_path / "finished"
    dpo(dpo_cfg(finished, sft_full, pref_dir))
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    before = {p: p.read_bytes() for p in sorted(copy.rglob("*")) if p.is_file()}
    bad = tmp_path / "bad"
    shutil.copytree(pref_dir, bad)
    with (bad / "dpo_train.jsonl").open("a") as f:
        f.write(json.dumps({"prompt": None, "chosen": "The door opened.", "rejected": "The door stayed shut."}) + "\n")
    monkeypatch.setattr(stage, "load_model", lambda *a, **k: pytest.fail("a model loaded before the data was read"))
    with pytest.raises(DataError, match=r"dpo_train.jsonl:9: field 'prompt': null"):
        dpo(dpo_cfg(copy, sft_full, bad, max_steps=4))
    assert {p: p.read_bytes() for p in sorted(copy.rglob("*")) if p.is_file()} == before
    assert json.loads((copy / "picoalign.json").read_text())["complete"] is True
