"""One process per output folder (picoalign/lock.py): a second `picoalign <stage> --out X` is refused at
once naming the holder; a lock its holder died with is taken over with a line saying so."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from picoalign.lock import LOCK_NAME, FolderBusy, folder_lock

HOLD = """
import sys, time
from picoalign.lock import folder_lock
with folder_lock(sys.argv[1], "sft"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold(folder):
    """A real second process that holds `folder`'s lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_on_the_same_out_exits_non_zero_at_once_naming_the_holder(tmp_path, capsys):
    """Before the lock, the second `picoalign sft --out X` went ahead (here it would fail later, on
    the missing data, without a word about the other process)."""
    out = tmp_path / "sft"
    holder = hold(out)
    try:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "picoalign", "sft", "--out", str(out), "--data",
                            str(tmp_path / "no-data")], capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
        assert r.returncode == 1, r.stderr
        assert f"is in use by process {holder.pid} on {socket.gethostname()} (picoalign sft" in r.stderr, r.stderr
        assert "no-data" not in r.stderr  # refused before the stage looked at anything
        assert took < 60
        with pytest.raises(FolderBusy, match=f"process {holder.pid}"):
            with folder_lock(out, "dpo"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without releasing: its lock file still names it; the next holder says so.
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    with folder_lock(out, "sft"):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"sft: taking over the stale lock of process {holder.pid}" in err and "no longer running" in err


def test_a_released_lock_is_taken_without_a_word_and_nests_in_one_process(tmp_path, capsys):
    with folder_lock(tmp_path, "run"):
        with folder_lock(tmp_path / ".", "eval"):  # `picoalign run` holds the folder its eval writes to
            pass
        assert json.loads((tmp_path / LOCK_NAME).read_text())["stage"] == "run"
    assert (tmp_path / LOCK_NAME).read_text() == ""
    with folder_lock(tmp_path, "sft"):
        pass
    assert capsys.readouterr().err == ""


def test_a_second_run_of_the_same_tag_is_refused(tmp_path, no_llm_api, capsys, monkeypatch):
    from picoalign import pipeline

    monkeypatch.chdir(tmp_path)
    holder = hold(tmp_path / "runs" / "t")
    try:
        code = pipeline.main(["--tag", "t", "--set", "stages=data", "--set", "data.provider=template"])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert code == 1 and f"in use by process {holder.pid}" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "t" / "config.yaml").exists()
