"""`picoalign.pipeline.run_pipeline` end to end on the tiny chat Llama: one run folder, rerun, resume.

Every run is on CPU in fp32, in `tmp_path`, with `environ={}` so the machine's environment
cannot leak in. Data: 4/2/2 SFT rows and 4/2/3 preference pairs; SFT and DPO train 2 steps each
(batch 2, LoRA r=2, `max_length` 256: the tiny BPE makes prompts ~155 tokens); eval generates
8 tokens greedily for 2 prompts and scores pairs whole (`max_length` 1024). The full run is made
once per module (`full_run`) and read by several tests; the rerun test comes last in the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from picoalign.config import ConfigError, deep_merge
from picoalign.io import read_json, read_jsonl_lenient
from picoalign.pipeline import StageFailed, resolve_configs, run_pipeline
from picoalign.report.sections import fmt_interval, fmt_metric
from picoalign.report.strings import EN, ZH
from picoalign.train.sft import SFTTask

STAGES = ("data", "sft", "dpo", "eval", "report")
MODELS = ("base", "sft", "dpo")
SIZES = {"n_sft_train": 4, "n_sft_val": 2, "n_sft_test": 2, "n_dpo_train": 4, "n_dpo_val": 2, "n_dpo_test": 3}
TRAIN = {"max_steps": 2, "epochs": 0, "batch_size": 2, "max_length": 256, "warmup_steps": 0,
         "lora": {"r": 2, "alpha": 4}, "tensorboard": False, "progress": False}
EVAL = {"max_new_tokens": 8, "n_samples": 2, "decodings": "greedy", "batch_size": 4, "max_length": 1024}


def settings(chat_model: Path, runs: Path, tag: str | None = "t", **changes) -> dict:
    """The `overrides` mapping of a tiny run (top-level keys are the run's own settings)."""
    tree = {"runs_dir": str(runs), "model": str(chat_model), "device": "cpu", "dtype": "fp32",
            "data": dict(SIZES), "sft": {**TRAIN, "monitor_pairs": 2}, "dpo": {**TRAIN, "lr": 1e-2},
            "eval": dict(EVAL)}
    if tag is not None:
        tree["tag"] = tag
    return deep_merge(tree, changes)


def run_quiet(path, overrides, environ=None) -> tuple[Path, str]:
    """run_pipeline with its stdout captured (it tees into whatever sys.stdout is at the call)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        root = run_pipeline(path, overrides, environ={} if environ is None else environ)
    return root, out.getvalue()


def train_steps(root: Path, stage: str) -> list[int]:
    return [r["step"] for r in read_jsonl_lenient(root / "logs" / f"{stage}.jsonl") if r["kind"] == "train"]


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def table_row(markdown: str, label: str) -> list[str]:
    """The cells of the table row whose first cell is `label`."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells
    raise AssertionError(f"no table row {label!r}")


# ---------------------------------------------------------------- the full run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, chat_model) -> tuple[Path, str]:
    """The whole pipeline once, from a YAML file with every section; (run folder, stdout)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    tree = settings(chat_model, tmp / "runs", tag=None)
    run = {k: tree.pop(k) for k in ("model", "device", "dtype")}
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump({"run": run, **{k: v for k, v in tree.items() if k != "runs_dir"}}))
    return run_quiet(str(config), {"runs_dir": tree["runs_dir"], "tag": "full"})


def test_every_stage_ran_and_wrote_its_part(full_run, chat_model):
    root, stdout = full_run
    assert root.name == "full" and root.is_dir()
    for line in ("sft: done in 2 steps", "dpo: done in 2 steps", "eval: wrote", "report:", "run: finished"):
        assert line in stdout, line

    config = yaml.safe_load((root / "config.yaml").read_text())
    assert {"run", "data", "sft", "dpo", "eval"} <= set(config)  # every section, resolved
    assert config["run"]["model"] == str(chat_model) and config["run"]["tag"] == "full"
    assert config["sft"]["model"] == str(chat_model)
    assert config["dpo"]["model"] == str(root / "checkpoints" / "sft")
    assert config["sft"]["max_steps"] == 2 and config["sft"]["lora"]["r"] == 2 and config["dpo"]["lr"] == 0.01
    assert config["data"]["n_dpo_test"] == 3 and config["eval"]["max_new_tokens"] == 8
    assert {config[s]["device"] for s in ("sft", "dpo", "eval")} == {"cpu"}

    log = (root / "output.log").read_text()
    for line in (f"run: {root}", "sft: done in 2 steps", "dpo: done in 2 steps", "eval: base", "run: finished"):
        assert line in log, line

    for name, n in SIZES.items():
        rows = (root / "data" / f"{name[2:]}.jsonl").read_text().splitlines()
        assert len(rows) == n, name
    assert read_json(root / "data" / "dataset_meta.json")["counts"]["dpo_test"] == 3

    for stage in ("sft", "dpo"):
        marker = read_json(root / "checkpoints" / stage / "picoalign.json")
        assert marker["complete"] is True and marker["steps"] == 2 and marker["stop_reason"] == "max_steps"
        assert (root / "checkpoints" / stage / "adapter_model.safetensors").exists()
        assert train_steps(root, stage) == [1, 2]
    assert read_json(root / "checkpoints" / "sft" / "picoalign.json")["base_model"] == str(chat_model.resolve())


def test_metrics_and_samples_cover_every_model(full_run, chat_model):
    root, _ = full_run
    metrics = read_json(root / "metrics.json")
    assert list(metrics["models"]) == list(MODELS)
    for name in MODELS:
        m = metrics["models"][name]
        for key in ("sft_test_loss", "dpo_test_pref_acc", "dpo_test_margin", "horror_lexicon", "horror_classifier"):
            assert isinstance(m[key], float), (name, key)
        assert 0.0 <= m["dpo_test_pref_acc"] <= 1.0 and m["n_samples"] == 2
        assert ("kl_to_ref" in m) == (name == "dpo")
    assert metrics["models"]["dpo"]["kl_to_ref"] >= 0.0
    assert metrics["models"]["base"]["dpo_test_margin"] != 0.0  # a random model prefers one answer
    assert metrics["run"]["model"] == str(chat_model) and metrics["run"]["device"] == "cpu"
    seconds = metrics["run"]["stage_seconds"]
    assert set(seconds) == set(STAGES) and all(v >= 0 for v in seconds.values())

    samples = [json.loads(line) for line in (root / "samples.jsonl").read_text().splitlines()]
    test_ids = [json.loads(line)["id"] for line in (root / "data" / "sft_test.jsonl").read_text().splitlines()]
    for name in MODELS:
        rows = [r for r in samples if r["model"] == name]
        assert [r["id"] for r in rows] == test_ids[:2] and {r["decoding"] for r in rows} == {"greedy"}
        assert all(isinstance(r["text"], str) and r["horror_classifier"] is not None for r in rows)


def test_report_shows_the_numbers_of_metrics_json(full_run):
    root, _ = full_run
    report = root / "report"
    for name in ("REPORT.md", "REPORT.zh.md", "INDEX.md", "index.html"):
        assert (report / name).stat().st_size > 0, name
    metrics = read_json(root / "metrics.json")["models"]
    keys = ("sft_test_loss", "sft_test_ppl", "dpo_test_pref_acc", "dpo_test_margin", "dpo_test_margin_per_token",
            "dpo_hard_pref_acc", "dpo_test_reward_margin", "vader_darkness", "horror_lexicon", "horror_classifier",
            "answer_words", "kl_to_ref", "n_samples")

    for file, strings in (("REPORT.md", EN), ("REPORT.zh.md", ZH)):
        text = (report / file).read_text()
        header = table_row(text, strings["metric"])
        assert header[-3:] == [strings["n_base"], strings["n_sft"], strings["n_dpo"]]
        for key in keys:
            cells = table_row(text, strings[f"m_{key}"])
            assert cells[-3:] == [fmt_interval(key, metrics[m]) for m in MODELS], (file, key)
        # the paired comparison on the independent judge, in the effect section
        c = read_json(root / "metrics.json")["comparisons"]["dpo_vs_sft"]["vader_darkness"]
        row = [r for r in text.splitlines() if r.startswith(f"| {strings['c_dpo_vs_sft']} | `vader_darkness`")]
        assert len(row) == 1 and f"{c['mean_diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]" in row[0]
    text = (report / "REPORT.md").read_text()
    assert table_row(text, EN["m_kl_to_ref"])[-3:-1] == ["—", "—"]  # only DPO has a reference
    seconds = read_json(root / "metrics.json")["run"]["stage_seconds"]
    for stage, label in (("sft", "SFT"), ("dpo", "DPO")):  # their names in stages.py
        assert table_row(text, label)[-1] == f"{seconds[stage]:.1f} s"
    html = (report / "index.html").read_text()
    assert "data:image/png;base64," in html and fmt_metric("sft_test_loss", metrics["dpo"]["sft_test_loss"]) in html
    assert "[metrics.json](../metrics.json)" in (report / "INDEX.md").read_text()


# ---------------------------------------------------------------- interrupted, empty, failing


def test_an_interrupted_sft_resumes_from_its_checkpoint(tmp_path, chat_model, monkeypatch):
    """Ctrl-C during SFT step 4 (the 4th micro-batch) saves `last/` at step 3 and leaves the
    stage incomplete; the same command again resumes there and finishes at step 4."""
    overrides = settings(chat_model, tmp_path, stages="data,sft", sft={"max_steps": 4})
    real_loss, calls = SFTTask.loss, {"n": 0}

    def loss(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_loss(self, batch)

    monkeypatch.setattr(SFTTask, "loss", loss)
    with pytest.raises(KeyboardInterrupt):
        run_quiet(None, overrides)
    monkeypatch.undo()
    root = tmp_path / "t"
    sft_dir = root / "checkpoints" / "sft"
    assert read_json(sft_dir / "picoalign.json")["complete"] is False
    assert torch.load(sft_dir / "last" / "trainer_state.pt", weights_only=False)["loop"]["step"] == 3
    assert train_steps(root, "sft") == [1, 2, 3]

    _, stdout = run_quiet(None, overrides)
    assert "data: already made, skipped" in stdout
    assert "sft: resumed at step 3" in stdout and "sft: done in 4 steps" in stdout
    assert train_steps(root, "sft") == [1, 2, 3, 4]
    marker = read_json(sft_dir / "picoalign.json")
    assert marker["complete"] is True and marker["steps"] == 4


def test_an_empty_stage_input_skips_the_stage_with_a_warning(tmp_path, chat_model):
    overrides = settings(chat_model, tmp_path, stages="data,sft,dpo", data={"n_dpo_train": 0})
    with pytest.warns(UserWarning, match=r"dpo: .*dpo_train\.jsonl is empty; stage skipped"):
        root, stdout = run_quiet(None, overrides)
    assert (root / "data" / "dpo_train.jsonl").read_text() == ""
    assert read_json(root / "checkpoints" / "sft" / "picoalign.json")["complete"] is True
    assert not (root / "checkpoints" / "dpo").exists() and not (root / "logs" / "dpo.jsonl").exists()
    assert set(read_json(root / "metrics.json")["run"]["stage_seconds"]) == {"data", "sft"}


def test_eval_still_runs_on_base_and_sft_when_dpo_had_no_pairs(tmp_path, chat_model):
    overrides = settings(chat_model, tmp_path, data={"n_dpo_train": 0})
    with pytest.warns(UserWarning, match="dpo_train.jsonl is empty"):
        root, _ = run_quiet(None, overrides)
    metrics = read_json(root / "metrics.json")
    assert list(metrics["models"]) == ["base", "sft"]
    assert "dpo_test_pref_acc" in metrics["models"]["sft"]
    assert (root / "report" / "REPORT.md").exists()


def test_a_rerun_that_adds_a_stage_evaluates_the_new_model(tmp_path, chat_model):
    run_quiet(None, settings(chat_model, tmp_path, stages="data,sft,eval"))
    assert list(read_json(tmp_path / "t" / "metrics.json")["models"]) == ["base", "sft"]
    _, stdout = run_quiet(None, settings(chat_model, tmp_path, stages="data,sft,dpo,eval"))
    assert "dpo: done in 2 steps" in stdout
    assert list(read_json(tmp_path / "t" / "metrics.json")["models"]) == list(MODELS)


def test_a_failing_core_stage_raises_with_the_log_path(tmp_path, chat_model):
    missing = tmp_path / "no-such-model"
    overrides = settings(chat_model, tmp_path, model=str(missing), stages="data,sft,dpo")
    with pytest.raises(StageFailed, match="stage sft failed") as info:
        run_quiet(None, overrides)
    log = tmp_path / "t" / "output.log"
    assert str(log) in str(info.value) and str(missing) in str(info.value)
    assert "FileNotFoundError" in log.read_text()  # the traceback is in the log
    assert (tmp_path / "t" / "data" / "dataset_meta.json").exists()  # the stage before it ran
    assert not (tmp_path / "t" / "checkpoints" / "dpo").exists()  # and none after it


def test_a_stage_that_trained_no_step_stops_the_run_before_eval(tmp_path, chat_model):
    """Issue 31: the dpo stage's one epoch fills no step (2 micro-batches, grad_accum 8). Once the
    run went on to evaluate and report the untrained model as "DPO"; now it stops at dpo, saying
    why, and neither the dpo checkpoint nor a metrics entry claims a trained model."""
    overrides = settings(chat_model, tmp_path, stages="data,sft,dpo,eval",
                         dpo={"max_steps": 0, "epochs": 1, "grad_accum": 8})
    with pytest.raises(StageFailed, match=r"stage dpo failed: dpo: training stopped after 0 optimiser steps"):
        run_quiet(None, overrides)
    root = tmp_path / "t"
    assert read_json(root / "checkpoints" / "dpo" / "picoalign.json")["complete"] is False
    assert "models" not in read_json(root / "metrics.json")
    assert read_json(root / "checkpoints" / "sft" / "picoalign.json")["complete"] is True


# ---------------------------------------------------------------- settings: environment, YAML, --set


def test_environment_variables_name_the_run_and_its_budget(tmp_path, chat_model):
    overrides = settings(chat_model, tmp_path, tag=None, stages="data,sft")
    del overrides["sft"]["max_steps"]
    root, stdout = run_quiet(None, overrides, environ={"SFT_MAX_STEPS": "1", "RUN_TAG": "envtag"})
    assert root == tmp_path / "envtag"
    assert "sft: done in 1 steps" in stdout and train_steps(root, "sft") == [1]
    assert yaml.safe_load((root / "config.yaml").read_text())["sft"]["max_steps"] == 1


def test_set_wins_over_environment_over_yaml_over_defaults(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"seed": 5, "device": "cpu"},
        "sft": {"lr": 1e-3, "batch_size": 3, "max_steps": 3, "out": "ignored"},
        "dpo": {"beta": 0.3},
        "eval": {"n_samples": 7},
    }))
    overrides = ["sft.lr=0.002", "dpo.beta=0.5", "tag=p", f"runs_dir={tmp_path}", "dtype=fp32"]
    c = resolve_configs(str(config), overrides, environ={"SFT_MAX_STEPS": "9", "DPO_MAX_STEPS": "4"})
    assert c["root"] == tmp_path / "p"
    assert c["sft"].lr == 0.002 and c["dpo"].beta == 0.5  # --set
    assert c["sft"].max_steps == 9 and c["dpo"].max_steps == 4  # environment over YAML
    assert c["sft"].batch_size == 3 and c["eval"].n_samples == 7  # YAML
    assert c["sft"].warmup_steps == 5 and c["dpo"].lr == 5e-5  # defaults
    assert c["run"].seed == 5 and c["sft"].seed == c["data"].seed == c["eval"].seed == 5  # run settings reach stages
    assert c["sft"].device == c["eval"].device == "cpu" and c["dpo"].dtype == "fp32"
    assert c["sft"].out == str(tmp_path / "p" / "checkpoints" / "sft")  # the run's paths always win
    assert c["dpo"].model == c["sft"].out and c["eval"].run == str(tmp_path / "p")


def test_resolve_configs_rejects_unknown_settings(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting sft.nope"):
        resolve_configs(None, ["sft.nope=1", "tag=x", f"runs_dir={tmp_path}"], environ={})


def test_set_accepts_the_run_section_spelling_of_the_yaml(tmp_path):
    """`--set run.model=...` as the YAML's `run:` section, and `--set model=...` too."""
    c = resolve_configs(None, ["run.model=/some/model", "run.stages=data", "tag=x", f"runs_dir={tmp_path}"],
                        environ={})
    assert c["run"].model == "/some/model" and c["run"].stages == "data" and c["sft"].model == "/some/model"
    c = resolve_configs(None, ["model=/other", "tag=x", f"runs_dir={tmp_path}"], environ={})
    assert c["run"].model == c["sft"].model == "/other"


# ---------------------------------------------------------------- rerun (last: it rebuilds the report)


def test_a_rerun_with_the_same_tag_skips_every_finished_stage(full_run):
    """Nothing is trained, evaluated or rewritten again; the report is rebuilt (it is cheap and
    reads only files). The config of the second call is the same, so config.yaml is too."""
    root, _ = full_run
    config = root.parent.parent / "tiny.yaml"
    checkpoints = mtimes(root / "checkpoints")
    data = mtimes(root / "data")
    metrics, samples = read_json(root / "metrics.json"), (root / "samples.jsonl").read_text()
    resolved = (root / "config.yaml").read_text()
    _, stdout = run_quiet(str(config), {"runs_dir": str(root.parent), "tag": "full"})
    for line in ("data: already made, skipped", "sft: already complete, skipped",
                 "dpo: already complete, skipped", "eval: already done, skipped"):
        assert line in stdout, line
    assert not re.search(r"done in \d+ steps|precomputing|eval: wrote", stdout)
    assert mtimes(root / "checkpoints") == checkpoints and mtimes(root / "data") == data
    after = read_json(root / "metrics.json")
    assert after["models"] == metrics["models"]
    for stage in ("data", "sft", "dpo", "eval"):  # a skipped stage keeps the time it took
        assert after["run"]["stage_seconds"][stage] == metrics["run"]["stage_seconds"][stage]
    assert (root / "samples.jsonl").read_text() == samples
    assert (root / "config.yaml").read_text() == resolved
    assert (root / "output.log").read_text().count("run: finished") == 2  # appended, not replaced


def test_output_log_gets_lines_not_progress_bar_frames():
    """A bar's carriage-return frames: the first one, then at most one per `every` seconds, and
    the frame its line ends on; escape sequences dropped; plain lines kept as they are."""
    import io

    from picoalign.pipeline import LogLines

    now = [0.0]
    file = io.StringIO()
    log = LogLines(file, every=30.0, clock=lambda: now[0])
    log.write("run: start\n")
    for step in range(1, 11):  # ten redraws, one every 5 s
        now[0] = 5.0 * step
        log.write(f"\rsft:  {step * 10}%|##| {step}/10 [00:{step:02d}]\x1b[A")
    log.write("\n")
    log.write("done ")
    log.write("for now\n")
    log.close()
    assert file.getvalue().splitlines() == [
        "run: start",
        "sft:  10%|##| 1/10 [00:01]",  # the first frame
        "sft:  70%|##| 7/10 [00:07]",  # 30 s after it
        "sft:  100%|##| 10/10 [00:10]",  # the frame the line ends on
        "done for now",
    ]


def test_frontier_trains_one_dpo_per_beta_and_scores_judge_and_kl(full_run, tmp_path):
    """`picoalign frontier` on a copy of the tiny run: two β, one DPO step each from its SFT model;
    the SFT point sits at KL 0; a rerun trains nothing; the report draws and tabulates it."""
    import shutil

    from picoalign.config import FrontierConfig
    from picoalign.eval.frontier import frontier
    from picoalign.report.build import build_report

    root = tmp_path / "run"
    shutil.copytree(full_run[0], root)
    cfg = FrontierConfig(run=str(root), betas="0.1,1", max_steps=1, n_samples=2, max_new_tokens=4,
                         device="cpu", dtype="fp32")
    with contextlib.redirect_stdout(io.StringIO()):
        result = frontier(cfg)
    points = result["points"]
    assert list(points) == ["sft", "beta-0.1-sftw-0", "beta-1-sftw-0"]
    assert points["sft"]["kl_to_ref"] == 0.0 and points["sft"]["beta"] is None
    for name, beta in (("beta-0.1-sftw-0", 0.1), ("beta-1-sftw-0", 1.0)):
        p = points[name]
        assert p["beta"] == beta and p["sft_weight"] == 0.0 and p["steps"] == 1
        assert p["kl_to_ref"] >= 0.0 and p["vader_darkness"]["n"] == 2
        assert yaml.safe_load((root / "frontier" / name / "config.yaml").read_text())["beta"] == beta
        # the run's reference log-probs were put beside each point, and the same numbers are used
        # (the copy's paths differ, so the stage recomputed them here: same model, same values)
        got = torch.load(root / "frontier" / name / "ref_logps.pt", weights_only=False)["logps"]
        want = torch.load(root / "checkpoints" / "dpo" / "ref_logps.pt", weights_only=False)["logps"]
        # (a point of 1 step scores only the batches it uses: a part of what the run's DPO scored)
        assert got and got.keys() <= want.keys() and all(torch.allclose(got[k], want[k], atol=1e-5) for k in got)
    assert read_json(root / "metrics.json")["frontier"]["points"] == points
    before = mtimes(root / "frontier")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        frontier(cfg)
    assert mtimes(root / "frontier") == before and out.getvalue().count("already measured") == 2

    build_report(root)
    text = (root / "report" / "REPORT.md").read_text()
    assert (root / "report" / "frontier.png").stat().st_size > 0 and "(frontier.png)" in text
    assert f"| {EN['n_dpo']} (sigmoid) | 1 | 0 | 1 |" in text  # the frontier table names each point's loss


def test_frontier_refuses_betas_that_do_not_parse_before_any_work(tmp_path):
    from picoalign.cli import main

    for betas, message in (("0.1,abc", "betas: 'abc' is not a number"), ("0.1,-1", "betas: -1 must be > 0"),
                           ("0,1", "betas: 0 must be > 0")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
            main(["frontier", "--run", str(tmp_path), "--betas", betas])
        assert stop.value.code == 2 and message in err.getvalue(), betas
    assert list(tmp_path.iterdir()) == []


def test_mlflow_store_is_inside_the_run_folder_unless_chosen(tmp_path):
    """No URI chosen: every training stage of a run logs to runs/<tag>/mlruns, not ./mlruns of the
    working directory; MLFLOW_TRACKING_URI or a stage's mlflow_uri still win."""
    settings = ["tag=x", f"runs_dir={tmp_path}"]
    c = resolve_configs(None, settings, environ={})
    assert {c[s].mlflow_uri for s in ("pretrain", "sft", "dpo")} == {str(tmp_path / "x" / "mlruns")}
    c = resolve_configs(None, settings, environ={"MLFLOW_TRACKING_URI": "http://mlflow.local:5000"})
    assert {c[s].mlflow_uri for s in ("pretrain", "sft", "dpo")} == {"http://mlflow.local:5000"}
    c = resolve_configs(None, [*settings, "sft.mlflow_uri=/shared/mlruns"], environ={})
    assert (c["sft"].mlflow_uri, c["dpo"].mlflow_uri) == ("/shared/mlruns", str(tmp_path / "x" / "mlruns"))


@pytest.mark.parametrize(("key", "value", "text"), [
    ("sft_test_loss", 1.23456, "1.235"),
    ("pref_acc", 0.8126, "81.3%"),
    ("rewards/accuracies", 0.5, "50.0%"),
    ("pref_margin", 0.5, "+0.500"),
    ("diff", -0.25, "-0.250"),
    ("sft_test_ppl", 3.14159, "3.14"),
    ("sft_test_ppl", 12345.6, "12,346"),
    ("kl_to_ref", 0.012345, "0.0123"),
    ("answer_words", 87.6, "88"),
    ("sft_test_loss", None, "—"),
    ("sft_test_ppl", math.inf, "∞"),
])
def test_report_shows_metrics_as_written_here(key, value, text):
    """The report's cells, as literal strings (the pipeline test above compares the report with these functions)."""
    assert fmt_metric(key, value) == text


def test_report_shows_an_interval_in_brackets():
    model = {"judges": {"judge_score": {"mean": 0.052, "ci_low": 0.031, "ci_high": 0.074}}, "pref_acc": 0.75,
             "intervals": {"pref_acc": {"ci_low": 0.5, "ci_high": 0.875}}}
    assert fmt_interval("judge_score", model) == "0.052 [0.031, 0.074]"
    assert fmt_interval("pref_acc", model) == "75.0% [50.0%, 87.5%]"
    assert fmt_interval("kl_to_ref", {}) == "—"
