"""`picoalign export`: merge a LoRA adapter into its base and save a plain Hugging Face folder
(or, with --format gguf, one GGUF file for llama.cpp and Ollama: use/gguf_export.py).

    picoalign export --model runs/demo/checkpoints/dpo --out exported/demo-dpo
    picoalign export --model runs/demo/checkpoints/sft --out exported/sft-bf16 --dtype bf16
    picoalign export --model runs/demo/checkpoints/dpo --out exported/demo-gguf --format gguf --gguf-type q8_0 --ollama

The folder (safetensors weights, config, tokenizer with its chat template, generation config
that stops at end-of-turn) loads with `AutoModelForCausalLM.from_pretrained` alone, no peft. Two
checks, on a probe conversation, before the export counts as done: the merged model's logits
equal those of the base with the adapter on (fp32, within --tolerance), and the saved folder,
loaded back with plain transformers, holds exactly the merged weights. `max_abs_logit_diff` in
the folder's picoalign.json is the end-to-end difference, reloaded folder vs base + adapter
(within --tolerance for fp32; for bf16/fp16 it shows the rounding). Any model picoalign loads
(a GGUF file, a full checkpoint) exports the same way.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

from picoalign.config import ExportConfig
from picoalign.generation.batched import end_ids
from picoalign.io import place_folder, write_json
from picoalign.models.chat import render_answer, render_prompt
from picoalign.models.load import MARKER, base_of_adapter, load_model, model_identity

PROBE = ("Write a two-sentence story about a lighthouse.",
         "The keeper climbed the stairs every night. One night the light was already on.")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def probe_ids(tokenizer) -> torch.Tensor:
    prompt, answer = PROBE
    if tokenizer.chat_template:
        return torch.tensor([render_prompt(tokenizer, prompt) + render_answer(tokenizer, prompt, answer)])
    return torch.tensor([tokenizer(f"{prompt}\n{answer}")["input_ids"]])


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()


def export(cfg: ExportConfig) -> dict:
    """Merge, check, save; returns what picoalign.json records. Raises ValueError if a check fails."""
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"{out} exists and is not empty (--overwrite replaces it)")
    model, tokenizer = load_model(cfg.model, "cpu", merge_adapter=False)
    model.eval()
    ids = probe_ids(tokenizer)
    before = logits(model, ids)  # base + adapter, as training and serving run it
    is_adapter = hasattr(model, "merge_and_unload")
    if is_adapter:
        model = model.merge_and_unload()
    merged = logits(model, ids)
    merged_diff = (merged - before).abs().max().item()
    if merged_diff > cfg.tolerance:
        raise ValueError(f"merged logits differ from base + adapter by {merged_diff:.2e} > {cfg.tolerance:.0e}")
    if cfg.format == "gguf":
        from picoalign.use.gguf_export import export_gguf

        prompt_ids = render_prompt(tokenizer, PROBE[0]) if tokenizer.chat_template else tokenizer(PROBE[0])["input_ids"]
        return export_gguf(cfg, model, tokenizer, ids, merged, prompt_ids, {
            "stage": "export", "complete": True, "source": model_identity(cfg.model),
            "base_model": base_of_adapter(cfg.model) if is_adapter else model_identity(cfg.model),
            "merged_adapter": is_adapter, "probe_tokens": ids.shape[1], "max_abs_logit_diff_merged": merged_diff,
        })

    model.to(DTYPES[cfg.dtype])
    ends = end_ids(model, tokenizer)
    model.generation_config.eos_token_id = ends[0] if len(ends) == 1 else ends
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))  # renamed into place when checked
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        reloaded = _check_reload(tmp, model)
        diff = (logits(reloaded, ids) - before).abs().max().item()
        if cfg.dtype == "fp32" and diff > cfg.tolerance:
            raise ValueError(f"the saved folder's logits differ from base + adapter by {diff:.2e} > {cfg.tolerance:.0e}")
        record = {
            "stage": "export", "complete": True, "source": model_identity(cfg.model),
            "base_model": base_of_adapter(cfg.model) if is_adapter else model_identity(cfg.model),
            "merged_adapter": is_adapter, "dtype": cfg.dtype, "probe_tokens": ids.shape[1],
            "max_abs_logit_diff": diff, "max_abs_logit_diff_merged": merged_diff,
        }
        write_json(tmp / MARKER, record)
        place_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"export: {cfg.model} -> {out} ({cfg.dtype}); max |Δlogit| of the saved folder vs base + adapter: "
          f"{diff:.2e} (the merge alone: {merged_diff:.2e})", file=sys.stderr)
    return record


def _check_reload(folder: Path, model):
    """Load the saved folder the way a user would (plain transformers, no peft); its weights
    must be exactly the merged model's."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    saved = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        if name not in saved or not torch.equal(tensor, saved[name]):
            raise ValueError(f"the saved folder's weight {name} is not the merged model's")
    return reloaded
