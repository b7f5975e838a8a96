"""The pico path: tokenizer training, the tiny Llama, pretraining (with resume), SFT on top, CLI.

Everything is microscopic and offline: the tokenizer (400 tokens) is trained on the `data_dir`
fixture's texts, models are 1-2 blocks of width 32 (context 512: an SFT prompt is ~280 of these
tokens), pretraining rows are 64 tokens, runs take 2-5 steps on CPU in fp32.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

from picoalign.cli import main
from picoalign.config import (
    ConfigError,
    LoraConfig,
    PicoConfig,
    PretrainConfig,
    SFTConfig,
    TokenizerConfig,
)
from picoalign.io import read_jsonl_lenient
from picoalign.models.load import load_model, read_marker
from picoalign.models.pico import init_model, llama_config, n_params, parse_spec
from picoalign.models.tokenizer import SPECIAL_TOKENS, read_text_documents, train_tokenizer
from picoalign.pipeline import resolve_configs
from picoalign.train.batching import forward_logps, render_answer, render_prompt
from picoalign.train.losses import masked_lm_loss
from picoalign.train.pretrain import lm_batch, pretrain, token_rows, unigram_entropy
from picoalign.train.sft import sft
from picoalign.train.stage import save_model

TINY = "pico:d_model=32,n_layers=1,n_heads=4,n_kv_heads=2,max_length=512"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("pico") / "tokenizer"
    return train_tokenizer(TokenizerConfig(data=str(data_dir), out=str(out), vocab_size=400))


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def pretrain_cfg(out: Path, data: Path, tok_dir: Path, **changes) -> PretrainConfig:
    settings = dict(data=str(data), out=str(out), tokenizer=str(tok_dir), model=TINY, device="cpu", dtype="fp32",
                    seed=0, max_length=64, batch_size=2, max_steps=3, epochs=0, warmup_steps=0,
                    schedule="constant", lr=1e-2, tensorboard=False, progress=False)
    return PretrainConfig(**{**settings, **changes})


def train_log(folder: Path, name: str) -> list[dict]:
    return [r for r in read_jsonl_lenient(folder / "logs" / f"{name}.jsonl") if r["kind"] == "train"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir, tok_dir) -> Path:
    out = tmp_path_factory.mktemp("pico") / "base"
    pretrain(pretrain_cfg(out, data_dir, tok_dir))
    return out


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_text_and_special_tokens(tok):
    text = "The cellar door creaked.\n\n  Ünïcödé, tabs\tand 🙂 survive byte-level BPE."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2, 3, 4]
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok(f"a{special}b", add_special_tokens=False)["input_ids"][1] == i  # one id, never split
        assert tok.decode([i]) == special
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|end|>", "<|pad|>")
    assert tok("plain text")["input_ids"] == tok("plain text", add_special_tokens=False)["input_ids"]


def test_chat_template_and_render_answer_end_with_end_of_turn(tok):
    messages = [{"role": "user", "content": "Tell a story."}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|endoftext|><|user|>\nTell a story.<|end|>\n<|assistant|>\n")
    prompt = render_prompt(tok, "Tell a story.")
    answer = render_answer(tok, "Tell a story.", "It was dark.")
    assert prompt[:2] == [0, 1] and tok.decode(prompt[-2:]) == "<|assistant|>\n"
    assert tok.decode(answer) == "It was dark.<|end|>\n"
    assert answer.count(tok.eos_token_id) == 1  # the template's own end of turn: nothing appended


def test_text_files_hold_one_document_per_line_or_per_paragraph(tmp_path):
    (tmp_path / "lines.txt").write_text("one\ntwo\n\n")
    (tmp_path / "paras.txt").write_text("a\nstill a\n\nb\n")
    assert read_text_documents(tmp_path / "lines.txt") == ["one", "two"]
    assert read_text_documents(tmp_path / "paras.txt") == ["a\nstill a", "b"]


# ---------------------------------------------------------------- model


def test_pico_config_is_a_small_llama_with_the_hand_counted_size():
    """V=400, D=32, 2 blocks, 4 heads of 8, 2 kv heads, F=96, tied embeddings:
    embedding 400·32 = 12800; per block q,o 2·32·32 = 2048, k,v 2·32·16 = 1024, MLP 3·32·96 = 9216,
    2 norms 64 -> 12352; final norm 32. Total 12800 + 2·12352 + 32 = 37536."""
    from transformers import LlamaForCausalLM

    cfg = PicoConfig(vocab_size=400, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_length=64)
    model = LlamaForCausalLM(llama_config(cfg))
    assert n_params(model) == 37536
    assert model.lm_head.weight is model.model.embed_tokens.weight
    logits = model(input_ids=torch.randint(0, 400, (2, 16))).logits
    assert logits.shape == (2, 16, 400)
    assert PicoConfig(d_model=256).d_ff == 704  # 8/3 · 256 = 682.7, rounded up to 64


def test_pico_config_rejects_impossible_shapes():
    with pytest.raises(ConfigError, match="n_heads"):
        PicoConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        PicoConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match="vocab_size"):
        llama_config(PicoConfig())
    with pytest.raises(ConfigError, match="lora"):
        PretrainConfig(model="", lora=LoraConfig(enabled=True))
    assert parse_spec("pico:d_model=64,n_layers=3").n_layers == 3
    assert parse_spec("pico:", PicoConfig(d_model=64)).d_model == 64


def test_loss_falls_on_a_repeated_batch(tok):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(parse_spec(TINY.replace("n_layers=1", "n_layers=2"), PicoConfig(vocab_size=len(tok)))))
    batch = lm_batch([tok("The lantern went out in the cellar and nobody spoke.")["input_ids"]] * 2, tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = masked_lm_loss(forward_logps(model, batch))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(len(tok)), abs=0.3)  # a fresh model is near uniform
    assert losses[-1] < 0.3 * losses[0]


def test_saved_model_loads_with_the_same_logits(tmp_path, tok_dir):
    from transformers import AutoModelForCausalLM

    folder = init_model(parse_spec(TINY), tok_dir, tmp_path / "init", seed=3)
    model, tokenizer = load_model(str(folder))
    plain = AutoModelForCausalLM.from_pretrained(str(folder))
    ids = torch.tensor([render_prompt(tokenizer, "Hello there.")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits)
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, 0]  # end of turn, end of text
    assert tokenizer.model_max_length == 512 and tokenizer.chat_template
    # Change the weights, save the picoalign way, load: identical logits (tied embedding included).
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.1)
    save_model(model, tokenizer, tmp_path / "changed")
    again, _ = load_model(str(tmp_path / "changed"))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


# ---------------------------------------------------------------- pretraining


def test_rows_predict_every_token_of_the_stream_once(tok):
    """Two documents a, b give the stream [eot, a..., eot, b...]; rows of 8 overlap by one token,
    so their targets (all but each row's first token) are exactly the stream without its first."""
    docs = ["The well was dry.", "A lamp burned in the attic window all night."]
    a, b = (tok(d)["input_ids"] for d in docs)
    rows = token_rows(tok, docs, 8, seed=0)
    targets = [t for r in rows for t in r[1:]]
    stream = [0, *a, 0, *b] if targets[:len(a)] == a else [0, *b, 0, *a]  # the documents are shuffled
    assert all(len(r) <= 8 for r in rows) and targets == stream[1:]
    batch = lm_batch(rows, tok.pad_token_id)
    assert batch.labels.tolist() == stream[1:] and batch.keep.sum() == len(stream) - 1
    assert batch.dense_mask() is None and batch.n_seqs == len(rows)


def test_unigram_entropy_by_hand(tok):
    """Targets [5, 5, 6, 7]: p = 1/2, 1/4, 1/4, H = 1.5 bits = 1.5 · ln 2 = 1.039721 nats."""
    batch = lm_batch([[9, 5, 5, 6, 7]], tok.pad_token_id)
    assert unigram_entropy([batch], len(tok)) == pytest.approx(1.5 * math.log(2))


def test_pretrain_learns_and_resume_continues_the_same_curve(tmp_path, data_dir, tok_dir, pretrained):
    rows = train_log(pretrained, "pretrain")
    assert [r["step"] for r in rows] == [1, 2, 3]
    marker = read_marker(pretrained)
    assert marker["complete"] and marker["unigram_entropy"] > 0 and marker["last_eval"]["val/loss"] > 0
    assert (pretrained / "config.json").exists() and (pretrained / "tokenizer.json").exists()
    # Continue the same run to step 5; a straight 5-step run gives the same losses.
    resumed = tmp_path / "resumed"
    shutil.copytree(pretrained, resumed)
    pretrain(pretrain_cfg(resumed, data_dir, tok_dir, max_steps=5, resume=True))
    straight = tmp_path / "straight"
    pretrain(pretrain_cfg(straight, data_dir, tok_dir, max_steps=5))
    steps = train_log(resumed, "pretrain")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in train_log(straight, "pretrain")], abs=1e-5)
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_sft_runs_on_the_pretrained_model_unchanged(tmp_path, data_dir, pretrained):
    out = tmp_path / "sft"
    summary = sft(SFTConfig(data=str(data_dir), model=str(pretrained), out=str(out), device="cpu", dtype="fp32",
                            lora=LoraConfig(enabled=False), max_steps=2, epochs=0, max_length=400, batch_size=2,
                            warmup_steps=0, monitor_pairs=2, tensorboard=False, progress=False))
    assert summary["complete"] and summary["steps"] == 2
    assert read_marker(out)["base_model"] == str(pretrained.resolve())
    model, tokenizer = load_model(str(out))
    assert tokenizer.eos_token == "<|end|>" and model.config.tie_word_embeddings


# ---------------------------------------------------------------- CLI and pipeline


def test_cli_trains_a_tokenizer_and_pretrains(tmp_path, data_dir):
    corpus = tmp_path / "stories.txt"
    corpus.write_text("\n".join(d.replace("\n", " ") for d in (data_dir / "sft_train.jsonl").read_text().splitlines()))
    assert main(["tokenizer", "--corpus", str(corpus), "--vocab-size", "320", "--out", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    args = ["pretrain", "--data", str(data_dir), "--out", str(tmp_path / "base"), "--tokenizer", str(tmp_path / "tok"),
            "--model", TINY, "--max-steps", "2", "--epochs", "0", "--max-length", "64", "--batch-size", "2",
            "--device", "cpu", "--dtype", "fp32", "--tensorboard", "false", "--progress", "false"]
    assert main(args) == 0
    assert read_marker(tmp_path / "base")["steps"] == 2
    assert main(["pretrain", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")]) == 1


def test_pipeline_pretrains_the_base_that_sft_starts_from(tmp_path):
    c = resolve_configs(None, {"tag": "p", "runs_dir": str(tmp_path), "stages": "data,tokenizer,pretrain,sft"},
                        environ={})
    root = tmp_path / "p"
    assert c["tokenizer"].out == str(root / "tokenizer") and c["pretrain"].tokenizer == str(root / "tokenizer")
    assert c["pretrain"].out == str(root / "checkpoints" / "base") and c["pretrain"].logs == str(root / "logs")
    assert c["sft"].model == str(root / "checkpoints" / "base")
    assert resolve_configs(None, {"tag": "q", "runs_dir": str(tmp_path)}, environ={})["sft"].model == c["run"].model


def test_the_pico_preset_resolves(tmp_path):
    preset = str(resources.files("picoalign") / "configs" / "pico.yaml")
    c = resolve_configs(preset, {"tag": "p", "runs_dir": str(tmp_path)}, environ={})
    assert c["run"].stages.split(",") == ["data", "tokenizer", "pretrain", "sft", "dpo", "eval", "report"]
    assert not c["sft"].lora.enabled and not c["dpo"].lora.enabled and c["pretrain"].model == ""
    assert c["pretrain"].pico.d_model == 256 and c["pretrain"].max_length <= c["pretrain"].pico.max_length


def test_help_names_the_new_flags_and_environment_variables(capsys):
    for stage, names in (("tokenizer", ("--corpus", "--vocab-size", "--out", "TOKENIZER_VOCAB_SIZE")),
                         ("pretrain", ("--corpus", "--dataset", "--tokenizer", "--max-seconds", "PRETRAIN_MAX_SECONDS",
                                       "PRETRAIN_MAX_STEPS"))):
        with pytest.raises(SystemExit) as info:
            main([stage, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert all(n in text for n in names), stage


@pytest.mark.parametrize("stage", ["tokenizer", "pretrain"])
def test_help_imports_no_heavy_library(stage):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "picoalign", stage, "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    names = {m.group(1).split(".")[0] for m in re.finditer(r"\|\s+([\w.]+)\s*$", done.stderr, re.M)}
    assert "picoalign" in names and not names & {"torch", "transformers", "tokenizers", "datasets"}
