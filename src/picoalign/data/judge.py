"""An LLM judge of two answers, asked in both orders so that position bias cannot decide.

    picoalign data --judge --answer-models deepseek-chat@deepseek,gpt-4o-mini@openai \\
        --judge-model gpt-4o@openai --out runs/x/data
    picoalign eval --run runs/x --judge-provider deepseek          # DPO vs SFT win rate

The judge returns JSON `{"winner": "A"|"B"|"tie", "reasoning": "...", "confidence": 1-10}`
(the fields of the original essay pipeline). For preference data each prompt is answered by two
of the answer models (taken in turn, so every model is paired with the next), the pair is judged
as (A, B) and as (B, A), and it is kept only when both verdicts name the same answer; its
confidence is the mean of the two. Rows carry `chosen_model`, `rejected_model`,
`judgment_reasoning` and `confidence`; `picoalign dpo --min-confidence 6` (the default) drops the
unsure ones. `win_rate` scores answers `a` against `b` for eval: per prompt the mean, over the two
orders, of 1 (a wins), 0.5 (tie) or 0 (b wins).
"""

from __future__ import annotations

from dataclasses import dataclass

from picoalign.config import JUDGE_CRITERIA
from picoalign.data.llm import LLMClient, LLMError
from picoalign.data.llm_requests import Job, Key, request_stories

DEFAULT_CRITERIA = JUDGE_CRITERIA
SYSTEM = "You are a careful, impartial judge of writing. You answer with JSON only."
ASK = """Compare two answers to the same prompt.

Criteria: {criteria}

Prompt:
{prompt}

Answer A:
{a}

Answer B:
{b}

Which answer is better by the criteria? Return JSON only:
{{"winner": "A" or "B" or "tie", "reasoning": "one or two sentences", "confidence": 1-10 (how sure you are)}}"""
VERDICT_TOKENS = 400


@dataclass(frozen=True)
class Verdict:
    winner: str  # "A", "B" or "tie"
    reasoning: str
    confidence: float


def _verdict(obj) -> Verdict:
    if not isinstance(obj, dict):
        raise ValueError("the verdict is not a JSON object")
    winner = str(obj.get("winner", "")).strip().strip('"').lower()
    winner = {"a": "A", "answer a": "A", "b": "B", "answer b": "B", "tie": "tie"}.get(winner)
    if winner is None:
        raise ValueError(f"winner must be A, B or tie, got {obj.get('winner')!r}")
    try:
        confidence = float(obj.get("confidence"))
    except (TypeError, ValueError):
        raise ValueError(f"confidence must be a number, got {obj.get('confidence')!r}") from None
    if not 1 <= confidence <= 10:
        raise ValueError(f"confidence must be 1-10, got {confidence}")
    return Verdict(winner, str(obj.get("reasoning") or "").strip(), confidence)


def judge(client: LLMClient, prompt: str, a: str, b: str, criteria: str = DEFAULT_CRITERIA) -> Verdict:
    """One verdict on (A, B) in this order."""
    ask = ASK.format(criteria=criteria, prompt=prompt, a=a, b=b)
    return client.chat_json([{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}],
                            VERDICT_TOKENS, _verdict)


def judge_both(client: LLMClient, prompt: str, x: str, y: str,
               criteria: str = DEFAULT_CRITERIA) -> tuple[str | None, Verdict, Verdict]:
    """("x" | "y" | None, first verdict, second): the answer both orders prefer, else None."""
    first = judge(client, prompt, x, y, criteria)  # x is A
    second = judge(client, prompt, y, x, criteria)  # y is A
    pick1 = {"A": "x", "B": "y"}.get(first.winner)
    pick2 = {"A": "y", "B": "x"}.get(second.winner)
    return (pick1 if pick1 is not None and pick1 == pick2 else None), first, second


def judged_row(row: dict, answers: dict[str, str], names: tuple[str, str], client: LLMClient,
               criteria: str) -> dict | None:
    """The preference row of two answers (by model name), or None when the orders disagree."""
    (name_x, name_y), x, y = names, answers[names[0]], answers[names[1]]
    pick, first, second = judge_both(client, row["prompt"], x, y, criteria)
    if pick is None:
        return None
    chosen, rejected = (name_x, name_y) if pick == "x" else (name_y, name_x)
    return {**row, "chosen": answers[chosen], "rejected": answers[rejected], "chosen_model": chosen,
            "rejected_model": rejected, "judgment_reasoning": first.reasoning,
            "confidence": round((first.confidence + second.confidence) / 2, 2)}


def judge_jobs(answerers: list[LLMClient], client: LLMClient, files: dict[str, list[dict]],
               criteria: str, skip: set[Key]) -> list[Job]:
    """One job per preference row: two models answer (in turn), the judge decides in both orders."""
    jobs, turn = [], 0
    for name, rows in files.items():
        if not name.startswith("dpo_"):
            continue
        for row in rows:
            a, b = answerers[turn % len(answerers)], answerers[(turn + 1) % len(answerers)]
            turn += 1
            if (name, row["id"]) not in skip:
                jobs.append(_judge_job(name, row, (a, b), client, criteria))
    return jobs


def _judge_job(name: str, row: dict, pair: tuple[LLMClient, LLMClient], client: LLMClient, criteria: str) -> Job:
    def run():
        x, y = (request_stories(c, [row["prompt"]])[1] for c in pair)
        if x.strip() == y.strip():
            raise LLMError("both models gave the same answer")
        names = _labels(*pair)
        return {(name, row["id"]): judged_row(row, dict(zip(names, (x, y))), names, client, criteria)}
    return Job([(name, row["id"])], run)


def _labels(a: LLMClient, b: LLMClient) -> tuple[str, str]:
    """The model names as the rows record them (with the base URL when two share a name)."""
    if a.endpoint.model != b.endpoint.model:
        return a.endpoint.model, b.endpoint.model
    return f"{a.endpoint.model}@{a.endpoint.base_url}", f"{b.endpoint.model}@{b.endpoint.base_url}"


def win_rate(client: LLMClient, prompts: list[str], a: list[str], b: list[str],
             criteria: str = DEFAULT_CRITERIA) -> dict:
    """How often answers `a` beat answers `b` by the judge, both orders per prompt."""
    scores, agree, errors = [], 0, []
    wins = {"A": 1.0, "B": 0.0, "tie": 0.5}
    for prompt, x, y in zip(prompts, a, b):
        try:
            pick, first, second = judge_both(client, prompt, x, y, criteria)
        except LLMError as e:
            errors.append(str(e))
            continue
        scores.append((wins[first.winner] + 1.0 - wins[second.winner]) / 2)
        agree += pick is not None
    return {"win_rate": round(sum(scores) / len(scores), 4) if scores else None, "prompts": len(scores),
            "agreement": round(agree / len(scores), 4) if scores else None, "errors": len(errors),
            "judge_model": str(client.endpoint)}
