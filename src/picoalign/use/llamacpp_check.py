"""Run an exported GGUF file in llama.cpp itself (through llama-cpp-python) and compare it with
the model it came from: tokens, next-token logits, a greedy continuation, the chat template.

llama-cpp-python compiles llama.cpp, so it is an optional extra (`pip install picoalign[llamacpp]`,
built generic: see README). Without it `available()` is false and the export says the file was
checked by transformers' GGUF loader only.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def open_model(path: str | Path, n_ctx: int):
    from llama_cpp import Llama

    # One thread: the files checked here are small, and the result must not depend on the machine.
    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=1, n_threads_batch=1,
                 seed=0, verbose=False)


def next_token_logits(llm, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) logits, one row per position, as llama.cpp computes them."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm, ids: list[int], n_new: int, ends: set[int]) -> list[int]:
    """Argmax continuation, one token at a time (no sampler in between, so nothing but the
    model's logits decides)."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n_new):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token in ends:
            break
        llm.eval([token])
    return out


def render_with_file_template(llm, messages: list[dict], bos: str, eos: str) -> str | None:
    """The prompt the file's own chat template renders (what llama-cpp-python's chat completion
    uses), or None when the file has none."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    return Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)(messages=messages).prompt


def render_with_builtin_template(llm, messages: list[dict]) -> str | None:
    """The prompt llama.cpp's C++ chat formatter renders (llama-server without --jinja): it
    recognises the template's family (ChatML, ...) and writes that family's format."""
    import llama_cpp

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages])
    size = 4096
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages), True, buf, size)
        if n < 0:
            return None  # a template family llama.cpp does not know
        if n <= size:
            return buf.raw[:n].decode("utf-8")
        size = n
