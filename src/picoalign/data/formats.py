"""Read user data (.jsonl, .json, .csv) into one SFT record and one preference record.

    from picoalign.data.formats import read_sft, read_preferences
    rows = read_sft("alpaca.jsonl")                        # [{"id", "prompt", "response"}, ...]
    pairs = read_preferences("prefs.csv", min_confidence=6)    # judge confidence 1-10
    rows = read_unpaired("thumbs.jsonl")                     # [{"id", "prompt", "completion", "label"}, ...]

SFT rows may be `prompt`|`input` + `response`|`output`|`completion`, Alpaca `instruction` (+
`input`) + `output`, chat `messages`, or ShareGPT `conversations` (`from`/`value`). Chat rows keep
their `messages`: every assistant turn is trained. Preference rows hold `chosen` and `rejected`
as text or message lists, with `prompt`|`input` or, for full transcripts, a shared beginning
that becomes the prompt. Unpaired rows (KTO) hold `prompt`|`input`, `completion`|`response`|`output`
and a true/false `label` (TRL's unpaired format); a preference row there is split into a true
row for its chosen answer and a false one for its rejected. Every problem raises `DataError` as `file:line: field 'x': problem`
(`file:item N` for a .json list), so a user can fix the row without reading this code.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from picoalign.data.where import DataError, Where  # noqa: F401  (re-exported: the readers' errors)

PROMPT_KEYS = ("prompt", "input")
RESPONSE_KEYS = ("response", "output", "completion")
CHAT_KEYS = ("messages", "conversations")
METADATA_TEXT = ("chosen_model", "rejected_model", "judgment_reasoning", "topic")
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "system": "system"}
SFT_FORMATS = ("prompt|input + response|output|completion, instruction (+ input) + output, "
               "messages, or conversations")
PREFERENCE_FORMATS = "chosen + rejected, with prompt|input or a shared beginning"
UNPAIRED_FORMATS = f"prompt|input + completion|response|output + label (true/false), or a pair ({PREFERENCE_FORMATS})"
# The names a `--columns` mapping may give a set's columns: every field the readers look at.
MAPPABLE = ("prompt", "input", "response", "output", "completion", "instruction", "messages", "conversations",
            "chosen", "rejected", "label", "id", "confidence")
# The columns a schema'd source (parquet, arrow) must have, per kind: any one of the alternatives.
SFT_NEEDS = (("prompt|input", "response|output|completion"), ("instruction", "output|response|completion"),
             ("messages|conversations",))
PREFERENCE_NEEDS = (("chosen", "rejected"),)
UNPAIRED_NEEDS = (("prompt|input", "completion|response|output", "label"), ("chosen", "rejected"))
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")  # hh-rlhf's turn markers
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
LABEL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


# Python's JSON reader recurses once per level; past its stack limit (about 1,000 levels) it
# raises RecursionError. No real row nests that deep, so we name the line where it starts.
DEEP_LEVELS = 500
TOO_DEEP = "broken JSON: nested too deeply (lists or objects inside each other hundreds of levels deep)"


# ---------------------------------------------------------------- rows from files


def iter_rows(path: str | Path, columns: dict[str, str] | None = None,
              needs: tuple[tuple[str, ...], ...] = ()) -> Iterator[tuple[Where, dict]]:
    """Yield `(where, row)` for each object of a .jsonl, .json or .csv file, or each row of a
    `datasets` source (data/sources.py: .parquet, .arrow, a saved or sharded folder, hf:...).

    `columns` ({our name: the set's column}) renames a set's own columns to the names we read.
    A source with a schema (parquet, arrow) is checked before its first row against `needs`:
    alternatives, each a tuple of fields that together make a format (see SFT_NEEDS)."""
    from picoalign.data import sources

    if sources.is_source(path):
        have = sources.columns_of(path)
        _check_mapping(path, columns, have)
        if have is not None and needs:
            _check_columns(path, set(have) - set((columns or {}).values()) | set(columns or {}), needs, have)
        rows = sources.source_rows(path)
    else:
        rows = _text_rows(Path(path))
    for where, row in rows:
        yield where, (_renamed(row, columns, where) if columns else row)


def parse_columns(text: str) -> dict[str, str]:
    """'prompt=question, chosen=good' -> {"prompt": "question", "chosen": "good"}."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in str(text or "").split(",")):
        if not part:
            continue
        ours, eq, theirs = (s.strip() for s in part.partition("="))
        if not (eq and ours and theirs):
            raise DataError(f"columns: {part!r} is not NAME=COLUMN (e.g. prompt=question,chosen=good,rejected=bad)")
        if ours not in MAPPABLE:
            raise DataError(f"columns: {ours!r} is not a field we read (one of {', '.join(MAPPABLE)})")
        out[ours] = theirs
    return out


def _check_mapping(path, columns: dict[str, str] | None, have: list[str] | None) -> None:
    """A mapping to a column the source lacks, refused before the first row (its schema is known)."""
    for ours, theirs in (columns or {}).items():
        if have is not None and theirs not in have:
            raise DataError(f"{path}: --columns {ours}={theirs}: no column {theirs!r}; "
                            f"its columns: {', '.join(have) or '(none)'}")


def _check_columns(path, names: set[str], needs: tuple[tuple[str, ...], ...], have: list[str]) -> None:
    """Refuse a source none of whose formats its columns make, naming the columns it has."""
    def present(field: str) -> bool:
        return any(alias in names for alias in field.split("|"))

    if not any(all(present(f) for f in fmt) for fmt in needs):
        wanted = " or ".join(" + ".join(fmt) for fmt in needs)
        raise DataError(f"{path}: its columns are {', '.join(have) or '(none)'}; needed: {wanted} "
                        "(map a set's own names with --columns prompt=COLUMN,...)")


def _renamed(row: dict, columns: dict[str, str], where: Where) -> dict:
    """The row with each mapped column under our name; unmapped columns are kept as they are."""
    for ours, theirs in columns.items():
        if theirs not in row:
            raise where.error(None, f"--columns {ours}={theirs}: no column {theirs!r}; "
                              f"columns seen: {', '.join(sorted(map(str, row))) or '(none)'}")
    taken = set(columns.values())
    out = {k: v for k, v in row.items() if k not in taken and k not in columns}
    return out | {ours: row[theirs] for ours, theirs in columns.items()}


def _text_rows(path: Path) -> Iterator[tuple[Where, dict]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown file type {path.suffix or '(none)'!r}; "
                        "expected .jsonl, .json or .csv")
    yield from reader(path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _as_object(row: Any, where: Where) -> dict:
    if not isinstance(row, dict):
        raise where.error(None, f"expected a JSON object, got {_kind(row)}")
    return row


def _jsonl_rows(path: Path) -> Iterator[tuple[Where, dict]]:
    # Split on "\n" only: str.splitlines would also split on U+2028, legal inside JSON strings.
    for n, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        where = Where(path, n)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise where.error(None, f"broken JSON: {e.msg} (column {e.colno})") from None
        except RecursionError:
            raise where.error(None, TOO_DEEP) from None
        yield where, _as_object(row, where)


def _json_rows(path: Path) -> Iterator[tuple[Where, dict]]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise Where(path, e.lineno).error(
            None, f"broken JSON: {e.msg} (column {e.colno}); a .json file holds one list of "
            "objects (use .jsonl for one object per line)") from None
    except RecursionError:
        raise Where(path, _deep_line(text)).error(None, TOO_DEEP) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {_kind(data)}")
    for i, row in enumerate(data, 1):
        where = Where(path, i, item=True)
        yield where, _as_object(row, where)


def _deep_line(text: str, depth: int = DEEP_LEVELS) -> int:
    """The line on which brackets outside strings first nest `depth` deep (1 if they never do)."""
    level, line, in_string, escaped = 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        elif in_string:
            in_string = ch != '"' or escaped
            escaped = ch == "\\" and not escaped
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            level += 1
            if level >= depth:
                return line
        elif ch in "]}":
            level -= 1
    return 1


def _csv_rows(path: Path) -> Iterator[tuple[Where, dict]]:
    """Rows as {column: cell}; `where` is the physical line the row starts on (cells may span lines)."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    columns: list[str] | None = None
    start = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise Where(path, start).error(None, f"broken CSV: {e}") from None
        where, start = Where(path, start), reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue  # blank line, or an empty row a spreadsheet left behind
        if columns is None:
            columns = [c.strip() for c in cells]
            continue
        if len(cells) > len(columns):
            raise where.error(None, f"{len(cells)} cells but the header has {len(columns)} columns")
        yield where, dict(zip(columns, cells))


# ---------------------------------------------------------------- field checks


def _kind(value: Any) -> str:
    """How a JSON value is named in errors ('a number', 'a list', ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    names = {int: "a number", float: "a number", str: "text", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _text(value: Any, field: str, where: Where) -> str:
    """Non-empty text, or an error naming the field: empty answers train nothing."""
    if not isinstance(value, str):
        raise where.error(field, f"expected text, got {_kind(value)}")
    if not value.strip():
        raise where.error(field, "empty text")
    return value


NULL = "null; a null is not read as missing: give the text, or leave the field out"


def _first(row: dict, keys: tuple[str, ...], where: Where) -> str | None:
    """The first of `keys` (aliases such as prompt/input) that `row` has, None if it has none.

    A null there is an error, not a missing field: read as missing, `"prompt": null` beside
    `input` trained on `input` without a word (generated rows carry both; a hand edit that blanks
    `prompt` went unnoticed). Every reader goes through here, so null means the same in all."""
    key = next((k for k in keys if k in row), None)
    if key is not None and row[key] is None:
        raise where.error(key, NULL)
    return key


def _optional(row: dict, key: str) -> Any:
    """A metadata value, or None when absent, null or an empty CSV cell."""
    value = row.get(key)
    return None if isinstance(value, str) and not value.strip() else value


def _row_id(row: dict, where: Where) -> str:
    value = _optional(row, "id")
    if value is None:
        return where.default_id()
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise where.error("id", f"expected text or a whole number, got {_kind(value)}")
    return str(value)


def _unknown(row: dict, where: Where, expected: str) -> DataError:
    seen = ", ".join(sorted(map(str, row))) or "(none)"
    return where.error(None, f"unknown format: fields seen: {seen}; expected {expected} "
                       "(a set with its own names: --columns prompt=COLUMN,...)")


def _messages(value: Any, field: str, where: Where) -> list[dict]:
    """A chat list as [{"role", "content"}]; ShareGPT's from/value and role names are mapped."""
    if not isinstance(value, list):
        raise where.error(field, f"expected a list of messages, got {_kind(value)}")
    if not value:
        raise where.error(field, "empty list of messages")
    defaults = ("from", "value") if field == "conversations" else ("role", "content")
    out = []
    for i, msg in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise where.error(name, f"expected a message object, got {_kind(msg)}")
        role_key = next((k for k in ("role", "from") if k in msg), defaults[0])
        text_key = next((k for k in ("content", "value") if k in msg), defaults[1])
        for key in (role_key, text_key):
            if key not in msg:
                raise where.error(f"{name}.{key}", "missing")
        role = ROLES.get(str(msg[role_key]).lower())
        if role is None:
            raise where.error(f"{name}.{role_key}", f"unknown role {msg[role_key]!r} "
                              f"(expected one of {', '.join(ROLES)})")
        if role == "system" and msg.get(text_key) in ("", None):
            continue  # exports often carry an empty system prompt: it says nothing
        out.append({"role": role, "content": _text(msg.get(text_key), f"{name}.{text_key}", where)})
    return out


# ---------------------------------------------------------------- SFT


def read_sft(path: str | Path, allow_empty: bool = False, columns: dict[str, str] | None = None) -> list[dict]:
    """Every row of an SFT file as {"id", "prompt", "response"} (+ "messages" for chat rows).

    A file without rows is an error unless `allow_empty` (an optional split, such as the empty
    preference files of a source without pairs)."""
    return _not_empty(list(iter_sft(path, columns)), path, allow_empty)


def iter_sft(path: str | Path, columns: dict[str, str] | None = None) -> Iterator[dict]:
    """read_sft's records one at a time (a large parquet file is checked without holding it)."""
    return (_sft_record(row, where) for where, row in iter_rows(path, columns, SFT_NEEDS))


def _not_empty(records: list[dict], path: str | Path, allow_empty: bool) -> list[dict]:
    if not records and not allow_empty:
        raise DataError(f"{path}: no rows (the file is empty)")
    return records


def _sft_record(row: dict, where: Where) -> dict:
    chat_key = _first(row, CHAT_KEYS, where)
    if chat_key:
        record = _chat_record(_messages(row[chat_key], chat_key, where), chat_key, where)
    elif "instruction" in row:
        record = _alpaca_record(row, where)
    else:
        record = _plain_record(row, where)
    return {"id": _row_id(row, where), **record}


def _prompt_answer_keys(row: dict, where: Where, formats, answer: str, aliases: str) -> tuple[str, str]:
    """The row's prompt and answer keys (PROMPT_KEYS, RESPONSE_KEYS); a row with neither is of an
    unknown format, one without either names the missing field (`answer`, or its `aliases`)."""
    p, a = _first(row, PROMPT_KEYS, where), _first(row, RESPONSE_KEYS, where)
    if p is None and a is None:
        raise _unknown(row, where, formats)
    if p is None:
        raise where.error("prompt", "missing (or give it as 'input')")
    if a is None:
        raise where.error(answer, f"missing (or give it as {aliases})")
    return p, a


def _plain_record(row: dict, where: Where) -> dict:
    p, r = _prompt_answer_keys(row, where, SFT_FORMATS, "response", "'output' or 'completion'")
    return {"prompt": _text(row[p], p, where), "response": _text(row[r], r, where)}


def _alpaca_record(row: dict, where: Where) -> dict:
    """Alpaca: the instruction is the prompt; a non-empty `input` is its context, after a blank line."""
    prompt = _text(row["instruction"], "instruction", where)
    extra = row[_first(row, ("input",), where)] if "input" in row else ""
    if not isinstance(extra, str):
        raise where.error("input", f"expected text, got {_kind(extra)}")
    if extra.strip():
        prompt += "\n\n" + extra
    r = _first(row, RESPONSE_KEYS, where)
    if r is None:
        raise where.error("output", "missing")
    return {"prompt": prompt, "response": _text(row[r], r, where)}


def _chat_record(messages: list[dict], field: str, where: Where) -> dict:
    """Chat rows train every assistant turn; prompt/response show the last exchange."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise where.error(field, "no assistant message to train on")
    if last != len(messages) - 1:
        raise where.error(f"{field}[{len(messages) - 1}]", f"the conversation ends with a {messages[-1]['role']} "
                          "turn; the last message must be the assistant's (drop the turns after the last answer)")
    prompt = next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), None)
    if prompt is None:
        raise where.error(field, "no user message before the last assistant message")
    return {"prompt": prompt, "response": messages[last]["content"], "messages": messages}


# ---------------------------------------------------------------- preferences


def read_preferences(path: str | Path, min_confidence: float = 0.0, allow_empty: bool = False,
                     columns: dict[str, str] | None = None) -> list[dict]:
    """Every pair as {"id", "prompt", "chosen", "rejected"} + metadata, low-confidence pairs dropped.

    A file without rows is an error unless `allow_empty`; all rows dropped is not an error."""
    records = _not_empty(list(iter_preferences(path, columns)), path, allow_empty)
    return [r for r in records if keeps(r, min_confidence)]


def iter_preferences(path: str | Path, columns: dict[str, str] | None = None) -> Iterator[dict]:
    """Every pair's record one at a time, none dropped (read_preferences drops by confidence)."""
    return (_preference_record(row, where) for where, row in iter_rows(path, columns, PREFERENCE_NEEDS))


def keeps(record: dict, min_confidence: float) -> bool:
    """Whether a pair passes `min_confidence`; pairs without a confidence are kept."""
    return record.get("confidence") is None or record["confidence"] >= min_confidence


def _preference_record(row: dict, where: Where) -> dict:
    if not {"prompt", "input", "chosen", "rejected"} & row.keys():
        raise _unknown(row, where, PREFERENCE_FORMATS)
    for key in ("chosen", "rejected"):
        if _first(row, (key,), where) is None:
            raise where.error(key, "missing")
    if not any(k in row for k in PROMPT_KEYS) and (hh := _hh_pair(row)):
        row = row | hh  # hh-rlhf: two transcripts, no prompt field
    if isinstance(row["chosen"], list) or isinstance(row["rejected"], list):
        prompt, chosen, rejected = _chat_pair(row, where)
    # A null prompt is an error (_first), not a cue to take the answers' common beginning as one.
    elif (p := _first(row, PROMPT_KEYS, where)) is not None:
        prompt = _prompt(row[p], p, where)
        chosen, rejected = _text(row["chosen"], "chosen", where), _text(row["rejected"], "rejected", where)
    else:
        prompt, chosen, rejected = _transcript_pair(row, where)
    if chosen.strip() == rejected.strip():
        raise where.error("rejected", "identical to 'chosen'")
    record = {"id": _row_id(row, where), "prompt": prompt, "chosen": chosen, "rejected": rejected}
    return record | _metadata(row, where)


def _prompt(value: Any, field: str, where: Where) -> str | list[dict]:
    if isinstance(value, list):
        return _messages(value, field, where)
    if not isinstance(value, str):
        raise where.error(field, f"expected text or a list of messages, got {_kind(value)}")
    return _text(value, field, where)


def _chat_pair(row: dict, where: Where) -> tuple[str | list[dict], str, str]:
    """Message lists: the last assistant message is the answer, the shared earlier turns the prompt
    (then a prompt field is not read at all, so a null there is no error: a column some rows lack)."""
    chosen = _messages(row["chosen"], "chosen", where)
    rejected = _messages(row["rejected"], "rejected", where)
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1]["role"] != "assistant":
            raise where.error(name, "the last message must be the assistant's answer")
    earlier = chosen[:-1]
    if rejected[:-1] != earlier:
        raise where.error("rejected", "its earlier turns differ from those of 'chosen' "
                          "(only the last assistant message may differ)")
    if any(m["role"] == "user" for m in earlier):
        return earlier, chosen[-1]["content"], rejected[-1]["content"]  # a full transcript
    p = _first(row, PROMPT_KEYS, where)
    if p is None:
        raise where.error("prompt", "missing, and 'chosen' has no user turn before its answer")
    prompt = _prompt(row[p], p, where)
    if earlier:  # only system turns: they go before the prompt
        prompt = earlier + (prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}])
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


def _hh_messages(text: Any) -> list[dict] | None:
    """A "\n\nHuman: ...\n\nAssistant: ..." transcript (Anthropic/hh-rlhf) as messages; None
    for any other text."""
    if not isinstance(text, str) or not text.lstrip("\n").startswith("Human:"):
        return None
    parts = HH_TURN.split("\n\n" + text.lstrip("\n"))
    return [{"role": HH_ROLES[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _hh_pair(row: dict) -> dict | None:
    """hh-rlhf's chosen and rejected transcripts as message lists (their shared turns then become
    the prompt, rendered with the chat template), or None when they are not both such transcripts."""
    chosen, rejected = _hh_messages(row["chosen"]), _hh_messages(row["rejected"])
    return {"chosen": chosen, "rejected": rejected} if chosen and rejected else None


def _transcript_pair(row: dict, where: Where) -> tuple[str, str, str]:
    """Two full texts, no prompt field: their common beginning, cut back to whitespace so no word
    is split, is the prompt, and the remainders are the answers."""
    chosen, rejected = _text(row["chosen"], "chosen", where), _text(row["rejected"], "rejected", where)
    if chosen.strip() == rejected.strip():
        raise where.error("rejected", "identical to 'chosen'")
    common = os.path.commonprefix([chosen, rejected])
    cut = len(common)
    while cut > 0 and not common[cut - 1].isspace():
        cut -= 1
    if not common[:cut].strip():
        raise where.error("prompt", "missing, and 'chosen' and 'rejected' share no beginning")
    return common[:cut], _text(chosen[cut:], "chosen", where), _text(rejected[cut:], "rejected", where)


def _metadata(row: dict, where: Where) -> dict:
    """The optional judge metadata, kept when present so reports and filters can use it."""
    out: dict[str, Any] = {}
    confidence = _optional(row, "confidence")
    if confidence is not None:
        out["confidence"] = _confidence(confidence, where)
    for key in METADATA_TEXT:
        value = _optional(row, key)
        if value is not None:
            if not isinstance(value, str):
                raise where.error(key, f"expected text, got {_kind(value)}")
            out[key] = value
    return out


def _confidence(value: Any, where: Where) -> float:
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isnan(number):
            return number
    raise where.error("confidence", f"expected a number, got {value!r}")


# ---------------------------------------------------------------- unpaired (KTO)


def read_unpaired(path: str | Path, min_confidence: float = 0.0, allow_empty: bool = False,
                  columns: dict[str, str] | None = None) -> list[dict]:
    """Every row as {"id", "prompt", "completion", "label": bool}; a preference pair (above
    `min_confidence`) becomes two rows, `<id>:chosen` (true) and `<id>:rejected` (false)."""
    return _not_empty(list(iter_unpaired(path, min_confidence, columns)), path, allow_empty)


def iter_unpaired(path: str | Path, min_confidence: float = 0.0,
                  columns: dict[str, str] | None = None) -> Iterator[dict]:
    """read_unpaired's records one at a time."""
    for where, row in iter_rows(path, columns, UNPAIRED_NEEDS):
        if "label" in row or not {"chosen", "rejected"} & row.keys():
            yield _unpaired_record(row, where)
            continue
        pair = _preference_record(row, where)
        if keeps(pair, min_confidence):
            yield from split_pairs([pair])


def split_pairs(pairs: list[dict]) -> list[dict]:
    """Preference records as unpaired rows: the chosen answer true, the rejected false."""
    return [{"id": f"{p['id']}:{side}", "prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in pairs for side in ("chosen", "rejected")]


def _unpaired_record(row: dict, where: Where) -> dict:
    p, c = _prompt_answer_keys(row, where, UNPAIRED_FORMATS, "completion", "'response' or 'output'")
    completion = row[c]
    if isinstance(completion, list):  # TRL's conversational form: one assistant message
        msgs = _messages(completion, c, where)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise where.error(c, "expected one assistant message (the answer)")
        completion = msgs[0]["content"]
    return {"id": _row_id(row, where), "prompt": _prompt(row[p], p, where),
            "completion": _text(completion, c, where), "label": _label(row, where)}


def _label(row: dict, where: Where) -> bool:
    """true/false (JSON), or true/false/1/0/yes/no as text (CSV cells)."""
    value = row.get("label")
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    if value is None:
        problem = NULL if "label" in row else "missing"
        raise where.error("label", f"{problem}: true for a desirable answer, false for an undesirable one")
    raise where.error("label", f"expected true or false, got {value!r}")
