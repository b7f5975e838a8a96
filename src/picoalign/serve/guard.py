"""What stands in front of the routes: the API key, the body size limit, and errors in the
shape OpenAI clients read (`{"error": {"message", "type", "param", "code"}}`)."""

from __future__ import annotations

import hmac

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


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
    return JSONResponse(error_body(f"field '{field}': {first.get('msg', 'invalid')}", param=field,
                                   code="invalid_field"), status_code=400)


class Guard:
    """ASGI middleware for /v1/*: the API key (when one is set) and the body size limit.

    The key is checked before the body is read; the size from Content-Length where given, and
    while reading otherwise (a chunked upload stops at the limit).
    """

    def __init__(self, app, api_key: str, max_body_bytes: int) -> None:
        self.app, self.api_key, self.limit = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and not self._authorized(headers.get("authorization", "")):
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

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def _reply(self, exc: ApiError, scope, receive, send) -> None:
        response = JSONResponse(error_body(str(exc.detail), exc.type, exc.param, exc.code),
                                status_code=exc.status_code)
        await response(scope, receive, send)
