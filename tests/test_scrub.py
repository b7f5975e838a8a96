"""The one secret scrubber (picoalign/scrub.py) and the writers that use it: config.yaml, metrics and
dataset_meta (write_json), the logs (append_jsonl), output.log, the access log."""

from __future__ import annotations

import io
import json
from urllib.parse import quote

import pytest

from picoalign.config import DataConfig, ServeConfig, save_config, to_dict
from picoalign.io import append_jsonl, write_json
from picoalign.scrub import scrub

KEY = "sk-live-Secret/Key+42"  # characters a URL encodes: / and +


@pytest.mark.parametrize(("text", "expected"), [
    ("http://user:pw@host/v1?key=abc", "http://***@host/v1?key=***"),
    ("https://h/x?api_key=1&n=2&token=t&sig=s&X-Amz-Signature=a&page=3",
     "https://h/x?api_key=***&n=2&token=***&sig=***&X-Amz-Signature=***&page=3"),
    ("/v1/models?api%5Fkey=zz&monkey=banana", "/v1/models?api%5Fkey=***&monkey=banana"),
    ("a=b, no query", "a=b, no query"),
    ("?password=&next=/", "?password=&next=/"),  # nothing to hide
])
def test_urls_lose_their_userinfo_and_credential_query_values(text, expected):
    assert scrub(text, environ={}) == expected


@pytest.mark.parametrize("form", [KEY, quote(KEY, safe=""), quote(KEY), KEY.replace("-", "%2D"),
                                  KEY.replace("S", "%53").replace("/", "%2f")])
def test_a_configured_key_is_masked_in_any_encoding(form):
    text = f"GET /v1/models?x={form}&page=2 and also {form}"
    assert scrub(text, environ={"OPENAI_API_KEY": KEY}) == "GET /v1/models?x=***&page=2 and also ***"


def test_a_short_key_is_masked_only_as_a_token_of_its_own():
    assert scrub("abc abcdef", also=["abc"], environ={}) == "*** abcdef"
    assert scrub("run 1 of 1", environ={"SOME_KEY": "1"}) == "run 1 of 1"  # a setting, not a key


def test_config_yaml_keeps_no_credential_of_the_llm_url(tmp_path):
    """`--llm-base-url 'http://user:pw@host/v1?key=abc'` was masked on stderr but config.yaml
    kept `?key=abc`."""
    cfg = DataConfig(llm_base_url="http://user:pw@host/v1?key=abc")
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "llm_base_url: http://***@host/v1?key=***" in text and "abc" not in text and "pw" not in text
    serve = to_dict(ServeConfig(api_key="serve-key-9876", name="a-serve-key-9876-model"))
    assert "api_key" not in serve and serve["name"] == "a-***-model"


def test_records_and_logs_are_written_without_the_environments_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("LLM_BASE_URL", "http://me:hunter2hunter2@llm.local/v1")
    record = {"endpoint": f"http://llm.local/v1?k={quote(KEY, safe='')}", "error": f"401 for {KEY}",
              "why": "login hunter2hunter2 refused", "steps": [1, 2], "nested": {"url": "http://a:b@c/?token=z"}}
    write_json(tmp_path / "meta.json", record)
    append_jsonl(tmp_path / "log.jsonl", record)
    for name in ("meta.json", "log.jsonl"):
        text = (tmp_path / name).read_text()
        assert "Secret" not in text and "hunter2" not in text and "token=z" not in text, text
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta == {"endpoint": "http://llm.local/v1?k=***", "error": "401 for ***", "why": "login *** refused",
                    "steps": [1, 2], "nested": {"url": "http://***@c/?token=***"}}


def test_output_log_lines_are_scrubbed(monkeypatch):
    from picoalign.pipeline import LogLines

    monkeypatch.setenv("DEEPSEEK_API_KEY", KEY)
    file = io.StringIO()
    log = LogLines(file)
    log.write(f"data: calling http://x/v1?api_key={KEY}\n")
    assert file.getvalue() == "data: calling http://x/v1?api_key=***\n"
