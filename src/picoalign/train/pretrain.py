"""`picoalign pretrain`: next-token pretraining of the pico model from scratch (or of any model).

    picoalign pretrain --data runs/x/data --out runs/x/checkpoints/base --max-seconds 180
    picoalign pretrain --corpus stories.txt --tokenizer runs/x/tokenizer --set pico.n_layers=6
    picoalign pretrain --dataset roneneldan/TinyStories --dataset-split "train[:20000]"   # online
    picoalign pretrain --model HuggingFaceTB/SmolLM2-135M --corpus my.txt   # continued pretraining
    picoalign sft --model runs/x/checkpoints/base ...                       # then fine-tune it

The text is the `--corpus` files (one document per line, or blank-line separated), and/or a
`datasets` hub id (`--dataset`, its `--text-column`; `HF_ENDPOINT` picks a mirror), or else
the SFT responses and preference answers of `--data`'s training split. Documents are shuffled,
each is preceded by `<|endoftext|>`, and the token stream is cut into rows of `max_length`
tokens that overlap by one token, so every token is a target exactly once. The last
`val_share` of the rows is held out for `val/loss`. The loss is the mean next-token
cross-entropy in nats per token, the same PackedBatch + `forward_logps` path SFT uses.

With `--model` empty or `pico:[key=value,...]` a fresh pico model (the `pico` section) is
initialised from the tokenizer (`--tokenizer`, default `<out>/tokenizer`, trained first when
missing); any other model is pretrained further with its own tokenizer. The unigram entropy
of the training tokens is printed beside the loss: a model that knew only how often each token
occurs would score it, so a loss well below it means the model uses the context.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import torch

from picoalign.config import PretrainConfig, TokenizerConfig
from picoalign.models.load import pick_device
from picoalign.models.pico import init_model, parse_spec
from picoalign.models.tokenizer import (
    ENDOFTEXT,
    corpus_files,
    data_documents,
    read_text_documents,
    train_tokenizer,
)
from picoalign.train import dist
from picoalign.train.batching import PackedBatch, chunks, forward_logps
from picoalign.train.loop import fit
from picoalign.train.losses import masked_lm_loss
from picoalign.train.scoring import mean_response_nll
from picoalign.train.stage import prepare, save_model

# ---------------------------------------------------------------- text


def hub_documents(name: str, split: str, column: str) -> list[str]:
    """The `column` texts of a `datasets` hub data set (downloaded; HF_ENDPOINT is honoured)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError("--dataset needs the datasets package: pip install datasets") from None
    ds = load_dataset(name, split=split)
    if column not in ds.column_names:
        raise ValueError(f"dataset {name}: no column {column!r} (columns: {', '.join(ds.column_names)})")
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]


def pretrain_documents(cfg: PretrainConfig) -> list[str]:
    """The corpus files and/or the hub data set; without either, the data folder's answers."""
    docs = [d for f in corpus_files(cfg.corpus) for d in read_text_documents(f)] if cfg.corpus else []
    if cfg.dataset:
        docs += hub_documents(cfg.dataset, cfg.dataset_split, cfg.text_column)
    if not cfg.corpus and not cfg.dataset:
        docs = data_documents(cfg.data, prompts=False)
    if not docs:
        raise ValueError(f"pretrain: no text to train on (corpus={cfg.corpus!r}, dataset={cfg.dataset!r}, "
                         f"data={cfg.data!r})")
    return docs


def token_rows(tokenizer, docs: list[str], length: int, seed: int) -> list[list[int]]:
    """Shuffled documents, each after `<|endoftext|>`, as one stream cut into rows of `length`.

    Rows overlap by one token (the last token of a row is the first of the next), so every
    token but the very first is predicted exactly once.
    """
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    sep = separator_id(tokenizer)
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream += [sep, *ids]
    rows = [stream[i:i + length] for i in range(0, max(len(stream) - 1, 1), length - 1)]
    return [r for r in rows if len(r) >= 2]


def separator_id(tokenizer) -> int:
    """The document separator: `<|endoftext|>` where the vocabulary has it, else eos."""
    sep = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    return sep if sep is not None and sep != tokenizer.unk_token_id else tokenizer.eos_token_id


def lm_batch(rows: list[list[int]], pad_id: int) -> PackedBatch:
    """Rows scored on every next token: token k+1 of a row is predicted at position k.

    Each row is plain causal text padded on the right, so no attention mask is needed (the
    model's causal mask is exact, pads come after every real token) and SDPA runs mask-free.
    """
    B, L = len(rows), max(map(len, rows))
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    keep = torch.zeros((B, L), dtype=torch.bool)
    for b, r in enumerate(rows):
        input_ids[b, :len(r)] = torch.tensor(r)
        keep[b, :len(r) - 1] = True
    labels = torch.cat([torch.tensor(r[1:]) for r in rows])  # row-major, the order kept logits come out in
    return PackedBatch(
        input_ids=input_ids,
        position_ids=torch.arange(L).expand(B, L).clone(),
        group=None,
        branch=None,
        keep=keep,
        rows=torch.arange(len(labels)),
        labels=labels,
        seq_index=torch.repeat_interleave(torch.arange(B), torch.tensor([len(r) - 1 for r in rows])),
        n_seqs=B,
        n_tokens=sum(map(len, rows)),
    )


def unigram_entropy(batches: list[PackedBatch], vocab_size: int) -> float:
    """Entropy of the target tokens' frequencies, in nats per token: the loss of a context-free model."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for b in batches:
        counts += torch.bincount(b.labels, minlength=vocab_size)[:vocab_size].double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


# ---------------------------------------------------------------- the task


class PretrainTask:
    def __init__(self, model, tokenizer, cfg: PretrainConfig, device, docs: list[str]) -> None:
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        length = min(cfg.max_length, getattr(model.config, "max_position_embeddings", cfg.max_length))
        rows = token_rows(tokenizer, docs, length, cfg.seed)
        n_val = min(max(1, round(cfg.val_share * len(rows))), len(rows) - 1) if cfg.val_share > 0 else 0
        train, val = rows[:len(rows) - n_val], rows[len(rows) - n_val:]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.train = [lm_batch(group, pad) for group in chunks(train, cfg.batch_size)]
        val_batches = [lm_batch(group, pad) for group in chunks(val, cfg.batch_size)] if val else []
        self.val = val_batches[: cfg.eval_batches] if cfg.eval_batches else val_batches
        self.entropy = unigram_entropy(self.train, len(tokenizer))
        n_tokens = sum(len(b.labels) for b in self.train)
        print(f"pretrain: {len(docs)} documents -> {n_tokens:,} training tokens in {len(train)} rows of "
              f"<= {length} ({len(self.train)} micro-batches), {len(val)} val rows")
        print(f"pretrain: unigram entropy of the training tokens {self.entropy:.3f} nats/token "
              f"({self.entropy / math.log(2):.2f} bits): the loss (nats/token) to beat")

    def batches(self) -> list[PackedBatch]:
        return self.train

    def loss(self, batch: PackedBatch):
        return masked_lm_loss(forward_logps(self.model, batch)), {}

    def evaluate(self) -> dict[str, float]:
        if not self.val:
            return {}
        return {"val/loss": round(mean_response_nll(self.model, self.val, self.device), 6)}

    def save(self, folder: Path, state_dict: dict | None = None) -> None:
        save_model(self.model, self.tokenizer, folder, state_dict)


# ---------------------------------------------------------------- the stage


def is_fresh(model: str) -> bool:
    return not model or model.startswith("pico:")


def ensure_tokenizer(cfg: PretrainConfig, docs: list[str]) -> Path:
    """`cfg.tokenizer` (default `<out>/tokenizer`), trained on the corpus first when it is missing."""
    folder = Path(cfg.tokenizer or Path(cfg.out) / "tokenizer")
    if not (folder / "tokenizer.json").exists():
        vocab = {"vocab_size": cfg.pico.vocab_size} if cfg.pico.vocab_size else {}
        tok_cfg = TokenizerConfig(corpus=cfg.corpus, data=cfg.data, out=str(folder), **vocab)
        print(f"pretrain: no tokenizer in {folder}; training one")
        train_tokenizer(tok_cfg, docs=docs if cfg.dataset else None)
    return folder


def sample(model, tokenizer, max_new_tokens: int = 60, seed: int = 0) -> str:
    """A short top-p sample from the start of a document, to see what the model learnt."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.tensor([[separator_id(tokenizer)]], device=device)
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=True, top_p=0.9, temperature=0.8, top_k=0,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, 1:], skip_special_tokens=True).strip()


def pretrain(cfg: PretrainConfig) -> dict:
    """Pretrain a fresh pico model (or `cfg.model`) on plain text; returns the training summary."""
    docs = pretrain_documents(cfg)
    main = dist.world().main
    if is_fresh(cfg.model):
        start = Path(cfg.out) / "init"
        dist.init(pick_device(cfg.device))
        if main:  # under torchrun: rank 0 makes the tokenizer and the initial model, the others wait
            init_model(parse_spec(cfg.model, cfg.pico), ensure_tokenizer(cfg, docs), start, cfg.seed)
        dist.barrier()
        cfg = dataclasses.replace(cfg, model=str(start))
    p = prepare(cfg, "pretrain")
    task = PretrainTask(p.model, p.tokenizer, cfg, p.device, docs)
    marker = {**p.marker, "unigram_entropy": round(task.entropy, 4)}
    summary = fit(task, cfg, "pretrain", p.device, p.dtype, p.log_dir, marker)
    val = summary["last_eval"].get("val/loss")
    if val is not None:
        print(f"pretrain: val loss {val:.3f} nats/token vs unigram entropy {task.entropy:.3f} "
              f"(perplexity {math.exp(val):.1f} vs {math.exp(task.entropy):.1f})")
    if main:
        print(f"pretrain: sample: {sample(task.model, p.tokenizer, seed=cfg.seed)!r}")
    return {**summary, "unigram_entropy": round(task.entropy, 4)}
