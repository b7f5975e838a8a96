"""`picoalign run`: data -> (tokenizer -> pretrain) -> SFT -> DPO -> eval -> report, in one run folder.

    picoalign run                                   # configs/default.yaml settings, built-in model
    picoalign run --config configs/gpu.yaml --set sft.max_seconds=600 --tag big
    picoalign run --config configs/pico.yaml        # a tiny GPT pretrained from scratch, then SFT, DPO
    RUN_TAG=demo SFT_MAX_SECONDS=60 picoalign run   # the original script's variables work too
    picoalign run --set run.method=orpo             # one ORPO stage from the base model instead of SFT + DPO
    picoalign run --set dpo.loss=simpo              # SFT, then SimPO (no reference) in the dpo stage

Everything lands in `runs/<tag>/`: config.yaml (resolved), output.log (stdout + stderr), data/,
tokenizer/ and checkpoints/base/ (when pretraining; SFT then starts from checkpoints/base),
checkpoints/{sft,dpo}/, logs/*.jsonl, metrics.json, samples.jsonl, report/. With
`run.method=orpo` the sft stage is left out and the dpo stage trains ORPO from the base model
(its checkpoint is still checkpoints/dpo: the run's preference-trained model). Rerunning with the
same tag skips finished stages and resumes an interrupted one from its last checkpoint. A stage
whose input is empty is skipped with a warning; the report never fails the run; a failing core
stage stops it with the reason and the path of the log.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path

import yaml

from picoalign import config as C
from picoalign.io import atomic_write_text, read_json, write_json
from picoalign.lock import FolderBusy, folder_lock, output_folder
from picoalign.models.builtin import BuiltinUnavailable
from picoalign.scrub import scrub
from picoalign.stages import (
    STAGES,
    Stage,
    check_run_stages,
    config_sections,
    run_order,
    run_sections,
)


class StageFailed(RuntimeError):
    pass


class _Tee:
    """Write to the terminal as it is, and to output.log as readable lines (`LogLines`)."""

    def __init__(self, stream, log: LogLines) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def __getattr__(self, name):
        return getattr(self.stream, name)


class LogLines:
    """The log file's side of the terminal: whole lines, not every frame of a progress bar.

    A progress bar redraws its line with carriage returns many times a second. The log keeps
    one line per redrawn frame at most every `every` seconds (and the frame a line ends on),
    with terminal control sequences removed, so it reads as a record of progress.
    """

    _CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

    def __init__(self, file, every: float = 30.0, clock=time.monotonic) -> None:
        self.file, self.every, self.clock = file, every, clock
        self.pending, self.last_frame = "", -math.inf

    def write(self, text: str) -> None:
        for part in re.split(r"(\r|\n)", self._CONTROL.sub("", text)):
            if part == "\n":
                self._emit(self.pending)
                self.pending = ""
            elif part == "\r":
                if self.pending.strip() and self.clock() - self.last_frame >= self.every:
                    self._emit(self.pending)
                    self.last_frame = self.clock()
                self.pending = ""
            else:
                self.pending += part

    def _emit(self, line: str) -> None:
        self.file.write(scrub(line.rstrip()) + "\n")  # what the terminal shows, without secrets
        self.file.flush()

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if self.pending.strip():
            self._emit(self.pending)
        self.pending = ""


def resolve_configs(path: str | None, overrides: Iterable[str] | Mapping = (), environ=None) -> dict:
    """The run config and each stage's config, with the run's paths forced into them."""
    tree = overrides if isinstance(overrides, Mapping) else C.parse_overrides(overrides)
    sections = run_sections()
    C.check_run_sections(tree, sections)
    own = {k: v for k, v in tree.items() if k not in sections and k != "run"}
    own = C.deep_merge(own, tree.get("run") or {})  # `--set run.model=...` as in the YAML
    sft_model = (tree.get("sft") or {}).get("model")
    if sft_model is not None and "model" not in own:
        # the run forces sft.model to the run's base model (stages.py:_sft_paths), so a user's
        # `--set sft.model=...` names that base model rather than being overruled in silence
        own["model"] = sft_model
    run = C.load_config(C.RunConfig, path, own, environ=environ, section="run", sections=config_sections())
    check_run_stages(run)  # a typo in the last stage fails here, not after the others have run
    C.check_run_method(run, tree)
    run.tag = run.tag or time.strftime("%Y%m%d-%H%M%S")
    root = Path(run.runs_dir) / run.tag
    shared = {f.name: getattr(run, f.name) for f in dataclasses.fields(C.Runtime)}  # device, dtype, seed
    configs = {"run": run, "root": root}
    for name, cls in sections.items():
        names = {f for f in cls.__dataclass_fields__}
        base = {k: v for k, v in shared.items() if k in names}
        extra = C.deep_merge(tree.get(name, {}) or {}, STAGES[name].run.paths(root, run))
        configs[name] = C.load_config(cls, path, extra, environ=environ, section=name, base=base, name=name,
                                      sections=config_sections())
        if getattr(configs[name], "mlflow_uri", None) == "":  # not chosen: the run keeps its own store
            configs[name].mlflow_uri = str(root / "mlruns")
    return configs


def run_pipeline(path: str | None = None, overrides: Iterable[str] | Mapping = (), environ=None) -> Path:
    """Run the stages of the pipeline; returns the run folder."""
    configs = resolve_configs(path, overrides, environ)
    root: Path = configs["root"]
    chosen = [STAGES[name] for name in configs["run"].stage_names()]
    for stage in chosen:  # before any work: what one stage lacks stops the run now
        if stage.run.check:
            stage.run.check(configs.get(stage.name))
    with folder_lock(root, "run"):  # a second `run` of this tag is refused before it writes anything
        _run_locked(root, configs, chosen)
    return root


def _run_locked(root: Path, configs: dict, chosen: list[Stage]) -> None:
    resolved = {"run": C.to_dict(configs["run"]), **{n: C.to_dict(configs[n]) for n in run_sections()}}
    atomic_write_text(root / "config.yaml", yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
    with open(root / "output.log", "a", encoding="utf-8") as file:
        out, err = sys.stdout, sys.stderr
        logs = LogLines(file), LogLines(file)  # one each: a bar on stderr does not swallow a print's line
        sys.stdout, sys.stderr = _Tee(out, logs[0]), _Tee(err, logs[1])
        try:
            print(f"run: {root} (stages {','.join(configs['run'].stage_names())}; method {configs['run'].method})")
            for stage in chosen:
                _timed(root, stage.name, lambda stage=stage: run_stage(stage, configs))
            print(f"run: finished; report at {root / 'report' / 'index.html'}")
        finally:
            sys.stdout, sys.stderr = out, err
            for log in logs:
                log.close()


def _timed(root: Path, stage: str, fn) -> None:
    t0 = time.time()
    try:
        did = fn()
    except (StageFailed, FolderBusy):
        raise
    except Exception as e:  # noqa: BLE001 - a core stage failure stops the run, with where to look
        traceback.print_exc()
        raise StageFailed(f"stage {stage} failed: {e} (log: {root / 'output.log'})") from e
    if did is False:
        return
    metrics_path = root / "metrics.json"
    metrics = read_json(metrics_path) if metrics_path.exists() else {}
    metrics.setdefault("run", {}).setdefault("stage_seconds", {})[stage] = round(time.time() - t0, 1)
    write_json(metrics_path, metrics)


def run_stage(stage: Stage, configs: dict) -> bool:
    """One stage inside the run folder, under its skip rules; False when it was skipped."""
    cfg, root, rules = configs.get(stage.name), configs["root"], stage.run
    if why := rules.done(cfg, root):
        print(f"{stage.name}: {why}, skipped")
        return False
    if why := rules.blocked(cfg, root):
        warnings.warn(f"{stage.name}: {why}; stage skipped", stacklevel=2)
        return False
    if rules.resume:
        from picoalign.train.loop import resumable

        cfg.resume = resumable(Path(cfg.out)) is not None  # last/, or the last.old/ a crash mid-swap leaves
    folder = output_folder(stage.name, cfg)
    try:
        with folder_lock(folder, stage.name) if folder else nullcontext():  # against `picoalign sft --out` beside
            result = stage.function(rules.call)(cfg if stage.config else root)
    except FolderBusy:
        raise
    except Exception as e:  # noqa: BLE001 - an optional stage (the report) warns and keeps the run
        if not rules.optional:
            raise
        warnings.warn(f"{stage.name} failed: {e}", stacklevel=2)
        return True
    if isinstance(result, Path):
        print(f"{stage.name}: {result}")
    return True


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="picoalign run", description=__doc__.split("\n\n")[0],
                                epilog=f"stages (run.stages, in this order): {', '.join(run_order())}")
    p.add_argument("--config", metavar="FILE", help="YAML preset (configs/default.yaml, gpu.yaml, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set sft.max_seconds=60 (repeatable)")
    p.add_argument("--tag", help="run name (runs/<tag>/); reuse a tag to resume")
    args = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would make the same files at once
        p.exit(2, "picoalign run: runs in one process; start sft, dpo or pretrain with torchrun instead\n")
    overrides = C.parse_overrides(args.overrides)
    if args.tag:
        overrides["tag"] = args.tag
    try:
        run_pipeline(args.config or default_preset(), overrides)
    except C.ConfigError as e:
        print(f"picoalign run: config error: {e}", file=sys.stderr)
        return 2
    except (StageFailed, BuiltinUnavailable, FolderBusy) as e:
        print(f"picoalign run: {e}", file=sys.stderr)
        return 1
    return 0


def default_preset() -> str | None:
    """configs/default.yaml as shipped in the package."""
    from importlib import resources

    path = resources.files("picoalign") / "configs" / "default.yaml"
    return str(path) if path.is_file() else None
