"""The offline story-specification generators (data/stories.py, data/stories_heldout.py), `make_data`
(data/make.py) and the hand-written judge pairs (samples/judge_pairs.jsonl)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from picoalign.config import DataConfig
from picoalign.data import stories, stories_heldout
from picoalign.data.make import make_data

SIX = ["sft_train", "sft_val", "sft_test", "dpo_train", "dpo_val", "dpo_test"]
SEVEN = [*SIX, "dpo_test_hard"]
JUDGE_PAIRS = Path(stories.__file__).parent.parent / "samples" / "judge_pairs.jsonl"
SIZES = {"n_sft_train": 40, "n_sft_val": 10, "n_sft_test": 10, "n_dpo_train": 40, "n_dpo_val": 10, "n_dpo_test": 10}


def make(out: Path, seed: int = 1234) -> dict[str, list[dict]]:
    make_data(DataConfig(out=str(out), seed=seed, **SIZES))
    return {n: [json.loads(line) for line in (out / f"{n}.jsonl").read_text().splitlines()] for n in SEVEN}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, list[dict]]:
    return make(tmp_path_factory.mktemp("stories") / "data")


def spec_fields(prompt: str) -> dict[str, str]:
    """The spec back from the prompt's `Key: value` lines (taboo and twist are capitalised there)."""
    fields = dict(line.split(": ", 1) for line in prompt.splitlines() if ": " in line)
    uncap = lambda text: text[:1].lower() + text[1:]  # noqa: E731
    return {"setting": fields["Setting"], "object": fields["Important object"],
            "taboo": uncap(fields["Taboo rule"]), "twist": uncap(fields["Twist"])}


def test_random_spec_prompts_are_nearly_all_distinct():
    rng = random.Random(0)
    prompts = {stories.format_prompt(stories.random_spec(rng)) for _ in range(1000)}
    assert len(prompts) >= 950


def test_row_counts_and_keys(data):
    assert [len(data[n]) for n in SIX] == [40, 10, 10, 40, 10, 10]
    for name in SIX:
        for row in data[name]:
            answer_keys = {"response"} if name.startswith("sft") else {"chosen", "rejected", "rejected_kind"}
            assert set(row) == {"id", "prompt", "input"} | answer_keys
            assert row["input"] == row["prompt"]
            assert all(isinstance(row[k], str) and row[k].strip() for k in row)
    assert data["sft_val"][3]["id"] == "sft-val-000003" and data["dpo_test"][0]["id"] == "dpo-test-000000"
    # rejected: wholesome (the fear resolved) or mild (the SFT answers' uneasy register), both present
    kinds = [row["rejected_kind"] for name in SIX if name.startswith("dpo") for row in data[name]]
    assert set(kinds) == {"wholesome", "mild"}


def test_no_prompt_in_two_splits(data):
    prompts = [row["prompt"] for name in SEVEN for row in data[name]]
    assert len(prompts) == len(set(prompts)) == 130  # the six splits and the 10 hard test pairs


def test_same_seed_same_bytes_other_seed_other_files(tmp_path):
    make(tmp_path / "a", seed=7)
    make(tmp_path / "b", seed=7)
    make(tmp_path / "c", seed=8)
    for name in SEVEN:
        a = (tmp_path / "a" / f"{name}.jsonl").read_bytes()
        assert a == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
        assert a != (tmp_path / "c" / f"{name}.jsonl").read_bytes()


def test_sft_responses_use_the_spec(data):
    for row in data["sft_train"] + data["sft_val"] + data["sft_test"]:
        fields = spec_fields(row["prompt"])
        for key, value in fields.items():
            assert value in row["response"], (key, value)
        assert row["response"].startswith(row["prompt"].split("Title: ", 1)[1].split("\n", 1)[0])


def test_chosen_and_rejected_lengths_match(data):
    pairs = [(len(r["chosen"]), len(r["rejected"])) for n in ("dpo_train", "dpo_val", "dpo_test") for r in data[n]]
    mean_gap = sum(abs(c - r) / max(c, r) for c, r in pairs) / len(pairs)
    assert mean_gap < 0.25
    ratio = sum(c for c, _ in pairs) / sum(r for _, r in pairs)
    assert 0.75 < ratio < 1.25


def test_chosen_and_rejected_share_the_opening_and_differ_after(data):
    for row in data["dpo_train"]:
        chosen, rejected = row["chosen"].split("\n\n"), row["rejected"].split("\n\n")
        assert chosen[:2] == rejected[:2]  # title and opening paragraph
        assert chosen[2:] != rejected[2:]


def test_dataset_meta(tmp_path):
    make(tmp_path / "m", seed=5)
    meta = json.loads((tmp_path / "m" / "dataset_meta.json").read_text())
    assert meta["source"] == "stories" and meta["generator_version"] == stories.GENERATOR_VERSION
    assert meta["heldout_generator_version"] == stories_heldout.GENERATOR_VERSION == "heldout-1"
    assert meta["seed"] == 5
    assert meta["counts"] == {"sft_train": 40, "sft_val": 10, "sft_test": 10,
                              "dpo_train": 40, "dpo_val": 10, "dpo_test": 10, "dpo_test_hard": 10}
    assert meta["heldout_generator_version"] == "heldout-1"
    assert (tmp_path / "m" / "config.yaml").exists()


# ---------------------------------------------------------------- held-out hard pairs


@pytest.fixture(scope="module")
def hard() -> list[dict]:
    return stories_heldout.heldout_pairs(64, seed=0)


def words4(text: str) -> set[tuple[str, ...]]:
    w = re.findall(r"[a-z']+", text.lower())
    return {tuple(w[i:i + 4]) for i in range(len(w) - 3)}


def template_4grams() -> set[tuple[str, ...]]:
    """The 4-word sequences of data/stories.py's sentence templates (a placeholder breaks a sequence)."""
    lists = [stories.OPENINGS, stories.DARK_MIDDLES, stories.LIGHT_MIDDLES, stories.DARK_ENDINGS,
             stories.LIGHT_ENDINGS, stories.PLAIN_MIDDLES, stories.PLAIN_ENDINGS]
    return {g for texts in lists for t in texts for part in re.split(r"\{\w+\}", t) for g in words4(part)}


def test_heldout_pairs_are_deterministic_for_a_seed():
    a = stories_heldout.heldout_pairs(12, seed=3)
    assert a == stories_heldout.heldout_pairs(12, seed=3)
    assert [r["prompt"] for r in a] != [r["prompt"] for r in stories_heldout.heldout_pairs(12, seed=4)]


def test_heldout_rows_ids_and_kinds(hard):
    assert [r["id"] for r in hard[:2]] == ["dpo-hard-000000", "dpo-hard-000001"] and len(hard) == 64
    for r in hard:
        assert set(r) == {"id", "prompt", "input", "chosen", "rejected", "kind"} and r["input"] == r["prompt"]
        assert r["prompt"].endswith("Story:") and r["chosen"] != r["rejected"]
    assert sum(r["kind"] == "darker" for r in hard) == sum(r["kind"] == "off_spec" for r in hard) == 32
    assert {r["kind"] for r in stories_heldout.heldout_pairs(3, seed=1)} == {"darker", "off_spec"}


def test_heldout_prompts_are_unique_and_avoid_the_given_ones(hard):
    prompts = [r["prompt"] for r in hard]
    assert len(set(prompts)) == 64
    avoid = set(prompts[:20])
    again = stories_heldout.heldout_pairs(64, seed=0, avoid_prompts=avoid)
    assert not avoid & {r["prompt"] for r in again} and len({r["prompt"] for r in again}) == 64


def test_heldout_hard_file_of_a_data_folder(data):
    assert len(data["dpo_test_hard"]) == 10 and data["dpo_test_hard"][9]["id"] == "dpo-hard-000009"
    others = {r["prompt"] for name in SIX for r in data[name]}
    assert not others & {r["prompt"] for r in data["dpo_test_hard"]}


def test_heldout_lengths_match_per_kind(hard):
    for kind in ("darker", "off_spec"):
        pairs = [(len(r["chosen"]), len(r["rejected"])) for r in hard if r["kind"] == kind]
        assert sum(abs(c - r) / max(c, r) for c, r in pairs) / len(pairs) < 0.25, kind
        assert 0.75 < sum(c for c, _ in pairs) / sum(r for _, r in pairs) < 1.25, kind


def test_heldout_chosen_follows_the_spec_and_off_spec_rejected_does_not(hard):
    for r in hard:
        fields = spec_fields(r["prompt"])
        name = r["prompt"].split("Protagonist: ", 1)[1].split(",", 1)[0]
        for value in (*fields.values(), name):
            assert value in r["chosen"], value
        title = r["prompt"].split("Title: ", 1)[1].split("\n", 1)[0]
        assert r["chosen"].startswith(title + "\n\n") and r["rejected"].startswith(title + "\n\n")
        if r["kind"] == "off_spec":
            assert fields["setting"] not in r["rejected"] and fields["object"] not in r["rejected"]
            assert not re.search(rf"\b{name}\b", r["rejected"])
        else:  # darker: the same spec, the same opening, other paragraphs after it
            assert fields["setting"] in r["rejected"] and fields["object"] in r["rejected"]
            chosen, rejected = r["chosen"].split("\n\n"), r["rejected"].split("\n\n")
            assert chosen[:2] == rejected[:2] and chosen[2:] != rejected[2:] and len(chosen) == len(rejected)


def test_heldout_vocabulary_is_not_the_training_templates(hard, data):
    """Nearly half the 4-word sequences of a stories.py answer are its templates' (the rest are the
    spec's parts), a few in a hundred of a held-out answer."""
    tmpl = template_4grams()
    shared = lambda text: len(words4(text) & tmpl) / len(words4(text))  # noqa: E731
    held = [shared(r["chosen"]) for r in hard] + [shared(r["rejected"]) for r in hard]
    train = [shared(r["chosen"]) for r in data["dpo_train"]]
    assert max(held) < 0.1 and sum(held) / len(held) < 0.05
    assert min(train) > 0.3  # the measure does see the templates where they are


def test_judge_pairs_file():
    rows = [json.loads(line) for line in JUDGE_PAIRS.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 24
    assert [r["id"] for r in rows] == [f"judge-{i:03d}" for i in range(1, len(rows) + 1)]
    for r in rows:
        assert set(r) == {"id", "prompt", "dark", "wholesome"}
        assert r["prompt"].strip() and "\n" not in r["prompt"]
        n_dark, n_whole = len(r["dark"].split()), len(r["wholesome"].split())
        assert 60 <= n_dark <= 150 and 60 <= n_whole <= 150, r["id"]
        assert 0.8 < n_dark / n_whole < 1.25, r["id"]
    assert len({r["prompt"] for r in rows}) == len(rows)
