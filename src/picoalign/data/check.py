"""`picoalign check-data`: read data files the way training will, and say what is in them.

    picoalign check-data my_sft.jsonl
    picoalign check-data prefs.csv --kind preference --min-confidence 0.7
    picoalign check-data thumbs.jsonl --kind unpaired       # KTO: prompt, completion, label
    picoalign check-data prefs.parquet --columns prompt=question,chosen=good,rejected=bad
    picoalign check-data hf:trl-lib/ultrafeedback_binarized:train   # online only

For each file: its kind, the row count, mean/max characters of the prompt and the answers, the
multi-turn rows and, for preference files, the pairs `--min-confidence` drops; for unpaired
(KTO) files, how many answers are desirable and how many not (a pair there counts as one of each). A file that
cannot be used prints `file:line: field 'x': problem` and the exit status is 1, so the check can
guard a script before a long run. Nothing is written. Rows are read one at a time and only
counts are kept, so a large parquet file is checked without being held whole.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from picoalign.data.formats import (
    DataError,
    iter_preferences,
    iter_rows,
    iter_sft,
    iter_unpaired,
    keeps,
    parse_columns,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="picoalign check-data",
        description="Read data files the way training will and print what is in them.",
    )
    p.add_argument("files", nargs="+", metavar="FILE",
                   help=".jsonl, .json, .csv, .parquet or .arrow file, a parquet or save_to_disk folder, "
                        "or hf:OWNER/NAME:SPLIT")
    p.add_argument("--columns", default="", metavar="MAP",
                   help="the set's own column names, e.g. prompt=question,chosen=good,rejected=bad")
    p.add_argument("--kind", choices=("sft", "preference", "unpaired", "auto"), default="auto",
                   help="how to read the files (auto: 'kto' in the name or a `label` in the first row is unpaired, "
                        "'dpo'/'pref' in the name or chosen/rejected preference, else sft)")
    p.add_argument("--min-confidence", "--min_confidence", type=float, default=0.0, metavar="X",
                   help="count the preference pairs whose confidence is below X as dropped")
    return p


def guess_kind(path: str | Path, columns: dict[str, str] | None = None) -> str:
    """'unpaired' for names with kto or a first row with a label; 'preference' for names with
    dpo/pref or a first row with chosen/rejected; else 'sft'."""
    name = Path(path).name.lower()
    first = next(iter_rows(path, columns), None)
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


class Counts:
    """What describe() reports, added up one record at a time (no record is kept)."""

    def __init__(self, fields: tuple[str, ...]) -> None:
        self.fields, self.rows, self.multi, self.dropped, self.good = fields, 0, 0, 0, 0
        self.total = dict.fromkeys(fields, 0)
        self.most = dict.fromkeys(fields, 0)

    def add(self, record: dict, multi: bool) -> None:
        self.rows += 1
        self.multi += multi
        self.good += bool(record.get("label"))
        for name in self.fields:
            size = _chars(record[name])
            self.total[name] += size
            self.most[name] = max(self.most[name], size)

    def length_lines(self) -> list[str]:
        return [f"  {name} chars: mean {self.total[name] / max(self.rows, 1):.1f}, max {self.most[name]}"
                for name in self.fields]


FIELDS = {"sft": ("prompt", "response"), "unpaired": ("prompt", "completion"),
          "preference": ("prompt", "chosen", "rejected")}


def describe(path: str | Path, kind: str = "auto", min_confidence: float = 0.0,
             columns: dict[str, str] | None = None) -> list[str]:
    """The report lines for one file; raises DataError when the file cannot be used."""
    kind = guess_kind(path, columns) if kind == "auto" else kind
    counts = Counts(FIELDS[kind])
    if kind == "sft":
        for r in iter_sft(path, columns):
            counts.add(r, _is_multi_turn(r.get("messages", [])))
    elif kind == "unpaired":
        for r in iter_unpaired(path, min_confidence, columns):
            counts.add(r, _pair_is_multi_turn(r["prompt"]))
    else:
        for r in iter_preferences(path, columns):
            if keeps(r, min_confidence):
                counts.add(r, _pair_is_multi_turn(r["prompt"]))
            else:
                counts.dropped += 1
    if counts.rows + counts.dropped == 0:
        raise DataError(f"{path}: no rows (the file is empty)")
    lines = [str(path), f"  kind: {kind}", f"  rows: {counts.rows}", *counts.length_lines(),
             f"  multi-turn rows: {counts.multi}"]
    if kind == "unpaired":
        lines.append(f"  desirable (label true): {counts.good}, undesirable (label false): {counts.rows - counts.good}")
    if kind == "preference":
        lines.append(f"  dropped by min-confidence {min_confidence:g}: {counts.dropped}")
    return lines


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        columns = parse_columns(args.columns)
    except DataError as e:
        print(f"picoalign check-data: error: {e}", file=sys.stderr)
        return 2
    status = 0
    for path in args.files:
        try:
            lines = describe(path, args.kind, args.min_confidence, columns)
        except (DataError, OSError) as e:
            print(f"picoalign check-data: error: {e}", file=sys.stderr)
            status = 1
            continue
        print("\n".join(lines))
    return status
