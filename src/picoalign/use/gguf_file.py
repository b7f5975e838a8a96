"""Write a merged Llama-architecture model and its tokenizer as one GGUF file (llama.cpp's format).

    from picoalign.use.gguf_file import gguf_plan, write_gguf
    plan = gguf_plan(model, tokenizer)         # refuses what llama.cpp could not run, before writing
    write_gguf(plan, model, "out/model.gguf", "q8_0")

The file is written with the `gguf` package's own writer; the names and conventions follow
llama.cpp's converter (convert_hf_to_gguf.py), read for them, not copied:

* tensor names come from gguf's own table (`gguf.get_tensor_name_map`): `token_embd`,
  `blk.N.attn_q`, ..., `output_norm`, `output` (left out when tied to the embedding);
* q and k projections are permuted: transformers' Llama rotates the two halves of each head
  (rotate_half), llama.cpp's rope rotates neighbouring pairs, so each head's rows are
  reordered from [first half, second half] to interleaved pairs;
* the tokenizer is byte-level BPE (`tokenizer.ggml.model = gpt2`): every token string, its type
  (normal, control for special tokens, user-defined for other added tokens, unused for padding
  rows), the merges, the pre-tokenizer name llama.cpp knows it by, BOS/EOS/end-of-turn/pad ids,
  whether BOS is added, and the chat template.

Anything that cannot be expressed that way (another architecture, a SentencePiece or WordPiece
tokenizer, a pre-tokenizer llama.cpp has no name for, rope scaling) raises ValueError naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
GGUF_TYPES = ("f16", "bf16", "q8_0")


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/eot/pad -> id
    add_bos: bool = False


@dataclass
class GGUFPlan:
    """Everything the file will say, decided (and checked) before a byte is written."""

    arch: str
    hparams: dict
    vocab: Vocab
    chat_template: str | None
    name: str


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer, from its structure in tokenizer.json.

    llama.cpp hard-codes one split regex per name; only structures whose regex is known to be
    the same are mapped: GPT-2's ByteLevel regex alone ("gpt-2"), and single digits split before
    it ("smollm", SmolLM's)."""
    def is_byte_level(p: dict) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)

    if pre and is_byte_level(pre):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and is_byte_level(parts[1])):
            return "smollm"
    raise ValueError(f"the tokenizer's pre-tokenizer {json.dumps(pre)} has no llama.cpp equivalent picoalign "
                     "knows (known: GPT-2's ByteLevel regex, and single digits + ByteLevel); GGUF not written")


def gguf_vocab(tokenizer, n_vocab: int, end_of_turn: int | None) -> Vocab:
    """The tokenizer as GGUF's gpt2-style vocabulary; ValueError for what it cannot hold."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no tokenizer.json (fast tokenizer); "
                         "GGUF needs its vocabulary and merges")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "byte-fallback BPE (SentencePiece-style)" if model.get("type") == "BPE" else model.get("type")
        raise ValueError(f"the tokenizer is {kind}; picoalign writes byte-level BPE (gpt2) vocabularies only")
    if spec.get("normalizer") is not None:
        raise ValueError(f"the tokenizer has a normalizer ({spec['normalizer'].get('type')}), which a GGUF "
                         "gpt2 vocabulary cannot express")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"the tokenizer's decoder is {(spec.get('decoder') or {}).get('type')}, not ByteLevel")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))

    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    size = max([n_vocab, *(i + 1 for i in by_id), *(i + 1 for i in added)])
    if size > n_vocab:
        raise ValueError(f"the tokenizer has ids up to {size - 1} but the model's embedding has {n_vocab} rows")
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(3 if added[i]["special"] else 4)  # CONTROL / USER_DEFINED
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(1)  # NORMAL
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED: an embedding row no token maps to
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
               "eot": end_of_turn}
    probe = tokenizer("a")["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    return Vocab(tokens, types, merges, pre, {k: v for k, v in special.items() if v is not None}, add_bos)


def _hparams(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not written to GGUF by picoalign")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
        "head_count": config.num_attention_heads,
        "head_count_kv": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "rope_freq_base": float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        "rms_eps": float(config.rms_norm_eps), "head_dim": head_dim, "vocab_size": config.vocab_size,
        "tied": bool(getattr(config, "tie_word_embeddings", False)),
    }


def gguf_plan(model, tokenizer, end_of_turn: int | None = None, name: str = "") -> GGUFPlan:
    archs = list(getattr(model.config, "architectures", None) or [type(model).__name__])
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"architecture {', '.join(archs)} is not one picoalign writes as GGUF "
                         f"(known: {', '.join(ARCHITECTURES)}); no file written")
    hparams = _hparams(model.config)
    vocab = gguf_vocab(tokenizer, hparams["vocab_size"], end_of_turn)
    return GGUFPlan(arch, hparams, vocab, tokenizer.chat_template, name or Path(model.config.name_or_path).name)


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from transformers' [half 1, half 2] to llama.cpp's adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(plan: GGUFPlan, model):
    """(gguf name, fp32 array) for every weight, in llama.cpp's layout."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, plan.hparams["block_count"])
    hp = plan.hparams
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and hp["tied"]:
            continue  # llama.cpp reads the output layer from token_embd when output is absent
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"weight {hf_name} has no llama.cpp tensor name")
        w = tensor.detach().to(torch.float32).cpu().numpy()
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            w = permute_rope(w, hp["head_count"])
        elif name.endswith(("attn_k.weight", "attn_k.bias")):
            w = permute_rope(w, hp["head_count_kv"])
        yield name, w


def _encode(name: str, w: np.ndarray, gguf_type: str):
    """(array, raw type) for the writer: 1-D tensors (norms, biases) stay f32, as llama.cpp keeps
    them; q8_0 needs rows in blocks of 32 values, a tensor whose rows are not falls back to f16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if w.ndim == 1:
        return w, None
    if gguf_type == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0
    if gguf_type == "bf16":
        return gguf.quants.quantize(w, Q.BF16), Q.BF16
    return w.astype(np.float16), None


def write_gguf(plan: GGUFPlan, model, path: str | Path, gguf_type: str) -> None:
    """Write the file at `path` (the caller writes into a temporary folder and renames it)."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}; got {gguf_type!r}")
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    hp, vocab = plan.hparams, plan.vocab
    w = gguf.GGUFWriter(str(path), plan.arch)
    w.add_name(plan.name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(hp["context_length"])
    w.add_embedding_length(hp["embedding_length"])
    w.add_block_count(hp["block_count"])
    w.add_feed_forward_length(hp["feed_forward_length"])
    w.add_head_count(hp["head_count"])
    w.add_head_count_kv(hp["head_count_kv"])
    w.add_rope_freq_base(hp["rope_freq_base"])
    w.add_layer_norm_rms_eps(hp["rms_eps"])
    w.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] * hp["head_count"] != hp["embedding_length"]:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_vocab_size(hp["vocab_size"])

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "eot": w.add_eot_token_id,
              "pad": w.add_pad_token_id}
    for key, token_id in vocab.special.items():
        adders[key](token_id)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(False)
    if plan.chat_template:
        w.add_chat_template(plan.chat_template)

    for name, array in gguf_tensors(plan, model):
        data, raw = _encode(name, array, gguf_type)
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
