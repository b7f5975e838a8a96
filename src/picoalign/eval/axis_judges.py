"""The reader's axes as eval judges, beside darkness: fluency, repetition, spec, paragraphs,
finished. Each scores every sample row ({"prompt", "text", "finish_reason"}) with the pure
cores of eval/axes.py and is checked on hand-written pairs that differ in its axis only
(`samples/axis_pairs.jsonl`: {"id", "axis", "prompt", "better", "worse"}; a fluent story and the
same story garbled, a story that uses its spec and one that ignores it, the story and the same
story with a sentence looped, three paragraphs and the same text as one block or one line a
sentence). `finished` is a fact of the decoding (the answer ended before the cap), not a
judgment of the text, so it has no pairs.

A judge's `better` says which way is better (repetition: lower), so the report can say what
improved and what got worse.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from picoalign.eval import axes

AXIS_PAIRS = "axis_pairs.jsonl"


@dataclass
class AxisJudge:
    name: str
    score: Callable[[list[dict]], list[float | None]]  # sample rows -> scores (None: does not apply)
    about: str
    better: int = 1  # +1: higher is better; -1: lower is better
    axis: str = ""  # the rows of axis_pairs.jsonl that check it ("" = none)


def _spec(rows: list[dict]) -> list[float | None]:
    return [axes.spec_coverage(r["prompt"], r["text"]) for r in rows]


def _paragraphs(rows: list[dict]) -> list[float | None]:
    """1/0 where the prompt asks for a number of paragraphs; None where it asks none."""
    return [axes.paragraphs_ok(r["text"], r["prompt"]) if "paragraph" in axes._text(r["prompt"]).lower() else None
            for r in rows]


def _finished(rows: list[dict]) -> list[float | None]:
    return [axes.finished(r["finish_reason"]) if r.get("finish_reason") else None for r in rows]


def text_judges() -> dict[str, AxisJudge]:
    """The axes that need no model, by name."""
    return {j.name: j for j in [
        AxisJudge("repetition", lambda rows: [axes.repetition(r["text"]) for r in rows],
                  "rep-4: share of the answer's word 4-grams that repeat an earlier one (0 = none; lower is "
                  "better)", better=-1, axis="repetition"),
        AxisJudge("distinct_2", lambda rows: [axes.distinct_n(r["text"], 2) for r in rows],
                  "distinct-2: share of the answer's word bigrams that are distinct (higher = more varied)",
                  axis="repetition"),
        AxisJudge("spec", _spec, "spec coverage: mean over the spec's protagonist, supporting character, object, "
                  "setting and taboo rule of the share of each field's content words the story uses (the "
                  "protagonist by first name), in [0, 1]", axis="spec"),
        AxisJudge("paragraphs", _paragraphs, "share of answers with the number of paragraphs the prompt asks for "
                  "(2-4; a title line not counted)", axis="paragraphs"),
        AxisJudge("finished", _finished, "share of answers that ended by themselves before the length cap"),
    ]}


def fluency_judge(model, tokenizer, label: str, max_tokens: int, batch_size: int = 8) -> AxisJudge:
    """Fluency under a frozen scoring model named by `label` (which model, and why that one)."""
    def score(rows):
        return axes.fluency(model, tokenizer, [r["text"] for r in rows], batch_size=batch_size, max_tokens=max_tokens)
    return AxisJudge("fluency", score, f"mean log-probability per token (nats) of the answer, as plain text "
                     f"without the prompt, under {label}; higher is more fluent (a model finds repeated text "
                     f"likely: read it beside repetition)", axis="fluency")


def axis_pairs() -> list[dict]:
    """The hand-written pairs shipped with picoalign, one axis apart."""
    text = (resources.files("picoalign") / "samples" / AXIS_PAIRS).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def axis_accuracy(judge: AxisJudge, pairs: list[dict]) -> dict | None:
    """Share of the judge's axis pairs whose better answer it scores better (ties count half)."""
    mine = [p for p in pairs if p["axis"] == judge.axis]
    if not judge.axis or not mine:
        return None
    good = judge.score([{"prompt": p["prompt"], "text": p["better"]} for p in mine])
    bad = judge.score([{"prompt": p["prompt"], "text": p["worse"]} for p in mine])
    wins = 0.0
    for g, b in zip(good, bad):
        d = judge.better * ((g if _real(g) else 0.0) - (b if _real(b) else 0.0))
        wins += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
    return {"accuracy": round(wins / len(mine), 4), "n": len(mine)}


def _real(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))
