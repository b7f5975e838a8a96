"""Style judges for generated stories: one independent, two trained or built here.

`vader_darkness` is the primary judge: VADER (Hutto & Gilbert, 2014; the `vaderSentiment`
package, a hand-built valence lexicon with rules for negation, intensifiers and "but"),
which nobody here trained or tuned. Score = the share of the text's sentiment that is
negative minus the share that is positive (VADER's `neg - pos`, in [-1, 1]): higher is
darker. It measures the emotional valence of the words, not horror as a genre, craft or
fluency: calm prose about a terrible thing scores near 0, a happy ending scores low however
eerie its first half, and a text that repeats "afraid" scores as very dark. Its accuracy on
hand-written pairs (`samples/judge_pairs.jsonl`, stories unlike the training templates) is
reported beside it, so a reader knows how far to trust it.

`horror_classifier` and `horror_lexicon` (eval/style.py) stay as secondary scores: the first
is trained on the run's own training pairs, the second counts a fixed list of dark words.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

PRIMARY = "vader_darkness"
JUDGE_PAIRS = "judge_pairs.jsonl"  # in picoalign/samples: {"id", "prompt", "dark", "wholesome"}


@dataclass
class Judge:
    name: str
    score: Callable[[list[str]], list[float]]  # texts -> scores, higher = darker
    about: str


_vader = None


def vader_darkness(texts: list[str]) -> list[float]:
    global _vader
    if _vader is None:  # the lexicon is read once (~15 ms)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _vader = SentimentIntensityAnalyzer()
    return [(lambda s: s["neg"] - s["pos"])(_vader.polarity_scores(t)) for t in texts]


VADER = Judge(PRIMARY, vader_darkness,
              "VADER sentiment (vaderSentiment, Hutto & Gilbert 2014; not trained on this run's data): "
              "negative minus positive share of the text's sentiment, in [-1, 1]; measures the valence "
              "of the words, not horror, quality or fluency")


def judge_pairs() -> list[dict]:
    """The hand-written held-out pairs shipped with picoalign."""
    text = (resources.files("picoalign") / "samples" / JUDGE_PAIRS).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pair_accuracy(score: Callable[[list[str]], list[float]], pairs: list[dict]) -> dict:
    """Share of pairs whose dark story scores darker than its wholesome one (ties count half)."""
    dark = score([p["dark"] for p in pairs])
    light = score([p["wholesome"] for p in pairs])
    wins = sum(1.0 if d > w else 0.5 if d == w else 0.0 for d, w in zip(dark, light))
    return {"accuracy": round(wins / max(len(pairs), 1), 4), "n": len(pairs)}
