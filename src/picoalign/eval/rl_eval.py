"""The RL section of `eval`: held-out prompts of the RL stage's task, scored for every model.

    from picoalign.eval.rl_eval import rl_task_section
    section = rl_task_section(run_folder, models, device, dtype, seed)   # metrics.json's "rl"

Read from the run's RL checkpoint (`checkpoints/rl/config.yaml`): which prompts it trained on
and with which rewards. The held-out prompts are the arith test split (never a training prompt;
data/arith.py) or, for a prompt file, the val rows the stage kept out of training. Every model of
the run (base, SFT, DPO, RL) answers them greedily and, with `rl_samples` = k > 0, also k times
sampled as the RL stage sampled its rollouts (its temperature, top_p, top_k; TRL's GRPO samples
its `num_generations_eval` answers the same way), each reward then averaged over a prompt's k
answers. Why both: greedy decoding of a small story model loops to the cap, and a loop that
repeats a dark phrase scores as very dark, so on stories greedy hides what a user sampling the
model gets. Each reward is scored per answer (for arith always `arith` itself, so a run trained
on the `random` control is judged on the task it did not see); `random` and `llm-judge` are left
out (no signal; cost). Reported: each reward's
mean with its 95% bootstrap interval (for arith, the accuracy), paired per-prompt comparisons
(RL vs SFT, RL vs base, SFT vs base), the cost of RL (KL to SFT on RL's own answers, answer
length, fluency where scored), and one plain sentence: did RL beat SFT beyond the noise?
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from picoalign.eval.stats import excludes_zero, mean_ci, paired

SKIPPED = ("random", "llm-judge")
COMPARE = (("rl", "sft"), ("rl", "base"), ("sft", "base"))


def rl_setup(run: Path) -> dict | None:
    """The RL stage's config as it ran (None when the run has no finished RL model)."""
    path = Path(run) / "checkpoints" / "rl" / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else None


def heldout_rows(setup: dict, n: int) -> list[dict]:
    if setup.get("prompts", "arith") == "arith" and not setup.get("test_file"):
        from picoalign.data.arith import arith_rows

        return arith_rows(n, int(setup.get("seed", 0)), "test")
    from picoalign.train.rl import read_prompt_rows

    cfg = rl_config(setup)
    if cfg.test_file:  # e.g. the story task's sft_test.jsonl: prompts neither SFT nor RL trained on
        from picoalign.data.formats import iter_rows

        return [row for _, row in iter_rows(Path(cfg.data) / cfg.test_file)][:n]
    return read_prompt_rows(cfg)[1][:n]


def rl_config(setup: dict):
    from picoalign.config import RLConfig, load_config

    return load_config(RLConfig, None, setup, environ={})


def task_rewards(setup: dict) -> list[str]:
    names = [r.strip() for r in str(setup.get("rewards", "")).split(",") if r.strip() and r.strip() not in SKIPPED]
    if setup.get("prompts", "arith") == "arith" and "arith" not in names:
        names.insert(0, "arith")
    return names


def rl_task_section(run: Path, models: dict[str, str], device, dtype, seed: int = 0, n: int = 0,
                    samples: int = 0) -> dict | None:
    """Score every model on the RL task's held-out prompts, greedily and (`samples` > 0) sampled
    that many times per prompt; None when the run has no RL model."""
    from picoalign.generation.batched import Sampling, generate_full
    from picoalign.models.load import load_model
    from picoalign.rewards import RewardSet
    from picoalign.train.loop import autocast_for
    from picoalign.train.rl import reward_context, score

    setup = rl_setup(run)
    if setup is None or "rl" not in models:
        return None
    n = n or int(setup.get("eval_prompts", 0)) or 100
    rows = heldout_rows(setup, n)
    names = task_rewards(setup)
    cfg = rl_config(setup)
    rewards = RewardSet.build(names, [1.0] * len(names), reward_context(cfg, device))
    cap = cfg.max_completion_length
    decodings = {"greedy": (Sampling(max_new_tokens=cap, greedy=True, seed=seed), 1)}
    if samples:
        decodings["sampled"] = (Sampling(max_new_tokens=cap, greedy=False, temperature=cfg.temperature,
                                         top_p=cfg.top_p, top_k=cfg.top_k, seed=seed), samples)
    scores = {d: {} for d in decodings}
    answers = {d: {} for d in decodings}
    kept = {}
    for name, path in models.items():
        model, tokenizer = load_model(path, device)
        model.to(dtype).eval()
        for decoding, (sampling, k) in decodings.items():
            with autocast_for(device, dtype):
                gens = generate_full(model, tokenizer, [r["prompt"] for r in rows], sampling, batch_size=32, n=k)
            per_func = score(rewards, rows, gens, k)
            scores[decoding][name] = {f: per_func[:, i].tolist() for i, f in enumerate(names)}
            answers[decoding][name] = gens
            print(f"eval: rl task, {name}, {decoding}: "
                  + ", ".join(f"{f} {_mean(v):.3f}" for f, v in scores[decoding][name].items()))
        if name in ("sft", "rl"):
            kept[name] = (model, tokenizer)
    section = _summary(rows, names, scores["greedy"], answers["greedy"], seed)
    section["decoding"] = {"greedy": True, "n": 1}
    if samples:
        section["sampled"] = _summary(rows, names, scores["sampled"], answers["sampled"], seed, per_prompt=samples)
        section["sampled"]["decoding"] = {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                                          "n": samples}
    if "sft" in kept:  # what RL cost: how far its answers moved from SFT's distribution
        from picoalign.eval.kl import mean_token_kl

        (policy, tokenizer), (sft, _) = kept["rl"], kept["sft"]
        with autocast_for(device, dtype), torch.no_grad():
            section["cost"]["kl_rl_to_sft"] = round(mean_token_kl(
                policy, sft, tokenizer, [r["prompt"] for r in rows], [g.text for g in answers["greedy"]["rl"]],
                device), 5)
    print(f"eval: rl, greedy: {section['verdict']}")
    if samples:
        print(f"eval: rl, sampled ({samples} per prompt): {section['sampled']['verdict']}")
    return section


def _summary(rows, names, scores, answers, seed, per_prompt: int = 1) -> dict:
    """Means, paired comparisons and the verdict; with `per_prompt` = k answers per prompt (prompt
    0's k, then prompt 1's), every value is first averaged over a prompt's k answers, so the
    intervals and pairs stay per prompt (n = the prompts, not the answers)."""
    per = per_prompt
    scores = {m: {f: _per_prompt(v, per) for f, v in s.items()} for m, s in scores.items()}
    models = {m: {f: mean_ci([x for x in v if x == x], seed) for f, v in s.items()} for m, s in scores.items()}
    for m, gens in answers.items():
        models[m]["completion_tokens"] = mean_ci(_per_prompt([g.completion_tokens for g in gens], per), seed)
        models[m]["finished"] = mean_ci(_per_prompt([float(g.finish_reason == "stop") for g in gens], per), seed)
    parts = {}
    if "spec" in names:  # the spec reward's main part on its own: a reward that moved by ending alone shows here
        from picoalign.eval.axes import spec_coverage

        coverage = {m: _per_prompt([_nan(spec_coverage(rows[i // per]["prompt"], g.text)) for i, g in enumerate(gens)],
                                   per)
                    for m, gens in answers.items()}
        if any(x == x for values in coverage.values() for x in values):
            parts["spec_coverage"] = coverage
            for m in answers:
                models[m]["spec_coverage"] = mean_ci([x for x in coverage[m] if x == x], seed)
    comparisons = {}
    for a, b in COMPARE:
        if a in scores and b in scores:
            comparisons[f"{a}_vs_{b}"] = {k: paired(*_both(scores[a][k], scores[b][k]), seed=seed) for k in names}
            for k, by_model in parts.items():
                comparisons[f"{a}_vs_{b}"][k] = paired(*_both(by_model[a], by_model[b]), seed=seed)
    main = names[0]
    verdict = "no SFT model to compare with"
    if "rl_vs_sft" in comparisons:
        verdict = "; ".join(_verdict_part(k, comparisons["rl_vs_sft"][k], first=i == 0)
                            for i, k in enumerate([*names, *parts]))
        verdict += (f"; answer length {models['rl']['completion_tokens']['mean']:.0f} vs "
                    f"{models['sft']['completion_tokens']['mean']:.0f} tokens")
    return {"task": "arith" if main == "arith" and "answer" in rows[0] else "prompts", "n": len(rows),
            "rewards": names, "models": models, "comparisons": comparisons, "cost": {}, "verdict": verdict,
            "examples": [{"prompt": rows[i]["prompt"], **{m: answers[m][i * per].text for m in answers}}
                         for i in range(min(3, len(rows)))]}


def _verdict_part(name: str, c: dict, first: bool) -> str:
    """"RL beat SFT on held-out spec reward beyond the noise: +0.199 [+0.105, +0.290] (paired,
    n=64)" for the first reward, "did not beat it on darkness reward: ..." or "was worse on
    fluency reward beyond the noise: ..." for the others."""
    beat = excludes_zero(c) and c["ci_low"] > 0
    worse = excludes_zero(c) and c["ci_high"] < 0
    what = {"arith": "accuracy", "spec_coverage": "spec coverage (the spec reward's main part)"}.get(name, f"{name} reward")
    if first:
        who = f"RL {'beat' if beat else 'was worse than' if worse else 'did not beat'} SFT on held-out"
    else:
        who = "beat it on" if beat else "was worse on" if worse else "did not beat it on"
    return (f"{who} {what}{' beyond the noise' if beat or worse else ''}: {c['mean_diff']:+.3f} "
            f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] (paired, n={c['n']})")


def _per_prompt(values: list, k: int) -> list[float]:
    """The mean of each prompt's k consecutive values, NaN (a None reward) left out; NaN when all are."""
    if k == 1:
        return list(values)
    out = []
    for i in range(0, len(values), k):
        kept = [x for x in values[i:i + k] if x == x]
        out.append(sum(kept) / len(kept) if kept else float("nan"))
    return out


def _nan(x):
    return float("nan") if x is None else x


def _both(a: list, b: list) -> tuple[list, list]:
    """The prompts both models have a score for (a None reward is NaN)."""
    keep = [i for i in range(len(a)) if a[i] == a[i] and b[i] == b[i]]
    return [a[i] for i in keep], [b[i] for i in keep]


def _mean(values: list) -> float:
    kept = [x for x in values if x == x]
    return sum(kept) / len(kept) if kept else float("nan")
