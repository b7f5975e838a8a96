"""`picoalign serve` over real HTTP: the `openai` client and httpx against uvicorn on 127.0.0.1.

One server per module (the tiny chat model, an API key, small limits). Answers are greedy, so
each can be compared with `generate_full` run directly on the same model: the API must return
exactly that text and count exactly those tokens, streamed or not.
"""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest
import torch
from serving import running_server

from picoalign.config import ServeConfig
from picoalign.generation.batched import Sampling, generate_full
from picoalign.train.batching import render_prompt

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Hello there."}]


@pytest.fixture(scope="module")
def server(chat_model):
    cfg = ServeConfig(model=str(chat_model), name="tiny", device="cpu", dtype="fp32", api_key=KEY,
                      max_new_tokens=16, max_tokens=64, max_prompt_chars=2000, max_body_bytes=4096,
                      queue_size=1, max_batch=2)
    with running_server(cfg) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def greedy(model, tokenizer, prompts, n: int, raw: bool = False, stop=()):
    return generate_full(model, tokenizer, prompts, Sampling(n, greedy=True, stop=tuple(stop)), raw=raw)


def test_server_binds_loopback_by_default():
    assert ServeConfig().host == "127.0.0.1"


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("max_batch", 0, "max_batch must be >= 1, got 0"),
    ("deadline_s", -1.0, "deadline_s must be >= 0 (0 = no limit), got -1.0"),
])
def test_batch_settings_are_checked_at_load(setting, value, message):
    from picoalign.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        ServeConfig(**{setting: value})


def test_health_and_models(server, client):
    url, _ = server
    health = httpx.get(url + "/health").json()  # no key needed
    assert health == {"status": "ok", "model": "tiny", "queue": {"running": 0, "waiting": 0, "max_batch": 2,
                                                                 "queue_size": 1, "tokens_per_s": 0.0}}
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_completion_equals_direct_generation(client, tiny_llama, chat_tokenizer):
    (ref,) = greedy(tiny_llama, chat_tokenizer, [HELLO], 24)
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(render_prompt(chat_tokenizer, HELLO)) == ref.prompt_tokens
    assert (r.usage.completion_tokens, r.usage.total_tokens) == (ref.completion_tokens,
                                                                 ref.prompt_tokens + ref.completion_tokens)


def test_chat_completion_streams_the_same_answer_in_pieces(client, tiny_llama, chat_tokenizer):
    (ref,) = greedy(tiny_llama, chat_tokenizer, [HELLO], 24)
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"  # as OpenAI's streams begin
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == ref.text
    assert len(pieces) >= 3  # streamed word by word, not sent at the end
    assert chunks[-2].choices[0].finish_reason == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.completion_tokens
    assert chunks[-1].usage.prompt_tokens == ref.prompt_tokens


def test_conversation_and_system_message_reach_the_template(client, tiny_llama, chat_tokenizer):
    messages = [{"role": "system", "content": "You write horror."}, *HELLO,
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "A story, please."}]
    (ref,) = greedy(tiny_llama, chat_tokenizer, [messages], 12)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(render_prompt(chat_tokenizer, messages))


def test_completions_batch_and_stream_are_raw_text(client, tiny_llama, chat_tokenizer):
    prompts = ["Once upon a time", "The door creaked open and"]
    refs = greedy(tiny_llama, chat_tokenizer, prompts, 10, raw=True)
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=10, temperature=0)
    assert [c.text for c in r.choices] == [x.text for x in refs] and [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == sum(len(chat_tokenizer(p)["input_ids"]) for p in prompts)
    streamed = client.completions.create(model="tiny", prompt=prompts[1], max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == refs[1].text


def test_stop_string_cuts_the_answer_streamed_or_not(client, tiny_llama, chat_tokenizer):
    (ref,) = greedy(tiny_llama, chat_tokenizer, [HELLO], 24)
    stop = re.search(r" [a-z]{2,}", ref.text[4:]).group()  # a word from the middle of the greedy answer
    expected = ref.text[: ref.text.find(stop)]
    assert stop and 0 < len(expected) < len(ref.text)
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0, stop=[stop])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected, "stop")
    assert r.usage.completion_tokens < ref.completion_tokens
    chunks = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0,
                                            stop=stop, stream=True)
    chunks = list(chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_is_seeded_per_request(client):
    kw = dict(model="tiny", messages=HELLO, max_tokens=12, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    others = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (8, 9, 10)}
    assert a == b and others - {a}


def test_generate_endpoint_keeps_the_original_fields(server, tiny_llama, chat_tokenizer):
    url, _ = server
    (ref,) = greedy(tiny_llama, chat_tokenizer, ["Hello there."], 8)
    body = httpx.post(url + "/v1/generate", headers=AUTH,
                      json={"prompt": "Hello there.", "max_new_tokens": 8, "greedy": True}).json()
    assert body == {"output": ref.text, "model": "tiny", "finish_reason": ref.finish_reason,
                    "usage": {"prompt_tokens": ref.prompt_tokens, "completion_tokens": ref.completion_tokens,
                              "total_tokens": ref.prompt_tokens + ref.completion_tokens}}
    (raw,) = greedy(tiny_llama, chat_tokenizer, ["Hello there."], 8, raw=True)
    body = httpx.post(url + "/v1/generate", headers=AUTH,
                      json={"prompt": "Hello there.", "max_new_tokens": 8, "temperature": 0, "raw": True}).json()
    assert body["output"] == raw.text and body["usage"]["prompt_tokens"] == raw.prompt_tokens


# ---------------------------------------------------------------- errors


def test_a_missing_or_wrong_key_is_refused(server):
    url, _ = server
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url + "/v1/generate", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models").status_code == 401
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=HELLO)
    assert httpx.get(url + "/").status_code == 200  # the page itself is public; it asks for the key


def test_oversize_requests_are_refused(server, client):
    url, _ = server
    big = {"prompt": "x" * 5000}
    r = httpx.post(url + "/v1/generate", json=big, headers=AUTH)  # Content-Length says it
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
    chunked = httpx.post(url + "/v1/generate", headers={**AUTH, "Content-Type": "application/json"},
                         content=iter([b'{"prompt": "', b"x" * 5000, b'"}']))  # no Content-Length
    assert chunked.status_code == 413
    with pytest.raises(openai.BadRequestError, match="above this server's limit of 64"):
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="2001 characters; this server takes at most 2000"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "y" * 2001}])


@pytest.mark.parametrize(("body", "message"), [
    (b'{"prompt": ', "not valid JSON: Expecting value at character 11"),
    (b"[1, 2]", "not a JSON object"),
    (b"", "the request body is empty"),
    (b'{"prompt": "x", "max_new_tokens": "many"}', "field 'max_new_tokens': Input should be a valid integer"),
    (b'{"prompt": "x", "max_new_token": 5}', "field 'max_new_token': Extra inputs are not permitted"),
    (b'{"prompt": ""}', "field 'prompt': String should have at least 1 character"),
    (b'{"prompt": "x", "top_p": 0}', "field 'top_p': Input should be greater than 0"),
])
def test_bad_json_and_bad_fields_get_a_400_that_says_why(server, body, message):
    url, _ = server
    r = httpx.post(url + "/v1/generate", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert message in r.json()["error"]["message"]


def test_bad_chat_and_completion_fields(server):
    url, _ = server
    cases = [({"messages": [{"role": "robot", "content": "x"}]}, "field 'messages.0.role'"),
             ({"messages": []}, "field 'messages': List should have at least 1 item"),
             ({"messages": HELLO, "n": 2}, "field 'n'"),
             ({"messages": HELLO, "stop": list("abcde")}, "at most 4 stop strings")]
    for body, message in cases:
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH)
        assert r.status_code == 400 and message in r.json()["error"]["message"], body
    for prompt, message in ((["x"] * 33, "a list of 1 to 32"), (["y" * 1000] * 3, "3000 characters"), ([], "1 to 32")):
        r = httpx.post(url + "/v1/completions", json={"prompt": prompt}, headers=AUTH)
        assert r.status_code == 400 and message in r.json()["error"]["message"], message


def test_a_full_queue_answers_503_at_once(server, monkeypatch):
    """Hold the batcher still (max_batch=2, queue_size=1): three requests may wait, the fourth
    gets a 503 with Retry-After without waiting; once the batcher moves the three are answered."""
    url, app = server
    batcher = app.state.handlers.engine.batcher
    real_step, go = batcher.step, threading.Event()
    monkeypatch.setattr(batcher, "step", lambda: (go.wait(), real_step()))
    answers: list = []

    def ask():
        answers.append(httpx.post(url + "/v1/generate", headers=AUTH, timeout=60,
                                  json={"prompt": "Hello there.", "max_new_tokens": 4}))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while batcher.status()["waiting"] < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    queue = httpx.get(url + "/health").json()["queue"]
    assert (queue["running"], queue["waiting"]) == (0, 3)
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/generate", headers=AUTH, json={"prompt": "x", "max_new_tokens": 4})
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
    assert r.headers["retry-after"] == "1" and time.monotonic() - t0 < 5
    assert answers == []  # still waiting for the model
    go.set()
    for thread in threads:
        thread.join(timeout=60)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert batcher.status()["waiting"] == batcher.status()["running"] == 0


def test_dtype_setting_reaches_the_served_model(chat_model):
    """bf16, not the loader's fp32: a server that ignored `dtype` would serve fp32 and fail here."""
    cfg = ServeConfig(model=str(chat_model), device="cpu", dtype="bf16", max_new_tokens=4)
    with running_server(cfg) as (_, app):
        assert {p.dtype for p in app.state.handlers.engine.model.parameters()} == {torch.bfloat16}


@pytest.mark.slow
def test_the_builtin_model_answers_and_stops_at_end_of_turn():
    """The real SmolLM2-135M-Instruct behind the API: a short greedy answer that ends by itself."""
    cfg = ServeConfig(device="cpu", dtype="fp32", max_new_tokens=48)
    with running_server(cfg) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="builtin", temperature=0, max_tokens=48,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 48


# ---------------------------------------------------------------- hostile or careless requests


def is_openai_error(r: httpx.Response, status: int, type_: str = "invalid_request_error") -> bool:
    body = r.json()
    return (r.status_code == status and r.headers["content-type"] == "application/json"
            and set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
            and body["error"]["type"] == type_ and bool(body["error"]["message"]))


LONE_SURROGATE = '"\\ud800"'  # valid JSON, but no UTF-8 text: the tokenizer cannot take it


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi"}], "seed": 9223372036854775808}', "seed"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi"}], "seed": -9223372036854775809}', "seed"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e-45}', "temperature"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e-45, '
                             '"stream": true}', "temperature"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": ' + LONE_SURROGATE + '}]}',
     "messages.0.content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi"}], "stop": [' + LONE_SURROGATE + ']}',
     "stop"),
    ("/v1/completions", '{"prompt": ' + LONE_SURROGATE + ', "stream": true}', "prompt"),
    ("/v1/generate", '{"prompt": ' + LONE_SURROGATE + '}', "prompt"),
    ("/v1/generate", '{"prompt": "Hi", "seed": 18446744073709551616}', "seed"),
])
def test_values_the_schema_used_to_allow_get_a_400(server, path, body, param):
    """Each of these crashed the handler with a plain-text 500 (or, streaming, a 200 and then an
    error event): an out-of-range seed, a temperature so small the softmax overflows, a lone
    UTF-16 surrogate. Now a 400 in OpenAI's error shape naming the field, before any generation."""
    url, _ = server
    r = httpx.post(url + path, content=body.encode(), headers={**AUTH, "Content-Type": "application/json"})
    assert is_openai_error(r, 400), (r.status_code, r.text)
    assert r.json()["error"]["param"].startswith(param)


def test_the_smallest_temperatures_allowed_still_sample(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, temperature=0.01, seed=2**63 - 1)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_failure_inside_a_handler_is_a_json_500(server, monkeypatch):
    """Whatever slips past the checks (here the model itself fails) is answered in the error shape
    OpenAI clients read, streaming or not, and the server goes on serving."""
    url, app = server
    engine = app.state.handlers.engine

    def broken(*args, **kwargs):
        raise RuntimeError("the model fell over")

    monkeypatch.setattr(engine, "encode", broken)
    for stream in (False, True):
        r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={"messages": HELLO, "stream": stream})
        assert is_openai_error(r, 500, "server_error"), r.text
        assert "RuntimeError" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert httpx.post(url + "/v1/chat/completions", headers=AUTH, json={"messages": HELLO, "max_tokens": 2}).status_code == 200
    assert (engine.batcher.status()["running"], engine.batcher.status()["waiting"]) == (0, 0)


def test_a_client_that_leaves_stops_its_non_streaming_generation(server, monkeypatch):
    """A client gives up after 1 s on a 64-token answer that takes over 3 s (each decode step
    made to last 50 ms more, end-of-turn tokens masked so the answer cannot end by itself): the
    generation stops within a few steps of the disconnect instead of running to max_tokens
    (at most 20 steps fit in the second before, and about as many in the second after)."""
    from picoalign.generation.batched import end_ids

    url, app = server
    engine = app.state.handlers.engine
    steps = slowed(engine, monkeypatch, 0.05, end_ids(engine.model, engine.tokenizer))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=1.0,
                   json={"messages": HELLO, "max_tokens": 64, "temperature": 0})
    left = time.monotonic()
    deadline = left + 10
    while engine.batcher.running and time.monotonic() < deadline:
        time.sleep(0.02)
    monkeypatch.undo()
    assert (engine.batcher.status()["running"], engine.batcher.status()["waiting"]) == (0, 0)
    assert 2 <= len(steps) < 45, len(steps)
    assert steps[-1] - left < 1.0  # the last step began within a second of the disconnect


def test_a_key_in_the_query_string_stays_out_of_the_access_log(server):
    """`?api_key=...` is refused (the key goes in the header) and uvicorn's access log line shows
    the path without it."""
    import logging

    url, _ = server
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    access = logging.getLogger("uvicorn.access")
    handler, level = Keep(), access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        r = httpx.get(url + f"/v1/models?api_key={KEY}&limit=2")
        r2 = httpx.get(url + f"/v1/models?Token={KEY}", headers=AUTH)
        r3 = httpx.get(url + f"/v1/models?x={KEY}", headers=AUTH)
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    assert r.status_code == 401 and r2.status_code == r3.status_code == 200
    assert len(lines) == 3 and not any(KEY in line for line in lines), lines
    assert "/v1/models?api_key=***&limit=2" in lines[0] and "Token=***" in lines[1] and "x=***" in lines[2]


def test_health_shows_the_models_name_and_its_path_only_to_the_key(chat_model):
    """No `name` set: the API calls the model by its folder's name; /health tells its path only
    to a request that carries the key (none set: to nobody)."""
    for key in (KEY, ""):
        cfg = ServeConfig(model=str(chat_model), device="cpu", dtype="fp32", api_key=key, max_new_tokens=4,
                          max_tokens=8)
        with running_server(cfg) as (url, _):
            health = httpx.get(url + "/health").json()
            given = httpx.get(url + "/health", headers=AUTH).json()
            models = httpx.get(url + "/v1/models", headers=AUTH).json()
        assert health["model"] == given["model"] == chat_model.name == models["data"][0]["id"]
        assert str(chat_model) not in json.dumps(health)
        assert given.get("model_path") == (str(chat_model) if key else None)


# ---------------------------------------------------------------- continuous batching and log-probs


def slowed(served, monkeypatch, seconds: float, masked: list[int] = ()) -> list[float]:
    """Make each forward of the served model's decode engine (a prompt chunk or a decode step)
    last `seconds` longer (and give the `masked` tokens no chance, e.g. end-of-turn so that an
    answer cannot end by itself), so that requests overlap in time; returns the list of the
    steps' start times."""
    kv, steps = served.batcher.engine.kv, []

    def slow(real):
        def forward(*args, **kwargs):
            out = real(*args, **kwargs)
            if masked:
                out[..., list(masked)] = -torch.inf
            steps.append(time.monotonic())
            time.sleep(seconds)
            return out
        return forward

    monkeypatch.setattr(kv, "prefill", slow(kv.prefill))
    monkeypatch.setattr(kv, "decode", slow(kv.decode))
    return steps


def test_concurrent_requests_run_as_one_batch_and_answer_as_alone(server, client, tiny_llama, chat_tokenizer,
                                                                   monkeypatch):
    """Three chat requests at once (max_batch=2): two decode together while the third waits,
    then joins as soon as a row is free; each answer equals the greedy answer alone."""
    url, app = server
    prompts = [[{"role": "user", "content": c}] for c in ("Hello there.", "What is the capital of France?",
                                                         "A story, please.")]
    lengths = [6, 16, 10]
    refs = [greedy(tiny_llama, chat_tokenizer, [p], n)[0] for p, n in zip(prompts, lengths)]
    slowed(app.state.handlers.engine, monkeypatch, 0.03)
    answers, seen = {}, []

    def ask(i):
        answers[i] = client.chat.completions.create(model="tiny", messages=prompts[i], max_tokens=lengths[i],
                                                    temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        queue = httpx.get(url + "/health").json()["queue"]
        seen.append((queue["running"], queue["waiting"]))
        time.sleep(0.01)
    assert max(r for r, _ in seen) == 2 and max(w for _, w in seen) >= 1  # batched, bounded, queued
    for i, ref in enumerate(refs):
        assert answers[i].choices[0].message.content == ref.text
        assert answers[i].usage.completion_tokens == ref.completion_tokens
    assert httpx.get(url + "/health").json()["queue"]["tokens_per_s"] > 0


def test_a_stream_whose_client_leaves_frees_its_row(server, monkeypatch):
    """A streaming client reads two pieces of a 60-token answer and closes the connection: its
    row leaves the batch within a few steps, long before the answer would have ended."""
    from picoalign.generation.batched import end_ids

    url, app = server
    engine = app.state.handlers.engine
    steps = slowed(engine, monkeypatch, 0.03, end_ids(engine.model, engine.tokenizer))
    body = {"messages": HELLO, "max_tokens": 60, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH, json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    left = time.monotonic()
    assert any('"content"' in line for line in got)
    while engine.batcher.running and time.monotonic() < left + 10:
        time.sleep(0.02)
    assert engine.batcher.running == [] and len(steps) < 40, len(steps)
    assert steps[-1] - left < 1.0


def test_a_request_past_the_deadline_ends_with_finish_reason_deadline(server, client, monkeypatch):
    """A 60-token answer at 50 ms a step (it cannot end by itself) against a 0.4 s deadline."""
    from picoalign.generation.batched import end_ids

    url, app = server
    engine = app.state.handlers.engine
    slowed(engine, monkeypatch, 0.05, end_ids(engine.model, engine.tokenizer))
    monkeypatch.setattr(app.state.handlers.cfg, "deadline_s", 0.4)
    t0 = time.monotonic()
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=60, temperature=0)
    assert r.choices[0].finish_reason == "deadline" and 2 <= r.usage.completion_tokens < 20
    assert time.monotonic() - t0 < 2


def model_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def greedy_path(model, ids: list[int], n: int) -> list[int]:
    """`ids` and the `n` tokens greedy decoding adds, by argmax over full forwards (no cache)."""
    path = list(ids)
    for _ in range(n):
        path.append(int(model_logprobs(model, path)[-1].argmax()))
    return path


def test_echo_gives_the_prompts_logprobs_as_lm_eval_reads_them(client, tiny_llama, chat_tokenizer):
    """lm-evaluation-harness's local-completions request (token ids, max_tokens 1, logprobs 1,
    echo) and its reading of the answer: token_logprobs[ctxlen:-1] is the continuation's
    log-likelihood, equal to the model's own; top_logprobs says whether it is the greedy one."""
    context, continuation = "Once upon a time", " there was a"
    ctx = chat_tokenizer(context)["input_ids"]
    full = chat_tokenizer(context + continuation)["input_ids"]
    assert full[: len(ctx)] == ctx
    logp = model_logprobs(tiny_llama, full)
    r = client.completions.create(model="tiny", prompt=[full, ctx], max_tokens=1, logprobs=1, echo=True,
                                  temperature=0, seed=1234)
    choice = sorted(r.choices, key=lambda c: c.index)[0]
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(full) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = [float(logp[i - 1, full[i]]) for i in range(1, len(full))]
    assert lp.token_logprobs[1:len(full)] == pytest.approx(expected, abs=1e-5)
    assert sum(lp.token_logprobs[len(ctx):-1]) == pytest.approx(sum(expected[len(ctx) - 1:]), abs=1e-4)
    greedy_here = [int(logp[i - 1].argmax()) == full[i] for i in range(len(ctx), len(full))]
    lm_eval_greedy = [tok == max(top.values()) for tok, top in zip(lp.token_logprobs[len(ctx):-1],
                                                                   lp.top_logprobs[len(ctx):-1])]
    assert lm_eval_greedy == greedy_here
    assert lp.tokens == [chat_tokenizer.decode([t]) for t in full] + [lp.tokens[-1]]
    assert choice.text.startswith(context + continuation) and lp.text_offset[:2] == [0, len(lp.tokens[0])]
    scored = client.completions.create(model="tiny", prompt=context, max_tokens=0, logprobs=0, echo=True)
    only = scored.choices[0]
    assert only.text == context and only.finish_reason == "length" and scored.usage.completion_tokens == 0
    assert only.logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:len(ctx)], abs=1e-5)


def test_answer_logprobs_of_completions_and_chat_are_the_models_own(client, tiny_llama, chat_tokenizer):
    prompt = "The door creaked open and"
    ids = chat_tokenizer(prompt)["input_ids"]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, logprobs=3, temperature=0)
    lp = r.choices[0].logprobs
    path = greedy_path(tiny_llama, ids, 5)
    logp = model_logprobs(tiny_llama, path)
    assert lp.tokens == [chat_tokenizer.decode([t]) for t in path[len(ids):]]
    assert lp.text_offset[0] == len(prompt) and lp.text_offset[1] == len(prompt) + len(lp.tokens[0])
    for n, (token_lp, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
        assert token_lp == pytest.approx(float(logp[len(ids) - 1 + n, path[len(ids) + n]]), abs=1e-5)
        best = logp[len(ids) - 1 + n].topk(3)
        expected: dict = {}
        for t, v in zip(best.indices.tolist(), best.values.tolist()):
            expected.setdefault(chat_tokenizer.decode([t]), v)  # the likelier of two that read the same
        assert top == pytest.approx(expected, abs=1e-5) and max(top.values()) == token_lp  # greedy: the top one
    chat = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    ids = render_prompt(chat_tokenizer, HELLO)
    path = greedy_path(tiny_llama, ids, len(content))
    logp = model_logprobs(tiny_llama, path)
    assert [t.token for t in content] == [chat_tokenizer.decode([t]) for t in path[len(ids):]]
    assert [t.logprob for t in content] == pytest.approx(
        [float(logp[len(ids) - 1 + n, t]) for n, t in enumerate(path[len(ids):])], abs=1e-5)
    assert [len(t.top_logprobs) for t in content] == [2] * len(content)
    assert content[0].top_logprobs[0].logprob == content[0].logprob and bytes(content[0].bytes).decode() == content[0].token


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": [5, 10**9]}, "prompt"),
    ({"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "Hi", "echo": True, "stream": True}, "stream"),
])
def test_bad_logprob_requests_get_a_400(server, body, param):
    url, _ = server
    r = httpx.post(url + "/v1/completions", headers=AUTH, json=body)
    assert is_openai_error(r, 400) and r.json()["error"]["param"] == param, r.text


def test_the_load_benchmark_counts_answers_tokens_and_refusals(server, monkeypatch):
    """bench/serve_load.py's round against this server (max_batch 2, queue 1, each step slowed
    so that all five requests arrive before any ends): three answered with 4 tokens each, two
    refused with a 503."""
    import asyncio
    import sys
    from pathlib import Path

    from picoalign.generation.batched import end_ids

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import serve_load

    url, app = server
    engine = app.state.handlers.engine
    slowed(engine, monkeypatch, 0.1, end_ids(engine.model, engine.tokenizer))
    result = asyncio.run(serve_load.load_round(url, 5, 4, api_key=KEY))
    assert (result["refused"], result["tokens"], len(result["latencies"])) == (2, 12, 3)
    summary = serve_load.summarise([result])
    assert summary["tokens_per_s"] == round(12 / result["wall_s"], 2) and summary["p95_s"] >= summary["p50_s"] > 0
    assert "serve_load" in sys.modules
