"""The story task's `spec` reward, wrapping the scoring cores `eval` reports (eval/axes.py), so
that RL optimises what eval measures: the share of the spec the story uses (protagonist,
supporting character, object, setting, rule, read from the prompt), scaled by whether it has the
asked number of paragraphs and whether it ended before the length cap.
"""

from __future__ import annotations


def spec_reward(prompts, completions, finish_reason=None, cap=None) -> list[float | None]:
    """`spec_coverage` × the mean of 1, `paragraphs_ok` and `finished` (1 if the story ended by
    itself; left out where the finish reason is unknown), in [0, 1]: the format parts count only
    as far as the story follows the spec. None for a prompt that is not a story brief.

    Why a product: as a plain mean of the three, a GRPO run (story preset, darkness and fluency
    pulling away from the spec's wording) raised the reward +0.35 by ending its stories while its
    coverage of the spec fell from 0.57 to 0.20; a story that ignores the spec now scores 0."""
    from picoalign.eval.axes import finished, paragraphs_ok, spec_coverage

    out: list[float | None] = []
    for i, (prompt, story) in enumerate(zip(prompts, completions)):
        coverage = spec_coverage(prompt, story)
        if coverage is None:
            out.append(None)
            continue
        form = [1.0, paragraphs_ok(story, prompt)]
        if finish_reason is not None:
            form.append(finished(finish_reason[i]))
        out.append(coverage * sum(form) / len(form))
    return out
