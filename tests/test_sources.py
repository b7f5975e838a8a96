"""picoalign.data.sources: parquet files and folders, arrow files, save_to_disk folders and hub ids
read like JSONL (same records, file:row errors), a column mapping, and the errors before any work."""

from __future__ import annotations

import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from picoalign.data import sources  # noqa: E402
from picoalign.data.check import describe  # noqa: E402
from picoalign.data.formats import (  # noqa: E402
    DataError,
    iter_sft,
    parse_columns,
    read_preferences,
    read_sft,
    read_unpaired,
)

ULTRAFEEDBACK = {  # trl-lib/ultrafeedback_binarized's shape: two conversations, scores beside them
    "chosen": [[{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
               [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]],
    "rejected": [[{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "No."}],
                 [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Whatever."}]],
    "score_chosen": [8.0, 7.5],
    "score_rejected": [2.0, 3.0],
}


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def write_parquet(path, columns: dict, **kw):
    pq.write_table(pa.table(columns), path, **kw)
    return path


def test_parquet_preferences_multi_turn(tmp_path):
    path = write_parquet(tmp_path / "uf.parquet", ULTRAFEEDBACK)
    first, second = read_preferences(path)
    assert first == {"id": "uf-000001", "prompt": [{"role": "user", "content": "Name a colour."}],
                     "chosen": "Blue.", "rejected": "No."}
    # a conversation prefix: every earlier turn is the prompt, only the final answers differ
    assert second["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                {"role": "user", "content": "Bye"}]
    assert (second["chosen"], second["rejected"]) == ("Goodbye.", "Whatever.")


def test_hh_rlhf_transcripts_become_turns(tmp_path):
    hh = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant: "
    path = write_parquet(tmp_path / "hh.parquet", {"chosen": [hh + "Why did the owl..."],
                                                   "rejected": [hh + "No."]})
    (pair,) = read_preferences(path)
    assert pair["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                              {"role": "user", "content": "A joke?"}]
    assert (pair["chosen"], pair["rejected"]) == ("Why did the owl...", "No.")


def test_column_mapping(tmp_path):
    path = write_parquet(tmp_path / "own.parquet", {"question": ["Q1", "Q2"], "good": ["G1", "G2"],
                                                    "bad": ["B1", "B2"], "extra": [1, 2]})
    columns = parse_columns("prompt=question, chosen=good,rejected=bad")
    pairs = read_preferences(path, columns=columns)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("Q1", "G1", "B1"), ("Q2", "G2", "B2")]
    # the same mapping reads the pairs as unpaired rows (KTO)
    assert [(r["completion"], r["label"]) for r in read_unpaired(path, columns=columns)][:2] == [("G1", True), ("B1", False)]


def test_column_errors_before_any_row(tmp_path):
    path = write_parquet(tmp_path / "own.parquet", {"question": ["Q"], "good": ["G"], "bad": ["B"]})
    message = error_of(read_preferences, path)
    assert message.startswith(f"{path}: its columns are question, good, bad; needed: chosen + rejected")
    assert "--columns" in message
    message = error_of(read_preferences, path, columns=parse_columns("prompt=question,chosen=best,rejected=bad"))
    assert message == f"{path}: --columns chosen=best: no column 'best'; its columns: question, good, bad"
    assert "prompt|input + response|output|completion" in error_of(read_sft, path)
    with pytest.raises(DataError, match="'answer' is not a field we read"):
        parse_columns("answer=good")
    with pytest.raises(DataError, match="is not NAME=COLUMN"):
        parse_columns("prompt")


def test_row_errors_name_file_and_row(tmp_path):
    path = write_parquet(tmp_path / "sft.parquet", {"prompt": ["a", "b", None], "response": ["x", "", "z"]})
    assert error_of(read_sft, path) == f"{path}:row 2: field 'response': empty text"


def test_folder_of_shards_and_streamed_batches(tmp_path):
    folder = tmp_path / "set" / "data"
    folder.mkdir(parents=True)
    n = sources.BATCH_ROWS + 10
    write_parquet(folder / "train-00001-of-00002.parquet", {"prompt": ["late"], "response": ["r"]})
    write_parquet(folder / "train-00000-of-00002.parquet",
                  {"prompt": [f"p{i}" for i in range(n)], "response": ["r"] * n})
    rows = read_sft(tmp_path / "set")
    assert len(rows) == n + 1 and rows[0]["prompt"] == "p0" and rows[-1]["prompt"] == "late"
    # read a batch at a time: the first record arrives having read one batch, not the file
    batches = list(sources._batches(folder / "train-00000-of-00002.parquet"))
    assert [len(b) for b in batches] == [sources.BATCH_ROWS, 10]
    assert next(iter_sft(tmp_path / "set"))["prompt"] == "p0"


def test_arrow_file_and_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"messages": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                          {"role": "user", "content": "More"}, {"role": "assistant", "content": "Sure"}]]}
    ds = datasets.Dataset.from_dict(rows)
    ds.save_to_disk(tmp_path / "saved")
    (saved,) = read_sft(tmp_path / "saved")
    assert saved["messages"][-1] == {"role": "assistant", "content": "Sure"} and len(saved["messages"]) == 4
    # an .arrow file as save_to_disk writes it (stream format), and one in the IPC file format
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert read_sft(arrow)[0]["messages"] == saved["messages"]
    table = pa.table({"instruction": ["Say hi."], "output": ["Hi"]})
    with pa.ipc.new_file(str(tmp_path / "own.arrow"), table.schema) as writer:
        writer.write_table(table)
    assert read_sft(tmp_path / "own.arrow")[0]["prompt"] == "Say hi."


def test_conversation_ending_with_user_turn_is_refused(tmp_path):
    rows = {"messages": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                          {"role": "user", "content": "And?"}]]}
    path = write_parquet(tmp_path / "chat.parquet", rows)
    assert error_of(read_sft, path).startswith(f"{path}:row 1: field 'messages[2]': the conversation ends "
                                               "with a user turn; the last message must be the assistant's")
    pair = dict(ULTRAFEEDBACK)
    pair["rejected"] = [ULTRAFEEDBACK["rejected"][0] + [{"role": "user", "content": "?"}], ULTRAFEEDBACK["rejected"][1]]
    path = write_parquet(tmp_path / "pairs.parquet", pair)
    assert error_of(read_preferences, path) == (f"{path}:row 1: field 'rejected': the last message must be the "
                                                "assistant's answer")


def test_hub_without_network_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = error_of(read_preferences, "hf:trl-lib/ultrafeedback_binarized:train")
    assert message.startswith("hf:trl-lib/ultrafeedback_binarized:train: cannot reach the hub at ")
    assert "--data set.parquet" in message and "\n" not in message
    assert "expected hf:OWNER/NAME:SPLIT" in error_of(read_sft, "hf:just-a-name")


def test_check_data_reads_parquet(tmp_path):
    path = write_parquet(tmp_path / "uf.parquet", ULTRAFEEDBACK)
    lines = describe(path)
    assert lines[1:3] == ["  kind: preference", "  rows: 2"] and "  multi-turn rows: 1" in lines


def test_hub_endpoint_is_honoured(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    message = error_of(read_sft, "hf:tatsu-lab/alpaca:train")
    assert message.startswith("hf:tatsu-lab/alpaca:train: cannot reach the hub at http://127.0.0.1:9 (")


def test_stages_read_a_single_source_with_columns(tmp_path):
    """`--data x.parquet --columns ...`: the file is the training split (no validation split), and
    eval's test rows; a bad mapping stops at config load."""
    from picoalign.config import ConfigError, DPOConfig, EvalConfig, SFTConfig
    from picoalign.eval.evaluate import test_rows
    from picoalign.train.dpo import read_pair_splits
    from picoalign.train.sft import read_sft_splits

    path = write_parquet(tmp_path / "own.parquet", {"question": ["Q1", "Q2"], "good": ["G1", "G2"], "bad": ["B1", "B2"]})
    cfg = DPOConfig(data=str(path), columns="prompt=question,chosen=good,rejected=bad", max_steps=1)
    train, val = read_pair_splits(cfg)
    assert [p["chosen"] for p in train] == ["G1", "G2"] and val == []
    rows = read_sft_splits(SFTConfig(data=str(path), columns="prompt=question,response=good", max_steps=1))
    assert [r["response"] for r in rows.train] == ["G1", "G2"] and rows.val == rows.monitor == []
    sft_rows, pairs = test_rows(path, EvalConfig(columns="prompt=question,chosen=good,rejected=bad"))
    assert sft_rows == [] and [p["rejected"] for p in pairs["test"]] == ["B1", "B2"]
    with pytest.raises(ConfigError, match="'answer' is not a field we read"):
        DPOConfig(data=str(path), columns="answer=good", max_steps=1)


def test_run_takes_sft_model_and_a_source_per_stage(tmp_path):
    """`picoalign run --set sft.model=X` names the run's base model (the run would otherwise force
    its own over it), and a stage's train_file may be a parquet file or a hub id."""
    from picoalign.pipeline import resolve_configs
    from picoalign.stages import STAGES, _no_training_rows

    path = write_parquet(tmp_path / "own.parquet", {"q": ["Q"], "a": ["A"]})
    configs = resolve_configs(None, ["sft.model=/models/gemma.gguf", f"sft.train_file={path}",
                                     "sft.columns=prompt=q,response=a", "dpo.train_file=hf:o/n:train",
                                     f"run.runs_dir={tmp_path}"], environ={})
    assert configs["run"].model == configs["sft"].model == "/models/gemma.gguf"
    assert read_sft(path, columns=parse_columns(configs["sft"].columns))[0]["response"] == "A"
    assert STAGES["sft"].run.blocked(configs["sft"], configs["root"]) is None  # a source is not an empty file
    assert _no_training_rows(configs["dpo"], configs["root"]) is None  # a hub id: read by the stage itself
