"""`picoalign serve`: the model behind an HTTP API, and a chat page.

    picoalign serve --model runs/demo/checkpoints/dpo                 # http://127.0.0.1:8000/
    PICOALIGN_API_KEY=secret picoalign serve --model ... --host 0.0.0.0 --port 8080

Endpoints: `GET /` (the chat page), `GET /health`, `GET /v1/models`, `POST /v1/generate`
(`{prompt, max_new_tokens, temperature, top_p, ...}` -> `{output, finish_reason, usage}`, the
prompt through the chat template unless `raw`), and the OpenAI-compatible
`POST /v1/chat/completions` (with `logprobs`/`top_logprobs`) and `POST /v1/completions` (raw
text or token ids, with `logprobs` and `echo`, so lm-evaluation-harness can score prompts), both
with `stream: true` as server-sent events. Requests are batched continuously: up to `max_batch`
generate together, each joining at the next decode step and leaving when done; `queue_size`
more may wait, and beyond that a request gets a 503 with Retry-After at once; one that runs
past `deadline_s` ends with finish_reason `deadline`. `/health` shows the batch, the queue
and tokens/s. Limits (`max_tokens`,
`max_prompt_chars`, `max_body_bytes`) answer 400/413 with the reason; with `PICOALIGN_API_KEY`
set, /v1/* needs `Authorization: Bearer <key>`. Every error, a failure no check foresaw
included, is JSON in OpenAI's shape; a client that goes away stops its generation.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import sys
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from picoalign.config import ServeConfig
from picoalign.generation.batched import Generation, Sampling
from picoalign.generation.continuous import Batcher, Job, Wants
from picoalign.scrub import register
from picoalign.serve.engine import Engine, QueueFull
from picoalign.serve.guard import (
    ApiError,
    Guard,
    HostNames,
    authorized,
    credentials_out_of_access_log,
    error_body,
    http_error,
    server_error,
    validation_error,
)
from picoalign.serve.logprobs import chat_logprobs, completion_logprobs
from picoalign.serve.schemas import ChatRequest, CompletionRequest, GenerateRequest, Sampled

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_PROMPTS = 32  # prompts in one /v1/completions request: one batch, so it bounds the memory
DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there
PAGE_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"


def usage(gens: list[Generation]) -> dict:
    prompt, completion = sum(g.prompt_tokens for g in gens), sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Handlers:
    """The request logic, apart from the routing: settings, limits, the queue, the answers."""

    def __init__(self, cfg: ServeConfig, engine: Engine) -> None:
        self.cfg, self.engine = cfg, engine

    def sampling(self, req: Sampled, max_tokens: int | None, greedy: bool = False) -> Sampling:
        cfg = self.cfg
        max_new = cfg.max_new_tokens if max_tokens is None else max_tokens
        if max_new > cfg.max_tokens:
            raise ApiError(400, f"max_tokens={max_new} is above this server's limit of {cfg.max_tokens}",
                           param="max_tokens", code="max_tokens_too_large")
        stop = req.stop_strings()
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        seed = req.seed if req.seed is not None else cfg.seed or secrets.randbelow(2**31)
        return Sampling(
            max_new_tokens=max_new,
            greedy=greedy or (req.temperature is None and cfg.greedy),
            temperature=cfg.temperature if req.temperature is None else req.temperature,
            top_p=cfg.top_p if req.top_p is None else req.top_p,
            top_k=cfg.top_k if req.top_k is None else req.top_k,
            seed=seed, stop=stop,
        )

    def wants(self, logprobs: int | None = None, echo: bool = False) -> Wants:
        deadline = time.monotonic() + self.cfg.deadline_s if self.cfg.deadline_s else None
        return Wants(logprobs=logprobs, echo=echo, deadline=deadline)

    def encode(self, prompt, raw: bool, chars: int, max_new: int) -> list[int]:
        """Prompt ids, after the limits: characters, then prompt + answer within the context."""
        if chars > self.cfg.max_prompt_chars:
            raise ApiError(400, f"the prompt is {chars} characters; this server takes at most "
                           f"{self.cfg.max_prompt_chars} (--max-prompt-chars)", code="prompt_too_long")
        try:
            ids = self.engine.encode(prompt, raw)
        except ValueError as e:  # e.g. messages for a model without a chat template
            raise ApiError(400, str(e), param="messages") from None
        return self.within_context(ids, max_new)

    def within_context(self, ids: list[int], max_new: int) -> list[int]:
        if len(ids) + max_new > self.engine.context_length:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) and max_tokens ({max_new}) exceed the "
                           f"model's context of {self.engine.context_length} tokens", code="context_length_exceeded")
        return ids

    def submit(self, prompts: list[list[int]], sampling: Sampling, wants: Wants):
        try:
            return self.engine.submit(prompts, sampling, wants)
        except QueueFull as e:
            raise ApiError(503, str(e), type_="server_error", code="queue_full", headers={"Retry-After": "1"}) from None

    async def complete(self, prompts: list[list[int]], sampling: Sampling, request: Request,
                       wants: Wants | None = None) -> list[tuple[Job, Generation]]:
        """The answers, from the batcher; a client that goes away cancels its jobs."""
        submitted = self.submit(prompts, sampling, wants or self.wants())
        watcher = asyncio.create_task(_watch_disconnect(request))
        answers = asyncio.gather(*(listener.result() for _, listener in submitted))
        try:
            done, _ = await asyncio.wait({watcher, answers}, return_when=asyncio.FIRST_COMPLETED)
            if answers not in done:  # no one reads this answer; the access log shows the 499
                raise ApiError(499, "the client closed the connection before the answer was ready",
                               code="client_closed_request")
            return [(job, gen) for (job, _), gen in zip(submitted, answers.result())]
        finally:
            watcher.cancel()
            answers.cancel()
            # A gather cancelled while its listeners wait ends with a CancelledError *exception*
            # (not as cancelled); unread, asyncio logs it with a traceback: read it here.
            answers.add_done_callback(lambda f: f.cancelled() or f.exception())
            for job, _ in submitted:
                job.cancel()  # no-op for a job that is done

    def stream(self, prompt_ids: list[int], sampling: Sampling, chunk, last_chunk, include_usage: bool,
               first: dict | None = None):
        """An SSE response: `first`, `chunk(piece)` per piece of text, `last_chunk(result)`, usage, [DONE]."""
        ((job, listener),) = self.submit([prompt_ids], sampling, self.wants())

        async def events():
            try:
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                async for kind, value in listener.events():
                    if kind == "text":
                        yield f"data: {json.dumps(chunk(value), ensure_ascii=False)}\n\n"
                    elif kind == "error":
                        raise value
                    else:
                        yield f"data: {json.dumps(last_chunk(value), ensure_ascii=False)}\n\n"
                        if include_usage:
                            yield f"data: {json.dumps({**last_chunk(value), 'choices': [], 'usage': usage([value])})}\n\n"
            except Exception as e:  # the status line is sent already: report in the stream
                yield f"data: {json.dumps(error_body(f'generation failed: {e}', 'server_error'))}\n\n"
            finally:
                job.cancel()  # a client that went away frees its row at the next step
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------ endpoints

    async def generate(self, req: GenerateRequest, request: Request) -> dict:
        s = self.sampling(req, req.max_new_tokens, req.greedy)
        ids = self.encode(req.prompt, req.raw, len(req.prompt), s.max_new_tokens)
        ((_, gen),) = await self.complete([ids], s, request)
        return {"output": gen.text, "model": self.engine.name, "finish_reason": gen.finish_reason,
                "usage": usage([gen])}

    async def chat(self, req: ChatRequest, request: Request):
        messages = [m.as_dict() for m in req.messages]
        s = self.sampling(req, req.max_completion_tokens or req.max_tokens)
        ids = self.encode(messages, False, sum(len(m["content"]) for m in messages), s.max_new_tokens)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.engine.name}
        if req.stream:
            if req.logprobs:
                raise ApiError(400, "logprobs are not streamed; ask without stream", param="logprobs")
            chunk = {**head, "object": "chat.completion.chunk"}

            def piece(text: str) -> dict:
                return {**chunk, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}

            def last(result: Generation) -> dict:
                return {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": result.finish_reason}]}

            role = {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]}
            return self.stream(ids, s, piece, last, bool(req.stream_options and req.stream_options.include_usage),
                               first=role)
        top = req.top_logprobs or 0
        ((job, gen),) = await self.complete([ids], s, request, self.wants(top if req.logprobs else None))
        choice = {"index": 0, "message": {"role": "assistant", "content": gen.text},
                  "finish_reason": gen.finish_reason,
                  "logprobs": chat_logprobs(self.engine.tokenizer, job, top) if req.logprobs else None}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage([gen])}

    def completion_prompts(self, req: CompletionRequest, max_new: int) -> list[list[int]]:
        """The prompts' ids: text (all of it under the character limit), or token ids as given."""
        prompt = req.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        if not prompts or not all(prompts) or len(prompts) > MAX_PROMPTS:
            raise ApiError(400, f"prompt: give a non-empty string or a list of 1 to {MAX_PROMPTS} of them "
                           "(or token ids: a list of ints, or a list of such lists)", param="prompt")
        texts = [p for p in prompts if isinstance(p, str)]
        total = sum(map(len, texts))  # the character limit is for the whole request, like a chat's messages
        vocab = self.engine.model.get_input_embeddings().num_embeddings
        ids = []
        for p in prompts:
            if isinstance(p, str):
                ids.append(self.encode(p, True, total, max_new))
            elif all(0 <= t < vocab for t in p):
                ids.append(self.within_context(list(p), max_new))
            else:
                raise ApiError(400, f"prompt: token ids must be in 0..{vocab - 1}", param="prompt")
        return ids

    async def completions(self, req: CompletionRequest, request: Request):
        if req.max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens 0 generates nothing; it takes echo: true (to score the prompt)",
                           param="max_tokens")
        s = self.sampling(req, req.max_tokens)
        ids = self.completion_prompts(req, s.max_new_tokens)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.engine.name,
                "object": "text_completion"}
        if req.stream:
            if len(ids) > 1 or req.echo or req.logprobs is not None:
                raise ApiError(400, "stream takes one prompt, without echo or logprobs", param="stream")

            def piece(text: str) -> dict:
                return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}

            def last(result: Generation) -> dict:
                return {**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                             "finish_reason": result.finish_reason}]}

            return self.stream(ids[0], s, piece, last, bool(req.stream_options and req.stream_options.include_usage))
        wants = self.wants(req.logprobs, echo=req.echo and req.logprobs is not None)
        answers = await self.complete(ids, s, request, wants)
        tokenizer = self.engine.tokenizer
        choices = []
        for i, (job, gen) in enumerate(answers):
            prompt_text = tokenizer.decode(job.prompt_ids) if req.echo or req.logprobs is not None else ""
            logprobs = (completion_logprobs(tokenizer, job, req.echo, prompt_text)
                        if req.logprobs is not None else None)
            choices.append({"index": i, "text": (prompt_text if req.echo else "") + gen.text, "logprobs": logprobs,
                            "finish_reason": gen.finish_reason})
        return {**head, "choices": choices, "usage": usage([gen for _, gen in answers])}


async def _watch_disconnect(request: Request) -> None:
    """Return once the client has closed the connection (checked every DISCONNECT_POLL_S)."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


def public_name(model: str) -> str:
    """The id the API reports when `name` is not set: a local folder or file by its last part
    (its whole path would tell any caller about this machine), a hub id or `builtin:` as given."""
    path = Path(model)
    return path.resolve().name if path.exists() else model  # resolved: `--model .` has a name too


def create_app(cfg: ServeConfig) -> FastAPI:
    """The FastAPI app; the model loads when the app starts (its lifespan), not here."""
    register(cfg.api_key)  # whatever this process writes, the key stays out (picoalign/scrub.py)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from picoalign.models.load import load_for_inference

        def load():
            return load_for_inference(cfg.model, cfg.device, cfg.dtype, cfg.merge_adapter)

        # the model loads in the thread that then decodes (Batcher.launch says why)
        batcher = await run_in_threadpool(Batcher.launch, load, max_batch=cfg.max_batch, queue_size=cfg.queue_size)
        name = cfg.name or public_name(cfg.model)
        app.state.handlers = Handlers(cfg, Engine(batcher.model, batcher.tokenizer, name, batcher))
        try:
            with credentials_out_of_access_log(cfg.api_key):
                yield
        finally:
            batcher.stop()

    app = FastAPI(title="picoalign", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(Guard, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes,
                       hosts=HostNames(cfg.host, cfg.allowed_hosts))
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)  # what slips through: a JSON 500, not plain text

    def handlers(request: Request) -> Handlers:
        return request.app.state.handlers

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        html = resources.files("picoalign.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/health")
    @app.get("/healthz")  # the original server's name
    def health(request: Request) -> dict:
        """Public: the model's name; its path only to a request with the key (when one is set)."""
        h = handlers(request)
        body = {"status": "ok", "model": h.engine.name, "queue": h.engine.batcher.status()}
        if cfg.api_key and authorized(request.headers.get("authorization", ""), cfg.api_key):
            body["model_path"] = cfg.model
        return body

    @app.get("/v1/models")
    def models(request: Request) -> dict:
        card = {"id": handlers(request).engine.name, "object": "model", "created": 0, "owned_by": "picoalign",
                "max_model_len": handlers(request).engine.context_length}
        return {"object": "list", "data": [card]}

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest, request: Request):
        return await handlers(request).generate(req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        return await handlers(request).chat(req, request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await handlers(request).completions(req, request)

    return app


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(cfg: ServeConfig) -> None:
    """Run the server until Ctrl-C."""
    import uvicorn

    if not is_loopback(cfg.host) and not cfg.api_key:
        print(f"serve: warning: listening on {cfg.host} without an API key; anyone who can reach this "
              "machine can use the model (set PICOALIGN_API_KEY)", file=sys.stderr)
    print(f"serve: loading {cfg.model}; then the chat page is at http://{cfg.host}:{cfg.port}/ and the API "
          f"at http://{cfg.host}:{cfg.port}/v1", file=sys.stderr)
    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level=cfg.log_level)
