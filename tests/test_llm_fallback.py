"""`picoalign data` asked for LLM data: what it says when the LLM wrote none or only some of the rows.

A user who set a key or a provider means to get LLM data. An endpoint that never answers used to
give template data with one warning and exit 0. Now, with no row from the LLM, the stage fails and
writes nothing (llm_required, on by default: a later `picoalign run` would otherwise skip the data
stage as made and train on template data); with some rows from the fallback, the stage's last
line, dataset_meta.json and the report say how many came from each.
"""

from __future__ import annotations

import json

import pytest
from llm_server import Reply, ScriptedLLM, closed_port_url, kind_of, writer

from picoalign.cli import main
from picoalign.data.llm_rows import NoLLMRows
from picoalign.data.make import make_data

KEY = "sk-test-fallback-0123456789"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("LLM_API_KEY", KEY)


def settings(tmp_path, url, n=2) -> dict:
    return dict(out=str(tmp_path / "data"), provider="openai-compatible", llm_base_url=url, n_sft_train=n,
                n_sft_val=0, n_sft_test=0, n_dpo_train=0, n_dpo_val=0, n_dpo_test=0, llm_batch_size=1,
                llm_concurrency=1, llm_retry_base_seconds=0.01, llm_timeout=5, llm_max_retries=0)


def test_a_dead_endpoint_fails_the_stage_and_writes_nothing(tmp_path, capsys):
    from picoalign.config import DataConfig

    with pytest.raises(NoLLMRows, match=r"no row came from the LLM: the LLM endpoint is not usable \("):
        make_data(DataConfig(**settings(tmp_path, closed_port_url())))
    assert not (tmp_path / "data" / "dataset_meta.json").exists()
    assert not (tmp_path / "data" / "sft_train.jsonl").exists()
    argv = ["data", "--provider", "openai-compatible", "--llm-base-url", closed_port_url(), "--out",
            str(tmp_path / "cli"), "--n-sft-train", "1", "--set", "llm_max_retries=0",
            "--set", "llm_retry_base_seconds=0.01"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("picoalign data: error: no row came from the LLM") and "--llm-required false" in err
    assert not (tmp_path / "cli" / "dataset_meta.json").exists()


def test_every_request_failing_after_the_health_check_fails_the_stage(tmp_path):
    from picoalign.config import DataConfig

    def respond(body, n):
        return writer(body) if kind_of(body) == "health" else Reply(status=500)

    with ScriptedLLM(respond) as server, pytest.warns(UserWarning), pytest.raises(NoLLMRows, match="all 2 rows"):
        make_data(DataConfig(**settings(tmp_path, server.url)))
    assert not (tmp_path / "data" / "dataset_meta.json").exists()


def test_llm_required_false_writes_the_template_rows_and_says_so(tmp_path, capsys):
    from picoalign.config import DataConfig

    with pytest.warns(UserWarning, match="not usable"):
        meta = make_data(DataConfig(**settings(tmp_path, closed_port_url()), llm_required=False))
    assert meta["rows_from"] == {"llm": 0, "template": 2, "missing": 0, "llm_asked": True, "endpoint": ""}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("data: WARNING: 0 rows from the LLM, 2 from the template fallback in ")


def test_a_partial_fallback_is_counted_in_the_last_line_the_meta_and_the_report(tmp_path, capsys):
    from picoalign.config import DataConfig
    from picoalign.report.build import build_report

    def respond(body, n):  # the health check and the first story, then 500s
        return writer(body) if n < 2 else Reply(status=500)

    with ScriptedLLM(respond) as server, pytest.warns(UserWarning, match="HTTP 500"):
        meta = make_data(DataConfig(**settings(tmp_path, server.url, n=3)))
    assert (meta["rows_from"]["llm"], meta["rows_from"]["template"], meta["rows_from"]["missing"]) == (1, 2, 0)
    assert json.loads((tmp_path / "data" / "dataset_meta.json").read_text())["rows_from"] == meta["rows_from"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("data: WARNING: 1 rows from the LLM (default at http://127.0.0.1:")
    assert "2 from the template fallback" in last and "llm.first_failure" in last and KEY not in last
    build_report(tmp_path)  # the run folder: data/ inside it
    report = (tmp_path / "report" / "index.html").read_text()
    assert "1 from the LLM, 2 from the offline templates (fallback)" in report
