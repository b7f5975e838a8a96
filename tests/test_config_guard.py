"""Config that refuses what it does not know (sections, keys, environment variables: the closest
known name in the message) and settings that cannot work, checked at load before any work."""

from __future__ import annotations

import re

import pytest

from picoalign import config as C
from picoalign.cli import main
from picoalign.pipeline import default_preset, resolve_configs


def config_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_a_misspelt_section_of_a_yaml_file_is_refused_by_name(tmp_path, capsys, monkeypatch):
    """`sftt:` used to be skipped: sft trained on its defaults and exited 0."""
    monkeypatch.delenv("SFT_MAX_SECONDS", raising=False)
    path = tmp_path / "run.yaml"
    path.write_text("sftt:\n  lr: 1.0e-4\n")
    err = config_error(capsys, ["sft", "--config", str(path), "--out", str(tmp_path / "o")])
    assert "unknown section or setting 'sftt'; did you mean sft?" in err
    assert not (tmp_path / "o").exists()
    path.write_text("run:\n  seed: 3\nsft:\n  lr: 1.0e-4\nlrr: 3\n")  # a top-level setting, misspelt
    assert "unknown section or setting 'lrr'; did you mean lr?" in config_error(capsys, ["sft", "--config", str(path)])
    path.write_text("sft: 3\n")
    assert "section 'sft' must be a mapping" in config_error(capsys, ["sft", "--config", str(path)])
    path.write_text("sftt: {}\n")
    with pytest.raises(C.ConfigError, match="unknown section or setting 'sftt'; did you mean sft"):
        resolve_configs(str(path), environ={})  # `picoalign run --config`


def test_set_names_the_closest_known_setting(capsys, tmp_path):
    err = config_error(capsys, ["sft", "--set", "lora.rr=8", "--out", str(tmp_path)])
    assert "unknown setting lora.rr; did you mean lora.r?" in err
    with pytest.raises(C.ConfigError, match=re.escape("unknown section or setting sftt; did you mean sft?")):
        resolve_configs(None, ["sftt.lr=1"], environ={})
    with pytest.raises(C.ConfigError, match=re.escape("unknown setting sft.max_second; did you mean sft.max_seconds?")):
        resolve_configs(None, ["sft.max_second=1"], environ={})


@pytest.mark.parametrize(("cls", "name", "closest"), [
    (C.SFTConfig, "SFT_MAX_SECOND", "SFT_MAX_SECONDS"),
    (C.DPOConfig, "DPO_EPOCH", "DPO_EPOCHS"),
    (C.ServeConfig, "PICOALIGN_API_KY", "PICOALIGN_API_KEY"),
    (C.DataConfig, "PICOALIGN_THREAD", "PICOALIGN_THREADS"),
])
def test_a_misspelt_environment_variable_in_our_namespace_is_refused(cls, name, closest):
    with pytest.raises(C.ConfigError, match=f"environment variable {name} is not a setting; did you mean {closest}?"):
        C.load_config(cls, environ={name: "60"})


def test_known_and_foreign_environment_variables_pass():
    env = {"SFT_MAX_SECONDS": "30", "DPO_MAX_SECONDS": "9", "PICOALIGN_CACHE": "/tmp", "DATA_DIR": "x",
           "PICOALIGN_API_KEY": "k", "HOME": "/root", "PICOALIGN_ALLOWED_HOSTS": "a.example"}
    assert C.load_config(C.SFTConfig, environ=env).max_seconds == 30


def test_the_shipped_presets_still_load():
    for preset in ("default", "gpu", "pico"):
        path = default_preset().replace("default.yaml", f"{preset}.yaml")
        assert resolve_configs(path, environ={})["sft"].lr > 0
