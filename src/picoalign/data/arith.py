"""A verifiable task for RL: integer arithmetic word problems whose answer is one number.

    from picoalign.data.arith import arith_rows
    rows = arith_rows(64, seed=1, split="train")   # [{"id", "prompt", "answer", "template", "size", "solution"}]
    sft = arith_sft_rows(32, seed=1)               # [{"id", "prompt", "response"}]: worked examples

Four templates (add, take away, groups of, a two-step add-then-take) at two sizes (`small`:
numbers below 10, `medium`: below 50, products below 100), drawn with a seeded RNG. The
`test` split draws from its own seed stream and drops any prompt the `train` split of the same
seed holds (its first 4,096), nor one of the `sft` split (worked examples in the answer format
"a + b = c. The answer is c.", which `picoalign data --n_arith_sft N` adds to the SFT rows), so
held-out prompts are never trained on. The reward (`rewards/builtin.py:arith`)
is 1 when the last number written in the answer equals `answer`.
"""

from __future__ import annotations

import random

NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena",
         "Mira", "Nico", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq")
ITEMS = ("apples", "books", "coins", "pencils", "stickers", "marbles", "cookies", "shells", "stamps", "cards")
ASK = "Answer with the number."
SIZES = {"small": 9, "medium": 49}
TRAIN_POOL = 4096  # the test split avoids the first this many train prompts (a run trains on fewer)


# Each template: (question with {n} name, {i} item, {a}, {b}), a, b, answer, worked solution.
def _add(rng, top):
    a, b = rng.randint(2, top), rng.randint(2, top)
    return ("{n} has {a} {i}. {n} gets {b} more. How many {i} does {n} have now?", a, b, a + b,
            f"{a} + {b} = {a + b}.")


def _take(rng, top):
    a = rng.randint(3, top + 1)
    b = rng.randint(1, a - 1)
    return ("{n} had {a} {i} and gave {b} of them away. How many {i} does {n} have left?", a, b, a - b,
            f"{a} - {b} = {a - b}.")


def _groups(rng, top):
    a = rng.randint(2, min(top, 9))
    b = rng.randint(2, min(top, 99 // a))
    return ("There are {a} bags with {b} {i} in each bag. How many {i} are there in all?", a, b, a * b,
            f"{a} x {b} = {a * b}.")


def _two_step(rng, top):
    a, b = rng.randint(2, top), rng.randint(2, top)
    c = rng.randint(1, a + b - 1)
    text = "{n} has {a} {i}, finds {b} more, then loses " + str(c) + ". How many {i} does {n} have now?"
    return text, a, b, a + b - c, f"{a} + {b} = {a + b}, and {a + b} - {c} = {a + b - c}."


TEMPLATES = {"add": _add, "take": _take, "groups": _groups, "two_step": _two_step}


def arith_problem(rng: random.Random) -> dict:
    """One problem: {prompt, answer, template, size}."""
    template = rng.choice(sorted(TEMPLATES))
    size = rng.choice(sorted(SIZES))
    text, a, b, answer, work = TEMPLATES[template](rng, SIZES[size])
    prompt = text.format(n=rng.choice(NAMES), i=rng.choice(ITEMS), a=a, b=b) + " " + ASK
    return {"prompt": prompt, "answer": answer, "template": template, "size": size,
            "solution": f"{work} The answer is {answer}."}


def arith_rows(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` distinct problems of `split`: train (RL's prompts), sft (worked examples for SFT) or
    test (held out: never a train or sft prompt of the same seed)."""
    if split not in ("train", "sft", "test"):
        raise ValueError(f"arith split must be train, sft or test, got {split!r}")
    avoid = set()
    if split == "test":
        avoid = {r["prompt"] for s in ("train", "sft") for r in arith_rows(TRAIN_POOL, seed, s)}
    rng = random.Random(f"arith-{split}-{seed}")
    rows, seen = [], set(avoid)
    for _ in range(50 * n + 100):
        if len(rows) == n:
            break
        p = arith_problem(rng)
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            rows.append({"id": f"arith-{split}-{len(rows)}", **p})
    return rows


def arith_sft_rows(n: int, seed: int = 0) -> list[dict]:
    """SFT records whose answer works the problem out and ends with the number: the format that
    the RL stage then sharpens (SFT, then RL on the same task: nanochat's GSM8K recipe)."""
    return [{"id": r["id"], "prompt": r["prompt"], "response": r["solution"]} for r in arith_rows(n, seed, "sft")]
