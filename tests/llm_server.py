"""A scripted OpenAI-compatible server on 127.0.0.1 for the LLM tests (http.server in a thread).

    with ScriptedLLM(responder) as server:        # responder(request, n) -> Reply
        ... LLM_BASE_URL=server.url ...
    server.requests                               # [{"headers": {lowercase: ...}, "body": {...}}, ...]

`n` counts every POST to /v1/chat/completions from 0, the health check included. `writer` is a
well-behaved model: it answers the health check, the story and pair requests of
data/llm_requests.py (one item per `### id N` block) and, as a judge, prefers the answer that
contains `prefer`, with the confidence given. `small_teacher` answers as a tiny model behind
llama.cpp's OpenAI-compatible server does: valid JSON (its grammar for `json_object`) of the
wrong shape, or cut off at max_tokens.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    status: int = 200
    content: str = ""  # the assistant's message
    usage: tuple[int, int] | None = (10, 20)  # prompt, completion tokens (total = the sum)
    headers: dict = field(default_factory=dict)
    finish_reason: str = "stop"  # "length": the answer was cut off at max_tokens


class ScriptedLLM:
    def __init__(self, responder) -> None:
        self.responder = responder
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with outer._lock:
                    n = len(outer.requests)
                    outer.requests.append({"path": self.path, "body": body,
                                           "headers": {k.lower(): v for k, v in self.headers.items()}})
                reply = outer.responder(body, n)
                if reply.status == 200:
                    payload = {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0,
                               "model": body.get("model", ""),
                               "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                                            "message": {"role": "assistant", "content": reply.content}}]}
                    if reply.usage:
                        p, c = reply.usage
                        payload["usage"] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
                else:
                    payload = {"error": {"message": reply.content or "scripted error", "type": "server_error"}}
                data = json.dumps(payload).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep the test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> ScriptedLLM:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def chat_requests(self, kind: str) -> list[dict]:
        """The recorded request bodies of one kind: health, stories, pairs or judge."""
        return [r["body"] for r in self.requests if kind_of(r["body"]) == kind]


def closed_port_url() -> str:
    """The URL of a port nothing listens on (a dead server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def user_text(body: dict) -> str:
    return body["messages"][-1]["content"]


def kind_of(body: dict) -> str:
    text = user_text(body)
    if '{"ok": true}' in text:
        return "health"
    if "Compare two answers" in text:
        return "judge"
    return "pairs" if '"pairs"' in text else "stories"


def spec_blocks(body: dict) -> list[tuple[int, str]]:
    """(id, title line) of each `### id N` block of a story/pair request."""
    blocks = re.split(r"^### id (\d+)\n", user_text(body), flags=re.M)[1:]
    return [(int(i), re.search(r"^Title: (.*)$", text, re.M).group(1)) for i, text in zip(blocks[::2], blocks[1::2])]


def story(model: str, title: str, kind: str = "story") -> str:
    return f"{title}\n\nA {kind} written by {model} for the test, long enough to count."


def writer(body: dict, prefer: str = "writer-a", confidence: float = 8) -> Reply:
    kind, model = kind_of(body), body.get("model", "")
    if kind == "health":
        return Reply(content='{"ok": true}')
    if kind == "judge":
        text = user_text(body)
        a = text.split("Answer A:\n", 1)[1].split("\n\nAnswer B:", 1)[0]
        return Reply(content=json.dumps({"winner": "A" if prefer in a else "B",
                                         "reasoning": f"{prefer} is eerier", "confidence": confidence}))
    if kind == "pairs":
        items = [{"id": i, "chosen": story(model, t, "dark story"), "rejected": story(model, t, "happy story")}
                 for i, t in spec_blocks(body)]
        return Reply(content=json.dumps({"pairs": items}))
    return Reply(content=json.dumps({"stories": [{"id": i, "story": story(model, t)} for i, t in spec_blocks(body)]}))


def small_teacher(body: dict, n: int, secret: str = "") -> Reply:
    """A tiny model behind llama.cpp's server (llama-cpp-python), as a teacher that cannot do the
    task: the health check passes (a short JSON object is within its reach), then each story or
    pair request gets one of the shapes such a model writes under a JSON grammar, in turn: an
    object of its own design, a list too short to count, or an answer cut off at max_tokens
    (finish_reason "length"). `secret` is echoed in the first shape (a model repeating its prompt)."""
    if kind_of(body) == "health":
        return Reply(content='{"ok": true}')
    shapes = [
        Reply(content=json.dumps({"title": f"The Door {secret}".strip(), "text": "It was dark."})),
        Reply(content=json.dumps({"stories": [{"id": 1, "story": "Boo."}]})),
        Reply(content='{"stories": [{"id": 1, "story": "The night was long and the house', finish_reason="length"),
    ]
    return shapes[(n - 1) % len(shapes)]
