"""Rows from the Hugging Face `datasets` shapes: parquet, arrow, saved datasets and hub sets.

    from picoalign.data.sources import source_rows, is_source
    is_source("prefs.parquet")                       # True: .parquet, .arrow, a saved or sharded folder, hf:...
    for where, row in source_rows("shards/"):        # every shard's rows in order, a batch at a time
        ...
    source_rows("hf:trl-lib/ultrafeedback_binarized:train")   # online only; HF_ENDPOINT honoured

A `.parquet` file or a folder of them (the hub's layout: `data/train-00000-of-00002.parquet`),
an `.arrow` file (what `Dataset.save_to_disk` writes, or an IPC file of your own) and a
`save_to_disk` folder are read with pyarrow a record batch at a time, so checking a 1 GB file
never holds it whole. A hub id goes through `datasets.load_dataset(..., streaming=True)`. Each
row is a plain dict, as a JSONL line would be, and is read by the same code (data/formats.py)
with errors named `file:row N`. pyarrow and `datasets` come with the `hf` extra
(`pip install 'picoalign[hf]'`).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

from picoalign.data.where import DataError, Where

HUB = "hf:"
SUFFIXES = (".parquet", ".arrow")
BATCH_ROWS = 1024  # rows per pyarrow batch: a few MB of text at a time
EXTRA = "pip install 'picoalign[hf]'"
ENDPOINT = "https://huggingface.co"  # the hub, unless HF_ENDPOINT names a mirror
PROBE_SECONDS = 5.0


def is_source(spec: str | Path) -> bool:
    """Whether `spec` names a `datasets`-shaped source (not a .jsonl/.json/.csv file)."""
    text = str(spec)
    if text.startswith(HUB):
        return True
    path = Path(text)
    return path.suffix.lower() in SUFFIXES or (path.is_dir() and bool(_folder_files(path)))


def source_rows(spec: str | Path) -> Iterator[tuple[object, dict]]:
    """Yield `(where, row)` for every row of a source, in order."""
    text = str(spec)
    if text.startswith(HUB):
        yield from _hub_rows(text)
        return
    path = Path(text)
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise FileNotFoundError(f"{path}: no .parquet or .arrow files in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such data file")
    for file in files:
        yield from _file_rows(file)


def columns_of(spec: str | Path) -> list[str] | None:
    """The column names of a local source, read from its schema (no rows); None for a hub set."""
    if str(spec).startswith(HUB):
        return None
    path = Path(spec)
    first = _folder_files(path)[0] if path.is_dir() else path
    return list(_schema(first).names)


def _folder_files(path: Path) -> list[Path]:
    """A `save_to_disk` folder's arrow files in its own order (state.json), else every parquet
    shard under the folder, else every arrow file, sorted by path."""
    state = path / "state.json"
    if state.is_file():
        names = [f["filename"] for f in json.loads(state.read_text(encoding="utf-8")).get("_data_files", [])]
        return [path / n for n in names]
    for suffix in SUFFIXES:
        found = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
        if found:
            return found
    return []


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError(f"reading .parquet and .arrow data needs pyarrow: {EXTRA}") from None
    return pyarrow


def _schema(path: Path):
    pa = _pyarrow()
    if path.suffix.lower() == ".parquet":
        return pa.parquet.ParquetFile(path).schema_arrow
    with _arrow_reader(pa, path) as reader:
        return reader.schema


def _arrow_reader(pa, path: Path):
    """An arrow file is either the IPC file format or the stream format (`save_to_disk` writes
    the stream format); both are read a batch at a time from a memory map."""
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source)


def _batches(path: Path):
    pa = _pyarrow()
    try:
        if path.suffix.lower() == ".parquet":
            yield from pa.parquet.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
            return
        reader = _arrow_reader(pa, path)
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        else:
            yield from reader
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable {path.suffix} file ({e})") from None


def _file_rows(path: Path) -> Iterator[tuple[object, dict]]:
    n = 0
    for batch in _batches(path):
        for row in batch.to_pylist():
            n += 1
            yield Where(path, n, row=True), row


def _hub_rows(spec: str) -> Iterator[tuple[object, dict]]:
    """A hub set, streamed: `hf:owner/name:split`. Without a network this is one line saying so."""
    name, _, split = spec[len(HUB):].rpartition(":")
    if not name or not split or "/" not in name:
        raise DataError(f"{spec}: expected hf:OWNER/NAME:SPLIT, e.g. hf:trl-lib/ultrafeedback_binarized:train")
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{spec}: reading hub sets needs the `datasets` library: {EXTRA}") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0")
    try:
        if offline:
            raise ConnectionError("HF_HUB_OFFLINE is set")
        _probe(os.environ.get("HF_ENDPOINT", ENDPOINT))  # fail in seconds, not after datasets' retries
        rows = iter(datasets.load_dataset(name, split=split, streaming=True))
        first = next(rows, None)
    except (ConnectionError, OSError, TimeoutError) as e:
        raise DataError(_no_network(spec, name, e)) from None
    except ValueError as e:  # an unknown split: datasets names the ones there are
        raise DataError(f"{spec}: {e}") from None
    for n, row in enumerate(itertools.chain([first] if first is not None else [], rows), 1):
        yield Where(Path(spec), n, row=True), dict(row)


def _probe(endpoint: str) -> None:
    """Raise ConnectionError unless the hub's address answers (any HTTP status will do)."""
    import httpx

    try:
        httpx.head(endpoint, timeout=PROBE_SECONDS)
    except httpx.HTTPError as e:
        raise ConnectionError(str(e) or type(e).__name__) from None


def _no_network(spec: str, name: str, error: Exception) -> str:
    endpoint = os.environ.get("HF_ENDPOINT", ENDPOINT)
    why = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    return (f"{spec}: cannot reach the hub at {endpoint} ({why}); on a machine with a network, save the set "
            f"with `datasets.load_dataset('{name}', split=...).to_parquet('set.parquet')` and give --data set.parquet")


def data_split(data: str | Path, name: str, main: bool) -> str | Path | None:
    """Where a stage reads one split: `name` inside the data folder `data`, or `name` itself
    when it is a hub id or an absolute path. When `data` names one source (a file, a parquet
    or saved folder, a hub id), that source is the `main` split (training, or eval's test rows)
    and the others (validation, monitor) are absent. An absent optional split is None."""
    text = str(name)
    if text.startswith(HUB):
        return text
    if str(data).startswith(HUB) or Path(data).is_file() or (Path(data).is_dir() and is_source(data)
                                                              and not any(Path(data).glob("*.jsonl"))):
        return data if main else None
    path = Path(data) / text
    return path if main or path.exists() else None
