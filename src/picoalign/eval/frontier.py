"""`picoalign frontier`: the reward-vs-KL frontier of a run, as in the DPO paper's figure 2.

    picoalign frontier --run runs/demo                              # β 0.05, 0.1, 0.3, 1
    picoalign frontier --run runs/demo --betas 0.1,0.5 --sft-weights 0,1

Each point is one DPO run from the run's SFT checkpoint, with the run's own DPO settings except
β (and `sft_weight`), so the points differ only in how hard DPO is held to its reference. Every
model answers the same test prompts greedily; the independent judge (VADER darkness,
eval/judges.py) scores the answers — a mean with its 95% interval — and the mean per-token
KL(π ‖ π_SFT) on those same answers says how far the model moved to get there. The SFT model
itself is the point at KL 0. Points go into `<run>/metrics.json` under `frontier` as each one
finishes (a rerun trains only the missing ones); `picoalign report` then draws
`report/frontier.png` and the table. The reference log-probs of the run's DPO stage are reused:
they do not depend on β.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
import yaml

from picoalign import config as C
from picoalign.eval.evaluate import Evaluator, mean_token_kl
from picoalign.eval.judges import PRIMARY, VADER
from picoalign.eval.stats import mean_ci
from picoalign.io import read_json, write_json
from picoalign.models.load import load_model, read_marker
from picoalign.train.loop import autocast_for


def point_name(beta: float, sft_weight: float) -> str:
    return f"beta-{beta:g}-sftw-{sft_weight:g}"


def frontier(cfg: C.FrontierConfig) -> dict:
    """Train and score every missing point; returns the frontier written into metrics.json."""
    run = Path(cfg.run)
    sft = run / "checkpoints" / "sft"
    if not read_marker(sft).get("complete"):
        raise FileNotFoundError(f"{sft}: no finished SFT checkpoint (run `picoalign run` or `picoalign sft` first)")
    dpo_settings = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("dpo") or {}
    betas = C.parse_floats(cfg.betas, "betas", positive=True)
    weights = C.parse_floats(cfg.sft_weights, "sft_weights") or [float(dpo_settings.get("sft_weight", 0.0))]
    own = str(dpo_settings.get("loss", "sigmoid"))
    plan = [(loss, b, w) for loss in cfg.loss_names() or [own] for w in weights for b in betas]
    dpo_configs = {("" if loss == own else f"{loss}-") + point_name(b, w): _dpo_config(cfg, run, dpo_settings, b, w, loss)
                   for loss, b, w in plan}  # refused before work
    metrics_path = run / "metrics.json"
    eval_cfg = C.EvalConfig(run=str(run), device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, n_samples=cfg.n_samples,
                            max_new_tokens=cfg.max_new_tokens, generate_batch_size=cfg.generate_batch_size,
                            decodings="greedy", repetition_penalty=cfg.repetition_penalty, max_pairs=1,
                            max_sft_examples=1)
    ev = Evaluator(eval_cfg, run / "data")
    reference, tokenizer = load_model(str(sft), ev.device)
    reference.to(ev.dtype).eval()
    points = dict((_read(metrics_path).get("frontier") or {}).get("points") or {})
    if "sft" not in points:
        points["sft"] = _score(ev, reference, reference, tokenizer, {"beta": None, "sft_weight": None, "model": str(sft)})
        _save(metrics_path, points, cfg)
    for i, (name, dcfg) in enumerate(dpo_configs.items(), 1):
        if name in points:
            print(f"frontier: {name} already measured, kept")
            continue
        print(f"frontier: point {i}/{len(dpo_configs)}: loss={dcfg.loss} beta={dcfg.beta:g}, "
              f"sft_weight={dcfg.sft_weight:g}")
        t0 = time.time()
        _reuse_reference_logps(run, Path(dcfg.out))
        from picoalign.train.preference import train_preferences

        train_preferences(dcfg)
        model, _ = load_model(dcfg.out, ev.device)
        model.to(ev.dtype).eval()
        points[name] = _score(ev, model, reference, tokenizer,
                              {"loss": dcfg.loss, "beta": dcfg.beta, "sft_weight": dcfg.sft_weight, "model": dcfg.out,
                               "steps": read_marker(dcfg.out).get("steps")})
        points[name]["seconds"] = round(time.time() - t0, 1)
        del model
        _save(metrics_path, points, cfg)
    return _read(metrics_path)["frontier"]


def _dpo_config(cfg: C.FrontierConfig, run: Path, settings: dict, beta: float, sft_weight: float,
                loss: str) -> C.DPOConfig:
    own = settings.get("loss", "sigmoid")
    out = run / "frontier" / (("" if loss == own else f"{loss}-") + point_name(beta, sft_weight))
    overrides = {**settings, "loss": loss, "beta": beta, "sft_weight": sft_weight, "model": str(run / "checkpoints" / "sft"),
                 "data": str(run / "data"), "out": str(out), "logs": str(out / "logs"), "mlflow": False,
                 "device": cfg.device, "dtype": cfg.dtype, "seed": cfg.seed}
    if cfg.max_steps:
        overrides["max_steps"] = cfg.max_steps
    return C.load_config(C.DPOConfig, None, overrides, name="dpo")


@torch.no_grad()
def _score(ev: Evaluator, model, reference, tokenizer, facts: dict) -> dict:
    """The judge's mean (with interval) on the model's greedy answers, and its KL to the reference."""
    rows = ev.generate_samples(facts.get("model", ""), model, tokenizer)
    texts = [r["text"] for r in rows]
    kl = 0.0
    if model is not reference:
        with autocast_for(ev.device, ev.dtype):
            kl = mean_token_kl(model, reference, tokenizer, ev.prompts, texts, ev.device)
    return {**facts, "judge": PRIMARY, PRIMARY: mean_ci([r[PRIMARY] for r in rows], ev.cfg.seed),
            "kl_to_ref": round(kl, 5), "answer_words": mean_ci([r["words"] for r in rows], ev.cfg.seed)}


def _reuse_reference_logps(run: Path, out: Path) -> None:
    """The run's DPO reference log-probs, keyed by reference, loss and batches (not β): a copy
    saves the precompute; the DPO stage checks the key and recomputes if it does not match."""
    cached = run / "checkpoints" / "dpo" / "ref_logps.pt"
    if cached.exists() and not (out / "ref_logps.pt").exists():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(cached, out / "ref_logps.pt")


def _read(path: Path) -> dict:
    return read_json(path) if path.exists() else {}


def _save(path: Path, points: dict, cfg: C.FrontierConfig) -> None:
    metrics = _read(path)
    metrics["frontier"] = {"judge": PRIMARY, "about": VADER.about, "points": points,
                           "settings": {"n_samples": cfg.n_samples, "max_new_tokens": cfg.max_new_tokens,
                                        "decoding": "greedy", "repetition_penalty": cfg.repetition_penalty}}
    write_json(path, metrics)
