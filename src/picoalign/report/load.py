"""Read a run folder for the report: every part is optional and a bad file never raises.

    run = load_run("runs/demo")
    run.metrics        # None when metrics.json is missing, corrupt or not a JSON object
    run.problems       # one line per file that exists but could not be read (also warned)
    series(run.logs["sft"], "train", "loss")   # -> (steps, values)
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picoalign.io import read_jsonl_lenient
from picoalign.stages import logged

MODELS = ("base", "sft", "dpo")


@dataclass
class Run:
    """What a run folder holds; a part that is missing or unreadable is None or empty."""

    dir: Path
    config: dict | None = None
    meta: dict | None = None
    metrics: dict | None = None
    logs: dict[str, list[dict]] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return str(dig(self.metrics, "run", "tag") or self.dir.resolve().name)

    def model(self, name: str) -> dict:
        """The metrics of model `name` (base/sft/dpo); {} when it was not evaluated."""
        m = dig(self.metrics, "models", name)
        return m if isinstance(m, dict) else {}

    def evaluated(self) -> list[str]:
        return [m for m in MODELS if self.model(m)]


def note(problems: list[str], message: str) -> None:
    """Record a problem for the report's warning block and warn about it."""
    problems.append(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def dig(obj: Any, *keys: str) -> Any:
    """obj[k1][k2]... or None where a level is missing or not a mapping."""
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


def num(value: Any) -> float | None:
    """`value` as a float when it is a JSON number (not a bool); otherwise None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def read_log(run_dir: str | Path, stage: str) -> list[dict]:
    """The JSON-object rows of `logs/<stage>.jsonl` (torn or foreign lines are skipped)."""
    return [r for r in read_jsonl_lenient(Path(run_dir) / "logs" / f"{stage}.jsonl") if isinstance(r, dict)]


def series(rows: list[dict], kind: str, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` on rows of `kind`, by step; a step logged twice keeps its last value.

    A resumed run may log a step again; keeping the last value keeps one continuous curve.
    """
    by_step: dict[float, float] = {}
    for i, row in enumerate(rows):
        value = num(row.get(key))
        if row.get("kind") != kind or value is None:
            continue
        step = num(row.get("step"))
        by_step[float(i) if step is None else step] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def head_tail(values: list[float]) -> tuple[float, float] | None:
    """Means of the first and the last 10% of `values` (at least one each), NaNs left out."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    k = max(1, len(finite) // 10)
    return sum(finite[:k]) / k, sum(finite[-k:]) / k


def stage_seconds(run: Run, stage: str) -> float | None:
    """Wall time of `stage` from metrics.json, else from its log's last `elapsed` (or the data meta)."""
    value = num(dig(run.metrics, "run", "stage_seconds", stage))
    if value is not None:
        return value
    if stage == "data":
        return num(dig(run.meta, "seconds"))
    rows = run.logs.get(stage) or []
    elapsed = [num(r.get("elapsed")) for r in rows]
    elapsed = [e for e in elapsed if e is not None]
    return elapsed[-1] if elapsed else None


def _read(run_dir: Path, rel: str, parse: Callable[[str], Any], problems: list[str]) -> Any:
    path = run_dir / rel
    if not path.exists():
        return None
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except Exception as e:  # any parse error: the report shows the part as missing
        note(problems, f"`{rel}` could not be read ({type(e).__name__}: {_short(e)}); shown as missing")
        return None
    if not isinstance(value, dict):
        note(problems, f"`{rel}` does not hold a mapping (got {type(value).__name__}); shown as missing")
        return None
    return value


def _read_rows(run_dir: Path, rel: str, problems: list[str]) -> list[dict]:
    try:
        return [r for r in read_jsonl_lenient(run_dir / rel) if isinstance(r, dict)]
    except Exception as e:  # unreadable bytes, a folder in its place, ...
        note(problems, f"`{rel}` could not be read ({type(e).__name__}: {_short(e)}); shown as missing")
        return []


def _short(e: Exception, limit: int = 160) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_run(run_dir: str | Path) -> Run:
    """Read everything the report needs from `run_dir`; problems are recorded, never raised."""
    import yaml

    run_dir = Path(run_dir)
    run = Run(dir=run_dir)
    run.config = _read(run_dir, "config.yaml", yaml.safe_load, run.problems)
    run.meta = _read(run_dir, "data/dataset_meta.json", json.loads, run.problems)
    run.metrics = _read(run_dir, "metrics.json", json.loads, run.problems)
    for stage in logged():  # the stages whose registry entry says they log (stages.py)
        rows = _read_rows(run_dir, f"logs/{stage}.jsonl", run.problems)
        if rows:
            run.logs[stage] = rows
    run.samples = _read_rows(run_dir, "samples.jsonl", run.problems)
    return run


def frontier_points(metrics: dict) -> list[dict]:
    """The frontier's points (`picoalign frontier`), SFT first, then by sft_weight and β."""
    points = dig(metrics, "frontier", "points")
    if not isinstance(points, dict):
        return []
    rows = [p for p in points.values() if isinstance(p, dict) and num(p.get("kl_to_ref")) is not None]
    return sorted(rows, key=lambda p: (p.get("beta") is not None, num(p.get("sft_weight")) or 0.0,
                                       -(num(p.get("beta")) or 0.0)))
