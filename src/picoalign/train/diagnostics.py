"""What a DPO run's log says about how it went, for the stage's last lines and the report.

    from picoalign.train.diagnostics import displacement_warning
    displacement_warning(read_log("runs/demo", "dpo"))   # a warning sentence, or None

The complaint most often filed against DPO trainers: the margin between chosen and rejected
grows, the loss falls, and yet the chosen answers' log-probability falls too, below the
reference's: both answers are pushed down, the rejected one faster ("likelihood displacement";
Pal et al. 2024, the DPOP paper, arXiv 2402.13228; Razin et al. 2024, arXiv 2410.08847). The
policy then moves its mass to answers in neither set. We read it from TRL's logged metrics:
`rewards/chosen` = β·(log π − log π_ref) of the chosen answers, `rewards/margins`.
"""

from __future__ import annotations

MIN_STEPS = 4  # fewer logged steps say nothing about a trend

ADVICE = ("try sft_weight 0.1-1 (an SFT term that holds the chosen answers up), a lower lr, or a "
          "DPOP-style penalty on chosen log-probs below the reference's")


def _values(rows: list[dict], key: str) -> list[float]:
    out = []
    for row in rows:
        value = row.get(key)
        if row.get("kind") == "train" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(float(value))
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def displacement_warning(rows: list[dict]) -> str | None:
    """A warning when, over the run's second half against its first, the chosen answers' reward
    fell and ends below zero (their log-prob under the reference's) while the margin grew."""
    chosen, margin = _values(rows, "rewards/chosen"), _values(rows, "rewards/margins")
    n = min(len(chosen), len(margin))
    if n < MIN_STEPS:
        return None
    half = n // 2
    c0, c1 = _mean(chosen[:half]), _mean(chosen[half:n])
    m0, m1 = _mean(margin[:half]), _mean(margin[half:n])
    if not (c1 < c0 and c1 < 0 and m1 > m0):
        return None
    return (f"the chosen answers' log-probs fell below the reference's (reward/chosen {c0:+.3f} -> {c1:+.3f}, "
            f"means of the first and second half) while the margin grew ({m0:+.3f} -> {m1:+.3f}): both answers "
            f"are pushed down, the rejected faster; {ADVICE}")
