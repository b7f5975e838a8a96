"""picoalign.data.formats: every accepted format, and every broken case named by file:line:field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from picoalign.data.formats import DataError, read_preferences, read_sft


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (dumped as JSON) or raw strings (written as they are)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- SFT formats


def test_prompt_response_and_aliases(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [
        {"prompt": "P1", "response": "R1"},
        {"input": "P2", "output": "R2"},
        {"prompt": "P3", "completion": "R3", "id": "keep-me"},
    ])
    assert read_sft(path) == [
        {"id": "mix-000001", "prompt": "P1", "response": "R1"},
        {"id": "mix-000002", "prompt": "P2", "response": "R2"},
        {"id": "keep-me", "prompt": "P3", "response": "R3"},
    ]


def test_default_id_counts_physical_lines_and_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "gaps.jsonl", ["", {"prompt": "a", "response": "b"}, "   ", {"prompt": "c", "response": "d", "id": 7}])
    assert [r["id"] for r in read_sft(path)] == ["gaps-000002", "7"]


def test_alpaca(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate.", "input": "Hallo", "output": "Hello"},
        {"instruction": "Say hi.", "input": "  ", "output": "Hi"},
        {"instruction": "Say bye.", "output": "Bye"},
    ])
    rows = read_sft(path)
    assert [r["prompt"] for r in rows] == ["Translate.\n\nHallo", "Say hi.", "Say bye."]
    assert [r["response"] for r in rows] == ["Hello", "Hi", "Bye"]


def test_chat_messages_keep_every_turn(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    (row,) = read_sft(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]))
    assert row == {"id": "chat-000001", "prompt": "Name a colour.", "response": "Blue.", "messages": messages}


def test_sharegpt_conversations_map_roles_and_drop_empty_system(tmp_path):
    conversations = [
        {"from": "system", "value": ""},
        {"from": "human", "value": "Q1"},
        {"from": "gpt", "value": "A1"},
        {"from": "user", "value": "Q2"},
        {"from": "bot", "value": "A2"},
    ]
    (row,) = read_sft(write_jsonl(tmp_path / "sg.jsonl", [{"conversations": conversations}]))
    assert row["messages"] == [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    assert (row["prompt"], row["response"]) == ("Q2", "A2")


def test_json_list_uses_item_numbers(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]))
    assert [r["id"] for r in read_sft(path)] == ["list-000001", "list-000002"]


def test_csv_sft(tmp_path):
    path = tmp_path / "sft.csv"
    path.write_text('prompt,response\n"two\nlines",yes\nhello,world\n', encoding="utf-8")
    assert read_sft(path) == [
        {"id": "sft-000002", "prompt": "two\nlines", "response": "yes"},
        {"id": "sft-000004", "prompt": "hello", "response": "world"},
    ]


# ---------------------------------------------------------------- SFT errors


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({"prompt": "p"}, "response", "missing"),
        ({"response": "r"}, "prompt", "missing"),
        ({"prompt": "p", "response": "   "}, "response", "empty text"),
        ({"prompt": 5, "response": "r"}, "prompt", "expected text, got a number"),
        ({"instruction": "", "output": "o"}, "instruction", "empty text"),
        ({"instruction": "i", "input": 3, "output": "o"}, "input", "expected text, got a number"),
        ({"instruction": "i"}, "output", "missing"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant message"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
         "messages[1].content", "empty text"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "expected text, got null"),
        ({"messages": "hi"}, "messages", "expected a list of messages, got text"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
         "conversations[1].from", "unknown role 'robot'"),
        ({"conversations": [{"value": "q"}]}, "conversations[0].from", "missing"),
        ({"prompt": "p", "response": "r", "id": [1]}, "id", "expected text or a whole number"),
    ],
)
def test_sft_errors_name_file_line_and_field(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "ok", "response": "ok"}, "", row])
    message = error_of(read_sft, path)
    assert message.startswith(f"{path}:3: field '{field}': ")
    assert problem in message


def test_broken_json_names_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "response": "b"}, '{"prompt": "a", '])
    message = error_of(read_sft, path)
    assert message.startswith(f"{path}:2: broken JSON:")


def test_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ['["prompt", "response"]'])
    assert error_of(read_sft, path) == f"{path}:1: expected a JSON object, got a list"


def test_unknown_format_lists_fields_seen_and_expected(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "a"}])
    message = error_of(read_sft, path)
    assert message.startswith(f"{path}:1: unknown format: fields seen: answer, question; expected ")
    assert "prompt|input + response|output|completion" in message and "messages" in message


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    assert error_of(read_sft, path) == f"{path}: no rows (the file is empty)"
    path = tmp_path / "empty.csv"
    path.write_text("prompt,response\n")
    assert error_of(read_sft, path) == f"{path}: no rows (the file is empty)"
    assert read_sft(path, allow_empty=True) == []
    path = tmp_path / "dpo_val.jsonl"
    path.write_text("")
    assert error_of(read_preferences, path) == f"{path}: no rows (the file is empty)"
    assert read_preferences(path, allow_empty=True) == []


def test_json_list_errors_say_item(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": ""}]))
    assert error_of(read_sft, path) == f"{path}:item 2: field 'response': empty text"
    path.write_text(json.dumps([{"prompt": "a", "response": "b"}, "text"]))
    assert error_of(read_sft, path) == f"{path}:item 2: expected a JSON object, got text"


def test_json_file_that_is_not_a_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}))
    assert error_of(read_sft, path) == f"{path}: expected a JSON list of objects, got an object"
    path.write_text('[\n{"prompt": "a", "response": "b"},\n{"prompt": }\n]')
    assert error_of(read_sft, path).startswith(f"{path}:3: broken JSON:")


def test_json_nested_too_deeply_names_the_line(tmp_path):
    """100,000 levels of lists is beyond Python's JSON reader (it recurses once per level): a
    file:line error, not a RecursionError."""
    deep = "[" * 100_000 + "]" * 100_000
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "response": "b"}, deep])
    assert error_of(read_sft, path) == f"{path}:2: broken JSON: nested too deeply " \
        "(lists or objects inside each other hundreds of levels deep)"
    path = tmp_path / "pairs.json"  # brackets inside a string (line 2) are text, not nesting
    path.write_text('[\n{"prompt": "' + "[" * 600 + '", "chosen": "c", "rejected": "r"},\n'
                    '{"prompt": "p", "chosen": ' + deep + ', "rejected": "r"}\n]')
    assert error_of(read_preferences, path).startswith(f"{path}:3: broken JSON: nested too deeply")


def test_csv_error_names_physical_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,response\n"spans\ntwo lines",ok\n\nhello,\n', encoding="utf-8")
    assert error_of(read_sft, path) == f"{path}:5: field 'response': empty text"
    path.write_text("prompt,response\na,b,c\n")
    assert error_of(read_sft, path) == f"{path}:2: 3 cells but the header has 2 columns"


def test_unknown_extension_and_missing_file(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    assert "unknown file type '.txt'" in error_of(read_sft, path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_sft(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- preference formats


def test_preference_strings_with_metadata(tmp_path):
    row = {"input": "P", "chosen": "C", "rejected": "R", "confidence": 0.75, "chosen_model": "m1",
           "rejected_model": "m2", "judgment_reasoning": "C is darker.", "topic": "fog", "extra": 1}
    (pair,) = read_preferences(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert pair == {"id": "p-000001", "prompt": "P", "chosen": "C", "rejected": "R", "confidence": 0.75,
                    "chosen_model": "m1", "rejected_model": "m2", "judgment_reasoning": "C is darker.",
                    "topic": "fog"}


def test_preference_answers_as_message_lists(tmp_path):
    user = {"role": "user", "content": "Q"}
    rows = [
        # prompt text + one-message answers (TRL's conversational shape): prompt stays text
        {"prompt": "Q", "chosen": [{"role": "assistant", "content": "C"}],
         "rejected": [{"role": "assistant", "content": "R"}]},
        # prompt as messages
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "C"}],
         "rejected": [{"role": "assistant", "content": "R"}]},
        # a system turn in the answers goes before the prompt
        {"prompt": "Q", "chosen": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "C"}],
         "rejected": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "R"}]},
    ]
    pairs = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [p["prompt"] for p in pairs] == ["Q", [user], [{"role": "system", "content": "S"}, user]]
    assert all((p["chosen"], p["rejected"]) == ("C", "R") for p in pairs)


def test_message_transcripts_share_their_prompt(tmp_path):
    shared = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Scare me."}]
    rows = [
        {"chosen": shared + [{"role": "assistant", "content": "Look behind you."}],
         "rejected": shared + [{"role": "assistant", "content": "Boo! Just kidding."}]},
        # the transcript's own turns win over a prompt field that repeats them
        {"prompt": "Scare me.", "chosen": shared + [{"role": "assistant", "content": "A"}],
         "rejected": shared + [{"role": "assistant", "content": "B"}]},
        # a null prompt beside full transcripts takes nothing away (a column some rows lack)
        {"prompt": None, "chosen": shared + [{"role": "assistant", "content": "C"}],
         "rejected": shared + [{"role": "assistant", "content": "D"}]},
    ]
    first, second, third = read_preferences(write_jsonl(tmp_path / "t.jsonl", rows))
    assert first["prompt"] == shared
    assert (first["chosen"], first["rejected"]) == ("Look behind you.", "Boo! Just kidding.")
    assert second["prompt"] == shared and (second["chosen"], second["rejected"]) == ("A", "B")
    assert third["prompt"] == shared and (third["chosen"], third["rejected"]) == ("C", "D")


def test_text_transcripts_share_their_prompt(tmp_path):
    rows = [
        {"chosen": "Human: What is fog?\n\nAssistant: A cloud that walks.",
         "rejected": "Human: What is fog?\n\nAssistant: I don't know."},
        # the common prefix "Q: colour? A: bl" is cut back so no word is split
        {"chosen": "Q: colour? A: blue sky", "rejected": "Q: colour? A: black sky"},
    ]
    first, second = read_preferences(write_jsonl(tmp_path / "t.jsonl", rows))
    # hh-rlhf's Human:/Assistant: transcripts become turns, the prompt rendered by the chat template
    assert first["prompt"] == [{"role": "user", "content": "What is fog?"}]
    assert (first["chosen"], first["rejected"]) == ("A cloud that walks.", "I don't know.")
    assert (second["prompt"], second["chosen"], second["rejected"]) == ("Q: colour? A: ", "blue sky", "black sky")


def test_min_confidence_drops_low_and_keeps_missing(tmp_path):
    rows = [{"prompt": "a", "chosen": "c", "rejected": "r", "confidence": 0.9, "id": "high"},
            {"prompt": "a", "chosen": "c", "rejected": "r", "confidence": 0.4, "id": "low"},
            {"prompt": "a", "chosen": "c", "rejected": "r", "id": "none"},
            {"prompt": "a", "chosen": "c", "rejected": "r", "confidence": 0.5, "id": "edge"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert [p["id"] for p in read_preferences(path)] == ["high", "low", "none", "edge"]
    assert [p["id"] for p in read_preferences(path, min_confidence=0.5)] == ["high", "none", "edge"]


def test_preference_csv(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text(
        "prompt,chosen,rejected,confidence,chosen_model,rejected_model,judgment_reasoning\n"
        'Tell a tale.,"Dark,\nand cold.",Sunny.,0.8,a,b,"darker"\n'
        "Again.,Night.,Day.,,,,\n",
        encoding="utf-8",
    )
    first, second = read_preferences(path)
    assert first == {"id": "prefs-000002", "prompt": "Tell a tale.", "chosen": "Dark,\nand cold.",
                     "rejected": "Sunny.", "confidence": 0.8, "chosen_model": "a", "rejected_model": "b",
                     "judgment_reasoning": "darker"}
    assert second == {"id": "prefs-000004", "prompt": "Again.", "chosen": "Night.", "rejected": "Day."}
    assert [p["id"] for p in read_preferences(path, min_confidence=0.9)] == ["prefs-000004"]


def test_preference_json_list(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"prompt": "a", "chosen": "c", "rejected": "r"}]))
    assert read_preferences(path) == [{"id": "pairs-000001", "prompt": "a", "chosen": "c", "rejected": "r"}]


def test_sample_files_read():
    samples = Path(__file__).resolve().parents[1] / "src" / "picoalign" / "samples"
    assert len(read_sft(samples / "alpaca_sample.jsonl")) == 3
    pairs = read_preferences(samples / "preferences_sample.csv")
    assert [p["confidence"] for p in pairs] == [9, 8, 5]  # the judge's 1-10 scale
    assert all(p["chosen_model"] and p["rejected_model"] and p["judgment_reasoning"] for p in pairs)


# ---------------------------------------------------------------- preference errors


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({"prompt": "p", "chosen": "same", "rejected": "same "}, "rejected", "identical to 'chosen'"),
        ({"chosen": "same", "rejected": "same"}, "rejected", "identical to 'chosen'"),
        ({"prompt": "p", "chosen": "c"}, "rejected", "missing"),
        ({"prompt": "p", "rejected": "r"}, "chosen", "missing"),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "chosen", "empty text"),
        ({"prompt": 3, "chosen": "c", "rejected": "r"}, "prompt", "expected text or a list of messages"),
        ({"prompt": "p", "chosen": 1.5, "rejected": "r"}, "chosen", "expected text, got a number"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "confidence": "high"}, "confidence", "expected a number"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "confidence": True}, "confidence", "expected a number"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "chosen_model": 4}, "chosen_model", "expected text"),
        ({"chosen": "Apples are red.", "rejected": "Bananas are yellow."}, "prompt", "share no beginning"),
        # a null prompt is missing, not a transcript whose common beginning becomes the prompt
        ({"prompt": None, "chosen": "The night was dark.", "rejected": "The night was warm."}, "prompt", "missing"),
        ({"input": None, "chosen": "The night was dark.", "rejected": "The night was warm."}, "input", "missing"),
        ({"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"},
         "rejected", "expected a list of messages, got text"),
        ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q2"}]},
         "chosen", "last message must be the assistant's answer"),
        ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"}],
          "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "r"}]},
         "rejected", "earlier turns differ"),
        ({"chosen": [{"role": "assistant", "content": "c"}], "rejected": [{"role": "assistant", "content": "r"}]},
         "prompt", "missing"),
        ({"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}],
          "rejected": [{"role": "assistant", "content": "c"}]}, "rejected", "identical to 'chosen'"),
    ],
)
def test_preference_errors_name_file_line_and_field(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}, row])
    message = error_of(read_preferences, path)
    assert message.startswith(f"{path}:2: field '{field}': ")
    assert problem in message


def test_preference_unknown_format_and_csv_line(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"good": "g", "bad": "b"}])
    assert error_of(read_preferences, path).startswith(f"{path}:1: unknown format: fields seen: bad, good; expected ")
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\nd,same,same\n")
    assert error_of(read_preferences, path) == f"{path}:3: field 'rejected': identical to 'chosen'"
    path.write_text("prompt,chosen\na,b\n")
    assert error_of(read_preferences, path) == f"{path}:2: field 'rejected': missing"
