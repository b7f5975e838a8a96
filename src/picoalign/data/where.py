"""Where a data row came from, and the error that names it: shared by every reader
(data/formats.py for JSONL/JSON/CSV, data/sources.py for parquet, arrow and `datasets`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A data file or row we cannot use: the message names the file, the line and the field."""


@dataclass(frozen=True)
class Where:
    """Where a row came from: the error prefix and the default id are built from it."""

    path: Path
    line: int  # 1-based physical line (.jsonl, .csv), item number (.json list) or row (parquet, arrow)
    item: bool = False
    row: bool = False

    def __str__(self) -> str:
        return f"{self.path}:{'item ' if self.item else 'row ' if self.row else ''}{self.line}"

    def error(self, field: str | None, problem: str) -> DataError:
        return DataError(f"{self}: field {field!r}: {problem}" if field else f"{self}: {problem}")

    def default_id(self) -> str:
        return f"{self.path.stem}-{self.line:06d}"
