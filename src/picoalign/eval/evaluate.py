"""`picoalign eval`: compare base, SFT and DPO models on the held-out test splits.

    picoalign eval --run runs/demo
    picoalign eval --models base=builtin:smollm2-135m-instruct,mine=path/to/ckpt --data runs/demo/data

Per model: `sft_test_loss` (masked, response tokens only) and its perplexity; on the test
pairs, `dpo_test_pref_acc` and `dpo_test_margin` — for base/SFT whether log π(chosen) >
log π(rejected) (margin in nats), for DPO whether its implicit reward β·(log π − log π_ref)
is higher for chosen (margin β-scaled), the reference being the run's SFT model; greedy and
top-p generations for a few test prompts with two horror-style scores; and for DPO, the mean
per-token KL(π_DPO ‖ π_ref) on its own greedy samples: how far DPO moved from the reference.
With `--judge-provider` (a provider, MODEL@PROVIDER or MODEL@http://host:port/v1), an outside LLM
judges each model pair (SFT vs base, DPO vs SFT, RL vs SFT) in both orders on darkness, spec and
coherence (eval/llm_judge.py): `llm_judge` has the win rates with intervals, the position-bias
rate, the replies that did not parse, the budget and the usage.
With `--lm-eval [TASKS]`, lm-evaluation-harness scores every model too (eval/harness.py):
`metrics.json` gets `lm_eval`, the report a table.
Writes `metrics.json` (merged with what the run already recorded) and `samples.jsonl`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from time import perf_counter

import torch

from picoalign.config import EvalConfig, save_config, split_names
from picoalign.data.formats import iter_rows, parse_columns, read_preferences, read_sft
from picoalign.data.sources import data_split
from picoalign.eval.axis_judges import (
    AxisJudge,
    axis_accuracy,
    axis_pairs,
    fluency_judge,
    text_judges,
)
from picoalign.eval.judges import PRIMARY, VADER, Judge, judge_pairs, pair_accuracy
from picoalign.eval.kl import mean_token_kl  # noqa: F401  (re-exported: frontier and the tests use it here)
from picoalign.eval.stats import mean_ci, paired
from picoalign.eval.style import SCORE_NOTES, StyleClassifier, lexicon_score
from picoalign.generation.batched import Sampling, generate_full
from picoalign.io import read_json, write_json, write_jsonl
from picoalign.models.load import load_model, pick_device, pick_dtype, read_marker
from picoalign.train.attention import shared_prefix_why_not
from picoalign.train.batching import pair_batches, sft_batches
from picoalign.train.loop import autocast_for
from picoalign.train.scoring import mean_response_nll, pair_logps


def run_models(run: Path) -> dict[str, str]:
    """The models of a run folder, in order: base (what SFT started from, or ORPO where it replaced
    SFT + DPO), sft, dpo."""
    models = {}
    first = "sft" if (run / "checkpoints" / "sft").exists() else "dpo"  # run.method=orpo: no sft
    base = read_marker(run / "checkpoints" / first).get("base_model")
    if base:
        models["base"] = base
    for stage in ("sft", "dpo", "rl"):
        if read_marker(run / "checkpoints" / stage).get("complete"):
            models[stage] = str(run / "checkpoints" / stage)
    return models


def _dpo_beta(path: str) -> float:
    cfg = Path(path) / "config.yaml"
    if cfg.exists():
        import yaml

        return float((yaml.safe_load(cfg.read_text()) or {}).get("beta", 0.1))
    return 0.1


def _read_pairs(data: Path, name: str, limit: int) -> list[dict]:
    path = data_split(data, name, main=False)
    pairs = read_preferences(path, allow_empty=True) if path else []
    if path and not pairs:
        print(f"eval: {name} has no rows: skipped")
    return pairs[:limit] if limit else pairs


TEST_FILES = ("sft_test.jsonl", "dpo_test.jsonl", "dpo_test_hard.jsonl")


def test_rows(data, cfg: EvalConfig) -> tuple[list[dict], dict[str, list[dict]]]:
    """(SFT test rows, {"test": pairs, "test_hard": pairs}) of a data folder; when `data` is one
    source (a file, a parquet or saved folder, hf:...), its rows are the SFT test rows, or the
    test pairs when its first row has chosen and rejected."""
    if data_split(data, "sft_test.jsonl", main=True) != data:
        sft_path = data_split(data, "sft_test.jsonl", main=False)
        sft_rows = read_sft(sft_path, allow_empty=True) if sft_path else []
        if sft_path and not sft_rows:
            print("eval: sft_test.jsonl has no rows: skipped")
        # the template test pairs, and the held-out ones made by a different generator (data/stories_heldout.py)
        return sft_rows, {"test": _read_pairs(data, "dpo_test.jsonl", cfg.max_pairs),
                          "test_hard": _read_pairs(data, "dpo_test_hard.jsonl", cfg.max_pairs)}
    columns = parse_columns(cfg.columns)
    first = next(iter_rows(data, columns), (None, {}))[1]
    if {"chosen", "rejected"} <= first.keys():
        pairs = read_preferences(data, columns=columns)
        return [], {"test": pairs[: cfg.max_pairs] if cfg.max_pairs else pairs, "test_hard": []}
    return read_sft(data, columns=columns), {"test": [], "test_hard": []}


COMPARISONS = (("sft", "base"), ("dpo", "sft"), ("dpo", "base"), ("rl", "sft"))


class Evaluator:
    def __init__(self, cfg: EvalConfig, data: Path, n_models: int = 1) -> None:
        self.cfg = cfg
        self.n_models = n_models  # the models evaluated: the pair budget is shared by them all
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        sft_rows, self.splits = test_rows(data, cfg)
        self.sft_rows = sft_rows[: cfg.max_sft_examples] if cfg.max_sft_examples else sft_rows
        source = sft_rows or self.splits["test"]
        self.prompts = [r["prompt"] for r in source[: cfg.n_samples]]
        self.prompt_ids = [r["id"] for r in source[: cfg.n_samples]]
        wanted = split_names(cfg.judges)
        self.darkness = [VADER, Judge("horror_lexicon", lambda texts: [lexicon_score(t) for t in texts],
                                      SCORE_NOTES["horror_lexicon"])]
        self.style = None
        train_pairs = _read_pairs(data, "dpo_train.jsonl", 0)
        if train_pairs and self.splits["test"] and "horror_classifier" in wanted:
            self.style = StyleClassifier(cfg.seed).fit(train_pairs)
            self.style.pair_accuracy(self.splits["test"])
            self.darkness.append(Judge("horror_classifier", self.style.score, SCORE_NOTES["horror_classifier"]))
        self.darkness = [j for j in self.darkness if j.name in wanted]
        by_name = {j.name: AxisJudge(j.name, lambda rows, f=j.score: f([r["text"] for r in rows]), j.about)
                   for j in self.darkness} | text_judges()
        # fluency needs its scoring model, loaded once every model has been sampled (add_fluency)
        self.judges = [by_name[n] for n in wanted if n in by_name]
        self.wants_fluency = "fluency" in wanted
        self.fluency: dict = {}
        self.cap = cfg.max_new_tokens
        self.cap_source = "max_new_tokens setting"
        self.pair_limit: int | None = None  # pairs per split under pair_seconds, once timed
        self.pair_budget: dict = {}  # what the timing found (metrics.json's run.pair_budget)

    @property
    def names(self) -> list[str]:
        """Every judge scored, in the order of the `judges` setting."""
        have = {j.name for j in self.judges} | ({"fluency"} if self.fluency else set())
        return [n for n in split_names(self.cfg.judges) if n in have]

    def judge_facts(self) -> dict:
        """What each judge measures and how often it ranks the hand-written held-out pairs right:
        the darkness judges on samples/judge_pairs.jsonl, the others on samples/axis_pairs.jsonl."""
        pairs, axis = judge_pairs(), axis_pairs()
        facts = {j.name: {"about": j.about, "heldout_pairs": pair_accuracy(j.score, pairs)} for j in self.darkness}
        for j in self.judges:
            if j.name not in facts:
                facts[j.name] = {"about": j.about, "better": "higher" if j.better > 0 else "lower",
                                 "heldout_pairs": axis_accuracy(j, axis)}
        if self.style is not None:
            facts["horror_classifier"]["template_test_pairs"] = {"accuracy": self.style.test_accuracy,
                                                                 "n": len(self.splits["test"])}
        if self.fluency:
            facts["fluency"] = {"about": self.fluency["about"], "better": "higher", "model": self.fluency["model"],
                                "heldout_pairs": self.fluency["heldout_pairs"]}
        if PRIMARY in facts:
            facts[PRIMARY]["primary"] = True
        return facts

    def set_cap(self, tokenizer, data: Path) -> None:
        """The samples' length cap: the setting, or (0) the longest SFT training answer + 10%."""
        if self.cfg.max_new_tokens:
            return
        longest = longest_answer_tokens(tokenizer, data)
        self.cap = max(32, math.ceil(longest * 1.1)) if longest else 256
        self.cap_source = (f"the longest SFT training answer ({longest} tokens) + 10%" if longest
                           else "no SFT training answers: 256")

    @torch.no_grad()
    def score_model(self, name: str, model, tokenizer, reference_logps=None, beta: float = 0.1):
        """Metrics and samples of one model; returns (metrics, samples, {split: (chosen, rejected) logps})."""
        m: dict = {"intervals": {}}
        logps: dict = {}
        with autocast_for(self.device, self.dtype):
            if self.sft_rows:
                loss = mean_response_nll(model, sft_batches(tokenizer, self.sft_rows, self.cfg), self.device)
                m["sft_test_loss"], m["sft_test_ppl"] = round(loss, 4), round(math.exp(min(loss, 50)), 3)
            for split, pairs in self.splits.items():
                if pairs:
                    logps[split] = self._preferences(m, split, model, tokenizer, pairs,
                                                     (reference_logps or {}).get(split), beta)
        samples = self.generate_samples(name, model, tokenizer)
        return m, samples, logps

    def summarise(self, m: dict, samples: list[dict]) -> None:
        """Every judge's mean and interval over one model's samples: `judges` (and the flat keys)
        for the first decoding, `by_decoding` for each; how many samples hit the length cap."""
        for decoding in self.decodings:
            rows = [s for s in samples if s["decoding"] == decoding]
            stats = {j: mean_ci(_values(rows, j), self.cfg.seed) for j in self.names}
            stats["answer_words"] = mean_ci([s["words"] for s in rows], self.cfg.seed)
            stats["answer_tokens"] = mean_ci([s["tokens"] for s in rows], self.cfg.seed)
            m.setdefault("by_decoding", {})[decoding] = stats
            m.setdefault("hit_cap", {})[decoding] = {"n": sum(s["finish_reason"] == "length" for s in rows),
                                                     "of": len(rows)}
        first = m.get("by_decoding", {}).get(self.decodings[0], {})
        m["judges"] = {j: first[j] for j in self.names if j in first}
        for j, ci in m["judges"].items():
            m[j] = ci["mean"]
        if "answer_words" in first:
            m["intervals"]["answer_words"] = first["answer_words"]
            m["answer_words"] = first["answer_words"]["mean"]
        m["n_samples"] = sum(s["decoding"] == self.decodings[0] for s in samples)

    def _preferences(self, m: dict, split: str, model, tokenizer, pairs, reference, beta: float):
        """Preference accuracy and margin on one split, in one unit for every model: log pi(chosen) -
        log pi(rejected) in nats (and per answer token); for DPO also its implicit reward margin
        beta * (that - the reference's), which is a different quantity and gets its own keys."""
        share = not shared_prefix_why_not(model, self.cfg.max_length)  # Gemma 3's window, say
        batches, (chosen, rejected) = self._pair_logps(model, tokenizer, pairs, share)
        counts = torch.cat([b.token_counts() for b in batches]).float()
        diff = (chosen - rejected).tolist()
        per_token = (chosen / counts[0::2] - rejected / counts[1::2]).tolist()
        key = "dpo_test" if split == "test" else "dpo_hard"
        seed = self.cfg.seed
        m["intervals"][f"{key}_pref_acc"] = mean_ci([float(d > 0) for d in diff], seed)
        m["intervals"][f"{key}_margin"] = mean_ci(diff, seed)
        m["intervals"][f"{key}_margin_per_token"] = mean_ci(per_token, seed)
        if reference is not None:
            reward = (beta * ((chosen - rejected) - (reference[0] - reference[1]))).tolist()
            m["intervals"][f"{key}_reward_acc"] = mean_ci([float(r > 0) for r in reward], seed)
            m["intervals"][f"{key}_reward_margin"] = mean_ci(reward, seed)
        for name, ci in m["intervals"].items():
            if name.startswith(key + "_"):
                m[name] = ci["mean"]
        return chosen, rejected

    def _pair_logps(self, model, tokenizer, pairs: list[dict], share: bool):
        """(batches, (chosen, rejected) summed log-probs) of `pairs`. Under a `pair_seconds` budget
        the first call times its first batch and fixes how many pairs each split scores, for every
        model alike (the comparisons stay paired); the splits are cut to that from then on."""
        if self.pair_limit is not None or not self.cfg.pair_seconds:
            batches = pair_batches(tokenizer, pairs[: self.pair_limit], self.cfg, share, sort=False)
            return batches, pair_logps(model, batches, self.device)
        size = self.cfg.batch_size
        first = pair_batches(tokenizer, pairs[:size], self.cfg, share, sort=False)
        start = perf_counter()
        logps = [pair_logps(model, first, self.device)]
        per_pair = (perf_counter() - start) / max(len(logps[0][0]), 1)
        lengths = [len(p) for p in self.splits.values() if p]
        self.pair_limit = pairs_within(self.cfg.pair_seconds, per_pair, lengths, self.n_models, size)
        self.pair_budget = {"seconds": self.cfg.pair_seconds, "per_pair_seconds": round(per_pair, 3),
                            "all_pairs_seconds": round(per_pair * sum(lengths) * self.n_models, 1),
                            "pairs_per_split": self.pair_limit, "cut": self.pair_limit < max(lengths)}
        if self.pair_budget["cut"]:
            print(f"eval: scoring the first {self.pair_limit} pairs of each split ({', '.join(map(str, lengths))} "
                  f"there): at {per_pair:.2f} s a pair, all of them for {self.n_models} models would take "
                  f"{self.pair_budget['all_pairs_seconds']:.0f} s, over pair_seconds={self.cfg.pair_seconds:g}")
        self.splits = {k: v[: self.pair_limit] for k, v in self.splits.items()}
        rest = pair_batches(tokenizer, pairs[size: self.pair_limit], self.cfg, share, sort=False)
        if rest:
            logps.append(pair_logps(model, rest, self.device))
        return first + rest, (torch.cat([c for c, _ in logps]), torch.cat([r for _, r in logps]))

    def empty(self) -> bool:
        """Nothing to score and no prompt to generate from: loading a model would be for nothing."""
        return not (self.sft_rows or any(self.splits.values()) or self.prompts)

    @property
    def decodings(self) -> list[str]:
        return [d.strip() for d in self.cfg.decodings.split(",") if d.strip()]

    def sampling(self, decoding: str) -> tuple[Sampling, int]:
        """How `decoding` picks tokens, and how many answers per prompt it writes."""
        greedy = decoding == "greedy"
        return Sampling(self.cap, greedy, self.cfg.temperature, self.cfg.top_p, 0, self.cfg.seed, (),
                        self.cfg.repetition_penalty), 1 if greedy else self.cfg.n_sampled

    def decoding_facts(self) -> dict:
        """The decodings as metrics.json names them (the report prints this)."""
        out = {"max_new_tokens": self.cap, "cap": self.cap_source, "repetition_penalty": self.cfg.repetition_penalty,
               "prompts": len(self.prompts), "order": self.decodings}
        for decoding in self.decodings:
            sampling, n = self.sampling(decoding)
            out[decoding] = ({"greedy": True, "n": 1} if sampling.greedy else
                             {"temperature": sampling.temperature, "top_p": sampling.top_p, "n": n})
        return out

    def generate_samples(self, name: str, model, tokenizer) -> list[dict]:
        rows = []
        for decoding in self.decodings if self.prompts else ():  # n_samples=0: pair metrics only
            sampling, n = self.sampling(decoding)
            outs = generate_full(model, tokenizer, self.prompts, sampling, self.cfg.generate_batch_size, n=n)
            for k, g in enumerate(outs):
                i = k // n
                text = g.text.strip()
                rows.append({"id": self.prompt_ids[i], "prompt": self.prompts[i], "model": name, "decoding": decoding,
                             "sample": k % n, "text": text, "words": len(text.split()),
                             "tokens": g.completion_tokens, "finish_reason": g.finish_reason})
        self.score(rows, self.judges)
        return rows

    def score(self, rows: list[dict], judges: list[AxisJudge]) -> None:
        """Each judge's score written into each row (None where it does not apply)."""
        for judge in judges:
            for row, v in zip(rows, judge.score(rows)):
                row[judge.name] = None if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 4)

    def add_fluency(self, samples: list[dict], models: dict[str, str]) -> None:
        """Load the fluency model once, after every model is sampled, and score all samples."""
        if not self.wants_fluency or not samples:
            return
        spec, label = fluency_model_spec(self.cfg.fluency_model, models)
        print(f"eval: fluency scored by {label}")
        model, tokenizer = load_model(spec, self.device)
        model.to(self.dtype).eval()
        judge = fluency_judge(model, tokenizer, label, self.cfg.fluency_max_tokens, self.cfg.batch_size)
        with autocast_for(self.device, self.dtype):
            self.score(samples, [judge])
            accuracy = axis_accuracy(judge, axis_pairs())
        self.fluency = {"model": label, "about": judge.about, "heldout_pairs": accuracy}
        del model, judge


def pairs_within(budget: float, per_pair: float, lengths: list[int], n_models: int, floor: int) -> int:
    """The most pairs per split (a split holds `lengths[i]`) that `n_models` models score within
    `budget` seconds at `per_pair` seconds a pair; never fewer than `floor`, the batch that timed it."""
    def cost(n: int) -> float:
        return per_pair * n_models * sum(min(n, length) for length in lengths)
    n = max(lengths)
    while n > floor and cost(n) > budget:
        n -= 1
    return n


def _values(rows: list[dict], judge: str) -> list[float]:
    return [r[judge] for r in rows if r.get(judge) is not None]


def compare_models(samples: list[dict], judges: list[str], decoding: str, seed: int) -> dict:
    """Paired per-prompt comparisons (A vs B on the same prompts) for every judge: SFT vs base,
    DPO vs SFT and DPO vs base, where both models were evaluated. With several samples per prompt
    (top_p, n > 1) a prompt's score is the mean of its samples; a prompt a judge does not score
    (None) is left out of that judge's comparison."""
    by_model: dict[str, dict] = {}
    for s in samples:
        if s["decoding"] == decoding:
            by_model.setdefault(s["model"], {}).setdefault(s["id"], []).append(s)
    out = {}
    for a, b in COMPARISONS:
        if a not in by_model or b not in by_model:
            continue
        ids = [i for i in by_model[a] if i in by_model[b]]
        out[f"{a}_vs_{b}"] = {j: _paired_on(j, [by_model[a][i] for i in ids], [by_model[b][i] for i in ids], seed)
                              for j in judges}
    return out


def _paired_on(judge: str, a: list[list[dict]], b: list[list[dict]], seed: int) -> dict:
    """`paired` on one judge's per-prompt means, with the answers' mean word counts as lengths."""
    def mean(rows, key):
        v = _values(rows, key)
        return sum(v) / len(v) if v else None
    keep = [(x, y) for x, y in zip(a, b) if mean(x, judge) is not None and mean(y, judge) is not None]
    return paired([mean(x, judge) for x, _ in keep], [mean(y, judge) for _, y in keep],
                  [mean(x, "words") for x, _ in keep], [mean(y, "words") for _, y in keep], seed)


def longest_answer_tokens(tokenizer, data: Path) -> int:
    """Tokens in the longest SFT training answer (0 when there is none)."""
    path = data_split(data, "sft_train.jsonl", main=False)
    rows = read_sft(path, allow_empty=True) if path else []
    return max((len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in rows), default=0)


def fluency_model_spec(setting: str, models: dict[str, str]) -> tuple[str, str]:
    """(model setting, label) of the fluency judge: `auto` = the packaged Gemma 3 270M (another
    family than the built-in SmolLM2, and not trained here) when its package is installed, else
    the run's base model; `base`; or any model setting."""
    base = models.get("base") or next(iter(models.values()))
    if setting == "base":
        return base, f"the base model ({base})"
    if setting != "auto":
        return setting, setting
    from picoalign.models.packaged import PACKAGED, packaged_model

    folder = packaged_model("gemma3-270m")
    if folder is not None:
        return str(folder), f"Gemma 3 270M (pip {PACKAGED['gemma3-270m'][1]}, not trained here)"
    return base, (f"the base model ({base}): the package {PACKAGED['gemma3-270m'][1]} is not installed "
                  "(pip install it for a scorer of another family)")


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate every model of the run (or `cfg.models`); returns the metrics written."""
    t0 = time.time()
    run = Path(cfg.run) if cfg.run else None
    data = Path(cfg.data) if cfg.data != "data" or not run else run / "data"
    out = Path(cfg.out) if cfg.out else (run or Path("."))
    models = dict(m.split("=", 1) for m in cfg.models.split(",")) if cfg.models else run_models(run or Path("."))
    if not models:
        raise ValueError("nothing to evaluate: no checkpoints in the run and no --models given")
    ev = Evaluator(cfg, data, len(models))
    if ev.empty() and not cfg.lm_eval:
        print(f"eval: nothing to evaluate: the test splits in {data} ({', '.join(TEST_FILES)}) are empty or "
              "missing; no model loaded, nothing written")
        return {}
    if not ev.prompts:
        print("eval: no samples (n_samples=0 or no test prompts): pair metrics only, no style scores")
    results, samples = {}, []
    ref_model, ref_logps = None, None
    reference = cfg.reference or models.get("sft")
    for name, path in models.items():
        t1 = time.time()
        print(f"eval: {name} ({path})")
        model, tokenizer = load_model(path, ev.device)
        model.to(ev.dtype).eval()  # nothing trains here: weights in the compute dtype, cast once
        if not results:
            ev.set_cap(tokenizer, data)
            print(f"eval: samples capped at {ev.cap} new tokens ({ev.cap_source})")
        is_dpo = name == "dpo" and reference is not None
        beta = _dpo_beta(path) if is_dpo else 0.1
        m, rows, logps = ev.score_model(name, model, tokenizer, ref_logps if is_dpo else None, beta)
        if is_dpo and ref_model is not None and ev.prompts:  # on no samples the KL would read 0
            first = [r for r in rows if r["decoding"] == ev.decodings[0] and r["sample"] == 0]
            first = first[: cfg.kl_samples] if cfg.kl_samples else first
            with autocast_for(ev.device, ev.dtype):
                m["kl_to_ref"] = round(mean_token_kl(model, ref_model, tokenizer, [r["prompt"] for r in first],
                                                     [r["text"] for r in first], ev.device), 5)
                m["kl_samples"] = len(first)
        if name == "sft" or path == reference:
            ref_model, ref_logps = model, logps
        else:
            del model
        results[name], samples = m, samples + rows
        print(f"eval: {name}: sampled in {time.time() - t1:.0f} s")
    del ref_model
    t1 = time.time()
    ev.add_fluency(samples, models)
    if ev.fluency:
        print(f"eval: fluency scored in {time.time() - t1:.0f} s")
    for name, m in results.items():
        ev.summarise(m, [s for s in samples if s["model"] == name])
        print(f"eval: {name}: {_headline(m)}")
    metrics = read_json(out / "metrics.json") if (out / "metrics.json").exists() else {}
    metrics["models"] = results
    metrics["decoding"] = ev.decoding_facts()
    metrics["comparisons_by_decoding"] = {d: compare_models(samples, ev.names, d, cfg.seed) for d in ev.decodings}
    metrics["comparisons"] = metrics["comparisons_by_decoding"].get(ev.decodings[0], {})
    for pair, scores in metrics["comparisons"].items():
        for judge in [j for j in (PRIMARY, "fluency", "spec", "repetition") if j in scores]:
            c = scores[judge]
            if c["n"]:
                print(f"eval: {pair} on {judge}: {c['mean_diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}], "
                      f"win rate {c['win_rate']:.0%}, n={c['n']}")
    if run is not None:  # the RL stage's own task (arith accuracy, ...): eval/rl_eval.py
        from picoalign.eval.rl_eval import rl_task_section

        if section := rl_task_section(run, models, ev.device, ev.dtype, cfg.seed, cfg.rl_prompts,
                                       cfg.rl_samples):
            metrics["rl"] = section
    if cfg.judge_provider:
        metrics["llm_judge"] = judge_with_llm(cfg, samples, ev.decodings[0])
    if cfg.lm_eval:
        from picoalign.eval.harness import lm_eval_scores, split_tasks

        metrics["lm_eval"] = lm_eval_scores(models, data, split_tasks(cfg.lm_eval), out / "lm_eval", cfg.lm_eval_limit,
                                            str(ev.device), str(ev.dtype).replace("torch.", ""), cfg.lm_eval_batch_size)
    metrics["judges"] = ev.judge_facts()
    for name, facts in metrics["judges"].items():
        acc = facts.get("heldout_pairs")
        if acc:
            print(f"eval: judge {name}: {acc['accuracy']:.0%} right on {acc['n']} hand-written pairs"
                  + (f" (scored by {facts['model']})" if facts.get("model") else ""))
    metrics["scores"] = {**SCORE_NOTES, "horror_classifier_test_pair_accuracy": ev.style.test_accuracy if ev.style else None}
    metrics.setdefault("run", {}).update(_run_facts(ev, models))
    if ev.fluency:
        metrics["run"]["fluency_model"] = ev.fluency["model"]
    metrics["run"].pop("pair_budget", None)  # a rerun's own, not an earlier one's
    if ev.pair_budget:
        metrics["run"]["pair_budget"] = ev.pair_budget
    metrics["run"].setdefault("stage_seconds", {})["eval"] = round(time.time() - t0, 1)
    save_config(cfg, out / "eval_config.yaml")
    write_json(out / "metrics.json", metrics)
    write_jsonl(out / "samples.jsonl", samples)
    print(f"eval: wrote {out / 'metrics.json'} and {out / 'samples.jsonl'}")
    return metrics


def _headline(m: dict) -> str:
    """One line per model: each judge's mean and interval on the first decoding; without samples
    (n_samples=0), the pair metrics."""
    parts = [f"{j} {v['mean']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"
             for j, v in m.get("judges", {}).items() if v.get("n")]
    if parts:
        return ", ".join(parts) + f" over {m.get('n_samples', 0)} samples"
    shown = [f"{k} {m[k]:.2f}" for k in ("dpo_test_pref_acc", "dpo_hard_pref_acc") if m.get(k) is not None]
    if m.get("sft_test_loss") is not None:
        shown.append(f"sft_test_loss {m['sft_test_loss']:.4f}")
    return ", ".join(shown + ["no samples scored (pair metrics only)"])


def judge_with_llm(cfg: EvalConfig, samples: list[dict], decoding: str) -> dict:
    """The pairwise LLM judge (eval/llm_judge.py) on every model pair, each asked axis, both
    orders; an endpoint that does not answer is reported, not fatal."""
    from picoalign.data.llm import (
        BudgetExhausted,
        Limits,
        LLMClient,
        LLMError,
        Meter,
        parse_endpoint,
        redact,
    )
    from picoalign.eval.llm_judge import judge_models

    spec = cfg.judge_provider if "@" in cfg.judge_provider else f"{cfg.judge_model}@{cfg.judge_provider}"
    budget = {"max_calls": cfg.llm_max_calls, "max_total_tokens": cfg.llm_max_total_tokens}
    try:
        client = LLMClient(parse_endpoint(spec), Limits.from_config(cfg), Meter(**budget))
        client.health_check()
    except (LLMError, BudgetExhausted, ValueError) as e:
        print(f"eval: LLM judge skipped: {redact(str(e))}")
        return {"error": redact(str(e)), "budget": budget}
    result = judge_models(client, samples, decoding, split_names(cfg.judge_axes), cfg.judge_prompts, cfg.seed)
    return {"judge_model": str(client.endpoint), **result, "budget": budget, "usage": client.meter.snapshot(),
            **client.meter.problems()}


def _run_facts(ev: Evaluator, models: dict) -> dict:
    import transformers

    import picoalign

    versions = {"picoalign": picoalign.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        pass
    return {"device": str(ev.device), "dtype": str(ev.dtype).replace("torch.", ""), "versions": versions,
            "model": models.get("base", next(iter(models.values()))),
            # what was scored, which can be fewer than the test splits hold (max_sft_examples, max_pairs)
            "eval_sizes": {"sft_test": len(ev.sft_rows), "dpo_test": len(ev.splits["test"]),
                           "dpo_test_hard": len(ev.splits["test_hard"]), "prompts": len(ev.prompts)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
