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

import math
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from picoalign import config as C
from picoalign.io import atomic_write_text, read_json, write_json
from picoalign.models.builtin import BuiltinUnavailable

SECTIONS = {"data": C.DataConfig, "tokenizer": C.TokenizerConfig, "pretrain": C.PretrainConfig,
            "sft": C.SFTConfig, "dpo": C.DPOConfig, "eval": C.EvalConfig}


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
        self.file.write(line.rstrip() + "\n")
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
    own = {k: v for k, v in tree.items() if k not in SECTIONS and k != "run"}
    own = C.deep_merge(own, tree.get("run") or {})  # `--set run.model=...` as in the YAML
    run = C.load_config(C.RunConfig, path, own, environ=environ, section="run")
    run.tag = run.tag or time.strftime("%Y%m%d-%H%M%S")
    root = Path(run.runs_dir) / run.tag
    shared = {"device": run.device, "dtype": run.dtype, "seed": run.seed}
    pretrained = "pretrain" in run.stage_names()
    base = str(root / "checkpoints" / "base") if pretrained else run.model
    forced = {
        "data": {"out": str(root / "data"), "seed": run.seed},
        "tokenizer": {"data": str(root / "data"), "out": str(root / "tokenizer")},
        "pretrain": {"data": str(root / "data"), "out": str(root / "checkpoints" / "base"), "logs": str(root / "logs"),
                     "tokenizer": str(root / "tokenizer")},
        "sft": {"data": str(root / "data"), "out": str(root / "checkpoints" / "sft"), "logs": str(root / "logs"),
                "model": base},
        "dpo": {"data": str(root / "data"), "out": str(root / "checkpoints" / "dpo"), "logs": str(root / "logs"),
                "model": str(root / "checkpoints" / "sft")} | _orpo_settings(run, tree, base),
        "eval": {"run": str(root), "data": str(root / "data"), "out": str(root)},
    }
    configs = {"run": run, "root": root}
    for name, cls in SECTIONS.items():
        names = {f for f in cls.__dataclass_fields__}
        base = {k: v for k, v in shared.items() if k in names}
        extra = C.deep_merge(tree.get(name, {}) or {}, forced[name])
        configs[name] = C.load_config(cls, path, extra, environ=environ, section=name, base=base, name=name)
        if getattr(configs[name], "mlflow_uri", None) == "":  # not chosen: the run keeps its own store
            configs[name].mlflow_uri = str(root / "mlruns")
    return configs


def _orpo_settings(run: C.RunConfig, tree: Mapping, base: str) -> dict:
    """With run.method=orpo the dpo stage is ORPO from the base model: ORPO's NLL term does SFT's work,
    so no sft_weight on top; a dpo.loss other than orpo asks for two different things."""
    if run.method != "orpo":
        return {}
    asked = (tree.get("dpo") or {}).get("loss")
    if asked not in (None, "orpo"):
        raise C.ConfigError(f"run.method=orpo trains the dpo stage with loss=orpo; drop dpo.loss={asked} "
                            "(or use run.method=sft+dpo for SFT, then that loss)")
    return {"loss": "orpo", "model": base, "sft_weight": 0.0}


def run_pipeline(path: str | None = None, overrides: Iterable[str] | Mapping = (), environ=None) -> Path:
    """Run the stages of the pipeline; returns the run folder."""
    from picoalign.models.load import ensure_builtin_file

    configs = resolve_configs(path, overrides, environ)
    root: Path = configs["root"]
    first_trained = "sft" if configs["run"].method == "sft+dpo" else "dpo"
    if first_trained in configs["run"].stage_names():
        ensure_builtin_file(configs[first_trained].model)  # before any work: no file, no run
    root.mkdir(parents=True, exist_ok=True)
    resolved = {"run": C.to_dict(configs["run"]), **{n: C.to_dict(configs[n]) for n in SECTIONS}}
    atomic_write_text(root / "config.yaml", yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
    with open(root / "output.log", "a", encoding="utf-8") as file:
        out, err = sys.stdout, sys.stderr
        logs = LogLines(file), LogLines(file)  # one each: a bar on stderr does not swallow a print's line
        sys.stdout, sys.stderr = _Tee(out, logs[0]), _Tee(err, logs[1])
        try:
            run = configs["run"]
            print(f"run: {root} (stages {','.join(run.stage_names())}; method {run.method})")
            for stage in run.stage_names():
                _timed(root, stage, lambda stage=stage: STAGE_RUNNERS[stage](configs))
            print(f"run: finished; report at {root / 'report' / 'index.html'}")
        finally:
            sys.stdout, sys.stderr = out, err
            for log in logs:
                log.close()
    return root


def _timed(root: Path, stage: str, fn) -> None:
    t0 = time.time()
    try:
        did = fn()
    except StageFailed:
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


def _rows(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _run_data(configs) -> bool:
    cfg = configs["data"]
    if (Path(cfg.out) / "dataset_meta.json").exists():
        print("data: already made, skipped")
        return False
    from picoalign.data.make import make_data

    make_data(cfg)
    return True


def _run_training(configs, stage: str) -> bool:
    from picoalign.models.load import read_marker

    cfg = configs[stage]
    out = Path(cfg.out)
    if read_marker(out).get("complete"):
        print(f"{stage}: already complete, skipped")
        return False
    if hasattr(cfg, "train_file") and _rows(Path(cfg.data) / cfg.train_file) == 0:
        warnings.warn(f"{stage}: {Path(cfg.data) / cfg.train_file} is empty; stage skipped", stacklevel=2)
        return False
    if stage == "dpo" and configs["run"].method == "sft+dpo" and not read_marker(cfg.model).get("complete"):
        warnings.warn("dpo: no finished SFT checkpoint to start from; stage skipped", stacklevel=2)
        return False
    from picoalign.train.loop import resumable

    cfg.resume = resumable(out) is not None  # last/, or the last.old/ a crash mid-swap leaves
    if stage == "pretrain":
        from picoalign.train.pretrain import pretrain as train
    elif stage == "sft":
        from picoalign.train.sft import sft as train
    else:
        from picoalign.train.dpo import dpo as train
    train(cfg)
    return True


def _run_eval(configs) -> bool:
    from picoalign.eval.evaluate import evaluate, run_models

    metrics = configs["root"] / "metrics.json"
    done = read_json(metrics).get("models", {}) if metrics.exists() else {}
    if done and set(run_models(configs["root"])) <= set(done):
        print("eval: already done, skipped")
        return False
    if not run_models(configs["root"]):
        warnings.warn("eval: no trained models in this run; stage skipped", stacklevel=2)
        return False
    evaluate(configs["eval"])
    return True


def _run_tokenizer(configs) -> bool:
    cfg = configs["tokenizer"]
    if (Path(cfg.out) / "tokenizer.json").exists():
        print("tokenizer: already trained, skipped")
        return False
    from picoalign.models.tokenizer import train_tokenizer

    train_tokenizer(cfg)
    return True


def _run_report(configs) -> bool:
    try:
        from picoalign.report.build import build_report

        print(f"report: {build_report(configs['root'])}")
    except Exception as e:  # noqa: BLE001 - the report is optional: warn, keep the run
        warnings.warn(f"report failed: {e}", stacklevel=2)
    return True


STAGE_RUNNERS = {
    "data": _run_data,
    "tokenizer": _run_tokenizer,
    "pretrain": lambda c: _run_training(c, "pretrain"),
    "sft": lambda c: _run_training(c, "sft"),
    "dpo": lambda c: _run_training(c, "dpo"),
    "eval": _run_eval,
    "report": _run_report,
}


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="picoalign run", description=__doc__.split("\n\n")[0])
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
    except (StageFailed, BuiltinUnavailable) as e:
        print(f"picoalign run: {e}", file=sys.stderr)
        return 1
    return 0


def default_preset() -> str | None:
    """configs/default.yaml as shipped in the package."""
    from importlib import resources

    path = resources.files("picoalign") / "configs" / "default.yaml"
    return str(path) if path.is_file() else None
