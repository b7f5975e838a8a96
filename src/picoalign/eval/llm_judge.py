"""An outside LLM judge, pairwise, as the essay project in the original pipeline used GPT-4.

    picoalign eval --run runs/x --judge-provider deepseek             # or MODEL@http://host:port/v1

For each pair of models (SFT vs base, DPO vs SFT, RL vs SFT, where both were evaluated) and
each asked axis (darkness, spec, coherence), the judge reads the prompt and the two models'
first samples (greedy where greedy was run) and says which is better by that axis only, in both
orders (A, B) and (B, A), so the position of an answer cannot decide. Per prompt the first
model scores 1 (both orders pick it), 0.5 (one order each, or ties) or 0; the win rate is the
mean with a bootstrap interval (0.5 = even). The position-bias rate is the share of prompts
where both verdicts picked the same slot (A twice or B twice): the judge followed the position,
not the answer.

The client, retries, budgets (`llm_max_calls`, `llm_max_total_tokens`) and the record of
unusable replies are `picoalign data`'s (data/llm.py): a reply that does not parse is retried,
then counted with the first reasons; a spent budget stops the judging and says so. No key is
ever written: endpoints are recorded by model and base URL (userinfo stripped), errors redacted.
"""

from __future__ import annotations

from picoalign.data.judge import judge
from picoalign.data.llm import BudgetExhausted, LLMClient, LLMError
from picoalign.eval.stats import mean_ci

AXIS_CRITERIA = {
    "darkness": "Which story is darker: more eerie, unsettling and bleak in mood? Judge the mood only, not "
                "the quality of the writing or how well it follows the prompt.",
    "spec": "Which story follows the story specification in the prompt more fully: it uses the protagonist, "
            "the supporting character, the important object, the setting and the taboo rule, and keeps to "
            "the constraints (2-4 paragraphs)? Judge faithfulness to the specification only.",
    "coherence": "Which story is more coherent and fluent: grammatical, consistent in names, genders and "
                 "events, free of repeated sentences and invented words? Judge the writing only, not the mood.",
}
PAIRS = (("sft", "base"), ("dpo", "sft"), ("rl", "sft"))
WINS = {"A": 1.0, "B": 0.0, "tie": 0.5}
MAX_REASONS = 3


def first_samples(samples: list[dict], decoding: str) -> dict[tuple[str, str], dict]:
    """(model, prompt id) -> that model's first sample of the prompt under `decoding`."""
    out: dict = {}
    for s in samples:
        if s["decoding"] == decoding and s.get("sample", 0) == 0:
            out.setdefault((s["model"], s["id"]), s)
    return out


def judge_pair(client: LLMClient, prompts: list, a: list[str], b: list[str], criteria: str, seed: int = 0) -> dict:
    """Answers `a` against answers `b` on the same prompts, both orders each: win rate of `a` with
    its interval, position-bias rate, ties, and the replies that did not parse (with reasons)."""
    scores, same_slot, ties, failed, reasons = [], 0, 0, 0, []
    for prompt, x, y in zip(prompts, a, b):
        try:
            first = judge(client, prompt, x, y, criteria)  # x is A
            second = judge(client, prompt, y, x, criteria)  # y is A
        except LLMError as e:
            failed += 1
            if len(reasons) < MAX_REASONS:
                reasons.append(str(e)[:300])
            continue
        scores.append((WINS[first.winner] + 1.0 - WINS[second.winner]) / 2)
        same_slot += first.winner == second.winner != "tie"
        ties += "tie" in (first.winner, second.winner)
    ci = mean_ci(scores, seed)
    n = len(scores)
    return {"win_rate": ci["mean"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"], "n": n,
            "position_bias": round(same_slot / n, 4) if n else None, "with_tie": ties,
            "unparsed": failed, "first_reasons": reasons}


def judge_models(client: LLMClient, samples: list[dict], decoding: str, axes: list[str], max_prompts: int = 0,
                 seed: int = 0) -> dict:
    """Every model pair present, on every axis; stops (and says so) when a budget is spent."""
    firsts = first_samples(samples, decoding)
    models = {m for m, _ in firsts}
    out: dict = {"decoding": decoding, "pairs": {}}
    try:
        for a, b in PAIRS:
            if a not in models or b not in models:
                continue
            ids = sorted({i for m, i in firsts if m == a and (b, i) in firsts})
            ids = ids[:max_prompts] if max_prompts else ids
            rows_a, rows_b = [firsts[a, i] for i in ids], [firsts[b, i] for i in ids]
            for axis in axes:
                out["pairs"].setdefault(f"{a}_vs_{b}", {})[axis] = judge_pair(
                    client, [r["prompt"] for r in rows_a], [r["text"] for r in rows_a], [r["text"] for r in rows_b],
                    AXIS_CRITERIA[axis], seed)
                print(f"eval: LLM judge {a} vs {b} on {axis}: {_line(out['pairs'][f'{a}_vs_{b}'][axis])}")
    except BudgetExhausted as e:
        out["stopped"] = f"budget spent: {e}"
        print(f"eval: LLM judge stopped: {e}")
    return out


def _line(r: dict) -> str:
    if not r["n"]:
        return f"no verdicts ({r['unparsed']} unparsed)"
    return (f"win rate {r['win_rate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] over {r['n']} prompts, "
            f"position bias {r['position_bias']:.0%}, {r['unparsed']} unparsed")
