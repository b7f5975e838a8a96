"""train/flops.py: FLOPs per token counted by hand on the tiny Llama, MFU, the cached peak."""

from __future__ import annotations

import pytest
import torch

from picoalign.config import LoraConfig
from picoalign.models.load import add_lora, load_model
from picoalign.train import flops


def test_matmul_parameters_by_hand(chat_model):
    """hidden 32, 2 layers, 4 heads of 8 (2 key/value heads: k, v are 32 -> 16), MLP 64, vocab V:
    per layer q 32·32 + k 32·16 + v 32·16 + o 32·32 + gate 32·64 + up 32·64 + down 64·32 = 9216;
    the untied output layer 32·V. The embedding lookup multiplies nothing."""
    model, _ = load_model(str(chat_model))
    V = model.config.vocab_size
    assert flops.matmul_parameters(model) == 2 * 9216 + 32 * V
    assert flops.flops_per_token(model, full=True) == 6 * (2 * 9216 + 32 * V)
    assert flops.flops_per_token(model, full=False, reference_forward=True) == 6 * (2 * 9216 + 32 * V)
    assert not flops.trains_in_full(add_lora(model, LoraConfig(r=4, alpha=8)))


def test_lora_factors_count_and_a_tied_head_counts_once(chat_model):
    model, _ = load_model(str(chat_model))
    V = model.config.vocab_size
    plain = flops.matmul_parameters(model)
    lora = add_lora(model, LoraConfig(r=4, alpha=8, target_modules="q_proj"))
    # each q_proj gains A (32 -> 4) and B (4 -> 32): 2 · (32·4 + 4·32) = 512
    assert flops.matmul_parameters(lora) == plain + 512
    tied, _ = load_model(str(chat_model))
    tied.lm_head.weight = tied.model.embed_tokens.weight  # one Parameter read twice: one matmul
    assert flops.matmul_parameters(tied) == plain and plain - 2 * 9216 == 32 * V


def test_throughput_and_mfu_by_hand():
    """1 GFLOP per token, 500 tokens in 0.25 s: 2,000 tokens/s, 2 TFLOP/s; against a peak of
    4 TFLOP/s that is 50%, and over 2 devices of that peak 25%."""
    row = flops.Throughput(10**9, 4e12).of(500, 0.25)
    assert row == {"tokens_per_s": 2000.0, "tflops": 2.0, "mfu": 0.5}
    assert flops.Throughput(10**9, 4e12, devices=2).of(500, 0.25)["mfu"] == 0.25
    assert "mfu" not in flops.Throughput(10**9, None).of(500, 0.25)


def test_the_peak_is_measured_once_then_read_from_the_cache(tmp_path, chat_model, monkeypatch):
    model, _ = load_model(str(chat_model))
    calls = []
    real = flops.model_peak
    monkeypatch.setattr(flops, "model_peak", lambda *a: calls.append(a) or real(*a))
    cache = tmp_path / "peaks.json"
    first = flops.cached_peak(model, 200, torch.float32, torch.device("cpu"), cache)
    again = flops.cached_peak(model, 190, torch.float32, torch.device("cpu"), cache)  # rounds to 192 too
    assert first == again > 0 and len(calls) == 1
    flops.cached_peak(model, 200, torch.bfloat16, torch.device("cpu"), cache)  # another dtype: measured
    assert len(calls) == 2


def test_model_peak_weights_each_shape_by_its_use():
    """Two shapes, one used 3 times: FLOPs 2·T·(3·a + b) over 3·t_a + t_b."""
    shapes = {(64, 32): 3, (32, 16): 1}
    seconds = {(64, 32): 0.002, (32, 16): 0.001}
    want = 2 * 128 * (3 * 64 * 32 + 32 * 16) / (3 * 0.002 + 0.001)
    assert flops.peak_from(shapes, 128, seconds) == pytest.approx(want)
