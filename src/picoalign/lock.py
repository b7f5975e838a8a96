"""One process per output folder: an exclusive lock file in every stage's `out`.

    with folder_lock("checkpoints/sft", "sft"):   # a second process on the same folder: FolderBusy
        ...

Two `picoalign sft --out X` at once would both train, interleave their logs and leave whichever
checkpoint finished last. The lock is `fcntl.flock` on `<out>/.picoalign.lock`: the kernel drops it
when its process ends, however it ends, so a crash never leaves a folder locked. The file holds
the holder's PID, host and stage, so the refusal names it; it is emptied on a clean exit, so a
file still naming a process when the lock is taken means that process died holding it (killed,
power lost), and the new holder says it takes the folder over. The file stays (removing it would
let a third process lock a fresh file while a second still holds the old one). Re-entrant within
one process: `picoalign run` holds its run folder, and its eval stage writes there too.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".picoalign.lock"
_held: dict[Path, int] = {}  # folder (resolved) -> how many nested holders in this process


class FolderBusy(RuntimeError):
    """Another process holds the output folder; the message names it."""


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (f"process {holder['pid']} on {holder.get('host', '?')} (picoalign {holder.get('stage', '?')}, "
            f"since {since})")


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    try:
        holder = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _write(fd: int, holder: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode() if holder else b"")
    os.fsync(fd)


def _taken_over(previous: dict, stage: str) -> None:
    """Print a line when the lock file still names a holder: it died without releasing it."""
    if not previous.get("pid"):
        return
    here = previous.get("host") == socket.gethostname()
    if here and _alive(int(previous["pid"])) and int(previous["pid"]) != os.getpid():
        why = "its PID is in use again by another program"
    else:
        why = "it is no longer running" if here else "its lock was released"
    print(f"{stage}: taking over the stale lock of {_describe(previous)}: {why}", file=sys.stderr)


@contextmanager
def folder_lock(folder: str | Path, stage: str) -> Iterator[Path]:
    """Hold `<folder>/.picoalign.lock` for the block; FolderBusy at once if another process does."""
    folder = Path(folder).resolve()
    if folder in _held:
        _held[folder] += 1
        try:
            yield folder
        finally:
            _held[folder] -= 1
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(f"{folder} is in use by {_describe(_read(fd))}; wait for it to finish, or "
                             "choose another --out") from None
        _taken_over(_read(fd), stage)
        _write(fd, {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage, "started": time.time()})
        _held[folder] = 1
        try:
            yield folder
        finally:
            del _held[folder]
            _write(fd, {})  # released cleanly: the next holder has nothing to take over
            if created:  # a stage that failed before writing anything leaves no folder behind
                _remove_if_only_the_lock(folder)
    finally:
        os.close(fd)  # drops the flock


def _remove_if_only_the_lock(folder: Path) -> None:
    try:
        if [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            (folder / LOCK_NAME).unlink()
            folder.rmdir()
    except OSError:  # gone already, or someone wrote into it meanwhile: leave it
        pass


def carry_lock(old: Path, new: Path) -> None:
    """Move the lock file from a folder about to be replaced (`old`) into its replacement (`new`):
    the same inode, so the lock is still held, and no gap in which another process could take it."""
    if (Path(old) / LOCK_NAME).exists():
        os.replace(Path(old) / LOCK_NAME, Path(new) / LOCK_NAME)


def output_folder(stage: str, cfg) -> str | None:
    """The folder a stage writes, which its lock guards; None for stages that write no folder
    (generate, chat, serve; export makes its folder whole elsewhere and swaps it in)."""
    if stage == "frontier":
        return str(Path(cfg.run) / "frontier")
    from picoalign.stages import run_order

    if stage not in run_order() or cfg is None:
        return None
    return getattr(cfg, "out", "") or getattr(cfg, "run", "") or None


def main_process() -> bool:
    """Under torchrun every rank runs the stage on the same folder: rank 0 holds the lock."""
    return int(os.environ.get("RANK", "0")) == 0
