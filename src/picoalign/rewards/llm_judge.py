"""`llm-judge`: a score from an OpenAI-compatible endpoint, with `picoalign data`'s LLM rules.

The endpoint, budget and retry settings are the data stage's (`llm_provider`, `llm_model`,
`llm_base_url`, `llm_max_calls`, `llm_max_total_tokens`, `llm_max_retries`, `llm_timeout`):
the key stays in the environment (data/llm.py reads it into the client only; it is never
logged or written). Each completion is one request asking for `{"score": 1..10}` against
`judge_criteria`; the reward is (score − 1) / 9 in [0, 1]. A request that fails for good, or
any after the budget is spent, gives None (that completion is not scored: advantage 0), and
the first such failure is printed once (redacted).
"""

from __future__ import annotations

from picoalign.config import JUDGE_CRITERIA

ASK = ("You grade one answer to a prompt. Criteria: {criteria}\n\nPrompt:\n{prompt}\n\nAnswer:\n{answer}\n\n"
       'Reply with JSON only: {{"score": N}} where N is an integer from 1 (worst) to 10 (best).')


def _score(obj) -> float:
    score = float(obj["score"])
    if not 1 <= score <= 10:
        raise ValueError(f"score {score} is outside 1..10")
    return score


def make_llm_judge(ctx: dict):
    from picoalign.data.llm import (
        BudgetExhausted,
        Limits,
        LLMClient,
        LLMError,
        Meter,
        endpoint,
        parse_endpoint,
    )

    provider = ctx.get("llm_provider") or "auto"
    ep = (parse_endpoint(provider) if "@" in provider
          else endpoint(provider, ctx.get("llm_model", ""), ctx.get("llm_base_url", "")))
    meter = Meter(max_calls=int(ctx.get("llm_max_calls", 0)), max_total_tokens=int(ctx.get("llm_max_total_tokens", 0)))
    limits = Limits(temperature=0.0, max_output_tokens=20, max_retries=int(ctx.get("llm_max_retries", 5)),
                    timeout=float(ctx.get("llm_timeout", 60.0)), json_mode=bool(ctx.get("llm_json_mode", True)))
    client = LLMClient(ep, limits, meter)
    criteria = ctx.get("judge_criteria") or JUDGE_CRITERIA
    told = []

    def llm_judge(prompts, completions, **columns) -> list[float | None]:
        out: list[float | None] = []
        for prompt, answer in zip(prompts, completions):
            message = [{"role": "user", "content": ASK.format(criteria=criteria, prompt=prompt, answer=answer)}]
            try:
                out.append((client.chat_json(message, max_tokens=20, check=_score) - 1) / 9)
            except (LLMError, BudgetExhausted) as e:
                if not told:
                    told.append(str(e))
                    print(f"rl: llm-judge: {e}; unscored completions get no advantage")
                out.append(None)
        return out

    llm_judge.meter = meter  # the stage logs its usage
    return llm_judge
