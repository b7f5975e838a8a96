"""`picoalign data` against `picoalign serve` (issue 7): our two components over real HTTP.

`picoalign serve` runs the tiny random chat model on 127.0.0.1 with an API key; the data layer
talks to it as provider `openai-compatible`, with its default `response_format: json_object`
(which the server must accept). The requests use temperature 0, so every answer is greedy and
the usage the data layer records can be computed exactly with `generate_full` on the same model.
The random model never writes JSON, so the outcomes are the documented failure policies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serving import running_server

from picoalign.cli import main
from picoalign.config import DataConfig, ServeConfig
from picoalign.data.llm import LLMClient
from picoalign.data.llm_requests import PAIRS_ASK, STORIES_ASK, _specs_message
from picoalign.data.llm_rows import PARTIAL
from picoalign.data.make import make_data
from picoalign.generation.batched import Sampling, generate_full
from picoalign.io import read_json
from picoalign.train.batching import render_prompt

SERVER_KEY = "serve-key-7c1d9e0b55aa"
WRONG_KEY = "wrong-key-41f0c2d8e6bb"
FILES = ("sft_train", "sft_val", "sft_test", "dpo_train", "dpo_val", "dpo_test")
# The request LLMClient.health_check sends (20 tokens at most).
HEALTH = [{"role": "system", "content": "You answer with JSON only."},
          {"role": "user", "content": 'Reply with exactly this JSON: {"ok": true}'}]
SIZES = dict(n_sft_train=2, n_sft_val=0, n_sft_test=0, n_dpo_train=1, n_dpo_val=0, n_dpo_test=0)


@pytest.fixture(scope="module")
def served(chat_model):
    cfg = ServeConfig(model=str(chat_model), name="tiny", device="cpu", dtype="fp32", api_key=SERVER_KEY,
                      max_new_tokens=16, max_tokens=64, log_level="warning")
    with running_server(cfg) as (url, _):
        yield url + "/v1"


def greedy(model, tokenizer, conversations: list[list[dict]], max_tokens: int) -> tuple[int, int, list[str]]:
    """(prompt tokens, completion tokens, answers) of one greedy answer to each conversation."""
    gens = generate_full(model, tokenizer, conversations, Sampling(max_tokens, greedy=True))
    assert all(g.prompt_tokens == len(render_prompt(tokenizer, c)) for g, c in zip(gens, conversations, strict=True))
    return sum(g.prompt_tokens for g in gens), sum(g.completion_tokens for g in gens), [g.text for g in gens]


def read_rows(folder: Path) -> dict[str, list[dict]]:
    return {name: [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
            for name in FILES}


def template_rows(tmp_path: Path) -> dict[str, list[dict]]:
    make_data(DataConfig(out=str(tmp_path / "offline"), provider="template", **SIZES))
    return read_rows(tmp_path / "offline")


def data_argv(out: Path, url: str) -> list[str]:
    sizes = [x for k, v in SIZES.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return ["data", "--out", str(out), "--provider", "openai-compatible", "--llm-base-url", url,
            "--llm-model", "tiny", "--llm-temperature", "0", "--llm-timeout", "60",
            "--llm-required", "false", *sizes]  # these tests read the template fallback policy


def written_text(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(folder.rglob("*")) if p.is_file())


@pytest.mark.parametrize("key", [SERVER_KEY, WRONG_KEY], ids=["right-key", "wrong-key"])
def test_cli_health_check_against_serve_then_templates(served, key, tmp_path, monkeypatch, capsys, recwarn,
                                                       tiny_llama, chat_tokenizer):
    monkeypatch.setenv("LLM_API_KEY", key)  # the variable the data layer reads for openai-compatible
    out = tmp_path / "data"
    assert main(data_argv(out, served)) == 0
    meta = read_json(out / "dataset_meta.json")
    assert meta["provider"] == "template" and meta["llm"]["requested_provider"] == "openai-compatible"
    usage = meta["openai_usage"]
    if key == SERVER_KEY:
        # Three answers reached us (with response_format sent: serve accepts it), none was JSON:
        # the health check's first try and its two retries.
        prompt, completion, (answer,) = greedy(tiny_llama, chat_tokenizer, [HEALTH], 20)
        assert usage == {"calls": 3, "prompt_tokens": 3 * prompt, "completion_tokens": 3 * completion,
                         "total_tokens": 3 * (prompt + completion), "failures": 1, "retries": 2, "fallbacks": 0}
        # ... and the reply quoted in the reason is the model's own greedy answer.
        quoted = " ".join(f"unusable reply: no JSON in the reply: {answer.strip()[:80]!r}".split())
        cut = (" (the answer was cut off at max_tokens=20; raise llm_max_output_tokens or lower llm_batch_size)"
               if completion == 20 else "")  # serve said finish_reason "length"
        assert meta["llm"]["health_check"] == f"failed: tiny at {served} (openai-compatible): {quoted}{cut}"
        assert meta["llm"]["unusable_answers"] == [{"reason": f"{quoted}{cut}", "answer_start": answer[:200]}] * 3
    else:
        # The server's 401 is final: one call, no retry, no tokens.
        assert usage == {"calls": 1, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                         "failures": 1, "retries": 0, "fallbacks": 0}
        assert "HTTP 401" in meta["llm"]["health_check"]
        assert "missing or wrong API key" in meta["llm"]["health_check"]
    # The documented policy for an unusable endpoint: exactly the offline template data set.
    assert read_rows(out) == template_rows(tmp_path)
    seen = capsys.readouterr()
    shown = seen.out + seen.err + "\n".join(str(w.message) for w in recwarn)
    assert "the LLM endpoint is not usable" in shown
    for secret in (SERVER_KEY, WRONG_KEY):
        assert secret not in written_text(tmp_path) and secret not in shown


@pytest.mark.parametrize("fallback", ["template", "stop"])
def test_row_requests_to_serve_follow_the_fallback_policy(served, fallback, tmp_path, monkeypatch, recwarn,
                                                          tiny_llama, chat_tokenizer):
    """The story and pair requests themselves: the random model cannot pass the health check
    (see above), so it is skipped here, and nothing else."""
    monkeypatch.setenv("LLM_API_KEY", SERVER_KEY)
    monkeypatch.setattr(LLMClient, "health_check", lambda self: None)
    cfg = DataConfig(out=str(tmp_path / "data"), provider="openai-compatible", llm_base_url=served,
                     llm_model="tiny", llm_temperature=0, llm_max_output_tokens=16, llm_max_retries=1, llm_batch_size=1,
                     llm_concurrency=1, llm_max_consec_fails=0, llm_fallback=fallback, llm_timeout=60,
                     llm_required=False, **SIZES)
    meta = make_data(cfg)
    offline = template_rows(tmp_path)
    made = read_rows(Path(cfg.out))
    # One request per row, in order (concurrency 1): two stories, then one pair; each tried twice.
    asks = [_specs_message(STORIES_ASK, [r["prompt"]]) for r in offline["sft_train"]]
    asks += [_specs_message(PAIRS_ASK, [r["prompt"]]) for r in offline["dpo_train"]]
    if fallback == "stop":
        asks = asks[:1]  # the first failed request ends the calls
    prompt, completion, _ = greedy(tiny_llama, chat_tokenizer, asks, 16)
    n = len(asks)
    assert meta["openai_usage"] == {
        "calls": 2 * n, "prompt_tokens": 2 * prompt, "completion_tokens": 2 * completion,
        "total_tokens": 2 * (prompt + completion), "failures": n, "retries": n,
        "fallbacks": 3 if fallback == "template" else 0}
    assert meta["provider"] == "openai-compatible" and meta["llm"]["health_check"] == "ok"
    assert meta["llm"]["llm_rows"] == 0
    if fallback == "template":
        assert (meta["llm"]["template_rows"], meta["llm"]["missing_rows"], meta["llm"]["stopped"]) == (3, 0, None)
        assert made["sft_train"] == [{**r, "model": "template"} for r in offline["sft_train"]]
        assert made["dpo_train"] == [{**r, "chosen_model": "template", "rejected_model": "template"}
                                     for r in offline["dpo_train"]]
        assert meta["counts"]["sft_train"] == 2 and meta["counts"]["dpo_train"] == 1
    else:
        assert (meta["llm"]["template_rows"], meta["llm"]["missing_rows"]) == (0, 3)
        assert meta["llm"]["stopped"].startswith("a request failed and llm_fallback=stop")
        assert made["sft_train"] == made["dpo_train"] == []  # only the rows made are kept: none
    assert not (Path(cfg.out) / PARTIAL).exists()  # no row came back, so none was saved
    assert SERVER_KEY not in written_text(tmp_path)
    assert SERVER_KEY not in "\n".join(str(w.message) for w in recwarn)
