"""What stands in front of the routes: the Host and Origin checks, the API key, the body size
limit, errors in the shape OpenAI clients read (`{"error": {"message", "type", "param", "code"}}`),
and an access log without credentials."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
from contextlib import contextmanager
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from picoalign.scrub import scrub


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(HTTPException):
    """An HTTP error with the OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None) -> None:
        super().__init__(status, message, headers)
        self.param, self.code, self.type = param, code, type_


class BodyTooLarge(ApiError):
    # An HTTPException, so FastAPI's body reader passes it on instead of calling it a parse error.
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than this server's limit of {limit} bytes "
                         "(--max-body-bytes)", code="body_too_large")


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    body = error_body(str(exc.detail), getattr(exc, "type", "invalid_request_error"),
                      getattr(exc, "param", None), getattr(exc, "code", None))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything the checks did not catch: a 500 in the error shape. The type only, not the text
    (it may hold paths of this machine); the traceback goes to the server's log."""
    return JSONResponse(error_body(f"the server failed on this request ({type(exc).__name__}); see the server log",
                                   "server_error", code="internal_error"), status_code=500)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Bad JSON or a bad field: a 400 that says which and why."""
    first = exc.errors()[0]
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "JSON decode error")
        at = f" at character {loc[1]}" if len(loc) > 1 else ""
        return JSONResponse(error_body(f"the request body is not valid JSON: {reason}{at}", code="json_invalid"),
                            status_code=400)
    if loc == ("body",):  # no body, or not an object
        missing = first.get("type") == "missing"
        message = "the request body is empty" if missing else "the request body is not a JSON object"
        return JSONResponse(error_body(f"{message}; send a JSON object with Content-Type: application/json",
                                       code="invalid_body"), status_code=400)
    field = ".".join(str(p) for p in loc if p != "body")
    why = first.get("msg", "invalid").removeprefix("Value error, ")  # pydantic's prefix for our own checks
    return JSONResponse(error_body(f"field '{field}': {why}", param=field, code="invalid_field"), status_code=400)


def authorized(header: str, api_key: str) -> bool:
    """Whether an Authorization header carries `Bearer <api_key>` (compared in constant time)."""
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


# ---------------------------------------------------------------- Host and Origin

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


def host_name(value: str) -> str:
    """The name in a Host header or an Origin (`[::1]:8000` -> `::1`, `http://a.b:80` -> `a.b`)."""
    value = value.strip().lower()
    netloc = urlsplit(value).netloc if "://" in value else value
    try:
        return (urlsplit(f"//{netloc}").hostname or "").rstrip(".")
    except ValueError:  # a malformed [ipv6] part
        return ""


class HostNames:
    """The names this server answers to: loopback, the address it is bound to, and `--allowed-hosts`.

    A browser page can reach a server on 127.0.0.1 through DNS rebinding (its own name made to
    resolve to 127.0.0.1): the request then carries that name as Host, which this refuses (as
    Jupyter, Ollama and Vite's dev server do). Bound to every interface (0.0.0.0), an address
    given as digits (no DNS involved) and this machine's own name are accepted too. `*` in
    `--allowed-hosts` turns the check off.
    """

    def __init__(self, bound: str, allowed: str = "") -> None:
        extra = [h.strip().lower() for h in allowed.split(",") if h.strip()]
        self.any = "*" in extra
        self.wildcard = bound.strip().lower() in WILDCARDS
        self.names = {*LOOPBACK_NAMES, host_name(bound), *(host_name(h) for h in extra)} - {""}
        if self.wildcard:
            self.names.add(socket.gethostname().lower())

    def allowed(self, value: str) -> bool:
        name = host_name(value)
        if self.any or name in self.names:
            return True
        if not self.wildcard or not name:
            return False
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False


class Guard:
    """ASGI middleware: the Host check and, without an API key, the Origin check on every path;
    then for /v1/* the API key (when one is set) and the body size limit.

    The key is checked before the body is read; the size from Content-Length where given, and
    while reading otherwise (a chunked upload stops at the limit).
    """

    def __init__(self, app, api_key: str, max_body_bytes: int, hosts: HostNames | None = None) -> None:
        self.app, self.api_key, self.limit = app, api_key, max_body_bytes
        self.hosts = hosts or HostNames("127.0.0.1")

    def _refusal(self, headers: dict) -> ApiError | None:
        """Why the request's Host or Origin is not this server's, or None."""
        host = headers.get("host", "")
        if not self.hosts.allowed(host):
            return ApiError(400, f"Host {host!r} is not a name this server answers to; behind a reverse proxy, "
                            "add it with --allowed-hosts", param="Host", code="invalid_host")
        origin = headers.get("origin")
        if origin is not None and not self.api_key and not self.hosts.allowed(origin):
            # A keyless server would answer any page the user visits: only its own pages may call it.
            return ApiError(403, f"requests from the web page at {origin!r} are refused: this server has no "
                            "API key, so only its own pages may call it (set PICOALIGN_API_KEY, or add the "
                            "page's host with --allowed-hosts)", param="Origin", code="cross_origin_forbidden")
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan (the app serves no websockets)
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if (refusal := self._refusal(headers)) is not None:
            return await self._reply(refusal, scope, receive, send)
        if not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.api_key and not authorized(headers.get("authorization", ""), self.api_key):
            return await self._reply(ApiError(
                401, "missing or wrong API key: send the header `Authorization: Bearer <key>` "
                "(the server's PICOALIGN_API_KEY)", code="invalid_api_key"), scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._reply(BodyTooLarge(self.limit), scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


    async def _reply(self, exc: ApiError, scope, receive, send) -> None:
        response = JSONResponse(error_body(str(exc.detail), exc.type, exc.param, exc.code),
                                status_code=exc.status_code)
        await response(scope, receive, send)


# ---------------------------------------------------------------- the access log

def hide_credentials(path: str, api_key: str = "") -> str:
    """`path?query` through the secret scrubber (picoalign/scrub.py): the values of credential
    parameters (`?api_key=`, `?token=`, ...) and the server's own key however it is encoded
    (plain, percent-encoded, in part or whole) become ***."""
    return scrub(path, also=[api_key])


class AccessLogCredentials(logging.Filter):
    """uvicorn's access log line shows the path with its query string (`args[2]` of the record):
    a key sent as `?api_key=...` would be written to the log, so its value is hidden first."""

    def __init__(self, api_key: str) -> None:
        super().__init__()
        self.api_key = api_key

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], hide_credentials(args[2], self.api_key), *args[3:])
        return True


@contextmanager
def credentials_out_of_access_log(api_key: str):
    """While the server runs: the filter on uvicorn's access logger."""
    access, log_filter = logging.getLogger("uvicorn.access"), AccessLogCredentials(api_key)
    access.addFilter(log_filter)
    try:
        yield
    finally:
        access.removeFilter(log_filter)
