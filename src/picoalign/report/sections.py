"""The report's sections as Markdown, one function each, in either language.

Each section is `fn(run, t, images) -> str`: `t` is the language's phrase table (strings.py) and
`images` the names of the charts that were drawn. build.py calls them one by one, so a section
that fails becomes a warning line and the others still appear.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from picoalign.config import split_names
from picoalign.methods import METHODS
from picoalign.report.load import (
    MODELS,
    Run,
    dig,
    frontier_points,
    head_tail,
    num,
    series,
    stage_seconds,
)
from picoalign.report.markdown import (  # noqa: F401  (re-exported: build.py and the tests use them here)
    DASH,
    SHARES,
    WRAP,
    cell,
    clip,
    code,
    fence,
    fmt_ci,
    fmt_interval,
    fmt_metric,
    fmt_seconds,
    plain,
    table,
)
from picoalign.report.strings import STRINGS
from picoalign.stages import STAGES, logged, reported
from picoalign.train.diagnostics import displacement_warning

SPLITS = ("train", "val", "test")
# metric key -> which way is better (a phrase key in strings.py)
METRICS = {
    "sft_test_loss": "down",
    "sft_test_ppl": "down",
    "dpo_test_pref_acc": "up",
    "dpo_test_margin": "up",
    "dpo_test_margin_per_token": "up",
    "dpo_hard_pref_acc": "up",
    "dpo_hard_margin": "up",
    "dpo_test_reward_acc": "up",
    "dpo_test_reward_margin": "up",
    "vader_darkness": "style",
    "horror_lexicon": "style",
    "horror_classifier": "style",
    "fluency": "up",
    "repetition": "down",
    "distinct_2": "up",
    "spec": "up",
    "paragraphs": "up",
    "finished": "up",
    "answer_words": "",
    "kl_to_ref": "near",
    "n_samples": "",
}
PRIMARY_JUDGE = "vader_darkness"
SECONDARY = ("horror_lexicon", "horror_classifier")  # darkness judges built or trained here: not in the paragraph
COMPARISONS = ("sft_vs_base", "dpo_vs_sft", "dpo_vs_base", "rl_vs_sft")
SAMPLE_SCORES = ("vader_darkness", "fluency", "spec", "repetition", "paragraphs", "finished")
SETTINGS = ("model", "lr", "batch_size", "grad_accum", "epochs", "max_steps", "max_seconds", "loss", "beta", "reference")
MAX_PROMPTS = 3
CLIP_PROMPT = 400
CLIP_TEXT = 1500  # whole stories: ~300 words


def _n(value: Any) -> str:
    v = num(value)
    return DASH if v is None else f"{v:,.0f}"


# ---------------------------------------------------------------- sections

def header(run: Run, t: dict, built: str, problems: list[str]) -> str:
    lines = [f"# {t['title'].format(tag=plain(run.tag))}", "", t["nav"].format(built=built)]
    if problems:
        lines += ["", "> " + t["warnings"], ">"]
        lines += [f"> - {' '.join(p.split())}" for p in problems]
    return "\n".join(lines)


def setup(run: Run, t: dict, images: set[str]) -> str:
    info = dig(run.metrics, "run") or {}
    model = info.get("model") or dig(run.config, "sft", "model") or dig(run.config, "model")
    versions = info.get("versions")
    versions = " · ".join(f"{k} {v}" for k, v in versions.items()) if isinstance(versions, dict) and versions else DASH
    counts = dig(run.meta, "counts") or {}
    sizes = t["sizes"].format(
        sft=" / ".join(_n(counts.get(f"sft_{s}")) for s in SPLITS),
        dpo=" / ".join(_n(counts.get(f"dpo_{s}")) for s in SPLITS),
    ) if run.meta else t["missing"]
    items = [
        (t["run"], code(run.tag)),
        (t["model"], code(model) if model else DASH),
        (t["method"], _method(run, t)),
        (t["device"], code(info["device"]) if info.get("device") else DASH),
        (t["dtype"], code(info["dtype"]) if info.get("dtype") else DASH),
        (t["versions"], versions),
        (t["data"], sizes),
        (t["created"], plain(info.get("created") or dig(run.meta, "created"))),
    ]
    out = ["\n".join(f"- **{k}**{t['colon']}{v}" for k, v in items), ""]
    out.append(table([t["stage"], t["status"], t["wall"]],
                     [[stage_title(s.name, t), _status(run, s.name, t), fmt_seconds(stage_seconds(run, s.name))]
                      for s in reported()]))
    out += ["", _settings(run, t)]
    return "\n".join(out)


def _method(run: Run, t: dict) -> str:
    """How the run's preference stage trained: SFT then a DPO-stage loss, or ORPO alone."""
    loss = str(dig(run.config, "dpo", "loss") or "sigmoid")
    if dig(run.config, "run", "method") == "orpo":
        return t["method_orpo"].format(loss=code(f"loss={loss}"))
    entry = METHODS.get(loss)
    name = entry.title.get(language(t), entry.title["en"]) if entry else loss
    return t["method_sft_then"].format(name=name, loss=code(f"loss={loss}"))


def language(t: dict) -> str:
    """The language code of the phrase table `t` ("en", "zh")."""
    return next((lang for lang, table in STRINGS.items() if table is t), "en")


def stage_title(stage: str, t: dict) -> str:
    """The stage's name in the language of `t`, from its registry entry (stages.py)."""
    title = STAGES[stage].report.title
    return title.get(language(t), title["en"])


def _status(run: Run, stage: str, t: dict) -> str:
    """The stages table's status of `stage`: its log's steps, its output's presence, what eval
    scored; a stage it lacks is "missing" or, when the registry says it is optional, "not run"."""
    facts = STAGES[stage].report
    if stage == "eval":
        models = run.evaluated()
        return t["done_eval"].format(models=t["list_sep"].join(t[f"n_{m}"] for m in models)) if models else t["missing"]
    if stage == "report":
        return t["this_report"]
    if facts.done and (run.dir / facts.done).exists():
        return t["done"]
    rows = run.logs.get(stage)
    if facts.log and rows:
        steps = len(series(rows, "train", "loss")[0])
        evals = len(series(rows, "eval", "val/loss")[0])
        return t["done_steps"].format(steps=steps, evals=evals)
    return t["optional"] if facts.optional else t["missing"]


def _settings(run: Run, t: dict) -> str:
    if run.config is None:
        return t["no_config"]
    lines = []
    ran = str(dig(run.config, "run", "stages") or "")  # config.yaml resolves every stage; show those that ran
    for stage in logged():
        cfg = run.config.get(stage)
        if not isinstance(cfg, dict) or ran and stage not in split_names(ran):
            continue
        items = [f"{k}={cfg[k]}" for k in SETTINGS if cfg.get(k) not in (None, "", 0, 0.0)]
        lora = cfg.get("lora")
        if isinstance(lora, dict) and lora.get("enabled"):
            items.append(f"lora.r={lora.get('r')}")
        if items:
            lines.append(f"- {stage_title(stage, t)}{t['colon']}{code(' · '.join(items))}")
    return "\n".join([t["settings"], "", *lines]) if lines else ""


def data(run: Run, t: dict, images: set[str]) -> str:
    meta = run.meta
    if not meta:
        return t["no_data"]
    out = [t["data_line"].format(
        source=plain(meta.get("source")), provider=plain(meta.get("provider")),
        version=plain(meta.get("generator_version")), seed=plain(meta.get("seed")),
        seconds=fmt_seconds(meta.get("seconds")), created=plain(meta.get("created")),
    ), ""]
    out += _rows_from(meta, t)
    rows = [[t[split]] + [_count_cell(run, f"{kind}_{split}", t) for kind in ("sft", "dpo")] for split in SPLITS]
    out.append(table([t["split"], t["sft_rows"], t["dpo_pairs"]], rows))
    pair = _first_row(run.dir / "data" / "dpo_train.jsonl")
    if pair and all(k in pair for k in ("prompt", "chosen", "rejected")):
        out += ["", t["example"].format(id=plain(pair.get("id"))), ""]
        for key, limit in (("prompt", CLIP_PROMPT), ("chosen", 300), ("rejected", 300)):
            out += [f"**{t[key]}**", "", fence(clip(pair[key], limit, t)), ""]
    return "\n".join(out).rstrip()


def _rows_from(meta: dict, t: dict) -> list[str]:
    """Where an LLM was asked: how many rows it wrote and how many the templates filled in."""
    r = meta.get("rows_from")
    if not isinstance(r, dict) or not r.get("llm_asked"):
        return []
    missing = t["rows_missing"].format(n=_n(r.get("missing"))) if num(r.get("missing")) else ""
    out = [t["rows_from"].format(llm=_n(r.get("llm")), template=_n(r.get("template")), missing=missing), ""]
    if num(r.get("template")) or num(r.get("missing")):
        out += [t["rows_fallback_warn"], ""]
    return out


def _count_cell(run: Run, name: str, t: dict) -> str:
    count, size = dig(run.meta, "counts", name), dig(run.meta, "sizes", f"n_{name}")
    text = _n(count)
    if num(count) is not None and num(size) is not None and num(count) != num(size):
        text = t["asked"].format(count=text, size=_n(size))
    if (run.dir / "data" / f"{name}.jsonl").exists():
        text = f"[{text}](../data/{name}.jsonl)"
    return text


def _first_row(path: Path) -> dict | None:
    try:
        with path.open(encoding="utf-8") as f:
            row = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) else None


def metrics(run: Run, t: dict, images: set[str]) -> str:
    if not run.evaluated():
        return t["no_metrics"]
    header_row = [t["metric"], t["better"], *(t[f"n_{m}"] for m in MODELS)]
    rows = [[t[f"m_{key}"], t[better] if better else ""] + [fmt_interval(key, run.model(m)) for m in MODELS]
            for key, better in METRICS.items() if any(run.model(m).get(key) is not None for m in MODELS)]
    held = {k: dig(run.meta, "counts", k) for k in ("sft_test", "dpo_test", "dpo_test_hard")}
    scored = {k: dig(run.metrics, "run", "eval_sizes", k) for k in held}  # eval may score a subset
    out = [table(header_row, rows), "", t["metrics_note"].format(
        n_sft=_n(scored["sft_test"] if scored["sft_test"] is not None else held["sft_test"]),
        n_dpo=_n(scored["dpo_test"] if scored["dpo_test"] is not None else held["dpo_test"]),
        of_sft=_n(held["sft_test"]), of_dpo=_n(held["dpo_test"]),
        n_hard=_n(scored["dpo_test_hard"] if scored["dpo_test_hard"] is not None else held["dpo_test_hard"]),
        of_hard=_n(held["dpo_test_hard"]))]
    budget = dig(run.metrics, "run", "pair_budget")
    if isinstance(budget, dict) and budget.get("cut"):
        out += ["", t["pair_budget"].format(**budget)]
    line = decoding_line(run, t)
    if line:
        out += ["", line]
    if "metrics.png" in images:
        out += ["", f"![{t['metrics_alt']}](metrics.png)"]
    if dig(run.metrics, "lm_eval", "models"):
        out += ["", lm_eval_table(run, t)]
    return "\n".join(out)


def decoding_line(run: Run, t: dict) -> str:
    """How the samples were decoded, the length cap and how many samples hit it, per model."""
    d = dig(run.metrics, "decoding")
    if not isinstance(d, dict):
        return ""
    kinds = []
    for name in d.get("order") or []:
        k = d.get(name) or {}
        kinds.append(t["dec_greedy"] if k.get("greedy") else
                     t["dec_top_p"].format(temp=_plain_num(k.get("temperature")), p=_plain_num(k.get("top_p")),
                                           n=_n(k.get("n"))))
    hits = []
    for m in run.evaluated():
        for name, h in (run.model(m).get("hit_cap") or {}).items():
            hits.append(f"{t[f'n_{m}']} {name} {_n(h.get('n'))}/{_n(h.get('of'))}")
    return t["decoding_line"].format(kinds=t["list_sep"].join(kinds), prompts=_n(d.get("prompts")),
                                     cap=_n(d.get("max_new_tokens")), why=plain(d.get("cap")),
                                     hits=t["list_sep"].join(hits) or DASH)


def lm_eval_table(run: Run, t: dict) -> str:
    """lm-eval's scores (eval --lm-eval): one row per task and metric, one column per model."""
    lm = run.metrics["lm_eval"]
    names = [m for m in MODELS if m in lm["models"]] + [m for m in lm["models"] if m not in MODELS]
    rows = {}
    for name in names:
        for task, values in lm["models"][name].items():
            for metric, value in values.items():
                if metric == "n" or metric.endswith("_stderr"):
                    continue
                err = num(values.get(f"{metric}_stderr"))
                text = _plain_num(value) + (f" ± {_plain_num(err)}" if err is not None else "")
                rows.setdefault((task, metric), {})[name] = f"{text} (n={values.get('n', DASH)})"
    header_row = [t["task"], t["metric"], *(t.get(f"n_{m}", m) for m in names)]
    body = [[code(task), metric, *(cells.get(m, DASH) for m in names)] for (task, metric), cells in rows.items()]
    limit = t["lm_eval_limit"].format(limit=lm["limit"]) if lm.get("limit") else t["lm_eval_all"]
    return "\n".join([t["lm_eval_intro"].format(version=lm.get("version") or "", limit=limit), "",
                      table(header_row, body)])


def effect(run: Run, t: dict, images: set[str]) -> str:
    """Did alignment change the model? The independent judge's paired comparisons, in words first."""
    comparisons = dig(run.metrics, "comparisons")
    if not isinstance(comparisons, dict) or not comparisons:
        return t["no_effect"]
    out = [verdict(run, t), ""]
    judges = dig(run.metrics, "judges") or {}
    rows = [[code(name) + (" " + t["primary"] if dig(facts, "primary") else ""),
             plain(dig(facts, "about")) + (f" ({t['lower_better']})" if dig(facts, "better") == "lower" else ""),
             _accuracy_cell(dig(facts, "heldout_pairs")), _accuracy_cell(dig(facts, "template_test_pairs"))]
            for name, facts in judges.items() if isinstance(facts, dict)]
    if rows:
        out += [t["judges_intro"], "", table([t["judge"], t["measures"], t["heldout_acc"], t["template_acc"]], rows), ""]
    header_row = [t["comparison"], t["judge"], t["mean_diff"], t["win_rate"], t["n"], t["equal_length"], t["verdict"]]
    rows = []
    for pair in COMPARISONS:
        for judge, c in (comparisons.get(pair) or {}).items():
            lc = c.get("length_controlled") or {}
            rows.append([t.get(f"c_{pair}", pair), code(judge), _diff_cell(c), fmt_metric("pref_acc", c.get("win_rate")),
                         _n(c.get("n")), _diff_cell(lc, "diff_at_equal_length"), _verdict_cell(c, t)])
    out += [t["comparisons_intro"], "", table(header_row, rows)]
    llm = llm_judge(run, t)
    if llm:
        out += ["", llm]
    return "\n".join(out)


def llm_judge(run: Run, t: dict) -> str:
    """The outside LLM judge's pairwise win rates (eval --judge-provider), when it ran."""
    j = dig(run.metrics, "llm_judge")
    if not isinstance(j, dict):
        return ""
    if j.get("error"):
        return t["llm_skipped"].format(error=plain(j["error"]))
    rows = []
    for pair, by_axis in (j.get("pairs") or {}).items():
        for axis, r in by_axis.items():
            win = fmt_ci("pref_acc", {"mean": r.get("win_rate"), "ci_low": r.get("ci_low"), "ci_high": r.get("ci_high")})
            rows.append([t.get(f"c_{pair}", pair), axis, win, _n(r.get("n")), fmt_metric("pref_acc", r.get("position_bias")),
                         _n(r.get("unparsed")) + (f" ({plain(r['first_reasons'][0])[:120]})" if r.get("first_reasons") else "")])
    usage = j.get("usage") or {}
    out = [t["llm_intro"].format(model=plain(j.get("judge_model")), decoding=plain(j.get("decoding")),
                                 calls=_n(usage.get("calls")), tokens=_n(usage.get("total_tokens")),
                                 budget=plain(j.get("budget")))]
    if rows:
        out += ["", table([t["comparison"], t["llm_axis"], t["llm_win"], t["n"], t["llm_bias"], t["llm_unparsed"]], rows)]
    if j.get("stopped"):
        out += ["", plain(j["stopped"])]
    return "\n".join(out)


def verdict(run: Run, t: dict) -> str:
    """One plain paragraph: the models, what changed on the primary judge and on every other axis
    beyond the noise (better and worse, with intervals), and what it cost."""
    parts = [_models_line(run, t)]
    for pair in ("sft_vs_base", "dpo_vs_sft", "rl_vs_sft"):
        c = dig(run.metrics, "comparisons", pair, PRIMARY_JUDGE)
        a, b = _pair_names(pair, t)
        if isinstance(c, dict) and num(c.get("mean_diff")) is not None:
            low, high = num(c.get("ci_low")), num(c.get("ci_high"))
            shown = "shown_up" if low is not None and low > 0 else "shown_down" if high is not None and high < 0 else "not_shown"
            parts.append(t[shown].format(comparison=t.get(f"c_{pair}", pair), judge=PRIMARY_JUDGE, diff=_diff_cell(c),
                                         n=_n(c.get("n")), a=a, b=b,
                                         length=t["length_ok"] if c.get("survives_length_control") else t["length_not"]))
        axes = _axes_sentence(run, t, pair)
        if axes:
            parts.append(axes)
    kl = num(run.model("dpo").get("kl_to_ref"))
    if kl is not None:
        parts.append(t["kl_cost"].format(kl=fmt_metric("kl_to_ref", kl)))
    hard = [num(run.model(m).get("dpo_hard_pref_acc")) for m in MODELS]
    if any(v is not None for v in hard):
        parts.append(t["hard_line"].format(accs=" → ".join(fmt_metric("pref_acc", v) for v in hard)))
    return " ".join(parts) if len(parts) > 1 else t["no_effect"]


def _pair_names(pair: str, t: dict) -> tuple[str, str]:
    a, _, b = pair.partition("_vs_")
    return t.get(f"n_{a}", a.upper()), t.get(f"n_{b}", b)


def _models_line(run: Run, t: dict) -> str:
    base = dig(run.metrics, "run", "model")
    names = [t[f"n_{m}"] + (f" ({code(base)})" if m == "base" and base else "") for m in run.evaluated()]
    return t["v_models"].format(models=t["list_sep"].join(names))


def _axes_sentence(run: Run, t: dict, pair: str) -> str:
    """'SFT vs Base, every axis over n prompts: better on ..., worse on ..., no difference on ...'."""
    scores = dig(run.metrics, "comparisons", pair)
    if not isinstance(scores, dict):
        return ""
    better, worse, same, n = [], [], [], None
    for judge, c in scores.items():
        if judge in SECONDARY or not isinstance(c, dict) or num(c.get("mean_diff")) is None:
            continue
        n = n or c.get("n")
        low, high = num(c.get("ci_low")), num(c.get("ci_high"))
        if low is None or high is None or low <= 0 <= high:
            same.append(code(judge))
            continue
        up = -1 if dig(run.metrics, "judges", judge, "better") == "lower" else 1
        (better if (low > 0) == (up > 0) else worse).append(f"{code(judge)} {_diff_cell(c)}")
    if not (better or worse or same):
        return ""
    a, b = _pair_names(pair, t)
    none = t["v_none"]
    return t["v_axes"].format(a=a, b=b, n=_n(n), better=t["list_sep"].join(better) or none,
                              worse=t["list_sep"].join(worse) or none,
                              same=t["v_same"].format(same=t["list_sep"].join(same)) if same else "")


def frontier(run: Run, t: dict, images: set[str]) -> str:
    """The reward-vs-KL frontier of `picoalign frontier`, when it was run."""
    points = frontier_points(run.metrics or {})
    if not points:
        return t["no_frontier"].format(tag=plain(run.tag))
    judge = dig(run.metrics, "frontier", "judge") or PRIMARY_JUDGE
    out = [t["frontier_intro"].format(judge=judge, n=_n(dig(points[0], judge, "n"))), ""]
    if "frontier.png" in images:
        out += [f"![{t['frontier_alt']}](frontier.png)", ""]
    rows = [[t["n_sft"] if p.get("beta") is None else f"{t['n_dpo']} ({p.get('loss') or 'sigmoid'})", _plain_num(p.get("beta")), _plain_num(p.get("sft_weight")),
             _n(p.get("steps")), fmt_ci(judge, p.get(judge)),
             fmt_metric("kl_to_ref", p.get("kl_to_ref")), fmt_metric("answer_words", dig(p, "answer_words", "mean"))]
            for p in points]
    out.append(table([t["model"], "β", "sft_weight", t["steps"], f"{judge} [95% CI]", t["m_kl_to_ref"],
                      t["m_answer_words"]], rows))
    return "\n".join(out)


def _plain_num(value: Any) -> str:
    v = num(value)
    return DASH if v is None else f"{v:g}"


def _diff_cell(c: dict, key: str = "mean_diff") -> str:
    if not isinstance(c, dict) or num(c.get(key)) is None:
        return DASH
    text = fmt_metric("diff", c[key])
    if num(c.get("ci_low")) is not None and num(c.get("ci_high")) is not None:
        text += f" [{fmt_metric('diff', c['ci_low'])}, {fmt_metric('diff', c['ci_high'])}]"
    return text


def _verdict_cell(c: dict, t: dict) -> str:
    low, high = num(c.get("ci_low")), num(c.get("ci_high"))
    if low is None or high is None:
        return DASH
    if low <= 0 <= high:
        return t["v_noise"]
    return t["v_real_length"] if c.get("survives_length_control") else t["v_real"]


def _accuracy_cell(acc: Any) -> str:
    if not isinstance(acc, dict) or num(acc.get("accuracy")) is None:
        return DASH
    return f"{fmt_metric('pref_acc', acc['accuracy'])} (n={_n(acc.get('n'))})"


def curves(run: Run, t: dict, images: set[str]) -> str:
    if not run.logs:
        return t["no_curves"]
    out = []
    if "curves.png" in images:
        out += [f"![{t['curves_alt']}](curves.png)", "", t["curves_legend"], ""]
    for stage in logged():
        rows = run.logs.get(stage)
        if not rows:
            if not STAGES[stage].report.optional:
                out.append("- " + t["stage_missing"].format(stage=stage_title(stage, t)))
            continue
        out.append("- " + _stage_summary(rows, stage, t))
        if stage == "dpo" and (warning := displacement_warning(rows)):
            out.append("- " + t["dpo_displacement"].format(warning=warning))
        if stage == "sft":
            monitor = _monitor_summary(rows, t)
            if monitor:
                out.append("- " + monitor)
    return "\n".join(out)


def _stage_summary(rows: list[dict], stage: str, t: dict) -> str:
    steps, loss = series(rows, "train", "loss")
    ends = head_tail(loss)
    name = stage_title(stage, t)
    if ends:
        text = t["sum_loss"].format(stage=name, steps=len(steps), a=f"{ends[0]:.3f}", b=f"{ends[1]:.3f}")
    else:
        text = t["sum_steps"].format(stage=name, steps=len(steps))
    vsteps, vloss = series(rows, "eval", "val/loss")
    finite = [(v, s) for s, v in zip(vsteps, vloss) if math.isfinite(v)]
    if finite:
        best, at = min(finite)
        text += t["sum_val"].format(a=f"{vloss[0]:.3f}", b=f"{vloss[-1]:.3f}", best=f"{best:.3f}", step=f"{at:.0f}")
    if stage == "dpo":
        acc = head_tail(series(rows, "train", "rewards/accuracies")[1])
        if acc:
            text += t["sum_acc"].format(a=fmt_metric("pref_acc", acc[0]), b=fmt_metric("pref_acc", acc[1]))
        pref, margin = series(rows, "eval", "val/pref_acc")[1], series(rows, "eval", "val/margin")[1]
        if pref or margin:
            text += t["sum_dpo_val"].format(acc=fmt_metric("pref_acc", pref[-1] if pref else None),
                                            margin=fmt_metric("margin", margin[-1] if margin else None))
    return text + t["end"]


def _monitor_summary(rows: list[dict], t: dict) -> str:
    chosen = series(rows, "eval", "monitor/logps_chosen")[1]
    rejected = series(rows, "eval", "monitor/logps_rejected")[1]
    if not chosen or not rejected:
        return ""
    return t["sum_monitor"].format(c0=f"{chosen[0]:.2f}", c1=f"{chosen[-1]:.2f}",
                                   r0=f"{rejected[0]:.2f}", r1=f"{rejected[-1]:.2f}")


def samples(run: Run, t: dict, images: set[str]) -> str:
    rows = [r for r in run.samples if r.get("model") in MODELS]
    if not rows:
        return t["no_samples"]
    decodings = [plain(r.get("decoding")) for r in rows]
    decoding = "greedy" if "greedy" in decodings else max(set(decodings), key=decodings.count)
    groups: dict[str, dict[str, dict]] = {}
    for r in rows:
        if plain(r.get("decoding")) == decoding:
            groups.setdefault(plain(r.get("id", r.get("prompt"))), {}).setdefault(r["model"], r)
    full = [k for k in groups if len(groups[k]) == max(len(g) for g in groups.values())]
    seed = num(dig(run.config, "eval", "report_seed"))
    # at random with a seed among the prompts every model answered: not the best ones, not the first
    picked = random.Random(int(seed) if seed is not None else 7).sample(full, min(MAX_PROMPTS, len(full)))
    models = [m for m in MODELS if any(m in g for g in groups.values())]
    penalty = num(dig(run.config, "eval", "repetition_penalty"))
    extra = t["with_penalty"].format(penalty=f"{penalty:g}") if penalty and penalty != 1 else ""
    out = [t["samples_intro"].format(decoding=plain(decoding), extra=extra, shown=len(picked), prompts=len(groups),
                                     clip=CLIP_TEXT, rows=len(run.samples)) + " " + t["samples_random"]]
    for i, key in enumerate(picked, 1):
        group = groups[key]
        prompt = next(iter(group.values())).get("prompt", "")
        out += ["", f"### {t['prompt_n'].format(i=i)} · {code(key)}", "", fence(clip(prompt, CLIP_PROMPT, t))]
        for m in models:
            row = group.get(m)
            if row is None:
                out += ["", f"**{t[f'n_{m}']}** {t['no_generation'].format(decoding=plain(decoding))}"]
                continue
            scores = " · ".join(f"{j} {fmt_metric(j, row.get(j))}" for j in SAMPLE_SCORES if row.get(j) is not None)
            out += ["", f"**{t[f'n_{m}']}** · {scores}", "", fence(clip(row.get("text", ""), CLIP_TEXT, t))]
    return "\n".join(out)


def meaning(run: Run, t: dict, images: set[str]) -> str:
    n_samples = next((run.model(m).get("n_samples") for m in reversed(MODELS) if run.model(m).get("n_samples")), None)
    bullets = [
        t["mean_loss"],
        t["mean_pref"],
        t["mean_reward"],
        t["mean_vader"],
        _scorer(run, t, "horror_lexicon", "mean_lex"),
        _scorer(run, t, "horror_classifier", "mean_clf"),
        t["mean_kl"],
        t["mean_n"].format(n=fmt_metric("n_samples", n_samples)),
    ]
    return "\n".join(f"- {b}" for b in bullets) + "\n\n" + t["mean_all"]


def _scorer(run: Run, t: dict, key: str, default: str) -> str:
    """Our explanation of a style score, or the run's own description of it where it has one."""
    desc = dig(run.metrics, "scores", key)
    desc = " ".join(desc.split()) if isinstance(desc, str) and desc.strip() else None
    if desc and t["desc_replace"]:
        return t["desc_replace"].format(name=t[f"m_{key}"], desc=desc)
    if desc and t["desc_append"]:
        return t[default] + " " + t["desc_append"].format(desc=desc)
    return t[default]


# (phrase key of the heading, section function), in report order
def rl(run: Run, t: dict, images: set[str]) -> str:
    """Online RL's task scores, reward curve and rollouts (report/rl.py)."""
    from picoalign.report.rl import rl_section

    return rl_section(run, t, images)


SECTIONS: list[tuple[str, Callable[[Run, dict, set[str]], str]]] = [
    ("h_setup", setup),
    ("h_data", data),
    ("h_effect", effect),
    ("h_metrics", metrics),
    ("h_frontier", frontier),
    ("h_rl", rl),
    ("h_curves", curves),
    ("h_samples", samples),
    ("h_meaning", meaning),
]
