"""Null versus missing, the same in every reader of data/formats.py: a field given as null is an error
at file:line naming it, even when an alias (prompt/input, response/output/completion,
messages/conversations) holds a value that would otherwise be used in its place."""

from __future__ import annotations

import json

import pytest

from picoalign.data.formats import DataError, read_preferences, read_sft, read_unpaired


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"prompt": "Tell a story.", "input": "Tell a story.", "response": "Once upon a time."}


@pytest.mark.parametrize(("reader", "row", "field"), [
    # the generated rows carry prompt and input; a hand edit blanks prompt: it used to train on input
    (read_sft, {**GOOD, "prompt": None}, "prompt"),
    (read_sft, {"input": None, "response": "r"}, "input"),
    (read_sft, {"prompt": "p", "response": None, "output": "o"}, "response"),
    (read_sft, {"prompt": "p", "output": None, "completion": "c"}, "output"),
    (read_sft, {"messages": None, "prompt": "p", "response": "r"}, "messages"),
    (read_sft, {"instruction": "i", "input": None, "output": "o"}, "input"),
    (read_sft, {"instruction": "i", "output": None, "completion": "c"}, "output"),
    (read_preferences, {"prompt": None, "input": "p", "chosen": "c", "rejected": "r"}, "prompt"),
    (read_preferences, {"prompt": "p", "chosen": None, "rejected": "r"}, "chosen"),
    (read_preferences, {"prompt": "The night was", "chosen": "The night was dark.", "rejected": None}, "rejected"),
    (read_unpaired, {"prompt": None, "input": "p", "completion": "c", "label": True}, "prompt"),
    (read_unpaired, {"prompt": "p", "response": None, "completion": "c", "label": True}, "response"),
    (read_unpaired, {"prompt": "p", "completion": "c", "label": None}, "label"),
])
def test_a_null_field_is_an_error_at_its_line_even_beside_an_alias(tmp_path, reader, row, field):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p0", "response": "r0", "completion": "c0", "chosen": "a",
                                               "rejected": "b", "label": True}, row])
    with pytest.raises(DataError) as info:
        reader(path)
    assert str(info.value).startswith(f"{path}:2: field '{field}': null; a null is not read as missing")


def test_missing_fields_still_fall_back_to_their_aliases(tmp_path):
    rows = [{"input": "p", "output": "o"}, {"instruction": "i", "output": "o"}, {"prompt": "p", "completion": "c"}]
    assert [(r["prompt"], r["response"]) for r in read_sft(write_jsonl(tmp_path / "s.jsonl", rows))] == [
        ("p", "o"), ("i", "o"), ("p", "c")]
    pair = read_preferences(write_jsonl(tmp_path / "p.jsonl", [{"input": "q", "chosen": "c", "rejected": "r"}]))
    assert pair[0]["prompt"] == "q"


def test_a_csv_row_reads_the_same(tmp_path):
    """CSV has no null: an empty cell of the first alias is empty text, never the next alias."""
    path = tmp_path / "d.csv"
    path.write_text("prompt,input,response\n,Tell a story.,Once.\n")
    with pytest.raises(DataError, match=rf"{path}:2: field 'prompt': empty text"):
        read_sft(path)
