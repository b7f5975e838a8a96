"""`picoalign tokenizer`: train a byte-level BPE tokenizer (with a chat template) for the pico model.

    picoalign tokenizer --corpus stories.txt,more/*.txt --vocab-size 4096 --out runs/x/tokenizer
    picoalign tokenizer --data runs/x/data --out runs/x/tokenizer   # on a data folder's texts

A text file holds one document per line, or documents separated by blank lines when it has
any. Without `--corpus`, the documents are the training split of a data folder: the SFT
prompts and responses and the preference answers. The result is an ordinary Hugging Face
tokenizer folder (`AutoTokenizer.from_pretrained(DIR)` loads it) with these special tokens:

    <|endoftext|>  separates documents in pretraining; bos (each chat starts with it)
    <|user|> <|assistant|>  open a turn;  <|end|>  closes one: eos, where generation stops
    <|pad|>        padding (masked out by the attention mask, never trained)

and a chat template in which a turn is `<|role|>\\n{content}<|end|>\\n`; the generation prompt
is `<|assistant|>\\n`. So the assistant turn picoalign trains on (`render_answer`) is
`{answer}<|end|>\\n`: it contains eos, which is trained and ends generation.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from picoalign.config import TokenizerConfig
from picoalign.lock import carry_lock

ENDOFTEXT, USER, ASSISTANT, END, PAD = "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, USER, ASSISTANT, END, PAD]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# ---------------------------------------------------------------- documents


def corpus_files(corpus: str) -> list[Path]:
    """The files of a comma-separated list of paths and globs; a pattern that matches nothing raises."""
    files = []
    for item in [c.strip() for c in corpus.split(",") if c.strip()]:
        matches = sorted(glob.glob(os.path.expanduser(item))) if any(c in item for c in "*?[") else [item]
        if not matches or not all(Path(m).is_file() for m in matches):
            raise FileNotFoundError(f"corpus file not found: {item}")
        files += [Path(m) for m in matches]
    return files


def read_text_documents(path: str | Path) -> list[str]:
    """Documents of a text file: blank-line separated paragraphs if it has blank lines, else lines."""
    text = Path(path).read_text(encoding="utf-8").replace("\r\n", "\n")
    parts = text.split("\n\n") if "\n\n" in text.strip() else text.split("\n")
    return [p.strip() for p in parts if p.strip()]


def data_documents(data: str | Path, prompts: bool = True) -> list[str]:
    """Texts of a data folder's training split: SFT (prompts and) responses, preference answers."""
    from picoalign.data.formats import read_preferences, read_sft

    data = Path(data)
    docs: list[str] = []
    if (data / "sft_train.jsonl").exists():
        for row in read_sft(data / "sft_train.jsonl", allow_empty=True):
            if row.get("messages"):
                docs += [m["content"] for m in row["messages"] if prompts or m["role"] == "assistant"]
            else:
                docs += ([_text(row["prompt"])] if prompts else []) + [row["response"]]
    if (data / "dpo_train.jsonl").exists():
        for row in read_preferences(data / "dpo_train.jsonl", allow_empty=True):
            docs += [row["chosen"], row["rejected"]]
    return [d for d in docs if d.strip()]


def _text(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def documents(corpus: str, data: str | Path, prompts: bool = True) -> list[str]:
    """The corpus files' documents, or (no corpus) the data folder's; raises when there are none."""
    if corpus:
        docs = [d for f in corpus_files(corpus) for d in read_text_documents(f)]
        where = corpus
    else:
        docs = data_documents(data, prompts)
        where = f"{data} (sft_train.jsonl, dpo_train.jsonl)"
    if not docs:
        raise ValueError(f"no text to train on in {where}")
    return docs


# ---------------------------------------------------------------- training


def train_bpe(docs: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE (`tokenizers.Tokenizer`) trained on `docs`; the special tokens get ids 0-4."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    return tok


def wrap(tok):
    """The `transformers` tokenizer around a trained BPE: special tokens and chat template set."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=ENDOFTEXT, eos_token=END, pad_token=PAD,
        extra_special_tokens=[USER, ASSISTANT], clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def train_tokenizer(cfg: TokenizerConfig, docs: list[str] | None = None) -> Path:
    """Train the tokenizer on `cfg.corpus` (or `cfg.data`, or `docs` when given) and save it to
    `cfg.out`; returns the folder."""
    docs = docs or documents(cfg.corpus, cfg.data)
    fast = wrap(train_bpe(docs, cfg.vocab_size, cfg.min_frequency))
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    fast.save_pretrained(tmp)
    carry_lock(out, tmp)  # the folder's lock (picoalign/lock.py) stays held across the swap
    shutil.rmtree(out, ignore_errors=True)  # replace an old tokenizer whole, never mix two
    os.replace(tmp, out)
    n_chars = sum(map(len, docs))
    n_tokens = sum(len(ids) for ids in fast(docs[:2000], add_special_tokens=False)["input_ids"])
    sample_chars = sum(map(len, docs[:2000]))
    print(f"tokenizer: {len(fast)} tokens from {len(docs)} documents ({n_chars / 1e6:.2f}M characters, "
          f"{sample_chars / max(n_tokens, 1):.2f} characters/token); saved to {out}")
    return out
