"""Markdown formatting shared by the report's sections (sections.py, rl.py): metrics with their
intervals, inline code, tables, clipped and fenced text."""

from __future__ import annotations

import json
import math
import re
import textwrap
from typing import Any

from picoalign.report.load import dig, num

DASH = "—"
SHARES = ("paragraphs", "finished")  # judges whose mean is a share of answers
WRAP = 100


def fmt_metric(key: str, value: Any) -> str:
    """A metric as the report shows it: '81.2%', '1.234', '+0.512', '—' for missing."""
    v = num(value)
    if v is None or math.isnan(v):
        return DASH
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if key.endswith("_acc") or key.endswith("accuracies") or key == "pref_acc":
        return f"{100 * v:.1f}%"
    if key.endswith("margin") or key.endswith("per_token") or key == "diff":
        return f"{v:+.3f}"
    if key == "answer_words":
        return f"{v:.0f}"
    if key.endswith("ppl"):
        return f"{v:.2f}" if v < 1000 else f"{v:,.0f}"
    if key == "kl_to_ref":
        return f"{v:.4f}"
    if key == "n_samples":
        return f"{v:.0f}"
    if key in SHARES:
        return f"{100 * v:.0f}%"
    return f"{v:.3f}"


def fmt_interval(key: str, model: dict) -> str:
    """A model's metric with its 95% interval where eval measured one: '0.052 [0.031, 0.074]'."""
    ci = dig(model, "judges", key) or dig(model, "intervals", key)
    return fmt_ci(key, ci, model.get(key, dig(ci, "mean")))


def fmt_ci(key: str, ci: Any, value: Any = None) -> str:
    """`value` (default: the interval's own mean) and, where `ci` has its ends, '[low, high]'."""
    text = fmt_metric(key, dig(ci, "mean") if value is None else value)
    if isinstance(ci, dict) and num(ci.get("ci_low")) is not None and num(ci.get("ci_high")) is not None:
        text += f" [{fmt_metric(key, ci['ci_low'])}, {fmt_metric(key, ci['ci_high'])}]"
    return text


def fmt_seconds(value: Any) -> str:
    s = num(value)
    if s is None or not math.isfinite(s) or s < 0:
        return DASH
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def code(value: Any) -> str:
    """`value` as inline code (backticks inside are replaced, so the span cannot break)."""
    return "`" + (DASH if value is None else str(value)).replace("`", "'").replace("\n", " ") + "`"


def plain(value: Any) -> str:
    """A value for a `...`-quoted slot of a phrase: backticks and newlines removed."""
    return (DASH if value is None else str(value)).replace("`", "'").replace("\n", " ")


def cell(text: Any) -> str:
    return str(text).replace("\n", " ").replace("|", "\\|")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def clip(text: Any, limit: int, t: dict) -> str:
    """`text` cut at a word boundary near `limit` characters, with a note of its full length."""
    if not isinstance(text, str):
        text = "" if text is None else json.dumps(text, ensure_ascii=False)
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    if space > limit * 0.8:
        cut = cut[:space]
    return cut.rstrip() + "\n" + t["clipped"].format(n=f"{len(text):,}")


def fence(text: str) -> str:
    """A fenced text block, wrapped to WRAP columns, whose fence no backtick run in `text` closes."""
    lines = []
    for line in text.splitlines() or [""]:
        lines += textwrap.wrap(line, WRAP, break_long_words=True, replace_whitespace=False) or [""]
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    bar = "`" * max(3, longest + 1)
    return "\n".join([bar + "text", *lines, bar])
