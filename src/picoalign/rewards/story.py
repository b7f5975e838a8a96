"""The story task's spec reward: how much of the brief a story uses, its paragraphs, its ending.

The brief is the story prompt of `picoalign data` (data/stories.py:format_prompt): lines
`Setting: ...`, `Protagonist: NAME, role`, `Supporting character: ...`, `Important object: ...`,
`Taboo rule: ...` and the constraint `- 2-4 paragraphs`. The scoring cores (spec coverage,
paragraph count) are the ones `eval` reports (eval/axes.py), so RL optimises what eval measures.
"""

from __future__ import annotations

import re

FIELDS = ("protagonist", "supporting character", "important object", "setting", "taboo rule")
PARAGRAPHS = re.compile(r"(\d+)\s*-\s*(\d+)\s+paragraphs", re.IGNORECASE)


def parse_brief(prompt: str) -> dict:
    """{field: value} for the spec fields the prompt names, and `paragraphs`: (low, high) or None."""
    spec = {}
    for line in str(prompt).splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in FIELDS and value.strip():
            spec[key.strip().lower()] = value.strip()
    found = PARAGRAPHS.search(str(prompt))
    spec["paragraphs"] = (int(found.group(1)), int(found.group(2))) if found else None
    return spec


def spec_reward(prompts, completions, finish_reason=None, cap=None) -> list[float | None]:
    """Mean of three parts in [0, 1]: the share of spec fields the story uses, 1 if its paragraph
    count is in the asked range (0 otherwise), 1 if it ended before the length cap. None for a
    prompt that is not a story brief."""
    from picoalign.eval.axes import paragraph_count, spec_coverage

    out: list[float | None] = []
    for i, (prompt, story) in enumerate(zip(prompts, completions)):
        brief = parse_brief(prompt)
        fields = {k: v for k, v in brief.items() if k in FIELDS}
        if not fields:
            out.append(None)
            continue
        parts = [spec_coverage(story, fields)]
        if brief["paragraphs"]:
            low, high = brief["paragraphs"]
            parts.append(1.0 if low <= paragraph_count(story) <= high else 0.0)
        if finish_reason is not None:
            parts.append(0.0 if finish_reason[i] == "length" else 1.0)
        out.append(sum(parts) / len(parts))
    return out
