"""The story task's `spec` reward, wrapping the scoring cores `eval` reports (eval/axes.py), so
that RL optimises what eval measures: the share of the spec the story uses (protagonist,
supporting character, object, setting, rule, read from the prompt), whether it has the asked
number of paragraphs, and whether it ended before the length cap.
"""

from __future__ import annotations


def spec_reward(prompts, completions, finish_reason=None, cap=None) -> list[float | None]:
    """Mean of three parts in [0, 1]: `spec_coverage`, `paragraphs_ok`, and `finished` (1 if the
    story ended by itself; left out where the finish reason is unknown). None for a prompt that
    is not a story brief (no spec fields in it)."""
    from picoalign.eval.axes import finished, paragraphs_ok, spec_coverage

    out: list[float | None] = []
    for i, (prompt, story) in enumerate(zip(prompts, completions)):
        coverage = spec_coverage(prompt, story)
        if coverage is None:
            out.append(None)
            continue
        parts = [coverage, paragraphs_ok(story, prompt)]
        if finish_reason is not None:
            parts.append(finished(finish_reason[i]))
        out.append(sum(parts) / len(parts))
    return out
