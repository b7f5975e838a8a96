"""Shared fixtures: a tiny random Llama with two offline tokenizers, and a tiny data folder.

Everything is built in a session tmp dir, without network or hub:

* a byte-level BPE (1024 tokens) trained on a few hundred lines of generated story text,
  with the special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` and `<s>`;
* `chat_model`: a LlamaForCausalLM (hidden 32, 2 layers, 4 heads, 2 kv heads) saved with that
  tokenizer and a ChatML template (SmolLM2's: every turn is `<|im_start|>role\\n...<|im_end|>\\n`),
  eos = pad = `<|im_end|>`;
* `plain_model`: the same weights with a tokenizer without a chat template that prepends BOS
  `<s>`, eos = pad = `<|endoftext|>`;
* `data_dir`: `picoalign data` output with 8/4/4 SFT rows and 8/4/4 preference pairs.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]

torch.set_num_threads(1)  # tiny models: threads only fight over the 2 shared cores
# The variables that point picoalign at an LLM API (provider auto would use them).
LLM_ENV = ("DEEPSEEK_API_KEY", "DEEPSEEK_BASE_URL", "DEEPSEEK_MODEL", "OPENAI_API_KEY", "OPENAI_BASE_URL",
           "OPENAI_MODEL", "OPENROUTER_API_KEY", "OPENROUTER_BASE_URL", "OPENROUTER_MODEL", "LLM_API_KEY",
           "LLM_BASE_URL", "LLM_MODEL", "DATA_PROVIDER", "EVAL_JUDGE_PROVIDER", "JUDGE_MODEL", "ANSWER_MODELS")


@pytest.fixture(scope="session", autouse=True)
def fluency_by_the_base_model():
    """Eval's fluency judge scores with the run's own (tiny) base model, not the packaged Gemma 3
    270M a developer machine may have installed (1 GB, a 262k-word vocabulary): tests stay fast
    and do not depend on what is installed. test_eval checks the choice itself."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVAL_FLUENCY_MODEL", "base")
        yield


@pytest.fixture(scope="session", autouse=True)
def no_llm_api():
    """No test reaches a real LLM API: the machine's keys and endpoints are hidden for the session."""
    with pytest.MonkeyPatch.context() as mp:
        for name in LLM_ENV:
            mp.delenv(name, raising=False)
        yield


def _corpus(n_specs: int = 40) -> list[str]:
    """A few hundred lines of the same kind of text the tests tokenise (so sequences stay short)."""
    from picoalign.data import stories

    rng = random.Random(0)
    lines = ["Hello there.", "What is the capital of France?", "Paris is the capital of France."]
    for _ in range(n_specs):
        spec = stories.random_spec(rng)
        chosen, rejected, _ = stories.story_pair(spec, rng)
        for text in (stories.format_prompt(spec), stories.write_story(spec, rng), chosen, rejected):
            lines += text.split("\n")
    return lines


def _bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def make_tokenizers():
    """(chat, plain) `PreTrainedTokenizerFast`s sharing one vocabulary."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = _bpe()
    chat = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>")
    chat.chat_template = CHATML
    with_bos = Tokenizer.from_str(bpe.to_str())
    bos_id = bpe.token_to_id("<s>")
    with_bos.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)]
    )
    plain = PreTrainedTokenizerFast(
        tokenizer_object=with_bos, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    return chat, plain


def make_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    # A slightly larger init than the default 0.02 so the random model's outputs depend on the input.
    config.initializer_range = 0.2
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tokenizers():
    return make_tokenizers()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizers) -> dict[str, Path]:
    chat, plain = tokenizers
    root = tmp_path_factory.mktemp("models")
    model = make_model(len(chat))
    out = {}
    for name, tok in (("chat", chat), ("plain", plain)):
        folder = root / name
        model.config.eos_token_id = tok.eos_token_id
        model.config.pad_token_id = tok.pad_token_id
        model.config.bos_token_id = tok.bos_token_id
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[name] = folder
    return out


@pytest.fixture(scope="session")
def chat_model(model_dirs) -> Path:
    """Folder of the tiny Llama with the ChatML tokenizer."""
    return model_dirs["chat"]


@pytest.fixture(scope="session")
def plain_model(model_dirs) -> Path:
    """Folder of the tiny Llama with the plain (no chat template, BOS-adding) tokenizer."""
    return model_dirs["plain"]


@pytest.fixture(scope="session")
def chat_tokenizer(chat_model):
    from picoalign.models.load import load_tokenizer

    return load_tokenizer(str(chat_model))


@pytest.fixture(scope="session")
def plain_tokenizer(plain_model):
    from picoalign.models.load import load_tokenizer

    return load_tokenizer(str(plain_model))


@pytest.fixture(scope="session")
def tiny_llama(chat_model):
    """The tiny model itself, fp32, eval mode (shared: tests must not modify it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(chat_model), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    from picoalign.config import DataConfig
    from picoalign.data.make import make_data

    out = tmp_path_factory.mktemp("data")
    make_data(DataConfig(out=str(out), n_sft_train=8, n_sft_val=4, n_sft_test=4,
                         n_dpo_train=8, n_dpo_val=4, n_dpo_test=4))
    return out
