"""The pico model: a tiny GPT trained from scratch, expressed as a small Llama configuration.

    from picoalign.models.pico import PicoConfig, init_model
    from picoalign.models.load import load_model
    folder = init_model(PicoConfig(d_model=256, n_layers=4, n_heads=4), "runs/x/tokenizer", "runs/x/init", seed=0)
    model, tokenizer = load_model(str(folder))       # or AutoModelForCausalLM.from_pretrained(folder)

`PicoConfig` (defined with the other typed configs in picoalign.config, so that it is the
`pretrain.pico` section of a YAML file and `--set pico.d_model=...` works) maps to a
`transformers.LlamaConfig` with `llama_config` below. The dependency runs one way, model on
config: config.py knows nothing of the model.

The architecture is the one nanoGPT's successors converged on: token embedding -> n_layers x
[RMSNorm -> causal self-attention with rotary positions (SDPA, optional grouped-query) -> add,
RMSNorm -> SwiGLU MLP -> add] -> RMSNorm -> output layer tied to the embedding.

Why a `LlamaConfig` and not our own nn.Module: `transformers` already implements exactly this
block, so the whole "model file" is the mapping below (smallest code, nothing of ours to
debug). And the result is an ordinary Llama checkpoint, so it works unchanged everywhere a
real model does: our SFT/DPO (packed rows with custom attention masks, `logits_to_keep`),
eval and generation (`generate`, KV cache), LoRA through peft, and outside tools that know
Llama: lm-eval, vLLM, the llama.cpp GGUF converter (which knows the architecture; a new BPE
tokenizer may need its pre-tokenizer registered there). An own module would need its own
forward signature, cache, save/load and converters for each of those.

Shapes (B batch, L length, D d_model, H heads, V vocab): ids (B, L) -> embed (B, L, D) ->
blocks (B, L, D), attention over H heads of D/H with rotary angles on q and k -> norm ->
logits (B, L, V).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from picoalign.config import ConfigError, PicoConfig, load_config

__all__ = ["PicoConfig", "init_model", "llama_config", "parse_spec", "n_params"]


def llama_config(cfg: PicoConfig, **token_ids):
    """The `LlamaConfig` of `cfg`; `token_ids` sets bos/eos/pad_token_id."""
    from transformers import LlamaConfig

    if cfg.vocab_size < 1:
        raise ConfigError("pico: vocab_size is not set (init_model takes it from the tokenizer)")
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_length,
        hidden_act="silu",  # SwiGLU: down(silu(gate(x)) * up(x))
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.02,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa",
        **token_ids,
    )


def parse_spec(spec: str, base: PicoConfig | None = None) -> PicoConfig:
    """`pico:` or `pico:d_model=128,n_layers=2` -> a PicoConfig (fields of `base` as defaults)."""
    values = dataclasses.asdict(base or PicoConfig())
    body = spec.split(":", 1)[1] if spec.startswith("pico:") else ""
    for item in [i.strip() for i in body.split(",") if i.strip()]:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"model spec {spec!r}: expected pico:key=value,...")
        values[key.strip()] = value.strip()
    return load_config(PicoConfig, overrides=values, environ={}, name="pico")


def n_params(model) -> int:
    """Parameters, a tied embedding counted once."""
    return sum(p.numel() for p in model.parameters())


def init_model(cfg: PicoConfig, tokenizer_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """A freshly initialised pico model saved as an HF folder (model, tokenizer, generation config)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if cfg.vocab_size and cfg.vocab_size < len(tokenizer):
        raise ConfigError(f"pico: vocab_size={cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or len(tokenizer))
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(cfg, **ids))
    # Generation stops at the end of a turn (chat) or of a document (plain text).
    stops = [i for i in dict.fromkeys([tokenizer.eos_token_id, endoftext]) if i is not None]
    model.generation_config = GenerationConfig(bos_token_id=ids["bos_token_id"], eos_token_id=stops,
                                               pad_token_id=ids["pad_token_id"])
    tokenizer.model_max_length = cfg.max_length
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
