"""Frozen weights stored in the compute dtype (models/load.py:store_frozen_in) against the
autocast path that casts fp32 weights in every forward: the same loss and LoRA gradients to bf16
precision, the trained parameters still fp32, and the weights' bytes halved."""

from __future__ import annotations

import copy

import pytest
import torch

from picoalign.config import LoraConfig, SFTConfig
from picoalign.models.load import add_lora, load_model, store_frozen_in
from picoalign.train.batching import forward_logps
from picoalign.train.losses import masked_lm_loss
from picoalign.train.sft import SFTTask


def lora_model(chat_model):
    model, tok = load_model(str(chat_model))
    model.config._attn_implementation = "sdpa"
    model = add_lora(model, LoraConfig(r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B = 0 would leave A's gradient 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, tok


def loss_and_grads(model, batch):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = masked_lm_loss(forward_logps(model, batch))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_frozen_weights_in_bf16_train_like_autocast_over_fp32(tmp_path, chat_model, data_dir):
    model, tok = lora_model(chat_model)
    cfg = SFTConfig(data=str(data_dir), model=str(chat_model), out=str(tmp_path), max_length=208, batch_size=4,
                    monitor_file=None)
    batch = SFTTask(model, tok, cfg, torch.device("cpu")).train[0]
    want_loss, want = loss_and_grads(model, batch)

    fast = copy.deepcopy(model)
    fp32_bytes = sum(p.numel() * p.element_size() for p in fast.parameters() if not p.requires_grad)
    cast = store_frozen_in(fast, torch.bfloat16)
    frozen = [p for p in fast.parameters() if not p.requires_grad]
    assert cast == sum(p.numel() for p in frozen) > 0
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    assert {p.dtype for p in fast.parameters() if p.requires_grad} == {torch.float32}  # LoRA: fp32 masters
    assert sum(p.numel() * p.element_size() for p in frozen) * 2 == fp32_bytes
    got_loss, got = loss_and_grads(fast, batch)

    # bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); activations now flow in bf16 too
    assert abs(got_loss - want_loss) <= 0.01 * abs(want_loss)
    assert got.keys() == want.keys()
    for name, g in got.items():
        assert g.dtype == torch.float32, name
        cos = torch.nn.functional.cosine_similarity(g.flatten(), want[name].flatten(), dim=0)
        assert cos > 0.995, (name, cos.item())
        assert (g.norm() / want[name].norm() - 1).abs() < 0.03, name


def test_fp32_runs_and_full_fine_tuning_keep_fp32_weights(tmp_path, chat_model, data_dir):
    """Only a LoRA run with a bf16 compute dtype stores the base in bf16 (prepare decides)."""
    from picoalign.train.stage import prepare

    common = dict(data=str(data_dir), model=str(chat_model), out=str(tmp_path), device="cpu", monitor_file=None)
    for dtype, lora, want in (("bf16", True, torch.bfloat16), ("fp32", True, torch.float32),
                              ("bf16", False, torch.float32)):
        p = prepare(SFTConfig(dtype=dtype, lora=LoraConfig(enabled=lora, r=4, alpha=8), **common), "sft")
        frozen = {q.dtype for q in p.model.parameters() if not q.requires_grad} or {torch.float32}
        trained = {q.dtype for q in p.model.parameters() if q.requires_grad}
        assert frozen == {want}, (dtype, lora)
        assert trained == {torch.float32}, (dtype, lora)


@pytest.mark.slow  # inductor compiles the tiny model's forward and backward: ~90 s on 2 cores
def test_the_compiled_decoder_gives_the_eager_losses_and_gradients(tmp_path, chat_model, data_dir):
    """`compile: true` (torch.compile of the decoder, in place): two SFT steps on the tiny Llama log
    the losses and gradient norms of the eager run, and save the same adapter, to fp32 tolerance."""
    from safetensors.torch import load_file

    from picoalign.io import read_jsonl_lenient
    from picoalign.train.sft import sft

    def run(out, **extra):
        sft(SFTConfig(data=str(data_dir), model=str(chat_model), out=str(out), device="cpu", dtype="fp32",
                      seed=0, tensorboard=False, progress=False, max_length=208, batch_size=4, lr=1e-2,
                      warmup_steps=0, max_steps=2, epochs=0, monitor_file=None,
                      lora=LoraConfig(r=4, alpha=8), **extra))
        return [r for r in read_jsonl_lenient(out / "logs" / "sft.jsonl") if r["kind"] == "train"], \
            load_file(out / "adapter_model.safetensors")

    eager, eager_w = run(tmp_path / "eager")
    compiled, compiled_w = run(tmp_path / "compiled", compile=True)
    for a, b in zip(eager, compiled, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for key, w in eager_w.items():
        # Adam divides by sqrt(v): a last-bit gradient difference of a fused kernel moves a weight
        # whose gradient is tiny by a visible step (one of 256 elements moved 3e-5 at lr 1e-2)
        torch.testing.assert_close(compiled_w[key], w, atol=1e-4, rtol=1e-4)
