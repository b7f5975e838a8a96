"""De-identification through Presidio and the PyPI spaCy English model (loaded once, ~15 s)."""

from __future__ import annotations

import csv
import json
import re

from picoalign.cli import main
from picoalign.config import DataConfig
from picoalign.data.deid import deid_rows, deid_text
from picoalign.data.make import make_data
from picoalign.io import read_json, write_jsonl

LETTER = "Write to Mara Jones at mara.jones@example.com or call 212-555-0147 before 5 pm."


def test_names_emails_and_phone_numbers_become_placeholders():
    counts = {}
    assert deid_text(LETTER, counts) == "Write to <PERSON> at <EMAIL_ADDRESS> or call <PHONE_NUMBER> before 5 pm."
    assert counts == {"PERSON": 1, "EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1}
    counts = {}
    text = "Card 4111 1111 1111 1111 and IBAN GB82 WEST 1234 5698 7654 32, from 192.168.1.20, see https://example.org/a"
    assert deid_text(text, counts) == "Card <CREDIT_CARD> and IBAN <IBAN_CODE>, from <IP_ADDRESS>, see <URL>"
    assert counts == {"CREDIT_CARD": 1, "IBAN_CODE": 1, "IP_ADDRESS": 1, "URL": 1}
    assert deid_text("The lighthouse was dark and cold.", counts) == "The lighthouse was dark and cold."
    assert deid_text(LETTER, entities=("EMAIL_ADDRESS",)) == \
        "Write to Mara Jones at <EMAIL_ADDRESS> or call 212-555-0147 before 5 pm."


def test_rows_keep_ids_roles_and_model_names():
    rows = [{"id": "Mara Jones", "prompt": LETTER, "response": "Hi John Smith.", "model": "Alice",
             "confidence": 7},
            {"id": "r2", "messages": [{"role": "user", "content": "I am John Smith."},
                                      {"role": "assistant", "content": "Mail me: a@b.org"}]}]
    counts = {}
    assert deid_rows(rows, counts) == [
        {"id": "Mara Jones", "prompt": "Write to <PERSON> at <EMAIL_ADDRESS> or call <PHONE_NUMBER> before 5 pm.",
         "response": "Hi <PERSON>.", "model": "Alice", "confidence": 7},
        {"id": "r2", "messages": [{"role": "user", "content": "I am <PERSON>."},
                                  {"role": "assistant", "content": "Mail me: <EMAIL_ADDRESS>"}]}]
    assert counts == {"PERSON": 3, "EMAIL_ADDRESS": 2, "PHONE_NUMBER": 1}


def test_deid_command_on_jsonl_csv_and_text(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"id": "1", "prompt": LETTER, "response": "Fine."}])
    assert main(["deid", str(src), str(tmp_path / "out.jsonl")]) == 0
    assert json.loads((tmp_path / "out.jsonl").read_text())["prompt"].startswith("Write to <PERSON> at <EMAIL_ADDRESS>")
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{tmp_path / 'out.jsonl'}: 3 replaced", "  EMAIL_ADDRESS: 1", "  PERSON: 1", "  PHONE_NUMBER: 1"]

    (tmp_path / "in.csv").write_text(f'prompt,chosen,rejected,chosen_model\n"{LETTER}",Dark.,Light.,John Smith\n')
    assert main(["deid", str(tmp_path / "in.csv"), str(tmp_path / "out.csv")]) == 0
    (row,) = csv.DictReader((tmp_path / "out.csv").open())
    assert row["prompt"].startswith("Write to <PERSON>") and row["chosen_model"] == "John Smith"

    (tmp_path / "notes.txt").write_text(LETTER + "\n")
    assert main(["deid", str(tmp_path / "notes.txt"), str(tmp_path / "clean.txt"), "--entities", "PERSON"]) == 0
    assert (tmp_path / "clean.txt").read_text() == LETTER.replace("Mara Jones", "<PERSON>") + "\n"
    assert main(["deid", str(tmp_path / "missing.jsonl"), str(tmp_path / "x.jsonl")]) == 1


def test_data_option_deid_counts_what_it_replaced(tmp_path):
    cfg = DataConfig(out=str(tmp_path), provider="template", deid=True, n_sft_train=3, n_sft_val=0, n_sft_test=0,
                     n_dpo_train=2, n_dpo_val=0, n_dpo_test=0)
    meta = make_data(cfg)
    text = "".join(p.read_text() for p in tmp_path.glob("*.jsonl"))
    found = {name: len(re.findall(f"<{name}>", text)) for name in meta["deid"]}
    assert meta["deid"] == found and meta["deid"]["PERSON"] >= 5  # at least each prompt's protagonist
    assert read_json(tmp_path / "dataset_meta.json")["deid"] == meta["deid"]
