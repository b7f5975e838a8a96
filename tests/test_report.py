"""The report: a fake run folder in, REPORT.md / REPORT.zh.md / index.html / charts out.

The numbers in metrics.json are chosen so their formatted forms are unambiguous:
DPO preference accuracy 0.84375 -> "84.4%", SFT test loss 1.23456 -> "1.235",
DPO margin 0.5125 -> "+0.512" (Python rounds the binary value 0.51249... down).
"""

from __future__ import annotations

import json
import math
import random
import re
import warnings
from pathlib import Path

import pytest

from picoalign.io import write_json, write_jsonl
from picoalign.report import html
from picoalign.report.build import build_report, main
from picoalign.report.sections import fmt_metric

SAMPLE_DPO = "The cellar door breathed. Mara counted the scratches: eleven, then twelve."
SAMPLE_SFT = "Mara went down to the cellar and found an old door."
SAMPLE_BASE = "Once upon a time there was a girl named Mara. <script>alert(1)</script>"


def write_meta(run: Path) -> None:
    counts = {"sft_train": 256, "sft_val": 64, "sft_test": 64, "dpo_train": 256, "dpo_val": 64, "dpo_test": 64}
    write_json(run / "data" / "dataset_meta.json", {
        "source": "stories", "provider": "template", "generator_version": "stories-v1", "seed": 1234,
        "sizes": {f"n_{k}": v for k, v in counts.items()}, "counts": counts,
        "seconds": 0.42, "created": "2025-01-02T03:04:05",
    })
    write_jsonl(run / "data" / "dpo_train.jsonl", [
        {"id": "dpo-train-000000", "prompt": "Write a horror story about a cellar.",
         "chosen": "The cellar door breathed.", "rejected": "The cellar was nice."}])


def write_logs(run: Path) -> None:
    rng = random.Random(0)
    sft = []
    for step in range(1, 61):
        loss = 1.2 + 1.3 * math.exp(-step / 15) + rng.gauss(0, 0.08)
        sft.append({"kind": "train", "step": step, "epoch": step / 64, "loss": loss, "lr": 2e-4,
                    "grad_norm": 1.0, "tokens": 512 * step, "tokens_per_s": 900.0, "elapsed": 0.5 * step})
        if step % 20 == 0:
            sft.append({"kind": "eval", "step": step, "val/loss": 1.3 + 1.2 * math.exp(-step / 15),
                        "monitor/logps_chosen": -140 + step, "monitor/logps_rejected": -130 + step / 3})
    dpo = []
    for step in range(1, 41):
        margin = 0.02 * step + rng.gauss(0, 0.1)
        dpo.append({"kind": "train", "step": step, "loss": math.log(1 + math.exp(-margin)), "lr": 5e-5,
                    "grad_norm": 0.5, "rewards/chosen": margin / 2, "rewards/rejected": -margin / 2,
                    "rewards/margins": margin, "rewards/accuracies": min(1.0, 0.5 + step / 80 + rng.gauss(0, 0.1)),
                    "logps/chosen": -100.0, "logps/rejected": -110.0, "pairs_per_s": 20.0, "elapsed": step * 0.7})
        if step % 20 == 0:
            dpo.append({"kind": "eval", "step": step, "val/loss": 0.6 - step / 200,
                        "val/pref_acc": 0.6 + step / 200, "val/margin": step / 40})
    write_jsonl(run / "logs" / "sft.jsonl", sft)
    lines = "".join(json.dumps(r) + "\n" for r in dpo) + '{"kind": "train", "step": 41, "lo'  # torn last line
    (run / "logs" / "dpo.jsonl").write_text(lines, encoding="utf-8")


def write_metrics(run: Path) -> None:
    def model(loss, acc, margin, lex, clf, kl=None):
        return {"sft_test_loss": loss, "sft_test_ppl": math.exp(loss), "dpo_test_pref_acc": acc,
                "dpo_test_margin": margin, "horror_lexicon": lex, "horror_classifier": clf,
                "kl_to_ref": kl, "n_samples": 32}

    write_json(run / "metrics.json", {
        "run": {"tag": "demo", "model": "builtin:pico-tiny", "device": "cpu", "dtype": "fp32",
                "versions": {"torch": "2.13.0", "transformers": "5.0.0"},
                "stage_seconds": {"data": 0.4, "sft": 30.5, "dpo": 28.0, "eval": 200.0},
                "eval_sizes": {"sft_test": 12, "dpo_test": 16, "prompts": 2},
                "created": "2025-01-02T03:10:00"},
        "models": {"base": model(3.9, 0.4375, -0.25, 0.012, 0.11),
                   "sft": model(1.23456, 0.53125, 0.031, 0.02, 0.35),
                   "dpo": model(1.301, 0.84375, 0.5125, 0.048, 0.71, kl=0.0371)},
        "scores": {"horror_lexicon": "Share of words found in a 300-word horror lexicon; blind to plot.",
                   "horror_classifier": "P(horror) from a bag-of-words logistic regression."},
    })
    rows = []
    for i, prompt in enumerate(["Write a horror story about a cellar.", "Write about a lighthouse."]):
        for m, text in (("base", SAMPLE_BASE), ("sft", SAMPLE_SFT), ("dpo", SAMPLE_DPO)):
            for decoding in ("greedy", "top_p"):
                rows.append({"id": f"dpo-test-{i:06d}", "prompt": prompt, "model": m, "decoding": decoding,
                             "text": text if decoding == "greedy" else "sampled " + text,
                             "horror_lexicon": 0.05, "horror_classifier": 0.5})
    write_jsonl(run / "samples.jsonl", rows)


def full_run(tmp_path: Path) -> Path:
    run = tmp_path / "demo"
    (run / "config.yaml").parent.mkdir(parents=True)
    (run / "config.yaml").write_text("sft:\n  lr: 0.0002\n  epochs: 1.0\ndpo:\n  beta: 0.1\n  loss: sigmoid\n"
                                   "eval:\n  repetition_penalty: 1.15\n")
    write_meta(run)
    write_logs(run)
    write_metrics(run)
    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One full run's report, shared by the tests that only read it (drawing takes ~1 s)."""
    return build_report(full_run(tmp_path_factory.mktemp("full")))


def test_full_report(built):
    out = built
    for name in ("curves.png", "metrics.png", "INDEX.md", "REPORT.md", "REPORT.zh.md", "index.html"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    en, zh = (out / "REPORT.md").read_text(), (out / "REPORT.zh.md").read_text()
    page = (out / "index.html").read_text()
    for text in (en, zh, page):
        for number in ("84.4%", "1.235", "+0.512", "0.0371", "53.1%", "43.8%"):
            assert number in text, number
        assert SAMPLE_DPO in text and SAMPLE_SFT in text
        assert "builtin:pico-tiny" in text
    assert "Preference accuracy" in en and "偏好准确率" in zh and "监督微调" in zh
    assert "掩码损失" in zh and "恐怖词汇得分" in zh
    assert "](curves.png)" in en and "](metrics.png)" in zh
    assert "Warning" not in en  # a torn log line is not a problem worth a warning
    # eval scored a subset of the test splits, and the report says which
    assert "SFT loss on 12 of the 64 rows of `sft_test`" in en and "16 of the 64 pairs of `dpo_test`" in en
    assert "全部 64 条中的 12 条" in zh and "全部 64 对中的 16 对" in zh
    assert "`greedy` decoding with a repetition penalty of 1.15" in en and "（重复惩罚 1.15）" in zh


def test_index_html_is_self_contained_and_escaped(built):
    page = (built / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 2
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)=["'](?!data:|#|\.\./|[\w.-]+\.(md|html|png|jsonl|json|yaml)\b)""", page)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert 'id="en"' in page and 'id="zh"' in page and 'href="#zh"' in page


def test_index_md_lists_files(built):
    index = (built / "INDEX.md").read_text()
    assert "[metrics.json](../metrics.json)" in index and "[REPORT.zh.md](REPORT.zh.md)" in index
    assert "| `checkpoints/sft` |" in index and "missing" in index


def test_data_only_run_says_stages_missing(tmp_path):
    run = tmp_path / "early"
    write_meta(run)
    out = build_report(run)
    en, zh = (out / "REPORT.md").read_text(), (out / "REPORT.zh.md").read_text()
    assert en.count("missing / not run") >= 4 and "缺失 / 未运行" in zh
    assert "| data | done |" in en and "256" in en
    assert not (out / "curves.png").exists() and not (out / "metrics.png").exists()
    assert "data:image/png" not in (out / "index.html").read_text()


def test_corrupt_metrics_gives_warning_not_exception(tmp_path):
    run = full_run(tmp_path)
    (run / "metrics.json").write_text('{"run": {"tag": "demo", ')
    with pytest.warns(UserWarning, match="metrics.json"):
        out = build_report(run)
    en, zh = (out / "REPORT.md").read_text(), (out / "REPORT.zh.md").read_text()
    assert "metrics.json` could not be read" in en and "警告" in zh
    assert "No `metrics.json`" in en and "train loss" in en  # the curves still came out
    assert (out / "curves.png").exists() and not (out / "metrics.png").exists()


def test_failing_section_becomes_a_warning(tmp_path, monkeypatch):
    from picoalign.report import sections

    def broken(run, t, images):
        raise KeyError("boom")

    monkeypatch.setattr(sections, "SECTIONS", [("h_samples", broken), *sections.SECTIONS[:1]])
    monkeypatch.setattr("picoalign.report.build.SECTIONS", sections.SECTIONS)
    run = tmp_path / "run"
    write_meta(run)
    write_metrics(run)
    with pytest.warns(UserWarning, match="boom"):
        out = build_report(run)
    en = (out / "REPORT.md").read_text()
    assert "This section could not be built (KeyError: 'boom')" in en
    assert "builtin:pico-tiny" in en  # the setup section still came out


def test_odd_values_do_not_raise(tmp_path):
    run = tmp_path / "odd"
    write_meta(run)
    write_json(run / "metrics.json", {"run": [], "models": {"sft": None, "dpo": {"dpo_test_pref_acc": "n/a",
                                                                             "sft_test_ppl": float("inf")}}})
    write_jsonl(run / "samples.jsonl", [{"id": 1, "model": "dpo", "text": None}, {"model": ["x"]}])
    write_jsonl(run / "logs" / "sft.jsonl", [{"kind": "train", "step": "x", "loss": True}, {"kind": "eval"}])
    (run / "config.yaml").write_text("- just\n- a list\n")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = build_report(run)
    assert "∞" in (out / "REPORT.md").read_text()


def test_main_prints_the_report_path(tmp_path, capsys):
    run = tmp_path / "early"
    write_meta(run)
    assert main(["--run", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report")
    assert main(["--run", str(tmp_path / "nope")]) == 1


def test_markdown_to_html_escapes_and_drops_external_links():
    md = ("# T <b>\n\n| a | b |\n|---|---|\n| 1.5 | x\\|y |\n| 12 min 03 s | <script>x</script> |\n\n"
          "[ok](../x.json) [bad](https://e.com) [js](javascript:alert(1)) <https://e.com/auto>\n\n"
          "```text\n<i> & `tick`\n```\n\n## Second `code` **bold** *less*\n\n> a **quote**\n\n- one\n- `two<`\n")
    out = html.to_html(md, lambda src: None, "en")
    assert out == (
        '<h1 id="en-1">T &lt;b&gt;</h1>\n'
        "<table>\n<thead>\n<tr>\n<th>a</th>\n<th>b</th>\n</tr>\n</thead>\n<tbody>\n"
        '<tr>\n<td class="num">1.5</td>\n<td>x|y</td>\n</tr>\n'
        '<tr>\n<td class="num">12 min 03 s</td>\n<td>&lt;script&gt;x&lt;/script&gt;</td>\n</tr>\n'
        "</tbody>\n</table>\n"
        '<p><a href="../x.json">ok</a> bad js https://e.com/auto</p>\n'
        '<pre><code class="language-text">&lt;i&gt; &amp; `tick`\n</code></pre>\n'
        '<h2 id="en-2">Second <code>code</code> <strong>bold</strong> <em>less</em></h2>\n'
        "<blockquote>\n<p>a <strong>quote</strong></p>\n</blockquote>\n"
        "<ul>\n<li>one</li>\n<li><code>two&lt;</code></li>\n</ul>\n")


def test_markdown_images_are_data_uris_or_their_alt_text():
    drawn = {"curves.png": "data:image/png;base64,iVBO"}
    out = html.to_html("![Curves](curves.png)\n\n![Other](../../etc/x.png)\n\nsee ![inline](curves.png) here",
                       drawn.get, "zh")
    assert out == ('<figure><img src="data:image/png;base64,iVBO" alt="Curves"></figure>\n'
                   '<p class="missing">[Other]</p>\n'
                   '<p>see <img src="data:image/png;base64,iVBO" alt="inline"> here</p>\n')


def test_page_keeps_the_cjk_fonts_and_one_section_per_language():
    page = html.page("r <1>", [("en", "English", "<p>a</p>"), ("zh", "中文", "<p>乙</p>")])
    assert "<title>r &lt;1&gt;</title>" in page and '"Noto Sans CJK SC"' in page and ":lang(zh)" in page
    assert '<section id="zh" lang="zh">\n<p>乙</p>\n</section>' in page
    assert '<a href="#en" lang="en">English</a> · <a href="#zh" lang="zh">中文</a>' in page


def test_fmt_metric():
    assert fmt_metric("dpo_test_pref_acc", 0.84375) == "84.4%"
    assert fmt_metric("dpo_test_margin", -0.25) == "-0.250"
    assert fmt_metric("sft_test_ppl", 12345.6) == "12,346"
    assert fmt_metric("horror_lexicon", None) == "—" == fmt_metric("sft_test_loss", float("nan"))


def _axes_run(tmp_path: Path) -> Path:
    """A run whose comparisons differ on several axes: SFT vs base better on spec, worse on
    fluency, darker on VADER; DPO vs SFT within the noise on every axis but darkness."""
    run = full_run(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())

    def c(mean, low, high, n=8):
        return {"mean_diff": mean, "ci_low": low, "ci_high": high, "win_rate": 0.75, "n": n}
    metrics["comparisons"] = {
        "sft_vs_base": {"vader_darkness": c(0.05, 0.01, 0.09), "fluency": c(-0.4, -0.5, -0.3),
                        "spec": c(0.41, 0.35, 0.47), "repetition": c(0.06, 0.02, 0.1), "finished": c(0.0, -0.1, 0.1),
                        "horror_lexicon": c(1.0, 0.5, 1.5)},
        "dpo_vs_sft": {"vader_darkness": c(0.03, 0.01, 0.05), "fluency": c(-0.02, -0.1, 0.06)},
    }
    metrics["judges"] = {"vader_darkness": {"about": "VADER", "primary": True, "heldout_pairs": {"accuracy": 0.54, "n": 26}},
                         "fluency": {"about": "log-prob", "better": "higher", "model": "Gemma 3 270M",
                                     "heldout_pairs": {"accuracy": 1.0, "n": 6}},
                         "repetition": {"about": "rep-4", "better": "lower", "heldout_pairs": {"accuracy": 1.0, "n": 6}}}
    for name, flu in (("base", -2.1), ("sft", -2.5), ("dpo", -2.52)):
        metrics["models"][name]["fluency"] = flu
        metrics["models"][name]["judges"] = {"fluency": {"mean": flu, "ci_low": flu - 0.1, "ci_high": flu + 0.1, "n": 8}}
        metrics["models"][name]["hit_cap"] = {"greedy": {"n": 1, "of": 8}, "top_p": {"n": 3, "of": 16}}
    metrics["decoding"] = {"max_new_tokens": 420, "cap": "the longest SFT training answer (381 tokens) + 10%",
                           "prompts": 8, "order": ["greedy", "top_p"], "greedy": {"greedy": True, "n": 1},
                           "top_p": {"temperature": 0.8, "top_p": 0.9, "n": 2}}
    metrics["llm_judge"] = {"judge_model": "judge at http://127.0.0.1:1/v1 (openai-compatible)", "decoding": "greedy",
                            "pairs": {"dpo_vs_sft": {"coherence": {"win_rate": 0.4, "ci_low": 0.2, "ci_high": 0.6, "n": 8,
                                                                   "position_bias": 0.25, "unparsed": 1,
                                                                   "first_reasons": ["unusable reply: no JSON"]}}},
                            "budget": {"max_calls": 100, "max_total_tokens": 0}, "usage": {"calls": 33, "total_tokens": 9000}}
    write_json(run / "metrics.json", metrics)
    rows = [{"id": f"p{i}", "prompt": f"Prompt {i}", "model": m, "decoding": "greedy", "text": f"{m} story {i}",
             "vader_darkness": 0.1, "fluency": -2.0, "spec": 0.5} for i in range(10) for m in ("base", "sft", "dpo")]
    write_jsonl(run / "samples.jsonl", rows)
    return run


def test_the_paragraph_names_the_models_and_every_axis_that_moved(tmp_path):
    out = build_report(_axes_run(tmp_path))
    en, zh = (out / "REPORT.md").read_text(), (out / "REPORT.zh.md").read_text()
    assert "A darker than B" not in en and "SFT darker than Base beyond the noise" in en
    assert "DPO darker than SFT beyond the noise" in en
    assert "Models compared: Base (`builtin:pico-tiny`), SFT, DPO." in en
    # better: spec, darkness; worse: fluency (down) and repetition (up, lower is better); same: finished
    assert ("SFT vs Base on every axis (8 prompts; darker counts as better, it is what the run trains for): better "
            "beyond the noise on `vader_darkness` +0.050 [+0.010, +0.090], `spec` +0.410 [+0.350, +0.470]; worse on "
            "`fluency` -0.400 [-0.500, -0.300], `repetition` +0.060 [+0.020, +0.100]; no difference shown on "
            "`finished`.") in en
    assert "better beyond the noise on `vader_darkness` +0.030 [+0.010, +0.050]; worse on none; no difference shown " \
           "on `fluency`." in en
    assert "SFT比基座模型更黑暗" in zh.replace(" ", "") or "SFT 模型比基座模型更黑暗" in zh
    assert "| Fluency: mean log-prob per token under a scoring model (nats) | ↑ higher | -2.100 [-2.200, -2.000]" in en
    assert ("Samples: greedy (1 per prompt), top_p sampling at temperature 0.8, top_p 0.9 (2 per prompt) on 8 test "
            "prompts, each run to its end or to the cap of 420 new tokens (the longest SFT training answer (381 "
            "tokens) + 10%). Hit the cap: Base greedy 1/8") in en
    assert "| DPO vs SFT | coherence | 40.0% [20.0%, 60.0%] | 8 | 25.0% | 1 (unusable reply: no JSON) |" in en
    assert "33 calls, 9,000 tokens" in en


def test_side_by_side_samples_are_picked_at_random_with_the_seed(tmp_path):
    run = _axes_run(tmp_path)
    shown = re.findall(r"### Prompt \d · `(p\d)`", (build_report(run) / "REPORT.md").read_text())
    assert shown == random.Random(7).sample([f"p{i}" for i in range(10)], 3)
    (run / "config.yaml").write_text("eval:\n  report_seed: 3\n")
    again = re.findall(r"### Prompt \d · `(p\d)`", (build_report(run) / "REPORT.md").read_text())
    assert again == random.Random(3).sample([f"p{i}" for i in range(10)], 3) and again != shown


def test_a_pair_that_moved_on_every_axis_has_no_empty_clause():
    """It read "...; worse on `fluency` ...; no difference shown on none." (trim3's SFT vs base)."""
    from picoalign.report.sections import Run, _axes_sentence
    from picoalign.report.strings import STRINGS

    run = Run(Path("."), metrics={"comparisons": {"sft_vs_base": {
        "spec": {"mean_diff": 0.2, "ci_low": 0.1, "ci_high": 0.3, "n": 16},
        "fluency": {"mean_diff": -0.7, "ci_low": -1.0, "ci_high": -0.4, "n": 16}}}})
    en = _axes_sentence(run, STRINGS["en"], "sft_vs_base")
    assert en.endswith("better beyond the noise on `spec` +0.200 [+0.100, +0.300]; worse on `fluency` -0.700 "
                       "[-1.000, -0.400].")
    assert _axes_sentence(run, STRINGS["zh"], "sft_vs_base").endswith("变差的有 `fluency` -0.700 [-1.000, -0.400]。")


def test_key_settings_name_only_the_stages_that_ran():
    """config.yaml resolves every stage; the report listed pretraining and RL settings for an SFT+DPO run."""
    from picoalign.report.sections import Run, _settings
    from picoalign.report.strings import STRINGS

    config = {"run": {"stages": "data,sft,dpo,eval,report"}, "pretrain": {"lr": 0.002}, "sft": {"lr": 0.0003},
              "dpo": {"lr": 0.0005}, "rl": {"lr": 5e-05}}
    text = _settings(Run(Path("."), config=config), STRINGS["en"])
    assert "- SFT: `lr=0.0003`" in text and "- DPO: `lr=0.0005`" in text
    assert "0.002" not in text and "5e-05" not in text
    assert "5e-05" in _settings(Run(Path("."), config=config | {"run": {}}), STRINGS["en"])  # no list: all


def test_the_rl_section_shows_spec_coverage_and_each_rewards_curve(tmp_path):
    from picoalign.report.load import Run
    from picoalign.report.rl import rl_section
    from picoalign.report.strings import STRINGS

    ci = {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 4}
    diff = {"mean_diff": -0.3, "ci_low": -0.4, "ci_high": -0.2, "n": 4}
    section = {"task": "prompts", "n": 4, "rewards": ["spec", "darkness"], "verdict": "RL did not beat SFT",
               "models": {m: {"spec": ci, "darkness": ci, "spec_coverage": ci, "completion_tokens": ci,
                              "finished": ci} for m in ("sft", "rl")},
               "comparisons": {"rl_vs_sft": {"spec": diff, "darkness": diff, "spec_coverage": diff}}, "cost": {}}
    logs = {"rl": [{"kind": "train", "step": 1, "reward": 0.1, "rewards/spec/mean": 0.4,
                    "rewards/darkness/mean": 0.05, "entropy": 1.2}]}
    text = rl_section(Run(tmp_path, metrics={"rl": section}, logs=logs), STRINGS["en"], set())
    assert "| A vs B | spec | darkness | spec_coverage |" in text
    assert "| rl_vs_sft | -0.300 [-0.400, -0.200] | -0.300 [-0.400, -0.200] | -0.300 [-0.400, -0.200] |" in text
    assert "`rewards/darkness/mean` | `rewards/spec/mean`" in text and "| 1 | 0.100 | 0.050 | 0.400 | 1.200 |" in text
    assert "Sampled as" not in text  # greedy only: no second table
    up = {"mean_diff": 0.1, "ci_low": 0.05, "ci_high": 0.15, "n": 4}
    sampled = {**section, "verdict": "RL beat SFT on held-out spec reward beyond the noise",
               "comparisons": {"rl_vs_sft": {"spec": up, "darkness": up, "spec_coverage": up}},
               "decoding": {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "n": 4}}
    text = rl_section(Run(tmp_path, metrics={"rl": {**section, "sampled": sampled}}, logs=logs), STRINGS["en"], set())
    assert "Sampled as the RL stage sampled its rollouts (temperature 0.7, top_p 1.0, top_k 0), 4 answers per prompt" in text
    assert "**RL beat SFT on held-out spec reward beyond the noise**" in text
    assert text.index("| rl_vs_sft | -0.300") < text.index("| rl_vs_sft | +0.100 [+0.050, +0.150] |")
