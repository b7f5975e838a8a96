"""TinyStoriesInstruct: parsing, the four tasks, record-level splits and `picoalign data`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from picoalign.cli import main
from picoalign.config import DataConfig
from picoalign.data import instruct
from picoalign.data.formats import DataError

SAMPLE = Path(instruct.__file__).resolve().parents[1] / "samples" / "tinystories_instruct_sample.txt"
DATA_ENV = ("SEED", "DATA_PROVIDER", "N_SFT_TRAIN", "N_SFT_VAL", "N_SFT_TEST", "N_DPO_TRAIN", "N_DPO_VAL", "N_DPO_TEST")


@pytest.fixture
def records():
    return instruct.parse_tinystories_instruct(SAMPLE.read_text(encoding="utf-8"))


def test_parse_sample(records):
    assert len(records) == 12
    first = records[0]
    assert first["id"] == "ts-000000"
    assert first["features"] == ["Dialogue", "MoralValue"]
    assert first["words"] == ["share", "red", "garden"]
    assert first["summary"].startswith("Lily finds a red ball in the garden")
    assert first["moral"] == "Sharing makes playing more fun."
    assert first["random_sentence"] is None
    assert first["story"].startswith("Once upon a time, there was a little girl named Lily.")
    assert first["story"].endswith("Playing together was much better than playing alone.")
    assert first["story"].count("\n") == 3  # four paragraphs, kept on their own lines
    assert records[1]["random_sentence"] == "The jar was on the top shelf."
    assert records[2]["story"].startswith("Mia and her dad went")  # story begins on the Story: line
    assert records[7]["words"] == ["ice cream", "hot", "melt"]
    assert sum(r["moral"] is not None for r in records) == 5
    assert sum("BadEnding" in r["features"] for r in records) == 4


def test_parse_skips_records_without_story():
    text = "Features: Dialogue\nWords: a, b\n<|endoftext|>\n\nStory: Tom ran.\nTom fell.\n<|endoftext|>\n"
    (record,) = instruct.parse_tinystories_instruct(text)
    assert record == {"id": "ts-000000", "features": [], "words": [], "summary": None,
                      "random_sentence": None, "moral": None, "story": "Tom ran.\nTom fell."}


def test_main_character(records):
    assert [instruct.main_character(r["story"]) for r in records] == [
        "Lily", "Tom", "Mia", "Sam", "Anna", "Lucy", "Leo", "Zoe", "Jack", "Emma", "Ollie", "Max"]
    assert instruct.main_character("Once upon a time, there was a dog named Rex. Rex ran.") == "Rex"
    assert instruct.main_character("it was dark. nobody came.") is None


def test_tasks_of_a_record_with_a_moral(records):
    record = records[0]
    rows = instruct.instruct_tasks(record, random.Random(0))
    assert [r["task"] for r in rows] == ["summary", "moral", "words", "question"]
    summary, moral, words, question = rows
    assert summary["prompt"] == "Please provide a brief summary of the following story:\n\n" + record["story"]
    assert summary["response"] == record["summary"]
    assert moral["response"] == "Sharing makes playing more fun."
    assert words["prompt"] == "Write a short story that uses all of these words: share, red, garden"
    assert words["response"] == record["story"]
    assert record["story"] in question["prompt"]
    assert all(r["input"] == r["prompt"] for r in rows)
    assert [r["id"] for r in rows] == ["ts-000000-summary", "ts-000000-moral", "ts-000000-words", "ts-000000-question"]


def test_moral_task_only_when_a_moral_line_is_present(records):
    for record in records:
        tasks = [r["task"] for r in instruct.instruct_tasks(record, random.Random(1))]
        assert ("moral" in tasks) == (record["moral"] is not None)
    # the MoralValue feature alone (as in the real data) gives no moral task
    (record,) = instruct.parse_tinystories_instruct("Features: MoralValue\nSummary: s\nStory: Ann was kind.\n")
    assert "moral" not in [r["task"] for r in instruct.instruct_tasks(record, random.Random(1))]


def test_questions_answers(records):
    """Every question the rng can pick, for a happy and a bad ending."""
    answers = {}
    for record in (records[0], records[1]):  # Lily (happy), Tom (BadEnding)
        for seed in range(40):
            row = instruct.instruct_tasks(record, random.Random(seed))[-1]
            answers[(record["id"], row["prompt"].rsplit("Question: ", 1)[1])] = row["response"]
    assert answers == {
        ("ts-000000", "Who is the main character of this story?"): "The main character is Lily.",
        ("ts-000000", "What happens at the beginning of this story?"):
            "Once upon a time, there was a little girl named Lily.",
        ("ts-000000", "Does this story have a happy ending?"): "Yes, the story has a happy ending.",
        ("ts-000001", "Who is the main character of this story?"): "The main character is Tom.",
        ("ts-000001", "What happens at the beginning of this story?"): "Tom was a small boy who loved cookies.",
        ("ts-000001", "Does this story have a happy ending?"): "No, the story does not have a happy ending.",
    }
    same = [instruct.instruct_tasks(records[3], random.Random(7)) for _ in range(2)]
    assert same[0] == same[1]


def test_instruct_rows_split_records_not_rows(tmp_path):
    cfg = DataConfig(source="tinystories-instruct", input=str(SAMPLE), out=str(tmp_path), seed=3)
    files = instruct.instruct_rows(cfg)
    assert sorted(files) == ["dpo_test", "dpo_train", "dpo_val", "sft_test", "sft_train", "sft_val"]
    assert files["dpo_train"] == files["dpo_val"] == files["dpo_test"] == []
    ids = {split: {r["id"].rsplit("-", 1)[0] for r in files[f"sft_{split}"]} for split in ("train", "val", "test")}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [8, 2, 2]  # 256:64:64 of 12 records
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    stories = {r["story"]: r["id"] for r in instruct.parse_tinystories_instruct(SAMPLE.read_text())}
    for story, record_id in stories.items():
        holders = [s for s in ("train", "val", "test") if any(story in r["prompt"] or story == r["response"]
                                                              for r in files[f"sft_{s}"])]
        assert len(holders) == 1 and record_id in ids[holders[0]]
    assert instruct.instruct_rows(cfg) == files
    other = instruct.instruct_rows(DataConfig(source="tinystories-instruct", input=str(SAMPLE), seed=4))
    assert other["sft_val"] != files["sft_val"]


@pytest.mark.parametrize(
    "n, wanted, sizes",
    [(12, (256, 64, 64), (8, 2, 2)), (1000, (10, 5, 5), (10, 5, 5)), (3, (256, 64, 64), (1, 1, 1)),
     (2, (256, 64, 64), (1, 1, 0)), (1, (256, 64, 64), (1, 0, 0)), (5, (4, 0, 1), (4, 0, 1)),
     (7, (0, 0, 0), (0, 0, 0))],
)
def test_split_sizes(n, wanted, sizes):
    assert instruct.split_sizes(n, wanted) == sizes


def test_missing_and_empty_input(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        instruct.instruct_rows(DataConfig(source="tinystories-instruct", input=str(missing)))
    empty = tmp_path / "empty.txt"
    empty.write_text("just some text\n<|endoftext|>\n")
    with pytest.raises(DataError, match="empty.txt: no TinyStoriesInstruct records"):
        instruct.instruct_rows(DataConfig(source="tinystories-instruct", input=str(empty)))


def test_picoalign_data_cli_writes_six_files(tmp_path, monkeypatch):
    for name in DATA_ENV:
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "ts"
    assert main(["data", "--source", "tinystories-instruct", "--input", str(SAMPLE), "--out", str(out)]) == 0
    names = ["sft_train", "sft_val", "sft_test", "dpo_train", "dpo_val", "dpo_test"]
    rows = {n: [json.loads(line) for line in (out / f"{n}.jsonl").read_text().splitlines()] for n in names}
    for n in ("dpo_train", "dpo_val", "dpo_test"):
        assert (out / f"{n}.jsonl").read_text() == ""
    assert all(rows[n] for n in ("sft_train", "sft_val", "sft_test"))
    assert all(set(r) == {"id", "prompt", "input", "response", "task"} for n in names for r in rows[n])
    meta = json.loads((out / "dataset_meta.json").read_text())
    assert meta["source"] == "tinystories-instruct"
    assert meta["generator_version"] == "tinystories-instruct-1"
    assert meta["counts"] == {n: len(rows[n]) for n in names}
    # 12 records: 12 summaries, 5 morals, 12 use-the-words and 12 questions
    assert sum(meta["counts"].values()) == 41


def test_picoalign_data_cli_reports_missing_input(tmp_path, capsys, monkeypatch):
    for name in DATA_ENV:
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "ts"
    missing = tmp_path / "nope.txt"
    assert main(["data", "--source", "tinystories-instruct", "--input", str(missing), "--out", str(out)]) == 1
    assert str(missing) in capsys.readouterr().err
    assert not out.exists()
