"""What stands in front of `picoalign serve`: the Host check (DNS rebinding), the Origin check of a
keyless server, the warning of an exposed keyless server, and what the logs never show."""

from __future__ import annotations

import logging
import time

import httpx
import pytest
import torch
from serving import running_server

from picoalign.config import ServeConfig
from picoalign.serve.guard import HostNames

HELLO = [{"role": "user", "content": "Hello there."}]


@pytest.mark.parametrize(("bound", "allowed", "host", "ok"), [
    ("127.0.0.1", "", "127.0.0.1:8000", True),
    ("127.0.0.1", "", "localhost:8000", True),
    ("127.0.0.1", "", "[::1]:8000", True),
    ("127.0.0.1", "", "LOCALHOST.", True),
    ("127.0.0.1", "", "evil.example", False),  # DNS rebinding: the attacker's name resolved to 127.0.0.1
    ("127.0.0.1", "", "evil.example:8000", False),
    ("127.0.0.1", "", "127.0.0.1.evil.example", False),
    ("127.0.0.1", "", "", False),
    ("127.0.0.1", "", "[::1", False),
    ("127.0.0.1", "llm.example.org, other.example", "llm.example.org:443", True),
    ("127.0.0.1", "*", "anything.example", True),
    ("10.1.2.3", "", "10.1.2.3:8000", True),
    ("10.1.2.3", "", "10.1.2.4:8000", False),
    ("0.0.0.0", "", "192.168.1.5:8000", True),  # every interface: an address in digits needs no DNS
    ("0.0.0.0", "", "evil.example", False),
    ("127.0.0.1", "", "http://localhost:8000", True),  # an Origin
    ("127.0.0.1", "", "https://evil.example", False),
    ("127.0.0.1", "", "null", False),  # a sandboxed page's Origin
])
def test_host_names_the_server_answers_to(bound, allowed, host, ok):
    assert HostNames(bound, allowed).allowed(host) is ok


def is_openai_error(r: httpx.Response, status: int, code: str) -> bool:
    body = r.json()
    return (r.status_code == status and set(body) == {"error"}
            and set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code)


@pytest.fixture(scope="module")
def keyless(chat_model):
    cfg = ServeConfig(model=str(chat_model), name="tiny", device="cpu", dtype="fp32", max_new_tokens=2,
                      max_tokens=8, allowed_hosts="proxy.example")
    with running_server(cfg) as (url, app):
        yield url


def test_a_keyless_server_refuses_a_foreign_host_and_a_cross_site_origin(keyless):
    """Before the fix, a keyless server on 127.0.0.1 answered `Host: evil.example` with completions."""
    url, port = keyless, keyless.rsplit(":", 1)[1]
    chat = {"messages": HELLO, "max_tokens": 2}
    r = httpx.post(url + "/v1/chat/completions", json=chat, headers={"Host": "evil.example"})
    assert is_openai_error(r, 400, "invalid_host"), r.text
    assert "--allowed-hosts" in r.json()["error"]["message"]
    assert is_openai_error(httpx.get(url + "/", headers={"Host": f"evil.example:{port}"}), 400, "invalid_host")
    r = httpx.post(url + "/v1/chat/completions", json=chat, headers={"Origin": "https://evil.example"})
    assert is_openai_error(r, 403, "cross_origin_forbidden"), r.text
    # its own page, a proxy's name it was told, and a client that sends no Origin (curl, SDKs)
    for headers in ({"Origin": f"http://127.0.0.1:{port}"}, {"Host": "proxy.example"}, {}):
        assert httpx.post(url + "/v1/chat/completions", json=chat, headers=headers).status_code == 200, headers
    assert httpx.get(url + "/health", headers={"Host": f"localhost:{port}"}).status_code == 200


def test_with_a_key_a_cross_site_origin_still_needs_the_key(chat_model):
    cfg = ServeConfig(model=str(chat_model), device="cpu", dtype="fp32", api_key="k-1", max_new_tokens=2,
                      max_tokens=8)
    with running_server(cfg) as (url, _):
        origin = {"Origin": "https://app.example"}
        assert httpx.get(url + "/v1/models", headers=origin).status_code == 401
        assert httpx.get(url + "/v1/models", headers={**origin, "Authorization": "Bearer k-1"}).status_code == 200
        assert httpx.get(url + "/v1/models", headers={"Host": "evil.example", "Authorization": "Bearer k-1"}
                         ).status_code == 400


@pytest.mark.parametrize(("host", "key", "warned"), [("0.0.0.0", "", True), ("127.0.0.1", "", False),
                                                     ("::1", "", False), ("0.0.0.0", "k", False)])
def test_an_exposed_keyless_server_warns_at_start(monkeypatch, capsys, host, key, warned):
    import uvicorn

    from picoalign.serve.app import serve

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    serve(ServeConfig(host=host, api_key=key))
    assert ("without an API key" in capsys.readouterr().err) is warned


# ---------------------------------------------------------------- what the server's logs never show

KEY = "k3y-with/odd+chars"


@pytest.fixture(scope="module")
def keyed(chat_model):
    cfg = ServeConfig(model=str(chat_model), name="tiny", device="cpu", dtype="fp32", api_key=KEY,
                      max_new_tokens=2, max_tokens=64)
    with running_server(cfg) as (url, app):
        yield url, app


class Lines(logging.Handler):
    """Every record of the loggers a server writes to (uvicorn's, asyncio's, the root), formatted
    with its traceback as a log file would show it."""

    NAMES = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "asyncio")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record) -> None:
        self.lines.append(self.format(record))

    def __enter__(self):
        self.levels = {}
        for name in self.NAMES:
            log = logging.getLogger(name)
            self.levels[name] = log.level
            log.addHandler(self)
            log.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self)
            logging.getLogger(name).setLevel(self.levels[name])

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def test_an_abandoned_request_leaves_no_traceback_in_the_log(keyed, monkeypatch, capfd):
    """A client gives up on a non-streaming answer (each decode step slowed, end-of-turn masked):
    the server stops the generation; asyncio used to log `_GatheringFuture exception was never
    retrieved` with a CancelledError traceback."""
    from picoalign.generation.batched import end_ids

    url, app = keyed
    engine = app.state.handlers.engine
    kv, ends = engine.batcher.engine.kv, end_ids(engine.model, engine.tokenizer)

    def slow(real):  # each prefill and decode step of the decode engine 50 ms longer, no end-of-turn
        def forward(*args, **kwargs):
            out = real(*args, **kwargs)
            out[..., ends] = -torch.inf
            time.sleep(0.05)
            return out
        return forward

    monkeypatch.setattr(kv, "prefill", slow(kv.prefill))
    monkeypatch.setattr(kv, "decode", slow(kv.decode))
    with Lines() as log:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5,
                       json={"messages": HELLO, "max_tokens": 64, "temperature": 0})
        deadline = time.monotonic() + 10
        while engine.batcher.running and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # let the request's task finish and log
    monkeypatch.undo()
    out = log.text + capfd.readouterr().err
    assert engine.batcher.status()["running"] == 0  # the generation stopped
    assert "CancelledError" not in out and "Traceback" not in out and "never retrieved" not in out, out


def test_the_key_partly_percent_encoded_in_any_parameter_stays_out_of_the_access_log(keyed):
    url, _ = keyed
    forms = [KEY.replace("/", "%2F"), KEY.replace("k", "%6B", 1), KEY.replace("+", "%2B").replace("-", "%2d")]
    with Lines() as log:
        for form in forms:
            assert httpx.get(url + f"/v1/models?page={form}&n=1",
                             headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    server = [line for line in log.lines if line.startswith("uvicorn")]  # not httpx's own client log
    access = [line for line in server if line.startswith("uvicorn.access")]
    assert len(access) == 3 and all("page=***&n=1" in line for line in access), access
    assert not any(part in line for line in server for part in ("k3y", "%6B3y", "odd")), server
