"""Every stage of picoalign, listed once: the CLI, `picoalign run` and the tests derive from `STAGES`.

    from picoalign.stages import STAGES, run_order
    STAGES["sft"].config        # SFTConfig: its fields are the flags of `picoalign sft`
    STAGES["sft"].function()    # picoalign.train.sft.sft, imported only now
    run_order()                 # ('data', 'tokenizer', 'pretrain', 'sft', 'dpo', 'eval', 'report')

A new stage is one `Stage` entry here plus its module. Its `config` class makes the flags of
`picoalign <name>` (a stage without one gets its argument list and parses it itself); an `InRun`
part makes it a stage of `picoalign run`: where it reads and writes inside `runs/<tag>/`, when
a rerun skips it, and what must hold before the run starts. The order of the entries is the
order `run` chains them, and `run.stages` may name exactly the entries that have an `InRun`.
The functions are named as "module:function" and imported only when a stage runs, so that
`picoalign --help` stays instant; `check_registry` (called when the CLI is built, as litgpt's
`_check_commands` is) refuses an entry that does not fit.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from picoalign import config as C
from picoalign.report import curves


def _never(cfg, root: Path) -> str | None:
    return None


@dataclass(frozen=True)
class InRun:
    """How `picoalign run` chains a stage. Each rule gets the stage's config (None for a stage
    without one) and the run folder."""

    paths: Callable[[Path, C.RunConfig], dict]  # settings forced inside runs/<tag>/, over the user's
    done: Callable[[Any, Path], str | None] = _never  # outputs complete: "<why>", printed "<stage>: <why>, skipped"
    blocked: Callable[[Any, Path], str | None] = _never  # why it cannot run now: skipped with a warning
    check: Callable[[Any], None] | None = None  # before any stage starts: raise if this one cannot run
    resume: bool = False  # training: continue from the last checkpoint in its `out`
    optional: bool = False  # a failure is a warning and the run goes on
    call: str = ""  # "module:function" taking the run folder, for a stage without a config


@dataclass(frozen=True)
class Facts:
    """What the report (report/) says of a stage of `run`: its row in the stages table, its
    training log's summary and its panels of curves.png."""

    title: dict[str, str]  # its name in the report, by language ("en", "zh")
    log: bool = False  # it writes logs/<name>.jsonl (one JSON line per step or eval)
    curves: tuple[curves.Panel, ...] = ()  # its panels of curves.png (report/curves.py), from its log
    done: str = ""  # a file under the run folder whose presence means it ran (a stage without a log)
    optional: bool = False  # a run without it is whole: "not run (optional)" rather than "missing"


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    target: str  # "module:function" that `picoalign <name>` calls with the config (or the arguments)
    config: type | None = None
    run: InRun | None = None  # None: a command only, not a stage of `picoalign run`
    report: Facts | None = None  # how the report shows it (a stage of `run` has one)

    def function(self, target: str = "") -> Callable:
        module, name = (target or self.target).split(":")
        return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------- skip rules and checks


def _exists(name: str, why: str) -> Callable[[Any, Path], str | None]:
    """Done when `<out>/<name>` exists."""
    return lambda cfg, root: why if (Path(cfg.out) / name).exists() else None


def _training_done(cfg, root: Path) -> str | None:
    from picoalign.models.load import read_marker

    return "already complete" if read_marker(cfg.out).get("complete") else None


def _rows(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _no_training_rows(cfg, root: Path) -> str | None:
    from picoalign.data.sources import data_split, is_source

    path = data_split(cfg.data, cfg.train_file, main=True)
    if is_source(path):  # parquet, arrow, hub: read (and refused if empty) by the stage itself
        return None
    return f"{path} is empty" if _rows(Path(path)) == 0 else None


def _no_sft_to_start_from(cfg, root: Path) -> str | None:
    from picoalign.models.load import read_marker

    if why := _no_training_rows(cfg, root):
        return why
    if Path(cfg.model) != root / "checkpoints" / "sft":  # run.method=orpo: from the base model
        return None
    return None if read_marker(cfg.model).get("complete") else "no finished SFT checkpoint to start from"


def _evaluated(cfg, root: Path) -> str | None:
    from picoalign.eval.evaluate import run_models
    from picoalign.io import read_json

    metrics = root / "metrics.json"
    done = read_json(metrics).get("models", {}) if metrics.exists() else {}
    return "already done" if done and set(run_models(root)) <= set(done) else None


def _no_models(cfg, root: Path) -> str | None:
    from picoalign.eval.evaluate import run_models

    return None if run_models(root) else "no trained models in this run"


def _model_file_present(cfg) -> None:
    from picoalign.models.load import ensure_builtin_file

    ensure_builtin_file(cfg.model)  # no file, no run (and no hour lost to the stages before)


# ---------------------------------------------------------------- run-folder paths


def _train_paths(root: Path, checkpoint: str) -> dict:
    return {"data": str(root / "data"), "out": str(root / "checkpoints" / checkpoint), "logs": str(root / "logs")}


def _base_model(root: Path, run: C.RunConfig) -> str:
    """What the run's first training stage starts from: the model pretrained here, or run.model."""
    return str(root / "checkpoints" / "base") if "pretrain" in run.stage_names() else run.model


def _sft_paths(root: Path, run: C.RunConfig) -> dict:
    return {**_train_paths(root, "sft"), "model": _base_model(root, run)}


def _dpo_paths(root: Path, run: C.RunConfig) -> dict:
    """DPO from the run's SFT model; with run.method=orpo, ORPO from the base model (its NLL term
    does SFT's work, so no sft_weight on top)."""
    if run.method == "orpo":
        return {**_train_paths(root, "dpo"), "model": _base_model(root, run), "loss": "orpo", "sft_weight": 0.0}
    return {**_train_paths(root, "dpo"), "model": str(root / "checkpoints" / "sft")}


def _rl_paths(root: Path, run: C.RunConfig) -> dict:
    """RL from the run's DPO model when the run has a dpo stage before it (rl follows dpo),
    else from its SFT model (rl replaces dpo)."""
    names = run.stage_names()
    start = "dpo" if "dpo" in names and "rl" in names and names.index("dpo") < names.index("rl") else "sft"
    return {**_train_paths(root, "rl"), "model": str(root / "checkpoints" / start)}


def _no_checkpoint_to_start_rl(cfg, root: Path) -> str | None:
    from picoalign.models.load import read_marker

    if Path(cfg.model).parent != root / "checkpoints":
        return None
    return None if read_marker(cfg.model).get("complete") else f"no finished {Path(cfg.model).name} checkpoint to start from"


# ---------------------------------------------------------------- the registry

_ENTRIES = [
    Stage("data", "make SFT and preference data", "picoalign.data.make:make_data", C.DataConfig,
          InRun(lambda root, run: {"out": str(root / "data"), "seed": run.seed},
                done=_exists("dataset_meta.json", "already made")),
          Facts({"en": "data", "zh": "数据生成"}, done="data/dataset_meta.json")),
    Stage("tokenizer", "train a byte-level BPE tokenizer for the pico model",
          "picoalign.models.tokenizer:train_tokenizer", C.TokenizerConfig,
          InRun(lambda root, run: {"data": str(root / "data"), "out": str(root / "tokenizer")},
                done=_exists("tokenizer.json", "already trained")),
          Facts({"en": "tokenizer", "zh": "分词器"}, done="tokenizer/tokenizer.json", optional=True)),
    Stage("pretrain", "pretrain the tiny pico GPT from scratch (or continue pretraining a model)",
          "picoalign.train.pretrain:pretrain", C.PretrainConfig,
          InRun(lambda root, run: {**_train_paths(root, "base"), "tokenizer": str(root / "tokenizer")},
                done=_training_done, resume=True),
          Facts({"en": "pretraining", "zh": "预训练"}, log=True, curves=curves.PRETRAIN, optional=True)),
    Stage("sft", "supervised fine-tuning (loss on the response)", "picoalign.train.sft:sft", C.SFTConfig,
          InRun(_sft_paths, done=_training_done, blocked=_no_training_rows, check=_model_file_present,
                resume=True),
          Facts({"en": "SFT", "zh": "监督微调（SFT）"}, log=True, curves=curves.SFT)),
    Stage("dpo", "DPO and its variants against a frozen reference; ORPO, SimPO, KTO (--loss)",
          "picoalign.train.preference:train_preferences", C.DPOConfig,
          InRun(_dpo_paths, done=_training_done, blocked=_no_sft_to_start_from, check=_model_file_present,
                resume=True),
          Facts({"en": "DPO", "zh": "偏好优化（DPO）"}, log=True, curves=curves.DPO)),
    Stage("rl", "online RL on the model's own samples: GRPO, RLOO, online DPO (--method), rewards you can check",
          "picoalign.train.rl:rl", C.RLConfig,
          InRun(_rl_paths, done=_training_done, blocked=_no_checkpoint_to_start_rl, check=_model_file_present,
                resume=True),
          Facts({"en": "RL", "zh": "在线强化学习（RL）"}, log=True, curves=curves.RL, optional=True)),
    Stage("eval", "evaluate base/SFT/DPO on the test splits", "picoalign.eval.evaluate:evaluate", C.EvalConfig,
          InRun(lambda root, run: {"run": str(root), "data": str(root / "data"), "out": str(root)},
                done=_evaluated, blocked=_no_models),
          Facts({"en": "evaluation", "zh": "评估"})),
    Stage("report", "build the results report of a run folder", "picoalign.report.build:main",
          run=InRun(lambda root, run: {}, optional=True, call="picoalign.report.build:build_report"),
          report=Facts({"en": "report", "zh": "报告"})),
    Stage("frontier", "DPO at several beta from a run's SFT model: judge score vs KL (the DPO paper's figure 2)",
          "picoalign.eval.frontier:frontier", C.FrontierConfig),
    Stage("generate", "answers from a model to --prompt TEXT or --prompt-file FILE",
          "picoalign.use.generate:generate_answers", C.GenerateConfig),
    Stage("chat", "chat with a model in the terminal (streams)", "picoalign.use.chat:chat", C.ChatConfig),
    Stage("serve", "HTTP API (OpenAI-compatible, /v1/generate) and a chat page", "picoalign.serve.app:serve",
          C.ServeConfig),
    Stage("export", "merge a LoRA adapter into its base; save an HF folder or a GGUF file (+ Ollama Modelfile)",
          "picoalign.use.export:export", C.ExportConfig),
    Stage("check-data", "check a data file and print counts and problems", "picoalign.data.check:main"),
    Stage("deid", "replace names, emails, phone numbers... in a data file with placeholders",
          "picoalign.data.deid:main"),
    Stage("run", "the whole pipeline: data, SFT, DPO, eval, report", "picoalign.pipeline:main"),
]
STAGES: dict[str, Stage] = {s.name: s for s in _ENTRIES}


def run_order() -> tuple[str, ...]:
    """The stages `picoalign run` can chain, in the order it chains them."""
    return tuple(name for name, s in STAGES.items() if s.run)


def run_sections() -> dict[str, type]:
    """The stages of `run` that have a config, each a section of a run file, with its class."""
    return {name: STAGES[name].config for name in run_order() if STAGES[name].config}


def reported() -> tuple[Stage, ...]:
    """The stages the report shows (its stages table), in `run`'s order."""
    return tuple(s for s in STAGES.values() if s.run and s.report)


def logged() -> tuple[str, ...]:
    """The stages whose training log (logs/<name>.jsonl) the report reads."""
    return tuple(s.name for s in reported() if s.report.log)


def check_registry() -> None:
    """Refuse a registry that the CLI or `run` could not use; cheap: imports no stage module."""
    for key, s in STAGES.items():
        if key != s.name:
            raise ValueError(f"stages: entry {key!r} holds the stage named {s.name!r}")
        module, sep, function = s.target.partition(":")
        if not (module and sep and function):
            raise ValueError(f"stage {s.name}: target {s.target!r} is not 'module:function'")
        if s.config is not None and not (dataclasses.is_dataclass(s.config) and
                                         (s.config.__doc__ or "").startswith(f"`picoalign {s.name}`")):
            raise ValueError(f"stage {s.name}: {s.config.__name__} is not its config "
                             f"(a dataclass whose docstring starts with `picoalign {s.name}`)")
        if s.run is not None and (s.config is None) != bool(s.run.call):
            raise ValueError(f"stage {s.name}: in `run`, a stage without a config needs `call` (and only it)")
        if s.run is not None and (s.report is None or not {"en", "zh"} <= set(s.report.title)):
            raise ValueError(f"stage {s.name}: a stage of `run` needs its report facts, its name in en and zh")


def check_run_stages(run: C.RunConfig) -> list[str]:
    """`run.stages` as a list, every name checked before the first stage starts."""
    names, known = run.stage_names(), run_order()
    if not names:
        raise C.ConfigError(f"stages: name at least one of {', '.join(known)}")
    unknown = [s for s in names if s not in known]
    if unknown:
        raise C.ConfigError(f"stages: unknown stage {unknown[0]!r} in {run.stages!r} (known: {', '.join(known)})")
    return names


def config_sections() -> set[str]:
    """The sections a YAML file may have besides `run`: every stage with a config."""
    return {name for name, s in STAGES.items() if s.config}
