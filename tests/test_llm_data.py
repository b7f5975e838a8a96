"""`picoalign data` through an OpenAI-compatible API, against a scripted server on 127.0.0.1.

Each reply of the scripted server reports usage 10 prompt + 20 completion = 30 tokens, so the
expected usage is 30 x calls. Retries wait 0.01 s (llm_retry_base_seconds) to keep the tests fast.
"""

from __future__ import annotations

import json
import logging
import re
import threading

import pytest
from llm_server import (
    Reply,
    ScriptedLLM,
    closed_port_url,
    kind_of,
    small_teacher,
    spec_blocks,
    story,
    writer,
)

from picoalign.config import ConfigError, DataConfig, DPOConfig, load_config
from picoalign.data.formats import read_preferences, read_sft
from picoalign.data.judge import win_rate
from picoalign.data.llm import (
    Limits,
    LLMClient,
    endpoint,
    extract_json,
    parse_endpoint,
    resolve_provider,
)
from picoalign.data.llm_rows import PARTIAL
from picoalign.data.make import make_data, story_rows

KEY = "sk-test-s3cr3t-0123456789abcdef"
FILES = ("sft_train", "sft_val", "sft_test", "dpo_train", "dpo_val", "dpo_test", "dpo_test_hard")


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("LLM_API_KEY", KEY)


def make_cfg(tmp_path, url, sft=(2, 0, 0), dpo=(0, 0, 0), **kw) -> DataConfig:
    settings = dict(out=str(tmp_path / "data"), provider="openai-compatible", llm_base_url=url,
                    n_sft_train=sft[0], n_sft_val=sft[1], n_sft_test=sft[2],
                    n_dpo_train=dpo[0], n_dpo_val=dpo[1], n_dpo_test=dpo[2],
                    llm_batch_size=1, llm_concurrency=1, llm_retry_base_seconds=0.01, llm_timeout=5)
    return DataConfig(**{**settings, **kw})


def rows(cfg: DataConfig) -> dict[str, list[dict]]:
    out = {}
    for name in FILES:
        path = f"{cfg.out}/{name}.jsonl"
        out[name] = [json.loads(line) for line in open(path, encoding="utf-8")]
    return out


def usage(calls: int, failures=0, retries=0, fallbacks=0, tokens_calls=None) -> dict:
    t = calls if tokens_calls is None else tokens_calls
    return {"calls": calls, "prompt_tokens": 10 * t, "completion_tokens": 20 * t, "total_tokens": 30 * t,
            "failures": failures, "retries": retries, "fallbacks": fallbacks}


def title(row: dict) -> str:
    return row["prompt"].split("Title: ", 1)[1].split("\n", 1)[0]


# ---------------------------------------------------------------- settings, providers and JSON


def test_settings_from_the_original_environment_variables():
    env = {"LLM_BATCH_SIZE": "2", "LLM_FALLBACK": "stop", "LLM_MAX_CALLS": "200", "LLM_MAX_TOTAL_TOKENS": "200000",
           "LLM_MAX_CONSEC_FAILS": "3", "LLM_TEMPERATURE": "0.5", "LLM_MAX_OUTPUT_TOKENS": "1200",
           "LLM_MAX_RETRIES": "4", "DATA_PROVIDER": "deepseek"}
    cfg = load_config(DataConfig, environ=env)
    assert (cfg.llm_batch_size, cfg.llm_fallback, cfg.llm_max_calls, cfg.llm_max_total_tokens) == (2, "stop", 200, 200000)
    assert (cfg.llm_max_consec_fails, cfg.provider) == (3, "deepseek")
    assert Limits.from_config(cfg) == Limits(temperature=0.5, max_output_tokens=1200, max_retries=4,
                                             retry_base_seconds=1.0, timeout=120.0, json_mode=True)
    assert DataConfig().provider == "auto" and DPOConfig().min_confidence == 6.0
    with pytest.raises(ConfigError, match="llm_fallback must be one of template, stop; got 'retry'"):
        DataConfig(llm_fallback="retry")
    with pytest.raises(ConfigError, match="two or more different"):
        DataConfig(judge=True, answer_models="a@openai,a@openai")


def test_auto_provider_order():
    assert resolve_provider("auto", {}) == "template"
    assert resolve_provider("auto", {"LLM_BASE_URL": "http://x/v1"}) == "openai-compatible"
    assert resolve_provider("auto", {"LLM_BASE_URL": "u", "OPENAI_API_KEY": "k"}) == "openai"
    assert resolve_provider("auto", {"OPENAI_API_KEY": "k", "DEEPSEEK_API_KEY": "k"}) == "deepseek"
    assert resolve_provider("chatgpt", {}) == "openai"
    with pytest.raises(ValueError, match="unknown provider 'claude'"):
        resolve_provider("claude", {})


def test_endpoints_from_settings_and_environment():
    env = {"DEEPSEEK_API_KEY": "k", "DEEPSEEK_MODEL": "deepseek-reasoner"}
    ep = endpoint("auto", environ=env)
    assert (ep.provider, ep.base_url, ep.model, ep.key_env) == (
        "deepseek", "https://api.deepseek.com", "deepseek-reasoner", "DEEPSEEK_API_KEY")
    assert endpoint("deepseek", model="deepseek-chat", environ=env).model == "deepseek-chat"  # settings win
    assert endpoint("openai", environ={}).model == "gpt-4o-mini"
    ep = parse_endpoint("judge-7b@http://127.0.0.1:9/v1/", environ={})
    assert (ep.provider, ep.base_url, ep.model) == ("openai-compatible", "http://127.0.0.1:9/v1", "judge-7b")
    assert parse_endpoint("qwen/qwen-2.5-7b@openrouter", environ={}).base_url == "https://openrouter.ai/api/v1"
    ep = endpoint("openai-compatible", environ={"LLM_BASE_URL": "http://h/v1", "LLM_API_KEY": "sk-zzz-secret"})
    assert "sk-zzz" not in repr(ep) + str(ep) and ep.key_env == "LLM_API_KEY"  # the name, not the key
    with pytest.raises(ValueError, match="LLM_BASE_URL"):
        endpoint("openai-compatible", environ={})


@pytest.mark.parametrize(("reply", "expected"), [
    ('{"ok": true}', {"ok": True}),
    ('```json\n{"stories": [{"id": 1, "story": "x"}]}\n```', {"stories": [{"id": 1, "story": "x"}]}),
    ('Here you go:\n{"a": "brace } inside", "b": [1, 2]} Hope it helps!', {"a": "brace } inside", "b": [1, 2]}),
    ("Sure. [1, 2, 3]", [1, 2, 3]),
    ("```\n{\"x\": 1}\n```", {"x": 1}),
])
def test_extract_json(reply, expected):
    assert extract_json(reply) == expected


@pytest.mark.parametrize("reply", ["", "Sorry, I can't help with that.", '{"stories": [ {"id": 1, ',
                                   "[" * 100_000 + "]" * 100_000])  # too deep for Python's reader
def test_extract_json_rejects(reply):
    with pytest.raises(ValueError, match="no JSON"):
        extract_json(reply)


# ---------------------------------------------------------------- generation


def test_success_batched_rows_and_usage(tmp_path):
    with ScriptedLLM(lambda body, n: writer(body)) as server:
        cfg = make_cfg(tmp_path, server.url, sft=(3, 1, 1), dpo=(2, 1, 1), llm_batch_size=2, llm_concurrency=2,
                       llm_model="writer-a")
        meta = make_data(cfg)
    # 5 SFT prompts in requests of 2 (the last row of sft_train shares one with sft_val), 4 pairs in 2
    assert sorted(len(spec_blocks(b)) for b in server.chat_requests("stories")) == [1, 2, 2]
    assert [len(spec_blocks(b)) for b in server.chat_requests("pairs")] == [2, 2]
    assert len(server.chat_requests("health")) == 1
    assert meta["provider"] == "openai-compatible" and meta["openai_usage"] == usage(6)
    assert meta["llm"]["health_check"] == "ok" and meta["llm"]["llm_rows"] == 9
    assert meta["llm"]["template_rows"] == 0 and meta["llm"]["stopped"] is None
    assert meta["counts"] == {"sft_train": 3, "sft_val": 1, "sft_test": 1, "dpo_train": 2, "dpo_val": 1, "dpo_test": 1,
                              "dpo_test_hard": 1}  # the held-out generator's pairs, never sent to the LLM
    made, template = rows(cfg), story_rows(cfg)
    assert made["dpo_test_hard"] == template["dpo_test_hard"]  # the held-out pairs are not rewritten
    for name in FILES:  # the same prompts as the offline generator's, the answers from the model
        assert [r["prompt"] for r in made[name]] == [r["prompt"] for r in template[name]]
    for r in made["sft_train"] + made["sft_test"]:
        assert r["response"] == story("writer-a", title(r)) and r["model"] == "writer-a"
    for r in made["dpo_train"]:
        assert r["chosen"] == story("writer-a", title(r), "dark story")
        assert r["rejected"] == story("writer-a", title(r), "happy story")
        assert r["chosen_model"] == r["rejected_model"] == "writer-a"
    assert len(read_sft(f"{cfg.out}/sft_train.jsonl")) == 3  # the files pass the readers' validation
    assert len(read_preferences(f"{cfg.out}/dpo_train.jsonl")) == 2
    assert not (tmp_path / "data" / PARTIAL).exists()
    body = server.chat_requests("stories")[0]
    assert body["model"] == "writer-a" and body["response_format"] == {"type": "json_object"}
    assert body["temperature"] == 0.8 and body["max_tokens"] == 1800  # 900 per story asked for


def test_concurrency_keeps_that_many_requests_in_flight(tmp_path):
    barrier, lock, live = threading.Barrier(3, timeout=3), threading.Lock(), {"now": 0, "most": 0}

    def respond(body, n):
        if kind_of(body) == "health":
            return writer(body)
        with lock:
            live["now"] += 1
            live["most"] = max(live["most"], live["now"])
        try:
            if n <= 3:
                barrier.wait()  # the first three go on only when all three are in flight (3 s < the 5 s timeout)
            return writer(body)
        except threading.BrokenBarrierError:
            return Reply(status=400, content="fewer than 3 requests in flight")
        finally:
            with lock:
                live["now"] -= 1

    with ScriptedLLM(respond) as server:
        meta = make_data(make_cfg(tmp_path, server.url, sft=(6, 0, 0), llm_concurrency=3))
    assert meta["llm"]["llm_rows"] == 6 and live["most"] == 3 and meta["openai_usage"]["retries"] == 0


def test_429_then_success_is_retried(tmp_path):
    def respond(body, n):
        if n == 1:
            return Reply(status=429, content="slow down", headers={"Retry-After": "0"})
        return writer(body)

    with ScriptedLLM(respond) as server:
        meta = make_data(make_cfg(tmp_path, server.url, sft=(2, 0, 0)))
    assert meta["openai_usage"] == usage(4, retries=1, tokens_calls=3)  # the 429 reports no usage
    assert meta["llm"]["llm_rows"] == 2 and meta["llm"]["template_rows"] == 0
    assert [len(server.chat_requests(k)) for k in ("health", "stories")] == [1, 3]


def test_malformed_json_is_retried_at_once(tmp_path):
    def respond(body, n):
        return Reply(content='Here is the story: {"stories": [ oops') if n == 1 else writer(body)

    with ScriptedLLM(respond) as server:
        cfg = make_cfg(tmp_path, server.url, sft=(1, 0, 0))
        meta = make_data(cfg)
    assert meta["openai_usage"] == usage(3, retries=1)
    assert rows(cfg)["sft_train"][0]["model"] == "default"  # LLM_MODEL unset: the server's default model


def test_malformed_json_every_time_falls_back_to_the_template_row(tmp_path):
    def respond(body, n):
        return writer(body) if kind_of(body) == "health" else Reply(content="I cannot write that.")

    with ScriptedLLM(respond) as server, pytest.warns(UserWarning, match="unusable reply"):
        cfg = make_cfg(tmp_path, server.url, sft=(1, 0, 0), dpo=(1, 0, 0), llm_max_retries=1, llm_required=False)
        meta = make_data(cfg)
    assert meta["openai_usage"] == usage(5, failures=2, retries=2, fallbacks=2)
    template, made = story_rows(cfg), rows(cfg)
    assert made["sft_train"] == [{**template["sft_train"][0], "model": "template"}]
    assert made["dpo_train"] == [{**template["dpo_train"][0], "chosen_model": "template", "rejected_model": "template"}]


def test_a_story_too_short_counts_as_missing(tmp_path):
    def respond(body, n):
        if kind_of(body) == "health":
            return writer(body)
        ids = [i for i, _ in spec_blocks(body)]
        return Reply(content=json.dumps({"stories": [{"id": ids[0], "story": "ok"}] +
                                         [{"id": i, "story": story("m", "T")} for i in ids[1:]]}))

    with ScriptedLLM(respond) as server, pytest.warns(UserWarning, match="1 of 2 rows missing"):
        cfg = make_cfg(tmp_path, server.url, sft=(2, 0, 0), llm_batch_size=2)
        meta = make_data(cfg)
    assert [r["model"] for r in rows(cfg)["sft_train"]] == ["template", "default"]
    assert meta["llm"]["llm_rows"] == 1 and meta["llm"]["template_rows"] == 1


def test_dead_server_falls_back_to_the_templates(tmp_path):
    cfg = make_cfg(tmp_path, closed_port_url(), sft=(2, 1, 0), dpo=(1, 0, 0), llm_fallback="stop",
                   llm_required=False)
    with pytest.warns(UserWarning, match="not usable.*using the offline templates"):
        meta = make_data(cfg)
    assert meta["provider"] == "template" and meta["llm"]["health_check"].startswith("failed: ")
    assert "APIConnectionError" in meta["llm"]["health_check"]
    assert meta["openai_usage"] == usage(3, failures=1, retries=2, tokens_calls=0)  # 1 + 2 retries
    assert rows(cfg) == story_rows(cfg)  # exactly the offline data


def test_server_failing_after_the_health_check_template_policy(tmp_path):
    def respond(body, n):
        return writer(body) if kind_of(body) == "health" else Reply(status=500)

    with ScriptedLLM(respond) as server, pytest.warns(UserWarning, match="HTTP 500"):
        cfg = make_cfg(tmp_path, server.url, sft=(4, 0, 0), llm_max_retries=1, llm_max_consec_fails=2,
                       llm_required=False)
        meta = make_data(cfg)
    # health 1 + two requests of 2 attempts each; then 2 failures in a row end the calls
    assert len(server.requests) == 5
    assert meta["openai_usage"] == usage(5, failures=2, retries=2, fallbacks=4, tokens_calls=1)
    assert meta["llm"]["stopped"].startswith("2 failed requests in a row")
    assert [r["model"] for r in rows(cfg)["sft_train"]] == ["template"] * 4


def test_stop_policy_keeps_the_rows_made_and_a_rerun_resumes(tmp_path):
    def dying(body, n):
        return writer(body) if n < 2 else Reply(status=503)

    with ScriptedLLM(dying) as server, pytest.warns(UserWarning) as warned:
        cfg = make_cfg(tmp_path, server.url, sft=(3, 1, 0), llm_fallback="stop", llm_max_retries=0)
        meta = make_data(cfg)
    assert [str(w.message).split(":")[1].strip() for w in warned] == ["LLM request failed", "no more LLM requests"]
    assert meta["counts"]["sft_train"] == 1 and meta["counts"]["sft_val"] == 0
    assert meta["llm"]["missing_rows"] == 3 and meta["llm"]["stopped"].startswith("a request failed")
    first = rows(cfg)["sft_train"][0]
    partial = tmp_path / "data" / PARTIAL
    assert [json.loads(line)["id"] for line in partial.read_text().splitlines()] == [first["id"]]

    with ScriptedLLM(lambda body, n: writer(body)) as server:
        cfg = make_cfg(tmp_path, server.url, sft=(3, 1, 0), llm_fallback="stop", llm_max_retries=0)
        meta = make_data(cfg)
    assert meta["llm"]["resumed_rows"] == 1 and meta["llm"]["llm_rows"] == 4
    assert sum(len(spec_blocks(b)) for b in server.chat_requests("stories")) == 3  # only the missing rows
    assert rows(cfg)["sft_train"][0] == first and meta["counts"]["sft_train"] == 3
    assert not partial.exists()


def test_budget_by_calls(tmp_path):
    with ScriptedLLM(lambda body, n: writer(body)) as server, pytest.warns(UserWarning, match="LLM_MAX_CALLS=3"):
        cfg = make_cfg(tmp_path, server.url, sft=(4, 0, 0), llm_max_calls=3)
        meta = make_data(cfg)
    assert len(server.requests) == 3
    assert meta["openai_usage"] == usage(3, fallbacks=2)
    assert [r["model"] for r in rows(cfg)["sft_train"]] == ["default", "default", "template", "template"]


def test_budget_by_tokens(tmp_path):
    with ScriptedLLM(lambda body, n: writer(body)) as server, pytest.warns(UserWarning, match="LLM_MAX_TOTAL_TOKENS=70"):
        cfg = make_cfg(tmp_path, server.url, sft=(4, 0, 0), llm_max_total_tokens=70, llm_fallback="stop")
        meta = make_data(cfg)
    # 30 tokens (health) and 60 after the first story are under 70; 90 after the second is not
    assert len(server.requests) == 3 and meta["openai_usage"]["total_tokens"] == 90
    assert meta["counts"]["sft_train"] == 2 and meta["llm"]["stopped"].startswith("budget: ")


def test_the_key_is_sent_only_as_the_authorization_header(tmp_path, caplog, capsys):
    def leaky(body, n):  # a server that echoes the key in its error messages
        if kind_of(body) == "health":
            return writer(body)
        return Reply(status=400, content=f"invalid request for key {KEY}") if n == 1 else writer(body)

    caplog.set_level(logging.DEBUG)
    with ScriptedLLM(leaky) as server, pytest.warns(UserWarning) as warned:
        cfg = make_cfg(tmp_path, server.url, sft=(2, 0, 0), dpo=(1, 0, 0))
        make_data(cfg)
    assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in server.requests)
    assert not any(KEY in json.dumps(r["body"]) for r in server.requests)
    assert any("HTTP 400" in str(w.message) and "***" in str(w.message) for w in warned)
    texts = [str(w.message) for w in warned] + [caplog.text, *capsys.readouterr()]
    texts += [p.read_text() for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert len(texts) > 8 and not any(KEY in t for t in texts)


def test_every_configured_secret_is_redacted_whatever_its_length(tmp_path, monkeypatch, capsys):
    """A 3-character key and a base URL with a password, from the environment and from the
    config: a server that echoes them in its errors does not get them into the warnings, the
    output, dataset_meta.json or config.yaml; the key stays readable around them ('abcdef')."""
    monkeypatch.setenv("LLM_API_KEY", "abc")

    def leaky(body, n):
        if kind_of(body) == "health":
            return writer(body)
        if n == 1:
            return Reply(status=400, content="key abc rejected by http://user:s3cret@proxy/v1 (s3cret; abcdef)")
        return writer(body)

    with ScriptedLLM(leaky) as server, pytest.warns(UserWarning) as warned:
        url = server.url.replace("http://", "http://user:s3cret@")
        monkeypatch.setenv("LLM_BASE_URL", url)
        cfg = make_cfg(tmp_path, url, sft=(2, 0, 0))
        make_data(cfg)
    texts = [str(w.message) for w in warned] + list(capsys.readouterr())
    texts += [p.read_text() for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert any("key *** rejected by http://***@proxy/v1 (***; abcdef)" in t for t in texts), texts
    assert not any(re.search(r"\babc\b", t) or "s3cret" in t for t in texts)
    assert "http://***@127.0.0.1" in (tmp_path / "data" / "config.yaml").read_text()


def test_a_budget_spent_on_the_health_check_keeps_the_real_failure(tmp_path):
    """LLM_MAX_CALLS=2 and a dead server: both calls go to the health check's first attempt and
    its retry. The meta names the connection error, counts the failure, and says how many calls
    the health check took."""
    cfg = make_cfg(tmp_path, closed_port_url(), sft=(2, 0, 0), llm_max_calls=2, llm_required=False)
    with pytest.warns(UserWarning, match="not usable"):
        meta = make_data(cfg)
    check = meta["llm"]["health_check"]
    assert check.startswith("failed: LLM_MAX_CALLS=2 reached while retrying a failed request (")
    assert "APIConnectionError" in check and "APIConnectionError" in meta["llm"]["first_failure"]
    assert meta["llm"]["health_check_calls"] == 2
    assert meta["openai_usage"] == usage(2, failures=1, retries=1, tokens_calls=0)


def test_unusable_answers_of_a_small_teacher_say_why(tmp_path, capsys):
    """The answer shapes of a tiny model behind llama.cpp's server (tests/llm_server.py:
    small_teacher). 8 calls: the health check, then 4 attempts of the first request and 3 of
    the second, all unusable; every row comes from the templates. The first 5 reasons, with the
    start of each answer and the key redacted, are in the log and dataset_meta.json."""
    with ScriptedLLM(lambda body, n: small_teacher(body, n, KEY)) as server, pytest.warns(UserWarning):
        cfg = make_cfg(tmp_path, server.url, sft=(8, 0, 0), llm_batch_size=4, llm_max_calls=8, llm_max_retries=3,
                       llm_required=False)
        meta = make_data(cfg)
    assert len(server.requests) == 8
    assert (meta["llm"]["llm_rows"], meta["llm"]["template_rows"]) == (0, 8)
    noted = meta["llm"]["unusable_answers"]
    assert [n["reason"] for n in noted] == [
        "unusable reply: expected a list under 'stories', got an object with keys 'title', 'text'",
        "unusable reply: no usable story in the reply (id 1: not a story: 'Boo.')",
        "unusable reply: no JSON in the reply: '{\"stories\": [{\"id\": 1, \"story\": \"The night was long and the house' "
        "(the answer was cut off at max_tokens=3600; raise llm_max_output_tokens or lower llm_batch_size)",
        "unusable reply: expected a list under 'stories', got an object with keys 'title', 'text'",
        "unusable reply: no usable story in the reply (id 1: not a story: 'Boo.')",
    ]
    assert noted[0]["answer_start"] == json.dumps({"title": "The Door ***", "text": "It was dark."})
    assert meta["llm"]["first_failure"] == noted[0]["reason"]
    assert meta["llm"]["stopped"].startswith("budget: LLM_MAX_CALLS=8 reached while retrying a failed request")
    err = capsys.readouterr().err
    assert err.count("data: default: unusable reply: ") == 5 and "The Door ***" in err
    assert KEY not in err + json.dumps(meta)


# ---------------------------------------------------------------- judged pairs


def test_judged_pairs_keep_only_agreeing_verdicts(tmp_path):
    biased = {"on": False}

    def respond(body, n):
        if kind_of(body) == "judge" and biased["on"]:
            return Reply(content=json.dumps({"winner": "A", "reasoning": "first is best", "confidence": 9}))
        if kind_of(body) == "judge":
            a_first = "writer-a" in body["messages"][-1]["content"].split("Answer B:")[0].split("Answer A:")[1]
            return Reply(content=json.dumps({"winner": "A" if a_first else "B", "reasoning": "writer-a is eerier",
                                             "confidence": 8 if a_first else 5}))
        return writer(body)

    with ScriptedLLM(respond) as server:
        cfg = make_cfg(tmp_path, server.url, sft=(1, 0, 0), dpo=(3, 0, 0), judge=True,
                       answer_models="writer-a,writer-b,writer-c", judge_model="judge-1")
        meta = make_data(cfg)
        judged = rows(cfg)["dpo_train"]
        biased["on"] = True
        cfg2 = make_cfg(tmp_path / "biased", server.url, sft=(0, 0, 0), dpo=(2, 0, 0), judge=True,
                        answer_models="writer-a,writer-b", judge_model="judge-1")
        meta2 = make_data(cfg2)
    # the models answer in turn: (a, b), (b, c), (c, a); writer-b vs writer-c has no writer-a: the judge
    # then says B both times, which names different answers, so that pair is dropped
    assert [(r["chosen_model"], r["rejected_model"]) for r in judged] == [("writer-a", "writer-b"), ("writer-a", "writer-c")]
    for r in judged:
        assert r["chosen"] == story("writer-a", title(r)) and r["judgment_reasoning"] == "writer-a is eerier"
        assert r["confidence"] == 6.5  # (8 + 5) / 2
    assert meta["llm"]["judged_out"] == 1 and meta["counts"]["dpo_train"] == 2
    judge_bodies = [b for b in server.chat_requests("judge") if b["model"] == "judge-1"]
    assert len(judge_bodies) == 3 * 2 + 2 * 2  # both orders for every pair of both runs
    assert meta2["counts"]["dpo_train"] == 0 and meta2["llm"]["judged_out"] == 2  # position bias: all dropped
    # a health check per endpoint (the data model, three writers, the judge), one SFT request,
    # then 2 answers + 2 verdicts per pair
    assert meta["openai_usage"]["calls"] == 5 + 1 + 3 * 4
    kept = read_preferences(f"{cfg.out}/dpo_train.jsonl", min_confidence=DPOConfig().min_confidence)
    assert len(kept) == 2  # 6.5 >= the default 6
    assert read_preferences(f"{cfg.out}/dpo_train.jsonl", min_confidence=7) == []


# ---------------------------------------------------------------- the eval judge


def test_win_rate_both_orders_by_hand():
    """P1: the judge prefers the DPO text in both orders -> 1. P2: it always says A (position bias)
    -> (1 + 0) / 2 = 0.5, no agreement. P3: it prefers DPO again -> 1. Win rate (1 + 0.5 + 1) / 3."""
    def respond(body, n):
        if kind_of(body) == "health":
            return writer(body)
        text = body["messages"][-1]["content"]
        a = text.split("Answer A:\n", 1)[1].split("\n\nAnswer B:", 1)[0]
        winner = "A" if "Prompt:\nP2" in text or a.startswith("dpo") else "B"
        return Reply(content=json.dumps({"winner": winner, "reasoning": "r", "confidence": 7}))

    with ScriptedLLM(respond) as server:
        client = LLMClient(parse_endpoint(f"judge@{server.url}"), Limits(retry_base_seconds=0.01))
        result = win_rate(client, ["P1", "P2", "P3"], ["dpo one", "dpo two", "dpo three"],
                          ["sft one", "sft two", "sft three"])
    assert result == {"win_rate": round(2.5 / 3, 4), "prompts": 3, "agreement": round(2 / 3, 4), "errors": 0,
                      "judge_model": f"judge at {server.url} (openai-compatible)"}
    assert len(server.requests) == 6
