"""The offline story-specification generator (data/stories.py) and `make_data` (data/make.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from picoalign.config import DataConfig
from picoalign.data import stories
from picoalign.data.make import make_data

SIX = ["sft_train", "sft_val", "sft_test", "dpo_train", "dpo_val", "dpo_test"]
SIZES = {"n_sft_train": 40, "n_sft_val": 10, "n_sft_test": 10, "n_dpo_train": 40, "n_dpo_val": 10, "n_dpo_test": 10}


def make(out: Path, seed: int = 1234) -> dict[str, list[dict]]:
    make_data(DataConfig(out=str(out), seed=seed, **SIZES))
    return {n: [json.loads(line) for line in (out / f"{n}.jsonl").read_text().splitlines()] for n in SIX}


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
    prompts = [row["prompt"] for name in SIX for row in data[name]]
    assert len(prompts) == len(set(prompts)) == 120


def test_same_seed_same_bytes_other_seed_other_files(tmp_path):
    make(tmp_path / "a", seed=7)
    make(tmp_path / "b", seed=7)
    make(tmp_path / "c", seed=8)
    for name in SIX:
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
    assert meta["seed"] == 5
    assert meta["counts"] == {"sft_train": 40, "sft_val": 10, "sft_test": 10,
                              "dpo_train": 40, "dpo_val": 10, "dpo_test": 10, "dpo_test_hard": 10}
    assert meta["heldout_generator_version"] == "heldout-1"
    assert (tmp_path / "m" / "config.yaml").exists()


def test_heldout_pairs_come_from_another_generator_and_share_no_prompt(tmp_path):
    """dpo_test_hard.jsonl: both kinds, prompts new to every other split, deterministic; the
    off-spec rejected story is told about none of the spec's setting or object."""
    import json

    from picoalign.config import DataConfig
    from picoalign.data import stories_heldout
    from picoalign.data.make import make_data

    meta = make_data(DataConfig(out=str(tmp_path), n_sft_train=6, n_sft_val=2, n_sft_test=2,
                                n_dpo_train=6, n_dpo_val=2, n_dpo_test=12))
    assert meta["counts"]["dpo_test_hard"] == 12 and meta["heldout_generator_version"] == "heldout-1"
    rows = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in tmp_path.glob("*.jsonl")}
    hard = rows.pop("dpo_test_hard")
    others = {r["prompt"] for split in rows.values() for r in split}
    assert len({r["prompt"] for r in hard}) == 12 and not others & {r["prompt"] for r in hard}
    assert {r["kind"] for r in hard} == {"darker", "off_spec"}
    for r in hard:
        assert r["chosen"] != r["rejected"] and r["input"] == r["prompt"]
        if r["kind"] == "off_spec":
            setting = r["prompt"].split("Setting: ", 1)[1].split("\n", 1)[0]
            obj = r["prompt"].split("Important object: ", 1)[1].split("\n", 1)[0]
            assert setting in r["chosen"] and setting not in r["rejected"] and obj not in r["rejected"]
    again = stories_heldout.heldout_pairs(12, 1234, avoid_prompts=others)
    assert [r["chosen"] for r in again] == [r["chosen"] for r in hard]  # the data stage's seed, same pairs
