"""The pairwise outside LLM judge of eval (eval/llm_judge.py): against the scripted stand-in
server (tests/llm_server.py) for hand-worked win rates, position bias, unparsed replies, budgets
and the end-to-end metrics; and against llama.cpp's own OpenAI-compatible server
(`llama_cpp.server`, the [llamacpp] extra) serving a GGUF the test exports from the tiny Llama."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from llm_server import Reply, ScriptedLLM, closed_port_url, kind_of, user_text, writer

from picoalign.config import EvalConfig
from picoalign.data.llm import Limits, LLMClient, Meter, parse_endpoint
from picoalign.eval.evaluate import judge_with_llm
from picoalign.eval.llm_judge import judge_models, judge_pair
from picoalign.use import llamacpp_check

SECRET = "sk-test-judge-0123456789"


def _answers(body: dict) -> tuple[str, str]:
    text = user_text(body)
    a = text.split("Answer A:\n", 1)[1].split("\n\nAnswer B:", 1)[0]
    b = text.split("Answer B:\n", 1)[1].split("\n\nWhich answer", 1)[0]
    return a, b


def judge_by_axis(body: dict, n: int) -> Reply:
    """Darkness: prefers the answer with "dark" in it. Coherence: always "A" (pure position bias).
    Spec: a reply that is not JSON."""
    if kind_of(body) == "health":
        return writer(body)
    text = user_text(body)
    a, _ = _answers(body)
    if "Which story is darker" in text:
        return Reply(content=json.dumps({"winner": "A" if "dark" in a else "B", "reasoning": "mood", "confidence": 8}))
    if "coherent" in text:
        return Reply(content=json.dumps({"winner": "A", "reasoning": "first", "confidence": 5}))
    return Reply(content="I think the first one, probably.")


def client_for(server, retries: int = 0, **budget) -> LLMClient:
    return LLMClient(parse_endpoint(f"judge@{server.url}"), Limits(max_retries=retries, retry_base_seconds=0.01),
                     Meter(**budget))


def test_win_rate_position_bias_and_unparsed_replies_by_hand():
    """Three prompts, answers a = [dark, plain, dark], b = [plain, dark, plain].
    Darkness, both orders agree with "dark": a scores 1, 0, 1 -> win rate 2/3, no position bias.
    Coherence, always "A": each prompt once each way -> 0.5 each, win rate 0.5, bias 3/3.
    Spec: nothing parses -> 0 verdicts, 3 unparsed (one per prompt: the first order fails)."""
    a, b = ["a dark one", "a plain one", "dark again"], ["plain", "so dark", "plain again"]
    with ScriptedLLM(judge_by_axis) as server:
        client = client_for(server)
        from picoalign.eval.llm_judge import AXIS_CRITERIA

        dark = judge_pair(client, ["P1", "P2", "P3"], a, b, AXIS_CRITERIA["darkness"])
        coherent = judge_pair(client, ["P1", "P2", "P3"], a, b, AXIS_CRITERIA["coherence"])
        spec = judge_pair(client, ["P1", "P2", "P3"], a, b, AXIS_CRITERIA["spec"])
    assert (dark["win_rate"], dark["n"], dark["position_bias"], dark["unparsed"]) == (round(2 / 3, 4), 3, 0.0, 0)
    assert dark["ci_low"] <= dark["win_rate"] <= dark["ci_high"]
    assert (coherent["win_rate"], coherent["position_bias"], coherent["ci_low"], coherent["ci_high"]) == (0.5, 1.0, 0.5, 0.5)
    assert (spec["n"], spec["win_rate"], spec["unparsed"]) == (0, None, 3)
    assert len(spec["first_reasons"]) == 3 and "unusable reply" in spec["first_reasons"][0]
    assert client.meter.snapshot()["calls"] == 6 + 6 + 3


def _samples(models=("base", "sft", "dpo")) -> list[dict]:
    texts = {"base": "a calm day", "sft": "a dark night", "dpo": "a darker night"}
    return [{"model": m, "id": f"p{i}", "decoding": "greedy", "sample": 0, "prompt": f"Prompt {i}", "text": texts[m]}
            for m in models for i in range(2)]


def test_every_pair_and_axis_with_usage_budget_and_no_secret(monkeypatch):
    """base/sft/dpo present: SFT vs base and DPO vs SFT (no RL). Darkness prefers the text with
    "dark": SFT over base 1.0; DPO vs SFT both contain "dark", so A wins each order: 0.5, bias 1."""
    monkeypatch.setenv("LLM_API_KEY", SECRET)
    with ScriptedLLM(judge_by_axis) as server:
        cfg = EvalConfig(judge_provider=f"judge@{server.url}", judge_axes="darkness,coherence", llm_max_retries=0)
        got = judge_with_llm(cfg, _samples(), "greedy")
        assert server.requests[1]["headers"]["authorization"] == f"Bearer {SECRET}"
    assert set(got["pairs"]) == {"sft_vs_base", "dpo_vs_sft"}
    assert got["pairs"]["sft_vs_base"]["darkness"]["win_rate"] == 1.0
    assert (got["pairs"]["dpo_vs_sft"]["darkness"]["win_rate"], got["pairs"]["dpo_vs_sft"]["darkness"]["position_bias"]) \
        == (0.5, 1.0)
    assert got["usage"]["calls"] == 1 + 2 * 2 * 2 * 2  # health + pairs x axes x prompts x orders
    assert got["budget"] == {"max_calls": 0, "max_total_tokens": 0}
    assert got["judge_model"] == f"judge at {server.url} (openai-compatible)"
    assert SECRET not in json.dumps(got)


def test_a_spent_budget_stops_the_judge_and_says_so():
    with ScriptedLLM(judge_by_axis) as server:
        cfg = EvalConfig(judge_provider=f"judge@{server.url}", judge_axes="darkness", llm_max_calls=4, llm_max_retries=0)
        got = judge_with_llm(cfg, _samples(), "greedy")
    assert got["stopped"].startswith("budget spent: LLM_MAX_CALLS=4 reached")
    assert got["usage"]["calls"] == 4 and len(server.requests) == 4


def test_an_endpoint_that_does_not_answer_is_reported_not_fatal():
    cfg = EvalConfig(judge_provider=f"judge@{closed_port_url()}", llm_max_retries=0)
    got = judge_with_llm(cfg, _samples(), "greedy")
    assert got["error"].startswith("judge at http://127.0.0.1:") and "Connection" in got["error"]


def test_unknown_judge_axis_is_refused_by_name():
    from picoalign.config import ConfigError

    with pytest.raises(ConfigError, match="judge_axes: unknown axis 'humour'"):
        EvalConfig(judge_axes="darkness,humour")


def test_only_the_first_sample_of_each_prompt_is_judged():
    rows = _samples(("sft", "dpo")) + [{**_samples(("dpo",))[0], "sample": 1, "text": "ignored"}]
    with ScriptedLLM(judge_by_axis) as server:
        got = judge_models(client_for(server), rows, "greedy", ["darkness"])
    assert got["pairs"]["dpo_vs_sft"]["darkness"]["n"] == 2
    assert not any("ignored" in user_text(r["body"]) for r in server.requests)


# ---------------------------------------------------------------- llama.cpp's own server

needs_server = pytest.mark.skipif(
    not llamacpp_check.available() or not __import__("importlib").util.find_spec("sse_starlette"),
    reason="llama-cpp-python[server] is not installed (pip install 'picoalign[llamacpp]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llamacpp_server(chat_model, tmp_path_factory):
    """llama_cpp.server on 127.0.0.1 serving the tiny Llama exported to GGUF (f16) by picoalign."""
    from picoalign.config import ExportConfig
    from picoalign.use.export import export

    root = tmp_path_factory.mktemp("judge_gguf")
    export(ExportConfig(model=str(chat_model), out=str(root / "gguf"), format="gguf", gguf_type="f16"))
    gguf = next((root / "gguf").glob("*.gguf"))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--n_threads", "1", "--chat_format", "chatml"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"llama_cpp.server exited: {proc.stderr.read()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    proc.stderr.close()


@needs_server
def test_llamacpp_server_replies_are_counted_with_usage_and_reasons(llamacpp_server):
    """A random tiny model under llama.cpp's JSON grammar writes JSON, not a verdict: the health
    check fails with the reason (so eval reports the judge skipped), and judging directly counts
    every prompt's reply as unparsed, with the server's own token usage recorded."""
    cfg = EvalConfig(judge_provider=f"tiny@{llamacpp_server}", judge_axes="darkness", llm_max_retries=0)
    skipped = judge_with_llm(cfg, _samples(("sft", "dpo")), "greedy")
    assert "unusable reply" in skipped["error"] or "winner" in skipped["error"] or "expected" in skipped["error"]

    client = LLMClient(parse_endpoint(f"tiny@{llamacpp_server}"), Limits(max_retries=0, temperature=0.0,
                                                                         timeout=120), Meter())
    got = judge_models(client, _samples(("sft", "dpo")), "greedy", ["darkness"])
    r = got["pairs"]["dpo_vs_sft"]["darkness"]
    assert r["n"] + r["unparsed"] == 2 and r["unparsed"] == 2 and r["first_reasons"]
    usage = client.meter.snapshot()
    assert usage["calls"] == 2 and usage["failures"] == 2
    assert usage["prompt_tokens"] > 100 and usage["completion_tokens"] > 0  # counted from llama.cpp's usage
    assert client.meter.problems()["unusable_answers"][0]["reason"].startswith("unusable reply")
