"""`picoalign export --format gguf`: the merged model as one GGUF file, checked where it will run.

    picoalign export --model runs/demo/checkpoints/dpo --out exported/demo-gguf --format gguf --gguf-type q8_0 --ollama

The folder --out gets `model-<type>.gguf`, `picoalign.json` with the checks' figures and, with
--ollama, a `Modelfile`. Before the folder is renamed into place (so a failed export leaves no
file behind), on the probe conversation of the HF export:

1. transformers' GGUF loader reads the file back: the same tokens for the probe text, the same
   chat template, next-token logits within the type's tolerance of the merged model's;
2. llama.cpp itself (llama-cpp-python, when installed) loads it: the same tokens, next-token
   logits within the type's tolerance, a greedy continuation compared token for token with the
   merged model's, and the prompt rendered by the file's chat template equal to the tokenizer's.

Tolerances are relative to the largest |logit| of the merged model on the probe: f16 keeps
~3 significant digits, bf16 ~2, q8_0 rounds every weight to 1/127 of its block's largest.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from picoalign.generation.batched import END_OF_TURN, end_ids
from picoalign.io import atomic_write_text, staged_folder
from picoalign.models.load import MARKER
from picoalign.use import llamacpp_check, ollama
from picoalign.use.gguf_file import gguf_plan, write_gguf

# Largest allowed max|Δlogit| / max|logit| against the merged fp32 model, per weight type.
TOLERANCE = {"f16": 1e-2, "bf16": 5e-2, "q8_0": 0.15}
GREEDY_TOKENS = 24
PROBE_MESSAGES = [{"role": "user", "content": "Write a two-sentence story about a lighthouse."}]


def end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template closes each turn with (else the EOS)."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    named = [vocab[t] for t in END_OF_TURN if t in template and t in vocab]
    return named[0] if named else tokenizer.eos_token_id


@torch.no_grad()
def greedy_hf(model, ids: list[int], n_new: int, ends: set[int]) -> list[int]:
    """The merged model's argmax continuation, computed the way llamacpp_check.greedy does."""
    seq, out = list(ids), []
    for _ in range(n_new):
        token = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        out.append(token)
        if token in ends:
            break
        seq.append(token)
    return out


def relative_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def check_transformers(folder: Path, name: str, tokenizer, ids: list[int], expected: np.ndarray, tol: float) -> dict:
    """Load the file back with transformers' GGUF loader (no picoalign code in the way)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    text = tokenizer.decode(ids)
    same_tokens = reloaded_tok(text, add_special_tokens=False)["input_ids"] == tokenizer(
        text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    diff = relative_diff(got, expected)
    fails = []
    if not same_tokens:
        fails.append("transformers tokenises the probe differently from the GGUF's vocabulary")
    if reloaded_tok.chat_template != tokenizer.chat_template:
        fails.append("the chat template read back from the GGUF differs from the tokenizer's")
    if diff > tol:
        fails.append(f"transformers' logits from the GGUF differ by {diff:.2e} (relative) > {tol:.0e}")
    if fails:
        raise ValueError("; ".join(fails))
    return {"relative_logit_diff": diff, "same_tokens": same_tokens, "same_chat_template": True}


def check_llamacpp(path: Path, model, tokenizer, ids: list[int], expected: np.ndarray, tol: float,
                   prompt_ids: list[int]) -> dict:
    """Run the file in llama.cpp and compare it with the merged model: logits on the probe
    conversation `ids`, greedy answers to its prompt `prompt_ids`."""
    ends = set(end_ids(model, tokenizer))
    llm = llamacpp_check.open_model(path, n_ctx=max(128, len(ids) + GREEDY_TOKENS + 8))
    text = tokenizer.decode(ids)
    llama_tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    same_tokens = llama_tokens == tokenizer(text, add_special_tokens=False)["input_ids"]
    diff = relative_diff(llamacpp_check.next_token_logits(llm, ids), expected)
    llama_greedy = llamacpp_check.greedy(llm, prompt_ids, GREEDY_TOKENS, ends)
    hf_greedy = greedy_hf(model, prompt_ids, GREEDY_TOKENS, ends)
    agree = next((i for i, (a, b) in enumerate(zip(llama_greedy, hf_greedy)) if a != b),
                 min(len(llama_greedy), len(hf_greedy)))
    want = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False, add_generation_prompt=True) \
        if tokenizer.chat_template else None
    jinja = llamacpp_check.render_with_file_template(llm, PROBE_MESSAGES, tokenizer.bos_token or "",
                                                     tokenizer.eos_token or "")
    builtin = llamacpp_check.render_with_builtin_template(llm, PROBE_MESSAGES)
    fails = []
    if not same_tokens:
        fails.append(f"llama.cpp tokenises the probe as {llama_tokens[:12]}..., transformers differently")
    if diff > tol:
        fails.append(f"llama.cpp's logits differ from the merged model's by {diff:.2e} (relative) > {tol:.0e}")
    if jinja != want:
        fails.append(f"the file's chat template renders {jinja!r} in llama.cpp, the tokenizer {want!r}")
    if fails:
        raise ValueError("; ".join(fails))
    return {
        "relative_logit_diff": diff, "same_tokens": same_tokens, "chat_template_renders_same": jinja == want,
        # llama.cpp's C++ formatter (llama-server without --jinja) writes its own rendering of
        # the template's family; recorded, not required (it drops e.g. a default system prompt).
        "builtin_chat_format_renders_same": builtin == want,
        "greedy_tokens": len(hf_greedy), "greedy_tokens_agreeing": agree,
        "greedy_same": llama_greedy == hf_greedy,
    }


def export_gguf(cfg, model, tokenizer, ids: torch.Tensor, expected: torch.Tensor, prompt_ids: list[int],
                record: dict) -> dict:
    """Write, check and place the GGUF folder; `expected` are the merged model's logits on the probe
    conversation `ids`, `prompt_ids` its prompt alone (greedy answers are compared from there)."""
    out = Path(cfg.out)
    name = f"model-{cfg.gguf_type}.gguf"
    plan = gguf_plan(model, tokenizer, end_of_turn_id(tokenizer), name=out.name)  # refuses before writing
    stops = [tokenizer.convert_ids_to_tokens(i) for i in end_ids(model, tokenizer)]
    model_text = ollama.modelfile(name, tokenizer, stops) if cfg.ollama else None
    tol = TOLERANCE[cfg.gguf_type]
    probe, want = ids[0].tolist(), expected[0].numpy()
    with staged_folder(out, MARKER) as (tmp, staged):  # in place only when checked
        staged.update(record)
        record = staged
        print(f"export: writing {name} ({cfg.gguf_type})", file=sys.stderr, flush=True)
        write_gguf(plan, model, tmp / name, cfg.gguf_type)
        record.update(format="gguf", gguf_type=cfg.gguf_type, file=name, tolerance_relative=tol,
                      gguf_pre_tokenizer=plan.vocab.pre, bytes=(tmp / name).stat().st_size)
        record["transformers"] = check_transformers(tmp, name, tokenizer, probe, want, tol)
        if llamacpp_check.available():
            record["llama_cpp"] = check_llamacpp(tmp / name, model, tokenizer, probe, want, tol, prompt_ids)
        else:
            record["llama_cpp"] = None
            print("export: llama-cpp-python is not installed, so the file was checked with transformers' GGUF "
                  "loader only (pip install 'picoalign[llamacpp]' adds the llama.cpp check)", file=sys.stderr)
        if model_text is not None:
            atomic_write_text(tmp / "Modelfile", model_text)
            record["ollama_create"] = f"ollama create {ollama.ollama_name(out.name)} -f {out / 'Modelfile'}"
    checked = record["llama_cpp"] or record["transformers"]
    print(f"export: {cfg.model} -> {out / name}; max |Δlogit| / max |logit| vs the merged model: "
          f"{checked['relative_logit_diff']:.2e} ({'llama.cpp' if record['llama_cpp'] else 'transformers'})",
          file=sys.stderr)
    if "ollama_create" in record:
        print(record["ollama_create"])
    return record
