"""Reward functions (rewards/) on written-out examples, their combination, and bad input."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch
from llm_server import Reply, ScriptedLLM

from picoalign.config import ConfigError, RLConfig
from picoalign.data.arith import arith_rows
from picoalign.rewards import RewardError, RewardSet, load_reward, parse_names
from picoalign.rewards.builtin import arith, final_number


def test_arith_reward_reads_the_last_number():
    prompts = ["Ana has 3 apples. Ana gets 4 more. How many apples does Ana have now? Answer with the number."] * 5
    completions = ["3 + 4 = 7", "Ana has 7 apples.", "7 apples, not 8", "The answer is 1,204.", "seven"]
    assert arith(prompts, completions, answer=[7, 7, 7, 1204, 7]) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert arith(prompts[:1], ["7"]) == [None]  # a prompt without an answer is not scored
    assert final_number("It is -3.") == -3.0 and final_number("no digits") is None


def test_arith_rows_are_seeded_and_test_never_repeats_train():
    train, test = arith_rows(500, seed=5), arith_rows(200, seed=5, split="test")
    assert arith_rows(500, seed=5) == train and len({r["prompt"] for r in train}) == 500
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for r in train[:50]:
        numbers = [int(x) for x in __import__("re").findall(r"\d+", r["prompt"])]
        a, b = numbers[0], numbers[1]
        expected = {"add": a + b, "take": a - b, "groups": a * b}.get(r["template"])
        if expected is not None:
            assert r["answer"] == expected, r
    assert {r["template"] for r in train} == {"add", "take", "groups", "two_step"}


def test_random_control_ignores_the_answer():
    fn = load_reward("random", {"seed": 1})
    again = load_reward("random", {"seed": 1})
    a = fn(["p"] * 4, ["7", "8", "", "x"])
    assert a == again(["q"] * 4, ["completely", "different", "answers", "!"])  # same stream, whatever the text
    assert all(0 <= v < 1 for v in a) and len(set(a)) == 4


def test_spec_reward_on_a_written_story(data_dir):
    import json

    from picoalign.eval.axes import spec_coverage

    row = json.loads((data_dir / "sft_train.jsonl").read_text().splitlines()[0])
    spec = load_reward("spec", {"max_completion_length": 64})
    good, bad = row["response"], "It was a nice day.\n\nNothing happened."
    scores = spec([row["prompt"]] * 3, [good, bad, good], finish_reason=["stop", "stop", "length"])
    # the dataset's own story: every field (coverage 1) x (1 + 3 paragraphs ok + ended) / 3 = 1; the
    # other uses no field: 2 paragraphs and an ending earn nothing, 0 x (1 + 1 + 1) / 3
    assert scores[0] == 1.0 and scores[1] == 0.0
    assert scores[2] == pytest.approx(2 / 3, abs=1e-6)  # cut at the cap: 1 x (1 + 1 + 0) / 3
    part = row["response"].split(". ")[0]  # the first sentence: some of the fields, one paragraph
    cov = spec_coverage(row["prompt"], part)  # 0.6 here: setting, protagonist, object
    assert 0 < cov < 1 and spec([row["prompt"]], [part], finish_reason=["stop"]) == [pytest.approx(cov * 2 / 3)]
    assert spec(["What is 2 + 2?"], ["4"], finish_reason=["stop"]) == [None]  # not a story prompt


def test_darkness_is_evals_judge():
    from picoalign.eval.judges import vader_darkness

    texts = ["The dead whispered in the dark and she screamed in terror.", "A happy, lovely, sunny picnic."]
    fn = load_reward("darkness", {})
    assert fn(["p", "p"], texts) == vader_darkness(texts)
    assert fn(["p", "p"], texts)[0] > 0 > fn(["p", "p"], texts)[1]


def test_fluency_prefers_text_to_noise_and_penalises_loops(chat_model):
    fn = load_reward("fluency", {"fluency_model": str(chat_model), "device": "cpu"})
    story = "The keeper heard the bell at midnight."
    loop = " ".join(["the bell the bell"] * 6)
    a, b = fn(["p", "p"], [story, loop])
    from picoalign.eval.axes import repetition

    assert repetition(loop) > 0.5 and b < a - 0.5  # the loop pays its repetition share


def test_weights_combine_and_none_is_nan():
    rs = RewardSet(["a", "b"], [1.0, 0.5], [lambda prompts, completions, **k: [1.0, None],
                                            lambda prompts, completions, **k: [2.0, None]])
    per_func = rs(["p", "p"], ["x", "y"])
    assert per_func[0].tolist() == [1.0, 2.0] and bool(torch.isnan(per_func[1]).all())
    total = rs.total(per_func)
    assert total[0].item() == 2.0 and math.isnan(total[1].item())  # every function declined: NaN, advantage 0


def test_overlong_is_dapos_soft_punishment_and_agrees_with_trl():
    from trl.rewards import get_soft_overlong_punishment

    from picoalign.generation.answers import Generation
    from picoalign.rewards.builtin import soft_overlong_punishment
    from picoalign.train.rl import score

    # cap 100, cache 20: free up to 80 tokens, then (80 - n) / 20, -1 at the cap and past it
    assert soft_overlong_punishment([10, 80, 81, 90, 100, 101], 100, 20) == [0.0, 0.0, -0.05, -0.5, -1.0, -1.0]
    ids = [[7] * n for n in range(0, 130, 3)]
    assert soft_overlong_punishment(map(len, ids), 100, 20) == pytest.approx(get_soft_overlong_punishment(100, 20)(ids))
    # the built-in reads the stage's cap and cache (0: a quarter of the cap) from the token ids
    # score() passes as TRL does; TRL's own function runs beside it unchanged
    rows = [{"prompt": "p"}]
    rs = RewardSet(["overlong", "trl"], [1.0, 1.0], [load_reward("overlong", {"max_completion_length": 8}),
                                                    get_soft_overlong_punishment(8, 4)])
    gens = [Generation(t, 1, n, why, [1] * n) for t, n, why in (("a", 6, "stop"), ("b", 7, "stop"), ("c", 8, "length"))]
    per_func = score(rs, rows, gens, 3)
    assert per_func.tolist() == [[0.0, -0.5], [-0.5, -0.75], [-1.0, -1.0]]
    with pytest.raises(RewardError, match="reward 'overlong' raised ValueError: overlong needs completion_ids"):
        RewardSet.build(["overlong"], [1.0], {"max_completion_length": 8})(["p"], ["a"])


def test_llm_judge_scores_through_the_endpoint(monkeypatch):
    def responder(request, n):
        text = request["messages"][-1]["content"]
        return Reply(content='{"score": 10}' if "midnight" in text else '{"score": 1}')

    with ScriptedLLM(responder) as server:
        fn = load_reward("llm-judge", {"llm_provider": f"@{server.url}", "llm_max_calls": 2, "llm_max_retries": 0})
        scores = fn(["p"] * 3, ["the bell at midnight", "a picnic", "a third one, over budget"])
    assert scores == [1.0, 0.0, None]  # (10 - 1) / 9, (1 - 1) / 9, and none past llm_max_calls


def test_bad_reward_settings_name_the_setting(tmp_path, monkeypatch):
    with pytest.raises(RewardError, match="unknown reward 'acc'"):
        parse_names("arith,acc", "")
    with pytest.raises(ConfigError, match="reward_weights: 1 weights"):
        RLConfig(rewards="arith,random", reward_weights="1", max_steps=1)
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        RLConfig(num_generations=1, max_steps=1)
    with pytest.raises(ConfigError, match="method must be one of"):
        RLConfig(method="ppo", max_steps=1)
    with pytest.raises(ConfigError, match="multi_objective_aggregation must be one of"):
        RLConfig(multi_objective_aggregation="gdpo", max_steps=1)
    with pytest.raises(ConfigError, match="multi_objective_aggregation=normalize_then_sum is GRPO's; method=rloo"):
        RLConfig(method="rloo", multi_objective_aggregation="normalize_then_sum", max_steps=1)
    with pytest.raises(ConfigError, match=r"soft_punish_cache must be in \[0, max_completion_length=64\], got 65"):
        RLConfig(rewards="arith,overlong", soft_punish_cache=65, max_completion_length=64, max_steps=1)
    with pytest.raises(ConfigError, match="soft_punish_cache must be in"):
        RLConfig(soft_punish_cache=-1, max_steps=1)
    with pytest.raises(RewardError, match="module 'no_such_module_xyz' does not import"):
        load_reward("no_such_module_xyz:score")
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def short(prompts, completions, **columns):
            return [1.0] * (len(completions) - 1)
        def boom(prompts, completions, **columns):
            raise KeyError("answer")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    with pytest.raises(RewardError, match="has no 'nope'"):
        load_reward("my_rewards:nope")
    with pytest.raises(RewardError, match=r"reward 'my_rewards:short' returned 1 values for 2 completions"):
        RewardSet.build(["my_rewards:short"], [1.0])(["p", "p"], ["a", "b"])
    with pytest.raises(RewardError, match=r"reward 'my_rewards:boom' raised KeyError"):
        RewardSet.build(["my_rewards:boom"], [1.0])(["p"], ["a"])


def test_arith_sft_rows_teach_the_answer_format_and_stay_out_of_the_test_split():
    from picoalign.data.arith import arith_sft_rows

    rows = arith_sft_rows(200, seed=3)
    test = {r["prompt"] for r in arith_rows(200, seed=3, split="test")}
    assert not {r["prompt"] for r in rows} & test
    by_prompt = {r["prompt"]: r for r in arith_rows(4096, seed=3, split="sft")}
    for r in rows:
        right = by_prompt[r["prompt"]]["answer"]
        assert arith([r["prompt"]], [r["response"]], answer=[right]) == [1.0]  # the worked answer scores 1
        assert r["response"].endswith(f"The answer is {right}.")


@pytest.mark.slow
def test_fluency_on_the_builtin_model_ranks_a_title_loop_below_a_story():
    """The hack two GRPO story runs learned at repetition weight 1: the title repeated to the
    cap. Under SmolLM2 its mean log-prob is near 0 (about -0.3: repeated text is easy to predict),
    so weight 1 scored it above a real story; the default (4) puts it below."""
    import random

    from picoalign.data.stories import random_spec, write_story

    spec = random_spec(random.Random(0))
    story = write_story(spec, random.Random(1))
    loop = "\n\n".join([spec.title] * 60)
    ctx = {"fluency_model": "builtin:smollm2-135m-instruct", "device": "cpu", "max_completion_length": 256}
    fn = load_reward("fluency", ctx)
    old = load_reward("fluency", ctx | {"fluency_repetition_weight": 1.0})
    real, looped = fn(["p", "p"], [story, loop])
    assert looped < real  # about -4.2 against -3.8 (the template story, rep-4 0.09)
    real_old, looped_old = old(["p", "p"], [story, loop])
    assert looped_old > real_old  # what GRPO found
