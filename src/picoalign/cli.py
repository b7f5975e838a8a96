"""The `picoalign` command: one subcommand per entry of the stage registry (stages.py), each a plain function.

Every stage takes `--config FILE`, `--set key=value` (repeatable) and, where they apply,
`--data DIR`, `--model PATH|ID`, `--out DIR`; each top-level setting of the stage's config is
also a flag (`--max-seconds 60`, `--beta 0.2`). Heavy libraries are imported only when a stage
runs, so `picoalign --help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence
from contextlib import nullcontext

from picoalign import config as C
from picoalign.lock import FolderBusy, folder_lock, main_process, output_folder
from picoalign.stages import STAGES, check_registry, config_sections


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
        kwargs = {"dest": f"opt_{f.name}", "default": None, "help": help_text.replace("%", "%%")}  # argparse formats %
        if typ is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif f.metadata.get("bare") is not None:
            kwargs.update(nargs="?", const=f.metadata["bare"], type=_flag_type(typ), metavar=f.name.upper())
        else:
            kwargs.update(type=_flag_type(typ), metavar=f.name.upper())
        p.add_argument(*names, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per entry of the stage registry (stages.py), in its order."""
    check_registry()
    parser = argparse.ArgumentParser(prog="picoalign", description="Post-train small language models.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, stage in STAGES.items():
        if stage.config is None:  # the stage parses its own arguments (and its --help)
            sub.add_parser(name, help=stage.help, add_help=False)
            continue
        p = sub.add_parser(name, help=stage.help, description=(stage.config.__doc__ or stage.help).strip())
        _add_config_flags(p, stage.config)
        if name == "dpo":
            p.add_argument("--ipo", action="store_true", help="use the IPO loss (same as --loss ipo)")
    return parser


def config_from_args(stage: str, args: argparse.Namespace):
    overrides = C.parse_overrides(args.overrides)
    for key, value in vars(args).items():
        if key.startswith("opt_") and value is not None:
            overrides[key[4:]] = value
    if getattr(args, "ipo", False):
        overrides["loss"] = "ipo"
    return C.load_config(STAGES[stage].config, args.config, overrides, section=stage, sections=config_sections())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in STAGES and STAGES[argv[0]].config is None:
        return STAGES[argv[0]].function()(argv[1:]) or 0
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args.stage, args)
    except C.ConfigError as e:
        parser.exit(2, f"picoalign {args.stage}: config error: {e}\n")
    folder = output_folder(args.stage, cfg) if main_process() else None
    try:
        with folder_lock(folder, args.stage) if folder else nullcontext():  # one process per --out
            STAGES[args.stage].function()(cfg)
    except FolderBusy as e:
        print(f"picoalign {args.stage}: refused: {e}", file=sys.stderr)
        return 1
    except (C.ConfigError, ValueError, FileNotFoundError) as e:
        print(f"picoalign {args.stage}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM during training (train/loop.py:Terminated)
        print(f"picoalign {args.stage}: {e or 'interrupted'}; rerun with --resume to continue", file=sys.stderr)
        return getattr(e, "exit_status", 130)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
