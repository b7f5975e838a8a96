"""`picoalign export --format gguf` (+ --ollama): the file's layout and metadata, transformers'
GGUF loader reading it back, llama.cpp running it (where llama-cpp-python is installed: CI
installs it), the Modelfile, and the refusals that leave no file behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import save_random_adapter

from picoalign.cli import main
from picoalign.config import ExportConfig
from picoalign.io import read_json
from picoalign.use import llamacpp_check
from picoalign.use.export import export
from picoalign.use.gguf_file import gguf_vocab, permute_rope
from picoalign.use.ollama import chatml_default_system, go_template, modelfile

needs_llamacpp = pytest.mark.skipif(
    not llamacpp_check.available(),
    reason="llama-cpp-python is not installed (pip install 'picoalign[llamacpp]'; CI installs it)")


@pytest.fixture(scope="module")
def adapter_dir(chat_model, tmp_path_factory):
    """A LoRA adapter with random (non-zero) B on the tiny chat Llama, so merging matters."""
    return save_random_adapter(chat_model, tmp_path_factory.mktemp("gguf_adapter"), ["q_proj", "k_proj", "down_proj"])


@pytest.fixture(scope="module")
def exports(adapter_dir, tmp_path_factory) -> dict:
    """The adapter exported once per GGUF type (the checks run inside export)."""
    root = tmp_path_factory.mktemp("gguf_out")
    return {t: export(ExportConfig(model=str(adapter_dir), out=str(root / t), format="gguf", gguf_type=t,
                                   ollama=True)) | {"folder": root / t} for t in ("f16", "bf16", "q8_0")}


def test_permute_rope_interleaves_each_heads_halves():
    """transformers rotates row i with row i + d/2 of a head, llama.cpp rows 2i with 2i + 1: for
    two heads of d = 4 rows [a0 a1 a2 a3 | b0 b1 b2 b3] become [a0 a2 a1 a3 | b0 b2 b1 b3]."""
    w = np.arange(8, dtype=np.float32).reshape(8, 1) * np.ones((1, 3), dtype=np.float32)
    assert permute_rope(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert permute_rope(w, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_gguf_file_holds_llama_names_types_and_the_tokenizer(exports, chat_tokenizer):
    from gguf import GGUFReader

    q8 = exports["q8_0"]
    reader = GGUFReader(q8["folder"] / "model-q8_0.gguf")
    fields = {k: v.contents() for k, v in reader.fields.items()}
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.block_count"], fields["llama.embedding_length"], fields["llama.attention.head_count"],
            fields["llama.attention.head_count_kv"], fields["llama.rope.dimension_count"]) == (2, 32, 4, 2, 8)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == im_end and fields["tokenizer.ggml.eot_token_id"] == im_end
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == chat_tokenizer.chat_template
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(chat_tokenizer) == 1024
    assert tokens[im_end] == "<|im_end|>" and types[im_end] == 3  # special: CONTROL
    assert tokens[chat_tokenizer.convert_tokens_to_ids("Ġthe")] == "Ġthe"
    merges = json.loads(chat_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"][:3] == [" ".join(m) for m in merges[:3]]
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert len(kinds) == 2 + 2 * 9 + 1  # embedding, output norm, 9 per block, untied output
    assert kinds["token_embd.weight"] == kinds["blk.1.attn_q.weight"] == kinds["output.weight"] == "Q8_0"
    assert kinds["blk.0.attn_norm.weight"] == kinds["output_norm.weight"] == "F32"
    assert {t.name: t.tensor_type.name for t in GGUFReader(exports["bf16"]["folder"] / "model-bf16.gguf").tensors
            }["blk.0.ffn_down.weight"] == "BF16"


def test_transformers_reads_the_file_back_within_each_types_tolerance(exports):
    """Tolerances are relative to the probe's largest |logit|: f16 ~1e-3 measured, bf16 ~1e-2,
    q8_0 ~7e-2 on this random model; each recorded figure is under its bound, and the coarser
    type is further off."""
    diffs = {t: r["transformers"]["relative_logit_diff"] for t, r in exports.items()}
    for t, r in exports.items():
        record = read_json(r["folder"] / "picoalign.json")
        assert record["transformers"] == r["transformers"] and record["merged_adapter"]
        assert 0 < diffs[t] <= record["tolerance_relative"]
        assert r["transformers"]["same_tokens"] and r["transformers"]["same_chat_template"]
    assert diffs["f16"] < diffs["bf16"] < diffs["q8_0"]


def test_the_modelfile_turns_chatml_into_an_ollama_template(exports, capsys):
    folder = exports["q8_0"]["folder"]
    assert (folder / "Modelfile").read_text() == (
        "FROM ./model-q8_0.gguf\n"
        'TEMPLATE """{{- range $i, $m := .Messages }}<|im_start|>{{ $m.Role }}\n'
        '{{ $m.Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"""\n'
        'PARAMETER stop "<|im_end|>"\n')
    assert exports["q8_0"]["ollama_create"] == f"ollama create q8_0 -f {folder / 'Modelfile'}"


def test_a_default_system_message_becomes_a_branch_of_the_go_template(chat_tokenizer):
    """SmolLM2's template adds a system turn when the conversation has none."""
    import copy

    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are kind.<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    assert chatml_default_system(tok) == "You are kind."
    assert go_template("You are kind.") == (
        '{{- range $i, $m := .Messages }}{{ if and (eq $i 0) (ne $m.Role "system") }}<|im_start|>system\n'
        "You are kind.<|im_end|>\n{{ end }}<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n")
    tok.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    with pytest.raises(ValueError, match="the chat template is not ChatML-style"):
        modelfile("m.gguf", tok, ["</s>"])


def test_an_unknown_architecture_is_refused_and_nothing_is_left(chat_tokenizer, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(chat_tokenizer), n_embd=16, n_layer=1, n_head=2)).save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["export", "--model", str(folder), "--out", str(out), "--format", "gguf"]) == 1
    assert "architecture GPT2LMHeadModel is not one picoalign writes as GGUF (known: LlamaForCausalLM" in \
        capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_a_tokenizer_gguf_cannot_express_is_refused_naming_what(chat_model, tmp_path, capsys):
    """A Whitespace pre-tokenizer has no llama.cpp name; a normalizer has no place in the file."""
    from tokenizers import normalizers, pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_model))
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match=r'pre-tokenizer \{"type": "Whitespace"\} has no llama.cpp equivalent'):
        gguf_vocab(tok, 1024, None)
    tok = AutoTokenizer.from_pretrained(str(chat_model))
    tok.backend_tokenizer.normalizer = normalizers.NFKC()
    with pytest.raises(ValueError, match=r"has a normalizer \(NFKC\)"):
        gguf_vocab(tok, 1024, None)
    with pytest.raises(ValueError, match="ids up to 1023 but the model's embedding has 1000 rows"):
        gguf_vocab(AutoTokenizer.from_pretrained(str(chat_model)), 1000, None)

    model = tmp_path / "model"
    import shutil

    shutil.copytree(chat_model, model)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    assert main(["export", "--model", str(model), "--out", str(tmp_path / "out"), "--format", "gguf"]) == 1
    assert "GGUF not written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@needs_llamacpp
def test_llama_cpp_runs_the_file_like_the_merged_model(exports):
    for t, r in exports.items():
        got = r["llama_cpp"]
        assert got == read_json(r["folder"] / "picoalign.json")["llama_cpp"]
        assert got["same_tokens"] and got["chat_template_renders_same"], t
        assert 0 < got["relative_logit_diff"] <= r["tolerance_relative"], t
        assert got["greedy_tokens"] >= 1
        assert got["builtin_chat_format_renders_same"]  # plain ChatML: llama.cpp's own formatter agrees
    assert exports["f16"]["llama_cpp"]["greedy_same"]  # f16: the continuation itself is the same
    assert exports["f16"]["llama_cpp"]["relative_logit_diff"] < exports["q8_0"]["llama_cpp"]["relative_logit_diff"]


@needs_llamacpp
def test_llama_cpp_chat_completion_ends_at_end_of_turn(exports):
    """The generic build's first chat completion (a native build crashed here with SIGILL on AMX)."""
    llm = llamacpp_check.open_model(exports["q8_0"]["folder"] / "model-q8_0.gguf", n_ctx=256)
    reply = llm.create_chat_completion([{"role": "user", "content": "Hello there."}], max_tokens=8,
                                       temperature=0.0, seed=0)
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert "<|im_end|>" not in choice["message"]["content"]


def test_a_tied_model_with_a_bos_adding_tokenizer(plain_tokenizer, tmp_path):
    """The pico model's shape: output tied to the embedding (no output tensor in the file: llama.cpp
    reuses token_embd), and a tokenizer that prepends BOS (add_bos_token true, its id recorded)."""
    from gguf import GGUFReader
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(plain_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=plain_tokenizer.bos_token_id, eos_token_id=plain_tokenizer.eos_token_id)
    config.initializer_range = 0.2
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    plain_tokenizer.save_pretrained(tmp_path / "tied")
    record = export(ExportConfig(model=str(tmp_path / "tied"), out=str(tmp_path / "out"), format="gguf"))
    assert record["transformers"]["relative_logit_diff"] < 1e-2 and not record["merged_adapter"]
    reader = GGUFReader(tmp_path / "out" / "model-f16.gguf")
    fields = {k: v.contents() for k, v in reader.fields.items()}
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.bos_token_id"] == plain_tokenizer.convert_tokens_to_ids("<s>")
    assert "tokenizer.chat_template" not in fields
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    assert not (tmp_path / "out" / "Modelfile").exists()
