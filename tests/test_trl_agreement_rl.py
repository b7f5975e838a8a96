"""picoalign's GRPO and RLOO against TRL 1.16's GRPOTrainer and RLOOTrainer on one fixed rollout.

TRL's trainers are built on the tiny Llama for real; only their sampling is replaced
(`_generate` returns our fixed prompt and completion token ids, as TRL's own tests do with
a patched generator), and the reward function returns fixed numbers. Then TRL's
`_generate_and_score_completions` gives its advantages, old and reference log-probs, and
`_compute_loss` its loss and metrics, after the policy's weights have moved (so the ratio to
the old log-probs is not 1 and clipping acts). picoalign's RLTask scores the same tokens with its
own packed forward (prompt once per row) and its pure losses. Compared: per-token log-probs,
advantages, loss, entropy, kl and clip ratios, to float tolerance.

Token ids. picoalign renders a prompt with the chat template and the generation prompt, as TRL
does for conversational prompts; the completions end at <|im_end|> (or at the length cap), as
both trainers' generation writes them.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")

from helpers import fixed_rollout  # noqa: E402
from test_trl_agreement import load, perturbed  # noqa: E402

from picoalign.config import LoraConfig, RLConfig  # noqa: E402
from picoalign.generation.batched import Sampling, generate_full  # noqa: E402
from picoalign.rewards import RewardSet  # noqa: E402
from picoalign.train.batching import render_prompt  # noqa: E402
from picoalign.train.rl import RLTask  # noqa: E402

PROMPTS = ["Tell me a story about the lighthouse.", "What is two plus three?"]
G = 3
MAX_NEW = 10
REWARDS = [1.0, 0.0, 0.5, 2.0, 2.0, 2.0]  # group 1 all equal: zero std, advantage 0


def fixed_reward(prompts, completions, **kwargs):
    return list(REWARDS)


@pytest.fixture(scope="module")
def sampled(chat_model, chat_tokenizer):
    """(prompt ids per prompt, completion ids per completion): G samples per prompt from the tiny model."""
    model = load(chat_model).eval()
    gens = generate_full(model, chat_tokenizer, PROMPTS, Sampling(max_new_tokens=MAX_NEW, greedy=False, seed=3), n=G)
    ids = [g.token_ids for g in gens]
    return [render_prompt(chat_tokenizer, p) for p in PROMPTS], ids


def trl_scored(trainer_cls, config_cls, tmp_path, chat_model, chat_tokenizer, sampled, reward_funcs=fixed_reward, **kw):
    """TRL's trainer, its scored generation batch (at the starting weights), then its loss
    and metrics after the policy moved."""
    from datasets import Dataset

    prompt_ids, completion_ids = sampled
    args = config_cls(output_dir=str(tmp_path), report_to=[], per_device_train_batch_size=len(completion_ids),
                      num_generations=G, max_completion_length=MAX_NEW, use_cpu=True, bf16=False, **kw)
    trainer = trainer_cls(model=load(chat_model), reward_funcs=reward_funcs, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                          processing_class=chat_tokenizer)
    texts = [chat_tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]
    repeated = [p for p in prompt_ids for _ in range(G)]
    generated = (repeated, completion_ids, texts) if config_cls.__name__ == "RLOOConfig" else (
        repeated, completion_ids, None, texts, None, {}, None, None)  # GRPO's also: tools, logprobs, images
    trainer._generate = lambda prompts: generated
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop
    out = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    perturbed(trainer.model, 0.05)
    trainer._metrics["train"].clear()
    loss = trainer._compute_loss(trainer.model, out)
    metrics |= {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return out, loss.item(), metrics


def ours(tmp_path, chat_model, chat_tokenizer, sampled, rewards=None, **kw):
    """picoalign's RLTask on the same rollout: (rollout, loss, stats, per-token log-probs after the move)."""
    prompt_ids, completion_ids = sampled
    cfg = RLConfig(model=str(chat_model), out=str(tmp_path / "out"), device="cpu", dtype="fp32", max_steps=1,
                   num_generations=G, batch_size=len(PROMPTS), max_completion_length=MAX_NEW,
                   lora=LoraConfig(enabled=False), rewards="random", **kw)
    model = load(chat_model)
    rows = [{"prompt": p} for p in PROMPTS]
    reward_set, values = rewards or (RewardSet(["fixed"], [1.0], [fixed_reward]), REWARDS)
    task = RLTask(model, chat_tokenizer, cfg, torch.device("cpu"), torch.float32, (rows, []), reward_set, tmp_path)
    r = fixed_rollout(task, model, prompt_ids, completion_ids, values)
    perturbed(model, 0.05)
    model.train()
    logps, entropy = task._logps(r, model, entropy=True)
    loss, stats = getattr(task, "_" + cfg.method.replace("-", "_"))(r, logps)
    stats["entropy"] = (entropy * r.mask).sum() / r.mask.sum()
    if hasattr(r, "stats_kl"):
        stats["kl"] = r.stats_kl
    return r, loss.item(), {k: float(v) for k, v in stats.items()}, logps.detach()


CLIP = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
        "clip_ratio/high_max")


@pytest.mark.parametrize("loss_type,scale,beta", [("grpo", "group", 0.0), ("dapo", "batch", 0.0),
                                                  ("dr_grpo", "none", 0.04), ("dapo", "group", 0.1)])
def test_grpo_matches_trl(tmp_path, chat_model, chat_tokenizer, sampled, loss_type, scale, beta):
    from trl import GRPOConfig, GRPOTrainer

    kw = {"loss_type": loss_type, "scale_rewards": scale, "beta": beta, "num_iterations": 2, "epsilon": 0.2,
          "epsilon_high": 0.28}
    out, trl_loss, trl_metrics = trl_scored(GRPOTrainer, GRPOConfig, tmp_path / "trl", chat_model, chat_tokenizer,
                                            sampled, **kw)
    r, loss, stats, logps = ours(tmp_path, chat_model, chat_tokenizer, sampled, **kw)
    mask = out["completion_mask"].float()
    width = mask.shape[1]
    assert torch.equal(r.mask[:, :width], mask)
    torch.testing.assert_close(r.old_logps[:, :width] * mask, out["old_per_token_logps"] * mask, atol=1e-5, rtol=1e-5)
    if beta:
        torch.testing.assert_close(r.ref_logps * mask, out["ref_per_token_logps"] * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.advantages, out["advantages"], atol=1e-6, rtol=1e-6)
    # TRL counts zero-std groups from the std it scales by: with scale_rewards=batch, the batch's
    # (so 0 here); picoalign always counts the groups with nothing to learn (0.5 here).
    assert trl_metrics["frac_reward_zero_std"] == pytest.approx(0.0 if scale == "batch" else 0.5)
    assert loss == pytest.approx(trl_loss, abs=1e-5)
    for key in ("entropy", *CLIP, *(("kl",) if beta else ())):
        assert stats[key] == pytest.approx(trl_metrics[key], abs=1e-5), key
    assert any(stats[k] > 0 for k in CLIP[:3])  # the move was large enough for clipping to act


SECOND = [0.2, None, 0.7, 0.1, 0.3, 0.3]  # a None: that function declined one completion


def second_reward(prompts, completions, **kwargs):
    return list(SECOND)


def test_gdpo_normalize_then_sum_matches_trl(tmp_path, chat_model, chat_tokenizer, sampled):
    """Two rewards, weights 1 and 3, each normalised within its group before the weighted sum
    (TRL's multi_objective_aggregation="normalize_then_sum", GDPO): advantages and loss agree."""
    from trl import GRPOConfig, GRPOTrainer

    kw = {"multi_objective_aggregation": "normalize_then_sum", "loss_type": "dapo", "num_iterations": 2}
    out, trl_loss, trl_metrics = trl_scored(GRPOTrainer, GRPOConfig, tmp_path / "trl", chat_model, chat_tokenizer,
                                            sampled, reward_funcs=[fixed_reward, second_reward],
                                            reward_weights=[1.0, 3.0], **kw)
    rewards = (RewardSet(["fixed", "second"], [1.0, 3.0], [fixed_reward, second_reward]),
               [list(pair) for pair in zip(REWARDS, SECOND)])
    r, loss, stats, _ = ours(tmp_path, chat_model, chat_tokenizer, sampled, rewards=rewards, **kw)
    torch.testing.assert_close(r.advantages, out["advantages"], atol=1e-5, rtol=1e-5)
    assert r.advantages[1].item() != 0.0 and r.advantages[3:].abs().sum().item() > 0.1  # group 1 is flat on reward 1 only
    assert loss == pytest.approx(trl_loss, abs=1e-5)
    assert stats["entropy"] == pytest.approx(trl_metrics["entropy"], abs=1e-5)


@pytest.mark.parametrize("beta,normalize", [(0.0, False), (0.05, True)])
def test_rloo_matches_trl(tmp_path, chat_model, chat_tokenizer, sampled, beta, normalize):
    from trl import RLOOConfig, RLOOTrainer

    kw = {"beta": beta, "num_iterations": 2, "epsilon": 0.2, "normalize_advantages": normalize}
    out, trl_loss, trl_metrics = trl_scored(RLOOTrainer, RLOOConfig, tmp_path / "trl", chat_model, chat_tokenizer,
                                            sampled, **kw)
    r, loss, stats, _ = ours(tmp_path, chat_model, chat_tokenizer, sampled, method="rloo", **kw)
    torch.testing.assert_close(r.advantages, out["advantages"], atol=1e-5, rtol=1e-5)
    assert loss == pytest.approx(trl_loss, abs=1e-5)
    for key in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                *(("kl",) if beta else ())):
        assert stats[key] == pytest.approx(trl_metrics[key], abs=1e-5), key


# ---------------------------------------------------------------- online DPO
# TRL's OnlineDPOTrainer samples 2 completions per prompt and lays them out as [every prompt's
# first, every prompt's second]; picoalign's G = 2 group is [prompt 0's two, prompt 1's two].
# With no tied rewards both pick the same (chosen, rejected) pair per prompt: the best and the
# worst. (A tie: TRL trains on it, first as chosen; picoalign leaves the group out.)
DPO_REWARDS = [1.0, 0.0, 0.2, 0.9]  # picoalign's layout: prompt 0 prefers its first, prompt 1 its second


def trl_online_dpo(tmp_path, chat_model, chat_tokenizer, prompt_ids, completion_ids, beta):
    """TRL's training_step on our fixed tokens (its `_generate` replaced): (loss, its stats)."""
    from datasets import Dataset
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    order = [i * 2 + j for j in range(2) for i in range(len(PROMPTS))]  # TRL's layout, in our indices
    rewards = [DPO_REWARDS[i] for i in order]
    args = OnlineDPOConfig(output_dir=str(tmp_path), report_to=[], per_device_train_batch_size=len(PROMPTS),
                           max_new_tokens=MAX_NEW, use_cpu=True, bf16=False, beta=beta)
    trainer = OnlineDPOTrainer(model=load(chat_model), reward_funcs=lambda prompts, completions, **kw: rewards,
                               args=args, train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                               processing_class=chat_tokenizer)
    pad = chat_tokenizer.pad_token_id

    def padded(rows, left):
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) * left + r + [pad] * (width - len(r)) * (not left) for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) * left + [1] * len(r) + [0] * (width - len(r)) * (not left)
                             for r in rows])
        return ids, mask

    p_ids, p_mask = padded([prompt_ids[i // 2] for i in order], left=True)
    c_ids, c_mask = padded([completion_ids[i] for i in order], left=False)
    trainer._generate = lambda model, prompts, images=None: (p_ids, p_mask, c_ids, c_mask, None)
    perturbed(trainer.model, 0.05)  # the policy moves; TRL's reference is its copy of the start
    loss = trainer.training_step(trainer.model, {"prompt": list(PROMPTS)})
    return loss.item(), {k: v[-1] for k, v in trainer.stats.items() if v}


@pytest.mark.parametrize("equal_lengths", [False, True])
def test_online_dpo_matches_trl(tmp_path, chat_model, chat_tokenizer, equal_lengths):
    prompt_ids = [render_prompt(chat_tokenizer, p) for p in PROMPTS]
    model = load(chat_model).eval()
    gens = generate_full(model, chat_tokenizer, PROMPTS, Sampling(max_new_tokens=MAX_NEW, greedy=False, seed=5), n=2)
    completion_ids = [g.token_ids for g in gens]
    if equal_lengths:  # TRL's objective/kl also sums the padding after an answer's end: none here
        shortest = min(map(len, completion_ids))
        completion_ids = [c[:shortest] for c in completion_ids]
    else:  # answers that ended at different lengths: the padding must count nowhere
        completion_ids = [c[:n] for c, n in zip(completion_ids, (MAX_NEW, 6, 8, 4))]
    assert (len(set(map(len, completion_ids))) == 1) == equal_lengths
    beta = 0.1
    trl_loss, trl_stats = trl_online_dpo(tmp_path / "trl", chat_model, chat_tokenizer, prompt_ids,
                                         completion_ids, beta)

    cfg = RLConfig(model=str(chat_model), out=str(tmp_path / "out"), device="cpu", dtype="fp32", max_steps=1,
                   num_generations=2, batch_size=len(PROMPTS), max_completion_length=MAX_NEW, method="online-dpo",
                   beta=beta, lora=LoraConfig(enabled=False), rewards="random")
    policy = load(chat_model)
    task = RLTask(policy, chat_tokenizer, cfg, torch.device("cpu"), torch.float32,
                  ([{"prompt": p} for p in PROMPTS], []), RewardSet(["fixed"], [1.0], [fixed_reward]), tmp_path)
    assert task.needs_ref  # the reference's log-probs: the frozen copy RLTask took of the start
    r = fixed_rollout(task, policy, prompt_ids, completion_ids, DPO_REWARDS, old_logps=False)
    perturbed(policy, 0.05)
    policy.train()
    logps, _ = task._logps(r, policy, entropy=True)
    loss, stats = task._online_dpo(r, logps)

    assert stats["pairs/usable"].item() == 1.0  # no ties: both sides train on the same two pairs
    assert loss.item() == pytest.approx(trl_loss, abs=1e-5)
    for key in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", *(("objective/kl",) if equal_lengths else ())):
        ours_key = "kl" if key == "objective/kl" else key
        assert stats[ours_key].item() == pytest.approx(trl_stats[key], abs=1e-4, rel=1e-5), key
    assert abs(trl_loss - math.log(2)) > 1e-3  # the policy moved away from the reference: a real margin
