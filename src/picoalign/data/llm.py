"""One OpenAI-compatible endpoint: provider resolution, the client, budgets, retries, JSON replies.

    from picoalign.data.llm import endpoint, LLMClient, Meter
    ep = endpoint("auto")                  # DeepSeek, OpenAI or LLM_BASE_URL, from the environment
    client = LLMClient(ep, Limits(max_calls=100), Meter())
    client.health_check()
    obj = client.chat_json([{"role": "user", "content": 'Reply {"ok": true}'}])

Providers and their environment (the key is read when the client is made and kept only inside
it: it is never a config field, never printed, never written; error texts are scrubbed of it):

| provider | key | base URL (default) | model (default) |
|---|---|---|---|
| deepseek | DEEPSEEK_API_KEY | DEEPSEEK_BASE_URL (https://api.deepseek.com) | DEEPSEEK_MODEL (deepseek-chat) |
| openai (alias chatgpt) | OPENAI_API_KEY | OPENAI_BASE_URL (https://api.openai.com/v1) | OPENAI_MODEL (gpt-4o-mini) |
| openrouter | OPENROUTER_API_KEY | OPENROUTER_BASE_URL (https://openrouter.ai/api/v1) | OPENROUTER_MODEL (openai/gpt-4o-mini) |
| openai-compatible | LLM_API_KEY (optional) | LLM_BASE_URL (required) | LLM_MODEL (default) |

`auto` is DeepSeek when DEEPSEEK_API_KEY is set, else OpenAI when OPENAI_API_KEY is set, else
the LLM_BASE_URL server when set, else the offline templates. An endpoint may also be written
`MODEL@PROVIDER` or `MODEL@http://host:port/v1` (the judge and the answer models use this).

Every HTTP attempt is one call. Before each, the budgets (`max_calls`, `max_total_tokens`,
counted from the replies' `usage`) are checked; with several requests in flight the token budget
can be passed by the replies already on their way. 429, 408, 409, 5xx, timeouts and refused
connections are retried with exponential backoff and jitter (a Retry-After header is honoured);
a reply that is not the JSON asked for is retried at once; other errors (400, 401, 404) are not.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from picoalign.scrub import scrub, strip_userinfo

AUTO_ORDER = (("deepseek", "DEEPSEEK_API_KEY"), ("openai", "OPENAI_API_KEY"), ("openai-compatible", "LLM_BASE_URL"))
ALIASES = {"chatgpt": "openai"}
NO_KEY = "no-key"  # the client needs a non-empty key; local servers (vLLM, llama.cpp) ignore it
MAX_BACKOFF_SECONDS = 60.0
RETRY_STATUS = {408, 409, 429}
MAX_NOTED_ANSWERS = 5  # unusable answers whose reason and start are logged and kept in the meta
ANSWER_START_CHARS = 200


@dataclass(frozen=True)
class Provider:
    key_env: str
    url_env: str
    default_url: str
    model_env: str
    default_model: str


PROVIDERS = {
    "deepseek": Provider("DEEPSEEK_API_KEY", "DEEPSEEK_BASE_URL", "https://api.deepseek.com",
                         "DEEPSEEK_MODEL", "deepseek-chat"),
    "openai": Provider("OPENAI_API_KEY", "OPENAI_BASE_URL", "https://api.openai.com/v1",
                       "OPENAI_MODEL", "gpt-4o-mini"),
    "openrouter": Provider("OPENROUTER_API_KEY", "OPENROUTER_BASE_URL", "https://openrouter.ai/api/v1",
                           "OPENROUTER_MODEL", "openai/gpt-4o-mini"),
    "openai-compatible": Provider("LLM_API_KEY", "LLM_BASE_URL", "", "LLM_MODEL", "default"),
}
KNOWN = ("auto", "template", *PROVIDERS, *ALIASES)


class LLMError(RuntimeError):
    """A request that failed for good (after its retries); the message holds no key."""


class BudgetExhausted(RuntimeError):
    """LLM_MAX_CALLS or LLM_MAX_TOTAL_TOKENS is reached: no more requests are sent."""


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def resolve_provider(name: str, environ: Mapping[str, str] | None = None) -> str:
    """The provider `name` stands for: `auto` picks the first one configured, else `template`."""
    name = ALIASES.get(name, name)
    if name not in KNOWN:
        raise ValueError(f"unknown provider {name!r} (known: {', '.join(KNOWN)})")
    if name != "auto":
        return name
    env = _env(environ)
    return next((p for p, var in AUTO_ORDER if env.get(var)), "template")


@dataclass(frozen=True)
class Endpoint:
    """Where requests go. Holds the *name* of the key's variable, never the key."""

    provider: str
    base_url: str
    model: str
    key_env: str

    def __str__(self) -> str:
        return f"{self.model} at {strip_userinfo(self.base_url)} ({self.provider})"

    def api_key(self, environ: Mapping[str, str] | None = None) -> str:
        key = _env(environ).get(self.key_env, "")
        if not key and self.provider != "openai-compatible":
            raise LLMError(f"provider {self.provider} needs {self.key_env} in the environment")
        return key or NO_KEY


def endpoint(provider: str, model: str = "", base_url: str = "",
             environ: Mapping[str, str] | None = None) -> Endpoint:
    """The endpoint of `provider` (after `auto`), with `model`/`base_url` overriding the env."""
    env = _env(environ)
    name = resolve_provider(provider, env)
    if name == "template":
        raise ValueError("the template provider has no endpoint (set an API key or LLM_BASE_URL)")
    spec = PROVIDERS[name]
    url = base_url or env.get(spec.url_env) or spec.default_url
    if not url:
        raise ValueError(f"provider {name} needs a base URL: set {spec.url_env} (e.g. http://127.0.0.1:8000/v1)")
    return Endpoint(name, url.rstrip("/"), model or env.get(spec.model_env) or spec.default_model, spec.key_env)


def parse_endpoint(text: str, default_provider: str = "auto",
                   environ: Mapping[str, str] | None = None) -> Endpoint:
    """`MODEL`, `MODEL@PROVIDER`, `@PROVIDER` or `MODEL@http://host:port/v1` -> Endpoint."""
    model, _, where = text.strip().partition("@")
    if where.startswith(("http://", "https://")):
        return endpoint("openai-compatible", model, where, environ)
    return endpoint(where or default_provider, model, "", environ)


def url_secrets(url: str) -> set[str]:
    """The `user:password` of a URL and the password alone (empty set without them)."""
    userinfo = urlsplit(url).netloc.rpartition("@")[0]
    return {userinfo, userinfo.partition(":")[2]} - {""}


def secrets(environ: Mapping[str, str] | None = None, also: Iterable[str] = ()) -> list[str]:
    """The API keys set in the environment, the passwords in its base URLs and `also` (to scrub
    them from any text we show or keep), longest first."""
    env = _env(environ)
    found = {env.get(p.key_env, "") for p in PROVIDERS.values()} | set(also)
    for p in PROVIDERS.values():
        found |= url_secrets(env.get(p.url_env, ""))
    return sorted(found - {""}, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None, also: Iterable[str] = ()) -> str:
    """`text` through the secret scrubber (picoalign/scrub.py), with the providers' keys and base
    URL passwords of `environ` and `also` among the secrets (a short one only as a token of its
    own: a key "abc" is not masked inside "abcdef")."""
    return scrub(text, environ, also=secrets(environ, also))


# ---------------------------------------------------------------- JSON replies


FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """The JSON object (or list) in a model's reply: bare, in a code fence, or after some words."""
    text = (text or "").strip()
    candidates = [m.group(1).strip() for m in FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    # RecursionError: a reply nested ~1,000 levels deep is no answer either (not a crash).
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except (json.JSONDecodeError, RecursionError):
            pass
        for start in (i for i, ch in enumerate(candidate) if ch in "{["):
            try:
                return decoder.raw_decode(candidate, start)[0]
            except json.JSONDecodeError:
                continue
            except RecursionError:
                break  # the later starts are inside the same deep nest: no answer here
    raise ValueError(f"no JSON in the reply: {text[:80]!r}")


# ---------------------------------------------------------------- budgets and usage


@dataclass
class Usage:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    failures: int = 0  # requests that failed for good
    retries: int = 0
    fallbacks: int = 0  # rows filled from the templates


@dataclass
class Meter:
    """Usage shared by every client of one run, the budgets checked before each call, and what
    went wrong first: the first failed attempt and the first few unusable answers (redacted)."""

    max_calls: int = 0
    max_total_tokens: int = 0
    usage: Usage = field(default_factory=Usage)
    first_failure: str | None = None
    unusable: list[dict] = field(default_factory=list)  # {"reason", "answer_start"}, MAX_NOTED_ANSWERS at most
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def failed(self, what: str) -> None:
        with self._lock:
            self.first_failure = self.first_failure or what

    def note_unusable(self, reason: str, answer: str) -> bool:
        """Keep the reason and the answer's start while fewer than MAX_NOTED_ANSWERS are kept."""
        with self._lock:
            if len(self.unusable) >= MAX_NOTED_ANSWERS:
                return False
            self.unusable.append({"reason": reason, "answer_start": answer[:ANSWER_START_CHARS]})
            return True

    def problems(self) -> dict:
        """What dataset_meta.json records of the failures (nothing when there were none)."""
        with self._lock:
            out = {"first_failure": self.first_failure} if self.first_failure else {}
            return out | ({"unusable_answers": list(self.unusable)} if self.unusable else {})

    def reserve(self) -> None:
        with self._lock:
            u = self.usage
            if self.max_calls and u.calls >= self.max_calls:
                raise BudgetExhausted(f"LLM_MAX_CALLS={self.max_calls} reached")
            if self.max_total_tokens and u.total_tokens >= self.max_total_tokens:
                raise BudgetExhausted(f"LLM_MAX_TOTAL_TOKENS={self.max_total_tokens} reached "
                                      f"({u.total_tokens} tokens used)")
            u.calls += 1

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self.usage, k, getattr(self.usage, k) + v)

    def snapshot(self) -> dict:
        with self._lock:
            return asdict(self.usage)


@dataclass
class Limits:
    """Per-request settings; `from_config` reads them from a stage config (`llm_<name>` or `<name>`)."""

    temperature: float = 0.8
    max_output_tokens: int = 1200
    max_retries: int = 5
    retry_base_seconds: float = 1.0
    timeout: float = 60.0
    json_mode: bool = True

    @classmethod
    def from_config(cls, cfg: Any) -> Limits:
        found = {}
        for f in fields(cls):
            for name in (f"llm_{f.name}", f.name):
                if hasattr(cfg, name):
                    found[f.name] = getattr(cfg, name)
                    break
        return cls(**found)


# ---------------------------------------------------------------- the client


class LLMClient:
    """Chat requests to one endpoint through the `openai` client, with our retry policy."""

    def __init__(self, ep: Endpoint, limits: Limits | None = None, meter: Meter | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        import openai

        self.endpoint, self.limits, self.meter = ep, limits or Limits(), meter or Meter()
        self._url_secrets = url_secrets(ep.base_url)  # a base URL from the config, not the environment
        self._openai = openai
        # max_retries=0: retries are ours, so that each attempt is counted against the budget.
        self._client = openai.OpenAI(api_key=ep.api_key(environ), base_url=ep.base_url,
                                     timeout=self.limits.timeout, max_retries=0)

    def chat_json(self, messages: list[dict], max_tokens: int = 0,
                  check: Callable[[Any], Any] | None = None, retries: int | None = None) -> Any:
        """The reply as JSON, passed through `check` (which raises ValueError to reject it)."""
        retries = self.limits.max_retries if retries is None else retries
        last, wait = "no attempt", 0.0
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(wait)
            self._reserve(last if attempt else None)
            try:
                reply = self._client.chat.completions.create(**self._request(messages, max_tokens))
            except self._openai.APIStatusError as e:
                last = self._failed(f"HTTP {e.status_code}: {_short(e.message)}")
                if e.status_code not in RETRY_STATUS and e.status_code < 500:
                    break
                wait = self._backoff(attempt, e.response.headers.get("retry-after"))
                continue
            except self._openai.APIConnectionError as e:  # refused, reset, timed out
                last, wait = self._failed(f"{type(e).__name__}: {_short(str(e))}"), self._backoff(attempt)
                continue
            self._count(reply)
            try:
                return self._usable(reply, check)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
                last, wait = self._unusable(reply, str(e), max_tokens), 0.0
        self.meter.add(failures=1)
        raise LLMError(self._redact(f"{self.endpoint}: {last}"))

    def _reserve(self, retrying_after: str | None) -> None:
        """A call from the budget (a retry is counted as one once it may be sent). A budget spent
        before a retry fails the request for good, and the error says what the failed attempt
        was: else the budget would hide the real problem."""
        try:
            self.meter.reserve()
        except BudgetExhausted as e:
            if retrying_after is None:
                raise
            self.meter.add(failures=1)
            why = f"{e} while retrying a failed request ({self.endpoint}: {retrying_after})"
            raise BudgetExhausted(self._redact(why)) from None
        if retrying_after is not None:
            self.meter.add(retries=1)

    def _redact(self, text: str) -> str:
        return redact(text, also=self._url_secrets)

    def _failed(self, what: str) -> str:
        what = self._redact(what)
        self.meter.failed(what)
        return what

    @staticmethod
    def _usable(reply: Any, check: Callable[[Any], Any] | None) -> Any:
        obj = extract_json(reply.choices[0].message.content or "")
        return check(obj) if check else obj

    def _unusable(self, reply: Any, why: str, max_tokens: int) -> str:
        """Record an answer we cannot use (the first few go to the log and the meta)."""
        choices = getattr(reply, "choices", None) or []
        answer = (getattr(getattr(choices[0], "message", None), "content", None) or "") if choices else ""
        reason = f"unusable reply: {_short(why, 160)}"
        if choices and getattr(choices[0], "finish_reason", None) == "length":
            reason += (f" (the answer was cut off at max_tokens={max_tokens or self.limits.max_output_tokens}; "
                       "raise llm_max_output_tokens or lower llm_batch_size)")
        reason, answer = self._redact(reason), self._redact(answer)
        if self.meter.note_unusable(reason, answer):
            print(f"data: {self.endpoint.model}: {reason}; the answer began: {answer[:120]!r}", file=sys.stderr)
        self.meter.failed(reason)
        return reason

    def health_check(self) -> None:
        """A tiny JSON request; raises LLMError (or BudgetExhausted) when the endpoint is unusable."""
        def ok(obj):
            if not isinstance(obj, dict) or obj.get("ok") is not True:
                raise ValueError(f'expected {{"ok": true}}, got {json.dumps(obj)[:60]}')
            return obj

        # At most two retries: a dead endpoint should not hold up the run.
        self.chat_json([{"role": "system", "content": "You answer with JSON only."},
                        {"role": "user", "content": 'Reply with exactly this JSON: {"ok": true}'}],
                       max_tokens=20, check=ok, retries=min(self.limits.max_retries, 2))

    def _request(self, messages: list[dict], max_tokens: int) -> dict:
        req = {"model": self.endpoint.model, "messages": messages, "temperature": self.limits.temperature,
               "max_tokens": max_tokens or self.limits.max_output_tokens}
        if self.limits.json_mode:
            req["response_format"] = {"type": "json_object"}
        return req

    def _backoff(self, attempt: int, retry_after: str | None = None) -> float:
        base = min(MAX_BACKOFF_SECONDS, self.limits.retry_base_seconds * 2 ** attempt)
        delay = base / 2 + random.uniform(0, base / 2)  # jitter: concurrent workers do not retry in step
        try:
            delay = max(delay, min(MAX_BACKOFF_SECONDS, float(retry_after))) if retry_after else delay
        except ValueError:
            pass
        return delay

    def _count(self, reply: Any) -> None:
        u = getattr(reply, "usage", None)
        if u is not None:
            self.meter.add(prompt_tokens=u.prompt_tokens or 0, completion_tokens=u.completion_tokens or 0,
                           total_tokens=u.total_tokens or 0)


def _short(text: str, n: int = 200) -> str:
    return " ".join(str(text).split())[:n]
