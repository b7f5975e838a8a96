"""`picoalign report`: the results folder of a run, in English and Chinese, Markdown and HTML.

    picoalign report --run runs/demo        # writes runs/demo/report/ and prints its path

    from picoalign.report.build import build_report
    build_report("runs/demo")                # -> Path("runs/demo/report")

`report/` gets curves.png, metrics.png, REPORT.md, REPORT.zh.md, index.html (both languages,
images embedded, opens offline) and INDEX.md (what is where). Every part of the run is
optional: a missing stage shows as "missing / not run", and a part that cannot be read, drawn
or written up becomes a warning line in the report and a `warnings.warn`, never an exception.
Every file is written atomically.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
import warnings
from collections.abc import Sequence
from html import escape
from pathlib import Path

from picoalign.io import atomic_write_text
from picoalign.report import html
from picoalign.report.load import Run, load_run, note
from picoalign.report.plots import plot_curves, plot_frontier, plot_metrics
from picoalign.report.sections import SECTIONS, SPLITS, code, header
from picoalign.report.strings import EN, STRINGS
from picoalign.stages import reported

RUN_FILES = [
    ("config.yaml", "resolved run config: every setting the run used"),
    ("output.log", "console output of the run"),
    ("data/dataset_meta.json", "how the data was made: source, seed, requested sizes, counts"),
    *((f"data/sft_{s}.jsonl", f"SFT rows, {s} split") for s in SPLITS),
    *((f"data/dpo_{s}.jsonl", f"preference pairs, {s} split") for s in SPLITS),
    ("data/dpo_test_hard.jsonl", "held-out hard test pairs: darker vs milder, on-spec vs off-spec (story data)"),
    ("checkpoints/base", "pretrained base model (only when pretraining ran)"),
    ("checkpoints/sft", "SFT model or adapter, saved with its config"),
    ("checkpoints/dpo", "DPO model or adapter, saved with its config"),
    ("metrics.json", "held-out metrics of the base, SFT and DPO models"),
    ("samples.jsonl", "generations of each model, with their style scores"),
]


def run_files() -> list[tuple[str, str]]:
    """The files of a run folder INDEX.md lists: RUN_FILES, each logging stage's log (stages.py)
    before metrics.json."""
    logs = [(f"logs/{s.name}.jsonl", f"{s.report.title['en']} log: one JSON line per step or eval"
             + (" (optional stage)" if s.report.optional else "")) for s in reported() if s.report.log]
    return RUN_FILES[:-2] + logs + RUN_FILES[-2:]
REPORT_FILES = [
    ("REPORT.md", "the report in English"),
    ("REPORT.zh.md", "the report in Chinese (中文报告)"),
    ("index.html", "both reports in one self-contained page (images embedded; opens offline)"),
    ("curves.png", "training curves: SFT, DPO (and pretraining)"),
    ("metrics.png", "held-out metrics of base, SFT and DPO as bars"),
    ("INDEX.md", "this file"),
]


def build_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report/` and return its path; raises only when `run_dir` is not a folder
    or `report/` cannot be written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    run = load_run(run_dir)
    problems = list(run.problems)
    images = _draw(run, out, problems)
    built = time.strftime("%Y-%m-%d %H:%M:%S")
    docs = {lang: render(run, STRINGS[lang], images, built, problems) for lang in STRINGS}
    for lang, text in docs.items():
        atomic_write_text(out / STRINGS[lang]["file"], text)
    atomic_write_text(out / "index.html", _html_page(run, docs, images, out))
    try:
        index = _index(run, out)
    except Exception as e:
        warnings.warn(f"INDEX.md could not be listed ({type(e).__name__}: {e})", UserWarning, stacklevel=2)
        index = "# Files\n\n" + "\n".join(f"- [{name}]({name}): {what}" for name, what in REPORT_FILES) + "\n"
    atomic_write_text(out / "INDEX.md", index)
    return out


def render(run: Run, t: dict, images: set[str], built: str, problems: list[str]) -> str:
    """One language's REPORT.md: each section built on its own, a failing one replaced by a warning."""
    parts, failures = [], []
    for key, section in SECTIONS:
        try:
            body = section(run, t, images)
        except Exception as e:  # a report must come out whatever the run folder holds
            error = f"{type(e).__name__}: {e}"
            failures.append(f"section '{EN[key]}' could not be built ({error})")
            warnings.warn(f"report section '{EN[key]}' ({t['file']}) failed: {error}", UserWarning, stacklevel=2)
            body = t["section_failed"].format(error=error)
        parts.append(f"## {t[key]}\n\n{body}")
    try:
        head = header(run, t, built, problems + failures)
    except Exception as e:
        warnings.warn(f"report header failed: {type(e).__name__}: {e}", UserWarning, stacklevel=2)
        head = "# picoalign run report"
    return "\n\n".join([head, *parts]) + "\n"


def _draw(run: Run, out: Path, problems: list[str]) -> set[str]:
    """Draw the charts; returns the names drawn. A chart not drawn this time is removed, not left stale."""
    charts = {
        "curves.png": lambda path: plot_curves(run.dir, path),
        "metrics.png": lambda path: plot_metrics(run.metrics or {}, path),
        "frontier.png": lambda path: plot_frontier(run.metrics or {}, path),
    }
    images = set()
    for name, draw in charts.items():
        try:
            if draw(out / name) is not None:
                images.add(name)
        except Exception as e:
            note(problems, f"`report/{name}` could not be drawn ({type(e).__name__}: {e})")
        if name not in images:
            (out / name).unlink(missing_ok=True)
    return images


def _html_page(run: Run, docs: dict[str, str], images: set[str], out: Path) -> str:
    cache: dict[str, str] = {}

    def image(src: str) -> str | None:
        if src not in images:  # only the charts we drew: no paths from elsewhere
            return None
        if src not in cache:
            cache[src] = "data:image/png;base64," + base64.b64encode((out / src).read_bytes()).decode("ascii")
        return cache[src]

    labels = {"en": "English", "zh": "中文"}
    try:
        return html.page(f"picoalign report: {run.tag}",
                         [(lang, labels.get(lang, lang), html.to_html(md, image, lang)) for lang, md in docs.items()])
    except Exception as e:  # fall back to the Markdown as text, still one offline page
        warnings.warn(f"index.html: HTML conversion failed ({type(e).__name__}: {e}); wrote plain text", stacklevel=2)
        body = "".join(f'<pre id="{escape(lang)}">{escape(md)}</pre>' for lang, md in docs.items())
        return f'<!doctype html><html><head><meta charset="utf-8"><title>picoalign report</title></head><body>{body}</body></html>\n'


def _status(path: Path) -> str:
    if path.is_dir():
        return f"present, {sum(1 for p in path.rglob('*') if p.is_file())} files"
    if path.is_file():
        size = path.stat().st_size
        return f"present, {size / 1024:.1f} kB" if size >= 1024 else f"present, {size} B"
    return "missing"


def _index(run: Run, out: Path) -> str:
    """INDEX.md: every file of the run folder and of report/, linked relative to report/."""
    lines = [f"# Files of run {code(run.tag)}", "",
             "Links are relative to this folder (`report/`). Missing parts are stages that did not run.", "",
             "## The run folder", "", "| Path | What | Status |", "|---|---|---|"]
    known = {"report"}
    for rel, what in run_files():
        path = run.dir / rel
        known.add(rel.split("/")[0])
        link = f"[{rel}](../{rel}{'/' if path.is_dir() else ''})" if path.exists() else f"`{rel}`"
        lines.append(f"| {link} | {what} | {_status(path)} |")
    try:
        others = sorted(p.name for p in run.dir.iterdir() if p.name not in known and not p.name.startswith("."))
    except OSError:
        others = []
    for name in others:
        lines.append(f"| [{name}](../{name}) | (not written by picoalign's stages) | {_status(run.dir / name)} |")
    lines += ["", "## This folder: `report/`", "", "| File | What | Status |", "|---|---|---|"]
    for name, what in REPORT_FILES:
        status = "this file" if name == "INDEX.md" else _status(out / name)
        lines.append(f"| [{name}]({name}) | {what} | {status} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="picoalign report",
        description="Build a run's results report in <run>/report/: REPORT.md, REPORT.zh.md, "
        "index.html (self-contained), curves.png, metrics.png and INDEX.md.",
    )
    parser.add_argument("--run", required=True, metavar="DIR", help="the run folder, e.g. runs/demo")
    args = parser.parse_args(argv)
    try:
        out = build_report(args.run)
    except OSError as e:
        print(f"picoalign report: error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
