"""Training curves and metric bars for the report (matplotlib is imported only when drawing).

    from picoalign.report.plots import plot_curves, plot_metrics
    plot_curves("runs/demo", "runs/demo/report/curves.png")      # None when nothing was logged
    plot_metrics(read_json("runs/demo/metrics.json"), "runs/demo/report/metrics.png")

Figures are drawn on their own Agg canvas (`Figure` + `FigureCanvasAgg`, no pyplot): this works
headless and, unlike `matplotlib.use("Agg")`, leaves the backend of a notebook or GUI alone.
Each PNG is written atomically.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from picoalign.report.curves import Panel
from picoalign.report.load import MODELS, dig, frontier_points, num, read_log, series
from picoalign.report.sections import fmt_metric
from picoalign.stages import logged, reported

MODEL_COLORS = {"base": "#9e9e9e", "sft": "#1f77b4", "dpo": "#ff7f0e"}
DPI = 110


def panels() -> list[tuple[str, Panel]]:
    """(stage, panel) for every panel of curves.png, from each stage's registry entry (stages.py):
    the stages every run has first, in the registry's order, then the optional ones."""
    stages = sorted(reported(), key=lambda s: s.report.optional)
    return [(s.name, panel) for s in stages for panel in s.report.curves]


BARS = (  # metric key, title, better
    ("sft_test_loss", "SFT test loss", "lower is better"),
    ("dpo_hard_pref_acc", "Preference accuracy (held-out pairs)", "higher is better"),
    ("vader_darkness", "Darkness by VADER (independent)", "higher = darker"),
    ("horror_lexicon", "Horror lexicon score", "higher = more horror words"),
    ("horror_classifier", "Horror classifier score", "higher = more horror-like"),
)


def _interval(metrics: dict, model: str, key: str) -> tuple[float, float] | None:
    ci = dig(metrics, "models", model, "judges", key) or dig(metrics, "models", model, "intervals", key)
    low, high = num(dig(ci, "ci_low")), num(dig(ci, "ci_high"))
    return (low, high) if low is not None and high is not None else None


def ema(values: list[float], weight: float | None = None) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); NaNs pass through.

    The default weight grows with the length of the curve: 0 for 10 points, 0.9 for 100, at
    most 0.95, so a short curve is not flattened and a long one is readable.
    """
    if weight is None:
        weight = min(0.95, max(0.0, 1.0 - 10.0 / max(len(values), 1)))
    out, s, t = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(float("nan"))
            continue
        t += 1
        s = weight * s + (1 - weight) * v
        out.append(s / (1 - weight**t))
    return out


def write_png(fig: Any, out_png: str | Path) -> Path:
    """Render `fig` on an Agg canvas and write it as a palette PNG, atomically (temp file + rename)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image  # matplotlib's own dependency

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    # A 128-colour palette looks the same for line charts at a third of the size, which matters
    # because index.html embeds each chart once per language.
    image = Image.open(buf).convert("RGB").quantize(colors=128, method=Image.Quantize.FASTOCTREE)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_png.parent, prefix=f".{out_png.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_png


def _empty(ax: Any, title: str, text: str) -> None:
    ax.set_title(title, fontsize=10.5)
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=14, color="#888888")
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_panel(ax: Any, panel: Panel, rows: list[dict]) -> bool:
    """Draw one panel from a stage's log rows; False (and a note on the axes) when it has no data."""
    from matplotlib.ticker import PercentFormatter

    if not rows:
        _empty(ax, panel.title, "not run")
        return False
    drawn = False
    for kind, key, label, color in panel.lines:
        steps, values = series(rows, "train" if kind == "ref" else kind, key)
        if not values:
            continue
        drawn = True
        if kind == "ref":  # the frozen reference: one value per batch, its EMA is the level to read
            ax.plot(steps, ema(values) if len(values) >= 5 else values, color=color, lw=1.2, ls="--", label=label)
        elif kind == "eval":
            ax.plot(steps, values, color=color, marker="o", ms=5, lw=1, ls="--", label=label)
        elif len(values) >= 5:
            ax.plot(steps, values, color=color, lw=0.8, alpha=0.25)
            ax.plot(steps, ema(values), color=color, lw=2, label=f"{label} (EMA)")
        else:
            ax.plot(steps, values, color=color, lw=1.5, marker=".", label=label)
    if not drawn:
        _empty(ax, panel.title, "not logged")
        return False
    if panel.ref is not None:
        ax.axhline(panel.ref[0], color="#999999", lw=1, ls=":", label=panel.ref[1] or None)
    if panel.percent:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title(panel.title, fontsize=10.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.8)
    return True


def plot_curves(run_dir: str | Path, out_png: str | Path) -> Path | None:
    """Draw the training curves of `run_dir/logs/*.jsonl` into `out_png`; None (no file) when no
    stage logged anything drawable."""
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    logs = {stage: read_log(run_dir, stage) for stage in logged()}
    if not any(logs.values()):
        return None
    drawing = panels()
    rows = max(1, math.ceil(len(drawing) / 2))
    fig = Figure(figsize=(12, 4 * rows))
    # Fixed margins: a constrained layout costs a second full draw (~1 s) for the same picture.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.93, wspace=0.2, hspace=0.33)
    axes = fig.subplots(rows, 2).ravel()
    drawn = [_draw_panel(ax, panel, logs[stage]) for ax, (stage, panel) in zip(axes, drawing)]
    for ax in axes[len(drawing):]:
        ax.set_visible(False)
    if not any(drawn):
        return None
    fig.suptitle(f"Training curves: {run_dir.resolve().name}", fontsize=13, y=0.975)
    fig.text(0.5, 0.015, "faint: raw per-step values · bold: EMA smoothing · markers: validation evals",
             ha="center", fontsize=9, color="#666666")
    return write_png(fig, out_png)


def plot_metrics(metrics: dict, out_png: str | Path) -> Path | None:
    """Bars of base / SFT / DPO for test loss, preference accuracy and the two horror scores.

    None (and no file) when `metrics` has none of these numbers.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    values = {key: [num(dig(metrics, "models", m, key)) for m in MODELS] for key, _, _ in BARS}
    if all(v is None for vs in values.values() for v in vs):
        return None
    fig = Figure(figsize=(15, 3.6))
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.1, top=0.76, wspace=0.28)
    for ax, (key, title, better) in zip(fig.subplots(1, len(BARS)), BARS):
        vals = values[key]
        if all(v is None for v in vals):
            _empty(ax, title, "not measured")
            continue
        heights = [v if v is not None and math.isfinite(v) else 0.0 for v in vals]
        cis = [_interval(metrics, m, key) for m in MODELS]
        yerr = [[h - ci[0] if ci else 0.0 for h, ci in zip(heights, cis)],
                [ci[1] - h if ci else 0.0 for h, ci in zip(heights, cis)]]
        bars = ax.bar([m.upper() if m != "base" else "base" for m in MODELS], heights,
                      color=[MODEL_COLORS[m] for m in MODELS], yerr=yerr if any(cis) else None, capsize=4,
                      error_kw={"elinewidth": 1, "ecolor": "#333333"})
        ax.bar_label(bars, labels=[fmt_metric(key, v) for v in vals], fontsize=9, padding=2)
        if key.endswith("pref_acc"):
            ax.axhline(0.5, color="#999999", lw=1, ls=":")
            ax.set_ylim(0, 1.1)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        else:
            ends = [ci[1] for ci in cis if ci] + heights
            lows = [ci[0] for ci in cis if ci] + heights
            top = max(ends)
            ax.set_ylim(min(0.0, min(lows) * 1.15), top * 1.18 if top > 0 else 1.0)
        ax.set_title(f"{title}\n({better})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Held-out metrics by model (error bars: 95% bootstrap intervals)", fontsize=12)
    return write_png(fig, out_png)


def plot_frontier(metrics: dict, out_png: str | Path) -> Path | None:
    """Judge score vs KL to the SFT reference, one point per β (error bars: 95% intervals), as the
    DPO paper's reward-vs-KL figure; one line per sft_weight. None when there is no frontier."""
    from matplotlib.figure import Figure

    points = frontier_points(metrics)
    judge = dig(metrics, "frontier", "judge") or "vader_darkness"
    if not points:
        return None
    fig = Figure(figsize=(7, 4.6))
    ax = fig.subplots()
    sft = [p for p in points if p.get("beta") is None]
    by_weight: dict[tuple[str, float], list[dict]] = {}  # one line per loss and sft_weight
    for p in points:
        if p.get("beta") is not None:
            by_weight.setdefault((str(p.get("loss") or "sigmoid"), num(p.get("sft_weight")) or 0.0), []).append(p)
    for k, ((loss, weight), group) in enumerate(sorted(by_weight.items())):
        line = sft + group  # from the SFT point (KL 0) out to the smallest β
        xs = [num(p["kl_to_ref"]) for p in line]
        ys = [num(dig(p, judge, "mean")) for p in line]
        lows = [y - (num(dig(p, judge, "ci_low")) or y) for p, y in zip(line, ys)]
        highs = [(num(dig(p, judge, "ci_high")) or y) - y for p, y in zip(line, ys)]
        color = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")[k % 4]
        ax.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=3, color=color, label=f"{loss}, sft_weight {weight:g}")
        for p, x, y in zip(group, xs[len(sft):], ys[len(sft):]):
            ax.annotate(f"β={num(p['beta']):g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    for p in sft:
        ax.annotate("SFT", (num(p["kl_to_ref"]), num(dig(p, judge, "mean"))), textcoords="offset points",
                    xytext=(5, -12), fontsize=8)
    ax.set_xlabel("KL(π ‖ π_SFT) on the model's own answers (nats/token)")
    ax.set_ylabel(f"{judge} (mean, higher = darker)")
    ax.set_title("Reward vs KL: each point one DPO run from the SFT model", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return write_png(fig, out_png)
