"""The `picoalign` command: help without heavy imports, flags and settings into typed configs.

`--help` runs as a real subprocess (`python -m picoalign`); everything else calls
`picoalign.cli.main` or `config_from_args` in-process. Environment variables that configs read
are removed first (`clean_env`) so the machine's settings cannot change the results.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import yaml

from picoalign import stages as registry
from picoalign.cli import build_parser, config_from_args, main
from picoalign.config import DataConfig, DPOConfig, SFTConfig, load_config
from picoalign.io import read_json
from picoalign.stages import InRun, Stage, check_registry, run_order

HELP_LIMIT_S = 10.0  # coarse (2 shared cores); the strict check is the import test below
STAGES = list(registry.STAGES)  # every command, from the one registry
ENV_NAMES = ["SEED", "DEVICE", "DATA_PROVIDER", "N_SFT_TRAIN", "N_SFT_VAL", "N_SFT_TEST", "N_DPO_TRAIN",
             "N_DPO_VAL", "N_DPO_TEST", "SFT_MAX_STEPS", "SFT_EPOCHS", "SFT_MAX_SECONDS", "DPO_MAX_STEPS",
             "DPO_EPOCHS", "DPO_MAX_SECONDS", "RUN_TAG", "BASE_CKPT_OVERRIDE", "MLFLOW_TRACKING_URI"]


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def picoalign(*args: str, importtime: bool = False) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "picoalign", *args]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return done, time.perf_counter() - t0


def imported(stderr: str) -> set[str]:
    """Top-level package names in `-X importtime` output (lines end with `|   name`)."""
    return {m.group(1).split(".")[0] for m in re.finditer(r"\|\s+([\w.]+)\s*$", stderr, re.M)}


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("stage", ["", *STAGES])
def test_help_exits_zero_quickly(stage):
    done, seconds = picoalign(*([stage] if stage else []), "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: picoalign{' ' + stage if stage else ''}")
    assert seconds < HELP_LIMIT_S


def test_top_level_help_lists_every_stage():
    done, _ = picoalign("--help")
    for stage in STAGES:
        assert re.search(rf"^\s+{stage}\s", done.stdout, re.M), stage


@pytest.mark.parametrize("stage", ["", *STAGES])
def test_help_imports_no_heavy_library(stage):
    done, _ = picoalign(*([stage] if stage else []), "--help", importtime=True)
    assert done.returncode == 0
    names = imported(done.stderr)
    assert "picoalign" in names  # the importtime output was read right
    assert not names & {"torch", "transformers", "peft", "sklearn", "matplotlib"}


def test_sft_help_names_its_flags_and_environment_variables(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sft", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--max-seconds", "--max_seconds", "--max-steps", "--data", "--model", "--out", "--config", "--set"):
        assert flag in text, flag
    assert "SFT_MAX_SECONDS" in text and "SFT_MAX_STEPS" in text and "DPO_MAX_SECONDS" not in text
    assert "stop after this much wall-clock time" in text  # the field's help is the flag's help


# ---------------------------------------------------------------- stages from the command line


def test_data_command_writes_the_files_and_the_resolved_config(tmp_path, clean_env, capsys):
    out = tmp_path / "data"
    code = main(["data", "--out", str(out), "--n-sft-train", "4", "--n-sft-val", "1", "--n-sft-test", "1",
                 "--n_dpo_train", "2", "--n-dpo-val", "1", "--n-dpo-test", "0", "--seed", "7"])
    assert code == 0
    counts = {"sft_train": 4, "sft_val": 1, "sft_test": 1, "dpo_train": 2, "dpo_val": 1, "dpo_test": 0, "dpo_test_hard": 0}
    for name, n in counts.items():
        assert len((out / f"{name}.jsonl").read_text().splitlines()) == n, name
    assert len((out / "dpo_test_hard.jsonl").read_text().splitlines()) == 0  # as many as dpo_test
    assert read_json(out / "dataset_meta.json")["counts"] == {**counts, "dpo_test_hard": 0}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["out"] == str(out) and saved["seed"] == 7
    sizes = {k: v for k, v in counts.items() if k != "dpo_test_hard"}  # the held-out split is n_dpo_test big
    assert {k: saved[f"n_{k}"] for k in sizes} == sizes
    assert saved["source"] == "stories" and saved["provider"] == "auto"  # defaults kept
    assert read_json(out / "dataset_meta.json")["provider"] == "template"  # auto without an API


@pytest.mark.parametrize(("argv", "message"), [
    (["data", "--set", "nope=1"], r"unknown setting (data\.)?nope"),  # (the section may be named)
    (["sft", "--set", "lora.nope=1"], r"unknown setting (sft\.)?lora\.nope"),
    (["data", "--set", "n_sft_train=many"], r"n_sft_train: cannot read 'many' as int"),
    (["dpo", "--loss", "rlhf"], r"loss must be one of sigmoid, cdpo, ipo, hinge, robust, orpo, simpo, kto; got 'rlhf'"),
    (["sft", "--dtype", "fp16"], r"dtype=fp16 cannot train.*no gradient scaler.*use dtype=bf16"),
    (["dpo", "--dtype", "float16"], r"dtype must be one of auto, bf16, fp32; got 'float16'"),
    (["eval", "--dtype", "half"], r"dtype must be one of auto, bf16, fp32; got 'half'"),
    (["generate", "--prompt", "hi", "--dtype", "bf32"], r"dtype must be one of auto, bf16, fp16, fp32; got 'bf32'"),
    (["sft", "--device", "gpu"], r"device must be auto, cpu, mps, cuda or cuda:N; got 'gpu'"),
])
def test_bad_settings_exit_2_with_the_reason(tmp_path, clean_env, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "config error" in err
    assert not (tmp_path / "out").exists()


def test_run_with_a_bad_setting_fails_before_doing_anything(tmp_path, clean_env, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--set", "sft.nope=1", "--tag", "x"]) == 2  # a config error, like the stage commands
    assert "unknown setting sft.nope" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# Each bad setting rides with stages that need no model, so the old code (which started the
# stages before seeing the mistake) ran quickly and offline and this test failed on it.
@pytest.mark.parametrize(("settings", "message"), [
    (["stages=report,sfft"], r"stages: unknown stage 'sfft' in 'report,sfft' \(known: data, tokenizer, pretrain, sft"),
    (["stages=report,evl"], r"unknown stage 'evl'"),
    (["stages=report", "dtype=fp16"], r"dtype=fp16 cannot train.*use dtype=bf16"),
    (["stages=report", "dtype=f32"], r"dtype must be one of auto, bf16, fp32; got 'f32'"),
    (["stages=report", "device=gpu"], r"device must be auto, cpu, mps, cuda or cuda:N; got 'gpu'"),
])
def test_run_refuses_a_bad_run_setting_before_the_first_stage(tmp_path, clean_env, capsys, monkeypatch,
                                                              settings, message):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *[a for s in settings for a in ("--set", s)], "--tag", "x"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()  # no stage started


def test_environment_variables_fill_settings_and_set_beats_them():
    assert load_config(DataConfig, environ={"SEED": "7"}).seed == 7
    assert load_config(DataConfig, overrides=["seed=9"], environ={"SEED": "7"}).seed == 9
    assert load_config(DataConfig, environ={}).seed == 1234
    sft = load_config(SFTConfig, environ={"SEED": "7", "SFT_MAX_SECONDS": "30", "DPO_MAX_SECONDS": "99"})
    assert (sft.seed, sft.max_seconds) == (7, 30.0)
    dpo = load_config(DPOConfig, environ={"SFT_MAX_SECONDS": "30", "DPO_MAX_SECONDS": "99"})
    assert dpo.max_seconds == 99.0


def test_seed_from_the_environment_reaches_a_stage_config(clean_env, monkeypatch):
    monkeypatch.setenv("SEED", "7")
    parser = build_parser()
    assert config_from_args("data", parser.parse_args(["data"])).seed == 7
    assert config_from_args("data", parser.parse_args(["data", "--seed", "3"])).seed == 3


def test_stage_flags_become_config_values(tmp_path, clean_env):
    parser = build_parser()
    cfg = config_from_args("dpo", parser.parse_args(["dpo", "--ipo"]))
    assert isinstance(cfg, DPOConfig) and cfg.loss == "ipo"
    cfg = config_from_args("dpo", parser.parse_args(
        ["dpo", "--beta", "0.2", "--label_smoothing", "0.1", "--loss", "cdpo", "--progress", "false",
         "--resume", "--set", "lora.r=4"]))
    assert (cfg.beta, cfg.label_smoothing, cfg.loss) == (0.2, 0.1, "cdpo")
    assert cfg.progress is False and cfg.resume is True and cfg.lora.r == 4


def test_a_run_file_gives_each_stage_its_section(tmp_path, clean_env):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"seed": 3, "sft": {"lr": 0.5, "max_steps": 7}, "dpo": {"lr": 0.7}}))
    parser = build_parser()
    sft = config_from_args("sft", parser.parse_args(["sft", "--config", str(config)]))
    dpo = config_from_args("dpo", parser.parse_args(["dpo", "--config", str(config), "--lr", "0.9"]))
    assert (sft.lr, sft.max_steps, sft.seed) == (0.5, 7, 3)
    assert (dpo.lr, dpo.max_steps, dpo.seed) == (0.9, 0, 3)


# ---------------------------------------------------------------- the stage registry


def test_the_cli_has_one_subcommand_per_registry_entry_in_its_order():
    sub = next(a for a in build_parser()._actions if a.dest == "stage")
    assert list(sub.choices) == STAGES
    assert STAGES[:8] == ["data", "tokenizer", "pretrain", "sft", "dpo", "rl", "eval", "report"]
    for name in ("deid", "check-data", "run", "frontier", "export"):  # the commands the old hand list missed
        assert name in STAGES


def test_run_chains_the_registry_stages_that_have_a_run_part():
    assert run_order() == ("data", "tokenizer", "pretrain", "sft", "dpo", "rl", "eval", "report")
    assert registry.run_sections() == {"data": DataConfig, "tokenizer": registry.C.TokenizerConfig,
                                       "pretrain": registry.C.PretrainConfig, "sft": SFTConfig,
                                       "dpo": DPOConfig, "rl": registry.C.RLConfig, "eval": registry.C.EvalConfig}


@pytest.mark.parametrize("name", STAGES)
def test_every_registry_target_is_a_function_taking_a_config_or_the_arguments(name):
    import inspect

    stage = registry.STAGES[name]
    params = list(inspect.signature(stage.function()).parameters)
    assert len(params) >= 1, stage.target
    if stage.run and stage.run.call:
        assert len(inspect.signature(stage.function(stage.run.call)).parameters) >= 1


@pytest.mark.parametrize(("key", "entry", "message"), [
    ("sft", Stage("sft", "x", "picoalign.train.sft:sft", DataConfig), r"DataConfig is not its config"),
    ("sft", Stage("sft", "x", "picoalign.train.sft.sft", SFTConfig), r"target 'picoalign.train.sft.sft' is not"),
    ("report", Stage("report", "x", "picoalign.report.build:main", run=InRun(lambda root, run: {})),
     r"needs `call`"),
    ("sft", Stage("other", "x", "picoalign.report.build:main"), r"entry 'sft' holds the stage named 'other'"),
])
def test_the_registry_check_refuses_an_entry_that_does_not_fit(monkeypatch, key, entry, message):
    check_registry()  # the real one fits
    monkeypatch.setitem(registry.STAGES, key, entry)
    with pytest.raises(ValueError, match=message):
        check_registry()


def test_a_new_stage_is_one_registry_entry_plus_its_module(tmp_path, clean_env, capsys, monkeypatch):
    """A `hello` stage in a module of its own: `picoalign hello` calls it with its arguments,
    `run` chains it (after the others, as the entry is last) with the run folder, `run.stages`
    accepts its name, `--help` lists it, and the report shows it from its entry alone: its row
    in the stages table (in both languages), its log's summary, its panel of curves.png and its
    log in INDEX.md."""
    from picoalign.report.build import build_report
    from picoalign.report.curves import Panel
    from picoalign.report.plots import panels
    from picoalign.stages import Facts

    (tmp_path / "hello_stage.py").write_text(
        "import json\nfrom pathlib import Path\n\n"
        "def main(argv):\n    print('hello', *argv)\n\n"
        "def write(root):\n    Path(root, 'hello.txt').write_text('hi')\n"
        "    Path(root, 'logs').mkdir(exist_ok=True)\n"
        "    Path(root, 'logs', 'hello.jsonl').write_text(''.join(json.dumps({'kind': 'train', 'step': i, "
        "'loss': 3.0 - i}) + '\\n' for i in (1, 2)))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    curve = Panel("Greeting loss", "loss", (("train", "loss", "train", "#000000"),))
    monkeypatch.setitem(registry.STAGES, "hello", Stage(
        "hello", "say hello", "hello_stage:main", run=InRun(lambda root, run: {}, call="hello_stage:write"),
        report=Facts({"en": "greeting", "zh": "问候"}, log=True, curves=(curve,))))
    monkeypatch.chdir(tmp_path)
    assert main(["hello", "a", "b"]) == 0 and capsys.readouterr().out == "hello a b\n"
    assert "say hello" in build_parser().format_help()
    assert main(["run", "--set", "stages=hello", "--tag", "x"]) == 0
    assert (tmp_path / "runs" / "x" / "hello.txt").read_text() == "hi"
    assert "hello" in read_json(tmp_path / "runs" / "x" / "metrics.json")["run"]["stage_seconds"]
    report = build_report(tmp_path / "runs" / "x")
    en, zh = (report / "REPORT.md").read_text(), (report / "REPORT.zh.md").read_text()
    assert "| greeting | done: 2 steps, 0 evals |" in en and "| 问候 | 完成：2 步，0 次评估 |" in zh
    assert "- greeting: 2 train steps; train loss 2.000 → 1.000" in en
    assert ("hello", curve) in panels() and (report / "curves.png").exists()
    assert "[logs/hello.jsonl](../logs/hello.jsonl) | greeting log" in (report / "INDEX.md").read_text()
    assert main(["run", "--set", "stages=helo", "--tag", "y"]) == 2
    assert "unknown stage 'helo'" in capsys.readouterr().err and not (tmp_path / "runs" / "y").exists()
    monkeypatch.setitem(registry.STAGES, "hello", Stage(  # without its report facts: refused
        "hello", "say hello", "hello_stage:main", run=InRun(lambda root, run: {}, call="hello_stage:write")))
    with pytest.raises(ValueError, match="stage hello: a stage of `run` needs its report facts"):
        check_registry()
