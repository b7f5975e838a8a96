"""The report's RL section: the RL task's held-out scores (metrics.json "rl", eval/rl_eval.py),
the reward curve from logs/rl.jsonl, and a few rollouts from logs/rl_samples.jsonl."""

from __future__ import annotations

from typing import Any

from picoalign.io import read_jsonl_lenient
from picoalign.report.load import Run, dig
from picoalign.report.markdown import clip, code, fmt_ci, plain, table

PHRASES = {
    "en": {"none": "No RL stage in this run (`run.stages` with `rl`, or `run.method=sft+rl`; preset "
                   "`configs/rl.yaml`).",
           "intro": "Held-out prompts of the RL task ({task}, n = {n}), answered greedily by each model; "
                    "each reward's mean with its 95% bootstrap interval.",
           "paired": "Paired per-prompt differences (A − B, 95% interval):", "model": "Model",
           "tokens": "answer tokens", "finished": "ended by itself", "cost": "Cost: KL(π_RL ‖ π_SFT) per "
           "token on RL's answers = {kl}.", "curve": "Reward during training (every {k} steps):",
           "step": "Step", "samples": "Rollouts written during training (first and last):",
           "sampled": "Sampled as the RL stage sampled its rollouts (temperature {temperature}, top_p {top_p}, "
                      "top_k {top_k}), {n} answers per prompt, each reward averaged over a prompt's answers (n = "
                      "the prompts): what a user sampling the model gets. Greedy decoding of a small model "
                      "often loops, and a looped phrase is scored as many times as it repeats."},
    "zh": {"none": "本次运行没有 RL 阶段（在 `run.stages` 中加入 `rl`，或 `run.method=sft+rl`；预设 "
                   "`configs/rl.yaml`）。",
           "intro": "RL 任务的留出提示（{task}，n = {n}），各模型贪心作答；每个奖励的均值及 95% 自助法区间。",
           "paired": "逐提示配对差（A − B，95% 区间）：", "model": "模型", "tokens": "回答 token 数",
           "finished": "自行结束", "cost": "代价：RL 回答上每 token 的 KL(π_RL ‖ π_SFT) = {kl}。",
           "curve": "训练中的奖励（每 {k} 步）：", "step": "步", "samples": "训练中记录的采样（首条与末条）：",
           "sampled": "按 RL 阶段生成训练样本的方式采样（temperature {temperature}，top_p {top_p}，top_k {top_k}），"
                      "每个提示 {n} 个回答，每个奖励先在同一提示的回答上取平均（n = 提示数）。这是用户采样时得到的结果。"
                      "小模型贪心生成时常会循环重复，而重复的短语重复几次就被计分几次。"},
}


def rl_section(run: Run, t: dict, images: set[str]) -> str:
    from picoalign.report.strings import ZH

    p = PHRASES["zh" if t is ZH else "en"]
    section = dig(run.metrics, "rl")
    if not section:
        return p["none"]
    names = section["rewards"] + [k for k in ("spec_coverage",) if any(k in m for m in section["models"].values())]
    out = [f"**{plain(section['verdict'])}**", "", p["intro"].format(task=section["task"], n=section["n"]), ""]
    out += _tables(section, names, p)
    if sampled := section.get("sampled"):
        out += [p["sampled"].format(**sampled["decoding"]), "", f"**{plain(sampled['verdict'])}**", ""]
        out += _tables(sampled, names, p)
    if "kl_rl_to_sft" in section.get("cost", {}):
        out += [p["cost"].format(kl=section["cost"]["kl_rl_to_sft"]), ""]
    out += _curve(run, p) + _samples(run, p, t)
    return "\n".join(out)


def _tables(section: dict, names: list[str], p: dict) -> list[str]:
    """Each model's means with intervals, then the paired differences."""
    rows = [[m, *(fmt_ci(k, scores.get(k)) for k in names), fmt_ci("", scores.get("completion_tokens")),
             fmt_ci("", scores.get("finished"))] for m, scores in section["models"].items()]
    out = [table([p["model"], *names, p["tokens"], p["finished"]], rows), "", p["paired"], ""]
    rows = [[pair, *(_diff(c.get(k)) for k in names)] for pair, c in section["comparisons"].items()]
    return out + [table(["A vs B", *names], rows), ""]


def _diff(c: Any) -> str:
    if not c or c.get("mean_diff") is None:
        return "—"
    return f"{c['mean_diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"


def _curve(run: Run, p: dict) -> list[str]:
    rows = [r for r in run.logs.get("rl", []) if r.get("kind") == "train"]
    if not rows:
        return []
    k = max(1, len(rows) // 10)
    per_reward = sorted(k for k in rows[0] if k.startswith("rewards/") and k.endswith("/mean"))
    keys = [key for key in ("reward", *(per_reward if len(per_reward) > 1 else ()), "frac_reward_zero_std",
                            "completions/mean_length", "entropy", "kl") if key in rows[0]]
    picked = rows[::k] + ([rows[-1]] if (len(rows) - 1) % k else [])
    body = [[str(r["step"]), *(f"{r.get(key, 0):.3f}" for key in keys)] for r in picked]
    return [p["curve"].format(k=k), "", table([p["step"], *map(code, keys)], body), ""]


def _samples(run: Run, p: dict, t: dict) -> list[str]:
    rows = [r for r in read_jsonl_lenient(run.dir / "logs" / "rl_samples.jsonl") if isinstance(r, dict)]
    if not rows:
        return []
    out = [p["samples"], ""]
    for r in (rows[0], rows[-1]) if len(rows) > 1 else rows:
        out.append(f"- rollout {r.get('rollout')}: {plain(clip(r.get('prompt', ''), 200, t))}")
        for text, reward in zip(r.get("completions", []), r.get("reward", [])):
            out.append(f"  - ({reward}) {plain(clip(text, 160, t))}")
    return out
