"""Small file helpers: atomic writes (temp file + rename) and JSONL."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from picoalign.scrub import scrub_data


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; data and reports are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def place_folder(tmp: Path, out: Path) -> None:
    """Put a finished folder `tmp` (made beside `out`) in place of `out`, readable by others:
    the export's folder appears whole or not at all (a previous one is replaced)."""
    import shutil

    tmp.chmod(0o755)  # mkdtemp makes 0700
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def write_json(path: str | Path, obj: Any) -> None:
    """Records (metrics, dataset_meta, markers) go through the secret scrubber (picoalign/scrub.py)."""
    atomic_write_text(path, json.dumps(scrub_data(obj), indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one line (logs), through the secret scrubber: a torn last line is skipped by
    `read_jsonl_lenient`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(scrub_data(row), ensure_ascii=False) + "\n")


def read_jsonl_lenient(path: str | Path) -> list[dict]:
    """Read a log file, skipping lines that do not parse (a crash can tear the last one)."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
