"""`picoalign check-data`: read data files the way training will, and say what is in them.

    picoalign check-data my_sft.jsonl
    picoalign check-data prefs.csv --kind preference --min-confidence 0.7
    picoalign check-data thumbs.jsonl --kind unpaired       # KTO: prompt, completion, label

For each file: its kind, the row count, mean/max characters of the prompt and the answers, the
multi-turn rows and, for preference files, the pairs `--min-confidence` drops; for unpaired
(KTO) files, how many answers are desirable and how many not (a pair there counts as one of each). A file that
cannot be used prints `file:line: field 'x': problem` and the exit status is 1, so the check can
guard a script before a long run. Nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from picoalign.data.formats import (
    DataError,
    iter_rows,
    keeps,
    read_preferences,
    read_sft,
    read_unpaired,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="picoalign check-data",
        description="Read data files the way training will and print what is in them.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help=".jsonl, .json or .csv data file")
    p.add_argument("--kind", choices=("sft", "preference", "unpaired", "auto"), default="auto",
                   help="how to read the files (auto: 'kto' in the name or a `label` in the first row is unpaired, "
                        "'dpo'/'pref' in the name or chosen/rejected preference, else sft)")
    p.add_argument("--min-confidence", "--min_confidence", type=float, default=0.0, metavar="X",
                   help="count the preference pairs whose confidence is below X as dropped")
    return p


def guess_kind(path: str | Path) -> str:
    """'unpaired' for names with kto or a first row with a label; 'preference' for names with
    dpo/pref or a first row with chosen/rejected; else 'sft'."""
    name = Path(path).name.lower()
    first = next(iter_rows(path), None)
    if "kto" in name or (first and "label" in first[1]):
        return "unpaired"
    if "dpo" in name or "pref" in name:
        return "preference"
    return "preference" if first and {"chosen", "rejected"} & first[1].keys() else "sft"


def _chars(value: str | list[dict]) -> int:
    return len(value) if isinstance(value, str) else sum(len(m["content"]) for m in value)


def _is_multi_turn(messages: list[dict]) -> bool:
    roles = [m["role"] for m in messages]
    return roles.count("user") > 1 or roles.count("assistant") > 1


def _pair_is_multi_turn(prompt: str | list[dict]) -> bool:
    """A pair is multi-turn when its prompt already holds an exchange."""
    roles = [] if isinstance(prompt, str) else [m["role"] for m in prompt]
    return roles.count("user") > 1 or "assistant" in roles


def _length_line(name: str, rows: list[dict]) -> str:
    sizes = [_chars(r[name]) for r in rows]
    mean = sum(sizes) / len(sizes) if sizes else 0.0
    return f"  {name} chars: mean {mean:.1f}, max {max(sizes, default=0)}"


def describe(path: str | Path, kind: str = "auto", min_confidence: float = 0.0) -> list[str]:
    """The report lines for one file; raises DataError when the file cannot be used."""
    kind = guess_kind(path) if kind == "auto" else kind
    if kind == "sft":
        rows, dropped, fields = read_sft(path), 0, ("prompt", "response")
        multi = sum(_is_multi_turn(r.get("messages", [])) for r in rows)
    elif kind == "unpaired":
        rows, dropped, fields = read_unpaired(path, min_confidence), 0, ("prompt", "completion")
        multi = sum(_pair_is_multi_turn(r["prompt"]) for r in rows)
    else:
        every = read_preferences(path)
        rows = [r for r in every if keeps(r, min_confidence)]
        dropped, fields = len(every) - len(rows), ("prompt", "chosen", "rejected")
        multi = sum(_pair_is_multi_turn(r["prompt"]) for r in rows)
    lines = [str(path), f"  kind: {kind}", f"  rows: {len(rows)}"]
    lines += [_length_line(name, rows) for name in fields]
    lines.append(f"  multi-turn rows: {multi}")
    if kind == "unpaired":
        good = sum(r["label"] for r in rows)
        lines.append(f"  desirable (label true): {good}, undesirable (label false): {len(rows) - good}")
    if kind == "preference":
        lines.append(f"  dropped by min-confidence {min_confidence:g}: {dropped}")
    return lines


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    status = 0
    for path in args.files:
        try:
            lines = describe(path, args.kind, args.min_confidence)
        except (DataError, OSError) as e:
            print(f"picoalign check-data: error: {e}", file=sys.stderr)
            status = 1
            continue
        print("\n".join(lines))
    return status
