"""The `picoalign` command: one subcommand per stage, each mapped to a plain typed function.

Every stage takes `--config FILE`, `--set key=value` (repeatable) and, where they apply,
`--data DIR`, `--model PATH|ID`, `--out DIR`; each top-level setting of the stage's config is
also a flag (`--max-seconds 60`, `--beta 0.2`). Heavy libraries are imported only when a stage
runs, so `picoalign --help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from collections.abc import Sequence

from picoalign import config as C

# name -> (config class or None, "module:function", help, YAML section)
STAGES: dict[str, tuple] = {
    "data": (C.DataConfig, "picoalign.data.make:make_data", "make SFT and preference data", "data"),
    "tokenizer": (C.TokenizerConfig, "picoalign.models.tokenizer:train_tokenizer",
                  "train a byte-level BPE tokenizer for the pico model", "tokenizer"),
    "pretrain": (C.PretrainConfig, "picoalign.train.pretrain:pretrain",
                 "pretrain the tiny pico GPT from scratch (or continue pretraining a model)", "pretrain"),
    "sft": (C.SFTConfig, "picoalign.train.sft:sft", "supervised fine-tuning (loss on the response)", "sft"),
    "dpo": (C.DPOConfig, "picoalign.train.dpo:dpo", "DPO and its variants against a frozen reference", "dpo"),
    "eval": (C.EvalConfig, "picoalign.eval.evaluate:evaluate", "evaluate base/SFT/DPO on the test splits", "eval"),
    "frontier": (C.FrontierConfig, "picoalign.eval.frontier:frontier",
                 "DPO at several beta from a run's SFT model: judge score vs KL (the DPO paper's figure 2)", "frontier"),
    "generate": (C.GenerateConfig, "picoalign.use.generate:generate_answers",
                 "answers from a model to --prompt TEXT or --prompt-file FILE", "generate"),
    "chat": (C.ChatConfig, "picoalign.use.chat:chat", "chat with a model in the terminal (streams)", "chat"),
    "serve": (C.ServeConfig, "picoalign.serve.app:serve",
              "HTTP API (OpenAI-compatible, /v1/generate) and a chat page", "serve"),
    "export": (C.ExportConfig, "picoalign.use.export:export",
               "merge a LoRA adapter into its base; save an HF folder or a GGUF file (+ Ollama Modelfile)", "export"),
}
# Stages that take plain arguments rather than a config class, registered by their modules.
EXTRA: dict[str, tuple[str, str]] = {
    "check-data": ("picoalign.data.check:main", "check a data file and print counts and problems"),
    "deid": ("picoalign.data.deid:main", "replace names, emails, phone numbers... in a data file with placeholders"),
    "report": ("picoalign.report.build:main", "build the results report of a run folder"),
    "run": ("picoalign.pipeline:main", "the whole pipeline: data, SFT, DPO, eval, report"),
}


def _flag_type(typ):
    origin = typing.get_origin(typ)
    if origin is not None:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        typ = args[0] if args else str
    return str if typ is bool else typ


def _add_config_flags(p: argparse.ArgumentParser, cls) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML file with settings (a run file's section is used)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set lora.r=8 (repeatable)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            continue
        names = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            names.append(f"--{f.name}")  # the original scripts' spelling, e.g. --label_smoothing
        env = f.metadata.get("env")
        help_text = f.metadata.get("help", "")
        if env:
            help_text += f" [env {env.format(STAGE=getattr(cls, 'STAGE', ''))}]"
        kwargs = {"dest": f"opt_{f.name}", "default": None, "help": help_text}
        if typ is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif f.metadata.get("bare") is not None:
            kwargs.update(nargs="?", const=f.metadata["bare"], type=_flag_type(typ), metavar=f.name.upper())
        else:
            kwargs.update(type=_flag_type(typ), metavar=f.name.upper())
        p.add_argument(*names, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="picoalign", description="Post-train small language models.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (cls, _, help_text, _) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=(cls.__doc__ or help_text).strip())
        _add_config_flags(p, cls)
        if name == "dpo":
            p.add_argument("--ipo", action="store_true", help="use the IPO loss (same as --loss ipo)")
    for name, (target, help_text) in EXTRA.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.set_defaults(extra_target=target)
    return parser


def resolve(target: str):
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def config_from_args(stage: str, args: argparse.Namespace):
    cls, _, _, section = STAGES[stage]
    overrides = C.parse_overrides(args.overrides)
    for key, value in vars(args).items():
        if key.startswith("opt_") and value is not None:
            overrides[key[4:]] = value
    if getattr(args, "ipo", False):
        overrides["loss"] = "ipo"
    return C.load_config(cls, args.config, overrides, section=section)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in EXTRA:
        return resolve(EXTRA[argv[0]][0])(argv[1:]) or 0
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args.stage, args)
    except C.ConfigError as e:
        parser.exit(2, f"picoalign {args.stage}: config error: {e}\n")
    try:
        resolve(STAGES[args.stage][1])(cfg)
    except (C.ConfigError, ValueError, FileNotFoundError) as e:
        print(f"picoalign {args.stage}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM during training (train/loop.py:Terminated)
        print(f"picoalign {args.stage}: {e or 'interrupted'}; rerun with --resume to continue", file=sys.stderr)
        return getattr(e, "exit_status", 130)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
