"""Data-parallel training on CPU: 2 processes (gloo) against 1 process with the doubled batch.

Two ranks with `batch_size` B and `grad_accum` 1 must follow the curve of one process with
`batch_size` B and `grad_accum` 2: each optimiser step then averages the same two micro-batch
losses (rank r takes micro-batch r of every pair in the one shuffled order), so losses, gradient
norms and the trained weights agree to float tolerance. (One process with `batch_size` 2B would
weight the mean by tokens over a differently grouped batch: close, but not the same numbers.)

The two ranks are started once with torch.multiprocessing, with the environment torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port), and each runs the CLI
commands of the README in turn: SFT for 2 steps, SFT resumed to 4, DPO for 2 steps with
`grad_accum` 2 (against one process with `grad_accum` 4).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_dpo import endings, rows_of

from picoalign.config import DPOConfig, LoraConfig, SFTConfig
from picoalign.io import read_json, read_jsonl_lenient, write_jsonl
from picoalign.train.dpo import dpo
from picoalign.train.sft import sft

COMMON = ["--device", "cpu", "--dtype", "fp32", "--seed", "0", "--tensorboard", "false", "--progress", "false",
          "--batch-size", "2", "--epochs", "0", "--warmup-steps", "4", "--schedule", "constant",
          "--set", "lora.r=4", "--set", "lora.alpha=8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, port: int, commands: list[list[str]]) -> None:
    """One rank, as torchrun would start it: the same commands on every rank."""
    from picoalign.cli import main

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        for argv in commands:
            assert main(argv) == 0, argv
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train_rows(out: Path, name: str) -> list[dict]:
    return [r for r in read_jsonl_lenient(out / "logs" / f"{name}.jsonl") if r["kind"] == "train"]


def assert_same_curve(two: list[dict], one: list[dict], keys: tuple[str, ...]) -> None:
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(two, one):
        assert a["tokens"] == b["tokens"], a["step"]  # both ranks' tokens counted
        for key in keys:
            # grad_norm is logged at 4 decimals: equal sums may round apart; a summed log-prob of
            # hundreds of tokens (~ -575) is exact only to float32's relative 1e-7
            tol = 1.01e-4 if key == "grad_norm" else 1e-5
            assert a[key] == pytest.approx(b[key], abs=tol, rel=2e-7), (a["step"], key)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        # gradients summed in another order; Adam (eps 1e-8) turns a last-bit difference of a
        # near-zero gradient into a visible step: one DPO adapter element of 64 moved 6.9e-6
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-5)


def test_two_processes_follow_one_process_with_the_doubled_batch(tmp_path, chat_model, data_dir, capfd):
    prefs = tmp_path / "prefs"
    for split in ("train", "val"):
        write_jsonl(prefs / f"dpo_{split}.jsonl", [endings(r) for r in rows_of(data_dir / f"dpo_{split}.jsonl")])
    two = {"sft": tmp_path / "two-sft", "dpo": tmp_path / "two-dpo"}
    sft_args = ["sft", "--data", str(data_dir), "--model", str(chat_model), "--out", str(two["sft"]),
                "--max-length", "208", "--lr", "1e-2", "--set", "monitor_pairs=2", *COMMON]
    dpo_args = ["dpo", "--data", str(prefs), "--model", str(chat_model), "--out", str(two["dpo"]),
                "--max-length", "240", "--lr", "5e-2", "--max-steps", "2", "--grad-accum", "2", *COMMON]
    commands = [sft_args + ["--max-steps", "2"], sft_args + ["--max-steps", "4", "--resume"], dpo_args]
    torch.multiprocessing.start_processes(rank_main, args=(free_port(), commands), nprocs=2, start_method="spawn")
    printed = capfd.readouterr().out

    # One process with twice the micro-batches per step, in one go: the curves to match.
    lora = LoraConfig(r=4, alpha=8)
    kw = dict(model=str(chat_model), device="cpu", dtype="fp32", seed=0, tensorboard=False, progress=False,
              batch_size=2, epochs=0, warmup_steps=4, schedule="constant", lora=lora)
    one_sft, one_dpo = tmp_path / "one-sft", tmp_path / "one-dpo"
    sft(SFTConfig(data=str(data_dir), out=str(one_sft), max_length=208, lr=1e-2, monitor_pairs=2, max_steps=4,
                  grad_accum=2, **kw))
    dpo(DPOConfig(data=str(prefs), out=str(one_dpo), max_length=240, lr=5e-2, max_steps=2, grad_accum=4, **kw))

    # SFT: 2 steps, then resumed to 4 (steps 3-4 need the restored adapter, AdamW and schedule)
    rows = train_rows(two["sft"], "sft")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rank 0 alone logs: each step once
    assert_same_curve(rows, train_rows(one_sft, "sft"), ("loss", "grad_norm", "lr", "epoch"))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert_same_weights(two["sft"], one_sft)
    marker = read_json(two["sft"] / "picoalign.json")
    assert marker["complete"] is True and marker["steps"] == 4
    state = torch.load(two["sft"] / "last" / "trainer_state.pt", weights_only=False)["loop"]
    assert (state["step"], state["micro"]) == (4, 8)  # the data position counts both ranks' micro-batches
    assert sorted(p.name for p in two["sft"].iterdir() if p.is_dir()) == ["last", "logs"]  # no .tmp/.old left
    log = read_jsonl_lenient(two["sft"] / "logs" / "sft.jsonl")
    assert [r["step"] for r in log if r["kind"] == "eval"] == [2, 4]
    starts = [r for r in log if r["kind"] == "start"]  # the run and its resumption, as the log states them
    assert starts == [{"kind": "start", "step": s, "world_size": 2, "batch_size": 2, "grad_accum": 1,
                       "effective_batch": 4} for s in (0, 2)]

    # DPO, grad_accum 2 on each rank (no gradient sync on the first micro-batch): the reference
    # log-probs, computed half on each rank and gathered in order, and the curve
    torch.testing.assert_close(torch.load(two["dpo"] / "ref_logps.pt")["logps"],  # {batch content: logps}
                               torch.load(one_dpo / "ref_logps.pt")["logps"], atol=1e-5, rtol=0)
    rows = train_rows(two["dpo"], "dpo")
    assert_same_curve(rows, train_rows(one_dpo, "dpo"),
                      ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen"))
    assert rows[1]["rewards/margins"] != 0  # the first step moved the policy
    assert_same_weights(two["dpo"], one_dpo)

    # Rank 0 alone prints; the effective batch is stated.
    line = "effective batch {} per optimiser step = batch_size 2 x grad_accum {} x 2 processes"
    assert printed.count("sft: " + line.format(4, 1)) == 2 and printed.count("dpo: " + line.format(8, 2)) == 1
    assert printed.count("sft: done in 4 steps") == 1


def test_fsdp_follows_one_process_with_the_doubled_batch(tmp_path, chat_model, data_dir, capfd):
    """`--fsdp true` (FSDP2 over gloo): each rank holds half of every block's weights, yet the run
    is the one of a single process with grad_accum 2: a LoRA adapter for 2 steps and resumed to 3
    (the checkpoint is gathered to rank 0, written once, scattered back), and full fine-tuning."""
    lora_out, full_out = tmp_path / "fsdp-lora", tmp_path / "fsdp-full"
    base = ["sft", "--data", str(data_dir), "--model", str(chat_model), "--max-length", "208", "--fsdp", "true",
            "--set", "monitor_pairs=2", *COMMON]
    lora = base + ["--out", str(lora_out), "--lr", "1e-2"]
    full = base + ["--out", str(full_out), "--lr", "1e-3", "--max-steps", "2", "--set", "lora.enabled=false"]
    commands = [lora + ["--max-steps", "2"], lora + ["--max-steps", "3", "--resume"], full]
    torch.multiprocessing.start_processes(rank_main, args=(free_port(), commands), nprocs=2, start_method="spawn")
    printed = capfd.readouterr().out

    kw = dict(model=str(chat_model), data=str(data_dir), device="cpu", dtype="fp32", seed=0, tensorboard=False,
              progress=False, batch_size=2, grad_accum=2, epochs=0, warmup_steps=4, schedule="constant",
              max_length=208, monitor_pairs=2)
    one_lora, one_full = tmp_path / "one-lora", tmp_path / "one-full"
    sft(SFTConfig(out=str(one_lora), lr=1e-2, max_steps=3, lora=LoraConfig(r=4, alpha=8), **kw))
    sft(SFTConfig(out=str(one_full), lr=1e-3, max_steps=2, lora=LoraConfig(enabled=False), **kw))

    rows = train_rows(lora_out, "sft")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert_same_curve(rows, train_rows(one_lora, "sft"), ("loss", "grad_norm", "lr"))
    assert_same_weights(lora_out, one_lora)
    blob = torch.load(lora_out / "last" / "trainer_state.pt", weights_only=False)
    assert blob["sharded"] is True and blob["loop"]["step"] == 3
    assert all(isinstance(v, torch.Tensor) and not hasattr(v, "full_tensor") for v in blob["trainable"].values())

    assert_same_curve(train_rows(full_out, "sft"), train_rows(one_full, "sft"), ("loss", "grad_norm"))
    wa, wb = load_file(full_out / "model.safetensors"), load_file(one_full / "model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) > 10
    for name in wa:
        # gradients summed in another order; Adam (eps 1e-8) turns a last-bit difference of a
        # near-zero gradient into a visible step: one DPO adapter element of 64 moved 6.9e-6
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-5)
    assert printed.count("(FSDP: parameters, gradients and optimizer state sharded)") == 3  # rank 0, 3 runs


def test_run_refuses_to_start_under_torchrun(monkeypatch, capsys):
    """The pipeline is one process: under torchrun every rank would write the same run folder."""
    from picoalign.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stop:
        main(["run", "--tag", "never"])
    assert stop.value.code == 2
    assert "start sft, dpo or pretrain with torchrun" in capsys.readouterr().err
