"""`picoalign rl` under two processes (gloo): each rank samples its own prompts' groups (a group
never splits across ranks), and the update is the one of a single process that takes both
micro-batches with grad_accum 2: the same rollouts (a micro-batch's sampling seed comes from
the batch, not the rank), the same logged rewards and losses, the same trained adapter.
Started as tests/test_ddp.py does: torch.multiprocessing with torchrun's environment."""

from __future__ import annotations

import torch
from test_ddp import assert_same_curve, assert_same_weights, free_port, rank_main, train_rows

from picoalign.config import LoraConfig, RLConfig
from picoalign.train.rl import rl

ARGS = ["--device", "cpu", "--dtype", "fp32", "--seed", "0", "--tensorboard", "false", "--progress", "false",
        "--batch-size", "2", "--num-generations", "3", "--max-completion-length", "6", "--n-prompts", "8",
        "--val-prompts", "0", "--rewards", "rl_rewards:words", "--loss-type", "grpo", "--lr", "5e-2",
        "--max-steps", "2", "--warmup-steps", "0", "--schedule", "constant", "--sample-every", "0",
        "--set", "lora.r=4", "--set", "lora.alpha=8"]


def test_two_ranks_sample_their_own_groups_and_update_as_one_process(tmp_path, chat_model):
    two = tmp_path / "two"
    command = ["rl", "--model", str(chat_model), "--data", str(tmp_path), "--out", str(two), *ARGS]
    torch.multiprocessing.start_processes(rank_main, args=(free_port(), [command]), nprocs=2, start_method="spawn")

    one = tmp_path / "one"
    rl(RLConfig(model=str(chat_model), data=str(tmp_path), out=str(one), device="cpu", dtype="fp32", seed=0,
                tensorboard=False, progress=False, batch_size=2, num_generations=3, max_completion_length=6,
                n_prompts=8, val_prompts=0, rewards="rl_rewards:words", loss_type="grpo", lr=5e-2, max_steps=2,
                warmup_steps=0, schedule="constant", sample_every=0, grad_accum=2, lora=LoraConfig(r=4, alpha=8)))
    rows = train_rows(two, "rl")
    assert [r["step"] for r in rows] == [1, 2]
    assert_same_curve(rows, train_rows(one, "rl"), ("loss", "grad_norm", "reward", "reward_std",
                                                    "completions/mean_length", "entropy"))
    assert rows[0]["reward_std"] > 0 and rows[0]["grad_norm"] > 0  # a real update, not zero advantages
    assert_same_weights(two, one)
