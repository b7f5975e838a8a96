"""`picoalign eval`: compare base, SFT and DPO models on the held-out test splits.

    picoalign eval --run runs/demo
    picoalign eval --models base=builtin:smollm2-135m-instruct,mine=path/to/ckpt --data runs/demo/data

Per model: `sft_test_loss` (masked, response tokens only) and its perplexity; on the test
pairs, `dpo_test_pref_acc` and `dpo_test_margin` — for base/SFT whether log π(chosen) >
log π(rejected) (margin in nats), for DPO whether its implicit reward β·(log π − log π_ref)
is higher for chosen (margin β-scaled), the reference being the run's SFT model; greedy and
top-p generations for a few test prompts with two horror-style scores; and for DPO, the mean
per-token KL(π_DPO ‖ π_ref) on its own greedy samples: how far DPO moved from the reference.
With `--judge-provider` (a provider or MODEL@PROVIDER), an LLM judge compares the DPO and SFT
greedy samples of each prompt in both orders: `judge.win_rate` of DPO over SFT (0.5 = even).
With `--lm-eval [TASKS]`, lm-evaluation-harness scores every model too (eval/harness.py):
`metrics.json` gets `lm_eval`, the report a table.
Writes `metrics.json` (merged with what the run already recorded) and `samples.jsonl`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from picoalign.config import EvalConfig, save_config
from picoalign.data.formats import read_preferences, read_sft
from picoalign.eval.judges import PRIMARY, VADER, Judge, judge_pairs, pair_accuracy
from picoalign.eval.stats import mean_ci, paired
from picoalign.eval.style import SCORE_NOTES, StyleClassifier, lexicon_score
from picoalign.generation.batched import generate
from picoalign.io import read_json, write_json, write_jsonl
from picoalign.models.load import load_model, pick_device, pick_dtype, read_marker
from picoalign.train.batching import pair_batches, render_prompt, sft_batches
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
    for stage in ("sft", "dpo"):
        if read_marker(run / "checkpoints" / stage).get("complete"):
            models[stage] = str(run / "checkpoints" / stage)
    return models


def _dpo_beta(path: str) -> float:
    cfg = Path(path) / "config.yaml"
    if cfg.exists():
        import yaml

        return float((yaml.safe_load(cfg.read_text()) or {}).get("beta", 0.1))
    return 0.1


@torch.no_grad()
def mean_token_kl(policy, reference, tokenizer, prompts: list, answers: list[str], device,
                  batch_size: int = 16) -> float:
    """Mean over answer tokens of KL(π_policy ‖ π_ref) on the full next-token distributions.

    Sequences go `batch_size` at a time, right-padded: under causal attention the padding after
    a sequence changes nothing before it, and only answer positions are counted."""
    seqs = []
    for prompt, answer in zip(prompts, answers):
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if a:
            seqs.append((render_prompt(tokenizer, prompt), a))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        real = torch.zeros((len(chunk), width), dtype=torch.long)
        keep = torch.zeros((len(chunk), width), dtype=torch.bool)  # positions that predict an answer token
        for i, (p, a) in enumerate(chunk):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            real[i, : len(p) + len(a)] = 1
            keep[i, len(p) - 1 : len(p) + len(a) - 1] = True
        ids, real, keep = ids.to(device), real.to(device), keep.to(device)
        # the output layer runs only where an answer token is predicted (logits_to_keep), and the
        # fp32 log-softmax over the vocabulary a block of those rows at a time
        lp_rows = policy(ids, attention_mask=real, logits_to_keep=keep).logits.flatten(0, -2)
        lq_rows = reference(ids, attention_mask=real, logits_to_keep=keep).logits.flatten(0, -2)
        for a, b in zip(lp_rows.split(256), lq_rows.split(256)):
            lp, lq = a.float().log_softmax(-1), b.float().log_softmax(-1)
            total += (lp.exp() * (lp - lq)).sum().item()
        count += int(keep.sum())
    return total / max(count, 1)


def _read_pairs(path: Path, limit: int) -> list[dict]:
    pairs = read_preferences(path, allow_empty=True) if path.exists() else []
    if path.exists() and not pairs:
        print(f"eval: {path.name} has no rows: skipped")
    return pairs[:limit] if limit else pairs


TEST_FILES = ("sft_test.jsonl", "dpo_test.jsonl", "dpo_test_hard.jsonl")


COMPARISONS = (("sft", "base"), ("dpo", "sft"), ("dpo", "base"))


class Evaluator:
    def __init__(self, cfg: EvalConfig, data: Path) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        sft_rows = read_sft(data / "sft_test.jsonl", allow_empty=True) if (data / "sft_test.jsonl").exists() else []
        if (data / "sft_test.jsonl").exists() and not sft_rows:
            print("eval: sft_test.jsonl has no rows: skipped")
        self.sft_rows = sft_rows[: cfg.max_sft_examples] if cfg.max_sft_examples else sft_rows
        # the template test pairs, and the held-out ones made by a different generator (data/stories_heldout.py)
        self.splits = {"test": _read_pairs(data / "dpo_test.jsonl", cfg.max_pairs),
                       "test_hard": _read_pairs(data / "dpo_test_hard.jsonl", cfg.max_pairs)}
        source = sft_rows or self.splits["test"]
        self.prompts = [r["prompt"] for r in source[: cfg.n_samples]]
        self.prompt_ids = [r["id"] for r in source[: cfg.n_samples]]
        self.judges = [VADER, Judge("horror_lexicon", lambda texts: [lexicon_score(t) for t in texts],
                                    SCORE_NOTES["horror_lexicon"])]
        self.style = None
        train_pairs = _read_pairs(data / "dpo_train.jsonl", 0)
        if train_pairs and self.splits["test"]:
            self.style = StyleClassifier(cfg.seed).fit(train_pairs)
            self.style.pair_accuracy(self.splits["test"])
            self.judges.append(Judge("horror_classifier", self.style.score, SCORE_NOTES["horror_classifier"]))

    def judge_facts(self) -> dict:
        """What each judge measures and how often it ranks the hand-written held-out pairs right."""
        pairs = judge_pairs()
        facts = {j.name: {"about": j.about, "heldout_pairs": pair_accuracy(j.score, pairs)} for j in self.judges}
        if self.style is not None:
            facts["horror_classifier"]["template_test_pairs"] = {"accuracy": self.style.test_accuracy,
                                                                 "n": len(self.splits["test"])}
        facts[PRIMARY]["primary"] = True
        return facts

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
        first = [s for s in samples if s["decoding"] == self.decodings[0]]
        for judge in self.judges:
            m.setdefault("judges", {})[judge.name] = mean_ci([s[judge.name] for s in first], self.cfg.seed)
            m[judge.name] = m["judges"][judge.name]["mean"]
        m["intervals"]["answer_words"] = mean_ci([s["words"] for s in first], self.cfg.seed)
        m["answer_words"] = m["intervals"]["answer_words"]["mean"]
        m["n_samples"] = len(first)
        return m, samples, logps

    def _preferences(self, m: dict, split: str, model, tokenizer, pairs, reference, beta: float):
        """Preference accuracy and margin on one split, in one unit for every model: log pi(chosen) -
        log pi(rejected) in nats (and per answer token); for DPO also its implicit reward margin
        beta * (that - the reference's), which is a different quantity and gets its own keys."""
        batches = pair_batches(tokenizer, pairs, self.cfg, sort=False)
        chosen, rejected = pair_logps(model, batches, self.device)
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

    def empty(self) -> bool:
        """Nothing to score and no prompt to generate from: loading a model would be for nothing."""
        return not (self.sft_rows or any(self.splits.values()) or self.prompts)

    @property
    def decodings(self) -> list[str]:
        return [d.strip() for d in self.cfg.decodings.split(",") if d.strip()]

    def generate_samples(self, name: str, model, tokenizer) -> list[dict]:
        rows = []
        for decoding in self.decodings if self.prompts else ():  # n_samples=0: pair metrics only
            texts = generate(model, tokenizer, self.prompts, self.cfg.max_new_tokens, greedy=decoding == "greedy",
                             temperature=self.cfg.temperature, top_p=self.cfg.top_p, seed=self.cfg.seed,
                             batch_size=self.cfg.generate_batch_size, repetition_penalty=self.cfg.repetition_penalty)
            scores = {j.name: j.score(texts) for j in self.judges}
            for i, (pid, prompt, text) in enumerate(zip(self.prompt_ids, self.prompts, texts)):
                row = {"id": pid, "prompt": prompt, "model": name, "decoding": decoding, "text": text,
                       "words": len(text.split())}
                rows.append(row | {judge: round(values[i], 4) for judge, values in scores.items()})
        return rows


def compare_models(samples: list[dict], judges: list[str], decoding: str, seed: int) -> dict:
    """Paired per-prompt comparisons (A vs B on the same prompts) for every judge: SFT vs base,
    DPO vs SFT and DPO vs base, where both models were evaluated."""
    by_model: dict[str, dict] = {}
    for s in samples:
        if s["decoding"] == decoding:
            by_model.setdefault(s["model"], {})[s["id"]] = s
    out = {}
    for a, b in COMPARISONS:
        if a not in by_model or b not in by_model:
            continue
        ids = [i for i in by_model[a] if i in by_model[b]]
        A, B = [by_model[a][i] for i in ids], [by_model[b][i] for i in ids]
        out[f"{a}_vs_{b}"] = {j: paired([x[j] for x in A], [y[j] for y in B], [x["words"] for x in A],
                                        [y["words"] for y in B], seed) for j in judges}
    return out


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate every model of the run (or `cfg.models`); returns the metrics written."""
    t0 = time.time()
    run = Path(cfg.run) if cfg.run else None
    data = Path(cfg.data) if cfg.data != "data" or not run else run / "data"
    out = Path(cfg.out) if cfg.out else (run or Path("."))
    models = dict(m.split("=", 1) for m in cfg.models.split(",")) if cfg.models else run_models(run or Path("."))
    if not models:
        raise ValueError("nothing to evaluate: no checkpoints in the run and no --models given")
    ev = Evaluator(cfg, data)
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
        is_dpo = name == "dpo" and reference is not None
        beta = _dpo_beta(path) if is_dpo else 0.1
        m, rows, logps = ev.score_model(name, model, tokenizer, ref_logps if is_dpo else None, beta)
        if is_dpo and ref_model is not None and ev.prompts:  # on no samples the KL would read 0
            greedy = [r["text"] for r in rows if r["decoding"] == ev.decodings[0]]
            with autocast_for(ev.device, ev.dtype):
                m["kl_to_ref"] = round(mean_token_kl(model, ref_model, tokenizer, ev.prompts, greedy, ev.device), 5)
        if name == "sft" or path == reference:
            ref_model, ref_logps = model, logps
        else:
            del model
        results[name], samples = m, samples + rows
        print(f"eval: {name}: {_headline(m)} ({time.time() - t1:.0f} s)")
    metrics = read_json(out / "metrics.json") if (out / "metrics.json").exists() else {}
    metrics["models"] = results
    metrics["comparisons"] = compare_models(samples, [j.name for j in ev.judges], ev.decodings[0], cfg.seed)
    for pair, scores in metrics["comparisons"].items():
        c = scores[PRIMARY]
        print(f"eval: {pair} on {PRIMARY}: {c['mean_diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}], "
              f"win rate {c['win_rate']:.0%}, n={c['n']}")
    if cfg.judge_provider:
        metrics["judge"] = judge_dpo_vs_sft(cfg, samples)
    if cfg.lm_eval:
        from picoalign.eval.harness import lm_eval_scores, split_tasks

        metrics["lm_eval"] = lm_eval_scores(models, data, split_tasks(cfg.lm_eval), out / "lm_eval", cfg.lm_eval_limit,
                                            str(ev.device), str(ev.dtype).replace("torch.", ""), cfg.lm_eval_batch_size)
    metrics["judges"] = ev.judge_facts()
    metrics["scores"] = {**SCORE_NOTES, "horror_classifier_test_pair_accuracy": ev.style.test_accuracy if ev.style else None}
    metrics.setdefault("run", {}).update(_run_facts(ev, models))
    metrics["run"].setdefault("stage_seconds", {})["eval"] = round(time.time() - t0, 1)
    save_config(cfg, out / "eval_config.yaml")
    write_json(out / "metrics.json", metrics)
    write_jsonl(out / "samples.jsonl", samples)
    print(f"eval: wrote {out / 'metrics.json'} and {out / 'samples.jsonl'}")
    return metrics


def _headline(m: dict) -> str:
    """The primary style score with its interval; without samples (n_samples=0), the pair metrics."""
    v = m["judges"][PRIMARY]
    if v["n"]:
        return f"{PRIMARY} {v['mean']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}] over {v['n']} samples"
    shown = [f"{k} {m[k]:.2f}" for k in ("dpo_test_pref_acc", "dpo_hard_pref_acc") if m.get(k) is not None]
    if m.get("sft_test_loss") is not None:
        shown.append(f"sft_test_loss {m['sft_test_loss']:.4f}")
    return ", ".join(shown) + " (no samples)"


def judge_dpo_vs_sft(cfg: EvalConfig, samples: list[dict]) -> dict:
    """Win rate of the DPO model's greedy samples over the SFT model's, by an LLM judge in both
    orders per prompt (data/judge.py); a judge that cannot be reached is reported, not fatal."""
    from picoalign.data.judge import win_rate
    from picoalign.data.llm import BudgetExhausted, LLMClient, LLMError, parse_endpoint, redact

    greedy = {(s["model"], s["id"]): s for s in samples if s["decoding"] == "greedy"}
    ids = [i for (m, i) in greedy if m == "dpo" and ("sft", i) in greedy]
    if not ids:
        return {"error": "no greedy samples of both a dpo and an sft model"}
    spec = cfg.judge_provider if "@" in cfg.judge_provider else f"{cfg.judge_model}@{cfg.judge_provider}"
    try:
        client = LLMClient(parse_endpoint(spec))
        client.health_check()
        result = win_rate(client, [greedy["dpo", i]["prompt"] for i in ids], [greedy["dpo", i]["text"] for i in ids],
                          [greedy["sft", i]["text"] for i in ids], cfg.judge_criteria)
    except (LLMError, BudgetExhausted, ValueError) as e:
        print(f"eval: judge skipped: {redact(str(e))}")
        return {"error": redact(str(e))}
    result["usage"] = client.meter.snapshot()
    print(f"eval: judge win rate of DPO over SFT {result['win_rate']} on {result['prompts']} prompts")
    return result


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
