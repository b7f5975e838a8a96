"""`picoalign rl` end to end on the tiny Llama: GRPO, RLOO and online DPO train and log TRL's
metrics; bad input stops before the model loads and leaves a finished checkpoint as it was."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from picoalign.config import LoraConfig, RLConfig
from picoalign.rewards import RewardError
from picoalign.train.rl import rl

TRL_NAMES = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/min_length",
             "completions/max_length", "completions/clipped_ratio", "entropy", "time/rollout")


def cfg_for(tmp_path, chat_model, **kw) -> RLConfig:
    base = dict(model=str(chat_model), out=str(tmp_path / "rl"), data=str(tmp_path), device="cpu", dtype="fp32",
                n_prompts=8, val_prompts=2, batch_size=2, num_generations=2, max_completion_length=6, max_steps=2,
                rewards="arith,random", reward_weights="1,0.1", sample_every=1, tensorboard=False, progress=False,
                lora=LoraConfig(r=4, alpha=8), lr=1e-3)
    return RLConfig(**{**base, **kw})


def log_rows(cfg) -> list[dict]:
    rows = [json.loads(line) for line in (Path(cfg.out) / "logs" / "rl.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "train"]


@pytest.mark.parametrize("method,extra", [("grpo", {"num_iterations": 2, "beta": 0.04}),
                                          ("grpo", {"multi_objective_aggregation": "normalize_then_sum"}),
                                          ("rloo", {}), ("online-dpo", {"beta": 0.1})])
def test_rl_trains_and_logs_trls_names(tmp_path, chat_model, method, extra):
    cfg = cfg_for(tmp_path, chat_model, method=method, **extra)
    summary = rl(cfg)
    assert summary["complete"] and summary["steps"] == 2
    rows = log_rows(cfg)
    assert len(rows) == 2
    for name in TRL_NAMES + ("rewards/arith/mean", "rewards/random/std"):
        assert name in rows[0], name
    if method == "grpo":
        assert "clip_ratio/region_mean" in rows[0] and ("kl" in rows[0]) == ("beta" in extra)
    if method == "online-dpo":
        assert "rewards/margins" in rows[0] and "kl" in rows[0]
    assert rows[0]["completions/max_length"] <= 6
    samples = [json.loads(line) for line in (tmp_path / "rl" / "logs" / "rl_samples.jsonl").read_text().splitlines()]
    assert len(samples[0]["completions"]) == 2 and set(samples[0]["rewards"]) == {"arith", "random"}
    assert "val/reward" in summary["last_eval"]
    assert (tmp_path / "rl" / "adapter_config.json").exists()


def test_bad_reward_stops_before_the_model_and_keeps_a_finished_checkpoint(tmp_path, chat_model, monkeypatch):
    out = tmp_path / "rl"
    out.mkdir()
    marker = out / "picoalign.json"
    marker.write_text('{"complete": true}')
    (tmp_path / "rl_bad_rewards.py").write_text(textwrap.dedent("""
        def short(prompts, completions, **columns):
            return [0.0]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("rl_bad_rewards", None)
    import picoalign.train.rl as rl_module

    def no_model(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(rl_module, "prepare", no_model)
    with pytest.raises(RewardError, match="rl_bad_rewards:short' returned 1 values for 2 completions"):
        rl(cfg_for(tmp_path, chat_model, rewards="rl_bad_rewards:short", reward_weights=""))
    with pytest.raises(RewardError, match="does not import"):
        rl(cfg_for(tmp_path, chat_model, rewards="rl_missing_module:f", reward_weights=""))
    assert marker.read_text() == '{"complete": true}' and sorted(p.name for p in out.iterdir()) == ["picoalign.json"]


def test_the_rl_preset_runs_end_to_end_on_a_tiny_model(tmp_path, chat_model):
    """configs/rl.yaml with the tiny model and small budgets: data, SFT, GRPO on arith, eval with
    the RL section (accuracy with intervals, paired RL vs SFT, a verdict), report."""
    from importlib import resources

    from picoalign.io import read_json
    from picoalign.pipeline import run_pipeline

    preset = resources.files("picoalign") / "configs" / "rl.yaml"
    small = {"max_steps": 2, "lora": {"r": 2, "alpha": 4}, "progress": False}
    overrides = {"runs_dir": str(tmp_path), "tag": "rl", "model": str(chat_model), "device": "cpu", "dtype": "fp32",
                 "data": {"n_sft_train": 4, "n_sft_val": 2, "n_sft_test": 2, "n_dpo_train": 2, "n_dpo_val": 2,
                          "n_dpo_test": 2},
                 "sft": {**small, "max_length": 256},
                 "rl": {**small, "n_prompts": 8, "num_generations": 2, "batch_size": 2, "max_completion_length": 6},
                 "eval": {"rl_prompts": 6, "max_new_tokens": 8}}  # the preset's n_samples 0: no story judges
    root = run_pipeline(str(preset), overrides, environ={})
    section = read_json(root / "metrics.json")["rl"]
    assert section["task"] == "arith" and section["n"] == 6 and section["rewards"] == ["arith"]
    assert set(section["models"]) == {"base", "sft", "rl"}
    acc = section["models"]["rl"]["arith"]
    assert acc["n"] == 6 and acc["ci_low"] <= acc["mean"] <= acc["ci_high"]
    assert section["comparisons"]["rl_vs_sft"]["arith"]["n"] == 6
    assert "kl_rl_to_sft" in section["cost"] and section["verdict"].startswith("RL ")
    assert (root / "checkpoints" / "rl" / "picoalign.json").exists()
    assert (root / "report" / "index.html").exists()
    cfg = read_json(root / "checkpoints" / "rl" / "picoalign.json")
    assert cfg["complete"]


def test_run_method_sft_rl_puts_rl_in_dpos_place_and_rl_after_dpo_starts_from_it(tmp_path):
    from picoalign.pipeline import resolve_configs

    configs = resolve_configs(None, {"runs_dir": str(tmp_path), "tag": "m", "method": "sft+rl"}, environ={})
    assert configs["run"].stage_names() == ["data", "sft", "rl", "eval", "report"]
    assert configs["rl"].model == str(tmp_path / "m" / "checkpoints" / "sft")
    configs = resolve_configs(None, {"runs_dir": str(tmp_path), "tag": "m", "stages": "data,sft,dpo,rl,eval"},
                              environ={})
    assert configs["rl"].model == str(tmp_path / "m" / "checkpoints" / "dpo")  # rl follows dpo: from its model
    assert configs["rl"].out == str(tmp_path / "m" / "checkpoints" / "rl")


@pytest.mark.parametrize("method,kw", [("grpo", {}), ("grpo", {"loss_type": "grpo", "num_iterations": 2}),
                                       ("grpo", {"loss_type": "dr_grpo"}), ("rloo", {}),
                                       ("online-dpo", {"beta": 0.1})])
def test_skipping_completions_the_loss_cannot_feel_changes_neither_loss_nor_gradient(tmp_path, chat_model,
                                                                                  chat_tokenizer, method, kw):
    """A group whose rewards are all equal (advantage 0) and, for online DPO, the completions
    that are neither a group's best nor its worst skip the update's forward: the loss, its
    gradient and the clip counts are those of the full forward."""
    import torch
    from helpers import fixed_rollout
    from test_trl_agreement import load, perturbed

    from picoalign.generation.batched import Sampling, generate_full
    from picoalign.models.chat import render_prompt
    from picoalign.rewards import RewardSet
    from picoalign.train.rl import RLTask

    prompts, g = ["What is two plus three?", "Tell me about the sea.", "Name a colour."], 4
    rewards = [1.0, 0.0, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 1.0, 1.0]  # group 1: nothing to learn
    model = load(chat_model)
    gens = generate_full(model.eval(), chat_tokenizer, prompts, Sampling(max_new_tokens=8, greedy=False, seed=1), n=g)
    ids = [x.token_ids or [chat_tokenizer.eos_token_id] for x in gens]
    cfg = cfg_for(tmp_path, chat_model, method=method, num_generations=g, batch_size=len(prompts),
                  max_completion_length=8, lora=LoraConfig(enabled=False), **kw)
    fixed = lambda prompts, completions, **c: rewards  # noqa: E731
    task = RLTask(model, chat_tokenizer, cfg, torch.device("cpu"), torch.float32,
                  ([{"prompt": p} for p in prompts], []), RewardSet(["fixed"], [1.0], [fixed]), tmp_path)
    r = fixed_rollout(task, model, [render_prompt(chat_tokenizer, p) for p in prompts], ids, rewards,
                      old_logps=cfg.num_iterations > 1)
    perturbed(model, 0.05)
    model.train()
    rows = task._trained_rows(r)
    assert rows is not None and len(rows) == (6 if method == "online-dpo" else 8)

    def loss_and_grad(rows):
        model.zero_grad()
        logps, _ = task._logps(r, model, entropy=True, rows=rows)
        loss, stats = getattr(task, "_" + method.replace("-", "_"))(r, logps)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None], stats

    full_loss, full_grad, full_stats = loss_and_grad(None)
    part_loss, part_grad, part_stats = loss_and_grad(rows)
    assert part_loss == pytest.approx(full_loss, abs=1e-6)
    assert max(float(x.abs().max()) for x in full_grad) > 1e-4  # there is a gradient to compare
    assert len(part_grad) == len(full_grad)
    for a, b in zip(part_grad, full_grad):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for key in full_stats:
        if key.startswith(("clip_ratio", "rewards/", "logps/")):
            assert float(part_stats[key]) == pytest.approx(float(full_stats[key]), abs=1e-6), key


def test_the_rl_verdict_names_every_reward_and_the_lengths():
    """The story preset's three rewards: one sentence saying, per reward, whether RL beat SFT
    beyond the noise (paired bootstrap over the same prompts, seed 0), and the lengths rounded."""
    from types import SimpleNamespace

    from picoalign.eval.rl_eval import _summary

    n = 8
    rows = [{"prompt": f"p{i}"} for i in range(n)]
    sft = {"spec": [0.3] * n, "darkness": [0.05] * n, "fluency": [-2.0] * n}
    rl = {"spec": [0.5 + 0.01 * i for i in range(n)],  # +0.2 or more on every prompt: beyond the noise
          "darkness": [0.05 + (0.02 if i % 2 else -0.02) for i in range(n)],  # ±: no difference shown
          "fluency": [-2.3] * n}  # -0.3 on every prompt: worse beyond the noise
    answers = {"sft": [SimpleNamespace(completion_tokens=252, finish_reason="length", text="s")] * n,
               "rl": [SimpleNamespace(completion_tokens=231.4, finish_reason="stop", text="r")] * n}
    out = _summary(rows, ["spec", "darkness", "fluency"], {"sft": sft, "rl": rl}, answers, seed=0)
    assert out["verdict"] == (
        "RL beat SFT on held-out spec reward beyond the noise: +0.235 [+0.219, +0.250] (paired, n=8); "
        "did not beat it on darkness reward: +0.000 [-0.015, +0.015] (paired, n=8); "
        "was worse on fluency reward beyond the noise: -0.300 [-0.300, -0.300] (paired, n=8); "
        "answer length 231 vs 252 tokens")


def test_sampled_answers_are_averaged_per_prompt_before_the_pairs():
    """`rl_samples` = 2: each prompt's two answers become one value per reward (a None reward is
    left out of its prompt's mean), so n is the prompts, not the answers; lengths and endings
    are averaged the same way, and the examples show each prompt's first answer."""
    from types import SimpleNamespace

    from picoalign.eval.rl_eval import _per_prompt, _summary

    assert _per_prompt([1.0, 3.0, float("nan"), 0.5, float("nan"), float("nan")], 2)[:2] == [2.0, 0.5]
    assert _per_prompt([float("nan"), float("nan")], 2)[0] != _per_prompt([float("nan"), float("nan")], 2)[0]
    rows = [{"prompt": f"Write a story.\n\nProtagonist: Maya {i}\n\nStory:"} for i in range(4)]
    sft = {"darkness": [0.0, 0.2] * 4, "spec": [0.5] * 8}  # 0.1 on every prompt
    rl = {"darkness": [0.3, 0.1, 0.2, 0.2, 0.4, 0.0, 0.1, float("nan")], "spec": [0.5] * 8}  # 0.2, 0.2, 0.2, 0.1
    answer = lambda text, tokens, end: SimpleNamespace(text=text, completion_tokens=tokens, finish_reason=end)  # noqa: E731
    answers = {"sft": [answer(f"s{i}", 256, "length" if i % 2 else "stop") for i in range(8)],
               "rl": [answer(f"r{i} Maya" if i % 2 else f"r{i}", 100 + 10 * i, "stop") for i in range(8)]}
    out = _summary(rows, ["darkness", "spec"], {"sft": sft, "rl": rl}, answers, seed=0, per_prompt=2)
    assert out["models"]["rl"]["spec_coverage"]["mean"] == 0.5 and out["models"]["rl"]["spec_coverage"]["n"] == 4
    assert out["n"] == 4
    assert out["models"]["sft"]["darkness"]["mean"] == pytest.approx(0.1)
    assert out["models"]["rl"]["darkness"]["mean"] == pytest.approx(0.175)
    assert out["models"]["sft"]["finished"]["mean"] == 0.5 and out["models"]["sft"]["finished"]["n"] == 4
    assert out["models"]["rl"]["completion_tokens"]["mean"] == pytest.approx(135.0)
    c = out["comparisons"]["rl_vs_sft"]["darkness"]
    assert c["n"] == 4 and c["mean_diff"] == pytest.approx(0.075)
    assert [e["rl"] for e in out["examples"]] == ["r0", "r2", "r4"]


def test_the_rl_section_shows_spec_coverage_apart_from_the_spec_reward():
    """A story that ends but drops the spec: the section reports the coverage of the spec on its
    own (per model and paired), so an RL model that won the spec reward by ending alone shows it."""
    from types import SimpleNamespace

    from picoalign.eval.rl_eval import _summary

    prompt = ("Write a short horror story that follows this story specification.\n\nTitle: The Lantern Hallway\n"
              "Setting: a lighthouse on an island\nProtagonist: Maya, a lighthouse keeper\n"
              "Supporting character: a cousin who smiles too long\nImportant object: a key that fits no door\n"
              "Taboo rule: Never look into the mirror after dark\n\nStory:")
    rows = [{"prompt": prompt}] * 4
    full = "Maya, a lighthouse keeper, kept a key that fits no door. A cousin who smiles too long said: never look into the mirror after dark, not on a lighthouse on an island."
    answers = {"sft": [SimpleNamespace(completion_tokens=256, finish_reason="length", text=full)] * 4,
               "rl": [SimpleNamespace(completion_tokens=90, finish_reason="stop", text="Rain fell all night.")] * 4}
    scores = {m: {"spec": [0.5] * 4} for m in answers}
    out = _summary(rows, ["spec"], scores, answers, seed=0)
    assert out["models"]["sft"]["spec_coverage"]["mean"] == 1.0 and out["models"]["rl"]["spec_coverage"]["mean"] == 0.0
    assert out["comparisons"]["rl_vs_sft"]["spec_coverage"]["mean_diff"] == -1.0
    assert out["verdict"].endswith("was worse on spec coverage (the spec reward's main part) beyond the noise: "
                                   "-1.000 [-1.000, -1.000] (paired, n=4); answer length 90 vs 256 tokens")
