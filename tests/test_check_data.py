"""`picoalign check-data`: the per-file summary, the kind guess, and errors (exit 1, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

from picoalign.cli import main


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_sft_summary(tmp_path, capsys):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
            {"role": "user", "content": "Go on"}, {"role": "assistant", "content": "Sure."}]
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "abcd", "response": "0123456789"},
        {"instruction": "ab", "output": "xy"},
        {"messages": chat},
    ])
    assert main(["check-data", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    # prompts: "abcd", "ab", "Go on" -> 4, 2, 5; responses: 10, 2, 5 ("Sure.")
    assert out == [
        str(path),
        "  kind: sft",
        "  rows: 3",
        "  prompt chars: mean 3.7, max 5",
        "  response chars: mean 5.7, max 10",
        "  multi-turn rows: 1",
    ]


def test_preference_summary_with_min_confidence(tmp_path, capsys):
    shared = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
              {"role": "user", "content": "Q2"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "abc", "chosen": "cccc", "rejected": "rr", "confidence": 0.9},
        {"prompt": "x", "chosen": "c", "rejected": "r", "confidence": 0.1},
        {"chosen": shared + [{"role": "assistant", "content": "c6c6c6"}],
         "rejected": shared + [{"role": "assistant", "content": "r"}]},
    ])
    assert main(["check-data", str(path), "--min-confidence", "0.5"]) == 0
    out = capsys.readouterr().out.splitlines()
    # kept: row 1 (prompt 3, chosen 4, rejected 2) and row 3 (prompt 2+2+2=6, chosen 6, rejected 1)
    assert out == [
        str(path),
        "  kind: preference",
        "  rows: 2",
        "  prompt chars: mean 4.5, max 6",
        "  chosen chars: mean 5.0, max 6",
        "  rejected chars: mean 1.5, max 2",
        "  multi-turn rows: 1",
        "  dropped by min-confidence 0.5: 1",
    ]


def test_kind_guess_by_name_and_by_first_row(tmp_path, capsys):
    row = {"prompt": "p", "chosen": "c", "rejected": "r"}
    by_row = write_jsonl(tmp_path / "anything.jsonl", [row])
    by_name = tmp_path / "dpo_val.csv"
    by_name.write_text("prompt,chosen,rejected\np,c,r\n")
    sft = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "p", "response": "r"}])
    assert main(["check-data", str(by_row), str(by_name), str(sft)]) == 0
    kinds = [line for line in capsys.readouterr().out.splitlines() if "kind:" in line]
    assert kinds == ["  kind: preference", "  kind: preference", "  kind: sft"]


def test_explicit_kind_reads_the_file_that_way(tmp_path, capsys):
    path = write_jsonl(tmp_path / "prefs_looking.jsonl", [{"prompt": "p", "response": "r"}])
    assert main(["check-data", str(path), "--kind", "sft"]) == 0
    assert "  kind: sft" in capsys.readouterr().out.splitlines()
    assert main(["check-data", str(path)]) == 1  # guessed preference from the name: no chosen
    assert f"{path}:1: field 'chosen': missing" in capsys.readouterr().err


def test_error_exits_1_names_the_row_and_writes_nothing(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "response": "r"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": ""}])
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["check-data", str(bad), str(good)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"picoalign check-data: error: {bad}:2: field 'response': empty text\n"
    assert captured.out.splitlines()[0] == str(good)  # the other file is still checked
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_missing_file_exits_1(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["check-data", str(missing)]) == 1
    assert capsys.readouterr().err == f"picoalign check-data: error: {missing}: no such data file\n"
    assert not missing.exists()
